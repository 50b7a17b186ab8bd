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
    /// A change to a dot (see [`DotOp`]); one op, so it is atomic under crashes, whatever volumes it touches.
    Dot { dot: u64, change: DotOp },
}

/// A 128-bit commit id, globally unique (random, or given by a received stream).
pub type RawCommitId = [u8; 16];

/// Commit metadata as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitMeta {
    /// Parent commits, first parent first.
    pub parents: Vec<RawCommitId>,
    /// Seconds since the Unix epoch.
    pub time_unix_secs: u64,
    /// Who committed.
    pub author: String,
    /// The commit message.
    pub message: String,
    /// Key/value metadata.
    pub metadata: Vec<(String, String)>,
}

/// Changes to a dot. Ids of new volumes and snapshots are chosen by the live call and applied as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DotOp {
    /// A new dot on branch `master` with empty subdots `(name, volume id, size)`.
    Create { name: String, subdots: Vec<(String, u64, u64)> },
    /// A new dot whose `master` heads are clones of commit `commit` of dot `from_dot`: `(subdot, new volume id)`.
    Clone { name: String, from_dot: u64, commit: RawCommitId, volumes: Vec<(String, u64)> },
    /// A received commit: staging volumes `(subdot, volume id, new snapshot id)` become the commit's snapshots
    /// (creating the dot `name` if it does not exist); branch `branch` is created, or fast-forwarded when its head is
    /// the commit's first parent, with heads `(subdot, new volume id)` cloned from it (empty: the branch is left
    /// alone).
    Receive {
        name: String,
        branch: String,
        commit: RawCommitId,
        meta: CommitMeta,
        staged: Vec<(String, u64, u64)>,
        heads: Vec<(String, u64)>,
    },
    /// A new empty subdot on the current branch.
    AddSubdot { subdot: String, volume: u64, size_bytes: u64 },
    /// Snapshot every head of `branch` as the new commit `commit`: `(subdot, snapshot id)`.
    Commit { commit: RawCommitId, branch: String, meta: CommitMeta, snapshots: Vec<(String, u64)> },
    /// A new branch whose heads are clones of `from`'s snapshots: `(subdot, new volume id)`.
    Branch { branch: String, from: RawCommitId, volumes: Vec<(String, u64)> },
    /// The dot's current branch changes.
    Checkout { branch: String },
    /// `branch`'s heads are replaced by clones of `commit`'s snapshots (uncommitted writes are dropped).
    Reset { branch: String, commit: RawCommitId, volumes: Vec<(String, u64)> },
    /// The branch and its head volumes are gone.
    DeleteBranch { branch: String },
    /// The commit and its snapshots are gone.
    DeleteCommit { commit: RawCommitId },
    /// The dot, its branches, heads, commits and snapshots are gone.
    Delete,
    /// A property of the dot is set (`Some`) or removed (`None`): opaque key/value pairs for the dot's owner (the
    /// daemon keeps quality-of-service limits there). Format version 4.
    SetProperty { key: String, value: Option<String> },
    /// A subdot's head on the current branch is gone (other branches and commits keep theirs). Format version 4.
    RemoveSubdot { subdot: String },
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
const TAG_DOT: u8 = 10;

const DOT_CREATE: u8 = 1;
const DOT_ADD_SUBDOT: u8 = 2;
const DOT_COMMIT: u8 = 3;
const DOT_BRANCH: u8 = 4;
const DOT_CHECKOUT: u8 = 5;
const DOT_RESET: u8 = 6;
const DOT_DELETE_BRANCH: u8 = 7;
const DOT_DELETE_COMMIT: u8 = 8;
const DOT_DELETE: u8 = 9;
const DOT_CLONE: u8 = 10;
const DOT_RECEIVE: u8 = 11;
const DOT_SET_PROPERTY: u8 = 12;
const DOT_REMOVE_SUBDOT: u8 = 13;

impl Op {
    /// Whether the op gives space back rather than taking more (deletes, trims, resizes, resets): such an op may
    /// still be logged while the checkpoint reserve is short [I14].
    pub(crate) fn frees_space(&self) -> bool {
        match self {
            Op::Zero { .. } | Op::Trim { .. } | Op::ResizeVolume { .. } | Op::DeleteVolume { .. } => true,
            Op::DeleteSnapshot { .. } => true,
            Op::Dot { change, .. } => matches!(
                change,
                DotOp::Reset { .. }
                    | DotOp::DeleteBranch { .. }
                    | DotOp::DeleteCommit { .. }
                    | DotOp::Delete
                    | DotOp::RemoveSubdot { .. }
            ),
            Op::Write { .. } | Op::CreateVolume { .. } | Op::Snapshot { .. } | Op::CloneSnapshot { .. } => false,
        }
    }

    /// Encoded size in bytes.
    pub(crate) fn encoded_len(&self) -> usize {
        if let Op::Dot { .. } = self {
            let mut e = Enc::default();
            self.encode(&mut e);
            return e.len();
        }
        match self {
            Op::Write { .. } => 1 + 8 + 8 + 8 + 4,
            Op::Zero { .. } | Op::Trim { .. } => 1 + 8 + 8 + 8,
            Op::CreateVolume { name, .. } => 1 + 8 + 8 + 1 + name.len(),
            Op::ResizeVolume { .. } => 1 + 8 + 8,
            Op::DeleteVolume { .. } => 1 + 8,
            Op::Snapshot { entries } => 1 + 1 + entries.iter().map(|(_, _, n)| 8 + 8 + 1 + n.len()).sum::<usize>(),
            Op::CloneSnapshot { name, .. } => 1 + 8 + 8 + 1 + name.len(),
            Op::DeleteSnapshot { .. } => 1 + 8,
            Op::Dot { .. } => unreachable!("measured above"),
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
            Op::Dot { dot, change } => {
                e.u8(TAG_DOT);
                e.u64(*dot);
                change.encode(e);
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
                TAG_DOT => Op::Dot { dot: d.u64()?, change: DotOp::decode(&mut d)? },
                TAG_RESIZE => Op::ResizeVolume { volume: d.u64()?, size_bytes: d.u64()? },
                TAG_DELETE => Op::DeleteVolume { volume: d.u64()? },
                other => return Err(d.bad("an op tag 1..=10", other)),
            };
            ops.push(op);
        }
        Ok(ops)
    }
}

fn put_name(e: &mut Enc, s: &str) {
    e.u8(s.len() as u8);
    e.bytes(s.as_bytes());
}

fn put_text(e: &mut Enc, s: &str) {
    e.u16(s.len() as u16);
    e.bytes(s.as_bytes());
}

fn text(d: &mut Dec<'_>) -> Result<String> {
    let n = d.u16()? as usize;
    let raw = d.bytes(n)?;
    String::from_utf8(raw.to_vec()).map_err(|_| d.bad("UTF-8 text", format!("{} bytes", raw.len())))
}

fn commit_id(d: &mut Dec<'_>) -> Result<RawCommitId> {
    let mut id = [0u8; 16];
    id.copy_from_slice(d.bytes(16)?);
    Ok(id)
}

fn put_pairs(e: &mut Enc, pairs: &[(String, u64)]) {
    e.u8(pairs.len() as u8);
    for (n, id) in pairs {
        put_name(e, n);
        e.u64(*id);
    }
}

fn pairs(d: &mut Dec<'_>) -> Result<Vec<(String, u64)>> {
    let n = d.u8()? as usize;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let name = name(d)?;
        v.push((name, d.u64()?));
    }
    Ok(v)
}

pub(crate) fn put_meta(e: &mut Enc, meta: &CommitMeta) {
    e.u8(meta.parents.len() as u8);
    for p in &meta.parents {
        e.bytes(p);
    }
    e.u64(meta.time_unix_secs);
    put_text(e, &meta.author);
    put_text(e, &meta.message);
    e.u8(meta.metadata.len() as u8);
    for (k, v) in &meta.metadata {
        put_name(e, k);
        put_text(e, v);
    }
}

pub(crate) fn meta(d: &mut Dec<'_>) -> Result<CommitMeta> {
    let n = d.u8()? as usize;
    let mut parents = Vec::with_capacity(n);
    for _ in 0..n {
        parents.push(commit_id(d)?);
    }
    let time_unix_secs = d.u64()?;
    let author = text(d)?;
    let message = text(d)?;
    let n = d.u8()? as usize;
    let mut metadata = Vec::with_capacity(n);
    for _ in 0..n {
        let k = name(d)?;
        metadata.push((k, text(d)?));
    }
    Ok(CommitMeta { parents, time_unix_secs, author, message, metadata })
}

impl DotOp {
    fn encode(&self, e: &mut Enc) {
        match self {
            DotOp::Create { name, subdots } => {
                e.u8(DOT_CREATE);
                put_name(e, name);
                e.u8(subdots.len() as u8);
                for (n, vol, size) in subdots {
                    put_name(e, n);
                    e.u64(*vol);
                    e.u64(*size);
                }
            }
            DotOp::AddSubdot { subdot, volume, size_bytes } => {
                e.u8(DOT_ADD_SUBDOT);
                put_name(e, subdot);
                e.u64(*volume);
                e.u64(*size_bytes);
            }
            DotOp::Commit { commit, branch, meta, snapshots } => {
                e.u8(DOT_COMMIT);
                e.bytes(commit);
                put_name(e, branch);
                put_meta(e, meta);
                put_pairs(e, snapshots);
            }
            DotOp::Branch { branch, from, volumes } | DotOp::Reset { branch, commit: from, volumes } => {
                e.u8(if matches!(self, DotOp::Branch { .. }) { DOT_BRANCH } else { DOT_RESET });
                put_name(e, branch);
                e.bytes(from);
                put_pairs(e, volumes);
            }
            DotOp::Checkout { branch } => {
                e.u8(DOT_CHECKOUT);
                put_name(e, branch);
            }
            DotOp::DeleteBranch { branch } => {
                e.u8(DOT_DELETE_BRANCH);
                put_name(e, branch);
            }
            DotOp::DeleteCommit { commit } => {
                e.u8(DOT_DELETE_COMMIT);
                e.bytes(commit);
            }
            DotOp::Delete => e.u8(DOT_DELETE),
            DotOp::Receive { name, branch, commit, meta, staged, heads } => {
                e.u8(DOT_RECEIVE);
                put_name(e, name);
                put_name(e, branch);
                e.bytes(commit);
                put_meta(e, meta);
                e.u8(staged.len() as u8);
                for (s, v, sid) in staged {
                    put_name(e, s);
                    e.u64(*v);
                    e.u64(*sid);
                }
                put_pairs(e, heads);
            }
            DotOp::RemoveSubdot { subdot } => {
                e.u8(DOT_REMOVE_SUBDOT);
                put_name(e, subdot);
            }
            DotOp::SetProperty { key, value } => {
                e.u8(DOT_SET_PROPERTY);
                put_name(e, key);
                match value {
                    Some(v) => {
                        e.u8(1);
                        put_text(e, v);
                    }
                    None => e.u8(0),
                }
            }
            DotOp::Clone { name, from_dot, commit, volumes } => {
                e.u8(DOT_CLONE);
                put_name(e, name);
                e.u64(*from_dot);
                e.bytes(commit);
                put_pairs(e, volumes);
            }
        }
    }

    fn decode(d: &mut Dec<'_>) -> Result<Self> {
        Ok(match d.u8()? {
            DOT_CREATE => {
                let name = name(d)?;
                let n = d.u8()? as usize;
                let mut subdots = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = self::name(d)?;
                    subdots.push((s, d.u64()?, d.u64()?));
                }
                DotOp::Create { name, subdots }
            }
            DOT_ADD_SUBDOT => DotOp::AddSubdot { subdot: name(d)?, volume: d.u64()?, size_bytes: d.u64()? },
            DOT_COMMIT => {
                let commit = commit_id(d)?;
                let branch = name(d)?;
                let meta = meta(d)?;
                DotOp::Commit { commit, branch, meta, snapshots: pairs(d)? }
            }
            DOT_RECEIVE => {
                let name = name(d)?;
                let branch = self::name(d)?;
                let commit = commit_id(d)?;
                let meta = meta(d)?;
                let n = d.u8()? as usize;
                let mut staged = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = self::name(d)?;
                    staged.push((s, d.u64()?, d.u64()?));
                }
                DotOp::Receive { name, branch, commit, meta, staged, heads: pairs(d)? }
            }
            tag @ (DOT_BRANCH | DOT_RESET) => {
                let branch = name(d)?;
                let from = commit_id(d)?;
                let volumes = pairs(d)?;
                if tag == DOT_BRANCH {
                    DotOp::Branch { branch, from, volumes }
                } else {
                    DotOp::Reset { branch, commit: from, volumes }
                }
            }
            DOT_CHECKOUT => DotOp::Checkout { branch: name(d)? },
            DOT_DELETE_BRANCH => DotOp::DeleteBranch { branch: name(d)? },
            DOT_DELETE_COMMIT => DotOp::DeleteCommit { commit: commit_id(d)? },
            DOT_DELETE => DotOp::Delete,
            DOT_CLONE => {
                let name = name(d)?;
                let from_dot = d.u64()?;
                let commit = commit_id(d)?;
                DotOp::Clone { name, from_dot, commit, volumes: pairs(d)? }
            }
            DOT_SET_PROPERTY => {
                let key = name(d)?;
                let value = match d.u8()? {
                    0 => None,
                    1 => Some(text(d)?),
                    other => return Err(d.bad("a property presence flag 0 or 1", other)),
                };
                DotOp::SetProperty { key, value }
            }
            DOT_REMOVE_SUBDOT => DotOp::RemoveSubdot { subdot: name(d)? },
            other => return Err(d.bad("a dot op tag 1..=13", other)),
        })
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
            Op::Dot {
                dot: 3,
                change: DotOp::Create { name: "admin/db".into(), subdots: vec![("__default__".into(), 4, 1 << 20)] },
            },
            Op::Dot { dot: 3, change: DotOp::AddSubdot { subdot: "logs".into(), volume: 5, size_bytes: 4096 } },
            Op::Dot {
                dot: 3,
                change: DotOp::Commit {
                    commit: [7; 16],
                    branch: "master".into(),
                    meta: CommitMeta {
                        parents: vec![[6; 16]],
                        time_unix_secs: 1_700_000_000,
                        author: "ann".into(),
                        message: "first".into(),
                        metadata: vec![("k".into(), "v".into())],
                    },
                    snapshots: vec![("__default__".into(), 9)],
                },
            },
            Op::Dot {
                dot: 3,
                change: DotOp::Branch { branch: "b".into(), from: [7; 16], volumes: vec![("x".into(), 11)] },
            },
            Op::Dot { dot: 3, change: DotOp::Reset { branch: "b".into(), commit: [7; 16], volumes: vec![] } },
            Op::Dot { dot: 3, change: DotOp::Checkout { branch: "b".into() } },
            Op::Dot { dot: 3, change: DotOp::DeleteBranch { branch: "b".into() } },
            Op::Dot { dot: 3, change: DotOp::DeleteCommit { commit: [7; 16] } },
            Op::Dot { dot: 3, change: DotOp::Delete },
            Op::Dot { dot: 3, change: DotOp::SetProperty { key: "qos.s".into(), value: Some("read_iops=5".into()) } },
            Op::Dot { dot: 3, change: DotOp::SetProperty { key: "qos.s".into(), value: None } },
            Op::Dot { dot: 3, change: DotOp::RemoveSubdot { subdot: "logs".into() } },
            Op::Dot {
                dot: 5,
                change: DotOp::Receive {
                    name: "a/c".into(),
                    branch: "master".into(),
                    commit: [8; 16],
                    meta: CommitMeta {
                        parents: vec![],
                        time_unix_secs: 1,
                        author: String::new(),
                        message: "m".into(),
                        metadata: vec![],
                    },
                    staged: vec![("s".into(), 20, 21)],
                    heads: vec![("s".into(), 22)],
                },
            },
            Op::Dot {
                dot: 4,
                change: DotOp::Clone {
                    name: "a/b".into(),
                    from_dot: 3,
                    commit: [7; 16],
                    volumes: vec![("s".into(), 12)],
                },
            },
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
