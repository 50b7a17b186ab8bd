//! Push and pull between real daemons: only the missing commits travel, oldest first, incrementally; a pull into a
//! third daemon gives the same bytes (qemu-img compare over NBD); diverged histories and wrong keys are refused; an
//! interrupted transfer resumes where it stopped. Under CI=true a missing NBD client is a failure.
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
