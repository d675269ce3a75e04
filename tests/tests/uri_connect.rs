//! NBD URIs against real servers (issue 2, "The NBD URI grammar"):
//! `nbd+unix:///EXPORT?socket=...` with percent-encoded export names and
//! socket paths, `nbd://127.0.0.1:PORT/`, `nbd://localhost:PORT/`,
//! `nbd://[::1]:PORT/`, `nbds` against a server without TLS (no
//! fallback), and vsock, which this client refuses clearly.
//!
//! The nbdkit `info` plugin serves the export name it was asked for as the
//! disk's content, so reading the disk shows exactly what name the client
//! decoded and sent.

use nbd_std::CmdFlags;
use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_std::nbd_core::uri::{NbdUri, Transport};
use nbd_std::{Client, Config, Error, Phase};
use nbd_tests::{make_file, nbdkit, nbdkit_tcp, qemu_nbd, scratch_dir};

/// The export name as the server saw it (nbdkit info serves it as data).
fn name_seen_by_server(uri: &str) -> String {
    let mut c =
        Client::connect(uri, Config::default()).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    let size = c.get_size().unwrap() as usize;
    let mut buf = vec![0u8; size];
    if size > 0 {
        c.pread(&mut buf, 0, CmdFlags::empty()).unwrap();
    }
    c.shutdown().unwrap();
    String::from_utf8(buf).expect("export name is UTF-8")
}

fn socket_query(p: &Path) -> String {
    // Percent-encode everything but unreserved characters and '/'.
    p.to_str()
        .unwrap()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ------------------------------------------------------------------ nbd+unix

#[test]
fn nbd_unix_with_export_name() {
    let data = scratch_dir();
    let img = make_file(data.path(), "d.img", 2048, |i| i as u8);
    let s = qemu_nbd(&["-x", "hello"], &img);
    let uri = format!("nbd+unix:///hello?socket={}", socket_query(s.socket()));
    let mut c = Client::connect(&uri, Config::default()).unwrap();
    assert_eq!(c.target(), uri);
    assert_eq!(c.export_name(), "hello");
    assert_eq!(c.get_size().unwrap(), 2048);
    c.shutdown().unwrap();
    // connect_uri is the same thing.
    let c = Client::connect_uri(&uri, Config::default()).unwrap();
    assert_eq!(c.phase(), Phase::Ready);
    // A wrong name fails on qemu's side: the URI's name was really used.
    let bad = format!("nbd+unix:///hellO?socket={}", socket_query(s.socket()));
    assert!(matches!(
        Client::connect(&bad, Config::default()),
        Err(Error::Closed(_))
    ));
}

/// qemu-nbd -x 'a b/c': the name percent-encoded in the URI path, with the
/// slash encoded or not.
#[test]
fn percent_encoded_export_name_qemu() {
    let data = scratch_dir();
    let img = make_file(data.path(), "d.img", 4096, |_| 1);
    let s = qemu_nbd(&["-x", "a b/c"], &img);
    let q = socket_query(s.socket());
    for uri in [
        format!("nbd+unix:///a%20b%2Fc?socket={q}"),
        format!("nbd+unix:///a%20b/c?socket={q}"),
        format!("NBD+UNIX:///a%20b%2fc?socket={q}"),
        s.uri(),
    ] {
        let mut c =
            Client::connect(&uri, Config::default()).unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert_eq!(c.export_info().unwrap().name, "a b/c", "{uri}");
        assert_eq!(c.get_size().unwrap(), 4096);
        c.shutdown().unwrap();
    }
    // The listing shows the decoded name.
    let mut c = Client::connect(&format!("nbd+unix:///?socket={q}"), {
        let mut cfg = Config::default();
        cfg.opt_mode = true;
        cfg
    })
    .unwrap();
    assert_eq!(c.opt_list().unwrap()[0].0, "a b/c");
}

/// The exact bytes sent as the export name, for names that need encoding.
#[test]
fn export_name_decoding_seen_by_server() {
    let s = nbdkit(&["info"]);
    let q = socket_query(s.socket());
    for (path, want) in [
        ("", ""),
        ("plain", "plain"),
        ("a%20b%2Fc", "a b/c"),
        ("with/slash/", "with/slash/"),
        ("%C3%A9t%C3%A9", "été"),
        ("100%25+x", "100%+x"),
        ("q%3Fm%26x%3Dy", "q?m&x=y"),
    ] {
        let uri = format!("nbd+unix:///{path}?socket={q}");
        assert_eq!(name_seen_by_server(&uri), want, "{uri}");
    }
    // The launcher's own encoder agrees.
    assert_eq!(name_seen_by_server(&s.uri_for("sp ace?#&")), "sp ace?#&");
}

/// A socket path with characters that need percent-encoding in the query.
#[test]
fn percent_encoded_socket_path() {
    let dir = scratch_dir();
    let odd = dir.path().join("odd dir&x=1");
    std::fs::create_dir(&odd).unwrap();
    let sock = odd.join("s?ck");
    let mut child = spawn_nbdkit(
        &["-U", sock.to_str().unwrap()],
        &["memory", "1M"],
        &dir.path().join("pid"),
    );
    wait_for(|| sock.exists(), "nbdkit socket");
    let uri = format!("nbd+unix:///?socket={}", socket_query(&sock));
    let mut c = Client::connect(&uri, Config::default()).unwrap();
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    c.shutdown().unwrap();
    drop(c);
    child.stop();
}

#[test]
fn bad_uris_are_uri_errors() {
    for uri in [
        "nbd+unix:///",               // no socket=
        "nbd+unix://host/?socket=/x", // host with a Unix socket
        "nbd://",                     // no host
        "nbd://[::1/",                // unterminated IPv6 literal
        "nbd://127.0.0.1:99999/",     // port out of range
        "nbd://127.0.0.1:0/",         // port 0
        "nbd://127.0.0.1/a%zz",       // bad percent-encoding
        "nbd://127.0.0.1/#frag",      // fragment
    ] {
        match Client::connect(uri, Config::default()) {
            Err(Error::Uri(e)) => assert!(!e.to_string().is_empty()),
            other => panic!("{uri}: {other:?}"),
        }
    }
}

// ------------------------------------------------------------------ TCP

#[test]
fn nbd_tcp_ipv4_and_localhost() {
    let s = nbdkit_tcp(&[], &["info"]);
    let port = s.addr().unwrap().port();
    for (uri, want) in [
        (format!("nbd://127.0.0.1:{port}/"), ""),
        (format!("nbd://127.0.0.1:{port}"), ""),
        (format!("nbd://127.0.0.1:{port}/exp%20one"), "exp one"),
        // localhost may resolve to ::1 first, where nothing listens: the
        // client must try the next address.
        (format!("nbd://localhost:{port}/lh"), "lh"),
    ] {
        assert_eq!(name_seen_by_server(&uri), want, "{uri}");
    }
    assert_eq!(name_seen_by_server(&s.uri_for("x/y")), "x/y");
}

/// A free port on ::1 a moment ago.
fn free_port_v6() -> u16 {
    TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind [::1]:0")
        .port()
}

/// nbdkit started by this test (the launchers only listen on 127.0.0.1 or
/// Unix sockets); stopped by PID on drop.
struct OwnNbdkit {
    child: Child,
    stopped: bool,
}

impl OwnNbdkit {
    fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for OwnNbdkit {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_nbdkit(listen: &[&str], plugin: &[&str], pidfile: &Path) -> OwnNbdkit {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["--exit-with-parent", "-f", "-P"])
        .arg(pidfile)
        .args(listen)
        .args(plugin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("run nbdkit");
    let mut own = OwnNbdkit {
        child,
        stopped: false,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        if let Ok(Some(st)) = own.child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = own.child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("nbdkit {listen:?} exited with {st}: {err}");
        }
        assert!(Instant::now() < deadline, "nbdkit {listen:?} not ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    own
}

fn wait_for(f: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what} did not appear");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// nbd://[::1]:PORT/ against nbdkit listening on IPv6 loopback.
#[test]
fn nbd_tcp_ipv6_literal() {
    let dir = scratch_dir();
    let pidfile = dir.path().join("pid");
    let port = free_port_v6();
    let port_s = port.to_string();
    let _server = spawn_nbdkit(&["-i", "::1", "-p", &port_s], &["info"], &pidfile);
    let uri = format!("nbd://[::1]:{port}/six");
    assert_eq!(name_seen_by_server(&uri), "six");
    let c = Client::connect(&uri, Config::default()).unwrap();
    assert_eq!(
        c.target(),
        uri,
        "connect keeps the URI as the target for messages"
    );
    drop(c);
    // connect_tcp with an IPv6 socket address.
    let c = Client::connect_tcp(
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        Config::default(),
    )
    .unwrap();
    assert_eq!(c.phase(), Phase::Ready);
}

#[test]
fn ipv6_literal_parse() {
    let u = NbdUri::parse("nbd://[::1]:10810/e%2Fx").unwrap();
    assert_eq!(
        u.transport,
        Transport::Tcp {
            host: "::1".into(),
            port: 10810
        }
    );
    assert_eq!(u.export_name, "e/x");
    let u = NbdUri::parse("nbd://[fe80::1%25eth0]/").unwrap();
    assert_eq!(
        u.transport,
        Transport::Tcp {
            host: "fe80::1%eth0".into(),
            port: 10809
        }
    );
}

// ------------------------------------------------------------------ not supported

/// doc/uri.md: an `nbds` URI requires TLS, so against a server without
/// TLS the client ends the session instead of falling back to plain text.
#[test]
fn nbds_uri_never_falls_back_to_plain_text() {
    let s = nbdkit_tcp(&[], &["memory", "1M"]);
    let port = s.addr().unwrap().port();
    for uri in [
        format!("nbds://127.0.0.1:{port}/"),
        format!("NBDS://127.0.0.1:{port}/x"),
    ] {
        match Client::connect(&uri, Config::default()) {
            Err(e @ Error::Closed(nbd_std::nbd_core::CloseReason::TlsRequired(_))) => {
                assert!(e.to_string().contains("TLS"), "{uri}: {e}");
            }
            other => panic!("{uri}: {other:?}"),
        }
    }
    // The same server is fine without TLS.
    let c = Client::connect(&format!("nbd://127.0.0.1:{port}/"), Config::default()).unwrap();
    assert_eq!(c.get_size().unwrap(), 1 << 20);
}

#[test]
fn vsock_is_unsupported() {
    match Client::connect("nbd+vsock://2:10809/", Config::default()) {
        Err(e @ Error::Unsupported(_)) => assert!(e.to_string().contains("vsock"), "{e}"),
        other => panic!("{other:?}"),
    }
}
