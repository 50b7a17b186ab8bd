//! What a plan leads to in the status and in events, as pure functions: the status is written only when it
//! differs from the one recorded, and events are emitted for each change made and for each condition that changes,
//! so a pass over a settled cluster writes nothing.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::config::{describe_errors, StorageMode};
use crate::crd::{conditions, BlockmeshClusterStatus, PvcStatus};
use crate::plan::{Action, ConfigState, CreateReason, DeleteReason, Observed, Plan, Previous, PreviousPvc};

/// What the previous status recorded, as the planner reads it (unreadable entries are left out).
pub fn previous_from_status(status: Option<&BlockmeshClusterStatus>) -> Previous {
    let Some(s) = status else { return Previous::default() };
    Previous {
        applied_config: s.applied_config.clone(),
        storage_mode: s.storage_mode.as_deref().and_then(StorageMode::parse),
        pvcs: s
            .pvcs
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    PreviousPvc {
                        last_node: p.last_node.clone().or_else(|| p.node.clone()),
                        orphaned_since: p.orphaned_since.as_deref().and_then(|t| t.parse::<Timestamp>().ok()),
                    },
                )
            })
            .collect(),
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: None,
    }
}

/// The explanation given when a storage mode switch is refused.
pub fn mode_switch_message(requested: StorageMode, running: StorageMode) -> String {
    format!(
        "the ConfigMap asks for storageMode {requested} but the cluster runs {running}: switching storage modes in a \
         running cluster is not supported, as every node's pool would be left behind. Set storageMode back to \
         {running}, or create a new cluster in {requested} mode and pull the dots across (blockmesh pull)"
    )
}

/// The status after a pass.
pub fn build_status(
    plan: &Plan,
    observed: &Observed,
    previous: Option<&BlockmeshClusterStatus>,
) -> BlockmeshClusterStatus {
    let now = observed.now;
    let prev_conditions: &[Condition] = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let ready_pods: BTreeMap<&str, bool> =
        observed.pods.iter().map(|p| (p.name.as_str(), p.ready && !p.deleting)).collect();
    let ready_servers =
        plan.servers.iter().filter(|s| ready_pods.get(s.name.as_str()).copied().unwrap_or(false)).count();
    let servers = plan.servers.len();
    let orphaned: Vec<&str> = plan.pvcs.iter().filter(|p| p.node.is_none()).map(|p| p.name.as_str()).collect();
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);

    let config_condition = match &plan.config_state {
        ConfigState::Valid => condition(
            conditions::CONFIG_VALID,
            true,
            "Valid",
            "the blockmesh ConfigMap is valid and in force".into(),
            prev_conditions,
            now,
        ),
        ConfigState::Missing { kept_previous } => condition(
            conditions::CONFIG_VALID,
            false,
            "ConfigMapMissing",
            if *kept_previous {
                "there is no blockmesh ConfigMap: the last good configuration stays in force".into()
            } else {
                "there is no blockmesh ConfigMap: the defaults are in force".into()
            },
            prev_conditions,
            now,
        ),
        ConfigState::Invalid { errors, kept_previous } => condition(
            conditions::CONFIG_VALID,
            false,
            "Invalid",
            format!(
                "the blockmesh ConfigMap is invalid ({}); {}",
                describe_errors(errors),
                if *kept_previous {
                    "the last good configuration stays in force"
                } else {
                    "nothing is done until it is fixed"
                }
            ),
            prev_conditions,
            now,
        ),
    };
    let mode_condition = match plan.mode_switch {
        Some(m) => condition(
            conditions::MODE_SWITCH_REFUSED,
            true,
            "ModeSwitchRefused",
            mode_switch_message(m.requested, m.running),
            prev_conditions,
            now,
        ),
        None => condition(
            conditions::MODE_SWITCH_REFUSED,
            false,
            "NoSwitch",
            "the ConfigMap's storage mode is the cluster's".into(),
            prev_conditions,
            now,
        ),
    };
    let orphans_condition = if !plan.unservable_orphans.is_empty() {
        condition(
            conditions::ORPHANS_SERVED,
            false,
            "NoReadyNode",
            format!(
                "orphaned past the grace period, with no ready node in their zone to serve them: {}",
                plan.unservable_orphans.join(", ")
            ),
            prev_conditions,
            now,
        )
    } else if !orphaned.is_empty() {
        condition(
            conditions::ORPHANS_SERVED,
            false,
            "WithinGracePeriod",
            format!("without a server, within the grace period or moving: {}", orphaned.join(", ")),
            prev_conditions,
            now,
        )
    } else {
        condition(conditions::ORPHANS_SERVED, true, "AllServed", "every PVC is served".into(), prev_conditions, now)
    };
    let ready_condition = if plan.config.is_none() {
        condition(
            conditions::READY,
            false,
            "NoConfiguration",
            "no valid configuration yet".into(),
            prev_conditions,
            now,
        )
    } else if servers == 0 {
        condition(conditions::READY, false, "NoNodes", "no node matches nodeSelector".into(), prev_conditions, now)
    } else if ready_servers == servers {
        condition(
            conditions::READY,
            true,
            "AllServersReady",
            format!("{servers} of {servers} server pods ready"),
            prev_conditions,
            now,
        )
    } else {
        condition(
            conditions::READY,
            false,
            "ServersNotReady",
            format!("{ready_servers} of {servers} server pods ready"),
            prev_conditions,
            now,
        )
    };

    BlockmeshClusterStatus {
        storage_mode: plan
            .config
            .as_ref()
            .map(|c| c.storage_mode.as_str().to_string())
            .or_else(|| previous.and_then(|p| p.storage_mode.clone())),
        applied_config: plan
            .config
            .as_ref()
            .map(|c| c.data.clone())
            .or_else(|| previous.and_then(|p| p.applied_config.clone())),
        nodes: i32::try_from(plan.selected_nodes).unwrap_or(i32::MAX),
        servers: count(servers),
        ready_servers: count(ready_servers),
        orphaned_pvcs: count(orphaned.len()),
        pvcs: plan
            .pvcs
            .iter()
            .map(|p| PvcStatus {
                name: p.name.clone(),
                node: p.node.clone(),
                last_node: p.last_node.clone(),
                extra: p.extra,
                orphaned_since: p.orphaned_since.map(|t| t.to_string()),
            })
            .collect(),
        conditions: vec![config_condition, mode_condition, orphans_condition, ready_condition],
    }
}

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Something was done.
    Normal,
    /// Something is wrong.
    Warning,
}

/// An event to emit, about the `BlockmeshCluster` object (and, for changes, the pod or PVC concerned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    /// Severity.
    pub severity: Severity,
    /// Why (PascalCase).
    pub reason: String,
    /// What was done (PascalCase).
    pub action: String,
    /// For people.
    pub note: String,
    /// The pod or PVC concerned: (kind, name).
    pub related: Option<(&'static str, String)>,
}

/// The event of a change.
pub fn action_event(action: &Action) -> EventSpec {
    match action {
        Action::CreatePvc { name, node, .. } => EventSpec {
            severity: Severity::Normal,
            reason: "NodeWithoutServer".into(),
            action: "CreatePvc".into(),
            note: format!("created PVC {name} for node {node}: no released PVC could be adopted"),
            related: Some(("PersistentVolumeClaim", name.clone())),
        },
        Action::CreatePod { server, reason } => {
            let (why, note) = match reason {
                CreateReason::NodeWithoutServer => ("NodeWithoutServer", format!("node {} has no server", server.node)),
                CreateReason::AdoptPvc => (
                    "AdoptPvc",
                    format!("node {} adopts released PVC {}", server.node, server.pvc.as_deref().unwrap_or_default()),
                ),
                CreateReason::ServeOrphan => (
                    "ServeOrphan",
                    format!(
                        "PVC {} was orphaned past the grace period: an extra server on node {} serves its data",
                        server.pvc.as_deref().unwrap_or_default(),
                        server.node
                    ),
                ),
            };
            EventSpec {
                severity: Severity::Normal,
                reason: why.into(),
                action: "CreatePod".into(),
                note: format!("created server pod {}: {note}", server.name),
                related: Some(("Pod", server.name.clone())),
            }
        }
        Action::DeletePod { server, reason } => {
            let (why, note) = match reason {
                DeleteReason::NodeGone => ("NodeGone", format!("node {} is gone", server.node)),
                DeleteReason::NodeNotSelected => {
                    ("NodeNotSelected", format!("node {} no longer matches nodeSelector", server.node))
                }
                DeleteReason::Ended => ("PodEnded", "it ended (failed or evicted) and will be made again".into()),
                DeleteReason::PvcGone => {
                    ("PvcGone", format!("its PVC {} is gone", server.pvc.as_deref().unwrap_or_default()))
                }
                DeleteReason::Outdated => ("Outdated", "its spec is outdated; it will be made again".into()),
                DeleteReason::Rebalance { to_node } => (
                    "Rebalance",
                    format!(
                        "moving PVC {} from node {} to node {to_node}, which has no server",
                        server.pvc.as_deref().unwrap_or_default(),
                        server.node
                    ),
                ),
            };
            EventSpec {
                severity: if matches!(reason, DeleteReason::Ended | DeleteReason::PvcGone) {
                    Severity::Warning
                } else {
                    Severity::Normal
                },
                reason: why.into(),
                action: "DeletePod".into(),
                note: format!("deleted server pod {}: {note}", server.name),
                related: Some(("Pod", server.name.clone())),
            }
        }
    }
}

/// Events for the conditions that changed (status, reason or message) since the previous status.
pub fn condition_events(new: &BlockmeshClusterStatus, previous: Option<&BlockmeshClusterStatus>) -> Vec<EventSpec> {
    let prev: &[Condition] = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let mut events = Vec::new();
    for c in &new.conditions {
        let changed = !prev
            .iter()
            .any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason && p.message == c.message);
        if !changed {
            continue;
        }
        let bad = match c.type_.as_str() {
            conditions::MODE_SWITCH_REFUSED => c.status == "True",
            conditions::ORPHANS_SERVED => c.reason == "NoReadyNode",
            // Readiness comes and goes with pods: the status says it; events would flood.
            conditions::READY => continue,
            _ => c.status == "False",
        };
        if !bad && prev.is_empty() {
            // The first status of a healthy cluster: nothing worth an event.
            continue;
        }
        events.push(EventSpec {
            severity: if bad { Severity::Warning } else { Severity::Normal },
            reason: c.reason.clone(),
            action: "Reconcile".into(),
            note: c.message.clone(),
            related: None,
        });
    }
    events
}
