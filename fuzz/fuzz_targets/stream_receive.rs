//! Fuzzes the engine's send-stream receive path (`Pool::receive`, `Pool::resume_receive`, `read_stream_head`):
//! raw bytes, or the fixture's valid streams (whole, incremental, resumed) with byte edits, cuts, and optionally
//! recomputed checksums and hash chain so edits get past them. See `check_stream_receive` in
//! `fuzz/harness/engine.rs` for the input layout and the properties; `engine/tests/fuzz_replay.rs` replays them on
//! stable Rust.
#![no_main]

#[path = "../harness/engine.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::check_stream_receive(data));
