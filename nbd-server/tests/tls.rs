//! STARTTLS with x509 certificates: an in-process rustls client and libnbd (nbdinfo, nbdsh) over TCP.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blockmesh_nbd::proto::*;
use blockmesh_nbd::{Server, ServerConfig, TlsMode};
use common::*;
use tokio_rustls::rustls;

/// A CA and a server certificate for "localhost" signed by it, written as PEM files the way libnbd expects them.
struct Pki {
    ca_der: rustls::pki_types::CertificateDer<'static>,
    dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "blockmesh test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), key.serialize_pem()).unwrap();
    Pki { ca_der: ca.der().clone(), dir }
}

fn tls_config(dir: &Path, mode: TlsMode) -> ServerConfig {
    let tls =
        blockmesh_nbd::tls::server_config(&dir.join("server-cert.pem"), &dir.join("server-key.pem"), None).unwrap();
    ServerConfig { tls: Some(tls), tls_mode: mode, handshake_timeout: None, fair_slots: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_then_serve_over_the_tls_session() {
    let pki = pki();
    let server = Server::new(exports(), tls_config(pki.dir.path(), TlsMode::Required)).unwrap();
    let (mut c, _task) = pipe(&server);
    c.greet().await;
    c.send_option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_replies().await, vec![(REP_ACK, vec![])]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = connector.connect("localhost".try_into().unwrap(), c.s).await.unwrap();
    let mut c = Client { s: tls };
    // STARTTLS twice is invalid; everything else now works.
    c.send_option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_replies().await[0].0, REP_ERR_INVALID);
    c.structured().await;
    c.set_meta("disk", &[META_BASE_ALLOCATION]).await;
    let (size, _, _) = c.go("disk").await.unwrap();
    assert_eq!(size, 64 << 20);
    let data = vec![0x3c; 1 << 20];
    assert_eq!(c.simple(CMD_FLAG_FUA, CMD_WRITE, 0, data.len() as u32, &data).await, 0);
    assert_eq!(c.read_structured(1, 0, 1 << 20).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_tls_serves_clients_in_the_clear_too() {
    let pki = pki();
    let server = Server::new(exports(), tls_config(pki.dir.path(), TlsMode::Optional)).unwrap();
    let (mut c, _task) = pipe(&server);
    c.open("disk", true).await;
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0, &[]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tls_handshake_ends_the_connection() {
    let pki = pki();
    let server = Server::new(exports(), tls_config(pki.dir.path(), TlsMode::Required)).unwrap();
    let (mut c, task) = pipe(&server);
    c.greet().await;
    c.send_option(OPT_STARTTLS, &[]).await;
    c.option_replies().await;
    use tokio::io::AsyncWriteExt;
    c.s.write_all(b"this is not a TLS client hello").await.unwrap();
    assert!(matches!(task.await.unwrap(), Err(blockmesh_nbd::Error::Tls(_))));
}

#[test]
fn bad_certificate_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let e = blockmesh_nbd::tls::server_config(&dir.path().join("missing.pem"), &dir.path().join("k"), None);
    assert!(e.unwrap_err().to_string().contains("missing.pem"));
    let e = blockmesh_nbd::tls::server_config(&dir.path().join("empty.pem"), &dir.path().join("empty.pem"), None);
    assert!(e.unwrap_err().to_string().contains("no PEM certificate"));
}

/// A TCP server on its own runtime thread.
fn tcp_server(config: ServerConfig) -> (tokio::runtime::Runtime, u16) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Server::new(exports(), config).unwrap();
    rt.spawn(async move { server.serve_tcp(listener).await });
    (rt, port)
}

#[test]
fn libnbd_clients_negotiate_tls_and_are_refused_in_the_clear() {
    if !have("nbdinfo") || !have("nbdsh") {
        return;
    }
    let pki = pki();
    let (rt, port) = tcp_server(tls_config(pki.dir.path(), TlsMode::Required));
    let certs = pki.dir.path().display().to_string();
    let out = run(Command::new("nbdinfo").arg(format!("nbds://localhost:{port}/disk?tls-certificates={certs}")));
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("export-size: 67108864"), "{out}");
    let err = run_failing(Command::new("nbdinfo").arg(format!("nbd://localhost:{port}/disk")));
    assert!(err.to_lowercase().contains("tls"), "{err}");
    // Data through libnbd over TLS.
    let code = format!(
        "h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates({certs:?})\nh.connect_uri('nbds://localhost:{port}/disk')\n\
         assert h.get_tls_negotiated()\nh.pwrite(b'\\x99' * 65536, 4096)\nh.flush()\n\
         assert h.pread(65536, 4096) == b'\\x99' * 65536\nprint('ok')"
    );
    assert_eq!(run(Command::new("nbdsh").arg("-c").arg(code)).trim(), "ok");
    rt.shutdown_background();
}
