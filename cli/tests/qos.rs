//! Per-volume quality of service on the real daemon: limits set at `init` and with `blockmesh qos`, kept in the pool
//! across restarts, shown by `list`, enforced on NBD clients (fio at queue depth 32 gets the capped rate within
//! +-10% over 5 s), counted in `/metrics`; bad limits are refused with a clear error and change nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{have, sample, Daemon};

/// Seconds fio measures for (after a ramp that absorbs the buckets' initial burst).
const MEASURE_SECS: u32 = 5;
const RAMP_SECS: u32 = 2;

/// Runs fio against an export over NBD; returns (IOPS, bytes per second) of the direction `rw` moves.
fn fio(uri: &str, rw: &str, bs: &str, iodepth: u32) -> (f64, f64) {
    let out = Command::new("fio")
        .args([
            "--name=qos",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            "--size=64M",
            "--time_based",
            &format!("--ramp_time={RAMP_SECS}"),
            &format!("--runtime={MEASURE_SECS}"),
            "--output-format=json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let j: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    let k = if rw.contains("write") { "write" } else { "read" };
    let job = &j["jobs"][0][k];
    let (iops, bps) = (job["iops"].as_f64().unwrap(), job["bw_bytes"].as_f64().unwrap());
    eprintln!("fio {rw} bs={bs} qd{iodepth}: {iops:.1} IOPS, {:.3} MiB/s", bps / f64::from(1 << 20));
    (iops, bps)
}

fn within(actual: f64, target: f64, tolerance: f64) -> bool {
    (actual - target).abs() <= target * tolerance
}

#[test]
fn an_iops_cap_holds_under_fio_at_queue_depth_32() {
    if !have("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cap = 400.0;
    d.ok(&["init", "db", "--size", "64M", "--iops", "400"]);
    let uri = format!("nbd://{}/admin/db", d.nbd);
    let (iops, _) = fio(&uri, "randread", "4k", 32);
    assert!(within(iops, cap, 0.10), "random reads at qd32 under a 400 IOPS cap: {iops:.0} IOPS");
    let (iops, _) = fio(&uri, "randwrite", "4k", 32);
    assert!(within(iops, cap, 0.10), "random writes at qd32 under a 400 IOPS cap: {iops:.0} IOPS");
    // changed live: a separate write cap, and no cap on reads
    d.ok(&["qos", "db", "--iops", "none", "--write-iops", "200"]);
    let (iops, _) = fio(&uri, "randwrite", "4k", 32);
    assert!(within(iops, 200.0, 0.10), "random writes under a 200 write-IOPS cap: {iops:.0} IOPS");
    let (iops, _) = fio(&uri, "randread", "4k", 32);
    assert!(iops > 2.0 * cap, "reads are no longer capped: {iops:.0} IOPS");
}

#[test]
fn a_bandwidth_cap_holds_and_throttling_shows_in_metrics() {
    if !have("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.ok(&["init", "db", "--size", "64M"]);
    d.ok(&["qos", "db", "--write-bps", "8M"]);
    let uri = format!("nbd://{}/admin/db", d.nbd);
    let (_, bps) = fio(&uri, "write", "64k", 32);
    let cap = f64::from(8u32 << 20);
    assert!(within(bps, cap, 0.10), "sequential writes under an 8 MiB/s cap: {:.2} MiB/s", bps / f64::from(1 << 20));
    let url = format!("{}/metrics", d.api);
    let text =
        ureq::get(&url).set("Authorization", &format!("Bearer {}", d.key())).call().unwrap().into_string().unwrap();
    let sample = |name: &str| sample(&text, name);
    let labels = "{dot=\"admin/db\",subdot=\"__default__\"}";
    assert!(sample(&format!("blockmesh_volume_throttled_seconds_total{labels}")) > 1.0);
    assert!(sample(&format!("blockmesh_volume_throttled_requests_total{labels}")) > 10.0);
    let written = sample("blockmesh_volume_bytes_total{dot=\"admin/db\",subdot=\"__default__\",op=\"write\"}");
    // fio's ramp and measured seconds, at the cap plus the first second's burst
    let most = cap * f64::from(MEASURE_SECS + RAMP_SECS + 2);
    assert!(written > cap * f64::from(MEASURE_SECS) && written < most, "bytes written: {written}");
}

#[test]
fn limits_are_kept_listed_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.ok(&["init", "db", "--size", "64M", "--subdot", "data", "--subdot", "logs", "--read-iops", "900"]);
    d.ok(&["qos", "db.logs", "--write-bps", "10M", "--burst-ms", "200"]);
    let all: BTreeMap<String, serde_json::Value> = d.json(&["qos", "db.logs"]);
    assert_eq!(all["read_iops"], 900);
    assert_eq!(all["write_bytes_per_sec"], 10 << 20);
    assert_eq!(all["burst_ms"], 200);
    let list = d.ok(&["list"]);
    assert!(list.contains("QOS"), "{list}");
    assert!(list.contains("data: r 900 iops"), "{list}");
    assert!(list.contains("logs: r 900 iops, w 10 MiB/s"), "{list}");
    // bad input: a clear error, nothing changed
    let (code, _, err) = d.cli(&["qos", "db.data", "--iops", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("iops must be at least 1"), "{err}");
    let (code, _, err) = d.cli(&["qos", "db.nope", "--iops", "5"]);
    assert_ne!(code, 0);
    assert!(err.contains("no subdot nope"), "{err}");
    let (code, _, err) = d.cli(&["qos", "db.data", "--iops", "lots"]);
    assert_eq!(code, 2, "bad usage: {err}");
    let (code, _, err) = d.cli(&["init", "other", "--write-bps", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("at least 4096"), "{err}");
    let (code, _, _) = d.cli(&["list"]);
    assert_eq!(code, 0);
    assert!(!d.ok(&["list"]).contains("other"), "a refused init creates no dot");
    // kept across a restart
    drop(d);
    let d = Daemon::start(dir.path());
    let logs: serde_json::Value = d.json(&["qos", "db.logs"]);
    assert_eq!(logs["write_bytes_per_sec"], 10 << 20);
    // removed one by one and all at once
    d.ok(&["qos", "db.logs", "--write-bps", "none"]);
    let logs: serde_json::Value = d.json(&["qos", "db.logs"]);
    assert!(logs.get("write_bytes_per_sec").is_none(), "{logs}");
    assert_eq!(logs["read_iops"], 900);
    d.ok(&["qos", "db.logs", "--clear"]);
    assert_eq!(d.json::<serde_json::Value>(&["qos", "db.logs"]), serde_json::json!({}));
    assert!(d.ok(&["qos", "db.logs"]).contains("admin/db.logs: -"));
    // a deleted dot's limits go with it
    d.ok(&["delete", "db", "--yes", "--force"]);
    d.ok(&["init", "db", "--size", "64M", "--subdot", "data"]);
    assert_eq!(d.json::<serde_json::Value>(&["qos", "db.data"]), serde_json::json!({}));
}
