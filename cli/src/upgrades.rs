//! Upgrade checks (the operator's `upgradesUrl` and `upgradesIntervalSeconds`, as Dotmesh had them): with a URL, the
//! daemon asks it every interval which version is current, and `GET /v1/info` (and so `blockmesh version`) tells
//! users when a newer one is out. No URL (the default) means the daemon never calls out.
//!
//! The request: `GET URL?product=blockmesh&version=V&os=OS&arch=ARCH` (`&` instead of `?` when the URL has a query
//! already). The answer: JSON with at least `current_version` (a HashiCorp checkpoint answer has it), and optionally
//! `current_download_url`. Anything else, a failure or a timeout changes nothing but the log (at debug level, and
//! once at warn level until a check succeeds again): the check never stops or slows the daemon.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;

/// Seconds between two checks when the daemon is not told.
pub const DEFAULT_UPGRADES_INTERVAL_SECONDS: u64 = 4 * 3600;
/// Longest interval accepted (a week).
pub const MAX_UPGRADES_INTERVAL_SECONDS: u64 = 7 * 24 * 3600;
/// How long one check may take, connection included.
pub const UPGRADES_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an answer read.
pub const MAX_UPGRADES_ANSWER_BYTES: u64 = 64 << 10;
/// Longest version string or download URL kept from an answer.
const MAX_FIELD_BYTES: usize = 256;

/// The newest version the last successful check reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latest {
    pub version: String,
    pub download_url: Option<String>,
}

/// What the checks found, shared with the control API.
#[derive(Debug, Default)]
pub struct Upgrades {
    latest: Mutex<Option<Latest>>,
}

impl Upgrades {
    /// The newest version known, if a check found one newer than `ours`.
    pub fn newer_than(&self, ours: &str) -> Option<Latest> {
        self.latest.lock().clone().filter(|l| is_newer(&l.version, ours))
    }

    /// Record an answer.
    pub fn set(&self, latest: Latest) {
        *self.latest.lock() = Some(latest);
    }
}

#[derive(Deserialize)]
struct Answer {
    current_version: String,
    #[serde(default)]
    current_download_url: Option<String>,
}

/// The URL of one check: `url` with the product, our version, OS and architecture as query parameters.
pub fn check_url(url: &str, version: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}product=blockmesh&version={version}&os={}&arch={}", std::env::consts::OS, std::env::consts::ARCH)
}

/// Ask `url` once which version is current.
pub fn check(url: &str, version: &str) -> Result<Latest, String> {
    use std::io::Read;
    let agent = ureq::AgentBuilder::new().timeout(UPGRADES_TIMEOUT).build();
    let res = agent.get(&check_url(url, version)).call().map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    res.into_reader().take(MAX_UPGRADES_ANSWER_BYTES).read_to_end(&mut body).map_err(|e| e.to_string())?;
    let a: Answer = serde_json::from_slice(&body).map_err(|e| format!("not a version answer: {e}"))?;
    let version = a.current_version.trim();
    if version.is_empty() || version.len() > MAX_FIELD_BYTES || parse(version).is_none() {
        return Err(format!("current_version {:?} is not a version", a.current_version));
    }
    let download_url = a.current_download_url.filter(|u| !u.is_empty() && u.len() <= MAX_FIELD_BYTES);
    Ok(Latest { version: version.to_string(), download_url })
}

/// Check `url` now and then every `interval`, on a thread of its own, recording answers in `found`. Runs until the
/// process ends.
pub fn start(url: String, interval: Duration, version: &'static str, found: Arc<Upgrades>) -> std::io::Result<()> {
    std::thread::Builder::new().name("blockmesh-upgrades".into()).spawn(move || {
        let mut warned = false;
        let mut told: Option<String> = None;
        loop {
            match check(&url, version) {
                Ok(latest) => {
                    warned = false;
                    if is_newer(&latest.version, version) && told.as_deref() != Some(&latest.version) {
                        tracing::info!(current = latest.version, running = version, "a newer blockmesh is available");
                        told = Some(latest.version.clone());
                    }
                    found.set(latest);
                }
                Err(e) if !warned => {
                    tracing::warn!(url, error = e, "upgrade check failed (retried every interval)");
                    warned = true;
                }
                Err(e) => tracing::debug!(url, error = e, "upgrade check failed"),
            }
            std::thread::sleep(interval);
        }
    })?;
    Ok(())
}

/// `1.2.3` (a leading `v`, and a `-pre` or `+build` suffix, ignored) as numbers.
fn parse(v: &str) -> Option<Vec<u64>> {
    let v = v.strip_prefix('v').unwrap_or(v);
    let core = v.split(['-', '+']).next()?;
    core.split('.').map(|p| p.parse().ok()).collect::<Option<Vec<u64>>>().filter(|p| !p.is_empty() && p.len() <= 4)
}

/// Whether version `a` is newer than `b` (numerically, component by component; missing components are 0).
pub fn is_newer(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Some(mut x), Some(mut y)) => {
            let n = x.len().max(y.len());
            x.resize(n, 0);
            y.resize(n, 0);
            x > y
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert!(is_newer("0.10.0", "0.9.9"));
        assert!(is_newer("v1.0", "0.99.1"));
        assert!(is_newer("0.1.1", "0.1"));
        assert!(!is_newer("0.1.0", "0.1"));
        assert!(!is_newer("0.1.0-rc1", "0.1.0"));
        assert!(!is_newer("garbage", "0.1.0"));
        assert!(!is_newer("1.2.3.4.5", "0.1.0"), "too many parts is not a version");
    }

    #[test]
    fn check_urls_carry_what_is_asked() {
        let u = check_url("https://checkpoint.example/v1/check", "0.1.0");
        assert!(u.starts_with("https://checkpoint.example/v1/check?product=blockmesh&version=0.1.0&os="), "{u}");
        assert!(check_url("http://x/c?k=1", "0.1.0").starts_with("http://x/c?k=1&product=blockmesh"));
    }

    #[test]
    fn only_newer_versions_are_offered() {
        let u = Upgrades::default();
        assert_eq!(u.newer_than("0.1.0"), None);
        u.set(Latest { version: "0.1.0".into(), download_url: None });
        assert_eq!(u.newer_than("0.1.0"), None);
        u.set(Latest { version: "0.2.0".into(), download_url: Some("https://x/d".into()) });
        assert_eq!(u.newer_than("0.1.0").map(|l| l.version), Some("0.2.0".into()));
    }
}
