//! A pool on a file or block device through io_uring: the same contract as [`super::FileDevice`], with reads, writes
//! and data syncs submitted to a kernel ring.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;

use super::file::device_size;
use super::Device;
use crate::{Error, Result};

/// Submission queue entries of the ring. One request is in flight at a time per call; the ring is shared under a
/// lock, so a small queue suffices.
const RING_ENTRIES: u32 = 8;

/// Retries of a short read or write before giving up (each retry continues where the last stopped).
const MAX_SHORT_IO_RETRIES: u32 = 64;

/// A file or block device accessed through io_uring.
pub struct UringDevice {
    file: File,
    size_bytes: u64,
    ring: Mutex<IoUring>,
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice").field("size_bytes", &self.size_bytes).finish_non_exhaustive()
    }
}

impl UringDevice {
    /// Open an existing file or block device read-write.
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
                Error::io("open", 0, 0, std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
            })?;
        let size_bytes = device_size(&file).map_err(|e| Error::io("stat", 0, 0, e))?;
        Self::from_file(file, size_bytes)
    }

    /// Create a sparse file of `size_bytes` (it must not exist yet).
    pub fn create(path: &Path, size_bytes: u64) -> Result<Self> {
        drop(super::FileDevice::create(path, size_bytes)?);
        Self::open(path)
    }

    fn from_file(file: File, size_bytes: u64) -> Result<Self> {
        let ring = IoUring::new(RING_ENTRIES).map_err(|e| Error::io("io_uring_setup", 0, 0, e))?;
        Ok(Self { file, size_bytes, ring: Mutex::new(ring) })
    }

    fn check_range(&self, op: &'static str, offset: u64, len: usize) -> Result<()> {
        super::check_range(self.size_bytes, op, offset, len)
    }

    /// Submit one entry and wait for its completion; returns the result (bytes, or 0 for fsync).
    fn run(&self, entry: io_uring::squeue::Entry) -> std::io::Result<u32> {
        let mut ring = self.ring.lock();
        // SAFETY: the entry points into a buffer owned by our caller, who holds it borrowed until this function
        // returns; we wait for the completion of this very entry (the ring is locked, so it is the only one in
        // flight) before returning, so the kernel never touches the buffer after the borrow ends.
        unsafe {
            ring.submission().push(&entry).map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        }
        ring.submit_and_wait(1)?;
        let cqe = ring.completion().next().ok_or_else(|| std::io::Error::other("io_uring completion missing"))?;
        let res = cqe.result();
        if res < 0 {
            Err(std::io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as u32)
        }
    }
}

impl Device for UringDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len())?;
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done = 0usize;
        for _ in 0..MAX_SHORT_IO_RETRIES {
            if done == buf.len() {
                return Ok(());
            }
            let rest = &mut buf[done..];
            let entry =
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32).offset(offset + done as u64).build();
            let n = self.run(entry).map_err(|e| Error::io("read", offset, buf.len() as u64, e))?;
            if n == 0 {
                return Err(Error::io(
                    "read",
                    offset,
                    buf.len() as u64,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "unexpected end of device"),
                ));
            }
            done += n as usize;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(Error::io("read", offset, buf.len() as u64, std::io::Error::other("too many short reads")))
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("write", offset, buf.len())?;
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done = 0usize;
        for _ in 0..MAX_SHORT_IO_RETRIES {
            if done == buf.len() {
                return Ok(());
            }
            let rest = &buf[done..];
            let entry = opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32).offset(offset + done as u64).build();
            let n = self.run(entry).map_err(|e| Error::io("write", offset, buf.len() as u64, e))?;
            if n == 0 {
                return Err(Error::io(
                    "write",
                    offset,
                    buf.len() as u64,
                    std::io::Error::other("device wrote nothing"),
                ));
            }
            done += n as usize;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(Error::io("write", offset, buf.len() as u64, std::io::Error::other("too many short writes")))
        }
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        super::file::start_writeback(&self.file, offset, len)
    }

    fn caches_writes(&self) -> bool {
        true
    }

    fn sync(&self) -> Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
        self.run(entry).map(|_| ()).map_err(|e| Error::io("sync", 0, 0, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uring_device_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dev");
        let dev = UringDevice::create(&path, 4 << 20).expect("io_uring must be available on the CI kernel");
        super::super::tests::device_contract(&dev);
        assert!(dev.caches_writes());
        dev.start_writeback(0, 4 << 20).expect("a writeback hint");
    }
}
