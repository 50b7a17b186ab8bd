//! `BlockmeshCluster` (`blockmesh.io/v1alpha1`): the object the operator reports on. Its configuration stays in the
//! Dotmesh-compatible `blockmesh` ConfigMap; the resource carries the status (`kubectl get blockmeshcluster -n
//! blockmesh`), the conditions, and what must survive an operator restart: the configuration in force (the last
//! good one), the storage mode, where each PVC was last served and since when each orphaned PVC has waited.
//! The operator creates the one object, `blockmesh`, in its namespace; events about what it did point at it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Name of the one `BlockmeshCluster` object, in the operator's namespace.
pub const CLUSTER_OBJECT_NAME: &str = "blockmesh";

/// Nothing to set: the configuration lives in the `blockmesh` ConfigMap, as Dotmesh's did.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[kube(
    group = "blockmesh.io",
    version = "v1alpha1",
    kind = "BlockmeshCluster",
    namespaced,
    status = "BlockmeshClusterStatus",
    shortname = "bmc",
    doc = "The blockmesh cluster the operator runs: its configuration is the blockmesh ConfigMap; its status says \
           what the operator did and why.",
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".status.storageMode"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes"}"#,
    printcolumn = r#"{"name": "Servers", "type": "integer", "jsonPath": ".status.servers"}"#,
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.readyServers"}"#,
    printcolumn = r#"{"name": "Orphans", "type": "integer", "jsonPath": ".status.orphanedPvcs"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
pub struct BlockmeshClusterSpec {}

/// What the operator last did and found.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockmeshClusterStatus {
    /// The storage mode in force (`local` or `pvcPerNode`); switching it in a running cluster is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_mode: Option<String>,
    /// The configuration in force: every ConfigMap key, defaults filled in. When the ConfigMap turns invalid, the
    /// operator goes on with this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config: Option<BTreeMap<String, String>>,
    /// Nodes selected by `nodeSelector`.
    #[serde(default)]
    pub nodes: i32,
    /// Server pods the operator runs (one per selected node, plus extra pods serving orphaned PVCs).
    #[serde(default)]
    pub servers: i32,
    /// Of those, the ones ready.
    #[serde(default)]
    pub ready_servers: i32,
    /// PVCs served by no node (pvcPerNode mode).
    #[serde(default)]
    pub orphaned_pvcs: i32,
    /// Every PVC of the cluster (pvcPerNode mode): where it is served, or since when it has waited.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pvcs: Vec<PvcStatus>,
    /// `ConfigValid`, `ModeSwitchRefused`, `OrphansServed`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One PVC of the cluster.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcStatus {
    /// The PVC (`pvc-UNIQUEID`).
    pub name: String,
    /// The node whose server pod serves it now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The node that served it last (kept while it waits, so that node gets it back first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_node: Option<String>,
    /// Served by an extra pod on a node that has its own PVC (it was orphaned past the grace period).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extra: bool,
    /// When it was last seen without a node (RFC 3339), while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphaned_since: Option<String>,
}

/// Condition types of the status.
pub mod conditions {
    /// The ConfigMap is valid and in force.
    pub const CONFIG_VALID: &str = "ConfigValid";
    /// The ConfigMap asks for another storage mode than the cluster's, and the operator refuses.
    pub const MODE_SWITCH_REFUSED: &str = "ModeSwitchRefused";
    /// No PVC waits past its grace period without a server.
    pub const ORPHANS_SERVED: &str = "OrphansServed";
    /// Every server pod the operator wants exists and is ready.
    pub const READY: &str = "Ready";
}

/// The CustomResourceDefinition as YAML, exactly as checked in at `operator/deploy/01-crd-blockmeshclusters.yaml`
/// (`blockmesh-operator crd` prints it; a test checks the file is up to date).
pub fn crd_yaml() -> crate::Result<String> {
    let body = serde_saphyr::to_string(&BlockmeshCluster::crd())
        .map_err(|e| crate::Error::Serialize { what: "the CRD".into(), message: e.to_string() })?;
    Ok(format!("# Generated by `blockmesh-operator crd` from operator/src/crd.rs: do not edit.\n{body}"))
}
