//! Decision tables: a fresh cluster, a node added, a node removed, a nodeSelector change, in both storage modes.
//! Each pass's actions are asserted exactly, and a pass over the state it produced plans nothing.
use crate::common::*;
use blockmesh_operator::plan::{CreateReason, DeleteReason};

const PVC_MODE: &[(&str, &str)] = &[("storageMode", "pvcPerNode")];

#[test]
fn fresh_cluster_local_mode_gets_one_server_per_node() {
    let mut w = World::new(&[], &["node-a", "node-b", "node-c"]);
    let plan = w.pass();
    assert_eq!(plan.actions, vec![create_local("node-a"), create_local("node-b"), create_local("node-c")]);
    assert_eq!(w.pod_names(), vec!["server-node-a", "server-node-b", "server-node-c"]);
    assert!(w.pass().actions.is_empty(), "a second pass changes nothing");
    assert_eq!(w.condition("Ready").0, "True");
    assert_eq!(w.condition("ConfigValid").0, "True");
}

#[test]
fn fresh_cluster_pvc_mode_gets_one_pvc_and_server_per_node() {
    let mut w = World::new(PVC_MODE, &["node-a", "node-b"]);
    let plan = w.pass();
    let (pa, pb) = (pvc_for("node-a", &[]), pvc_for("node-b", &[]));
    assert_eq!(
        plan.actions,
        vec![
            create_pvc(&pa, "node-a"),
            create_on_pvc(&pa, "node-a", CreateReason::NodeWithoutServer),
            create_pvc(&pb, "node-b"),
            create_on_pvc(&pb, "node-b", CreateReason::NodeWithoutServer),
        ]
    );
    let mut want = vec![format!("server-{pa}-node-node-a"), format!("server-{pb}-node-node-b")];
    want.sort();
    assert_eq!(w.pod_names(), want);
    assert!(w.pass().actions.is_empty(), "a second pass changes nothing");
    assert_eq!(w.status.as_ref().map(|s| s.orphaned_pvcs), Some(0));
}

#[test]
fn node_added_gets_a_server() {
    let mut w = World::new(&[], &["node-a"]);
    w.settle();
    w.add_node("node-b");
    assert_eq!(w.pass().actions, vec![create_local("node-b")]);
    assert!(w.pass().actions.is_empty());

    let mut w = World::new(PVC_MODE, &["node-a"]);
    w.settle();
    let pa = pvc_for("node-a", &[]);
    w.add_node("node-b");
    let pb = pvc_for("node-b", &[&pa]);
    assert_eq!(
        w.pass().actions,
        vec![create_pvc(&pb, "node-b"), create_on_pvc(&pb, "node-b", CreateReason::NodeWithoutServer)]
    );
    assert!(w.pass().actions.is_empty());
}

#[test]
fn node_removed_loses_its_server_and_releases_its_pvc() {
    let mut w = World::new(&[], &["node-a", "node-b"]);
    w.settle();
    w.remove_node("node-b");
    assert_eq!(w.pass().actions, vec![delete_local("node-b", DeleteReason::NodeGone)]);
    assert!(w.pass().actions.is_empty());

    let mut w = World::new(PVC_MODE, &["node-a", "node-b"]);
    w.settle();
    let pb = pvc_for("node-b", &[]);
    w.remove_node("node-b");
    assert_eq!(w.pass().actions, vec![delete_on_pvc(&pb, "node-b", DeleteReason::NodeGone)]);
    let plan = w.pass();
    assert!(plan.actions.is_empty(), "released, and within the grace period: {:?}", plan.actions);
    assert_eq!(plan.requeue_after, Some(std::time::Duration::from_secs(600)), "due when the grace period ends");
    let status = w.status.clone().expect("a status");
    assert_eq!(status.orphaned_pvcs, 1);
    let rec = status.pvcs.iter().find(|p| p.name == pb).expect("the PVC is listed");
    assert_eq!((rec.node.as_deref(), rec.last_node.as_deref()), (None, Some("node-b")));
    assert!(rec.orphaned_since.is_some());
    assert_eq!(w.pvcs.len(), 2, "PVCs are never deleted");
}

#[test]
fn node_selector_change_moves_servers_to_the_selected_nodes() {
    let nodes = || {
        vec![
            labelled("node-a", &[("disk", "ssd")]),
            labelled("node-b", &[("disk", "ssd")]),
            labelled("node-c", &[("disk", "hdd")]),
        ]
    };
    let mut w = World::new(&[], &[]);
    w.nodes = nodes();
    w.settle();
    assert_eq!(w.pods.len(), 3);
    w.set("nodeSelector", "disk=ssd");
    assert_eq!(w.pass().actions, vec![delete_local("node-c", DeleteReason::NodeNotSelected)]);
    assert!(w.pass().actions.is_empty());
    w.set("nodeSelector", "disk in (hdd)");
    assert_eq!(
        w.pass().actions,
        vec![
            delete_local("node-a", DeleteReason::NodeNotSelected),
            delete_local("node-b", DeleteReason::NodeNotSelected),
            create_local("node-c"),
        ]
    );
    assert!(w.pass().actions.is_empty());
    assert_eq!(w.status.as_ref().map(|s| s.nodes), Some(1));

    // pvcPerNode: the unselected node's PVC is released and waits like a removed node's
    let mut w = World::new(PVC_MODE, &[]);
    w.nodes = nodes();
    w.settle();
    let pc = pvc_for("node-c", &[]);
    w.set("nodeSelector", "disk=ssd");
    assert_eq!(w.pass().actions, vec![delete_on_pvc(&pc, "node-c", DeleteReason::NodeNotSelected)]);
    assert!(w.pass().actions.is_empty());
    assert_eq!(w.status.as_ref().map(|s| s.orphaned_pvcs), Some(1));
}

#[test]
fn outdated_servers_are_replaced_one_at_a_time() {
    let mut w = World::new(&[], &["node-a", "node-b", "node-c"]);
    w.settle();
    w.set("local.poolSizePerNode", "20G");
    // pass 1: the first outdated pod goes; pass 2: it comes back, nothing else moves while it is missing
    assert_eq!(w.pass().actions, vec![delete_local("node-a", DeleteReason::Outdated)]);
    assert_eq!(w.pass().actions, vec![create_local("node-a")]);
    // a pod that is not ready holds the rollout
    if let Some(p) = w.pods.iter_mut().find(|p| p.node == "node-a") {
        p.ready = false;
    }
    let held = w.pass();
    assert!(held.actions.is_empty(), "{:?}", held.actions);
    assert!(held.waiting.iter().any(|m| m.contains("waits for server-node-a")), "{:?}", held.waiting);
    if let Some(p) = w.pods.iter_mut().find(|p| p.node == "node-a") {
        p.ready = true;
    }
    assert_eq!(w.pass().actions, vec![delete_local("node-b", DeleteReason::Outdated)]);
    let rest = w.settle();
    assert_eq!(
        rest,
        vec![create_local("node-b"), delete_local("node-c", DeleteReason::Outdated), create_local("node-c")]
    );
}
