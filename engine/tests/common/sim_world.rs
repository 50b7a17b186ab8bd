//! The whole-system simulator's world (used by `engine/tests/simulator.rs`): one seed drives a random mix of volume,
//! snapshot and dot operations, flushes, checkpoints, cleaning, clean reopens, crashes, power cuts and failing I/O
//! against a pool on the simulated device, checked against a reference model after every reopen; a final phase
//! plants latent corruption (bit flips, a misdirected write) and asserts that it is reported, never returned as data.
//!
//! Everything random comes from the seed (one `SmallRng`; the device's crash images take seeds drawn from it; commit
//! ids and times are given), the log is written in the calling thread, and no clock is read, so a seed replays the
//! same operations, I/Os and outcomes every time. Every operation and its outcome is folded into a blake3 trace hash.
//!
//! The model: volumes and snapshots are [`Model`]'s business (its `current` state and the steps its helpers split
//! writes into); the dot `sim/d` is modelled here (current branch, each branch's head bytes and head commit, each
//! commit's bytes and parents). Steps of both kinds go into one list in log order, so after a crash the pool must
//! equal the durable state plus a prefix of that list, exactly as `Model::recovered` requires for volumes alone.
//! Operations are generated valid for the model, so the only errors expected are the injected ones.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use blockmesh_engine::io::{SimDevice, SimFault};
use blockmesh_engine::{CommitId, CommitRequest, Error, Pool, PoolOptions, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::common::{first_difference, pattern, small_opts, Model, State, Step, BS};

/// Device size: 256 segments of 128 KiB, roomy enough that no operation runs out of space.
pub const POOL_BYTES: u64 = 32 << 20;
/// Where the segments start: latent faults stay out of the superblocks (whose damage `corruption.rs` covers).
const SEGMENT_AREA: u64 = 64 << 10;
const SECTOR: u64 = 512;
const DOT: &str = "sim/d";
const SUBDOTS: [(&str, u64); 2] = [("a", 64 << 10), ("b", 32 << 10)];
const BRANCHES: [&str; 4] = ["master", "x", "y", "z"];
const MAX_VOLUMES: usize = 5;
const MAX_SNAPSHOTS: usize = 4;
const MAX_COMMITS: usize = 10;
const MAX_VOLUME_SECTORS: u64 = 512;

/// What a run does besides the workload.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Random steps per seed (an operation, a reopen, a crash, a fault burst).
    pub steps: usize,
    /// Crashes, power cuts and failing I/O.
    pub faults: bool,
    /// A final phase with bit flips and a misdirected write, which must be reported.
    pub corruption: bool,
    /// Canary: the device's sync lies, so flushed writes can be lost; the run must fail.
    pub lying_sync: bool,
    /// Canary: a bit of a live data block flips at the end, unannounced; the run must fail.
    pub silent_flip: bool,
}

impl Config {
    /// The normal run.
    pub fn normal(steps: usize) -> Self {
        Config { steps, faults: true, corruption: true, lying_sync: false, silent_flip: false }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub seeds: u64,
    pub ops: u64,
    pub crashes: u64,
    pub power_cuts: u64,
    pub recovery_cuts: u64,
    pub io_errors: u64,
    pub reopens: u64,
    pub flushes: u64,
    pub unflushed_steps_dropped: u64,
    /// Latent faults injected (bit flips, misdirected writes).
    pub corruptions_injected: u64,
    /// Corruption phases with at least one latent fault whose damage was reported.
    pub corruptions_detected: u64,
    /// Corruption phases with latent faults that reported nothing and returned only correct data (the faults hit
    /// blocks nothing references any more).
    pub corruptions_harmless: u64,
    /// blake3 of the seeds' trace hashes, in order.
    pub trace: [u8; 32],
}

impl Figures {
    pub fn add(&mut self, o: &Figures) {
        self.seeds += o.seeds;
        self.ops += o.ops;
        self.crashes += o.crashes;
        self.power_cuts += o.power_cuts;
        self.recovery_cuts += o.recovery_cuts;
        self.io_errors += o.io_errors;
        self.reopens += o.reopens;
        self.flushes += o.flushes;
        self.unflushed_steps_dropped += o.unflushed_steps_dropped;
        self.corruptions_injected += o.corruptions_injected;
        self.corruptions_detected += o.corruptions_detected;
        self.corruptions_harmless += o.corruptions_harmless;
        let mut h = blake3::Hasher::new();
        h.update(&self.trace);
        h.update(&o.trace);
        self.trace = *h.finalize().as_bytes();
    }

    pub fn trace_hex(&self) -> String {
        self.trace[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "simulator: {} seeds, {} operations, {} crashes/power cuts ({} crashes, {} power cuts, {} during \
             recovery), {} injected I/O errors, {} corruptions detected ({} latent faults injected; {} corruption phases \
             read back correct data and reported nothing), 0 flushed writes lost, 0 undetected corruptions, {} reopens, {} flushes, {} unflushed steps dropped by crashes, trace hash {}",
            self.seeds,
            self.ops,
            self.crashes + self.power_cuts + self.recovery_cuts,
            self.crashes,
            self.power_cuts,
            self.recovery_cuts,
            self.io_errors,
            self.corruptions_detected,
            self.corruptions_injected,
            self.corruptions_harmless,
            self.reopens,
            self.flushes,
            self.unflushed_steps_dropped,
            self.trace_hex()
        )
    }
}

/// Run one seed; a failure (a model mismatch, a failed check, an unexpected error, a panic anywhere) comes back as
/// `Err` with the seed and the trace of the last operations.
pub fn run_seed(seed: u64, cfg: Config) -> std::result::Result<Figures, String> {
    let mut last_ops = Vec::new();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut w = World::new(seed, cfg);
        let r = catch_unwind(AssertUnwindSafe(|| w.run()));
        last_ops = w.recent.iter().cloned().collect();
        match r {
            Ok(()) => Ok(w.finish()),
            Err(p) => Err(p),
        }
    }));
    let msg = match r {
        Ok(Ok(f)) => return Ok(f),
        Ok(Err(p)) | Err(p) => panic_message(&*p),
    };
    Err(format!("seed {seed} failed: {msg}\n  last operations (oldest first):\n    {}", last_ops.join("\n    ")))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// The variant name of an error, for the trace.
pub fn kind(e: &Error) -> String {
    let d = format!("{e:?}");
    d.chars().take_while(|c| c.is_ascii_alphanumeric()).collect()
}

type Bytes = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct BranchModel {
    head: Option<CommitId>,
    bytes: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CommitModel {
    parents: Vec<CommitId>,
    bytes: Bytes,
}

/// The dot, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Dots {
    current: String,
    branches: BTreeMap<String, BranchModel>,
    commits: BTreeMap<CommitId, CommitModel>,
}

#[derive(Debug, Clone)]
enum DotStep {
    SetBlock { branch: String, sub: String, block: u64, data: Vec<u8> },
    Commit { id: CommitId },
    Branch { name: String, from: CommitId },
    Checkout { name: String },
    Reset { branch: String, to: CommitId },
    DeleteBranch { name: String },
    DeleteCommit { id: CommitId },
}

impl Dots {
    fn new() -> Self {
        let bytes: Bytes = SUBDOTS.iter().map(|(s, size)| (s.to_string(), vec![0u8; *size as usize])).collect();
        let mut branches = BTreeMap::new();
        branches.insert("master".to_string(), BranchModel { head: None, bytes });
        Dots { current: "master".into(), branches, commits: BTreeMap::new() }
    }

    fn apply(&mut self, s: &DotStep) {
        match s {
            DotStep::SetBlock { branch, sub, block, data } => {
                let v = self.branches.get_mut(branch).unwrap().bytes.get_mut(sub).unwrap();
                let at = (*block * BS) as usize;
                v[at..at + BS as usize].copy_from_slice(data);
            }
            DotStep::Commit { id } => {
                let b = self.branches.get_mut(&self.current).unwrap();
                let parents = b.head.into_iter().collect();
                self.commits.insert(*id, CommitModel { parents, bytes: b.bytes.clone() });
                b.head = Some(*id);
            }
            DotStep::Branch { name, from } => {
                let bytes = self.commits[from].bytes.clone();
                self.branches.insert(name.clone(), BranchModel { head: Some(*from), bytes });
            }
            DotStep::Checkout { name } => self.current = name.clone(),
            DotStep::Reset { branch, to } => {
                let bytes = self.commits[to].bytes.clone();
                self.branches.insert(branch.clone(), BranchModel { head: Some(*to), bytes });
            }
            DotStep::DeleteBranch { name } => {
                self.branches.remove(name);
            }
            DotStep::DeleteCommit { id } => {
                self.commits.remove(id);
            }
        }
    }

    /// Where two dot states differ first, in words.
    fn difference(&self, expected: &Dots) -> Option<String> {
        if self.current != expected.current {
            return Some(format!("current branch {}, expected {}", self.current, expected.current));
        }
        let names = |d: &Dots| d.branches.keys().cloned().collect::<Vec<_>>();
        if names(self) != names(expected) {
            return Some(format!("branches {:?}, expected {:?}", names(self), names(expected)));
        }
        for (n, b) in &self.branches {
            let e = &expected.branches[n];
            if b.head != e.head {
                return Some(format!("head of {n}: {:?}, expected {:?}", b.head, e.head));
            }
            for (sub, v) in &b.bytes {
                let ev = e.bytes.get(sub).map_or(&[][..], |x| &x[..]);
                if let Some(i) = v.iter().zip(ev).position(|(x, y)| x != y) {
                    let same_as: Vec<String> = expected
                        .commits
                        .iter()
                        .filter(|(_, c)| c.bytes == b.bytes)
                        .map(|(id, _)| id.to_string())
                        .collect();
                    return Some(format!(
                        "branch {n}, subdot {sub}: first difference at byte {i} (block {}); the branch's bytes equal \
                         those of commits {same_as:?}",
                        i / 4096
                    ));
                }
            }
        }
        let ids = |d: &Dots| d.commits.keys().map(|c| c.to_string()).collect::<Vec<_>>();
        if ids(self) != ids(expected) {
            return Some(format!("commits {:?}, expected {:?}", ids(self), ids(expected)));
        }
        for (id, c) in &self.commits {
            if *c != expected.commits[id] {
                return Some(format!("commit {id} differs (parents or bytes)"));
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
enum AnyStep {
    Vol(Step),
    Dot(DotStep),
}

/// Read every user volume and snapshot; errors come back instead of panicking.
fn read_state(pool: &Pool) -> Result<State> {
    let mut st = State::default();
    for info in pool.volumes() {
        let mut b = vec![0u8; info.size_bytes as usize];
        pool.volume(&info.name)?.read(0, &mut b)?;
        st.vols.insert(info.name, b);
    }
    for info in pool.snapshots() {
        let mut b = vec![0u8; info.size_bytes as usize];
        pool.snapshot_volume(&info.name)?.read(0, &mut b)?;
        st.snaps.insert(info.name, b);
    }
    Ok(st)
}

fn read_subdots(pool: &Pool, commit: Option<CommitId>) -> Result<Bytes> {
    let mut out = Bytes::new();
    for (s, size) in SUBDOTS {
        let v = match commit {
            Some(c) => pool.commit_volume(DOT, c, Some(s))?,
            None => pool.dot_volume(DOT, Some(s))?,
        };
        let mut b = vec![0u8; size as usize];
        v.read(0, &mut b)?;
        out.insert(s.to_string(), b);
    }
    Ok(out)
}

/// Read the dot: its commits, and every branch's heads (`all_branches`: by checking each out in turn and back,
/// then flushing, so the pool ends where it started) or only the current branch's (the others copied from
/// `others`).
fn read_dots(pool: &Pool, all_branches: bool, others: &Dots) -> Result<Dots> {
    let info = pool.dot(DOT)?;
    let mut d = Dots { current: info.current_branch.clone(), ..Dots::default() };
    let mut moved = false;
    for (b, head) in &info.branches {
        let bytes = if *b == info.current_branch && !moved {
            read_subdots(pool, None)?
        } else if all_branches {
            pool.checkout(DOT, b)?;
            moved = *b != info.current_branch;
            read_subdots(pool, None)?
        } else {
            match others.branches.get(b) {
                Some(m) => m.bytes.clone(),
                None => Bytes::new(),
            }
        };
        d.branches.insert(b.clone(), BranchModel { head: *head, bytes });
    }
    if moved {
        pool.checkout(DOT, &info.current_branch)?;
        pool.flush()?;
    }
    for c in pool.commits(DOT)? {
        let bytes = read_subdots(pool, Some(c.id))?;
        d.commits.insert(c.id, CommitModel { parents: c.parents.clone(), bytes });
    }
    Ok(d)
}

fn digest(st: &State, d: &Dots) -> String {
    let mut h = blake3::Hasher::new();
    for (n, b) in st.vols.iter().chain(st.snaps.iter()) {
        h.update(n.as_bytes());
        h.update(b);
    }
    for (n, b) in &d.branches {
        h.update(n.as_bytes());
        for v in b.bytes.values() {
            h.update(v);
        }
    }
    for (id, c) in &d.commits {
        h.update(&id.0);
        for v in c.bytes.values() {
            h.update(v);
        }
    }
    h.finalize().to_hex()[..16].to_string()
}

/// One seed's world: the device, the pool, the model, the trace.
pub struct World {
    seed: u64,
    cfg: Config,
    rng: SmallRng,
    dev: Arc<SimDevice>,
    pool: Option<Pool>,
    /// Volumes and snapshots: `vm.current` is the current state; its steps are moved into `steps` at once.
    vm: Model,
    durable_vols: State,
    dots: Dots,
    durable_dots: Dots,
    /// Steps since the last flush, in log order.
    steps: Vec<AnyStep>,
    /// Where the operation in progress started in `steps`.
    mark: usize,
    trace: blake3::Hasher,
    /// The last operations, for failure reports.
    pub recent: std::collections::VecDeque<String>,
    figs: Figures,
    names: u64,
    commits_made: u64,
    /// A fault is armed: errors are expected.
    armed: bool,
}

impl World {
    pub fn new(seed: u64, cfg: Config) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let dev = SimDevice::new(POOL_BYTES);
        let pool = Pool::create(dev.clone(), small_opts(rng.random())).unwrap();
        let mut w = World {
            seed,
            cfg,
            rng,
            dev,
            pool: Some(pool),
            vm: Model::default(),
            durable_vols: State::default(),
            dots: Dots::new(),
            durable_dots: Dots::new(),
            steps: Vec::new(),
            mark: 0,
            trace: blake3::Hasher::new(),
            recent: Default::default(),
            figs: Figures { seeds: 1, ..Figures::default() },
            names: 0,
            commits_made: 0,
            armed: false,
        };
        w.t(format!("seed {seed} {cfg:?}"));
        w.pool().create_dot(DOT, &SUBDOTS).unwrap();
        w.pool().flush().unwrap();
        if cfg.lying_sync {
            w.dev.set_lying_sync(true);
        }
        w
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("the pool is open")
    }

    /// Options for opening: the pool id in them only matters at creation (opening reads it from the superblock).
    fn opts(&self) -> PoolOptions {
        small_opts(0)
    }

    /// Fold an event into the trace (and keep it for failure reports).
    fn t(&mut self, s: String) {
        self.trace.update(s.as_bytes());
        self.trace.update(b"\n");
        if self.recent.len() == 40 {
            self.recent.pop_front();
        }
        self.recent.push_back(s);
    }

    fn t_res<T>(&mut self, what: &str, r: &Result<T>) {
        let s = match r {
            Ok(_) => format!("  {what}: ok"),
            Err(e) => format!("  {what}: {} ({e})", kind(e)),
        };
        self.t(s);
    }

    fn finish(mut self) -> Figures {
        self.figs.trace = *self.trace.finalize().as_bytes();
        let mut f = Figures::default();
        f.add(&self.figs);
        f
    }

    // ---- the model ----

    fn take_vol_steps(&mut self) {
        let new: Vec<Step> = self.vm.steps.drain(..).collect();
        self.steps.extend(new.into_iter().map(AnyStep::Vol));
    }

    fn push_dot(&mut self, s: DotStep) {
        self.dots.apply(&s);
        self.steps.push(AnyStep::Dot(s));
    }

    /// A flush completed: everything so far is durable.
    fn flushed(&mut self) {
        self.durable_vols = self.vm.current.clone();
        self.durable_dots = self.dots.clone();
        self.steps.clear();
    }

    /// A flush completed after the operation that started at `upto` failed: the steps before it are durable; the
    /// failed operation's remain possible.
    fn flushed_before(&mut self, upto: usize) {
        for s in self.steps.drain(..upto) {
            match s {
                AnyStep::Vol(v) => self.durable_vols.apply(&v),
                AnyStep::Dot(d) => self.durable_dots.apply(&d),
            }
        }
    }

    /// An operation was refused without changing anything: drop its steps.
    fn roll_back(&mut self, to: usize) {
        self.steps.truncate(to);
        self.vm.current = self.durable_vols.clone();
        self.dots = self.durable_dots.clone();
        for s in &self.steps {
            match s {
                AnyStep::Vol(v) => self.vm.current.apply(v),
                AnyStep::Dot(d) => self.dots.apply(d),
            }
        }
    }

    fn dot_write_steps(&mut self, sub: &str, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        let branch = self.dots.current.clone();
        for b in off / BS..=(end - 1) / BS {
            let mut block = self.dots.branches[&branch].bytes[sub][(b * BS) as usize..((b + 1) * BS) as usize].to_vec();
            let lo = off.max(b * BS);
            let hi = end.min((b + 1) * BS);
            block[(lo - b * BS) as usize..(hi - b * BS) as usize]
                .copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
            self.push_dot(DotStep::SetBlock { branch: branch.clone(), sub: sub.to_string(), block: b, data: block });
        }
    }

    /// After an open: the pool passes the check and holds the durable state plus a prefix of the later steps; that
    /// becomes the model's state. Panics (failing the seed) otherwise.
    fn recover(&mut self) {
        let report = self.pool().check().unwrap_or_else(|e| panic!("check after reopen failed: {e}"));
        assert!(report.is_ok(), "integrity check after reopen: {:?}", report.problems);
        let vols = read_state(self.pool()).unwrap_or_else(|e| panic!("reading the volumes after reopen: {e}"));
        let dots =
            read_dots(self.pool(), true, &self.dots).unwrap_or_else(|e| panic!("reading the dot after reopen: {e}"));
        let mut cv = self.durable_vols.clone();
        let mut cd = self.durable_dots.clone();
        for k in 0..=self.steps.len() {
            if cv == vols && cd == dots {
                let dropped = self.steps.len() - k;
                self.figs.unflushed_steps_dropped += dropped as u64;
                let d = digest(&vols, &dots);
                self.t(format!("  recovered {k} of {} unflushed steps, state {d}", self.steps.len()));
                self.vm.current = vols;
                self.dots = dots;
                self.flushed();
                return;
            }
            match self.steps.get(k) {
                Some(AnyStep::Vol(s)) => cv.apply(s),
                Some(AnyStep::Dot(s)) => cd.apply(s),
                None => {}
            }
        }
        let vd = first_difference(&vols, &self.durable_vols);
        let dd = dots.difference(&self.durable_dots);
        panic!(
            "LOST FLUSHED WRITE or wrong data: the reopened pool matches no allowed state (durable state plus a \
             prefix of the {} later steps); against the durable state: volumes {}, dot {}",
            self.steps.len(),
            vd.unwrap_or_else(|| "equal".into()),
            dd.unwrap_or_else(|| "equal".into()),
        );
    }

    fn open_and_recover(&mut self, dev: Arc<SimDevice>) {
        self.dev = dev;
        if self.cfg.lying_sync {
            self.dev.set_lying_sync(true);
        }
        let r = Pool::open(self.dev.clone(), self.opts());
        self.t_res("open", &r);
        let pool = r.unwrap_or_else(|e| panic!("the pool does not reopen: {e}"));
        self.pool = Some(pool);
        self.figs.reopens += 1;
        self.recover();
    }

    // ---- the run ----

    fn run(&mut self) {
        for _ in 0..self.cfg.steps {
            let r = self.rng.random_range(0..100);
            match r {
                0..=84 => {
                    if let Err(e) = self.random_op() {
                        panic!("an operation failed with no fault armed: {e}");
                    }
                }
                85..=87 => self.reopen_clean(),
                88..=91 if self.cfg.faults => self.crash(),
                92..=94 if self.cfg.faults => self.power_cut(),
                95..=98 if self.cfg.faults => self.io_error(),
                99 if self.cfg.faults => self.crash_during_recovery(),
                _ => {
                    if let Err(e) = self.random_op() {
                        panic!("an operation failed with no fault armed: {e}");
                    }
                }
            }
        }
        // The end of every seed: a clean close, a reopen, an exact comparison.
        self.reopen_clean();
        if self.cfg.corruption {
            self.corruption_phase();
        }
        if self.cfg.silent_flip {
            self.plant_silent_flip();
        }
    }

    fn reopen_clean(&mut self) {
        self.t("reopen".into());
        let pool = self.pool.take().expect("open pool");
        let r = pool.close();
        self.t_res("close", &r);
        r.unwrap_or_else(|e| panic!("close failed with no fault armed: {e}"));
        self.flushed();
        let dev = self.dev.clone();
        self.open_and_recover(dev);
        assert!(self.steps.is_empty());
    }

    fn crash_image(&mut self) -> Arc<SimDevice> {
        let s = self.rng.random();
        let unsynced = self.dev.unsynced_writes();
        self.t(format!("  crash image {s:#x} of {unsynced} unsynced writes"));
        let image = self.dev.crash(s);
        drop(self.pool.take()); // dropping flushes nothing: like a crash
        image
    }

    fn crash(&mut self) {
        self.t("crash".into());
        self.figs.crashes += 1;
        let image = self.crash_image();
        self.open_and_recover(image);
    }

    /// Run a burst of operations with a fault armed; returns the error that stopped it, if any, and sets `mark` to
    /// where the failed operation's steps start.
    fn burst(&mut self) -> Option<Error> {
        self.armed = true;
        let n = self.rng.random_range(1..=30);
        let mut stop = None;
        for _ in 0..n {
            if let Err(e) = self.random_op() {
                stop = Some(e);
                break;
            }
        }
        self.armed = false;
        stop
    }

    fn power_cut(&mut self) {
        let k = self.rng.random_range(0..80u64);
        self.t(format!("power cut after {k} I/Os"));
        self.dev.set_fault(SimFault::PowerCutAfter(k));
        let stopped = self.burst();
        if stopped.is_none() {
            let r = self.pool().flush();
            self.t_res("flush", &r);
            if r.is_ok() {
                assert!(!self.dev.is_powered_off(), "a flush succeeded after the power went out");
                self.flushed();
            }
        }
        if self.dev.is_powered_off() {
            self.figs.power_cuts += 1;
        } else {
            self.figs.crashes += 1;
        }
        let image = self.crash_image();
        self.open_and_recover(image);
    }

    fn io_error(&mut self) {
        let k = self.rng.random_range(0..60u64);
        let from = self.rng.random_bool(0.3);
        let fault = if from { SimFault::FailFrom(k) } else { SimFault::FailOnce(k) };
        self.t(format!("I/O error {fault:?}"));
        let start = self.dev.io_count();
        self.dev.set_fault(fault);
        let stopped = self.burst();
        let fired = self.dev.io_count() - start > k;
        match stopped {
            Some(e) => {
                assert!(fired, "an operation failed ({e}) before the injected I/O error fired");
                self.figs.io_errors += 1;
                // the failed operation's steps stay possible; a flush that still works makes the earlier ones durable
                let mark = self.mark;
                let r = self.pool().flush();
                self.t_res("flush after the error", &r);
                if r.is_ok() {
                    self.flushed_before(mark);
                }
                self.dev.set_fault(SimFault::None);
                let image = self.crash_image();
                self.open_and_recover(image);
            }
            None => {
                assert!(!fired, "the injected I/O error ({fault:?}) fired but no operation reported it");
                self.dev.set_fault(SimFault::None);
            }
        }
    }

    /// A crash, then another one while the pool is being opened (replay, the recovery checkpoint).
    fn crash_during_recovery(&mut self) {
        self.t("crash, then a power cut during recovery".into());
        let image = self.crash_image();
        let k = self.rng.random_range(0..60u64);
        image.set_fault(SimFault::PowerCutAfter(k));
        let r = Pool::open(image.clone(), self.opts());
        self.t_res(&format!("open cut after {k} I/Os"), &r);
        match r {
            Ok(pool) => {
                assert!(!image.is_powered_off(), "the open succeeded after the power went out");
                drop(pool);
                image.set_fault(SimFault::None);
                self.figs.crashes += 1;
                self.open_and_recover(image.crash_losing_all_unsynced());
            }
            Err(e) => {
                assert!(image.is_powered_off(), "the open failed without a fault: {e}");
                self.figs.recovery_cuts += 1;
                let s = self.rng.random();
                self.open_and_recover(image.crash(s));
            }
        }
    }

    // ---- operations ----

    /// One random operation on the model's valid choices. `Err`: an I/O error, a failed pool or a corruption
    /// report (the caller decides whether that is expected); any other error fails the seed.
    fn random_op(&mut self) -> Result<()> {
        self.mark = self.steps.len();
        self.figs.ops += 1;
        let r = match self.rng.random_range(0..100) {
            0..=27 => self.op_write(),
            28..=31 => self.op_zero(false),
            32..=35 => self.op_zero(true),
            36..=43 => self.op_read(),
            44..=46 => self.op_create(),
            47..=48 => self.op_resize(),
            49 => self.op_delete(),
            50..=52 => self.op_snapshot(),
            53 => self.op_clone(),
            54..=55 => self.op_delete_snapshot(),
            56..=57 => self.op_read_snapshot(),
            58..=64 => self.op_flush(),
            65..=66 => self.op_checkpoint(),
            67..=68 => self.op_clean(),
            69..=76 => self.op_dot_write(),
            77..=79 => self.op_dot_read(),
            80..=84 => self.op_commit(),
            85..=86 => self.op_branch(),
            87..=89 => self.op_checkout(),
            90..=91 => self.op_reset(),
            92 => self.op_delete_branch(),
            93..=95 => self.op_delete_commit(),
            _ => self.op_read_commit(),
        };
        if r.is_ok() && !self.armed && std::env::var_os("SIM_PARANOID").is_some() {
            self.paranoid_check();
        }
        match r {
            Ok(()) => Ok(()),
            Err(Error::NoSpace(why)) => {
                self.t(format!("  refused for space: {why}"));
                let mark = self.mark;
                self.roll_back(mark);
                Ok(())
            }
            Err(e @ (Error::Io { .. } | Error::Failed(_))) if self.armed => Err(e),
            Err(e) if e.is_corruption() => Err(e),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    /// `SIM_PARANOID=1`: after every operation, the live pool reads exactly as the model's current state (volumes,
    /// snapshots, the current branch's heads, every commit). Slow; for narrowing a failure down.
    fn paranoid_check(&mut self) {
        let vols = read_state(self.pool()).unwrap_or_else(|e| panic!("paranoid read: {e}"));
        if let Some(d) = first_difference(&vols, &self.vm.current) {
            panic!("paranoid: live pool differs from the model: {d}");
        }
        let dots = read_dots(self.pool(), false, &self.dots).unwrap_or_else(|e| panic!("paranoid read: {e}"));
        if let Some(d) = dots.difference(&self.dots) {
            panic!("paranoid: live dot differs from the model: {d}");
        }
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.rng.random_range(0..items.len())].clone())
    }

    fn pick_vol(&mut self) -> Option<String> {
        let names: Vec<String> = self.vm.current.vols.keys().cloned().collect();
        self.pick(&names)
    }

    fn pick_snap(&mut self) -> Option<String> {
        let names: Vec<String> = self.vm.current.snaps.keys().cloned().collect();
        self.pick(&names)
    }

    fn pick_commit(&mut self) -> Option<CommitId> {
        let ids: Vec<CommitId> = self.dots.commits.keys().copied().collect();
        self.pick(&ids)
    }

    /// A sector-aligned request inside `size` bytes, at most `max` sectors long.
    fn range(&mut self, size: u64, max: u64) -> (u64, u64) {
        let sectors = size / SECTOR;
        let len = self.rng.random_range(1..=max.min(sectors));
        let off = self.rng.random_range(0..=sectors - len);
        (off * SECTOR, len * SECTOR)
    }

    fn new_name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    fn op_write(&mut self) -> Result<()> {
        let Some(name) = self.pick_vol() else { return self.op_create() };
        let size = self.vm.current.vols[&name].len() as u64;
        let max = if self.rng.random_bool(0.1) { 512 } else { 48 };
        let (off, len) = self.range(size, max);
        let data = pattern(self.rng.random(), len as usize);
        self.t(format!("write {name} [{off}, +{len})"));
        self.vm.write(&name, off, &data);
        self.take_vol_steps();
        let r = self.pool().volume(&name).and_then(|v| v.write(off, &data));
        self.t_res("write", &r);
        r
    }

    fn op_zero(&mut self, trim: bool) -> Result<()> {
        let Some(name) = self.pick_vol() else { return Ok(()) };
        let size = self.vm.current.vols[&name].len() as u64;
        let (off, len) = self.range(size, 64);
        let what = if trim { "trim" } else { "write_zeroes" };
        self.t(format!("{what} {name} [{off}, +{len})"));
        if trim {
            self.vm.trim(&name, off, len);
        } else {
            self.vm.write_zeroes(&name, off, len);
        }
        self.take_vol_steps();
        let r = self.pool().volume(&name).and_then(|v| if trim { v.trim(off, len) } else { v.write_zeroes(off, len) });
        self.t_res(what, &r);
        r
    }

    fn check_read(&mut self, what: &str, r: Result<Vec<u8>>, expected: &[u8]) -> Result<()> {
        match r {
            Ok(buf) => {
                self.t(format!("  {what}: ok, crc {:08x}", crc32fast::hash(&buf)));
                if buf != expected {
                    let i = buf.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
                    panic!("WRONG DATA: {what} differs from the model at byte {i}");
                }
                Ok(())
            }
            Err(e) => {
                self.t(format!("  {what}: {} ({e})", kind(&e)));
                Err(e)
            }
        }
    }

    fn op_read(&mut self) -> Result<()> {
        let Some(name) = self.pick_vol() else { return Ok(()) };
        let size = self.vm.current.vols[&name].len() as u64;
        let (off, len) = self.range(size, 128);
        self.t(format!("read {name} [{off}, +{len})"));
        let r = self.pool().volume(&name).and_then(|v| {
            let mut b = vec![0u8; len as usize];
            v.read(off, &mut b).map(|_| b)
        });
        let expected = self.vm.current.vols[&name][off as usize..(off + len) as usize].to_vec();
        self.check_read("read", r, &expected)
    }

    fn op_create(&mut self) -> Result<()> {
        if self.vm.current.vols.len() >= MAX_VOLUMES {
            return self.op_delete();
        }
        let name = self.new_name("v");
        let size = self.rng.random_range(8..=MAX_VOLUME_SECTORS) * SECTOR;
        self.t(format!("create {name} {size}"));
        self.vm.create(&name, size);
        self.take_vol_steps();
        let r = self.pool().create_volume(&name, size);
        self.t_res("create", &r);
        r.map(|_| ())
    }

    fn op_resize(&mut self) -> Result<()> {
        let Some(name) = self.pick_vol() else { return Ok(()) };
        let size = self.rng.random_range(8..=MAX_VOLUME_SECTORS) * SECTOR;
        self.t(format!("resize {name} {size}"));
        self.vm.resize(&name, size);
        self.take_vol_steps();
        let r = self.pool().resize_volume(&name, size, true);
        self.t_res("resize", &r);
        r
    }

    fn op_delete(&mut self) -> Result<()> {
        if self.vm.current.vols.len() < 2 {
            return Ok(());
        }
        let Some(name) = self.pick_vol() else { return Ok(()) };
        self.t(format!("delete {name}"));
        self.vm.delete(&name);
        self.take_vol_steps();
        let r = self.pool().delete_volume(&name);
        self.t_res("delete", &r);
        r
    }

    fn op_snapshot(&mut self) -> Result<()> {
        if self.vm.current.snaps.len() >= MAX_SNAPSHOTS {
            return self.op_delete_snapshot();
        }
        let Some(a) = self.pick_vol() else { return Ok(()) };
        let mut pairs = vec![(a.clone(), self.new_name("s"))];
        if self.rng.random_bool(0.4) {
            if let Some(b) = self.pick_vol().filter(|b| *b != a) {
                pairs.push((b, self.new_name("s")));
            }
        }
        self.t(format!("snapshot {pairs:?}"));
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(v, s)| (v.as_str(), s.as_str())).collect();
        self.vm.snapshot(&refs);
        self.take_vol_steps();
        let r = self.pool().snapshot(&refs);
        self.t_res("snapshot", &r);
        r
    }

    fn op_clone(&mut self) -> Result<()> {
        if self.vm.current.vols.len() >= MAX_VOLUMES {
            return Ok(());
        }
        let Some(snap) = self.pick_snap() else { return Ok(()) };
        let name = self.new_name("v");
        self.t(format!("clone {snap} as {name}"));
        self.vm.clone_snapshot(&snap, &name);
        self.take_vol_steps();
        let r = self.pool().clone_snapshot(&snap, &name);
        self.t_res("clone", &r);
        r.map(|_| ())
    }

    fn op_delete_snapshot(&mut self) -> Result<()> {
        let Some(snap) = self.pick_snap() else { return Ok(()) };
        self.t(format!("delete snapshot {snap}"));
        self.vm.delete_snapshot(&snap);
        self.take_vol_steps();
        let r = self.pool().delete_snapshot(&snap);
        self.t_res("delete snapshot", &r);
        r
    }

    fn op_read_snapshot(&mut self) -> Result<()> {
        let Some(name) = self.pick_snap() else { return Ok(()) };
        let size = self.vm.current.snaps[&name].len() as u64;
        let (off, len) = self.range(size, 128);
        self.t(format!("read snapshot {name} [{off}, +{len})"));
        let r = self.pool().snapshot_volume(&name).and_then(|v| {
            let mut b = vec![0u8; len as usize];
            v.read(off, &mut b).map(|_| b)
        });
        let expected = self.vm.current.snaps[&name][off as usize..(off + len) as usize].to_vec();
        self.check_read("read snapshot", r, &expected)
    }

    fn op_flush(&mut self) -> Result<()> {
        self.t("flush".into());
        let r = self.pool().flush();
        self.t_res("flush", &r);
        self.figs.flushes += u64::from(r.is_ok());
        r.map(|_| self.flushed())
    }

    fn op_checkpoint(&mut self) -> Result<()> {
        self.t("checkpoint".into());
        let r = self.pool().checkpoint();
        self.t_res("checkpoint", &r);
        r.map(|_| self.flushed())
    }

    fn op_clean(&mut self) -> Result<()> {
        self.t("clean".into());
        let r = self.pool().clean();
        match &r {
            Ok(s) => self.t(format!("  clean: {s:?}")),
            Err(_) => self.t_res("clean", &r),
        }
        r.map(|_| self.flushed())
    }

    fn op_dot_write(&mut self) -> Result<()> {
        let (sub, size) = SUBDOTS[self.rng.random_range(0..SUBDOTS.len())];
        let (off, len) = self.range(size, 24);
        let data = pattern(self.rng.random(), len as usize);
        self.t(format!("dot write {sub} [{off}, +{len})"));
        self.dot_write_steps(sub, off, &data);
        let r = self.pool().dot_volume(DOT, Some(sub)).and_then(|v| v.write(off, &data));
        self.t_res("dot write", &r);
        r
    }

    fn op_dot_read(&mut self) -> Result<()> {
        let (sub, size) = SUBDOTS[self.rng.random_range(0..SUBDOTS.len())];
        let (off, len) = self.range(size, 64);
        self.t(format!("dot read {sub} [{off}, +{len})"));
        let r = self.pool().dot_volume(DOT, Some(sub)).and_then(|v| {
            let mut b = vec![0u8; len as usize];
            v.read(off, &mut b).map(|_| b)
        });
        let expected = self.dots.branches[&self.dots.current].bytes[sub][off as usize..(off + len) as usize].to_vec();
        self.check_read("dot read", r, &expected)
    }

    fn op_read_commit(&mut self) -> Result<()> {
        let Some(c) = self.pick_commit() else { return Ok(()) };
        let (sub, size) = SUBDOTS[self.rng.random_range(0..SUBDOTS.len())];
        let (off, len) = self.range(size, 64);
        self.t(format!("read commit {c} {sub} [{off}, +{len})"));
        let r = self.pool().commit_volume(DOT, c, Some(sub)).and_then(|v| {
            let mut b = vec![0u8; len as usize];
            v.read(off, &mut b).map(|_| b)
        });
        let expected = self.dots.commits[&c].bytes[sub][off as usize..(off + len) as usize].to_vec();
        self.check_read("read commit", r, &expected)
    }

    fn op_commit(&mut self) -> Result<()> {
        if self.dots.commits.len() >= MAX_COMMITS {
            return self.op_delete_commit();
        }
        let id = CommitId(self.rng.random());
        self.commits_made += 1;
        let req = CommitRequest {
            message: format!("commit {}", self.commits_made),
            author: "simulator".into(),
            time_unix_secs: Some(1_800_000_000 + self.commits_made),
            metadata: vec![("seed".into(), self.seed.to_string())],
            id: Some(id),
        };
        self.t(format!("commit {id} on {}", self.dots.current));
        self.push_dot(DotStep::Commit { id });
        let r = self.pool().commit(DOT, req);
        self.t_res("commit", &r);
        if let Ok(got) = &r {
            assert_eq!(*got, id, "the commit keeps the id it was given");
        }
        r.map(|_| ())
    }

    fn op_branch(&mut self) -> Result<()> {
        let free: Vec<&str> = BRANCHES.iter().copied().filter(|b| !self.dots.branches.contains_key(*b)).collect();
        let Some(name) = self.pick(&free) else { return self.op_delete_branch() };
        let Some(from) = self.pick_commit() else { return Ok(()) };
        self.t(format!("branch {name} from {from}"));
        self.push_dot(DotStep::Branch { name: name.to_string(), from });
        let r = self.pool().create_branch(DOT, name, Some(from));
        self.t_res("branch", &r);
        r
    }

    fn op_checkout(&mut self) -> Result<()> {
        let names: Vec<String> = self.dots.branches.keys().cloned().collect();
        let Some(name) = self.pick(&names) else { return Ok(()) };
        self.t(format!("checkout {name}"));
        self.push_dot(DotStep::Checkout { name: name.clone() });
        let r = self.pool().checkout(DOT, &name);
        self.t_res("checkout", &r);
        r
    }

    fn op_reset(&mut self) -> Result<()> {
        let Some(to) = self.pick_commit() else { return Ok(()) };
        let branch = self.dots.current.clone();
        self.t(format!("reset {branch} to {to}"));
        self.push_dot(DotStep::Reset { branch: branch.clone(), to });
        let r = self.pool().reset_branch(DOT, &branch, to);
        self.t_res("reset", &r);
        r
    }

    fn op_delete_branch(&mut self) -> Result<()> {
        let names: Vec<String> = self.dots.branches.keys().filter(|b| **b != self.dots.current).cloned().collect();
        let Some(name) = self.pick(&names) else { return Ok(()) };
        self.t(format!("delete branch {name}"));
        self.push_dot(DotStep::DeleteBranch { name: name.clone() });
        let r = self.pool().delete_branch(DOT, &name);
        self.t_res("delete branch", &r);
        r
    }

    fn op_delete_commit(&mut self) -> Result<()> {
        let d = &self.dots;
        let free: Vec<CommitId> = d
            .commits
            .keys()
            .copied()
            .filter(|c| {
                !d.branches.values().any(|b| b.head == Some(*c)) && !d.commits.values().any(|m| m.parents.contains(c))
            })
            .collect();
        let Some(id) = self.pick(&free) else { return Ok(()) };
        self.t(format!("delete commit {id}"));
        self.push_dot(DotStep::DeleteCommit { id });
        let r = self.pool().delete_commit(DOT, id);
        self.t_res("delete commit", &r);
        r
    }

    // ---- latent faults ----

    /// Blocks of the segment area that hold anything.
    fn written_blocks(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut b = vec![0u8; BS as usize];
        for pba in SEGMENT_AREA / BS..POOL_BYTES / BS {
            self.dev.peek(&mut b, pba * BS);
            if b.iter().any(|&x| x != 0) {
                out.push(pba);
            }
        }
        out
    }

    /// The final phase: a misdirected write and/or bit flips in written blocks, some more operations, a clean
    /// close and a reopen. Every read must then return the model's bytes or a corruption error, and whatever hit
    /// live data must be reported (by the open, a read or the check). Nothing else is asserted after a report: the
    /// seed ends there.
    fn corruption_phase(&mut self) {
        self.t("corruption phase".into());
        let mut injected = 0u64;
        if self.rng.random_bool(0.5) {
            let nth = self.rng.random_range(0..40u64);
            let blocks = POOL_BYTES / BS;
            let lands_at = self.rng.random_range(SEGMENT_AREA / BS..blocks) * BS;
            self.t(format!("  misdirect write {nth} to {lands_at}"));
            self.dev.misdirect_write(nth, SEGMENT_AREA, lands_at);
        }
        let flips = self.rng.random_range(0..=3u32);
        let ops = self.rng.random_range(0..40u32);
        let flip_at: Vec<u32> = (0..flips).map(|_| self.rng.random_range(0..=ops)).collect();
        for i in 0..=ops {
            for _ in flip_at.iter().filter(|&&at| at == i) {
                let blocks = self.written_blocks();
                if let Some(pba) = self.pick(&blocks) {
                    let byte = self.rng.random_range(0..BS);
                    let bit = self.rng.random_range(0..8u8);
                    self.t(format!("  flip bit {bit} of byte {byte} of block {pba}"));
                    self.dev.flip_bit(pba * BS + byte, bit);
                    injected += 1;
                }
            }
            if i < ops {
                if let Err(e) = self.random_op() {
                    self.t(format!("  reported during the operations: {e}"));
                    return self.corruption_end(injected + self.dev.misdirected_writes(), true);
                }
            }
        }
        let r = self.pool.take().expect("open pool").close();
        self.t_res("close", &r);
        let injected = injected + self.dev.misdirected_writes();
        if let Err(e) = r {
            assert!(e.is_corruption(), "close failed with a non-corruption error: {e}");
            return self.corruption_end(injected, true);
        }
        self.flushed();
        let r = Pool::open(self.dev.clone(), self.opts());
        self.t_res("open", &r);
        let pool = match r {
            Ok(p) => p,
            Err(e) => {
                assert!(e.is_corruption(), "the open failed with a non-corruption error: {e}");
                return self.corruption_end(injected, true);
            }
        };
        self.pool = Some(pool);
        let mut detected = false;
        match read_state(self.pool()) {
            Ok(st) => {
                if let Some(d) = first_difference(&st, &self.vm.current) {
                    panic!("UNDETECTED CORRUPTION: wrong data returned without an error: {d}");
                }
            }
            Err(e) => {
                assert!(e.is_corruption(), "reading failed with a non-corruption error: {e}");
                detected = true;
            }
        }
        match read_dots(self.pool(), false, &self.dots) {
            Ok(d) => {
                if let Some(diff) = d.difference(&self.dots) {
                    panic!("UNDETECTED CORRUPTION: wrong dot data returned without an error: {diff}");
                }
            }
            Err(e) => {
                assert!(e.is_corruption(), "reading the dot failed with a non-corruption error: {e}");
                detected = true;
            }
        }
        match self.pool().check() {
            Ok(report) => detected |= !report.is_ok(),
            Err(e) => {
                assert!(e.is_corruption(), "the check failed with a non-corruption error: {e}");
                detected = true;
            }
        }
        self.corruption_end(injected, detected);
    }

    fn corruption_end(&mut self, injected: u64, detected: bool) {
        self.t(format!("  {injected} latent faults, detected: {detected}"));
        self.figs.corruptions_injected += injected;
        if injected > 0 {
            if detected {
                self.figs.corruptions_detected += 1;
            } else {
                self.figs.corruptions_harmless += 1;
            }
        } else {
            assert!(!detected, "corruption reported where none was injected");
        }
        drop(self.pool.take());
    }

    /// Canary: flip a bit of a block holding live volume data, tell nobody, and check the pool as after any reopen.
    fn plant_silent_flip(&mut self) {
        if self.pool.is_none() {
            let dev = self.dev.crash_losing_all_unsynced();
            self.dev = dev;
            self.pool = Some(Pool::open(self.dev.clone(), self.opts()).unwrap());
        }
        let pool = self.pool.take().expect("open pool");
        pool.close().unwrap();
        let live: HashSet<Vec<u8>> = self
            .vm
            .current
            .vols
            .values()
            .flat_map(|v| v.chunks(BS as usize).filter(|c| c.len() == BS as usize && c.iter().any(|&b| b != 0)))
            .map(|c| c.to_vec())
            .collect();
        let mut b = vec![0u8; BS as usize];
        // every copy of live data (one of them is the live one), so the canary cannot miss
        let hits: Vec<u64> = self
            .written_blocks()
            .into_iter()
            .filter(|pba| {
                self.dev.peek(&mut b, pba * BS);
                live.contains(&b)
            })
            .collect();
        for pba in hits {
            self.t(format!("canary: silent flip in block {pba}"));
            self.dev.flip_bit(pba * BS + 100, 3);
        }
        let dev = self.dev.clone();
        self.open_and_recover(dev);
    }
}
