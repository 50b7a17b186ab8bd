//! Shared by the engine's integration tests: a reference model of a pool, and helpers.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Pool, PoolOptions};

pub const BS: u64 = 4096;

/// Small segments and frequent checkpoints, so tests exercise segment switches, reuse and checkpoints. Log writes
/// happen in the calling thread, so I/O numbering (for power cuts) is the same on every run.
pub fn small_opts(pool_id: u64) -> PoolOptions {
    PoolOptions {
        segment_size_bytes: 128 << 10,
        checkpoint_interval_bytes: 512 << 10,
        pool_id: Some(pool_id),
        log_writer_threads: 0,
        background_cleaning: false,
        uncached_write_min_bytes: blockmesh_engine::DEFAULT_UNCACHED_WRITE_MIN_BYTES,
    }
}

/// As [`small_opts`], with background log writers.
pub fn threaded_opts(pool_id: u64) -> PoolOptions {
    PoolOptions { log_writer_threads: 2, ..small_opts(pool_id) }
}

pub fn sim_pool(size_bytes: u64, pool_id: u64) -> (Arc<SimDevice>, Pool) {
    let dev = SimDevice::new(size_bytes);
    let pool = Pool::create(dev.clone(), small_opts(pool_id)).unwrap();
    (dev, pool)
}

/// Close `pool`, open its device again with [`small_opts`]`(id)`, and check it: the end of every storage test.
pub fn reopen_checked(dev: Arc<SimDevice>, pool: Pool, id: u64) -> Pool {
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(id)).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    pool
}

/// Deterministic bytes for a write: `len` bytes from a seed (never all zero).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// One atomic step of the engine's log, as the model sees it.
#[derive(Debug, Clone)]
pub enum Step {
    SetBlock {
        vol: String,
        block: u64,
        data: Vec<u8>,
    },
    ZeroBlocks {
        vol: String,
        start: u64,
        count: u64,
    },
    Create {
        vol: String,
        size: u64,
    },
    Resize {
        vol: String,
        size: u64,
    },
    Delete {
        vol: String,
    },
    /// Atomic snapshot of several volumes: (volume, snapshot name).
    Snapshot {
        pairs: Vec<(String, String)>,
    },
    Clone {
        snap: String,
        vol: String,
    },
    DeleteSnapshot {
        snap: String,
    },
}

/// Volumes and their bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct State {
    pub vols: BTreeMap<String, Vec<u8>>,
    pub snaps: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Sizes and a digest only: a whole volume in a panic message helps nobody.
        let summary: Vec<String> = self
            .vols
            .iter()
            .chain(self.snaps.iter())
            .map(|(k, v)| format!("{k}: {} bytes, {} non-zero", v.len(), v.iter().filter(|&&b| b != 0).count()))
            .collect();
        write!(f, "State {{ {} }}", summary.join(", "))
    }
}

/// Where two states differ first, in words; `None` when they are equal.
pub fn first_difference(actual: &State, expected: &State) -> Option<String> {
    let names_a: Vec<&String> = actual.vols.keys().collect();
    let names_e: Vec<&String> = expected.vols.keys().collect();
    if names_a != names_e {
        return Some(format!("volumes {names_a:?}, expected {names_e:?}"));
    }
    let snaps_a: Vec<&String> = actual.snaps.keys().collect();
    let snaps_e: Vec<&String> = expected.snaps.keys().collect();
    if snaps_a != snaps_e {
        return Some(format!("snapshots {snaps_a:?}, expected {snaps_e:?}"));
    }
    for (name, a) in actual.vols.iter().chain(actual.snaps.iter()) {
        let e = expected.vols.get(name).or_else(|| expected.snaps.get(name)).unwrap();
        if a.len() != e.len() {
            return Some(format!("{name}: {} bytes, expected {}", a.len(), e.len()));
        }
        if let Some(i) = a.iter().zip(e).position(|(x, y)| x != y) {
            return Some(format!(
                "{name}: first difference at byte {i} (block {}): {} vs expected {}",
                i / 4096,
                a[i],
                e[i]
            ));
        }
    }
    None
}

/// Panic with the first difference when the states differ.
#[track_caller]
pub fn assert_same(actual: &State, expected: &State, context: &str) {
    if let Some(d) = first_difference(actual, expected) {
        panic!("{context}: {d}");
    }
}

impl State {
    pub fn apply(&mut self, step: &Step) {
        match step {
            Step::SetBlock { vol, block, data } => {
                let v = self.vols.get_mut(vol).unwrap();
                let start = (*block * BS) as usize;
                let end = (start + BS as usize).min(v.len());
                v[start..end].copy_from_slice(&data[..end - start]);
            }
            Step::ZeroBlocks { vol, start, count } => {
                let v = self.vols.get_mut(vol).unwrap();
                let s = (*start * BS) as usize;
                let e = (((*start + *count) * BS) as usize).min(v.len());
                v[s..e].fill(0);
            }
            Step::Create { vol, size } => {
                self.vols.insert(vol.clone(), vec![0; *size as usize]);
            }
            Step::Resize { vol, size } => self.vols.get_mut(vol).unwrap().resize(*size as usize, 0),
            Step::Delete { vol } => {
                self.vols.remove(vol);
            }
            Step::Snapshot { pairs } => {
                for (vol, snap) in pairs {
                    let bytes = self.vols[vol].clone();
                    self.snaps.insert(snap.clone(), bytes);
                }
            }
            Step::Clone { snap, vol } => {
                let bytes = self.snaps[snap].clone();
                self.vols.insert(vol.clone(), bytes);
            }
            Step::DeleteSnapshot { snap } => {
                self.snaps.remove(snap);
            }
        }
    }

    /// Does the name belong to a volume or a snapshot?
    pub fn has_name(&self, name: &str) -> bool {
        self.vols.contains_key(name) || self.snaps.contains_key(name)
    }

    /// Read the whole state of a pool.
    pub fn of_pool(pool: &Pool) -> State {
        let mut vols = BTreeMap::new();
        for info in pool.volumes() {
            let vol = pool.volume(&info.name).unwrap();
            let mut bytes = vec![0u8; info.size_bytes as usize];
            for chunk_start in (0..bytes.len()).step_by(1 << 20) {
                let end = (chunk_start + (1 << 20)).min(bytes.len());
                vol.read(chunk_start as u64, &mut bytes[chunk_start..end]).unwrap();
            }
            vols.insert(info.name, bytes);
        }
        let mut snaps = BTreeMap::new();
        for info in pool.snapshots() {
            let vol = pool.snapshot_volume(&info.name).unwrap();
            let mut bytes = vec![0u8; info.size_bytes as usize];
            for chunk_start in (0..bytes.len()).step_by(1 << 20) {
                let end = (chunk_start + (1 << 20)).min(bytes.len());
                vol.read(chunk_start as u64, &mut bytes[chunk_start..end]).unwrap();
            }
            snaps.insert(info.name, bytes);
        }
        State { vols, snaps }
    }
}

/// The model: a durable base, the steps since the last flush, and the current state.
#[derive(Debug, Default)]
pub struct Model {
    /// State as of the last completed flush.
    pub durable: State,
    /// Steps since then, in log order.
    pub steps: Vec<Step>,
    /// State after every step.
    pub current: State,
}

impl Model {
    fn push(&mut self, step: Step) {
        self.current.apply(&step);
        self.steps.push(step);
    }

    /// Everything so far is durable.
    pub fn flushed(&mut self) {
        self.durable = self.current.clone();
        self.steps.clear();
    }

    fn block_of(&self, vol: &str, block: u64) -> Vec<u8> {
        let v = &self.current.vols[vol];
        let mut out = vec![0u8; BS as usize];
        let s = (block * BS) as usize;
        let e = (s + BS as usize).min(v.len());
        out[..e - s].copy_from_slice(&v[s..e]);
        out
    }

    pub fn write(&mut self, vol: &str, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        for b in offset / BS..=(end - 1) / BS {
            let mut block = self.block_of(vol, b);
            let lo = offset.max(b * BS);
            let hi = end.min((b + 1) * BS);
            block[(lo - b * BS) as usize..(hi - b * BS) as usize]
                .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
            self.push(Step::SetBlock { vol: vol.into(), block: b, data: block });
        }
    }

    fn zero_partial(&mut self, vol: &str, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let b = from / BS;
        let mut block = self.block_of(vol, b);
        block[(from - b * BS) as usize..(to - b * BS) as usize].fill(0);
        self.push(Step::SetBlock { vol: vol.into(), block: b, data: block });
    }

    pub fn write_zeroes(&mut self, vol: &str, offset: u64, len: u64) {
        let end = offset + len;
        let lo = offset.div_ceil(BS);
        let hi = end / BS;
        if lo > hi {
            self.zero_partial(vol, offset, end);
        } else {
            self.zero_partial(vol, offset, (lo * BS).min(end));
            self.zero_partial(vol, (hi * BS).max(offset), end);
        }
        if hi > lo {
            self.push(Step::ZeroBlocks { vol: vol.into(), start: lo, count: hi - lo });
        }
    }

    pub fn trim(&mut self, vol: &str, offset: u64, len: u64) {
        let lo = offset.div_ceil(BS);
        let hi = (offset + len) / BS;
        if hi > lo {
            self.push(Step::ZeroBlocks { vol: vol.into(), start: lo, count: hi - lo });
        }
    }

    pub fn create(&mut self, vol: &str, size: u64) {
        self.push(Step::Create { vol: vol.into(), size });
    }

    pub fn resize(&mut self, vol: &str, size: u64) {
        let old = self.current.vols[vol].len() as u64;
        if size < old && size % BS != 0 {
            let keep_end = size.div_ceil(BS) * BS;
            self.zero_partial(vol, size, old.min(keep_end));
        }
        self.push(Step::Resize { vol: vol.into(), size });
    }

    pub fn delete(&mut self, vol: &str) {
        self.push(Step::Delete { vol: vol.into() });
    }

    pub fn snapshot(&mut self, pairs: &[(&str, &str)]) {
        self.push(Step::Snapshot { pairs: pairs.iter().map(|(v, s)| (v.to_string(), s.to_string())).collect() });
    }

    pub fn clone_snapshot(&mut self, snap: &str, vol: &str) {
        self.push(Step::Clone { snap: snap.into(), vol: vol.into() });
    }

    pub fn delete_snapshot(&mut self, snap: &str) {
        self.push(Step::DeleteSnapshot { snap: snap.into() });
    }

    /// After a crash: the recovered pool must hold the durable state plus a prefix of the later steps. Returns how
    /// many later steps it kept, and makes that state the model's (durable: open ends with a checkpoint).
    pub fn recovered(&mut self, pool: &Pool) -> usize {
        let actual = State::of_pool(pool);
        let mut candidate = self.durable.clone();
        for k in 0..=self.steps.len() {
            if candidate == actual {
                self.current = actual;
                self.flushed();
                return k;
            }
            if k < self.steps.len() {
                candidate.apply(&self.steps[k]);
            }
        }
        panic!(
            "recovered state matches no allowed prefix: durable {:?}, {} later steps, recovered {:?}",
            self.durable,
            self.steps.len(),
            actual
        );
    }
}

/// Whether this process may pin `bytes` of memory (io_uring's registered buffers count against it): it has
/// CAP_IPC_LOCK (root has), or its RLIMIT_MEMLOCK allows them.
pub fn may_pin_bytes(bytes: u64) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_ipc_lock = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let limit_allows = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .is_some_and(|soft| soft == "unlimited" || soft.parse::<u64>().is_ok_and(|b| b >= bytes));
    cap_ipc_lock || limit_allows
}
