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
