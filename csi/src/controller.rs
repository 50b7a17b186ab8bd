//! The CSI Controller and GroupController services: volumes are subdots of dots, snapshots are commits, clones are
//! new dots cloned (O(1)) from a commit; everything through the daemon's control API.
//!
//! How CSI maps onto dots (the crate's README says why):
//! - `CreateVolume` names `ns/dot/subdot` ([`crate::pvc::placement`]); a new dot is created with that subdot, an
//!   existing dot gets the subdot added, an existing subdot is the volume (Dotmesh's behaviour: a PVC naming an
//!   existing dot uses its data) when its size fits the capacity range, `ALREADY_EXISTS` otherwise.
//! - A snapshot is a commit of the whole dot (every subdot at once: a commit always covers them all), marked with
//!   metadata [`META_KIND`] / [`META_NAME`] / [`META_SUBDOT`]; its id names the subdot it was taken of.
//! - A volume from a snapshot is a new dot cloned from the commit; from a volume, a commit (marked
//!   `clone-source`) then a clone. The clone holds every subdot of the commit; the volume is the source's subdot.
//! - A commit that is a branch head or a parent cannot be deleted at once: `DeleteSnapshot` then marks it deleted
//!   with a branch [`TOMBSTONE_PREFIX`]`COMMIT` and gives it back when nothing needs it any more ([`sweep`]).
//! - `DeleteVolume` of a dot's last live subdot deletes the dot (refused, `FAILED_PRECONDITION`, while live snapshots
//!   of the dot remain: snapshots are not independent of their dot); of a subdot with siblings, removes that subdot
//!   from the dot (its head's data is given back; commits keep their copies; it can be created again).
//!
//! Several daemons (one per node, each with its own pool; [`Daemons`]): a volume is made on one node's daemon and
//! its id names that node (`NODE:ns/dot/subdot`, [`crate::ids`]); every later call on it, its snapshots and groups
//! goes to that daemon ([`Error::Unavailable`] while the node has none). Where `CreateVolume` makes a volume: on
//! the node whose daemon has the dot already (Dotmesh: a PVC naming an existing dot uses its data); with a content
//! source, on the source's node (an O(1) clone needs the same pool); else on the first preferred, then requisite,
//! topology node that has a daemon; else on the default daemon. `RESOURCE_EXHAUSTED` when the requisite topology
//! excludes the only node it can go to. A dot not found while some servers cannot be asked (not answering, or
//! their pods not ready): a PVC naming its dot by annotation waits (`UNAVAILABLE`) rather than get a second, empty
//! dot of that name; one whose dot is its own name goes ahead ([`check_unasked`]).
//!
//! `pvcPerNode` storage: a server pod serves a pool PVC, which a node that goes away releases and another adopts.
//! A volume placed on such a server's node is homed on its pool, `pool=PVC:ns/dot/subdot`, and every later call goes
//! to whichever server serves that PVC then ([`Daemons::get`]); it has no topology (its node plugin connects to
//! that server over the network from any node), so a pod using it is not pinned to a node that may be gone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::daemon::{Commit, DaemonClient, Dot};
use crate::daemons::{describe_home, Daemons};
use crate::ids::{pool_of, GroupSnapshotId, SnapshotId, VolumeId};
use crate::pb;
use crate::pb::volume_capability::access_mode::Mode;
use crate::pvc::{self, PvcAnnotations};
use crate::{Error, Result};

/// Commit metadata: what the commit is to the driver (`snapshot`, `group-snapshot` or `clone-source`).
pub const META_KIND: &str = "csi.blockmesh.io.kind";
/// Commit metadata: the CSI name of the snapshot or group snapshot.
pub const META_NAME: &str = "csi.blockmesh.io.name";
/// Commit metadata: the subdot a snapshot was taken of; for a group, the member subdots joined by `,`.
pub const META_SUBDOT: &str = "csi.blockmesh.io.subdot";
/// [`META_KIND`] of a snapshot.
pub const KIND_SNAPSHOT: &str = "snapshot";
/// [`META_KIND`] of a group snapshot.
pub const KIND_GROUP: &str = "group-snapshot";
/// [`META_KIND`] of a commit made to clone a volume.
pub const KIND_CLONE_SOURCE: &str = "clone-source";
/// Branch name prefix marking a deleted snapshot's commit that could not go yet.
pub const TOMBSTONE_PREFIX: &str = "csi-deleted.";
/// Granularity of volume sizes (the engine's block).
pub const VOLUME_ALIGN_BYTES: u64 = 4096;
/// Size of a volume whose request names none.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Smallest volume the driver creates (a file system needs some room).
pub const MIN_VOLUME_BYTES: u64 = 1 << 20;
/// Largest volume (the engine's limit).
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;
/// Most entries of one `ListVolumes` / `ListSnapshots` page when the caller names no maximum.
pub const DEFAULT_PAGE_ENTRIES: usize = 1000;
/// Topology key: the node whose daemon holds the pool.
pub const TOPOLOGY_NODE_KEY: &str = "topology.blockmesh.io/node";
/// Name of the driver (CSIDriver object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.blockmesh.io";

/// The access modes a volume can be used with: one node at a time (an NBD device is attached on one node).
pub fn supported_mode(mode: i32) -> bool {
    matches!(
        Mode::try_from(mode),
        Ok(Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter)
    )
}

/// Checks volume capabilities: present, each with an access type and a supported access mode.
pub fn check_capabilities(caps: &[pb::VolumeCapability]) -> Result<()> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument("volume_capabilities are required".into()));
    }
    for c in caps {
        if c.access_type.is_none() {
            return Err(Error::InvalidArgument("a volume capability needs an access type (block or mount)".into()));
        }
        let mode = c.access_mode.as_ref().map(|m| m.mode).unwrap_or_default();
        if !supported_mode(mode) {
            let name = Mode::try_from(mode).map(|m| m.as_str_name()).unwrap_or("unknown");
            return Err(Error::InvalidArgument(format!(
                "access mode {name} is not supported: a blockmesh volume is attached on one node at a time"
            )));
        }
    }
    Ok(())
}

/// The size a capacity range asks for: `required` rounded up to [`VOLUME_ALIGN_BYTES`] (the default without one),
/// within `limit`.
pub fn requested_size(range: Option<&pb::CapacityRange>) -> Result<u64> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument("capacity_range bytes must not be negative".into()));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(Error::InvalidArgument(format!("required_bytes {required} exceeds limit_bytes {limit}")));
    }
    let size =
        if required == 0 { DEFAULT_VOLUME_BYTES.min(if limit == 0 { u64::MAX } else { limit }) } else { required };
    let size = size.max(MIN_VOLUME_BYTES).div_ceil(VOLUME_ALIGN_BYTES) * VOLUME_ALIGN_BYTES;
    if size > MAX_VOLUME_BYTES || (limit != 0 && size > limit) {
        return Err(Error::OutOfRange(format!(
            "no volume size fits: volumes are {MIN_VOLUME_BYTES} to {MAX_VOLUME_BYTES} bytes in steps of \
             {VOLUME_ALIGN_BYTES} (asked: required {required}, limit {limit})"
        )));
    }
    Ok(size)
}

/// Whether an existing size fits a capacity range.
fn fits(size: u64, range: Option<&pb::CapacityRange>) -> bool {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes.max(0) as u64, r.limit_bytes.max(0) as u64));
    size >= required && (limit == 0 || size <= limit)
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn timestamp(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: as_i64(secs), nanos: 0 }
}

/// One dot with every commit: what the controller decides on.
#[derive(Debug, Clone)]
pub struct DotView {
    pub dot: Dot,
    pub commits: Vec<Commit>,
}

impl DotView {
    /// Reads a dot; `None` when it does not exist.
    pub fn load(d: &DaemonClient, dot: &str) -> Result<Option<Self>> {
        let Some(info) = d.dot(dot)? else { return Ok(None) };
        let commits = d.commits(dot)?;
        Ok(Some(Self { dot: info, commits }))
    }

    /// Commits marked deleted.
    pub fn tombstoned(&self) -> HashSet<&str> {
        self.dot.branches.iter().filter_map(|b| b.name.strip_prefix(TOMBSTONE_PREFIX)).collect()
    }

    /// Snapshot and group snapshot commits not deleted.
    pub fn live_snapshots(&self) -> Vec<&Commit> {
        let dead = self.tombstoned();
        self.commits
            .iter()
            .filter(|c| {
                let kind = c.metadata.get(META_KIND).map(String::as_str);
                matches!(kind, Some(KIND_SNAPSHOT | KIND_GROUP)) && !dead.contains(c.id.as_str())
            })
            .collect()
    }

    /// A subdot's size, when the dot has it.
    pub fn live_subdot(&self, subdot: &str) -> Option<u64> {
        self.dot.subdots.iter().find(|s| s.name == subdot).map(|s| s.size_bytes)
    }

    /// The CSI snapshots of this dot's live commits, oldest first; their ids name `node` (the dot's daemon's).
    pub fn snapshots(&self, node: Option<&str>) -> Vec<pb::Snapshot> {
        let node = node.map(str::to_string);
        let (ns, name) = self.dot.name.split_once('/').unwrap_or(("", &self.dot.name));
        let mut out = Vec::new();
        for c in self.live_snapshots() {
            let group = c.metadata.get(META_KIND).map(String::as_str) == Some(KIND_GROUP);
            let members: Vec<&str> = c.metadata.get(META_SUBDOT).map(|s| s.split(',').collect()).unwrap_or_default();
            for sd in members {
                let Ok(volume) = VolumeId::new(ns, name, sd).map(|v| v.on(node.clone())) else { continue };
                let Ok(id) = SnapshotId::new(volume.clone(), &c.id) else { continue };
                // (names too long for a CSI id: a dot made outside CSI; not listed)
                if id.csi_id().is_err() {
                    continue;
                }
                let size = c.subdots.iter().find(|s| s.name == sd).map_or(0, |s| s.size_bytes);
                out.push(pb::Snapshot {
                    size_bytes: as_i64(size),
                    snapshot_id: id.to_string(),
                    source_volume_id: volume.to_string(),
                    creation_time: Some(timestamp(c.time_unix_secs)),
                    ready_to_use: true,
                    group_snapshot_id: if group {
                        GroupSnapshotId::new(ns, name, &c.id)
                            .map(|g| g.on(node.clone()).to_string())
                            .unwrap_or_default()
                    } else {
                        String::new()
                    },
                });
            }
        }
        out
    }

    fn commit(&self, id: &str) -> Option<&Commit> {
        self.commits.iter().find(|c| c.id == id)
    }
}

/// Gives back the commits marked deleted (and the commits made for clones) that nothing needs any more: not a
/// branch head (other than their own tombstone branch), not a parent. Repeats while one goes (a chain frees from its
/// newest end).
pub fn sweep(d: &DaemonClient, dot: &str) -> Result<()> {
    loop {
        let Some(v) = DotView::load(d, dot)? else { return Ok(()) };
        let dead = v.tombstoned();
        let candidate = v.commits.iter().find(|c| {
            let marked = dead.contains(c.id.as_str())
                || c.metadata.get(META_KIND).map(String::as_str) == Some(KIND_CLONE_SOURCE);
            let own_branch = format!("{TOMBSTONE_PREFIX}{}", c.id);
            marked
                && !v.dot.branches.iter().any(|b| b.head.as_deref() == Some(&c.id) && b.name != own_branch)
                && !v.commits.iter().any(|o| o.parents.contains(&c.id))
        });
        let Some(c) = candidate else { return Ok(()) };
        let own_branch = format!("{TOMBSTONE_PREFIX}{}", c.id);
        if dead.contains(c.id.as_str()) {
            d.delete_branch(dot, &own_branch)?;
        }
        d.delete_commit(dot, &c.id)?;
        tracing::info!(dot, commit = %c.id, "gave back a deleted snapshot's commit");
    }
}

/// Deletes a commit now when it can go, else marks it deleted (a tombstone branch); then sweeps.
fn delete_or_tombstone(d: &DaemonClient, v: &DotView, commit: &str) -> Result<()> {
    let dot = &v.dot.name;
    if !v.tombstoned().contains(commit) {
        d.create_branch(dot, &format!("{TOMBSTONE_PREFIX}{commit}"), commit)?;
    }
    sweep(d, dot)
}

/// Orders and pages a listing: entries from `starting_token` (an index this driver handed out), at most
/// `max_entries` (0: [`DEFAULT_PAGE_ENTRIES`]); the next token when more remain.
pub fn page<T>(mut all: Vec<T>, starting_token: &str, max_entries: i32) -> Result<(Vec<T>, String)> {
    let start: usize = if starting_token.is_empty() {
        0
    } else {
        starting_token.parse().map_err(|_| Error::Aborted(format!("starting_token {starting_token:?} is not ours")))?
    };
    if start > all.len() {
        return Err(Error::Aborted(format!("starting_token {starting_token:?} is past the end of the listing")));
    }
    if max_entries < 0 {
        return Err(Error::InvalidArgument("max_entries must not be negative".into()));
    }
    let n = if max_entries == 0 { DEFAULT_PAGE_ENTRIES } else { max_entries as usize };
    let rest = all.split_off(start);
    let more = rest.len() > n;
    let entries: Vec<T> = rest.into_iter().take(n).collect();
    let next = if more { (start + n).to_string() } else { String::new() };
    Ok((entries, next))
}

/// The node values of topologies (their [`TOPOLOGY_NODE_KEY`] segment), in order, each once.
fn topology_nodes(topologies: &[pb::Topology]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in topologies.iter().filter_map(|t| t.segments.get(TOPOLOGY_NODE_KEY)) {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

/// Where `CreateVolume` makes `target` (module docs): the node (`None`: the default daemon, node unknown) and its
/// daemon.
/// Daemons asked at once whether they hold a dot (CreateVolume's placement): bounds the threads of one lookup.
pub const MAX_PARALLEL_DOT_LOOKUPS: usize = 32;

/// What asking the daemons about a dot found.
#[derive(Debug, Default)]
struct DotLookup {
    /// The node whose daemon holds it (`Some(None)`: the default daemon of no node).
    found: Option<Option<String>>,
    /// The daemons that could not be asked: which (`node NAME`, or `the default server` of no node) and why.
    unanswered: Vec<(String, String)>,
}

/// Asks the daemons whether they hold dot `dot` (the first in the registry's order wins), up to
/// [`MAX_PARALLEL_DOT_LOOKUPS`] at once: one that does not answer costs its timeout once, not once per daemon before
/// it. A daemon that cannot answer is logged and listed in [`DotLookup::unanswered`].
fn node_with_dot(ds: &Daemons, dot: &str) -> DotLookup {
    let all = ds.all();
    let mut out = DotLookup::default();
    for chunk in all.chunks(MAX_PARALLEL_DOT_LOOKUPS) {
        let answers: Vec<_> = std::thread::scope(|s| {
            let asks: Vec<_> = chunk.iter().map(|(_, d)| s.spawn(move || d.dot(dot))).collect();
            asks.into_iter().map(|a| a.join()).collect()
        });
        for ((node, _), answer) in chunk.iter().zip(answers) {
            let why = match answer {
                Ok(Ok(Some(_))) => {
                    out.found = Some(node.clone());
                    return out;
                }
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the lookup panicked".to_string(),
            };
            tracing::warn!(?node, error = %why, dot, "cannot tell whether the dot is on this daemon");
            let which = describe_home(node.as_deref());
            out.unanswered.push((which, why));
        }
    }
    out
}

/// CreateVolume's answer when dot `dot` was not found and some servers could not be asked (`unanswered`; `unasked`:
/// [`Daemons::unasked`] described):
/// a PVC that names its dot ([`pvc::names_dot`]) means one that most likely exists, so it waits (UNAVAILABLE:
/// the provisioner retries) rather than get a second, empty dot of that name; a PVC whose dot is its own name goes
/// ahead (else one node down would stop every new volume), with a warning.
fn check_unasked(dot: &str, named: bool, unanswered: &[(String, String)], unasked: &[String]) -> Result<()> {
    if unanswered.is_empty() && unasked.is_empty() {
        return Ok(());
    }
    let mut nodes: Vec<String> = unanswered.iter().map(|(n, why)| format!("{n} ({why})")).collect();
    nodes.extend(unasked.iter().cloned());
    if named {
        return Err(Error::Unavailable(format!(
            "dot {dot} is not on the servers that answered, and these could not be asked: {}; a PVC naming a dot \
             waits until every server can tell, rather than make a second, empty dot {dot}",
            nodes.join(", ")
        )));
    }
    tracing::warn!(dot, nodes = %nodes.join(", "), "dot made without asking every server (the PVC names no dot)");
    Ok(())
}

fn place(
    ds: &Daemons,
    target: &VolumeId,
    named: bool,
    source: Option<&pb::volume_content_source::Type>,
    topology: Option<&pb::TopologyRequirement>,
) -> Result<(Option<String>, Arc<DaemonClient>)> {
    use pb::volume_content_source::Type;
    let preferred = topology.map(|t| topology_nodes(&t.preferred)).unwrap_or_default();
    let requisite = topology.map(|t| topology_nodes(&t.requisite)).unwrap_or_default();
    // A node the volume must go to, checked against the requisite topology (a default daemon of no known node has
    // no topology to check).
    let must = |node: Option<String>, why: &str| -> Result<(Option<String>, Arc<DaemonClient>)> {
        // a volume on a pool (`pool=PVC`) is reached from every node: no topology to check
        if let Some(n) = node.as_ref().filter(|n| pool_of(n).is_none()) {
            if !requisite.is_empty() && !requisite.contains(n) {
                return Err(Error::ResourceExhausted(format!(
                    "volume {target} can only be made on node {n} ({why}), which the requisite topology excludes \
                     (nodes {})",
                    requisite.join(", ")
                )));
            }
        }
        let d = ds.get(node.as_deref())?;
        Ok((node.or_else(|| ds.default_node().map(str::to_string)), d))
    };
    let default_node = || ds.default_node().map(str::to_string);
    match source {
        Some(Type::Snapshot(s)) => {
            let snap = SnapshotId::parse(&s.snapshot_id)
                .map_err(|_| Error::NotFound(format!("snapshot {:?} does not exist", s.snapshot_id)))?;
            let node = snap.volume.node.or_else(default_node);
            return must(node, "its source snapshot is there: a clone is made in the same pool");
        }
        Some(Type::Volume(v)) => {
            let src = VolumeId::parse(&v.volume_id)
                .map_err(|_| Error::NotFound(format!("volume {:?} does not exist", v.volume_id)))?;
            let node = src.node.or_else(default_node);
            return must(node, "its source volume is there: a clone is made in the same pool");
        }
        None => {}
    }
    let dot = target.dot_name();
    let lookup = node_with_dot(ds, &dot);
    if let Some(node) = lookup.found {
        return must(node.or_else(default_node), &format!("dot {dot} is there"));
    }
    check_unasked(&dot, named, &lookup.unanswered, &ds.unasked().describe())?;
    for n in preferred.iter().chain(&requisite) {
        if let Ok(d) = ds.get(Some(n)) {
            return Ok((Some(ds.home_on(n)), d));
        }
    }
    let asked: Vec<&String> = preferred.iter().chain(&requisite).collect();
    match ds.default_node() {
        // the default daemon stands for a node: the topology applies
        Some(n) => must(Some(n.to_string()), "the default daemon's, as no node asked for has a server"),
        // one daemon of no known node (single-node setups): topology is not known, it holds every volume
        None if ds.all().iter().all(|(n, _)| n.is_none()) || asked.is_empty() => Ok((None, ds.get(None)?)),
        // several daemons and none on the nodes asked for: not now (the server pod may come up)
        None => Err(Error::Unavailable(format!(
            "no blockmesh server on the node(s) the topology asks for ({}) now",
            asked.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The CSI Controller and GroupController services over the node daemons.
#[derive(Debug)]
pub struct ControllerService {
    daemons: Arc<Daemons>,
    pvcs: Arc<dyn PvcAnnotations>,
    /// Changes run one at a time: decisions read the dot, then change it.
    changes: tokio::sync::Mutex<()>,
}

impl ControllerService {
    /// A controller over `daemons`, reading PVC annotations from `pvcs`.
    pub fn new(daemons: Arc<Daemons>, pvcs: Arc<dyn PvcAnnotations>) -> Self {
        Self { daemons, pvcs, changes: tokio::sync::Mutex::new(()) }
    }

    /// Runs blocking work with the registry off the event loop.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&Daemons) -> Result<T> + Send + 'static) -> Result<T> {
        let ds = self.daemons.clone();
        tokio::task::spawn_blocking(move || f(&ds))
            .await
            .map_err(|e| Error::Internal(format!("daemon request task failed: {e}")))?
    }

    /// Runs blocking work on node `node`'s daemon (`None`: the default daemon's). A daemon that cannot be reached
    /// makes the next call list the server pods again ([`Daemons::suspect`]).
    async fn on<T: Send + 'static>(
        &self,
        node: Option<String>,
        f: impl FnOnce(&DaemonClient) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.run(move |ds| {
            let d = ds.get(node.as_deref())?;
            let out = f(&d);
            if let Err(Error::Unreachable { url, .. }) = &out {
                // its server may have moved (a pool adopted elsewhere, a restarted pod with a new IP): the retry of
                // this call finds out at once rather than after the discovery cache's age
                ds.suspect(url);
            }
            out
        })
        .await
    }

    /// The topology of a volume on `node`'s daemon (`None`: the default daemon's node, when known). A volume on a
    /// pool (`pool=PVC`, `pvcPerNode` storage) has none: the pool moves from node to node, and the node plugins
    /// reach its server over the network wherever it is, so the volume is accessible from every node.
    fn topology(&self, node: Option<&str>) -> Vec<pb::Topology> {
        if node.and_then(pool_of).is_some() {
            return Vec::new();
        }
        node.or(self.daemons.default_node())
            .map(|n| pb::Topology { segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), n.to_string())]) })
            .into_iter()
            .collect()
    }

    fn volume(&self, id: &VolumeId, size: u64, source: Option<pb::VolumeContentSource>) -> pb::Volume {
        pb::Volume {
            capacity_bytes: as_i64(size),
            volume_id: id.to_string(),
            volume_context: HashMap::from([("blockmesh.io/export".to_string(), id.export_name())]),
            content_source: source,
            accessible_topology: self.topology(id.node.as_deref()),
        }
    }

    /// `CreateVolume`, after the request's checks: `(volume id, size)`.
    fn create(
        d: &DaemonClient,
        target: &VolumeId,
        size: u64,
        range: Option<&pb::CapacityRange>,
        source: Option<&pb::volume_content_source::Type>,
    ) -> Result<(VolumeId, u64)> {
        use pb::volume_content_source::Type;
        // The id handed back must fit CSI's size limit: checked before anything is made (from a source, the new
        // volume takes the source's subdot).
        let subdot = match source {
            None => Some(target.subdot.clone()),
            Some(Type::Snapshot(s)) => SnapshotId::parse(&s.snapshot_id).ok().map(|s| s.volume.subdot),
            Some(Type::Volume(s)) => VolumeId::parse(&s.volume_id).ok().map(|v| v.subdot),
        };
        if let Some(subdot) = subdot {
            VolumeId::new(&target.namespace, &target.dot, &subdot)?.on(target.node.clone()).csi_id()?;
        }
        let dot = target.dot_name();
        let existing = DotView::load(d, &dot)?;
        let (src_dot, commit, subdot, src_size) = match source {
            None => {
                let Some(v) = existing else {
                    d.init(&dot, &[&target.subdot], size)?;
                    return Ok((target.clone(), size));
                };
                if let Some(have) = v.live_subdot(&target.subdot) {
                    if fits(have, range) {
                        return Ok((target.clone(), have));
                    }
                    return Err(Error::AlreadyExists(format!(
                        "volume {target} exists with {have} bytes, outside the capacity range asked for"
                    )));
                }
                d.add_subdot(&dot, &target.subdot, size)?;
                return Ok((target.clone(), size));
            }
            Some(Type::Snapshot(s)) => {
                let snap = SnapshotId::parse(&s.snapshot_id)
                    .map_err(|_| Error::NotFound(format!("snapshot {:?} does not exist", s.snapshot_id)))?;
                let src_dot = snap.volume.dot_name();
                let v = DotView::load(d, &src_dot)?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {snap} does not exist: no dot {src_dot}")))?;
                let live = v.live_snapshots().iter().any(|c| c.id == snap.commit);
                let c = v.commit(&snap.commit).filter(|_| live);
                let c = c.ok_or_else(|| Error::NotFound(format!("snapshot {snap} does not exist")))?;
                let sz = c.subdots.iter().find(|x| x.name == snap.volume.subdot).map(|x| x.size_bytes);
                let sz =
                    sz.ok_or_else(|| Error::NotFound(format!("snapshot {snap} has no subdot {}", snap.volume.subdot)))?;
                (src_dot, c.id.clone(), snap.volume.subdot.clone(), sz)
            }
            Some(Type::Volume(s)) => {
                let src = VolumeId::parse(&s.volume_id)
                    .map_err(|_| Error::NotFound(format!("volume {:?} does not exist", s.volume_id)))?;
                let src_dot = src.dot_name();
                let v = DotView::load(d, &src_dot)?;
                let sz = v.as_ref().and_then(|v| v.live_subdot(&src.subdot));
                let sz = sz.ok_or_else(|| Error::NotFound(format!("source volume {src} does not exist")))?;
                if existing.is_some() {
                    // an earlier call made it (idempotent): no new commit
                    (src_dot, String::new(), src.subdot.clone(), sz)
                } else {
                    let meta = BTreeMap::from([(META_KIND.to_string(), KIND_CLONE_SOURCE.to_string())]);
                    let c = d.commit(&src_dot, &format!("blockmesh-csi: clone of {src} to {dot}"), &meta)?;
                    (src_dot, c.id, src.subdot.clone(), sz)
                }
            }
        };
        let id = VolumeId::new(&target.namespace, &target.dot, &subdot)?.on(target.node.clone());
        if let Some(v) = existing {
            return match v.live_subdot(&subdot) {
                Some(have) if fits(have, range) => Ok((id, have)),
                _ => Err(Error::AlreadyExists(format!(
                    "dot {dot} exists and does not match this volume (from {src_dot}, subdot {subdot}, capacity range)"
                ))),
            };
        }
        let want = size.max(src_size);
        if !fits(want, range) {
            return Err(Error::OutOfRange(format!(
                "the source holds {src_size} bytes: a volume from it cannot be smaller, and the capacity range asks \
                 for at most {}",
                range.map_or(0, |r| r.limit_bytes)
            )));
        }
        d.clone_dot(&src_dot, &commit, &dot)?;
        if want > src_size {
            d.resize(&dot, &subdot, want, false)?;
        }
        sweep(d, &src_dot)?;
        Ok((id, want))
    }

    fn delete(d: &DaemonClient, id: &VolumeId) -> Result<()> {
        let dot = id.dot_name();
        let Some(v) = DotView::load(d, &dot)? else { return Ok(()) };
        if v.live_subdot(&id.subdot).is_none() {
            return Ok(());
        }
        if v.dot.subdots.iter().any(|s| s.name != id.subdot) {
            d.remove_subdot(&dot, &id.subdot)?;
            return Ok(());
        }
        let live = v.live_snapshots();
        if let Some(c) = live.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} has {} snapshot(s) (commit {} and maybe more); delete them first: a dot's commits go \
                 with the dot",
                live.len(),
                c.id
            )));
        }
        match d.delete_dot(&dot) {
            Err(Error::Daemon { status: 404, .. }) => Ok(()),
            other => other,
        }
    }

    /// Finds a live snapshot or group snapshot commit named `name` (of kind `kind`): the source dot first, then all.
    fn find_named(d: &DaemonClient, first: &str, kind: &str, name: &str) -> Result<Option<(DotView, Commit)>> {
        let mut dots = vec![first.to_string()];
        dots.extend(d.dots()?.into_iter().map(|x| x.name).filter(|n| n != first));
        for dot in dots {
            let Some(v) = DotView::load(d, &dot)? else { continue };
            let hit = v.live_snapshots().into_iter().find(|c| {
                c.metadata.get(META_KIND).map(String::as_str) == Some(kind)
                    && c.metadata.get(META_NAME).map(String::as_str) == Some(name)
            });
            if let Some(c) = hit.cloned() {
                return Ok(Some((v, c)));
            }
        }
        Ok(None)
    }

    /// The live snapshot `id` (on the daemon `d` of its node), if there is one.
    fn snapshot_by_id(d: &DaemonClient, id: &SnapshotId) -> Result<Option<pb::Snapshot>> {
        let Some(v) = DotView::load(d, &id.volume.dot_name())? else { return Ok(None) };
        let want = id.to_string();
        Ok(v.snapshots(id.volume.node.as_deref()).into_iter().find(|s| s.snapshot_id == want))
    }

    /// Every snapshot of daemon `d` (of node `node`), by dot, oldest first.
    fn all_snapshots(d: &DaemonClient, node: Option<&str>) -> Result<Vec<pb::Snapshot>> {
        let mut out = Vec::new();
        let mut names: Vec<String> = d.dots()?.into_iter().map(|x| x.name).collect();
        names.sort();
        for dot in names {
            if let Some(v) = DotView::load(d, &dot)? {
                out.extend(v.snapshots(node));
            }
        }
        Ok(out)
    }

    fn group_snapshot(v: &DotView, c: &Commit, node: Option<&str>) -> Result<pb::VolumeGroupSnapshot> {
        let (ns, name) = v.dot.name.split_once('/').unwrap_or(("", &v.dot.name));
        let gid = GroupSnapshotId::new(ns, name, &c.id)?.on(node.map(str::to_string));
        let snapshots = v.snapshots(node).into_iter().filter(|s| s.group_snapshot_id == gid.to_string()).collect();
        Ok(pb::VolumeGroupSnapshot {
            group_snapshot_id: gid.to_string(),
            snapshots,
            creation_time: Some(timestamp(c.time_unix_secs)),
            ready_to_use: true,
        })
    }
}

fn rpc_cap(t: pb::controller_service_capability::rpc::Type) -> pb::ControllerServiceCapability {
    pb::ControllerServiceCapability {
        r#type: Some(pb::controller_service_capability::Type::Rpc(pb::controller_service_capability::Rpc {
            r#type: t as i32,
        })),
    }
}

/// A volume's condition as its server's pool makes it: abnormal once the pool has failed (it then serves reads only,
/// until its server restarts and reopens it).
fn pool_condition(pool: &crate::daemon::PoolStatus) -> pb::VolumeCondition {
    match &pool.failed {
        Some(why) => pb::VolumeCondition {
            abnormal: true,
            message: format!("the blockmesh pool holding it takes no writes ({why}); restarting its server reopens it"),
        },
        None => pb::VolumeCondition { abnormal: false, message: "its blockmesh pool is serving".into() },
    }
}

fn required(what: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        Err(Error::InvalidArgument(format!("{what} is required")))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        required("name", &r.name)?;
        check_capabilities(&r.volume_capabilities)?;
        let size = requested_size(r.capacity_range.as_ref())?;
        let source = r.volume_content_source.clone().and_then(|s| s.r#type);
        if r.volume_content_source.is_some() && source.is_none() {
            return Err(Error::InvalidArgument("volume_content_source names no snapshot or volume".into()).into());
        }
        let pvcs = self.pvcs.clone();
        let (name, params, range) = (r.name.clone(), r.parameters.clone(), r.capacity_range);
        let mutable = r.mutable_parameters.clone();
        let topology = r.accessibility_requirements.clone();
        let _guard = self.changes.lock().await;
        let (id, size) = self
            .run(move |ds| {
                let annotations = pvc::pvc_annotations(&pvcs, &params)?;
                let target = pvc::placement(&name, &params, &annotations)?;
                let mut qos = pvc::qos_limits(&params, &annotations)?;
                // a VolumeAttributesClass named at creation: its parameters on top
                if !mutable.is_empty() {
                    qos = Some(pvc::modify_qos(&qos.unwrap_or_default(), &mutable)?);
                }
                let named = pvc::names_dot(&annotations);
                let (node, d) = place(ds, &target, named, source.as_ref(), topology.as_ref())?;
                let target = target.on(node);
                let (id, size) = Self::create(&d, &target, size, range.as_ref(), source.as_ref())?;
                // Limits asked for apply to the volume made (or found again: a retried call sets the same ones).
                if let Some(limits) = qos {
                    d.set_qos(&id.dot_name(), &id.subdot, &limits)?;
                }
                Ok((id, size))
            })
            .await?;
        tracing::info!(volume = %id, size, name = %r.name, "volume created");
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(self.volume(&id, size, r.volume_content_source)) }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        // An id this driver never made names no volume: deleting it is done.
        let Ok(id) = VolumeId::parse(&r.volume_id) else { return Ok(Response::new(pb::DeleteVolumeResponse {})) };
        let _guard = self.changes.lock().await;
        self.on(id.node.clone(), move |d| Self::delete(d, &id)).await?;
        tracing::info!(volume = %r.volume_id, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        Err(Error::Unimplemented("no controller publish: the node plugin attaches volumes over NBD".into()).into())
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        Err(Error::Unimplemented("no controller publish: the node plugin attaches volumes over NBD".into()).into())
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument("volume_capabilities are required".into()).into());
        }
        let id = VolumeId::parse(&r.volume_id)
            .map_err(|_| Error::NotFound(format!("volume {:?} does not exist", r.volume_id)))?;
        let v = self.on(id.node.clone(), move |d| DotView::load(d, &id.dot_name()).map(|v| (v, id))).await?;
        if !matches!(&v, (Some(view), id) if view.live_subdot(&id.subdot).is_some()) {
            return Err(Error::NotFound(format!("volume {} does not exist", r.volume_id)).into());
        }
        let answer = match check_capabilities(&r.volume_capabilities) {
            Ok(()) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(e) => pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message: e.to_string() },
        };
        Ok(Response::new(answer))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let daemons = self
            .run(|ds| ds.all().into_iter().map(|(node, d)| Ok((node, d.dots()?))).collect::<Result<Vec<_>>>())
            .await?;
        let mut all: Vec<(VolumeId, u64)> = Vec::new();
        for (node, dots) in daemons {
            for dot in dots {
                let Some((ns, name)) = dot.name.split_once('/') else { continue };
                for s in &dot.subdots {
                    // (a dot made outside CSI may have names too long for a CSI id: not listed)
                    if let Ok(id) = VolumeId::new(ns, name, &s.name).map(|id| id.on(node.clone())) {
                        if id.csi_id().is_ok() {
                            all.push((id, s.size_bytes));
                        }
                    }
                }
            }
        }
        // by node, then id (VolumeId orders by its node first)
        all.sort();
        let (entries, next_token) = page(all, &r.starting_token, r.max_entries)?;
        let entries = entries
            .into_iter()
            .map(|(id, size)| pb::list_volumes_response::Entry {
                volume: Some(self.volume(&id, size, None)),
                status: None,
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token }))
    }

    /// The free bytes of the node `accessible_topology` names (0 when it has no daemon), or of every daemon.
    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        let node = r.accessible_topology.as_ref().and_then(|t| t.segments.get(TOPOLOGY_NODE_KEY)).cloned();
        let free = self
            .run(move |ds| match node {
                Some(n) => match ds.get(Some(&n)) {
                    Ok(d) => Ok(d.pool()?.free_bytes),
                    Err(Error::Unavailable(_)) => Ok(0),
                    Err(e) => Err(e),
                },
                None => ds.all().into_iter().try_fold(0u64, |sum, (_, d)| Ok(sum.saturating_add(d.pool()?.free_bytes))),
            })
            .await?;
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: as_i64(free),
            maximum_volume_size: Some(as_i64(MAX_VOLUME_BYTES)),
            minimum_volume_size: Some(as_i64(MIN_VOLUME_BYTES)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::rpc::Type as T;
        let capabilities = [
            T::CreateDeleteVolume,
            T::CreateDeleteSnapshot,
            T::ListSnapshots,
            T::CloneVolume,
            T::ExpandVolume,
            T::ListVolumes,
            T::GetCapacity,
            T::ModifyVolume,
            T::GetVolume,
            T::GetSnapshot,
            T::VolumeCondition,
        ]
        .into_iter()
        .map(rpc_cap)
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("name", &r.name)?;
        required("source_volume_id", &r.source_volume_id)?;
        let src = VolumeId::parse(&r.source_volume_id)
            .map_err(|_| Error::NotFound(format!("source volume {:?} does not exist", r.source_volume_id)))?;
        src.check_snapshot_ids_fit()?;
        let name = r.name.clone();
        let _guard = self.changes.lock().await;
        let snapshot = self
            .on(src.node.clone(), move |d| {
                let dot = src.dot_name();
                if let Some((v, c)) = Self::find_named(d, &dot, KIND_SNAPSHOT, &name)? {
                    let same = v.dot.name == dot && c.metadata.get(META_SUBDOT) == Some(&src.subdot);
                    if !same {
                        return Err(Error::AlreadyExists(format!(
                            "snapshot {name} exists already, of another volume (commit {} of {})",
                            c.id, v.dot.name
                        )));
                    }
                    let node = src.node.clone();
                    let id = SnapshotId::new(src, &c.id)?.to_string();
                    return v
                        .snapshots(node.as_deref())
                        .into_iter()
                        .find(|s| s.snapshot_id == id)
                        .ok_or_else(|| Error::Internal(format!("snapshot {id} vanished while read")));
                }
                let v = DotView::load(d, &dot)?;
                if v.as_ref().and_then(|v| v.live_subdot(&src.subdot)).is_none() {
                    return Err(Error::NotFound(format!("source volume {src} does not exist")));
                }
                let meta = BTreeMap::from([
                    (META_KIND.to_string(), KIND_SNAPSHOT.to_string()),
                    (META_NAME.to_string(), name.clone()),
                    (META_SUBDOT.to_string(), src.subdot.clone()),
                ]);
                let c = d.commit(&dot, &format!("blockmesh-csi: snapshot {name} of {src}"), &meta)?;
                let size = c.subdots.iter().find(|s| s.name == src.subdot).map_or(0, |s| s.size_bytes);
                Ok(pb::Snapshot {
                    size_bytes: as_i64(size),
                    snapshot_id: SnapshotId::new(src.clone(), &c.id)?.to_string(),
                    source_volume_id: src.to_string(),
                    creation_time: Some(timestamp(c.time_unix_secs)),
                    ready_to_use: true,
                    group_snapshot_id: String::new(),
                })
            })
            .await?;
        tracing::info!(snapshot = %snapshot.snapshot_id, name = %r.name, "snapshot created");
        Ok(Response::new(pb::CreateSnapshotResponse { snapshot: Some(snapshot) }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        let Ok(id) = SnapshotId::parse(&r.snapshot_id) else { return Ok(Response::new(pb::DeleteSnapshotResponse {})) };
        let _guard = self.changes.lock().await;
        self.on(id.volume.node.clone(), move |d| {
            let Some(v) = DotView::load(d, &id.volume.dot_name())? else { return Ok(()) };
            let Some(c) = v.live_snapshots().into_iter().find(|c| c.id == id.commit).cloned() else {
                return Ok(());
            };
            if c.metadata.get(META_KIND).map(String::as_str) == Some(KIND_GROUP) {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {id} is part of a group snapshot: delete the group snapshot"
                )));
            }
            delete_or_tombstone(d, &v, &c.id)
        })
        .await?;
        tracing::info!(snapshot = %r.snapshot_id, "snapshot deleted");
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let (snapshot_id, source) = (r.snapshot_id.clone(), r.source_volume_id.clone());
        let all = self
            .run(move |ds| {
                if !snapshot_id.is_empty() {
                    let Ok(id) = SnapshotId::parse(&snapshot_id) else { return Ok(Vec::new()) };
                    let d = ds.get(id.volume.node.as_deref())?;
                    return Ok(Self::snapshot_by_id(&d, &id)?.into_iter().collect());
                }
                if !source.is_empty() {
                    let Ok(id) = VolumeId::parse(&source) else { return Ok(Vec::new()) };
                    let d = ds.get(id.node.as_deref())?;
                    let Some(v) = DotView::load(&d, &id.dot_name())? else { return Ok(Vec::new()) };
                    let all = v.snapshots(id.node.as_deref());
                    return Ok(all.into_iter().filter(|s| s.source_volume_id == source).collect());
                }
                // every daemon, by node
                let mut out = Vec::new();
                for (node, d) in ds.all() {
                    out.extend(Self::all_snapshots(&d, node.as_deref())?);
                }
                Ok(out)
            })
            .await?;
        let (snapshots, next_token) = page(all, &r.starting_token, r.max_entries)?;
        let entries = snapshots.into_iter().map(|s| pb::list_snapshots_response::Entry { snapshot: Some(s) }).collect();
        Ok(Response::new(pb::ListSnapshotsResponse { entries, next_token }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        let Some(range) = r.capacity_range else {
            return Err(Error::InvalidArgument("capacity_range is required".into()).into());
        };
        let size = requested_size(Some(&range))?;
        let id = VolumeId::parse(&r.volume_id)
            .map_err(|_| Error::NotFound(format!("volume {:?} does not exist", r.volume_id)))?;
        let block = matches!(
            r.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()),
            Some(pb::volume_capability::AccessType::Block(_))
        );
        let _guard = self.changes.lock().await;
        let capacity = self
            .on(id.node.clone(), move |d| {
                let v = DotView::load(d, &id.dot_name())?;
                let have = v.as_ref().and_then(|v| v.live_subdot(&id.subdot));
                let have = have.ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
                if have >= size {
                    return Ok(have);
                }
                d.resize(&id.dot_name(), &id.subdot, size, false)?;
                Ok(size)
            })
            .await?;
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: as_i64(capacity),
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        let missing = || Error::NotFound(format!("volume {:?} does not exist", r.volume_id));
        let id = VolumeId::parse(&r.volume_id).map_err(|_| missing())?;
        let dot = id.dot_name();
        let subdot = id.subdot.clone();
        let (size, pool) = self
            .on(id.node.clone(), move |d| Ok((DotView::load(d, &dot)?.and_then(|v| v.live_subdot(&subdot)), d.pool()?)))
            .await?;
        let size = size.ok_or_else(missing)?;
        // No controller publishing (NBD exports are attached by the node plugin); the condition is the pool's.
        let status = pb::controller_get_volume_response::VolumeStatus {
            published_node_ids: Vec::new(),
            volume_condition: Some(pool_condition(&pool)),
        };
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(self.volume(&id, size, None)),
            status: Some(status),
        }))
    }

    /// Changes a volume's QoS limits live (a VolumeAttributesClass's parameters: the StorageClass's QoS parameter
    /// names); the daemon applies them to open NBD connections at once.
    async fn controller_modify_volume(
        &self,
        request: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        let r = request.into_inner();
        required("volume_id", &r.volume_id)?;
        if r.mutable_parameters.is_empty() {
            return Err(Error::InvalidArgument("mutable_parameters are required".into()).into());
        }
        let id = VolumeId::parse(&r.volume_id)
            .map_err(|_| Error::NotFound(format!("volume {:?} does not exist", r.volume_id)))?;
        let _guard = self.changes.lock().await;
        self.on(id.node.clone(), move |d| {
            let dot = id.dot_name();
            let current =
                d.qos(&dot, &id.subdot)?.ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
            let limits = pvc::modify_qos(&current, &r.mutable_parameters)?;
            d.set_qos(&dot, &id.subdot, &limits)
        })
        .await?;
        Ok(Response::new(pb::ControllerModifyVolumeResponse {}))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        let found = match SnapshotId::parse(&r.snapshot_id) {
            Ok(id) => self.on(id.volume.node.clone(), move |d| Self::snapshot_by_id(d, &id)).await?,
            Err(_) => None,
        };
        let snapshot = found.ok_or_else(|| Error::NotFound(format!("snapshot {:?} does not exist", r.snapshot_id)))?;
        Ok(Response::new(pb::GetSnapshotResponse { snapshot: Some(snapshot) }))
    }
}

#[tonic::async_trait]
impl pb::group_controller_server::GroupController for ControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        use pb::group_controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        Ok(Response::new(pb::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![pb::GroupControllerServiceCapability {
                r#type: Some(Cap::Rpc(Rpc { r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32 })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("name", &r.name)?;
        if r.source_volume_ids.is_empty() {
            return Err(Error::InvalidArgument("source_volume_ids are required".into()).into());
        }
        let mut sources = Vec::new();
        for s in &r.source_volume_ids {
            sources
                .push(VolumeId::parse(s).map_err(|_| Error::NotFound(format!("source volume {s:?} does not exist")))?);
        }
        let nodes: BTreeSet<Option<String>> = sources.iter().map(|s| s.node.clone()).collect();
        let Some(node) = nodes.iter().next().cloned().filter(|_| nodes.len() == 1) else {
            let names: Vec<String> = nodes.iter().map(|n| describe_home(n.as_deref())).collect();
            return Err(Error::FailedPrecondition(format!(
                "a group snapshot is one commit of one dot in one pool: these volumes are in {} pools ({})",
                nodes.len(),
                names.join(", ")
            ))
            .into());
        };
        let dots: BTreeSet<String> = sources.iter().map(VolumeId::dot_name).collect();
        let Some(dot) = dots.iter().next().cloned().filter(|_| dots.len() == 1) else {
            return Err(Error::FailedPrecondition(format!(
                "a group snapshot is one commit of one dot: these volumes belong to {} dots ({})",
                dots.len(),
                dots.into_iter().collect::<Vec<_>>().join(", ")
            ))
            .into());
        };
        let subdots: BTreeSet<String> = sources.iter().map(|s| s.subdot.clone()).collect();
        // the group's id and its members' snapshot ids must fit CSI's size limit
        for s in &sources {
            s.check_snapshot_ids_fit()?;
        }
        if let Some(s) = sources.first() {
            GroupSnapshotId::new(&s.namespace, &s.dot, &"0".repeat(crate::ids::COMMIT_ID_DIGITS))?
                .on(node.clone())
                .csi_id()?;
        }
        let members = subdots.iter().cloned().collect::<Vec<_>>().join(",");
        let name = r.name.clone();
        let _guard = self.changes.lock().await;
        let group = self
            .on(node.clone(), move |d| {
                if let Some((v, c)) = Self::find_named(d, &dot, KIND_GROUP, &name)? {
                    if v.dot.name != dot || c.metadata.get(META_SUBDOT) != Some(&members) {
                        return Err(Error::AlreadyExists(format!(
                            "group snapshot {name} exists already, of other volumes (commit {} of {})",
                            c.id, v.dot.name
                        )));
                    }
                    return Self::group_snapshot(&v, &c, node.as_deref());
                }
                let v = DotView::load(d, &dot)?;
                for sd in &subdots {
                    if v.as_ref().and_then(|v| v.live_subdot(sd)).is_none() {
                        return Err(Error::NotFound(format!("source volume {dot}/{sd} does not exist")));
                    }
                }
                let meta = BTreeMap::from([
                    (META_KIND.to_string(), KIND_GROUP.to_string()),
                    (META_NAME.to_string(), name.clone()),
                    (META_SUBDOT.to_string(), members.clone()),
                ]);
                let c = d.commit(&dot, &format!("blockmesh-csi: group snapshot {name} of {dot} ({members})"), &meta)?;
                let v = DotView::load(d, &dot)?.ok_or_else(|| Error::Internal(format!("{dot} vanished")))?;
                Self::group_snapshot(&v, &c, node.as_deref())
            })
            .await?;
        tracing::info!(group = %group.group_snapshot_id, name = %r.name, "group snapshot created");
        Ok(Response::new(pb::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(group) }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("group_snapshot_id", &r.group_snapshot_id)?;
        let Ok(id) = GroupSnapshotId::parse(&r.group_snapshot_id) else {
            return Ok(Response::new(pb::DeleteVolumeGroupSnapshotResponse {}));
        };
        let _guard = self.changes.lock().await;
        self.on(id.node.clone(), move |d| {
            let Some(v) = DotView::load(d, &id.dot_name())? else { return Ok(()) };
            if !v.live_snapshots().iter().any(|c| c.id == id.commit) {
                return Ok(());
            }
            delete_or_tombstone(d, &v, &id.commit)
        })
        .await?;
        Ok(Response::new(pb::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("group_snapshot_id", &r.group_snapshot_id)?;
        let id = GroupSnapshotId::parse(&r.group_snapshot_id)
            .map_err(|_| Error::NotFound(format!("group snapshot {:?} does not exist", r.group_snapshot_id)))?;
        let group = self
            .on(id.node.clone(), move |d| {
                let missing = || Error::NotFound(format!("group snapshot {id} does not exist"));
                let v = DotView::load(d, &id.dot_name())?.ok_or_else(missing)?;
                let c = v.live_snapshots().into_iter().find(|c| c.id == id.commit).cloned().ok_or_else(missing)?;
                Self::group_snapshot(&v, &c, id.node.as_deref())
            })
            .await?;
        Ok(Response::new(pb::GetVolumeGroupSnapshotResponse { group_snapshot: Some(group) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_dot_waits_for_servers_that_cannot_be_asked() {
        assert!(check_unasked("admin/db", true, &[], &[]).is_ok(), "every server answered");
        let down = crate::daemons::Unasked {
            nodes: BTreeSet::from(["node-c".to_string()]),
            pools: BTreeSet::from(["pool-node-d".to_string()]),
        }
        .describe();
        let unanswered = [("node node-b".to_string(), "connection refused".to_string())];
        for (u, d) in [(&unanswered[..], &[][..]), (&[][..], &down[..]), (&unanswered[..], &down[..])] {
            match check_unasked("admin/db", true, u, d) {
                Err(Error::Unavailable(m)) => {
                    assert!(m.contains("admin/db"), "{m}");
                    assert!(u.is_empty() || m.contains("node node-b (connection refused)"), "{m}");
                    assert!(d.is_empty() || m.contains("node node-c (its server pod is not ready)"), "{m}");
                    assert!(d.is_empty() || m.contains("pool PVC pool-node-d (no server serves it now)"), "{m}");
                }
                other => panic!("expected UNAVAILABLE, got {other:?}"),
            }
            assert!(check_unasked("admin/db", false, u, d).is_ok(), "a PVC of its own name goes ahead");
        }
    }

    #[test]
    fn a_failed_pool_makes_its_volumes_abnormal() {
        let pool = |failed: Option<&str>| crate::daemon::PoolStatus {
            pool_size_bytes: 1 << 30,
            free_bytes: 1 << 29,
            failed: failed.map(str::to_string),
        };
        assert!(!pool_condition(&pool(None)).abnormal);
        let c = pool_condition(&pool(Some("I/O error: write at 4096")));
        assert!(c.abnormal && c.message.contains("write at 4096") && c.message.contains("restarting"), "{c:?}");
    }

    #[test]
    fn sizes_round_up_and_ranges_are_checked() {
        let range = |r: i64, l: i64| pb::CapacityRange { required_bytes: r, limit_bytes: l };
        assert_eq!(requested_size(None).ok(), Some(DEFAULT_VOLUME_BYTES));
        assert_eq!(requested_size(Some(&range(10 << 20, 0))).ok(), Some(10 << 20));
        assert_eq!(requested_size(Some(&range((10 << 20) + 1, 0))).ok(), Some((10 << 20) + 4096));
        assert_eq!(requested_size(Some(&range(1, 0))).ok(), Some(MIN_VOLUME_BYTES));
        assert!(matches!(requested_size(Some(&range(5, 4))), Err(Error::InvalidArgument(_))));
        assert!(matches!(requested_size(Some(&range(0, 4096))), Err(Error::OutOfRange(_))));
        assert!(matches!(requested_size(Some(&range(i64::MAX, 0))), Err(Error::OutOfRange(_))));
    }

    #[test]
    fn pages_hand_out_tokens_and_refuse_foreign_ones() -> Result<()> {
        let all: Vec<u32> = (0..5).collect();
        let (p1, t1) = page(all.clone(), "", 2)?;
        assert_eq!((p1, t1.as_str()), (vec![0, 1], "2"));
        let (p2, t2) = page(all.clone(), "2", 2)?;
        assert_eq!((p2, t2.as_str()), (vec![2, 3], "4"));
        let (p3, t3) = page(all.clone(), "4", 2)?;
        assert_eq!((p3, t3.as_str()), (vec![4], ""));
        assert!(matches!(page(all.clone(), "x", 0), Err(Error::Aborted(_))));
        assert!(matches!(page(all, "9", 0), Err(Error::Aborted(_))));
        Ok(())
    }
}
