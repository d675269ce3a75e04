//! Option negotiation against the scripted fake server (issue 2, "The fake
//! server covers at least ..."): what no real server sends. The GO→EXPORT_NAME
//! fallback with and without the 124 zero bytes, servers that hang up after
//! a failed option, LIST unsupported, oldstyle, bad magics, truncation at
//! every byte offset, absurd lengths, unknown info types, GO acked without
//! NBD_INFO_EXPORT, ERR_SHUTDOWN, escaping of server messages, and the
//! mapping of every NBD_REP_ERR_*.
//!
//! Client calls that could hang on a broken client run under [`guarded`]:
//! on another thread, failing the test after 10 s.

use nbd_std::CmdFlags;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nbd_std::nbd_core::{CloseReason, OptionKind, ProtocolError, RepError, UsageError};
use nbd_std::{consts, Client, Config, Error, Phase};
use nbd_tests::proto::*;
use nbd_tests::{FakeConn, FakeServer, GoConfig, Negotiated};

// ------------------------------------------------------------------ helpers

const GUARD: Duration = Duration::from_secs(10);

/// Runs `f` on its own thread and returns its result; fails the test if it
/// panics or has not returned within 10 s (a hang).
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(GUARD) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: client hung for {GUARD:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: client panicked"),
    }
}

fn opt_mode() -> Config {
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    cfg
}

/// Option mode without the automatic EXTENDED_HEADERS / STRUCTURED_REPLY:
/// the first option on the wire is the test's own.
fn bare_opt_mode() -> Config {
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    cfg.request_structured_replies = false;
    cfg
}

fn connect(server: &FakeServer, cfg: Config) -> Result<Client, Error> {
    let path = server.socket().to_path_buf();
    guarded("connect", move || Client::connect_unix(path, cfg))
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> io::Result<()> {
    if cond {
        Ok(())
    } else {
        Err(io::Error::new(ErrorKind::InvalidData, msg()))
    }
}

/// Receives one option and checks it is `want`; returns its data.
fn expect_opt(c: &mut FakeConn, want: u32) -> io::Result<Vec<u8>> {
    let (opt, data) = c.recv_option()?;
    ensure(opt == want, || {
        format!("expected option {want}, client sent option {opt} ({data:02x?})")
    })?;
    Ok(data)
}

/// Fixed newstyle greeting with NO_ZEROES; returns the client's flags.
fn greet(c: &mut FakeConn) -> io::Result<u32> {
    c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
    c.recv_client_flags()
}

/// Answers the client's automatic options like nbdkit 1.32:
/// EXTENDED_HEADERS → ERR_UNSUP, STRUCTURED_REPLY → ACK.
fn prelude(c: &mut FakeConn) -> io::Result<()> {
    expect_opt(c, OPT_EXTENDED_HEADERS)?;
    c.send_error(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "")?;
    expect_opt(c, OPT_STRUCTURED_REPLY)?;
    c.send_ack(OPT_STRUCTURED_REPLY)
}

/// Reads whatever the client still sends until it closes; returns it.
fn drain(c: &mut FakeConn) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match c.stream().read(&mut b) {
            Ok(0) => return Ok(all),
            Ok(n) => all.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(all),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Ends the server's side of the conversation (the client sees EOF) and
/// waits for the client to hang up, so nothing unread can turn the close
/// into a reset.
fn hang_up(c: &mut FakeConn) -> io::Result<Vec<u8>> {
    match c.stream().shutdown(Shutdown::Write) {
        Err(e) if e.kind() != ErrorKind::NotConnected => return Err(e),
        _ => {}
    }
    drain(c)
}

/// Serves `disk` until NBD_CMD_DISC, as agreed by a negotiation done by hand.
fn serve_after(
    c: &mut FakeConn,
    structured: bool,
    export_name: &str,
    used_export_name: bool,
    disk: &mut [u8],
) -> io::Result<()> {
    c.set_negotiated(Negotiated {
        structured_replies: structured,
        export_name: export_name.to_string(),
        used_export_name,
        ..Negotiated::default()
    });
    c.serve(disk)?;
    c.expect_eof()
}

fn disk(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 256) as u8).collect()
}

/// Option reply bytes: magic, option, type, length, data.
fn opt_reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// An option reply header announcing `len` bytes (none follow).
fn opt_reply_header(option: u32, typ: u32, len: u32) -> Vec<u8> {
    let mut v = opt_reply(option, typ, &[]);
    v[16..20].copy_from_slice(&len.to_be_bytes());
    v
}

fn info_payload(info: u16, rest: &[u8]) -> Vec<u8> {
    let mut v = info.to_be_bytes().to_vec();
    v.extend_from_slice(rest);
    v
}

fn info_export_payload(size: u64, flags: u16) -> Vec<u8> {
    let mut rest = size.to_be_bytes().to_vec();
    rest.extend_from_slice(&flags.to_be_bytes());
    info_payload(INFO_EXPORT, &rest)
}

fn assert_protocol_error(r: Result<Client, Error>, what: &str) -> ProtocolError {
    match r {
        Err(Error::Closed(CloseReason::Protocol(e))) => e,
        other => panic!("{what}: expected Error::Closed(Protocol(..)), got {other:?}"),
    }
}

fn read16(c: &mut Client, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    c.pread(&mut b, offset, CmdFlags::empty()).expect("pread");
    b
}

// ------------------------------------------------------ GO → EXPORT_NAME fallback

/// Scripts a server that answers GO with ERR_UNSUP and accepts
/// EXPORT_NAME; checks the client flags and the name the client sent.
fn fallback_server(server_flags: u16, want_client_flags: u32, zeroes: bool) -> FakeServer {
    FakeServer::start(move |c| {
        c.send_newstyle(server_flags)?;
        let flags = c.recv_client_flags()?;
        ensure(flags == want_client_flags, || {
            format!("client flags {flags:#x}, want {want_client_flags:#x}")
        })?;
        prelude(c)?;
        let data = expect_opt(c, OPT_GO)?;
        let (name, infos) = parse_info_request(&data).expect("valid GO data");
        ensure(name == "exp" && infos.contains(&INFO_BLOCK_SIZE), || {
            format!("GO for {name:?} with {infos:?}")
        })?;
        c.send_error(OPT_GO, REP_ERR_UNSUP, "GO? never heard of it")?;
        let data = expect_opt(c, OPT_EXPORT_NAME)?;
        ensure(data == b"exp", || format!("EXPORT_NAME data {data:02x?}"))?;
        c.send_export_name_reply(4096, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH, !zeroes)?;
        serve_after(c, true, "exp", true, &mut disk(4096))
    })
}

fn check_fallback_client(server: FakeServer, cfg: Config) {
    let mut c = Client::connect(&server.uri_for("exp"), cfg).unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_size().unwrap(), 4096);
    assert!(c.export_info().unwrap().can_flush());
    assert_eq!(
        c.get_block_size().unwrap(),
        None,
        "EXPORT_NAME has no block sizes"
    );
    assert!(
        c.get_structured_replies_negotiated(),
        "structured replies survive the fallback"
    );
    // The padding was consumed exactly: the next bytes parse as replies.
    assert_eq!(read16(&mut c, 100), disk(4096)[100..116]);
    c.flush(CmdFlags::empty()).unwrap();
    c.shutdown().unwrap();
    server.join().unwrap();
}

/// doc/proto.md, "NBD_OPT_INFO and NBD_OPT_GO": on NBD_REP_ERR_UNSUP to GO
/// the client falls back to NBD_OPT_EXPORT_NAME.
#[test]
fn go_unsup_falls_back_to_export_name_without_zeroes() {
    let s = fallback_server(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 3, false);
    check_fallback_client(s, Config::default());
}

/// doc/proto.md, "Client flags": no NBD_FLAG_C_NO_ZEROES unless the server
/// set NBD_FLAG_NO_ZEROES. No NO_ZEROES from the server, none from the
/// client, and the EXPORT_NAME reply carries the 124 zero bytes.
#[test]
fn go_unsup_falls_back_to_export_name_with_zeroes() {
    let s = fallback_server(FLAG_FIXED_NEWSTYLE, 1, true);
    check_fallback_client(s, Config::default());
}

/// A client configured without NO_ZEROES gets the zero bytes even from a
/// server that offers to omit them.
#[test]
fn client_without_no_zeroes_gets_zero_padding() {
    let s = fallback_server(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 1, true);
    let mut cfg = Config::default();
    cfg.handshake_flags = consts::client_flags::FIXED_NEWSTYLE;
    check_fallback_client(s, cfg);
}

/// doc/proto.md, "NBD_OPT_INFO and NBD_OPT_GO": the EXPORT_NAME fallback in
/// option mode: opt_go falls back too.
#[test]
fn opt_go_falls_back_to_export_name() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        let data = expect_opt(c, OPT_GO)?;
        ensure(parse_info_request(&data).unwrap().0 == "b", || {
            "name".into()
        })?;
        c.send_error(OPT_GO, REP_ERR_UNSUP, "")?;
        ensure(expect_opt(c, OPT_EXPORT_NAME)? == b"b", || "name".into())?;
        c.send_export_name_reply(1024, FLAG_HAS_FLAGS, true)?;
        serve_after(c, false, "b", true, &mut disk(1024))
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    c.set_export_name("b").unwrap();
    c.opt_go().unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_size().unwrap(), 1024);
    assert_eq!(read16(&mut c, 1008), disk(1024)[1008..]);
    c.shutdown().unwrap();
    s.join().unwrap();
}

/// doc/proto.md (extension-ext-header branch), "NBD_OPT_EXPORT_NAME": not
/// once extended headers are on, so ERR_UNSUP to GO must not lead to
/// EXPORT_NAME; the automatic sequence gives up with NBD_OPT_ABORT.
#[test]
fn no_export_name_fallback_after_extended_headers() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        expect_opt(c, OPT_EXTENDED_HEADERS)?;
        c.send_ack(OPT_EXTENDED_HEADERS)?;
        expect_opt(c, OPT_GO)?;
        c.send_error(OPT_GO, REP_ERR_UNSUP, "")?;
        expect_opt(c, OPT_ABORT)?;
        drain(c).map(drop)
    });
    match connect(&s, Config::default()) {
        Err(Error::Closed(CloseReason::NegotiationFailed { option, error })) => {
            assert_eq!(option, OptionKind::Go);
            assert_eq!(error.reply, RepError::Unsup);
        }
        other => panic!("{other:?}"),
    }
    s.join().unwrap();
}

/// doc/proto.md, "Newstyle negotiation": plain (non-fixed) newstyle has no
/// option but NBD_OPT_EXPORT_NAME; with and without NO_ZEROES.
#[test]
fn plain_newstyle_export_name_with_and_without_zeroes() {
    for (server_flags, want_client, zeroes) in [(0u16, 0u32, true), (FLAG_NO_ZEROES, 2, false)] {
        let s = FakeServer::start(move |c| {
            c.send_newstyle(server_flags)?;
            let f = c.recv_client_flags()?;
            ensure(f == want_client, || format!("client flags {f:#x}"))?;
            let name = expect_opt(c, OPT_EXPORT_NAME)?;
            ensure(name == b"plain", || format!("{name:02x?}"))?;
            c.send_export_name_reply(2048, FLAG_HAS_FLAGS | FLAG_READ_ONLY, !zeroes)?;
            serve_after(c, false, "plain", true, &mut disk(2048))
        });
        let mut c = Client::connect(&s.uri_for("plain"), Config::default()).unwrap();
        assert_eq!(c.get_protocol(), Some("newstyle"));
        assert!(!c.get_structured_replies_negotiated());
        assert!(c.export_info().unwrap().is_read_only());
        assert_eq!(read16(&mut c, 0), disk(2048)[..16]);
        c.shutdown().unwrap();
        s.join().unwrap();
    }
}

/// An EOF right after EXPORT_NAME means the export was refused.
#[test]
fn export_name_refused_by_hang_up() {
    let s = FakeServer::start(|c| {
        c.send_newstyle(0)?;
        c.recv_client_flags()?;
        expect_opt(c, OPT_EXPORT_NAME)?;
        hang_up(c).map(drop)
    });
    match connect(&s, Config::default()) {
        Err(Error::Closed(CloseReason::ServerKilledConnection { during })) => {
            assert!(during.contains("NBD_OPT_EXPORT_NAME"), "{during}")
        }
        other => panic!("{other:?}"),
    }
    s.join().unwrap();
}

/// doc/proto.md, "Client flags" and "Newstyle negotiation": unknown
/// handshake flags are ignored and the client only ever sends bits 0 and 1.
#[test]
fn client_flags_only_known_bits() {
    let s = FakeServer::start(|c| {
        c.send_newstyle(0xffff)?;
        let f = c.recv_client_flags()?;
        ensure(f == 3, || format!("client flags {f:#x}"))?;
        expect_opt(c, OPT_ABORT)?;
        c.send_ack(OPT_ABORT)
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    assert_eq!(c.get_protocol(), Some("newstyle-fixed"));
    c.opt_abort().unwrap();
    s.join().unwrap();
}

// ------------------------------------------------- failures and hang-ups

/// Option mode: GO fails, then the server hangs up (as some older servers
/// do). opt_go reports the option error; the next call reports that the
/// server killed the connection.
#[test]
fn go_failed_then_server_hangs_up_opt_mode() {
    // Hang up at once, or only when the client's next option arrives.
    for wait_for_next in [false, true] {
        let s = FakeServer::start(move |c| {
            greet(c)?;
            expect_opt(c, OPT_GO)?;
            c.send_error(OPT_GO, REP_ERR_UNKNOWN, "no such export")?;
            if wait_for_next {
                expect_opt(c, OPT_LIST)?;
            }
            hang_up(c).map(drop)
        });
        let mut c = connect(&s, bare_opt_mode()).unwrap();
        c.set_export_name("missing").unwrap();
        match c.opt_go() {
            Err(Error::Option {
                option: OptionKind::Go,
                error,
            }) => {
                assert_eq!(error.reply, RepError::Unknown);
                assert_eq!(error.message, "no such export");
            }
            other => panic!("opt_go: {other:?}"),
        }
        let e = guarded("opt_list", move || c.opt_list().map(drop).unwrap_err());
        match &e {
            Error::Closed(CloseReason::ServerKilledConnection { .. }) => {}
            other => panic!("wait_for_next={wait_for_next}: next call: {other:?}"),
        }
        assert!(e.is_fatal());
        s.join().unwrap();
    }
}

/// Default mode: GO fails; the client sends NBD_OPT_ABORT and connect
/// reports which option failed, whether or not the server waits for it.
#[test]
fn go_failed_default_mode_aborts() {
    for server_waits in [true, false] {
        let s = FakeServer::start(move |c| {
            greet(c)?;
            prelude(c)?;
            expect_opt(c, OPT_GO)?;
            c.send_error(OPT_GO, REP_ERR_POLICY, "not for you")?;
            if server_waits {
                expect_opt(c, OPT_ABORT)?;
                let _ = c.send_ack(OPT_ABORT);
            }
            hang_up(c).map(drop)
        });
        match connect(&s, Config::default()) {
            Err(Error::Closed(CloseReason::NegotiationFailed { option, error })) => {
                assert_eq!(option, OptionKind::Go);
                assert_eq!(error.reply, RepError::Policy);
                assert_eq!(error.message, "not for you");
            }
            other => panic!("server_waits={server_waits}: {other:?}"),
        }
        s.join().unwrap();
    }
}

/// LIST answered ERR_UNSUP: an option error, and negotiation goes on.
#[test]
fn list_unsupported_keeps_negotiating() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        prelude(c)?;
        expect_opt(c, OPT_LIST)?;
        c.send_error(OPT_LIST, REP_ERR_UNSUP, "listing is off")?;
        let neg = c.negotiate(&GoConfig::new(8192, FLAG_HAS_FLAGS))?;
        ensure(neg.options == [OPT_GO], || format!("{:?}", neg.options))?;
        let mut n = neg.clone();
        n.structured_replies = true;
        c.set_negotiated(n);
        c.serve(&mut disk(8192))
    });
    let mut c = connect(&s, opt_mode()).unwrap();
    let e = c.opt_list().unwrap_err();
    match &e {
        Error::Option {
            option: OptionKind::List,
            error,
        } => {
            assert_eq!(error.reply, RepError::Unsup);
            assert_eq!(error.message, "listing is off");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.io_kind(), ErrorKind::Unsupported);
    assert_eq!(c.phase(), Phase::Negotiating);
    c.opt_go().unwrap();
    assert_eq!(c.get_size().unwrap(), 8192);
    assert_eq!(read16(&mut c, 4096), disk(8192)[4096..4112]);
    c.shutdown().unwrap();
    s.join().unwrap();
}

/// doc/proto.md, "Termination of the session during option haggling": on
/// NBD_REP_ERR_SHUTDOWN the client soft-disconnects with NBD_OPT_ABORT, in
/// option mode and in the automatic sequence.
#[test]
fn err_shutdown_sends_abort() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        expect_opt(c, OPT_LIST)?;
        c.send_error(OPT_LIST, REP_ERR_SHUTDOWN, "server going down")?;
        expect_opt(c, OPT_ABORT)?;
        // The client may already be gone: the ACK is optional for it (doc/proto.md, "NBD_OPT_ABORT").
        let _ = c.send_ack(OPT_ABORT);
        drain(c).map(drop)
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    let e = c.opt_list().unwrap_err();
    match &e {
        Error::Option {
            option: OptionKind::List,
            error,
        } => assert_eq!(error.reply, RepError::Shutdown),
        other => panic!("{other:?}"),
    }
    assert_eq!(e.io_kind(), ErrorKind::ConnectionAborted);
    s.join().unwrap();
    assert!(matches!(c.phase(), Phase::Closed | Phase::Dead));
    assert!(c.opt_go().is_err());

    // Automatic sequence: ERR_SHUTDOWN to STRUCTURED_REPLY.
    let s = FakeServer::start(|c| {
        greet(c)?;
        expect_opt(c, OPT_EXTENDED_HEADERS)?;
        c.send_error(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, "")?;
        expect_opt(c, OPT_STRUCTURED_REPLY)?;
        c.send_error(OPT_STRUCTURED_REPLY, REP_ERR_SHUTDOWN, "")?;
        expect_opt(c, OPT_ABORT)?;
        hang_up(c).map(drop)
    });
    match connect(&s, Config::default()) {
        Err(Error::Closed(CloseReason::NegotiationFailed { option, error })) => {
            assert_eq!(option, OptionKind::StructuredReply);
            assert_eq!(error.reply, RepError::Shutdown);
        }
        other => panic!("{other:?}"),
    }
    s.join().unwrap();
}

/// Every NBD_REP_ERR_* maps to its RepError, errno, io::ErrorKind and
/// name; an unknown error type is a generic failure (spec §2.8), and the
/// connection stays usable after each.
#[test]
fn every_rep_err_maps_to_rep_error_and_io_kind() {
    let table: [(u32, RepError, ErrorKind, Option<i32>, &str); 10] = [
        (
            REP_ERR_UNSUP,
            RepError::Unsup,
            ErrorKind::Unsupported,
            Some(95),
            "NBD_REP_ERR_UNSUP",
        ),
        (
            REP_ERR_POLICY,
            RepError::Policy,
            ErrorKind::PermissionDenied,
            None,
            "NBD_REP_ERR_POLICY",
        ),
        (
            REP_ERR_INVALID,
            RepError::Invalid,
            ErrorKind::InvalidInput,
            Some(22),
            "NBD_REP_ERR_INVALID",
        ),
        (
            REP_ERR_PLATFORM,
            RepError::Platform,
            ErrorKind::Unsupported,
            None,
            "NBD_REP_ERR_PLATFORM",
        ),
        (
            REP_ERR_TLS_REQD,
            RepError::TlsReqd,
            ErrorKind::Unsupported,
            Some(95),
            "NBD_REP_ERR_TLS_REQD",
        ),
        (
            REP_ERR_UNKNOWN,
            RepError::Unknown,
            ErrorKind::NotFound,
            Some(2),
            "NBD_REP_ERR_UNKNOWN",
        ),
        (
            REP_ERR_BLOCK_SIZE_REQD,
            RepError::BlockSizeReqd,
            ErrorKind::InvalidInput,
            Some(22),
            "NBD_REP_ERR_BLOCK_SIZE_REQD",
        ),
        (
            REP_ERR_TOO_BIG,
            RepError::TooBig,
            ErrorKind::InvalidInput,
            Some(22),
            "NBD_REP_ERR_TOO_BIG",
        ),
        (
            REP_ERR_EXT_HEADER_REQD,
            RepError::ExtHeaderReqd,
            ErrorKind::Unsupported,
            None,
            "NBD_REP_ERR_EXT_HEADER_REQD",
        ),
        (
            0x8000_0042,
            RepError::Other(0x8000_0042),
            ErrorKind::Other,
            None,
            "0x80000042",
        ),
    ];
    let types: Vec<u32> = table.iter().map(|t| t.0).collect();
    let s = FakeServer::start(move |c| {
        greet(c)?;
        for t in types {
            expect_opt(c, OPT_LIST)?;
            c.send_error(OPT_LIST, t, &format!("error {t:#x}"))?;
        }
        expect_opt(c, OPT_ABORT)?;
        c.send_ack(OPT_ABORT)
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    for (wire, rep, kind, errno, name) in table {
        assert_eq!(RepError::from_wire(wire), rep);
        let e = c.opt_list().unwrap_err();
        match &e {
            Error::Option {
                option: OptionKind::List,
                error,
            } => {
                assert_eq!(error.reply, rep, "{wire:#x}");
                assert_eq!(error.message, format!("error {wire:#x}"));
                assert_eq!(error.reply.errno(), errno, "{wire:#x}");
            }
            other => panic!("{wire:#x}: {other:?}"),
        }
        assert_eq!(e.io_kind(), kind, "{wire:#x}");
        assert_eq!(std::io::Error::from(e.clone_for_test()).kind(), kind);
        assert!(!e.is_fatal());
        let shown = e.to_string();
        assert!(
            shown.contains(name) && shown.contains("NBD_OPT_LIST"),
            "{shown}"
        );
        assert_eq!(c.phase(), Phase::Negotiating, "{wire:#x}");
    }
    c.opt_abort().unwrap();
    s.join().unwrap();
}

/// Test-only: rebuild an `Error::Option` (Error is not Clone).
trait CloneForTest {
    fn clone_for_test(&self) -> Error;
}

impl CloneForTest for Error {
    fn clone_for_test(&self) -> Error {
        match self {
            Error::Option { option, error } => Error::Option {
                option: *option,
                error: error.clone(),
            },
            other => panic!("not an option error: {other:?}"),
        }
    }
}

/// A hostile server message is kept as sent but escaped when shown: no
/// raw escape sequence or control character reaches a terminal.
#[test]
fn server_message_escaped_when_shown() {
    const EVIL: &str = "\x1b[31mred\x1b[0m\x07bell\nfake prompt$ \u{202e}rtl\\";
    let s = FakeServer::start(|c| {
        greet(c)?;
        expect_opt(c, OPT_LIST)?;
        c.send_error(OPT_LIST, REP_ERR_POLICY, EVIL)?;
        expect_opt(c, OPT_GO)?;
        c.send_error(OPT_GO, REP_ERR_POLICY, EVIL)?;
        expect_opt(c, OPT_ABORT)?;
        c.send_ack(OPT_ABORT)
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    let e = c.opt_list().unwrap_err();
    let Error::Option { error, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(error.message, EVIL, "the message is kept unescaped");
    for shown in [e.to_string(), error.to_string()] {
        assert!(
            !shown.chars().any(|ch| ch.is_control()),
            "control character shown: {shown:?}"
        );
        assert!(
            shown.contains("\\x1b[31mred\\x1b[0m\\x07bell\\x0afake prompt$ "),
            "{shown}"
        );
        assert!(shown.contains("\\u{202e}rtl\\\\"), "{shown}");
    }
    let e = c.opt_go().unwrap_err();
    assert!(!e.to_string().contains('\x1b'), "{e}");
    c.opt_abort().unwrap();
    s.join().unwrap();

    // Through the automatic sequence the message ends up in CloseReason.
    let s = FakeServer::start(|c| {
        greet(c)?;
        prelude(c)?;
        expect_opt(c, OPT_GO)?;
        c.send_error(OPT_GO, REP_ERR_UNKNOWN, EVIL)?;
        expect_opt(c, OPT_ABORT)?;
        hang_up(c).map(drop)
    });
    let e = connect(&s, Config::default()).unwrap_err();
    let shown = e.to_string();
    assert!(shown.contains("\\x1b[31mred"), "{shown}");
    assert!(!shown.chars().any(|ch| ch.is_control()), "{shown:?}");
    s.join().unwrap();
}

/// doc/proto.md, "Fixed newstyle negotiation": a state-changing option is
/// not sent twice; a second opt_structured_reply simply succeeds.
#[test]
fn structured_reply_sent_once() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        expect_opt(c, OPT_STRUCTURED_REPLY)?;
        c.send_ack(OPT_STRUCTURED_REPLY)?;
        // The next option on the wire must be the ABORT.
        expect_opt(c, OPT_ABORT)?;
        c.send_ack(OPT_ABORT)
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    assert!(c.opt_structured_reply().unwrap());
    assert!(c.opt_structured_reply().unwrap());
    assert!(c.get_structured_replies_negotiated());
    c.opt_abort().unwrap();
    s.join().unwrap();
}

/// doc/proto.md, "NBD_OPT_ABORT": a server that closes after NBD_OPT_ABORT
/// without the ACK.
#[test]
fn abort_without_ack_is_a_clean_end() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        expect_opt(c, OPT_ABORT)?;
        c.close()
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    c.opt_abort().unwrap();
    assert_eq!(c.phase(), Phase::Closed);
    assert_eq!(c.connection().close_reason(), Some(&CloseReason::Aborted));
    s.join().unwrap();
}

// ------------------------------------------------------------ oldstyle

#[test]
fn oldstyle_size_and_flags() {
    for cfg in [Config::default(), opt_mode()] {
        let s = FakeServer::start(|c| {
            c.send_oldstyle(3 << 20, FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH)?;
            let mut d = disk(3 << 20);
            c.set_negotiated(Negotiated::default());
            c.serve(&mut d)?;
            c.expect_eof()
        });
        let mut c = connect(&s, cfg).unwrap();
        assert_eq!(c.phase(), Phase::Ready);
        assert_eq!(c.get_protocol(), Some("oldstyle"));
        assert_eq!(c.get_size().unwrap(), 3 << 20);
        let info = c.export_info().unwrap();
        assert!(info.is_read_only() && info.can_flush());
        assert!(!info.can_trim() && !info.can_fua());
        assert!(!c.get_structured_replies_negotiated());
        assert_eq!(c.connection().client_flags(), 0, "the client sends nothing");
        assert_eq!(
            read16(&mut c, (2 << 20) + 5),
            disk(3 << 20)[(2 << 20) + 5..][..16]
        );
        c.shutdown().unwrap();
        s.join().unwrap();
    }
}

/// Oldstyle with handshake flags in the high half, or without HAS_FLAGS.
#[test]
fn oldstyle_bad_flags_are_protocol_errors() {
    for (flags, what) in [(0x0001_0001u32, "handshake flags"), (0, "HAS_FLAGS")] {
        let s = FakeServer::start(move |c| {
            let mut g = Vec::new();
            g.extend_from_slice(&NBDMAGIC.to_be_bytes());
            g.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
            g.extend_from_slice(&4096u64.to_be_bytes());
            g.extend_from_slice(&flags.to_be_bytes());
            g.extend_from_slice(&[0; 124]);
            c.send(&g)?;
            drain(c).map(drop)
        });
        let e = assert_protocol_error(connect(&s, Config::default()), what);
        match (flags, &e) {
            (0, ProtocolError::BadTransmissionFlags(0)) => {}
            (_, ProtocolError::OldstyleHandshakeFlags(1)) if flags != 0 => {}
            _ => panic!("{what}: {e:?}"),
        }
        s.join().unwrap();
    }
}

// ------------------------------------------------------------ bad magic

#[test]
fn bad_magic_is_protocol_error_naming_it() {
    let cases: [(&[u8], &str); 3] = [
        (b"NBDMAGIXIHAVEOPT\x00\x03", "0x4e42444d41474958"),
        (b"NBDMAGICIHAVEOPX\x00\x03", "0x49484156454f5058"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "0x485454502f312e31"),
    ];
    for (bytes, hex) in cases {
        let s = FakeServer::start(move |c| {
            c.send(bytes)?;
            // The client sends nothing to a server it does not recognise.
            let rest = drain(c)?;
            ensure(rest.is_empty(), || format!("client sent {rest:02x?}"))
        });
        let r = connect(&s, Config::default());
        let msg = r.as_ref().map(drop).unwrap_err().to_string();
        let e = assert_protocol_error(r, hex);
        assert!(
            msg.contains(hex),
            "message {msg:?} should name the magic {hex}"
        );
        assert!(matches!(e, ProtocolError::Wire(_)), "{e:?}");
        s.join().unwrap();
    }
}

// ------------------------------------------- truncation at every byte offset

/// Sends at most `left` more bytes in total.
struct Budget {
    left: usize,
}

impl Budget {
    /// Sends what the budget allows of `b`; false if it was cut short.
    fn send(&mut self, c: &mut FakeConn, b: &[u8]) -> io::Result<bool> {
        let n = b.len().min(self.left);
        if n > 0 {
            c.send(&b[..n])?;
        }
        self.left -= n;
        Ok(n == b.len())
    }
}

/// A full, well-behaved negotiation whose server output stops after
/// `budget` bytes: greeting, EXTENDED_HEADERS refused with a message,
/// STRUCTURED_REPLY, LIST (two exports), INFO/GO with INFO_EXPORT,
/// INFO_BLOCK_SIZE and (when asked for) INFO_NAME.
fn truncating_server(budget: usize) -> FakeServer {
    FakeServer::start(move |c| {
        let mut b = Budget { left: budget };
        let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        if !b.send(c, &greeting)? {
            return hang_up(c).map(drop);
        }
        c.recv_client_flags()?;
        loop {
            let (opt, data) = c.recv_option()?;
            let reply = match opt {
                OPT_EXTENDED_HEADERS => opt_reply(opt, REP_ERR_UNSUP, b"nope"),
                OPT_STRUCTURED_REPLY => opt_reply(opt, REP_ACK, &[]),
                OPT_LIST => {
                    let mut v = Vec::new();
                    for (name, desc) in [("a", "first"), ("bb", "")] {
                        let mut p = (name.len() as u32).to_be_bytes().to_vec();
                        p.extend_from_slice(name.as_bytes());
                        p.extend_from_slice(desc.as_bytes());
                        v.extend(opt_reply(opt, REP_SERVER, &p));
                    }
                    v.extend(opt_reply(opt, REP_ACK, &[]));
                    v
                }
                OPT_INFO | OPT_GO => {
                    let (name, infos) = parse_info_request(&data).expect("GO data");
                    let mut v = opt_reply(opt, REP_INFO, &info_export_payload(65536, 1));
                    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for x in [512u32, 4096, 1 << 20] {
                        bs.extend_from_slice(&x.to_be_bytes());
                    }
                    v.extend(opt_reply(opt, REP_INFO, &bs));
                    if infos.contains(&INFO_NAME) {
                        v.extend(opt_reply(
                            opt,
                            REP_INFO,
                            &info_payload(INFO_NAME, name.as_bytes()),
                        ));
                    }
                    v.extend(opt_reply(opt, REP_ACK, &[]));
                    v
                }
                OPT_ABORT => return drain(c).map(drop),
                _ => opt_reply(opt, REP_ERR_UNSUP, &[]),
            };
            if !b.send(c, &reply)? {
                return hang_up(c).map(drop);
            }
            if opt == OPT_GO {
                c.set_negotiated(Negotiated {
                    structured_replies: true,
                    ..Negotiated::default()
                });
                return c.serve(&mut [0u8; 65536]);
            }
        }
    })
}

/// Bytes the truncating server sends in default mode: greeting 18,
/// EXTENDED_HEADERS error 24, STRUCTURED_REPLY ACK 20, GO: INFO_EXPORT 32,
/// INFO_BLOCK_SIZE 34, ACK 20 (the NAME is only sent when asked for).
const DEFAULT_MODE_TOTAL: usize = 18 + 24 + 20 + 32 + 34 + 20;

fn assert_killed_or_protocol(e: &Error, what: &str) {
    assert!(
        matches!(
            e,
            Error::Closed(CloseReason::ServerKilledConnection { .. } | CloseReason::Protocol(_))
        ),
        "{what}: {e:?}"
    );
}

#[test]
fn truncated_at_every_offset_default_mode() {
    let t = Instant::now();
    for n in 0..=DEFAULT_MODE_TOTAL {
        let s = truncating_server(n);
        let path = s.socket().to_path_buf();
        let r = guarded(&format!("{n} bytes"), move || {
            let mut c = Client::connect_unix(path, Config::default())?;
            let size = c.get_size()?;
            c.shutdown()?;
            Ok::<_, Error>(size)
        });
        match r {
            Ok(size) => {
                assert_eq!(n, DEFAULT_MODE_TOTAL, "connected with only {n} bytes");
                assert_eq!(size, 65536);
            }
            Err(e) => {
                assert!(n < DEFAULT_MODE_TOTAL, "full negotiation failed: {e:?}");
                assert_killed_or_protocol(&e, &format!("cut after {n} bytes"));
            }
        }
        s.join()
            .unwrap_or_else(|e| panic!("server, cut after {n} bytes: {e}"));
    }
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

/// The same in option mode, through LIST, INFO and GO with full info.
#[test]
fn truncated_at_every_offset_opt_mode() {
    // Greeting, EXTENDED_HEADERS error, STRUCTURED_REPLY ACK, LIST (two
    // SERVER replies and ACK), then INFO and GO (EXPORT, BLOCK_SIZE, NAME, ACK).
    let total = 18 + 24 + 20 + (30 + 26 + 20) + 2 * (32 + 34 + 24 + 20);
    for n in 0..=total {
        let s = truncating_server(n);
        let path = s.socket().to_path_buf();
        let r = guarded(&format!("{n} bytes"), move || {
            let mut cfg = opt_mode();
            cfg.full_info = true;
            let mut c = Client::connect_unix(path, cfg)?;
            let list = c.opt_list()?;
            assert_eq!(
                list,
                [("a".into(), "first".into()), ("bb".into(), String::new())]
            );
            c.set_export_name("bb")?;
            c.opt_info()?;
            assert_eq!(c.get_canonical_export_name()?.as_deref(), Some("bb"));
            c.opt_go()?;
            let size = c.get_size()?;
            c.shutdown()?;
            Ok::<_, Error>(size)
        });
        match r {
            Ok(size) => {
                assert_eq!(n, total, "finished with only {n} bytes");
                assert_eq!(size, 65536);
            }
            Err(e) => {
                assert!(n < total, "full negotiation failed: {e:?}");
                assert_killed_or_protocol(&e, &format!("cut after {n} bytes"));
            }
        }
        s.join()
            .unwrap_or_else(|e| panic!("server, cut after {n} bytes: {e}"));
    }
}

// ------------------------------------------------------- absurd lengths

/// An option reply announcing 0xFFFFFFF0 bytes is refused from its header
/// alone: the client neither waits for 4 GiB nor allocates it.
#[test]
fn option_reply_length_0xfffffff0_is_protocol_error() {
    let cases: [(u32, u32, &[u8]); 6] = [
        (OPT_GO, REP_ACK, &[]),
        (OPT_GO, REP_ERR_UNKNOWN, &[]),
        (OPT_GO, REP_INFO, &[0, 0]), // INFO_EXPORT claiming 4 GiB
        (OPT_GO, REP_SERVER, &[]),
        (OPT_LIST, REP_SERVER, &[]),
        (OPT_LIST, REP_META_CONTEXT, &[]),
    ];
    for (opt, typ, after) in cases {
        let s = FakeServer::start(move |c| {
            greet(c)?;
            expect_opt(c, opt)?;
            let mut v = opt_reply_header(opt, typ, 0xFFFF_FFF0);
            v.extend_from_slice(after);
            c.send(&v)?;
            // The client must hang up now; anything it sends is drained.
            drain(c).map(drop)
        });
        let path = s.socket().to_path_buf();
        let t = Instant::now();
        let r = guarded(&format!("{opt} {typ:#x}"), move || {
            let mut c = Client::connect_unix(path, bare_opt_mode())?;
            if opt == OPT_LIST {
                c.opt_list().map(drop)
            } else {
                c.opt_go()
            }
        });
        match r {
            Err(Error::Closed(CloseReason::Protocol(e))) => {
                let m = e.to_string();
                assert!(
                    m.contains(&0xFFFF_FFF0u32.to_string()) || m.contains("0x"),
                    "{m}"
                );
            }
            other => panic!("option {opt} reply {typ:#x}: {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        s.join().unwrap();
    }
}

/// Inner length fields larger than the reply that holds them.
#[test]
fn inner_name_length_larger_than_reply_is_protocol_error() {
    let mut big = 100u32.to_be_bytes().to_vec();
    big.extend_from_slice(b"abc");
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(b"name");
    let cases: Vec<(u32, u32, Vec<u8>)> = vec![
        (OPT_LIST, REP_SERVER, big),
        (OPT_LIST, REP_SERVER, huge),
        (OPT_LIST, REP_SERVER, vec![0, 0]), // not even the length field
        (OPT_GO, REP_INFO, info_payload(INFO_EXPORT, &[0; 6])), // INFO_EXPORT of 8 bytes
        (OPT_GO, REP_INFO, info_payload(INFO_BLOCK_SIZE, &[0; 4])),
        (OPT_GO, REP_INFO, vec![0]), // shorter than the info type
    ];
    for (opt, typ, payload) in cases {
        let desc = format!("{opt}/{typ:#x}/{payload:02x?}");
        let s = FakeServer::start(move |c| {
            greet(c)?;
            expect_opt(c, opt)?;
            c.send_option_reply(opt, typ, &payload)?;
            drain(c).map(drop)
        });
        let path = s.socket().to_path_buf();
        let r = guarded(&desc, move || {
            let mut c = Client::connect_unix(path, bare_opt_mode())?;
            if opt == OPT_LIST {
                c.opt_list().map(drop)
            } else {
                c.opt_go()
            }
        });
        match r {
            Err(Error::Closed(CloseReason::Protocol(ProtocolError::Wire(_)))) => {}
            other => panic!("{desc}: {other:?}"),
        }
        s.join().unwrap();
    }
}

// ------------------------------------------------------------ INFO replies

/// doc/proto.md, "NBD_OPT_INFO and NBD_OPT_GO" and "NBD_REP_INFO": unknown
/// info types are skipped, short or long, and the order of the INFO replies
/// does not matter.
#[test]
fn unknown_info_types_ignored_in_any_order() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        prelude(c)?;
        expect_opt(c, OPT_GO)?;
        c.send_option_reply(OPT_GO, REP_INFO, &info_payload(0x7777, b"hello"))?;
        c.send_option_reply(OPT_GO, REP_INFO, &info_payload(0xffff, &[]))?;
        // Longer than any known info: skipped without being buffered.
        c.send_option_reply(
            OPT_GO,
            REP_INFO,
            &info_payload(0x1234, &vec![0xee; 100_000]),
        )?;
        c.send_info_block_size(OPT_GO, 512, 4096, 1 << 20)?;
        c.send_option_reply(OPT_GO, REP_INFO, &info_payload(0x0042, &[1; 14]))?;
        c.send_info_export(OPT_GO, 1 << 16, FLAG_HAS_FLAGS | FLAG_SEND_TRIM)?;
        c.send_ack(OPT_GO)?;
        serve_after(c, true, "", false, &mut disk(1 << 16))
    });
    let mut c = connect(&s, Config::default()).unwrap();
    assert_eq!(c.get_size().unwrap(), 1 << 16);
    assert!(c.export_info().unwrap().can_trim());
    let bs = c.get_block_size().unwrap().unwrap();
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (512, 4096, 1 << 20));
    let mut b = vec![0u8; 512];
    c.pread(&mut b, 512, CmdFlags::empty()).unwrap();
    assert_eq!(b, disk(1 << 16)[512..1024]);
    c.shutdown().unwrap();
    s.join().unwrap();
}

/// GO (or INFO) acknowledged without NBD_INFO_EXPORT breaks a MUST.
#[test]
fn go_acked_without_info_export_is_protocol_error() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        prelude(c)?;
        expect_opt(c, OPT_GO)?;
        c.send_info_block_size(OPT_GO, 1, 4096, 1 << 20)?;
        c.send_ack(OPT_GO)?;
        drain(c).map(drop)
    });
    let e = assert_protocol_error(connect(&s, Config::default()), "GO");
    assert_eq!(e, ProtocolError::MissingExportInfo(OptionKind::Go));
    assert!(e.to_string().contains("NBD_INFO_EXPORT"), "{e}");
    s.join().unwrap();

    let s = FakeServer::start(|c| {
        greet(c)?;
        expect_opt(c, OPT_INFO)?;
        c.send_ack(OPT_INFO)?;
        drain(c).map(drop)
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    match c.opt_info() {
        Err(Error::Closed(CloseReason::Protocol(ProtocolError::MissingExportInfo(
            OptionKind::Info,
        )))) => {}
        other => panic!("{other:?}"),
    }
    drop(c);
    s.join().unwrap();
}

/// A reply for another option, or a non-error reply type the client does
/// not know, is a protocol violation (spec §2.8).
#[test]
fn wrong_option_echo_and_unknown_reply_type_are_protocol_errors() {
    for (echo, typ) in [(OPT_INFO, REP_ACK), (OPT_GO, 0x0000_0042)] {
        let s = FakeServer::start(move |c| {
            greet(c)?;
            prelude(c)?;
            expect_opt(c, OPT_GO)?;
            c.send_option_reply(echo, typ, &[])?;
            drain(c).map(drop)
        });
        let e = assert_protocol_error(connect(&s, Config::default()), "echo");
        match e {
            ProtocolError::WrongOptionEcho { sent: 7, got: 6 } if echo == OPT_INFO => {}
            ProtocolError::UnexpectedOptionReply {
                option: OptionKind::Go,
                reply_type: 0x42,
            } => {}
            other => panic!("{other:?}"),
        }
        s.join().unwrap();
    }
}

/// A failed INFO leaves the client negotiating, and the same name can then
/// be tried with GO (OPT-01..08 style sequence against the fake).
#[test]
fn info_failure_then_list_then_go() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        let data = expect_opt(c, OPT_INFO)?;
        ensure(parse_info_request(&data).unwrap().0 == "x", || {
            "name".into()
        })?;
        c.send_error(OPT_INFO, REP_ERR_TLS_REQD, "TLS first")?;
        let mut cfg = GoConfig::new(512, FLAG_HAS_FLAGS);
        cfg.structured_replies = false;
        cfg.exports = vec![("x".into(), "the x".into())];
        let neg = c.negotiate(&cfg)?;
        ensure(neg.options == [OPT_LIST, OPT_GO], || {
            format!("{:?}", neg.options)
        })?;
        c.serve(&mut disk(512))
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    c.set_export_name("x").unwrap();
    assert!(matches!(
        c.opt_info(),
        Err(Error::Option {
            option: OptionKind::Info,
            ..
        })
    ));
    assert_eq!(c.phase(), Phase::Negotiating);
    assert_eq!(c.opt_list().unwrap(), [("x".into(), "the x".into())]);
    c.opt_go().unwrap();
    assert_eq!(c.get_size().unwrap(), 512);
    c.shutdown().unwrap();
    s.join().unwrap();
}

/// Option-mode calls in the wrong phase are usage errors and send nothing
/// (the connection is alive; once it has ended they are `Error::Closed`, see
/// `calls_after_the_end_report_the_close_reason`).
#[test]
fn usage_errors_send_nothing() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        let neg = c.negotiate(&GoConfig::new(4096, FLAG_HAS_FLAGS))?;
        ensure(neg.options == [OPT_GO], || format!("{:?}", neg.options))?;
        c.serve(&mut disk(4096))
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    assert!(matches!(
        c.set_export_name(&"x".repeat(5000)),
        Err(Error::Usage(UsageError::BadString { .. }))
    ));
    assert!(matches!(
        c.opt_set_meta_context(&["nocolon"]),
        Err(Error::Usage(UsageError::BadQuery(_)))
    ));
    c.opt_go().unwrap();
    assert!(matches!(
        c.opt_list(),
        Err(Error::Usage(UsageError::WrongPhase { .. }))
    ));
    c.shutdown().unwrap();
    s.join().unwrap();
}

/// How a connection ends in [`calls_after_the_end_report_the_close_reason`].
#[derive(Debug, Clone, Copy)]
enum End {
    /// Option mode, `opt_abort`: clean, `Aborted`.
    OptAbort,
    /// Transmission, `shutdown`: clean, `Disconnected`.
    Shutdown,
    /// Option mode: the server hangs up instead of answering NBD_OPT_LIST.
    DiesNegotiating,
    /// Transmission: the server hangs up with a read in flight.
    DiesReady,
}

/// Once the connection has ended, cleanly or not, an option-mode call and
/// a command are refused alike: `Error::Closed` with the connection's close
/// reason, whatever the call and whatever its arguments. While it is alive,
/// the same calls in the wrong phase are `WrongPhase` usage errors.
#[test]
fn calls_after_the_end_report_the_close_reason() {
    for end in [
        End::OptAbort,
        End::Shutdown,
        End::DiesNegotiating,
        End::DiesReady,
    ] {
        let s = FakeServer::start(move |c| match end {
            End::OptAbort => {
                greet(c)?;
                expect_opt(c, OPT_ABORT)?;
                c.send_ack(OPT_ABORT)
            }
            End::Shutdown => {
                greet(c)?;
                c.negotiate(&GoConfig::new(4096, FLAG_HAS_FLAGS))?;
                c.serve(&mut disk(4096))?;
                c.expect_eof()
            }
            End::DiesNegotiating => {
                greet(c)?;
                expect_opt(c, OPT_LIST)?;
                hang_up(c).map(drop)
            }
            End::DiesReady => {
                greet(c)?;
                c.negotiate(&GoConfig::new(4096, FLAG_HAS_FLAGS))?;
                let req = c.recv_request()?;
                ensure(req.typ == CMD_READ, || format!("{req:?}"))?;
                hang_up(c).map(drop)
            }
        });
        let mut c = connect(&s, bare_opt_mode()).unwrap();
        // Alive: a command in option mode is a phase error.
        let e = c.pread(&mut [0u8; 512], 0, CmdFlags::empty()).unwrap_err();
        assert!(
            matches!(e, Error::Usage(UsageError::WrongPhase { .. })),
            "{end:?}: pread while negotiating: {e:?}"
        );
        match end {
            End::OptAbort => c.opt_abort().unwrap(),
            End::Shutdown => {
                c.opt_go().unwrap();
                // Alive: an option after GO is a phase error.
                let e = c.opt_list().unwrap_err();
                assert!(
                    matches!(e, Error::Usage(UsageError::WrongPhase { .. })),
                    "{end:?}: opt_list after GO: {e:?}"
                );
                c.shutdown().unwrap();
            }
            End::DiesNegotiating => {
                let (back, r) = guarded("opt_list", move || {
                    let r = c.opt_list();
                    (c, r)
                });
                c = back;
                // The call that saw the end already reports it.
                assert!(matches!(r, Err(Error::Closed(_))), "{end:?}: {r:?}");
            }
            End::DiesReady => {
                c.opt_go().unwrap();
                let (back, r) = guarded("pread", move || {
                    let r = c.pread(&mut [0u8; 512], 0, CmdFlags::empty());
                    (c, r)
                });
                c = back;
                assert!(r.is_err(), "{end:?}: the read in flight must fail");
            }
        }
        let reason = c
            .connection()
            .close_reason()
            .cloned()
            .expect("the connection has ended");
        match end {
            End::OptAbort => {
                assert_eq!(reason, CloseReason::Aborted);
                assert_eq!(c.phase(), Phase::Closed);
            }
            End::Shutdown => {
                assert_eq!(reason, CloseReason::Disconnected);
                assert_eq!(c.phase(), Phase::Closed);
            }
            End::DiesNegotiating => {
                assert!(
                    matches!(reason, CloseReason::ServerKilledConnection { .. }),
                    "{end:?}: {reason:?}"
                );
                assert_eq!(c.phase(), Phase::Dead);
            }
            End::DiesReady => {
                assert!(
                    matches!(reason, CloseReason::ServerClosed { lost: 1, .. }),
                    "{end:?}: {reason:?}"
                );
                assert_eq!(c.phase(), Phase::Dead);
            }
        }
        // Every call that needs the connection: the same error, at once.
        let calls: Vec<(&str, Result<(), Error>)> = vec![
            ("opt_list", c.opt_list().map(drop)),
            ("opt_info", c.opt_info()),
            ("opt_go", c.opt_go()),
            ("opt_abort", c.opt_abort()),
            (
                "opt_set_meta_context",
                c.opt_set_meta_context(&["nocolon"]).map(drop),
            ),
            ("set_export_name", c.set_export_name("x")),
            ("pread", c.pread(&mut [0u8; 512], 0, CmdFlags::empty())),
            ("pwrite", c.pwrite(&[1; 512], 0, CmdFlags::empty())),
            ("aio_flush", c.aio_flush(CmdFlags::empty()).map(drop)),
            (
                "block_status",
                c.block_status(0, 512, CmdFlags::empty()).map(drop),
            ),
        ];
        for (call, r) in calls {
            match r {
                Err(Error::Closed(r)) => assert_eq!(r, reason, "{end:?}: {call}"),
                other => panic!("{end:?}: {call}: want Error::Closed({reason:?}), got {other:?}"),
            }
        }
        assert_eq!(c.aio_in_flight(), 0);
        // Ending an ended connection again: Ok after an end that lost
        // nothing, the reason after any other.
        match (!reason.is_loss(), c.shutdown()) {
            (true, Ok(())) => {}
            (false, Err(Error::Closed(r))) => assert_eq!(r, reason, "{end:?}: shutdown"),
            (_, other) => panic!("{end:?}: shutdown: {other:?}"),
        }
        drop(c);
        s.join().unwrap();
    }
}

/// doc/proto.md, "NBD_OPT_SET_META_CONTEXT" and "NBD_OPT_LIST_META_CONTEXT":
/// meta contexts need structured replies first. The client either refuses
/// SET_META_CONTEXT locally, or (libnbd lets option mode send it, to test
/// servers) gets the server's ERR_INVALID; either way it stays negotiating
/// and no context is selected.
#[test]
fn set_meta_context_before_structured_replies_selects_nothing() {
    let s = FakeServer::start(|c| {
        greet(c)?;
        let (opt, _) = c.recv_option()?;
        if opt == OPT_SET_META_CONTEXT {
            c.send_error(opt, REP_ERR_INVALID, "structured replies first")?;
            expect_opt(c, OPT_ABORT)?;
        } else {
            ensure(opt == OPT_ABORT, || format!("option {opt}"))?;
        }
        c.send_ack(OPT_ABORT)
    });
    let mut c = connect(&s, bare_opt_mode()).unwrap();
    assert!(!c.get_structured_replies_negotiated());
    match c.opt_set_meta_context(&["base:allocation"]) {
        Err(Error::Usage(_)) => {}
        Err(Error::Option {
            option: OptionKind::SetMetaContext,
            error,
        }) => assert_eq!(error.reply, RepError::Invalid),
        other => panic!("SET_META_CONTEXT before structured replies: {other:?}"),
    }
    assert_eq!(c.phase(), Phase::Negotiating);
    assert!(!c.can_meta_context("base:allocation"));
    c.opt_abort().unwrap();
    s.join().unwrap();
}
