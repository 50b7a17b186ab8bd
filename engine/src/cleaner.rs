//! The segment cleaner: gives back the space of segments whose blocks are mostly dead, by copying their live blocks to
//! the head of the log and letting the next checkpoint free them [I11].
//!
//! Every live block of the pool is named by a vbn (data blocks and tree nodes) or is a block-table or directory page,
//! so moving one changes exactly one entry: the vbn's block-table entry (its checksum stays), or the page's location.
//! No tree shared by snapshots is touched, whatever the number of commits. A pass:
//!
//! 1. picks victims ([`Segments::victims`]: cost-benefit, or greedy when space is short), as many as the free space
//!    outside the checkpoint reserve can take in copies;
//! 2. finds their live vbns with one scan of the block table (in memory), skipping nodes that the checkpoint rewrites
//!    anyway, and copies them in `Nodes` records (blocks named by vbn), updating each entry and the live counts;
//! 3. marks the block-table and directory pages stored in the victims for rewriting;
//! 4. checkpoints: the new locations become durable with the superblock, and only then are the victims, now without
//!    live blocks, free.
//!
//! A crash before the superblock lands leaves the previous checkpoint, which still points into the victims; they
//! were not reused, and replay skips the copies (they are not batches).

use std::collections::{HashMap, HashSet};

use crate::allocator::Segments;
use crate::format::record::{RecordKind, BODY_CAPACITY_BYTES};
use crate::format::BLOCK;
use crate::io::{read_blocks, Device};
use crate::pool::{Pool, State};
use crate::Result;
use parking_lot::RwLock;

/// Most segments one pass cleans: bounds the copying done under the pool lock in one checkpoint.
pub const MAX_CLEAN_SEGMENTS_PER_PASS: usize = 16;
/// `Pool::clean` takes segments up to this share of live blocks (cleaning fuller ones costs more than it gives).
pub const CLEAN_MAX_UTILIZATION: f64 = 0.9;
/// Background cleaning (at checkpoints, when free segments run low) takes segments up to this share of live blocks.
pub const AUTO_CLEAN_MAX_UTILIZATION: f64 = 0.8;
/// Segments of slack a pass leaves free beyond what its copies and checkpoint need (a record that does not fit the
/// rest of a segment moves to the next, and the checkpoint record itself).
const CLEAN_SLACK_SEGMENTS: u64 = 3;
/// Most passes one call makes (each pass is one checkpoint).
pub const MAX_CLEAN_PASSES: usize = 1024;

/// What cleaning did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanStats {
    /// Passes run (one checkpoint each).
    pub passes: u64,
    /// Segments emptied and freed.
    pub segments_freed: u64,
    /// Live blocks copied to the log head.
    pub blocks_moved: u64,
}

impl CleanStats {
    fn add(&mut self, o: CleanStats) {
        self.passes += o.passes;
        self.segments_freed += o.segments_freed;
        self.blocks_moved += o.blocks_moved;
    }
}

impl State {
    /// One cleaning pass (see the module documentation). Returns zero stats when nothing is worth cleaning or no
    /// victim's copies fit in the free space.
    pub(crate) fn clean_pass(
        &mut self,
        dev: &dyn Device,
        gate: &RwLock<()>,
        greedy: bool,
        max_utilization: f64,
    ) -> Result<CleanStats> {
        self.check_writable()?;
        let pinned = self.pinned();
        let max_live = (self.segs.blocks_per_segment as f64 * max_utilization) as u64;
        let candidates = self.segs.victims(&pinned, MAX_CLEAN_SEGMENTS_PER_PASS, greedy, max_live);
        if candidates.is_empty() {
            return Ok(CleanStats::default());
        }
        let mut is_candidate = vec![false; self.segs.count as usize];
        for &s in &candidates {
            is_candidate[s as usize] = true;
        }
        // One scan of the block table: the live vbns stored in each candidate (nodes the checkpoint rewrites
        // anyway excepted), with their blocks.
        let mut found: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        for (vbn, e) in self.index.bt.live_entries() {
            // (a node not written yet has pba 0, outside every segment)
            let Some(seg) = self.segs.segment_of(e.pba).filter(|s| is_candidate[*s as usize]) else { continue };
            if !self.index.is_dirty(vbn) {
                found.entry(seg).or_default().push((e.pba, vbn));
            }
        }
        // What fits: the copies, the table pages they dirty and everything the checkpoint writes must fit in the
        // free blocks (the checkpoint reserve included: the checkpoint that ends the pass is what it is kept for).
        let free = self.log.free_blocks(&self.segs);
        let per_record = per_record_blocks(&self.segs);
        let already_dirty = (self.index.dirty_node_count() + self.index.bt.dirty_page_count()) as u64;
        let slack = CLEAN_SLACK_SEGMENTS * self.segs.blocks_per_segment;
        let mut new_pages: HashSet<u64> = HashSet::new();
        let mut victims = Vec::new();
        let mut moves: Vec<(u64, u64)> = Vec::new();
        for s in candidates {
            let blocks = found.remove(&s).unwrap_or_default();
            let pages: HashSet<u64> = blocks
                .iter()
                .map(|(_, vbn)| vbn >> crate::format::node::FANOUT_BITS)
                .filter(|p| !self.index.bt.is_page_dirty(*p) && !new_pages.contains(p))
                .collect();
            let copies = (moves.len() + blocks.len()) as u64;
            let dirty = already_dirty + (new_pages.len() + pages.len()) as u64;
            let need = copies + copies.div_ceil(per_record) + 2 * dirty + slack;
            if need > free {
                continue;
            }
            new_pages.extend(pages);
            moves.extend(blocks);
            victims.push(s);
        }
        if victims.is_empty() {
            return Ok(CleanStats::default());
        }
        let mut is_victim = vec![false; self.segs.count as usize];
        for &s in &victims {
            is_victim[s as usize] = true;
        }
        let segs = &self.segs;
        let moving = |pba: u64| segs.segment_of(pba).is_some_and(|s| is_victim[s as usize]);
        moves.sort_unstable();
        self.index.bt.rewrite_pages_in(moving);
        // With nothing in flight, every block is read from the device, runs of neighbours in one read each.
        self.log.seal()?;
        self.log.drain()?;
        let mut stats = CleanStats { passes: 1, segments_freed: 0, blocks_moved: 0 };
        for chunk in moves.chunks(per_record as usize) {
            let pbas: Vec<u64> = chunk.iter().map(|(pba, _)| *pba).collect();
            let mut bytes = vec![0u8; chunk.len() * BLOCK];
            read_blocks(dev, &pbas, &mut bytes)?;
            // Copied as they are: a block that fails its checksum keeps failing it (the entry's checksum is kept),
            // so corruption stays visible to reads and scrub instead of being laundered.
            let blocks: Vec<(u64, Vec<u8>)> =
                chunk.iter().zip(bytes.chunks(BLOCK)).map(|((_, vbn), b)| (*vbn, b.to_vec())).collect();
            self.write_pages(dev, RecordKind::Nodes, blocks, |st, vbn, loc| st.index.block_moved(vbn, loc.pba))?;
            stats.blocks_moved += chunk.len() as u64;
        }
        self.checkpoint(dev, gate)?;
        self.counters.clean_passes += 1;
        self.counters.cleaned_blocks += stats.blocks_moved;
        stats.segments_freed = victims.iter().filter(|s| self.segs.is_free(**s)).count() as u64;
        Ok(stats)
    }

    /// Clean until `enough` holds or nothing more can be cleaned (at most [`MAX_CLEAN_PASSES`] passes).
    pub(crate) fn clean_until(
        &mut self,
        dev: &dyn Device,
        gate: &RwLock<()>,
        greedy: bool,
        max_utilization: f64,
        enough: impl Fn(&State) -> bool,
    ) -> Result<CleanStats> {
        let mut total = CleanStats::default();
        for _ in 0..MAX_CLEAN_PASSES {
            if enough(self) {
                break;
            }
            let free_before = self.segs.free_count();
            let pass = self.clean_pass(dev, gate, greedy, max_utilization)?;
            total.add(pass);
            // A pass that gave back no more segments than its copies and checkpoint took ends the cleaning: what
            // is left is the garbage cleaning itself makes (old block-table pages), not worth another pass.
            if pass.segments_freed == 0 || self.segs.free_count() <= free_before {
                break;
            }
        }
        Ok(total)
    }
}

/// Blocks per copy record: as many vbns as the record body lists, and what fits in a segment.
fn per_record_blocks(segs: &Segments) -> u64 {
    ((BODY_CAPACITY_BYTES / 8) as u64).min(segs.blocks_per_segment - 1)
}

impl Pool {
    /// Clean every segment that is at most [`CLEAN_MAX_UTILIZATION`] live, in passes of up to
    /// [`MAX_CLEAN_SEGMENTS_PER_PASS`] segments, each ending with a checkpoint. Space freed by deletions, trims and
    /// overwrites comes back to the free pool. The pool also cleans by itself when free segments run low.
    pub fn clean(&self) -> Result<CleanStats> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        // a checkpoint first: segments that are already empty are freed without copying anything
        st.checkpoint(dev, &self.inner.reuse_gate)?;
        st.clean_until(dev, &self.inner.reuse_gate, false, CLEAN_MAX_UTILIZATION, |_| false)
    }
}
