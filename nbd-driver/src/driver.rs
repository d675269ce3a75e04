//! [`Driver`]: moves bytes between a non-blocking [`Transport`] and an
//! [`nbd_core::Connection`], with the retry policy and the counters every
//! adapter shares. It never waits: adapters wait for readiness their own
//! way and call it again.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::Shutdown;

use nbd_core::{Connection, Phase};

use crate::tls::{Stream, TlsError, TlsSettings};
use crate::transport::Transport;

/// Default for [`Driver::set_mid_message_retries`]: 16 calls, a few
/// microseconds. BENCHMARKS.md has the figures: 64 KiB reads from nbdkit's
/// memory plugin went from 0.99 to 1.13 of libnbd's throughput at the same
/// client CPU per byte; 256 KiB writes to nbdkit null from 1.06 to 1.18.
pub const DEFAULT_MID_MESSAGE_RETRIES: u32 = 16;

/// Most slices handed to one vectored write: eight small writes (header
/// and payload each) per system call; what does not fit goes next call.
const MAX_SLICES: usize = 16;

/// Counters of the socket calls a connection made, for diagnostics and
/// benchmarks (system calls per request, how often writes were partial).
/// Read them with [`Driver::stats`] (or the adapter's `io_stats`) at any
/// time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IoStats {
    /// `read` calls that returned data.
    pub reads: u64,
    /// `read` calls that found the socket empty (`WouldBlock`), including
    /// the retries in the middle of a reply.
    pub reads_blocked: u64,
    /// Bytes received.
    pub bytes_read: u64,
    /// Vectored `write` calls that accepted data.
    pub writes: u64,
    /// Of those, the ones that took only part of what was offered.
    pub partial_writes: u64,
    /// `write` calls that found the socket full (`WouldBlock`), including
    /// the retries in the middle of a request.
    pub writes_blocked: u64,
    /// Bytes sent.
    pub bytes_written: u64,
    /// Times the adapter waited for readiness: `poll(2)` calls in nbd-std,
    /// registry calls (`epoll_ctl`) in nbd-mio.
    pub waits: u64,
}

/// Which directions a connection needs readiness for before the driver
/// can make progress again. `None` from [`Driver::interest`] means it
/// needs nothing (it has ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// The core expects bytes from the server.
    pub read: bool,
    /// Output is queued and the transport was full.
    pub write: bool,
}

/// What one call of [`Driver::recv`] or [`Driver::send`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Some bytes moved, or the connection's state changed (end of file, a
    /// failure): the caller has events to look at.
    pub progressed: bool,
    /// It returned before the transport would block (commands completed,
    /// or the write budget was used): no readiness event may announce
    /// what is left, so call it again without waiting.
    pub more: bool,
}

/// When [`Driver::recv`] stops reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecvUntil {
    /// After the first read that completed commands, so the caller can
    /// submit new requests while the server works on the others (the
    /// pipelined turn of event-loop adapters).
    Completion,
    /// After at most this many reads that returned data (or when the
    /// transport would block, or the core expects nothing).
    Reads(u32),
}

/// The one implementation of "move bytes between a non-blocking transport
/// and `nbd_core::Connection`", shared by every adapter.
///
/// An adapter owns a `Connection`, a [`Transport`] and a `Driver`, and on
/// each readiness report calls [`Driver::send`] and [`Driver::recv`],
/// drains the core's events, and waits for
/// [`Driver::interest`] when neither made progress. After the core ends,
/// [`Driver::finish`] sends what it queued last and shuts the transport
/// down; [`Driver::goodbye`] is the polite end for `Drop`.
#[derive(Debug)]
pub struct Driver {
    target: String,
    stats: IoStats,
    mid_message_retries: u32,
    /// The last write found the transport full: wait until writable.
    write_blocked: bool,
    /// Some bytes arrived, so a failure is no longer a connect failure.
    got_bytes: bool,
    /// The transport was shut down after the core ended.
    shut: bool,
    /// A transport handshake (TLS) is running, waiting for this readiness.
    handshake: Option<Interest>,
    /// Why TLS failed, if it did.
    tls_error: Option<TlsError>,
}

impl Driver {
    /// A driver for a transport opened to `target` (a URI, path or address,
    /// used in messages). Create it with the connection.
    pub fn new(target: impl Into<String>) -> Driver {
        Driver {
            target: target.into(),
            stats: IoStats::default(),
            mid_message_retries: DEFAULT_MID_MESSAGE_RETRIES,
            write_blocked: false,
            got_bytes: false,
            shut: false,
            handshake: None,
            tls_error: None,
        }
    }

    /// What the transport was opened to.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The socket-call counters so far.
    pub fn stats(&self) -> IoStats {
        self.stats
    }

    /// Counts one wait for readiness (see [`IoStats::waits`]); adapters
    /// call it when they poll or touch a registry.
    pub fn count_wait(&mut self) {
        self.stats.waits += 1;
    }

    /// Sets how many times a socket call is tried again at once when it
    /// would block in the middle of a message: a read that finds the
    /// transport empty while a reply is partly in, or a write that finds it
    /// full while a request is partly out (default
    /// [`DEFAULT_MID_MESSAGE_RETRIES`], per direction and call; 0 turns
    /// this off). Servers write a reply and read a request as a whole, so
    /// the rest, or room for it, comes within microseconds: a few immediate
    /// retries cost less than a sleep and a wake-up. Nothing is retried
    /// between messages, where the wait can be long.
    pub fn set_mid_message_retries(&mut self, retries: u32) {
        self.mid_message_retries = retries;
    }

    /// The readiness the connection needs now; `None` once it has ended.
    /// Call it after [`Driver::send`] has flushed what it could: queued
    /// output (the core's, or records inside the transport) then means the
    /// transport was full; while a TLS handshake runs, what it waits for.
    pub fn interest<T: Transport + ?Sized>(&self, conn: &Connection, t: &T) -> Option<Interest> {
        if self.shut || conn.is_finished() {
            return None;
        }
        if let Some(i) = self.handshake {
            return Some(i);
        }
        let i = Interest {
            read: conn.wants_read(),
            write: conn.wants_write() || t.pending_output(),
        };
        (i.read || i.write).then_some(i)
    }

    /// Why TLS failed, once it has: the typed cause behind the
    /// connection's [`nbd_core::CloseReason::Transport`] message. Adapters
    /// return it from their connect calls.
    pub fn tls_error(&self) -> Option<&TlsError> {
        self.tls_error.as_ref()
    }

    /// Whether a TLS handshake started by [`Driver::start_tls`] is running.
    pub fn is_handshaking(&self) -> bool {
        self.handshake.is_some()
    }

    /// Starts TLS after the core emitted `Event::StartTls` (the server
    /// acknowledged `NBD_OPT_STARTTLS`): switches `stream` to a TLS
    /// session with `settings` and runs the handshake as far as the socket
    /// allows now; [`Driver::send`] and [`Driver::recv`] carry it on, and
    /// tell the core ([`Connection::tls_established`]) when it completes.
    /// A failure ends the connection, with [`Driver::tls_error`] telling
    /// why.
    pub fn start_tls(
        &mut self,
        conn: &mut Connection,
        stream: &mut Stream,
        settings: &TlsSettings,
    ) {
        match stream.start_tls(settings) {
            Ok(()) => {
                self.handshake = Some(Interest {
                    read: false,
                    write: true,
                });
                self.drive_handshake(conn, stream);
            }
            Err(e) => {
                conn.handle_transport_error(format!("TLS: {e}"));
                self.tls_error = Some(e);
                self.finish(conn, stream);
            }
        }
    }

    /// One step of a running handshake; true if its state changed.
    fn drive_handshake<T: Transport + ?Sized>(&mut self, conn: &mut Connection, t: &mut T) -> bool {
        let Some(before) = self.handshake else {
            return false;
        };
        match t.handshake() {
            Ok(None) => {
                self.handshake = None;
                self.got_bytes = true;
                if conn.tls_established().is_err() && !conn.is_finished() {
                    conn.handle_transport_error(
                        "TLS completed, but the core was not waiting for it",
                    );
                }
                true
            }
            Ok(Some(i)) => {
                self.handshake = Some(i);
                if i.write {
                    self.write_blocked = true;
                }
                i != before
            }
            Err(e) => {
                self.handshake = None;
                self.note_tls(&e);
                let m = match TlsError::from_io(&e) {
                    Some(t) => format!("TLS: {t}"),
                    None => self.failure("TLS handshake", &e),
                };
                conn.handle_transport_error(m);
                self.finish(conn, t);
                true
            }
        }
    }

    fn note_tls(&mut self, e: &io::Error) {
        if self.tls_error.is_none() {
            self.tls_error = TlsError::from_io(e).cloned();
        }
    }

    /// Tells the driver the transport reported writable, so a write that
    /// found it full is tried again.
    pub fn on_writable(&mut self) {
        self.write_blocked = false;
    }

    /// Writes what the core queued, with up to `max_writes` vectored writes
    /// that accept data, until the core has nothing left or the transport
    /// is full (then it waits for [`Driver::on_writable`]). A failure ends
    /// the connection in the core.
    pub fn send<T: Transport + ?Sized>(
        &mut self,
        conn: &mut Connection,
        t: &mut T,
        max_writes: u32,
    ) -> Progress {
        let mut p = Progress::default();
        if self.handshake.is_some() {
            self.write_blocked = false;
            p.progressed = self.drive_handshake(conn, t);
            if self.handshake.is_some() {
                return p;
            }
        }
        if !self.write_blocked && t.pending_output() && !self.shut {
            match t.flush_pending() {
                Ok(()) => p.progressed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    return p;
                }
                Err(e) => {
                    self.note_tls(&e);
                    if !conn.is_finished() {
                        let m = self.failure("write", &e);
                        conn.handle_transport_error(m);
                    }
                    p.progressed = true;
                    return p;
                }
            }
        }
        let mut budget = max_writes;
        let mut retries = self.mid_message_retries;
        while !self.write_blocked && conn.wants_write() && !self.shut {
            if budget == 0 {
                p.more = true;
                break;
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let n = conn.transmit_slices(&mut slices);
            let offered: usize = slices[..n].iter().map(|s| s.len()).sum();
            match t.write_vectored(&slices[..n]) {
                Ok(0) => {
                    conn.handle_transport_error("write: the transport accepted nothing");
                    p.progressed = true;
                    break;
                }
                Ok(k) => {
                    budget -= 1;
                    conn.transmitted(k);
                    p.progressed = true;
                    self.stats.writes += 1;
                    self.stats.bytes_written += k as u64;
                    if k < offered {
                        self.stats.partial_writes += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.writes_blocked += 1;
                    if retries > 0 && conn.request_in_progress() {
                        // The server is reading this request: room for the
                        // rest comes sooner than a readiness report.
                        retries -= 1;
                        continue;
                    }
                    self.write_blocked = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.note_tls(&e);
                    if !conn.is_finished() {
                        let m = self.failure("write", &e);
                        conn.handle_transport_error(m);
                    }
                    p.progressed = true;
                    break;
                }
            }
        }
        p
    }

    /// Reads what the server sent into the core (straight into a read's
    /// own buffer while its payload arrives, with the replies behind it in
    /// the same `readv`), until the transport would block, the core expects
    /// nothing more, or `until` says stop. End of file and failures end
    /// the connection in the core.
    pub fn recv<T: Transport + ?Sized>(
        &mut self,
        conn: &mut Connection,
        t: &mut T,
        until: RecvUntil,
    ) -> Progress {
        let mut p = Progress::default();
        if self.handshake.is_some() {
            p.progressed = self.drive_handshake(conn, t);
            if self.handshake.is_some() {
                return p;
            }
        }
        let mut retries = self.mid_message_retries;
        let mut reads_left = match until {
            RecvUntil::Reads(n) => n,
            RecvUntil::Completion => u32::MAX,
        };
        while conn.wants_read() && !self.shut {
            if reads_left == 0 {
                p.more = true;
                break;
            }
            let in_flight = conn.in_flight();
            // Once a reply has begun, its rest follows within microseconds:
            // trying again at once costs less than a sleep and a wake-up.
            let mid_reply = conn.reply_in_progress();
            let [first, second] = conn.recv_bufs();
            if first.is_empty() {
                // The core always leaves room; never spin if it did not.
                conn.handle_transport_error("receive buffer full: the core cannot progress");
                p.progressed = true;
                break;
            }
            let r = loop {
                let r = if second.is_empty() {
                    t.read(first)
                } else {
                    t.read_vectored(&mut [IoSliceMut::new(first), IoSliceMut::new(second)])
                };
                match r {
                    Err(ref e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.stats.reads_blocked += 1;
                        if !mid_reply || retries == 0 {
                            break r;
                        }
                        retries -= 1;
                    }
                    Err(ref e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => break r,
                }
            };
            match r {
                Ok(0) => {
                    conn.handle_eof();
                    p.progressed = true;
                    break;
                }
                Ok(n) => {
                    self.got_bytes = true;
                    self.stats.reads += 1;
                    self.stats.bytes_read += n as u64;
                    conn.recv_commit(n);
                    p.progressed = true;
                    reads_left -= 1;
                    if conn.in_flight() < in_flight {
                        // A reply means the server took in its request:
                        // the socket has room again. Do not wait for the
                        // writable report, which a Unix socket gives only
                        // once three quarters of its buffer drained.
                        self.write_blocked = false;
                        if until == RecvUntil::Completion {
                            p.more = conn.wants_read();
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.note_tls(&e);
                    let m = match TlsError::from_io(&e) {
                        Some(t) => format!("TLS: {t}"),
                        None => self.failure("read", &e),
                    };
                    conn.handle_transport_error(m);
                    p.progressed = true;
                    break;
                }
            }
        }
        if t.buffered_input() && conn.wants_read() && !self.shut {
            // The socket will not announce these bytes: read on first.
            p.more = true;
        }
        p
    }

    fn failure(&self, what: &str, e: &io::Error) -> String {
        if self.got_bytes {
            format!("{what}: {e}")
        } else {
            format!("connecting to {}: {e}", self.target)
        }
    }

    /// After `NBD_CMD_DISC` or `NBD_OPT_ABORT` has gone out: shuts the
    /// transport down for writing (as libnbd does), so a server that waits
    /// for the client's end of file closes and the wait for it ends.
    pub fn shutdown_write<T: Transport + ?Sized>(&mut self, conn: &Connection, t: &mut T) {
        if !conn.wants_write() && !self.shut {
            let _ = t.shutdown(Shutdown::Write);
        }
    }

    /// Once the core has ended: one last try to send what it queued (an
    /// `NBD_OPT_ABORT`, a `NBD_CMD_DISC`), then shuts the transport down so
    /// the server sees end of file. Does nothing before the end, or twice.
    pub fn finish<T: Transport + ?Sized>(&mut self, conn: &mut Connection, t: &mut T) {
        if self.shut || !conn.is_finished() {
            return;
        }
        if conn.wants_write() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let n = conn.transmit_slices(&mut slices);
            if let Ok(k) = t.write_vectored(&slices[..n]) {
                conn.transmitted(k);
            }
        }
        let _ = t.shutdown(Shutdown::Both);
        self.shut = true;
    }

    /// The polite end for an adapter's `Drop`: with nothing in flight,
    /// queues `NBD_CMD_DISC` (ready) or `NBD_OPT_ABORT` (negotiating) and
    /// sends what the transport takes without waiting; then shuts it down.
    pub fn goodbye<T: Transport + ?Sized>(&mut self, conn: &mut Connection, t: &mut T) {
        if !self.shut && conn.in_flight() == 0 {
            let queued = match conn.phase() {
                Phase::Ready => conn.disconnect().is_ok(),
                Phase::Negotiating => conn.opt_abort().is_ok(),
                _ => false,
            };
            if queued {
                self.write_blocked = false;
                self.send(conn, t, u32::MAX);
            }
        }
        if !self.shut {
            let _ = t.shutdown(Shutdown::Both);
            self.shut = true;
        }
    }
}
