//! The CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::controller::DRIVER_NAME;
use crate::daemons::Daemons;
use crate::pb;
use crate::Error;

/// Identity of the driver; `Probe` asks the daemons when the controller runs here.
#[derive(Debug, Clone)]
pub struct IdentityService {
    daemon: Option<Arc<Daemons>>,
}

impl IdentityService {
    /// `daemons`: the controller's daemons (probed), `None` for a node plugin alone.
    pub fn new(daemons: Option<Arc<Daemons>>) -> Self {
        Self { daemon: daemons }
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{service::Type as S, volume_expansion::Type as E, Service, Type, VolumeExpansion};
        let service = |t: S| pb::PluginCapability { r#type: Some(Type::Service(Service { r#type: t as i32 })) };
        let mut capabilities = vec![service(S::VolumeAccessibilityConstraints)];
        if self.daemon.is_some() {
            capabilities.push(service(S::ControllerService));
            capabilities.push(service(S::GroupControllerService));
        }
        capabilities.push(pb::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: E::Online as i32 })),
        });
        Ok(Response::new(pb::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        // Ready when at least one daemon answers (a node without a server does not make the controller unready).
        if let Some(ds) = self.daemon.clone() {
            tokio::task::spawn_blocking(move || {
                let mut last = None;
                for (node, d) in ds.all() {
                    match d.info() {
                        Ok(_) => return Ok(()),
                        Err(e) => {
                            tracing::warn!(?node, url = d.url(), error = %e, "a blockmesh daemon does not answer");
                            last = Some(e);
                        }
                    }
                }
                Err(last.unwrap_or_else(|| Error::Unavailable("no blockmesh daemon is known".into())))
            })
            .await
            .map_err(|e| Error::Internal(format!("probe task failed: {e}")))??;
        }
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}
