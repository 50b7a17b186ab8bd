//! Fuzzes `Pool::open` on a simulated device: raw bytes, or a small valid pool image (volumes, snapshots, a dot,
//! log records to replay) with block edits at chosen offsets, optionally with the checksums over them recomputed so
//! the damage gets past the superblock, record and checkpoint checksums. An opened pool is then checked, scrubbed,
//! read, written and reopened. See `check_pool_open` in `fuzz/harness/engine.rs`; `engine/tests/fuzz_replay.rs`
//! replays it on stable Rust.
#![no_main]

#[path = "../harness/engine.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::check_pool_open(data));
