//! # nbd-mio: an NBD client for your own mio event loop
//!
//! [`NbdConnection`] is one NBD connection over a non-blocking Unix or TCP
//! socket (with `TCP_NODELAY`), driven by the Sans-IO state machine of
//! [`nbd_core`]. It never blocks and
//! owns no `Poll`: you register it on yours, hand it the readiness events of
//! its token, and read what happened as [`nbd_core::Event`]s. Many
//! connections (and anything else mio can watch) share one thread.
//!
//! ## The loop
//! The socket is registered once ([`NbdConnection::register`]),
//! edge-triggered, for both directions. Each turn:
//! 1. [`NbdConnection::handle_event`] for every event with the connection's
//!    token: it writes and reads until the first commands complete (or the
//!    socket would block);
//! 2. [`NbdConnection::poll_event`] until `None`: negotiation results,
//!    command completions ([`Event::CommandDone`] hands read buffers back),
//!    and finally [`Event::Closed`]. Submit commands
//!    ([`NbdConnection::read`], [`NbdConnection::write`], ...) as results
//!    arrive. When the events run out, `poll_event` itself sends what the
//!    commands queued (one vectored write for the batch) and reads the
//!    replies that arrived meanwhile, so new requests reach the server as
//!    soon as completions free their slots, and `None` means the socket
//!    would block both ways: nothing to re-arm, nothing to forget.
//!
//! Commands submitted outside step 2 (from a timer, another source's
//! event) are sent at once. A read or write that would block in the middle
//! of a reply or request is tried again a few times at once, since the
//! rest is microseconds away ([`NbdConnection::set_mid_message_retries`]).
//! The socket I/O itself is [`nbd_driver::Driver`], shared with nbd-std,
//! and so is TLS: `nbds` URIs (or [`NbdConnection::connect_with_tls`])
//! switch the registered socket to a TLS session on the same file
//! descriptor, so the registration stays; bytes the session holds are read
//! before the drain returns `None`. A TLS failure ends the connection with
//! [`Event::Closed`]; [`NbdConnection::tls_error`] has the typed cause.
//! [`NbdConnection::connect_command`] and
//! [`NbdConnection::connect_systemd_socket_activation`] start the server
//! themselves.
//!
//! This program connects, reads the first 512 bytes of the export and
//! disconnects:
//!
//! ```no_run
//! use bytes::BytesMut;
//! use mio::{Events, Poll, Token};
//! use nbd_mio::{CmdFlags, Config, Event, NbdConnection};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! const NBD: Token = Token(0);
//! let mut poll = Poll::new()?;
//! let mut events = Events::with_capacity(64);
//! let mut nbd = NbdConnection::connect("nbd+unix:///?socket=/tmp/sock", Config::default())?;
//! nbd.register(poll.registry(), NBD)?;
//! loop {
//!     // Sleep until readiness, or the next deadline (the handshake's).
//!     poll.poll(&mut events, nbd_mio::poll_timeout_until(nbd.poll_timeout()))?;
//!     for ev in events.iter() {
//!         if ev.token() == NBD {
//!             nbd.handle_event(ev);
//!         }
//!     }
//!     nbd.handle_timeout(std::time::Instant::now());
//!     while let Some(ev) = nbd.poll_event() {
//!         match ev {
//!             // Default configuration: the handshake ends with GO on its own.
//!             Event::GoSucceeded(info) => {
//!                 println!("export size: {} bytes", info.size);
//!                 nbd.read(0, BytesMut::zeroed(512), CmdFlags::empty())?;
//!             }
//!             Event::CommandDone { result, buffer, .. } => {
//!                 result?;
//!                 let sector = buffer.unwrap_or_default();
//!                 println!("first bytes: {:02x?}", &sector[..16]);
//!                 nbd.disconnect()?;
//!             }
//!             Event::Closed(reason) if reason.is_clean() => return Ok(()),
//!             Event::Closed(reason) => return Err(reason.to_string().into()),
//!             _ => {}
//!         }
//!     }
//! }
//! # }
//! ```
//!
//! ## Deadlines
//! Time enters as in the loop above: [`NbdConnection::poll_timeout`]
//! bounds the sleep, [`NbdConnection::handle_timeout`] acts on what is due
//! (for many connections, [`next_deadline`] folds their deadlines into
//! one). The handshake must finish within [`Config::handshake_timeout`]
//! (30 s by default); commands get a deadline from
//! [`Config::command_timeout`] or [`NbdConnection::set_deadline`]. A
//! command that misses it, or that you [`NbdConnection::cancel`],
//! completes at once with its buffer and the connection stays usable; its
//! late reply is read and dropped. [`NbdConnection::abort`] ends the
//! connection at once.
//!
//! With [`Config::opt_mode`] the handshake stops in the negotiating phase
//! instead: call [`NbdConnection::opt_list`] (each export is an
//! [`Event::ExportListed`], then [`Event::OptionSucceeded`]),
//! `set_export_name`, `opt_info`, and `opt_go` (then
//! [`Event::GoSucceeded`]). In the ready phase, `read`, `write`,
//! `flush_command`, `trim`, `cache`, `write_zeroes` and `block_status`
//! return a [`Cookie`] at once and complete later as an
//! [`Event::CommandDone`] with that cookie, in whatever order the server
//! answers. Check [`NbdConnection::has_room`] before submitting when many
//! requests are in flight. Write payloads are `Bytes` and go to the socket
//! without a copy; read payloads land in the `BytesMut` you passed,
//! straight from the socket where possible.
//!
//! ## Errors
//! Calls that fail at once return [`Error`]. Everything that goes wrong on
//! an open connection (socket errors, a server that hangs up or breaks the
//! protocol) ends it with [`Event::Closed`], after every request still in
//! flight has completed with an error. Servers' refusals of options and
//! commands are results inside events, and the connection stays usable.
//! [`Error`] converts into `std::io::Error`.
//!
//! TLS (`nbds://` URIs, [`Config::tls`]) runs inside the same registered
//! socket (nbd-driver's `Stream`); vsock is not supported yet.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod connection;
mod error;

pub use connection::NbdConnection;

use std::time::{Duration, Instant};

/// The earliest deadline of many connections (see
/// [`NbdConnection::poll_timeout`]): pass it to [`poll_timeout_until`] for
/// one `Poll::poll` over all of them, then call
/// [`NbdConnection::handle_timeout`] on each after the wake-up.
pub fn next_deadline<'a>(
    conns: impl IntoIterator<Item = &'a mut NbdConnection>,
) -> Option<Instant> {
    conns.into_iter().filter_map(|c| c.poll_timeout()).min()
}

/// The timeout for `Poll::poll` that wakes at `deadline` (`None`: no
/// deadline, sleep until readiness). Rounds up to the next millisecond, so
/// a wake-up never comes before the deadline and spins.
pub fn poll_timeout_until(deadline: Option<Instant>) -> Option<Duration> {
    let left = deadline?.saturating_duration_since(Instant::now());
    let ms = left.as_nanos().div_ceil(1_000_000);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
}
pub use error::{Error, Result};
/// The mio this crate is built on, so embedders use the same version.
pub use mio;
pub use nbd_core::{
    self, CloseReason, CmdFlags, CommandError, Config, Cookie, Event, ExportInfo, Limits,
    OptionKind, Phase, Refused, Strict, TimeoutPolicy, TlsMode, UsageError,
};
pub use nbd_driver::{IoStats, DEFAULT_MID_MESSAGE_RETRIES};
