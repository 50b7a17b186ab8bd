//! The real [`Attacher`]: the NBD handshake in user space (fixed newstyle, `NBD_OPT_GO`), then the connected socket
//! handed to the kernel's NBD driver over generic netlink (`NBD_CMD_CONNECT`), with a dead-connection timeout so
//! I/O waits for a reconnect instead of failing; a monitor thread per device watches its socket and, when the
//! server goes away (a restarted server pod), connects again and gives the kernel the new socket
//! (`NBD_CMD_RECONFIGURE`).
//!
//! The generic netlink messages are written here (a header, a command, a few attributes; about a hundred lines)
//! rather than with a netlink crate: the whole exchange is three commands, and rustix's safe socket calls keep the
//! crate free of `unsafe`. The kernel takes a socket by its descriptor number in our process (`NBD_SOCK_FD`), so
//! no descriptor passing is needed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::ids::VolumeId;
use crate::node::{Attacher, Condition};
use crate::{Error, Result};

/// How long the kernel holds I/O on a dead connection, waiting for a reconnect, before failing it.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);
/// Block size the device shows (the engine's block).
pub const DEVICE_BLOCK_BYTES: u64 = 4096;
/// How often a device's monitor looks at its socket, and retries a reconnect.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for the NBD server during a handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest option reply the handshake reads.
pub const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;
/// Receive buffer of a netlink answer.
const NETLINK_BUFFER_BYTES: usize = 16 << 10;

// NBD handshake (the NBD protocol document).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
const INFO_EXPORT: u16 = 0;

// Netlink and generic netlink (linux/netlink.h, linux/genetlink.h).
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// The kernel's NBD netlink interface (linux/nbd-netlink.h).
const NBD_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Where the daemon serves NBD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    /// Its Unix socket (the node's server, through a host path).
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// A connected NBD socket.
#[derive(Debug)]
enum Conn {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Conn {
    fn open(target: &NbdTarget) -> Result<Self> {
        let conn = match target {
            NbdTarget::Unix(p) => std::os::unix::net::UnixStream::connect(p).map(Conn::Unix),
            NbdTarget::Tcp(a) => std::net::TcpStream::connect(a).map(Conn::Tcp),
        };
        let conn = conn.map_err(|e| Error::io(format!("connecting to the NBD server at {target:?}"), e))?;
        let timeouts = match &conn {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).and(s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).and(s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
            }
        };
        timeouts.map_err(|e| Error::io("setting NBD socket timeouts", e))?;
        Ok(conn)
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }

    /// Clears the handshake's timeouts: the kernel's requests wait as long as they need.
    fn for_kernel(&self) -> Result<()> {
        let r = match self {
            Conn::Unix(s) => s.set_read_timeout(None).and(s.set_write_timeout(None)),
            Conn::Tcp(s) => s.set_read_timeout(None).and(s.set_write_timeout(None)).and(s.set_nodelay(true)),
        };
        r.map_err(|e| Error::io("clearing NBD socket timeouts", e))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// What `NBD_OPT_GO` told of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

fn read_u16(r: &mut dyn ReadWrite) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut dyn ReadWrite) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut dyn ReadWrite) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// The client's side of the fixed newstyle handshake up to transmission, for `export`.
fn handshake(s: &mut dyn ReadWrite, export: &str) -> Result<ExportInfo> {
    let io = |e| Error::io(format!("NBD handshake for export {export}"), e);
    let bad = |what: &str| Error::Internal(format!("NBD handshake for export {export}: {what}"));
    if read_u64(s).map_err(io)? != NBDMAGIC || read_u64(s).map_err(io)? != IHAVEOPT {
        return Err(bad("not a newstyle NBD server"));
    }
    let flags = read_u16(s).map_err(io)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server does not speak fixed newstyle"));
    }
    let mut out = Vec::new();
    out.extend_from_slice(&u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)).to_be_bytes());
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).map_err(|_| bad("export name too long"))?;
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(4 + name_len + 2).to_be_bytes());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&out).map_err(io)?;
    let mut info = None;
    loop {
        if read_u64(s).map_err(io)? != OPT_REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let _option = read_u32(s).map_err(io)?;
        let kind = read_u32(s).map_err(io)?;
        let len = read_u32(s).map_err(io)?;
        if len > MAX_OPTION_REPLY_BYTES {
            return Err(bad("option reply too long"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).map_err(io)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                let mut size = [0u8; 8];
                size.copy_from_slice(&data[2..10]);
                info = Some(ExportInfo {
                    size_bytes: u64::from_be_bytes(size),
                    transmission_flags: u16::from_be_bytes([data[10], data[11]]),
                });
            }
            REP_INFO => {}
            REP_ERR_UNKNOWN => {
                return Err(Error::NotFound(format!(
                    "the NBD server has no export {export}: {}",
                    String::from_utf8_lossy(&data)
                )))
            }
            k if k & REP_ERR_BIT != 0 => {
                return Err(bad(&format!("refused (error {k:#x}): {}", String::from_utf8_lossy(&data))))
            }
            _ => return Err(bad(&format!("unexpected option reply {kind}"))),
        }
    }
    info.ok_or_else(|| bad("the server sent no export information"))
}

/// A generic netlink message being built.
#[derive(Debug)]
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(family: u16, cmd: u8, version: u8, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self { buf, nests: Vec::new() }
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn attr(mut self, kind: u16, payload: &[u8]) -> Self {
        let len = (4 + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn u32(self, kind: u16, v: u32) -> Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn u64(self, kind: u16, v: u64) -> Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    fn begin(mut self, kind: u16) -> Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end(mut self) -> Self {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The attributes of a netlink payload: `(type without flags, payload)`.
fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = b.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    out
}

/// A generic netlink socket.
#[derive(Debug)]
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Self> {
        use rustix::net::{netlink, AddressFamily, SocketFlags, SocketType};
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::GENERIC),
        )
        .map_err(|e| Error::io("opening a generic netlink socket", e.into()))?;
        rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))
            .map_err(|e| Error::io("binding a generic netlink socket", e.into()))?;
        Ok(Self { fd, seq: 1 })
    }

    /// Sends a request and reads its answer: the attributes of the data message, if any, once acknowledged.
    fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        build: impl FnOnce(Msg) -> Msg,
    ) -> Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = build(Msg::new(family, cmd, version, self.seq)).finish();
        rustix::net::sendto(
            &self.fd,
            &msg,
            rustix::net::SendFlags::empty(),
            &rustix::net::netlink::SocketAddrNetlink::new(0, 0),
        )
        .map_err(|e| Error::io("sending a netlink request", e.into()))?;
        let mut attrs = Vec::new();
        let mut buf = vec![0u8; NETLINK_BUFFER_BYTES];
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], rustix::net::RecvFlags::empty())
                .map_err(|e| Error::io("reading a netlink answer", e.into()))?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > n {
                    return Err(Error::Internal("malformed netlink answer".into()));
                }
                let payload = &buf[at + 16..at + len];
                match kind {
                    NLMSG_ERROR => {
                        let code = payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if code == 0 {
                            return Ok(attrs);
                        }
                        return Err(Error::io(
                            format!("netlink command {cmd}"),
                            std::io::Error::from_raw_os_error(-code),
                        ));
                    }
                    NLMSG_DONE => return Ok(attrs),
                    _ if payload.len() >= 4 => {
                        attrs.extend(parse_attrs(&payload[4..]).into_iter().map(|(k, v)| (k, v.to_vec())));
                    }
                    _ => {}
                }
                at += len.div_ceil(4) * 4;
            }
        }
    }

    /// The id of a generic netlink family.
    fn family(&mut self, name: &str) -> Result<u16> {
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        let attrs = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, |m| m.attr(CTRL_ATTR_FAMILY_NAME, &z))?;
        attrs
            .iter()
            .find(|(k, v)| *k == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
            .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
            .ok_or_else(|| Error::Internal(format!("no generic netlink family {name}: is the nbd module loaded?")))
    }
}

/// One attached device: its socket, watched by a monitor thread.
#[derive(Debug)]
struct Device {
    stop: Arc<AtomicBool>,
    /// Set by the monitor while the server is gone and it reconnects.
    lost: Arc<AtomicBool>,
}

/// Attaches volumes to `/dev/nbdN` through the kernel's NBD driver.
#[derive(Debug)]
pub struct KernelNbdAttacher {
    target: NbdTarget,
    devices: Mutex<HashMap<PathBuf, Device>>,
}

fn index_of(device: &Path) -> Result<u32> {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("nbd"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not an NBD device", device.display())))
}

impl KernelNbdAttacher {
    /// An attacher connecting to the daemon's NBD server at `target`.
    pub fn new(target: NbdTarget) -> Self {
        Self { target, devices: Mutex::new(HashMap::new()) }
    }

    fn connect(&self, export: &str) -> Result<(Conn, ExportInfo)> {
        let mut conn = Conn::open(&self.target)?;
        let info = handshake(conn.stream(), export)?;
        conn.for_kernel()?;
        Ok((conn, info))
    }

    /// Watches `conn` of device `index`; reconnects when the server goes away, until `stop`.
    fn monitor(
        target: NbdTarget,
        export: String,
        index: u32,
        mut conn: Conn,
        stop: Arc<AtomicBool>,
        lost: Arc<AtomicBool>,
    ) {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let me = KernelNbdAttacher::new(target);
        let wait = Timespec { tv_sec: MONITOR_INTERVAL.as_secs() as i64, tv_nsec: 0 };
        while !stop.load(Ordering::Relaxed) {
            let fd = conn.fd();
            let mut fds = [PollFd::new(&fd, PollFlags::RDHUP | PollFlags::HUP)];
            let hung_up = match poll(&mut fds, Some(&wait)) {
                Ok(_) => fds[0].revents().intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
                Err(_) => false,
            };
            if !hung_up {
                continue;
            }
            tracing::warn!(device = index, export, "NBD server went away; reconnecting");
            lost.store(true, Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                let again = me.connect(&export).and_then(|(c, _)| {
                    let fd = c.fd().as_raw_fd() as u32;
                    let mut nl = Netlink::open()?;
                    let family = nl.family(NBD_FAMILY)?;
                    nl.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, |m| {
                        m.u32(NBD_ATTR_INDEX, index)
                            .begin(NBD_ATTR_SOCKETS)
                            .begin(NBD_SOCK_ITEM)
                            .u32(NBD_SOCK_FD, fd)
                            .end()
                            .end()
                    })?;
                    Ok(c)
                });
                match again {
                    Ok(c) => {
                        conn = c;
                        lost.store(false, Ordering::Relaxed);
                        tracing::info!(device = index, export, "NBD device reconnected");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(device = index, error = %e, "reconnect not done yet");
                        std::thread::sleep(MONITOR_INTERVAL);
                    }
                }
            }
        }
    }
}

impl Attacher for KernelNbdAttacher {
    fn attach(&self, volume: &VolumeId) -> Result<PathBuf> {
        let export = volume.export_name();
        let (conn, info) = self.connect(&export)?;
        let fd = conn.fd().as_raw_fd() as u32;
        let mut nl = Netlink::open()?;
        let family = nl.family(NBD_FAMILY)?;
        let attrs = nl.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, |m| {
            m.u64(NBD_ATTR_SIZE_BYTES, info.size_bytes)
                .u64(NBD_ATTR_BLOCK_SIZE_BYTES, DEVICE_BLOCK_BYTES)
                .u64(NBD_ATTR_SERVER_FLAGS, u64::from(info.transmission_flags))
                .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, DEAD_CONN_TIMEOUT.as_secs())
                .begin(NBD_ATTR_SOCKETS)
                .begin(NBD_SOCK_ITEM)
                .u32(NBD_SOCK_FD, fd)
                .end()
                .end()
        })?;
        let index = attrs
            .iter()
            .find(|(k, v)| *k == NBD_ATTR_INDEX && v.len() >= 4)
            .map(|(_, v)| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            .ok_or_else(|| Error::Internal("the kernel named no NBD device for the connection".into()))?;
        let device = PathBuf::from(format!("/dev/nbd{index}"));
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (target, flag, gone) = (self.target.clone(), stop.clone(), lost.clone());
        std::thread::Builder::new()
            .name(format!("nbd{index}-monitor"))
            .spawn(move || Self::monitor(target, export, index, conn, flag, gone))
            .map_err(|e| Error::io("starting an NBD monitor thread", e))?;
        let mut devices = self.devices.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        devices.insert(device.clone(), Device { stop, lost });
        Ok(device)
    }

    fn detach(&self, device: &Path) -> Result<()> {
        let index = index_of(device)?;
        if let Some(d) = self.devices.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(device) {
            d.stop.store(true, Ordering::Relaxed);
        }
        let mut nl = Netlink::open()?;
        let family = nl.family(NBD_FAMILY)?;
        match nl.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, |m| m.u32(NBD_ATTR_INDEX, index)) {
            // already disconnected
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    fn refresh_size(&self, volume: &VolumeId, device: &Path) -> Result<u64> {
        let index = index_of(device)?;
        let (_conn, info) = self.connect(&volume.export_name())?;
        let mut nl = Netlink::open()?;
        let family = nl.family(NBD_FAMILY)?;
        nl.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, |m| {
            m.u32(NBD_ATTR_INDEX, index).u64(NBD_ATTR_SIZE_BYTES, info.size_bytes)
        })?;
        Ok(info.size_bytes)
    }

    fn condition(&self, device: &Path) -> Result<Condition> {
        let index = index_of(device)?;
        let devices = self.devices.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // the kernel keeps the pid attribute while the device is set up with a connection
        let configured = Path::new(&format!("/sys/block/nbd{index}/pid")).exists();
        Ok(match (devices.get(device), configured) {
            (_, false) => Condition { abnormal: true, message: format!("{} is not connected", device.display()) },
            (Some(d), true) if d.lost.load(Ordering::Relaxed) => Condition {
                abnormal: true,
                message: "the connection to the blockmesh server is lost; reconnecting".into(),
            },
            (Some(_), true) => Condition { abnormal: false, message: "connected, watched for reconnects".into() },
            (None, true) => Condition {
                abnormal: false,
                message: "connected (attached before the node plugin restarted: not watched for reconnects)".into(),
            },
        })
    }
}

/// Opens a handshake to `export` at `target` and returns what the server says of it (for tests and checks).
pub fn probe_export(target: &NbdTarget, export: &str) -> Result<ExportInfo> {
    let mut conn = Conn::open(target)?;
    handshake(conn.stream(), export)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_messages_are_laid_out_as_the_kernel_reads_them() {
        let m = Msg::new(0x1a, NBD_CMD_CONNECT, 1, 7)
            .u64(NBD_ATTR_SIZE_BYTES, 1 << 20)
            .begin(NBD_ATTR_SOCKETS)
            .begin(NBD_SOCK_ITEM)
            .u32(NBD_SOCK_FD, 5)
            .end()
            .end()
            .finish();
        assert_eq!(m.len(), 16 + 4 + 12 + 4 + 4 + 8);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize, m.len());
        assert_eq!(&m[16..20], &[NBD_CMD_CONNECT, 1, 0, 0]);
        let attrs = parse_attrs(&m[20..]);
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (NBD_ATTR_SIZE_BYTES, &(1u64 << 20).to_ne_bytes()[..]));
        assert_eq!(attrs[1].0, NBD_ATTR_SOCKETS);
        let item = parse_attrs(attrs[1].1);
        assert_eq!(item[0].0, NBD_SOCK_ITEM);
        assert_eq!(parse_attrs(item[0].1), vec![(NBD_SOCK_FD, &5u32.to_ne_bytes()[..])]);
    }

    #[test]
    fn device_indexes() {
        assert_eq!(index_of(Path::new("/dev/nbd12")).ok(), Some(12));
        assert!(index_of(Path::new("/dev/sda")).is_err());
    }
}
