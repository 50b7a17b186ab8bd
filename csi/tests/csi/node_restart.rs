//! A restart of the node plugin: a new Node service on the same state directory adopts the devices of the volumes
//! staged before (the fake attacher records the adopt calls); a device that is gone (a node reboot) is reported
//! abnormal, can still be unstaged, and is staged afresh when NodeStageVolume comes again; a corrupt record is
//! skipped. The Node service is called directly (no daemon: the fakes stand for the kernel).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockmesh_csi::node::{Adoption, Mounter as _, NodeServer, NodeService};
use blockmesh_csi::pb;
use blockmesh_csi::pb::node_server::Node;
use blockmesh_csi::testing::{FakeAttacher, FakeMounter};
use tonic::Request;

const NODE: &str = "node-a";
const MOUNTED: &str = "admin/app/__default__";
const RAW: &str = "admin/raw/__default__";

fn mount_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn block_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    pb::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A node plugin process: its attacher (fresh per process, as the kernel attacher's monitors are) and service.
struct Plugin {
    attacher: Arc<FakeAttacher>,
    node: NodeServer,
}

/// Test files: devices and staging paths under `dir`; records in `dir/state`; the mounts (the kernel's) shared by
/// every plugin process.
struct Node0 {
    dir: tempfile::TempDir,
    mounter: Arc<FakeMounter>,
}

impl Node0 {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), mounter: Arc::new(FakeMounter::default()) }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn staging(&self, volume: &str) -> PathBuf {
        self.dir.path().join("staging").join(volume.replace('/', "_"))
    }

    /// Starts a node plugin process; `before` runs on its attacher first (what the kernel holds at that time).
    fn start(&self, before: impl FnOnce(&FakeAttacher)) -> Plugin {
        let attacher = Arc::new(FakeAttacher::new(self.dir.path()));
        before(&attacher);
        let svc = NodeService::new(NODE, &self.state(), attacher.clone(), self.mounter.clone()).unwrap();
        Plugin { attacher, node: NodeServer(Arc::new(svc)) }
    }
}

impl Plugin {
    fn adoption(&self) -> Adoption {
        self.node.0.adoption().clone()
    }

    async fn stage(&self, n: &Node0, volume: &str, cap: pb::VolumeCapability) {
        let r = pb::NodeStageVolumeRequest {
            volume_id: volume.into(),
            staging_target_path: n.staging(volume).display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        };
        self.node.node_stage_volume(Request::new(r)).await.unwrap();
    }

    async fn unstage(&self, n: &Node0, volume: &str) {
        let r = pb::NodeUnstageVolumeRequest {
            volume_id: volume.into(),
            staging_target_path: n.staging(volume).display().to_string(),
        };
        self.node.node_unstage_volume(Request::new(r)).await.unwrap();
    }

    async fn condition(&self, volume: &str, path: &Path) -> pb::VolumeCondition {
        let r = pb::NodeGetVolumeStatsRequest {
            volume_id: volume.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        };
        self.node.node_get_volume_stats(Request::new(r)).await.unwrap().into_inner().volume_condition.unwrap()
    }

    fn device_of(&self, n: &Node0, volume: &str) -> PathBuf {
        self.node.0.staged(volume).unwrap().unwrap_or_else(|| panic!("{volume} not staged in {:?}", n.state())).device
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_plugin_adopts_every_staged_device() {
    let n = Node0::new();
    let first = n.start(|_| {});
    assert_eq!(first.adoption(), Adoption::default(), "nothing staged yet");
    first.stage(&n, MOUNTED, mount_cap()).await;
    first.stage(&n, RAW, block_cap()).await;
    let devices = [(MOUNTED, first.device_of(&n, MOUNTED)), (RAW, first.device_of(&n, RAW))];
    assert!(first.attacher.adopt_calls().is_empty(), "nothing adopted by the process that attached");
    drop(first);

    let second = n.start(|_| {});
    assert_eq!(second.adoption(), Adoption { adopted: 2, ..Default::default() });
    let mut calls = second.attacher.adopt_calls();
    calls.sort();
    let mut expected: Vec<_> = devices.iter().map(|(v, d)| (v.to_string(), d.clone())).collect();
    expected.sort();
    assert_eq!(calls, expected, "each record's device adopted for its volume");
    for (volume, _) in &devices {
        let c = second.condition(volume, n.dir.path()).await;
        assert!(!c.abnormal, "{volume}: {c:?}");
    }
    // staging again answers as before, without attaching; a new volume gets a device of its own
    second.stage(&n, MOUNTED, mount_cap()).await;
    second.stage(&n, "admin/new/__default__", mount_cap()).await;
    let attached = second.attacher.attached();
    assert_eq!(attached.len(), 3, "{attached:?}");
    for volume in [MOUNTED, RAW, "admin/new/__default__"] {
        second.unstage(&n, volume).await;
    }
    assert!(second.attacher.attached().is_empty());
    assert!(std::fs::read_dir(n.state()).unwrap().next().is_none(), "every record removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gone_after_a_restart_is_abnormal_and_still_unstages() {
    let n = Node0::new();
    let first = n.start(|_| {});
    first.stage(&n, MOUNTED, mount_cap()).await;
    first.stage(&n, RAW, block_cap()).await;
    let (gone, kept) = (first.device_of(&n, RAW), first.device_of(&n, MOUNTED));
    drop(first);

    let second = n.start(|a| a.set_gone(&gone));
    assert_eq!(second.adoption(), Adoption { adopted: 1, failed: 1, ..Default::default() });
    assert_eq!(second.attacher.adopt_calls().len(), 2, "both tried");
    let c = second.condition(RAW, n.dir.path()).await;
    assert!(c.abnormal, "{c:?}");
    assert!(c.message.contains("not watched for reconnects") && c.message.contains("not configured"), "{c:?}");
    assert!(!second.condition(MOUNTED, n.dir.path()).await.abnormal);
    // the record is kept until unstaged; unstaging does not detach a device that is not ours any more
    assert_eq!(second.node.0.staged(RAW).unwrap().unwrap().device, gone);
    second.unstage(&n, RAW).await;
    assert!(second.node.0.staged(RAW).unwrap().is_none(), "record removed");
    assert!(gone.exists(), "the gone device was not detached");
    second.unstage(&n, MOUNTED).await;
    assert!(!kept.exists(), "the adopted device was detached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_whose_device_is_gone_is_staged_afresh() {
    let n = Node0::new();
    let first = n.start(|_| {});
    first.stage(&n, MOUNTED, mount_cap()).await;
    let old = first.device_of(&n, MOUNTED);
    drop(first);
    // a node reboot: the device and the staging mount are gone
    n.mounter.unmount(&n.staging(MOUNTED)).unwrap();
    std::fs::remove_file(&old).unwrap();

    let second = n.start(|_| {});
    assert_eq!(second.adoption(), Adoption { failed: 1, ..Default::default() });
    assert!(second.condition(MOUNTED, n.dir.path()).await.abnormal);
    second.stage(&n, MOUNTED, mount_cap()).await;
    let attached = second.attacher.attached();
    assert_eq!(attached.values().collect::<Vec<_>>(), vec![MOUNTED], "attached again");
    let device = second.device_of(&n, MOUNTED);
    assert_eq!(n.mounter.mounts().get(&n.staging(MOUNTED)), Some(&device), "mounted again");
    assert!(!second.condition(MOUNTED, n.dir.path()).await.abnormal);
    second.unstage(&n, MOUNTED).await;
    assert!(second.attacher.attached().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_staging_record_is_skipped_at_start() {
    let n = Node0::new();
    let first = n.start(|_| {});
    first.stage(&n, MOUNTED, mount_cap()).await;
    let device = first.device_of(&n, MOUNTED);
    drop(first);
    // a torn write, a record named for another volume, and what is not a record
    std::fs::write(n.state().join("61646d696e2f782f5f5f64656661756c745f5f.json"), b"{\"volume_id\": \"adm").unwrap();
    let misnamed = std::fs::read(
        n.state().join(format!("{}.json", MOUNTED.bytes().map(|b| format!("{b:02x}")).collect::<String>())),
    )
    .unwrap();
    std::fs::write(n.state().join("6162.json"), misnamed).unwrap();
    std::fs::write(n.state().join("leftover.tmp"), b"half").unwrap();

    let second = n.start(|_| {});
    assert_eq!(second.adoption(), Adoption { adopted: 1, unreadable: 2, ..Default::default() });
    assert_eq!(second.attacher.adopt_calls(), vec![(MOUNTED.to_string(), device)]);
    assert!(!second.condition(MOUNTED, n.dir.path()).await.abnormal);
    second.unstage(&n, MOUNTED).await;
}
