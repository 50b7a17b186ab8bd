//! The reconcile decisions, as pure functions: what the cluster looks like ([`Observed`]) in, what to do about it
//! and what to report ([`Plan`]) out. Nothing here talks to the API, reads a clock or draws a random number, so every
//! scenario is a table test and a second pass over the state a first pass produced plans nothing.
//!
//! The rules (Dotmesh's operator and its PV-per-node mode):
//!
//! - one server pod per node matching `nodeSelector` (`local`: `server-NODE`, the pool in a host directory;
//!   `pvcPerNode`: `server-PVC-node-NODE`, the pool on that node's PVC);
//! - a node that goes away (or stops matching) has its pod deleted; in pvcPerNode mode its PVC is released;
//! - a node without a server adopts a released PVC (the one it served last first, then one created for it, then
//!   the longest waiting, only within its zone) before a new PVC is created for it;
//! - a PVC released longer than the grace period is served by an extra pod on the ready node with the fewest
//!   servers, so its data comes back; nothing happens before then (a rolling upgrade gives its node back in time);
//! - when a node has no server and another node runs extra pods, one extra pod at a time is moved to it (deleted;
//!   the free node adopts the PVC on the next pass) rather than a new PVC being created;
//! - a pod whose spec is outdated (new configuration or image) is replaced one at a time, only while every other
//!   server is ready and nothing else is in flight;
//! - PVCs are never deleted: they hold data;
//! - an invalid ConfigMap changes nothing: the last good configuration stays in force; a ConfigMap asking for the
//!   other storage mode than the one the cluster runs is refused the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::config::{ClusterConfig, ConfigError, StorageMode};
use crate::resources::{self, Settings};

/// A node as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Node UID (a replacement node of the same name has another).
    pub uid: String,
    /// Its labels (what `nodeSelector` matches).
    pub labels: BTreeMap<String, String>,
    /// Its Ready condition is True.
    pub ready: bool,
    /// It is being deleted.
    pub deleting: bool,
}

impl NodeInfo {
    /// The node's zone (`topology.kubernetes.io/zone`), if labelled.
    pub fn zone(&self) -> Option<&str> {
        self.labels.get(resources::ZONE_LABEL).map(String::as_str)
    }
}

/// A server pod the operator made, as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// The node it was made for.
    pub node: String,
    /// The PVC it serves (pvcPerNode mode).
    pub pvc: Option<String>,
    /// The storage mode it was made for (`None`: unreadable label).
    pub mode: Option<StorageMode>,
    /// Hash of the spec it was made with.
    pub spec_hash: Option<String>,
    /// When it was created.
    pub created: Option<Timestamp>,
    /// It is being deleted.
    pub deleting: bool,
    /// It ended (phase Failed or Succeeded, as an evicted pod): it will not run again.
    pub ended: bool,
    /// Its Ready condition is True.
    pub ready: bool,
}

/// A pool PVC the operator made, as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PvcInfo {
    /// PVC name (`pvc-UNIQUEID`).
    pub name: String,
    /// The node it was created for.
    pub created_for: Option<String>,
    /// The zone of that node, when it had one (its volume is likely bound to the zone).
    pub zone: Option<String>,
    /// When it was created.
    pub created: Option<Timestamp>,
    /// It is being deleted.
    pub deleting: bool,
}

/// What the previous pass recorded in the status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Previous {
    /// The configuration that was in force (ConfigMap data, every key).
    pub applied_config: Option<BTreeMap<String, String>>,
    /// The storage mode that was in force.
    pub storage_mode: Option<StorageMode>,
    /// Per PVC: the node that served it last, and since when it has waited without one.
    pub pvcs: BTreeMap<String, PreviousPvc>,
}

/// A PVC's record in the previous status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreviousPvc {
    /// The node that served it last.
    pub last_node: Option<String>,
    /// Since when it has waited without a server.
    pub orphaned_since: Option<Timestamp>,
}

/// Everything one pass decides from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The time of the pass.
    pub now: Timestamp,
    /// The `blockmesh` ConfigMap's data (`None`: there is no ConfigMap).
    pub config_map: Option<BTreeMap<String, String>>,
    /// Every node.
    pub nodes: Vec<NodeInfo>,
    /// The server pods the operator made.
    pub pods: Vec<PodInfo>,
    /// The pool PVCs the operator made.
    pub pvcs: Vec<PvcInfo>,
    /// The previous status.
    pub previous: Previous,
}

/// A server pod wanted: where, serving what.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Server {
    /// Pod name.
    pub name: String,
    /// Node it runs on.
    pub node: String,
    /// PVC it serves (pvcPerNode mode).
    pub pvc: Option<String>,
}

impl Server {
    /// The server of a node in local mode.
    pub fn local(node: &str) -> Self {
        Server { name: resources::local_pod_name(node), node: node.to_string(), pvc: None }
    }

    /// The server of a PVC on a node in pvcPerNode mode.
    pub fn on_pvc(pvc: &str, node: &str) -> Self {
        Server { name: resources::pvc_pod_name(pvc, node), node: node.to_string(), pvc: Some(pvc.to_string()) }
    }
}

/// Why a pod is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreateReason {
    /// A selected node has no server (local mode, or with a new PVC).
    NodeWithoutServer,
    /// A node without a server takes over a released PVC.
    AdoptPvc,
    /// A PVC orphaned past the grace period is served by an extra pod on a live node.
    ServeOrphan,
}

/// Why a pod is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeleteReason {
    /// Its node is gone.
    NodeGone,
    /// Its node no longer matches `nodeSelector`.
    NodeNotSelected,
    /// It ended (failed or evicted) and will not run again.
    Ended,
    /// Its PVC is gone.
    PvcGone,
    /// Its spec is outdated (configuration or image changed).
    Outdated,
    /// It is an extra pod moved to a node without a server.
    Rebalance {
        /// The node that will adopt its PVC.
        to_node: String,
    },
}

/// One change to make.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Create a pool PVC for a node.
    CreatePvc {
        /// `pvc-UNIQUEID`.
        name: String,
        /// The node it is for.
        node: String,
        /// That node's zone.
        zone: Option<String>,
    },
    /// Create a server pod.
    CreatePod {
        /// The pod.
        server: Server,
        /// Why.
        reason: CreateReason,
    },
    /// Delete a server pod.
    DeletePod {
        /// The pod.
        server: Server,
        /// Why.
        reason: DeleteReason,
    },
}

/// The state of the ConfigMap this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigState {
    /// Valid and in force.
    Valid,
    /// There is no ConfigMap: the defaults (first start) or the last good configuration are in force.
    Missing {
        /// The last good configuration stays in force (else the defaults are).
        kept_previous: bool,
    },
    /// Invalid: the last good configuration stays in force (or, on a first start, nothing is done).
    Invalid {
        /// Every problem.
        errors: Vec<ConfigError>,
        /// A last good configuration stays in force.
        kept_previous: bool,
    },
}

/// A storage mode switch the operator refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSwitch {
    /// What the ConfigMap asks for.
    pub requested: StorageMode,
    /// What the cluster runs.
    pub running: StorageMode,
}

/// A PVC after this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvcOutcome {
    /// The PVC.
    pub name: String,
    /// The node serving it after this pass's actions.
    pub node: Option<String>,
    /// The node that served it last.
    pub last_node: Option<String>,
    /// Served by an extra pod.
    pub extra: bool,
    /// Waiting without a server since.
    pub orphaned_since: Option<Timestamp>,
}

/// What one pass decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The configuration in force (`None`: there is none yet; nothing is done).
    pub config: Option<ClusterConfig>,
    /// What became of the ConfigMap.
    pub config_state: ConfigState,
    /// A storage mode switch refused this pass.
    pub mode_switch: Option<ModeSwitch>,
    /// The changes, in the order to make them.
    pub actions: Vec<Action>,
    /// Nodes selected by `nodeSelector`.
    pub selected_nodes: u32,
    /// The server pods wanted once the actions are done (kept and created).
    pub servers: Vec<Server>,
    /// Every PVC (pvcPerNode mode), by name.
    pub pvcs: Vec<PvcOutcome>,
    /// PVCs waiting past their grace period that no node can serve (no ready node in their zone).
    pub unservable_orphans: Vec<String>,
    /// Why things wait, for the log and the status (`server-a is outdated: waits for server-b to be ready`).
    pub waiting: Vec<String>,
    /// Pods of the other storage mode, left alone (they would serve data the refused switch would abandon).
    pub foreign_pods: Vec<String>,
    /// The next time something is due without any change in the cluster (an orphan's grace period ending).
    pub requeue_after: Option<Duration>,
}

/// Decides one pass. Pure: the same [`Observed`] always gives the same [`Plan`].
pub fn decide(observed: &Observed, settings: &Settings) -> Plan {
    let (config, config_state) = effective_config(observed);
    let mut plan = Plan {
        config: None,
        config_state,
        mode_switch: None,
        actions: Vec::new(),
        selected_nodes: 0,
        servers: Vec::new(),
        pvcs: Vec::new(),
        unservable_orphans: Vec::new(),
        waiting: Vec::new(),
        foreign_pods: Vec::new(),
        requeue_after: None,
    };
    let Some(mut config) = config else {
        return plan;
    };
    if let Some(running) = running_mode(observed) {
        if running != config.storage_mode {
            plan.mode_switch = Some(ModeSwitch { requested: config.storage_mode, running });
            config = match previous_config(observed) {
                Some(prev) if prev.storage_mode == running => prev,
                // No usable record of the last configuration: the new one, in the mode the cluster runs.
                _ => {
                    let mut data = config.data.clone();
                    data.insert(crate::config::KEY_STORAGE_MODE.to_string(), running.as_str().to_string());
                    ClusterConfig { storage_mode: running, data, ..config }
                }
            };
        }
    }
    let selected: BTreeMap<&str, &NodeInfo> = observed
        .nodes
        .iter()
        .filter(|n| !n.deleting && config.node_selector.matches(&n.labels))
        .map(|n| (n.name.as_str(), n))
        .collect();
    plan.selected_nodes = u32::try_from(selected.len()).unwrap_or(u32::MAX);
    match config.storage_mode {
        StorageMode::Local => plan_local(observed, settings, &config, &selected, &mut plan),
        StorageMode::PvcPerNode => plan_pvc_per_node(observed, settings, &config, &selected, &mut plan),
    }
    plan.servers.sort();
    plan.config = Some(config);
    plan
}

/// The configuration in force and what became of the ConfigMap.
fn effective_config(observed: &Observed) -> (Option<ClusterConfig>, ConfigState) {
    let previous = previous_config(observed);
    match &observed.config_map {
        None => {
            let kept_previous = previous.is_some();
            (Some(previous.unwrap_or_else(ClusterConfig::defaults)), ConfigState::Missing { kept_previous })
        }
        Some(data) => match ClusterConfig::from_data(data) {
            Ok(c) => (Some(c), ConfigState::Valid),
            Err(errors) => {
                let kept_previous = previous.is_some();
                (previous, ConfigState::Invalid { errors, kept_previous })
            }
        },
    }
}

fn previous_config(observed: &Observed) -> Option<ClusterConfig> {
    observed.previous.applied_config.as_ref().and_then(|d| ClusterConfig::from_data(d).ok())
}

/// The storage mode the cluster runs: what its objects say (server pods of a mode; PVCs mean pvcPerNode), else
/// what the last status said; `None` for a fresh cluster.
pub fn running_mode(observed: &Observed) -> Option<StorageMode> {
    let pod_modes: BTreeSet<StorageMode> = observed.pods.iter().filter_map(|p| p.mode).collect();
    if pod_modes.contains(&StorageMode::Local) {
        Some(StorageMode::Local)
    } else if pod_modes.contains(&StorageMode::PvcPerNode) || observed.pvcs.iter().any(|p| !p.deleting) {
        Some(StorageMode::PvcPerNode)
    } else {
        observed.previous.storage_mode
    }
}

fn delete_reason(node: &str, observed: &Observed) -> DeleteReason {
    match observed.nodes.iter().find(|n| n.name == node) {
        Some(n) if !n.deleting => DeleteReason::NodeNotSelected,
        _ => DeleteReason::NodeGone,
    }
}

fn server_of(pod: &PodInfo) -> Server {
    Server { name: pod.name.clone(), node: pod.node.clone(), pvc: pod.pvc.clone() }
}

/// Replaces at most one outdated pod, and only when nothing else is in flight and every server is ready.
fn roll_outdated(kept: &[&PodInfo], outdated: &[&PodInfo], observed: &Observed, plan: &mut Plan) {
    let Some(first) = outdated.first() else { return };
    let in_flight = !plan.actions.is_empty() || observed.pods.iter().any(|p| p.deleting);
    let unready: Vec<&str> = kept.iter().filter(|p| !p.ready).map(|p| p.name.as_str()).collect();
    if in_flight {
        plan.waiting.push(format!("{} outdated pod(s) wait for the other changes to finish", outdated.len()));
    } else if let Some(u) = unready.first() {
        plan.waiting.push(format!("{} is outdated: waits for {u} to be ready", first.name));
    } else {
        plan.actions.push(Action::DeletePod { server: server_of(first), reason: DeleteReason::Outdated });
    }
}

fn plan_local(
    observed: &Observed,
    settings: &Settings,
    config: &ClusterConfig,
    selected: &BTreeMap<&str, &NodeInfo>,
    plan: &mut Plan,
) {
    let mut pods: Vec<&PodInfo> = observed.pods.iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    let mut occupied: BTreeSet<&str> = BTreeSet::new();
    let (mut kept, mut outdated) = (Vec::new(), Vec::new());
    for pod in pods {
        if pod.mode != Some(StorageMode::Local) {
            plan.foreign_pods.push(pod.name.clone());
            continue;
        }
        let wanted = Server::local(&pod.node);
        if pod.deleting {
            occupied.insert(pod.node.as_str());
            continue;
        }
        if !selected.contains_key(pod.node.as_str()) {
            let reason = delete_reason(&pod.node, observed);
            plan.actions.push(Action::DeletePod { server: server_of(pod), reason });
            continue;
        }
        occupied.insert(pod.node.as_str());
        if pod.ended {
            plan.actions.push(Action::DeletePod { server: server_of(pod), reason: DeleteReason::Ended });
            continue;
        }
        plan.servers.push(wanted.clone());
        kept.push(pod);
        if pod.spec_hash.as_deref() != Some(resources::spec_hash(settings, config, &wanted).as_str()) {
            outdated.push(pod);
        }
    }
    for node in selected.keys() {
        if !occupied.contains(node) {
            let server = Server::local(node);
            plan.servers.push(server.clone());
            plan.actions.push(Action::CreatePod { server, reason: CreateReason::NodeWithoutServer });
        }
    }
    roll_outdated(&kept, &outdated, observed, plan);
}

fn zone_fits(pvc: &PvcInfo, node: &NodeInfo) -> bool {
    match (pvc.zone.as_deref(), node.zone()) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

fn plan_pvc_per_node(
    observed: &Observed,
    settings: &Settings,
    config: &ClusterConfig,
    selected: &BTreeMap<&str, &NodeInfo>,
    plan: &mut Plan,
) {
    let now = observed.now;
    let pvcs: BTreeMap<&str, &PvcInfo> = observed.pvcs.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut pods: Vec<&PodInfo> = observed.pods.iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));

    // PVCs referenced by any pod (kept, being deleted, or deleted now: the volume stays attached until it is gone).
    let mut held: BTreeSet<&str> = BTreeSet::new();
    // Nodes with any pod at all.
    let mut occupied: BTreeSet<&str> = BTreeSet::new();
    // Kept pods per node.
    let mut on_node: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
    let (mut kept, mut outdated) = (Vec::new(), Vec::new());
    for pod in pods {
        if pod.mode != Some(StorageMode::PvcPerNode) {
            plan.foreign_pods.push(pod.name.clone());
            continue;
        }
        if let Some(p) = pod.pvc.as_deref() {
            held.insert(p);
        }
        if pod.deleting {
            occupied.insert(pod.node.as_str());
            continue;
        }
        let Some(pvc) = pod.pvc.as_deref().filter(|p| pvcs.contains_key(p)) else {
            plan.actions.push(Action::DeletePod { server: server_of(pod), reason: DeleteReason::PvcGone });
            continue;
        };
        if !selected.contains_key(pod.node.as_str()) {
            let reason = delete_reason(&pod.node, observed);
            plan.actions.push(Action::DeletePod { server: server_of(pod), reason });
            continue;
        }
        occupied.insert(pod.node.as_str());
        if pod.ended {
            plan.actions.push(Action::DeletePod { server: server_of(pod), reason: DeleteReason::Ended });
            continue;
        }
        let wanted = Server::on_pvc(pvc, &pod.node);
        on_node.entry(pod.node.as_str()).or_default().push(pod);
        kept.push(pod);
        if pod.spec_hash.as_deref() != Some(resources::spec_hash(settings, config, &wanted).as_str()) {
            outdated.push(pod);
        }
    }
    let deletions_in_flight = observed.pods.iter().any(|p| p.deleting) || !plan.actions.is_empty();

    // Released PVCs, and the nodes without a server.
    let mut free: Vec<&PvcInfo> =
        observed.pvcs.iter().filter(|p| !p.deleting && !held.contains(p.name.as_str())).collect();
    free.sort_by(|a, b| a.name.cmp(&b.name));
    let free_nodes: Vec<&NodeInfo> =
        selected.values().filter(|n| !occupied.contains(n.name.as_str())).copied().collect();

    // Planned pods per node (kept and created), for placing extra pods.
    let mut load: BTreeMap<&str, usize> = selected.keys().map(|n| (*n, 0)).collect();
    for (node, ps) in &on_node {
        *load.entry(node).or_default() += ps.len();
    }
    let mut serving: BTreeMap<String, (String, bool)> = BTreeMap::new(); // pvc -> (node, extra)
    for ps in on_node.values() {
        let mut ps = ps.clone();
        ps.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        for (i, p) in ps.iter().enumerate() {
            if let Some(pvc) = &p.pvc {
                serving.insert(pvc.clone(), (p.node.clone(), i > 0));
            }
        }
    }
    // Extra pods (every pod of a node but its oldest), the ones to move first first: most loaded node, newest pod.
    let mut extras: Vec<&PodInfo> = Vec::new();
    let mut donors: Vec<(&str, &Vec<&PodInfo>)> = on_node.iter().map(|(n, ps)| (*n, ps)).collect();
    donors.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    for (_, ps) in donors {
        let mut ps = ps.clone();
        ps.sort_by(|a, b| b.created.cmp(&a.created).then(b.name.cmp(&a.name)));
        let n = ps.len();
        extras.extend(ps.into_iter().take(n.saturating_sub(1)));
    }

    let previous = &observed.previous.pvcs;
    let last_node_of = |pvc: &str| previous.get(pvc).and_then(|p| p.last_node.clone());
    let since_of = |pvc: &str| previous.get(pvc).and_then(|p| p.orphaned_since).unwrap_or(now);
    let mut existing_names: BTreeSet<String> = observed.pvcs.iter().map(|p| p.name.clone()).collect();
    let mut claimed_extras: BTreeSet<&str> = BTreeSet::new();
    let mut rebalancing = false;
    for node in free_nodes {
        // 1. adopt a released PVC
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, p)| zone_fits(p, node))
            .min_by_key(|(_, p)| {
                (
                    last_node_of(&p.name).as_deref() != Some(node.name.as_str()),
                    p.created_for.as_deref() != Some(node.name.as_str()),
                    since_of(&p.name),
                    p.name.clone(),
                )
            })
            .map(|(i, _)| i);
        if let Some(i) = best {
            let pvc = free.remove(i);
            let server = Server::on_pvc(&pvc.name, &node.name);
            serving.insert(pvc.name.clone(), (node.name.clone(), false));
            *load.entry(node.name.as_str()).or_default() += 1;
            plan.servers.push(server.clone());
            plan.actions.push(Action::CreatePod { server, reason: CreateReason::AdoptPvc });
            continue;
        }
        // 2. take an extra pod's PVC from another node, one move at a time
        let extra = extras.iter().find(|p| {
            !claimed_extras.contains(p.name.as_str())
                && p.pvc.as_deref().and_then(|c| pvcs.get(c)).is_some_and(|c| zone_fits(c, node))
        });
        if let Some(extra) = extra {
            claimed_extras.insert(extra.name.as_str());
            if !rebalancing && !deletions_in_flight {
                rebalancing = true;
                plan.actions.push(Action::DeletePod {
                    server: server_of(extra),
                    reason: DeleteReason::Rebalance { to_node: node.name.clone() },
                });
                if let Some(pvc) = &extra.pvc {
                    serving.remove(pvc);
                }
            } else {
                plan.waiting.push(format!(
                    "node {} waits for {} to move to it from node {}",
                    node.name,
                    extra.pvc.as_deref().unwrap_or_default(),
                    extra.node
                ));
            }
            continue;
        }
        // 3. a new PVC
        let name = resources::new_pvc_name(if node.uid.is_empty() { &node.name } else { &node.uid }, &existing_names);
        existing_names.insert(name.clone());
        let server = Server::on_pvc(&name, &node.name);
        serving.insert(name.clone(), (node.name.clone(), false));
        *load.entry(node.name.as_str()).or_default() += 1;
        plan.actions.push(Action::CreatePvc {
            name: name.clone(),
            node: node.name.clone(),
            zone: node.zone().map(str::to_string),
        });
        plan.servers.push(server.clone());
        plan.actions.push(Action::CreatePod { server, reason: CreateReason::NodeWithoutServer });
        plan.pvcs.push(PvcOutcome {
            name,
            node: Some(node.name.clone()),
            last_node: Some(node.name.clone()),
            extra: false,
            orphaned_since: None,
        });
    }

    // 3. PVCs still released: orphans. Served by an extra pod once past the grace period.
    let grace = i64::try_from(config.orphan_grace_seconds).unwrap_or(i64::MAX);
    for pvc in free {
        let since = since_of(&pvc.name);
        let waited = now.as_second().saturating_sub(since.as_second());
        if waited < grace {
            let left = Duration::from_secs(u64::try_from(grace - waited).unwrap_or(0));
            plan.requeue_after = Some(plan.requeue_after.map_or(left, |d| d.min(left)));
            plan.waiting.push(format!("{} has no node: an extra server serves it in {}s", pvc.name, left.as_secs()));
            continue;
        }
        let host = selected
            .values()
            .filter(|n| n.ready && zone_fits(pvc, n))
            .min_by_key(|n| (load.get(n.name.as_str()).copied().unwrap_or(0), n.name.clone()));
        match host {
            Some(host) => {
                let server = Server::on_pvc(&pvc.name, &host.name);
                let was_empty = load.get(host.name.as_str()).copied().unwrap_or(0) == 0;
                *load.entry(host.name.as_str()).or_default() += 1;
                serving.insert(pvc.name.clone(), (host.name.clone(), !was_empty));
                plan.servers.push(server.clone());
                plan.actions.push(Action::CreatePod { server, reason: CreateReason::ServeOrphan });
            }
            None => {
                plan.unservable_orphans.push(pvc.name.clone());
                plan.waiting.push(format!("{} is orphaned and no ready node in its zone can serve it", pvc.name));
            }
        }
    }

    // Kept pods are wanted servers too.
    for pod in &kept {
        if let Some(pvc) = &pod.pvc {
            if serving.get(pvc).is_some_and(|(n, _)| *n == pod.node) {
                plan.servers.push(Server::on_pvc(pvc, &pod.node));
            }
        }
    }
    // Every observed PVC's outcome.
    for pvc in &observed.pvcs {
        let (node, extra) = match serving.get(&pvc.name) {
            Some((n, e)) => (Some(n.clone()), *e),
            None => (None, false),
        };
        let last_node = node.clone().or_else(|| last_node_of(&pvc.name)).or_else(|| {
            observed.pods.iter().find(|p| p.pvc.as_deref() == Some(pvc.name.as_str())).map(|p| p.node.clone())
        });
        let orphaned_since = if node.is_none() && !pvc.deleting { Some(since_of(&pvc.name)) } else { None };
        plan.pvcs.push(PvcOutcome { name: pvc.name.clone(), node, last_node, extra, orphaned_since });
    }
    plan.pvcs.sort_by(|a, b| a.name.cmp(&b.name));
    roll_outdated(&kept, &outdated, observed, plan);
}
