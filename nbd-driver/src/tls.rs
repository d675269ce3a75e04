//! TLS for every adapter: [`Stream`] is a [`Socket`] that switches to a
//! rustls session when the server acknowledges `NBD_OPT_STARTTLS`
//! (doc/proto.md, section "TLS support": the TLS handshake starts on the
//! same byte stream right after the acknowledgement, and everything after
//! it, including the rest of negotiation, is inside TLS).
//!
//! rustls is used Sans-IO (`ClientConnection` with `read_tls` /
//! `write_tls`), so the session runs over the same non-blocking socket,
//! whose file descriptor stays the one adapters wait on or registered with
//! mio. What rustls holds between socket calls is surfaced through
//! [`Transport::buffered_input`] and [`Transport::pending_output`], so an
//! edge-triggered adapter never waits while bytes sit inside the session.
//!
//! Credentials follow libnbd's model ([`TlsSettings`]): a directory with
//! `ca-cert.pem`, and optionally `client-cert.pem` + `client-key.pem` and
//! `ca-crl.pem`. The server's certificate is always verified against the
//! given CA (or the system's, when no directory is found) unless
//! verification is turned off; a certificate from any other CA is refused
//! on every transport, Unix sockets included.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::driver::Interest;
use crate::transport::{Socket, Transport};

/// The name checked against the server certificate when the transport
/// has no host name (Unix sockets, subprocesses, adopted sockets) and
/// [`TlsSettings::hostname`] is not set. Certificates made for local NBD
/// servers carry it as a DNS subject alternative name (shared/servers.md
/// §6 makes them that way); set `tls-hostname` when yours does not.
pub const UNIX_TLS_HOSTNAME: &str = "localhost";

/// The TLS credentials and checks of a connection, with libnbd's names
/// (`nbd_set_tls_certificates`, `_verify_peer`, `_hostname`, `_username`,
/// `_psk_file`; and the `nbds` URI parameters of the same names). Fill it
/// before connecting; the TLS mode itself is [`nbd_core::Config::tls`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsSettings {
    /// Directory with `ca-cert.pem` and optionally `client-cert.pem`,
    /// `client-key.pem` and `ca-crl.pem`. `None`: libnbd's default search
    /// ([`default_certificates_dir`]), then the system CA bundle.
    pub certificates: Option<PathBuf>,
    /// Verify the server's certificate and host name (default `true`).
    /// Turn it off only for tests: the session is then open to a
    /// man in the middle.
    pub verify_peer: bool,
    /// The name to check the server certificate against, instead of the
    /// host connected to (a proxy, a Unix socket; default: the TCP host,
    /// or [`UNIX_TLS_HOSTNAME`] without one).
    pub hostname: Option<String>,
    /// The PSK identity (libnbd's default is the login name).
    pub username: Option<String>,
    /// A psktool key file (`user:hexkey` lines): selects TLS-PSK instead of
    /// X.509. PSK needs a TLS backend other than rustls; see
    /// [`TlsError::PskUnsupported`].
    pub psk_file: Option<PathBuf>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            certificates: None,
            verify_peer: true,
            hostname: None,
            username: None,
            psk_file: None,
        }
    }
}

/// Why TLS failed, for callers to match on. Adapters return it from the
/// connect call (nbd-std `Error::Tls`, nbd-mio `Error::Tls`); the
/// connection itself ends with [`nbd_core::CloseReason::Transport`]
/// carrying the same message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// No usable CA: the directory has no `ca-cert.pem`, and no system
    /// bundle was found either.
    #[error("no CA certificate: {0}")]
    NoCaCertificate(String),
    /// A credential file could not be read or parsed.
    #[error("{path}: {reason}")]
    BadCredentials {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The name to check the server certificate against is not a valid
    /// DNS name or IP address.
    #[error("invalid TLS host name {0:?}")]
    BadHostname(String),
    /// TLS-PSK was asked for (`tls-psk-file`), which this build cannot do.
    #[error("TLS-PSK is not supported by this build ({0})")]
    PskUnsupported(String),
    /// The server refused the TLS-PSK session: it does not know the user
    /// ([`TlsSettings::username`]) or the key differs.
    #[error("the server refused the pre-shared key: {0}")]
    PskRejected(String),
    /// The server's certificate was refused: signed by a CA the client was
    /// not given, issued for another name, expired, revoked...
    #[error("server certificate rejected: {0}")]
    CertificateRejected(String),
    /// The server asked for a client certificate and none was configured
    /// (`client-cert.pem` and `client-key.pem` in the certificates
    /// directory), or refused the one given.
    #[error("the server requires a client certificate: {0}")]
    ClientCertificateRequired(String),
    /// The server sent a TLS alert that ended the handshake.
    #[error("the server refused the TLS session: {0}")]
    PeerRefused(String),
    /// The server closed the connection during the TLS handshake.
    #[error("the server closed the connection during the TLS handshake")]
    ClosedDuringHandshake,
    /// Another TLS protocol failure.
    #[error("TLS failure: {0}")]
    Protocol(String),
}

impl TlsError {
    /// The `TlsError` inside an I/O error that a TLS [`Stream`] returned, if
    /// it is one.
    pub fn from_io(e: &io::Error) -> Option<&TlsError> {
        e.get_ref().and_then(|x| x.downcast_ref::<TlsError>())
    }

    fn into_io(self) -> io::Error {
        let kind = match self {
            TlsError::ClosedDuringHandshake => io::ErrorKind::UnexpectedEof,
            TlsError::CertificateRejected(_)
            | TlsError::ClientCertificateRequired(_)
            | TlsError::PeerRefused(_) => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    fn from_rustls(e: rustls::Error, asked_for_cert: bool, had_cert: bool) -> TlsError {
        use rustls::AlertDescription as A;
        match e {
            rustls::Error::InvalidCertificate(c) => {
                TlsError::CertificateRejected(describe_cert(&c))
            }
            rustls::Error::AlertReceived(
                a @ (A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::AccessDenied
                | A::HandshakeFailure),
            ) if asked_for_cert => TlsError::ClientCertificateRequired(if had_cert {
                format!("it refused the client certificate (alert {a:?})")
            } else {
                format!("none is configured (alert {a:?})")
            }),
            rustls::Error::AlertReceived(a) => TlsError::PeerRefused(format!("alert {a:?}")),
            other => TlsError::Protocol(other.to_string()),
        }
    }
}

fn describe_cert(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match c {
        C::UnknownIssuer => "it is not signed by a trusted CA (unknown issuer)".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("it is not valid for the expected host name ({c:?})")
        }
        C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
        C::Revoked => "it has been revoked (ca-crl.pem)".into(),
        other => format!("{other:?}"),
    }
}

/// libnbd's default certificates directory when none is given: for root
/// `/etc/pki/libnbd`, for other users `$HOME/.pki/libnbd`, then
/// `$HOME/.config/pki/libnbd`; the first that exists. `None` when none
/// exists (the system CA bundle is used then).
pub fn default_certificates_dir() -> Option<PathBuf> {
    let root = rustix::process::geteuid().is_root();
    let mut candidates = Vec::new();
    if root {
        candidates.push(PathBuf::from("/etc/pki/libnbd"));
    } else if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        candidates.push(home.join(".pki/libnbd"));
        candidates.push(home.join(".config/pki/libnbd"));
    }
    candidates.into_iter().find(|p| p.is_dir())
}

/// The system CA bundles tried (in order) when no certificates directory
/// is found; `SSL_CERT_FILE` comes first when set.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn bad(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::BadCredentials {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Records whether the server asked for a client certificate, so a later
/// failure can name that cause.
#[derive(Debug)]
struct ClientCert {
    key: Option<Arc<CertifiedKey>>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// Accepts any server certificate but still checks the handshake
/// signatures: `verify_peer = false` only.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A rustls client configuration built from [`TlsSettings`], with the
/// flag that tells whether the server asked for a client certificate.
struct Prepared {
    config: Arc<ClientConfig>,
    asked_for_cert: Arc<AtomicBool>,
    has_cert: bool,
}

/// Checks, before connecting, that `s` can work in this build (TLS-PSK
/// needs a backend rustls does not offer). [`crate::connect_uri`] calls
/// it when TLS may be used.
pub fn check_settings(s: &TlsSettings) -> Result<(), TlsError> {
    #[cfg(feature = "tls-psk")]
    let _ = s;
    #[cfg(not(feature = "tls-psk"))]
    if let Some(p) = &s.psk_file {
        return Err(TlsError::PskUnsupported(format!(
            "tls-psk-file {}: rustls has no TLS-PSK cipher suites; build with the \
             `tls-psk` feature (OpenSSL)",
            p.display()
        )));
    }
    Ok(())
}

fn prepare(s: &TlsSettings) -> Result<Prepared, TlsError> {
    check_settings(s)?;
    let provider = provider();
    let dir = s.certificates.clone().or_else(default_certificates_dir);
    let mut roots = RootCertStore::empty();
    let mut crls = Vec::new();
    let mut key = None;
    match &dir {
        Some(d) => {
            let ca = d.join("ca-cert.pem");
            if !ca.exists() {
                return Err(TlsError::NoCaCertificate(format!(
                    "{} does not exist",
                    ca.display()
                )));
            }
            for c in load_certs(&ca)? {
                roots.add(c).map_err(|e| bad(&ca, e))?;
            }
            let crl = d.join("ca-crl.pem");
            if crl.exists() {
                crls = CertificateRevocationListDer::pem_file_iter(&crl)
                    .map_err(|e| bad(&crl, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&crl, e))?;
            }
            let (cert, kf) = (d.join("client-cert.pem"), d.join("client-key.pem"));
            if cert.exists() && kf.exists() {
                let chain = load_certs(&cert)?;
                let k = PrivateKeyDer::from_pem_file(&kf).map_err(|e| bad(&kf, e))?;
                let signing = provider
                    .key_provider
                    .load_private_key(k)
                    .map_err(|e| bad(&kf, e))?;
                key = Some(Arc::new(CertifiedKey::new(chain, signing)));
            }
        }
        None => {
            let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            let bundle = env
                .into_iter()
                .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
                .find(|p| p.is_file());
            let Some(b) = bundle else {
                return Err(TlsError::NoCaCertificate(
                    "no certificates directory was given, none of libnbd's default \
                     directories exists, and no system CA bundle was found"
                        .into(),
                ));
            };
            for c in load_certs(&b)? {
                // A system bundle may hold certificates webpki cannot use.
                let _ = roots.add(c);
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Protocol(e.to_string()))?;
    let builder = if s.verify_peer {
        let mut v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if !crls.is_empty() {
            v = v.with_crls(crls);
        }
        let v = v
            .build()
            .map_err(|e| TlsError::NoCaCertificate(e.to_string()))?;
        builder.with_webpki_verifier(v)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(
                provider.signature_verification_algorithms,
            )))
    };
    let asked = Arc::new(AtomicBool::new(false));
    let has_cert = key.is_some();
    let config = builder.with_client_cert_resolver(Arc::new(ClientCert {
        key,
        asked: asked.clone(),
    }));
    Ok(Prepared {
        config: Arc::new(config),
        asked_for_cert: asked,
        has_cert,
    })
}

/// `Read` and `Write` over a [`Socket`], for rustls's `read_tls` and
/// `write_tls`.
struct Io<'a>(&'a mut Socket);

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Transport::read(self.0, buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Transport::write_vectored(self.0, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The rustls session (X.509).
struct Session {
    conn: ClientConnection,
    asked_for_cert: Arc<AtomicBool>,
    has_cert: bool,
}

impl Session {
    fn error(&self, e: rustls::Error) -> io::Error {
        TlsError::from_rustls(
            e,
            self.asked_for_cert.load(Ordering::Relaxed),
            self.has_cert,
        )
        .into_io()
    }
}

/// One TLS backend's session, driven Sans-IO: encrypted bytes go in with
/// `read_tls` and out with `write_tls`; plaintext with `read_plain` and
/// `write_plain`.
// The whole session is boxed once in `Stream`; boxing the variant too
// would only add an indirection.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Rustls(Session),
    #[cfg(feature = "tls-psk")]
    Psk(crate::tls_psk::PskSession),
}

impl Engine {
    fn wants_write(&self) -> bool {
        match self {
            Engine::Rustls(s) => s.conn.wants_write(),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.wants_write(),
        }
    }

    fn write_tls(&mut self, sock: &mut Socket) -> io::Result<usize> {
        match self {
            Engine::Rustls(s) => s.conn.write_tls(&mut Io(sock)),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.write_tls(&mut Io(sock)),
        }
    }

    fn read_tls(&mut self, sock: &mut Socket) -> io::Result<usize> {
        match self {
            Engine::Rustls(s) => s.conn.read_tls(&mut Io(sock)),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.read_tls(&mut Io(sock)),
        }
    }

    /// Processes what `read_tls` brought in (advancing the handshake);
    /// returns whether plaintext is waiting.
    fn process(&mut self) -> io::Result<bool> {
        match self {
            Engine::Rustls(s) => match s.conn.process_new_packets() {
                Ok(st) => Ok(st.plaintext_bytes_to_read() > 0),
                Err(e) => Err(s.error(e)),
            },
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.process(),
        }
    }

    fn is_handshaking(&self) -> bool {
        match self {
            Engine::Rustls(s) => s.conn.is_handshaking(),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.is_handshaking(),
        }
    }

    /// Plaintext: `WouldBlock` when more TLS input is needed, `Ok(0)` after
    /// close_notify, `UnexpectedEof` at end of file without it.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Engine::Rustls(s) => s.conn.reader().read(buf),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.read_plain(buf),
        }
    }

    fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Engine::Rustls(s) => s.conn.writer().write_vectored(bufs),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.write_plain(bufs),
        }
    }

    /// Whether a `read_plain` could return data without new TLS input.
    fn has_plaintext(&mut self) -> bool {
        match self {
            Engine::Rustls(s) => s
                .conn
                .process_new_packets()
                .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.has_input(),
        }
    }

    fn close_notify(&mut self) {
        match self {
            Engine::Rustls(s) => s.conn.send_close_notify(),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.close_notify(),
        }
    }

    /// Why the session failed when the server closed it mid-handshake: a
    /// PSK server does that when it does not know the user or the key
    /// differs (GnuTLS sends no alert then).
    fn closed_in_handshake(&self) -> TlsError {
        match self {
            Engine::Rustls(_) => TlsError::ClosedDuringHandshake,
            #[cfg(feature = "tls-psk")]
            Engine::Psk(s) => s.closed_in_handshake(),
        }
    }

    /// Whether the server asked for a client certificate, and whether one
    /// was configured.
    fn client_cert(&self) -> (bool, bool) {
        match self {
            Engine::Rustls(s) => (s.asked_for_cert.load(Ordering::Relaxed), s.has_cert),
            #[cfg(feature = "tls-psk")]
            Engine::Psk(_) => (false, false),
        }
    }
}

/// A TLS session over the stream's socket.
struct Tls {
    engine: Engine,
    /// Plaintext (or, for OpenSSL, undecrypted input) is waiting inside.
    plaintext: bool,
    /// Some plaintext arrived since the handshake.
    got_data: bool,
    /// close_notify has been queued.
    closing: bool,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("handshaking", &self.engine.is_handshaking())
            .field("plaintext", &self.plaintext)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Why the server ended the session before its first reply, when it had
    /// asked for a client certificate: with TLS 1.3 the server judges the
    /// client's certificate after the client's handshake has completed, so
    /// its refusal arrives as a close (or reset) of the session.
    fn early_close(&self) -> Option<TlsError> {
        let (asked, has_cert) = self.engine.client_cert();
        if self.got_data || !asked {
            return None;
        }
        Some(TlsError::ClientCertificateRequired(if has_cert {
            "the server asked for a client certificate and closed the session before any \
             reply: it refused the one given (client-cert.pem)"
                .into()
        } else {
            "the server asked for a client certificate and closed the session before any \
             reply; none is configured (client-cert.pem and client-key.pem in the \
             certificates directory)"
                .into()
        }))
    }
}

/// The transport of every adapter: a [`Socket`], in plain text until
/// [`Stream::start_tls`] switches it to a TLS session over the same socket
/// (and the same file descriptor). Create it with [`Stream::new`].
#[derive(Debug)]
pub struct Stream {
    socket: Socket,
    tls: Option<Box<Tls>>,
}

impl Stream {
    /// A plain stream over `socket`.
    pub fn new(socket: Socket) -> Stream {
        Stream { socket, tls: None }
    }

    /// The socket underneath.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// Whether TLS has been started on this stream.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Starts a TLS client session on the stream: TLS-PSK when
    /// [`TlsSettings::psk_file`] is set (feature `tls-psk`), else X.509,
    /// checking the server's certificate against
    /// [`TlsSettings::hostname`] ([`UNIX_TLS_HOSTNAME`] when unset;
    /// [`crate::connect()`] fills in the TCP host). Call it when the core
    /// emits `Event::StartTls` (the driver's [`crate::Driver::start_tls`]
    /// does, then runs the handshake); it only queues the first handshake
    /// message. Fails if the credentials cannot be loaded.
    pub fn start_tls(&mut self, settings: &TlsSettings) -> Result<(), TlsError> {
        if self.tls.is_some() {
            return Err(TlsError::Protocol("TLS is already running".into()));
        }
        let engine = if settings.psk_file.is_some() {
            psk_engine(settings)?
        } else {
            let server_name = settings.hostname.as_deref().unwrap_or(UNIX_TLS_HOSTNAME);
            let p = prepare(settings)?;
            let name = ServerName::try_from(server_name.to_owned())
                .map_err(|_| TlsError::BadHostname(server_name.to_owned()))?;
            let conn = ClientConnection::new(p.config, name)
                .map_err(|e| TlsError::Protocol(e.to_string()))?;
            Engine::Rustls(Session {
                conn,
                asked_for_cert: p.asked_for_cert,
                has_cert: p.has_cert,
            })
        };
        self.tls = Some(Box::new(Tls {
            engine,
            plaintext: false,
            got_data: false,
            closing: false,
        }));
        Ok(())
    }

    /// A socket error, or the TLS cause behind it when the server dropped
    /// the session right after the handshake (see `Tls::early_close`).
    fn explain(&self, e: io::Error) -> io::Error {
        let reset = matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        );
        match &self.tls {
            Some(s) if reset => s.early_close().map_or(e, TlsError::into_io),
            _ => e,
        }
    }

    /// Writes queued TLS records to the socket; `WouldBlock` if it filled.
    fn flush_tls(&mut self) -> io::Result<()> {
        let Some(s) = &mut self.tls else {
            return Ok(());
        };
        while s.engine.wants_write() {
            match s.engine.write_tls(&mut self.socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads TLS records from the socket and processes them; `Ok(false)` at
    /// end of file.
    fn fill(&mut self) -> io::Result<bool> {
        let Some(s) = &mut self.tls else {
            return Ok(false);
        };
        let n = loop {
            match s.engine.read_tls(&mut self.socket) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        match s.engine.process() {
            Ok(p) => s.plaintext = p,
            Err(err) => {
                // Let the server see our alert, if the socket takes it.
                let _ = self.flush_tls();
                return Err(err);
            }
        }
        Ok(n > 0)
    }
}

#[cfg(feature = "tls-psk")]
fn psk_engine(settings: &TlsSettings) -> Result<Engine, TlsError> {
    Ok(Engine::Psk(crate::tls_psk::PskSession::new(settings)?))
}

#[cfg(not(feature = "tls-psk"))]
fn psk_engine(settings: &TlsSettings) -> Result<Engine, TlsError> {
    check_settings(settings)?;
    Err(TlsError::PskUnsupported("no PSK file".into()))
}

impl Transport for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut s) = self.tls.as_mut() else {
            return self.socket.read(buf);
        };
        loop {
            match s.engine.read_plain(buf) {
                Ok(0) => {
                    return match s.early_close() {
                        Some(t) => Err(t.into_io()),
                        None => Ok(0),
                    };
                }
                Ok(n) => {
                    s.got_data = true;
                    s.plaintext = s.engine.has_plaintext();
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The server closed the socket without close_notify. NBD
                // frames every message, so the core detects a truncated
                // one; a close after NBD_CMD_DISC is clean (qemu-nbd does
                // this). Report it as plain end of file.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return match s.early_close() {
                        Some(t) => Err(t.into_io()),
                        None => Ok(0),
                    };
                }
                Err(e) => return Err(e),
            }
            s.plaintext = false;
            // Answers the session owes (alerts, key updates) go out first.
            match self.flush_tls() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if let Err(e) = self.fill() {
                return Err(self.explain(e));
            }
            let Some(again) = self.tls.as_mut() else {
                return Ok(0);
            };
            s = again;
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.socket.read_vectored(bufs);
        }
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(b) => self.read(b),
            None => Ok(0),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.socket.write_vectored(bufs);
        }
        // Earlier records first: the session's buffer stays small and
        // a full socket shows as WouldBlock.
        if let Err(e) = self.flush_tls() {
            return Err(self.explain(e));
        }
        let Some(s) = self.tls.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let n = s.engine.write_plain(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.flush_tls() {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(self.explain(e)),
        }
    }

    fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        if let Some(s) = &mut self.tls {
            if !s.closing {
                s.closing = true;
                s.engine.close_notify();
            }
            let _ = self.flush_tls();
        }
        self.socket.shutdown(how)
    }

    fn handshake(&mut self) -> io::Result<Option<Interest>> {
        loop {
            match self.flush_tls() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Some(Interest {
                        read: false,
                        write: true,
                    }))
                }
                Err(e) => return Err(e),
            }
            let Some(s) = &self.tls else {
                return Ok(None);
            };
            if !s.engine.is_handshaking() {
                return Ok(None);
            }
            let closed = |st: &Stream| -> io::Error {
                match &st.tls {
                    Some(s) => s.engine.closed_in_handshake().into_io(),
                    None => TlsError::ClosedDuringHandshake.into_io(),
                }
            };
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return Err(closed(self)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Some(Interest {
                        read: true,
                        write: false,
                    }))
                }
                Err(e) => {
                    // A reset while the handshake runs is a close, too.
                    let reset = TlsError::from_io(&e).is_none()
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        );
                    if reset || TlsError::from_io(&e) == Some(&TlsError::ClosedDuringHandshake) {
                        return Err(closed(self));
                    }
                    return Err(e);
                }
            }
        }
    }

    fn pending_output(&self) -> bool {
        self.tls.as_ref().is_some_and(|s| s.engine.wants_write())
    }

    fn buffered_input(&self) -> bool {
        self.tls.as_ref().is_some_and(|s| s.plaintext)
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl From<Socket> for Stream {
    fn from(s: Socket) -> Stream {
        Stream::new(s)
    }
}
