//! TLS with X.509 certificates (rustls) against real servers: nbdkit and
//! qemu-nbd on Unix sockets and on 127.0.0.1, with and without a required
//! client certificate, from both adapters; and the refusals, each with a
//! typed error naming its cause (doc/proto.md, section "TLS support").
//! Certificates are made by the tests (tests/src/pki.rs, certtool).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_driver::TlsError;
use nbd_mio::{Event, NbdConnection};
use nbd_std::nbd_core::{CloseReason, TlsMode};
use nbd_std::{Client, CmdFlags, Config, Error};
use nbd_tests::pki::Pki;
use nbd_tests::servers::{make_file, nbdkit_tcp, nbdkit_with, qemu_nbd, scratch_dir};

fn tls_flags(dir: &Path) -> Vec<String> {
    vec![
        "--tls=require".into(),
        format!("--tls-certificates={}", dir.display()),
    ]
}

fn nbdkit_tls(dir: &Path, extra: &[&str]) -> nbd_tests::Server {
    let mut f = tls_flags(dir);
    f.extend(extra.iter().map(|s| s.to_string()));
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    nbdkit_with(&f, &["memory", "1M"])
}

fn unix_uri(sock: &Path, certs: &Path, extra: &str) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}{extra}",
        sock.display(),
        certs.display()
    )
}

/// A write then a read of the same bytes, larger than one TLS record.
fn round_trip(c: &mut Client) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect();
    c.pwrite(&data, 4096, CmdFlags::empty()).unwrap();
    let mut back = vec![0u8; data.len()];
    c.pread(&mut back, 4096, CmdFlags::empty()).unwrap();
    assert!(back == data, "data differs after the TLS round trip");
}

fn tls_err(e: Error) -> TlsError {
    match e {
        Error::Tls(t) => t,
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn nbdkit_unix_round_trip() {
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.server(), &[]);
    let mut c = Client::connect(
        &unix_uri(srv.socket(), &pki.path("caonly"), ""),
        Config::default(),
    )
    .expect("TLS connect");
    assert!(c.tls_negotiated());
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    round_trip(&mut c);
    c.shutdown().expect("clean TLS shutdown");
}

#[test]
fn nbdkit_tcp_with_required_client_certificate() {
    let pki = Pki::new();
    let mut f = tls_flags(&pki.server());
    f.push("--tls-verify-peer".into());
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let srv = nbdkit_tcp(&f, &["memory", "1M"]);
    let port = srv.addr().unwrap().port();
    let cli = pki.path("client");
    for host in ["localhost", "127.0.0.1"] {
        let uri = format!("nbds://{host}:{port}/?tls-certificates={}", cli.display());
        let mut c =
            Client::connect(&uri, Config::default()).unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert!(c.tls_negotiated());
        round_trip(&mut c);
        c.shutdown().unwrap();
    }
    // The CA alone is not enough where a client certificate is required.
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        pki.path("caonly").display()
    );
    let e = Client::connect(&uri, Config::default()).unwrap_err();
    let t = tls_err(e);
    assert!(matches!(t, TlsError::ClientCertificateRequired(_)), "{t:?}");
    assert!(t.to_string().contains("client certificate"), "{t}");
}

#[test]
fn another_ca_is_refused_even_over_a_unix_socket() {
    // CVE-2024-7383 class: a certificate from a CA the client was not
    // given must be refused on a Unix socket too.
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.path("other"), &[]);
    let e = Client::connect(
        &unix_uri(srv.socket(), &pki.path("caonly"), ""),
        Config::default(),
    )
    .unwrap_err();
    let t = tls_err(e);
    assert!(matches!(t, TlsError::CertificateRejected(_)), "{t:?}");
    assert!(t.to_string().contains("trusted CA"), "{t}");
    // The same from nbd-mio.
    let (closed, tls) = mio_run(
        &unix_uri(srv.socket(), &pki.path("caonly"), ""),
        Config::default(),
    );
    assert!(
        matches!(closed, Some(CloseReason::Transport(ref m)) if m.contains("trusted CA")),
        "{closed:?}"
    );
    assert!(
        matches!(tls, Some(TlsError::CertificateRejected(_))),
        "{tls:?}"
    );
}

#[test]
fn verify_peer_off_accepts_any_certificate() {
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.path("other"), &[]);
    let uri = unix_uri(srv.socket(), &pki.path("caonly"), "&tls-verify-peer=0");
    let mut c = Client::connect(&uri, Config::default()).expect("verification off");
    round_trip(&mut c);
    c.shutdown().unwrap();
}

#[test]
fn wrong_hostname_is_refused_and_tls_hostname_overrides() {
    let pki = Pki::new();
    // Certificate for other.example only, signed by the CA we trust.
    let srv = nbdkit_tls(&pki.path("othername"), &[]);
    let e = Client::connect(
        &unix_uri(srv.socket(), &pki.path("caonly"), ""),
        Config::default(),
    )
    .unwrap_err();
    let t = tls_err(e);
    assert!(matches!(t, TlsError::CertificateRejected(_)), "{t:?}");
    assert!(t.to_string().contains("host name"), "{t}");
    let uri = unix_uri(
        srv.socket(),
        &pki.path("caonly"),
        "&tls-hostname=other.example",
    );
    let mut c = Client::connect(&uri, Config::default()).expect("tls-hostname matches");
    round_trip(&mut c);
    c.shutdown().unwrap();
}

#[test]
fn wrong_hostname_over_tcp() {
    let pki = Pki::new();
    let f = tls_flags(&pki.server());
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let srv = nbdkit_tcp(&f, &["memory", "1M"]);
    let port = srv.addr().unwrap().port();
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}&tls-hostname=wrong.example",
        pki.path("caonly").display()
    );
    let t = tls_err(Client::connect(&uri, Config::default()).unwrap_err());
    assert!(matches!(t, TlsError::CertificateRejected(_)), "{t:?}");
}

#[test]
fn plain_client_against_a_tls_only_server_says_tls_is_required() {
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.server(), &[]);
    let e = Client::connect(
        &format!("nbd+unix:///?socket={}", srv.socket().display()),
        Config::default(),
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("TLS"), "{m}");
    assert!(m.contains("requires TLS"), "{m}");
}

#[test]
fn require_against_a_server_without_tls_fails() {
    let srv = nbdkit_with(&[], &["memory", "1M"]);
    let mut cfg = Config::default();
    cfg.tls = TlsMode::Require;
    let e = Client::connect(srv.socket().to_str().unwrap(), cfg).unwrap_err();
    assert!(
        matches!(e, Error::Closed(CloseReason::TlsRequired(_))),
        "{e:?}"
    );
}

#[test]
fn allow_falls_back_to_plain_text_and_uses_tls_where_offered() {
    let srv = nbdkit_with(&[], &["memory", "1M"]);
    let mut cfg = Config::default();
    cfg.tls = TlsMode::Allow;
    let mut c = Client::connect(srv.socket().to_str().unwrap(), cfg.clone()).expect("fallback");
    assert!(!c.tls_negotiated());
    round_trip(&mut c);
    c.shutdown().unwrap();

    let pki = Pki::new();
    let tsrv = nbdkit_tls(&pki.server(), &[]);
    let mut tls = nbd_driver::TlsSettings::default();
    tls.certificates = Some(pki.path("caonly"));
    let mut c = Client::connect_with_tls(tsrv.socket().to_str().unwrap(), cfg, tls).expect("allow");
    assert!(c.tls_negotiated());
    round_trip(&mut c);
    c.shutdown().unwrap();
}

#[test]
fn missing_ca_file_is_a_typed_error() {
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.server(), &[]);
    let empty = scratch_dir();
    let t = tls_err(
        Client::connect(&unix_uri(srv.socket(), empty.path(), ""), Config::default()).unwrap_err(),
    );
    assert!(matches!(t, TlsError::NoCaCertificate(_)), "{t:?}");
}

/// Runs nbd-mio against `uri` until it is ready (then reads and writes a
/// little) or closed; returns the close reason if it closed, and its TLS
/// error.
fn mio_run(uri: &str, cfg: Config) -> (Option<CloseReason>, Option<TlsError>) {
    use bytes::{Bytes, BytesMut};
    let mut poll = nbd_mio::mio::Poll::new().unwrap();
    let mut events = nbd_mio::mio::Events::with_capacity(8);
    let mut n = NbdConnection::connect(uri, cfg).expect("connect");
    n.register(poll.registry(), nbd_mio::mio::Token(1)).unwrap();
    let data = Bytes::from((0..200_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>());
    let mut state = 0;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < end, "nbd-mio made no progress");
        poll.poll(&mut events, Some(Duration::from_secs(10)))
            .unwrap();
        for ev in events.iter() {
            n.handle_event(ev);
        }
        while let Some(ev) = n.poll_event() {
            match ev {
                Event::GoSucceeded(_) => {
                    assert!(n.tls_negotiated());
                    n.write(0, data.clone(), CmdFlags::empty()).unwrap();
                    state = 1;
                }
                Event::CommandDone { result, .. } if state == 1 => {
                    result.expect("write");
                    n.read(0, BytesMut::zeroed(data.len()), CmdFlags::empty())
                        .unwrap();
                    state = 2;
                }
                Event::CommandDone { result, buffer, .. } if state == 2 => {
                    result.expect("read");
                    let buf = buffer.expect("data");
                    assert!(buf[..] == data[..], "nbd-mio TLS data differs");
                    n.disconnect().unwrap();
                    state = 3;
                }
                Event::Closed(r) => {
                    let tls = n.tls_error().cloned();
                    return (if state == 3 { None } else { Some(r) }, tls);
                }
                _ => {}
            }
        }
    }
}

#[test]
fn mio_round_trip_over_tls() {
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.server(), &["--tls-verify-peer"]);
    let (closed, tls) = mio_run(
        &unix_uri(srv.socket(), &pki.path("client"), ""),
        Config::default(),
    );
    assert!(closed.is_none(), "{closed:?}");
    assert!(tls.is_none());
}

fn qemu_x509(dir: &Path, verify_peer: bool) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer={}",
            dir.display(),
            if verify_peer { "on" } else { "off" }
        ),
        "--tls-creds=tls0".into(),
    ]
}

#[test]
fn qemu_nbd_unix_round_trip_and_close_without_close_notify() {
    let pki = Pki::new();
    let data = scratch_dir();
    let img = make_file(data.path(), "t.img", 1 << 20, |_| 0);
    let args = qemu_x509(&pki.server(), false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let srv = qemu_nbd(&args, &img);
    let mut c = Client::connect(
        &unix_uri(srv.socket(), &pki.path("caonly"), ""),
        Config::default(),
    )
    .expect("qemu-nbd TLS");
    assert!(c.tls_negotiated());
    round_trip(&mut c);
    // qemu-nbd closes without close_notify after NBD_CMD_DISC: not an error.
    c.shutdown().expect("clean end");
    let (closed, _) = mio_run(
        &unix_uri(srv.socket(), &pki.path("caonly"), ""),
        Config::default(),
    );
    assert!(closed.is_none(), "{closed:?}");
}

/// qemu-nbd on 127.0.0.1 (a free port), for the client-certificate test.
struct QemuTcp(Child, u16);

impl Drop for QemuTcp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_tcp(args: &[String], img: &Path) -> QemuTcp {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "-e", "4", "-b", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args)
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    QemuTcp(child, port)
}

#[test]
fn qemu_nbd_tcp_with_required_client_certificate() {
    let pki = Pki::new();
    let data = scratch_dir();
    let img = make_file(data.path(), "t.img", 1 << 20, |_| 0);
    let q = qemu_tcp(&qemu_x509(&pki.server(), true), &img);
    let uri = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        q.1,
        pki.path("client").display()
    );
    let mut c = Client::connect(&uri, Config::default()).expect("client certificate accepted");
    round_trip(&mut c);
    c.shutdown().unwrap();
    let uri = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        q.1,
        pki.path("caonly").display()
    );
    let t = tls_err(Client::connect(&uri, Config::default()).unwrap_err());
    assert!(matches!(t, TlsError::ClientCertificateRequired(_)), "{t:?}");
    // A client certificate from another CA is refused as well.
    let uri = format!(
        "nbds://localhost:{}/?tls-certificates={}&tls-verify-peer=0",
        q.1,
        pki.path("wrongca").display()
    );
    let t = tls_err(Client::connect(&uri, Config::default()).unwrap_err());
    assert!(matches!(t, TlsError::ClientCertificateRequired(_)), "{t:?}");
}

#[test]
fn subprocess_server_over_tls() {
    // TLS settings travel with a transport opened by nbd-driver.
    let pki = Pki::new();
    let tlsdir = pki.server();
    let flag = format!("--tls-certificates={}", tlsdir.display());
    let mut conn =
        nbd_driver::connect_command(&["nbdkit", "-s", "--tls=require", &flag, "memory", "1M"])
            .unwrap();
    conn.tls.certificates = Some(pki.path("caonly"));
    let mut cfg = Config::default();
    cfg.tls = TlsMode::Require;
    let mut c = Client::from_connected(conn, cfg).expect("TLS over a socket pair");
    assert!(c.tls_negotiated());
    round_trip(&mut c);
    c.shutdown().unwrap();
}

#[test]
fn examples_accept_nbds_uris_unchanged() {
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.server(), &[]);
    let uri = unix_uri(srv.socket(), &pki.path("caonly"), "");
    let run = nbd_tests::examples::run_example("get-size", &[&uri], "");
    run.assert_ok();
    assert_eq!(run.stdout_text().trim(), "1048576");
    let run = nbd_tests::examples::run_example("fetch-first-sector", &[&uri], "");
    run.assert_ok();
}

/// Forwards between `a` and `b` one byte per write (with a pause now and
/// then), so every TLS record reaches the client split at every byte
/// boundary.
fn trickle_proxy(listener: std::os::unix::net::UnixListener, to: std::path::PathBuf) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let Ok((a, _)) = listener.accept() else {
            return;
        };
        let b = std::os::unix::net::UnixStream::connect(&to).unwrap();
        let pump = |mut from: std::os::unix::net::UnixStream,
                    mut to: std::os::unix::net::UnixStream| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut sent = 0u64;
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    for b in &buf[..n] {
                        if to.write_all(std::slice::from_ref(b)).is_err() {
                            return;
                        }
                        sent += 1;
                        if sent % 997 == 0 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            })
        };
        let t1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap());
        let t2 = pump(b, a);
        let _ = t1.join();
        let _ = t2.join();
    });
}

#[test]
fn tls_records_split_at_every_byte_boundary() {
    let pki = Pki::new();
    let srv = nbdkit_tls(&pki.server(), &[]);
    let dir = scratch_dir();
    for adapter in ["std", "mio"] {
        let sock = dir.path().join(format!("trickle-{adapter}.sock"));
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        trickle_proxy(l, srv.socket().to_path_buf());
        let uri = unix_uri(&sock, &pki.path("caonly"), "");
        if adapter == "std" {
            let mut c = Client::connect(&uri, Config::default()).expect("TLS through the trickle");
            let data: Vec<u8> = (0..40_000u32).map(|i| (i % 249) as u8).collect();
            c.pwrite(&data, 0, CmdFlags::empty()).unwrap();
            let mut back = vec![0u8; data.len()];
            c.pread(&mut back, 0, CmdFlags::empty()).unwrap();
            assert!(back == data);
            c.shutdown().unwrap();
        } else {
            let (closed, _) = mio_run(&uri, Config::default());
            assert!(closed.is_none(), "{closed:?}");
        }
    }
}

#[test]
fn server_that_dies_mid_handshake() {
    // A fixed-newstyle server that acknowledges STARTTLS, reads the
    // ClientHello and closes.
    use std::io::{Read, Write};
    let dir = scratch_dir();
    let sock = dir.path().join("dies.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut greet = Vec::new();
        greet.extend_from_slice(b"NBDMAGIC");
        greet.extend_from_slice(&0x49484156454F5054u64.to_be_bytes());
        greet.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        c.write_all(&greet).unwrap();
        let mut flags = [0u8; 4];
        c.read_exact(&mut flags).unwrap();
        let mut opt = [0u8; 16];
        c.read_exact(&mut opt).unwrap();
        assert_eq!(
            u32::from_be_bytes(opt[8..12].try_into().unwrap()),
            5,
            "STARTTLS"
        );
        let mut reply = Vec::new();
        reply.extend_from_slice(&0x0003e889045565a9u64.to_be_bytes());
        reply.extend_from_slice(&5u32.to_be_bytes());
        reply.extend_from_slice(&1u32.to_be_bytes()); // NBD_REP_ACK
        reply.extend_from_slice(&0u32.to_be_bytes());
        c.write_all(&reply).unwrap();
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).unwrap();
        assert_eq!(hello[0], 22, "a TLS handshake record");
        // Dies here.
    });
    let pki = Pki::new();
    let e =
        Client::connect(&unix_uri(&sock, &pki.path("caonly"), ""), Config::default()).unwrap_err();
    t.join().unwrap();
    let t = tls_err(e);
    assert_eq!(t, TlsError::ClosedDuringHandshake);
}

#[test]
fn nbd_server_mutual_tls() {
    // nbd-server 3.24 with force_tls needs a client certificate
    // (shared/servers.md §6); it has simple replies only.
    let pki = Pki::new();
    let data = scratch_dir();
    let img = make_file(data.path(), "n.img", 1 << 20, |_| 0);
    let srv_dir = pki.server();
    let cert = srv_dir.join("server-cert.pem");
    let key = srv_dir.join("server-key.pem");
    let ca = srv_dir.join("ca-cert.pem");
    let generic = [
        ("certfile", cert.to_str().unwrap()),
        ("keyfile", key.to_str().unwrap()),
        ("cacertfile", ca.to_str().unwrap()),
        ("force_tls", "true"),
    ];
    let srv = nbd_tests::servers::nbd_server_with(&generic, &[("disk", &img, &[])]);
    let uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        srv.socket().display(),
        pki.path("client").display()
    );
    let mut c = Client::connect(&uri, Config::default()).expect("nbd-server mutual TLS");
    assert!(c.tls_negotiated());
    round_trip(&mut c);
    c.shutdown().unwrap();
    // Plain text is refused by the server, and the message says TLS.
    let e = Client::connect(
        &format!("nbd+unix:///disk?socket={}", srv.socket().display()),
        Config::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
}
