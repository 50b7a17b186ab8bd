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
    live: Vec<u32>,
    free: BTreeSet<u64>,
}

impl Segments {
    pub(crate) fn new(count: u64, segment_size_bytes: u64, live: Vec<u32>) -> Self {
        assert_eq!(live.len() as u64, count, "segment usage table length");
        Self { count, blocks_per_segment: segment_size_bytes / BLOCK_SIZE, live, free: BTreeSet::new() }
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
        let seg = (pba - first) / self.blocks_per_segment;
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

    pub(crate) fn is_free(&self, seg: u64) -> bool {
        self.free.contains(&seg)
    }

    pub(crate) fn free_count(&self) -> u64 {
        self.free.len() as u64
    }

    /// Take the lowest free segment.
    pub(crate) fn take_free(&mut self) -> Option<u64> {
        self.free.pop_first()
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
