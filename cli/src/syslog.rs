//! The daemon's logs to a syslog server over UDP (`serve --log-address`, the operator's `logAddress`): each event is
//! one datagram in the RFC 5424 format (facility daemon, severity from the event's level, UTC timestamp, host name,
//! app name `blockmesh`, process id). Sending never blocks nor fails the daemon: a datagram that cannot be sent is
//! dropped, as UDP syslog drops them anyway.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Port of a log address given without one (syslog over UDP).
pub const DEFAULT_SYSLOG_PORT: u16 = 514;
/// Longest datagram sent (RFC 5426 asks receivers to take at least 2048 bytes); a longer message is cut.
pub const MAX_SYSLOG_DATAGRAM_BYTES: usize = 2048;
/// Syslog facility "system daemons".
const FACILITY_DAEMON: u8 = 3;

/// `HOST`, `HOST:PORT`, `IP`, `IP:PORT` or `[IPv6]:PORT` (port 514 when none), resolved now.
pub fn parse_address(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an empty log address (leave the option out to log to standard error)".into());
    }
    let with_port = if s.parse::<SocketAddr>().is_ok()
        || s.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && !h.contains(':') && p.parse::<u16>().is_ok())
    {
        s.to_string()
    } else if s.contains(':') && !s.starts_with('[') {
        // a bare IPv6 address
        format!("[{s}]:{DEFAULT_SYSLOG_PORT}")
    } else {
        format!("{s}:{DEFAULT_SYSLOG_PORT}")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("log address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("log address {s:?} resolves to no address"))
}

/// A syslog destination: a connected UDP socket and what every message carries.
#[derive(Debug)]
pub struct Syslog {
    socket: UdpSocket,
    hostname: String,
    pid: u32,
}

impl Syslog {
    /// Sends to `addr` from an ephemeral local port.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let local: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let socket = UdpSocket::bind(local)?;
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| "-".to_string());
        Ok(Self { socket, hostname, pid: std::process::id() })
    }

    fn send(&self, severity: u8, message: &[u8]) {
        let message = message.strip_suffix(b"\n").unwrap_or(message);
        let header = format!(
            "<{}>1 {} {} blockmesh {} - - ",
            FACILITY_DAEMON * 8 + severity,
            rfc3339_utc(SystemTime::now()),
            self.hostname,
            self.pid
        );
        let mut datagram = Vec::with_capacity(MAX_SYSLOG_DATAGRAM_BYTES);
        datagram.extend_from_slice(header.as_bytes());
        let room = MAX_SYSLOG_DATAGRAM_BYTES.saturating_sub(datagram.len());
        datagram.extend_from_slice(&message[..message.len().min(room)]);
        let _ = self.socket.send(&datagram);
    }
}

/// Syslog severity of a tracing level.
fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// One event's text, sent as a datagram when the formatter is done with it.
#[derive(Debug)]
pub struct Datagram<'a> {
    syslog: &'a Syslog,
    severity: u8,
    buf: Vec<u8>,
}

impl Write for Datagram<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Datagram<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.syslog.send(self.severity, &self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = Datagram<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Datagram { syslog: self, severity: severity(&Level::INFO), buf: Vec::new() }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Datagram { syslog: self, severity: severity(meta.level()), buf: Vec::new() }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let u = crate::utc::utc(d.as_secs());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        u.year,
        u.month,
        u.day,
        u.hour,
        u.minute,
        u.second,
        d.subsec_millis()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2026-12-01T22:45:30.250Z
        let t = UNIX_EPOCH + Duration::from_millis(1_796_165_130_250);
        assert_eq!(rfc3339_utc(t), "2026-12-01T22:45:30.250Z");
        // a leap day
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_utc(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn addresses_take_the_syslog_port_when_none_is_given() {
        assert_eq!(parse_address("127.0.0.1"), Ok(SocketAddr::from(([127, 0, 0, 1], 514))));
        assert_eq!(parse_address("127.0.0.1:1514"), Ok(SocketAddr::from(([127, 0, 0, 1], 1514))));
        assert_eq!(parse_address("localhost:1514").map(|a| a.port()), Ok(1514));
        assert_eq!(parse_address("::1").map(|a| a.port()), Ok(514));
        assert_eq!(parse_address("[::1]:1514").map(|a| a.port()), Ok(1514));
        assert!(parse_address("").is_err());
        assert!(parse_address("127.0.0.1:99999").is_err());
    }

    #[test]
    fn an_event_is_one_datagram_with_its_severity() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let syslog = Syslog::connect(receiver.local_addr().unwrap()).unwrap();
        {
            let mut w = syslog.make_writer_for(&Metadata::new(
                "e",
                "t",
                Level::WARN,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
                tracing::metadata::Kind::EVENT,
            ));
            w.write_all(b"pool almost full").unwrap();
            w.write_all(b", 3 segments free\n").unwrap();
        }
        let mut buf = [0u8; 4096];
        let n = receiver.recv(&mut buf).unwrap();
        let got = String::from_utf8_lossy(&buf[..n]).into_owned();
        // facility daemon (3) * 8 + warning (4)
        assert!(got.starts_with("<28>1 "), "{got}");
        assert!(got.contains(" blockmesh ") && got.ends_with(" - - pool almost full, 3 segments free"), "{got}");
        // a long message is cut to one datagram
        syslog.send(6, &vec![b'x'; 10_000]);
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(n, MAX_SYSLOG_DATAGRAM_BYTES);
    }

    struct NoCallsite;
    impl tracing::callsite::Callsite for NoCallsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("not registered")
        }
    }
    static CALLSITE: NoCallsite = NoCallsite;
}
