//! Remotes: a daemon added by name (its key checked) is used with --remote or as the current remote, without
//! --server or a key file; a commit moves between two daemons by remote name.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use blockmesh::api::{Commit, Dot};
use common::Daemon;

/// The client with only the remotes config to go by (no server, no data dir, no key in the environment).
fn client(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blockmesh"))
        .args(args)
        .env("BLOCKMESH_CONFIG", config)
        .env_remove("BLOCKMESH_SERVER")
        .env_remove("BLOCKMESH_REMOTE")
        .env_remove("BLOCKMESH_API_KEY")
        .env("BLOCKMESH_DATA_DIR", config.with_file_name("no-such-dir"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn ok(config: &Path, args: &[&str]) -> String {
    let (code, out, err) = client(config, args);
    assert_eq!(code, 0, "blockmesh {args:?}: {err}{out}");
    out
}

#[test]
fn remotes_name_daemons_and_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::start(&dir.path().join("a"));
    let b = Daemon::start(&dir.path().join("b"));
    let config = dir.path().join("cfg").join("remotes.json");
    let key_a = dir.path().join("a").join("api-key");
    let key_b = dir.path().join("b").join("api-key");

    // without a remote, the client looks for the local daemon and says how to fix it
    let (code, _, err) = client(&config, &["list"]);
    assert_eq!(code, 1);
    assert!(err.contains("remote add"), "{err}");
    // a wrong key is caught when adding
    let wrong = dir.path().join("wrong-key");
    std::fs::write(&wrong, "0123").unwrap();
    let (code, _, err) = client(&config, &["remote", "add", "a", &a.api, "--key-file", wrong.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("wrong API key"), "{err}");
    ok(&config, &["remote", "add", "a", &a.api, "--key-file", key_a.to_str().unwrap()]);
    ok(&config, &["remote", "add", "b", &b.api, "--key-file", key_b.to_str().unwrap()]);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the config holds keys");

    ok(&config, &["remote", "use", "a"]);
    ok(&config, &["init", "db", "--size", "4M"]);
    let c: Commit = serde_json::from_str(&ok(&config, &["commit", "db", "-m", "on a", "-o", "json"])).unwrap();
    assert!(ok(&config, &["remote", "list"]).contains("* a "));
    // a commit from a to b, by remote names
    let stream = dir.path().join("s");
    ok(&config, &["send", "db", &c.id, "-f", stream.to_str().unwrap()]);
    ok(&config, &["receive", stream.to_str().unwrap(), "--remote", "b"]);
    let on_b: Vec<Dot> = serde_json::from_str(&ok(&config, &["list", "--remote", "b", "-o", "json"])).unwrap();
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].branches[0].head.as_deref(), Some(c.id.as_str()));
    // --server picks the key of the remote with that URL
    ok(&config, &["list", "--server", &b.api]);
    let (code, _, err) = client(&config, &["list", "--remote", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no remote named nope") && err.contains("known: a, b"), "{err}");
    ok(&config, &["remote", "remove", "a"]);
    let (code, _, _) = client(&config, &["list"]);
    assert_eq!(code, 1, "the current remote is gone: back to the local daemon, which has no key here");
}

/// A daemon with a certificate serves its control API over HTTPS only: a client trusting its certificate (by
/// --ca-cert, or a remote added with one) works, one that does not is refused, and plain HTTP gets no answer. Another
/// daemon pulls from it by itself, trusting the certificate the client sends with the remote (and not without).
#[test]
fn the_api_speaks_https_when_the_daemon_has_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (c, k) = (cert_pem.to_str().unwrap(), key_pem.to_str().unwrap());
    let d = Daemon::start_with(&data, &["--pool-size", "1G", "--tls-cert", c, "--tls-key", k, "--tls", "optional"]);
    assert!(d.api.starts_with("https://"), "the daemon names an https:// API: {}", d.api);

    // trusted by --ca-cert: the whole workflow goes over TLS
    let mut init = d.command(&["init", "db", "--size", "16M", "--ca-cert", c]);
    init.env_remove("BLOCKMESH_CA_CERT");
    let (code, out, err) = d.run(init);
    assert_eq!(code, 0, "{out}{err}");
    let mut c1 = d.command(&["commit", "db", "-m", "over tls", "-o", "json"]);
    c1.env("BLOCKMESH_CA_CERT", c);
    let (code, out, err) = d.run(c1);
    assert_eq!(code, 0, "{out}{err}");
    let commit: Commit = serde_json::from_str(&out).unwrap();

    // not trusted: refused, nothing sent
    let (code, out, err) = d.cli(&["list"]);
    assert_ne!(code, 0, "a client that does not trust the certificate must fail: {out}");
    assert!(err.contains("cannot reach") || err.to_lowercase().contains("certificate"), "{err}");
    // plain HTTP to the TLS port gets no API answer
    let plain = d.api.replacen("https://", "http://", 1);
    let mut p = d.command(&["list"]);
    p.env("BLOCKMESH_SERVER", &plain);
    let (code, _, _) = d.run(p);
    assert_ne!(code, 0, "plain HTTP must not be served");

    // a remote added with the certificate
    let config = dir.path().join("remotes.json");
    let key_file = data.join("api-key");
    ok(&config, &["remote", "add", "secure", &d.api, "--key-file", key_file.to_str().unwrap(), "--ca-cert", c]);
    let log: Vec<Commit> =
        serde_json::from_str(&ok(&config, &["log", "db", "--remote", "secure", "-o", "json"])).unwrap();
    assert_eq!(log.first().map(|x| x.id.clone()), Some(commit.id.clone()));
    let dots: Vec<Dot> = serde_json::from_str(&ok(&config, &["list", "--remote", "secure", "-o", "json"])).unwrap();
    assert_eq!(dots.len(), 1);
    // without it, adding the remote fails its check
    let (code, _, err) =
        client(&config, &["remote", "add", "nocert", &d.api, "--key-file", key_file.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");

    // a plain daemon pulls from the https one by itself, trusting the certificate the client sends it (the remote's)
    let local = Daemon::start(&dir.path().join("local"));
    let pull = |remote: &str| {
        let mut p = local.command(&["pull", remote, "db", "-o", "json"]);
        p.env("BLOCKMESH_CONFIG", &config);
        local.run(p)
    };
    let (code, out, err) = pull("secure");
    assert_eq!(code, 0, "{out}{err}");
    let pulled: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pulled["commits"], serde_json::json!([commit.id]), "{pulled}");
    // without the certificate the local daemon does not trust the remote: nothing moves
    ok(&config, &["remote", "add", "nocert", &d.api, "--key-file", key_file.to_str().unwrap(), "--no-check"]);
    local.ok(&["delete", "db", "--yes"]);
    let (code, _, err) = pull("nocert");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach") && err.to_lowercase().contains("certificate"), "{err}");
    assert!(local.json::<Vec<Dot>>(&["list"]).is_empty());
}
