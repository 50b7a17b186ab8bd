//! The background thread syncs the log as it grows, outside the pool lock: once `BACKGROUND_SYNC_LOG_BYTES` were
//! written since the last sync, what was written before that sync began survives a power cut that loses every
//! unsynced write, with no client flush and no checkpoint. A pool opened without the background thread never syncs
//! on its own. Every test ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Pool, PoolOptions, BACKGROUND_SYNC_LOG_BYTES};
use common::pattern;

const MIB: usize = 1 << 20;
/// How long the test waits for the background thread (it looks every 100 ms).
const DEADLINE: Duration = Duration::from_secs(30);
/// Written in 1 MiB writes: a little more than the background thread waits for.
const WRITTEN_MIB: usize = (BACKGROUND_SYNC_LOG_BYTES as usize / MIB) + 8;

/// Default segments and checkpoint interval (no checkpoint comes within `WRITTEN_MIB`), background thread on or off.
fn opts(background: bool) -> PoolOptions {
    PoolOptions { pool_id: Some(71), log_writer_threads: 2, background_cleaning: background, ..PoolOptions::default() }
}

/// Creates volume `v` and writes `WRITTEN_MIB` 1 MiB writes, each its own pattern, in order from offset 0, without a
/// flush; returns them and the pool's checkpoint count before them.
fn write_all(pool: &Pool) -> (Vec<Vec<u8>>, u64) {
    let v = pool.create_volume("v", (WRITTEN_MIB * MIB) as u64).unwrap();
    let checkpoints = pool.stats().checkpoints;
    let writes: Vec<Vec<u8>> = (0..WRITTEN_MIB).map(|i| pattern(1000 + i as u64, MIB)).collect();
    for (i, w) in writes.iter().enumerate() {
        v.write((i * MIB) as u64, w).unwrap();
    }
    (writes, checkpoints)
}

/// Opens the device, checks it, and returns how many of the writes, in order, it holds: a prefix of them, then
/// nothing (the log replays a prefix of itself).
fn surviving_writes(dev: std::sync::Arc<SimDevice>, writes: &[Vec<u8>]) -> usize {
    let pool = Pool::open(dev, opts(false)).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    let Ok(v) = pool.volume("v") else {
        pool.close().unwrap();
        return 0; // the volume's creation was lost too
    };
    let mut back = vec![0u8; MIB];
    let mut kept = 0;
    for (i, w) in writes.iter().enumerate() {
        v.read((i * MIB) as u64, &mut back).unwrap();
        if back == *w {
            assert_eq!(kept, i, "write {i} survived after a lost one: not a prefix of the log");
            kept += 1;
        } else {
            assert!(back.iter().all(|&b| b == 0), "write {i} neither survived nor left zeros");
        }
    }
    drop(v);
    pool.close().unwrap();
    kept
}

#[test]
fn the_background_thread_syncs_the_log_as_it_grows() {
    let dev = SimDevice::new((WRITTEN_MIB as u64 + 256) << 20);
    let pool = Pool::create(dev.clone(), opts(true)).unwrap();
    let (writes, checkpoints) = write_all(&pool);
    let started = Instant::now();
    while pool.stats().background_log_syncs == 0 {
        assert!(started.elapsed() < DEADLINE, "no background sync: {:?}", pool.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = pool.stats();
    assert_eq!(stats.checkpoints, checkpoints, "a checkpoint would sync too: {stats:?}");
    // a power cut now loses every write no sync covered
    let image = dev.crash_losing_all_unsynced();
    let kept = surviving_writes(image, &writes);
    assert!(
        kept * MIB >= BACKGROUND_SYNC_LOG_BYTES as usize - MIB,
        "{kept} MiB survived; the sync came once {} MiB were written",
        BACKGROUND_SYNC_LOG_BYTES >> 20
    );
    pool.close().unwrap();
    assert_eq!(surviving_writes(dev, &writes), WRITTEN_MIB, "a clean close keeps everything");
}

#[test]
fn without_the_background_thread_only_flushes_and_checkpoints_sync() {
    let dev = SimDevice::new((WRITTEN_MIB as u64 + 256) << 20);
    let pool = Pool::create(dev.clone(), opts(false)).unwrap();
    let (writes, _) = write_all(&pool);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pool.stats().background_log_syncs, 0);
    assert_eq!(surviving_writes(dev.crash_losing_all_unsynced(), &writes), 0, "nothing synced the writes");
    pool.close().unwrap();
    assert_eq!(surviving_writes(dev, &writes), WRITTEN_MIB);
}
