//! Diffs between snapshots (and the live volume), and the allocation map: exactly the blocks touched, with what the
//! newer side holds; shared history is skipped; checked against a model and after reopen.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use blockmesh_engine::{Extent, ExtentKind, Pool};
use common::{pattern, sim_pool, small_opts};
use proptest::prelude::*;

const BS: u64 = 4096;

/// Expand extents to one kind per block.
fn per_block(extents: &[Extent]) -> BTreeMap<u64, ExtentKind> {
    let mut m = BTreeMap::new();
    for e in extents {
        assert_eq!(e.offset_bytes % BS, 0);
        assert_eq!(e.len_bytes % BS, 0);
        for b in e.offset_bytes / BS..(e.offset_bytes + e.len_bytes) / BS {
            assert!(m.insert(b, e.kind).is_none(), "extents overlap at block {b}");
        }
    }
    m
}

#[test]
fn diff_reports_written_zeroed_and_trimmed_blocks() {
    let (dev, pool) = sim_pool(32 << 20, 1);
    let v = pool.create_volume("v", 8 << 20).unwrap();
    v.write(0, &pattern(1, 1 << 20)).unwrap();
    pool.snapshot(&[("v", "a")]).unwrap();
    v.write(5 * BS, &pattern(2, 2 * BS as usize)).unwrap(); // blocks 5, 6
    v.write_zeroes(100 * BS, 3 * BS).unwrap(); // 100..103
    v.trim(200 * BS, BS).unwrap(); // 200
    v.write(2000 * BS, &pattern(3, BS as usize)).unwrap(); // 2000: a leaf that did not exist
    v.trim(1500 * BS, BS).unwrap(); // never written: no change
    pool.snapshot(&[("v", "b")]).unwrap();
    let mut want = BTreeMap::new();
    for b in [5, 6, 2000] {
        want.insert(b, ExtentKind::Data);
    }
    for b in 100..103 {
        want.insert(b, ExtentKind::Zero);
    }
    want.insert(200, ExtentKind::Trimmed);
    assert_eq!(per_block(&pool.diff("a", "b").unwrap()), want);
    assert_eq!(per_block(&pool.diff("a", "v").unwrap()), want, "the live volume equals b");
    assert!(pool.diff("b", "v").unwrap().is_empty());
    // backwards: what a holds where they differ
    let back = per_block(&pool.diff("b", "a").unwrap());
    assert_eq!(back.keys().copied().collect::<Vec<_>>(), want.keys().copied().collect::<Vec<_>>());
    assert_eq!(back[&2000], ExtentKind::Hole);
    assert_eq!(back[&100], ExtentKind::Data);
    // the same after a reopen (nodes read back from disk)
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(1)).unwrap();
    assert_eq!(per_block(&pool.diff("a", "b").unwrap()), want);
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn diff_of_a_grown_volume_and_of_unrelated_volumes() {
    let (_dev, pool) = sim_pool(32 << 20, 2);
    let v = pool.create_volume("v", 512 << 10).unwrap(); // height 1
    v.write(0, &pattern(1, 8192)).unwrap();
    pool.snapshot(&[("v", "small")]).unwrap();
    pool.resize_volume("v", 64 << 20, false).unwrap(); // height 2
    v.write(10 << 20, &pattern(2, 4096)).unwrap();
    let d = per_block(&pool.diff("small", "v").unwrap());
    assert_eq!(d.into_iter().collect::<Vec<_>>(), vec![((10 << 20) / BS, ExtentKind::Data)]);
    // unrelated volumes: every mapped block differs
    let w = pool.create_volume("w", 512 << 10).unwrap();
    w.write(0, &pattern(1, 8192)).unwrap();
    let d = per_block(&pool.diff("small", "w").unwrap());
    assert_eq!(d.len(), 2, "same bytes, different blocks: reported");
}

#[test]
fn allocation_map_over_holes_zeroes_and_data() {
    let (_dev, pool) = sim_pool(32 << 20, 3);
    let v = pool.create_volume("v", 1 << 30).unwrap();
    v.write(4 * BS, &pattern(1, 2 * BS as usize)).unwrap();
    v.write_zeroes(8 * BS, 4 * BS).unwrap();
    v.write(512 << 20, &pattern(2, BS as usize)).unwrap();
    let map = v.allocation(0, 1 << 30).unwrap();
    let total: u64 = map.iter().map(|e| e.len_bytes).sum();
    assert_eq!(total, 1 << 30, "covers the range");
    assert!(map.len() <= 8, "holes are merged: {map:?}");
    let at = |off: u64| map.iter().find(|e| e.offset_bytes <= off && off < e.offset_bytes + e.len_bytes).unwrap().kind;
    assert_eq!(at(0), ExtentKind::Hole);
    assert_eq!(at(4 * BS), ExtentKind::Data);
    assert_eq!(at(9 * BS), ExtentKind::Zero);
    assert_eq!(at(512 << 20), ExtentKind::Data);
    assert_eq!(at(900 << 20), ExtentKind::Hole);
    // sub-block ranges are clipped
    let part = v.allocation(4 * BS + 512, 1024).unwrap();
    assert_eq!(part, vec![Extent { offset_bytes: 4 * BS + 512, len_bytes: 1024, kind: ExtentKind::Data }]);
    // snapshots answer too
    pool.snapshot(&[("v", "s")]).unwrap();
    v.trim(4 * BS, 2 * BS).unwrap();
    let s = pool.snapshot_volume("s").unwrap();
    assert_eq!(s.allocation(4 * BS, BS).unwrap()[0].kind, ExtentKind::Data);
    assert_eq!(v.allocation(4 * BS, BS).unwrap()[0].kind, ExtentKind::Trimmed);
}

#[derive(Debug, Clone)]
enum Change {
    Write(u16, u8),
    Zero(u16, u8),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The diff between two snapshots is exactly the set of blocks written or zeroed between them.
    #[test]
    fn diff_equals_touched_blocks(
        before in prop::collection::vec((0u16..2048, 1u8..8), 0..40),
        between in prop::collection::vec(prop_oneof![
            (0u16..2048, 1u8..8).prop_map(|(b, n)| Change::Write(b, n)),
            (0u16..2048, 1u8..8).prop_map(|(b, n)| Change::Zero(b, n)),
        ], 0..40),
    ) {
        let (_dev, pool) = sim_pool(64 << 20, 4);
        let v = pool.create_volume("v", 2056 * BS).unwrap();
        for (i, (b, n)) in before.iter().enumerate() {
            v.write(u64::from(*b) * BS, &pattern(i as u64, usize::from(*n) * BS as usize)).unwrap();
        }
        pool.snapshot(&[("v", "a")]).unwrap();
        let mut touched = BTreeMap::new();
        for (i, c) in between.iter().enumerate() {
            match c {
                Change::Write(b, n) => {
                    v.write(u64::from(*b) * BS, &pattern(1000 + i as u64, usize::from(*n) * BS as usize)).unwrap();
                    for k in 0..u64::from(*n) { touched.insert(u64::from(*b) + k, ExtentKind::Data); }
                }
                Change::Zero(b, n) => {
                    v.write_zeroes(u64::from(*b) * BS, u64::from(*n) * BS).unwrap();
                    for k in 0..u64::from(*n) { touched.insert(u64::from(*b) + k, ExtentKind::Zero); }
                }
            }
        }
        pool.snapshot(&[("v", "b")]).unwrap();
        prop_assert_eq!(per_block(&pool.diff("a", "b").unwrap()), touched);
    }
}
