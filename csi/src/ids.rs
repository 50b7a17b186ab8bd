//! Volume, snapshot and group snapshot ids: what the driver hands to Kubernetes and reads back.
//!
//! | id | form | names |
//! |---|---|---|
//! | volume | `NODE:ns/dot/subdot` | the head of subdot `subdot` of dot `ns/dot` on node `NODE`'s daemon, on the dot's current branch |
//! | snapshot | `NODE:ns/dot/subdot@COMMIT` | subdot `subdot` as commit `COMMIT` (32 hex digits) of `ns/dot` holds it |
//! | group snapshot | `NODE:ns/dot@COMMIT` | commit `COMMIT` of `ns/dot`: every subdot at once |
//!
//! `NODE:` names the Kubernetes node whose daemon holds the dot (see [`crate::daemons`]). Without it (`ns/dot/subdot`,
//! the ids of every volume made before several daemons were known, and of a single daemon whose node is not known)
//! the id means the default daemon (`--server`). In `pvcPerNode` storage a pool lives on a PVC that moves from node
//! to node (a node that goes away releases it, another adopts it), so the id names the pool instead:
//! `pool=PVC:ns/dot/subdot` ([`POOL_HOME_PREFIX`]), and the volume is reached through whichever server serves that
//! PVC now. The part before `:` is the id's *home*: a node, or `pool=PVC`.
//!
//! Every part is what the daemon accepts in a dot name: 1 to [`MAX_PART_BYTES`] of `[A-Za-z0-9-_.]`, not `.` or
//! `..`; so `/`, `@` and `:` never occur inside a part. A node is a Kubernetes node name (a DNS subdomain: 1 to
//! [`MAX_NODE_BYTES`] of `[a-z0-9-.]`, starting and ending alphanumeric), so `:` never occurs in it either and
//! the forms parse back without ambiguity.

use std::fmt;

use crate::{Error, Result};

/// Longest part of a dot name, subdot or branch (the engine's limit).
pub const MAX_PART_BYTES: usize = 64;
/// Digits of a commit id.
pub const COMMIT_ID_DIGITS: usize = 32;
/// The subdot of a dot named without one (the engine's `__default__`).
pub const DEFAULT_SUBDOT: &str = "__default__";
/// Longest Kubernetes node name (a DNS subdomain).
pub const MAX_NODE_BYTES: usize = 253;
/// Separates the node from the rest of an id.
pub const NODE_SEPARATOR: char = ':';
/// Starts the home of an id that names a pool PVC rather than a node (`pool=PVC`). `=` occurs in no node name.
pub const POOL_HOME_PREFIX: &str = "pool=";

/// The home of a volume on pool PVC `pvc`: `pool=PVC`.
pub fn pool_home(pvc: &str) -> String {
    format!("{POOL_HOME_PREFIX}{pvc}")
}

/// The pool PVC a home names (`pool=PVC`), or `None` for a node.
pub fn pool_of(home: &str) -> Option<&str> {
    home.strip_prefix(POOL_HOME_PREFIX)
}
/// Longest id the driver hands out: the CSI spec's general size limit for strings (128 bytes), which volume and
/// snapshot ids do not override. Names that would make a longer id are refused (INVALID_ARGUMENT) before anything is
/// made; dots made outside CSI with such names are left out of the lists.
pub const MAX_ID_BYTES: usize = 128;

/// `id` if it fits [`MAX_ID_BYTES`]; else an error naming what makes it long.
fn fits(kind: &str, id: String) -> Result<String> {
    if id.len() <= MAX_ID_BYTES {
        return Ok(id);
    }
    Err(Error::InvalidArgument(format!(
        "the {kind} id {id:?} would be {} bytes, and CSI ids are at most {MAX_ID_BYTES}: use shorter namespace, dot \
         or subdot names (the node name counts too)",
        id.len()
    )))
}

/// Checks a Kubernetes node name: a DNS subdomain (lower-case alphanumerics, `-` and `.`, starting and ending
/// alphanumeric, at most [`MAX_NODE_BYTES`]).
pub fn validate_node(node: &str) -> Result<()> {
    validate_dns_name("node", "a Kubernetes node name", node)
}

/// Checks a home: a node ([`validate_node`]) or `pool=PVC`, a PVC name being a DNS subdomain too.
pub fn validate_home(home: &str) -> Result<()> {
    match pool_of(home) {
        Some(pvc) => validate_pvc(pvc),
        None => validate_node(home),
    }
}

/// Checks a pool PVC's name: a DNS subdomain, as a node's.
pub fn validate_pvc(pvc: &str) -> Result<()> {
    validate_dns_name("pool PVC", "a Kubernetes PVC name", pvc)
}

/// A DNS subdomain: lower-case alphanumerics, `-` and `.`, alphanumeric at both ends, at most [`MAX_NODE_BYTES`].
fn validate_dns_name(what: &str, kind: &str, node: &str) -> Result<()> {
    let b = node.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !b.is_empty()
        && b.len() <= MAX_NODE_BYTES
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-' || *c == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {node:?} is not {kind} (1 to {MAX_NODE_BYTES} of [a-z0-9-.], alphanumeric at both ends)"
        )))
    }
}

/// Splits `HOME:rest` (checking the home: a node or `pool=PVC`) or `rest` (no home).
fn split_node(id: &str) -> Result<(Option<String>, &str)> {
    match id.split_once(NODE_SEPARATOR) {
        Some((node, rest)) => {
            validate_home(node)?;
            Ok((Some(node.to_string()), rest))
        }
        None => Ok((None, id)),
    }
}

fn node_prefix(node: &Option<String>) -> String {
    node.as_ref().map(|n| format!("{n}{NODE_SEPARATOR}")).unwrap_or_default()
}

/// Checks one part of a name.
pub fn validate_part(what: &str, part: &str) -> Result<()> {
    let ok = !part.is_empty()
        && part.len() <= MAX_PART_BYTES
        && part != "."
        && part != ".."
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {part:?} must be 1 to {MAX_PART_BYTES} of [A-Za-z0-9-_.], not . or .."
        )))
    }
}

fn validate_commit(id: &str) -> Result<()> {
    if id.len() == COMMIT_ID_DIGITS && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{id:?} is not a commit id ({COMMIT_ID_DIGITS} hex digits)")))
    }
}

/// A volume: one subdot of a dot (on a node's daemon, when the id names one).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId {
    /// The id's home: the node whose daemon holds the dot, or `pool=PVC` ([`pool_of`]); `None`: the default
    /// daemon. First, so ids sort by home.
    pub node: Option<String>,
    pub namespace: String,
    pub dot: String,
    pub subdot: String,
}

impl VolumeId {
    /// A checked volume id.
    pub fn new(namespace: &str, dot: &str, subdot: &str) -> Result<Self> {
        validate_part("namespace", namespace)?;
        validate_part("dot", dot)?;
        validate_part("subdot", subdot)?;
        Ok(Self { node: None, namespace: namespace.to_string(), dot: dot.to_string(), subdot: subdot.to_string() })
    }

    /// The same volume on node `node`'s daemon, or on pool `pool=PVC` (`None`: the default daemon's). The home must
    /// be checked ([`validate_home`]); the daemon registry only knows checked ones.
    pub fn on(mut self, node: Option<String>) -> Self {
        self.node = node;
        self
    }

    /// Parses `NODE:ns/dot/subdot` or `ns/dot/subdot`.
    pub fn parse(id: &str) -> Result<Self> {
        let (node, rest) = split_node(id)?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some(dot), Some(subdot), None) => Ok(Self::new(ns, dot, subdot)?.on(node)),
            _ => {
                Err(Error::InvalidArgument(format!("volume id {id:?} is not of the form [node:]namespace/dot/subdot")))
            }
        }
    }

    /// `ns/dot`, as the daemon names the dot.
    pub fn dot_name(&self) -> String {
        format!("{}/{}", self.namespace, self.dot)
    }

    /// The id, checked against [`MAX_ID_BYTES`].
    pub fn csi_id(&self) -> Result<String> {
        fits("volume", self.to_string())
    }

    /// Checks that the ids of this volume's snapshots fit [`MAX_ID_BYTES`] (each adds `@` and a commit id).
    pub fn check_snapshot_ids_fit(&self) -> Result<()> {
        fits("snapshot", format!("{self}@{}", "0".repeat(COMMIT_ID_DIGITS))).map(drop)
    }

    /// The NBD export of this volume's head: `ns/dot`, or `ns/dot.subdot` for a named subdot.
    pub fn export_name(&self) -> String {
        if self.subdot == DEFAULT_SUBDOT {
            self.dot_name()
        } else {
            format!("{}.{}", self.dot_name(), self.subdot)
        }
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}/{}/{}", node_prefix(&self.node), self.namespace, self.dot, self.subdot)
    }
}

/// A snapshot: one subdot as a commit holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId {
    pub volume: VolumeId,
    /// The commit's full id (lower-case hex).
    pub commit: String,
}

impl SnapshotId {
    /// A checked snapshot id.
    pub fn new(volume: VolumeId, commit: &str) -> Result<Self> {
        validate_commit(commit)?;
        Ok(Self { volume, commit: commit.to_ascii_lowercase() })
    }

    /// The id, checked against [`MAX_ID_BYTES`].
    pub fn csi_id(&self) -> Result<String> {
        fits("snapshot", self.to_string())
    }

    /// Parses `NODE:ns/dot/subdot@COMMIT` or `ns/dot/subdot@COMMIT`.
    pub fn parse(id: &str) -> Result<Self> {
        let (volume, commit) = id.split_once('@').ok_or_else(|| {
            Error::InvalidArgument(format!("snapshot id {id:?} is not of the form [node:]namespace/dot/subdot@commit"))
        })?;
        Self::new(VolumeId::parse(volume)?, commit)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.commit)
    }
}

/// A group snapshot: one commit of a dot, every subdot at once.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupSnapshotId {
    /// The home of the dot (a node or `pool=PVC`, as [`VolumeId::node`]); `None`: the default daemon.
    pub node: Option<String>,
    pub namespace: String,
    pub dot: String,
    pub commit: String,
}

impl GroupSnapshotId {
    /// A checked group snapshot id.
    pub fn new(namespace: &str, dot: &str, commit: &str) -> Result<Self> {
        validate_part("namespace", namespace)?;
        validate_part("dot", dot)?;
        validate_commit(commit)?;
        Ok(Self {
            node: None,
            namespace: namespace.to_string(),
            dot: dot.to_string(),
            commit: commit.to_ascii_lowercase(),
        })
    }

    /// The same group snapshot on node `node`'s daemon (`None`: the default daemon's).
    pub fn on(mut self, node: Option<String>) -> Self {
        self.node = node;
        self
    }

    /// Parses `NODE:ns/dot@COMMIT` or `ns/dot@COMMIT`.
    pub fn parse(id: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!("group snapshot id {id:?} is not of the form [node:]namespace/dot@commit"))
        };
        let (node, rest) = split_node(id)?;
        let (dot, commit) = rest.split_once('@').ok_or_else(bad)?;
        let (ns, name) = dot.split_once('/').ok_or_else(bad)?;
        Ok(Self::new(ns, name, commit)?.on(node))
    }

    /// `ns/dot`.
    pub fn dot_name(&self) -> String {
        format!("{}/{}", self.namespace, self.dot)
    }

    /// The id, checked against [`MAX_ID_BYTES`].
    pub fn csi_id(&self) -> Result<String> {
        fits("group snapshot", self.to_string())
    }

    /// The snapshot of one subdot in this group.
    pub fn member(&self, subdot: &str) -> Result<SnapshotId> {
        SnapshotId::new(VolumeId::new(&self.namespace, &self.dot, subdot)?.on(self.node.clone()), &self.commit)
    }
}

impl fmt::Display for GroupSnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}/{}@{}", node_prefix(&self.node), self.namespace, self.dot, self.commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() -> Result<()> {
        let v = VolumeId::parse("admin/db/logs")?;
        assert_eq!(v.to_string(), "admin/db/logs");
        assert_eq!(v.export_name(), "admin/db.logs");
        assert_eq!(VolumeId::parse("admin/db/__default__")?.export_name(), "admin/db");
        let c = "0123456789abcdef0123456789ABCDEF";
        let s = SnapshotId::parse(&format!("admin/db/logs@{c}"))?;
        assert_eq!(s.to_string(), format!("admin/db/logs@{}", c.to_ascii_lowercase()));
        let g = GroupSnapshotId::parse(&format!("admin/db@{c}"))?;
        assert_eq!(GroupSnapshotId::parse(&g.to_string())?, g);
        assert_eq!(g.member("logs")?, s);
        for bad in ["", "a/b", "a/b/c/d", "a//c", "a/../c", "a/b c/d", "a/b/c@x"] {
            assert!(matches!(VolumeId::parse(bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
        for bad in ["admin/db/logs", "admin/db/logs@", "admin/db/logs@xyz", "admin/db@0123"] {
            assert!(matches!(SnapshotId::parse(bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
        assert!(GroupSnapshotId::parse("admin@0123456789abcdef0123456789abcdef").is_err());
        Ok(())
    }

    #[test]
    fn ids_longer_than_the_csi_limit_are_refused() -> Result<()> {
        let c = "0123456789abcdef0123456789abcdef";
        let part = |n: usize| "x".repeat(n);
        // 61 + 1 + 64 + 1 + 1 = 128 bytes: fits; one more byte does not
        let v = VolumeId::new(&part(61), &part(64), "a")?;
        assert_eq!(v.csi_id()?.len(), MAX_ID_BYTES);
        let long = VolumeId::new(&part(62), &part(64), "a")?;
        match long.csi_id() {
            Err(e) => assert!(e.to_string().contains("129 bytes") && e.to_string().contains("at most 128"), "{e}"),
            Ok(id) => panic!("{id} accepted"),
        }
        // the node counts too
        assert!(VolumeId::new("a", "b", "c")?.on(Some(part(126))).csi_id().is_err());
        // a snapshot adds `@` and 32 digits: a volume of 95 bytes is the longest whose snapshots fit
        let v95 = VolumeId::new(&part(30), &part(62), "a")?;
        assert_eq!(v95.to_string().len(), 95);
        v95.check_snapshot_ids_fit()?;
        SnapshotId::new(v95.clone(), c)?.csi_id()?;
        let v96 = VolumeId::new(&part(31), &part(62), "a")?;
        assert!(v96.check_snapshot_ids_fit().is_err() && SnapshotId::new(v96, c)?.csi_id().is_err());
        assert!(GroupSnapshotId::new(&part(64), &part(64), c)?.csi_id().is_err());
        assert_eq!(GroupSnapshotId::new(&part(30), &part(64), c)?.csi_id()?.len(), 30 + 1 + 64 + 1 + 32);
        Ok(())
    }

    #[test]
    fn node_qualified_ids_round_trip() -> Result<()> {
        let c = "0123456789abcdef0123456789abcdef";
        let v = VolumeId::parse("node-b.example:admin/db/logs")?;
        assert_eq!(v.node.as_deref(), Some("node-b.example"));
        assert_eq!(v.to_string(), "node-b.example:admin/db/logs");
        assert_eq!(v.export_name(), "admin/db.logs", "the export does not name the node");
        assert_eq!(v.dot_name(), "admin/db");
        assert_eq!(VolumeId::parse("admin/db/logs")?.node, None, "old ids: the default daemon");
        assert_eq!(VolumeId::new("admin", "db", "logs")?.on(Some("n1".into())), VolumeId::parse("n1:admin/db/logs")?);
        let s = SnapshotId::parse(&format!("node-b:admin/db/logs@{c}"))?;
        assert_eq!(s.volume.node.as_deref(), Some("node-b"));
        assert_eq!(SnapshotId::parse(&s.to_string())?, s);
        assert_eq!(s.to_string(), format!("node-b:admin/db/logs@{c}"));
        let g = GroupSnapshotId::parse(&format!("node-b:admin/db@{c}"))?;
        assert_eq!((g.node.as_deref(), g.dot_name()), (Some("node-b"), "admin/db".to_string()));
        assert_eq!(g.to_string(), format!("node-b:admin/db@{c}"));
        assert_eq!(g.member("logs")?, s, "members carry the group's node");
        assert_eq!(GroupSnapshotId::parse(&format!("admin/db@{c}"))?.node, None);
        // ids sort by node first (the default daemon's first)
        let mut ids = [VolumeId::parse("b:x/y/z")?, VolumeId::parse("a:x/y/z")?, VolumeId::parse("x/y/z")?];
        ids.sort();
        let sorted: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(sorted, ["x/y/z", "a:x/y/z", "b:x/y/z"]);
        let long = "a".repeat(MAX_NODE_BYTES + 1);
        for bad in [
            ":admin/db/logs",
            "Node-A:admin/db/logs",
            "-a:admin/db/logs",
            "a-:admin/db/logs",
            "a_b:admin/db/logs",
            "a:b:admin/db/logs",
            "a b:admin/db/logs",
            &format!("{long}:admin/db/logs"),
            "node:admin/db",
        ] {
            assert!(matches!(VolumeId::parse(bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
        assert!(VolumeId::parse(&format!("{}:admin/db/logs", "a".repeat(MAX_NODE_BYTES))).is_ok());
        for bad in [format!(":admin/db/logs@{c}"), format!("N:admin/db/logs@{c}"), "node:admin/db/logs@".into()] {
            assert!(matches!(SnapshotId::parse(&bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
        for bad in [format!(":admin/db@{c}"), format!("n:admin@{c}"), format!("n_1:admin/db@{c}")] {
            assert!(matches!(GroupSnapshotId::parse(&bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
        assert!(validate_node("ip-10-0-0-1.eu-west-1.compute.internal").is_ok());
        Ok(())
    }

    #[test]
    fn pool_homed_ids_round_trip() -> Result<()> {
        let c = "0123456789abcdef0123456789abcdef";
        let v = VolumeId::parse("pool=pvc-0123456789ab:admin/db/logs")?;
        assert_eq!(v.node.as_deref(), Some("pool=pvc-0123456789ab"));
        assert_eq!(v.node.as_deref().and_then(pool_of), Some("pvc-0123456789ab"));
        assert_eq!(v.to_string(), "pool=pvc-0123456789ab:admin/db/logs");
        assert_eq!(v.export_name(), "admin/db.logs", "the export names no pool");
        assert_eq!(VolumeId::new("admin", "db", "logs")?.on(Some(pool_home("pvc-0123456789ab"))), v);
        assert_eq!(pool_of("node-a"), None, "a node is not a pool");
        let s = SnapshotId::parse(&format!("pool=pvc-1:admin/db/logs@{c}"))?;
        assert_eq!(SnapshotId::parse(&s.to_string())?, s);
        let g = GroupSnapshotId::parse(&format!("pool=pvc-1:admin/db@{c}"))?;
        assert_eq!(g.member("logs")?, s, "members carry the group's pool");
        for bad in ["pool=:admin/db/logs", "pool=PVC:admin/db/logs", "pool=a_b:admin/db/logs", "pool=a=b:x/y/z"] {
            assert!(matches!(VolumeId::parse(bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
        match VolumeId::parse("pool=Bad:admin/db/logs") {
            Err(e) => assert!(e.to_string().contains("pool PVC \"Bad\""), "{e}"),
            Ok(v) => panic!("{v} accepted"),
        }
        Ok(())
    }
}
