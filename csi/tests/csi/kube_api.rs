//! The driver's reads of the Kubernetes API over HTTPS, against a fake API server (issue #10): the server pods and
//! pool PVCs that discovery lists ([`KubeServerPods`]), with the service account's token (read again for every
//! request: the kubelet rotates it) and its CA (an API server it does not sign is refused). The fake answers
//! what a real one would for the paths the driver asks; it records each request's path and token. The PVC a
//! `CreateVolume` names is read the same way ([`KubePvcs`]).
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use blockmesh_csi::daemons::{KubeServerPods, ServerPods, DEFAULT_URL_TEMPLATE};
use blockmesh_csi::kube::KubeApi;
use blockmesh_csi::pvc::{KubePvcs, PvcAnnotations};
use serde_json::json;
use tokio_rustls::rustls;

/// Requests the fake saw: (path with query, bearer token).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

fn pods_json() -> serde_json::Value {
    let pod = |name: &str, node: &str, ip: &str, pvc: &str| {
        json!({
            "metadata": {
                "name": name,
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {"app.kubernetes.io/name": "blockmesh", "app.kubernetes.io/component": "server",
                           "blockmesh.io/pvc": pvc},
                "annotations": {"blockmesh.io/node": node},
            },
            "spec": {"nodeName": node},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
        })
    };
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"}, "items": [
        pod("server-pvc-a-node-node-a", "node-a", "10.1.0.5", "pvc-a"),
        // node-b went away; node-a adopted its PVC with a second server pod
        pod("server-pvc-b-node-node-a", "node-a", "10.1.0.6", "pvc-b"),
    ]})
}

fn pvcs_json() -> serde_json::Value {
    let pvc = |name: &str| json!({"metadata": {"name": name, "labels": {"app.kubernetes.io/component": "pool"}}});
    json!({"kind": "PersistentVolumeClaimList", "apiVersion": "v1", "items": [pvc("pvc-a"), pvc("pvc-b"), pvc("pvc-c")]})
}

fn claim_json() -> serde_json::Value {
    json!({"kind": "PersistentVolumeClaim", "apiVersion": "v1", "metadata": {"name": "claim", "namespace": "apps",
        "annotations": {"dotmeshName": "db", "blockmesh.io/subdot": "logs", "volume.kubernetes.io/selected-node": "node-a"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
}

/// A fake API server on 127.0.0.1 with TLS: answers the server pods and pool PVCs of namespace `blockmesh`
/// and PVC `apps/claim` (only with a token), 404 otherwise. Its CA certificate (PEM) and URL.
fn fake_api_server(seen: Seen) -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let ca_pem = cert.cert.pem();
    let chain = vec![cert.cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let mut reader = BufReader::new(&mut tls);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return; // a client that refused our certificate
                }
                let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                let mut token = String::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) =
                        h.strip_prefix("Authorization: Bearer ").or(h.strip_prefix("authorization: Bearer "))
                    {
                        token = v.trim().to_string();
                    }
                }
                seen.lock().unwrap().push((path.clone(), token.clone()));
                let (status, body) = match path.split_once('?').map(|(p, _)| p) {
                    _ if token.is_empty() => ("401 Unauthorized", json!({"kind": "Status", "code": 401})),
                    Some("/api/v1/namespaces/blockmesh/pods") => ("200 OK", pods_json()),
                    Some("/api/v1/namespaces/blockmesh/persistentvolumeclaims") => ("200 OK", pvcs_json()),
                    None if path == "/api/v1/namespaces/apps/persistentvolumeclaims/claim" => ("200 OK", claim_json()),
                    _ => ("404 Not Found", json!({"kind": "Status", "code": 404})),
                };
                let body = body.to_string();
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes());
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (ca_pem, url)
}

fn service_account(dir: &Path, ca_pem: &str, token: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.crt"), ca_pem).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
}

#[test]
fn discovery_reads_the_server_pods_and_pool_pvcs_over_https_with_the_service_account() {
    let seen: Seen = Arc::default();
    let (ca, url) = fake_api_server(seen.clone());
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("sa");
    service_account(&sa, &ca, "token-1\n");
    let pods = KubeServerPods::new(KubeApi::new(&url, &sa).unwrap(), "blockmesh", DEFAULT_URL_TEMPLATE).unwrap();
    let servers = pods.servers().unwrap();
    assert_eq!(servers.serving.len(), 1, "one node serves: {servers:?}");
    let pools: Vec<(&str, &str, &str)> =
        servers.pools.iter().map(|(p, s)| (p.as_str(), s.node.as_str(), s.ip.as_str())).collect();
    assert_eq!(pools, [("pvc-a", "node-a", "10.1.0.5"), ("pvc-b", "node-a", "10.1.0.6")]);
    assert_eq!(servers.pools["pvc-b"].url, "http://10.1.0.6:32607");
    assert_eq!(servers.unserved_pools.iter().collect::<Vec<_>>(), ["pvc-c"], "no pod names pvc-c");
    {
        let seen = seen.lock().unwrap();
        let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/api/v1/namespaces/blockmesh/pods?labelSelector=app.kubernetes.io%2Fname%3Dblockmesh%2C\
                 app.kubernetes.io%2Fcomponent%3Dserver&limit=10000",
                "/api/v1/namespaces/blockmesh/persistentvolumeclaims?labelSelector=app.kubernetes.io%2F\
                 managed-by%3Dblockmesh-operator%2Capp.kubernetes.io%2Fcomponent%3Dpool&limit=10000",
            ]
        );
        assert!(seen.iter().all(|(_, t)| t == "token-1"), "{seen:?}");
    }
    // the kubelet rotates the token: the next request sends the new one; the node plugin lists pods only
    std::fs::write(sa.join("token"), "token-2").unwrap();
    let node_pods =
        KubeServerPods::new(KubeApi::new(&url, &sa).unwrap(), "blockmesh", DEFAULT_URL_TEMPLATE).unwrap().pods_only();
    assert_eq!(node_pods.servers().unwrap().pools.len(), 2);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "pods only: {seen:?}");
        assert_eq!(seen[2].1, "token-2");
    }
    // a namespace with no such resources: the API's 404 is an error naming what was read
    let other = KubeServerPods::new(KubeApi::new(&url, &sa).unwrap(), "elsewhere", DEFAULT_URL_TEMPLATE).unwrap();
    let e = other.servers().unwrap_err().to_string();
    assert!(e.contains("namespace elsewhere") && e.contains("not found"), "{e}");
}

#[test]
fn an_api_server_the_service_accounts_ca_does_not_sign_is_refused() {
    let seen: Seen = Arc::default();
    let (_, url) = fake_api_server(seen.clone());
    let other_ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap().cert.pem();
    let dir = tempfile::tempdir().unwrap();
    service_account(dir.path(), &other_ca, "secret-token");
    let pods = KubeServerPods::new(KubeApi::new(&url, dir.path()).unwrap(), "blockmesh", DEFAULT_URL_TEMPLATE).unwrap();
    let e = pods.servers().unwrap_err().to_string();
    assert!(e.contains("server pods"), "{e}");
    assert!(seen.lock().unwrap().is_empty(), "the token never reached a server it does not trust");
}

#[test]
fn a_pvcs_annotations_are_read_over_https() {
    let seen: Seen = Arc::default();
    let (ca, url) = fake_api_server(seen.clone());
    let dir = tempfile::tempdir().unwrap();
    service_account(dir.path(), &ca, "token-p");
    let pvcs = KubePvcs::new(KubeApi::new(&url, dir.path()).unwrap());
    let a = pvcs.annotations("apps", "claim").unwrap();
    assert_eq!(a.get("dotmeshName").map(String::as_str), Some("db"));
    assert_eq!(a.get("blockmesh.io/subdot").map(String::as_str), Some("logs"));
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [("/api/v1/namespaces/apps/persistentvolumeclaims/claim".to_string(), "token-p".to_string())]
    );
    // a PVC that is not there: NOT_FOUND naming it; a name that is no name: refused before any request
    let e = pvcs.annotations("apps", "gone").unwrap_err();
    assert!(matches!(e, blockmesh_csi::Error::NotFound(ref m) if m.contains("apps/gone")), "{e}");
    assert!(pvcs.annotations("apps", "../../secrets").is_err());
    assert_eq!(seen.lock().unwrap().len(), 2);
}
