//! doc/proto.md, "`NBD_OPT_LIST`": a server answers with one
//! `NBD_REP_SERVER` per export, as many as it likes. A hostile one can
//! list without end; the client bounds the count and the bytes of one
//! listing ([`Limits::max_exports`], [`Limits::max_export_list_bytes`]) and
//! ends the connection with a typed error once past them.

use nbd_core::consts::{handshake_flags as hf, opt, rep, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC};
use nbd_core::{CloseReason, Config, Connection, Event, Limits, ProtocolError};

fn negotiating(limits: Limits) -> Connection {
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    cfg.request_extended_headers = false;
    cfg.request_structured_replies = false;
    cfg.request_meta_context = false;
    cfg.limits = limits;
    let mut c = Connection::new(cfg);
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(hf::FIXED_NEWSTYLE | hf::NO_ZEROES).to_be_bytes());
    c.handle_input(&g);
    let mut out = Vec::new();
    c.poll_transmit(&mut out);
    c.opt_list().expect("opt_list");
    c
}

/// One `NBD_REP_SERVER` reply naming an export of `name_len` bytes with a
/// description of `desc_len` bytes.
fn server_reply(i: usize, name_len: usize, desc_len: usize) -> Vec<u8> {
    let mut name = format!("e{i}").into_bytes();
    name.resize(name_len, b'x');
    let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&opt::LIST.to_be_bytes());
    r.extend_from_slice(&rep::SERVER.to_be_bytes());
    r.extend_from_slice(&((4 + name_len + desc_len) as u32).to_be_bytes());
    r.extend_from_slice(&(name_len as u32).to_be_bytes());
    r.extend_from_slice(&name);
    r.extend(std::iter::repeat_n(b'd', desc_len));
    r
}

/// Feeds replies until the connection ends (or `max` replies); returns how
/// many replies were fed and how many exports were reported.
fn flood(c: &mut Connection, name_len: usize, desc_len: usize, max: usize) -> (usize, usize) {
    let mut listed = 0;
    for i in 0..max {
        if c.is_finished() {
            return (i, listed);
        }
        c.handle_input(&server_reply(i, name_len, desc_len));
        while let Some(ev) = c.poll_event() {
            if let Event::ExportListed { .. } = ev {
                listed += 1;
            }
        }
    }
    (max, listed)
}

fn close_reason(c: &Connection) -> ProtocolError {
    match c.close_reason() {
        Some(CloseReason::Protocol(e)) => e.clone(),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// 4096-byte names and 4096-byte descriptions (the pattern that grew the
/// list-exports examples to 2 GiB with 300,000 exports): the default byte
/// limit, 64 MiB, stops the listing after about 8,000 exports.
#[test]
fn a_listing_of_large_exports_stops_at_the_byte_limit() {
    let mut c = negotiating(Limits::default());
    let (fed, listed) = flood(&mut c, 4096, 4096, 300_000);
    assert!(c.is_finished(), "still listing after {fed} replies");
    let per_export = 8192u64;
    let max = Limits::default().max_export_list_bytes;
    assert_eq!(
        listed as u64,
        max / per_export,
        "every export within the limit is reported"
    );
    match close_reason(&c) {
        ProtocolError::ExportListTooLong {
            bytes, max_bytes, ..
        } => {
            assert_eq!(max_bytes, max);
            assert!(bytes > max && bytes <= max + per_export, "{bytes}");
        }
        e => panic!("expected ExportListTooLong, got {e:?}"),
    }
}

/// Many tiny exports: the count limit applies.
#[test]
fn a_listing_of_many_exports_stops_at_the_count_limit() {
    let mut limits = Limits::default();
    limits.max_exports = 1000;
    let mut c = negotiating(limits);
    let (_, listed) = flood(&mut c, 8, 0, 5000);
    assert!(c.is_finished());
    assert_eq!(listed, 1000);
    assert!(matches!(
        close_reason(&c),
        ProtocolError::ExportListTooLong {
            exports: 1001,
            max_exports: 1000,
            ..
        }
    ));
}

/// Below the limits a listing completes as before.
#[test]
fn a_listing_within_the_limits_completes() {
    let mut limits = Limits::default();
    limits.max_exports = 3;
    let mut c = negotiating(limits);
    let (_, listed) = flood(&mut c, 16, 16, 3);
    assert_eq!(listed, 3);
    let mut ack = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    ack.extend_from_slice(&opt::LIST.to_be_bytes());
    ack.extend_from_slice(&rep::ACK.to_be_bytes());
    ack.extend_from_slice(&0u32.to_be_bytes());
    c.handle_input(&ack);
    assert!(!c.is_finished());
    assert!(std::iter::from_fn(|| c.poll_event()).any(|e| matches!(e, Event::OptionSucceeded(_))));
}
