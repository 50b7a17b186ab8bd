//! The engine's one error type.
//!
//! Corruption errors carry evidence: where (device offset, volume and offset), what was expected and what was found.

use std::fmt;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way an engine call can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device returned an I/O error.
    #[error("I/O error during {op} of {len_bytes} bytes at device offset {offset_bytes}: {source}")]
    Io {
        /// `read`, `write` or `sync`.
        op: &'static str,
        /// Device byte offset.
        offset_bytes: u64,
        /// Length of the request in bytes.
        len_bytes: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The device holds no blockmesh pool (no magic number in either superblock).
    #[error("{0}: not a blockmesh pool (no pool superblock found); refusing to open it")]
    NotAPool(String),

    /// The pool was written by a newer version of blockmesh.
    #[error("pool format version {found} is newer than this build supports ({supported}); upgrade blockmesh")]
    UnsupportedVersion {
        /// Version found on disk.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },

    /// The pool was written by an older, incompatible version of blockmesh (before a format change).
    #[error(
        "pool format version {found} was written by an older build of blockmesh; this build reads versions \
         {supported} and later only: copy the data out with the older build (send/receive, or an NBD copy) and re-create the pool"
    )]
    OlderFormat {
        /// Version found on disk.
        found: u32,
        /// The oldest version this build reads.
        supported: u32,
    },

    /// The device is smaller than the pool recorded in its superblock (truncated file).
    #[error("device is {device_bytes} bytes but the pool needs {pool_bytes} bytes: truncated pool?")]
    Truncated {
        /// Actual device size.
        device_bytes: u64,
        /// Size the superblock records.
        pool_bytes: u64,
    },

    /// On-disk metadata failed validation.
    #[error("corruption in {what} at device offset {offset_bytes}: expected {expected}, found {found}")]
    Corrupt {
        /// Which structure.
        what: &'static str,
        /// Device byte offset of the structure.
        offset_bytes: u64,
        /// What validation expected.
        expected: String,
        /// What was found.
        found: String,
    },

    /// A data block's checksum did not match the checksum recorded in the index.
    #[error(
        "checksum mismatch reading volume {volume:?} at offset {volume_offset_bytes}: block at device offset \
         {device_offset_bytes} has crc32 {found:#010x}, the index expects {expected:#010x}"
    )]
    Checksum {
        /// Volume name.
        volume: String,
        /// Byte offset in the volume of the bad block.
        volume_offset_bytes: u64,
        /// Device byte offset of the bad block.
        device_offset_bytes: u64,
        /// Checksum the index holds.
        expected: u32,
        /// Checksum of the bytes read.
        found: u32,
    },

    /// A request's offset or length is not a multiple of the sector size.
    #[error("{what} {value} is not a multiple of {align} bytes")]
    Unaligned {
        /// `offset` or `length`.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The required alignment.
        align: u64,
    },

    /// A request reaches past the end of the volume.
    #[error("request [{offset_bytes}, +{len_bytes}) is out of range for volume {volume:?} of {size_bytes} bytes")]
    OutOfRange {
        /// Volume name.
        volume: String,
        /// Request offset.
        offset_bytes: u64,
        /// Request length.
        len_bytes: u64,
        /// Volume size.
        size_bytes: u64,
    },

    /// A request or argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// No volume has that name (or id).
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),

    /// A volume or snapshot with that name exists already.
    #[error("a volume or snapshot named {0:?} exists already")]
    VolumeExists(String),

    /// No snapshot has that name.
    #[error("no snapshot named {0:?}")]
    NoSuchSnapshot(String),

    /// No dot has that name.
    #[error("no dot named {0:?}")]
    NoSuchDot(String),

    /// A dot with that name exists already.
    #[error("a dot named {0:?} exists already")]
    DotExists(String),

    /// No such branch.
    #[error("no branch {0}")]
    NoSuchBranch(String),

    /// The branch exists already.
    #[error("branch {0} exists already")]
    BranchExists(String),

    /// No such commit.
    #[error("no commit {0}")]
    NoSuchCommit(String),

    /// A send/receive stream was refused (truncated, corrupt, base missing, ...); the pool is unchanged.
    #[error("stream refused: {0}")]
    BadStream(String),

    /// A stream ended (or its reader failed) before its trailer. What arrived is kept in the pool, not visible: send
    /// the rest from `resume_at_bytes` to [`crate::Pool::resume_receive`], or drop it with
    /// [`crate::Pool::abort_receive`].
    #[error(
        "stream of commit {commit} ended at byte {ended_at_bytes} before its trailer ({cause}); what arrived is kept: \
         resume from byte {resume_at_bytes}"
    )]
    StreamInterrupted {
        /// The commit the stream carries.
        commit: String,
        /// Where the input stopped.
        ended_at_bytes: u64,
        /// The end of the last record applied: where a resumed stream continues.
        resume_at_bytes: u64,
        /// What stopped it (end of input, or the reader's error).
        cause: String,
    },

    /// A write to a read-only volume (a snapshot).
    #[error("{0:?} is read-only (a snapshot); clone it to write")]
    ReadOnly(String),

    /// Shrinking would drop written data.
    #[error(
        "shrinking volume {volume:?} to {new_size_bytes} bytes would drop data written at offset \
         {first_written_bytes}; pass force to shrink anyway"
    )]
    ShrinkDropsData {
        /// Volume name.
        volume: String,
        /// Requested size.
        new_size_bytes: u64,
        /// First written byte beyond the new size.
        first_written_bytes: u64,
    },

    /// The pool has no free space left for new writes.
    #[error("pool is out of space: {0}")]
    NoSpace(String),

    /// A limit of the engine was reached.
    #[error("limit reached: {0}")]
    Limit(String),

    /// An earlier write or flush failed: the pool accepts no more changes until it is reopened.
    #[error("pool is in a failed state after an earlier I/O error ({0}); reopen it to recover")]
    Failed(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, offset_bytes: u64, len_bytes: u64, source: std::io::Error) -> Self {
        Error::Io { op, offset_bytes, len_bytes, source }
    }

    pub(crate) fn corrupt(
        what: &'static str,
        offset_bytes: u64,
        expected: impl fmt::Display,
        found: impl fmt::Display,
    ) -> Self {
        Error::Corrupt { what, offset_bytes, expected: expected.to_string(), found: found.to_string() }
    }

    /// True when the error reports damaged on-disk data (checksum or structure).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::Checksum { .. })
    }
}
