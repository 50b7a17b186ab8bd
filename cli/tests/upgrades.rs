//! Upgrade checks: a daemon given `--upgrades-url` asks that server which version is current (saying which product,
//! version, OS and architecture it is) every interval, and `blockmesh version` tells of a newer one; a daemon without
//! the URL never calls out; a bad answer changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blockmesh::api::ServerInfo;
use common::Daemon;

/// A checkpoint server on loopback answering every request with `body`; each request line goes to the receiver.
fn checkpoint_server(body: &'static str) -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/check", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // the rest of the head
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let _ = tx.send(line.trim().to_string());
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, rx)
}

fn wait_for_info(d: &Daemon, done: impl Fn(&ServerInfo) -> bool) -> ServerInfo {
    let started = Instant::now();
    loop {
        let v: serde_json::Value = d.json(&["version"]);
        let info: ServerInfo = serde_json::from_value(v["server"].clone()).unwrap();
        if done(&info) {
            return info;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the daemon never got there: {info:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_newer_version_is_told_and_the_check_says_who_asks() {
    let (url, requests) = checkpoint_server(
        r#"{"product":"blockmesh","current_version":"99.1.0","current_download_url":"https://example.com/dl"}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &["--pool-size", "1G", "--upgrades-url", &url, "--upgrades-interval-seconds", "1"],
    );
    let info = wait_for_info(&d, |i| i.latest_version.is_some());
    assert_eq!(info.latest_version.as_deref(), Some("99.1.0"));
    assert_eq!(info.latest_download_url.as_deref(), Some("https://example.com/dl"));
    let first = requests.recv_timeout(Duration::from_secs(10)).unwrap();
    let want = format!("GET /v1/check?product=blockmesh&version={}&os=", env!("CARGO_PKG_VERSION"));
    assert!(first.starts_with(&want), "{first}");
    // every interval again
    requests.recv_timeout(Duration::from_secs(10)).expect("a second check a second later");
    let text = d.ok(&["version"]);
    assert!(text.contains("a newer version is available: 99.1.0: https://example.com/dl"), "{text}");
    assert!(text.contains(&format!("client: {}", env!("CARGO_PKG_VERSION"))), "{text}");
}

#[test]
fn no_url_means_no_call_and_bad_answers_change_nothing() {
    // no URL: the server is never asked
    let (_url, requests) = checkpoint_server(r#"{"current_version":"99.0.0"}"#);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--pool-size", "1G", "--upgrades-interval-seconds", "1"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(requests.try_recv().is_err(), "a daemon without --upgrades-url called out");
    let text = d.ok(&["version"]);
    assert!(!text.contains("newer"), "{text}");
    drop(d);

    // an answer that is not a version, and one that is older: nothing to tell
    for body in [r#"{"current_version":"not a version"}"#, r#"{"current_version":"0.0.1"}"#, "<html>"] {
        let (url, requests) = checkpoint_server(body);
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start_with(
            dir.path(),
            &["--pool-size", "1G", "--upgrades-url", &url, "--upgrades-interval-seconds", "1"],
        );
        requests.recv_timeout(Duration::from_secs(10)).expect("checked");
        requests.recv_timeout(Duration::from_secs(10)).expect("and checked again");
        let info: serde_json::Value = d.json(&["version"]);
        assert!(info["server"].get("latest_version").is_none(), "{body}: {info}");
    }

    // a URL that is not http(s) is refused at start
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--pool-size", "1G"])
        .args(["--upgrades-url", "ftp://example.com/x"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("http:// or https://"), "{out:?}");
}
