//! A checkpoint taken by a write runs its first sync without the pool lock: between its record and its superblock
//! (the window) other writers go on. These tests hold that sync open with a device whose sync waits for the test,
//! write, overwrite and trim meanwhile, and cut the power at random moments around it: every image opens, passes the
//! integrity check, and holds for each block one of the values written to it (flushed ones at least), never a
//! checksum error. Each test ends with a clean close, reopen + integrity check and exact contents.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use blockmesh_engine::io::{Device, SimDevice};
use blockmesh_engine::{Pool, PoolOptions, Result};
use common::pattern;
use parking_lot::Mutex;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// The volume: R1 = [0, 1 MiB) is what the checkpointing writer overwrites, R2 = [2 MiB, 4 MiB) what the others do.
const VOLUME_BYTES: u64 = 4 * MIB;
const R1: (u64, u64) = (0, MIB);
/// Overwritten in the window: 160 blocks, more than one batch, so some of it reaches the log during the window.
const WINDOW_WRITE: (u64, u64) = (2 * MIB, 2 * MIB + 640 * KIB);
/// Trimmed in the window: one op that empties whole segments (the volume was written from its end backwards, so
/// these are the lowest-numbered segments to empty, the first the log would take again).
const WINDOW_TRIM: (u64, u64) = (3 * MIB, 3 * MIB + 512 * KIB);
/// How long a step that must not wait for the held sync may take.
const DEADLINE: Duration = Duration::from_secs(30);
/// Power cuts per image point.
const CRASH_SEEDS: u64 = 48;
/// Power cuts while the checkpoint's sync is held: replay reaches the window's ops only when every unsynced record
/// before them (the checkpoint's pages and record) survived whole, a few percent of cuts.
const CRASH_SEEDS_IN_WINDOW: u64 = 256;

/// A device whose next sync, once armed, tells the test it began and waits until the test lets it go on.
#[derive(Debug)]
struct HeldSync {
    inner: Arc<SimDevice>,
    armed: AtomicBool,
    began: Mutex<Option<Sender<()>>>,
    release: Mutex<Option<Receiver<()>>>,
}

impl Device for HeldSync {
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
        if self.armed.swap(false, Ordering::SeqCst) {
            if let Some(tx) = self.began.lock().take() {
                let _ = tx.send(());
            }
            let rx = self.release.lock().take();
            if let Some(rx) = rx {
                let _ = rx.recv();
            }
        }
        self.inner.sync()
    }
}

/// Small segments (32 blocks), checkpoints every 8 MiB of log (early ones after 2 MiB when as much was emptied):
/// the window's own writes stay below both, so the held checkpoint is the only one.
fn opts() -> PoolOptions {
    PoolOptions {
        segment_size_bytes: 128 * KIB,
        checkpoint_interval_bytes: 8 * MIB,
        pool_id: Some(0x5717),
        log_writer_threads: 0,
        background_cleaning: false,
        uncached_write_min_bytes: blockmesh_engine::DEFAULT_UNCACHED_WRITE_MIN_BYTES,
    }
}

/// What each block may hold after a power cut: any of the values written to it since its last flushed one.
struct Model {
    blocks: Vec<Vec<Vec<u8>>>,
}

impl Model {
    fn new(gen0: &[u8]) -> Self {
        Self { blocks: gen0.chunks(BLOCK as usize).map(|b| vec![b.to_vec()]).collect() }
    }
    /// A write that may or may not survive.
    fn may(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.chunks(BLOCK as usize).enumerate() {
            self.blocks[(offset / BLOCK) as usize + i].push(b.to_vec());
        }
    }
    /// After a flush: only the last value of each block.
    fn flushed(&mut self) {
        for b in &mut self.blocks {
            let last = b.pop().unwrap();
            *b = vec![last];
        }
    }
    fn check(&self, pool: &Pool, what: &str) {
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "{what}: {:?}", report.problems);
        let v = pool.volume("v").unwrap();
        let mut back = vec![0u8; VOLUME_BYTES as usize];
        v.read(0, &mut back).unwrap_or_else(|e| panic!("{what}: reading the volume: {e}"));
        for (i, got) in back.chunks(BLOCK as usize).enumerate() {
            assert!(
                self.blocks[i].iter().any(|w| w == got),
                "{what}: block {i} holds none of the values written to it"
            );
        }
    }
}

/// Opens a power-cut image and checks it against the model.
fn check_image(image: Arc<SimDevice>, model: &Model, what: &str) {
    let pool = Pool::open(image, opts()).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    model.check(&pool, what);
    drop(pool);
}

/// Closes the pool (the last handle on it), then opens the device and checks it against the model: the end of
/// every test.
fn close_and_check(sim: Arc<SimDevice>, dev: Arc<HeldSync>, pool: Arc<Pool>, model: &Model) {
    let pool = Arc::into_inner(pool).expect("the last handle on the pool");
    pool.close().unwrap();
    drop(dev);
    check_image(sim, model, "after a clean close");
}

/// A simulated device behind a [`HeldSync`].
fn held_sync_device() -> (Arc<SimDevice>, Arc<HeldSync>) {
    let sim = SimDevice::new(32 * MIB);
    let dev = Arc::new(HeldSync {
        inner: sim.clone(),
        armed: AtomicBool::new(false),
        began: Mutex::new(None),
        release: Mutex::new(None),
    });
    (sim, dev)
}

/// The pool with the volume written once (gen0), flushed and checkpointed; the device; the held-sync wrapper.
fn setup() -> (Arc<SimDevice>, Arc<HeldSync>, Arc<Pool>, Model) {
    let (sim, dev) = held_sync_device();
    let pool = Pool::create(dev.clone(), opts()).unwrap();
    let v = pool.create_volume("v", VOLUME_BYTES).unwrap();
    let gen0 = pattern(1, VOLUME_BYTES as usize);
    // from the end backwards: the trimmed range lies in lower-numbered segments than what the writers overwrite
    for (i, chunk) in gen0.chunks(256 * KIB as usize).enumerate().rev() {
        v.write(i as u64 * 256 * KIB, chunk).unwrap();
    }
    v.flush().unwrap();
    pool.checkpoint().unwrap();
    (sim, dev, Arc::new(pool), Model::new(&gen0))
}

/// The writer holding a checkpoint: returns the writes it made, `(offset, bytes)`.
type Writer = std::thread::JoinHandle<Vec<(u64, Vec<u8>)>>;

/// Arms the held sync again (for the next one): returns the channel that tells when it began and the release.
fn hold_the_next_sync(dev: &HeldSync) -> (Receiver<()>, Sender<()>) {
    let (began_tx, began_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    *dev.began.lock() = Some(began_tx);
    *dev.release.lock() = Some(release_rx);
    dev.armed.store(true, Ordering::SeqCst);
    (began_rx, release_tx)
}

/// Starts a writer overwriting R1 (gen1, 64 KiB at a time, pass after pass, each write flushed) until one of its
/// writes begins a checkpoint, whose sync is held (the sync is armed only during writes, not for the flushes, so
/// what the log holds before the checkpoint's record is durable); returns once it is, with the release and the
/// writer (which returns the writes it made, all of them acknowledged).
fn hold_a_checkpoint(dev: &Arc<HeldSync>, pool: &Arc<Pool>) -> (Sender<()>, Writer) {
    let (began_tx, began_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    *dev.began.lock() = Some(began_tx);
    *dev.release.lock() = Some(release_rx);
    let checkpoints = pool.stats().checkpoints;
    let p = pool.clone();
    let d = dev.clone();
    let writer = std::thread::spawn(move || {
        let v = p.volume("v").unwrap();
        let mut done = Vec::new();
        // 2 MiB of log and as much emptied brings an early checkpoint: at most 4 passes over R1
        for pass in 0..4u64 {
            for off in (R1.0..R1.1).step_by((64 * KIB) as usize) {
                let data = pattern(100 + pass * 1000 + off / BLOCK, (64 * KIB) as usize);
                d.armed.store(true, Ordering::SeqCst);
                v.write(off, &data).unwrap();
                d.armed.store(false, Ordering::SeqCst);
                done.push((off, data));
                if p.stats().checkpoints > checkpoints {
                    return done;
                }
                v.flush().unwrap();
            }
        }
        done
    });
    began_rx.recv_timeout(DEADLINE).expect("the writer's checkpoint never synced");
    (release_tx, writer)
}

/// Runs `f` on another thread and waits for it, failing if it takes longer than [`DEADLINE`] (it would be waiting
/// for the pool lock, held across the sync).
fn without_waiting<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE)
        .expect("a write waited for a checkpoint's sync (the pool lock held across it, or the sync taken by the write)")
}

/// Writes and trims in the window: overwrites of R2 (gen2) reuse the vbns R1's overwrites freed before the record,
/// and empty the segments that held R2's first data, which the held checkpoint still references.
fn write_in_the_window(pool: &Arc<Pool>, model: &mut Model) {
    let data = pattern(2, (WINDOW_WRITE.1 - WINDOW_WRITE.0) as usize);
    model.may(WINDOW_WRITE.0, &data);
    model.may(WINDOW_TRIM.0, &vec![0u8; (WINDOW_TRIM.1 - WINDOW_TRIM.0) as usize]);
    let p = pool.clone();
    without_waiting(move || {
        let v = p.volume("v").unwrap();
        v.write(WINDOW_WRITE.0, &data).unwrap();
        v.trim(WINDOW_TRIM.0, WINDOW_TRIM.1 - WINDOW_TRIM.0).unwrap();
    });
}

#[test]
fn writes_go_on_while_a_checkpoint_syncs_and_power_cuts_around_it_lose_nothing_flushed() {
    let (sim, dev, pool, mut model) = setup();
    let (release, writer) = hold_a_checkpoint(&dev, &pool);
    let checkpoints = pool.stats().checkpoints;
    write_in_the_window(&pool, &mut model);
    // R1's writes so far may or may not survive (acknowledged, not flushed); the writer's last one is in flight
    for off in (R1.0..R1.1).step_by(BLOCK as usize) {
        for pass in 0..4u64 {
            model.may(
                off,
                &pattern(100 + pass * 1000 + off / BLOCK - (off % (64 * KIB)) / BLOCK, (64 * KIB) as usize)
                    [((off % (64 * KIB)) as usize)..((off % (64 * KIB)) + BLOCK) as usize],
            );
        }
    }
    // power cuts with the checkpoint record written and its superblock not: replay from the previous checkpoint
    // passes the record and applies the window's ops, which reused vbns freed before it
    for seed in 0..CRASH_SEEDS_IN_WINDOW {
        check_image(sim.crash(seed), &model, &format!("before the superblock, cut {seed}"));
    }
    check_image(sim.crash_losing_all_unsynced(), &model, "before the superblock, every unsynced write lost");
    assert_eq!(pool.stats().checkpoints, checkpoints, "the held checkpoint completed early");
    // its second sync (after the superblock) held too: writes go on meanwhile, and a cut finds either superblock
    let (began, release_second) = hold_the_next_sync(&dev);
    release.send(()).unwrap();
    began.recv_timeout(DEADLINE).expect("the checkpoint's second sync never began");
    let gen4 = pattern(4, (WINDOW_WRITE.1 - WINDOW_WRITE.0) as usize);
    model.may(WINDOW_WRITE.0, &gen4);
    let p = pool.clone();
    without_waiting(move || p.volume("v").unwrap().write(WINDOW_WRITE.0, &gen4).unwrap());
    for seed in 0..CRASH_SEEDS {
        check_image(sim.crash(500 + seed), &model, &format!("superblock written, cut {seed}"));
    }
    assert_eq!(pool.stats().checkpoints, checkpoints, "the held checkpoint completed before its superblock's sync");
    release_second.send(()).unwrap();
    let done = writer.join().unwrap();
    assert!(pool.stats().checkpoints > checkpoints, "the held checkpoint did not complete");
    // power cuts after the superblock: the window's ops replay from the new checkpoint
    for seed in 0..CRASH_SEEDS {
        check_image(sim.crash(1000 + seed), &model, &format!("after the superblock, cut {seed}"));
    }
    // everything flushed: only the last values (R1's: gen0 where the writer did not get to, else its last write)
    pool.flush().unwrap();
    model.flushed();
    for i in (R1.0 / BLOCK)..(R1.1 / BLOCK) {
        model.blocks[i as usize] =
            vec![pattern(1, VOLUME_BYTES as usize)[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize].to_vec()];
    }
    for (off, data) in &done {
        for (i, b) in data.chunks(BLOCK as usize).enumerate() {
            model.blocks[(off / BLOCK) as usize + i] = vec![b.to_vec()];
        }
    }
    check_image(sim.crash(7), &model, "after a flush");
    close_and_check(sim, dev, pool, &model);
}

#[test]
fn segments_emptied_while_a_checkpoint_syncs_stay_in_use_until_the_next_one() {
    let (sim, dev, pool, mut model) = setup();
    let (release, writer) = hold_a_checkpoint(&dev, &pool);
    write_in_the_window(&pool, &mut model);
    release.send(()).unwrap();
    let done = writer.join().unwrap();
    for (off, data) in &done {
        model.may(*off, data);
    }
    // Overwrite the window's range again (gen3), unflushed: the log moves on into the lowest free segments. The
    // segments the window's trim emptied (the lowest empty ones) still hold blocks the completed checkpoint
    // references, and the trim is in the batch still open when the checkpoint completed: if the log took those
    // segments now, a cut keeping these writes and losing that batch would leave the checkpoint pointing at
    // overwritten blocks.
    let gen3 = pattern(3, (WINDOW_WRITE.1 - WINDOW_WRITE.0) as usize);
    model.may(WINDOW_WRITE.0, &gen3);
    let p = pool.clone();
    let g = gen3.clone();
    without_waiting(move || {
        let v = p.volume("v").unwrap();
        v.write(WINDOW_WRITE.0, &g).unwrap();
    });
    for seed in 0..CRASH_SEEDS {
        check_image(sim.crash(2000 + seed), &model, &format!("reuse after the window, cut {seed}"));
    }
    pool.flush().unwrap();
    model.flushed();
    close_and_check(sim, dev, pool, &model);
}

#[test]
fn with_background_threads_the_write_that_begins_a_checkpoint_does_not_wait_for_its_syncs() {
    let (sim, dev) = held_sync_device();
    let pool = Arc::new(Pool::create(dev.clone(), PoolOptions { background_cleaning: true, ..opts() }).unwrap());
    let v = pool.create_volume("v", VOLUME_BYTES).unwrap();
    let gen0 = pattern(1, VOLUME_BYTES as usize);
    v.write(0, &gen0).unwrap();
    v.flush().unwrap();
    pool.checkpoint().unwrap();
    let checkpoints = pool.stats().checkpoints;
    // the next sync is the one the checkpoint a write begins needs (no flush comes, nor 128 MiB for the background
    // log sync): held; every write returns anyway, the one that began the checkpoint too
    let (began, release) = hold_the_next_sync(&dev);
    let mut last = gen0.clone();
    let mut held = false;
    for i in 0..4 * (R1.1 / (64 * KIB)) {
        let off = (i % (R1.1 / (64 * KIB))) * 64 * KIB;
        let data = pattern(10 + i, (64 * KIB) as usize);
        last[off as usize..(off + 64 * KIB) as usize].copy_from_slice(&data);
        let p = pool.clone();
        without_waiting(move || p.volume("v").unwrap().write(off, &data).unwrap());
        if began.try_recv().is_ok() {
            held = true;
            break;
        }
    }
    assert!(held, "no checkpoint began: {:?}", pool.stats());
    // more writes while the sync is held
    for i in 0..8u64 {
        let data = pattern(500 + i, (64 * KIB) as usize);
        last[(i * 64 * KIB) as usize..((i + 1) * 64 * KIB) as usize].copy_from_slice(&data);
        let p = pool.clone();
        without_waiting(move || p.volume("v").unwrap().write(i * 64 * KIB, &data).unwrap());
    }
    assert_eq!(pool.stats().checkpoints, checkpoints, "the checkpoint completed with its sync held");
    release.send(()).unwrap();
    let started = std::time::Instant::now();
    while pool.stats().checkpoints == checkpoints {
        assert!(started.elapsed() < DEADLINE, "the background thread did not complete the checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    v.flush().unwrap();
    drop(v);
    close_and_check(sim, dev, pool, &Model::new(&last));
}
