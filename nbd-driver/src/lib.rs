//! # nbd-driver: the one I/O layer under every nbd-rs adapter
//!
//! [`nbd_core`] is a state machine without I/O. Something has to move bytes
//! between it and a socket, and every adapter (blocking `nbd-std`, the
//! embedder's-`mio::Poll` `nbd-mio`, and those to come) needs the same
//! pieces for it. They are written once, here:
//!
//! - [`Transport`]: the byte pipe (read, vectored read, vectored write,
//!   shutdown, and a handshake and buffered bytes for TLS), with
//!   [`Socket`] for Unix and TCP sockets and [`Stream`], a socket that
//!   switches to TLS when the server acknowledges `NBD_OPT_STARTTLS`
//!   ([`Driver::start_tls`]): X.509 on rustls (ring), TLS-PSK on OpenSSL
//!   with the `tls-psk` feature; [`TlsSettings`] and [`TlsError`] in
//!   [`tls`].
//! - vsock (`nbd+vsock://`) gives [`ConnectError::Unsupported`]: opening an
//!   `AF_VSOCK` socket needs raw socket-address code that this crate's
//!   `forbid(unsafe_code)` rules out, and the machine it was written on
//!   has no vsock loopback to test it against.
//! - [`connect()`]: NBD URIs and Unix paths (including Linux abstract
//!   names), TCP trying every resolved address with `TCP_NODELAY`;
//!   [`connect_command`] and [`connect_socket_activation`] start the
//!   server themselves (libnbd's `nbd_connect_command` and
//!   `nbd_connect_systemd_socket_activation`); [`Socket::from_fd`] adopts
//!   a socket the caller connected.
//! - [`Driver`]: the send and receive loops with their retry policy, the
//!   final flush and shutdown, the combined read/write interest of core
//!   and transport, and [`IoStats`].
//! - [`Demux`]: folds read chunks, block-status extents and the completion
//!   of a cookie into one [`Completion`], without I/O.
//!
//! The driver never waits; the adapter waits its own way (`poll(2)`, a
//! mio registration) for [`Driver::interest`]. A blocking adapter's loop:
//!
//! ```no_run
//! use nbd_core::{Config, Connection, Event};
//! use nbd_driver::{connect, Driver, RecvUntil, Stream};
//! # fn wait_for(_: &Stream, _: nbd_driver::Interest) {}
//! let mut cfg = Config::default();
//! let mut c = connect("nbd+unix:///?socket=/tmp/nbd.sock", &mut cfg)?;
//! let mut conn = Connection::new(cfg, std::time::Instant::now());
//! let mut driver = Driver::new(c.target);
//! let mut stream = Stream::new(c.socket);
//! loop {
//!     let w = driver.send(&mut conn, &mut stream, u32::MAX);
//!     let r = driver.recv(&mut conn, &mut stream, RecvUntil::Reads(16));
//!     driver.finish(&mut conn, &mut stream);
//!     while let Some(ev) = conn.poll_event() {
//!         match ev {
//!             Event::StartTls => driver.start_tls(&mut conn, &mut stream, &c.tls),
//!             Event::GoSucceeded(info) => println!("size {}", info.size),
//!             Event::Closed(reason) => return Ok(println!("closed: {reason}")),
//!             _ => {}
//!         }
//!     }
//!     if !(w.progressed || r.progressed || r.more) {
//!         match driver.interest(&conn, &stream) {
//!             Some(i) => wait_for(&stream, i),
//!             None => break,
//!         }
//!     }
//! }
//! # Ok::<(), nbd_driver::ConnectError>(())
//! ```
//!
//! Like `nbd-core`, this crate starts no thread, and its driver and demux
//! read no clock: deadlines are the core's (`Connection::poll_timeout`), and
//! each adapter waits on its own clock. Only [`connect_tcp_within`] reads
//! one, to share a connect budget among addresses.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod connect;
pub mod demux;
pub mod driver;
pub mod process;
pub mod tls;
#[cfg(feature = "tls-psk")]
mod tls_psk;
pub mod transport;

pub use connect::{
    connect, connect_tcp, connect_tcp_within, connect_unix, connect_uri, connect_uri_with,
    AllowTls, ConnectError, Connected, UriPolicy,
};
pub use demux::{Completion, Demux};
pub use driver::{Driver, Interest, IoStats, Progress, RecvUntil, DEFAULT_MID_MESSAGE_RETRIES};
pub use process::{connect_command, connect_socket_activation, Subprocess};
pub use tls::{Stream, TlsError, TlsSettings};
pub use transport::{Socket, Transport};
