//! A simulated cluster for the decision tests: the planner's view of nodes, pods and PVCs, where a pass's actions
//! take effect at once (created pods are ready, deleted pods are gone) and the status is carried to the next pass.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use blockmesh_operator::config::StorageMode;
use blockmesh_operator::crd::BlockmeshClusterStatus;
use blockmesh_operator::plan::{self, Action, NodeInfo, Observed, Plan, PodInfo, PvcInfo, Server};
use blockmesh_operator::report;
use blockmesh_operator::resources::{self, Settings};
use k8s_openapi::jiff::Timestamp;

/// The start of every simulated clock.
pub const T0: i64 = 1_800_000_000;

pub fn ts(second: i64) -> Timestamp {
    Timestamp::from_second(second).expect("a valid time")
}

pub fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        uid: format!("uid-{name}"),
        labels: BTreeMap::from([("kubernetes.io/hostname".to_string(), name.to_string())]),
        ready: true,
        deleting: false,
    }
}

pub fn labelled(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
    let mut n = node(name);
    n.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    n
}

pub fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The PVC name the operator gives the first PVC it creates for a node (`uid-NODE`), with `existing` taken.
pub fn pvc_for(node: &str, existing: &[&str]) -> String {
    let existing: BTreeSet<String> = existing.iter().map(|s| s.to_string()).collect();
    resources::new_pvc_name(&format!("uid-{node}"), &existing)
}

pub fn create_local(node: &str) -> Action {
    Action::CreatePod { server: Server::local(node), reason: plan::CreateReason::NodeWithoutServer }
}

pub fn delete_local(node: &str, reason: plan::DeleteReason) -> Action {
    Action::DeletePod { server: Server::local(node), reason }
}

pub fn create_pvc(name: &str, node: &str) -> Action {
    Action::CreatePvc { name: name.into(), node: node.into(), zone: None }
}

pub fn create_on_pvc(pvc: &str, node: &str, reason: plan::CreateReason) -> Action {
    Action::CreatePod { server: Server::on_pvc(pvc, node), reason }
}

pub fn delete_on_pvc(pvc: &str, node: &str, reason: plan::DeleteReason) -> Action {
    Action::DeletePod { server: Server::on_pvc(pvc, node), reason }
}

/// A cluster the tests drive pass by pass.
pub struct World {
    pub settings: Settings,
    pub now: i64,
    pub config_map: Option<BTreeMap<String, String>>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub pvcs: Vec<PvcInfo>,
    pub status: Option<BlockmeshClusterStatus>,
}

impl World {
    pub fn new(config: &[(&str, &str)], nodes: &[&str]) -> Self {
        World {
            settings: Settings::default(),
            now: T0,
            config_map: Some(data(config)),
            nodes: nodes.iter().map(|n| node(n)).collect(),
            pods: Vec::new(),
            pvcs: Vec::new(),
            status: None,
        }
    }

    pub fn observed(&self) -> Observed {
        Observed {
            now: ts(self.now),
            config_map: self.config_map.clone(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
            pvcs: self.pvcs.clone(),
            previous: report::previous_from_status(self.status.as_ref()),
        }
    }

    /// Decides without acting.
    pub fn peek(&self) -> Plan {
        plan::decide(&self.observed(), &self.settings)
    }

    /// One pass: decide, apply every action at once, record the status.
    pub fn pass(&mut self) -> Plan {
        let observed = self.observed();
        let plan = plan::decide(&observed, &self.settings);
        let status = report::build_status(&plan, &observed, self.status.as_ref());
        for action in &plan.actions {
            self.apply(&plan, action);
        }
        self.status = Some(status);
        plan
    }

    /// Passes until one has nothing to do; returns every action taken. Panics past `max` passes.
    pub fn settle(&mut self) -> Vec<Action> {
        const MAX_PASSES: usize = 50;
        let mut all = Vec::new();
        for _ in 0..MAX_PASSES {
            let plan = self.pass();
            if plan.actions.is_empty() {
                return all;
            }
            all.extend(plan.actions);
        }
        panic!("no fixpoint after {MAX_PASSES} passes: {all:?}");
    }

    fn apply(&mut self, plan: &Plan, action: &Action) {
        let config = plan.config.as_ref().expect("actions come with a configuration");
        match action {
            Action::CreatePvc { name, node, zone } => self.pvcs.push(PvcInfo {
                name: name.clone(),
                created_for: Some(node.clone()),
                zone: zone.clone(),
                created: Some(ts(self.now)),
                deleting: false,
            }),
            Action::CreatePod { server, .. } => {
                assert!(!self.pods.iter().any(|p| p.name == server.name), "{} created twice", server.name);
                self.pods.push(PodInfo {
                    name: server.name.clone(),
                    node: server.node.clone(),
                    pvc: server.pvc.clone(),
                    mode: Some(config.storage_mode),
                    spec_hash: Some(resources::spec_hash(&self.settings, config, server)),
                    // Pods created in one pass are ordered by name within the second.
                    created: Some(ts(self.now)),
                    deleting: false,
                    ended: false,
                    ready: true,
                })
            }
            Action::DeletePod { server, .. } => self.pods.retain(|p| p.name != server.name),
        }
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.retain(|n| n.name != name);
    }

    pub fn add_node(&mut self, name: &str) {
        self.nodes.push(node(name));
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.config_map.get_or_insert_with(BTreeMap::new).insert(key.into(), value.into());
    }

    pub fn advance(&mut self, seconds: i64) {
        self.now += seconds;
    }

    pub fn pod_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.pods.iter().map(|p| p.name.clone()).collect();
        v.sort();
        v
    }

    /// PVC -> node serving it.
    pub fn served(&self) -> BTreeMap<String, String> {
        self.pods.iter().filter_map(|p| p.pvc.clone().map(|c| (c, p.node.clone()))).collect()
    }

    pub fn condition(&self, type_: &str) -> (String, String, String) {
        let s = self.status.as_ref().expect("a status");
        let c = s.conditions.iter().find(|c| c.type_ == type_).expect("the condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    pub fn mode(&self) -> Option<StorageMode> {
        self.status.as_ref().and_then(|s| s.storage_mode.as_deref()).and_then(StorageMode::parse)
    }
}
