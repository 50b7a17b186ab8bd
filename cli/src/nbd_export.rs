//! Engine volumes as NBD exports.
//!
//! Export names: `ns/dot` is the head of the dot's current branch (default subdot), `ns/dot.subdot` another subdot's
//! head, `ns/dot@COMMIT` and `ns/dot.subdot@COMMIT` a commit, read-only. Plain volumes (not part of a dot) are
//! exported under their own name. A checkout changes what new connections get; open connections keep the volume they
//! negotiated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockmesh_engine::{CommitId, Pool, Volume, DEFAULT_SUBDOT, MAX_IO_BYTES};
use blockmesh_nbd::{
    BlockSizes, Disconnect, ErrorKind, Export, ExportError, ExportListing, ExportResult, Exports, Extent, ExtentKind,
    Qos, WritePiece, ZeroFlags,
};
use parking_lot::Mutex;

use crate::metrics::{Metrics, NbdOp, VolumeMetrics};
use crate::qos::QosRegistry;

/// Most bytes one `NBD_CMD_CACHE` prefetches; it is a hint, and a client asking for more gets this much warmed.
pub const MAX_CACHE_PREFETCH_BYTES: u64 = 64 << 20;
/// Read size used to prefetch.
const CACHE_READ_BYTES: u64 = 1 << 20;

/// Maps an engine error to the NBD error kind and a message.
fn to_export_error(e: blockmesh_engine::Error) -> ExportError {
    use blockmesh_engine::Error as E;
    let kind = match &e {
        E::ReadOnly(..) => ErrorKind::ReadOnly,
        E::NoSpace(..) | E::Limit(..) => ErrorKind::NoSpace,
        E::OutOfRange { .. } | E::Unaligned { .. } | E::InvalidArgument(..) => ErrorKind::Invalid,
        _ => ErrorKind::Io,
    };
    if kind == ErrorKind::Io {
        tracing::error!(error = %e, "volume I/O failed");
    }
    ExportError::new(kind, e.to_string())
}

/// Which of a dot's NBD connections count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// Connections to branch heads (read-write): what a checkout or reset moves from under them.
    Heads,
    /// Every connection, commits included: what deleting the dot ends.
    All,
    /// Connections to one subdot's head: what removing the subdot ends.
    SubdotHead(String),
}

#[derive(Debug)]
struct Session {
    id: u64,
    head: bool,
    subdot: String,
    disconnect: Disconnect,
}

/// The NBD connections open on each dot's exports, so the API can refuse to move a head from under a connected
/// client, or close those connections when forced.
#[derive(Debug, Default)]
pub struct Sessions {
    next_id: AtomicU64,
    open: Mutex<HashMap<String, Vec<Session>>>,
}

impl Sessions {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records one connection to `subdot` of `dot` until the guard is dropped (when the connection ends).
    fn register(self: &Arc<Self>, dot: &str, subdot: &str, head: bool) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let disconnect = Disconnect::new();
        let session = Session { id, head, subdot: subdot.to_string(), disconnect: disconnect.clone() };
        self.open.lock().entry(dot.to_string()).or_default().push(session);
        SessionGuard { sessions: self.clone(), dot: dot.to_string(), id, disconnect }
    }

    /// Open connections to `dot` (not counting those already told to close).
    pub fn count(&self, dot: &str, which: &Which) -> usize {
        let open = self.open.lock();
        open.get(dot).map_or(0, |v| v.iter().filter(|s| counts(s, which)).count())
    }

    /// Close the connections to `dot` (each after answering the requests it has read); returns how many.
    pub fn disconnect(&self, dot: &str, which: &Which) -> usize {
        let open = self.open.lock();
        let mut n = 0;
        for s in open.get(dot).into_iter().flatten().filter(|s| counts(s, which)) {
            s.disconnect.trigger();
            n += 1;
        }
        n
    }
}

fn counts(s: &Session, which: &Which) -> bool {
    !s.disconnect.is_triggered()
        && match which {
            Which::Heads => s.head,
            Which::All => true,
            Which::SubdotHead(subdot) => s.head && s.subdot == *subdot,
        }
}

/// One connection's entry in [`Sessions`]; removes it when dropped.
#[derive(Debug)]
struct SessionGuard {
    sessions: Arc<Sessions>,
    dot: String,
    id: u64,
    disconnect: Disconnect,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut open = self.sessions.open.lock();
        if let Some(v) = open.get_mut(&self.dot) {
            v.retain(|s| s.id != self.id);
            if v.is_empty() {
                open.remove(&self.dot);
            }
        }
    }
}

/// One engine volume (a head, a commit or a plain volume) behind the NBD export trait.
#[derive(Debug)]
pub struct VolumeExport {
    volume: Volume,
    size_bytes: u64,
    description: Option<String>,
    session: Option<SessionGuard>,
    metrics: Option<Arc<Metrics>>,
    volume_metrics: Option<VolumeMetrics>,
    qos: Option<Arc<Qos>>,
    /// Time the engine spent on the pieces taken so far of the write being streamed in
    /// ([`Export::try_write_piece_now`]): the write is counted once, when its last piece is taken, with their sum.
    piece_nanos: AtomicU64,
}

impl VolumeExport {
    /// Wraps a volume; its size is read now (the protocol fixes the size at negotiation).
    pub fn new(volume: Volume, description: Option<String>) -> blockmesh_engine::Result<Self> {
        let size_bytes = volume.size_bytes()?;
        Ok(Self {
            volume,
            size_bytes,
            description,
            session: None,
            metrics: None,
            volume_metrics: None,
            qos: None,
            piece_nanos: AtomicU64::new(0),
        })
    }

    /// Runs one request, counting it in the metrics.
    fn timed<T>(&self, op: NbdOp, bytes: u64, f: impl FnOnce() -> blockmesh_engine::Result<T>) -> ExportResult<T> {
        let started = Instant::now();
        let r = f();
        self.count(op, bytes, started, r.is_ok());
        r.map_err(to_export_error)
    }

    /// As [`VolumeExport::timed`], for an attempt that may decline (`Ok(false)`): a declined attempt is not a
    /// request, the blocking call that follows counts it.
    fn timed_attempt(
        &self,
        op: NbdOp,
        bytes: u64,
        f: impl FnOnce() -> blockmesh_engine::Result<bool>,
    ) -> ExportResult<bool> {
        let started = Instant::now();
        let r = f();
        if let Ok(true) | Err(_) = &r {
            self.count(op, bytes, started, r.is_ok());
        }
        r.map_err(to_export_error)
    }

    fn count(&self, op: NbdOp, bytes: u64, started: Instant, ok: bool) {
        if self.metrics.is_some() {
            self.count_elapsed(op, bytes, started.elapsed(), ok);
        }
    }

    fn count_elapsed(&self, op: NbdOp, bytes: u64, elapsed: Duration, ok: bool) {
        let Some(m) = &self.metrics else { return };
        // one clock read for both the daemon's and the volume's histogram
        m.request(op, bytes, elapsed, ok);
        if let Some(v) = &self.volume_metrics {
            v.request(op, bytes, elapsed);
        }
    }
}

impl Drop for VolumeExport {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.connections_add(-1);
        }
    }
}

impl Export for VolumeExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn description(&self) -> Option<String> {
        self.description.clone()
    }

    fn is_read_only(&self) -> bool {
        self.volume.is_read_only()
    }

    /// The engine's flush makes every acknowledged write of the whole pool durable, whichever connection wrote it.
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum_bytes: 512, preferred_bytes: 4096, maximum_bytes: MAX_IO_BYTES as u32 }
    }

    /// Zeroing is a metadata operation in the engine: always fast.
    fn can_fast_zero(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        let n = buf.len() as u64;
        self.timed(NbdOp::Read, n, || self.volume.read(offset, buf))
    }

    fn try_read_now(&self, offset: u64, buf: &mut [u8]) -> ExportResult<bool> {
        let n = buf.len() as u64;
        self.timed_attempt(NbdOp::Read, n, || self.volume.try_read_now(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        self.timed(NbdOp::Write, data.len() as u64, || {
            self.volume.write(offset, data)?;
            if fua {
                self.volume.flush()?;
            }
            Ok(())
        })
    }

    fn try_write_now(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<bool> {
        if fua {
            return Ok(false); // its flush waits for the disk
        }
        self.timed_attempt(NbdOp::Write, data.len() as u64, || self.volume.try_write_now(offset, data))
    }

    fn try_write_piece_now(&self, piece: WritePiece<'_>) -> ExportResult<bool> {
        let started = Instant::now();
        let r = self.volume.try_write_piece_now(piece.offset, piece.data, piece.write_bytes);
        if self.metrics.is_none() {
            return r.map_err(to_export_error);
        }
        let taken_bytes = piece.offset.saturating_sub(piece.write_offset);
        let mut nanos = if taken_bytes == 0 { 0 } else { self.piece_nanos.load(Ordering::Relaxed) };
        nanos += u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.piece_nanos.store(nanos, Ordering::Relaxed);
        let spent = Duration::from_nanos(nanos);
        match &r {
            // the whole write, as one request
            Ok(true) if piece.is_last() => self.count_elapsed(NbdOp::Write, piece.write_bytes, spent, true),
            Ok(true) => {}
            // a declined piece is offered again, unless it ends the write: then the pieces taken count as a request
            // and the rest of the write, written as usual, as another
            Ok(false) if piece.is_last() && taken_bytes > 0 => {
                self.count_elapsed(NbdOp::Write, taken_bytes, spent, true)
            }
            Ok(false) => {}
            Err(_) => self.count_elapsed(NbdOp::Write, piece.write_bytes, spent, false),
        }
        r.map_err(to_export_error)
    }

    fn flush(&self) -> ExportResult<()> {
        self.timed(NbdOp::Flush, 0, || self.volume.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.timed(NbdOp::Trim, len, || {
            self.volume.trim(offset, len)?;
            if fua {
                self.volume.flush()?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        // Whole blocks become zero mappings (no data written) either way; trimming instead would not guarantee
        // zeroes in partial blocks, so may_trim changes nothing here.
        self.timed(NbdOp::WriteZeroes, len, || {
            self.volume.write_zeroes(offset, len)?;
            if flags.fua {
                self.volume.flush()?;
            }
            Ok(())
        })
    }

    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        // Prefetch: read the range (up to a bound) so its metadata and blocks are in memory.
        let end = offset + len.min(MAX_CACHE_PREFETCH_BYTES);
        self.timed(NbdOp::Cache, end - offset, || {
            let mut buf = vec![0u8; CACHE_READ_BYTES.min(end - offset) as usize];
            let mut at = offset;
            while at < end {
                let n = (end - at).min(CACHE_READ_BYTES) as usize;
                self.volume.read(at, &mut buf[..n])?;
                at += n as u64;
            }
            Ok(())
        })
    }

    fn qos(&self) -> Option<Arc<Qos>> {
        self.qos.clone()
    }

    fn disconnect_signal(&self) -> Option<Disconnect> {
        self.session.as_ref().map(|s| s.disconnect.clone())
    }

    fn extents(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        let runs = self.timed(NbdOp::BlockStatus, 0, || self.volume.allocation(offset, len))?;
        let mut out: Vec<Extent> = Vec::with_capacity(runs.len());
        let mut at = offset;
        let push = |kind: ExtentKind, n: u64, out: &mut Vec<Extent>| match out.last_mut() {
            Some(last) if last.kind == kind => last.length_bytes += n,
            _ => out.push(Extent { length_bytes: n, kind }),
        };
        for r in runs {
            if r.offset_bytes > at {
                // A gap in the engine's runs is unmapped.
                push(ExtentKind::Hole, r.offset_bytes - at, &mut out);
            }
            let kind = match r.kind {
                blockmesh_engine::ExtentKind::Data => ExtentKind::Data,
                blockmesh_engine::ExtentKind::Zero => ExtentKind::Zero,
                blockmesh_engine::ExtentKind::Trimmed | blockmesh_engine::ExtentKind::Hole => ExtentKind::Hole,
            };
            let start = r.offset_bytes.max(at);
            let stop = r.offset_bytes + r.len_bytes;
            if stop > start {
                push(kind, stop - start, &mut out);
                at = stop;
            }
        }
        if at < offset + len {
            push(ExtentKind::Hole, offset + len - at, &mut out);
        }
        Ok(out)
    }
}

/// The exports of one pool, looked up by name on every connection.
#[derive(Debug, Clone)]
pub struct PoolExports {
    pool: Arc<Pool>,
    sessions: Arc<Sessions>,
    metrics: Option<Arc<Metrics>>,
    qos: Arc<QosRegistry>,
}

/// What an export name stands for.
#[derive(Debug)]
pub struct Resolved {
    pub volume: Volume,
    /// The dot it belongs to (`None`: a plain volume).
    pub dot: Option<String>,
    /// Its subdot (a plain volume: its name).
    pub subdot: String,
}

impl PoolExports {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool, sessions: Sessions::new(), metrics: None, qos: QosRegistry::new() }
    }

    /// Record connections in `sessions` (for the API's checkout guard) and count requests in `metrics`.
    pub fn tracked(self, sessions: Arc<Sessions>, metrics: Arc<Metrics>) -> Self {
        Self { sessions, metrics: Some(metrics), ..self }
    }

    /// Take each volume's limits and fair-queue flow from `qos` (which the API changes).
    pub fn with_qos(self, qos: Arc<QosRegistry>) -> Self {
        Self { qos, ..self }
    }

    /// Resolves an export name to a volume (see the module documentation for the forms), the dot it belongs to and
    /// its subdot.
    pub fn resolve(&self, name: &str) -> blockmesh_engine::Result<Resolved> {
        let (target, commit) = match name.rsplit_once('@') {
            Some((t, c)) => (t, Some(c.parse::<CommitId>()?)),
            None => (name, None),
        };
        // A dot name may itself contain '.', so the whole name is tried as a dot first.
        let (dot, subdot) = if self.pool.dot(target).is_ok() {
            (target, None)
        } else if let Some((d, s)) = target.rsplit_once('.').filter(|(d, _)| self.pool.dot(d).is_ok()) {
            (d, Some(s))
        } else if commit.is_none() && target.contains('/') {
            return Err(blockmesh_engine::Error::NoSuchDot(target.to_string()));
        } else if commit.is_none() && !target.starts_with('#') {
            return Ok(Resolved { volume: self.pool.volume(target)?, dot: None, subdot: target.to_string() });
        } else {
            return Err(blockmesh_engine::Error::NoSuchDot(target.to_string()));
        };
        let volume = match commit {
            Some(c) => self.pool.commit_volume(dot, c, subdot)?,
            None => self.pool.dot_volume(dot, subdot)?,
        };
        let subdot = subdot.unwrap_or(DEFAULT_SUBDOT).to_string();
        Ok(Resolved { volume, dot: Some(dot.to_string()), subdot })
    }
}

impl Exports for PoolExports {
    fn list(&self) -> Vec<ExportListing> {
        let mut out = Vec::new();
        for d in self.pool.dots() {
            for (subdot, _) in &d.subdots {
                let name = if subdot == DEFAULT_SUBDOT { d.name.clone() } else { format!("{}.{subdot}", d.name) };
                let description = Some(format!("dot {}, branch {}", d.name, d.current_branch));
                out.push(ExportListing { name, description });
            }
        }
        for v in self.pool.volumes() {
            if !v.name.starts_with('#') {
                out.push(ExportListing { name: v.name, description: Some("volume".into()) });
            }
        }
        out
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let Resolved { volume, dot, subdot } = match self.resolve(name) {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(name, error = %e, "no such export");
                return None;
            }
        };
        let description = Some(if volume.is_read_only() { format!("{name} (read-only)") } else { name.to_string() });
        let head = !volume.is_read_only();
        match VolumeExport::new(volume, description) {
            Ok(mut x) => {
                x.qos = Some(self.qos.for_volume(&self.pool, dot.as_deref(), &subdot));
                if let Some(m) = &self.metrics {
                    m.connections_add(1);
                    x.metrics = Some(m.clone());
                    x.volume_metrics = Some(m.volume(dot.as_deref().unwrap_or_default(), &subdot));
                }
                x.session = dot.map(|d| self.sessions.register(&d, &subdot, head));
                Some(Arc::new(x))
            }
            Err(e) => {
                tracing::warn!(name, error = %e, "cannot open export");
                None
            }
        }
    }
}
