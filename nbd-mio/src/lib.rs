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
//!     poll.poll(&mut events, None)?;
//!     for ev in events.iter() {
//!         if ev.token() == NBD {
//!             nbd.handle_event(ev);
//!         }
//!     }
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
//! Not supported yet: TLS (`nbds://` URIs, [`Config::tls`]) and vsock.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod connection;
mod error;

pub use connection::NbdConnection;
pub use error::{Error, Result};
/// The mio this crate is built on, so embedders use the same version.
pub use mio;
pub use nbd_core::{
    self, CloseReason, CmdFlags, CommandError, Config, Cookie, Event, ExportInfo, Limits,
    OptionKind, Phase, Refused, Strict, TlsMode, UsageError,
};
pub use nbd_driver::{IoStats, DEFAULT_MID_MESSAGE_RETRIES};
