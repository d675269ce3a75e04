//! # nbd-core: a Sans-IO NBD client state machine
//!
//! This crate speaks the Network Block Device protocol (the NBD project's
//! `doc/proto.md`, including the extended-headers extension) without doing
//! any I/O. It never touches a socket, a clock, a thread or a file: it
//! consumes bytes the server sent and produces bytes to send plus
//! [`Event`]s. The adapters `nbd-std` (blocking) and `nbd-mio` (event loop)
//! drive it over real sockets; tests and fuzzers drive it from byte slices.
//!
//! ```text
//!             embedder's code
//!    ┌───────────────┴────────────────┐
//!  nbd-std (blocking loop)     nbd-mio (registered on the embedder's mio::Poll)
//!    └───────────────┬────────────────┘
//!                nbd-core  (no I/O, no clock, no threads: bytes in, actions out)
//! ```
//!
//! ## The contract of [`Connection`]
//! - **Getters** (`&self`): [`Connection::phase`], [`Connection::export_info`],
//!   [`Connection::in_flight`], what was negotiated; for adapters deciding
//!   whether to wait, [`Connection::reply_in_progress`] and
//!   [`Connection::request_in_progress`] (a message is half through the
//!   socket, so the rest is microseconds away).
//! - **Input**: [`Connection::recv_buf`] + [`Connection::recv_commit`] (read
//!   straight into the core's buffer, or into a read's destination buffer
//!   while its payload arrives; [`Connection::recv_bufs`] adds the room for
//!   the next headers, for one `readv`), or [`Connection::handle_input`]
//!   (copying); [`Connection::handle_eof`] when the server closes.
//! - **Commands** queue work and return at once: `opt_list`, `opt_info`,
//!   `opt_go`, ... in option mode; [`Connection::read`],
//!   [`Connection::write`], ... once ready, with [`CmdFlags`]. Misuse is a
//!   [`UsageError`] returned at once, never a panic; a refused read or
//!   write hands its buffer back in a [`Refused`].
//! - **Output**: bytes to send ([`Connection::transmit_slices`] for vectored
//!   writes, then [`Connection::transmitted`]), then [`Connection::poll_event`].
//!   After every input and every command, drain all output before waiting
//!   on the socket again.
//!
//! ## The driving loop
//! ```
//! use nbd_core::{Config, Connection, Event};
//! # fn server_bytes() -> Vec<u8> { Vec::new() }
//! let mut conn = Connection::new(Config::default());
//! let mut to_server = Vec::new();
//! // loop {
//!     conn.handle_input(&server_bytes());      // what the socket produced
//!     conn.poll_transmit(&mut to_server);      // what to write to the socket
//!     while let Some(ev) = conn.poll_event() { // what happened
//!         if let Event::GoSucceeded(info) = ev { println!("size {}", info.size); }
//!     }
//! // }
//! ```
//!
//! ## Errors
//! Three kinds: a [`ProtocolError`] (the server broke the protocol, one
//! variant per rule; the connection ends with [`CloseReason::Protocol`],
//! reported once), a
//! [`UsageError`] (the caller asked for something invalid; nothing was
//! sent), and server-reported errors ([`OptionError`] in
//! [`Event::OptionError`], [`CommandError`] in [`Event::CommandDone`]), which
//! leave the connection usable. Every request in flight completes exactly
//! once, with an error if the connection ends first.
//!
//! How the connection ended is one [`CloseReason`]:
//! [`CloseReason::is_clean`] for the ends the client asked for,
//! [`CloseReason::is_loss`] to know whether the end cost anything (a server
//! that hangs up with nothing in flight, [`CloseReason::ServerClosed`] with
//! `lost == 0`, cost nothing).
//!
//! ## Modules
//! [`consts`] (every number of the spec), [`wire`] (encoders and parsers per
//! message family), `negotiate` (handshake and options), `transmit`
//! (commands and replies), [`config`] (settings, strict mode, limits),
//! [`uri`] (NBD URIs).

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod buffer;
mod client;
pub mod config;
pub mod consts;
pub mod error;
pub mod event;
mod flags;
mod negotiate;
mod transmit;
pub mod uri;
pub mod wire;

pub use client::{Connection, Phase};
pub use config::{Config, Limits, Strict, TlsMode};
pub use error::{
    CommandError, NbdErrno, OptionError, ProtocolError, Refused, RepError, UsageError,
};
pub use event::{
    BlockSize, CloseReason, Cookie, Event, ExportInfo, Extent, OptionKind, Protocol, ReadChunkKind,
};
pub use flags::CmdFlags;
pub use transmit::command_name;
pub use uri::NbdUri;
pub use wire::reply::HeaderMode;
