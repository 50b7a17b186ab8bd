//! Push and pull between two daemons in two network namespaces joined by a veth pair (created by the test; root
//! only), so the transfer really crosses a network link between separate network stacks: each daemon listens only on
//! its own namespace's address, the client runs beside the first daemon, and the second daemon's data is checked
//! byte for byte over NBD from inside its own namespace. A third namespace, linked to the first daemon's only, holds a
//! client that reaches that daemon but not the other: its push and pull work (the daemons move the data between
//! themselves), its `--relay` ones cannot. Needs root and `ip` (iproute2); under CI=true, when run as root, a missing
//! tool is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockmesh::api::Commit;
use common::have;

/// Two network namespaces joined by a veth pair (and maybe more namespaces joined to one of them, see
/// [`Link::add_namespace`]); removed on drop.
struct Link {
    /// Namespace `i`'s name, its address on its link, and its end of that link.
    ns: Vec<String>,
    addr: Vec<String>,
    veth: Vec<String>,
    /// The link's number in this process.
    n: u32,
}

/// Links made by this process (the tests of this file run in parallel).
static LINKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Link {
    fn new() -> Link {
        let n = LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < 4, "at most four links per test process");
        let id = std::process::id();
        let ns = [format!("bm-{id}-{n}-a"), format!("bm-{id}-{n}-b")];
        // a /24 of 10.0.0.0/8 picked from the process id and the link's number, so parallel runs do not collide
        let k = id * 4 + n;
        let net = format!("10.{}.{}", 100 + (k >> 8) % 150, k % 256);
        let addr = [format!("{net}.1"), format!("{net}.2")];
        let veth = [format!("bmv{}{n}a", id % 100_000), format!("bmv{}{n}b", id % 100_000)];
        let link = Link { ns: ns.to_vec(), addr: addr.to_vec(), veth: veth.to_vec(), n };
        ip(&["netns", "add", &ns[0]]);
        ip(&["netns", "add", &ns[1]]);
        ip(&["link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1]]);
        for i in 0..2 {
            ip(&["link", "set", &veth[i], "netns", &ns[i]]);
            ip(&["-n", &ns[i], "addr", "add", &format!("{}/24", addr[i]), "dev", &veth[i]]);
            ip(&["-n", &ns[i], "link", "set", &veth[i], "up"]);
            ip(&["-n", &ns[i], "link", "set", "lo", "up"]);
        }
        link
    }

    /// Adds a namespace joined to namespace `to` only, by a veth pair on a subnet of its own (172.16.0.0/12, apart
    /// from the links' 10.0.0.0/8 ones); nothing forwards between the subnets, so from it only `to` can be reached,
    /// at `to`'s address on that subnet. Returns the new namespace's index and that address.
    fn add_namespace(&mut self, to: usize) -> (usize, String) {
        let (id, n, i) = (std::process::id(), self.n, self.ns.len());
        let ns = format!("bm-{id}-{n}-{i}");
        let k = id * 4 + n;
        let net = format!("172.{}.{}", 16 + (k >> 8) % 16, k % 256);
        let (near, far) = (format!("{net}.1"), format!("{net}.2"));
        let (veth_to, veth) = (format!("bmv{}{n}{i}t", id % 100_000), format!("bmv{}{n}{i}n", id % 100_000));
        ip(&["netns", "add", &ns]);
        self.ns.push(ns.clone());
        ip(&["link", "add", &veth_to, "type", "veth", "peer", "name", &veth]);
        for (dev, netns, addr) in [(&veth_to, &self.ns[to], &near), (&veth, &ns, &far)] {
            ip(&["link", "set", dev, "netns", netns]);
            ip(&["-n", netns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", netns, "link", "set", dev, "up"]);
        }
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        self.addr.push(far);
        self.veth.push(veth);
        (i, near)
    }

    /// Take namespace `i`'s end of the link down (`false`) or up again.
    fn set_up(&self, i: usize, up: bool) {
        ip(&["-n", &self.ns[i], "link", "set", &self.veth[i], if up { "up" } else { "down" }]);
    }

    /// `cmd args` run inside namespace `i`.
    fn exec(&self, i: usize, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i], cmd]);
        c
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?} failed");
}

/// A daemon inside namespace `i`, listening on that namespace's address only.
struct NsDaemon {
    child: Child,
    data: PathBuf,
    api: String,
    nbd: String,
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(link: &Link, i: usize, data: &Path) -> NsDaemon {
    start_with_api(link, i, data, &link.addr[i])
}

/// [`start`], its control API listening on `api_ip` (of namespace `i`: `0.0.0.0` for all its addresses).
fn start_with_api(link: &Link, i: usize, data: &Path, api_ip: &str) -> NsDaemon {
    let addr = &link.addr[i];
    let mut child = link
        .exec(i, env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--pool-size", "1G", "--data-dir"])
        .arg(data)
        .args(["--nbd-listen", &format!("{addr}:10809"), "--api-listen", &format!("{api_ip}:32607")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "daemon in {} did not start", link.ns[i]);
        let l = lines.next().expect("daemon exited").unwrap();
        if l.starts_with("blockmesh serving") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    NsDaemon { child, data: data.to_path_buf(), api: format!("http://{addr}:32607"), nbd: format!("{addr}:10809") }
}

/// The client's command line in namespace `i` against daemon `d`, with remotes in `config` (standard input closed).
fn client_command(link: &Link, i: usize, d: &NsDaemon, config: &Path, args: &[&str]) -> Command {
    let mut c = link.exec(i, env!("CARGO_BIN_EXE_blockmesh"));
    c.args(args)
        .env("BLOCKMESH_SERVER", &d.api)
        .env("BLOCKMESH_DATA_DIR", &d.data)
        .env("BLOCKMESH_CONFIG", config)
        .env_remove("BLOCKMESH_API_KEY")
        .env_remove("BLOCKMESH_REMOTE")
        .stdin(Stdio::null());
    c
}

/// The client, run in namespace `i` against daemon `d`, with remotes in `config`; returns stdout (must succeed).
fn client(link: &Link, i: usize, d: &NsDaemon, config: &Path, args: &[&str]) -> String {
    let out = client_command(link, i, d, config, args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "blockmesh {args:?} in {}: {}{}", link.ns[i], text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn qemu_io(link: &Link, i: usize, uri: &str, cmds: &[&str]) {
    let mut c = link.exec(i, "qemu-io");
    c.args(["-f", "raw"]);
    if uri.contains('@') {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("Pattern verification failed"), "qemu-io {cmds:?} {uri}: {text}");
}

/// Whether this run can make network namespaces and has the tools (under CI=true, as root, a missing tool fails).
fn can_run(tools: &[&str]) -> bool {
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    if !root {
        eprintln!("skipping: network namespaces need root");
        return false;
    }
    tools.iter().all(|t| have(t))
}

#[test]
fn push_and_pull_cross_a_link_between_two_network_namespaces() {
    if !can_run(&["ip", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = Link::new();
    let (a, b) = (start(&link, 0, &dir.path().join("a")), start(&link, 1, &dir.path().join("b")));
    let config = dir.path().join("remotes.json");

    client(&link, 0, &a, &config, &["init", "db", "--size", "64M"]);
    qemu_io(&link, 0, &format!("nbd://{}/admin/db", a.nbd), &["write -P 0x31 0 4M", "write -P 0x32 32M 1M"]);
    let c1: Commit =
        serde_json::from_str(&client(&link, 0, &a, &config, &["commit", "db", "-m", "one", "-o", "json"])).unwrap();
    let key_b = b.data.join("api-key");
    client(&link, 0, &a, &config, &["remote", "add", "b", &b.api, "--key-file", key_b.to_str().unwrap()]);
    let pushed: serde_json::Value =
        serde_json::from_str(&client(&link, 0, &a, &config, &["push", "b", "db", "-o", "json"])).unwrap();
    assert_eq!(pushed["commits"].as_array().map(Vec::len), Some(1), "{pushed}");

    // on the far side of the link, read inside its own namespace
    let on_b = format!("nbd://{}/admin/db@{}", b.nbd, c1.id);
    qemu_io(&link, 1, &on_b, &["read -P 0x31 0 4M", "read -P 0x32 32M 1M", "read -P 0 4M 28M"]);

    // a change on b, pulled back to a across the link: only the new commit travels
    let config_b = dir.path().join("remotes-b.json");
    qemu_io(&link, 1, &format!("nbd://{}/admin/db", b.nbd), &["write -P 0x33 8M 1M"]);
    let c2: Commit =
        serde_json::from_str(&client(&link, 1, &b, &config_b, &["commit", "db", "-m", "two", "-o", "json"])).unwrap();
    let pulled: serde_json::Value =
        serde_json::from_str(&client(&link, 0, &a, &config, &["pull", "b", "db", "-o", "json"])).unwrap();
    assert_eq!(pulled["commits"].as_array().map(Vec::len), Some(1), "{pulled}");
    assert!(pulled["bytes"].as_u64().unwrap() < 2 << 20, "an incremental pull: {pulled}");
    let on_a = format!("nbd://{}/admin/db@{}", a.nbd, c2.id);
    qemu_io(&link, 0, &on_a, &["read -P 0x31 0 4M", "read -P 0x33 8M 1M", "read -P 0x32 32M 1M"]);
}

/// A push cut by a link failure (the link between the daemons goes down mid-stream and the client is killed while it
/// is down, as a user would stop a push that hangs): once the link is back, the receiver keeps what arrived of the
/// commit in flight, and the next push sends neither the commit that was complete nor that commit's part again.
#[test]
fn a_push_cut_by_a_link_failure_resumes_where_it_stopped() {
    if !can_run(&["ip", "tc", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = Link::new();
    let (a, b) = (start(&link, 0, &dir.path().join("a")), start(&link, 1, &dir.path().join("b")));
    let (config, config_b) = (dir.path().join("remotes.json"), dir.path().join("remotes-b.json"));
    client(&link, 0, &a, &config, &["init", "big", "--size", "64M"]);
    let uri = format!("nbd://{}/admin/big", a.nbd);
    let mut commits = Vec::new();
    for (k, pattern) in [0x41u8, 0x42, 0x43].into_iter().enumerate() {
        qemu_io(&link, 0, &uri, &[&format!("write -P {pattern:#x} {}M 16M", 16 * k)]);
        let c: Commit =
            serde_json::from_str(&client(&link, 0, &a, &config, &["commit", "big", "-m", "c", "-o", "json"])).unwrap();
        commits.push(c.id);
    }
    // the size of the second commit's stream, as the push sends it (incremental from the first)
    let stream =
        client_command(&link, 0, &a, &config, &["send", "big", &commits[1], "--from", &commits[0]]).output().unwrap();
    assert!(stream.status.success(), "send: {}", String::from_utf8_lossy(&stream.stderr));
    let second_stream_bytes = stream.stdout.len() as u64;
    let key_b = b.data.join("api-key");
    client(&link, 0, &a, &config, &["remote", "add", "b", &b.api, "--key-file", key_b.to_str().unwrap()]);

    // about 12 MB/s from a to b, so the push takes seconds
    let tc = link
        .exec(0, "tc")
        .args(["qdisc", "add", "dev", &link.veth[0], "root", "tbf"])
        .args(["rate", "100mbit", "burst", "256kbit", "latency", "500ms"])
        .status()
        .unwrap();
    assert!(tc.success(), "tc");
    let mut push = client_command(&link, 0, &a, &config, &["push", "b", "big", "-o", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // once b holds the first commit, a moment into the second: the link goes down, the client is stopped
    // (b has no dot `big` before the first commit arrives: the log then fails)
    let b_has = |id: &str| {
        let out = client_command(&link, 1, &b, &config_b, &["log", "big", "-o", "json"]).output().unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(id)
    };
    let started = Instant::now();
    while !b_has(&commits[0]) {
        assert!(started.elapsed() < Duration::from_secs(60), "the first commit did not arrive");
        assert!(push.try_wait().unwrap().is_none(), "the push ended before the link went down");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(400));
    link.set_up(0, false);
    let _ = push.kill();
    let _ = push.wait();
    std::thread::sleep(Duration::from_millis(500));
    link.set_up(0, true);

    // b notices the cut (what the killed client's socket still held arrives, then its end) and keeps the part
    let started = Instant::now();
    let kept = loop {
        let status: serde_json::Value =
            serde_json::from_str(&client(&link, 1, &b, &config_b, &["pool", "status", "-o", "json"])).unwrap();
        let pending = status["pending_receives"].as_array().cloned().unwrap_or_default();
        if let Some(p) = pending.iter().find(|p| p["commit"] == commits[1].as_str()) {
            break p["resume_at_bytes"].as_u64().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(90), "b kept no part of the second commit: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(kept > 0 && kept < second_stream_bytes, "kept {kept} of {second_stream_bytes}");
    assert!(!b_has(&commits[1]), "the second commit is not visible half-received");

    let pushed: serde_json::Value =
        serde_json::from_str(&client(&link, 0, &a, &config, &["push", "b", "big", "-o", "json"])).unwrap();
    let sent: Vec<&str> = pushed["commits"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(sent, [commits[1].as_str(), commits[2].as_str()], "the complete commit is not sent again: {pushed}");
    // the third commit's stream is about as long as the second's; the second resumed at `kept`
    let bytes = pushed["bytes"].as_u64().unwrap();
    eprintln!("second commit's stream {second_stream_bytes} bytes, {kept} kept by b; the next push sent {bytes}");
    assert!(bytes < 2 * second_stream_bytes - kept + (1 << 20), "{bytes} bytes, {kept} kept: {pushed}");
    let on_b = format!("nbd://{}/admin/big@{}", b.nbd, commits[2]);
    qemu_io(&link, 1, &on_b, &["read -P 0x41 0 16M", "read -P 0x42 16M 16M", "read -P 0x43 32M 16M"]);
}

/// The client, run in namespace `i` against daemon `d`, must fail; returns its standard error.
fn client_fails(link: &Link, i: usize, d: &NsDaemon, config: &Path, args: &[&str]) -> String {
    let out = client_command(link, i, d, config, args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "blockmesh {args:?} in {} did not fail: {err}", link.ns[i]);
    err
}

/// The data goes from daemon to daemon, not through the client: a client in a third namespace, linked to the first
/// daemon's namespace only (no forwarding), reaches that daemon but not the second. Its push and pull work, and the
/// far side reads back byte for byte inside its own namespace; the same push and pull with --relay, which carry the
/// data through the client, cannot reach the second daemon and change nothing.
#[test]
fn push_and_pull_go_daemon_to_daemon_from_a_client_that_reaches_only_one_daemon() {
    if !can_run(&["ip", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut link = Link::new();
    let (c, a_seen_from_c) = link.add_namespace(0);
    let mut a = start_with_api(&link, 0, &dir.path().join("a"), "0.0.0.0");
    let b = start(&link, 1, &dir.path().join("b"));
    // the client in c talks to a at a's address on c's link
    a.api = format!("http://{a_seen_from_c}:32607");
    let (config, config_b) = (dir.path().join("remotes.json"), dir.path().join("remotes-b.json"));

    client(&link, c, &a, &config, &["init", "db", "--size", "64M"]);
    qemu_io(&link, 0, &format!("nbd://{}/admin/db", a.nbd), &["write -P 0x51 0 4M", "write -P 0x52 40M 2M"]);
    let c1: Commit =
        serde_json::from_str(&client(&link, c, &a, &config, &["commit", "db", "-m", "one", "-o", "json"])).unwrap();
    // b cannot be reached from c: adding it as a remote needs --no-check
    let key_b = b.data.join("api-key");
    let add_b = ["remote", "add", "b", &b.api, "--key-file", key_b.to_str().unwrap()];
    let err = client_fails(&link, c, &a, &config, &add_b);
    assert!(err.contains("cannot reach") && err.contains(&b.api), "{err}");
    client(&link, c, &a, &config, &[&add_b[..], &["--no-check"]].concat());

    // through the client: it cannot reach b, says so, and nothing reaches b
    let err = client_fails(&link, c, &a, &config, &["push", "b", "db", "--relay"]);
    assert!(err.contains("cannot reach") && err.contains(&b.api), "{err}");
    let listed = client(&link, 1, &b, &config_b, &["list", "-o", "json"]);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&listed).unwrap().len(), 0, "{listed}");

    // daemon to daemon: a reaches b
    let pushed: serde_json::Value =
        serde_json::from_str(&client(&link, c, &a, &config, &["push", "b", "db", "-o", "json"])).unwrap();
    assert_eq!(pushed["commits"], serde_json::json!([c1.id]), "{pushed}");
    let on_b = format!("nbd://{}/admin/db@{}", b.nbd, c1.id);
    qemu_io(&link, 1, &on_b, &["read -P 0x51 0 4M", "read -P 0 4M 36M", "read -P 0x52 40M 2M", "read -P 0 42M 22M"]);

    // a commit made on b, pulled into a by the client that cannot reach b: not with --relay, daemon to daemon yes
    qemu_io(&link, 1, &format!("nbd://{}/admin/db", b.nbd), &["write -P 0x53 8M 1M"]);
    let c2: Commit =
        serde_json::from_str(&client(&link, 1, &b, &config_b, &["commit", "db", "-m", "two", "-o", "json"])).unwrap();
    let err = client_fails(&link, c, &a, &config, &["pull", "b", "db", "--relay"]);
    assert!(err.contains("cannot reach") && err.contains(&b.api), "{err}");
    let log: Vec<Commit> = serde_json::from_str(&client(&link, c, &a, &config, &["log", "db", "-o", "json"])).unwrap();
    assert_eq!(log.len(), 1, "the relayed pull changed nothing");
    let pulled: serde_json::Value =
        serde_json::from_str(&client(&link, c, &a, &config, &["pull", "b", "db", "-o", "json"])).unwrap();
    assert_eq!(pulled["commits"], serde_json::json!([c2.id]), "{pulled}");
    assert!(pulled["bytes"].as_u64().unwrap() < 2 << 20, "an incremental pull: {pulled}");
    let on_a = format!("nbd://{}/admin/db@{}", a.nbd, c2.id);
    qemu_io(&link, 0, &on_a, &["read -P 0x51 0 4M", "read -P 0x53 8M 1M", "read -P 0x52 40M 2M", "read -P 0 42M 22M"]);
    // and a's branch moved to it
    let log: Vec<Commit> = serde_json::from_str(&client(&link, c, &a, &config, &["log", "db", "-o", "json"])).unwrap();
    assert_eq!(log.first().map(|x| x.id.clone()), Some(c2.id));
}
