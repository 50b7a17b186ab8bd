//! The server: configuration, listeners (TCP and Unix-domain), and one task per connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::buffers::BufPool;
use crate::export::Exports;
use crate::qos::FairQueue;
use crate::tls::TlsMode;
use crate::{handshake, transmission, Error, Result};

/// How long a client may take from connecting to choosing an export.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections a listener serves at once; further clients are accepted and closed at once (they read an end of
/// file instead of a greeting), so they fail promptly and do not wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 1024;
/// Pause after an accept error that is not about one connection (out of file descriptors or memory) before accepting
/// again: the listener keeps running and retries once connections have closed.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Send buffer asked for on each Unix-domain connection (the kernel caps it at `net.core.wmem_max`). On a Unix
/// socket the sender's buffer bounds what is queued for the peer, and the default (about 208 KiB) makes a 1 MiB read
/// reply cross in five or more rounds of wake-ups between server and client; with room for a few whole replies,
/// sequential reads over the socket measured +35% (benches/nbd/compare.sh). TCP keeps the kernel's autotuning.
pub const UNIX_SEND_BUFFER_BYTES: usize = 4 << 20;

/// Gives a Unix-domain connection its send buffer ([`UNIX_SEND_BUFFER_BYTES`]); a refusal leaves the default.
pub(crate) fn tune_unix_stream(stream: &tokio::net::UnixStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(UNIX_SEND_BUFFER_BYTES) {
        tracing::debug!(error = %e, "keeping the default send buffer");
    }
}

/// A byte stream the server can speak NBD over: a socket, a TLS session, or an in-process pipe.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

pub(crate) type BoxStream = Box<dyn Stream>;

/// Server settings.
#[derive(Clone, Default)]
pub struct ServerConfig {
    /// Certificate and key for `NBD_OPT_STARTTLS` (see [`crate::tls::server_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether TLS is off, offered, or required. `Optional` and `Required` need `tls`.
    pub tls_mode: TlsMode,
    /// Handshake time limit; `None` means [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Option<Duration>,
    /// Fair sharing of the exports' backend: at most this many requests of all connections run in it at once,
    /// handed out fairly between exports (see [`crate::qos`]). `None`: no fair queue; each connection runs up to
    /// its in-flight limit.
    pub fair_slots: Option<usize>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("tls", &self.tls.is_some())
            .field("tls_mode", &self.tls_mode)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("fair_slots", &self.fair_slots)
            .finish()
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    pub exports: Arc<dyn Exports>,
    pub config: ServerConfig,
    pub tls: Option<TlsAcceptor>,
    pub pool: Arc<BufPool>,
    pub fair: Option<Arc<FairQueue>>,
}

/// An NBD server over a set of exports. Cheap to clone; clones share buffers and configuration.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("config", &self.shared.config).finish()
    }
}

impl Server {
    /// A server for `exports`. Fails when TLS is asked for without a certificate.
    pub fn new(exports: Arc<dyn Exports>, config: ServerConfig) -> Result<Self> {
        if config.tls_mode != TlsMode::Off && config.tls.is_none() {
            return Err(Error::Config(format!("TLS mode {:?} needs a certificate and key", config.tls_mode)));
        }
        let tls = config.tls.clone().map(TlsAcceptor::from);
        let fair = config.fair_slots.map(FairQueue::new);
        Ok(Self { shared: Arc::new(Shared { exports, config, tls, pool: Arc::new(BufPool::new()), fair }) })
    }

    /// Serves one client on any byte stream, from the greeting to the end of transmission.
    pub async fn serve_stream<S: Stream>(&self, stream: S) -> Result<()> {
        let timeout = self.shared.config.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
        let negotiated = tokio::time::timeout(timeout, handshake::negotiate(Box::new(stream), &self.shared))
            .await
            .map_err(|_| Error::HandshakeTimeout(timeout))??;
        match negotiated {
            Some(n) => transmission::serve(n, self.shared.pool.clone(), self.shared.fair.clone()).await,
            None => Ok(()),
        }
    }

    /// Accepts TCP clients forever (until the task is dropped), each on its own task. At most [`MAX_CONNECTIONS`] are
    /// served at once; accept errors (such as running out of file descriptors) do not end it.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<()> {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, limit = MAX_CONNECTIONS, "too many connections: closing a new one");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.serve_stream(stream).await {
                    tracing::info!(%peer, error = %e, "connection ended with an error");
                }
                drop(slot);
            });
        }
    }

    /// Accepts Unix-domain clients forever (until the task is dropped), each on its own task. At most
    /// [`MAX_CONNECTIONS`] are served at once; accept errors do not end it.
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<()> {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(limit = MAX_CONNECTIONS, "too many connections: closing a new one");
                continue;
            };
            tune_unix_stream(&stream);
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.serve_stream(stream).await {
                    tracing::info!(error = %e, "connection ended with an error");
                }
                drop(slot);
            });
        }
    }

    /// Binds a Unix-domain socket, replacing a stale socket file left by an earlier run.
    pub fn bind_unix(path: &Path) -> Result<UnixListener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            } else {
                return Err(Error::Config(format!("{} exists and is not a socket", path.display())));
            }
        }
        Ok(UnixListener::bind(path)?)
    }
}

/// After a failed accept: an error about the one connection (it was reset or aborted before it was accepted) is
/// skipped; anything else (out of file descriptors or memory) is logged and retried after [`ACCEPT_ERROR_BACKOFF`].
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock) {
        tracing::debug!(error = %e, "accept failed for one connection");
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in {ACCEPT_ERROR_BACKOFF:?}");
    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_connections_get_a_send_buffer_for_whole_replies() {
        let (a, _b) = tokio::net::UnixStream::pair().expect("socket pair");
        let before = socket2::SockRef::from(&a).send_buffer_size().expect("SO_SNDBUF");
        tune_unix_stream(&a);
        let after = socket2::SockRef::from(&a).send_buffer_size().expect("SO_SNDBUF");
        // the kernel caps the request at net.core.wmem_max (and reports twice what it grants)
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        assert!(after >= before.min(UNIX_SEND_BUFFER_BYTES), "never smaller than before: {before} -> {after}");
        assert!(after >= UNIX_SEND_BUFFER_BYTES.min(cap), "asked {UNIX_SEND_BUFFER_BYTES}, cap {cap}, got {after}");
    }
}
