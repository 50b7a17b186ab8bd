//! The client's remotes: named daemons with their API keys, so `--remote NAME` (or the current remote) replaces
//! `--server` and a key file. Kept in `$BLOCKMESH_CONFIG`, else `$XDG_CONFIG_HOME/blockmesh/remotes.json`, else
//! `~/.config/blockmesh/remotes.json`, written with mode 0600 (it holds keys) through a temporary file and a rename.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The name that means "no remote: the local daemon".
pub const LOCAL: &str = "local";
/// Longest remote name.
pub const MAX_REMOTE_NAME_BYTES: usize = 64;

/// One daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Remote {
    /// Its control API, `http://host:port`.
    pub url: String,
    /// Its admin API key.
    pub key: String,
    /// A PEM file with the CA (or the self-signed certificate) its HTTPS API is trusted by; none: the system's
    /// usual web roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// The config file's contents.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Remotes {
    /// The remote used when none is named; none: the local daemon.
    #[serde(default)]
    pub current: Option<String>,
    #[serde(default)]
    pub remotes: BTreeMap<String, Remote>,
}

/// Where the config lives.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BLOCKMESH_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("blockmesh").join("remotes.json"))
}

/// Check a remote name: 1 to 64 letters, digits, `-`, `_`, `.`; not `local`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_REMOTE_NAME_BYTES
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "remote name {name:?} must be 1 to {MAX_REMOTE_NAME_BYTES} letters, digits, '-', '_', '.'"
        ));
    }
    if name == LOCAL {
        return Err(format!("{LOCAL:?} means the local daemon; pick another name"));
    }
    Ok(())
}

impl Remotes {
    /// The config at `path`; empty when the file does not exist.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Write the config to `path` (mode 0600), replacing it atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// The remote named `name`, or the current one when `name` is `None`; `None` means the local daemon.
    pub fn pick(&self, name: Option<&str>) -> Result<Option<(&str, &Remote)>, String> {
        let name = match name.or(self.current.as_deref()) {
            None | Some(LOCAL) => return Ok(None),
            Some(n) => n,
        };
        match self.remotes.get_key_value(name) {
            Some((n, r)) => Ok(Some((n.as_str(), r))),
            None => {
                let known: Vec<&str> = self.remotes.keys().map(String::as_str).collect();
                Err(format!(
                    "no remote named {name}; known: {} (`blockmesh remote add {name} URL` adds it)",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_round_trip_privately_and_pick_by_name_or_current() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cfg").join("remotes.json");
        let mut r = Remotes::load(&path).expect("missing file is empty");
        assert_eq!(r, Remotes::default());
        assert_eq!(r.pick(None), Ok(None));
        r.remotes.insert(
            "prod".into(),
            Remote { url: "http://10.0.0.5:32607".into(), key: "k1".into(), ca_cert: Some("/etc/ca.pem".into()) },
        );
        r.current = Some("prod".into());
        r.save(&path).expect("save");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).expect("stat").permissions());
        assert_eq!(mode & 0o777, 0o600);
        let back = Remotes::load(&path).expect("load");
        assert_eq!(back, r);
        assert_eq!(back.pick(None).expect("current").map(|(n, _)| n), Some("prod"));
        assert_eq!(back.pick(Some(LOCAL)), Ok(None));
        assert!(back.pick(Some("nope")).expect_err("unknown").contains("known: prod"));
        assert!(validate_name("local").is_err() && validate_name("a b").is_err() && validate_name("dc-2").is_ok());
        std::fs::write(&path, b"{not json").expect("write");
        assert!(Remotes::load(&path).is_err(), "a broken file is an error, not an empty config");
    }
}
