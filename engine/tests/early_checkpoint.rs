//! A checkpoint comes early when the segments emptied since the last one hold a quarter of the checkpoint interval
//! (`EARLY_CHECKPOINT_SHARE`), so a volume overwritten again and again keeps the log within about its own size plus
//! that quarter, instead of its size plus a whole interval: the log writes over pages still in the page cache.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Pool, PoolOptions, EARLY_CHECKPOINT_SHARE};
use common::{reopen_checked, small_opts, BS};

const POOL_BYTES: u64 = 64 << 20;
const VOLUME_BYTES: u64 = 4 << 20;
const INTERVAL_BYTES: u64 = 8 << 20;
const PASSES: u64 = 12;

/// The most bytes of segments in use (not free) after each of `PASSES` whole overwrites of one volume.
fn footprint_bytes(interval_bytes: u64) -> (u64, u64) {
    let dev = SimDevice::new(POOL_BYTES);
    let opts = PoolOptions { checkpoint_interval_bytes: interval_bytes, ..small_opts(7) };
    let pool = Pool::create(dev.clone(), opts).unwrap();
    let vol = pool.create_volume("v", VOLUME_BYTES).unwrap();
    let stats = pool.stats();
    let seg = stats.segment_size_bytes;
    let mut most = 0;
    let chunk = 64 * BS;
    for pass in 0..PASSES {
        let data = vec![pass as u8 + 1; chunk as usize];
        for at in (0..VOLUME_BYTES).step_by(chunk as usize) {
            vol.write(at, &data).unwrap();
            let s = pool.stats();
            most = most.max((s.segments - s.free_segments) * seg);
        }
    }
    let checkpoints = pool.stats().checkpoints;
    let mut buf = vec![0u8; VOLUME_BYTES as usize];
    vol.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == PASSES as u8), "the last pass reads back");
    drop(vol);
    let pool = reopen_checked(dev, pool, 7);
    let vol = pool.volume("v").unwrap();
    vol.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == PASSES as u8), "the last pass reads back after a reopen");
    (most, checkpoints)
}

#[test]
fn overwrites_reuse_the_space_they_free_within_a_quarter_interval() {
    let (most, checkpoints) = footprint_bytes(INTERVAL_BYTES);
    let early = INTERVAL_BYTES / EARLY_CHECKPOINT_SHARE;
    // the volume, what the log wrote since the last checkpoint (up to a quarter interval and the segment
    // it was filling), what the checkpoint reserve and open segments take: a few segments
    let bound = VOLUME_BYTES + early + early / 2 + (2 << 20);
    assert!(most <= bound, "segments in use peaked at {most} bytes, over {bound}");
    // every whole pass empties the volume's worth of segments: more checkpoints than the interval alone gives
    let written = PASSES * VOLUME_BYTES;
    assert!(checkpoints > written / INTERVAL_BYTES + 1, "{checkpoints} checkpoints for {written} bytes");
    // without the early trigger (a quarter interval larger than the volume's footprint), space in use grows to
    // about the volume plus the whole interval
    let (most_late, _) = footprint_bytes(16 * INTERVAL_BYTES);
    assert!(most_late > bound, "a long interval keeps more in use ({most_late} bytes)");
}
