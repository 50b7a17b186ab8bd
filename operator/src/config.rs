//! The `blockmesh` ConfigMap: Dotmesh's keys, their defaults, and validation.
//!
//! Every value is checked; a ConfigMap with any bad value is refused as a whole (the operator keeps the last good
//! configuration running and reports the problems), and so is an unknown key (a misspelt key would otherwise fall
//! back to its default without a word).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::selector::{self, LabelSelector};

/// Name of the ConfigMap the operator reads (in its own namespace).
pub const CONFIG_MAP_NAME: &str = "blockmesh";

/// `nodeSelector`: a label selector for the nodes that run a server; empty selects every node.
pub const KEY_NODE_SELECTOR: &str = "nodeSelector";
/// `upgradesUrl`: where the servers look for new versions; empty (the default) means never.
pub const KEY_UPGRADES_URL: &str = "upgradesUrl";
/// `upgradesIntervalSeconds`: seconds between two such checks.
pub const KEY_UPGRADES_INTERVAL: &str = "upgradesIntervalSeconds";
/// `poolName`: the name of each node's pool.
pub const KEY_POOL_NAME: &str = "poolName";
/// `logAddress`: a syslog server for the servers' logs; empty means standard output.
pub const KEY_LOG_ADDRESS: &str = "logAddress";
/// `storageMode`: `local` or `pvcPerNode`.
pub const KEY_STORAGE_MODE: &str = "storageMode";
/// `local.poolSizePerNode`: size of the pool file on each node (local mode).
pub const KEY_LOCAL_POOL_SIZE: &str = "local.poolSizePerNode";
/// `local.poolLocation`: host directory of the pool file (local mode).
pub const KEY_LOCAL_POOL_LOCATION: &str = "local.poolLocation";
/// `pvcPerNode.pvSizePerNode`: size of each node's PVC (pvcPerNode mode).
pub const KEY_PVC_SIZE: &str = "pvcPerNode.pvSizePerNode";
/// `pvcPerNode.storageClass`: StorageClass of the PVCs; empty means the cluster's default class.
pub const KEY_PVC_STORAGE_CLASS: &str = "pvcPerNode.storageClass";
/// `pvcPerNode.orphanGracePeriodSeconds` (blockmesh's own key): how long a PVC may stay without a node before an
/// extra server pod on a live node serves it.
pub const KEY_ORPHAN_GRACE: &str = "pvcPerNode.orphanGracePeriodSeconds";
/// Dotmesh keys that blockmesh accepts and ignores (it has no FlexVolume driver).
pub const IGNORED_DOTMESH_KEYS: &[&str] = &["flexvolumeDriverDir"];

/// Every key with its default, in the order the README and the shipped ConfigMap list them.
pub const DEFAULTS: &[(&str, &str)] = &[
    (KEY_NODE_SELECTOR, ""),
    (KEY_UPGRADES_URL, ""),
    (KEY_UPGRADES_INTERVAL, "14400"),
    (KEY_POOL_NAME, "pool"),
    (KEY_LOG_ADDRESS, ""),
    (KEY_STORAGE_MODE, "local"),
    (KEY_LOCAL_POOL_SIZE, "10G"),
    (KEY_LOCAL_POOL_LOCATION, "/var/lib/blockmesh"),
    (KEY_PVC_SIZE, "10G"),
    (KEY_PVC_STORAGE_CLASS, "standard"),
    (KEY_ORPHAN_GRACE, "600"),
];

/// Shortest accepted interval between upgrade checks.
pub const MIN_UPGRADES_INTERVAL_SECONDS: u64 = 60;
/// Longest accepted interval between upgrade checks (a week).
pub const MAX_UPGRADES_INTERVAL_SECONDS: u64 = 7 * 24 * 3600;
/// Longest accepted orphan grace period (a week).
pub const MAX_ORPHAN_GRACE_SECONDS: u64 = 7 * 24 * 3600;
/// Smallest pool or PVC the operator asks for.
pub const MIN_POOL_SIZE_BYTES: u64 = 1 << 30;
/// Largest pool or PVC the operator asks for (1 PiB).
pub const MAX_POOL_SIZE_BYTES: u64 = 1 << 50;
/// Longest `poolName`.
pub const MAX_POOL_NAME_LEN: usize = 63;
/// Longest `local.poolLocation`.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest `upgradesUrl` or `logAddress`.
pub const MAX_ADDRESS_LEN: usize = 2048;
/// Longest value of any key (a ConfigMap value can be a megabyte; none of ours needs more than this).
pub const MAX_VALUE_LEN: usize = 4096;

/// Where each node's server keeps its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StorageMode {
    /// A pool file in a host directory of each node (`server-NODE` pods).
    Local,
    /// A pool file on one PVC per node (`server-PVC-node-NODE` pods).
    PvcPerNode,
}

impl StorageMode {
    /// The ConfigMap spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::Local => "local",
            StorageMode::PvcPerNode => "pvcPerNode",
        }
    }

    /// Parses the ConfigMap spelling (exactly `local` or `pvcPerNode`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "local" => Some(StorageMode::Local),
            "pvcPerNode" => Some(StorageMode::PvcPerNode),
            _ => None,
        }
    }
}

impl fmt::Display for StorageMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Nodes that run a server.
    pub node_selector: LabelSelector,
    /// Where servers check for upgrades (empty: never).
    pub upgrades_url: String,
    /// Seconds between upgrade checks.
    pub upgrades_interval_seconds: u64,
    /// Name of each node's pool.
    pub pool_name: String,
    /// Syslog address for the servers' logs (empty: standard output).
    pub log_address: String,
    /// Where pools live.
    pub storage_mode: StorageMode,
    /// Pool file size in local mode, bytes.
    pub local_pool_size_bytes: u64,
    /// Host directory of the pool file in local mode.
    pub local_pool_location: String,
    /// PVC size in pvcPerNode mode, bytes.
    pub pvc_size_bytes: u64,
    /// StorageClass of the PVCs (empty: the cluster's default class).
    pub pvc_storage_class: String,
    /// Seconds a PVC may stay without a node before an extra server serves it.
    pub orphan_grace_seconds: u64,
    /// The ConfigMap data this was read from, every key present (defaults filled in): what the status records as
    /// the configuration in force.
    pub data: BTreeMap<String, String>,
}

/// One bad key of a ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key.
    pub key: String,
    /// What is wrong with its value, and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The problems of a ConfigMap, all of them, joined for a message.
pub fn describe_errors(errors: &[ConfigError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl ClusterConfig {
    /// The configuration of a ConfigMap with no keys: every default.
    pub fn defaults() -> Self {
        match Self::from_data(&BTreeMap::new()) {
            Ok(c) => c,
            // The defaults are constants checked by a test; this arm cannot be reached.
            Err(e) => panic!("the built-in defaults are invalid: {}", describe_errors(&e)),
        }
    }

    /// Validates ConfigMap data; missing keys take their defaults. Returns every problem, not just the first.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        for key in data.keys() {
            if !DEFAULTS.iter().any(|(k, _)| k == key) && !IGNORED_DOTMESH_KEYS.contains(&key.as_str()) {
                errors.push(ConfigError {
                    key: key.clone(),
                    message: format!(
                        "unknown key (known keys: {})",
                        DEFAULTS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        let mut full = BTreeMap::new();
        for (key, default) in DEFAULTS {
            let value = data.get(*key).map(String::as_str).unwrap_or(default);
            if value.len() > MAX_VALUE_LEN {
                errors
                    .push(ConfigError { key: key.to_string(), message: format!("longer than {MAX_VALUE_LEN} bytes") });
            }
            full.insert(key.to_string(), value.to_string());
        }
        let get = |k: &str| full.get(k).map(String::as_str).unwrap_or_default();
        let mut check = |key: &str, r: Result<(), String>| {
            if let Err(message) = r {
                errors.push(ConfigError { key: key.to_string(), message });
            }
        };

        let node_selector = LabelSelector::parse(get(KEY_NODE_SELECTOR));
        check(KEY_NODE_SELECTOR, node_selector.as_ref().map(|_| ()).map_err(Clone::clone));
        check(KEY_UPGRADES_URL, check_url(get(KEY_UPGRADES_URL)));
        let interval =
            parse_seconds(get(KEY_UPGRADES_INTERVAL), MIN_UPGRADES_INTERVAL_SECONDS, MAX_UPGRADES_INTERVAL_SECONDS);
        check(KEY_UPGRADES_INTERVAL, interval.clone().map(|_| ()));
        check(KEY_POOL_NAME, check_pool_name(get(KEY_POOL_NAME)));
        check(KEY_LOG_ADDRESS, check_log_address(get(KEY_LOG_ADDRESS)));
        let mode = StorageMode::parse(get(KEY_STORAGE_MODE));
        check(
            KEY_STORAGE_MODE,
            mode.map(|_| ())
                .ok_or_else(|| format!("{:?} is not a storage mode: use local or pvcPerNode", get(KEY_STORAGE_MODE))),
        );
        let local_size = parse_pool_size(get(KEY_LOCAL_POOL_SIZE));
        check(KEY_LOCAL_POOL_SIZE, local_size.clone().map(|_| ()));
        check(KEY_LOCAL_POOL_LOCATION, check_host_dir(get(KEY_LOCAL_POOL_LOCATION)));
        let pvc_size = parse_pool_size(get(KEY_PVC_SIZE));
        check(KEY_PVC_SIZE, pvc_size.clone().map(|_| ()));
        check(KEY_PVC_STORAGE_CLASS, check_storage_class(get(KEY_PVC_STORAGE_CLASS)));
        let grace = parse_seconds(get(KEY_ORPHAN_GRACE), 0, MAX_ORPHAN_GRACE_SECONDS);
        check(KEY_ORPHAN_GRACE, grace.clone().map(|_| ()));

        match (node_selector, interval, mode, local_size, pvc_size, grace) {
            (Ok(node_selector), Ok(interval), Some(storage_mode), Ok(local), Ok(pvc), Ok(grace))
                if errors.is_empty() =>
            {
                Ok(ClusterConfig {
                    node_selector,
                    upgrades_url: get(KEY_UPGRADES_URL).to_string(),
                    upgrades_interval_seconds: interval,
                    pool_name: get(KEY_POOL_NAME).to_string(),
                    log_address: get(KEY_LOG_ADDRESS).to_string(),
                    storage_mode,
                    local_pool_size_bytes: local,
                    local_pool_location: get(KEY_LOCAL_POOL_LOCATION).trim_end_matches('/').to_string(),
                    pvc_size_bytes: pvc,
                    pvc_storage_class: get(KEY_PVC_STORAGE_CLASS).to_string(),
                    orphan_grace_seconds: grace,
                    data: full,
                })
            }
            _ => Err(errors),
        }
    }
}

/// Parses a size as Dotmesh and `blockmesh serve --pool-size` write them: a whole number with an optional binary
/// suffix (`10G` is 10 GiB; K, M, G, T, also with `i`, `iB` or `B` as Kubernetes quantities write them, any case).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size: use a whole number like 10G or 512M"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown size suffix {suffix:?}; use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_pool_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < MIN_POOL_SIZE_BYTES {
        return Err(format!("{s:?} is smaller than the smallest pool, 1G"));
    }
    if n > MAX_POOL_SIZE_BYTES {
        return Err(format!("{s:?} is larger than the largest pool, 1024T"));
    }
    Ok(n)
}

fn parse_seconds(s: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number of seconds"))?;
    if n < min || n > max {
        return Err(format!("{n} is out of range: between {min} and {max} seconds"));
    }
    Ok(n)
}

fn check_url(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(r)
            if !r.is_empty()
                && s.len() <= MAX_ADDRESS_LEN
                && !s.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok(())
        }
        _ => Err(format!("{s:?} is not an http:// or https:// URL (leave it empty to never check for upgrades)")),
    }
}

fn check_pool_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= MAX_POOL_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphabetic);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?}: a pool name is 1 to {MAX_POOL_NAME_LEN} letters, digits, '-', '_' or '.', starting with a letter"
        ))
    }
}

fn check_log_address(s: &str) -> Result<(), String> {
    if s.is_empty() || s.parse::<IpAddr>().is_ok() || s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    if port_ok && host.len() <= MAX_ADDRESS_LEN && selector::is_dns_subdomain(host) {
        Ok(())
    } else {
        Err(format!("{s:?} is not a syslog address: use HOST, HOST:PORT, an IP or IP:PORT (empty: standard output)"))
    }
}

fn check_host_dir(s: &str) -> Result<(), String> {
    let ok = s.starts_with('/')
        && !s.trim_end_matches('/').is_empty()
        && s.len() <= MAX_PATH_LEN
        && !s.split('/').any(|c| c == ".." || c == ".")
        && !s.chars().any(|c| c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?}: use an absolute host directory other than /, without '.' or '..' components"))
    }
}

fn check_storage_class(s: &str) -> Result<(), String> {
    if s.is_empty() || selector::is_dns_subdomain(s) {
        Ok(())
    } else {
        Err(format!("{s:?} is not a StorageClass name (lower case, digits, '-', '.'; empty: the cluster's default)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_complete() {
        let c = ClusterConfig::defaults();
        assert_eq!(c.storage_mode, StorageMode::Local);
        assert_eq!(c.local_pool_size_bytes, 10 << 30);
        assert_eq!(c.pvc_size_bytes, 10 << 30);
        assert_eq!(c.local_pool_location, "/var/lib/blockmesh");
        assert_eq!(c.pvc_storage_class, "standard");
        assert_eq!(c.orphan_grace_seconds, 600);
        assert!(c.upgrades_url.is_empty(), "no phone home by default");
        assert_eq!(c.data.len(), DEFAULTS.len());
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let data: BTreeMap<String, String> = [
            (KEY_STORAGE_MODE, "zfs"),
            (KEY_LOCAL_POOL_SIZE, "10X"),
            (KEY_PVC_SIZE, "1M"),
            (KEY_NODE_SELECTOR, "a in (b"),
            (KEY_UPGRADES_URL, "ftp://x"),
            (KEY_UPGRADES_INTERVAL, "5"),
            (KEY_POOL_NAME, "-x"),
            (KEY_LOG_ADDRESS, "not an address"),
            (KEY_LOCAL_POOL_LOCATION, "relative/dir"),
            (KEY_PVC_STORAGE_CLASS, "Fast SSD"),
            (KEY_ORPHAN_GRACE, "-1"),
            ("storagemode", "local"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let errors = ClusterConfig::from_data(&data).err().unwrap_or_default();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(errors.len(), 12, "{keys:?}");
    }

    #[test]
    fn good_values_parse() -> Result<(), String> {
        let data: BTreeMap<String, String> = [
            (KEY_STORAGE_MODE, "pvcPerNode"),
            (KEY_PVC_SIZE, "100Gi"),
            (KEY_PVC_STORAGE_CLASS, ""),
            (KEY_LOG_ADDRESS, "syslog.example.com:514"),
            (KEY_UPGRADES_URL, "https://checkpoint.example.com/"),
            ("flexvolumeDriverDir", "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = ClusterConfig::from_data(&data).map_err(|e| describe_errors(&e))?;
        assert_eq!(c.storage_mode, StorageMode::PvcPerNode);
        assert_eq!(c.pvc_size_bytes, 100 << 30);
        assert!(!c.data.contains_key("flexvolumeDriverDir"));
        Ok(())
    }
}
