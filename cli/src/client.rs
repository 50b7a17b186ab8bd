//! The client subcommands: a dotmesh-style workflow over the daemon's control API (see `blockmesh::api`).
//!
//! The daemon is `--server` (or `BLOCKMESH_SERVER`), else `--remote NAME` (or `BLOCKMESH_REMOTE`, or the current
//! remote; see [`blockmesh::remotes`]), else `http://127.0.0.1:32607`. The key is `BLOCKMESH_API_KEY`, else the
//! remote's, else the `api-key` file of `--data-dir` (the daemon's data directory, default as for `serve`).
//! `-o json` prints the API's JSON; otherwise output is for people. Exit codes: 0 done, 1 error, 2 bad usage.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use blockmesh::api::{
    self, dot_path, BranchRequest, CheckoutRequest, CloneRequest, Commit, CommitBody, DiffExtent, Dot, GcResult,
    InitRequest, PendingReceive, PoolStatus, QosRequest, Received, ResetRequest, ResizeRequest, ScrubResult,
    ServerInfo, TransferRequest,
};
use blockmesh::api_client::{ApiClient, CallError, Hints, Limits};
use blockmesh::qos::QosLimits;
use blockmesh::remotes::{self, Remote, Remotes};
use blockmesh::size::{format_size, parse_size};
use blockmesh::transfer::{self, short, Direction, Event, Observer, Progress, Stop, SyncSummary};
use blockmesh_engine::DEFAULT_SUBDOT;
use clap::{Subcommand, ValueEnum};
use serde::Serialize;

/// How long the client waits for the daemon to answer one call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long it waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stream (send, receive) may stall before the client gives up.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Human,
    /// The API's JSON.
    Json,
}

/// Where the daemon is and how to talk to it; every client subcommand takes these.
#[derive(clap::Args, Debug)]
pub struct Conn {
    /// The daemon's control API [default: the current remote's, else http://127.0.0.1:32607].
    #[arg(long, env = "BLOCKMESH_SERVER", global = true)]
    server: Option<String>,
    /// A daemon named with `blockmesh remote add` (`local`: the local daemon) [default: the current remote].
    #[arg(long, env = "BLOCKMESH_REMOTE", global = true, conflicts_with = "server")]
    remote: Option<String>,
    /// The daemon's data directory, to read its api-key file (when BLOCKMESH_API_KEY is not set).
    #[arg(long, env = "BLOCKMESH_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// A PEM file with the CA (or the self-signed certificate) that an https:// daemon's API is trusted by
    /// [default: the remote's, else the usual web roots].
    #[arg(long, env = "BLOCKMESH_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "human", global = true)]
    output: Output,
}

/// One limit on the command line: a number (or size, for bytes), or `none` to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitArg {
    Set(u64),
    Remove,
}

fn parse_count_limit(s: &str) -> Result<LimitArg, String> {
    if s == "none" {
        return Ok(LimitArg::Remove);
    }
    s.parse::<u64>().map(LimitArg::Set).map_err(|_| format!("{s:?} is not a whole number (or `none`)"))
}

fn parse_bytes_limit(s: &str) -> Result<LimitArg, String> {
    if s == "none" {
        return Ok(LimitArg::Remove);
    }
    parse_size(s).map(LimitArg::Set)
}

/// Quality-of-service limits on the command line.
#[derive(clap::Args, Debug, Default)]
pub struct QosArgs {
    /// Operations per second, reads and writes together.
    #[arg(long, value_parser = parse_count_limit)]
    iops: Option<LimitArg>,
    /// Read operations per second.
    #[arg(long, value_parser = parse_count_limit)]
    read_iops: Option<LimitArg>,
    /// Write operations (writes, trims, write-zeroes) per second.
    #[arg(long, value_parser = parse_count_limit)]
    write_iops: Option<LimitArg>,
    /// Bytes per second, read and written together (e.g. 50M).
    #[arg(long, value_parser = parse_bytes_limit)]
    bps: Option<LimitArg>,
    /// Bytes read per second.
    #[arg(long, value_parser = parse_bytes_limit)]
    read_bps: Option<LimitArg>,
    /// Bytes written per second.
    #[arg(long, value_parser = parse_bytes_limit)]
    write_bps: Option<LimitArg>,
    /// Burst allowance: what the rate allows in this many milliseconds may pass at once [default: 1000].
    #[arg(long, value_parser = parse_count_limit)]
    burst_ms: Option<LimitArg>,
}

impl QosArgs {
    fn is_empty(&self) -> bool {
        [self.iops, self.read_iops, self.write_iops, self.bps, self.read_bps, self.write_bps, self.burst_ms]
            .iter()
            .all(Option::is_none)
    }

    /// `base` with these changes.
    fn apply(&self, mut base: QosLimits) -> QosLimits {
        let set = |field: &mut Option<u64>, arg: Option<LimitArg>| match arg {
            Some(LimitArg::Set(v)) => *field = Some(v),
            Some(LimitArg::Remove) => *field = None,
            None => {}
        };
        set(&mut base.iops, self.iops);
        set(&mut base.read_iops, self.read_iops);
        set(&mut base.write_iops, self.write_iops);
        set(&mut base.bytes_per_sec, self.bps);
        set(&mut base.read_bytes_per_sec, self.read_bps);
        set(&mut base.write_bytes_per_sec, self.write_bps);
        set(&mut base.burst_ms, self.burst_ms);
        base
    }
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Create a dot (a versioned set of volumes); `mydb` means `admin/mydb`.
    Init {
        dot: String,
        /// Size of each subdot.
        #[arg(long, default_value = "10G", value_parser = parse_size)]
        size: u64,
        /// A named subdot (repeat for several); one unnamed subdot when none is given.
        #[arg(long = "subdot")]
        subdots: Vec<String>,
        /// Quality-of-service limits for every subdot (as `blockmesh qos`).
        #[command(flatten)]
        qos: QosArgs,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show or change a subdot's quality-of-service limits (`dot` or `dot.subdot`): IOPS and bytes per second, for
    /// reads, writes or both, with a burst allowance. Given limits are added to the ones kept (`none` removes one;
    /// `--clear` all); they apply at once to open NBD connections and are kept in the pool.
    Qos {
        target: String,
        #[command(flatten)]
        limits: QosArgs,
        /// Remove every limit of the subdot (before applying any given).
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the dots.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// This client's version and the daemon's, and a newer one when the daemon checks for upgrades and found one.
    Version {
        #[command(flatten)]
        conn: Conn,
    },
    /// Commit every subdot of a dot at once.
    Commit {
        dot: String,
        /// The commit message.
        #[arg(short, long)]
        message: String,
        /// Who commits [default: $USER].
        #[arg(long)]
        author: Option<String>,
        /// Metadata as KEY=VALUE (repeat for several).
        #[arg(long = "meta", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The commits of a branch, newest first.
    Log {
        dot: String,
        /// The branch [default: the current one].
        #[arg(long)]
        branch: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the branches, or create one.
    Branch {
        dot: String,
        /// The branch to create.
        new: Option<String>,
        /// Commit (id, prefix or branch) to start it from [default: the current branch's head].
        #[arg(long, requires = "new")]
        from: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Switch the dot's current branch (what its NBD export serves to new connections). Refused while NBD clients
    /// are connected to the dot's head, unless --force.
    Checkout {
        dot: String,
        branch: String,
        /// Close the connections of NBD clients using the dot's head.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a branch head back to a commit, discarding later uncommitted writes.
    Reset {
        dot: String,
        /// The commit (id, prefix or branch) to reset to.
        #[arg(long)]
        hard: String,
        /// The branch to reset [default: the current one].
        #[arg(long)]
        branch: Option<String>,
        /// Close the connections of NBD clients using the dot's head.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Clone a commit (`dot@commit`, or the current head of `dot`) into a new dot.
    Clone {
        source: String,
        new_dot: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// What changed between two commits, or between a commit and the live head.
    Diff {
        dot: String,
        from: String,
        to: Option<String>,
        /// Only this subdot.
        #[arg(long)]
        subdot: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a dot with all its branches and commits.
    Delete {
        dot: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
        /// Close the connections of NBD clients using the dot.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the NBD URI of `dot[.subdot][@commit]` (commits are served read-only).
    ExportUri {
        target: String,
        /// The daemon's Unix socket instead of TCP.
        #[arg(long)]
        unix: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Grow (or shrink) a subdot's head on the current branch: `dot` or `dot.subdot`.
    Resize {
        target: String,
        /// The new size (e.g. 20G).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Shrink even when that drops written data.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a commit as a stream (whole, or since --from) to standard output or --file, for `blockmesh receive`.
    Send {
        dot: String,
        /// The commit (id, prefix or branch).
        commit: String,
        /// Send only what changed since this commit (the receiver must have it).
        #[arg(long)]
        from: Option<String>,
        /// Write the stream here instead of standard output.
        #[arg(long, short)]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Apply a stream made by `blockmesh send` (from FILE or standard input). An interrupted receive resumes where
    /// it stopped when run again with the same stream.
    Receive {
        file: Option<PathBuf>,
        /// Start over instead of resuming an interrupted receive of the same commit.
        #[arg(long)]
        restart: bool,
        /// Drop what an interrupted receive of this commit kept, instead of receiving.
        #[arg(long, value_name = "COMMIT", conflicts_with_all = ["file", "restart"])]
        abort: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Send a branch's commits that the remote lacks (only those, incrementally, oldest first); the first push of a
    /// dot sends its first commit whole. The local daemon sends them to the remote daemon itself, so it must reach
    /// the remote's URL (--relay: through this client instead). Refused when the remote's branch has commits this
    /// one lacks, unless --force. An interrupted push resumes on the next one.
    Push {
        /// The remote daemon (see `blockmesh remote add`).
        #[arg(value_name = "REMOTE")]
        to: String,
        dot: String,
        /// The branch [default: the dot's current branch].
        #[arg(long)]
        branch: Option<String>,
        /// Move the remote's branch to this one's head even when the histories have diverged (its own commits then
        /// stay only where another branch holds them) or it has uncommitted writes; NBD clients of that head there
        /// are disconnected.
        #[arg(long)]
        force: bool,
        /// Carry the data through this client (which must reach both daemons) instead of daemon to daemon: for a
        /// local daemon that cannot reach the remote.
        #[arg(long)]
        relay: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Fetch a branch's commits that this daemon lacks from a remote (the reverse of push): the local daemon asks the
    /// remote daemon for them itself, so it must reach the remote's URL (--relay: through this client instead).
    Pull {
        /// The remote daemon (see `blockmesh remote add`).
        #[arg(value_name = "REMOTE")]
        from: String,
        dot: String,
        /// The branch [default: the remote dot's current branch].
        #[arg(long)]
        branch: Option<String>,
        /// Move this daemon's branch to the remote's head even when the histories have diverged (its own commits
        /// then stay only where another branch holds them) or it has uncommitted writes; NBD clients of that head
        /// here are disconnected.
        #[arg(long)]
        force: bool,
        /// Carry the data through this client (which must reach both daemons) instead of daemon to daemon: for a
        /// local daemon that cannot reach the remote.
        #[arg(long)]
        relay: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// The pool.
    Pool {
        #[command(subcommand)]
        what: PoolCommand,
    },
    /// Named daemons (URL and API key) to use with --remote, or as the current remote.
    Remote {
        #[command(subcommand)]
        what: RemoteCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// Add (or replace) a remote; the key comes from --key-file, or standard input. Checks that the daemon answers
    /// with that key.
    Add {
        name: String,
        /// Its control API, e.g. http://10.0.0.5:32607.
        url: String,
        /// A file holding its API key (the daemon's DATA_DIR/api-key) [default: read the key from standard input].
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A PEM file with the CA (or the self-signed certificate) its https:// API is trusted by.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Do not check that the daemon answers.
        #[arg(long)]
        no_check: bool,
        #[arg(short, long, value_enum, default_value = "human")]
        output: Output,
    },
    /// List the remotes (the current one marked).
    List {
        #[arg(short, long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Make a remote the current one (`local`: the local daemon).
    Use { name: String },
    /// Forget a remote.
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// Space and counts.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Run the segment cleaner now: space that overwrites, trims and deleted commits left dead comes back as free
    /// segments (the daemon also cleans by itself when free space runs low).
    Gc {
        #[command(flatten)]
        conn: Conn,
    },
    /// Read every block the pool references and verify its checksum; lists each bad block and who uses it (exit 1
    /// when any is bad). Repairs nothing.
    Scrub {
        #[command(flatten)]
        conn: Conn,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A connection to the daemon's API, and how to print its answers.
struct Api {
    http: ApiClient,
    output: Output,
}

impl std::ops::Deref for Api {
    type Target = ApiClient;

    fn deref(&self) -> &ApiClient {
        &self.http
    }
}

/// What to check when a daemon named by --server, a remote or the default cannot be reached.
const LOCAL_UNREACHABLE: &str = "; is `blockmesh serve` running? (--server or BLOCKMESH_SERVER)";

/// Where the daemon is when nothing says otherwise.
const DEFAULT_SERVER: &str = "http://127.0.0.1:32607";

fn load_remotes() -> Result<(PathBuf, Remotes)> {
    let path = remotes::config_path().context("no configuration directory: set HOME or BLOCKMESH_CONFIG")?;
    let r = Remotes::load(&path).with_context(|| format!("reading the remotes in {}", path.display()))?;
    Ok((path, r))
}

impl Api {
    fn new(conn: &Conn) -> Result<Self> {
        // The daemon: --server, else the named or current remote, else the local default.
        let config = match remotes::config_path() {
            Some(p) => Remotes::load(&p).with_context(|| format!("reading the remotes in {}", p.display()))?,
            None => Remotes::default(),
        };
        let (server, remote) = match &conn.server {
            Some(url) => {
                let r = config.remotes.iter().find(|(_, r)| r.url.trim_end_matches('/') == url.trim_end_matches('/'));
                (url.clone(), r.map(|(n, r)| (n.clone(), r.clone())))
            }
            None => match config.pick(conn.remote.as_deref()).map_err(|e| anyhow!(e))? {
                Some((name, r)) => (r.url.clone(), Some((name.to_string(), r.clone()))),
                None => (DEFAULT_SERVER.to_string(), None),
            },
        };
        let ca = conn.ca_cert.clone().or_else(|| remote.as_ref().and_then(|(_, r)| r.ca_cert.clone()));
        // The key: BLOCKMESH_API_KEY, else the remote's, else the local daemon's key file.
        let (key, source) = match std::env::var("BLOCKMESH_API_KEY") {
            Ok(k) if !k.trim().is_empty() => (k.trim().to_string(), "BLOCKMESH_API_KEY".to_string()),
            _ => match remote {
                Some((name, r)) => (r.key, remote_key_source(&name)),
                None => {
                    let dir = conn.data_dir.clone().unwrap_or_else(crate::default_data_dir);
                    let path = api::key_path(&dir);
                    let key = std::fs::read_to_string(&path).map(|k| k.trim().to_string()).with_context(|| {
                        format!(
                            "no API key: set BLOCKMESH_API_KEY, add the daemon as a remote (blockmesh remote add), \
                             or point --data-dir at the daemon's data directory (could not read {})",
                            path.display()
                        )
                    })?;
                    (key, format!("{} (--data-dir)", path.display()))
                }
            },
        };
        Self::with(&server, key, &source, conn.output, ca.as_deref(), LOCAL_UNREACHABLE)
    }

    /// A client of the API at `server`; `key_source`: where `key` came from; `ca`: the PEM file its certificate is
    /// trusted by (https); `unreachable`: what to check when it cannot be reached.
    fn with(
        server: &str,
        key: String,
        key_source: &str,
        output: Output,
        ca: Option<&Path>,
        unreachable: &str,
    ) -> Result<Self> {
        let tls = match ca {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("reading the CA certificate {}", ca.display()))?;
                Some(blockmesh::api_client::trusting(&pem, &ca.display().to_string()).map_err(|e| anyhow!(e))?)
            }
            None => None,
        };
        let hints = Hints {
            key_source: key_source.to_string(),
            key_fix: " (BLOCKMESH_API_KEY, --data-dir, or blockmesh remote add --key-file)".to_string(),
            unreachable: unreachable.to_string(),
        };
        let limits =
            Limits { connect: CONNECT_TIMEOUT, call: REQUEST_TIMEOUT, stream_idle: STREAM_IDLE_TIMEOUT, redirects: 5 };
        Ok(Self { http: ApiClient::new(server, key, hints, limits, tls), output })
    }

    /// Prints `value` as JSON under `-o json`; returns true if it did.
    fn json(&self, value: &impl Serialize) -> Result<bool> {
        if self.output == Output::Json {
            println!("{}", serde_json::to_string_pretty(value)?);
            return Ok(true);
        }
        Ok(false)
    }
}

/// Where a remote's key comes from, for the error a wrong one gets.
fn remote_key_source(name: &str) -> String {
    format!("remote {name}'s stored key (blockmesh remote add {name} ...)")
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn format_time(secs: u64) -> String {
    let t = blockmesh::utc::utc(secs);
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

/// `dot` or `dot.subdot`: the dot, and the subdot after its last '.' (checked to exist).
fn dot_and_subdot(api: &Api, target: &str) -> Result<(Dot, Option<String>)> {
    let (dot, subdot) = match api.get::<Dot>(&dot_path(target)) {
        Ok(d) => (d, None),
        Err(e) => match target.rsplit_once('.') {
            Some((d, s)) => (api.get::<Dot>(&dot_path(d)).map_err(|_| e)?, Some(s.to_string())),
            None => return Err(e.into()),
        },
    };
    if let Some(s) = &subdot {
        if !dot.subdots.iter().any(|x| &x.name == s) {
            bail!("{} has no subdot {s}", dot.name);
        }
    }
    Ok((dot, subdot))
}

/// A progress bar on standard error when it is a terminal (hidden otherwise), counting bytes up to `total`.
fn progress_bar(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
    } else {
        "{msg} {spinner} {bytes} {binary_bytes_per_sec}"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

fn send(api: &Api, dot: &str, commit: &str, from: Option<&str>, file: Option<&std::path::Path>) -> Result<()> {
    use std::io::Write;
    if file.is_none() && std::io::stdout().is_terminal() {
        bail!("a stream is binary: redirect it (blockmesh send {dot} {commit} > FILE) or pass --file FILE");
    }
    let mut path = format!("{}/send?commit={commit}", dot_path(dot));
    if let Some(b) = from {
        path.push_str(&format!("&from={b}"));
    }
    let (res, total) = api.get_stream(&path)?;
    let id = res.header("x-blockmesh-commit").unwrap_or(commit).to_string();
    let mut out: Box<dyn Write> = match file {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let bar = progress_bar(total, &format!("send {}", short(&id)));
    let copied = std::io::copy(&mut bar.wrap_read(res.into_reader()), &mut out);
    bar.finish_and_clear();
    let copied = copied.context("copying the stream")?;
    out.flush().context("writing the stream")?;
    if let Some(t) = total.filter(|t| *t != copied) {
        bail!("the stream ended after {copied} of {t} bytes: the daemon failed while sending (see its log)");
    }
    if api.output == Output::Json {
        eprintln!("{}", serde_json::json!({ "commit": id, "stream_bytes": copied }));
    } else {
        eprintln!("sent commit {id} of {}: {}", api::qualify(dot), format_size(copied));
    }
    Ok(())
}

fn receive(api: &Api, file: Option<&std::path::Path>, restart: bool) -> Result<()> {
    use std::io::{Read, Seek};
    let (mut input, total): (Box<dyn Read>, Option<u64>) = match file {
        Some(p) => {
            let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            f.rewind()?;
            (Box::new(f), len)
        }
        None if std::io::stdin().is_terminal() => {
            bail!("no stream: name a file (blockmesh receive FILE) or pipe one in (blockmesh receive < FILE)")
        }
        None => (Box::new(std::io::stdin().lock()), None),
    };
    let head = blockmesh_engine::read_stream_head(&mut input).map_err(|e| anyhow!("{e}"))?;
    let commit = head.commit.to_string();
    let pending: Vec<PendingReceive> = api.get("/v1/receives")?;
    let resume = pending.iter().find(|p| p.commit == commit).map(|p| p.resume_at_bytes);
    let mut path = "/v1/receive".to_string();
    let mut start = 0;
    match resume {
        Some(at) if !restart => {
            // the daemon has the stream up to `at`: skip to there (the head goes again)
            let skip = at.saturating_sub(head.bytes.len() as u64);
            let skipped = std::io::copy(&mut (&mut input).take(skip), &mut std::io::sink())?;
            if skipped != skip {
                bail!("this stream is shorter ({} bytes) than what the daemon already has of it ({at})", skipped);
            }
            path.push_str(&format!("?offset={at}"));
            start = at;
            if api.output == Output::Human {
                eprintln!("resuming the receive of commit {commit} at byte {at}");
            }
        }
        _ => {}
    }
    let bar = progress_bar(total, &format!("receive {}", short(&commit)));
    bar.set_position(start);
    let body = std::io::Cursor::new(head.bytes.clone()).chain(input);
    let res = api.post_stream(&path, bar.wrap_read(body));
    bar.finish_and_clear();
    let got: Received = match res {
        Ok(r) => r.into_json().context("reading the answer to the receive")?,
        Err(e) => {
            // say where a retry would start, if the daemon kept anything
            let kept: Vec<PendingReceive> = api.get("/v1/receives").unwrap_or_default();
            if let Some(p) = kept.iter().find(|p| p.commit == commit) {
                return Err(anyhow::Error::from(e).context(format!(
                    "the daemon kept the stream up to byte {}: run the same command again to resume, or \
                     `blockmesh receive --abort {commit}` to drop it",
                    p.resume_at_bytes
                )));
            }
            return Err(e.into());
        }
    };
    if !api.json(&got)? {
        println!(
            "received commit {} of {} ({} of data in {} records)",
            got.commit,
            got.dot,
            format_size(got.data_bytes),
            got.records
        );
    }
    Ok(())
}

fn remote(what: RemoteCommand) -> Result<()> {
    let (path, mut config) = load_remotes()?;
    match what {
        RemoteCommand::Add { name, url, key_file, ca_cert, no_check, output } => {
            remotes::validate_name(&name).map_err(|e| anyhow!(e))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("{url} is not an http:// or https:// URL of a daemon's control API");
            }
            let key = match key_file {
                Some(f) => {
                    std::fs::read_to_string(&f).with_context(|| format!("reading the key in {}", f.display()))?
                }
                None => {
                    if std::io::stdin().is_terminal() {
                        eprint!("API key of {url} (its DATA_DIR/api-key): ");
                    }
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line
                }
            };
            let key = key.trim().to_string();
            if key.is_empty() {
                bail!("no API key given: pass --key-file or type the key");
            }
            let ca_cert = ca_cert
                .map(|f| std::fs::canonicalize(&f).with_context(|| format!("finding {}", f.display())))
                .transpose()?;
            if !no_check {
                let api = Api::with(&url, key.clone(), "the key given", output, ca_cert.as_deref(), LOCAL_UNREACHABLE)?;
                let _: ServerInfo = api.get("/v1/info").with_context(|| format!("checking {url} with that key"))?;
            }
            let replaced = config.remotes.insert(name.clone(), Remote { url: url.clone(), key, ca_cert }).is_some();
            config.save(&path).with_context(|| format!("writing {}", path.display()))?;
            if output == Output::Json {
                println!("{}", serde_json::json!({ "name": name, "url": url }));
            } else {
                println!(
                    "{} remote {name} at {url}; use it with --remote {name}, or make it current: blockmesh remote use {name}",
                    if replaced { "replaced" } else { "added" }
                );
            }
        }
        RemoteCommand::List { output } => {
            let current = config.current.clone().unwrap_or_else(|| remotes::LOCAL.to_string());
            if output == Output::Json {
                let list: Vec<serde_json::Value> = config
                    .remotes
                    .iter()
                    .map(|(n, r)| serde_json::json!({ "name": n, "url": r.url, "current": *n == current }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mark = |n: &str| if n == current { "*" } else { " " };
                println!("{} {:<16} (the local daemon, --data-dir's key)", mark(remotes::LOCAL), remotes::LOCAL);
                for (n, r) in &config.remotes {
                    println!("{} {n:<16} {}", mark(n), r.url);
                }
            }
        }
        RemoteCommand::Use { name } => {
            if name != remotes::LOCAL {
                config.pick(Some(&name)).map_err(|e| anyhow!(e))?;
            }
            config.current = (name != remotes::LOCAL).then(|| name.clone());
            config.save(&path).with_context(|| format!("writing {}", path.display()))?;
            println!("current remote: {name}");
        }
        RemoteCommand::Remove { name } => {
            if config.remotes.remove(&name).is_none() {
                bail!("no remote named {name}");
            }
            if config.current.as_deref() == Some(name.as_str()) {
                config.current = None;
            }
            config.save(&path).with_context(|| format!("writing {}", path.display()))?;
            println!("removed remote {name}");
        }
    }
    Ok(())
}

/// The remote named `name` (not `local`): its name and configuration.
fn named_remote(name: &str) -> Result<(String, Remote)> {
    let (_, config) = load_remotes()?;
    match config.pick(Some(name)).map_err(|e| anyhow!(e))? {
        Some((n, r)) => Ok((n.to_string(), r.clone())),
        None => bail!("{name} means the local daemon; push and pull need a remote (blockmesh remote add)"),
    }
}

/// The API of the remote `name`.
fn remote_api(name: &str, r: &Remote, output: Output) -> Result<Api> {
    let source = remote_key_source(name);
    let unreachable = format!(
        "; is it running, and can this client reach it? (--relay carries the data through this client; without it \
         the local daemon reaches remote {name} itself)"
    );
    Api::with(&r.url, r.key.clone(), &source, output, r.ca_cert.as_deref(), &unreachable)
}

/// A push or pull as the command line asks for it.
struct Transfer<'a> {
    direction: Direction,
    /// The remote's name.
    remote: &'a str,
    dot: &'a str,
    branch: Option<String>,
    force: bool,
    /// Through this client rather than daemon to daemon.
    relay: bool,
}

/// Push or pull: by the local daemon, the data going daemon to daemon, or with --relay through this client (the
/// same algorithm, [`transfer::sync`], run here over both daemons' APIs).
fn push_or_pull(t: &Transfer<'_>, conn: &Conn) -> Result<()> {
    let local = Api::new(conn)?;
    let (name, remote) = named_remote(t.remote)?;
    let mut bars = Bars { direction: t.direction, current: None };
    let summary = if t.relay {
        let there = remote_api(&name, &remote, conn.output)?;
        let (src, dst) = match t.direction {
            Direction::Push => (&local.http, &there.http),
            Direction::Pull => (&there.http, &local.http),
        };
        let order = transfer::Order { dot: t.dot, branch: t.branch.as_deref(), direction: t.direction, force: t.force };
        transfer::sync(src, dst, order, &mut bars)?
    } else {
        by_the_daemon(&local, t, &name, &remote, &mut bars)?
    };
    bars.clear();
    let done = match t.direction {
        Direction::Push => "pushed",
        Direction::Pull => "pulled",
    };
    print_sync(&local, &summary, done, t.remote)
}

/// Asks the local daemon to push to or pull from `remote` itself (`POST .../push`, `.../pull`), showing its progress
/// lines on `bars`; its summary.
fn by_the_daemon(local: &Api, t: &Transfer<'_>, name: &str, remote: &Remote, bars: &mut Bars) -> Result<SyncSummary> {
    let what = t.direction.verb();
    let ca_cert_pem = match &remote.ca_cert {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading remote {name}'s CA certificate {}", p.display()))?,
        ),
        None => None,
    };
    let req = TransferRequest {
        url: remote.url.clone(),
        api_key: remote.key.clone(),
        ca_cert_pem,
        branch: t.branch.clone(),
        force: t.force,
    };
    let res = local.post_long(&format!("{}/{what}", dot_path(t.dot)), Some(&req)).map_err(|e| match e {
        // the remote could not be reached, refused the key or failed: what the local daemon was given for it
        CallError::Status { status: 502, text } => anyhow!(
            "{text}; the local daemon at {} used remote {name}'s URL ({}) and remote {name}'s stored key \
             (`blockmesh remote add {name} URL --key-file FILE` replaces them)",
            local.base(),
            remote.url
        ),
        e => e.into(),
    })?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(res.into_reader())) {
        let line = line.with_context(|| {
            format!("the local daemon's answer broke off; run the {what} again to go on from where it stopped")
        })?;
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Progress(p)) => {
                let _ = bars.progress(&p);
            }
            Ok(Event::Note(text)) => bars.note(&text),
            Ok(Event::Summary(s)) => return Ok(s),
            Ok(Event::Error(e)) => bail!("{e}"),
            // a line only a newer daemon sends
            Err(_) => {}
        }
    }
    bail!("the local daemon's answer ended before the {what} did (see its log); run it again to go on from where it stopped")
}

/// Progress bars of a push or pull on a terminal, one per commit.
struct Bars {
    direction: Direction,
    /// The commit shown, and its bar.
    current: Option<(String, indicatif::ProgressBar)>,
}

impl Bars {
    fn clear(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Bars {
    fn progress(&mut self, p: &Progress) -> Result<(), Stop> {
        if self.current.as_ref().is_none_or(|(c, _)| *c != p.commit) {
            self.clear();
            let bar = progress_bar(p.total, &format!("{} {}", self.direction.verb(), short(&p.commit)));
            self.current = Some((p.commit.clone(), bar));
        }
        if let Some((_, bar)) = &self.current {
            bar.set_position(p.bytes);
        }
        if p.done {
            self.clear();
        }
        Ok(())
    }

    fn note(&mut self, text: &str) {
        self.clear();
        eprintln!("note: {text}");
    }
}

fn print_sync(api: &Api, s: &SyncSummary, what: &str, remote: &str) -> Result<()> {
    if api.json(s)? {
        return Ok(());
    }
    if s.commits.is_empty() && s.forced_from.is_none() {
        println!("{} {} is up to date with {remote}", s.dot, s.branch);
    } else {
        println!(
            "{what} {} commit{} of {} {} ({} in {:.1} s)",
            s.commits.len(),
            if s.commits.len() == 1 { "" } else { "s" },
            s.dot,
            s.branch,
            format_size(s.bytes),
            s.seconds
        );
    }
    if let Some(old) = &s.forced_from {
        println!(
            "forced: {} moved from {} to {}{}",
            s.branch,
            short(old),
            short(&s.head),
            if s.diverged { "; the commits only it held are on no branch now (still there by id)" } else { "" }
        );
    }
    Ok(())
}

fn total_size(d: &Dot) -> u64 {
    d.subdots.iter().map(|s| s.size_bytes).sum()
}

pub fn run(cmd: ClientCommand) -> Result<()> {
    match cmd {
        ClientCommand::Init { dot, size, subdots, qos, conn } => {
            let api = Api::new(&conn)?;
            let qos = (!qos.is_empty()).then(|| qos.apply(QosLimits::default()));
            let d: Dot = api.post("/v1/dots", InitRequest { name: dot, size_bytes: size, subdots, qos })?;
            if !api.json(&d)? {
                let info: ServerInfo = api.get("/v1/info")?;
                println!(
                    "created dot {} ({} subdot{}, {} each) on branch {}",
                    d.name,
                    d.subdots.len(),
                    if d.subdots.len() == 1 { "" } else { "s" },
                    format_size(size),
                    d.current_branch
                );
                for (subdot, l) in &d.qos {
                    println!("QoS of {subdot}: {}", l.describe());
                }
                println!("write to it over NBD: nbd://{}/{}", info.nbd_listen, d.name);
            }
        }
        ClientCommand::Qos { target, limits, clear, conn } => {
            let api = Api::new(&conn)?;
            let (dot, subdot) = dot_and_subdot(&api, &target)?;
            let path = format!("{}/qos", dot_path(&dot.name));
            let mut all: std::collections::BTreeMap<String, QosLimits> = api.get(&path)?;
            let subdot_name = subdot.clone().unwrap_or_else(|| DEFAULT_SUBDOT.to_string());
            if clear || !limits.is_empty() {
                let base =
                    if clear { QosLimits::default() } else { all.get(&subdot_name).copied().unwrap_or_default() };
                all = api.put(&path, QosRequest { subdot: subdot.clone(), limits: limits.apply(base) })?;
            }
            let mine = all.get(&subdot_name).copied().unwrap_or_default();
            if !api.json(&mine)? {
                println!("{}.{subdot_name}: {}", dot.name, mine.describe());
            }
        }
        ClientCommand::Version { conn } => {
            let api = Api::new(&conn)?;
            let info: ServerInfo = api.get("/v1/info")?;
            #[derive(Serialize)]
            struct Versions<'a> {
                client: &'a str,
                server: &'a ServerInfo,
            }
            let mine = env!("CARGO_PKG_VERSION");
            if !api.json(&Versions { client: mine, server: &info })? {
                println!("client: {mine}");
                println!("server: {}", info.version);
                if let Some(v) = &info.latest_version {
                    let at = info.latest_download_url.as_deref().map(|u| format!(": {u}")).unwrap_or_default();
                    println!("a newer version is available: {v}{at}");
                }
            }
        }
        ClientCommand::List { conn } => {
            let api = Api::new(&conn)?;
            let dots: Vec<Dot> = api.get("/v1/dots")?;
            if !api.json(&dots)? {
                if dots.is_empty() {
                    println!("no dots yet: `blockmesh init mydb` creates one");
                }
                let w = dots.iter().map(|d| d.name.len()).max().unwrap_or(4).max(4);
                if !dots.is_empty() {
                    println!(
                        "{:<w$}  {:<16} {:>7} {:>9} {:>9} {:>12}  QOS",
                        "DOT", "BRANCH", "COMMITS", "SIZE", "WRITTEN", "COMMITS ONLY"
                    );
                }
                for d in &dots {
                    let space = d.space.unwrap_or_default();
                    let qos = match d.qos.len() {
                        0 => "-".to_string(),
                        _ => d
                            .qos
                            .iter()
                            .map(
                                |(s, l)| {
                                    if s == DEFAULT_SUBDOT {
                                        l.describe()
                                    } else {
                                        format!("{s}: {}", l.describe())
                                    }
                                },
                            )
                            .collect::<Vec<_>>()
                            .join("; "),
                    };
                    println!(
                        "{:<w$}  {:<16} {:>7} {:>9} {:>9} {:>12}  {qos}",
                        d.name,
                        d.current_branch,
                        d.commits,
                        format_size(total_size(d)),
                        format_size(space.written_bytes),
                        format_size(space.commits_only_bytes)
                    );
                }
            }
        }
        ClientCommand::Commit { dot, message, author, metadata, conn } => {
            let api = Api::new(&conn)?;
            let author = author.or_else(|| std::env::var("USER").ok());
            let c: Commit = api.post(
                &format!("{}/commits", dot_path(&dot)),
                CommitBody { message, author, metadata: metadata.into_iter().collect() },
            )?;
            if !api.json(&c)? {
                println!("committed {} on {} of {}: {}", c.id, c.branch, api::qualify(&dot), c.message);
            }
        }
        ClientCommand::Log { dot, branch, conn } => {
            let api = Api::new(&conn)?;
            let q = branch.map(|b| format!("?branch={b}")).unwrap_or_default();
            let commits: Vec<Commit> = api.get(&format!("{}/commits{q}", dot_path(&dot)))?;
            if !api.json(&commits)? {
                if commits.is_empty() {
                    println!("no commits yet: `blockmesh commit {dot} -m MESSAGE` makes one");
                }
                for c in &commits {
                    println!("commit {} ({})", c.id, c.branch);
                    println!("Author: {}", c.author);
                    println!("Date:   {}", format_time(c.time_unix_secs));
                    for (k, v) in &c.metadata {
                        println!("{k}: {v}");
                    }
                    println!();
                    for line in c.message.lines() {
                        println!("    {line}");
                    }
                    println!();
                }
            }
        }
        ClientCommand::Branch { dot, new, from, conn } => {
            let api = Api::new(&conn)?;
            let d: Dot = match new {
                Some(name) => api.post(&format!("{}/branches", dot_path(&dot)), BranchRequest { name, from })?,
                None => api.get(&dot_path(&dot))?,
            };
            if !api.json(&d)? {
                for b in &d.branches {
                    let mark = if b.name == d.current_branch { "*" } else { " " };
                    let head = b.head.as_deref().map(short).unwrap_or("(no commits)");
                    println!("{mark} {:<20} {head}", b.name);
                }
            }
        }
        ClientCommand::Checkout { dot, branch, force, conn } => {
            let api = Api::new(&conn)?;
            let d: Dot = api.post(&format!("{}/checkout", dot_path(&dot)), CheckoutRequest { branch, force })?;
            if !api.json(&d)? {
                println!("{} is now on branch {}", d.name, d.current_branch);
            }
        }
        ClientCommand::Reset { dot, hard, branch, force, conn } => {
            let api = Api::new(&conn)?;
            let d: Dot =
                api.post(&format!("{}/reset", dot_path(&dot)), ResetRequest { branch, commit: hard.clone(), force })?;
            if !api.json(&d)? {
                println!("reset {} to {hard}", d.name);
            }
        }
        ClientCommand::Clone { source, new_dot, conn } => {
            let api = Api::new(&conn)?;
            let (dot, commit) = match source.split_once('@') {
                Some((d, c)) => (d.to_string(), Some(c.to_string())),
                None => (source.clone(), None),
            };
            let d: Dot = api.post(&format!("{}/clone", dot_path(&dot)), CloneRequest { commit, new_dot })?;
            if !api.json(&d)? {
                println!("cloned {source} into {}", d.name);
            }
        }
        ClientCommand::Diff { dot, from, to, subdot, conn } => {
            let api = Api::new(&conn)?;
            let mut q = format!("?from={from}");
            if let Some(t) = &to {
                q.push_str(&format!("&to={t}"));
            }
            if let Some(s) = &subdot {
                q.push_str(&format!("&subdot={s}"));
            }
            let extents: Vec<DiffExtent> = api.get(&format!("{}/diff{q}", dot_path(&dot)))?;
            if !api.json(&extents)? {
                let to = to.as_deref().unwrap_or("the live head");
                if extents.is_empty() {
                    println!("no changes from {from} to {to}");
                }
                for x in &extents {
                    println!("{:<12} {:>14} +{:<10} {}", x.subdot, x.offset_bytes, format_size(x.len_bytes), x.kind);
                }
                if !extents.is_empty() {
                    let total: u64 = extents.iter().map(|x| x.len_bytes).sum();
                    println!("{} changed in {} ranges from {from} to {to}", format_size(total), extents.len());
                }
            }
        }
        ClientCommand::Delete { dot, yes, force, conn } => {
            let api = Api::new(&conn)?;
            let name = api::qualify(&dot);
            if !yes {
                if !std::io::stdin().is_terminal() {
                    bail!("deleting {name} needs confirmation: pass --yes");
                }
                eprint!("delete {name} with all its branches and commits? type its name to confirm: ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim() != name && answer.trim() != dot {
                    bail!("not confirmed; nothing deleted");
                }
            }
            let q = if force { "?force=true" } else { "" };
            let v: serde_json::Value = api.call("DELETE", &format!("{}{q}", dot_path(&dot)), None)?;
            if !api.json(&v)? {
                println!("deleted {name}");
            }
        }
        ClientCommand::ExportUri { target, unix, conn } => {
            let api = Api::new(&conn)?;
            let (head, commit) = match target.split_once('@') {
                Some((h, c)) => (h.to_string(), Some(c.to_string())),
                None => (target.clone(), None),
            };
            let (dot, subdot) = dot_and_subdot(&api, &head)?;
            // The daemon resolves prefixes and branch names; the export name needs the full id.
            let commit = match commit {
                Some(c) => Some(api.get::<Commit>(&format!("{}/commits/{c}", dot_path(&dot.name)))?.id),
                None => None,
            };
            let mut name = dot.name.clone();
            if let Some(s) = subdot {
                name = format!("{name}.{s}");
            }
            if let Some(c) = commit {
                name = format!("{name}@{c}");
            }
            let info: ServerInfo = api.get("/v1/info")?;
            let uri = if unix {
                format!("nbd+unix:///{name}?socket={}", info.nbd_socket)
            } else {
                format!("nbd://{}/{name}", info.nbd_listen)
            };
            if !api.json(&serde_json::json!({ "uri": uri }))? {
                println!("{uri}");
            }
        }
        ClientCommand::Resize { target, size, force, conn } => {
            let api = Api::new(&conn)?;
            let (dot, subdot) = dot_and_subdot(&api, &target)?;
            let d: Dot = api
                .post(&format!("{}/resize", dot_path(&dot.name)), ResizeRequest { subdot, size_bytes: size, force })?;
            if !api.json(&d)? {
                println!("resized {target} to {}", format_size(size));
            }
        }
        ClientCommand::Send { dot, commit, from, file, conn } => {
            send(&Api::new(&conn)?, &dot, &commit, from.as_deref(), file.as_deref())?;
        }
        ClientCommand::Receive { file, restart, abort, conn } => {
            let api = Api::new(&conn)?;
            match abort {
                Some(c) => {
                    let v: serde_json::Value = api.call("DELETE", &format!("/v1/receives/{c}"), None)?;
                    if !api.json(&v)? {
                        println!("dropped the interrupted receive of commit {c}");
                    }
                }
                None => receive(&api, file.as_deref(), restart)?,
            }
        }
        ClientCommand::Remote { what } => remote(what)?,
        ClientCommand::Push { to, dot, branch, force, relay, conn } => {
            let how = Transfer { direction: Direction::Push, remote: &to, dot: &dot, branch, force, relay };
            push_or_pull(&how, &conn)?;
        }
        ClientCommand::Pull { from, dot, branch, force, relay, conn } => {
            let how = Transfer { direction: Direction::Pull, remote: &from, dot: &dot, branch, force, relay };
            push_or_pull(&how, &conn)?;
        }
        ClientCommand::Pool { what: PoolCommand::Scrub { conn } } => {
            let api = Api::new(&conn)?;
            let bar = progress_bar(None, "scrub");
            bar.enable_steady_tick(Duration::from_millis(200));
            let res = api.post_long("/v1/pool/scrub", None::<&()>);
            bar.finish_and_clear();
            let r: ScrubResult = res?.into_json().context("reading the scrub report")?;
            if !api.json(&r)? {
                for b in &r.bad {
                    println!(
                        "bad block at device offset {} (crc32 {:08x}, expected {:08x}), used by:",
                        b.device_offset_bytes, b.found_crc, b.expected_crc
                    );
                    for u in &b.used_by {
                        println!("    {u}");
                    }
                }
                println!("{} blocks verified, {} bad", r.blocks_checked, r.bad.len());
            }
            if !r.bad.is_empty() {
                bail!(
                    "{} blocks fail their checksums: restore what uses them from another copy (receive)",
                    r.bad.len()
                );
            }
        }
        ClientCommand::Pool { what: PoolCommand::Gc { conn } } => {
            let api = Api::new(&conn)?;
            let g: GcResult = api.post("/v1/pool/gc", serde_json::json!({}))?;
            if !api.json(&g)? {
                println!(
                    "freed {} segments ({} copied in {} passes); {} free",
                    g.segments_freed,
                    format_size(g.bytes_moved),
                    g.passes,
                    format_size(g.free_bytes)
                );
            }
        }
        ClientCommand::Pool { what: PoolCommand::Status { conn } } => {
            let api = Api::new(&conn)?;
            let p: PoolStatus = api.get("/v1/pool")?;
            if !api.json(&p)? {
                println!("pool size: {}", format_size(p.pool_size_bytes));
                println!(
                    "used:      {} ({:.1}%)",
                    format_size(p.used_bytes),
                    100.0 * p.used_bytes as f64 / p.pool_size_bytes.max(1) as f64
                );
                println!(
                    "segments:  {} of {} free ({} each)",
                    p.free_segments,
                    p.segments,
                    format_size(p.segment_size_bytes)
                );
                println!("free:      {}", format_size(p.free_bytes));
                println!(
                    "data:      {} written of {} logical; {} held only by commits",
                    format_size(p.space.written_bytes),
                    format_size(p.space.logical_bytes),
                    format_size(p.space.commits_only_bytes)
                );
                println!("reclaimable by `blockmesh pool gc`: {}", format_size(p.reclaimable_bytes));
                println!(
                    "cleaner:   keeps {} segments free when it can; {} background steps; {} free segments emptied \
                     and waiting for a sync; {} background syncs of the log",
                    p.clean_target_free_segments, p.background_clean_steps, p.emptied_segments, p.background_log_syncs
                );
                println!("dots:      {}", p.dots);
                println!("volumes:   {} (and {} commit snapshots)", p.volumes, p.snapshots);
                for r in &p.pending_receives {
                    println!(
                        "interrupted receive: commit {} of {}, {} kept (resume: blockmesh receive the same stream; \
                         drop: blockmesh receive --abort {})",
                        r.commit,
                        r.dot,
                        format_size(r.resume_at_bytes),
                        r.commit
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(1_795_000_000), "2026-11-18 11:06:40 UTC");
    }
}
