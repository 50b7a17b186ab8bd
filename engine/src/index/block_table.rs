//! The block table: vbn -> (physical block, crc32, refcount), paged in blocks of 256 entries, with a directory of
//! page locations paged the same way; the directory's own page list is stored in the checkpoint [I5].

use std::collections::BTreeSet;

use crate::format::checkpoint::PageLoc;
use crate::format::node::{decode_page, Page, Slot, FANOUT, FANOUT_BITS};
use crate::format::{crc32, BLOCK, BLOCK_SIZE};
use crate::io::Device;
use crate::{Error, Result};

/// One block-table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BtEntry {
    /// Physical block (4 KiB units from the device start); 0 = not written yet (a node born since the last
    /// checkpoint) or free.
    pub(crate) pba: u64,
    /// CRC-32 of the block's 4096 bytes.
    pub(crate) crc: u32,
    /// References from tree entries, inner nodes and volume roots; 0 = free.
    pub(crate) refcount: u32,
}

impl BtEntry {
    fn to_slot(self) -> Slot {
        Slot { a: self.pba, b: u64::from(self.crc) | (u64::from(self.refcount) << 32) }
    }
    fn from_slot(s: Slot) -> Self {
        Self { pba: s.a, crc: s.b as u32, refcount: (s.b >> 32) as u32 }
    }
}

/// The block table in memory, with what must be written at the next checkpoint.
#[derive(Debug, Default)]
pub(crate) struct BlockTable {
    /// Table pages by page number; `None` = all entries free.
    pages: Vec<Option<Box<Page>>>,
    /// Where each table page lives on disk (the contents of the directory pages).
    page_locs: Vec<PageLoc>,
    /// Table pages changed since the last checkpoint.
    dirty_pages: PageSet,
    /// Where each directory page lives on disk (stored in the checkpoint).
    dir_locs: Vec<PageLoc>,
    /// Directory pages changed since the last checkpoint.
    dirty_dirs: BTreeSet<u64>,
    /// Pages of dropped (all-free) table pages kept for reuse, at most [`SPARE_PAGES`].
    spare: Vec<Box<Page>>,
}

/// A set of table page numbers, one bit each: every block-table change marks its page dirty, so this is on the
/// path of every write (an ordered tree set took a tenth of the time of writes under rolling commits). Page numbers
/// are dense (vbns / 256), so the bits take a 32,768th of the table's own memory.
#[derive(Debug, Default)]
struct PageSet {
    words: Vec<u64>,
    len: usize,
}

impl PageSet {
    fn insert(&mut self, page: u64) {
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & bit == 0 {
            self.words[w] |= bit;
            self.len += 1;
        }
    }

    fn remove(&mut self, page: u64) {
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if let Some(word) = self.words.get_mut(w) {
            if *word & bit != 0 {
                *word &= !bit;
                self.len -= 1;
            }
        }
    }

    fn contains(&self, page: u64) -> bool {
        self.words.get((page / 64) as usize).is_some_and(|w| w & (1u64 << (page % 64)) != 0)
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The pages, in ascending order.
    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut rest = w;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let b = rest.trailing_zeros();
                rest &= rest - 1;
                Some(i as u64 * 64 + u64::from(b))
            })
        })
    }
}

/// Dropped table pages kept for the next new ones: once the free vbns run out, new blocks take vbns above every one
/// in use, on new pages, and reusing memory that is already mapped spares a page fault per 256 blocks written.
const SPARE_PAGES: usize = 1024;

fn read_page(dev: &dyn Device, loc: PageLoc, what: &'static str) -> Result<Box<Page>> {
    let mut buf = vec![0u8; BLOCK];
    // A page address from a damaged (or crafted and resealed) checkpoint may be past any device: refused, not
    // overflowed (found by the pool_open fuzz target).
    let Some(offset) = loc.pba.checked_mul(BLOCK_SIZE) else {
        return Err(Error::corrupt(what, u64::MAX, "a page address inside the device", format!("block {}", loc.pba)));
    };
    dev.read_at(&mut buf, offset)?;
    let crc = crc32(&buf);
    if crc != loc.crc {
        return Err(Error::corrupt(what, offset, format!("crc32 {:#010x}", loc.crc), format!("crc32 {crc:#010x}")));
    }
    Ok(decode_page(&buf))
}

impl BlockTable {
    /// Load the whole table from the directory locations of a checkpoint.
    pub(crate) fn load(dev: &dyn Device, dir_locs: Vec<PageLoc>) -> Result<Self> {
        let mut page_locs = Vec::with_capacity(dir_locs.len() * FANOUT);
        for loc in &dir_locs {
            if loc.pba == 0 {
                page_locs.extend(std::iter::repeat_n(PageLoc::default(), FANOUT));
                continue;
            }
            let dir = read_page(dev, *loc, "block-table directory page")?;
            page_locs.extend(dir.iter().map(|s| PageLoc { pba: s.a, crc: s.b as u32 }));
        }
        while page_locs.last().is_some_and(|l| l.pba == 0) {
            page_locs.pop();
        }
        let mut pages = Vec::with_capacity(page_locs.len());
        for loc in &page_locs {
            pages.push(if loc.pba == 0 { None } else { Some(read_page(dev, *loc, "block-table page")?) });
        }
        Ok(Self {
            pages,
            page_locs,
            dirty_pages: PageSet::default(),
            dir_locs,
            dirty_dirs: BTreeSet::new(),
            spare: Vec::new(),
        })
    }

    pub(crate) fn get(&self, vbn: u64) -> BtEntry {
        let page = (vbn >> FANOUT_BITS) as usize;
        match self.pages.get(page) {
            Some(Some(p)) => BtEntry::from_slot(p[(vbn as usize) & (FANOUT - 1)]),
            _ => BtEntry::default(),
        }
    }

    pub(crate) fn set(&mut self, vbn: u64, e: BtEntry) {
        let page = (vbn >> FANOUT_BITS) as usize;
        if self.pages.len() <= page {
            self.pages.resize_with(page + 1, || None);
        }
        let spare = &mut self.spare;
        let p = self.pages[page].get_or_insert_with(|| match spare.pop() {
            Some(mut p) => {
                p.fill(Slot::default());
                p
            }
            None => Box::new([Slot::default(); FANOUT]),
        });
        p[(vbn as usize) & (FANOUT - 1)] = e.to_slot();
        self.dirty_pages.insert(page as u64);
    }

    /// Table pages to write at the next checkpoint, with their contents (a missing page is written as zeroes).
    pub(crate) fn dirty_pages(&self) -> Vec<(u64, Box<Page>)> {
        self.dirty_pages
            .iter()
            .map(|p| {
                let page = self.pages.get(p as usize).and_then(|x| x.clone());
                (p, page.unwrap_or_else(|| Box::new([Slot::default(); FANOUT])))
            })
            .collect()
    }

    pub(crate) fn dirty_page_count(&self) -> usize {
        self.dirty_pages.len()
    }

    /// Record where a table page was written; returns the block the old copy occupied (0 if none).
    pub(crate) fn page_written(&mut self, page: u64, loc: PageLoc) -> u64 {
        let i = page as usize;
        if self.page_locs.len() <= i {
            self.page_locs.resize(i + 1, PageLoc::default());
        }
        let old = std::mem::replace(&mut self.page_locs[i], loc);
        self.dirty_pages.remove(page);
        self.dirty_dirs.insert(page >> FANOUT_BITS);
        old.pba
    }

    /// Forget a table page whose entries are all free: it takes no space and reads as free [I5]. Returns the block
    /// its last written copy occupied (0 if none).
    pub(crate) fn page_dropped(&mut self, page: u64) -> u64 {
        let i = page as usize;
        if let Some(p) = self.pages.get_mut(i).and_then(Option::take) {
            if self.spare.len() < SPARE_PAGES {
                self.spare.push(p);
            }
        }
        let old = self.page_locs.get_mut(i).map(std::mem::take).unwrap_or_default();
        self.dirty_pages.remove(page);
        if old.pba != 0 {
            self.dirty_dirs.insert(page >> FANOUT_BITS);
        }
        old.pba
    }

    /// Forget a directory page that points at no table page. Returns the block it occupied (0 if none).
    pub(crate) fn dir_dropped(&mut self, dir: u64) -> u64 {
        let old = self.dir_locs.get_mut(dir as usize).map(std::mem::take).unwrap_or_default();
        self.dirty_dirs.remove(&dir);
        old.pba
    }

    /// Directory pages to write at the next checkpoint, with their contents.
    pub(crate) fn dirty_dirs(&self) -> Vec<(u64, Box<Page>)> {
        self.dirty_dirs
            .iter()
            .map(|&d| {
                let mut page = Box::new([Slot::default(); FANOUT]);
                for (j, slot) in page.iter_mut().enumerate() {
                    if let Some(loc) = self.page_locs.get(d as usize * FANOUT + j) {
                        *slot = Slot { a: loc.pba, b: u64::from(loc.crc) };
                    }
                }
                (d, page)
            })
            .collect()
    }

    /// Record where a directory page was written; returns the block the old copy occupied (0 if none).
    pub(crate) fn dir_written(&mut self, dir: u64, loc: PageLoc) -> u64 {
        let i = dir as usize;
        if self.dir_locs.len() <= i {
            self.dir_locs.resize(i + 1, PageLoc::default());
        }
        let old = std::mem::replace(&mut self.dir_locs[i], loc);
        self.dirty_dirs.remove(&dir);
        old.pba
    }

    pub(crate) fn dir_locs(&self) -> &[PageLoc] {
        &self.dir_locs
    }

    /// Physical blocks the table itself occupies (pages and directory pages), for integrity checks.
    pub(crate) fn own_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.page_locs.iter().chain(self.dir_locs.iter()).map(|l| l.pba).filter(|&p| p != 0)
    }

    /// Mark for rewriting at the next checkpoint every table page and directory page stored at a block for which
    /// `moving` is true (the cleaner empties those segments).
    pub(crate) fn rewrite_pages_in(&mut self, moving: impl Fn(u64) -> bool) {
        for (i, loc) in self.page_locs.iter().enumerate() {
            if loc.pba != 0 && moving(loc.pba) {
                self.dirty_pages.insert(i as u64);
            }
        }
        for (i, loc) in self.dir_locs.iter().enumerate() {
            if loc.pba != 0 && moving(loc.pba) {
                self.dirty_dirs.insert(i as u64);
            }
        }
    }

    /// Whether table page `page` will be written at the next checkpoint anyway.
    pub(crate) fn is_page_dirty(&self, page: u64) -> bool {
        self.dirty_pages.contains(page)
    }

    /// `f(vbn, pba)` for every allocated entry (refcount > 0), in vbn order: the cleaner's scan, a plain loop over
    /// the pages (it runs over the whole table once a pass).
    pub(crate) fn for_each_live(&self, mut f: impl FnMut(u64, u64)) {
        for (i, page) in self.pages.iter().enumerate() {
            let Some(page) = page else { continue };
            let base = (i as u64) << FANOUT_BITS;
            for (j, slot) in page.iter().enumerate() {
                if BtEntry::from_slot(*slot).refcount > 0 {
                    f(base + j as u64, slot.a);
                }
            }
        }
    }

    /// The free vbns below the highest allocated one, as a set, and one past that highest one (1 when none is:
    /// vbn 0 names nothing): what the vbn allocator reuses after an open or a checkpoint [I9]. A dropped page's
    /// vbns are one range.
    pub(crate) fn free_vbns(&self) -> (roaring::RoaringTreemap, u64) {
        let mut free = roaring::RoaringTreemap::new();
        let mut high = 1u64;
        for (i, page) in self.pages.iter().enumerate() {
            let base = (i as u64) << FANOUT_BITS;
            match page {
                None => {
                    free.insert_range(base..base + FANOUT as u64);
                }
                Some(p) => {
                    for (j, slot) in p.iter().enumerate() {
                        if BtEntry::from_slot(*slot).refcount > 0 {
                            high = base + j as u64 + 1;
                        } else {
                            free.insert(base + j as u64);
                        }
                    }
                }
            }
        }
        free.remove(0);
        free.remove_range(high..);
        (free, high)
    }

    /// Every allocated entry (refcount > 0), in vbn order.
    pub(crate) fn live_entries(&self) -> impl Iterator<Item = (u64, BtEntry)> + '_ {
        self.pages.iter().enumerate().filter_map(|(i, p)| p.as_ref().map(|p| (i, p))).flat_map(|(i, p)| {
            p.iter().enumerate().filter_map(move |(j, s)| {
                let e = BtEntry::from_slot(*s);
                (e.refcount > 0).then_some(((i * FANOUT + j) as u64, e))
            })
        })
    }

    /// Bytes of memory the loaded pages (and the spare ones) use.
    pub(crate) fn memory_bytes(&self) -> usize {
        (self.pages.iter().flatten().count() + self.spare.len()) * BLOCK
            + self.page_locs.len() * std::mem::size_of::<PageLoc>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_page_set_is_an_ordered_set() {
        let mut s = PageSet::default();
        let mut model = BTreeSet::new();
        let mut x = 7u64;
        for i in 0..5000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let page = (x >> 33) % 3000;
            if i % 3 == 0 {
                s.remove(page);
                model.remove(&page);
            } else {
                s.insert(page);
                model.insert(page);
            }
            assert_eq!(s.len(), model.len());
            assert_eq!(s.contains(page), model.contains(&page));
        }
        assert!(s.iter().eq(model.iter().copied()), "ascending, the same pages");
        s.remove(1 << 40); // beyond the bits: nothing
        assert!(!s.contains(1 << 40));
    }

    #[test]
    fn a_page_reused_after_a_drop_starts_empty() {
        let mut bt = BlockTable::default();
        let full = BtEntry { pba: 7, crc: 9, refcount: 3 };
        for j in 0..FANOUT as u64 {
            bt.set(j, full);
        }
        bt.page_dropped(0);
        assert_eq!(bt.get(5), BtEntry::default(), "a dropped page reads as free");
        // the next new page takes the dropped page's memory: only what is set there may read back
        let vbn = 3 * FANOUT as u64 + 1;
        bt.set(vbn, BtEntry { pba: 1, crc: 2, refcount: 1 });
        for j in 0..FANOUT as u64 {
            let want = if j == 1 { BtEntry { pba: 1, crc: 2, refcount: 1 } } else { BtEntry::default() };
            assert_eq!(bt.get(3 * FANOUT as u64 + j), want, "entry {j}");
        }
        assert_eq!(bt.live_entries().count(), 1);
    }
}
