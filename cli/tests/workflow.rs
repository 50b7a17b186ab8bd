//! The dotmesh workflow end to end: the real daemon on a temp dir and free ports, driven only through the `blockmesh`
//! client subcommands, the HTTP API and real NBD clients (qemu-io). Under CI=true a missing client is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use blockmesh::api::{Commit, DiffExtent, Dot};
use common::{have, qemu_io, qemu_ok, Daemon};

#[test]
fn the_readme_tour() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let key = std::fs::metadata(dir.path().join("api-key")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777, 0o600, "api-key mode");

    // init a dot and write to it over NBD
    let out = d.ok(&["init", "mydb", "--size", "64M"]);
    assert!(out.contains("admin/mydb"), "{out}");
    let head = d.ok(&["export-uri", "mydb"]).trim().to_string();
    assert_eq!(head, format!("nbd://{}/admin/mydb", d.nbd));
    qemu_ok(&head, &["write -P 0x11 0 1M", "flush"]);
    let c1: Commit = d.json(&["commit", "mydb", "-m", "first data"]);
    assert_eq!(c1.id.len(), 32);

    // branch, write on the branch, commit
    d.ok(&["branch", "mydb", "feature"]);
    d.ok_after_clients(&["checkout", "mydb", "feature"]);
    qemu_ok(&head, &["write -P 0x22 0 64k", "flush"]);
    let c2: Commit = d.json(&["commit", "mydb", "-m", "on feature", "--meta", "ticket=42"]);
    assert_eq!(c2.parents, vec![c1.id.clone()]);
    assert_eq!(c2.metadata.get("ticket").map(String::as_str), Some("42"));

    // diff: exactly the 64 KiB written on the branch
    let diff: Vec<DiffExtent> = d.json(&["diff", "mydb", &c1.id[..8], &c2.id]);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!((diff[0].offset_bytes, diff[0].len_bytes, diff[0].kind.as_str()), (0, 65536, "data"));
    let human = d.ok(&["diff", "mydb", &c1.id[..8]]);
    assert!(human.contains("64 KiB changed in 1 ranges"), "{human}");

    // the old commit, read-only, byte for byte
    let old = d.ok(&["export-uri", &format!("mydb@{}", &c1.id[..6])]).trim().to_string();
    assert_eq!(old, format!("nbd://{}/admin/mydb@{}", d.nbd, c1.id));
    qemu_ok(&old, &["read -P 0x11 0 1M"]);
    let (ok, text) = qemu_io(&old, &["write -P 0x33 0 4k"]);
    assert!(!ok, "a commit export took a write: {text}");

    // the head follows checkouts; log lists newest first
    qemu_ok(&head, &["read -P 0x22 0 64k", "read -P 0x11 64k 960k"]);
    d.ok_after_clients(&["checkout", "mydb", "master"]);
    qemu_ok(&head, &["read -P 0x11 0 1M"]);
    let log: Vec<Commit> = d.json(&["log", "mydb", "--branch", "feature"]);
    assert_eq!(log.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), vec![c2.id.as_str(), c1.id.as_str()]);
    let human = d.ok(&["log", "mydb"]);
    assert!(human.contains(&c1.id) && human.contains("first data") && !human.contains(&c2.id), "{human}");

    // clone a commit into a new dot; reset a branch
    d.ok(&["clone", &format!("mydb@{}", c2.id), "copy"]);
    qemu_ok(&format!("nbd://{}/admin/copy", d.nbd), &["read -P 0x22 0 64k"]);
    d.ok_after_clients(&["checkout", "mydb", "feature"]);
    qemu_ok(&head, &["write -P 0x44 0 4k"]);
    d.ok(&["reset", "mydb", "--hard", "master"]);
    qemu_ok(&head, &["read -P 0x11 0 1M"]);

    let dots: Vec<Dot> = d.json(&["list"]);
    assert_eq!(dots.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), vec!["admin/copy", "admin/mydb"]);
    let status = d.ok(&["pool", "status"]);
    assert!(status.contains("dots:      2"), "{status}");

    // mistakes: clear errors, exit codes 1 (error) and 2 (usage), nothing changed
    let (code, _, err) = d.cli(&["log", "mydv"]);
    assert_eq!(code, 1);
    assert!(err.contains("no dot named admin/mydv") && err.contains("admin/mydb"), "{err}");
    let (code, _, err) = d.cli(&["delete", "copy"]);
    assert_eq!(code, 1, "delete without --yes and without a terminal");
    assert!(err.contains("--yes"), "{err}");
    let (code, _, _) = d.cli(&["commit", "mydb"]);
    assert_eq!(code, 2, "missing -m is a usage error");
    let (code, _, err) = d.cli(&["init", "Bad Name!"]);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 400"), "{err}");
    d.ok(&["delete", "copy", "--yes"]);
    let dots: Vec<Dot> = d.json(&["list"]);
    assert_eq!(dots.len(), 1);
}

#[test]
fn the_api_refuses_bad_keys_and_bad_input_and_serializes_commits() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let key = d.key();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let url = |p: &str| format!("{}{p}", d.api);
    let status = |r: Result<ureq::Response, ureq::Error>| match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let body = serde_json::json!({"name": "db", "size_bytes": 1 << 20});
    // No key, a wrong key: 401, and nothing created.
    let (code, text) = status(agent.post(&url("/v1/dots")).send_json(body.clone()));
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("api-key"), "{text}");
    let (code, _) = status(agent.post(&url("/v1/dots")).set("Authorization", "Bearer nope").send_json(body.clone()));
    assert_eq!(code, 401);
    let (code, _) =
        status(agent.post(&url("/v1/dots")).set("Authorization", &format!("Bearer {key}x")).send_json(body.clone()));
    assert_eq!(code, 401);
    let auth = format!("Bearer {key}");
    let (code, text) = status(agent.get(&url("/v1/dots")).set("Authorization", &auth).call());
    assert_eq!((code, text.as_str()), (200, "[]"));

    // Malformed JSON, missing fields, unknown dots, bad names, unknown routes: 4xx with a message.
    let (code, text) = status(agent.post(&url("/v1/dots")).set("Authorization", &auth).send_string("{not json"));
    assert_eq!(code, 400);
    assert!(text.contains("malformed JSON"), "{text}");
    let (code, _) = status(agent.post(&url("/v1/dots")).set("Authorization", &auth).send_json(serde_json::json!({})));
    assert_eq!(code, 400);
    let (code, text) = status(agent.get(&url("/v1/dots/admin/nope")).set("Authorization", &auth).call());
    assert_eq!(code, 404);
    assert!(text.contains("no dot named admin/nope"), "{text}");
    let (code, _) = status(
        agent
            .post(&url("/v1/dots"))
            .set("Authorization", &auth)
            .send_json(serde_json::json!({"name": "../etc", "size_bytes": 4096})),
    );
    assert_eq!(code, 400);
    let (code, _) = status(agent.get(&url("/v2/whatever")).set("Authorization", &auth).call());
    assert_eq!(code, 404);
    let (code, _) = status(agent.post(&url("/v1/dots")).set("Authorization", &auth).send_json(body.clone()));
    assert_eq!(code, 200);
    let (code, _) = status(agent.post(&url("/v1/dots")).set("Authorization", &auth).send_json(body));
    assert_eq!(code, 409, "the same dot twice");
    let (code, text) = status(agent.get(&url("/v1/dots/admin/db/diff?from=zzzz")).set("Authorization", &auth).call());
    assert_eq!(code, 404, "{text}");

    // Concurrent commits on one dot: all succeed, one after another (a linear history).
    const COMMITTERS: usize = 8;
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..COMMITTERS)
            .map(|i| {
                let (agent, url, auth) = (agent.clone(), url("/v1/dots/admin/db/commits"), auth.clone());
                s.spawn(move || {
                    let r = agent
                        .post(&url)
                        .set("Authorization", &auth)
                        .send_json(serde_json::json!({"message": format!("c{i}")}))
                        .unwrap();
                    r.into_json::<Commit>().unwrap().id
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let log: Vec<Commit> = d.json(&["log", "db"]);
    assert_eq!(log.len(), COMMITTERS);
    for pair in log.windows(2) {
        assert_eq!(pair[0].parents, vec![pair[1].id.clone()], "history is a line");
    }
    let mut logged: Vec<String> = log.into_iter().map(|c| c.id).collect();
    let mut ids = ids;
    logged.sort();
    ids.sort();
    assert_eq!(logged, ids);
}

#[test]
fn a_killed_daemon_keeps_flushed_writes_and_commits() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.ok(&["init", "keep", "--size", "16M"]);
    let uri = format!("nbd://{}/admin/keep", d.nbd);
    qemu_ok(&uri, &["write -P 0x5a 0 2M", "flush"]);
    let c: Commit = d.json(&["commit", "keep", "-m", "before the crash"]);
    qemu_ok(&uri, &["write -P 0x6b 1M 64k", "flush"]);
    let key = d.key();
    d.kill9();

    let d = Daemon::start(dir.path());
    assert_eq!(d.key(), key, "the key survives restarts");
    let log: Vec<Commit> = d.json(&["log", "keep"]);
    assert_eq!(log.iter().map(|x| x.id.clone()).collect::<Vec<_>>(), vec![c.id.clone()]);
    let uri = format!("nbd://{}/admin/keep", d.nbd);
    qemu_ok(&uri, &["read -P 0x5a 0 1M", "read -P 0x6b 1M 64k", "read -P 0x5a 1088k 960k"]);
    let old = format!("nbd://{}/admin/keep@{}", d.nbd, c.id);
    qemu_ok(&old, &["read -P 0x5a 0 2M"]);
}

/// A restart with a larger `--pool-size` enlarges the pool file and the pool grows into it, keeping everything.
#[test]
fn a_restart_with_a_larger_pool_size_grows_the_pool() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.ok(&["init", "db", "--size", "16M"]);
    qemu_ok(&format!("nbd://{}/admin/db", d.nbd), &["write -P 7 0 1M"]);
    let c: Commit = d.json(&["commit", "db", "-m", "before growing"]);
    let before: blockmesh::api::PoolStatus = d.json(&["pool", "status"]);
    d.kill9();
    let d = Daemon::start_with(dir.path(), &["--pool-size", "2G"]);
    let after: blockmesh::api::PoolStatus = d.json(&["pool", "status"]);
    assert!(after.pool_size_bytes > before.pool_size_bytes + (900 << 20), "{before:?} -> {after:?}");
    assert!(after.free_bytes > before.free_bytes + (900 << 20), "{before:?} -> {after:?}");
    qemu_ok(&format!("nbd://{}/admin/db@{}", d.nbd, c.id), &["read -P 7 0 1M"]);
}

#[test]
fn list_and_pool_status_show_what_heads_and_commits_hold() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.ok(&["init", "db", "--size", "16M"]);
    let head = format!("nbd://{}/admin/db", d.nbd);
    qemu_ok(&head, &["write -P 1 0 1M"]);
    let _: Commit = d.json(&["commit", "db", "-m", "one MiB"]);
    // 64 KiB overwritten in the head: the committed copy is held by the commit alone
    qemu_ok(&head, &["write -P 2 0 64k"]);
    let dots: Vec<Dot> = d.json(&["list"]);
    let space = dots.iter().find(|x| x.name == "admin/db").and_then(|x| x.space).expect("space in the listing");
    assert_eq!(space.logical_bytes, 16 << 20);
    assert_eq!(space.written_bytes, 1 << 20);
    assert_eq!(space.commits_only_bytes, 64 << 10);
    let pool: blockmesh::api::PoolStatus = d.json(&["pool", "status"]);
    assert_eq!(pool.space, space, "the only dot holds everything");
    let text = d.ok(&["list"]);
    assert!(text.contains("WRITTEN") && text.contains("1 MiB") && text.contains("64 KiB"), "{text}");
    let text = d.ok(&["pool", "status"]);
    assert!(text.contains("held only by commits"), "{text}");
}

/// `serve --direct-io` opens the pool with O_DIRECT (checked in the daemon's open file flags), creating it when
/// missing; data written that way, and data written before through the page cache, read back after restarts.
#[test]
fn serve_direct_io_opens_the_pool_with_o_direct() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Whether each descriptor of the pool file the daemon holds has O_DIRECT. Through the page cache, the daemon
    // also holds one with O_DIRECT, for the log batches of large writes.
    let pool_fds_direct = |d: &Daemon| -> Vec<bool> {
        let pid = d.child.id();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
        fds.filter_map(|e| e.ok())
            .filter(|e| std::fs::read_link(e.path()).unwrap_or_default().ends_with("pool.bm"))
            .map(|e| {
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()))
                    .unwrap_or_default();
                let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim).unwrap_or("0");
                u32::from_str_radix(flags, 8).unwrap_or(0) & 0o40000 != 0 // O_DIRECT
            })
            .collect()
    };
    let pool_is_direct = |d: &Daemon| -> bool {
        let fds = pool_fds_direct(d);
        !fds.is_empty() && fds.iter().all(|&direct| direct)
    };
    let d = Daemon::start_with(dir.path(), &["--pool-size", "1G", "--direct-io"]);
    assert!(pool_is_direct(&d), "the new pool is open with O_DIRECT");
    d.ok(&["init", "db", "--size", "16M"]);
    qemu_ok(&format!("nbd://{}/admin/db", d.nbd), &["write -P 5 0 1M"]);
    let c: Commit = d.json(&["commit", "db", "-m", "direct"]);
    d.kill9();
    let d = Daemon::start(dir.path());
    assert!(!pool_is_direct(&d), "without the flag, through the page cache");
    assert!(pool_fds_direct(&d).contains(&true), "and with O_DIRECT beside it, for large writes");
    qemu_ok(&format!("nbd://{}/admin/db@{}", d.nbd, c.id), &["read -P 5 0 1M"]);
    qemu_ok(&format!("nbd://{}/admin/db", d.nbd), &["write -P 6 1M 1M"]);
    d.ok(&["commit", "db", "-m", "buffered"]);
    d.kill9();
    let d = Daemon::start_with(dir.path(), &["--direct-io"]);
    assert!(pool_is_direct(&d));
    qemu_ok(&format!("nbd://{}/admin/db", d.nbd), &["read -P 5 0 1M", "read -P 6 1M 1M"]);
}

/// `serve --pool-name` (or `BLOCKMESH_POOL_NAME`, as the operator passes its `poolName`) names the pool file in the
/// data directory; a name that is not a plain file name is refused before anything is made.
#[test]
fn the_pool_name_names_the_pool_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let d = Daemon::start_with(dir.path(), &["--pool-size", "1G", "--pool-name", "tank-1"]);
        d.ok(&["init", "db", "--size", "16M"]);
    }
    assert!(dir.path().join("tank-1.bm").exists());
    assert!(!dir.path().join("pool.bm").exists());
    let d = Daemon::start_with(dir.path(), &["--pool-name", "tank-1"]);
    assert!(d.ok(&["list"]).contains("db"), "the pool reopened by its name");
    drop(d);
    let long = "p".repeat(64);
    for bad in ["../x", "", "1pool", "a/b", ".hidden", long.as_str()] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockmesh"))
            .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("BLOCKMESH_POOL_NAME", bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("a pool name is"), "pool name {bad:?}: {err}");
    }
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!files.iter().any(|f| f.to_string_lossy().ends_with(".bm") && f != "tank-1.bm"), "{files:?}");
}

/// `serve --log-address` (or `BLOCKMESH_LOG_ADDRESS`, the operator's `logAddress`) sends the daemon's logs to a
/// syslog server over UDP as well, one RFC 5424 datagram per event, without colour codes; empty means none.
#[test]
fn the_log_address_gets_the_daemons_logs() {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let addr = receiver.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--pool-size", "1G", "--log-address", &addr]);
    let mut buf = [0u8; 4096];
    let n = receiver.recv(&mut buf).expect("a log datagram");
    let got = String::from_utf8_lossy(&buf[..n]).into_owned();
    // facility daemon (3) * 8 + informational (6); then version 1, a UTC time, the host, the app, the pid
    assert!(got.starts_with("<30>1 ") && got.contains(" blockmesh ") && got.contains("creating a new pool"), "{got}");
    assert!(!got.contains('\u{1b}'), "no colour codes: {got:?}");
    drop(d);
    // an empty address (the operator's default) is none
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--log-address", "no.such.host.invalid"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--log-address"));
    let mut empty = std::process::Command::new(env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("BLOCKMESH_LOG_ADDRESS", "")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(empty.stdout.take().unwrap()));
    let serving = lines.any(|l| l.is_ok_and(|l| l.starts_with("blockmesh serving")));
    let _ = empty.kill();
    let _ = empty.wait();
    assert!(serving, "an empty log address starts the daemon");
}
