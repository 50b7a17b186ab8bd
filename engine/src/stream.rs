//! Send and receive: a commit of a dot, whole or as the changes since a base commit, as a versioned, checksummed
//! byte stream (the format is in `engine/docs/stream.md`).
//!
//! Receive writes into staging volumes (clones of the base commit's subdots), verifies every record and the
//! trailer's blake3, and only then makes the commit visible, with one dot op [I10]. A stream that is truncated,
//! corrupt, of a newer version or whose base is missing is refused, its staging volumes are deleted, and the dot is
//! as it was.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::dots::{CommitId, DEFAULT_SUBDOT};
use crate::format::ops::{meta, put_meta, CommitMeta, DotOp, Op};
use crate::format::{crc32, Dec, Enc, BLOCK_SIZE};
use crate::index::{Extent, ExtentKind, Root};
use crate::pool::Pool;
use crate::volume::{Target, Volume};
use crate::{Error, Result};

/// Identifies a blockmesh stream.
pub const STREAM_MAGIC: [u8; 8] = *b"BMSTREAM";
/// The stream version this build writes and reads.
pub const STREAM_VERSION: u32 = 2;
/// Most data bytes in one record.
pub const MAX_STREAM_DATA_BYTES: u64 = 1 << 20;
/// Largest header.
const MAX_STREAM_HEADER_BYTES: u32 = 64 << 10;

const REC_SUBDOT: u8 = 1;
const REC_DATA: u8 = 2;
const REC_ZERO: u8 = 3;
const REC_TRIM: u8 = 4;
const REC_END: u8 = 255;

/// What a send wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendStats {
    /// Records, the trailer excluded.
    pub records: u64,
    /// Volume data bytes carried.
    pub data_bytes: u64,
    /// Bytes of the whole stream.
    pub stream_bytes: u64,
    /// Bytes written to the output: the whole stream, or for [`Pool::send_from`] the head and what follows the
    /// offset.
    pub written_bytes: u64,
}

/// What a receive applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveOutcome {
    /// The dot.
    pub dot: String,
    /// The commit, with the sender's id.
    pub commit: CommitId,
    /// Records applied.
    pub records: u64,
    /// Volume data bytes written.
    pub data_bytes: u64,
}

/// Writes a stream: the head whole, then records, each folded into the hash chain; bytes before `skip_until` (a
/// resumed send) are counted and hashed but not written.
struct StreamWriter<'a> {
    inner: &'a mut dyn Write,
    chain: [u8; 32],
    pos: u64,
    skip_until: u64,
    written: u64,
}

impl StreamWriter<'_> {
    fn emit(&mut self, buf: &[u8]) -> Result<()> {
        let end = self.pos + buf.len() as u64;
        if end > self.skip_until {
            let from = self.skip_until.saturating_sub(self.pos) as usize;
            self.inner.write_all(&buf[from..]).map_err(|e| Error::io("stream write", self.pos, buf.len() as u64, e))?;
            self.written += (buf.len() - from) as u64;
        }
        self.pos = end;
        Ok(())
    }

    fn record(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        h.update(payload);
        let crc = h.finalize().to_le_bytes();
        if kind != REC_END {
            self.chain = chain_next(&self.chain, &head, payload, &crc);
        }
        self.emit(&head)?;
        self.emit(payload)?;
        self.emit(&crc)
    }
}

/// One link of the stream's hash chain: blake3 keyed with the previous link, over one whole record.
fn chain_next(prev: &[u8; 32], head: &[u8], payload: &[u8], crc: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(prev);
    h.update(head);
    h.update(payload);
    h.update(crc);
    *h.finalize().as_bytes()
}

/// The stream header.
#[derive(Debug, Clone)]
struct Header {
    dot: String,
    branch: String,
    commit: [u8; 16],
    base: Option<[u8; 16]>,
    meta: CommitMeta,
    subdots: Vec<(String, u64)>,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        for s in [&self.dot, &self.branch] {
            e.u8(s.len() as u8);
            e.bytes(s.as_bytes());
        }
        e.bytes(&self.commit);
        match &self.base {
            Some(b) => {
                e.u8(1);
                e.bytes(b);
            }
            None => e.u8(0),
        }
        put_meta(&mut e, &self.meta);
        e.u8(self.subdots.len() as u8);
        for (s, size) in &self.subdots {
            e.u8(s.len() as u8);
            e.bytes(s.as_bytes());
            e.u64(*size);
        }
        e.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut d = Dec::new(buf, "stream header", 0);
        let text = |d: &mut Dec<'_>| -> Result<String> {
            let n = d.u8()? as usize;
            let raw = d.bytes(n)?;
            String::from_utf8(raw.to_vec()).map_err(|_| d.bad("UTF-8", "other bytes"))
        };
        let dot = text(&mut d)?;
        let branch = text(&mut d)?;
        let mut commit = [0u8; 16];
        commit.copy_from_slice(d.bytes(16)?);
        let base = if d.u8()? == 1 {
            let mut b = [0u8; 16];
            b.copy_from_slice(d.bytes(16)?);
            Some(b)
        } else {
            None
        };
        let meta = meta(&mut d)?;
        let n = d.u8()? as usize;
        let mut subdots = Vec::with_capacity(n);
        for _ in 0..n {
            let s = text(&mut d)?;
            subdots.push((s, d.u64()?));
        }
        Ok(Header { dot, branch, commit, base, meta, subdots })
    }
}

fn bad(why: impl Into<String>) -> Error {
    Error::BadStream(why.into())
}

/// Reads records, verifying each checksum and extending the hash chain. A failed read of the input (its end, or
/// an error) sets `interrupted`: the stream stopped, nothing in it was wrong.
struct RecordReader<R> {
    inner: R,
    chain: [u8; 32],
    offset: u64,
    interrupted: Option<String>,
}

impl<R: Read> RecordReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        if let Err(e) = self.inner.read_exact(buf) {
            let eof = e.kind() == std::io::ErrorKind::UnexpectedEof;
            self.interrupted = Some(if eof { "end of input".to_string() } else { e.to_string() });
            return Err(if eof {
                bad(format!("stream truncated at byte {}", self.offset))
            } else {
                Error::io("stream read", self.offset, buf.len() as u64, e)
            });
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// The next record: kind and payload, checksum verified; the chain takes in every record but the trailer.
    fn next(&mut self) -> Result<(u8, Vec<u8>)> {
        let at = self.offset;
        let mut head = [0u8; 5];
        self.exact(&mut head)?;
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if u64::from(len) > MAX_STREAM_DATA_BYTES + 64 {
            return Err(bad(format!("record at byte {at} claims {len} bytes, more than any record holds")));
        }
        let mut payload = vec![0u8; len as usize];
        self.exact(&mut payload)?;
        let mut crc = [0u8; 4];
        self.exact(&mut crc)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        h.update(&payload);
        if h.finalize() != u32::from_le_bytes(crc) {
            return Err(bad(format!("record at byte {at} fails its checksum")));
        }
        if kind != REC_END {
            self.chain = chain_next(&self.chain, &head, &payload, &crc);
        }
        Ok((kind, payload))
    }
}

/// Where a receive stands: the end of the last record applied, and what is needed to go on from there. Kept in the
/// pool (in a hidden one-block volume next to the staging volumes) so an interrupted receive can resume.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    dot: String,
    head_digest: [u8; 32],
    offset: u64,
    records: u64,
    data_bytes: u64,
    chain: [u8; 32],
    subdot: Option<String>,
}

/// Identifies a receive progress block.
const PROGRESS_MAGIC: [u8; 8] = *b"BMRECVPG";
/// Version of the progress block.
const PROGRESS_VERSION: u32 = 1;
/// Size of the hidden volume holding a progress block.
const PROGRESS_VOLUME_BYTES: u64 = BLOCK_SIZE;
/// A receive makes its progress durable (a pool flush, then the progress block) every this many stream bytes, so a
/// crash costs at most this much of a resumed stream.
pub const RECEIVE_PROGRESS_INTERVAL_BYTES: u64 = 128 << 20;

impl Progress {
    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(&PROGRESS_MAGIC);
        e.u32(PROGRESS_VERSION);
        e.bytes(&self.head_digest);
        e.u64(self.offset);
        e.u64(self.records);
        e.u64(self.data_bytes);
        e.bytes(&self.chain);
        let subdot = self.subdot.as_deref().unwrap_or("");
        e.u8(subdot.len() as u8);
        e.bytes(subdot.as_bytes());
        e.u8(self.dot.len() as u8);
        e.bytes(self.dot.as_bytes());
        let crc = crc32(&e.buf);
        e.u32(crc);
        e.buf.resize(PROGRESS_VOLUME_BYTES as usize, 0);
        e.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut d = Dec::new(buf, "receive progress", 0);
        if d.bytes(8)? != PROGRESS_MAGIC {
            return Err(d.bad("receive progress magic", "other bytes"));
        }
        let version = d.u32()?;
        if version != PROGRESS_VERSION {
            return Err(d.bad(format!("progress version {PROGRESS_VERSION}"), version));
        }
        let mut head_digest = [0u8; 32];
        head_digest.copy_from_slice(d.bytes(32)?);
        let (offset, records, data_bytes) = (d.u64()?, d.u64()?, d.u64()?);
        let mut chain = [0u8; 32];
        chain.copy_from_slice(d.bytes(32)?);
        let text = |d: &mut Dec<'_>| -> Result<String> {
            let n = d.u8()? as usize;
            String::from_utf8(d.bytes(n)?.to_vec()).map_err(|_| d.bad("UTF-8", "other bytes"))
        };
        let subdot = Some(text(&mut d)?).filter(|s| !s.is_empty());
        let dot = text(&mut d)?;
        let end = buf.len() - d.remaining();
        let crc = d.u32()?;
        if crc != crc32(&buf[..end]) {
            return Err(d.bad(format!("crc32 {:08x}", crc32(&buf[..end])), format!("{crc:08x}")));
        }
        Ok(Progress { dot, head_digest, offset, records, data_bytes, chain, subdot })
    }
}

/// An interrupted receive, kept for [`Pool::resume_receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReceive {
    /// The dot the stream is for (empty when the receive stopped before it noted any progress: it starts over).
    pub dot: String,
    /// The commit it carries.
    pub commit: CommitId,
    /// Where a resumed stream continues (the end of the last record kept).
    pub resume_at_bytes: u64,
    /// Records applied so far.
    pub records: u64,
    /// Volume data bytes applied so far.
    pub data_bytes: u64,
}

/// Names of the hidden volumes of a receive: `#recv/<commit>` (progress) and `#recv/<commit>/<subdot>` (staging).
const RECEIVE_NAME_PREFIX: &str = "#recv/";

fn progress_name(tag: CommitId) -> String {
    format!("{RECEIVE_NAME_PREFIX}{tag}")
}

fn staging_name(tag: CommitId, subdot: &str) -> String {
    format!("{RECEIVE_NAME_PREFIX}{tag}/{subdot}")
}

/// Every hidden volume a receive of `tag` made (progress and staging), in id order.
fn receive_volumes(st: &crate::pool::State, tag: CommitId) -> Vec<u64> {
    let prefix = progress_name(tag);
    let mut ids: Vec<u64> = st
        .names
        .iter()
        .filter(|(n, _)| **n == prefix || n.strip_prefix(&prefix).is_some_and(|r| r.starts_with('/')))
        .map(|(_, id)| *id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Log the staging volume of each subdot of `h`: a clone of the base commit's snapshot (resized when the stream says
/// so) or an empty volume; records each in `staged`.
fn stage_subdots(
    st: &mut crate::pool::State,
    dev: &dyn crate::io::Device,
    h: &Header,
    base_snaps: Option<&BTreeMap<String, u64>>,
    staged: &mut BTreeMap<String, u64>,
) -> Result<()> {
    let tag = CommitId(h.commit);
    for (subdot, size) in &h.subdots {
        let name = staging_name(tag, subdot);
        let vol = st.next_volume_id;
        match base_snaps.and_then(|b| b.get(subdot)) {
            Some(sid) => {
                st.log_apply(dev, Op::CloneSnapshot { snapshot: *sid, volume: vol, name }, None)?;
                if st.volumes[&vol].size_bytes != *size {
                    st.log_apply(dev, Op::ResizeVolume { volume: vol, size_bytes: *size }, None)?;
                }
            }
            None => st.log_apply(dev, Op::CreateVolume { volume: vol, size_bytes: *size, name }, None)?,
        }
        staged.insert(subdot.clone(), vol);
    }
    Ok(())
}

/// The stream's head (magic, version, header, its checksum) as read, and the header.
struct Head {
    bytes: Vec<u8>,
    header: Header,
}

/// What a stream's head says, for a client deciding how to send it (resume or not) before it sends anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHead {
    /// The dot.
    pub dot: String,
    /// The commit carried.
    pub commit: CommitId,
    /// The base commit of an incremental stream.
    pub base: Option<CommitId>,
    /// The head's bytes as read: what a resumed stream starts with.
    pub bytes: Vec<u8>,
}

/// Read and check a stream's head (magic, version, header) from `input`, which is left at the first record.
pub fn read_stream_head(input: &mut dyn Read) -> Result<StreamHead> {
    let h = read_head(input)?;
    Ok(StreamHead {
        dot: h.header.dot,
        commit: CommitId(h.header.commit),
        base: h.header.base.map(CommitId),
        bytes: h.bytes,
    })
}

fn read_head(input: &mut dyn Read) -> Result<Head> {
    let mut fixed = [0u8; 16];
    input.read_exact(&mut fixed).map_err(|_| bad("stream truncated in its head"))?;
    if fixed[..8] != STREAM_MAGIC {
        return Err(bad("not a blockmesh stream (no stream magic)"));
    }
    let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    if version > STREAM_VERSION {
        return Err(Error::UnsupportedVersion { found: version, supported: STREAM_VERSION });
    }
    if version < STREAM_VERSION {
        return Err(bad(format!(
            "stream version {version} predates resumable streams (version {STREAM_VERSION}); send it again with this \
             build"
        )));
    }
    let hlen = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
    if hlen > MAX_STREAM_HEADER_BYTES {
        return Err(bad(format!("header of {hlen} bytes is larger than any header")));
    }
    let mut bytes = fixed.to_vec();
    bytes.resize(16 + hlen as usize + 4, 0);
    input.read_exact(&mut bytes[16..]).map_err(|_| bad("stream truncated in its head"))?;
    let hbytes = &bytes[16..16 + hlen as usize];
    if crc32(hbytes).to_le_bytes() != bytes[16 + hlen as usize..] {
        return Err(bad("stream header fails its checksum"));
    }
    let header = Header::decode(hbytes).map_err(|e| bad(format!("stream header: {e}")))?;
    crate::dots::validate_dot_name(&header.dot).map_err(|e| bad(format!("stream header: {e}")))?;
    Ok(Head { bytes, header })
}

impl Pool {
    /// Write `commit` of `dot` to `out`: whole, or (with `base`) only what changed since `base`.
    pub fn send(&self, dot: &str, commit: CommitId, base: Option<CommitId>, out: &mut dyn Write) -> Result<SendStats> {
        self.send_from(dot, commit, base, 0, out)
    }

    /// Write the stream of [`Pool::send`] for a resumed receive: its head (magic, version, header) whole, then only
    /// the stream bytes from `offset` on, where the receiver stopped ([`PendingReceive::resume_at_bytes`]). An
    /// `offset` inside the head writes the whole stream. The skipped part is still read and hashed: the trailer's hash
    /// covers the whole stream.
    pub fn send_from(
        &self,
        dot: &str,
        commit: CommitId,
        base: Option<CommitId>,
        offset: u64,
        out: &mut dyn Write,
    ) -> Result<SendStats> {
        let (head, plan) = self.send_plan(dot, commit, base)?;
        let skip_until = if offset > head.len() as u64 { offset } else { 0 };
        let mut w =
            StreamWriter { inner: out, chain: *blake3::hash(&head).as_bytes(), pos: 0, skip_until: 0, written: 0 };
        w.emit(&head)?;
        w.skip_until = skip_until; // the head always goes out
        let mut stats = SendStats::default();
        let incremental = base.is_some();
        for SubdotPlan { subdot, snapshot: sid, size, extents } in plan {
            let mut p = Enc::default();
            p.u8(subdot.len() as u8);
            p.bytes(subdot.as_bytes());
            p.u64(size);
            w.record(REC_SUBDOT, &p.buf)?;
            stats.records += 1;
            let snap = Volume::new(self.inner.clone(), Target::Snapshot(sid), format!("{dot}.{subdot}@{commit}"));
            for e in extents {
                let end = (e.offset_bytes + e.len_bytes).min(size);
                if e.offset_bytes >= end {
                    continue;
                }
                match e.kind {
                    ExtentKind::Data => {
                        let mut off = e.offset_bytes;
                        while off < end {
                            let n = (end - off).min(MAX_STREAM_DATA_BYTES);
                            let mut p = Vec::with_capacity(8 + n as usize);
                            p.extend_from_slice(&off.to_le_bytes());
                            p.resize(8 + n as usize, 0);
                            snap.read(off, &mut p[8..])?;
                            w.record(REC_DATA, &p)?;
                            stats.records += 1;
                            stats.data_bytes += n;
                            off += n;
                        }
                    }
                    ExtentKind::Zero => {
                        let mut p = Enc::default();
                        p.u64(e.offset_bytes);
                        p.u64(end - e.offset_bytes);
                        w.record(REC_ZERO, &p.buf)?;
                        stats.records += 1;
                    }
                    ExtentKind::Trimmed | ExtentKind::Hole if incremental => {
                        let mut p = Enc::default();
                        p.u64(e.offset_bytes);
                        p.u64(end - e.offset_bytes);
                        w.record(REC_TRIM, &p.buf)?;
                        stats.records += 1;
                    }
                    ExtentKind::Trimmed | ExtentKind::Hole => {} // a full stream starts from nothing
                }
            }
        }
        let mut p = Enc::default();
        p.u64(stats.records);
        p.u64(stats.data_bytes);
        p.bytes(&w.chain);
        w.record(REC_END, &p.buf)?;
        w.inner.flush().map_err(|e| Error::io("stream flush", w.pos, 0, e))?;
        stats.stream_bytes = w.pos;
        stats.written_bytes = w.written;
        Ok(stats)
    }

    /// The exact number of bytes [`Pool::send_from`] with these arguments writes, found without reading any data
    /// (for a `Content-Length`, or a progress bar).
    pub fn send_size(&self, dot: &str, commit: CommitId, base: Option<CommitId>, offset: u64) -> Result<u64> {
        let (head, plan) = self.send_plan(dot, commit, base)?;
        let record = |payload: u64| 5 + payload + 4;
        let mut total = head.len() as u64;
        for p in &plan {
            total += record(1 + p.subdot.len() as u64 + 8);
            for e in &p.extents {
                let end = (e.offset_bytes + e.len_bytes).min(p.size);
                if e.offset_bytes >= end {
                    continue;
                }
                let len = end - e.offset_bytes;
                total += match e.kind {
                    ExtentKind::Data => {
                        let full = len / MAX_STREAM_DATA_BYTES;
                        let rest = len % MAX_STREAM_DATA_BYTES;
                        full * record(8 + MAX_STREAM_DATA_BYTES) + if rest > 0 { record(8 + rest) } else { 0 }
                    }
                    ExtentKind::Zero => record(16),
                    ExtentKind::Trimmed | ExtentKind::Hole if base.is_some() => record(16),
                    ExtentKind::Trimmed | ExtentKind::Hole => 0,
                }
            }
        }
        total += record(8 + 8 + 32);
        let head_len = head.len() as u64;
        Ok(if offset > head_len { head_len + total.saturating_sub(offset) } else { total })
    }

    /// What a send of `commit` (since `base`) carries: the stream's head and, per subdot, the extents to send.
    fn send_plan(&self, dot: &str, commit: CommitId, base: Option<CommitId>) -> Result<(Vec<u8>, Vec<SubdotPlan>)> {
        let dev = &*self.inner.dev;
        // Under the lock: the header and, per subdot, the extents to send.
        let (header, plan) = {
            let mut st = self.inner.state.lock();
            st.check_open()?;
            let id = st.dot_id(dot)?;
            let c = st.commit_of(id, commit)?.clone();
            let base_snaps = match base {
                Some(b) => Some(st.commit_of(id, b)?.snapshots.clone()),
                None => None,
            };
            let mut plan = Vec::new();
            let mut subdots = Vec::new();
            for (subdot, sid) in &c.snapshots {
                let sn = st.snapshots.get(sid).ok_or_else(|| Error::NoSuchSnapshot(subdot.clone()))?.clone();
                let base_root: Option<Root> =
                    base_snaps.as_ref().and_then(|b| b.get(subdot)).and_then(|s| st.snapshots.get(s)).map(|s| s.root);
                let extents = match base_root {
                    Some(r) => st.index.diff(dev, r, sn.root)?,
                    None => st.index.allocation(dev, sn.root, 0, sn.size_bytes.div_ceil(BLOCK_SIZE))?,
                };
                subdots.push((subdot.clone(), sn.size_bytes));
                plan.push(SubdotPlan { subdot: subdot.clone(), snapshot: *sid, size: sn.size_bytes, extents });
            }
            let header = Header {
                dot: dot.to_string(),
                branch: c.branch.clone(),
                commit: commit.0,
                base: base.map(|b| b.0),
                meta: c.meta.clone(),
                subdots,
            };
            (header, plan)
        };
        let hbytes = header.encode();
        let mut head = Vec::with_capacity(16 + hbytes.len() + 4);
        head.extend_from_slice(&STREAM_MAGIC);
        head.extend_from_slice(&STREAM_VERSION.to_le_bytes());
        head.extend_from_slice(&(hbytes.len() as u32).to_le_bytes());
        head.extend_from_slice(&hbytes);
        head.extend_from_slice(&crc32(&hbytes).to_le_bytes());
        Ok((head, plan))
    }

    /// Apply a stream made by [`Pool::send`]: the commit appears with the sender's id, or, if anything about the
    /// stream is wrong, nothing changes and the error says what. A stream that stops early (its input ends or fails)
    /// is [`Error::StreamInterrupted`]: what arrived is kept, hidden, for [`Pool::resume_receive`]. A fresh receive of
    /// a commit drops what an earlier, interrupted one kept.
    pub fn receive(&self, input: &mut dyn Read) -> Result<ReceiveOutcome> {
        let head = read_head(input)?;
        let _claim = self.claim_receive(CommitId(head.header.commit))?;
        let digest = *blake3::hash(&head.bytes).as_bytes();
        let staged = self.stage(&head.header)?;
        let progress = Progress {
            dot: head.header.dot.clone(),
            head_digest: digest,
            offset: head.bytes.len() as u64,
            records: 0,
            data_bytes: 0,
            chain: digest,
            subdot: None,
        };
        self.apply_stream(input, &head.header, staged, progress)
    }

    /// Go on with an interrupted receive: `input` holds the stream's head and then the stream from byte `offset` on
    /// (what [`Pool::send_from`] writes), `offset` being where the receive stopped
    /// ([`PendingReceive::resume_at_bytes`]). The result is the same as one uninterrupted receive.
    pub fn resume_receive(&self, input: &mut dyn Read, offset: u64) -> Result<ReceiveOutcome> {
        let head = read_head(input)?;
        let h = &head.header;
        let tag = CommitId(h.commit);
        let _claim = self.claim_receive(tag)?;
        let staged = {
            let st = self.inner.state.lock();
            st.check_writable()?;
            let none = || bad(format!("no interrupted receive of commit {tag} of {} to resume; send it whole", h.dot));
            if let Some(id) = st.dot_names.get(&h.dot) {
                if st.dot(*id)?.commits.contains_key(&h.commit) {
                    return Err(bad(format!(
                        "{} already has commit {tag}; drop the leftover of its receive (abort)",
                        h.dot
                    )));
                }
            }
            let pid = st.names.get(&progress_name(tag)).copied().ok_or_else(none)?;
            let mut staged = BTreeMap::new();
            for (subdot, _) in &h.subdots {
                let vid = st.names.get(&staging_name(tag, subdot)).copied().ok_or_else(none)?;
                staged.insert(subdot.clone(), vid);
            }
            Staged { volumes: staged, progress: pid }
        };
        let p = self.read_progress(staged.progress, tag)?;
        if p.head_digest != *blake3::hash(&head.bytes).as_bytes() || p.dot != h.dot {
            return Err(bad(format!("this stream's header differs from the one of the interrupted receive of {tag}")));
        }
        if p.offset != offset {
            return Err(bad(format!(
                "the interrupted receive of {tag} goes on from byte {}, not {offset}; send the stream from there",
                p.offset
            )));
        }
        self.apply_stream(input, h, staged, p)
    }

    /// Mark a receive of `tag` as running until the claim is dropped; refused while another one runs (two receives
    /// of one commit would share, and delete, each other's staging volumes).
    fn claim_receive(&self, tag: CommitId) -> Result<ReceiveClaim<'_>> {
        let mut st = self.inner.state.lock();
        if !st.receiving.insert(tag.0) {
            return Err(bad(format!("another receive of commit {tag} is running; try again when it is done")));
        }
        Ok(ReceiveClaim { pool: self, tag })
    }

    /// Receives that were interrupted and can be resumed, oldest commit id first.
    pub fn pending_receives(&self) -> Result<Vec<PendingReceive>> {
        let found: Vec<(CommitId, u64)> = {
            let st = self.inner.state.lock();
            st.check_open()?;
            let mut v: Vec<(CommitId, u64)> = st
                .names
                .iter()
                .filter_map(|(name, id)| {
                    let tag = name.strip_prefix(RECEIVE_NAME_PREFIX).filter(|t| !t.contains('/'))?;
                    Some((tag.parse::<CommitId>().ok()?, *id))
                })
                .filter(|(tag, _)| !st.receiving.contains(&tag.0)) // running, not interrupted
                .collect();
            v.sort();
            v
        };
        let mut out = Vec::new();
        for (commit, vid) in found {
            let pending = match self.read_progress(vid, commit) {
                Ok(p) => PendingReceive {
                    dot: p.dot,
                    commit,
                    resume_at_bytes: p.offset,
                    records: p.records,
                    data_bytes: p.data_bytes,
                },
                // staged, but stopped before its first progress note was durable: nothing to resume, the stream
                // goes again from its start (a new receive of the commit drops these leftovers first)
                Err(Error::Corrupt { .. }) => {
                    PendingReceive { dot: String::new(), commit, resume_at_bytes: 0, records: 0, data_bytes: 0 }
                }
                Err(e) => return Err(e),
            };
            out.push(pending);
        }
        Ok(out)
    }

    /// Drop what an interrupted receive of `commit` kept.
    pub fn abort_receive(&self, commit: CommitId) -> Result<()> {
        let dev = &*self.inner.dev;
        let gate = &self.inner.reuse_gate;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let ids = receive_volumes(&st, commit);
        if ids.is_empty() {
            return Err(bad(format!("no interrupted receive of commit {commit}")));
        }
        st.ensure_room(dev, gate, 2 + ids.len() as u64)?;
        for id in ids {
            st.log_apply(dev, Op::DeleteVolume { volume: id }, None)?;
        }
        drop(st);
        self.flush()
    }

    fn read_progress(&self, vid: u64, tag: CommitId) -> Result<Progress> {
        let vol = Volume::new(self.inner.clone(), Target::Volume(vid), progress_name(tag));
        let mut buf = vec![0u8; PROGRESS_VOLUME_BYTES as usize];
        vol.read(0, &mut buf)?;
        Progress::decode(&buf)
    }

    /// Read the records after the head, keeping `progress`, then commit; see [`Pool::receive`] for what a failure
    /// leaves.
    fn apply_stream(
        &self,
        input: &mut dyn Read,
        h: &Header,
        staged: Staged,
        mut progress: Progress,
    ) -> Result<ReceiveOutcome> {
        let tag = CommitId(h.commit);
        let pvol = Volume::new(self.inner.clone(), Target::Volume(staged.progress), progress_name(tag));
        let mut r = RecordReader { inner: input, chain: progress.chain, offset: progress.offset, interrupted: None };
        match self.receive_records(&mut r, h, &staged.volumes, &pvol, &mut progress) {
            Ok(()) => {
                self.finish_receive(h, &staged)?;
                Ok(ReceiveOutcome {
                    dot: h.dot.clone(),
                    commit: tag,
                    records: progress.records,
                    data_bytes: progress.data_bytes,
                })
            }
            Err(e) => match r.interrupted.take() {
                Some(cause) => {
                    // keep what arrived: every record up to `progress` is applied; make that durable, then say so
                    pvol.write(0, &progress.encode())?;
                    self.flush()?;
                    Err(Error::StreamInterrupted {
                        commit: tag.to_string(),
                        ended_at_bytes: r.offset,
                        resume_at_bytes: progress.offset,
                        cause,
                    })
                }
                None => {
                    self.drop_staging(&staged);
                    Err(e)
                }
            },
        }
    }

    /// Staging volumes for a stream: clones of the base commit's subdots (or empty ones), named after the commit.
    fn stage(&self, h: &Header) -> Result<Staged> {
        let dev = &*self.inner.dev;
        let gate = &self.inner.reuse_gate;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let dot = st.dot_names.get(&h.dot).copied();
        if let Some(id) = dot {
            if st.dot(id)?.commits.contains_key(&h.commit) {
                return Err(bad(format!("{} already has commit {}", h.dot, CommitId(h.commit))));
            }
        }
        let base_snaps = match (h.base, dot) {
            (Some(b), Some(id)) => Some(
                st.commit_of(id, CommitId(b))
                    .map_err(|_| bad(format!("base commit {} of {} is not here; send it first", CommitId(b), h.dot)))?
                    .snapshots
                    .clone(),
            ),
            (Some(b), None) => {
                return Err(bad(format!("base commit {} of {} is not here; send it first", CommitId(b), h.dot)))
            }
            (None, _) => None,
        };
        if h.subdots.is_empty() || h.subdots.len() > crate::format::ops::MAX_SNAPSHOT_VOLUMES {
            return Err(bad(format!("stream carries {} subdots", h.subdots.len())));
        }
        // every check before anything is logged: a refused header leaves nothing behind
        let mut seen = std::collections::BTreeSet::new();
        for (subdot, size) in &h.subdots {
            if !seen.insert(subdot) {
                return Err(bad(format!("stream names subdot {subdot:?} twice")));
            }
            if subdot != DEFAULT_SUBDOT {
                crate::dots::validate_dot_name(&format!("x/{subdot}"))
                    .map_err(|_| bad(format!("subdot {subdot:?}")))?;
            }
            crate::pool::validate_volume_size(*size).map_err(|e| bad(format!("subdot {subdot}: {e}")))?;
        }
        let tag = CommitId(h.commit);
        let mut staged = BTreeMap::new();
        // leftovers of an interrupted receive of the same commit go first
        let old = receive_volumes(&st, tag);
        st.ensure_room(dev, gate, 6 + 2 * h.subdots.len() as u64 + old.len() as u64)?;
        for id in old {
            st.log_apply(dev, Op::DeleteVolume { volume: id }, None)?;
        }
        let progress = st.next_volume_id;
        let created = st
            .log_apply(
                dev,
                Op::CreateVolume { volume: progress, size_bytes: PROGRESS_VOLUME_BYTES, name: progress_name(tag) },
                None,
            )
            .and_then(|()| stage_subdots(&mut st, dev, h, base_snaps.as_ref(), &mut staged));
        if let Err(e) = created {
            // nothing half-staged stays behind (best effort: the pool may have failed, then open cleans nothing
            // up either, and the next receive of this commit drops the leftovers first)
            for id in receive_volumes(&st, tag) {
                let _ = st.log_apply(dev, Op::DeleteVolume { volume: id }, None);
            }
            return Err(e);
        }
        Ok(Staged { volumes: staged, progress })
    }

    fn receive_records<R: Read>(
        &self,
        r: &mut RecordReader<R>,
        h: &Header,
        staged: &BTreeMap<String, u64>,
        pvol: &Volume,
        progress: &mut Progress,
    ) -> Result<()> {
        let subdot_volume = |name: &str| -> Result<(Volume, u64)> {
            let vol = *staged.get(name).ok_or_else(|| bad(format!("record for unknown subdot {name:?}")))?;
            let size = h.subdots.iter().find(|(s, _)| s == name).map(|(_, sz)| *sz).unwrap_or(0);
            Ok((Volume::new(self.inner.clone(), Target::Volume(vol), name.to_string()), size))
        };
        let mut current: Option<(Volume, u64)> = match &progress.subdot {
            Some(name) => Some(subdot_volume(name)?),
            None => None,
        };
        let mut saved_at = progress.offset;
        loop {
            let (kind, p) = r.next()?;
            let at = r.offset;
            let mut d = Dec::new(&p, "stream record", at);
            let in_range = |off: u64, len: u64, size: u64| off.checked_add(len).is_some_and(|e| e <= size);
            match kind {
                REC_SUBDOT => {
                    let n = d.u8().map_err(|e| bad(e.to_string()))? as usize;
                    let name = String::from_utf8(d.bytes(n).map_err(|e| bad(e.to_string()))?.to_vec())
                        .map_err(|_| bad("subdot name is not UTF-8"))?;
                    let size = d.u64().map_err(|e| bad(e.to_string()))?;
                    if h.subdots.iter().all(|(s, sz)| s != &name || *sz != size) {
                        return Err(bad(format!("subdot {name:?} of {size} bytes does not match the header")));
                    }
                    current = Some(subdot_volume(&name)?);
                    progress.subdot = Some(name);
                }
                REC_DATA | REC_ZERO | REC_TRIM => {
                    let (vol, size) = current.as_ref().ok_or_else(|| bad("data before any subdot record"))?;
                    let off = d.u64().map_err(|e| bad(e.to_string()))?;
                    if kind == REC_DATA {
                        let bytes = &p[8..];
                        if bytes.is_empty() || !in_range(off, bytes.len() as u64, *size) {
                            return Err(bad(format!("data record at byte {at} is out of range")));
                        }
                        vol.write(off, bytes).map_err(|e| bad_or(e, at))?;
                        progress.data_bytes += bytes.len() as u64;
                    } else {
                        let len = d.u64().map_err(|e| bad(e.to_string()))?;
                        if len == 0 || !in_range(off, len, *size) {
                            return Err(bad(format!("range record at byte {at} is out of range")));
                        }
                        if kind == REC_ZERO {
                            vol.write_zeroes(off, len).map_err(|e| bad_or(e, at))?;
                        } else {
                            vol.trim(off, len).map_err(|e| bad_or(e, at))?;
                            // a trimmed range must read as zeroes on the receiver too, partial blocks included
                            zero_partial_edges(vol, off, len).map_err(|e| bad_or(e, at))?;
                        }
                    }
                }
                REC_END => {
                    let count = d.u64().map_err(|e| bad(e.to_string()))?;
                    let bytes = d.u64().map_err(|e| bad(e.to_string()))?;
                    let digest = d.bytes(32).map_err(|e| bad(e.to_string()))?;
                    if count != progress.records || bytes != progress.data_bytes {
                        return Err(bad(format!(
                            "trailer says {count} records and {bytes} data bytes, the stream had {} and {}",
                            progress.records, progress.data_bytes
                        )));
                    }
                    if digest != progress.chain {
                        return Err(bad("stream hash (blake3 chain) does not match its trailer"));
                    }
                    return Ok(());
                }
                other => return Err(bad(format!("unknown record kind {other} at byte {at}"))),
            }
            progress.records += 1;
            progress.offset = r.offset;
            progress.chain = r.chain;
            if progress.offset - saved_at >= RECEIVE_PROGRESS_INTERVAL_BYTES {
                // the records so far become durable first, then the block that says so
                self.flush()?;
                pvol.write(0, &progress.encode())?;
                saved_at = progress.offset;
            }
        }
    }

    /// Turn verified staging volumes into the commit, with one op [I10].
    fn finish_receive(&self, h: &Header, staged: &Staged) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        // The staged writes precede this op in the log, so replay never sees the commit without its data.
        let dot = match st.dot_names.get(&h.dot) {
            Some(id) => *id,
            None => st.next_volume_id,
        };
        let first = st.next_volume_id + 1;
        let staged_ops: Vec<(String, u64, u64)> =
            staged.volumes.iter().enumerate().map(|(i, (s, v))| (s.clone(), *v, first + i as u64)).collect();
        let next = first + staged.volumes.len() as u64;
        // The branch is created, or moved forward when its head is this commit's parent and it has no
        // uncommitted changes; otherwise it is left alone and the commit joins the history only.
        let move_branch = match st.dots.get(&dot).and_then(|d| d.branches.get(&h.branch).map(|b| (d, b))) {
            None => true,
            Some((d, b)) => {
                let parent = h.meta.parents.first();
                let fast_forward = b.head.is_some() && b.head.as_ref() == parent;
                let clean = b.head.and_then(|c| d.commits.get(&c)).is_some_and(|c| {
                    b.volumes.iter().all(|(s, vid)| {
                        let snap_root = c.snapshots.get(s).and_then(|sid| st.snapshots.get(sid)).map(|x| x.root);
                        let head_root = st.volumes.get(vid).map(|x| x.root);
                        snap_root.is_some() && snap_root == head_root
                    })
                });
                fast_forward && clean
            }
        };
        let heads = if move_branch {
            staged.volumes.keys().enumerate().map(|(i, s)| (s.clone(), next + i as u64)).collect()
        } else {
            Vec::new()
        };
        let change = DotOp::Receive {
            name: h.dot.clone(),
            branch: h.branch.clone(),
            commit: h.commit,
            meta: h.meta.clone(),
            staged: staged_ops,
            heads,
        };
        st.log_dot(dev, &self.inner.reuse_gate, dot, change)?;
        // the progress block has served; a crash before this leaves it behind, and the next receive or abort of
        // the commit's stream removes it
        st.log_meta(dev, &self.inner.reuse_gate, Op::DeleteVolume { volume: staged.progress })?;
        drop(st);
        self.flush()
    }

    /// Best effort: remove the hidden volumes of a refused stream.
    fn drop_staging(&self, staged: &Staged) {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        for vol in staged.volumes.values().chain([&staged.progress]) {
            if st.volumes.contains_key(vol) {
                let _ = st.log_apply(dev, Op::DeleteVolume { volume: *vol }, None);
            }
        }
    }
}

/// A running receive of one commit; ends the claim when dropped.
struct ReceiveClaim<'a> {
    pool: &'a Pool,
    tag: CommitId,
}

impl Drop for ReceiveClaim<'_> {
    fn drop(&mut self) {
        self.pool.inner.state.lock().receiving.remove(&self.tag.0);
    }
}

/// One subdot of a send: its snapshot, size, and the extents to send.
struct SubdotPlan {
    subdot: String,
    snapshot: u64,
    size: u64,
    extents: Vec<Extent>,
}

/// The hidden volumes of one receive: a staging volume per subdot, and the progress block's.
struct Staged {
    volumes: BTreeMap<String, u64>,
    progress: u64,
}

/// Errors of the volume below are the receiver's own (I/O, space); anything else means the stream was bad.
fn bad_or(e: Error, at: u64) -> Error {
    match e {
        Error::Io { .. } | Error::NoSpace(_) | Error::Failed(_) => e,
        other => bad(format!("record at byte {at}: {other}")),
    }
}

/// Zero the parts of `[off, off + len)` that lie in partial blocks (a trim leaves those as they were).
fn zero_partial_edges(vol: &Volume, off: u64, len: u64) -> Result<()> {
    let end = off + len;
    let lo = off.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let hi = end / BLOCK_SIZE * BLOCK_SIZE;
    if lo > hi {
        return vol.write_zeroes(off, len);
    }
    if off < lo {
        vol.write_zeroes(off, lo - off)?;
    }
    if hi < end && hi >= lo {
        vol.write_zeroes(hi, end - hi)?;
    }
    Ok(())
}
