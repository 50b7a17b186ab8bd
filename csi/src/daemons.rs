//! Which daemon holds what: a registry of the node daemons (`blockmesh serve`, one per Kubernetes node, each with
//! its own pool) the controller routes to, by node name.
//!
//! Two sources, merged by [`Daemons`]:
//! - static: the default daemon (`--server`, standing for node `--server-node` when given) and any number of
//!   `--server-for NODE=URL`;
//! - discovery ([`ServerPods`], in a cluster [`KubeServerPods`]): the server pods of namespace `blockmesh` that are
//!   Running and Ready and have an IP; a pod's node is its [`NODE_ANNOTATION`] annotation (the operator sets it),
//!   else `spec.nodeName`; its API URL is a template (`http://{ip}:32607`). The map is cached for
//!   [`DISCOVERY_TTL`] and read again at once (at most every [`MIN_REFRESH_INTERVAL`]) when a node it does not know
//!   is asked for.
//!
//! A discovered server wins over `--server-node`'s (the Service behind `--server` balances over every node's
//! server); a `--server-for` wins over both. Ids without a node ([`crate::ids`]) mean the default daemon: node
//! `--server-node`'s when one is given, else `--server` itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::daemon::DaemonClient;
use crate::ids::{pool_home, pool_of, validate_node, validate_pvc};
use crate::kube::KubeApi;
use crate::{Error, Result};

/// How long a discovered map of servers is used before the pods are listed again.
pub const DISCOVERY_TTL: Duration = Duration::from_secs(10);
/// Shortest time between two listings of the pods (a node nobody serves does not make every call list them).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Most servers taken from one listing (Kubernetes' largest supported cluster has 5000 nodes).
pub const MAX_SERVERS: usize = 5000;
/// The labels the operator puts on every server pod.
pub const SERVER_POD_SELECTOR: &str = "app.kubernetes.io/name=blockmesh,app.kubernetes.io/component=server";
/// The annotation naming the node a server pod serves (the operator sets it on every server pod).
pub const NODE_ANNOTATION: &str = "blockmesh.io/node";
/// The namespace of the server pods.
pub const DEFAULT_SERVER_NAMESPACE: &str = "blockmesh";
/// A server's API URL from its pod IP: `{ip}` is replaced (an IPv6 address in brackets).
pub const DEFAULT_URL_TEMPLATE: &str = "http://{ip}:32607";

/// A server's API URL: `template` with `{ip}` replaced by `ip` (bracketed when it is IPv6).
pub fn server_url(template: &str, ip: &str) -> String {
    template.replace("{ip}", &url_host(ip))
}

/// A pod IP as the host part of a URL or `host:port`: an IPv6 address in brackets.
pub fn url_host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// Whether a map of the server pods listed at `at` is listed again now: when never listed or older than
/// [`DISCOVERY_TTL`], or, when `soon` (something asked for is missing or could not be reached), older than
/// [`MIN_REFRESH_INTERVAL`]. Shared by the controller's registry and the node plugin's [`crate::targets`].
pub(crate) fn list_again(at: Option<Instant>, soon: bool) -> bool {
    match at.map(|at| at.elapsed()) {
        None => true,
        Some(age) if soon => age >= MIN_REFRESH_INTERVAL,
        Some(age) => age >= DISCOVERY_TTL,
    }
}

/// `UNAVAILABLE` for pool PVC `pvc` that no server serves now; `listing_error`: why the last listing of the server
/// pods failed, if it did.
pub(crate) fn no_pool_server(pvc: &str, listing_error: Option<&str>) -> Error {
    Error::Unavailable(format!(
        "no blockmesh server serves pool PVC {pvc} now (its node went away and no node has adopted it yet, or its \
         server pod is starting){}",
        listing_failed(listing_error)
    ))
}

/// ` (listing the server pods failed: E)` for messages, or nothing.
fn listing_failed(error: Option<&str>) -> String {
    error.map(|e| format!(" (listing the server pods failed: {e})")).unwrap_or_default()
}

/// What one listing of the server pods says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Servers {
    /// node -> API URL of the servers that serve now.
    pub serving: BTreeMap<String, String>,
    /// Nodes that have a server pod, none of which serves now (not Running, not Ready, no IP yet, being deleted):
    /// a node that is down or whose server restarts. Its pool's dots cannot be asked about.
    pub down: BTreeSet<String>,
    /// The pool PVCs the server pods name ([`PVC_LABEL`], `pvcPerNode` storage), whatever their state.
    pub pod_pvcs: BTreeSet<String>,
    /// Pool PVCs (`pvcPerNode` storage) that no server pod names: released by a node that went away and waiting to
    /// be adopted by another ([`unserved_pools`]). Their dots cannot be asked about either.
    pub unserved_pools: BTreeSet<String>,
    /// pool PVC -> the server pod that serves it now (`pvcPerNode` storage), wherever that pod runs.
    pub pools: BTreeMap<String, PoolServer>,
}

/// The server pod that serves a pool PVC now (`pvcPerNode` storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolServer {
    /// The node it runs on ([`NODE_ANNOTATION`], else `spec.nodeName`).
    pub node: String,
    /// Its pod IP: where it serves NBD (the node plugin connects there).
    pub ip: String,
    /// Its API URL.
    pub url: String,
}

/// The label naming the pool PVC a server pod serves (the operator's, `pvcPerNode` storage).
pub const PVC_LABEL: &str = "blockmesh.io/pvc";
/// The labels the operator puts on every pool PVC (`pvcPerNode` storage).
pub const POOL_PVC_SELECTOR: &str = "app.kubernetes.io/managed-by=blockmesh-operator,app.kubernetes.io/component=pool";

/// The pool PVCs a PVC list (`GET .../persistentvolumeclaims` JSON) names that no server pod names (`pod_pvcs`),
/// not being deleted; at most [`MAX_SERVERS`].
pub fn unserved_pools(body: &[u8], pod_pvcs: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    let list: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::Kubernetes(format!("the list of pool PVCs is not JSON: {e}")))?;
    let items = list.get("items").and_then(serde_json::Value::as_array).ok_or_else(|| {
        Error::Kubernetes("the list of pool PVCs has no items: not a PersistentVolumeClaimList".into())
    })?;
    let mut out = BTreeSet::new();
    for pvc in items {
        if pvc.pointer("/metadata/deletionTimestamp").is_some_and(|d| !d.is_null()) {
            continue;
        }
        let Some(name) = pvc.pointer("/metadata/name").and_then(serde_json::Value::as_str) else { continue };
        if !pod_pvcs.contains(name) && out.len() < MAX_SERVERS {
            out.insert(name.to_string());
        }
    }
    Ok(out)
}

/// The servers a pod list (`GET .../pods` JSON) names: node -> API URL, from the pods that are Running, Ready
/// (condition `Ready` = `True`), not being deleted, with a `status.podIP` and a node ([`NODE_ANNOTATION`], else
/// `spec.nodeName`) that is a valid node name. Of two such pods for one node, the newest (`creationTimestamp`,
/// then name) wins. The nodes of the other pods, where no pod serves, are [`Servers::down`]. Serving pods that
/// name a pool PVC ([`PVC_LABEL`]) are also [`Servers::pools`] by PVC (of two for one PVC, the newest). At most
/// [`MAX_SERVERS`] of each.
pub fn parse_server_pods(body: &[u8], template: &str) -> Result<Servers> {
    let list: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::Kubernetes(format!("the list of server pods is not JSON: {e}")))?;
    let items = list
        .get("items")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| Error::Kubernetes("the list of server pods has no items: not a PodList".into()))?;
    let s = |v: &serde_json::Value, p: &str| v.pointer(p).and_then(serde_json::Value::as_str).map(str::to_string);
    // node -> (creationTimestamp, name, url)
    let mut best: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    let mut down = BTreeSet::new();
    let mut pod_pvcs = BTreeSet::new();
    // pvc -> (creationTimestamp, name, server)
    let mut pools: BTreeMap<String, (String, String, PoolServer)> = BTreeMap::new();
    for pod in items {
        let name = s(pod, "/metadata/name").unwrap_or_default();
        let pvc = pod.pointer("/metadata/labels").and_then(|l| l.get(PVC_LABEL)).and_then(|v| v.as_str());
        if let Some(pvc) = pvc {
            if pod_pvcs.len() < MAX_SERVERS {
                pod_pvcs.insert(pvc.to_string());
            }
        }
        let annotated = pod
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(NODE_ANNOTATION))
            .and_then(serde_json::Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let Some(node) = annotated.or_else(|| s(pod, "/spec/nodeName")) else { continue };
        if let Err(e) = validate_node(&node) {
            tracing::warn!(pod = name, error = %e, "server pod skipped");
            continue;
        }
        let deleting = pod.pointer("/metadata/deletionTimestamp").is_some_and(|d| !d.is_null());
        let running = s(pod, "/status/phase").as_deref() == Some("Running");
        let ready = pod.pointer("/status/conditions").and_then(serde_json::Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| s(c, "/type").as_deref() == Some("Ready") && s(c, "/status").as_deref() == Some("True"))
        });
        let ip = s(pod, "/status/podIP").filter(|ip| !ip.is_empty());
        let Some(ip) = ip.filter(|_| running && ready && !deleting) else {
            if down.len() < MAX_SERVERS {
                down.insert(node);
            }
            continue;
        };
        let created = s(pod, "/metadata/creationTimestamp").unwrap_or_default();
        let url = server_url(template, &ip);
        if let Some(pvc) = pvc {
            if let Err(e) = validate_pvc(pvc) {
                tracing::warn!(pod = name, pvc, error = %e, "pool PVC of a server pod skipped");
            } else if pools.get(pvc).is_none_or(|have| (&have.0, &have.1) < (&created, &name))
                && (pools.len() < MAX_SERVERS || pools.contains_key(pvc))
            {
                let server = PoolServer { node: node.clone(), ip: ip.clone(), url: url.clone() };
                pools.insert(pvc.to_string(), (created.clone(), name.clone(), server));
            }
        }
        let candidate = (created, name, url);
        match best.get(&node) {
            Some(have) if (&have.0, &have.1) >= (&candidate.0, &candidate.1) => {}
            Some(_) => {
                best.insert(node, candidate);
            }
            None if best.len() >= MAX_SERVERS => {
                tracing::warn!(node, limit = MAX_SERVERS, "more server pods than the driver takes: skipped");
            }
            None => {
                best.insert(node, candidate);
            }
        }
    }
    down.retain(|n| !best.contains_key(n));
    let serving = best.into_iter().map(|(node, (_, _, url))| (node, url)).collect();
    let pools = pools.into_iter().map(|(pvc, (_, _, server))| (pvc, server)).collect();
    Ok(Servers { serving, down, pod_pvcs, unserved_pools: BTreeSet::new(), pools })
}

/// Lists the server pods (blocking): those that serve now and the nodes whose server does not.
pub trait ServerPods: Send + Sync + std::fmt::Debug {
    fn servers(&self) -> Result<Servers>;
}

/// The server pods read from the Kubernetes API: one `GET` of the pods labelled [`SERVER_POD_SELECTOR`] in one
/// namespace, with the pod's service account.
#[derive(Debug)]
pub struct KubeServerPods {
    api: KubeApi,
    namespace: String,
    template: String,
    /// Also list the pool PVCs no pod serves ([`Servers::unserved_pools`]).
    unserved: bool,
}

impl KubeServerPods {
    /// The server pods of `namespace`, their URLs made with `template` ([`server_url`]).
    pub fn new(api: KubeApi, namespace: &str, template: &str) -> Result<Self> {
        crate::ids::validate_part("server namespace", namespace)?;
        if !template.contains("{ip}") {
            return Err(Error::InvalidArgument(format!("server URL template {template:?} has no {{ip}}")));
        }
        Ok(Self { api, namespace: namespace.to_string(), template: template.to_string(), unserved: true })
    }

    /// Lists the pods only, not the pool PVCs no pod serves (the node plugin needs no more: it may list pods only).
    pub fn pods_only(mut self) -> Self {
        self.unserved = false;
        self
    }
}

/// Escapes a label selector for a query string.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl ServerPods for KubeServerPods {
    fn servers(&self) -> Result<Servers> {
        let path = format!(
            "/api/v1/namespaces/{}/pods?labelSelector={}&limit={}",
            self.namespace,
            query_escape(SERVER_POD_SELECTOR),
            MAX_SERVERS * 2
        );
        let what = format!("the blockmesh server pods of namespace {}", self.namespace);
        let body = self.api.get(&path, &what)?.ok_or_else(|| Error::Kubernetes(format!("{what}: not found")))?;
        let mut servers = parse_server_pods(&body, &self.template)?;
        if !self.unserved {
            return Ok(servers);
        }
        // pool PVCs no pod serves (pvcPerNode): without them (no such PVCs, or no right to list them) none is known
        let path = format!(
            "/api/v1/namespaces/{}/persistentvolumeclaims?labelSelector={}&limit={}",
            self.namespace,
            query_escape(POOL_PVC_SELECTOR),
            MAX_SERVERS * 2
        );
        let what = format!("the blockmesh pool PVCs of namespace {}", self.namespace);
        match self.api.get(&path, &what).and_then(|b| b.map(|b| unserved_pools(&b, &servers.pod_pvcs)).transpose()) {
            Ok(pools) => servers.unserved_pools = pools.unwrap_or_default(),
            Err(e) => tracing::warn!(error = %e, "pool PVCs not listed: one no server serves is not known"),
        }
        Ok(servers)
    }
}

#[derive(Debug, Default)]
struct Cache {
    at: Option<Instant>,
    nodes: BTreeMap<String, Arc<DaemonClient>>,
    /// pool PVC -> (node, client) of the server serving it ([`Servers::pools`]).
    pools: BTreeMap<String, (String, Arc<DaemonClient>)>,
    /// Nodes with a server pod that does not serve ([`Servers::down`]).
    down: BTreeSet<String>,
    /// Pool PVCs no server pod names ([`Servers::unserved_pools`]).
    unserved_pools: BTreeSet<String>,
    /// Why the last listing failed (the older map is used meanwhile).
    error: Option<String>,
    /// A server of the map could not be reached: the next lookup lists the pods again (at most every
    /// [`MIN_REFRESH_INTERVAL`]) instead of waiting for [`DISCOVERY_TTL`].
    suspect: bool,
}

#[derive(Debug)]
struct Discovery {
    pods: Box<dyn ServerPods>,
    key: String,
    ca: Option<PathBuf>,
    cache: Mutex<Cache>,
}

impl Discovery {
    /// The discovered servers: cached for [`DISCOVERY_TTL`]; `force`: listed again unless they were within
    /// [`MIN_REFRESH_INTERVAL`]. A failed listing keeps the older map (logged; its error is kept for messages).
    fn current(&self, force: bool) -> Known {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if list_again(cache.at, force || cache.suspect) {
            match self.pods.servers() {
                Ok(Servers { serving, down, unserved_pools, pools, .. }) => {
                    // a client per URL, kept from the last listing when its URL is the same
                    let mut clients: BTreeMap<String, Arc<DaemonClient>> = BTreeMap::new();
                    for c in cache.nodes.values().chain(cache.pools.values().map(|(_, c)| c)) {
                        clients.insert(c.url().to_string(), c.clone());
                    }
                    let mut client_for = |url: &str| -> Option<Arc<DaemonClient>> {
                        if let Some(c) = clients.get(url.trim_end_matches('/')) {
                            return Some(c.clone());
                        }
                        match DaemonClient::new(url, &self.key, self.ca.as_deref()) {
                            Ok(c) => {
                                let c = Arc::new(c);
                                clients.insert(c.url().to_string(), c.clone());
                                Some(c)
                            }
                            Err(e) => {
                                tracing::warn!(url, error = %e, "no client for a discovered server");
                                None
                            }
                        }
                    };
                    let mut nodes = BTreeMap::new();
                    for (node, url) in serving {
                        if let Some(client) = client_for(&url) {
                            nodes.insert(node, client);
                        }
                    }
                    let mut served = BTreeMap::new();
                    for (pvc, server) in pools {
                        if let Some(client) = client_for(&server.url) {
                            served.insert(pvc, (server.node, client));
                        }
                    }
                    let moved: Vec<String> = served
                        .iter()
                        .filter(|(pvc, (node, _))| cache.pools.get(*pvc).is_some_and(|(was, _)| was != node))
                        .map(|(pvc, (node, _))| format!("{pvc} -> node {node}"))
                        .collect();
                    if !moved.is_empty() {
                        tracing::info!(pools = ?moved, "blockmesh pools served on another node now");
                    }
                    cache.pools = served;
                    if nodes.keys().ne(cache.nodes.keys()) {
                        tracing::info!(nodes = ?nodes.keys().collect::<Vec<_>>(), "blockmesh servers discovered");
                    }
                    if down != cache.down && !down.is_empty() {
                        tracing::warn!(nodes = ?down, "blockmesh servers not serving (their nodes down?)");
                    }
                    if unserved_pools != cache.unserved_pools && !unserved_pools.is_empty() {
                        tracing::warn!(pvcs = ?unserved_pools, "blockmesh pool PVCs no server serves");
                    }
                    cache.nodes = nodes;
                    cache.down = down;
                    cache.unserved_pools = unserved_pools;
                    cache.error = None;
                    cache.suspect = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing the blockmesh server pods failed; the servers known stay");
                    cache.error = Some(e.to_string());
                }
            }
            cache.at = Some(Instant::now());
        }
        Known {
            nodes: cache.nodes.clone(),
            pools: cache.pools.clone(),
            unasked: Unasked { nodes: cache.down.clone(), pools: cache.unserved_pools.clone() },
            error: cache.error.clone(),
        }
    }
}

/// What the registry knows at one moment.
#[derive(Debug, Default)]
struct Known {
    /// node -> its daemon.
    nodes: BTreeMap<String, Arc<DaemonClient>>,
    /// pool PVC -> (node, daemon) of the server serving it now.
    pools: BTreeMap<String, (String, Arc<DaemonClient>)>,
    unasked: Unasked,
    /// Why the last listing failed.
    error: Option<String>,
}

/// A home for messages: `node X`, `pool PVC P`, or `the default server` (`None`).
pub fn describe_home(home: Option<&str>) -> String {
    match home {
        None => "the default server".to_string(),
        Some(h) => match pool_of(h) {
            Some(pvc) => format!("pool PVC {pvc}"),
            None => format!("node {h}"),
        },
    }
}

/// Pools that exist but whose server cannot be asked now ([`Daemons::unasked`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unasked {
    /// Nodes whose server pod does not serve.
    pub nodes: BTreeSet<String>,
    /// Pool PVCs no server pod names.
    pub pools: BTreeSet<String>,
}

impl Unasked {
    /// Each, described for a message: `node X (its server pod is not ready)`, `pool PVC P (no server serves it)`.
    pub fn describe(&self) -> Vec<String> {
        let nodes = self.nodes.iter().map(|n| format!("node {n} (its server pod is not ready)"));
        nodes.chain(self.pools.iter().map(|p| format!("pool PVC {p} (no server serves it now)"))).collect()
    }
}

/// The daemons the controller knows, by node.
#[derive(Debug)]
pub struct Daemons {
    default: Arc<DaemonClient>,
    default_node: Option<String>,
    fixed: BTreeMap<String, Arc<DaemonClient>>,
    discovery: Option<Discovery>,
}

impl Daemons {
    /// The default daemon (`--server`), standing for node `default_node` when given, and the daemons of other
    /// nodes given by hand (`--server-for`). Node names are checked.
    pub fn new(
        default: Arc<DaemonClient>,
        default_node: Option<String>,
        fixed: BTreeMap<String, Arc<DaemonClient>>,
    ) -> Result<Self> {
        for node in default_node.iter().chain(fixed.keys()) {
            validate_node(node)?;
        }
        Ok(Self { default, default_node, fixed, discovery: None })
    }

    /// One daemon (standing for `node` when given).
    pub fn single(default: Arc<DaemonClient>, node: Option<String>) -> Result<Self> {
        Self::new(default, node, BTreeMap::new())
    }

    /// Adds the servers `pods` lists, reached with API key `key` (and `ca` for HTTPS).
    pub fn with_discovery(mut self, pods: Box<dyn ServerPods>, key: &str, ca: Option<&Path>) -> Self {
        self.discovery = Some(Discovery {
            pods,
            key: key.trim().to_string(),
            ca: ca.map(Path::to_path_buf),
            cache: Mutex::new(Cache::default()),
        });
        self
    }

    /// The node of the default daemon, when known.
    pub fn default_node(&self) -> Option<&str> {
        self.default_node.as_deref()
    }

    /// Every named daemon: `--server-node`'s, then the discovered ones over it, then `--server-for` over those;
    /// the discovered pools; and why discovery failed last, if it did.
    fn known(&self, force: bool) -> Known {
        let mut known = match &self.discovery {
            Some(d) => d.current(force),
            None => Known::default(),
        };
        if let Some(n) = &self.default_node {
            known.nodes.entry(n.clone()).or_insert_with(|| self.default.clone());
        }
        known.nodes.extend(self.fixed.iter().map(|(n, c)| (n.clone(), c.clone())));
        known
    }

    /// The daemon of `home` (`None`: the default daemon): a node's, or for `pool=PVC` ([`crate::ids::pool_of`]) the
    /// one serving that pool now, on whatever node. A home not known is looked for again at once (discovery); still
    /// unknown, [`Error::Unavailable`] (no server there now: the caller retries later).
    pub fn get(&self, home: Option<&str>) -> Result<Arc<DaemonClient>> {
        let Some(home) = home.or(self.default_node.as_deref()) else { return Ok(self.default.clone()) };
        let find = |k: &Known| match pool_of(home) {
            Some(pvc) => k.pools.get(pvc).map(|(_, c)| c.clone()),
            None => k.nodes.get(home).cloned(),
        };
        let known = self.known(false);
        if let Some(c) = find(&known) {
            return Ok(c);
        }
        // without discovery nothing can have changed since
        let known = if self.discovery.is_some() { self.known(true) } else { known };
        find(&known).ok_or_else(|| match pool_of(home) {
            Some(pvc) => no_pool_server(pvc, known.error.as_deref()),
            None => Error::Unavailable(format!(
                "no blockmesh server is known on node {home} now (its server pod is not running or not ready?){}",
                listing_failed(known.error.as_deref())
            )),
        })
    }

    /// A call to the server at `url` could not reach it: if discovery found it, the next lookup lists the server
    /// pods again (its pod may have gone, or its pool moved to another node's server) rather than use the cached
    /// map until it is [`DISCOVERY_TTL`] old. Servers named by hand are not listed: nothing changes for them.
    pub fn suspect(&self, url: &str) {
        let Some(d) = &self.discovery else { return };
        let mut cache = d.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let url = url.trim_end_matches('/');
        let known = cache.nodes.values().chain(cache.pools.values().map(|(_, c)| c)).any(|c| c.url() == url);
        if known && !cache.suspect {
            tracing::info!(url, "a discovered blockmesh server cannot be reached; the server pods are listed again");
            cache.suspect = true;
        }
    }

    /// Where a volume placed on `node` lives: `pool=PVC` when the server there serves a pool PVC (`pvcPerNode`
    /// storage: the pool may move to another node later, and the volume with it), else the node itself.
    pub fn home_on(&self, node: &str) -> String {
        let known = self.known(false);
        let Some(daemon) = known.nodes.get(node) else { return node.to_string() };
        known
            .pools
            .iter()
            .find(|(_, (n, c))| n == node && c.url() == daemon.url())
            .map(|(pvc, _)| pool_home(pvc))
            .unwrap_or_else(|| node.to_string())
    }

    /// The pools discovery knows of that no server can be asked about now: nodes with a server pod that does not
    /// serve (and no daemon named for them otherwise), and pool PVCs no server pod names. Empty without discovery.
    pub fn unasked(&self) -> Unasked {
        if self.discovery.is_none() {
            return Unasked::default();
        }
        let Known { nodes, mut unasked, .. } = self.known(false);
        unasked.nodes.retain(|n| !nodes.contains_key(n));
        unasked
    }

    /// Every daemon once, by home in order: the servers of pools as `pool=PVC`, the other named ones by node; the
    /// default daemon alone (home `None`) when none is named.
    pub fn all(&self) -> Vec<(Option<String>, Arc<DaemonClient>)> {
        let Known { nodes, pools, .. } = self.known(false);
        if nodes.is_empty() && pools.is_empty() {
            return vec![(None, self.default.clone())];
        }
        let pool_urls: BTreeSet<&str> = pools.values().map(|(_, c)| c.url()).collect();
        let mut homes: BTreeMap<String, Arc<DaemonClient>> =
            nodes.iter().filter(|(_, c)| !pool_urls.contains(c.url())).map(|(n, c)| (n.clone(), c.clone())).collect();
        homes.extend(pools.iter().map(|(pvc, (_, c))| (pool_home(pvc), c.clone())));
        homes.into_iter().map(|(h, c)| (Some(h), c)).collect()
    }
}

/// Parses `--server-for NODE=URL`.
pub fn parse_server_for(arg: &str) -> Result<(String, String)> {
    let (node, url) =
        arg.split_once('=').ok_or_else(|| Error::InvalidArgument(format!("--server-for {arg:?} is not NODE=URL")))?;
    validate_node(node)?;
    if url.is_empty() {
        return Err(Error::InvalidArgument(format!("--server-for {arg:?} names no URL")));
    }
    Ok((node.to_string(), url.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, created: &str, node: &str, ip: Option<&str>, phase: &str, ready: &str) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"nodeName": node},
            "status": {
                "phase": phase,
                "podIP": ip,
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": ready}],
            },
        })
    }

    fn parse(items: Vec<serde_json::Value>) -> Result<BTreeMap<String, String>> {
        Ok(parse_all(items)?.serving)
    }

    fn parse_all(items: Vec<serde_json::Value>) -> Result<Servers> {
        let body = serde_json::to_vec(&json!({"kind": "PodList", "items": items}))
            .map_err(|e| Error::Internal(e.to_string()))?;
        parse_server_pods(&body, DEFAULT_URL_TEMPLATE)
    }

    #[test]
    fn running_ready_pods_with_an_ip_are_servers() -> Result<()> {
        let t = "2026-01-01T00:00:00Z";
        let got = parse(vec![
            pod("s-a", t, "node-a", Some("10.0.0.1"), "Running", "True"),
            pod("s-b", t, "node-b", Some("10.0.0.2"), "Running", "False"),
            pod("s-c", t, "node-c", None, "Running", "True"),
            pod("s-d", t, "node-d", Some("10.0.0.4"), "Pending", "True"),
            pod("s-e", t, "Bad_Node", Some("10.0.0.5"), "Running", "True"),
        ])?;
        assert_eq!(got, BTreeMap::from([("node-a".to_string(), "http://10.0.0.1:32607".to_string())]));
        Ok(())
    }

    #[test]
    fn nodes_whose_server_pods_do_not_serve_are_down() -> Result<()> {
        let t = "2026-01-01T00:00:00Z";
        let mut deleting = pod("s-f", t, "node-f", Some("10.0.0.6"), "Running", "True");
        deleting["metadata"]["deletionTimestamp"] = json!("2026-04-02T00:00:00Z");
        let got = parse_all(vec![
            pod("s-a", t, "node-a", Some("10.0.0.1"), "Running", "True"),
            pod("s-b", t, "node-b", Some("10.0.0.2"), "Running", "False"),
            pod("s-c", t, "node-c", None, "Running", "True"),
            pod("s-d", t, "node-d", Some("10.0.0.4"), "Unknown", "False"),
            pod("s-e", t, "Bad_Node", Some("10.0.0.5"), "Running", "True"),
            deleting,
            // a node whose old pod is going while its new one serves: not down
            pod("s-a-old", t, "node-a", Some("10.0.0.7"), "Running", "False"),
        ])?;
        assert_eq!(got.serving.keys().collect::<Vec<_>>(), ["node-a"]);
        assert_eq!(got.down.iter().collect::<Vec<_>>(), ["node-b", "node-c", "node-d", "node-f"]);
        Ok(())
    }

    #[test]
    fn pool_pvcs_that_no_server_pod_names_are_unserved() -> Result<()> {
        let t = "2026-01-01T00:00:00Z";
        let mut served = pod("s-a", t, "node-a", Some("10.0.0.1"), "Running", "True");
        served["metadata"]["labels"] = json!({PVC_LABEL: "pool-a"});
        let mut restarting = pod("s-b", t, "node-b", None, "Pending", "False");
        restarting["metadata"]["labels"] = json!({PVC_LABEL: "pool-b"});
        let got = parse_all(vec![served, restarting])?;
        assert_eq!(got.pod_pvcs.iter().collect::<Vec<_>>(), ["pool-a", "pool-b"]);
        let pvc = |name: &str, deleting: bool| {
            let mut p = json!({"metadata": {"name": name}});
            if deleting {
                p["metadata"]["deletionTimestamp"] = json!(t);
            }
            p
        };
        let list = json!({"kind": "PersistentVolumeClaimList", "items": [
            pvc("pool-a", false), pvc("pool-b", false), pvc("pool-c", false), pvc("pool-d", true),
        ]});
        let body = serde_json::to_vec(&list).map_err(|e| Error::Internal(e.to_string()))?;
        // pool-b's node is down (its pod names it): counted there, not twice; pool-d is going
        assert_eq!(unserved_pools(&body, &got.pod_pvcs)?.into_iter().collect::<Vec<_>>(), ["pool-c"]);
        let e = unserved_pools(b"{}", &got.pod_pvcs).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not a PersistentVolumeClaimList"), "{e}");
        Ok(())
    }

    #[test]
    fn serving_pods_of_a_pool_pvc_are_its_servers_wherever_they_run() -> Result<()> {
        let (t1, t2) = ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z");
        let on_pvc = |mut p: serde_json::Value, pvc: &str| {
            p["metadata"]["labels"] = json!({PVC_LABEL: pvc});
            p
        };
        let got = parse_all(vec![
            on_pvc(pod("s-a", t1, "node-a", Some("10.0.0.1"), "Running", "True"), "pvc-a"),
            // node-b went away; node-c adopted its PVC (an extra pod beside its own)
            on_pvc(pod("s-c", t1, "node-c", Some("10.0.0.3"), "Running", "True"), "pvc-c"),
            on_pvc(pod("s-b-on-c", t2, "node-c", Some("10.0.0.4"), "Running", "True"), "pvc-b"),
            // a restart of pvc-a's server elsewhere: the newer pod serves it
            on_pvc(pod("s-a2", t2, "node-d", Some("fd00::5"), "Running", "True"), "pvc-a"),
            // not ready: no server for its PVC
            on_pvc(pod("s-e", t1, "node-e", Some("10.0.0.6"), "Running", "False"), "pvc-e"),
            on_pvc(pod("s-f", t1, "node-f", Some("10.0.0.7"), "Running", "True"), "Bad_Pvc"),
        ])?;
        let pools: Vec<(&str, &str, &str, &str)> =
            got.pools.iter().map(|(pvc, s)| (pvc.as_str(), s.node.as_str(), s.ip.as_str(), s.url.as_str())).collect();
        assert_eq!(
            pools,
            [
                ("pvc-a", "node-d", "fd00::5", "http://[fd00::5]:32607"),
                ("pvc-b", "node-c", "10.0.0.4", "http://10.0.0.4:32607"),
                ("pvc-c", "node-c", "10.0.0.3", "http://10.0.0.3:32607"),
            ]
        );
        assert!(got.down.contains("node-e"));
        Ok(())
    }

    #[test]
    fn a_pools_volumes_follow_it_to_the_node_that_adopts_it() -> Result<()> {
        let pods = Arc::new(FakePods::default());
        let set = |serving: &[(&str, &str)], pools: &[(&str, &str, &str)]| {
            *pods.servers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                serving.iter().map(|(n, u)| (n.to_string(), u.to_string())).collect();
            *pods.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = pools
                .iter()
                .map(|(pvc, n, ip)| {
                    let server = PoolServer { node: n.to_string(), ip: ip.to_string(), url: format!("http://{ip}:1") };
                    (pvc.to_string(), server)
                })
                .collect();
        };
        set(
            &[("node-a", "http://10.0.0.1:1"), ("node-b", "http://10.0.0.2:1")],
            &[("pvc-a", "node-a", "10.0.0.1"), ("pvc-b", "node-b", "10.0.0.2")],
        );
        let default = Arc::new(DaemonClient::new("http://svc:32607", "k", None)?);
        let d = Daemons::new(default, None, BTreeMap::new())?.with_discovery(Box::new(pods.clone()), "k", None);
        // a volume placed on node-b lives on node-b's pool
        assert_eq!(d.home_on("node-b"), "pool=pvc-b");
        assert_eq!(d.home_on("node-x"), "node-x", "no server there: the node");
        assert_eq!(d.get(Some("pool=pvc-b"))?.url(), "http://10.0.0.2:1");
        // each daemon listed once, by its pool
        let homes: Vec<Option<String>> = d.all().into_iter().map(|(h, _)| h).collect();
        assert_eq!(homes, [Some("pool=pvc-a".to_string()), Some("pool=pvc-b".to_string())]);
        // node-b goes away; node-a adopts pvc-b with a second server pod: pvc-b's volumes are there now
        set(&[("node-a", "http://10.0.0.1:1")], &[("pvc-a", "node-a", "10.0.0.1"), ("pvc-b", "node-a", "10.0.0.9")]);
        std::thread::sleep(DISCOVERY_TTL);
        assert_eq!(d.get(Some("pool=pvc-b"))?.url(), "http://10.0.0.9:1");
        assert!(matches!(d.get(Some("node-b")), Err(Error::Unavailable(_))), "the node itself is gone");
        assert_eq!(d.home_on("node-a"), "pool=pvc-a", "new volumes on node-a: its own pool");
        assert_eq!(d.all().len(), 2);
        // a pool nobody serves: UNAVAILABLE, naming the PVC
        set(&[("node-a", "http://10.0.0.1:1")], &[("pvc-a", "node-a", "10.0.0.1")]);
        std::thread::sleep(MIN_REFRESH_INTERVAL);
        assert_eq!(d.get(Some("pool=pvc-b"))?.url(), "http://10.0.0.9:1", "cached until it is suspected");
        d.suspect("http://10.0.0.77:1/");
        assert!(d.get(Some("pool=pvc-b")).is_ok(), "a server discovery never named changes nothing");
        d.suspect("http://10.0.0.9:1/");
        match d.get(Some("pool=pvc-b")) {
            Err(Error::Unavailable(m)) => assert!(m.contains("pool PVC pvc-b"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(describe_home(Some("pool=pvc-b")), "pool PVC pvc-b");
        assert_eq!(describe_home(Some("node-a")), "node node-a");
        assert_eq!(describe_home(None), "the default server");
        Ok(())
    }

    #[test]
    fn the_annotation_names_the_node_and_ipv6_is_bracketed() -> Result<()> {
        let mut p = pod("s-a", "2026-01-01T00:00:00Z", "node-a", Some("fd00::1"), "Running", "True");
        p["metadata"]["annotations"] = json!({NODE_ANNOTATION: "node-z"});
        let got = parse(vec![p])?;
        assert_eq!(got, BTreeMap::from([("node-z".to_string(), "http://[fd00::1]:32607".to_string())]));
        assert_eq!(server_url("https://{ip}:9/", "10.1.2.3"), "https://10.1.2.3:9/");
        Ok(())
    }

    #[test]
    fn of_two_pods_for_a_node_the_ready_then_the_newest_wins() -> Result<()> {
        let got = parse(vec![
            pod("new-unready", "2026-03-01T00:00:00Z", "n", Some("10.0.0.9"), "Running", "False"),
            pod("old", "2026-01-01T00:00:00Z", "n", Some("10.0.0.1"), "Running", "True"),
        ])?;
        assert_eq!(got["n"], "http://10.0.0.1:32607");
        let got = parse(vec![
            pod("new", "2026-02-01T00:00:00Z", "n", Some("10.0.0.2"), "Running", "True"),
            pod("old", "2026-01-01T00:00:00Z", "n", Some("10.0.0.1"), "Running", "True"),
        ])?;
        assert_eq!(got["n"], "http://10.0.0.2:32607");
        let mut deleting = pod("newest", "2026-04-01T00:00:00Z", "n", Some("10.0.0.3"), "Running", "True");
        deleting["metadata"]["deletionTimestamp"] = json!("2026-04-02T00:00:00Z");
        let got = parse(vec![deleting, pod("old", "2026-01-01T00:00:00Z", "n", Some("10.0.0.1"), "Running", "True")])?;
        assert_eq!(got["n"], "http://10.0.0.1:32607", "a pod being deleted is no server");
        Ok(())
    }

    #[test]
    fn garbage_is_a_clear_error_and_the_servers_are_bounded() -> Result<()> {
        let e = parse_server_pods(b"<html>", DEFAULT_URL_TEMPLATE).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not JSON"), "{e}");
        let e = parse_server_pods(b"{\"kind\":\"Status\"}", DEFAULT_URL_TEMPLATE).err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("not a PodList"));
        let many: Vec<_> = (0..=MAX_SERVERS)
            .map(|i| {
                pod(&format!("s{i}"), "2026-01-01T00:00:00Z", &format!("n{i}"), Some("10.0.0.1"), "Running", "True")
            })
            .collect();
        assert_eq!(parse(many)?.len(), MAX_SERVERS);
        Ok(())
    }

    #[test]
    fn server_for_is_node_equals_url() {
        assert_eq!(
            parse_server_for("node-b=http://10.0.0.2:32607").ok(),
            Some(("node-b".to_string(), "http://10.0.0.2:32607".to_string()))
        );
        for bad in ["node-b", "Node=http://x", "node-b=", "=http://x"] {
            assert!(parse_server_for(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, Default)]
    struct FakePods {
        servers: Mutex<BTreeMap<String, String>>,
        down: Mutex<BTreeSet<String>>,
        pools: Mutex<BTreeMap<String, PoolServer>>,
        calls: Mutex<usize>,
    }

    impl ServerPods for Arc<FakePods> {
        fn servers(&self) -> Result<Servers> {
            *self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
            Ok(Servers {
                serving: self.servers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
                down: self.down.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
                pod_pvcs: BTreeSet::new(),
                unserved_pools: BTreeSet::from(["pool-gone".to_string()]),
                pools: self.pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
            })
        }
    }

    #[test]
    fn discovery_is_cached_and_an_unknown_node_is_looked_for_at_once() -> Result<()> {
        let pods = Arc::new(FakePods::default());
        pods.servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert("a".into(), "http://10.0.0.1:1".into());
        let default = Arc::new(DaemonClient::new("http://svc:32607", "k", None)?);
        let fixed = BTreeMap::from([("c".to_string(), Arc::new(DaemonClient::new("http://10.9.9.9:1", "k", None)?))]);
        let d = Daemons::new(default, None, fixed)?.with_discovery(Box::new(pods.clone()), "k", None);
        assert_eq!(d.get(Some("a"))?.url(), "http://10.0.0.1:1");
        assert_eq!(d.get(Some("a"))?.url(), "http://10.0.0.1:1");
        assert_eq!(*pods.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner), 1, "cached");
        assert_eq!(d.get(None)?.url(), "http://svc:32607", "no default node: --server");
        assert_eq!(d.get(Some("c"))?.url(), "http://10.9.9.9:1", "--server-for");
        let nodes: Vec<Option<String>> = d.all().into_iter().map(|(n, _)| n).collect();
        assert_eq!(nodes, [Some("a".to_string()), Some("c".to_string())]);
        // a new node: not in the cache, listed again at once (after the shortest interval)
        pods.servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert("b".into(), "http://10.0.0.2:1".into());
        std::thread::sleep(MIN_REFRESH_INTERVAL);
        assert_eq!(d.get(Some("b"))?.url(), "http://10.0.0.2:1");
        assert!(matches!(d.get(Some("zz")), Err(Error::Unavailable(_))));
        let pools = BTreeSet::from(["pool-gone".to_string()]);
        assert_eq!(d.unasked(), Unasked { nodes: BTreeSet::new(), pools: pools.clone() });
        // nodes whose server does not serve: down, unless a daemon is named for them by hand
        pods.down.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(["c".into(), "d".into()]);
        std::thread::sleep(MIN_REFRESH_INTERVAL);
        assert!(matches!(d.get(Some("zz")), Err(Error::Unavailable(_))), "listed again");
        assert_eq!(d.unasked(), Unasked { nodes: BTreeSet::from(["d".to_string()]), pools });
        assert_eq!(
            d.unasked().describe(),
            ["node d (its server pod is not ready)", "pool PVC pool-gone (no server serves it now)"]
        );
        Ok(())
    }
}
