//! Volume lifecycle: create, list, resize (grow, refused and forced shrink), delete; thousands per pool; handles of
//! deleted volumes and closed pools fail cleanly. Every test ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Error, Pool, PoolOptions, VolumeInfo};
use common::{pattern, sim_pool, small_opts};

fn reopen_checked(dev: std::sync::Arc<SimDevice>, pool: Pool, opts: PoolOptions) -> Pool {
    pool.close().unwrap();
    let pool = Pool::open(dev, opts).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    pool
}

#[test]
fn create_list_delete() {
    let (dev, pool) = sim_pool(16 << 20, 1);
    pool.create_volume("b", 8192).unwrap();
    pool.create_volume("a", 1 << 30).unwrap();
    assert_eq!(
        pool.volumes(),
        vec![VolumeInfo { name: "a".into(), size_bytes: 1 << 30 }, VolumeInfo { name: "b".into(), size_bytes: 8192 }]
    );
    let b = pool.volume("b").unwrap();
    b.write(0, &pattern(1, 8192)).unwrap();
    pool.delete_volume("b").unwrap();
    assert!(matches!(b.read(0, &mut [0u8; 512]), Err(Error::NoSuchVolume(_))), "handle of a deleted volume");
    // the name can be used again, and the new volume is empty
    let b2 = pool.create_volume("b", 8192).unwrap();
    let mut buf = vec![1u8; 8192];
    b2.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    let pool = reopen_checked(dev, pool, small_opts(1));
    assert_eq!(pool.volumes().len(), 2);
}

#[test]
fn grow_keeps_data_and_reads_zeroes_beyond() {
    let (dev, pool) = sim_pool(16 << 20, 2);
    let v = pool.create_volume("v", 6 * 512).unwrap();
    v.write(0, &pattern(5, 3072)).unwrap();
    // grow across tree heights: 3 KiB -> 2 MiB -> 4 GiB
    pool.resize_volume("v", 2 << 20, false).unwrap();
    pool.resize_volume("v", 4 << 30, false).unwrap();
    assert_eq!(v.size_bytes().unwrap(), 4 << 30);
    let mut buf = vec![0u8; 8192];
    v.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..3072], &pattern(5, 3072)[..]);
    assert!(buf[3072..].iter().all(|&b| b == 0));
    v.write((4 << 30) - 4096, &pattern(6, 4096)).unwrap();
    let pool = reopen_checked(dev, pool, small_opts(2));
    let v = pool.volume("v").unwrap();
    v.read((4 << 30) - 4096, &mut buf[..4096]).unwrap();
    assert_eq!(&buf[..4096], &pattern(6, 4096)[..]);
}

#[test]
fn shrink_that_drops_data_is_refused_unless_forced() {
    let (dev, pool) = sim_pool(16 << 20, 3);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    v.write(512 << 10, &pattern(7, 4096)).unwrap();
    match pool.resize_volume("v", 256 << 10, false) {
        Err(Error::ShrinkDropsData { first_written_bytes, .. }) => assert_eq!(first_written_bytes, 512 << 10),
        other => panic!("expected ShrinkDropsData, got {other:?}"),
    }
    assert_eq!(v.size_bytes().unwrap(), 1 << 20, "refused shrink changes nothing");
    // data inside the tail of the new last block counts too
    v.write(4096, &pattern(8, 512)).unwrap();
    assert!(matches!(pool.resize_volume("v", 4096 + 512 * 3, false), Err(Error::ShrinkDropsData { .. })));
    // a shrink over never-written space is fine
    let w = pool.create_volume("w", 1 << 20).unwrap();
    w.write(0, &pattern(9, 4096)).unwrap();
    pool.resize_volume("w", 8192, false).unwrap();
    // forced: the data is gone, and growing back shows zeroes, also in the partial last block
    pool.resize_volume("v", 4096 + 1024, true).unwrap();
    pool.resize_volume("v", 1 << 20, false).unwrap();
    let mut buf = vec![0u8; 4096];
    v.read(512 << 10, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    v.read(4096, &mut buf).unwrap();
    assert_eq!(&buf[..512], &pattern(8, 512)[..512]);
    assert!(buf[1024..].iter().all(|&b| b == 0), "bytes past a shrunk end read zero after growing back");
    reopen_checked(dev, pool, small_opts(3));
}

#[test]
fn ten_thousand_volumes() {
    let dev = SimDevice::new(512 << 20);
    let opts = PoolOptions { pool_id: Some(4), ..PoolOptions::default() };
    let pool = Pool::create(dev.clone(), opts.clone()).unwrap();
    for i in 0..10_000u32 {
        let v = pool.create_volume(&format!("ns/vol-{i:05}"), 1 << 30).unwrap();
        if i % 1000 == 0 {
            v.write(u64::from(i) * 4096, &pattern(u64::from(i), 4096)).unwrap();
        }
    }
    let pool = reopen_checked(dev, pool, opts);
    assert_eq!(pool.volumes().len(), 10_000);
    let mut buf = vec![0u8; 4096];
    pool.volume("ns/vol-03000").unwrap().read(3000 * 4096, &mut buf).unwrap();
    assert_eq!(buf, pattern(3000, 4096));
    for i in 0..5000u32 {
        pool.delete_volume(&format!("ns/vol-{i:05}")).unwrap();
    }
    assert_eq!(pool.volumes().len(), 5000);
}

#[test]
fn closed_pool_handles_fail_cleanly() {
    let (_dev, pool) = sim_pool(8 << 20, 5);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    pool.close().unwrap();
    assert!(matches!(v.write(0, &[1u8; 512]), Err(Error::Failed(_))));
    assert!(matches!(v.read(0, &mut [0u8; 512]), Err(Error::Failed(_))));
}

#[test]
fn a_file_pool_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let opts = PoolOptions { segment_size_bytes: 1 << 20, ..PoolOptions::default() };
    let pool = Pool::create_file(&path, 64 << 20, opts.clone()).unwrap();
    let v = pool.create_volume("v", 8 << 20).unwrap();
    let data = pattern(11, 3 << 20);
    v.write(512, &data).unwrap();
    v.flush().unwrap();
    drop(pool); // no close: the log is replayed on open
    let pool = Pool::open_file(&path, opts).unwrap();
    assert!(pool.stats().replayed_records > 0);
    let mut back = vec![0u8; data.len()];
    pool.volume("v").unwrap().read(512, &mut back).unwrap();
    assert!(back == data);
    assert!(pool.check().unwrap().is_ok());
}

/// Regression: growing a volume across a tree height right after a reopen read the root before loading it.
#[test]
fn grow_across_heights_after_reopen() {
    let (dev, pool) = sim_pool(16 << 20, 6);
    let v = pool.create_volume("v", 1 << 20).unwrap(); // height 1: the root is a leaf
    v.write(0, &pattern(1, 4096)).unwrap();
    pool.close().unwrap();
    let pool = Pool::open(dev.clone(), small_opts(6)).unwrap(); // no check: nothing loaded yet
    pool.resize_volume("v", 1 << 30, false).unwrap(); // height 3: the old root moves under a new one
    let mut buf = vec![0u8; 4096];
    pool.volume("v").unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 4096));
    reopen_checked(dev, pool, small_opts(6));
}

/// A pool on a real file writes its log through the io_uring writer (several writes in flight): random writes read
/// back at once (from in-flight buffers or the file) and after a reopen.
#[test]
fn file_pool_with_background_log_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let opts = PoolOptions { segment_size_bytes: 1 << 20, ..PoolOptions::default() };
    assert!(opts.log_writer_threads > 0);
    let pool = Pool::create_file(&path, 128 << 20, opts.clone()).unwrap();
    let v = pool.create_volume("v", 16 << 20).unwrap();
    let mut model = vec![0u8; 16 << 20];
    let mut x = 7u64;
    for i in 0..3000u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = ((x >> 33) % 64 + 1) * 512;
        let off = (x >> 13) % ((16 << 20) - len) / 512 * 512;
        let data = pattern(i, len as usize);
        v.write(off, &data).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        if i % 97 == 0 {
            let mut back = vec![0u8; len as usize];
            v.read(off, &mut back).unwrap();
            assert!(back == data, "read back at once, write {i}");
        }
    }
    let mut all = vec![0u8; 16 << 20];
    v.read(0, &mut all).unwrap();
    assert!(all == model);
    pool.close().unwrap();
    let pool = Pool::open_file(&path, opts).unwrap();
    pool.volume("v").unwrap().read(0, &mut all).unwrap();
    assert!(all == model, "after reopen");
    assert!(pool.check().unwrap().is_ok());
}

/// After a checkpoint, memory holds the heads' trees (and what changed since), not every node that reading a
/// snapshot loaded; an evicted snapshot reads back the same, its nodes loaded again.
#[test]
fn a_checkpoint_drops_snapshot_nodes_from_memory() {
    let (dev, pool) = sim_pool(96 << 20, 61);
    let v = pool.create_volume("v", 16 << 20).unwrap();
    let first = pattern(61, 16 << 20);
    v.write(0, &first).unwrap();
    pool.snapshot(&[("v", "v@1")]).unwrap();
    // every leaf copied under the snapshot
    let second = pattern(62, 16 << 20);
    v.write(0, &second).unwrap();
    pool.checkpoint().unwrap();
    let heads_only = pool.stats().index_memory_bytes;
    let mut back = vec![0u8; 16 << 20];
    pool.snapshot_volume("v@1").unwrap().read(0, &mut back).unwrap();
    assert!(back == first);
    let with_snapshot = pool.stats().index_memory_bytes;
    // 16 MiB = 16 leaves of 256 blocks, plus an inner node
    assert!(
        with_snapshot >= heads_only + 16 * 4096,
        "reading the snapshot loads its nodes: {heads_only} -> {with_snapshot}"
    );
    pool.checkpoint().unwrap();
    let after = pool.stats().index_memory_bytes;
    assert!(after + 16 * 4096 <= with_snapshot, "the checkpoint evicts them: {with_snapshot} -> {after}");
    pool.snapshot_volume("v@1").unwrap().read(0, &mut back).unwrap();
    assert!(back == first, "an evicted snapshot reads back the same");
    v.read(0, &mut back).unwrap();
    assert!(back == second);
    let pool = reopen_checked(dev, pool, small_opts(61));
    pool.snapshot_volume("v@1").unwrap().read(0, &mut back).unwrap();
    assert!(back == first);
}
