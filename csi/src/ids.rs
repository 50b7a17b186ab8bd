//! Volume, snapshot and group snapshot ids: what the driver hands to Kubernetes and reads back.
//!
//! | id | form | names |
//! |---|---|---|
//! | volume | `ns/dot/subdot` | the head of subdot `subdot` of dot `ns/dot`, on the dot's current branch |
//! | snapshot | `ns/dot/subdot@COMMIT` | subdot `subdot` as commit `COMMIT` (32 hex digits) of `ns/dot` holds it |
//! | group snapshot | `ns/dot@COMMIT` | commit `COMMIT` of `ns/dot`: every subdot at once |
//!
//! Every part is what the daemon accepts in a dot name: 1 to [`MAX_PART_BYTES`] of `[A-Za-z0-9-_.]`, not `.` or
//! `..`; so `/` and `@` never occur inside a part and the forms parse back without ambiguity.

use std::fmt;

use crate::{Error, Result};

/// Longest part of a dot name, subdot or branch (the engine's limit).
pub const MAX_PART_BYTES: usize = 64;
/// Digits of a commit id.
pub const COMMIT_ID_DIGITS: usize = 32;
/// The subdot of a dot named without one (the engine's `__default__`).
pub const DEFAULT_SUBDOT: &str = "__default__";

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

/// A volume: one subdot of a dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId {
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
        Ok(Self { namespace: namespace.to_string(), dot: dot.to_string(), subdot: subdot.to_string() })
    }

    /// Parses `ns/dot/subdot`.
    pub fn parse(id: &str) -> Result<Self> {
        let mut parts = id.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some(dot), Some(subdot), None) => Self::new(ns, dot, subdot),
            _ => Err(Error::InvalidArgument(format!("volume id {id:?} is not of the form namespace/dot/subdot"))),
        }
    }

    /// `ns/dot`, as the daemon names the dot.
    pub fn dot_name(&self) -> String {
        format!("{}/{}", self.namespace, self.dot)
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
        write!(f, "{}/{}/{}", self.namespace, self.dot, self.subdot)
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

    /// Parses `ns/dot/subdot@COMMIT`.
    pub fn parse(id: &str) -> Result<Self> {
        let (volume, commit) = id.split_once('@').ok_or_else(|| {
            Error::InvalidArgument(format!("snapshot id {id:?} is not of the form namespace/dot/subdot@commit"))
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
        Ok(Self { namespace: namespace.to_string(), dot: dot.to_string(), commit: commit.to_ascii_lowercase() })
    }

    /// Parses `ns/dot@COMMIT`.
    pub fn parse(id: &str) -> Result<Self> {
        let bad =
            || Error::InvalidArgument(format!("group snapshot id {id:?} is not of the form namespace/dot@commit"));
        let (dot, commit) = id.split_once('@').ok_or_else(bad)?;
        let (ns, name) = dot.split_once('/').ok_or_else(bad)?;
        Self::new(ns, name, commit)
    }

    /// `ns/dot`.
    pub fn dot_name(&self) -> String {
        format!("{}/{}", self.namespace, self.dot)
    }

    /// The snapshot of one subdot in this group.
    pub fn member(&self, subdot: &str) -> Result<SnapshotId> {
        SnapshotId::new(VolumeId::new(&self.namespace, &self.dot, subdot)?, &self.commit)
    }
}

impl fmt::Display for GroupSnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.namespace, self.dot, self.commit)
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
}
