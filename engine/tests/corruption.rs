//! Damaged media: flipped bits in data, tree nodes, block-table pages, checkpoints and superblocks are reported as
//! errors naming where, never returned as data.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{Error, Pool};
use common::{pattern, sim_pool, small_opts};

const POOL: u64 = 16 << 20;

/// Device blocks holding `needle` (a 4 KiB data pattern) on the medium.
fn find_block(dev: &SimDevice, needle: &[u8]) -> Vec<u64> {
    let mut hits = Vec::new();
    let mut buf = vec![0u8; 4096];
    for b in 0..POOL / 4096 {
        dev.peek(&mut buf, b * 4096);
        if buf == needle {
            hits.push(b * 4096);
        }
    }
    hits
}

#[test]
fn flipped_data_bit_is_a_checksum_error_naming_volume_and_offset() {
    let (dev, pool) = sim_pool(POOL, 1);
    let vol = pool.create_volume("db", 1 << 20).unwrap();
    let data = pattern(9, 4096);
    vol.write(8192, &data).unwrap();
    pool.close().unwrap();
    let at = find_block(&dev, &data);
    assert_eq!(at.len(), 1);
    dev.flip_bit(at[0] + 100, 3);
    let pool = Pool::open(dev.clone(), small_opts(1)).unwrap();
    let mut buf = vec![0u8; 4096];
    match pool.volume("db").unwrap().read(8192, &mut buf) {
        Err(Error::Checksum { volume, volume_offset_bytes, device_offset_bytes, .. }) => {
            assert_eq!(volume, "db");
            assert_eq!(volume_offset_bytes, 8192);
            assert_eq!(device_offset_bytes, at[0]);
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    // a read of a range that includes the bad block fails too; other blocks still read
    assert!(pool.volume("db").unwrap().read(4096, &mut vec![0u8; 8192]).is_err());
    pool.volume("db").unwrap().read(0, &mut buf).unwrap();
    let report = pool.check().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains(&format!("{}", at[0])));
}

#[test]
fn flipped_bit_in_a_buffered_unflushed_data_block_on_disk_is_caught_after_flush() {
    let (dev, pool) = sim_pool(POOL, 2);
    let vol = pool.create_volume("v", 1 << 20).unwrap();
    let data = pattern(3, 4096);
    vol.write(0, &data).unwrap();
    vol.flush().unwrap();
    let at = find_block(&dev, &data);
    dev.flip_bit(at[0], 0);
    assert!(matches!(vol.read(0, &mut vec![0u8; 4096]), Err(Error::Checksum { .. })));
}

/// Every metadata block of a checkpointed pool, damaged in turn: the pool either refuses to open with a corruption
/// error, or opens and reports the damage on read or check; it never returns wrong bytes.
#[test]
fn flipped_metadata_bits_are_reported_not_returned_as_data() {
    let (dev, pool) = sim_pool(POOL, 3);
    let vol = pool.create_volume("v", 4 << 20).unwrap();
    let mut expect = vec![0u8; 4 << 20];
    for i in 0..64u64 {
        let d = pattern(i, 4096);
        let off = (i * 37 % 1024) * 4096;
        vol.write(off, &d).unwrap();
        expect[off as usize..off as usize + 4096].copy_from_slice(&d);
    }
    pool.close().unwrap();
    // metadata blocks: every non-zero block that is not one of the data blocks
    let mut metadata = Vec::new();
    let mut buf = vec![0u8; 4096];
    for b in 0..POOL / 4096 {
        dev.peek(&mut buf, b * 4096);
        if buf.iter().any(|&x| x != 0) && !expect.chunks(4096).any(|c| c == &buf[..]) {
            metadata.push(b * 4096);
        }
    }
    assert!(metadata.len() > 5, "superblocks, headers, nodes, pages, checkpoint: {}", metadata.len());
    let mut refused = 0;
    let mut detected_later = 0;
    for &at in &metadata {
        let damaged = dev.crash_losing_all_unsynced();
        damaged.flip_bit(at + 8 * 17 + 5, 2);
        match Pool::open(damaged.clone(), small_opts(3)) {
            Err(e) => {
                assert!(e.is_corruption() || matches!(e, Error::NotAPool(_)), "block {at}: {e}");
                refused += 1;
            }
            Ok(pool) => {
                let mut all = vec![0u8; 4 << 20];
                match pool.volume("v").and_then(|v| v.read(0, &mut all)) {
                    Ok(()) => {
                        if all != expect {
                            // only acceptable if the integrity check says something is wrong
                            let report = pool.check().unwrap();
                            assert!(!report.is_ok(), "block {at}: wrong data returned with a clean check");
                            detected_later += 1;
                        }
                    }
                    Err(e) => {
                        assert!(e.is_corruption(), "block {at}: {e}");
                        detected_later += 1;
                    }
                }
            }
        }
    }
    eprintln!("{} metadata blocks damaged: {refused} refused at open, {detected_later} reported later", metadata.len());
}

#[test]
fn damaged_newest_superblock_falls_back_to_the_other_copy() {
    let (dev, pool) = sim_pool(POOL, 4);
    let vol = pool.create_volume("v", 1 << 20).unwrap();
    vol.write(0, &pattern(1, 4096)).unwrap();
    pool.close().unwrap();
    // find the newest superblock: the one with the higher generation (offset 24 in the block)
    let gen = |off: u64| {
        let mut b = [0u8; 8];
        dev.peek(&mut b, off + 24);
        u64::from_le_bytes(b)
    };
    let newest = if gen(0) > gen(4096) { 0 } else { 4096 };
    dev.flip_bit(newest + 40, 1);
    let pool = Pool::open(dev.clone() as Arc<SimDevice>, small_opts(4)).unwrap();
    let mut buf = vec![0u8; 4096];
    pool.volume("v").unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 4096));
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn both_superblocks_damaged_is_a_corruption_error_not_a_repair() {
    let (dev, pool) = sim_pool(POOL, 5);
    pool.close().unwrap();
    dev.flip_bit(100, 0);
    dev.flip_bit(4096 + 100, 0);
    match Pool::open(dev.clone(), small_opts(5)) {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains("superblock"), "{e}"),
        other => panic!("expected corruption, got {other:?}"),
    }
    // and the device is left as it was: no repair attempted
    let mut b = [0u8; 512];
    dev.peek(&mut b, 0);
    dev.flip_bit(100, 0);
    dev.flip_bit(4096 + 100, 0);
    Pool::open(dev, small_opts(5)).unwrap();
}

/// Scrub reads everything, finds a flipped bit in a block that a head and a commit share, and names both users and
/// the offset; a clean pool scrubs clean. Nothing is repaired.
#[test]
fn scrub_finds_a_bad_block_and_names_who_uses_it() {
    let (dev, pool) = common::sim_pool(16 << 20, 77);
    pool.create_dot("admin/db", &[(blockmesh_engine::DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    let head = pool.dot_volume("admin/db", None).unwrap();
    let marker = common::pattern(77, 4096);
    head.write(0, &common::pattern(78, 1 << 20)).unwrap();
    head.write(5 * 4096, &marker).unwrap();
    let c = pool.commit("admin/db", Default::default()).unwrap();
    pool.checkpoint().unwrap();
    let mut calls = 0;
    let clean = pool
        .scrub(&mut |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
    assert!(clean.is_ok() && clean.blocks_checked >= 256 && calls >= 1, "{clean:?}");
    // find the marker block on the device and flip one bit of it
    let at = find_block(&dev, &marker)[0];
    dev.flip_bit(at + 100, 3);
    let r = pool.scrub(&mut |_, _| {}).unwrap();
    assert_eq!(r.bad.len(), 1, "{r:?}");
    let p = &r.bad[0];
    assert_eq!(p.device_offset_bytes, at);
    assert!(p.used_by.iter().any(|u| u == "admin/db.__default__ (branch master) @ byte 20480"), "{p:?}");
    assert!(p.used_by.iter().any(|u| *u == format!("admin/db.__default__@{c} @ byte 20480")), "{p:?}");
    // still reported by reads, never returned as data
    let mut back = vec![0u8; 4096];
    assert!(matches!(head.read(5 * 4096, &mut back), Err(blockmesh_engine::Error::Checksum { .. })));
}

/// Regression: a bit flip in a flushed log record written after the last checkpoint used to end replay there and
/// silently drop every later flushed write. A later record now says what had been synced, so the open fails with a
/// corruption error naming the damaged record instead.
#[test]
fn a_damaged_flushed_log_record_is_reported_not_silently_truncated() {
    let (dev, pool) = sim_pool(16 << 20, 78);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    pool.checkpoint().unwrap();
    let first = pattern(1, 4096);
    v.write(0, &first).unwrap();
    v.flush().unwrap();
    v.write(4096, &pattern(2, 4096)).unwrap();
    v.flush().unwrap();
    drop(pool);
    // damage the first flushed record's data block
    let at = find_block(&dev, &first)[0];
    dev.flip_bit(at + 7, 1);
    let image = dev.crash_losing_all_unsynced();
    match Pool::open(image, small_opts(78)) {
        Err(Error::Corrupt { what, .. }) => assert_eq!(what, "log"),
        other => panic!("a damaged flushed record must be reported: {other:?}"),
    }
}
