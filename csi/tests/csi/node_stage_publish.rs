//! The Node service above the kernel attach (a fake attacher and mounter): argument checks, idempotent stage,
//! publish, unpublish and unstage, staging records, raw block volumes, stats and expansion, GetInfo topology.
use crate::common::{block_cap, code, mount_cap, Driver, SERVER_NODE};
use blockmesh_csi::pb;
use tonic::Code;

fn stage(volume: &str, path: &std::path::Path, cap: pb::VolumeCapability) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: path.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish(
    volume: &str,
    staging: &std::path::Path,
    target: &std::path::Path,
    cap: pb::VolumeCapability,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_publish_unpublish_unstage_are_idempotent() {
    let mut d = Driver::start().await;
    let info = d.node.node_get_info(pb::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, SERVER_NODE);
    assert_eq!(info.accessible_topology.unwrap().segments["topology.blockmesh.io/node"], SERVER_NODE);

    let vol = "admin/app/__default__";
    let staging = d.dir.path().join("staging");
    let target = d.dir.path().join("pods/one/mount");
    let n = &mut d.node;

    // missing fields: INVALID_ARGUMENT
    assert_eq!(code(n.node_stage_volume(stage("", &staging, mount_cap())).await), Code::InvalidArgument);
    let mut nocap = stage(vol, &staging, mount_cap());
    nocap.volume_capability = None;
    assert_eq!(code(n.node_stage_volume(nocap).await), Code::InvalidArgument);
    assert_eq!(
        code(n.node_stage_volume(stage(vol, std::path::Path::new(""), mount_cap())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_publish_volume(publish(vol, &staging, std::path::Path::new(""), mount_cap())).await),
        Code::InvalidArgument
    );
    // publishing before staging: FAILED_PRECONDITION; an unknown export: NOT_FOUND
    assert_eq!(
        code(n.node_publish_volume(publish(vol, &staging, &target, mount_cap())).await),
        Code::FailedPrecondition
    );
    d.attacher.set_missing("admin/gone/__default__");
    assert_eq!(code(n.node_stage_volume(stage("admin/gone/__default__", &staging, mount_cap())).await), Code::NotFound);

    // stage twice: one attach, one mkfs
    n.node_stage_volume(stage(vol, &staging, mount_cap())).await.unwrap();
    n.node_stage_volume(stage(vol, &staging, mount_cap())).await.unwrap();
    assert_eq!(d.attacher.attached().len(), 1);
    assert_eq!(d.mounter.mkfs_runs(), 1);
    // elsewhere or as a block device: ALREADY_EXISTS
    let other = d.dir.path().join("staging2");
    assert_eq!(code(n.node_stage_volume(stage(vol, &other, mount_cap())).await), Code::AlreadyExists);
    assert_eq!(code(n.node_stage_volume(stage(vol, &staging, block_cap())).await), Code::AlreadyExists);

    // publish twice: one bind mount of the staging path
    n.node_publish_volume(publish(vol, &staging, &target, mount_cap())).await.unwrap();
    n.node_publish_volume(publish(vol, &staging, &target, mount_cap())).await.unwrap();
    assert_eq!(d.mounter.mounts().get(&target), Some(&staging));
    assert!(target.is_dir());

    // stats and expansion
    let stats = n
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: vol.into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.usage.iter().any(|u| u.unit == pb::volume_usage::Unit::Bytes as i32 && u.total > 0));
    assert!(!stats.volume_condition.unwrap().abnormal, "a connected device");
    // the device loses its server: abnormal, with why; back: normal again (VOLUME_CONDITION)
    let device = d.attacher.attached().into_keys().next().unwrap();
    let stats_req = || pb::NodeGetVolumeStatsRequest {
        volume_id: vol.into(),
        volume_path: target.display().to_string(),
        ..Default::default()
    };
    d.attacher.set_lost(&device, true);
    let lost = n.node_get_volume_stats(stats_req()).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(lost.abnormal && lost.message.contains("reconnecting"), "{lost:?}");
    d.attacher.set_lost(&device, false);
    let back = n.node_get_volume_stats(stats_req()).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(!back.abnormal, "{back:?}");
    let caps = n.node_get_capabilities(pb::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let volume_condition = pb::node_service_capability::rpc::Type::VolumeCondition as i32;
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(pb::node_service_capability::Type::Rpc(r)) if r.r#type == volume_condition
    )));
    let missing = pb::NodeGetVolumeStatsRequest {
        volume_id: vol.into(),
        volume_path: "/nonexistent/x".into(),
        ..Default::default()
    };
    assert_eq!(code(n.node_get_volume_stats(missing).await), Code::NotFound);
    let grown = n
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: vol.into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, blockmesh_csi::testing::FAKE_DEVICE_BYTES as i64);
    assert_eq!(d.mounter.grown(), 1);

    // unpublish and unstage, each twice
    let unpub = pb::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: target.display().to_string() };
    n.node_unpublish_volume(unpub.clone()).await.unwrap();
    n.node_unpublish_volume(unpub).await.unwrap();
    assert!(!target.exists());
    let unstage =
        pb::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: staging.display().to_string() };
    n.node_unstage_volume(unstage.clone()).await.unwrap();
    n.node_unstage_volume(unstage).await.unwrap();
    assert!(d.attacher.attached().is_empty());
    assert!(d.mounter.mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_volumes_publish_the_device() {
    let mut d = Driver::start().await;
    let vol = "admin/raw/__default__";
    let staging = d.dir.path().join("staging-raw");
    let target = d.dir.path().join("pods/two/dev");
    d.node.node_stage_volume(stage(vol, &staging, block_cap())).await.unwrap();
    assert_eq!(d.mounter.mkfs_runs(), 0, "no file system on a raw block volume");
    d.node.node_publish_volume(publish(vol, &staging, &target, block_cap())).await.unwrap();
    let device = d.attacher.attached().keys().next().cloned().unwrap();
    assert_eq!(d.mounter.mounts().get(&target), Some(&device));
    assert!(target.is_file());
    // a mount publish of a block-staged volume: ALREADY_EXISTS
    let other = d.dir.path().join("pods/three/mnt");
    assert_eq!(
        code(d.node.node_publish_volume(publish(vol, &staging, &other, mount_cap())).await),
        Code::AlreadyExists
    );
    d.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: vol.into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    d.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    assert!(d.attacher.attached().is_empty());
}
