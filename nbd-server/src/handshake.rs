//! The fixed newstyle handshake: greeting, option haggling, STARTTLS, and the choice of export.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::export::{BlockSizes, Export, MAX_PAYLOAD_BYTES};
use crate::proto::*;
use crate::server::{BoxStream, Shared};
use crate::tls::TlsMode;
use crate::{Error, Result};

/// Longest option payload read into memory; longer ones are skipped and refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;
/// Most options one handshake may send before the server gives up on it.
pub const MAX_OPTIONS_PER_HANDSHAKE: u32 = 1024;
/// Most queries in one `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
pub const MAX_META_QUERIES: u32 = 128;
/// Most bytes of over-long options skipped in one handshake before the connection is closed.
pub const MAX_SKIPPED_OPTION_BYTES: u64 = 16 << 20;
/// The id this server gives the `base:allocation` context.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled, handed to the transmission phase.
pub(crate) struct Negotiated {
    pub stream: BoxStream,
    pub name: String,
    pub export: Arc<dyn Export>,
    pub size_bytes: u64,
    pub sizes: BlockSizes,
    pub flags: u16,
    pub structured: bool,
    /// `Some(id)` when `base:allocation` was selected for this export.
    pub base_allocation: Option<u32>,
}

/// State that options build up.
#[derive(Default)]
struct Haggle {
    structured: bool,
    /// Export name the meta contexts were set for, and whether base:allocation was chosen.
    meta: Option<(String, bool)>,
    tls: bool,
}

impl Haggle {
    /// The `base:allocation` context id for `export`, if it was selected for that export (contexts set for another
    /// export do not carry over).
    fn context_for(&self, export: &str) -> Option<u32> {
        match &self.meta {
            Some((name, true)) if name == export && self.structured => Some(BASE_ALLOCATION_ID),
            _ => None,
        }
    }
}

/// Reads a big-endian u32 out of `data` at `at`, or `None` when too short.
fn get_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn get_u16(data: &[u8], at: usize) -> Option<u16> {
    let b = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// Reads a length-prefixed (u32) string at `at`; returns it and the offset after it.
fn get_string(data: &[u8], at: usize) -> std::result::Result<(String, usize), &'static str> {
    let len = get_u32(data, at).ok_or("truncated string length")? as usize;
    if len > MAX_STRING_BYTES {
        return Err("string longer than 4096 bytes");
    }
    let start = at + 4;
    let bytes = data.get(start..start + len).ok_or("string runs past the option")?;
    let s = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")?;
    if s.contains('\0') {
        return Err("string contains NUL");
    }
    Ok((s.to_string(), start + len))
}

async fn write_option_reply(s: &mut BoxStream, option: u32, reply: u32, data: &[u8]) -> Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&reply.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).await?;
    Ok(())
}

async fn error_reply(s: &mut BoxStream, option: u32, reply: u32, message: &str) -> Result<()> {
    tracing::debug!(option, reply, message, "option refused");
    write_option_reply(s, option, reply, message.as_bytes()).await?;
    s.flush().await?;
    Ok(())
}

/// Transmission flags for an export, given what was negotiated.
pub(crate) fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if export.is_read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        if export.can_fast_zero() {
            flags |= FLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    if export.can_multi_conn() {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// Block sizes as advertised: the export's, with the maximum capped at what the server buffers.
pub(crate) fn advertised_sizes(export: &dyn Export) -> BlockSizes {
    let mut s = export.block_sizes();
    s.minimum_bytes = s.minimum_bytes.clamp(1, 64 << 10);
    if !s.minimum_bytes.is_power_of_two() {
        s.minimum_bytes = s.minimum_bytes.next_power_of_two();
    }
    s.maximum_bytes = s.maximum_bytes.clamp(s.minimum_bytes, MAX_PAYLOAD_BYTES);
    s.preferred_bytes = s.preferred_bytes.clamp(s.minimum_bytes, s.maximum_bytes);
    if !s.preferred_bytes.is_power_of_two() {
        s.preferred_bytes = s.minimum_bytes;
    }
    s
}

/// Runs the handshake. `Ok(None)` means the client ended it (abort, or a refused `NBD_OPT_EXPORT_NAME`).
pub(crate) async fn negotiate(mut s: BoxStream, shared: &Shared) -> Result<Option<Negotiated>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut h = Haggle::default();
    let mut skipped_bytes = 0u64;
    for _ in 0..MAX_OPTIONS_PER_HANDSHAKE {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(Error::Protocol(format!("option magic {magic:#x}, expected IHAVEOPT")));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_BYTES {
            skipped_bytes += u64::from(len);
            if skipped_bytes > MAX_SKIPPED_OPTION_BYTES {
                return Err(Error::Protocol(format!("option {option} of {len} bytes; too much skipped")));
            }
            tokio::io::copy(&mut (&mut s).take(u64::from(len)), &mut tokio::io::sink()).await?;
            error_reply(&mut s, option, REP_ERR_TOO_BIG, "option data too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;

        let tls_needed = shared.config.tls_mode == TlsMode::Required && !h.tls;
        match option {
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is not an error.
                let _ = write_option_reply(&mut s, option, REP_ACK, &[]).await;
                let _ = s.flush().await;
                let _ = s.shutdown().await;
                return Ok(None);
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    error_reply(&mut s, option, REP_ERR_INVALID, "STARTTLS takes no data").await?;
                } else if h.tls {
                    error_reply(&mut s, option, REP_ERR_INVALID, "TLS is already active").await?;
                } else if let (Some(acceptor), true) = (&shared.tls, shared.config.tls_mode != TlsMode::Off) {
                    write_option_reply(&mut s, option, REP_ACK, &[]).await?;
                    s.flush().await?;
                    let tls = acceptor.accept(s).await.map_err(|e| Error::Tls(format!("TLS handshake: {e}")))?;
                    s = Box::new(tls);
                    // Nothing negotiated in the clear carries over into TLS.
                    h = Haggle { tls: true, ..Haggle::default() };
                } else {
                    error_reply(&mut s, option, REP_ERR_POLICY, "this server does not offer TLS").await?;
                }
            }
            _ if tls_needed => {
                if option == OPT_EXPORT_NAME {
                    return Err(Error::Protocol("NBD_OPT_EXPORT_NAME before the required STARTTLS".into()));
                }
                error_reply(&mut s, option, REP_ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS")
                    .await?;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error_reply(&mut s, option, REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                for e in shared.exports.list() {
                    let mut d = Vec::with_capacity(4 + e.name.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    if let Some(desc) = &e.description {
                        d.extend_from_slice(&desc.as_bytes()[..desc.len().min(MAX_STRING_BYTES)]);
                    }
                    write_option_reply(&mut s, option, REP_SERVER, &d).await?;
                }
                write_option_reply(&mut s, option, REP_ACK, &[]).await?;
                s.flush().await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error_reply(&mut s, option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data").await?;
                    continue;
                }
                h.structured = true;
                write_option_reply(&mut s, option, REP_ACK, &[]).await?;
                s.flush().await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(&mut s, shared, &mut h, option, &data).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, export, requests)) = info_request(&mut s, shared, option, &data).await? else {
                    continue;
                };
                let structured = h.structured;
                let base_allocation = h.context_for(&name);
                let size_bytes = export.size_bytes();
                let flags = transmission_flags(export.as_ref(), structured);
                let sizes = advertised_sizes(export.as_ref());
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size_bytes.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                write_option_reply(&mut s, option, REP_INFO, &info).await?;
                // Block sizes are always sent: the server enforces them.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&sizes.minimum_bytes.to_be_bytes());
                bs.extend_from_slice(&sizes.preferred_bytes.to_be_bytes());
                bs.extend_from_slice(&sizes.maximum_bytes.to_be_bytes());
                write_option_reply(&mut s, option, REP_INFO, &bs).await?;
                if requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    write_option_reply(&mut s, option, REP_INFO, &d).await?;
                }
                if let (true, Some(desc)) = (requests.contains(&INFO_DESCRIPTION), export.description()) {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(&desc.as_bytes()[..desc.len().min(MAX_STRING_BYTES)]);
                    write_option_reply(&mut s, option, REP_INFO, &d).await?;
                }
                write_option_reply(&mut s, option, REP_ACK, &[]).await?;
                s.flush().await?;
                if option == OPT_GO {
                    return Ok(Some(Negotiated {
                        stream: s,
                        name,
                        export,
                        size_bytes,
                        sizes,
                        flags,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else {
                    return Err(Error::Protocol("export name is not UTF-8".into()));
                };
                let Some(export) = shared.exports.open(&name) else {
                    // The protocol has no error reply here: the server closes the connection.
                    tracing::info!(name, "client asked for an unknown export; closing");
                    return Ok(None);
                };
                let size_bytes = export.size_bytes();
                // With NBD_OPT_EXPORT_NAME, structured replies may still have been negotiated, but not DF: keep the
                // flags consistent with what was negotiated.
                let flags = transmission_flags(export.as_ref(), h.structured);
                let mut d = Vec::with_capacity(10 + 124);
                d.extend_from_slice(&size_bytes.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    d.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&d).await?;
                s.flush().await?;
                let base_allocation = h.context_for(&name);
                let sizes = advertised_sizes(export.as_ref());
                return Ok(Some(Negotiated {
                    stream: s,
                    name,
                    export,
                    size_bytes,
                    sizes,
                    flags,
                    structured: h.structured,
                    base_allocation,
                }));
            }
            _ => {
                error_reply(&mut s, option, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
    Err(Error::Protocol(format!("more than {MAX_OPTIONS_PER_HANDSHAKE} options")))
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data and looks the export up; on a bad request, replies with the error and
/// returns `None`.
async fn info_request(
    s: &mut BoxStream,
    shared: &Shared,
    option: u32,
    data: &[u8],
) -> Result<Option<(String, Arc<dyn Export>, Vec<u16>)>> {
    let (name, at) = match get_string(data, 0) {
        Ok(v) => v,
        Err(why) => {
            error_reply(s, option, REP_ERR_INVALID, why).await?;
            return Ok(None);
        }
    };
    let Some(count) = get_u16(data, at) else {
        error_reply(s, option, REP_ERR_INVALID, "truncated information request count").await?;
        return Ok(None);
    };
    if data.len() != at + 2 + 2 * usize::from(count) {
        error_reply(s, option, REP_ERR_INVALID, "information request list does not match its count").await?;
        return Ok(None);
    }
    let requests: Vec<u16> = (0..usize::from(count)).filter_map(|i| get_u16(data, at + 2 + 2 * i)).collect();
    let Some(export) = shared.exports.open(&name) else {
        error_reply(s, option, REP_ERR_UNKNOWN, &format!("no export named {name:?}")).await?;
        return Ok(None);
    };
    Ok(Some((name, export, requests)))
}

async fn meta_context(s: &mut BoxStream, shared: &Shared, h: &mut Haggle, option: u32, data: &[u8]) -> Result<()> {
    if !h.structured {
        return error_reply(s, option, REP_ERR_INVALID, "negotiate structured replies first").await;
    }
    let (name, mut at) = match get_string(data, 0) {
        Ok(v) => v,
        Err(why) => return error_reply(s, option, REP_ERR_INVALID, why).await,
    };
    let Some(count) = get_u32(data, at) else {
        return error_reply(s, option, REP_ERR_INVALID, "truncated query count").await;
    };
    at += 4;
    if count > MAX_META_QUERIES {
        return error_reply(s, option, REP_ERR_TOO_BIG, "too many queries").await;
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match get_string(data, at) {
            Ok((q, next)) => {
                queries.push(q);
                at = next;
            }
            Err(why) => return error_reply(s, option, REP_ERR_INVALID, why).await,
        }
    }
    if at != data.len() {
        return error_reply(s, option, REP_ERR_INVALID, "trailing bytes after the queries").await;
    }
    if shared.exports.open(&name).is_none() {
        return error_reply(s, option, REP_ERR_UNKNOWN, &format!("no export named {name:?}")).await;
    }
    let matched = if option == OPT_LIST_META_CONTEXT {
        queries.is_empty() || queries.iter().any(|q| q == META_BASE_ALLOCATION || q == "base:")
    } else {
        queries.iter().any(|q| q == META_BASE_ALLOCATION)
    };
    if matched {
        let id = if option == OPT_SET_META_CONTEXT { BASE_ALLOCATION_ID } else { 0 };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        write_option_reply(s, option, REP_META_CONTEXT, &d).await?;
    }
    if option == OPT_SET_META_CONTEXT {
        h.meta = Some((name, matched));
    }
    write_option_reply(s, option, REP_ACK, &[]).await?;
    s.flush().await?;
    Ok(())
}
