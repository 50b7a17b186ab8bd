//! Snapshots are commits, clones are dots cloned from a commit: data written through NBD is seen byte for byte in
//! the snapshot and in clones from the snapshot and from the volume; idempotent create and delete, ALREADY_EXISTS
//! on a name reused for another volume, deletes that leave history in place until it can go, group snapshots as
//! one commit over several subdots, listing in pages.
use crate::common::{code, create_req, have, qemu_io, vid, Driver};
use blockmesh_csi::pb;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn snap_req(name: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() }
}

fn source(t: pb::volume_content_source::Type) -> Option<pb::VolumeContentSource> {
    Some(pb::VolumeContentSource { r#type: Some(t) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_clone_round_trip_byte_for_byte() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Driver::start().await;
    let c = &mut d.controller;
    let v = c.create_volume(create_req("app", 8 * MIB, &[])).await.unwrap().into_inner().volume.unwrap();
    let uri = d.daemon.uri("admin/app");
    tokio::task::block_in_place(|| qemu_io(&uri, false, &["write -P 0x5a 0 1M", "write -P 0x33 4M 64k"]));

    let s = c.create_snapshot(snap_req("snap-1", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert!(s.ready_to_use && s.size_bytes == 8 * MIB && s.source_volume_id == v.volume_id, "{s:?}");
    let again = c.create_snapshot(snap_req("snap-1", &v.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id, "the same name: the same snapshot");
    let commit = s.snapshot_id.rsplit_once('@').unwrap().1.to_string();

    // writes after the snapshot do not reach it
    tokio::task::block_in_place(|| qemu_io(&uri, false, &["write -P 0x77 0 64k"]));
    let at = d.daemon.uri(&format!("admin/app@{commit}"));
    tokio::task::block_in_place(|| {
        qemu_io(&at, true, &["read -P 0x5a 0 1M", "read -P 0x33 4M 64k", "read -P 0 1M 3M"])
    });

    // a volume from the snapshot (bigger than it), and one from the volume
    let mut from_snap = create_req("restored", 16 * MIB, &[]);
    from_snap.volume_content_source =
        source(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: s.snapshot_id.clone(),
        }));
    let r = c.create_volume(from_snap.clone()).await.unwrap().into_inner().volume.unwrap();
    assert_eq!((r.volume_id.clone(), r.capacity_bytes), (vid("admin/restored/__default__"), 16 * MIB));
    assert_eq!(c.create_volume(from_snap).await.unwrap().into_inner().volume.unwrap().volume_id, r.volume_id);
    let mut from_vol = create_req("copy", 8 * MIB, &[]);
    from_vol.volume_content_source =
        source(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: v.volume_id.clone(),
        }));
    c.create_volume(from_vol).await.unwrap();
    let mut too_small = create_req("small", MIB, &[]);
    too_small.capacity_range = Some(pb::CapacityRange { required_bytes: MIB, limit_bytes: 2 * MIB });
    too_small.volume_content_source =
        source(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: s.snapshot_id.clone(),
        }));
    assert_eq!(code(c.create_volume(too_small).await), Code::OutOfRange);

    let (restored, copy) = (d.daemon.uri("admin/restored"), d.daemon.uri("admin/copy"));
    tokio::task::block_in_place(|| {
        qemu_io(&restored, true, &["read -P 0x5a 0 1M", "read -P 0x33 4M 64k", "read -P 0 8M 8M"]);
        qemu_io(&copy, true, &["read -P 0x77 0 64k", "read -P 0x5a 64k 960k", "read -P 0x33 4M 64k"]);
        // clones are writable and independent
        qemu_io(&restored, false, &["write -P 0x01 0 64k"]);
        qemu_io(&at, true, &["read -P 0x5a 0 1M"]);
    });

    // the name again for another volume: ALREADY_EXISTS; bad requests
    assert_eq!(code(c.create_snapshot(snap_req("snap-1", &r.volume_id)).await), Code::AlreadyExists);
    assert_eq!(code(c.create_snapshot(snap_req("", &v.volume_id)).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap_req("x", "")).await), Code::InvalidArgument);
    assert_eq!(code(c.create_snapshot(snap_req("x", "admin/nope/__default__")).await), Code::NotFound);

    // a volume with live snapshots is not deleted (its commits go with its dot)
    let del = |id: &str| pb::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
    assert_eq!(code(c.delete_volume(del(&v.volume_id)).await), Code::FailedPrecondition);

    // the snapshot is the dot's head commit: deleting it hides it now and gives it back once nothing needs it
    let del_snap = |id: &str| pb::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    c.delete_snapshot(del_snap(&s.snapshot_id)).await.unwrap();
    c.delete_snapshot(del_snap(&s.snapshot_id)).await.unwrap();
    c.delete_snapshot(del_snap("not-a-snapshot")).await.unwrap();
    let listed = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    // the clones outlive their source
    c.delete_volume(del(&v.volume_id)).await.unwrap();
    assert!(d.daemon.client().dot("admin/app").unwrap().is_none());
    tokio::task::block_in_place(|| {
        qemu_io(&restored, true, &["read -P 0x01 0 64k", "read -P 0x5a 64k 960k"]);
        qemu_io(&copy, true, &["read -P 0x77 0 64k"]);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_snapshots_in_a_chain_go_when_free_and_lists_page() {
    let mut d = Driver::start().await;
    let c = &mut d.controller;
    let v = c.create_volume(create_req("hist", 4 * MIB, &[])).await.unwrap().into_inner().volume.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let s = c.create_snapshot(snap_req(&format!("s{i}"), &v.volume_id)).await.unwrap().into_inner();
        ids.push(s.snapshot.unwrap().snapshot_id);
    }
    // pages of two
    let p1 =
        c.list_snapshots(pb::ListSnapshotsRequest { max_entries: 2, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(p1.entries.len(), 2);
    let p2 = c
        .list_snapshots(pb::ListSnapshotsRequest {
            max_entries: 2,
            starting_token: p1.next_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(p2.next_token.is_empty());
    let all: Vec<String> =
        p1.entries.iter().chain(&p2.entries).map(|e| e.snapshot.clone().unwrap().snapshot_id).collect();
    assert_eq!(all, ids);
    let bad = c.list_snapshots(pb::ListSnapshotsRequest { starting_token: "99".into(), ..Default::default() }).await;
    assert_eq!(code(bad), Code::Aborted);
    let one = c
        .list_snapshots(pb::ListSnapshotsRequest { snapshot_id: ids[1].clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.entries.len(), 1);
    // one snapshot by id (GET_SNAPSHOT): as listed; unknown ids are NOT_FOUND
    let get = |id: &str| pb::GetSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    let got = c.get_snapshot(get(&ids[1])).await.unwrap().into_inner().snapshot.unwrap();
    assert_eq!(Some(&got), one.entries[0].snapshot.as_ref());
    let last = if ids[1].ends_with('0') { '1' } else { '0' };
    let unknown = format!("{}{last}", &ids[1][..ids[1].len() - 1]); // well formed, no such commit
    assert_eq!(code(c.get_snapshot(get(&unknown)).await), Code::NotFound);
    assert_eq!(code(c.get_snapshot(get("not a snapshot id")).await), Code::NotFound);
    assert_eq!(code(c.get_snapshot(get("")).await), Code::InvalidArgument);
    let by_source = c
        .list_snapshots(pb::ListSnapshotsRequest { source_volume_id: v.volume_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_source.entries.len(), 3);

    // delete the middle one (a parent): hidden, kept; then the newest (the head): hidden, kept; then the oldest
    let del_snap = |id: &str| pb::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    let client = d.daemon.client();
    c.delete_snapshot(del_snap(&ids[1])).await.unwrap();
    assert_eq!(client.commits("admin/hist").unwrap().len(), 3);
    c.delete_snapshot(del_snap(&ids[2])).await.unwrap();
    c.delete_snapshot(del_snap(&ids[0])).await.unwrap();
    let left = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(left.entries.is_empty());
    // all three stay, hidden: the newest is the branch head, and it pins the older ones as its parents
    let commits = client.commits("admin/hist").unwrap();
    assert_eq!(commits.len(), 3, "a chain is pinned by its head while the volume lives");
    // with the volume gone, everything goes
    c.delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    assert!(client.dot("admin/hist").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_is_one_commit_over_subdots() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Driver::start().await;
    let pvc =
        |name: &'static str| [("csi.storage.k8s.io/pvc/name", name), ("csi.storage.k8s.io/pvc/namespace", "apps")];
    d.pvcs.set("apps", "shop-data", &[("blockmesh.io/dot", "shop"), ("blockmesh.io/subdot", "data")]);
    d.pvcs.set("apps", "shop-logs", &[("blockmesh.io/dot", "shop"), ("blockmesh.io/subdot", "logs")]);
    let a = d.controller.create_volume(create_req("p1", 4 * MIB, &pvc("shop-data"))).await.unwrap().into_inner();
    let b = d.controller.create_volume(create_req("p2", 4 * MIB, &pvc("shop-logs"))).await.unwrap().into_inner();
    let (a, b) = (a.volume.unwrap().volume_id, b.volume.unwrap().volume_id);
    let (ua, ub) = (d.daemon.uri("admin/shop.data"), d.daemon.uri("admin/shop.logs"));
    tokio::task::block_in_place(|| {
        qemu_io(&ua, false, &["write -P 0xaa 0 1M"]);
        qemu_io(&ub, false, &["write -P 0xbb 0 1M"]);
    });
    let req = pb::CreateVolumeGroupSnapshotRequest {
        name: "g1".into(),
        source_volume_ids: vec![a.clone(), b.clone()],
        ..Default::default()
    };
    let g = d.group.create_volume_group_snapshot(req.clone()).await.unwrap().into_inner().group_snapshot.unwrap();
    assert_eq!(g.snapshots.len(), 2);
    assert_eq!(d.group.create_volume_group_snapshot(req).await.unwrap().into_inner().group_snapshot.unwrap(), g);
    let commits = d.daemon.client().commits("admin/shop").unwrap();
    assert_eq!(commits.len(), 1, "one commit covers both subdots");
    let commit = &commits[0].id;
    tokio::task::block_in_place(|| {
        qemu_io(&d.daemon.uri(&format!("admin/shop.data@{commit}")), true, &["read -P 0xaa 0 1M"]);
        qemu_io(&d.daemon.uri(&format!("admin/shop.logs@{commit}")), true, &["read -P 0xbb 0 1M"]);
    });
    // members cannot be deleted alone; volumes of two dots cannot be grouped
    let member = g.snapshots[0].snapshot_id.clone();
    let alone =
        d.controller.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: member, ..Default::default() }).await;
    assert_eq!(code(alone), Code::InvalidArgument);
    let other = d.controller.create_volume(create_req("other", 4 * MIB, &[])).await.unwrap().into_inner();
    let mixed = pb::CreateVolumeGroupSnapshotRequest {
        name: "g2".into(),
        source_volume_ids: vec![a, other.volume.unwrap().volume_id],
        ..Default::default()
    };
    assert_eq!(code(d.group.create_volume_group_snapshot(mixed).await), Code::FailedPrecondition);
    let get =
        pb::GetVolumeGroupSnapshotRequest { group_snapshot_id: g.group_snapshot_id.clone(), ..Default::default() };
    assert_eq!(d.group.get_volume_group_snapshot(get.clone()).await.unwrap().into_inner().group_snapshot.unwrap(), g);
    let del =
        pb::DeleteVolumeGroupSnapshotRequest { group_snapshot_id: g.group_snapshot_id.clone(), ..Default::default() };
    d.group.delete_volume_group_snapshot(del.clone()).await.unwrap();
    d.group.delete_volume_group_snapshot(del).await.unwrap();
    assert_eq!(code(d.group.get_volume_group_snapshot(get).await), Code::NotFound);
}
