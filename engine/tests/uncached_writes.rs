//! Large writes' log batches go past the device's cache (`Device::write_uncached_at`; O_DIRECT beside the cached
//! descriptor on a file), everything else through it: a batch holding any block of a smaller write is written
//! cached; writes taken without waiting (`Volume::try_write_now`) do the same, and so do the pieces of a large
//! write taken as its bytes arrive (`Volume::try_write_piece_now`); the option turns it off; what a
//! flush covered survives a power cut either way; on a real file, segments reused by cached and uncached batches
//! in turn always read back what was last written. Ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use blockmesh_engine::io::{Device, FileDevice, SimDevice};
use blockmesh_engine::{Pool, PoolOptions, Result, DEFAULT_UNCACHED_WRITE_MIN_BYTES};
use common::{pattern, small_opts};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
/// The first bytes of every block a test writes, by the size class of its write.
const SMALL: &[u8; 8] = b"small---";
const MEDIUM: &[u8; 8] = b"medium--";
const LARGE: &[u8; 8] = b"large---";

/// A simulated device that keeps a copy of every uncached write (and forwards it as a plain write).
#[derive(Debug)]
struct Recording {
    inner: Arc<SimDevice>,
    uncached: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Device for Recording {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        assert_eq!(offset % BS as u64, 0, "uncached writes are block-aligned");
        assert_eq!(buf.len() % BS, 0, "uncached writes are whole blocks");
        self.uncached.lock().push((offset, buf.to_vec()));
        self.inner.write_at(buf, offset)
    }
}

/// `blocks` blocks of a write of size class `tag`, each starting with the tag.
fn tagged(tag: &[u8; 8], seed: u64, blocks: usize) -> Vec<u8> {
    let mut data = pattern(seed, blocks * BS);
    for b in data.chunks_mut(BS) {
        b[..8].copy_from_slice(tag);
    }
    data
}

fn opts(id: u64, threads: usize, min_bytes: u64) -> PoolOptions {
    PoolOptions {
        segment_size_bytes: 1 << 20,
        checkpoint_interval_bytes: 4 << 20,
        log_writer_threads: threads,
        uncached_write_min_bytes: min_bytes,
        ..small_opts(id)
    }
}

/// Random writes of three sizes (4-16 KiB, 64-128 KiB below the threshold, 256 KiB-1 MiB at or above it) over a
/// volume: the content follows the model; the uncached writes hold blocks of large writes only (and their batch
/// headers), most of the large writes' blocks go that way, none of the others' do. A flush, a power cut that loses
/// everything unsynced, and the pool reopens with all of it.
#[test]
fn large_writes_go_past_the_cache_and_nothing_else_does() {
    for threads in [0, 2] {
        let sim = SimDevice::new(64 << 20);
        let dev = Arc::new(Recording { inner: sim.clone(), uncached: Mutex::new(Vec::new()) });
        let pool = Pool::create(dev.clone(), opts(1, threads, DEFAULT_UNCACHED_WRITE_MIN_BYTES)).unwrap();
        let v = pool.create_volume("v", 16 << 20).unwrap();
        let mut model = vec![0u8; 16 << 20];
        let mut rng = SmallRng::seed_from_u64(7 + threads as u64);
        let mut large_blocks = 0usize;
        for i in 0..300u64 {
            let (tag, blocks) = match rng.random_range(0..3) {
                0 => (SMALL, rng.random_range(1..=4usize)),
                1 => (MEDIUM, rng.random_range(16..=32usize)),
                _ => (LARGE, rng.random_range(64..=256usize)),
            };
            let b = rng.random_range(0..model.len() / BS - blocks);
            let data = tagged(tag, 100 + i, blocks);
            v.write((b * BS) as u64, &data).unwrap();
            model[b * BS..(b + blocks) * BS].copy_from_slice(&data);
            large_blocks += if tag == LARGE { blocks } else { 0 };
        }
        let mut back = vec![0u8; model.len()];
        v.read(0, &mut back).unwrap();
        assert!(back == model, "threads {threads}: the volume reads back what was written");
        pool.flush().unwrap();

        let uncached = dev.uncached.lock().clone();
        let mut uncached_large = 0usize;
        for (offset, buf) in &uncached {
            // the first block is the batch header; the others are data blocks of large writes only
            for (k, block) in buf.chunks(BS).enumerate().skip(1) {
                assert_eq!(&block[..8], LARGE, "threads {threads}: block {k} of the uncached batch at {offset}");
                uncached_large += 1;
            }
        }
        assert!(
            uncached_large * 2 > large_blocks,
            "threads {threads}: {uncached_large} of {large_blocks} blocks of large writes went past the cache"
        );
        assert_eq!(pool.stats().uncached_batches, uncached.len() as u64, "threads {threads}: counted");

        // a power cut losing all that no sync covered: the flush covered everything
        drop(v);
        drop(pool);
        let crashed = sim.crash_losing_all_unsynced();
        let pool = Pool::open(crashed, opts(1, threads, DEFAULT_UNCACHED_WRITE_MIN_BYTES)).unwrap();
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "threads {threads}: {:?}", report.problems);
        pool.volume("v").unwrap().read(0, &mut back).unwrap();
        assert!(back == model, "threads {threads}: the flushed writes survive the power cut");
    }
}

/// With `uncached_write_min_bytes: u64::MAX`, nothing goes past the cache.
#[test]
fn the_option_keeps_every_write_cached() {
    let sim = SimDevice::new(32 << 20);
    let dev = Arc::new(Recording { inner: sim.clone(), uncached: Mutex::new(Vec::new()) });
    let pool = Pool::create(dev.clone(), opts(2, 2, u64::MAX)).unwrap();
    let v = pool.create_volume("v", 8 << 20).unwrap();
    let data = tagged(LARGE, 5, 1024);
    v.write(0, &data).unwrap();
    pool.flush().unwrap();
    assert!(dev.uncached.lock().is_empty(), "no uncached write");
    assert_eq!(pool.stats().uncached_batches, 0);
    pool.close().unwrap();
    let pool = Pool::open(sim, opts(2, 0, u64::MAX)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    let mut back = vec![0u8; data.len()];
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == data);
}

/// A pool on a real file, small enough that its segments are reused many times over, by batches written through
/// the page cache and past it (O_DIRECT) in turn: every read, right after the write and later, gives what was last
/// written (the kernel drops the cached pages an O_DIRECT write covers, so no stale page of an earlier use of the
/// segment is read), and the pool reopens clean with the same contents.
#[test]
fn a_file_pool_reusing_segments_for_both_kinds_reads_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let o = PoolOptions { background_cleaning: true, ..opts(3, 2, DEFAULT_UNCACHED_WRITE_MIN_BYTES) };
    let pool = Pool::create_file(&path, 40 << 20, o.clone()).unwrap();
    assert!(
        FileDevice::open(&path).unwrap().writes_uncached(),
        "the test directory must allow O_DIRECT (not tmpfs), or this test covers nothing"
    );
    let v = pool.create_volume("v", 16 << 20).unwrap();
    let mut model = vec![0u8; 16 << 20];
    let mut rng = SmallRng::seed_from_u64(11);
    let mut back = vec![0u8; 1 << 20];
    for i in 0..600u64 {
        let (tag, blocks) = if rng.random_bool(0.5) {
            (SMALL, rng.random_range(1..=4usize))
        } else {
            (LARGE, rng.random_range(64..=256))
        };
        let b = rng.random_range(0..model.len() / BS - blocks);
        let data = tagged(tag, 1_000 + i, blocks);
        v.write((b * BS) as u64, &data).unwrap();
        model[b * BS..(b + blocks) * BS].copy_from_slice(&data);
        let got = &mut back[..blocks * BS];
        v.read((b * BS) as u64, got).unwrap();
        assert!(got == &model[b * BS..(b + blocks) * BS], "write {i} reads back at once");
        let r = rng.random_range(0..model.len() / BS - 256);
        v.read((r * BS) as u64, &mut back).unwrap();
        assert!(back == model[r * BS..r * BS + (1 << 20)], "write {i}: an older range reads back");
    }
    let stats = pool.stats();
    assert!(stats.uncached_batches > 0, "large writes went past the cache");
    // the log's writer took its batches from the buffers registered with its ring (pages pinned once, where this
    // process may pin the 33 batch buffers), and what it wrote from them is what reads back above and after the
    // reopen below
    if common::may_pin_bytes(33 * (520 << 10)) {
        assert!(stats.fixed_buffer_writes > 0, "batches went from registered buffers: {stats:?}");
    }
    assert!(stats.blocks_written * BS as u64 > 3 * stats.pool_size_bytes, "segments were reused: {stats:?}");
    drop(v);
    pool.close().unwrap();
    let pool = Pool::open_file(&path, o).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    let mut all = vec![0u8; model.len()];
    pool.volume("v").unwrap().read(0, &mut all).unwrap();
    assert!(all == model, "the reopened pool holds the last writes");
}

/// Runs `writes` on a 16 MiB volume of a pool on a recording device (with the background thread, so writes may be
/// taken without waiting), `writes` keeping `model` up to date; checks that everything reads back, before and after
/// reopening, with an integrity check; returns how many data blocks went past the cache.
fn recorded(writes: impl FnOnce(&blockmesh_engine::Volume, &mut Vec<u8>)) -> usize {
    let sim = SimDevice::new(64 << 20);
    let dev = Arc::new(Recording { inner: sim.clone(), uncached: Mutex::new(Vec::new()) });
    let o = PoolOptions { background_cleaning: true, ..opts(4, 2, DEFAULT_UNCACHED_WRITE_MIN_BYTES) };
    let pool = Pool::create(dev.clone(), o.clone()).unwrap();
    let v = pool.create_volume("v", 16 << 20).unwrap();
    let mut model = vec![0u8; 16 << 20];
    writes(&v, &mut model);
    let mut back = vec![0u8; model.len()];
    v.read(0, &mut back).unwrap();
    assert!(back == model);
    pool.flush().unwrap();
    let uncached: usize = dev.uncached.lock().iter().map(|(_, buf)| buf.len() / BS - 1).sum();
    drop(v);
    pool.close().unwrap();
    let pool = Pool::open(sim, o).unwrap();
    assert!(pool.check().unwrap().is_ok());
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == model, "the reopened pool holds the last writes");
    uncached
}

/// Large writes taken without waiting (`Volume::try_write_now`, as the NBD server offers writes of up to 1 MiB on
/// its event loop) go past the cache as `write`'s do, and read back; declined ones fall back to `write`.
#[test]
fn large_writes_taken_without_waiting_go_past_the_cache_too() {
    let uncached = recorded(|v, model| {
        let mut taken = 0;
        for i in 0..48u64 {
            let b = (i as usize * 256) % (model.len() / BS);
            let data = tagged(LARGE, 50 + i, 256);
            if v.try_write_now((b * BS) as u64, &data).unwrap() {
                taken += 1;
            } else {
                v.write((b * BS) as u64, &data).unwrap();
            }
            model[b * BS..(b + 256) * BS].copy_from_slice(&data);
        }
        assert!(taken > 0, "some writes were taken without waiting");
    });
    assert!(uncached * 2 > 48 * 256, "{uncached} of {} blocks went past the cache", 48 * 256);
}

/// The pieces of a write taken as its bytes arrive (`Volume::try_write_piece_now`, as the NBD server takes long
/// writes) are written as the whole write would be: pieces of 64 KiB of a 1 MiB write go past the cache, the same
/// pieces of a write of their own size do not.
#[test]
fn pieces_of_a_large_write_go_past_the_cache_as_the_whole_write_would() {
    const PIECE_BLOCKS: usize = 16;
    for whole_bytes in [1u64 << 20, (PIECE_BLOCKS * BS) as u64] {
        let uncached = recorded(|v, model| {
            let (mut taken, mut pieces) = (0, 0);
            for i in 0..16u64 {
                let b = (i as usize * 256) % (model.len() / BS);
                let data = tagged(LARGE, 70 + i, 256);
                for (k, piece) in data.chunks(PIECE_BLOCKS * BS).enumerate() {
                    let at = ((b + k * PIECE_BLOCKS) * BS) as u64;
                    pieces += 1;
                    if v.try_write_piece_now(at, piece, whole_bytes).unwrap() {
                        taken += 1;
                    } else {
                        v.write(at, piece).unwrap();
                    }
                }
                model[b * BS..(b + 256) * BS].copy_from_slice(&data);
            }
            assert!(taken * 2 > pieces, "most pieces were taken without waiting: {taken} of {pieces}");
        });
        if whole_bytes >= DEFAULT_UNCACHED_WRITE_MIN_BYTES {
            assert!(uncached * 2 > 16 * 256, "{uncached} of {} blocks went past the cache", 16 * 256);
        } else {
            assert_eq!(uncached, 0, "pieces of small writes are cached");
        }
    }
}
