//! Fixed-size pages: index tree nodes (leaf and inner), block-table pages and directory pages.
//!
//! Each is exactly one block of [`FANOUT`] 16-byte slots, two little-endian u64 each, with no header: its checksum
//! lives in the entry that references it, and its kind and level follow from where it is referenced [I6].

use super::{le_u64, BLOCK};

/// Slots per page.
pub(crate) const FANOUT: usize = 256;
/// log2 of [`FANOUT`].
pub(crate) const FANOUT_BITS: u32 = 8;

/// One 16-byte slot: two u64 whose meaning depends on the page kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) a: u64,
    pub(crate) b: u64,
}

/// A page of slots.
pub(crate) type Page = [Slot; FANOUT];

pub(crate) fn encode_page(page: &Page, out: &mut [u8]) {
    assert_eq!(out.len(), BLOCK);
    for (i, s) in page.iter().enumerate() {
        out[i * 16..i * 16 + 8].copy_from_slice(&s.a.to_le_bytes());
        out[i * 16 + 8..i * 16 + 16].copy_from_slice(&s.b.to_le_bytes());
    }
}

pub(crate) fn decode_page(buf: &[u8]) -> Box<Page> {
    assert_eq!(buf.len(), BLOCK);
    let mut page = Box::new([Slot::default(); FANOUT]);
    for (i, s) in page.iter_mut().enumerate() {
        s.a = le_u64(buf, i * 16);
        s.b = le_u64(buf, i * 16 + 8);
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_roundtrip() {
        let mut p = Box::new([Slot::default(); FANOUT]);
        for (i, s) in p.iter_mut().enumerate() {
            *s = Slot { a: i as u64 * 3, b: u64::MAX - i as u64 };
        }
        let mut buf = vec![0u8; BLOCK];
        encode_page(&p, &mut buf);
        assert_eq!(decode_page(&buf), p);
    }
}
