//! Serves one engine volume over NBD for `benches/nbd/compare.sh`, through the same code the daemon uses
//! (`PoolExports` + `blockmesh_nbd::Server`).
//!
//! Usage: `nbd-bench-server POOL_FILE SOCKET [--pool-gib N] [--volume-mib N] [--fair-slots N] [--direct] [--checkpoint-mib N] [--cached-writes] [--memory]`: creates
//! the pool (sparse) and a volume named `bench` when the pool file does not exist, then serves until killed. Fairness
//! is on with the daemon's default slots unless `--fair-slots 0`. On SIGINT or SIGTERM it flushes the pool and prints
//! its statistics (`PoolStats`) to standard error. `--direct`: the pool file with O_DIRECT, as
//! `blockmesh serve --direct` opens it (no page cache); `--checkpoint-mib`: the checkpoint interval (default the
//! engine's). `--cached-writes`: large writes through the page cache too (the engine's default sends their log
//! batches past it, `PoolOptions::uncached_write_min_bytes`), for comparison. `--memory`: serve an in-memory export of the volume's size instead of the engine (the NBD layer alone,
//! for comparison; POOL_FILE is not touched).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blockmesh::nbd_export::PoolExports;
use blockmesh_engine::io::FileDevice;
use blockmesh_engine::{Pool, PoolOptions};
use blockmesh_nbd::{Exports, Server, ServerConfig};

fn arg(args: &[String], name: &str) -> Option<u64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(pool_path), Some(socket)) = (args.first(), args.get(1)) else {
        bail!(
            "usage: nbd-bench-server POOL_FILE SOCKET [--pool-gib N] [--volume-mib N] [--fair-slots N] [--direct] \
             [--checkpoint-mib N] [--cached-writes] [--memory]"
        );
    };
    let pool_path = PathBuf::from(pool_path);
    let slots = arg(&args, "--fair-slots").map_or(blockmesh_nbd::DEFAULT_FAIR_SLOTS, |n| n as usize);
    let config = ServerConfig { fair_slots: (slots > 0).then_some(slots), ..ServerConfig::default() };
    if args.iter().any(|a| a == "--memory") {
        let exports = blockmesh_nbd::ExportMap::new();
        let size = arg(&args, "--volume-mib").unwrap_or(1024) << 20;
        exports.insert("bench", Arc::new(blockmesh_nbd::MemoryExport::new(size)));
        return serve(Arc::new(exports), socket, config);
    }
    let direct = args.iter().any(|a| a == "--direct");
    let open = |path: &PathBuf| -> Result<Arc<FileDevice>> {
        Ok(Arc::new(if direct { FileDevice::open_direct(path)? } else { FileDevice::open(path)? }))
    };
    let opts = PoolOptions {
        checkpoint_interval_bytes: arg(&args, "--checkpoint-mib")
            .map_or(blockmesh_engine::DEFAULT_CHECKPOINT_INTERVAL_BYTES, |m| m << 20),
        uncached_write_min_bytes: if args.iter().any(|a| a == "--cached-writes") {
            u64::MAX
        } else {
            blockmesh_engine::DEFAULT_UNCACHED_WRITE_MIN_BYTES
        },
        ..PoolOptions::default()
    };
    let pool = if pool_path.exists() {
        Pool::open(open(&pool_path)?, opts)?
    } else {
        drop(FileDevice::create(&pool_path, arg(&args, "--pool-gib").unwrap_or(16) << 30)?);
        let pool = Pool::create(open(&pool_path)?, opts)?;
        pool.create_volume("bench", arg(&args, "--volume-mib").unwrap_or(1024) << 20)?;
        pool
    };
    let pool = Arc::new(pool);
    serve(Arc::new(PoolExports::new(pool.clone())), socket, config)?;
    pool.flush()?;
    eprintln!("{:#?}", pool.stats());
    Ok(())
}

/// Serves `exports` on the Unix socket until interrupted.
fn serve(exports: Arc<dyn Exports>, socket: &str, config: ServerConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let server = Server::new(exports, config)?;
        let listener = Server::bind_unix(socket.as_ref()).context("binding the socket")?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = server.serve_unix(listener) => r?,
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })
}
