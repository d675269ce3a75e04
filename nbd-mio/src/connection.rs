//! [`NbdConnection`]: one NBD client connection on a non-blocking socket,
//! registered on the embedder's `mio::Poll` and driven by its readiness
//! events, over the shared [`nbd_driver::Driver`].

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nbd_core::{CmdFlags, Config, Connection, Cookie, Event, Phase, Refused, UsageError};
use nbd_driver::{
    Connected, Driver, IoStats, RecvUntil, Socket, Stream, Subprocess, TlsSettings, Transport,
    UriPolicy,
};

use crate::error::{Error, Result};

/// Successful vectored writes per step before replies get a look in (a
/// write takes up to 16 pieces, and as much as the socket accepts: often
/// hundreds of KiB).
const WRITES_PER_STEP: u32 = 1;

/// One NBD client connection on a non-blocking socket, for embedders that
/// run their own [`mio::Poll`].
///
/// The socket is registered once, edge-triggered, for both directions
/// ([`NbdConnection::register`]); there is nothing to re-arm. Each turn of
/// the embedder's loop:
///
/// 1. pass every readiness event with the connection's token to
///    [`NbdConnection::handle_event`];
/// 2. drain [`NbdConnection::poll_event`] until `None`, submitting commands
///    ([`NbdConnection::read`], [`NbdConnection::write`], ...) as results
///    arrive. Draining also drives the socket: when the events run out it
///    sends what the commands queued and reads the replies that came in
///    meanwhile, so `None` means the socket would block both ways.
///
/// Commands submitted outside step 2 (from a timer, another source) are
/// sent at once; inside it they are batched into one vectored write.
#[derive(Debug)]
pub struct NbdConnection {
    conn: Connection,
    /// The socket, switched to TLS when the server acknowledges STARTTLS
    /// (same file descriptor, so the registration stays).
    socket: Stream,
    driver: Driver,
    /// Credentials and checks for TLS.
    tls: TlsSettings,
    token: Option<Token>,
    /// Between `handle_event` and the `poll_event` that returns `None`:
    /// commands only queue, and the end of the drain sends them together.
    draining: bool,
    /// The last read stopped after completions, before the socket would
    /// block: the drain reads on.
    read_more: bool,
    /// The server process this connection started, if any: declared after
    /// `socket`, so the socket closes first and the server can exit.
    process: Option<Subprocess>,
}

impl NbdConnection {
    // ----- creating -----

    /// Connects to `target`: an NBD URI (`nbd://`, `nbd+unix://`; its
    /// export name replaces `cfg.export_name`) or else a Unix socket path.
    /// Call it once, then [`NbdConnection::register`]. A Unix connect
    /// completes at once; for TCP this resolves the host and connects
    /// (blocking, trying every address in turn); use
    /// [`NbdConnection::connect_tcp`] for a connect that never blocks.
    pub fn connect(target: &str, mut cfg: Config) -> Result<NbdConnection> {
        let c = nbd_driver::connect(target, &mut cfg)?;
        NbdConnection::from_connected(c, cfg)
    }

    /// Connects to an NBD URI, as [`NbdConnection::connect`] does; `nbds`
    /// URIs require TLS with the credentials their `tls-*` parameters name
    /// ([`nbd_driver::connect_uri`]); vsock gives [`Error::Unsupported`].
    pub fn connect_uri(uri: &str, mut cfg: Config) -> Result<NbdConnection> {
        let c = nbd_driver::connect_uri(uri, &mut cfg)?;
        NbdConnection::from_connected(c, cfg)
    }

    /// Connects to a Unix domain socket (a leading NUL byte names the Linux
    /// abstract namespace). Call it once, before registering.
    pub fn connect_unix(path: impl AsRef<Path>, cfg: Config) -> Result<NbdConnection> {
        let path = path.as_ref();
        let s = nbd_driver::connect_unix(path)?;
        NbdConnection::new(s, path.display().to_string(), cfg)
    }

    /// Starts a non-blocking TCP connect to `addr` (with `TCP_NODELAY`).
    /// It returns at once; if the connect fails, the failure arrives as
    /// [`Event::Closed`] after the next readiness event.
    pub fn connect_tcp(addr: SocketAddr, cfg: Config) -> Result<NbdConnection> {
        let ctx = |e| Error::io(format!("connect: {addr}"), e);
        let s = mio::net::TcpStream::connect(addr).map_err(ctx)?;
        let s = std::net::TcpStream::from(OwnedFd::from(s));
        let s = Socket::from_tcp(s).map_err(ctx)?;
        NbdConnection::new(s, addr.to_string(), cfg)
    }

    /// Runs an NBD client over a Unix stream you connected yourself (for
    /// example one end of `UnixStream::pair`); it is switched to
    /// non-blocking mode. Call it instead of the `connect_*` functions.
    pub fn from_unix_stream(
        s: std::os::unix::net::UnixStream,
        cfg: Config,
    ) -> Result<NbdConnection> {
        let s = Socket::from_unix(s).map_err(|e| Error::io("set_nonblocking", e))?;
        NbdConnection::new(s, "socket".into(), cfg)
    }

    /// Runs an NBD client over a TCP stream you connected (or started
    /// connecting) yourself; sets non-blocking mode and `TCP_NODELAY`.
    pub fn from_tcp_stream(s: std::net::TcpStream, cfg: Config) -> Result<NbdConnection> {
        let s = Socket::from_tcp(s).map_err(|e| Error::io("set TCP_NODELAY", e))?;
        let target = s.peer_description();
        NbdConnection::new(s, target, cfg)
    }

    /// Runs an NBD client over a connected stream socket given as a file
    /// descriptor (Unix or TCP; libnbd's `nbd_connect_socket`); it is
    /// switched to non-blocking mode. Call it instead of the `connect_*`
    /// functions, then register.
    pub fn from_fd(fd: OwnedFd, cfg: Config) -> Result<NbdConnection> {
        let s = Socket::from_fd(fd).map_err(|e| Error::io("adopt socket", e))?;
        let target = s.peer_description();
        NbdConnection::new(s, target, cfg)
    }

    /// Starts `argv` as a server speaking NBD on its stdin and stdout
    /// (libnbd's `nbd_connect_command`, e.g. `["nbdkit", "-s", "memory",
    /// "1M"]`) over a socket pair. The server is stopped and reaped when
    /// the connection is dropped. Register it afterwards as usual.
    pub fn connect_command(
        argv: &[impl AsRef<std::ffi::OsStr>],
        cfg: Config,
    ) -> Result<NbdConnection> {
        let c = nbd_driver::connect_command(argv)?;
        NbdConnection::from_connected(c, cfg)
    }

    /// Starts `argv` with systemd socket activation (libnbd's
    /// `nbd_connect_systemd_socket_activation`) and connects to it; the
    /// server is stopped and reaped when the connection is dropped.
    pub fn connect_systemd_socket_activation(
        argv: &[impl AsRef<std::ffi::OsStr>],
        cfg: Config,
    ) -> Result<NbdConnection> {
        let c = nbd_driver::connect_socket_activation(argv, None)?;
        NbdConnection::from_connected(c, cfg)
    }

    /// The process ID of the server this connection started, if any.
    pub fn subprocess_pid(&self) -> Option<u32> {
        self.process.as_ref().map(Subprocess::pid)
    }

    /// Connects to `target` as [`NbdConnection::connect`] does, with the TLS
    /// credentials and checks `tls` (a URI's `tls-*` parameters override
    /// the fields they name).
    pub fn connect_with_tls(
        target: &str,
        mut cfg: Config,
        tls: TlsSettings,
    ) -> Result<NbdConnection> {
        let c = if nbd_core::uri::is_nbd_uri(target) {
            nbd_driver::connect_uri_with(target, &mut cfg, tls, &UriPolicy::trusted())?
        } else {
            let mut c = nbd_driver::connect(target, &mut cfg)?;
            c.tls = tls;
            c
        };
        NbdConnection::from_connected(c, cfg)
    }

    /// Connects to an NBD URI from a source you do not fully trust,
    /// refusing before connecting what `policy` does not allow (libnbd's
    /// URI allow-lists), starting from the TLS settings `tls`.
    pub fn connect_uri_with(
        uri: &str,
        mut cfg: Config,
        tls: TlsSettings,
        policy: &UriPolicy,
    ) -> Result<NbdConnection> {
        let c = nbd_driver::connect_uri_with(uri, &mut cfg, tls, policy)?;
        NbdConnection::from_connected(c, cfg)
    }

    /// Sets the TLS credentials and checks used if the server starts TLS
    /// (before the handshake reaches STARTTLS: call it right after
    /// creating the connection).
    pub fn set_tls_settings(&mut self, tls: TlsSettings) {
        self.tls = tls;
    }

    /// Why TLS failed, once it has (the connection then ends with
    /// [`Event::Closed`] carrying the same message).
    pub fn tls_error(&self) -> Option<&nbd_driver::TlsError> {
        self.driver.tls_error()
    }

    /// Whether the session runs over TLS (libnbd's `nbd_get_tls_negotiated`).
    pub fn tls_negotiated(&self) -> bool {
        self.socket.is_tls() && !self.driver.is_handshaking()
    }

    fn from_connected(c: Connected, cfg: Config) -> Result<NbdConnection> {
        let mut n = NbdConnection::new(c.socket, c.target, cfg)?;
        n.process = c.process;
        n.tls = c.tls;
        Ok(n)
    }

    fn new(socket: Socket, target: String, cfg: Config) -> Result<NbdConnection> {
        Ok(NbdConnection {
            conn: Connection::new(cfg, std::time::Instant::now()),
            socket: Stream::new(socket),
            driver: Driver::new(target),
            tls: TlsSettings::default(),
            token: None,
            draining: false,
            read_more: false,
            process: None,
        })
    }

    // ----- registration -----

    /// Registers the socket with the embedder's registry under `token`,
    /// edge-triggered, readable and writable. Call it once after creating
    /// the connection; the first readiness event starts the handshake.
    pub fn register(&mut self, registry: &Registry, token: Token) -> Result<()> {
        if self.token.is_some() {
            return Err(Error::io(
                "register",
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already registered"),
            ));
        }
        let fd = self.socket.as_raw_fd();
        registry
            .register(
                &mut SourceFd(&fd),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| Error::io("register", e))?;
        self.driver.count_wait();
        self.token = Some(token);
        Ok(())
    }

    /// Removes the socket from the registry. Call it before dropping a
    /// connection that is still registered, if the registry outlives it.
    pub fn deregister(&mut self, registry: &Registry) -> Result<()> {
        if self.token.take().is_some() {
            let fd = self.socket.as_raw_fd();
            self.driver.count_wait();
            registry
                .deregister(&mut SourceFd(&fd))
                .map_err(|e| Error::io("deregister", e))?;
        }
        Ok(())
    }

    /// The token given to [`NbdConnection::register`], if registered.
    pub fn token(&self) -> Option<Token> {
        self.token
    }

    // ----- I/O -----

    /// Handles one readiness event of this connection's token: writes
    /// queued bytes and reads what the server sent, feeding the core, until
    /// the first commands complete or the socket would block. Then drain
    /// [`NbdConnection::poll_event`], which carries on from there. Socket
    /// failures are not returned: they end the connection with
    /// [`Event::Closed`].
    pub fn handle_event(&mut self, event: &mio::event::Event) {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let writable = event.is_writable() || event.is_write_closed() || event.is_error();
        self.on_ready(readable, writable);
    }

    /// Like [`NbdConnection::handle_event`], for loops that learn readiness
    /// another way: call it when the socket became readable and/or
    /// writable, then drain [`NbdConnection::poll_event`].
    pub fn on_ready(&mut self, readable: bool, writable: bool) {
        if writable {
            self.driver.on_writable();
        }
        self.driver
            .send(&mut self.conn, &mut self.socket, WRITES_PER_STEP);
        if readable {
            let r = self
                .driver
                .recv(&mut self.conn, &mut self.socket, RecvUntil::Completion);
            self.read_more = r.more;
            // Replies may have queued output (the next option, a DISC).
            self.driver
                .send(&mut self.conn, &mut self.socket, WRITES_PER_STEP);
        }
        self.driver.finish(&mut self.conn, &mut self.socket);
        self.draining = true;
    }

    /// Sends what is queued now, as far as the socket takes it. Commands
    /// call it themselves outside the drain of events; call it only to push
    /// output out in the middle of a drain.
    pub fn flush(&mut self) {
        self.driver.send(&mut self.conn, &mut self.socket, u32::MAX);
        self.driver.finish(&mut self.conn, &mut self.socket);
    }

    /// The end of a drain: what the commands queued goes out, and replies
    /// that arrived meanwhile are read, a step at a time, until there are
    /// events again or the socket would block both ways.
    fn step(&mut self) -> bool {
        while !self.conn.is_finished() && !self.conn.has_events() {
            let w = self
                .driver
                .send(&mut self.conn, &mut self.socket, WRITES_PER_STEP);
            let mut progressed = w.progressed;
            if self.read_more || self.socket.buffered_input() {
                let r = self
                    .driver
                    .recv(&mut self.conn, &mut self.socket, RecvUntil::Completion);
                self.read_more = r.more;
                progressed |= r.progressed;
            }
            if !progressed && !w.more {
                break;
            }
        }
        self.driver.finish(&mut self.conn, &mut self.socket);
        self.conn.has_events()
    }

    // ----- time -----

    /// The latest instant the embedder's `Poll::poll` may sleep until, if
    /// a deadline is pending (the handshake's, 30 s by default, or a
    /// command's: [`Config::command_timeout`],
    /// [`NbdConnection::set_deadline`]); pass it through
    /// [`crate::poll_timeout_until`], or fold many connections with
    /// [`crate::next_deadline`]. Then call
    /// [`NbdConnection::handle_timeout`] after every wake-up. Reads the
    /// clock only when a deadline just started and needs the time. `None`
    /// without deadlines, for a few comparisons.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let due = self.conn.poll_timeout()?;
        if due > self.conn.now() {
            return Some(due);
        }
        let now = Instant::now();
        self.handle_timeout(now);
        if self.conn.has_events() {
            return Some(now); // poll at once, then drain them
        }
        self.conn.poll_timeout()
    }

    /// Tells the connection the time: a missed handshake deadline ends it
    /// ([`nbd_core::CloseReason::HandshakeTimedOut`]), a missed command
    /// deadline completes that command with
    /// [`nbd_core::CommandError::TimedOut`] and hands its buffer back.
    /// Call it after every `Poll::poll` (it is cheap when nothing is due),
    /// then drain [`NbdConnection::poll_event`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.conn.handle_timeout(now);
        self.driver.finish(&mut self.conn, &mut self.socket);
        self.draining = true;
    }

    /// Replaces the handshake deadline (`None`: none), for example to count
    /// from before a blocking TCP connect: see
    /// [`Connection::set_handshake_deadline`].
    pub fn set_handshake_deadline(&mut self, deadline: Option<Instant>) {
        self.conn.set_handshake_deadline(deadline);
    }

    /// Gives one in-flight command a deadline (`None` removes it), in
    /// place of [`Config::command_timeout`]. Fails with
    /// [`UsageError::NotInFlight`] once the command completed.
    pub fn set_deadline(&mut self, cookie: Cookie, deadline: Option<Instant>) -> Result<()> {
        Ok(self.conn.set_deadline(cookie, deadline)?)
    }

    /// Sets the deadline of the commands submitted from now on (`None`:
    /// none, the default).
    pub fn set_command_timeout(&mut self, timeout: Option<Duration>) {
        self.conn.set_command_timeout(timeout);
    }

    /// Cancels an in-flight command: it completes in the next
    /// [`Event::CommandDone`] with [`nbd_core::CommandError::Cancelled`]
    /// and its buffer, and its late reply is dropped; the server may still
    /// carry it out. The connection stays usable. Fails with
    /// [`UsageError::NotInFlight`] once the command completed.
    pub fn cancel(&mut self, cookie: Cookie) -> Result<()> {
        self.conn.cancel(cookie)?;
        self.draining = true;
        Ok(())
    }

    /// Ends the connection now: every command in flight completes with
    /// [`nbd_core::CommandError::ConnectionClosed`], then
    /// [`Event::Closed`] with [`nbd_core::CloseReason::AbortedByCaller`];
    /// the socket is shut down. Drain [`NbdConnection::poll_event`] after
    /// it. The polite end is [`NbdConnection::disconnect`].
    pub fn abort(&mut self, reason: &str) {
        self.conn.abort(reason);
        self.driver.finish(&mut self.conn, &mut self.socket);
        self.draining = true;
    }

    // ----- events -----

    /// The next event (an export listed, an option's result, the
    /// handshake's end, a command's completion, the connection's end), if
    /// any. Drain it until `None` after every
    /// [`NbdConnection::handle_event`]: when the queue runs dry it sends
    /// what the commands queued and reads on, so `None` means there is
    /// nothing to do until the next readiness event. When the server
    /// accepts `NBD_OPT_STARTTLS`, the TLS handshake runs here too, over
    /// the same registered socket.
    #[must_use]
    #[inline]
    pub fn poll_event(&mut self) -> Option<Event> {
        loop {
            match self.conn.poll_event() {
                Some(Event::StartTls) => {
                    self.driver
                        .start_tls(&mut self.conn, &mut self.socket, &self.tls);
                }
                Some(ev) => return Some(ev),
                None => {
                    if !self.step() {
                        self.draining = false;
                        return None;
                    }
                }
            }
        }
    }

    /// After a command queued bytes. Outside a drain of events they go out
    /// at once. Inside one, while other requests are in flight, they wait
    /// for the end of the drain, so that one vectored write takes the
    /// batch; even a loop that leaves the drain early then sends them on
    /// the next readiness event, which the replies still owed bring. With
    /// nothing else in flight no reply would come: they go out at once.
    #[inline]
    fn after_command(&mut self) {
        if !self.draining || self.conn.in_flight() <= 1 {
            self.flush();
        }
    }

    /// After a command queued bytes: see [`NbdConnection::after_command`].
    fn queued<T>(&mut self, r: std::result::Result<T, UsageError>) -> Result<T> {
        let v = r?;
        self.after_command();
        Ok(v)
    }

    // ----- commands -----

    /// Queues a read of `buf.len()` bytes at `offset` into `buf`; the
    /// filled buffer comes back in [`Event::CommandDone`]. Ready phase
    /// only; check [`NbdConnection::has_room`] first when many requests are
    /// in flight.
    ///
    /// A refused read (wrong phase, out of bounds, limits) hands `buf`
    /// back inside the [`Refused`].
    #[inline]
    pub fn read(
        &mut self,
        offset: u64,
        buf: BytesMut,
        flags: CmdFlags,
    ) -> std::result::Result<Cookie, Refused<BytesMut>> {
        let c = self.conn.read(offset, buf, flags)?;
        self.after_command();
        Ok(c)
    }

    /// Queues a read that also reports every structured chunk as
    /// [`Event::ReadChunk`] before its completion.
    /// A refused read hands `buf` back inside the [`Refused`].
    #[inline]
    pub fn read_with_chunks(
        &mut self,
        offset: u64,
        buf: BytesMut,
        flags: CmdFlags,
    ) -> std::result::Result<Cookie, Refused<BytesMut>> {
        let c = self.conn.read_with_chunks(offset, buf, flags)?;
        self.after_command();
        Ok(c)
    }

    /// Queues a write of `data` at `offset`; `data` goes to the socket
    /// without a copy.
    /// A refused write hands `data` back inside the [`Refused`].
    #[inline]
    pub fn write(
        &mut self,
        offset: u64,
        data: Bytes,
        flags: CmdFlags,
    ) -> std::result::Result<Cookie, Refused<Bytes>> {
        let c = self.conn.write(offset, data, flags)?;
        self.after_command();
        Ok(c)
    }

    /// Queues a flush (`NBD_CMD_FLUSH`).
    pub fn flush_command(&mut self, flags: CmdFlags) -> Result<Cookie> {
        let r = self.conn.flush(flags);
        self.queued(r)
    }

    /// Queues a trim of `length` bytes at `offset` (`NBD_CMD_TRIM`).
    pub fn trim(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie> {
        let r = self.conn.trim(offset, length, flags);
        self.queued(r)
    }

    /// Queues a cache (prefetch) hint for `length` bytes at `offset`.
    pub fn cache(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie> {
        let r = self.conn.cache(offset, length, flags);
        self.queued(r)
    }

    /// Queues a write of zeroes over `length` bytes at `offset`.
    pub fn write_zeroes(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie> {
        let r = self.conn.write_zeroes(offset, length, flags);
        self.queued(r)
    }

    /// Queues a block-status query for `length` bytes at `offset`; answers
    /// arrive as [`Event::BlockStatus`] before the completion.
    pub fn block_status(&mut self, offset: u64, length: u64, flags: CmdFlags) -> Result<Cookie> {
        let r = self.conn.block_status(offset, length, flags);
        self.queued(r)
    }

    /// Ends the transmission phase politely (`NBD_CMD_DISC`, sent once the
    /// requests in flight have completed); [`Event::Closed`] follows.
    pub fn disconnect(&mut self) -> Result<()> {
        let r = self.conn.disconnect();
        self.queued(r)
    }

    /// Option mode: lists the exports (each an [`Event::ExportListed`],
    /// then [`Event::OptionSucceeded`]).
    pub fn opt_list(&mut self) -> Result<()> {
        let r = self.conn.opt_list();
        self.queued(r)
    }

    /// Option mode: sets the export that `opt_info`/`opt_go` will name.
    pub fn set_export_name(&mut self, name: &str) -> Result<()> {
        Ok(self.conn.set_export_name(name)?)
    }

    /// Option mode: asks about the current export (`NBD_OPT_INFO`).
    pub fn opt_info(&mut self) -> Result<()> {
        let r = self.conn.opt_info();
        self.queued(r)
    }

    /// Option mode: selects the export and enters transmission
    /// (`NBD_OPT_GO`); [`Event::GoSucceeded`] follows.
    pub fn opt_go(&mut self) -> Result<()> {
        let r = self.conn.opt_go();
        self.queued(r)
    }

    /// Option mode: ends negotiation politely (`NBD_OPT_ABORT`).
    pub fn opt_abort(&mut self) -> Result<()> {
        let r = self.conn.opt_abort();
        self.queued(r)
    }

    /// Option mode: `NBD_OPT_LIST_META_CONTEXT` with these queries (empty
    /// asks for all); each context is an [`Event::MetaContext`].
    pub fn opt_list_meta_context<S: AsRef<str>>(&mut self, queries: &[S]) -> Result<()> {
        let r = self.conn.opt_list_meta_context(queries);
        self.queued(r)
    }

    /// Option mode: `NBD_OPT_SET_META_CONTEXT` with these queries.
    pub fn opt_set_meta_context<S: AsRef<str>>(&mut self, queries: &[S]) -> Result<()> {
        let r = self.conn.opt_set_meta_context(queries);
        self.queued(r)
    }

    /// Option mode: `NBD_OPT_STRUCTURED_REPLY`.
    pub fn opt_structured_reply(&mut self) -> Result<()> {
        let r = self.conn.opt_structured_reply();
        self.queued(r)
    }

    /// Option mode: `NBD_OPT_EXTENDED_HEADERS`.
    pub fn opt_extended_headers(&mut self) -> Result<()> {
        let r = self.conn.opt_extended_headers();
        self.queued(r)
    }

    // ----- getters -----

    /// True if the in-flight limits leave room for a request of `bytes`
    /// more payload; check it before submitting when many are in flight.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.conn.has_room(bytes)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.conn.in_flight()
    }

    /// The core state machine, for every getter ([`Connection::export_info`],
    /// [`Connection::close_reason`], [`Connection::meta_contexts`], ...).
    /// Commands are methods of `NbdConnection` itself, so that what they
    /// queue is sent.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The connection's phase (connecting, negotiating, ready, closed, dead).
    pub fn phase(&self) -> Phase {
        self.conn.phase()
    }

    /// True once the connection has ended (see [`Connection::close_reason`]).
    pub fn is_finished(&self) -> bool {
        self.conn.is_finished()
    }

    /// What this connection was opened to (the URI, socket path or address).
    pub fn target(&self) -> &str {
        self.driver.target()
    }

    /// Counters of the socket calls made so far; read them at any time.
    pub fn io_stats(&self) -> IoStats {
        self.driver.stats()
    }

    /// Sets how many times a socket call is retried at once in the middle
    /// of a message (see [`Driver::set_mid_message_retries`]). Lower it if
    /// your loop must never spend a few microseconds on one connection.
    pub fn set_mid_message_retries(&mut self, retries: u32) {
        self.driver.set_mid_message_retries(retries);
    }
}

impl Drop for NbdConnection {
    fn drop(&mut self) {
        // A polite goodbye when one can be sent without waiting.
        self.driver.goodbye(&mut self.conn, &mut self.socket);
    }
}
