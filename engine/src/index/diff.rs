//! Walks over trees: the changes between two trees, and the allocation map of one.
//!
//! Diff walks both trees together and skips every subtree the two share (same vbn): after a snapshot, a write copies
//! only the nodes on its path, so the walk visits O(changed x height) nodes, not the volume [I8]. Trees of different
//! heights (a volume grown since) are compared as if the shorter one hung from slot 0 of as many extra levels.

use super::tree::{slot_index, Index, Mapping, MappingKind, Root};
use crate::format::node::{Slot, FANOUT, FANOUT_BITS};
use crate::format::BLOCK_SIZE;
use crate::io::Device;
use crate::Result;

/// What a range of a volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Written data.
    Data,
    /// Written zeroes (reads as zeroes, takes no space).
    Zero,
    /// Discarded (reads as zeroes, takes no space).
    Trimmed,
    /// Never written (reads as zeroes, takes no space).
    Hole,
}

/// A byte range of a volume and what it holds (or, in a diff, what it holds now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes.
    pub offset_bytes: u64,
    /// Length, in bytes.
    pub len_bytes: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

fn kind_of(m: Mapping) -> ExtentKind {
    match m.kind {
        MappingKind::Data => ExtentKind::Data,
        MappingKind::Zero => ExtentKind::Zero,
        MappingKind::Trimmed => ExtentKind::Trimmed,
        MappingKind::Hole => ExtentKind::Hole,
    }
}

/// A node of a tree seen at some level: absent, a real node, or a shorter tree lifted to this level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeRef {
    Absent,
    Node(u64),
    Lifted { vbn: u64, real_level: u8 },
}

impl NodeRef {
    fn of_root(root: Root, height: u8) -> Self {
        if root.vbn == 0 {
            NodeRef::Absent
        } else if root.height == height {
            NodeRef::Node(root.vbn)
        } else {
            NodeRef::Lifted { vbn: root.vbn, real_level: root.height - 1 }
        }
    }
}

/// Appends block runs, merging neighbours of the same kind.
struct Runs {
    out: Vec<Extent>,
}

impl Runs {
    fn push(&mut self, block: u64, count: u64, kind: ExtentKind) {
        let (offset_bytes, len_bytes) = (block * BLOCK_SIZE, count * BLOCK_SIZE);
        if let Some(last) = self.out.last_mut() {
            if last.kind == kind && last.offset_bytes + last.len_bytes == offset_bytes {
                last.len_bytes += len_bytes;
                return;
            }
        }
        self.out.push(Extent { offset_bytes, len_bytes, kind });
    }
}

impl Index {
    /// The slots of a node seen at `level` (all absent for `Absent`).
    fn slots(&mut self, dev: &dyn Device, r: NodeRef, level: u8) -> Result<Vec<Slot>> {
        Ok(match r {
            NodeRef::Absent => vec![Slot::default(); FANOUT],
            NodeRef::Node(vbn) => {
                self.load(dev, vbn)?;
                self.node(vbn).to_vec()
            }
            NodeRef::Lifted { vbn, real_level } => {
                debug_assert!(level > real_level);
                let mut v = vec![Slot::default(); FANOUT];
                v[0] = Slot { a: vbn, b: 0 };
                v
            }
        })
    }

    fn child(r: NodeRef, slot: Slot, level: u8) -> NodeRef {
        match r {
            NodeRef::Lifted { vbn, real_level } if level - 1 > real_level && slot.a != 0 => {
                NodeRef::Lifted { vbn, real_level }
            }
            _ if slot.a == 0 => NodeRef::Absent,
            _ => NodeRef::Node(slot.a),
        }
    }

    /// Blocks whose mapping differs between `old` and `new`, with what `new` holds there, as merged runs.
    pub(crate) fn diff(&mut self, dev: &dyn Device, old: Root, new: Root) -> Result<Vec<Extent>> {
        let height = old.height.max(new.height);
        let mut runs = Runs { out: Vec::new() };
        let (o, n) = (NodeRef::of_root(old, height), NodeRef::of_root(new, height));
        self.diff_walk(dev, o, n, height - 1, 0, &mut runs)?;
        Ok(runs.out)
    }

    fn diff_walk(
        &mut self,
        dev: &dyn Device,
        o: NodeRef,
        n: NodeRef,
        level: u8,
        base: u64,
        runs: &mut Runs,
    ) -> Result<()> {
        if o == n {
            return Ok(()); // shared subtree (or both absent): nothing changed below
        }
        let (os, ns) = (self.slots(dev, o, level)?, self.slots(dev, n, level)?);
        let span = 1u64 << (FANOUT_BITS * u32::from(level));
        for i in 0..FANOUT {
            let lo = base + i as u64 * span;
            if level == 0 {
                if os[i] != ns[i] {
                    runs.push(lo, 1, kind_of(Mapping::from_slot(ns[i])));
                }
            } else {
                let (co, cn) = (Self::child(o, os[i], level), Self::child(n, ns[i], level));
                self.diff_walk(dev, co, cn, level - 1, lo, runs)?;
            }
        }
        Ok(())
    }

    /// What blocks `[start, end)` of a tree hold, as merged runs (absent subtrees become one hole run each).
    pub(crate) fn allocation(&mut self, dev: &dyn Device, root: Root, start: u64, end: u64) -> Result<Vec<Extent>> {
        let mut runs = Runs { out: Vec::new() };
        let cap = root.capacity_blocks();
        if root.vbn == 0 || start >= cap {
            runs.push(start, end - start, ExtentKind::Hole);
            return Ok(runs.out);
        }
        self.alloc_walk(dev, root.vbn, root.height - 1, 0, start, end.min(cap), &mut runs)?;
        if end > cap {
            runs.push(cap, end - cap, ExtentKind::Hole);
        }
        Ok(runs.out)
    }

    #[allow(clippy::too_many_arguments)]
    fn alloc_walk(
        &mut self,
        dev: &dyn Device,
        vbn: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        runs: &mut Runs,
    ) -> Result<()> {
        self.load(dev, vbn)?;
        let span = 1u64 << (FANOUT_BITS * u32::from(level));
        let first = slot_index(start.max(base), level);
        for i in first..FANOUT {
            let lo = base + i as u64 * span;
            if lo >= end {
                break;
            }
            let s = self.node(vbn)[i];
            let (a, b) = (lo.max(start), (lo + span).min(end));
            if level == 0 {
                runs.push(lo, 1, kind_of(Mapping::from_slot(s)));
            } else if s.a == 0 {
                runs.push(a, b - a, ExtentKind::Hole);
            } else {
                self.alloc_walk(dev, s.a, level - 1, lo, a, b, runs)?;
            }
        }
        Ok(())
    }
}
