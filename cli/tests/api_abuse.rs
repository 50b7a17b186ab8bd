//! Abusive clients of the real daemon's control API: slow-loris headers and bodies, thousands of idle connections,
//! oversized bodies, and a daemon out of file descriptors. Others are served meanwhile, the slow ones are dropped
//! after a bounded time, memory stays bounded, and nothing changes. Every test is bounded in time.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockmesh::api::MAX_API_BODY_BYTES;
use common::Daemon;

/// The daemon's limits (cli/src/main.rs).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
const BODY_TIMEOUT: Duration = Duration::from_secs(20);
/// How late after its limit a slow client may still be dropped.
const DROP_SLACK: Duration = Duration::from_secs(4);
/// Longest a normal request may take while the API is being abused.
const PROMPT: Duration = Duration::from_secs(5);
/// Idle connections of the flood test.
const IDLE_CONNECTIONS: usize = 2000;
/// Threads opening them.
const CONNECT_THREADS: usize = 16;
/// Most the daemon may grow while holding them (about 32 KiB a connection).
const FLOOD_MAX_GROWTH_BYTES: u64 = 64 << 20;

fn addr(d: &Daemon) -> String {
    d.api.trim_start_matches("http://").to_string()
}

/// Reads until the daemon closes the connection; returns what it sent.
fn read_until_closed(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// `GET /v1/info` and `blockmesh list`, each answered promptly.
fn served_promptly(d: &Daemon, key: &str) {
    let at = Instant::now();
    let info = ureq::get(&format!("{}/v1/info", d.api)).set("Authorization", &format!("Bearer {key}")).call().unwrap();
    assert_eq!(info.status(), 200);
    assert!(info.into_string().unwrap().contains(&d.nbd));
    d.ok(&["list"]);
    assert!(at.elapsed() < PROMPT, "a normal client waited {:?}", at.elapsed());
}

fn vm_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() << 10
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn slow_loris_api_clients_are_dropped_in_bounded_time_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let key = d.key();
    let began = Instant::now();
    let mut slow = Vec::new();
    // Headers trickled a byte every 300 ms (about 40 s for all of them).
    for _ in 0..6 {
        let (a, key) = (addr(&d), key.clone());
        slow.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(a).unwrap();
            let at = Instant::now();
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let req = format!("GET /v1/info HTTP/1.1\r\nHost: blockmesh\r\nAuthorization: Bearer {key}\r\n\r\n");
                for b in req.bytes() {
                    if w.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            });
            let got = read_until_closed(&mut s);
            ("headers", at.elapsed(), got)
        }));
    }
    // Whole headers of a write, a little of its body, then silence (4), or the body a byte every 2 s: inside the
    // idle timeout, but never done (3, #8).
    for i in 0..7 {
        let (a, key) = (addr(&d), key.clone());
        slow.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(a).unwrap();
            let at = Instant::now();
            let trickle = i >= 4;
            let req = format!(
                "POST /v1/dots HTTP/1.1\r\nHost: blockmesh\r\nAuthorization: Bearer {key}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}",
                if trickle { "" } else { "{\"name\":" }
            );
            s.write_all(req.as_bytes()).unwrap();
            if trickle {
                let mut w = s.try_clone().unwrap();
                std::thread::spawn(move || {
                    for b in "{\"name\":\"trickled\"".bytes().cycle() {
                        if w.write_all(&[b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(2));
                    }
                });
            }
            let got = read_until_closed(&mut s);
            (if trickle { "trickle" } else { "body" }, at.elapsed(), got)
        }));
    }
    // Meanwhile, normal clients are served promptly, again and again.
    while began.elapsed() < HEADER_TIMEOUT + Duration::from_secs(2) {
        served_promptly(&d, &key);
        std::thread::sleep(Duration::from_millis(500));
    }
    for h in slow {
        let (what, took, got) = h.join().unwrap();
        let limit = match what {
            "headers" => HEADER_TIMEOUT,
            "body" => BODY_IDLE_TIMEOUT,
            _ => BODY_TIMEOUT,
        };
        assert!(
            took >= limit - Duration::from_millis(500) && took <= limit + DROP_SLACK,
            "a slow client ({what}) was dropped after {took:?} (limit {limit:?})"
        );
        assert!(!got.contains(" 200 OK") && !got.contains(" 201 "), "a slow client ({what}) was served: {got}");
        if what != "headers" {
            assert!(got.starts_with("HTTP/1.1 4"), "a stalled body got no clear error: {got}");
        }
    }
    // Nothing was made by the stalled writes.
    let dots: Vec<serde_json::Value> = d.json(&["list"]);
    assert!(dots.is_empty(), "{dots:?}");
    served_promptly(&d, &key);
    println!(
        "api slow loris: 6 header tricklers, 4 body stallers and 3 body tricklers dropped in time; {:?} in all",
        began.elapsed()
    );
}

/// Raises the soft open-file limit to `want` (inherited by the daemon) if needed. False (a skip) when the hard limit
/// is lower, except under `CI=true`, where that fails the test.
fn enough_files(want: u64) -> bool {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_none_or(|c| c >= want) {
        return true;
    }
    if now.maximum.is_none_or(|m| m >= want) {
        setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: now.maximum }).unwrap();
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "needs {want} open files; hard limit {:?}", now.maximum);
    eprintln!("skipping: needs {want} open files; the hard limit is {:?}", now.maximum);
    false
}

#[test]
fn thousands_of_idle_connections_do_not_stop_the_api_and_memory_stays_bounded() {
    if !enough_files(IDLE_CONNECTIONS as u64 + 1024) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let key = d.key();
    served_promptly(&d, &key);
    let pid = d.child.id();
    let rss_before = vm_rss_bytes(pid);
    let began = Instant::now();
    // From several threads: a loopback SYN that meets an old TIME_WAIT entry is retried a second later.
    let idle: Vec<TcpStream> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CONNECT_THREADS)
            .map(|_| {
                let a = addr(&d);
                scope.spawn(move || {
                    (0..IDLE_CONNECTIONS / CONNECT_THREADS).map(|_| TcpStream::connect(&a).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    // Wait until the daemon holds them all.
    while open_files(pid) < IDLE_CONNECTIONS {
        assert!(began.elapsed() < PROMPT, "the daemon holds only {} files", open_files(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = began.elapsed();
    let growth = vm_rss_bytes(pid).saturating_sub(rss_before);
    assert!(
        growth < FLOOD_MAX_GROWTH_BYTES,
        "{IDLE_CONNECTIONS} idle connections grew the daemon by {} KiB",
        growth >> 10
    );
    // Normal clients and NBD are served while they are held.
    served_promptly(&d, &key);
    let mut nbd = TcpStream::connect(&d.nbd).unwrap();
    nbd.set_read_timeout(Some(PROMPT)).unwrap();
    let mut greeting = [0u8; 8];
    nbd.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGIC");
    assert!(began.elapsed() < HEADER_TIMEOUT, "too slow to prove anything before the idle ones time out");
    println!(
        "api flood: {IDLE_CONNECTIONS} idle connections held in {held:?}; daemon grew {} KiB ({} bytes a \
         connection); list, /v1/info and NBD served meanwhile",
        growth >> 10,
        growth / IDLE_CONNECTIONS as u64
    );
    drop(idle);
    served_promptly(&d, &key);
}

#[test]
fn an_oversized_body_gets_413_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let key = d.key();
    d.ok(&["init", "small", "--size", "16M"]);
    let before = d.ok(&["list"]);
    let pad = "x".repeat(MAX_API_BODY_BYTES);
    let body = format!("{{\"name\":\"big\",\"size_bytes\":16777216,\"pad\":\"{pad}\"}}");
    for path in ["/v1/dots", "/v1/dots/admin/small/commits", "/v1/dots/admin/small/branches"] {
        let res = ureq::post(&format!("{}{path}", d.api))
            .set("Authorization", &format!("Bearer {key}"))
            .set("Content-Type", "application/json")
            .send_string(&body);
        match res {
            Err(ureq::Error::Status(413, _)) => {}
            other => panic!("POST {path} with {} bytes: {other:?}", body.len()),
        }
    }
    // Without a length up front (chunked): refused as well, once past the limit.
    let mut s = TcpStream::connect(addr(&d)).unwrap();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    let head = format!(
        "POST /v1/dots HTTP/1.1\r\nHost: blockmesh\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    for chunk in body.as_bytes().chunks(64 << 10) {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err()
            || s.write_all(chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let got = read_until_closed(&mut s);
    assert!(got.starts_with("HTTP/1.1 413"), "chunked oversized body: {got}");
    assert_eq!(d.ok(&["list"]), before, "an oversized request changed something");
    let (code, _, _) = d.cli(&["log", "small"]);
    assert_eq!(code, 0);
    served_promptly(&d, &key);
}

/// Open-file limit of the daemon in the file-descriptor exhaustion test.
const SMALL_FILE_LIMIT: usize = 128;

#[test]
fn a_daemon_out_of_file_descriptors_keeps_running_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    // The daemon under a small open-file limit (`Daemon::start`, through a shell that sets it).
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {SMALL_FILE_LIMIT} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--pool-size", "1G"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let line = loop {
        let l = lines.next().expect("daemon exited").unwrap();
        if l.starts_with("blockmesh serving") {
            break l;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let after = |marker: &str| line.split(marker).nth(1).unwrap().split([' ', ',']).next().unwrap().to_string();
    let mut d = Daemon {
        child,
        data: dir.path().to_path_buf(),
        api: format!("http://{}", after("http://")),
        nbd: after("nbd://"),
        health: None,
    };
    let key = d.key();
    served_promptly(&d, &key);
    // Use up the daemon's descriptors with idle API connections (the rest wait in the accept queue).
    let hog: Vec<TcpStream> = (0..SMALL_FILE_LIMIT + 64).map(|_| TcpStream::connect(addr(&d)).unwrap()).collect();
    let began = Instant::now();
    while open_files(d.child.id()) < SMALL_FILE_LIMIT {
        assert!(began.elapsed() < PROMPT, "the daemon did not run out of descriptors");
        std::thread::sleep(Duration::from_millis(20));
    }
    // An NBD client now: its accept fails (EMFILE); the daemon must not stop.
    let mut nbd = TcpStream::connect(&d.nbd).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited when it ran out of file descriptors");
    // Once the hogs go, the waiting NBD client and the API are served again.
    drop(hog);
    nbd.set_read_timeout(Some(PROMPT)).unwrap();
    let mut greeting = [0u8; 8];
    nbd.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGIC");
    served_promptly(&d, &key);
    assert!(d.child.try_wait().unwrap().is_none());
}
