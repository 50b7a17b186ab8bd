//! Leader election on a `coordination.k8s.io/v1` `Lease`, so that two operator processes never reconcile at once.
//!
//! Every replica is a candidate. The `Lease` [`LEASE_NAME`] in the operator's namespace names its holder
//! (`holderIdentity`, the pod name), when it was taken (`acquireTime`) and last renewed (`renewTime`), how long it
//! holds without a renewal (`leaseDurationSeconds`) and how often it changed hands (`leaseTransitions`). A candidate
//! takes the lease when it is absent, released (no holder) or expired: another holder's lease expires when this
//! candidate has seen it unchanged (the same `resourceVersion`) for `leaseDurationSeconds` by its own clock, as
//! client-go's election does, so clocks that disagree between nodes do not matter (the `renewTime` written by the
//! holder is only compared with the holder's own clock);
//! every write carries the `resourceVersion` it read, so of two candidates racing for it the API server lets one
//! win and answers the other `409 Conflict` (that one stays a follower).
//!
//! The leader renews every [`LeaseTimings::renew_interval`]. If it has not renewed within the lease duration of its
//! last successful renewal (API errors, a hanging call), or it sees another holder in the lease, it stops leading at
//! once: [`Elector::lead`] drops the controller and returns [`Error::LeadershipLost`], and the process exits non-zero
//! so that Kubernetes restarts it as a follower. When the controller ends on its own (SIGTERM), the leader releases
//! the lease (clears `holderIdentity`), so a successor takes over without waiting for it to expire.
//!
//! The decisions are pure: [`decide`] (observed lease, now, my identity, whether I lead -> acquire, renew, wait or
//! lost), [`claimed`] and [`released`] (the lease to write); [`Elector`] only reads, writes and waits.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

use crate::controller::{api_code, FIELD_MANAGER};
use crate::metrics::{LeadershipEvent, Metrics};
use crate::{Error, Result};

/// Name of the `Lease` object (in the operator's namespace).
pub const LEASE_NAME: &str = "blockmesh-operator";
/// How long a lease holds without a renewal, by default (`--lease-duration-seconds`).
pub const DEFAULT_LEASE_DURATION_SECONDS: u32 = 15;
/// How often the leader renews, by default (`--lease-renew-interval-seconds`).
pub const DEFAULT_RENEW_INTERVAL_SECONDS: u32 = 5;
/// How often a follower tries to take the lease, and the leader retries a failed renewal, by default
/// (`--lease-retry-interval-seconds`).
pub const DEFAULT_RETRY_INTERVAL_SECONDS: u32 = 2;

/// The election's durations, validated: the renewal and retry intervals are shorter than the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    lease_duration_seconds: u32,
    renew_interval: Duration,
    retry_interval: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            lease_duration_seconds: DEFAULT_LEASE_DURATION_SECONDS,
            renew_interval: Duration::from_secs(u64::from(DEFAULT_RENEW_INTERVAL_SECONDS)),
            retry_interval: Duration::from_secs(u64::from(DEFAULT_RETRY_INTERVAL_SECONDS)),
        }
    }
}

impl LeaseTimings {
    /// Checks the durations: a lease of at least one second (and at most `i32::MAX`, the field's type), renewal and
    /// retry intervals above zero and shorter than the lease (a leader must get a second try before it expires).
    pub fn new(lease_duration_seconds: u32, renew_interval: Duration, retry_interval: Duration) -> Result<Self> {
        if lease_duration_seconds == 0 || i32::try_from(lease_duration_seconds).is_err() {
            return Err(Error::Settings(format!(
                "lease duration must be 1 to {} seconds, not {lease_duration_seconds}",
                i32::MAX
            )));
        }
        let lease = Duration::from_secs(u64::from(lease_duration_seconds));
        for (name, d) in [("renew interval", renew_interval), ("retry interval", retry_interval)] {
            if d.is_zero() || d >= lease {
                return Err(Error::Settings(format!(
                    "lease {name} must be above zero and shorter than the lease duration ({lease_duration_seconds} s), \
                     not {d:?}"
                )));
            }
        }
        Ok(LeaseTimings { lease_duration_seconds, renew_interval, retry_interval })
    }

    /// [`LeaseTimings::new`] with whole seconds (the command line's flags).
    pub fn from_seconds(lease_duration: u32, renew_interval: u32, retry_interval: u32) -> Result<Self> {
        Self::new(
            lease_duration,
            Duration::from_secs(u64::from(renew_interval)),
            Duration::from_secs(u64::from(retry_interval)),
        )
    }

    /// How long the lease holds without a renewal.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_duration_seconds))
    }

    /// How often the leader renews.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval
    }

    /// How often a follower tries again, and the leader retries a failed renewal.
    pub fn retry_interval(&self) -> Duration {
        self.retry_interval
    }

    fn lease_duration_field(&self) -> i32 {
        // Validated by the constructor.
        i32::try_from(self.lease_duration_seconds).unwrap_or(i32::MAX)
    }
}

/// An identity for a candidate without a pod name: the hostname and a random suffix, so two processes on one host
/// differ.
pub fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "blockmesh-operator".to_string());
    // The standard library seeds each RandomState randomly: no random number crate needed for a suffix.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{host}-{:08x}", hasher.finish() & 0xffff_ffff)
}

/// What a candidate does about the lease it observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The lease is absent, released or expired (or was mine before this process started): take it, writing
    /// `transitions` as `leaseTransitions`.
    Acquire {
        /// The `leaseTransitions` to write: one more than observed when the holder changes.
        transitions: i32,
    },
    /// The lease is mine and I lead: renew it.
    Renew,
    /// Another holder's lease is valid: follow, and try again later.
    Wait {
        /// Who holds it.
        holder: String,
        /// When it expires without a renewal.
        expires: Timestamp,
    },
    /// I was leading and the lease is no longer mine (another holder, released, or expired before I renewed it):
    /// stop at once.
    Lost {
        /// Who holds it now, if anyone.
        holder: Option<String>,
    },
}

/// When a lease expires: its `renewTime` (else its `acquireTime`) plus its `leaseDurationSeconds` (else
/// `default_duration`). `None` when it has neither time: nobody is renewing it, so it counts as expired.
pub fn expiry(spec: &LeaseSpec, default_duration: Duration) -> Option<Timestamp> {
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let seconds = match spec.lease_duration_seconds {
        Some(s) if s > 0 => i64::from(s),
        _ => i64::try_from(default_duration.as_secs()).unwrap_or(i64::MAX),
    };
    Some(renewed.checked_add(SignedDuration::from_secs(seconds)).unwrap_or(Timestamp::MAX))
}

/// The decision, from the observed lease (`None`: absent), the time to judge it at (the elector passes another
/// holder's renewal time plus how long it has seen that renewal: [`Elector`]'s own clock), my identity and whether I
/// lead now. A lease
/// expires at [`expiry`] exactly (`now >= expiry` is expired); one without a holder (or an empty one) is free;
/// `default_duration` stands in for a missing `leaseDurationSeconds`.
pub fn decide(lease: Option<&Lease>, now: Timestamp, me: &str, leading: bool, default_duration: Duration) -> Decision {
    let Some(spec) = lease.map(|l| l.spec.clone().unwrap_or_default()) else {
        return if leading { Decision::Lost { holder: None } } else { Decision::Acquire { transitions: 0 } };
    };
    let transitions = spec.lease_transitions.unwrap_or(0).max(0);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let valid_until = expiry(&spec, default_duration).filter(|e| now < *e);
    match (holder, valid_until) {
        (Some(h), Some(_)) if h == me => Decision::Renew,
        (Some(h), None) if h == me => {
            if leading {
                Decision::Lost { holder: Some(h) }
            } else {
                Decision::Acquire { transitions }
            }
        }
        (holder, _) if leading => Decision::Lost { holder },
        (Some(h), Some(expires)) => Decision::Wait { holder: h, expires },
        (_, _) => Decision::Acquire { transitions: transitions.saturating_add(1) },
    }
}

/// The lease to write to take or renew it at `now`: the observed object (its `resourceVersion` makes the write
/// fail on a concurrent change) with me as holder. `acquiring` sets `acquireTime` and `transitions`; a renewal
/// changes only `renewTime` and the duration.
pub fn claimed(
    observed: Option<&Lease>,
    namespace: &str,
    me: &str,
    now: Timestamp,
    timings: &LeaseTimings,
    acquiring: Option<i32>,
) -> Lease {
    let mut lease = observed.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(LEASE_NAME.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        spec: None,
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(me.to_string());
    spec.lease_duration_seconds = Some(timings.lease_duration_field());
    spec.renew_time = Some(MicroTime(now));
    if let Some(transitions) = acquiring {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(transitions);
    }
    lease
}

/// The lease to write to release it at `now`: no holder (so [`decide`] finds it free at once), the rest kept.
pub fn released(observed: &Lease, now: Timestamp) -> Lease {
    let mut lease = observed.clone();
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(now));
    lease
}

/// What one round of the election came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Round {
    /// I hold the lease (taken or renewed).
    Leading,
    /// Another holder's valid lease.
    Following(String),
    /// Another candidate wrote the lease between my read and my write (`409 Conflict`).
    Conflict,
    /// The lease is no longer mine.
    Lost(Option<String>),
}

/// A candidate for the lease: takes it, renews it, releases it.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    identity: String,
    timings: LeaseTimings,
    metrics: Arc<Metrics>,
    /// Another holder's lease as this candidate first saw it: its `resourceVersion`, and when (this process's
    /// monotonic clock). Expiry of another's lease counts from then, not from its `renewTime`.
    seen: std::sync::Mutex<Option<(String, Instant)>>,
}

impl Elector {
    /// A candidate named `identity` for the lease in `namespace`; `metrics` says whether it leads.
    pub fn new(
        client: Client,
        namespace: &str,
        identity: impl Into<String>,
        timings: LeaseTimings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            identity: identity.into(),
            timings,
            metrics,
            seen: std::sync::Mutex::new(None),
        }
    }

    /// The time [`decide`] judges `observed` at. My own lease (or a free one) at the wall clock; another holder's at
    /// its renewal time plus how long this candidate has seen that very version unchanged, so it expires after a
    /// whole lease duration of this candidate's own clock, whatever the holder's clock says.
    fn decision_time(&self, observed: Option<&Lease>) -> Timestamp {
        let other = observed.and_then(|l| {
            let spec = l.spec.as_ref()?;
            let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty() && *h != self.identity)?;
            let base = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
            Some((holder, base, l.metadata.resource_version.clone().unwrap_or_default()))
        });
        let Some((_, base, version)) = other else { return Timestamp::now() };
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.as_ref().is_none_or(|(v, _)| *v != version) {
            *seen = Some((version, Instant::now()));
        }
        let unchanged = seen.as_ref().map_or(Duration::ZERO, |(_, at)| at.elapsed());
        let unchanged = SignedDuration::try_from(unchanged).unwrap_or(SignedDuration::MAX);
        base.checked_add(unchanged).unwrap_or(Timestamp::MAX)
    }

    /// This candidate's `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Reads the lease, decides and writes: one round.
    async fn round(&self, leading: bool) -> Result<Round> {
        let observed = self.api.get_opt(LEASE_NAME).await.map_err(|e| Error::kube("get lease", e))?;
        let at = self.decision_time(observed.as_ref());
        let now = Timestamp::now();
        let acquiring = match decide(observed.as_ref(), at, &self.identity, leading, self.timings.lease_duration()) {
            Decision::Wait { holder, .. } => return Ok(Round::Following(holder)),
            Decision::Lost { holder } => return Ok(Round::Lost(holder)),
            Decision::Renew if leading => None,
            // My own valid lease, from before this process: keep its transitions, take it anew.
            Decision::Renew => Some(observed.as_ref().and_then(|l| l.spec.as_ref()?.lease_transitions).unwrap_or(0)),
            Decision::Acquire { transitions } => Some(transitions),
        };
        let lease = claimed(observed.as_ref(), &self.namespace, &self.identity, now, &self.timings, acquiring);
        let post = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let written = match observed {
            None => self.api.create(&post, &lease).await,
            Some(_) => self.api.replace(LEASE_NAME, &post, &lease).await,
        };
        match written {
            Ok(_) => {
                if let Some(transitions) = acquiring {
                    tracing::info!(identity = %self.identity, transitions, "acquired the leader lease");
                }
                Ok(Round::Leading)
            }
            Err(e) if api_code(&e) == Some(409) => Ok(Round::Conflict),
            Err(e) => Err(Error::kube(if leading { "renew lease" } else { "acquire lease" }, e)),
        }
    }

    /// Tries until this candidate holds the lease; returns when the successful round started (the lease holds until
    /// then plus its duration).
    async fn acquire(&self) -> Instant {
        loop {
            let started = Instant::now();
            match self.round(false).await {
                Ok(Round::Leading) => return started,
                Ok(Round::Following(holder)) => tracing::debug!(%holder, "following the leader"),
                Ok(Round::Conflict) => tracing::debug!("another candidate took the lease first"),
                Ok(Round::Lost(_)) => {}
                Err(e) => tracing::warn!(error = %e, "could not take the leader lease; will retry"),
            }
            tokio::time::sleep(self.timings.retry_interval).await;
        }
    }

    /// Renews until the lease is lost: another holder seen, or no renewal within the lease duration of the last one
    /// (the lease acquired at `since`). Returns why.
    async fn hold(&self, since: Instant) -> Error {
        let mut valid_until = since + self.timings.lease_duration();
        let mut wait = self.timings.renew_interval;
        loop {
            tokio::time::sleep_until((Instant::now() + wait).min(valid_until)).await;
            let started = Instant::now();
            if started >= valid_until {
                return Error::LeadershipLost("the lease could not be renewed before it expired".into());
            }
            match tokio::time::timeout_at(valid_until, self.round(true)).await {
                Err(_) => return Error::LeadershipLost("renewing the lease took until it expired".into()),
                Ok(Ok(Round::Leading)) => {
                    valid_until = started + self.timings.lease_duration();
                    wait = self.timings.renew_interval;
                }
                Ok(Ok(Round::Lost(holder))) => {
                    return Error::LeadershipLost(format!(
                        "the lease now names {}",
                        holder.as_deref().unwrap_or("no holder")
                    ))
                }
                Ok(Ok(Round::Following(holder))) => {
                    return Error::LeadershipLost(format!("the lease now names {holder}"))
                }
                Ok(Ok(Round::Conflict)) => {
                    tracing::warn!("the lease changed while renewing it; checking again");
                    wait = self.timings.retry_interval;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not renew the leader lease; will retry until it expires");
                    wait = self.timings.retry_interval;
                }
            }
        }
    }

    /// Gives the lease up if this candidate holds it (a failure is logged: the lease then expires on its own).
    pub async fn release(&self) {
        let result = async {
            let Some(observed) = self.api.get_opt(LEASE_NAME).await.map_err(|e| Error::kube("get lease", e))? else {
                return Ok(false);
            };
            if observed.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.identity.as_str()) {
                return Ok(false);
            }
            let lease = released(&observed, Timestamp::now());
            let post = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            self.api.replace(LEASE_NAME, &post, &lease).await.map_err(|e| Error::kube("release lease", e))?;
            Ok::<_, Error>(true)
        };
        match tokio::time::timeout(self.timings.lease_duration(), result).await {
            Ok(Ok(true)) => {
                self.metrics.leadership(LeadershipEvent::Released);
                tracing::info!(identity = %self.identity, "released the leader lease");
            }
            Ok(Ok(false)) => {
                tracing::info!(identity = %self.identity, "the leader lease was no longer mine to release")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lease; it will expire"),
            Err(_) => tracing::warn!("releasing the leader lease timed out; it will expire"),
        }
    }

    /// Follows until this candidate takes the lease (or `shutdown` completes first: `Ok`), then runs `work` (the
    /// controller) while renewing. `work` ending (it should on shutdown) releases the lease and gives its result;
    /// losing the lease drops `work` at once and gives [`Error::LeadershipLost`].
    pub async fn lead(
        &self,
        work: impl std::future::Future<Output = Result<()>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        tracing::info!(identity = %self.identity, lease = LEASE_NAME, "candidate for the leader lease");
        let since = tokio::select! {
            since = self.acquire() => since,
            () = shutdown => {
                tracing::info!("shutting down as a follower");
                return Ok(());
            }
        };
        self.metrics.leadership(LeadershipEvent::Acquired);
        let outcome = tokio::select! {
            r = work => r,
            lost = self.hold(since) => {
                self.metrics.leadership(LeadershipEvent::Lost);
                tracing::error!(identity = %self.identity, reason = %lost, "lost the leader lease; stopped");
                return Err(lost);
            }
        };
        self.metrics.leader.set(0);
        self.release().await;
        outcome
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const ME: &str = "operator-a";
    const OTHER: &str = "operator-b";
    const T: i64 = 1_800_000_000;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: Option<i64>, duration: Option<i32>, transitions: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: renewed.map(|s| MicroTime(ts(s))),
                acquire_time: renewed.map(|s| MicroTime(ts(s - 100))),
                lease_duration_seconds: duration,
                lease_transitions: transitions,
                ..Default::default()
            }),
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn decisions_table() {
        let held = |h| Some(lease(Some(h), Some(T), Some(10), Some(3)));
        let wait = |expires| Decision::Wait { holder: OTHER.into(), expires: ts(expires) };
        let cases: Vec<(&str, Option<Lease>, i64, bool, Decision)> = vec![
            ("absent: create it", None, T, false, Decision::Acquire { transitions: 0 }),
            ("absent while leading: deleted under me", None, T, true, Decision::Lost { holder: None }),
            ("another's valid lease", held(OTHER), T + 5, false, wait(T + 10)),
            ("another's lease a second before expiry", held(OTHER), T + 9, false, wait(T + 10)),
            (
                "another's lease exactly at expiry is expired",
                held(OTHER),
                T + 10,
                false,
                Decision::Acquire { transitions: 4 },
            ),
            ("another's expired lease", held(OTHER), T + 60, false, Decision::Acquire { transitions: 4 }),
            ("my valid lease while leading", held(ME), T + 9, true, Decision::Renew),
            ("my valid lease from a previous process", held(ME), T + 9, false, Decision::Renew),
            (
                "my lease exactly at expiry while leading",
                held(ME),
                T + 10,
                true,
                Decision::Lost { holder: Some(ME.into()) },
            ),
            (
                "my expired lease from a previous process: no transition",
                held(ME),
                T + 10,
                false,
                Decision::Acquire { transitions: 3 },
            ),
            (
                "another's valid lease while I lead",
                held(OTHER),
                T + 1,
                true,
                Decision::Lost { holder: Some(OTHER.into()) },
            ),
            (
                "another's expired lease while I lead",
                held(OTHER),
                T + 60,
                true,
                Decision::Lost { holder: Some(OTHER.into()) },
            ),
            (
                "released (no holder)",
                Some(lease(None, Some(T), Some(10), Some(3))),
                T,
                false,
                Decision::Acquire { transitions: 4 },
            ),
            (
                "released while I lead",
                Some(lease(None, Some(T), Some(10), Some(3))),
                T,
                true,
                Decision::Lost { holder: None },
            ),
            (
                "empty holder is no holder",
                Some(lease(Some(""), Some(T), Some(10), None)),
                T,
                false,
                Decision::Acquire { transitions: 1 },
            ),
            ("clock behind the renewal: still valid", held(OTHER), T - 30, false, wait(T + 10)),
        ];
        for (name, observed, now, leading, want) in cases {
            assert_eq!(decide(observed.as_ref(), ts(now), ME, leading, D), want, "{name}");
        }
    }

    #[test]
    fn leases_with_missing_fields() {
        // No spec at all: free.
        let bare = Lease { metadata: ObjectMeta::default(), spec: None };
        assert_eq!(decide(Some(&bare), ts(T), ME, false, D), Decision::Acquire { transitions: 1 });
        // A holder but no times: nobody renews it, so it is expired.
        let no_times = lease(Some(OTHER), None, Some(10), Some(2));
        assert_eq!(decide(Some(&no_times), ts(T), ME, false, D), Decision::Acquire { transitions: 3 });
        // No renewTime: acquireTime counts (T - 100 + 10 has passed at T).
        let mut acquired_only = lease(Some(OTHER), Some(T), Some(200), None);
        acquired_only.spec.as_mut().unwrap().renew_time = None;
        assert_eq!(
            decide(Some(&acquired_only), ts(T), ME, false, D),
            Decision::Wait { holder: OTHER.into(), expires: ts(T + 100) }
        );
        // No leaseDurationSeconds (or a nonsense one): my default duration counts.
        for duration in [None, Some(0), Some(-5)] {
            let l = lease(Some(OTHER), Some(T), duration, None);
            assert_eq!(
                decide(Some(&l), ts(T + 14), ME, false, D),
                Decision::Wait { holder: OTHER.into(), expires: ts(T + 15) }
            );
            assert_eq!(decide(Some(&l), ts(T + 15), ME, false, D), Decision::Acquire { transitions: 1 });
        }
        // Negative or absurd transitions and durations do not overflow.
        let odd = lease(Some(OTHER), Some(T), Some(i32::MAX), Some(i32::MAX));
        assert!(matches!(decide(Some(&odd), ts(T), ME, false, D), Decision::Wait { .. }));
        let odd = lease(Some(OTHER), Some(T), Some(1), Some(i32::MAX));
        assert_eq!(decide(Some(&odd), ts(T + 1), ME, false, D), Decision::Acquire { transitions: i32::MAX });
        let odd = lease(None, Some(T), Some(1), Some(-3));
        assert_eq!(decide(Some(&odd), ts(T), ME, false, D), Decision::Acquire { transitions: 1 });
    }

    #[test]
    fn claimed_and_released_leases() {
        let timings = LeaseTimings::default();
        let new = claimed(None, "ns", ME, ts(T), &timings, Some(0));
        assert_eq!(new.metadata.name.as_deref(), Some(LEASE_NAME));
        assert_eq!(new.metadata.namespace.as_deref(), Some("ns"));
        let spec = new.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.acquire_time, Some(MicroTime(ts(T))));
        assert_eq!(spec.renew_time, Some(MicroTime(ts(T))));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));

        let observed = lease(Some(OTHER), Some(T), Some(10), Some(3));
        let taken = claimed(Some(&observed), "ns", ME, ts(T + 20), &timings, Some(4));
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("7"), "the write is conditional");
        let spec = taken.spec.unwrap();
        assert_eq!(
            (spec.holder_identity.as_deref(), spec.lease_transitions, spec.acquire_time),
            (Some(ME), Some(4), Some(MicroTime(ts(T + 20))))
        );

        let mine = lease(Some(ME), Some(T), Some(15), Some(4));
        let renewed = claimed(Some(&mine), "ns", ME, ts(T + 5), &timings, None).spec.unwrap();
        assert_eq!(renewed.renew_time, Some(MicroTime(ts(T + 5))));
        assert_eq!(renewed.acquire_time, Some(MicroTime(ts(T - 100))), "a renewal keeps acquireTime");
        assert_eq!(renewed.lease_transitions, Some(4));

        let gone = released(&mine, ts(T + 6));
        assert_eq!(gone.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(gone.spec.as_ref().unwrap().holder_identity, None);
        assert_eq!(decide(Some(&gone), ts(T + 6), OTHER, false, D), Decision::Acquire { transitions: 5 });
    }

    #[test]
    fn timings_are_validated() {
        let s = Duration::from_secs;
        assert_eq!(LeaseTimings::from_seconds(15, 5, 2).unwrap(), LeaseTimings::default());
        assert!(LeaseTimings::new(1, Duration::from_millis(300), Duration::from_millis(100)).is_ok());
        for (lease, renew, retry) in [(0, s(1), s(1)), (15, s(15), s(2)), (15, s(20), s(2)), (15, s(0), s(2))] {
            assert!(matches!(LeaseTimings::new(lease, renew, retry), Err(Error::Settings(_))), "{lease} {renew:?}");
        }
        assert!(LeaseTimings::new(15, s(5), s(15)).is_err());
        assert!(LeaseTimings::new(u32::MAX, s(5), s(2)).is_err());
    }

    #[test]
    fn default_identities_differ() {
        let (a, b) = (default_identity(), default_identity());
        assert_ne!(a, b);
        assert!(!a.is_empty());
    }
}
