//! A pool on a host file or block device, through pread / pwrite / fdatasync.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{AlignedBuf, Device};
use crate::{Error, Result};

/// Alignment of buffers, offsets and lengths for O_DIRECT I/O.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A file or block device accessed with positioned reads and writes, through the page cache or, opened with
/// [`FileDevice::open_direct`], with O_DIRECT (misaligned requests go through an aligned bounce buffer).
///
/// Through the page cache, the device also holds the same file opened with O_DIRECT where the file system allows
/// it, for [`Device::write_uncached_at`]: the log's batches of large writes skip the page cache (one copy and its
/// writeback less per byte), while everything else, reads included, goes through it. Linux keeps the two coherent:
/// an O_DIRECT write first writes back and drops the cached pages of its range, so a later read through the cache
/// reads what it wrote; `fdatasync` on either descriptor covers writes through both (it syncs the inode and flushes
/// the device's cache).
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size_bytes: u64,
    direct: bool,
    /// The file opened with O_DIRECT beside the cached `file`; `None` when `direct` or where O_DIRECT is refused.
    uncached: Option<File>,
    /// A write through `uncached` failed with EINVAL (a device whose sectors are larger than [`DIRECT_IO_ALIGN`]):
    /// every uncached write goes through the cache from then on, without trying O_DIRECT again.
    uncached_refused: AtomicBool,
}

impl FileDevice {
    /// Create a sparse file of `size_bytes` (it must not exist yet).
    pub fn create(path: &Path, size_bytes: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create", 0, size_bytes, annotate(e, path)))?;
        file.set_len(size_bytes).map_err(|e| Error::io("set_len", 0, size_bytes, annotate(e, path)))?;
        Ok(Self {
            file,
            size_bytes,
            direct: false,
            uncached: open_uncached(path),
            uncached_refused: AtomicBool::new(false),
        })
    }

    /// Open an existing file or block device read-write, through the page cache.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Open an existing file or block device read-write with O_DIRECT: no page cache, as databases and hypervisors
    /// use it. Fails on file systems without O_DIRECT (tmpfs).
    pub fn open_direct(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, direct: bool) -> Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|e| Error::io("open", 0, 0, annotate(e, path)))?;
        let size_bytes = device_size(&file).map_err(|e| Error::io("stat", 0, 0, annotate(e, path)))?;
        let uncached = if direct { None } else { open_uncached(path) };
        Ok(Self { file, size_bytes, direct, uncached, uncached_refused: AtomicBool::new(false) })
    }

    /// A cached device without the O_DIRECT descriptor: every write goes through the page cache (as on a file
    /// system without O_DIRECT). For comparisons and tests.
    pub fn without_uncached_writes(mut self) -> Self {
        self.uncached = None;
        self
    }

    /// Whether [`Device::write_uncached_at`] skips the page cache: a cached device with its O_DIRECT descriptor, or
    /// a device opened with O_DIRECT.
    pub fn writes_uncached(&self) -> bool {
        self.direct || self.uncached_file().is_some()
    }

    /// The O_DIRECT descriptor for uncached writes, unless there is none or it was refused.
    fn uncached_file(&self) -> Option<&File> {
        self.uncached.as_ref().filter(|_| !self.uncached_refused.load(Ordering::Relaxed))
    }

    /// True when the device bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Can this request go straight to the file under O_DIRECT?
    fn aligned(buf: &[u8], offset: u64) -> bool {
        buf.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0
            && buf.len() % DIRECT_IO_ALIGN == 0
            && offset % DIRECT_IO_ALIGN as u64 == 0
    }

    /// The aligned span around `[offset, offset + len)`: its start and length.
    fn span(offset: u64, len: usize) -> (u64, usize) {
        let a = DIRECT_IO_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    /// The open file, for devices that want to share it.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_range(&self, op: &'static str, offset: u64, len: usize) -> Result<()> {
        super::check_range(self.size_bytes, op, offset, len)
    }
}

/// Size of a regular file, or of a block device (whose metadata length is 0): seek to its end.
pub(crate) fn device_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    use std::io::Seek;
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0))
}

/// The file at `path` opened again with O_DIRECT, for uncached writes; `None` where that is refused (tmpfs): writes
/// then all go through the page cache.
fn open_uncached(path: &Path) -> Option<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

fn annotate(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Device for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len())?;
        let len_bytes = buf.len() as u64;
        let io = |e| Error::io("read", offset, len_bytes, e);
        if !self.direct || Self::aligned(buf, offset) {
            return self.file.read_exact_at(buf, offset).map_err(io);
        }
        let (start, len) = Self::span(offset, buf.len());
        let mut bounce = AlignedBuf::zeroed(len);
        self.file.read_exact_at(bounce.as_mut_slice(), start).map_err(io)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        // O_DIRECT reads always wait for the disk.
        if self.direct {
            return Ok(false);
        }
        self.check_range("read", offset, buf.len())?;
        let len_bytes = buf.len() as u64;
        let flags = rustix::io::ReadWriteFlags::NOWAIT;
        match rustix::io::preadv2(&self.file, &mut [std::io::IoSliceMut::new(buf)], offset, flags) {
            // A short read means part of the range is not cached: the blocking path reads it all.
            Ok(n) => Ok(n as u64 == len_bytes),
            // EAGAIN: not in the page cache; EOPNOTSUPP: no RWF_NOWAIT for buffered reads on this kernel or file
            // system; EINTR: a signal. None of them is an error of the device.
            Err(e)
                if [rustix::io::Errno::AGAIN, rustix::io::Errno::OPNOTSUPP, rustix::io::Errno::INTR].contains(&e) =>
            {
                Ok(false)
            }
            Err(e) => Err(Error::io("read", offset, len_bytes, e.into())),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("write", offset, buf.len())?;
        let io = |e| Error::io("write", offset, buf.len() as u64, e);
        if !self.direct || Self::aligned(buf, offset) {
            return self.file.write_all_at(buf, offset).map_err(io);
        }
        let (start, len) = Self::span(offset, buf.len());
        let mut bounce = AlignedBuf::zeroed(len);
        if start != offset || len != buf.len() {
            // partial blocks at the ends: read what is there first
            self.file.read_exact_at(bounce.as_mut_slice(), start).map_err(io)?;
        }
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(bounce.as_slice(), start).map_err(io)
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("sync", 0, 0, e))
    }

    fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        if self.direct {
            return Ok(());
        }
        start_writeback(&self.file, offset, len)
    }

    fn caches_writes(&self) -> bool {
        !self.direct
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.file.as_raw_fd())
    }

    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self.uncached_file() {
            Some(file) if Self::aligned(buf, offset) => {
                self.check_range("write", offset, buf.len())?;
                match file.write_all_at(buf, offset) {
                    Ok(()) => Ok(()),
                    // a device whose sectors are larger than the alignment: through the page cache instead
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.uncached_refused.store(true, Ordering::Relaxed);
                        self.write_at(buf, offset)
                    }
                    Err(e) => Err(Error::io("write", offset, buf.len() as u64, e)),
                }
            }
            _ => self.write_at(buf, offset),
        }
    }

    fn uncached_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.uncached_file().map(|f| f.as_raw_fd())
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: start writeback of the range's dirty pages, without waiting for it.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(Error::io("sync_file_range", offset, len, std::io::Error::other("range beyond i64")));
    };
    // SAFETY: sync_file_range takes a file descriptor and three integers, and touches no memory of this process;
    // the descriptor is valid while `file` is borrowed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        return Err(Error::io("sync_file_range", offset, len, std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_device_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dev");
        let dev = FileDevice::create(&path, 4 << 20).expect("create");
        super::super::tests::device_contract(&dev);
        assert!(dev.caches_writes());
        dev.start_writeback(0, 4 << 20).expect("a writeback hint on a buffered file");
        drop(dev);
        let dev = FileDevice::open(&path).expect("open");
        assert_eq!(dev.size_bytes(), 4 << 20);
        let direct_path = dir.path().join("direct");
        drop(FileDevice::create(&direct_path, 4 << 20).expect("create"));
        let dev =
            FileDevice::open_direct(&direct_path).expect("O_DIRECT open (the test directory must not be on tmpfs)");
        assert!(dev.is_direct());
        super::super::tests::device_contract(&dev);
        assert!(!dev.caches_writes(), "O_DIRECT writes skip the page cache: nothing to write back");
        assert!(FileDevice::create(&path, 1 << 20).is_err(), "create refuses an existing file");
    }

    /// Uncached writes (O_DIRECT beside the cached descriptor) and cached reads and writes of the same range see
    /// each other: a cached page is not read stale after an uncached write over it; an unaligned buffer goes through
    /// the cache; without the O_DIRECT descriptor everything does.
    #[test]
    fn uncached_writes_and_the_page_cache_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dev");
        let dev = FileDevice::create(&path, 4 << 20).expect("create");
        assert!(dev.writes_uncached() && dev.uncached_fd().is_some(), "O_DIRECT beside the cache (not tmpfs)");
        let block = |fill: u8| {
            let mut b = AlignedBuf::zeroed(2 * DIRECT_IO_ALIGN);
            b.as_mut_slice().fill(fill);
            b
        };
        let mut back = vec![0u8; 2 * DIRECT_IO_ALIGN];
        dev.write_at(block(1).as_slice(), 8192).expect("cached write");
        dev.read_at(&mut back, 8192).expect("read");
        assert!(back.iter().all(|&b| b == 1), "the cached write, now in the page cache");
        dev.write_uncached_at(block(2).as_slice(), 8192).expect("uncached write");
        dev.read_at(&mut back, 8192).expect("read");
        assert!(back.iter().all(|&b| b == 2), "the uncached write, not the stale cached page");
        // one block in, so not aligned to DIRECT_IO_ALIGN: through the cache
        let b3 = block(3);
        dev.write_uncached_at(&b3.as_slice()[1..4097], 16384).expect("an unaligned buffer");
        dev.read_at(&mut back[..4096], 16384).expect("read");
        assert!(back[..4096].iter().all(|&b| b == 3));
        dev.sync().expect("sync covers both descriptors");
        drop(dev);
        let dev = FileDevice::open(&path).expect("open").without_uncached_writes();
        assert!(!dev.writes_uncached() && dev.uncached_fd().is_none());
        dev.write_uncached_at(block(4).as_slice(), 8192).expect("a cached write after all");
        dev.read_at(&mut back, 8192).expect("read");
        assert!(back.iter().all(|&b| b == 4));
        let direct = FileDevice::open_direct(&path).expect("O_DIRECT open");
        assert!(direct.writes_uncached() && direct.uncached_fd().is_none(), "its own descriptor is uncached");
    }
}
