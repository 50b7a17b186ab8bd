//! vbns freed before a checkpoint are handed out again after it [I9]: the block table's memory follows the blocks in
//! use, not every block ever written; replay after a crash hands out the same reused vbns as the run it repeats; and
//! a pool keeps its contents through reopen and crashes while vbns are reused. Every test ends with reopen + check.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::Pool;
use common::{pattern, reopen_checked, sim_pool, small_opts};

const BS: usize = 4096;

#[test]
fn the_block_table_follows_the_blocks_in_use_not_the_blocks_ever_written() {
    // a 2 MiB volume (512 blocks) rewritten whole 200 times: 102,400 blocks named over time
    let (dev, pool) = sim_pool(32 << 20, 1);
    let v = pool.create_volume("v", 2 << 20).unwrap();
    v.write(0, &pattern(0, 2 << 20)).unwrap();
    pool.checkpoint().unwrap();
    let after_first = pool.stats().index_memory_bytes;
    let mut last = Vec::new();
    for round in 1..=200u64 {
        last = pattern(round, 2 << 20);
        for b in 0..512 {
            v.write((b * BS) as u64, &last[b * BS..(b + 1) * BS]).unwrap();
        }
    }
    let s = pool.stats();
    // without reuse the table names 102,400 vbns: its emptied pages are dropped, but their slots and locations stay
    // (24,720 -> 43,392 bytes here); with it, the same vbns serve every round (no growth measured)
    assert!(
        s.index_memory_bytes <= after_first + 4096,
        "index memory {} after 200 rewrites, {after_first} after the first",
        s.index_memory_bytes
    );
    let pool = reopen_checked(dev, pool, 1);
    let mut back = vec![0u8; 2 << 20];
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == last, "contents after reopen");
}

#[test]
fn replay_hands_out_the_same_reused_vbns() {
    // free vbns exist after a checkpoint; the writes after it reuse them; a crash leaves them to replay, which
    // checks every logged vbn against the one it hands out (a mismatch is a corruption error)
    let (dev, pool) = sim_pool(32 << 20, 2);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    v.write(0, &pattern(1, 1 << 20)).unwrap();
    v.write(0, &pattern(2, 512 << 10)).unwrap(); // frees the first half's vbns
    pool.checkpoint().unwrap();
    let mut model = pattern(2, 512 << 10);
    model.extend_from_slice(&pattern(1, 1 << 20)[512 << 10..]);
    // scattered rewrites and a snapshot between them: node copies and data blocks both take reused vbns
    for i in 0..64u64 {
        let b = (i * 37 % 256) as usize;
        let d = pattern(100 + i, BS);
        v.write((b * BS) as u64, &d).unwrap();
        model[b * BS..(b + 1) * BS].copy_from_slice(&d);
        if i == 20 {
            pool.snapshot(&[("v", "s")]).unwrap();
        }
    }
    v.flush().unwrap();
    let image = dev.crash_losing_all_unsynced();
    drop(pool);
    let pool = Pool::open(image.clone(), small_opts(2)).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    let mut back = vec![0u8; 1 << 20];
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == model, "contents after replay");
    let pool = reopen_checked(image, pool, 2);
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == model, "contents after replay and a clean reopen");
}

#[test]
fn deleting_a_snapshot_gives_its_vbns_to_later_writes() {
    let (dev, pool) = sim_pool(32 << 20, 3);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    v.write(0, &pattern(1, 1 << 20)).unwrap();
    pool.snapshot(&[("v", "old")]).unwrap();
    v.write(0, &pattern(2, 1 << 20)).unwrap();
    pool.checkpoint().unwrap();
    let before = pool.stats().index_memory_bytes;
    pool.delete_snapshot("old").unwrap();
    pool.checkpoint().unwrap();
    // the snapshot's 256 blocks are free: rewriting the volume twice more takes them, not new table space
    for round in 3..5 {
        v.write(0, &pattern(round, 1 << 20)).unwrap();
        pool.checkpoint().unwrap();
    }
    assert!(pool.stats().index_memory_bytes <= before, "the table grew: {:?}", pool.stats());
    let pool = reopen_checked(dev, pool, 3);
    let mut back = vec![0u8; 1 << 20];
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == pattern(4, 1 << 20));
}
