//! Volumes through the Controller service, the real daemon underneath: idempotent create and delete, the spec's
//! error codes, PVC annotations (two PVCs naming one dot share it), listing with pages, capacity and expansion.
use crate::common::{code, create_req, vid, Driver, SERVER_NODE};
use blockmesh_csi::pb;
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_delete_are_idempotent_and_checked() {
    let mut d = Driver::start().await;
    let c = &mut d.controller;

    let info = d.identity.get_plugin_info(pb::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.blockmesh.io");
    let ready = d.identity.probe(pb::ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));

    let v1 = c.create_volume(create_req("pvc-1", 8 * MIB, &[])).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v1.volume_id, vid("admin/pvc-1/__default__"));
    assert_eq!(v1.capacity_bytes, 8 * MIB);
    assert_eq!(v1.accessible_topology[0].segments["topology.blockmesh.io/node"], SERVER_NODE);
    // the same request again: the same volume
    let again = c.create_volume(create_req("pvc-1", 8 * MIB, &[])).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again, v1);
    // the same name with a size that does not fit: ALREADY_EXISTS
    assert_eq!(code(c.create_volume(create_req("pvc-1", 16 * MIB, &[])).await), Code::AlreadyExists);
    let mut limited = create_req("pvc-1", MIB, &[]);
    limited.capacity_range = Some(pb::CapacityRange { required_bytes: MIB, limit_bytes: 4 * MIB });
    assert_eq!(code(c.create_volume(limited).await), Code::AlreadyExists);

    // missing fields and bad arguments: INVALID_ARGUMENT
    assert_eq!(code(c.create_volume(create_req("", MIB, &[])).await), Code::InvalidArgument);
    let mut nocaps = create_req("pvc-x", MIB, &[]);
    nocaps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(nocaps).await), Code::InvalidArgument);
    let mut multi = create_req("pvc-x", MIB, &[]);
    multi.volume_capabilities[0].access_mode = Some(pb::volume_capability::AccessMode {
        mode: pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    assert_eq!(code(c.create_volume(multi).await), Code::InvalidArgument);
    assert_eq!(code(c.create_volume(create_req("bad name!", MIB, &[])).await), Code::InvalidArgument);
    let mut backwards = create_req("pvc-x", 4 * MIB, &[]);
    backwards.capacity_range = Some(pb::CapacityRange { required_bytes: 4 * MIB, limit_bytes: MIB });
    assert_eq!(code(c.create_volume(backwards).await), Code::InvalidArgument);
    assert_eq!(
        code(c.delete_volume(pb::DeleteVolumeRequest { volume_id: String::new(), ..Default::default() }).await),
        Code::InvalidArgument
    );

    // a source that does not exist: NOT_FOUND
    let mut from_nothing = create_req("pvc-y", MIB, &[]);
    from_nothing.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: format!("admin/nope/__default__@{}", "0".repeat(32)),
        })),
    });
    assert_eq!(code(c.create_volume(from_nothing).await), Code::NotFound);
    let expand = |id: &str, bytes: i64| pb::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        ..Default::default()
    };
    assert_eq!(code(c.controller_expand_volume(expand("admin/nope/__default__", MIB)).await), Code::NotFound);
    let validate = pb::ValidateVolumeCapabilitiesRequest {
        volume_id: "admin/nope/__default__".into(),
        volume_capabilities: vec![crate::common::mount_cap()],
        ..Default::default()
    };
    assert_eq!(code(c.validate_volume_capabilities(validate.clone()).await), Code::NotFound);
    let ok = c
        .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
            volume_id: v1.volume_id.clone(),
            ..validate
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());

    // expansion grows (and never shrinks); a mount volume needs the node's part too
    let grown = c.controller_expand_volume(expand(&v1.volume_id, 12 * MIB)).await.unwrap().into_inner();
    assert_eq!((grown.capacity_bytes, grown.node_expansion_required), (12 * MIB, true));
    let same = c.controller_expand_volume(expand(&v1.volume_id, 2 * MIB)).await.unwrap().into_inner();
    assert_eq!(same.capacity_bytes, 12 * MIB);
    let dot = d.daemon.client().dot("admin/pvc-1").unwrap().unwrap();
    assert_eq!(dot.subdots[0].size_bytes, 12 << 20);

    // capacity: the pool's free space
    let cap = c.get_capacity(pb::GetCapacityRequest::default()).await.unwrap().into_inner();
    assert!(cap.available_capacity > 0 && cap.available_capacity <= 1 << 30, "{cap:?}");

    // delete, twice; and ids that never existed
    let del = |id: &str| pb::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    c.delete_volume(del(&v1.volume_id)).await.unwrap();
    c.delete_volume(del(&v1.volume_id)).await.unwrap();
    c.delete_volume(del("not-an-id")).await.unwrap();
    assert!(d.daemon.client().dot("admin/pvc-1").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pvc_annotations_place_volumes_and_share_dots() {
    let mut d = Driver::start().await;
    let pvc = |name: &str| -> Vec<(&'static str, String)> {
        vec![
            ("csi.storage.k8s.io/pvc/name", name.to_string()),
            ("csi.storage.k8s.io/pvc/namespace", "apps".to_string()),
        ]
    };
    let req = |volume: &str, params: &[(&'static str, String)]| {
        let p: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        create_req(volume, 4 * MIB, &p)
    };
    // no annotations: dot = PVC name, namespace from the StorageClass
    let mut p = pvc("web");
    p.push(("blockmeshNamespace", "team".into()));
    let v = d.controller.create_volume(req("pvc-aaa", &p)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.volume_id, vid("team/web/__default__"));

    // two PVCs naming one dot (blockmesh.io and Dotmesh spellings) with different subdots: one dot, two subdots
    d.pvcs.set("apps", "db-data", &[("blockmesh.io/dot", "db"), ("blockmesh.io/subdot", "data")]);
    d.pvcs.set("apps", "db-logs", &[("dotmeshName", "db"), ("dotmeshSubdot", "logs"), ("dotmeshNamespace", "admin")]);
    let a = d.controller.create_volume(req("pvc-bbb", &pvc("db-data"))).await.unwrap().into_inner().volume.unwrap();
    let b = d.controller.create_volume(req("pvc-ccc", &pvc("db-logs"))).await.unwrap().into_inner().volume.unwrap();
    assert_eq!((a.volume_id.clone(), b.volume_id.clone()), (vid("admin/db/data"), vid("admin/db/logs")));
    let dot = d.daemon.client().dot("admin/db").unwrap().unwrap();
    let names: Vec<&str> = dot.subdots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["data", "logs"]);
    assert_eq!(a.volume_context["blockmesh.io/export"], "admin/db.data");

    // list in pages of one: every volume once, in order; a foreign token is ABORTED
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = d
            .controller
            .list_volumes(pb::ListVolumesRequest { max_entries: 1, starting_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        seen.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, [vid("admin/db/data"), vid("admin/db/logs"), vid("team/web/__default__")]);

    // one volume by id (GET_VOLUME): as listed; an unknown or malformed id is NOT_FOUND
    let caps = d.controller.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}).await.unwrap();
    let get_volume = pb::controller_service_capability::rpc::Type::GetVolume as i32;
    assert!(caps.into_inner().capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(pb::controller_service_capability::Type::Rpc(r)) if r.r#type == get_volume
    )));
    let get = |id: &str| pb::ControllerGetVolumeRequest { volume_id: id.into() };
    let got = d.controller.controller_get_volume(get(&vid("admin/db/logs"))).await.unwrap().into_inner();
    let vol = got.volume.unwrap();
    assert_eq!((vol.volume_id.clone(), vol.capacity_bytes), (vid("admin/db/logs"), 4 * MIB));
    assert_eq!(vol, b, "as CreateVolume returned it");
    let status = got.status.unwrap();
    assert!(status.published_node_ids.is_empty(), "no controller publishing");
    let condition = status.volume_condition.unwrap();
    assert!(!condition.abnormal && condition.message.contains("serving"), "{condition:?}");
    assert_eq!(code(d.controller.controller_get_volume(get("admin/db/nope")).await), Code::NotFound);
    assert_eq!(code(d.controller.controller_get_volume(get("admin/nodot/data")).await), Code::NotFound);
    assert_eq!(code(d.controller.controller_get_volume(get("not an id")).await), Code::NotFound);
    assert_eq!(code(d.controller.controller_get_volume(get("")).await), Code::InvalidArgument);
    let bad = d.controller.list_volumes(pb::ListVolumesRequest { max_entries: 1, starting_token: "zz".into() }).await;
    assert_eq!(code(bad), Code::Aborted);

    // deleting one subdot removes it from the dot; it can be made again (empty); the last one takes the dot with it
    let del = |id: &str| pb::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    d.controller.delete_volume(del("admin/db/logs")).await.unwrap();
    let listed = d.controller.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 2);
    let dot = d.daemon.client().dot("admin/db").unwrap().unwrap();
    assert_eq!(dot.subdots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["data"]);
    d.controller.delete_volume(del("admin/db/logs")).await.unwrap();
    let again = d.controller.create_volume(req("pvc-ccc", &pvc("db-logs"))).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, vid("admin/db/logs"));
    d.controller.delete_volume(del("admin/db/logs")).await.unwrap();
    d.controller.delete_volume(del("admin/db/data")).await.unwrap();
    assert!(d.daemon.client().dot("admin/db").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_longer_than_the_csi_limit_are_refused_before_anything_is_made() {
    use blockmesh_csi::ids::{COMMIT_ID_DIGITS, MAX_ID_BYTES};
    let mut d = Driver::start().await;
    let c = &mut d.controller;
    let params = |ns: &str, dot: &str| -> Vec<(&'static str, String)> {
        vec![
            ("csi.storage.k8s.io/pvc/name", dot.to_string()),
            ("csi.storage.k8s.io/pvc/namespace", "apps".to_string()),
            ("blockmeshNamespace", ns.to_string()),
        ]
    };
    let req = |name: &str, p: &[(&'static str, String)]| {
        let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
        create_req(name, 4 * MIB, &p)
    };
    // namespace and dot of 64 bytes each (each allowed): an id of more than 128 bytes
    let (ns, dot) = ("n".repeat(64), "d".repeat(64));
    let e = c.create_volume(req("pvc-long", &params(&ns, &dot))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most 128"), "{}", e.message());
    assert!(d.daemon.client().dot(&format!("{ns}/{dot}")).unwrap().is_none(), "nothing was made");

    // an id of exactly 128 bytes is made; its snapshots' ids would not fit: refused, no commit made
    // (namespace and dot share what the node, separators and subdot leave; a dot takes at most 64)
    let free = MAX_ID_BYTES - vid("//__default__").len();
    let (ns, dot) = ("m".repeat(free - 64), "e".repeat(64));
    let v = c.create_volume(req("pvc-edge", &params(&ns, &dot))).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v.volume_id.len(), MAX_ID_BYTES);
    let snap = |source: &str| pb::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: "snap-edge".into(),
        ..Default::default()
    };
    let e = c.create_snapshot(snap(&v.volume_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let listed = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");

    // the longest volume whose snapshots fit: both made
    let (ns, dot) = ("o".repeat(free - 1 - COMMIT_ID_DIGITS - 64), "f".repeat(64));
    let v = c.create_volume(req("pvc-snap", &params(&ns, &dot))).await.unwrap().into_inner().volume.unwrap();
    let s = c.create_snapshot(snap(&v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(s.snapshot_id.len(), MAX_ID_BYTES);
}
