//! A pool on a host file or block device, through pread / pwrite / fdatasync.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::Device;
use crate::{Error, Result};

/// A file or block device accessed with positioned reads and writes.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size_bytes: u64,
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
        Ok(Self { file, size_bytes })
    }

    /// Open an existing file or block device read-write.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", 0, 0, annotate(e, path)))?;
        let size_bytes = device_size(&file).map_err(|e| Error::io("stat", 0, 0, annotate(e, path)))?;
        Ok(Self { file, size_bytes })
    }

    /// The open file, for devices that want to share it.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_range(&self, op: &'static str, offset: u64, len: usize) -> Result<()> {
        let end = offset.checked_add(len as u64);
        match end {
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

fn annotate(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Device for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len())?;
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io("read", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("write", offset, buf.len())?;
        self.file.write_all_at(buf, offset).map_err(|e| Error::io("write", offset, buf.len() as u64, e))
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("sync", 0, 0, e))
    }
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
        drop(dev);
        let dev = FileDevice::open(&path).expect("open");
        assert_eq!(dev.size_bytes(), 4 << 20);
        assert!(FileDevice::create(&path, 1 << 20).is_err(), "create refuses an existing file");
    }
}
