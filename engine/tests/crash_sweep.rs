//! Crash sweep: a seeded workload is cut by a power failure at every I/O index in turn; each time the device keeps a
//! random subset of its unsynced writes (some torn), the pool must open, pass the integrity check, hold every write
//! acknowledged before the last completed flush and a prefix of the rest. The recovered pool then takes more writes
//! and crashes again, so records of a lost tail can never come back [I3]. Snapshots of both volumes are atomic: after
//! a crash both exist or neither (the model only allows prefixes of whole steps).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use blockmesh_engine::io::{SimDevice, SimFault};
use blockmesh_engine::{Pool, Result};
use common::{pattern, small_opts, Model};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const POOL_BYTES: u64 = 16 << 20;
const SECTOR: u64 = 512;

/// Run the seeded workload until it ends or an operation fails; the model follows every operation attempted.
fn workload(pool: &Pool, model: &mut Model, seed: u64, ops: usize) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let vols = [("a", 256u64 << 10), ("b", (192 << 10) + 1536)];
    for (name, size) in vols {
        model.create(name, size);
        pool.create_volume(name, size)?;
    }
    for i in 0..ops {
        let (name, _) = vols[rng.random_range(0..vols.len())];
        let size = model.current.vols[name].len() as u64;
        let len = rng.random_range(1..=48u64) * SECTOR;
        let off = rng.random_range(0..=(size - len) / SECTOR) * SECTOR;
        let vol = pool.volume(name)?;
        match rng.random_range(0..22) {
            0..=11 => {
                let data = pattern(seed ^ i as u64, len as usize);
                model.write(name, off, &data);
                vol.write(off, &data)?;
            }
            12 => {
                model.write_zeroes(name, off, len);
                vol.write_zeroes(off, len)?;
            }
            13 => {
                model.trim(name, off, len);
                vol.trim(off, len)?;
            }
            14..=16 => {
                pool.flush()?;
                model.flushed();
            }
            17 => {
                // a checkpoint, or a cleaning (a checkpoint, then moving passes that copy live blocks out of
                // partly dead segments [I13])
                if rng.random_bool(0.5) {
                    pool.checkpoint()?;
                } else {
                    pool.clean()?;
                }
                model.flushed();
            }
            18 => {
                // grow or shrink by a few sectors (shrinking with force)
                let new = (size as i64 + rng.random_range(-16i64..=16) * SECTOR as i64).max(64 * SECTOR as i64) as u64;
                model.resize(name, new);
                pool.resize_volume(name, new, true)?;
            }
            19 => {
                // an atomic snapshot of both volumes
                let (sa, sb) = (format!("a@{i}"), format!("b@{i}"));
                model.snapshot(&[("a", &sa), ("b", &sb)]);
                pool.snapshot(&[("a", &sa), ("b", &sb)])?;
            }
            20 => {
                if let Some(oldest) = model.current.snaps.keys().next().cloned() {
                    model.delete_snapshot(&oldest);
                    pool.delete_snapshot(&oldest)?;
                }
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                vol.read(off, &mut buf)?;
                assert_eq!(buf, model.current.vols[name][off as usize..(off + len) as usize], "read back");
            }
        }
    }
    pool.flush()?;
    model.flushed();
    Ok(())
}

fn open_checked(dev: Arc<SimDevice>, pool_id: u64) -> Pool {
    let pool = Pool::open(dev, small_opts(pool_id)).unwrap_or_else(|e| panic!("open after crash: {e}"));
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "integrity after crash: {:?}", report.problems);
    pool
}

/// One crash point; when `cut` is `None`, the uncut workload: returns its I/O count and the moving passes it ran.
fn crash_at(seed: u64, ops: usize, cut: Option<u64>) -> (u64, u64) {
    let dev = SimDevice::new(POOL_BYTES);
    let pool = Pool::create(dev.clone(), small_opts(seed)).unwrap();
    let start = dev.io_count();
    if let Some(k) = cut {
        dev.set_fault(SimFault::PowerCutAfter(k));
    }
    let mut model = Model::default();
    let r = workload(&pool, &mut model, seed, ops);
    let ios = dev.io_count() - start;
    if cut.is_none() {
        r.unwrap();
    }
    let moving = pool.stats().moving_passes;
    let image = dev.crash(seed.wrapping_add(cut.unwrap_or(0)));
    drop(pool); // dropping flushes nothing
    let pool = open_checked(image.clone(), seed);
    model.recovered(&pool);

    // Life goes on after recovery: more writes, some flushed, then another crash.
    if !model.current.vols.contains_key("a") {
        pool.create_volume("a", 64 << 10).unwrap();
        model.create("a", 64 << 10);
    }
    let vol = pool.volume("a").unwrap();
    let data = pattern(seed ^ 0xabc, 8192);
    vol.write(0, &data).unwrap();
    model.write("a", 0, &data);
    pool.flush().unwrap();
    model.flushed();
    let more = pattern(seed ^ 0xdef, 4096);
    vol.write(16384, &more).unwrap();
    model.write("a", 16384, &more);
    let image2 = image.crash(seed ^ 0x55);
    drop(pool);
    let pool = open_checked(image2, seed);
    model.recovered(&pool);
    pool.close().unwrap();
    (ios, moving)
}

/// Crash points cut, and the moving passes of the uncut workloads (whose I/Os are among those cut).
fn sweep(seeds: std::ops::Range<u64>, ops: usize) -> (u64, u64) {
    let (mut points, mut moving) = (0, 0);
    for seed in seeds {
        let (ios, passes) = crash_at(seed, ops, None);
        moving += passes;
        for k in 0..ios {
            crash_at(seed, ops, Some(k));
            points += 1;
        }
    }
    (points, moving)
}

#[test]
fn crash_at_every_io_of_seeded_workloads() {
    let seeds: u64 = std::env::var("CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    let (points, moving) = sweep(0..seeds, 120);
    eprintln!("crash sweep: {seeds} seeds, {points} crash points ({moving} moving passes), 0 flushed writes lost");
    assert!(points > seeds * 20, "the sweep must cover many crash points, got {points}");
    assert!(moving > 0, "the workloads must reach moving passes");
}

/// A crash while the pool is being opened (replay and its checkpoint) must leave it openable, losing nothing flushed.
#[test]
fn crash_during_recovery() {
    for seed in 100..104u64 {
        let dev = SimDevice::new(POOL_BYTES);
        let pool = Pool::create(dev.clone(), small_opts(seed)).unwrap();
        let mut model = Model::default();
        workload(&pool, &mut model, seed, 40).unwrap();
        // unflushed tail
        let tail = pattern(seed, 65536);
        pool.volume("a").unwrap().write(4096, &tail).unwrap();
        model.write("a", 4096, &tail);
        let image = dev.crash(seed);
        drop(pool);
        // measure how many I/Os an open takes, then cut each of them
        let probe = image.crash_losing_all_unsynced();
        let before = probe.io_count();
        let opened = Pool::open(probe.clone(), small_opts(seed)).unwrap();
        let open_ios = probe.io_count() - before;
        drop(opened);
        let mut accepted = None;
        for k in 0..open_ios {
            let attempt = image.crash_losing_all_unsynced();
            attempt.set_fault(SimFault::PowerCutAfter(k));
            assert!(Pool::open(attempt.clone(), small_opts(seed)).is_err(), "open cut at I/O {k} must fail");
            let after = attempt.crash(seed ^ k);
            let pool = open_checked(after, seed);
            let mut m =
                Model { durable: model.durable.clone(), steps: model.steps.clone(), current: model.current.clone() };
            let kept = m.recovered(&pool);
            // every recovery attempt must agree with the one before: replay is deterministic
            if let Some(prev) = accepted {
                assert_eq!(prev, kept, "recovery cut at I/O {k} recovered a different prefix");
            }
            accepted = Some(kept);
        }
    }
}

/// I/O-error countdown (SQLite style): the Nth I/O of a seeded workload fails, for every N, once as a single failure
/// and once with every later I/O failing too. The error reaches the caller (nothing panics, nothing is swallowed: a
/// write whose I/O failed is never counted as flushed), and after a restart the pool opens, passes the integrity
/// check and holds every write flushed before the failure.
#[test]
fn an_io_error_at_every_io_reaches_the_caller_and_the_pool_reopens_whole() {
    let mut points = 0u64;
    for seed in 200..204u64 {
        let (ios, _) = crash_at(seed, 60, None);
        for n in 0..ios {
            for fail_from in [false, true] {
                let dev = SimDevice::new(POOL_BYTES);
                let pool = Pool::create(dev.clone(), small_opts(seed)).unwrap();
                dev.set_fault(if fail_from { SimFault::FailFrom(n) } else { SimFault::FailOnce(n) });
                let mut model = Model::default();
                let r = workload(&pool, &mut model, seed, 60);
                assert!(r.is_err(), "seed {seed}: the failed I/O {n} ({fail_from}) must reach the caller");
                // after the error the pool answers with errors or works on; it never panics
                let _ = pool.flush();
                let image = dev.crash(seed ^ n);
                drop(pool);
                let pool = open_checked(image, seed);
                model.recovered(&pool);
                points += 1;
            }
        }
    }
    eprintln!("I/O-error countdown: {points} failures injected, 0 flushed writes lost");
    assert!(points > 200, "{points}");
}
