//! # nbd-std: a blocking NBD client
//!
//! A libnbd-like client over `std` Unix and TCP sockets, driven by the
//! Sans-IO state machine of [`nbd_core`]. One [`Client`] is one connection.
//!
//! ```no_run
//! use nbd_std::{Client, CmdFlags, Config};
//! let mut c = Client::connect("nbd+unix:///?socket=/tmp/sock", Config::default())?;
//! let mut sector = [0u8; 512];
//! c.pread(&mut sector, 0, CmdFlags::empty())?; // buffer, offset, flags
//! c.shutdown()?;
//! # Ok::<(), nbd_std::Error>(())
//! ```
//!
//! Option mode ([`Config::opt_mode`]) stops after the handshake so the
//! caller can list exports, ask for info and pick one:
//!
//! ```no_run
//! use nbd_std::{Client, Config};
//! let mut cfg = Config::default();
//! cfg.opt_mode = true;
//! let mut c = Client::connect("/tmp/sock", cfg)?;
//! for (name, description) in c.opt_list()? {
//!     println!("{name} {description}");
//! }
//! c.opt_go()?;
//! println!("size = {}", c.get_size()?);
//! # Ok::<(), nbd_std::Error>(())
//! ```
//!
//! Many requests in flight from one thread: the `aio_*` calls queue a
//! command and return its [`Cookie`]; [`Client::wait`] / [`Client::wait_any`]
//! retire completions. [`NbdFile`] wraps a client as `Read + Write + Seek`,
//! with a read-ahead window.
//!
//! Arguments come in one order everywhere: the buffer (if any), the
//! offset, the length (if no buffer gives it), then [`CmdFlags`]:
//! `pread(buf, offset, flags)`, `trim(offset, count, flags)`. The offset
//! comes before the length as in the spec's request header, where libnbd's
//! C API puts the count first.
//!
//! TLS: `nbds://` and `nbds+unix://` URIs (libnbd's `tls-certificates`,
//! `tls-verify-peer`, `tls-hostname`, `tls-username`, `tls-psk-file`
//! parameters), or [`Client::connect_with_tls`] with a [`TlsSettings`] and
//! [`Config::tls`]. X.509 runs on rustls; TLS-PSK needs the `tls-psk`
//! feature (OpenSSL). Failures are [`Error::Tls`] with a [`TlsError`]
//! naming the cause:
//!
//! ```no_run
//! use nbd_std::{Client, Config, Error, TlsError};
//! match Client::connect("nbds://localhost/?tls-certificates=/etc/pki/nbd", Config::default()) {
//!     Err(Error::Tls(TlsError::CertificateRejected(why))) => eprintln!("not this server: {why}"),
//!     Err(e) => eprintln!("{e}"),
//!     Ok(c) => println!("TLS: {}", c.tls_negotiated()),
//! }
//! ```
//!
//! Other ways to connect, as libnbd's: [`Client::connect_command`] (a
//! server on a child's stdin/stdout), [`Client::connect_systemd_socket_activation`],
//! [`Client::connect_fd`] (a socket you connected); the server a client
//! started is stopped and reaped when the client is dropped.
//!
//! The socket work (connect, TLS, the send and receive loops, the retry
//! policy) is [`nbd_driver`]'s, shared with nbd-mio; this crate adds the
//! waiting (`poll(2)`) and the libnbd-shaped calls.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod file;

pub use client::Client;
pub use error::{Error, Result};
pub use file::{NbdFile, DEFAULT_READ_AHEAD};
pub use nbd_core::{
    self, consts, BlockSize, CloseReason, CmdFlags, CommandError, Config, Cookie, ExportInfo,
    Extent, Limits, NbdErrno, OptionError, OptionKind, Phase, ReadChunkKind, Refused, Strict,
    TimeoutPolicy, TlsMode, UsageError,
};
pub use nbd_driver::{self, Completion, IoStats, TlsError, TlsSettings, UriPolicy};
