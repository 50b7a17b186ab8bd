//! Push and pull between two daemons in two network namespaces joined by a veth pair (created by the test; root
//! only), so the transfer really crosses a network link between separate network stacks: each daemon listens only on
//! its own namespace's address, the client runs beside the first daemon, and the second daemon's data is checked
//! byte for byte over NBD from inside its own namespace. Needs root and `ip` (iproute2); under CI=true, when run as
//! root, a missing tool is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockmesh::api::Commit;
use common::have;

/// Two network namespaces joined by a veth pair; removed on drop.
struct Link {
    ns: [String; 2],
    addr: [String; 2],
}

impl Link {
    fn new() -> Link {
        let id = std::process::id();
        let ns = [format!("bm-{id}-a"), format!("bm-{id}-b")];
        // a /24 of 10.0.0.0/8 picked from the process id, so parallel runs do not collide
        let net = format!("10.{}.{}", 100 + (id >> 8) % 100, id % 256);
        let addr = [format!("{net}.1"), format!("{net}.2")];
        let link = Link { ns: ns.clone(), addr: addr.clone() };
        let veth = [format!("bmv{}a", id % 100_000), format!("bmv{}b", id % 100_000)];
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
    let addr = &link.addr[i];
    let mut child = link
        .exec(i, env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--pool-size", "1G", "--data-dir"])
        .arg(data)
        .args(["--nbd-listen", &format!("{addr}:10809"), "--api-listen", &format!("{addr}:32607")])
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

/// The client, run in namespace `i` against daemon `d`, with remotes in `config`; returns stdout (must succeed).
fn client(link: &Link, i: usize, d: &NsDaemon, config: &Path, args: &[&str]) -> String {
    let out = link
        .exec(i, env!("CARGO_BIN_EXE_blockmesh"))
        .args(args)
        .env("BLOCKMESH_SERVER", &d.api)
        .env("BLOCKMESH_DATA_DIR", &d.data)
        .env("BLOCKMESH_CONFIG", config)
        .env_remove("BLOCKMESH_API_KEY")
        .env_remove("BLOCKMESH_REMOTE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
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

#[test]
fn push_and_pull_cross_a_link_between_two_network_namespaces() {
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    if !root {
        eprintln!("skipping: network namespaces need root");
        return;
    }
    if !have("ip") || !have("qemu-io") {
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
