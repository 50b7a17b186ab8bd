//! The control API's HTTP server: HTTP/1 through hyper with the bounds `axum::serve` lacks: a header-read timeout, an
//! idle timeout on request bodies, a connection limit and a deep listen backlog (slow-loris clients and connection
//! floods are dropped while others are served; see cli/tests/api_abuse.rs), over TLS when the daemon has a certificate.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Result;

/// An API client must send a request's headers within this (counted from the connection's start, or from the end of
/// its previous request): slow or idle connections are closed.
const API_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Once a handler asks for more of a request body, the next bytes must arrive within this, or the request fails and
/// the connection is closed (a stream may pause longer only while the daemon is busy with what it already has).
const API_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// A whole request body (other than a streamed receive) must arrive within this, counted from the handler's first
/// read: a client trickling a byte now and then, inside the idle timeout, is still cut off. Control bodies are small
/// JSON (at most `MAX_API_BODY_BYTES`), so this asks for no more than about 50 KiB/s of the largest.
const API_BODY_TIMEOUT: Duration = Duration::from_secs(20);
/// The same for a streamed receive (`POST /v1/receive`), whose sender may be a pipeline (`send | ssh | receive`)
/// that pauses longer; as long as the client's own stream idle timeout. Only authenticated requests get this far
/// (the key is checked before a handler reads the body).
const RECEIVE_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The route that gets [`RECEIVE_BODY_IDLE_TIMEOUT`].
const RECEIVE_PATH: &str = "/v1/receive";
/// Most control API connections served at once; further ones are accepted and closed at once.
const MAX_API_CONNECTIONS: usize = 4096;
/// Connections the kernel queues for the control API before it accepts them (capped by `net.core.somaxconn`): room
/// for a burst of clients, so their SYNs are not dropped and retried a second later.
const API_LISTEN_BACKLOG: u32 = 4096;
/// Pause after an accept error that is not about one connection (out of file descriptors or memory).
const API_ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Binds the control API's listener with [`API_LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(API_LISTEN_BACKLOG)
}

/// Serves the control API: HTTP/1 with a header-read timeout, an idle timeout on request bodies and a connection limit
/// (what `axum::serve` does, plus those bounds).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> Result<()> {
    let router = router.layer(axum::middleware::map_request(body_with_idle_timeout));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_API_CONNECTIONS));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                use std::io::ErrorKind::*;
                if !matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
                    tracing::error!(error = %e, "control API: accept failed; retrying in {API_ACCEPT_ERROR_BACKOFF:?}");
                    tokio::time::sleep(API_ACCEPT_ERROR_BACKOFF).await;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, limit = MAX_API_CONNECTIONS, "control API: too many connections: closing a new one");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(API_HEADER_READ_TIMEOUT);
            let served = match acceptor {
                None => http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await,
                // the TLS handshake is bounded like the headers that follow it
                Some(acceptor) => match tokio::time::timeout(API_HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "control API: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "control API: TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "control API connection ended with an error");
            }
            drop(slot);
        });
    }
}

async fn body_with_idle_timeout(req: axum::extract::Request) -> axum::extract::Request {
    // a streamed receive may run for hours at any rate: it gets a longer idle timeout and no overall one
    let (timeout, total) = if req.uri().path() == RECEIVE_PATH {
        (RECEIVE_BODY_IDLE_TIMEOUT, None)
    } else {
        (API_BODY_IDLE_TIMEOUT, Some(API_BODY_TIMEOUT))
    };
    req.map(|body| axum::body::Body::new(IdleTimeoutBody { inner: body, timeout, sleep: None, total, deadline: None }))
}

/// A request body that fails when its next bytes take longer than its timeout ([`API_BODY_IDLE_TIMEOUT`], or
/// [`RECEIVE_BODY_IDLE_TIMEOUT`] for receives) to arrive, or when the whole of it takes longer than `total`
/// ([`API_BODY_TIMEOUT`]).
struct IdleTimeoutBody {
    inner: axum::body::Body,
    timeout: Duration,
    /// Armed while the handler waits for bytes; disarmed when they come.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    total: Option<Duration>,
    /// Armed at the handler's first read when `total` is set; never disarmed.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl axum::body::HttpBody for IdleTimeoutBody {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<std::result::Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(total) = this.total {
            let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(total)));
            if std::future::Future::poll(deadline.as_mut(), cx).is_ready() && !this.inner.is_end_stream() {
                return Poll::Ready(Some(Err(format!("the request body took longer than {total:?}").into())));
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match std::future::Future::poll(sleep.as_mut(), cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(format!("no request body data for {timeout:?}").into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
