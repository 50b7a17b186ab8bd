//! Push and pull between real daemons: only the missing commits travel, oldest first, incrementally; a pull into a
//! third daemon gives the same bytes (qemu-img compare over NBD); diverged histories and wrong keys are refused; an
//! interrupted transfer resumes where it stopped; `--force` sends what is missing from the newest shared commit (or
//! everything, the first commit whole) and moves the other side's diverged branch, closing the NBD connections to
//! its head. Under CI=true a missing NBD client is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh::api::{Commit, PoolStatus};
use std::process::Stdio;

use common::{have, qemu_ok, same_export, Daemon};

fn add_remote(from: &Daemon, name: &str, to: &Daemon) {
    let key = to.data.join("api-key");
    from.ok(&["remote", "add", name, &to.api, "--key-file", key.to_str().unwrap()]);
}

fn summary(d: &Daemon, args: &[&str]) -> serde_json::Value {
    d.json(args)
}

fn at(d: &Daemon, c: &str) -> String {
    format!("nbd://{}/admin/db@{c}", d.nbd)
}

#[test]
fn push_and_pull_move_only_missing_commits() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let start = |n: &str| Daemon::start(&dir.path().join(n));
    let (a, b, c) = (start("a"), start("b"), start("c"));
    a.ok(&["init", "db", "--size", "64M"]);
    let uri = format!("nbd://{}/admin/db", a.nbd);
    qemu_ok(&uri, &["write -P 1 0 4M"]);
    let c1: Commit = a.json(&["commit", "db", "-m", "one"]);
    qemu_ok(&uri, &["write -P 2 8M 1M"]);
    let c2: Commit = a.json(&["commit", "db", "-m", "two"]);

    add_remote(&a, "b", &b);
    let s = summary(&a, &["push", "b", "db"]);
    assert_eq!(s["commits"].as_array().unwrap().len(), 2, "{s}");
    same_export(&at(&a, &c1.id), &at(&b, &c1.id));
    same_export(&at(&a, &c2.id), &at(&b, &c2.id));
    let log: Vec<Commit> = b.json(&["log", "db"]);
    assert_eq!(log.iter().map(|x| x.id.clone()).collect::<Vec<_>>(), [c2.id.clone(), c1.id.clone()]);

    // 1 MiB more: one commit travels, about 1 MiB of stream
    qemu_ok(&uri, &["write -P 3 16M 1M"]);
    let c3: Commit = a.json(&["commit", "db", "-m", "three"]);
    let s = summary(&a, &["push", "b", "db"]);
    assert_eq!(s["commits"], serde_json::json!([c3.id]), "{s}");
    let bytes = s["bytes"].as_u64().unwrap();
    assert!(bytes > 1 << 20 && bytes < 2 << 20, "incremental push of 1 MiB sent {bytes} bytes");
    assert!(a.ok(&["push", "b", "db"]).contains("up to date"));

    // pulled into a third daemon: the same bytes
    add_remote(&c, "b", &b);
    let s = summary(&c, &["pull", "b", "db"]);
    assert_eq!(s["commits"].as_array().unwrap().len(), 3, "{s}");
    same_export(&at(&a, &c3.id), &at(&c, &c3.id));
    same_export(&format!("nbd://{}/admin/db", a.nbd), &format!("nbd://{}/admin/db", c.nbd));

    // diverged: b commits on its own; a's next push is refused and b is unchanged
    qemu_ok(&format!("nbd://{}/admin/db", b.nbd), &["write -P 9 0 64k"]);
    b.ok(&["commit", "db", "-m", "b's own"]);
    a.ok(&["commit", "db", "-m", "four"]);
    let (code, _, err) = a.cli(&["push", "b", "db"]);
    assert_eq!(code, 1);
    assert!(err.contains("diverged"), "{err}");
    assert_eq!(b.json::<Vec<Commit>>(&["log", "db"]).len(), 4, "b: three pushed and its own");

    // a wrong key is refused
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "0000").unwrap();
    a.ok(&["remote", "add", "bad", &b.api, "--key-file", wrong.to_str().unwrap(), "--no-check"]);
    let (code, _, err) = a.cli(&["push", "bad", "db"]);
    assert_eq!(code, 1);
    assert!(err.contains("wrong API key"), "{err}");
    // the error names where the key came from and where the right one is
    assert!(err.contains("remote bad's stored key") && err.contains("DATA_DIR/api-key"), "{err}");
}

#[test]
fn an_interrupted_push_goes_on_where_it_stopped() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, d) = (Daemon::start(&dir.path().join("a")), Daemon::start(&dir.path().join("d")));
    a.ok(&["init", "db", "--size", "16M"]);
    qemu_ok(&format!("nbd://{}/admin/db", a.nbd), &["write -P 5 0 6M"]);
    let c1: Commit = a.json(&["commit", "db", "-m", "one"]);
    // the first commit's stream arrives halfway (as a dropped connection leaves it)
    let full = dir.path().join("full");
    a.ok(&["send", "db", &c1.id, "-f", full.to_str().unwrap()]);
    let bytes = std::fs::read(&full).unwrap();
    let half = dir.path().join("half");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(d.cli(&["receive", half.to_str().unwrap()]).0, 1);
    let kept = d.json::<PoolStatus>(&["pool", "status"]).pending_receives[0].resume_at_bytes;
    add_remote(&a, "d", &d);
    let s = summary(&a, &["push", "d", "db"]);
    assert_eq!(s["commits"], serde_json::json!([c1.id]));
    let sent = s["bytes"].as_u64().unwrap();
    assert!(sent < bytes.len() as u64 - kept + (64 << 10), "resumed: sent {sent} of {} (kept {kept})", bytes.len());
    assert!(d.json::<PoolStatus>(&["pool", "status"]).pending_receives.is_empty());
    same_export(&at(&a, &c1.id), &at(&d, &c1.id));
}

fn ids(log: &[Commit]) -> Vec<String> {
    log.iter().map(|x| x.id.clone()).collect()
}

#[test]
fn force_moves_a_diverged_branch_to_this_side_s_head() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let start = |n: &str| Daemon::start(&dir.path().join(n));
    let (a, b, c) = (start("a"), start("b"), start("c"));
    let head = |d: &Daemon| format!("nbd://{}/admin/db", d.nbd);
    a.ok(&["init", "db", "--size", "16M"]);
    qemu_ok(&head(&a), &["write -P 1 0 4M"]);
    let c1: Commit = a.json(&["commit", "db", "-m", "shared"]);
    add_remote(&a, "b", &b);
    a.ok(&["push", "b", "db"]);

    // both commit on top of the shared commit: the histories diverge
    qemu_ok(&head(&a), &["write -P 2 1M 1M"]);
    let a2: Commit = a.json(&["commit", "db", "-m", "a's own"]);
    qemu_ok(&head(&b), &["write -P 3 2M 1M", "write -P 4 8M 64k"]);
    let b2: Commit = b.json(&["commit", "db", "-m", "b's own"]);
    b.ok(&["branch", "db", "keep"]); // another branch holds b's commit

    // refused without --force, saying how; b unchanged
    let (code, _, err) = a.cli(&["push", "b", "db"]);
    assert_eq!(code, 1);
    assert!(err.contains("diverged") && err.contains("--force"), "{err}");
    assert_eq!(ids(&b.json::<Vec<Commit>>(&["log", "db"])), [b2.id.clone(), c1.id.clone()]);
    same_export(&head(&b), &at(&b, &b2.id));
    qemu_ok(&head(&b), &["read -P 1 0 1M", "read -P 1 1M 1M", "read -P 3 2M 1M", "read -P 4 8M 64k"]);

    // forced: only a2 travels (incremental from the shared c1), and b's master is a's head
    let s = summary(&a, &["push", "b", "db", "--force"]);
    assert_eq!(s["commits"], serde_json::json!([a2.id]), "{s}");
    assert_eq!(s["forced_from"], serde_json::json!(b2.id), "{s}");
    assert_eq!(s["diverged"], true, "{s}");
    let bytes = s["bytes"].as_u64().unwrap();
    assert!(bytes > 1 << 20 && bytes < 2 << 20, "incremental forced push of 1 MiB sent {bytes} bytes");
    assert_eq!(ids(&b.json::<Vec<Commit>>(&["log", "db"])), [a2.id.clone(), c1.id.clone()]);
    same_export(&head(&a), &head(&b));
    same_export(&at(&a, &a2.id), &at(&b, &a2.id));
    qemu_ok(&head(&b), &["read -P 1 0 1M", "read -P 2 1M 1M", "read -P 1 2M 2M", "read -P 0 8M 64k"]);
    // b's own commit is still there: the branch "keep" holds it, bytes and all
    assert_eq!(ids(&b.json::<Vec<Commit>>(&["log", "db", "--branch", "keep"])), [b2.id.clone(), c1.id.clone()]);
    qemu_ok(&at(&b, &b2.id), &["read -P 3 2M 1M", "read -P 4 8M 64k"]);
    assert!(a.ok(&["push", "b", "db"]).contains("up to date"));

    // diverged again, nothing else holds b's commit; this time b pulls with --force (refused first)
    qemu_ok(&head(&b), &["write -P 5 0 64k"]);
    let b3: Commit = b.json(&["commit", "db", "-m", "b's second"]);
    qemu_ok(&head(&a), &["write -P 6 4M 64k"]);
    let a3: Commit = a.json(&["commit", "db", "-m", "a's second"]);
    add_remote(&b, "a", &a);
    let (code, _, err) = b.cli(&["pull", "a", "db"]);
    assert_eq!(code, 1);
    assert!(err.contains("diverged") && err.contains("--force"), "{err}");
    same_export(&head(&b), &at(&b, &b3.id));
    let s = summary(&b, &["pull", "a", "db", "--force"]);
    assert_eq!(s["commits"], serde_json::json!([a3.id]), "{s}");
    assert_eq!(s["forced_from"], serde_json::json!(b3.id), "{s}");
    let log = ids(&b.json::<Vec<Commit>>(&["log", "db"]));
    assert_eq!(log, [a3.id.clone(), a2.id.clone(), c1.id.clone()]);
    same_export(&head(&a), &head(&b));
    for br in ["master", "keep"] {
        let log = ids(&b.json::<Vec<Commit>>(&["log", "db", "--branch", br]));
        assert!(!log.contains(&b3.id), "{br}: {log:?}");
    }

    // no commit shared at all: c made its own db; a's whole history goes, the first commit whole
    c.ok(&["init", "db", "--size", "16M"]);
    qemu_ok(&head(&c), &["write -P 7 0 8M"]);
    c.ok(&["commit", "db", "-m", "c's own"]);
    add_remote(&a, "c", &c);
    assert_eq!(a.cli(&["push", "c", "db"]).0, 1);
    let s = summary(&a, &["push", "c", "db", "--force"]);
    assert_eq!(s["commits"], serde_json::json!([c1.id, a2.id, a3.id]), "{s}");
    assert_eq!(ids(&c.json::<Vec<Commit>>(&["log", "db"])), [a3.id.clone(), a2.id.clone(), c1.id.clone()]);
    same_export(&head(&a), &head(&c));
    for x in [&c1, &a2, &a3] {
        same_export(&at(&a, &x.id), &at(&c, &x.id));
    }
}

/// Holds a connection to an export until told (a line on stdin), then says whether it is still open.
const HOLDING_CLIENT: &str = r#"
import sys
h.pread(4096, 0)
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pread(4096, 0)
    print("still open", flush=True)
except Exception:
    print("closed", flush=True)
"#;

#[test]
fn a_forced_push_closes_the_connections_to_the_head_it_moves() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    if !have("qemu-io") || !have("qemu-img") || !have("nbdsh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Daemon::start(&dir.path().join("a")), Daemon::start(&dir.path().join("b")));
    let head = |d: &Daemon| format!("nbd://{}/admin/db", d.nbd);
    a.ok(&["init", "db", "--size", "16M"]);
    a.ok(&["commit", "db", "-m", "shared"]);
    add_remote(&a, "b", &b);
    a.ok(&["push", "b", "db"]);
    qemu_ok(&head(&a), &["write -P 1 0 64k"]);
    a.ok(&["commit", "db", "-m", "a's own"]);
    qemu_ok(&head(&b), &["write -P 2 0 64k"]);
    b.ok(&["commit", "db", "-m", "b's own"]);

    let mut client = Command::new("nbdsh")
        .args(["-u", &head(&b), "-c", HOLDING_CLIENT])
        // nbdsh runs `python3`: Debian's, which has the libnbd module
        .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(out.next().unwrap().unwrap(), "connected");
    a.ok(&["push", "b", "db", "--force"]);
    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(out.next().unwrap().unwrap(), "closed", "the forced push closed the connection to b's old head");
    client.wait().unwrap();
    same_export(&head(&a), &head(&b));
}

/// A TCP proxy on loopback in front of `target` (`http://HOST:PORT`): what clients send goes on at most `rate` bytes a
/// second (0: as fast as it comes), the answers come back as they are. A client's end (even mid-request) ends the
/// connection to the target the same way, so the target sees what a cut connection leaves.
struct SlowLink {
    url: String,
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SlowLink {
    fn start(target: &str) -> SlowLink {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let target = target.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let rate = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r = rate.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let (Ok(mut client), Ok(mut server)) = (client, TcpStream::connect(&target)) else { continue };
                let (mut back_from, mut back_to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut back_from, &mut back_to);
                    let _ = back_to.shutdown(Shutdown::Write);
                });
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 << 10];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 || server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let rate = r.load(Ordering::Relaxed);
                        if rate > 0 {
                            std::thread::sleep(std::time::Duration::from_secs_f64(n as f64 / rate as f64));
                        }
                    }
                    let _ = server.shutdown(Shutdown::Write);
                });
            }
        });
        SlowLink { url, rate }
    }

    fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The daemon pushes by itself: a client killed mid-push (as Ctrl-C does) stops the daemon's transfer at its next
/// chunk, so the receiving daemon keeps part of the commit in flight (had the push gone on, that commit would have
/// arrived whole), and the next push sends neither the commit that was complete nor that commit's part again.
#[test]
fn a_killed_client_stops_the_daemons_push_and_the_next_push_resumes() {
    use std::time::{Duration, Instant};
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Daemon::start(&dir.path().join("a")), Daemon::start(&dir.path().join("b")));
    a.ok(&["init", "db", "--size", "64M"]);
    let uri = format!("nbd://{}/admin/db", a.nbd);
    qemu_ok(&uri, &["write -P 1 0 1M"]);
    let c1: Commit = a.json(&["commit", "db", "-m", "one"]);
    qemu_ok(&uri, &["write -P 2 8M 32M"]);
    let c2: Commit = a.json(&["commit", "db", "-m", "two"]);
    let stream = dir.path().join("c2");
    a.ok(&["send", "db", &c2.id, "--from", &c1.id, "-f", stream.to_str().unwrap()]);
    let c2_bytes = std::fs::metadata(&stream).unwrap().len();

    // b behind a slow link (4 MiB/s: the second commit takes about 8 s)
    let link = SlowLink::start(&b.api);
    let key = b.data.join("api-key");
    a.ok(&["remote", "add", "b", &link.url, "--key-file", key.to_str().unwrap()]);
    link.set_rate(4 << 20);
    let mut push =
        a.command(&["push", "b", "db", "-o", "json"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let b_has = |id: &str| {
        let (code, out, _) = b.cli(&["log", "db", "-o", "json"]);
        code == 0 && out.contains(id)
    };
    let started = Instant::now();
    while !b_has(&c1.id) {
        assert!(started.elapsed() < Duration::from_secs(60), "the first commit did not arrive");
        assert!(push.try_wait().unwrap().is_none(), "the push ended before the client was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1000));
    push.kill().unwrap();
    push.wait().unwrap();

    // b ends its receive of the second commit early and keeps its part; it never gets the whole commit
    let started = Instant::now();
    let kept = loop {
        assert!(!b_has(&c2.id), "the daemon went on pushing after its client was killed");
        let pending = b.json::<PoolStatus>(&["pool", "status"]).pending_receives;
        if let Some(p) = pending.iter().find(|p| p.commit == c2.id) {
            break p.resume_at_bytes;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "b kept no part of the second commit");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("the second commit's stream: {c2_bytes} bytes, {kept} kept by b");
    assert!(kept > 0 && kept < c2_bytes, "kept {kept} of {c2_bytes}");
    assert!(!b_has(&c2.id));

    link.set_rate(0);
    let s = summary(&a, &["push", "b", "db"]);
    assert_eq!(s["commits"], serde_json::json!([c2.id]), "the complete commit is not sent again: {s}");
    let sent = s["bytes"].as_u64().unwrap();
    assert!(sent < c2_bytes - kept + (64 << 10), "resumed: sent {sent} of {c2_bytes} (kept {kept})");
    assert!(b.json::<PoolStatus>(&["pool", "status"]).pending_receives.is_empty());
    same_export(&at(&a, &c2.id), &at(&b, &c2.id));
}

/// `POST path` to a daemon's API with `key` (none: no Authorization header) and `body`; (status, body).
fn post(d: &Daemon, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let mut req = ureq::post(&format!("{}{path}", d.api)).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.send_string(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("POST {path}: {e}"),
    }
}

/// The push and pull routes refuse what they cannot do before any data moves, with a fitting status and a message,
/// and never repeat the other daemon's key; a push that runs answers with progress lines and one summary line.
#[test]
fn the_push_and_pull_routes_answer_bad_requests_with_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Daemon::start(&dir.path().join("a")), Daemon::start(&dir.path().join("b")));
    a.ok(&["init", "db", "--size", "16M"]);
    let c1: Commit = a.json(&["commit", "db", "-m", "one"]);
    let (key_a, key_b) = (a.key(), b.key());
    let body = |url: &str, key: &str| serde_json::json!({ "url": url, "api_key": key }).to_string();
    let good = body(&b.api, &key_b);
    let error =
        |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap()["error"].as_str().unwrap().to_string();

    for route in ["push", "pull"] {
        let path = format!("/v1/dots/admin/db/{route}");
        // this daemon's own key
        assert_eq!(post(&a, &path, None, &good).0, 401, "{route} without a key");
        assert_eq!(post(&a, &path, Some("0000"), &good).0, 401, "{route} with a wrong key");
        // malformed bodies
        let (code, text) = post(&a, &path, Some(&key_a), "{\"url\": ");
        assert_eq!(code, 400, "{text}");
        assert!(error(&text).contains("malformed JSON"), "{text}");
        let (code, text) = post(&a, &path, Some(&key_a), r#"{"api_key": "k"}"#);
        assert_eq!(code, 400, "{text}");
        let (code, text) = post(&a, &path, Some(&key_a), &body("ftp://somewhere", &key_b));
        assert_eq!(code, 400, "{text}");
        assert!(error(&text).contains("http://"), "{text}");
        let (code, text) = post(&a, &path, Some(&key_a), &body(&b.api, " "));
        assert_eq!(code, 400, "{text}");
        let (code, text) = post(
            &a,
            &path,
            Some(&key_a),
            &serde_json::json!({ "url": b.api, "api_key": key_b, "ca_cert_pem": "x" }).to_string(),
        );
        assert_eq!(code, 400, "{text}");
        assert!(error(&text).contains("no PEM certificate"), "{text}");
        // the other daemon refuses the key: its refusal, named; the key is not repeated
        let wrong = "not-the-key-7f3a9c";
        let (code, text) = post(&a, &path, Some(&key_a), &body(&b.api, wrong));
        assert_eq!(code, 502, "{text}");
        let msg = error(&text);
        assert!(msg.contains("wrong API key") && msg.contains(&b.api) && msg.contains("DATA_DIR/api-key"), "{msg}");
        assert!(!text.contains(wrong), "the key is repeated: {text}");
        // nobody there
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (code, text) = post(&a, &path, Some(&key_a), &body(&format!("http://{closed}"), &key_b));
        assert_eq!(code, 502, "{text}");
        assert!(error(&text).contains("cannot reach"), "{text}");
    }
    // unknown dots: here for a push, there for a pull
    let (code, text) = post(&a, "/v1/dots/admin/nope/push", Some(&key_a), &good);
    assert_eq!(code, 404, "{text}");
    assert!(error(&text).contains("no dot named admin/nope"), "{text}");
    let (code, text) = post(&a, "/v1/dots/admin/db/pull", Some(&key_a), &good);
    assert_eq!(code, 404, "{text}");
    // nothing moved, nothing changed on either daemon
    assert_eq!(a.json::<Vec<Commit>>(&["log", "db"]).len(), 1);
    assert!(a.json::<PoolStatus>(&["pool", "status"]).pending_receives.is_empty());
    assert_eq!(b.json::<Vec<serde_json::Value>>(&["list"]).len(), 0);

    // a push that runs: progress lines, then exactly one summary line, last
    let (code, text) = post(&a, "/v1/dots/admin/db/push", Some(&key_a), &good);
    assert_eq!(code, 200, "{text}");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (last, rest) = lines.split_last().unwrap();
    assert_eq!(last["summary"]["commits"], serde_json::json!([c1.id]), "{text}");
    assert!(rest.iter().all(|l| l.get("progress").is_some()), "{text}");
    // diverged without force: 409, before anything moves
    b.ok(&["commit", "db", "-m", "b's own"]);
    a.ok(&["commit", "db", "-m", "a's own"]);
    let (code, text) = post(&a, "/v1/dots/admin/db/push", Some(&key_a), &good);
    assert_eq!(code, 409, "{text}");
    assert!(error(&text).contains("diverged"), "{text}");
}
