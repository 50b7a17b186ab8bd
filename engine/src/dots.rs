//! Dots: named, versioned groups of volumes (subdots) with commits and branches, the way Dotmesh users know them.
//!
//! A dot `ns/name` has one or more subdots (`__default__` when unnamed), a DAG of commits, named branches (`master`
//! first) and a current branch. Each branch has a writable head volume per subdot; a commit snapshots every head of a
//! branch at one point of the log; a branch starts as clones of a commit's snapshots. Heads and snapshots are
//! ordinary volumes and snapshots of the pool with internal names that start with `#` (which no user name may), so
//! reads, writes, diffs, space accounting and integrity checks need nothing special.
//!
//! Every change to a dot is one logged op whose application also does the volume work (snapshot, clone, free), so it
//! is atomic under crashes by construction [I10].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use parking_lot::RwLock;

use crate::format::checkpoint::DotRecord;
use crate::format::ops::{CommitMeta, DotOp, Op, RawCommitId, MAX_SNAPSHOT_VOLUMES};
use crate::format::record::BODY_CAPACITY_BYTES;
use crate::index::Extent;
use crate::io::Device;
use crate::pool::{Pool, SnapshotState, State, VolumeState};
use crate::volume::{Target, Volume};
use crate::{Error, Result};

/// Name of the subdot of a dot created without subdot names.
pub const DEFAULT_SUBDOT: &str = "__default__";
/// Name of a dot's first branch.
pub const MASTER_BRANCH: &str = "master";
/// Longest subdot or branch name, in bytes.
pub const MAX_DOT_PART_BYTES: usize = 64;
/// Longest commit message, in bytes.
pub const MAX_COMMIT_MESSAGE_BYTES: usize = 1024;
/// Longest author, in bytes.
pub const MAX_COMMIT_AUTHOR_BYTES: usize = 128;
/// Most metadata pairs on one commit.
pub const MAX_COMMIT_METADATA_PAIRS: usize = 16;
/// Most metadata bytes (keys and values) on one commit.
pub const MAX_COMMIT_METADATA_BYTES: usize = 1024;
/// Most properties on one dot.
pub const MAX_DOT_PROPERTIES: usize = 64;
/// Longest property key, in bytes.
pub const MAX_PROPERTY_KEY_BYTES: usize = 128;
/// Longest property value, in bytes.
pub const MAX_PROPERTY_VALUE_BYTES: usize = 1024;

/// A commit id: 128 bits, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(pub [u8; 16]);

impl CommitId {
    /// A fresh random id.
    pub fn random() -> Self {
        CommitId(rand::random())
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for CommitId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("commit id {s:?} is not 32 hex digits"));
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(CommitId(id))
    }
}

/// What a new commit says about itself.
#[derive(Debug, Clone, Default)]
pub struct CommitRequest {
    /// The commit message.
    pub message: String,
    /// Who commits.
    pub author: String,
    /// Seconds since the Unix epoch; the system clock when `None`.
    pub time_unix_secs: Option<u64>,
    /// Key/value metadata.
    pub metadata: Vec<(String, String)>,
    /// The id to use (a received commit keeps its id); random when `None`.
    pub id: Option<CommitId>,
}

/// A commit as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// Its id.
    pub id: CommitId,
    /// Parents, first parent first.
    pub parents: Vec<CommitId>,
    /// The branch it was made on.
    pub branch: String,
    /// Seconds since the Unix epoch.
    pub time_unix_secs: u64,
    /// Who committed.
    pub author: String,
    /// The message.
    pub message: String,
    /// Key/value metadata.
    pub metadata: Vec<(String, String)>,
    /// Subdots it holds, with their sizes.
    pub subdots: Vec<(String, u64)>,
}

/// A dot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DotInfo {
    /// `ns/name`.
    pub name: String,
    /// The current branch.
    pub current_branch: String,
    /// Every branch, with its head commit.
    pub branches: Vec<(String, Option<CommitId>)>,
    /// Subdots of the current branch, with their sizes.
    pub subdots: Vec<(String, u64)>,
    /// Commits in the dot.
    pub commits: usize,
    /// The dot's properties (see [`Pool::set_dot_property`]).
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub(crate) struct BranchState {
    pub(crate) head: Option<RawCommitId>,
    /// subdot -> head volume id
    pub(crate) volumes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct CommitState {
    pub(crate) seq: u64,
    pub(crate) branch: String,
    pub(crate) meta: CommitMeta,
    /// subdot -> snapshot id
    pub(crate) snapshots: BTreeMap<String, u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct DotState {
    pub(crate) name: String,
    pub(crate) current: String,
    pub(crate) branches: BTreeMap<String, BranchState>,
    pub(crate) commits: HashMap<RawCommitId, CommitState>,
    pub(crate) next_seq: u64,
    pub(crate) properties: BTreeMap<String, String>,
}

impl DotState {
    pub(crate) fn to_record(&self, id: u64) -> DotRecord {
        let mut commits: Vec<_> = self
            .commits
            .iter()
            .map(|(cid, c)| {
                (
                    *cid,
                    c.seq,
                    c.branch.clone(),
                    c.meta.clone(),
                    c.snapshots.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                )
            })
            .collect();
        commits.sort_by_key(|c| c.1);
        DotRecord {
            id,
            name: self.name.clone(),
            current: self.current.clone(),
            branches: self
                .branches
                .iter()
                .map(|(n, b)| (n.clone(), b.head, b.volumes.iter().map(|(k, v)| (k.clone(), *v)).collect()))
                .collect(),
            commits,
            properties: self.properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    pub(crate) fn from_record(r: DotRecord) -> Self {
        let next_seq = r.commits.iter().map(|c| c.1 + 1).max().unwrap_or(0);
        DotState {
            name: r.name,
            current: r.current,
            branches: r
                .branches
                .into_iter()
                .map(|(n, head, vols)| (n, BranchState { head, volumes: vols.into_iter().collect() }))
                .collect(),
            commits: r
                .commits
                .into_iter()
                .map(|(cid, seq, branch, meta, snaps)| {
                    (cid, CommitState { seq, branch, meta, snapshots: snaps.into_iter().collect() })
                })
                .collect(),
            next_seq,
            properties: r.properties.into_iter().collect(),
        }
    }
}

/// Check a dot name: `namespace/name`, each part 1 to 64 bytes of letters, digits and `-_.`, not `.` or `..`.
pub fn validate_dot_name(name: &str) -> Result<()> {
    let bad =
        |why: &str| Error::InvalidArgument(format!("dot name {name:?}: {why}; use namespace/name, e.g. admin/db"));
    let mut parts = name.split('/');
    let (Some(ns), Some(n), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("needs exactly one '/'"));
    };
    for part in [ns, n] {
        validate_part(part).map_err(|_| bad("each part is 1 to 64 of [A-Za-z0-9-_.], not . or .."))?;
    }
    Ok(())
}

fn validate_part(part: &str) -> Result<()> {
    let ok = !part.is_empty()
        && part.len() <= MAX_DOT_PART_BYTES
        && part != "."
        && part != ".."
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{part:?} must be 1 to {MAX_DOT_PART_BYTES} of [A-Za-z0-9-_.], not . or .."
        )))
    }
}

pub(crate) fn head_name(dot: u64, subdot: &str, branch: &str) -> String {
    format!("#{dot}/{subdot}/{branch}")
}

fn snapshot_name(dot: u64, subdot: &str, commit: &RawCommitId) -> String {
    format!("#{dot}/{subdot}@{}", CommitId(*commit))
}

impl State {
    /// The volume id and display name (`dot.subdot`) of a subdot's head on the dot's current branch.
    pub(crate) fn head_volume(&self, dot: &str, subdot: Option<&str>) -> Result<(u64, String)> {
        let d = self.dot(self.dot_id(dot)?)?;
        let subdot = subdot.unwrap_or(DEFAULT_SUBDOT);
        let vid = *d.branches[&d.current]
            .volumes
            .get(subdot)
            .ok_or_else(|| Error::NoSuchVolume(format!("{dot}.{subdot} (branch {})", d.current)))?;
        Ok((vid, format!("{dot}.{subdot}")))
    }

    pub(crate) fn dot_id(&self, name: &str) -> Result<u64> {
        self.dot_names.get(name).copied().ok_or_else(|| Error::NoSuchDot(name.to_string()))
    }

    pub(crate) fn dot(&self, id: u64) -> Result<&DotState> {
        self.dots.get(&id).ok_or_else(|| Error::corrupt("log", 0, "an existing dot", id))
    }

    fn dot_mut(&mut self, id: u64) -> Result<&mut DotState> {
        self.dots.get_mut(&id).ok_or_else(|| Error::corrupt("log", 0, "an existing dot", id))
    }

    fn new_volume(&mut self, id: u64, name: String, size_bytes: u64, root: crate::index::Root) -> Result<()> {
        if self.volumes.contains_key(&id) || self.names.contains_key(&name) {
            return Err(Error::corrupt("log", 0, "a new volume", format!("{id} {name:?} exists")));
        }
        self.names.insert(name.clone(), id);
        self.volumes.insert(id, VolumeState { name, size_bytes, root });
        self.next_volume_id = self.next_volume_id.max(id + 1);
        Ok(())
    }

    fn drop_volume(&mut self, dev: &dyn Device, id: u64) -> Result<()> {
        let v = self.volumes.remove(&id).ok_or_else(|| Error::corrupt("log", 0, "a volume", id))?;
        self.names.remove(&v.name);
        self.index.free_tree(dev, v.root)
    }

    fn drop_snapshot(&mut self, dev: &dyn Device, id: u64) -> Result<()> {
        let s = self.snapshots.remove(&id).ok_or_else(|| Error::corrupt("log", 0, "a snapshot", id))?;
        self.names.remove(&s.name);
        self.index.free_tree(dev, s.root)
    }

    /// Remove a branch and free its head volumes.
    fn remove_branch(&mut self, dev: &dyn Device, dot: u64, branch: &str) -> Result<()> {
        let old = self
            .dot_mut(dot)?
            .branches
            .remove(branch)
            .ok_or_else(|| Error::corrupt("log", 0, "a branch of the dot", branch))?;
        for vid in old.volumes.values() {
            self.drop_volume(dev, *vid)?;
        }
        Ok(())
    }

    /// New head volumes for `branch`, cloned from the snapshots of `commit` of this dot.
    fn clone_heads(&mut self, dot: u64, branch: &str, commit: &RawCommitId, vols: &[(String, u64)]) -> Result<()> {
        let snaps = self
            .dot(dot)?
            .commits
            .get(commit)
            .map(|c| c.snapshots.clone())
            .ok_or_else(|| Error::corrupt("log", 0, "a commit of the dot", CommitId(*commit)))?;
        self.heads_from(dot, branch, Some(*commit), &snaps, vols)
    }

    /// Make `branch` of `dot` with heads sharing the roots of `snaps` (subdot -> snapshot id): O(1) each [I8].
    fn heads_from(
        &mut self,
        dot: u64,
        branch: &str,
        head: Option<RawCommitId>,
        snaps: &BTreeMap<String, u64>,
        vols: &[(String, u64)],
    ) -> Result<()> {
        let mut heads = BTreeMap::new();
        for (subdot, vol) in vols {
            let sid = *snaps.get(subdot).ok_or_else(|| Error::corrupt("log", 0, "a subdot of the commit", subdot))?;
            let sn = self.snapshots.get(&sid).ok_or_else(|| Error::corrupt("log", 0, "a snapshot", sid))?;
            let (root, size) = (sn.root, sn.size_bytes);
            self.index.share(root)?;
            self.new_volume(*vol, head_name(dot, subdot, branch), size, root)?;
            heads.insert(subdot.clone(), *vol);
        }
        self.dot_mut(dot)?.branches.insert(branch.to_string(), BranchState { head, volumes: heads });
        Ok(())
    }

    /// Apply a dot op: the same code runs live and in replay [I10].
    pub(crate) fn apply_dot(&mut self, dev: &dyn Device, dot: u64, change: &DotOp) -> Result<()> {
        match change {
            DotOp::Create { name, subdots } => {
                if self.dots.contains_key(&dot) || self.dot_names.contains_key(name) {
                    return Err(Error::corrupt("log", 0, "a new dot", name));
                }
                let mut heads = BTreeMap::new();
                for (subdot, vol, size) in subdots {
                    let root = crate::index::Root::empty_for(size.div_ceil(crate::format::BLOCK_SIZE));
                    self.new_volume(*vol, head_name(dot, subdot, MASTER_BRANCH), *size, root)?;
                    heads.insert(subdot.clone(), *vol);
                }
                let mut branches = BTreeMap::new();
                branches.insert(MASTER_BRANCH.to_string(), BranchState { head: None, volumes: heads });
                self.dots.insert(
                    dot,
                    DotState {
                        name: name.clone(),
                        current: MASTER_BRANCH.to_string(),
                        branches,
                        commits: HashMap::new(),
                        next_seq: 0,
                        properties: BTreeMap::new(),
                    },
                );
                self.dot_names.insert(name.clone(), dot);
                self.next_volume_id = self.next_volume_id.max(dot + 1);
            }
            DotOp::Clone { name, from_dot, commit, volumes } => {
                if self.dots.contains_key(&dot) || self.dot_names.contains_key(name) {
                    return Err(Error::corrupt("log", 0, "a new dot", name));
                }
                let snaps = self
                    .dot(*from_dot)?
                    .commits
                    .get(commit)
                    .map(|c| c.snapshots.clone())
                    .ok_or_else(|| Error::corrupt("log", 0, "a commit of the source dot", CommitId(*commit)))?;
                self.dots.insert(
                    dot,
                    DotState {
                        name: name.clone(),
                        current: MASTER_BRANCH.to_string(),
                        branches: BTreeMap::new(),
                        commits: HashMap::new(),
                        next_seq: 0,
                        properties: BTreeMap::new(),
                    },
                );
                self.dot_names.insert(name.clone(), dot);
                self.next_volume_id = self.next_volume_id.max(dot + 1);
                self.heads_from(dot, MASTER_BRANCH, None, &snaps, volumes)?;
            }
            DotOp::Receive { name, branch, commit, meta, staged, heads } => {
                if !self.dots.contains_key(&dot) {
                    if self.dot_names.contains_key(name) {
                        return Err(Error::corrupt("log", 0, "a new dot", name));
                    }
                    let d = DotState {
                        name: name.clone(),
                        current: branch.clone(),
                        branches: BTreeMap::new(),
                        commits: HashMap::new(),
                        next_seq: 0,
                        properties: BTreeMap::new(),
                    };
                    self.dots.insert(dot, d);
                    self.dot_names.insert(name.clone(), dot);
                    self.next_volume_id = self.next_volume_id.max(dot + 1);
                }
                if self.dot(dot)?.commits.contains_key(commit) {
                    return Err(Error::corrupt("log", 0, "a new commit id", CommitId(*commit)));
                }
                let gen = self.generation;
                let mut snaps = BTreeMap::new();
                for (subdot, vol, sid) in staged {
                    // the staging volume's reference on its tree passes to the snapshot: no refcount changes
                    let v =
                        self.volumes.remove(vol).ok_or_else(|| Error::corrupt("log", 0, "a staging volume", vol))?;
                    self.names.remove(&v.name);
                    let name = snapshot_name(dot, subdot, commit);
                    if self.snapshots.contains_key(sid) || self.names.contains_key(&name) {
                        return Err(Error::corrupt("log", 0, "a new snapshot", name));
                    }
                    self.names.insert(name.clone(), *sid);
                    let sn = SnapshotState { name, size_bytes: v.size_bytes, root: v.root, generation: gen };
                    self.snapshots.insert(*sid, sn);
                    self.next_volume_id = self.next_volume_id.max(sid + 1);
                    snaps.insert(subdot.clone(), *sid);
                }
                self.generation += 1;
                let d = self.dot_mut(dot)?;
                let seq = d.next_seq;
                d.next_seq += 1;
                let c = CommitState { seq, branch: branch.clone(), meta: meta.clone(), snapshots: snaps.clone() };
                d.commits.insert(*commit, c);
                if !heads.is_empty() {
                    if self.dot(dot)?.branches.contains_key(branch) {
                        self.remove_branch(dev, dot, branch)?;
                    }
                    self.heads_from(dot, branch, Some(*commit), &snaps, heads)?;
                }
            }
            DotOp::AddSubdot { subdot, volume, size_bytes } => {
                let branch = self.dot(dot)?.current.clone();
                let root = crate::index::Root::empty_for(size_bytes.div_ceil(crate::format::BLOCK_SIZE));
                self.new_volume(*volume, head_name(dot, subdot, &branch), *size_bytes, root)?;
                let d = self.dot_mut(dot)?;
                let b = d
                    .branches
                    .get_mut(&branch)
                    .ok_or_else(|| Error::corrupt("log", 0, "the current branch", &branch))?;
                b.volumes.insert(subdot.clone(), *volume);
            }
            DotOp::Commit { commit, branch, meta, snapshots } => {
                let gen = self.generation;
                let heads = self
                    .dot(dot)?
                    .branches
                    .get(branch)
                    .map(|b| b.volumes.clone())
                    .ok_or_else(|| Error::corrupt("log", 0, "a branch of the dot", branch))?;
                if self.dot(dot)?.commits.contains_key(commit) {
                    return Err(Error::corrupt("log", 0, "a new commit id", CommitId(*commit)));
                }
                let mut snaps = BTreeMap::new();
                for (subdot, sid) in snapshots {
                    let vid =
                        *heads.get(subdot).ok_or_else(|| Error::corrupt("log", 0, "a head of the branch", subdot))?;
                    let v = self.volumes.get(&vid).ok_or_else(|| Error::corrupt("log", 0, "a head volume", vid))?;
                    let (root, size_bytes) = (v.root, v.size_bytes);
                    let name = snapshot_name(dot, subdot, commit);
                    if self.snapshots.contains_key(sid) || self.names.contains_key(&name) {
                        return Err(Error::corrupt("log", 0, "a new snapshot", name));
                    }
                    self.index.share(root)?;
                    self.names.insert(name.clone(), *sid);
                    self.snapshots.insert(*sid, SnapshotState { name, size_bytes, root, generation: gen });
                    self.next_volume_id = self.next_volume_id.max(sid + 1);
                    snaps.insert(subdot.clone(), *sid);
                }
                self.generation += 1; // later writes are born after this commit [I7]
                let d = self.dot_mut(dot)?;
                let seq = d.next_seq;
                d.next_seq += 1;
                d.commits
                    .insert(*commit, CommitState { seq, branch: branch.clone(), meta: meta.clone(), snapshots: snaps });
                if let Some(b) = d.branches.get_mut(branch) {
                    b.head = Some(*commit);
                }
            }
            DotOp::Branch { branch, from, volumes } => {
                if self.dot(dot)?.branches.contains_key(branch) {
                    return Err(Error::corrupt("log", 0, "a new branch", branch));
                }
                self.clone_heads(dot, branch, from, volumes)?;
            }
            DotOp::Checkout { branch } => {
                let d = self.dot_mut(dot)?;
                if !d.branches.contains_key(branch) {
                    return Err(Error::corrupt("log", 0, "a branch of the dot", branch));
                }
                d.current = branch.clone();
            }
            DotOp::Reset { branch, commit, volumes } => {
                self.remove_branch(dev, dot, branch)?;
                self.clone_heads(dot, branch, commit, volumes)?;
            }
            DotOp::DeleteBranch { branch } => self.remove_branch(dev, dot, branch)?,
            DotOp::RemoveSubdot { subdot } => {
                let d = self.dot_mut(dot)?;
                let current = d.current.clone();
                let b = d
                    .branches
                    .get_mut(&current)
                    .ok_or_else(|| Error::corrupt("log", 0, "the current branch", &current))?;
                let vid =
                    b.volumes.remove(subdot).ok_or_else(|| Error::corrupt("log", 0, "a head of the branch", subdot))?;
                self.drop_volume(dev, vid)?;
            }
            DotOp::SetProperty { key, value } => {
                let d = self.dot_mut(dot)?;
                match value {
                    Some(v) => {
                        d.properties.insert(key.clone(), v.clone());
                    }
                    None => {
                        d.properties.remove(key);
                    }
                }
            }
            DotOp::DeleteCommit { commit } => {
                let c = self
                    .dot_mut(dot)?
                    .commits
                    .remove(commit)
                    .ok_or_else(|| Error::corrupt("log", 0, "a commit of the dot", CommitId(*commit)))?;
                for sid in c.snapshots.values() {
                    self.drop_snapshot(dev, *sid)?;
                }
            }
            DotOp::Delete => {
                let d = self.dots.remove(&dot).ok_or_else(|| Error::corrupt("log", 0, "an existing dot", dot))?;
                self.dot_names.remove(&d.name);
                for b in d.branches.values() {
                    for vid in b.volumes.values() {
                        self.drop_volume(dev, *vid)?;
                    }
                }
                for c in d.commits.values() {
                    for sid in c.snapshots.values() {
                        self.drop_snapshot(dev, *sid)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn commit_info(&self, d: &DotState, id: &RawCommitId) -> Option<CommitInfo> {
        let c = d.commits.get(id)?;
        Some(CommitInfo {
            id: CommitId(*id),
            parents: c.meta.parents.iter().map(|p| CommitId(*p)).collect(),
            branch: c.branch.clone(),
            time_unix_secs: c.meta.time_unix_secs,
            author: c.meta.author.clone(),
            message: c.meta.message.clone(),
            metadata: c.meta.metadata.clone(),
            subdots: c
                .snapshots
                .iter()
                .map(|(s, sid)| (s.clone(), self.snapshots.get(sid).map_or(0, |x| x.size_bytes)))
                .collect(),
        })
    }

    fn dot_info(&self, d: &DotState) -> DotInfo {
        let subdots = d
            .branches
            .get(&d.current)
            .map(|b| {
                b.volumes.iter().map(|(s, v)| (s.clone(), self.volumes.get(v).map_or(0, |x| x.size_bytes))).collect()
            })
            .unwrap_or_default();
        DotInfo {
            name: d.name.clone(),
            current_branch: d.current.clone(),
            branches: d.branches.iter().map(|(n, b)| (n.clone(), b.head.map(CommitId))).collect(),
            subdots,
            commits: d.commits.len(),
            properties: d.properties.clone(),
        }
    }

    /// Log and apply a dot op (after making room for it), refusing one too large for a log record.
    pub(crate) fn log_dot(&mut self, dev: &dyn Device, gate: &RwLock<()>, dot: u64, change: DotOp) -> Result<()> {
        let op = Op::Dot { dot, change };
        if op.encoded_len() > BODY_CAPACITY_BYTES {
            return Err(Error::Limit(format!(
                "this dot change takes {} bytes; at most {BODY_CAPACITY_BYTES} fit in one log record (shorten the \
                 message or metadata)",
                op.encoded_len()
            )));
        }
        self.log_meta(dev, gate, op)
    }

    pub(crate) fn commit_of(&self, dot: u64, id: CommitId) -> Result<&CommitState> {
        self.dot(dot)?.commits.get(&id.0).ok_or_else(|| Error::NoSuchCommit(id.to_string()))
    }
}

fn validate_commit(req: &CommitRequest) -> Result<()> {
    if req.message.len() > MAX_COMMIT_MESSAGE_BYTES {
        return Err(Error::InvalidArgument(format!("commit message over {MAX_COMMIT_MESSAGE_BYTES} bytes")));
    }
    if req.author.len() > MAX_COMMIT_AUTHOR_BYTES {
        return Err(Error::InvalidArgument(format!("author over {MAX_COMMIT_AUTHOR_BYTES} bytes")));
    }
    let meta_bytes: usize = req.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if req.metadata.len() > MAX_COMMIT_METADATA_PAIRS || meta_bytes > MAX_COMMIT_METADATA_BYTES {
        return Err(Error::InvalidArgument(format!(
            "commit metadata is limited to {MAX_COMMIT_METADATA_PAIRS} pairs and {MAX_COMMIT_METADATA_BYTES} bytes"
        )));
    }
    for (k, _) in &req.metadata {
        validate_part(k)?;
    }
    Ok(())
}

impl Pool {
    /// Create a dot with its subdots `(name, size in bytes)` on branch `master`; name an unnamed volume
    /// [`DEFAULT_SUBDOT`].
    pub fn create_dot(&self, name: &str, subdots: &[(&str, u64)]) -> Result<()> {
        validate_dot_name(name)?;
        if subdots.is_empty() || subdots.len() > MAX_SNAPSHOT_VOLUMES {
            return Err(Error::InvalidArgument(format!("a dot has 1 to {MAX_SNAPSHOT_VOLUMES} subdots")));
        }
        for (i, (s, size)) in subdots.iter().enumerate() {
            if *s != DEFAULT_SUBDOT {
                validate_part(s)?;
            }
            crate::pool::validate_volume_size(*size)?;
            if subdots[..i].iter().any(|(o, _)| o == s) {
                return Err(Error::InvalidArgument(format!("subdot {s:?} named twice")));
            }
        }
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        if st.dot_names.contains_key(name) {
            return Err(Error::DotExists(name.to_string()));
        }
        let dot = st.next_volume_id;
        let subdots =
            subdots.iter().enumerate().map(|(i, (s, size))| (s.to_string(), dot + 1 + i as u64, *size)).collect();
        st.log_dot(dev, &self.inner.reuse_gate, dot, DotOp::Create { name: name.to_string(), subdots })
    }

    /// Add an empty subdot to the dot's current branch.
    pub fn add_subdot(&self, dot: &str, subdot: &str, size_bytes: u64) -> Result<()> {
        validate_part(subdot)?;
        crate::pool::validate_volume_size(size_bytes)?;
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        let heads = &d.branches[&d.current].volumes;
        if heads.contains_key(subdot) {
            return Err(Error::VolumeExists(format!("{dot}.{subdot}")));
        }
        if heads.len() >= MAX_SNAPSHOT_VOLUMES {
            return Err(Error::Limit(format!("a dot has at most {MAX_SNAPSHOT_VOLUMES} subdots")));
        }
        let volume = st.next_volume_id;
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::AddSubdot { subdot: subdot.to_string(), volume, size_bytes })
    }

    /// Remove a subdot's head from the dot's current branch: its uncommitted data is gone (space comes back with
    /// cleaning); other branches and the commits keep their copies, and a subdot of the same name can be added again.
    /// The last subdot of a branch cannot be removed (delete the dot instead).
    pub fn remove_subdot(&self, dot: &str, subdot: &str) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        let heads = &d.branches[&d.current].volumes;
        if !heads.contains_key(subdot) {
            return Err(Error::NoSuchVolume(format!("{dot}.{subdot}")));
        }
        if heads.len() == 1 {
            return Err(Error::InvalidArgument(format!(
                "{subdot} is the last subdot of {dot} on branch {}; delete the dot instead",
                d.current
            )));
        }
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::RemoveSubdot { subdot: subdot.to_string() })?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// Grow (or shrink) the head of a subdot (`None`: `__default__`) on the dot's current branch. Shrinking is
    /// refused when it would drop written data, unless `force`. Commits keep the size they had; the next commit
    /// records the new one.
    pub fn resize_subdot(&self, dot: &str, subdot: Option<&str>, size_bytes: u64, force: bool) -> Result<()> {
        crate::pool::validate_volume_size(size_bytes)?;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let (vid, name) = st.head_volume(dot, subdot)?;
        self.resize_locked(&mut st, vid, &name, size_bytes, force)
    }

    /// Every dot, by name.
    pub fn dots(&self) -> Vec<DotInfo> {
        let st = self.inner.state.lock();
        let mut v: Vec<DotInfo> = st.dots.values().map(|d| st.dot_info(d)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One dot.
    pub fn dot(&self, name: &str) -> Result<DotInfo> {
        let st = self.inner.state.lock();
        let id = st.dot_id(name)?;
        Ok(st.dot_info(st.dot(id)?))
    }

    /// The writable head of a subdot (`None`: `__default__`) on the dot's current branch.
    pub fn dot_volume(&self, dot: &str, subdot: Option<&str>) -> Result<Volume> {
        let st = self.inner.state.lock();
        st.check_open()?;
        let (vid, name) = st.head_volume(dot, subdot)?;
        Ok(Volume::new(self.inner.clone(), Target::Volume(vid), name))
    }

    /// The read-only view of a subdot (`None`: `__default__`) at a commit.
    pub fn commit_volume(&self, dot: &str, commit: CommitId, subdot: Option<&str>) -> Result<Volume> {
        let st = self.inner.state.lock();
        st.check_open()?;
        let id = st.dot_id(dot)?;
        let subdot = subdot.unwrap_or(DEFAULT_SUBDOT);
        let sid = *st
            .commit_of(id, commit)?
            .snapshots
            .get(subdot)
            .ok_or_else(|| Error::NoSuchVolume(format!("{dot}.{subdot}@{commit}")))?;
        Ok(Volume::new(self.inner.clone(), Target::Snapshot(sid), format!("{dot}.{subdot}@{commit}")))
    }

    /// Commit every subdot of the dot's current branch at once: O(1) per subdot. Returns the new commit's id.
    pub fn commit(&self, dot: &str, req: CommitRequest) -> Result<CommitId> {
        validate_commit(&req)?;
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        let commit = req.id.unwrap_or_else(CommitId::random);
        if d.commits.contains_key(&commit.0) {
            return Err(Error::InvalidArgument(format!("commit {commit} exists already in {dot}")));
        }
        let branch = d.current.clone();
        let b = &d.branches[&branch];
        let parents = b.head.into_iter().collect();
        let first = st.next_volume_id;
        let snapshots = b.volumes.keys().enumerate().map(|(i, s)| (s.clone(), first + i as u64)).collect();
        let time_unix_secs = req.time_unix_secs.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
        });
        let meta =
            CommitMeta { parents, time_unix_secs, author: req.author, message: req.message, metadata: req.metadata };
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::Commit { commit: commit.0, branch, meta, snapshots })?;
        Ok(commit)
    }

    /// The commits of a branch (the current one when `None`), newest first, following first parents.
    pub fn log(&self, dot: &str, branch: Option<&str>) -> Result<Vec<CommitInfo>> {
        let st = self.inner.state.lock();
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        let branch = branch.unwrap_or(&d.current);
        let b = d.branches.get(branch).ok_or_else(|| Error::NoSuchBranch(format!("{dot} {branch}")))?;
        let mut out = Vec::new();
        let mut at = b.head;
        while let Some(c) = at {
            let Some(info) = st.commit_info(d, &c) else { break };
            at = info.parents.first().map(|p| p.0);
            out.push(info);
        }
        Ok(out)
    }

    /// Every commit of the dot (the whole DAG), oldest first.
    pub fn commits(&self, dot: &str) -> Result<Vec<CommitInfo>> {
        let st = self.inner.state.lock();
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        let mut ids: Vec<(&RawCommitId, u64)> = d.commits.iter().map(|(k, c)| (k, c.seq)).collect();
        ids.sort_by_key(|x| x.1);
        Ok(ids.into_iter().filter_map(|(k, _)| st.commit_info(d, k)).collect())
    }

    /// A new branch whose heads are O(1) clones of `from` (the current branch's newest commit when `None`).
    pub fn create_branch(&self, dot: &str, branch: &str, from: Option<CommitId>) -> Result<()> {
        validate_part(branch)?;
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        if d.branches.contains_key(branch) {
            return Err(Error::BranchExists(format!("{dot} {branch}")));
        }
        let from = match from {
            Some(c) => c,
            None => d.branches[&d.current].head.map(CommitId).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "branch {} of {dot} has no commit to branch from; commit first",
                    d.current
                ))
            })?,
        };
        let first = st.next_volume_id;
        let volumes =
            st.commit_of(id, from)?.snapshots.keys().enumerate().map(|(i, s)| (s.clone(), first + i as u64)).collect();
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::Branch { branch: branch.to_string(), from: from.0, volumes })
    }

    /// Make `branch` the dot's current branch.
    pub fn checkout(&self, dot: &str, branch: &str) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        if !st.dot(id)?.branches.contains_key(branch) {
            return Err(Error::NoSuchBranch(format!("{dot} {branch}")));
        }
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::Checkout { branch: branch.to_string() })
    }

    /// Reset a branch's heads to `commit` (`git reset --hard`): writes since are dropped; commits stay.
    pub fn reset_branch(&self, dot: &str, branch: &str, commit: CommitId) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        if !st.dot(id)?.branches.contains_key(branch) {
            return Err(Error::NoSuchBranch(format!("{dot} {branch}")));
        }
        let first = st.next_volume_id;
        let volumes = st
            .commit_of(id, commit)?
            .snapshots
            .keys()
            .enumerate()
            .map(|(i, s)| (s.clone(), first + i as u64))
            .collect();
        st.log_dot(
            dev,
            &self.inner.reuse_gate,
            id,
            DotOp::Reset { branch: branch.to_string(), commit: commit.0, volumes },
        )?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// Delete a branch (never the current one) and its heads; its commits stay.
    pub fn delete_branch(&self, dot: &str, branch: &str) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        if !d.branches.contains_key(branch) {
            return Err(Error::NoSuchBranch(format!("{dot} {branch}")));
        }
        if d.current == branch {
            return Err(Error::InvalidArgument(format!("{branch} is the current branch of {dot}; check out another")));
        }
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::DeleteBranch { branch: branch.to_string() })?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// Delete a commit that no branch has as its head and no commit has as a parent.
    pub fn delete_commit(&self, dot: &str, commit: CommitId) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        st.commit_of(id, commit)?;
        let d = st.dot(id)?;
        if let Some((b, _)) = d.branches.iter().find(|(_, b)| b.head == Some(commit.0)) {
            return Err(Error::InvalidArgument(format!("commit {commit} is the head of branch {b}")));
        }
        if d.commits.values().any(|c| c.meta.parents.contains(&commit.0)) {
            return Err(Error::InvalidArgument(format!("commit {commit} is the parent of another commit")));
        }
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::DeleteCommit { commit: commit.0 })?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// Set (`Some`) or remove (`None`) a property of a dot: an opaque key/value pair kept with the dot, durable like
    /// every dot change once the pool is flushed, not copied by commits, clones or send streams. At most
    /// [`MAX_DOT_PROPERTIES`] per dot, keys of 1 to [`MAX_PROPERTY_KEY_BYTES`] bytes without control characters,
    /// values up to [`MAX_PROPERTY_VALUE_BYTES`]. Removing a property that is not set does nothing.
    ///
    /// ```
    /// # use blockmesh_engine::{io::SimDevice, Pool, PoolOptions};
    /// let opts = PoolOptions { segment_size_bytes: 1 << 20, ..PoolOptions::default() };
    /// let pool = Pool::create(SimDevice::new(64 << 20), opts).unwrap();
    /// pool.create_dot("admin/db", &[("__default__", 1 << 20)]).unwrap();
    /// pool.set_dot_property("admin/db", "qos.__default__", Some("read_iops=500")).unwrap();
    /// assert_eq!(pool.dot("admin/db").unwrap().properties["qos.__default__"], "read_iops=500");
    /// ```
    pub fn set_dot_property(&self, dot: &str, key: &str, value: Option<&str>) -> Result<()> {
        if key.is_empty() || key.len() > MAX_PROPERTY_KEY_BYTES || key.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "a property key has 1 to {MAX_PROPERTY_KEY_BYTES} bytes and no control characters"
            )));
        }
        if value.is_some_and(|v| v.len() > MAX_PROPERTY_VALUE_BYTES) {
            return Err(Error::InvalidArgument(format!(
                "a property value has at most {MAX_PROPERTY_VALUE_BYTES} bytes"
            )));
        }
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        let d = st.dot(id)?;
        match value {
            None if !d.properties.contains_key(key) => return Ok(()),
            Some(v) if d.properties.get(key).map(String::as_str) == Some(v) => return Ok(()),
            Some(_) if !d.properties.contains_key(key) && d.properties.len() >= MAX_DOT_PROPERTIES => {
                return Err(Error::Limit(format!("{dot} already has {MAX_DOT_PROPERTIES} properties")));
            }
            _ => {}
        }
        let change = DotOp::SetProperty { key: key.to_string(), value: value.map(str::to_string) };
        st.log_dot(dev, &self.inner.reuse_gate, id, change)?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// Delete a dot with all its branches, heads, commits and snapshots.
    pub fn delete_dot(&self, dot: &str) -> Result<()> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let id = st.dot_id(dot)?;
        st.log_dot(dev, &self.inner.reuse_gate, id, DotOp::Delete)?;
        st.maybe_checkpoint(dev, &self.inner.reuse_gate)
    }

    /// A new dot whose `master` heads are O(1) clones of a commit of another dot (its history starts empty).
    pub fn clone_dot(&self, dot: &str, commit: CommitId, new_dot: &str) -> Result<()> {
        validate_dot_name(new_dot)?;
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let src = st.dot_id(dot)?;
        if st.dot_names.contains_key(new_dot) {
            return Err(Error::DotExists(new_dot.to_string()));
        }
        let id = st.next_volume_id;
        let volumes = st
            .commit_of(src, commit)?
            .snapshots
            .keys()
            .enumerate()
            .map(|(i, s)| (s.clone(), id + 1 + i as u64))
            .collect();
        let change = DotOp::Clone { name: new_dot.to_string(), from_dot: src, commit: commit.0, volumes };
        st.log_dot(dev, &self.inner.reuse_gate, id, change)
    }

    /// What changed in a subdot (`None`: `__default__`) from commit `from` to commit `to` (the live head of the
    /// current branch when `None`).
    pub fn diff_commits(
        &self,
        dot: &str,
        from: CommitId,
        to: Option<CommitId>,
        subdot: Option<&str>,
    ) -> Result<Vec<Extent>> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_open()?;
        let id = st.dot_id(dot)?;
        let subdot = subdot.unwrap_or(DEFAULT_SUBDOT);
        let root_of_commit = |st: &State, c: CommitId| -> Result<crate::index::Root> {
            let sid = *st
                .commit_of(id, c)?
                .snapshots
                .get(subdot)
                .ok_or_else(|| Error::NoSuchVolume(format!("{dot}.{subdot}@{c}")))?;
            Ok(st.snapshots[&sid].root)
        };
        let a = root_of_commit(&st, from)?;
        let b = match to {
            Some(c) => root_of_commit(&st, c)?,
            None => {
                let d = st.dot(id)?;
                let vid = *d.branches[&d.current]
                    .volumes
                    .get(subdot)
                    .ok_or_else(|| Error::NoSuchVolume(format!("{dot}.{subdot}")))?;
                st.volumes[&vid].root
            }
        };
        st.index.diff(dev, a, b)
    }
}
