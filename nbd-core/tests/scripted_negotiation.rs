//! Deterministic tests of the handshake and option-haggling state machine:
//! a `Connection` is driven through the harness's `Pair` (`common/mod.rs`)
//! with hand-built server bytes (`common::script`) and the test checks the
//! events, the phase and the exact bytes the client sent. Test names
//! follow the rules of the client checklist (`nbd-protocol.md` §4; §1 and §2
//! for the message layouts), e.g. `rule_31_...` for rule 31.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

mod common;

use common::script::{
    ack, cat, export_name_reply, fixed_newstyle, go_ok, greeting, info_block_size, info_export,
    meta_context, oldstyle, opt_reply, opt_reply_header, server_entry,
};
use common::{config, info_request, Pair};
use nbd_core::consts::{
    client_flags as cf, handshake_flags as hf, info, opt, rep, transmission_flags as tf, NBDMAGIC,
};
use nbd_core::error::{ProtocolError, RepError, UsageError};
use nbd_core::wire::WireError;
use nbd_core::{CloseReason, Config, Connection, Event, OptionKind, Phase, Protocol};

// ----- allocation tracking (this test binary only) -----

/// Records the largest single allocation made by the current thread while
/// armed, so a test can show that a hostile length was not allocated.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = LARGEST.try_with(|c| {
        if n > c.get() {
            c.set(n);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(0));
    f();
    LARGEST.with(Cell::get)
}

// ----- scenario data -----

const FLAGS: u16 = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_TRIM;
const SIZE: u64 = 1 << 20;

/// The usual prelude of a fixed-newstyle server that has no extended
/// headers but structured replies, for a client with default settings.
fn prelude() -> Vec<u8> {
    cat(&[
        &fixed_newstyle(),
        &opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]),
        &ack(opt::STRUCTURED_REPLY),
    ])
}

// ===== §4.2 handshake =====

#[test]
fn rule_8_to_10_client_flags_only_those_advertised() {
    let cases = [
        (0u16, 0u32),
        (hf::FIXED_NEWSTYLE, cf::FIXED_NEWSTYLE),
        (hf::NO_ZEROES, cf::NO_ZEROES),
        (
            hf::FIXED_NEWSTYLE | hf::NO_ZEROES,
            cf::FIXED_NEWSTYLE | cf::NO_ZEROES,
        ),
        // Rule 7: unknown handshake bits are ignored, never echoed.
        (0xfffc, 0),
        (0xffff, cf::FIXED_NEWSTYLE | cf::NO_ZEROES),
    ];
    for (server, want) in cases {
        let mut t = Pair::new(Config::default());
        t.feed(&greeting(server));
        assert_eq!(t.client_flags(), want, "server flags {server:#x}");
        assert_eq!(t.conn.server_handshake_flags(), server);
        assert_eq!(t.conn.client_flags(), want);
        assert!(t.closed().is_none());
    }
    // The client's own configuration can withhold a flag the server offered.
    let mut t = Pair::with(|cfg| cfg.handshake_flags = cf::FIXED_NEWSTYLE);
    t.feed(&fixed_newstyle());
    assert_eq!(t.client_flags(), cf::FIXED_NEWSTYLE);
}

#[test]
fn rule_1_1_bad_magics_are_fatal() {
    let mut t = Pair::new(Config::default());
    t.feed(b"HTTP/1.1 200 OK\r\n");
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::Wire(WireError::BadInitialMagic(_))
    ));
    assert!(t.sent().is_empty());
    let mut t = Pair::new(Config::default());
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(b"IHAVEOPX");
    t.feed(&g);
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::Wire(WireError::BadVersionMagic(_))
    ));
}

#[test]
fn rule_1_2_oldstyle_greeting_enters_transmission() {
    let mut t = Pair::new(Config::default());
    let g = oldstyle(SIZE, u32::from(FLAGS));
    t.feed(&g[..151]);
    assert_eq!(
        t.conn.phase(),
        Phase::Connecting,
        "waits for all 124 zeroes"
    );
    t.feed(&g[151..]);
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert_eq!(t.conn.protocol(), Some(Protocol::Oldstyle));
    assert!(
        t.sent().is_empty(),
        "the client sends nothing to an oldstyle server"
    );
    let i = t.go_info();
    assert_eq!((i.size, i.flags), (SIZE, FLAGS));
    assert!(!t.conn.structured_replies_negotiated());
}

#[test]
fn rule_1_2_oldstyle_handshake_flags_rejected() {
    let mut t = Pair::new(Config::default());
    t.feed(&oldstyle(SIZE, 0x0001_0000 | u32::from(FLAGS)));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::OldstyleHandshakeFlags(1)
    ));
}

// ===== §1.6 NO_ZEROES =====

#[test]
fn rule_1_6_export_name_reply_without_zeroes_when_both_agree() {
    // Non-fixed newstyle with NO_ZEROES: the reply is exactly 10 bytes.
    let mut t = Pair::new(Config::default());
    t.feed(&greeting(hf::NO_ZEROES));
    assert_eq!(t.client_flags(), cf::NO_ZEROES);
    assert_eq!(t.option_codes(), [opt::EXPORT_NAME]);
    t.feed(&export_name_reply(SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert_eq!(t.go_info().size, SIZE);
}

#[test]
fn rule_1_6_export_name_reply_with_zeroes_otherwise() {
    // The server did not offer NO_ZEROES, or the client did not take it:
    // 124 zero bytes follow, and the client waits for all of them.
    let configs = [
        (0u16, Config::default()),
        (
            hf::NO_ZEROES,
            config(|cfg| cfg.handshake_flags = cf::FIXED_NEWSTYLE),
        ),
    ];
    for (server, cfg) in configs {
        let mut t = Pair::new(cfg);
        t.feed(&greeting(server));
        assert_eq!(t.client_flags() & cf::NO_ZEROES, 0);
        let mut r = export_name_reply(SIZE, FLAGS);
        r.extend_from_slice(&[0; 124]);
        t.feed(&r[..133]);
        assert_eq!(
            t.conn.phase(),
            Phase::Connecting,
            "server flags {server:#x}"
        );
        t.feed(&r[133..]);
        assert_eq!(t.conn.phase(), Phase::Ready, "server flags {server:#x}");
    }
}

#[test]
fn rule_1_6_go_reply_never_padded() {
    // GO after a greeting without NO_ZEROES: no padding; a following byte
    // would be unexpected data, not padding.
    let mut t = Pair::with(|cfg| cfg.request_structured_replies = false);
    t.feed(&greeting(hf::FIXED_NEWSTYLE));
    t.feed(&go_ok(opt::GO, SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
}

// ===== §1.4 non-fixed newstyle =====

#[test]
fn rule_11_non_fixed_newstyle_sends_only_export_name() {
    let mut t = Pair::new(Config::with_base_allocation());
    t.feed(&greeting(hf::NO_ZEROES));
    assert_eq!(t.conn.protocol(), Some(Protocol::Newstyle));
    assert_eq!(t.options(), [(opt::EXPORT_NAME, Vec::new())]);
    t.feed(&export_name_reply(SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert!(!t.conn.structured_replies_negotiated());
}

#[test]
fn rule_11_non_fixed_newstyle_option_mode_refuses_other_options() {
    let mut t = Pair::opt_mode();
    t.feed(&greeting(hf::NO_ZEROES));
    assert_eq!(t.conn.phase(), Phase::Negotiating);
    assert!(matches!(t.conn.opt_list(), Err(UsageError::Unsupported(_))));
    assert!(matches!(t.conn.opt_info(), Err(UsageError::Unsupported(_))));
    assert!(matches!(
        t.conn.opt_structured_reply(),
        Err(UsageError::Unsupported(_))
    ));
    assert!(matches!(
        t.conn.opt_list_meta_context(&["base:"]),
        Err(UsageError::Unsupported(_))
    ));
    assert!(matches!(
        t.conn.opt_starttls(),
        Err(UsageError::Unsupported(_))
    ));
    t.drain();
    assert_eq!(t.sent().len(), 4, "nothing but the client flags was sent");
    t.conn.set_export_name("exp").unwrap();
    t.conn.opt_go().unwrap();
    t.drain();
    assert_eq!(t.options(), [(opt::EXPORT_NAME, b"exp".to_vec())]);
    t.feed(&export_name_reply(SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert_eq!(t.go_info().name, "exp");
}

// ===== §2.3.6 GO / INFO =====

#[test]
fn rule_2_3_6_go_acked_without_info_export_is_fatal() {
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&ack(opt::GO));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::MissingExportInfo(OptionKind::Go)
    ));
    assert_eq!(t.conn.phase(), Phase::Dead);
}

#[test]
fn rule_2_3_6_info_acked_without_info_export_is_fatal() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_info().unwrap();
    t.feed(&ack(opt::INFO));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::MissingExportInfo(OptionKind::Info)
    ));
}

#[test]
fn rule_2_8_huge_option_reply_length_is_fatal_without_allocating() {
    for typ in [rep::SERVER, rep::ERR_POLICY, rep::ACK, 0x8000_1234] {
        let mut t = Pair::opt_mode();
        t.feed(&prelude());
        t.conn.opt_list().unwrap();
        t.drain();
        let header = opt_reply_header(opt::LIST, typ, 0xFFFF_FFF0);
        let big = largest_allocation(|| {
            t.feed(&header);
        });
        // Rejected from the header alone: no payload had to arrive.
        let e = t.protocol_error();
        assert!(
            matches!(
                e,
                ProtocolError::OptionReplyTooLong { .. } | ProtocolError::AckWithData(..)
            ),
            "type {typ:#x}: {e:?}"
        );
        assert!(big < 64 * 1024, "type {typ:#x}: allocated {big} bytes");
    }
}

#[test]
fn rule_2_8_inner_name_length_larger_than_reply_is_fatal() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list().unwrap();
    let mut p = 100u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"short");
    t.feed(&opt_reply(opt::LIST, rep::SERVER, &p));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::Wire(WireError::InnerLengthOverflow { inner: 100, .. })
    ));
}

#[test]
fn rule_2_3_3_list_reports_exports_then_success() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list().unwrap();
    t.feed(&cat(&[
        &server_entry("a", "first"),
        &server_entry("b", ""),
        &ack(opt::LIST),
    ]));
    let listed: Vec<_> = t
        .events
        .iter()
        .filter_map(|e| match e {
            Event::ExportListed { name, description } => {
                Some((name.as_str(), description.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(listed, [("a", "first"), ("b", "")]);
    assert!(matches!(
        t.events.last(),
        Some(Event::OptionSucceeded(OptionKind::List))
    ));
    assert_eq!(t.conn.phase(), Phase::Negotiating);
}

#[test]
fn rule_29_unknown_info_types_are_ignored() {
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&cat(&[
        &opt_reply(opt::GO, rep::INFO, &[0x12, 0x34]),
        &opt_reply(opt::GO, rep::INFO, &[0x7f, 0xff, 1, 2, 3, 4, 5]),
        &info_export(opt::GO, SIZE, FLAGS),
        &opt_reply(opt::GO, rep::INFO, &[0, 99]),
        &ack(opt::GO),
    ]));
    assert_eq!(t.conn.phase(), Phase::Ready, "{:?}", t.events);
    assert_eq!(t.go_info().size, SIZE);
}

#[test]
fn rule_29_huge_unknown_info_is_skipped_without_buffering() {
    // 1 MiB of an unknown info type: more than any buffer the client keeps.
    let len: u32 = 1 << 20;
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    let mut stream = opt_reply_header(opt::GO, rep::INFO, len);
    stream.extend_from_slice(&0x4242u16.to_be_bytes());
    stream.extend(std::iter::repeat_n(0xab, len as usize - 2));
    stream.extend(go_ok(opt::GO, SIZE, FLAGS));
    let big = largest_allocation(|| {
        for piece in stream.chunks(4096) {
            t.feed(piece);
        }
    });
    assert_eq!(t.conn.phase(), Phase::Ready, "{:?}", t.events);
    assert!(big < 64 * 1024, "allocated {big} bytes");
    // All at once too.
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&stream);
    assert_eq!(t.conn.phase(), Phase::Ready, "{:?}", t.events);
}

#[test]
fn rule_2_8_huge_known_info_is_fatal() {
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    let mut h = opt_reply_header(opt::GO, rep::INFO, 1 << 20);
    h.extend_from_slice(&info::EXPORT.to_be_bytes());
    t.feed(&h);
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::OptionReplyTooLong { .. }
    ));
}

#[test]
fn rule_2_8_unknown_error_reply_type_is_reported_and_negotiation_continues() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list().unwrap();
    t.feed(&opt_reply(opt::LIST, 0x8000_0063, b"strange"));
    match t.events.last() {
        Some(Event::OptionError { option, error }) => {
            assert_eq!(*option, OptionKind::List);
            assert_eq!(error.reply, RepError::Other(0x8000_0063));
            assert_eq!(error.message, "strange");
        }
        other => panic!("expected OptionError, got {other:?}"),
    }
    assert_eq!(t.conn.phase(), Phase::Negotiating);
    assert!(t.closed().is_none());
}

#[test]
fn rule_98_unknown_non_error_reply_type_is_fatal() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list().unwrap();
    t.feed(&opt_reply(opt::LIST, 0x63, &[]));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::UnexpectedOptionReply {
            option: OptionKind::List,
            reply_type: 0x63
        }
    ));
    // A known type that does not belong to the option is just as fatal.
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list().unwrap();
    t.feed(&meta_context(opt::LIST, 1, "base:allocation"));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::UnexpectedOptionReply { .. }
    ));
}

#[test]
fn rule_2_8_wrong_option_echoed_is_fatal() {
    let mut t = Pair::new(Config::default());
    t.feed(&fixed_newstyle());
    // The client sent EXTENDED_HEADERS; the server answers about LIST.
    t.feed(&opt_reply(opt::LIST, rep::ERR_UNSUP, &[]));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::WrongOptionEcho {
            sent: opt::EXTENDED_HEADERS,
            got: opt::LIST
        }
    ));
}

#[test]
fn rule_2_8_ack_with_data_is_fatal() {
    let mut t = Pair::new(Config::default());
    t.feed(&fixed_newstyle());
    t.feed(&opt_reply(opt::EXTENDED_HEADERS, rep::ACK, &[0; 4]));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::AckWithData(OptionKind::ExtendedHeaders, 4)
    ));
}

#[test]
fn rule_2_8_bad_option_reply_magic_is_fatal() {
    let mut t = Pair::new(Config::default());
    t.feed(&fixed_newstyle());
    let mut r = ack(opt::EXTENDED_HEADERS);
    r[0] ^= 0xff;
    t.feed(&r);
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::Wire(WireError::BadOptionReplyMagic(_))
    ));
}

#[test]
fn unsolicited_bytes_while_idle_are_fatal() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    assert_eq!(t.conn.phase(), Phase::Negotiating);
    t.feed(&ack(opt::LIST));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::UnexpectedData(20)
    ));
}

// ===== §4.3 option haggling =====

#[test]
fn rule_19_err_shutdown_sends_abort() {
    // Automatic mode: the connection ends, with NBD_OPT_ABORT sent first.
    let mut t = Pair::new(Config::default());
    t.feed(&fixed_newstyle());
    t.feed(&opt_reply(
        opt::EXTENDED_HEADERS,
        rep::ERR_SHUTDOWN,
        b"going down",
    ));
    assert_eq!(
        t.options(),
        [(opt::EXTENDED_HEADERS, vec![]), (opt::ABORT, vec![])]
    );
    match t.closed() {
        Some(CloseReason::NegotiationFailed { option, error }) => {
            assert_eq!(*option, OptionKind::ExtendedHeaders);
            assert_eq!(error.reply, RepError::Shutdown);
        }
        other => panic!("{other:?}"),
    }
    // Option mode: the caller sees the error, then the same soft disconnect.
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list().unwrap();
    t.feed(&opt_reply(opt::LIST, rep::ERR_SHUTDOWN, &[]));
    assert_eq!(t.option_codes().last(), Some(&opt::ABORT));
    assert!(t.events.iter().any(|e| matches!(
        e,
        Event::OptionError {
            option: OptionKind::List,
            ..
        }
    )));
    assert!(t.closed().is_some());
    assert!(t.conn.is_finished());
}

#[test]
fn rule_21_no_export_name_fallback_after_extended_headers() {
    let mut t = Pair::new(Config::default());
    t.feed(&fixed_newstyle());
    t.feed(&ack(opt::EXTENDED_HEADERS));
    t.feed(&opt_reply(opt::GO, rep::ERR_UNSUP, &[]));
    assert!(!t.option_codes().contains(&opt::EXPORT_NAME));
    assert!(matches!(
        t.closed(),
        Some(CloseReason::NegotiationFailed {
            option: OptionKind::Go,
            ..
        })
    ));
}

#[test]
fn rule_31_go_unsup_falls_back_to_export_name() {
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&opt_reply(opt::GO, rep::ERR_UNSUP, &[]));
    assert_eq!(
        t.option_codes(),
        [
            opt::EXTENDED_HEADERS,
            opt::STRUCTURED_REPLY,
            opt::GO,
            opt::EXPORT_NAME
        ]
    );
    t.feed(&export_name_reply(SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert_eq!(t.go_info().size, SIZE);
}

#[test]
fn rule_31_go_unsup_falls_back_in_option_mode_too() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_go().unwrap();
    t.feed(&opt_reply(opt::GO, rep::ERR_UNSUP, &[]));
    assert_eq!(t.option_codes().last(), Some(&opt::EXPORT_NAME));
    t.feed(&export_name_reply(SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
}

#[test]
fn rule_33_go_asks_for_block_size_and_rule_27_layout() {
    let mut t = Pair::with(|cfg| cfg.export_name = "exp".into());
    t.feed(&prelude());
    let (o, d) = t.options().pop().unwrap();
    assert_eq!(o, opt::GO);
    assert_eq!(info_request(&d), ("exp".into(), vec![info::BLOCK_SIZE]));
}

#[test]
fn rule_33_block_size_reqd_retries_with_block_size() {
    let mut t = Pair::with(|cfg| cfg.request_block_size = false);
    t.feed(&prelude());
    let (_, d) = t.options().pop().unwrap();
    assert_eq!(info_request(&d).1, Vec::<u16>::new());
    t.feed(&opt_reply(opt::GO, rep::ERR_BLOCK_SIZE_REQD, b"need sizes"));
    let opts = t.options();
    assert_eq!(opts.len(), 4);
    let (o, d) = &opts[3];
    assert_eq!(*o, opt::GO);
    assert_eq!(info_request(d).1, vec![info::BLOCK_SIZE]);
    t.feed(&cat(&[
        &info_block_size(opt::GO, 512, 4096, 1 << 20),
        &go_ok(opt::GO, SIZE, FLAGS),
    ]));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert_eq!(t.go_info().block_size.unwrap().minimum, 512);
}

#[test]
fn rule_33_block_size_reqd_after_asking_is_not_retried() {
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&opt_reply(opt::GO, rep::ERR_BLOCK_SIZE_REQD, &[]));
    assert_eq!(
        t.option_codes().iter().filter(|&&o| o == opt::GO).count(),
        1
    );
    assert!(matches!(
        t.closed(),
        Some(CloseReason::NegotiationFailed {
            option: OptionKind::Go,
            ..
        })
    ));
}

#[test]
fn rule_36_structured_reply_unsup_carries_on() {
    let mut t = Pair::new(Config::with_base_allocation());
    t.feed(&fixed_newstyle());
    t.feed(&opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]));
    t.feed(&opt_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]));
    // Rule 43: no SET_META_CONTEXT without structured replies.
    assert_eq!(
        t.option_codes(),
        [opt::EXTENDED_HEADERS, opt::STRUCTURED_REPLY, opt::GO]
    );
    t.feed(&go_ok(opt::GO, SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert!(!t.conn.structured_replies_negotiated());
}

#[test]
fn ext_header_reqd_after_extended_headers_is_fine() {
    // Extended headers acknowledged: STRUCTURED_REPLY is never sent (qemu
    // would answer it with ERR_EXT_HEADER_REQD), and structured replies count
    // as negotiated.
    let mut t = Pair::new(Config::with_base_allocation());
    t.feed(&fixed_newstyle());
    t.feed(&ack(opt::EXTENDED_HEADERS));
    assert_eq!(
        t.option_codes(),
        [opt::EXTENDED_HEADERS, opt::SET_META_CONTEXT]
    );
    t.feed(&cat(&[
        &meta_context(opt::SET_META_CONTEXT, 5, "base:allocation"),
        &ack(opt::SET_META_CONTEXT),
        &go_ok(opt::GO, SIZE, FLAGS),
    ]));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert!(t.conn.extended_headers_negotiated());
    assert!(t.conn.structured_replies_negotiated());
    assert_eq!(t.conn.meta_context_id("base:allocation"), Some(5));

    // Option mode: asking for structured replies after extended headers
    // succeeds at once, without a round trip.
    let mut t = Pair::opt_mode();
    t.feed(&fixed_newstyle());
    t.feed(&ack(opt::EXTENDED_HEADERS));
    let before = t.sent().len();
    t.conn.opt_structured_reply().unwrap();
    t.drain();
    assert_eq!(t.sent().len(), before);
    assert!(matches!(
        t.events.last(),
        Some(Event::OptionSucceeded(OptionKind::StructuredReply))
    ));

    // And if a server does answer STRUCTURED_REPLY with ERR_EXT_HEADER_REQD
    // (extended headers refused first), the client just carries on.
    let mut t = Pair::new(Config::default());
    t.feed(&fixed_newstyle());
    t.feed(&opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]));
    t.feed(&opt_reply(
        opt::STRUCTURED_REPLY,
        rep::ERR_EXT_HEADER_REQD,
        &[],
    ));
    t.feed(&go_ok(opt::GO, SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert!(!t.conn.structured_replies_negotiated());
}

#[test]
fn rule_41_list_meta_context_error_discards_contexts() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list_meta_context(&["base:"]).unwrap();
    t.feed(&cat(&[
        &meta_context(opt::LIST_META_CONTEXT, 0, "base:allocation"),
        &opt_reply(opt::LIST_META_CONTEXT, rep::ERR_TOO_BIG, b"too many"),
    ]));
    assert!(
        !t.events
            .iter()
            .any(|e| matches!(e, Event::MetaContext { .. })),
        "{:?}",
        t.events
    );
    assert!(matches!(
        t.events.last(),
        Some(Event::OptionError {
            option: OptionKind::ListMetaContext,
            ..
        })
    ));
    assert_eq!(t.conn.phase(), Phase::Negotiating);
}

#[test]
fn rule_42_list_meta_context_ids_are_ignored() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_list_meta_context::<&str>(&[]).unwrap();
    t.feed(&cat(&[
        &meta_context(opt::LIST_META_CONTEXT, 1234, "base:allocation"),
        &ack(opt::LIST_META_CONTEXT),
    ]));
    assert!(t.events.iter().any(|e| matches!(
        e,
        Event::MetaContext {
            option: OptionKind::ListMetaContext,
            id: 0,
            ..
        }
    )));
    assert!(t.conn.meta_contexts().is_empty(), "LIST selects nothing");
}

#[test]
fn rule_44_failed_set_meta_context_clears_contexts() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_set_meta_context(&["base:allocation"]).unwrap();
    t.feed(&cat(&[
        &meta_context(opt::SET_META_CONTEXT, 3, "base:allocation"),
        &ack(opt::SET_META_CONTEXT),
    ]));
    assert_eq!(t.conn.meta_context_id("base:allocation"), Some(3));
    t.conn
        .opt_set_meta_context(&["qemu:dirty-bitmap:x"])
        .unwrap();
    t.feed(&opt_reply(opt::SET_META_CONTEXT, rep::ERR_INVALID, &[]));
    assert!(t.conn.meta_contexts().is_empty());
    assert_eq!(t.conn.phase(), Phase::Negotiating);
}

#[test]
fn rule_86_contexts_only_count_for_the_export_selected() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.set_export_name("a").unwrap();
    t.conn.opt_set_meta_context(&["base:allocation"]).unwrap();
    t.feed(&cat(&[
        &meta_context(opt::SET_META_CONTEXT, 3, "base:allocation"),
        &ack(opt::SET_META_CONTEXT),
    ]));
    t.conn.set_export_name("b").unwrap();
    t.conn.opt_go().unwrap();
    t.feed(&go_ok(opt::GO, SIZE, FLAGS));
    assert_eq!(t.conn.phase(), Phase::Ready);
    assert!(t.conn.meta_contexts().is_empty());
}

#[test]
fn rule_2_8_server_hangup_after_failed_go_in_option_mode_is_server_killed_connection() {
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.set_export_name("nope").unwrap();
    t.conn.opt_go().unwrap();
    t.feed(&opt_reply(opt::GO, rep::ERR_UNKNOWN, b"no such export"));
    assert!(matches!(
        t.events.last(),
        Some(Event::OptionError {
            option: OptionKind::Go,
            ..
        })
    ));
    assert_eq!(t.conn.phase(), Phase::Negotiating);
    t.eof();
    assert!(matches!(
        t.closed(),
        Some(CloseReason::ServerKilledConnection { .. })
    ));
    assert_eq!(t.conn.phase(), Phase::Dead);
}

#[test]
fn rule_23_abort_acknowledged_or_hung_up_is_clean() {
    for hang_up in [false, true] {
        let mut t = Pair::opt_mode();
        t.feed(&prelude());
        t.conn.opt_abort().unwrap();
        if hang_up {
            t.eof(); // rule 23
        } else {
            t.feed(&ack(opt::ABORT));
        }
        assert_eq!(t.closed(), Some(&CloseReason::Aborted));
        assert_eq!(t.conn.phase(), Phase::Closed);
    }
}

// ===== export sanity (§4.9) =====

#[test]
fn rule_2_8_bogus_block_sizes_are_ignored() {
    for (min, pref, max) in [
        (3, 4096, 65536),            // minimum not a power of two
        (512, 100, 65536),           // preferred too small
        (4096, 512, 65536),          // preferred below minimum
        (512, 4096, 1000),           // maximum below preferred
        (512, 4096, 65537),          // maximum not a multiple of minimum
        (1 << 17, 1 << 17, 1 << 20), // minimum over 64 KiB
        (0, 0, 0),
    ] {
        let mut t = Pair::new(Config::default());
        t.feed(&prelude());
        t.feed(&cat(&[
            &info_block_size(opt::GO, min, pref, max),
            &go_ok(opt::GO, SIZE, FLAGS),
        ]));
        assert_eq!(t.conn.phase(), Phase::Ready, "{min}/{pref}/{max}");
        assert_eq!(t.go_info().block_size, None, "{min}/{pref}/{max}");
    }
    // A valid one is kept.
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&cat(&[
        &info_block_size(opt::GO, 1, 4096, u32::MAX),
        &go_ok(opt::GO, SIZE, FLAGS),
    ]));
    assert!(t.go_info().block_size.is_some());
}

#[test]
fn export_size_over_i64_max_is_rejected() {
    let too_big = i64::MAX as u64 + 1;
    // GO
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&cat(&[
        &info_export(opt::GO, too_big, FLAGS),
        &ack(opt::GO),
    ]));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::ExportTooLarge(s) if *s == too_big
    ));
    // INFO
    let mut t = Pair::opt_mode();
    t.feed(&prelude());
    t.conn.opt_info().unwrap();
    t.feed(&cat(&[
        &info_export(opt::INFO, u64::MAX, FLAGS),
        &ack(opt::INFO),
    ]));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::ExportTooLarge(_)
    ));
    // EXPORT_NAME
    let mut t = Pair::new(Config::default());
    t.feed(&greeting(hf::NO_ZEROES));
    t.feed(&export_name_reply(too_big, FLAGS));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::ExportTooLarge(_)
    ));
    // Oldstyle
    let mut t = Pair::new(Config::default());
    t.feed(&oldstyle(too_big, u32::from(FLAGS)));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::ExportTooLarge(_)
    ));
    // The largest legal size is fine.
    let mut t = Pair::new(Config::default());
    t.feed(&oldstyle(i64::MAX as u64, u32::from(FLAGS)));
    assert_eq!(t.conn.phase(), Phase::Ready);
}

#[test]
fn rule_2_8_flags_without_has_flags_are_rejected() {
    let flags = FLAGS & !tf::HAS_FLAGS;
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&cat(&[&info_export(opt::GO, SIZE, flags), &ack(opt::GO)]));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::BadTransmissionFlags(f) if *f == flags
    ));
    let mut t = Pair::new(Config::default());
    t.feed(&greeting(hf::NO_ZEROES));
    t.feed(&export_name_reply(SIZE, 0));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::BadTransmissionFlags(0)
    ));
    let mut t = Pair::new(Config::default());
    t.feed(&oldstyle(SIZE, 0));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::BadTransmissionFlags(0)
    ));
}

#[test]
fn rule_2_8_flags_that_need_unnegotiated_features_are_cleared() {
    // DF without structured replies, FAST_ZERO without WRITE_ZEROES,
    // BLOCK_STATUS_PAYLOAD without extended headers.
    let mut t = Pair::with(|cfg| cfg.request_structured_replies = false);
    t.feed(&fixed_newstyle());
    let flags = tf::HAS_FLAGS | tf::SEND_DF | tf::SEND_FAST_ZERO | tf::BLOCK_STATUS_PAYLOAD;
    t.feed(&cat(&[&info_export(opt::GO, SIZE, flags), &ack(opt::GO)]));
    assert_eq!(t.go_info().flags, tf::HAS_FLAGS);
}

// ===== truncation: EOF anywhere =====

/// Complete negotiations, each paired with the configuration that produces it.
fn full_negotiations() -> Vec<(&'static str, Config, Vec<u8>)> {
    vec![
        (
            "structured+meta",
            Config::with_base_allocation(),
            cat(&[
                &prelude(),
                &meta_context(opt::SET_META_CONTEXT, 1, "base:allocation"),
                &ack(opt::SET_META_CONTEXT),
                &opt_reply(opt::GO, rep::INFO, &[0x55, 0x55, 9]),
                &info_block_size(opt::GO, 512, 4096, 1 << 20),
                &go_ok(opt::GO, SIZE, FLAGS),
            ]),
        ),
        (
            "extended",
            Config::default(),
            cat(&[
                &fixed_newstyle(),
                &ack(opt::EXTENDED_HEADERS),
                &go_ok(opt::GO, SIZE, FLAGS),
            ]),
        ),
        (
            "go-unsup-fallback-with-zeroes",
            Config::default(),
            cat(&[
                &greeting(hf::FIXED_NEWSTYLE),
                &opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, b"msg"),
                &opt_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]),
                &opt_reply(opt::GO, rep::ERR_UNSUP, &[]),
                &export_name_reply(SIZE, FLAGS),
                &[0; 124],
            ]),
        ),
        (
            "non-fixed",
            Config::default(),
            cat(&[&greeting(hf::NO_ZEROES), &export_name_reply(SIZE, FLAGS)]),
        ),
        (
            "oldstyle",
            Config::default(),
            oldstyle(SIZE, u32::from(FLAGS)),
        ),
        (
            "option-mode",
            config(|cfg| cfg.opt_mode = true),
            Vec::new(), // built by drive_option_mode
        ),
    ]
}

/// Option mode: LIST, INFO, GO with the server's replies.
fn option_mode_stream() -> Vec<Vec<u8>> {
    vec![
        prelude(),
        cat(&[&server_entry("exp", "an export"), &ack(opt::LIST)]),
        cat(&[&info_export(opt::INFO, SIZE, FLAGS), &ack(opt::INFO)]),
        go_ok(opt::GO, SIZE, FLAGS),
    ]
}

fn drive_option_mode(t: &mut Pair, bytes: &[u8]) {
    // Feed the stream turn by turn, calling the next opt_* between turns.
    let turns = option_mode_stream();
    let mut rest = bytes;
    for (i, turn) in turns.iter().enumerate() {
        match i {
            1 => t.conn.opt_list().unwrap(),
            2 => t.conn.opt_info().unwrap(),
            3 => t.conn.opt_go().unwrap(),
            _ => {}
        }
        let n = turn.len().min(rest.len());
        t.feed(&rest[..n]);
        rest = &rest[n..];
        if rest.is_empty() {
            return;
        }
    }
}

#[test]
fn rule_2_8_truncated_stream_at_every_offset_ends_with_server_killed_connection() {
    for (name, cfg, stream) in full_negotiations() {
        let stream = if stream.is_empty() {
            option_mode_stream().concat()
        } else {
            stream
        };
        // The complete stream succeeds.
        let mut t = Pair::new(cfg.clone());
        if cfg.opt_mode {
            drive_option_mode(&mut t, &stream);
        } else {
            t.feed(&stream);
        }
        assert_eq!(t.conn.phase(), Phase::Ready, "{name}: {:?}", t.events);
        // Every proper prefix, then EOF, ends with ServerKilledConnection;
        // the full stream then EOF ends with ServerClosed, nothing lost
        // (idle in transmission).
        for cut in 0..=stream.len() {
            for one_by_one in [false, true] {
                let mut t = Pair::new(cfg.clone());
                let prefix = &stream[..cut];
                if cfg.opt_mode {
                    drive_option_mode(&mut t, prefix);
                } else if one_by_one {
                    for b in prefix {
                        t.feed(std::slice::from_ref(b));
                    }
                } else {
                    t.feed(prefix);
                }
                assert!(t.closed().is_none(), "{name} cut {cut}: {:?}", t.events);
                t.eof();
                if cut == stream.len() {
                    assert!(
                        matches!(t.closed(), Some(CloseReason::ServerClosed { lost: 0, .. })),
                        "{name} cut {cut}: {:?}",
                        t.events
                    );
                } else {
                    assert!(
                        matches!(t.closed(), Some(CloseReason::ServerKilledConnection { .. })),
                        "{name} cut {cut}: {:?}",
                        t.events
                    );
                }
                assert_eq!(t.conn.phase(), Phase::Dead);
                // EOF again, or more input, changes nothing.
                t.eof();
                t.feed(b"late");
                assert!(t.closed().is_some());
                if cfg.opt_mode {
                    break;
                }
            }
        }
    }
}

#[test]
fn allocation_tracker_sees_large_allocations() {
    // Guards the "without allocating" tests above against a tracker that
    // silently records nothing.
    let big = largest_allocation(|| {
        let v = vec![1u8; 1 << 20];
        std::hint::black_box(&v);
    });
    assert!(big >= 1 << 20, "{big}");
}

/// Spec "Option reply" (`doc/proto.md`, option haggling): a reply header
/// whose length no legal reply of its type can have (here 0xfffffff0, past
/// every cap) fails on the 20-byte header alone, for INFO/GO and the meta
/// context options; the client never waits for a payload that cannot be
/// right while the server goes quiet.
#[test]
fn rule_2_8_impossible_reply_length_fails_on_the_header_alone() {
    type Start = fn(&mut Connection) -> Result<(), UsageError>;
    let cases: [(u32, u32, Start); 5] = [
        (opt::GO, rep::INFO, |c| c.opt_go()),
        (opt::INFO, rep::INFO, |c| c.opt_info()),
        (opt::SET_META_CONTEXT, rep::META_CONTEXT, |c| {
            c.opt_set_meta_context(&["base:allocation"])
        }),
        (opt::LIST_META_CONTEXT, rep::META_CONTEXT, |c| {
            c.opt_list_meta_context::<&str>(&[])
        }),
        (opt::GO, rep::ERR_UNKNOWN, |c| c.opt_go()),
    ];
    for (option, typ, start) in cases {
        let mut t = Pair::opt_mode();
        t.feed(&prelude());
        start(&mut t.conn).unwrap();
        t.drain();
        t.feed(&opt_reply_header(option, typ, 0xFFFF_FFF0));
        assert!(
            matches!(
                t.protocol_error(),
                ProtocolError::OptionReplyTooLong {
                    len: 0xFFFF_FFF0,
                    ..
                }
            ),
            "option {option} type {typ:#x}: {:?}",
            t.events
        );
        assert_eq!(t.conn.phase(), Phase::Dead);
    }
    // Automatic mode: GO answered with such an INFO header.
    let mut t = Pair::new(Config::default());
    t.feed(&prelude());
    t.feed(&opt_reply_header(opt::GO, rep::INFO, 0xFFFF_FFF0));
    assert!(matches!(
        t.protocol_error(),
        ProtocolError::OptionReplyTooLong {
            option: OptionKind::Go,
            ..
        }
    ));
}
