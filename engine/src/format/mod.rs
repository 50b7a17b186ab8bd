//! On-disk formats: every structure the engine writes, with its encoding and validation.
//!
//! All integers are fixed-width little-endian. Every structure carries a version (directly, or through the record or
//! superblock that holds it) and a checksum (in itself, or in the entry that references it). The byte layouts and the
//! invariants cited as `[I<n>]` in the code are documented in `engine/docs/format.md`.

pub(crate) mod checkpoint;
pub(crate) mod node;
pub(crate) mod ops;
pub(crate) mod record;
pub(crate) mod superblock;

use crate::{Error, Result};

/// The engine's internal block: the unit of mapping, of log records and of checksums.
pub const BLOCK_SIZE: u64 = 4096;
/// [`BLOCK_SIZE`] as a `usize`.
pub(crate) const BLOCK: usize = BLOCK_SIZE as usize;
/// The newest pool format this build reads and writes (3: the cleaner's `Moved` records, invariant I13; 4: dot
/// properties, a `SetProperty` dot op and checkpoint payload version 2; 5: free vbns are reused, I9; 6: ops may
/// follow a checkpoint record whose superblock has not landed yet, and replay frees the vbns freed before such a
/// record when it passes it, I1 and I9).
pub const FORMAT_VERSION: u32 = 6;
/// The oldest pool format this build opens. A version 2 to 4 pool is a version 5 pool without `Moved` records or
/// dot properties (its checkpoint payload is version 1, which still decodes), whose log was written without reusing
/// vbns (replayed so); a version 5 pool is a version 6 pool with no op after a pending checkpoint's record. Opening
/// one rewrites its superblock as [`FORMAT_VERSION`] at the recovery checkpoint, after which older builds refuse it.
pub const MIN_FORMAT_VERSION: u32 = 2;
/// Device offsets of the two superblocks.
pub(crate) const SUPERBLOCK_OFFSETS: [u64; 2] = [0, BLOCK_SIZE];
/// Device offset of segment 0. Everything between the superblocks and here is reserved (zero).
pub(crate) const SEGMENT_AREA_OFFSET: u64 = 64 * 1024;

/// CRC-32 (IEEE) of `data`.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Enc {
    pub(crate) buf: Vec<u8>,
}

impl Enc {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self { buf: Vec::with_capacity(n) }
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }
}

/// Reads little-endian fields from a buffer; running past its end is a corruption error naming the structure.
#[derive(Debug)]
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
    offset_bytes: u64,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str, offset_bytes: u64) -> Self {
        Self { buf, pos: 0, what, offset_bytes }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            Error::corrupt(
                self.what,
                self.offset_bytes,
                format!("{n} more bytes at position {}", self.pos),
                format!("{} bytes in all", self.buf.len()),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(a))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        self.take(n)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// A corruption error at the current position of this structure.
    pub(crate) fn bad(&self, expected: impl std::fmt::Display, found: impl std::fmt::Display) -> Error {
        Error::corrupt(self.what, self.offset_bytes, expected, found)
    }
}

/// Read a little-endian u32 at `at` of a buffer known to be long enough.
pub(crate) fn le_u32(buf: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Read a little-endian u64 at `at` of a buffer known to be long enough.
pub(crate) fn le_u64(buf: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(a)
}
