//! Option negotiation against real servers (issue 2, "Real servers in the
//! tests"): qemu-nbd, nbdkit (memory, eval, oldstyle, plain newstyle,
//! `--no-sr`, TCP) and nbd-server, through the blocking client of nbd-std.
//! libnbd's `nbdinfo --json` is the oracle for sizes and flags. Two tests
//! drive the same core through nbd-mio instead.
//!
//! Every test starts its own server on a Unix socket in a private directory
//! (or on a loopback port) and the launcher stops it by PID on drop. The
//! client is always declared after the server so it is dropped (and hangs
//! up) first.

use nbd_std::CmdFlags;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nbd_mio::{Event as MioEvent, NbdConnection};

use nbd_std::nbd_core::{CloseReason, OptionKind, RepError, UsageError};
use nbd_std::{Client, Config, Error, Phase};
use nbd_tests::{
    make_file, nbd_server, nbdinfo, nbdkit, nbdkit_tcp, nbdkit_with, qemu_nbd, scratch_dir,
};

// ------------------------------------------------------------------ helpers

fn opt_mode() -> Config {
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    cfg
}

/// Byte `i` of the test images.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8 ^ 0x5a
}

/// The raw text of `"key": VALUE` in nbdinfo's JSON (one value per line).
fn json_value<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\": ");
    let start = json
        .find(&pat)
        .unwrap_or_else(|| panic!("{key} not in nbdinfo output:\n{json}"))
        + pat.len();
    let rest = &json[start..];
    let end = rest.find([',', '\n']).unwrap_or(rest.len());
    rest[..end].trim()
}

/// Checks size, every can_*/is_* flag, block sizes and the structured-reply
/// verdict of `c` against what libnbd sees on the same export.
fn assert_matches_nbdinfo(c: &Client, uri: &str) {
    let json = nbdinfo(&["--json", uri]);
    assert_eq!(
        json_value(&json, "export-size"),
        c.get_size().unwrap().to_string(),
        "size differs from nbdinfo:\n{json}"
    );
    assert_flags_match(c, &json);
}

/// Like [`assert_matches_nbdinfo`] but without the size: nbdinfo 1.14 takes
/// the size from NBD_OPT_INFO, which nbd-server 3.24 answers with 0.
fn assert_flags_match(c: &Client, json: &str) {
    for (name, ours) in c.flags_report().unwrap() {
        // nbdinfo 1.14 reports neither of these two as a flag.
        if matches!(name, "can_block_status_payload" | "can_meta_context") {
            continue;
        }
        assert_eq!(
            json_value(json, name),
            ours.to_string(),
            "{name} differs from nbdinfo:\n{json}"
        );
    }
    match c.get_block_size().unwrap() {
        Some(bs) => {
            assert_eq!(
                json_value(json, "block_size_minimum"),
                bs.minimum.to_string()
            );
            assert_eq!(
                json_value(json, "block_size_preferred"),
                bs.preferred.to_string()
            );
            assert_eq!(
                json_value(json, "block_size_maximum"),
                bs.maximum.to_string()
            );
        }
        None => assert!(!json.contains("block_size_minimum"), "{json}"),
    }
    // libnbd 1.14 never negotiates extended headers; where we have them,
    // libnbd has structured replies instead.
    let structured = c.get_structured_replies_negotiated() || c.get_extended_headers_negotiated();
    assert_eq!(json_value(json, "structured"), structured.to_string());
}

fn read_back(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    c.pread(&mut buf, offset, CmdFlags::empty()).expect("pread");
    buf
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The nbdkit `eval` plugin scripted like libnbd's list-exports example:
/// exports `foo` and `foobar`, size = name length + 1 (`echo NAME | wc -c`);
/// any other name fails to open, which nbdkit reports as ERR_UNKNOWN.
fn foo_foobar_server() -> nbd_tests::Server {
    nbdkit(&[
        "eval",
        "list_exports=echo NAMES; echo foo; echo foobar",
        "open=case \"$3\" in foo|foobar) echo \"$3\" ;; \
         *) echo \"ENOENT no export named $3\" >&2; exit 1 ;; esac",
        "get_size=echo \"$2\" | wc -c",
        "pread=head -c \"$3\" /dev/zero",
    ])
}

/// A 2048-byte image served by `qemu-nbd -x hello -D "test export"`.
fn qemu_hello(dir: &Path) -> nbd_tests::Server {
    let img = make_file(dir, "disk.img", 2048, pattern);
    qemu_nbd(&["-x", "hello", "-D", "test export"], &img)
}

// ------------------------------------------------------------------ qemu-nbd

/// The nbd_opt_go(3) flow against qemu-nbd: list, info (with full info),
/// go, read; extended headers are negotiated before the pause (libnbd's
/// order; doc/proto.md, "NBD_OPT_INFO and NBD_OPT_GO").
#[test]
fn qemu_nbd_opt_mode_list_info_go() {
    let data = scratch_dir();
    let s = qemu_hello(data.path());
    let mut cfg = opt_mode();
    cfg.full_info = true;
    let mut c = Client::connect_unix(s.socket(), cfg).unwrap();
    assert_eq!(c.phase(), Phase::Negotiating);
    assert_eq!(c.get_protocol(), Some("newstyle-fixed"));
    assert!(
        c.get_extended_headers_negotiated(),
        "qemu 10 ACKs EXTENDED_HEADERS"
    );
    assert!(c.get_structured_replies_negotiated());

    assert_eq!(
        c.opt_list().unwrap(),
        [("hello".to_string(), "test export".to_string())]
    );
    assert_eq!(c.phase(), Phase::Negotiating);

    // Before INFO there is nothing to report.
    assert!(matches!(c.get_size(), Err(Error::Usage(_))));
    c.set_export_name("hello").unwrap();
    c.opt_info().unwrap();
    assert_eq!(c.phase(), Phase::Negotiating);
    assert_eq!(c.get_size().unwrap(), 2048);
    assert_eq!(
        c.get_export_description().unwrap().as_deref(),
        Some("test export")
    );
    let bs = c
        .get_block_size()
        .unwrap()
        .expect("qemu advertises block sizes");
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (1, 4096, 32 << 20));

    c.opt_go().unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_size().unwrap(), 2048);
    assert_eq!(c.export_info().unwrap().name, "hello");
    assert!(c.get_extended_headers_negotiated());
    // Transmission works with extended headers.
    let got = read_back(&mut c, 100, 1000);
    assert!(got.iter().zip(100..).all(|(&b, i)| b == pattern(i)));
    assert_matches_nbdinfo(&c, &s.uri());
    c.shutdown().unwrap();
    assert_eq!(c.phase(), Phase::Closed);
}

/// doc/proto.md, "Size constraints": the client announces that it honours
/// size constraints by asking for NBD_INFO_BLOCK_SIZE in GO. Default mode
/// (no option mode): EXTENDED_HEADERS, then GO with NBD_INFO_BLOCK_SIZE;
/// the result agrees with libnbd.
#[test]
fn qemu_default_connect_requests_block_size_in_go() {
    let data = scratch_dir();
    let s = qemu_hello(data.path());
    let mut c = Client::connect(&s.uri(), Config::default()).unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_protocol(), Some("newstyle-fixed"));
    assert!(c.get_extended_headers_negotiated());
    assert!(c.get_structured_replies_negotiated());
    assert_eq!(c.get_size().unwrap(), 2048);
    assert!(c.get_block_size().unwrap().is_some());
    assert_matches_nbdinfo(&c, &s.uri());
    assert_eq!(read_back(&mut c, 2047, 1), [pattern(2047)]);
    c.shutdown().unwrap();
}

/// doc/proto.md (extension-ext-header branch), "NBD_OPT_EXTENDED_HEADERS":
/// after its ACK every request uses the extended header. Extended headers
/// negotiated by hand, then STRUCTURED_REPLY: already in force (qemu would
/// answer ERR_EXT_HEADER_REQD), so it is true and nothing breaks; the
/// transmission uses extended headers.
#[test]
fn qemu_structured_reply_after_extended_headers_keeps_extended_headers() {
    let data = scratch_dir();
    let s = qemu_hello(data.path());
    let mut cfg = opt_mode();
    cfg.request_structured_replies = false;
    let mut c = Client::connect(&s.uri(), cfg).unwrap();
    assert!(!c.get_structured_replies_negotiated());
    assert!(!c.get_extended_headers_negotiated());
    assert!(c.opt_extended_headers().unwrap());
    assert!(c.get_extended_headers_negotiated());
    assert!(c.opt_structured_reply().unwrap());
    assert!(c.get_extended_headers_negotiated(), "no downgrade");
    // A repeat is a no-op that stays true (doc/proto.md, "Fixed newstyle negotiation").
    assert!(c.opt_extended_headers().unwrap());
    assert_eq!(c.phase(), Phase::Negotiating);
    c.opt_go().unwrap();
    assert!(c.get_extended_headers_negotiated());
    assert_eq!(
        read_back(&mut c, 0, 16),
        (0..16).map(pattern).collect::<Vec<_>>()
    );
    c.shutdown().unwrap();
}

/// Structured replies first, then EXTENDED_HEADERS (allowed in either
/// order, spec §2.6): qemu accepts it and the client uses extended headers.
#[test]
fn qemu_structured_reply_then_extended_headers() {
    let data = scratch_dir();
    let s = qemu_hello(data.path());
    let mut cfg = opt_mode();
    cfg.request_extended_headers = false;
    let mut c = Client::connect(&s.uri(), cfg).unwrap();
    assert!(c.get_structured_replies_negotiated());
    assert!(!c.get_extended_headers_negotiated());
    assert!(c.opt_structured_reply().unwrap(), "second SR is a no-op");
    assert!(c.opt_extended_headers().unwrap());
    assert!(c.get_extended_headers_negotiated());
    c.opt_go().unwrap();
    assert_eq!(
        read_back(&mut c, 1024, 4),
        (1024..1028).map(pattern).collect::<Vec<_>>()
    );
    c.shutdown().unwrap();
}

/// doc/proto.md, "NBD_OPT_LIST_META_CONTEXT" and "NBD_OPT_SET_META_CONTEXT":
/// context ids of a listing are ignored, those of SET are used. Against
/// qemu-nbd with allocation depth and a dirty bitmap (`-A -B bm0`).
#[test]
fn qemu_list_and_set_meta_contexts() {
    let data = scratch_dir();
    let img = data.path().join("top.qcow2");
    let img_s = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "1M"]);
    run("qemu-img", &["bitmap", "--add", img_s, "bm0"]);
    let s = qemu_nbd(&["-f", "qcow2", "-x", "top", "-A", "-B", "bm0"], &img);
    let mut c = Client::connect(&s.uri(), opt_mode()).unwrap();
    assert_eq!(c.export_name(), "top", "the URI names the export");

    let mut all = c.opt_list_meta_context::<&str>(&[]).unwrap();
    all.sort();
    assert_eq!(
        all,
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:bm0"
        ]
    );
    let mut q = c.opt_list_meta_context(&["qemu:"]).unwrap();
    q.sort();
    assert_eq!(q, ["qemu:allocation-depth", "qemu:dirty-bitmap:bm0"]);
    // Unknown namespaces are ignored, not errors.
    assert!(c
        .opt_list_meta_context(&["nosuch:thing"])
        .unwrap()
        .is_empty());
    // doc/proto.md, "NBD_OPT_LIST_META_CONTEXT": a query without a namespace is refused locally.
    assert!(matches!(
        c.opt_list_meta_context(&["allocation"]),
        Err(Error::Usage(UsageError::BadQuery(_)))
    ));
    assert_eq!(c.phase(), Phase::Negotiating);

    let mut set = c
        .opt_set_meta_context(&["base:allocation", "qemu:dirty-bitmap:bm0"])
        .unwrap();
    set.sort();
    assert_eq!(set, ["base:allocation", "qemu:dirty-bitmap:bm0"]);
    // doc/proto.md, "NBD_OPT_SET_META_CONTEXT": each SET replaces the selection.
    assert_eq!(
        c.opt_set_meta_context(&["qemu:dirty-bitmap:bm0", "base:allocation"])
            .unwrap()
            .len(),
        2
    );
    c.opt_go().unwrap();
    assert!(c.can_meta_context("base:allocation"));
    assert!(c.can_meta_context("qemu:dirty-bitmap:bm0"));
    assert!(!c.can_meta_context("qemu:allocation-depth"));
    let mut names: Vec<String> = c
        .block_status(0, 65536, CmdFlags::empty())
        .unwrap()
        .into_iter()
        .map(|(n, e)| {
            assert!(!e.is_empty(), "{n}: no extents");
            n
        })
        .collect();
    names.sort();
    assert_eq!(names, ["base:allocation", "qemu:dirty-bitmap:bm0"]);
    c.shutdown().unwrap();
}

// ------------------------------------------------------------------ nbdkit

/// doc/proto.md (extension-ext-header branch), "NBD_OPT_EXTENDED_HEADERS":
/// on NBD_REP_ERR_UNSUP the client carries on with compact headers. nbdkit
/// memory, default connect: EXTENDED_HEADERS refused (nbdkit 1.32),
/// structured replies on, base:allocation selected when asked for.
#[test]
fn nbdkit_refusing_extended_headers_gets_compact_headers() {
    let s = nbdkit(&["memory", "1M"]);
    let mut c = Client::connect_unix(s.socket(), Config::with_base_allocation()).unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_protocol(), Some("newstyle-fixed"));
    assert!(c.get_structured_replies_negotiated());
    assert!(!c.get_extended_headers_negotiated());
    assert!(c.can_meta_context("base:allocation"));
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    assert_matches_nbdinfo(&c, &s.uri());
    c.pwrite(b"hello", 4096, CmdFlags::empty()).unwrap();
    assert_eq!(read_back(&mut c, 4096, 5), b"hello");
    c.shutdown().unwrap();

    // Without asking for contexts, none is selected.
    let c = Client::connect_unix(s.socket(), Config::default()).unwrap();
    assert!(!c.can_meta_context("base:allocation"));
}

/// nbdkit memory in option mode: the list holds only the default export
/// "", SET_META_CONTEXT selects base:allocation, STRUCTURED_REPLY twice is
/// harmless.
#[test]
fn nbdkit_memory_opt_mode() {
    let s = nbdkit(&["memory", "1M"]);
    let mut cfg = opt_mode();
    cfg.request_structured_replies = false;
    let mut c = Client::connect_unix(s.socket(), cfg).unwrap();
    assert!(!c.get_structured_replies_negotiated());
    assert!(c.opt_structured_reply().unwrap());
    assert!(c.get_structured_replies_negotiated());
    assert!(
        c.opt_structured_reply().unwrap(),
        "second call: no-op, true"
    );
    assert!(!c.opt_extended_headers().unwrap(), "nbdkit 1.32: ERR_UNSUP");
    assert!(!c.get_extended_headers_negotiated());
    assert_eq!(c.phase(), Phase::Negotiating);

    let list = c.opt_list().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].0, "");

    assert_eq!(
        c.opt_list_meta_context(&["base:"]).unwrap(),
        ["base:allocation"]
    );
    assert_eq!(
        c.opt_set_meta_context(&["base:allocation"]).unwrap(),
        ["base:allocation"]
    );
    c.opt_go().unwrap();
    assert!(c.can_meta_context("base:allocation"));
    let bs = c.block_status(0, 1 << 20, CmdFlags::empty()).unwrap();
    assert_eq!(bs.len(), 1);
    assert_eq!(bs[0].0, "base:allocation");
    c.shutdown().unwrap();
}

/// libnbd's list-exports scenario with nbdkit eval: exports foo and
/// foobar, size = name length + 1.
#[test]
fn nbdkit_eval_list_info_go_each_export() {
    let s = foo_foobar_server();
    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    let names: Vec<String> = c.opt_list().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["foo", "foobar"]);
    for (name, size) in [("foo", 4), ("foobar", 7)] {
        c.set_export_name(name).unwrap();
        c.opt_info().unwrap();
        assert_eq!(c.get_size().unwrap(), size, "{name}");
        assert_eq!(c.phase(), Phase::Negotiating);
    }
    c.set_export_name("foo").unwrap();
    c.opt_go().unwrap();
    assert_eq!(c.get_size().unwrap(), 4);
    assert_eq!(read_back(&mut c, 0, 4), [0; 4]);
    c.shutdown().unwrap();

    // A second connection goes straight to foobar.
    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    c.set_export_name("foobar").unwrap();
    c.opt_go().unwrap();
    assert_eq!(c.get_size().unwrap(), 7);
    assert_matches_nbdinfo(&c, &s.uri_for("foobar"));
}

/// doc/proto.md, "NBD_OPT_INFO and NBD_OPT_GO": after an error reply to GO
/// the client may send further options. An unknown export: INFO and GO fail
/// with ERR_UNKNOWN, the client stays in option mode, and can still go to
/// an export that exists.
#[test]
fn unknown_export_go_fails_and_negotiation_continues() {
    let s = foo_foobar_server();
    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    c.set_export_name("nope").unwrap();
    match c.opt_info() {
        Err(Error::Option {
            option: OptionKind::Info,
            error,
        }) => assert_eq!(error.reply, RepError::Unknown, "{error}"),
        other => panic!("opt_info on an unknown export: {other:?}"),
    }
    assert!(c.get_size().is_err(), "no info after a failed INFO");
    let e = c.opt_go().unwrap_err();
    match &e {
        Error::Option {
            option: OptionKind::Go,
            error,
        } => assert_eq!(error.reply, RepError::Unknown, "{error}"),
        other => panic!("opt_go on an unknown export: {other:?}"),
    }
    assert_eq!(e.io_kind(), std::io::ErrorKind::NotFound);
    assert!(!e.is_fatal());
    assert_eq!(c.phase(), Phase::Negotiating);
    // The connection is still good for options...
    assert_eq!(c.opt_list().unwrap().len(), 2);
    // ...and for another export.
    c.set_export_name("foobar").unwrap();
    c.opt_go().unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_size().unwrap(), 7);
    c.shutdown().unwrap();
}

/// Default mode with an unknown export: the automatic GO fails, the client
/// aborts and reports which option failed.
#[test]
fn default_mode_unknown_export_is_negotiation_failed() {
    let s = foo_foobar_server();
    match Client::connect(&s.uri_for("nope"), Config::default()) {
        Err(Error::Closed(CloseReason::NegotiationFailed { option, error })) => {
            assert_eq!(option, OptionKind::Go);
            assert_eq!(error.reply, RepError::Unknown);
        }
        other => panic!("connect to an unknown export: {other:?}"),
    }
}

/// nbdkit -o: oldstyle goes straight to transmission, even in option mode.
#[test]
fn nbdkit_oldstyle_is_ready_at_once() {
    let s = nbdkit_with(&["-o"], &["memory", "12288"]);
    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_protocol(), Some("oldstyle"));
    assert_eq!(c.get_size().unwrap(), 12288);
    assert!(!c.get_structured_replies_negotiated());
    assert!(c.opt_list().is_err(), "no options in oldstyle");
    c.pwrite(&[7; 512], 512, CmdFlags::empty()).unwrap();
    assert_eq!(read_back(&mut c, 512, 512), [7; 512]);
    c.shutdown().unwrap();

    let c = Client::connect_unix(s.socket(), Config::default()).unwrap();
    assert_eq!(c.get_protocol(), Some("oldstyle"));
    assert_matches_nbdinfo(&c, &s.uri());
}

/// doc/proto.md, "Newstyle negotiation": without fixed newstyle only
/// NBD_OPT_EXPORT_NAME is possible. nbdkit --mask-handshake=0: default
/// connect uses it, and in option mode LIST/INFO are refused locally while
/// GO works.
#[test]
fn nbdkit_plain_newstyle_uses_only_export_name() {
    let s = nbdkit_with(&["--mask-handshake=0"], &["memory", "8192"]);
    let mut c = Client::connect_unix(s.socket(), Config::default()).unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_protocol(), Some("newstyle"));
    assert!(!c.get_structured_replies_negotiated());
    assert_eq!(c.get_size().unwrap(), 8192);
    assert_eq!(
        c.connection().client_flags(),
        0,
        "doc/proto.md, Client flags"
    );
    c.pwrite(b"abc", 0, CmdFlags::empty()).unwrap();
    assert_eq!(read_back(&mut c, 0, 3), b"abc");
    c.shutdown().unwrap();

    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    assert_eq!(c.phase(), Phase::Negotiating);
    assert!(matches!(
        c.opt_list(),
        Err(Error::Usage(UsageError::Unsupported(_)))
    ));
    assert!(matches!(
        c.opt_info(),
        Err(Error::Usage(UsageError::Unsupported(_)))
    ));
    assert_eq!(c.phase(), Phase::Negotiating, "nothing was sent");
    c.opt_go().unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_size().unwrap(), 8192);
    assert_eq!(read_back(&mut c, 0, 3), b"abc", "the memory disk is shared");
    c.shutdown().unwrap();
}

/// doc/proto.md, "NBD_OPT_STRUCTURED_REPLY": on NBD_REP_ERR_UNSUP the client
/// carries on without structured replies. nbdkit --no-sr: simple replies,
/// no contexts.
#[test]
fn nbdkit_refusing_structured_replies_gets_simple_replies() {
    let s = nbdkit_with(&["--no-sr"], &["memory", "1M"]);
    let mut c = Client::connect_unix(s.socket(), Config::with_base_allocation()).unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert!(!c.get_structured_replies_negotiated());
    assert!(!c.get_extended_headers_negotiated());
    assert!(
        !c.can_meta_context("base:allocation"),
        "doc/proto.md, NBD_OPT_STRUCTURED_REPLY"
    );
    assert!(
        !c.export_info().unwrap().can_df(),
        "DF needs structured replies"
    );
    assert_matches_nbdinfo(&c, &s.uri());
    c.pwrite(&[1, 2, 3], 10, CmdFlags::empty()).unwrap();
    assert_eq!(read_back(&mut c, 9, 5), [0, 1, 2, 3, 0]);
    c.shutdown().unwrap();

    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    assert!(!c.opt_structured_reply().unwrap());
    assert_eq!(c.phase(), Phase::Negotiating);
}

/// doc/proto.md, "Protocol phases": NBD over TCP. Loopback: connect_tcp and
/// an nbd:// URI.
#[test]
fn nbdkit_over_tcp_loopback() {
    let s = nbdkit_tcp(&[], &["memory", "64K"]);
    let addr = s.addr().unwrap();
    let mut c = Client::connect_tcp(addr, Config::default()).unwrap();
    assert_eq!(c.get_size().unwrap(), 65536);
    assert_eq!(c.target(), addr.to_string());
    c.pwrite(b"tcp", 0, CmdFlags::empty()).unwrap();
    c.shutdown().unwrap();

    let uri = format!("nbd://127.0.0.1:{}/", addr.port());
    let mut c = Client::connect(&uri, opt_mode()).unwrap();
    assert_eq!(c.phase(), Phase::Negotiating);
    c.opt_go().unwrap();
    assert_eq!(read_back(&mut c, 0, 3), b"tcp");
    assert_matches_nbdinfo(&c, &uri);
    c.shutdown().unwrap();
}

// ------------------------------------------------------------------ nbd-server

/// nbd-server 3.24 with three named exports: listing (allowlist = true),
/// GO on each, no structured replies, and INFO's size-0 quirk.
#[test]
fn nbd_server_several_exports() {
    let data = scratch_dir();
    let a = make_file(data.path(), "a.img", 1 << 20, pattern);
    let b = make_file(data.path(), "b.img", 4096, |_| 0xaa);
    let g = make_file(data.path(), "g.img", 8192, |i| i as u8);
    let s = nbd_server(&[
        ("alpha", &a, &[]),
        ("beta", &b, &[("readonly", "true")]),
        ("gamma", &g, &[("flush", "true")]),
    ]);
    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    assert_eq!(c.get_protocol(), Some("newstyle-fixed"));
    assert!(
        !c.get_structured_replies_negotiated(),
        "nbd-server 3.24: no SR"
    );
    assert!(!c.get_extended_headers_negotiated());
    let mut names: Vec<String> = c.opt_list().unwrap().into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta", "gamma"]);

    // nbd-server 3.24 answers NBD_OPT_INFO with size 0 (servers.md §4);
    // the client reports what the server said. GO below gives the real size.
    c.set_export_name("beta").unwrap();
    c.opt_info().unwrap();
    assert_eq!(c.get_size().unwrap(), 0, "nbd-server 3.24 INFO quirk");
    assert!(c.export_info().unwrap().is_read_only());

    c.opt_go().unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    assert_eq!(c.get_size().unwrap(), 4096);
    assert!(c.export_info().unwrap().is_read_only());
    assert_eq!(read_back(&mut c, 0, 4096), [0xaa; 4096]);
    // libnbd is fooled by the INFO quirk: nbdinfo reports size 0 too.
    let json = nbdinfo(&["--json", &s.uri_for("beta")]);
    assert_eq!(json_value(&json, "export-size"), "0", "{json}");
    assert_flags_match(&c, &json);
    c.shutdown().unwrap();

    // Default mode, by URI: EXTENDED_HEADERS and STRUCTURED_REPLY are both
    // refused, GO works.
    let mut c = Client::connect(&s.uri_for("gamma"), Config::default()).unwrap();
    assert_eq!(c.get_size().unwrap(), 8192);
    assert!(!c.get_structured_replies_negotiated());
    assert!(c.export_info().unwrap().can_flush());
    assert_eq!(
        read_back(&mut c, 250, 10),
        (250..260u32).map(|i| i as u8).collect::<Vec<_>>()
    );
    c.shutdown().unwrap();
}

/// doc/proto.md, "NBD_OPT_ABORT": the server may close without replying.
/// nbd-server does; the client treats that as a clean end.
#[test]
fn nbd_server_closing_after_abort_without_ack_is_a_clean_end() {
    let data = scratch_dir();
    let a = make_file(data.path(), "a.img", 4096, pattern);
    let s = nbd_server(&[("alpha", &a, &[])]);
    let mut c = Client::connect_unix(s.socket(), opt_mode()).unwrap();
    assert_eq!(c.opt_list().unwrap().len(), 1);
    c.opt_abort().unwrap();
    assert_eq!(c.phase(), Phase::Closed);
    assert_eq!(c.connection().close_reason(), Some(&CloseReason::Aborted));
    // Nothing more can be done on it.
    assert!(c.opt_list().is_err());

    // The same against nbdkit, which does send the ACK.
    let k = nbdkit(&["memory", "1M"]);
    let mut c = Client::connect_unix(k.socket(), opt_mode()).unwrap();
    c.opt_abort().unwrap();
    assert_eq!(c.phase(), Phase::Closed);
    assert_eq!(c.connection().close_reason(), Some(&CloseReason::Aborted));
}

// ------------------------------------------------------------------ nbd-mio

/// Turns an nbd-mio connection without a `mio::Poll` (its `on_ready` API
/// for loops that learn readiness another way) until `done` says so;
/// returns every event seen. Fails after 10 s.
fn mio_until(
    n: &mut NbdConnection,
    mut done: impl FnMut(&NbdConnection, &[MioEvent]) -> bool,
) -> Vec<MioEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        while let Some(ev) = n.poll_event() {
            seen.push(ev);
        }
        if done(n, &seen) {
            return seen;
        }
        assert!(
            !n.is_finished(),
            "connection ended: {:?} (events {seen:?})",
            n.conn().close_reason()
        );
        assert!(Instant::now() < deadline, "nbd-mio loop hung: {seen:?}");
        let before = seen.len();
        n.on_ready(true, true);
        if before == seen.len() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn went(evs: &[MioEvent]) -> Option<&nbd_std::nbd_core::ExportInfo> {
    evs.iter().find_map(|e| match e {
        MioEvent::GoSucceeded(i) => Some(i),
        _ => None,
    })
}

/// The Sans-IO core driven by nbd-mio: list, a failed GO, then GO and a
/// read, against nbdkit eval (foo / foobar).
#[test]
fn mio_adapter_list_go_read_nbdkit_eval() {
    let s = foo_foobar_server();
    let mut n = NbdConnection::connect(s.socket().to_str().unwrap(), opt_mode()).unwrap();
    mio_until(&mut n, |n, _| n.phase() != Phase::Connecting);
    assert_eq!(n.phase(), Phase::Negotiating);

    n.opt_list().unwrap();
    let evs = mio_until(&mut n, |_, e| {
        e.iter()
            .any(|e| matches!(e, MioEvent::OptionSucceeded(OptionKind::List)))
    });
    let names: Vec<&str> = evs
        .iter()
        .filter_map(|e| match e {
            MioEvent::ExportListed { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["foo", "foobar"]);

    n.set_export_name("nope").unwrap();
    n.opt_go().unwrap();
    let evs = mio_until(&mut n, |_, e| {
        e.iter().any(|e| matches!(e, MioEvent::OptionError { .. }))
    });
    assert!(
        evs.iter().any(|e| matches!(e, MioEvent::OptionError { option: OptionKind::Go, error } if error.reply == RepError::Unknown)),
        "{evs:?}"
    );
    assert_eq!(n.phase(), Phase::Negotiating);

    n.set_export_name("foobar").unwrap();
    n.opt_go().unwrap();
    let evs = mio_until(&mut n, |_, e| went(e).is_some());
    assert_eq!(went(&evs).unwrap().size, 7);
    assert_eq!(n.phase(), Phase::Ready);

    let cookie = n
        .read(
            0,
            bytes::BytesMut::from(&[0xffu8; 7][..]),
            CmdFlags::empty(),
        )
        .unwrap();
    let evs = mio_until(&mut n, |_, e| {
        e.iter()
            .any(|e| matches!(e, MioEvent::CommandDone { cookie: c, .. } if *c == cookie))
    });
    match evs.last() {
        Some(MioEvent::CommandDone {
            result: Ok(()),
            buffer: Some(b),
            ..
        }) => assert_eq!(&b[..], [0; 7]),
        other => panic!("{other:?}"),
    }
    n.disconnect().unwrap();
    n.flush();
    let evs = mio_until(&mut n, |n, _| n.is_finished());
    assert!(
        evs.iter()
            .any(|e| matches!(e, MioEvent::Closed(CloseReason::Disconnected))),
        "{evs:?}"
    );
}

/// nbd-mio with libnbd's default sequence against qemu-nbd: extended
/// headers, GO with block sizes, an extended-header read.
#[test]
fn mio_adapter_default_connect_qemu_extended_headers() {
    let data = scratch_dir();
    let s = qemu_hello(data.path());
    let mut n = NbdConnection::connect(&s.uri(), Config::default()).unwrap();
    let evs = mio_until(&mut n, |_, e| went(e).is_some());
    let info = went(&evs).unwrap().clone();
    assert_eq!((info.name.as_str(), info.size), ("hello", 2048));
    assert!(info.block_size.is_some());
    assert!(n.conn().extended_headers_negotiated());
    let cookie = n
        .read(2000, bytes::BytesMut::zeroed(48), CmdFlags::empty())
        .unwrap();
    let evs = mio_until(&mut n, |_, e| {
        e.iter()
            .any(|e| matches!(e, MioEvent::CommandDone { cookie: c, .. } if *c == cookie))
    });
    match evs.last() {
        Some(MioEvent::CommandDone {
            result: Ok(()),
            buffer: Some(b),
            ..
        }) => assert_eq!(&b[..], (2000..2048).map(pattern).collect::<Vec<_>>()),
        other => panic!("{other:?}"),
    }
}
