//! Records seed inputs for the fuzz targets.
//!
//! `state_machine` seeds are REAL server byte streams: this program starts
//! nbdkit, qemu-nbd and nbd-server with nbd-tests' launchers (Unix sockets
//! in private temporary directories, stopped by PID),
//! runs the fuzz harness's own scripted client ([`nbd_fuzz::Driver`]) against
//! each, and saves every socket read as one frame of the harness's input
//! format, behind the 4-byte setup header. Replaying a seed therefore makes
//! the client take exactly the steps it took against the real server.
//!
//! The seeds of the other targets are small messages built with the
//! `nbd_core::wire` encoders and hand-written bytes.
//!
//! ```sh
//! cd fuzz && cargo run --release --example record_seeds -- corpus/seed
//! ```
//! A server whose binary is missing is skipped with a message.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use nbd_core::consts::{chunk, opt, rep};
use nbd_core::wire::reply::{encode_chunk_header, HeaderMode};
use nbd_core::wire::request::{encode_request, RequestHeader};
use nbd_fuzz::script::{
    ack, error_offset_payload, error_payload, export_name_reply, fixed_newstyle, hole,
    info_block_size, info_description, info_export, info_name, meta_context, offset_data, oldstyle,
    opt_reply, opt_reply_payload, server_payload, simple_reply,
};
use nbd_fuzz::{feed, push_frame, Driver, Setup, HEADER_LEN};
use nbd_tests::{make_sparse_file, scratch_dir, Server, TempDir};

/// Largest seed written; bigger recordings are reported and skipped.
const MAX_SEED: usize = 64 * 1024;

/// A server started for one recording, and the data it serves. The
/// fields drop in order: the server stops (by PID) before its image goes.
struct Running {
    server: Server,
    _data: Option<TempDir>,
}

/// Whether `bin` is on `PATH`; a missing server is skipped, not an error.
fn have(bin: &str, tag: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skip {tag}: {bin} not installed");
    }
    found
}

/// nbdkit (nbd-tests' launcher); `args` are nbdkit flags, then the plugin.
fn nbdkit(tag: &str, args: &[&str]) -> Option<Running> {
    have("nbdkit", tag).then(|| Running {
        server: nbd_tests::nbdkit(args),
        _data: None,
    })
}

/// A sparse 1 MiB image with data (0x5a) in the first 64 KiB: the rest is
/// a hole, so block status and structured reads see both kinds.
fn image(name: &str) -> (TempDir, PathBuf) {
    let dir = scratch_dir();
    let img = make_sparse_file(dir.path(), name, 1 << 20);
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| f.write_all_at(&[0x5a; 65536], 0))
        .expect("write image");
    (dir, img)
}

/// qemu-nbd on a raw image, export "exp".
fn qemu_nbd(tag: &str) -> Option<Running> {
    if !have("qemu-nbd", tag) {
        return None;
    }
    let (data, img) = image("disk.raw");
    Some(Running {
        server: nbd_tests::qemu_nbd(&["-x", "exp", "-e", "4"], &img),
        _data: Some(data),
    })
}

/// nbd-server 3.x (no structured replies), export "exp" with trim, flush
/// and FUA.
fn nbd_server(tag: &str) -> Option<Running> {
    if !have("nbd-server", tag) {
        return None;
    }
    let (data, img) = image("disk.img");
    let opts: &[(&str, &str)] = &[("trim", "true"), ("flush", "true"), ("fua", "true")];
    Some(Running {
        server: nbd_tests::nbd_server(&[("exp", &img, opts)]),
        _data: Some(data),
    })
}

/// Runs the harness's client against the server at `sock` and returns the
/// seed: header, then one frame per socket read.
fn record(sock: &Path, setup: Setup, split: u8) -> Vec<u8> {
    let mut stream = UnixStream::connect(sock).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut seed = setup.to_header([0x5e, 0xed, split]).to_vec();
    assert_eq!(seed.len(), HEADER_LEN);
    let mut d = Driver::new(setup);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        d.pump(&mut out);
        if !out.is_empty() {
            // The server may already be gone (after ABORT); that is fine.
            let _ = stream.write_all(&out);
            out.clear();
        }
        if d.conn.is_finished() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                push_frame(&mut seed, &buf[..n]);
                feed(&mut d.conn, &buf[..n], setup.recv_path);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read from server: {e}"),
        }
    }
    d.finish(&mut out);
    seed
}

fn save(dir: &Path, name: &str, data: &[u8]) {
    if data.len() > MAX_SEED {
        eprintln!("skip {name}: {} bytes is over the seed limit", data.len());
        return;
    }
    fs::write(dir.join(name), data).expect("write seed");
    println!("{name}: {} bytes", data.len());
}

/// `bits`: the setup byte; `FEW` (bit 8 here) stands for byte 3 bit 4.
fn setup(bits: u16) -> Setup {
    Setup::from_header([bits as u8, 0, 0, if bits & FEW != 0 { 0x10 } else { 0 }])
}

const AUTO: u16 = 0;
const OPT: u16 = 1;
const NO_EH: u16 = 2;
const FULL_INFO: u16 = 4;
const RECV: u16 = 8;
const NAMED: u16 = 64;
const HOSTILE: u16 = 128;
const FEW: u16 = 256;

fn record_streams(dir: &Path) {
    let dir = dir.join("state_machine");
    fs::create_dir_all(&dir).expect("seed dir");
    // (name, server, setup bits, split byte)
    type Start = fn(&str) -> Option<Running>;
    let runs: &[(&str, Start, u16, u8)] = &[
        (
            "nbdkit-memory-auto",
            |t| nbdkit(t, &["memory", "1M"]),
            AUTO,
            0x0f,
        ),
        (
            "nbdkit-memory-opt",
            |t| nbdkit(t, &["memory", "1M"]),
            OPT | FULL_INFO,
            0x0f,
        ),
        (
            "nbdkit-memory-recv",
            |t| nbdkit(t, &["memory", "1M"]),
            RECV | NO_EH,
            0x05,
        ),
        (
            "nbdkit-oldstyle",
            |t| nbdkit(t, &["-o", "memory", "1M"]),
            AUTO,
            0x0f,
        ),
        (
            "nbdkit-oldstyle-opt",
            |t| nbdkit(t, &["-o", "memory", "1M"]),
            OPT | RECV,
            0x03,
        ),
        (
            "nbdkit-no-sr",
            |t| nbdkit(t, &["--no-sr", "memory", "1M"]),
            AUTO,
            0x0f,
        ),
        (
            "nbdkit-no-sr-opt",
            |t| nbdkit(t, &["--no-sr", "memory", "1M"]),
            OPT,
            0x08,
        ),
        (
            "nbdkit-newstyle-nonfixed",
            |t| nbdkit(t, &["--mask-handshake=0", "memory", "1M"]),
            AUTO,
            0x0f,
        ),
        (
            "nbdkit-newstyle-nonfixed-opt",
            |t| nbdkit(t, &["--mask-handshake=0", "memory", "1M"]),
            OPT,
            0x0f,
        ),
        (
            "nbdkit-read-errors",
            |t| {
                nbdkit(
                    t,
                    &[
                        "--filter=error",
                        "memory",
                        "1M",
                        "error=EIO",
                        "error-pread-rate=100%",
                    ],
                )
            },
            AUTO,
            0x0f,
        ),
        (
            "nbdkit-exports-blocksize-opt",
            |t| {
                nbdkit(
                    t,
                    &[
                        "--filter=exportname",
                        "--filter=blocksize-policy",
                        "memory",
                        "1M",
                        "exportname-list=explicit",
                        "exportname=exp",
                        "exportname=other",
                        "exportdesc=fixed:hello",
                        "blocksize-minimum=512",
                        "blocksize-preferred=4096",
                        "blocksize-maximum=65536",
                    ],
                )
            },
            OPT | FULL_INFO | NAMED,
            0x0f,
        ),
        (
            "nbdkit-hostile-offsets",
            |t| nbdkit(t, &["memory", "1M"]),
            HOSTILE,
            0x0f,
        ),
        (
            "nbdkit-few-slots",
            |t| nbdkit(t, &["memory", "1M"]),
            FEW | RECV,
            0x0f,
        ),
        ("qemu-nbd-extended", qemu_nbd, NAMED, 0x0f),
        (
            "qemu-nbd-extended-hostile",
            qemu_nbd,
            NAMED | HOSTILE | FEW,
            0x0f,
        ),
        (
            "qemu-nbd-extended-opt",
            qemu_nbd,
            OPT | NAMED | FULL_INFO,
            0x0f,
        ),
        ("qemu-nbd-structured", qemu_nbd, NAMED | NO_EH, 0x0f),
        ("nbd-server-simple", nbd_server, NAMED, 0x0f),
        ("nbd-server-opt", nbd_server, OPT | NAMED, 0x0f),
    ];
    for (name, start, bits, split) in runs {
        let Some(running) = start(name) else {
            continue;
        };
        let seed = record(running.server.socket(), setup(*bits), *split);
        save(&dir, name, &seed);
    }
}

// ----- seeds of the parser targets -----

fn write_wire_seeds(dir: &Path) {
    let put = |target: &str, name: &str, data: &[u8]| {
        let d = dir.join(target);
        fs::create_dir_all(&d).expect("seed dir");
        fs::write(d.join(name), data).expect("write seed");
    };

    // wire_handshake
    put("wire_handshake", "newstyle", &fixed_newstyle());
    put("wire_handshake", "oldstyle", &oldstyle(1 << 20, 0x0001));
    put(
        "wire_handshake",
        "export-name-reply",
        &export_name_reply(1 << 20, 0x0d6d),
    );

    // wire_option: headers, and payloads on their own
    put("wire_option", "ack", &ack(opt::GO));
    let server = server_payload("exp", "the description");
    put("wire_option", "server-payload", &server);
    put(
        "wire_option",
        "server-reply",
        &opt_reply(opt::LIST, rep::SERVER, &server),
    );
    let payloads = [
        ("info-export", info_export(opt::GO, 1 << 20, 0x0d6d)),
        (
            "info-block-size",
            info_block_size(opt::GO, 512, 4096, 65536),
        ),
        ("info-name", info_name(opt::GO, "canonical")),
        (
            "info-description",
            info_description(opt::GO, "d\u{e9}scription"),
        ),
        ("meta-context", meta_context(opt::GO, 1, "base:allocation")),
    ];
    for (name, reply) in &payloads {
        put("wire_option", name, opt_reply_payload(reply));
    }
    put(
        "wire_option",
        "error-reply",
        &opt_reply(opt::GO, rep::ERR_UNKNOWN, b"no such export"),
    );

    // wire_reply: selector byte, then the message
    let with_sel = |sel: u8, b: &[u8]| {
        let mut v = vec![sel];
        v.extend_from_slice(b);
        v
    };
    put(
        "wire_reply",
        "simple",
        &with_sel(0, &simple_reply(0, 0x1_0000_0002)),
    );
    let mut c = BytesMut::new();
    encode_chunk_header(
        HeaderMode::Structured,
        1,
        chunk::OFFSET_DATA,
        7,
        0,
        4104,
        &mut c,
    );
    put("wire_reply", "structured-data", &with_sel(0, &c));
    let mut x = BytesMut::new();
    encode_chunk_header(
        HeaderMode::Extended,
        1,
        chunk::BLOCK_STATUS_EXT,
        7,
        4096,
        24,
        &mut x,
    );
    put("wire_reply", "extended-status", &with_sel(0, &x));
    put("wire_reply", "hole", &with_sel(0, &hole(4096, 512)));
    put(
        "wire_reply",
        "error",
        &with_sel(0, &error_payload(5, "oops")),
    );
    put(
        "wire_reply",
        "error-offset",
        &with_sel(1, &error_offset_payload(5, "oops", 4096)),
    );
    put(
        "wire_reply",
        "block-status",
        &with_sel(5, &status(false, 1, &[(65536, 0), (983040, 3)])),
    );
    put(
        "wire_reply",
        "block-status-ext",
        &with_sel(6, &status(true, 1, &[(1 << 20, 2)])),
    );

    // wire_request
    let h = RequestHeader {
        flags: 1,
        typ: 1,
        cookie: 0x1_0000_0003,
        offset: 16384,
        length: 4096,
    };
    for (name, ext) in [("compact", false), ("extended", true)] {
        let mut r = BytesMut::new();
        encode_request(&h, ext, &mut r).expect("encode");
        put("wire_request", name, &r);
    }

    // uri
    for (i, u) in [
        "nbd://example.com:10810/exp",
        "nbds+unix:///exp?socket=/tmp/s.sock&tls-psk-file=/k",
        "nbd://[fe80::1%25eth0]/a%20b?tls-verify-peer=0&x-custom=1",
        "nbds://alice@127.0.0.1/?tls-type=psk&tls-hostname=h",
        "nbd+vsock://3:1234/",
        "nbd+unix:///?socket=%00abstract",
    ]
    .iter()
    .enumerate()
    {
        put("uri", &format!("uri-{i}"), u.as_bytes());
    }
}

// ----- synthetic state_machine seeds -----

/// Cookie of the `i`-th command of the harness batch (first use of slot `i`).
fn cookie(i: u64) -> u64 {
    1 << 32 | i
}

fn chunk_msg(
    mode: HeaderMode,
    flags: u16,
    typ: u16,
    i: u64,
    req_off: u64,
    payload: &[u8],
) -> Vec<u8> {
    nbd_fuzz::script::chunk(mode, flags, typ, cookie(i), req_off, payload)
}

fn data(o: u64, n: usize, fill: u8) -> Vec<u8> {
    offset_data(o, &vec![fill; n])
}

/// An error payload, with an offset for NBD_REPLY_TYPE_ERROR_OFFSET.
fn err(e: u32, msg: &str, o: Option<u64>) -> Vec<u8> {
    match o {
        Some(o) => error_offset_payload(e, msg, o),
        None => error_payload(e, msg),
    }
}

/// A block status payload, 64-bit (`ext`) or 32-bit.
fn status(ext: bool, id: u32, list: &[(u64, u64)]) -> Vec<u8> {
    if ext {
        nbd_fuzz::script::status_ext(id, list)
    } else {
        let list: Vec<(u32, u32)> = list.iter().map(|&(l, f)| (l as u32, f as u32)).collect();
        nbd_fuzz::script::status(id, &list)
    }
}

/// Replies no stock server sends, to the harness batch: chunks out of
/// order, holes next to data, error chunks with offsets, an unknown error
/// chunk type, several chunks per read, and NBD_ESHUTDOWN at the end (after
/// which the client disconnects by itself).
fn synthetic_replies(m: HeaderMode) -> Vec<u8> {
    const DONE: u16 = 1;
    let ext = m == HeaderMode::Extended;
    let st = if ext {
        chunk::BLOCK_STATUS_EXT
    } else {
        chunk::BLOCK_STATUS
    };
    let mut v = Vec::new();
    // read 0 (0+1024): second half first, then a hole for the first half
    v.extend(chunk_msg(
        m,
        0,
        chunk::OFFSET_DATA,
        0,
        0,
        &data(512, 512, 0x11),
    ));
    v.extend(chunk_msg(m, 0, chunk::OFFSET_HOLE, 0, 0, &hole(0, 512)));
    // read 1 (4096+2048, DF): one data chunk
    v.extend(chunk_msg(
        m,
        DONE,
        chunk::OFFSET_DATA,
        1,
        4096,
        &data(4096, 2048, 0x22),
    ));
    v.extend(chunk_msg(m, DONE, chunk::NONE, 0, 0, &[]));
    // write 2: a simple reply (structured mode) or a NONE chunk (extended)
    if ext {
        v.extend(chunk_msg(m, DONE, chunk::NONE, 2, 16384, &[]));
    } else {
        v.extend(simple_reply(0, cookie(2)));
    }
    // read 3 (16384+1024): an error with an offset, then the data
    v.extend(chunk_msg(
        m,
        0,
        chunk::ERROR_OFFSET,
        3,
        16384,
        &err(5, "bad sector", Some(16400)),
    ));
    v.extend(chunk_msg(
        m,
        DONE,
        chunk::OFFSET_DATA,
        3,
        16384,
        &data(16384, 1024, 0x33),
    ));
    // flush 4, trim 5, write zeroes 6 (an unknown error chunk type)
    v.extend(chunk_msg(m, DONE, chunk::NONE, 4, 0, &[]));
    v.extend(chunk_msg(
        m,
        DONE,
        chunk::ERROR,
        5,
        65536,
        &err(1, "", None),
    ));
    v.extend(chunk_msg(
        m,
        DONE,
        0x8123,
        6,
        131072,
        &err(28, "odd type", None),
    ));
    // block status 7 and 8 (REQ_ONE)
    v.extend(chunk_msg(
        m,
        DONE,
        st,
        7,
        0,
        &status(ext, 1, &[(4096, 0), (1044480, 3)]),
    ));
    v.extend(chunk_msg(m, DONE, st, 8, 0, &status(ext, 1, &[(4096, 0)])));
    // read 9 (512K+4096): three pieces out of order
    v.extend(chunk_msg(
        m,
        0,
        chunk::OFFSET_DATA,
        9,
        524288,
        &data(524288 + 3072, 1024, 0x99),
    ));
    v.extend(chunk_msg(
        m,
        0,
        chunk::OFFSET_HOLE,
        9,
        524288,
        &hole(524288, 1024),
    ));
    v.extend(chunk_msg(
        m,
        DONE,
        chunk::OFFSET_DATA,
        9,
        524288,
        &data(524288 + 1024, 2048, 0x9a),
    ));
    // cache 10: the server is shutting down
    v.extend(chunk_msg(
        m,
        DONE,
        chunk::ERROR,
        10,
        0,
        &err(108, "shutting down", None),
    ));
    v
}

fn synthetic_seeds(dir: &Path) {
    let dir = dir.join("state_machine");
    fs::create_dir_all(&dir).expect("seed dir");
    let greeting = fixed_newstyle();
    let mut meta = meta_context(opt::SET_META_CONTEXT, 1, "base:allocation");
    meta.extend(ack(opt::SET_META_CONTEXT));
    let mut go = info_export(opt::GO, 1 << 20, 0x0d6d);
    go.extend(info_block_size(opt::GO, 1, 4096, 32 << 20));
    go.extend(ack(opt::GO));
    for (name, mode) in [
        ("synthetic-structured", HeaderMode::Structured),
        ("synthetic-extended", HeaderMode::Extended),
    ] {
        let mut negotiation = if mode == HeaderMode::Extended {
            ack(opt::EXTENDED_HEADERS)
        } else {
            let mut v = opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, b"no");
            v.extend(ack(opt::STRUCTURED_REPLY));
            v
        };
        negotiation.extend_from_slice(&meta);
        negotiation.extend_from_slice(&go);
        let mut seed = setup(AUTO).to_header([0x5e, 0xed, 0x0f]).to_vec();
        push_frame(&mut seed, &greeting);
        push_frame(&mut seed, &negotiation);
        push_frame(&mut seed, &synthetic_replies(mode));
        nbd_fuzz::run_state_machine(&seed);
        save(&dir, name, &seed);
        if mode != HeaderMode::Structured {
            continue;
        }
        // The same replies with the virtual clock, deadlines and cancel
        // (`-clock`), a missed deadline ending the connection
        // (`-clock-close`), and an abort after the negotiation frame
        // (byte 1 = 0x5e: 0x5e % 8 = 6, so the split seed is changed to 1).
        let variants = [
            ("synthetic-structured-clock", true, false, None, 0x06),
            ("synthetic-structured-clock-close", true, true, None, 0x05),
            ("synthetic-structured-abort", false, false, Some(1), 0x0f),
        ];
        for (name, clock, close, abort, split) in variants {
            let mut s = setup(AUTO);
            s.clock = clock;
            s.close_on_timeout = close;
            s.abort_at = abort;
            let mut seed = s.to_header([0x59, 0xed, split]).to_vec();
            push_frame(&mut seed, &greeting);
            push_frame(&mut seed, &negotiation);
            push_frame(&mut seed, &synthetic_replies(mode));
            nbd_fuzz::run_state_machine(&seed);
            save(&dir, name, &seed);
        }
        // Hostile replies at the harness's limits (`nbd_fuzz::limits`):
        // error chunks without the done flag past `max_error_chunks`, and
        // a block status chunk one extent past `max_extent_bytes`.
        let mut flood = Vec::new();
        for _ in 0..=nbd_fuzz::limits().max_error_chunks {
            flood.extend(chunk_msg(
                mode,
                0,
                chunk::ERROR,
                0,
                0,
                &err(5, "again", None),
            ));
        }
        let n = nbd_fuzz::limits().max_extent_bytes / 16 + 1;
        let many: Vec<(u64, u64)> = (0..n).map(|_| (1, 0)).collect();
        let status_flood = chunk_msg(mode, 1, chunk::BLOCK_STATUS, 7, 0, &status(false, 1, &many));
        for (name, replies) in [
            ("synthetic-error-flood", flood),
            ("synthetic-status-over-limit", status_flood),
        ] {
            let mut seed = setup(AUTO).to_header([0x5e, 0xed, 0x0f]).to_vec();
            push_frame(&mut seed, &greeting);
            push_frame(&mut seed, &negotiation);
            push_frame(&mut seed, &replies);
            nbd_fuzz::run_state_machine(&seed);
            save(&dir, name, &seed);
        }
    }
}

/// Option mode against a server that acknowledges STARTTLS (the harness
/// takes the TLS handshake as done) and every later option.
fn synthetic_tls_seed(dir: &Path) {
    let greeting = fixed_newstyle();
    let meta = |o: u32, id: u32| {
        let mut v = meta_context(o, id, "base:allocation");
        v.extend(ack(o));
        v
    };
    let export = |o: u32| {
        let mut v = info_export(o, 1 << 20, 0x0d6d);
        v.extend(info_name(o, "canonical"));
        v.extend(info_description(o, "described"));
        v.extend(ack(o));
        v
    };
    let list = server_payload("exp", "description");
    let frames: Vec<Vec<u8>> = vec![
        greeting,
        [
            opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]),
            ack(opt::STRUCTURED_REPLY),
        ]
        .concat(),
        ack(opt::STARTTLS),
        [opt_reply(opt::LIST, rep::SERVER, &list), ack(opt::LIST)].concat(),
        opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, b"still no"),
        ack(opt::STRUCTURED_REPLY),
        meta(opt::LIST_META_CONTEXT, 0),
        meta(opt::SET_META_CONTEXT, 1),
        [meta(opt::SET_META_CONTEXT, 2), export(opt::INFO)].concat(),
        [meta(opt::SET_META_CONTEXT, 3), export(opt::GO)].concat(),
    ];
    let mut seed = setup(OPT | FULL_INFO)
        .to_header([0x5e, 0xed, 0x0f])
        .to_vec();
    for f in &frames {
        push_frame(&mut seed, f);
    }
    nbd_fuzz::run_state_machine(&seed);
    save(&dir.join("state_machine"), "synthetic-opt-starttls", &seed);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "corpus/seed".into()));
    write_wire_seeds(&dir);
    synthetic_seeds(&dir);
    synthetic_tls_seed(&dir);
    if args.next().as_deref() != Some("--synthetic-only") {
        record_streams(&dir);
    }
}
