//! A pool that moves (issue #10, `pvcPerNode` storage): each server pod serves a pool PVC, and when its node goes
//! away another node adopts the PVC. Two real daemons stand for the pods of `pvc-a` on `node-a` and `pvc-b` on
//! `node-b`, found through a discovery the test sets. A volume placed on `node-b` is homed on `pvc-b` (id
//! `pool=pvc-b:...`, no topology); then `node-b` goes away and `pvc-b`'s pool comes back on a new server on
//! `node-a` (the same pool directory, new ports): every call on the volume, its snapshots and clones goes there,
//! the node plugin of `node-a` stages it, and the NBD server it resolves for it is the new one. A second move with
//! no moment unserved is found by the retry of the first call that cannot reach the old server.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::common::{code, create_req, on_nodes, serve_in, Daemon, SECOND_NODE, SERVER_NODE};
use blockmesh_csi::controller::ControllerService;
use blockmesh_csi::daemons::{Daemons, PoolServer, ServerPods, Servers, DISCOVERY_TTL, MIN_REFRESH_INTERVAL};
use blockmesh_csi::identity::IdentityService;
use blockmesh_csi::ids::VolumeId;
use blockmesh_csi::kernel::{probe_export, NbdTarget};
use blockmesh_csi::node::{NodeServer, NodeService};
use blockmesh_csi::pb;
use blockmesh_csi::pvc::MemoryPvcs;
use blockmesh_csi::server::Services;
use blockmesh_csi::targets::{PoolTargets, Targets};
use blockmesh_csi::testing::{FakeAttacher, FakeMounter};
use tonic::Code;

const MIB: i64 = 1 << 20;

/// The server pods the test says there are: pool PVC -> (node, daemon).
#[derive(Debug, Default)]
struct Pods(Mutex<BTreeMap<String, (String, String, String)>>);

impl Pods {
    fn serve(&self, pvc: &str, node: &str, d: &Daemon) {
        let ip_port = d.nbd.clone();
        self.0.lock().unwrap().insert(pvc.into(), (node.into(), d.api.clone(), ip_port));
    }
    fn stop(&self, pvc: &str) {
        self.0.lock().unwrap().remove(pvc);
    }
}

#[derive(Debug)]
struct Shared(Arc<Pods>);

impl ServerPods for Shared {
    fn servers(&self) -> blockmesh_csi::Result<Servers> {
        let pods = self.0 .0.lock().unwrap();
        let mut s = Servers::default();
        for (pvc, (node, url, nbd)) in pods.iter() {
            s.serving.insert(node.clone(), url.clone());
            s.pod_pvcs.insert(pvc.clone());
            let ip = nbd.rsplit_once(':').unwrap().0.to_string();
            s.pools.insert(pvc.clone(), PoolServer { node: node.clone(), ip, url: url.clone() });
        }
        Ok(s)
    }
}

fn snap_req(name: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() }
}

/// The NBD port of a daemon (`ADDR:PORT`).
fn port(d: &Daemon) -> u16 {
    d.nbd.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_follows_its_pool_to_the_node_that_adopts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (data_a, data_b) = (dir.path().join("data-a"), dir.path().join("data-b"));
    let a = tokio::task::block_in_place(|| Daemon::start(&data_a));
    // every server of a cluster has the same API key (the operator's Secret)
    std::fs::create_dir_all(&data_b).unwrap();
    std::fs::write(data_b.join("api-key"), a.key()).unwrap();
    let mut b = tokio::task::block_in_place(|| Daemon::start(&data_b));
    let pods = Arc::new(Pods::default());
    pods.serve("pvc-a", SERVER_NODE, &a);
    pods.serve("pvc-b", SECOND_NODE, &b);
    let default = Arc::new(a.client());
    let daemons = Arc::new(Daemons::new(default, None, BTreeMap::new()).unwrap().with_discovery(
        Box::new(Shared(pods.clone())),
        &a.key(),
        None,
    ));
    let node = NodeService::new(
        SERVER_NODE,
        &dir.path().join("state"),
        Arc::new(FakeAttacher::new(dir.path())),
        Arc::new(FakeMounter::default()),
    )
    .unwrap();
    let services = Services {
        identity: Some(IdentityService::new(Some(daemons.clone()))),
        controller: Some(Arc::new(ControllerService::new(daemons.clone(), Arc::new(MemoryPvcs::default())))),
        node: Some(NodeServer(Arc::new(node))),
    };
    let (_socket, channel, _stop) = serve_in(dir.path(), services).await;
    let mut c = pb::controller_client::ControllerClient::new(channel.clone());
    let mut n = pb::node_client::NodeClient::new(channel);

    // placed on node-b: homed on node-b's pool, and not pinned to node-b
    let req = on_nodes(create_req("db", 8 * MIB, &[]), &[SECOND_NODE], &[SECOND_NODE, SERVER_NODE]);
    let v = c.create_volume(req.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.volume_id, "pool=pvc-b:admin/db/__default__");
    assert!(v.accessible_topology.is_empty(), "a pool's volume is reached from any node: {v:?}");
    assert!(b.client().dot("admin/db").unwrap().is_some() && a.client().dot("admin/db").unwrap().is_none());
    assert_eq!(c.create_volume(req).await.unwrap().into_inner().volume.unwrap(), v, "idempotent");
    let snap = c.create_snapshot(snap_req("before", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert!(snap.snapshot_id.starts_with("pool=pvc-b:admin/db/__default__@"), "{}", snap.snapshot_id);
    // a volume of node-a goes to node-a's pool
    let va = c.create_volume(on_nodes(create_req("web", 4 * MIB, &[]), &[SERVER_NODE], &[])).await.unwrap();
    assert_eq!(va.into_inner().volume.unwrap().volume_id, "pool=pvc-a:admin/web/__default__");
    // capacity without a topology: each server once
    let free = a.client().pool().unwrap().free_bytes + b.client().pool().unwrap().free_bytes;
    let cap = c.get_capacity(pb::GetCapacityRequest::default()).await.unwrap().into_inner().available_capacity;
    assert_eq!(cap as u64, free);

    // node-b goes away; its pool is adopted by a second server on node-a (same pool, new process and ports)
    tokio::task::block_in_place(|| {
        b.child.kill().unwrap();
        b.child.wait().unwrap();
    });
    pods.stop("pvc-b");
    tokio::time::sleep(DISCOVERY_TTL).await;
    let err = c.create_snapshot(snap_req("while-away", &v.volume_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("pool PVC pvc-b"), "{}", err.message());
    let moved = tokio::task::block_in_place(|| Daemon::start(&data_b));
    pods.serve("pvc-b", SERVER_NODE, &moved);
    tokio::time::sleep(MIN_REFRESH_INTERVAL).await;

    // every call on the volume finds it on node-a now, under the same id
    let got = c
        .controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(got.volume_id, v.volume_id);
    let after = c.create_snapshot(snap_req("after", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert!(after.snapshot_id.starts_with("pool=pvc-b:"), "{}", after.snapshot_id);
    let listed = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    let ids: Vec<String> =
        listed.entries.iter().filter_map(|e| e.snapshot.as_ref()).map(|s| s.snapshot_id.clone()).collect();
    assert!(ids.contains(&snap.snapshot_id) && ids.contains(&after.snapshot_id), "{ids:?}");
    // a clone of the snapshot taken before the move: in the same pool
    let mut from = create_req("db-clone", 8 * MIB, &[]);
    from.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let clone = c.create_volume(from).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(clone.volume_id, "pool=pvc-b:admin/db-clone/__default__");
    assert!(moved.client().dot("admin/db-clone").unwrap().is_some());
    c.controller_expand_volume(pb::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(pb::CapacityRange { required_bytes: 16 * MIB, limit_bytes: 0 }),
        ..Default::default()
    })
    .await
    .unwrap();
    let vols = c.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().into_inner();
    let vids: Vec<String> =
        vols.entries.iter().filter_map(|e| e.volume.as_ref()).map(|v| v.volume_id.clone()).collect();
    assert_eq!(
        vids,
        [
            "pool=pvc-a:admin/web/__default__",
            "pool=pvc-b:admin/db/__default__",
            "pool=pvc-b:admin/db-clone/__default__"
        ]
    );

    // the node plugin of node-a stages it (a node-b volume would be refused), and finds its NBD server
    let stage = pb::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: dir.path().join("staging").display().to_string(),
        volume_capability: Some(crate::common::mount_cap()),
        ..Default::default()
    };
    n.node_stage_volume(stage.clone()).await.unwrap();
    let other = pb::NodeStageVolumeRequest { volume_id: format!("{SECOND_NODE}:admin/x/__default__"), ..stage };
    assert_eq!(code(n.node_stage_volume(other).await), Code::FailedPrecondition);
    let targets = PoolTargets::new(None, Box::new(Shared(pods.clone())), port(&moved));
    let id = VolumeId::parse(&v.volume_id).unwrap();
    let target = targets.target(&id, true).unwrap();
    assert_eq!(target, NbdTarget::Tcp(moved.nbd.clone()));
    let info = tokio::task::block_in_place(|| probe_export(&target, &id.export_name())).unwrap();
    assert_eq!(info.size_bytes, 16 << 20, "the grown volume, served by the pool's new server");

    // the pool moves again, with no moment unserved (so nothing makes the controller list the pods at once): the
    // first call finds its old server gone and says so; its retry finds the new one, well within the cache's age
    let mut moved = moved;
    let old_api = moved.api.clone();
    // a fresh listing now (an unknown pool is looked for at once), so the cache is young when the pool moves
    tokio::time::sleep(MIN_REFRESH_INTERVAL).await;
    let listed = std::time::Instant::now();
    assert!(tokio::task::block_in_place(|| daemons.get(Some("pool=pvc-none"))).is_err());
    tokio::task::block_in_place(|| {
        moved.child.kill().unwrap();
        moved.child.wait().unwrap();
    });
    let moved = tokio::task::block_in_place(|| Daemon::start(&data_b));
    pods.serve("pvc-b", SECOND_NODE, &moved);
    let first = c.create_snapshot(snap_req("racing", &v.volume_id)).await;
    // (unless the daemon took so long to start that the cache aged out meanwhile, or got the same port)
    if moved.api != old_api && listed.elapsed() < DISCOVERY_TTL {
        assert_eq!(code(first), Code::Unavailable);
    }
    tokio::time::sleep(MIN_REFRESH_INTERVAL).await;
    let racing = c.create_snapshot(snap_req("racing", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();

    // DeleteVolume of the clone, then of the snapshots and the volume: all on the moved pool
    c.delete_volume(pb::DeleteVolumeRequest { volume_id: clone.volume_id, ..Default::default() }).await.unwrap();
    for s in [&snap.snapshot_id, &after.snapshot_id, &racing.snapshot_id] {
        c.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.clone(), ..Default::default() }).await.unwrap();
    }
    c.delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    assert!(moved.client().dot("admin/db").unwrap().is_none());
}
