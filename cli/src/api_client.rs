//! A blocking client of a daemon's control API (see [`crate::api`]): the CLI's, and the daemon's own when it pushes
//! to or pulls from another daemon (see [`crate::transfer`]).
//!
//! Its errors say what went wrong in terms of where it runs: [`Hints`] name where the key came from and what to
//! check when the daemon cannot be reached. The key itself is never part of an error or of `Debug` output.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_rustls::rustls;

use crate::api::ErrorBody;

/// How long a client waits, and whether it follows redirects.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// To connect.
    pub connect: Duration,
    /// For the whole of one control call (not a stream).
    pub call: Duration,
    /// For each read and write of a stream (send, receive, a push's progress), which has no limit on the whole.
    pub stream_idle: Duration,
    /// Redirects followed, at most (0: none; a daemon never redirects, so a redirect is somebody else answering).
    pub redirects: u32,
}

/// What a client's errors say about where it runs.
#[derive(Debug, Clone)]
pub struct Hints {
    /// Where the key came from, for the error a wrong one gets (HTTP 401), e.g. `BLOCKMESH_API_KEY`.
    pub key_source: String,
    /// After "use the key in that daemon's DATA_DIR/api-key": how to give it (may be empty).
    pub key_fix: String,
    /// After "cannot reach the blockmesh daemon at URL: CAUSE": what to check (may be empty).
    pub unreachable: String,
}

/// A failed call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The daemon answered with an error status; `text` says what it said and, for 401, what to do.
    #[error("{text}")]
    Status { status: u16, text: String },
    /// No answer: the daemon could not be reached, or the connection broke.
    #[error("{0}")]
    Unreachable(String),
    /// An answer that could not be read.
    #[error("{0}")]
    Answer(String),
}

/// A connection to a daemon's API: its URL, key and HTTP agents.
pub struct ApiClient {
    base: String,
    key: String,
    hints: Hints,
    /// For control calls: a limit on the whole call.
    agent: ureq::Agent,
    /// For streams: no limit on the whole call, only on each read and write.
    streaming: ureq::Agent,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the key
        f.debug_struct("ApiClient").field("base", &self.base).field("key_source", &self.hints.key_source).finish()
    }
}

impl ApiClient {
    /// A client of the API at `base` (`http://host:port` or `https://...`) with `key`; `tls`: the TLS configuration
    /// an https daemon is trusted by (none: the usual web roots).
    pub fn new(base: &str, key: String, hints: Hints, limits: Limits, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        let mut agent =
            ureq::AgentBuilder::new().timeout_connect(limits.connect).timeout(limits.call).redirects(limits.redirects);
        let mut streaming = ureq::AgentBuilder::new()
            .timeout_connect(limits.connect)
            .timeout_read(limits.stream_idle)
            .timeout_write(limits.stream_idle)
            .redirects(limits.redirects);
        if let Some(tls) = tls {
            agent = agent.tls_config(tls.clone());
            streaming = streaming.tls_config(tls);
        }
        Self {
            base: base.trim_end_matches('/').to_string(),
            key,
            hints,
            agent: agent.build(),
            streaming: streaming.build(),
        }
    }

    /// The daemon's URL (without a trailing `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, agent: &ureq::Agent, method: &str, path: &str) -> ureq::Request {
        agent.request(method, &format!("{}{path}", self.base)).set("Authorization", &format!("Bearer {}", self.key))
    }

    /// The answer, or an error that says what went wrong.
    fn answer(&self, res: Result<ureq::Response, ureq::Error>) -> Result<ureq::Response, CallError> {
        match res {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, r)) => {
                let msg = r.into_json::<ErrorBody>().map(|b| b.error).unwrap_or_else(|_| "no message".to_string());
                let text = if status == 401 {
                    format!(
                        "{msg} (HTTP 401): the daemon at {} refused the key from {}; use the key in that daemon's \
                         DATA_DIR/api-key{}",
                        self.base, self.hints.key_source, self.hints.key_fix
                    )
                } else {
                    format!("{msg} (HTTP {status})")
                };
                Err(CallError::Status { status, text })
            }
            Err(ureq::Error::Transport(t)) => Err(CallError::Unreachable(format!(
                "cannot reach the blockmesh daemon at {}: {t}{}",
                self.base, self.hints.unreachable
            ))),
        }
    }

    /// A stream from the daemon (no limit on the whole call), and its length when the daemon gives one.
    pub fn get_stream(&self, path: &str) -> Result<(ureq::Response, Option<u64>), CallError> {
        let res = self.answer(self.request(&self.streaming, "GET", path).call())?;
        let len = res.header("Content-Length").and_then(|v| v.parse().ok());
        Ok((res, len))
    }

    /// Sends a stream to the daemon; its answer.
    pub fn post_stream(&self, path: &str, body: impl std::io::Read) -> Result<ureq::Response, CallError> {
        self.answer(
            self.request(&self.streaming, "POST", path).set("Content-Type", "application/octet-stream").send(body),
        )
    }

    /// A POST whose answer may take long to come, or comes as a stream (scrub, push, pull): no limit on the whole
    /// call, only on each read and write.
    pub fn post_long(&self, path: &str, body: Option<&impl Serialize>) -> Result<ureq::Response, CallError> {
        let req = self.request(&self.streaming, "POST", path);
        self.answer(match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        })
    }

    /// A control call: `method path` with a JSON body (or none), its JSON answer.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CallError> {
        let req = self.request(&self.agent, method, path);
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        self.answer(res)?
            .into_json::<T>()
            .map_err(|e| CallError::Answer(format!("reading the answer of {} to {method} {path}: {e}", self.base)))
    }

    /// `GET path`, its JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call("GET", path, None)
    }

    /// `POST path` with a JSON body, its JSON answer.
    pub fn post<T: DeserializeOwned>(&self, path: &str, body: impl Serialize) -> Result<T, CallError> {
        self.call("POST", path, Some(json_value(body)?))
    }

    /// `PUT path` with a JSON body, its JSON answer.
    pub fn put<T: DeserializeOwned>(&self, path: &str, body: impl Serialize) -> Result<T, CallError> {
        self.call("PUT", path, Some(json_value(body)?))
    }
}

/// `body` as a JSON value.
fn json_value(body: impl Serialize) -> Result<serde_json::Value, CallError> {
    serde_json::to_value(body).map_err(|e| CallError::Answer(format!("encoding a request body: {e}")))
}

/// A TLS client configuration trusting the certificates in `pem` (a CA, or a daemon's self-signed certificate);
/// `what` names where the PEM text came from, for the errors.
pub fn trusting(pem: &[u8], what: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("reading a PEM certificate in {what}: {e}"))?;
        roots.add(cert).map_err(|e| format!("a certificate in {what}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what} holds no PEM certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
