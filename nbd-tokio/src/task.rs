//! [`ConnectionTask`]: the future that owns the core and the socket and
//! drives them on the tokio reactor, over the shared [`nbd_driver::Driver`].

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_core::{
    CloseReason, CmdFlags, Connection, Cookie, Event, ExportInfo, OptionKind, Phase, UsageError,
};
use nbd_driver::{Demux, Driver, IoStats, RecvUntil, Socket, Subprocess, Transport};
use tokio::io::unix::AsyncFd;
use tokio::io::Ready;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;

use crate::error::{Error, Result};
use crate::reply::{Reply, SlotPool};

/// Reads per turn before queued requests get a look in (each read takes
/// as much as the socket holds, up to the core's receive buffer).
const READS_PER_TURN: u32 = 16;
/// Vectored writes per turn before replies get a look in.
const WRITES_PER_TURN: u32 = 4;
/// Turns of one `poll` before the task yields to the runtime, so that the
/// tasks it woke (and others) run even while the socket stays busy.
const TURNS_PER_POLL: u32 = 32;

/// A command for the core, as a client call sends it to the task.
#[derive(Debug)]
pub(crate) enum Op {
    Read {
        offset: u64,
        buf: BytesMut,
        flags: CmdFlags,
    },
    Write {
        offset: u64,
        data: Bytes,
        flags: CmdFlags,
    },
    Flush(CmdFlags),
    Trim(u64, u64, CmdFlags),
    Cache(u64, u64, CmdFlags),
    Zero(u64, u64, CmdFlags),
    BlockStatus(u64, u64, CmdFlags),
}

/// An option-mode call.
#[derive(Debug)]
pub(crate) enum OptOp {
    SetExportName(String),
    List,
    Info,
    Go,
    StructuredReply,
    ExtendedHeaders,
    ListMetaContext(Vec<String>),
    SetMetaContext(Vec<String>),
}

/// What an option call produced.
#[derive(Debug)]
pub(crate) enum OptOut {
    Done,
    Agreed(bool),
    Exports(Vec<(String, String)>),
    Contexts(Vec<String>),
}

/// A message from a client handle to the task (bounded channel).
#[derive(Debug)]
pub(crate) enum Msg {
    Cmd {
        op: Op,
        reply: Reply,
    },
    Opt {
        op: OptOp,
        reply: oneshot::Sender<Result<OptOut>>,
    },
    Disconnect {
        reply: oneshot::Sender<Result<()>>,
    },
    SetCommandTimeout(Option<Duration>),
}

/// Control messages that must never wait behind the bounded channel
/// (unbounded; sent from `Drop` and from synchronous calls).
#[derive(Debug)]
pub(crate) enum Ctl {
    /// A command future was dropped: find the commands nobody awaits any
    /// more and cancel them in the core.
    Sweep,
    /// End the connection now.
    Abort(String),
}

/// What the task publishes for the client handles' getters.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) info: Option<ExportInfo>,
    pub(crate) phase: Phase,
    pub(crate) close: Option<CloseReason>,
    pub(crate) contexts: Vec<(u32, String)>,
    pub(crate) structured: bool,
    pub(crate) extended: bool,
    pub(crate) stats: IoStats,
    pub(crate) payload_max: u64,
}

/// State shared by the task and every client handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) abandoned: AtomicUsize,
    pub(crate) snapshot: Mutex<Snapshot>,
    pub(crate) ctl: mpsc::UnboundedSender<Ctl>,
    /// Reply slots for the calls, reused.
    pub(crate) slots: SlotPool,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The socket as the driver sees it, remembering whether the last read or
/// write found it empty or full, so the task clears tokio's cached
/// readiness exactly then.
struct Tracked<'a> {
    socket: &'a mut Socket,
    read_blocked: bool,
    write_blocked: bool,
}

impl<'a> Tracked<'a> {
    fn new(socket: &'a mut Socket) -> Self {
        Tracked {
            socket,
            read_blocked: false,
            write_blocked: false,
        }
    }
}

fn would_block<T>(r: &io::Result<T>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl Transport for Tracked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.socket.read(buf);
        self.read_blocked = would_block(&r);
        r
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let r = self.socket.read_vectored(bufs);
        self.read_blocked = would_block(&r);
        r
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let r = self.socket.write_vectored(bufs);
        self.write_blocked = would_block(&r);
        r
    }
    fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        self.socket.shutdown(how)
    }
}

/// An option call waiting for the server.
struct OptWait {
    op: OptionKind,
    reply: oneshot::Sender<Result<OptOut>>,
    exports: Vec<(String, String)>,
    contexts: Vec<String>,
}

/// A disconnect in progress.
struct DiscWait {
    reply: Option<oneshot::Sender<Result<()>>>,
    deadline: Option<Instant>,
    sent: bool,
    shut_write: bool,
}

/// The connection's driver: a future that owns the Sans-IO core, the
/// socket (registered with tokio's reactor) and every buffer the socket
/// may write into, and runs until the connection ends.
///
/// [`crate::Client::connect`] returns it next to the [`crate::Client`].
/// Spawn it (`tokio::spawn(task)`) or await it alongside your own work
/// (`tokio::join!`, `select!`): client calls make progress only while it is
/// polled. It resolves once the connection has ended: `Ok(())` for a clean
/// end ([`crate::Client::disconnect`], or every client handle dropped),
/// [`Error::Closed`] with the reason otherwise. Dropping it ends the
/// connection at once: every call still waiting fails with
/// [`Error::TaskGone`] and the buffers in flight are freed with the core,
/// which nothing else can reach.
#[must_use = "client calls make progress only while the connection task is polled"]
pub struct ConnectionTask {
    conn: Connection,
    fd: AsyncFd<Socket>,
    driver: Driver,
    demux: Demux,
    rx: mpsc::Receiver<Msg>,
    ctl: mpsc::UnboundedReceiver<Ctl>,
    shared: Arc<Shared>,
    pending: HashMap<Cookie, Reply>,
    stalled: Option<Msg>,
    opt: Option<OptWait>,
    disc: Option<DiscWait>,
    sleep: Option<Pin<Box<Sleep>>>,
    clients_gone: bool,
    /// The last turn completed calls: yield so their tasks run.
    woke_callers: bool,
    went: bool,
    unsupported: Option<String>,
    done: bool,
    /// The server process this connection started, if any: dropped after
    /// the socket is shut down, on a blocking thread (its drop waits for
    /// the server to exit).
    process: Option<Subprocess>,
}

impl std::fmt::Debug for ConnectionTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionTask")
            .field("conn", &self.conn)
            .field("target", &self.driver.target())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ConnectionTask {
    pub(crate) fn new(
        conn: Connection,
        fd: AsyncFd<Socket>,
        target: String,
        rx: mpsc::Receiver<Msg>,
        ctl: mpsc::UnboundedReceiver<Ctl>,
        shared: Arc<Shared>,
        process: Option<Subprocess>,
    ) -> ConnectionTask {
        let n = conn.config().limits.max_in_flight.min(4096);
        ConnectionTask {
            demux: Demux::with_capacity(n),
            pending: HashMap::with_capacity(n),
            conn,
            fd,
            driver: Driver::new(target),
            rx,
            ctl,
            shared,
            stalled: None,
            opt: None,
            disc: None,
            sleep: None,
            clients_gone: false,
            woke_callers: false,
            went: false,
            unsupported: None,
            done: false,
            process,
        }
    }

    /// Runs the handshake to its end: the transmission phase, option mode,
    /// or an error.
    pub(crate) async fn handshake(&mut self) -> Result<()> {
        std::future::poll_fn(|cx| {
            let r = self.poll_turns(cx, |t| t.conn.phase() != Phase::Connecting);
            match r {
                Poll::Ready(_) => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        self.publish();
        if let Some(m) = &self.unsupported {
            return Err(Error::Unsupported(m.clone()));
        }
        // A server may close right after GO (the export is known): the
        // connect succeeded; later calls report the close.
        let lost = self.conn.close_reason().is_none_or(|r| r.is_loss());
        if self.went && !lost {
            return Ok(());
        }
        match self.conn.close_reason() {
            Some(r) => Err(Error::Closed(r.clone())),
            None => Ok(()),
        }
    }

    /// Turns until the connection ends or `stop` holds; `Ready` with the
    /// task's result once it ended, `Ready(Ok)` when `stop` held.
    fn poll_turns(
        &mut self,
        cx: &mut Context<'_>,
        stop: impl Fn(&ConnectionTask) -> bool,
    ) -> Poll<Result<()>> {
        if self.done {
            return Poll::Ready(self.result());
        }
        for _ in 0..TURNS_PER_POLL {
            let progressed = self.turn(cx);
            if self.conn.is_finished() && !self.conn.has_events() {
                self.end();
                return Poll::Ready(self.result());
            }
            if stop(self) {
                self.publish();
                return Poll::Ready(Ok(()));
            }
            if !progressed {
                self.publish();
                return Poll::Pending;
            }
            if std::mem::take(&mut self.woke_callers) {
                // Let the callers whose commands completed run now, so
                // that their next commands reach the server while it still
                // has work: they come back together, in one write.
                self.publish();
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        // Still busy: let the tasks we woke run, and come back.
        self.publish();
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One turn: control messages, commands, timers, the socket, events.
    /// True if anything happened (then turn again before waiting).
    fn turn(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = self.poll_ctl(cx);
        progressed |= self.take_messages(cx);
        progressed |= self.step_disconnect();
        progressed |= self.poll_timer(cx);
        progressed |= self.poll_send(cx);
        progressed |= self.poll_recv(cx);
        progressed |= self.dispatch();
        self.driver.finish(&mut self.conn, self.fd.get_mut());
        progressed
    }

    fn poll_ctl(&mut self, cx: &mut Context<'_>) -> bool {
        let mut sweep = false;
        let mut progressed = false;
        while let Poll::Ready(Some(c)) = self.ctl.poll_recv(cx) {
            progressed = true;
            match c {
                Ctl::Sweep => sweep = true,
                Ctl::Abort(reason) => self.conn.abort(reason),
            }
        }
        if sweep {
            self.sweep();
        }
        progressed
    }

    /// Cancels, through the core, every command whose future was dropped:
    /// it completes at once (its buffer comes back to the task and is
    /// freed), and its slot stays reserved until the late reply arrives
    /// and is dropped.
    fn sweep(&mut self) {
        let conn = &mut self.conn;
        self.pending.retain(|cookie, reply| {
            if reply.is_closed() {
                let _ = conn.cancel(*cookie);
                false
            } else {
                true
            }
        });
    }

    fn take_messages(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        loop {
            let msg = match self.stalled.take() {
                Some(m) => m,
                None if self.clients_gone => break,
                None => match self.rx.poll_recv(cx) {
                    Poll::Ready(Some(m)) => m,
                    Poll::Ready(None) => {
                        self.clients_gone = true;
                        self.on_clients_gone();
                        progressed = true;
                        break;
                    }
                    Poll::Pending => break,
                },
            };
            match self.submit(msg) {
                Ok(()) => progressed = true,
                Err(m) => {
                    self.stalled = Some(m);
                    break;
                }
            }
        }
        progressed
    }

    /// Every client handle is gone, so no call awaits anything: end the
    /// connection without waiting for a server that owes nothing.
    fn on_clients_gone(&mut self) {
        self.sweep();
        if self.conn.is_finished() || self.disc.is_some() {
            return;
        }
        if self.conn.in_flight() == 0 {
            self.disc = Some(DiscWait {
                reply: None,
                deadline: self.goodbye_deadline(),
                sent: false,
                shut_write: false,
            });
        } else {
            // Only late replies of abandoned commands are owed.
            self.conn
                .abort("every client handle was dropped with requests in flight");
        }
    }

    fn goodbye_deadline(&self) -> Option<Instant> {
        self.conn
            .config()
            .handshake_timeout
            .and_then(|d| Instant::now().checked_add(d))
    }

    /// Hands one message to the core; `Err` gives it back when it cannot
    /// be taken now (the in-flight limits are reached, or an option is in
    /// progress), which stops the task reading the channel: back-pressure.
    fn submit(&mut self, msg: Msg) -> std::result::Result<(), Msg> {
        if let Some(r) = self.conn.close_reason() {
            let e = Error::Closed(r.clone());
            match msg {
                Msg::Cmd { reply, .. } => {
                    reply.send(Err(e));
                }
                Msg::Opt { reply, .. } => drop(reply.send(Err(e))),
                Msg::Disconnect { reply } => {
                    let r = if r.is_loss() { Err(e) } else { Ok(()) };
                    drop(reply.send(r))
                }
                Msg::SetCommandTimeout(_) => {}
            }
            return Ok(());
        }
        match msg {
            Msg::Cmd { op, reply } => {
                if reply.is_closed() {
                    return Ok(()); // dropped before it was sent: nothing to cancel
                }
                if self.disc.is_some() {
                    let e = UsageError::WrongPhase {
                        call: op_name(&op),
                        needed: "ready",
                        actual: "disconnecting",
                    };
                    let _ = reply.send(Err(e.into()));
                    return Ok(());
                }
                let bytes = match &op {
                    Op::Read { buf, .. } => buf.len() as u64,
                    Op::Write { data, .. } => data.len() as u64,
                    _ => 0,
                };
                // A command too large even for an empty table goes to the
                // core, which says so.
                if self.conn.phase() == Phase::Ready
                    && !self.conn.has_room(bytes)
                    && self.conn.in_flight() > 0
                {
                    return Err(Msg::Cmd { op, reply });
                }
                match self.issue(op) {
                    Ok(cookie) => {
                        self.pending.insert(cookie, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
                Ok(())
            }
            Msg::Opt { op, reply } => {
                if self.opt.is_some() {
                    return Err(Msg::Opt { op, reply });
                }
                self.start_option(op, reply);
                Ok(())
            }
            Msg::Disconnect { reply } => {
                match &mut self.disc {
                    Some(d) if d.reply.is_none() => d.reply = Some(reply),
                    Some(_) => {
                        let e = UsageError::WrongPhase {
                            call: "disconnect",
                            needed: "ready",
                            actual: "disconnecting",
                        };
                        let _ = reply.send(Err(e.into()));
                    }
                    None => {
                        self.disc = Some(DiscWait {
                            reply: Some(reply),
                            deadline: self.goodbye_deadline(),
                            sent: false,
                            shut_write: false,
                        })
                    }
                }
                Ok(())
            }
            Msg::SetCommandTimeout(t) => {
                self.conn.set_command_timeout(t);
                Ok(())
            }
        }
    }

    fn issue(&mut self, op: Op) -> std::result::Result<Cookie, UsageError> {
        let c = &mut self.conn;
        match op {
            Op::Read { offset, buf, flags } => c.read(offset, buf, flags).map_err(|r| r.error),
            Op::Write {
                offset,
                data,
                flags,
            } => c.write(offset, data, flags).map_err(|r| r.error),
            Op::Flush(f) => c.flush(f),
            Op::Trim(o, l, f) => c.trim(o, l, f),
            Op::Cache(o, l, f) => c.cache(o, l, f),
            Op::Zero(o, l, f) => c.write_zeroes(o, l, f),
            Op::BlockStatus(o, l, f) => c.block_status(o, l, f),
        }
    }

    fn start_option(&mut self, op: OptOp, reply: oneshot::Sender<Result<OptOut>>) {
        let c = &mut self.conn;
        let (kind, r) = match op {
            OptOp::SetExportName(name) => {
                let r = c.set_export_name(&name).map_err(Error::from);
                let _ = reply.send(r.map(|()| OptOut::Done));
                return;
            }
            OptOp::List => (OptionKind::List, c.opt_list()),
            OptOp::Info => (OptionKind::Info, c.opt_info()),
            OptOp::Go => (OptionKind::Go, c.opt_go()),
            OptOp::StructuredReply => (OptionKind::StructuredReply, c.opt_structured_reply()),
            OptOp::ExtendedHeaders => (OptionKind::ExtendedHeaders, c.opt_extended_headers()),
            OptOp::ListMetaContext(q) => (OptionKind::ListMetaContext, c.opt_list_meta_context(&q)),
            OptOp::SetMetaContext(q) => (OptionKind::SetMetaContext, c.opt_set_meta_context(&q)),
        };
        match r {
            Ok(()) => {
                self.went = false;
                self.opt = Some(OptWait {
                    op: kind,
                    reply,
                    exports: Vec::new(),
                    contexts: Vec::new(),
                })
            }
            Err(e) => drop(reply.send(Err(e.into()))),
        }
    }

    fn finish_option(&mut self, r: Result<()>) {
        let Some(w) = self.opt.take() else { return };
        let out = match (w.op, r) {
            (OptionKind::StructuredReply | OptionKind::ExtendedHeaders, Ok(())) => {
                Ok(OptOut::Agreed(true))
            }
            (
                OptionKind::StructuredReply | OptionKind::ExtendedHeaders,
                Err(Error::Option { .. }),
            ) => Ok(OptOut::Agreed(false)),
            (OptionKind::List, Ok(())) => Ok(OptOut::Exports(w.exports)),
            (OptionKind::ListMetaContext | OptionKind::SetMetaContext, Ok(())) => {
                Ok(OptOut::Contexts(w.contexts))
            }
            (_, Ok(())) => Ok(OptOut::Done),
            (_, Err(e)) => Err(e),
        };
        let _ = w.reply.send(out);
    }

    /// The polite end: `NBD_CMD_DISC` once nothing is in flight (or
    /// `NBD_OPT_ABORT` in option mode), then a write shutdown so a server
    /// waiting for the client's end of file closes.
    fn step_disconnect(&mut self) -> bool {
        let Some(d) = &mut self.disc else {
            return false;
        };
        if self.conn.is_finished() {
            return false;
        }
        let mut progressed = false;
        if !d.sent {
            let r = match self.conn.phase() {
                Phase::Ready if self.conn.in_flight() == 0 => Some(self.conn.disconnect()),
                Phase::Negotiating if self.opt.is_none() => Some(self.conn.opt_abort()),
                _ => None,
            };
            if let Some(r) = r {
                d.sent = true;
                progressed = true;
                if let Err(e) = r {
                    if let Some(reply) = d.reply.take() {
                        let _ = reply.send(Err(e.into()));
                    }
                    self.conn.abort("disconnect refused");
                }
            }
        }
        if d.sent && !d.shut_write && !self.conn.wants_write() {
            d.shut_write = true;
            self.driver.shutdown_write(&self.conn, self.fd.get_mut());
        }
        progressed
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let core = self.conn.poll_timeout();
        let disc = self.disc.as_ref().and_then(|d| d.deadline);
        let due = match (core, disc) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(d) => d,
                None => return false,
            },
        };
        let now = Instant::now();
        if due > now {
            let at = tokio::time::Instant::from_std(due);
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
        let now = Instant::now();
        self.conn.handle_timeout(now);
        if disc.is_some_and(|d| d <= now) {
            self.conn
                .abort("timed out waiting for the server to finish the disconnect");
        }
        true
    }

    /// Writes what the core queued while tokio reports the socket
    /// writable. A write that finds the socket full clears tokio's
    /// readiness and polls again, which registers the waker (or finds a
    /// newer readiness event and writes on).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        while self.conn.wants_write() {
            match self.fd.poll_write_ready_mut(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    self.driver.on_writable();
                    let mut t = Tracked::new(guard.get_inner_mut());
                    let p = self.driver.send(&mut self.conn, &mut t, WRITES_PER_TURN);
                    progressed |= p.progressed;
                    if !t.write_blocked {
                        return progressed || p.more;
                    }
                    guard.clear_ready_matching(Ready::WRITABLE);
                }
                Poll::Ready(Err(e)) => {
                    self.conn
                        .handle_transport_error(format!("waiting to write: {e}"));
                    return true;
                }
                Poll::Pending => break,
            }
        }
        progressed
    }

    /// Reads what the server sent while tokio reports the socket
    /// readable; as [`ConnectionTask::poll_send`], a read that finds it
    /// empty clears the readiness and polls again.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        while self.conn.wants_read() {
            match self.fd.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    let mut t = Tracked::new(guard.get_inner_mut());
                    let p =
                        self.driver
                            .recv(&mut self.conn, &mut t, RecvUntil::Reads(READS_PER_TURN));
                    progressed |= p.progressed;
                    if !t.read_blocked {
                        return progressed || p.more;
                    }
                    guard.clear_ready_matching(Ready::READABLE);
                    if progressed {
                        // Events to hand out first; the next turn polls
                        // again and registers the waker.
                        return true;
                    }
                }
                Poll::Ready(Err(e)) => {
                    self.conn
                        .handle_transport_error(format!("waiting to read: {e}"));
                    return true;
                }
                Poll::Pending => break,
            }
        }
        progressed
    }

    /// Drains the core's events: completions go to their callers, the
    /// rest drive option calls and the end.
    fn dispatch(&mut self) -> bool {
        let mut progressed = false;
        while let Some(ev) = self.conn.poll_event() {
            progressed = true;
            let done = match &ev {
                Event::CommandDone { cookie, .. } => Some(*cookie),
                _ => None,
            };
            match self.demux.handle(ev) {
                None => {
                    let Some(cookie) = done else { continue };
                    let Some(c) = self.demux.take(cookie) else {
                        continue;
                    };
                    // A command cancelled by the sweep has no entry: its
                    // completion (and buffer) is dropped here.
                    if let Some(reply) = self.pending.remove(&cookie) {
                        self.woke_callers |= reply.send(Ok(c));
                    }
                }
                Some(ev) => self.on_event(ev),
            }
        }
        progressed
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::ExportListed { name, description } => {
                if let Some(w) = &mut self.opt {
                    w.exports.push((name, description));
                }
            }
            Event::MetaContext { name, .. } => {
                if let Some(w) = &mut self.opt {
                    w.contexts.push(name);
                }
            }
            Event::OptionSucceeded(_) => self.finish_option(Ok(())),
            Event::OptionError { option, error } => {
                self.finish_option(Err(Error::Option { option, error }))
            }
            Event::StartTls => {
                // Unreachable while `Client::start` refuses TLS configs (the
                // core asks for STARTTLS only when told to); defensive.
                self.unsupported = Some("TLS is not supported by nbd-tokio yet".into());
                self.conn
                    .handle_transport_error("TLS is not supported by nbd-tokio yet");
                self.driver.finish(&mut self.conn, self.fd.get_mut());
            }
            Event::GoSucceeded(_) => {
                self.went = true;
                self.finish_option(Ok(()));
            }
            Event::Closed(reason) => {
                let aborted = matches!(self.opt.as_ref().map(|w| w.op), Some(OptionKind::Abort));
                if aborted && !reason.is_loss() {
                    self.finish_option(Ok(()));
                } else {
                    self.finish_option(Err(Error::Closed(reason.clone())));
                }
                if let Some(reply) = self.disc.as_mut().and_then(|d| d.reply.take()) {
                    let r = if reason.is_loss() {
                        Err(Error::Closed(reason))
                    } else {
                        Ok(())
                    };
                    let _ = reply.send(r);
                }
            }
            _ => {}
        }
    }

    /// The connection has ended and every event was handled: answer what
    /// is left, shut the socket, stop the server process.
    fn end(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.driver.finish(&mut self.conn, self.fd.get_mut());
        self.publish();
        let reason = self
            .conn
            .close_reason()
            .cloned()
            .unwrap_or(CloseReason::Aborted);
        // Every command the core held has completed; calls still queued
        // get the reason.
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(Error::Closed(reason.clone())));
        }
        self.rx.close();
        let stalled = self.stalled.take();
        for m in stalled
            .into_iter()
            .chain(std::iter::from_fn(|| self.rx.try_recv().ok()))
        {
            let e = Error::Closed(reason.clone());
            match m {
                Msg::Cmd { reply, .. } => {
                    reply.send(Err(e));
                }
                Msg::Opt { reply, .. } => drop(reply.send(Err(e))),
                Msg::Disconnect { reply } => {
                    let r = if reason.is_loss() { Err(e) } else { Ok(()) };
                    drop(reply.send(r))
                }
                Msg::SetCommandTimeout(_) => {}
            }
        }
        self.finish_option(Err(Error::Closed(reason.clone())));
        if let Some(p) = self.process.take() {
            // Its drop waits for the server to exit: not on this thread
            // when there is a runtime to take it.
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(move || drop(p))),
                Err(_) => drop(p),
            }
        }
    }

    fn result(&self) -> Result<()> {
        match self.conn.close_reason() {
            Some(r) if r.is_loss() => Err(Error::Closed(r.clone())),
            _ => Ok(()),
        }
    }

    /// Publishes the counters and the state for the client getters.
    fn publish(&self) {
        let s = &self.shared;
        s.in_flight.store(self.conn.in_flight(), Ordering::Relaxed);
        s.abandoned.store(self.conn.abandoned(), Ordering::Relaxed);
        let mut snap = s.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        snap.stats = self.driver.stats();
        let phase = self.conn.phase();
        if snap.phase != phase || snap.info.is_none() != self.conn.export_info().is_none() {
            snap.phase = phase;
            snap.info = self.conn.export_info().cloned();
            snap.close = self.conn.close_reason().cloned();
            snap.contexts = self.conn.meta_contexts().to_vec();
            snap.structured = self.conn.structured_replies_negotiated();
            snap.extended = self.conn.extended_headers_negotiated();
            snap.payload_max = self.conn.payload_max();
        } else if self.opt.is_none() && snap.phase == Phase::Negotiating {
            // Option mode: an option may have changed what is known.
            snap.info = self.conn.export_info().cloned();
            snap.contexts = self.conn.meta_contexts().to_vec();
            snap.structured = self.conn.structured_replies_negotiated();
            snap.extended = self.conn.extended_headers_negotiated();
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Read { .. } => "read",
        Op::Write { .. } => "write",
        Op::Flush(_) => "flush",
        Op::Trim(..) => "trim",
        Op::Cache(..) => "cache",
        Op::Zero(..) => "zero",
        Op::BlockStatus(..) => "block_status",
    }
}

impl Future for ConnectionTask {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        this.poll_turns(cx, |_| false)
    }
}

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        if !self.done {
            // A polite goodbye when it can be sent without waiting.
            self.driver.goodbye(&mut self.conn, self.fd.get_mut());
            self.conn.abort("the connection task was dropped");
            self.dispatch();
            self.end();
        }
    }
}

pub(crate) fn new_snapshot() -> Snapshot {
    Snapshot {
        info: None,
        phase: Phase::Connecting,
        close: None,
        contexts: Vec::new(),
        structured: false,
        extended: false,
        stats: IoStats::default(),
        payload_max: 0,
    }
}
