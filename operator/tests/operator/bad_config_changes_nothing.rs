//! Decision tables: an invalid ConfigMap, a missing one, and a storage mode switch in a running cluster change
//! nothing that runs; the last good configuration stays in force and the status says why.
use crate::common::*;
use blockmesh_operator::config::StorageMode;
use blockmesh_operator::plan::ConfigState;

#[test]
fn invalid_config_map_keeps_the_last_good_configuration() {
    let mut w = World::new(&[("local.poolSizePerNode", "20G")], &["node-a", "node-b"]);
    w.settle();
    let good = w.status.clone().and_then(|s| s.applied_config).expect("applied config");
    w.set("storageMode", "zfs");
    w.set("nodeSelector", "a in (b");
    w.set("local.poolSizePerNode", "lots");
    let plan = w.pass();
    assert!(plan.actions.is_empty(), "nothing changes: {:?}", plan.actions);
    match &plan.config_state {
        ConfigState::Invalid { errors, kept_previous } => {
            assert!(kept_previous);
            let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, vec!["nodeSelector", "storageMode", "local.poolSizePerNode"]);
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let (status, reason, message) = w.condition("ConfigValid");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(message.contains("storageMode") && message.contains("last good configuration"), "{message}");
    assert_eq!(w.status.clone().and_then(|s| s.applied_config), Some(good), "the status keeps the good configuration");
    // the cluster keeps running on it: a new node gets a server made with the last good configuration
    w.add_node("node-c");
    assert_eq!(w.pass().actions, vec![create_local("node-c")]);
    assert!(w.pass().actions.is_empty(), "and the existing pods are not outdated");
    // fixed: back to Valid, nothing to do
    w.config_map = Some(data(&[("local.poolSizePerNode", "20G")]));
    assert!(w.pass().actions.is_empty());
    assert_eq!(w.condition("ConfigValid").0, "True");
}

#[test]
fn invalid_config_map_on_a_fresh_cluster_does_nothing() {
    let mut w = World::new(&[("storageMode", "pvcPernode")], &["node-a"]);
    let plan = w.pass();
    assert!(plan.actions.is_empty());
    assert!(plan.config.is_none());
    assert_eq!(w.condition("Ready").1, "NoConfiguration");
    assert!(w.condition("ConfigValid").2.contains("nothing is done until it is fixed"));
}

#[test]
fn missing_config_map_runs_the_defaults_or_keeps_the_last_good_one() {
    let mut w = World::new(&[], &["node-a"]);
    w.config_map = None;
    assert_eq!(w.pass().actions, vec![create_local("node-a")]);
    assert_eq!(w.condition("ConfigValid").1, "ConfigMapMissing");

    let mut w = World::new(&[("storageMode", "pvcPerNode")], &["node-a"]);
    w.settle();
    w.config_map = None;
    let plan = w.pass();
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.config_state, ConfigState::Missing { kept_previous: true });
    assert_eq!(plan.config.map(|c| c.storage_mode), Some(StorageMode::PvcPerNode));
}

#[test]
fn mode_switch_attempt_is_refused_with_an_explanation() {
    let mut w = World::new(&[], &["node-a", "node-b"]);
    w.settle();
    w.set("storageMode", "pvcPerNode");
    w.set("local.poolSizePerNode", "50G");
    let plan = w.pass();
    assert!(plan.actions.is_empty(), "no PVC, no pod change, no rollout: {:?}", plan.actions);
    let m = plan.mode_switch.expect("refused");
    assert_eq!((m.requested, m.running), (StorageMode::PvcPerNode, StorageMode::Local));
    let (status, _, message) = w.condition("ModeSwitchRefused");
    assert_eq!(status, "True");
    assert!(message.contains("not supported") && message.contains("pull the dots across"), "{message}");
    assert_eq!(w.mode(), Some(StorageMode::Local));
    assert!(w.pass().actions.is_empty());

    // the other way: PVCs exist, so local mode is refused even if the status were lost
    let mut w = World::new(&[("storageMode", "pvcPerNode")], &["node-a"]);
    w.settle();
    w.status = None;
    w.set("storageMode", "local");
    let plan = w.pass();
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert!(plan.mode_switch.is_some());
    assert_eq!(w.mode(), Some(StorageMode::PvcPerNode));
    // switching back clears the refusal
    w.set("storageMode", "pvcPerNode");
    w.pass();
    assert_eq!(w.condition("ModeSwitchRefused").0, "False");
}

#[test]
fn mode_is_remembered_when_no_server_is_left() {
    let mut w = World::new(&[], &["node-a"]);
    w.settle();
    w.remove_node("node-a");
    w.settle();
    // the status still remembers local mode: the switch is refused
    w.set("storageMode", "pvcPerNode");
    w.add_node("node-b");
    let plan = w.pass();
    assert!(plan.mode_switch.is_some());
    assert_eq!(plan.actions, vec![create_local("node-b")]);
}
