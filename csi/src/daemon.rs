//! A small client of the node daemon's HTTP control API (`blockmesh serve`, documented in `cli/src/api.rs`): the
//! driver talks to daemons only over their API, never to a pool directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Error, Result};

/// Longest wait for a connection to the daemon.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one answer (commits, clones and deletes are O(1); a flush is bounded by the disk).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A subdot as the daemon lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Subdot {
    pub name: String,
    pub size_bytes: u64,
}

/// A branch and its head commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Branch {
    pub name: String,
    pub head: Option<String>,
}

/// A dot as the daemon lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dot {
    /// `ns/name`.
    pub name: String,
    pub current_branch: String,
    pub branches: Vec<Branch>,
    /// Subdots of the current branch.
    pub subdots: Vec<Subdot>,
}

/// A commit as the daemon lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Commit {
    pub id: String,
    pub parents: Vec<String>,
    pub branch: String,
    pub time_unix_secs: u64,
    pub message: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub subdots: Vec<Subdot>,
}

/// The pool's space, as `GET /v1/pool` gives it (the fields the driver reads).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub pool_size_bytes: u64,
    #[serde(default)]
    pub free_bytes: u64,
    /// Why the pool takes no more changes; absent while it serves.
    #[serde(default)]
    pub failed: Option<String>,
}

/// Where the daemon serves NBD.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: String,
    pub nbd_listen: String,
    pub nbd_socket: String,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
}

/// A client of one daemon's API.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    base: String,
    key: String,
    agent: ureq::Agent,
}

fn path_part(s: &str) -> &str {
    // Every name the driver sends is a checked part ([A-Za-z0-9-_.]): nothing to escape.
    s
}

impl DaemonClient {
    /// A client of the API at `url` (`http://host:32607`, or `https://` with `ca`: the PEM file its certificate is
    /// trusted by) with the API key `key`.
    pub fn new(url: &str, key: &str, ca: Option<&Path>) -> Result<Self> {
        let mut agent = ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT);
        if let Some(ca) = ca {
            agent = agent.tls_config(trusting_ca(ca)?);
        }
        Ok(Self { base: url.trim_end_matches('/').to_string(), key: key.trim().to_string(), agent: agent.build() })
    }

    /// The daemon's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key))
    }

    fn answer<T: serde::de::DeserializeOwned>(&self, res: Result<ureq::Response, ureq::Error>) -> Result<T> {
        match res {
            Ok(r) => r.into_json().map_err(|e| Error::Internal(format!("unreadable answer of the daemon: {e}"))),
            Err(ureq::Error::Status(status, r)) => {
                let message = r.into_json::<ErrorBody>().map(|b| b.error).unwrap_or_else(|_| "no message".into());
                Err(Error::Daemon { status, message })
            }
            Err(ureq::Error::Transport(t)) => {
                Err(Error::Unreachable { url: self.base.clone(), message: t.to_string() })
            }
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer(self.request("GET", path).call())
    }

    fn send<T: serde::de::DeserializeOwned>(&self, method: &str, path: &str, body: serde_json::Value) -> Result<T> {
        self.answer(self.request(method, path).send_json(body))
    }

    fn dot_path(dot: &str) -> String {
        let (ns, name) = dot.split_once('/').unwrap_or(("admin", dot));
        format!("/v1/dots/{}/{}", path_part(ns), path_part(name))
    }

    /// `GET /v1/info`.
    pub fn info(&self) -> Result<ServerInfo> {
        self.get("/v1/info")
    }

    /// `GET /v1/pool`.
    pub fn pool(&self) -> Result<PoolStatus> {
        self.get("/v1/pool")
    }

    /// Every dot of the pool.
    pub fn dots(&self) -> Result<Vec<Dot>> {
        self.get("/v1/dots")
    }

    /// One dot; `None` when the daemon has no dot of that name.
    pub fn dot(&self, dot: &str) -> Result<Option<Dot>> {
        match self.get(&Self::dot_path(dot)) {
            Ok(d) => Ok(Some(d)),
            Err(Error::Daemon { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A new dot with `subdots`, each of `size_bytes`.
    pub fn init(&self, dot: &str, subdots: &[&str], size_bytes: u64) -> Result<Dot> {
        self.send("POST", "/v1/dots", json!({"name": dot, "size_bytes": size_bytes, "subdots": subdots}))
    }

    /// A new empty subdot of an existing dot.
    pub fn add_subdot(&self, dot: &str, subdot: &str, size_bytes: u64) -> Result<Dot> {
        self.send(
            "POST",
            &format!("{}/subdots", Self::dot_path(dot)),
            json!({"name": subdot, "size_bytes": size_bytes}),
        )
    }

    /// Removes a subdot from a dot's current branch (refused, 409, while NBD clients use its head).
    pub fn remove_subdot(&self, dot: &str, subdot: &str) -> Result<()> {
        let path = format!("{}/subdots/{}", Self::dot_path(dot), path_part(subdot));
        let _: serde_json::Value = self.answer(self.request("DELETE", &path).call())?;
        Ok(())
    }

    /// Resizes a subdot's head on the current branch (`force`: shrink over data).
    pub fn resize(&self, dot: &str, subdot: &str, size_bytes: u64, force: bool) -> Result<Dot> {
        self.send(
            "POST",
            &format!("{}/resize", Self::dot_path(dot)),
            json!({"subdot": subdot, "size_bytes": size_bytes, "force": force}),
        )
    }

    /// A subdot's quality-of-service limits (the daemon's `GET .../qos`; empty: none), `None` when the dot does not
    /// exist or does not have the subdot.
    pub fn qos(&self, dot: &str, subdot: &str) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        match self.get::<BTreeMap<String, serde_json::Map<String, serde_json::Value>>>(&format!(
            "{}/qos",
            Self::dot_path(dot)
        )) {
            Ok(mut all) => Ok(all.remove(subdot)),
            Err(Error::Daemon { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces a subdot's quality-of-service limits (the daemon's `PUT .../qos`; an empty map removes them).
    pub fn set_qos(&self, dot: &str, subdot: &str, limits: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
        let _: serde_json::Value =
            self.send("PUT", &format!("{}/qos", Self::dot_path(dot)), json!({"subdot": subdot, "limits": limits}))?;
        Ok(())
    }

    /// Deletes a dot with everything it holds (refused, 409, while NBD clients are connected).
    pub fn delete_dot(&self, dot: &str) -> Result<()> {
        let _: serde_json::Value = self.answer(self.request("DELETE", &Self::dot_path(dot)).call())?;
        Ok(())
    }

    /// Every commit of the dot, oldest first.
    pub fn commits(&self, dot: &str) -> Result<Vec<Commit>> {
        self.get(&format!("{}/commits?all=true", Self::dot_path(dot)))
    }

    /// Commits every subdot of the dot's current branch at once.
    pub fn commit(&self, dot: &str, message: &str, metadata: &BTreeMap<String, String>) -> Result<Commit> {
        self.send(
            "POST",
            &format!("{}/commits", Self::dot_path(dot)),
            json!({"message": message, "author": "blockmesh-csi", "metadata": metadata}),
        )
    }

    /// Deletes a commit (409 while it is a branch head or a parent).
    pub fn delete_commit(&self, dot: &str, commit: &str) -> Result<()> {
        let path = format!("{}/commits/{}", Self::dot_path(dot), path_part(commit));
        let _: serde_json::Value = self.answer(self.request("DELETE", &path).call())?;
        Ok(())
    }

    /// A new branch whose heads are clones of `from`.
    pub fn create_branch(&self, dot: &str, branch: &str, from: &str) -> Result<Dot> {
        self.send("POST", &format!("{}/branches", Self::dot_path(dot)), json!({"name": branch, "from": from}))
    }

    /// Deletes a branch that is not the current one.
    pub fn delete_branch(&self, dot: &str, branch: &str) -> Result<()> {
        let path = format!("{}/branches/{}", Self::dot_path(dot), path_part(branch));
        let _: serde_json::Value = self.answer(self.request("DELETE", &path).call())?;
        Ok(())
    }

    /// A new dot whose heads are O(1) clones of `commit` of `dot`.
    pub fn clone_dot(&self, dot: &str, commit: &str, new_dot: &str) -> Result<Dot> {
        self.send("POST", &format!("{}/clone", Self::dot_path(dot)), json!({"commit": commit, "new_dot": new_dot}))
    }

    /// Runs blocking client work off the event loop.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&DaemonClient) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::Internal(format!("daemon request task failed: {e}")))?
    }
}

/// A TLS client configuration trusting the certificates in the PEM file `ca`.
pub(crate) fn trusting_ca(ca: &Path) -> Result<Arc<tokio_rustls::rustls::ClientConfig>> {
    use tokio_rustls::rustls;
    let pem = std::fs::read(ca).map_err(|e| Error::io(format!("reading the CA certificate {}", ca.display()), e))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| Error::io(format!("a PEM certificate in {}", ca.display()), e))?;
        roots.add(cert).map_err(|e| Error::Internal(format!("a certificate in {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::InvalidArgument(format!("{} holds no PEM certificate", ca.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS protocol versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
