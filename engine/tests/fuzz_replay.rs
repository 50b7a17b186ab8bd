//! Stable-Rust replay of the engine's fuzz targets (`fuzz/fuzz_targets/stream_receive.rs`, `pool_open.rs`): the same
//! property checks (`fuzz/harness/engine.rs`) over the committed seed corpus (`engine/tests/fuzz_corpus/<target>/`,
//! crash inputs kept as regressions included) and a few hundred proptest inputs, so CI covers them without nightly.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/harness/engine.rs"]
mod harness;

use std::path::PathBuf;

use proptest::prelude::*;

/// The committed inputs of one target, in name order.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn stream_receive_seed_corpus() {
    let seeds = corpus("stream_receive");
    assert!(seeds.len() >= 8, "the seed corpus is there");
    for (name, data) in seeds {
        eprintln!("stream_receive seed {name}");
        harness::check_stream_receive(&data);
    }
}

#[test]
fn pool_open_seed_corpus() {
    let seeds = corpus("pool_open");
    assert!(seeds.len() >= 4, "the seed corpus is there");
    for (name, data) in seeds {
        eprintln!("pool_open seed {name}");
        harness::check_pool_open(&data);
    }
}

/// The harness itself: the fixtures are what the targets assume (so a seed means what it says).
#[test]
fn the_fixtures_are_sound() {
    let f = harness::stream_fixture();
    // unmodified streams go in, and with recomputed checksums they are still the same bytes
    for (s, seal) in [(&f.full, false), (&f.full, true), (&f.inc, true)] {
        let mut copy = s.clone();
        harness::reseal_stream(&mut copy, seal);
        assert!(copy == *s, "resealing an intact stream changes nothing");
    }
    harness::check_stream_receive(&[1]);
    harness::check_stream_receive(&[2]);
    // the image: resealing every block of it changes nothing, and it opens whole
    let img = harness::image_fixture();
    assert!(img.records.len() >= 4, "the image holds log records: {:?}", img.records);
    let copy = img.image.crash_losing_all_unsynced();
    harness::reseal_image(&copy, &img.records, &img.used_blocks);
    let mut a = vec![0u8; 4096];
    let mut b = vec![0u8; 4096];
    for &blk in &img.used_blocks {
        copy.peek(&mut a, blk * 4096);
        img.image.peek(&mut b, blk * 4096);
        assert!(a == b, "resealing block {blk} of an intact image changes it");
    }
    harness::check_pool_open(&[1]);
    harness::check_pool_open(&[3]);
}

/// Resealing gets a mutated stream past every checksum and the hash chain, so the fuzzer reaches what the receiver
/// does with records it cannot refuse on checksums: here one with other data, which goes in as other data.
#[test]
fn a_resealed_stream_gets_past_the_checksums() {
    let f = harness::stream_fixture();
    let mut s = f.full.clone();
    // the last byte of the first data record's payload
    let head = 16 + u32::from_le_bytes(s[12..16].try_into().unwrap()) as usize + 4;
    let mut at = head;
    loop {
        let len = u32::from_le_bytes(s[at + 1..at + 5].try_into().unwrap()) as usize;
        if s[at] == 2 {
            s[at + 5 + len - 1] ^= 0x40;
            break;
        }
        at += 5 + len + 4;
    }
    harness::reseal_stream(&mut s, true);
    let (_dev, pool) = {
        let dev = f.empty.crash_losing_all_unsynced();
        let pool = blockmesh_engine::Pool::open(dev.clone(), harness::opts(2)).unwrap();
        (dev, pool)
    };
    let out = pool.receive(&mut &s[..]).unwrap();
    let mut b = vec![0u8; 128 << 10];
    pool.commit_volume(harness::DOT, out.commit, None).unwrap().read(0, &mut b).unwrap();
    assert!(b != f.c1_content[0].1, "a resealed stream with other data carries other data");
}

/// Bugs the fuzzers found, each kept as a regression test (its reproducer in `tests/fuzz_corpus/`).
#[test]
fn regression_refused_header_leaves_no_receive_leftovers() {
    let data = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/stream_receive/bug-stage-leftovers"),
    )
    .unwrap();
    harness::check_stream_receive(&data);
}

#[test]
fn regression_impossible_segment_usage_is_refused_at_open() {
    let data =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/pool_open/bug-stats-overflow"))
            .unwrap();
    harness::check_pool_open(&data);
}

#[test]
fn regression_huge_superblock_and_checkpoint_fields_are_refused_not_overflowed() {
    // (then: a resealed checkpoint naming a tree height above the most a volume needs; a resealed log record sharing
    // a tree root that is not live; a resealed superblock whose replay cursor lies outside its segment; a resealed log
    // record naming a next segment beyond the pool; a resealed tree node naming a free child)
    for bug in [
        "bug-open-geometry-overflow",
        "bug-checkpoint-offset-overflow",
        "bug-tree-height-overflow",
        "bug-share-dead-root",
        "bug-replay-cursor-outside-segment",
        "bug-log-position-overflow",
        "bug-node-child-free",
    ] {
        let data =
            std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/pool_open").join(bug))
                .unwrap();
        harness::check_pool_open(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x00f0_22ed),
        ..ProptestConfig::default() })]

    #[test]
    fn stream_receive_random(mode in 0u8..8, rest in proptest::collection::vec(any::<u8>(), 0..96)) {
        let mut data = vec![mode];
        data.extend(rest);
        harness::check_stream_receive(&data);
    }

    #[test]
    fn pool_open_random(mode in 0u8..4, rest in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut data = vec![mode];
        data.extend(rest);
        harness::check_pool_open(&data);
    }
}

/// Found by `pool_open` (was known and not fixed until vbns were reused): a resealed checkpoint with a huge
/// `next_vbn` opened, and the first write then asked for memory in proportion to it, since the block table kept a
/// slot per 256 vbns ever named. An open now takes `next_vbn` from the table itself [I9].
#[test]
fn regression_huge_next_vbn_costs_nothing() {
    let data =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/pool_open/bug-huge-next-vbn"))
            .unwrap();
    harness::check_pool_open(&data);
}
