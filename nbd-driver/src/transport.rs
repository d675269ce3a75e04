//! The byte pipe under a connection: [`Transport`], and [`Socket`], the
//! Unix and TCP implementation every adapter uses.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

/// A non-blocking, ordered, reliable byte stream to an NBD server.
///
/// The driver only ever calls these four methods, and expects
/// `io::ErrorKind::WouldBlock` when no progress is possible now (the
/// adapter then waits for readiness its own way: `poll(2)`, a mio
/// registration, a tokio reactor). Implement it to run NBD over a stream
/// the project does not know (a TLS session, a pipe pair, an in-memory
/// pipe in tests); [`Socket`] is the implementation for Unix and TCP
/// sockets. The driver's methods take `&mut T` for any `T: Transport +
/// ?Sized`, so a trait object works too (`&mut *boxed` for a
/// `Box<dyn Transport>`).
pub trait Transport {
    /// Reads into `buf`; `Ok(0)` means the server closed its end.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Reads into `bufs` in order (one `readv`). The default reads into
    /// the first non-empty buffer only, which is correct but forgoes the
    /// saving; override it where the stream has a vectored read.
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(b) => self.read(b),
            None => Ok(0),
        }
    }

    /// Writes from `bufs` in order (one `writev`); returns how much the
    /// stream took, which may be less than offered.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Shuts down one or both directions. Called once the NBD connection
    /// has ended (`Both`), and after `NBD_CMD_DISC` or `NBD_OPT_ABORT` went
    /// out (`Write`, so a server waiting for the client's end-of-file
    /// closes too). Errors are ignored by the driver: the peer may be gone.
    fn shutdown(&mut self, how: Shutdown) -> io::Result<()>;
}

/// A connected Unix or TCP socket, in non-blocking mode: the transport of
/// every adapter. Make one with [`crate::connect()`], or with
/// [`Socket::from_unix`] and [`Socket::from_tcp`] for a socket you
/// connected yourself (they switch it to non-blocking mode and set
/// `TCP_NODELAY` on TCP).
#[derive(Debug)]
#[non_exhaustive]
pub enum Socket {
    /// A Unix domain stream socket (a path or a Linux abstract name).
    Unix(UnixStream),
    /// A TCP connection (`TCP_NODELAY` set).
    Tcp(TcpStream),
}

impl Socket {
    /// Wraps a connected Unix stream, switching it to non-blocking mode.
    /// Call it for a socket you connected (or got from a `socketpair`)
    /// yourself.
    pub fn from_unix(s: UnixStream) -> io::Result<Socket> {
        s.set_nonblocking(true)?;
        Ok(Socket::Unix(s))
    }

    /// Wraps a TCP stream (connected, or with a non-blocking connect in
    /// progress), switching it to non-blocking mode and setting
    /// `TCP_NODELAY`: small requests must leave at once, not wait for
    /// Nagle's timer (doc/proto.md, "Protocol phases" recommends it for
    /// latency; libnbd does the same).
    pub fn from_tcp(s: TcpStream) -> io::Result<Socket> {
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        Ok(Socket::Tcp(s))
    }

    /// Adopts a connected stream socket of any supported family (Unix or
    /// TCP, IPv4 or IPv6) given as a file descriptor, as libnbd's
    /// `nbd_connect_socket` does; ownership passes to the `Socket`. Call it
    /// for a socket connected (or inherited) outside Rust's types. Other
    /// address families are refused with `ErrorKind::Unsupported`.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<Socket> {
        use rustix::net::AddressFamily;
        let family = rustix::net::getsockname(&fd)?.address_family();
        if family == AddressFamily::UNIX {
            Socket::from_unix(UnixStream::from(fd))
        } else if family == AddressFamily::INET || family == AddressFamily::INET6 {
            Socket::from_tcp(TcpStream::from(fd))
        } else {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("socket address family {family:?} is not supported"),
            ))
        }
    }

    /// A description of the peer for messages: the TCP address, or the
    /// Unix socket's path (`socket` when it has none, as for a pair).
    pub fn peer_description(&self) -> String {
        match self {
            Socket::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Socket::Unix(s) => s
                .peer_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "socket".into()),
        }
    }
}

impl Transport for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read_vectored(bufs),
            Socket::Tcp(s) => s.read_vectored(bufs),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Unix(s) => s.as_fd(),
            Socket::Tcp(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
