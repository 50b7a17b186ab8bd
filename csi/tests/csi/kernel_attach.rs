//! The kernel attach path: a volume's export attached to /dev/nbdN over generic netlink, written through the
//! device, read back through the daemon's NBD export, detached; and adoption after a node plugin restart: a second
//! attacher adopts the device of a first one that stopped, and I/O goes on across a restart of the server. These
//! run only as root where /dev/nbd0 exists (the nbd module loaded); elsewhere they say why they did not run. The
//! NBD handshake they start with runs everywhere.
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::common::Daemon;
use blockmesh_csi::ids::VolumeId;
use blockmesh_csi::kernel::{probe_export, KernelNbdAttacher, NbdTarget, MONITOR_INTERVAL};
use blockmesh_csi::node::Attacher;

#[test]
fn handshake_reads_the_export_size_and_refuses_unknown_exports() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.client().init("admin/k", &["__default__"], 8 << 20).unwrap();
    let target = NbdTarget::Unix(d.nbd_socket.clone());
    assert_eq!(probe_export(&target, "admin/k").unwrap().size_bytes, 8 << 20);
    assert_eq!(probe_export(&NbdTarget::Tcp(d.nbd.clone()), "admin/k").unwrap().size_bytes, 8 << 20);
    let err = probe_export(&target, "admin/nope").unwrap_err();
    assert!(matches!(err, blockmesh_csi::Error::NotFound(_)), "{err}");
}

/// Whether the kernel tests can run here; says why not when they cannot.
fn kernel_nbd_here(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    let nbd = std::path::Path::new("/dev/nbd0").exists();
    if !root || !nbd {
        println!(
            "{test} not run: needs root and /dev/nbd0 (the nbd module loaded: modprobe nbd); here root={root}, /dev/nbd0 exists={nbd}"
        );
    }
    root && nbd
}

/// Writes `byte` over 4 KiB at 1 MiB through `dev` and reads it back.
fn write_and_read_back(dev: &std::path::Path, byte: u8) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&[byte; 4096]).unwrap();
    f.sync_all().unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    let mut back = [0u8; 4096];
    f.read_exact(&mut back).unwrap();
    assert_eq!(back, [byte; 4096]);
}

#[test]
fn kernel_nbd_attach_writes_reach_the_volume() {
    if !kernel_nbd_here("kernel attach test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.client().init("admin/kern", &["__default__"], 16 << 20).unwrap();
    let attacher = KernelNbdAttacher::new(Arc::new(NbdTarget::Unix(d.nbd_socket.clone())));
    let volume = VolumeId::parse("admin/kern/__default__").unwrap();
    let dev = attacher.attach(&volume).unwrap();
    write_and_read_back(&dev, 0x42);
    attacher.detach(&dev).unwrap();
    if crate::common::have("qemu-io") {
        crate::common::qemu_io(&d.uri("admin/kern"), true, &["read -P 0x42 1M 4k"]);
    }
}

#[test]
fn kernel_nbd_adopted_devices_survive_a_server_restart() {
    if !kernel_nbd_here("kernel adoption test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = Daemon::start(&data);
    d.client().init("admin/adopt", &["__default__"], 16 << 20).unwrap();
    let target = NbdTarget::Unix(d.nbd_socket.clone());
    let volume = VolumeId::parse("admin/adopt/__default__").unwrap();
    let first = KernelNbdAttacher::new(Arc::new(target.clone()));
    let dev = first.attach(&volume).unwrap();
    write_and_read_back(&dev, 0x17);
    // the node plugin restarts: its monitor ends (and closes its socket); the kernel keeps the device
    drop(first);
    std::thread::sleep(MONITOR_INTERVAL * 3);
    let second = KernelNbdAttacher::new(Arc::new(target));
    let before = second.condition(&dev).unwrap();
    assert!(before.abnormal && before.message.contains("not watched"), "{before:?}");
    second.adopt(&volume, &dev).unwrap();
    std::thread::sleep(MONITOR_INTERVAL * 3);
    let adopted = second.condition(&dev).unwrap();
    assert!(!adopted.abnormal && adopted.message.contains("watched for reconnects"), "{adopted:?}");
    // another volume's export is refused for that device (where the kernel keeps backend identifiers)
    let index = dev.file_name().unwrap().to_str().unwrap().trim_start_matches("nbd").to_string();
    if std::path::Path::new(&format!("/sys/block/nbd{index}/backend")).exists() {
        let other = VolumeId::parse("admin/other/__default__").unwrap();
        let refused = KernelNbdAttacher::new(Arc::new(NbdTarget::Unix(d.nbd_socket.clone()))).adopt(&other, &dev);
        assert!(matches!(refused, Err(blockmesh_csi::Error::NotFound(_))), "{refused:?}");
    }
    // the server restarts: I/O waits for the adopted device's monitor to reconnect
    drop(d);
    let d = Daemon::start(&data);
    write_and_read_back(&dev, 0x18);
    assert!(!second.condition(&dev).unwrap().abnormal);
    second.detach(&dev).unwrap();
    if crate::common::have("qemu-io") {
        crate::common::qemu_io(&d.uri("admin/adopt"), true, &["read -P 0x18 1M 4k"]);
    }
}
