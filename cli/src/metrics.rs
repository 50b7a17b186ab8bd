//! Prometheus metrics of the daemon, served at `GET /metrics` (OpenMetrics text; the API key is needed, as for every
//! route: in Prometheus, `authorization: { credentials_file: DATA_DIR/api-key }`).
//!
//! - `blockmesh_nbd_requests_total{op}`, `blockmesh_nbd_errors_total{op}`, `blockmesh_nbd_bytes_total{op}`: NBD
//!   requests the engine served (op: read, write, trim, write_zeroes, flush, cache, block_status), those that failed,
//!   and bytes moved (read and write; trim and write_zeroes count the range);
//! - `blockmesh_nbd_request_duration_seconds{op}`: how long the engine took, a histogram from 10 us to about 5 s;
//! - `blockmesh_nbd_connections`: exports open (one per NBD connection);
//! - per volume (labels `dot`, `subdot`; a plain volume has an empty `dot`), for the volumes served since the daemon
//!   started (a deleted dot's go): `blockmesh_volume_requests_total{op}` and `blockmesh_volume_bytes_total{op}` (op:
//!   read, write, other; write counts trims and write-zeroes, other flushes and block status),
//!   `blockmesh_volume_request_duration_seconds{op}` (engine time, as above), and from its QoS
//!   `blockmesh_volume_throttled_seconds_total` and `blockmesh_volume_throttled_requests_total` (time requests waited
//!   for the volume's limits, and how many waited);
//! - `blockmesh_pool_*`: the pool's size, used bytes, segments, dots, volumes, commit snapshots, blocks written since
//!   start, index memory, background cleaner steps; read when scraped;
//! - space (as `blockmesh list` and `pool status` show it): `blockmesh_pool_logical_bytes`,
//!   `blockmesh_pool_written_bytes`, `blockmesh_pool_commits_only_bytes`, and per dot `blockmesh_dot_logical_bytes`,
//!   `blockmesh_dot_written_bytes`, `blockmesh_dot_commits_only_bytes` (label `dot`); these need a walk of every tree,
//!   so a scrape reuses the last walk when it is younger than [`SPACE_REFRESH_INTERVAL`].

use std::collections::HashSet;
use std::time::{Duration, Instant};

use blockmesh_engine::Pool;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::qos::QosRegistry;

/// How old the space figures of a scrape may be (they cost a walk of every volume's and commit's tree).
pub const SPACE_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DotLabels {
    dot: String,
}

/// Space gauges, with the walk they were last set from.
#[derive(Default)]
struct SpaceGauges {
    logical: Gauge,
    written: Gauge,
    commits_only: Gauge,
    dot_logical: Family<DotLabels, Gauge>,
    dot_written: Family<DotLabels, Gauge>,
    dot_commits_only: Family<DotLabels, Gauge>,
    walked: parking_lot::Mutex<Option<Instant>>,
}

/// Buckets of the request duration histogram: 10 us doubling 20 times (to about 5 s).
const LATENCY_BUCKET_START_SECONDS: f64 = 1e-5;
const LATENCY_BUCKETS: u16 = 20;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    dot: String,
    subdot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeOpLabels {
    dot: String,
    subdot: String,
    op: &'static str,
}

/// The `op` label of per-volume metrics.
const VOLUME_OP_CLASSES: [&str; 3] = ["read", "write", "other"];

fn volume_class(op: NbdOp) -> usize {
    match op {
        NbdOp::Read | NbdOp::Cache => 0,
        NbdOp::Write | NbdOp::Trim | NbdOp::WriteZeroes => 1,
        NbdOp::Flush | NbdOp::BlockStatus => 2,
    }
}

type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Per-volume families.
struct VolumeFamilies {
    requests: Family<VolumeOpLabels, Counter>,
    bytes: Family<VolumeOpLabels, Counter>,
    latency: LatencyFamily<VolumeOpLabels>,
    throttled_seconds: Family<VolumeLabels, Counter<f64>>,
    throttled_requests: Family<VolumeLabels, Counter>,
    /// Volumes with series, to drop a deleted dot's.
    known: parking_lot::Mutex<HashSet<(String, String)>>,
}

/// One volume's per-volume metrics, looked up once per connection.
#[derive(Debug, Clone)]
pub struct VolumeMetrics {
    classes: Vec<(Counter, Counter, Histogram)>,
}

impl VolumeMetrics {
    /// Counts one request of this volume that took `elapsed`.
    pub fn request(&self, op: NbdOp, bytes: u64, elapsed: Duration) {
        let (requests, b, latency) = &self.classes[volume_class(op)];
        requests.inc();
        if bytes > 0 {
            b.inc_by(bytes);
        }
        latency.observe(elapsed.as_secs_f64());
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(LATENCY_BUCKET_START_SECONDS, 2.0, LATENCY_BUCKETS))
}

/// The pool's figures, set when scraped.
#[derive(Default)]
struct PoolGauges {
    size_bytes: Gauge,
    used_bytes: Gauge,
    segments: Gauge,
    free_segments: Gauge,
    dots: Gauge,
    volumes: Gauge,
    snapshots: Gauge,
    blocks_written: Gauge,
    index_memory_bytes: Gauge,
    background_clean_steps: Gauge,
    emptied_segments: Gauge,
    emptied_segment_syncs: Gauge,
    uncached_batches: Gauge,
    fixed_buffer_writes: Gauge,
    background_log_syncs: Gauge,
}

/// The NBD operations counted (the `op` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdOp {
    Read,
    Write,
    Trim,
    WriteZeroes,
    Flush,
    Cache,
    BlockStatus,
}

impl NbdOp {
    const ALL: [NbdOp; 7] =
        [NbdOp::Read, NbdOp::Write, NbdOp::Trim, NbdOp::WriteZeroes, NbdOp::Flush, NbdOp::Cache, NbdOp::BlockStatus];

    fn label(self) -> &'static str {
        match self {
            NbdOp::Read => "read",
            NbdOp::Write => "write",
            NbdOp::Trim => "trim",
            NbdOp::WriteZeroes => "write_zeroes",
            NbdOp::Flush => "flush",
            NbdOp::Cache => "cache",
            NbdOp::BlockStatus => "block_status",
        }
    }
}

/// One operation's metrics, looked up once (a request then touches only atomics).
struct OpMetrics {
    requests: Counter,
    errors: Counter,
    bytes: Counter,
    latency: Histogram,
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    ops: Vec<OpMetrics>,
    connections: Gauge,
    pool: PoolGauges,
    volumes: VolumeFamilies,
    space: SpaceGauges,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OpLabels, Counter>::default();
        let errors = Family::<OpLabels, Counter>::default();
        let bytes = Family::<OpLabels, Counter>::default();
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let connections = Gauge::default();
        registry.register("blockmesh_nbd_requests", "NBD requests served by the engine", requests.clone());
        registry.register("blockmesh_nbd_errors", "NBD requests that failed in the engine", errors.clone());
        registry.register_with_unit(
            "blockmesh_nbd",
            "Bytes read, written, trimmed or zeroed over NBD",
            Unit::Bytes,
            bytes.clone(),
        );
        registry.register_with_unit(
            "blockmesh_nbd_request_duration",
            "Time the engine took for an NBD request",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register("blockmesh_nbd_connections", "Open NBD exports (one per connection)", connections.clone());
        let pool = PoolGauges::default();
        let gauges: [(&str, &str, &Gauge); 15] = [
            ("blockmesh_pool_size_bytes", "Size of the pool", &pool.size_bytes),
            ("blockmesh_pool_used_bytes", "Bytes of blocks that volumes, commits and metadata hold", &pool.used_bytes),
            ("blockmesh_pool_segments", "Segments of the pool", &pool.segments),
            ("blockmesh_pool_free_segments", "Segments free for the log", &pool.free_segments),
            ("blockmesh_pool_dots", "Dots", &pool.dots),
            ("blockmesh_pool_volumes", "Volumes (branch heads and plain volumes)", &pool.volumes),
            ("blockmesh_pool_snapshots", "Snapshots (commits of subdots)", &pool.snapshots),
            (
                "blockmesh_pool_blocks_written",
                "Blocks written to the device since the pool was opened",
                &pool.blocks_written,
            ),
            ("blockmesh_pool_index_memory_bytes", "Memory the index uses", &pool.index_memory_bytes),
            (
                "blockmesh_pool_background_clean_steps",
                "Steps the background cleaner took since the pool was opened",
                &pool.background_clean_steps,
            ),
            (
                "blockmesh_pool_emptied_segments",
                "Free segments the cleaner emptied that wait for a sync before the log writes over them",
                &pool.emptied_segments,
            ),
            (
                "blockmesh_pool_emptied_segment_syncs",
                "Syncs the log took itself to write over emptied segments since the pool was opened",
                &pool.emptied_segment_syncs,
            ),
            (
                "blockmesh_pool_uncached_batches",
                "Log batches of large writes written past the page cache since the pool was opened",
                &pool.uncached_batches,
            ),
            (
                "blockmesh_pool_fixed_buffer_writes",
                "Log writes from buffers registered with the io_uring writer's ring since the pool was opened",
                &pool.fixed_buffer_writes,
            ),
            (
                "blockmesh_pool_background_log_syncs",
                "Syncs of the log the background thread took outside the pool lock since the pool was opened",
                &pool.background_log_syncs,
            ),
        ];
        for (name, help, g) in gauges {
            registry.register(name, help, g.clone());
        }
        let ops = NbdOp::ALL
            .iter()
            .map(|op| {
                let l = OpLabels { op: op.label() };
                OpMetrics {
                    requests: requests.get_or_create(&l).clone(),
                    errors: errors.get_or_create(&l).clone(),
                    bytes: bytes.get_or_create(&l).clone(),
                    latency: latency.get_or_create(&l).clone(),
                }
            })
            .collect();
        let volumes = VolumeFamilies {
            requests: Family::default(),
            bytes: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            throttled_seconds: Family::default(),
            throttled_requests: Family::default(),
            known: Default::default(),
        };
        registry.register("blockmesh_volume_requests", "NBD requests served, per volume", volumes.requests.clone());
        registry.register_with_unit(
            "blockmesh_volume",
            "Bytes read or written (trims and write-zeroes: their range), per volume",
            Unit::Bytes,
            volumes.bytes.clone(),
        );
        registry.register_with_unit(
            "blockmesh_volume_request_duration",
            "Time the engine took for a request, per volume",
            Unit::Seconds,
            volumes.latency.clone(),
        );
        registry.register_with_unit(
            "blockmesh_volume_throttled",
            "Time requests waited for the volume's QoS limits",
            Unit::Seconds,
            volumes.throttled_seconds.clone(),
        );
        registry.register(
            "blockmesh_volume_throttled_requests",
            "Requests that waited for the volume's QoS limits",
            volumes.throttled_requests.clone(),
        );
        let space = SpaceGauges::default();
        let pool_space: [(&str, &str, &Gauge); 3] = [
            (
                "blockmesh_pool_logical_bytes",
                "The sizes of every dot's heads and plain volumes, added up",
                &space.logical,
            ),
            ("blockmesh_pool_written_bytes", "Data the heads and volumes map, each block once", &space.written),
            ("blockmesh_pool_commits_only_bytes", "Data only commits hold", &space.commits_only),
        ];
        for (name, help, g) in pool_space {
            registry.register(name, help, g.clone());
        }
        registry.register("blockmesh_dot_logical_bytes", "The sizes of a dot's heads", space.dot_logical.clone());
        registry.register("blockmesh_dot_written_bytes", "Data a dot's heads map", space.dot_written.clone());
        registry.register(
            "blockmesh_dot_commits_only_bytes",
            "Data only a dot's commits hold: what deleting them would give back",
            space.dot_commits_only.clone(),
        );
        Self { registry, ops, connections, pool, volumes, space }
    }

    /// The per-volume metrics of a subdot of a dot (`dot` empty: a plain volume).
    pub fn volume(&self, dot: &str, subdot: &str) -> VolumeMetrics {
        self.volumes.known.lock().insert((dot.to_string(), subdot.to_string()));
        let classes = VOLUME_OP_CLASSES
            .iter()
            .map(|op| {
                let l = VolumeOpLabels { dot: dot.to_string(), subdot: subdot.to_string(), op };
                (
                    self.volumes.requests.get_or_create(&l).clone(),
                    self.volumes.bytes.get_or_create(&l).clone(),
                    self.volumes.latency.get_or_create(&l).clone(),
                )
            })
            .collect();
        VolumeMetrics { classes }
    }

    /// Drops the series of a deleted dot's volumes.
    pub fn forget_dot(&self, dot: &str) {
        let v = &self.volumes;
        let mut known = v.known.lock();
        for (d, s) in known.iter().filter(|(d, _)| d == dot) {
            for op in VOLUME_OP_CLASSES {
                let l = VolumeOpLabels { dot: d.clone(), subdot: s.clone(), op };
                v.requests.remove(&l);
                v.bytes.remove(&l);
                v.latency.remove(&l);
            }
            let l = VolumeLabels { dot: d.clone(), subdot: s.clone() };
            v.throttled_seconds.remove(&l);
            v.throttled_requests.remove(&l);
        }
        known.retain(|(d, _)| d != dot);
    }

    /// Counts one NBD request the engine served: `op`, the bytes it covered, how long it took, whether it worked.
    pub fn request(&self, op: NbdOp, bytes: u64, elapsed: Duration, ok: bool) {
        // `ops` is built from `NbdOp::ALL`, in the enum's order
        let m = &self.ops[op as usize];
        m.requests.inc();
        if !ok {
            m.errors.inc();
        }
        if bytes > 0 {
            m.bytes.inc_by(bytes);
        }
        m.latency.observe(elapsed.as_secs_f64());
    }

    /// One more (or, with `-1`, one fewer) open export.
    pub fn connections_add(&self, n: i64) {
        self.connections.inc_by(n);
    }

    /// Sets the space gauges from a new walk, unless the last one is younger than [`SPACE_REFRESH_INTERVAL`].
    fn refresh_space(&self, pool: &Pool) {
        let sp = &self.space;
        let mut walked = sp.walked.lock();
        if walked.is_some_and(|at| at.elapsed() < SPACE_REFRESH_INTERVAL) {
            return;
        }
        let usage = match pool.usage() {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "space figures for /metrics");
                return;
            }
        };
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&sp.logical, usage.pool.logical_bytes);
        set(&sp.written, usage.pool.written_bytes);
        set(&sp.commits_only, usage.pool.commits_only_bytes);
        // deleted dots drop out
        sp.dot_logical.clear();
        sp.dot_written.clear();
        sp.dot_commits_only.clear();
        for d in &usage.dots {
            let l = DotLabels { dot: d.dot.clone() };
            set(&sp.dot_logical.get_or_create(&l), d.usage.logical_bytes);
            set(&sp.dot_written.get_or_create(&l), d.usage.written_bytes);
            set(&sp.dot_commits_only.get_or_create(&l), d.usage.commits_only_bytes);
        }
        *walked = Some(Instant::now());
    }

    /// Everything, as OpenMetrics text, with the pool's figures and the volumes' throttling read now.
    pub fn render(&self, pool: &Pool, qos: &QosRegistry) -> String {
        for (dot, subdot, q) in qos.volumes() {
            let l = VolumeLabels { dot, subdot };
            // counters only go up: add what accrued since the last scrape
            let seconds = self.volumes.throttled_seconds.get_or_create(&l);
            let delta = q.throttled().as_secs_f64() - seconds.get();
            if delta > 0.0 {
                seconds.inc_by(delta);
            }
            let requests = self.volumes.throttled_requests.get_or_create(&l);
            requests.inc_by(q.throttled_requests().saturating_sub(requests.get()));
        }
        let st = pool.stats();
        let p = &self.pool;
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&p.size_bytes, st.pool_size_bytes);
        set(&p.used_bytes, st.live_blocks.saturating_mul(blockmesh_engine::BLOCK_SIZE));
        set(&p.segments, st.segments);
        set(&p.free_segments, st.free_segments);
        set(&p.dots, st.dots);
        set(&p.volumes, st.volumes);
        set(&p.snapshots, st.snapshots);
        set(&p.blocks_written, st.blocks_written);
        set(&p.index_memory_bytes, st.index_memory_bytes);
        set(&p.background_clean_steps, st.background_clean_steps);
        set(&p.emptied_segments, st.emptied_segments);
        set(&p.emptied_segment_syncs, st.emptied_segment_syncs);
        set(&p.uncached_batches, st.uncached_batches);
        set(&p.fixed_buffer_writes, st.fixed_buffer_writes);
        set(&p.background_log_syncs, st.background_log_syncs);
        self.refresh_space(pool);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_show_up_as_counters_and_histograms() {
        let m = Metrics::new();
        let t = Instant::now();
        m.request(NbdOp::Read, 4096, t.elapsed(), true);
        m.request(NbdOp::Read, 4096, t.elapsed(), true);
        m.request(NbdOp::Write, 512, t.elapsed(), false);
        m.connections_add(2);
        m.connections_add(-1);
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::create_file(&dir.path().join("p"), 256 << 20, Default::default()).expect("pool");
        let qos = QosRegistry::new();
        pool.create_dot("admin/db", &[("__default__", 1 << 20)]).expect("dot");
        let v = m.volume("admin/db", "__default__");
        v.request(NbdOp::Write, 4096, t.elapsed());
        v.request(NbdOp::Trim, 8192, t.elapsed());
        v.request(NbdOp::Flush, 0, t.elapsed());
        let q = qos.for_volume(&pool, Some("admin/db"), "__default__");
        q.set_limits(blockmesh_nbd::Limits { iops: Some(1), burst_ms: 0, ..Default::default() });
        let now = Instant::now();
        q.reserve(blockmesh_nbd::Direction::Read, 1, 0, now);
        q.reserve(blockmesh_nbd::Direction::Read, 1, 0, now);
        let text = m.render(&pool, &qos);
        for line in [
            "blockmesh_nbd_requests_total{op=\"read\"} 2",
            "blockmesh_nbd_errors_total{op=\"write\"} 1",
            "blockmesh_nbd_bytes_total{op=\"read\"} 8192",
            "blockmesh_nbd_request_duration_seconds_count{op=\"write\"} 1",
            "blockmesh_nbd_connections 1",
            "blockmesh_pool_dots 1",
            "blockmesh_pool_logical_bytes 1048576",
            "blockmesh_dot_logical_bytes{dot=\"admin/db\"} 1048576",
            "blockmesh_dot_written_bytes{dot=\"admin/db\"} 0",
            "blockmesh_volume_requests_total{dot=\"admin/db\",subdot=\"__default__\",op=\"write\"} 2",
            "blockmesh_volume_bytes_total{dot=\"admin/db\",subdot=\"__default__\",op=\"write\"} 12288",
            "blockmesh_volume_request_duration_seconds_count{dot=\"admin/db\",subdot=\"__default__\",op=\"other\"} 1",
            "blockmesh_volume_throttled_seconds_total{dot=\"admin/db\",subdot=\"__default__\"} 1.0",
            "blockmesh_volume_throttled_requests_total{dot=\"admin/db\",subdot=\"__default__\"} 1",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // a second scrape does not count the same throttling twice
        assert!(m
            .render(&pool, &qos)
            .contains("blockmesh_volume_throttled_requests_total{dot=\"admin/db\",subdot=\"__default__\"} 1"));
        m.forget_dot("admin/db");
        qos.forget_dot("admin/db");
        let text = m.render(&pool, &qos);
        assert!(!text.lines().any(|l| l.starts_with("blockmesh_volume") && l.contains("admin/db")), "{text}");
    }
}
