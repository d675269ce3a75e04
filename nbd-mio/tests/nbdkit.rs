//! nbd-mio against a real nbdkit: option mode, the transmission phase with
//! many requests in flight, partial writes, TCP, and the refusals.

mod common;

use nbd_mio::CmdFlags;
use std::collections::HashMap;
use std::net::TcpListener;

use bytes::{Bytes, BytesMut};
use common::{pattern, Harness};
use nbd_mio::{CloseReason, Config, Cookie, Error, Event, NbdConnection, OptionKind, Phase};
use nbd_tests::{nbdkit, nbdkit_tcp};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Waits for `n` completions; all must succeed. Returns the read buffers
/// (if any) by cookie.
fn complete_all(h: &mut Harness, n: usize) -> HashMap<Cookie, Option<BytesMut>> {
    let mut done = HashMap::new();
    while done.len() < n {
        match h.next_event() {
            Event::CommandDone {
                cookie,
                result,
                buffer,
            } => {
                result.unwrap_or_else(|e| panic!("command {cookie:?} failed: {e}"));
                assert!(done.insert(cookie, buffer).is_none(), "completed twice");
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    done
}

/// Sends NBD_CMD_DISC and waits for the orderly end.
fn disconnect(h: &mut Harness) {
    h.nbd.disconnect().expect("disconnect");
    match h.next_event() {
        Event::Closed(CloseReason::Disconnected) => {}
        other => panic!("expected a clean close, got {other:?}"),
    }
    assert_eq!(h.nbd.phase(), Phase::Closed);
    assert!(!h.nbd.conn().wants_read() && !h.nbd.conn().wants_write());
    assert!(h.nbd.poll_event().is_none(), "no event after Closed");
    h.nbd.flush();
}

#[test]
fn opt_mode_list_go_and_64_requests_in_flight() {
    let srv = nbdkit(&["memory", "64M"]);
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    let nbd = NbdConnection::connect_unix(srv.socket(), cfg).expect("connect");
    let mut h = Harness::new(nbd);
    h.run_until(|n| n.phase() != Phase::Connecting);
    assert_eq!(h.nbd.phase(), Phase::Negotiating);
    assert!(h.nbd.conn().structured_replies_negotiated());

    // NBD_OPT_LIST: nbdkit lists its one (default) export.
    h.nbd.opt_list().expect("opt_list");
    let mut names = Vec::new();
    loop {
        match h.next_event() {
            Event::ExportListed { name, .. } => names.push(name),
            Event::OptionSucceeded(OptionKind::List) => break,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(names, vec![String::new()]);
    assert_eq!(h.nbd.phase(), Phase::Negotiating);

    // NBD_OPT_GO.
    h.nbd.opt_go().expect("opt_go");
    let info = match h.next_event() {
        Event::GoSucceeded(info) => info,
        other => panic!("expected GoSucceeded, got {other:?}"),
    };
    assert_eq!(info.size, 64 * MIB as u64);
    assert_eq!(h.nbd.phase(), Phase::Ready);

    // 64 writes in flight at once, each with its own pattern.
    const N: usize = 64;
    const LEN: usize = 256 * KIB;
    let mut offsets = HashMap::new();
    for i in 0..N {
        let off = (i * LEN) as u64;
        assert!(h.nbd.conn().has_room(LEN as u64));
        let data = Bytes::from(pattern(off, LEN, 0x5a));
        let c = h.nbd.write(off, data, CmdFlags::empty()).expect("write");
        offsets.insert(c, off);
    }
    assert_eq!(h.nbd.conn().in_flight(), N);
    let done = complete_all(&mut h, N);
    assert!(done.keys().all(|c| offsets.contains_key(c)));
    assert_eq!(h.nbd.conn().in_flight(), 0);

    // A flush, and 64 reads in flight, checked against what was written.
    let f = h.nbd.flush_command(CmdFlags::empty()).expect("flush");
    assert!(complete_all(&mut h, 1).contains_key(&f));
    let mut offsets = HashMap::new();
    for i in 0..N {
        let off = (i * LEN) as u64;
        let c = h
            .nbd
            .read(off, BytesMut::zeroed(LEN), CmdFlags::empty())
            .expect("read");
        offsets.insert(c, off);
    }
    assert_eq!(h.nbd.conn().in_flight(), N);
    for (cookie, buf) in complete_all(&mut h, N) {
        let off = offsets[&cookie];
        let buf = buf.expect("a read hands its buffer back");
        assert!(
            buf[..] == pattern(off, LEN, 0x5a)[..],
            "data read back at offset {off} differs"
        );
    }

    // Other commands of the transmission phase complete as events too.
    let c = &mut h.nbd;
    let cmds = [
        c.trim(0, 64 * KIB as u64, CmdFlags::empty()).expect("trim"),
        c.write_zeroes(64 * KIB as u64, 64 * KIB as u64, CmdFlags::empty())
            .expect("write_zeroes"),
        c.cache(0, MIB as u64, CmdFlags::empty()).expect("cache"),
    ];
    let done = complete_all(&mut h, cmds.len());
    assert!(cmds.iter().all(|c| done.contains_key(c)));

    let stats = h.nbd.io_stats();
    // One registration, for the whole life of the connection.
    assert_eq!(stats.waits, 1, "{stats:?}");
    assert!(stats.bytes_written >= (N * LEN) as u64);
    assert!(stats.bytes_read >= (N * LEN) as u64);
    disconnect(&mut h);
}

/// The socket is registered once, and a command submitted outside the
/// drain of events (the connection idle, no readiness pending) is sent at
/// once: its reply is reported by the next poll with nothing to re-arm.
/// Registering adds no file descriptor (no clone of the registry).
#[test]
fn a_command_on_an_idle_connection_is_sent_without_rearming() {
    let srv = nbdkit(&["memory", "1M"]);
    let nbd = NbdConnection::connect(&srv.uri(), Config::default()).expect("connect");
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = fds();
    let mut h = Harness::new(nbd);
    let poll_fd = 1; // the Poll itself
    assert_eq!(fds(), before + poll_fd, "register opens no descriptor");
    assert!(matches!(h.next_event(), Event::GoSucceeded(_)));
    assert!(
        h.nbd.poll_event().is_none(),
        "drained: the socket would block"
    );
    let waits = h.nbd.io_stats().waits;

    let cookie = h
        .nbd
        .read(0, BytesMut::zeroed(4 * KIB), CmdFlags::empty())
        .expect("read");
    assert!(!h.nbd.conn().wants_write(), "the request went out at once");
    // The reply's readiness arrives without any call on the registry.
    let mut got = 0;
    while got == 0 {
        got = h.poll_only(std::time::Duration::from_secs(5));
    }
    assert!(complete_all(&mut h, 1).contains_key(&cookie));
    assert_eq!(h.nbd.io_stats().waits, waits, "no registry call per turn");
    disconnect(&mut h);
}

/// Commands submitted while events are being drained, with other requests
/// in flight, wait for the end of the drain and leave in one vectored
/// write; a loop that leaves the drain early (here: right after
/// `GoSucceeded`) still gets them sent, on the readiness event that the
/// reply of the first request brings.
#[test]
fn commands_in_a_drain_are_batched_and_a_drain_left_early_still_progresses() {
    let srv = nbdkit(&["memory", "1M"]);
    let nbd = NbdConnection::connect(&srv.uri(), Config::default()).expect("connect");
    let mut h = Harness::new(nbd);
    assert!(matches!(h.next_event(), Event::GoSucceeded(_)));
    // Nothing else in flight: no reply would wake the loop, so it goes now.
    let first = h
        .nbd
        .read(0, BytesMut::zeroed(4 * KIB), CmdFlags::empty())
        .expect("read");
    assert!(
        !h.nbd.conn().wants_write(),
        "the first read went out at once"
    );
    let writes = h.nbd.io_stats().writes;
    let mut cookies = vec![first];
    for i in 1..8u64 {
        let buf = BytesMut::zeroed(4 * KIB);
        cookies.push(h.nbd.read(i * 4096, buf, CmdFlags::empty()).expect("read"));
    }
    assert!(
        h.nbd.conn().wants_write(),
        "the rest wait for the drain's end"
    );
    assert_eq!(h.nbd.io_stats().writes, writes);
    let done = complete_all(&mut h, cookies.len());
    assert!(cookies.iter().all(|c| done.contains_key(c)));
    assert_eq!(h.nbd.io_stats().writes, writes + 1, "one write for seven");
    disconnect(&mut h);
}

#[test]
fn large_writes_with_small_socket_buffers_complete() {
    let srv = nbdkit(&["memory", "64M"]);
    // Tiny kernel buffers: every 8 MiB write and read needs many partial
    // socket calls.
    let s = std::os::unix::net::UnixStream::connect(srv.socket()).expect("connect");
    rustix::net::sockopt::set_socket_send_buffer_size(&s, 4096).expect("SO_SNDBUF");
    rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4096).expect("SO_RCVBUF");
    s.set_nonblocking(true).expect("non-blocking");
    let nbd = NbdConnection::from_unix_stream(s, Config::default()).expect("nbd");
    let mut h = Harness::new(nbd);
    match h.next_event() {
        Event::GoSucceeded(info) => assert_eq!(info.size, 64 * MIB as u64),
        other => panic!("expected GoSucceeded, got {other:?}"),
    }

    const LEN: usize = 8 * MIB;
    let mut cookies = Vec::new();
    for i in 0..4 {
        let off = (i * LEN) as u64;
        let data = Bytes::from(pattern(off, LEN, i as u8));
        cookies.push(h.nbd.write(off, data, CmdFlags::empty()).expect("write"));
    }
    // One flush sends part of the first payload and stops at a full socket.
    h.nbd.flush();
    assert!(h.nbd.conn().wants_write());
    assert!(h.nbd.conn().wants_write(), "output waits for socket space");
    let done = complete_all(&mut h, 4);
    assert!(cookies.iter().all(|c| done.contains_key(c)));
    let stats = h.nbd.io_stats();
    assert!(stats.partial_writes > 0, "{stats:?}");
    assert!(stats.writes_blocked > 0, "{stats:?}");
    // Nothing waits once the queue is empty.
    h.nbd.flush();
    assert!(!h.nbd.conn().wants_write());

    let mut reads = HashMap::new();
    for i in 0..4 {
        let off = (i * LEN) as u64;
        let c = h
            .nbd
            .read(off, BytesMut::zeroed(LEN), CmdFlags::empty())
            .expect("read");
        reads.insert(c, (off, i as u8));
    }
    for (cookie, buf) in complete_all(&mut h, 4) {
        let (off, seed) = reads[&cookie];
        assert!(
            buf.expect("buffer")[..] == pattern(off, LEN, seed)[..],
            "8 MiB read at {off} differs"
        );
    }
    // Each 8 MiB payload arrived over several socket reads.
    let stats = h.nbd.io_stats();
    assert!(stats.reads > 2 * 4, "{stats:?}");
    disconnect(&mut h);
}

#[test]
fn tcp_uri_round_trip() {
    let srv = nbdkit_tcp(&[], &["memory", "16M"]);
    let uri = srv.uri();
    let nbd = NbdConnection::connect_uri(&uri, Config::default()).expect("connect");
    assert_eq!(nbd.target(), uri);
    let mut h = Harness::new(nbd);
    match h.next_event() {
        Event::GoSucceeded(info) => assert_eq!(info.size, 16 * MIB as u64),
        other => panic!("expected GoSucceeded, got {other:?}"),
    }
    let data = Bytes::from(pattern(4096, MIB, 9));
    let w = h
        .nbd
        .write(4096, data.clone(), CmdFlags::empty())
        .expect("write");
    assert!(complete_all(&mut h, 1).contains_key(&w));
    let r = h
        .nbd
        .read(4096, BytesMut::zeroed(MIB), CmdFlags::empty())
        .expect("read");
    let mut done = complete_all(&mut h, 1);
    let buf = done.remove(&r).flatten().expect("buffer");
    assert!(buf[..] == data[..]);
    disconnect(&mut h);
}

#[test]
fn refused_tcp_connect_ends_with_a_transport_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    match NbdConnection::connect_tcp(addr, Config::default()) {
        // Refused at once: fine too.
        Err(Error::Io { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(nbd) => {
            let mut h = Harness::new(nbd);
            match h.next_event() {
                Event::Closed(CloseReason::Transport(m)) => {
                    assert!(m.contains("connecting to"), "{m}")
                }
                other => panic!("expected a transport error, got {other:?}"),
            }
            assert_eq!(h.nbd.phase(), Phase::Dead);
        }
    }
}

#[test]
fn opt_abort_ends_cleanly() {
    let srv = nbdkit(&["memory", "1M"]);
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    let mut h = Harness::new(NbdConnection::connect(&srv.uri(), cfg).expect("connect"));
    h.run_until(|n| n.phase() == Phase::Negotiating);
    h.nbd.opt_abort().expect("opt_abort");
    match h.next_event() {
        Event::Closed(CloseReason::Aborted) => {}
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert_eq!(h.nbd.phase(), Phase::Closed);
}

#[test]
fn unsupported_transports_are_refused_clearly() {
    match NbdConnection::connect_uri("nbd+vsock:///", Config::default()) {
        Err(e @ Error::Unsupported(_)) => {
            assert!(e.to_string().contains("not supported yet"), "{e}")
        }
        other => panic!("vsock: expected Unsupported, got {other:?}"),
    }
    assert!(matches!(
        NbdConnection::connect_uri("http://x/", Config::default()),
        Err(Error::Uri(_))
    ));
    // TLS URIs are accepted now: they fail only where the socket is missing.
    for uri in [
        "nbds+unix:///?socket=/nonexistent",
        "nbd+unix:///?socket=/nonexistent",
    ] {
        assert!(
            matches!(
                NbdConnection::connect_uri(uri, Config::default()),
                Err(Error::Io { .. })
            ),
            "{uri}"
        );
    }
    // TLS required over a socket the caller made: the handshake decides.
    let mut cfg = Config::default();
    cfg.tls = nbd_mio::nbd_core::TlsMode::Require;
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    assert!(NbdConnection::from_unix_stream(a, cfg).is_ok());
}
