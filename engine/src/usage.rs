//! Space usage: how much data the heads map and how much only commits hold, for the pool and for each dot.
//!
//! A walk visits each distinct tree node once (snapshots share nodes), collecting the data vbns the heads map; then
//! the nodes only commits reach, collecting the data vbns they map that no head does. Blocks shared by several
//! heads, by clones or by commits count once. Figures are data blocks (4 KiB each); tree nodes and block-table
//! pages are the pool's own metadata and not counted here.

use std::collections::HashSet;

use roaring::RoaringTreemap;

use crate::dots::DotState;
use crate::format::BLOCK_SIZE;
use crate::index::{Index, Mapping, MappingKind, Root};
use crate::io::Device;
use crate::pool::{Pool, State};
use crate::Result;

/// Space figures of a set of heads and commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceUsage {
    /// The heads' sizes added up: what clients see.
    pub logical_bytes: u64,
    /// Data the heads map (each block once, however many heads share it).
    pub written_bytes: u64,
    /// Data only commits map, no head: what deleting those commits would give back.
    pub commits_only_bytes: u64,
}

/// The space of one dot: its branch heads and its commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DotUsage {
    /// `ns/name`.
    pub dot: String,
    /// Figures over every branch head (all subdots) and every commit of the dot.
    pub usage: SpaceUsage,
}

/// Space usage of the whole pool and of each dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every volume (heads, plain volumes, receives in progress) and every snapshot (commits).
    pub pool: SpaceUsage,
    /// Each dot, by name.
    pub dots: Vec<DotUsage>,
}

impl Index {
    /// Add to `out` the data vbns mapped under `roots`, visiting each node once: nodes already in `visited` (and so
    /// the subtrees below them) are skipped, and every node visited joins it.
    fn data_vbns(
        &mut self,
        dev: &dyn Device,
        roots: &[Root],
        visited: &mut HashSet<u64>,
        out: &mut RoaringTreemap,
    ) -> Result<()> {
        let mut stack: Vec<(u64, u8)> = roots.iter().filter(|r| r.vbn != 0).map(|r| (r.vbn, r.height - 1)).collect();
        while let Some((vbn, level)) = stack.pop() {
            if !visited.insert(vbn) {
                continue;
            }
            self.load(dev, vbn)?;
            let node = self.node(vbn);
            if level == 0 {
                for s in node.iter() {
                    let m = Mapping::from_slot(*s);
                    if m.kind == MappingKind::Data && m.vbn != 0 {
                        out.insert(m.vbn);
                    }
                }
            } else {
                stack.extend(node.iter().filter(|s| s.a != 0).map(|s| (s.a, level - 1)));
            }
        }
        Ok(())
    }
}

impl State {
    /// The figures of `heads` (root and size each) and `commits`.
    fn space(&mut self, dev: &dyn Device, heads: &[(Root, u64)], commits: &[Root]) -> Result<SpaceUsage> {
        let mut visited = HashSet::new();
        let mut head_data = RoaringTreemap::new();
        let head_roots: Vec<Root> = heads.iter().map(|(r, _)| *r).collect();
        self.index.data_vbns(dev, &head_roots, &mut visited, &mut head_data)?;
        // nodes the heads reach map only blocks the heads map: the walk skips them
        let mut held = RoaringTreemap::new();
        self.index.data_vbns(dev, commits, &mut visited, &mut held)?;
        held -= &head_data;
        Ok(SpaceUsage {
            logical_bytes: heads.iter().map(|(_, size)| size).sum(),
            written_bytes: head_data.len() * BLOCK_SIZE,
            commits_only_bytes: held.len() * BLOCK_SIZE,
        })
    }

    fn dot_space(&mut self, dev: &dyn Device, dot: &DotState) -> Result<SpaceUsage> {
        let mut heads = Vec::new();
        for b in dot.branches.values() {
            for id in b.volumes.values() {
                if let Some(v) = self.volumes.get(id) {
                    heads.push((v.root, v.size_bytes));
                }
            }
        }
        let commits: Vec<Root> = dot
            .commits
            .values()
            .flat_map(|c| c.snapshots.values())
            .filter_map(|id| self.snapshots.get(id).map(|s| s.root))
            .collect();
        self.space(dev, &heads, &commits)
    }
}

impl Pool {
    /// Space usage of the pool and of each dot (see [`Usage`]). Walks every distinct tree node once, under the
    /// pool lock: milliseconds per GiB of mapped data when the nodes are in memory.
    pub fn usage(&self) -> Result<Usage> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_open()?;
        let heads: Vec<(Root, u64)> = st.volumes.values().map(|v| (v.root, v.size_bytes)).collect();
        let commits: Vec<Root> = st.snapshots.values().map(|s| s.root).collect();
        let pool = st.space(dev, &heads, &commits)?;
        let dots: Vec<DotState> = st.dots.values().cloned().collect();
        let mut out = Vec::with_capacity(dots.len());
        for d in dots {
            let usage = st.dot_space(dev, &d)?;
            out.push(DotUsage { dot: d.name.clone(), usage });
        }
        out.sort_by(|a, b| a.dot.cmp(&b.dot));
        Ok(Usage { pool, dots: out })
    }
}
