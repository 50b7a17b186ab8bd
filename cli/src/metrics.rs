//! Prometheus metrics of the daemon, served at `GET /metrics` (OpenMetrics text; the API key is needed, as for every
//! route: in Prometheus, `authorization: { credentials_file: DATA_DIR/api-key }`).
//!
//! - `blockmesh_nbd_requests_total{op}`, `blockmesh_nbd_errors_total{op}`, `blockmesh_nbd_bytes_total{op}`: NBD
//!   requests the engine served (op: read, write, trim, write_zeroes, flush, cache, block_status), those that failed,
//!   and bytes moved (read and write; trim and write_zeroes count the range);
//! - `blockmesh_nbd_request_duration_seconds{op}`: how long the engine took, a histogram from 10 us to about 5 s;
//! - `blockmesh_nbd_connections`: exports open (one per NBD connection);
//! - `blockmesh_pool_*`: the pool's size, used bytes, segments, dots, volumes, commit snapshots, blocks written since
//!   start, index memory; read when scraped.

use std::time::Instant;

use blockmesh_engine::Pool;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Buckets of the request duration histogram: 10 us doubling 20 times (to about 5 s).
const LATENCY_BUCKET_START_SECONDS: f64 = 1e-5;
const LATENCY_BUCKETS: u16 = 20;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
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
        let gauges: [(&str, &str, &Gauge); 9] = [
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
        Self { registry, ops, connections, pool }
    }

    /// Counts one NBD request the engine served: `op`, the bytes it covered, when it started, whether it worked.
    pub fn request(&self, op: NbdOp, bytes: u64, started: Instant, ok: bool) {
        // `ops` is built from `NbdOp::ALL`, in the enum's order
        let m = &self.ops[op as usize];
        m.requests.inc();
        if !ok {
            m.errors.inc();
        }
        if bytes > 0 {
            m.bytes.inc_by(bytes);
        }
        m.latency.observe(started.elapsed().as_secs_f64());
    }

    /// One more (or, with `-1`, one fewer) open export.
    pub fn connections_add(&self, n: i64) {
        self.connections.inc_by(n);
    }

    /// Everything, as OpenMetrics text, with the pool's figures read now.
    pub fn render(&self, pool: &Pool) -> String {
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
        m.request(NbdOp::Read, 4096, t, true);
        m.request(NbdOp::Read, 4096, t, true);
        m.request(NbdOp::Write, 512, t, false);
        m.connections_add(2);
        m.connections_add(-1);
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::create_file(&dir.path().join("p"), 256 << 20, Default::default()).expect("pool");
        let text = m.render(&pool);
        for line in [
            "blockmesh_nbd_requests_total{op=\"read\"} 2",
            "blockmesh_nbd_errors_total{op=\"write\"} 1",
            "blockmesh_nbd_bytes_total{op=\"read\"} 8192",
            "blockmesh_nbd_request_duration_seconds_count{op=\"write\"} 1",
            "blockmesh_nbd_connections 1",
            "blockmesh_pool_dots 0",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
