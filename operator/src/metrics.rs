//! Prometheus metrics of the operator, served at `GET /metrics` on its metrics address (OpenMetrics text):
//!
//! - `blockmesh_operator_reconciles_total{result}`: passes, `ok` or `error`;
//! - `blockmesh_operator_reconcile_duration_seconds`: how long a pass took (histogram, 1 ms to about 30 s);
//! - `blockmesh_operator_actions_total{action,reason}`: pods created and deleted, PVCs created, and why;
//! - `blockmesh_operator_config_valid`: 1 when the ConfigMap is valid and in force, 0 when it is refused;
//! - `blockmesh_operator_mode_switch_refused`: 1 while the ConfigMap asks for another storage mode;
//! - `blockmesh_operator_nodes`, `..._servers`, `..._ready_servers`, `..._orphaned_pvcs`: the status's figures;
//! - `blockmesh_operator_consecutive_failures`: failed passes in a row (what the backoff grows with);
//! - `blockmesh_operator_leader`: 1 while this replica holds the leader lease (and runs the controller), else 0;
//! - `blockmesh_operator_leadership_transitions_total{event}`: this replica's lease `acquired`, `lost` or `released`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::plan::{Action, CreateReason, DeleteReason};

/// First bucket of the pass duration histogram (1 ms), doubling...
const DURATION_BUCKET_START_SECONDS: f64 = 1e-3;
/// ...this many times (to about 30 s).
const DURATION_BUCKETS: u16 = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeadershipLabels {
    event: &'static str,
}

/// A change of this replica's leadership ([`Metrics::leadership`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadershipEvent {
    /// It took the lease and started the controller.
    Acquired,
    /// It could not renew the lease in time, or saw another holder: it stopped the controller.
    Lost,
    /// It gave the lease up on shutdown.
    Released,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
    reason: &'static str,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    actions: Family<ActionLabels, Counter>,
    /// 1 when the ConfigMap is valid and in force.
    pub config_valid: Gauge,
    /// 1 while a storage mode switch is refused.
    pub mode_switch_refused: Gauge,
    /// Selected nodes.
    pub nodes: Gauge,
    /// Server pods wanted.
    pub servers: Gauge,
    /// Server pods ready.
    pub ready_servers: Gauge,
    /// PVCs without a server.
    pub orphaned_pvcs: Gauge,
    /// Failed passes in a row.
    pub consecutive_failures: Gauge,
    /// 1 while this replica leads (also what `/readyz` reports).
    pub leader: Gauge,
    leadership: Family<LeadershipLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("blockmesh_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "Reconcile passes by result", reconciles.clone());
        let duration = Histogram::new(exponential_buckets(DURATION_BUCKET_START_SECONDS, 2.0, DURATION_BUCKETS));
        registry.register_with_unit(
            "reconcile_duration",
            "Time a reconcile pass took",
            Unit::Seconds,
            duration.clone(),
        );
        let actions = Family::<ActionLabels, Counter>::default();
        registry.register("actions", "Changes made to the cluster, by action and reason", actions.clone());
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let config_valid = gauge(&mut registry, "config_valid", "1 when the blockmesh ConfigMap is valid and in force");
        let mode_switch_refused =
            gauge(&mut registry, "mode_switch_refused", "1 while the ConfigMap asks for another storage mode");
        let nodes = gauge(&mut registry, "nodes", "Nodes selected by nodeSelector");
        let servers = gauge(&mut registry, "servers", "Server pods wanted");
        let ready_servers = gauge(&mut registry, "ready_servers", "Server pods ready");
        let orphaned_pvcs = gauge(&mut registry, "orphaned_pvcs", "PVCs served by no node");
        let consecutive_failures = gauge(&mut registry, "consecutive_failures", "Failed reconcile passes in a row");
        let leader = gauge(&mut registry, "leader", "1 while this replica holds the leader lease and reconciles");
        let leadership = Family::<LeadershipLabels, Counter>::default();
        registry.register(
            "leadership_transitions",
            "This replica's leader lease acquired, lost or released",
            leadership.clone(),
        );
        Metrics {
            registry,
            reconciles,
            duration,
            actions,
            config_valid,
            mode_switch_refused,
            nodes,
            servers,
            ready_servers,
            orphaned_pvcs,
            consecutive_failures,
            leader,
            leadership,
        }
    }

    /// Counts a leadership change and sets `leader` to match.
    pub fn leadership(&self, event: LeadershipEvent) {
        let (label, leading) = match event {
            LeadershipEvent::Acquired => ("acquired", 1),
            LeadershipEvent::Lost => ("lost", 0),
            LeadershipEvent::Released => ("released", 0),
        };
        self.leadership.get_or_create(&LeadershipLabels { event: label }).inc();
        self.leader.set(leading);
    }

    /// Whether this replica leads (the `leader` gauge).
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// Counts a pass.
    pub fn pass(&self, ok: bool, seconds: f64) {
        self.reconciles.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" } }).inc();
        self.duration.observe(seconds);
    }

    /// Counts a change made.
    pub fn action(&self, action: &Action) {
        let (action, reason) = action_labels(action);
        self.actions.get_or_create(&ActionLabels { action, reason }).inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `(action, reason)` labels of an action (also the events' action and reason, in PascalCase there).
pub fn action_labels(action: &Action) -> (&'static str, &'static str) {
    match action {
        Action::CreatePvc { .. } => ("create_pvc", "node_without_server"),
        Action::CreatePod { reason, .. } => (
            "create_pod",
            match reason {
                CreateReason::NodeWithoutServer => "node_without_server",
                CreateReason::AdoptPvc => "adopt_pvc",
                CreateReason::ServeOrphan => "serve_orphan",
            },
        ),
        Action::DeletePod { reason, .. } => (
            "delete_pod",
            match reason {
                DeleteReason::NodeGone => "node_gone",
                DeleteReason::NodeNotSelected => "node_not_selected",
                DeleteReason::Ended => "ended",
                DeleteReason::PvcGone => "pvc_gone",
                DeleteReason::Outdated => "outdated",
                DeleteReason::Rebalance { .. } => "rebalance",
            },
        ),
    }
}
