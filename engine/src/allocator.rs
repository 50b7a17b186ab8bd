//! Segment space: which segments are free, and how many live blocks each holds.
//!
//! A block is live while the current state references it: a data block or tree node through the block table, or a
//! block-table or directory page through the directory. A segment whose live count is zero becomes free only when a
//! checkpoint completes, because until then the previous checkpoint or the replay window may still need it [I4].

use std::collections::BTreeSet;

use crate::format::{BLOCK_SIZE, SEGMENT_AREA_OFFSET};

/// Segment geometry and usage.
#[derive(Debug)]
pub(crate) struct Segments {
    pub(crate) count: u64,
    pub(crate) blocks_per_segment: u64,
    /// log2 of `blocks_per_segment` (segment sizes are powers of two): a segment number is a shift away.
    segment_shift: u32,
    live: Vec<u32>,
    free: BTreeSet<u64>,
    /// When each segment was last taken by the log, counted in segments taken since the pool was opened (0: before
    /// that): the age that the cleaner's cost-benefit weighs. In memory only.
    taken_at: Vec<u64>,
    taken: u64,
    /// `taken_at` of the segment the log was writing when the last checkpoint completed: segments taken before it
    /// hold no record of the log tail that replay reads [I13]. 0 until the first checkpoint since the open.
    checkpoint_mark: u64,
}

impl Segments {
    pub(crate) fn new(count: u64, segment_size_bytes: u64, live: Vec<u32>) -> Self {
        assert_eq!(live.len() as u64, count, "segment usage table length");
        let blocks_per_segment = segment_size_bytes / BLOCK_SIZE;
        assert!(blocks_per_segment.is_power_of_two(), "segment of {blocks_per_segment} blocks");
        Self {
            count,
            blocks_per_segment,
            segment_shift: blocks_per_segment.trailing_zeros(),
            live,
            free: BTreeSet::new(),
            taken_at: vec![0; count as usize],
            taken: 0,
            checkpoint_mark: 0,
        }
    }

    /// Segments worth cleaning, best first, at most `max`: in use, not `pinned`, with at most `max_live` live blocks
    /// (and fewer than a full segment). `greedy` ranks by fewest live blocks (the most space per block copied, for a
    /// pool short of space); otherwise by cost-benefit, `(1 - u) * age / (1 + u)` (LFS): old, mostly dead segments
    /// first, since their remaining blocks are cold and will not die soon.
    pub(crate) fn victims(&self, excluded: impl Fn(u64) -> bool, max: usize, greedy: bool, max_live: u64) -> Vec<u64> {
        let bps = self.blocks_per_segment as f64;
        let mut c: Vec<(f64, u64)> = (0..self.count)
            .filter(|s| !self.free.contains(s) && !excluded(*s))
            .filter(|s| {
                let live = u64::from(self.live[*s as usize]);
                live < self.blocks_per_segment && live <= max_live
            })
            .map(|s| {
                let u = f64::from(self.live[s as usize]) / bps;
                let score = if greedy {
                    1.0 - u
                } else {
                    let age = (self.taken + 1 - self.taken_at[s as usize]) as f64;
                    (1.0 - u) * age / (1.0 + u)
                };
                (score, s)
            })
            .collect();
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        c.into_iter().take(max).map(|(_, s)| s).collect()
    }

    /// Blocks in segments in use that nothing references any more: space a cleaning would give back.
    pub(crate) fn dead_blocks(&self, pinned: &[u64]) -> u64 {
        (0..self.count)
            .filter(|s| !self.free.contains(s) && !pinned.contains(s))
            .map(|s| self.blocks_per_segment.saturating_sub(u64::from(self.live[s as usize])))
            .sum()
    }

    pub(crate) fn first_pba(&self, seg: u64) -> u64 {
        SEGMENT_AREA_OFFSET / BLOCK_SIZE + seg * self.blocks_per_segment
    }

    pub(crate) fn end_pba(&self, seg: u64) -> u64 {
        self.first_pba(seg) + self.blocks_per_segment
    }

    /// The segment holding physical block `pba`, if it lies in the segment area.
    pub(crate) fn segment_of(&self, pba: u64) -> Option<u64> {
        let first = SEGMENT_AREA_OFFSET / BLOCK_SIZE;
        if pba < first {
            return None;
        }
        let seg = (pba - first) >> self.segment_shift;
        (seg < self.count).then_some(seg)
    }

    fn seg(&self, pba: u64) -> usize {
        // Every pba the engine hands to accounting came from the log writer, inside the segment area.
        self.segment_of(pba).unwrap_or_else(|| panic!("pba {pba} outside the segment area")) as usize
    }

    pub(crate) fn add_live(&mut self, pba: u64) {
        let s = self.seg(pba);
        self.live[s] += 1;
        debug_assert!(!self.free.contains(&(s as u64)), "block allocated in a free segment");
    }

    pub(crate) fn release(&mut self, pba: u64) {
        let s = self.seg(pba);
        assert!(self.live[s] > 0, "segment {s} live count underflow releasing pba {pba}");
        self.live[s] -= 1;
    }

    pub(crate) fn live(&self) -> &[u32] {
        &self.live
    }

    /// Live blocks in all segments.
    pub(crate) fn live_total(&self) -> u64 {
        self.live.iter().map(|&n| u64::from(n)).sum()
    }

    /// When segment `seg` was last taken by the log (see `taken_at`): it changes whenever the segment is reused.
    pub(crate) fn taken_at(&self, seg: u64) -> u64 {
        self.taken_at[seg as usize]
    }

    pub(crate) fn is_free(&self, seg: u64) -> bool {
        self.free.contains(&seg)
    }

    pub(crate) fn free_count(&self) -> u64 {
        self.free.len() as u64
    }

    /// Add segments (empty, not free yet: the checkpoint that records them frees them) up to `count`.
    pub(crate) fn extend(&mut self, count: u64) {
        assert!(count >= self.count, "segments only grow");
        self.live.resize(count as usize, 0);
        self.taken_at.resize(count as usize, 0);
        self.count = count;
    }

    /// Take the lowest free segment.
    pub(crate) fn take_free(&mut self) -> Option<u64> {
        let s = self.free.pop_first()?;
        self.taken += 1;
        self.taken_at[s as usize] = self.taken;
        Some(s)
    }

    /// Note that a checkpoint completed while the log was writing segment `log_segment` [I13].
    pub(crate) fn set_checkpoint_mark(&mut self, log_segment: u64) {
        self.checkpoint_mark = self.taken_at[log_segment as usize];
    }

    /// Whether segment `seg` was filled before the last checkpoint: no record replay reads lies in it [I13].
    pub(crate) fn written_before_checkpoint(&self, seg: u64) -> bool {
        self.taken_at[seg as usize] < self.checkpoint_mark
    }

    /// Free segment `seg` now, outside a checkpoint: it holds no live block and nothing replay or the last
    /// checkpoint reads from it [I13]. The caller holds the reuse gate exclusively.
    pub(crate) fn free_moved(&mut self, seg: u64) {
        assert_eq!(self.live[seg as usize], 0, "freeing segment {seg} with live blocks");
        assert!(self.written_before_checkpoint(seg), "freeing segment {seg} of the log tail");
        self.free.insert(seg);
    }

    /// Segments with no live block that are not yet free: a checkpoint would free them.
    pub(crate) fn reclaimable_count(&self, pinned: &[u64]) -> u64 {
        (0..self.count).filter(|s| self.live[*s as usize] == 0 && !self.free.contains(s) && !pinned.contains(s)).count()
            as u64
    }

    /// Make every segment with no live block free, except the `pinned` ones [I4].
    pub(crate) fn rebuild_free(&mut self, pinned: &[u64]) {
        self.free = (0..self.count).filter(|s| self.live[*s as usize] == 0 && !pinned.contains(s)).collect();
    }
}
