//! Errors of the server library.

use std::path::PathBuf;

/// Why a connection ended badly or a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection is closed.
    #[error("protocol error from client: {0}")]
    Protocol(String),
    /// The client took longer than the handshake limit.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot read {path}: {reason}")]
    TlsFile { path: PathBuf, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Result of the server library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
