//! Shared by the driver's tests: a real `blockmesh serve` on a temp dir, the driver on a Unix socket in the same
//! process (fake attacher and mounter under the node service), and tonic clients over that socket.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockmesh_csi::controller::ControllerService;
use blockmesh_csi::daemon::DaemonClient;
use blockmesh_csi::daemons::Daemons;
use blockmesh_csi::identity::IdentityService;
use blockmesh_csi::node::{NodeServer, NodeService};
use blockmesh_csi::pb;
use blockmesh_csi::pvc::MemoryPvcs;
use blockmesh_csi::server::{self, Services};
use blockmesh_csi::testing::{FakeAttacher, FakeMounter};
use tonic::transport::Channel;

/// Longest wait for the daemon to start.
const DAEMON_START: Duration = Duration::from_secs(60);

/// True when `tool` is on the PATH. Under `CI=true` a missing tool fails the test instead of skipping it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} is required under CI=true but not installed");
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// The `blockmesh` binary: `BLOCKMESH_BIN`, or the workspace's target directory (built there when missing).
pub fn blockmesh_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BLOCKMESH_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> -> target/<profile>/blockmesh
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let bin = dir.join("blockmesh");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        // Up to date even when only this crate's tests were asked for (cargo test -p blockmesh-csi).
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.args(["build", "-q", "-p", "blockmesh", "--bin", "blockmesh"]);
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            c.arg("--release");
        }
        let ok = c.current_dir(env!("CARGO_MANIFEST_DIR")).status().is_ok_and(|s| s.success());
        assert!(ok || bin.exists(), "cannot build the blockmesh binary");
    });
    bin
}

/// A running daemon, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub data: PathBuf,
    pub api: String,
    pub nbd: String,
    pub nbd_socket: PathBuf,
}

impl Daemon {
    pub fn start(data: &Path) -> Daemon {
        let mut child = Command::new(blockmesh_bin())
            .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--pool-size", "1G"])
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let start = Instant::now();
        let line = loop {
            assert!(start.elapsed() < DAEMON_START, "daemon did not start");
            let l = lines.next().expect("daemon exited").unwrap();
            if l.starts_with("blockmesh serving") {
                break l;
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let api = line.split("control API at ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        let nbd = line.split("nbd://").nth(1).unwrap().split([' ', ',']).next().unwrap().to_string();
        let key = std::fs::read_to_string(data.join("api-key")).unwrap();
        let info = DaemonClient::new(&api, &key, None).unwrap().info().unwrap();
        Daemon { child, data: data.to_path_buf(), api, nbd, nbd_socket: PathBuf::from(info.nbd_socket) }
    }

    pub fn key(&self) -> String {
        std::fs::read_to_string(self.data.join("api-key")).unwrap().trim().to_string()
    }

    pub fn client(&self) -> DaemonClient {
        DaemonClient::new(&self.api, &self.key(), None).unwrap()
    }

    /// `nbd://ADDR/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The driver served on a Unix socket, with clients of each service.
pub struct Driver {
    pub daemon: Daemon,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub pvcs: Arc<MemoryPvcs>,
    pub attacher: Arc<FakeAttacher>,
    pub mounter: Arc<FakeMounter>,
    pub identity: pb::identity_client::IdentityClient<Channel>,
    pub controller: pb::controller_client::ControllerClient<Channel>,
    pub group: pb::group_controller_client::GroupControllerClient<Channel>,
    pub node: pb::node_client::NodeClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The node the daemon stands for, in tests.
pub const SERVER_NODE: &str = "node-a";

/// A volume or snapshot id as the driver hands it out for [`SERVER_NODE`]'s daemon: `node-a:ID`.
pub fn vid(id: &str) -> String {
    format!("{SERVER_NODE}:{id}")
}

/// Serves `services` on `csi.sock` in `dir`: the socket, a channel to it, and what stops the server when sent or
/// dropped.
pub async fn serve_in(dir: &Path, services: Services) -> (PathBuf, Channel, tokio::sync::oneshot::Sender<()>) {
    let socket = dir.join("csi.sock");
    let listener = server::bind(&socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(services, listener, async move {
        let _ = stopped.await;
    }));
    let channel = connect(&socket).await;
    (socket, channel, stop)
}

impl Driver {
    pub async fn start() -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let daemon = tokio::task::block_in_place(|| Daemon::start(&data));
        let client = Arc::new(daemon.client());
        let daemons = Arc::new(Daemons::single(client, Some(SERVER_NODE.into())).unwrap());
        let pvcs = Arc::new(MemoryPvcs::default());
        let attacher = Arc::new(FakeAttacher::new(dir.path()));
        let mounter = Arc::new(FakeMounter::default());
        let node = NodeService::new(SERVER_NODE, &dir.path().join("state"), attacher.clone(), mounter.clone()).unwrap();
        let services = Services {
            identity: Some(IdentityService::new(Some(daemons.clone()))),
            controller: Some(Arc::new(ControllerService::new(daemons, pvcs.clone()))),
            node: Some(NodeServer(Arc::new(node))),
        };
        let (socket, channel, stop) = serve_in(dir.path(), services).await;
        Driver {
            daemon,
            socket,
            pvcs,
            attacher,
            mounter,
            identity: pb::identity_client::IdentityClient::new(channel.clone()),
            controller: pb::controller_client::ControllerClient::new(channel.clone()),
            group: pb::group_controller_client::GroupControllerClient::new(channel.clone()),
            node: pb::node_client::NodeClient::new(channel),
            dir,
            stop: Some(stop),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A gRPC channel over a Unix socket.
pub async fn connect(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap()
}

/// A mount, single-node-writer capability.
pub fn mount_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

/// A raw block, single-node-writer capability.
pub fn block_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    pb::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A CreateVolume request of `bytes` for `name`, with StorageClass/PVC parameters.
pub fn create_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap()],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

/// Runs qemu-io commands on `uri` (read-only with `ro`); panics when they fail or report a mismatch.
pub fn qemu_io(uri: &str, ro: bool, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if ro {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("Pattern verification failed"), "qemu-io {uri} {cmds:?}: {text}");
}

/// The gRPC code of a call's error (panics when it succeeded).
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// The node of the second daemon, in tests with two.
pub const SECOND_NODE: &str = "node-b";

/// Two daemons, each on its own temp dir and ports, behind one controller with the static map
/// [`SERVER_NODE`] -> `a`, [`SECOND_NODE`] -> `b` (`--server a --server-for node-a=a --server-for node-b=b`: the
/// default daemon is `a`, of no node); the node plugin is [`SERVER_NODE`]'s.
pub struct TwoNodes {
    pub a: Daemon,
    pub b: Daemon,
    pub dir: tempfile::TempDir,
    pub pvcs: Arc<MemoryPvcs>,
    pub identity: pb::identity_client::IdentityClient<Channel>,
    pub controller: pb::controller_client::ControllerClient<Channel>,
    pub group: pb::group_controller_client::GroupControllerClient<Channel>,
    pub node: pb::node_client::NodeClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TwoNodes {
    pub async fn start() -> TwoNodes {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = tokio::task::block_in_place(|| {
            (Daemon::start(&dir.path().join("data-a")), Daemon::start(&dir.path().join("data-b")))
        });
        let ca = Arc::new(a.client());
        let fixed = std::collections::BTreeMap::from([
            (SERVER_NODE.to_string(), ca.clone()),
            (SECOND_NODE.to_string(), Arc::new(b.client())),
        ]);
        let daemons = Arc::new(Daemons::new(ca, None, fixed).unwrap());
        let pvcs = Arc::new(MemoryPvcs::default());
        let attacher = Arc::new(FakeAttacher::new(dir.path()));
        let mounter = Arc::new(FakeMounter::default());
        let node = NodeService::new(SERVER_NODE, &dir.path().join("state"), attacher, mounter).unwrap();
        let services = Services {
            identity: Some(IdentityService::new(Some(daemons.clone()))),
            controller: Some(Arc::new(ControllerService::new(daemons, pvcs.clone()))),
            node: Some(NodeServer(Arc::new(node))),
        };
        let (_socket, channel, stop) = serve_in(dir.path(), services).await;
        TwoNodes {
            a,
            b,
            pvcs,
            identity: pb::identity_client::IdentityClient::new(channel.clone()),
            controller: pb::controller_client::ControllerClient::new(channel.clone()),
            group: pb::group_controller_client::GroupControllerClient::new(channel.clone()),
            node: pb::node_client::NodeClient::new(channel),
            dir,
            stop: Some(stop),
        }
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A topology naming `node`.
pub fn topology(node: &str) -> pb::Topology {
    pb::Topology {
        segments: [(blockmesh_csi::controller::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into_iter().collect(),
    }
}

/// `req` with the topology external-provisioner passes: `preferred` and `requisite` nodes.
pub fn on_nodes(mut req: pb::CreateVolumeRequest, preferred: &[&str], requisite: &[&str]) -> pb::CreateVolumeRequest {
    req.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: requisite.iter().map(|n| topology(n)).collect(),
        preferred: preferred.iter().map(|n| topology(n)).collect(),
    });
    req
}
