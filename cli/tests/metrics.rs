//! `GET /metrics` of the real daemon: Prometheus text with the NBD requests a real client (qemu-io) made, their
//! bytes and latency histogram, and the pool's figures; 401 without the API key; the key-less health endpoint on its own listener.
#![allow(clippy::unwrap_used)]

mod common;

use common::{have, qemu_ok, sample, Daemon};

#[test]
fn metrics_count_nbd_requests_and_show_the_pool() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--pool-size", "1G", "--health-listen", "127.0.0.1:0"]);
    d.ok(&["init", "db", "--size", "64M"]);
    let uri = format!("nbd://{}/admin/db", d.nbd);
    qemu_ok(&uri, &["write -P 7 0 1M", "write -P 8 4M 64k", "flush", "read -P 7 0 1M"]);
    let url = format!("{}/metrics", d.api);
    let res = ureq::get(&url).set("Authorization", &format!("Bearer {}", d.key())).call().unwrap();
    assert!(res.content_type().contains("openmetrics"), "{}", res.content_type());
    let text = res.into_string().unwrap();
    // two writes, each counted once however many pieces it came in (a piece the engine declines splits one in
    // two at most)
    let requests = sample(&text, "blockmesh_nbd_requests_total{op=\"write\"}");
    assert!((2.0..=3.0).contains(&requests), "write requests: {requests}");
    assert_eq!(sample(&text, "blockmesh_nbd_bytes_total{op=\"write\"}"), f64::from((1 << 20) + (64 << 10)));
    assert!(sample(&text, "blockmesh_nbd_bytes_total{op=\"read\"}") >= f64::from(1 << 20));
    assert!(sample(&text, "blockmesh_nbd_requests_total{op=\"flush\"}") >= 1.0);
    let writes = sample(&text, "blockmesh_nbd_request_duration_seconds_count{op=\"write\"}");
    assert_eq!(writes, sample(&text, "blockmesh_nbd_requests_total{op=\"write\"}"));
    assert!(sample(&text, "blockmesh_nbd_request_duration_seconds_bucket{le=\"+Inf\",op=\"write\"}") >= writes);
    assert_eq!(sample(&text, "blockmesh_nbd_connections"), 0.0, "qemu-io has gone");
    let size = sample(&text, "blockmesh_pool_size_bytes");
    assert!(size > 0.9 * f64::from(1u32 << 30) && size <= f64::from(1u32 << 30), "the 1 GiB pool file: {size}");
    assert_eq!(sample(&text, "blockmesh_pool_dots"), 1.0);
    // an almost empty pool: nothing for the background cleaner to do
    assert_eq!(sample(&text, "blockmesh_pool_background_clean_steps"), 0.0);
    assert_eq!(sample(&text, "blockmesh_pool_emptied_segments"), 0.0);
    assert_eq!(sample(&text, "blockmesh_pool_emptied_segment_syncs"), 0.0);
    // the 1 MiB write's log batches (two of 512 KiB, three where a segment ends among them) went past the page
    // cache; the 64 KiB write's did not
    let uncached = sample(&text, "blockmesh_pool_uncached_batches");
    assert!((1.0..=3.0).contains(&uncached), "uncached batches: {uncached}");
    // registered-buffer log writes: as many as the API says (the pool is idle), at most one per log write (a few
    // batches and the flush's); none where the ring may not pin its buffers
    let fixed = sample(&text, "blockmesh_pool_fixed_buffer_writes");
    let st: blockmesh::api::PoolStatus = d.json(&["pool", "status"]);
    assert_eq!(fixed, st.fixed_buffer_writes as f64, "metrics and API agree");
    assert!(fixed <= 16.0, "fixed-buffer writes: {fixed}");
    // 1 MiB written: far from what the background thread syncs on its own
    assert_eq!(sample(&text, "blockmesh_pool_background_log_syncs"), 0.0);
    // space, as `blockmesh list` shows it
    let written = f64::from((1 << 20) + (64 << 10));
    assert_eq!(sample(&text, "blockmesh_dot_written_bytes{dot=\"admin/db\"}"), written);
    assert_eq!(sample(&text, "blockmesh_dot_logical_bytes{dot=\"admin/db\"}"), f64::from(64 << 20));
    assert_eq!(sample(&text, "blockmesh_pool_written_bytes"), written);
    assert_eq!(sample(&text, "blockmesh_pool_commits_only_bytes"), 0.0);
    assert!(sample(&text, "blockmesh_pool_used_bytes") >= f64::from((1 << 20) + (64 << 10)));
    // the cleaner on demand: overwrites leave dead blocks that it gives back
    qemu_ok(&uri, &["write -P 9 0 1M", "write -P 10 0 1M", "flush"]);
    let g: blockmesh::api::GcResult = d.json(&["pool", "gc"]);
    let status: blockmesh::api::PoolStatus = d.json(&["pool", "status"]);
    assert!(g.free_bytes > 0 && status.free_bytes == g.free_bytes, "{g:?} {status:?}");
    assert!(status.clean_target_free_segments > 0 && status.clean_target_free_segments < status.segments, "{status:?}");
    assert!(d.ok(&["pool", "status"]).contains("reclaimable"));
    qemu_ok(&uri, &["read -P 10 0 1M", "read -P 8 4M 64k"]);
    let scrub: blockmesh::api::ScrubResult = d.json(&["pool", "scrub"]);
    assert!(scrub.bad.is_empty() && scrub.blocks_checked >= 256 + 16, "{scrub:?}");
    assert!(d.ok(&["pool", "scrub"]).contains(", 0 bad"));
    // the key is needed, as everywhere on the control API (its health route too)
    for path in ["/metrics", "/healthz"] {
        match ureq::get(&format!("{}{path}", d.api)).call() {
            Err(ureq::Error::Status(401, _)) => {}
            other => panic!("{path} without the key: {other:?}"),
        }
    }
    // the health endpoint, on its own listener, needs none and serves nothing else
    let health_url = d.health.clone().expect("--health-listen prints the health endpoint");
    let health = ureq::get(&health_url).call().unwrap();
    assert_eq!(health.status(), 200);
    let body = health.into_string().unwrap();
    assert!(body.contains("serving") && !body.contains(&d.nbd), "the health route says no more than that: {body}");
    let base = health_url.trim_end_matches(blockmesh::api::HEALTH_PATH);
    for path in ["/metrics", "/v1/info", "/v1/dots", "/healthz/x"] {
        match ureq::get(&format!("{base}{path}")).set("Authorization", &format!("Bearer {}", d.key())).call() {
            Err(ureq::Error::Status(404, _)) => {}
            other => panic!("{path} on the health endpoint: {other:?}"),
        }
    }
}
