//! nbd-mio against a real nbdkit: option mode, the transmission phase with
//! many requests in flight, partial writes, TCP, and the refusals.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};

use bytes::{Bytes, BytesMut};
use common::{pattern, Harness, Nbdkit};
use nbd_mio::nbd_core::CmdFlags;
use nbd_mio::{CloseReason, Config, Cookie, Error, Event, NbdConnection, OptionKind, Phase};

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
    h.nbd.conn_mut().disconnect().expect("disconnect");
    match h.next_event() {
        Event::Closed(CloseReason::Disconnected) => {}
        other => panic!("expected a clean close, got {other:?}"),
    }
    assert_eq!(h.nbd.phase(), Phase::Closed);
    assert!(h.nbd.interest().is_none());
    assert!(h.nbd.poll_event().is_none(), "no event after Closed");
    h.nbd.flush();
}

#[test]
fn opt_mode_list_go_and_64_requests_in_flight() {
    let srv = Nbdkit::start(&["memory", "64M"]);
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    let nbd = NbdConnection::connect_unix(&srv.sock, cfg).expect("connect");
    let mut h = Harness::new(nbd);
    h.run_until(|n| n.phase() != Phase::Connecting);
    assert_eq!(h.nbd.phase(), Phase::Negotiating);
    assert!(h.nbd.conn().structured_replies_negotiated());

    // NBD_OPT_LIST: nbdkit lists its one (default) export.
    h.nbd.conn_mut().opt_list().expect("opt_list");
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
    h.nbd.conn_mut().opt_go().expect("opt_go");
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
        let c = h
            .nbd
            .conn_mut()
            .write(off, data, CmdFlags::empty())
            .expect("write");
        offsets.insert(c, off);
    }
    assert_eq!(h.nbd.conn().in_flight(), N);
    let done = complete_all(&mut h, N);
    assert!(done.keys().all(|c| offsets.contains_key(c)));
    assert_eq!(h.nbd.conn().in_flight(), 0);

    // A flush, and 64 reads in flight, checked against what was written.
    let f = h.nbd.conn_mut().flush(CmdFlags::empty()).expect("flush");
    assert!(complete_all(&mut h, 1).contains_key(&f));
    let mut offsets = HashMap::new();
    for i in 0..N {
        let off = (i * LEN) as u64;
        let c = h
            .nbd
            .conn_mut()
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
        c.conn_mut()
            .trim(0, 64 * KIB as u64, CmdFlags::empty())
            .expect("trim"),
        c.conn_mut()
            .write_zeroes(64 * KIB as u64, 64 * KIB as u64, CmdFlags::empty())
            .expect("write_zeroes"),
        c.conn_mut()
            .cache(0, MIB as u64, CmdFlags::empty())
            .expect("cache"),
    ];
    let done = complete_all(&mut h, cmds.len());
    assert!(cmds.iter().all(|c| done.contains_key(c)));

    let stats = h.nbd.io_stats();
    // The socket left the registry when events came and went back to wait.
    assert!(stats.registry_calls >= 2, "{stats:?}");
    assert!(stats.bytes_written >= (N * LEN) as u64);
    assert!(stats.bytes_read >= (N * LEN) as u64);
    disconnect(&mut h);
}

/// The socket is in the embedder's registry only while the connection
/// waits for it: a readiness event takes it out (the server's sends then
/// wake no poller while the connection works), `reregister` puts it back,
/// and putting it back reports at once a reply that arrived meanwhile.
#[test]
fn the_socket_is_registered_only_while_the_connection_waits() {
    let srv = Nbdkit::start(&["memory", "1M"]);
    let nbd = NbdConnection::connect(&srv.uri(), Config::default()).expect("connect");
    let mut h = Harness::new(nbd);
    assert!(matches!(h.next_event(), Event::GoSucceeded(_)));

    // The event that brought GO's reply took the socket out of the
    // registry. A read sent now is answered, but no poll reports it.
    let cookie = h
        .nbd
        .conn_mut()
        .read(0, BytesMut::zeroed(4 * KIB), CmdFlags::empty())
        .expect("read");
    h.nbd.flush();
    assert!(!h.nbd.conn().wants_write(), "the request went out");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(h.poll_only(std::time::Duration::ZERO), 0);
    assert_eq!(h.nbd.conn().in_flight(), 1);

    // Back in the registry, the waiting reply is reported at once.
    let calls = h.nbd.io_stats().registry_calls;
    h.reregister();
    assert_eq!(h.nbd.io_stats().registry_calls, calls + 1, "one add");
    assert_eq!(h.poll_only(std::time::Duration::ZERO), 1);
    assert_eq!(
        h.nbd.io_stats().registry_calls,
        calls + 2,
        "and one removal"
    );
    assert!(complete_all(&mut h, 1).contains_key(&cookie));

    // Nothing changed: reregistering twice costs one call, not two.
    h.reregister();
    h.reregister();
    assert_eq!(h.nbd.io_stats().registry_calls, calls + 3);
    disconnect(&mut h);
}

#[test]
fn large_writes_with_small_socket_buffers_complete() {
    let srv = Nbdkit::start(&["memory", "64M"]);
    // Tiny kernel buffers: every 8 MiB write and read needs many partial
    // socket calls.
    let s = std::os::unix::net::UnixStream::connect(&srv.sock).expect("connect");
    rustix::net::sockopt::set_socket_send_buffer_size(&s, 4096).expect("SO_SNDBUF");
    rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4096).expect("SO_RCVBUF");
    s.set_nonblocking(true).expect("non-blocking");
    let nbd = NbdConnection::from_unix_stream(mio::net::UnixStream::from_std(s), Config::default())
        .expect("nbd");
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
        cookies.push(
            h.nbd
                .conn_mut()
                .write(off, data, CmdFlags::empty())
                .expect("write"),
        );
    }
    // One flush sends part of the first payload and stops at a full socket.
    h.nbd.flush();
    assert!(h.nbd.conn().wants_write());
    assert!(h.nbd.interest().is_some_and(|i| i.is_writable()));
    let done = complete_all(&mut h, 4);
    assert!(cookies.iter().all(|c| done.contains_key(c)));
    let stats = h.nbd.io_stats();
    assert!(stats.partial_writes > 0, "{stats:?}");
    assert!(stats.writes_blocked > 0, "{stats:?}");
    // Writable interest goes once the queue is empty.
    h.nbd.flush();
    assert!(h.nbd.interest().is_some_and(|i| !i.is_writable()));

    let mut reads = HashMap::new();
    for i in 0..4 {
        let off = (i * LEN) as u64;
        let c = h
            .nbd
            .conn_mut()
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

/// Relays one TCP connection to the Unix socket (nbdkit is started on a
/// Unix socket so the test needs no fixed port); returns the TCP port.
fn tcp_relay(sock: &std::path::Path) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let sock = sock.to_owned();
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let unix = std::os::unix::net::UnixStream::connect(&sock).expect("connect nbdkit");
        let (mut t2, mut u2) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut t2, &mut u2);
            let _ = u2.shutdown(Shutdown::Write);
        });
        let (mut t, mut u) = (tcp, unix);
        let mut buf = vec![0u8; 64 * KIB];
        while let Ok(n) = u.read(&mut buf) {
            if n == 0 || t.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = t.shutdown(Shutdown::Write);
        let _ = up.join();
    });
    port
}

#[test]
fn tcp_uri_round_trip() {
    let srv = Nbdkit::start(&["memory", "16M"]);
    let port = tcp_relay(&srv.sock);
    let uri = format!("nbd://127.0.0.1:{port}/");
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
        .conn_mut()
        .write(4096, data.clone(), CmdFlags::empty())
        .expect("write");
    assert!(complete_all(&mut h, 1).contains_key(&w));
    let r = h
        .nbd
        .conn_mut()
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
    let srv = Nbdkit::start(&["memory", "1M"]);
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    let mut h = Harness::new(NbdConnection::connect(&srv.uri(), cfg).expect("connect"));
    h.run_until(|n| n.phase() == Phase::Negotiating);
    h.nbd.conn_mut().opt_abort().expect("opt_abort");
    match h.next_event() {
        Event::Closed(CloseReason::Aborted) => {}
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert_eq!(h.nbd.phase(), Phase::Closed);
}

#[test]
fn unsupported_transports_are_refused_clearly() {
    for uri in [
        "nbds+unix:///?socket=/nonexistent",
        "nbds://localhost/",
        "nbd+vsock:///",
    ] {
        match NbdConnection::connect_uri(uri, Config::default()) {
            Err(e @ Error::Unsupported(_)) => {
                assert!(e.to_string().contains("not supported yet"), "{e}")
            }
            other => panic!("{uri}: expected Unsupported, got {other:?}"),
        }
    }
    assert!(matches!(
        NbdConnection::connect_uri("http://x/", Config::default()),
        Err(Error::Uri(_))
    ));
    let mut cfg = Config::default();
    cfg.tls = nbd_mio::nbd_core::TlsMode::Require;
    let (a, _b) = mio::net::UnixStream::pair().expect("pair");
    assert!(matches!(
        NbdConnection::from_unix_stream(a, cfg),
        Err(Error::Unsupported(_))
    ));
}
