//! The property of the `api_request` fuzz target, shared by the cargo-fuzz target (`fuzz/fuzz_targets/`) and its
//! stable-Rust replay (`cli/tests/api_fuzz_replay.rs`), which include this file with `#[path]`.
//!
//! Requests derived from the input go to the daemon's router (`blockmesh::api::router`) served by `axum::serve` on an
//! in-memory listener (a `tokio::io::duplex` pipe per connection: no sockets), against an in-memory pool (a copy of
//! a closed fixture pool on the simulated device, with a dot, two commits and a branch).
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blockmesh::api::{self, ApiState, ServerInfo};
use blockmesh::metrics::Metrics;
use blockmesh::nbd_export::Sessions;
use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{CommitRequest, Pool, PoolOptions, DEFAULT_SUBDOT};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The API key of the fuzzed daemon.
pub const KEY: &str = "fuzz-api-key";
/// Most requests one input makes.
const MAX_REQUESTS: u8 = 4;
/// How long one request may take before it counts as a hang.
const DEADLINE: Duration = Duration::from_secs(20);
const DOT: &str = "admin/db";

fn opts() -> PoolOptions {
    PoolOptions {
        segment_size_bytes: 128 << 10,
        checkpoint_interval_bytes: 512 << 10,
        pool_id: Some(21),
        log_writer_threads: 0,
        background_cleaning: false,
        uncached_write_min_bytes: blockmesh_engine::DEFAULT_UNCACHED_WRITE_MIN_BYTES,
    }
}

/// Reads an input front to back; past its end every read gives zeroes.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.u8()))
    }
    /// Up to 31 bytes.
    fn bytes(&mut self) -> &'a [u8] {
        let n = (self.u8() % 32) as usize;
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }
    fn text(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

/// A closed pool to copy for every input, and the streams and names requests use.
#[derive(Debug)]
pub struct Fixture {
    image: Arc<SimDevice>,
    /// Ids of the fixture dot's commits.
    c1: String,
    c2: String,
    /// The dot at `c2` since `c1` (the fixture pool holds `c1`), and another dot's whole stream.
    inc: Vec<u8>,
    other: Vec<u8>,
}

fn msg(m: &str) -> CommitRequest {
    CommitRequest { message: m.into(), author: "fuzz".into(), time_unix_secs: Some(7), ..Default::default() }
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let src = Pool::create(SimDevice::new(8 << 20), PoolOptions { pool_id: Some(20), ..opts() }).expect("source");
        src.create_dot(DOT, &[(DEFAULT_SUBDOT, 64 << 10)]).expect("dot");
        let v = src.dot_volume(DOT, None).expect("head");
        v.write(0, &[7u8; 8192]).expect("write");
        let c1 = src.commit(DOT, msg("one")).expect("c1");
        v.write(16384, &[9u8; 4096]).expect("write");
        let c2 = src.commit(DOT, msg("two")).expect("c2");
        src.create_dot("team/other", &[(DEFAULT_SUBDOT, 16 << 10), ("logs", 4096)]).expect("dot");
        src.dot_volume("team/other", None).expect("head").write(512, &[3u8; 1024]).expect("write");
        let c3 = src.commit("team/other", msg("three")).expect("c3");
        let (mut full, mut inc, mut other) = (Vec::new(), Vec::new(), Vec::new());
        src.send(DOT, c1, None, &mut full).expect("send");
        src.send(DOT, c2, Some(c1), &mut inc).expect("send");
        src.send("team/other", c3, None, &mut other).expect("send");

        let image = SimDevice::new(8 << 20);
        let pool = Pool::create(image.clone(), opts()).expect("pool");
        pool.receive(&mut &full[..]).expect("receive");
        pool.create_branch(DOT, "dev", Some(c1)).expect("branch");
        pool.close().expect("close");
        Fixture { image, c1: c1.to_string(), c2: c2.to_string(), inc, other }
    })
}

/// Hands `axum::serve` the server ends of in-memory pipes.
struct Pipes(tokio::sync::mpsc::UnboundedReceiver<DuplexStream>);

impl axum::serve::Listener for Pipes {
    type Io = DuplexStream;
    type Addr = ();

    async fn accept(&mut self) -> (DuplexStream, ()) {
        match self.0.recv().await {
            Some(s) => (s, ()),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One request, as bytes on the wire.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Path and query, percent-encoded.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    fn wire(&self) -> Vec<u8> {
        let mut w = format!("{} {} HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n", self.method, self.target);
        for (k, v) in &self.headers {
            w.push_str(&format!("{k}: {v}\r\n"));
        }
        w.push_str(&format!("content-length: {}\r\n\r\n", self.body.len()));
        let mut w = w.into_bytes();
        w.extend_from_slice(&self.body);
        w
    }
}

fn encode(seg: &[u8]) -> String {
    let mut s = String::new();
    for &b in seg {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Printable ASCII only (what a header value may hold, framing aside).
fn header_value(b: &[u8]) -> String {
    b.iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '?' }).collect()
}

const METHODS: [&str; 8] = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "FUZZ"];
const QUERY_KEYS: [&str; 8] = ["force", "branch", "from", "to", "subdot", "commit", "offset", "x"];
const QOS_KEYS: [&str; 8] =
    ["iops", "read_iops", "write_iops", "bytes_per_sec", "read_bytes_per_sec", "write_bytes_per_sec", "burst_ms", "x"];
const JSON_KEYS: [&str; 16] = [
    "limits",
    "qos",
    "name",
    "size_bytes",
    "subdots",
    "message",
    "author",
    "metadata",
    "from",
    "branch",
    "force",
    "commit",
    "new_dot",
    "subdot",
    "to",
    "x",
];

/// A name requests use: mostly ones the pool knows.
fn name(u: &mut Input<'_>, f: &Fixture) -> String {
    match u.u8() % 10 {
        0 => f.c1.clone(),
        1 => f.c2.clone(),
        2 => f.c1[..6].to_string(),
        3 => "master".into(),
        4 => "dev".into(),
        5 => DOT.into(),
        6 => "db".into(),
        7 => DEFAULT_SUBDOT.into(),
        _ => u.text(),
    }
}

fn number(u: &mut Input<'_>) -> u64 {
    match u.u8() % 8 {
        0 => 0,
        1 => 512,
        2 => 4096,
        3 => 1 << 20,
        4 => u64::MAX,
        5 => 1 << 50,
        6 => u64::from(u.u16()),
        _ => u.u64(),
    }
}

fn json_value(u: &mut Input<'_>, f: &Fixture, depth: u8) -> serde_json::Value {
    use serde_json::Value as V;
    match u.u8() % 7 {
        0 => V::Null,
        1 => V::Bool(u.u8() & 1 == 1),
        2 => V::from(number(u)),
        3 if depth < 2 => V::Array((0..u.u8() % 3).map(|_| json_value(u, f, depth + 1)).collect()),
        4 if depth < 2 => V::Object((0..u.u8() % 3).map(|_| (name(u, f), json_value(u, f, depth + 1))).collect()),
        5 => V::from(-i64::from(u.u16())),
        _ => V::String(name(u, f)),
    }
}

/// A request body: empty, raw bytes, a JSON object with the API's field names, or (for receives) a stream.
fn body(u: &mut Input<'_>, f: &Fixture) -> Vec<u8> {
    match u.u8() % 8 {
        0 => Vec::new(),
        1 => u.bytes().to_vec(),
        2..=4 => {
            let mut m = serde_json::Map::new();
            for _ in 0..u.u8() % 5 {
                let k = JSON_KEYS[usize::from(u.u8()) % JSON_KEYS.len()];
                let v = if matches!(k, "limits" | "qos") && u.u8() % 2 == 0 {
                    // QoS limits: the API's field names with numbers (mostly), to get past the field check
                    let limits: serde_json::Map<String, serde_json::Value> = (0..u.u8() % 4)
                        .map(|_| (QOS_KEYS[usize::from(u.u8()) % QOS_KEYS.len()].to_string(), json_value(u, f, 1)))
                        .collect();
                    serde_json::Value::Object(limits)
                } else {
                    json_value(u, f, 0)
                };
                m.insert(k.to_string(), v);
            }
            serde_json::Value::Object(m).to_string().into_bytes()
        }
        sel => {
            let mut s = if sel == 5 { f.inc.clone() } else { f.other.clone() };
            match u.u8() % 4 {
                0 => {}
                1 => {
                    let cut = usize::from(u.u16()) % (s.len() + 1);
                    s.truncate(cut);
                }
                _ => {
                    for _ in 0..u.u8() % 4 + 1 {
                        let at = usize::from(u.u16()) % s.len();
                        s[at] ^= u.u8().max(1);
                    }
                }
            }
            s
        }
    }
}

/// The next request the input describes: method, dot, route (and its segments), query, key, headers, body.
pub fn request(u: &mut Input<'_>, f: &Fixture) -> Req {
    let method = match u.u8() % 16 {
        m @ 0..=7 => METHODS[usize::from(m)].to_string(),
        m => if m & 1 == 0 { "GET" } else { "POST" }.to_string(),
    };
    let seg = |u: &mut Input<'_>| encode(name(u, f).as_bytes());
    let (ns, n) = match u.u8() % 4 {
        3 => (encode(u.bytes()), seg(u)),
        2 => ("team".to_string(), "other".to_string()),
        _ => ("admin".to_string(), "db".to_string()),
    };
    let dot = format!("/v1/dots/{ns}/{n}");
    let mut target = match u.u8() % 22 {
        0 => "/metrics".to_string(),
        1 => "/v1/info".to_string(),
        2 => "/v1/pool".to_string(),
        3 => "/v1/pool/gc".to_string(),
        4 => "/v1/pool/scrub".to_string(),
        5 => "/v1/dots".to_string(),
        6 => dot,
        7 => format!("{dot}/commits"),
        8 => format!("{dot}/commits/{}", seg(u)),
        9 => format!("{dot}/branches"),
        10 => format!("{dot}/checkout"),
        11 => format!("{dot}/reset"),
        12 => format!("{dot}/clone"),
        13 => format!("{dot}/diff"),
        14 => format!("{dot}/resize"),
        15 => format!("{dot}/send"),
        16 => "/v1/receive".to_string(),
        17 => "/v1/receives".to_string(),
        18 => format!("/v1/receives/{}", seg(u)),
        19 => format!("{dot}/{}", seg(u)),
        20 => format!("{dot}/qos"),
        _ => {
            let raw: String = u.bytes().iter().map(|&b| encode(&[b]).replace("%2F", "/")).collect();
            format!("/{raw}")
        }
    };
    for i in 0..u.u8() % 4 {
        let k = QUERY_KEYS[usize::from(u.u8()) % QUERY_KEYS.len()];
        let v = match u.u8() % 4 {
            0 => number(u).to_string(),
            1 => ["true", "false", "1", ""][usize::from(u.u8() % 4)].to_string(),
            _ => encode(name(u, f).as_bytes()),
        };
        target.push(if i == 0 { '?' } else { '&' });
        target.push_str(&format!("{k}={v}"));
    }
    let mut headers = Vec::new();
    // mostly the right key (a zero byte, where an input ends, is the right key)
    match u.u8() % 16 {
        1 => {}
        2 => headers.push(("authorization".to_string(), "Bearer wrong".to_string())),
        3 => headers.push(("authorization".to_string(), header_value(u.bytes()))),
        4 => headers.push(("authorization".to_string(), format!("Bearer  {KEY} "))),
        _ => headers.push(("authorization".to_string(), format!("Bearer {KEY}"))),
    }
    for _ in 0..u.u8() % 3 {
        let k =
            ["content-type", "accept", "user-agent", "x-blockmesh-commit", "accept-encoding"][usize::from(u.u8() % 5)];
        let v = match u.u8() % 3 {
            0 => "application/json".to_string(),
            1 => "application/octet-stream".to_string(),
            _ => header_value(u.bytes()),
        };
        headers.push((k.to_string(), v));
    }
    Req { method, target, headers, body: body(u, f) }
}

/// Send one request over a new in-memory connection; the status and the whole response.
async fn exchange(conns: &tokio::sync::mpsc::UnboundedSender<DuplexStream>, req: &Req) -> (u16, Vec<u8>) {
    let (mut client, server) = tokio::io::duplex(64 << 10);
    conns.send(server).expect("the server is listening");
    let wire = req.wire();
    let (mut rd, mut wr) = tokio::io::split(&mut client);
    let write = async move {
        // the server may answer and close before it read everything (a refused body): a failed write is fine
        let _ = wr.write_all(&wire).await;
    };
    let read = async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let out = tokio::time::timeout(DEADLINE, async { tokio::join!(write, read).1 })
        .await
        .unwrap_or_else(|_| panic!("request {} {} hung", req.method, req.target));
    let status = out
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|r| std::str::from_utf8(r.get(..3)?).ok()?.parse::<u16>().ok())
        .unwrap_or_else(|| {
            panic!("no status line for {} {}: {:?}", req.method, req.target, String::from_utf8_lossy(&out))
        });
    (status, out)
}

thread_local! {
    /// One runtime for every input: building one per input (and its blocking pool's threads, which the handlers'
    /// engine calls start) took a large share of each execution. Each input's server task is aborted and awaited
    /// before the next input; a connection task it spawned that is still there (its client end is gone: every
    /// response was read to the end) ends the next time the runtime polls it.
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
}

/// Property of `api_request`: up to [`MAX_REQUESTS`] requests from the input, each answered with a status line;
/// none answered 5xx (bad input is the client's fault: 4xx), except 507 when the pool is full; afterwards the router
/// still serves (`GET /v1/pool` is 200) and the pool passes `Pool::check`. Never a panic or a hang.
pub fn check_api_requests(data: &[u8]) {
    let f = fixture();
    let mut u = Input::new(data);
    let pool = Arc::new(Pool::open(f.image.crash_losing_all_unsynced(), opts()).expect("fixture pool opens"));
    let state = Arc::new(ApiState {
        pool: pool.clone(),
        key: KEY.to_string(),
        info: ServerInfo {
            version: "fuzz".into(),
            nbd_listen: "none".into(),
            nbd_socket: "none".into(),
            latest_version: None,
            latest_download_url: None,
        },
        sessions: Sessions::new(),
        metrics: Arc::new(Metrics::new()),
        qos: blockmesh::qos::QosRegistry::new(),
        upgrades: Arc::default(),
    });
    let n = 1 + u.u8() % MAX_REQUESTS;
    let reqs: Vec<Req> = (0..n).map(|_| request(&mut u, f)).collect();
    RUNTIME.with(|rt| {
        rt.block_on(async move {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let server = tokio::spawn(async move { axum::serve(Pipes(rx), api::router(state)).await });
            for req in &reqs {
                let (status, out) = exchange(&tx, req).await;
                assert!(
                    status < 500 || status == 507,
                    "{} {} answered {status}: {}",
                    req.method,
                    req.target,
                    String::from_utf8_lossy(&out)
                );
            }
            let health = Req {
                method: "GET".into(),
                target: "/v1/pool".into(),
                headers: vec![("authorization".into(), format!("Bearer {KEY}"))],
                body: Vec::new(),
            };
            let (status, out) = exchange(&tx, &health).await;
            assert_eq!(status, 200, "the router stopped serving: {}", String::from_utf8_lossy(&out));
            server.abort();
            // the server task ends before the next input (see RUNTIME)
            let _ = server.await;
        })
    });
    let report = pool.check().expect("the pool checks");
    assert!(report.is_ok(), "the pool fails its check after the requests: {:?}", report.problems);
}
