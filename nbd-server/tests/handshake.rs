//! Option haggling, driven over an in-process duplex pipe with a raw client.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_nbd::proto::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let (mut c, task) = pipe(&server());
    assert_eq!(c.greet().await, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c.send_option(OPT_ABORT, &[]).await;
    assert_eq!(c.option_replies().await, vec![(REP_ACK, vec![])]);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn list_names_every_export_with_its_description() {
    let (mut c, _task) = pipe(&server());
    c.greet().await;
    c.send_option(OPT_LIST, &[]).await;
    let replies = c.option_replies().await;
    let names: Vec<String> = replies
        .iter()
        .filter(|(k, _)| *k == REP_SERVER)
        .map(|(_, d)| {
            let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
            String::from_utf8(d[4..4 + n].to_vec()).unwrap() + "|" + std::str::from_utf8(&d[4 + n..]).unwrap()
        })
        .collect();
    assert_eq!(names, vec!["aligned|", "disk|test disk", "ro|"]);
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    // LIST with data is invalid, and the session goes on.
    c.send_option(OPT_LIST, b"x").await;
    assert_eq!(c.option_replies().await[0].0, REP_ERR_INVALID);
    let (size, flags, sizes) = c.go("disk").await.unwrap();
    assert_eq!(size, 64 << 20);
    assert!(flags & FLAG_READ_ONLY == 0);
    assert_eq!(sizes, [1, 4096, 32 << 20]);
}

#[tokio::test]
async fn info_reports_flags_sizes_name_and_description_without_ending_the_haggle() {
    let (mut c, _task) = pipe(&server());
    c.greet().await;
    c.send_option(OPT_INFO, &info_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])).await;
    let replies = c.option_replies().await;
    let infos: Vec<u16> =
        replies.iter().filter(|(k, _)| *k == REP_INFO).map(|(_, d)| u16::from_be_bytes([d[0], d[1]])).collect();
    assert_eq!(infos, vec![INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]);
    let desc = replies.iter().find(|(k, d)| *k == REP_INFO && d[1] == INFO_DESCRIPTION as u8).unwrap();
    assert_eq!(&desc.1[2..], b"test disk");
    // Read-only export: READ_ONLY set, write-side flags clear.
    let (_, flags, sizes) = c.go("ro").await.unwrap();
    assert!(flags & FLAG_READ_ONLY != 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FUA | FLAG_SEND_FAST_ZERO), 0);
    assert!(flags & FLAG_SEND_FLUSH != 0 && flags & FLAG_CAN_MULTI_CONN != 0 && flags & FLAG_SEND_CACHE != 0);
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF only with structured replies");
    assert_eq!(sizes[0], 1);
}

#[tokio::test]
async fn unknown_export_and_unknown_option_are_refused_and_the_session_goes_on() {
    let (mut c, _task) = pipe(&server());
    c.greet().await;
    assert_eq!(c.go("nope").await, Err(REP_ERR_UNKNOWN));
    c.send_option(4242, b"whatever").await;
    assert_eq!(c.option_replies().await[0].0, REP_ERR_UNSUP);
    // Malformed GO: count says 3 requests, none follow.
    let mut bad = info_data("disk", &[]);
    let n = bad.len();
    bad[n - 1] = 3;
    c.send_option(OPT_GO, &bad).await;
    assert_eq!(c.option_replies().await[0].0, REP_ERR_INVALID);
    // An over-long option is skipped and refused.
    c.send_option(OPT_INFO, &vec![0u8; blockmesh_nbd::MAX_OPTION_BYTES as usize + 1]).await;
    assert_eq!(c.option_replies().await[0].0, REP_ERR_TOO_BIG);
    // STARTTLS on a server without TLS: policy.
    c.send_option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_replies().await[0].0, REP_ERR_POLICY);
    assert!(c.go("disk").await.is_ok());
}

#[tokio::test]
async fn meta_contexts_need_structured_replies_and_select_base_allocation() {
    let (mut c, _task) = pipe(&server());
    c.greet().await;
    assert_eq!(c.set_meta("disk", &[META_BASE_ALLOCATION]).await[0].0, REP_ERR_INVALID);
    c.structured().await;
    // LIST with no queries lists everything; "base:" matches the namespace.
    for queries in [&[][..], &["base:"][..]] {
        c.send_option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries)).await;
        let r = c.option_replies().await;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(&r[0].1[4..], META_BASE_ALLOCATION.as_bytes());
    }
    // Unknown contexts are not selected; an unknown export is refused.
    assert_eq!(c.set_meta("disk", &["qemu:dirty-bitmap:x"]).await, vec![(REP_ACK, vec![])]);
    assert_eq!(c.set_meta("nope", &[META_BASE_ALLOCATION]).await[0].0, REP_ERR_UNKNOWN);
    let r = c.set_meta("disk", &[META_BASE_ALLOCATION, "other:thing"]).await;
    assert_eq!(r[0].0, REP_META_CONTEXT);
    assert_eq!(u32::from_be_bytes(r[0].1[0..4].try_into().unwrap()), blockmesh_nbd::BASE_ALLOCATION_ID);
    let (_, flags, _) = c.go("disk").await.unwrap();
    assert!(flags & FLAG_SEND_DF != 0);
    // Block status works: the context was set for this export.
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 1 << 20, &[]).await;
    let chunks = c.chunks().await;
    assert_eq!(chunks[0].1, REPLY_TYPE_BLOCK_STATUS);
}

#[tokio::test]
async fn contexts_set_for_another_export_do_not_apply() {
    let (mut c, _task) = pipe(&server());
    c.greet().await;
    c.structured().await;
    c.set_meta("ro", &[META_BASE_ALLOCATION]).await;
    c.go("disk").await.unwrap();
    assert_eq!(c.simple(0, CMD_BLOCK_STATUS, 0, 4096, &[]).await, EINVAL);
}

#[tokio::test]
async fn export_name_enters_transmission_and_an_unknown_name_closes() {
    let (mut c, _task) = pipe(&server());
    c.greet().await;
    c.send_option(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.s.read_u64().await.unwrap(), 64 << 20);
    let flags = c.s.read_u16().await.unwrap();
    assert!(flags & FLAG_HAS_FLAGS != 0);
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0, &[]).await, 0);

    let (mut c, task) = pipe(&server());
    c.greet().await;
    c.send_option(OPT_EXPORT_NAME, b"nope").await;
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0, "server closed");
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn zeroes_follow_export_name_for_clients_that_want_them() {
    let (mut c, _task) = pipe(&server());
    assert_eq!(c.s.read_u64().await.unwrap(), NBDMAGIC);
    c.s.read_u64().await.unwrap();
    c.s.read_u16().await.unwrap();
    c.s.write_u32(FLAG_C_FIXED_NEWSTYLE).await.unwrap();
    c.send_option(OPT_EXPORT_NAME, b"ro").await;
    let mut reply = vec![0u8; 8 + 2 + 124];
    c.s.read_exact(&mut reply).await.unwrap();
    assert!(reply[10..].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn garbage_gets_a_clean_close() {
    // Wrong client flags.
    let (mut c, task) = pipe(&server());
    c.s.read_exact(&mut [0u8; 18]).await.unwrap();
    c.s.write_u32(0xffff_0000).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
    assert!(task.await.unwrap().is_err());
    // Wrong option magic.
    let (mut c, task) = pipe(&server());
    c.greet().await;
    c.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
    assert!(task.await.unwrap().is_err());
    // Client vanishes mid-option.
    let (mut c, task) = pipe(&server());
    c.greet().await;
    c.s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
    drop(c);
    assert!(task.await.unwrap().is_err());
}

#[tokio::test]
async fn tls_required_refuses_everything_but_starttls_and_abort() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let tls = blockmesh_nbd::tls::server_config_from_der(vec![cert.cert.der().clone()], key, None).unwrap();
    let config = blockmesh_nbd::ServerConfig {
        tls: Some(tls),
        tls_mode: blockmesh_nbd::TlsMode::Required,
        handshake_timeout: None,
        fair_slots: None,
    };
    let server = blockmesh_nbd::Server::new(exports(), config).unwrap();
    let (mut c, task) = pipe(&server);
    c.greet().await;
    for opt in [OPT_LIST, OPT_GO, OPT_INFO, OPT_STRUCTURED_REPLY] {
        c.send_option(opt, &info_data("disk", &[])).await;
        assert_eq!(c.option_replies().await[0].0, REP_ERR_TLS_REQD, "option {opt}");
    }
    c.send_option(OPT_EXPORT_NAME, b"disk").await;
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0, "EXPORT_NAME in the clear closes");
    assert!(task.await.unwrap().is_err());
}

#[tokio::test]
async fn tls_without_a_certificate_is_a_configuration_error() {
    let config = blockmesh_nbd::ServerConfig { tls_mode: blockmesh_nbd::TlsMode::Required, ..Default::default() };
    assert!(blockmesh_nbd::Server::new(exports(), config).is_err());
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_times_out() {
    let (mut c, task) = pipe(&server());
    c.s.read_exact(&mut [0u8; 18]).await.unwrap();
    let r = task.await.unwrap();
    assert!(matches!(r, Err(blockmesh_nbd::Error::HandshakeTimeout(_))), "{r:?}");
}
