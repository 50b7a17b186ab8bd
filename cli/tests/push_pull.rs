//! Push and pull between real daemons: only the missing commits travel, oldest first, incrementally; a pull into a
//! third daemon gives the same bytes (qemu-img compare over NBD); diverged histories and wrong keys are refused; an
//! interrupted transfer resumes where it stopped; `--force` sends what is missing from the newest shared commit (or
//! everything, the first commit whole) and moves the other side's diverged branch, closing the NBD connections to
//! its head. Under CI=true a missing NBD client is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh::api::{Commit, PoolStatus};
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
