//! Shared by the CLI's integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`Daemon::ok_after_clients`] waits for the daemon to see exited NBD clients go.
pub const CLIENT_GONE_WAIT: Duration = Duration::from_secs(5);

/// True when `tool` is on the PATH. Under `CI=true` a missing tool fails the test instead of skipping it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} is required under CI=true but not installed");
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// A running daemon, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub data: PathBuf,
    pub api: String,
    pub nbd: String,
    /// The health endpoint's URL, when started with `--health-listen`.
    pub health: Option<String>,
}

impl Daemon {
    pub fn start(data: &Path) -> Daemon {
        Self::start_with(data, &["--pool-size", "1G"])
    }

    /// Starts the daemon with `extra` arguments for `serve`.
    pub fn start_with(data: &Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockmesh"))
            .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let start = Instant::now();
        let line = loop {
            assert!(start.elapsed() < Duration::from_secs(60), "daemon did not start");
            let l = lines.next().expect("daemon exited").unwrap();
            if l.starts_with("blockmesh serving") {
                break l;
            }
        };
        // Keep draining stdout so the daemon never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let after = |marker: &str| line.split(marker).nth(1).unwrap().split([' ', ',']).next().unwrap().to_string();
        // "control API at http://ADDR" (https:// when the daemon has a certificate)
        let api = line.split("control API at ").nth(1).unwrap().split([' ', ',']).next().unwrap().to_string();
        // "health at http://ADDR/healthz" with --health-listen
        let health = line.split("health at ").nth(1).map(|h| h.split(' ').next().unwrap().to_string());
        Daemon { child, data: data.to_path_buf(), api, nbd: after("nbd://"), health }
    }

    /// A client subcommand aimed at this daemon, not started yet (standard input: nothing).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_blockmesh"));
        c.args(args)
            .env("BLOCKMESH_SERVER", &self.api)
            .env("BLOCKMESH_DATA_DIR", &self.data)
            .env_remove("BLOCKMESH_API_KEY")
            .env_remove("BLOCKMESH_REMOTE")
            // no remotes of whoever runs the tests
            .env("BLOCKMESH_CONFIG", self.data.join("no-remotes.json"))
            .stdin(Stdio::null());
        c
    }

    /// Runs a client subcommand; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.run(self.command(args))
    }

    /// Runs a command made by [`Daemon::command`]; returns (exit code, stdout, stderr).
    pub fn run(&self, mut c: Command) -> (i32, String, String) {
        let out = c.output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    }

    /// Runs a client subcommand that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "blockmesh {args:?} failed: {err}{out}");
        out
    }

    /// Runs a client subcommand that must succeed once the NBD clients that just exited are gone: the daemon sees
    /// a client's connection close a moment after the client process exits, and refuses (409, "in use") meanwhile.
    /// Retries that refusal only, for at most [`CLIENT_GONE_WAIT`].
    pub fn ok_after_clients(&self, args: &[&str]) -> String {
        let started = std::time::Instant::now();
        loop {
            let (code, out, err) = self.cli(args);
            if code == 0 {
                return out;
            }
            let in_use = err.contains("connected NBD client");
            assert!(in_use && started.elapsed() < CLIENT_GONE_WAIT, "blockmesh {args:?} failed: {err}{out}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    pub fn key(&self) -> String {
        std::fs::read_to_string(self.data.join("api-key")).unwrap().trim().to_string()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    // Commit exports are read-only: qemu opens them read-only only when asked to (and writes must still fail).
    if uri.contains('@') && cmds.iter().all(|c| c.starts_with("read")) {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // qemu-io exits 0 even when a command fails; its messages say so.
    let failed = !out.status.success() || text.contains("failed") || text.contains("Pattern verification failed");
    (!failed, text)
}

pub fn qemu_ok(uri: &str, cmds: &[&str]) {
    let (ok, text) = qemu_io(uri, cmds);
    assert!(ok, "qemu-io {cmds:?} on {uri}: {text}");
}

/// `qemu-img compare` of two NBD exports: identical contents.
pub fn same_export(a: &str, b: &str) {
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]).output().unwrap();
    assert!(
        out.status.success(),
        "{a} and {b} differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `name` (with its labels) in Prometheus text.
pub fn sample(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
    let line = line.unwrap_or_else(|| panic!("no sample {name} in\n{text}"));
    line[name.len()..].trim().split(' ').next().unwrap().parse().unwrap()
}
