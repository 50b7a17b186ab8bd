//! The driver's errors, and how each becomes a gRPC status.

use tonic::{Code, Status};

/// What went wrong in the driver; [`Error::status`] is its gRPC answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or source named does not exist (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// Something of that name exists but does not match the request (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// The state of the volume forbids it now (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A size the driver cannot give (`OUT_OF_RANGE`).
    #[error("{0}")]
    OutOfRange(String),
    /// The pool is full (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A pagination token this driver did not hand out (`ABORTED`).
    #[error("{0}")]
    Aborted(String),
    /// Not offered by this driver (`UNIMPLEMENTED`).
    #[error("{0}")]
    Unimplemented(String),
    /// The daemon answered with an HTTP error the driver has no better code for.
    #[error("blockmesh daemon: {message} (HTTP {status})")]
    Daemon { status: u16, message: String },
    /// The daemon could not be reached (`UNAVAILABLE`).
    #[error("cannot reach the blockmesh daemon at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// No daemon serves what was asked for now, e.g. a node with no server pod (`UNAVAILABLE`: the caller retries;
    /// nothing is declared gone).
    #[error("{0}")]
    Unavailable(String),
    /// The Kubernetes API (reading a PVC's annotations, listing server pods) failed (`UNAVAILABLE`).
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    /// A local operation (mount, mkfs, netlink, a state file) failed (`INTERNAL`).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else that is the driver's or the node's fault (`INTERNAL`).
    #[error("{0}")]
    Internal(String),
}

/// The driver's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with what the driver was doing.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }

    /// The gRPC code the CSI spec asks for.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Daemon { status, .. } => match status {
                400 => Code::InvalidArgument,
                404 => Code::NotFound,
                409 => Code::FailedPrecondition,
                507 => Code::ResourceExhausted,
                401 | 403 => Code::PermissionDenied,
                _ => Code::Internal,
            },
            Error::Unreachable { .. } | Error::Unavailable(_) | Error::Kubernetes(_) => Code::Unavailable,
            Error::Io { .. } | Error::Internal(_) => Code::Internal,
        }
    }

    /// The gRPC status of this error.
    pub fn status(&self) -> Status {
        Status::new(self.code(), self.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        if e.code() == Code::Internal || e.code() == Code::Unavailable {
            tracing::error!(error = %e, "CSI request failed");
        }
        e.status()
    }
}
