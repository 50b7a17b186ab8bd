//! Engine workloads for the comparison script (`benches/engine/compare.sh`): each prints one JSON line.
//!
//! - `io <randwrite|randread|seqwrite|seqread> --path F --bs B --size-mib N --seconds S [--flush-every K] [--keep]
//!   [--device file|direct|uring] [--existing FILE]`: I/O through one volume of a fresh pool in a new sparse file F
//!   (or over the existing, written file FILE); prints ops/s and MB/s.
//! - `recovery --path F --gib N`: writes N GiB with no checkpoint, stops without closing, times the reopen.
//! - `idle-memory --path F --volumes N`: resident memory per idle volume of a reopened pool of N volumes.
//! - `versioning --path F --gib N`: snapshot latency at 1 and N GiB written, diff of 1 MiB changed in N GiB, 4K
//!   random writes right after a snapshot against none, 4K random reads at the head of 32 snapshots against none (each
//!   comparison alternates its two sides in rounds and compares medians).
//! - `streams --path F --gib N --full-gib M`: incremental send of 1 MiB changed in an N GiB dot; full send and
//!   receive of an M GiB dot against `cp --sparse=always` of a raw file of M GiB.
//! - `cleaning --path F --pool-mib N --util U [--commits C] [--passes P]`: a volume filling share U of the pool's
//!   data space (less with commits, so that what they hold brings the total near U), then uniform random 4 KiB
//!   overwrites, P volume-sizes of them (after one of warm-up), with C rolling commits held; prints the write
//!   amplification (device blocks / client blocks) and IOPS of the measured phase.
//!   `--anchor`: the same pool and volume, empty, written at random for half a volume-size (no cleaning needed), as
//!   the anchor for IOPS. `--existing FILE`: over a written file of the pool's size (no file-system allocation).
//!   `--idle-ms N`: after the warm-up, N ms without writes, then a burst of 1/16 volume-size is the measured phase;
//!   `--background 0`: without the background cleaner.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockmesh_engine::io::{Device, FileDevice, UringDevice};
use blockmesh_engine::{Pool, PoolOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Headroom of the pool over the volume: the log needs free segments to write into, and without a segment cleaner
/// (issue #6) random overwrites leave every segment partly live. The pool file is sparse.
const POOL_OVER_VOLUME: u64 = 8;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: u64) -> Result<u64> {
    arg(args, name).map_or(Ok(default), |v| v.parse().with_context(|| format!("{name} {v}")))
}

fn device(path: &PathBuf, size: u64, kind: &str) -> Result<Arc<dyn Device>> {
    let _ = std::fs::remove_file(path);
    Ok(match kind {
        "file" => Arc::new(FileDevice::create(path, size)?),
        "uring" => Arc::new(UringDevice::create(path, size)?),
        "direct" => {
            drop(FileDevice::create(path, size)?);
            Arc::new(FileDevice::open_direct(path)?)
        }
        other => bail!("unknown device {other}"),
    })
}

fn rss_bytes() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    Ok(pages * 4096)
}

fn io(args: &[String]) -> Result<()> {
    let workload = args.get(1).context("workload")?.clone();
    let path = PathBuf::from(arg(args, "--path").context("--path")?);
    let bs = num(args, "--bs", 4096)?;
    let size = num(args, "--size-mib", 1024)? << 20;
    let seconds = num(args, "--seconds", 5)?;
    let flush_every = num(args, "--flush-every", 0)?;
    let kind = arg(args, "--device").unwrap_or_else(|| "file".into());
    let pool_bytes = size * POOL_OVER_VOLUME + (64 << 20);
    let dev = if let Some(existing) = arg(args, "--existing") {
        // an existing, fully written file (as a block device, or a pool file in use, is): the file system allocates
        // nothing during the run, as for fio's pre-written raw file; the pool is created over whatever it held
        let path = PathBuf::from(existing);
        match kind.as_str() {
            "direct" => Arc::new(FileDevice::open_direct(&path)?) as Arc<dyn Device>,
            "uring" => Arc::new(UringDevice::open(&path)?),
            _ => Arc::new(FileDevice::open(&path)?),
        }
    } else if args.iter().any(|a| a == "--preallocate") {
        // allocate the file's blocks first (as a raw image that has been written once is), then open it
        let _ = std::fs::remove_file(&path);
        let st = std::process::Command::new("fallocate").arg("-l").arg(pool_bytes.to_string()).arg(&path).status()?;
        if !st.success() {
            bail!("fallocate failed");
        }
        match kind.as_str() {
            "direct" => Arc::new(FileDevice::open_direct(&path)?) as Arc<dyn Device>,
            "uring" => Arc::new(UringDevice::open(&path)?),
            _ => Arc::new(FileDevice::open(&path)?),
        }
    } else {
        device(&path, pool_bytes, &kind)?
    };
    let threads = num(args, "--writer-threads", blockmesh_engine::DEFAULT_LOG_WRITER_THREADS as u64)? as usize;
    let mut opts = PoolOptions { log_writer_threads: threads, ..PoolOptions::default() };
    if let Some(mib) = arg(args, "--checkpoint-mib") {
        opts.checkpoint_interval_bytes = mib.parse::<u64>()? << 20;
    }
    let pool = Pool::create(dev, opts)?;
    let vol = pool.create_volume("bench", size)?;
    let mut rng = SmallRng::seed_from_u64(1);
    let mut buf: Vec<u8> = (0..bs).map(|i| (i % 251) as u8 | 1).collect();
    if workload.ends_with("read") {
        // fill the volume first so reads hit data
        let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i % 253) as u8 | 1).collect();
        for off in (0..size).step_by(1 << 20) {
            vol.write(off, &chunk)?;
        }
        pool.checkpoint()?;
    }
    let blocks = size / bs;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut ops = 0u64;
    let mut seq_block = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let block = if workload.starts_with("rand") {
                rng.random_range(0..blocks)
            } else {
                seq_block = (seq_block + 1) % blocks;
                seq_block
            };
            if workload.ends_with("write") {
                buf[0] = buf[0].wrapping_add(1) | 1;
                vol.write(block * bs, &buf)?;
                if flush_every > 0 && (ops + 1) % flush_every == 0 {
                    vol.flush()?;
                }
            } else {
                vol.read(block * bs, &mut buf)?;
            }
            ops += 1;
        }
    }
    if workload.ends_with("write") {
        vol.flush()?;
    }
    let secs = start.elapsed().as_secs_f64();
    let stats = pool.stats();
    println!(
        "{{\"workload\":\"{workload}\",\"device\":\"{kind}\",\"bs\":{bs},\"flush_every\":{flush_every},\"ops\":{ops},\"seconds\":{secs:.3},\"iops\":{:.0},\"mbps\":{:.1},\"device_blocks_written\":{}}}",
        ops as f64 / secs,
        (ops * bs) as f64 / secs / 1e6,
        stats.blocks_written
    );
    drop(pool);
    // (--keep: the caller deletes it later; on a file system mounted with `discard`, deleting gigabytes makes the
    // virtual disk slow for a while, which would land on the next run)
    if arg(args, "--existing").is_none() && !args.iter().any(|a| a == "--keep") {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

fn recovery(args: &[String]) -> Result<()> {
    let path = PathBuf::from(arg(args, "--path").context("--path")?);
    let gib = num(args, "--gib", 1)?;
    let size = gib << 30;
    let opts = PoolOptions { checkpoint_interval_bytes: u64::MAX / 2, ..PoolOptions::default() };
    let dev = device(&path, size * 2 + (256 << 20), "file")?;
    let pool = Pool::create(dev, opts.clone())?;
    let vol = pool.create_volume("v", size)?;
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    for off in (0..size).step_by(1 << 20) {
        vol.write(off, &chunk)?;
    }
    vol.flush()?;
    let generation_before = pool.stats().generation;
    drop(pool); // no close, no checkpoint: the next open replays everything
    let start = Instant::now();
    let pool = Pool::open_file(&path, opts)?;
    let secs = start.elapsed().as_secs_f64();
    let stats = pool.stats();
    let mut back = vec![0u8; 1 << 20];
    pool.volume("v")?.read(size - (1 << 20), &mut back)?;
    if back != chunk {
        bail!("data after recovery differs");
    }
    println!(
        "{{\"gib_since_checkpoint\":{gib},\"generation_before\":{generation_before},\"replayed_records\":{},\"open_seconds\":{secs:.3}}}",
        stats.replayed_records
    );
    drop(pool);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn idle_memory(args: &[String]) -> Result<()> {
    let path = PathBuf::from(arg(args, "--path").context("--path")?);
    let n = num(args, "--volumes", 10_000)?;
    let empty_path = path.with_extension("empty");
    for (p, count) in [(&path, n), (&empty_path, 0)] {
        let pool = Pool::create(device(p, 2 << 30, "file")?, PoolOptions::default())?;
        let block = vec![7u8; 4096];
        for i in 0..count {
            let v = pool.create_volume(&format!("ns/volume-{i:06}"), 10 << 30)?;
            v.write((i % 1000) * 4096, &block)?;
        }
        pool.close()?;
    }
    // Each open runs in a fresh process, so the creation above and the allocator's reuse do not blur the figure.
    let rss_of = |p: &PathBuf| -> Result<u64> {
        let out = std::process::Command::new(std::env::current_exe()?).arg("open-rss").arg(p).output()?;
        if !out.status.success() {
            bail!("open-rss failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    let full = rss_of(&path)?;
    let empty = rss_of(&empty_path)?;
    let delta = full.saturating_sub(empty);
    println!(
        "{{\"volumes\":{n},\"rss_delta_bytes\":{delta},\"bytes_per_idle_volume\":{:.0}}}",
        delta as f64 / n.max(1) as f64
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&empty_path);
    Ok(())
}

/// Open a pool and print the resident memory after a read of every volume's size (volumes listed, none read).
fn open_rss(args: &[String]) -> Result<()> {
    let path = PathBuf::from(args.get(1).context("path")?);
    let pool = Pool::open_file(&path, PoolOptions::default())?;
    let n = pool.volumes().len();
    let rss = rss_bytes()?;
    drop(pool);
    eprintln!("{n} volumes");
    println!("{rss}");
    Ok(())
}

/// 4K random ops on `vol` for `seconds`; returns ops per second.
fn rand_ops(vol: &blockmesh_engine::Volume, size: u64, seconds: f64, write: bool, seed: u64) -> Result<f64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0x5au8; 4096];
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..64 {
            let off = rng.random_range(0..size / 4096) * 4096;
            if write {
                buf[0] = buf[0].wrapping_add(1) | 1;
                vol.write(off, &buf)?;
            } else {
                vol.read(off, &mut buf)?;
            }
            ops += 1;
        }
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

/// A new volume of `bytes` written whole with `chunk` (1 MiB) at each MiB.
fn written_whole(pool: &Pool, name: &str, bytes: u64, chunk: &[u8]) -> Result<blockmesh_engine::Volume> {
    let v = pool.create_volume(name, bytes)?;
    for off in (0..bytes).step_by(1 << 20) {
        v.write(off, chunk)?;
    }
    Ok(v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Snapshot and diff costs (issue #3's benchmarks).
fn versioning(args: &[String]) -> Result<()> {
    let path = PathBuf::from(arg(args, "--path").context("--path")?);
    let gib = num(args, "--gib", 10)?;
    let secs = num(args, "--seconds", 3)? as f64;
    let size = gib << 30;
    let mut opts = PoolOptions::default();
    if let Some(mib) = arg(args, "--checkpoint-mib") {
        opts.checkpoint_interval_bytes = mib.parse::<u64>()? << 20;
    }
    let pool = Pool::create(device(&path, size * 2 + (8 << 30), "file")?, opts)?;
    let vol = pool.create_volume("v", size)?;
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    let mut snap_1g = Vec::new();
    let mut snap_full = Vec::new();
    let mut n = 0u32;
    for off in (0..size).step_by(1 << 20) {
        vol.write(off, &chunk)?;
        let written = off + (1 << 20);
        if written == (1 << 30) || written == size {
            for _ in 0..20 {
                vol.write(rand::random_range(0..size / 4096) * 4096, &chunk[..4096])?;
                let t = Instant::now();
                pool.snapshot(&[("v", &format!("s{n}"))])?;
                let us = t.elapsed().as_secs_f64() * 1e6;
                if written == (1 << 30) {
                    snap_1g.push(us)
                } else {
                    snap_full.push(us)
                }
                pool.delete_snapshot(&format!("s{n}"))?;
                n += 1;
            }
        }
    }
    vol.flush()?;
    // diff of 1 MiB changed: contiguous, then scattered over the volume
    pool.snapshot(&[("v", "base")])?;
    vol.write(size / 2, &chunk)?;
    pool.snapshot(&[("v", "contiguous")])?;
    let mut rng = SmallRng::seed_from_u64(9);
    for _ in 0..256 {
        vol.write(rng.random_range(0..size / 4096) * 4096, &chunk[..4096])?;
    }
    pool.snapshot(&[("v", "scattered")])?;
    let time_diff = |a: &str, b: &str| -> Result<(f64, u64)> {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let d = pool.diff(a, b)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            bytes = d.iter().map(|e| e.len_bytes).sum();
        }
        Ok((median(times), bytes))
    };
    let (diff_contig_ms, contig_bytes) = time_diff("base", "contiguous")?;
    let (diff_scatter_ms, scatter_bytes) = time_diff("contiguous", "scattered")?;
    // Both comparisons below run the two sides alternately, ROUNDS times each, and compare the medians, so drift in
    // the machine (writeback, page cache, other load) hits both alike; one run measured the sides one after the
    // other and drifted by up to +-30%.
    const ROUNDS: usize = 10;
    let round_secs = secs / ROUNDS as f64;
    // 4K random writes with no snapshot against right after one: two fresh 1 GiB volumes written whole; `w1` never
    // has a snapshot, `w2` takes a new one before each of its rounds, so each of its rounds starts right after it.
    let [w1, w2] = ["w1", "w2"].map(|name| written_whole(&pool, name, 1 << 30, &chunk));
    let (w1, w2) = (w1?, w2?);
    let (mut before_iops, mut after_iops) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // each round starts from a clean checkpoint, so neither side pays for the other's dirty metadata
        pool.checkpoint()?;
        before_iops.push(rand_ops(&w1, 1 << 30, round_secs, true, 1 + round as u64)?);
        pool.checkpoint()?;
        if round > 0 {
            pool.delete_snapshot(&format!("ws{}", round - 1))?;
        }
        pool.snapshot(&[("w2", &format!("ws{round}"))])?;
        after_iops.push(rand_ops(&w2, 1 << 30, round_secs, true, 1 + round as u64)?);
    }
    let (before, after) = (median(before_iops), median(after_iops));
    pool.delete_volume("w1")?;
    pool.delete_volume("w2")?;
    // 4K random reads at the head of 32 snapshots against no history. Both volumes get the same writes (written whole,
    // then 32 rounds of 2048 random 4K overwrites from the same seed), so their data lies alike in the log; only `r`
    // takes a snapshot before each round.
    let [plain, r] = ["p", "r"].map(|name| written_whole(&pool, name, 1 << 30, &chunk));
    let (plain, r) = (plain?, r?);
    for (history, v) in [(false, &plain), (true, &r)] {
        let mut rng = SmallRng::seed_from_u64(11);
        for i in 0..32 {
            if history {
                pool.snapshot(&[("r", &format!("r{i}"))])?;
            }
            for _ in 0..2048 {
                v.write(rng.random_range(0..(1u64 << 30) / 4096) * 4096, &chunk[..4096])?;
            }
        }
    }
    pool.checkpoint()?;
    let (mut plain_iops, mut chain_iops) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let seed = 3 + round as u64;
        plain_iops.push(rand_ops(&plain, 1 << 30, round_secs, false, seed)?);
        chain_iops.push(rand_ops(&r, 1 << 30, round_secs, false, seed)?);
    }
    let (reads_plain, reads_chain) = (median(plain_iops), median(chain_iops));
    println!(
        "{{\"gib\":{gib},\"snapshot_us_at_1gib_median\":{:.1},\"snapshot_us_at_1gib_max\":{:.1},\"snapshot_us_at_full_median\":{:.1},\"snapshot_us_at_full_max\":{:.1},\"diff_1mib_contiguous_ms\":{diff_contig_ms:.3},\"diff_contiguous_bytes\":{contig_bytes},\"diff_1mib_scattered_ms\":{diff_scatter_ms:.3},\"diff_scattered_bytes\":{scatter_bytes},\"randwrite_before_iops\":{before:.0},\"randwrite_after_snapshot_iops\":{after:.0},\"randread_no_history_iops\":{reads_plain:.0},\"randread_32_snapshots_iops\":{reads_chain:.0}}}",
        median(snap_1g.clone()),
        snap_1g.iter().cloned().fold(0.0, f64::max),
        median(snap_full.clone()),
        snap_full.iter().cloned().fold(0.0, f64::max),
    );
    drop(pool);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Send/receive figures (issue #3): incremental send of 1 MiB changed in a large dot, and full send + receive
/// throughput against `cp --sparse=always` of a raw file of the same size, in the same run.
fn streams(args: &[String]) -> Result<()> {
    use blockmesh_engine::{CommitRequest, DEFAULT_SUBDOT};
    let path = PathBuf::from(arg(args, "--path").context("--path")?);
    let big_gib = num(args, "--gib", 10)?;
    let full_gib = num(args, "--full-gib", 2)?;
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    let req = |m: &str| CommitRequest { message: m.into(), ..Default::default() };

    // incremental: 1 MiB changed (256 scattered 4K blocks) in a big dot
    let size = big_gib << 30;
    let pool = Pool::create(device(&path, size + (2 << 30), "file")?, PoolOptions::default())?;
    pool.create_dot("bench/big", &[(DEFAULT_SUBDOT, size)])?;
    let v = pool.dot_volume("bench/big", None)?;
    for off in (0..size).step_by(1 << 20) {
        v.write(off, &chunk)?;
    }
    let c1 = pool.commit("bench/big", req("base"))?;
    let mut rng = SmallRng::seed_from_u64(5);
    for _ in 0..256 {
        v.write(rng.random_range(0..size / 4096) * 4096, &chunk[..4096])?;
    }
    let c2 = pool.commit("bench/big", req("1 MiB later"))?;
    let mut times = Vec::new();
    let mut inc_bytes = 0;
    for _ in 0..5 {
        let mut sink = Vec::with_capacity(2 << 20);
        let t = Instant::now();
        let st = pool.send("bench/big", c2, Some(c1), &mut sink)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        inc_bytes = st.stream_bytes;
    }
    let inc_ms = median(times);
    drop(pool);
    let _ = std::fs::remove_file(&path);

    // full: send a dot of full_gib to a file, receive it into a second pool; cp --sparse of a raw file as anchor
    let size = full_gib << 30;
    let pool = Pool::create(device(&path, size + (1 << 30), "file")?, PoolOptions::default())?;
    pool.create_dot("bench/full", &[(DEFAULT_SUBDOT, size)])?;
    let v = pool.dot_volume("bench/full", None)?;
    for off in (0..size).step_by(1 << 20) {
        v.write(off, &chunk)?;
    }
    let c = pool.commit("bench/full", req("full"))?;
    pool.flush()?;
    let stream_path = path.with_extension("stream");
    let t = Instant::now();
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&stream_path)?);
    let sent = pool.send("bench/full", c, None, &mut f)?;
    drop(f);
    let send_s = t.elapsed().as_secs_f64();
    let recv_path = path.with_extension("recv");
    let dst = Pool::create(device(&recv_path, size + (1 << 30), "file")?, PoolOptions::default())?;
    let t = Instant::now();
    let mut r = std::io::BufReader::with_capacity(4 << 20, std::fs::File::open(&stream_path)?);
    dst.receive(&mut r)?;
    dst.flush()?;
    let recv_s = t.elapsed().as_secs_f64();
    drop(dst);
    drop(pool);
    // the anchor: a raw file of the same size, written whole, copied with cp --sparse=always (and synced)
    let raw = path.with_extension("raw");
    {
        let mut w = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&raw)?);
        for _ in 0..(size >> 20) {
            w.write_all(&chunk)?;
        }
    }
    let copy = path.with_extension("raw-copy");
    let t = Instant::now();
    let st = std::process::Command::new("cp").arg("--sparse=always").arg(&raw).arg(&copy).status()?;
    let st2 = std::process::Command::new("sync").arg(&copy).status()?;
    if !st.success() || !st2.success() {
        bail!("cp failed");
    }
    let cp_s = t.elapsed().as_secs_f64();
    for p in [&path, &stream_path, &recv_path, &raw, &copy] {
        let _ = std::fs::remove_file(p);
    }
    let mbps = |s: f64| size as f64 / s / 1e6;
    println!(
        "{{\"incremental_dot_gib\":{big_gib},\"incremental_send_1mib_ms\":{inc_ms:.2},\"incremental_stream_bytes\":{inc_bytes},\"full_gib\":{full_gib},\"full_stream_bytes\":{},\"send_mbps\":{:.0},\"receive_mbps\":{:.0},\"cp_sparse_mbps\":{:.0}}}",
        sent.stream_bytes,
        mbps(send_s),
        mbps(recv_s),
        mbps(cp_s)
    );
    Ok(())
}

/// 4K random writes on a 1 GiB volume before and after a snapshot, `--seconds` each (for profiling one phase,
/// `--phase before|after` writes only there after the setup).
fn snapwrite(args: &[String]) -> Result<()> {
    let path = PathBuf::from(arg(args, "--path").context("--path")?);
    let secs = num(args, "--seconds", 5)? as f64;
    let phase = arg(args, "--phase").unwrap_or_default();
    let dev: Arc<dyn Device> = match arg(args, "--existing") {
        Some(f) => Arc::new(FileDevice::open(&PathBuf::from(f))?),
        None => device(&path, 16 << 30, "file")?,
    };
    let pool = Pool::create(dev, PoolOptions::default())?;
    let w = pool.create_volume("w", 1 << 30)?;
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    for off in (0..(1u64 << 30)).step_by(1 << 20) {
        w.write(off, &chunk)?;
    }
    pool.checkpoint()?;
    let g0 = pool.stats();
    let before = if phase == "after" { 0.0 } else { rand_ops(&w, 1 << 30, secs, true, 1)? };
    let g1 = pool.stats();
    pool.checkpoint()?;
    pool.snapshot(&[("w", "w0")])?;
    let g2 = pool.stats();
    let after = if phase == "before" { 0.0 } else { rand_ops(&w, 1 << 30, secs, true, 2)? };
    let g3 = pool.stats();
    println!(
        "{{\"before\":{before:.0},\"after\":{after:.0},\"checkpoints_before\":{},\"checkpoints_after\":{},\"blocks_written_before\":{},\"blocks_written_after\":{}}}",
        g1.generation - g0.generation,
        g3.generation - g2.generation,
        g1.blocks_written - g0.blocks_written,
        g3.blocks_written - g2.blocks_written
    );
    drop(pool);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Write amplification and IOPS of random overwrites in a pool kept at a given utilization (issue #6).
fn cleaning(args: &[String]) -> Result<()> {
    let path = PathBuf::from(arg(args, "--path").context("--path")?);
    let pool_mib = num(args, "--pool-mib", 2048)?;
    let util: f64 = arg(args, "--util").unwrap_or_else(|| "0.8".into()).parse()?;
    let commits = num(args, "--commits", 0)? as usize;
    let passes = num(args, "--passes", 1)?;
    let seg = blockmesh_engine::DEFAULT_SEGMENT_SIZE_BYTES;
    // the anchor: the same pool and volume, empty, written at random for half a volume-size (no cleaning needed)
    let anchor = args.iter().any(|a| a == "--anchor");
    let (pool_bytes, vol_bytes) = {
        let pool_bytes = pool_mib << 20;
        // the data space: segments less the checkpoint reserve (twice the dirty-metadata bound and two segments)
        let reserve = 2 * (blockmesh_engine::MAX_DIRTY_METADATA_BLOCKS * 4096) + 2 * seg;
        let data = pool_bytes - reserve;
        // rolling commits hold about 0.4 of a volume more (the blocks overwritten within their window)
        let share = if commits > 0 { util / 1.7 } else { util };
        (pool_bytes, (((data as f64 * share) as u64) / (1 << 20)) << 20)
    };
    // over an existing, written file (as a pool in service is): the file system allocates nothing during the run
    let dev: Arc<dyn Device> = match arg(args, "--existing") {
        Some(f) => Arc::new(FileDevice::open(&PathBuf::from(f))?),
        None => device(&path, pool_bytes, "file")?,
    };
    if dev.size_bytes() < pool_bytes {
        bail!("the device has {} bytes, the pool needs {pool_bytes}", dev.size_bytes());
    }
    // `--idle-ms N`: after the warm-up, no writes for N ms, then a burst of 1/16 volume-size measured instead
    // (`--background 0` turns the background cleaner off)
    let idle_ms = arg(args, "--idle-ms").map(|v| v.parse::<u64>()).transpose()?;
    let background = num(args, "--background", 1)? != 0;
    let pool = Pool::create(dev, PoolOptions { background_cleaning: background, ..PoolOptions::default() })?;
    let vol = pool.create_volume("v", vol_bytes)?;
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    if !anchor {
        for off in (0..vol_bytes).step_by(1 << 20) {
            vol.write(off, &chunk)?;
        }
        vol.flush()?;
    }
    let blocks = vol_bytes / 4096;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut buf: Vec<u8> = (0..4096).map(|i| (i % 249) as u8 | 1).collect();
    let window = (blocks / 2 / commits.max(1) as u64).max(1);
    let mut held: std::collections::VecDeque<String> = Default::default();
    let mut n_commit = 0u64;
    let mut phase = |writes: u64| -> Result<(u64, f64, u64)> {
        let s0 = pool.stats();
        let before = s0.blocks_written;
        let start = Instant::now();
        for i in 0..writes {
            buf[0] = buf[0].wrapping_add(1) | 1;
            vol.write(rng.random_range(0..blocks) * 4096, &buf)?;
            if commits > 0 && i % window == window - 1 {
                let name = format!("v@{n_commit}");
                n_commit += 1;
                pool.snapshot(&[("v", &name)])?;
                held.push_back(name);
                if held.len() > commits {
                    if let Some(old) = held.pop_front() {
                        pool.delete_snapshot(&old)?;
                    }
                }
            }
        }
        vol.flush()?;
        let s1 = pool.stats();
        eprintln!(
            "phase: {} checkpoints, {} cleaning passes, {} blocks moved, {} device blocks",
            s1.checkpoints - s0.checkpoints,
            s1.clean_passes - s0.clean_passes,
            s1.cleaned_blocks - s0.cleaned_blocks,
            s1.blocks_written - before
        );
        Ok((s1.blocks_written - before, start.elapsed().as_secs_f64(), s1.cleaned_blocks - s0.cleaned_blocks))
    };
    let measured = if anchor {
        blocks / 2
    } else {
        phase(blocks)?; // warm-up: every block overwritten about once, the cleaner in its steady state
        match idle_ms {
            Some(ms) => {
                let before = pool.stats();
                std::thread::sleep(Duration::from_millis(ms));
                let after = pool.stats();
                eprintln!(
                    "idle {ms} ms: free segments {} -> {} (level {}; of them waiting for a sync {} -> {}), {} background \
                     steps, {} checkpoints",
                    before.free_segments,
                    after.free_segments,
                    after.clean_target_free_segments,
                    before.emptied_segments,
                    after.emptied_segments,
                    after.background_clean_steps - before.background_clean_steps,
                    after.checkpoints - before.checkpoints
                );
                blocks / 16
            }
            None => blocks * passes,
        }
    };
    let (device_blocks, secs, moved) = phase(measured)?;
    let st = pool.stats();
    let data_blocks = (st.segments * st.segment_size_bytes) / 4096;
    println!(
        "{{\"pool_mib\":{},\"target_util\":{util},\"commits\":{commits},\"volume_mib\":{},\"live_util\":{:.3},\"client_blocks\":{measured},\"device_blocks\":{device_blocks},\"wa\":{:.3},\"moved_per_client_block\":{:.3},\"iops\":{:.0},\"seconds\":{secs:.2},\"idle_ms\":{},\"background\":{background}}}",
        pool_bytes >> 20,
        vol_bytes >> 20,
        st.live_blocks as f64 / data_blocks as f64,
        device_blocks as f64 / measured as f64,
        moved as f64 / measured as f64,
        measured as f64 / secs,
        idle_ms.map_or("null".to_string(), |m| m.to_string()),
    );
    drop(pool);
    if arg(args, "--existing").is_none() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("io") => io(&args),
        Some("recovery") => recovery(&args),
        Some("idle-memory") => idle_memory(&args),
        Some("open-rss") => open_rss(&args),
        Some("versioning") => versioning(&args),
        Some("streams") => streams(&args),
        Some("snapwrite") => snapwrite(&args),
        Some("cleaning") => cleaning(&args),
        _ => bail!("usage: engine-bench io|recovery|idle-memory ... (see the source header)"),
    }
}
