//! Large writes taken piece by piece as their payload arrives (`Export::try_write_piece_now`): the pieces come in
//! order, on whole blocks, cover the write exactly and the reply waits for the last; a declined piece is offered
//! again with what arrived since, and what is still declined when the payload is all in goes down the usual path; a
//! failed one is the write's error reply and the connection stays in step; FUA,
//! short and unaligned writes are not streamed; exports that do not take pieces see whole writes as before.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockmesh_nbd::proto::*;
use blockmesh_nbd::*;
use common::*;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(17).wrapping_add((i / 4096) as u8).wrapping_add(i as u8)).collect()
}

/// One call the export saw: a piece `(write_offset, write_bytes, offset, len, is_last)` or a whole write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Piece { write_offset: u64, write_bytes: u64, offset: u64, len: u64, last: bool },
    Write { offset: u64, len: u64, fua: bool },
    Now { offset: u64, len: u64 },
}

/// A memory export that takes pieces and records every call; declines pieces at or past `decline_at` and the next
/// `decline_next` offers, fails the piece that starts at `fail_at`, and takes no pieces at all with `whole_only`.
struct Pieces {
    mem: MemoryExport,
    calls: Mutex<Vec<Call>>,
    decline_at: AtomicU64,
    decline_next: AtomicU64,
    fail_at: AtomicU64,
    whole_only: bool,
}

impl Pieces {
    fn new(whole_only: bool) -> Arc<Self> {
        Arc::new(Self {
            mem: MemoryExport::new(16 << 20),
            calls: Mutex::new(Vec::new()),
            decline_at: AtomicU64::new(u64::MAX),
            decline_next: AtomicU64::new(0),
            fail_at: AtomicU64::new(u64::MAX),
            whole_only,
        })
    }
    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock())
    }
}

impl Export for Pieces {
    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.calls.lock().push(Call::Write { offset, len: data.len() as u64, fua });
        self.mem.write(offset, data, fua)
    }
    fn try_write_now(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<bool> {
        let done = self.mem.try_write_now(offset, data, fua)?;
        if done {
            self.calls.lock().push(Call::Now { offset, len: data.len() as u64 });
        }
        Ok(done)
    }
    fn try_write_piece_now(&self, p: WritePiece<'_>) -> ExportResult<bool> {
        if self.whole_only || p.offset >= self.decline_at.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if self.decline_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Ok(false);
        }
        self.calls.lock().push(Call::Piece {
            write_offset: p.write_offset,
            write_bytes: p.write_bytes,
            offset: p.offset,
            len: p.data.len() as u64,
            last: p.is_last(),
        });
        if p.offset == self.fail_at.load(Ordering::SeqCst) {
            return Err(ExportError::new(ErrorKind::NoSpace, "injected"));
        }
        self.mem.write(p.offset, p.data, false)?;
        Ok(true)
    }
    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.mem.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.mem.write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.mem.cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        self.mem.extents(offset, len)
    }
}

fn serve(export: Arc<Pieces>, fair_slots: Option<usize>) -> Server {
    let map = Arc::new(ExportMap::new());
    map.insert("p", export);
    Server::new(map, ServerConfig { fair_slots, ..ServerConfig::default() }).unwrap()
}

/// Sends a write request whose payload trickles in: `step` bytes at a time with a pause between, so the server
/// has part of it while the rest is on its way.
async fn trickle(c: &mut Client<tokio::io::DuplexStream>, cookie: u64, offset: u64, data: &[u8], step: usize) {
    c.request(0, CMD_WRITE, cookie, offset, data.len() as u32, &[]).await;
    for part in data.chunks(step) {
        c.s.write_all(part).await.unwrap();
        c.s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The pieces of one write: in order, each starting where the one before ended, on whole blocks, none but the last
/// shorter than the minimum, the last marked, and together exactly the write.
fn assert_pieces_cover(calls: &[Call], write_offset: u64, write_bytes: u64) {
    assert!(calls.len() >= 2, "a trickled write comes in several pieces: {calls:?}");
    let mut at = write_offset;
    for (i, c) in calls.iter().enumerate() {
        let Call::Piece { write_offset: wo, write_bytes: wb, offset, len, last } = *c else {
            panic!("only pieces expected: {calls:?}")
        };
        assert_eq!((wo, wb), (write_offset, write_bytes), "every piece names its write");
        assert_eq!(offset, at, "piece {i} starts where the one before ended");
        assert_eq!(offset % 4096, 0, "piece {i} starts on a block");
        let is_last = i == calls.len() - 1;
        assert_eq!(last, is_last, "only the last piece ends the write");
        if !is_last {
            assert!(len >= STREAM_PIECE_MIN_BYTES as u64 && len % 4096 == 0, "piece {i}: {len} bytes");
        }
        at += len;
    }
    assert_eq!(at, write_offset + write_bytes, "the pieces cover the write exactly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_is_taken_piece_by_piece_as_it_arrives() {
    for fair_slots in [None, Some(2)] {
        let export = Pieces::new(false);
        let server = serve(export.clone(), fair_slots);
        let (mut c, _task) = pipe(&server);
        c.open("p", true).await;
        let data = pattern(1, 1 << 20);
        trickle(&mut c, 5, 3 << 20, &data, 100_000).await;
        assert_eq!(c.reply().await, Reply::Simple { cookie: 5, errno: 0 });
        assert_pieces_cover(&export.take_calls(), 3 << 20, 1 << 20);
        // sent in one go, through the pipe's back-pressure: pieces all the same
        let data2 = pattern(2, 2 << 20);
        assert_eq!(c.simple(0, CMD_WRITE, 8 << 20, data2.len() as u32, &data2).await, 0);
        let calls = export.take_calls();
        assert!(calls.iter().all(|c| matches!(c, Call::Piece { .. })), "{calls:?}");
        assert_eq!(c.read_structured(6, 3 << 20, 1 << 20).await.unwrap(), data);
        assert_eq!(c.read_structured(7, 8 << 20, 2 << 20).await.unwrap(), data2);
    }
}

/// A piece declined for a moment (a busy lock) is offered again, longer, once more has arrived: the write is still
/// taken whole in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_piece_is_offered_again_with_what_arrived_since() {
    let export = Pieces::new(false);
    let server = serve(export.clone(), None);
    let (mut c, _task) = pipe(&server);
    c.open("p", true).await;
    let data = pattern(14, 1 << 20);
    export.decline_next.store(2, Ordering::SeqCst);
    trickle(&mut c, 50, 2 << 20, &data, 70_000).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 50, errno: 0 });
    assert_eq!(export.decline_next.load(Ordering::SeqCst), 0, "both declines were used");
    let calls = export.take_calls();
    assert_pieces_cover(&calls, 2 << 20, 1 << 20);
    let Call::Piece { len: first, .. } = calls[0] else { unreachable!() };
    assert!(first >= 3 * (64 << 10), "the first piece taken holds what arrived while it was declined: {calls:?}");
    assert_eq!(c.read_structured(51, 2 << 20, 1 << 20).await.unwrap(), data);
}

/// Pieces still declined when the payload is all in: the rest of the write goes down the usual path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_declined_to_the_end_sends_the_rest_down_the_usual_path() {
    let export = Pieces::new(false);
    let server = serve(export.clone(), Some(2));
    let (mut c, _task) = pipe(&server);
    c.open("p", true).await;
    let (offset, len) = (1u64 << 20, 1usize << 20);
    // pieces from 300 KiB into the write on are declined: the rest goes as one write of its own
    export.decline_at.store(offset + (300 << 10), Ordering::SeqCst);
    let data = pattern(3, len);
    trickle(&mut c, 8, offset, &data, 64 << 10).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 8, errno: 0 });
    let calls = export.take_calls();
    let (pieces, rest): (Vec<Call>, Vec<Call>) = calls.iter().partition(|c| matches!(c, Call::Piece { .. }));
    assert!(!pieces.is_empty(), "the first pieces were taken: {calls:?}");
    let taken: u64 = pieces.iter().map(|c| if let Call::Piece { len, .. } = c { *len } else { 0 }).sum();
    assert!(taken >= 300 << 10, "every piece before the declined one was taken: {calls:?}");
    match rest.as_slice() {
        [Call::Now { offset: o, len: l }] | [Call::Write { offset: o, len: l, fua: false }] => {
            assert_eq!((*o, *l), (offset + taken, len as u64 - taken), "the rest, from the declined piece on")
        }
        other => panic!("the rest of the write as one call: {other:?}"),
    }
    assert_eq!(c.read_structured(9, offset, len as u32).await.unwrap(), data);
    // declined from its first piece: the whole write as before
    export.decline_at.store(0, Ordering::SeqCst);
    let data = pattern(4, len);
    trickle(&mut c, 10, offset, &data, 64 << 10).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 10, errno: 0 });
    assert_eq!(export.take_calls(), vec![Call::Now { offset, len: len as u64 }]);
    assert_eq!(c.read_structured(11, offset, len as u32).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_piece_is_the_writes_error_and_the_connection_stays_in_step() {
    let export = Pieces::new(false);
    let server = serve(export.clone(), None);
    let (mut c, _task) = pipe(&server);
    c.open("p", true).await;
    let data = pattern(5, 1 << 20);
    assert_eq!(c.simple(0, CMD_WRITE, 0, data.len() as u32, &data).await, 0);
    export.take_calls();
    // the first piece fails: no other piece is tried, the rest of the payload is read and dropped
    export.fail_at.store(4 << 20, Ordering::SeqCst);
    trickle(&mut c, 12, 4 << 20, &pattern(6, 1 << 20), 100_000).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 12, errno: ENOSPC });
    let calls = export.take_calls();
    assert_eq!(calls.len(), 1, "nothing after the failed piece: {calls:?}");
    // the next requests read and answer as usual
    let small = pattern(7, 8192);
    assert_eq!(c.simple(0, CMD_WRITE, 1 << 20, 8192, &small).await, 0);
    assert_eq!(c.read_structured(13, 0, 1 << 20).await.unwrap(), data, "earlier writes untouched");
    assert_eq!(c.read_structured(14, 1 << 20, 8192).await.unwrap(), small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_short_and_unaligned_writes_are_not_streamed() {
    let export = Pieces::new(false);
    let server = serve(export.clone(), None);
    let (mut c, _task) = pipe(&server);
    c.open("p", true).await;
    let big = pattern(8, 1 << 20);
    assert_eq!(c.simple(CMD_FLAG_FUA, CMD_WRITE, 0, big.len() as u32, &big).await, 0);
    let short = pattern(9, STREAM_WRITE_MIN_BYTES as usize - 4096);
    assert_eq!(c.simple(0, CMD_WRITE, 2 << 20, short.len() as u32, &short).await, 0);
    let odd = pattern(10, 1 << 20);
    assert_eq!(c.simple(0, CMD_WRITE, (4 << 20) + 512, odd.len() as u32, &odd).await, 0);
    let odd_len = pattern(11, (1 << 20) + 512);
    assert_eq!(c.simple(0, CMD_WRITE, 6 << 20, odd_len.len() as u32, &odd_len).await, 0);
    let calls = export.take_calls();
    assert!(calls.iter().all(|c| !matches!(c, Call::Piece { .. })), "no pieces: {calls:?}");
    assert_eq!(calls.len(), 4, "each write whole: {calls:?}");
    for (cookie, (offset, data)) in
        [(0u64, &big), (2 << 20, &short), ((4 << 20) + 512, &odd), (6 << 20, &odd_len)].into_iter().enumerate()
    {
        assert_eq!(&c.read_structured(20 + cookie as u64, offset, data.len() as u32).await.unwrap(), data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_that_take_no_pieces_get_whole_writes() {
    let export = Pieces::new(true);
    let server = serve(export.clone(), Some(2));
    let (mut c, _task) = pipe(&server);
    c.open("p", true).await;
    let data = pattern(12, 2 << 20);
    trickle(&mut c, 30, 1 << 20, &data, 200_000).await;
    assert_eq!(c.reply().await, Reply::Simple { cookie: 30, errno: 0 });
    assert_eq!(export.take_calls(), vec![Call::Write { offset: 1 << 20, len: 2 << 20, fua: false }]);
    assert_eq!(c.read_structured(31, 1 << 20, 2 << 20).await.unwrap(), data);
}

/// A client gone halfway through a streamed write: its pieces so far may have landed (the write was never
/// acknowledged), everything acknowledged before is intact, and the server ends the connection with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_stream_loses_nothing_acknowledged() {
    let export = Pieces::new(false);
    let server = serve(export.clone(), None);
    let (mut c, task) = pipe(&server);
    c.open("p", true).await;
    let data = pattern(13, 1 << 20);
    assert_eq!(c.simple(0, CMD_WRITE, 0, data.len() as u32, &data).await, 0);
    c.request(0, CMD_WRITE, 40, 4 << 20, 1 << 20, &[0xFF; 300 << 10]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(c);
    assert!(task.await.unwrap().is_err(), "a torn request ends the connection with an error");
    let (mut c, _task) = pipe(&server);
    c.open("p", true).await;
    assert_eq!(c.read_structured(41, 0, 1 << 20).await.unwrap(), data);
    let torn = c.read_structured(42, 4 << 20, 1 << 20).await.unwrap();
    assert!(torn[300 << 10..].iter().all(|&b| b == 0), "nothing past what arrived");
}
