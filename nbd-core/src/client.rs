//! [`Connection`]: the public face of the core, tying the negotiation and
//! transmission state machines to the input buffer, the output queue and the
//! event queue.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Instant;

use crate::buffer::{RecvBuffer, SendQueue};
use crate::config::Config;
use crate::deadline::HandshakeTimer;
use crate::error::ProtocolError;
use crate::event::{CloseReason, Event, ExportInfo, Protocol};
use crate::negotiate::{AutoStep, State};
use crate::transmit::Transmission;
use crate::wire::reply::HeaderMode;

/// Size of the receive buffer: large enough for any message the core
/// buffers whole (option replies are capped well below it), and for many
/// small replies per socket read.
const RECV_BUFFER_LEN: usize = 256 * 1024;

/// Where the connection is in its life (libnbd's public states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Handshake or an option exchange is in progress.
    Connecting,
    /// Option mode: paused between options, waiting for an `opt_*` call.
    Negotiating,
    /// Transmission phase: commands may be issued.
    Ready,
    /// Ended in an orderly way (abort or disconnect).
    Closed,
    /// Ended by an error.
    Dead,
}

impl Phase {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Negotiating => "negotiating",
            Phase::Ready => "ready",
            Phase::Closed => "closed",
            Phase::Dead => "dead",
        }
    }
}

/// One NBD client connection, without any I/O.
///
/// # Driving it
/// The adapter owns the socket and loops:
/// 1. send what [`Connection::transmit_slices`] (or [`Connection::poll_transmit`])
///    offers and report it with [`Connection::transmitted`];
/// 2. drain [`Connection::poll_event`];
/// 3. when [`Connection::wants_read`], read into [`Connection::recv_buf`] and
///    call [`Connection::recv_commit`] (or hand a copy to
///    [`Connection::handle_input`]); a read of 0 bytes is
///    [`Connection::handle_eof`].
///
/// After every input and every command, drain all output before waiting on
/// the socket again. Commands (`opt_*`, `read`, `write`, ...) only queue
/// work and return at once.
pub struct Connection {
    pub(crate) cfg: Config,
    pub(crate) state: State,
    pub(crate) auto: AutoStep,
    pub(crate) rx: RecvBuffer,
    pub(crate) tx: SendQueue,
    pub(crate) events: VecDeque<Event>,
    pub(crate) protocol: Option<Protocol>,
    pub(crate) server_handshake_flags: u16,
    pub(crate) client_flags: u32,
    pub(crate) tls_on: bool,
    /// Which reply headers the server agreed to (simple until an option
    /// upgrades it; reset by STARTTLS).
    pub(crate) header_mode: HeaderMode,
    pub(crate) info: Option<ExportInfo>,
    pub(crate) contexts: Vec<(u32, String)>,
    pub(crate) contexts_export: Option<String>,
    pub(crate) xmit: Transmission,
    /// The latest time the adapter passed in.
    pub(crate) now: Instant,
    pub(crate) handshake_timer: HandshakeTimer,
}

impl std::fmt::Debug for Connection {
    /// The state and the counts, not the buffers (the receive buffer alone
    /// is 256 KiB).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("phase", &self.phase())
            .field("state", &self.state.name())
            .field("header_mode", &self.header_mode)
            .field("protocol", &self.protocol)
            .field("export", &self.info.as_ref().map(|i| (&i.name, i.size)))
            .field("in_flight", &self.xmit.in_flight())
            .field("received_bytes", &self.rx.len())
            .field("queued_bytes", &self.tx.len())
            .field("events", &self.events.len())
            .field("close_reason", &self.close_reason())
            .finish()
    }
}

impl Connection {
    /// Creates a connection that will run the handshake as soon as the
    /// server's first bytes arrive. Call it once the transport is
    /// connected, with the current time: the handshake deadline
    /// ([`Config::handshake_timeout`]) counts from `now`.
    pub fn new(cfg: Config, now: Instant) -> Self {
        let handshake_timer = HandshakeTimer::starting(cfg.handshake_timeout, now);
        let xmit = Transmission::new(&cfg.limits);
        // A header and a payload per request in flight (bounded).
        let tx = SendQueue::with_capacity(cfg.limits.max_in_flight.clamp(1, 512) * 2 + 4);
        Connection {
            cfg,
            state: State::Greeting,
            auto: AutoStep::StartTls,
            rx: RecvBuffer::new(RECV_BUFFER_LEN),
            tx,
            events: VecDeque::with_capacity(128),
            protocol: None,
            server_handshake_flags: 0,
            client_flags: 0,
            tls_on: false,
            header_mode: HeaderMode::Simple,
            info: None,
            contexts: Vec::new(),
            contexts_export: None,
            xmit,
            now,
            handshake_timer,
        }
    }

    // ----- input -----

    /// Hands over bytes the server sent (copying them). Handy for tests and
    /// fuzzers; adapters avoid the copy with [`Connection::recv_buf`].
    pub fn handle_input(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.is_finished() {
            if self.rx.len() > 0 {
                // Buffered bytes come first.
            } else if let Some(dst) = self.xmit.direct_target() {
                let n = dst.len().min(data.len());
                dst[..n].copy_from_slice(&data[..n]);
                self.direct_commit(n);
                data = &data[n..];
                continue;
            }
            let n = self.rx.fill_from(data);
            data = &data[n..];
            self.process();
            if n == 0 && self.rx.spare().is_empty() {
                // The state machine cannot make room: never happens with the
                // limits in place, but never loop forever either.
                let len = self.rx.len();
                self.fail(ProtocolError::UnexpectedData(len));
            }
        }
    }

    /// The buffer the adapter should read the next bytes into. Usually free
    /// space in the core's receive buffer; while a large read payload is
    /// arriving, the destination buffer of that read itself (so the payload
    /// lands where the caller wants it with no copy). Follow with
    /// [`Connection::recv_commit`].
    pub fn recv_buf(&mut self) -> &mut [u8] {
        if self.rx.len() == 0 && self.xmit.direct_target().is_some() {
            return self.xmit.direct_target().unwrap_or_default();
        }
        let cap = self.xmit.recv_cap();
        let spare = self.rx.spare();
        let n = spare.len().min(cap);
        &mut spare[..n]
    }

    /// Like [`Connection::recv_buf`], for vectored reads (`readv`): while a
    /// large read payload is arriving, the first buffer is the rest of that
    /// payload in the read's own buffer and the second is free space in the
    /// receive buffer, so one system call takes the payload (without a copy)
    /// and the replies behind it. Otherwise the second buffer is empty.
    /// Follow with [`Connection::recv_commit`] with the total read.
    pub fn recv_bufs(&mut self) -> [&mut [u8]; 2] {
        if self.rx.len() == 0 && self.xmit.direct_target().is_some() {
            let cap = self.xmit.recv_cap_behind_payload();
            let spare = self.rx.spare();
            let n = spare.len().min(cap);
            let direct = self.xmit.direct_target().unwrap_or_default();
            return [direct, &mut spare[..n]];
        }
        [self.recv_buf(), &mut []]
    }

    /// Reports that `n` bytes were read into [`Connection::recv_buf`] (or,
    /// in order, into the buffers of [`Connection::recv_bufs`]).
    pub fn recv_commit(&mut self, n: usize) {
        if self.rx.len() == 0 {
            if let Some(direct) = self.xmit.direct_target().map(|d| d.len()) {
                let d = n.min(direct);
                self.direct_commit(d);
                if n > d && !self.is_finished() {
                    self.rx.commit(n - d);
                    self.process();
                }
                return;
            }
        }
        self.rx.commit(n);
        self.process();
    }

    fn direct_commit(&mut self, n: usize) {
        if let Err(e) = self.xmit.direct_commit(n, &mut self.events) {
            self.fail(e);
        }
        self.process();
    }

    /// Reports that the server closed its end (a read returned 0).
    ///
    /// The reason depends on what was going on: [`CloseReason::Disconnected`]
    /// after [`Connection::disconnect`] once every request completed,
    /// [`CloseReason::ServerClosed`] otherwise in the transmission phase
    /// (counting the requests lost), [`CloseReason::ServerKilledConnection`]
    /// before it.
    pub fn handle_eof(&mut self) {
        if self.is_finished() {
            return;
        }
        let reason = self.end_reason(None);
        self.close(reason);
    }

    /// Reports that the transport failed (an I/O error other than
    /// would-block, such as a reset); the connection is over. Once the
    /// client asked for the end (`NBD_OPT_ABORT`, or `NBD_CMD_DISC` with
    /// every request completed), this is the expected end and the reason
    /// is clean, as for [`Connection::handle_eof`]; otherwise it is
    /// [`CloseReason::ServerClosed`] in the transmission phase and
    /// [`CloseReason::Transport`] before it.
    pub fn handle_transport_error(&mut self, message: impl Into<String>) {
        if self.is_finished() {
            return;
        }
        let reason = self.end_reason(Some(message.into()));
        self.close(reason);
    }

    // ----- time -----

    /// When to call [`Connection::handle_timeout`] next, if a deadline is
    /// pending: wait on the socket until then at most. An instant at or
    /// before [`Connection::now`] means "now": a deadline just started and
    /// needs the current time (a command's default deadline counts from
    /// the first time input after its submission, and in option mode each
    /// option the caller sends restarts the handshake deadline). With no
    /// deadline set this is `None` and costs a few comparisons.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let handshake = match self.handshake_timer {
            _ if !self.server_has_turn() => None,
            HandshakeTimer::Armed(at) => Some(at),
            HandshakeTimer::Suspended => Some(self.now),
            HandshakeTimer::Off => None,
        };
        let command = match self.state {
            State::Transmission => self.xmit.next_deadline(self.now),
            _ => None,
        };
        match (handshake, command) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Tells the connection the time: starts the deadlines waiting for it,
    /// and acts on every deadline at or before `now`. A missed handshake
    /// deadline ends the connection with [`CloseReason::HandshakeTimedOut`];
    /// a missed command deadline completes that command with
    /// [`crate::CommandError::TimedOut`] (see [`Config::on_command_timeout`]).
    /// Call it when [`Connection::poll_timeout`]'s instant is reached, and
    /// whenever convenient (it is cheap); drain the events after it. Time
    /// never goes backwards: an earlier `now` than before counts as the
    /// latest one given.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        let now = self.now;
        if self.is_finished() {
            return;
        }
        if self.server_has_turn() {
            match self.handshake_timer {
                HandshakeTimer::Suspended => {
                    self.handshake_timer = HandshakeTimer::starting(self.cfg.handshake_timeout, now)
                }
                HandshakeTimer::Armed(at) if at <= now => {
                    let waiting_for = self.waiting_for();
                    self.close(CloseReason::HandshakeTimedOut { waiting_for });
                    return;
                }
                _ => {}
            }
        }
        if let State::Transmission = self.state {
            self.handshake_timer = HandshakeTimer::Off;
            if let Some((command, cookie)) = self.xmit.expire(now, &mut self.events) {
                let lost = self.xmit.waiting();
                self.close(CloseReason::CommandTimedOut {
                    command,
                    cookie,
                    lost,
                });
            }
        }
    }

    /// The latest time passed in ([`Connection::new`],
    /// [`Connection::handle_timeout`]).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Replaces the handshake deadline (`None`: no deadline): for an
    /// adapter whose connect budget started before the core existed (the
    /// TCP connect, a TLS handshake of its own), or a caller that wants a
    /// different deadline for this connection than
    /// [`Config::handshake_timeout`]. Has no effect once the transmission
    /// phase started.
    pub fn set_handshake_deadline(&mut self, deadline: Option<Instant>) {
        self.handshake_timer = HandshakeTimer::until(deadline);
    }

    /// Ends the connection now, for `reason`: nothing more is sent or
    /// read, every request in flight completes with
    /// [`crate::CommandError::ConnectionClosed`], and the connection
    /// reports [`CloseReason::AbortedByCaller`]. The adapter then closes
    /// the socket. Does nothing on a connection that already ended. Use it
    /// to give up on a server (the orderly ends are
    /// [`Connection::disconnect`] and `opt_abort`).
    pub fn abort(&mut self, reason: impl Into<String>) {
        if self.is_finished() {
            return;
        }
        let lost = self.xmit.waiting();
        self.close(CloseReason::AbortedByCaller {
            reason: reason.into(),
            lost,
        });
    }

    /// True while the handshake waits for the server (not for the caller
    /// in option mode, and not once transmission started).
    fn server_has_turn(&self) -> bool {
        matches!(
            self.state,
            State::Greeting
                | State::Oldstyle
                | State::HandshakeFlags
                | State::Option(_)
                | State::ExportNameReply
                | State::Tls
        )
    }

    // ----- output -----

    /// The next event, if any. Drain until `None` after every input and command.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// True while events wait to be taken with [`Connection::poll_event`];
    /// adapters check it to decide whether to do more I/O first.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Fills `out` with the queued bytes to send, in order, for one vectored
    /// write; returns how many slices were filled. Follow with
    /// [`Connection::transmitted`].
    pub fn transmit_slices<'a>(&'a mut self, out: &mut [IoSlice<'a>]) -> usize {
        self.tx.slices(out)
    }

    /// The first queued segment to send (for transports without vectored writes).
    pub fn transmit_front(&mut self) -> &[u8] {
        self.tx.front()
    }

    /// Reports that the transport accepted the first `n` queued bytes.
    pub fn transmitted(&mut self, n: usize) {
        self.tx.advance(n);
    }

    /// Moves all queued bytes to `out` (copying). Handy for tests; adapters
    /// use [`Connection::transmit_slices`].
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        loop {
            let front = self.tx.front();
            if front.is_empty() {
                break;
            }
            let n = front.len();
            out.extend_from_slice(front);
            self.tx.advance(n);
        }
    }

    /// True while bytes are queued for the socket.
    pub fn wants_write(&self) -> bool {
        !self.tx.is_empty()
    }

    /// Number of bytes queued for the socket.
    pub fn queued_bytes(&self) -> usize {
        self.tx.len()
    }

    /// True while a reply has started to arrive but is not complete: part
    /// of its header, or its header and part of its payload, are in. The
    /// rest is normally on its way already (servers write a reply as a
    /// whole), so an adapter may try reading again shortly before it waits
    /// for readiness. False in the negotiation phase.
    pub fn reply_in_progress(&self) -> bool {
        matches!(self.state, State::Transmission) && (self.rx.len() > 0 || self.xmit.mid_reply())
    }

    /// True while a message (a request, or an option in negotiation) has
    /// been partly handed to [`Connection::transmitted`] and the rest is
    /// still queued, for example a write payload cut short by a full
    /// socket. Servers read a request as a whole, so room for the rest
    /// normally comes within microseconds; an adapter may try writing again
    /// shortly before it waits for the socket to become writable.
    pub fn request_in_progress(&self) -> bool {
        self.tx.mid_message()
    }

    /// True while the core expects bytes from the server (always, until the
    /// connection ends or while the adapter runs the TLS handshake).
    pub fn wants_read(&self) -> bool {
        !self.is_finished() && !matches!(self.state, State::Tls)
    }

    // ----- getters -----

    /// The connection's public phase.
    pub fn phase(&self) -> Phase {
        match &self.state {
            State::Closed(r) if r.is_clean() => Phase::Closed,
            State::Closed(_) => Phase::Dead,
            State::Negotiating => Phase::Negotiating,
            State::Transmission => Phase::Ready,
            _ => Phase::Connecting,
        }
    }

    /// True once the connection has ended (closed or dead).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.state {
            State::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The handshake style, once known.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// What GO, INFO, EXPORT_NAME or the oldstyle greeting said about the
    /// export (after `opt_info`, or once ready).
    pub fn export_info(&self) -> Option<&ExportInfo> {
        self.info.as_ref()
    }

    /// Which reply headers were negotiated so far: [`HeaderMode::Simple`]
    /// until the server acknowledges `NBD_OPT_STRUCTURED_REPLY` or
    /// `NBD_OPT_EXTENDED_HEADERS`. Fixed once the transmission phase
    /// begins; use it to know which replies and commands to expect.
    pub fn header_mode(&self) -> HeaderMode {
        self.header_mode
    }

    /// Whether structured replies are in use (also true with extended
    /// headers); derived from [`Connection::header_mode`].
    pub fn structured_replies_negotiated(&self) -> bool {
        self.header_mode != HeaderMode::Simple
    }

    /// Whether extended headers are in use; derived from
    /// [`Connection::header_mode`].
    pub fn extended_headers_negotiated(&self) -> bool {
        self.header_mode == HeaderMode::Extended
    }

    /// Whether TLS was started on this connection.
    pub fn tls_negotiated(&self) -> bool {
        self.tls_on
    }

    /// The client flags sent in the handshake.
    pub fn client_flags(&self) -> u32 {
        self.client_flags
    }

    /// The handshake flags the server advertised.
    pub fn server_handshake_flags(&self) -> u16 {
        self.server_handshake_flags
    }

    /// Meta contexts selected by the last SET_META_CONTEXT, as (id, name).
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    /// Whether the named meta context was negotiated.
    pub fn can_meta_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(_, n)| n == name)
    }

    /// The context id the server gave to the named meta context.
    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(i, _)| *i)
    }

    /// The name of a context id.
    pub fn meta_context_name(&self, id: u32) -> Option<&str> {
        self.contexts
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.as_str())
    }

    // ----- shared internals -----

    /// Runs the state machine over the buffered input until it needs more.
    pub(crate) fn process(&mut self) {
        loop {
            if self.is_finished() {
                return;
            }
            match self.step() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// The server broke the protocol: hard disconnect.
    pub(crate) fn fail(&mut self, e: ProtocolError) {
        self.close(CloseReason::Protocol(e));
    }

    /// Ends the connection once: completes every request in flight with an
    /// error and reports [`Event::Closed`].
    pub(crate) fn close(&mut self, reason: CloseReason) {
        if self.is_finished() {
            return;
        }
        let why = reason.to_string();
        self.xmit.fail_all(&why, &mut self.events);
        self.rx.consume(usize::MAX);
        self.events.push_back(Event::Closed(reason.clone()));
        self.state = State::Closed(reason);
    }
}
