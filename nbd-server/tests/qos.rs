//! Quality of service through the protocol: an export's limits pace a pipelining client (and every connection to the
//! export together), free requests (flush, block status) are not charged, requests reach the export in the order the
//! client sent them, and the fair queue serves an idle export at once while a busy one keeps the backend full (the
//! order of a contended queue is tested in the qos module's unit tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockmesh_nbd::proto::*;
use blockmesh_nbd::*;
use common::*;
use parking_lot::Mutex;

/// A memory export with QoS that records the order in which requests reach it, and can be slowed down.
struct Recorded {
    inner: MemoryExport,
    qos: Arc<Qos>,
    seen: Mutex<Vec<(u16, u64)>>,
    delay: Duration,
}

impl Recorded {
    fn new(limits: Limits, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryExport::new(16 << 20),
            qos: Arc::new(Qos::new(limits)),
            seen: Mutex::default(),
            delay,
        })
    }
    fn note(&self, kind: u16, offset: u64) {
        self.seen.lock().push((kind, offset));
        std::thread::sleep(self.delay);
    }
}

impl Export for Recorded {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.note(CMD_READ, offset);
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.note(CMD_WRITE, offset);
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> ExportResult<()> {
        self.note(CMD_FLUSH, 0);
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.note(CMD_TRIM, offset);
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.inner.cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
    fn qos(&self) -> Option<Arc<Qos>> {
        Some(self.qos.clone())
    }
}

fn server_with(exports: &[(&str, Arc<Recorded>)], fair_slots: Option<usize>) -> Server {
    let map = Arc::new(ExportMap::new());
    for (name, e) in exports {
        map.insert(*name, e.clone() as Arc<dyn Export>);
    }
    Server::new(map, ServerConfig { fair_slots, ..ServerConfig::default() }).unwrap()
}

const WRITES: u64 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_iops_limit_paces_a_pipelining_client_in_order() {
    let e = Recorded::new(Limits { write_iops: Some(50), burst_ms: 0, ..Limits::default() }, Duration::ZERO);
    let server = server_with(&[("disk", e.clone())], Some(4));
    let (mut c, _task) = pipe(&server);
    c.open("disk", false).await;
    let started = Instant::now();
    // six writes, a flush and a read, all sent before any reply is read
    for i in 0..WRITES {
        c.request(0, CMD_WRITE, i, i * 4096, 4096, &[i as u8; 4096]).await;
    }
    c.request(0, CMD_FLUSH, 100, 0, 0, &[]).await;
    c.request(0, CMD_READ, 101, 0, 4096, &[]).await;
    let mut replies = Vec::new();
    for _ in 0..WRITES + 2 {
        let r = c.reply().await;
        if r.cookie() == 101 {
            assert_eq!(c.read_data(4096).await, vec![0u8; 4096]);
        }
        replies.push(r.cookie());
    }
    let elapsed = started.elapsed();
    // 50 writes a second without burst: the sixth starts 100 ms after the first; reads and flushes are free
    assert!(elapsed >= Duration::from_millis(95), "six writes at 50/s took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let seen = e.seen.lock().clone();
    let writes: Vec<u64> = seen.iter().filter(|(k, _)| *k == CMD_WRITE).map(|(_, o)| o / 4096).collect();
    assert_eq!(writes, (0..WRITES).collect::<Vec<_>>(), "writes reached the export in the client's order");
    // The flush was read only after the last write had waited out its turn, so every write but the last reached
    // the export before it (the last write and the flush then run concurrently, as the protocol allows for a flush
    // sent before the write's reply).
    let flush_at = seen.iter().position(|(k, _)| *k == CMD_FLUSH).unwrap();
    let writes_before_flush = seen[..flush_at].iter().filter(|(k, _)| *k == CMD_WRITE).count() as u64;
    assert!(writes_before_flush >= WRITES - 1, "the flush overtook throttled writes: {seen:?}");
    assert!(e.qos.throttled() >= Duration::from_millis(50), "{:?}", e.qos.throttled());
    assert_eq!(e.qos.throttled_requests(), WRITES - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_one_export_share_its_limits() {
    let e = Recorded::new(Limits { iops: Some(40), burst_ms: 0, ..Limits::default() }, Duration::ZERO);
    let server = server_with(&[("disk", e.clone())], None);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for conn in 0..2u64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let (mut c, _task) = pipe(&server);
            c.open("disk", false).await;
            for i in 0..4 {
                assert_eq!(c.simple(0, CMD_WRITE, (conn * 8 + i) * 4096, 4096, &[1; 4096]).await, 0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // eight requests at 40/s: the last starts 175 ms after the first, whichever connection sent it
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(170), "eight requests over two connections took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_export_is_served_while_a_busy_one_fills_the_backend() {
    let busy = Recorded::new(Limits::default(), Duration::from_millis(20));
    let idle = Recorded::new(Limits::default(), Duration::ZERO);
    let server = server_with(&[("busy", busy.clone()), ("idle", idle.clone())], Some(2));
    let (mut b, _t1) = pipe(&server);
    b.open("busy", false).await;
    // 40 slow writes (20 ms each) from one connection
    for i in 0..40u64 {
        b.request(0, CMD_WRITE, 1000 + i, i * 4096, 4096, &[2; 4096]).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (mut q, _t2) = pipe(&server);
    q.open("idle", false).await;
    let started = Instant::now();
    assert_eq!(q.simple(0, CMD_WRITE, 0, 4096, &[3; 4096]).await, 0);
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(150), "the idle export's write waited {waited:?} behind the busy one");
    for _ in 0..40 {
        b.reply().await;
    }
}
