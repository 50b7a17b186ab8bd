//! The kernel attach path: a volume's export attached to /dev/nbdN over generic netlink, written through the
//! device, read back through the daemon's NBD export, detached. Runs only as root where /dev/nbd0 exists (the nbd
//! module loaded); elsewhere it says why it did not run. The NBD handshake it starts with runs everywhere.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use blockmesh_csi::ids::VolumeId;
use blockmesh_csi::kernel::{probe_export, KernelNbdAttacher, NbdTarget};
use blockmesh_csi::node::Attacher;
use common::Daemon;

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

#[test]
fn kernel_nbd_attach_writes_reach_the_volume() {
    let root = rustix::process::geteuid().is_root();
    let nbd = std::path::Path::new("/dev/nbd0").exists();
    if !root || !nbd {
        println!(
            "kernel attach test not run: needs root and /dev/nbd0 (the nbd module loaded: modprobe nbd); here root={root}, /dev/nbd0 exists={nbd}"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.client().init("admin/kern", &["__default__"], 16 << 20).unwrap();
    let attacher = KernelNbdAttacher::new(NbdTarget::Unix(d.nbd_socket.clone()));
    let volume = VolumeId::parse("admin/kern/__default__").unwrap();
    let dev = attacher.attach(&volume).unwrap();
    {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[0x42; 4096]).unwrap();
        f.sync_all().unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        let mut back = [0u8; 4096];
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, [0x42; 4096]);
    }
    attacher.detach(&dev).unwrap();
    if common::have("qemu-io") {
        common::qemu_io(&d.uri("admin/kern"), true, &["read -P 0x42 1M 4k"]);
    }
}
