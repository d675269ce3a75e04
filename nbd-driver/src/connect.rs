//! One way to connect, for every adapter: NBD URIs, Unix socket paths
//! (including Linux abstract names) and TCP with every resolved address
//! tried in turn.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nbd_core::uri::{NbdUri, Transport as UriTransport, UriError};
use nbd_core::{Config, TlsMode};

use crate::tls::TlsSettings;
use crate::transport::Socket;

/// Why connecting failed before any NBD byte was exchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The target looked like an NBD URI but did not parse.
    #[error("invalid NBD URI: {0}")]
    Uri(#[from] UriError),
    /// The URI asks for something no transport here offers yet (vsock).
    #[error("not supported yet: {0}")]
    Unsupported(String),
    /// The URI uses something its [`UriPolicy`] does not allow (a
    /// transport, TLS or plain text, a local file): libnbd's allow-lists
    /// for URIs from untrusted sources.
    #[error("the URI is not allowed: {0}")]
    NotAllowed(String),
    /// The TLS settings cannot work (TLS-PSK in a build without it).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
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
    /// The TLS settings to use if the server starts TLS: those given,
    /// with the URI's `tls-*` parameters applied and, for TCP, the host as
    /// the name to verify unless `tls-hostname` named one.
    pub tls: TlsSettings,
}

impl Connected {
    /// A connection to `target` over `socket`, with no server process.
    pub fn new(socket: Socket, target: impl Into<String>) -> Connected {
        Connected {
            socket,
            target: target.into(),
            process: None,
            tls: TlsSettings::default(),
        }
    }
}

/// Which TLS a URI may ask for ([`UriPolicy::allow_tls`]), as libnbd's
/// `nbd_set_uri_allow_tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllowTls {
    /// Plain `nbd` URIs only.
    Disable,
    /// Either (the default).
    Allow,
    /// TLS URIs (`nbds...`) only.
    Require,
}

/// What a URI may ask for, as libnbd's `nbd_set_uri_allow_transports`,
/// `nbd_set_uri_allow_tls` and `nbd_set_uri_allow_local_file`. Use
/// [`UriPolicy::untrusted`] for URIs from somewhere you do not trust (a
/// configuration a remote party controls): it refuses the parameters that
/// read local files. [`connect()`] and [`connect_uri`] use
/// [`UriPolicy::trusted`], for URIs the user typed (as nbdinfo does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UriPolicy {
    /// `nbd://` and `nbds://` may be used.
    pub allow_tcp: bool,
    /// `nbd+unix://` and `nbds+unix://` may be used.
    pub allow_unix: bool,
    /// `nbd+vsock://` and `nbds+vsock://` may be used.
    pub allow_vsock: bool,
    /// Which TLS the scheme may ask for.
    pub allow_tls: AllowTls,
    /// `tls-certificates=` and `tls-psk-file=` may name local files.
    pub allow_local_file: bool,
}

impl UriPolicy {
    /// Everything allowed: for URIs the user gave directly.
    pub fn trusted() -> UriPolicy {
        UriPolicy {
            allow_tcp: true,
            allow_unix: true,
            allow_vsock: true,
            allow_tls: AllowTls::Allow,
            allow_local_file: true,
        }
    }

    /// libnbd's defaults for a handle: every transport, TLS or not, but no
    /// local files. Tighten the fields further as needed.
    pub fn untrusted() -> UriPolicy {
        UriPolicy {
            allow_local_file: false,
            ..UriPolicy::trusted()
        }
    }

    fn check(&self, u: &NbdUri) -> Result<(), ConnectError> {
        let (ok, what) = match u.transport {
            UriTransport::Tcp { .. } => (self.allow_tcp, "TCP"),
            UriTransport::Unix { .. } => (self.allow_unix, "Unix socket"),
            UriTransport::Vsock { .. } => (self.allow_vsock, "vsock"),
        };
        if !ok {
            return Err(ConnectError::NotAllowed(format!("the {what} transport")));
        }
        match (self.allow_tls, u.tls) {
            (AllowTls::Disable, true) => {
                return Err(ConnectError::NotAllowed(format!("TLS ({})", u.scheme())))
            }
            (AllowTls::Require, false) => {
                return Err(ConnectError::NotAllowed(format!(
                    "plain text ({}; TLS is required)",
                    u.scheme()
                )))
            }
            _ => {}
        }
        if !self.allow_local_file {
            for (name, set) in [
                ("tls-certificates", u.tls_certificates.is_some()),
                ("tls-psk-file", u.tls_psk_file.is_some()),
            ] {
                if set {
                    return Err(ConnectError::NotAllowed(format!(
                        "{name}= names a local file"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Applies a URI's TLS parts to `cfg` and `tls`: an `nbds` scheme
/// requires TLS; `tls-certificates`, `tls-verify-peer`, `tls-hostname`,
/// `tls-psk-file` and the user name fill the settings of the same name;
/// for TCP the host becomes the name to verify unless one was set.
fn apply_tls(u: &NbdUri, cfg: &mut Config, tls: &mut TlsSettings) -> Result<(), ConnectError> {
    if u.tls {
        cfg.tls = TlsMode::Require;
    }
    if let Some(d) = &u.tls_certificates {
        tls.certificates = Some(d.clone());
    }
    if let Some(v) = u.tls_verify_peer {
        tls.verify_peer = v;
    }
    if let Some(h) = &u.tls_hostname {
        tls.hostname = Some(h.clone());
    }
    if let Some(n) = &u.username {
        tls.username = Some(n.clone());
    }
    if let Some(p) = &u.tls_psk_file {
        tls.psk_file = Some(p.clone());
    }
    if let (None, UriTransport::Tcp { host, .. }) = (&tls.hostname, &u.transport) {
        tls.hostname = Some(host.clone());
    }
    if cfg.tls != TlsMode::Disable {
        crate::tls::check_settings(tls)?;
    }
    Ok(())
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

/// Connects to an NBD URI the user gave ([`UriPolicy::trusted`]); its
/// export name replaces `cfg.export_name`, an `nbds` scheme sets
/// `cfg.tls` to [`TlsMode::Require`], and its `tls-*` parameters are in
/// [`Connected::tls`]. vsock gives [`ConnectError::Unsupported`].
pub fn connect_uri(uri: &str, cfg: &mut Config) -> Result<Connected, ConnectError> {
    connect_uri_with(uri, cfg, TlsSettings::default(), &UriPolicy::trusted())
}

/// Connects to an NBD URI as [`connect_uri`] does, starting from the TLS
/// settings `tls` (the URI's parameters override the ones they name) and
/// refusing what `policy` does not allow before connecting. Call it for
/// URIs from untrusted sources, with [`UriPolicy::untrusted`].
pub fn connect_uri_with(
    uri: &str,
    cfg: &mut Config,
    mut tls: TlsSettings,
    policy: &UriPolicy,
) -> Result<Connected, ConnectError> {
    let u = NbdUri::parse(uri)?;
    policy.check(&u)?;
    apply_tls(&u, cfg, &mut tls)?;
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
    let mut c = Connected::new(socket, uri);
    c.tls = tls;
    Ok(c)
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
    fn tls_uri_parameters_fill_the_settings() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut cfg = Config::default();
        let c = connect(
            &format!("nbds://127.0.0.1:{port}/e?tls-certificates=/pki&tls-verify-peer=0"),
            &mut cfg,
        )
        .unwrap();
        assert_eq!(cfg.tls, TlsMode::Require);
        assert_eq!(c.tls.certificates.as_deref(), Some(Path::new("/pki")));
        assert!(!c.tls.verify_peer);
        assert_eq!(c.tls.hostname.as_deref(), Some("127.0.0.1"));
        let c = connect(
            &format!("nbds://127.0.0.1:{port}/e?tls-hostname=srv.example"),
            &mut cfg,
        )
        .unwrap();
        assert_eq!(c.tls.hostname.as_deref(), Some("srv.example"));
        // A Unix socket has no host: the default name is used later.
        let mut cfg = Config::default();
        let e = connect("nbds+unix:///?socket=/nonexistent/s", &mut cfg).unwrap_err();
        assert!(matches!(e, ConnectError::Io { .. }), "{e}");
        assert_eq!(cfg.tls, TlsMode::Require);
    }

    #[cfg(not(feature = "tls-psk"))]
    #[test]
    fn psk_without_the_feature_is_refused_before_connecting() {
        let mut cfg = Config::default();
        let e = connect(
            "nbds+unix://alice@/?socket=/nonexistent/s&tls-psk-file=/nonexistent/k",
            &mut cfg,
        )
        .unwrap_err();
        assert!(
            matches!(e, ConnectError::Tls(crate::TlsError::PskUnsupported(_))),
            "{e}"
        );
    }

    #[test]
    fn untrusted_policy_refuses_local_files_and_more() {
        let mut cfg = Config::default();
        let un = UriPolicy::untrusted();
        let d = TlsSettings::default();
        let e = connect_uri_with(
            "nbds+unix:///?socket=/s&tls-certificates=/etc",
            &mut cfg,
            d.clone(),
            &un,
        )
        .unwrap_err();
        assert!(matches!(e, ConnectError::NotAllowed(_)), "{e}");
        let e = connect_uri_with(
            "nbds+unix:///?socket=/s&tls-psk-file=/k",
            &mut cfg,
            d.clone(),
            &un,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tls-psk-file"), "{e}");
        let no_unix = UriPolicy {
            allow_unix: false,
            ..un
        };
        let e =
            connect_uri_with("nbd+unix:///?socket=/s", &mut cfg, d.clone(), &no_unix).unwrap_err();
        assert!(e.to_string().contains("Unix"), "{e}");
        let tls_only = UriPolicy {
            allow_tls: AllowTls::Require,
            ..un
        };
        let e = connect_uri_with("nbd://h/", &mut cfg, d.clone(), &tls_only).unwrap_err();
        assert!(e.to_string().contains("TLS is required"), "{e}");
        let no_tls = UriPolicy {
            allow_tls: AllowTls::Disable,
            ..un
        };
        let e = connect_uri_with("nbds://h/", &mut cfg, d.clone(), &no_tls).unwrap_err();
        assert!(matches!(e, ConnectError::NotAllowed(_)), "{e}");
        let no_vsock = UriPolicy {
            allow_vsock: false,
            ..un
        };
        let e = connect_uri_with("nbd+vsock://3:10809/", &mut cfg, d, &no_vsock).unwrap_err();
        assert!(e.to_string().contains("vsock"), "{e}");
    }
}
