//! Per-volume quality of service in the daemon.
//!
//! A subdot's limits live in the pool as the dot property `qos.<subdot>` (compact JSON of [`QosLimits`]), so they
//! survive restarts and travel with the pool, not with commits, clones or pushes (they say how this node serves the
//! volume). Every connection to a subdot, to its head and to its commits alike, shares one
//! [`blockmesh_nbd::Qos`] from the [`QosRegistry`], so the limits cover the volume however many connections a
//! client opens, and the NBD server's fair queue sees the volume as one flow. Changing the limits through the API
//! writes the property, updates the shared buckets (connections feel it at their next request) and flushes the pool
//! before answering.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use blockmesh_engine::{DotInfo, Pool};
use blockmesh_nbd::{Limits, Qos};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::size::format_size;

/// Dot property prefix of a subdot's limits.
pub const QOS_PROPERTY_PREFIX: &str = "qos.";

/// A volume's limits as the API, the client and the pool property spell them. Absent fields are no limit.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    /// Operations per second, reads and writes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    /// Writes, trims and write-zeroes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
    /// Bytes per second, read and written together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bytes_per_sec: Option<u64>,
    /// Burst allowance in milliseconds of the rate [default: `blockmesh_nbd::qos::DEFAULT_BURST_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
}

impl QosLimits {
    /// The NBD server's form.
    pub fn to_limits(&self) -> Limits {
        Limits {
            iops: self.iops,
            read_iops: self.read_iops,
            write_iops: self.write_iops,
            bytes_per_sec: self.bytes_per_sec,
            read_bytes_per_sec: self.read_bytes_per_sec,
            write_bytes_per_sec: self.write_bytes_per_sec,
            burst_ms: self.burst_ms.unwrap_or(blockmesh_nbd::qos::DEFAULT_BURST_MS),
        }
    }

    /// True when nothing is limited (a burst alone limits nothing).
    pub fn is_unlimited(&self) -> bool {
        self.to_limits().is_unlimited()
    }

    /// Checks the values (see `blockmesh_nbd::Limits::validate`).
    pub fn validate(&self) -> Result<(), String> {
        self.to_limits().validate()
    }

    /// A short human form for listings: `-` when unlimited.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let ops = |name: &str, v: Option<u64>, parts: &mut Vec<String>| {
            if let Some(v) = v {
                parts.push(format!("{name}{v} iops"));
            }
        };
        let bytes = |name: &str, v: Option<u64>, parts: &mut Vec<String>| {
            if let Some(v) = v {
                parts.push(format!("{name}{}/s", format_size(v)));
            }
        };
        ops("", self.iops, &mut parts);
        ops("r ", self.read_iops, &mut parts);
        ops("w ", self.write_iops, &mut parts);
        bytes("", self.bytes_per_sec, &mut parts);
        bytes("r ", self.read_bytes_per_sec, &mut parts);
        bytes("w ", self.write_bytes_per_sec, &mut parts);
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// The property key of a subdot's limits.
pub fn property_key(subdot: &str) -> String {
    format!("{QOS_PROPERTY_PREFIX}{subdot}")
}

/// The limits kept for a subdot of a dot: unlimited when none are kept. A property that does not parse (written by
/// hand or by a newer build) is logged and treated as unlimited rather than failing every connection.
pub fn limits_of(info: &DotInfo, subdot: &str) -> QosLimits {
    match info.properties.get(&property_key(subdot)) {
        None => QosLimits::default(),
        Some(text) => serde_json::from_str(text).unwrap_or_else(|e| {
            tracing::warn!(dot = info.name, subdot, error = %e, "unreadable QoS limits; serving without limits");
            QosLimits::default()
        }),
    }
}

/// The limits of every subdot of a dot that has any, by subdot.
pub fn limited_subdots(info: &DotInfo) -> BTreeMap<String, QosLimits> {
    info.properties
        .keys()
        .filter_map(|k| k.strip_prefix(QOS_PROPERTY_PREFIX))
        .map(|s| (s.to_string(), limits_of(info, s)))
        .filter(|(_, l)| !l.is_unlimited())
        .collect()
}

/// Key of a volume in the registry: `(dot, subdot)`; plain volumes (not in a dot) have an empty dot.
type VolumeKey = (String, String);

/// The shared [`Qos`] of every volume served since the daemon started (see the module documentation).
#[derive(Debug, Default)]
pub struct QosRegistry {
    volumes: Mutex<HashMap<VolumeKey, Arc<Qos>>>,
}

impl QosRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The shared QoS of a subdot of a dot (loaded from the pool the first time), or of a plain volume (`dot`
    /// `None`: no limits, a fair-queue flow of its own).
    pub fn for_volume(&self, pool: &Pool, dot: Option<&str>, subdot: &str) -> Arc<Qos> {
        let key = (dot.unwrap_or_default().to_string(), subdot.to_string());
        // the pool is read under the registry's lock, so a concurrent `set` cannot slip between the read and the
        // insert (it updates the entry after writing the property)
        let mut map = self.volumes.lock();
        if let Some(q) = map.get(&key) {
            return q.clone();
        }
        let limits = match dot.map(|d| pool.dot(d)) {
            Some(Ok(info)) => limits_of(&info, subdot),
            _ => QosLimits::default(),
        };
        let q = Arc::new(Qos::new(limits.to_limits()));
        map.insert(key, q.clone());
        q
    }

    /// Keeps new limits for a subdot in the pool and applies them to its connections at once (the caller flushes the
    /// pool to make them durable, as for every API change).
    pub fn set(&self, pool: &Pool, dot: &str, subdot: &str, limits: QosLimits) -> Result<(), SetError> {
        limits.validate().map_err(SetError::Invalid)?;
        let info = pool.dot(dot)?;
        if !info.subdots.iter().any(|(s, _)| s == subdot) {
            return Err(SetError::NoSuchSubdot(format!("{dot} has no subdot {subdot}")));
        }
        let value = if limits.is_unlimited() {
            None
        } else {
            Some(serde_json::to_string(&limits).map_err(|e| SetError::Invalid(e.to_string()))?)
        };
        pool.set_dot_property(dot, &property_key(subdot), value.as_deref())?;
        if let Some(q) = self.volumes.lock().get(&(dot.to_string(), subdot.to_string())) {
            q.set_limits(limits.to_limits());
        }
        Ok(())
    }

    /// Forgets a deleted dot's volumes (a new dot of the same name starts afresh).
    pub fn forget_dot(&self, dot: &str) {
        self.volumes.lock().retain(|(d, _), _| d != dot);
    }

    /// Forgets one subdot (removed from its dot).
    pub fn forget_volume(&self, dot: &str, subdot: &str) {
        self.volumes.lock().remove(&(dot.to_string(), subdot.to_string()));
    }

    /// Every volume served since start, with its QoS: `(dot, subdot, qos)`.
    pub fn volumes(&self) -> Vec<(String, String, Arc<Qos>)> {
        self.volumes.lock().iter().map(|((d, s), q)| (d.clone(), s.clone(), q.clone())).collect()
    }
}

/// Why limits were not set.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoSuchSubdot(String),
    #[error(transparent)]
    Engine(#[from] blockmesh_engine::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_trip_through_the_property_and_describe_themselves() {
        let l = QosLimits { read_iops: Some(500), write_bytes_per_sec: Some(10 << 20), ..Default::default() };
        let text = serde_json::to_string(&l).expect("json");
        assert_eq!(text, r#"{"read_iops":500,"write_bytes_per_sec":10485760}"#);
        assert_eq!(serde_json::from_str::<QosLimits>(&text).expect("parse"), l);
        assert_eq!(l.describe(), "r 500 iops, w 10 MiB/s");
        assert_eq!(QosLimits::default().describe(), "-");
        assert!(serde_json::from_str::<QosLimits>(r#"{"iosp":5}"#).is_err(), "a misspelt field is refused");
        assert!(QosLimits { burst_ms: Some(10), ..Default::default() }.is_unlimited());
        assert!(QosLimits { iops: Some(0), ..Default::default() }.validate().is_err());
    }

    #[test]
    fn the_registry_loads_sets_and_forgets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::create_file(&dir.path().join("p"), 256 << 20, Default::default()).expect("pool");
        pool.create_dot("admin/db", &[("__default__", 1 << 20), ("logs", 1 << 20)]).expect("dot");
        let reg = QosRegistry::new();
        let limits = QosLimits { iops: Some(100), ..Default::default() };
        reg.set(&pool, "admin/db", "logs", limits).expect("set");
        // loaded from the pool on first use
        let logs = reg.for_volume(&pool, Some("admin/db"), "logs");
        assert_eq!(logs.limits().iops, Some(100));
        let default = reg.for_volume(&pool, Some("admin/db"), "__default__");
        assert!(default.limits().is_unlimited());
        // shared, and changed live
        assert!(Arc::ptr_eq(&logs, &reg.for_volume(&pool, Some("admin/db"), "logs")));
        reg.set(&pool, "admin/db", "logs", QosLimits { read_iops: Some(7), ..Default::default() }).expect("set");
        assert_eq!(logs.limits().read_iops, Some(7));
        assert_eq!(logs.limits().iops, None);
        assert_eq!(limited_subdots(&pool.dot("admin/db").expect("dot")).len(), 1);
        // clearing removes the property
        reg.set(&pool, "admin/db", "logs", QosLimits::default()).expect("clear");
        assert!(pool.dot("admin/db").expect("dot").properties.is_empty());
        assert!(logs.limits().is_unlimited());
        assert!(matches!(reg.set(&pool, "admin/db", "nope", limits), Err(SetError::NoSuchSubdot(_))));
        assert!(matches!(
            reg.set(&pool, "admin/db", "logs", QosLimits { iops: Some(0), ..Default::default() }),
            Err(SetError::Invalid(_))
        ));
        reg.forget_dot("admin/db");
        assert!(reg.volumes().is_empty());
    }
}
