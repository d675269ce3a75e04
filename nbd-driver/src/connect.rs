//! One way to connect, for every adapter: NBD URIs, Unix socket paths
//! (including Linux abstract names) and TCP with every resolved address
//! tried in turn.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nbd_core::uri::{NbdUri, Transport as UriTransport, UriError};
use nbd_core::Config;

use crate::transport::Socket;

/// Why connecting failed before any NBD byte was exchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The target looked like an NBD URI but did not parse.
    #[error("invalid NBD URI: {0}")]
    Uri(#[from] UriError),
    /// The URI asks for something no transport here offers yet (TLS,
    /// vsock).
    #[error("not supported yet: {0}")]
    Unsupported(String),
    /// A socket call failed: resolving the host, or connecting (for TCP,
    /// the error of the last address tried).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the address or path.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A connected socket and what it was opened to, for messages.
#[derive(Debug)]
#[non_exhaustive]
pub struct Connected {
    /// The socket, in non-blocking mode (`TCP_NODELAY` on TCP).
    pub socket: Socket,
    /// The URI, path, address or command line that was connected to.
    pub target: String,
    /// The server process, when the client started it
    /// ([`crate::connect_command`], [`crate::connect_socket_activation`]):
    /// keep it for as long as the connection and drop it after the
    /// socket; its drop stops and reaps the server.
    pub process: Option<crate::process::Subprocess>,
}

impl Connected {
    /// A connection to `target` over `socket`, with no server process.
    pub fn new(socket: Socket, target: impl Into<String>) -> Connected {
        Connected {
            socket,
            target: target.into(),
            process: None,
        }
    }
}

/// Connects to `target`: an NBD URI (`nbd://`, `nbd+unix://`; its export
/// name replaces `cfg.export_name`) or else a Unix socket path. Call it to
/// open the transport of a new connection; it blocks for the host-name
/// lookup and the TCP connects (a Unix connect completes at once).
pub fn connect(target: &str, cfg: &mut Config) -> Result<Connected, ConnectError> {
    if nbd_core::uri::is_nbd_uri(target) {
        connect_uri(target, cfg)
    } else {
        let socket = connect_unix(Path::new(target))?;
        Ok(Connected::new(socket, target))
    }
}

/// Connects to an NBD URI; its export name replaces `cfg.export_name`.
/// TLS URIs (`nbds`, `nbds+unix`) and vsock give
/// [`ConnectError::Unsupported`]: a client without TLS must not connect
/// in plain text where the URI requires TLS (doc/proto.md, "TLS support").
pub fn connect_uri(uri: &str, cfg: &mut Config) -> Result<Connected, ConnectError> {
    let u = NbdUri::parse(uri)?;
    if u.tls {
        return Err(ConnectError::Unsupported(format!(
            "{} URIs: TLS is not implemented yet",
            u.scheme()
        )));
    }
    let socket = match &u.transport {
        UriTransport::Unix { path } => connect_unix(path)?,
        UriTransport::Tcp { host, port } => {
            connect_tcp_within((host.as_str(), *port), cfg.handshake_timeout)?
        }
        UriTransport::Vsock { .. } => {
            return Err(ConnectError::Unsupported(
                "the vsock transport (nbd+vsock URIs)".into(),
            ))
        }
    };
    cfg.export_name = u.export_name;
    Ok(Connected::new(socket, uri))
}

/// Connects to a Unix domain socket. A leading NUL byte names the Linux
/// abstract namespace, as `nbd+unix:///?socket=%00name` spells it.
pub fn connect_unix(path: &Path) -> Result<Socket, ConnectError> {
    let ctx = || format!("connect: {}", path.display());
    let io = |e| ConnectError::Io {
        context: ctx(),
        source: e,
    };
    let addr = unix_addr(path).map_err(io)?;
    let s = UnixStream::connect_addr(&addr).map_err(io)?;
    Socket::from_unix(s).map_err(io)
}

/// Connects over TCP, trying every address `addr` resolves to in turn
/// (IPv6 and IPv4 of one name, say) until one accepts; the error names the
/// last address tried. Sets `TCP_NODELAY` and non-blocking mode.
pub fn connect_tcp(addr: impl ToSocketAddrs) -> Result<Socket, ConnectError> {
    connect_tcp_within(addr, None)
}

/// Like [`connect_tcp`], giving up after `timeout` in all (`None`: the
/// system's own limit, which may be minutes), so that a host that drops
/// the SYN cannot stall a connect with a deadline: the adapters pass
/// [`nbd_core::Config::handshake_timeout`]. The failure is an
/// [`ConnectError::Io`] of kind `TimedOut`. This is the one place in the
/// crate that reads the clock: to share the budget among the addresses.
pub fn connect_tcp_within(
    addr: impl ToSocketAddrs,
    timeout: Option<Duration>,
) -> Result<Socket, ConnectError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| ConnectError::Io {
            context: "resolve".into(),
            source: e,
        })?
        .collect();
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    connect_addrs(&addrs, deadline)
}

/// Connects to the first of `addrs` that accepts, in order; see
/// [`connect_tcp`].
pub fn connect_tcp_addrs(addrs: &[SocketAddr]) -> Result<Socket, ConnectError> {
    connect_addrs(addrs, None)
}

fn connect_addrs(addrs: &[SocketAddr], deadline: Option<Instant>) -> Result<Socket, ConnectError> {
    let mut last = None;
    for a in addrs {
        let attempt = match deadline {
            None => TcpStream::connect(a),
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => TcpStream::connect_timeout(a, left),
                _ => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out connecting (the handshake timeout passed)",
                )),
            },
        };
        match attempt {
            Ok(s) => {
                return Socket::from_tcp(s).map_err(|e| ConnectError::Io {
                    context: format!("connect: {a}"),
                    source: e,
                })
            }
            Err(e) => last = Some((a, e)),
        }
    }
    Err(match last {
        Some((a, e)) => ConnectError::Io {
            context: if addrs.len() > 1 {
                format!("connect: {a} (and {} other addresses)", addrs.len() - 1)
            } else {
                format!("connect: {a}")
            },
            source: e,
        },
        None => ConnectError::Io {
            context: "resolve".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address found"),
        },
    })
}

/// The socket address for `path`; a leading NUL byte selects the Linux
/// abstract namespace.
pub fn unix_addr(path: &Path) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if let Some(name) = bytes.strip_prefix(&[0]) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt;
            return std::os::unix::net::SocketAddr::from_abstract_name(name);
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract Unix sockets exist only on Linux",
            ));
        }
    }
    std::os::unix::net::SocketAddr::from_pathname(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn abstract_unix_name_connects() {
        let name = format!("nbd-driver-test-{}", std::process::id());
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
        };
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        let mut cfg = Config::default();
        let c = connect(&format!("nbd+unix:///exp?socket=%00{name}"), &mut cfg).unwrap();
        assert!(matches!(c.socket, Socket::Unix(_)));
        assert_eq!(cfg.export_name, "exp");
        l.accept().unwrap();
    }

    #[test]
    fn every_resolved_address_is_tried() {
        // A port nobody listens on (bound, then closed), then a listener.
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let live = l.local_addr().unwrap();
        let s = connect_tcp_addrs(&[dead, live]).unwrap();
        match s {
            Socket::Tcp(t) => {
                assert_eq!(t.peer_addr().unwrap(), live);
                assert!(t.nodelay().unwrap());
            }
            _ => panic!("not tcp"),
        }
        l.accept().unwrap();
    }

    #[test]
    fn last_address_error_is_reported() {
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = connect_tcp_addrs(&[dead, dead]).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains(&dead.to_string()) && m.contains("1 other"),
            "{m}"
        );
    }

    #[test]
    fn tls_uris_are_refused_before_connecting() {
        let mut cfg = Config::default();
        let e = connect("nbds+unix:///?socket=/nonexistent", &mut cfg).unwrap_err();
        assert!(matches!(e, ConnectError::Unsupported(_)), "{e}");
    }
}
