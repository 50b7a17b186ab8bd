//! Dots: the Dotmesh workflow on the engine. Subdots, commits, log, branches, checkout, reset, clone, delete, diffs
//! between commits; commits are atomic across subdots, also under crashes. Ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::io::SimFault;
use blockmesh_engine::{CommitId, CommitRequest, Error, ExtentKind, Pool, DEFAULT_SUBDOT};
use common::{pattern, sim_pool, small_opts};

fn msg(m: &str) -> CommitRequest {
    CommitRequest {
        message: m.into(),
        author: "tester".into(),
        time_unix_secs: Some(1_700_000_000),
        ..Default::default()
    }
}

fn read(pool: &Pool, dot: &str, subdot: Option<&str>, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    pool.dot_volume(dot, subdot).unwrap().read(off, &mut b).unwrap();
    b
}

fn read_commit(pool: &Pool, dot: &str, c: CommitId, subdot: Option<&str>, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    pool.commit_volume(dot, c, subdot).unwrap().read(0, &mut b).unwrap();
    b
}

#[test]
fn the_dotmesh_workflow() {
    let (dev, pool) = sim_pool(32 << 20, 1);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20), ("logs", 256 << 10)]).unwrap();
    let info = pool.dot("admin/db").unwrap();
    assert_eq!(info.current_branch, "master");
    assert_eq!(info.subdots.len(), 2);
    assert!(pool.volumes().is_empty(), "dot heads are not listed as plain volumes");

    let data = pool.dot_volume("admin/db", None).unwrap();
    let logs = pool.dot_volume("admin/db", Some("logs")).unwrap();
    data.write(0, &pattern(1, 8192)).unwrap();
    logs.write(0, &pattern(2, 4096)).unwrap();
    let c1 = pool.commit("admin/db", msg("first")).unwrap();
    data.write(0, &pattern(3, 4096)).unwrap();
    let c2 = pool.commit("admin/db", msg("second")).unwrap();
    data.write(0, &pattern(4, 4096)).unwrap(); // uncommitted

    let log = pool.log("admin/db", None).unwrap();
    assert_eq!(log.iter().map(|c| c.id).collect::<Vec<_>>(), vec![c2, c1], "newest first");
    assert_eq!(log[0].parents, vec![c1]);
    assert_eq!(log[1].message, "first");
    assert_eq!(log[1].subdots.len(), 2, "a commit holds every subdot");

    // commits read back as they were; the head has the uncommitted write
    assert_eq!(read_commit(&pool, "admin/db", c1, None, 4096), pattern(1, 4096));
    assert_eq!(read_commit(&pool, "admin/db", c2, None, 4096), pattern(3, 4096));
    assert_eq!(read(&pool, "admin/db", None, 0, 4096), pattern(4, 4096));
    assert!(matches!(pool.commit_volume("admin/db", c1, None).unwrap().write(0, &[1u8; 512]), Err(Error::ReadOnly(_))));

    // diffs between commits and against the head
    let d = pool.diff_commits("admin/db", c1, Some(c2), None).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].offset_bytes, d[0].len_bytes, d[0].kind), (0, 4096, ExtentKind::Data));
    assert!(pool.diff_commits("admin/db", c1, Some(c2), Some("logs")).unwrap().is_empty());

    // branch from c1, work there, switch back and forth
    pool.create_branch("admin/db", "experiment", Some(c1)).unwrap();
    pool.checkout("admin/db", "experiment").unwrap();
    assert_eq!(read(&pool, "admin/db", None, 0, 8192), pattern(1, 8192), "a branch starts at its commit");
    pool.dot_volume("admin/db", None).unwrap().write(4096, &pattern(5, 4096)).unwrap();
    let e1 = pool.commit("admin/db", msg("on experiment")).unwrap();
    assert_eq!(pool.log("admin/db", None).unwrap()[0].parents, vec![c1]);
    pool.checkout("admin/db", "master").unwrap();
    assert_eq!(read(&pool, "admin/db", None, 0, 4096), pattern(4, 4096));
    assert!(matches!(pool.delete_branch("admin/db", "master"), Err(Error::InvalidArgument(_))), "not the current");

    // reset --hard drops the uncommitted write, keeps commits
    pool.reset_branch("admin/db", "master", c2).unwrap();
    assert_eq!(read(&pool, "admin/db", None, 0, 4096), pattern(3, 4096));
    assert_eq!(pool.commits("admin/db").unwrap().len(), 3);

    // commits that others depend on cannot be deleted
    assert!(pool.delete_commit("admin/db", c1).is_err(), "parent of c2 and e1");
    assert!(pool.delete_commit("admin/db", e1).is_err(), "head of experiment");
    pool.delete_branch("admin/db", "experiment").unwrap();
    pool.delete_commit("admin/db", e1).unwrap();

    // clone a commit into a new dot
    pool.clone_dot("admin/db", c1, "admin/db-copy").unwrap();
    assert_eq!(read(&pool, "admin/db-copy", None, 0, 8192), pattern(1, 8192));
    assert_eq!(read(&pool, "admin/db-copy", Some("logs"), 0, 4096), pattern(2, 4096));
    pool.dot_volume("admin/db-copy", None).unwrap().write(0, &pattern(9, 4096)).unwrap();
    assert_eq!(read_commit(&pool, "admin/db", c1, None, 4096), pattern(1, 4096), "the source is untouched");

    // everything survives a reopen, and checks out
    pool.close().unwrap();
    let pool = Pool::open(dev.clone(), small_opts(1)).unwrap();
    assert!(pool.check().unwrap().is_ok());
    assert_eq!(pool.log("admin/db", None).unwrap().iter().map(|c| c.id).collect::<Vec<_>>(), vec![c2, c1]);
    assert_eq!(read(&pool, "admin/db", None, 0, 4096), pattern(3, 4096));
    assert_eq!(read(&pool, "admin/db-copy", None, 0, 4096), pattern(9, 4096));

    // deleting dots gives the space back
    pool.delete_dot("admin/db").unwrap();
    pool.delete_dot("admin/db-copy").unwrap();
    pool.checkpoint().unwrap();
    assert_eq!(pool.stats().live_blocks, 0);
    assert!(pool.dots().is_empty());
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(1)).unwrap();
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn names_and_limits_are_validated() {
    let (_dev, pool) = sim_pool(16 << 20, 2);
    for bad in ["db", "a/b/c", "/db", "a/", "a/..", "a b/c", "#x/y"] {
        assert!(matches!(pool.create_dot(bad, &[(DEFAULT_SUBDOT, 4096)]), Err(Error::InvalidArgument(_))), "{bad}");
    }
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 4096)]).unwrap();
    assert!(matches!(pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 4096)]), Err(Error::DotExists(_))));
    assert!(matches!(pool.dot("admin/nope"), Err(Error::NoSuchDot(_))));
    assert!(matches!(pool.checkout("admin/db", "nope"), Err(Error::NoSuchBranch(_))));
    assert!(pool.create_branch("admin/db", "b", None).is_err(), "nothing committed yet");
    let long = CommitRequest { message: "x".repeat(5000), ..Default::default() };
    assert!(matches!(pool.commit("admin/db", long), Err(Error::InvalidArgument(_))));
    let c = pool.commit("admin/db", msg("ok")).unwrap();
    assert!(matches!(pool.commit_volume("admin/db", CommitId([9; 16]), None), Err(Error::NoSuchCommit(_))));
    assert_eq!(c.to_string().parse::<CommitId>().unwrap(), c);
    assert!("xyz".parse::<CommitId>().is_err());
    // internal volumes cannot be reached or deleted by name
    assert!(pool.volume("#1/__default__/master").is_err());
    assert!(pool.delete_volume("#1/__default__/master").is_err());
    assert!(pool.check().unwrap().is_ok());
}

/// A commit of several subdots cut by a power failure at every I/O: after recovery the commit exists with every
/// subdot as it was, or not at all.
#[test]
fn commits_are_atomic_across_subdots_under_crashes() {
    let setup = || {
        let (dev, pool) = sim_pool(16 << 20, 3);
        pool.create_dot("admin/app", &[("a", 64 << 10), ("b", 64 << 10), ("c", 64 << 10)]).unwrap();
        for (i, s) in ["a", "b", "c"].iter().enumerate() {
            pool.dot_volume("admin/app", Some(s)).unwrap().write(0, &pattern(i as u64, 8192)).unwrap();
        }
        pool.flush().unwrap();
        (dev, pool)
    };
    let (dev, pool) = setup();
    let before = dev.io_count();
    pool.commit("admin/app", msg("all three")).unwrap();
    pool.flush().unwrap();
    let ios = dev.io_count() - before;
    let mut outcomes = [0usize; 2];
    for k in 0..=ios {
        let (dev, pool) = setup();
        dev.set_fault(SimFault::PowerCutAfter(k));
        let _ = pool.commit("admin/app", msg("all three")).and_then(|_| pool.flush());
        let image = dev.crash(k);
        drop(pool);
        let pool = Pool::open(image, small_opts(3)).unwrap();
        assert!(pool.check().unwrap().is_ok());
        let commits = pool.commits("admin/app").unwrap();
        assert!(commits.len() <= 1);
        if let Some(c) = commits.first() {
            assert_eq!(c.subdots.len(), 3);
            for (i, s) in ["a", "b", "c"].iter().enumerate() {
                let mut b = vec![0u8; 8192];
                pool.commit_volume("admin/app", c.id, Some(s)).unwrap().read(0, &mut b).unwrap();
                assert_eq!(b, pattern(i as u64, 8192));
            }
        }
        outcomes[commits.len()] += 1;
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "crashes land on both sides of the commit: {outcomes:?}");
}

/// Creating a branch cut by a power failure at every I/O: afterwards the branch exists with heads equal to its
/// commit, or it does not exist; nothing else changed.
#[test]
fn branch_creation_is_atomic_under_crashes() {
    let setup = || {
        let (dev, pool) = sim_pool(16 << 20, 4);
        pool.create_dot("admin/app", &[("a", 64 << 10), ("b", 64 << 10)]).unwrap();
        for (i, s) in ["a", "b"].iter().enumerate() {
            pool.dot_volume("admin/app", Some(s)).unwrap().write(0, &pattern(i as u64, 8192)).unwrap();
        }
        let c = pool.commit("admin/app", msg("base")).unwrap();
        pool.flush().unwrap();
        (dev, pool, c)
    };
    let (dev, pool, c) = setup();
    let before = dev.io_count();
    pool.create_branch("admin/app", "feature", Some(c)).unwrap();
    pool.flush().unwrap();
    let ios = dev.io_count() - before;
    let mut outcomes = [0usize; 2];
    for k in 0..=ios {
        let (dev, pool, c) = setup();
        dev.set_fault(SimFault::PowerCutAfter(k));
        let _ = pool.create_branch("admin/app", "feature", Some(c)).and_then(|_| pool.flush());
        let image = dev.crash(k ^ 0x77);
        drop(pool);
        let pool = Pool::open(image, small_opts(4)).unwrap();
        assert!(pool.check().unwrap().is_ok());
        let info = pool.dot("admin/app").unwrap();
        let has = info.branches.iter().any(|(b, head)| b == "feature" && *head == Some(c));
        if has {
            pool.checkout("admin/app", "feature").unwrap();
            for (i, s) in ["a", "b"].iter().enumerate() {
                let mut b = vec![0u8; 8192];
                pool.dot_volume("admin/app", Some(s)).unwrap().read(0, &mut b).unwrap();
                assert_eq!(b, pattern(i as u64, 8192));
            }
        } else {
            assert_eq!(info.branches.len(), 1, "no half-made branch");
        }
        outcomes[usize::from(has)] += 1;
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "crashes land on both sides: {outcomes:?}");
}

/// A subdot head grows and shrinks like a volume; commits keep the size they were taken at; branches are
/// independent.
#[test]
fn subdot_heads_resize() {
    let (dev, pool) = sim_pool(32 << 20, 40);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20), ("logs", 64 << 10)]).unwrap();
    let head = pool.dot_volume("admin/db", None).unwrap();
    head.write((1 << 20) - 4096, &pattern(1, 4096)).unwrap();
    let small = pool.commit("admin/db", msg("1 MiB")).unwrap();
    pool.resize_subdot("admin/db", None, 3 << 20, false).unwrap();
    assert_eq!(head.size_bytes().unwrap(), 3 << 20, "open handles see the new size");
    head.write((3 << 20) - 8192, &pattern(2, 8192)).unwrap();
    let info = pool.dot("admin/db").unwrap();
    assert!(info.subdots.contains(&(DEFAULT_SUBDOT.to_string(), 3 << 20)), "{info:?}");
    let big = pool.commit("admin/db", msg("3 MiB")).unwrap();
    assert_eq!(pool.commit_volume("admin/db", small, None).unwrap().size_bytes().unwrap(), 1 << 20);
    assert_eq!(pool.commit_volume("admin/db", big, None).unwrap().size_bytes().unwrap(), 3 << 20);
    // shrinking over written data needs force; over zeroes it does not
    let r = pool.resize_subdot("admin/db", None, 2 << 20, false);
    assert!(matches!(r, Err(Error::ShrinkDropsData { .. })), "{r:?}");
    pool.resize_subdot("admin/db", Some("logs"), 32 << 10, false).unwrap();
    pool.resize_subdot("admin/db", None, 2 << 20, true).unwrap();
    // a branch from the small commit keeps its own size
    pool.create_branch("admin/db", "old", Some(small)).unwrap();
    pool.checkout("admin/db", "old").unwrap();
    assert_eq!(pool.dot_volume("admin/db", None).unwrap().size_bytes().unwrap(), 1 << 20);
    assert!(matches!(pool.resize_subdot("admin/db", Some("nope"), 1 << 20, false), Err(Error::NoSuchVolume(_))));
    assert!(matches!(pool.resize_subdot("admin/db", None, 1000, false), Err(Error::InvalidArgument(_))));
    pool.checkout("admin/db", "master").unwrap();
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(40)).unwrap();
    let head = pool.dot_volume("admin/db", None).unwrap();
    assert_eq!(head.size_bytes().unwrap(), 2 << 20);
    assert_eq!(read(&pool, "admin/db", None, (1 << 20) - 4096, 4096), pattern(1, 4096));
    assert_eq!(read_commit(&pool, "admin/db", big, None, 3 << 20)[(3 << 20) - 8192..], pattern(2, 8192)[..]);
    assert_eq!(pool.dot_volume("admin/db", Some("logs")).unwrap().size_bytes().unwrap(), 32 << 10);
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn a_subdot_is_removed_from_the_current_branch_only() {
    let (dev, pool) = sim_pool(32 << 20, 11);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20), ("logs", 1 << 20)]).unwrap();
    pool.dot_volume("admin/db", Some("logs")).unwrap().write(0, &pattern(3, 64 << 10)).unwrap();
    let c = pool.commit("admin/db", msg("with logs")).unwrap();
    pool.create_branch("admin/db", "keep", Some(c)).unwrap();
    pool.remove_subdot("admin/db", "logs").unwrap();
    let info = pool.dot("admin/db").unwrap();
    assert_eq!(info.subdots.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), [DEFAULT_SUBDOT]);
    assert!(matches!(pool.dot_volume("admin/db", Some("logs")), Err(Error::NoSuchVolume(_))));
    // the commit and the other branch keep their copies
    assert_eq!(read_commit(&pool, "admin/db", c, Some("logs"), 64 << 10), pattern(3, 64 << 10));
    // refusals: unknown subdot, the last one
    assert!(matches!(pool.remove_subdot("admin/db", "logs"), Err(Error::NoSuchVolume(_))));
    assert!(matches!(pool.remove_subdot("admin/db", DEFAULT_SUBDOT), Err(Error::InvalidArgument(_))));
    // a subdot of the same name can come back, empty
    pool.add_subdot("admin/db", "logs", 1 << 20).unwrap();
    assert_eq!(read(&pool, "admin/db", Some("logs"), 0, 4096), vec![0u8; 4096]);
    pool.remove_subdot("admin/db", "logs").unwrap();
    pool.flush().unwrap();
    // replayed after a crash, then through a checkpoint
    let crashed = dev.crash_losing_all_unsynced();
    drop(pool);
    let pool = Pool::open(crashed.clone(), small_opts(11)).unwrap();
    assert_eq!(pool.dot("admin/db").unwrap().subdots.len(), 1);
    pool.checkout("admin/db", "keep").unwrap();
    assert_eq!(read(&pool, "admin/db", Some("logs"), 0, 64 << 10), pattern(3, 64 << 10));
    pool.close().unwrap();
    let pool = Pool::open(crashed, small_opts(11)).unwrap();
    assert_eq!(pool.dot("admin/db").unwrap().subdots.len(), 2, "branch keep has both");
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}
