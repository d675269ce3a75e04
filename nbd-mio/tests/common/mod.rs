//! Test support: an nbdkit child process in a private directory, and a
//! small mio loop around one [`NbdConnection`].

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use nbd_mio::{Event, NbdConnection};

/// How long any single wait may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);

/// An `nbdkit -f` child serving on a Unix socket in its own directory;
/// killed (by its PID, through the `Child`) and cleaned up on drop.
pub struct Nbdkit {
    child: Child,
    dir: PathBuf,
    /// The server's socket.
    pub sock: PathBuf,
}

impl Nbdkit {
    /// Starts `nbdkit --exit-with-parent -f -U SOCK -P PIDFILE ARGS...` and
    /// waits until it wrote its pid file (it is listening then).
    pub fn start(args: &[&str]) -> Nbdkit {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbd-mio-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let sock = dir.join("nbd.sock");
        let pidfile = dir.join("nbd.pid");
        let mut child = Command::new("nbdkit")
            .arg("--exit-with-parent")
            .arg("-f")
            .arg("-U")
            .arg(&sock)
            .arg("-P")
            .arg(&pidfile)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("nbdkit must be installed to run these tests");
        let t0 = Instant::now();
        loop {
            if std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<u32>().is_ok()) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nbdkit exited early: {status}");
            }
            assert!(t0.elapsed() < TIMEOUT, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Nbdkit { child, dir, sock }
    }

    /// The `nbd+unix://` URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
