//! [`Client`]: one NBD connection over a Unix or TCP socket, driven by
//! `nbd-core`, with libnbd's blocking API and a pipelined (aio) API.

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use nbd_core::uri::{NbdUri, Transport};
use nbd_core::{
    BlockSize, CloseReason, CmdFlags, CommandError, Config, Connection, Cookie, Event, ExportInfo,
    Extent, OptionKind, Phase, Protocol, ReadChunkKind, UsageError,
};
use rustix::event::{poll, PollFd, PollFlags};

use crate::error::{Error, Result};

/// Immediate retries of a read that finds the socket empty in the middle
/// of a reply, or of a write that finds it full in the middle of a request,
/// before waiting in poll(2): a few microseconds at most (see nbd-mio's
/// `set_mid_message_retries` for the reasoning and BENCHMARKS.md for the
/// figures).
const MID_MESSAGE_RETRIES: u32 = 16;

/// The socket under a client.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(b),
            Stream::Tcp(s) => s.write_vectored(b),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

/// A completed command, as returned by the pipelined API.
#[derive(Debug)]
pub struct Completion {
    /// Outcome.
    pub result: std::result::Result<(), CommandError>,
    /// The read buffer, handed back (reads only).
    pub buffer: Option<BytesMut>,
    /// Block status answers: (context id, extents).
    pub extents: Vec<(u32, Vec<Extent>)>,
    /// Structured read chunks: (offset, length, kind), for reads issued with chunk reporting.
    pub chunks: Vec<(u64, u64, ReadChunkKind)>,
}

#[derive(Debug, Default)]
struct Partial {
    extents: Vec<(u32, Vec<Extent>)>,
    chunks: Vec<(u64, u64, ReadChunkKind)>,
}

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
/// flight completes with [`CommandError::ConnectionClosed`]. From then on,
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
    stream: Stream,
    target: String,
    done: HashMap<Cookie, Completion>,
    partial: HashMap<Cookie, Partial>,
    listed: Vec<(String, String)>,
    contexts: Vec<String>,
    opt_result: Option<std::result::Result<OptionKind, Error>>,
    went: bool,
    unsupported: Option<String>,
    spare: Option<BytesMut>,
}

impl Client {
    /// Connects to `target`: an NBD URI (`nbd://`, `nbd+unix://`) or a Unix
    /// socket path. The URI's export name overrides `cfg.export_name`.
    pub fn connect(target: &str, cfg: Config) -> Result<Client> {
        if nbd_core::uri::is_nbd_uri(target) {
            Client::connect_uri(target, cfg)
        } else {
            Client::connect_unix(target, cfg)
        }
    }

    /// Connects to an NBD URI (the export name comes from the URI).
    pub fn connect_uri(uri: &str, mut cfg: Config) -> Result<Client> {
        let u = NbdUri::parse(uri)?;
        if u.tls {
            // Rule 120: a client without TLS fails on URIs that require it.
            return Err(Error::Unsupported(format!(
                "{}: TLS (nbds URIs) is not supported yet",
                u.scheme()
            )));
        }
        cfg.export_name = u.export_name.clone();
        let stream = match &u.transport {
            Transport::Unix { path } => {
                Stream::Unix(UnixStream::connect(path).map_err(|e| Error::Io {
                    context: format!("connect: {}", path.display()),
                    source: e,
                })?)
            }
            Transport::Tcp { host, port } => Stream::Tcp(tcp_connect((host.as_str(), *port))?),
            Transport::Vsock { .. } => {
                return Err(Error::Unsupported(
                    "vsock transport is not supported yet".into(),
                ))
            }
        };
        Client::handshake(stream, uri.to_owned(), cfg)
    }

    /// Connects to a Unix domain socket.
    pub fn connect_unix(path: impl AsRef<Path>, cfg: Config) -> Result<Client> {
        let path = path.as_ref();
        let s = UnixStream::connect(path).map_err(|e| Error::Io {
            context: format!("connect: {}", path.display()),
            source: e,
        })?;
        Client::handshake(Stream::Unix(s), path.display().to_string(), cfg)
    }

    /// Connects over TCP (with `TCP_NODELAY`, rule 2).
    pub fn connect_tcp(addr: impl ToSocketAddrs, cfg: Config) -> Result<Client> {
        let s = tcp_connect(addr)?;
        let target = s
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".into());
        Client::handshake(Stream::Tcp(s), target, cfg)
    }

    /// Runs an NBD client over an already connected Unix stream (for
    /// example one end of a socket pair).
    pub fn connect_socket(s: UnixStream, cfg: Config) -> Result<Client> {
        Client::handshake(Stream::Unix(s), "socket".into(), cfg)
    }

    fn handshake(stream: Stream, target: String, cfg: Config) -> Result<Client> {
        stream.set_nonblocking().map_err(|e| Error::Io {
            context: "set_nonblocking".into(),
            source: e,
        })?;
        let mut c = Client {
            conn: Connection::new(cfg),
            stream,
            target,
            done: HashMap::new(),
            partial: HashMap::new(),
            listed: Vec::new(),
            contexts: Vec::new(),
            opt_result: None,
            went: false,
            unsupported: None,
            spare: None,
        };
        c.run_until(|c| c.conn.phase() != Phase::Connecting)?;
        c.check_open()?;
        Ok(c)
    }

    /// What this client connected to (the URI or socket path given).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The core state machine (for getters not mirrored here).
    pub fn connection(&self) -> &Connection {
        &self.conn
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
    /// in poll(2) only if nothing could be done and `block` is set.
    fn pump(&mut self, block: bool) -> Result<()> {
        let mut progressed = false;
        let mut write_retries = 0;
        // Write as much as the socket takes.
        while self.conn.wants_write() {
            let mut slices = [IoSlice::new(&[]); 64];
            let n = self.conn.transmit_slices(&mut slices);
            match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => {
                    self.conn.handle_transport_error("write returned 0");
                    break;
                }
                Ok(k) => {
                    self.conn.transmitted(k);
                    progressed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The server is reading a request we began: room for
                    // the rest comes sooner than poll(2) would report it.
                    if write_retries < MID_MESSAGE_RETRIES && self.conn.request_in_progress() {
                        write_retries += 1;
                        continue;
                    }
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.conn.is_finished() {
                        break;
                    }
                    self.conn.handle_transport_error(format!("write: {e}"));
                    break;
                }
            }
        }
        // Read until the socket is empty (bounded, to keep writing flowing).
        let (mut reads, mut retries) = (0, 0);
        while reads < 16 {
            if !self.conn.wants_read() {
                break;
            }
            let buf = self.conn.recv_buf();
            match self.stream.read(buf) {
                Ok(0) => {
                    self.conn.handle_eof();
                    progressed = true;
                    break;
                }
                Ok(n) => {
                    self.conn.recv_commit(n);
                    progressed = true;
                    reads += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The rest of a reply that has begun follows within
                    // microseconds: retrying costs less than a poll(2).
                    if retries < MID_MESSAGE_RETRIES && self.conn.reply_in_progress() {
                        retries += 1;
                        continue;
                    }
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.conn.handle_transport_error(format!("read: {e}"));
                    progressed = true;
                    break;
                }
            }
        }
        self.dispatch();
        if self.conn.is_finished() {
            // Best effort: whatever is queued (an ABORT) goes out, then hang up.
            let mut slices = [IoSlice::new(&[]); 8];
            let n = self.conn.transmit_slices(&mut slices);
            let _ = self.stream.write_vectored(&slices[..n]);
            self.stream.shutdown();
            return Ok(());
        }
        if progressed || !block {
            return Ok(());
        }
        let mut flags = PollFlags::empty();
        if self.conn.wants_read() {
            flags |= PollFlags::IN;
        }
        if self.conn.wants_write() {
            flags |= PollFlags::OUT;
        }
        if flags.is_empty() {
            return Ok(());
        }
        let mut fds = [PollFd::new(&self.stream, flags)];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(Error::Io {
                context: "poll".into(),
                source: e.into(),
            }),
        }
    }

    fn dispatch(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::ExportListed { name, description } => self.listed.push((name, description)),
                Event::MetaContext { name, .. } => self.contexts.push(name),
                Event::OptionSucceeded(k) => self.opt_result = Some(Ok(k)),
                Event::OptionError { option, error } => {
                    self.opt_result = Some(Err(Error::Option { option, error }))
                }
                Event::StartTls => {
                    self.unsupported = Some("TLS is not supported by this client yet".into());
                    self.conn
                        .handle_transport_error("TLS is not supported by this client yet");
                }
                Event::GoSucceeded(_) => self.went = true,
                Event::ReadChunk {
                    cookie,
                    offset,
                    length,
                    kind,
                } => self
                    .partial
                    .entry(cookie)
                    .or_default()
                    .chunks
                    .push((offset, length, kind)),
                Event::BlockStatus {
                    cookie,
                    context_id,
                    extents,
                } => self
                    .partial
                    .entry(cookie)
                    .or_default()
                    .extents
                    .push((context_id, extents)),
                Event::CommandDone {
                    cookie,
                    result,
                    buffer,
                } => {
                    let p = self.partial.remove(&cookie).unwrap_or_default();
                    self.done.insert(
                        cookie,
                        Completion {
                            result,
                            buffer,
                            extents: p.extents,
                            chunks: p.chunks,
                        },
                    );
                }
                Event::Closed(_) => {}
                _ => {}
            }
        }
    }

    fn run_until(&mut self, mut f: impl FnMut(&Client) -> bool) -> Result<()> {
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
            self.pump(true)?;
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
            let _ = self.pump(false);
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
        let _ = self.pump(false);
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
        self.finish_writes();
        let _ = self.run_until(|c| c.conn.is_finished());
        self.check_open()
    }

    /// After `NBD_CMD_DISC` or `NBD_OPT_ABORT`: sends what is queued, then
    /// shuts the socket down for writing (as libnbd does), so a server that
    /// waits for the client's EOF cannot leave the wait for its close hanging.
    fn finish_writes(&mut self) {
        let _ = self.run_until(|c| !c.conn.wants_write() || c.conn.is_finished());
        self.stream.shutdown_write();
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
    pub fn aio_pread(&mut self, buf: BytesMut, offset: u64, flags: u16) -> Result<Cookie> {
        self.wait_room(buf.len() as u64)?;
        Ok(self
            .conn
            .read(offset, buf, CmdFlags::from_bits(flags))
            .map_err(UsageError::from)?)
    }

    /// Queues a read that also reports every structured chunk.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_pread_structured(
        &mut self,
        buf: BytesMut,
        offset: u64,
        flags: u16,
    ) -> Result<Cookie> {
        self.wait_room(buf.len() as u64)?;
        Ok(self
            .conn
            .read_with_chunks(offset, buf, CmdFlags::from_bits(flags))
            .map_err(UsageError::from)?)
    }

    /// Queues a write of `data` at `offset` (sent without copying `data`).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_pwrite(&mut self, data: Bytes, offset: u64, flags: u16) -> Result<Cookie> {
        self.wait_room(data.len() as u64)?;
        Ok(self
            .conn
            .write(offset, data, CmdFlags::from_bits(flags))
            .map_err(UsageError::from)?)
    }

    /// Queues a flush.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_flush(&mut self, flags: u16) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.flush(CmdFlags::from_bits(flags))?)
    }

    /// Queues a trim.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_trim(&mut self, count: u64, offset: u64, flags: u16) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.trim(offset, count, CmdFlags::from_bits(flags))?)
    }

    /// Queues a cache (prefetch) hint.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_cache(&mut self, count: u64, offset: u64, flags: u16) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self.conn.cache(offset, count, CmdFlags::from_bits(flags))?)
    }

    /// Queues a write-zeroes.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_zero(&mut self, count: u64, offset: u64, flags: u16) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self
            .conn
            .write_zeroes(offset, count, CmdFlags::from_bits(flags))?)
    }

    /// Queues a block-status query.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn aio_block_status(&mut self, count: u64, offset: u64, flags: u16) -> Result<Cookie> {
        self.wait_room(0)?;
        Ok(self
            .conn
            .block_status(offset, count, CmdFlags::from_bits(flags))?)
    }

    /// Requests in flight.
    pub fn aio_in_flight(&self) -> usize {
        self.conn.in_flight()
    }

    /// Retires a completed command: `None` while still in flight.
    pub fn aio_command_completed(&mut self, cookie: Cookie) -> Option<Completion> {
        self.done.remove(&cookie)
    }

    /// Makes progress: sends, receives, and blocks until something happens.
    pub fn poll(&mut self) -> Result<()> {
        self.pump(true)?;
        self.check_open()
    }

    /// Blocks until `cookie` completes and retires it.
    pub fn wait(&mut self, cookie: Cookie) -> Result<Completion> {
        if let Some(c) = self.done.remove(&cookie) {
            return Ok(c);
        }
        let r = self.run_until(|c| c.done.contains_key(&cookie));
        match self.done.remove(&cookie) {
            Some(c) => Ok(c),
            None => Err(r.err().unwrap_or(Error::Closed(CloseReason::Aborted))),
        }
    }

    /// Blocks until any command completes and retires it.
    pub fn wait_any(&mut self) -> Result<(Cookie, Completion)> {
        if self.done.is_empty() {
            self.run_until(|c| !c.done.is_empty())?;
        }
        let k = *self
            .done
            .keys()
            .next()
            .ok_or(Error::Closed(CloseReason::Aborted))?;
        let c = self
            .done
            .remove(&k)
            .ok_or(Error::Closed(CloseReason::Aborted))?;
        Ok((k, c))
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
    pub fn pread(&mut self, buf: &mut [u8], offset: u64, flags: u16) -> Result<()> {
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
    pub fn pread_buf(&mut self, buf: BytesMut, offset: u64, flags: u16) -> Result<BytesMut> {
        let cookie = self.aio_pread(buf, offset, flags)?;
        let c = self.wait_ok(cookie)?;
        Ok(c.buffer.unwrap_or_default())
    }

    /// Reads with structured-reply details: returns the chunks seen as
    /// (offset, length, kind), in arrival order (libnbd's `pread_structured`).
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pread_structured(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        flags: u16,
    ) -> Result<Vec<(u64, u64, ReadChunkKind)>> {
        let mut b = BytesMut::zeroed(buf.len());
        b.truncate(buf.len());
        let cookie = self.aio_pread_structured(b, offset, flags)?;
        let c = self.wait(cookie)?;
        if let (Ok(()), Some(b)) = (&c.result, &c.buffer) {
            buf.copy_from_slice(&b[..buf.len()]);
        }
        c.result.map_err(Error::from)?;
        Ok(c.chunks)
    }

    /// Writes `buf` at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pwrite(&mut self, buf: &[u8], offset: u64, flags: u16) -> Result<()> {
        self.pwrite_bytes(Bytes::copy_from_slice(buf), offset, flags)
    }

    /// Writes an owned buffer at `offset` without copying it.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn pwrite_bytes(&mut self, data: Bytes, offset: u64, flags: u16) -> Result<()> {
        let cookie = self.aio_pwrite(data, offset, flags)?;
        self.wait_ok(cookie).map(|_| ())
    }

    /// Flushes the server's cache to stable storage.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn flush(&mut self, flags: u16) -> Result<()> {
        let c = self.aio_flush(flags)?;
        self.wait_ok(c).map(|_| ())
    }

    /// Trims (discards) `count` bytes at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn trim(&mut self, count: u64, offset: u64, flags: u16) -> Result<()> {
        let c = self.aio_trim(count, offset, flags)?;
        self.wait_ok(c).map(|_| ())
    }

    /// Asks the server to prefetch `count` bytes at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn cache(&mut self, count: u64, offset: u64, flags: u16) -> Result<()> {
        let c = self.aio_cache(count, offset, flags)?;
        self.wait_ok(c).map(|_| ())
    }

    /// Writes zeroes over `count` bytes at `offset`.
    ///
    /// If the connection has already ended: [`Error::Closed`]; if it is
    /// alive but in the wrong phase: [`Error::Usage`]
    /// ([details](Client#after-the-connection-ended)).
    pub fn zero(&mut self, count: u64, offset: u64, flags: u16) -> Result<()> {
        let c = self.aio_zero(count, offset, flags)?;
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
        count: u64,
        offset: u64,
        flags: u16,
    ) -> Result<Vec<(String, Vec<Extent>)>> {
        let c = self.aio_block_status(count, offset, flags)?;
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
                self.run_until(|c| c.conn.in_flight() == 0)?;
                // The core may have sent NBD_CMD_DISC already (rule 104:
                // soft disconnect after an ESHUTDOWN reply); then only the
                // server's close is awaited.
                match self.conn.disconnect() {
                    Ok(()) | Err(UsageError::WrongPhase { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.finish_writes();
                let _ = self.run_until(|c| c.conn.is_finished());
                self.shutdown_result()
            }
            _ => self.shutdown_result(),
        }
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

fn tcp_connect(addr: impl ToSocketAddrs) -> Result<TcpStream> {
    let mut last = None;
    let addrs = addr.to_socket_addrs().map_err(|e| Error::Io {
        context: "resolve".into(),
        source: e,
    })?;
    for a in addrs {
        match TcpStream::connect(a) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((a, e)),
        }
    }
    Err(match last {
        Some((a, e)) => Error::Io {
            context: format!("connect: {a}"),
            source: e,
        },
        None => Error::Io {
            context: "connect".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        },
    })
}

impl Drop for Client {
    fn drop(&mut self) {
        // A polite goodbye when possible; never block for long.
        if matches!(self.conn.phase(), Phase::Ready | Phase::Negotiating)
            && self.conn.in_flight() == 0
        {
            let sent = match self.conn.phase() {
                Phase::Ready => self.conn.disconnect().is_ok(),
                _ => self.conn.opt_abort().is_ok(),
            };
            if sent {
                let _ = self.pump(false);
            }
        }
        self.stream.shutdown();
    }
}
