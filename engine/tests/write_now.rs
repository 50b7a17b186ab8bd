//! `Volume::try_write_now`: writes that need no waiting land as `write` would; writes that would wait (a busy pool,
//! log writes in flight that the device does not complete, cleaning, a due checkpoint, a read-modify-write, no log
//! writer threads, no background thread) say so and change nothing; checkpoints still come while every write is
//! taken this way; a power cut keeps what a flush covered. Ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Error, Pool, PoolOptions};
use common::{pattern, reopen_checked, small_opts};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
/// How long a test waits for the background thread to begin a due checkpoint before it fails (it looks every
/// 100 ms).
const DEADLINE: Duration = Duration::from_secs(30);

fn opts(id: u64) -> PoolOptions {
    PoolOptions { log_writer_threads: 2, background_cleaning: true, ..small_opts(id) }
}

/// Random 4-16 KiB overwrites of a volume that fills most of a small pool, each tried without waiting first and
/// written by `write` when declined: the contents follow the model either way, both paths are taken (the pool
/// needs cleaning, which only `write` does), and the pool checks clean after a reopen.
#[test]
fn declined_writes_fall_back_and_everything_lands() {
    let dev = SimDevice::new(16 << 20);
    let pool = Pool::create(dev.clone(), opts(1)).unwrap();
    let v = pool.create_volume("v", 9 << 20).unwrap();
    let mut model = vec![0u8; 9 << 20];
    let mut rng = SmallRng::seed_from_u64(1);
    let (mut now, mut declined) = (0u64, 0u64);
    for i in 0..6000u64 {
        let blocks = rng.random_range(1..=4usize);
        let b = rng.random_range(0..model.len() / BS - blocks);
        let data = pattern(1_000 + i, blocks * BS);
        if v.try_write_now((b * BS) as u64, &data).unwrap() {
            now += 1;
        } else {
            declined += 1;
            v.write((b * BS) as u64, &data).unwrap();
        }
        model[b * BS..b * BS + data.len()].copy_from_slice(&data);
    }
    let mut back = vec![0u8; model.len()];
    v.read(0, &mut back).unwrap();
    assert!(back == model, "contents differ from the model");
    assert!(now > 0, "no write was taken without waiting");
    assert!(declined > 0, "no write was declined, though the pool had to be cleaned ({now} taken)");
    assert!(pool.stats().clean_passes > 0, "the pool was cleaned");
    drop(v);
    reopened_same(dev, pool, 1, &model);
}

/// Every write taken without waiting (a declined one is tried again, never handed to `write`): the checkpoints
/// the log needs still come, begun by the background thread, so the log to replay stays bounded.
#[test]
fn checkpoints_come_when_no_write_blocks() {
    let dev = SimDevice::new(64 << 20);
    let pool = Pool::create(dev.clone(), opts(2)).unwrap();
    let v = pool.create_volume("v", 8 << 20).unwrap();
    let before = pool.stats().checkpoints;
    let mut model = vec![0u8; 8 << 20];
    let started = Instant::now();
    // 4 MiB of writes, 8 times the checkpoint interval
    for i in 0..1024u64 {
        let b = (i * 7 % 2048) as usize;
        let data = pattern(i + 1, BS);
        while !v.try_write_now((b * BS) as u64, &data).unwrap() {
            assert!(started.elapsed() < DEADLINE, "write {i} declined for {DEADLINE:?}: nobody begins checkpoints");
            std::thread::sleep(Duration::from_millis(1));
        }
        model[b * BS..(b + 1) * BS].copy_from_slice(&data);
    }
    assert!(pool.stats().checkpoints >= before + 4, "checkpoints: {} -> {}", before, pool.stats().checkpoints);
    drop(v);
    reopened_same(dev, pool, 2, &model);
}

/// Reopen and check the pool; volume `v` holds `model`.
fn reopened_same(dev: std::sync::Arc<SimDevice>, pool: Pool, id: u64, model: &[u8]) {
    let pool = reopen_checked(dev, pool, id);
    let mut back = vec![0u8; model.len()];
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == model, "contents differ from the model after reopen");
}

/// What is declined writes nothing; errors are those of `write`.
#[test]
fn declines_change_nothing_and_errors_are_writes() {
    let dev = SimDevice::new(16 << 20);
    let pool = Pool::create(dev.clone(), opts(3)).unwrap();
    let v = pool.create_volume("v", 4 << 20).unwrap();
    v.write(0, &pattern(1, 64 << 10)).unwrap();
    // Less than a block, or not on block boundaries: a read-modify-write, which may read the device.
    assert!(!v.try_write_now(512, &[9; 512]).unwrap());
    assert!(!v.try_write_now(2048, &[9; BS]).unwrap());
    let mut back = vec![0u8; 64 << 10];
    v.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(1, 64 << 10), "declined writes changed nothing");
    // Whole blocks are taken.
    assert!(v.try_write_now(BS as u64, &[7; BS]).unwrap());
    let mut block = vec![0u8; BS];
    v.read(BS as u64, &mut block).unwrap();
    assert_eq!(block, vec![7u8; BS]);
    assert!(matches!(v.try_write_now(4 << 20, &[1; BS]), Err(Error::OutOfRange { .. })), "past the end");
    assert!(v.try_write_now(0, &[]).is_err(), "empty write");
    pool.snapshot(&[("v", "s")]).unwrap();
    let s = pool.snapshot_volume("s").unwrap();
    assert!(matches!(s.try_write_now(0, &[1; BS]), Err(Error::ReadOnly(_))), "a snapshot");
    drop((v, s));
    let pool = reopen_checked(dev, pool, 3);
    let mut back = vec![0u8; BS];
    pool.volume("v").unwrap().read(BS as u64, &mut back).unwrap();
    assert_eq!(back, vec![7u8; BS]);
}

/// Without log writer threads every batch is written in the caller, and without the background thread nobody
/// would begin the checkpoint a write makes due: such pools never take a write without waiting.
#[test]
fn pools_that_would_wait_always_decline() {
    for (threads, background) in [(0, true), (2, false)] {
        let dev = SimDevice::new(16 << 20);
        let o = PoolOptions { log_writer_threads: threads, background_cleaning: background, ..small_opts(4) };
        let pool = Pool::create(dev.clone(), o).unwrap();
        let v = pool.create_volume("v", 4 << 20).unwrap();
        assert!(!v.try_write_now(0, &[5; BS]).unwrap(), "threads {threads}, background {background}");
        let mut back = vec![1u8; BS];
        v.read(0, &mut back).unwrap();
        assert_eq!(back, vec![0u8; BS], "nothing written");
        drop(v);
        reopen_checked(dev, pool, 4);
    }
}

/// A device whose writes wait while its gate is closed: the log's writes in flight pile up.
#[derive(Debug)]
struct Gated {
    dev: std::sync::Arc<SimDevice>,
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gated {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }
}

impl blockmesh_engine::io::Device for Gated {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockmesh_engine::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockmesh_engine::Result<()> {
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
        drop(closed);
        self.dev.write_at(buf, offset)
    }
    fn sync(&self) -> blockmesh_engine::Result<()> {
        self.dev.sync()
    }
}

/// While the device takes no writes, the log's writes in flight fill up: a write taken without waiting is declined
/// once the batches it may seal would wait for them, instead of blocking its caller (an event loop) until the
/// device moves. Once the device moves again, everything lands.
#[test]
fn a_log_whose_writes_do_not_complete_declines_instead_of_blocking() {
    use blockmesh_engine::io::Device;
    let sim = SimDevice::new(64 << 20);
    let gated = std::sync::Arc::new(Gated { dev: sim.clone(), closed: false.into(), opened: Default::default() });
    // segments and a checkpoint interval large enough that only the log writers in flight make it decline
    let o = PoolOptions { segment_size_bytes: 1 << 20, checkpoint_interval_bytes: 32 << 20, ..opts(5) };
    let pool = std::sync::Arc::new(Pool::create(gated.clone(), o).unwrap());
    let v = pool.create_volume("v", 16 << 20).unwrap();
    pool.flush().unwrap();
    gated.set(true);
    let chunk = 64 << 10;
    let mut model = vec![0u8; 16 << 20];
    // Each attempt runs on its own thread, so a blocking one is caught by the deadline instead of hanging the test.
    let mut taken = 0usize;
    let declined_at = loop {
        let (v2, data) = (v.clone(), pattern(taken as u64 + 1, chunk));
        let offset = (taken * chunk) as u64;
        let (tx, rx) = std::sync::mpsc::channel();
        let d = data.clone();
        std::thread::spawn(move || tx.send(v2.try_write_now(offset, &d).unwrap()));
        let Ok(done) = rx.recv_timeout(Duration::from_secs(10)) else {
            gated.set(false); // lets the pool's writers finish, so that the failing test can end
            panic!("write {taken} waited for the device instead of declining");
        };
        if !done {
            break taken;
        }
        model[offset as usize..offset as usize + chunk].copy_from_slice(&data);
        taken += 1;
        assert!(taken < 256, "256 writes of 64 KiB taken while the device took none");
    };
    // up to 8 batches of 128 blocks in flight, two of them spare for the batches one write may seal
    assert!(declined_at >= 32, "declined after {declined_at} writes, before the log writers were busy");
    gated.set(false);
    // The declined write, by the blocking path, and a flush: all of it reaches the device.
    let data = pattern(9_999, chunk);
    let offset = declined_at * chunk;
    v.write(offset as u64, &data).unwrap();
    model[offset..offset + chunk].copy_from_slice(&data);
    pool.flush().unwrap();
    let mut back = vec![0u8; model.len()];
    v.read(0, &mut back).unwrap();
    assert!(back == model, "contents differ from the model");
    assert!(gated.size_bytes() > 0);
    drop(v);
    let pool = std::sync::Arc::try_unwrap(pool).unwrap();
    reopened_same(sim, pool, 5, &model);
}

/// Power cuts after writes taken without waiting: what a flush covered is all there after the cut; each block
/// written since is whole, old or new (never torn, never anything else); the pool opens and checks clean. Over
/// several seeds, each losing, keeping or tearing a random share of the unsynced device writes.
#[test]
fn a_power_cut_keeps_what_was_flushed() {
    let mut taken = 0u64;
    for seed in 0..8u64 {
        let dev = SimDevice::new(32 << 20);
        let pool = Pool::create(dev.clone(), opts(6)).unwrap();
        let v = pool.create_volume("v", 8 << 20).unwrap();
        let blocks = (8 << 20) / BS;
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut flushed = vec![0u8; 8 << 20];
        // before the flush: anywhere in the first half, overwrites included
        for i in 0..600u64 {
            let (n, b) = (rng.random_range(1..=4usize), rng.random_range(0..blocks / 2 - 4));
            let data = pattern(seed * 10_000 + i + 1, n * BS);
            match v.try_write_now((b * BS) as u64, &data).unwrap() {
                true => taken += 1,
                false => v.write((b * BS) as u64, &data).unwrap(),
            }
            flushed[b * BS..b * BS + data.len()].copy_from_slice(&data);
        }
        pool.flush().unwrap();
        // after it: each block of the second half written at most once
        let mut after: Vec<Option<Vec<u8>>> = vec![None; blocks];
        for b in (blocks / 2..blocks).step_by(3) {
            let data = pattern(seed * 10_000 + 5_000 + b as u64, BS);
            match v.try_write_now((b * BS) as u64, &data).unwrap() {
                true => taken += 1,
                false => v.write((b * BS) as u64, &data).unwrap(),
            }
            after[b] = Some(data);
        }
        let cut = dev.crash(seed);
        drop(v);
        drop(pool);
        let pool = Pool::open(cut.clone(), small_opts(6)).unwrap_or_else(|e| panic!("seed {seed}: open: {e}"));
        let report = pool.check().unwrap();
        assert!(report.is_ok(), "seed {seed}: {:?}", report.problems);
        let mut back = vec![0u8; 8 << 20];
        pool.volume("v").unwrap().read(0, &mut back).unwrap();
        assert!(back[..(4 << 20)] == flushed[..(4 << 20)], "seed {seed}: flushed writes lost");
        for (b, new) in after.iter().enumerate().skip(blocks / 2) {
            let got = &back[b * BS..(b + 1) * BS];
            let old = &flushed[b * BS..(b + 1) * BS];
            let ok = got == old || new.as_deref() == Some(got);
            assert!(ok, "seed {seed}: block {b} is neither its flushed nor its later contents");
        }
        pool.close().unwrap();
    }
    assert!(taken > 0, "no write was taken without waiting");
}
