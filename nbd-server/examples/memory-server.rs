//! Serves in-memory exports over a Unix socket or TCP, for trying clients against the server:
//!
//! ```text
//! cargo run -p blockmesh-nbd --example memory-server -- /tmp/nbd.sock      # or 127.0.0.1:10809
//! nbdinfo --list 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```
//! Exports: `disk` (1 GiB, writable) and `ro` (16 MiB, read-only, first MiB filled with 0xAB).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use blockmesh_nbd::{Export, ExportMap, MemoryExport, Server, ServerConfig};

#[tokio::main]
async fn main() -> blockmesh_nbd::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "/tmp/blockmesh-nbd.sock".into());
    let exports = Arc::new(ExportMap::new());
    exports.insert("disk", Arc::new(MemoryExport::new(1 << 30).with_description("a writable GiB")));
    let ro = MemoryExport::new(16 << 20);
    ro.write(0, &vec![0xAB; 1 << 20], false).unwrap();
    exports.insert("ro", Arc::new(ro.read_only()));
    let server = Server::new(exports, ServerConfig::default())?;
    if addr.contains(':') {
        server.serve_tcp(tokio::net::TcpListener::bind(&addr).await?).await
    } else {
        server.serve_unix(Server::bind_unix(std::path::Path::new(&addr))?).await
    }
}
