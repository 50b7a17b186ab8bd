//! The server against real third-party clients from Debian: nbdinfo, qemu-io, nbdsh (libnbd), nbdcopy, qemu-img.
//! Under `CI=true` a missing client fails the test; elsewhere it is skipped with a message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use blockmesh_nbd::ServerConfig;
use common::*;

fn start() -> SocketServer {
    SocketServer::start(exports(), ServerConfig::default())
}

#[test]
fn nbdinfo_lists_every_export_with_size_flags_contexts_and_block_sizes() {
    if !have("nbdinfo") {
        return;
    }
    let s = start();
    let out = run(Command::new("nbdinfo").arg("--list").arg(s.uri("")));
    // One block per export, in name order.
    let blocks: Vec<&str> = out.split("export=").skip(1).collect();
    assert_eq!(blocks.len(), 3, "{out}");
    let disk = blocks.iter().find(|b| b.starts_with("\"disk\"")).unwrap();
    for line in [
        "description: test disk",
        "export-size: 67108864",
        "base:allocation",
        "is_read_only: false",
        "can_multi_conn: true",
        "can_trim: true",
        "can_zero: true",
        "can_fua: true",
        "can_flush: true",
        "can_cache: true",
        "can_df: true",
        "can_fast_zero: true",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
    ] {
        assert!(disk.contains(line), "disk lacks {line:?}:\n{disk}");
    }
    let ro = blocks.iter().find(|b| b.starts_with("\"ro\"")).unwrap();
    for line in ["export-size: 8388608", "is_read_only: true", "can_trim: false", "can_zero: false"] {
        assert!(ro.contains(line), "ro lacks {line:?}:\n{ro}");
    }
    let aligned = blocks.iter().find(|b| b.starts_with("\"aligned\"")).unwrap();
    assert!(aligned.contains("block_size_minimum: 512"), "{aligned}");
    assert!(aligned.contains("block_size_maximum: 1048576"), "{aligned}");
    // One export, and its map.
    let one = run(Command::new("nbdinfo").arg(s.uri("ro")));
    assert!(one.contains("export-size: 8388608"), "{one}");
    let map = run(Command::new("nbdinfo").arg("--map").arg(s.uri("ro")));
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0][..3], ["0", "1048576", "0"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "7340032", "3"], "{map}");
}

#[test]
fn qemu_io_writes_and_reads_patterns_with_fua_flush_discard_and_zeroes() {
    if !have("qemu-io") {
        return;
    }
    let s = start();
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args([
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -f -P 0xa5 1M 64k",
            "-c",
            "write -P 0x01 3000 1000",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 0 2048",
            "-c",
            "read -P 0x01 3000 1000",
            "-c",
            "read -P 0xa5 1M 64k",
            "-c",
            "discard 256k 256k",
            "-c",
            "write -z 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "aio_write -P 0x77 4M 64k",
            "-c",
            "aio_write -P 0x78 5M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x77 4M 64k",
            "-c",
            "read -P 0x78 5M 64k",
        ])
        .arg(s.uri("disk")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    // The data is really there for another client.
    let check = run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0xa5 1M 64k"]).arg(s.uri("disk")));
    assert!(!check.contains("Pattern verification failed"), "{check}");
    // Read-only export: qemu opens it read-only and refuses writes.
    let ro = run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0xab 0 1M"]).arg(s.uri("ro")));
    assert!(!ro.contains("Pattern verification failed"), "{ro}");
    let err = run_failing(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k"]).arg(s.uri("ro")));
    assert!(err.contains("read-only") || err.contains("Permission denied"), "{err}");
}

#[test]
fn nbdsh_drives_block_status_structured_reads_errors_and_multi_conn() {
    if !have("nbdsh") {
        return;
    }
    let s = start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/edge_cases.py");
    let code = format!("SOCKET = {:?}\nexec(open({:?}).read())", s.socket.display().to_string(), script);
    let out = run(Command::new("nbdsh").arg("-c").arg(code));
    assert_eq!(out.trim(), "ok");
}

#[test]
fn nbdcopy_copies_a_whole_export_in_and_out() {
    if !have("nbdcopy") {
        return;
    }
    let s = start();
    let src = s.dir.path().join("src.raw");
    let back = s.dir.path().join("back.raw");
    // A 64 MiB image: patterned data with a hole in the middle.
    let mut img = vec![0u8; 64 << 20];
    for (i, b) in img.iter_mut().enumerate().take(20 << 20) {
        *b = (i % 251) as u8;
    }
    img[(50 << 20)..(51 << 20)].fill(0xC3);
    std::fs::write(&src, &img).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(s.uri("disk")));
    run(Command::new("nbdcopy").arg(s.uri("disk")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == img, "bytes differ after the round trip");
    // Through several connections and requests in flight.
    run(Command::new("nbdcopy").args(["--connections=4", "--requests=16"]).arg(s.uri("disk")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == img, "bytes differ after the multi-connection copy");
}

#[test]
fn qemu_img_convert_and_compare_against_a_local_raw_file() {
    if !have("qemu-img") {
        return;
    }
    let s = start();
    let src = s.dir.path().join("img.raw");
    let mut img = vec![0u8; 64 << 20];
    for (i, chunk) in img.chunks_mut(1 << 20).enumerate() {
        if i % 3 == 0 {
            chunk.fill(i as u8 + 1);
        }
    }
    std::fs::write(&src, &img).unwrap();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(s.uri("disk")));
    let same = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(s.uri("disk")));
    assert!(same.contains("Images are identical"), "{same}");
    // A difference is found.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xee 40M 4k"]).arg(s.uri("disk")));
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri("disk"))
        .env("PATH", path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
}
