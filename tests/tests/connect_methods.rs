//! libnbd's other ways to connect, from both adapters: a server started
//! as a subprocess speaking NBD on stdin/stdout (`nbd_connect_command`), a
//! server started with systemd socket activation
//! (`nbd_connect_systemd_socket_activation`), and a socket the caller
//! connected itself, given as a file descriptor (`nbd_connect_socket`).
//! Each server started by the client must be gone once the client is
//! dropped.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nbd_mio::{Event, NbdConnection};
use nbd_std::{Client, CmdFlags, Config};
use nbd_tests::servers::{make_file, nbdkit, nbdkit_tcp, pid_alive, scratch_dir};

/// Waits until `pid` has gone (it was reaped by the client's drop).
fn assert_gone(pid: u32) {
    let end = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < end, "server {pid} still running");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A write then a read of the same bytes.
fn round_trip(c: &mut Client) {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    c.pwrite(&data, 8192, CmdFlags::empty()).unwrap();
    let mut back = vec![0u8; 4096];
    c.pread(&mut back, 8192, CmdFlags::empty()).unwrap();
    assert_eq!(back, data);
}

#[test]
fn command_nbdkit_stdin() {
    let mut c = Client::connect_command(&["nbdkit", "-s", "memory", "1M"], Config::default())
        .expect("connect_command");
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    round_trip(&mut c);
    let pid = c.subprocess_pid().expect("a subprocess");
    assert!(pid_alive(pid));
    c.shutdown().unwrap();
    drop(c);
    assert_gone(pid);
}

#[test]
fn command_killed_on_drop_without_shutdown() {
    // The drop stops the server even mid-session.
    let c = Client::connect_command(&["nbdkit", "-s", "memory", "1M"], Config::default())
        .expect("connect_command");
    let pid = c.subprocess_pid().unwrap();
    drop(c);
    assert_gone(pid);
}

#[test]
fn command_that_fails_to_start_is_an_error() {
    let e = Client::connect_command(&["/nonexistent/nbdkit"], Config::default()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/nbdkit"), "{e}");
}

#[test]
fn command_that_exits_is_a_closed_connection() {
    // `true` exits at once: end of file before the greeting.
    let e = Client::connect_command(&["true"], Config::default()).unwrap_err();
    assert!(!e.to_string().is_empty());
}

#[test]
fn socket_activation_nbdkit() {
    let mut c = Client::connect_systemd_socket_activation(
        &["nbdkit", "--exit-with-parent", "memory", "1M"],
        Config::default(),
    )
    .expect("socket activation");
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    round_trip(&mut c);
    let pid = c.subprocess_pid().unwrap();
    c.shutdown().unwrap();
    drop(c);
    // nbdkit keeps listening after a client leaves: the drop must stop it.
    assert_gone(pid);
}

#[test]
fn socket_activation_qemu_nbd() {
    let dir = scratch_dir();
    let img = make_file(dir.path(), "d.img", 65536, |i| (i % 251) as u8);
    let mut c = Client::connect_systemd_socket_activation(
        &["qemu-nbd", "-f", "raw", "-t", img.to_str().unwrap()],
        Config::default(),
    )
    .expect("socket activation");
    assert_eq!(c.get_size().unwrap(), 65536);
    let mut buf = vec![0u8; 512];
    c.pread(&mut buf, 1000, CmdFlags::empty()).unwrap();
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((1000 + i) % 251) as u8));
    round_trip(&mut c);
    let pid = c.subprocess_pid().unwrap();
    c.shutdown().unwrap();
    drop(c);
    assert_gone(pid);
}

#[test]
fn activation_with_a_name_and_the_socket_adopted_as_an_fd() {
    // LISTEN_FDNAMES reaches the server (qemu-storage-daemon uses it);
    // qemu-nbd ignores it, so this only checks the name does no harm.
    let dir = scratch_dir();
    let img = make_file(dir.path(), "d.img", 4096, |_| 0x5a);
    let c = nbd_driver::connect_socket_activation(
        &["qemu-nbd", "-f", "raw", img.to_str().unwrap()],
        Some("nbd"),
    )
    .expect("activation");
    let mut c2 = Client::connect_fd(
        match c.socket {
            nbd_driver::Socket::Unix(s) => OwnedFd::from(s),
            _ => panic!("not unix"),
        },
        Config::default(),
    )
    .expect("client over the fd");
    assert_eq!(c2.get_size().unwrap(), 4096);
    c2.shutdown().unwrap();
    drop(c2);
    drop(c.process);
}

#[test]
fn fd_of_a_tcp_socket() {
    let srv = nbdkit_tcp(&[], &["memory", "1M"]);
    let s = std::net::TcpStream::connect(srv.addr().unwrap()).unwrap();
    let mut c = Client::connect_fd(OwnedFd::from(s), Config::default()).expect("connect_fd");
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    round_trip(&mut c);
    c.shutdown().unwrap();
}

#[test]
fn fd_of_a_unix_socket() {
    let srv = nbdkit(&["memory", "1M"]);
    let s = std::os::unix::net::UnixStream::connect(srv.socket()).unwrap();
    let mut c = Client::connect_fd(OwnedFd::from(s), Config::default()).expect("connect_fd");
    round_trip(&mut c);
    c.shutdown().unwrap();
}

#[test]
fn fd_of_a_non_socket_is_refused() {
    let f = std::fs::File::open("/dev/null").unwrap();
    assert!(Client::connect_fd(OwnedFd::from(f), Config::default()).is_err());
}

/// The size nbd-mio learns from the handshake.
fn mio_size(mut n: NbdConnection) -> u64 {
    let mut poll = nbd_mio::mio::Poll::new().unwrap();
    let mut events = nbd_mio::mio::Events::with_capacity(8);
    n.register(poll.registry(), nbd_mio::mio::Token(1)).unwrap();
    loop {
        poll.poll(&mut events, Some(Duration::from_secs(10)))
            .unwrap();
        assert!(!events.is_empty(), "no readiness");
        for ev in events.iter() {
            n.handle_event(ev);
        }
        while let Some(ev) = n.poll_event() {
            match ev {
                Event::GoSucceeded(info) => return info.size,
                Event::Closed(r) => panic!("closed: {r}"),
                _ => {}
            }
        }
    }
}

#[test]
fn mio_command_and_socket_activation() {
    let n = NbdConnection::connect_command(&["nbdkit", "-s", "memory", "2M"], Config::default())
        .unwrap();
    let pid = n.subprocess_pid().unwrap();
    assert_eq!(mio_size(n), 2 << 20);
    assert_gone(pid);

    let n = NbdConnection::connect_systemd_socket_activation(
        &["nbdkit", "--exit-with-parent", "memory", "3M"],
        Config::default(),
    )
    .unwrap();
    let pid = n.subprocess_pid().unwrap();
    assert_eq!(mio_size(n), 3 << 20);
    assert_gone(pid);
}
