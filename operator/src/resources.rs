//! Names, labels and the objects the operator makes (server pods, pool PVCs), and the observed model read back
//! from the objects the API returns.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use serde_json::json;

use crate::config::{ClusterConfig, StorageMode};
use crate::plan::{NodeInfo, PodInfo, PvcInfo, Server};
use crate::selector::is_dns_label;
use crate::{Error, Result};

/// `app.kubernetes.io/name` of everything blockmesh runs.
pub const APP_NAME: &str = "blockmesh";
/// `app.kubernetes.io/managed-by` of what the operator makes.
pub const MANAGED_BY: &str = "blockmesh-operator";
/// `app.kubernetes.io/component` of server pods (the `blockmesh` Service selects them).
pub const COMPONENT_SERVER: &str = "server";
/// `app.kubernetes.io/component` of pool PVCs.
pub const COMPONENT_POOL: &str = "pool";
/// Label: the storage mode a server pod was made for.
pub const MODE_LABEL: &str = "blockmesh.io/storage-mode";
/// Label: the PVC a server pod serves.
pub const PVC_LABEL: &str = "blockmesh.io/pvc";
/// Annotation: the node a server pod was made for (names can be longer than a label value).
pub const NODE_ANNOTATION: &str = "blockmesh.io/node";
/// Annotation: hash of the spec a server pod was made with.
pub const SPEC_HASH_ANNOTATION: &str = "blockmesh.io/spec-hash";
/// Annotation: the node a PVC was created for.
pub const CREATED_FOR_ANNOTATION: &str = "blockmesh.io/created-for-node";
/// Annotation: the zone of that node.
pub const ZONE_ANNOTATION: &str = "blockmesh.io/zone";
/// The well-known zone label of nodes.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Label selector of the server pods the operator made.
pub const SERVER_POD_SELECTOR: &str =
    "app.kubernetes.io/managed-by=blockmesh-operator,app.kubernetes.io/component=server";
/// Label selector of the pool PVCs the operator made.
pub const POOL_PVC_SELECTOR: &str = "app.kubernetes.io/managed-by=blockmesh-operator,app.kubernetes.io/component=pool";

/// Port of the control API in the server pods (and the Service).
pub const API_PORT: u16 = 32607;
/// Port of NBD in the server pods (and the Service).
pub const NBD_PORT: u16 = 10809;
/// Port of the server's health endpoint (`serve --health-listen`): probes only, not in the Service.
pub const HEALTH_PORT: u16 = 32608;
/// The data directory inside server pods: the pool file (`<poolName>.bm`), the NBD socket and the API key live there.
pub const DATA_DIR: &str = "/var/lib/blockmesh";
/// Key of the admin API key in the Secret.
pub const API_KEY_SECRET_KEY: &str = "api-key";
/// File name of the API key in the data directory (what `blockmesh serve` reads).
pub const API_KEY_FILE: &str = "api-key";
/// Pool file space kept free on a PVC for the filesystem, in percent of the PVC...
pub const PVC_HEADROOM_PERCENT: u64 = 5;
/// ...and at least this many bytes.
pub const PVC_MIN_HEADROOM_BYTES: u64 = 64 << 20;
/// Seconds a server pod has to flush its pool when stopped.
pub const TERMINATION_GRACE_SECONDS: i64 = 60;
/// The daemon's health route on its health endpoint (`blockmesh::api::HEALTH_PATH`; the operator talks to daemons
/// over their API and imports none of their code).
pub const HEALTH_PATH: &str = "/healthz";
/// Startup probe: period and failures allowed (10 minutes to open and recover a large pool).
pub const STARTUP_PROBE_PERIOD_SECONDS: i32 = 5;
/// See [`STARTUP_PROBE_PERIOD_SECONDS`].
pub const STARTUP_PROBE_FAILURES: i32 = 120;
/// Liveness probe period.
pub const LIVENESS_PROBE_PERIOD_SECONDS: i32 = 10;
/// Liveness failures before a restart.
pub const LIVENESS_PROBE_FAILURES: i32 = 6;
/// Readiness probe period.
pub const READINESS_PROBE_PERIOD_SECONDS: i32 = 5;
/// Readiness failures before the pod leaves the Service.
pub const READINESS_PROBE_FAILURES: i32 = 2;
/// Probe connect timeout.
pub const PROBE_TIMEOUT_SECONDS: i32 = 3;
/// CPU requested by a server pod.
pub const SERVER_CPU_REQUEST: &str = "100m";
/// Memory requested by a server pod.
pub const SERVER_MEMORY_REQUEST: &str = "256Mi";
/// Longest pod name the operator makes (a DNS label, so the pod's hostname is its name).
pub const MAX_POD_NAME_LEN: usize = 63;
/// Hex digits of the unique id in `pvc-UNIQUEID`.
pub const PVC_ID_HEX_DIGITS: usize = 12;

/// The operator's own settings (flags and environment of its Deployment), which the server pods depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Namespace of the operator, its ConfigMap, the server pods and the PVCs.
    pub namespace: String,
    /// Image of the server pods (`blockmesh` on its PATH).
    pub server_image: String,
    /// Secret holding the admin API key (key `api-key`).
    pub secret_name: String,
    /// ServiceAccount of the server pods.
    pub service_account: String,
}

/// Default namespace.
pub const DEFAULT_NAMESPACE: &str = "blockmesh";
/// Default server image.
pub const DEFAULT_SERVER_IMAGE: &str = "ghcr.io/blockmesh/blockmesh:0.1.0";
/// Default Secret with the API key (the user creates it).
pub const DEFAULT_SECRET_NAME: &str = "blockmesh";
/// Default ServiceAccount of the server pods.
pub const DEFAULT_SERVER_SERVICE_ACCOUNT: &str = "blockmesh";

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: DEFAULT_NAMESPACE.into(),
            server_image: DEFAULT_SERVER_IMAGE.into(),
            secret_name: DEFAULT_SECRET_NAME.into(),
            service_account: DEFAULT_SERVER_SERVICE_ACCOUNT.into(),
        }
    }
}

/// 64-bit FNV-1a: a stable hash (the same across Rust versions and machines) for names and spec hashes.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// A DNS label from `server-` and the given parts: lower case, anything but `a-z0-9-` becomes `-`; a name that had
/// to change (or to be shortened to 63 characters) gets 8 hex digits of a hash of the original, so two different
/// nodes never share a pod name.
fn pod_name(raw: &str) -> String {
    if is_dns_label(raw) {
        return raw.to_string();
    }
    let mut s: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let suffix = format!("-{:08x}", fnv1a64(raw.as_bytes()) & 0xffff_ffff);
    s.truncate(MAX_POD_NAME_LEN - suffix.len());
    let s = s.trim_end_matches('-');
    format!("{s}{suffix}")
}

/// `server-NODE`: the server pod of a node in local mode.
pub fn local_pod_name(node: &str) -> String {
    pod_name(&format!("server-{node}"))
}

/// `server-PVC-node-NODE`: the server pod of a PVC on a node in pvcPerNode mode.
pub fn pvc_pod_name(pvc: &str, node: &str) -> String {
    pod_name(&format!("server-{pvc}-node-{node}"))
}

/// `pvc-UNIQUEID` for a new PVC: derived from the node's UID (and a counter past names that exist), so a pass
/// that runs again on a stale view asks for the same name and gets `AlreadyExists` instead of a second PVC.
pub fn new_pvc_name(node_uid: &str, existing: &BTreeSet<String>) -> String {
    let mut n = 0u64;
    loop {
        let h = fnv1a64(format!("{node_uid}/{n}").as_bytes());
        let name = format!("pvc-{:0width$x}", h >> (64 - 4 * PVC_ID_HEX_DIGITS), width = PVC_ID_HEX_DIGITS);
        if !existing.contains(&name) {
            return name;
        }
        n += 1;
    }
}

/// Pool file size on a PVC of `pvc_bytes`: the PVC less the filesystem's headroom, in whole MiB.
pub fn pool_size_on_pvc(pvc_bytes: u64) -> u64 {
    let headroom = (pvc_bytes / 100 * PVC_HEADROOM_PERCENT).max(PVC_MIN_HEADROOM_BYTES);
    (pvc_bytes.saturating_sub(headroom) >> 20) << 20
}

/// A Kubernetes quantity for a byte count: binary suffix when whole (`10Gi`), bytes otherwise.
pub fn quantity(bytes: u64) -> String {
    for (shift, suffix) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn server_labels(mode: StorageMode, pvc: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        ("app.kubernetes.io/component".to_string(), COMPONENT_SERVER.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
        (MODE_LABEL.to_string(), mode.as_str().to_string()),
    ]);
    if let Some(p) = pvc {
        labels.insert(PVC_LABEL.to_string(), p.to_string());
    }
    labels
}

/// The server pod, without its spec-hash annotation.
fn server_pod_unhashed(settings: &Settings, config: &ClusterConfig, server: &Server) -> serde_json::Value {
    let (data_volume, pool_size) = match &server.pvc {
        Some(pvc) => (
            json!({ "name": "data", "persistentVolumeClaim": { "claimName": pvc } }),
            pool_size_on_pvc(config.pvc_size_bytes),
        ),
        None => (
            json!({ "name": "data", "hostPath": { "path": config.local_pool_location, "type": "DirectoryOrCreate" } }),
            config.local_pool_size_bytes,
        ),
    };
    let tcp = |port: &str| json!({ "port": port });
    let health = json!({ "path": HEALTH_PATH, "port": "health", "scheme": "HTTP" });
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": server.name,
            "namespace": settings.namespace,
            "labels": server_labels(config.storage_mode, server.pvc.as_deref()),
            "annotations": { NODE_ANNOTATION: server.node },
        },
        "spec": {
            "serviceAccountName": settings.service_account,
            // The server needs no Kubernetes API access.
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
            "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
                { "matchFields": [ { "key": "metadata.name", "operator": "In", "values": [server.node] } ] }
            ] } } },
            // As a DaemonSet's pods: stay on a node that is cordoned, under pressure or unreachable; the operator
            // decides when a node is gone (its Node object is).
            "tolerations": [
                { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute" },
                { "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute" },
                { "key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule" },
                { "key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule" },
                { "key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule" },
                { "key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule" },
            ],
            "securityContext": { "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{
                "name": "server",
                "image": settings.server_image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["blockmesh"],
                "args": [
                    "serve",
                    "--pool-size", pool_size.to_string(),
                    "--nbd-listen", format!("0.0.0.0:{NBD_PORT}"),
                    "--api-listen", format!("0.0.0.0:{API_PORT}"),
                    "--health-listen", format!("0.0.0.0:{HEALTH_PORT}"),
                ],
                "env": [
                    { "name": "BLOCKMESH_DATA_DIR", "value": DATA_DIR },
                    { "name": "BLOCKMESH_POOL_NAME", "value": config.pool_name },
                    { "name": "BLOCKMESH_LOG_ADDRESS", "value": config.log_address },
                    { "name": "BLOCKMESH_UPGRADES_URL", "value": config.upgrades_url },
                    { "name": "BLOCKMESH_UPGRADES_INTERVAL_SECONDS", "value": config.upgrades_interval_seconds.to_string() },
                    { "name": "BLOCKMESH_NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
                ],
                "ports": [
                    { "name": "api", "containerPort": API_PORT, "protocol": "TCP" },
                    { "name": "nbd", "containerPort": NBD_PORT, "protocol": "TCP" },
                    { "name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP" },
                ],
                // The daemon binds its ports only once the pool is open and recovered. Its health endpoint (its own
                // port: every control API call needs the key) fails (503) once a device error has failed the pool,
                // which a restart reopens: so the kubelet restarts a server whose pool failed, not only one that
                // stopped listening.
                "startupProbe": { "httpGet": health, "periodSeconds": STARTUP_PROBE_PERIOD_SECONDS,
                    "failureThreshold": STARTUP_PROBE_FAILURES, "timeoutSeconds": PROBE_TIMEOUT_SECONDS },
                "livenessProbe": { "httpGet": health, "periodSeconds": LIVENESS_PROBE_PERIOD_SECONDS,
                    "failureThreshold": LIVENESS_PROBE_FAILURES, "timeoutSeconds": PROBE_TIMEOUT_SECONDS },
                "readinessProbe": { "tcpSocket": tcp("nbd"), "periodSeconds": READINESS_PROBE_PERIOD_SECONDS,
                    "failureThreshold": READINESS_PROBE_FAILURES, "timeoutSeconds": PROBE_TIMEOUT_SECONDS },
                "resources": { "requests": { "cpu": SERVER_CPU_REQUEST, "memory": SERVER_MEMORY_REQUEST } },
                "securityContext": {
                    // Root, to write the pool in a root-owned host directory or volume; no capabilities.
                    "runAsUser": 0,
                    "runAsNonRoot": false,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": { "drop": ["ALL"] },
                },
                "volumeMounts": [
                    { "name": "data", "mountPath": DATA_DIR },
                    // The key from the Secret, where the daemon reads it (DATA_DIR/api-key).
                    { "name": "api-key", "mountPath": format!("{DATA_DIR}/{API_KEY_FILE}"), "subPath": API_KEY_SECRET_KEY, "readOnly": true },
                ],
            }],
            "volumes": [
                data_volume,
                { "name": "api-key", "secret": { "secretName": settings.secret_name, "defaultMode": 0o400,
                    "items": [ { "key": API_KEY_SECRET_KEY, "path": API_KEY_SECRET_KEY } ] } },
            ],
        },
    })
}

/// Hash of the server pod the operator wants (what its spec-hash annotation holds when it is up to date).
pub fn spec_hash(settings: &Settings, config: &ClusterConfig, server: &Server) -> String {
    let value = server_pod_unhashed(settings, config, server);
    format!("{:016x}", fnv1a64(value.to_string().as_bytes()))
}

/// The server pod for `server`, with its spec hash.
pub fn server_pod(settings: &Settings, config: &ClusterConfig, server: &Server) -> Result<Pod> {
    let mut value = server_pod_unhashed(settings, config, server);
    let hash = format!("{:016x}", fnv1a64(value.to_string().as_bytes()));
    if let Some(a) = value.pointer_mut("/metadata/annotations").and_then(serde_json::Value::as_object_mut) {
        a.insert(SPEC_HASH_ANNOTATION.to_string(), json!(hash));
    }
    serde_json::from_value(value)
        .map_err(|e| Error::Serialize { what: format!("pod {}", server.name), message: e.to_string() })
}

/// A pool PVC for a node.
pub fn pool_pvc(
    settings: &Settings,
    config: &ClusterConfig,
    name: &str,
    node: &str,
    zone: Option<&str>,
) -> Result<PersistentVolumeClaim> {
    let mut annotations = BTreeMap::from([(CREATED_FOR_ANNOTATION.to_string(), node.to_string())]);
    if let Some(z) = zone {
        annotations.insert(ZONE_ANNOTATION.to_string(), z.to_string());
    }
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": "Filesystem",
        "resources": { "requests": { "storage": quantity(config.pvc_size_bytes) } },
    });
    if !config.pvc_storage_class.is_empty() {
        spec["storageClassName"] = json!(config.pvc_storage_class);
    }
    let value = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {
                "app.kubernetes.io/name": APP_NAME,
                "app.kubernetes.io/component": COMPONENT_POOL,
                "app.kubernetes.io/managed-by": MANAGED_BY,
            },
            "annotations": annotations,
        },
        "spec": spec,
    });
    serde_json::from_value(value).map_err(|e| Error::Serialize { what: format!("PVC {name}"), message: e.to_string() })
}

/// A node as the planner sees it.
pub fn node_info(node: &Node) -> NodeInfo {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        ready,
        deleting: node.metadata.deletion_timestamp.is_some(),
    }
}

/// A server pod as the planner sees it.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let meta = &pod.metadata;
    let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k)).cloned();
    let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k)).cloned();
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    PodInfo {
        name: meta.name.clone().unwrap_or_default(),
        node: annotation(NODE_ANNOTATION)
            .or_else(|| pod.spec.as_ref().and_then(|s| s.node_name.clone()))
            .unwrap_or_default(),
        pvc: label(PVC_LABEL),
        mode: label(MODE_LABEL).as_deref().and_then(StorageMode::parse),
        spec_hash: annotation(SPEC_HASH_ANNOTATION),
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        deleting: meta.deletion_timestamp.is_some(),
        ended: phase == "Failed" || phase == "Succeeded",
        ready,
    }
}

/// A pool PVC as the planner sees it.
pub fn pvc_info(pvc: &PersistentVolumeClaim) -> PvcInfo {
    let meta = &pvc.metadata;
    let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k)).cloned();
    PvcInfo {
        name: meta.name.clone().unwrap_or_default(),
        created_for: annotation(CREATED_FOR_ANNOTATION),
        zone: annotation(ZONE_ANNOTATION),
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        deleting: meta.deletion_timestamp.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_dns_labels_and_keep_simple_names() {
        assert_eq!(local_pod_name("node-1"), "server-node-1");
        assert_eq!(pvc_pod_name("pvc-0123456789ab", "node-1"), "server-pvc-0123456789ab-node-node-1");
        for node in ["ip-10-0-1-23.eu-west-1.compute.internal", "Node_A", &"x".repeat(253)] {
            for name in [local_pod_name(node), pvc_pod_name("pvc-0123456789ab", node)] {
                assert!(is_dns_label(&name), "{name}");
            }
        }
        assert_ne!(local_pod_name("a.b"), local_pod_name("a-b"));
    }

    #[test]
    fn pvc_names_are_stable_and_unique() {
        let mut existing = BTreeSet::new();
        let a = new_pvc_name("uid-1", &existing);
        assert_eq!(a, new_pvc_name("uid-1", &existing));
        assert!(a.starts_with("pvc-") && a.len() == 4 + PVC_ID_HEX_DIGITS, "{a}");
        existing.insert(a.clone());
        assert_ne!(a, new_pvc_name("uid-1", &existing));
    }

    #[test]
    fn pool_fits_on_its_pvc() {
        let pvc = 10u64 << 30;
        let pool = pool_size_on_pvc(pvc);
        assert!(pool < pvc && pool >= pvc / 100 * 94, "{pool}");
        assert_eq!(quantity(10 << 30), "10Gi");
        assert_eq!(quantity(1536 << 20), "1536Mi");
    }

    #[test]
    fn objects_build() -> Result<()> {
        let settings = Settings::default();
        let config = ClusterConfig::defaults();
        let pod = server_pod(&settings, &config, &Server::local("n1"))?;
        let info = pod_info(&pod);
        assert_eq!(info.node, "n1");
        assert_eq!(info.mode, Some(StorageMode::Local));
        assert_eq!(info.spec_hash.as_deref(), Some(spec_hash(&settings, &config, &Server::local("n1")).as_str()));
        let pvc = pool_pvc(&settings, &config, "pvc-1", "n1", Some("z1"))?;
        assert_eq!(pvc_info(&pvc).zone.as_deref(), Some("z1"));
        Ok(())
    }
}
