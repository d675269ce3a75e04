//! [`NbdConnection`]: one NBD client connection on a non-blocking mio
//! socket, driven by readiness events from the embedder's `mio::Poll`.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::path::Path;

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use nbd_core::uri::{NbdUri, Transport};
use nbd_core::{Config, Connection, Event, Phase, TlsMode};

use crate::error::{Error, Result};

/// Most slices handed to one vectored write: enough for 8 small writes
/// (header + payload each) in one system call.
const MAX_SLICES: usize = 16;

/// Successful vectored writes per turn before replies get a look in (a
/// write takes up to [`MAX_SLICES`] pieces, and as much as the socket
/// accepts: often hundreds of KiB).
const WRITES_PER_TURN: u32 = 1;

/// Default for [`NbdConnection::set_mid_message_retries`]: 16 calls, a few
/// microseconds. Measured in BENCHMARKS.md: 64 KiB reads from nbdkit's
/// memory plugin went from 0.99 to 1.13 of libnbd's throughput, at the same
/// client CPU per byte; 256 KiB writes to nbdkit null from 1.06 to 1.18.
pub const DEFAULT_MID_MESSAGE_RETRIES: u32 = 16;

/// Message used when the core asks for TLS, which this adapter lacks.
const NO_TLS: &str = "TLS is not supported by nbd-mio yet";

/// The socket under a connection.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }

    fn read_vectored(&mut self, b: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read_vectored(b),
            Stream::Tcp(s) => s.read_vectored(b),
        }
    }

    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(b),
            Stream::Tcp(s) => s.write_vectored(b),
        }
    }

    fn shutdown(&self) {
        // The peer may already be gone; nothing useful to report.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.register(r, t, i),
            Stream::Tcp(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.reregister(r, t, i),
            Stream::Tcp(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.deregister(r),
            Stream::Tcp(s) => s.deregister(r),
        }
    }
}

/// Counters of the socket calls a connection made, for diagnostics and
/// benchmarks (system calls per request, how often writes were partial).
/// Read them with [`NbdConnection::io_stats`] at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// `read` calls that returned data.
    pub reads: u64,
    /// `read` calls that found the socket empty (`WouldBlock`), including
    /// the retries in the middle of a reply
    /// ([`NbdConnection::set_mid_message_retries`]).
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
    /// Registry calls (`epoll_ctl` on Linux): adding the socket when the
    /// connection starts to wait, removing it when it wakes up, and
    /// renewing it when a turn stopped early with work left.
    pub registry_calls: u64,
}

/// Where the connection stands with the embedder's registry.
#[derive(Debug)]
struct Registration {
    token: Token,
    /// What is registered now; `None` while the socket is out of the
    /// registry (the connection is busy with it, or has ended).
    interest: Option<Interest>,
    /// A handle on the embedder's registry (a clone of the one given to
    /// [`NbdConnection::register`]), so that a readiness event can take
    /// the socket out of it.
    registry: Registry,
}

/// One NBD client connection on a non-blocking mio socket, for embedders
/// that run their own [`mio::Poll`].
///
/// The connection owns the socket and an [`nbd_core::Connection`]. It never
/// blocks and never polls by itself. Each turn of the embedder's loop:
///
/// 1. pass the readiness event for this connection's token to
///    [`NbdConnection::handle_event`] (it reads and writes until the
///    socket would block);
/// 2. drain [`NbdConnection::poll_event`] until `None`, submitting new
///    commands through [`NbdConnection::conn_mut`] as results arrive;
/// 3. call [`NbdConnection::reregister`], which sends what the commands
///    queued and updates the registered interest.
///
/// Create it with [`NbdConnection::connect`], [`NbdConnection::connect_uri`],
/// [`NbdConnection::connect_unix`], [`NbdConnection::connect_tcp`], or from a
/// socket you connected yourself; then [`NbdConnection::register`] it once.
#[derive(Debug)]
pub struct NbdConnection {
    conn: Connection,
    stream: Stream,
    target: String,
    registration: Option<Registration>,
    /// The last write hit `WouldBlock`: wait for a writable event.
    write_blocked: bool,
    /// Reading stopped before `WouldBlock` (commands completed): the socket
    /// may hold more, so the next reregister re-arms the readiness.
    read_pending: bool,
    /// Writing stopped before `WouldBlock` (to look at replies in between):
    /// the next reregister re-arms the readiness too.
    write_pending: bool,
    /// The socket was shut down after the core finished.
    shut: bool,
    /// Some bytes arrived (so a failure is no longer a connect failure).
    got_bytes: bool,
    stats: IoStats,
    /// See [`NbdConnection::set_mid_message_retries`].
    mid_message_retries: u32,
}

impl NbdConnection {
    // ----- creating -----

    /// Connects to `target`: an NBD URI (`nbd://`, `nbd+unix://`) or else a
    /// Unix socket path. Call it once, before registering; see
    /// [`NbdConnection::connect_uri`] and [`NbdConnection::connect_unix`].
    pub fn connect(target: &str, cfg: Config) -> Result<NbdConnection> {
        if nbd_core::uri::is_nbd_uri(target) {
            NbdConnection::connect_uri(target, cfg)
        } else {
            NbdConnection::connect_unix(target, cfg)
        }
    }

    /// Connects to an NBD URI; its export name replaces `cfg.export_name`.
    /// Call it once, before registering.
    ///
    /// `nbd+unix://` connects at once; `nbd://` resolves the host name (a
    /// blocking lookup unless the host is an address literal) and starts a
    /// non-blocking connect to the first address, as
    /// [`NbdConnection::connect_tcp`] does. TLS URIs (`nbds`, `nbds+unix`)
    /// and vsock give [`Error::Unsupported`].
    pub fn connect_uri(uri: &str, mut cfg: Config) -> Result<NbdConnection> {
        let u = NbdUri::parse(uri)?;
        if u.tls {
            return Err(Error::Unsupported(format!(
                "{} URIs: TLS is not supported by nbd-mio yet",
                u.scheme()
            )));
        }
        cfg.export_name = u.export_name.clone();
        let mut c = match &u.transport {
            Transport::Unix { path } => NbdConnection::connect_unix(path, cfg)?,
            Transport::Tcp { host, port } => {
                let addr = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| Error::io(format!("resolve {host}"), e))?
                    .next()
                    .ok_or_else(|| {
                        Error::io(
                            format!("resolve {host}"),
                            io::Error::new(io::ErrorKind::NotFound, "no address found"),
                        )
                    })?;
                NbdConnection::connect_tcp(addr, cfg)?
            }
            Transport::Vsock { .. } => {
                return Err(Error::Unsupported(
                    "vsock transport (nbd+vsock URIs) is not supported by nbd-mio yet".into(),
                ))
            }
        };
        c.target = uri.to_owned();
        Ok(c)
    }

    /// Connects to a Unix domain socket (a leading NUL byte names the Linux
    /// abstract namespace). Call it once, before registering. Unix connects
    /// complete at once; a full listen backlog is an error here.
    pub fn connect_unix(path: impl AsRef<Path>, cfg: Config) -> Result<NbdConnection> {
        let path = path.as_ref();
        let ctx = || format!("connect: {}", path.display());
        let addr = unix_addr(path).map_err(|e| Error::io(ctx(), e))?;
        let s = UnixStream::connect_addr(&addr).map_err(|e| Error::io(ctx(), e))?;
        let mut c = NbdConnection::from_unix_stream(s, cfg)?;
        c.target = path.display().to_string();
        Ok(c)
    }

    /// Starts a non-blocking TCP connect to `addr` (with `TCP_NODELAY`).
    /// Call it once, before registering. It returns at once; if the connect
    /// fails, the failure arrives as [`Event::Closed`] after the next
    /// readiness event.
    pub fn connect_tcp(addr: SocketAddr, cfg: Config) -> Result<NbdConnection> {
        let ctx = || format!("connect: {addr}");
        let s = TcpStream::connect(addr).map_err(|e| Error::io(ctx(), e))?;
        let mut c = NbdConnection::from_tcp_stream(s, cfg)?;
        c.target = addr.to_string();
        Ok(c)
    }

    /// Runs an NBD client over a Unix stream you connected yourself (for
    /// example one end of `UnixStream::pair`). Call it instead of the
    /// `connect_*` functions, before registering.
    pub fn from_unix_stream(s: UnixStream, cfg: Config) -> Result<NbdConnection> {
        NbdConnection::new(Stream::Unix(s), "socket".into(), cfg)
    }

    /// Runs an NBD client over a TCP stream you connected (or started
    /// connecting) yourself; sets `TCP_NODELAY`. Call it instead of the
    /// `connect_*` functions, before registering.
    pub fn from_tcp_stream(s: TcpStream, cfg: Config) -> Result<NbdConnection> {
        // Small requests must leave at once, not wait for Nagle's timer.
        s.set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        let target = s
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".into());
        NbdConnection::new(Stream::Tcp(s), target, cfg)
    }

    fn new(stream: Stream, target: String, cfg: Config) -> Result<NbdConnection> {
        if cfg.tls != TlsMode::Disable {
            return Err(Error::Unsupported(NO_TLS.into()));
        }
        Ok(NbdConnection {
            conn: Connection::new(cfg),
            stream,
            target,
            registration: None,
            write_blocked: false,
            read_pending: false,
            write_pending: false,
            shut: false,
            got_bytes: false,
            stats: IoStats::default(),
            mid_message_retries: DEFAULT_MID_MESSAGE_RETRIES,
        })
    }

    // ----- registration -----

    /// Registers the socket with the embedder's registry under `token`, with
    /// the interest the connection needs now. Call it once after creating
    /// the connection; the first readiness event starts the handshake.
    /// The connection keeps a clone of the registry handle (on Linux a
    /// duplicate of the epoll file descriptor), with which each readiness
    /// event takes the socket out until [`NbdConnection::reregister`].
    pub fn register(&mut self, registry: &Registry, token: Token) -> Result<()> {
        if self.registration.is_some() {
            return Err(Error::io(
                "register",
                io::Error::new(io::ErrorKind::AlreadyExists, "already registered"),
            ));
        }
        let own = registry
            .try_clone()
            .map_err(|e| Error::io("register: clone the registry", e))?;
        let interest = self.interest();
        if let Some(i) = interest {
            self.stream
                .register(registry, token, i)
                .map_err(|e| Error::io("register", e))?;
            self.stats.registry_calls += 1;
        }
        self.registration = Some(Registration {
            token,
            interest,
            registry: own,
        });
        Ok(())
    }

    /// Sends what is queued (as [`NbdConnection::flush`]) and puts the
    /// socket back in the registry with the interest the connection needs:
    /// readable while the core expects bytes, writable only while output
    /// waits for socket space. Call it at the end of every turn of the
    /// loop, after draining events and submitting commands: without it the
    /// connection is never polled again, since
    /// [`NbdConnection::handle_event`] takes the socket out of the registry
    /// while it works. It makes no system call when the socket is
    /// registered as needed already, and deregisters it once the
    /// connection has ended.
    ///
    /// Adding the socket reports at once what arrived while it was out, and
    /// when `handle_event` returned before the socket would block
    /// ([`NbdConnection::io_pending`]) this renews the registration, so the
    /// next poll comes back at once for the rest.
    pub fn reregister(&mut self, registry: &Registry) -> Result<()> {
        self.flush();
        let wanted = self.interest();
        let Some(reg) = &mut self.registration else {
            return Err(Error::io(
                "reregister",
                io::Error::new(io::ErrorKind::NotConnected, "call register first"),
            ));
        };
        let pending =
            std::mem::take(&mut self.read_pending) | std::mem::take(&mut self.write_pending);
        // Adding the socket reports its readiness at once, so a turn that
        // stopped early resumes on the next poll; so does renewing it.
        let renew = pending && wanted.is_some();
        if wanted == reg.interest && !renew {
            return Ok(());
        }
        let r = match (reg.interest, wanted) {
            (Some(_), Some(i)) => self.stream.reregister(registry, reg.token, i),
            (None, Some(i)) => match self.stream.register(registry, reg.token, i) {
                // Taking it out failed earlier: it is still there.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    self.stream.reregister(registry, reg.token, i)
                }
                r => r,
            },
            (Some(_), None) => self.stream.deregister(registry),
            (None, None) => Ok(()),
        };
        self.stats.registry_calls += 1;
        r.map_err(|e| Error::io("reregister", e))?;
        reg.interest = wanted;
        Ok(())
    }

    /// Removes the socket from the registry. Call it before dropping a
    /// connection that is still registered, if the registry outlives it.
    pub fn deregister(&mut self, registry: &Registry) -> Result<()> {
        if let Some(Registration {
            interest: Some(_), ..
        }) = self.registration.take()
        {
            self.stats.registry_calls += 1;
            self.stream
                .deregister(registry)
                .map_err(|e| Error::io("deregister", e))?;
        }
        Ok(())
    }

    /// The interest the connection needs now (`None` once it has ended).
    /// [`NbdConnection::reregister`] applies it; call this only to inspect.
    pub fn interest(&self) -> Option<Interest> {
        if self.shut {
            return None;
        }
        // Output is queued after a flush only if the socket was full.
        match (self.conn.wants_read(), self.conn.wants_write()) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        }
    }

    /// The token given to [`NbdConnection::register`], if registered.
    pub fn token(&self) -> Option<Token> {
        self.registration.as_ref().map(|r| r.token)
    }

    // ----- I/O -----

    /// Handles one readiness event of this connection's token: writes queued
    /// bytes and reads what the server sent, feeding the core. Call it for
    /// every event with this connection's token; then drain
    /// [`NbdConnection::poll_event`]. Socket failures are not returned: the
    /// core turns them into [`Event::Closed`].
    ///
    /// mio reports nothing new on a socket until a read or write has hit
    /// `WouldBlock`. This call does that, except that it returns early once
    /// a read has completed commands, or after one large vectored write:
    /// you can then submit new commands while the server is still busy with
    /// the others, which keeps the pipeline full. In that case
    /// [`NbdConnection::reregister`] makes the next poll return at once for
    /// the rest.
    ///
    /// It first takes the socket out of the registry (one `epoll_ctl`):
    /// while registered, every segment the server sends runs the poller's
    /// wake-up callback on the server's CPU, although no one waits while
    /// the connection drains the socket. `reregister` puts it back when the
    /// connection has to wait, as clients that call `poll(2)` only to wait
    /// do (BENCHMARKS.md: 64 KiB reads went from 0.92 to 1.06 of libnbd's
    /// throughput with this change alone).
    pub fn handle_event(&mut self, event: &mio::event::Event) {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let writable = event.is_writable() || event.is_write_closed() || event.is_error();
        self.leave_registry();
        self.on_ready(readable, writable);
    }

    /// Takes the socket out of the registry while the connection works on
    /// it (see [`NbdConnection::handle_event`]); `reregister` puts it back.
    fn leave_registry(&mut self) {
        let Some(reg) = &mut self.registration else {
            return;
        };
        if reg.interest.is_none() {
            return;
        }
        self.stats.registry_calls += 1;
        // A failure leaves it registered: reregister then finds it there.
        if self.stream.deregister(&reg.registry).is_ok() {
            reg.interest = None;
        }
    }

    /// Like [`NbdConnection::handle_event`], for loops that learn readiness
    /// another way: call it when the socket became readable and/or writable.
    /// Such loops must also call it again (readable and writable) without
    /// waiting while [`NbdConnection::io_pending`] is true.
    pub fn on_ready(&mut self, readable: bool, writable: bool) {
        if writable {
            self.write_blocked = false;
        }
        self.send();
        if readable {
            let in_flight = self.conn.in_flight();
            self.recv();
            if self.conn.in_flight() < in_flight {
                // A reply means the server took in its request: the socket
                // has room again. Do not wait for the writable event, which
                // a Unix socket reports only once three quarters of its
                // buffer have drained (the server may run dry meanwhile).
                self.write_blocked = false;
            }
            // Replies may have queued output (the next option, a DISC).
            self.send();
        }
        self.finish_if_ended();
    }

    /// Sends queued bytes now with one vectored write (enough for many small
    /// requests; what the socket does not take goes out on later turns).
    /// Call it after submitting commands to send them without waiting for
    /// the end of the turn ([`NbdConnection::reregister`] calls it too).
    pub fn flush(&mut self) {
        self.send();
        self.finish_if_ended();
    }

    fn send(&mut self) {
        self.write_pending = false;
        let mut budget = WRITES_PER_TURN;
        let mut retries = self.mid_message_retries;
        while !self.write_blocked && self.conn.wants_write() {
            if budget == 0 {
                // Let replies be read (and new requests submitted) before
                // the rest goes out; the re-armed readiness brings us back.
                self.write_pending = true;
                break;
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let n = self.conn.transmit_slices(&mut slices);
            let offered: usize = slices[..n].iter().map(|s| s.len()).sum();
            match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => {
                    self.conn
                        .handle_transport_error("write: the socket accepted nothing");
                    break;
                }
                Ok(k) => {
                    budget -= 1;
                    self.conn.transmitted(k);
                    self.stats.writes += 1;
                    self.stats.bytes_written += k as u64;
                    if k < offered {
                        self.stats.partial_writes += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.writes_blocked += 1;
                    if retries > 0 && self.conn.request_in_progress() {
                        // The server is reading this request: room for
                        // the rest comes sooner than a writable event.
                        retries -= 1;
                        continue;
                    }
                    self.write_blocked = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !self.conn.is_finished() {
                        let m = self.io_failure("write", &e);
                        self.conn.handle_transport_error(m);
                    }
                    break;
                }
            }
        }
    }

    /// True when the last call returned before the socket would block
    /// (reading stopped after commands completed, or writing after one
    /// vectored write), so no new readiness event may announce what is left.
    /// [`NbdConnection::reregister`] takes care of it in mio loops; loops
    /// driving [`NbdConnection::on_ready`] themselves should call that
    /// again (readable and writable) without waiting.
    pub fn io_pending(&self) -> bool {
        (self.read_pending || self.write_pending) && !self.conn.is_finished()
    }

    fn recv(&mut self) {
        let mut retries = self.mid_message_retries;
        self.read_pending = false;
        while self.conn.wants_read() {
            let in_flight = self.conn.in_flight();
            // Once a reply has begun, its rest follows within microseconds:
            // trying again at once costs less than a sleep and a wake-up.
            let mid_reply = retries > 0 && self.conn.reply_in_progress();
            // A large read payload goes straight into its buffer, and the
            // replies behind it into the receive buffer, in one readv.
            let [first, second] = self.conn.recv_bufs();
            if first.is_empty() {
                // The core always leaves room; never spin if it did not.
                self.conn
                    .handle_transport_error("receive buffer full: the core cannot progress");
                break;
            }
            let r = loop {
                let r = if second.is_empty() {
                    self.stream.read(first)
                } else {
                    self.stream
                        .read_vectored(&mut [IoSliceMut::new(first), IoSliceMut::new(second)])
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
                    self.conn.handle_eof();
                    break;
                }
                Ok(n) => {
                    self.got_bytes = true;
                    self.stats.reads += 1;
                    self.stats.bytes_read += n as u64;
                    self.conn.recv_commit(n);
                    if self.conn.in_flight() < in_flight {
                        // Hand the completions over now, so new requests
                        // reach the server while it works on the others.
                        self.read_pending = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let m = self.io_failure("read", &e);
                    self.conn.handle_transport_error(m);
                    break;
                }
            }
        }
    }

    fn io_failure(&self, what: &str, e: &io::Error) -> String {
        if self.got_bytes {
            format!("{what}: {e}")
        } else {
            format!("connecting to {}: {e}", self.target)
        }
    }

    /// Once the core has ended: one last try to send what it queued (an
    /// `NBD_OPT_ABORT`), then shut the socket down so the server sees EOF.
    fn finish_if_ended(&mut self) {
        if self.shut || !self.conn.is_finished() {
            return;
        }
        if self.conn.wants_write() {
            let mut slices = [IoSlice::new(&[]); 8];
            let n = self.conn.transmit_slices(&mut slices);
            if let Ok(k) = self.stream.write_vectored(&slices[..n]) {
                self.conn.transmitted(k);
            }
        }
        self.stream.shutdown();
        self.shut = true;
    }

    // ----- events and the core -----

    /// The next event (an export listed, an option's result, the handshake's
    /// end, a command's completion, the connection's end), if any. Drain it
    /// until `None` after every [`NbdConnection::handle_event`] and after
    /// every command. Use this rather than `conn_mut().poll_event()`: it
    /// also handles the events that need the socket (a server that asks for
    /// TLS ends the connection, as TLS is not supported yet).
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        match self.conn.poll_event()? {
            Event::StartTls => {
                self.conn.handle_transport_error(NO_TLS);
                self.finish_if_ended();
                self.conn.poll_event()
            }
            ev => Some(ev),
        }
    }

    /// The core state machine, for getters: [`Connection::export_info`],
    /// [`Connection::in_flight`], [`Connection::has_room`],
    /// [`Connection::close_reason`], ...
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The core state machine, to submit commands: `opt_list`, `opt_go`,
    /// `opt_info`, `opt_abort`, ... in option mode; `read`, `write`,
    /// `flush`, `trim`, `cache`, `write_zeroes`, `block_status`,
    /// `disconnect` once ready. Commands only queue bytes: call
    /// [`NbdConnection::reregister`] (or [`NbdConnection::flush`]) after
    /// submitting. Leave the I/O methods (`recv_buf`, `transmit_slices`,
    /// ...) to this adapter.
    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
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
        &self.target
    }

    /// Counters of the socket calls made so far; read them at any time.
    pub fn io_stats(&self) -> IoStats {
        self.stats
    }

    /// Sets how many times a socket call is tried again at once when it
    /// would block in the middle of a message: a read that finds the socket
    /// empty while a reply is partly in, or a write that finds it full
    /// while a request is partly out (default
    /// [`DEFAULT_MID_MESSAGE_RETRIES`], per direction and turn; 0 turns
    /// this off). Call it any time. Servers write a reply and read a
    /// request as a whole, so the rest, or the room for it, comes within
    /// microseconds; a few immediate retries cost less client CPU than a
    /// sleep and a wake-up, and spare the server the cross-CPU wake-up.
    /// Nothing is retried between messages, where the wait can be long.
    /// Lower it if your loop must never spend a few microseconds on one
    /// connection.
    pub fn set_mid_message_retries(&mut self, retries: u32) {
        self.mid_message_retries = retries;
    }
}

impl Drop for NbdConnection {
    fn drop(&mut self) {
        // A polite goodbye when one can be sent without waiting.
        if !self.shut && self.conn.in_flight() == 0 {
            let _ = match self.conn.phase() {
                Phase::Ready => self.conn.disconnect(),
                Phase::Negotiating => self.conn.opt_abort(),
                _ => Ok(()),
            };
            self.send();
        }
        self.stream.shutdown();
    }
}

/// The socket address for `path`; a leading NUL byte selects the Linux
/// abstract namespace (as in `nbd+unix:///?socket=%00name`).
fn unix_addr(path: &Path) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if let Some(name) = bytes.strip_prefix(&[0]) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt;
            return std::os::unix::net::SocketAddr::from_abstract_name(name);
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract Unix sockets exist only on Linux",
            ));
        }
    }
    std::os::unix::net::SocketAddr::from_pathname(path)
}
