//! Stable-Rust replay of the `api_request` fuzz target (`fuzz/fuzz_targets/api_request.rs`): the same property check
//! (`fuzz/harness/api.rs`) over a small seed corpus (crash inputs kept as regressions included) and a few hundred
//! seeded random inputs, so CI covers it without nightly.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/harness/api.rs"]
mod harness;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Hand-made inputs: a request count, then per request method, dot, route (and segments), query, key, headers and
/// body selectors (see `harness::request`); a zero byte, where an input ends, picks GET, `admin/db` and the right key.
const SEEDS: &[&[u8]] = &[
    // GET /v1/pool
    &[0, 0, 0, 2, 0, 0, 0, 0],
    // GET /v1/dots/admin/db: with the key, without, with a wrong one
    &[2, 0, 0, 6, 0, 0, 0, 0, 0, 0, 6, 0, 1, 0, 0, 0, 0, 6, 0, 2, 0, 0],
    // POST /v1/dots with a JSON object, then the dot's commits
    &[1, 1, 0, 5, 0, 0, 0, 2, 2, 0, 2, 3, 0, 2, 7, 0, 0, 0, 0],
    // POST /v1/receive: the incremental stream, intact (applies) and cut short (interrupted); GET /v1/receives
    &[2, 1, 0, 16, 0, 0, 0, 5, 0, 1, 0, 16, 0, 0, 0, 5, 1, 40, 1, 0, 0, 17, 0, 0, 0, 0],
    // POST /v1/receive: another dot's stream with a flipped byte, and intact
    &[1, 1, 0, 16, 0, 0, 0, 6, 2, 0, 9, 0, 7, 1, 0, 16, 0, 0, 0, 6, 0],
    // GET send of c1 with a query, checkout and reset with JSON
    &[2, 0, 0, 15, 2, 5, 0, 2, 0, 2, 7, 0, 4, 0, 0, 1, 0, 10, 0, 0, 0, 2, 1, 7, 8, 4, 1, 0, 11, 0, 0, 0, 2, 1, 9, 8, 0],
    // a raw path, an odd method, a stray segment
    &[
        1, 7, 0, 20, 5, b'v', b'1', b'/', b'%', b'x', 0, 0, 0, 0, 8, 0, 19, 9, 3, b'a', b'b', b'c', 0, 0, 1, 4, 1, 2,
        3, 4,
    ],
    // DELETE the dot (no force), an interrupted receive by a bad id
    &[1, 2, 0, 6, 0, 0, 0, 0, 2, 0, 18, 9, 3, b'x', b'y', b'z', 0, 0, 0, 0],
    // another namespace's dot, resize and clone with JSON
    &[1, 1, 2, 14, 0, 0, 0, 2, 2, 1, 3, 0, 1, 0, 12, 0, 0, 0, 3, 1, 10, 8, 5, b'c', b'o', b'p', b'y'],
];

#[test]
fn api_seed_corpus() {
    for (i, seed) in SEEDS.iter().enumerate() {
        eprintln!("api seed {i}");
        harness::check_api_requests(seed);
    }
}

#[test]
fn api_random_inputs() {
    let mut rng = SmallRng::seed_from_u64(0x00b1_0c4d);
    for i in 0..300 {
        let len = rng.random_range(0..160);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        eprintln!("api random input {i}: {data:?}");
        harness::check_api_requests(&data);
    }
}

/// The input layout means what the seeds say: a zero byte is the right key, and the routes are reached.
#[test]
fn inputs_decode_to_the_requests_the_seeds_describe() {
    let f = harness::fixture();
    let mut u = harness::Input::new(&[1, 0, 6, 0, 0, 0, 0]);
    let r = harness::request(&mut u, f);
    assert_eq!((r.method.as_str(), r.target.as_str()), ("POST", "/v1/dots/admin/db"));
    assert!(r.headers.iter().any(|(k, v)| k == "authorization" && v == &format!("Bearer {}", harness::KEY)));
    let mut u = harness::Input::new(&[0, 0, 2, 0, 1, 0, 0]);
    let r = harness::request(&mut u, f);
    assert_eq!(r.target, "/v1/pool");
    assert!(r.headers.iter().all(|(k, _)| k != "authorization"), "selector 1: no key");
}
