//! `blockmesh-csi`: the CSI driver's controller (beside the sidecars of a Deployment) and node plugin (in a
//! DaemonSet), serving CSI gRPC on a Unix socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blockmesh_csi::controller::ControllerService;
use blockmesh_csi::daemon::DaemonClient;
use blockmesh_csi::daemons::{
    parse_server_for, Daemons, KubeServerPods, DEFAULT_SERVER_NAMESPACE, DEFAULT_URL_TEMPLATE,
};
use blockmesh_csi::identity::IdentityService;
use blockmesh_csi::kernel::{KernelNbdAttacher, NbdTarget};
use blockmesh_csi::kube::KubeApi;
use blockmesh_csi::node::{NodeServer, NodeService};
use blockmesh_csi::pvc::{KubePvcs, MemoryPvcs, PvcAnnotations, SERVICE_ACCOUNT_DIR};
use blockmesh_csi::server::{self, Services};
use blockmesh_csi::system::SystemMounter;
use blockmesh_csi::targets::{PoolTargets, Targets, DEFAULT_NBD_PORT};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Identity + Controller + GroupController.
    Controller,
    /// Identity + Node.
    Node,
    /// Everything in one process (tests, single-node setups).
    All,
}

/// blockmesh CSI driver.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to serve CSI: `unix:///csi/csi.sock` or a path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// The default blockmesh daemon's control API (controller): the one ids without a node mean.
    #[arg(long, env = "BLOCKMESH_SERVER", default_value = "http://127.0.0.1:32607")]
    server: String,
    /// Another node's daemon, `NODE=URL` (controller; repeatable, or comma-separated in the environment).
    #[arg(long = "server-for", value_name = "NODE=URL", env = "BLOCKMESH_SERVER_FOR", value_delimiter = ',')]
    server_for: Vec<String>,
    /// Find every node's daemon from the server pods (needs --kube): Running, Ready pods labelled
    /// app.kubernetes.io/name=blockmesh, app.kubernetes.io/component=server. The controller routes to them; the node
    /// plugin finds there the server of a pool's volumes (pvcPerNode storage), at POD_IP:--server-nbd-port.
    #[arg(long, env = "BLOCKMESH_DISCOVER_SERVERS", default_value_t = false, action = clap::ArgAction::Set)]
    discover_servers: bool,
    /// The namespace of the server pods (discovery).
    #[arg(long, env = "BLOCKMESH_SERVER_NAMESPACE", default_value = DEFAULT_SERVER_NAMESPACE)]
    server_namespace: String,
    /// A discovered server's API URL; `{ip}` is its pod IP.
    #[arg(long, env = "BLOCKMESH_SERVER_URL_TEMPLATE", default_value = DEFAULT_URL_TEMPLATE)]
    server_url_template: String,
    /// The port server pods serve NBD on (node plugin, with --discover-servers).
    #[arg(long, env = "BLOCKMESH_SERVER_NBD_PORT", default_value_t = DEFAULT_NBD_PORT)]
    server_nbd_port: u16,
    /// File holding the daemon's API key (controller).
    #[arg(long, env = "BLOCKMESH_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// PEM file the daemon's HTTPS certificate is trusted by.
    #[arg(long, env = "BLOCKMESH_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The node the default daemon (--server) stands for.
    #[arg(long, env = "BLOCKMESH_SERVER_NODE")]
    server_node: Option<String>,
    /// This node's name (node plugin).
    #[arg(long, env = "NODE_NAME")]
    node_id: Option<String>,
    /// The daemon's NBD Unix socket (node plugin); `--nbd-address` instead for TCP.
    #[arg(long, env = "BLOCKMESH_NBD_SOCKET")]
    nbd_socket: Option<PathBuf>,
    /// The daemon's NBD `host:port` (node plugin).
    #[arg(long, env = "BLOCKMESH_NBD_ADDRESS")]
    nbd_address: Option<String>,
    /// Where the node plugin keeps its staging records.
    #[arg(long, default_value = "/var/lib/blockmesh-csi")]
    state_dir: PathBuf,
    /// Read PVC annotations from the Kubernetes API (in-cluster service account); off: defaults only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kube: bool,
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let socket = PathBuf::from(args.endpoint.strip_prefix("unix://").unwrap_or(&args.endpoint));
    let mut services = Services::default();
    if matches!(args.mode, Mode::Controller | Mode::All) {
        let key_file = args.api_key_file.as_ref().context("--api-key-file is needed by the controller")?;
        let key = std::fs::read_to_string(key_file).with_context(|| format!("reading {}", key_file.display()))?;
        let client = |url: &str| -> Result<Arc<DaemonClient>> {
            Ok(Arc::new(DaemonClient::new(url, &key, args.ca_cert.as_deref())?))
        };
        let mut fixed = std::collections::BTreeMap::new();
        for arg in &args.server_for {
            let (node, url) = parse_server_for(arg)?;
            fixed.insert(node, client(&url)?);
        }
        let mut daemons = Daemons::new(client(&args.server)?, args.server_node.clone(), fixed)?;
        if args.discover_servers {
            if !args.kube {
                bail!("--discover-servers needs the Kubernetes API (--kube)");
            }
            let api = KubeApi::in_cluster(SERVICE_ACCOUNT_DIR.as_ref()).context("the Kubernetes API (discovery)")?;
            let pods = KubeServerPods::new(api, &args.server_namespace, &args.server_url_template)?;
            daemons = daemons.with_discovery(Box::new(pods), &key, args.ca_cert.as_deref());
        }
        let daemons = Arc::new(daemons);
        let pvcs: Arc<dyn PvcAnnotations> = if args.kube {
            Arc::new(
                KubePvcs::in_cluster(SERVICE_ACCOUNT_DIR.as_ref())
                    .context("the Kubernetes API (--kube=false to go without)")?,
            )
        } else {
            Arc::new(MemoryPvcs::default())
        };
        services.identity = Some(IdentityService::new(Some(daemons.clone())));
        services.controller = Some(Arc::new(ControllerService::new(daemons, pvcs)));
    }
    if matches!(args.mode, Mode::Node | Mode::All) {
        let node = args.node_id.clone().context("--node-id (NODE_NAME) is needed by the node plugin")?;
        let local = match (&args.nbd_socket, &args.nbd_address) {
            (Some(p), _) => Some(NbdTarget::Unix(p.clone())),
            (None, Some(a)) => Some(NbdTarget::Tcp(a.clone())),
            (None, None) => None,
        };
        let targets: Arc<dyn Targets> = match (args.discover_servers, local) {
            (true, local) => {
                if !args.kube {
                    bail!("--discover-servers needs the Kubernetes API (--kube)");
                }
                let api =
                    KubeApi::in_cluster(SERVICE_ACCOUNT_DIR.as_ref()).context("the Kubernetes API (discovery)")?;
                let pods = KubeServerPods::new(api, &args.server_namespace, &args.server_url_template)?.pods_only();
                Arc::new(PoolTargets::new(local, Box::new(pods), args.server_nbd_port))
            }
            (false, Some(local)) => Arc::new(local),
            (false, None) => bail!("the node plugin needs --nbd-socket or --nbd-address (or --discover-servers)"),
        };
        let svc = NodeService::new(
            &node,
            &args.state_dir,
            Arc::new(KernelNbdAttacher::new(targets)),
            Arc::new(SystemMounter),
        )?;
        services.node = Some(NodeServer(Arc::new(svc)));
    }
    let listener = server::bind(&socket)?;
    tracing::info!(socket = %socket.display(), mode = ?args.mode, "blockmesh-csi serving");
    println!("blockmesh-csi serving CSI at unix://{}", socket.display());
    server::serve(services, listener, shutdown()).await?;
    Ok(())
}
