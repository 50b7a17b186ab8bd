//! The background cleaner: after random overwrites stop, it gives the space they left dead back by itself, and the
//! data it moves stays intact, across a power cut at any moment of its work too; a pool opened without it never
//! cleans on its own. Every test ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Pool, PoolOptions, Volume};
use common::{pattern, small_opts};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
/// How long a test waits for the background cleaner before it fails (it looks every 100 ms and, with nobody
/// writing, may hold the pool half the time).
const DEADLINE: Duration = Duration::from_secs(30);

fn opts(id: u64, background: bool) -> PoolOptions {
    PoolOptions { background_cleaning: background, log_writer_threads: 2, ..small_opts(id) }
}

/// A 16 MiB pool, a 9 MiB volume written whole, then random 4 KiB overwrites: the segments fill with dead blocks and
/// the writes' own cleaning leaves just the room they need. Written without the background cleaner (so that it
/// cannot have cleaned yet), closed, and opened with it or not.
fn overwritten_pool(id: u64, background: bool) -> (Arc<SimDevice>, Pool, Vec<u8>) {
    let dev = SimDevice::new(16 << 20);
    let pool = Pool::create(dev.clone(), opts(id, false)).unwrap();
    let v = pool.create_volume("v", 9 << 20).unwrap();
    let mut model = pattern(id, 9 << 20);
    v.write(0, &model).unwrap();
    let mut rng = SmallRng::seed_from_u64(id);
    for i in 0..6000u64 {
        let b = rng.random_range(0..model.len() / BS);
        let data = pattern(id * 1_000_003 + i, BS);
        v.write((b * BS) as u64, &data).unwrap();
        model[b * BS..(b + 1) * BS].copy_from_slice(&data);
    }
    drop(v);
    pool.close().unwrap();
    let pool = Pool::open(dev.clone(), opts(id, background)).unwrap();
    (dev, pool, model)
}

fn same(v: &Volume, model: &[u8], what: &str) {
    let mut back = vec![0u8; model.len()];
    v.read(0, &mut back).unwrap();
    assert!(back == model, "{what}: contents differ from the model");
}

fn reopen_checked(dev: Arc<SimDevice>, id: u64, model: &[u8], what: &str) {
    let pool = Pool::open(dev, opts(id, false)).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{what}: {:?}", report.problems);
    same(&pool.volume("v").unwrap(), model, what);
    pool.close().unwrap();
}

#[test]
fn an_idle_pool_gets_its_free_segments_back_by_itself() {
    let (dev, pool, model) = overwritten_pool(1, true);
    let before = pool.stats();
    let target = before.clean_target_free_segments;
    assert!(before.free_segments < target, "the writes left fewer free segments than the pool keeps: {before:?}");
    let started = Instant::now();
    let mut images = Vec::new();
    let after = loop {
        let s = pool.stats();
        if s.free_segments >= target {
            break s;
        }
        assert!(started.elapsed() < DEADLINE, "no space came back: before {before:?}, now {s:?}");
        // a power cut now, in the middle of the cleaner's work, keeps every flushed write
        if images.len() < 16 {
            images.push(dev.crash(images.len() as u64));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(after.background_clean_steps > 0, "{after:?}");
    assert!(after.moving_passes > before.moving_passes || after.checkpoints > before.checkpoints, "{after:?}");
    assert!(after.reclaimable_bytes < before.reclaimable_bytes, "dead blocks went: {before:?} -> {after:?}");
    // at its level the cleaner rests: nothing more happens
    std::thread::sleep(Duration::from_millis(300));
    let rested = pool.stats();
    assert_eq!(rested.background_clean_steps, after.background_clean_steps, "it stops at the level");
    // and leaves no emptied segment waiting for a sync: a burst of writes after the quiet spell may use them all
    assert_eq!(rested.emptied_segments, 0, "emptied segments left waiting for a sync: {rested:?}");
    same(&pool.volume("v").unwrap(), &model, "after background cleaning");
    for (i, image) in images.into_iter().enumerate() {
        reopen_checked(image, 1, &model, &format!("power cut {i} during background cleaning"));
    }
    pool.close().unwrap();
    reopen_checked(dev, 1, &model, "after close");
}

/// Waits until the background cleaner rests: the free segments at their level and no step for 300 ms.
fn rest(pool: &Pool, what: &str) -> blockmesh_engine::PoolStats {
    let started = Instant::now();
    loop {
        let s = pool.stats();
        std::thread::sleep(Duration::from_millis(300));
        let t = pool.stats();
        if s.free_segments >= s.clean_target_free_segments && t.background_clean_steps == s.background_clean_steps {
            return t;
        }
        assert!(started.elapsed() < DEADLINE, "{what}: the cleaner did not rest: {t:?}");
    }
}

#[test]
fn a_small_deficit_after_a_quiet_spell_leaves_nothing_waiting_for_a_sync() {
    let (dev, pool, mut model) = overwritten_pool(4, true);
    rest(&pool, "after the overwrites");
    let v = pool.volume("v").unwrap();
    let mut rng = SmallRng::seed_from_u64(44);
    for round in 0..3u64 {
        // enough to take the free segments two below their level: the cleaner's moving passes then empty two or
        // so, fewer than it syncs for while writes go on (BACKGROUND_SYNC_MOVED_SEGMENTS)
        let before = pool.stats();
        let spare = before.free_segments - before.clean_target_free_segments;
        let blocks = (spare + 2) * before.segment_size_bytes / BS as u64;
        for i in 0..blocks {
            let b = rng.random_range(0..model.len() / BS);
            let data = pattern(round * 100_003 + i, BS);
            v.write((b * BS) as u64, &data).unwrap();
            model[b * BS..(b + 1) * BS].copy_from_slice(&data);
        }
        let after = rest(&pool, "after a small burst");
        assert!(after.moving_passes > before.moving_passes, "round {round}: the cleaner moved blocks: {after:?}");
        assert_eq!(after.emptied_segments, 0, "round {round}: emptied segments left waiting: {after:?}");
    }
    same(&v, &model, "after the bursts");
    drop(v);
    pool.close().unwrap();
    reopen_checked(dev, 4, &model, "after close");
}

#[test]
fn writes_go_on_while_the_background_cleaner_works() {
    let (dev, pool, mut model) = overwritten_pool(2, true);
    let v = pool.volume("v").unwrap();
    let mut rng = SmallRng::seed_from_u64(22);
    // bursts with pauses between them, in which the cleaner runs
    for burst in 0..6u64 {
        for i in 0..500u64 {
            let b = rng.random_range(0..model.len() / BS);
            let data = pattern(burst * 10_007 + i, BS);
            v.write((b * BS) as u64, &data).unwrap();
            model[b * BS..(b + 1) * BS].copy_from_slice(&data);
        }
        v.flush().unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    same(&v, &model, "after the bursts");
    drop(v);
    pool.close().unwrap();
    reopen_checked(dev, 2, &model, "after close");
}

#[test]
fn without_it_an_idle_pool_does_not_clean() {
    let (dev, pool, model) = overwritten_pool(3, false);
    let before = pool.stats();
    // several of the cleaner's looks would have passed
    std::thread::sleep(Duration::from_millis(400));
    let after = pool.stats();
    assert_eq!(after, before, "nothing ran on its own");
    assert_eq!(after.background_clean_steps, 0);
    pool.close().unwrap();
    reopen_checked(dev, 3, &model, "after close");
}
