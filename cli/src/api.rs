//! The daemon's HTTP+JSON control API, and the types its client shares.
//!
//! Every route needs `Authorization: Bearer <key>` (the key the daemon generated into `DATA_DIR/api-key`); a missing
//! or wrong key gets 401 and changes nothing. Errors are JSON `{"error": "..."}` with a 4xx status for bad requests
//! (400 bad input, 404 unknown dot / branch / commit, 409 already exists) and 5xx for failures of the node.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /metrics` | | Prometheus metrics, OpenMetrics text (see [`crate::metrics`]) |
//! | `GET /v1/info` | | [`ServerInfo`] |
//! | `GET /v1/pool` | | [`PoolStatus`] |
//! | `POST /v1/pool/gc` | | [`GcResult`]: runs the segment cleaner now |
//! | `POST /v1/pool/scrub` | | [`ScrubResult`]: reads and verifies every referenced block (answers when done) |
//! | `GET /v1/dots` | | `[`[`Dot`]`]` |
//! | `POST /v1/dots` | [`InitRequest`] | [`Dot`] |
//! | `GET /v1/dots/{ns}/{name}` | | [`Dot`] |
//! | `DELETE /v1/dots/{ns}/{name}?force=true` | | `{}` |
//! | `GET /v1/dots/{ns}/{name}/commits?branch=B` | | `[`[`Commit`]`]`, newest first |
//! | `GET /v1/dots/{ns}/{name}/commits?all=true` | | `[`[`Commit`]`]`: every commit of the dot, on a branch or not, oldest first |
//! | `POST /v1/dots/{ns}/{name}/commits` | [`CommitBody`] | [`Commit`] |
//! | `GET /v1/dots/{ns}/{name}/commits/{commit}` | | [`Commit`] (resolves prefixes and branch names) |
//! | `DELETE /v1/dots/{ns}/{name}/commits/{commit}` | | `{}`: the commit (by full id) and its snapshots are gone; 409 while it is a branch's head or another commit's parent |
//! | `POST /v1/dots/{ns}/{name}/subdots` | [`SubdotRequest`] | [`Dot`]: a new empty subdot on the current branch |
//! | `DELETE /v1/dots/{ns}/{name}/subdots/{subdot}?force=true` | | [`Dot`]: the subdot's head is gone from the current branch (commits and other branches keep theirs; not the last subdot: 400); 409 while NBD clients are connected to that head, unless forced |
//! | `POST /v1/dots/{ns}/{name}/branches` | [`BranchRequest`] | [`Dot`] |
//! | `DELETE /v1/dots/{ns}/{name}/branches/{branch}` | | `{}`: the branch and its heads are gone (not the current branch: 400) |
//! | `POST /v1/dots/{ns}/{name}/checkout` | [`CheckoutRequest`] | [`Dot`] |
//! | `POST /v1/dots/{ns}/{name}/reset` | [`ResetRequest`] | [`Dot`] |
//! | `POST /v1/dots/{ns}/{name}/clone` | [`CloneRequest`] | [`Dot`] (the new dot) |
//! | `GET /v1/dots/{ns}/{name}/diff?from=C&to=C&subdot=S` | | `[`[`DiffExtent`]`]` |
//! | `POST /v1/dots/{ns}/{name}/resize` | [`ResizeRequest`] | [`Dot`] |
//! | `GET /v1/dots/{ns}/{name}/qos` | | `{subdot: `[`QosLimits`]`}` for every subdot of the current branch (`{}`: no limits) |
//! | `PUT /v1/dots/{ns}/{name}/qos` | [`QosRequest`] | the same map, after the change: limits kept in the pool, applied to open connections at once |
//! | `GET /v1/dots/{ns}/{name}/send?commit=C&from=B&offset=N` | | the stream (`application/octet-stream`, with its `Content-Length`): commit `C` whole or since `B`; from byte `N` on (after the head) to resume |
//! | `POST /v1/receive?offset=N` | a stream | [`Received`]; with `offset`, resumes the interrupted receive of the stream's commit |
//! | `GET /v1/receives` | | `[`[`PendingReceive`]`]`: interrupted receives that can resume |
//! | `DELETE /v1/receives/{commit}` | | `{}`: drops what an interrupted receive kept |
//! | `POST /v1/dots/{ns}/{name}/push` | [`TransferRequest`] | newline-delimited JSON [`Event`](crate::transfer::Event)s: this daemon sends the branch's missing commits to the daemon at `url` |
//! | `POST /v1/dots/{ns}/{name}/pull` | [`TransferRequest`] | the same, the daemon at `url` sending to this one |
//!
//! Push and pull run [`crate::transfer::sync`] here, the streams flowing between the two daemons only: this daemon
//! must reach the other at `url`. What can be checked before any data moves is answered as an error (400 bad body,
//! 404 unknown dot or branch, 409 diverged histories without `force`, 502 the other daemon unreachable, refusing the
//! key or failing, 429 when [`MAX_TRANSFERS`] run already); then a 200 answer streams progress lines (at most every
//! [`PROGRESS_INTERVAL`](crate::transfer::PROGRESS_INTERVAL)) and ends with one `{"summary": ...}` or
//! `{"error": "..."}` line. A client that goes away stops the transfer at its next chunk; the receiving daemon keeps
//! what arrived of the commit in flight, and the next push or pull resumes it.
//!
//! Checkout, reset and delete are refused (409) while NBD clients are connected to the dot (to its heads; for delete,
//! to any of its exports), unless forced (`"force": true`, `?force=true`), which closes those connections first: each
//! connection answers the requests it has read, then closes.
//!
//! Commits are named by their 32-digit id, a unique prefix of at least [`MIN_COMMIT_PREFIX`] digits, or a branch
//! name (its head commit).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use blockmesh_engine::{CommitId, CommitRequest, DotInfo, Error as EngineError, Pool, DEFAULT_SUBDOT};

use crate::api_client::{ApiClient, Hints, Limits};
use crate::metrics::Metrics;
use crate::nbd_export::{Sessions, Which};
use crate::qos::{limited_subdots, limits_of, QosLimits, QosRegistry, SetError};
use crate::transfer::{self, Direction, Event, Kind, Observer, Side, Stop, Stream};
use serde::{Deserialize, Serialize};

/// Name of the admin key file in the data directory.
pub const API_KEY_FILE: &str = "api-key";
/// Where the API listens unless told otherwise.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:32607";
/// Namespace of a dot named without one.
pub const DEFAULT_NAMESPACE: &str = "admin";
/// Largest request body the API reads.
pub const MAX_API_BODY_BYTES: usize = 1 << 20;
/// Shortest commit id prefix the API resolves.
pub const MIN_COMMIT_PREFIX: usize = 4;
/// Most close names listed when a dot is unknown.
const MAX_SUGGESTIONS: usize = 5;

/// `mydb` means `admin/mydb`; `ns/name` stays as it is.
pub fn qualify(dot: &str) -> String {
    if dot.contains('/') {
        dot.to_string()
    } else {
        format!("{DEFAULT_NAMESPACE}/{dot}")
    }
}

/// `/v1/dots/ns/name`, the route of a dot (namespace `admin` when none).
pub fn dot_path(dot: &str) -> String {
    format!("/v1/dots/{}", qualify(dot))
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What the daemon serves and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    /// `host:port` of the NBD TCP listener.
    pub nbd_listen: String,
    /// Path of the NBD Unix socket.
    pub nbd_socket: String,
    /// A newer version than `version`, when the daemon checks for upgrades (`--upgrades-url`) and found one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<String>,
    /// Where that version can be had, when the upgrades server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_download_url: Option<String>,
}

/// Space and counts of the pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub pool_size_bytes: u64,
    pub segment_size_bytes: u64,
    pub segments: u64,
    pub free_segments: u64,
    /// Bytes of blocks the pool's volumes, commits and metadata hold.
    pub used_bytes: u64,
    /// Bytes of free segments.
    #[serde(default)]
    pub free_bytes: u64,
    /// Bytes that cleaning (`pool gc`) would give back: dead blocks in segments in use.
    #[serde(default)]
    pub reclaimable_bytes: u64,
    /// Free segments the pool keeps, when it can, by cleaning at checkpoints and in the background.
    #[serde(default)]
    pub clean_target_free_segments: u64,
    /// Steps the background cleaner took since the daemon opened the pool.
    #[serde(default)]
    pub background_clean_steps: u64,
    /// Of the free segments, those the cleaner emptied that wait for a sync before the log writes over them.
    #[serde(default)]
    pub emptied_segments: u64,
    /// Syncs the log took itself, since the daemon opened the pool, to write over emptied segments (the background
    /// cleaner takes most of them outside the pool lock).
    #[serde(default)]
    pub emptied_segment_syncs: u64,
    /// Log batches of large writes written past the page cache (O_DIRECT) since the daemon opened the pool.
    #[serde(default)]
    pub uncached_batches: u64,
    /// Log writes submitted from buffers registered with the io_uring log writer's ring (no page pinning per write)
    /// since the daemon opened the pool; 0 where the ring refused them (RLIMIT_MEMLOCK) or there is no io_uring.
    #[serde(default)]
    pub fixed_buffer_writes: u64,
    /// Syncs of the log the daemon's background thread took, outside the pool lock, as the log grew (so that
    /// checkpoints find it mostly on disk already).
    #[serde(default)]
    pub background_log_syncs: u64,
    /// Why the pool takes no more changes (a device write or sync failed; a restart reopens it); absent while it
    /// serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    pub dots: u64,
    pub volumes: u64,
    pub snapshots: u64,
    /// Interrupted receives that can resume (as `GET /v1/receives`).
    #[serde(default)]
    pub pending_receives: Vec<PendingReceive>,
    /// What the volumes and commits hold (every volume and snapshot of the pool).
    #[serde(default)]
    pub space: Space,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Subdot {
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Branch {
    pub name: String,
    /// Its head commit; `None` before the first commit.
    pub head: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dot {
    /// `ns/name`.
    pub name: String,
    pub current_branch: String,
    pub branches: Vec<Branch>,
    /// Subdots of the current branch.
    pub subdots: Vec<Subdot>,
    pub commits: usize,
    /// Space of every branch head and commit of the dot (in listings and `GET` of one dot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<Space>,
    /// QoS limits of the subdots that have any.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub qos: BTreeMap<String, QosLimits>,
}

/// Space figures of a dot or of the pool (data blocks; see `blockmesh_engine::SpaceUsage`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Space {
    /// The heads' sizes added up.
    pub logical_bytes: u64,
    /// Data the heads map, each block once.
    pub written_bytes: u64,
    /// Data only commits hold: what deleting them would give back.
    pub commits_only_bytes: u64,
}

impl From<blockmesh_engine::SpaceUsage> for Space {
    fn from(u: blockmesh_engine::SpaceUsage) -> Self {
        Self {
            logical_bytes: u.logical_bytes,
            written_bytes: u.written_bytes,
            commits_only_bytes: u.commits_only_bytes,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Commit {
    pub id: String,
    pub parents: Vec<String>,
    pub branch: String,
    pub time_unix_secs: u64,
    pub author: String,
    pub message: String,
    pub metadata: BTreeMap<String, String>,
    pub subdots: Vec<Subdot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitRequest {
    /// `ns/name` or `name` (namespace `admin`).
    pub name: String,
    /// Size of each subdot.
    pub size_bytes: u64,
    /// Subdot names; empty means one `__default__` subdot.
    #[serde(default)]
    pub subdots: Vec<String>,
    /// Limits for every subdot created (see [`QosLimits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosLimits>,
}

/// A change of one subdot's limits. The limits replace the old ones whole: an absent field is no limit (all absent
/// removes the limits).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosRequest {
    /// The subdot [default: `__default__`].
    #[serde(default)]
    pub subdot: Option<String>,
    pub limits: QosLimits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubdotRequest {
    /// The new subdot's name.
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitBody {
    pub message: String,
    #[serde(default)]
    pub author: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BranchRequest {
    pub name: String,
    /// Commit to branch from; the current branch's head when absent.
    #[serde(default)]
    pub from: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckoutRequest {
    pub branch: String,
    /// Close the NBD connections to the dot's heads instead of refusing (409) while there are any.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResetRequest {
    /// The branch to move; the current one when absent.
    #[serde(default)]
    pub branch: Option<String>,
    pub commit: String,
    /// Close the NBD connections to the dot's heads instead of refusing (409) while there are any.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneRequest {
    /// The commit to clone; the current branch's head when absent.
    #[serde(default)]
    pub commit: Option<String>,
    pub new_dot: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiffExtent {
    pub subdot: String,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// `data`, `zero`, `trimmed` or `hole`.
    pub kind: String,
}

/// What a cleaning did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcResult {
    pub passes: u64,
    pub segments_freed: u64,
    pub bytes_moved: u64,
    /// Free bytes after it.
    pub free_bytes: u64,
}

/// One block that failed its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    pub device_offset_bytes: u64,
    pub expected_crc: u32,
    pub found_crc: u32,
    /// `volume-or-commit @ byte offset` of every user (capped).
    pub used_by: Vec<String>,
}

/// What a scrub found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScrubResult {
    pub blocks_checked: u64,
    pub bad: Vec<BadBlock>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResizeRequest {
    /// The subdot; the unnamed one when absent.
    #[serde(default)]
    pub subdot: Option<String>,
    pub size_bytes: u64,
    /// Shrink even over written data.
    #[serde(default)]
    pub force: bool,
}

/// A receive that went through.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Received {
    pub dot: String,
    pub commit: String,
    pub records: u64,
    pub data_bytes: u64,
}

/// A receive that stopped early and can resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingReceive {
    pub dot: String,
    pub commit: String,
    /// Where the stream goes on (send it from here with `offset`).
    pub resume_at_bytes: u64,
    pub records: u64,
    pub data_bytes: u64,
}

/// What `POST /v1/dots/{ns}/{name}/push` and `.../pull` need: the other daemon and what to transfer.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// The other daemon's control API, `http://host:port` or `https://...`, as this daemon reaches it.
    pub url: String,
    /// The other daemon's API key (its DATA_DIR/api-key); never logged nor repeated in an answer.
    pub api_key: String,
    /// PEM text of the CA (or self-signed certificate) an https `url` is trusted by [default: the usual web roots].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_pem: Option<String>,
    /// The branch [default: the sending side's current branch].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Move the receiving side's branch even when the histories have diverged (closing the NBD connections to its
    /// head there).
    #[serde(default)]
    pub force: bool,
}

impl std::fmt::Debug for TransferRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the key
        f.debug_struct("TransferRequest")
            .field("url", &self.url)
            .field("ca_cert_pem", &self.ca_cert_pem.is_some())
            .field("branch", &self.branch)
            .field("force", &self.force)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
struct SendQuery {
    commit: String,
    from: Option<String>,
    offset: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct ReceiveQuery {
    offset: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct LogQuery {
    branch: Option<String>,
    /// Every commit of the dot instead of one branch's log.
    #[serde(default)]
    all: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct DiffQuery {
    from: String,
    to: Option<String>,
    subdot: Option<String>,
}

/// What the handlers share.
#[derive(Debug)]
pub struct ApiState {
    pub pool: Arc<Pool>,
    pub key: String,
    pub info: ServerInfo,
    /// The NBD connections open on each dot.
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    /// Every served volume's limits (shared with the NBD exports).
    pub qos: Arc<QosRegistry>,
    /// What the upgrade checks found (nothing when the daemon does not check).
    pub upgrades: Arc<crate::upgrades::Upgrades>,
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// The dot an engine call did not find; [`with_pool`] turns it into a message with close names.
    missing_dot: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), missing_dot: None }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// For an unknown dot, a message that lists the names closest to the one asked for.
    fn with_suggestions(mut self, pool: &Pool) -> Self {
        let Some(name) = self.missing_dot.take() else { return self };
        let mut close: Vec<(usize, String)> = pool
            .dots()
            .into_iter()
            .map(|d| (distance(&name, &d.name), d.name))
            .filter(|(dist, n)| *dist <= 3 || n.contains(name.rsplit('/').next().unwrap_or(&name)))
            .collect();
        close.sort();
        let close: Vec<String> = close.into_iter().take(MAX_SUGGESTIONS).map(|(_, n)| n).collect();
        let hint = if close.is_empty() {
            "; `blockmesh list` shows the dots".to_string()
        } else {
            format!("; did you mean {}?", close.join(", "))
        };
        self.message = format!("no dot named {name}{hint}");
        self
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use EngineError as E;
        let status = match &e {
            E::NoSuchDot(_) | E::NoSuchBranch(_) | E::NoSuchCommit(_) | E::NoSuchVolume(_) | E::NoSuchSnapshot(_) => {
                StatusCode::NOT_FOUND
            }
            E::DotExists(_) | E::BranchExists(_) | E::VolumeExists(_) => StatusCode::CONFLICT,
            E::InvalidArgument(_)
            | E::Unaligned { .. }
            | E::OutOfRange { .. }
            | E::ShrinkDropsData { .. }
            | E::Limit(_)
            | E::ReadOnly(_)
            | E::BadStream(_)
            | E::StreamInterrupted { .. }
            | E::UnsupportedVersion { .. } => StatusCode::BAD_REQUEST,
            E::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "API request failed");
        }
        let missing_dot = match &e {
            E::NoSuchDot(name) => Some(name.clone()),
            _ => None,
        };
        Self { missing_dot, ..Self::new(status, e.to_string()) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The API's routes over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/info", get(info))
        .route("/v1/pool", get(pool_status))
        .route("/v1/pool/gc", post(pool_gc))
        .route("/v1/pool/scrub", post(pool_scrub))
        .route("/v1/dots", get(list_dots).post(init_dot))
        .route("/v1/dots/{ns}/{name}", get(show_dot).delete(delete_dot))
        .route("/v1/dots/{ns}/{name}/commits", get(log).post(commit))
        .route("/v1/dots/{ns}/{name}/commits/{commit}", get(show_commit).delete(delete_commit))
        .route("/v1/dots/{ns}/{name}/subdots", post(add_subdot))
        .route("/v1/dots/{ns}/{name}/subdots/{subdot}", axum::routing::delete(remove_subdot))
        .route("/v1/dots/{ns}/{name}/branches", post(branch))
        .route("/v1/dots/{ns}/{name}/branches/{branch}", axum::routing::delete(delete_branch))
        .route("/v1/dots/{ns}/{name}/checkout", post(checkout))
        .route("/v1/dots/{ns}/{name}/reset", post(reset))
        .route("/v1/dots/{ns}/{name}/clone", post(clone_dot))
        .route("/v1/dots/{ns}/{name}/diff", get(diff))
        .route("/v1/dots/{ns}/{name}/resize", post(resize))
        .route("/v1/dots/{ns}/{name}/qos", get(show_qos).put(change_qos))
        .route("/v1/dots/{ns}/{name}/send", get(send))
        .route("/v1/dots/{ns}/{name}/push", post(push))
        .route("/v1/dots/{ns}/{name}/pull", post(pull))
        .route("/v1/receive", post(receive))
        .route("/v1/receives", get(pending_receives))
        .route("/v1/receives/{commit}", axum::routing::delete(abort_receive))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API route; see GET /v1/info") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(MAX_API_BODY_BYTES))
        .with_state(state)
}

/// The health endpoint's one route, served on its own listener (`serve --health-listen`), not on the control API,
/// whose every call needs the key: 200 while the pool takes changes, 503 once a failed device write or sync has put
/// it in the failed state (a restart reopens it; reads still work meanwhile). It says nothing about the pool's
/// contents, so probes (Kubernetes `httpGet`) need no key in the pod spec.
pub const HEALTH_PATH: &str = "/healthz";

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

/// The health endpoint: [`HEALTH_PATH`] and nothing else (404 elsewhere).
pub fn health_router(pool: Arc<Pool>) -> Router {
    Router::new()
        .route(HEALTH_PATH, get(health))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, format!("only {HEALTH_PATH} is served here")) })
        .with_state(pool)
}

async fn health(State(pool): State<Arc<Pool>>) -> Result<Json<Health>, ApiError> {
    match pool.health() {
        Ok(()) => Ok(Json(Health { status: "serving" })),
        Err(e) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e}; restart the daemon to reopen the pool")))
        }
    }
}

/// Same bytes, in time that does not depend on where they differ.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(k) if same_key(k.as_bytes(), state.key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong API key").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' (the key is in the daemon's DATA_DIR/api-key)",
        )
        .into_response(),
    }
}

/// Runs engine work off the event loop; an unknown dot's 404 lists the names closest to it.
async fn with_pool<T: Send + 'static>(
    s: Arc<ApiState>,
    f: impl FnOnce(&Pool) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || f(&s.pool).map_err(|e| e.with_suggestions(&s.pool)))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("request task failed: {e}")))?
}

/// [`with_pool`] for a change: made durable (a pool flush) before the answer, so an acknowledged commit, branch or
/// checkout survives a crash of the daemon.
async fn with_pool_durable<T: Send + 'static>(
    s: Arc<ApiState>,
    f: impl FnOnce(&Pool) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    with_pool(s, move |pool| {
        let out = f(pool)?;
        pool.flush()?;
        Ok(out)
    })
    .await
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

fn commit_json(c: blockmesh_engine::CommitInfo) -> Commit {
    Commit {
        id: c.id.to_string(),
        parents: c.parents.iter().map(ToString::to_string).collect(),
        branch: c.branch,
        time_unix_secs: c.time_unix_secs,
        author: c.author,
        message: c.message,
        metadata: c.metadata.into_iter().collect(),
        subdots: subdots_json(c.subdots),
    }
}

fn subdots_json(v: Vec<(String, u64)>) -> Vec<Subdot> {
    v.into_iter().map(|(name, size_bytes)| Subdot { name, size_bytes }).collect()
}

fn dot_json(d: blockmesh_engine::DotInfo) -> Dot {
    let qos = limited_subdots(&d);
    Dot {
        name: d.name,
        current_branch: d.current_branch,
        branches: d
            .branches
            .into_iter()
            .map(|(name, head)| Branch { name, head: head.map(|c| c.to_string()) })
            .collect(),
        subdots: subdots_json(d.subdots),
        commits: d.commits,
        space: None,
        qos,
    }
}

/// A dot as listed, with its space figures.
fn dot_with_space(d: blockmesh_engine::DotInfo, usage: &blockmesh_engine::Usage) -> Dot {
    let space = usage.dots.iter().find(|u| u.dot == d.name).map(|u| u.usage.into());
    Dot { space, ..dot_json(d) }
}

/// Edit distance, for suggesting close names.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A commit of `info`'s dot named by id, unique id prefix, or branch name (its head).
fn resolve_commit(pool: &Pool, info: &DotInfo, name: &str) -> Result<CommitId, ApiError> {
    let dot = &info.name;
    if let Some((_, head)) = info.branches.iter().find(|(b, _)| b == name) {
        return head.ok_or_else(|| ApiError::bad_request(format!("branch {name} of {dot} has no commit yet")));
    }
    if let Ok(id) = name.parse::<CommitId>() {
        return Ok(id);
    }
    let lower = name.to_ascii_lowercase();
    if lower.len() < MIN_COMMIT_PREFIX || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{name:?} is neither a branch of {dot} nor a commit id (or a prefix of at least {MIN_COMMIT_PREFIX} \
                 hex digits); `blockmesh log {dot}` lists the commits"
            ),
        ));
    }
    let matches: Vec<CommitId> =
        pool.commits(dot)?.into_iter().map(|c| c.id).filter(|id| id.to_string().starts_with(&lower)).collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no commit {name} in {dot}"))),
        _ => Err(ApiError::bad_request(format!("commit prefix {name} is ambiguous in {dot}: give more digits"))),
    }
}

/// Refuses (409) to `what` while NBD clients are connected to `dot`'s exports (`which` of them), unless `force`,
/// which closes their connections.
fn clear_sessions(s: &ApiState, dot: &str, which: Which, force: bool, what: &str) -> Result<(), ApiError> {
    if force {
        let n = s.sessions.disconnect(dot, &which);
        if n > 0 {
            tracing::info!(dot, connections = n, "closed NBD connections to {what}");
        }
        return Ok(());
    }
    match s.sessions.count(dot, &which) {
        0 => Ok(()),
        n => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "cannot {what}: {dot} is in use by {n} connected NBD client{}; disconnect {} first, or force it \
                 (--force) to close {}",
                if n == 1 { "" } else { "s" },
                if n == 1 { "it" } else { "them" },
                if n == 1 { "its connection" } else { "their connections" },
            ),
        )),
    }
}

/// The listing of one commit of `dot`.
fn commit_by_id(pool: &Pool, dot: &str, id: CommitId) -> Result<Commit, ApiError> {
    let c = pool.commits(dot)?.into_iter().find(|c| c.id == id);
    let c = c.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no commit {id} in {dot}")))?;
    Ok(commit_json(c))
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let text = with_pool(s.clone(), move |pool| Ok(s.metrics.render(pool, &s.qos))).await?;
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

async fn info(State(s): State<Arc<ApiState>>) -> ApiResult<ServerInfo> {
    let mut info = s.info.clone();
    if let Some(latest) = s.upgrades.newer_than(&info.version) {
        info.latest_version = Some(latest.version);
        info.latest_download_url = latest.download_url;
    }
    Ok(Json(info))
}

async fn pool_status(State(s): State<Arc<ApiState>>) -> ApiResult<PoolStatus> {
    with_pool(s, |pool| {
        let st = pool.stats();
        Ok(Json(PoolStatus {
            pool_size_bytes: st.pool_size_bytes,
            segment_size_bytes: st.segment_size_bytes,
            segments: st.segments,
            free_segments: st.free_segments,
            used_bytes: st.live_blocks * blockmesh_engine::BLOCK_SIZE,
            free_bytes: st.free_bytes,
            reclaimable_bytes: st.reclaimable_bytes,
            clean_target_free_segments: st.clean_target_free_segments,
            background_clean_steps: st.background_clean_steps,
            emptied_segments: st.emptied_segments,
            emptied_segment_syncs: st.emptied_segment_syncs,
            uncached_batches: st.uncached_batches,
            fixed_buffer_writes: st.fixed_buffer_writes,
            background_log_syncs: st.background_log_syncs,
            failed: pool.health().err().map(|e| e.to_string()),
            dots: st.dots,
            volumes: st.volumes,
            snapshots: st.snapshots,
            pending_receives: pending_json(pool)?,
            space: pool.usage()?.pool.into(),
        }))
    })
    .await
}

async fn pool_gc(State(s): State<Arc<ApiState>>) -> ApiResult<GcResult> {
    with_pool(s, |pool| {
        let c = pool.clean()?;
        Ok(Json(GcResult {
            passes: c.passes,
            segments_freed: c.segments_freed,
            bytes_moved: c.blocks_moved * blockmesh_engine::BLOCK_SIZE,
            free_bytes: pool.stats().free_bytes,
        }))
    })
    .await
}

async fn pool_scrub(State(s): State<Arc<ApiState>>) -> ApiResult<ScrubResult> {
    with_pool(s, |pool| {
        let r = pool.scrub(&mut |_, _| {})?;
        for b in &r.bad {
            tracing::error!(offset = b.device_offset_bytes, users = ?b.used_by, "scrub: block fails its checksum");
        }
        Ok(Json(ScrubResult {
            blocks_checked: r.blocks_checked,
            bad: r
                .bad
                .into_iter()
                .map(|b| BadBlock {
                    device_offset_bytes: b.device_offset_bytes,
                    expected_crc: b.expected_crc,
                    found_crc: b.found_crc,
                    used_by: b.used_by,
                })
                .collect(),
        }))
    })
    .await
}

fn pending_json(pool: &Pool) -> Result<Vec<PendingReceive>, ApiError> {
    Ok(pool
        .pending_receives()?
        .into_iter()
        .map(|p| PendingReceive {
            dot: p.dot,
            commit: p.commit.to_string(),
            resume_at_bytes: p.resume_at_bytes,
            records: p.records,
            data_bytes: p.data_bytes,
        })
        .collect())
}

async fn list_dots(State(s): State<Arc<ApiState>>) -> ApiResult<Vec<Dot>> {
    with_pool(s, |pool| {
        let usage = pool.usage()?;
        Ok(Json(pool.dots().into_iter().map(|d| dot_with_space(d, &usage)).collect()))
    })
    .await
}

async fn init_dot(State(s): State<Arc<ApiState>>, body: Bytes) -> ApiResult<Dot> {
    let req: InitRequest = parse(&body)?;
    let name = qualify(&req.name);
    let qos = s.qos.clone();
    with_pool_durable(s, move |pool| {
        let subdots: Vec<String> =
            if req.subdots.is_empty() { vec![DEFAULT_SUBDOT.to_string()] } else { req.subdots.clone() };
        let pairs: Vec<(&str, u64)> = subdots.iter().map(|n| (n.as_str(), req.size_bytes)).collect();
        if let Some(limits) = &req.qos {
            limits.validate().map_err(ApiError::bad_request)?;
        }
        pool.create_dot(&name, &pairs)?;
        if let Some(limits) = req.qos.filter(|l| !l.is_unlimited()) {
            for subdot in &subdots {
                set_qos(&qos, pool, &name, subdot, limits)?;
            }
        }
        Ok(Json(dot_json(pool.dot(&name)?)))
    })
    .await
}

async fn show_dot(State(s): State<Arc<ApiState>>, Path((ns, name)): Path<(String, String)>) -> ApiResult<Dot> {
    let dot = format!("{ns}/{name}");
    with_pool(s, move |pool| {
        let d = pool.dot(&dot)?;
        Ok(Json(dot_with_space(d, &pool.usage()?)))
    })
    .await
}

async fn delete_dot(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<serde_json::Value> {
    let dot = format!("{ns}/{name}");
    clear_sessions(&s, &dot, Which::All, q.force, "delete it")?;
    let (qos, metrics) = (s.qos.clone(), s.metrics.clone());
    with_pool_durable(s, move |pool| {
        pool.delete_dot(&dot)?;
        qos.forget_dot(&dot);
        metrics.forget_dot(&dot);
        Ok(Json(serde_json::json!({})))
    })
    .await
}

async fn log(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Vec<Commit>> {
    let dot = format!("{ns}/{name}");
    with_pool(s, move |pool| {
        let commits = if q.all { pool.commits(&dot)? } else { pool.log(&dot, q.branch.as_deref())? };
        Ok(Json(commits.into_iter().map(commit_json).collect()))
    })
    .await
}

async fn show_commit(
    State(s): State<Arc<ApiState>>,
    Path((ns, name, commit)): Path<(String, String, String)>,
) -> ApiResult<Commit> {
    let dot = format!("{ns}/{name}");
    with_pool(s, move |pool| {
        let id = resolve_commit(pool, &pool.dot(&dot)?, &commit)?;
        Ok(Json(commit_by_id(pool, &dot, id)?))
    })
    .await
}

async fn commit(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Commit> {
    let req: CommitBody = parse(&body)?;
    let dot = format!("{ns}/{name}");
    with_pool_durable(s, move |pool| {
        let id = pool.commit(
            &dot,
            CommitRequest {
                message: req.message,
                author: req.author.unwrap_or_else(|| "admin".to_string()),
                metadata: req.metadata.into_iter().collect(),
                ..CommitRequest::default()
            },
        )?;
        Ok(Json(commit_by_id(pool, &dot, id)?))
    })
    .await
}

async fn branch(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Dot> {
    let req: BranchRequest = parse(&body)?;
    let dot = format!("{ns}/{name}");
    with_pool_durable(s, move |pool| {
        let from = match &req.from {
            Some(c) => Some(resolve_commit(pool, &pool.dot(&dot)?, c)?),
            None => None,
        };
        pool.create_branch(&dot, &req.name, from)?;
        Ok(Json(dot_json(pool.dot(&dot)?)))
    })
    .await
}

async fn delete_branch(
    State(s): State<Arc<ApiState>>,
    Path((ns, name, branch)): Path<(String, String, String)>,
) -> ApiResult<serde_json::Value> {
    let dot = format!("{ns}/{name}");
    with_pool_durable(s, move |pool| {
        pool.delete_branch(&dot, &branch)?;
        Ok(Json(serde_json::json!({})))
    })
    .await
}

async fn delete_commit(
    State(s): State<Arc<ApiState>>,
    Path((ns, name, commit)): Path<(String, String, String)>,
) -> ApiResult<serde_json::Value> {
    let dot = format!("{ns}/{name}");
    // By full id only: a prefix or a branch name is too loose a handle for a deletion.
    let id: CommitId = commit.parse().map_err(|_| ApiError::bad_request(format!("{commit:?} is not a commit id")))?;
    with_pool_durable(s, move |pool| {
        let info = pool.dot(&dot)?;
        let commits = pool.commits(&dot)?;
        if !commits.iter().any(|c| c.id == id) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no commit {id} in {dot}")));
        }
        if let Some((b, _)) = info.branches.iter().find(|(_, head)| *head == Some(id)) {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("commit {id} is the head of branch {b} of {dot}")));
        }
        if let Some(child) = commits.iter().find(|c| c.parents.contains(&id)) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("commit {id} is the parent of commit {} of {dot}", child.id),
            ));
        }
        pool.delete_commit(&dot, id)?;
        Ok(Json(serde_json::json!({})))
    })
    .await
}

async fn add_subdot(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Dot> {
    let req: SubdotRequest = parse(&body)?;
    let dot = format!("{ns}/{name}");
    with_pool_durable(s, move |pool| {
        pool.add_subdot(&dot, &req.name, req.size_bytes)?;
        Ok(Json(dot_json(pool.dot(&dot)?)))
    })
    .await
}

async fn remove_subdot(
    State(s): State<Arc<ApiState>>,
    Path((ns, name, subdot)): Path<(String, String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Dot> {
    let dot = format!("{ns}/{name}");
    clear_sessions(&s, &dot, Which::SubdotHead(subdot.clone()), q.force, &format!("remove subdot {subdot}"))?;
    let qos = s.qos.clone();
    with_pool_durable(s, move |pool| {
        pool.remove_subdot(&dot, &subdot)?;
        // its limits go with it (a subdot added again under the name starts without)
        pool.set_dot_property(&dot, &crate::qos::property_key(&subdot), None)?;
        qos.forget_volume(&dot, &subdot);
        Ok(Json(dot_json(pool.dot(&dot)?)))
    })
    .await
}

async fn checkout(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Dot> {
    let req: CheckoutRequest = parse(&body)?;
    let dot = format!("{ns}/{name}");
    clear_sessions(&s, &dot, Which::Heads, req.force, "check out another branch")?;
    with_pool_durable(s, move |pool| {
        pool.checkout(&dot, &req.branch)?;
        Ok(Json(dot_json(pool.dot(&dot)?)))
    })
    .await
}

async fn reset(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Dot> {
    let req: ResetRequest = parse(&body)?;
    let dot = format!("{ns}/{name}");
    clear_sessions(&s, &dot, Which::Heads, req.force, "reset it")?;
    with_pool_durable(s, move |pool| {
        reset_branch(pool, &dot, req.branch.as_deref(), &req.commit)?;
        Ok(Json(dot_json(pool.dot(&dot)?)))
    })
    .await
}

/// Moves `dot`'s `branch` (the current one when none) to `commit` (id, prefix or branch name).
fn reset_branch(pool: &Pool, dot: &str, branch: Option<&str>, commit: &str) -> Result<(), ApiError> {
    let info = pool.dot(dot)?;
    let commit = resolve_commit(pool, &info, commit)?;
    let branch = branch.unwrap_or(&info.current_branch);
    pool.reset_branch(dot, branch, commit)?;
    Ok(())
}

async fn clone_dot(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Dot> {
    let req: CloneRequest = parse(&body)?;
    let dot = format!("{ns}/{name}");
    with_pool_durable(s, move |pool| {
        let info = pool.dot(&dot)?;
        let commit = resolve_commit(pool, &info, req.commit.as_deref().unwrap_or(&info.current_branch))?;
        let new_dot = qualify(&req.new_dot);
        pool.clone_dot(&dot, commit, &new_dot)?;
        Ok(Json(dot_json(pool.dot(&new_dot)?)))
    })
    .await
}

async fn diff(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<DiffQuery>,
) -> ApiResult<Vec<DiffExtent>> {
    let dot = format!("{ns}/{name}");
    with_pool(s, move |pool| {
        let info = pool.dot(&dot)?;
        let from = resolve_commit(pool, &info, &q.from)?;
        let to = match &q.to {
            Some(c) => Some(resolve_commit(pool, &info, c)?),
            None => None,
        };
        let subdots: Vec<String> = match q.subdot {
            Some(sd) => vec![sd],
            None => info.subdots.into_iter().map(|(n, _)| n).collect(),
        };
        let mut out = Vec::new();
        for sd in subdots {
            for x in pool.diff_commits(&dot, from, to, Some(&sd))? {
                let kind = match x.kind {
                    blockmesh_engine::ExtentKind::Data => "data",
                    blockmesh_engine::ExtentKind::Zero => "zero",
                    blockmesh_engine::ExtentKind::Trimmed => "trimmed",
                    blockmesh_engine::ExtentKind::Hole => "hole",
                };
                out.push(DiffExtent {
                    subdot: sd.clone(),
                    offset_bytes: x.offset_bytes,
                    len_bytes: x.len_bytes,
                    kind: kind.to_string(),
                });
            }
        }
        Ok(Json(out))
    })
    .await
}

async fn resize(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Dot> {
    let req: ResizeRequest = parse(&body)?;
    let dot = format!("{ns}/{name}");
    with_pool_durable(s, move |pool| {
        pool.resize_subdot(&dot, req.subdot.as_deref(), req.size_bytes, req.force)?;
        Ok(Json(dot_json(pool.dot(&dot)?)))
    })
    .await
}

/// Chunks of a stream in flight between the engine and the connection, at most (each up to
/// [`STREAM_CHUNK_BYTES`]): bounds a send's or receive's buffer memory.
pub const STREAM_CHANNEL_CHUNKS: usize = 8;
/// Size of the chunks a send hands to the connection.
pub const STREAM_CHUNK_BYTES: usize = 256 << 10;

type Chunk = std::io::Result<Bytes>;

/// The engine's (blocking) stream writer, feeding a response body.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn push(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(STREAM_CHUNK_BYTES)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STREAM_CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= STREAM_CHUNK_BYTES {
            self.push()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push()
    }
}

/// A request body, read by the engine's (blocking) stream reader.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.cur = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

async fn send(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<SendQuery>,
) -> Result<Response, ApiError> {
    let dot = format!("{ns}/{name}");
    let offset = q.offset.unwrap_or(0);
    let d = dot.clone();
    let (commit, base, size) =
        with_pool(s.clone(), move |pool| send_size(pool, &d, &q.commit, q.from.as_deref(), offset)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(STREAM_CHANNEL_CHUNKS);
    let pool = s.pool.clone();
    tokio::task::spawn_blocking(move || send_into(&pool, &dot, commit, base, offset, tx));
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .header("x-blockmesh-commit", commit.to_string())
        .body(axum::body::Body::from_stream(chunks))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The commit (id, prefix or branch name) and base a send of `dot` streams, and the stream's length from `offset` on.
fn send_size(
    pool: &Pool,
    dot: &str,
    commit: &str,
    from: Option<&str>,
    offset: u64,
) -> Result<(CommitId, Option<CommitId>, u64), ApiError> {
    let info = pool.dot(dot)?;
    let commit = resolve_commit(pool, &info, commit)?;
    let base = match from {
        Some(b) => Some(resolve_commit(pool, &info, b)?),
        None => None,
    };
    Ok((commit, base, pool.send_size(dot, commit, base, offset)?))
}

/// Writes the send stream of `commit` (blocking) into `tx`, in chunks of [`STREAM_CHUNK_BYTES`]. A failure part way
/// ends it with an error chunk, which aborts a response: the reader sees a stream without its trailer.
fn send_into(
    pool: &Pool,
    dot: &str,
    commit: CommitId,
    base: Option<CommitId>,
    offset: u64,
    tx: tokio::sync::mpsc::Sender<Chunk>,
) {
    let mut w = ChannelWriter { tx: tx.clone(), buf: Vec::with_capacity(STREAM_CHUNK_BYTES) };
    if let Err(e) = pool.send_from(dot, commit, base, offset, &mut w) {
        if tx.is_closed() {
            tracing::info!(dot, %commit, "send stopped part way: its reader went away");
        } else {
            tracing::error!(dot, %commit, error = %e, "send failed part way");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    }
}

async fn receive(
    State(s): State<Arc<ApiState>>,
    Query(q): Query<ReceiveQuery>,
    body: axum::body::Body,
) -> ApiResult<Received> {
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(STREAM_CHANNEL_CHUNKS);
    let apply = with_pool(s, move |pool| {
        let mut input = ChannelReader { rx, cur: Bytes::new() };
        let out = match q.offset {
            Some(offset) => pool.resume_receive(&mut input, offset)?,
            None => pool.receive(&mut input)?,
        };
        Ok(Json(Received {
            dot: out.dot,
            commit: out.commit.to_string(),
            records: out.records,
            data_bytes: out.data_bytes,
        }))
    });
    let feed = async move {
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let failed = chunk.is_err();
            // the engine stops reading at the first problem; then nobody listens
            if tx.send(chunk.map_err(std::io::Error::other)).await.is_err() || failed {
                break;
            }
        }
    };
    tokio::join!(apply, feed).0
}

/// Keeps a subdot's limits, mapping the registry's refusals to API errors.
fn set_qos(qos: &QosRegistry, pool: &Pool, dot: &str, subdot: &str, limits: QosLimits) -> Result<(), ApiError> {
    qos.set(pool, dot, subdot, limits).map_err(|e| match e {
        SetError::Invalid(m) => ApiError::bad_request(m),
        SetError::NoSuchSubdot(m) => ApiError::new(StatusCode::NOT_FOUND, m),
        SetError::Engine(e) => e.into(),
    })
}

/// Every subdot of the current branch with its limits.
fn qos_map(pool: &Pool, dot: &str) -> Result<BTreeMap<String, QosLimits>, ApiError> {
    let info = pool.dot(dot)?;
    Ok(info.subdots.iter().map(|(s, _)| (s.clone(), limits_of(&info, s))).collect())
}

async fn show_qos(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<BTreeMap<String, QosLimits>> {
    let dot = format!("{ns}/{name}");
    with_pool(s, move |pool| Ok(Json(qos_map(pool, &dot)?))).await
}

async fn change_qos(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<BTreeMap<String, QosLimits>> {
    let req: QosRequest = parse(&body)?;
    let dot = format!("{ns}/{name}");
    let qos = s.qos.clone();
    with_pool_durable(s, move |pool| {
        let subdot = req.subdot.as_deref().unwrap_or(DEFAULT_SUBDOT);
        set_qos(&qos, pool, &dot, subdot, req.limits)?;
        Ok(Json(qos_map(pool, &dot)?))
    })
    .await
}

async fn pending_receives(State(s): State<Arc<ApiState>>) -> ApiResult<Vec<PendingReceive>> {
    with_pool(s, |pool| Ok(Json(pending_json(pool)?))).await
}

async fn abort_receive(State(s): State<Arc<ApiState>>, Path(commit): Path<String>) -> ApiResult<serde_json::Value> {
    let id: CommitId = commit.parse().map_err(|_| ApiError::bad_request(format!("{commit:?} is not a commit id")))?;
    with_pool(s, move |pool| {
        pool.abort_receive(id)?;
        Ok(Json(serde_json::json!({})))
    })
    .await
}

/// Pushes and pulls this daemon runs at once, at most; one more is refused at once with 429 (Too Many Requests), not
/// queued: each holds connections to another daemon and a client for as long as it runs.
pub const MAX_TRANSFERS: usize = 4;
/// A push's or pull's connection to the other daemon must be made within this.
pub const REMOTE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A control call to the other daemon (a listing, a branch, a reset) must be answered within this.
pub const REMOTE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A stream to or from the other daemon may stall this long (no byte read or written) before the transfer fails;
/// shorter than the client's own idle timeout, so the client hears why.
pub const REMOTE_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Lines of a push's or pull's answer waiting for the client, at most; progress lines are dropped rather than wait.
const PROGRESS_CHANNEL_LINES: usize = 16;
/// Of [`PROGRESS_CHANNEL_LINES`], the room progress lines leave for the last ones (a note, the summary or error).
const FINAL_LINES: usize = 2;

/// Pushes and pulls running in this process (the daemon).
static TRANSFERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_TRANSFERS`] places, given back when dropped.
#[derive(Debug)]
struct TransferSlot;

impl TransferSlot {
    /// A place, or none when all are taken.
    fn take() -> Option<Self> {
        use std::sync::atomic::Ordering::SeqCst;
        TRANSFERS.fetch_update(SeqCst, SeqCst, |n| (n < MAX_TRANSFERS).then_some(n + 1)).ok().map(|_| TransferSlot)
    }
}

impl Drop for TransferSlot {
    fn drop(&mut self) {
        TRANSFERS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl From<ApiError> for transfer::Error {
    fn from(e: ApiError) -> Self {
        let kind = match e.status {
            StatusCode::BAD_REQUEST => Kind::BadRequest,
            StatusCode::NOT_FOUND => Kind::NotFound,
            StatusCode::CONFLICT => Kind::Conflict,
            _ => Kind::Failed,
        };
        transfer::Error::new(kind, e.message)
    }
}

impl From<transfer::Error> for ApiError {
    fn from(e: transfer::Error) -> Self {
        let status = match e.kind {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Unreachable | Kind::Refused | Kind::Remote => StatusCode::BAD_GATEWAY,
            Kind::Stopped | Kind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.message)
    }
}

/// This daemon's side of a push or pull: its pool, called directly (blocking: run it off the event loop).
#[derive(Debug)]
struct PoolSide {
    state: Arc<ApiState>,
}

impl PoolSide {
    /// `f` on the pool; an unknown dot's error lists the names closest to it.
    fn engine<T>(&self, f: impl FnOnce(&Pool) -> Result<T, ApiError>) -> transfer::Result<T> {
        let pool = &self.state.pool;
        f(pool).map_err(|e| e.with_suggestions(pool).into())
    }
}

impl Side for PoolSide {
    fn dot(&self, dot: &str) -> transfer::Result<Dot> {
        self.engine(|pool| Ok(dot_json(pool.dot(dot)?)))
    }

    fn log(&self, dot: &str, branch: &str) -> transfer::Result<Vec<Commit>> {
        self.engine(|pool| Ok(pool.log(dot, Some(branch))?.into_iter().map(commit_json).collect()))
    }

    fn all_commits(&self, dot: &str) -> transfer::Result<Vec<Commit>> {
        self.engine(|pool| Ok(pool.commits(dot)?.into_iter().map(commit_json).collect()))
    }

    fn pending_receives(&self) -> transfer::Result<Vec<PendingReceive>> {
        self.engine(pending_json)
    }

    fn send(&self, dot: &str, commit: &str, base: Option<&str>, offset: u64) -> transfer::Result<Stream> {
        let (commit, base, size) = self.engine(|pool| send_size(pool, dot, commit, base, offset))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(STREAM_CHANNEL_CHUNKS);
        let (pool, d) = (self.state.pool.clone(), dot.to_string());
        std::thread::Builder::new()
            .name("blockmesh-send".to_string())
            .spawn(move || send_into(&pool, &d, commit, base, offset, tx))
            .map_err(|e| transfer::Error::new(Kind::Failed, format!("starting the send of {commit}: {e}")))?;
        Ok(Stream { reader: Box::new(ChannelReader { rx, cur: Bytes::new() }), len: Some(size) })
    }

    fn receive(&self, offset: u64, stream: &mut dyn std::io::Read) -> transfer::Result<()> {
        self.engine(|pool| {
            match offset {
                0 => pool.receive(stream)?,
                _ => pool.resume_receive(stream, offset)?,
            };
            Ok(())
        })
    }

    fn create_branch(&self, dot: &str, branch: &str, from: &str) -> transfer::Result<()> {
        self.engine(|pool| {
            let from = resolve_commit(pool, &pool.dot(dot)?, from)?;
            pool.create_branch(dot, branch, Some(from))?;
            Ok(pool.flush()?)
        })
    }

    fn reset(&self, dot: &str, branch: &str, commit: &str, force: bool) -> transfer::Result<()> {
        clear_sessions(&self.state, dot, Which::Heads, force, "reset it")?;
        self.engine(|pool| {
            reset_branch(pool, dot, Some(branch), commit)?;
            Ok(pool.flush()?)
        })
    }
}

/// The other daemon of a push or pull, as `req` names it (400 when it does not make sense).
fn remote_side(req: &TransferRequest) -> Result<ApiClient, ApiError> {
    let url = req.url.trim();
    let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    if host.is_none_or(|h| h.is_empty() || h.starts_with('/') || h.contains(char::is_whitespace)) {
        return Err(ApiError::bad_request(format!(
            "url {url:?} is not the http:// or https:// URL of a daemon's control API (http://HOST:PORT)"
        )));
    }
    let key = req.api_key.trim();
    if key.is_empty() {
        return Err(ApiError::bad_request("api_key is empty: give the other daemon's key (its DATA_DIR/api-key)"));
    }
    let tls = match &req.ca_cert_pem {
        Some(pem) => Some(crate::api_client::trusting(pem.as_bytes(), "ca_cert_pem").map_err(ApiError::bad_request)?),
        None => None,
    };
    let hints = Hints {
        key_source: "the api_key given for it".to_string(),
        key_fix: String::new(),
        unreachable: "; is it running, and can this daemon reach that address (routes, firewalls)? push or pull with \
                      --relay carries the data through the client instead"
            .to_string(),
    };
    let limits = Limits {
        connect: REMOTE_CONNECT_TIMEOUT,
        call: REMOTE_CALL_TIMEOUT,
        stream_idle: REMOTE_IDLE_TIMEOUT,
        redirects: 0,
    };
    Ok(ApiClient::new(url, key.to_string(), hints, limits, tls))
}

/// The answer to a push or pull: [`Event`]s as newline-delimited JSON. Watches the client: once it went away (the
/// answer's body was dropped), the transfer stops.
#[derive(Debug)]
struct Lines {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    /// When the last progress line went.
    last: Option<std::time::Instant>,
}

impl Lines {
    fn send(&self, event: &Event) -> Result<(), Stop> {
        let mut line = serde_json::to_vec(event).map_err(|_| Stop)?;
        line.push(b'\n');
        self.tx.try_send(Ok(Bytes::from(line))).map_err(|_| Stop)
    }
}

impl Observer for Lines {
    fn progress(&mut self, p: &transfer::Progress) -> Result<(), Stop> {
        if self.tx.is_closed() {
            return Err(Stop);
        }
        let due = self.last.is_none_or(|t| t.elapsed() >= transfer::PROGRESS_INTERVAL);
        // a client slow to read misses progress lines, never the last ones
        if due && self.tx.capacity() > FINAL_LINES {
            self.last = Some(std::time::Instant::now());
            self.send(&Event::Progress(p.clone()))?;
        }
        Ok(())
    }

    fn note(&mut self, text: &str) {
        let _ = self.send(&Event::Note(text.to_string()));
    }
}

async fn push(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    push_or_pull(s, format!("{ns}/{name}"), Direction::Push, &body).await
}

async fn pull(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    push_or_pull(s, format!("{ns}/{name}"), Direction::Pull, &body).await
}

/// Plans the transfer (its refusals are the answer's status), then runs it while streaming its progress.
async fn push_or_pull(s: Arc<ApiState>, dot: String, direction: Direction, body: &Bytes) -> Result<Response, ApiError> {
    let req: TransferRequest = parse(body)?;
    let remote = remote_side(&req)?;
    let what = direction.verb();
    let slot = TransferSlot::take().ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("this daemon runs {MAX_TRANSFERS} pushes and pulls already, its most at once; try again when one is done"),
        )
    })?;
    let url = remote.base().to_string();
    let local: Box<dyn Side + Send> = Box::new(PoolSide { state: s });
    let remote: Box<dyn Side + Send> = Box::new(remote);
    let (src, dst) = match direction {
        Direction::Push => (local, remote),
        Direction::Pull => (remote, local),
    };
    let d = dot.clone();
    let (plan, src, dst) = tokio::task::spawn_blocking(move || {
        let order = transfer::Order { dot: &d, branch: req.branch.as_deref(), direction, force: req.force };
        let plan = transfer::plan(&*src, &*dst, order);
        (plan, src, dst)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what} task failed: {e}")))?;
    let plan = plan.inspect_err(|e| tracing::info!(dot, remote = %url, error = %e, "{what} refused"))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(PROGRESS_CHANNEL_LINES);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut lines = Lines { tx, last: None };
        let last = match transfer::run(plan, &*src, &*dst, &mut lines) {
            Ok(summary) => {
                tracing::info!(dot, remote = %url, commits = summary.commits.len(), bytes = summary.bytes, "{what} done");
                Event::Summary(summary)
            }
            Err(e) => {
                tracing::warn!(dot, remote = %url, error = %e, "{what} failed");
                Event::Error(e.message)
            }
        };
        // nobody to tell when the client went away
        let _ = lines.send(&last);
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(lines))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The admin key in `path`, generated (32 random bytes, hex, mode 0600) when the file does not exist. Returns the
/// key and whether it was created now.
pub fn load_or_create_key(path: &std::path::Path) -> std::io::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(k) if !k.trim().is_empty() => return Ok((k.trim().to_string(), false)),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is empty; delete it to have a new key generated", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let bytes: [u8; 32] = rand::random();
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(format!("{key}\n").as_bytes())?;
    f.sync_all()?;
    Ok((key, true))
}

/// Where the API key of a daemon with data directory `data_dir` lives.
pub fn key_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join(API_KEY_FILE)
}
