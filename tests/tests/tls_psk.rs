//! TLS-PSK (nbd-driver feature `tls-psk`, on OpenSSL) against nbdkit
//! `--tls-psk` and qemu-nbd `tls-creds-psk`, from both adapters; a wrong
//! user and a wrong key are refused with typed errors. Keys are made by
//! the tests with psktool (tests/src/pki.rs).

use std::path::Path;

use nbd_driver::TlsError;
use nbd_mio::{Event, NbdConnection};
use nbd_std::{Client, CmdFlags, Config, Error};
use nbd_tests::pki::Pki;
use nbd_tests::servers::{make_file, nbdkit_with, qemu_nbd, scratch_dir};

fn psk_uri(user: &str, sock: &Path, keys: &Path) -> String {
    format!(
        "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
        sock.display(),
        keys.display()
    )
}

fn round_trip(c: &mut Client) {
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 241) as u8).collect();
    c.pwrite(&data, 512, CmdFlags::empty()).unwrap();
    let mut back = vec![0u8; data.len()];
    c.pread(&mut back, 512, CmdFlags::empty()).unwrap();
    assert!(back == data, "data differs after the PSK round trip");
}

fn nbdkit_psk(keys: &Path) -> nbd_tests::Server {
    let f = format!("--tls-psk={}", keys.display());
    nbdkit_with(&["--tls=require", &f], &["memory", "1M"])
}

#[test]
fn nbdkit_psk_round_trip() {
    let pki = Pki::new();
    let srv = nbdkit_psk(&pki.psk_file());
    let mut c = Client::connect(
        &psk_uri("alice", srv.socket(), &pki.psk_file()),
        Config::default(),
    )
    .expect("PSK connect");
    assert!(c.tls_negotiated());
    assert_eq!(c.get_size().unwrap(), 1 << 20);
    round_trip(&mut c);
    c.shutdown().unwrap();
}

#[test]
fn nbdkit_psk_from_mio() {
    let pki = Pki::new();
    let srv = nbdkit_psk(&pki.psk_file());
    let mut poll = nbd_mio::mio::Poll::new().unwrap();
    let mut events = nbd_mio::mio::Events::with_capacity(8);
    let mut n = NbdConnection::connect(
        &psk_uri("alice", srv.socket(), &pki.psk_file()),
        Config::default(),
    )
    .unwrap();
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
    assert!(n.tls_negotiated());
}

#[test]
fn wrong_user_and_wrong_key_are_refused() {
    let pki = Pki::new();
    let srv = nbdkit_psk(&pki.psk_file());
    // A user the client has no key for: refused before anything is sent.
    let e = Client::connect(
        &psk_uri("bob", srv.socket(), &pki.psk_file()),
        Config::default(),
    )
    .unwrap_err();
    match e {
        Error::Tls(TlsError::BadCredentials { reason, .. }) => {
            assert!(reason.contains("bob"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // A user the server does not know (the client has a key for it).
    let dir = scratch_dir();
    let other = dir.path().join("bob.psk");
    std::fs::write(&other, format!("bob:{}\n", "ab".repeat(32))).unwrap();
    let e = Client::connect(&psk_uri("bob", srv.socket(), &other), Config::default()).unwrap_err();
    match e {
        Error::Tls(TlsError::PskRejected(m)) => assert!(m.contains("bob"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The right user with a different key.
    let wrong = dir.path().join("alice.psk");
    std::fs::write(&wrong, format!("alice:{}\n", "cd".repeat(32))).unwrap();
    let e =
        Client::connect(&psk_uri("alice", srv.socket(), &wrong), Config::default()).unwrap_err();
    assert!(matches!(e, Error::Tls(TlsError::PskRejected(_))), "{e:?}");
}

#[test]
fn qemu_nbd_psk_round_trip() {
    let pki = Pki::new();
    let data = scratch_dir();
    let img = make_file(data.path(), "p.img", 1 << 20, |_| 0);
    // qemu reads keys.psk from the directory.
    let obj = format!(
        "tls-creds-psk,id=tls1,endpoint=server,dir={}",
        pki.server().display()
    );
    let srv = qemu_nbd(&["--object", &obj, "--tls-creds=tls1"], &img);
    let mut c = Client::connect(
        &psk_uri("alice", srv.socket(), &pki.psk_file()),
        Config::default(),
    )
    .expect("qemu-nbd PSK");
    assert!(c.tls_negotiated());
    round_trip(&mut c);
    c.shutdown().unwrap();
}
