//! The segment cleaner: random overwrites run on forever in a small pool, with and without commits held; deleting a
//! commit and cleaning gives its space back; `Pool::clean` frees what overwrites left dead; a power cut at any I/O of
//! a cleaning pass loses nothing. Every test ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use blockmesh_engine::io::{SimDevice, SimFault};
use blockmesh_engine::{Pool, Volume};
use common::{pattern, reopen_checked, sim_pool, small_opts};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;

/// Random 4 KiB overwrites of a volume of `blocks` blocks, mirrored in `model`.
fn overwrite(v: &Volume, model: &mut [u8], rng: &mut SmallRng, writes: usize, seed: u64) {
    let blocks = model.len() / BS;
    for i in 0..writes {
        let b = rng.random_range(0..blocks);
        let data = pattern(seed * 1_000_003 + i as u64, BS);
        v.write((b * BS) as u64, &data).unwrap_or_else(|e| panic!("write {i} of {writes}: {e}"));
        model[b * BS..(b + 1) * BS].copy_from_slice(&data);
        if i % 512 == 511 {
            v.flush().unwrap();
        }
    }
}

fn same(v: &Volume, model: &[u8], what: &str) {
    let mut back = vec![0u8; model.len()];
    v.read(0, &mut back).unwrap();
    assert!(back == model, "{what}: contents differ from the model");
}

#[test]
fn random_overwrites_at_high_utilization_run_on_forever() {
    // a 16 MiB pool with a 9 MiB volume written whole, then 10 pool-sizes of random 4 KiB overwrites
    let (dev, pool) = sim_pool(16 << 20, 1);
    let v = pool.create_volume("v", 9 << 20).unwrap();
    let mut model = pattern(1, 9 << 20);
    v.write(0, &model).unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    overwrite(&v, &mut model, &mut rng, 40_000, 1);
    same(&v, &model, "after overwrites");
    let s = pool.stats();
    assert!(s.blocks_written > 40_000, "{s:?}");
    let pool = reopen_checked(dev, pool, 1);
    same(&pool.volume("v").unwrap(), &model, "after reopen");
}

#[test]
fn commits_hold_their_blocks_and_give_them_back_when_deleted() {
    let (dev, pool) = sim_pool(24 << 20, 2);
    let v = pool.create_volume("v", 6 << 20).unwrap();
    let mut model = pattern(2, 6 << 20);
    v.write(0, &model).unwrap();
    pool.snapshot(&[("v", "v@1")]).unwrap();
    let at_snapshot = model.clone();
    let mut rng = SmallRng::seed_from_u64(2);
    // overwrites beside a snapshot: its blocks stay live, the cleaner moves them and leaves them intact
    overwrite(&v, &mut model, &mut rng, 20_000, 2);
    same(&pool.snapshot_volume("v@1").unwrap(), &at_snapshot, "the snapshot");
    same(&v, &model, "the head");
    pool.clean().unwrap();
    let held = pool.stats().live_blocks;
    pool.delete_snapshot("v@1").unwrap();
    let c = pool.clean().unwrap();
    let s = pool.stats();
    assert!(c.segments_freed > 0, "{c:?}");
    assert!(s.live_blocks + 1000 < held, "the snapshot's blocks came back: {} -> {}", held, s.live_blocks);
    assert!(s.live_blocks < (6 << 20) / BS as u64 + 400, "about one copy of the volume is live: {s:?}");
    let pool = reopen_checked(dev, pool, 2);
    same(&pool.volume("v").unwrap(), &model, "after reopen");
}

#[test]
fn clean_gives_back_what_overwrites_left_dead() {
    let (dev, pool) = sim_pool(32 << 20, 3);
    let v = pool.create_volume("v", 8 << 20).unwrap();
    let mut model = pattern(3, 8 << 20);
    v.write(0, &model).unwrap();
    let mut rng = SmallRng::seed_from_u64(3);
    overwrite(&v, &mut model, &mut rng, 3000, 3);
    pool.checkpoint().unwrap();
    let before = pool.stats();
    assert!(before.reclaimable_bytes > 4 << 20, "overwrites left dead blocks in used segments: {before:?}");
    let c = pool.clean().unwrap();
    let after = pool.stats();
    assert!(c.segments_freed > 0 && c.blocks_moved > 0, "{c:?}");
    assert!(after.free_segments > before.free_segments, "{before:?} -> {after:?}");
    assert!(after.reclaimable_bytes < before.reclaimable_bytes / 2, "{before:?} -> {after:?}");
    assert_eq!(after.live_blocks, before.live_blocks, "cleaning moves blocks, it does not add or drop any");
    same(&v, &model, "after cleaning");
    // nothing more worth cleaning: a second call does little
    let again = pool.clean().unwrap();
    assert!(again.blocks_moved <= c.blocks_moved / 4, "{again:?} after {c:?}");
    let pool = reopen_checked(dev, pool, 3);
    same(&pool.volume("v").unwrap(), &model, "after reopen");
}

/// A power cut at every I/O of a cleaning pass: the pool reopens whole, with every flushed write.
#[test]
fn a_power_cut_anywhere_in_a_cleaning_pass_loses_nothing() {
    let setup = |cut: Option<u64>| -> (Arc<SimDevice>, Vec<u8>, u64, Option<Pool>) {
        let (dev, pool) = sim_pool(8 << 20, 4);
        let v = pool.create_volume("v", 2 << 20).unwrap();
        let mut model = pattern(4, 2 << 20);
        v.write(0, &model).unwrap();
        let mut rng = SmallRng::seed_from_u64(4);
        overwrite(&v, &mut model, &mut rng, 700, 4);
        pool.flush().unwrap();
        let start = dev.io_count();
        if let Some(k) = cut {
            dev.set_fault(SimFault::PowerCutAfter(k));
        }
        let r = pool.clean();
        let ios = dev.io_count() - start;
        match cut {
            None => {
                let c = r.unwrap();
                assert!(c.blocks_moved > 0, "the workload leaves something to clean: {c:?}");
                (dev, model, ios, Some(pool))
            }
            Some(k) => {
                assert!(r.is_err(), "a power cut at I/O {k} of the cleaning must reach the caller");
                let image = dev.crash(k);
                drop(pool);
                (image, model, ios, None)
            }
        }
    };
    let (_, _, ios, _) = setup(None);
    assert!(ios > 10, "a cleaning pass does I/O: {ios}");
    for k in 0..ios {
        let (image, model, _, _) = setup(Some(k));
        let pool = Pool::open(image, small_opts(4)).unwrap_or_else(|e| panic!("open after a cut at I/O {k}: {e}"));
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "cut at I/O {k}: {:?}", report.problems);
        same(&pool.volume("v").unwrap(), &model, &format!("cut at I/O {k}"));
        // and the pool goes on: cleaning after recovery works
        pool.clean().unwrap();
        same(&pool.volume("v").unwrap(), &model, &format!("cleaned after a cut at I/O {k}"));
    }
}

/// The workload of the moving-pass power-cut tests: a 4 MiB volume in an 8 MiB pool whose checkpoints are rare, so
/// space comes back by moving passes [I13], written whole and checkpointed, then `WRITES` random 4 KiB overwrites,
/// flushed every `flush_every` writes if given. With `cut`, the power fails at that I/O (counted from the start of
/// the overwrites) and the crashed image comes back; without, the pool is flushed, reopened and checked against the
/// model. Also returns the I/O window of the first write during which `event` (a count in the pool's stats) grew,
/// widened by `after` I/Os, and the stats at the end of the overwrites.
fn overwrites_in_a_rarely_checkpointed_pool(
    seed: u64,
    flush_every: Option<usize>,
    cut: Option<u64>,
    event: fn(&blockmesh_engine::PoolStats) -> u64,
    after: u64,
) -> (Arc<SimDevice>, common::Model, (u64, u64), blockmesh_engine::PoolStats) {
    use common::{Model, State};
    const WRITES: usize = 6000;
    let opts = rare_checkpoints(seed);
    let vol_bytes: u64 = 4 << 20;
    let dev = SimDevice::new(8 << 20);
    let pool = Pool::create(dev.clone(), opts.clone()).unwrap();
    let v = pool.create_volume("v", vol_bytes).unwrap();
    let mut model = Model::default();
    model.create("v", vol_bytes);
    let data = pattern(seed, vol_bytes as usize);
    v.write(0, &data).unwrap();
    model.write("v", 0, &data);
    pool.checkpoint().unwrap();
    model.flushed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let start = dev.io_count();
    if let Some(k) = cut {
        dev.set_fault(SimFault::PowerCutAfter(k));
    }
    let mut window = (0, 0);
    for i in 0..WRITES {
        let b = rng.random_range(0..vol_bytes / BS as u64);
        let d = pattern(seed * 1000 + i as u64, BS);
        let (io_before, events_before) = (dev.io_count(), event(&pool.stats()));
        if v.write(b * BS as u64, &d).is_err() {
            break;
        }
        model.write("v", b * BS as u64, &d);
        if window == (0, 0) && event(&pool.stats()) > events_before {
            window = (io_before - start, dev.io_count() - start + after);
        }
        if flush_every.is_some_and(|n| i % n == n - 1) {
            if v.flush().is_err() {
                break;
            }
            model.flushed();
        }
    }
    let stats = pool.stats();
    match cut {
        None => {
            let s = &stats;
            assert!(s.moving_passes > 0 && window.1 > window.0, "the workload runs moving passes: {s:?}");
            v.flush().unwrap();
            model.flushed();
            pool.close().unwrap();
            let pool = Pool::open(dev.clone(), opts).unwrap();
            let report = pool.check().unwrap();
            assert!(report.is_ok(), "{:?}", report.problems);
            assert_eq!(State::of_pool(&pool), model.current, "after reopen");
            (dev, model, window, stats)
        }
        Some(k) => {
            let image = dev.crash(k);
            drop(pool);
            (image, model, window, stats)
        }
    }
}

fn rare_checkpoints(seed: u64) -> blockmesh_engine::PoolOptions {
    blockmesh_engine::PoolOptions { checkpoint_interval_bytes: 1 << 30, ..small_opts(seed) }
}

/// Random overwrites in a pool whose checkpoints are rare, so space comes back by moving passes (blocks moved between
/// checkpoints, made durable by a later sync) [I13]; a power cut at every I/O around the first of them: the pool
/// reopens whole, holding every flushed write and a prefix of the later ones, and goes on.
#[test]
fn a_power_cut_anywhere_in_a_moving_pass_loses_nothing() {
    use common::State;
    let moving_passes = |s: &blockmesh_engine::PoolStats| s.moving_passes;
    let (_, _, (from, to), _) = overwrites_in_a_rarely_checkpointed_pool(5, Some(64), None, moving_passes, 0);
    eprintln!("moving pass window: I/O {from}..{to}");
    let opts = rare_checkpoints(5);
    let vol_bytes: u64 = 4 << 20;
    // the flush before the pass too, and a little after it
    for k in from.saturating_sub(4)..to + 4 {
        let (image, mut model, ..) = overwrites_in_a_rarely_checkpointed_pool(5, Some(64), Some(k), moving_passes, 0);
        let pool =
            Pool::open(image.clone(), opts.clone()).unwrap_or_else(|e| panic!("open after a cut at I/O {k}: {e}"));
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "cut at I/O {k}: {:?}", report.problems);
        model.recovered(&pool);
        // the pool goes on: more overwrites (more moving passes), a reopen, the same contents
        let v = pool.volume("v").unwrap();
        let mut rng = SmallRng::seed_from_u64(k);
        for i in 0..1500u64 {
            let b = rng.random_range(0..vol_bytes / BS as u64);
            let d = pattern(90_000 + i, BS);
            v.write(b * BS as u64, &d).unwrap();
            model.write("v", b * BS as u64, &d);
        }
        v.flush().unwrap();
        model.flushed();
        pool.close().unwrap();
        let pool = Pool::open(image, opts.clone()).unwrap();
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "cut at I/O {k}, then more writes: {:?}", report.problems);
        assert_eq!(State::of_pool(&pool), model.current, "cut at I/O {k}, then more writes, reopened");
    }
}

/// Segments that moving passes empty are written over only after a sync covers the copies [I13]; with no flush and
/// rare checkpoints, the log takes that sync itself when only emptied segments are left, one for several passes. A
/// power cut at every I/O around the first such sync and the writes into the segment after it: the pool reopens
/// whole, holding the data written before the overwrites (the moved blocks among it) and a prefix of the later
/// writes. (Without that sync, this test finds moved blocks lost.)
#[test]
fn emptied_segments_are_written_over_only_after_a_sync() {
    let log_syncs = |s: &blockmesh_engine::PoolStats| s.emptied_segment_syncs;
    let (_, _, (from, to), s) = overwrites_in_a_rarely_checkpointed_pool(6, None, None, log_syncs, 64);
    eprintln!("first sync for emptied segments: I/O {from}..{to}");
    assert!(s.emptied_segment_syncs > 0, "the log waited for emptied segments: {s:?}");
    assert!(s.emptied_segment_syncs * 4 <= s.moving_passes, "one sync serves several moving passes: {s:?}");
    let opts = rare_checkpoints(6);
    for k in from.saturating_sub(4)..to {
        let (image, mut model, ..) = overwrites_in_a_rarely_checkpointed_pool(6, None, Some(k), log_syncs, 64);
        let pool =
            Pool::open(image.clone(), opts.clone()).unwrap_or_else(|e| panic!("open after a cut at I/O {k}: {e}"));
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "cut at I/O {k}: {:?}", report.problems);
        model.recovered(&pool);
        pool.close().unwrap();
        let pool = Pool::open(image, opts.clone()).unwrap();
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "cut at I/O {k}, reopened: {:?}", report.problems);
    }
}
