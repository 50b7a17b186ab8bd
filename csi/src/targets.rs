//! Where the node plugin finds a volume's NBD server ([`Targets`]).
//!
//! A volume homed on a node, or on the default daemon ([`crate::ids`]), is served by this node's own server: its
//! Unix socket through a host path (`--nbd-socket`) or an address (`--nbd-address`). A volume homed on a pool
//! (`pool=PVC`, `pvcPerNode` storage) is served by whichever server pod serves that PVC now, on any node: found
//! from the server pods ([`ServerPods`], the controller's discovery) and reached at `POD_IP:PORT`
//! ([`DEFAULT_NBD_PORT`]). When a pool moves (its node went away and another adopted its PVC), the device's
//! monitor reconnects through [`Targets::target`] with `fresh`, so it finds the new server.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::daemons::{list_again, no_pool_server, url_host, ServerPods};
use crate::ids::{pool_of, VolumeId};
use crate::kernel::NbdTarget;
use crate::{Error, Result};

/// The port server pods serve NBD on (the operator's `NBD_PORT`; the driver imports none of its code).
pub const DEFAULT_NBD_PORT: u16 = 10809;

/// Where a volume's NBD server is.
pub trait Targets: Send + Sync + std::fmt::Debug {
    /// The server of `volume` now. `fresh`: the last one went away (a reconnect), so what is known of pools is
    /// read again first (at most every [`MIN_REFRESH_INTERVAL`]).
    fn target(&self, volume: &VolumeId, fresh: bool) -> Result<NbdTarget>;
}

/// Every volume at one server: the node's own.
impl Targets for NbdTarget {
    fn target(&self, _: &VolumeId, _: bool) -> Result<NbdTarget> {
        Ok(self.clone())
    }
}

/// The node's own server for volumes homed on a node, and the server pod of the pool for `pool=PVC` volumes.
#[derive(Debug)]
pub struct PoolTargets {
    local: Option<NbdTarget>,
    pods: Box<dyn ServerPods>,
    nbd_port: u16,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    at: Option<Instant>,
    /// pool PVC -> pod IP of its server.
    pools: BTreeMap<String, String>,
    /// Why the last listing failed (the older map is used meanwhile).
    error: Option<String>,
}

impl PoolTargets {
    /// `local`: this node's own server (`None`: none, only pools' volumes can be staged); `pods`: the server pods;
    /// `nbd_port`: where they serve NBD.
    pub fn new(local: Option<NbdTarget>, pods: Box<dyn ServerPods>, nbd_port: u16) -> Self {
        Self { local, pods, nbd_port, cache: Mutex::new(Cache::default()) }
    }

    /// The IP of pool `pvc`'s server, listing the pods again as [`list_again`] says (soon when `force` or the pool
    /// is not known).
    fn pool_ip(&self, pvc: &str, force: bool) -> Result<String> {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if list_again(cache.at, force || !cache.pools.contains_key(pvc)) {
            match self.pods.servers() {
                Ok(servers) => {
                    cache.pools = servers.pools.into_iter().map(|(pvc, s)| (pvc, s.ip)).collect();
                    cache.error = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing the blockmesh server pods failed; the pools known stay");
                    cache.error = Some(e.to_string());
                }
            }
            cache.at = Some(Instant::now());
        }
        cache.pools.get(pvc).cloned().ok_or_else(|| no_pool_server(pvc, cache.error.as_deref()))
    }
}

impl Targets for PoolTargets {
    fn target(&self, volume: &VolumeId, fresh: bool) -> Result<NbdTarget> {
        match volume.node.as_deref().and_then(pool_of) {
            Some(pvc) => {
                let ip = self.pool_ip(pvc, fresh)?;
                Ok(NbdTarget::Tcp(format!("{}:{}", url_host(&ip), self.nbd_port)))
            }
            None => self.local.clone().ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "volume {volume} is served by this node's own blockmesh server, and this node plugin knows of \
                     none (no --nbd-socket or --nbd-address)"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::daemons::{PoolServer, Servers, MIN_REFRESH_INTERVAL};

    /// Server pods a test sets, counting the listings.
    #[derive(Debug)]
    struct Pods {
        servers: Mutex<Result<Servers, String>>,
        listed: Mutex<u32>,
    }

    impl Pods {
        fn new() -> Arc<Self> {
            Arc::new(Self { servers: Mutex::new(Ok(Servers::default())), listed: Mutex::new(0) })
        }
        fn serve(&self, pools: &[(&str, &str)]) {
            let pools = pools
                .iter()
                .map(|(pvc, ip)| {
                    let server = PoolServer { node: "n".into(), ip: ip.to_string(), url: format!("http://{ip}:1") };
                    (pvc.to_string(), server)
                })
                .collect();
            *self.servers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Ok(Servers { pools, ..Default::default() });
        }
        fn listed(&self) -> u32 {
            *self.listed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    #[derive(Debug)]
    struct Shared(Arc<Pods>);

    impl ServerPods for Shared {
        fn servers(&self) -> Result<Servers> {
            *self.0.listed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
            self.0.servers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone().map_err(Error::Kubernetes)
        }
    }

    fn vol(id: &str) -> VolumeId {
        VolumeId::parse(id).expect("a valid id")
    }

    #[test]
    fn a_pools_volume_is_at_its_server_pod_and_follows_it() -> Result<()> {
        let pods = Pods::new();
        pods.serve(&[("pvc-a", "10.0.0.1"), ("pvc-b", "fd00::2")]);
        let local = NbdTarget::Unix("/var/lib/blockmesh/nbd.sock".into());
        let t = PoolTargets::new(Some(local.clone()), Box::new(Shared(pods.clone())), DEFAULT_NBD_PORT);
        assert_eq!(t.target(&vol("pool=pvc-a:admin/db/__default__"), false)?, NbdTarget::Tcp("10.0.0.1:10809".into()));
        assert_eq!(t.target(&vol("pool=pvc-b:admin/x/y"), false)?, NbdTarget::Tcp("[fd00::2]:10809".into()));
        assert_eq!(pods.listed(), 1, "one listing serves both");
        // volumes of a node, or of the default daemon: this node's own server
        assert_eq!(t.target(&vol("node-a:admin/db/__default__"), false)?, local);
        assert_eq!(t.target(&vol("admin/db/__default__"), true)?, local);
        // the pool moves to a pod elsewhere: a reconnect (fresh) finds it once the last listing is a second old
        pods.serve(&[("pvc-a", "10.0.0.9")]);
        assert_eq!(t.target(&vol("pool=pvc-a:admin/db/__default__"), true)?, NbdTarget::Tcp("10.0.0.1:10809".into()));
        std::thread::sleep(MIN_REFRESH_INTERVAL);
        assert_eq!(t.target(&vol("pool=pvc-a:admin/db/__default__"), true)?, NbdTarget::Tcp("10.0.0.9:10809".into()));
        // a pool no pod serves: UNAVAILABLE, naming it
        match t.target(&vol("pool=pvc-b:admin/x/y"), false) {
            Err(Error::Unavailable(m)) => assert!(m.contains("pool PVC pvc-b"), "{m}"),
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_failed_listing_keeps_what_was_known_and_says_why() -> Result<()> {
        let pods = Pods::new();
        pods.serve(&[("pvc-a", "10.0.0.1")]);
        let t = PoolTargets::new(None, Box::new(Shared(pods.clone())), 7000);
        assert_eq!(t.target(&vol("pool=pvc-a:a/b/c"), false)?, NbdTarget::Tcp("10.0.0.1:7000".into()));
        *pods.servers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Err("forbidden".into());
        std::thread::sleep(MIN_REFRESH_INTERVAL);
        assert_eq!(t.target(&vol("pool=pvc-a:a/b/c"), true)?, NbdTarget::Tcp("10.0.0.1:7000".into()));
        match t.target(&vol("pool=pvc-z:a/b/c"), false) {
            Err(Error::Unavailable(m)) => assert!(m.contains("forbidden"), "{m}"),
            other => panic!("{other:?}"),
        }
        // no local server: a node's volume cannot be staged here
        assert!(matches!(t.target(&vol("node-a:a/b/c"), false), Err(Error::FailedPrecondition(_))));
        Ok(())
    }
}
