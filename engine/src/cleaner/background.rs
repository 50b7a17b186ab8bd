//! The background cleaner: a thread per pool that gives space back between client writes, so that a burst of writes
//! after a quiet spell finds free segments instead of waiting for just-in-time cleaning ([`State::make_room`]).
//!
//! It wakes every [`BACKGROUND_CLEAN_TICK`] and does nothing while the free segments reach the level at which
//! checkpoints start cleaning (`clean_start_free_segments`: the reserve and 1/[`crate::pool::CLEAN_START_FREE_SHARE`]
//! of the pool). Below it, it takes the pool lock for one step: a moving pass freeing about one segment [I13], or,
//! when no segment can be moved yet (all written since the last checkpoint, or holding table pages), a cleaning pass
//! that ends in a checkpoint [I11]. Both are the crash-safe steps writes use when they run out of room.
//!
//! Its share of the pool is bounded: after a step of duration `d` it sleeps `d * (100 - share) / share`, with share
//! [`BACKGROUND_CLEAN_IDLE_SHARE_PERCENT`] when no client op came since its last look and
//! [`BACKGROUND_CLEAN_BUSY_SHARE_PERCENT`] otherwise. While clients write, it also takes only victims at most
//! [`BACKGROUND_BUSY_MAX_UTILIZATION`] live: cleaning fuller segments early copies blocks that would have died had
//! they waited, so under steady writes the writes' own just-in-time cleaning, which cleans as late as possible, does
//! most of it (the write amplification of benches/engine/cleaning.sh did not change with the cleaner on).
//!
//! It also takes, outside the pool lock, the sync that lets segments emptied by moving passes be written over [I13],
//! once [`BACKGROUND_SYNC_MOVED_SEGMENTS`] wait for one, or any number once it rests with nobody writing (else the
//! last few of a quiet spell's passes stayed unusable, and a burst after it cleaned again: benches/engine/cleaning.sh
//! measured write amplification 1.33 instead of 1.0): without it the log takes that sync itself, under the lock,
//! when it finds no other free segment, and every writer waits for the disk meanwhile.
//!
//! And it syncs the log, outside the pool lock (a flush, [`crate::pool::flush`]), once
//! [`BACKGROUND_SYNC_LOG_BYTES`] were written since the last sync, so that a checkpoint's sync finds most of the log
//! on disk (measured when checkpoints synced under the pool lock: 1 MiB sequential NBD writes stalled ~0.21 s in each
//! checkpoint's sync, one every ~0.6 s; with this, 0.05-0.1 s). It is only a flush no client asked for: durability and
//! the crash argument do not change.
//!
//! It begins a checkpoint that is due when no write did (writes taken without waiting, [`crate::Volume::try_write_now`],
//! leave it to the next write or to this thread's next look).
//!
//! A second thread completes the checkpoints that writes begin ([`crate::pool::maybe_checkpoint_unlocked`]): their
//! record is written under the lock by the write, and this thread takes the two syncs (after the record, after the
//! superblock) outside the lock, so neither the writers nor the write that began the checkpoint wait for the disk
//! (1 MiB NBD writes: 1.4x the throughput, p99 latency 25-28 ms instead of 133-150).
//!
//! Measured (benches/RESULTS.md, cleaning): at 80% utilization, a burst of 1/16 volume-size after 5 s without
//! writes ran at 3.3x the IOPS it had without the background cleaner, with a write amplification of 1.01, not 3.0.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::AUTO_CLEAN_MAX_UTILIZATION;
use crate::format::BLOCK_SIZE;
use crate::io::Device;
use crate::pool::{Inner, State};
use parking_lot::RwLock;

/// How often the background cleaner looks at the pool when it has nothing to do.
pub const BACKGROUND_CLEAN_TICK: Duration = Duration::from_millis(100);
/// Share of the time (percent) the background cleaner may hold the pool while no client op comes.
pub const BACKGROUND_CLEAN_IDLE_SHARE_PERCENT: u32 = 50;
/// Share of the time (percent) the background cleaner may hold the pool while clients are busy.
pub const BACKGROUND_CLEAN_BUSY_SHARE_PERCENT: u32 = 10;
/// While clients are busy, the background cleaner only takes segments at most this share live.
pub const BACKGROUND_BUSY_MAX_UTILIZATION: f64 = 0.5;
/// Segments emptied by moving passes (free once a sync covers their copies [I13]) at which the background cleaner
/// takes that sync itself, outside the pool lock, so that the log seldom has to take it under the lock when it
/// runs out of other free segments.
pub const BACKGROUND_SYNC_MOVED_SEGMENTS: u64 = 4;
/// Log written since the last sync at which the background thread syncs it (outside the pool lock), so that the next
/// checkpoint's sync finds little left to write: 128 MiB.
pub const BACKGROUND_SYNC_LOG_BYTES: u64 = 128 << 20;
/// How soon the background cleaner looks again while emptied segments wait for a sync.
pub const BACKGROUND_SYNC_TICK: Duration = Duration::from_millis(10);
/// Longest pause after a step (a slow device makes long steps; the cleaner still looks again this soon).
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// What one look at the pool did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Free segments are at their level, or nothing can be cleaned now.
    Nothing,
    /// A moving pass or a checkpoint ran; `busy` when client ops came since the last look.
    Cleaned { busy: bool },
    /// The pool is closed or failed: the cleaner leaves.
    Stop,
}

impl State {
    /// One step of the background cleaner (see the module documentation). `seen_ops` is the op count at its last
    /// look.
    pub(crate) fn background_step(&mut self, dev: &dyn Device, gate: &RwLock<()>, seen_ops: &mut u64) -> Step {
        if self.check_writable().is_err() {
            return Step::Stop;
        }
        let busy = self.counters.ops != *seen_ops;
        *seen_ops = self.counters.ops;
        if self.segs.free_count() >= self.clean_start_free_segments {
            return Step::Nothing;
        }
        let max_utilization = if busy { BACKGROUND_BUSY_MAX_UTILIZATION } else { AUTO_CLEAN_MAX_UTILIZATION };
        // A moving pass; when nothing is movable (every candidate was written since the last checkpoint, or holds
        // table pages), a pass that ends in a checkpoint, which may take those. An error has failed the pool; its
        // next op reports why.
        let pass = match self.move_pass(dev, gate, max_utilization, self.segs.blocks_per_segment) {
            Ok(s) if s.passes > 0 => Ok(s),
            Ok(_) => self.clean_pass(dev, gate, false, max_utilization),
            Err(e) => Err(e),
        };
        match pass {
            Ok(s) if s.passes > 0 => {
                self.counters.background_steps += 1;
                Step::Cleaned { busy }
            }
            Ok(_) => Step::Nothing,
            Err(_) => Step::Stop,
        }
    }
}

/// The background cleaner's thread, and the thread that completes checkpoints begun by writes (their syncs, outside
/// the pool lock, [`crate::pool::complete_checkpoint_unlocked`]); dropping it stops both (after the step each may be
/// in) and waits for them.
#[derive(Debug)]
pub(crate) struct Background {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    pool: Weak<Inner>,
    finisher: Option<JoinHandle<()>>,
}

impl Background {
    /// Start cleaning `inner` in the background; `None` if no thread could be started (the pool then cleans only
    /// when writes need room, as without it).
    pub(crate) fn start(inner: &Arc<Inner>) -> Option<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let pool = Arc::downgrade(inner);
        let thread =
            std::thread::Builder::new().name("blockmesh-cleaner".into()).spawn(move || run(&pool, &stopped)).ok()?;
        // Without the finisher, writes complete their checkpoints themselves (still without the lock).
        let (tx, jobs) = mpsc::channel::<u64>();
        let pool = Arc::downgrade(inner);
        let finisher = std::thread::Builder::new()
            .name("blockmesh-checkpoint".into())
            .spawn(move || finish_checkpoints(&pool, &jobs))
            .ok();
        if finisher.is_some() {
            *inner.checkpoint_finisher.lock() = Some(tx);
        }
        Some(Self { stop: Some(stop), thread: Some(thread), pool: Arc::downgrade(inner), finisher })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop = None; // the thread sees the channel close
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // the finisher sees its channel close once the sender leaves the pool (or the pool is gone)
        if let Some(inner) = self.pool.upgrade() {
            inner.checkpoint_finisher.lock().take();
        }
        if let Some(t) = self.finisher.take() {
            let _ = t.join();
        }
    }
}

/// The finisher thread: completes each checkpoint handed to it (at most one is pending at a time). A failure has
/// failed the pool; its next op reports why.
fn finish_checkpoints(pool: &Weak<Inner>, jobs: &mpsc::Receiver<u64>) {
    while let Ok(id) = jobs.recv() {
        let Some(inner) = pool.upgrade() else { return };
        let _ = crate::pool::complete_checkpoint_unlocked(&inner, id);
    }
}

fn run(pool: &Weak<Inner>, stopped: &mpsc::Receiver<()>) {
    let mut pause = BACKGROUND_CLEAN_TICK;
    let mut seen_ops = 0u64;
    loop {
        match stopped.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(inner) = pool.upgrade() else { return };
        let ops_seen_before = seen_ops;
        let (step, spent) = {
            let mut st = inner.state.lock();
            let started = Instant::now();
            let step = st.background_step(&*inner.dev, &inner.reuse_gate, &mut seen_ops);
            (step, started.elapsed())
        };
        pause = match step {
            Step::Stop => return,
            Step::Nothing => BACKGROUND_CLEAN_TICK,
            Step::Cleaned { busy } => pause_after(spent, busy),
        };
        // Done for now with nobody writing: the last few emptied segments are not left waiting for more.
        let rested = step == Step::Nothing && seen_ops == ops_seen_before;
        if sync_moved(&inner, rested) && step == Step::Nothing {
            pause = BACKGROUND_SYNC_TICK;
        }
        sync_log(&inner);
        begin_due_checkpoint(&inner);
    }
}

/// Begin a checkpoint that a write taken without waiting ([`crate::Volume::try_write_now`]) left due, as a blocking
/// write would have begun it, unless a write has meanwhile (checkpoints due for other reasons, such as segments the
/// cleaner emptied, are left to writes, as before). Its syncs go to the finisher thread. A failure has failed the
/// pool; its next op reports why.
fn begin_due_checkpoint(inner: &Inner) {
    let mut st = inner.state.lock();
    if !std::mem::take(&mut st.checkpoint_left_due) {
        return;
    }
    if st.check_writable().is_ok() && st.checkpoint_due() {
        let _ = crate::pool::maybe_checkpoint_unlocked(inner, st);
    }
}

/// Sync the log outside the pool lock once [`BACKGROUND_SYNC_LOG_BYTES`] were written since the last sync. A failed
/// sync fails the pool, as a failed flush does (its next op reports why).
fn sync_log(inner: &Inner) {
    let due = {
        let st = inner.state.lock();
        st.check_writable().is_ok() && st.log.unsynced_blocks() * BLOCK_SIZE >= BACKGROUND_SYNC_LOG_BYTES
    };
    if due && crate::pool::flush(inner).is_ok() {
        inner.state.lock().counters.background_log_syncs += 1;
    }
}

/// Sync for the segments that moving passes emptied, outside the pool lock, once at least
/// [`BACKGROUND_SYNC_MOVED_SEGMENTS`] wait for it (any number with `rested`: the cleaner has nothing more to do and
/// nobody writes), and free them [I13]; a failed sync fails the pool, as a failed flush does. Returns whether
/// emptied segments still wait (fewer than that many, or moved meanwhile).
fn sync_moved(inner: &Inner, rested: bool) -> bool {
    let below = {
        let st = inner.state.lock();
        let waiting = st.segs.moved_count();
        if waiting == 0 || st.check_writable().is_err() {
            return false;
        }
        if waiting < BACKGROUND_SYNC_MOVED_SEGMENTS && !rested {
            return true;
        }
        // every record below this was written: the moving passes drained the log and wrote their own records
        st.segs.moved_below()
    };
    let synced = inner.dev.sync();
    let st = &mut *inner.state.lock();
    match synced {
        Ok(()) => {
            st.log.synced(&mut st.segs, below);
            st.segs.moved_count() > 0
        }
        Err(e) => {
            st.fail(e);
            false
        }
    }
}

/// The pause after a step that took `spent`, keeping the cleaner within its share of the time.
pub(crate) fn pause_after(spent: Duration, busy: bool) -> Duration {
    let share = if busy { BACKGROUND_CLEAN_BUSY_SHARE_PERCENT } else { BACKGROUND_CLEAN_IDLE_SHARE_PERCENT };
    (spent * (100 - share) / share).clamp(Duration::from_millis(1), MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_keep_the_cleaner_within_its_share() {
        let d = Duration::from_millis(20);
        let idle = pause_after(d, false);
        let busy = pause_after(d, true);
        // time held / (held + paused) is the share
        let share = |p: Duration| d.as_secs_f64() / (d + p).as_secs_f64();
        assert!((share(idle) - f64::from(BACKGROUND_CLEAN_IDLE_SHARE_PERCENT) / 100.0).abs() < 1e-6);
        assert!((share(busy) - f64::from(BACKGROUND_CLEAN_BUSY_SHARE_PERCENT) / 100.0).abs() < 1e-6);
        assert_eq!(pause_after(Duration::from_secs(60), true), MAX_PAUSE, "bounded");
        assert_eq!(pause_after(Duration::ZERO, false), Duration::from_millis(1), "never spins");
    }
}
