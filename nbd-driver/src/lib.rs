//! # nbd-driver: the one I/O layer under every nbd-rs adapter
//!
//! [`nbd_core`] is a state machine without I/O. Something has to move bytes
//! between it and a socket, and every adapter (blocking `nbd-std`, the
//! embedder's-`mio::Poll` `nbd-mio`, and those to come) needs the same
//! pieces for it. They are written once, here:
//!
//! - [`Transport`]: the byte pipe (read, vectored read, vectored write,
//!   shutdown), with [`Socket`] for Unix and TCP sockets. TLS and vsock
//!   will be one more implementation each.
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
//! use nbd_driver::{connect, Driver, RecvUntil};
//! # fn wait_for(_: &nbd_driver::Socket, _: nbd_driver::Interest) {}
//! let mut cfg = Config::default();
//! let mut c = connect("nbd+unix:///?socket=/tmp/nbd.sock", &mut cfg)?;
//! let mut conn = Connection::new(cfg, std::time::Instant::now());
//! let mut driver = Driver::new(c.target);
//! loop {
//!     let w = driver.send(&mut conn, &mut c.socket, u32::MAX);
//!     let r = driver.recv(&mut conn, &mut c.socket, RecvUntil::Reads(16));
//!     driver.finish(&mut conn, &mut c.socket);
//!     while let Some(ev) = conn.poll_event() {
//!         match ev {
//!             Event::GoSucceeded(info) => println!("size {}", info.size),
//!             Event::Closed(reason) => return Ok(println!("closed: {reason}")),
//!             _ => {}
//!         }
//!     }
//!     if !(w.progressed || r.progressed || r.more) {
//!         match driver.interest(&conn) {
//!             Some(i) => wait_for(&c.socket, i),
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
pub mod transport;

pub use connect::{
    connect, connect_tcp, connect_tcp_within, connect_unix, connect_uri, ConnectError, Connected,
};
pub use demux::{Completion, Demux};
pub use driver::{Driver, Interest, IoStats, Progress, RecvUntil, DEFAULT_MID_MESSAGE_RETRIES};
pub use process::{connect_command, connect_socket_activation, Subprocess};
pub use transport::{Socket, Transport};
