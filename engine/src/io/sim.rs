//! A simulated device for tests: memory-backed, with crashes that lose or tear unflushed writes, bit flips,
//! misdirected writes, injected I/O errors, and (for canary tests of test harnesses) a disk whose sync lies.
//! Randomness comes from a caller-given seed, so every run replays identically.
//!
//! Reordering: a crash keeps each unsynced write (or each of its sectors) independently of the others, so any
//! subset of them may reach the medium, in particular a later write without an earlier one. That is every order in
//! which a disk with a volatile cache could have persisted them (for writes to different sectors; a sector written
//! twice keeps its later contents when the later write is kept, as a real cache does).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Device, SECTOR_SIZE};
use crate::{Error, Result};

const PAGE_BYTES: usize = 4096;
const SECTOR: usize = SECTOR_SIZE as usize;

/// A fault to inject; I/O operations (reads, writes, syncs) are counted from the moment it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimFault {
    /// No fault.
    None,
    /// The power goes out before I/O number `n` (0-based): it and every later I/O fail and write nothing.
    PowerCutAfter(u64),
    /// I/O number `n` fails (writing nothing); later ones succeed.
    FailOnce(u64),
    /// I/O number `n` and every later one fail.
    FailFrom(u64),
}

#[derive(Clone, Default)]
struct Pages(HashMap<u64, Box<[u8; PAGE_BYTES]>>);

impl Pages {
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE_BYTES as u64;
            let in_page = (pos % PAGE_BYTES as u64) as usize;
            let n = (PAGE_BYTES - in_page).min(buf.len() - done);
            match self.0.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, buf: &[u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE_BYTES as u64;
            let in_page = (pos % PAGE_BYTES as u64) as usize;
            let n = (PAGE_BYTES - in_page).min(buf.len() - done);
            let p = self.0.entry(page).or_insert_with(|| Box::new([0u8; PAGE_BYTES]));
            p[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
    }
}

struct SimState {
    /// What reads see: every completed write.
    live: Pages,
    /// What survives a crash for sure: the state as of the last completed sync.
    durable: Pages,
    /// Writes completed since the last sync, oldest first.
    pending: Vec<(u64, Vec<u8>)>,
    fault: SimFault,
    /// I/O operations since the fault was set.
    ios_since_fault: u64,
    /// I/O operations since the device was made.
    ios_total: u64,
    powered_off: bool,
    /// A write to misdirect: `(writes to skip, min_offset, lands_at)`.
    misdirect: Option<(u64, u64, u64)>,
    /// Writes misdirected so far.
    misdirected: u64,
    /// `sync` returns Ok without making anything durable (a lying disk; canary tests only).
    lying_sync: bool,
}

/// A memory-backed [`Device`] with crash and fault injection.
pub struct SimDevice {
    size_bytes: u64,
    state: Mutex<SimState>,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice").field("size_bytes", &self.size_bytes).finish_non_exhaustive()
    }
}

impl SimDevice {
    /// A zero-filled device of `size_bytes` (a multiple of the sector size).
    pub fn new(size_bytes: u64) -> Arc<Self> {
        assert!(size_bytes % SECTOR_SIZE == 0, "sim device size must be sector aligned");
        Arc::new(Self::from_pages(size_bytes, Pages::default()))
    }

    fn from_pages(size_bytes: u64, pages: Pages) -> Self {
        Self {
            size_bytes,
            state: Mutex::new(SimState {
                live: pages.clone(),
                durable: pages,
                pending: Vec::new(),
                fault: SimFault::None,
                ios_since_fault: 0,
                ios_total: 0,
                powered_off: false,
                misdirect: None,
                misdirected: 0,
                lying_sync: false,
            }),
        }
    }

    /// Arm a fault; I/Os are counted from now.
    pub fn set_fault(&self, fault: SimFault) {
        let mut s = self.state.lock();
        s.fault = fault;
        s.ios_since_fault = 0;
    }

    /// I/O operations (reads, writes, syncs) this device has served or refused since it was made.
    pub fn io_count(&self) -> u64 {
        self.state.lock().ios_total
    }

    /// Writes completed since the last sync (what a crash may lose).
    pub fn unsynced_writes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// True once a [`SimFault::PowerCutAfter`] has fired.
    pub fn is_powered_off(&self) -> bool {
        self.state.lock().powered_off
    }

    /// The device as it could be found after a power failure now: every synced write, plus a random subset of the
    /// unsynced ones, each kept whole, dropped, or torn (a random subset of its sectors kept).
    pub fn crash(&self, seed: u64) -> Arc<SimDevice> {
        let s = self.state.lock();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut image = s.durable.clone();
        for (offset, data) in &s.pending {
            match rng.random_range(0..4u32) {
                0 => {}                              // lost
                1 | 2 => image.write(data, *offset), // kept whole
                _ => {
                    // torn: each sector independently kept or lost
                    for (i, sector) in data.chunks(SECTOR).enumerate() {
                        if rng.random_bool(0.5) {
                            image.write(sector, offset + (i * SECTOR) as u64);
                        }
                    }
                }
            }
        }
        Arc::new(Self::from_pages(self.size_bytes, image))
    }

    /// The device after a clean power-off: exactly what is durable, no unsynced write kept.
    pub fn crash_losing_all_unsynced(&self) -> Arc<SimDevice> {
        let s = self.state.lock();
        Arc::new(Self::from_pages(self.size_bytes, s.durable.clone()))
    }

    /// The device after a clean power-off, enlarged to `size_bytes` (as a grown file or volume is): what was durable,
    /// then zeroes.
    pub fn grown(&self, size_bytes: u64) -> Arc<SimDevice> {
        assert!(size_bytes >= self.size_bytes && size_bytes % SECTOR_SIZE == 0, "a grown device is larger, aligned");
        let s = self.state.lock();
        Arc::new(Self::from_pages(size_bytes, s.durable.clone()))
    }

    /// Flip one bit of the stored bytes (both what reads see and what survives a crash).
    pub fn flip_bit(&self, offset: u64, bit: u8) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        for pages in [&mut s.live, &mut s.durable] {
            let mut b = [0u8; 1];
            pages.read(&mut b, offset);
            b[0] ^= 1 << (bit % 8);
            pages.write(&b, offset);
        }
    }

    /// Misdirect one write (a latent fault the engine must detect, not survive): the write numbered `nth` (0-based)
    /// among the writes issued from now on that start at or beyond `min_offset` lands at `lands_at` instead (the same
    /// bytes and length, clamped to end inside the device; `lands_at` is rounded down to a sector). The write
    /// succeeds; its own offset keeps its old contents. Replaces any misdirection armed before.
    pub fn misdirect_write(&self, nth: u64, min_offset: u64, lands_at: u64) {
        self.state.lock().misdirect = Some((nth, min_offset, lands_at / SECTOR_SIZE * SECTOR_SIZE));
    }

    /// Writes misdirected so far (see [`SimDevice::misdirect_write`]).
    pub fn misdirected_writes(&self) -> u64 {
        self.state.lock().misdirected
    }

    /// A lying disk, for canary tests that prove a harness catches lost writes: while set, `sync` is counted and
    /// returns Ok but makes nothing durable, so a later [`SimDevice::crash`] may lose writes the engine was told are
    /// on stable storage. Never set this in a test that expects the engine to keep its durability promise.
    pub fn set_lying_sync(&self, lie: bool) {
        self.state.lock().lying_sync = lie;
    }

    /// Read bytes bypassing fault injection and I/O counting (for tests that inspect the medium).
    pub fn peek(&self, buf: &mut [u8], offset: u64) {
        self.state.lock().live.read(buf, offset);
    }

    /// Write bytes bypassing fault injection, durable at once (for tests that damage the medium).
    pub fn poke(&self, buf: &[u8], offset: u64) {
        let mut s = self.state.lock();
        s.live.write(buf, offset);
        s.durable.write(buf, offset);
    }

    fn check(&self, s: &mut SimState, op: &'static str, offset: u64, len: usize) -> Result<()> {
        let n = s.ios_since_fault;
        s.ios_since_fault += 1;
        s.ios_total += 1;
        let fail = match s.fault {
            SimFault::None => false,
            SimFault::PowerCutAfter(k) => {
                if n >= k {
                    s.powered_off = true;
                }
                s.powered_off
            }
            SimFault::FailOnce(k) => n == k,
            SimFault::FailFrom(k) => n >= k,
        };
        if fail {
            return Err(Error::io(op, offset, len as u64, std::io::Error::other("injected I/O error")));
        }
        if (op != "sync") && (offset % SECTOR_SIZE != 0 || len as u64 % SECTOR_SIZE != 0) {
            return Err(Error::io(
                op,
                offset,
                len as u64,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "unaligned I/O"),
            ));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(Error::io(
                op,
                offset,
                len as u64,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "beyond the end of the device"),
            )),
        }
    }
}

impl Device for SimDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut s = self.state.lock();
        self.check(&mut s, "read", offset, buf.len())?;
        s.live.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut s = self.state.lock();
        self.check(&mut s, "write", offset, buf.len())?;
        let mut at = offset;
        if let Some((nth, min_offset, lands_at)) = s.misdirect {
            if offset >= min_offset {
                if nth == 0 {
                    s.misdirect = None;
                    s.misdirected += 1;
                    at = lands_at.min((self.size_bytes - buf.len() as u64) / SECTOR_SIZE * SECTOR_SIZE);
                } else {
                    s.misdirect = Some((nth - 1, min_offset, lands_at));
                }
            }
        }
        s.live.write(buf, at);
        s.pending.push((at, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut s = self.state.lock();
        self.check(&mut s, "sync", 0, 0)?;
        if s.lying_sync {
            return Ok(());
        }
        let pending = std::mem::take(&mut s.pending);
        for (offset, data) in pending {
            s.durable.write(&data, offset);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_device_contract() {
        super::super::tests::device_contract(&*SimDevice::new(4 << 20));
    }

    #[test]
    fn crash_keeps_synced_and_may_lose_unsynced() {
        let dev = SimDevice::new(1 << 20);
        dev.write_at(&[1u8; 4096], 0).expect("write");
        dev.sync().expect("sync");
        dev.write_at(&[2u8; 4096], 4096).expect("write");
        let mut lost = 0;
        let mut kept = 0;
        for seed in 0..64 {
            let img = dev.crash(seed);
            let mut b = [0u8; 4096];
            img.read_at(&mut b, 0).expect("read");
            assert!(b.iter().all(|&x| x == 1), "synced data survives every crash");
            img.read_at(&mut b, 4096).expect("read");
            assert!(b.chunks(512).all(|s| s.iter().all(|&x| x == 2) || s.iter().all(|&x| x == 0)));
            if b.iter().all(|&x| x == 0) {
                lost += 1;
            } else {
                kept += 1;
            }
        }
        assert!(lost > 0 && kept > 0, "crashes both lose and keep unsynced writes");
    }

    #[test]
    fn faults_fire_at_the_counted_io() {
        let dev = SimDevice::new(1 << 20);
        dev.set_fault(SimFault::FailOnce(1));
        let mut b = [0u8; 512];
        dev.read_at(&mut b, 0).expect("io 0 ok");
        assert!(dev.read_at(&mut b, 0).is_err(), "io 1 fails");
        dev.read_at(&mut b, 0).expect("io 2 ok");
        dev.set_fault(SimFault::PowerCutAfter(1));
        dev.write_at(&b, 0).expect("before the cut");
        assert!(dev.write_at(&b, 512).is_err());
        assert!(dev.sync().is_err());
        assert!(dev.is_powered_off());
    }

    #[test]
    fn a_crash_may_keep_a_later_write_without_an_earlier_one() {
        let dev = SimDevice::new(1 << 20);
        dev.write_at(&[1u8; 512], 0).expect("write");
        dev.write_at(&[2u8; 512], 512).expect("write");
        let reordered = (0..64).any(|seed| {
            let img = dev.crash(seed);
            let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
            img.peek(&mut a, 0);
            img.peek(&mut b, 512);
            a[0] == 0 && b[0] == 2
        });
        assert!(reordered, "some crash keeps the second write and loses the first");
    }

    #[test]
    fn a_misdirected_write_lands_elsewhere_and_leaves_its_target_stale() {
        let dev = SimDevice::new(1 << 20);
        dev.write_at(&[1u8; 4096], 8192).expect("write");
        dev.misdirect_write(1, 4096, 65536);
        dev.write_at(&[7u8; 512], 0).expect("below min_offset: not counted");
        dev.write_at(&[2u8; 4096], 8192).expect("write 0: not misdirected");
        dev.write_at(&[3u8; 4096], 8192).expect("write 1: misdirected");
        dev.sync().expect("sync");
        let mut b = [0u8; 4096];
        dev.crash_losing_all_unsynced().read_at(&mut b, 8192).expect("read");
        assert!(b.iter().all(|&x| x == 2), "the target keeps the previous write");
        dev.read_at(&mut b, 65536).expect("read");
        assert!(b.iter().all(|&x| x == 3), "the bytes landed elsewhere, durably");
        assert_eq!(dev.misdirected_writes(), 1);
        dev.write_at(&[4u8; 4096], 8192).expect("later writes land where they should");
        dev.read_at(&mut b, 8192).expect("read");
        assert!(b.iter().all(|&x| x == 4));
    }

    #[test]
    fn a_lying_sync_makes_nothing_durable() {
        let dev = SimDevice::new(1 << 20);
        dev.set_lying_sync(true);
        dev.write_at(&[1u8; 512], 0).expect("write");
        dev.sync().expect("the lie");
        assert_eq!(dev.unsynced_writes(), 1);
        let mut b = [0u8; 512];
        dev.crash_losing_all_unsynced().read_at(&mut b, 0).expect("read");
        assert_eq!(b[0], 0, "the 'synced' write is gone");
        dev.set_lying_sync(false);
        dev.sync().expect("sync");
        assert_eq!(dev.unsynced_writes(), 0);
    }

    #[test]
    fn flip_bit_changes_one_bit() {
        let dev = SimDevice::new(1 << 20);
        dev.flip_bit(1000, 3);
        let mut b = [0u8; 1024];
        dev.read_at(&mut b, 512).expect("read");
        assert_eq!(b[488], 8);
        assert_eq!(b.iter().filter(|&&x| x != 0).count(), 1);
    }
}
