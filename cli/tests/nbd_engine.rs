//! Engine volumes served over NBD, checked with real clients (qemu-io, nbdinfo, qemu-img) and with the daemon binary.
//! Under `CI=true` a missing client fails the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blockmesh::nbd_export::PoolExports;
use blockmesh_engine::{CommitRequest, Pool, PoolOptions, DEFAULT_SUBDOT};
use blockmesh_nbd::{Exports, Server, ServerConfig};
use common::have;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    assert!(!text.contains("Pattern verification failed"), "{cmd:?}: {text}");
    text
}

fn serve(pool: Arc<Pool>, socket: &Path) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = Server::new(Arc::new(PoolExports::new(pool)), ServerConfig::default()).unwrap();
    let listener = {
        let _g = rt.enter();
        Server::bind_unix(socket).unwrap()
    };
    rt.spawn(async move { server.serve_unix(listener).await });
    rt
}

#[test]
fn dot_heads_are_writable_and_commits_read_only_over_nbd() {
    if !have("qemu-io") || !have("nbdinfo") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = Arc::new(Pool::create_file(&dir.path().join("pool"), 1 << 30, PoolOptions::default()).unwrap());
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 64 << 20), ("logs", 16 << 20)]).unwrap();
    pool.create_volume("plain", 8 << 20).unwrap();
    let socket = dir.path().join("nbd.sock");
    let rt = serve(pool.clone(), &socket);
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", socket.display());

    let list = run(Command::new("nbdinfo").arg("--list").arg(uri("")));
    for name in ["export=\"admin/db\"", "export=\"admin/db.logs\"", "export=\"plain\""] {
        assert!(list.contains(name), "{name} missing:\n{list}");
    }
    assert!(list.contains("block_size_minimum: 512"), "{list}");
    assert!(!list.contains('#'), "internal volumes are not exported:\n{list}");

    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 -f 8M 64k"])
        .arg(uri("admin/db")));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 0 4k"]).arg(uri("admin/db.logs")));
    let commit = pool.commit("admin/db", CommitRequest { message: "first".into(), ..Default::default() }).unwrap();
    // The head moves on; the commit keeps the old bytes, read-only.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x44 0 1M", "-c", "write -z 8M 64k"])
        .arg(uri("admin/db")));
    let at = format!("admin/db@{commit}");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 8M 64k"])
        .arg(uri(&at)));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x44 0 1M", "-c", "read -P 0 8M 64k"])
        .arg(uri("admin/db")));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x33 0 4k"])
        .arg(uri(&format!("admin/db.logs@{commit}"))));
    let info = run(Command::new("nbdinfo").arg(uri(&at)));
    assert!(info.contains("is_read_only: true"), "{info}");
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k"]).arg(uri(&at)).output().unwrap();
    assert!(!out.status.success(), "writing a commit export must fail");

    // The allocation map comes from the engine.
    let map = run(Command::new("nbdinfo").arg("--map").arg(uri("admin/db")));
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0][..3], ["0", "1048576", "0"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "7340032", "3"], "{map}");
    assert_eq!(rows[2][..3], ["8388608", "65536", "2"], "written zeroes are allocated zeroes: {map}");

    // qemu-img against a local copy.
    let local = dir.path().join("copy.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(uri("admin/db")).arg(&local));
    let same =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&local).arg(uri("admin/db")));
    assert!(same.contains("identical"), "{same}");

    // Unknown names are refused; a bad commit id too.
    let exports = PoolExports::new(pool.clone());
    assert!(exports.open("admin/nope").is_none());
    assert!(exports.open("admin/db@xyz").is_none());
    assert!(exports.open("#whatever").is_none());
    rt.shutdown_background();

    // Reopen: everything written over NBD and flushed is there, and the pool checks clean.
    pool.flush().unwrap();
    drop(exports);
    let pool = Arc::try_unwrap(pool).unwrap();
    pool.close().unwrap();
    let pool = Pool::open_file(&dir.path().join("pool"), PoolOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    pool.dot_volume("admin/db", None).unwrap().read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x44));
    let report = pool.check().unwrap();
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn the_daemon_serves_the_default_pool_and_stops_cleanly_on_sigterm() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A pool with one dot, made with the library.
    let pool = Pool::create_file(&data.join("pool.bm"), 1 << 30, PoolOptions::default()).unwrap();
    pool.create_dot("admin/web", &[(DEFAULT_SUBDOT, 32 << 20)]).unwrap();
    pool.close().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--data-dir"])
        .arg(&data)
        .arg("--nbd-listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--api-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let socket = data.join("nbd.sock");
    let start = std::time::Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "daemon did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5e 0 64k", "-c", "flush"])
        .arg(format!("nbd://127.0.0.1:{port}/admin/web")));
    let info = run(Command::new("nbdinfo").arg(format!("nbd+unix:///admin/web?socket={}", socket.display())));
    assert!(info.contains("export-size: 33554432"), "{info}");
    // SIGTERM: graceful stop, exit 0.
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon exit status {status}");
    let pool = Pool::open_file(&data.join("pool.bm"), PoolOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    pool.dot_volume("admin/web", None).unwrap().read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5e));
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn a_missing_pool_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_blockmesh"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .arg("--pool")
        .arg(dir.path().join("nope"))
        .args(["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
}
