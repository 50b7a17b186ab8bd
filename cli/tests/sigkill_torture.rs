//! SIGKILL torture (issue #8), ztest style: the real daemon under load, killed with SIGKILL at seeded-random
//! moments, restarted on the same data directory, and checked block by block.
//!
//! The load comes from an NBD client of this file's own over the daemon's Unix socket (fixed newstyle, `OPT_GO`,
//! simple replies): 4 KiB-aligned writes of 1 to 8 blocks, some with FUA, write-zeroes, reads, and flushes, with up
//! to 32 requests in flight (never two on the same block), and commits through `blockmesh commit` now and then. Every
//! written block carries a stamp: a header (magic, block number, write sequence number, seed) and a fill derived from
//! them, so a block read back is either all zeroes, exactly one known write, or garbage.
//!
//! The driver keeps, per block, the newest version that must survive a kill (acknowledged before a FLUSH that was
//! answered, a FUA write, or taken into a commit, whose API call flushes the pool before it answers) and every
//! version sent after it (those may or may not have landed). A timer thread sends SIGKILL at a seeded-random moment;
//! some kills also land in the middle of a restart (replay, recovery checkpoint). After each restart every block is
//! read back: it must be one of its allowed versions, never older than the must-survive one, never torn (the engine
//! logs each 4 KiB block of a write as one checksummed op that replay takes whole or not at all, so a block written by
//! one request is all-or-nothing; nothing promises that a multi-block request is atomic, and this test does not
//! assume it). Commits whose API call returned before a kill must read back byte-identical to the head as it was when
//! they were taken. Reads during the load must return the last acknowledged write. At the end, `pool scrub` must find
//! no bad block.
//!
//! `TORTURE_KILLS=N` (default 20, about 10 s in a debug build) sets the number of kills, `TORTURE_SEED=S` replays a
//! seed (printed at the start and in every failure): each round's shape, kill moment and request choices come from
//! the seed and the round number, though the order in which replies arrive, and so the exact request stream, still
//! varies from run to run.
//! `scripts/sigkill-torture.sh [kills]` runs the long version in release. On a failure the data directory is kept and
//! its path printed.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockmesh::api::{Commit, ScrubResult};
use blockmesh_nbd::proto::*;
use common::Daemon;

const BLOCK: usize = 4096;
/// The dot's size: 8 MiB, read back whole after every restart.
const VOLUME_BLOCKS: u64 = 2048;
/// Most writes land here, so blocks are overwritten often (and flushed versions meet newer unflushed ones).
const HOT_BLOCKS: u64 = 256;
/// Small enough that long runs wrap the log and make the segment cleaner work.
const POOL_SIZE: &str = "512M";
/// Commits pin the blocks overwritten after them; a new dot replaces the old one after this many.
const COMMITS_PER_DOT: usize = 12;
const MAX_IN_FLIGHT: usize = 32;
const MAX_WRITE_BLOCKS: u64 = 8;
const STAMP_MAGIC: &[u8; 8] = b"BMTORTUR";

/// splitmix64: the workload's choices and the blocks' fill.
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.below(of.len() as u64) as usize]
    }
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// The content of `block` as written by write number `seq`.
fn stamp(seed: u64, block: u64, seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(STAMP_MAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut x = seed ^ block.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ seq.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    for word in out[32..BLOCK].chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix(&mut x).to_le_bytes());
    }
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Zero,
    Data(u64),
    Garbage,
}

fn classify(seed: u64, block: u64, buf: &[u8]) -> Seen {
    if buf.iter().all(|&b| b == 0) {
        return Seen::Zero;
    }
    if &buf[..8] != STAMP_MAGIC || le64(&buf[8..]) != block || le64(&buf[24..]) != seed {
        return Seen::Garbage;
    }
    let seq = le64(&buf[16..]);
    let mut want = [0u8; BLOCK];
    stamp(seed, block, seq, &mut want);
    if buf == want {
        Seen::Data(seq)
    } else {
        Seen::Garbage
    }
}

/// What garbage looks like, for the failure message.
fn describe_garbage(seed: u64, block: u64, buf: &[u8]) -> String {
    let zero_sectors = buf.chunks(512).filter(|s| s.iter().all(|&b| b == 0)).count();
    if &buf[..8] == STAMP_MAGIC {
        let (b, seq, s) = (le64(&buf[8..]), le64(&buf[16..]), le64(&buf[24..]));
        let mut want = [0u8; BLOCK];
        stamp(seed, b, seq, &mut want);
        let bad_sectors = buf.chunks(512).zip(want.chunks(512)).filter(|(a, b)| a != b).count();
        format!(
            "garbage: a stamp of block {b} seq {seq} seed {s} (read at block {block}), {bad_sectors}/8 sectors differ \
             from that stamp, {zero_sectors}/8 sectors zero"
        )
    } else {
        format!("garbage: no stamp, first bytes {:02x?}, {zero_sectors}/8 sectors zero", &buf[..16])
    }
}

/// One version of a block: write number `seq`, or zeroes (seq 0: never written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ver {
    seq: u64,
    zero: bool,
}

const NEVER: Ver = Ver { seq: 0, zero: true };

impl Ver {
    fn matches(self, seen: Seen) -> bool {
        match seen {
            Seen::Zero => self.zero,
            Seen::Data(s) => !self.zero && self.seq == s,
            Seen::Garbage => false,
        }
    }
}

impl std::fmt::Display for Ver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.zero, self.seq) {
            (true, 0) => write!(f, "never written"),
            (true, s) => write!(f, "zeroes #{s}"),
            (false, s) => write!(f, "write #{s}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    /// The newest version that must survive a kill.
    durable: Ver,
    /// The last version acknowledged (or recovered): what a read returns.
    current: Ver,
    /// Versions sent after `durable` (acknowledged or in flight), oldest first: allowed after a kill.
    since: Vec<Ver>,
    /// A request on this block is in flight.
    busy: bool,
}

const FRESH: Block = Block { durable: NEVER, current: NEVER, since: Vec::new(), busy: false };

#[derive(Debug)]
struct Model {
    blocks: Vec<Block>,
    /// Write acknowledgements in the order they arrived: a flush covers those received before it was sent.
    acks: Vec<(u64, Ver)>,
    /// `acks[..applied]` are durable.
    applied: usize,
    next_seq: u64,
}

impl Model {
    fn make_durable(&mut self, b: u64, v: Ver) {
        let blk = &mut self.blocks[b as usize];
        if v.seq > blk.durable.seq {
            blk.durable = v;
            blk.since.retain(|x| x.seq > v.seq);
        }
    }

    fn flushed(&mut self, upto: usize) {
        while self.applied < upto {
            let (b, v) = self.acks[self.applied];
            self.make_durable(b, v);
            self.applied += 1;
        }
    }

    /// After a commit, which flushes the pool (no request was in flight).
    fn all_durable(&mut self) {
        for b in 0..VOLUME_BLOCKS {
            let v = self.blocks[b as usize].current;
            self.make_durable(b, v);
        }
        self.applied = self.acks.len();
    }

    fn reset(&mut self) {
        self.blocks = vec![FRESH; VOLUME_BLOCKS as usize];
        self.acks.clear();
        self.applied = 0;
    }
}

/// A small blocking NBD client: fixed newstyle, `OPT_GO`, simple replies, requests pipelined.
#[derive(Debug)]
struct Nbd {
    r: BufReader<UnixStream>,
    w: UnixStream,
    size: u64,
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Nbd {
    fn connect(socket: &Path, export: &str) -> io::Result<Nbd> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::with_capacity(256 << 10, s);
        assert_eq!(read_u64(&mut r)?, NBDMAGIC, "greeting");
        assert_eq!(read_u64(&mut r)?, IHAVEOPT, "greeting");
        let flags = read_u16(&mut r)?;
        assert!(flags & FLAG_FIXED_NEWSTYLE != 0, "no fixed newstyle: {flags:#x}");
        w.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        m.extend_from_slice(&(export.len() as u32).to_be_bytes());
        m.extend_from_slice(export.as_bytes());
        m.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        w.write_all(&m)?;
        let mut size = None;
        loop {
            assert_eq!(read_u64(&mut r)?, OPTION_REPLY_MAGIC, "option reply");
            assert_eq!(read_u32(&mut r)?, OPT_GO, "option reply");
            let kind = read_u32(&mut r)?;
            let mut data = vec![0u8; read_u32(&mut r)? as usize];
            r.read_exact(&mut data)?;
            if kind == REP_ACK {
                break;
            }
            if kind & (1 << 31) != 0 {
                return Err(io::Error::other(format!(
                    "OPT_GO {export}: error {kind:#x}: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            if kind == REP_INFO && data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
            }
        }
        let size = size.expect("OPT_GO answered without NBD_INFO_EXPORT");
        Ok(Nbd { r, w, size })
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(REQUEST_HEADER_BYTES + data.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.w.write_all(&m)
    }

    /// The next simple reply's (cookie, errno); a read's data follows it (when errno is 0).
    fn reply(&mut self) -> io::Result<(u64, u32)> {
        let magic = read_u32(&mut self.r)?;
        assert_eq!(magic, SIMPLE_REPLY_MAGIC, "not a simple reply");
        let errno = read_u32(&mut self.r)?;
        Ok((read_u64(&mut self.r)?, errno))
    }

    /// Reads all of the export, `chunk` bytes a request, several in flight.
    fn read_all(&mut self, chunk: usize) -> io::Result<Vec<u8>> {
        let mut image = vec![0u8; self.size as usize];
        let chunks = (self.size as usize).div_ceil(chunk);
        let (mut sent, mut done) = (0, 0);
        while done < chunks {
            while sent < chunks && sent - done < 8 {
                let len = chunk.min(self.size as usize - sent * chunk);
                self.send(CMD_READ, 0, sent as u64, (sent * chunk) as u64, len as u32, &[])?;
                sent += 1;
            }
            let (cookie, errno) = self.reply()?;
            if errno != 0 {
                return Err(io::Error::other(format!("the read of chunk {cookie} failed with errno {errno}")));
            }
            let at = cookie as usize * chunk;
            let len = chunk.min(self.size as usize - at);
            self.r.read_exact(&mut image[at..at + len])?;
            done += 1;
        }
        Ok(image)
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { start: u64, n: u64, ver: Ver, fua: bool },
    Read { start: u64, n: u64 },
    Flush { upto: usize },
}

/// One workload's shape, chosen per kill.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Connections to the head; the export offers multi-conn, so a flush on one makes every write acknowledged on
    /// any of them before it durable.
    conns: usize,
    /// Requests in flight, over all connections.
    depth: usize,
    flush_one_in: u64,
    max_blocks: u64,
    commit_every: Option<Duration>,
    kill_after: Duration,
}

#[derive(Debug, Default)]
struct Stats {
    kills: u64,
    startup_kills: u64,
    /// Start-up kills that landed before the daemon said it was serving.
    kills_before_serving: u64,
    writes_acked: u64,
    flushes: u64,
    reads_checked: u64,
    blocks_checked: u64,
    writes_verified: u64,
    unflushed_dropped: u64,
    unflushed_kept: u64,
    commits: u64,
    commit_checks: u64,
    lost: u64,
    garbage: u64,
}

#[derive(Debug)]
struct CommitRecord {
    id: String,
    expect: Vec<Ver>,
    checked: bool,
}

struct Torture {
    seed: u64,
    rng: Rng,
    data: PathBuf,
    model: Model,
    stats: Stats,
    dot_gen: u64,
    commits: Vec<CommitRecord>,
    /// Writes numbered above this one were sent since the last restart.
    cycle_first_seq: u64,
    /// How long the last start took.
    last_start: Duration,
}

fn daemon_start(data: &Path) -> Daemon {
    Daemon::start_with(data, &["--pool-size", POOL_SIZE])
}

impl Torture {
    fn dot(&self) -> String {
        format!("torture{}", self.dot_gen)
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "sigkill torture failed (seed {seed}; rerun with TORTURE_SEED={seed}; data dir kept at {dir}) after {k} \
             kills: {what}",
            seed = self.seed,
            dir = self.data.display(),
            k = self.stats.kills
        )
    }

    fn new_dot(&mut self, d: &Daemon) {
        if self.dot_gen > 0 {
            d.ok(&["delete", &self.dot(), "--yes", "--force"]);
        }
        self.dot_gen += 1;
        d.ok(&["init", &self.dot(), "--size", &(VOLUME_BLOCKS * BLOCK as u64).to_string()]);
        self.model.reset();
        self.commits.clear();
    }

    fn socket(&self) -> PathBuf {
        self.data.join("nbd.sock")
    }

    /// Runs the load until the kill breaks the connection.
    fn workload(&mut self, conns: &mut [Nbd], shape: Shape, d: &Mutex<Daemon>, killed: &AtomicBool) {
        let started = Instant::now();
        // cookie -> (connection, request)
        let mut pending: HashMap<u64, (usize, Op)> = HashMap::new();
        let mut in_flight = vec![0usize; conns.len()];
        let mut cookie = 0u64;
        let mut next_commit = shape.commit_every.map(|e| started + e);
        let mut buf = vec![0u8; MAX_WRITE_BLOCKS as usize * BLOCK];
        macro_rules! io {
            ($e:expr, $what:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(_) if killed.load(Ordering::SeqCst) => return,
                    Err(e) => self.fail(&format!("{} failed without a kill: {e}", $what)),
                }
            };
        }
        // Answers one request: on the connection with the most in flight (the others' replies wait in their
        // sockets; the server runs every connection's requests concurrently).
        macro_rules! receive {
            () => {{
                let i = (0..conns.len()).max_by_key(|&i| in_flight[i]).unwrap();
                let (c, errno) = io!(conns[i].reply(), "a reply");
                match pending.remove(&c) {
                    Some((on, op)) if on == i => {
                        in_flight[i] -= 1;
                        io!(self.answered(&mut conns[i], op, errno, &mut buf), "reading a reply");
                    }
                    _ => self.fail(&format!("a reply on connection {i} to cookie {c}, not sent there")),
                }
            }};
        }
        loop {
            if started.elapsed() > shape.kill_after + Duration::from_secs(60) {
                self.fail("the NBD connection outlived the SIGKILL by 60 s");
            }
            if next_commit.is_some_and(|t| Instant::now() >= t) {
                while !pending.is_empty() {
                    receive!();
                }
                let name = self.dot();
                let msg = format!("torture commit {}", self.stats.commits);
                let cmd = d.lock().unwrap().command(&["commit", &name, "-m", &msg, "-o", "json"]);
                let out = io!(run(cmd), "blockmesh commit");
                let c: Commit = match serde_json::from_str(&out) {
                    Ok(c) => c,
                    Err(e) => self.fail(&format!("blockmesh commit printed {out:?}: {e}")),
                };
                let expect = self.model.blocks.iter().map(|b| b.current).collect();
                self.commits.push(CommitRecord { id: c.id, expect, checked: false });
                self.model.all_durable();
                self.stats.commits += 1;
                next_commit = shape.commit_every.map(|e| Instant::now() + e);
            }
            while pending.len() < shape.depth {
                let Some(op) = self.choose(shape) else { break };
                cookie += 1;
                let i = self.rng.below(conns.len() as u64) as usize;
                let nbd = &mut conns[i];
                let sent = match op {
                    Op::Flush { .. } => nbd.send(CMD_FLUSH, 0, cookie, 0, 0, &[]),
                    Op::Read { start, n } => {
                        nbd.send(CMD_READ, 0, cookie, start * BLOCK as u64, (n as usize * BLOCK) as u32, &[])
                    }
                    Op::Write { start, n, ver, fua } => {
                        let flags = if fua { CMD_FLAG_FUA } else { 0 };
                        let (offset, len) = (start * BLOCK as u64, (n as usize * BLOCK) as u32);
                        if ver.zero {
                            nbd.send(CMD_WRITE_ZEROES, flags, cookie, offset, len, &[])
                        } else {
                            for (i, out) in buf[..len as usize].chunks_exact_mut(BLOCK).enumerate() {
                                stamp(self.seed, start + i as u64, ver.seq, out);
                            }
                            nbd.send(CMD_WRITE, flags, cookie, offset, len, &buf[..len as usize])
                        }
                    }
                };
                // In flight from here: a write may land even when sending it failed halfway.
                pending.insert(cookie, (i, op));
                in_flight[i] += 1;
                io!(sent, "sending a request");
            }
            receive!();
        }
    }

    /// The next request, or None when every range tried is busy.
    fn choose(&mut self, shape: Shape) -> Option<Op> {
        if self.rng.one_in(shape.flush_one_in) {
            return Some(Op::Flush { upto: self.model.acks.len() });
        }
        let n = self.rng.range(1, shape.max_blocks);
        let start = (0..16).find_map(|_| {
            let span = if self.rng.below(10) < 7 { HOT_BLOCKS } else { VOLUME_BLOCKS };
            let start = self.rng.below(span - n + 1);
            let free = (start..start + n).all(|b| !self.model.blocks[b as usize].busy);
            free.then_some(start)
        })?;
        for b in start..start + n {
            self.model.blocks[b as usize].busy = true;
        }
        let kind = self.rng.below(100);
        if kind < 10 {
            return Some(Op::Read { start, n });
        }
        self.model.next_seq += 1;
        let ver = Ver { seq: self.model.next_seq, zero: kind < 15 };
        for b in start..start + n {
            self.model.blocks[b as usize].since.push(ver);
        }
        Some(Op::Write { start, n, ver, fua: self.rng.one_in(20) })
    }

    /// Applies one answered request to the model.
    fn answered(&mut self, nbd: &mut Nbd, op: Op, errno: u32, buf: &mut [u8]) -> io::Result<()> {
        if errno != 0 {
            self.fail(&format!("{op:?} failed with errno {errno}"));
        }
        match op {
            Op::Flush { upto } => {
                self.model.flushed(upto);
                self.stats.flushes += 1;
            }
            Op::Write { start, n, ver, fua } => {
                for b in start..start + n {
                    let blk = &mut self.model.blocks[b as usize];
                    blk.busy = false;
                    blk.current = ver;
                    self.model.acks.push((b, ver));
                    if fua {
                        self.model.make_durable(b, ver);
                    }
                }
                self.stats.writes_acked += 1;
            }
            Op::Read { start, n } => {
                let data = &mut buf[..n as usize * BLOCK];
                nbd.r.read_exact(data)?;
                for (i, got) in data.chunks_exact(BLOCK).enumerate() {
                    let b = start + i as u64;
                    let seen = classify(self.seed, b, got);
                    let blk = &mut self.model.blocks[b as usize];
                    if !blk.current.matches(seen) {
                        let want = blk.current;
                        let what = match seen {
                            Seen::Garbage => describe_garbage(self.seed, b, got),
                            _ => format!("{seen:?}"),
                        };
                        self.fail(&format!("a read during the load of block {b} returned {what}, not {want}"));
                    }
                    blk.busy = false;
                }
                self.stats.reads_checked += 1;
            }
        }
        Ok(())
    }

    /// After a restart: every block is one of its allowed versions; the result becomes the new durable state.
    fn verify_head(&mut self) {
        let export = format!("admin/{}", self.dot());
        let image = Nbd::connect(&self.socket(), &export).and_then(|mut c| c.read_all(256 << 10));
        let image = image.unwrap_or_else(|e| self.fail(&format!("reading {export} after the restart: {e}")));
        let mut problems = Vec::new();
        for b in 0..VOLUME_BLOCKS {
            let got = &image[b as usize * BLOCK..][..BLOCK];
            let seen = classify(self.seed, b, got);
            let blk = &self.model.blocks[b as usize];
            let mut allowed = std::iter::once(blk.durable).chain(blk.since.iter().copied());
            self.stats.blocks_checked += 1;
            match allowed.rfind(|v| v.matches(seen)) {
                Some(v) => {
                    if blk.durable.seq > self.cycle_first_seq {
                        self.stats.writes_verified += 1;
                    }
                    if v.seq < blk.current.seq {
                        self.stats.unflushed_dropped += 1;
                    } else if v.seq > blk.durable.seq {
                        self.stats.unflushed_kept += 1;
                    }
                    let blk = &mut self.model.blocks[b as usize];
                    *blk = Block { durable: v, current: v, since: Vec::new(), busy: false };
                }
                None => {
                    let what = match seen {
                        Seen::Garbage => {
                            self.stats.garbage += 1;
                            describe_garbage(self.seed, b, got)
                        }
                        Seen::Zero => {
                            self.stats.lost += 1;
                            "zeroes".to_string()
                        }
                        Seen::Data(s) => {
                            self.stats.lost += 1;
                            format!("write #{s}")
                        }
                    };
                    let since: Vec<String> = blk.since.iter().map(ToString::to_string).collect();
                    problems.push(format!(
                        "block {b}: read {what}; must survive: {}; allowed after it: [{}]; last acknowledged: {}",
                        blk.durable,
                        since.join(", "),
                        blk.current
                    ));
                }
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(20);
            self.fail(&format!("{n} blocks wrong after the restart:\n{}", problems.join("\n")));
        }
        self.model.acks.clear();
        self.model.applied = 0;
    }

    /// After a restart: commits not yet checked, and one older one, read back exactly as taken.
    fn verify_commits(&mut self) {
        let older: Vec<usize> = (0..self.commits.len()).filter(|&i| self.commits[i].checked).collect();
        let mut check: Vec<usize> = (0..self.commits.len()).filter(|&i| !self.commits[i].checked).collect();
        if !older.is_empty() {
            check.push(self.rng.pick(&older));
        }
        for i in check {
            let export = format!("admin/{}@{}", self.dot(), self.commits[i].id);
            let image = Nbd::connect(&self.socket(), &export).and_then(|mut c| c.read_all(256 << 10));
            let image = image.unwrap_or_else(|e| self.fail(&format!("reading commit {export}: {e}")));
            for b in 0..VOLUME_BLOCKS {
                let got = &image[b as usize * BLOCK..][..BLOCK];
                let seen = classify(self.seed, b, got);
                let want = self.commits[i].expect[b as usize];
                if !want.matches(seen) {
                    let what = match seen {
                        Seen::Garbage => describe_garbage(self.seed, b, got),
                        _ => format!("{seen:?}"),
                    };
                    self.fail(&format!("commit {export}, block {b}: read {what}, the commit was taken with {want}"));
                }
            }
            self.commits[i].checked = true;
            self.stats.commit_checks += 1;
        }
    }

    /// Kills a daemon while it opens the pool (replay, recovery checkpoint) or just after.
    fn kill_during_start(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockmesh"))
            .args(["serve", "--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--pool-size", POOL_SIZE])
            .arg("--data-dir")
            .arg(&self.data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Somewhere in the time the last start took (opening, replay, the recovery checkpoint), or a little after.
        let window = (self.last_start.as_millis() as u64 * 5 / 4).max(1);
        std::thread::sleep(Duration::from_millis(self.rng.below(window)));
        if let Some(status) = child.try_wait().unwrap() {
            self.fail(&format!("the daemon exited by itself while starting: {status}"));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if status.signal() != Some(9) {
            self.fail(&format!("the daemon exited by itself while starting: {status}"));
        }
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        self.stats.kills += 1;
        self.stats.startup_kills += 1;
        if !out.contains("blockmesh serving") {
            self.stats.kills_before_serving += 1;
        }
    }

    fn shape(&mut self) -> Shape {
        let kill_after = if self.rng.one_in(4) {
            Duration::from_millis(self.rng.below(100))
        } else {
            Duration::from_millis(self.rng.range(100, 1500))
        };
        Shape {
            conns: self.rng.pick(&[1, 1, 2, 3]),
            depth: self.rng.pick(&[1, 2, 8, 16, MAX_IN_FLIGHT]),
            flush_one_in: self.rng.pick(&[4, 16, 64, 512]),
            max_blocks: self.rng.pick(&[1, 1, 4, MAX_WRITE_BLOCKS]),
            commit_every: (!self.rng.one_in(3)).then(|| Duration::from_millis(self.rng.range(100, 600))),
            kill_after,
        }
    }
}

/// Runs a client command; Err when it failed (as when the daemon was killed under it).
fn run(mut cmd: Command) -> io::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn sigkill_torture() {
    let target = env_u64("TORTURE_KILLS").unwrap_or(20).max(1);
    let seed = env_u64("TORTURE_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
    });
    let started = Instant::now();
    let data = tempfile::tempdir().unwrap().keep();
    println!("sigkill torture: seed {seed} (TORTURE_SEED={seed} replays it), {target} kills, in {}", data.display());
    let mut t = Torture {
        seed,
        rng: Rng(seed),
        data: data.clone(),
        model: Model { blocks: Vec::new(), acks: Vec::new(), applied: 0, next_seq: 0 },
        stats: Stats::default(),
        dot_gen: 0,
        commits: Vec::new(),
        cycle_first_seq: 0,
        last_start: Duration::ZERO,
    };
    let starting = Instant::now();
    let mut d = daemon_start(&data);
    t.last_start = starting.elapsed();
    t.new_dot(&d);
    for round in 1u64.. {
        if t.stats.kills >= target {
            break;
        }
        // Each round's shape, kill moment and requests come from the seed and the round number alone, so a replay
        // does not drift when an earlier round ran more or fewer requests before its kill.
        t.rng = Rng(seed ^ round.wrapping_mul(0xd6e8_feb8_6659_fd93));
        if t.commits.len() >= COMMITS_PER_DOT {
            t.new_dot(&d);
        }
        let shape = t.shape();
        let export = format!("admin/{}", t.dot());
        let mut conns: Vec<Nbd> = (0..shape.conns)
            .map(|_| Nbd::connect(&t.socket(), &export).unwrap_or_else(|e| t.fail(&format!("connecting: {e}"))))
            .collect();
        assert!(conns.iter().all(|c| c.size == VOLUME_BLOCKS * BLOCK as u64));

        // The timer: SIGKILL after `kill_after`, whatever the driver is doing then.
        let daemon = Arc::new(Mutex::new(d));
        let killed = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let timer = {
            let (daemon, killed) = (daemon.clone(), killed.clone());
            std::thread::spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(shape.kill_after) {
                    killed.store(true, Ordering::SeqCst);
                    daemon.lock().unwrap().child.kill().unwrap();
                }
            })
        };
        t.cycle_first_seq = t.model.next_seq;
        t.workload(&mut conns, shape, &daemon, &killed);
        drop(stop);
        timer.join().unwrap();
        drop(conns);
        let status = daemon.lock().unwrap().child.wait().unwrap();
        if status.signal() != Some(9) {
            t.fail(&format!("the daemon ended by itself under load ({status}), not by the SIGKILL; shape {shape:?}"));
        }
        drop(daemon);
        t.stats.kills += 1;

        if t.stats.kills < target && t.rng.one_in(4) {
            t.kill_during_start();
        }
        let starting = Instant::now();
        d = daemon_start(&data);
        t.last_start = starting.elapsed();
        t.verify_head();
        t.verify_commits();
    }

    let scrub: ScrubResult = d.json(&["pool", "scrub"]);
    if !scrub.bad.is_empty() {
        t.fail(&format!("pool scrub found bad blocks: {:?}", scrub.bad));
    }
    drop(d);
    let s = &t.stats;
    println!(
        "sigkill torture: {} kills, {} writes verified, {} writes lost",
        s.kills,
        s.writes_verified,
        s.lost + s.garbage
    );
    println!(
        "  seed {seed}, {:.1} s: {} kills during start-up ({} before it served); {} writes acknowledged, {} flushes, {} reads checked under \
         load; {} blocks read back after restarts ({} unflushed writes dropped by a kill, {} kept); {} commits taken, \
         {} commit read-backs; scrub: {} blocks, 0 bad",
        started.elapsed().as_secs_f64(),
        s.startup_kills,
        s.kills_before_serving,
        s.writes_acked,
        s.flushes,
        s.reads_checked,
        s.blocks_checked,
        s.unflushed_dropped,
        s.unflushed_kept,
        s.commits,
        s.commit_checks,
        scrub.blocks_checked,
    );
    assert_eq!(s.lost + s.garbage, 0);
    std::fs::remove_dir_all(&data).unwrap();
}
