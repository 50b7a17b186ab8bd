//! The `blockmesh` binary: `blockmesh serve` runs the node daemon (engine + NBD + control API); the other
//! subcommands are its client (see `client.rs`).

mod api_server;
mod client;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blockmesh::api::{self, ApiState, ServerInfo};
use blockmesh::metrics::Metrics;
use blockmesh::nbd_export::{PoolExports, Sessions};
use blockmesh::qos::QosRegistry;
use blockmesh::size::parse_size;
use blockmesh_engine::io::FileDevice;
use blockmesh_engine::{Pool, PoolOptions};
use blockmesh_nbd::{Server, ServerConfig, TlsMode};
use clap::{Parser, Subcommand, ValueEnum};

/// Pool file name inside the data directory.
/// The pool file's name in DATA_DIR when `--pool` is not given: `<pool name>.bm`.
const DEFAULT_POOL_NAME: &str = "pool";
/// See [`DEFAULT_POOL_NAME`].
const POOL_FILE_SUFFIX: &str = ".bm";
/// Longest pool name (as the operator's `poolName`).
const MAX_POOL_NAME_LEN: usize = 63;
/// Unix socket name inside the data directory.
const NBD_SOCKET: &str = "nbd.sock";
#[derive(Parser, Debug)]
#[command(name = "blockmesh", version, about = "git for block volumes: commits, branches and clones, served over NBD")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node daemon: open (or create) the pool, serve its volumes over NBD and the control API over HTTP.
    Serve(ServeArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Tls {
    /// Offer STARTTLS; clients may stay in the clear.
    Optional,
    /// Serve nothing in the clear.
    Required,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Where the pool, socket and keys live [default: ./blockmesh-data, or /var/lib/blockmesh as root].
    #[arg(long, env = "BLOCKMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The pool: a block device or an existing pool file [default: DATA_DIR/<pool name>.bm, created sparse when
    /// missing].
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Name of the pool file made in DATA_DIR when --pool is not given (the operator's `poolName`): 1 to 63 letters,
    /// digits, '-', '_' or '.', starting with a letter.
    #[arg(long, env = "BLOCKMESH_POOL_NAME", default_value = DEFAULT_POOL_NAME, value_parser = parse_pool_name)]
    pool_name: String,
    /// Size of a newly created pool file [default: 10G]; given for an existing pool file that is smaller, the file
    /// is enlarged and the pool grows into it. (A block device or file enlarged by other means is taken at start.)
    #[arg(long, value_parser = parse_size)]
    pool_size: Option<u64>,
    /// Open the pool with O_DIRECT: reads and writes bypass the page cache (as databases and hypervisors use a
    /// disk), so the pool's data is not cached twice; not available on tmpfs.
    #[arg(long)]
    direct_io: bool,
    /// TCP address for NBD clients.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: SocketAddr,
    /// Unix socket for NBD clients [default: DATA_DIR/nbd.sock].
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// PEM certificate chain for NBD over TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for NBD over TLS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to (clients without one are refused).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Whether TLS is offered or required (with --tls-cert).
    #[arg(long, value_enum, default_value = "required")]
    tls: Tls,
    /// Fair sharing of the engine between volumes: at most this many NBD requests of all volumes run in the engine
    /// at once, handed out fairly (a volume with a deep queue cannot hold up one with a shallow queue); 0 turns
    /// fairness off (each connection then runs up to its own in-flight limit).
    #[arg(long, default_value_t = blockmesh_nbd::DEFAULT_FAIR_SLOTS)]
    fair_slots: usize,
    /// TCP address of the HTTP+JSON control API.
    #[arg(long, default_value = api::DEFAULT_API_LISTEN)]
    api_listen: SocketAddr,
    /// TCP address of a health endpoint for probes (plain HTTP, `GET /healthz` only, no key: 200 while the pool takes
    /// changes, 503 once a device error has failed it) [default: none].
    #[arg(long, env = "BLOCKMESH_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// A syslog server (UDP; `HOST`, `HOST:PORT`, `IP`, `IP:PORT`, port 514 by default) that gets the daemon's logs
    /// too, one RFC 5424 datagram per event (the operator's `logAddress`; empty: none) [default: standard error
    /// only].
    #[arg(long, env = "BLOCKMESH_LOG_ADDRESS")]
    log_address: Option<String>,
    /// Where to check for newer versions (the operator's `upgradesUrl`; http or https): the daemon asks it every
    /// --upgrades-interval-seconds, and `blockmesh version` says when one is out. Empty: never [default: never].
    #[arg(long, env = "BLOCKMESH_UPGRADES_URL")]
    upgrades_url: Option<String>,
    /// Seconds between two upgrade checks (the operator's `upgradesIntervalSeconds`).
    #[arg(
        long,
        env = "BLOCKMESH_UPGRADES_INTERVAL_SECONDS",
        default_value_t = blockmesh::upgrades::DEFAULT_UPGRADES_INTERVAL_SECONDS,
        value_parser = clap::value_parser!(u64).range(1..=blockmesh::upgrades::MAX_UPGRADES_INTERVAL_SECONDS)
    )]
    upgrades_interval_seconds: u64,
}

pub(crate) fn default_data_dir() -> PathBuf {
    // /proc/self belongs to the process's effective user: root when it is owned by uid 0.
    let is_root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    if is_root {
        PathBuf::from("/var/lib/blockmesh")
    } else {
        PathBuf::from("./blockmesh-data")
    }
}

/// Size of a pool file the daemon creates when none is given.
const DEFAULT_POOL_SIZE_BYTES: u64 = 10 << 30;

/// Open the pool file or device at `path`, through the page cache or with O_DIRECT.
fn open_pool(path: &Path, direct: bool) -> Result<Pool> {
    let opened = if direct {
        FileDevice::open_direct(path).and_then(|dev| Pool::open(Arc::new(dev), PoolOptions::default())).map_err(|e| {
            match e {
                blockmesh_engine::Error::NotAPool(_) => blockmesh_engine::Error::NotAPool(path.display().to_string()),
                other => other,
            }
        })
    } else {
        Pool::open_file(path, PoolOptions::default())
    };
    opened.with_context(|| format!("opening pool {}", path.display()))
}

fn open_or_create_pool(path: &Path, size: Option<u64>, created_by_default: bool, direct: bool) -> Result<Pool> {
    if path.exists() {
        if let Some(want) = size {
            let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
            if meta.is_file() && want > meta.len() {
                // enlarge the (sparse) file; the pool takes the new segments below
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(want))
                    .with_context(|| format!("enlarging {} to {want} bytes", path.display()))?;
            } else if meta.is_file() && want < meta.len() {
                tracing::warn!(path = %path.display(), "--pool-size is smaller than the pool file; pools do not shrink");
            }
        }
        let pool = open_pool(path, direct)?;
        let added = pool.grow().with_context(|| format!("growing pool {}", path.display()))?;
        if added > 0 {
            println!("pool {} grew by {added} segments to {} bytes", path.display(), pool.stats().pool_size_bytes);
        }
        return Ok(pool);
    }
    let size = size.unwrap_or(DEFAULT_POOL_SIZE_BYTES);
    if !created_by_default {
        bail!(
            "pool {} does not exist; leave out --pool to create the default pool in the data directory",
            path.display()
        );
    }
    tracing::info!(path = %path.display(), size_bytes = size, "creating a new pool");
    if direct {
        // the file is made (sparse) first, then opened with O_DIRECT for the pool
        drop(FileDevice::create(path, size).with_context(|| format!("creating pool file {}", path.display()))?);
        let dev = FileDevice::open_direct(path).with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
        return Pool::create(Arc::new(dev), PoolOptions::default())
            .with_context(|| format!("creating pool {}", path.display()));
    }
    Pool::create_file(path, size, PoolOptions::default()).with_context(|| format!("creating pool {}", path.display()))
}

async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn parse_pool_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= MAX_POOL_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphabetic);
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: a pool name is 1 to {MAX_POOL_NAME_LEN} letters, digits, '-', '_' or '.', starting with a letter"
        ))
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let (pool_path, default_pool) = match args.pool {
        Some(p) => (p, false),
        None => (data_dir.join(format!("{}{POOL_FILE_SUFFIX}", args.pool_name)), true),
    };
    let pool = Arc::new(open_or_create_pool(&pool_path, args.pool_size, default_pool, args.direct_io)?);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(blockmesh_nbd::tls::server_config(cert, key, args.tls_client_ca.as_deref())?),
        _ => None,
    };
    let tls_mode = match (&tls, args.tls) {
        (None, _) => TlsMode::Off,
        (Some(_), Tls::Optional) => TlsMode::Optional,
        (Some(_), Tls::Required) => TlsMode::Required,
    };
    let sessions = Sessions::new();
    let metrics = Arc::new(Metrics::new());
    let qos = QosRegistry::new();
    let exports = PoolExports::new(pool.clone()).tracked(sessions.clone(), metrics.clone()).with_qos(qos.clone());
    if args.fair_slots > blockmesh_nbd::qos::MAX_FAIR_SLOTS {
        bail!("--fair-slots is at most {}", blockmesh_nbd::qos::MAX_FAIR_SLOTS);
    }
    let fair_slots = (args.fair_slots > 0).then_some(args.fair_slots);
    let server = Server::new(Arc::new(exports), ServerConfig { tls, tls_mode, handshake_timeout: None, fair_slots })?;
    let key_path = api::key_path(&data_dir);
    let (key, created) =
        api::load_or_create_key(&key_path).with_context(|| format!("reading the API key {}", key_path.display()))?;
    if created {
        println!("generated an admin API key in {} (mode 0600); clients read it from there", key_path.display());
    }
    let socket = args.nbd_socket.unwrap_or_else(|| data_dir.join(NBD_SOCKET));
    let unix = Server::bind_unix(&socket).with_context(|| format!("binding {}", socket.display()))?;
    let tcp = tokio::net::TcpListener::bind(args.nbd_listen)
        .await
        .with_context(|| format!("binding {} (is another daemon running? use --nbd-listen)", args.nbd_listen))?;
    let api_tcp = api_server::bind(args.api_listen)
        .with_context(|| format!("binding {} (is another daemon running? use --api-listen)", args.api_listen))?;
    let health_tcp = match args.health_listen {
        Some(addr) => Some(api_server::bind(addr).with_context(|| format!("binding {addr} (--health-listen)"))?),
        None => None,
    };
    let health_at = match &health_tcp {
        Some(l) => format!(", health at http://{}{}", l.local_addr()?, api::HEALTH_PATH),
        None => String::new(),
    };
    let health_pool = pool.clone();
    let health = async move {
        match health_tcp {
            Some(l) => api_server::serve(l, api::health_router(health_pool), None).await,
            None => std::future::pending().await,
        }
    };
    let info = ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        nbd_listen: tcp.local_addr()?.to_string(),
        nbd_socket: socket.display().to_string(),
        latest_version: None,
        latest_download_url: None,
    };
    let upgrades = Arc::new(blockmesh::upgrades::Upgrades::default());
    if let Some(url) = args.upgrades_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--upgrades-url {url:?}: an http:// or https:// URL, or empty for none");
        }
        let every = std::time::Duration::from_secs(args.upgrades_interval_seconds);
        blockmesh::upgrades::start(url.to_string(), every, env!("CARGO_PKG_VERSION"), upgrades.clone())
            .context("starting the upgrade checks")?;
    }
    let state = ApiState { pool: pool.clone(), key, info, sessions, metrics, qos, upgrades };
    let api_router = api::router(Arc::new(state));
    // With a certificate the control API speaks HTTPS only (API keys never cross in the clear); it authenticates
    // clients by their key, not by client certificates.
    let api_tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(blockmesh_nbd::tls::server_config(cert, key, None)?),
        _ => None,
    };
    println!(
        "blockmesh serving pool {} over NBD at nbd://{} and nbd+unix:///?socket={}, control API at {}://{}{health_at} \
         (Ctrl-C to stop)",
        pool_path.display(),
        tcp.local_addr()?,
        socket.display(),
        if api_tls.is_some() { "https" } else { "http" },
        api_tcp.local_addr()?,
    );
    let (s1, s2) = (server.clone(), server);
    tokio::select! {
        r = async move { s1.serve_tcp(tcp).await } => r?,
        r = async move { s2.serve_unix(unix).await } => r?,
        r = api_server::serve(api_tcp, api_router, api_tls) => r.context("control API")?,
        r = health => r.context("health endpoint")?,
        r = shutdown_signal() => r?,
    }
    tracing::info!("shutting down: flushing the pool");
    let _ = std::fs::remove_file(&socket);
    pool.flush().context("flushing the pool on shutdown")?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter =
        || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "blockmesh=info,warn".into());
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    // the daemon's logs also go to a syslog server when given one (the operator's logAddress; empty: none)
    let log_address = match &cli.command {
        Command::Serve(ServeArgs { log_address: Some(a), .. }) if !a.trim().is_empty() => {
            Some(blockmesh::syslog::parse_address(a).map_err(|e| anyhow::anyhow!("--log-address: {e}"))?)
        }
        _ => None,
    };
    let writer = match log_address {
        Some(addr) => {
            use tracing_subscriber::fmt::writer::MakeWriterExt;
            let syslog = blockmesh::syslog::Syslog::connect(addr)
                .with_context(|| format!("opening a UDP socket to the log address {addr}"))?;
            BoxMakeWriter::new(std::io::stderr.and(syslog))
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    // no colour codes when logging to syslog: they would reach the server as text
    tracing_subscriber::fmt().with_env_filter(filter()).with_ansi(log_address.is_none()).with_writer(writer).init();
    match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(args)),
        Command::Client(c) => {
            if let Err(e) = client::run(c) {
                // The cause chain on one line, without a backtrace: this is for people.
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
