//! The checkpoint payload: everything needed to rebuild the in-memory state, apart from the tree nodes and block-table
//! pages it points to.

use super::{Dec, Enc};
use crate::Result;

const CHECKPOINT_MAGIC: u32 = 0x5043_4d42; // "BMCP"
const CHECKPOINT_VERSION: u32 = 1;

/// A volume as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeRecord {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) size_bytes: u64,
    /// vbn of the root node, 0 for an empty tree.
    pub(crate) root_vbn: u64,
    /// Levels of the tree (1 = the root is a leaf).
    pub(crate) height: u8,
}

/// A snapshot as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotRecord {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) size_bytes: u64,
    pub(crate) root_vbn: u64,
    pub(crate) height: u8,
    /// Birth generation current when it was taken: every block it maps was born at or before it.
    pub(crate) generation: u64,
}

/// Where a page lives: physical block and checksum. `pba == 0` means "never written" (all zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PageLoc {
    pub(crate) pba: u64,
    pub(crate) crc: u32,
}

/// The decoded checkpoint payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Birth generation new writes get.
    pub(crate) generation: u64,
    pub(crate) next_vbn: u64,
    pub(crate) next_volume_id: u64,
    pub(crate) volumes: Vec<VolumeRecord>,
    pub(crate) snapshots: Vec<SnapshotRecord>,
    /// Block-table directory: where each directory page lives.
    pub(crate) dir_pages: Vec<PageLoc>,
    /// Live blocks per segment.
    pub(crate) segment_live_blocks: Vec<u32>,
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(CHECKPOINT_MAGIC);
        e.u32(CHECKPOINT_VERSION);
        e.u64(self.generation);
        e.u64(self.next_vbn);
        e.u64(self.next_volume_id);
        e.u64(self.volumes.len() as u64);
        for v in &self.volumes {
            e.u64(v.id);
            e.u64(v.size_bytes);
            e.u64(v.root_vbn);
            e.u8(v.height);
            e.u8(v.name.len() as u8);
            e.bytes(v.name.as_bytes());
        }
        e.u64(self.snapshots.len() as u64);
        for s in &self.snapshots {
            e.u64(s.id);
            e.u64(s.size_bytes);
            e.u64(s.root_vbn);
            e.u8(s.height);
            e.u64(s.generation);
            e.u8(s.name.len() as u8);
            e.bytes(s.name.as_bytes());
        }
        e.u64(self.dir_pages.len() as u64);
        for p in &self.dir_pages {
            e.u64(p.pba);
            e.u32(p.crc);
        }
        e.u64(self.segment_live_blocks.len() as u64);
        for &n in &self.segment_live_blocks {
            e.u32(n);
        }
        e.buf
    }

    pub(crate) fn decode(buf: &[u8], offset_bytes: u64) -> Result<Self> {
        let mut d = Dec::new(buf, "checkpoint payload", offset_bytes);
        let magic = d.u32()?;
        if magic != CHECKPOINT_MAGIC {
            return Err(d.bad(format!("magic {CHECKPOINT_MAGIC:#x}"), format!("{magic:#x}")));
        }
        let version = d.u32()?;
        if version != CHECKPOINT_VERSION {
            return Err(d.bad(format!("checkpoint version {CHECKPOINT_VERSION}"), version));
        }
        let generation = d.u64()?;
        let next_vbn = d.u64()?;
        let next_volume_id = d.u64()?;
        let n = d.u64()?;
        let mut volumes = Vec::new();
        for _ in 0..n {
            let id = d.u64()?;
            let size_bytes = d.u64()?;
            let root_vbn = d.u64()?;
            let height = d.u8()?;
            let len = d.u8()? as usize;
            let raw = d.bytes(len)?;
            let name = String::from_utf8(raw.to_vec()).map_err(|_| d.bad("a UTF-8 volume name", format!("{raw:?}")))?;
            volumes.push(VolumeRecord { id, name, size_bytes, root_vbn, height });
        }
        let n = d.u64()?;
        let mut snapshots = Vec::new();
        for _ in 0..n {
            let id = d.u64()?;
            let size_bytes = d.u64()?;
            let root_vbn = d.u64()?;
            let height = d.u8()?;
            let generation = d.u64()?;
            let len = d.u8()? as usize;
            let raw = d.bytes(len)?;
            let name =
                String::from_utf8(raw.to_vec()).map_err(|_| d.bad("a UTF-8 snapshot name", format!("{raw:?}")))?;
            snapshots.push(SnapshotRecord { id, name, size_bytes, root_vbn, height, generation });
        }
        let n = d.u64()?;
        let mut dir_pages = Vec::new();
        for _ in 0..n {
            dir_pages.push(PageLoc { pba: d.u64()?, crc: d.u32()? });
        }
        let n = d.u64()?;
        let mut segment_live_blocks = Vec::new();
        for _ in 0..n {
            segment_live_blocks.push(d.u32()?);
        }
        Ok(Self { generation, next_vbn, next_volume_id, volumes, snapshots, dir_pages, segment_live_blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_roundtrip() {
        let c = Checkpoint {
            generation: 3,
            next_vbn: 99,
            next_volume_id: 4,
            volumes: vec![VolumeRecord { id: 1, name: "a".into(), size_bytes: 4096, root_vbn: 5, height: 1 }],
            snapshots: vec![SnapshotRecord {
                id: 2,
                name: "a@1".into(),
                size_bytes: 4096,
                root_vbn: 5,
                height: 1,
                generation: 3,
            }],
            dir_pages: vec![PageLoc { pba: 17, crc: 0xabc }],
            segment_live_blocks: vec![0, 3, 5],
        };
        let buf = c.encode();
        assert_eq!(Checkpoint::decode(&buf, 0).expect("decode"), c);
        assert!(Checkpoint::decode(&buf[..buf.len() - 2], 0).is_err());
    }
}
