//! `Pool::check`: an integrity check that recomputes what the engine keeps incrementally and compares.
//!
//! It walks every volume tree (verifying each node's checksum), counts references per vbn and compares them with the
//! block table's refcounts [I8], recounts live blocks per segment and compares with the usage table [I4], makes sure
//! no free segment holds a live block, and reads every data block to verify its checksum.

use std::collections::HashMap;

use crate::format::{crc32, BLOCK, BLOCK_SIZE};
use crate::index::Root;
use crate::pool::Pool;
use crate::Result;

/// What [`Pool::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Volumes checked.
    pub volumes: u64,
    /// Distinct tree nodes walked.
    pub nodes: u64,
    /// Distinct data blocks verified.
    pub data_blocks: u64,
    /// Every inconsistency, in words; empty when the pool is sound.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Pool {
    /// Check the pool's integrity; see the module docs of `check` for what is verified. I/O errors end the check;
    /// inconsistencies are listed in the report.
    pub fn check(&self) -> Result<CheckReport> {
        let dev = &*self.inner.dev;
        let mut st = self.inner.state.lock();
        st.check_open()?;
        let mut report = CheckReport { volumes: st.volumes.len() as u64, ..CheckReport::default() };
        let roots: Vec<Root> =
            st.volumes.values().map(|v| v.root).chain(st.snapshots.values().map(|s| s.root)).collect();
        for v in st.volumes.values() {
            let need = v.size_bytes.div_ceil(BLOCK_SIZE);
            if v.root.capacity_blocks() < need {
                report.problems.push(format!(
                    "volume {:?}: tree of height {} maps {} blocks, the volume has {need}",
                    v.name,
                    v.root.height,
                    v.root.capacity_blocks()
                ));
            }
        }
        let refs = match st.index.count_references(dev, &roots) {
            Ok(r) => r,
            Err(e) if e.is_corruption() => {
                report.problems.push(format!("index tree unreadable: {e}"));
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let entries: Vec<(u64, crate::index::BtEntry)> = st.index.bt.live_entries().collect();
        let mut live_per_segment: HashMap<u64, u64> = HashMap::new();
        let mut count_block = |pba: u64, what: String, report: &mut CheckReport| match st.segs.segment_of(pba) {
            Some(seg) => *live_per_segment.entry(seg).or_default() += 1,
            None => report.problems.push(format!("{what} at block {pba}, outside the segment area")),
        };
        let mut data = Vec::new();
        for (vbn, e) in &entries {
            let counted = refs.get(vbn).copied().unwrap_or(0);
            if counted != u64::from(e.refcount) {
                report
                    .problems
                    .push(format!("vbn {vbn}: refcount {} in the block table, {counted} references", e.refcount));
            }
            if e.pba != 0 {
                count_block(e.pba, format!("vbn {vbn}"), &mut report);
            }
        }
        for vbn in refs.keys() {
            if st.index.bt.get(*vbn).refcount == 0 {
                report.problems.push(format!("vbn {vbn} is referenced but free in the block table"));
            }
        }
        for pba in st.index.bt.own_blocks().collect::<Vec<_>>() {
            count_block(pba, "block-table page".into(), &mut report);
        }
        // Data blocks: leaves reference them; nodes are the vbns referenced from inner nodes and roots.
        let node_vbns: std::collections::HashSet<u64> = st.index.node_vbns_for_check(dev, &roots)?;
        report.nodes = node_vbns.len() as u64;
        for (vbn, e) in &entries {
            if !node_vbns.contains(vbn) {
                data.push((*vbn, *e));
            } else if e.pba == 0 && !st.index.is_dirty(*vbn) {
                report.problems.push(format!("node vbn {vbn} has no location and is not waiting for a checkpoint"));
            }
        }
        for (seg, &live) in st.segs.live().iter().enumerate() {
            let seg = seg as u64;
            let counted = live_per_segment.get(&seg).copied().unwrap_or(0);
            if counted != u64::from(live) {
                report.problems.push(format!("segment {seg}: {live} live blocks recorded, {counted} counted"));
            }
            if counted > 0 && st.segs.is_free(seg) {
                report.problems.push(format!("segment {seg} is free but holds {counted} live blocks"));
            }
        }
        let mut buf = vec![0u8; BLOCK];
        for (vbn, e) in data {
            report.data_blocks += 1;
            if e.pba == 0 {
                report.problems.push(format!("data vbn {vbn} has no location"));
                continue;
            }
            if !st.log.read_buffered(e.pba, &mut buf) {
                dev.read_at(&mut buf, e.pba * BLOCK_SIZE)?;
            }
            let crc = crc32(&buf);
            if crc != e.crc {
                report.problems.push(format!(
                    "data vbn {vbn} at device offset {}: crc32 {crc:#010x}, expected {:#010x}",
                    e.pba * BLOCK_SIZE,
                    e.crc
                ));
            }
        }
        drop(st);
        Ok(report)
    }
}
