//! Abusive clients over real TCP: slow-loris handshakes, a flood of connections past [`MAX_CONNECTIONS`], and clients
//! stalled in the middle of a 32 MiB write. Others are served meanwhile, memory stays bounded, and nothing
//! acknowledged is lost. Every test is bounded in time.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use blockmesh_nbd::proto::*;
use blockmesh_nbd::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

/// Every test finishes within this, or fails.
const TEST_LIMIT: Duration = Duration::from_secs(25);
/// The short handshake limit of the slow-loris test.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How late after the handshake limit a slow client may still be closed.
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// Bytes of the server's greeting (magic, IHAVEOPT, handshake flags).
const GREETING_BYTES: usize = 18;
/// Connections over the limit in the flood test.
const OVER_LIMIT: usize = 200;
/// Most the process may grow while holding the flood (about 64 KiB a connection, client and server side).
const FLOOD_MAX_GROWTH_BYTES: u64 = 80 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 4096) as u8).wrapping_mul(37).wrapping_add(i as u8)).collect()
}

/// A server on a free TCP port of 127.0.0.1, on the test's runtime.
async fn start(config: ServerConfig) -> (SocketAddr, Server) {
    let server = Server::new(exports(), config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve_tcp(listener).await });
    (addr, server)
}

async fn connect(addr: SocketAddr) -> Client<TcpStream> {
    Client { s: TcpStream::connect(addr).await.unwrap() }
}

/// Reads until the server closes; returns the bytes read and when the connection ended.
async fn read_until_closed(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// A well-behaved client's session: handshake, a FUA write, a read back, a flush.
async fn good_session(addr: SocketAddr, seed: u8, offset: u64) {
    let mut c = connect(addr).await;
    c.open("disk", true).await;
    let data = pattern(seed, 64 << 10);
    assert_eq!(c.simple(CMD_FLAG_FUA, CMD_WRITE, offset, data.len() as u32, &data).await, 0);
    assert_eq!(c.read_structured(1, offset, data.len() as u32).await.unwrap(), data);
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0, &[]).await, 0);
    c.request(0, CMD_DISC, 2, 0, 0, &[]).await;
}

/// The bytes of a complete, valid handshake for export "disk": client flags and `NBD_OPT_GO`.
fn handshake_bytes() -> Vec<u8> {
    let mut m = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    let data = info_data("disk", &[]);
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(&data);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_handshakes_are_closed_after_the_limit_while_others_are_served() {
    timeout(TEST_LIMIT, async {
        let config = ServerConfig { handshake_timeout: Some(HANDSHAKE_TIMEOUT), ..Default::default() };
        let (addr, _server) = start(config).await;
        let began = Instant::now();
        let mut slow = Vec::new();
        // Silent clients: connect and send nothing.
        for _ in 0..16 {
            slow.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let at = Instant::now();
                let got = read_until_closed(&mut s).await;
                (got, at.elapsed())
            }));
        }
        // Trickling clients: a valid handshake, one byte every 250 ms (about 10 s for all of it).
        for _ in 0..4 {
            slow.push(tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.unwrap();
                let at = Instant::now();
                let (mut rd, mut wr) = s.into_split();
                let writer = tokio::spawn(async move {
                    for b in handshake_bytes() {
                        if wr.write_all(&[b]).await.is_err() {
                            return;
                        }
                        sleep(Duration::from_millis(250)).await;
                    }
                    // all sent (the server failed to close us): stay connected, silent
                    sleep(TEST_LIMIT).await;
                });
                let got = read_until_closed(&mut rd).await;
                writer.abort();
                (got, at.elapsed())
            }));
        }
        // A well-behaved client meanwhile is served, and its connection outlives the handshake limit.
        sleep(Duration::from_millis(300)).await;
        let mut good = connect(addr).await;
        good.open("disk", true).await;
        let data = pattern(1, 256 << 10);
        assert_eq!(good.simple(CMD_FLAG_FUA, CMD_WRITE, 0, data.len() as u32, &data).await, 0);
        assert!(began.elapsed() < HANDSHAKE_TIMEOUT, "the good client was slowed down: {:?}", began.elapsed());
        good_session(addr, 2, 1 << 20).await;
        for (i, h) in slow.into_iter().enumerate() {
            let (got, took) = h.await.unwrap();
            assert_eq!(got, GREETING_BYTES, "slow client {i} got more than the greeting");
            assert!(
                took >= HANDSHAKE_TIMEOUT - Duration::from_millis(50) && took <= HANDSHAKE_TIMEOUT + CLOSE_SLACK,
                "slow client {i} was closed after {took:?} (limit {HANDSHAKE_TIMEOUT:?})"
            );
        }
        // Past the handshake limit, the good connection still works and holds its data.
        assert!(began.elapsed() > HANDSHAKE_TIMEOUT);
        assert_eq!(good.read_structured(3, 0, data.len() as u32).await.unwrap(), data);
        good_session(addr, 3, 2 << 20).await;
        println!("slow loris: 20 slow handshakes closed within {HANDSHAKE_TIMEOUT:?} + {CLOSE_SLACK:?}");
    })
    .await
    .expect("test took too long");
}

/// This process's resident memory.
fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// Raises the soft open-file limit to `want` if needed. False (a skip) when the hard limit is lower, except under
/// `CI=true`, where that fails the test.
fn enough_files(want: u64) -> bool {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_none_or(|c| c >= want) {
        return true;
    }
    if now.maximum.is_none_or(|m| m >= want) {
        setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: now.maximum }).unwrap();
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the flood test needs {want} open files; the hard limit is {:?}",
        now.maximum
    );
    eprintln!("skipping: the flood test needs {want} open files; the hard limit is {:?}", now.maximum);
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_past_the_limit_is_closed_promptly_and_memory_stays_bounded() {
    // Both ends of every connection live in this process.
    if !enough_files(2 * (MAX_CONNECTIONS + OVER_LIMIT) as u64 + 512) {
        return;
    }
    timeout(TEST_LIMIT, async {
        let (addr, _server) = start(ServerConfig::default()).await;
        // Warm up (runtime threads, buffers), then measure.
        good_session(addr, 1, 0).await;
        let rss_before = vm_rss_bytes();
        let began = Instant::now();
        let mut held = Vec::with_capacity(MAX_CONNECTIONS);
        for i in 0..MAX_CONNECTIONS {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut greeting = [0u8; GREETING_BYTES];
            timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
                .await
                .unwrap_or_else(|_| panic!("connection {i} (under the limit) got no greeting"))
                .unwrap_or_else(|e| panic!("connection {i} (under the limit) was closed: {e}"));
            assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
            held.push(s);
        }
        let filled = began.elapsed();
        // Past the limit: closed at once, without a greeting.
        let mut slowest_refusal = Duration::ZERO;
        let mut refused = Vec::with_capacity(OVER_LIMIT);
        for i in 0..OVER_LIMIT {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let at = Instant::now();
            let got = timeout(Duration::from_secs(2), read_until_closed(&mut s))
                .await
                .unwrap_or_else(|_| panic!("connection {i} over the limit was neither served nor closed"));
            assert_eq!(got, 0, "connection {i} over the limit was greeted");
            slowest_refusal = slowest_refusal.max(at.elapsed());
            refused.push(s);
        }
        let rss_held = vm_rss_bytes();
        let growth = rss_held.saturating_sub(rss_before);
        assert!(
            growth < FLOOD_MAX_GROWTH_BYTES,
            "holding {} connections grew the process by {} KiB",
            MAX_CONNECTIONS + OVER_LIMIT,
            growth >> 10
        );
        // A connection under the limit is served in full while the flood is on.
        let mut last = Client { s: held.pop().unwrap() };
        last.s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await.unwrap();
        last.go("disk").await.unwrap();
        let data = pattern(9, 128 << 10);
        assert_eq!(last.simple(CMD_FLAG_FUA, CMD_WRITE, 4 << 20, data.len() as u32, &data).await, 0);
        drop(last);
        // The flood goes away: a new client is served again (once the server has seen the others close).
        drop(held);
        drop(refused);
        let gone = Instant::now();
        loop {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut greeting = [0u8; GREETING_BYTES];
            if timeout(Duration::from_secs(2), s.read_exact(&mut greeting)).await.is_ok_and(|r| r.is_ok()) {
                break;
            }
            assert!(gone.elapsed() < Duration::from_secs(5), "no client served after the flood ended");
            sleep(Duration::from_millis(20)).await;
        }
        let recovered = gone.elapsed();
        let mut c = connect(addr).await;
        c.open("disk", true).await;
        assert_eq!(
            c.read_structured(1, 4 << 20, data.len() as u32).await.unwrap(),
            data,
            "the write made during the flood"
        );
        println!(
            "connection flood: {MAX_CONNECTIONS} served (filled in {filled:?}), {OVER_LIMIT} over the limit closed \
             (slowest {slowest_refusal:?}), process grew {} KiB ({} bytes a connection) holding them, served again \
             {recovered:?} after the flood",
            growth >> 10,
            growth / (MAX_CONNECTIONS + OVER_LIMIT) as u64
        );
    })
    .await
    .expect("test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalled_mid_write_block_no_one_and_lose_nothing() {
    timeout(TEST_LIMIT, async {
        let (addr, _server) = start(ServerConfig::default()).await;
        let mb = 1u64 << 20;
        // Acknowledged before the stall.
        let mut a = connect(addr).await;
        a.open("disk", false).await;
        let first = pattern(1, 1 << 20);
        assert_eq!(a.simple(CMD_FLAG_FUA, CMD_WRITE, 0, first.len() as u32, &first).await, 0);
        // Three clients promise 32 MiB writes over that data, send 1 MiB of it, and go silent.
        let mut stalled = Vec::new();
        for _ in 0..3 {
            let mut s = connect(addr).await;
            s.open("disk", false).await;
            let h = RequestHeader {
                magic: REQUEST_MAGIC,
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 99,
                offset: 0,
                length: MAX_PAYLOAD_BYTES,
            };
            s.s.write_all(&h.encode()).await.unwrap();
            s.s.write_all(&vec![0xFF; 1 << 20]).await.unwrap();
            s.s.flush().await.unwrap();
            stalled.push(s);
        }
        sleep(Duration::from_millis(200)).await;
        // Meanwhile: the first client and new ones are served promptly, and see only acknowledged data.
        let prompt = Duration::from_secs(3);
        let second = pattern(2, 1 << 20);
        timeout(prompt, async {
            assert_eq!(a.simple(0, CMD_WRITE, 40 * mb, second.len() as u32, &second).await, 0);
            assert_eq!(a.simple(0, CMD_FLUSH, 0, 0, &[]).await, 0);
        })
        .await
        .expect("a connection was blocked by a stalled one");
        let third = pattern(3, 1 << 20);
        timeout(prompt, async {
            let mut c = connect(addr).await;
            c.open("disk", true).await;
            assert_eq!(c.simple(CMD_FLAG_FUA, CMD_WRITE, 33 * mb, third.len() as u32, &third).await, 0);
            assert_eq!(c.read_structured(1, 0, first.len() as u32).await.unwrap(), first);
            for i in 0..8 {
                good_session(addr, 10 + i, 48 * mb + u64::from(i) * mb).await;
            }
        })
        .await
        .expect("a new connection was blocked by a stalled one");
        // The stalled clients vanish; their partial writes were never acknowledged, and must not appear.
        drop(stalled);
        sleep(Duration::from_millis(200)).await;
        let mut d = connect(addr).await;
        d.open("disk", true).await;
        let mut all = Vec::with_capacity((34 * mb) as usize);
        for i in 0..34 {
            all.extend(d.read_structured(2, i * mb, mb as u32).await.unwrap());
        }
        assert!(all[..mb as usize] == first[..], "an acknowledged write was lost or overwritten by a partial one");
        assert!(all[mb as usize..(33 * mb) as usize].iter().all(|&b| b == 0), "a partial write was applied");
        assert!(all[(33 * mb) as usize..] == third[..], "an acknowledged write was lost");
        assert_eq!(d.read_structured(3, 40 * mb, second.len() as u32).await.unwrap(), second);
        for i in 0..8u8 {
            let at = 48 * mb + u64::from(i) * mb;
            assert_eq!(d.read_structured(4, at, 64 << 10).await.unwrap(), pattern(10 + i, 64 << 10));
        }
    })
    .await
    .expect("test took too long");
}
