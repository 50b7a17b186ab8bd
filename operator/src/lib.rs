//! The blockmesh Kubernetes operator: runs one `blockmesh serve` pod per selected node, on host storage (`local`
//! mode) or on one PersistentVolumeClaim per node (`pvcPerNode` mode), carries PVCs over to replacement nodes,
//! serves PVCs orphaned past a grace period from an extra pod on a live node, and rebalances those extra pods onto
//! free nodes when the cluster grows again. The promises are Dotmesh's (its operator, its ConfigMap keys and names).
//!
//! The decisions are pure functions ([`plan::decide`]: observed nodes, pods, PVCs, ConfigMap and previous status in,
//! actions and the new status out); [`controller`] only lists what is there, carries the actions out and reports.
//!
//! | module | what lives there |
//! |---|---|
//! | [`config`] | the `blockmesh` ConfigMap: keys, defaults, validation |
//! | [`selector`] | Kubernetes label selectors (`nodeSelector`), parsed and matched |
//! | [`plan`] | the observed model, the actions and the decision function |
//! | [`resources`] | names, labels, the server pod and PVC objects, and reading observed objects back |
//! | [`report`] | the status and the events a plan leads to (pure) |
//! | [`crd`] | the `BlockmeshCluster` resource whose status reports what the operator did and why |
//! | [`controller`] | the kube-rs controller: reconcile, error policy with backoff, events |
//! | [`leader`] | leader election on a `Lease`: only the holder runs the controller |
//! | [`metrics`] | Prometheus metrics |
#![forbid(unsafe_code)]

pub mod config;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod report;
pub mod resources;
pub mod selector;

/// Everything that can go wrong in the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call {call} failed: {source}")]
    Kube {
        /// What was being done (`create pod server-a`).
        call: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// An object could not be turned into JSON or YAML (a bug, not an input problem).
    #[error("serializing {what}: {message}")]
    Serialize {
        /// What was being serialized.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// The operator's own settings (flags, environment) are unusable.
    #[error("invalid operator setting: {0}")]
    Settings(String),
    /// This replica stopped leading (it could not renew the leader lease in time, or another holder took it).
    #[error("lost the leader lease: {0}")]
    LeadershipLost(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a client error with what was being done.
    pub fn kube(call: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube { call: call.into(), source }
    }
}
