//! # nbd-mio: an NBD client for your own mio event loop
//!
//! [`NbdConnection`] is one NBD connection over a non-blocking
//! [`mio::net::UnixStream`] or [`mio::net::TcpStream`] (with `TCP_NODELAY`),
//! driven by the Sans-IO state machine of [`nbd_core`]. It never blocks and
//! owns no `Poll`: you register it on yours, hand it the readiness events of
//! its token, and read what happened as [`nbd_core::Event`]s. Many
//! connections (and anything else mio can watch) share one thread.
//!
//! ## The loop
//! Each turn:
//! 1. [`NbdConnection::handle_event`] for every event with the connection's
//!    token: it writes and reads (until the socket would block, or until
//!    commands completed, so that you can submit more at once). A read or
//!    write that would block in the middle of a reply or request is tried
//!    again a few times at once, since the rest is microseconds away
//!    ([`NbdConnection::set_mid_message_retries`]);
//! 2. [`NbdConnection::poll_event`] until `None`: negotiation results,
//!    command completions ([`Event::CommandDone`] hands read buffers back),
//!    and finally [`Event::Closed`]. Submit commands through
//!    [`NbdConnection::conn_mut`] whenever you like; they only queue bytes;
//! 3. [`NbdConnection::reregister`]: sends what was queued and puts the
//!    socket back in the registry with the interest it needs (readable
//!    while the core expects bytes, writable only while output waits for
//!    socket space), so that the next poll reports it, at once if step 1
//!    stopped early. Never skip it: step 1 takes the socket out of the
//!    registry while the connection drains it, so that the server's sends
//!    wake no poller in the meantime (the way `poll(2)` clients wait).
//!
//! This program connects, reads the first 512 bytes of the export and
//! disconnects:
//!
//! ```no_run
//! use bytes::BytesMut;
//! use mio::{Events, Poll, Token};
//! use nbd_mio::nbd_core::CmdFlags;
//! use nbd_mio::{Config, Event, NbdConnection};
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
//!                 nbd.conn_mut().read(0, BytesMut::zeroed(512), CmdFlags::empty())?;
//!             }
//!             Event::CommandDone { result, buffer, .. } => {
//!                 result?;
//!                 let sector = buffer.unwrap_or_default();
//!                 println!("first bytes: {:02x?}", &sector[..16]);
//!                 nbd.conn_mut().disconnect()?;
//!             }
//!             Event::Closed(reason) if reason.is_clean() => return Ok(()),
//!             Event::Closed(reason) => return Err(reason.to_string().into()),
//!             _ => {}
//!         }
//!     }
//!     nbd.reregister(poll.registry())?;
//! }
//! # }
//! ```
//!
//! With [`Config::opt_mode`] the handshake stops in the negotiating phase
//! instead: call `conn_mut().opt_list()` (each export is an
//! [`Event::ExportListed`], then [`Event::OptionSucceeded`]),
//! `set_export_name`, `opt_info`, and `opt_go` (then
//! [`Event::GoSucceeded`]). In the ready phase, `read`, `write`, `flush`,
//! `trim`, `cache`, `write_zeroes` and `block_status` return a [`Cookie`]
//! at once and complete later as an [`Event::CommandDone`] with that
//! cookie, in whatever order the server answers. Check
//! [`nbd_core::Connection::has_room`] before submitting when many requests
//! are in flight. Write payloads are `Bytes` and go to the socket without a
//! copy; read payloads land in the `BytesMut` you passed, straight from the
//! socket where possible.
//!
//! ## Errors
//! Calls that fail at once return [`Error`]. Everything that goes wrong on
//! an open connection (socket errors, a server that hangs up or breaks the
//! protocol) ends it with [`Event::Closed`], after every request still in
//! flight has completed with an error. Servers' refusals of options and
//! commands are results inside events, and the connection stays usable.
//!
//! Not supported yet: TLS (`nbds://` URIs, [`Config::tls`]) and vsock.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod connection;
mod error;

pub use connection::{IoStats, NbdConnection, DEFAULT_MID_MESSAGE_RETRIES};
pub use error::{Error, Result};
pub use nbd_core::{
    self, CloseReason, CommandError, Config, Cookie, Event, ExportInfo, OptionKind, Phase, Strict,
};
