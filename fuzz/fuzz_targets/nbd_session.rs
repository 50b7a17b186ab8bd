//! Fuzzes a whole NBD session (handshake and transmission) against an in-memory export.
//!
//! The first input byte picks where the fuzzer's bytes start:
//! - even: the raw client stream from the first byte of the handshake (greeting flags, options, ...);
//! - odd: after a canned handshake that negotiates structured replies and `base:allocation` and enters transmission
//!   with GO on export "disk", so the fuzzer spends its time on requests.
//!
//! Properties: the server never panics and never hangs (each session must end within a deadline once the client
//! side has sent everything and closed its write half), whatever it is sent.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use blockmesh_nbd::proto::*;
use blockmesh_nbd::{Export, ExportMap, MemoryExport, Server, ServerConfig};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of the in-process pipe between the fuzzed client and the server.
const PIPE_BYTES: usize = 64 << 10;
/// How long a session may take after the client is done before it counts as a hang.
const SESSION_DEADLINE: Duration = Duration::from_secs(20);

fn option(v: &mut Vec<u8>, option: u32, data: &[u8]) {
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
}

fn canned_handshake() -> Vec<u8> {
    let mut v = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    option(&mut v, OPT_STRUCTURED_REPLY, &[]);
    let mut meta = Vec::new();
    meta.extend_from_slice(&4u32.to_be_bytes());
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    option(&mut v, OPT_SET_META_CONTEXT, &meta);
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut v, OPT_GO, &go);
    v
}

fn exports() -> Arc<ExportMap> {
    let map = Arc::new(ExportMap::new());
    let disk = MemoryExport::new(1 << 20);
    // Some data and a hole, so reads and block status see both.
    let _ = disk.write(64 << 10, &[0x5a; 8192], false);
    map.insert("disk", Arc::new(disk));
    map.insert("ro", Arc::new(MemoryExport::new(64 << 10).read_only()));
    map
}

thread_local! {
    /// One runtime for every input (building one per input took a large share of each execution); every session
    /// ends, with its tasks, before the next starts.
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut input = if mode & 1 == 1 { canned_handshake() } else { Vec::new() };
    input.extend_from_slice(rest);

    RUNTIME.with(|rt| {
        rt.block_on(async move {
            let server = Server::new(exports(), ServerConfig::default()).expect("server");
            let (client, server_side) = tokio::io::duplex(PIPE_BYTES);
            let serving = tokio::spawn(async move { server.serve_stream(server_side).await });
            let (mut rd, mut wr) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                // The server may close first; a failed write is expected then.
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            });
            let mut sink = vec![0u8; 64 << 10];
            let drain = async {
                while let Ok(n) = rd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::time::timeout(SESSION_DEADLINE, drain).await.expect("server hung");
            let _ = tokio::time::timeout(SESSION_DEADLINE, serving).await.expect("server task hung");
            let _ = writer.await;
        })
    });
});
