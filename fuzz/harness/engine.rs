//! The properties of the engine's fuzz targets (`stream_receive`, `pool_open`), shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/`) and their stable-Rust replay (`engine/tests/fuzz_replay.rs`), which include this file with
//! `#[path]`. Every check panics (with the reason) when a property does not hold; any other outcome is a pass.
//!
//! Fixtures (a source pool's streams, receiving pools, a pool image) are built once per process, closed, and copied
//! for every input (`SimDevice::crash_losing_all_unsynced` of a closed pool is an exact copy), so an input's outcome
//! depends on its bytes only.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{CommitId, CommitRequest, Error, Pool, PoolOptions, DEFAULT_SUBDOT};

/// Bytes of the simulated devices.
pub const DEVICE_BYTES: u64 = 8 << 20;
/// The dot the fixture streams carry.
pub const DOT: &str = "admin/db";
const LOGS: &str = "logs";
const DATA_BYTES: u64 = 128 << 10;
const LOGS_BYTES: u64 = (16 << 10) + 1536;
const BS: usize = 4096;
/// Most mutations one input applies.
const MAX_MUTATIONS: usize = 24;
/// Most bytes of each volume an opened fuzzed pool reads back.
const MAX_READ_BYTES: u64 = 64 << 10;

/// Small segments and frequent checkpoints; log writes in the calling thread (deterministic).
pub fn opts(pool_id: u64) -> PoolOptions {
    PoolOptions {
        segment_size_bytes: 128 << 10,
        checkpoint_interval_bytes: 512 << 10,
        pool_id: Some(pool_id),
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
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
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
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Deterministic, never-zero bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

fn msg(m: &str) -> CommitRequest {
    CommitRequest { message: m.into(), author: "fuzz".into(), time_unix_secs: Some(7), ..Default::default() }
}

fn read_all(pool: &Pool, c: CommitId, subdot: &str, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; size as usize];
    pool.commit_volume(DOT, c, Some(subdot)).expect("fixture commit volume").read(0, &mut b).expect("fixture read");
    b
}

/// What a commit holds: (subdot, bytes) of each subdot.
type Content = [(String, Vec<u8>)];

/// Streams of a source pool and closed receiving pools to copy.
#[derive(Debug)]
pub struct StreamFixture {
    /// `DOT` at `c1`, whole.
    pub full: Vec<u8>,
    /// `DOT` at `c2`, since `c1`.
    pub inc: Vec<u8>,
    pub c1: CommitId,
    pub c2: CommitId,
    /// (subdot, bytes) of each commit.
    pub c1_content: Vec<(String, Vec<u8>)>,
    pub c2_content: Vec<(String, Vec<u8>)>,
    /// A closed, empty pool.
    pub empty: Arc<SimDevice>,
    /// A closed pool that received `c1`.
    pub with_c1: Arc<SimDevice>,
}

/// The stream fixture, built on first use.
pub fn stream_fixture() -> &'static StreamFixture {
    static F: OnceLock<StreamFixture> = OnceLock::new();
    F.get_or_init(|| {
        let src = Pool::create(SimDevice::new(DEVICE_BYTES), opts(1)).expect("source pool");
        src.create_dot(DOT, &[(DEFAULT_SUBDOT, DATA_BYTES), (LOGS, LOGS_BYTES)]).expect("dot");
        let d = src.dot_volume(DOT, None).expect("data");
        let l = src.dot_volume(DOT, Some(LOGS)).expect("logs");
        d.write(0, &pattern(1, 12 << 10)).expect("w");
        d.write_zeroes(32 << 10, 8 << 10).expect("z");
        d.write(100 << 10, &pattern(2, 4096)).expect("w");
        l.write(512, &pattern(3, 2048)).expect("w");
        l.write(16 << 10, &pattern(4, 1536)).expect("w"); // the partial last block
        let c1 = src.commit(DOT, msg("one")).expect("c1");
        d.write(4096 * 5, &pattern(5, 8192)).expect("w");
        d.trim(0, 8192).expect("trim");
        d.write_zeroes(100 << 10, 1024).expect("z");
        l.write(0, &pattern(6, 512)).expect("w");
        let c2 = src.commit(DOT, msg("two")).expect("c2");
        let mut full = Vec::new();
        src.send(DOT, c1, None, &mut full).expect("send c1");
        let mut inc = Vec::new();
        src.send(DOT, c2, Some(c1), &mut inc).expect("send c2");
        let content = |c| {
            vec![
                (DEFAULT_SUBDOT.to_string(), read_all(&src, c, DEFAULT_SUBDOT, DATA_BYTES)),
                (LOGS.to_string(), read_all(&src, c, LOGS, LOGS_BYTES)),
            ]
        };
        let (c1_content, c2_content) = (content(c1), content(c2));

        let empty = SimDevice::new(DEVICE_BYTES);
        Pool::create(empty.clone(), opts(2)).expect("empty pool").close().expect("close");
        let with_c1 = SimDevice::new(DEVICE_BYTES);
        let p = Pool::create(with_c1.clone(), opts(3)).expect("receiver");
        p.receive(&mut &full[..]).expect("receive c1");
        p.close().expect("close");
        StreamFixture { full, inc, c1, c2, c1_content, c2_content, empty, with_c1 }
    })
}

/// Length of a stream's head (magic, version, header length, header, crc), if its fixed part is there.
fn head_len(s: &[u8]) -> Option<usize> {
    let n = u32::from_le_bytes(s.get(12..16)?.try_into().ok()?) as usize;
    Some(16 + n + 4)
}

/// Make a (mutated) stream's checksums right again: the header's crc32 and each record's, as far as the record
/// lengths tile the stream. With `chain`, also the records' blake3 chain and the trailer (its counts and digest), so
/// the stream is accepted unless what it says is wrong.
pub fn reseal_stream(s: &mut [u8], chain: bool) {
    let Some(head) = head_len(s) else { return };
    if head > s.len() {
        return;
    }
    let crc = crc32fast::hash(&s[16..head - 4]);
    s[head - 4..head].copy_from_slice(&crc.to_le_bytes());
    let mut link = *blake3::hash(&s[..head]).as_bytes();
    let (mut records, mut data_bytes) = (0u64, 0u64);
    let mut at = head;
    while at + 5 <= s.len() {
        let kind = s[at];
        let len = u32::from_le_bytes([s[at + 1], s[at + 2], s[at + 3], s[at + 4]]) as usize;
        let Some(end) = at.checked_add(5 + len + 4).filter(|&e| e <= s.len()) else { return };
        if chain && kind == 255 && len >= 48 {
            let p = &mut s[at + 5..at + 5 + len];
            p[..8].copy_from_slice(&records.to_le_bytes());
            p[8..16].copy_from_slice(&data_bytes.to_le_bytes());
            p[16..48].copy_from_slice(&link);
        }
        let crc = crc32fast::hash(&s[at..at + 5 + len]);
        s[end - 4..end].copy_from_slice(&crc.to_le_bytes());
        if kind != 255 {
            let mut h = blake3::Hasher::new_keyed(&link);
            h.update(&s[at..end]);
            link = *h.finalize().as_bytes();
            records += 1;
            if kind == 2 {
                data_bytes += len.saturating_sub(8) as u64;
            }
        }
        at = end;
    }
}

/// Apply the input's byte mutations to `s`: up to [`MAX_MUTATIONS`] of xor, set, insert and remove at a position
/// taken modulo the length.
fn mutate(s: &mut Vec<u8>, u: &mut Input<'_>) {
    for _ in 0..MAX_MUTATIONS {
        if u.is_empty() {
            break;
        }
        let kind = u.u8();
        let pos = usize::from(u.u16()) % (s.len() + 1);
        let val = u.u8();
        match kind % 4 {
            0 if pos < s.len() => s[pos] ^= val.max(1),
            1 if pos < s.len() => s[pos] = val,
            2 => s.insert(pos, val),
            3 if pos < s.len() => {
                s.remove(pos);
            }
            _ => {}
        }
    }
}

/// `stream`, mutated as the input says: a seal mode (none, checksums, checksums and chain), an optional cut, then
/// byte mutations. Returns the stream and whether its checksums were recomputed (then it may be accepted with other
/// contents).
fn mutated_stream(stream: &[u8], u: &mut Input<'_>) -> (Vec<u8>, bool) {
    let seal = u.u8() % 3;
    let cut = u.u16();
    let mut s = stream.to_vec();
    mutate(&mut s, u);
    if seal > 0 {
        reseal_stream(&mut s, seal == 2);
    }
    if cut & 1 == 1 {
        s.truncate(usize::from(cut >> 1) % (s.len() + 1));
    }
    (s, seal > 0)
}

/// A copy of a closed pool, opened.
fn open_copy(dev: &SimDevice, pool_id: u64) -> (Arc<SimDevice>, Pool) {
    let copy = dev.crash_losing_all_unsynced();
    let pool = Pool::open(copy.clone(), opts(pool_id)).expect("a copy of a fixture pool opens");
    (copy, pool)
}

#[track_caller]
fn assert_sound(pool: &Pool, what: &str) {
    match pool.check() {
        Ok(r) => assert!(r.is_ok(), "{what}: the pool fails its check: {:?}", r.problems),
        Err(e) => panic!("{what}: the check fails: {e}"),
    }
}

fn commit_content(pool: &Pool, c: CommitId) -> Option<Vec<(String, Vec<u8>)>> {
    let info = pool.commits(DOT).ok()?.into_iter().find(|i| i.id == c)?;
    let mut out = Vec::new();
    for (subdot, size) in info.subdots {
        let mut b = vec![0u8; size as usize];
        pool.commit_volume(DOT, c, Some(&subdot)).ok()?.read(0, &mut b).ok()?;
        out.push((subdot, b));
    }
    Some(out)
}

/// After a receive: a refused stream leaves every dot as it was, and an interrupted one keeps only a pending
/// receive (which aborts cleanly); an accepted one makes its commit visible. Either way the pool passes its check,
/// then and after a reopen.
#[allow(clippy::too_many_arguments)]
fn judge_receive(
    dev: &Arc<SimDevice>,
    pool: Pool,
    pool_id: u64,
    r: Result<blockmesh_engine::ReceiveOutcome, Error>,
    before: &[blockmesh_engine::DotInfo],
    expect_exact: Option<(CommitId, &Content)>,
    resealed: bool,
    fresh: bool,
) {
    match r {
        Ok(out) => {
            let dot =
                pool.dot(&out.dot).unwrap_or_else(|e| panic!("accepted stream's dot {} is missing: {e}", out.dot));
            assert!(dot.commits > 0, "accepted stream left no commit");
            assert!(
                pool.commits(&out.dot).is_ok_and(|cs| cs.iter().any(|c| c.id == out.commit)),
                "accepted commit {} is not visible",
                out.commit
            );
            if !resealed {
                // Without recomputed checksums only the true stream can pass: its contents must be the sender's.
                let (c, content) = expect_exact.expect("an accepted unsealed stream is one of the fixture's");
                assert_eq!(out.commit, c, "accepted a stream carrying another commit");
                let got = commit_content(&pool, c).expect("received commit reads back");
                assert!(got == content, "an accepted stream's contents differ from the sender's commit");
            }
        }
        Err(Error::StreamInterrupted { commit, resume_at_bytes, ended_at_bytes, .. }) => {
            assert!(resume_at_bytes <= ended_at_bytes, "resume point {resume_at_bytes} past the end {ended_at_bytes}");
            assert_eq!(pool.dots(), before, "an interrupted stream changed the visible dots");
            let pending = pool.pending_receives().expect("pending receives");
            assert!(
                pending.iter().any(|p| p.commit.to_string() == commit && p.resume_at_bytes == resume_at_bytes),
                "an interrupted receive of {commit} is not pending: {pending:?}"
            );
        }
        Err(e) => {
            assert_eq!(pool.dots(), before, "a refused stream changed the visible dots");
            if fresh {
                match pool.pending_receives() {
                    Ok(p) => assert!(p.is_empty(), "a refused stream ({e}) left a pending receive: {p:?}"),
                    Err(pe) => panic!("a refused stream ({e}) broke the pending receives: {pe}"),
                }
            }
        }
    }
    assert_sound(&pool, "after the receive");
    let after = pool.dots();
    for p in pool.pending_receives().expect("pending receives") {
        pool.abort_receive(p.commit).expect("an interrupted receive aborts");
    }
    assert!(pool.pending_receives().expect("pending").is_empty());
    assert_sound(&pool, "after aborting interrupted receives");
    pool.close().expect("close");
    let again = Pool::open(dev.clone(), opts(pool_id)).expect("the receiver reopens");
    assert_eq!(again.dots(), after, "the reopened receiver differs");
    assert_sound(&again, "after a reopen");
}

/// Property of `stream_receive`. The first byte picks the case:
/// - 0: the rest is the stream, raw, into an empty pool;
/// - 1: the fixture's whole stream, mutated (see `mutated_stream`), into an empty pool or (bit 2) one holding it;
/// - 2: the incremental stream, mutated, into a pool holding its base or (bit 2) an empty one;
/// - 3: the whole stream cut short, then a resume from the offset the receiver reported (or, bit 2, one taken from
///   the input): the original head and the rest of the stream, mutated.
///
/// Never a panic or a hang; a refused stream leaves the visible dots as they were and the pool passes `Pool::check`;
/// an accepted stream whose checksums were not recomputed carries exactly the sender's commit.
pub fn check_stream_receive(data: &[u8]) {
    let f = stream_fixture();
    let mut u = Input::new(data);
    let mode = u.u8();
    let alt = mode & 4 != 0;
    match mode % 4 {
        0 => {
            let (dev, pool) = open_copy(&f.empty, 2);
            let before = pool.dots();
            let s = u.rest();
            let r = pool.receive(&mut &s[..]);
            judge_receive(&dev, pool, 2, r, &before, None, true, true);
        }
        1 | 2 => {
            let (stream, base_needed) = if mode % 4 == 1 { (&f.full, false) } else { (&f.inc, true) };
            let (c, content) = if base_needed { (f.c2, &f.c2_content) } else { (f.c1, &f.c1_content) };
            let holds_c1 = base_needed != alt;
            let (src, id) = if holds_c1 { (&f.with_c1, 3) } else { (&f.empty, 2) };
            let (dev, pool) = open_copy(src, id);
            let before = pool.dots();
            let (s, resealed) = mutated_stream(stream, &mut u);
            let head = blockmesh_engine::read_stream_head(&mut &s[..]).ok();
            let r = pool.receive(&mut &s[..]);
            // (a resealed stream may name another dot, commit or base: then it is another stream)
            if !holds_c1 && base_needed && !resealed {
                assert!(r.is_err(), "an incremental stream was accepted without its base");
            }
            if holds_c1 && !base_needed && head.as_ref().is_some_and(|h| h.commit == f.c1 && h.dot == DOT) {
                assert!(r.is_err(), "a commit the pool holds was received again");
            }
            judge_receive(&dev, pool, id, r, &before, Some((c, content)), resealed, true);
        }
        _ => {
            let (dev, pool) = open_copy(&f.empty, 2);
            let before = pool.dots();
            let head = head_len(&f.full).expect("fixture stream head");
            let cut = head + usize::from(u.u16()) % (f.full.len() - head);
            let first = pool.receive(&mut &f.full[..cut]);
            let resume_at = match first {
                Err(Error::StreamInterrupted { resume_at_bytes, .. }) => resume_at_bytes,
                other => panic!("a stream cut at {cut} of {} was not interrupted: {other:?}", f.full.len()),
            };
            let offset = if alt { u64::from(u.u32()) } else { resume_at };
            // The whole stream is mutated (and resealed), the resume sends the original head and the rest of it.
            let (s, resealed) = mutated_stream(&f.full, &mut u);
            let mut rest = f.full[..head].to_vec();
            rest.extend_from_slice(&s[(offset as usize).min(s.len())..]);
            let r = pool.resume_receive(&mut &rest[..], offset);
            if offset != resume_at {
                assert!(r.is_err(), "a resume from byte {offset} was accepted; the receive stopped at {resume_at}");
            }
            judge_receive(&dev, pool, 2, r, &before, Some((f.c1, &f.c1_content)), resealed, false);
        }
    }
}

/// A closed pool image for `pool_open`: volumes, snapshots, a dot with commits and branches, and log records written
/// after its last checkpoint (so opening it replays them); and the blocks of it that hold anything.
#[derive(Debug)]
pub struct ImageFixture {
    pub image: Arc<SimDevice>,
    /// Device blocks (4 KiB) that are not all zero.
    pub used_blocks: Vec<u64>,
    /// Log records: (header block, kind, payload blocks).
    pub records: Vec<(u64, u16, u32)>,
}

const RECORD_MAGIC: u32 = 0x4352_4d42;
const RECORD_VERSION: u16 = 2;
const RECORD_KIND_CHECKPOINT: u16 = 5;
const RECORD_HEADER_CRC_AT: usize = 44;
const RECORD_PAYLOAD_CRC_AT: usize = 40;
const SB_CHECKPOINT_PBA_AT: usize = 56;
const SB_CHECKPOINT_CRC_AT: usize = 68;
const SB_CRC_AT: usize = BS - 4;

/// The image fixture, built on first use.
pub fn image_fixture() -> &'static ImageFixture {
    static F: OnceLock<ImageFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dev = SimDevice::new(DEVICE_BYTES);
        let pool = Pool::create(dev.clone(), opts(9)).expect("pool");
        let v = pool.create_volume("vol", 256 << 10).expect("vol");
        v.write(0, &pattern(11, 20 << 10)).expect("w");
        v.write(200 << 10, &pattern(12, 4096)).expect("w");
        pool.snapshot(&[("vol", "snap")]).expect("snap");
        v.write_zeroes(4096, 8192).expect("z");
        pool.create_dot(DOT, &[(DEFAULT_SUBDOT, 64 << 10), (LOGS, 8 << 10)]).expect("dot");
        pool.dot_volume(DOT, None).expect("d").write(8192, &pattern(13, 4096)).expect("w");
        let c = pool.commit(DOT, msg("one")).expect("commit");
        pool.create_branch(DOT, "dev", Some(c)).expect("branch");
        pool.checkpoint().expect("checkpoint");
        // Flushed after the checkpoint: replayed on open.
        v.write(64 << 10, &pattern(14, 8192)).expect("w");
        pool.dot_volume(DOT, Some(LOGS)).expect("l").write(0, &pattern(15, 1024)).expect("w");
        pool.commit(DOT, msg("two")).expect("commit");
        pool.create_volume("late", 32 << 10).expect("late");
        pool.flush().expect("flush");
        drop(pool); // no close: the records after the checkpoint stay to be replayed
        let image = dev.crash_losing_all_unsynced();
        let mut used_blocks = Vec::new();
        let mut records = Vec::new();
        let mut b = vec![0u8; BS];
        for blk in 0..DEVICE_BYTES / BS as u64 {
            image.peek(&mut b, blk * BS as u64);
            if b.iter().any(|&x| x != 0) {
                used_blocks.push(blk);
                let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                if le32(0) == RECORD_MAGIC && u16::from_le_bytes([b[4], b[5]]) == RECORD_VERSION {
                    records.push((blk, u16::from_le_bytes([b[6], b[7]]), le32(24)));
                }
            }
        }
        ImageFixture { image, used_blocks, records }
    })
}

fn peek_block(dev: &SimDevice, blk: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    dev.peek(&mut b, blk * BS as u64);
    b
}

/// Make checksums right again over the `touched` blocks of an image: of each log record holding one (its payload crc
/// of a checkpoint, its header crc), then of both superblocks (their checkpoint payload crc, their own crc).
pub fn reseal_image(dev: &SimDevice, records: &[(u64, u16, u32)], touched: &[u64]) {
    let mut checkpoint_crcs = Vec::new();
    for &(pba, kind, payload_blocks) in records {
        let last = pba + u64::from(payload_blocks);
        if !touched.iter().any(|&t| (pba..=last).contains(&t)) {
            continue;
        }
        let mut h = peek_block(dev, pba);
        if kind == RECORD_KIND_CHECKPOINT {
            let mut payload = vec![0u8; payload_blocks as usize * BS];
            dev.peek(&mut payload, (pba + 1) * BS as u64);
            let crc = crc32fast::hash(&payload);
            h[RECORD_PAYLOAD_CRC_AT..RECORD_PAYLOAD_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            checkpoint_crcs.push((pba, crc));
        }
        h[RECORD_HEADER_CRC_AT..RECORD_HEADER_CRC_AT + 4].fill(0);
        let crc = crc32fast::hash(&h);
        h[RECORD_HEADER_CRC_AT..RECORD_HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        dev.poke(&h, pba * BS as u64);
    }
    for slot in [0u64, 1] {
        let mut sb = peek_block(dev, slot);
        let pba = u64::from_le_bytes(sb[SB_CHECKPOINT_PBA_AT..SB_CHECKPOINT_PBA_AT + 8].try_into().expect("8 bytes"));
        let fixed = checkpoint_crcs.iter().find(|(p, _)| *p == pba);
        if !touched.contains(&slot) && fixed.is_none() {
            continue;
        }
        if let Some((_, crc)) = fixed {
            sb[SB_CHECKPOINT_CRC_AT..SB_CHECKPOINT_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32fast::hash(&sb[..SB_CRC_AT]);
        sb[SB_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        dev.poke(&sb, slot * BS as u64);
    }
}

/// Use an opened (possibly damaged) pool every way a daemon would: check, scrub, list, read some of every volume,
/// snapshot and commit, write, flush, close, reopen. Errors are fine; panics and hangs are not.
fn exercise(dev: &Arc<SimDevice>, pool: Pool) {
    let _ = pool.check();
    let _ = pool.scrub(&mut |_, _| {});
    let _ = pool.stats();
    let _ = pool.pending_receives();
    let mut buf = vec![0u8; MAX_READ_BYTES as usize];
    let mut read_some = |vol: blockmesh_engine::Volume, size: u64| {
        let n = size.min(MAX_READ_BYTES) as usize;
        let _ = vol.read(0, &mut buf[..n]);
        if size >= 4096 {
            let _ = vol.read(size / 4096 * 4096 - 4096, &mut buf[..4096]);
        }
        let _ = vol.allocation(0, size.min(1 << 30));
    };
    for v in pool.volumes().into_iter().take(16) {
        if let Ok(vol) = pool.volume(&v.name) {
            read_some(vol, v.size_bytes);
        }
    }
    for s in pool.snapshots().into_iter().take(16) {
        if let Ok(vol) = pool.snapshot_volume(&s.name) {
            read_some(vol, s.size_bytes);
        }
    }
    for d in pool.dots().into_iter().take(4) {
        for c in pool.commits(&d.name).unwrap_or_default().into_iter().take(4) {
            for (subdot, size) in c.subdots.iter().take(4) {
                if let Ok(vol) = pool.commit_volume(&d.name, c.id, Some(subdot)) {
                    read_some(vol, *size);
                }
            }
            let _ = pool.send(&d.name, c.id, None, &mut std::io::sink());
        }
    }
    if let Ok(v) = pool.create_volume("fuzz-new", 64 << 10) {
        let _ = v.write(0, &pattern(99, 8192));
    }
    let _ = pool.flush();
    if pool.close().is_ok() {
        if let Ok(again) = Pool::open(dev.clone(), opts(9)) {
            let _ = again.check();
        }
    }
}

/// Property of `pool_open`. The first byte picks the case:
/// - 0: the rest of the input, raw, at the start of an otherwise zero device;
/// - otherwise: the fixture's image with up to [`MAX_MUTATIONS`] block edits (xor a byte, set a little-endian u32,
///   zero a block, copy one used block over another) at used blocks the input picks; with bit 1 of the mode, the
///   checksums over the edited blocks are recomputed so the damage gets past them.
///
/// `Pool::open` then either refuses with an error or gives a pool that can be checked, scrubbed, read, written,
/// closed and reopened; any of those may fail with an error, none may panic or hang. The unedited image must open
/// and pass its check.
pub fn check_pool_open(data: &[u8]) {
    let f = image_fixture();
    let mut u = Input::new(data);
    let mode = u.u8();
    // Blocks this input may have changed from the fixture image: its edits and, resealed, the record headers and
    // superblocks (every other block is the fixture's: the copy of a closed pool is exact).
    let mut poked = Vec::new();
    let dev = if mode == 0 {
        let dev = SimDevice::new(DEVICE_BYTES);
        let raw = u.rest();
        let mut padded = raw[..raw.len().min(DEVICE_BYTES as usize)].to_vec();
        padded.resize(padded.len().div_ceil(512) * 512, 0);
        dev.poke(&padded, 0);
        dev
    } else {
        let dev = f.image.crash_losing_all_unsynced();
        let mut touched = Vec::new();
        for _ in 0..MAX_MUTATIONS {
            if u.is_empty() {
                break;
            }
            let kind = u.u8();
            let blk = f.used_blocks[usize::from(u.u16()) % f.used_blocks.len()];
            let at = usize::from(u.u16()) % BS;
            let mut b = peek_block(&dev, blk);
            match kind % 4 {
                0 => b[at] ^= u.u8().max(1),
                1 => {
                    let v = u.u32().to_le_bytes();
                    let at = at.min(BS - 4);
                    b[at..at + 4].copy_from_slice(&v);
                }
                2 => b.fill(0),
                _ => b = peek_block(&dev, f.used_blocks[at % f.used_blocks.len()]),
            }
            dev.poke(&b, blk * BS as u64);
            touched.push(blk);
        }
        if mode & 2 != 0 {
            reseal_image(&dev, &f.records, &touched);
            poked.extend([0, 1]);
            poked.extend(f.records.iter().map(|r| r.0));
        }
        poked.extend(touched);
        dev
    };
    // (comparing only the poked blocks: comparing every used block took a third of each execution)
    let untouched = mode != 0 && poked.iter().all(|&blk| peek_block(&dev, blk) == peek_block(&f.image, blk));
    match Pool::open(dev.clone(), opts(9)) {
        Ok(pool) => {
            if untouched {
                assert_sound(&pool, "the unedited image");
            }
            exercise(&dev, pool);
        }
        Err(e) => assert!(!untouched, "the unedited image does not open: {e}"),
    }
}
