//! Quality of service from Kubernetes: StorageClass parameters (`iops`, `readIops`, `writeIops`, `bytesPerSec`,
//! `readBytesPerSec`, `writeBytesPerSec`, `burstMs`) and PVC annotations (`blockmesh.io/iops`, ...; an annotation
//! wins, `none` drops a parameter's limit) become the daemon's limits of the new volume; bad values are refused
//! before anything is made.
#![allow(clippy::unwrap_used)]

mod common;

use common::{code, create_req, Driver};
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
    assert_eq!(v.volume.unwrap().volume_id, "admin/pvc-q1/__default__");
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
