//! Segment space: which segments are free, and how many live blocks each holds.
//!
//! A block is live while the current state references it: a data block or tree node through the block table, or a
//! block-table or directory page through the directory. A segment whose live count is zero becomes free only when a
//! checkpoint completes, because until then the previous checkpoint or the replay window may still need it [I4].

use std::collections::{BTreeMap, BTreeSet};

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
    /// Segments that moving passes emptied, each free once a sync covers its copies (the log records below the
    /// number kept with it) [I13]: counted as free space, never victims, but the log takes one only after that sync
    /// ([`Segments::take_free`] leaves them to the log's own fallback), so one sync frees many.
    moved: BTreeMap<u64, u64>,
    /// Segments whose last live block went since the last checkpoint (a moving pass's excepted): what the next
    /// checkpoint would free, about. Only a trigger for an early checkpoint (`State::maybe_checkpoint`), never
    /// relied on for space.
    emptied_since_checkpoint: u64,
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
            moved: BTreeMap::new(),
            emptied_since_checkpoint: 0,
        }
    }

    /// Segments worth cleaning, best first, at most `max`: in use, not `pinned`, with at most `max_live` live blocks
    /// (and fewer than a full segment). `greedy` ranks by fewest live blocks (the most space per block copied, for a
    /// pool short of space); otherwise by cost-benefit, `(1 - u) * age / (1 + u)` (LFS): old, mostly dead segments
    /// first, since their remaining blocks are cold and will not die soon.
    pub(crate) fn victims(&self, excluded: impl Fn(u64) -> bool, max: usize, greedy: bool, max_live: u64) -> Vec<u64> {
        let bps = self.blocks_per_segment as f64;
        let mut c: Vec<(f64, u64)> = (0..self.count)
            .filter(|s| !self.is_free(*s) && !excluded(*s))
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
            .filter(|s| !self.is_free(*s) && !pinned.contains(s))
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
        if self.live[s] == 0 {
            self.emptied_since_checkpoint += 1;
        }
    }

    /// Segments emptied since the last checkpoint, about (see `emptied_since_checkpoint`).
    pub(crate) fn emptied_since_checkpoint(&self) -> u64 {
        self.emptied_since_checkpoint
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

    /// Whether segment `seg` is free, or emptied by a moving pass and free after a sync (see `moved`).
    pub(crate) fn is_free(&self, seg: u64) -> bool {
        self.free.contains(&seg) || self.moved.contains_key(&seg)
    }

    /// Free segments, those free after a sync included (see `moved`).
    pub(crate) fn free_count(&self) -> u64 {
        (self.free.len() + self.moved.len()) as u64
    }

    /// Add segments (empty, not free yet: the checkpoint that records them frees them) up to `count`.
    pub(crate) fn extend(&mut self, count: u64) {
        assert!(count >= self.count, "segments only grow");
        self.live.resize(count as usize, 0);
        self.taken_at.resize(count as usize, 0);
        self.count = count;
    }

    /// Take the lowest free segment; `None` when only segments free after a sync are left ([`Segments::free_moved`]).
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

    /// Note that a moving pass emptied segment `seg`, its copies being records below `below`: it holds no live
    /// block and nothing replay or the last checkpoint reads from it, and is free once a sync covers those records
    /// [I13]. The caller holds the reuse gate exclusively, so no read of a block it held is still in flight [I4].
    pub(crate) fn mark_moved(&mut self, seg: u64, below: u64) {
        assert_eq!(self.live[seg as usize], 0, "segment {seg} emptied with live blocks");
        assert!(self.written_before_checkpoint(seg), "segment {seg} of the log tail emptied");
        assert!(!self.is_free(seg), "segment {seg} emptied while free");
        self.moved.insert(seg, below);
        // a sync frees it, not the next checkpoint
        self.emptied_since_checkpoint = self.emptied_since_checkpoint.saturating_sub(1);
    }

    /// Segments emptied by moving passes and free after a sync (see `moved`).
    pub(crate) fn moved_count(&self) -> u64 {
        self.moved.len() as u64
    }

    /// Whether the only free segments left are ones moving passes emptied: the log must sync before it writes into
    /// the next one [I13].
    pub(crate) fn only_moved_free(&self) -> bool {
        self.moved_count() > 0 && self.free_count() == self.moved_count()
    }

    /// A sync after every record below this one was written lets every emptied segment be free (see `moved`).
    pub(crate) fn moved_below(&self) -> u64 {
        self.moved.values().copied().max().unwrap_or(0)
    }

    /// Make the segments moving passes emptied free for the log where a sync completed after every record below
    /// `synced_below` was written, their copies included [I13]. Returns how many.
    pub(crate) fn free_moved(&mut self, synced_below: u64) -> u64 {
        let ready: Vec<u64> = self.moved.iter().filter(|(_, below)| **below <= synced_below).map(|(s, _)| *s).collect();
        for &seg in &ready {
            assert_eq!(self.live[seg as usize], 0, "freeing segment {seg} with live blocks");
            self.moved.remove(&seg);
            self.free.insert(seg);
        }
        ready.len() as u64
    }

    /// Segments with no live block that are not yet free: a checkpoint would free them.
    pub(crate) fn reclaimable_count(&self, pinned: &[u64]) -> u64 {
        (0..self.count).filter(|s| self.live[*s as usize] == 0 && !self.is_free(*s) && !pinned.contains(s)).count()
            as u64
    }

    /// Make every segment with no live block free, except the `pinned` ones (at create and open, where no
    /// checkpoint or replay window needs more) [I4].
    pub(crate) fn rebuild_free(&mut self, pinned: &[u64]) {
        self.free = (0..self.count).filter(|s| self.live[*s as usize] == 0 && !pinned.contains(s)).collect();
        self.emptied_since_checkpoint = 0;
        // the emptied segments are free now too (none is pinned: the log never writes into one)
        debug_assert!(self.moved.keys().all(|s| self.free.contains(s)), "an emptied segment stays in use");
        self.moved.clear();
    }

    /// The segments a checkpoint written now frees once it completes: those with no live block that are neither
    /// free nor the log's (`log_segments`, which the records after the checkpoint may fill) [I4]. Taken when the
    /// checkpoint record is written; the count of emptied segments starts again from there.
    pub(crate) fn checkpoint_frees(&mut self, log_segments: &[u64]) -> Vec<u64> {
        self.emptied_since_checkpoint = 0;
        (0..self.count)
            .filter(|s| self.live[*s as usize] == 0 && !self.is_free(*s) && !log_segments.contains(s))
            .collect()
    }

    /// The checkpoint that took `frees` ([`Segments::checkpoint_frees`]) completed: those still without a live block
    /// and not `pinned` are free [I4]. A segment emptied after the checkpoint record stays in use: that checkpoint
    /// still references its blocks, and the ops that released them may be lost in a crash.
    pub(crate) fn checkpoint_completed(&mut self, frees: &[u64], pinned: &[u64]) {
        for &s in frees {
            if self.live[s as usize] == 0 && !pinned.contains(&s) && !self.moved.contains_key(&s) {
                self.free.insert(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four segments of 8 blocks: 0 and 1 emptied by moving passes (records below 10 and 20), 2 free, 3 in use.
    fn segments() -> Segments {
        let mut s = Segments::new(4, 8 * BLOCK_SIZE, vec![0, 0, 0, 3]);
        s.taken_at = vec![0, 0, 0, 1];
        s.checkpoint_mark = 1; // segments 0..3 were filled before the last checkpoint
        s.free.insert(2);
        s.mark_moved(0, 10);
        s.mark_moved(1, 20);
        s
    }

    #[test]
    fn emptied_segments_count_as_free_but_are_taken_only_after_a_sync() {
        let mut s = segments();
        assert_eq!((s.free_count(), s.moved_count(), s.moved_below()), (3, 2, 20));
        assert!(s.is_free(0) && s.is_free(1) && s.is_free(2) && !s.is_free(3));
        assert!(s.victims(|_| false, 4, true, 8).iter().all(|v| *v == 3), "an emptied segment is no victim");
        assert_eq!(s.take_free(), Some(2));
        assert_eq!(s.take_free(), None, "the emptied ones wait for a sync");
        // a sync that covered the records below 15 frees segment 0 only
        assert_eq!(s.free_moved(15), 1);
        assert_eq!((s.moved_count(), s.moved_below()), (1, 20));
        assert_eq!(s.take_free(), Some(0));
        assert_eq!(s.free_moved(20), 1);
        assert_eq!(s.take_free(), Some(1));
        assert_eq!(s.free_count(), 0);
    }

    #[test]
    fn a_checkpoint_frees_the_emptied_segments() {
        let mut s = segments();
        s.rebuild_free(&[3]);
        assert_eq!((s.free_count(), s.moved_count()), (3, 0));
        assert_eq!(s.take_free(), Some(0));
    }

    #[test]
    fn a_checkpoint_frees_only_what_was_empty_when_its_record_was_written() {
        // segments 0..3 in use, 4 free; the log writes segment 3 and has reserved 4
        let mut s = Segments::new(6, 8 * BLOCK_SIZE, vec![0, 2, 1, 1, 0, 0]);
        s.free.insert(4);
        s.free.insert(5);
        assert_eq!(s.take_free(), Some(4), "the log's next segment");
        let frees = s.checkpoint_frees(&[3, 4]);
        assert_eq!(frees, [0], "only the empty segment outside the log and the free set");
        // after the record, while its sync runs: segment 2 empties, the log moves into 4 and takes 5
        s.release(s.first_pba(2));
        assert_eq!(s.take_free(), Some(5));
        s.checkpoint_completed(&frees, &[4, 5, 3]);
        assert!(s.is_free(0), "empty when the record was written");
        assert!(!s.is_free(2), "emptied after the record: the checkpoint still references its blocks");
        assert_eq!(s.free_count(), 1);
        // the next checkpoint (its record in segment 3, whose last block went meanwhile) frees it
        s.release(s.first_pba(3));
        let frees = s.checkpoint_frees(&[4, 5]);
        assert_eq!(frees, [2, 3]);
        s.checkpoint_completed(&frees, &[4, 5, 3]);
        assert!(s.is_free(2) && !s.is_free(3), "the checkpoint's own segment stays pinned");
    }

    #[test]
    #[should_panic(expected = "emptied with live blocks")]
    fn a_segment_with_live_blocks_is_not_emptied() {
        let mut s = segments();
        s.mark_moved(3, 30);
    }
}
