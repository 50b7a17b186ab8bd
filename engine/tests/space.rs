//! Space: overwrites and deletions give segments back (at checkpoints), a full pool refuses writes with an
//! out-of-space error without harming anything, and recovers when space is freed; failed device writes put the pool
//! in a failed state that a reopen clears.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::io::SimFault;
use blockmesh_engine::{Error, Pool};
use common::{pattern, sim_pool, small_opts};

#[test]
fn overwrites_do_not_fill_the_pool() {
    let (dev, pool) = sim_pool(8 << 20, 1);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    // 64 MiB of writes over the same 1 MiB in an 8 MiB pool
    for round in 0..64u64 {
        v.write(0, &pattern(round, 1 << 20)).unwrap();
    }
    let mut back = vec![0u8; 1 << 20];
    v.read(0, &mut back).unwrap();
    assert!(back == pattern(63, 1 << 20));
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(1)).unwrap();
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn deleting_a_volume_gives_its_segments_back() {
    let (dev, pool) = sim_pool(16 << 20, 2);
    let free_empty = pool.stats().free_segments;
    let v = pool.create_volume("v", 8 << 20).unwrap();
    v.write(0, &pattern(1, 6 << 20)).unwrap();
    pool.checkpoint().unwrap();
    assert!(pool.stats().free_segments < free_empty - 40);
    pool.delete_volume("v").unwrap();
    pool.checkpoint().unwrap();
    let s = pool.stats();
    assert!(s.free_segments >= free_empty - 2, "free {} of {} after delete", s.free_segments, free_empty);
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(2)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    assert_eq!(pool.stats().live_blocks, 0, "nothing referenced once the only volume is gone");
}

#[test]
fn a_full_pool_refuses_writes_keeps_data_and_recovers_after_a_delete() {
    let (dev, pool) = sim_pool(6 << 20, 3);
    let keep = pool.create_volume("keep", 1 << 20).unwrap();
    let keep_data = pattern(3, 1 << 20);
    keep.write(0, &keep_data).unwrap();
    let filler = pool.create_volume("filler", 64 << 20).unwrap();
    let mut written = 0u64;
    let err = loop {
        match filler.write(written, &pattern(written, 256 << 10)) {
            Ok(()) => written += 256 << 10,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "a 6 MiB pool cannot take 64 MiB");
    };
    assert!(matches!(err, Error::NoSpace(_)), "{err}");
    // reads and flush still work; what was written is intact
    let mut back = vec![0u8; 1 << 20];
    keep.read(0, &mut back).unwrap();
    assert!(back == keep_data);
    pool.flush().unwrap();
    let mut chunk = vec![0u8; 256 << 10];
    filler.read(0, &mut chunk).unwrap();
    assert!(chunk == pattern(0, 256 << 10));
    // a refused write changed nothing
    filler.read(written, &mut chunk).unwrap();
    assert!(chunk.iter().all(|&b| b == 0));
    // freeing space lets writes succeed again, without a restart
    pool.delete_volume("filler").unwrap();
    let again = pool.create_volume("again", 1 << 20).unwrap();
    again.write(0, &pattern(4, 1 << 20)).unwrap();
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(3)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    pool.volume("keep").unwrap().read(0, &mut back).unwrap();
    assert!(back == keep_data);
}

/// Regression (found by the model test): with a batch open, the room estimate ignored the batch's blocks, so a
/// write-zeroes could log its partial blocks and then fail for lack of space, half done.
#[test]
fn refused_zero_range_changes_nothing_with_a_batch_open() {
    for fill_kib in (256..1400).step_by(28) {
        let (_dev, pool) = sim_pool((64 << 10) + 12 * (128 << 10), 4);
        let v = pool.create_volume("v", 2 << 20).unwrap();
        let _ = v.write(0, &pattern(1, fill_kib << 10));
        let _ = v.write(4096 * 300, &pattern(2, 8192)); // leaves a batch open
        let mut before = vec![0u8; 2 << 20];
        v.read(0, &mut before).unwrap();
        if let Err(Error::NoSpace(_)) = v.write_zeroes(1024, (1 << 20) + 1024) {
            let mut after = vec![0u8; 2 << 20];
            v.read(0, &mut after).unwrap();
            assert!(before == after, "a refused write-zeroes changed the volume (fill {fill_kib} KiB)");
        }
    }
}

#[test]
fn a_failed_flush_fails_the_pool_until_reopened() {
    let (dev, pool) = sim_pool(8 << 20, 5);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    v.write(0, &pattern(1, 4096)).unwrap();
    pool.flush().unwrap();
    v.write(4096, &pattern(2, 4096)).unwrap();
    dev.set_fault(SimFault::FailOnce(1)); // the seal's write succeeds, the sync fails
    assert!(pool.health().is_ok());
    assert!(matches!(pool.flush(), Err(Error::Io { .. })));
    assert!(matches!(v.write(8192, &[1u8; 512]), Err(Error::Failed(_))), "no more changes after a failed flush");
    assert!(matches!(pool.health(), Err(Error::Failed(_))), "a health check sees the failure");
    let mut buf = vec![0u8; 4096];
    v.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 4096), "reads keep working");
    drop(pool);
    let pool = Pool::open(dev.crash_losing_all_unsynced(), small_opts(5)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    assert!(pool.health().is_ok(), "a reopen clears the failure");
    pool.volume("v").unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 4096), "flushed data survives");
}

/// A full pool on a device that is then enlarged takes the new space with `grow`, keeps everything, and a power cut
/// at any I/O of the grow leaves either the old or the grown pool, whole.
#[test]
fn a_grown_device_gives_a_full_pool_room() {
    let fill = |pool: &Pool| -> (blockmesh_engine::Volume, u64) {
        let v = pool.create_volume("v", 64 << 20).unwrap();
        let mut written = 0u64;
        while v.write(written, &pattern(written, 256 << 10)).is_ok() {
            written += 256 << 10;
        }
        pool.flush().unwrap();
        (v, written)
    };
    let (dev, pool) = sim_pool(6 << 20, 9);
    let (_, written) = fill(&pool);
    let segments = pool.stats().segments;
    pool.close().unwrap();
    // the same pool on a device twice the size
    let big = dev.grown(12 << 20);
    let pool = Pool::open(big.clone(), small_opts(9)).unwrap();
    let added = pool.grow().unwrap();
    assert_eq!(added, (6 << 20) / (128 << 10), "the new 6 MiB in 128 KiB segments");
    assert_eq!(pool.stats().segments, segments + added);
    assert_eq!(pool.grow().unwrap(), 0, "nothing more to take");
    let v = pool.volume("v").unwrap();
    v.write(written, &pattern(written, 1 << 20)).unwrap();
    let mut back = vec![0u8; 256 << 10];
    v.read(0, &mut back).unwrap();
    assert!(back == pattern(0, 256 << 10));
    pool.close().unwrap();
    let pool = Pool::open(big.clone(), small_opts(9)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    assert_eq!(pool.stats().segments, segments + added, "the grown size is durable");
    let mut tail = vec![0u8; 1 << 20];
    pool.volume("v").unwrap().read(written, &mut tail).unwrap();
    assert!(tail == pattern(written, 1 << 20));
    drop(pool);

    // a power cut at every I/O of a grow
    let ios = {
        let d = dev.grown(12 << 20);
        let p = Pool::open(d.clone(), small_opts(9)).unwrap();
        let start = d.io_count();
        p.grow().unwrap();
        d.io_count() - start
    };
    assert!(ios > 2, "a grow writes a checkpoint: {ios} I/Os");
    for k in 0..ios {
        let d = dev.grown(12 << 20);
        let p = Pool::open(d.clone(), small_opts(9)).unwrap();
        d.set_fault(SimFault::PowerCutAfter(k));
        assert!(p.grow().is_err(), "a power cut at I/O {k} of the grow must reach the caller");
        let image = d.crash(k);
        drop(p);
        let p = Pool::open(image, small_opts(9)).unwrap_or_else(|e| panic!("open after a cut at I/O {k}: {e}"));
        assert!(p.check().unwrap().is_ok(), "cut at I/O {k}");
        let n = p.stats().segments;
        assert!(n == segments || n == segments + added, "cut at I/O {k}: {n} segments");
        p.volume("v").unwrap().read(0, &mut back).unwrap();
        assert!(back == pattern(0, 256 << 10), "cut at I/O {k}");
        // and it grows afterwards
        p.grow().unwrap();
        assert_eq!(p.stats().segments, segments + added);
    }
}

/// Fill a tight pool (12 segments of 128 KiB) until writes are refused, overwriting as it goes so that dead blocks
/// are scattered over every segment; returns the pool and what the volume holds.
fn nearly_full_pool(pool_id: u64) -> (std::sync::Arc<blockmesh_engine::io::SimDevice>, Pool, Vec<u8>) {
    let (dev, pool) = sim_pool((64 << 10) + 12 * (128 << 10), pool_id);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    let mut model = vec![0u8; 1 << 20];
    for i in 0..4096u64 {
        let off = (i * 7919 % 250) * 4096;
        let data = pattern(i, 4096);
        match v.write(off, &data) {
            Ok(()) => model[off as usize..off as usize + 4096].copy_from_slice(&data),
            Err(Error::NoSpace(_)) => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    pool.flush().unwrap();
    (dev, pool, model)
}

fn assert_holds(pool: &Pool, model: &[u8]) {
    assert!(pool.check().unwrap().is_ok());
    let mut back = vec![0u8; model.len()];
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == model, "the volume changed");
}

/// Regression (found by the model test in CI): every open wrote a checkpoint, taking log space that nothing gave
/// back, so a nearly full pool reopened again and again (a daemon in a crash loop) ran out of segments and could no
/// longer be opened at all ("no free segment left for the log to continue").
#[test]
fn a_full_pool_reopens_after_any_number_of_crashes_and_restarts() {
    let (mut dev, pool, model) = nearly_full_pool(5);
    drop(pool);
    for round in 0..300u64 {
        let pool = Pool::open(dev.clone(), small_opts(5)).unwrap_or_else(|e| panic!("open {round}: {e}"));
        if round % 50 == 0 {
            assert_holds(&pool, &model);
        }
        if round % 2 == 0 {
            pool.close().unwrap();
        } else {
            drop(pool);
            dev = dev.crash(round);
        }
    }
    let pool = Pool::open(dev, small_opts(5)).unwrap();
    assert_holds(&pool, &model);
}

/// Regression (found by the model test in CI): checkpoints with no write between them each took a little of the
/// segments kept for checkpoints, and nothing gave it back until a write needed room, so explicit checkpoints (and
/// cleaning, which starts with one) failed for lack of a free segment and left the pool failed.
#[test]
fn checkpoints_in_a_full_pool_keep_the_reserve() {
    let (dev, pool, model) = nearly_full_pool(6);
    for i in 0..300 {
        pool.checkpoint().unwrap_or_else(|e| panic!("checkpoint {i}: {e}"));
        if i % 20 == 0 {
            pool.clean().unwrap_or_else(|e| panic!("clean {i}: {e}"));
        }
    }
    let v = pool.volume("v").unwrap();
    // a small write still goes in, or is refused cleanly
    match v.write(0, &pattern(99, 4096)) {
        Ok(()) | Err(Error::NoSpace(_)) => {}
        Err(e) => panic!("write: {e}"),
    }
    drop(pool);
    let image = dev.crash_losing_all_unsynced();
    let pool = Pool::open(image, small_opts(6)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    let mut back = vec![0u8; model.len()];
    pool.volume("v").unwrap().read(4096, &mut back[4096..]).unwrap();
    assert!(back[4096..] == model[4096..], "the volume changed");
}

/// A pool filled until writes are refused, then put through checkpoints, trims and crashes: whatever else is
/// refused, the ops that give space back (trim, delete) still go in, every checkpoint and reopen succeeds, and the
/// space they give back can be written again.
#[test]
fn a_pool_short_of_space_can_always_be_relieved() {
    let (dev, pool) = sim_pool((64 << 10) + 12 * (128 << 10), 7);
    let v = pool.create_volume("v", 4 << 20).unwrap();
    let mut blocks = 0u64;
    loop {
        match v.write(blocks * 4096, &pattern(blocks, 4096)) {
            Ok(()) => blocks += 1,
            Err(Error::NoSpace(_)) => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(blocks > 100, "only {blocks} blocks fit");
    for i in 0..100 {
        pool.checkpoint().unwrap_or_else(|e| panic!("checkpoint {i}: {e}"));
    }
    // trims and checkpoints, with writes that may be refused, then a crash
    for b in (0..blocks).step_by(3) {
        v.trim(b * 4096, 4096).unwrap_or_else(|e| panic!("trim {b}: {e}"));
        pool.checkpoint().unwrap_or_else(|e| panic!("checkpoint after trim {b}: {e}"));
        match v.write(b * 4096, &pattern(b + 1000, 4096)) {
            Ok(()) | Err(Error::NoSpace(_)) => {}
            Err(e) => panic!("write: {e}"),
        }
    }
    pool.flush().unwrap();
    drop(pool);
    let dev = dev.crash(7);
    let pool = Pool::open(dev.clone(), small_opts(7)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    // deleting gives everything back: a new volume takes most of what the old one held
    pool.delete_volume("v").unwrap();
    let w = pool.create_volume("w", 4 << 20).unwrap();
    for b in 0..blocks * 3 / 4 {
        w.write(b * 4096, &pattern(b, 4096)).unwrap_or_else(|e| panic!("write {b} after the delete: {e}"));
    }
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(7)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    let mut back = vec![0u8; 4096];
    pool.volume("w").unwrap().read(4096 * 5, &mut back).unwrap();
    assert!(back == pattern(5, 4096));
}
