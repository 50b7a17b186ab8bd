//! The transmission phase: requests are read and checked in order, run concurrently on the blocking pool, and their
//! replies written as they complete (out of order, as the protocol allows).
//!
//! Small reads whose bytes are at hand ([`Export::try_read_now`]) are answered on the event loop instead: no thread
//! hand-off at all, which is most of the cost of a cached 4 KiB read. Small writes the export can take without
//! waiting ([`Export::try_write_now`]) likewise, after their fair-queue slot. Large writes without FUA are handed to
//! the export piece by piece while their payload is still arriving ([`Export::try_write_piece_now`],
//! [`STREAM_WRITE_MIN_BYTES`]), each piece after a fair-queue slot of its own: the export's work on what has arrived
//! overlaps the client's sending of the rest, where a whole write leaves the socket unread while the export works.
//!
//! Bounds per connection: [`MAX_INFLIGHT_REQUESTS`] requests and [`MAX_INFLIGHT_BUFFER_BYTES`] of payload buffers
//! between reading a request and writing its reply. When either is used up the server stops reading requests, which
//! pushes back on the client through the socket.
//!
//! Quality of service ([`crate::qos`]): a request of an export with limits reserves its place in the export's
//! buckets when its header is read, and the reader sleeps out the wait before it reads the payload or the next
//! request, so limits never reorder a connection's requests. With a fair queue, a request takes a backend slot
//! before it goes to the blocking pool and gives it back when the export is done with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::buffers::{Buf, BufPool};
use crate::export::{ErrorKind, Export, ExportError, Extent, WritePiece, ZeroFlags};
use crate::handshake::Negotiated;
use crate::proto::*;
use crate::qos::{Direction, FairQueue, Flow, Qos, FAIR_REQUEST_COST_BYTES};
use crate::{Error, Result};

/// Requests of one connection between being read and having their reply written.
pub const MAX_INFLIGHT_REQUESTS: usize = 64;
/// Payload bytes (write data and read replies) one connection may hold at a time.
pub const MAX_INFLIGHT_BUFFER_BYTES: usize = 96 << 20;
/// Unit of the buffer budget's semaphore.
const BUDGET_UNIT_BYTES: usize = 4096;
/// Structured reads at least this long ask the export for holes and send them as `NBD_REPLY_TYPE_OFFSET_HOLE`;
/// shorter ones are sent as data, since the lookup would cost more than the bytes.
pub const HOLE_CHUNK_MIN_BYTES: u32 = 128 << 10;
/// Writes up to this long are first tried on the event loop with [`Export::try_write_now`]: as for reads, copying
/// them costs less than the two thread hand-offs of the blocking pool (4 KiB random writes to an engine volume:
/// 2.7x the IOPS; 1 MiB sequential writes whose log batches go past the page cache: 4-9% faster at 12-16% less
/// CPU per byte, benches/RESULTS.md), while longer ones keep the reader free to take the next request as they run
/// and hold up no other connection on the same worker for more than the fraction of a millisecond 1 MiB takes.
/// Writes of [`STREAM_WRITE_MIN_BYTES`] or more without FUA are streamed instead; this applies to them only for
/// the rest of one whose last piece the export declined.
pub const INLINE_WRITE_MAX_BYTES: u32 = 1 << 20;
/// Writes at least this long without FUA are taken piece by piece as their payload arrives
/// ([`Export::try_write_piece_now`]): the export's work on one piece overlaps the transfer of the next, where a
/// whole write would leave the socket unread while the export works (1 MiB writes to an engine volume at queue
/// depth 4: 1.18x-1.56x the throughput of whole writes, benches/RESULTS.md). The same as the engine's
/// `DEFAULT_UNCACHED_WRITE_MIN_BYTES`: writes this long are the ones it sends past the page cache.
pub const STREAM_WRITE_MIN_BYTES: u32 = 256 << 10;
/// Smallest piece of such a write handed to the export (but the last): fewer, larger pieces cost less per byte.
pub const STREAM_PIECE_MIN_BYTES: usize = 64 << 10;
/// Pieces start and end on multiples of this (device offsets), so none needs a read-modify-write.
const STREAM_PIECE_ALIGN_BYTES: u64 = 4096;
/// Reads up to this long are first tried on the event loop with [`Export::try_read_now`]: long enough for database
/// pages and qcow2-sized clusters, short enough that copying them does not hold up other connections.
pub const INLINE_READ_MAX_BYTES: u32 = 64 << 10;
/// Most descriptors in one block status reply (the client asks again for the rest).
pub const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 16 << 10;
/// Socket read buffer, so request headers do not cost a system call each.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Socket write buffer, so small replies are coalesced.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Scratch for skipping the payload of a refused write.
const SKIP_BUFFER_BYTES: usize = 64 << 10;
/// Longest error message sent in an error chunk.
const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// One message for the writer task: a header (and small payload), optional bulk data, and the permits that the
/// request holds until its reply is on the wire.
struct Outgoing {
    head: Vec<u8>,
    data: Option<Buf>,
    _permits: Option<Permits>,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _buffer: Option<OwnedSemaphorePermit>,
}

/// What a validated request does.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read { df: bool },
    Write { fua: bool },
    Flush,
    Trim { fua: bool },
    Zeroes(ZeroFlags),
    Cache,
    BlockStatus { req_one: bool },
}

/// What every request task needs.
struct Conn {
    export: Arc<dyn Export>,
    size_bytes: u64,
    min_bytes: u64,
    max_bytes: u32,
    structured: bool,
    base_allocation: Option<u32>,
    read_only: bool,
    fast_zero: bool,
    pool: Arc<BufPool>,
    tx: mpsc::Sender<Outgoing>,
    /// The export's limits and fair-queue flow, if it has them.
    qos: Option<Arc<Qos>>,
    /// The server's fair queue, if fairness is on.
    fair: Option<Arc<FairQueue>>,
    /// This connection's flow when the export has no [`Qos`].
    own_flow: Arc<Flow>,
}

/// A refusal: the protocol's error value and a message.
type Refusal = (u32, String);

fn refuse(errno: u32, msg: impl Into<String>) -> Refusal {
    (errno, msg.into())
}

fn allowed_flags(kind: u16) -> u16 {
    match kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

impl Op {
    /// What a request costs against an export's limits: its direction and bytes, or `None` when it is free.
    fn qos_cost(self, length: u32) -> Option<(Direction, u64)> {
        match self {
            Op::Read { .. } => Some((Direction::Read, u64::from(length))),
            Op::Write { .. } => Some((Direction::Write, u64::from(length))),
            Op::Trim { .. } | Op::Zeroes(_) => Some((Direction::Write, 0)),
            Op::Flush | Op::Cache | Op::BlockStatus { .. } => None,
        }
    }

    /// Bytes of data the backend moves for it, for the fair queue.
    fn fair_bytes(self, length: u32) -> u64 {
        match self {
            Op::Read { .. } | Op::Write { .. } => u64::from(length),
            _ => 0,
        }
    }
}

impl Conn {
    /// The flow this connection's requests are queued under.
    fn flow(&self) -> &Arc<Flow> {
        match &self.qos {
            Some(q) => q.flow(),
            None => &self.own_flow,
        }
    }

    /// Checks a request against the negotiated state and the export's size and block sizes.
    fn validate(&self, r: &RequestHeader) -> std::result::Result<Op, Refusal> {
        let name = command_name(r.kind);
        let op = match r.kind {
            CMD_READ => Op::Read { df: r.flags & CMD_FLAG_DF != 0 },
            CMD_WRITE => Op::Write { fua: r.flags & CMD_FLAG_FUA != 0 },
            CMD_FLUSH => Op::Flush,
            CMD_TRIM => Op::Trim { fua: r.flags & CMD_FLAG_FUA != 0 },
            CMD_WRITE_ZEROES => Op::Zeroes(ZeroFlags {
                may_trim: r.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: r.flags & CMD_FLAG_FAST_ZERO != 0,
                fua: r.flags & CMD_FLAG_FUA != 0,
            }),
            CMD_CACHE => Op::Cache,
            CMD_BLOCK_STATUS => Op::BlockStatus { req_one: r.flags & CMD_FLAG_REQ_ONE != 0 },
            other => return Err(refuse(EINVAL, format!("unknown command {other}"))),
        };
        let bad_flags = r.flags & !allowed_flags(r.kind);
        if bad_flags != 0 {
            return Err(refuse(EINVAL, format!("flags {bad_flags:#x} do not apply to {name}")));
        }
        if r.flags & CMD_FLAG_DF != 0 && !self.structured {
            return Err(refuse(EINVAL, "DF without structured replies"));
        }
        let writes = matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::Zeroes(_));
        if writes && self.read_only {
            return Err(refuse(EPERM, format!("{name} on a read-only export")));
        }
        if let Op::Zeroes(z) = op {
            if z.fast_only && !self.fast_zero {
                return Err(refuse(ENOTSUP, "this export cannot zero fast"));
            }
        }
        if matches!(op, Op::BlockStatus { .. }) && self.base_allocation.is_none() {
            return Err(refuse(EINVAL, "BLOCK_STATUS without a negotiated metadata context"));
        }
        if matches!(op, Op::Flush) {
            return Ok(op);
        }
        let len = u64::from(r.length);
        let in_range = r.offset.checked_add(len).is_some_and(|end| end <= self.size_bytes);
        if !in_range {
            let errno = if matches!(op, Op::Write { .. } | Op::Zeroes(_)) { ENOSPC } else { EINVAL };
            return Err(refuse(
                errno,
                format!("{name} of {len} bytes at {} is past the end ({} bytes)", r.offset, self.size_bytes),
            ));
        }
        if r.offset % self.min_bytes != 0 || len % self.min_bytes != 0 {
            return Err(refuse(
                EINVAL,
                format!("{name} at {}+{len} is not aligned to {} bytes", r.offset, self.min_bytes),
            ));
        }
        if matches!(op, Op::Read { .. } | Op::Write { .. }) && r.length > self.max_bytes {
            let errno = if matches!(op, Op::Read { df: true }) { EOVERFLOW } else { EINVAL };
            return Err(refuse(errno, format!("{name} of {len} bytes is over the maximum of {}", self.max_bytes)));
        }
        if matches!(op, Op::BlockStatus { .. }) && len == 0 {
            return Err(refuse(EINVAL, "BLOCK_STATUS of zero bytes"));
        }
        Ok(op)
    }

    fn simple(&self, cookie: u64, errno: u32, data: Option<Buf>, permits: Option<Permits>) -> Outgoing {
        Outgoing { head: simple_reply(cookie, errno).to_vec(), data, _permits: permits }
    }

    /// A successful read's data: a simple reply, or under structured replies an `OFFSET_DATA` chunk.
    fn data_reply(&self, cookie: u64, flags: u16, offset: u64, data: Buf, permits: Option<Permits>) -> Outgoing {
        if !self.structured {
            return self.simple(cookie, 0, Some(data), permits);
        }
        let mut head = Vec::with_capacity(CHUNK_HEADER_BYTES + 8);
        put_chunk_header(&mut head, cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + data.as_slice().len() as u32);
        head.extend_from_slice(&offset.to_be_bytes());
        Outgoing { head, data: Some(data), _permits: permits }
    }

    /// Whether a read of `len` bytes asks the export for holes, to send them as hole chunks.
    fn wants_holes(&self, len: u32, df: bool) -> bool {
        self.structured && !df && len >= HOLE_CHUNK_MIN_BYTES
    }

    /// Answers a small read on the event loop if the export has its bytes at hand; gives `permits` back otherwise,
    /// for the blocking path.
    fn read_now(&self, r: &RequestHeader, df: bool, permits: Permits) -> std::result::Result<Outgoing, Permits> {
        let len = r.length;
        if len == 0 || len > INLINE_READ_MAX_BYTES || self.wants_holes(len, df) {
            return Err(permits);
        }
        let mut buf = self.pool.take(len as usize);
        match self.export.try_read_now(r.offset, buf.as_mut_slice()) {
            Ok(true) => Ok(self.data_reply(r.cookie, REPLY_FLAG_DONE, r.offset, buf, Some(permits))),
            Ok(false) => {
                self.pool.give(buf);
                Err(permits)
            }
            Err(err) => {
                self.pool.give(buf);
                Ok(self.error_reply(r.cookie, r.kind, export_refusal(err), Some(permits)))
            }
        }
    }

    /// Tries a short write on the event loop ([`Export::try_write_now`]); its reply, or the payload and permits back
    /// for the blocking path.
    fn write_now(
        &self,
        r: &RequestHeader,
        op: Op,
        payload: Option<Buf>,
        permits: Permits,
    ) -> std::result::Result<Outgoing, (Option<Buf>, Permits)> {
        let Op::Write { fua } = op else { return Err((payload, permits)) };
        let data = match payload {
            Some(data) if r.length > 0 && r.length <= INLINE_WRITE_MAX_BYTES => data,
            other => return Err((other, permits)),
        };
        let done = self.export.try_write_now(r.offset, data.as_slice(), fua);
        match done {
            Ok(false) => Err((Some(data), permits)),
            taken => {
                self.pool.give(data);
                Ok(self.outcome(r, taken.map(|_| ()), permits))
            }
        }
    }

    /// The reply to a command without data: success, or its error.
    fn outcome(&self, r: &RequestHeader, res: std::result::Result<(), ExportError>, permits: Permits) -> Outgoing {
        match res {
            Ok(()) => self.simple(r.cookie, 0, None, Some(permits)),
            Err(err) => self.error_reply(r.cookie, r.kind, export_refusal(err), Some(permits)),
        }
    }

    /// An error reply: a simple reply, or for reads and block status under structured replies an error chunk.
    fn error_reply(&self, cookie: u64, kind: u16, (errno, msg): Refusal, permits: Option<Permits>) -> Outgoing {
        tracing::debug!(cookie, command = command_name(kind), errno, msg, "request failed");
        if self.structured && matches!(kind, CMD_READ | CMD_BLOCK_STATUS) {
            let msg = &msg.as_bytes()[..msg.len().min(MAX_ERROR_MESSAGE_BYTES)];
            let mut head = Vec::with_capacity(CHUNK_HEADER_BYTES + 6 + msg.len());
            put_chunk_header(&mut head, cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u32);
            head.extend_from_slice(&errno.to_be_bytes());
            head.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            head.extend_from_slice(msg);
            Outgoing { head, data: None, _permits: permits }
        } else {
            self.simple(cookie, errno, None, permits)
        }
    }

    fn send(&self, msg: Outgoing) {
        // Fails only when the writer has stopped (the client went away); the reply has nowhere to go.
        let _ = self.tx.blocking_send(msg);
    }

    /// Runs one request on the blocking pool and queues its reply (or replies).
    fn run(&self, r: RequestHeader, op: Op, payload: Option<Buf>, permits: Permits) {
        let len = u64::from(r.length);
        let e = &self.export;
        let done =
            |res: std::result::Result<(), ExportError>, permits: Permits| self.send(self.outcome(&r, res, permits));
        match op {
            Op::Write { fua } => {
                let Some(data) = payload else { return done(Err(internal("write without payload")), permits) };
                let res = if len == 0 { Ok(()) } else { e.write(r.offset, data.as_slice(), fua) };
                self.pool.give(data);
                done(res, permits)
            }
            Op::Flush => done(e.flush(), permits),
            Op::Trim { fua } => done(if len == 0 { Ok(()) } else { e.trim(r.offset, len, fua) }, permits),
            Op::Zeroes(flags) => done(if len == 0 { Ok(()) } else { e.write_zeroes(r.offset, len, flags) }, permits),
            Op::Cache => done(if len == 0 { Ok(()) } else { e.cache(r.offset, len) }, permits),
            Op::Read { df } => self.read(r, df, permits),
            Op::BlockStatus { req_one } => self.block_status(r, req_one, permits),
        }
    }

    fn read(&self, r: RequestHeader, df: bool, permits: Permits) {
        let len = r.length;
        if !self.structured {
            let mut buf = self.pool.take(len as usize);
            match if len == 0 { Ok(()) } else { self.export.read(r.offset, buf.as_mut_slice()) } {
                Ok(()) => self.send(self.data_reply(r.cookie, 0, r.offset, buf, Some(permits))),
                Err(err) => {
                    self.pool.give(buf);
                    self.send(self.error_reply(r.cookie, r.kind, export_refusal(err), Some(permits)))
                }
            }
            return;
        }
        if len == 0 {
            let mut head = Vec::with_capacity(CHUNK_HEADER_BYTES);
            put_chunk_header(&mut head, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
            return self.send(Outgoing { head, data: None, _permits: Some(permits) });
        }
        // Which parts are holes: asked only for long reads that may be fragmented.
        let extents = if self.wants_holes(len, df) {
            match self.export.extents(r.offset, u64::from(len)) {
                Ok(x) => clip_extents(x, u64::from(len)),
                Err(_) => Vec::new(),
            }
        } else {
            Vec::new()
        };
        let covered: u64 = extents.iter().map(|x| x.length_bytes).sum();
        let pieces: Vec<(u64, u64, bool)> = if extents.is_empty() || extents.iter().all(|x| !x.kind.reads_zero()) {
            vec![(0, u64::from(len), false)]
        } else {
            let mut at = 0u64;
            let mut v: Vec<(u64, u64, bool)> = Vec::with_capacity(extents.len() + 1);
            for x in &extents {
                v.push((at, x.length_bytes, x.kind.reads_zero()));
                at += x.length_bytes;
            }
            if covered < u64::from(len) {
                v.push((covered, u64::from(len) - covered, false));
            }
            v
        };
        let mut permits = Some(permits);
        let last = pieces.len() - 1;
        for (i, &(rel, n, hole)) in pieces.iter().enumerate() {
            let offset = r.offset + rel;
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let p = if i == last { permits.take() } else { None };
            if hole {
                let mut head = Vec::with_capacity(CHUNK_HEADER_BYTES + 12);
                put_chunk_header(&mut head, r.cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
                head.extend_from_slice(&offset.to_be_bytes());
                head.extend_from_slice(&(n as u32).to_be_bytes());
                self.send(Outgoing { head, data: None, _permits: p });
                continue;
            }
            let mut buf = self.pool.take(n as usize);
            if let Err(err) = self.export.read(offset, buf.as_mut_slice()) {
                self.pool.give(buf);
                // Earlier chunks are already sent; an error chunk ends the reply and voids them all.
                let permits = p.or_else(|| permits.take());
                return self.send(self.error_reply(r.cookie, r.kind, export_refusal(err), permits));
            }
            self.send(self.data_reply(r.cookie, flags, offset, buf, p));
        }
    }

    fn block_status(&self, r: RequestHeader, req_one: bool, permits: Permits) {
        let Some(id) = self.base_allocation else {
            return self.send(self.error_reply(r.cookie, r.kind, refuse(EINVAL, "no context"), Some(permits)));
        };
        let len = u64::from(r.length);
        let extents = match self.export.extents(r.offset, len) {
            Ok(x) => clip_extents(x, len),
            Err(err) => {
                return self.send(self.error_reply(r.cookie, r.kind, export_refusal(err), Some(permits)));
            }
        };
        // An export that reports nothing still owes the client one descriptor: status 0 ("data") is always safe.
        let mut descriptors: Vec<(u32, u32)> = Vec::new();
        for x in extents {
            let status = x.kind.status();
            match descriptors.last_mut() {
                Some(last) if last.1 == status => last.0 += x.length_bytes as u32,
                _ => descriptors.push((x.length_bytes as u32, status)),
            }
        }
        if descriptors.is_empty() {
            descriptors.push((r.length, 0));
        }
        let keep = if req_one { 1 } else { MAX_BLOCK_STATUS_DESCRIPTORS };
        descriptors.truncate(keep);
        let payload_bytes = 4 + 8 * descriptors.len();
        let mut head = Vec::with_capacity(CHUNK_HEADER_BYTES + payload_bytes);
        put_chunk_header(&mut head, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, payload_bytes as u32);
        head.extend_from_slice(&id.to_be_bytes());
        for (length, status) in descriptors {
            head.extend_from_slice(&length.to_be_bytes());
            head.extend_from_slice(&status.to_be_bytes());
        }
        self.send(Outgoing { head, data: None, _permits: Some(permits) });
    }
}

/// Keeps the export's extents inside the request: drops empty ones and cuts the run at `len`.
fn clip_extents(extents: Vec<Extent>, len: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(extents.len());
    let mut at = 0u64;
    for mut x in extents {
        if at >= len {
            break;
        }
        if x.length_bytes == 0 {
            continue;
        }
        x.length_bytes = x.length_bytes.min(len - at);
        at += x.length_bytes;
        out.push(x);
    }
    out
}

fn internal(msg: &str) -> ExportError {
    ExportError::new(ErrorKind::Io, msg)
}

fn export_refusal(e: ExportError) -> Refusal {
    (e.kind.errno(), e.message)
}

/// Serves requests until the client disconnects or sends `NBD_CMD_DISC`; returns after every accepted request has
/// been answered (or the client has gone).
pub(crate) async fn serve(n: Negotiated, pool: Arc<BufPool>, fair: Option<Arc<FairQueue>>) -> Result<()> {
    let (rd, wr) = tokio::io::split(n.stream);
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let (tx, rx) = mpsc::channel::<Outgoing>(MAX_INFLIGHT_REQUESTS * 2);
    let writer = tokio::spawn(write_replies(BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr), rx, pool.clone()));
    let conn = Arc::new(Conn {
        read_only: n.export.is_read_only(),
        fast_zero: n.export.can_fast_zero() && !n.export.is_read_only(),
        size_bytes: n.size_bytes,
        min_bytes: u64::from(n.sizes.minimum_bytes),
        max_bytes: n.sizes.maximum_bytes,
        structured: n.structured,
        base_allocation: n.base_allocation,
        qos: n.export.qos(),
        export: n.export,
        pool,
        tx,
        fair,
        own_flow: Arc::default(),
    });
    tracing::debug!(export = n.name, flags = n.flags, "transmission");
    let requests = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
    let budget = Arc::new(Semaphore::new(MAX_INFLIGHT_BUFFER_BYTES / BUDGET_UNIT_BYTES));
    let result = read_requests(&mut rd, &conn, &requests, &budget).await;
    // Let in-flight requests finish: the writer ends when the last sender (held by the tasks) is gone.
    drop(conn);
    let written = writer.await.map_err(|e| Error::Io(std::io::Error::other(e)))?;
    result.and(written)
}

async fn read_requests<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    conn: &Arc<Conn>,
    requests: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
) -> Result<()> {
    let mut header = [0u8; REQUEST_HEADER_BYTES];
    // subscribed once per connection, not per request
    let mut disconnect = conn.export.disconnect_signal().map(|d| d.watch());
    loop {
        // A clean end: the client closed between requests, or the export's owner closes the connection (the
        // first byte's read is cancel-safe: when the signal wins, nothing was read).
        let first = match &mut disconnect {
            Some(d) => tokio::select! {
                biased;
                _ = d.wait_for(|fired| *fired) => {
                    tracing::info!("export's owner closed the connection");
                    return Ok(());
                }
                n = rd.read(&mut header[..1]) => n?,
            },
            None => rd.read(&mut header[..1]).await?,
        };
        match first {
            0 => return Ok(()),
            _ => rd.read_exact(&mut header[1..]).await?,
        };
        let r = RequestHeader::decode(&header);
        if r.magic != REQUEST_MAGIC {
            return Err(Error::Protocol(format!("request magic {:#x}", r.magic)));
        }
        if r.kind == CMD_DISC {
            return Ok(());
        }
        let request_permit = requests.clone().acquire_owned().await.map_err(|_| closed())?;
        let verdict = conn.validate(&r);
        let payload_bytes = if r.kind == CMD_WRITE { r.length as usize } else { 0 };
        let op = match verdict {
            Ok(op) => op,
            Err(refusal) => {
                if payload_bytes > 0 {
                    skip(rd, payload_bytes).await?;
                }
                let msg = conn.error_reply(r.cookie, r.kind, refusal, None);
                drop(request_permit);
                conn.tx.send(msg).await.map_err(|_| closed())?;
                continue;
            }
        };
        // The export's limits: sleep out the wait before reading the payload or the next request.
        if let (Some(q), Some((dir, bytes))) = (&conn.qos, op.qos_cost(r.length)) {
            let wait = q.reserve(dir, 1, bytes, Instant::now());
            if !wait.is_zero() {
                throttle(wait, &mut disconnect).await;
            }
        }
        // Reads and writes hold buffer budget until their reply is written.
        let buffer_bytes = match op {
            Op::Read { .. } | Op::Write { .. } => r.length as usize,
            _ => 0,
        };
        let buffer_permit = if buffer_bytes > 0 {
            let units = buffer_bytes.div_ceil(BUDGET_UNIT_BYTES) as u32;
            Some(budget.clone().acquire_many_owned(units).await.map_err(|_| closed())?)
        } else {
            None
        };
        let streams = matches!(op, Op::Write { fua: false })
            && r.length >= STREAM_WRITE_MIN_BYTES
            && r.offset % STREAM_PIECE_ALIGN_BYTES == 0
            && u64::from(r.length) % STREAM_PIECE_ALIGN_BYTES == 0;
        let mut permits = Permits { _request: request_permit, _buffer: buffer_permit };
        let mut r = r;
        let payload = if streams {
            match stream_write(rd, conn, &r, permits).await? {
                Streamed::Replied => continue,
                Streamed::Rest { header, data, permits: back } => {
                    (r, permits) = (header, back);
                    Some(data)
                }
            }
        } else if payload_bytes > 0 {
            let mut buf = conn.pool.take(payload_bytes);
            rd.read_exact(buf.as_mut_slice()).await?;
            Some(buf)
        } else if r.kind == CMD_WRITE {
            Some(Buf::zeroed(0))
        } else {
            None
        };
        if let Op::Read { df } = op {
            match conn.read_now(&r, df, permits) {
                Ok(reply) => {
                    conn.tx.send(reply).await.map_err(|_| closed())?;
                    continue;
                }
                Err(p) => permits = p,
            }
        }
        let slot = match &conn.fair {
            Some(fair) => Some(fair.acquire(conn.flow(), op.fair_bytes(r.length)).await),
            None => None,
        };
        let (payload, permits) = match conn.write_now(&r, op, payload, permits) {
            Ok(reply) => {
                drop(slot);
                conn.tx.send(reply).await.map_err(|_| closed())?;
                continue;
            }
            Err(back) => back,
        };
        let c = conn.clone();
        tokio::task::spawn_blocking(move || {
            c.run(r, op, payload, permits);
            drop(slot);
        });
    }
}

/// What [`stream_write`] left to do.
enum Streamed {
    /// Every piece was taken (or one failed) and the reply is queued.
    Replied,
    /// The export declined the last piece, when the payload was all in: the rest of the write, from that piece on,
    /// as a request of its own (same cookie) with its payload, for the usual path.
    Rest { header: RequestHeader, data: Buf, permits: Permits },
}

/// Reads a write's payload and hands it to the export piece by piece as it arrives ([`STREAM_WRITE_MIN_BYTES`]):
/// each read takes what the socket holds, and the whole blocks received and not yet taken go to
/// [`Export::try_write_piece_now`] once they make [`STREAM_PIECE_MIN_BYTES`] (or end the write). A declined piece is
/// offered again after the next read, with what arrived since (the export's lock was taken, its log writers were
/// busy: that passes); what is still declined when the payload is all in is returned for the usual path. The
/// payload is read whole whatever happens, so the connection stays in step: after a failed piece the rest is read
/// and dropped and the reply carries the error.
async fn stream_write<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    conn: &Arc<Conn>,
    r: &RequestHeader,
    permits: Permits,
) -> Result<Streamed> {
    let len = r.length as usize;
    let mut buf = conn.pool.take(len);
    let (mut filled, mut taken) = (0usize, 0usize);
    // payload bytes the fair queue has been charged for, in offers taken or declined
    let mut charged = 0usize;
    let mut failed = None;
    while filled < len {
        let n = rd.read(&mut buf.as_mut_slice()[filled..]).await?;
        if n == 0 {
            return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        filled += n;
        if failed.is_some() {
            continue;
        }
        // whole blocks only (the write starts on one), and all of it at the end
        let ready = if filled == len { len } else { filled - filled % STREAM_PIECE_ALIGN_BYTES as usize };
        // too little yet, or nothing new since a declined offer
        if ready < len && (ready - taken < STREAM_PIECE_MIN_BYTES || ready == charged) {
            continue;
        }
        let slot = match &conn.fair {
            Some(fair) => Some(fair.acquire(conn.flow(), piece_fair_bytes(charged, ready)).await),
            None => None,
        };
        charged = ready;
        let piece = WritePiece {
            write_offset: r.offset,
            write_bytes: u64::from(r.length),
            offset: r.offset + taken as u64,
            data: &buf.as_slice()[taken..ready],
        };
        match conn.export.try_write_piece_now(piece) {
            Ok(true) => taken = ready,
            Ok(false) => {} // offered again, longer, after the next read
            Err(err) => failed = Some(err),
        }
        drop(slot);
    }
    if failed.is_some() || taken == len {
        conn.pool.give(buf);
        let reply = conn.outcome(r, failed.map_or(Ok(()), Err), permits);
        conn.tx.send(reply).await.map_err(|_| closed())?;
        return Ok(Streamed::Replied);
    }
    let header = RequestHeader { offset: r.offset + taken as u64, length: (len - taken) as u32, ..*r };
    if taken > 0 {
        buf.as_mut_slice().copy_within(taken.., 0);
        buf.truncate(len - taken);
    }
    Ok(Streamed::Rest { header, data: buf, permits })
}

/// What one offer of a streamed write's piece costs its flow in the fair queue (`FairQueue::acquire` adds
/// [`FAIR_REQUEST_COST_BYTES`] to it): the bytes received since the last offer, less that request cost after the
/// first offer, so a write costs what it would taken whole however many pieces and offers it takes (each offer
/// brings at least one new block, which is the request cost).
fn piece_fair_bytes(charged: usize, ready: usize) -> u64 {
    let new = (ready - charged) as u64;
    if charged == 0 {
        new
    } else {
        new.saturating_sub(FAIR_REQUEST_COST_BYTES)
    }
}

/// Sleeps out a rate limit's wait; cut short when the export's owner closes the connection (the request already
/// read is then answered, and no further one is read).
async fn throttle(wait: Duration, disconnect: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match disconnect {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = d.wait_for(|fired| *fired) => {}
            }
        }
        None => tokio::time::sleep(wait).await,
    }
}

fn closed() -> Error {
    Error::Io(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed"))
}

/// Reads and drops `n` bytes of a refused write's payload, keeping the connection in step.
async fn skip<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, mut n: usize) -> Result<()> {
    let mut scratch = vec![0u8; SKIP_BUFFER_BYTES.min(n)];
    while n > 0 {
        let k = n.min(scratch.len());
        rd.read_exact(&mut scratch[..k]).await?;
        n -= k;
    }
    Ok(())
}

async fn write_replies<W: tokio::io::AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Outgoing>,
    pool: Arc<BufPool>,
) -> Result<()> {
    while let Some(msg) = rx.recv().await {
        w.write_all(&msg.head).await?;
        if let Some(data) = msg.data {
            w.write_all(data.as_slice()).await?;
            pool.give(data);
        }
        // Coalesce replies that are already waiting; flush when there are none.
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    // Ends TLS with close_notify, or half-closes a socket.
    let _ = w.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers at these ends of the received bytes cost, with the queue's per-acquire cost, what the whole write
    /// would: its bytes plus one request's cost.
    #[test]
    fn a_streamed_write_costs_its_flow_what_a_whole_one_does() {
        let len = 1usize << 20;
        // pieces of 64 KiB and more; an offer declined and made again with one more block
        for ends in [vec![len], vec![65536, 200_704, 401_408, 409_600, len], vec![262_144, len - 4096, len]] {
            let mut charged = 0;
            let total: u64 = ends
                .iter()
                .map(|&ready| {
                    let cost = piece_fair_bytes(charged, ready) + FAIR_REQUEST_COST_BYTES;
                    charged = ready;
                    cost
                })
                .sum();
            assert_eq!(total, len as u64 + FAIR_REQUEST_COST_BYTES, "offers ending at {ends:?}");
        }
    }
}
