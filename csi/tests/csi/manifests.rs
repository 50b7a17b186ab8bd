//! The manifests in deploy/: core kinds validated offline against the official schemas by `kubernetes-validate
//! --strict` (a failure under CI=true when the tool is missing); the snapshot CRD kinds, which it has no schema
//! for, parsed and checked field by field; and the names that must agree across files (driver, sockets).
use std::path::PathBuf;
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn documents() -> Vec<(String, serde_yaml::Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap();
            out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out
}

use serde::Deserialize;

const CRD_GROUPS: [&str; 2] = ["snapshot.storage.k8s.io/", "groupsnapshot.storage.k8s.io/"];

#[test]
fn core_kinds_pass_kubernetes_validate_strict() {
    let found = Command::new("kubernetes-validate").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "kubernetes-validate is required under CI=true");
        eprintln!("skipping: kubernetes-validate not installed (pip install kubernetes-validate)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for (i, (file, doc)) in documents().into_iter().enumerate() {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        if CRD_GROUPS.iter().any(|g| api.starts_with(g)) {
            continue;
        }
        let path = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&doc).unwrap()).unwrap();
        let out = Command::new("kubernetes-validate").args(["--strict", "--quiet"]).arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{file} ({}): {}{}",
            doc["kind"].as_str().unwrap_or("?"),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(n >= 8, "validated {n} documents");
}

#[test]
fn snapshot_classes_and_cross_file_names_agree() {
    let docs = documents();
    let kind = |k: &'static str| docs.iter().filter(move |(_, d)| d["kind"].as_str() == Some(k)).map(|(_, d)| d);
    let driver = "csi.blockmesh.io";
    assert_eq!(kind("CSIDriver").next().unwrap()["metadata"]["name"].as_str(), Some(driver));
    assert_eq!(kind("StorageClass").next().unwrap()["provisioner"].as_str(), Some(driver));
    assert_eq!(kind("StorageClass").next().unwrap()["metadata"]["name"].as_str(), Some("blockmesh"));
    for k in ["VolumeSnapshotClass", "VolumeGroupSnapshotClass"] as [&'static str; 2] {
        let c = kind(k).next().unwrap_or_else(|| panic!("no {k}"));
        let keys: Vec<&str> = c.as_mapping().unwrap().keys().filter_map(|k| k.as_str()).collect();
        for key in &keys {
            assert!(
                ["apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"].contains(key),
                "{k}: {key}"
            );
        }
        assert_eq!(c["driver"].as_str(), Some(driver), "{k}");
        assert!(matches!(c["deletionPolicy"].as_str(), Some("Delete" | "Retain")), "{k}");
        assert!(c["metadata"]["name"].as_str().is_some(), "{k}");
    }
    assert_eq!(blockmesh_csi::controller::DRIVER_NAME, driver);
    // the registrar tells the kubelet where the plugin socket is on the host: the plugin-dir host path
    let ds = kind("DaemonSet").next().unwrap();
    let text = serde_yaml::to_string(ds).unwrap();
    assert!(text.contains(&format!("--kubelet-registration-path=/var/lib/kubelet/plugins/{driver}/csi.sock")));
    assert!(text.contains(&format!("path: /var/lib/kubelet/plugins/{driver}")));
    // the provisioner passes the PVC's name and namespace (the annotations are read from it)
    let dep = serde_yaml::to_string(kind("Deployment").next().unwrap()).unwrap();
    assert!(dep.contains("--extra-create-metadata"));
    for sidecar in ["csi-provisioner", "csi-snapshotter", "csi-resizer", "livenessprobe"] {
        assert!(dep.contains(sidecar), "{sidecar}");
    }
    // the controller finds the servers from their pods: discovery on, and it may list and get pods in blockmesh
    assert!(dep.contains("--discover-servers=true"));
    assert!(controller_may("list", "pods", "blockmesh", &docs), "the controller cannot list pods");
    assert!(controller_may("get", "pods", "blockmesh", &docs), "the controller cannot get pods");
    assert!(
        controller_may("list", "persistentvolumeclaims", "blockmesh", &docs),
        "the controller cannot list the pool PVCs"
    );
    // the node plugin finds the server of a pool's volumes from the pods too
    assert!(text.contains("--discover-servers=true"));
    assert!(may("blockmesh-csi-node", "list", "pods", "blockmesh", &docs), "the node plugin cannot list pods");
    assert!(!may("blockmesh-csi-node", "list", "persistentvolumeclaims", "blockmesh", &docs), "no more than it needs");
}

/// Whether the controller's service account may `verb` core `resource` in `namespace`: a Role there or a
/// ClusterRole bound to it (RoleBinding in the namespace, or ClusterRoleBinding).
fn controller_may(verb: &str, resource: &str, namespace: &str, docs: &[(String, serde_yaml::Value)]) -> bool {
    may("blockmesh-csi-controller", verb, resource, namespace, docs)
}

/// Whether service account `sa` of namespace `blockmesh` may `verb` core `resource` in `namespace`.
fn may(sa: &str, verb: &str, resource: &str, namespace: &str, docs: &[(String, serde_yaml::Value)]) -> bool {
    let grants = |role: &serde_yaml::Value| {
        role["rules"].as_sequence().into_iter().flatten().any(|r| {
            let has = |k: &str, v: &str| {
                r[k].as_sequence().is_some_and(|s| s.iter().any(|x| x.as_str() == Some(v) || x.as_str() == Some("*")))
            };
            has("apiGroups", "") && has("resources", resource) && has("verbs", verb)
        })
    };
    let role = |kind: &str, name: &str| {
        docs.iter()
            .map(|(_, d)| d)
            .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
    };
    docs.iter().map(|(_, d)| d).any(|b| {
        let kind = b["kind"].as_str().unwrap_or_default();
        let in_ns = kind == "ClusterRoleBinding"
            || (kind == "RoleBinding" && b["metadata"]["namespace"].as_str() == Some(namespace));
        let to_sa = b["subjects"].as_sequence().into_iter().flatten().any(|s| {
            s["kind"].as_str() == Some("ServiceAccount")
                && s["name"].as_str() == Some(sa)
                && s["namespace"].as_str() == Some(namespace)
        });
        let role_kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
        let r = b["roleRef"]["name"].as_str().and_then(|n| role(role_kind, n));
        let r_ok =
            r.is_some_and(|r| role_kind == "ClusterRole" || r["metadata"]["namespace"].as_str() == Some(namespace));
        in_ns && to_sa && r_ok && r.is_some_and(grants)
    })
}
