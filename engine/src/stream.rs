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
pub const STREAM_VERSION: u32 = 1;
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

/// Hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, buf: &[u8]) -> Result<()> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        self.inner.write_all(buf).map_err(|e| Error::io("stream write", self.bytes, buf.len() as u64, e))
    }

    fn record(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        let mut head = Vec::with_capacity(5);
        head.push(kind);
        head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        h.update(payload);
        self.put(&head)?;
        self.put(payload)?;
        self.put(&h.finalize().to_le_bytes())
    }
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

/// Reads records, verifying each checksum and feeding the trailer's hash.
struct RecordReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    offset: u64,
}

impl<R: Read> RecordReader<R> {
    fn exact(&mut self, buf: &mut [u8], hash: bool) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad(format!("stream truncated at byte {}", self.offset))
            } else {
                Error::io("stream read", self.offset, buf.len() as u64, e)
            }
        })?;
        if hash {
            self.hasher.update(buf);
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// The next record: kind and payload, checksum verified.
    fn next(&mut self) -> Result<(u8, Vec<u8>)> {
        let at = self.offset;
        let mut head = [0u8; 5];
        // The trailer is not part of the hash; peek its kind first.
        self.inner.read_exact(&mut head[..1]).map_err(|_| bad(format!("stream truncated at byte {at}")))?;
        self.offset += 1;
        let kind = head[0];
        if kind != REC_END {
            self.hasher.update(&head[..1]);
        }
        let hash = kind != REC_END;
        self.exact(&mut head[1..], hash)?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if u64::from(len) > MAX_STREAM_DATA_BYTES + 64 {
            return Err(bad(format!("record at byte {at} claims {len} bytes, more than any record holds")));
        }
        let mut payload = vec![0u8; len as usize];
        self.exact(&mut payload, hash)?;
        let mut crc = [0u8; 4];
        self.exact(&mut crc, hash)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        h.update(&payload);
        if h.finalize() != u32::from_le_bytes(crc) {
            return Err(bad(format!("record at byte {at} fails its checksum")));
        }
        Ok((kind, payload))
    }
}

impl Pool {
    /// Write `commit` of `dot` to `out`: whole, or (with `base`) only what changed since `base`.
    pub fn send(&self, dot: &str, commit: CommitId, base: Option<CommitId>, out: &mut dyn Write) -> Result<SendStats> {
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
            let mut plan: Vec<(String, u64, u64, Vec<Extent>)> = Vec::new();
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
                plan.push((subdot.clone(), *sid, sn.size_bytes, extents));
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
        let mut w = Hashing { inner: out, hasher: blake3::Hasher::new(), bytes: 0 };
        let hbytes = header.encode();
        w.put(&STREAM_MAGIC)?;
        w.put(&STREAM_VERSION.to_le_bytes())?;
        w.put(&(hbytes.len() as u32).to_le_bytes())?;
        w.put(&hbytes)?;
        w.put(&crc32(&hbytes).to_le_bytes())?;
        let mut stats = SendStats::default();
        let incremental = base.is_some();
        for (subdot, sid, size, extents) in plan {
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
        let digest = w.hasher.finalize();
        let mut p = Enc::default();
        p.u64(stats.records);
        p.u64(stats.data_bytes);
        p.bytes(digest.as_bytes());
        // the trailer is written outside the hash it carries
        let mut head = vec![REC_END];
        head.extend_from_slice(&(p.buf.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&head);
        h.update(&p.buf);
        for part in [&head[..], &p.buf[..], &h.finalize().to_le_bytes()[..]] {
            w.inner.write_all(part).map_err(|e| Error::io("stream write", w.bytes, part.len() as u64, e))?;
            w.bytes += part.len() as u64;
        }
        w.inner.flush().map_err(|e| Error::io("stream flush", w.bytes, 0, e))?;
        stats.stream_bytes = w.bytes;
        Ok(stats)
    }

    /// Apply a stream made by [`Pool::send`]: the commit appears with the sender's id, or, if anything about the
    /// stream is wrong, nothing changes and the error says what.
    pub fn receive(&self, input: &mut dyn Read) -> Result<ReceiveOutcome> {
        let mut r = RecordReader { inner: input, hasher: blake3::Hasher::new(), offset: 0 };
        let mut fixed = [0u8; 16];
        r.exact(&mut fixed, true)?;
        if fixed[..8] != STREAM_MAGIC {
            return Err(bad("not a blockmesh stream (no stream magic)"));
        }
        let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        if version > STREAM_VERSION {
            return Err(Error::UnsupportedVersion { found: version, supported: STREAM_VERSION });
        }
        let hlen = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        if hlen > MAX_STREAM_HEADER_BYTES {
            return Err(bad(format!("header of {hlen} bytes is larger than any header")));
        }
        let mut hbytes = vec![0u8; hlen as usize];
        r.exact(&mut hbytes, true)?;
        let mut crc = [0u8; 4];
        r.exact(&mut crc, true)?;
        if crc32(&hbytes) != u32::from_le_bytes(crc) {
            return Err(bad("stream header fails its checksum"));
        }
        let h = Header::decode(&hbytes).map_err(|e| bad(format!("stream header: {e}")))?;
        crate::dots::validate_dot_name(&h.dot).map_err(|e| bad(format!("stream header: {e}")))?;
        let commit = CommitId(h.commit);
        let staged = self.stage(&h)?;
        match self.receive_records(&mut r, &h, &staged) {
            Ok((records, data_bytes)) => {
                self.finish_receive(&h, &staged)?;
                Ok(ReceiveOutcome { dot: h.dot.clone(), commit, records, data_bytes })
            }
            Err(e) => {
                self.drop_staging(&staged);
                Err(e)
            }
        }
    }

    /// Staging volumes for a stream: clones of the base commit's subdots (or empty ones), named after the commit.
    fn stage(&self, h: &Header) -> Result<BTreeMap<String, u64>> {
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
        let tag = CommitId(h.commit);
        let mut staged = BTreeMap::new();
        st.ensure_room(dev, gate, 4 + 2 * h.subdots.len() as u64)?;
        for (subdot, size) in &h.subdots {
            if subdot != DEFAULT_SUBDOT {
                crate::dots::validate_dot_name(&format!("x/{subdot}"))
                    .map_err(|_| bad(format!("subdot {subdot:?}")))?;
            }
            crate::pool::validate_volume_size(*size).map_err(|e| bad(format!("subdot {subdot}: {e}")))?;
            let name = format!("#recv/{tag}/{subdot}");
            // leftovers of an interrupted receive of the same commit go first
            if let Some(old) = st.names.get(&name).copied() {
                st.log_apply(dev, Op::DeleteVolume { volume: old }, None)?;
            }
            let vol = st.next_volume_id;
            match base_snaps.as_ref().and_then(|b| b.get(subdot)) {
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
        Ok(staged)
    }

    fn receive_records<R: Read>(
        &self,
        r: &mut RecordReader<R>,
        h: &Header,
        staged: &BTreeMap<String, u64>,
    ) -> Result<(u64, u64)> {
        let mut current: Option<(Volume, u64)> = None;
        let mut records = 0u64;
        let mut data_bytes = 0u64;
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
                    let vol = *staged.get(&name).ok_or_else(|| bad(format!("record for unknown subdot {name:?}")))?;
                    if h.subdots.iter().all(|(s, sz)| s != &name || *sz != size) {
                        return Err(bad(format!("subdot {name:?} of {size} bytes does not match the header")));
                    }
                    current = Some((Volume::new(self.inner.clone(), Target::Volume(vol), name), size));
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
                        data_bytes += bytes.len() as u64;
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
                    let ours = r.hasher.finalize();
                    if count != records || bytes != data_bytes {
                        return Err(bad(format!(
                            "trailer says {count} records and {bytes} data bytes, the stream had {records} and \
                             {data_bytes}"
                        )));
                    }
                    if digest != ours.as_bytes() {
                        return Err(bad("stream hash (blake3) does not match its trailer"));
                    }
                    return Ok((records, data_bytes));
                }
                other => return Err(bad(format!("unknown record kind {other} at byte {at}"))),
            }
            records += 1;
        }
    }

    /// Turn verified staging volumes into the commit, with one op [I10].
    fn finish_receive(&self, h: &Header, staged: &BTreeMap<String, u64>) -> Result<()> {
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
            staged.iter().enumerate().map(|(i, (s, v))| (s.clone(), *v, first + i as u64)).collect();
        let next = first + staged.len() as u64;
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
            staged.keys().enumerate().map(|(i, s)| (s.clone(), next + i as u64)).collect()
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
        drop(st);
        self.flush()
    }

    /// Best effort: remove the staging volumes of a refused stream.
    fn drop_staging(&self, staged: &BTreeMap<String, u64>) {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        for vol in staged.values() {
            if st.volumes.contains_key(vol) {
                let _ = st.log_apply(dev, Op::DeleteVolume { volume: *vol }, None);
            }
        }
    }
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
