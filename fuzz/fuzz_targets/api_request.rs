//! Fuzzes the daemon's HTTP control API in-process: requests (method, route, path segments, query, key, headers,
//! body) derived from the input go to the axum router over an in-memory connection, against an in-memory pool with a
//! dot, commits and a branch. See `check_api_requests` in `fuzz/harness/api.rs`; `cli/tests/api_fuzz_replay.rs`
//! replays it on stable Rust.
#![no_main]

#[path = "../harness/api.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::check_api_requests(data));
