//! `blockmesh-nbd`: an NBD protocol server for any export behind a trait.
//!
//! - [`proto`]: wire constants and layouts of the protocol (fixed newstyle, structured replies, block status).
//! - [`export`]: the [`Export`] trait the server serves, the [`Exports`] registry, and [`MemoryExport`].
//! - `handshake`: option haggling, STARTTLS, export choice.
//! - `transmission`: concurrent request processing with bounded in-flight requests and buffer memory.
//! - [`server`]: TCP and Unix-domain listeners, and [`Server::serve_stream`] for any byte stream.
//! - [`tls`]: x509 certificates for STARTTLS.
//! - [`qos`]: per-export rate limits and fair sharing of the backend between exports.
//!
//! The crate knows nothing of the storage engine: the daemon implements [`Export`] over engine volumes.
#![forbid(unsafe_code)]

pub mod buffers;
mod error;
pub mod export;
mod handshake;
pub mod proto;
pub mod qos;
pub mod server;
pub mod tls;
mod transmission;

pub use error::{Error, Result};
pub use export::{
    BlockSizes, Disconnect, ErrorKind, Export, ExportError, ExportListing, ExportMap, ExportResult, Exports, Extent,
    ExtentKind, MemoryExport, WritePiece, ZeroFlags, MAX_PAYLOAD_BYTES,
};
pub use handshake::{BASE_ALLOCATION_ID, MAX_META_QUERIES, MAX_OPTIONS_PER_HANDSHAKE, MAX_OPTION_BYTES};
pub use qos::{Direction, FairQueue, Limits, Qos, DEFAULT_FAIR_SLOTS};
pub use server::{
    Server, ServerConfig, Stream, ACCEPT_ERROR_BACKOFF, DEFAULT_HANDSHAKE_TIMEOUT, MAX_CONNECTIONS,
    UNIX_SEND_BUFFER_BYTES,
};
pub use tls::TlsMode;
pub use transmission::{
    HOLE_CHUNK_MIN_BYTES, INLINE_WRITE_MAX_BYTES, MAX_BLOCK_STATUS_DESCRIPTORS, MAX_INFLIGHT_BUFFER_BYTES,
    MAX_INFLIGHT_REQUESTS,
};
pub use transmission::{STREAM_PIECE_MIN_BYTES, STREAM_WRITE_MIN_BYTES};
