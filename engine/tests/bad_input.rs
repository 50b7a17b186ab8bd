//! Bad input gets a clear error and changes nothing: files that are not pools, truncated pools, pools of a newer
//! format, and requests that are empty, oversized, unaligned or out of range.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;

use blockmesh_engine::io::{Device, FileDevice, SimDevice};
use blockmesh_engine::{Error, Pool, PoolOptions, MAX_IO_BYTES};
use common::{pattern, sim_pool, small_opts};

#[test]
fn a_file_of_random_bytes_is_not_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&pattern(1, 4 << 20)).unwrap();
    drop(f);
    let before = std::fs::read(&path).unwrap();
    match Pool::open_file(&path, PoolOptions::default()) {
        Err(Error::NotAPool(what)) => assert!(what.contains("random"), "names the file: {what}"),
        other => panic!("expected NotAPool, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), before, "a refused open writes nothing");
}

#[test]
fn an_empty_or_tiny_file_is_not_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    for size in [0u64, 512, 8192] {
        let path = dir.path().join(format!("f{size}"));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        assert!(matches!(Pool::open_file(&path, PoolOptions::default()), Err(Error::NotAPool(_))), "size {size}");
    }
    let path = dir.path().join("zeros");
    std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
    assert!(matches!(Pool::open_file(&path, PoolOptions::default()), Err(Error::NotAPool(_))));
}

#[test]
fn a_truncated_pool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let opts = PoolOptions { segment_size_bytes: 1 << 20, ..PoolOptions::default() };
    let pool = Pool::create_file(&path, 32 << 20, opts.clone()).unwrap();
    pool.create_volume("v", 1 << 20).unwrap().write(0, &pattern(2, 4096)).unwrap();
    pool.close().unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(20 << 20).unwrap();
    match Pool::open_file(&path, opts) {
        Err(Error::Truncated { device_bytes, pool_bytes }) => {
            assert_eq!(device_bytes, 20 << 20);
            assert!(pool_bytes > device_bytes);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

/// Rewrite both superblocks with format `version` and a valid checksum.
fn set_superblock_version(dev: &SimDevice, version: u32) {
    for off in [0u64, 4096] {
        let mut b = vec![0u8; 4096];
        dev.peek(&mut b, off);
        b[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&b[..4092]);
        b[4092..].copy_from_slice(&crc.to_le_bytes());
        dev.poke(&b, off);
    }
}

#[test]
fn a_pool_of_a_newer_format_is_refused_untouched() {
    let (dev, pool) = sim_pool(8 << 20, 7);
    pool.close().unwrap();
    set_superblock_version(&dev, 99);
    let before = dev.io_count();
    match Pool::open(dev.clone(), small_opts(7)) {
        Err(Error::UnsupportedVersion { found, supported }) => {
            assert_eq!((found, supported), (99, blockmesh_engine::format::FORMAT_VERSION))
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    assert_eq!(dev.unsynced_writes(), 0);
    assert!(dev.io_count() - before <= 2, "only the superblocks were read");
}

/// A pool of an older, incompatible format (version 1, before records carried `synced_below`) is refused with a
/// message saying so, and left untouched.
#[test]
fn a_pool_of_an_older_format_is_refused_untouched() {
    let (dev, pool) = sim_pool(8 << 20, 8);
    pool.close().unwrap();
    set_superblock_version(&dev, 1);
    match Pool::open(dev.clone(), small_opts(8)) {
        Err(e @ Error::OlderFormat { found: 1, .. }) => assert!(e.to_string().contains("older build")),
        other => panic!("expected OlderFormat, got {other:?}"),
    }
    assert_eq!(dev.unsynced_writes(), 0);
}

#[test]
fn requests_are_validated() {
    let (_dev, pool) = sim_pool(8 << 20, 8);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(v.read(0, &mut []), Err(Error::InvalidArgument(_))), "zero-length read");
    assert!(matches!(v.write(0, &[]), Err(Error::InvalidArgument(_))), "zero-length write");
    assert!(matches!(v.trim(0, 0), Err(Error::InvalidArgument(_))));
    assert!(matches!(v.write_zeroes(0, 0), Err(Error::InvalidArgument(_))));
    assert!(matches!(v.read(100, &mut buf), Err(Error::Unaligned { what: "offset", .. })));
    assert!(matches!(v.read(0, &mut buf[..700]), Err(Error::Unaligned { what: "length", .. })));
    assert!(matches!(v.write((1 << 20) - 512, &buf), Err(Error::OutOfRange { .. })));
    assert!(matches!(v.read(u64::MAX - 511, &mut buf[..512]), Err(Error::OutOfRange { .. })));
    assert!(matches!(v.trim(1 << 20, 512), Err(Error::OutOfRange { .. })));
    let big = vec![1u8; (MAX_IO_BYTES + 512) as usize];
    let big_vol = pool.create_volume("big", 64 << 20).unwrap();
    assert!(matches!(big_vol.write(0, &big), Err(Error::InvalidArgument(_))), "oversize write");
    // nothing was written by any of the refused requests
    v.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn names_and_sizes_are_validated() {
    let (_dev, pool) = sim_pool(8 << 20, 9);
    for bad in ["", "a b", "x\n", "tab\t", "ünï", &"n".repeat(201)] {
        assert!(matches!(pool.create_volume(bad, 4096), Err(Error::InvalidArgument(_))), "{bad:?}");
    }
    for size in [0u64, 100, 4097, 1 << 51] {
        assert!(matches!(pool.create_volume("ok", size), Err(Error::InvalidArgument(_))), "size {size}");
    }
    pool.create_volume("admin/db.logs@1", 4096).unwrap();
    assert!(matches!(pool.create_volume("admin/db.logs@1", 4096), Err(Error::VolumeExists(_))));
    assert!(matches!(pool.volume("nope"), Err(Error::NoSuchVolume(_))));
    assert!(matches!(pool.delete_volume("nope"), Err(Error::NoSuchVolume(_))));
    assert!(matches!(pool.resize_volume("nope", 4096, false), Err(Error::NoSuchVolume(_))));
}

#[test]
fn pool_creation_is_validated() {
    let small = SimDevice::new(512 << 10);
    assert!(matches!(Pool::create(small, PoolOptions::default()), Err(Error::InvalidArgument(_))));
    for seg in [0u64, 3 << 20, 64 << 10, 2 << 30] {
        let dev = SimDevice::new(64 << 20);
        let opts = PoolOptions { segment_size_bytes: seg, ..PoolOptions::default() };
        assert!(matches!(Pool::create(dev, opts), Err(Error::InvalidArgument(_))), "segment size {seg}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    Pool::create_file(&path, 16 << 20, PoolOptions { segment_size_bytes: 1 << 20, ..PoolOptions::default() }).unwrap();
    assert!(Pool::create_file(&path, 16 << 20, PoolOptions::default()).is_err(), "create never overwrites a file");
    assert_eq!(FileDevice::open(&path).unwrap().size_bytes(), 16 << 20);
}

/// A version 2 pool (the format before the cleaner's Moved records) opens, keeps its data, and is written as the
/// current version from its recovery checkpoint on (so an older build then refuses it rather than misread it).
#[test]
fn a_pool_of_the_previous_format_opens_and_is_upgraded() {
    let (dev, pool) = sim_pool(8 << 20, 9);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    let data = common::pattern(9, 1 << 20);
    v.write(0, &data).unwrap();
    pool.close().unwrap();
    set_superblock_version(&dev, 2);
    let pool = Pool::open(dev.clone(), small_opts(9)).unwrap();
    let mut back = vec![0u8; 1 << 20];
    pool.volume("v").unwrap().read(0, &mut back).unwrap();
    assert!(back == data, "the data of the older pool reads back");
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    pool.close().unwrap();
    let versions: Vec<u32> = [0u64, 4096]
        .iter()
        .map(|&off| {
            let mut b = vec![0u8; 4096];
            dev.peek(&mut b, off);
            u32::from_le_bytes([b[8], b[9], b[10], b[11]])
        })
        .collect();
    assert!(versions.iter().all(|&v| v == blockmesh_engine::format::FORMAT_VERSION), "superblocks: {versions:?}");
}
