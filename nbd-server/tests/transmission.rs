//! Commands, error replies and concurrency, driven over an in-process duplex pipe with a raw client.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockmesh_nbd::proto::*;
use blockmesh_nbd::*;
use common::*;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31).wrapping_add(i as u8)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_write_read_flush_trim_zeroes() {
    let (mut c, task) = pipe(&server());
    let (size, _) = c.open("disk", false).await;
    assert_eq!(size, 64 << 20);
    let data = pattern(1, 256 << 10);
    assert_eq!(c.simple(CMD_FLAG_FUA, CMD_WRITE, 1 << 20, data.len() as u32, &data).await, 0);
    c.request(0, CMD_READ, 9, 1 << 20, data.len() as u32, &[]).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 9, errno: 0 });
    assert_eq!(c.read_data(data.len()).await, data);
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0, &[]).await, 0);
    assert_eq!(c.simple(0, CMD_TRIM, 1 << 20, 4096, &[]).await, 0);
    assert_eq!(c.simple(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, (1 << 20) + 8192, 4096, &[]).await, 0);
    assert_eq!(c.simple(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, (1 << 20) + 12288, 4096, &[]).await, 0);
    assert_eq!(c.simple(0, CMD_CACHE, 0, 1 << 20, &[]).await, 0);
    c.request(0, CMD_READ, 10, 1 << 20, 16384, &[]).await;
    c.reply().await;
    let got = c.read_data(16384).await;
    assert!(got[..4096].iter().all(|&b| b == 0), "trimmed block reads as zeroes");
    assert_eq!(got[4096..8192], data[4096..8192]);
    assert!(got[8192..].iter().all(|&b| b == 0), "zeroed blocks read as zeroes");
    // Unaligned byte-granular I/O on an export with minimum block size 1.
    assert_eq!(c.simple(0, CMD_WRITE, 3, 5, b"hello").await, 0);
    c.request(0, CMD_READ, 11, 0, 10, &[]).await;
    c.reply().await;
    assert_eq!(c.read_data(10).await, b"\0\0\0hello\0\0");
    c.request(0, CMD_DISC, 12, 0, 0, &[]).await;
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_protocols_errors_and_the_connection_stays_usable() {
    let (mut c, _task) = pipe(&server());
    let (size, _) = c.open("aligned", false).await;
    let end = size;
    // Past the end: writes ENOSPC, reads EINVAL; overflowing offsets too.
    assert_eq!(c.simple(0, CMD_WRITE, end - 512, 1024, &[7; 1024]).await, ENOSPC);
    assert_eq!(c.simple(0, CMD_WRITE_ZEROES, end, 512, &[]).await, ENOSPC);
    assert_eq!(c.simple(0, CMD_TRIM, end, 512, &[]).await, EINVAL);
    assert_eq!(c.simple(0, CMD_CACHE, u64::MAX - 100, 512, &[]).await, EINVAL);
    c.request(0, CMD_READ, 3, end, 512, &[]).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 3, errno: EINVAL });
    // Misaligned below the 512-byte minimum.
    assert_eq!(c.simple(0, CMD_WRITE, 100, 512, &[1; 512]).await, EINVAL);
    assert_eq!(c.simple(0, CMD_TRIM, 0, 100, &[]).await, EINVAL);
    // Larger than the maximum (1 MiB for this export): refused, the payload skipped.
    let big = vec![9u8; (1 << 20) + 512];
    assert_eq!(c.simple(0, CMD_WRITE, 0, big.len() as u32, &big).await, EINVAL);
    c.request(0, CMD_READ, 4, 0, (1 << 20) + 512, &[]).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 4, errno: EINVAL });
    // Unknown command, unknown flag, a flag for another command, DF without structured replies.
    assert_eq!(c.simple(0, 42, 0, 0, &[]).await, EINVAL);
    assert_eq!(c.simple(1 << 9, CMD_FLUSH, 0, 0, &[]).await, EINVAL);
    assert_eq!(c.simple(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 512, &[1; 512]).await, EINVAL);
    c.request(CMD_FLAG_DF, CMD_READ, 5, 0, 512, &[]).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 5, errno: EINVAL });
    // Block status without a negotiated context.
    assert_eq!(c.simple(0, CMD_BLOCK_STATUS, 0, 512, &[]).await, EINVAL);
    // FAST_ZERO on an export that cannot zero fast.
    assert_eq!(c.simple(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 512, &[]).await, ENOTSUP);
    // Still usable, and nothing was written by the refused requests.
    assert_eq!(c.simple(0, CMD_WRITE, 512, 512, &[5; 512]).await, 0);
    c.request(0, CMD_READ, 6, 0, 1024, &[]).await;
    c.reply().await;
    let got = c.read_data(1024).await;
    assert!(got[..512].iter().all(|&b| b == 0));
    assert!(got[512..].iter().all(|&b| b == 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_exports_refuse_writes_with_eperm() {
    let (mut c, _task) = pipe(&server());
    let (_, flags) = c.open("ro", true).await;
    assert!(flags & FLAG_READ_ONLY != 0);
    assert_eq!(c.simple(0, CMD_WRITE, 0, 4096, &[1; 4096]).await, EPERM);
    assert_eq!(c.simple(0, CMD_TRIM, 0, 4096, &[]).await, EPERM);
    assert_eq!(c.simple(0, CMD_WRITE_ZEROES, 0, 4096, &[]).await, EPERM);
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0, &[]).await, 0);
    assert_eq!(c.read_structured(1, 0, 4096).await.unwrap(), vec![0xAB; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_send_holes_as_hole_chunks() {
    let (mut c, _task) = pipe(&server());
    c.open("disk", true).await;
    // Data at [64K, 128K) and [256K, 260K); the rest of [0, 512K) is a hole.
    let a = pattern(3, 64 << 10);
    let b = pattern(4, 4096);
    assert_eq!(c.simple(0, CMD_WRITE, 64 << 10, a.len() as u32, &a).await, 0);
    assert_eq!(c.simple(0, CMD_WRITE, 256 << 10, b.len() as u32, &b).await, 0);
    c.request(0, CMD_READ, 1, 0, 512 << 10, &[]).await;
    let chunks = c.chunks().await;
    let kinds: Vec<u16> = chunks.iter().map(|c| c.1).collect();
    assert_eq!(
        kinds,
        vec![
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE
        ]
    );
    assert!(chunks[..4].iter().all(|c| c.0 & REPLY_FLAG_DONE == 0));
    assert!(chunks[4].0 & REPLY_FLAG_DONE != 0);
    let mut want = vec![0u8; 512 << 10];
    want[64 << 10..128 << 10].copy_from_slice(&a);
    want[256 << 10..(256 << 10) + 4096].copy_from_slice(&b);
    assert_eq!(c.read_structured(2, 0, 512 << 10).await.unwrap(), want);
    // DF: one data chunk, holes as explicit zeroes.
    c.request(CMD_FLAG_DF, CMD_READ, 3, 0, 512 << 10, &[]).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&chunks[0].2[8..], &want[..]);
    // Structured errors are error chunks; a read past the end is EINVAL.
    assert_eq!(c.read_structured(4, 64 << 20, 4096).await, Err(EINVAL));
    // A zero-length read is one NONE chunk.
    c.request(0, CMD_READ, 5, 0, 0, &[]).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks, vec![(REPLY_FLAG_DONE, REPLY_TYPE_NONE, vec![])]);
    // DF over the maximum is EOVERFLOW (it cannot be sent in one chunk).
    c.request(CMD_FLAG_DF, CMD_READ, 6, 0, (32 << 20) + 4096, &[]).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks[0].1, REPLY_TYPE_ERROR);
    assert_eq!(u32::from_be_bytes(chunks[0].2[0..4].try_into().unwrap()), EOVERFLOW);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_reports_holes_zeroes_and_data() {
    let (mut c, _task) = pipe(&server());
    c.open("disk", true).await;
    assert_eq!(c.simple(0, CMD_WRITE, 8192, 4096, &[1; 4096]).await, 0);
    assert_eq!(c.simple(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 16384, 8192, &[]).await, 0);
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 1 << 20, &[]).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, REPLY_TYPE_BLOCK_STATUS);
    let (id, d) = descriptors(&chunks[0].2);
    assert_eq!(id, BASE_ALLOCATION_ID);
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(d, vec![(8192, hz), (4096, 0), (4096, hz), (8192, STATE_ZERO), ((1 << 20) - 24576, hz)]);
    // REQ_ONE: one descriptor; an unaligned start is fine at minimum block size 1.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 2, 100, 1 << 20, &[]).await;
    let (_, d) = descriptors(&c.chunks().await[0].2);
    assert_eq!(d, vec![(8092, hz)]);
    // Past the end, or zero length: EINVAL.
    assert_eq!(c.simple(0, CMD_BLOCK_STATUS, 64 << 20, 4096, &[]).await, EINVAL);
    assert_eq!(c.simple(0, CMD_BLOCK_STATUS, 0, 0, &[]).await, EINVAL);
    // Larger than the maximum payload is allowed for block status.
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 64 << 20, &[]).await;
    let (_, d) = descriptors(&c.chunks().await[0].2);
    assert_eq!(d.iter().map(|x| u64::from(x.0)).sum::<u64>(), 64 << 20);
}

/// An export whose reads of block 0 wait until a later request has been answered: proves requests run concurrently
/// and replies go out of order.
struct Gate {
    inner: MemoryExport,
    open: AtomicBool,
    disconnect: Disconnect,
}

impl Gate {
    fn new() -> Self {
        Self { inner: MemoryExport::new(1 << 20), open: AtomicBool::new(false), disconnect: Disconnect::new() }
    }
}

impl Export for Gate {
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
        if offset == 0 {
            let start = std::time::Instant::now();
            while !self.open.load(Ordering::SeqCst) {
                assert!(start.elapsed() < Duration::from_secs(20), "gate never opened: requests are serialised");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.inner.read(offset, buf)
    }
    /// Offset 0 is never at hand (its read waits for the gate); offset 12288 fails; the rest is in memory.
    fn try_read_now(&self, offset: u64, buf: &mut [u8]) -> ExportResult<bool> {
        match offset {
            0 => Ok(false),
            12288 => Err(ExportError::new(ErrorKind::Io, "injected")),
            _ => self.inner.try_read_now(offset, buf),
        }
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> ExportResult<()> {
        self.open.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
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
    fn disconnect_signal(&self) -> Option<Disconnect> {
        Some(self.disconnect.clone())
    }
}

/// The export's owner closes the connection: requests already read are answered, then the connection ends
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exports_owner_can_close_a_connection() {
    use tokio::io::AsyncReadExt;
    let gate = Arc::new(Gate::new());
    let map = Arc::new(ExportMap::new());
    map.insert("gate", gate.clone());
    let server = Server::new(map, ServerConfig::default()).unwrap();
    let (mut c, task) = pipe(&server);
    c.open("gate", false).await;
    assert_eq!(c.simple(0, CMD_WRITE, 4096, 4096, &[7; 4096]).await, 0);
    c.request(0, CMD_READ, 1, 0, 4096, &[]).await; // in flight until the gate opens
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.disconnect.trigger();
    assert!(gate.disconnect.is_triggered());
    gate.open.store(true, Ordering::SeqCst);
    assert_eq!(c.reply().await, Reply::Simple { cookie: 1, errno: 0 });
    c.read_data(4096).await;
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), c.s.read(&mut b)).await.expect("connection closes");
    assert_eq!(n.unwrap(), 0, "nothing after the last reply");
    task.await.unwrap().unwrap();
    // what was acknowledged stays
    let mut back = [0u8; 4096];
    gate.inner.read(4096, &mut back).unwrap();
    assert_eq!(back, [7; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_connection_run_concurrently_and_reply_out_of_order() {
    let map = Arc::new(ExportMap::new());
    map.insert("gate", Arc::new(Gate::new()));
    let server = Server::new(map, ServerConfig::default()).unwrap();
    let (mut c, _task) = pipe(&server);
    c.open("gate", false).await;
    c.request(0, CMD_READ, 1, 0, 4096, &[]).await; // blocks until the flush
    c.request(0, CMD_WRITE, 2, 4096, 4096, &[3; 4096]).await;
    c.request(0, CMD_FLUSH, 3, 0, 0, &[]).await; // opens the gate
    let mut order = Vec::new();
    for _ in 0..3 {
        let r = c.reply().await;
        if r.cookie() == 1 {
            c.read_data(4096).await;
        }
        order.push(r.cookie());
    }
    assert_eq!(order.last(), Some(&1), "the blocked read is answered last: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_are_answered_at_once_while_a_slow_read_waits() {
    for structured in [false, true] {
        let inner = MemoryExport::new(1 << 20);
        inner.write(8192, &pattern(7, 4096), false).unwrap();
        let map = Arc::new(ExportMap::new());
        map.insert("gate", Arc::new(Gate { inner, ..Gate::new() }));
        let server = Server::new(map, ServerConfig::default()).unwrap();
        let (mut c, _task) = pipe(&server);
        c.open("gate", structured).await;
        c.request(0, CMD_READ, 1, 0, 4096, &[]).await; // not at hand: waits for the gate on a blocking thread
        c.request(0, CMD_READ, 2, 8192, 4096, &[]).await; // at hand: answered on the event loop
        c.request(0, CMD_READ, 3, 12288, 4096, &[]).await; // the no-wait read fails: its error is the reply
                                                           // 2 and 3 are answered while 1 still waits (the gate opens only with the flush below).
        let mut got = Vec::new();
        for _ in 0..2 {
            match c.reply().await {
                Reply::Simple { cookie, errno: 0 } => got.push((cookie, 0, c.read_data(4096).await)),
                Reply::Simple { cookie, errno } => got.push((cookie, errno, Vec::new())),
                Reply::Chunk { cookie, flags, kind: REPLY_TYPE_OFFSET_DATA, payload } => {
                    assert_ne!(flags & REPLY_FLAG_DONE, 0, "one chunk");
                    assert_eq!(payload[..8], 8192u64.to_be_bytes());
                    got.push((cookie, 0, payload[8..].to_vec()));
                }
                Reply::Chunk { cookie, kind: REPLY_TYPE_ERROR, payload, .. } => {
                    got.push((cookie, u32::from_be_bytes(payload[0..4].try_into().unwrap()), Vec::new()))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        got.sort();
        assert_eq!(got, vec![(2, 0, pattern(7, 4096)), (3, EIO, Vec::new())], "structured: {structured}");
        c.request(0, CMD_FLUSH, 4, 0, 0, &[]).await;
        let mut rest = Vec::new();
        for _ in 0..2 {
            let r = c.reply().await;
            if r.cookie() == 1 {
                if let Reply::Simple { .. } = r {
                    assert_eq!(c.read_data(4096).await, vec![0; 4096]);
                }
            }
            rest.push(r.cookie());
        }
        rest.sort();
        assert_eq!(rest, vec![1, 4]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_are_all_answered_once() {
    let (mut c, _task) = pipe(&server());
    c.open("disk", true).await;
    // More requests than the in-flight bound, written before reading any reply.
    let n = (MAX_INFLIGHT_REQUESTS * 3) as u64;
    let writer = async {
        for i in 0..n {
            let data = pattern(i as u8, 4096);
            c.request(0, CMD_WRITE, i, i * 4096, 4096, &data).await;
        }
        c
    };
    // The server stops reading at the in-flight bound until replies are written; 16-byte replies fit the pipe.
    let mut c = tokio::time::timeout(Duration::from_secs(30), writer).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        match c.reply().await {
            Reply::Simple { cookie, errno: 0 } => assert!(seen.insert(cookie), "cookie {cookie} answered twice"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen.len() as u64, n);
    for i in [0, n / 2, n - 1] {
        assert_eq!(c.read_structured(1000 + i, i * 4096, 4096).await.unwrap(), pattern(i as u8, 4096));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_request_loses_nothing_acknowledged() {
    let exports = exports();
    let server = Server::new(exports.clone(), ServerConfig::default()).unwrap();
    let (mut c, task) = pipe(&server);
    c.open("disk", false).await;
    let data = pattern(9, 8192);
    assert_eq!(c.simple(0, CMD_WRITE, 0, 8192, &data).await, 0);
    // Half a write request: header and part of the payload, then gone.
    c.request(0, CMD_WRITE, 2, 0, 8192, &[0xFF; 100]).await;
    drop(c);
    let r = task.await.unwrap();
    assert!(r.is_err(), "a torn request ends the connection with an error");
    let (mut c, _task) = pipe(&server);
    c.open("disk", true).await;
    assert_eq!(c.read_structured(1, 0, 8192).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_transmission_closes_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut c, task) = pipe(&server());
    c.open("disk", false).await;
    c.s.write_all(&[0x55; 28]).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
    assert!(matches!(task.await.unwrap(), Err(blockmesh_nbd::Error::Protocol(_))));
}

/// An export that counts which path each write took: `try_write_now` (declining while `decline` is set, failing
/// at offset 12288) or `write`.
#[derive(Default)]
struct WriteNow {
    inner: Option<MemoryExport>,
    now: std::sync::atomic::AtomicU64,
    blocking: std::sync::atomic::AtomicU64,
    decline: AtomicBool,
}

impl WriteNow {
    fn mem(&self) -> &MemoryExport {
        self.inner.as_ref().unwrap()
    }
    fn counts(&self) -> (u64, u64) {
        (self.now.load(Ordering::SeqCst), self.blocking.load(Ordering::SeqCst))
    }
}

impl Export for WriteNow {
    fn size_bytes(&self) -> u64 {
        self.mem().size_bytes()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.mem().read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.blocking.fetch_add(1, Ordering::SeqCst);
        self.mem().write(offset, data, fua)
    }
    fn try_write_now(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<bool> {
        if offset == 12288 {
            return Err(ExportError::new(ErrorKind::NoSpace, "injected"));
        }
        if self.decline.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let done = self.mem().try_write_now(offset, data, fua)?;
        if done {
            self.now.fetch_add(1, Ordering::SeqCst);
        }
        Ok(done)
    }
    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.mem().trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.mem().write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.mem().cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        self.mem().extents(offset, len)
    }
}

/// Short writes the export takes at once are answered from the event loop; longer ones, and those it declines,
/// go to `write`; a failure of the attempt is the write's error reply. Every byte lands either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_writes_the_export_takes_at_once_skip_the_blocking_pool() {
    for fair_slots in [None, Some(2)] {
        let export = Arc::new(WriteNow { inner: Some(MemoryExport::new(4 << 20)), ..WriteNow::default() });
        let map = Arc::new(ExportMap::new());
        map.insert("w", export.clone());
        let server = Server::new(map, ServerConfig { fair_slots, ..ServerConfig::default() }).unwrap();
        let (mut c, _task) = pipe(&server);
        c.open("w", true).await;
        let short = pattern(1, 4096);
        assert_eq!(c.simple(0, CMD_WRITE, 0, 4096, &short).await, 0);
        let limit = pattern(2, INLINE_WRITE_MAX_BYTES as usize);
        assert_eq!(c.simple(CMD_FLAG_FUA, CMD_WRITE, 65536, INLINE_WRITE_MAX_BYTES, &limit).await, 0);
        assert_eq!(export.counts(), (2, 0), "up to the limit: at once");
        let long = pattern(3, INLINE_WRITE_MAX_BYTES as usize + 4096);
        assert_eq!(c.simple(0, CMD_WRITE, 2 << 20, long.len() as u32, &long).await, 0);
        assert_eq!(export.counts(), (2, 1), "past the limit: the blocking pool");
        export.decline.store(true, Ordering::SeqCst);
        let declined = pattern(4, 8192);
        assert_eq!(c.simple(0, CMD_WRITE, 4096, 8192, &declined).await, 0);
        assert_eq!(export.counts(), (2, 2), "declined: the blocking pool");
        assert_eq!(c.simple(0, CMD_WRITE, 12288, 4096, &short).await, ENOSPC, "the attempt's error");
        assert_eq!(export.counts(), (2, 2), "a failed attempt is not tried again");
        for (offset, data) in [(0u64, &short), (4096, &declined), (65536, &limit), (2 << 20, &long)] {
            assert_eq!(&c.read_structured(9, offset, data.len() as u32).await.unwrap(), data, "at {offset}");
        }
    }
}
