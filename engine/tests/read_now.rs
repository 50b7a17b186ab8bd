//! `Volume::try_read_now`: reads that need no waiting return the same bytes as `read`; reads that would wait for the
//! disk say so and change nothing. Ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsFd;

use blockmesh_engine::{Error, Pool, PoolOptions};
use common::{pattern, sim_pool, small_opts};

/// Times the test evicts the pool file's pages and tries a no-wait read of an evicted block.
const EVICT_TRIES: usize = 5;

/// Reads `[offset, offset + len)` both ways; returns whether the no-wait read completed (and then matched).
fn both_ways(vol: &blockmesh_engine::Volume, offset: u64, len: usize) -> bool {
    let mut slow = vec![0u8; len];
    vol.read(offset, &mut slow).unwrap();
    let mut fast = vec![0xEEu8; len];
    let done = vol.try_read_now(offset, &mut fast).unwrap();
    if done {
        assert_eq!(fast, slow, "no-wait read of {len} bytes at {offset} differs from read");
    }
    done
}

#[test]
fn cached_reads_complete_and_match() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.bm");
    let opts = PoolOptions { pool_id: Some(1), ..PoolOptions::default() };
    let pool = Pool::create_file(&path, 256 << 20, opts.clone()).unwrap();
    let vol = pool.create_volume("v", 64 << 20).unwrap();
    vol.write(0, &pattern(1, 4 << 20)).unwrap();
    vol.write(32 << 20, &pattern(2, 8192)).unwrap();
    vol.write_zeroes(40 << 20, 1 << 20).unwrap();
    pool.flush().unwrap();
    // Just written through the page cache: every read completes without waiting, aligned or not, data, zeroes and
    // holes alike.
    for (offset, len) in [(0, 4096), (512, 512), (4096 * 7 + 512, 3 * 4096), (0, 1 << 20), (32 << 20, 8192)] {
        assert!(both_ways(&vol, offset, len), "cached read at {offset}+{len}");
    }
    assert!(both_ways(&vol, 40 << 20, 64 << 10), "zeroed range");
    assert!(both_ways(&vol, 50 << 20, 64 << 10), "never-written range");

    // Out of the page cache (clean pages dropped): reads of data would wait; holes still need no disk.
    pool.close().unwrap();
    let file = std::fs::File::open(&path).unwrap();
    rustix::fs::fadvise(file.as_fd(), 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let pool = Pool::open_file(&path, opts.clone()).unwrap();
    let vol = pool.volume("v").unwrap();
    // Tree nodes are loaded by this first blocking read; the block itself is evicted again below.
    assert!(both_ways(&vol, 50 << 20, 4096), "hole after reopen");
    // The kernel keeps pages that readahead (of the reads above) still has in flight, so evict until it holds
    // (a few tries: it failed once in a loaded CI run with a single one).
    let mut buf = vec![0u8; 4096];
    let evicted = (0..EVICT_TRIES).any(|_| {
        rustix::fs::fadvise(file.as_fd(), 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let done = vol.try_read_now(2 << 20, &mut buf).unwrap();
        if done {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        !done
    });
    assert!(evicted, "evicted data block read without waiting, {EVICT_TRIES} times");
    // The blocking read brings it in; then it is served without waiting.
    assert!(both_ways(&vol, 2 << 20, 4096));
    assert!(vol.try_read_now(2 << 20, &mut buf).unwrap());
    assert_eq!(buf, pattern(1, 4 << 20)[2 << 20..(2 << 20) + 4096]);

    pool.close().unwrap();
    let pool = Pool::open_file(&path, opts).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn a_device_without_nowait_reads_falls_back() {
    let (dev, pool) = sim_pool(16 << 20, 1);
    let vol = pool.create_volume("v", 4 << 20).unwrap();
    vol.write(0, &pattern(3, 1 << 20)).unwrap();
    pool.flush().unwrap();
    pool.checkpoint().unwrap();
    let mut buf = vec![0u8; 4096];
    // Data on the device: the simulated device has no no-wait reads, so the caller must fall back.
    assert!(!vol.try_read_now(0, &mut buf).unwrap());
    // Never-written blocks need no device read at all.
    assert!(both_ways(&vol, 2 << 20, 16384));
    // Errors are those of read.
    assert!(matches!(vol.try_read_now(4 << 20, &mut buf), Err(Error::OutOfRange { .. })), "past the end");
    assert!(vol.try_read_now(0, &mut []).is_err(), "empty read");
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(1)).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}
