//! The device seam: every byte the engine reads or writes goes through [`Device`].
//!
//! Implementations: [`FileDevice`] (pread/pwrite/fdatasync), [`UringDevice`] (io_uring), and [`SimDevice`], a
//! memory-backed device for tests that loses unflushed writes on a crash, tears writes at sector boundaries, flips bits
//! and fails I/O on command.

mod file;
mod sim;
mod uring;

pub use file::{FileDevice, DIRECT_IO_ALIGN};
pub use sim::{SimDevice, SimFault};
pub use uring::UringDevice;

use crate::Result;

/// The smallest unit a device writes atomically, and the alignment of every engine I/O.
pub const SECTOR_SIZE: u64 = 512;

/// A block device or file holding one pool.
///
/// Offsets and lengths passed by the engine are multiples of [`SECTOR_SIZE`]. A write is durable only after a later
/// [`Device::sync`] returns; before that a crash may keep it, lose it, or keep some of its sectors.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;
    /// Read exactly `buf.len()` bytes at `offset`. Never-written ranges read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Read exactly `buf.len()` bytes at `offset` only if that needs no waiting for the disk (the bytes are in the
    /// page cache): `Ok(true)` when done, `Ok(false)` when it would block (`buf` then holds unspecified bytes and the
    /// caller falls back to [`Device::read_at`]). Lets a server answer cached reads on its event loop. The default
    /// never reads.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Return once every write completed before the call is on stable storage.
    fn sync(&self) -> Result<()>;
    /// Start writing `[offset, offset + len)` back to stable storage without waiting for it. A hint for devices that
    /// cache writes (a file through the page cache): the log gives it for every batch it wrote, so dirty data never
    /// piles up for the next sync, and a checkpoint's or flush's sync (which writers wait behind) has little left to
    /// do. No durability promise: only [`Device::sync`] makes writes durable. The default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Whether [`Device::start_writeback`] does something: the log's io_uring writer then submits the same hint
    /// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`) on [`Device::raw_fd`] after each of its writes.
    fn caches_writes(&self) -> bool {
        false
    }
    /// The open file behind the device, for the log's io_uring writer, which submits several writes at once. Only
    /// devices whose `write_at` is a plain positioned write of the same bytes may return one (the writer's buffers
    /// are aligned for O_DIRECT). `None`: writes go through `write_at`.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Write all of `buf` at `offset`, past the device's cache where it has one and can: the log writes the batches
    /// of large writes this way ([`crate::PoolOptions::uncached_write_min_bytes`]), which are seldom read back soon
    /// and cost a cached file twice (the copy into the page cache, then its writeback). The same durability as
    /// [`Device::write_at`]: only a later [`Device::sync`] makes it durable. `buf`, `offset` and the length are
    /// multiples of [`crate::format::BLOCK_SIZE`], `buf` aligned to it. The default is `write_at`.
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)
    }
    /// The descriptor that [`Device::write_uncached_at`] writes through (the same file opened with O_DIRECT), for
    /// the log's io_uring writer; `None` when there is none (the writer then uses [`Device::raw_fd`]).
    fn uncached_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// An I/O error unless `[offset, offset + len)` lies inside a device of `size_bytes`.
pub(crate) fn check_range(size_bytes: u64, op: &'static str, offset: u64, len: usize) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(crate::Error::io(
            op,
            offset,
            len as u64,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "beyond the end of the device"),
        )),
    }
}

/// Most unwanted blocks `read_blocks` reads to join two runs of wanted ones in one device read: reading 32 KiB
/// more from the page cache costs about what another call does (the cleaner's victims hold live blocks one to three
/// in a row between dead ones: 474,000 reads for 1.44 million blocks moved in one run of benches/engine/cleaning.sh
/// before runs were joined).
pub const MAX_READ_GAP_BLOCKS: u64 = 8;
/// Longest span (blocks) one joined read of `read_blocks` covers: bounds its scratch buffer.
pub const MAX_READ_SPAN_BLOCKS: u64 = 256;

/// Read the 4 KiB blocks at `pbas` into `out`, one block after another. Blocks in ascending order that lie close
/// together are one device read: runs of consecutive blocks, and runs at most [`MAX_READ_GAP_BLOCKS`] apart (read
/// through a scratch buffer, within [`MAX_READ_SPAN_BLOCKS`]).
pub(crate) fn read_blocks(dev: &dyn Device, pbas: &[u64], out: &mut [u8]) -> Result<()> {
    let block = crate::format::BLOCK;
    assert_eq!(out.len(), pbas.len() * block, "one block of buffer per pba");
    let mut scratch = Vec::new();
    let mut i = 0;
    while i < pbas.len() {
        let first = pbas[i];
        let mut j = i + 1;
        while j < pbas.len()
            && pbas[j] > pbas[j - 1]
            && pbas[j] - pbas[j - 1] <= MAX_READ_GAP_BLOCKS + 1
            && pbas[j] - first < MAX_READ_SPAN_BLOCKS
        {
            j += 1;
        }
        let span = (pbas[j - 1] - first + 1) as usize;
        let offset = first * crate::format::BLOCK_SIZE;
        if span == j - i {
            dev.read_at(&mut out[i * block..j * block], offset)?;
        } else {
            scratch.resize(span * block, 0);
            dev.read_at(&mut scratch, offset)?;
            for k in i..j {
                let at = (pbas[k] - first) as usize * block;
                out[k * block..(k + 1) * block].copy_from_slice(&scratch[at..at + block]);
            }
        }
        i = j;
    }
    Ok(())
}

/// A zero-filled byte buffer whose start is aligned to [`DIRECT_IO_ALIGN`], as O_DIRECT I/O requires. Built without
/// `unsafe`: it over-allocates and starts at the first aligned byte.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_IO_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_IO_ALIGN);
        assert!(start < DIRECT_IO_ALIGN, "cannot align a byte buffer");
        Self { raw, start, len }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Behaviour every device must show; run against each implementation.
    pub(crate) fn device_contract(dev: &dyn Device) {
        let size = dev.size_bytes();
        assert!(size >= 1 << 20);
        let mut buf = vec![0xAAu8; 8192];
        dev.read_at(&mut buf, 4096).expect("read");
        assert!(buf.iter().all(|&b| b == 0), "never-written range reads as zero");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&data, 512).expect("write");
        dev.sync().expect("sync");
        let mut back = vec![0u8; 8192];
        dev.read_at(&mut back, 512).expect("read back");
        assert_eq!(back, data);
        let mut tail = vec![0u8; 512];
        dev.read_at(&mut tail, size - 512).expect("read last sector");
        assert!(dev.read_at(&mut tail, size).is_err(), "read past the end fails");
        assert!(dev.write_at(&tail, size - 256).is_err(), "write past the end fails");
    }
}
