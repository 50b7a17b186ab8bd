//! Criterion benches of the engine on a file device: 4 KiB random writes and reads, 1 MiB sequential writes, commit
//! latency of a flush. Figures for the targets come from `benches/engine/compare.sh`, which runs fio beside them.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use blockmesh_engine::io::FileDevice;
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
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("write_1m_sequential", |b| {
        let mut off = 0;
        b.iter(|| {
            vol.write(off, &big).unwrap();
            off = (off + (1 << 20)) % VOLUME_BYTES;
        })
    });
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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = io
}
criterion_main!(benches);
