//! Whole-system simulation (issue #8): one seed drives a random workload of volume writes, zeroes, trims, resizes,
//! deletes, snapshots, clones, dot writes, commits, branches, checkouts, resets, branch and commit deletions,
//! flushes, checkpoints, cleaning, clean reopens, crashes (unsynced writes dropped, torn and kept out of order),
//! power cuts at a counted I/O (also during recovery) and failing I/O, on the simulated device; the pool is checked
//! against a reference model after every reopen (`Pool::check` passes; every volume, snapshot, branch head and commit
//! reads as the durable state plus a prefix of the later steps). A final phase per seed plants latent faults (bit
//! flips in written blocks, a misdirected write) and asserts they are reported, never returned as data. See
//! `common/sim_world.rs`.
//!
//! Every seed replays identically: the trace hash (every operation and its outcome) is the same on every run.
//! Canaries prove the harness catches planted bugs: a disk whose sync lies (flushed writes get lost), and a silent bit
//! flip in live data.
//!
//! CI runs a bounded number of seeds; `SIM_SEEDS=N cargo test -p blockmesh-engine --test simulator -- --nocapture`
//! runs N (from `SIM_FIRST`, default 0), `SIM_SEED=S` replays one, `SIM_STEPS=N` sets the steps per seed.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/sim_world.rs"]
mod sim_world;

use sim_world::{run_seed, Config, Figures};

const CI_SEEDS: u64 = 64;
const STEPS: usize = 500;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn steps() -> usize {
    env("SIM_STEPS").map_or(STEPS, |s| s as usize)
}

/// Run seeds; panic with every failing seed (and how to replay it).
fn simulate(seeds: impl Iterator<Item = u64>, cfg: Config) -> Figures {
    let mut figs = Figures::default();
    let mut failures = Vec::new();
    for seed in seeds {
        match run_seed(seed, cfg) {
            Ok(f) => figs.add(&f),
            Err(e) => {
                eprintln!("{e}\n  replay: SIM_SEED={seed} cargo test -p blockmesh-engine --test simulator simulate");
                failures.push(seed);
            }
        }
    }
    assert!(failures.is_empty(), "simulator: failing seeds {failures:?} (see above)");
    figs
}

#[test]
fn simulate_seeded_workloads_with_faults() {
    let cfg = Config::normal(steps());
    let figs = match env("SIM_SEED") {
        Some(seed) => simulate(std::iter::once(seed), cfg),
        None => {
            let first = env("SIM_FIRST").unwrap_or(0);
            simulate(first..first + env("SIM_SEEDS").unwrap_or(CI_SEEDS), cfg)
        }
    };
    eprintln!("{}", figs.summary());
    if env("SIM_SEED").is_none() {
        assert!(figs.crashes + figs.power_cuts > figs.seeds, "the seeds crash: {}", figs.summary());
        assert!(figs.io_errors > 0 && figs.corruptions_detected > 0, "faults fire: {}", figs.summary());
    }
}

#[test]
fn same_seed_same_trace() {
    let cfg = Config::normal(150);
    let a = [run_seed(7, cfg).unwrap(), run_seed(8, cfg).unwrap()];
    let b = [run_seed(7, cfg).unwrap(), run_seed(8, cfg).unwrap()];
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.trace, y.trace, "a seed replays identically");
        assert_eq!(x.ops, y.ops);
    }
    assert_ne!(a[0].trace, a[1].trace, "different seeds, different runs");
}

/// Canary: a disk whose `sync` returns Ok without making anything durable. Flushed writes are then lost at the next
/// crash, and the simulator must say so for some seed.
#[test]
fn the_harness_catches_a_planted_bug() {
    let cfg = Config { steps: 150, faults: true, corruption: false, lying_sync: true, silent_flip: false };
    let failed: Vec<String> = (0..6).filter_map(|seed| run_seed(seed, cfg).err()).collect();
    assert!(!failed.is_empty(), "with a lying disk, some seed must fail");
    assert!(
        failed.iter().any(|e| e.contains("LOST FLUSHED WRITE") || e.contains("does not reopen")),
        "the failure names the lost write: {failed:?}"
    );
    // the same seeds pass on an honest disk
    let honest = Config { lying_sync: false, ..cfg };
    for seed in 0..6 {
        run_seed(seed, honest).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Canary: a bit of live volume data flips behind the model's back; the reopen's check and reads must notice.
#[test]
fn the_harness_catches_a_silent_bit_flip() {
    let cfg = Config { steps: 80, faults: false, corruption: false, lying_sync: false, silent_flip: true };
    for seed in 0..3 {
        let e = run_seed(seed, cfg).expect_err("a flipped live block must fail the seed");
        assert!(e.contains("hecksum") || e.contains("integrity") || e.contains("WRONG DATA"), "{e}");
    }
}
