//! Several daemons (issue #10): two real daemons, `node-a` -> A and `node-b` -> B, behind one controller. A volume
//! is made on the daemon of the node the topology asks for (or where its dot or its source is), its id names that
//! node, and every later call on it goes there; ids without a node mean the default daemon (A); a node without a
//! daemon is UNAVAILABLE; a volume is staged only on its own node.
use crate::common::{code, create_req, on_nodes, topology, TwoNodes, SECOND_NODE, SERVER_NODE};
use blockmesh_csi::pb;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn snap_req(name: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() }
}

fn from_snapshot(mut req: pb::CreateVolumeRequest, snapshot_id: &str) -> pb::CreateVolumeRequest {
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: snapshot_id.into(),
        })),
    });
    req
}

fn node_of(v: &pb::Volume) -> &str {
    v.accessible_topology[0].segments[blockmesh_csi::controller::TOPOLOGY_NODE_KEY].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_goes_to_the_preferred_node() {
    let mut t = TwoNodes::start().await;
    let req = on_nodes(create_req("pvc-b", 8 * MIB, &[]), &[SECOND_NODE], &[SECOND_NODE, SERVER_NODE]);
    let v = t.controller.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.volume_id, "node-b:admin/pvc-b/__default__");
    assert_eq!(v.accessible_topology.len(), 1);
    assert_eq!(node_of(&v), SECOND_NODE);
    assert_eq!(v.volume_context["blockmesh.io/export"], "admin/pvc-b", "the export does not name the node");
    assert!(t.b.client().dot("admin/pvc-b").unwrap().is_some(), "made on B");
    assert!(t.a.client().dot("admin/pvc-b").unwrap().is_none(), "not on A");
    // the same request again: the same volume
    let again = t.controller.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again, v);
    // the first preferred node with a daemon wins; requisite ones follow
    let to_a = on_nodes(create_req("pvc-a", 4 * MIB, &[]), &["node-gone", SERVER_NODE], &[SECOND_NODE]);
    let va = t.controller.create_volume(to_a).await.unwrap().into_inner().volume.unwrap();
    assert_eq!((va.volume_id.as_str(), node_of(&va)), ("node-a:admin/pvc-a/__default__", SERVER_NODE));
    let req_only = on_nodes(create_req("pvc-r", 4 * MIB, &[]), &["node-gone"], &["node-gone", SECOND_NODE]);
    let vr = t.controller.create_volume(req_only).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(node_of(&vr), SECOND_NODE);
    assert!(t.b.client().dot("admin/pvc-r").unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_a_volume_and_its_snapshots_go_to_its_node() {
    let mut t = TwoNodes::start().await;
    let c = &mut t.controller;
    let v = c
        .create_volume(on_nodes(create_req("vol", 4 * MIB, &[]), &[SECOND_NODE], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (a, b) = (t.a.client(), t.b.client());

    let s = c.create_snapshot(snap_req("snap", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert!(s.snapshot_id.starts_with("node-b:admin/vol/__default__@"), "{s:?}");
    assert_eq!(s.source_volume_id, v.volume_id);
    assert_eq!(b.commits("admin/vol").unwrap().len(), 1, "committed on B");
    let got = c
        .get_snapshot(pb::GetSnapshotRequest { snapshot_id: s.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap(), s);

    let grown = c
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(pb::CapacityRange { required_bytes: 16 * MIB, limit_bytes: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 16 * MIB);
    assert_eq!(b.dot("admin/vol").unwrap().unwrap().subdots[0].size_bytes, 16 << 20, "grown on B");
    let got = c
        .controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 16 * MIB);

    c.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap();
    let left = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(left.entries.is_empty(), "{left:?}");
    c.delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    assert!(b.dot("admin/vol").unwrap().is_none(), "deleted on B");
    assert!(a.dots().unwrap().is_empty(), "A never saw it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_goes_to_its_sources_node() {
    let mut t = TwoNodes::start().await;
    let c = &mut t.controller;
    let v = c
        .create_volume(on_nodes(create_req("src", 4 * MIB, &[]), &[SECOND_NODE], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let s = c.create_snapshot(snap_req("snap", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    // preferred node-a, but the snapshot is on B: an O(1) clone needs B's pool
    let req = from_snapshot(on_nodes(create_req("clone", 4 * MIB, &[]), &[SERVER_NODE], &[]), &s.snapshot_id);
    let r = c.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!((r.volume_id.as_str(), node_of(&r)), ("node-b:admin/clone/__default__", SECOND_NODE));
    assert!(t.b.client().dot("admin/clone").unwrap().is_some());
    assert!(t.a.client().dot("admin/clone").unwrap().is_none());
    assert_eq!(c.create_volume(req).await.unwrap().into_inner().volume.unwrap(), r, "idempotent");
    // requisite names node-a only: the clone cannot be made
    let only_a =
        from_snapshot(on_nodes(create_req("clone2", 4 * MIB, &[]), &[SERVER_NODE], &[SERVER_NODE]), &s.snapshot_id);
    let err = c.create_volume(only_a).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains(SECOND_NODE), "names the node: {}", err.message());
    assert!(t.b.client().dot("admin/clone2").unwrap().is_none() && t.a.client().dot("admin/clone2").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pvc_naming_an_existing_dot_goes_where_the_dot_is() {
    let mut t = TwoNodes::start().await;
    t.a.client().init("admin/shared", &["__default__"], 4 << 20).unwrap();
    t.pvcs.set("apps", "claim", &[("blockmesh.io/dot", "shared")]);
    let params = [("csi.storage.k8s.io/pvc/name", "claim"), ("csi.storage.k8s.io/pvc/namespace", "apps")];
    let req = on_nodes(create_req("pvc-x", 4 * MIB, &params), &[SECOND_NODE], &[]);
    let v = t.controller.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert_eq!((v.volume_id.as_str(), node_of(&v)), ("node-a:admin/shared/__default__", SERVER_NODE));
    assert!(t.b.client().dot("admin/shared").unwrap().is_none(), "no second dot of that name on B");
    // and a requisite topology without node-a: RESOURCE_EXHAUSTED naming node-a
    t.pvcs.set("apps", "claim2", &[("blockmesh.io/dot", "shared"), ("blockmesh.io/subdot", "more")]);
    let params = [("csi.storage.k8s.io/pvc/name", "claim2"), ("csi.storage.k8s.io/pvc/namespace", "apps")];
    let req = on_nodes(create_req("pvc-y", 4 * MIB, &params), &[SECOND_NODE], &[SECOND_NODE]);
    let err = t.controller.create_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains(SERVER_NODE), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pvc_naming_a_dot_waits_while_a_server_cannot_be_asked() {
    let mut t = TwoNodes::start().await;
    t.b.client().init("admin/kept", &["__default__"], 4 << 20).unwrap();
    // B's server goes away (its node down): whether it holds a dot cannot be told now
    t.b.child.kill().unwrap();
    t.b.child.wait().unwrap();
    t.pvcs.set("apps", "claim", &[("blockmesh.io/dot", "kept")]);
    let params = [("csi.storage.k8s.io/pvc/name", "claim"), ("csi.storage.k8s.io/pvc/namespace", "apps")];
    let req = create_req("pvc-k", 4 * MIB, &params);
    let err = t.controller.create_volume(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let msg = err.message();
    assert!(msg.contains("admin/kept") && msg.contains(SECOND_NODE), "names the dot and the node: {msg}");
    assert!(t.a.client().dot("admin/kept").unwrap().is_none(), "no second, empty dot of that name on A");
    // the same again (the provisioner retries): still waiting, still nothing made
    assert_eq!(code(t.controller.create_volume(req).await), Code::Unavailable);
    assert!(t.a.client().dot("admin/kept").unwrap().is_none());
    // a PVC whose dot is its own name goes ahead on a server that answers
    let params = [("csi.storage.k8s.io/pvc/name", "plain"), ("csi.storage.k8s.io/pvc/namespace", "apps")];
    let req = on_nodes(create_req("pvc-p", 4 * MIB, &params), &[SERVER_NODE], &[]);
    let v = t.controller.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert_eq!((v.volume_id.as_str(), node_of(&v)), ("node-a:admin/plain/__default__", SERVER_NODE));
    // a PVC naming a dot that a server which answers holds: found, wherever the others are
    t.a.client().init("admin/here", &["__default__"], 4 << 20).unwrap();
    t.pvcs.set("apps", "claim-here", &[("dotmeshName", "here")]);
    let params = [("csi.storage.k8s.io/pvc/name", "claim-here"), ("csi.storage.k8s.io/pvc/namespace", "apps")];
    let v = t.controller.create_volume(create_req("pvc-h", 4 * MIB, &params)).await.unwrap().into_inner().volume;
    assert_eq!(v.unwrap().volume_id, "node-a:admin/here/__default__");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_capacity_span_every_node() {
    let mut t = TwoNodes::start().await;
    let c = &mut t.controller;
    for (name, node) in [("vb", SECOND_NODE), ("va", SERVER_NODE), ("vb2", SECOND_NODE)] {
        let v = c
            .create_volume(on_nodes(create_req(name, 4 * MIB, &[]), &[node], &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        c.create_snapshot(snap_req(&format!("s-{name}"), &v.volume_id)).await.unwrap();
    }
    // by node, then id; in pages of two
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(pb::ListVolumesRequest { max_entries: 2, starting_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        for e in page.entries {
            let v = e.volume.unwrap();
            assert_eq!(node_of(&v), v.volume_id.split(':').next().unwrap());
            seen.push(v.volume_id);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ["node-a:admin/va/__default__", "node-b:admin/vb/__default__", "node-b:admin/vb2/__default__"]);
    let snaps = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    let sources: Vec<String> = snaps.entries.into_iter().map(|e| e.snapshot.unwrap().source_volume_id).collect();
    assert_eq!(sources, seen, "every node's snapshots, by node");
    let by_source = c
        .list_snapshots(pb::ListSnapshotsRequest { source_volume_id: seen[1].clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_source.entries.len(), 1);

    // capacity: one node's pool, the sum without a topology, 0 for a node without a daemon
    let cap =
        |node: Option<&str>| pb::GetCapacityRequest { accessible_topology: node.map(topology), ..Default::default() };
    let free_a = t.a.client().pool().unwrap().free_bytes as i64;
    let free_b = t.b.client().pool().unwrap().free_bytes as i64;
    let got = |r: pb::GetCapacityResponse| r.available_capacity;
    assert_eq!(got(c.get_capacity(cap(Some(SERVER_NODE))).await.unwrap().into_inner()), free_a);
    assert_eq!(got(c.get_capacity(cap(Some(SECOND_NODE))).await.unwrap().into_inner()), free_b);
    assert_eq!(got(c.get_capacity(cap(None)).await.unwrap().into_inner()), free_a + free_b);
    assert_eq!(got(c.get_capacity(cap(Some("node-gone"))).await.unwrap().into_inner()), 0);
    let ready = t.identity.probe(pb::ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_ids_without_a_node_mean_the_default_daemon() {
    let mut t = TwoNodes::start().await;
    // a volume made before ids named nodes: on the default daemon (A)
    t.a.client().init("admin/legacy", &["__default__"], 4 << 20).unwrap();
    let c = &mut t.controller;
    let old = "admin/legacy/__default__";
    let got = c.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: old.into() }).await.unwrap();
    let v = got.into_inner().volume.unwrap();
    assert_eq!((v.volume_id.as_str(), v.capacity_bytes), (old, 4 * MIB));
    let s = c.create_snapshot(snap_req("old-snap", old)).await.unwrap().into_inner().snapshot.unwrap();
    assert!(s.snapshot_id.starts_with("admin/legacy/__default__@"), "an old volume's snapshots: old ids too");
    assert_eq!(t.a.client().commits("admin/legacy").unwrap().len(), 1);
    c.controller_expand_volume(pb::ControllerExpandVolumeRequest {
        volume_id: old.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: 8 * MIB, limit_bytes: 0 }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(t.a.client().dot("admin/legacy").unwrap().unwrap().subdots[0].size_bytes, 8 << 20);
    c.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.snapshot_id, ..Default::default() }).await.unwrap();
    c.delete_volume(pb::DeleteVolumeRequest { volume_id: old.into(), ..Default::default() }).await.unwrap();
    assert!(t.a.client().dot("admin/legacy").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_daemon_is_unavailable() {
    let mut t = TwoNodes::start().await;
    let c = &mut t.controller;
    let gone = "node-gone:admin/x/__default__";
    let snap = format!("node-gone:admin/x/__default__@{}", "0".repeat(32));
    let e = c.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: gone.into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("node-gone"), "{}", e.message());
    let del = c.delete_volume(pb::DeleteVolumeRequest { volume_id: gone.into(), ..Default::default() }).await;
    assert_eq!(code(del), Code::Unavailable, "not declared gone: the sidecar retries");
    let del = c.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: snap.clone(), ..Default::default() }).await;
    assert_eq!(code(del), Code::Unavailable);
    let get = c.get_snapshot(pb::GetSnapshotRequest { snapshot_id: snap.clone(), ..Default::default() }).await;
    assert_eq!(code(get), Code::Unavailable);
    assert_eq!(code(c.create_snapshot(snap_req("s", gone)).await), Code::Unavailable);
    let clone = from_snapshot(create_req("c", 4 * MIB, &[]), &snap);
    assert_eq!(code(c.create_volume(clone).await), Code::Unavailable);
    // topology naming only nodes without a daemon, and no default node: not now
    let nowhere = on_nodes(create_req("nowhere", 4 * MIB, &[]), &["node-gone"], &["node-gone"]);
    assert_eq!(code(c.create_volume(nowhere).await), Code::Unavailable);
    // volumes of two nodes are not one group
    let va = c
        .create_volume(on_nodes(create_req("ga", 4 * MIB, &[]), &[SERVER_NODE], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let vb = c
        .create_volume(on_nodes(create_req("gb", 4 * MIB, &[]), &[SECOND_NODE], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mixed = pb::CreateVolumeGroupSnapshotRequest {
        name: "g".into(),
        source_volume_ids: vec![va.volume_id, vb.volume_id],
        ..Default::default()
    };
    assert_eq!(code(t.group.create_volume_group_snapshot(mixed).await), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_volume_is_not_staged_here() {
    let mut t = TwoNodes::start().await;
    let v = t
        .controller
        .create_volume(on_nodes(create_req("elsewhere", 4 * MIB, &[]), &[SECOND_NODE], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = t.dir.path().join("staging");
    let stage = pb::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(crate::common::mount_cap()),
        ..Default::default()
    };
    let e = t.node.node_stage_volume(stage.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(SECOND_NODE) && e.message().contains(SERVER_NODE), "{}", e.message());
    let publish = pb::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: t.dir.path().join("target").display().to_string(),
        volume_capability: Some(crate::common::mount_cap()),
        ..Default::default()
    };
    assert_eq!(code(t.node.node_publish_volume(publish).await), Code::FailedPrecondition);
    // this node's own volume stages
    let mine = t
        .controller
        .create_volume(on_nodes(create_req("here", 4 * MIB, &[]), &[SERVER_NODE], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    t.node.node_stage_volume(pb::NodeStageVolumeRequest { volume_id: mine.volume_id, ..stage }).await.unwrap();
}
