//! Random input against the server (the stable-Rust side of fuzzing): it must never panic or hang, and framed
//! requests must each get exactly one answer before garbage ends the connection.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use blockmesh_nbd::proto::*;
use common::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Feeds `input` as everything the client sends, then drains what the server says; returns the server's output.
fn session(input: Vec<u8>) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let (c, task) = pipe(&server());
        let (mut rd, mut wr) = tokio::io::split(c.s);
        let writer = tokio::spawn(async move {
            // The server may close early; a failed write is expected then.
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await.expect("server hung").unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("server task hung").unwrap().ok();
        writer.await.unwrap();
        out
    })
}

/// Client bytes for greeting + structured replies + base:allocation + GO on "disk".
fn handshake() -> Vec<u8> {
    let mut v = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    let mut opt = |o: u32, d: &[u8]| {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(d.len() as u32).to_be_bytes());
        v.extend_from_slice(d);
    };
    opt(OPT_STRUCTURED_REPLY, &[]);
    opt(OPT_SET_META_CONTEXT, &meta_data("disk", &[META_BASE_ALLOCATION]));
    opt(OPT_GO, &info_data("disk", &[]));
    v
}

/// Skips the server's handshake output (greeting and option replies up to GO's ACK); returns the rest.
fn after_handshake(out: &[u8]) -> &[u8] {
    let mut at = 18;
    let mut acks = 0;
    while acks < 3 {
        let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
        let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
        assert_eq!(kind & (1 << 31), 0, "handshake refused");
        if kind == REP_ACK {
            acks += 1;
        }
        at += 20 + len;
    }
    &out[at..]
}

#[derive(Debug, Clone)]
struct Req {
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
}

fn req() -> impl Strategy<Value = Req> {
    let size = 64u64 << 20;
    (
        prop_oneof![0u16..=10, Just(CMD_READ), Just(CMD_WRITE), Just(CMD_BLOCK_STATUS)],
        prop_oneof![Just(0u16), 0u16..64],
        prop_oneof![0..size, size - 8192..size + 8192, any::<u64>()],
        prop_oneof![0u32..70_000, Just(0), Just(1 << 20), any::<u32>()],
    )
        .prop_map(|(kind, flags, offset, length)| Req { kind, flags, offset, length })
        .prop_filter("DISC ends the session; writes are capped for memory", |r| {
            r.kind != CMD_DISC && (r.kind != CMD_WRITE || r.length <= 70_000)
        })
}

/// Cookies answered in the server's transmission output, with a check that each reply is well formed. Simple read
/// replies carry data whose length only the request knows, hence `read_len`.
fn answered(mut out: &[u8], read_len: impl Fn(u64) -> Option<u32>) -> Vec<u64> {
    let mut done = Vec::new();
    while !out.is_empty() {
        let magic = u32::from_be_bytes(out[0..4].try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            let errno = u32::from_be_bytes(out[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(out[8..16].try_into().unwrap());
            let data = if errno == 0 { read_len(cookie).unwrap_or(0) as usize } else { 0 };
            out = &out[16 + data..];
            done.push(cookie);
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
            let flags = u16::from_be_bytes(out[4..6].try_into().unwrap());
            let cookie = u64::from_be_bytes(out[8..16].try_into().unwrap());
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            out = &out[20 + len..];
            if flags & REPLY_FLAG_DONE != 0 {
                done.push(cookie);
            }
        }
    }
    done
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_never_panic_or_hang(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        session(input);
    }

    #[test]
    fn arbitrary_options_after_a_greeting_never_panic_or_hang(
        options in proptest::collection::vec((0u32..16, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)
    ) {
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        for (o, d) in options {
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            input.extend_from_slice(&o.to_be_bytes());
            input.extend_from_slice(&(d.len() as u32).to_be_bytes());
            input.extend_from_slice(&d);
        }
        let out = session(input);
        prop_assert!(out.len() >= 18, "greeting always sent");
    }

    #[test]
    fn every_framed_request_is_answered_once_then_garbage_closes(
        reqs in proptest::collection::vec(req(), 1..24),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut input = handshake();
        let mut read_lens = std::collections::HashMap::new();
        for (i, r) in reqs.iter().enumerate() {
            let cookie = i as u64 + 1;
            let h = RequestHeader { magic: REQUEST_MAGIC, flags: r.flags, kind: r.kind, cookie, offset: r.offset,
                                    length: r.length };
            input.extend_from_slice(&h.encode());
            if r.kind == CMD_WRITE {
                input.extend(std::iter::repeat_n(0x5a, r.length as usize));
            }
            if r.kind == CMD_READ {
                read_lens.insert(cookie, r.length);
            }
        }
        // Garbage that cannot start with the request magic.
        let mut garbage = garbage;
        if garbage.len() >= 4 && garbage[0..4] == REQUEST_MAGIC.to_be_bytes() {
            garbage[0] ^= 0xff;
        }
        input.extend_from_slice(&garbage);
        let out = session(input);
        let mut got = answered(after_handshake(&out), |c| read_lens.get(&c).copied());
        got.sort_unstable();
        let want: Vec<u64> = (1..=reqs.len() as u64).collect();
        prop_assert_eq!(got, want);
    }
}
