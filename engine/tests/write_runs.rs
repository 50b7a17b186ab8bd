//! A write of many blocks maps each block after the first of a leaf straight into that leaf, without a walk from the
//! root (`Index::set_in_leaf`); replay maps the same logged ops one at a time, walking every time. Both must reach
//! the same state: the same vbns (replay checks each logged vbn against the one it hands out, and a mismatch is a
//! corruption error), the same tree, the same contents. Writes here cross leaf boundaries, start and end inside
//! blocks, carry zero blocks in their middle, land on leaves a snapshot shares, and span a segment switch; each test
//! crashes after a flush, replays, compares, and ends with reopen + check.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Pool, PoolOptions};
use common::{pattern, reopen_checked, small_opts, Model, State};

const BS: u64 = 4096;
/// Blocks one leaf of a volume's tree maps.
const LEAF_BLOCKS: u64 = 256;

/// [`small_opts`] (small segments, log writes in the caller) with checkpoints far apart, so that what a test writes
/// is replayed from the log after the crash, not read from a checkpoint.
fn opts(id: u64) -> PoolOptions {
    PoolOptions { checkpoint_interval_bytes: 1 << 30, ..small_opts(id) }
}

fn pool(size_bytes: u64, id: u64) -> (Arc<SimDevice>, Pool) {
    let dev = SimDevice::new(size_bytes);
    let pool = Pool::create(dev.clone(), opts(id)).unwrap();
    (dev, pool)
}

/// `len` bytes of `pattern(seed)` with the blocks in `zero_blocks` (indexes into the buffer's whole blocks) zeroed.
fn with_zero_blocks(seed: u64, len: usize, zero_blocks: &[usize]) -> Vec<u8> {
    let mut d = pattern(seed, len);
    for &b in zero_blocks {
        let lo = b * BS as usize;
        d[lo..(lo + BS as usize).min(len)].fill(0);
    }
    d
}

fn write(model: &mut Model, pool: &Pool, vol: &str, offset: u64, data: &[u8]) {
    pool.volume(vol).unwrap().write(offset, data).unwrap();
    model.write(vol, offset, data);
}

/// Crash losing nothing flushed, reopen (replaying the log), compare with `expected`, and end with reopen + check.
fn crash_replay_compare(dev: Arc<SimDevice>, pool: Pool, id: u64, expected: &State) {
    common::assert_same(&State::of_pool(&pool), expected, "before the crash");
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "before the crash: {:?}", report.problems);
    let image = dev.crash_losing_all_unsynced();
    drop(pool);
    let pool = Pool::open(image.clone(), opts(id)).unwrap();
    assert!(pool.stats().replayed_records > 0, "the writes were replayed, not read from a checkpoint");
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "after replay: {:?}", report.problems);
    common::assert_same(&State::of_pool(&pool), expected, "after replay");
    let pool = reopen_checked(image, pool, id);
    common::assert_same(&State::of_pool(&pool), expected, "after replay and a clean reopen");
}

#[test]
fn large_writes_across_leaves_replay_to_the_same_state() {
    let (dev, pool) = pool(64 << 20, 31);
    let mut model = Model::default();
    pool.create_volume("v", 12 << 20).unwrap(); // 3,072 blocks: 12 leaves, a tree of two levels
    model.create("v", 12 << 20);
    pool.checkpoint().unwrap();
    // a fresh tree: every leaf is created by the first block the write puts in it
    write(&mut model, &pool, "v", 0, &pattern(1, 3 << 20));
    // over those leaves again, from inside a leaf, unaligned at both ends, zero blocks at a leaf's first slot, in
    // the middle of a leaf and as the last block of one
    let zeros = [0, 2, 3, 200, LEAF_BLOCKS as usize - 3, 2 * LEAF_BLOCKS as usize - 3];
    let at = (LEAF_BLOCKS - 3) * BS + 512;
    write(&mut model, &pool, "v", at, &with_zero_blocks(2, (2 << 20) + 5120, &zeros));
    // a leaf the tree does not have yet, after a gap of holes
    write(&mut model, &pool, "v", 7 * LEAF_BLOCKS * BS + 40 * BS, &pattern(3, 600 * BS as usize));
    pool.volume("v").unwrap().flush().unwrap();
    model.flushed();
    crash_replay_compare(dev, pool, 31, &model.current);
}

#[test]
fn large_writes_over_shared_leaves_copy_them_and_replay_to_the_same_state() {
    let (dev, pool) = pool(64 << 20, 32);
    let mut model = Model::default();
    pool.create_volume("v", 8 << 20).unwrap();
    model.create("v", 8 << 20);
    write(&mut model, &pool, "v", 0, &pattern(10, 8 << 20));
    pool.checkpoint().unwrap();
    // each write below meets leaves the snapshot before it shares: their first block copies the path, the rest of
    // the leaf goes straight into the copy, and the snapshot keeps its bytes
    for (round, at_blocks) in [(0u64, 100u64), (1, 300), (2, 5)] {
        let snap = format!("s{round}");
        pool.snapshot(&[("v", snap.as_str())]).unwrap();
        model.snapshot(&[("v", snap.as_str())]);
        let len = (LEAF_BLOCKS * 3 + 17) * BS;
        write(&mut model, &pool, "v", at_blocks * BS, &with_zero_blocks(20 + round, len as usize, &[1, 256]));
    }
    // a clone of a snapshot written across its shared leaves too
    pool.clone_snapshot("s1", "c").unwrap();
    model.clone_snapshot("s1", "c");
    write(&mut model, &pool, "c", 3 * BS, &pattern(30, (1 << 20) + 3 * BS as usize));
    pool.volume("v").unwrap().flush().unwrap();
    model.flushed();
    crash_replay_compare(dev, pool, 32, &model.current);
}

#[test]
fn a_run_that_outlasts_segments_and_batches_replays_to_the_same_state() {
    // 128 KiB segments and 512 KiB checkpoint intervals (small_opts): a 6 MiB write switches segments dozens of
    // times and seals a batch every 128 blocks, between blocks of one leaf
    let (dev, pool) = pool(64 << 20, 33);
    let mut model = Model::default();
    pool.create_volume("v", 8 << 20).unwrap();
    model.create("v", 8 << 20);
    write(&mut model, &pool, "v", BS, &pattern(40, 6 << 20));
    write(&mut model, &pool, "v", 77 * BS, &pattern(41, 6 << 20));
    pool.volume("v").unwrap().flush().unwrap();
    model.flushed();
    crash_replay_compare(dev, pool, 33, &model.current);
}
