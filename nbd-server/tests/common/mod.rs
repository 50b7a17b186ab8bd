//! Test support: a raw protocol client driven over an in-process duplex pipe, a server on a Unix socket for real
//! clients, and exports with known layouts.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use blockmesh_nbd::proto::*;
use blockmesh_nbd::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Size of the in-process pipe: small enough that back-pressure paths run.
pub const PIPE_BYTES: usize = 256 << 10;

/// A writable memory export, a read-only one and a default ("") one.
pub fn exports() -> Arc<ExportMap> {
    let map = Arc::new(ExportMap::new());
    map.insert("disk", Arc::new(MemoryExport::new(64 << 20).with_description("test disk")));
    let ro = MemoryExport::new(8 << 20);
    ro.write(0, &vec![0xAB; 1 << 20], false).unwrap();
    map.insert("ro", Arc::new(ro.read_only()));
    map.insert("aligned", Arc::new(Aligned(MemoryExport::new(16 << 20))));
    map
}

/// A memory export that, like engine volumes, demands 512-byte alignment.
pub struct Aligned(pub MemoryExport);

impl Export for Aligned {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum_bytes: 512, preferred_bytes: 4096, maximum_bytes: 1 << 20 }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        assert!(offset % 512 == 0 && buf.len() % 512 == 0, "server passed an unaligned read");
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> ExportResult<()> {
        assert!(offset % 512 == 0 && data.len() % 512 == 0, "server passed an unaligned write");
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> ExportResult<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportResult<()> {
        self.0.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.0.write_zeroes(offset, len, flags)
    }
    fn cache(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.0.cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        self.0.extents(offset, len)
    }
}

/// One reply, simple or a structured chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { cookie: u64, errno: u32 },
    Chunk { cookie: u64, flags: u16, kind: u16, payload: Vec<u8> },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// A raw NBD client over any stream.
pub struct Client<S> {
    pub s: S,
}

/// Starts a server task on one end of a duplex pipe and returns a client on the other.
pub fn pipe(server: &Server) -> (Client<DuplexStream>, tokio::task::JoinHandle<Result<()>>) {
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let server = server.clone();
    let task = tokio::spawn(async move { server.serve_stream(b).await });
    (Client { s: a }, task)
}

pub fn server() -> Server {
    Server::new(exports(), ServerConfig::default()).unwrap()
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    /// Reads the greeting and answers with fixed newstyle + no zeroes; returns the server's handshake flags.
    pub async fn greet(&mut self) -> u16 {
        assert_eq!(self.s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(self.s.read_u64().await.unwrap(), IHAVEOPT);
        let flags = self.s.read_u16().await.unwrap();
        self.s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await.unwrap();
        flags
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// One option reply: (option, reply type, data).
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        let option = self.s.read_u32().await.unwrap();
        let kind = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (option, kind, data)
    }

    /// Replies up to and including the first ACK or error.
    pub async fn option_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (_, kind, data) = self.option_reply().await;
            let end = kind == REP_ACK || kind & (1 << 31) != 0;
            out.push((kind, data));
            if end {
                return out;
            }
        }
    }

    pub async fn structured(&mut self) {
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(self.option_replies().await, vec![(REP_ACK, vec![])]);
    }

    pub async fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(OPT_SET_META_CONTEXT, &meta_data(name, queries)).await;
        self.option_replies().await
    }

    /// NBD_OPT_GO; returns (size, transmission flags, block sizes) or the error reply type.
    pub async fn go(&mut self, name: &str) -> Result<(u64, u16, [u32; 3]), u32> {
        self.send_option(OPT_GO, &info_data(name, &[INFO_BLOCK_SIZE])).await;
        let mut size = None;
        let mut sizes = [0; 3];
        for (kind, data) in self.option_replies().await {
            if kind & (1 << 31) != 0 {
                return Err(kind);
            }
            if kind == REP_INFO && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                let s = u64::from_be_bytes(data[2..10].try_into().unwrap());
                let f = u16::from_be_bytes([data[10], data[11]]);
                size = Some((s, f));
            }
            if kind == REP_INFO && u16::from_be_bytes([data[0], data[1]]) == INFO_BLOCK_SIZE {
                for (i, v) in sizes.iter_mut().enumerate() {
                    *v = u32::from_be_bytes(data[2 + 4 * i..6 + 4 * i].try_into().unwrap());
                }
            }
        }
        let (s, f) = size.expect("GO succeeded without NBD_INFO_EXPORT");
        Ok((s, f, sizes))
    }

    /// Greets, negotiates structured replies and base:allocation when asked, and enters transmission.
    pub async fn open(&mut self, name: &str, structured: bool) -> (u64, u16) {
        self.greet().await;
        if structured {
            self.structured().await;
            let replies = self.set_meta(name, &[META_BASE_ALLOCATION]).await;
            assert_eq!(replies.len(), 2, "one context and an ACK: {replies:?}");
        }
        let (size, flags, _) = self.go(name).await.unwrap();
        (size, flags)
    }

    pub async fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let h = RequestHeader { magic: REQUEST_MAGIC, flags, kind, cookie, offset, length };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// Reads one reply; a simple reply's data (for reads) is read by [`Client::read_data`].
    pub async fn reply(&mut self) -> Reply {
        let magic = self.s.read_u32().await.unwrap();
        if magic == SIMPLE_REPLY_MAGIC {
            let errno = self.s.read_u32().await.unwrap();
            let cookie = self.s.read_u64().await.unwrap();
            return Reply::Simple { cookie, errno };
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
        let flags = self.s.read_u16().await.unwrap();
        let kind = self.s.read_u16().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut payload = vec![0; len as usize];
        self.s.read_exact(&mut payload).await.unwrap();
        Reply::Chunk { cookie, flags, kind, payload }
    }

    pub async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.s.read_exact(&mut v).await.unwrap();
        v
    }

    /// All chunks of one structured reply (assumes no other request is in flight).
    pub async fn chunks(&mut self) -> Vec<(u16, u16, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            match self.reply().await {
                Reply::Chunk { flags, kind, payload, .. } => {
                    let done = flags & REPLY_FLAG_DONE != 0;
                    out.push((flags, kind, payload));
                    if done {
                        return out;
                    }
                }
                other => panic!("expected a chunk, got {other:?}"),
            }
        }
    }

    /// Structured read of `[offset, offset+len)`, reassembled; Err(errno) on an error chunk.
    pub async fn read_structured(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, cookie, offset, len, &[]).await;
        let mut out = vec![0xEE; len as usize];
        let mut covered = 0u64;
        for (_, kind, p) in self.chunks().await {
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset;
                    out[at as usize..at as usize + p.len() - 8].copy_from_slice(&p[8..]);
                    covered += (p.len() - 8) as u64;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset;
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap());
                    out[at as usize..at as usize + n as usize].fill(0);
                    covered += u64::from(n);
                }
                REPLY_TYPE_ERROR => return Err(u32::from_be_bytes(p[0..4].try_into().unwrap())),
                REPLY_TYPE_NONE => {}
                k => panic!("unexpected chunk type {k}"),
            }
        }
        assert_eq!(covered, u64::from(len), "chunks cover the read exactly");
        Ok(out)
    }

    /// Sends a request without payload and returns the errno of its simple reply.
    pub async fn simple(&mut self, flags: u16, kind: u16, offset: u64, length: u32, payload: &[u8]) -> u32 {
        self.request(flags, kind, 7, offset, length, payload).await;
        match self.reply().await {
            Reply::Simple { cookie: 7, errno } => errno,
            Reply::Chunk { cookie: 7, kind: REPLY_TYPE_ERROR, payload, .. } => {
                u32::from_be_bytes(payload[0..4].try_into().unwrap())
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Block status descriptors (length, status) from a BLOCK_STATUS chunk payload.
pub fn descriptors(payload: &[u8]) -> (u32, Vec<(u32, u32)>) {
    let id = u32::from_be_bytes(payload[0..4].try_into().unwrap());
    let d = payload[4..]
        .chunks(8)
        .map(|c| (u32::from_be_bytes(c[0..4].try_into().unwrap()), u32::from_be_bytes(c[4..8].try_into().unwrap())))
        .collect();
    (id, d)
}

/// A server on a Unix socket in a temporary directory, on its own runtime thread, for real clients.
pub struct SocketServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub exports: Arc<ExportMap>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl SocketServer {
    pub fn start(exports: Arc<ExportMap>, config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let server = Server::new(exports.clone(), config).unwrap();
        let listener = {
            let _guard = runtime.enter();
            Server::bind_unix(&socket).unwrap()
        };
        runtime.spawn(async move { server.serve_unix(listener).await });
        Self { dir, socket, exports, runtime: Some(runtime) }
    }

    /// The libnbd URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// True when `tool` is on the PATH. Under `CI=true` a missing tool fails the test instead of skipping it.
pub fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .env("PATH", path())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} is required under CI=true but not installed");
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// PATH with /usr/bin first (nbdsh must find Debian's python3 with the libnbd module, not another python).
pub fn path() -> String {
    format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default())
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.env("PATH", path()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command expected to fail; returns its stderr.
pub fn run_failing(cmd: &mut std::process::Command) -> String {
    let out = cmd.env("PATH", path()).output().unwrap();
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}
