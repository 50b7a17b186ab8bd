//! Serves the driver's gRPC services on a Unix socket (where the sidecars and the kubelet find it).

use std::path::Path;
use std::sync::Arc;

use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::NodeServer;
use crate::pb;
use crate::{Error, Result};

/// What one process serves.
#[derive(Debug, Default)]
pub struct Services {
    pub identity: Option<IdentityService>,
    pub controller: Option<Arc<ControllerService>>,
    pub node: Option<NodeServer>,
}

/// Binds `socket` (a stale socket file is replaced).
pub fn bind(socket: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(format!("removing the stale socket {}", socket.display()), e))
        }
        _ => {}
    }
    tokio::net::UnixListener::bind(socket).map_err(|e| Error::io(format!("binding {}", socket.display()), e))
}

/// Serves `services` on `listener` until `shutdown` completes.
pub async fn serve(
    services: Services,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let identity = services.identity.unwrap_or_else(|| IdentityService::new(None));
    let mut router = tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(identity))
        .add_optional_service(services.controller.clone().map(pb::controller_server::ControllerServer::from_arc))
        .add_optional_service(services.controller.map(pb::group_controller_server::GroupControllerServer::from_arc));
    router = router.add_optional_service(services.node.map(pb::node_server::NodeServer::new));
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}
