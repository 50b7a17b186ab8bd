//! Where a new volume lives: the PVC's annotations, the StorageClass parameters, or the defaults.
//!
//! external-provisioner (with `--extra-create-metadata`) passes the PVC's name and namespace as the parameters
//! [`PARAM_PVC_NAME`] and [`PARAM_PVC_NAMESPACE`]; the controller reads that PVC's annotations through a
//! [`PvcAnnotations`] source: [`KubePvcs`] in a cluster (one HTTPS GET with the pod's service account),
//! [`MemoryPvcs`] in tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::ids::{VolumeId, DEFAULT_SUBDOT};
use crate::{Error, Result};

/// Parameter with the PVC's name (external-provisioner `--extra-create-metadata`).
pub const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// Parameter with the PVC's namespace (external-provisioner `--extra-create-metadata`).
pub const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// StorageClass parameter: the blockmesh namespace of new dots.
pub const PARAM_NAMESPACE: &str = "blockmeshNamespace";
/// The blockmesh namespace when nothing names one.
pub const DEFAULT_NAMESPACE: &str = "admin";

/// PVC annotations that name the blockmesh namespace, then their Dotmesh spelling.
pub const NAMESPACE_ANNOTATIONS: [&str; 2] = ["blockmesh.io/namespace", "dotmeshNamespace"];
/// PVC annotations that name the dot.
pub const DOT_ANNOTATIONS: [&str; 2] = ["blockmesh.io/dot", "dotmeshName"];
/// PVC annotations that name the subdot.
pub const SUBDOT_ANNOTATIONS: [&str; 2] = ["blockmesh.io/subdot", "dotmeshSubdot"];

/// Quality-of-service limits a volume may be given: `(StorageClass parameter, PVC annotation, the daemon's field,
/// counts bytes)`. An annotation wins over the parameter; a value is a whole number, bytes may carry a binary
/// suffix (`K`, `M`, `G`, `T`: 1024-based), and `none` (annotation) removes a parameter's limit.
pub const QOS_KEYS: [(&str, &str, &str, bool); 7] = [
    ("iops", "blockmesh.io/iops", "iops", false),
    ("readIops", "blockmesh.io/read-iops", "read_iops", false),
    ("writeIops", "blockmesh.io/write-iops", "write_iops", false),
    ("bytesPerSec", "blockmesh.io/bytes-per-sec", "bytes_per_sec", true),
    ("readBytesPerSec", "blockmesh.io/read-bytes-per-sec", "read_bytes_per_sec", true),
    ("writeBytesPerSec", "blockmesh.io/write-bytes-per-sec", "write_bytes_per_sec", true),
    ("burstMs", "blockmesh.io/burst-ms", "burst_ms", false),
];

/// A limit's value: a whole number, with a binary suffix when it counts bytes.
fn limit_value(key: &str, value: &str, bytes: bool) -> Result<u64> {
    let v = value.trim();
    let (digits, unit) = match v.char_indices().last() {
        Some((i, c)) if bytes && c.is_ascii_alphabetic() => (&v[..i], c.to_ascii_uppercase()),
        _ => (v, ' '),
    };
    let shift = match unit {
        ' ' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return Err(Error::InvalidArgument(format!("{key}: {value:?} has an unknown unit (K, M, G or T)"))),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| Error::InvalidArgument(format!("{key}: {value:?} is not a whole number")))
}

/// The QoS limits asked for by the StorageClass parameters and the PVC's annotations, as the daemon's JSON
/// (`None`: nothing asked, the volume keeps what it has). The daemon checks the values (minimums, burst bound).
pub fn qos_limits(
    parameters: &HashMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let mut limits = serde_json::Map::new();
    let mut asked = false;
    for (param, annotation, field, bytes) in QOS_KEYS {
        let (key, value) = match (annotations.get(annotation), parameters.get(param)) {
            (Some(v), _) => (annotation, v),
            (None, Some(v)) => (param, v),
            (None, None) => continue,
        };
        asked = true;
        if value.trim() != "none" {
            limits.insert(field.to_string(), limit_value(key, value, bytes)?.into());
        }
    }
    if asked {
        check_limits(&limits)?;
    }
    Ok(asked.then_some(limits))
}

/// The limits a `ControllerModifyVolume` (a VolumeAttributesClass's parameters, spelt as the StorageClass's QoS
/// parameters) makes of the volume's `current` ones: each key given replaces that limit (`none` removes it), the
/// others stay. Any other key is refused, and so are limits the daemon would refuse.
pub fn modify_qos(
    current: &serde_json::Map<String, serde_json::Value>,
    mutable: &HashMap<String, String>,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut limits = current.clone();
    for (key, value) in mutable {
        let Some((_, _, field, bytes)) = QOS_KEYS.iter().find(|(param, ..)| param == key) else {
            let known: Vec<&str> = QOS_KEYS.iter().map(|(p, ..)| *p).collect();
            return Err(Error::InvalidArgument(format!(
                "mutable parameter {key:?} is not one this driver changes ({})",
                known.join(", ")
            )));
        };
        if value.trim() == "none" {
            limits.remove(*field);
        } else {
            limits.insert(field.to_string(), limit_value(key, value, *bytes)?.into());
        }
    }
    check_limits(&limits)?;
    Ok(limits)
}

/// Refuses limits the daemon would refuse, before anything is made.
fn check_limits(limits: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let get = |field: &str| limits.get(field).and_then(serde_json::Value::as_u64);
    let l = blockmesh_nbd::Limits {
        iops: get("iops"),
        read_iops: get("read_iops"),
        write_iops: get("write_iops"),
        bytes_per_sec: get("bytes_per_sec"),
        read_bytes_per_sec: get("read_bytes_per_sec"),
        write_bytes_per_sec: get("write_bytes_per_sec"),
        burst_ms: get("burst_ms").unwrap_or(blockmesh_nbd::qos::DEFAULT_BURST_MS),
    };
    l.validate().map_err(|e| Error::InvalidArgument(format!("QoS limits: {e}")))
}

/// Reads a PVC's annotations.
pub trait PvcAnnotations: Send + Sync + std::fmt::Debug {
    /// The annotations of PVC `name` in Kubernetes namespace `namespace` (blocking; empty when it has none).
    fn annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>>;
}

/// PVCs held in memory (tests, and clusters where annotations are not read).
#[derive(Debug, Default)]
pub struct MemoryPvcs {
    pvcs: Mutex<HashMap<(String, String), BTreeMap<String, String>>>,
}

impl MemoryPvcs {
    /// Sets the annotations of PVC `namespace/name`.
    pub fn set(&self, namespace: &str, name: &str, annotations: &[(&str, &str)]) {
        let map = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.pvcs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((namespace.to_string(), name.to_string()), map);
    }
}

impl PvcAnnotations for MemoryPvcs {
    fn annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
        Ok(self
            .pvcs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default())
    }
}

pub use crate::kube::{KUBE_TIMEOUT, SERVICE_ACCOUNT_DIR};

/// PVCs read from the Kubernetes API with the pod's service account (in-cluster): one `GET` of the PVC
/// ([`crate::kube::KubeApi`]).
#[derive(Debug)]
pub struct KubePvcs {
    api: crate::kube::KubeApi,
}

impl KubePvcs {
    /// The in-cluster API server (`KUBERNETES_SERVICE_HOST` / `_PORT`) with the service account in `sa_dir`.
    pub fn in_cluster(sa_dir: &std::path::Path) -> Result<Self> {
        Ok(Self { api: crate::kube::KubeApi::in_cluster(sa_dir)? })
    }

    /// The PVCs of the API server `api`.
    pub fn new(api: crate::kube::KubeApi) -> Self {
        Self { api }
    }
}

impl PvcAnnotations for KubePvcs {
    fn annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
        crate::ids::validate_part("PVC namespace", namespace)?;
        crate::ids::validate_part("PVC name", name)?;
        let path = format!("/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}");
        let what = format!("PVC {namespace}/{name}");
        let body = self.api.get(&path, &what)?.ok_or_else(|| Error::NotFound(format!("{what} does not exist")))?;
        let body: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Error::Kubernetes(format!("{what}: {e}")))?;
        let annotations = body.pointer("/metadata/annotations").and_then(|a| a.as_object());
        Ok(annotations
            .map(|a| a.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default())
    }
}

/// The volume a `CreateVolume` call names: from the PVC's annotations (`blockmesh.io/*` first, then the Dotmesh
/// ones), the StorageClass parameter [`PARAM_NAMESPACE`], and the defaults (namespace `admin`, dot = the PVC's name,
/// or the CSI volume name without a PVC; subdot `__default__`).
pub fn placement(
    volume_name: &str,
    parameters: &HashMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<VolumeId> {
    let first = |keys: &[&str]| keys.iter().find_map(|k| annotations.get(*k)).filter(|v| !v.is_empty()).cloned();
    let namespace = first(&NAMESPACE_ANNOTATIONS)
        .or_else(|| parameters.get(PARAM_NAMESPACE).filter(|v| !v.is_empty()).cloned())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let dot = first(&DOT_ANNOTATIONS)
        .or_else(|| parameters.get(PARAM_PVC_NAME).filter(|v| !v.is_empty()).cloned())
        .unwrap_or_else(|| volume_name.to_string());
    let subdot = first(&SUBDOT_ANNOTATIONS).unwrap_or_else(|| DEFAULT_SUBDOT.to_string());
    VolumeId::new(&namespace, &dot, &subdot)
}

/// Whether the PVC's annotations name its dot ([`DOT_ANNOTATIONS`]), rather than leave it the PVC's own name: such
/// a PVC most likely means a dot that exists.
pub fn names_dot(annotations: &BTreeMap<String, String>) -> bool {
    DOT_ANNOTATIONS.iter().any(|k| annotations.get(*k).is_some_and(|v| !v.is_empty()))
}

/// The annotations of the PVC the parameters name (none without one).
pub fn pvc_annotations(
    source: &Arc<dyn PvcAnnotations>,
    parameters: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    match (parameters.get(PARAM_PVC_NAMESPACE), parameters.get(PARAM_PVC_NAME)) {
        (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => source.annotations(ns, name),
        _ => Ok(BTreeMap::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn qos_from_parameters_and_annotations() -> Result<()> {
        let none = BTreeMap::new();
        assert_eq!(qos_limits(&params(&[(PARAM_NAMESPACE, "x")]), &none)?, None);
        let p = params(&[("iops", "500"), ("writeBytesPerSec", "10M"), ("burstMs", "200")]);
        let got = qos_limits(&p, &none)?.expect("asked");
        assert_eq!(
            serde_json::Value::Object(got),
            serde_json::json!({"iops": 500, "write_bytes_per_sec": 10 << 20, "burst_ms": 200})
        );
        let a: BTreeMap<String, String> = [("blockmesh.io/iops", "none"), ("blockmesh.io/read-iops", "90")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let got = qos_limits(&p, &a)?.expect("asked");
        assert_eq!(
            serde_json::Value::Object(got),
            serde_json::json!({"read_iops": 90, "write_bytes_per_sec": 10 << 20, "burst_ms": 200})
        );
        assert!(matches!(qos_limits(&params(&[("iops", "lots")]), &none), Err(Error::InvalidArgument(_))));
        assert!(
            matches!(qos_limits(&params(&[("iops", "5M")]), &none), Err(Error::InvalidArgument(_))),
            "IOPS take no unit"
        );
        assert!(matches!(qos_limits(&params(&[("bytesPerSec", "5X")]), &none), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            qos_limits(&params(&[("bytesPerSec", "99999999999T")]), &none),
            Err(Error::InvalidArgument(_))
        ));
        assert!(
            matches!(qos_limits(&params(&[("iops", "0")]), &none), Err(Error::InvalidArgument(_))),
            "the daemon's minimum"
        );
        Ok(())
    }

    #[test]
    fn modify_replaces_the_limits_named_and_keeps_the_others() -> Result<()> {
        let current = match serde_json::json!({"iops": 5, "write_bytes_per_sec": 8192}) {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        let got = modify_qos(&current, &params(&[("iops", "none"), ("readBytesPerSec", "1M")]))?;
        assert_eq!(
            serde_json::Value::Object(got),
            serde_json::json!({"write_bytes_per_sec": 8192, "read_bytes_per_sec": 1 << 20})
        );
        assert!(matches!(modify_qos(&current, &params(&[("size", "5")])), Err(Error::InvalidArgument(_))));
        assert!(matches!(modify_qos(&current, &params(&[("iops", "0")])), Err(Error::InvalidArgument(_))));
        Ok(())
    }

    #[test]
    fn annotations_then_parameters_then_defaults() -> Result<()> {
        let none = BTreeMap::new();
        assert_eq!(placement("pvc-1", &params(&[]), &none)?.to_string(), "admin/pvc-1/__default__");
        let p = params(&[(PARAM_PVC_NAME, "data"), (PARAM_NAMESPACE, "team")]);
        assert_eq!(placement("pvc-1", &p, &none)?.to_string(), "team/data/__default__");
        let dotmesh: BTreeMap<String, String> =
            [("dotmeshNamespace", "dm"), ("dotmeshName", "app"), ("dotmeshSubdot", "logs")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(placement("pvc-1", &p, &dotmesh)?.to_string(), "dm/app/logs");
        let mut both = dotmesh.clone();
        both.insert("blockmesh.io/dot".into(), "bm".into());
        assert_eq!(placement("pvc-1", &p, &both)?.to_string(), "dm/bm/logs", "blockmesh.io/* wins");
        let mut bad = BTreeMap::new();
        bad.insert("blockmesh.io/dot".to_string(), "a/b".to_string());
        assert!(matches!(placement("x", &p, &bad), Err(Error::InvalidArgument(_))));
        Ok(())
    }
}
