//! Volume operations as logged in batch records: replaying them over the last checkpoint rebuilds the index.

use super::{Dec, Enc};
use crate::Result;

/// Longest volume name, in bytes.
pub const MAX_VOLUME_NAME_BYTES: usize = 200;

/// One logged operation. Block numbers are in [`super::BLOCK_SIZE`] units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Block `block` of `volume` now holds the next data block of the batch, named `vbn`, with checksum `crc`.
    Write { volume: u64, block: u64, vbn: u64, crc: u32 },
    /// Blocks `[block, block + count)` of `volume` read as zeroes (explicitly written zeroes).
    Zero { volume: u64, block: u64, count: u64 },
    /// Blocks `[block, block + count)` of `volume` are discarded (read as zeroes).
    Trim { volume: u64, block: u64, count: u64 },
    /// A new, empty volume.
    CreateVolume { volume: u64, size_bytes: u64, name: String },
    /// The volume's size changes; on shrink, mappings past the end are dropped.
    ResizeVolume { volume: u64, size_bytes: u64 },
    /// The volume and its mappings are gone.
    DeleteVolume { volume: u64 },
    /// Read-only snapshots of several volumes at one point of the log (atomic across them): each `(volume,
    /// snapshot id, snapshot name)`. The pool's birth generation moves on after it.
    Snapshot { entries: Vec<(u64, u64, String)> },
    /// A new writable volume sharing every block of a snapshot.
    CloneSnapshot { snapshot: u64, volume: u64, name: String },
    /// The snapshot and its references are gone.
    DeleteSnapshot { snapshot: u64 },
}

/// Most volumes one snapshot op covers (so the op fits in one batch header).
pub const MAX_SNAPSHOT_VOLUMES: usize = 16;

const TAG_WRITE: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_TRIM: u8 = 3;
const TAG_CREATE: u8 = 4;
const TAG_RESIZE: u8 = 5;
const TAG_DELETE: u8 = 6;
const TAG_SNAPSHOT: u8 = 7;
const TAG_CLONE: u8 = 8;
const TAG_DELETE_SNAPSHOT: u8 = 9;

impl Op {
    /// Encoded size in bytes.
    pub(crate) fn encoded_len(&self) -> usize {
        match self {
            Op::Write { .. } => 1 + 8 + 8 + 8 + 4,
            Op::Zero { .. } | Op::Trim { .. } => 1 + 8 + 8 + 8,
            Op::CreateVolume { name, .. } => 1 + 8 + 8 + 1 + name.len(),
            Op::ResizeVolume { .. } => 1 + 8 + 8,
            Op::DeleteVolume { .. } => 1 + 8,
            Op::Snapshot { entries } => 1 + 1 + entries.iter().map(|(_, _, n)| 8 + 8 + 1 + n.len()).sum::<usize>(),
            Op::CloneSnapshot { name, .. } => 1 + 8 + 8 + 1 + name.len(),
            Op::DeleteSnapshot { .. } => 1 + 8,
        }
    }

    pub(crate) fn encode(&self, e: &mut Enc) {
        match self {
            Op::Write { volume, block, vbn, crc } => {
                e.u8(TAG_WRITE);
                e.u64(*volume);
                e.u64(*block);
                e.u64(*vbn);
                e.u32(*crc);
            }
            Op::Zero { volume, block, count } | Op::Trim { volume, block, count } => {
                e.u8(if matches!(self, Op::Zero { .. }) { TAG_ZERO } else { TAG_TRIM });
                e.u64(*volume);
                e.u64(*block);
                e.u64(*count);
            }
            Op::CreateVolume { volume, size_bytes, name } => {
                e.u8(TAG_CREATE);
                e.u64(*volume);
                e.u64(*size_bytes);
                e.u8(name.len() as u8);
                e.bytes(name.as_bytes());
            }
            Op::ResizeVolume { volume, size_bytes } => {
                e.u8(TAG_RESIZE);
                e.u64(*volume);
                e.u64(*size_bytes);
            }
            Op::DeleteVolume { volume } => {
                e.u8(TAG_DELETE);
                e.u64(*volume);
            }
            Op::Snapshot { entries } => {
                e.u8(TAG_SNAPSHOT);
                e.u8(entries.len() as u8);
                for (volume, snapshot, name) in entries {
                    e.u64(*volume);
                    e.u64(*snapshot);
                    e.u8(name.len() as u8);
                    e.bytes(name.as_bytes());
                }
            }
            Op::CloneSnapshot { snapshot, volume, name } => {
                e.u8(TAG_CLONE);
                e.u64(*snapshot);
                e.u64(*volume);
                e.u8(name.len() as u8);
                e.bytes(name.as_bytes());
            }
            Op::DeleteSnapshot { snapshot } => {
                e.u8(TAG_DELETE_SNAPSHOT);
                e.u64(*snapshot);
            }
        }
    }

    /// Decode every op of a batch body.
    pub(crate) fn decode_all(body: &[u8], offset_bytes: u64) -> Result<Vec<Op>> {
        let mut d = Dec::new(body, "batch record body", offset_bytes);
        let mut ops = Vec::new();
        while d.remaining() > 0 {
            let tag = d.u8()?;
            let op = match tag {
                TAG_WRITE => Op::Write { volume: d.u64()?, block: d.u64()?, vbn: d.u64()?, crc: d.u32()? },
                TAG_ZERO => Op::Zero { volume: d.u64()?, block: d.u64()?, count: d.u64()? },
                TAG_TRIM => Op::Trim { volume: d.u64()?, block: d.u64()?, count: d.u64()? },
                TAG_CREATE => {
                    let volume = d.u64()?;
                    let size_bytes = d.u64()?;
                    let name = name(&mut d)?;
                    Op::CreateVolume { volume, size_bytes, name }
                }
                TAG_SNAPSHOT => {
                    let n = d.u8()? as usize;
                    let mut entries = Vec::with_capacity(n);
                    for _ in 0..n {
                        let volume = d.u64()?;
                        let snapshot = d.u64()?;
                        entries.push((volume, snapshot, name(&mut d)?));
                    }
                    Op::Snapshot { entries }
                }
                TAG_CLONE => {
                    let snapshot = d.u64()?;
                    let volume = d.u64()?;
                    Op::CloneSnapshot { snapshot, volume, name: name(&mut d)? }
                }
                TAG_DELETE_SNAPSHOT => Op::DeleteSnapshot { snapshot: d.u64()? },
                TAG_RESIZE => Op::ResizeVolume { volume: d.u64()?, size_bytes: d.u64()? },
                TAG_DELETE => Op::DeleteVolume { volume: d.u64()? },
                other => return Err(d.bad("an op tag 1..=9", other)),
            };
            ops.push(op);
        }
        Ok(ops)
    }
}

/// A length-prefixed UTF-8 name.
fn name(d: &mut Dec<'_>) -> Result<String> {
    let n = d.u8()? as usize;
    let raw = d.bytes(n)?;
    String::from_utf8(raw.to_vec()).map_err(|_| d.bad("a UTF-8 name", format!("{raw:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_roundtrip() {
        let ops = vec![
            Op::Write { volume: 1, block: 2, vbn: 3, crc: 4 },
            Op::Zero { volume: 1, block: 5, count: 6 },
            Op::Trim { volume: 1, block: 7, count: 8 },
            Op::CreateVolume { volume: 9, size_bytes: 1 << 30, name: "vol-a".into() },
            Op::ResizeVolume { volume: 9, size_bytes: 1 << 31 },
            Op::DeleteVolume { volume: 9 },
            Op::Snapshot { entries: vec![(1, 10, "a@1".into()), (2, 11, "b@1".into())] },
            Op::CloneSnapshot { snapshot: 10, volume: 12, name: "c".into() },
            Op::DeleteSnapshot { snapshot: 10 },
        ];
        let mut e = Enc::default();
        for op in &ops {
            let before = e.len();
            op.encode(&mut e);
            assert_eq!(e.len() - before, op.encoded_len());
        }
        assert_eq!(Op::decode_all(&e.buf, 0).expect("decode"), ops);
        assert!(Op::decode_all(&e.buf[..e.len() - 1], 0).is_err(), "truncated body is corruption");
        assert!(Op::decode_all(&[99], 0).is_err(), "unknown tag is corruption");
    }
}
