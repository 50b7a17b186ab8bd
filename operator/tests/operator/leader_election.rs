//! Leader election against the in-process fake API server (`fake_api`, which serves leases with resourceVersion
//! checks and 409 Conflict like a real API server): two candidates started together (one leads), a leader that
//! vanishes (the follower takes over once the lease expires), a leader whose renewals fail or whose lease another
//! holder overwrites (it stops its work before the lease expires), and a graceful release (the follower takes over
//! at once). Short leases (1 s, or 5 s where "at once" must be told from "after expiry"); every wait is bounded.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fake_api::*;
use blockmesh_operator::leader::{Elector, LeaseTimings, LEASE_NAME};
use blockmesh_operator::metrics::Metrics;
use blockmesh_operator::Error;
use http::Method;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SHORT: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A 1 s lease, renewed every 200 ms, retried every 100 ms.
fn short_lease() -> LeaseTimings {
    LeaseTimings::new(1, ms(200), ms(100)).unwrap()
}

/// Sets its flag to false when dropped: the work future was dropped (or ended).
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A candidate running [`Elector::lead`] in a task, its work a stand-in for the controller.
struct Candidate {
    name: &'static str,
    metrics: Arc<Metrics>,
    /// True while its work runs (the controller would be reconciling).
    working: Arc<AtomicBool>,
    /// Ends its work (as SIGTERM ends the controller).
    stop: Option<oneshot::Sender<()>>,
    /// Stops it while it follows.
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

fn start(api: &FakeApi, name: &'static str, timings: LeaseTimings) -> Candidate {
    let metrics = Arc::new(Metrics::new());
    let elector = Elector::new(api.client(), NS, name, timings, metrics.clone());
    let working = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = oneshot::channel::<()>();
    let (shutdown, shut) = oneshot::channel::<()>();
    let flag = working.clone();
    let work = async move {
        flag.store(true, Ordering::SeqCst);
        let _running = Running(flag);
        let _ = stopped.await;
        Ok(())
    };
    let task = tokio::spawn(async move {
        elector
            .lead(work, async move {
                let _ = shut.await;
            })
            .await
    });
    Candidate { name, metrics, working, stop: Some(stop), shutdown: Some(shutdown), task }
}

impl Candidate {
    fn working(&self) -> bool {
        self.working.load(Ordering::SeqCst)
    }
}

/// Polls `cond` every 10 ms for at most `limit`; false when it never held.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ms(10)).await;
    }
}

fn lease(api: &FakeApi) -> Value {
    api.get(LEASES, LEASE_NAME).expect("the lease exists")
}

fn holder(api: &FakeApi) -> Option<String> {
    api.get(LEASES, LEASE_NAME).and_then(|l| l.pointer("/spec/holderIdentity").and_then(Value::as_str).map(Into::into))
}

fn time_field(lease: &Value, field: &str) -> Timestamp {
    lease["spec"][field].as_str().unwrap().parse().unwrap()
}

fn transitions(api: &FakeApi) -> i64 {
    lease(api)["spec"]["leaseTransitions"].as_i64().unwrap()
}

async fn finished(c: Candidate) -> Result<(), Error> {
    tokio::time::timeout(Duration::from_secs(3), c.task).await.expect("the candidate ends").expect("joins")
}

#[tokio::test]
async fn two_candidates_started_together_one_leads_the_other_follows() {
    let api = FakeApi::new();
    let mut a = start(&api, "operator-a", short_lease());
    let mut b = start(&api, "operator-b", short_lease());
    assert!(eventually(SHORT * 3, || a.working() || b.working()).await, "nobody leads: {:?}", api.take_calls());
    // Watch for longer than a lease: renewals and retries go on, and never do both work.
    let until = tokio::time::Instant::now() + ms(1500);
    while tokio::time::Instant::now() < until {
        assert!(a.working() != b.working(), "exactly one works: a {} b {}", a.working(), b.working());
        tokio::time::sleep(ms(5)).await;
    }
    let (leader, follower) = if a.working() { (&mut a, &mut b) } else { (&mut b, &mut a) };
    assert_eq!(holder(&api).as_deref(), Some(leader.name));
    assert!(leader.metrics.is_leader() && !follower.metrics.is_leader());
    let text = leader.metrics.encode();
    assert!(text.contains("blockmesh_operator_leader 1"), "{text}");
    assert!(text.contains("blockmesh_operator_leadership_transitions_total{event=\"acquired\"} 1"), "{text}");
    assert!(follower.metrics.encode().contains("blockmesh_operator_leader 0"));
    assert_eq!(transitions(&api), 0, "a first acquisition is no transition");
    let calls = api.take_calls();
    assert!(calls.iter().any(|c| c.starts_with(&format!("PUT {LEASES}/{LEASE_NAME}"))), "renewals: {calls:?}");
    // A follower shuts down without ever leading; the leader's work ending ends it too.
    follower.shutdown.take().unwrap().send(()).unwrap();
    leader.stop.take().unwrap().send(()).unwrap();
    let (leader_name, follower_metrics) = (leader.name, follower.metrics.clone());
    finished(a).await.unwrap();
    finished(b).await.unwrap();
    assert!(!follower_metrics.encode().contains("event=\"acquired\""));
    assert_ne!(holder(&api).as_deref(), Some(leader_name), "released on the way out");
}

#[tokio::test]
async fn a_vanished_leader_is_succeeded_once_its_lease_expires() {
    let api = FakeApi::new();
    let a = start(&api, "operator-a", short_lease());
    assert!(eventually(SHORT * 2, || a.working()).await);
    let b = start(&api, "operator-b", short_lease());
    tokio::time::sleep(ms(300)).await;
    assert!(!b.working(), "b follows while a renews");
    // a stops renewing without releasing (a node partition, a killed process).
    a.task.abort();
    let _ = a.task.await;
    let last_renewal = time_field(&lease(&api), "renewTime");
    assert_eq!(holder(&api).as_deref(), Some("operator-a"));
    assert!(eventually(SHORT * 3, || b.working()).await, "b never took over: {:?}", lease(&api));
    let taken = lease(&api);
    assert_eq!(taken["spec"]["holderIdentity"], json!("operator-b"));
    assert_eq!(taken["spec"]["leaseTransitions"], json!(1));
    let acquired = time_field(&taken, "acquireTime");
    assert!(
        acquired >= last_renewal + SignedDuration::from_secs(1),
        "taken at {acquired}, before a's lease (renewed {last_renewal}) expired"
    );
    assert!(b.metrics.is_leader());
}

#[tokio::test]
async fn a_leader_whose_renewals_fail_stops_working_before_its_lease_expires() {
    let api = FakeApi::new();
    let a = start(&api, "operator-a", short_lease());
    assert!(eventually(SHORT * 2, || a.working()).await);
    tokio::time::sleep(ms(300)).await;
    api.fail(Method::GET, LEASES, 500);
    api.fail(Method::PUT, LEASES, 500);
    // The last renewal that got through, read after the failures began.
    let last_renewal = time_field(&lease(&api), "renewTime");
    let expires = last_renewal + SignedDuration::from_secs(1);
    assert!(eventually(SHORT * 2, || !a.working()).await, "still working with a failing API");
    let stopped = Timestamp::now();
    assert!(
        stopped <= expires + SignedDuration::from_millis(100),
        "stopped at {stopped}, after the lease expired at {expires}"
    );
    let metrics = a.metrics.clone();
    let err = finished(a).await.unwrap_err();
    assert!(matches!(err, Error::LeadershipLost(_)), "{err}");
    assert!(metrics.encode().contains("blockmesh_operator_leadership_transitions_total{event=\"lost\"} 1"));
    assert!(!metrics.is_leader());
    // Healed, a new candidate (the restarted process) takes the lease once it has expired.
    api.heal();
    let again = start(&api, "operator-a", short_lease());
    assert!(eventually(SHORT * 2, || again.working()).await);
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_in_its_lease_stops_at_once() {
    let api = FakeApi::new();
    let a = start(&api, "operator-a", short_lease());
    assert!(eventually(SHORT * 2, || a.working()).await);
    let now = Timestamp::now().to_string();
    api.patch(LEASES, LEASE_NAME, json!({ "spec": { "holderIdentity": "intruder", "renewTime": now } }));
    // Within a renewal interval or two, not a lease duration.
    assert!(eventually(ms(600), || !a.working()).await, "still working after the lease changed hands");
    let err = finished(a).await.unwrap_err();
    assert!(err.to_string().contains("intruder"), "{err}");
    assert_eq!(holder(&api).as_deref(), Some("intruder"), "a loser writes nothing");
}

#[tokio::test]
async fn a_graceful_release_hands_over_at_once() {
    let api = FakeApi::new();
    // A 5 s lease: taking over within a second can only come from the release.
    let timings = LeaseTimings::new(5, ms(200), ms(100)).unwrap();
    let mut a = start(&api, "operator-a", timings);
    assert!(eventually(SHORT * 2, || a.working()).await);
    let b = start(&api, "operator-b", timings);
    tokio::time::sleep(ms(300)).await;
    assert!(!b.working());
    let released_at = tokio::time::Instant::now();
    a.stop.take().unwrap().send(()).unwrap();
    let a_metrics = a.metrics.clone();
    finished(a).await.unwrap();
    assert!(a_metrics.encode().contains("blockmesh_operator_leadership_transitions_total{event=\"released\"} 1"));
    assert!(eventually(SHORT, || b.working()).await, "b did not take over at once: {:?}", lease(&api));
    assert!(released_at.elapsed() < SHORT * 2);
    assert_eq!(holder(&api).as_deref(), Some("operator-b"));
    assert_eq!(transitions(&api), 1);
}

#[tokio::test]
async fn two_candidates_racing_for_an_expired_lease_take_it_once() {
    let api = FakeApi::new();
    // A lease left by a process long gone; both candidates read it, and the API server's resourceVersion check lets
    // one replace it (the other's write, if it overlaps, is answered 409 Conflict).
    api.put(
        LEASES,
        json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": LEASE_NAME, "namespace": NS, "resourceVersion": "5" },
                "spec": { "holderIdentity": "ghost", "renewTime": "2020-01-01T00:00:00.000000Z",
                          "acquireTime": "2020-01-01T00:00:00.000000Z", "leaseDurationSeconds": 1,
                          "leaseTransitions": 7 } }),
    );
    let a = start(&api, "operator-a", short_lease());
    let b = start(&api, "operator-b", short_lease());
    assert!(eventually(SHORT * 3, || a.working() || b.working()).await);
    let until = tokio::time::Instant::now() + ms(500);
    while tokio::time::Instant::now() < until {
        assert!(a.working() != b.working(), "exactly one works");
        tokio::time::sleep(ms(5)).await;
    }
    assert_eq!(transitions(&api), 8, "one takeover, one transition");
    let leader = if a.working() { "operator-a" } else { "operator-b" };
    assert_eq!(holder(&api).as_deref(), Some(leader));
}

#[tokio::test]
async fn a_follower_times_another_holder_s_lease_by_its_own_clock() {
    let api = FakeApi::new();
    // A holder on a node whose clock is an hour behind: every renewal it writes names a time long past, yet it
    // renews (the resourceVersion moves). A follower judging by renewTime alone would take the lease at once.
    let skewed = |n: u64| {
        json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": LEASE_NAME, "namespace": NS, "resourceVersion": format!("skewed-{n}") },
                "spec": { "holderIdentity": "operator-x", "renewTime": "2020-01-01T00:00:00.000000Z",
                          "acquireTime": "2020-01-01T00:00:00.000000Z", "leaseDurationSeconds": 1,
                          "leaseTransitions": 3 } })
    };
    api.put(LEASES, skewed(0));
    let renewing = Arc::new(AtomicBool::new(true));
    let (writer_api, flag) = (api.clone(), renewing.clone());
    let renewer = tokio::spawn(async move {
        let mut n = 1;
        while flag.load(Ordering::SeqCst) {
            tokio::time::sleep(ms(200)).await;
            writer_api.put(LEASES, skewed(n));
            n += 1;
        }
    });
    let b = start(&api, "operator-b", short_lease());
    // two lease durations while the skewed holder renews: b follows
    let until = tokio::time::Instant::now() + SHORT * 2;
    while tokio::time::Instant::now() < until {
        assert!(!b.working(), "took a lease its holder kept renewing: {:?}", lease(&api));
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(holder(&api).as_deref(), Some("operator-x"));
    // the holder stops renewing: b takes over once it has seen the lease unchanged for a lease duration
    renewing.store(false, Ordering::SeqCst);
    renewer.await.unwrap();
    let stopped = tokio::time::Instant::now();
    assert!(eventually(SHORT * 3, || b.working()).await, "b never took over: {:?}", lease(&api));
    assert!(
        stopped.elapsed() >= SHORT - ms(50),
        "took over {:?} after the last renewal, within a lease",
        stopped.elapsed()
    );
    assert_eq!(holder(&api).as_deref(), Some("operator-b"));
    assert_eq!(transitions(&api), 4);
}
