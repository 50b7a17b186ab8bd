//! The log: appending records to the open segment, moving to the reserved next segment when it is full, and
//! replaying the records written since the last checkpoint.
//!
//! Writes to volumes gather in an open batch (one header block of ops, then the data blocks of the writes); the batch
//! is written when it is full, when the segment has no more room, and on flush, by the background writers of
//! [`writer`]. Reads of blocks still in the open batch, or in a write not yet completed, are served from memory.

mod copy;
mod writer;

use std::collections::BTreeSet;
use std::sync::Arc;

use writer::{BatchBuf, Pipeline};
pub use writer::{DEFAULT_LOG_WRITER_THREADS, MAX_LOG_WRITER_THREADS};

use crate::allocator::Segments;
use crate::format::ops::Op;
use crate::format::record::{RecordHeader, RecordKind, BODY_CAPACITY_BYTES};
use crate::format::superblock::LogCursor;
use crate::format::{crc32, Enc, BLOCK, BLOCK_SIZE};
use crate::io::Device;
use crate::{Error, Result};

/// Most data blocks in one batch (512 KiB): bounds the log buffer of the open batch.
pub(crate) const MAX_BATCH_DATA_BLOCKS: u32 = 128;

/// What an append may use: user data must leave the reserve to checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Volume writes and metadata operations.
    Data,
    /// Checkpoint records, which may use the reserved segments.
    Checkpoint,
    /// Ops that give space back (deletes, trims), which may use the reserved segments beyond what the next
    /// checkpoint needs; the caller checked that they fit [I14].
    Freeing,
}

#[derive(Debug)]
struct OpenBatch {
    pba: u64,
    body: Enc,
    n_data: u32,
    /// Every data block in it came from a large write ([`Log::uncached`]): written past the device's cache.
    uncached: bool,
}

/// Bytes of the batch buffer: the header block, then the data blocks.
const BATCH_BUFFER_BYTES: usize = BLOCK * (1 + MAX_BATCH_DATA_BLOCKS as usize);

/// The log writer.
#[derive(Debug)]
pub(crate) struct Log {
    pool_id: u64,
    seg: u64,
    next_seg: u64,
    /// Next free block of the open segment.
    pos: u64,
    /// Sequence number of the next record.
    seq: u64,
    batch: Option<OpenBatch>,
    /// Writes of sealed batches. Dropped before `buf`: the writers' ring may know that buffer, and the pipeline
    /// joins them (see `writer::register_buffers`).
    pipeline: Pipeline,
    /// The open batch's blocks, aligned for O_DIRECT and reused from batch to batch.
    buf: BatchBuf,
    /// Segments left free for checkpoints: user data fails with "out of space" rather than take them.
    pub(crate) reserve_segments: u64,
    /// What the op being logged was admitted as (by the room check before it): every record it appends, its
    /// partial-block writes included, may switch segments as that allows [I14].
    pub(crate) admitted: Purpose,
    /// Blocks written to the log since the last checkpoint.
    pub(crate) blocks_since_checkpoint: u64,
    /// Blocks written to the device in all (records, headers, checkpoints), for write-amplification figures.
    pub(crate) blocks_written: u64,
    /// Every record with a lower sequence number is on stable storage (a sync covered it); carried in every header.
    pub(crate) synced_below: u64,
    /// [`Log::blocks_written`] when the last sync of the whole log (a flush's or a checkpoint's) began: what the log
    /// wrote since is what the next one has to wait for.
    pub(crate) blocks_written_synced: u64,
    /// Syncs taken in [`Log::switch_segment`] to write over segments the cleaner emptied [I13].
    pub(crate) emptied_segment_syncs: u64,
    /// Set by a large volume write while it appends its blocks ([`Log::set_uncached`]): a batch whose data blocks
    /// all come from such writes is written with [`Device::write_uncached_at`]. Where it goes on disk and what a
    /// crash leaves of it are those of any batch [I2]; only the page cache is skipped.
    uncached: bool,
    /// Batches written past the device's cache, for the figures.
    pub(crate) uncached_batches: u64,
}

impl Log {
    pub(crate) fn new(
        pool_id: u64,
        segs: &Segments,
        cursor: LogCursor,
        reserve_segments: u64,
        dev: Arc<dyn Device>,
        writer_threads: usize,
    ) -> Self {
        debug_assert!(cursor.pba >= segs.first_pba(cursor.segment) && cursor.pba <= segs.end_pba(cursor.segment));
        let mut pipeline = Pipeline::new(dev, writer_threads, BATCH_BUFFER_BYTES);
        Self {
            pool_id,
            seg: cursor.segment,
            next_seg: cursor.next_segment,
            pos: cursor.pba,
            seq: cursor.seq,
            batch: None,
            buf: pipeline.buffer(),
            pipeline,
            reserve_segments,
            admitted: Purpose::Data,
            blocks_since_checkpoint: 0,
            blocks_written: 0,
            synced_below: 0,
            blocks_written_synced: 0,
            emptied_segment_syncs: 0,
            uncached: false,
            uncached_batches: 0,
        }
    }

    /// Mark the data blocks appended from now on as a large write's (`true`) or not. A large write's blocks are
    /// copied into the batch with streaming stores ([`copy`]); turning the mark off fences them, so that whatever
    /// reads the batch buffer after this call (a read of a block still in it, under the pool's lock, from any
    /// thread) sees them. [`Log::seal`] fences too when it seals in the middle of a large write, before the buffer
    /// goes to its writer.
    pub(crate) fn set_uncached(&mut self, uncached: bool) {
        if self.uncached && !uncached {
            copy::publish();
        }
        self.uncached = uncached;
    }

    /// Log writes submitted from buffers registered with the io_uring writer's ring.
    pub(crate) fn fixed_buffer_writes(&self) -> u64 {
        self.pipeline.fixed_writes()
    }

    /// Where the next record goes (with no batch open).
    pub(crate) fn cursor(&self) -> LogCursor {
        debug_assert!(self.batch.is_none(), "cursor with an open batch");
        LogCursor { segment: self.seg, pba: self.pos, next_segment: self.next_seg, seq: self.seq }
    }

    /// Segments the log must keep: the open one and the reserved next one.
    pub(crate) fn pinned_segments(&self) -> [u64; 2] {
        [self.seg, self.next_seg]
    }

    /// Record that a sync completed after every record below `seq` had been written; the segments the cleaner
    /// emptied whose copies that covers are free for the log from now on [I13].
    pub(crate) fn synced(&mut self, segs: &mut Segments, seq: u64) {
        self.synced_below = self.synced_below.max(seq);
        segs.free_moved(self.synced_below);
    }

    /// Blocks the log wrote since the last sync of the whole log began (they may be only in the page cache).
    pub(crate) fn unsynced_blocks(&self) -> u64 {
        self.blocks_written - self.blocks_written_synced
    }

    /// Record that a sync of the whole log, begun when [`Log::blocks_written`] was `blocks_written`, completed.
    pub(crate) fn synced_blocks(&mut self, blocks_written: u64) {
        self.blocks_written_synced = self.blocks_written_synced.max(blocks_written);
    }

    /// Whether a sync completed after every record below `seq` had been written.
    pub(crate) fn synced_through(&self, seq: u64) -> bool {
        self.synced_below >= seq
    }

    /// The sequence number the next record gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Skip `n` sequence numbers (after recovery, so stale records of a lost tail can never match [I3]).
    pub(crate) fn skip_seq(&mut self, n: u64) {
        self.seq += n;
    }

    /// The first block not yet taken: after the open batch, if one is open.
    fn tail_pba(&self) -> u64 {
        match &self.batch {
            Some(b) => b.pba + 1 + u64::from(b.n_data),
            None => self.pos,
        }
    }

    /// Blocks the log can still take for user data without touching the reserve. A reserve a checkpoint dipped into
    /// counts against the open segment's room, so the next op cleans it back before it logs anything [I14].
    pub(crate) fn data_room_blocks(&self, segs: &Segments) -> u64 {
        let in_seg = segs.end_pba(self.seg).saturating_sub(self.tail_pba());
        (in_seg + segs.free_count() * segs.blocks_per_segment)
            .saturating_sub(self.reserve_segments * segs.blocks_per_segment)
    }

    /// Whether the free segments cover the checkpoint reserve [I14].
    pub(crate) fn reserve_intact(&self, segs: &Segments) -> bool {
        segs.free_count() >= self.reserve_segments
    }

    /// Blocks the log can still take, the checkpoint reserve included.
    pub(crate) fn free_blocks(&self, segs: &Segments) -> u64 {
        segs.end_pba(self.seg).saturating_sub(self.tail_pba()) + segs.free_count() * segs.blocks_per_segment
    }

    fn room_in_segment(&self, segs: &Segments) -> u64 {
        segs.end_pba(self.seg).saturating_sub(self.pos)
    }

    /// Move to the reserved next segment and reserve another.
    fn switch_segment(&mut self, dev: &dyn Device, segs: &mut Segments, purpose: Purpose) -> Result<()> {
        if purpose == Purpose::Data && segs.free_count() <= self.reserve_segments {
            return Err(Error::NoSpace(format!(
                "{} free segments left, {} reserved for checkpoints",
                segs.free_count(),
                self.reserve_segments
            )));
        }
        if segs.only_moved_free() {
            // only segments the cleaner emptied are left: a sync makes the copies of their blocks durable before
            // the log writes over them [I13] (every record below moved_below was written: the cleaner drains the
            // log before it copies, and writes its records in the caller)
            let below = segs.moved_below();
            if !self.synced_through(below) {
                dev.sync()?;
                self.emptied_segment_syncs += 1;
            }
            self.synced(segs, below);
        }
        let new_next = segs
            .take_free()
            .ok_or_else(|| Error::NoSpace("no free segment left for the log to continue".to_string()))?;
        self.seg = self.next_seg;
        self.next_seg = new_next;
        self.pos = segs.first_pba(self.seg);
        Ok(())
    }

    /// Append one op to the open batch (opening one if needed); returns the physical block given to `data`.
    pub(crate) fn append_op(
        &mut self,
        dev: &dyn Device,
        segs: &mut Segments,
        op: &Op,
        data: Option<&[u8]>,
    ) -> Result<Option<u64>> {
        let need_body = op.encoded_len();
        assert!(need_body <= BODY_CAPACITY_BYTES);
        if let Some(b) = &self.batch {
            let full_body = b.body.len() + need_body > BODY_CAPACITY_BYTES;
            let full_data = data.is_some()
                && (b.n_data >= MAX_BATCH_DATA_BLOCKS || b.pba + 2 + u64::from(b.n_data) > segs.end_pba(self.seg));
            if full_body || full_data {
                self.seal()?;
            }
        }
        if self.batch.is_none() {
            if self.room_in_segment(segs) < 2 {
                self.switch_segment(dev, segs, self.admitted)?;
            }
            self.batch = Some(OpenBatch {
                pba: self.pos,
                body: Enc::with_capacity(BODY_CAPACITY_BYTES),
                n_data: 0,
                uncached: true,
            });
        }
        let b = self.batch.as_mut().unwrap_or_else(|| unreachable!("batch opened above"));
        op.encode(&mut b.body);
        Ok(data.map(|d| {
            assert_eq!(d.len(), BLOCK);
            b.uncached &= self.uncached;
            b.n_data += 1;
            // data block i sits after the header block, at buffer block 1 + i: copied once, written as is; past
            // the CPU's caches when the batch is going past the device's (`copy`)
            let at = b.n_data as usize * BLOCK;
            let dst = &mut self.buf.as_mut_slice()[at..at + BLOCK];
            if self.uncached {
                copy::copy_block_streaming(dst, d);
            } else {
                dst.copy_from_slice(d);
            }
            b.pba + u64::from(b.n_data)
        }))
    }

    /// Copy a block still in the open batch; false if `pba` is not there.
    pub(crate) fn read_buffered(&self, pba: u64, out: &mut [u8]) -> bool {
        match &self.batch {
            Some(b) if pba > b.pba && pba <= b.pba + u64::from(b.n_data) => {
                let i = (pba - b.pba) as usize * BLOCK;
                out.copy_from_slice(&self.buf.as_slice()[i..i + BLOCK]);
                true
            }
            _ => self.pipeline.read_buffered(pba, out),
        }
    }

    /// Whether appending `blocks` more (data blocks and their ops) seals no batch that would wait for the log
    /// writers: every batch it may seal finds room among the writes in flight.
    pub(crate) fn can_seal_now(&self, blocks: u64) -> bool {
        let batches = blocks.div_ceil(u64::from(MAX_BATCH_DATA_BLOCKS)) + 1;
        self.pipeline.has_room(batches)
    }

    /// Wait for every batch write in flight (before a sync).
    pub(crate) fn drain(&mut self) -> Result<()> {
        self.pipeline.drain()
    }

    /// Hand the open batch, if any, to the writers.
    pub(crate) fn seal(&mut self) -> Result<()> {
        let Some(b) = self.batch.take() else { return Ok(()) };
        let header = RecordHeader {
            kind: RecordKind::Batch,
            pool_id: self.pool_id,
            seq: self.seq,
            payload_blocks: b.n_data,
            next_segment: self.next_seg,
            payload_crc: 0,
            synced_below: self.synced_below,
            body: b.body.buf,
        };
        let blocks = 1 + u64::from(b.n_data);
        self.buf.as_mut_slice()[..BLOCK].copy_from_slice(&header.encode());
        // a large write still appending: the writer the buffer goes to sees its streamed copies (every other
        // streamed copy was fenced when its write ended, `set_uncached(false)`)
        if self.uncached {
            copy::publish();
        }
        let full = std::mem::replace(&mut self.buf, BatchBuf::plain(0));
        let uncached = b.uncached && b.n_data > 0;
        self.uncached_batches += u64::from(uncached);
        match self.pipeline.submit(b.pba, full, blocks as usize * BLOCK, uncached) {
            Ok(next) => self.buf = next,
            Err(e) => {
                self.buf = BatchBuf::plain(BATCH_BUFFER_BYTES);
                return Err(e);
            }
        }
        self.seq += 1;
        self.pos = b.pba + blocks;
        self.blocks_since_checkpoint += blocks;
        self.blocks_written += blocks;
        Ok(())
    }

    /// Append a whole record (checkpoint kinds); returns the physical block of its first payload block.
    pub(crate) fn append_record(
        &mut self,
        dev: &dyn Device,
        segs: &mut Segments,
        kind: RecordKind,
        body: Vec<u8>,
        payload: &[u8],
        payload_crc: u32,
    ) -> Result<u64> {
        self.seal()?;
        assert_eq!(payload.len() % BLOCK, 0);
        let n = (payload.len() / BLOCK) as u64;
        if n + 1 > segs.blocks_per_segment {
            return Err(Error::Limit(format!(
                "a {kind:?} record of {n} blocks does not fit in a segment of {} blocks; create the pool with \
                 larger segments",
                segs.blocks_per_segment
            )));
        }
        if self.room_in_segment(segs) < n + 1 {
            self.switch_segment(dev, segs, Purpose::Checkpoint)?;
        }
        let header = RecordHeader {
            kind,
            pool_id: self.pool_id,
            seq: self.seq,
            payload_blocks: n as u32,
            next_segment: self.next_seg,
            payload_crc,
            synced_below: self.synced_below,
            body,
        };
        let at = self.pos;
        // header and payload in two writes: the payload (up to a segment) is not copied to join them; a crash
        // between them leaves a record replay rejects or skips, as a torn one [I2][I13]
        dev.write_at(&header.encode(), at * BLOCK_SIZE)?;
        if !payload.is_empty() {
            dev.write_at(payload, (at + 1) * BLOCK_SIZE)?;
        }
        // only a hint, as for batches: the next sync (a moving pass's, a checkpoint's) finds the record written
        let _ = dev.start_writeback(at * BLOCK_SIZE, (1 + n) * BLOCK_SIZE);
        self.seq += 1;
        self.pos = at + 1 + n;
        self.blocks_written += 1 + n;
        Ok(at + 1)
    }
}

/// One record found by replay.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub(crate) header: RecordHeader,
    /// Physical block of the header.
    pub(crate) pba: u64,
    /// Decoded ops (batches only).
    pub(crate) ops: Vec<Op>,
}

impl Replayed {
    /// For a `Moved` record: each moved vbn with the physical block of its copy [I13].
    pub(crate) fn moved(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let moved = if self.header.kind == RecordKind::Moved { &self.header.body[..] } else { &[] };
        moved.chunks_exact(8).enumerate().map(|(i, v)| (crate::format::le_u64(v, 0), self.pba + 1 + i as u64))
    }
}

/// Where replay stopped.
#[derive(Debug)]
pub(crate) struct ReplayEnd {
    pub(crate) cursor: LogCursor,
    pub(crate) segments_visited: BTreeSet<u64>,
    pub(crate) records: u64,
}

/// Read a record at `pba` expecting sequence `seq`; `None` if there is no valid such record there [I2].
fn read_record(
    dev: &dyn Device,
    segs: &Segments,
    pool_id: u64,
    seg: u64,
    pba: u64,
    seq: u64,
) -> Result<Option<Replayed>> {
    if seg >= segs.count || pba < segs.first_pba(seg) || pba + 1 > segs.end_pba(seg) {
        return Ok(None);
    }
    let mut hbuf = vec![0u8; BLOCK];
    dev.read_at(&mut hbuf, pba * BLOCK_SIZE)?;
    let header = match RecordHeader::decode(&hbuf, pool_id)? {
        Ok(h) if h.seq == seq => h,
        _ => return Ok(None),
    };
    let n = u64::from(header.payload_blocks);
    if pba + 1 + n > segs.end_pba(seg) {
        return Ok(None);
    }
    let mut ops = Vec::new();
    if header.kind == RecordKind::Batch {
        let Ok(decoded) = Op::decode_all(&header.body, pba * BLOCK_SIZE) else { return Ok(None) };
        ops = decoded;
        let writes: Vec<u32> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Write { crc, .. } => Some(*crc),
                _ => None,
            })
            .collect();
        if writes.len() as u64 != n {
            return Ok(None);
        }
        if n > 0 {
            let mut data = vec![0u8; (n as usize) * BLOCK];
            dev.read_at(&mut data, (pba + 1) * BLOCK_SIZE)?;
            for (block, crc) in data.chunks(BLOCK).zip(&writes) {
                if crc32(block) != *crc {
                    return Ok(None); // a torn batch: the log ends before it
                }
            }
        }
    }
    if header.kind == RecordKind::Moved {
        // the body lists one vbn per payload block, and the payload must be whole: a torn copy ends the log [I13]
        if header.body.len() as u64 != 8 * n || n == 0 {
            return Ok(None);
        }
        let mut data = vec![0u8; (n as usize) * BLOCK];
        dev.read_at(&mut data, (pba + 1) * BLOCK_SIZE)?;
        if crc32(&data) != header.payload_crc {
            return Ok(None);
        }
    }
    Ok(Some(Replayed { header, pba, ops }))
}

/// Most blocks replay scans past its end for a record that proves a synced record missing.
pub(crate) const MAX_REPLAY_SCAN_BLOCKS: u64 = 1 << 16;
/// Blocks read at a time by that scan.
const REPLAY_SCAN_CHUNK_BLOCKS: u64 = 256;

/// A valid record after `cursor` (in the rest of its segment, or in the next) with a higher sequence number whose
/// `synced_below` covers `cursor.seq`: `(pba, seq, synced_below)`.
fn later_synced_record(
    dev: &dyn Device,
    segs: &Segments,
    pool_id: u64,
    cursor: &LogCursor,
) -> Result<Option<(u64, u64, u64)>> {
    let mut ranges = Vec::new();
    if cursor.segment < segs.count {
        ranges.push((cursor.pba + 1, segs.end_pba(cursor.segment)));
    }
    if cursor.next_segment < segs.count && cursor.next_segment != cursor.segment {
        ranges.push((segs.first_pba(cursor.next_segment), segs.end_pba(cursor.next_segment)));
    }
    let mut scanned = 0u64;
    for (from, to) in ranges {
        let mut at = from;
        while at < to && scanned < MAX_REPLAY_SCAN_BLOCKS {
            let n = (to - at).min(REPLAY_SCAN_CHUNK_BLOCKS);
            let mut buf = vec![0u8; (n as usize) * BLOCK];
            dev.read_at(&mut buf, at * BLOCK_SIZE)?;
            for (i, block) in buf.chunks(BLOCK).enumerate() {
                if let Ok(h) = RecordHeader::decode(block, pool_id)? {
                    if h.seq > cursor.seq && h.synced_below > cursor.seq {
                        return Ok(Some((at + i as u64, h.seq, h.synced_below)));
                    }
                }
            }
            at += n;
            scanned += n;
        }
    }
    Ok(None)
}

/// Replay the log from `start`: call `apply` for every valid record in sequence, stop at the first gap [I2].
pub(crate) fn replay(
    dev: &dyn Device,
    segs: &Segments,
    pool_id: u64,
    start: LogCursor,
    mut apply: impl FnMut(Replayed) -> Result<()>,
) -> Result<ReplayEnd> {
    let mut cursor = start;
    let mut visited = BTreeSet::new();
    let mut records = 0u64;
    loop {
        let here = read_record(dev, segs, pool_id, cursor.segment, cursor.pba, cursor.seq)?;
        let found = match here {
            Some(r) => Some((cursor.segment, r)),
            None if cursor.next_segment < segs.count => {
                let next = cursor.next_segment;
                read_record(dev, segs, pool_id, next, segs.first_pba(next), cursor.seq)?.map(|r| (next, r))
            }
            None => None,
        };
        let Some((seg, r)) = found else {
            // The log ends here, or a record is damaged. A torn, unflushed tail is expected after a crash; but if a
            // later record says this one had been synced, losing it would silently drop flushed writes [I2].
            if let Some((at, seq, below)) = later_synced_record(dev, segs, pool_id, &cursor)? {
                return Err(Error::corrupt(
                    "log",
                    cursor.pba * BLOCK_SIZE,
                    format!(
                        "log record {} intact (record {seq} at device offset {} says every record below {below} was \
                         synced)",
                        cursor.seq,
                        at * BLOCK_SIZE
                    ),
                    "a damaged or missing record",
                ));
            }
            break;
        };
        if r.header.next_segment >= segs.count {
            // (checksummed, so written so or resealed: the log would later switch to a segment that does not exist)
            return Err(Error::corrupt(
                "log record",
                r.pba * BLOCK_SIZE,
                format!("a next segment below {}", segs.count),
                r.header.next_segment,
            ));
        }
        let n = 1 + u64::from(r.header.payload_blocks);
        visited.insert(seg);
        cursor = LogCursor { segment: seg, pba: r.pba + n, next_segment: r.header.next_segment, seq: cursor.seq + 1 };
        apply(r)?;
        records += 1;
    }
    Ok(ReplayEnd { cursor, segments_visited: visited, records })
}
