//! The manifests of `operator/deploy/`, and the pods and PVCs the operator makes, validated offline against the
//! official Kubernetes schemas with `kubernetes-validate --strict` (PyPI; `scripts/test-all.sh` installs it). Under
//! `CI=true` a missing `kubernetes-validate` fails the test; elsewhere the test says it skipped. Also: the CRD file
//! is the one generated from the Rust types, and the ConfigMap and the README list every key with its default.
use std::path::{Path, PathBuf};
use std::process::Command;

use blockmesh_operator::config::{ClusterConfig, DEFAULTS};
use blockmesh_operator::plan::Server;
use blockmesh_operator::resources::{self, Settings};
use k8s_openapi::api::core::v1::{ConfigMap, Service};

/// The Kubernetes version the manifests target (k8s-openapi's `v1_37` feature; bundled by kubernetes-validate).
const KUBERNETES_VERSION: &str = "1.37.0";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn deploy_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The objects the operator makes at run time, written out for validation.
fn generated_objects(dir: &Path) -> Vec<PathBuf> {
    let settings = Settings::default();
    let local = ClusterConfig::defaults();
    let mut pvc_mode = std::collections::BTreeMap::new();
    pvc_mode.insert("storageMode".to_string(), "pvcPerNode".to_string());
    let pvc_mode = ClusterConfig::from_data(&pvc_mode).unwrap();
    let objects = [
        (
            "server-pod-local.yaml",
            serde_json::to_value(resources::server_pod(&settings, &local, &Server::local("node-a")).unwrap()),
        ),
        (
            "server-pod-pvc.yaml",
            serde_json::to_value(
                resources::server_pod(&settings, &pvc_mode, &Server::on_pvc("pvc-0123456789ab", "node-a")).unwrap(),
            ),
        ),
        (
            "pool-pvc.yaml",
            serde_json::to_value(
                resources::pool_pvc(&settings, &pvc_mode, "pvc-0123456789ab", "node-a", Some("z1")).unwrap(),
            ),
        ),
    ];
    objects
        .into_iter()
        .map(|(name, value)| {
            let path = dir.join(name);
            std::fs::write(&path, serde_saphyr::to_string(&value.unwrap()).unwrap()).unwrap();
            path
        })
        .collect()
}

#[test]
fn every_manifest_and_generated_object_passes_kubernetes_validate_strict() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let available = Command::new("kubernetes-validate").arg("--version").output().is_ok_and(|o| o.status.success());
    if !available {
        assert!(!in_ci, "kubernetes-validate is missing (pip install kubernetes-validate); under CI=true this fails");
        eprintln!("SKIPPED: kubernetes-validate is not installed (pip install kubernetes-validate)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("blockmesh-operator-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = deploy_files();
    assert!(files.len() >= 10, "{files:?}");
    files.extend(generated_objects(&dir));
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("runs kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "kubernetes-validate --strict failed:\n{text}");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            text.lines().any(|l| l.contains(&name) && l.contains("passed")),
            "{name} not reported as passed:\n{text}"
        );
    }
}

#[test]
fn checked_in_crd_is_the_one_generated_from_the_rust_types() {
    let checked_in = std::fs::read_to_string(deploy_dir().join("01-crd-blockmeshclusters.yaml")).unwrap();
    assert_eq!(
        checked_in,
        blockmesh_operator::crd::crd_yaml().unwrap(),
        "regenerate: cargo run -p blockmesh-operator -- crd > operator/deploy/01-crd-blockmeshclusters.yaml"
    );
}

#[test]
fn config_map_ships_every_key_with_its_default() {
    let text = std::fs::read_to_string(deploy_dir().join("10-configmap.yaml")).unwrap();
    let cm: ConfigMap = serde_saphyr::from_str(&text).unwrap();
    let data = cm.data.unwrap();
    let want: std::collections::BTreeMap<String, String> =
        DEFAULTS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(data, want);
    assert!(ClusterConfig::from_data(&data).is_ok());
}

#[test]
fn readme_documents_every_key_with_its_default() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for (key, default) in DEFAULTS {
        let row =
            readme.lines().find(|l| l.starts_with(&format!("| `{key}`"))).unwrap_or_else(|| panic!("no row for {key}"));
        let shown = if default.is_empty() { "(empty)".to_string() } else { format!("`{default}`") };
        assert!(row.contains(&shown), "the README row of {key} should show its default {shown}: {row}");
    }
}

#[test]
fn service_exposes_the_api_and_nbd_ports_of_the_server_pods() {
    let text = std::fs::read_to_string(deploy_dir().join("40-service.yaml")).unwrap();
    let svc: Service = serde_saphyr::from_str(&text).unwrap();
    let spec = svc.spec.unwrap();
    let ports: Vec<i32> = spec.ports.unwrap().iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![i32::from(resources::API_PORT), i32::from(resources::NBD_PORT)]);
    let pod = resources::server_pod(&Settings::default(), &ClusterConfig::defaults(), &Server::local("n")).unwrap();
    let labels = pod.metadata.labels.unwrap();
    for (k, v) in spec.selector.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "the Service selects server pods by {k}");
    }
}
