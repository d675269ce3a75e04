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
//!     nbd-driver (transports, connect, send/receive loops, completion demux)
//!                    │
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
//! - **Time** is an input too, never read from a clock: the connection is
//!   created with `now`; [`Connection::poll_timeout`] says until when the
//!   adapter may wait; [`Connection::handle_timeout`] acts on what is due.
//!   The handshake has a deadline ([`Config::handshake_timeout`], 30 s by
//!   default), commands have one if asked ([`Config::command_timeout`],
//!   [`Connection::set_deadline`]); [`Connection::cancel`] gives up on one
//!   command and [`Connection::abort`] on the connection. A command that
//!   times out or is cancelled completes at once with its buffer; its late
//!   reply is read and dropped.
//!
//! ## The driving loop
//! ```
//! use std::time::Instant;
//! use nbd_core::{CmdFlags, Config, Connection, Event};
//! # fn server_bytes(_wait_until: Option<Instant>) -> Vec<u8> { Vec::new() }
//! let mut conn = Connection::new(Config::default(), Instant::now());
//! let mut to_server = Vec::new();
//! // loop {
//!     // Wait for the socket, but not past the next deadline.
//!     let input = server_bytes(conn.poll_timeout());
//!     conn.handle_timeout(Instant::now());     // what time it is
//!     conn.handle_input(&input);               // what the socket produced
//!     conn.poll_transmit(&mut to_server);      // what to write to the socket
//!     while let Some(ev) = conn.poll_event() { // what happened
//!         match ev {
//!             Event::GoSucceeded(info) => println!("size {}", info.size),
//!             Event::Closed(reason) => println!("closed: {reason}"),
//!             _ => {}
//!         }
//!     }
//! // }
//! ```
//!
//! ## A scripted session
//! The server's side is plain bytes, so a whole session runs without a
//! socket: a fixed-newstyle greeting, the replies to `NBD_OPT_GO`, then a
//! simple reply to one read.
//! ```
//! use bytes::BytesMut;
//! use nbd_core::consts::{self, handshake_flags, info, opt, rep, transmission_flags};
//! use nbd_core::{CmdFlags, Config, Connection, Event};
//!
//! // Only NBD_OPT_GO: no extended headers, structured replies or meta contexts.
//! let mut cfg = Config::default();
//! cfg.request_extended_headers = false;
//! cfg.request_structured_replies = false;
//! cfg.request_meta_context = false;
//! let mut conn = Connection::new(cfg, std::time::Instant::now());
//! let mut to_server = Vec::new();
//!
//! // Greeting: NBDMAGIC, IHAVEOPT, handshake flags.
//! let mut greeting = Vec::new();
//! greeting.extend(consts::NBDMAGIC.to_be_bytes());
//! greeting.extend(consts::IHAVEOPT.to_be_bytes());
//! greeting.extend((handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes());
//! conn.handle_input(&greeting);
//! conn.poll_transmit(&mut to_server);
//! // The client flags, then the header of NBD_OPT_GO.
//! assert_eq!(to_server[..4], 3u32.to_be_bytes());
//! assert_eq!(to_server[4..12], consts::IHAVEOPT.to_be_bytes());
//! assert_eq!(to_server[12..16], opt::GO.to_be_bytes());
//! to_server.clear();
//!
//! // NBD_REP_INFO (NBD_INFO_EXPORT: 1 MiB, has flags, can flush), NBD_REP_ACK.
//! let option_reply = |kind: u32, data: &[u8]| {
//!     let mut r = Vec::new();
//!     r.extend(consts::OPTION_REPLY_MAGIC.to_be_bytes());
//!     r.extend(opt::GO.to_be_bytes());
//!     r.extend(kind.to_be_bytes());
//!     r.extend((data.len() as u32).to_be_bytes());
//!     r.extend(data);
//!     r
//! };
//! let mut export = info::EXPORT.to_be_bytes().to_vec();
//! export.extend((1u64 << 20).to_be_bytes());
//! export.extend((transmission_flags::HAS_FLAGS | transmission_flags::SEND_FLUSH).to_be_bytes());
//! let mut replies = option_reply(rep::INFO, &export);
//! replies.extend(option_reply(rep::ACK, &[]));
//! // Any split works: feed it one byte at a time.
//! for b in &replies {
//!     conn.handle_input(std::slice::from_ref(b));
//! }
//! let info = loop {
//!     match conn.poll_event().expect("an event") {
//!         Event::GoSucceeded(info) => break info,
//!         _ => {} // e.g. what the options along the way reported
//!     }
//! };
//! assert_eq!(info.size, 1 << 20);
//! assert!(info.can_flush() && !info.is_read_only());
//!
//! // Transmission: read 4 bytes at offset 512.
//! let cookie = conn.read(512, BytesMut::zeroed(4), CmdFlags::empty()).unwrap();
//! conn.poll_transmit(&mut to_server);
//! assert_eq!(to_server.len(), consts::REQUEST_LEN);
//! assert_eq!(to_server[..4], consts::REQUEST_MAGIC.to_be_bytes());
//! assert_eq!(to_server[6..8], consts::cmd::READ.to_be_bytes());
//! assert_eq!(to_server[16..24], 512u64.to_be_bytes());
//! // The simple reply echoes the request's 8 cookie bytes, then the data.
//! let mut reply = consts::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
//! reply.extend(0u32.to_be_bytes()); // no error
//! reply.extend(&to_server[8..16]);
//! reply.extend(b"data");
//! conn.handle_input(&reply);
//! match conn.poll_event() {
//!     Some(Event::CommandDone { cookie: c, result, buffer }) => {
//!         assert_eq!(c, cookie);
//!         assert!(result.is_ok());
//!         assert_eq!(&buffer.unwrap()[..], b"data");
//!     }
//!     other => panic!("expected the read's completion, got {other:?}"),
//! }
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
//! [`consts`] (every number of the spec), `wire` (encoders and parsers per
//! message family), `negotiate` (handshake and options), `transmit`
//! (commands and replies), `deadline` (the handshake timer and the heap of
//! command deadlines), [`config`] (settings, strict mode, limits, timeouts),
//! [`uri`] (NBD URIs). `wire` is public for the fuzz targets and tests
//! that exercise each parser on its own, but hidden from the docs and not
//! part of the stable API: its types that the API uses ([`WireError`],
//! [`Extent`], [`HeaderMode`]) are re-exported here.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod buffer;
mod client;
pub mod config;
pub mod consts;
mod coverage;
mod deadline;
pub mod error;
pub mod event;
mod flags;
mod negotiate;
mod reply_bounds;
mod transmit;
pub mod uri;
/// Encoders and parsers per message family. Not part of the stable API:
/// public so that fuzz targets and tests reach each parser on its own.
#[doc(hidden)]
pub mod wire;

pub use client::{Connection, Phase};
pub use config::{Config, Limits, Strict, TimeoutPolicy, TlsMode};
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
pub use wire::WireError;
