//! The CSI Node service: stage = attach the volume's NBD export to a block device (an [`Attacher`]), make a file
//! system when it has none, mount it; publish = bind mount (or the device itself for raw block volumes).
//!
//! What is staged is written to a state directory (one JSON record per volume, replaced atomically), so repeated
//! calls answer the same and a restarted node plugin still knows which device to unstage. A restarted node plugin
//! reads those records when it starts and adopts their devices ([`Attacher::adopt`]: watched for reconnects again);
//! a record whose device is gone (the node restarted) stays, reported abnormal, until it is staged again or unstaged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::controller::{check_capabilities, TOPOLOGY_NODE_KEY};
use crate::ids::VolumeId;
use crate::pb;
use crate::{Error, Result};

/// File system made on an empty volume when the request names none.
pub const DEFAULT_FS_TYPE: &str = "ext4";
/// File systems the node makes and grows.
pub const SUPPORTED_FS_TYPES: [&str; 2] = ["ext4", "xfs"];
/// Most staging records read and adopted when the node plugin starts: the number of NBD devices the kernel can
/// have (device indexes are minor numbers, 2^20, over 16 partitions each). Records past it are neither read nor
/// adopted (directory order; a warning says how many): they stay on disk, their devices are not watched for
/// reconnects (the kernel attacher reports them abnormal), and NodeUnstageVolume still cleans them up.
pub const MAX_ADOPTED_RECORDS: usize = 1 << 16;
/// The file name ending of a staging record.
const RECORD_EXTENSION: &str = "json";

/// Attaches volumes to block devices.
pub trait Attacher: Send + Sync + std::fmt::Debug {
    /// Attaches the head of `volume` (its NBD export), returning the block device.
    fn attach(&self, volume: &VolumeId) -> Result<PathBuf>;
    /// Detaches a device attached by [`Attacher::attach`] (done when it is not attached).
    fn detach(&self, device: &Path) -> Result<()>;
    /// Watches `device`, attached to `volume` by an earlier process (before the node plugin restarted), as if
    /// [`Attacher::attach`] had made it. [`Error::NotFound`] when the device no longer serves the volume (not
    /// configured any more, e.g. after a node reboot, or serving another volume now); other errors when it cannot
    /// tell. Adopting a device already watched is done.
    fn adopt(&self, volume: &VolumeId, device: &Path) -> Result<()>;
    /// Makes the device take the volume's current size (after a controller expansion); returns it.
    fn refresh_size(&self, volume: &VolumeId, device: &Path) -> Result<u64>;
    /// The device's condition: abnormal (with why) when it is not connected to its server, or lost the connection
    /// and is reconnecting; normal (with what is known) otherwise.
    fn condition(&self, device: &Path) -> Result<Condition>;
}

/// What [`Attacher::condition`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

/// File systems and mounts.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// The file system type on `device`, `None` when it holds none.
    fn filesystem(&self, device: &Path) -> Result<Option<String>>;
    /// Makes a file system of `fs_type` on `device`.
    fn mkfs(&self, device: &Path, fs_type: &str) -> Result<()>;
    /// Mounts `device` (type `fs_type`) at `target`.
    fn mount(&self, device: &Path, target: &Path, fs_type: &str, flags: &[String]) -> Result<()>;
    /// Bind mounts `source` at `target`, read-only when asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Unmounts `target`.
    fn unmount(&self, target: &Path) -> Result<()>;
    /// Whether something is mounted at `target`.
    fn is_mounted(&self, target: &Path) -> Result<bool>;
    /// Grows the file system mounted at `path` from `device` to the device's size.
    fn grow_fs(&self, device: &Path, path: &Path, fs_type: &str) -> Result<()>;
    /// Size of a block device in bytes.
    fn device_size(&self, device: &Path) -> Result<u64>;
}

/// A staged volume, as the state directory keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Staged {
    pub volume_id: String,
    pub device: PathBuf,
    pub staging_path: PathBuf,
    /// A raw block volume (no file system, no staging mount).
    pub block: bool,
    pub fs_type: String,
}

/// What [`NodeService::adopt_staged`] did with the staging records it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Records whose device is watched again.
    pub adopted: usize,
    /// Records whose device could not be adopted (gone, or the attacher could not tell): kept, reported abnormal.
    pub failed: usize,
    /// Record files that could not be read or parsed: skipped (logged with their path).
    pub unreadable: usize,
    /// Records past [`MAX_ADOPTED_RECORDS`], left unread.
    pub left: usize,
}

/// A staged volume whose device was not adopted.
#[derive(Debug, Clone)]
struct Unadopted {
    /// The device no longer serves the volume ([`Error::NotFound`] from the attacher): never detached by us (its
    /// index may serve another volume now), staged afresh when NodeStageVolume comes again.
    gone: bool,
    why: String,
}

/// The Node service.
#[derive(Debug)]
pub struct NodeService {
    node_id: String,
    state_dir: PathBuf,
    attacher: Arc<dyn Attacher>,
    mounter: Arc<dyn Mounter>,
    /// Node operations run one at a time (the CO sends one per volume; this also orders the state files).
    ops: tokio::sync::Mutex<()>,
    /// Staged volumes (by id) whose devices were not adopted when the plugin started.
    unadopted: Mutex<HashMap<String, Unadopted>>,
    /// What the adoption at start did.
    adoption: Adoption,
}

fn required(what: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        Err(Error::InvalidArgument(format!("{what} is required")))
    } else {
        Ok(())
    }
}

fn is_block(cap: &pb::VolumeCapability) -> bool {
    matches!(cap.access_type, Some(pb::volume_capability::AccessType::Block(_)))
}

fn mount_of(cap: &pb::VolumeCapability) -> Option<&pb::volume_capability::MountVolume> {
    match &cap.access_type {
        Some(pb::volume_capability::AccessType::Mount(m)) => Some(m),
        _ => None,
    }
}

fn record_name(volume_id: &str) -> String {
    let hex: String = volume_id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

impl NodeService {
    /// A node service for node `node_id`, keeping its records in `state_dir` (created when missing). The devices
    /// of the records found there are adopted before it returns ([`NodeService::adopt_staged`]; see
    /// [`NodeService::adoption`]): a restarted node plugin watches them for reconnects again before it serves.
    pub fn new(
        node_id: &str,
        state_dir: &Path,
        attacher: Arc<dyn Attacher>,
        mounter: Arc<dyn Mounter>,
    ) -> Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(|e| Error::io(format!("creating {}", state_dir.display()), e))?;
        let mut me = Self {
            node_id: node_id.to_string(),
            state_dir: state_dir.to_path_buf(),
            attacher,
            mounter,
            ops: tokio::sync::Mutex::new(()),
            unadopted: Mutex::new(HashMap::new()),
            adoption: Adoption::default(),
        };
        me.adoption = me.adopt_staged();
        Ok(me)
    }

    /// What the adoption at start did.
    pub fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    fn unadopted(&self) -> std::sync::MutexGuard<'_, HashMap<String, Unadopted>> {
        self.unadopted.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads every staging record in the state directory (up to [`MAX_ADOPTED_RECORDS`]) and asks the attacher to
    /// adopt its device. Nothing here fails the start: an unreadable record is logged with its path and skipped; a
    /// device that cannot be adopted is logged, its record kept (NodeUnstageVolume cleans it up) and its volume's
    /// condition reported abnormal by NodeGetVolumeStats.
    pub fn adopt_staged(&self) -> Adoption {
        let mut done = Adoption::default();
        let entries = match std::fs::read_dir(&self.state_dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(dir = %self.state_dir.display(), error = %e, "cannot list staging records; none adopted");
                return done;
            }
        };
        let mut read = 0;
        for entry in entries {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(e) => {
                    tracing::error!(dir = %self.state_dir.display(), error = %e, "cannot list a staging record; skipped");
                    done.unreadable += 1;
                    continue;
                }
            };
            if path.extension().and_then(|x| x.to_str()) != Some(RECORD_EXTENSION) {
                continue;
            }
            if read == MAX_ADOPTED_RECORDS {
                done.left += 1;
                continue;
            }
            read += 1;
            let s = match self.read_record(&path) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable staging record; skipped");
                    done.unreadable += 1;
                    continue;
                }
            };
            let adopted = VolumeId::parse(&s.volume_id)
                .map_err(|e| Error::InvalidArgument(format!("volume id {:?}: {e}", s.volume_id)))
                .and_then(|volume| self.attacher.adopt(&volume, &s.device));
            match adopted {
                Ok(()) => {
                    tracing::info!(volume = s.volume_id, device = %s.device.display(), "staged device adopted");
                    done.adopted += 1;
                }
                Err(e) => {
                    let gone = matches!(e, Error::NotFound(_));
                    tracing::warn!(
                        volume = s.volume_id,
                        device = %s.device.display(),
                        error = %e,
                        "staged device not adopted; its record is kept until it is staged again or unstaged"
                    );
                    let why = format!("{} is not watched for reconnects: {e}", s.device.display());
                    self.unadopted().insert(s.volume_id.clone(), Unadopted { gone, why });
                    done.failed += 1;
                }
            }
        }
        if done.left > 0 {
            tracing::warn!(
                left = done.left,
                limit = MAX_ADOPTED_RECORDS,
                "more staging records than NBD devices: the rest were not adopted"
            );
        }
        tracing::info!(?done, "staging records adopted");
        done
    }

    /// A record file, checked to be named for its volume.
    fn read_record(&self, path: &Path) -> Result<Staged> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let s: Staged = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Internal(format!("unreadable staging record {}: {e}", path.display())))?;
        if self.record_path(&s.volume_id) != path {
            return Err(Error::Internal(format!(
                "staging record {} is of volume {:?}, named otherwise",
                path.display(),
                s.volume_id
            )));
        }
        Ok(s)
    }

    /// Whether a staged volume's device serves it: `true` when it was adopted (or is adopted now, retried when it
    /// failed for another reason than the device being gone); `false` when the device is gone (the record, and
    /// the staging mount if any, are dropped, so the volume is staged afresh).
    fn still_staged(&self, s: &Staged) -> Result<bool> {
        let Some(u) = self.unadopted().get(&s.volume_id).cloned() else {
            return Ok(true);
        };
        if !u.gone {
            let volume = VolumeId::parse(&s.volume_id)
                .map_err(|_| Error::NotFound(format!("volume {:?} does not exist", s.volume_id)))?;
            match self.attacher.adopt(&volume, &s.device) {
                Ok(()) => {
                    self.unadopted().remove(&s.volume_id);
                    tracing::info!(volume = s.volume_id, device = %s.device.display(), "staged device adopted");
                    return Ok(true);
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        tracing::warn!(
            volume = s.volume_id,
            device = %s.device.display(),
            "the staged device is gone (the node restarted?): staging the volume again"
        );
        if !s.block && self.mounter.is_mounted(&s.staging_path)? {
            self.mounter.unmount(&s.staging_path)?;
        }
        self.forget(&s.volume_id)?;
        self.unadopted().remove(&s.volume_id);
        Ok(false)
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.state_dir.join(record_name(volume_id))
    }

    /// The record of a staged volume.
    pub fn staged(&self, volume_id: &str) -> Result<Option<Staged>> {
        let path = self.record_path(volume_id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Internal(format!("unreadable staging record {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    fn save(&self, s: &Staged) -> Result<()> {
        let path = self.record_path(&s.volume_id);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(s).map_err(|e| Error::Internal(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    fn forget(&self, volume_id: &str) -> Result<()> {
        let path = self.record_path(volume_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a volume whose id names another node's daemon (`FAILED_PRECONDITION`): its pool is not this node's,
    /// and the node's NBD socket serves this node's pool only. Ids without a node pass (the default daemon's), and
    /// so do ids of a pool (`pool=PVC`): its server is reached over the network wherever it runs
    /// ([`crate::targets`]).
    pub fn check_node(&self, volume_id: &str) -> Result<()> {
        let Ok(id) = VolumeId::parse(volume_id) else { return Ok(()) };
        match id.node {
            Some(home) if crate::ids::pool_of(&home).is_some() => Ok(()),
            Some(node) if node != self.node_id => Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is on node {node}'s blockmesh server; this is node {}: it can only be used on \
                 node {node}",
                self.node_id
            ))),
            _ => Ok(()),
        }
    }

    fn stage(&self, r: &pb::NodeStageVolumeRequest) -> Result<()> {
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
        check_capabilities(std::slice::from_ref(cap))?;
        let volume = VolumeId::parse(&r.volume_id)
            .map_err(|_| Error::NotFound(format!("volume {:?} does not exist", r.volume_id)))?;
        let staging = PathBuf::from(&r.staging_target_path);
        let block = is_block(cap);
        let fs_type = match mount_of(cap).map(|m| m.fs_type.as_str()) {
            None | Some("") => DEFAULT_FS_TYPE.to_string(),
            Some(t) if SUPPORTED_FS_TYPES.contains(&t) => t.to_string(),
            Some(t) => {
                return Err(Error::InvalidArgument(format!(
                    "fs_type {t} is not supported (one of {})",
                    SUPPORTED_FS_TYPES.join(", ")
                )))
            }
        };
        if let Some(s) = self.staged(&r.volume_id)? {
            if s.staging_path == staging && s.block == block && (block || s.fs_type == fs_type) {
                if self.still_staged(&s)? {
                    return Ok(());
                }
            } else {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged already at {} as {}; unstage it first",
                    r.volume_id,
                    s.staging_path.display(),
                    if s.block { "a block device".to_string() } else { format!("{} file system", s.fs_type) }
                )));
            }
        }
        let device = self.attacher.attach(&volume)?;
        let staged = Staged {
            volume_id: r.volume_id.clone(),
            device: device.clone(),
            staging_path: staging.clone(),
            block,
            fs_type,
        };
        let done = (|| {
            // Recorded before mounting: a failure part way still leaves a record to unstage from.
            self.save(&staged)?;
            if block {
                return Ok(());
            }
            let fs = match self.mounter.filesystem(&device)? {
                Some(fs) => fs,
                None => {
                    self.mounter.mkfs(&device, &staged.fs_type)?;
                    staged.fs_type.clone()
                }
            };
            std::fs::create_dir_all(&staging).map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
            if !self.mounter.is_mounted(&staging)? {
                let flags = mount_of(cap).map(|m| m.mount_flags.clone()).unwrap_or_default();
                self.mounter.mount(&device, &staging, &fs, &flags)?;
            }
            Ok(())
        })();
        if let Err(e) = done {
            let _ = self.forget(&staged.volume_id);
            if let Err(d) = self.attacher.detach(&device) {
                tracing::error!(device = %device.display(), error = %d, "detaching after a failed stage");
            }
            return Err(e);
        }
        tracing::info!(volume = %r.volume_id, device = %device.display(), "volume staged");
        Ok(())
    }

    fn unstage(&self, volume_id: &str, staging: &Path) -> Result<()> {
        if self.mounter.is_mounted(staging)? {
            self.mounter.unmount(staging)?;
        }
        if let Some(s) = self.staged(volume_id)? {
            let gone = self.unadopted().get(volume_id).is_some_and(|u| u.gone);
            if gone {
                // after a node restart its index may serve another volume now: not ours to disconnect
                tracing::info!(volume = volume_id, device = %s.device.display(), "device gone; not detached");
            } else {
                self.attacher.detach(&s.device)?;
            }
            self.forget(volume_id)?;
            self.unadopted().remove(volume_id);
            tracing::info!(volume = volume_id, device = %s.device.display(), "volume unstaged");
        }
        Ok(())
    }

    fn publish(&self, r: &pb::NodePublishVolumeRequest) -> Result<()> {
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
        check_capabilities(std::slice::from_ref(cap))?;
        let s = self
            .staged(&r.volume_id)?
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {} is not staged on this node", r.volume_id)))?;
        if s.staging_path != Path::new(&r.staging_target_path) {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged at {}, not {}",
                r.volume_id,
                s.staging_path.display(),
                r.staging_target_path
            )));
        }
        if s.block != is_block(cap) {
            return Err(Error::AlreadyExists(format!(
                "volume {} is staged as {}",
                r.volume_id,
                if s.block { "a block device" } else { "a file system" }
            )));
        }
        let target = PathBuf::from(&r.target_path);
        if self.mounter.is_mounted(&target)? {
            return Ok(());
        }
        let mk = |p: &Path, dir: bool| -> Result<()> {
            let made = if dir {
                std::fs::create_dir_all(p)
            } else {
                p.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|_| {
                    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(p).map(drop)
                })
            };
            made.map_err(|e| Error::io(format!("creating {}", p.display()), e))
        };
        if s.block {
            mk(&target, false)?;
            self.mounter.bind(&s.device, &target, r.readonly)
        } else {
            mk(&target, true)?;
            self.mounter.bind(&s.staging_path, &target, r.readonly)
        }
    }

    fn unpublish(&self, target: &Path) -> Result<()> {
        if self.mounter.is_mounted(target)? {
            self.mounter.unmount(target)?;
        }
        let meta = match std::fs::symlink_metadata(target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("reading {}", target.display()), e)),
        };
        let removed = if meta.is_dir() { std::fs::remove_dir(target) } else { std::fs::remove_file(target) };
        removed.map_err(|e| Error::io(format!("removing {}", target.display()), e))
    }

    /// The volume's usage, and its device's condition.
    fn stats(&self, volume_id: &str, path: &Path) -> Result<(Vec<pb::VolumeUsage>, Condition)> {
        let s =
            self.staged(volume_id)?.ok_or_else(|| Error::NotFound(format!("volume {volume_id} is not staged here")))?;
        if !path.exists() {
            return Err(Error::NotFound(format!("volume path {} does not exist", path.display())));
        }
        let unit = |u: pb::volume_usage::Unit, total: u64, available: u64| pb::VolumeUsage {
            total: i64::try_from(total).unwrap_or(i64::MAX),
            available: i64::try_from(available).unwrap_or(i64::MAX),
            used: i64::try_from(total.saturating_sub(available)).unwrap_or(i64::MAX),
            unit: u as i32,
        };
        let unadopted = self.unadopted().get(volume_id).map(|u| u.why.clone());
        let condition = match unadopted {
            Some(why) => Condition { abnormal: true, message: why },
            None => self.attacher.condition(&s.device)?,
        };
        if s.block {
            let usage = match self.mounter.device_size(&s.device) {
                Ok(size) => vec![unit(pb::volume_usage::Unit::Bytes, size, 0)],
                // a device that is gone has no size; its condition says why
                Err(_) if condition.abnormal => Vec::new(),
                Err(e) => return Err(e),
            };
            return Ok((usage, condition));
        }
        let st = rustix::fs::statvfs(path).map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
        let usage = vec![
            unit(pb::volume_usage::Unit::Bytes, st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize),
            unit(pb::volume_usage::Unit::Inodes, st.f_files, st.f_favail),
        ];
        Ok((usage, condition))
    }

    fn expand(&self, volume_id: &str, path: &Path) -> Result<u64> {
        let volume =
            VolumeId::parse(volume_id).map_err(|_| Error::NotFound(format!("volume {volume_id:?} does not exist")))?;
        let s =
            self.staged(volume_id)?.ok_or_else(|| Error::NotFound(format!("volume {volume_id} is not staged here")))?;
        if !path.exists() {
            return Err(Error::NotFound(format!("volume path {} does not exist", path.display())));
        }
        let size = self.attacher.refresh_size(&volume, &s.device)?;
        if !s.block {
            self.mounter.grow_fs(&s.device, &s.staging_path, &s.fs_type)?;
        }
        Ok(size)
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&NodeService) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _guard = self.ops.lock().await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::Internal(format!("node task failed: {e}")))?
    }
}

/// The gRPC face of a shared [`NodeService`].
#[derive(Debug, Clone)]
pub struct NodeServer(pub Arc<NodeService>);

#[tonic::async_trait]
impl pb::node_server::Node for NodeServer {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        required("staging_target_path", &r.staging_target_path)?;
        self.0.check_node(&r.volume_id)?;
        self.0.blocking(move |n| n.stage(&r)).await?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        required("staging_target_path", &r.staging_target_path)?;
        self.0.blocking(move |n| n.unstage(&r.volume_id, Path::new(&r.staging_target_path))).await?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        required("staging_target_path", &r.staging_target_path)?;
        required("target_path", &r.target_path)?;
        self.0.check_node(&r.volume_id)?;
        self.0.blocking(move |n| n.publish(&r)).await?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        required("target_path", &r.target_path)?;
        self.0.blocking(move |n| n.unpublish(Path::new(&r.target_path))).await?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        let (usage, c) = self.0.blocking(move |n| n.stats(&r.volume_id, Path::new(&r.volume_path))).await?;
        let volume_condition = Some(pb::VolumeCondition { abnormal: c.abnormal, message: c.message });
        Ok(Response::new(pb::NodeGetVolumeStatsResponse { usage, volume_condition }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        let size = self.0.blocking(move |n| n.expand(&r.volume_id, Path::new(&r.volume_path))).await?;
        Ok(Response::new(pb::NodeExpandVolumeResponse { capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX) }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{rpc::Type as T, Rpc, Type};
        let capabilities = [T::StageUnstageVolume, T::GetVolumeStats, T::ExpandVolume, T::VolumeCondition]
            .into_iter()
            .map(|t| pb::NodeServiceCapability { r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })) })
            .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(pb::Topology {
                segments: [(TOPOLOGY_NODE_KEY.to_string(), self.0.node_id.clone())].into(),
            }),
        }))
    }
}
