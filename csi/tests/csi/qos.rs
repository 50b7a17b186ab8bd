//! Quality of service from Kubernetes: StorageClass parameters (`iops`, `readIops`, `writeIops`, `bytesPerSec`,
//! `readBytesPerSec`, `writeBytesPerSec`, `burstMs`) and PVC annotations (`blockmesh.io/iops`, ...; an annotation
//! wins, `none` drops a parameter's limit) become the daemon's limits of the new volume; bad values are refused
//! before anything is made.
use crate::common::{code, create_req, vid, Driver};
use blockmesh_csi::pb;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// The daemon's limits of a subdot, as JSON.
fn limits(d: &Driver, dot: &str, subdot: &str) -> serde_json::Value {
    let url = format!("{}/v1/dots/{dot}/qos", d.daemon.api);
    let all: serde_json::Value = ureq::get(&url)
        .set("Authorization", &format!("Bearer {}", d.daemon.key()))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    all[subdot].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_parameters_and_pvc_annotations_set_the_limits() {
    let mut d = Driver::start().await;
    let params = [("iops", "300"), ("writeBytesPerSec", "8M"), ("burstMs", "250")];
    let v = d.controller.create_volume(create_req("pvc-q1", 4 * MIB, &params)).await.unwrap().into_inner();
    assert_eq!(v.volume.unwrap().volume_id, vid("admin/pvc-q1/__default__"));
    assert_eq!(
        limits(&d, "admin/pvc-q1", "__default__"),
        serde_json::json!({"iops": 300, "write_bytes_per_sec": 8 << 20, "burst_ms": 250})
    );
    // the PVC's annotations win; `none` drops the StorageClass's IOPS limit
    d.pvcs.set("apps", "db", &[("blockmesh.io/iops", "none"), ("blockmesh.io/read-iops", "900")]);
    let mut p = params.to_vec();
    p.extend([("csi.storage.k8s.io/pvc/name", "db"), ("csi.storage.k8s.io/pvc/namespace", "apps")]);
    d.controller.create_volume(create_req("pvc-q2", 4 * MIB, &p)).await.unwrap();
    assert_eq!(
        limits(&d, "admin/db", "__default__"),
        serde_json::json!({"read_iops": 900, "write_bytes_per_sec": 8 << 20, "burst_ms": 250})
    );
    // no QoS asked: none set
    d.controller.create_volume(create_req("pvc-q3", 4 * MIB, &[])).await.unwrap();
    assert_eq!(limits(&d, "admin/pvc-q3", "__default__"), serde_json::json!({}));
    // bad values: INVALID_ARGUMENT, and no volume made
    for bad in [[("iops", "0")], [("iops", "lots")], [("bytesPerSec", "12Q")]] {
        assert_eq!(code(d.controller.create_volume(create_req("pvc-bad", 4 * MIB, &bad)).await), Code::InvalidArgument);
    }
    assert!(d.daemon.client().dot("admin/pvc-bad").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_volume_changes_the_limits_live() {
    let mut d = Driver::start().await;
    let caps = d.controller.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}).await.unwrap();
    let modify = pb::controller_service_capability::rpc::Type::ModifyVolume as i32;
    let offered = caps
        .into_inner()
        .capabilities
        .iter()
        .any(|c| matches!(&c.r#type, Some(pb::controller_service_capability::Type::Rpc(r)) if r.r#type == modify));
    assert!(offered, "MODIFY_VOLUME is advertised");
    // a VolumeAttributesClass at creation goes on top of the StorageClass's limits
    let mut req = create_req("pvc-m", 4 * MIB, &[("iops", "300")]);
    req.mutable_parameters = [("writeIops".to_string(), "40".to_string())].into();
    let id = d.controller.create_volume(req).await.unwrap().into_inner().volume.unwrap().volume_id;
    assert_eq!(limits(&d, "admin/pvc-m", "__default__"), serde_json::json!({"iops": 300, "write_iops": 40}));
    let change = |pairs: &[(&str, &str)], volume: &str| pb::ControllerModifyVolumeRequest {
        volume_id: volume.to_string(),
        mutable_parameters: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    d.controller.controller_modify_volume(change(&[("iops", "none"), ("readBytesPerSec", "2M")], &id)).await.unwrap();
    assert_eq!(
        limits(&d, "admin/pvc-m", "__default__"),
        serde_json::json!({"write_iops": 40, "read_bytes_per_sec": 2 << 20})
    );
    // refusals: unknown key, a value the daemon refuses, no parameters, an unknown volume; nothing changes
    for bad in [change(&[("color", "red")], &id), change(&[("writeIops", "0")], &id), change(&[], &id)] {
        assert_eq!(code(d.controller.controller_modify_volume(bad).await), Code::InvalidArgument);
    }
    let gone = change(&[("iops", "5")], "admin/nope/__default__");
    assert_eq!(code(d.controller.controller_modify_volume(gone).await), Code::NotFound);
    assert_eq!(
        limits(&d, "admin/pvc-m", "__default__"),
        serde_json::json!({"write_iops": 40, "read_bytes_per_sec": 2 << 20})
    );
}
