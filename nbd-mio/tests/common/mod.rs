//! Test support: a small mio loop around one [`NbdConnection`]. Servers
//! come from nbd-tests' launchers ([`nbd_tests::nbdkit`]).

#![allow(dead_code)]

use std::time::Duration;

use mio::{Events, Poll, Token};
use nbd_mio::{Event, NbdConnection};

/// How long any single wait may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The token of the connection under test.
pub const NBD: Token = Token(7);

/// A mio `Poll` driving one connection, the way an embedder would.
pub struct Harness {
    poll: Poll,
    events: Events,
    /// The connection under test.
    pub nbd: NbdConnection,
}

impl Harness {
    /// Registers `nbd` on a new `Poll`.
    pub fn new(mut nbd: NbdConnection) -> Harness {
        let poll = Poll::new().expect("mio Poll");
        nbd.register(poll.registry(), NBD).expect("register");
        Harness {
            poll,
            events: Events::with_capacity(16),
            nbd,
        }
    }

    /// One turn of the loop: send what is queued and update the interest,
    /// wait for readiness, hand every event of our token to the connection.
    pub fn turn(&mut self) {
        self.poll
            .poll(&mut self.events, Some(TIMEOUT))
            .expect("poll");
        assert!(!self.events.is_empty(), "no readiness within {TIMEOUT:?}");
        for ev in self.events.iter() {
            assert_eq!(ev.token(), NBD);
            self.nbd.handle_event(ev);
        }
    }

    /// One turn of the loop with the timers, the way the crate docs show:
    /// sleep until readiness or the connection's next deadline, hand over
    /// the events, then the time.
    pub fn turn_timed(&mut self) {
        let due = self.nbd.poll_timeout();
        let timeout = nbd_mio::poll_timeout_until(due).map_or(TIMEOUT, |t| t.min(TIMEOUT));
        self.poll
            .poll(&mut self.events, Some(timeout))
            .expect("poll");
        for ev in self.events.iter() {
            assert_eq!(ev.token(), NBD);
            self.nbd.handle_event(ev);
        }
        self.nbd.handle_timeout(std::time::Instant::now());
    }

    /// The next core event, with the timers running.
    pub fn next_event_timed(&mut self) -> Event {
        loop {
            if let Some(ev) = self.nbd.poll_event() {
                return ev;
            }
            self.turn_timed();
        }
    }

    /// The next core event, turning the loop as long as needed.
    pub fn next_event(&mut self) -> Event {
        loop {
            if let Some(ev) = self.nbd.poll_event() {
                return ev;
            }
            assert!(
                !self.nbd.is_finished(),
                "connection ended without a further event: {:?}",
                self.nbd.conn().close_reason()
            );
            self.turn();
        }
    }

    /// Polls once without reregistering, waiting at most `timeout`; hands
    /// the events to the connection and returns how many there were.
    pub fn poll_only(&mut self, timeout: Duration) -> usize {
        self.poll
            .poll(&mut self.events, Some(timeout))
            .expect("poll");
        let mut n = 0;
        for ev in self.events.iter() {
            assert_eq!(ev.token(), NBD);
            self.nbd.handle_event(ev);
            n += 1;
        }
        n
    }

    /// Turns the loop until `done` holds; any event on the way fails the test.
    pub fn run_until(&mut self, done: impl Fn(&NbdConnection) -> bool) {
        while !done(&self.nbd) {
            if let Some(ev) = self.nbd.poll_event() {
                panic!("unexpected event {ev:?}");
            }
            self.turn();
        }
    }
}

/// Test data: a byte pattern that differs per offset and per `seed`.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let o = offset + i;
            (o ^ (o >> 8) ^ (o >> 16)) as u8 ^ seed
        })
        .collect()
}
