//! [`Client`]: one NBD connection over a Unix or TCP socket, driven by
//! `nbd-core`, with libnbd's blocking API and a pipelined (aio) API.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_core::{
    BlockSize, CloseReason, CmdFlags, Config, Connection, Cookie, Event, ExportInfo, Extent,
    OptionKind, Phase, Protocol, ReadChunkKind, UsageError,
};
use nbd_driver::{Completion, Connected, Demux, Driver, RecvUntil, Socket, Subprocess};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::error::{Error, Result};

/// Reads per turn before queued requests get a look in (each read takes
/// as much as the socket holds, up to the receive buffer).
const READS_PER_TURN: u32 = 16;

/// One blocking NBD connection with libnbd's API shape.
///
/// Create it with [`Client::connect`] (a Unix socket path or an NBD URI),
/// [`Client::connect_unix`], [`Client::connect_tcp`] or [`Client::connect_uri`].
/// Without option mode, it returns once the export is ready; with
/// [`Config::opt_mode`], it stops in the negotiating phase and the `opt_*`
/// calls drive negotiation.
///
/// # After the connection ended
///
/// The connection ends cleanly ([`Client::shutdown`], [`Client::opt_abort`]:
/// [`Phase::Closed`], [`CloseReason::Disconnected`] or
/// [`CloseReason::Aborted`]) or not (the server hung up or broke the
/// protocol, the socket failed: [`Phase::Dead`]). When it ends unexpectedly,
/// a call waiting for the server returns [`Error::Closed`] and a command in
/// flight completes with [`nbd_core::CommandError::ConnectionClosed`]. From then on,
/// after either kind of end, every call that needs the connection (the
/// `opt_*` calls, [`Client::set_export_name`], and every command, `aio_*` or
/// blocking) fails at once with [`Error::Closed`] carrying
/// [`Connection::close_reason`], whatever its arguments, and sends nothing;
/// like libnbd, which reports any call on a closed or dead handle as an
/// invalid state. [`Client::shutdown`] is the exception: it returns `Ok(())`
/// again after a clean end (and `Error::Closed` otherwise).
///
/// While the connection is alive, a call in the wrong phase is an
/// [`Error::Usage`] with [`UsageError::WrongPhase`]: an `opt_*` call after
/// `opt_go`, a command in option mode, or a command after `NBD_CMD_DISC` was
/// queued (by [`Client::shutdown`], or by the client itself after an
/// `ESHUTDOWN` reply) but before the server closed.
#[derive(Debug)]
pub struct Client {
    conn: Connection,
    socket: Socket,
    driver: Driver,
    demux: Demux,
    listed: Vec<(String, String)>,
    contexts: Vec<String>,
    opt_result: Option<std::result::Result<OptionKind, Error>>,
    went: bool,
    unsupported: Option<String>,
    spare: Option<BytesMut>,
    /// The server process this client started, if any: declared after
    /// `socket`, so the socket closes first and the server can exit.
    process: Option<Subprocess>,
    /// Chunk callbacks of structured reads in flight (`aio_pread_structured`).
    chunk_fns: HashMap<Cookie, ChunkFn>,
    /// The structured read a blocking `pread_structured` waits for, and its
    /// chunks reported since the caller's callback last ran (at most one
    /// turn of the I/O loop's worth).
    own_read: Option<Cookie>,
    own_chunks: Vec<(u64, u64, ReadChunkKind)>,
}

/// A chunk callback of [`Client::aio_pread_structured`].
struct ChunkFn(Box<dyn FnMut(u64, u64, ReadChunkKind) + Send>);

impl std::fmt::Debug for ChunkFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkFn")
    }
}

impl Client {
    /// Connects to `target`: an NBD URI (`nbd://`, `nbd+unix://`) or a Unix
    /// socket path, and runs the handshake (to the transmission phase, or
    /// to option mode with [`Config::opt_mode`]). The URI's export name
    /// overrides `cfg.export_name`.
    ///
    /// [`Config::handshake_timeout`] (30 s by default) bounds the whole
    /// call, the TCP connect included; when it passes the call fails with
    /// [`Error::Closed`] carrying
    /// [`CloseReason::HandshakeTimedOut`] (or an [`Error::Io`] of kind
    /// `TimedOut` from the TCP connect), and [`Error::io_kind`] is
    /// `TimedOut` either way.
    pub fn connect(target: &str, mut cfg: Config) -> Result<Client> {
        let start = Instant::now();
        let c = nbd_driver::connect(target, &mut cfg)?;
        Client::handshake_connected(c, cfg, start)
    }

    /// Connects to an NBD URI (the export name comes from the URI) and runs
    /// the handshake, within [`Config::handshake_timeout`] as
    /// [`Client::connect`]. TLS URIs are refused with [`Error::Unsupported`]
    /// before anything is sent.
    pub fn connect_uri(uri: &str, mut cfg: Config) -> Result<Client> {
        let start = Instant::now();
        let c = nbd_driver::connect_uri(uri, &mut cfg)?;
        Client::handshake_connected(c, cfg, start)
    }

    /// Connects to a Unix domain socket (a leading NUL byte names a Linux
    /// abstract socket) and runs the handshake, within
    /// [`Config::handshake_timeout`].
    pub fn connect_unix(path: impl AsRef<Path>, cfg: Config) -> Result<Client> {
        let start = Instant::now();
        let path = path.as_ref();
        let s = nbd_driver::connect_unix(path)?;
        Client::handshake(s, path.display().to_string(), cfg, start)
    }

    /// Connects over TCP, trying every address `addr` resolves to (with
    /// `TCP_NODELAY`), and runs the handshake, all within
    /// [`Config::handshake_timeout`].
    pub fn connect_tcp(addr: impl std::net::ToSocketAddrs, cfg: Config) -> Result<Client> {
        let start = Instant::now();
        let s = nbd_driver::connect::connect_tcp_within(addr, cfg.handshake_timeout)?;
        let target = s.peer_description();
        Client::handshake(s, target, cfg, start)
    }

    /// Runs an NBD client over an already connected Unix stream (for
    /// example one end of a socket pair).
    pub fn connect_socket(s: std::os::unix::net::UnixStream, cfg: Config) -> Result<Client> {
        let s = Socket::from_unix(s).map_err(|e| Error::Io {
            context: "set_nonblocking".into(),
            source: e,
        })?;
        Client::handshake(s, "socket".into(), cfg, Instant::now())
    }

    /// Runs an NBD client over a connected stream socket given as a file
    /// descriptor (Unix or TCP; libnbd's `nbd_connect_socket`); the client
    /// owns it from now on.
    pub fn connect_fd(fd: std::os::fd::OwnedFd, cfg: Config) -> Result<Client> {
        let s = Socket::from_fd(fd).map_err(|e| Error::Io {
            context: "adopt socket".into(),
            source: e,
        })?;
        let target = s.peer_description();
        Client::handshake(s, target, cfg, Instant::now())
    }

    /// Starts `argv` (program and arguments) as a server speaking NBD on
    /// its stdin and stdout, such as `["nbdkit", "-s", "memory", "1M"]`,
    /// and runs the handshake over a socket pair (libnbd's
    /// `nbd_connect_command`). The server is stopped and reaped when the
    /// client is dropped ([`nbd_driver::Subprocess`]).
    pub fn connect_command(argv: &[impl AsRef<std::ffi::OsStr>], cfg: Config) -> Result<Client> {
        let start = Instant::now();
        let c = nbd_driver::connect_command(argv)?;
        Client::handshake_connected(c, cfg, start)
    }

    /// Starts `argv` with systemd socket activation (a listening socket
    /// as fd 3, `LISTEN_PID`, `LISTEN_FDS=1`), as libnbd's
    /// `nbd_connect_systemd_socket_activation` does, for servers such as
    /// `["qemu-nbd", "-f", "raw", "disk.img"]` or `["nbdkit", "memory",
    /// "1M"]`, and runs the handshake. The server is stopped and reaped
    /// when the client is dropped.
    pub fn connect_systemd_socket_activation(
        argv: &[impl AsRef<std::ffi::OsStr>],
        cfg: Config,
    ) -> Result<Client> {
        let start = Instant::now();
        let c = nbd_driver::connect_socket_activation(argv, None)?;
        Client::handshake_connected(c, cfg, start)
    }

    /// The process ID of the server this client started
    /// ([`Client::connect_command`],
    /// [`Client::connect_systemd_socket_activation`]), if any.
    pub fn subprocess_pid(&self) -> Option<u32> {
        self.process.as_ref().map(Subprocess::pid)
    }

    fn handshake_connected(c: Connected, cfg: Config, start: Instant) -> Result<Client> {
        let mut process = c.process;
        Client::handshake_with(c.socket, c.target, cfg, start, &mut process)
    }

    fn handshake(socket: Socket, target: String, cfg: Config, start: Instant) -> Result<Client> {
        Client::handshake_with(socket, target, cfg, start, &mut None)
    }

    /// `start`: when the connect began, which the handshake deadline
    /// counts from.
    fn handshake_with(
        socket: Socket,
        target: String,
        cfg: Config,
        start: Instant,
        process: &mut Option<Subprocess>,
    ) -> Result<Client> {
        let demux = Demux::with_capacity(cfg.limits.max_in_flight);
        let deadline = cfg.handshake_timeout.and_then(|d| start.checked_add(d));
        let mut conn = Connection::new(cfg, Instant::now());
        conn.set_handshake_deadline(deadline);
        let mut c = Client {
            conn,
            socket,
            driver: Driver::new(target),
            demux,
            listed: Vec::new(),
            contexts: Vec::new(),
            opt_result: None,
            went: false,
            unsupported: None,
            spare: None,
            process: process.take(),
            chunk_fns: HashMap::new(),
            own_read: None,
            own_chunks: Vec::new(),
        };
        let r = c.run_until(|c| c.conn.phase() != Phase::Connecting);
        // A server may close right after GO (the export is known by then):
        // like libnbd, the connect succeeded; later calls report the close.
        let lost = c.conn.close_reason().is_none_or(|r| r.is_loss());
        if c.went && !lost {
            return Ok(c);
        }
        r?;
        c.check_open()?;
        Ok(c)
    }

    /// What this client connected to (the URI or socket path given).
    pub fn target(&self) -> &str {
        self.driver.target()
    }

    /// Counters of the socket calls made so far (reads, writes, polls).
    pub fn io_stats(&self) -> nbd_driver::IoStats {
        self.driver.stats()
    }

    /// Sets how many times a socket call is retried at once in the middle
    /// of a message before waiting in `poll(2)` (see
    /// [`nbd_driver::Driver::set_mid_message_retries`]).
    pub fn set_mid_message_retries(&mut self, retries: u32) {
        self.driver.set_mid_message_retries(retries);
    }

    /// The core state machine (for getters not mirrored here).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    // ----- deadlines and cancellation -----

    /// Sets the deadline of every command submitted from now on (`None`:
    /// no deadline, the default), replacing [`Config::command_timeout`].
    /// A blocking command that misses it fails with
    /// [`nbd_core::CommandError::TimedOut`] ([`Error::io_kind`] `TimedOut`)
    /// and the connection stays usable; an aio command completes with that
    /// error. The server may still carry out a command that timed out (a
    /// write may be applied later); its late reply is dropped. To end the
    /// connection on a timeout instead, set [`Config::on_command_timeout`].
    pub fn set_command_timeout(&mut self, timeout: Option<Duration>) {
        self.conn.set_command_timeout(timeout);
    }

    /// Gives one aio command a deadline (`None` removes it). Fails with
    /// [`UsageError::NotInFlight`] once the command completed.
    pub fn aio_set_deadline(&mut self, cookie: Cookie, deadline: Option<Instant>) -> Result<()> {
        Ok(self.conn.set_deadline(cookie, deadline)?)
    }

    /// Cancels an aio command: it completes at once with
    /// [`nbd_core::CommandError::Cancelled`] (retire it with
    /// [`Client::aio_command_completed`] or [`Client::wait`]), its buffer
    /// comes back in the [`Completion`], and the server's late reply is
    /// dropped. The server may still carry the command out. Fails with
    /// [`UsageError::NotInFlight`] once the command completed.
    pub fn aio_cancel(&mut self, cookie: Cookie) -> Result<()> {
        self.conn.cancel(cookie)?;
        self.dispatch();
        Ok(())
    }

    /// Ends the connection at once, without a goodbye: every command in
    /// flight completes with [`nbd_core::CommandError::ConnectionClosed`]
    /// and later calls fail with [`Error::Closed`]
    /// ([`CloseReason::AbortedByCaller`]). For giving up on a server that
    /// stopped answering; the polite end is [`Client::shutdown`].
    pub fn abort(&mut self, reason: &str) {
        self.conn.abort(reason);
        self.dispatch();
        self.driver.finish(&mut self.conn, &mut self.socket);
    }

    /// Acts on the deadlines that are due (reads the clock only when one is
    /// pending); true if that was done, so the caller's condition may hold
    /// now.
    fn tick(&mut self) -> bool {
        if let Some(due) = self.conn.poll_timeout() {
            let now = Instant::now();
            if due <= now {
                self.conn.handle_timeout(now);
                self.dispatch();
                return true;
            }
        }
        false
    }

    // ----- the I/O loop -----

    fn check_open(&self) -> Result<()> {
        if let Some(m) = &self.unsupported {
            return Err(Error::Unsupported(m.clone()));
        }
        match self.conn.close_reason() {
            Some(r) if !r.is_clean() || self.conn.phase() != Phase::Closed => {
                Err(Error::Closed(r.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Sends what is queued, reads what arrived, and handles events; blocks
    /// in poll(2) only if nothing could be done and `block` is set, and
    /// then not past the next deadline of the core or `until`.
    fn pump(&mut self, block: bool, until: Option<Instant>) -> Result<()> {
        self.pump_reads(block, until, READS_PER_TURN)
    }

    /// [`Client::pump`] with at most `reads` socket reads before the events
    /// are handled.
    fn pump_reads(&mut self, block: bool, until: Option<Instant>, reads: u32) -> Result<()> {
        if self.tick() {
            // A deadline passed: let the caller look before any wait.
            self.driver.finish(&mut self.conn, &mut self.socket);
            return Ok(());
        }
        let w = self.driver.send(&mut self.conn, &mut self.socket, u32::MAX);
        let r = self
            .driver
            .recv(&mut self.conn, &mut self.socket, RecvUntil::Reads(reads));
        self.dispatch();
        self.driver.finish(&mut self.conn, &mut self.socket);
        if w.progressed || r.progressed || r.more || !block {
            return Ok(());
        }
        let Some(interest) = self.driver.interest(&self.conn) else {
            return Ok(());
        };
        let mut flags = PollFlags::empty();
        if interest.read {
            flags |= PollFlags::IN;
        }
        if interest.write {
            flags |= PollFlags::OUT;
        }
        let due = match (self.conn.poll_timeout(), until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = match due {
            Some(due) => match due.checked_duration_since(Instant::now()) {
                // Round up: waking a little early would spin.
                Some(d) if !d.is_zero() => Some(
                    Timespec::try_from(d + Duration::from_micros(999)).unwrap_or(Timespec {
                        tv_sec: i64::MAX,
                        tv_nsec: 0,
                    }),
                ),
                _ => return Ok(()), // due now: the caller's loop ticks
            },
            None => None,
        };
        self.driver.count_wait();
        let mut fds = [PollFd::new(&self.socket, flags)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {
                if fds[0]
                    .revents()
                    .intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP)
                {
                    self.driver.on_writable();
                }
                Ok(())
            }
            Err(e) => Err(Error::Io {
                context: "poll".into(),
                source: e.into(),
            }),
        }
    }

    fn dispatch(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            if let Event::CommandDone { cookie, .. } = &ev {
                self.chunk_fns.remove(cookie);
            }
            let Some(ev) = self.demux.handle(ev) else {
                continue;
            };
            match ev {
                Event::ReadChunk {
                    cookie,
                    offset,
                    length,
                    kind,
                } => self.deliver_chunk(cookie, offset, length, kind),
                Event::ExportListed { name, description } => self.listed.push((name, description)),
                Event::MetaContext { name, .. } => self.contexts.push(name),
                Event::OptionSucceeded(k) => self.opt_result = Some(Ok(k)),
                Event::OptionError { option, error } => {
                    self.opt_result = Some(Err(Error::Option { option, error }))
                }
                Event::StartTls => {
                    self.unsupported = Some("TLS is not supported by this client yet".into());
                    self.driver
                        .refuse_start_tls(&mut self.conn, &mut self.socket);
                }
                Event::GoSucceeded(_) => self.went = true,
                _ => {}
            }
        }
    }

    /// Hands a read chunk to its read's callback, or to the blocking
    /// `pread_structured` waiting for it; nothing else keeps it.
    fn deliver_chunk(&mut self, cookie: Cookie, offset: u64, length: u64, kind: ReadChunkKind) {
        if let Some(f) = self.chunk_fns.get_mut(&cookie) {
            (f.0)(offset, length, kind);
        } else if self.own_read == Some(cookie) {
            self.own_chunks.push((offset, length, kind));
        }
    }

    fn run_until(&mut self, f: impl FnMut(&Client) -> bool) -> Result<()> {
        self.run_until_by(None, f)
    }

    /// [`Client::run_until`], giving up at `until` (the core's own
    /// deadlines apply either way): the connection is then aborted and the
    /// result is [`Error::Closed`] with [`CloseReason::AbortedByCaller`].
    fn run_until_by(
        &mut self,
        until: Option<Instant>,
        mut f: impl FnMut(&Client) -> bool,
    ) -> Result<()> {
        loop {
            // Events a command queued without I/O (a repeated
            // STRUCTURED_REPLY / EXTENDED_HEADERS succeeds at once) must be
            // seen before blocking in poll(2), or the call never returns.
            self.dispatch();
            if f(self) {
                return Ok(());
            }
            if self.conn.is_finished() {
                return self.check_open().and(Err(Error::Closed(
                    self.conn
                        .close_reason()
                        .cloned()
                        .unwrap_or(CloseReason::Aborted),
                )));
            }
            if until.is_some_and(|t| t <= Instant::now()) {
                self.abort("timed out waiting for the server to finish");
                let reason = self.conn.close_reason().cloned();
                return Err(Error::Closed(reason.unwrap_or(CloseReason::Aborted)));
            }
            self.pump(true, until)?;
        }
    }

    // ----- option mode -----

    /// The one policy for calls that need the connection (the `opt_*`
    /// calls, `set_export_name` and every command): once the connection has
    /// ended, cleanly ([`Phase::Closed`]) or not ([`Phase::Dead`]), they fail
    /// with [`Error::Closed`] carrying the close reason, before any argument
    /// check and without sending anything. While the connection is alive the
    /// core judges the call, so a wrong phase stays
    /// [`UsageError::WrongPhase`].
    fn refuse_if_ended(&self) -> Result<()> {
        match self.conn.close_reason() {
            Some(reason) if self.conn.is_finished() => Err(Error::Closed(reason.clone())),
            _ => Ok(()),
        }
    }

    fn run_option(&mut self) -> Result<OptionKind> {
        self.opt_result = None;
        self.run_until(|c| c.opt_result.is_some())?;
        let r = self
            .opt_result
            .take()
            .unwrap_or(Err(Error::Closed(CloseReason::Aborted)));
        if r.is_err() {
            // An older server may hang up right after a failure: notice it now
            // if it already did.
            let _ = self.pump(false, None);
        }
        r
    }

    /// Changes the export that `opt_go`/`opt_info` will name (option mode).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn set_export_name(&mut self, name: &str) -> Result<()> {
        self.refuse_if_ended()?;
        Ok(self.conn.set_export_name(name)?)
    }

    /// The export name that will be (or was) requested.
    pub fn export_name(&self) -> &str {
        &self.conn.config().export_name
    }

    /// Lists the server's exports as (name, description) (`NBD_OPT_LIST`).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_list(&mut self) -> Result<Vec<(String, String)>> {
        self.refuse_if_ended()?;
        self.listed.clear();
        self.conn.opt_list()?;
        self.run_option()?;
        Ok(std::mem::take(&mut self.listed))
    }

    /// Asks about the current export without entering transmission
    /// (`NBD_OPT_INFO`); the getters then report it.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_info(&mut self) -> Result<()> {
        self.refuse_if_ended()?;
        self.conn.opt_info()?;
        self.run_option().map(|_| ())
    }

    /// Selects the current export and enters the transmission phase
    /// (`NBD_OPT_GO`, or `NBD_OPT_EXPORT_NAME` as fallback).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_go(&mut self) -> Result<()> {
        self.refuse_if_ended()?;
        self.went = false;
        self.opt_result = None;
        self.conn.opt_go()?;
        self.run_until(|c| c.went || c.opt_result.is_some())?;
        if self.went {
            return Ok(());
        }
        let r = self.opt_result.take();
        let _ = self.pump(false, None);
        match r {
            Some(Err(e)) => Err(e),
            _ => self.check_open(),
        }
    }

    /// Ends negotiation politely (`NBD_OPT_ABORT`) and closes.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_abort(&mut self) -> Result<()> {
        self.refuse_if_ended()?;
        self.conn.opt_abort()?;
        let until = self.goodbye_deadline();
        self.finish_writes_by(until);
        let _ = self.run_until_by(until, |c| c.conn.is_finished());
        self.check_open()
    }

    /// After `NBD_CMD_DISC` or `NBD_OPT_ABORT`: sends what is queued, then
    /// shuts the socket down for writing (as libnbd does), so a server that
    /// waits for the client's EOF cannot leave the wait for its close hanging.
    fn finish_writes_by(&mut self, until: Option<Instant>) {
        let _ = self.run_until_by(until, |c| !c.conn.wants_write() || c.conn.is_finished());
        self.driver.shutdown_write(&self.conn, &mut self.socket);
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: true if the server agreed.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_structured_reply(&mut self) -> Result<bool> {
        self.refuse_if_ended()?;
        self.conn.opt_structured_reply()?;
        refused_is_false(self.run_option())
    }

    /// `NBD_OPT_EXTENDED_HEADERS`: true if the server agreed.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_extended_headers(&mut self) -> Result<bool> {
        self.refuse_if_ended()?;
        self.conn.opt_extended_headers()?;
        refused_is_false(self.run_option())
    }

    /// `NBD_OPT_LIST_META_CONTEXT` with these queries (empty = all).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_list_meta_context<S: AsRef<str>>(&mut self, queries: &[S]) -> Result<Vec<String>> {
        self.refuse_if_ended()?;
        self.contexts.clear();
        self.conn.opt_list_meta_context(queries)?;
        self.run_option()?;
        Ok(std::mem::take(&mut self.contexts))
    }

    /// `NBD_OPT_SET_META_CONTEXT` with these queries; returns what was selected.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn opt_set_meta_context<S: AsRef<str>>(&mut self, queries: &[S]) -> Result<Vec<String>> {
        self.refuse_if_ended()?;
        self.contexts.clear();
        self.conn.opt_set_meta_context(queries)?;
        self.run_option()?;
        Ok(std::mem::take(&mut self.contexts))
    }

    // ----- getters -----

    fn info(&self) -> Result<&ExportInfo> {
        self.conn.export_info().ok_or_else(|| {
            Error::Usage(UsageError::WrongPhase {
                call: "get_size",
                needed: "connected, or after opt_info",
                actual: self.conn.phase().name(),
            })
        })
    }

    /// Everything the server said about the export.
    pub fn export_info(&self) -> Result<&ExportInfo> {
        self.info()
    }

    /// Export size in bytes.
    pub fn get_size(&self) -> Result<u64> {
        Ok(self.info()?.size)
    }

    /// Block-size constraints, if the server sent valid ones.
    pub fn get_block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self.info()?.block_size)
    }

    /// The canonical export name (`NBD_INFO_NAME`), if sent.
    pub fn get_canonical_export_name(&self) -> Result<Option<String>> {
        Ok(self.info()?.canonical_name.clone())
    }

    /// The export description (`NBD_INFO_DESCRIPTION`), if sent.
    pub fn get_export_description(&self) -> Result<Option<String>> {
        Ok(self.info()?.description.clone())
    }

    /// "oldstyle", "newstyle" or "newstyle-fixed".
    pub fn get_protocol(&self) -> Option<&'static str> {
        self.conn.protocol().map(Protocol::name)
    }

    /// Whether structured replies are in use.
    pub fn get_structured_replies_negotiated(&self) -> bool {
        self.conn.structured_replies_negotiated()
    }

    /// Whether extended headers are in use.
    pub fn get_extended_headers_negotiated(&self) -> bool {
        self.conn.extended_headers_negotiated()
    }

    /// Whether the named meta context was negotiated.
    pub fn can_meta_context(&self, name: &str) -> bool {
        self.conn.can_meta_context(name)
    }

    /// The connection's phase.
    pub fn phase(&self) -> Phase {
        self.conn.phase()
    }

    /// Every can_*/is_* fact with libnbd's names, in alphabetical order.
    pub fn flags_report(&self) -> Result<Vec<(&'static str, bool)>> {
        let i = self.info()?;
        Ok(vec![
            ("can_block_status_payload", i.can_block_status_payload()),
            ("can_cache", i.can_cache()),
            ("can_df", i.can_df()),
            ("can_fast_zero", i.can_fast_zero()),
            ("can_flush", i.can_flush()),
            ("can_fua", i.can_fua()),
            (
                "can_meta_context",
                self.conn
                    .can_meta_context(nbd_core::consts::CONTEXT_BASE_ALLOCATION),
            ),
            ("can_multi_conn", i.can_multi_conn()),
            ("can_trim", i.can_trim()),
            ("can_zero", i.can_zero()),
            ("is_read_only", i.is_read_only()),
            ("is_rotational", i.is_rotational()),
        ])
    }

    // ----- pipelined (aio) API -----

    /// Blocks until the in-flight limits leave room for `bytes` more.
    /// Refuses first if the connection has ended; other phase errors are
    /// left to the core command that follows.
    fn wait_room(&mut self, bytes: u64) -> Result<()> {
        self.refuse_if_ended()?;
        if self.conn.phase() != Phase::Ready {
            return Ok(()); // the core reports the phase error
        }
        self.run_until(|c| c.conn.has_room(bytes))
    }

    /// Queues a read of `buf.len()` bytes at `offset` into `buf`; the
    /// filled buffer comes back in the [`Completion`]. Blocks first if the
    /// in-flight limits are reached.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_pread(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.wait_room(buf.len() as u64)?;
        Ok(self
            .conn
            .read(offset, buf, flags)
            .map_err(UsageError::from)?)
    }

    /// Queues a read that also reports every structured chunk to `chunk`
    /// as `(offset, length, kind)`, in arrival order (libnbd's
    /// `aio_pread_structured` with its chunk callback): an error chunk as
    /// [`ReadChunkKind::Error`] with length 0 at its offset (the request's
    /// offset if it named none). `chunk` is called from the I/O loop of
    /// whichever call makes progress ([`Client::wait`], [`Client::poll`],
    /// ...), as each chunk's header arrives: the data is in the buffer once
    /// the [`Completion`] comes. It is dropped when the read completes.
    ///
    /// Nothing is kept per chunk: a read answered as one chunk per byte
    /// costs the client what one answered in one chunk does, besides the
    /// chunks of one turn of the I/O loop (up to 16 socket reads of at most
    /// 256 KiB) waiting for `chunk`. What `chunk` keeps is up to it.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_pread_structured(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
        chunk: impl FnMut(u64, u64, ReadChunkKind) + Send + 'static,
    ) -> Result<Cookie> {
        let cookie = self.queue_structured_read(buf, offset, flags)?;
        self.chunk_fns.insert(cookie, ChunkFn(Box::new(chunk)));
        Ok(cookie)
    }

    fn queue_structured_read(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: CmdFlags,
    ) -> Result<Cookie> {
        self.wait_room(buf.len() as u64)?;
        Ok(self
            .conn
            .read_with_chunks(offset, buf, flags)
            .map_err(UsageError::from)?)
    }

    /// Queues a write of `data` at `offset` (sent without copying `data`).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_pwrite(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<Cookie> {
        self.wait_room(data.len() as u64)?;
        Ok(self
            .conn
            .write(offset, data, flags)
            .map_err(UsageError::from)?)
    }

    /// Queues a flush.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_flush(&mut self, flags: CmdFlags) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.flush(flags)?)
    }

    /// Queues a trim.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_trim(&mut self, offset: u64, count: u64, flags: CmdFlags) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.trim(offset, count, flags)?)
    }

    /// Queues a cache (prefetch) hint.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_cache(&mut self, offset: u64, count: u64, flags: CmdFlags) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.cache(offset, count, flags)?)
    }

    /// Queues a write-zeroes.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_zero(&mut self, offset: u64, count: u64, flags: CmdFlags) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.write_zeroes(offset, count, flags)?)
    }

    /// Queues a block-status query.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_block_status(&mut self, offset: u64, count: u64, flags: CmdFlags) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.block_status(offset, count, flags)?)
    }

    /// Requests in flight.
    pub fn aio_in_flight(&self) -> usize {
        self.conn.in_flight()
    }

    /// Retires a completed command: `None` while still in flight.
    pub fn aio_command_completed(&mut self, cookie: Cookie) -> Option<Completion> {
        self.demux.take(cookie)
    }

    /// Makes progress: sends, receives, and blocks until something happens.
    pub fn poll(&mut self) -> Result<()> {
        self.pump(true, None)?;
        self.check_open()
    }

    /// Blocks until `cookie` completes and retires it.
    pub fn wait(&mut self, cookie: Cookie) -> Result<Completion> {
        if let Some(c) = self.demux.take(cookie) {
            return Ok(c);
        }
        let r = self.run_until(|c| c.demux.is_done(cookie));
        match self.demux.take(cookie) {
            Some(c) => Ok(c),
            None => Err(r.err().unwrap_or(Error::Closed(CloseReason::Aborted))),
        }
    }

    /// Blocks until any command completes and retires it.
    pub fn wait_any(&mut self) -> Result<(Cookie, Completion)> {
        if self.demux.completed() == 0 {
            self.run_until(|c| c.demux.completed() > 0)?;
        }
        self.demux
            .take_any()
            .ok_or(Error::Closed(CloseReason::Aborted))
    }

    fn wait_ok(&mut self, cookie: Cookie) -> Result<Completion> {
        let c = self.wait(cookie)?;
        match &c.result {
            Ok(()) => Ok(c),
            Err(e) => Err(Error::Command(e.clone())),
        }
    }

    // ----- blocking API -----

    /// Reads `buf.len()` bytes at `offset` (all or nothing).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pread(&mut self, buf: &mut [u8], offset: u64, flags: CmdFlags) -> Result<()> {
        let mut b = self.spare.take().unwrap_or_default();
        b.resize(buf.len(), 0);
        let cookie = self.aio_pread(b, offset, flags)?;
        let c = self.wait(cookie)?;
        if let Some(b) = c.buffer {
            if c.result.is_ok() {
                buf.copy_from_slice(&b[..buf.len()]);
            }
            self.spare = Some(b);
        }
        c.result.map_err(Error::from)
    }

    /// Reads into an owned buffer without any copy; returns it filled.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pread_buf(&mut self, buf: BytesMut, offset: u64, flags: CmdFlags) -> Result<BytesMut> {
        let cookie = self.aio_pread(buf, offset, flags)?;
        let c = self.wait_ok(cookie)?;
        Ok(c.buffer.unwrap_or_default())
    }

    /// Reads `buf.len()` bytes at `offset` with structured-reply details
    /// (libnbd's `pread_structured`): `chunk` is called with each chunk as
    /// `(offset, length, kind)`, in arrival order, while the call waits;
    /// an error chunk comes as [`ReadChunkKind::Error`] with length 0 at
    /// its offset (the request's offset if it named none). `buf` holds the
    /// data once the call returns `Ok`.
    ///
    /// Nothing is kept per chunk: besides the read's buffer, the client
    /// holds the chunks of one socket read (at most 256 KiB of input, so at
    /// most about 10,000 chunks of 26 bytes or more) until `chunk` has seen
    /// them, however many chunks the server splits the read into. A read of
    /// 2 MiB sent as 2^21 one-byte chunks costs about what one sent in one
    /// chunk does.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pread_structured(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        flags: CmdFlags,
        mut chunk: impl FnMut(u64, u64, ReadChunkKind),
    ) -> Result<()> {
        let mut b = self.spare.take().unwrap_or_default();
        b.resize(buf.len(), 0);
        let cookie = self.queue_structured_read(b, offset, flags)?;
        self.own_read = Some(cookie);
        self.own_chunks.clear();
        let r = loop {
            self.dispatch();
            for (o, l, k) in self.own_chunks.drain(..) {
                chunk(o, l, k);
            }
            if self.demux.is_done(cookie) {
                break Ok(());
            }
            if self.conn.is_finished() {
                break self.check_open().and(Err(Error::Closed(
                    self.conn
                        .close_reason()
                        .cloned()
                        .unwrap_or(CloseReason::Aborted),
                )));
            }
            // One socket read a turn: the events waiting for `chunk` are
            // then those of at most one receive buffer.
            if let Err(e) = self.pump_reads(true, None, 1) {
                break Err(e);
            }
        };
        self.own_read = None;
        // Keep the capacity of a few chunks, not of a hostile turn's worth.
        self.own_chunks.clear();
        self.own_chunks.shrink_to(4096);
        let Some(c) = self.demux.take(cookie) else {
            return Err(r.err().unwrap_or(Error::Closed(CloseReason::Aborted)));
        };
        if let Some(b) = c.buffer {
            if c.result.is_ok() {
                buf.copy_from_slice(&b[..buf.len()]);
            }
            self.spare = Some(b);
        }
        c.result.map_err(Error::from)
    }

    /// Writes `buf` at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pwrite(&mut self, buf: &[u8], offset: u64, flags: CmdFlags) -> Result<()> {
        self.pwrite_bytes(Bytes::copy_from_slice(buf), offset, flags)
    }

    /// Writes an owned buffer at `offset` without copying it.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pwrite_bytes(&mut self, data: Bytes, offset: u64, flags: CmdFlags) -> Result<()> {
        let cookie = self.aio_pwrite(data, offset, flags)?;
        self.wait_ok(cookie).map(|_| ())
    }

    /// Flushes the server's cache to stable storage.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn flush(&mut self, flags: CmdFlags) -> Result<()> {
        let c = self.aio_flush(flags)?;
        self.wait_ok(c).map(|_| ())
    }

    /// Trims (discards) `count` bytes at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn trim(&mut self, offset: u64, count: u64, flags: CmdFlags) -> Result<()> {
        let c = self.aio_trim(offset, count, flags)?;
        self.wait_ok(c).map(|_| ())
    }

    /// Asks the server to prefetch `count` bytes at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn cache(&mut self, offset: u64, count: u64, flags: CmdFlags) -> Result<()> {
        let c = self.aio_cache(offset, count, flags)?;
        self.wait_ok(c).map(|_| ())
    }

    /// Writes zeroes over `count` bytes at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn zero(&mut self, offset: u64, count: u64, flags: CmdFlags) -> Result<()> {
        let c = self.aio_zero(offset, count, flags)?;
        self.wait_ok(c).map(|_| ())
    }

    /// Block status of `count` bytes at `offset` for every negotiated
    /// context: (context name, extents).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn block_status(
        &mut self,
        offset: u64,
        count: u64,
        flags: CmdFlags,
    ) -> Result<Vec<(String, Vec<Extent>)>> {
        let c = self.aio_block_status(offset, count, flags)?;
        let c = self.wait_ok(c)?;
        Ok(c.extents
            .into_iter()
            .map(|(id, e)| {
                let name = self
                    .conn
                    .meta_context_name(id)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("context {id}"));
                (name, e)
            })
            .collect())
    }

    /// Ends the connection politely: `NBD_CMD_DISC` after the requests in
    /// flight completed (or `NBD_OPT_ABORT` in option mode), then waits for
    /// the server to close.
    ///
    /// Returns `Ok(())` once the connection ended cleanly, including when it
    /// already had (a repeated `shutdown`) or when the server had hung up
    /// with nothing in flight (nothing was lost, see
    /// [`CloseReason::is_loss`]); [`Error::Closed`] with the reason if it
    /// ended any other way, now or before. Every later call that needs
    /// the connection fails with [`Error::Closed`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn shutdown(&mut self) -> Result<()> {
        match self.conn.phase() {
            Phase::Negotiating => self.opt_abort(),
            Phase::Ready => {
                // Replies to requests in flight, then the server's close, are
                // awaited for at most the handshake timeout (spec, "Terminating
                // the transmission phase": the client SHOULD wait for them
                // before NBD_CMD_DISC; an abandoned request's reply may
                // never come).
                let until = self.goodbye_deadline();
                self.run_until_by(until, |c| c.conn.in_flight() == 0)?;
                // The core may have sent NBD_CMD_DISC already (rule 104:
                // soft disconnect after an ESHUTDOWN reply); then only the
                // server's close is awaited.
                match self.conn.disconnect() {
                    Ok(()) | Err(UsageError::WrongPhase { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.finish_writes_by(until);
                let _ = self.run_until_by(until, |c| c.conn.is_finished());
                self.shutdown_result()
            }
            _ => self.shutdown_result(),
        }
    }

    /// How long a polite end may wait for the server: the handshake
    /// timeout, from now.
    fn goodbye_deadline(&self) -> Option<Instant> {
        self.conn
            .config()
            .handshake_timeout
            .and_then(|d| Instant::now().checked_add(d))
    }

    fn shutdown_result(&self) -> Result<()> {
        match self.conn.close_reason() {
            Some(r) if !r.is_loss() => Ok(()),
            _ => self.check_open(),
        }
    }
}

fn refused_is_false(r: Result<OptionKind>) -> Result<bool> {
    match r {
        Ok(_) => Ok(true),
        Err(Error::Option { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A polite goodbye when it can be sent without waiting.
        self.driver.goodbye(&mut self.conn, &mut self.socket);
    }
}
