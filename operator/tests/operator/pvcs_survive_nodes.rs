//! Decision tables for pvcPerNode mode's promises: a node replaced during a rolling upgrade hands its PVC to the
//! new node (no orphan action within the grace period), a PVC orphaned past the grace period is served by an extra
//! pod on a live node, and when the cluster grows again the extra pod moves to the new node.
use crate::common::*;
use blockmesh_operator::plan::{CreateReason, DeleteReason};

const PVC_MODE: &[(&str, &str)] = &[("storageMode", "pvcPerNode")];

#[test]
fn node_replaced_during_upgrade_adopts_the_released_pvc_within_the_grace_period() {
    let mut w = World::new(PVC_MODE, &["node-a", "node-b"]);
    w.settle();
    let (pa, pb) = (pvc_for("node-a", &[]), pvc_for("node-b", &[]));
    // the upgrade drains and deletes node-b...
    w.remove_node("node-b");
    assert_eq!(w.pass().actions, vec![delete_on_pvc(&pb, "node-b", DeleteReason::NodeGone)]);
    // ...nothing is done for its PVC up to the last second of the grace period...
    w.advance(599);
    let plan = w.pass();
    assert!(plan.actions.is_empty(), "no orphan action within the grace period: {:?}", plan.actions);
    assert_eq!(plan.requeue_after, Some(std::time::Duration::from_secs(1)));
    // ...and its replacement (a new name, a new UID) takes the PVC over instead of getting a new one
    w.add_node("node-b2");
    assert_eq!(w.pass().actions, vec![create_on_pvc(&pb, "node-b2", CreateReason::AdoptPvc)]);
    assert!(w.pass().actions.is_empty());
    assert_eq!(w.pvcs.len(), 2);
    assert_eq!(w.served().get(&pa).map(String::as_str), Some("node-a"));
    let status = w.status.clone().expect("a status");
    assert_eq!(status.orphaned_pvcs, 0);
    assert_eq!(w.condition("OrphansServed").0, "True");
}

#[test]
fn replacement_node_prefers_the_pvc_it_served_last() {
    let mut w = World::new(PVC_MODE, &["node-a", "node-b", "node-c"]);
    w.settle();
    let pb = pvc_for("node-b", &[]);
    let pc = pvc_for("node-c", &[]);
    // two nodes go; node-c comes back under its own name (a reboot of a bare-metal node)
    w.remove_node("node-b");
    w.remove_node("node-c");
    w.settle();
    w.add_node("node-c");
    assert_eq!(w.pass().actions, vec![create_on_pvc(&pc, "node-c", CreateReason::AdoptPvc)]);
    w.add_node("node-z");
    assert_eq!(w.pass().actions, vec![create_on_pvc(&pb, "node-z", CreateReason::AdoptPvc)]);
}

#[test]
fn orphan_past_the_grace_period_is_served_by_an_extra_pod_on_a_live_node() {
    let mut w = World::new(PVC_MODE, &["node-a", "node-b", "node-c"]);
    w.settle();
    let pc = pvc_for("node-c", &[]);
    w.remove_node("node-c");
    assert_eq!(w.pass().actions, vec![delete_on_pvc(&pc, "node-c", DeleteReason::NodeGone)]);
    w.advance(599);
    assert!(w.pass().actions.is_empty());
    w.advance(1);
    // the least loaded ready node (ties by name) gets the extra pod
    assert_eq!(w.pass().actions, vec![create_on_pvc(&pc, "node-a", CreateReason::ServeOrphan)]);
    assert!(w.pass().actions.is_empty());
    let status = w.status.clone().expect("a status");
    let rec = status.pvcs.iter().find(|p| p.name == pc).expect("listed");
    assert_eq!((rec.node.as_deref(), rec.extra, rec.orphaned_since.as_deref()), (Some("node-a"), true, None));
    assert_eq!(status.servers, 3);
    assert_eq!(w.condition("OrphansServed").0, "True");
}

#[test]
fn orphan_grace_period_is_configurable_and_counts_from_the_first_pass_that_saw_it() {
    let mut w =
        World::new(&[("storageMode", "pvcPerNode"), ("pvcPerNode.orphanGracePeriodSeconds", "60")], &["a", "b"]);
    w.settle();
    let pb = pvc_for("b", &[]);
    w.remove_node("b");
    w.pass();
    w.advance(30);
    assert!(w.pass().actions.is_empty());
    w.advance(30);
    assert_eq!(w.pass().actions, vec![create_on_pvc(&pb, "a", CreateReason::ServeOrphan)]);
}

#[test]
fn orphan_without_a_ready_node_in_its_zone_waits_and_says_so() {
    let mut w = World::new(PVC_MODE, &[]);
    w.nodes = vec![
        labelled("a", &[("topology.kubernetes.io/zone", "z1")]),
        labelled("b", &[("topology.kubernetes.io/zone", "z2")]),
    ];
    w.settle();
    let pb = pvc_for("b", &[]);
    assert_eq!(w.pvcs.iter().find(|p| p.name == pb).and_then(|p| p.zone.clone()).as_deref(), Some("z2"));
    w.remove_node("b");
    w.pass();
    w.advance(600);
    let plan = w.pass();
    assert!(plan.actions.is_empty(), "node a is in another zone: {:?}", plan.actions);
    assert_eq!(plan.unservable_orphans, vec![pb.clone()]);
    assert_eq!(w.condition("OrphansServed").1, "NoReadyNode");
    // a node in z2 adopts it (a free node adopts at once, grace period or not)
    w.nodes.push(labelled("c", &[("topology.kubernetes.io/zone", "z2")]));
    assert_eq!(w.pass().actions, vec![create_on_pvc(&pb, "c", CreateReason::AdoptPvc)]);
}

#[test]
fn cluster_regrows_and_extra_pods_move_to_the_new_nodes() {
    let mut w = World::new(PVC_MODE, &["node-a", "node-b", "node-c"]);
    w.settle();
    let (pb, pc) = (pvc_for("node-b", &[]), pvc_for("node-c", &[]));
    w.remove_node("node-b");
    w.remove_node("node-c");
    w.pass();
    w.advance(600);
    // both orphans served by extra pods (in name order): node-a is the only node
    let (first_pvc, second_pvc) = if pb < pc { (&pb, &pc) } else { (&pc, &pb) };
    assert_eq!(
        w.pass().actions,
        vec![
            create_on_pvc(first_pvc, "node-a", CreateReason::ServeOrphan),
            create_on_pvc(second_pvc, "node-a", CreateReason::ServeOrphan),
        ]
    );
    assert!(w.pass().actions.is_empty());
    // two new nodes: one extra pod moves at a time, and no new PVC is created for them
    w.advance(60);
    w.add_node("node-d");
    w.add_node("node-e");
    let first = w.pass().actions;
    assert_eq!(first.len(), 1, "{first:?}");
    let moved = match &first[0] {
        blockmesh_operator::plan::Action::DeletePod { server, reason: DeleteReason::Rebalance { to_node } } => {
            assert_eq!(server.node, "node-a");
            assert_eq!(to_node, "node-d");
            server.pvc.clone().expect("a PVC")
        }
        other => panic!("expected a rebalance, got {other:?}"),
    };
    assert_eq!(w.pass().actions, {
        let other = if moved == pb { &pc } else { &pb };
        vec![
            create_on_pvc(&moved, "node-d", CreateReason::AdoptPvc),
            delete_on_pvc(other, "node-a", DeleteReason::Rebalance { to_node: "node-e".into() }),
        ]
    });
    let rest = w.settle();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(w.pvcs.len(), 3, "no PVC was created");
    let per_node: std::collections::BTreeMap<String, usize> = w.pods.iter().fold(Default::default(), |mut m, p| {
        *m.entry(p.node.clone()).or_default() += 1;
        m
    });
    assert!(per_node.values().all(|n| *n == 1), "{per_node:?}");
    assert!(w.status.as_ref().is_some_and(|s| s.pvcs.iter().all(|p| !p.extra)));
}

#[test]
fn a_new_node_gets_a_new_pvc_only_when_none_is_free_and_no_extra_pod_can_move() {
    let mut w = World::new(PVC_MODE, &["node-a"]);
    w.settle();
    let pa = pvc_for("node-a", &[]);
    w.add_node("node-b");
    let pb = pvc_for("node-b", &[&pa]);
    assert_eq!(
        w.pass().actions,
        vec![create_pvc(&pb, "node-b"), create_on_pvc(&pb, "node-b", CreateReason::NodeWithoutServer)]
    );
}
