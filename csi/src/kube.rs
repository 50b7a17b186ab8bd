//! The few reads the driver makes of the Kubernetes API, with the pod's service account (in-cluster): one HTTPS
//! GET each, the token re-read every time (the kubelet rotates it), the API server trusted by the service account's
//! CA. Shared by [`crate::pvc::KubePvcs`] (a PVC's annotations) and [`crate::daemons::KubeServerPods`] (the server
//! pods).
//!
//! Not kube-rs: the driver needs a GET or two, and kube with k8s-openapi would be most of this crate's build.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

/// Where a pod finds its service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Longest wait for the Kubernetes API.
pub const KUBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read from the Kubernetes API (a list of a few thousand pods is well under it).
pub const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// A client of the in-cluster Kubernetes API.
#[derive(Debug)]
pub struct KubeApi {
    base: String,
    token_file: PathBuf,
    agent: ureq::Agent,
}

impl KubeApi {
    /// The in-cluster API server (`KUBERNETES_SERVICE_HOST` / `_PORT`) with the service account in `sa_dir`.
    pub fn in_cluster(sa_dir: &Path) -> Result<Self> {
        let var = |k: &str| std::env::var(k).map_err(|_| Error::Kubernetes(format!("{k} is not set: not in a pod?")));
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?;
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        Self::new(&format!("https://{host}:{port}"), sa_dir)
    }

    /// The API server at `base` (`https://HOST:PORT`), trusted by `sa_dir/ca.crt`, with the token `sa_dir/token`.
    pub fn new(base: &str, sa_dir: &Path) -> Result<Self> {
        let tls = crate::daemon::trusting_ca(&sa_dir.join("ca.crt"))?;
        let agent = ureq::AgentBuilder::new().timeout(KUBE_TIMEOUT).tls_config(tls).build();
        Ok(Self { base: base.trim_end_matches('/').to_string(), token_file: sa_dir.join("token"), agent })
    }

    /// `GET path` (with its query), the answer's body; `None` on 404. `what` names the read in errors.
    pub fn get(&self, path: &str, what: &str) -> Result<Option<Vec<u8>>> {
        // The token is re-read every time: the kubelet rotates it.
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| Error::io(format!("reading {}", self.token_file.display()), e))?;
        let res = self
            .agent
            .get(&format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .call();
        match res {
            Ok(r) => {
                let mut body = Vec::new();
                r.into_reader()
                    .take(MAX_ANSWER_BYTES + 1)
                    .read_to_end(&mut body)
                    .map_err(|e| Error::Kubernetes(format!("reading {what}: {e}")))?;
                if body.len() as u64 > MAX_ANSWER_BYTES {
                    return Err(Error::Kubernetes(format!("{what}: the answer is over {MAX_ANSWER_BYTES} bytes")));
                }
                Ok(Some(body))
            }
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(Error::Kubernetes(format!("reading {what}: {e}"))),
        }
    }
}
