//! Where a new volume lives: the PVC's annotations, the StorageClass parameters, or the defaults.
//!
//! external-provisioner (with `--extra-create-metadata`) passes the PVC's name and namespace as the parameters
//! [`PARAM_PVC_NAME`] and [`PARAM_PVC_NAMESPACE`]; the controller reads that PVC's annotations through a
//! [`PvcAnnotations`] source: [`KubePvcs`] in a cluster (one HTTPS GET with the pod's service account),
//! [`MemoryPvcs`] in tests.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Where a pod finds its service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Longest wait for the Kubernetes API.
pub const KUBE_TIMEOUT: Duration = Duration::from_secs(15);

/// PVCs read from the Kubernetes API with the pod's service account (in-cluster): one `GET` of the PVC.
///
/// Not kube-rs: the driver needs one read of one object, and kube with k8s-openapi would be most of this crate's
/// build; a GET with the service account's token and CA is the same request kube would make.
#[derive(Debug)]
pub struct KubePvcs {
    base: String,
    token_file: PathBuf,
    agent: ureq::Agent,
}

impl KubePvcs {
    /// The in-cluster API server (`KUBERNETES_SERVICE_HOST` / `_PORT`) with the service account in `sa_dir`.
    pub fn in_cluster(sa_dir: &std::path::Path) -> Result<Self> {
        let var = |k: &str| std::env::var(k).map_err(|_| Error::Kubernetes(format!("{k} is not set: not in a pod?")));
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?;
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let ca = sa_dir.join("ca.crt");
        let tls = crate::daemon::trusting_ca(&ca)?;
        let agent = ureq::AgentBuilder::new().timeout(KUBE_TIMEOUT).tls_config(tls).build();
        Ok(Self { base: format!("https://{host}:{port}"), token_file: sa_dir.join("token"), agent })
    }
}

impl PvcAnnotations for KubePvcs {
    fn annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
        crate::ids::validate_part("PVC namespace", namespace)?;
        crate::ids::validate_part("PVC name", name)?;
        // The token is re-read every time: the kubelet rotates it.
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| Error::io(format!("reading {}", self.token_file.display()), e))?;
        let url = format!("{}/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}", self.base);
        let res = self.agent.get(&url).set("Authorization", &format!("Bearer {}", token.trim())).call();
        let body: serde_json::Value = match res {
            Ok(r) => r.into_json().map_err(|e| Error::Kubernetes(format!("PVC {namespace}/{name}: {e}")))?,
            Err(ureq::Error::Status(404, _)) => {
                return Err(Error::NotFound(format!("PVC {namespace}/{name} does not exist")))
            }
            Err(e) => return Err(Error::Kubernetes(format!("reading PVC {namespace}/{name}: {e}"))),
        };
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
