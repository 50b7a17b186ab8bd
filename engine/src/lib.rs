//! `blockmesh-engine`: a log-structured copy-on-write store of thin block volumes inside one pool.
//!
//! A [`Pool`] lives on one [`io::Device`] (a file, a block device, or a simulated device in tests). It holds thin
//! [`Volume`]s addressed in bytes (512-byte granularity, 4 KiB internal blocks). Writes append to a log; flush makes
//! them durable; after a crash the pool opens to a state holding every write acknowledged before the last completed
//! flush. The on-disk format and its invariants (`[I<n>]` in the code) are in `engine/docs/format.md`.
//!
//! ```
//! use std::sync::Arc;
//! use blockmesh_engine::{io::SimDevice, Pool, PoolOptions};
//!
//! let dev = SimDevice::new(64 << 20);
//! let opts = PoolOptions { segment_size_bytes: 1 << 20, ..PoolOptions::default() };
//! let pool = Pool::create(dev.clone(), opts.clone())?;
//! let vol = pool.create_volume("db", 16 << 20)?;
//! vol.write(4096, &[7u8; 8192])?;
//! vol.flush()?;
//! drop(pool);
//!
//! let pool = Pool::open(dev, opts)?;
//! let mut buf = vec![0u8; 512];
//! pool.volume("db")?.read(8192, &mut buf)?;
//! assert!(buf.iter().all(|&b| b == 7));
//! assert!(pool.check()?.problems.is_empty());
//! # Ok::<(), blockmesh_engine::Error>(())
//! ```
#![warn(missing_docs)]

mod allocator;
mod check;
mod cleaner;
mod dots;
pub mod error;
pub mod format;
mod index;
pub mod io;
mod journal;
mod pool;
mod scrub;
mod stream;
mod usage;
mod volume;

pub use check::CheckReport;
pub use cleaner::background::{BACKGROUND_CLEAN_TICK, BACKGROUND_SYNC_LOG_BYTES};
pub use cleaner::{
    CleanStats, AUTO_CLEAN_MAX_UTILIZATION, CLEAN_MAX_UTILIZATION, MAX_CLEAN_PASSES, MAX_CLEAN_SEGMENTS_PER_PASS,
};
pub use dots::{
    validate_dot_name, CommitId, CommitInfo, CommitRequest, DotInfo, DEFAULT_SUBDOT, MASTER_BRANCH,
    MAX_COMMIT_AUTHOR_BYTES, MAX_COMMIT_MESSAGE_BYTES, MAX_COMMIT_METADATA_BYTES, MAX_COMMIT_METADATA_PAIRS,
    MAX_DOT_PROPERTIES, MAX_PROPERTY_KEY_BYTES, MAX_PROPERTY_VALUE_BYTES,
};
pub use error::{Error, Result};
pub use format::ops::MAX_SNAPSHOT_VOLUMES;
pub use format::BLOCK_SIZE;
pub use index::{Extent, ExtentKind};
pub use journal::{DEFAULT_LOG_WRITER_THREADS, MAX_LOG_WRITER_THREADS};
pub use pool::{
    validate_volume_name, Pool, PoolOptions, PoolStats, SnapshotInfo, VolumeInfo, DEFAULT_CHECKPOINT_INTERVAL_BYTES,
    DEFAULT_SEGMENT_SIZE_BYTES, DEFAULT_UNCACHED_WRITE_MIN_BYTES, EARLY_CHECKPOINT_SHARE, MAX_DIRTY_METADATA_BLOCKS,
    MAX_IO_BYTES, MAX_NEXT_VBN_BEFORE_FORMAT_5, MAX_SEGMENT_SIZE_BYTES, MAX_VOLUMES, MAX_VOLUME_SIZE_BYTES,
    MIN_SEGMENT_SIZE_BYTES,
};
pub use scrub::{ScrubProblem, ScrubReport, MAX_SCRUB_USES_PER_BLOCK, SCRUB_BATCH_BLOCKS};
pub use stream::{
    read_stream_head, PendingReceive, ReceiveOutcome, SendStats, StreamHead, MAX_STREAM_DATA_BYTES,
    RECEIVE_PROGRESS_INTERVAL_BYTES, STREAM_MAGIC, STREAM_VERSION,
};
pub use usage::{DotUsage, SpaceUsage, Usage};
pub use volume::Volume;
