//! The checkpoint payload: everything needed to rebuild the in-memory state, apart from the tree nodes and block-table
//! pages it points to.

use super::ops::{CommitMeta, RawCommitId};
use super::{Dec, Enc};
use crate::Result;

const CHECKPOINT_MAGIC: u32 = 0x5043_4d42; // "BMCP"
/// Version 2 (pool format 4) adds each dot's properties; version 1 payloads (pool formats 2 and 3) still decode.
const CHECKPOINT_VERSION: u32 = 2;
/// The oldest checkpoint payload version decoded.
const MIN_CHECKPOINT_VERSION: u32 = 1;

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

/// `(subdot or branch name, volume or snapshot id)` pairs.
pub(crate) type NamedIds = Vec<(String, u64)>;
/// A branch: `(name, head commit, heads)`.
pub(crate) type BranchRecord = (String, Option<RawCommitId>, NamedIds);
/// A commit: `(id, sequence number within the dot, branch, metadata, snapshots)`.
pub(crate) type CommitRecord = (RawCommitId, u64, String, CommitMeta, NamedIds);

/// A dot as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DotRecord {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) current: String,
    pub(crate) branches: Vec<BranchRecord>,
    /// In commit order.
    pub(crate) commits: Vec<CommitRecord>,
    /// The dot's properties `(key, value)`, in key order (checkpoint version 2).
    pub(crate) properties: Vec<(String, String)>,
}

/// A tree height read from disk: 1 up to the most a volume can need (a larger one would overflow every capacity
/// computation; a checksummed checkpoint may still carry one if it was written wrongly).
fn tree_height(d: &mut Dec<'_>) -> Result<u8> {
    let height = d.u8()?;
    if (1..=crate::index::MAX_HEIGHT).contains(&height) {
        Ok(height)
    } else {
        Err(d.bad(format!("a tree height from 1 to {}", crate::index::MAX_HEIGHT), height))
    }
}

fn put_name(e: &mut Enc, s: &str) {
    e.u8(s.len() as u8);
    e.bytes(s.as_bytes());
}

fn put_text(e: &mut Enc, s: &str) {
    e.u32(s.len() as u32);
    e.bytes(s.as_bytes());
}

fn get_name(d: &mut Dec<'_>) -> Result<String> {
    let n = d.u8()? as usize;
    let raw = d.bytes(n)?;
    String::from_utf8(raw.to_vec()).map_err(|_| d.bad("a UTF-8 name", format!("{raw:?}")))
}

fn get_text(d: &mut Dec<'_>) -> Result<String> {
    let n = d.u32()? as usize;
    let raw = d.bytes(n)?;
    String::from_utf8(raw.to_vec()).map_err(|_| d.bad("UTF-8 text", format!("{} bytes", raw.len())))
}

fn get_id(d: &mut Dec<'_>) -> Result<RawCommitId> {
    let mut id = [0u8; 16];
    id.copy_from_slice(d.bytes(16)?);
    Ok(id)
}

fn put_pairs(e: &mut Enc, v: &[(String, u64)]) {
    e.u32(v.len() as u32);
    for (n, id) in v {
        put_name(e, n);
        e.u64(*id);
    }
}

fn get_pairs(d: &mut Dec<'_>) -> Result<Vec<(String, u64)>> {
    let n = d.u32()? as usize;
    let mut v = Vec::new();
    for _ in 0..n {
        let name = get_name(d)?;
        v.push((name, d.u64()?));
    }
    Ok(v)
}

impl DotRecord {
    fn encode(&self, e: &mut Enc, version: u32) {
        e.u64(self.id);
        put_name(e, &self.name);
        put_name(e, &self.current);
        e.u32(self.branches.len() as u32);
        for (name, head, heads) in &self.branches {
            put_name(e, name);
            match head {
                Some(id) => {
                    e.u8(1);
                    e.bytes(id);
                }
                None => e.u8(0),
            }
            put_pairs(e, heads);
        }
        e.u32(self.commits.len() as u32);
        for (id, seq, branch, meta, snaps) in &self.commits {
            e.bytes(id);
            e.u64(*seq);
            put_name(e, branch);
            e.u32(meta.parents.len() as u32);
            for p in &meta.parents {
                e.bytes(p);
            }
            e.u64(meta.time_unix_secs);
            put_text(e, &meta.author);
            put_text(e, &meta.message);
            e.u32(meta.metadata.len() as u32);
            for (k, v) in &meta.metadata {
                put_name(e, k);
                put_text(e, v);
            }
            put_pairs(e, snaps);
        }
        if version >= 2 {
            e.u32(self.properties.len() as u32);
            for (k, v) in &self.properties {
                put_name(e, k);
                put_text(e, v);
            }
        }
    }

    fn decode(d: &mut Dec<'_>, version: u32) -> Result<Self> {
        let id = d.u64()?;
        let name = get_name(d)?;
        let current = get_name(d)?;
        let n = d.u32()?;
        let mut branches = Vec::new();
        for _ in 0..n {
            let b = get_name(d)?;
            let head = if d.u8()? == 1 { Some(get_id(d)?) } else { None };
            branches.push((b, head, get_pairs(d)?));
        }
        let n = d.u32()?;
        let mut commits = Vec::new();
        for _ in 0..n {
            let cid = get_id(d)?;
            let seq = d.u64()?;
            let branch = get_name(d)?;
            let np = d.u32()?;
            let mut parents = Vec::new();
            for _ in 0..np {
                parents.push(get_id(d)?);
            }
            let time_unix_secs = d.u64()?;
            let author = get_text(d)?;
            let message = get_text(d)?;
            let nm = d.u32()?;
            let mut metadata = Vec::new();
            for _ in 0..nm {
                let k = get_name(d)?;
                metadata.push((k, get_text(d)?));
            }
            let snaps = get_pairs(d)?;
            commits.push((cid, seq, branch, CommitMeta { parents, time_unix_secs, author, message, metadata }, snaps));
        }
        let mut properties = Vec::new();
        if version >= 2 {
            let n = d.u32()?;
            for _ in 0..n {
                let k = get_name(d)?;
                properties.push((k, get_text(d)?));
            }
        }
        Ok(Self { id, name, current, branches, commits, properties })
    }
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
    pub(crate) dots: Vec<DotRecord>,
    /// Block-table directory: where each directory page lives.
    pub(crate) dir_pages: Vec<PageLoc>,
    /// Live blocks per segment.
    pub(crate) segment_live_blocks: Vec<u32>,
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_as(CHECKPOINT_VERSION)
    }

    /// Encodes as payload version `version` (older versions only for tests of reading older pools; they drop
    /// what the version cannot hold).
    fn encode_as(&self, version: u32) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(CHECKPOINT_MAGIC);
        e.u32(version);
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
        e.u64(self.dots.len() as u64);
        for dot in &self.dots {
            dot.encode(&mut e, version);
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
        if !(MIN_CHECKPOINT_VERSION..=CHECKPOINT_VERSION).contains(&version) {
            return Err(d.bad(format!("checkpoint version {MIN_CHECKPOINT_VERSION} to {CHECKPOINT_VERSION}"), version));
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
            let height = tree_height(&mut d)?;
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
            let height = tree_height(&mut d)?;
            let generation = d.u64()?;
            let len = d.u8()? as usize;
            let raw = d.bytes(len)?;
            let name =
                String::from_utf8(raw.to_vec()).map_err(|_| d.bad("a UTF-8 snapshot name", format!("{raw:?}")))?;
            snapshots.push(SnapshotRecord { id, name, size_bytes, root_vbn, height, generation });
        }
        let n = d.u64()?;
        let mut dots = Vec::new();
        for _ in 0..n {
            dots.push(DotRecord::decode(&mut d, version)?);
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
        Ok(Self { generation, next_vbn, next_volume_id, volumes, snapshots, dots, dir_pages, segment_live_blocks })
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
            dots: vec![DotRecord {
                id: 9,
                name: "admin/db".into(),
                current: "master".into(),
                branches: vec![("master".into(), Some([1; 16]), vec![("__default__".into(), 1)])],
                commits: vec![(
                    [1; 16],
                    0,
                    "master".into(),
                    CommitMeta {
                        parents: vec![],
                        time_unix_secs: 5,
                        author: "a".into(),
                        message: "m".into(),
                        metadata: vec![("k".into(), "v".into())],
                    },
                    vec![("__default__".into(), 2)],
                )],
                properties: vec![("qos.__default__".into(), "read_iops=100".into())],
            }],
            dir_pages: vec![PageLoc { pba: 17, crc: 0xabc }],
            segment_live_blocks: vec![0, 3, 5],
        };
        let buf = c.encode();
        assert_eq!(Checkpoint::decode(&buf, 0).expect("decode"), c);
        assert!(Checkpoint::decode(&buf[..buf.len() - 2], 0).is_err());
    }

    #[test]
    fn a_version_1_payload_decodes_without_properties() {
        let mut c = Checkpoint {
            generation: 1,
            next_vbn: 2,
            next_volume_id: 3,
            volumes: vec![],
            snapshots: vec![],
            dots: vec![DotRecord {
                id: 1,
                name: "a/b".into(),
                current: "master".into(),
                branches: vec![("master".into(), None, vec![("__default__".into(), 2)])],
                commits: vec![],
                properties: vec![("k".into(), "v".into())],
            }],
            dir_pages: vec![],
            segment_live_blocks: vec![1],
        };
        let old = c.encode_as(1);
        c.dots[0].properties.clear();
        assert_eq!(Checkpoint::decode(&old, 0).expect("decode v1"), c);
        let mut newer = c.encode();
        newer[4..8].copy_from_slice(&(CHECKPOINT_VERSION + 1).to_le_bytes());
        assert!(Checkpoint::decode(&newer, 0).is_err(), "a newer payload version is refused");
    }
}
