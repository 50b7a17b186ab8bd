//! A simulated device for tests: memory-backed, with crashes that lose or tear unflushed writes, bit flips and
//! injected I/O errors. Randomness comes from a caller-given seed, so every run replays identically.

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
        s.live.write(buf, offset);
        s.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut s = self.state.lock();
        self.check(&mut s, "sync", 0, 0)?;
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
    fn flip_bit_changes_one_bit() {
        let dev = SimDevice::new(1 << 20);
        dev.flip_bit(1000, 3);
        let mut b = [0u8; 1024];
        dev.read_at(&mut b, 512).expect("read");
        assert_eq!(b[488], 8);
        assert_eq!(b.iter().filter(|&&x| x != 0).count(), 1);
    }
}
