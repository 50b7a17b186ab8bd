//! Per-volume radix trees: fixed fanout 256, height from the volume size, copy-on-write through block-table
//! refcounts.
//!
//! A leaf slot maps one 4 KiB volume block: `a` = data vbn (0 unless the kind is `Data`), `b` = kind (top 2 bits) and
//! birth generation (low 62 bits). An inner slot points at a child node: `a` = child vbn (0 = absent, every block
//! below reads as a never-written hole), `b` = the highest birth generation below it [I7].
//!
//! Nodes, like data, are named by vbn; the block table holds their location, checksum and reference count. A node
//! with refcount 1 is private to one parent and is changed in place (its vbn stays, so its parent does not change);
//! a shared node is copied first and the copy's children gain a reference [I8].

use std::collections::{BTreeSet, HashMap, HashSet};

use super::block_table::{BlockTable, BtEntry};
use crate::format::node::{decode_page, Page, Slot, FANOUT, FANOUT_BITS};
use crate::format::{crc32, BLOCK, BLOCK_SIZE};
use crate::io::Device;
use crate::{Error, Result};

const KIND_SHIFT: u32 = 62;
const BIRTH_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// Most levels a tree may have: 256^5 blocks of 4 KiB = 4 PiB.
pub(crate) const MAX_HEIGHT: u8 = 5;
/// Free vbns taken out of the free set at once, lowest first, to be handed out one by one (`Index::free_low`).
const VBN_REFILL: usize = 1024;

/// What a volume block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MappingKind {
    /// Never written (or dropped by a shrink): reads as zeroes.
    Hole = 0,
    /// Written data.
    Data = 1,
    /// Written zeroes (write-zeroes): reads as zeroes, takes no data block.
    Zero = 2,
    /// Discarded: reads as zeroes, takes no data block.
    Trimmed = 3,
}

/// A leaf slot decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub(crate) kind: MappingKind,
    pub(crate) vbn: u64,
    pub(crate) birth: u64,
}

impl Mapping {
    pub(crate) const HOLE: Mapping = Mapping { kind: MappingKind::Hole, vbn: 0, birth: 0 };

    pub(crate) fn from_slot(s: Slot) -> Self {
        let kind = match s.b >> KIND_SHIFT {
            0 => MappingKind::Hole,
            1 => MappingKind::Data,
            2 => MappingKind::Zero,
            _ => MappingKind::Trimmed,
        };
        Self { kind, vbn: s.a, birth: s.b & BIRTH_MASK }
    }

    fn to_slot(self) -> Slot {
        Slot { a: self.vbn, b: ((self.kind as u64) << KIND_SHIFT) | (self.birth & BIRTH_MASK) }
    }
}

/// A tree root: the root node's vbn (0 = empty tree) and the number of levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Root {
    pub(crate) vbn: u64,
    pub(crate) height: u8,
}

impl Root {
    /// An empty tree tall enough for `blocks` blocks.
    pub(crate) fn empty_for(blocks: u64) -> Self {
        Self { vbn: 0, height: height_for(blocks) }
    }

    /// Blocks this tree can map.
    pub(crate) fn capacity_blocks(&self) -> u64 {
        1u64 << (FANOUT_BITS * u32::from(self.height))
    }
}

/// Levels needed to map `blocks` blocks (at least 1).
pub(crate) fn height_for(blocks: u64) -> u8 {
    let mut h = 1u8;
    while h < MAX_HEIGHT && (1u64 << (FANOUT_BITS * u32::from(h))) < blocks {
        h += 1;
    }
    h
}

pub(crate) fn slot_index(block: u64, level: u8) -> usize {
    ((block >> (FANOUT_BITS * u32::from(level))) as usize) & (FANOUT - 1)
}

/// Hashes u64 keys (vbns) by Fibonacci multiplication: cheap, and spreads sequential vbns over the high bits the
/// hash table uses.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct VbnHasher(u64);

impl std::hash::Hasher for VbnHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type VbnMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<VbnHasher>>;

/// The index: block table, loaded tree nodes, and the vbn allocator.
#[derive(Debug)]
pub(crate) struct Index {
    pub(crate) bt: BlockTable,
    /// Tree nodes in memory, by vbn (loaded on first use, or born since the last checkpoint).
    nodes: VbnMap<Box<Page>>,
    /// Nodes changed since the last checkpoint: written by the next one.
    dirty_nodes: BTreeSet<u64>,
    /// One past the highest vbn in use (or freed since the last checkpoint): where new vbns start once no free one
    /// is left [I9].
    pub(crate) next_vbn: u64,
    /// Free vbns below `next_vbn` that were free at the last checkpoint: handed out again, lowest first [I9]. The
    /// lowest of them wait in `free_low`, the rest here.
    free_vbns: roaring::RoaringTreemap,
    /// The lowest free vbns, ascending, each below every vbn left in `free_vbns`: taken out of the set
    /// [`VBN_REFILL`] at a time, since finding a set's minimum again for every block written scans its first
    /// container from the start (a measured 5% of the CPU of sequential NBD writes).
    free_low: std::collections::VecDeque<u64>,
    /// vbns freed since the last checkpoint: not reused before the next one completes [I9].
    freed_vbns: roaring::RoaringTreemap,
    /// Whether free vbns are reused: not while the log of a pool written before format 5 (which never reused them)
    /// is replayed, from its first checkpoint on [I9].
    reuse_vbns: bool,
    /// Physical blocks that lost their last reference; the pool's space accounting drains this.
    pub(crate) released: Vec<u64>,
}

impl Index {
    /// The index of a checkpoint: its block table and `next_vbn`. With `reuse_vbns` (format 5 on), the free vbns
    /// are those of the table and `next_vbn` is one past its highest allocated vbn, whatever the checkpoint says
    /// (a checkpoint naming a huge `next_vbn` costs nothing): exactly what the pool that wrote the checkpoint had
    /// once it completed [I9].
    pub(crate) fn new(bt: BlockTable, next_vbn: u64, reuse_vbns: bool) -> Self {
        let (free_vbns, next_vbn) =
            if reuse_vbns { bt.free_vbns() } else { (roaring::RoaringTreemap::new(), next_vbn) };
        Self {
            bt,
            nodes: VbnMap::default(),
            dirty_nodes: BTreeSet::new(),
            next_vbn,
            free_vbns,
            free_low: std::collections::VecDeque::new(),
            freed_vbns: roaring::RoaringTreemap::new(),
            reuse_vbns,
            released: Vec::new(),
        }
    }

    /// The vbn the next allocation hands out: the lowest free one, else `next_vbn` [I9]. Replay allocates in the
    /// same order from the same free set, so a logged `Write` names the vbn replay hands out too.
    pub(crate) fn peek_vbn(&mut self) -> u64 {
        if !self.reuse_vbns {
            return self.next_vbn;
        }
        if self.free_low.is_empty() {
            self.free_low.extend(self.free_vbns.iter().take(VBN_REFILL));
            if let Some(&last) = self.free_low.back() {
                self.free_vbns.remove_range(..=last);
            }
        }
        self.free_low.front().copied().unwrap_or(self.next_vbn)
    }

    /// A new vbn with one reference.
    fn alloc(&mut self, pba: u64, crc: u32) -> u64 {
        let vbn = self.peek_vbn();
        if vbn == self.next_vbn {
            self.next_vbn += 1;
        } else {
            let taken = self.free_low.pop_front();
            debug_assert_eq!(taken, Some(vbn), "the lowest free vbn is handed out");
        }
        debug_assert_eq!(self.bt.get(vbn).refcount, 0, "vbn {vbn} handed out while in use");
        self.bt.set(vbn, BtEntry { pba, crc, refcount: 1 });
        vbn
    }

    /// A checkpoint completed: the vbns freed since the last one may be handed out again, and `next_vbn` comes down
    /// to one past the highest vbn in use, as an open of this checkpoint computes them [I9].
    pub(crate) fn checkpoint_completed(&mut self) {
        if !self.reuse_vbns {
            // a pool of an older format: its log is replayed no more, this build's allocation starts here
            self.reuse_vbns = true;
            (self.free_vbns, self.next_vbn) = self.bt.free_vbns();
            self.free_low.clear();
            self.freed_vbns.clear();
            return;
        }
        let freed = std::mem::take(&mut self.freed_vbns);
        self.free_vbns |= freed;
        // freed vbns may lie below the waiting ones: they all go back into the set, lowest first again
        self.free_vbns.extend(self.free_low.drain(..));
        // vbn 0 names nothing and is never handed out
        while self.next_vbn > 1 && self.free_vbns.max() == Some(self.next_vbn - 1) {
            // a run of free vbns at the top: come down past it at once
            let top = self.next_vbn - 1;
            let mut low = top;
            while low > 1 && self.free_vbns.contains(low - 1) {
                low -= 1;
            }
            self.free_vbns.remove_range(low..=top);
            self.next_vbn = low;
        }
        debug_assert!(
            self.next_vbn > 1 << 20 || (self.free_vbns.clone(), self.next_vbn) == self.bt.free_vbns(),
            "the vbn allocator matches what an open of this checkpoint computes"
        );
    }

    /// Name a data block just appended to the log.
    pub(crate) fn alloc_data(&mut self, pba: u64, crc: u32) -> u64 {
        self.alloc(pba, crc)
    }

    fn new_node(&mut self) -> u64 {
        let vbn = self.alloc(0, 0);
        self.nodes.insert(vbn, Box::new([Slot::default(); FANOUT]));
        self.dirty_nodes.insert(vbn);
        vbn
    }

    /// Make sure node `vbn` is in memory, reading and verifying it if needed.
    pub(crate) fn load(&mut self, dev: &dyn Device, vbn: u64) -> Result<()> {
        if self.nodes.contains_key(&vbn) {
            return Ok(());
        }
        let e = self.bt.get(vbn);
        if e.refcount == 0 || e.pba == 0 {
            return Err(Error::corrupt(
                "index tree",
                0,
                format!("node vbn {vbn} allocated and written"),
                format!("block-table entry {e:?}"),
            ));
        }
        let mut buf = vec![0u8; BLOCK];
        let offset = e.pba * BLOCK_SIZE;
        dev.read_at(&mut buf, offset)?;
        let crc = crc32(&buf);
        if crc != e.crc {
            return Err(Error::corrupt(
                "index tree node",
                offset,
                format!("crc32 {:#010x} (vbn {vbn})", e.crc),
                format!("crc32 {crc:#010x}"),
            ));
        }
        self.nodes.insert(vbn, decode_page(&buf));
        Ok(())
    }

    pub(crate) fn node(&self, vbn: u64) -> &Page {
        // A node is loaded before any access (every caller runs `load` first).
        self.nodes.get(&vbn).map(|b| &**b).unwrap_or_else(|| panic!("index node {vbn} accessed before load"))
    }

    fn node_mut(&mut self, vbn: u64) -> &mut Page {
        self.dirty_nodes.insert(vbn);
        self.nodes.get_mut(&vbn).map(|b| &mut **b).unwrap_or_else(|| panic!("index node {vbn} accessed before load"))
    }

    fn incref(&mut self, vbn: u64) {
        let mut e = self.bt.get(vbn);
        assert!(e.refcount > 0 && e.refcount < u32::MAX, "incref of vbn {vbn} with refcount {}", e.refcount);
        e.refcount += 1;
        self.bt.set(vbn, e);
    }

    /// Drop one reference to `vbn`; `level` is `Some(level)` for a tree node, `None` for a data block. Frees what
    /// reaches zero, recursively.
    pub(crate) fn decref(&mut self, dev: &dyn Device, vbn: u64, level: Option<u8>) -> Result<()> {
        if level.is_none() {
            // a data block frees nothing below it: no stack (this runs for every block a write replaces)
            return self.decref_data(vbn);
        }
        let mut stack = vec![(vbn, level)];
        while let Some((vbn, level)) = stack.pop() {
            if !self.unref(vbn)? {
                continue;
            }
            if let Some(level) = level {
                self.load(dev, vbn)?;
                let page = self.nodes.remove(&vbn).unwrap_or_else(|| panic!("node {vbn} just loaded"));
                self.dirty_nodes.remove(&vbn);
                let child_level = level.checked_sub(1);
                for s in page.iter().filter(|s| s.a != 0) {
                    stack.push((s.a, child_level));
                }
            }
            self.free_vbn(vbn);
        }
        Ok(())
    }

    /// [`Index::decref`] of a data block.
    fn decref_data(&mut self, vbn: u64) -> Result<()> {
        if self.unref(vbn)? {
            self.free_vbn(vbn);
        }
        Ok(())
    }

    /// Drop one reference to `vbn`; true when that was the last (its entry is left for [`Index::free_vbn`]).
    fn unref(&mut self, vbn: u64) -> Result<bool> {
        let mut e = self.bt.get(vbn);
        if e.refcount == 0 {
            return Err(Error::corrupt("block table", 0, format!("a reference held on vbn {vbn}"), "refcount 0"));
        }
        e.refcount -= 1;
        if e.refcount > 0 {
            self.bt.set(vbn, e);
        }
        Ok(e.refcount == 0)
    }

    /// Free `vbn`, which lost its last reference: its block is released, and the vbn is reused once the next
    /// checkpoint completes [I9].
    fn free_vbn(&mut self, vbn: u64) {
        let e = self.bt.get(vbn);
        if e.pba != 0 {
            self.released.push(e.pba);
        }
        self.bt.set(vbn, BtEntry::default());
        self.freed_vbns.insert(vbn);
    }

    /// Make node `vbn` (at `level`) private to its one parent: itself if unshared, else a fresh copy [I8].
    fn make_private(&mut self, dev: &dyn Device, vbn: u64, level: u8) -> Result<u64> {
        self.load(dev, vbn)?;
        if self.bt.get(vbn).refcount == 1 {
            return Ok(vbn);
        }
        let copy = self.node(vbn).to_owned();
        // every child gains a reference: one naming a free vbn is a damaged node (a resealed one still matches its
        // checksum), a corruption error before anything changes, not a failed assertion
        if let Some(child) =
            copy.iter().map(|s| s.a).find(|&c| c != 0 && !(1..u32::MAX).contains(&self.bt.get(c).refcount))
        {
            return Err(Error::corrupt(
                "index tree node",
                self.bt.get(vbn).pba * BLOCK_SIZE,
                format!("live children (node vbn {vbn})"),
                format!("child vbn {child} with refcount {}", self.bt.get(child).refcount),
            ));
        }
        let new = self.alloc(0, 0);
        for s in copy.iter().filter(|s| s.a != 0) {
            self.incref(s.a);
        }
        self.nodes.insert(new, Box::new(copy));
        self.dirty_nodes.insert(new);
        self.decref(dev, vbn, Some(level))?;
        Ok(new)
    }

    /// The mapping of one block.
    pub(crate) fn lookup(&mut self, dev: &dyn Device, root: Root, block: u64) -> Result<Mapping> {
        if root.vbn == 0 || block >= root.capacity_blocks() {
            return Ok(Mapping::HOLE);
        }
        let mut vbn = root.vbn;
        for level in (1..root.height).rev() {
            self.load(dev, vbn)?;
            let child = self.node(vbn)[slot_index(block, level)].a;
            if child == 0 {
                return Ok(Mapping::HOLE);
            }
            vbn = child;
        }
        self.load(dev, vbn)?;
        Ok(Mapping::from_slot(self.node(vbn)[slot_index(block, 0)]))
    }

    /// The leaf holding `block`, if it exists (no change made).
    fn leaf_if_exists(&mut self, dev: &dyn Device, root: Root, block: u64) -> Result<Option<u64>> {
        if root.vbn == 0 {
            return Ok(None);
        }
        let mut vbn = root.vbn;
        for level in (1..root.height).rev() {
            self.load(dev, vbn)?;
            let child = self.node(vbn)[slot_index(block, level)].a;
            if child == 0 {
                return Ok(None);
            }
            vbn = child;
        }
        self.load(dev, vbn)?;
        Ok(Some(vbn))
    }

    /// Make the path to the leaf of `block` exist and be private, raising the birth marks on the way to `gen`;
    /// returns the leaf's vbn, loaded and marked dirty.
    fn leaf_for_write(&mut self, dev: &dyn Device, root: &mut Root, block: u64, gen: u64) -> Result<u64> {
        assert!(block < root.capacity_blocks(), "block {block} beyond tree capacity");
        root.vbn = if root.vbn == 0 { self.new_node() } else { self.make_private(dev, root.vbn, root.height - 1)? };
        let mut vbn = root.vbn;
        for level in (1..root.height).rev() {
            let idx = slot_index(block, level);
            let child = self.node(vbn)[idx];
            let new_child = if child.a == 0 { self.new_node() } else { self.make_private(dev, child.a, level - 1)? };
            self.node_mut(vbn)[idx] = Slot { a: new_child, b: child.b.max(gen) };
            vbn = new_child;
        }
        self.node_mut(vbn);
        Ok(vbn)
    }

    /// Map one block; the old mapping's data block loses its reference.
    pub(crate) fn set(&mut self, dev: &dyn Device, root: &mut Root, block: u64, m: Mapping) -> Result<()> {
        let leaf = self.leaf_for_write(dev, root, block, m.birth)?;
        self.set_in_leaf(leaf, block, m)
    }

    /// The leaf that maps `block` in the tree at `root`, if every node on the path to it is in memory and private to
    /// this tree (one reference each), as [`Index::set`] leaves the path it walked; `None` otherwise.
    pub(crate) fn private_leaf(&self, root: Root, block: u64) -> Option<u64> {
        if block >= root.capacity_blocks() {
            return None;
        }
        let mut vbn = root.vbn;
        for level in (0..root.height).rev() {
            if vbn == 0 || self.bt.get(vbn).refcount != 1 {
                return None;
            }
            let node = self.nodes.get(&vbn)?;
            if level == 0 {
                break;
            }
            vbn = node[slot_index(block, level)].a;
        }
        Some(vbn)
    }

    /// [`Index::set`] of a block that `leaf` maps, where `leaf` is what [`Index::private_leaf`] found for a block of
    /// it, with nothing changed in the tree since but mappings of that leaf born in the same generation as `m`: the
    /// same change, without the walk from the root (which would find every node on the path private, and every
    /// slot on it born no earlier than `m`, and so change nothing).
    pub(crate) fn set_in_leaf(&mut self, leaf: u64, block: u64, m: Mapping) -> Result<()> {
        let idx = slot_index(block, 0);
        let page = self.node_mut(leaf);
        let old = Mapping::from_slot(page[idx]);
        page[idx] = m.to_slot();
        if old.kind == MappingKind::Data {
            self.decref_data(old.vbn)?;
        }
        Ok(())
    }

    /// Set `[start, start + count)` to zeroes or trimmed. Trimming leaves never-written blocks as holes and creates
    /// no node for them.
    pub(crate) fn set_range(
        &mut self,
        dev: &dyn Device,
        root: &mut Root,
        start: u64,
        count: u64,
        kind: MappingKind,
        gen: u64,
    ) -> Result<()> {
        debug_assert!(matches!(kind, MappingKind::Zero | MappingKind::Trimmed | MappingKind::Hole));
        let end = start + count;
        let mut block = start;
        while block < end {
            let leaf_end = ((block >> FANOUT_BITS) + 1) << FANOUT_BITS;
            let stop = leaf_end.min(end);
            if kind != MappingKind::Zero && self.leaf_if_exists(dev, *root, block)?.is_none() {
                block = stop;
                continue;
            }
            let leaf = self.leaf_for_write(dev, root, block, gen)?;
            let mut freed = Vec::new();
            let page = self.node_mut(leaf);
            for b in block..stop {
                let idx = slot_index(b, 0);
                let old = Mapping::from_slot(page[idx]);
                if kind == MappingKind::Trimmed && old.kind == MappingKind::Hole {
                    continue;
                }
                let new = match kind {
                    MappingKind::Hole => Mapping::HOLE,
                    _ => Mapping { kind, vbn: 0, birth: gen },
                };
                page[idx] = new.to_slot();
                if old.kind == MappingKind::Data {
                    freed.push(old.vbn);
                }
            }
            for vbn in freed {
                self.decref(dev, vbn, None)?;
            }
            block = stop;
        }
        Ok(())
    }

    /// Add levels on top until the tree maps `blocks` blocks. The volume's reference moves from the old root to
    /// the new root's first slot, so no refcount changes [I8].
    pub(crate) fn grow(&mut self, dev: &dyn Device, root: &mut Root, blocks: u64) -> Result<()> {
        let want = height_for(blocks);
        while root.height < want {
            if root.vbn != 0 {
                let old = root.vbn;
                self.load(dev, old)?;
                let max_birth = self.node(old).iter().map(|s| s.b & BIRTH_MASK).max().unwrap_or(0);
                let new = self.new_node();
                self.node_mut(new)[0] = Slot { a: old, b: max_birth };
                root.vbn = new;
            }
            root.height += 1;
        }
        Ok(())
    }

    /// One more reference to a tree (a snapshot or clone of `root`): O(1) [I8].
    /// A root that is not live (refcount 0, from a damaged catalog or log) is a corruption error, not a panic.
    pub(crate) fn share(&mut self, root: Root) -> Result<()> {
        if root.vbn != 0 {
            let e = self.bt.get(root.vbn);
            if e.refcount == 0 || e.refcount == u32::MAX {
                return Err(Error::corrupt(
                    "index tree",
                    e.pba * BLOCK_SIZE,
                    format!("tree root vbn {} live, to share", root.vbn),
                    format!("refcount {}", e.refcount),
                ));
            }
            self.incref(root.vbn);
        }
        Ok(())
    }

    /// First block at or after `from` that maps data, if any.
    pub(crate) fn first_data_at_or_after(&mut self, dev: &dyn Device, root: Root, from: u64) -> Result<Option<u64>> {
        self.first_matching(dev, root, from, |m| m.kind == MappingKind::Data)
    }

    /// First block at or after `from` whose mapping satisfies `want`.
    fn first_matching(
        &mut self,
        dev: &dyn Device,
        root: Root,
        from: u64,
        want: impl Fn(Mapping) -> bool,
    ) -> Result<Option<u64>> {
        if root.vbn == 0 {
            return Ok(None);
        }
        let mut found = None;
        self.scan(dev, root.vbn, root.height - 1, 0, from, &mut |b, m| {
            if want(m) {
                found = Some(b);
                false
            } else {
                true
            }
        })?;
        Ok(found)
    }

    /// Drop every mapping at or after block `from` (to holes), freeing what they referenced.
    pub(crate) fn truncate(&mut self, dev: &dyn Device, root: &mut Root, from: u64) -> Result<()> {
        let cap = root.capacity_blocks();
        while let Some(b) = self.first_mapped_at_or_after(dev, *root, from)? {
            let leaf_end = (((b >> FANOUT_BITS) + 1) << FANOUT_BITS).min(cap);
            self.set_range(dev, root, b, leaf_end - b, MappingKind::Hole, 0)?;
        }
        Ok(())
    }

    /// First block at or after `from` that is not a hole.
    fn first_mapped_at_or_after(&mut self, dev: &dyn Device, root: Root, from: u64) -> Result<Option<u64>> {
        self.first_matching(dev, root, from, |m| m.kind != MappingKind::Hole)
    }

    /// Visit leaf mappings at or after `from` in block order until `f` returns false.
    fn scan(
        &mut self,
        dev: &dyn Device,
        vbn: u64,
        level: u8,
        base: u64,
        from: u64,
        f: &mut dyn FnMut(u64, Mapping) -> bool,
    ) -> Result<bool> {
        self.load(dev, vbn)?;
        let span = 1u64 << (FANOUT_BITS * u32::from(level));
        for i in 0..FANOUT {
            let lo = base + i as u64 * span;
            if lo + span <= from {
                continue;
            }
            let s = self.node(vbn)[i];
            if level == 0 {
                if !f(lo, Mapping::from_slot(s)) {
                    return Ok(false);
                }
            } else if s.a != 0 && !self.scan(dev, s.a, level - 1, lo, from, f)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Drop the reference a volume holds on its tree.
    pub(crate) fn free_tree(&mut self, dev: &dyn Device, root: Root) -> Result<()> {
        if root.vbn != 0 {
            self.decref(dev, root.vbn, Some(root.height - 1))?;
        }
        Ok(())
    }

    /// Nodes to write at the next checkpoint, encoded.
    pub(crate) fn dirty_nodes(&self) -> Vec<(u64, Vec<u8>)> {
        self.dirty_nodes
            .iter()
            .map(|&vbn| {
                let mut buf = vec![0u8; BLOCK];
                crate::format::node::encode_page(self.node(vbn), &mut buf);
                (vbn, buf)
            })
            .collect()
    }

    /// Record where a dirty node was written; returns the block its previous copy occupied (0 if none).
    pub(crate) fn node_written(&mut self, vbn: u64, pba: u64, crc: u32) -> u64 {
        let mut e = self.bt.get(vbn);
        let old = e.pba;
        e.pba = pba;
        e.crc = crc;
        self.bt.set(vbn, e);
        self.dirty_nodes.remove(&vbn);
        old
    }

    /// Record that the cleaner copied block `vbn` (a data block or a clean node: same bytes, same checksum) to
    /// `pba`; returns the block it occupied.
    pub(crate) fn block_moved(&mut self, vbn: u64, pba: u64) -> u64 {
        debug_assert!(!self.dirty_nodes.contains(&vbn), "moving dirty vbn {vbn}");
        self.block_relocated(vbn, pba)
    }

    /// Point live vbn `vbn` (a data block, or a node, dirty or not: its written copy) at a copy of its block at
    /// `pba`, checksum unchanged; returns the block it occupied [I13].
    pub(crate) fn block_relocated(&mut self, vbn: u64, pba: u64) -> u64 {
        let mut e = self.bt.get(vbn);
        debug_assert!(e.refcount > 0 && e.pba != 0, "moving vbn {vbn}: {e:?}");
        let old = e.pba;
        e.pba = pba;
        self.bt.set(vbn, e);
        old
    }

    /// Drop from memory every clean node that no root in `keep` reaches through nodes in memory: they stay on disk
    /// and load again when used (a commit read, a diff). Called after a checkpoint with the heads' roots, so memory
    /// holds the live trees and what changed since, not every node a snapshot, scrub or diff ever loaded.
    pub(crate) fn evict_unreachable(&mut self, keep: &[Root]) {
        let mut reached: std::collections::HashSet<u64, std::hash::BuildHasherDefault<VbnHasher>> = Default::default();
        let mut stack: Vec<(u64, u8)> = keep.iter().filter(|r| r.vbn != 0).map(|r| (r.vbn, r.height - 1)).collect();
        while let Some((vbn, level)) = stack.pop() {
            if !reached.insert(vbn) || level == 0 {
                continue;
            }
            if let Some(node) = self.nodes.get(&vbn) {
                stack.extend(node.iter().filter(|s| s.a != 0).map(|s| (s.a, level - 1)));
            }
        }
        let dirty = &self.dirty_nodes;
        self.nodes.retain(|vbn, _| reached.contains(vbn) || dirty.contains(vbn));
    }

    pub(crate) fn dirty_node_count(&self) -> usize {
        self.dirty_nodes.len()
    }

    /// Bytes of memory the loaded nodes use.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.nodes.len() * (BLOCK + 32) + self.bt.memory_bytes()
    }

    /// Walk every distinct node reachable from `roots`, verifying checksums; returns references counted per vbn
    /// (from parents and roots) and the data blocks referenced.
    pub(crate) fn count_references(&mut self, dev: &dyn Device, roots: &[Root]) -> Result<HashMap<u64, u64>> {
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut stack: Vec<(u64, u8)> = Vec::new();
        for r in roots.iter().filter(|r| r.vbn != 0) {
            *refs.entry(r.vbn).or_default() += 1;
            stack.push((r.vbn, r.height - 1));
        }
        while let Some((vbn, level)) = stack.pop() {
            if !seen.insert(vbn) {
                continue;
            }
            self.load(dev, vbn)?;
            let page = self.node(vbn).to_owned();
            for s in page.iter() {
                if level == 0 {
                    let m = Mapping::from_slot(*s);
                    if (m.kind == MappingKind::Data) != (m.vbn != 0) {
                        return Err(Error::corrupt(
                            "index tree leaf",
                            self.bt.get(vbn).pba * BLOCK_SIZE,
                            "a data vbn exactly on data mappings",
                            format!("{m:?}"),
                        ));
                    }
                    if m.vbn != 0 {
                        *refs.entry(m.vbn).or_default() += 1;
                    }
                } else if s.a != 0 {
                    *refs.entry(s.a).or_default() += 1;
                    stack.push((s.a, level - 1));
                }
            }
        }
        Ok(refs)
    }
}

impl Index {
    /// vbns of every tree node reachable from `roots` (for integrity checks).
    pub(crate) fn node_vbns_for_check(&mut self, dev: &dyn Device, roots: &[Root]) -> Result<HashSet<u64>> {
        let mut seen = HashSet::new();
        let mut stack: Vec<(u64, u8)> = roots.iter().filter(|r| r.vbn != 0).map(|r| (r.vbn, r.height - 1)).collect();
        while let Some((vbn, level)) = stack.pop() {
            if !seen.insert(vbn) {
                continue;
            }
            if level > 0 {
                self.load(dev, vbn)?;
                stack.extend(self.node(vbn).iter().filter(|s| s.a != 0).map(|s| (s.a, level - 1)));
            }
        }
        Ok(seen)
    }

    /// True when node `vbn` waits for the next checkpoint.
    pub(crate) fn is_dirty(&self, vbn: u64) -> bool {
        self.dirty_nodes.contains(&vbn)
    }
}
