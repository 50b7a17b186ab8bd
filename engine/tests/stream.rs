//! Send and receive: full and incremental streams move commits between pools byte for byte with the same ids; bad
//! streams (random bytes, every truncation, flipped bits, missing base, newer version, replays) are refused and leave
//! the target as it was.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::{CommitId, CommitRequest, Error, Pool, DEFAULT_SUBDOT, STREAM_VERSION};
use common::{pattern, sim_pool, small_opts};

fn msg(m: &str) -> CommitRequest {
    CommitRequest { message: m.into(), author: "a".into(), time_unix_secs: Some(7), ..Default::default() }
}

fn read_commit(pool: &Pool, dot: &str, c: CommitId, subdot: &str, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    pool.commit_volume(dot, c, Some(subdot)).unwrap().read(0, &mut b).unwrap();
    b
}

/// A source pool with two commits of a two-subdot dot.
fn source() -> (Pool, CommitId, CommitId) {
    let (_dev, pool) = sim_pool(32 << 20, 1);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 2 << 20), ("logs", (256 << 10) + 1536)]).unwrap();
    let d = pool.dot_volume("admin/db", None).unwrap();
    let l = pool.dot_volume("admin/db", Some("logs")).unwrap();
    d.write(0, &pattern(1, 1 << 20)).unwrap();
    d.write_zeroes(1 << 20, 64 << 10).unwrap();
    l.write(512, &pattern(2, 4096)).unwrap();
    l.write((256 << 10) + 512, &pattern(3, 1024)).unwrap(); // the partial last block
    let c1 = pool.commit("admin/db", msg("one")).unwrap();
    d.write(4096 * 7, &pattern(4, 8192)).unwrap();
    d.trim(0, 8192).unwrap();
    l.write(0, &pattern(5, 512)).unwrap();
    let c2 = pool.commit("admin/db", msg("two")).unwrap();
    (pool, c1, c2)
}

fn same_commit(a: &Pool, b: &Pool, c: CommitId) {
    for (s, size) in [(DEFAULT_SUBDOT, 2 << 20), ("logs", (256 << 10) + 1536)] {
        assert!(read_commit(a, "admin/db", c, s, size) == read_commit(b, "admin/db", c, s, size), "subdot {s}");
    }
}

#[test]
fn full_then_incremental_between_pools() {
    let (src, c1, c2) = source();
    let (dev, dst) = sim_pool(32 << 20, 2);
    let mut full = Vec::new();
    let stats = src.send("admin/db", c1, None, &mut full).unwrap();
    assert_eq!(stats.stream_bytes, full.len() as u64);
    assert_eq!(src.send_size("admin/db", c1, None, 0).unwrap(), full.len() as u64);
    let out = dst.receive(&mut &full[..]).unwrap();
    assert_eq!((out.dot.as_str(), out.commit), ("admin/db", c1));
    same_commit(&src, &dst, c1);
    assert_eq!(dst.dot("admin/db").unwrap().current_branch, "master");

    let mut inc = Vec::new();
    let istats = src.send("admin/db", c2, Some(c1), &mut inc).unwrap();
    assert!(istats.data_bytes < 64 << 10, "incremental carries only what changed: {istats:?}");
    assert!(inc.len() < full.len() / 10);
    dst.receive(&mut &inc[..]).unwrap();
    same_commit(&src, &dst, c2);
    let log = dst.log("admin/db", None).unwrap();
    assert_eq!(log.iter().map(|c| c.id).collect::<Vec<_>>(), vec![c2, c1], "master moved forward");
    assert_eq!(log[0].message, "two");
    // the head follows the received commit
    let mut head = vec![0u8; 8192];
    dst.dot_volume("admin/db", None).unwrap().read(0, &mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0), "trimmed on the sender, zero on the receiver");
    // a replayed stream is refused
    assert!(matches!(dst.receive(&mut &inc[..]), Err(Error::BadStream(_))));
    dst.close().unwrap();
    let dst = Pool::open(dev, small_opts(2)).unwrap();
    assert!(dst.check().unwrap().is_ok());
    same_commit(&src, &dst, c2);
}

/// Length of a stream's head (magic, version, header length, header, crc).
fn head_len(stream: &[u8]) -> usize {
    16 + u32::from_le_bytes(stream[12..16].try_into().unwrap()) as usize + 4
}

/// Places to cut a stream: inside the head, at every record boundary and in the middle of every record.
fn cuts(stream: &[u8]) -> Vec<usize> {
    let mut cuts = vec![0, 4, 8, 12, 16, 20];
    let head = head_len(stream);
    cuts.push((16 + head) / 2);
    let mut at = head;
    while at < stream.len() {
        cuts.push(at);
        let len = u32::from_le_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
        cuts.push(at + 5 + len / 2);
        at += 1 + 4 + len + 4;
    }
    assert_eq!(at, stream.len(), "records tile the stream");
    cuts.push(stream.len() - 1);
    cuts
}

/// The source, its commits, and streams of the first (whole) and of the second (since the first).
fn streams() -> (Pool, CommitId, CommitId, Vec<u8>, Vec<u8>) {
    let (src, c1, c2) = source();
    let mut full = Vec::new();
    src.send("admin/db", c1, None, &mut full).unwrap();
    let mut inc = Vec::new();
    src.send("admin/db", c2, Some(c1), &mut inc).unwrap();
    (src, c1, c2, full, inc)
}

/// What a refused stream must not change.
fn fingerprint(pool: &Pool) -> (Vec<blockmesh_engine::DotInfo>, u64, u64) {
    pool.checkpoint().unwrap();
    let s = pool.stats();
    (pool.dots(), s.live_blocks, s.volumes)
}

#[test]
fn bad_streams_are_refused_and_change_nothing() {
    let (src, c1, _, full, inc) = streams();

    let (_dev, dst) = sim_pool(32 << 20, 3);
    let empty = fingerprint(&dst);
    // an incremental stream without its base
    assert!(matches!(dst.receive(&mut &inc[..]), Err(Error::BadStream(m)) if m.contains("base")));
    assert_eq!(fingerprint(&dst), empty);
    // random bytes
    assert!(matches!(dst.receive(&mut &pattern(9, 4096)[..]), Err(Error::BadStream(_))));
    // a newer stream version, and the older one (before resumable streams)
    let mut newer = full.clone();
    newer[8..12].copy_from_slice(&(STREAM_VERSION + 1).to_le_bytes());
    let r = dst.receive(&mut &newer[..]);
    assert!(matches!(r, Err(Error::UnsupportedVersion { found, .. }) if found == STREAM_VERSION + 1), "{r:?}");
    let mut older = full.clone();
    older[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(dst.receive(&mut &older[..]), Err(Error::BadStream(m)) if m.contains("predates")));
    assert_eq!(fingerprint(&dst), empty);

    // truncations in the head are refused; later ones keep what arrived (hidden) for a resume
    let head = head_len(&full);
    for cut in cuts(&full) {
        let r = dst.receive(&mut &full[..cut]);
        if cut < head {
            assert!(matches!(r, Err(Error::BadStream(_))), "cut at {cut}: {r:?}");
        } else {
            assert!(
                matches!(r, Err(Error::StreamInterrupted { resume_at_bytes, .. }) if resume_at_bytes as usize <= cut)
            );
        }
        assert_eq!(dst.dots(), empty.0, "cut at {cut}: nothing visible changes");
    }
    let pending = dst.pending_receives().unwrap();
    assert_eq!(pending.len(), 1, "one interrupted receive of the commit, the latest: {pending:?}");
    assert_eq!((pending[0].dot.as_str(), pending[0].commit), ("admin/db", c1));
    dst.abort_receive(c1).unwrap();
    assert!(dst.pending_receives().unwrap().is_empty());
    assert_eq!(fingerprint(&dst), empty, "an aborted receive leaves nothing behind");

    // flipped bits anywhere: refused (a flipped record length can look like a stream that stopped early: then what
    // came before it is kept for a resume, which the flip makes fail)
    for (i, pos) in (0..full.len()).step_by((full.len() / 61).max(1)).enumerate() {
        let mut bad = full.clone();
        bad[pos] ^= 1 << (i % 8);
        let r = dst.receive(&mut &bad[..]);
        assert!(r.is_err(), "flip at byte {pos} accepted");
        if let Err(Error::StreamInterrupted { resume_at_bytes, .. }) = r {
            let mut rest = bad[..head].to_vec();
            rest.extend_from_slice(&bad[resume_at_bytes as usize..]);
            assert!(dst.resume_receive(&mut &rest[..], resume_at_bytes).is_err(), "flip at byte {pos} resumed");
        }
        for p in dst.pending_receives().unwrap() {
            dst.abort_receive(p.commit).unwrap();
        }
    }
    assert_eq!(fingerprint(&dst), empty, "corrupt streams leave nothing behind");

    // and the good stream still goes in afterwards
    dst.receive(&mut &full[..]).unwrap();
    same_commit(&src, &dst, c1);
    assert!(dst.check().unwrap().is_ok());
}

#[test]
fn receiving_keeps_local_work_on_a_diverged_branch() {
    let (src, c1, c2) = source();
    let (_dev, dst) = sim_pool(32 << 20, 4);
    let mut full = Vec::new();
    src.send("admin/db", c1, None, &mut full).unwrap();
    dst.receive(&mut &full[..]).unwrap();
    // local, uncommitted work on master
    dst.dot_volume("admin/db", None).unwrap().write(0, &pattern(42, 4096)).unwrap();
    let mut inc = Vec::new();
    src.send("admin/db", c2, Some(c1), &mut inc).unwrap();
    dst.receive(&mut &inc[..]).unwrap();
    let mut b = vec![0u8; 4096];
    dst.dot_volume("admin/db", None).unwrap().read(0, &mut b).unwrap();
    assert_eq!(b, pattern(42, 4096), "uncommitted local writes are never overwritten by a receive");
    assert_eq!(dst.commits("admin/db").unwrap().len(), 2, "the commit joins the history");
    same_commit(&src, &dst, c2);
}

/// An interrupted receive resumes from the last complete record, whichever the cut, for full and incremental
/// streams; the stream to resume with is what `send_from` writes.
#[test]
fn receive_resumes_after_a_cut_anywhere() {
    let (src, c1, c2, full, inc) = streams();
    for (which, stream) in [("full", &full), ("incremental", &inc)] {
        let head = head_len(stream);
        for (i, cut) in cuts(stream).into_iter().filter(|c| *c >= head).enumerate() {
            let (dev, dst) = sim_pool(32 << 20, 100 + i as u64);
            if which == "incremental" {
                dst.receive(&mut &full[..]).unwrap();
            }
            let Err(Error::StreamInterrupted { resume_at_bytes: at, .. }) = dst.receive(&mut &stream[..cut]) else {
                panic!("{which} cut at {cut} is an interruption");
            };
            assert!(at as usize <= cut && at as usize >= head);
            // a crash now loses nothing that was kept
            drop(dst);
            let dst = Pool::open(dev.crash_losing_all_unsynced(), small_opts(100 + i as u64)).unwrap();
            let pending = dst.pending_receives().unwrap();
            assert_eq!(pending.iter().map(|p| p.resume_at_bytes).collect::<Vec<_>>(), vec![at], "{which} at {cut}");
            // what the sender writes for the resume is the head and the rest of the stream
            let (from, base) = if which == "full" { (c1, None) } else { (c2, Some(c1)) };
            let mut rest = Vec::new();
            let stats = src.send_from("admin/db", from, base, at, &mut rest).unwrap();
            assert_eq!(src.send_size("admin/db", from, base, at).unwrap(), rest.len() as u64, "send_size");
            let h = blockmesh_engine::read_stream_head(&mut &rest[..]).unwrap();
            assert_eq!((h.commit, h.base, h.bytes.len()), (from, base, head));
            assert_eq!(rest, [&stream[..head], &stream[at as usize..]].concat());
            assert_eq!((stats.stream_bytes, stats.written_bytes), (stream.len() as u64, rest.len() as u64));
            // a wrong offset is refused and keeps the pending receive
            let r = dst.resume_receive(&mut &rest[..], at + 1);
            assert!(matches!(r, Err(Error::BadStream(m)) if m.contains("goes on from byte")));
            let out = dst.resume_receive(&mut &rest[..], at).unwrap();
            assert_eq!(out.commit, from);
            assert!(dst.pending_receives().unwrap().is_empty());
            same_commit(&src, &dst, from);
            assert!(dst.check().unwrap().is_ok(), "{which} cut at {cut}");
        }
    }
}

/// Resuming needs the interrupted receive and the same stream.
#[test]
fn resume_refuses_other_streams() {
    let (src, c1, c2) = source();
    let mut full = Vec::new();
    src.send("admin/db", c1, None, &mut full).unwrap();
    let (_dev, dst) = sim_pool(32 << 20, 5);
    let head = head_len(&full);
    let r = dst.resume_receive(&mut &full[..], head as u64);
    assert!(matches!(r, Err(Error::BadStream(m)) if m.contains("no interrupted receive")));
    let cut = full.len() / 2;
    let Err(Error::StreamInterrupted { resume_at_bytes: at, .. }) = dst.receive(&mut &full[..cut]) else {
        panic!("a cut stream is an interruption")
    };
    // the head of another stream of the same commit (a different base) does not resume it
    let mut other = Vec::new();
    src.send("admin/db", c2, None, &mut other).unwrap();
    let r = dst.resume_receive(&mut &other[..], at);
    assert!(matches!(r, Err(Error::BadStream(m)) if m.contains("no interrupted receive")), "other commit");
    // a fresh receive of the same commit starts over
    dst.receive(&mut &full[..]).unwrap();
    assert!(dst.pending_receives().unwrap().is_empty());
    same_commit(&src, &dst, c1);
    assert!(dst.check().unwrap().is_ok());
}

/// Two receives of one commit at once: the second is refused while the first runs (they would share staging
/// volumes), and the first completes untouched.
#[test]
fn concurrent_receives_of_one_commit_are_serialized() {
    use std::io::Read;
    use std::sync::mpsc;
    let (src, c1, _, full, _) = streams();
    let (_dev, dst) = sim_pool(32 << 20, 6);
    let dst = std::sync::Arc::new(dst);
    // the first receive reads the head, then waits for the rest
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    struct Fed(mpsc::Receiver<Vec<u8>>, Vec<u8>);
    impl Read for Fed {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            while self.1.is_empty() {
                match self.0.recv() {
                    Ok(v) => self.1 = v,
                    Err(_) => return Ok(0),
                }
            }
            let n = buf.len().min(self.1.len());
            buf[..n].copy_from_slice(&self.1[..n]);
            self.1.drain(..n);
            Ok(n)
        }
    }
    let head = head_len(&full);
    tx.send(full[..head + 100].to_vec()).unwrap();
    let first = {
        let dst = dst.clone();
        std::thread::spawn(move || dst.receive(&mut Fed(rx, Vec::new())))
    };
    // wait until the first has staged its volumes (hidden, but counted)
    let start = std::time::Instant::now();
    while dst.stats().volumes == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "the first receive never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(dst.pending_receives().unwrap().is_empty(), "a running receive is not an interrupted one");
    let r = dst.receive(&mut &full[..]);
    assert!(matches!(&r, Err(Error::BadStream(m)) if m.contains("another receive")), "{r:?}");
    tx.send(full[head + 100..].to_vec()).unwrap();
    drop(tx);
    assert_eq!(first.join().unwrap().unwrap().commit, c1);
    same_commit(&src, &dst, c1);
    assert!(dst.check().unwrap().is_ok());
}
