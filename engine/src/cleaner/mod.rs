//! The segment cleaner: gives back the space of segments whose blocks are mostly dead, by copying their live blocks to
//! the head of the log and letting the next checkpoint free them [I11].
//!
//! Every live block of the pool is named by a vbn (data blocks and tree nodes) or is a block-table or directory page,
//! so moving one changes exactly one entry: the vbn's block-table entry (its checksum stays), or the page's location.
//! No tree shared by snapshots is touched, whatever the number of commits. A pass:
//!
//! 1. picks victims ([`crate::allocator::Segments::victims`]: cost-benefit, or greedy when space is short), as many
//!    as the free space outside the checkpoint reserve can take in copies;
//! 2. finds their live vbns with one scan of the block table (in memory; kept for the other candidates, see
//!    [`ScanCache`]), skipping nodes that the checkpoint rewrites anyway, and copies them in `Nodes` records (blocks
//!    named by vbn), updating each entry and the live counts;
//! 3. marks the block-table and directory pages stored in the victims for rewriting;
//! 4. checkpoints: the new locations become durable with the superblock, and only then are the victims, now without
//!    live blocks, free.
//!
//! A crash before the superblock lands leaves the previous checkpoint, which still points into the victims; they
//! were not reused, and replay skips the copies (they are not batches).

pub mod background;

use std::collections::{HashMap, HashSet};

use crate::format::record::RecordKind;
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
/// Blocks of room a moving pass made for a write frees beyond what the write needs: one, so a pass takes a victim
/// or two. Cleaning just in time keeps the spare space in the segments in use, where it makes the next victims
/// emptier: uniform random overwrites at 80% copied 2.59 blocks per block written with 16 victims a pass, 2.16 with
/// one at a time (1 GiB pool; benches/RESULTS.md has the 2 GiB figures). The passes' fixed costs (a scan of the block
/// table, a sync) are what kept them large; the scan cache ([`ScanCache`]) takes most of the first away.
pub const CLEAN_AHEAD_BLOCKS: u64 = 1;

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

/// Live blocks that the last scan of the block table found in the candidate segments, `(pba, vbn)` by segment, with
/// each segment's `taken_at` at the time. A segment the log is not writing only loses blocks until it is freed and
/// taken again (which changes its `taken_at`), so a kept list still holds every block live there, and some that
/// died since (each is checked again when used). Passes that take a victim or two at a time thus scan the table once
/// in several passes, not once each. Bounded: one scan's candidates, at most [`MAX_CLEAN_SEGMENTS_PER_PASS`].
#[derive(Debug, Default)]
pub(crate) struct ScanCache {
    lists: HashMap<u64, (u64, Vec<(u64, u64)>)>,
}

/// What a pass cleans: its victim segments and the blocks it copies out of them, `(pba, vbn)`.
struct Plan {
    victims: Vec<u64>,
    moves: Vec<(u64, u64)>,
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
        // victims are chosen among the segments written before the current checkpoint [I13]
        self.complete_pending_checkpoint(dev, gate)?;
        let pinned = self.pinned();
        let max_live = (self.segs.blocks_per_segment as f64 * max_utilization) as u64;
        let candidates = self.segs.victims(|s| pinned.contains(&s), MAX_CLEAN_SEGMENTS_PER_PASS, greedy, max_live);
        if candidates.is_empty() {
            return Ok(CleanStats::default());
        }
        // nodes the checkpoint rewrites anyway are not copied
        let Some(Plan { victims, mut moves }) = self.plan(candidates, u64::MAX, |st, vbn| !st.index.is_dirty(vbn))
        else {
            return Ok(CleanStats::default());
        };
        let mut is_victim = vec![false; self.segs.count as usize];
        for &s in &victims {
            is_victim[s as usize] = true;
        }
        let segs = &self.segs;
        let moving = |pba: u64| segs.segment_of(pba).is_some_and(|s| is_victim[s as usize]);
        moves.sort_unstable();
        self.index.bt.rewrite_pages_in(moving);
        let mut stats = CleanStats { passes: 1, segments_freed: 0, blocks_moved: 0 };
        stats.blocks_moved =
            self.copy_blocks(dev, RecordKind::Nodes, &moves, |st, vbn, pba| st.index.block_moved(vbn, pba))?;
        self.checkpoint(dev, gate)?;
        self.counters.clean_passes += 1;
        self.counters.cleaned_blocks += stats.blocks_moved;
        stats.segments_freed = victims.iter().filter(|s| self.segs.is_free(**s)).count() as u64;
        Ok(stats)
    }

    /// One moving pass [I13]: like [`State::clean_pass`], but without a checkpoint. Victims are only segments filled
    /// before the last checkpoint that hold no table or directory page (the last checkpoint and replay read
    /// nothing else from them); every live vbn stored in them, dirty nodes' written copies included, is copied
    /// into `Moved` records, which replay applies before the log's ops. The victims are then emptied: free space,
    /// which the log writes over only after a sync covers the records (a flush's, a checkpoint's, the background
    /// cleaner's, or its own when it finds no other free segment). A pass costs its copies, not a checkpoint's
    /// metadata nor a sync of its own: one sync serves many passes (under sustained 4 KiB overwrites at 80%, a sync
    /// per pass held the pool lock for a third of the time). It takes victims until they free `want_blocks` (at
    /// least one victim).
    pub(crate) fn move_pass(
        &mut self,
        dev: &dyn Device,
        gate: &RwLock<()>,
        max_utilization: f64,
        want_blocks: u64,
    ) -> Result<CleanStats> {
        self.check_writable()?;
        // blocks move only out of segments written before the current checkpoint [I13]
        self.complete_pending_checkpoint(dev, gate)?;
        let mut excluded: Vec<bool> = (0..self.segs.count).map(|s| !self.segs.written_before_checkpoint(s)).collect();
        for s in self.pinned() {
            excluded[s as usize] = true;
        }
        for pba in self.index.bt.own_blocks() {
            if let Some(s) = self.segs.segment_of(pba) {
                excluded[s as usize] = true;
            }
        }
        let max_live = (self.segs.blocks_per_segment as f64 * max_utilization) as u64;
        let candidates = self.segs.victims(|s| excluded[s as usize], MAX_CLEAN_SEGMENTS_PER_PASS, true, max_live);
        if candidates.is_empty() {
            return Ok(CleanStats::default());
        }
        // every live vbn in a victim is moved, dirty nodes' written copies too [I13]
        let Some(Plan { victims, mut moves }) = self.plan(candidates, want_blocks, |_, _| true) else {
            return Ok(CleanStats::default());
        };
        moves.sort_unstable();
        match self.move_steps(dev, gate, &moves, &victims) {
            Ok(stats) => Ok(stats),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn move_steps(
        &mut self,
        dev: &dyn Device,
        gate: &RwLock<()>,
        moves: &[(u64, u64)],
        victims: &[u64],
    ) -> Result<CleanStats> {
        let mut stats = CleanStats { passes: 1, segments_freed: 0, blocks_moved: 0 };
        // every live vbn, dirty nodes' written copies too [I13]
        stats.blocks_moved =
            self.copy_blocks(dev, RecordKind::Moved, moves, |st, vbn, pba| st.index.block_relocated(vbn, pba))?;
        // The victims are free once the moves are durable [I13]: the log writes into one only after a sync that
        // covers the moves, its own or a flush's or a checkpoint's, so one sync serves many passes. Taking the gate
        // now waits out any read of a block's old copy that is still in flight [I4].
        let below = self.log.next_seq();
        {
            let _exclusive = gate.write();
            for &s in victims {
                if self.segs.live()[s as usize] == 0 {
                    self.segs.mark_moved(s, below);
                    stats.segments_freed += 1;
                }
            }
        }
        self.counters.clean_passes += 1;
        self.counters.moving_passes += 1;
        self.counters.cleaned_blocks += stats.blocks_moved;
        Ok(stats)
    }

    /// Copy the blocks `moves` (`(pba, vbn)`, sorted) to the log head in records of `kind`, pointing each vbn at its
    /// copy with `relocate` (which returns the block it left); returns the blocks copied. With nothing in flight,
    /// every block is read from the device, runs of neighbours in one read each. Blocks are copied as they are: one
    /// that fails its checksum keeps failing it (the entry's checksum is kept), so corruption stays visible to reads
    /// and scrub instead of being laundered.
    fn copy_blocks(
        &mut self,
        dev: &dyn Device,
        kind: RecordKind,
        moves: &[(u64, u64)],
        relocate: impl Fn(&mut State, u64, u64) -> u64,
    ) -> Result<u64> {
        self.log.seal()?;
        self.log.drain()?;
        let per_record = self.per_record_blocks() as usize;
        // one buffer for every record of the pass: read into, written from, never copied between
        let mut payload = vec![0u8; moves.len().min(per_record) * BLOCK];
        let (mut pbas, mut vbns) = (Vec::with_capacity(per_record), Vec::with_capacity(per_record));
        for chunk in moves.chunks(per_record) {
            pbas.clear();
            vbns.clear();
            for &(pba, vbn) in chunk {
                pbas.push(pba);
                vbns.push(vbn);
            }
            let bytes = &mut payload[..chunk.len() * BLOCK];
            read_blocks(dev, &pbas, bytes)?;
            // the entries keep their checksums: no crc to compute for the copies
            self.write_record(dev, kind, &vbns, bytes, false, |st, vbn, loc| relocate(st, vbn, loc.pba))?;
        }
        Ok(moves.len() as u64)
    }

    /// Moving passes, each freeing about `want_blocks`, until `enough` holds or nothing more can be cleaned (see
    /// [`State::passes_until`]).
    pub(crate) fn move_until(
        &mut self,
        dev: &dyn Device,
        gate: &RwLock<()>,
        max_utilization: f64,
        want_blocks: u64,
        enough: impl Fn(&State) -> bool,
    ) -> Result<CleanStats> {
        self.passes_until(enough, |st| st.move_pass(dev, gate, max_utilization, want_blocks))
    }

    /// Which of `candidates` (best first) a pass takes, and the blocks it copies, `(pba, vbn)`: the live vbns stored
    /// in them (those `copy` accepts) come from the scan cache or one scan of the block table
    /// ([`State::live_blocks_in`]); the candidates are taken in order while
    /// the copies, their record headers, a checkpoint of everything then dirty (twice: the pages the checkpoint's
    /// own writes dirty) and a slack still fit in the free blocks, the checkpoint reserve included (it is kept for
    /// that checkpoint), until the victims taken free `want_blocks`. `None` when none fits.
    fn plan(&mut self, candidates: Vec<u64>, want_blocks: u64, copy: impl Fn(&State, u64) -> bool) -> Option<Plan> {
        let free = self.log.free_blocks(&self.segs);
        let per_record = self.per_record_blocks();
        let already_dirty = self.dirty_metadata_blocks();
        let slack = CLEAN_SLACK_SEGMENTS * self.segs.blocks_per_segment;
        let mut new_pages: HashSet<u64> = HashSet::new();
        let mut victims = Vec::new();
        let mut moves: Vec<(u64, u64)> = Vec::new();
        let mut freed_blocks = 0u64;
        for &s in &candidates {
            if freed_blocks >= want_blocks {
                break;
            }
            let blocks = self.live_blocks_in(s, &candidates, &copy);
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
            freed_blocks += self.segs.blocks_per_segment.saturating_sub(blocks.len() as u64);
            moves.extend(blocks);
            victims.push(s);
        }
        for s in &victims {
            self.scan_cache.lists.remove(s);
        }
        (!victims.is_empty()).then_some(Plan { victims, moves })
    }

    /// The live blocks of candidate segment `seg` that `copy` accepts, `(pba, vbn)`: from the scan cache when it
    /// holds a list of the segment as it is now, else from a new scan of the block table for every candidate
    /// ([`ScanCache`]).
    fn live_blocks_in(&mut self, seg: u64, candidates: &[u64], copy: &impl Fn(&State, u64) -> bool) -> Vec<(u64, u64)> {
        let current = |st: &State, s: u64| st.scan_cache.lists.get(&s).is_some_and(|(t, _)| *t == st.segs.taken_at(s));
        if !current(self, seg) {
            let mut is_candidate = vec![false; self.segs.count as usize];
            for &s in candidates {
                is_candidate[s as usize] = true;
            }
            let mut found: HashMap<u64, (u64, Vec<(u64, u64)>)> =
                candidates.iter().map(|&s| (s, (self.segs.taken_at(s), Vec::new()))).collect();
            let segs = &self.segs;
            self.index.bt.for_each_live(|vbn, pba| {
                // (a node not written yet has pba 0, outside every segment)
                if let Some(s) = segs.segment_of(pba).filter(|s| is_candidate[*s as usize]) {
                    if let Some((_, list)) = found.get_mut(&s) {
                        list.push((pba, vbn));
                    }
                }
            });
            self.scan_cache.lists = found;
        }
        let Some((_, list)) = self.scan_cache.lists.get(&seg) else { return Vec::new() };
        list.iter()
            .copied()
            .filter(|&(pba, vbn)| {
                let e = self.index.bt.get(vbn);
                e.refcount > 0 && e.pba == pba && copy(self, vbn)
            })
            .collect()
    }

    /// Passes ending in a checkpoint until `enough` holds or nothing more can be cleaned (see
    /// [`State::passes_until`]).
    pub(crate) fn clean_until(
        &mut self,
        dev: &dyn Device,
        gate: &RwLock<()>,
        greedy: bool,
        max_utilization: f64,
        enough: impl Fn(&State) -> bool,
    ) -> Result<CleanStats> {
        self.passes_until(enough, |st| st.clean_pass(dev, gate, greedy, max_utilization))
    }

    /// Run `pass` until `enough` holds, at most [`MAX_CLEAN_PASSES`] times. A pass that gave back no more segments
    /// than its copies (and checkpoint) took ends the cleaning: what is left is the garbage cleaning itself makes
    /// (old block-table pages), not worth another pass.
    fn passes_until(
        &mut self,
        enough: impl Fn(&State) -> bool,
        mut pass: impl FnMut(&mut State) -> Result<CleanStats>,
    ) -> Result<CleanStats> {
        let mut total = CleanStats::default();
        for _ in 0..MAX_CLEAN_PASSES {
            if enough(self) {
                break;
            }
            let free_before = self.segs.free_count();
            let stats = pass(self)?;
            total.add(stats);
            if stats.segments_freed == 0 || self.segs.free_count() <= free_before {
                break;
            }
        }
        Ok(total)
    }
}

impl Pool {
    /// Clean every segment that is at most [`CLEAN_MAX_UTILIZATION`] live, in passes of up to
    /// [`MAX_CLEAN_SEGMENTS_PER_PASS`] segments: after one checkpoint, moving passes (their copies made durable by
    /// one sync, invariant I13), then passes ending with a checkpoint for the segments that hold block-table pages. Space freed by
    /// deletions, trims and overwrites comes back to the free pool. The pool also cleans by itself when free
    /// segments run low.
    pub fn clean(&self) -> Result<CleanStats> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_writable()?;
        let gate = &self.inner.reuse_gate;
        // a checkpoint first: segments that are already empty are freed without copying anything, and every
        // segment written before it may have its blocks moved
        st.checkpoint(dev, gate)?;
        // moving passes (a sync each), then passes ending in a checkpoint for segments that hold table pages
        let mut stats = st.move_until(dev, gate, CLEAN_MAX_UTILIZATION, u64::MAX, |_| false)?;
        stats.add(st.clean_until(dev, gate, false, CLEAN_MAX_UTILIZATION, |_| false)?);
        Ok(stats)
    }
}
