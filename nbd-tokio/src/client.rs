//! [`Client`]: the cheaply cloneable handle through which any task issues
//! commands to one connection.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_core::{CmdFlags, Config, Connection, ExportInfo, Extent, Phase, TlsMode};
use nbd_driver::{Completion, Connected, IoStats, Socket};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::reply::{SlotPool, Waiting};
use crate::task::{new_snapshot, ConnectionTask, Ctl, Msg, Op, OptOp, OptOut, Shared};

/// A handle to one NBD connection, for any number of tasks at once.
///
/// Every method takes `&self`; clone the handle (an `Arc` and a channel
/// sender) to give one to each task. Calls are pipelined: many can be in
/// flight together, sent in one vectored write where they coincide, and
/// they complete in whatever order the server answers. A call waits for
/// room when the connection's in-flight limits
/// ([`nbd_core::Limits::max_in_flight`], `max_bytes_in_flight`) are
/// reached: the channel to the task is bounded, so back-pressure reaches
/// the callers.
///
/// Nothing happens unless the [`ConnectionTask`] that
/// [`Client::connect`] returned is being polled (spawned or awaited).
///
/// # Cancellation
/// Dropping a call's future at any await point (a `select!` that took
/// another branch, `tokio::time::timeout`, an aborted task) cancels the
/// command: before it was sent, it is never sent; after, the task cancels
/// it in the core, which frees the buffer (owned by the core, never by the
/// future) and reads and drops the late reply into its own buffer. The
/// connection stays usable, and the command's slot in the in-flight table
/// is reused once that late reply has arrived ([`Client::in_flight`],
/// [`Client::abandoned`]). As with any cancellation the server may still
/// carry the command out: a cancelled write may be applied.
///
/// When the last handle is dropped, the connection ends: politely
/// (`NBD_CMD_DISC`) when nothing is owed, at once otherwise; the task then
/// resolves.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// Runs `f` (a blocking connect: DNS lookup, TCP connect, spawning a
/// server) on tokio's blocking threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::TaskGone)?
}

impl Client {
    // ----- connecting -----

    /// Connects to `target`: an NBD URI (`nbd://`, `nbd+unix://`; its
    /// export name replaces `cfg.export_name`) or a Unix socket path, and
    /// runs the handshake: to the transmission phase, or to the
    /// negotiating phase with [`Config::opt_mode`]. Then spawn (or await)
    /// the returned [`ConnectionTask`] and call commands on the
    /// [`Client`].
    ///
    /// [`Config::handshake_timeout`] (30 s by default) bounds it all, TCP
    /// connect included; a miss is [`Error::Closed`] with
    /// [`nbd_core::CloseReason::HandshakeTimedOut`] (or an [`Error::Io`] of
    /// kind `TimedOut` from the TCP connect). The host-name lookup and TCP
    /// connect run on tokio's blocking threads.
    pub async fn connect(target: &str, cfg: Config) -> Result<(Client, ConnectionTask)> {
        refuse_tls_uri(target)?;
        let start = Instant::now();
        let target = target.to_owned();
        let (c, cfg) = blocking(move || {
            let mut cfg = cfg;
            let c = nbd_driver::connect(&target, &mut cfg)?;
            Ok((c, cfg))
        })
        .await?;
        Client::start(c, cfg, start).await
    }

    /// Connects to an NBD URI, as [`Client::connect`] does; TLS URIs
    /// (`nbds`, `nbds+unix`) and vsock give [`Error::Unsupported`] before
    /// anything is sent.
    pub async fn connect_uri(uri: &str, cfg: Config) -> Result<(Client, ConnectionTask)> {
        refuse_tls_uri(uri)?;
        let start = Instant::now();
        let uri = uri.to_owned();
        let (c, cfg) = blocking(move || {
            let mut cfg = cfg;
            let c = nbd_driver::connect_uri(&uri, &mut cfg)?;
            Ok((c, cfg))
        })
        .await?;
        Client::start(c, cfg, start).await
    }

    /// Connects to a Unix domain socket (a leading NUL byte names a Linux
    /// abstract socket) and runs the handshake.
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        cfg: Config,
    ) -> Result<(Client, ConnectionTask)> {
        let start = Instant::now();
        let path = path.as_ref();
        let s = nbd_driver::connect_unix(path)?;
        Client::start(Connected::new(s, path.display().to_string()), cfg, start).await
    }

    /// Connects over TCP, trying every address `host:port` resolves to
    /// (with `TCP_NODELAY`), within [`Config::handshake_timeout`], and runs
    /// the handshake.
    pub async fn connect_tcp(
        host: &str,
        port: u16,
        cfg: Config,
    ) -> Result<(Client, ConnectionTask)> {
        let start = Instant::now();
        let host = host.to_owned();
        let timeout = cfg.handshake_timeout;
        let c = blocking(move || {
            let s = nbd_driver::connect_tcp_within((host.as_str(), port), timeout)?;
            let target = s.peer_description();
            Ok(Connected::new(s, target))
        })
        .await?;
        Client::start(c, cfg, start).await
    }

    /// Starts `argv` as a server speaking NBD on its stdin and stdout
    /// (libnbd's `nbd_connect_command`, e.g. `["nbdkit", "-s", "memory",
    /// "1M"]`) over a socket pair, and runs the handshake. The server is
    /// stopped and reaped when the connection ends.
    pub async fn connect_command(
        argv: &[impl AsRef<std::ffi::OsStr>],
        cfg: Config,
    ) -> Result<(Client, ConnectionTask)> {
        let start = Instant::now();
        let argv: Vec<std::ffi::OsString> = argv.iter().map(|a| a.as_ref().to_owned()).collect();
        let c = blocking(move || Ok(nbd_driver::connect_command(&argv)?)).await?;
        Client::start(c, cfg, start).await
    }

    /// Starts `argv` with systemd socket activation (libnbd's
    /// `nbd_connect_systemd_socket_activation`: a listening socket as fd
    /// 3), connects to it and runs the handshake. The server is stopped and
    /// reaped when the connection ends.
    pub async fn connect_systemd_socket_activation(
        argv: &[impl AsRef<std::ffi::OsStr>],
        cfg: Config,
    ) -> Result<(Client, ConnectionTask)> {
        let start = Instant::now();
        let argv: Vec<std::ffi::OsString> = argv.iter().map(|a| a.as_ref().to_owned()).collect();
        let c = blocking(move || Ok(nbd_driver::connect_socket_activation(&argv, None)?)).await?;
        Client::start(c, cfg, start).await
    }

    /// Runs an NBD client over a Unix stream you connected yourself (for
    /// example one end of `UnixStream::pair`); it is switched to
    /// non-blocking mode.
    pub async fn from_unix_stream(
        s: std::os::unix::net::UnixStream,
        cfg: Config,
    ) -> Result<(Client, ConnectionTask)> {
        let start = Instant::now();
        let s = Socket::from_unix(s).map_err(|e| Error::io("set_nonblocking", e))?;
        Client::start(Connected::new(s, "socket"), cfg, start).await
    }

    /// Runs an NBD client over a connected stream socket given as a file
    /// descriptor (Unix or TCP; libnbd's `nbd_connect_socket`), which the
    /// connection owns from now on.
    pub async fn from_fd(
        fd: std::os::fd::OwnedFd,
        cfg: Config,
    ) -> Result<(Client, ConnectionTask)> {
        let start = Instant::now();
        let s = Socket::from_fd(fd).map_err(|e| Error::io("adopt socket", e))?;
        let target = s.peer_description();
        Client::start(Connected::new(s, target), cfg, start).await
    }

    /// `start`: when the connect began, which the handshake deadline
    /// counts from.
    async fn start(c: Connected, cfg: Config, start: Instant) -> Result<(Client, ConnectionTask)> {
        if cfg.tls != TlsMode::Disable {
            return Err(Error::Unsupported("TLS is not implemented yet".into()));
        }
        let deadline = cfg.handshake_timeout.and_then(|d| start.checked_add(d));
        let capacity = cfg.limits.max_in_flight.clamp(1, 1024);
        let mut conn = Connection::new(cfg, Instant::now());
        conn.set_handshake_deadline(deadline);
        // tokio 1.54 deprecates this constructor because a `T` that does
        // not own its descriptor could close it while registered (its
        // replacement is `unsafe`, which this crate forbids). `Socket` owns
        // its descriptor, and the `AsyncFd` deregisters before dropping it,
        // so the safe constructor is sound here.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(c.socket, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| Error::io("register the socket with the tokio reactor", e))?;
        let (tx, rx) = mpsc::channel(capacity);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            in_flight: Default::default(),
            abandoned: Default::default(),
            snapshot: Mutex::new(new_snapshot()),
            ctl: ctl_tx,
            slots: SlotPool::new(capacity * 2 + 64),
        });
        let mut task =
            ConnectionTask::new(conn, fd, c.target, rx, ctl_rx, shared.clone(), c.process);
        task.handshake().await?;
        Ok((Client { tx, shared }, task))
    }

    // ----- plumbing -----

    /// The error for a call that found the task gone.
    fn gone(&self) -> Error {
        match self.shared.snapshot().close {
            Some(r) => Error::Closed(r),
            None => Error::TaskGone,
        }
    }

    async fn command(&self, op: Op) -> Result<Completion> {
        // Dropped before its outcome (this future cancelled), `waiting`
        // asks the task to cancel the command.
        let (waiting, reply) = Waiting::new(&self.shared.slots, &self.shared.ctl);
        if self.tx.send(Msg::Cmd { op, reply }).await.is_err() {
            return Err(self.gone());
        }
        match waiting.await {
            Some(Ok(c)) => {
                c.result.as_ref().map_err(|e| Error::Command(e.clone()))?;
                Ok(c)
            }
            Some(Err(e)) => Err(e),
            None => Err(self.gone()),
        }
    }

    async fn option(&self, op: OptOp) -> Result<OptOut> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Opt { op, reply }).await.is_err() {
            return Err(self.gone());
        }
        rx.await.unwrap_or_else(|_| Err(self.gone()))
    }

    // ----- commands -----

    /// Reads `buf.len()` bytes at `offset` into `buf` and returns it
    /// filled. The buffer moves into the core (payload bytes land in it
    /// straight from the socket where possible) and comes back: reuse it
    /// for the next read to avoid allocating. Ready phase only.
    pub async fn read(&self, offset: u64, buf: BytesMut, flags: CmdFlags) -> Result<BytesMut> {
        let c = self.command(Op::Read { offset, buf, flags }).await?;
        Ok(c.buffer.unwrap_or_default())
    }

    /// Writes `data` at `offset`; `data` goes to the socket without a copy
    /// (clone a `Bytes` to keep it: a reference count). Flags:
    /// [`CmdFlags::FUA`].
    pub async fn write(&self, offset: u64, data: Bytes, flags: CmdFlags) -> Result<()> {
        self.command(Op::Write {
            offset,
            data,
            flags,
        })
        .await
        .map(drop)
    }

    /// Flushes the server's cache to stable storage (`NBD_CMD_FLUSH`).
    pub async fn flush(&self, flags: CmdFlags) -> Result<()> {
        self.command(Op::Flush(flags)).await.map(drop)
    }

    /// Trims (discards) `length` bytes at `offset` (`NBD_CMD_TRIM`).
    pub async fn trim(&self, offset: u64, length: u64, flags: CmdFlags) -> Result<()> {
        self.command(Op::Trim(offset, length, flags))
            .await
            .map(drop)
    }

    /// Asks the server to prefetch `length` bytes at `offset`
    /// (`NBD_CMD_CACHE`).
    pub async fn cache(&self, offset: u64, length: u64, flags: CmdFlags) -> Result<()> {
        self.command(Op::Cache(offset, length, flags))
            .await
            .map(drop)
    }

    /// Writes zeroes over `length` bytes at `offset`
    /// (`NBD_CMD_WRITE_ZEROES`; flags `FUA`, `NO_HOLE`, `FAST_ZERO`).
    pub async fn zero(&self, offset: u64, length: u64, flags: CmdFlags) -> Result<()> {
        self.command(Op::Zero(offset, length, flags))
            .await
            .map(drop)
    }

    /// Block status of `length` bytes at `offset` for every negotiated
    /// meta context, as (context name, extents). Ask for contexts with
    /// [`Config::meta_contexts`] (or [`Config::with_base_allocation`]) or
    /// [`Client::opt_set_meta_context`].
    pub async fn block_status(
        &self,
        offset: u64,
        length: u64,
        flags: CmdFlags,
    ) -> Result<Vec<(String, Vec<Extent>)>> {
        let c = self.command(Op::BlockStatus(offset, length, flags)).await?;
        let names = self.shared.snapshot().contexts;
        Ok(c.extents
            .into_iter()
            .map(|(id, e)| {
                let name = names
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_else(|| format!("context {id}"));
                (name, e)
            })
            .collect())
    }

    // ----- deadlines, the end -----

    /// Sets the deadline of the commands submitted from now on (`None`: no
    /// deadline, the default), replacing [`Config::command_timeout`]. A
    /// command that misses it fails with
    /// [`nbd_core::CommandError::TimedOut`] and the connection stays
    /// usable. The deadline counts from when the command reaches the core
    /// (after any wait for room), where `tokio::time::timeout` around the
    /// call counts from the call.
    pub async fn set_command_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.tx
            .send(Msg::SetCommandTimeout(timeout))
            .await
            .map_err(|_| self.gone())
    }

    /// Ends the connection politely: waits (at most
    /// [`Config::handshake_timeout`]) for the requests in flight, sends
    /// `NBD_CMD_DISC` (`NBD_OPT_ABORT` in option mode) and waits for the
    /// server to close. `Ok(())` once the connection ended cleanly
    /// (including when it already had); later calls fail with
    /// [`Error::Closed`]. The [`ConnectionTask`] then resolves.
    pub async fn disconnect(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Disconnect { reply }).await.is_err() {
            return match self.shared.snapshot().close {
                Some(r) if !r.is_loss() => Ok(()),
                _ => Err(self.gone()),
            };
        }
        rx.await.unwrap_or_else(|_| Err(self.gone()))
    }

    /// Ends the connection now, without a goodbye: every call in flight
    /// fails with [`nbd_core::CommandError::ConnectionClosed`], later calls
    /// with [`Error::Closed`] ([`nbd_core::CloseReason::AbortedByCaller`]).
    /// Never waits: for giving up on a server that stopped answering.
    pub fn abort(&self, reason: &str) {
        let _ = self.shared.ctl.send(Ctl::Abort(reason.to_owned()));
    }

    // ----- option mode -----

    /// Option mode: sets the export that `opt_info`/`opt_go` will name.
    pub async fn set_export_name(&self, name: &str) -> Result<()> {
        self.option(OptOp::SetExportName(name.to_owned()))
            .await
            .map(drop)
    }

    /// Option mode: lists the exports as (name, description)
    /// (`NBD_OPT_LIST`).
    pub async fn opt_list(&self) -> Result<Vec<(String, String)>> {
        match self.option(OptOp::List).await? {
            OptOut::Exports(v) => Ok(v),
            _ => Ok(Vec::new()),
        }
    }

    /// Option mode: asks about the current export without entering
    /// transmission (`NBD_OPT_INFO`); [`Client::export_info`] then
    /// reports it.
    pub async fn opt_info(&self) -> Result<()> {
        self.option(OptOp::Info).await.map(drop)
    }

    /// Option mode: selects the current export and enters the
    /// transmission phase (`NBD_OPT_GO`).
    pub async fn opt_go(&self) -> Result<()> {
        self.option(OptOp::Go).await.map(drop)
    }

    /// Option mode: `NBD_OPT_STRUCTURED_REPLY`; true if the server agreed.
    pub async fn opt_structured_reply(&self) -> Result<bool> {
        match self.option(OptOp::StructuredReply).await? {
            OptOut::Agreed(b) => Ok(b),
            _ => Ok(true),
        }
    }

    /// Option mode: `NBD_OPT_EXTENDED_HEADERS`; true if the server agreed.
    pub async fn opt_extended_headers(&self) -> Result<bool> {
        match self.option(OptOp::ExtendedHeaders).await? {
            OptOut::Agreed(b) => Ok(b),
            _ => Ok(true),
        }
    }

    /// Option mode: `NBD_OPT_LIST_META_CONTEXT` with these queries (empty
    /// asks for all); returns the names.
    pub async fn opt_list_meta_context<S: AsRef<str>>(&self, queries: &[S]) -> Result<Vec<String>> {
        let q = queries.iter().map(|s| s.as_ref().to_owned()).collect();
        match self.option(OptOp::ListMetaContext(q)).await? {
            OptOut::Contexts(v) => Ok(v),
            _ => Ok(Vec::new()),
        }
    }

    /// Option mode: `NBD_OPT_SET_META_CONTEXT` with these queries; returns
    /// what was selected.
    pub async fn opt_set_meta_context<S: AsRef<str>>(&self, queries: &[S]) -> Result<Vec<String>> {
        let q = queries.iter().map(|s| s.as_ref().to_owned()).collect();
        match self.option(OptOp::SetMetaContext(q)).await? {
            OptOut::Contexts(v) => Ok(v),
            _ => Ok(Vec::new()),
        }
    }

    /// Option mode: ends negotiation politely (`NBD_OPT_ABORT`) and closes;
    /// the same as [`Client::disconnect`] in that phase.
    pub async fn opt_abort(&self) -> Result<()> {
        self.disconnect().await
    }

    // ----- getters -----

    /// What the server said about the export (once ready, or after
    /// `opt_info`).
    pub fn export_info(&self) -> Option<ExportInfo> {
        self.shared.snapshot().info
    }

    /// The export size in bytes; [`nbd_core::UsageError::WrongPhase`]
    /// before the export is known.
    pub fn size(&self) -> Result<u64> {
        self.export_info()
            .map(|i| i.size)
            .ok_or(Error::Usage(nbd_core::UsageError::WrongPhase {
                call: "size",
                needed: "connected, or after opt_info",
                actual: "negotiating",
            }))
    }

    /// The connection's phase, as of the task's last turn.
    pub fn phase(&self) -> Phase {
        self.shared.snapshot().phase
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<nbd_core::CloseReason> {
        self.shared.snapshot().close
    }

    /// Whether structured replies are in use.
    pub fn structured_replies_negotiated(&self) -> bool {
        self.shared.snapshot().structured
    }

    /// Whether extended headers are in use.
    pub fn extended_headers_negotiated(&self) -> bool {
        self.shared.snapshot().extended
    }

    /// The meta contexts negotiated, as (id, name).
    pub fn meta_contexts(&self) -> Vec<(u32, String)> {
        self.shared.snapshot().contexts
    }

    /// The largest write payload the connection sends.
    pub fn payload_max(&self) -> u64 {
        self.shared.snapshot().payload_max
    }

    /// Slots of the core's in-flight table in use, as of the task's last
    /// turn: requests awaiting their reply, including abandoned ones
    /// (cancelled or timed out) whose late reply is still due. Back to 0
    /// once every reply arrived: nothing leaks.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// How many of [`Client::in_flight`] are abandoned: completed towards
    /// the caller (cancelled, dropped, timed out) while the server's reply
    /// is still due.
    pub fn abandoned(&self) -> usize {
        self.shared.abandoned.load(Ordering::Relaxed)
    }

    /// Counters of the socket calls made so far.
    pub fn io_stats(&self) -> IoStats {
        self.shared.snapshot().stats
    }
}

/// TLS is not wired into this adapter yet: `nbds` URIs are refused before
/// anything is connected or sent (nbd-std and nbd-mio speak TLS).
fn refuse_tls_uri(target: &str) -> Result<()> {
    if nbd_core::uri::is_nbd_uri(target) {
        if let Ok(u) = nbd_core::NbdUri::parse(target) {
            if u.tls {
                return Err(Error::Unsupported(format!(
                    "{} URIs: TLS is not available in nbd-tokio yet (nbd-std and nbd-mio have it)",
                    u.scheme()
                )));
            }
        }
    }
    Ok(())
}
