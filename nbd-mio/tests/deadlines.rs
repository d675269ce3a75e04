//! nbd-mio's timers on a real event loop: a command deadline and a cancel
//! against nbdkit's delay filter (the late replies are dropped and the
//! connection goes on with the right data), and the handshake deadlines of
//! two connections folded into one `Poll::poll` timeout.

mod common;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::Harness;
use mio::{Events, Poll, Token};
use nbd_mio::{CloseReason, CmdFlags, CommandError, Config, Event, NbdConnection};
use nbd_tests::{nbdkit_with, scratch_dir};

/// nbdkit's pattern plugin: each 8-byte word is its own offset, big-endian.
fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| (o & !7).to_be_bytes()[(o & 7) as usize])
        .collect()
}

#[test]
fn a_deadline_and_a_cancel_under_the_delay_filter() {
    let server = nbdkit_with(&["--filter=delay"], &["pattern", "1M", "rdelay=1"]);
    let mut h = Harness::new(NbdConnection::connect(&server.uri(), Config::default()).unwrap());
    loop {
        match h.next_event_timed() {
            Event::GoSucceeded(_) => break,
            Event::Closed(r) => panic!("{r}"),
            _ => {}
        }
    }
    let t = Instant::now();
    let a = h
        .nbd
        .read(0, BytesMut::zeroed(4096), CmdFlags::empty())
        .unwrap();
    h.nbd
        .set_deadline(a, Some(t + Duration::from_millis(300)))
        .unwrap();
    let b = h
        .nbd
        .read(8192, BytesMut::zeroed(4096), CmdFlags::empty())
        .unwrap();
    let c = h
        .nbd
        .read(16384, BytesMut::zeroed(4096), CmdFlags::empty())
        .unwrap();
    h.nbd.cancel(c).unwrap();
    let mut done = Vec::new();
    while done.len() < 3 {
        if let Event::CommandDone {
            cookie,
            result,
            buffer,
        } = h.next_event_timed()
        {
            done.push((cookie, result, buffer, t.elapsed()));
        }
    }
    // The cancel first (at once), then the timeout, then the read that waited.
    assert_eq!(done[0].0, c);
    assert!(matches!(done[0].1, Err(CommandError::Cancelled { .. })));
    assert_eq!(done[1].0, a);
    assert!(matches!(done[1].1, Err(CommandError::TimedOut { .. })));
    assert!(done[1].3 >= Duration::from_millis(300) && done[1].3 < Duration::from_millis(900));
    assert!(
        done[1].2.as_ref().unwrap().iter().all(|&x| x == 0),
        "untouched"
    );
    assert_eq!(done[2].0, b);
    assert!(done[2].1.is_ok());
    assert_eq!(
        &done[2].2.as_ref().unwrap()[..],
        &pattern_at(8192, 4096)[..]
    );
    // The late replies of a and c arrive and are dropped.
    while h.nbd.in_flight() > 0 {
        assert!(
            h.nbd.poll_event().is_none(),
            "no event for abandoned requests"
        );
        h.turn_timed();
    }
    assert_eq!(h.nbd.conn().abandoned(), 0);
    // The connection goes on.
    let d = h
        .nbd
        .read(65536, BytesMut::zeroed(512), CmdFlags::empty())
        .unwrap();
    match h.next_event_timed() {
        Event::CommandDone {
            cookie,
            result: Ok(()),
            buffer: Some(buf),
        } if cookie == d => {
            assert_eq!(&buf[..], &pattern_at(65536, 512)[..]);
        }
        other => panic!("{other:?}"),
    }
    h.nbd.disconnect().unwrap();
    assert!(matches!(
        h.next_event_timed(),
        Event::Closed(CloseReason::Disconnected)
    ));
}

#[test]
fn next_deadline_folds_the_handshake_deadlines_of_many_connections() {
    let dir = scratch_dir();
    let path = dir.path().join("silent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(8);
    let mut conns: Vec<NbdConnection> = [300u64, 600]
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let mut cfg = Config::default();
            cfg.handshake_timeout = Some(Duration::from_millis(*ms));
            let mut c = NbdConnection::connect_unix(&path, cfg).unwrap();
            c.register(poll.registry(), Token(i)).unwrap();
            c
        })
        .collect();
    let t = Instant::now();
    let first = nbd_mio::next_deadline(conns.iter_mut()).unwrap();
    assert!(first <= t + Duration::from_millis(300));
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let timeout = nbd_mio::poll_timeout_until(nbd_mio::next_deadline(conns.iter_mut()));
        poll.poll(&mut events, timeout).unwrap();
        for c in conns.iter_mut() {
            c.handle_timeout(Instant::now());
        }
        for (i, c) in conns.iter_mut().enumerate() {
            while let Some(ev) = c.poll_event() {
                if let Event::Closed(r) = ev {
                    assert!(matches!(r, CloseReason::HandshakeTimedOut { .. }), "{r}");
                    assert!(r.to_string().contains("greeting"));
                    ended.push((i, t.elapsed()));
                }
            }
        }
    }
    assert_eq!(ended[0].0, 0);
    assert!(ended[0].1 >= Duration::from_millis(300));
    assert!(ended[1].1 >= Duration::from_millis(600) && ended[1].1 < Duration::from_secs(3));
    assert_eq!(nbd_mio::next_deadline(conns.iter_mut()), None);
}
