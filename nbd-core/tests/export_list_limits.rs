//! doc/proto.md, "`NBD_OPT_LIST`": a server answers with one
//! `NBD_REP_SERVER` per export, as many as it likes. A hostile one can
//! list without end; the client bounds the count and the bytes of one
//! listing ([`Limits::max_exports`], [`Limits::max_export_list_bytes`]) and
//! ends the connection with a typed error once past them.

mod common;

use common::script::{ack, fixed_newstyle, server_entry};
use common::Pair;
use nbd_core::consts::opt;
use nbd_core::{CloseReason, Event, Limits, ProtocolError};

/// A connection in option mode with `NBD_OPT_LIST` sent.
fn listing(limits: Limits) -> Pair {
    let mut p = Pair::with(|cfg| {
        cfg.opt_mode = true;
        cfg.request_extended_headers = false;
        cfg.request_structured_replies = false;
        cfg.request_meta_context = false;
        cfg.limits = limits;
    });
    p.feed(&fixed_newstyle());
    p.conn.opt_list().expect("opt_list");
    p.drain();
    p
}

/// Feeds exports with names and descriptions of the given lengths until
/// the connection ends (or `max` of them); returns how many were reported.
fn flood(p: &mut Pair, name_len: usize, desc_len: usize, max: usize) -> usize {
    let desc = "d".repeat(desc_len);
    for i in 0..max {
        if p.conn.is_finished() {
            break;
        }
        let mut name = format!("e{i}");
        name.extend(std::iter::repeat_n(
            'x',
            name_len.saturating_sub(name.len()),
        ));
        p.feed(&server_entry(&name, &desc));
    }
    p.take_events()
        .iter()
        .filter(|e| matches!(e, Event::ExportListed { .. }))
        .count()
}

/// The protocol error the connection ended with.
fn fatal(p: &Pair) -> ProtocolError {
    match p.conn.close_reason() {
        Some(CloseReason::Protocol(e)) => e.clone(),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// 4096-byte names and 4096-byte descriptions (the pattern that grew the
/// list-exports examples to 2 GiB with 300,000 exports): the default byte
/// limit, 64 MiB, stops the listing after 8,192 exports.
#[test]
fn a_listing_of_large_exports_stops_at_the_byte_limit() {
    let mut p = listing(Limits::default());
    let listed = flood(&mut p, 4096, 4096, 300_000);
    assert!(p.conn.is_finished(), "still listing");
    let per_export = 8192u64;
    let max = Limits::default().max_export_list_bytes;
    assert_eq!(
        listed as u64,
        max / per_export,
        "every export within the limit is reported"
    );
    match fatal(&p) {
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
    let mut p = listing(limits);
    assert_eq!(flood(&mut p, 8, 0, 5000), 1000);
    assert!(matches!(
        fatal(&p),
        ProtocolError::ExportListTooLong {
            exports: 1001,
            max_exports: 1000,
            ..
        }
    ));
}

/// Within the limits a listing completes as before.
#[test]
fn a_listing_within_the_limits_completes() {
    let mut limits = Limits::default();
    limits.max_exports = 3;
    let mut p = listing(limits);
    assert_eq!(flood(&mut p, 16, 16, 3), 3);
    p.feed(&ack(opt::LIST));
    assert!(!p.conn.is_finished());
    assert!(p
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::OptionSucceeded(_))));
}
