//! The real [`Attacher`]: the NBD handshake in user space (fixed newstyle, `NBD_OPT_GO`), then the connected socket
//! handed to the kernel's NBD driver over generic netlink (`NBD_CMD_CONNECT`), with a dead-connection timeout so
//! I/O waits for a reconnect instead of failing; a monitor thread per device watches its socket and, when the
//! server goes away (a restarted server pod), connects again and gives the kernel the new socket
//! (`NBD_CMD_RECONFIGURE`).
//!
//! A device attached before the node plugin restarted is *adopted* ([`Attacher::adopt`]): the kernel still holds
//! its socket, the plugin no longer does. The kernel cannot tell us whether that socket is alive: `NBD_CMD_STATUS`
//! reports a device "connected" while it has a configuration (`config_refs` in drivers/block/nbd.c), which it keeps
//! through a dead connection until `NBD_CMD_DISCONNECT`. But `NBD_CMD_RECONFIGURE` with a socket only replaces a
//! *dead* one (with none dead the kernel drops the socket and still answers success). So adoption hands the kernel
//! a fresh connection at once (taken when the old one died while nobody watched, dropped otherwise) and then
//! watches that connection like any other: it is to the same server, so it hangs up when the server goes away,
//! which is when the kernel's does. One monitor and one reconnect loop serve attached and adopted devices.
//! `NBD_CMD_STATUS` tells whether the device is still configured (adoption refuses a device that is not; a
//! monitor stops when its device goes), and the backend identifier the kernel keeps for a device
//! (`NBD_ATTR_BACKEND_IDENTIFIER`, the export name; `/sys/block/nbdN/backend`) tells whose it is, so a device
//! index reused by another volume is never adopted nor reconnected to the wrong export.
//!
//! The generic netlink messages are written here (a header, a command, a few attributes; about a hundred lines)
//! rather than with a netlink crate: the whole exchange is four commands, and rustix's safe socket calls keep the
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
use crate::targets::Targets;
use crate::{Error, Result};

/// How long the kernel holds I/O on a dead connection, waiting for a reconnect, before failing it.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);
/// Block size the device shows (the engine's block).
pub const DEVICE_BLOCK_BYTES: u64 = 4096;
/// How often a device's monitor looks at its socket, and retries a reconnect.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// How long after a reconnect a monitor hands the kernel a second connection, in case its first came before the
/// kernel had seen its own socket die (see `Monitor::confirm`).
pub const RECONNECT_CONFIRM_DELAY: Duration = MONITOR_INTERVAL;
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

// The kernel's NBD netlink interface: the enums of include/uapi/linux/nbd-netlink.h (checked against the header's
// text: commands UNSPEC, CONNECT, DISCONNECT, RECONFIGURE, LINK_DEAD, STATUS; attributes UNSPEC, INDEX, SIZE_BYTES,
// BLOCK_SIZE_BYTES, TIMEOUT, SERVER_FLAGS, CLIENT_FLAGS, SOCKETS, DEAD_CONN_TIMEOUT, DEVICE_LIST,
// BACKEND_IDENTIFIER; device items UNSPEC, ITEM; device attributes UNSPEC, INDEX (u32), CONNECTED (u8)).
const NBD_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_STATUS: u8 = 5;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
/// Kernels before it (5.x) ignore it: attributes past a family's last are skipped by its lenient parsing.
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;
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

/// Connects to `export` at `target` and does the handshake: a socket ready for the kernel, and what the server told.
fn connect(target: &NbdTarget, export: &str) -> Result<(Conn, ExportInfo)> {
    let mut conn = Conn::open(target)?;
    let info = handshake(conn.stream(), export)?;
    conn.for_kernel()?;
    Ok((conn, info))
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

    /// A string attribute (`NLA_STRING`), NUL-terminated.
    fn string(self, kind: u16, v: &str) -> Self {
        let mut z = Vec::with_capacity(v.len() + 1);
        z.extend_from_slice(v.as_bytes());
        z.push(0);
        self.attr(kind, &z)
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

/// The attributes of a netlink payload, refusing anything malformed: `(type without flags, payload)`.
fn strict_attrs<'a>(mut b: &'a [u8], what: &str) -> Result<Vec<(u16, &'a [u8])>> {
    let bad = |why: String| Error::Internal(format!("malformed {what}: {why}"));
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(bad(format!("{} bytes left, less than an attribute header", b.len())));
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            return Err(bad(format!("attribute {kind} of length {len} in {} bytes", b.len())));
        }
        out.push((kind, &b[4..len]));
        b = b.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    Ok(out)
}

/// One device of an `NBD_CMD_STATUS` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceStatus {
    index: u32,
    /// The kernel has a configuration for it (set up and not disconnected; says nothing of its socket).
    connected: bool,
}

/// The `NBD_CMD_STATUS` request for device `index`.
fn status_message(family: u16, seq: u32, index: u32) -> Vec<u8> {
    Msg::new(family, NBD_CMD_STATUS, NBD_GENL_VERSION, seq).u32(NBD_ATTR_INDEX, index).finish()
}

/// The devices of an `NBD_CMD_STATUS` reply, from the attributes after its generic netlink header:
/// `DEVICE_LIST { DEVICE_ITEM { DEVICE_INDEX u32, DEVICE_CONNECTED u8 } ... }`. Attributes it does not know are
/// skipped; a truncated reply, an attribute of the wrong size or an item without both fields is an error.
fn parse_status(attrs: &[u8]) -> Result<Vec<DeviceStatus>> {
    const WHAT: &str = "NBD status reply";
    let bad = |why: String| Error::Internal(format!("malformed {WHAT}: {why}"));
    let mut out = Vec::new();
    for (kind, list) in strict_attrs(attrs, WHAT)? {
        if kind != NBD_ATTR_DEVICE_LIST {
            continue;
        }
        for (kind, item) in strict_attrs(list, WHAT)? {
            if kind != NBD_DEVICE_ITEM {
                continue;
            }
            let (mut index, mut connected) = (None, None);
            for (kind, v) in strict_attrs(item, WHAT)? {
                match kind {
                    NBD_DEVICE_INDEX => match <[u8; 4]>::try_from(v) {
                        Ok(b) => index = Some(u32::from_ne_bytes(b)),
                        Err(_) => return Err(bad(format!("a device index of {} bytes, not 4", v.len()))),
                    },
                    NBD_DEVICE_CONNECTED => match v {
                        [c] => connected = Some(*c != 0),
                        _ => return Err(bad(format!("a device connected flag of {} bytes, not 1", v.len()))),
                    },
                    _ => {}
                }
            }
            match (index, connected) {
                (Some(index), Some(connected)) => out.push(DeviceStatus { index, connected }),
                _ => return Err(bad("a device item without its index or connected flag".into())),
            }
        }
    }
    Ok(out)
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

    /// Sends a request and reads its answer: the attributes of the data messages, if any, once acknowledged.
    fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        build: impl FnOnce(Msg) -> Msg,
    ) -> Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = build(Msg::new(family, cmd, version, self.seq)).finish();
        let payloads = self.exchange(&msg, cmd)?;
        Ok(payloads.iter().flat_map(|p| parse_attrs(p).into_iter().map(|(k, v)| (k, v.to_vec()))).collect())
    }

    /// Sends a finished message and reads its answer: each data message's attribute bytes (after the generic
    /// netlink header), once acknowledged.
    fn exchange(&mut self, msg: &[u8], cmd: u8) -> Result<Vec<Vec<u8>>> {
        rustix::net::sendto(
            &self.fd,
            msg,
            rustix::net::SendFlags::empty(),
            &rustix::net::netlink::SocketAddrNetlink::new(0, 0),
        )
        .map_err(|e| Error::io("sending a netlink request", e.into()))?;
        let mut payloads = Vec::new();
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
                            return Ok(payloads);
                        }
                        return Err(Error::io(
                            format!("netlink command {cmd}"),
                            std::io::Error::from_raw_os_error(-code),
                        ));
                    }
                    NLMSG_DONE => return Ok(payloads),
                    _ if payload.len() >= 4 => payloads.push(payload[4..].to_vec()),
                    _ => {}
                }
                at += len.div_ceil(4) * 4;
            }
        }
    }

    /// Whether the kernel has a configuration for device `index`; `None` when there is no such device.
    fn status(&mut self, family: u16, index: u32) -> Result<Option<bool>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = status_message(family, self.seq, index);
        let mut found = None;
        for payload in self.exchange(&msg, NBD_CMD_STATUS)? {
            if let Some(d) = parse_status(&payload)?.into_iter().find(|d| d.index == index) {
                found = Some(d.connected);
            }
        }
        Ok(found)
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

/// What a device's monitor and the attacher share.
#[derive(Debug, Default)]
struct Flags {
    /// Set by the attacher: the monitor ends.
    stop: AtomicBool,
    /// Set by the monitor while the server is gone and it reconnects.
    lost: AtomicBool,
    /// Set by the monitor when it gave up: the device is no longer configured for its volume.
    gone: AtomicBool,
}

/// One watched device.
#[derive(Debug)]
struct Device {
    flags: Arc<Flags>,
    /// Adopted after a restart of the node plugin (not attached by this process).
    adopted: bool,
}

/// Attaches volumes to `/dev/nbdN` through the kernel's NBD driver.
#[derive(Debug)]
pub struct KernelNbdAttacher {
    targets: Arc<dyn Targets>,
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

/// What device `index` serves now, as far as the kernel tells.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serving {
    /// Configured, with our export as its backend identifier.
    Export,
    /// Configured, with no backend identifier (attached by an older node plugin, or a kernel before them).
    Unnamed,
    /// Configured for another export.
    Other(String),
    /// Not configured (disconnected, or the node restarted), or no such device.
    Nothing,
}

/// The backend identifier the kernel keeps for device `index` (`None`: none, or a kernel without them).
fn backend_of(index: u32) -> Option<String> {
    let path = format!("/sys/block/nbd{index}/backend");
    match std::fs::read_to_string(&path) {
        Ok(b) if !b.trim().is_empty() => Some(b.trim().to_string()),
        Ok(_) => None,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(path, error = %e, "cannot read the device's backend identifier");
            }
            None
        }
    }
}

/// What device `index` serves: `NBD_CMD_STATUS`, then its backend identifier.
fn serving(index: u32, export: &str) -> Result<Serving> {
    let mut nl = Netlink::open()?;
    let family = nl.family(NBD_FAMILY)?;
    if nl.status(family, index)? != Some(true) {
        return Ok(Serving::Nothing);
    }
    Ok(match backend_of(index) {
        None => Serving::Unnamed,
        Some(b) if b == export => Serving::Export,
        Some(b) => Serving::Other(b),
    })
}

/// The watch over one device: where its server is (looked up again for each reconnect: a pool's server may have
/// moved), its volume and export, the device, and the flags shared with the attacher.
#[derive(Debug)]
struct Monitor {
    targets: Arc<dyn Targets>,
    volume: VolumeId,
    export: String,
    index: u32,
    flags: Arc<Flags>,
}

impl Monitor {
    /// Starts the monitor thread; `conn` is the socket the kernel was given (none for an adopted device: the
    /// monitor first hands the kernel a fresh one, see the module's doc).
    fn spawn(self, conn: Option<Conn>) -> Result<()> {
        std::thread::Builder::new()
            .name(format!("nbd{}-monitor", self.index))
            .spawn(move || self.run(conn))
            .map(drop)
            .map_err(|e| Error::io("starting an NBD monitor thread", e))
    }

    fn stopped(&self) -> bool {
        self.flags.stop.load(Ordering::Relaxed)
    }

    /// Watches the connection; reconnects when the server goes away; until stopped or the device is gone.
    fn run(self, mut conn: Option<Conn>) {
        let (index, export) = (self.index, self.export.as_str());
        loop {
            match &conn {
                Some(c) => {
                    if !self.wait_for_hang_up(c) {
                        return;
                    }
                    tracing::warn!(device = index, export, "NBD server went away; reconnecting");
                    self.flags.lost.store(true, Ordering::Relaxed);
                }
                None => tracing::info!(
                    device = index,
                    export,
                    "adopting the device: handing the kernel a fresh connection (it keeps its own when alive)"
                ),
            }
            match self.reconnect() {
                Some(c) => {
                    conn = Some(self.confirm(c));
                    self.flags.lost.store(false, Ordering::Relaxed);
                    tracing::info!(device = index, export, "NBD device connected; watched for reconnects");
                }
                None => return,
            }
        }
    }

    /// Hands the kernel one more fresh connection [`RECONNECT_CONFIRM_DELAY`] after a reconnect: the kernel
    /// answers a reconfigure the same whether it took the socket or (no socket of its own dead *yet*, its receive
    /// work not having seen the hang-up) dropped it; the second one is taken in that race, dropped otherwise.
    /// Either socket is to the same server and hangs up when it goes away: the newest is watched.
    fn confirm(&self, conn: Conn) -> Conn {
        std::thread::sleep(RECONNECT_CONFIRM_DELAY);
        if self.stopped() {
            return conn;
        }
        match self.reconnect_once() {
            Ok(newer) => newer,
            Err(e) => {
                tracing::debug!(device = self.index, error = %e, "confirming the reconnect failed; watching the first");
                conn
            }
        }
    }

    /// Polls `conn` for hang-up: `true` when the server went away, `false` when stopped.
    fn wait_for_hang_up(&self, conn: &Conn) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let wait = Timespec { tv_sec: MONITOR_INTERVAL.as_secs() as i64, tv_nsec: 0 };
        while !self.stopped() {
            let fd = conn.fd();
            let mut fds = [PollFd::new(&fd, PollFlags::RDHUP | PollFlags::HUP)];
            let hung_up = match poll(&mut fds, Some(&wait)) {
                Ok(_) => fds[0].revents().intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
                Err(_) => false,
            };
            if hung_up {
                return true;
            }
        }
        false
    }

    /// Connects again and hands the kernel the new socket, retrying every [`MONITOR_INTERVAL`]: the socket, or
    /// `None` when stopped or when the device no longer serves the export (then `gone` is set).
    fn reconnect(&self) -> Option<Conn> {
        while !self.stopped() {
            let e = match self.reconnect_once() {
                Ok(c) => return Some(c),
                Err(e) => e,
            };
            self.flags.lost.store(true, Ordering::Relaxed);
            // the device still ours, or the kernel cannot tell now: try again; otherwise give up
            if let Ok(Serving::Nothing | Serving::Other(_)) = serving(self.index, &self.export) {
                tracing::warn!(
                    device = self.index,
                    export = self.export,
                    "the device no longer serves the export; no longer watched"
                );
                self.flags.gone.store(true, Ordering::Relaxed);
                return None;
            }
            tracing::debug!(device = self.index, error = %e, "reconnect not done yet");
            std::thread::sleep(MONITOR_INTERVAL);
        }
        None
    }

    /// One handshake and `NBD_CMD_RECONFIGURE` with its socket (a no-op in the kernel when no socket is dead).
    fn reconnect_once(&self) -> Result<Conn> {
        let (conn, _) = connect(&self.targets.target(&self.volume, true)?, &self.export)?;
        let fd = conn.fd().as_raw_fd() as u32;
        let mut nl = Netlink::open()?;
        let family = nl.family(NBD_FAMILY)?;
        nl.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, |m| {
            m.u32(NBD_ATTR_INDEX, self.index)
                .string(NBD_ATTR_BACKEND_IDENTIFIER, &self.export)
                .begin(NBD_ATTR_SOCKETS)
                .begin(NBD_SOCK_ITEM)
                .u32(NBD_SOCK_FD, fd)
                .end()
                .end()
        })?;
        Ok(conn)
    }
}

impl KernelNbdAttacher {
    /// An attacher connecting to the NBD server `targets` names for each volume.
    pub fn new(targets: Arc<dyn Targets>) -> Self {
        Self { targets, devices: Mutex::new(HashMap::new()) }
    }

    /// Connects to `volume`'s server: where it was last known, and if that fails, where it is now (its pool may
    /// have moved since).
    fn connect(&self, volume: &VolumeId, export: &str) -> Result<(Conn, ExportInfo)> {
        let known = self.targets.target(volume, false)?;
        connect(&known, export).or_else(|e| match self.targets.target(volume, true) {
            Ok(now) if now != known => connect(&now, export),
            _ => Err(e),
        })
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Device>> {
        self.devices.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts watching `device` (index `index`) for `volume`; ends an older watch of it.
    fn watch(&self, device: &Path, index: u32, volume: &VolumeId, conn: Option<Conn>) -> Result<()> {
        let flags = Arc::new(Flags::default());
        let adopted = conn.is_none();
        let (targets, export) = (self.targets.clone(), volume.export_name());
        Monitor { targets, volume: volume.clone(), export, index, flags: flags.clone() }.spawn(conn)?;
        if let Some(old) = self.devices().insert(device.to_path_buf(), Device { flags, adopted }) {
            old.flags.stop.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for KernelNbdAttacher {
    /// Ends the monitors (the kernel keeps the devices and their sockets, as when the process exits).
    fn drop(&mut self) {
        for d in self.devices().values() {
            d.flags.stop.store(true, Ordering::Relaxed);
        }
    }
}

impl Attacher for KernelNbdAttacher {
    fn attach(&self, volume: &VolumeId) -> Result<PathBuf> {
        let export = volume.export_name();
        let (conn, info) = self.connect(volume, &export)?;
        let fd = conn.fd().as_raw_fd() as u32;
        let mut nl = Netlink::open()?;
        let family = nl.family(NBD_FAMILY)?;
        let attrs = nl.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, |m| {
            m.u64(NBD_ATTR_SIZE_BYTES, info.size_bytes)
                .u64(NBD_ATTR_BLOCK_SIZE_BYTES, DEVICE_BLOCK_BYTES)
                .u64(NBD_ATTR_SERVER_FLAGS, u64::from(info.transmission_flags))
                .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, DEAD_CONN_TIMEOUT.as_secs())
                .string(NBD_ATTR_BACKEND_IDENTIFIER, &export)
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
        self.watch(&device, index, volume, Some(conn))?;
        Ok(device)
    }

    fn adopt(&self, volume: &VolumeId, device: &Path) -> Result<()> {
        let index = index_of(device)?;
        let export = volume.export_name();
        if self.devices().get(device).is_some_and(|d| !d.flags.gone.load(Ordering::Relaxed)) {
            return Ok(());
        }
        match serving(index, &export)? {
            Serving::Nothing => Err(Error::NotFound(format!(
                "{} is not configured by the kernel any more (the node restarted, or it was disconnected)",
                device.display()
            ))),
            Serving::Other(other) => {
                Err(Error::NotFound(format!("{} serves export {other} now, not {export}", device.display())))
            }
            Serving::Export | Serving::Unnamed => self.watch(device, index, volume, None),
        }
    }

    fn detach(&self, device: &Path) -> Result<()> {
        let index = index_of(device)?;
        if let Some(d) = self.devices().remove(device) {
            d.flags.stop.store(true, Ordering::Relaxed);
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
        let export = volume.export_name();
        let (_conn, info) = self.connect(volume, &export)?;
        let mut nl = Netlink::open()?;
        let family = nl.family(NBD_FAMILY)?;
        // the kernel refuses to reconfigure a device with a backend identifier unless the request names it
        nl.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, |m| {
            m.u32(NBD_ATTR_INDEX, index)
                .string(NBD_ATTR_BACKEND_IDENTIFIER, &export)
                .u64(NBD_ATTR_SIZE_BYTES, info.size_bytes)
        })?;
        Ok(info.size_bytes)
    }

    fn condition(&self, device: &Path) -> Result<Condition> {
        let index = index_of(device)?;
        let devices = self.devices();
        // the kernel keeps the pid attribute while the device is set up with a connection
        let configured = Path::new(&format!("/sys/block/nbd{index}/pid")).exists();
        let abnormal = |message: String| Condition { abnormal: true, message };
        Ok(match (devices.get(device), configured) {
            (_, false) => abnormal(format!("{} is not connected", device.display())),
            (Some(d), true) if d.flags.gone.load(Ordering::Relaxed) => {
                abnormal(format!("{} no longer serves this volume; not watched", device.display()))
            }
            (Some(d), true) if d.flags.lost.load(Ordering::Relaxed) => {
                abnormal("the connection to the blockmesh server is lost; reconnecting".into())
            }
            (Some(d), true) if d.adopted => Condition {
                abnormal: false,
                message: "connected, watched for reconnects (adopted after a node plugin restart)".into(),
            },
            (Some(_), true) => Condition { abnormal: false, message: "connected, watched for reconnects".into() },
            (None, true) => abnormal(format!(
                "{} is connected but not watched for reconnects: this node plugin neither attached nor adopted it",
                device.display()
            )),
        })
    }
}

/// Opens a handshake to `export` at `target` and returns what the server says of it (for tests and checks).
pub fn probe_export(target: &NbdTarget, export: &str) -> Result<ExportInfo> {
    let mut conn = Conn::open(target)?;
    handshake(conn.stream(), export)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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

    /// The attribute bytes of a status reply for `devices` (index, connected), as the kernel lays them out.
    fn status_reply(devices: &[(u32, u8)]) -> Vec<u8> {
        let mut m = Msg::new(0x1a, NBD_CMD_STATUS, NBD_GENL_VERSION, 0).begin(NBD_ATTR_DEVICE_LIST);
        for (index, connected) in devices {
            m = m.begin(NBD_DEVICE_ITEM).u32(NBD_DEVICE_INDEX, *index).attr(NBD_DEVICE_CONNECTED, &[*connected]).end();
        }
        m.end().finish()[20..].to_vec()
    }

    #[test]
    fn status_requests_are_laid_out_as_the_kernel_reads_them() {
        let m = status_message(0x1a, 9, 3);
        assert_eq!(m.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize, m.len());
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x1a, "the family");
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes([m[8], m[9], m[10], m[11]]), 9, "the sequence number");
        assert_eq!(&m[16..20], &[5, 1, 0, 0], "NBD_CMD_STATUS, version 1");
        assert_eq!(&m[20..22], &8u16.to_ne_bytes(), "an attribute of 4 + 4 bytes");
        assert_eq!(&m[22..24], &1u16.to_ne_bytes(), "NBD_ATTR_INDEX");
        assert_eq!(&m[24..28], &3u32.to_ne_bytes());
    }

    #[test]
    fn status_replies_are_read_device_by_device() {
        let reply = status_reply(&[(0, 1), (1, 0), (7, 1)]);
        // DEVICE_LIST header, then per item: its header, index (8), connected (5, padded to 8)
        assert_eq!(reply.len(), 4 + 3 * (4 + 8 + 8));
        assert_eq!(&reply[2..4], &(NBD_ATTR_DEVICE_LIST | NLA_F_NESTED).to_ne_bytes());
        assert_eq!(
            parse_status(&reply).unwrap(),
            vec![
                DeviceStatus { index: 0, connected: true },
                DeviceStatus { index: 1, connected: false },
                DeviceStatus { index: 7, connected: true },
            ]
        );
        // no device at that index: an empty list; attributes it does not know are skipped
        assert_eq!(parse_status(&status_reply(&[])).unwrap(), vec![]);
        let mut other = Msg::new(0x1a, NBD_CMD_STATUS, 1, 0).u32(NBD_ATTR_INDEX, 4).finish()[20..].to_vec();
        other.extend_from_slice(&status_reply(&[(4, 1)]));
        assert_eq!(parse_status(&other).unwrap(), vec![DeviceStatus { index: 4, connected: true }]);
    }

    #[test]
    fn malformed_status_replies_are_errors() {
        let reply = status_reply(&[(0, 1), (1, 1)]);
        for cut in [1, 2, 3, 5, 11, reply.len() - 12, reply.len() - 1] {
            let err = parse_status(&reply[..cut]).unwrap_err();
            assert!(err.to_string().contains("malformed NBD status reply"), "{cut}: {err}");
        }
        let wrong_index = Msg::new(0x1a, NBD_CMD_STATUS, 1, 0)
            .begin(NBD_ATTR_DEVICE_LIST)
            .begin(NBD_DEVICE_ITEM)
            .u64(NBD_DEVICE_INDEX, 1)
            .attr(NBD_DEVICE_CONNECTED, &[1])
            .end()
            .end()
            .finish();
        let err = parse_status(&wrong_index[20..]).unwrap_err().to_string();
        assert!(err.contains("device index of 8 bytes, not 4"), "{err}");
        let wrong_flag = Msg::new(0x1a, NBD_CMD_STATUS, 1, 0)
            .begin(NBD_ATTR_DEVICE_LIST)
            .begin(NBD_DEVICE_ITEM)
            .u32(NBD_DEVICE_INDEX, 1)
            .u32(NBD_DEVICE_CONNECTED, 1)
            .end()
            .end()
            .finish();
        let err = parse_status(&wrong_flag[20..]).unwrap_err().to_string();
        assert!(err.contains("connected flag of 4 bytes, not 1"), "{err}");
        let no_flag = Msg::new(0x1a, NBD_CMD_STATUS, 1, 0)
            .begin(NBD_ATTR_DEVICE_LIST)
            .begin(NBD_DEVICE_ITEM)
            .u32(NBD_DEVICE_INDEX, 1)
            .end()
            .end()
            .finish();
        let err = parse_status(&no_flag[20..]).unwrap_err().to_string();
        assert!(err.contains("without its index or connected flag"), "{err}");
        // an attribute claiming more than is there
        let mut lying = status_reply(&[(2, 1)]);
        lying[0..2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse_status(&lying).is_err());
    }

    #[test]
    fn backend_identifiers_are_nul_terminated_strings() {
        let m = Msg::new(0x1a, NBD_CMD_RECONFIGURE, 1, 1).string(NBD_ATTR_BACKEND_IDENTIFIER, "admin/k").finish();
        let attrs = parse_attrs(&m[20..]);
        assert_eq!(attrs, vec![(NBD_ATTR_BACKEND_IDENTIFIER, &b"admin/k\0"[..])]);
        assert_eq!(m.len() % 4, 0);
    }

    #[test]
    fn device_indexes() {
        assert_eq!(index_of(Path::new("/dev/nbd12")).ok(), Some(12));
        assert!(index_of(Path::new("/dev/sda")).is_err());
    }
}
