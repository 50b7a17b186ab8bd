//! Space usage: what a dot's heads map, what only its commits hold, for the pool and per dot; blocks shared by
//! branches, commits and clones count once; zeroes and trims take nothing. Ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::{CommitRequest, Pool, SpaceUsage, DEFAULT_SUBDOT};
use common::{pattern, sim_pool, small_opts};

const KIB: u64 = 1024;

fn msg(m: &str) -> CommitRequest {
    CommitRequest { message: m.into(), author: "test".into(), time_unix_secs: Some(1), ..Default::default() }
}

fn dot_usage(pool: &Pool, dot: &str) -> SpaceUsage {
    let u = pool.usage().unwrap();
    u.dots.into_iter().find(|d| d.dot == dot).unwrap_or_else(|| panic!("no usage for {dot}")).usage
}

#[test]
fn heads_and_commits_only_count_each_block_once() {
    let (dev, pool) = sim_pool(32 << 20, 41);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 4 << 20)]).unwrap();
    let head = || pool.dot_volume("admin/db", None).unwrap();
    // A over blocks 0..256, committed; B over 0..64, committed; C over 64..128 in the head only
    head().write(0, &pattern(1, 1 << 20)).unwrap();
    let c1 = pool.commit("admin/db", msg("A")).unwrap();
    head().write(0, &pattern(2, 256 << 10)).unwrap();
    pool.commit("admin/db", msg("B")).unwrap();
    head().write(256 << 10, &pattern(3, 256 << 10)).unwrap();
    let u = dot_usage(&pool, "admin/db");
    assert_eq!(u.logical_bytes, 4 << 20);
    assert_eq!(u.written_bytes, 1 << 20, "the head maps B, C and the rest of A: 256 blocks");
    assert_eq!(u.commits_only_bytes, 512 * KIB, "A's first 128 blocks live only in the commits");

    // zeroes and trims in the head map no data: those blocks leave `written`, and A's copies stay with the commits
    head().write_zeroes(512 << 10, 256 << 10).unwrap();
    head().trim(768 << 10, 256 << 10).unwrap();
    let u = dot_usage(&pool, "admin/db");
    assert_eq!(u.written_bytes, 512 * KIB);
    assert_eq!(u.commits_only_bytes, 1024 * KIB, "A's blocks 0..128 and 128..256 now only in commits");

    // a branch from the first commit shares its blocks: they become head data again, counted once
    pool.create_branch("admin/db", "old", Some(c1)).unwrap();
    let u = dot_usage(&pool, "admin/db");
    assert_eq!(u.written_bytes, (512 + 1024) * KIB, "master's 128 blocks plus A whole (on the branch)");
    assert_eq!(u.commits_only_bytes, 0, "every committed block is in some head");
    assert_eq!(u.logical_bytes, 8 << 20, "two heads of 4 MiB");

    // the pool adds a plain volume; a clone of a commit into another dot shares everything
    let v = pool.create_volume("plain", 1 << 20).unwrap();
    v.write(0, &pattern(9, 64 << 10)).unwrap();
    let before = pool.usage().unwrap().pool;
    assert_eq!(before.written_bytes, (512 + 1024 + 64) * KIB);
    assert_eq!(before.logical_bytes, (8 << 20) + (1 << 20));
    let u = pool.usage().unwrap();
    assert_eq!(u.dots.len(), 1);

    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(41)).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(pool.usage().unwrap().pool, before, "the same after a reopen");
    assert_eq!(dot_usage(&pool, "admin/db").written_bytes, (512 + 1024) * KIB);
}

#[test]
fn an_empty_pool_uses_nothing() {
    let (_dev, pool) = sim_pool(16 << 20, 42);
    let u = pool.usage().unwrap();
    assert_eq!(u.pool, SpaceUsage::default());
    assert!(u.dots.is_empty());
    pool.create_dot("admin/empty", &[(DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    pool.commit("admin/empty", msg("nothing")).unwrap();
    let u = dot_usage(&pool, "admin/empty");
    assert_eq!(u, SpaceUsage { logical_bytes: 1 << 20, written_bytes: 0, commits_only_bytes: 0 });
}
