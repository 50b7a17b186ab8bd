//! Log records: a 4 KiB header block followed by payload blocks.

use super::{crc32, le_u32, le_u64, Enc, BLOCK};
use crate::Result;

/// Identifies a record header block.
pub(crate) const RECORD_MAGIC: u32 = 0x4352_4d42; // "BMRC"
/// Version of the record header layout (2: with `synced_below`).
pub(crate) const RECORD_VERSION: u16 = 2;
/// Bytes of the header block before the body.
pub(crate) const HEADER_FIXED_BYTES: usize = 56;
/// Bytes of body a header block holds.
pub(crate) const BODY_CAPACITY_BYTES: usize = BLOCK - HEADER_FIXED_BYTES;
const HEADER_CRC_AT: usize = 44;

/// What a record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum RecordKind {
    /// Volume operations (body) and the data blocks of their writes (payload). Replayed after a crash.
    Batch = 1,
    /// Index tree nodes (payload), their vbns listed in the body. Written by checkpoints.
    Nodes = 2,
    /// Block-table pages (payload), their page numbers in the body. Written by checkpoints.
    TablePages = 3,
    /// Block-table directory pages (payload), their numbers in the body. Written by checkpoints.
    DirPages = 4,
    /// A checkpoint: the catalog, the directory top, segment usage (payload). Written last by a checkpoint.
    Checkpoint = 5,
    /// Live blocks the cleaner moved between checkpoints (payload, unchanged), their vbns listed in the body; the
    /// header's payload CRC covers the payload. Replayed before every op of the log tail [I13].
    Moved = 6,
}

impl RecordKind {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Batch,
            2 => Self::Nodes,
            3 => Self::TablePages,
            4 => Self::DirPages,
            5 => Self::Checkpoint,
            6 => Self::Moved,
            _ => return None,
        })
    }
}

/// A decoded record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub(crate) kind: RecordKind,
    pub(crate) pool_id: u64,
    pub(crate) seq: u64,
    pub(crate) payload_blocks: u32,
    pub(crate) next_segment: u64,
    /// CRC-32 of the whole payload (checkpoint records), 0 where each payload block's checksum lives elsewhere.
    pub(crate) payload_crc: u32,
    /// Every record with a lower sequence number had been synced (a flush or checkpoint completed) when this one
    /// was written: replay uses it to tell a damaged durable record from a torn unflushed tail [I2].
    pub(crate) synced_below: u64,
    pub(crate) body: Vec<u8>,
}

/// Why a block is not the record replay was looking for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotARecord {
    /// No record magic.
    NoMagic,
    /// A record of a newer layout version.
    NewerVersion(u16),
    /// Checksum mismatch (torn or damaged).
    BadChecksum { stored: u32, actual: u32 },
    /// A record of another pool (a re-created pool over an old one).
    OtherPool(u64),
    /// Fields out of range.
    Malformed(String),
}

impl RecordHeader {
    pub(crate) fn encode(&self) -> Vec<u8> {
        assert!(self.body.len() <= BODY_CAPACITY_BYTES, "record body over capacity");
        let mut e = Enc::with_capacity(BLOCK);
        e.u32(RECORD_MAGIC);
        e.u16(RECORD_VERSION);
        e.u16(self.kind as u16);
        e.u64(self.pool_id);
        e.u64(self.seq);
        e.u32(self.payload_blocks);
        e.u32(self.body.len() as u32);
        e.u64(self.next_segment);
        e.u32(self.payload_crc);
        e.u32(0); // header crc, filled below
        e.u64(self.synced_below);
        debug_assert_eq!(e.len(), HEADER_FIXED_BYTES);
        e.bytes(&self.body);
        let mut buf = e.buf;
        buf.resize(BLOCK, 0);
        let crc = crc32(&buf);
        buf[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decode a header block; `Ok(Err(..))` says why this block is not a valid record of `pool_id`.
    pub(crate) fn decode(buf: &[u8], pool_id: u64) -> Result<Result<Self, NotARecord>> {
        if buf.len() != BLOCK || le_u32(buf, 0) != RECORD_MAGIC {
            return Ok(Err(NotARecord::NoMagic));
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != RECORD_VERSION {
            return Ok(Err(NotARecord::NewerVersion(version)));
        }
        let stored = le_u32(buf, HEADER_CRC_AT);
        let mut copy = [0u8; BLOCK];
        copy.copy_from_slice(buf);
        copy[HEADER_CRC_AT..HEADER_CRC_AT + 4].fill(0);
        let actual = crc32(&copy);
        if stored != actual {
            return Ok(Err(NotARecord::BadChecksum { stored, actual }));
        }
        let kind_raw = u16::from_le_bytes([buf[6], buf[7]]);
        let Some(kind) = RecordKind::from_u16(kind_raw) else {
            return Ok(Err(NotARecord::Malformed(format!("unknown record kind {kind_raw}"))));
        };
        let pid = le_u64(buf, 8);
        if pid != pool_id {
            return Ok(Err(NotARecord::OtherPool(pid)));
        }
        let body_len = le_u32(buf, 28) as usize;
        if body_len > BODY_CAPACITY_BYTES {
            return Ok(Err(NotARecord::Malformed(format!("body length {body_len}"))));
        }
        Ok(Ok(RecordHeader {
            kind,
            pool_id: pid,
            seq: le_u64(buf, 16),
            payload_blocks: le_u32(buf, 24),
            next_segment: le_u64(buf, 32),
            payload_crc: le_u32(buf, 40),
            synced_below: le_u64(buf, 48),
            body: buf[HEADER_FIXED_BYTES..HEADER_FIXED_BYTES + body_len].to_vec(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejections() {
        let h = RecordHeader {
            kind: RecordKind::Batch,
            pool_id: 42,
            seq: 1000,
            payload_blocks: 3,
            next_segment: 9,
            payload_crc: 0,
            synced_below: 999,
            body: vec![1, 2, 3, 4, 5],
        };
        let buf = h.encode();
        assert_eq!(RecordHeader::decode(&buf, 42).expect("io"), Ok(h));
        assert_eq!(RecordHeader::decode(&buf, 43).expect("io"), Err(NotARecord::OtherPool(42)));
        let mut torn = buf.clone();
        torn[2000] ^= 0x10;
        assert!(matches!(RecordHeader::decode(&torn, 42).expect("io"), Err(NotARecord::BadChecksum { .. })));
        assert_eq!(RecordHeader::decode(&[0u8; BLOCK], 42).expect("io"), Err(NotARecord::NoMagic));
    }
}
