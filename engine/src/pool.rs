//! The pool: one device holding volumes. Creation, opening (recovery), checkpoints, and the operations every volume
//! change goes through, applied identically when they happen and when the log is replayed after a crash.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::allocator::Segments;
use crate::format::checkpoint::{Checkpoint, PageLoc, SnapshotRecord, VolumeRecord};
use crate::format::node::{encode_page, Page, Slot, FANOUT_BITS};
use crate::format::ops::{Op, MAX_SNAPSHOT_VOLUMES, MAX_VOLUME_NAME_BYTES};
use crate::format::record::{RecordHeader, RecordKind, BODY_CAPACITY_BYTES};
use crate::format::superblock::{LogCursor, SlotContents, Superblock};
use crate::format::{crc32, BLOCK, BLOCK_SIZE, FORMAT_VERSION, SEGMENT_AREA_OFFSET, SUPERBLOCK_OFFSETS};
use crate::index::{BlockTable, Extent, Index, Mapping, MappingKind, Root};
use crate::io::{Device, FileDevice, SECTOR_SIZE};
use crate::journal::{self, Log, Purpose, DEFAULT_LOG_WRITER_THREADS, MAX_BATCH_DATA_BLOCKS};
use crate::volume::{Target, Volume};
use crate::{Error, Result};

/// Segment size when none is given.
pub const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 8 << 20;
/// Smallest segment size a pool may be created with.
pub const MIN_SEGMENT_SIZE_BYTES: u64 = 128 << 10;
/// Largest segment size a pool may be created with.
pub const MAX_SEGMENT_SIZE_BYTES: u64 = 1 << 30;
/// Fewest segments a pool may have.
pub const MIN_SEGMENTS: u64 = 8;
/// Largest volume.
pub const MAX_VOLUME_SIZE_BYTES: u64 = 1 << 50;
/// Most volumes in one pool.
pub const MAX_VOLUMES: usize = 100_000;
/// Largest `next_vbn` a checkpoint of a pool written before format 5 may name (vbns were never reused then, and the
/// block table's page vector, 8 bytes per 256 vbns, grows to it: 128 MiB at this bound, ~16 TiB written over the
/// pool's life). From format 5 on, `next_vbn` comes from the block table itself [I9].
pub const MAX_NEXT_VBN_BEFORE_FORMAT_5: u64 = 1 << 32;
/// Largest read or write request.
pub const MAX_IO_BYTES: u64 = 32 << 20;
/// Log written between two automatic checkpoints when none is given: bounds recovery time (replaying 1 GiB takes
/// 0.25-0.4 s here; see benches/RESULTS.md).
pub const DEFAULT_CHECKPOINT_INTERVAL_BYTES: u64 = 1 << 30;
/// Volume writes at least this large go to the log past the device's cache ([`crate::Device::write_uncached_at`])
/// unless the options say otherwise: the size of the requests of bulk copies (nbdcopy's 256 KiB, qemu-img convert's
/// 2 MiB, fio's 1 MiB sequential rows), whose data a cached file would copy once more and write back itself.
pub const DEFAULT_UNCACHED_WRITE_MIN_BYTES: u64 = 256 << 10;
/// A checkpoint comes early, after 1/this of the checkpoint interval, once the segments emptied since the last one
/// hold as much: it gives them back to the log while their pages are still in the page cache, where the log writes
/// over them again (measured: 1 MiB sequential NBD overwrites of a 1 GiB volume kept a 1.4 GiB pool file instead of
/// 2.1 GiB, and ran at a median 1,185 vs 1,059 MB/s over six A/B pairs).
pub const EARLY_CHECKPOINT_SHARE: u64 = 4;
/// Most dirty metadata blocks (tree nodes and table pages) before an automatic checkpoint: 64 MiB. The index is in
/// memory anyway; this bounds one checkpoint's size (and the space reserved for it). At 4096 blocks, checkpoints came
/// so often after a snapshot (old blocks' table entries are spread thin) that random writes ran at 0.59x.
pub const MAX_DIRTY_METADATA_BLOCKS: u64 = 16384;
/// Blocks a checkpoint record may need beyond the last one's payload: its header, growth of the catalog since, and
/// the headers of the node and page records before it.
const CHECKPOINT_RECORD_SLACK_BLOCKS: u64 = 8;
/// Checkpoints also clean when fewer than 1/this of the segments (beyond the reserve) are free.
pub const CLEAN_START_FREE_SHARE: u64 = 8;

/// What a whole-block write logs: a zero mapping when every byte is zero, else the data with its checksum. Pure, so
/// writers compute it before they take the pool's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockSum {
    /// Every byte is zero: no data block is written.
    Zero,
    /// CRC-32 of the block.
    Crc(u32),
}

impl BlockSum {
    pub(crate) fn of(block: &[u8]) -> Self {
        if block.iter().all(|&b| b == 0) {
            Self::Zero
        } else {
            Self::Crc(crc32(block))
        }
    }
}

/// Options for creating or opening a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Segment size (creation only): a power of two between [`MIN_SEGMENT_SIZE_BYTES`] and
    /// [`MAX_SEGMENT_SIZE_BYTES`].
    pub segment_size_bytes: u64,
    /// Log written between automatic checkpoints.
    pub checkpoint_interval_bytes: u64,
    /// Pool identity (creation only); random when `None`.
    pub pool_id: Option<u64>,
    /// Background threads writing the log (0: writes happen in the calling thread, in a deterministic order).
    pub log_writer_threads: usize,
    /// A background thread cleans segments between client writes, within a bounded share of the time, and syncs the
    /// log outside the pool lock as it grows (`cleaner::background`). Off: cleaning happens only when writes need
    /// room and at checkpoints, and the log is synced only by flushes and checkpoints, so I/O follows the calls alone
    /// (deterministic test harnesses turn it off).
    pub background_cleaning: bool,
    /// Volume writes of at least this many bytes are logged in batches written past the device's cache
    /// ([`crate::Device::write_uncached_at`]; on a [`crate::FileDevice`], O_DIRECT beside the cached descriptor);
    /// `u64::MAX`: never. Only where the bytes go on their way to the disk changes, not what a crash keeps.
    pub uncached_write_min_bytes: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            segment_size_bytes: DEFAULT_SEGMENT_SIZE_BYTES,
            checkpoint_interval_bytes: DEFAULT_CHECKPOINT_INTERVAL_BYTES,
            pool_id: None,
            log_writer_threads: DEFAULT_LOG_WRITER_THREADS,
            background_cleaning: true,
            uncached_write_min_bytes: DEFAULT_UNCACHED_WRITE_MIN_BYTES,
        }
    }
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size_bytes: u64,
}

/// Figures about a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of the pool.
    pub pool_size_bytes: u64,
    /// Segment size.
    pub segment_size_bytes: u64,
    /// Segments in all.
    pub segments: u64,
    /// Segments free for the log.
    pub free_segments: u64,
    /// Blocks referenced by the current state.
    pub live_blocks: u64,
    /// Bytes of free segments.
    pub free_bytes: u64,
    /// Bytes in segments in use that nothing references any more: what cleaning ([`Pool::clean`]) gives back.
    pub reclaimable_bytes: u64,
    /// Blocks written to the device since the pool was opened.
    pub blocks_written: u64,
    /// Volumes.
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
    /// Dots.
    pub dots: u64,
    /// Bytes of memory the index uses (loaded nodes and block-table pages).
    pub index_memory_bytes: u64,
    /// Checkpoint generation of the superblock.
    pub generation: u64,
    /// Log records replayed when the pool was opened.
    pub replayed_records: u64,
    /// Checkpoints since the pool was opened.
    pub checkpoints: u64,
    /// Cleaning passes since the pool was opened (moving passes included).
    pub clean_passes: u64,
    /// Of those, moving passes: blocks moved between checkpoints, made durable by a later sync, not a checkpoint.
    pub moving_passes: u64,
    /// Segments moving passes emptied that wait for a sync before the log writes over them (counted in
    /// `free_segments`) (invariant I13).
    pub emptied_segments: u64,
    /// Syncs the log took itself, since the pool was opened, because only emptied segments were left to write into
    /// (no flush, checkpoint or background sync had covered them yet).
    pub emptied_segment_syncs: u64,
    /// Log batches written past the device's cache since the pool was opened (those of large writes,
    /// [`PoolOptions::uncached_write_min_bytes`]).
    pub uncached_batches: u64,
    /// Log writes since the pool was opened that the io_uring writer submitted from batch buffers registered with
    /// its ring (their pages pinned once, not for every write); 0 without io_uring or where the kernel refuses to
    /// register them (e.g. over `RLIMIT_MEMLOCK`).
    pub fixed_buffer_writes: u64,
    /// Blocks the cleaner copied since the pool was opened.
    pub cleaned_blocks: u64,
    /// Steps the background cleaner took since the pool was opened (moving passes and checkpoints; also counted
    /// above).
    pub background_clean_steps: u64,
    /// Syncs of the log the background thread took since the pool was opened, outside the pool lock, each once
    /// `BACKGROUND_SYNC_LOG_BYTES` had been written since the last sync (so that checkpoints, which sync under the
    /// lock, find the log mostly on disk already).
    pub background_log_syncs: u64,
    /// Free segments the pool keeps by cleaning at checkpoints and in the background, when it can (the checkpoint
    /// reserve and 1/`CLEAN_START_FREE_SHARE` of the segments).
    pub clean_target_free_segments: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct VolumeState {
    pub(crate) name: String,
    pub(crate) size_bytes: u64,
    pub(crate) root: Root,
}

/// A read-only snapshot of a volume.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotState {
    pub(crate) name: String,
    pub(crate) size_bytes: u64,
    pub(crate) root: Root,
    pub(crate) generation: u64,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Size of the volume when it was taken.
    pub size_bytes: u64,
    /// Birth generation when it was taken: blocks it maps were written at or before it.
    pub generation: u64,
}

/// Everything behind the pool lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) sb: Superblock,
    pub(crate) segs: Segments,
    pub(crate) log: Log,
    pub(crate) index: Index,
    pub(crate) volumes: BTreeMap<u64, VolumeState>,
    /// Volume and snapshot names (one namespace) to ids.
    pub(crate) names: HashMap<String, u64>,
    pub(crate) snapshots: BTreeMap<u64, SnapshotState>,
    pub(crate) dots: BTreeMap<u64, crate::dots::DotState>,
    pub(crate) dot_names: HashMap<String, u64>,
    pub(crate) next_volume_id: u64,
    /// Birth generation of new writes.
    pub(crate) generation: u64,
    /// Segment holding the current checkpoint record.
    pub(crate) checkpoint_segment: u64,
    pub(crate) checkpoint_interval_blocks: u64,
    /// [`PoolOptions::uncached_write_min_bytes`].
    pub(crate) uncached_write_min_bytes: u64,
    pub(crate) max_dirty_metadata_blocks: u64,
    /// Below this many free segments, checkpoints also clean.
    pub(crate) clean_start_free_segments: u64,
    pub(crate) failed: Option<String>,
    pub(crate) closed: bool,
    pub(crate) replayed_records: u64,
    pub(crate) counters: Counters,
    /// Commits whose stream is being received now: a second receive of one waits its turn (is refused).
    pub(crate) receiving: std::collections::HashSet<[u8; 16]>,
    /// Live blocks the cleaner's last scan found in its candidate segments.
    pub(crate) scan_cache: crate::cleaner::ScanCache,
    /// A checkpoint whose record is written but whose superblock is not (its sync runs outside the lock) [I1].
    pub(crate) pending_checkpoint: Option<PendingCheckpoint>,
    /// A write taken without waiting ([`crate::Volume::try_write_now`]) left a checkpoint due without beginning it:
    /// the background thread begins it at its next look, if no write has by then.
    pub(crate) checkpoint_left_due: bool,
    /// Checkpoints begun since the open: tells one pending checkpoint from a later one.
    pub(crate) checkpoints_begun: u64,
}

/// What completing a checkpoint takes once its record is written: the sync that makes the record and everything
/// before it durable, then its superblock [I1]. Between the two the pool lock is free and writes go on.
#[derive(Debug)]
pub(crate) struct PendingCheckpoint {
    /// Its number in [`State::checkpoints_begun`].
    id: u64,
    /// The superblock that makes it current.
    sb: Superblock,
    /// Every record below this one was written (drained) before the record's sync began.
    synced_below: u64,
    /// [`Log::blocks_written`] then.
    blocks_written: u64,
    /// The segment the log was writing when the record was written: the cleaner's checkpoint mark [I13].
    log_segment: u64,
    /// The segments it frees once complete: those empty when its record was written [I4].
    frees: Vec<u64>,
    /// How far it got.
    step: CheckpointStep,
}

/// The steps of a pending checkpoint, each followed by a sync before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckpointStep {
    /// Its pages and record are written (and drained).
    Recorded,
    /// Its superblock is written too.
    SuperblockWritten,
}

/// Work done since the pool was opened, for statistics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Ops logged (client writes, zeroes, trims, metadata changes): the background cleaner tells busy from idle.
    pub(crate) ops: u64,
    /// Steps the background cleaner took (moving passes and checkpoints).
    pub(crate) background_steps: u64,
    /// Syncs of the log the background thread took (outside the pool lock).
    pub(crate) background_log_syncs: u64,
    pub(crate) checkpoints: u64,
    pub(crate) clean_passes: u64,
    pub(crate) moving_passes: u64,
    pub(crate) cleaned_blocks: u64,
}

/// Shared by the pool and its volume handles.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) dev: Arc<dyn Device>,
    pub(crate) state: Mutex<State>,
    /// Held shared while reading data blocks outside the state lock; held exclusively while segments become free,
    /// so no block is reused under a reader [I4].
    pub(crate) reuse_gate: RwLock<()>,
    /// The background thread that completes checkpoints begun by writes ([`maybe_checkpoint_unlocked`]), when the
    /// pool has background threads: it takes the checkpoint's syncs so the write that began it need not wait.
    pub(crate) checkpoint_finisher: Mutex<Option<std::sync::mpsc::Sender<u64>>>,
}

/// A pool of thin volumes on one device.
///
/// Only [`Pool::flush`] (or a volume's flush), [`Pool::checkpoint`] and [`Pool::close`] make writes durable. Dropping
/// a pool without closing it makes nothing durable: like a crash, the next open keeps what the last flush covered.
#[derive(Debug)]
pub struct Pool {
    pub(crate) inner: Arc<Inner>,
    /// The background cleaner, when the options ask for one; stops when the pool is dropped.
    _cleaner: Option<crate::cleaner::background::Background>,
}

/// Names of volumes and snapshots the dot layer owns start with this (user names cannot).
pub(crate) const INTERNAL_NAME_PREFIX: char = '#';

/// Check a volume name: 1 to 200 bytes of letters, digits and `-_.:/@+=`.
pub fn validate_volume_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_VOLUME_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "volume name must be 1 to {MAX_VOLUME_NAME_BYTES} bytes, got {}",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.:/@+=".contains(*c))) {
        return Err(Error::InvalidArgument(format!(
            "volume name {name:?} contains {c:?}; use letters, digits and -_.:/@+="
        )));
    }
    Ok(())
}

pub(crate) fn validate_volume_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 || size_bytes % SECTOR_SIZE != 0 || size_bytes > MAX_VOLUME_SIZE_BYTES {
        return Err(Error::InvalidArgument(format!(
            "volume size {size_bytes} must be a non-zero multiple of {SECTOR_SIZE} bytes, at most {MAX_VOLUME_SIZE_BYTES}"
        )));
    }
    Ok(())
}

fn blocks_for(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(BLOCK_SIZE)
}

impl Pool {
    /// Create a pool on `dev`, overwriting whatever the device held.
    pub fn create(dev: Arc<dyn Device>, opts: PoolOptions) -> Result<Pool> {
        let seg = opts.segment_size_bytes;
        if !seg.is_power_of_two() || !(MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&seg) {
            return Err(Error::InvalidArgument(format!(
                "segment size {seg} must be a power of two from {MIN_SEGMENT_SIZE_BYTES} to {MAX_SEGMENT_SIZE_BYTES}"
            )));
        }
        let size = dev.size_bytes();
        let segment_count = size.saturating_sub(SEGMENT_AREA_OFFSET) / seg;
        if segment_count < MIN_SEGMENTS {
            return Err(Error::InvalidArgument(format!(
                "device of {size} bytes holds {segment_count} segments of {seg} bytes; a pool needs {MIN_SEGMENTS}"
            )));
        }
        let pool_id = opts.pool_id.unwrap_or_else(rand::random);
        let pool_size_bytes = SEGMENT_AREA_OFFSET + segment_count * seg;
        // Invalidate both superblock slots first, so no earlier pool's superblock can outrank ours.
        dev.write_at(&vec![0u8; 2 * BLOCK], 0)?;
        dev.sync()?;
        let mut segs = Segments::new(segment_count, seg, vec![0; segment_count as usize]);
        let cursor = LogCursor { segment: 0, pba: segs.first_pba(0), next_segment: 1, seq: 1 };
        segs.rebuild_free(&[0, 1]);
        let sb = Superblock {
            version: FORMAT_VERSION,
            pool_id,
            generation: 0,
            pool_size_bytes,
            segment_size_bytes: seg,
            segment_count,
            checkpoint_pba: 0,
            checkpoint_payload_blocks: 0,
            checkpoint_crc: 0,
            replay: cursor,
        };
        let mut state = State::new(dev.clone(), sb, segs, Index::new(BlockTable::default(), 1, true), cursor, &opts);
        let reuse_gate = RwLock::new(());
        state.checkpoint(&*dev, &reuse_gate)?;
        Ok(Pool::start(
            Inner { dev, state: Mutex::new(state), reuse_gate, checkpoint_finisher: Mutex::new(None) },
            &opts,
        ))
    }

    fn start(inner: Inner, opts: &PoolOptions) -> Pool {
        let inner = Arc::new(inner);
        let cleaner =
            if opts.background_cleaning { crate::cleaner::background::Background::start(&inner) } else { None };
        Pool { inner, _cleaner: cleaner }
    }

    /// Create a pool in a new sparse file of `size_bytes`.
    pub fn create_file(path: &Path, size_bytes: u64, opts: PoolOptions) -> Result<Pool> {
        let dev = FileDevice::create(path, size_bytes)?;
        Pool::create(Arc::new(dev), opts)
    }

    /// Open the pool in an existing file or block device.
    pub fn open_file(path: &Path, opts: PoolOptions) -> Result<Pool> {
        let dev = FileDevice::open(path)?;
        Pool::open(Arc::new(dev), opts).map_err(|e| match e {
            Error::NotAPool(_) => Error::NotAPool(path.display().to_string()),
            other => other,
        })
    }

    /// Open the pool on `dev`: the newest valid superblock, its checkpoint, then replay of the log written since
    /// (invariants I1, I2). Ends with a checkpoint, so what was replayed is never replayed again (I3).
    pub fn open(dev: Arc<dyn Device>, opts: PoolOptions) -> Result<Pool> {
        let sb = read_superblock(&*dev)?;
        let seg = sb.segment_size_bytes;
        if !seg.is_power_of_two()
            || !(MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&seg)
            || sb.segment_count < MIN_SEGMENTS
            || sb.segment_count.checked_mul(seg).and_then(|b| b.checked_add(SEGMENT_AREA_OFFSET))
                != Some(sb.pool_size_bytes)
        {
            return Err(Error::corrupt(
                "superblock",
                0,
                "a consistent segment geometry",
                format!("segment size {seg}, {} segments, pool {} bytes", sb.segment_count, sb.pool_size_bytes),
            ));
        }
        if dev.size_bytes() < sb.pool_size_bytes {
            return Err(Error::Truncated { device_bytes: dev.size_bytes(), pool_bytes: sb.pool_size_bytes });
        }
        let cp = read_checkpoint(&*dev, &sb)?;
        let blocks_per_segment = seg / BLOCK_SIZE;
        if let Some((s, n)) =
            cp.segment_live_blocks.iter().enumerate().find(|(_, n)| u64::from(**n) > blocks_per_segment)
        {
            return Err(Error::corrupt(
                "checkpoint payload",
                sb.checkpoint_pba * BLOCK_SIZE,
                format!("at most {blocks_per_segment} live blocks in segment {s}"),
                n,
            ));
        }
        if cp.segment_live_blocks.len() as u64 != sb.segment_count {
            return Err(Error::corrupt(
                "checkpoint payload",
                sb.checkpoint_pba * BLOCK_SIZE,
                format!("{} segment usage entries", sb.segment_count),
                cp.segment_live_blocks.len(),
            ));
        }
        let bt = BlockTable::load(&*dev, cp.dir_pages.clone())?;
        let segs = Segments::new(sb.segment_count, seg, cp.segment_live_blocks.clone());
        // the log of a pool written before format 5 replays with the allocation that wrote it: no vbn reused [I9];
        // its checkpoint's `next_vbn` is then used as it is, so it is bounded first (the block table's page vector
        // grows to it at the first allocation)
        // and must lie past every vbn in use, or replay would hand out a vbn in use
        if sb.version < 5 {
            let in_use_below = bt.free_vbns().1;
            if cp.next_vbn > MAX_NEXT_VBN_BEFORE_FORMAT_5 || cp.next_vbn < in_use_below {
                return Err(Error::corrupt(
                    "checkpoint payload",
                    sb.checkpoint_pba * BLOCK_SIZE,
                    format!("a next vbn from {in_use_below} (past every vbn in use) to {MAX_NEXT_VBN_BEFORE_FORMAT_5}"),
                    cp.next_vbn,
                ));
            }
        }
        let index = Index::new(bt, cp.next_vbn, sb.version >= 5);
        let cursor = sb.replay;
        if cursor.segment >= sb.segment_count
            || cursor.next_segment >= sb.segment_count
            || cursor.pba < segs.first_pba(cursor.segment)
            || cursor.pba > segs.end_pba(cursor.segment)
        {
            return Err(Error::corrupt("superblock", 0, "a replay cursor inside the pool", format!("{cursor:?}")));
        }
        let mut state = State::new(dev.clone(), sb.clone(), segs, index, cursor, &opts);
        state.generation = cp.generation;
        state.next_volume_id = cp.next_volume_id;
        state.checkpoint_segment = state.segs.segment_of(sb.checkpoint_pba).unwrap_or(0);
        for v in cp.volumes {
            // every block of a volume lies inside its tree; a record saying otherwise is damaged
            let root = Root { vbn: v.root_vbn, height: v.height };
            if blocks_for(v.size_bytes) > root.capacity_blocks() {
                return Err(Error::corrupt(
                    "checkpoint payload",
                    sb.checkpoint_pba * BLOCK_SIZE,
                    format!("a tree of height {} mapping volume {}'s {} bytes", v.height, v.id, v.size_bytes),
                    format!("{} blocks mapped", root.capacity_blocks()),
                ));
            }
            state.names.insert(v.name.clone(), v.id);
            state.volumes.insert(
                v.id,
                VolumeState {
                    name: v.name,
                    size_bytes: v.size_bytes,
                    root: Root { vbn: v.root_vbn, height: v.height },
                },
            );
        }
        for sn in cp.snapshots {
            state.names.insert(sn.name.clone(), sn.id);
            state.snapshots.insert(
                sn.id,
                SnapshotState {
                    name: sn.name,
                    size_bytes: sn.size_bytes,
                    root: Root { vbn: sn.root_vbn, height: sn.height },
                    generation: sn.generation,
                },
            );
        }
        for d in cp.dots {
            state.dot_names.insert(d.name.clone(), d.id);
            state.dots.insert(d.id, crate::dots::DotState::from_record(d));
        }
        // Roll forward over the log written since the checkpoint [I2]: first every block the cleaner moved since
        // then (the ops may need those blocks at their new places, their old ones may hold newer records) [I13],
        // then the ops in log order.
        let mut records = Vec::new();
        let end = {
            let segs_view = Segments::new(state.segs.count, seg, vec![0; state.segs.count as usize]);
            journal::replay(&*dev, &segs_view, sb.pool_id, cursor, |r| {
                match r.header.kind {
                    RecordKind::Batch => records.push((r.pba, Some(r.ops))),
                    // a checkpoint whose superblock never landed: the vbns freed before it were free for the ops
                    // after it, as they were for the pool that wrote them [I9]
                    RecordKind::Checkpoint => records.push((r.pba, None)),
                    RecordKind::Moved => {
                        for (vbn, pba) in r.moved() {
                            state.replay_move(vbn, pba)?;
                        }
                    }
                    // the pages of a checkpoint whose superblock never landed
                    _ => {}
                }
                Ok(())
            })?
        };
        for (at, ops) in records {
            let Some(ops) = ops else {
                state.index.checkpoint_completed();
                continue;
            };
            let mut data_pba = at + 1;
            for op in &ops {
                let pba = match op {
                    Op::Write { .. } => {
                        data_pba += 1;
                        Some(data_pba - 1)
                    }
                    _ => None,
                };
                state.apply(&*dev, op, pba).map_err(|e| match e {
                    Error::Corrupt { .. } | Error::Io { .. } => e,
                    other => {
                        Error::corrupt("log replay", at * BLOCK_SIZE, format!("op {op:?} to apply"), other.to_string())
                    }
                })?;
            }
        }
        state.replayed_records = end.records;
        state.log = Log::new(
            sb.pool_id,
            &state.segs,
            end.cursor,
            state.log.reserve_segments,
            dev.clone(),
            opts.log_writer_threads,
        );
        // Records of a lost tail may follow the cursor: skip past every sequence number they can carry [I3].
        state.log.skip_seq(sb.pool_size_bytes / BLOCK_SIZE + 1);
        let mut pinned: Vec<u64> = end.segments_visited.into_iter().collect();
        pinned.extend([end.cursor.segment, end.cursor.next_segment, state.checkpoint_segment, cursor.segment]);
        state.segs.rebuild_free(&pinned);
        let reuse_gate = RwLock::new(());
        if end.records == 0 && sb.version == FORMAT_VERSION {
            // Nothing to roll forward: the state is the checkpoint's, and only the replay cursor's numbering must
            // change [I3]. Writing just the superblock takes no log space, so reopening a full pool, however
            // often, never eats into the checkpoint reserve [I14].
            state.renumber_cursor(&*dev)?;
        } else {
            state.checkpoint(&*dev, &reuse_gate)?;
        }
        Ok(Pool::start(
            Inner { dev, state: Mutex::new(state), reuse_gate, checkpoint_finisher: Mutex::new(None) },
            &opts,
        ))
    }

    /// Create a volume.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        validate_volume_name(name)?;
        validate_volume_size(size_bytes)?;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        if st.names.contains_key(name) {
            return Err(Error::VolumeExists(name.to_string()));
        }
        if st.volumes.len() >= MAX_VOLUMES {
            return Err(Error::Limit(format!("a pool holds at most {MAX_VOLUMES} volumes")));
        }
        let id = st.next_volume_id;
        let op = Op::CreateVolume { volume: id, size_bytes, name: name.to_string() };
        st.log_meta(&*self.inner.dev, &self.inner.reuse_gate, op)?;
        drop(st);
        Ok(Volume::new(self.inner.clone(), Target::Volume(id), name.to_string()))
    }

    /// A handle on an existing volume.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let st = self.inner.state.lock();
        st.check_open()?;
        let id = st.volume_id(name)?;
        Ok(Volume::new(self.inner.clone(), Target::Volume(id), name.to_string()))
    }

    /// Take read-only snapshots of volumes, all at one point of the log: after a crash either all of them exist or
    /// none. O(1) each, whatever the volume's size. `pairs` are `(volume, new snapshot name)`.
    pub fn snapshot(&self, pairs: &[(&str, &str)]) -> Result<()> {
        if pairs.is_empty() || pairs.len() > MAX_SNAPSHOT_VOLUMES {
            return Err(Error::InvalidArgument(format!(
                "a snapshot covers 1 to {MAX_SNAPSHOT_VOLUMES} volumes, got {}",
                pairs.len()
            )));
        }
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let mut entries = Vec::with_capacity(pairs.len());
        for (i, (volume, name)) in pairs.iter().enumerate() {
            validate_volume_name(name)?;
            let id = st.volume_id(volume)?;
            if st.names.contains_key(*name) || pairs[..i].iter().any(|(_, n)| n == name) {
                return Err(Error::VolumeExists(name.to_string()));
            }
            entries.push((id, st.next_volume_id + i as u64, name.to_string()));
        }
        st.log_meta(&*self.inner.dev, &self.inner.reuse_gate, Op::Snapshot { entries })
    }

    /// Every snapshot, by name.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let st = self.inner.state.lock();
        let mut v: Vec<SnapshotInfo> = st
            .snapshots
            .values()
            .filter(|s| !s.name.starts_with(INTERNAL_NAME_PREFIX))
            .map(|s| SnapshotInfo { name: s.name.clone(), size_bytes: s.size_bytes, generation: s.generation })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A read-only handle on a snapshot.
    pub fn snapshot_volume(&self, name: &str) -> Result<Volume> {
        let st = self.inner.state.lock();
        st.check_open()?;
        let id = st.snapshot_id(name)?;
        Ok(Volume::new(self.inner.clone(), Target::Snapshot(id), name.to_string()))
    }

    /// A new writable volume with the contents of a snapshot, sharing its blocks: O(1).
    pub fn clone_snapshot(&self, snapshot: &str, new_volume: &str) -> Result<Volume> {
        validate_volume_name(new_volume)?;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let sid = st.snapshot_id(snapshot)?;
        if st.names.contains_key(new_volume) {
            return Err(Error::VolumeExists(new_volume.to_string()));
        }
        if st.volumes.len() >= MAX_VOLUMES {
            return Err(Error::Limit(format!("a pool holds at most {MAX_VOLUMES} volumes")));
        }
        let id = st.next_volume_id;
        let op = Op::CloneSnapshot { snapshot: sid, volume: id, name: new_volume.to_string() };
        st.log_meta(&*self.inner.dev, &self.inner.reuse_gate, op)?;
        drop(st);
        Ok(Volume::new(self.inner.clone(), Target::Volume(id), new_volume.to_string()))
    }

    /// Delete a snapshot; blocks nothing else references are released.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.snapshot_id(name)?;
        st.log_meta(dev, &self.inner.reuse_gate, Op::DeleteSnapshot { snapshot: id })?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// What changed from `from` to `to` (each a volume or a snapshot): the ranges whose mapping differs, with what
    /// `to` holds there. Costs what changed, not the volume size, when the two share history.
    pub fn diff(&self, from: &str, to: &str) -> Result<Vec<Extent>> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_open()?;
        let (a, b) = (st.root_by_name(from)?, st.root_by_name(to)?);
        st.index.diff(dev, a, b)
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock();
        let mut v: Vec<VolumeInfo> = st
            .volumes
            .values()
            .filter(|v| !v.name.starts_with(INTERNAL_NAME_PREFIX))
            .map(|v| VolumeInfo { name: v.name.clone(), size_bytes: v.size_bytes })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Use a device that has grown (a file or block device enlarged while the pool was closed): the pool takes every
    /// whole segment that now fits. Returns the segments added (0 when the device is no larger). The new segments
    /// become usable with the checkpoint that records them; a crash before it leaves the pool as it was (invariant I12).
    pub fn grow(&self) -> Result<u64> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let seg = st.sb.segment_size_bytes;
        let fits = dev.size_bytes().saturating_sub(SEGMENT_AREA_OFFSET) / seg;
        if fits <= st.sb.segment_count {
            return Ok(0);
        }
        let added = fits - st.sb.segment_count;
        st.segs.extend(fits);
        st.sb.segment_count = fits;
        st.sb.pool_size_bytes = SEGMENT_AREA_OFFSET + fits * seg;
        st.checkpoint(dev, &self.inner.reuse_gate)?;
        Ok(added)
    }

    /// Change a volume's size. Shrinking is refused when it would drop written data, unless `force`.
    pub fn resize_volume(&self, name: &str, size_bytes: u64, force: bool) -> Result<()> {
        validate_volume_size(size_bytes)?;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.volume_id(name)?;
        self.resize_locked(&mut st, id, name, size_bytes, force)
    }

    /// [`Pool::resize_volume`] of volume `id` (`name` for errors), the state locked and writable.
    pub(crate) fn resize_locked(
        &self,
        st: &mut State,
        id: u64,
        name: &str,
        size_bytes: u64,
        force: bool,
    ) -> Result<()> {
        let dev = &*self.inner.dev;
        let vol = st.volumes[&id].clone();
        if size_bytes < vol.size_bytes {
            let keep_blocks = blocks_for(size_bytes);
            if !force {
                let root = vol.root;
                if let Some(b) = st.index.first_data_at_or_after(dev, root, keep_blocks)? {
                    return Err(Error::ShrinkDropsData {
                        volume: name.to_string(),
                        new_size_bytes: size_bytes,
                        first_written_bytes: b * BLOCK_SIZE,
                    });
                }
                // Data in the tail of the new last block counts as well.
                if size_bytes % BLOCK_SIZE != 0 {
                    let mut buf = vec![0u8; BLOCK];
                    st.read_block(dev, id, keep_blocks - 1, &mut buf)?;
                    let from = (size_bytes % BLOCK_SIZE) as usize;
                    let tail_end = (vol.size_bytes - (keep_blocks - 1) * BLOCK_SIZE).min(BLOCK_SIZE) as usize;
                    if let Some(i) = buf[from..tail_end].iter().position(|&b| b != 0) {
                        return Err(Error::ShrinkDropsData {
                            volume: name.to_string(),
                            new_size_bytes: size_bytes,
                            first_written_bytes: size_bytes + (i as u64 / SECTOR_SIZE) * SECTOR_SIZE,
                        });
                    }
                }
            }
            st.ensure_room_to_free(dev, &self.inner.reuse_gate, 4)?;
            // Bytes past the end inside the last block always read as zero: a later grow shows zeroes there.
            if size_bytes % BLOCK_SIZE != 0 {
                let end = vol.size_bytes.min(keep_blocks * BLOCK_SIZE);
                st.zero_partial(dev, id, size_bytes, end)?;
            }
        }
        st.log_meta(dev, &self.inner.reuse_gate, Op::ResizeVolume { volume: id, size_bytes })?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// Delete a volume and release its blocks.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.volume_id(name)?;
        st.log_meta(dev, &self.inner.reuse_gate, Op::DeleteVolume { volume: id })?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// Make every acknowledged change durable.
    pub fn flush(&self) -> Result<()> {
        flush(&self.inner)
    }

    /// Write a checkpoint now (bounds the log a later open replays).
    pub fn checkpoint(&self) -> Result<()> {
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        st.checkpoint(&*self.inner.dev, &self.inner.reuse_gate)
    }

    /// `Ok` while the pool takes changes; [`Error::Failed`] (saying why) once a failed device write or sync has put
    /// it in the failed state, which only a reopen clears (reads keep working meanwhile); closed pools too. For
    /// health checks: a daemon whose pool failed should be restarted. Never waits: while another call holds the pool
    /// (a long cleaning, a big checkpoint), the pool is at work and this says `Ok`.
    pub fn health(&self) -> Result<()> {
        match self.inner.state.try_lock() {
            Some(st) => st.check_writable(),
            None => Ok(()),
        }
    }

    /// Checkpoint and close. Volume handles fail afterwards.
    pub fn close(self) -> Result<()> {
        let mut st = self.inner.state.lock();
        if st.closed {
            return Ok(());
        }
        let r = st.check_writable().and_then(|_| st.checkpoint(&*self.inner.dev, &self.inner.reuse_gate));
        st.closed = true;
        r
    }

    /// Figures about the pool.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state.lock();
        PoolStats {
            pool_size_bytes: st.sb.pool_size_bytes,
            segment_size_bytes: st.sb.segment_size_bytes,
            segments: st.segs.count,
            free_segments: st.segs.free_count(),
            live_blocks: st.segs.live_total(),
            free_bytes: st.segs.free_count() * st.sb.segment_size_bytes,
            reclaimable_bytes: st.segs.dead_blocks(&st.pinned()) * BLOCK_SIZE,
            blocks_written: st.log.blocks_written,
            volumes: st.volumes.len() as u64,
            snapshots: st.snapshots.len() as u64,
            dots: st.dots.len() as u64,
            index_memory_bytes: st.index.memory_bytes() as u64,
            generation: st.sb.generation,
            replayed_records: st.replayed_records,
            checkpoints: st.counters.checkpoints,
            clean_passes: st.counters.clean_passes,
            moving_passes: st.counters.moving_passes,
            emptied_segments: st.segs.moved_count(),
            emptied_segment_syncs: st.log.emptied_segment_syncs,
            uncached_batches: st.log.uncached_batches,
            fixed_buffer_writes: st.log.fixed_buffer_writes(),
            cleaned_blocks: st.counters.cleaned_blocks,
            background_clean_steps: st.counters.background_steps,
            background_log_syncs: st.counters.background_log_syncs,
            clean_target_free_segments: st.clean_start_free_segments,
        }
    }
}

pub(crate) fn flush(inner: &Inner) -> Result<()> {
    let (below, written) = {
        let mut st = inner.state.lock();
        st.check_writable()?;
        if let Err(e) = st.log.seal().and_then(|_| st.log.drain()) {
            return Err(st.fail(e));
        }
        (st.log.next_seq(), st.log.blocks_written)
    };
    // Every write acknowledged before this call is now in the device's hands; make it durable.
    if let Err(e) = inner.dev.sync() {
        let mut st = inner.state.lock();
        return Err(st.fail(e));
    }
    // (segments emptied by moving passes before this flush need no sync of their own now [I13])
    let st = &mut *inner.state.lock();
    st.log.synced(&mut st.segs, below);
    st.log.synced_blocks(written);
    Ok(())
}

/// The blocks of one volume write, `..=last`, as [`State::write_summed_block`] logs them one by one: where the
/// last one went, to map the next one of the same leaf there directly.
#[derive(Debug)]
pub(crate) struct WriteRun {
    last: u64,
    leaf: Option<WriteLeaf>,
}

impl WriteRun {
    /// A write whose last block is `last`.
    pub(crate) fn new(last: u64) -> Self {
        Self { last, leaf: None }
    }

    /// Nothing known of where the next block goes (a block of the run was written some other way).
    pub(crate) fn forget(&mut self) {
        self.leaf = None;
    }
}

/// Where the last block of a run of whole-block writes went ([`State::write_summed_block`]): a leaf of a volume's
/// tree whose path from the root is private and in memory. The next block of the run that falls in the same leaf,
/// with the volume's root and generation unchanged, is mapped there directly, without the walk from the root that
/// would change nothing on that path ([`Index::set_in_leaf`]): 1 MiB writes on a device in memory take 124 us, were
/// 133-135 (`cargo bench -p blockmesh-benches --bench engine -- engine_memory`, benches/RESULTS.md). Only
/// ever held by one write, under the pool lock; replay applies the same ops one by one and reaches the same state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteLeaf {
    volume: u64,
    root: Root,
    generation: u64,
    /// Which leaf: the blocks it maps, shifted right by `FANOUT_BITS`.
    leaf: u64,
    vbn: u64,
}

impl WriteLeaf {
    fn holds(&self, volume: u64, root: Option<Root>, generation: u64, block: u64) -> bool {
        self.volume == volume
            && root == Some(self.root)
            && self.generation == generation
            && self.leaf == block >> FANOUT_BITS
    }
}

/// Log written since a checkpoint's record, in checkpoint intervals, past which a writer that finds it still
/// pending completes it (syncing under the lock) and takes the next one, rather than leave that to its writer.
pub(crate) const MAX_INTERVALS_WHILE_PENDING: u64 = 2;

/// [`State::maybe_checkpoint`] for the write paths: a checkpoint's syncs run without the pool lock, so writes go on
/// meanwhile (they waited behind the first, which writes back everything the log wrote since the last sync, 0.1-0.2 s
/// a time, when a pool under 1 MiB writes checkpointed every 0.6 s; the second, after the superblock, then has all
/// that was written during the first to write back), and, with background threads, in the background, so the write
/// that began the checkpoint does not wait either (it did, up to 2 s with 1 MiB writes going on) [I1]. Checkpoints
/// that also clean, and one due while another is pending past a bound, take the locked path.
pub(crate) fn maybe_checkpoint_unlocked(inner: &Inner, mut st: parking_lot::MutexGuard<'_, State>) -> Result<()> {
    let (dev, gate) = (&*inner.dev, &inner.reuse_gate);
    if !st.checkpoint_due() {
        return Ok(());
    }
    if st.pending_checkpoint.is_some() {
        // Due again while the last one syncs (early checkpoints come every quarter interval, and both syncs take a
        // while under a write load): its writer starts the next one soon after; only past a hard bound does this
        // writer complete it and take one under the lock.
        if st.log.blocks_since_checkpoint < MAX_INTERVALS_WHILE_PENDING * st.checkpoint_interval_blocks
            && st.dirty_metadata_blocks() < st.max_dirty_metadata_blocks
        {
            return Ok(());
        }
        return st.maybe_checkpoint(dev, gate);
    }
    // a pool whose superblock still has an older format: its first checkpoint under the lock, so no record an
    // older build would replay differently follows a checkpoint record before this format is on disk [I9]
    if st.segs.free_count() < st.clean_start_free_segments || st.sb.version != FORMAT_VERSION {
        return st.maybe_checkpoint(dev, gate);
    }
    st.check_writable()?;
    let id = match st.begin_checkpoint(dev) {
        Ok(id) => id,
        Err(e) => return Err(st.fail(e)),
    };
    // The background thread completes it when there is one (the write that began it need not wait for its syncs);
    // else this writer does, without the lock.
    if inner.checkpoint_finisher.lock().as_ref().is_some_and(|tx| tx.send(id).is_ok()) {
        return Ok(());
    }
    drop(st);
    complete_checkpoint_unlocked(inner, id)
}

/// Complete checkpoint `id`, begun by [`maybe_checkpoint_unlocked`], taking each of its syncs without the pool lock;
/// after each, its next step, unless someone took it further meanwhile (whoever did completed it, syncing under the
/// lock) [I1].
pub(crate) fn complete_checkpoint_unlocked(inner: &Inner, id: u64) -> Result<()> {
    let (dev, gate) = (&*inner.dev, &inner.reuse_gate);
    let mut st = inner.state.lock();
    if st.checkpoint_step(id).is_none() {
        return Ok(()); // completed meanwhile (a close, a cleaning pass)
    }
    while let Some(step) = st.checkpoint_step(id) {
        drop(st);
        let synced = dev.sync();
        st = inner.state.lock();
        if let Err(e) = synced {
            return Err(st.fail(e));
        }
        st.check_writable()?;
        if st.checkpoint_step(id) != Some(step) {
            break;
        }
        if let Err(e) = st.checkpoint_synced(dev, gate, step) {
            return Err(st.fail(e));
        }
    }
    st.restore_reserve(dev, gate)
}

fn read_superblock(dev: &dyn Device) -> Result<Superblock> {
    if dev.size_bytes() < SEGMENT_AREA_OFFSET {
        return Err(Error::NotAPool("device".into()));
    }
    let mut best: Option<Superblock> = None;
    let mut damaged = Vec::new();
    for off in SUPERBLOCK_OFFSETS {
        let mut buf = vec![0u8; BLOCK];
        dev.read_at(&mut buf, off)?;
        match Superblock::decode(&buf, off)? {
            SlotContents::Foreign => {}
            SlotContents::Damaged(why) => damaged.push(why),
            SlotContents::Valid(sb) => {
                if best.as_ref().is_none_or(|b| sb.generation > b.generation) {
                    best = Some(sb);
                }
            }
        }
    }
    match best {
        Some(sb) => Ok(sb),
        None if damaged.is_empty() => Err(Error::NotAPool("device".into())),
        None => Err(Error::corrupt("superblock", 0, "one valid superblock", damaged.join("; "))),
    }
}

fn read_checkpoint(dev: &dyn Device, sb: &Superblock) -> Result<Checkpoint> {
    let n = u64::from(sb.checkpoint_payload_blocks);
    // (checked: the fields come from disk; a checksummed superblock may still carry any value)
    let end = sb.checkpoint_pba.checked_add(1 + n).and_then(|b| b.checked_mul(BLOCK_SIZE));
    let offset = sb.checkpoint_pba.wrapping_mul(BLOCK_SIZE);
    if sb.checkpoint_pba < SEGMENT_AREA_OFFSET / BLOCK_SIZE || end.is_none_or(|e| e > sb.pool_size_bytes) {
        return Err(Error::corrupt(
            "superblock",
            0,
            "a checkpoint inside the pool",
            format!("block {}", sb.checkpoint_pba),
        ));
    }
    let mut hbuf = vec![0u8; BLOCK];
    dev.read_at(&mut hbuf, offset)?;
    let header = match RecordHeader::decode(&hbuf, sb.pool_id)? {
        Ok(h) if h.kind == RecordKind::Checkpoint && u64::from(h.payload_blocks) == n => h,
        Ok(h) => {
            return Err(Error::corrupt(
                "checkpoint record",
                offset,
                format!("a checkpoint header with {n} payload blocks"),
                format!("{:?} with {} payload blocks", h.kind, h.payload_blocks),
            ))
        }
        Err(why) => {
            return Err(Error::corrupt("checkpoint record", offset, "a valid record header", format!("{why:?}")))
        }
    };
    let mut payload = vec![0u8; (n as usize) * BLOCK];
    dev.read_at(&mut payload, offset + BLOCK_SIZE)?;
    let crc = crc32(&payload);
    if crc != sb.checkpoint_crc || crc != header.payload_crc {
        return Err(Error::corrupt(
            "checkpoint payload",
            offset + BLOCK_SIZE,
            format!("crc32 {:#010x}", sb.checkpoint_crc),
            format!("crc32 {crc:#010x}"),
        ));
    }
    Checkpoint::decode(&payload, offset + BLOCK_SIZE)
}

impl State {
    fn new(
        dev: Arc<dyn Device>,
        sb: Superblock,
        segs: Segments,
        index: Index,
        cursor: LogCursor,
        opts: &PoolOptions,
    ) -> Self {
        let total_blocks = sb.segment_count * segs.blocks_per_segment;
        let max_dirty = MAX_DIRTY_METADATA_BLOCKS.min((total_blocks / 16).max(16));
        // A checkpoint writes at most the dirty nodes, as many table pages, their directory pages and the
        // checkpoint itself: keep that much free, plus two segments of slack.
        let reserve_blocks = 2 * max_dirty + 2 * segs.blocks_per_segment;
        let reserve_segments = reserve_blocks.div_ceil(segs.blocks_per_segment).min(sb.segment_count / 2);
        let log = Log::new(sb.pool_id, &segs, cursor, reserve_segments, dev, opts.log_writer_threads);
        let clean_start_free_segments = reserve_segments + (sb.segment_count / CLEAN_START_FREE_SHARE).max(2);
        Self {
            sb,
            segs,
            log,
            index,
            volumes: BTreeMap::new(),
            names: HashMap::new(),
            snapshots: BTreeMap::new(),
            dots: BTreeMap::new(),
            dot_names: HashMap::new(),
            next_volume_id: 1,
            generation: 1,
            checkpoint_segment: 0,
            checkpoint_interval_blocks: (opts.checkpoint_interval_bytes / BLOCK_SIZE).max(1),
            uncached_write_min_bytes: opts.uncached_write_min_bytes,
            max_dirty_metadata_blocks: max_dirty,
            clean_start_free_segments,
            failed: None,
            closed: false,
            replayed_records: 0,
            counters: Counters::default(),
            receiving: std::collections::HashSet::new(),
            scan_cache: crate::cleaner::ScanCache::default(),
            pending_checkpoint: None,
            checkpoint_left_due: false,
            checkpoints_begun: 0,
        }
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed {
            return Err(Error::Failed("the pool is closed".into()));
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        self.check_open()?;
        match &self.failed {
            Some(why) => Err(Error::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Record that a device write or sync failed: no more changes until the pool is reopened.
    pub(crate) fn fail(&mut self, e: Error) -> Error {
        if matches!(e, Error::Io { .. }) && self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        e
    }

    pub(crate) fn volume(&self, id: u64, name: &str) -> Result<&VolumeState> {
        self.volumes.get(&id).ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    /// A user-visible volume by name (dot heads are reached through the dot API).
    pub(crate) fn volume_id(&self, name: &str) -> Result<u64> {
        self.names
            .get(name)
            .copied()
            .filter(|id| self.volumes.contains_key(id) && !name.starts_with(INTERNAL_NAME_PREFIX))
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    /// A user-visible snapshot by name (commits are reached through the dot API).
    pub(crate) fn snapshot_id(&self, name: &str) -> Result<u64> {
        self.names
            .get(name)
            .copied()
            .filter(|id| self.snapshots.contains_key(id) && !name.starts_with(INTERNAL_NAME_PREFIX))
            .ok_or_else(|| Error::NoSuchSnapshot(name.to_string()))
    }

    /// Root and size of what a handle points at.
    pub(crate) fn target(&self, t: Target, name: &str) -> Result<(Root, u64)> {
        match t {
            Target::Volume(id) => self.volume(id, name).map(|v| (v.root, v.size_bytes)),
            Target::Snapshot(id) => self
                .snapshots
                .get(&id)
                .map(|s| (s.root, s.size_bytes))
                .ok_or_else(|| Error::NoSuchSnapshot(name.to_string())),
        }
    }

    fn root_by_name(&self, name: &str) -> Result<Root> {
        match self.names.get(name).filter(|_| !name.starts_with(INTERNAL_NAME_PREFIX)) {
            Some(id) if self.volumes.contains_key(id) => Ok(self.volumes[id].root),
            Some(id) if self.snapshots.contains_key(id) => Ok(self.snapshots[id].root),
            _ => Err(Error::NoSuchVolume(name.to_string())),
        }
    }

    fn settle_released(&mut self) {
        // drained in place: the buffer is kept for the next op (this runs after every logged op)
        for pba in self.index.released.drain(..) {
            self.segs.release(pba);
        }
    }

    /// Apply one op to the in-memory state. The same code runs live and in replay, so both reach the same state.
    pub(crate) fn apply(&mut self, dev: &dyn Device, op: &Op, data_pba: Option<u64>) -> Result<()> {
        let gen = self.generation;
        match op {
            Op::Write { volume, block, vbn, crc } => {
                let pba = data_pba.ok_or_else(|| Error::corrupt("log", 0, "a data block for a write", "none"))?;
                let mut root = self.root_of(*volume, *block, 1)?;
                let m = self.alloc_write(pba, *vbn, *crc)?;
                self.index.set(dev, &mut root, *block, m)?;
                self.set_root(*volume, root);
            }
            Op::Zero { volume, block, count } | Op::Trim { volume, block, count } => {
                let kind = if matches!(op, Op::Zero { .. }) { MappingKind::Zero } else { MappingKind::Trimmed };
                let mut root = self.root_of(*volume, *block, *count)?;
                self.index.set_range(dev, &mut root, *block, *count, kind, gen)?;
                self.set_root(*volume, root);
            }
            Op::CreateVolume { volume, size_bytes, name } => {
                if self.volumes.contains_key(volume) || self.names.contains_key(name) {
                    return Err(Error::corrupt("log", 0, "a new volume", format!("volume {volume} {name:?} exists")));
                }
                let root = Root::empty_for(blocks_for(*size_bytes));
                self.volumes.insert(*volume, VolumeState { name: name.clone(), size_bytes: *size_bytes, root });
                self.names.insert(name.clone(), *volume);
                self.next_volume_id = self.next_volume_id.max(volume + 1);
            }
            Op::ResizeVolume { volume, size_bytes } => {
                let v = self.volumes.get(volume).ok_or_else(|| Error::corrupt("log", 0, "a volume", volume))?;
                let mut root = v.root;
                let new_blocks = blocks_for(*size_bytes);
                if *size_bytes < v.size_bytes {
                    self.index.truncate(dev, &mut root, new_blocks)?;
                } else {
                    self.index.grow(dev, &mut root, new_blocks)?;
                }
                let v = self.volumes.get_mut(volume).ok_or_else(|| Error::corrupt("log", 0, "a volume", volume))?;
                v.size_bytes = *size_bytes;
                v.root = root;
            }
            Op::DeleteVolume { volume } => {
                let v = self.volumes.remove(volume).ok_or_else(|| Error::corrupt("log", 0, "a volume", volume))?;
                self.names.remove(&v.name);
                self.index.free_tree(dev, v.root)?;
            }
            Op::Snapshot { entries } => {
                for (volume, snapshot, name) in entries {
                    let v = self.volumes.get(volume).ok_or_else(|| Error::corrupt("log", 0, "a volume", volume))?;
                    if self.snapshots.contains_key(snapshot) || self.names.contains_key(name) {
                        return Err(Error::corrupt("log", 0, "a new snapshot", format!("{snapshot} {name:?} exists")));
                    }
                    let (root, size_bytes) = (v.root, v.size_bytes);
                    self.index.share(root)?;
                    self.snapshots
                        .insert(*snapshot, SnapshotState { name: name.clone(), size_bytes, root, generation: gen });
                    self.names.insert(name.clone(), *snapshot);
                    self.next_volume_id = self.next_volume_id.max(snapshot + 1);
                }
                // Writes from now on are born after every snapshot taken so far [I7].
                self.generation += 1;
            }
            Op::CloneSnapshot { snapshot, volume, name } => {
                let sn =
                    self.snapshots.get(snapshot).ok_or_else(|| Error::corrupt("log", 0, "a snapshot", snapshot))?;
                if self.volumes.contains_key(volume) || self.names.contains_key(name) {
                    return Err(Error::corrupt("log", 0, "a new volume", format!("{volume} {name:?} exists")));
                }
                let (root, size_bytes) = (sn.root, sn.size_bytes);
                self.index.share(root)?;
                self.volumes.insert(*volume, VolumeState { name: name.clone(), size_bytes, root });
                self.names.insert(name.clone(), *volume);
                self.next_volume_id = self.next_volume_id.max(volume + 1);
            }
            Op::DeleteSnapshot { snapshot } => {
                let sn =
                    self.snapshots.remove(snapshot).ok_or_else(|| Error::corrupt("log", 0, "a snapshot", snapshot))?;
                self.names.remove(&sn.name);
                self.index.free_tree(dev, sn.root)?;
            }
            Op::Dot { dot, change } => self.apply_dot(dev, *dot, change)?,
        }
        self.settle_released();
        Ok(())
    }

    fn root_of(&self, volume: u64, block: u64, count: u64) -> Result<Root> {
        let v = self.volumes.get(&volume).ok_or_else(|| Error::corrupt("log", 0, "an existing volume", volume))?;
        let end = block.saturating_add(count);
        if end > blocks_for(v.size_bytes) {
            return Err(Error::corrupt(
                "log",
                0,
                format!("blocks inside volume {volume} of {} bytes", v.size_bytes),
                format!("blocks [{block}, {end})"),
            ));
        }
        // A volume's tree maps every block of it (its height grows with it); a checkpoint or op that says otherwise
        // (found by fuzzing pool_open: a replayed write to block 549,755,813,904 of such a volume) is damaged.
        if end > v.root.capacity_blocks() {
            return Err(Error::corrupt(
                "log",
                0,
                format!("a tree of volume {volume} that maps its {} bytes", v.size_bytes),
                format!("a tree of height {} mapping {} blocks", v.root.height, v.root.capacity_blocks()),
            ));
        }
        Ok(v.root)
    }

    /// The vbn of a write's data block, just appended at `pba`: the one its op names (the next the allocator hands
    /// out, in replay as live); its mapping.
    fn alloc_write(&mut self, pba: u64, vbn: u64, crc: u32) -> Result<Mapping> {
        let got = self.index.alloc_data(pba, crc);
        if got != vbn {
            return Err(Error::corrupt("log replay", pba * BLOCK_SIZE, format!("vbn {vbn}"), format!("vbn {got}")));
        }
        self.segs.add_live(pba);
        Ok(Mapping { kind: MappingKind::Data, vbn: got, birth: self.generation })
    }

    fn set_root(&mut self, volume: u64, root: Root) {
        if let Some(v) = self.volumes.get_mut(&volume) {
            v.root = root;
        }
    }

    /// Log an op (with its data block) and apply it.
    pub(crate) fn log_apply(&mut self, dev: &dyn Device, op: Op, data: Option<&[u8]>) -> Result<()> {
        let pba = self.append_op(dev, &op, data)?;
        self.apply(dev, &op, pba)
    }

    /// Append an op (with its data block) to the log; a failed append fails the pool.
    fn append_op(&mut self, dev: &dyn Device, op: &Op, data: Option<&[u8]>) -> Result<Option<u64>> {
        self.counters.ops += 1;
        self.log.append_op(dev, &mut self.segs, op, data).map_err(|e| self.fail(e))
    }

    /// Log and apply a metadata op (no data block), after making room for it: an op that gives space back may use
    /// the checkpoint reserve beyond what the next checkpoint needs [I14].
    pub(crate) fn log_meta(&mut self, dev: &dyn Device, gate: &RwLock<()>, op: Op) -> Result<()> {
        if op.frees_space() {
            self.ensure_room_to_free(dev, gate, 2)?;
        } else {
            self.ensure_room(dev, gate, 2)?;
        }
        self.log_apply(dev, op, None)
    }

    /// Log and apply a write of one whole block.
    pub(crate) fn write_block(&mut self, dev: &dyn Device, volume: u64, block: u64, data: &[u8]) -> Result<()> {
        self.write_summed_block(dev, volume, block, data, BlockSum::of(data), &mut WriteRun::new(block))
    }

    /// Log and apply a write of one whole block whose [`BlockSum`] the caller computed (before taking the lock).
    /// `run`: the run of blocks this one belongs to, with where its previous block went; this block is mapped there
    /// directly when it falls in the same leaf, and `run` is left at this block's leaf if the next block of the run
    /// falls in it too.
    pub(crate) fn write_summed_block(
        &mut self,
        dev: &dyn Device,
        volume: u64,
        block: u64,
        data: &[u8],
        sum: BlockSum,
        run: &mut WriteRun,
    ) -> Result<()> {
        debug_assert_eq!(sum, BlockSum::of(data), "a block's sum is computed from its bytes");
        let BlockSum::Crc(crc) = sum else {
            run.leaf = None;
            return self.log_apply(dev, Op::Zero { volume, block, count: 1 }, None);
        };
        let vbn = self.index.peek_vbn();
        let op = Op::Write { volume, block, vbn, crc };
        let Some(known) = run.leaf.filter(|l| l.holds(volume, self.volume_root(volume), self.generation, block)) else {
            self.log_apply(dev, op, Some(data))?;
            let next_in_leaf = block < run.last && (block + 1) >> FANOUT_BITS == block >> FANOUT_BITS;
            run.leaf = if next_in_leaf { self.write_leaf(volume, block) } else { None };
            return Ok(());
        };
        let pba = self.append_op(dev, &op, Some(data))?;
        let pba = pba.ok_or_else(|| Error::corrupt("log", 0, "a data block for a write", "none"))?;
        // what `apply` does for this op, with the walk from the root that `Index::set_in_leaf` spares
        let m = self.alloc_write(pba, vbn, crc)?;
        self.index.set_in_leaf(known.vbn, block, m)?;
        self.settle_released();
        debug_assert_eq!(self.write_leaf(volume, block), Some(known), "the leaf of a run is where a walk leads");
        Ok(())
    }

    /// The root of `volume`'s tree, if there is such a volume.
    fn volume_root(&self, volume: u64) -> Option<Root> {
        self.volumes.get(&volume).map(|v| v.root)
    }

    /// The leaf that maps `block` of `volume`, as a write just left it (private and in memory), if it is.
    fn write_leaf(&self, volume: u64, block: u64) -> Option<WriteLeaf> {
        let root = self.volume_root(volume)?;
        let vbn = self.index.private_leaf(root, block)?;
        Some(WriteLeaf { volume, root, generation: self.generation, leaf: block >> FANOUT_BITS, vbn })
    }

    /// Read one whole block of a volume (under the lock; used for read-modify-write).
    pub(crate) fn read_block(&mut self, dev: &dyn Device, volume: u64, block: u64, out: &mut [u8]) -> Result<()> {
        let v = self.volumes.get(&volume).ok_or_else(|| Error::NoSuchVolume(volume.to_string()))?;
        let root = v.root;
        let m = self.index.lookup(dev, root, block)?;
        if m.kind != MappingKind::Data {
            out.fill(0);
            return Ok(());
        }
        let e = self.index.bt.get(m.vbn);
        if !self.log.read_buffered(e.pba, out) {
            dev.read_at(out, e.pba * BLOCK_SIZE)?;
        }
        let crc = crc32(out);
        if crc != e.crc {
            return Err(Error::Checksum {
                volume: self.volumes.get(&volume).map(|v| v.name.clone()).unwrap_or_default(),
                volume_offset_bytes: block * BLOCK_SIZE,
                device_offset_bytes: e.pba * BLOCK_SIZE,
                expected: e.crc,
                found: crc,
            });
        }
        Ok(())
    }

    /// Zero bytes `[from, to)` that lie inside one block, by read-modify-write.
    pub(crate) fn zero_partial(&mut self, dev: &dyn Device, volume: u64, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let block = from / BLOCK_SIZE;
        debug_assert_eq!(block, (to - 1) / BLOCK_SIZE);
        let mut buf = vec![0u8; BLOCK];
        self.read_block(dev, volume, block, &mut buf)?;
        let base = block * BLOCK_SIZE;
        buf[(from - base) as usize..(to - base) as usize].fill(0);
        self.write_block(dev, volume, block, &buf)
    }

    /// Replay of one block the cleaner moved between checkpoints [I13]: `vbn`, live in the checkpoint, now at `pba`.
    fn replay_move(&mut self, vbn: u64, pba: u64) -> Result<()> {
        let e = self.index.bt.get(vbn);
        let old_seg = self.segs.segment_of(e.pba);
        if e.refcount == 0 || old_seg.is_none_or(|s| self.segs.live()[s as usize] == 0) {
            return Err(Error::corrupt(
                "log replay",
                pba * BLOCK_SIZE,
                format!("vbn {vbn}, moved here by the cleaner, live in the checkpoint"),
                format!("{e:?}"),
            ));
        }
        self.segs.add_live(pba);
        let old = self.index.block_relocated(vbn, pba);
        self.segs.release(old);
        Ok(())
    }

    /// Make sure `blocks` blocks of log fit without touching the reserve: a checkpoint may free dead segments, and
    /// if that is not enough the cleaner copies the live blocks out of the emptiest ones (greedy, as space is short).
    pub(crate) fn ensure_room(&mut self, dev: &dyn Device, gate: &RwLock<()>, blocks: u64) -> Result<()> {
        self.make_room(dev, gate, blocks, Purpose::Data, |st| st.log.data_room_blocks(&st.segs))
    }

    /// As [`State::ensure_room`], for an op that gives space back (deletes, trims, shrinks): it may use the
    /// checkpoint reserve beyond what the next checkpoint needs, since refusing it could leave a full pool with no
    /// way out [I14].
    pub(crate) fn ensure_room_to_free(&mut self, dev: &dyn Device, gate: &RwLock<()>, blocks: u64) -> Result<()> {
        self.make_room(dev, gate, blocks, Purpose::Freeing, State::freeing_room_blocks)
    }

    /// Blocks the next checkpoint may need for what is dirty now: each dirty node and table page, as many directory
    /// pages at most and a record header for each, the checkpoint record (a little more than the last one), and a
    /// segment for records that do not fit the rest of the open one [I14].
    pub(crate) fn checkpoint_need_blocks(&self) -> u64 {
        3 * self.dirty_metadata_blocks()
            + u64::from(self.sb.checkpoint_payload_blocks)
            + CHECKPOINT_RECORD_SLACK_BLOCKS
            + self.segs.blocks_per_segment
    }

    /// Blocks an op that gives space back may take: all that is free (the reserve included) beyond what the next
    /// checkpoint needs, with the nodes and table pages the op itself dirties (a path of the tallest tree) [I14].
    fn freeing_room_blocks(&self) -> u64 {
        let own = 3 * (u64::from(crate::index::MAX_HEIGHT) + 1);
        self.log.free_blocks(&self.segs).saturating_sub(self.checkpoint_need_blocks() + own)
    }

    fn make_room(
        &mut self,
        dev: &dyn Device,
        gate: &RwLock<()>,
        blocks: u64,
        purpose: Purpose,
        room: impl Fn(&State) -> u64,
    ) -> Result<()> {
        self.log.admitted = purpose;
        let enough = |st: &State| room(st) >= blocks;
        if enough(self) {
            return Ok(());
        }
        // each moving pass frees what is missing and a little ahead, no more: cleaning late keeps victims empty
        let want = blocks.saturating_sub(room(self)) + crate::cleaner::CLEAN_AHEAD_BLOCKS;
        // Moving passes first: they cost their copies and a sync, where a checkpoint rewrites every dirty page [I13].
        self.move_until(dev, gate, 1.0, want, enough)?;
        if enough(self) {
            return Ok(());
        }
        // A checkpoint frees the segments emptied since the last one, lets the cleaner move blocks out of every
        // segment written before it, and clears the dirty metadata whose own checkpoint the copies must leave room
        // for.
        if self.dirty_metadata_blocks() > 0
            || self.log.blocks_since_checkpoint > 0
            || self.segs.reclaimable_count(&self.pinned()) > 0
        {
            self.checkpoint(dev, gate)?;
            if enough(self) {
                return Ok(());
            }
            self.move_until(dev, gate, 1.0, want, enough)?;
            if enough(self) {
                return Ok(());
            }
        }
        // Last, passes that end in a checkpoint: they may also empty segments holding table pages.
        self.clean_until(dev, gate, true, 1.0, enough)?;
        if enough(self) {
            return Ok(());
        }
        Err(Error::NoSpace(format!(
            "{blocks} blocks needed, {} available outside the checkpoint reserve ({} blocks in use hold live data)",
            room(self),
            self.segs.live_total()
        )))
    }

    pub(crate) fn pinned(&self) -> Vec<u64> {
        let [a, b] = self.log.pinned_segments();
        let mut pinned = vec![a, b, self.checkpoint_segment];
        // the record of a checkpoint whose superblock is still to come: current once it lands
        if let Some(p) = &self.pending_checkpoint {
            pinned.extend(self.segs.segment_of(p.sb.checkpoint_pba));
        }
        pinned
    }

    /// Tree nodes and block-table pages the next checkpoint writes.
    pub(crate) fn dirty_metadata_blocks(&self) -> u64 {
        (self.index.dirty_node_count() + self.index.bt.dirty_page_count()) as u64
    }

    /// Whether the log since the last checkpoint, or the dirty metadata, has grown past its bound.
    pub(crate) fn checkpoint_due(&self) -> bool {
        let dirty = self.dirty_metadata_blocks();
        let early = self.checkpoint_interval_blocks / EARLY_CHECKPOINT_SHARE;
        self.log.blocks_since_checkpoint >= self.checkpoint_interval_blocks
            || dirty >= self.max_dirty_metadata_blocks
            || (self.log.blocks_since_checkpoint >= early
                && self.segs.emptied_since_checkpoint() * self.segs.blocks_per_segment >= early)
    }

    /// Whether a write taking `log_blocks` of the log can run without waiting (for [`crate::Volume::try_write_now`]):
    /// the log has room for it outside the checkpoint reserve (no cleaning), moving to the next segment needs no
    /// sync for segments the cleaner emptied [I13], the log writers take the batches it may seal without waiting,
    /// and no checkpoint is due.
    pub(crate) fn can_write_now(&self, log_blocks: u64) -> bool {
        self.log.data_room_blocks(&self.segs) >= log_blocks
            && !self.segs.only_moved_free()
            && self.log.can_seal_now(log_blocks)
            && !self.checkpoint_due()
    }

    /// Checkpoint when the log since the last one, or the dirty metadata, has grown past its bound.
    pub(crate) fn maybe_checkpoint(&mut self, dev: &dyn Device, gate: &RwLock<()>) -> Result<()> {
        if self.checkpoint_due() {
            // When free segments run low, the checkpoint is a cleaning pass (cost-benefit): space comes back a
            // little at a time, before writes have to wait for a greedy clean.
            if self.segs.free_count() < self.clean_start_free_segments {
                let pass = self.clean_pass(dev, gate, false, crate::cleaner::AUTO_CLEAN_MAX_UTILIZATION)?;
                if pass.passes > 0 {
                    return Ok(());
                }
            }
            self.checkpoint(dev, gate)?;
        }
        Ok(())
    }

    /// Write a checkpoint: dirty nodes, then table pages, then directory pages, then the checkpoint record; sync;
    /// then the superblock; sync; then free the segments no longer referenced [I1][I4]. All under the pool lock; the
    /// write paths use [`maybe_checkpoint_unlocked`], whose sync lets writes go on.
    pub(crate) fn checkpoint(&mut self, dev: &dyn Device, gate: &RwLock<()>) -> Result<()> {
        self.check_writable()?;
        let steps = self
            .finish_checkpoint(dev, gate)
            .and_then(|_| self.begin_checkpoint(dev))
            .and_then(|_| self.finish_checkpoint(dev, gate));
        if let Err(e) = steps {
            return Err(self.fail(e));
        }
        self.restore_reserve(dev, gate)
    }

    /// Complete a checkpoint whose record is written (syncing under the lock), if there is one: before anything that
    /// relies on the current checkpoint (a cleaning pass, which may only move blocks out of segments written before
    /// it [I13]) or begins another.
    pub(crate) fn complete_pending_checkpoint(&mut self, dev: &dyn Device, gate: &RwLock<()>) -> Result<()> {
        if self.pending_checkpoint.is_none() {
            return Ok(());
        }
        self.check_writable()?;
        self.finish_checkpoint(dev, gate).map_err(|e| self.fail(e))
    }

    /// A checkpoint may take some of the segments kept for checkpoints; moving passes give them back at once, when
    /// the live data allows, so that checkpoints with no op between them (explicit ones, cleaning passes) cannot
    /// use up the reserve one after another [I14].
    fn restore_reserve(&mut self, dev: &dyn Device, gate: &RwLock<()>) -> Result<()> {
        if self.log.reserve_intact(&self.segs) {
            return Ok(());
        }
        let want = (self.log.reserve_segments - self.segs.free_count()) * self.segs.blocks_per_segment;
        self.move_until(dev, gate, 1.0, want, |st| st.log.reserve_intact(&st.segs))?;
        Ok(())
    }

    /// Write only a superblock that carries the log's cursor (with its renumbering [I3]), the checkpoint unchanged.
    /// Used at open when replay found no record: the state is exactly the checkpoint's. A crash before the
    /// superblock is synced leaves the previous one, whose replay still finds nothing.
    fn renumber_cursor(&mut self, dev: &dyn Device) -> Result<()> {
        let sb = Superblock { generation: self.sb.generation + 1, replay: self.log.cursor(), ..self.sb.clone() };
        dev.write_at(&sb.encode(), SUPERBLOCK_OFFSETS[(sb.generation % 2) as usize])?;
        dev.sync()?;
        self.sb = sb;
        Ok(())
    }

    pub(crate) fn write_pages(
        &mut self,
        dev: &dyn Device,
        kind: RecordKind,
        pages: Vec<(u64, Vec<u8>)>,
        mut written: impl FnMut(&mut Self, u64, PageLoc) -> u64,
    ) -> Result<()> {
        let per_record = self.per_record_blocks() as usize;
        let mut payload = Vec::with_capacity(pages.len().min(per_record) * BLOCK);
        for chunk in pages.chunks(per_record) {
            let ids: Vec<u64> = chunk.iter().map(|(id, _)| *id).collect();
            payload.clear();
            for (_, buf) in chunk {
                payload.extend_from_slice(buf);
            }
            self.write_record(dev, kind, &ids, &payload, true, &mut written)?;
        }
        Ok(())
    }

    /// Blocks one record of named blocks (pages, nodes, copies) holds: as many ids as its body lists, and what fits
    /// in a segment.
    pub(crate) fn per_record_blocks(&self) -> u64 {
        ((BODY_CAPACITY_BYTES / 8) as u64).min(self.segs.blocks_per_segment - 1)
    }

    /// Append one record of `kind` holding the blocks `payload` named by `ids` (at most
    /// [`State::per_record_blocks`]), and tell `written` where each went (with its crc32 when `crc_each`, else 0),
    /// releasing the block it returns.
    pub(crate) fn write_record(
        &mut self,
        dev: &dyn Device,
        kind: RecordKind,
        ids: &[u64],
        payload: &[u8],
        crc_each: bool,
        mut written: impl FnMut(&mut Self, u64, PageLoc) -> u64,
    ) -> Result<()> {
        assert_eq!(payload.len(), ids.len() * BLOCK, "one block of payload per id");
        let body: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        // a Moved record's payload is checksummed in its header, so replay can tell a torn copy [I13]; the other
        // kinds' blocks are checksummed where they are referenced [I6]
        let payload_crc = if kind == RecordKind::Moved { crc32(payload) } else { 0 };
        let first = self.log.append_record(dev, &mut self.segs, kind, body, payload, payload_crc)?;
        if kind == RecordKind::Moved {
            // replayed at open like the ops, so they count toward the replay the checkpoint interval bounds
            self.log.blocks_since_checkpoint += 1 + ids.len() as u64;
        }
        for (i, (id, buf)) in ids.iter().zip(payload.chunks(BLOCK)).enumerate() {
            let pba = first + i as u64;
            self.segs.add_live(pba);
            let crc = if crc_each { crc32(buf) } else { 0 };
            let old = written(self, *id, PageLoc { pba, crc });
            if old != 0 {
                self.segs.release(old);
            }
        }
        Ok(())
    }

    /// The first half of a checkpoint, under the lock: every dirty page and the checkpoint record written (and
    /// drained), the checkpoint pending until [`State::finish_checkpoint`] [I1]. Returns its id.
    fn begin_checkpoint(&mut self, dev: &dyn Device) -> Result<u64> {
        assert!(self.pending_checkpoint.is_none(), "a checkpoint begun while another is pending");
        self.log.seal()?;
        let nodes = self.index.dirty_nodes();
        self.write_pages(dev, RecordKind::Nodes, nodes, |st, vbn, loc| st.index.node_written(vbn, loc.pba, loc.crc))?;
        // Table and directory pages with nothing in them are dropped, not written [I5].
        let (empty, pages) = split_empty(self.index.bt.dirty_pages());
        for p in empty {
            let old = self.index.bt.page_dropped(p);
            if old != 0 {
                self.segs.release(old);
            }
        }
        self.write_pages(dev, RecordKind::TablePages, pages, |st, p, loc| st.index.bt.page_written(p, loc))?;
        let (empty, dirs) = split_empty(self.index.bt.dirty_dirs());
        for d in empty {
            let old = self.index.bt.dir_dropped(d);
            if old != 0 {
                self.segs.release(old);
            }
        }
        self.write_pages(dev, RecordKind::DirPages, dirs, |st, d, loc| st.index.bt.dir_written(d, loc))?;
        let cp = Checkpoint {
            generation: self.generation,
            next_vbn: self.index.next_vbn,
            next_volume_id: self.next_volume_id,
            volumes: self
                .volumes
                .iter()
                .map(|(id, v)| VolumeRecord {
                    id: *id,
                    name: v.name.clone(),
                    size_bytes: v.size_bytes,
                    root_vbn: v.root.vbn,
                    height: v.root.height,
                })
                .collect(),
            snapshots: self
                .snapshots
                .iter()
                .map(|(id, sn)| SnapshotRecord {
                    id: *id,
                    name: sn.name.clone(),
                    size_bytes: sn.size_bytes,
                    root_vbn: sn.root.vbn,
                    height: sn.root.height,
                    generation: sn.generation,
                })
                .collect(),
            dots: self.dots.iter().map(|(id, d)| d.to_record(*id)).collect(),
            dir_pages: self.index.bt.dir_locs().to_vec(),
            segment_live_blocks: self.segs.live().to_vec(),
        };
        let mut payload = cp.encode();
        payload.resize(payload.len().div_ceil(BLOCK) * BLOCK, 0);
        let crc = crc32(&payload);
        let first = self.log.append_record(dev, &mut self.segs, RecordKind::Checkpoint, Vec::new(), &payload, crc)?;
        self.log.drain()?;
        let sb = Superblock {
            generation: self.sb.generation + 1,
            checkpoint_pba: first - 1,
            checkpoint_payload_blocks: (payload.len() / BLOCK) as u32,
            checkpoint_crc: crc,
            replay: self.log.cursor(),
            // an older pool opened by this build is written in this build's format from its first checkpoint on
            version: FORMAT_VERSION,
            ..self.sb.clone()
        };
        let log_segments = self.log.pinned_segments();
        // Counted from the record on: writes while its sync runs count toward the next checkpoint.
        self.log.blocks_since_checkpoint = 0;
        let frees = self.segs.checkpoint_frees(&log_segments);
        // The vbns freed before the record may be handed out from here on, as a replay that passes the record does
        // (and as an open of this checkpoint computes them) [I9].
        self.index.checkpoint_completed();
        let heads: Vec<Root> = self.volumes.values().map(|v| v.root).collect();
        self.index.evict_unreachable(&heads);
        self.checkpoints_begun += 1;
        self.pending_checkpoint = Some(PendingCheckpoint {
            id: self.checkpoints_begun,
            sb,
            synced_below: self.log.next_seq(),
            blocks_written: self.log.blocks_written,
            log_segment: log_segments[0],
            frees,
            step: CheckpointStep::Recorded,
        });
        Ok(self.checkpoints_begun)
    }

    /// Complete the pending checkpoint, if any, syncing here under the lock: its superblock after a sync, then the
    /// segments freed after another [I1][I4].
    fn finish_checkpoint(&mut self, dev: &dyn Device, gate: &RwLock<()>) -> Result<()> {
        while let Some(p) = &self.pending_checkpoint {
            let step = p.step;
            dev.sync()?;
            self.checkpoint_synced(dev, gate, step)?;
        }
        Ok(())
    }

    /// A sync that began once the pending checkpoint had reached `step` completed: its next step. After its record,
    /// the superblock that points at it (the record and everything before it are durable now); after that, the
    /// checkpoint is complete (the superblock is durable): the segments empty when its record was written are free
    /// [I1][I4].
    fn checkpoint_synced(&mut self, dev: &dyn Device, gate: &RwLock<()>, step: CheckpointStep) -> Result<()> {
        let Some(p) = &mut self.pending_checkpoint else { return Ok(()) };
        assert_eq!(p.step, step, "a checkpoint step synced twice");
        if step == CheckpointStep::Recorded {
            let (below, written) = (p.synced_below, p.blocks_written);
            dev.write_at(&p.sb.encode(), SUPERBLOCK_OFFSETS[(p.sb.generation % 2) as usize])?;
            p.step = CheckpointStep::SuperblockWritten;
            self.log.synced(&mut self.segs, below);
            self.log.synced_blocks(written);
            return Ok(());
        }
        let Some(p) = self.pending_checkpoint.take() else { return Ok(()) };
        self.checkpoint_segment = self.segs.segment_of(p.sb.checkpoint_pba).unwrap_or(0);
        self.segs.set_checkpoint_mark(p.log_segment);
        // only what the checkpoint changes: the rest may have changed since its record (a grow)
        self.sb = Superblock {
            generation: p.sb.generation,
            checkpoint_pba: p.sb.checkpoint_pba,
            checkpoint_payload_blocks: p.sb.checkpoint_payload_blocks,
            checkpoint_crc: p.sb.checkpoint_crc,
            replay: p.sb.replay,
            version: p.sb.version,
            ..self.sb.clone()
        };
        self.counters.checkpoints += 1;
        let pinned = self.pinned();
        let _exclusive = gate.write();
        // (segments the cleaner emptied before the record were freed by the first sync: passes complete a pending
        // checkpoint before they move anything)
        debug_assert_eq!(
            self.segs.moved_count(),
            0,
            "a segment emptied by a moving pass while a checkpoint was pending"
        );
        self.segs.checkpoint_completed(&p.frees, &pinned);
        Ok(())
    }

    /// The step the pending checkpoint `id` has reached; `None` if it is no longer pending (someone completed it).
    fn checkpoint_step(&self, id: u64) -> Option<CheckpointStep> {
        self.pending_checkpoint.as_ref().filter(|p| p.id == id).map(|p| p.step)
    }
}

/// Split pages into the ids of empty ones and the others, encoded.
fn split_empty(pages: Vec<(u64, Box<Page>)>) -> (Vec<u64>, Vec<(u64, Vec<u8>)>) {
    let mut empty = Vec::new();
    let mut full = Vec::new();
    for (id, p) in pages {
        if p.iter().all(|s| *s == Slot::default()) {
            empty.push(id);
        } else {
            let mut buf = vec![0u8; BLOCK];
            encode_page(&p, &mut buf);
            full.push((id, buf));
        }
    }
    (empty, full)
}

/// Blocks of log a write of `blocks` data blocks may need (headers included).
pub(crate) fn log_blocks_for(blocks: u64) -> u64 {
    blocks + blocks.div_ceil(u64::from(MAX_BATCH_DATA_BLOCKS)) + 2
}
