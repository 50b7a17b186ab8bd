//! What the server serves: the [`Export`] trait, the [`Exports`] registry it looks names up in, and an in-memory
//! export for tests and fuzzing.
//!
//! Export methods are blocking: the server runs them on tokio's blocking pool, so an export may do ordinary file I/O
//! and take locks. The one exception is [`Export::try_read_now`], called on the event loop, which must not block.
//! The server validates every request against [`Export::size_bytes`] and [`Export::block_sizes`] before calling the
//! export, so implementations see only in-range, aligned, non-empty requests.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::proto;

/// Largest payload (read or write) a request may carry: 32 MiB, the engine's largest I/O.
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

/// Why an export refused or failed a request. Each kind maps to one NBD error value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The export is read-only (`EPERM`).
    ReadOnly,
    /// The medium failed, or data failed its checksum (`EIO`).
    Io,
    /// The request is invalid for this export (`EINVAL`).
    Invalid,
    /// Out of space, or a write past the end (`ENOSPC`).
    NoSpace,
    /// The request cannot be done the fast way asked for (`ENOTSUP`, only for `NBD_CMD_FLAG_FAST_ZERO`).
    NotSupported,
    /// The server is shutting down (`ESHUTDOWN`).
    Shutdown,
}

impl ErrorKind {
    /// The protocol's error value for this kind.
    pub fn errno(self) -> u32 {
        match self {
            ErrorKind::ReadOnly => proto::EPERM,
            ErrorKind::Io => proto::EIO,
            ErrorKind::Invalid => proto::EINVAL,
            ErrorKind::NoSpace => proto::ENOSPC,
            ErrorKind::NotSupported => proto::ENOTSUP,
            ErrorKind::Shutdown => proto::ESHUTDOWN,
        }
    }
}

/// An export's error: a kind for the wire and a message for the structured reply and the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ExportError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ExportError {}

/// Result of an export operation.
pub type ExportResult<T> = std::result::Result<T, ExportError>;

/// Block size constraints, advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Offsets and lengths must be multiples of this (a power of two, 1 to 64 KiB).
    pub minimum_bytes: u32,
    /// Requests at this alignment avoid read-modify-write.
    pub preferred_bytes: u32,
    /// Largest payload of one request.
    pub maximum_bytes: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self { minimum_bytes: 512, preferred_bytes: 4096, maximum_bytes: MAX_PAYLOAD_BYTES }
    }
}

/// What a range of an export holds, for `base:allocation` and for hole chunks in structured reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; may hold any bytes.
    Data,
    /// Allocated, but known to read as zeroes.
    Zero,
    /// Not allocated; reads as zeroes.
    Hole,
}

impl ExtentKind {
    /// The `base:allocation` status bits.
    pub fn status(self) -> u32 {
        match self {
            ExtentKind::Data => 0,
            ExtentKind::Zero => proto::STATE_ZERO,
            ExtentKind::Hole => proto::STATE_HOLE | proto::STATE_ZERO,
        }
    }

    /// True when the range reads as zeroes.
    pub fn reads_zero(self) -> bool {
        !matches!(self, ExtentKind::Data)
    }
}

/// One run of an export's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    pub kind: ExtentKind,
}

/// One piece of a write request taken as its payload arrives ([`Export::try_write_piece_now`]).
#[derive(Debug, Clone, Copy)]
pub struct WritePiece<'a> {
    /// Where the whole write starts.
    pub write_offset: u64,
    /// The whole write's length.
    pub write_bytes: u64,
    /// Where this piece starts: `write_offset` for the first piece, where the one before it ended for the others.
    pub offset: u64,
    /// This piece's bytes.
    pub data: &'a [u8],
}

impl WritePiece<'_> {
    /// Whether this piece ends the write.
    pub fn is_last(&self) -> bool {
        self.offset + self.data.len() as u64 == self.write_offset + self.write_bytes
    }
}

/// How `write_zeroes` may do its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The export may deallocate the range (the client did not send `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// Fail with [`ErrorKind::NotSupported`] rather than zero slowly (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast_only: bool,
    /// Persist before returning (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// Something the server can serve. See the module documentation for the calling contract.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; the server reads it once per connection, at negotiation.
    fn size_bytes(&self) -> u64;

    /// A one-line human description, sent with `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> Option<String> {
        None
    }

    /// True when writes, trims and write-zeroes must be refused with `EPERM`.
    fn is_read_only(&self) -> bool;

    /// True when a flush on any connection persists writes acknowledged on every connection to this export, so
    /// clients may open several connections (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool;

    /// Alignment and size limits. `maximum_bytes` is capped by the server at [`MAX_PAYLOAD_BYTES`].
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// True when `write_zeroes` with `fast_only` can succeed (advertised as `NBD_FLAG_SEND_FAST_ZERO`).
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// Fills `buf` with the bytes at `offset`. Must fill all of `buf` or fail.
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()>;

    /// Like [`Export::read`], but only if the bytes are at hand (in memory, in the page cache) and no lock or disk
    /// has to be waited for: `Ok(true)` when `buf` is filled, `Ok(false)` when the read would block (`buf` then holds
    /// unspecified bytes). The server calls this on its event loop for small reads and falls back to `read` on a
    /// blocking thread, so short cached reads skip two thread hand-offs. Must not block; the default declines.
    fn try_read_now(&self, offset: u64, buf: &mut [u8]) -> ExportResult<bool> {
        let _ = (offset, buf);
        Ok(false)
    }

    /// Writes `data` at `offset`; with `fua`, the data is durable before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()>;

    /// Like [`Export::write`], but only if no lock or disk has to be waited for: `Ok(true)` when written (durable
    /// before this returns with `fua`, as `write`), `Ok(false)` when nothing was written because it would block. The
    /// server calls this on its event loop for short writes and falls back to `write` on a blocking thread. Must not
    /// block; the default declines.
    fn try_write_now(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<bool> {
        let _ = (offset, data, fua);
        Ok(false)
    }

    /// One piece of a longer write, taken on the event loop while the rest of its payload is still arriving (the
    /// server does this for writes of at least [`crate::STREAM_WRITE_MIN_BYTES`] without FUA, so the
    /// export's work overlaps the transfer): like [`Export::try_write_now`] without FUA for `piece.data` at
    /// `piece.offset`. `Ok(false)`: nothing of this piece was written; the server offers it again with what arrived
    /// since, and writes what is still declined when the payload is all in as it would a whole write (so a declined
    /// piece that ends the write, [`WritePiece::is_last`], is the last offered: the rest goes that way). A request's
    /// pieces come in order, each starting where the last one taken ended, and cover it exactly when all are taken;
    /// its reply waits for the last. Must not block; the default declines.
    fn try_write_piece_now(&self, piece: WritePiece<'_>) -> ExportResult<bool> {
        let _ = piece;
        Ok(false)
    }

    /// Makes every write completed before this call durable.
    fn flush(&self) -> ExportResult<()>;

    /// Discards a range; afterwards it reads as zeroes or as its old contents.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()>;

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()>;

    /// A hint that the range will be read soon. Exports whose data is already in memory need do nothing.
    fn cache(&self, offset: u64, len: u64) -> ExportResult<()>;

    /// The allocation of `[offset, offset + len)` as consecutive extents starting at `offset`. They may stop short of
    /// `len` (the client asks again) but must not go past it, and must not be empty.
    fn extents(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>>;

    /// The export's quality of service: its rate limits and its flow in the server's fair queue, shared by every
    /// connection to it (return clones of one `Arc`). The default: no limits, and each connection is a flow of its
    /// own.
    fn qos(&self) -> Option<Arc<crate::qos::Qos>> {
        None
    }

    /// A signal with which the export's owner can close the connection serving it (one export object per
    /// connection, as [`Exports::open`] makes them). When it fires, the server reads no further requests, answers
    /// those already read, and closes the connection. The default: never.
    fn disconnect_signal(&self) -> Option<Disconnect> {
        None
    }
}

/// Closes, from outside the server, the connections whose export returned it from [`Export::disconnect_signal`].
/// Cloning shares the signal.
#[derive(Debug, Clone)]
pub struct Disconnect {
    tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Disconnect {
    fn default() -> Self {
        Self::new()
    }
}

impl Disconnect {
    pub fn new() -> Self {
        Self { tx: Arc::new(tokio::sync::watch::Sender::new(false)) }
    }

    /// Fire: connections holding this signal close once their requests in flight are answered.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether it has fired.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// A receiver for the connection to wait on: `wait_for(|fired| *fired)` completes when the signal fires (at
    /// once if it has).
    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// A name an export is listed under, with its description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: Option<String>,
}

/// Where the server looks export names up. The daemon implements this over its pool, so exports appear and vanish
/// as volumes are created and deleted.
pub trait Exports: Send + Sync + 'static {
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportListing>;
    /// The export of this name (the empty name is the default export, if there is one).
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
}

/// A fixed or hand-managed set of exports.
#[derive(Default)]
pub struct ExportMap {
    map: RwLock<BTreeMap<String, Arc<dyn Export>>>,
}

impl fmt::Debug for ExportMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportMap").field("names", &self.map.read().keys().collect::<Vec<_>>()).finish()
    }
}

impl ExportMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an export; connections already open keep the old one.
    pub fn insert(&self, name: impl Into<String>, export: Arc<dyn Export>) {
        self.map.write().insert(name.into(), export);
    }

    /// Removes an export from listing and from new connections.
    pub fn remove(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.map.write().remove(name)
    }
}

impl Exports for ExportMap {
    fn list(&self) -> Vec<ExportListing> {
        self.map
            .read()
            .iter()
            .map(|(name, e)| ExportListing { name: name.clone(), description: e.description() })
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.map.read().get(name).cloned()
    }
}

/// Granule of the in-memory export's allocation map.
pub const MEMORY_BLOCK_BYTES: u64 = 4096;

/// An export held in memory, sparse at 4 KiB granularity: for tests, fuzzing and examples. Unwritten and trimmed
/// blocks are holes; blocks zeroed without `may_trim` are allocated zero blocks, so block status and hole chunks can
/// be tested against a known map.
pub struct MemoryExport {
    size_bytes: u64,
    read_only: bool,
    description: Option<String>,
    blocks: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl fmt::Debug for MemoryExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryExport")
            .field("size_bytes", &self.size_bytes)
            .field("read_only", &self.read_only)
            .field("allocated_blocks", &self.blocks.read().len())
            .finish()
    }
}

impl MemoryExport {
    /// A writable export of `size_bytes` zeroes.
    pub fn new(size_bytes: u64) -> Self {
        Self { size_bytes, read_only: false, description: None, blocks: RwLock::new(BTreeMap::new()) }
    }

    /// The same export, read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The same export, with a description.
    pub fn with_description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Number of allocated 4 KiB blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.read().len()
    }

    fn check(&self, offset: u64, len: u64) -> ExportResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(ExportError::new(
                ErrorKind::Invalid,
                format!("range {offset}+{len} is past the end ({} bytes)", self.size_bytes),
            )),
        }
    }

    fn writable(&self) -> ExportResult<()> {
        if self.read_only {
            return Err(ExportError::new(ErrorKind::ReadOnly, "export is read-only"));
        }
        Ok(())
    }

    /// Calls `f(block, offset_in_block, buf_range)` for each block piece of `[offset, offset+len)`.
    fn pieces(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let block = at / MEMORY_BLOCK_BYTES;
            let within = (at % MEMORY_BLOCK_BYTES) as usize;
            let n = (MEMORY_BLOCK_BYTES - within as u64).min(len - done);
            f(block, within, done as usize..(done + n) as usize);
            done += n;
        }
    }

    /// Copies `data` into `blocks` at `offset`, making the blocks it touches.
    fn store(blocks: &mut BTreeMap<u64, Box<[u8]>>, offset: u64, data: &[u8]) {
        Self::pieces(offset, data.len() as u64, |block, within, range| {
            let b = blocks.entry(block).or_insert_with(|| vec![0u8; MEMORY_BLOCK_BYTES as usize].into_boxed_slice());
            b[within..within + range.len()].copy_from_slice(&data[range]);
        });
    }

    /// Copies `[offset, offset + buf.len())` out of `blocks`; blocks never written read as zeroes.
    fn copy_out(blocks: &BTreeMap<u64, Box<[u8]>>, offset: u64, buf: &mut [u8]) {
        Self::pieces(offset, buf.len() as u64, |block, within, range| match blocks.get(&block) {
            Some(b) => buf[range.clone()].copy_from_slice(&b[within..within + range.len()]),
            None => buf[range].fill(0),
        });
    }

    fn zero_range(&self, offset: u64, len: u64, deallocate: bool) {
        let mut blocks = self.blocks.write();
        Self::pieces(offset, len, |block, within, range| {
            let whole = within == 0 && range.len() as u64 == MEMORY_BLOCK_BYTES;
            if whole && deallocate {
                blocks.remove(&block);
            } else if whole {
                blocks.insert(block, vec![0u8; MEMORY_BLOCK_BYTES as usize].into_boxed_slice());
            } else if let Some(b) = blocks.get_mut(&block) {
                b[within..within + range.len()].fill(0);
            }
        });
    }
}

impl Export for MemoryExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn description(&self) -> Option<String> {
        self.description.clone()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum_bytes: 1, preferred_bytes: MEMORY_BLOCK_BYTES as u32, maximum_bytes: MAX_PAYLOAD_BYTES }
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.check(offset, buf.len() as u64)?;
        Self::copy_out(&self.blocks.read(), offset, buf);
        Ok(())
    }

    fn try_read_now(&self, offset: u64, buf: &mut [u8]) -> ExportResult<bool> {
        // In memory, so never waits for a disk; a writer holding the lock means waiting, though.
        self.check(offset, buf.len() as u64)?;
        let Some(blocks) = self.blocks.try_read() else { return Ok(false) };
        Self::copy_out(&blocks, offset, buf);
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> ExportResult<()> {
        self.writable()?;
        self.check(offset, data.len() as u64)?;
        Self::store(&mut self.blocks.write(), offset, data);
        Ok(())
    }

    fn try_write_now(&self, offset: u64, data: &[u8], _fua: bool) -> ExportResult<bool> {
        // In memory, so durable at once; a reader or writer holding the lock means waiting, though.
        self.writable()?;
        self.check(offset, data.len() as u64)?;
        let Some(mut blocks) = self.blocks.try_write() else { return Ok(false) };
        Self::store(&mut blocks, offset, data);
        Ok(true)
    }

    fn try_write_piece_now(&self, piece: WritePiece<'_>) -> ExportResult<bool> {
        self.try_write_now(piece.offset, piece.data, false)
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> ExportResult<()> {
        self.writable()?;
        self.check(offset, len)?;
        // Only whole blocks are deallocated; partial blocks keep their bytes, which the protocol allows.
        let mut blocks = self.blocks.write();
        Self::pieces(offset, len, |block, within, range| {
            if within == 0 && range.len() as u64 == MEMORY_BLOCK_BYTES {
                blocks.remove(&block);
            }
        });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.writable()?;
        self.check(offset, len)?;
        self.zero_range(offset, len, flags.may_trim);
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        // Already in memory: nothing to prefetch.
        self.check(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        self.check(offset, len)?;
        let blocks = self.blocks.read();
        let mut out: Vec<Extent> = Vec::new();
        Self::pieces(offset, len, |block, _, range| {
            let kind = match blocks.get(&block) {
                None => ExtentKind::Hole,
                Some(b) if b.iter().all(|&x| x == 0) => ExtentKind::Zero,
                Some(_) => ExtentKind::Data,
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.length_bytes += range.len() as u64,
                _ => out.push(Extent { length_bytes: range.len() as u64, kind }),
            }
        });
        Ok(out)
    }
}
