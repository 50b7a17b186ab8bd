//! `Pool::scrub`: read every block the pool references (data blocks and tree nodes) and verify its checksum against
//! the block-table entry [I6]; report each bad block with the volumes, commits and offsets that use it. Nothing is
//! repaired: a bad block stays bad (and keeps failing reads) until what uses it is rewritten or deleted.
//!
//! Blocks are read in batches without the pool lock (I/O goes on meanwhile), under the reuse gate, so a segment
//! cannot be freed and rewritten under a read [I4]. A block that fails is verified again under the lock before it is
//! reported: one that was moved, freed or is still in flight since it was listed is not a false alarm.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::dots::CommitId;
use crate::format::node::FANOUT_BITS;
use crate::format::{crc32, BLOCK, BLOCK_SIZE};
use crate::index::{Mapping, MappingKind, Root};
use crate::io::{read_blocks, Device};
use crate::pool::{Pool, State};
use crate::Result;

/// Blocks read per batch (between looks at the lock and progress reports).
pub const SCRUB_BATCH_BLOCKS: usize = 1024;
/// Most uses listed per bad block.
pub const MAX_SCRUB_USES_PER_BLOCK: usize = 64;

/// One block that failed its checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubProblem {
    /// Where it is on the device.
    pub device_offset_bytes: u64,
    /// Its virtual block number.
    pub vbn: u64,
    /// Checksum the block table expects.
    pub expected_crc: u32,
    /// Checksum the block has.
    pub found_crc: u32,
    /// Who uses it: `volume-or-commit @ offset` (for a tree node, the offset where the range it maps starts).
    pub used_by: Vec<String>,
}

/// What [`Pool::scrub`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Blocks read and verified.
    pub blocks_checked: u64,
    /// Blocks that failed their checksum.
    pub bad: Vec<ScrubProblem>,
}

impl ScrubReport {
    /// True when every block passed.
    pub fn is_ok(&self) -> bool {
        self.bad.is_empty()
    }
}

/// The names users know a dot's heads and commits by (`ns/dot.subdot (branch b)`, `ns/dot.subdot@commit`), by
/// volume or snapshot id (one id space).
fn dot_display_names(st: &State) -> HashMap<u64, String> {
    let mut names = HashMap::new();
    for d in st.dots.values() {
        for (branch, b) in &d.branches {
            for (subdot, vid) in &b.volumes {
                names.insert(*vid, format!("{}.{subdot} (branch {branch})", d.name));
            }
        }
        for (cid, c) in &d.commits {
            for (subdot, sid) in &c.snapshots {
                names.insert(*sid, format!("{}.{subdot}@{}", d.name, CommitId(*cid)));
            }
        }
    }
    names
}

impl Pool {
    /// Verify every referenced block; `progress(done, total)` is called after each batch. See the module docs.
    pub fn scrub(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ScrubReport> {
        let dev = &*self.inner.dev;
        // in disk order, so neighbouring blocks are read together
        let mut listed: Vec<(u64, u64, u32)> = {
            let st = self.inner.state.lock();
            st.check_open()?;
            st.index.bt.live_entries().filter(|(_, e)| e.pba != 0).map(|(vbn, e)| (e.pba, vbn, e.crc)).collect()
        };
        listed.sort_unstable();
        let total = listed.len() as u64;
        let mut report = ScrubReport::default();
        let mut suspects = Vec::new();
        // no larger than the first batch: a small pool's scrub does not zero a whole batch's buffer
        let mut bytes = vec![0u8; listed.len().min(SCRUB_BATCH_BLOCKS) * BLOCK];
        for batch in listed.chunks(SCRUB_BATCH_BLOCKS) {
            let pbas: Vec<u64> = batch.iter().map(|(pba, _, _)| *pba).collect();
            let bytes = &mut bytes[..batch.len() * BLOCK];
            {
                let _gate = self.inner.reuse_gate.read();
                read_blocks(dev, &pbas, bytes)?;
            }
            for (&(_, vbn, crc), block) in batch.iter().zip(bytes.chunks(BLOCK)) {
                if crc32(block) != crc {
                    suspects.push(vbn);
                }
            }
            report.blocks_checked += batch.len() as u64;
            progress(report.blocks_checked, total);
        }
        if suspects.is_empty() {
            return Ok(report);
        }
        let mut st = self.inner.state.lock();
        st.check_open()?;
        let mut buf = vec![0u8; BLOCK];
        let mut bad = BTreeMap::new();
        for vbn in suspects {
            let e = st.index.bt.get(vbn);
            if e.refcount == 0 || e.pba == 0 {
                continue; // freed since it was listed
            }
            if !st.log.read_buffered(e.pba, &mut buf) {
                dev.read_at(&mut buf, e.pba * BLOCK_SIZE)?;
            }
            let found = crc32(&buf);
            if found != e.crc {
                bad.insert(
                    vbn,
                    ScrubProblem {
                        device_offset_bytes: e.pba * BLOCK_SIZE,
                        vbn,
                        expected_crc: e.crc,
                        found_crc: found,
                        used_by: Vec::new(),
                    },
                );
            }
        }
        find_uses(dev, &mut st, &mut bad)?;
        report.bad = bad.into_values().collect();
        Ok(report)
    }
}

/// Fill in who uses each bad vbn, walking every volume and snapshot tree (only done when something is bad). A bad
/// node's subtree is not descended (it cannot be read).
fn find_uses(dev: &dyn Device, st: &mut State, bad: &mut BTreeMap<u64, ScrubProblem>) -> Result<()> {
    let targets: Vec<(u64, String, Root)> = st
        .volumes
        .iter()
        .map(|(id, v)| (*id, v.name.clone(), v.root))
        .chain(st.snapshots.iter().map(|(id, s)| (*id, s.name.clone(), s.root)))
        .collect();
    let bad_vbns: HashSet<u64> = bad.keys().copied().collect();
    let names = dot_display_names(st);
    for (id, name, root) in targets {
        if root.vbn == 0 {
            continue;
        }
        let shown = names.get(&id).cloned().unwrap_or(name);
        // (node vbn, level, first block it maps)
        let mut stack = vec![(root.vbn, root.height - 1, 0u64)];
        while let Some((vbn, level, first)) = stack.pop() {
            if bad_vbns.contains(&vbn) {
                note(bad, vbn, &shown, first);
                continue;
            }
            st.index.load(dev, vbn)?;
            let page = st.index.node(vbn).to_owned();
            for (i, s) in page.iter().enumerate() {
                let block = first + ((i as u64) << (FANOUT_BITS * u32::from(level)));
                if level == 0 {
                    let m = Mapping::from_slot(*s);
                    if m.kind == MappingKind::Data && bad_vbns.contains(&m.vbn) {
                        note(bad, m.vbn, &shown, block);
                    }
                } else if s.a != 0 {
                    stack.push((s.a, level - 1, block));
                }
            }
        }
    }
    Ok(())
}

fn note(bad: &mut BTreeMap<u64, ScrubProblem>, vbn: u64, who: &str, block: u64) {
    if let Some(p) = bad.get_mut(&vbn) {
        if p.used_by.len() < MAX_SCRUB_USES_PER_BLOCK {
            p.used_by.push(format!("{who} @ byte {}", block * BLOCK_SIZE));
        }
    }
}
