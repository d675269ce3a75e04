//! Connecting through the one driver, from both adapters: a Linux abstract
//! Unix socket (`nbd+unix:///?socket=%00name`), and TCP with every resolved
//! address tried (doc/proto.md, "Protocol phases": the client connects,
//! then the handshake begins).

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::thread;

use nbd_mio::{Event, NbdConnection};
use nbd_std::{Client, Config};
use nbd_tests::servers::nbdkit;

/// Accepts on the abstract name `name` and forwards each connection to the
/// Unix socket at `to` (nbdkit listens only on paths).
fn abstract_proxy(
    name: &str,
    to: std::path::PathBuf,
    connections: usize,
) -> thread::JoinHandle<()> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let l = UnixListener::bind_addr(&addr).expect("bind abstract");
    thread::spawn(move || {
        for _ in 0..connections {
            let (a, _) = l.accept().expect("accept");
            let b = UnixStream::connect(&to).expect("connect to nbdkit");
            let pump = |mut from: UnixStream, mut to: UnixStream| {
                thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                })
            };
            let t1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap());
            let t2 = pump(b, a);
            t1.join().unwrap();
            t2.join().unwrap();
        }
    })
}

#[test]
fn both_adapters_connect_to_an_abstract_unix_socket() {
    let srv = nbdkit(&["memory", "1M"]);
    let name = format!("nbd-rs-test-abstract-{}", std::process::id());
    let proxy = abstract_proxy(&name, srv.socket().to_path_buf(), 2);
    let uri = format!("nbd+unix:///?socket=%00{name}");

    let mut c = Client::connect(&uri, Config::default()).expect("nbd-std connects");
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    c.shutdown().expect("shutdown");
    drop(c);

    let mut poll = nbd_mio::mio::Poll::new().unwrap();
    let mut events = nbd_mio::mio::Events::with_capacity(8);
    let mut n = NbdConnection::connect(&uri, Config::default()).expect("nbd-mio connects");
    n.register(poll.registry(), nbd_mio::mio::Token(1)).unwrap();
    let size = 'outer: loop {
        poll.poll(&mut events, Some(std::time::Duration::from_secs(10)))
            .unwrap();
        assert!(!events.is_empty(), "no readiness");
        for ev in events.iter() {
            n.handle_event(ev);
        }
        while let Some(ev) = n.poll_event() {
            match ev {
                Event::GoSucceeded(info) => break 'outer info.size,
                Event::Closed(r) => panic!("closed: {r}"),
                _ => {}
            }
        }
    };
    assert_eq!(size, 1 << 20);
    drop(n);
    proxy.join().unwrap();
}

#[test]
fn tcp_tries_every_resolved_address() {
    // "localhost" may resolve to ::1 before 127.0.0.1; nbdkit listens on
    // 127.0.0.1 only, so a client that tried only the first address of a
    // name could fail. Force the case with an explicit list: a dead port
    // first, then the server.
    let srv = nbd_tests::servers::nbdkit_tcp(&[], &["memory", "1M"]);
    let live = srv.addr().expect("tcp address");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = Client::connect_tcp(&[dead, live][..], Config::default()).expect("second address");
    assert_eq!(c.get_size().unwrap(), 1 << 20);
}
