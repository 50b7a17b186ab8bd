//! A dot's head is not moved from under a connected NBD client: checkout, reset and delete are refused while one is
//! connected, and `--force` closes its connection first (what it wrote and had acknowledged stays). Drives the real
//! daemon with nbdsh (a client that stays connected) and qemu-io. Under CI=true a missing client is a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{have, qemu_ok, Daemon};

/// Writes block 0, says so, waits for a line on stdin, then tries a read and says whether the connection held.
const CLIENT: &str = r#"
import sys
h.pwrite(b'\x01' * 4096, 0)
h.flush()
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pread(4096, 0)
    print("still open", flush=True)
except Exception as e:
    print("closed", flush=True)
"#;

#[test]
fn a_connected_client_holds_the_head_until_forced_off() {
    if !have("nbdsh") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.ok(&["init", "db", "--size", "16M"]);
    d.ok(&["commit", "db", "-m", "empty"]);
    d.ok(&["branch", "db", "other"]);
    let uri = format!("nbd://{}/admin/db", d.nbd);
    let mut client = Command::new("nbdsh")
        .args(["-u", &uri, "-c", CLIENT])
        // nbdsh runs `python3`: Debian's, which has the libnbd module, not another one earlier on the PATH
        .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(out.next().unwrap().unwrap(), "connected");

    for args in [&["checkout", "db", "other"][..], &["reset", "db", "--hard", "master"], &["delete", "db", "--yes"]] {
        let (code, _, err) = d.cli(args);
        assert_eq!(code, 1, "{args:?} while a client is connected");
        assert!(err.contains("in use by 1 connected NBD client") && err.contains("--force"), "{args:?}: {err}");
    }
    // reads of a commit do not hold the head
    let out_ro = d.ok(&["export-uri", "db@master"]);
    qemu_ok(out_ro.trim(), &["read -P 0 0 4096"]);

    d.ok(&["checkout", "db", "other", "--force"]);
    client.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(out.next().unwrap().unwrap(), "closed", "the forced checkout closed the client's connection");
    client.wait().unwrap();

    // once the connection is gone, nothing holds the dot
    let start = Instant::now();
    loop {
        let (code, _, err) = d.cli(&["checkout", "db", "master"]);
        if code == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the closed connection still counts: {err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // what the client wrote before it was closed stays on master's head
    qemu_ok(&uri, &["read -P 1 0 4096"]);
}
