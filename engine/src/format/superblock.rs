//! The superblock: two copies at fixed offsets, alternately written; the valid one with the highest generation wins.

use super::{crc32, le_u32, Dec, Enc, BLOCK, FORMAT_VERSION, MIN_FORMAT_VERSION};
use crate::{Error, Result};

/// Identifies a blockmesh pool superblock.
pub(crate) const SUPERBLOCK_MAGIC: [u8; 8] = *b"BMSHPOOL";
/// Byte offset of the checksum inside the superblock block.
const CRC_AT: usize = BLOCK - 4;

/// Where the log continues after a checkpoint: replay starts here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogCursor {
    /// Segment the log is writing (the cursor may sit at its very end).
    pub(crate) segment: u64,
    /// Physical block (4 KiB units from the device start) of the next record.
    pub(crate) pba: u64,
    /// Segment the log moves to when the current one has no room.
    pub(crate) next_segment: u64,
    /// Sequence number the next record must carry.
    pub(crate) seq: u64,
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub(crate) version: u32,
    pub(crate) pool_id: u64,
    pub(crate) generation: u64,
    pub(crate) pool_size_bytes: u64,
    pub(crate) segment_size_bytes: u64,
    pub(crate) segment_count: u64,
    /// First block of the checkpoint record (its header block).
    pub(crate) checkpoint_pba: u64,
    /// Payload blocks of the checkpoint record.
    pub(crate) checkpoint_payload_blocks: u32,
    /// CRC-32 of the checkpoint payload.
    pub(crate) checkpoint_crc: u32,
    /// Where replay starts.
    pub(crate) replay: LogCursor,
}

/// What one superblock slot holds.
#[derive(Debug)]
pub(crate) enum SlotContents {
    /// No magic number: not a pool superblock at all.
    Foreign,
    /// Magic present but the block fails validation (torn or damaged).
    Damaged(String),
    /// A valid superblock.
    Valid(Superblock),
}

impl Superblock {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(BLOCK);
        e.bytes(&SUPERBLOCK_MAGIC);
        e.u32(self.version);
        e.u32(0); // flags, none defined
        e.u64(self.pool_id);
        e.u64(self.generation);
        e.u64(self.pool_size_bytes);
        e.u64(self.segment_size_bytes);
        e.u64(self.segment_count);
        e.u64(self.checkpoint_pba);
        e.u32(self.checkpoint_payload_blocks);
        e.u32(self.checkpoint_crc);
        e.u64(self.replay.segment);
        e.u64(self.replay.pba);
        e.u64(self.replay.next_segment);
        e.u64(self.replay.seq);
        let mut buf = e.buf;
        buf.resize(BLOCK, 0);
        let crc = crc32(&buf[..CRC_AT]);
        buf[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decode one slot. A newer format version is an error (never a reason to guess).
    pub(crate) fn decode(buf: &[u8], offset_bytes: u64) -> Result<SlotContents> {
        if buf.len() != BLOCK || buf[..8] != SUPERBLOCK_MAGIC {
            return Ok(SlotContents::Foreign);
        }
        let mut d = Dec::new(buf, "superblock", offset_bytes);
        d.bytes(8)?;
        let version = d.u32()?;
        if version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        if version < MIN_FORMAT_VERSION {
            return Err(Error::OlderFormat { found: version, supported: MIN_FORMAT_VERSION });
        }
        let stored = le_u32(buf, CRC_AT);
        let actual = crc32(&buf[..CRC_AT]);
        if stored != actual {
            return Ok(SlotContents::Damaged(format!(
                "superblock at offset {offset_bytes}: crc32 {actual:#010x}, stored {stored:#010x}"
            )));
        }
        if version == 0 {
            return Ok(SlotContents::Damaged(format!("superblock at offset {offset_bytes}: version 0")));
        }
        let _flags = d.u32()?;
        let sb = Superblock {
            version,
            pool_id: d.u64()?,
            generation: d.u64()?,
            pool_size_bytes: d.u64()?,
            segment_size_bytes: d.u64()?,
            segment_count: d.u64()?,
            checkpoint_pba: d.u64()?,
            checkpoint_payload_blocks: d.u32()?,
            checkpoint_crc: d.u32()?,
            replay: LogCursor { segment: d.u64()?, pba: d.u64()?, next_segment: d.u64()?, seq: d.u64()? },
        };
        Ok(SlotContents::Valid(sb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            pool_id: 7,
            generation: 9,
            pool_size_bytes: 1 << 30,
            segment_size_bytes: 8 << 20,
            segment_count: 127,
            checkpoint_pba: 100,
            checkpoint_payload_blocks: 2,
            checkpoint_crc: 0xdead_beef,
            replay: LogCursor { segment: 4, pba: 103, next_segment: 5, seq: 77 },
        }
    }

    #[test]
    fn roundtrip_and_damage() {
        let sb = sample();
        let buf = sb.encode();
        match Superblock::decode(&buf, 0).expect("decode") {
            SlotContents::Valid(back) => assert_eq!(back, sb),
            other => panic!("expected valid, got {other:?}"),
        }
        let mut bad = buf.clone();
        bad[40] ^= 1;
        assert!(matches!(Superblock::decode(&bad, 0).expect("decode"), SlotContents::Damaged(_)));
        assert!(matches!(Superblock::decode(&[0u8; BLOCK], 0).expect("decode"), SlotContents::Foreign));
        let mut newer = buf;
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(Superblock::decode(&newer, 0), Err(Error::UnsupportedVersion { .. })));
    }
}
