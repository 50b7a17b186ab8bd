//! Push and pull: the commits of a dot's branch that one daemon lacks, copied from another, oldest first, each as an
//! incremental send stream from its parent.
//!
//! One algorithm, [`sync`] (in two steps: [`plan`] checks all it can before any data moves, [`run`] moves it), over
//! two [`Side`]s: a daemon reached over its control API ([`ApiClient`]), or, inside the daemon, its own pool (see
//! [`crate::api`]). The daemon runs it for `POST /v1/dots/{ns}/{name}/push` and `.../pull`, so the streams flow
//! between the two daemons only; the client runs it over two API sides for `push --relay` and `pull --relay`, so the
//! streams flow through the client (for daemons that cannot reach each other).
//!
//! The daemon's routes answer with newline-delimited JSON [`Event`]s: [`Event::Progress`] at most every
//! [`PROGRESS_INTERVAL`], maybe an [`Event::Note`], and last exactly one [`Event::Summary`] or [`Event::Error`].

use std::collections::HashSet;
use std::io::Read;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::api::{dot_path, qualify, BranchRequest, Commit, Dot, PendingReceive, ResetRequest};
use crate::api_client::{ApiClient, CallError};

/// Progress lines of a push or pull run by the daemon come at most this often.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Which way the commits go, seen from the side that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From here to the other daemon.
    Push,
    /// From the other daemon to here.
    Pull,
}

impl Direction {
    /// `push` or `pull`.
    pub fn verb(self) -> &'static str {
        match self {
            Direction::Push => "push",
            Direction::Pull => "pull",
        }
    }
}

/// What kind of failure an [`Error`] is (the daemon's routes answer it with a fitting status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is wrong (400).
    BadRequest,
    /// A dot, branch or commit is unknown (404).
    NotFound,
    /// The sides' states refuse it: diverged histories, NBD clients connected, nothing to send (409).
    Conflict,
    /// A daemon could not be reached, or the connection to it broke (502).
    Unreachable,
    /// A daemon refused the key (502).
    Refused,
    /// A daemon answered with another error (502).
    Remote,
    /// Whoever asked for the transfer went away (the daemon's client disconnected).
    Stopped,
    /// Anything else: a failure of this side (500).
    Failed,
}

/// A failed push or pull, or a failed step of one.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    /// What went wrong and, where it can, how to fix it.
    pub message: String,
}

impl Error {
    /// An error of `kind` saying `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// The same error, its message after `what`.
    fn context(self, what: impl std::fmt::Display) -> Self {
        Self { message: format!("{what}: {}", self.message), ..self }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<CallError> for Error {
    fn from(e: CallError) -> Self {
        let kind = match &e {
            CallError::Status { status: 401 | 403, .. } => Kind::Refused,
            CallError::Status { status: 404, .. } => Kind::NotFound,
            CallError::Status { status: 409, .. } => Kind::Conflict,
            CallError::Status { .. } | CallError::Answer(_) => Kind::Remote,
            CallError::Unreachable(_) => Kind::Unreachable,
        };
        Self::new(kind, e.to_string())
    }
}

/// This module's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A commit's send stream, and its length when known.
pub struct Stream {
    pub reader: Box<dyn Read>,
    pub len: Option<u64>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("len", &self.len).finish_non_exhaustive()
    }
}

/// One side of a push or pull: what the algorithm asks of a daemon. Dots are `ns/name`; commits full ids.
pub trait Side {
    /// The dot; an error of kind [`Kind::NotFound`] when this side has no such dot.
    fn dot(&self, dot: &str) -> Result<Dot>;
    /// The commits of a branch, newest first.
    fn log(&self, dot: &str, branch: &str) -> Result<Vec<Commit>>;
    /// Every commit of the dot, on a branch or not.
    fn all_commits(&self, dot: &str) -> Result<Vec<Commit>>;
    /// Interrupted receives that can resume.
    fn pending_receives(&self) -> Result<Vec<PendingReceive>>;
    /// The send stream of `commit` (since `base`, else whole), from byte `offset` on (after its head) when not 0.
    fn send(&self, dot: &str, commit: &str, base: Option<&str>, offset: u64) -> Result<Stream>;
    /// Applies a send stream; with `offset` not 0, resumes the interrupted receive of its commit there.
    fn receive(&self, offset: u64, stream: &mut dyn Read) -> Result<()>;
    /// Creates `branch` at commit `from`.
    fn create_branch(&self, dot: &str, branch: &str, from: &str) -> Result<()>;
    /// Moves `branch` to `commit`; `force` closes the NBD connections to the dot's heads instead of refusing.
    fn reset(&self, dot: &str, branch: &str, commit: &str, force: bool) -> Result<()>;
}

impl Side for ApiClient {
    fn dot(&self, dot: &str) -> Result<Dot> {
        Ok(self.get(&dot_path(dot))?)
    }

    fn log(&self, dot: &str, branch: &str) -> Result<Vec<Commit>> {
        Ok(self.get(&format!("{}/commits?branch={branch}", dot_path(dot)))?)
    }

    fn all_commits(&self, dot: &str) -> Result<Vec<Commit>> {
        Ok(self.get(&format!("{}/commits?all=true", dot_path(dot)))?)
    }

    fn pending_receives(&self) -> Result<Vec<PendingReceive>> {
        Ok(self.get("/v1/receives")?)
    }

    fn send(&self, dot: &str, commit: &str, base: Option<&str>, offset: u64) -> Result<Stream> {
        let mut q = format!("{}/send?commit={commit}", dot_path(dot));
        if let Some(b) = base {
            q.push_str(&format!("&from={b}"));
        }
        if offset > 0 {
            q.push_str(&format!("&offset={offset}"));
        }
        let (res, len) = self.get_stream(&q)?;
        Ok(Stream { reader: Box::new(res.into_reader()), len })
    }

    fn receive(&self, offset: u64, stream: &mut dyn Read) -> Result<()> {
        let path = if offset > 0 { format!("/v1/receive?offset={offset}") } else { "/v1/receive".to_string() };
        self.post_stream(&path, stream)?;
        Ok(())
    }

    fn create_branch(&self, dot: &str, branch: &str, from: &str) -> Result<()> {
        let req = BranchRequest { name: branch.to_string(), from: Some(from.to_string()) };
        let _: Dot = self.post(&format!("{}/branches", dot_path(dot)), req)?;
        Ok(())
    }

    fn reset(&self, dot: &str, branch: &str, commit: &str, force: bool) -> Result<()> {
        let req = ResetRequest { branch: Some(branch.to_string()), commit: commit.to_string(), force };
        let _: Dot = self.post(&format!("{}/reset", dot_path(dot)), req)?;
        Ok(())
    }
}

/// How far one commit's stream is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The commit being sent.
    pub commit: String,
    /// Its place among the commits this transfer sends (1 for the first).
    pub index: usize,
    /// How many commits this transfer sends.
    pub commits: usize,
    /// Bytes of its stream sent so far (by this transfer: a resumed stream starts at 0).
    pub bytes: u64,
    /// Bytes of its stream to send, when known.
    #[serde(default)]
    pub total: Option<u64>,
    /// Its stream is over (sent, or failed).
    #[serde(default)]
    pub done: bool,
}

/// An [`Observer`]'s answer when the transfer should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop;

/// Who watches a transfer: a progress bar, or the daemon's answer to its client.
pub trait Observer {
    /// A commit's stream started (0 bytes), moved on (before each chunk) or ended (`done`); [`Stop`] stops the
    /// transfer before its next chunk (what the receiving side has of the stream stays, for the next run to resume).
    fn progress(&mut self, p: &Progress) -> Result<(), Stop>;
    /// Something the user should know that is not an error (the other side's branch stays behind).
    fn note(&mut self, text: &str);
}

/// One line of the daemon's answer to a push or pull (newline-delimited JSON, externally tagged:
/// `{"progress": {...}}`, `{"note": "..."}`, `{"summary": {...}}`, `{"error": "..."}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Progress(Progress),
    Note(String),
    /// The transfer is done (the last line).
    Summary(SyncSummary),
    /// The transfer failed (the last line).
    Error(String),
}

/// What a push or pull did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncSummary {
    pub dot: String,
    pub branch: String,
    /// The branch's head on the sending side: where the other side's branch is now.
    pub head: String,
    /// Commits sent, oldest first.
    pub commits: Vec<String>,
    /// Stream bytes that crossed (resumed streams count only what was sent again).
    pub bytes: u64,
    pub seconds: f64,
    /// With --force: the other side's branch head that was replaced.
    pub forced_from: Option<String>,
    /// The other side's branch had commits this side's lacks (with --force, they stay only where another branch
    /// holds them).
    pub diverged: bool,
}

/// What a transfer will do, found before any data moves.
#[derive(Debug, Clone)]
pub struct Plan {
    direction: Direction,
    /// `ns/name`, as the sending side names it.
    dot: String,
    branch: String,
    /// The sending side's branch, oldest first (not empty).
    mine: Vec<Commit>,
    /// The first commit of `mine` the receiving side lacks (`mine.len()`: none).
    first_missing: usize,
    /// The receiving side's interrupted receives.
    pending: Vec<PendingReceive>,
    /// That head is not in `mine`.
    diverged: bool,
    force: bool,
    started: Instant,
}

/// The first 12 digits of a commit id.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// What a push or pull is asked for.
#[derive(Debug, Clone, Copy)]
pub struct Order<'a> {
    /// The dot (`ns/name`, or `name` in namespace `admin`).
    pub dot: &'a str,
    /// The branch [default: the sending side's current branch].
    pub branch: Option<&'a str>,
    pub direction: Direction,
    /// Move the receiving side's branch even when the histories have diverged.
    pub force: bool,
}

/// Copy the commits of the ordered dot's branch that `dst` lacks from `src`, oldest first: from the newest commit of
/// the branch that `dst` has (on any branch), each as an incremental stream from its parent; the branch's first
/// commit whole when `dst` has none of them. A stream `dst` holds part of resumes. When `dst`'s branch has commits
/// `src`'s lacks (the histories have diverged) this is refused, unless forced: then, once the commits are over,
/// `dst`'s branch is reset to `src`'s head (closing the NBD connections to that head), like `git push --force`.
pub fn sync(src: &dyn Side, dst: &dyn Side, order: Order<'_>, observer: &mut dyn Observer) -> Result<SyncSummary> {
    let p = plan(src, dst, order)?;
    run(p, src, dst, observer)
}

/// The first step of [`sync`]: every check that needs no data moved (the dot and branch exist on `src`, both sides
/// answer, the histories have not diverged unless forced), and what is to be sent.
pub fn plan(src: &dyn Side, dst: &dyn Side, order: Order<'_>) -> Result<Plan> {
    let Order { dot, branch, direction, force } = order;
    let started = Instant::now();
    let what = direction.verb();
    let src_dot = src.dot(&qualify(dot))?;
    let dot = src_dot.name.clone();
    let branch = branch.map(str::to_string).unwrap_or_else(|| src_dot.current_branch.clone());
    let mut mine = src.log(&dot, &branch)?;
    mine.reverse(); // oldest first
    let Some(head) = mine.last().map(|c| c.id.clone()) else {
        return Err(Error::new(Kind::Conflict, format!("branch {branch} of {dot} has no commits to {what}")));
    };
    let their_dot = match dst.dot(&dot) {
        Ok(d) => Some(d),
        Err(e) if e.kind == Kind::NotFound => None,
        Err(e) => return Err(e),
    };
    let old_head = their_dot.as_ref().and_then(|d| branch_head(d, &branch));
    // their head of the branch must be in our history, or they have commits we lack
    let diverged = old_head.as_ref().filter(|h| !mine.iter().any(|c| &c.id == *h));
    if let (Some(h), false) = (diverged, force) {
        return Err(Error::new(
            Kind::Conflict,
            format!(
                "the other side's {branch} of {dot} is at {}, which this side's {branch} does not have: the \
                 histories have diverged; bring that commit over first (the reverse of this {what}), or reset the \
                 branch there, or {what} with --force to move it to this side's {} (its commits there stay only \
                 where another branch holds them)",
                short(h),
                short(&head)
            ),
        ));
    }
    let diverged = diverged.is_some();
    // the newest commit of our branch they have, on any of their branches or on none (one listing of all of them)
    let theirs: Vec<Commit> = match &their_dot {
        Some(_) => dst.all_commits(&dot)?,
        None => Vec::new(),
    };
    let known: HashSet<&str> = theirs.iter().map(|c| c.id.as_str()).collect();
    let first_missing = mine.iter().rposition(|c| known.contains(c.id.as_str())).map_or(0, |i| i + 1);
    let pending = dst.pending_receives()?;
    Ok(Plan { direction, dot, branch, mine, first_missing, pending, diverged, force, started })
}

/// The head of `branch` in `d`.
fn branch_head(d: &Dot, branch: &str) -> Option<String> {
    d.branches.iter().find(|b| b.name == branch).and_then(|b| b.head.clone())
}

/// The second step of [`sync`]: sends what `plan` found missing, then moves (or creates) the other side's branch.
pub fn run(plan: Plan, src: &dyn Side, dst: &dyn Side, observer: &mut dyn Observer) -> Result<SyncSummary> {
    let what = plan.direction.verb();
    let Plan { dot, branch, mine, first_missing, pending, diverged, force, started, .. } = plan;
    let head = mine.last().map(|c| c.id.clone()).unwrap_or_default();
    let mut summary = SyncSummary {
        dot: dot.clone(),
        branch: branch.clone(),
        head: head.clone(),
        commits: Vec::new(),
        bytes: 0,
        seconds: 0.0,
        forced_from: None,
        diverged,
    };
    let count = mine.len() - first_missing;
    for i in first_missing..mine.len() {
        let c = &mine[i];
        let stopped = |e: Error| {
            e.context(format!("{what} of commit {} stopped; run it again to go on from where it stopped", short(&c.id)))
        };
        let base = (i > 0).then(|| mine[i - 1].id.as_str());
        let offset = pending.iter().find(|p| p.commit == c.id).map_or(0, |p| p.resume_at_bytes);
        let stream = src.send(&dot, &c.id, base, offset).map_err(stopped)?;
        let progress = Progress {
            commit: c.id.clone(),
            index: i - first_missing + 1,
            commits: count,
            bytes: 0,
            total: stream.len,
            done: false,
        };
        let mut metered = Metered { inner: stream.reader, observer: &mut *observer, progress, stopped: false };
        let received = dst.receive(offset, &mut metered);
        let Metered { mut progress, stopped: gone, .. } = metered;
        summary.bytes += progress.bytes;
        progress.done = true;
        let gone = gone || observer.progress(&progress).is_err();
        if gone {
            return Err(stopped(Error::new(Kind::Stopped, "whoever asked for it went away")));
        }
        received.map_err(stopped)?;
        summary.commits.push(c.id.clone());
    }
    // Where their branch is now: a received commit moves it only when it is the branch's next commit (and the
    // head there has no uncommitted writes), and creates it only when the commit was made on that branch.
    let now = dst.dot(&dot)?;
    match branch_head(&now, &branch) {
        Some(h) if h == head => {}
        None if !now.branches.iter().any(|b| b.name == branch) => dst.create_branch(&dot, &branch, &head)?,
        at if force => {
            dst.reset(&dot, &branch, &head, force)
                .map_err(|e| e.context(format!("moving the other side's {branch} to {} (--force)", short(&head))))?;
            summary.forced_from = at;
        }
        at => observer.note(&format!(
            "the other side's {branch} stays at {} (it has uncommitted writes, or it is behind the commits sent); \
             `blockmesh reset` there, or {what} with --force, moves it to {}",
            at.as_deref().map_or("no commit", short),
            short(&head)
        )),
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A commit's stream on its way: counts the bytes and asks the observer, before each chunk, whether to go on.
struct Metered<'a> {
    inner: Box<dyn Read>,
    observer: &'a mut dyn Observer,
    progress: Progress,
    /// The observer said stop.
    stopped: bool,
}

impl Read for Metered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stopped || self.observer.progress(&self.progress).is_err() {
            self.stopped = true;
            return Err(std::io::Error::other("the transfer was stopped: whoever asked for it went away"));
        }
        let n = self.inner.read(buf)?;
        self.progress.bytes += n as u64;
        Ok(n)
    }
}
