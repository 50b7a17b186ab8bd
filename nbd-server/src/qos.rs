//! Quality of service: per-export rate limits, and fair sharing of the export backend between exports.
//!
//! **Limits.** A [`Qos`] carries an export's [`Limits`] (operations and bytes per second, for reads, for writes, and
//! for both together) as token buckets in their GCRA form: each bucket keeps a *theoretical arrival time*; a request
//! of cost `c` at a rate `r` moves it on by `c / r`, and may start once it is no further than the burst allowance
//! ahead of the clock. A request reserves its place in every bucket that applies when it is read, in the order the
//! client sent it, and the connection then sleeps (a tokio timer, no busy-waiting) before it reads the next request.
//! So a connection's requests are never reordered by the limits (a flush still follows the writes sent before it), a
//! throttled client is pushed back through its socket, and several connections to one export share its buckets.
//! Limits may change at any time ([`Qos::set_limits`]); the buckets then start over from the present.
//!
//! What counts: `READ` is a read of its length; `WRITE` a write of its length; `TRIM` and `WRITE_ZEROES` a write
//! operation of no bytes (they move no data); `FLUSH`, `CACHE` and `BLOCK_STATUS` are free.
//!
//! **Fairness.** A [`FairQueue`] shared by every connection of a server lets at most `slots` requests run in the
//! backend at once and hands free slots out by start-time fair queueing: each flow (an export's [`Qos`], or one
//! connection when its export has none) tags its requests with a virtual finish time (its cost in bytes, plus
//! [`FAIR_REQUEST_COST_BYTES`] per request) and the smallest tag runs next. A flow with many requests queued cannot
//! keep a flow with one from running: the quiet flow's request waits for one slot to come free, not for the noisy
//! flow's queue to drain. Beside the shared slots there are as many *express* slots, only for a flow that has
//! nothing in the backend: a request of an idle flow (a client at queue depth 1, a database's commit) starts at once
//! instead of waiting for a busy flow's request to finish, and no flow holds more than one of them. The queue is
//! work-conserving: while one flow is the only one that asked for a slot within [`FLOW_ACTIVE_WINDOW`], it is not
//! held to the shared slots (a single busy volume runs as fast as with no queue); the bound applies as soon as a
//! second flow is active.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Default burst allowance: a bucket lets through at once what its rate allows in this long.
pub const DEFAULT_BURST_MS: u64 = 1_000;
/// Longest burst allowance.
pub const MAX_BURST_MS: u64 = 60_000;
/// Lowest operations-per-second limit (0 is refused: "no limit" is `None`).
pub const MIN_IOPS: u64 = 1;
/// Lowest bytes-per-second limit: one 4 KiB block a second.
pub const MIN_BYTES_PER_SEC: u64 = 4096;
/// What a request costs in the fair queue beyond its bytes, so that small requests are not free.
pub const FAIR_REQUEST_COST_BYTES: u64 = 4096;
/// Default requests in the backend at once, for every export of a server together, when fairness is on.
pub const DEFAULT_FAIR_SLOTS: usize = 8;
/// Most requests in the backend at once that a fair queue may be configured with.
pub const MAX_FAIR_SLOTS: usize = 1024;
/// A flow that asked for a slot this recently counts as active: with two active flows the shared slots bind.
pub const FLOW_ACTIVE_WINDOW: Duration = Duration::from_millis(20);

/// An export's limits. `None` is no limit; `burst_ms` is the burst allowance of every bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Operations per second, reads and writes together.
    pub iops: Option<u64>,
    /// Read operations per second.
    pub read_iops: Option<u64>,
    /// Write operations per second (writes, trims, write-zeroes).
    pub write_iops: Option<u64>,
    /// Bytes per second, read and written together.
    pub bytes_per_sec: Option<u64>,
    /// Bytes read per second.
    pub read_bytes_per_sec: Option<u64>,
    /// Bytes written per second.
    pub write_bytes_per_sec: Option<u64>,
    /// How much may pass at once beyond the rate, as the time the rate needs for it.
    pub burst_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            iops: None,
            read_iops: None,
            write_iops: None,
            bytes_per_sec: None,
            read_bytes_per_sec: None,
            write_bytes_per_sec: None,
            burst_ms: DEFAULT_BURST_MS,
        }
    }
}

impl Limits {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        [
            self.iops,
            self.read_iops,
            self.write_iops,
            self.bytes_per_sec,
            self.read_bytes_per_sec,
            self.write_bytes_per_sec,
        ]
        .iter()
        .all(Option::is_none)
    }

    /// Checks the values against [`MIN_IOPS`], [`MIN_BYTES_PER_SEC`] and [`MAX_BURST_MS`].
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [("iops", self.iops), ("read_iops", self.read_iops), ("write_iops", self.write_iops)] {
            if v.is_some_and(|v| v < MIN_IOPS) {
                return Err(format!("{name} must be at least {MIN_IOPS} (leave it out for no limit)"));
            }
        }
        for (name, v) in [
            ("bytes_per_sec", self.bytes_per_sec),
            ("read_bytes_per_sec", self.read_bytes_per_sec),
            ("write_bytes_per_sec", self.write_bytes_per_sec),
        ] {
            if v.is_some_and(|v| v < MIN_BYTES_PER_SEC) {
                return Err(format!("{name} must be at least {MIN_BYTES_PER_SEC} (leave it out for no limit)"));
            }
        }
        if self.burst_ms > MAX_BURST_MS {
            return Err(format!("burst_ms must be at most {MAX_BURST_MS}"));
        }
        Ok(())
    }
}

/// Which way a request moves data, for the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// One bucket in GCRA form: the theoretical arrival time of the next request.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate_per_sec: u64,
    tat: Instant,
}

impl Bucket {
    /// Time the rate needs for `cost` units.
    fn increment(&self, cost: u64) -> Duration {
        let nanos = u128::from(cost) * 1_000_000_000 / u128::from(self.rate_per_sec.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[derive(Debug)]
struct Buckets {
    limits: Limits,
    iops: Option<Bucket>,
    read_iops: Option<Bucket>,
    write_iops: Option<Bucket>,
    bytes: Option<Bucket>,
    read_bytes: Option<Bucket>,
    write_bytes: Option<Bucket>,
}

impl Buckets {
    fn new(limits: Limits, now: Instant) -> Self {
        let b = |rate: Option<u64>| rate.map(|rate_per_sec| Bucket { rate_per_sec, tat: now });
        Self {
            limits,
            iops: b(limits.iops),
            read_iops: b(limits.read_iops),
            write_iops: b(limits.write_iops),
            bytes: b(limits.bytes_per_sec),
            read_bytes: b(limits.read_bytes_per_sec),
            write_bytes: b(limits.write_bytes_per_sec),
        }
    }
}

/// One export's quality of service: its limits and buckets, its flow in the fair queue, and what throttling cost it.
/// Shared (in an `Arc`) by every connection to the export.
#[derive(Debug)]
pub struct Qos {
    buckets: Mutex<Buckets>,
    flow: Arc<Flow>,
    throttled_nanos: AtomicU64,
    throttled_requests: AtomicU64,
}

impl Qos {
    /// An export's QoS with these limits (which should have passed [`Limits::validate`]).
    pub fn new(limits: Limits) -> Self {
        Self {
            buckets: Mutex::new(Buckets::new(limits, Instant::now())),
            flow: Arc::default(),
            throttled_nanos: AtomicU64::new(0),
            throttled_requests: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.buckets.lock().limits
    }

    /// Replaces the limits; the buckets start over (full) from now. Requests already admitted keep their times.
    pub fn set_limits(&self, limits: Limits) {
        *self.buckets.lock() = Buckets::new(limits, Instant::now());
    }

    /// Total time requests of this export waited for the limits.
    pub fn throttled(&self) -> Duration {
        Duration::from_nanos(self.throttled_nanos.load(Ordering::Relaxed))
    }

    /// Requests of this export that waited for the limits.
    pub fn throttled_requests(&self) -> u64 {
        self.throttled_requests.load(Ordering::Relaxed)
    }

    /// Reserves a request of `ops` operations and `bytes` bytes at `now` in every bucket that applies, and returns
    /// how long it must wait before it may start. Reservations are taken in call order, so waits never reorder
    /// requests of one caller.
    pub fn reserve(&self, dir: Direction, ops: u64, bytes: u64, now: Instant) -> Duration {
        let mut g = self.buckets.lock();
        let tolerance = Duration::from_millis(g.limits.burst_ms);
        let b = &mut *g;
        let (dir_ops, dir_bytes) = match dir {
            Direction::Read => (&mut b.read_iops, &mut b.read_bytes),
            Direction::Write => (&mut b.write_iops, &mut b.write_bytes),
        };
        let mut charged: [(Option<&mut Bucket>, u64); 4] =
            [(b.iops.as_mut(), ops), (dir_ops.as_mut(), ops), (b.bytes.as_mut(), bytes), (dir_bytes.as_mut(), bytes)];
        // the earliest start every bucket allows
        let mut start = now;
        for (bucket, cost) in charged.iter_mut() {
            if let Some(bucket) = bucket {
                if *cost > 0 {
                    start = start.max(bucket.tat.checked_sub(tolerance).unwrap_or(now));
                }
            }
        }
        for (bucket, cost) in charged.iter_mut() {
            if let Some(bucket) = bucket {
                if *cost > 0 {
                    let inc = bucket.increment(*cost);
                    bucket.tat = bucket.tat.max(start) + inc;
                }
            }
        }
        let wait = start.saturating_duration_since(now);
        if !wait.is_zero() {
            self.throttled_nanos.fetch_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
            self.throttled_requests.fetch_add(1, Ordering::Relaxed);
        }
        wait
    }

    /// This export's flow in a [`FairQueue`].
    pub fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }
}

impl Default for Qos {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

/// A flow of a [`FairQueue`]: the virtual finish time of its last request and its requests in the backend. Owned by
/// whoever the flow is (an export's [`Qos`], or a connection); only the queue changes it, under its lock.
#[derive(Debug, Default)]
pub struct Flow {
    last_finish: AtomicU64,
    in_backend: AtomicU64,
}

#[derive(Debug)]
struct Waiter {
    start_tag: u64,
    seq: u64,
    flow: Arc<Flow>,
    tx: oneshot::Sender<FairPermit>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.start_tag, self.seq) == (other.start_tag, other.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.start_tag, self.seq).cmp(&(other.start_tag, other.seq))
    }
}

#[derive(Debug)]
struct FairState {
    /// Shared slots in use (above `slots` only while one flow was alone).
    shared_in_use: usize,
    free_express: usize,
    /// The flow that asked last (by address) and when.
    last_asker: Option<(usize, Instant)>,
    /// When a flow other than the last asker last asked: every ask since then was the last asker's.
    other_asked_at: Option<Instant>,
    virtual_time: u64,
    next_seq: u64,
    waiting: BinaryHeap<Reverse<Waiter>>,
}

/// Start-time fair queueing of backend slots between flows (see the module documentation).
#[derive(Debug)]
pub struct FairQueue {
    state: Mutex<FairState>,
    slots: usize,
    active_window: Duration,
}

impl FairQueue {
    /// A queue with `slots` requests in the backend at once (1 to [`MAX_FAIR_SLOTS`]).
    pub fn new(slots: usize) -> Arc<Self> {
        Self::with_active_window(slots, FLOW_ACTIVE_WINDOW)
    }

    /// A queue whose flows count as active for `active_window` after they last asked (tests use a long one).
    pub fn with_active_window(slots: usize, active_window: Duration) -> Arc<Self> {
        let slots = slots.clamp(1, MAX_FAIR_SLOTS);
        Arc::new(Self {
            state: Mutex::new(FairState {
                shared_in_use: 0,
                free_express: slots,
                last_asker: None,
                other_asked_at: None,
                virtual_time: 0,
                next_seq: 0,
                waiting: BinaryHeap::new(),
            }),
            slots,
            active_window,
        })
    }

    /// Slots this queue hands out.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.state.lock().waiting.len()
    }

    /// Waits for a backend slot for a request of `bytes` bytes of `flow`; the slot is held until the permit drops.
    /// Cancel-safe: dropping the future gives up the place (or the slot, if it was already handed over).
    pub async fn acquire(self: &Arc<Self>, flow: &Arc<Flow>, bytes: u64) -> FairPermit {
        let cost = bytes.saturating_add(FAIR_REQUEST_COST_BYTES);
        let rx = {
            let mut st = self.state.lock();
            let start_tag = st.virtual_time.max(flow.last_finish.load(Ordering::Relaxed));
            flow.last_finish.store(start_tag.saturating_add(cost), Ordering::Relaxed);
            let alone = st.note_active(flow, Instant::now(), self.active_window);
            let express = flow.in_backend.load(Ordering::Relaxed) == 0 && st.free_express > 0;
            if express || (st.waiting.is_empty() && (st.shared_in_use < self.slots || alone)) {
                if express {
                    st.free_express -= 1;
                } else {
                    st.shared_in_use += 1;
                }
                st.virtual_time = st.virtual_time.max(start_tag);
                flow.in_backend.fetch_add(1, Ordering::Relaxed);
                return FairPermit { queue: Some(self.clone()), flow: flow.clone(), express };
            }
            let (tx, rx) = oneshot::channel();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.waiting.push(Reverse(Waiter { start_tag, seq, flow: flow.clone(), tx }));
            rx
        };
        match rx.await {
            Ok(permit) => permit,
            // The queue never drops a waiter's sender without sending; if it did, run without a slot rather than
            // never.
            Err(_) => FairPermit { queue: None, flow: flow.clone(), express: false },
        }
    }

    /// A permit's slot comes free. An express slot goes back to the express slots; a shared one to the waiter with
    /// the smallest tag that is still waiting, or back to the shared slots.
    fn release(self: &Arc<Self>, flow: &Flow, express: bool) {
        let mut st = self.state.lock();
        flow.in_backend.fetch_sub(1, Ordering::Relaxed);
        if express {
            st.free_express += 1;
            debug_assert!(st.free_express <= self.slots);
            return;
        }
        st.shared_in_use -= 1;
        while st.shared_in_use < self.slots {
            let Some(Reverse(w)) = st.waiting.pop() else {
                return;
            };
            st.shared_in_use += 1;
            st.virtual_time = st.virtual_time.max(w.start_tag);
            w.flow.in_backend.fetch_add(1, Ordering::Relaxed);
            let permit = FairPermit { queue: Some(self.clone()), flow: w.flow.clone(), express: false };
            match w.tx.send(permit) {
                Ok(()) => return,
                // the waiter gave up: take back what the permit it did not take counted, disarm it, try the next
                Err(mut unused) => {
                    unused.flow.in_backend.fetch_sub(1, Ordering::Relaxed);
                    unused.queue = None;
                    st.shared_in_use -= 1;
                }
            }
        }
    }
}

impl FairState {
    /// Records that `flow` asks now; true when no other flow asked within `window`. Constant time: when the asker
    /// changes, the previous asker's last ask is the latest ask of any flow but the new one.
    fn note_active(&mut self, flow: &Arc<Flow>, now: Instant, window: Duration) -> bool {
        let me = Arc::as_ptr(flow) as usize;
        if let Some((last, at)) = self.last_asker {
            if last != me {
                self.other_asked_at = Some(at);
            }
        }
        self.last_asker = Some((me, now));
        self.other_asked_at.is_none_or(|at| now.saturating_duration_since(at) >= window)
    }
}

/// A backend slot of a [`FairQueue`], given back when dropped.
#[derive(Debug)]
pub struct FairPermit {
    queue: Option<Arc<FairQueue>>,
    flow: Arc<Flow>,
    express: bool,
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            q.release(&self.flow, self.express);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
        let mut l = Limits { burst_ms: 0, ..Limits::default() };
        f(&mut l);
        l
    }

    #[test]
    fn an_iops_limit_spaces_requests_evenly_after_the_burst() {
        let q = Qos::new(limits(|l| l.iops = Some(100)));
        let t0 = Instant::now();
        // with no burst, each request after the first waits 10 ms more than the one before
        let waits: Vec<Duration> = (0..5).map(|_| q.reserve(Direction::Read, 1, 4096, t0)).collect();
        assert_eq!(waits[0], Duration::ZERO);
        for (i, w) in waits.iter().enumerate() {
            assert_eq!(*w, Duration::from_millis(10 * i as u64), "{waits:?}");
        }
        assert_eq!(q.throttled(), Duration::from_millis(10 + 20 + 30 + 40));
        assert_eq!(q.throttled_requests(), 4);
    }

    #[test]
    fn a_burst_passes_at_once_then_the_rate_holds() {
        let q = Qos::new(Limits { iops: Some(100), burst_ms: 50, ..Limits::default() });
        let t0 = Instant::now();
        let waits: Vec<Duration> = (0..8).map(|_| q.reserve(Direction::Write, 1, 0, t0)).collect();
        // 50 ms of burst at 100/s: the first six start now (tat 0..50 ms within tolerance), then 10 ms apart
        assert!(waits[..6].iter().all(|w| w.is_zero()), "{waits:?}");
        assert_eq!(waits[6], Duration::from_millis(10));
        assert_eq!(waits[7], Duration::from_millis(20));
        // much later, the bucket is full again
        let later = t0 + Duration::from_secs(10);
        assert!(q.reserve(Direction::Write, 1, 0, later).is_zero());
    }

    #[test]
    fn reads_and_writes_are_limited_separately_and_together() {
        let q = Qos::new(limits(|l| {
            l.read_iops = Some(10);
            l.write_bytes_per_sec = Some(1 << 20);
        }));
        let t0 = Instant::now();
        assert!(q.reserve(Direction::Write, 1, 1 << 20, t0).is_zero());
        // the write bucket is a second ahead; reads are not held up by it
        assert!(q.reserve(Direction::Read, 1, 1 << 20, t0).is_zero());
        assert_eq!(q.reserve(Direction::Write, 1, 4096, t0), Duration::from_secs(1));
        assert_eq!(q.reserve(Direction::Read, 1, 0, t0), Duration::from_millis(100));
        // a trim (no bytes) is not held by a bytes limit
        assert!(q.reserve(Direction::Write, 1, 0, t0).is_zero());
    }

    #[test]
    fn new_limits_apply_at_once() {
        let q = Qos::new(limits(|l| l.iops = Some(1)));
        let t0 = Instant::now();
        q.reserve(Direction::Read, 1, 0, t0);
        assert_eq!(q.reserve(Direction::Read, 1, 0, t0), Duration::from_secs(1));
        q.set_limits(Limits::default());
        assert!(q.limits().is_unlimited());
        assert!(q.reserve(Direction::Read, 1, 0, t0 + Duration::from_millis(1)).is_zero());
    }

    #[test]
    fn limits_are_validated() {
        assert!(Limits::default().validate().is_ok());
        assert!(limits(|l| l.iops = Some(0)).validate().is_err());
        assert!(limits(|l| l.read_bytes_per_sec = Some(MIN_BYTES_PER_SEC - 1)).validate().is_err());
        assert!(limits(|l| l.burst_ms = MAX_BURST_MS + 1).validate().is_err());
        assert!(limits(|l| l.write_iops = Some(MIN_IOPS)).validate().is_ok());
    }

    #[tokio::test]
    async fn a_quiet_flow_goes_before_a_noisy_flows_queue() {
        let q = FairQueue::with_active_window(1, Duration::from_secs(600));
        let (noisy, quiet) = (Arc::new(Flow::default()), Arc::new(Flow::default()));
        // the quiet flow has been active (so the noisy one is not alone), then the noisy flow holds the express slot
        // and the shared one, queues ten more, then the quiet one asks
        drop(q.acquire(&quiet, 0).await);
        let held_express = q.acquire(&noisy, 4096).await;
        let held = q.acquire(&noisy, 4096).await;
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (q, f, tx) = (q.clone(), noisy.clone(), order_tx.clone());
            tasks.push(tokio::spawn(async move {
                let p = q.acquire(&f, 4096).await;
                let _ = tx.send(format!("noisy{i}"));
                drop(p);
            }));
            tokio::task::yield_now().await;
        }
        while q.waiting() < 10 {
            tokio::task::yield_now().await;
        }
        let (q2, f, tx) = (q.clone(), quiet.clone(), order_tx.clone());
        tasks.push(tokio::spawn(async move {
            let p = q2.acquire(&f, 4096).await;
            let _ = tx.send("quiet".to_string());
            drop(p);
        }));
        while q.waiting() < 11 {
            tokio::task::yield_now().await;
        }
        drop(held);
        drop(held_express);
        for t in tasks {
            t.await.expect("task");
        }
        drop(order_tx);
        let mut order = Vec::new();
        while let Some(s) = order_rx.recv().await {
            order.push(s);
        }
        let quiet_at = order.iter().position(|s| s == "quiet").expect("quiet ran");
        assert_eq!(quiet_at, 0, "the quiet flow ran at {quiet_at} of {order:?}");
        assert_eq!(order.len(), 11);
    }

    #[tokio::test]
    async fn an_idle_flow_starts_at_once_in_an_express_slot() {
        let q = FairQueue::with_active_window(2, Duration::from_secs(600));
        let (busy, idle, other) = (Arc::new(Flow::default()), Arc::new(Flow::default()), Arc::new(Flow::default()));
        drop(q.acquire(&other, 0).await);
        // the busy flow fills the shared slots (its first request took an express one)
        let held: Vec<FairPermit> =
            vec![q.acquire(&busy, 0).await, q.acquire(&busy, 0).await, q.acquire(&busy, 0).await];
        let now = Duration::from_secs(5);
        let first = tokio::time::timeout(now, q.acquire(&idle, 0)).await.expect("an idle flow starts at once");
        // a flow's second request waits for a shared slot
        assert!(tokio::time::timeout(Duration::from_millis(20), q.acquire(&idle, 0)).await.is_err());
        // express slots are as many as the shared ones: the third idle flow waits too
        assert!(tokio::time::timeout(Duration::from_millis(20), q.acquire(&other, 0)).await.is_err());
        drop(first);
        drop(held);
        let again = tokio::time::timeout(now, q.acquire(&other, 0)).await;
        assert!(again.is_ok(), "slots came back");
        assert_eq!(busy.in_backend.load(Ordering::Relaxed), 0);
        assert_eq!(idle.in_backend.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_flow_alone_is_not_held_to_the_shared_slots() {
        let q = FairQueue::with_active_window(2, Duration::from_secs(600));
        let (alone, late) = (Arc::new(Flow::default()), Arc::new(Flow::default()));
        let soon = Duration::from_secs(5);
        let not_now = Duration::from_millis(20);
        // one flow alone takes as many as it asks for (one express slot, then nine shared ones past the bound of 2)
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(tokio::time::timeout(soon, q.acquire(&alone, 0)).await.expect("not held"));
        }
        // a second flow's first request takes the other express slot; from then on the shared bound applies
        let express = tokio::time::timeout(soon, q.acquire(&late, 0)).await.expect("express");
        assert!(tokio::time::timeout(not_now, q.acquire(&alone, 0)).await.is_err(), "no longer alone");
        held.truncate(3); // the express slot and two shared ones: at the bound
        assert!(tokio::time::timeout(not_now, q.acquire(&late, 0)).await.is_err(), "the bound holds");
        held.truncate(2); // below it
        assert!(tokio::time::timeout(soon, q.acquire(&late, 0)).await.is_ok());
        drop(express);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_leak_its_slot() {
        let q = FairQueue::with_active_window(1, Duration::from_secs(600));
        let f = Arc::new(Flow::default());
        drop(q.acquire(&Arc::new(Flow::default()), 0).await);
        let held_express = q.acquire(&f, 0).await;
        let held = q.acquire(&f, 0).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(10), q.acquire(&f, 0)).await;
        assert!(gave_up.is_err());
        drop(held);
        drop(held_express);
        // the slot is free again: this does not hang
        let again = tokio::time::timeout(Duration::from_secs(5), q.acquire(&f, 0)).await;
        assert!(again.is_ok(), "the slot leaked");
    }
}
