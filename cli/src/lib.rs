//! `blockmesh`: the node daemon and its client. The library part holds what the daemon plugs together, so tests and
//! benchmarks can use it without starting a process.
//!
//! - [`api`]: the HTTP+JSON control API (routes, key handling) and the JSON types its client shares.
//! - [`api_client`]: a blocking client of that API (the CLI's, and the daemon's when it pushes or pulls).
//! - [`transfer`]: push and pull, one algorithm over two sides (a daemon's API, or the daemon's own pool).
//! - [`nbd_export`]: engine volumes, dot heads and commits as NBD exports.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`).
//! - [`qos`]: per-volume limits kept in the pool and shared by every connection to a volume.
//! - [`remotes`]: the client's named daemons and their keys.
//! - [`size`]: human sizes on the command line (`10G`, `512M`).
//! - [`upgrades`]: the daemon's checks for a newer version (`--upgrades-url`).

pub mod api;
pub mod api_client;
pub mod metrics;
pub mod nbd_export;
pub mod qos;
pub mod remotes;
pub mod size;
pub mod syslog;
pub mod transfer;
pub mod upgrades;
pub mod utc;
