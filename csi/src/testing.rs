//! Stand-ins for the kernel: an attacher that makes device files and a mounter that keeps mounts in memory, so
//! everything above the attach (argument checks, idempotency, staging records) runs in tests without root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::ids::VolumeId;
use crate::node::{Attacher, Condition, Mounter};
use crate::{Error, Result};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Size the fake devices report.
pub const FAKE_DEVICE_BYTES: u64 = 64 << 20;

/// Attaches by creating `DIR/fake-nbdN` files; volumes in `missing` fail as unknown exports. Adopts a device
/// whose file exists and that is not marked gone ([`FakeAttacher::set_gone`]), recording every adopt call.
#[derive(Debug, Default)]
pub struct FakeAttacher {
    dir: PathBuf,
    state: Mutex<FakeAttached>,
}

#[derive(Debug, Default)]
struct FakeAttached {
    next: u32,
    attached: BTreeMap<PathBuf, String>,
    missing: BTreeSet<String>,
    lost: BTreeSet<PathBuf>,
    gone: BTreeSet<PathBuf>,
    adopt_calls: Vec<(String, PathBuf)>,
}

impl FakeAttacher {
    /// Devices go in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), state: Mutex::default() }
    }
    /// Volumes attached now: device -> volume id.
    pub fn attached(&self) -> BTreeMap<PathBuf, String> {
        lock(&self.state).attached.clone()
    }
    /// Makes attaching `volume` fail as an unknown export.
    pub fn set_missing(&self, volume: &str) {
        lock(&self.state).missing.insert(volume.to_string());
    }
    /// Every adopt call so far: (volume id, device), in order, adopted or not.
    pub fn adopt_calls(&self) -> Vec<(String, PathBuf)> {
        lock(&self.state).adopt_calls.clone()
    }
    /// Makes `device` gone, as after a node reboot: adopting it fails with `NOT_FOUND`.
    pub fn set_gone(&self, device: &Path) {
        lock(&self.state).gone.insert(device.to_path_buf());
    }
    /// Makes `device` lose its connection to the server (`false`: get it back).
    pub fn set_lost(&self, device: &Path, lost: bool) {
        let mut st = lock(&self.state);
        if lost {
            st.lost.insert(device.to_path_buf());
        } else {
            st.lost.remove(device);
        }
    }
}

impl Attacher for FakeAttacher {
    fn attach(&self, volume: &VolumeId) -> Result<PathBuf> {
        let mut st = lock(&self.state);
        if st.missing.contains(&volume.to_string()) {
            return Err(Error::NotFound(format!("no export {}", volume.export_name())));
        }
        let dev = self.dir.join(format!("fake-nbd{}", st.next));
        st.next += 1;
        std::fs::write(&dev, b"").map_err(|e| Error::io(format!("creating {}", dev.display()), e))?;
        st.attached.insert(dev.clone(), volume.to_string());
        Ok(dev)
    }

    fn detach(&self, device: &Path) -> Result<()> {
        lock(&self.state).attached.remove(device);
        match std::fs::remove_file(device) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("removing a fake device", e)),
            _ => Ok(()),
        }
    }

    fn adopt(&self, volume: &VolumeId, device: &Path) -> Result<()> {
        let mut st = lock(&self.state);
        st.adopt_calls.push((volume.to_string(), device.to_path_buf()));
        if st.gone.contains(device) || !device.exists() {
            return Err(Error::NotFound(format!("{} is not configured any more", device.display())));
        }
        // new devices are numbered past the adopted ones
        let number = device.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("fake-nbd"));
        if let Some(n) = number.and_then(|n| n.parse::<u32>().ok()) {
            st.next = st.next.max(n.saturating_add(1));
        }
        st.attached.insert(device.to_path_buf(), volume.to_string());
        Ok(())
    }

    fn refresh_size(&self, _: &VolumeId, _: &Path) -> Result<u64> {
        Ok(FAKE_DEVICE_BYTES)
    }

    fn condition(&self, device: &Path) -> Result<Condition> {
        let st = lock(&self.state);
        Ok(if !st.attached.contains_key(device) {
            Condition { abnormal: true, message: format!("{} is not attached", device.display()) }
        } else if st.lost.contains(device) {
            Condition { abnormal: true, message: "connection to the server lost; reconnecting".into() }
        } else {
            Condition { abnormal: false, message: "connected".into() }
        })
    }
}

/// Mounts kept in memory; file systems per device.
#[derive(Debug, Default)]
pub struct FakeMounter {
    state: Mutex<FakeMounts>,
}

#[derive(Debug, Default)]
struct FakeMounts {
    filesystems: BTreeMap<PathBuf, String>,
    mounts: BTreeMap<PathBuf, PathBuf>,
    mkfs_runs: u32,
    grown: u32,
}

impl FakeMounter {
    /// What is mounted where: target -> source.
    pub fn mounts(&self) -> BTreeMap<PathBuf, PathBuf> {
        lock(&self.state).mounts.clone()
    }
    /// How many file systems were made.
    pub fn mkfs_runs(&self) -> u32 {
        lock(&self.state).mkfs_runs
    }
    /// How many file systems were grown.
    pub fn grown(&self) -> u32 {
        lock(&self.state).grown
    }
}

impl Mounter for FakeMounter {
    fn filesystem(&self, device: &Path) -> Result<Option<String>> {
        Ok(lock(&self.state).filesystems.get(device).cloned())
    }
    fn mkfs(&self, device: &Path, fs_type: &str) -> Result<()> {
        let mut st = lock(&self.state);
        st.mkfs_runs += 1;
        st.filesystems.insert(device.to_path_buf(), fs_type.to_string());
        Ok(())
    }
    fn mount(&self, device: &Path, target: &Path, _: &str, _: &[String]) -> Result<()> {
        lock(&self.state).mounts.insert(target.to_path_buf(), device.to_path_buf());
        Ok(())
    }
    fn bind(&self, source: &Path, target: &Path, _: bool) -> Result<()> {
        lock(&self.state).mounts.insert(target.to_path_buf(), source.to_path_buf());
        Ok(())
    }
    fn unmount(&self, target: &Path) -> Result<()> {
        lock(&self.state).mounts.remove(target);
        Ok(())
    }
    fn is_mounted(&self, target: &Path) -> Result<bool> {
        Ok(lock(&self.state).mounts.contains_key(target))
    }
    fn grow_fs(&self, _: &Path, _: &Path, _: &str) -> Result<()> {
        lock(&self.state).grown += 1;
        Ok(())
    }
    fn device_size(&self, _: &Path) -> Result<u64> {
        Ok(FAKE_DEVICE_BYTES)
    }
}
