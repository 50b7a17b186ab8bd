//! Criterion benches of the engine on a file device: 4 KiB random writes and reads, 1 MiB sequential writes, commit
//! latency of a flush. Figures for the targets come from `benches/engine/compare.sh`, which runs fio beside them.
//! And the engine's own work per write, on a device in memory with every log write in the caller (`engine_memory`):
//! what a write costs the thread that makes it, apart from the disk (whose speed varies 2x on a shared machine).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use blockmesh_engine::io::{Device, FileDevice};
use blockmesh_engine::{Pool, PoolOptions};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const VOLUME_BYTES: u64 = 256 << 20;
/// The pool file is sparse and large: criterion writes for as long as its time budget lasts, and without a segment
/// cleaner (issue #6) random overwrites leave every segment partly live.
const POOL_BYTES: u64 = 32 << 30;

fn pool_in(dir: &tempfile::TempDir) -> (Pool, blockmesh_engine::Volume) {
    let dev = FileDevice::create(&dir.path().join("pool"), POOL_BYTES).unwrap();
    let pool = Pool::create(Arc::new(dev), PoolOptions::default()).unwrap();
    let vol = pool.create_volume("bench", VOLUME_BYTES).unwrap();
    (pool, vol)
}

fn io(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (pool, vol) = pool_in(&dir);
    let mut rng = SmallRng::seed_from_u64(7);
    let block = vec![0x5au8; 4096];
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("write_4k_random", |b| {
        b.iter(|| vol.write(rng.random_range(0..VOLUME_BYTES / 4096) * 4096, &block).unwrap())
    });
    vol.flush().unwrap();
    let mut buf = vec![0u8; 4096];
    g.bench_function("read_4k_random", |b| {
        b.iter(|| vol.read(rng.random_range(0..VOLUME_BYTES / 4096) * 4096, &mut buf).unwrap())
    });
    let big = vec![0x33u8; 1 << 20];
    write_1m_sequential(&mut g, &vol, &big);
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("write_4k_then_flush", |b| {
        b.iter_batched(
            || rng.random_range(0..VOLUME_BYTES / 4096) * 4096,
            |off| {
                vol.write(off, &block).unwrap();
                vol.flush().unwrap();
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    drop(pool);
}

/// 1 MiB writes one after the other, around the volume.
fn write_1m_sequential(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    vol: &blockmesh_engine::Volume,
    big: &[u8],
) {
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("write_1m_sequential", |b| {
        let mut off = 0;
        b.iter(|| {
            vol.write(off, big).unwrap();
            off = (off + (1 << 20)) % VOLUME_BYTES;
        })
    });
}

/// A device in memory: reads and writes copy to and from one buffer.
#[derive(Debug)]
struct MemDevice(std::sync::Mutex<Vec<u8>>);

impl Device for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockmesh_engine::Result<()> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockmesh_engine::Result<()> {
        self.0.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> blockmesh_engine::Result<()> {
        Ok(())
    }
}

/// Pool in memory for [`memory`]: four times the volume, so rewriting it whole leaves empty segments to reuse.
const MEMORY_POOL_BYTES: u64 = 4 * VOLUME_BYTES;

fn memory(c: &mut Criterion) {
    // every page touched now (not zero, so not left to the first write): taking fresh pages costs the first
    // writes to them more than the engine's own work on this machine
    let dev = Arc::new(MemDevice(std::sync::Mutex::new(vec![0xeeu8; MEMORY_POOL_BYTES as usize])));
    let opts = PoolOptions { log_writer_threads: 0, background_cleaning: false, ..PoolOptions::default() };
    let pool = Pool::create(dev, opts).unwrap();
    let vol = pool.create_volume("bench", VOLUME_BYTES).unwrap();
    let mut rng = SmallRng::seed_from_u64(7);
    let big: Vec<u8> = (0..1 << 20).map(|_| rng.random::<u8>() | 1).collect();
    // written whole once, so the measured writes replace blocks, as rewrites of a volume in use do
    for off in (0..VOLUME_BYTES).step_by(1 << 20) {
        vol.write(off, &big).unwrap();
    }
    let mut g = c.benchmark_group("engine_memory");
    write_1m_sequential(&mut g, &vol, &big);
    g.finish();
    drop(pool);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = io, memory
}
criterion_main!(benches);
