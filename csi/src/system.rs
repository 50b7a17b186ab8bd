//! The real [`Mounter`]: `blkid`, `mkfs.*`, `mount`, `resize2fs` / `xfs_growfs`, and `/proc/self/mountinfo`.

use std::path::Path;
use std::process::Command;

use crate::node::Mounter;
use crate::{Error, Result};

/// `blkid`'s exit code when the device holds nothing it knows.
const BLKID_NOTHING_FOUND: i32 = 2;

fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| Error::io(format!("running {what}"), e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `target` is a mount point in a mountinfo text.
pub fn mounted_in(mountinfo: &str, target: &Path) -> bool {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).any(|p| Path::new(&unescape(p)) == target)
}

/// The host's mounts and file system tools.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemMounter;

impl Mounter for SystemMounter {
    fn filesystem(&self, device: &Path) -> Result<Option<String>> {
        let out = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(device)
            .output()
            .map_err(|e| Error::io("running blkid", e))?;
        match out.status.code() {
            Some(0) => {
                let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok(if t.is_empty() { None } else { Some(t) })
            }
            Some(BLKID_NOTHING_FOUND) => Ok(None),
            _ => Err(Error::Internal(format!(
                "blkid {} failed ({}): {}",
                device.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    fn mkfs(&self, device: &Path, fs_type: &str) -> Result<()> {
        let mut cmd = Command::new(format!("mkfs.{fs_type}"));
        match fs_type {
            "ext4" => cmd.args(["-F", "-q"]),
            _ => cmd.arg("-q"),
        };
        run(cmd.arg(device)).map(drop)
    }

    fn mount(&self, device: &Path, target: &Path, fs_type: &str, flags: &[String]) -> Result<()> {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fs_type]);
        if !flags.is_empty() {
            cmd.arg("-o").arg(flags.join(","));
        }
        run(cmd.arg(device).arg(target)).map(drop)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        run(Command::new("mount").arg("--bind").arg(source).arg(target))?;
        if read_only {
            run(Command::new("mount").args(["-o", "remount,bind,ro"]).arg(target))?;
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty())
            .map_err(|e| Error::io(format!("unmounting {}", target.display()), e.into()))
    }

    fn is_mounted(&self, target: &Path) -> Result<bool> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
        Ok(mounted_in(&info, target))
    }

    fn grow_fs(&self, device: &Path, path: &Path, fs_type: &str) -> Result<()> {
        match fs_type {
            "xfs" => run(Command::new("xfs_growfs").arg(path)).map(drop),
            _ => run(Command::new("resize2fs").arg(device)).map(drop),
        }
    }

    fn device_size(&self, device: &Path) -> Result<u64> {
        use std::io::Seek;
        let mut f = std::fs::File::open(device).map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
        f.seek(std::io::SeekFrom::End(0)).map_err(|e| Error::io(format!("sizing {}", device.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_read_with_escapes() {
        let info = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/nbd0 rw\n\
                    37 35 98:0 / /var/lib/kubelet/x rw - ext4 /dev/nbd1 rw\n";
        assert!(mounted_in(info, Path::new("/mnt/a b")));
        assert!(mounted_in(info, Path::new("/var/lib/kubelet/x")));
        assert!(!mounted_in(info, Path::new("/mnt/a")));
    }
}
