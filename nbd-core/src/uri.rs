//! NBD URIs: parse and render strings such as `nbd://host:10809/export`
//! or `nbds+unix:///disk?socket=/run/nbd.sock`.
//!
//! Use this module when a program takes "where is the NBD server" from a user
//! as one string. [`NbdUri::parse`] (or [`str::parse`]) turns it into a
//! [`NbdUri`]; its [`Display`](std::fmt::Display) renders a canonical URI back.
//!
//! The grammar is RFC 3986 with the rules of the NBD URI standard
//! (`doc/uri.md` of the NBD project) plus libnbd's common extensions:
//!
//! | Scheme       | Transport          | TLS      | Standard? |
//! |--------------|--------------------|----------|-----------|
//! | `nbd`        | TCP                | no       | yes       |
//! | `nbds`       | TCP                | required | yes       |
//! | `nbd+unix`   | Unix socket        | no       | yes       |
//! | `nbds+unix`  | Unix socket        | required | yes       |
//! | `nbd+vsock`  | `AF_VSOCK`         | no       | libnbd    |
//! | `nbds+vsock` | `AF_VSOCK`         | required | libnbd    |
//!
//! Choices made where the standard leaves room (all are errors rather than
//! silent guesses, so a typo never connects somewhere unexpected):
//!
//! - Only the `scheme://` form is accepted (`nbd:foo` is rejected, as libnbd does).
//! - Schemes are case-insensitive; query keys are case-sensitive.
//! - A TCP URI must name a host (`nbd:///` is rejected: write `nbd://localhost/`).
//! - A `+unix` URI must not name a host or port (a username is allowed: it is the
//!   TLS username). `socket=` on any other scheme is rejected (as libnbd does).
//! - A fragment (`#...`) is rejected.
//! - Port `0` is rejected for TCP; an empty port (`host:`) means the default.
//! - IPv6 zone identifiers are accepted in the RFC 6874 form `[fe80::1%25eth0]`
//!   and stored as `fe80::1%eth0`. `IPvFuture` literals (`[v1.x]`) are rejected.
//! - Query parameters are separated by `&` only; `+` is a literal plus, not a space.
//!   A repeated known parameter: the last one wins. Known parameters must not be empty.
//! - Decoded text must be UTF-8, except the path parameters (`socket`,
//!   `tls-certificates`, `tls-psk-file`), which on Unix may hold any bytes.
//! - NUL is only allowed in `socket=` when it starts with NUL (Linux abstract
//!   namespace, written `%00`), and in unknown parameters (which are only reported).

use std::borrow::Cow;
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Longest string, in bytes, that [`NbdUri::parse`] accepts (64 KiB).
///
/// Use it to reject over-long input early, before calling the parser.
pub const MAX_URI_LEN: usize = 64 * 1024;

/// Longest export name in bytes after decoding (the protocol's string limit).
const MAX_EXPORT_NAME_LEN: usize = 4096;
/// The IANA NBD port, the default for TCP.
const DEFAULT_TCP_PORT: u16 = 10809;
/// libnbd's default vsock port.
const DEFAULT_VSOCK_PORT: u32 = 10809;
/// `VMADDR_CID_HOST`: the CID used when a vsock URI has no host.
const VSOCK_HOST_CID: u32 = 2;
/// Longest piece of user input quoted back in an error message.
const MAX_QUOTED: usize = 64;

/// Where the server is.
///
/// Use it to decide which kind of socket to open for an [`NbdUri`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP: host (name, IPv4, or IPv6 literal WITHOUT brackets) and port (default 10809).
    Tcp {
        /// Host name or address, percent-decoded. An IPv6 literal has no brackets;
        /// a zone is kept after `%` (`fe80::1%eth0`), ready for the resolver.
        host: String,
        /// TCP port; 10809 when the URI has none.
        port: u16,
    },
    /// Unix domain socket path (from the `socket=` query parameter; may start
    /// with NUL for the abstract namespace, from `%00`).
    Unix {
        /// Socket path, percent-decoded. A leading NUL byte means the Linux
        /// abstract namespace.
        path: PathBuf,
    },
    /// `AF_VSOCK` (libnbd extension, `nbd+vsock` / `nbds+vsock`): cid (empty host = 2)
    /// and port (default 10809).
    Vsock {
        /// Context ID of the peer; 2 (the hypervisor host) when the URI has no host.
        cid: u32,
        /// vsock port; 10809 when the URI has none.
        port: u32,
    },
}

/// A parsed NBD URI: transport, TLS requirement, export name and options.
///
/// Use [`NbdUri::parse`] (or `s.parse::<NbdUri>()`) to read one from a user,
/// and its `Display` to show or store one. Build one by hand with
/// [`NbdUri::new`] and then set the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server is.
    pub transport: Transport,
    /// true for `nbds`, `nbds+unix`, `nbds+vsock`: the connection MUST use TLS
    /// and MUST fail if TLS cannot be negotiated.
    pub tls: bool,
    /// Path without its leading '/', percent-decoded (empty = default export).
    pub export_name: String,
    /// Userinfo (TLS username, e.g. a PSK identity), percent-decoded. The whole
    /// userinfo is kept, including any `:`.
    pub username: Option<String>,
    /// `tls-type=`: the TLS authentication wanted (`anon`, `x509` or `psk` in
    /// the standard). Stored as written; the TLS layer decides what it supports.
    pub tls_type: Option<String>,
    /// `tls-hostname=`: the name to check the server certificate against.
    pub tls_hostname: Option<String>,
    /// `tls-verify-peer=`: `0`/`1` (also `true`/`false`/`yes`/`no`/`on`/`off`,
    /// any case). `None` means the client default (verify when a CA is available).
    pub tls_verify_peer: Option<bool>,
    /// `tls-certificates=` (libnbd extension): directory of X.509 certificates and keys.
    /// Callers should refuse it unless local file access was allowed.
    pub tls_certificates: Option<PathBuf>,
    /// `tls-psk-file=` (libnbd extension): PSK key file.
    /// Callers should refuse it unless local file access was allowed.
    pub tls_psk_file: Option<PathBuf>,
    /// Query parameters not understood, as (key, value) in URI order, so callers
    /// can report them (rule 119). A key without `=` has an empty value.
    pub unknown_params: Vec<(String, String)>,
}

/// Why a string is not an acceptable NBD URI.
///
/// Use the `Display` text to tell the user what to fix; match variants to
/// react to a particular problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    /// The string is longer than [`MAX_URI_LEN`].
    #[error("URI is too long: {len} bytes (at most {max} allowed)")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
        /// The limit, [`MAX_URI_LEN`].
        max: usize,
    },
    /// The string does not start with a syntactically valid `scheme:`.
    #[error(
        "not a URI: expected `scheme://[user@]host[:port]/export[?query]`, e.g. `nbd://localhost/`"
    )]
    NotAUri,
    /// The scheme is valid URI syntax but not an NBD scheme.
    #[error("unknown URI scheme `{0}`: expected nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock")]
    UnknownScheme(String),
    /// The scheme is not followed by `//` (e.g. `nbd:foo`).
    #[error("`{scheme}:` must be followed by `//` (write `{scheme}://...`)")]
    MissingSlashes {
        /// The scheme, in lower case.
        scheme: &'static str,
    },
    /// The URI has a `#fragment`, which has no meaning for NBD.
    #[error("URI must not have a fragment (`#...`); write `#` in an export name as `%23`")]
    FragmentNotAllowed,
    /// A character that RFC 3986 does not allow there (unencoded).
    #[error("character {ch:?} is not allowed unencoded in the URI {component}; percent-encode it")]
    InvalidCharacter {
        /// Which part of the URI.
        component: &'static str,
        /// The offending character.
        ch: char,
    },
    /// A `%` not followed by two hex digits.
    #[error("bad percent-encoding in the URI {component}: `%` must be followed by two hex digits")]
    InvalidPercentEncoding {
        /// Which part of the URI.
        component: &'static str,
    },
    /// Percent-decoding produced bytes that are not UTF-8 where text is needed.
    #[error("the URI {component} is not valid UTF-8 after percent-decoding")]
    InvalidUtf8 {
        /// Which part of the URI.
        component: &'static str,
    },
    /// A NUL byte (`%00`) where it is not allowed.
    #[error("the URI {component} must not contain NUL (%00)")]
    UnexpectedNul {
        /// Which part of the URI.
        component: &'static str,
    },
    /// A TCP URI without a host (e.g. `nbd:///`).
    #[error("a TCP NBD URI needs a host, e.g. `nbd://localhost/`")]
    MissingHost,
    /// The port is not a decimal number in range (1..=65535 for TCP, a u32 for vsock).
    #[error(
        "invalid port `{0}`: expected a decimal number (1-65535 for TCP, 0-4294967295 for vsock)"
    )]
    InvalidPort(String),
    /// `[` opening an IPv6 literal has no matching `]`.
    #[error("unclosed `[` in IPv6 address `{0}`")]
    UnclosedIpv6Bracket(String),
    /// The text in brackets is not an IPv6 address (with an optional `%25zone`),
    /// or something other than `:port` follows the `]`.
    #[error(
        "invalid IPv6 literal `{0}`: expected e.g. `[::1]`, `[::1]:10809` or `[fe80::1%25eth0]`"
    )]
    InvalidIpv6Literal(String),
    /// A host with several `:`, most likely an IPv6 address without brackets.
    #[error("invalid host `{0}`: IPv6 addresses must be in brackets, e.g. `nbd://[::1]:10809/`")]
    UnbracketedIpv6(String),
    /// A vsock host that is not a decimal u32 CID.
    #[error("invalid vsock CID `{0}`: expected a decimal number (or nothing for 2, the host)")]
    InvalidVsockCid(String),
    /// `nbd+unix` / `nbds+unix` without `socket=`.
    #[error("`{scheme}` URIs require a `socket=` query parameter, e.g. `{scheme}:///?socket=/run/nbd.sock`")]
    MissingSocket {
        /// The scheme, in lower case.
        scheme: &'static str,
    },
    /// `socket=` on a scheme that is not `+unix`.
    #[error("`socket=` is only allowed with nbd+unix or nbds+unix, not `{scheme}`")]
    SocketNotAllowed {
        /// The scheme, in lower case.
        scheme: &'static str,
    },
    /// A `+unix` URI that names a host or port (only a username may be given).
    #[error("`{scheme}` URIs must not have a host or port (the socket is given by `socket=`); write `{scheme}:///...`")]
    AuthorityWithUnix {
        /// The scheme, in lower case.
        scheme: &'static str,
    },
    /// The export name contains NUL, which NBD strings never may.
    #[error("the export name must not contain NUL (%00)")]
    ExportNameContainsNul,
    /// The decoded export name is longer than the protocol's 4096-byte limit.
    #[error("the export name is too long: {len} bytes (at most 4096 allowed)")]
    ExportNameTooLong {
        /// Length of the decoded export name in bytes.
        len: usize,
    },
    /// `tls-verify-peer=` with a value that is not a boolean.
    #[error(
        "invalid tls-verify-peer value `{0}`: expected 0 or 1 (or true/false, yes/no, on/off)"
    )]
    InvalidTlsVerifyPeer(String),
    /// A known query parameter with an empty value (e.g. `socket=`).
    #[error("query parameter `{key}` must not be empty")]
    EmptyParameter {
        /// The parameter name.
        key: &'static str,
    },
}

/// Heuristic: does this string look like an NBD URI (starts with a known scheme
/// followed by `://`, case-insensitive)?
///
/// Use it in programs that take "a socket path or a URI" to choose how to read
/// the argument; then call [`NbdUri::parse`] for the real check.
#[must_use]
pub fn is_nbd_uri(s: &str) -> bool {
    let b = s.as_bytes();
    SCHEMES.iter().any(|sc| {
        let n = sc.name.len();
        b.len() >= n + 3
            && b[..n].eq_ignore_ascii_case(sc.name.as_bytes())
            && &b[n..n + 3] == b"://"
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Unix,
    Vsock,
}

struct Scheme {
    name: &'static str,
    kind: Kind,
    tls: bool,
}

const SCHEMES: [Scheme; 6] = [
    Scheme {
        name: "nbd",
        kind: Kind::Tcp,
        tls: false,
    },
    Scheme {
        name: "nbds",
        kind: Kind::Tcp,
        tls: true,
    },
    Scheme {
        name: "nbd+unix",
        kind: Kind::Unix,
        tls: false,
    },
    Scheme {
        name: "nbds+unix",
        kind: Kind::Unix,
        tls: true,
    },
    Scheme {
        name: "nbd+vsock",
        kind: Kind::Vsock,
        tls: false,
    },
    Scheme {
        name: "nbds+vsock",
        kind: Kind::Vsock,
        tls: true,
    },
];

fn scheme_name(kind: Kind, tls: bool) -> &'static str {
    SCHEMES
        .iter()
        .find(|s| s.kind == kind && s.tls == tls)
        .map_or("nbd", |s| s.name)
}

/// Host part of an authority, before transport-specific checks.
enum Host {
    /// reg-name or IPv4, percent-decoded (may be empty).
    Name(String),
    /// Bracketed IPv6 literal, brackets removed, zone after `%`.
    Ipv6(String),
}

impl NbdUri {
    /// Parses an NBD URI.
    ///
    /// Use it on any user-supplied server location; the error says what is
    /// wrong. See the module documentation for the accepted forms.
    ///
    /// ```
    /// use nbd_core::uri::{NbdUri, Transport};
    ///
    /// let u = NbdUri::parse("nbd://example.com/disk%201")?;
    /// assert_eq!(u.transport, Transport::Tcp { host: "example.com".into(), port: 10809 });
    /// assert_eq!(u.export_name, "disk 1"); // percent-decoded, no leading '/'
    /// assert!(!u.tls);
    ///
    /// let u = NbdUri::parse("nbds+unix://alice@/?socket=/run/nbd.sock&tls-type=psk")?;
    /// assert_eq!(u.transport, Transport::Unix { path: "/run/nbd.sock".into() });
    /// assert!(u.tls);
    /// assert_eq!(u.export_name, ""); // the default export
    /// assert_eq!(u.username.as_deref(), Some("alice"));
    /// assert_eq!(u.tls_type.as_deref(), Some("psk"));
    ///
    /// // Mistakes are errors, never guesses: a TCP URI needs a host.
    /// assert!(NbdUri::parse("nbd:///disk").is_err());
    /// # Ok::<(), nbd_core::uri::UriError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Returns a [`UriError`] naming the first problem found: not a URI, an
    /// unknown scheme, a bad host, port or percent-encoding, a missing or
    /// misplaced `socket=`, an invalid parameter value, and so on.
    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        if s.len() > MAX_URI_LEN {
            return Err(UriError::TooLong {
                len: s.len(),
                max: MAX_URI_LEN,
            });
        }
        let colon = s.find(':').ok_or(UriError::NotAUri)?;
        let scheme_text = &s[..colon];
        if !is_valid_scheme(scheme_text) {
            return Err(UriError::NotAUri);
        }
        let scheme = SCHEMES
            .iter()
            .find(|sc| sc.name.eq_ignore_ascii_case(scheme_text))
            .ok_or_else(|| UriError::UnknownScheme(quote(scheme_text)))?;
        let rest = s[colon + 1..]
            .strip_prefix("//")
            .ok_or(UriError::MissingSlashes {
                scheme: scheme.name,
            })?;
        if rest.contains('#') {
            return Err(UriError::FragmentNotAllowed);
        }
        let (hier, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match hier.find('/') {
            Some(i) => hier.split_at(i),
            None => (hier, ""),
        };

        // Authority: [userinfo@]host[:port]
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let username = match userinfo {
            Some(u) => {
                let u = decode_text("userinfo", u, is_userinfo_char)?;
                reject_nul("userinfo", u.as_bytes())?;
                Some(u)
            }
            None => None,
        };
        let (host, port_text) = parse_hostport(hostport)?;
        // An empty port ("host:") means the default, as RFC 3986 allows.
        let port_text = port_text.filter(|p| !p.is_empty());

        let export_name = parse_export_name(path)?;

        // The transport is filled in below, once `socket=` is known.
        let mut uri = NbdUri {
            tls: scheme.tls,
            export_name,
            username,
            ..NbdUri::new(Transport::Tcp {
                host: String::new(),
                port: DEFAULT_TCP_PORT,
            })
        };
        let socket = apply_query(&mut uri, query.unwrap_or(""), scheme)?;
        uri.transport = make_transport(scheme, host, port_text, socket)?;
        Ok(uri)
    }

    /// Creates a URI for `transport` with no TLS, the default export and no options.
    ///
    /// Use it to build a URI in code (then set the public fields) before
    /// rendering it with `to_string()`.
    #[must_use]
    pub fn new(transport: Transport) -> NbdUri {
        NbdUri {
            transport,
            tls: false,
            export_name: String::new(),
            username: None,
            tls_type: None,
            tls_hostname: None,
            tls_verify_peer: None,
            tls_certificates: None,
            tls_psk_file: None,
            unknown_params: Vec::new(),
        }
    }

    /// The canonical (lower-case) scheme for this URI's transport and TLS setting,
    /// e.g. `"nbds+unix"`.
    ///
    /// Use it in messages and logs that name the kind of connection.
    #[must_use]
    pub fn scheme(&self) -> &'static str {
        let kind = match self.transport {
            Transport::Tcp { .. } => Kind::Tcp,
            Transport::Unix { .. } => Kind::Unix,
            Transport::Vsock { .. } => Kind::Vsock,
        };
        scheme_name(kind, self.tls)
    }
}

impl FromStr for NbdUri {
    type Err = UriError;

    /// Same as [`NbdUri::parse`]; use it through `s.parse::<NbdUri>()`.
    fn from_str(s: &str) -> Result<NbdUri, UriError> {
        NbdUri::parse(s)
    }
}

/// Renders the URI back in canonical form: lower-case scheme, default port
/// omitted, vsock CID always written, path always starting with `/`, known
/// query parameters first (`socket`, `tls-type`, `tls-hostname`,
/// `tls-verify-peer` as `0`/`1`, `tls-certificates`, `tls-psk-file`), then the
/// unknown ones in order, with everything that must be percent-encoded encoded
/// (upper-case hex). `NbdUri::parse(&uri.to_string())` gives back an equal value
/// for every value that `parse` can produce. A hand-built value that `parse`
/// would never produce (empty TCP host, port 0, NUL in the export name, an
/// unknown parameter named like a known one, ...) is still rendered, but will
/// not parse back the same.
impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())?;
        f.write_str("://")?;
        if let Some(user) = &self.username {
            write_encoded(f, user.as_bytes(), is_userinfo_safe)?;
            f.write_str("@")?;
        }
        match &self.transport {
            Transport::Tcp { host, port } => {
                write_host(f, host)?;
                if *port != DEFAULT_TCP_PORT {
                    write!(f, ":{port}")?;
                }
            }
            Transport::Unix { .. } => {}
            Transport::Vsock { cid, port } => {
                write!(f, "{cid}")?;
                if *port != DEFAULT_VSOCK_PORT {
                    write!(f, ":{port}")?;
                }
            }
        }
        f.write_str("/")?;
        write_encoded(f, self.export_name.as_bytes(), is_path_safe)?;

        let mut q = QueryWriter { first: true };
        if let Transport::Unix { path } = &self.transport {
            q.param(f, b"socket", &path_bytes(path))?;
        }
        if let Some(v) = &self.tls_type {
            q.param(f, b"tls-type", v.as_bytes())?;
        }
        if let Some(v) = &self.tls_hostname {
            q.param(f, b"tls-hostname", v.as_bytes())?;
        }
        if let Some(v) = self.tls_verify_peer {
            q.param(f, b"tls-verify-peer", if v { b"1" } else { b"0" })?;
        }
        if let Some(v) = &self.tls_certificates {
            q.param(f, b"tls-certificates", &path_bytes(v))?;
        }
        if let Some(v) = &self.tls_psk_file {
            q.param(f, b"tls-psk-file", &path_bytes(v))?;
        }
        for (k, v) in &self.unknown_params {
            q.param(f, k.as_bytes(), v.as_bytes())?;
        }
        Ok(())
    }
}

struct QueryWriter {
    first: bool,
}

impl QueryWriter {
    fn param(&mut self, f: &mut fmt::Formatter<'_>, key: &[u8], value: &[u8]) -> fmt::Result {
        f.write_str(if self.first { "?" } else { "&" })?;
        self.first = false;
        write_encoded(f, key, is_query_safe)?;
        f.write_str("=")?;
        write_encoded(f, value, is_query_safe)
    }
}

/// Writes a host: bracketed if it is an IPv6 address (with `%25zone`), else an
/// encoded reg-name.
fn write_host(f: &mut fmt::Formatter<'_>, host: &str) -> fmt::Result {
    let (addr, zone) = match host.split_once('%') {
        Some((a, z)) => (a, Some(z)),
        None => (host, None),
    };
    if zone != Some("") && addr.parse::<Ipv6Addr>().is_ok() {
        f.write_str("[")?;
        f.write_str(addr)?;
        if let Some(zone) = zone {
            f.write_str("%25")?;
            write_encoded(f, zone.as_bytes(), is_unreserved)?;
        }
        f.write_str("]")
    } else {
        write_encoded(f, host.as_bytes(), is_regname_safe)
    }
}

fn write_encoded(f: &mut fmt::Formatter<'_>, bytes: &[u8], safe: fn(u8) -> bool) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !safe(b) {
            // Safe bytes are ASCII, so the run before `i` is valid UTF-8 on its own.
            f.write_str(std::str::from_utf8(&bytes[start..i]).map_err(|_| fmt::Error)?)?;
            let enc = [b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]];
            f.write_str(std::str::from_utf8(&enc).map_err(|_| fmt::Error)?)?;
            start = i + 1;
        }
    }
    f.write_str(std::str::from_utf8(&bytes[start..]).map_err(|_| fmt::Error)?)
}

/// Path minus its leading '/', percent-decoded and checked as an NBD string.
fn parse_export_name(path: &str) -> Result<String, UriError> {
    let bytes = decode("path", path.strip_prefix('/').unwrap_or(path), is_path_char)?;
    if bytes.len() > MAX_EXPORT_NAME_LEN {
        return Err(UriError::ExportNameTooLong { len: bytes.len() });
    }
    if bytes.contains(&0) {
        return Err(UriError::ExportNameContainsNul);
    }
    String::from_utf8(bytes).map_err(|_| UriError::InvalidUtf8 { component: "path" })
}

/// Stores the query parameters in `uri` (known ones: last wins; others go to
/// `unknown_params`) and returns the `socket=` path, if any.
fn apply_query(
    uri: &mut NbdUri,
    query: &str,
    scheme: &Scheme,
) -> Result<Option<PathBuf>, UriError> {
    let mut socket = None;
    for segment in query.split('&').filter(|seg| !seg.is_empty()) {
        let (k, v) = segment.split_once('=').unwrap_or((segment, ""));
        let key = decode_text("query parameter name", k, is_query_char)?;
        let value = decode("query parameter value", v, is_query_char)?;
        match key.as_str() {
            "socket" => {
                if scheme.kind != Kind::Unix {
                    return Err(UriError::SocketNotAllowed {
                        scheme: scheme.name,
                    });
                }
                non_empty("socket", &value)?;
                // NUL is allowed anywhere in an abstract name (leading NUL),
                // never in a filesystem path.
                if value[0] != 0 {
                    reject_nul("socket parameter", &value)?;
                }
                socket = Some(bytes_to_path(value, "socket parameter")?);
            }
            "tls-type" => uri.tls_type = Some(known_text("tls-type", value)?),
            "tls-hostname" => uri.tls_hostname = Some(known_text("tls-hostname", value)?),
            "tls-verify-peer" => {
                let text = known_text("tls-verify-peer", value)?;
                let flag = parse_bool(&text)
                    .ok_or_else(|| UriError::InvalidTlsVerifyPeer(quote(&text)))?;
                uri.tls_verify_peer = Some(flag);
            }
            "tls-certificates" => {
                uri.tls_certificates = Some(known_path("tls-certificates", value)?);
            }
            "tls-psk-file" => uri.tls_psk_file = Some(known_path("tls-psk-file", value)?),
            _ => {
                let value = String::from_utf8(value).map_err(|_| UriError::InvalidUtf8 {
                    component: "query parameter value",
                })?;
                uri.unknown_params.push((key, value));
            }
        }
    }
    Ok(socket)
}

/// Checks the authority against the scheme's transport and builds the [`Transport`].
/// `port_text` is `None` when the URI has no port or an empty one.
fn make_transport(
    scheme: &Scheme,
    host: Host,
    port_text: Option<&str>,
    socket: Option<PathBuf>,
) -> Result<Transport, UriError> {
    match scheme.kind {
        Kind::Tcp => {
            let host = match host {
                Host::Name(h) if h.is_empty() => return Err(UriError::MissingHost),
                Host::Name(h) | Host::Ipv6(h) => h,
            };
            let port = match port_text {
                None => DEFAULT_TCP_PORT,
                Some(p) => match parse_decimal::<u16>(p) {
                    Some(n) if n != 0 => n,
                    _ => return Err(UriError::InvalidPort(quote(p))),
                },
            };
            Ok(Transport::Tcp { host, port })
        }
        Kind::Unix => {
            let host_given = match &host {
                Host::Name(h) => !h.is_empty(),
                Host::Ipv6(_) => true,
            };
            if host_given || port_text.is_some() {
                return Err(UriError::AuthorityWithUnix {
                    scheme: scheme.name,
                });
            }
            let path = socket.ok_or(UriError::MissingSocket {
                scheme: scheme.name,
            })?;
            Ok(Transport::Unix { path })
        }
        Kind::Vsock => {
            let cid = match host {
                Host::Name(h) if h.is_empty() => VSOCK_HOST_CID,
                Host::Name(h) => {
                    parse_decimal::<u32>(&h).ok_or_else(|| UriError::InvalidVsockCid(quote(&h)))?
                }
                Host::Ipv6(h) => return Err(UriError::InvalidVsockCid(quote(&format!("[{h}]")))),
            };
            let port = match port_text {
                None => DEFAULT_VSOCK_PORT,
                Some(p) => {
                    parse_decimal::<u32>(p).ok_or_else(|| UriError::InvalidPort(quote(p)))?
                }
            };
            Ok(Transport::Vsock { cid, port })
        }
    }
}

/// Splits `host[:port]` or `[ipv6]:port`. The port text is returned undecoded.
fn parse_hostport(hp: &str) -> Result<(Host, Option<&str>), UriError> {
    if let Some(inner) = hp.strip_prefix('[') {
        let close = inner
            .find(']')
            .ok_or_else(|| UriError::UnclosedIpv6Bracket(quote(hp)))?;
        let after = &inner[close + 1..];
        let port = if after.is_empty() {
            None
        } else if let Some(p) = after.strip_prefix(':') {
            Some(p)
        } else {
            return Err(UriError::InvalidIpv6Literal(quote(hp)));
        };
        Ok((Host::Ipv6(parse_ipv6_literal(&inner[..close])?), port))
    } else {
        let (h, port) = match hp.split_once(':') {
            Some((h, p)) => {
                if p.contains(':') {
                    return Err(UriError::UnbracketedIpv6(quote(hp)));
                }
                (h, Some(p))
            }
            None => (hp, None),
        };
        let host = decode_text("host", h, is_regname_char)?;
        reject_nul("host", host.as_bytes())?;
        Ok((Host::Name(host), port))
    }
}

/// Checks the text between brackets: an IPv6 address, optionally `%25` and a zone.
fn parse_ipv6_literal(lit: &str) -> Result<String, UriError> {
    let bad = || UriError::InvalidIpv6Literal(quote(&format!("[{lit}]")));
    let (addr, zone) = match lit.find('%') {
        Some(i) => (&lit[..i], Some(&lit[i..])),
        None => (lit, None),
    };
    addr.parse::<Ipv6Addr>().map_err(|_| bad())?;
    match zone {
        None => Ok(addr.to_owned()),
        Some(z) => {
            // RFC 6874: the zone delimiter is an encoded '%'.
            let z = z.strip_prefix("%25").ok_or_else(bad)?;
            let zone = decode_text("IPv6 zone", z, is_unreserved)?;
            if zone.is_empty() || zone.contains('\0') {
                return Err(bad());
            }
            Ok(format!("{addr}%{zone}"))
        }
    }
}

/// RFC 3986 scheme: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
fn is_valid_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// Percent-decodes `s`, first checking that every unencoded character is allowed.
fn decode(component: &'static str, s: &str, allowed: fn(u8) -> bool) -> Result<Vec<u8>, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_value);
            let lo = bytes.get(i + 2).copied().and_then(hex_value);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(UriError::InvalidPercentEncoding { component }),
            }
            i += 3;
        } else if b.is_ascii() && allowed(b) {
            out.push(b);
            i += 1;
        } else {
            let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
            return Err(UriError::InvalidCharacter { component, ch });
        }
    }
    Ok(out)
}

fn decode_text(
    component: &'static str,
    s: &str,
    allowed: fn(u8) -> bool,
) -> Result<String, UriError> {
    String::from_utf8(decode(component, s, allowed)?)
        .map_err(|_| UriError::InvalidUtf8 { component })
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn reject_nul(component: &'static str, bytes: &[u8]) -> Result<(), UriError> {
    if bytes.contains(&0) {
        Err(UriError::UnexpectedNul { component })
    } else {
        Ok(())
    }
}

fn non_empty(key: &'static str, value: &[u8]) -> Result<(), UriError> {
    if value.is_empty() {
        Err(UriError::EmptyParameter { key })
    } else {
        Ok(())
    }
}

/// Value of a known text parameter: non-empty, UTF-8, no NUL.
fn known_text(key: &'static str, value: Vec<u8>) -> Result<String, UriError> {
    non_empty(key, &value)?;
    reject_nul("query parameter value", &value)?;
    String::from_utf8(value).map_err(|_| UriError::InvalidUtf8 {
        component: "query parameter value",
    })
}

/// Value of a known file parameter: non-empty, no NUL.
fn known_path(key: &'static str, value: Vec<u8>) -> Result<PathBuf, UriError> {
    non_empty(key, &value)?;
    reject_nul("query parameter value", &value)?;
    bytes_to_path(value, "query parameter value")
}

/// Decimal digits only (no sign, no spaces), in range for `T`.
fn parse_decimal<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_bool(s: &str) -> Option<bool> {
    const TRUE: [&str; 4] = ["1", "true", "yes", "on"];
    const FALSE: [&str; 4] = ["0", "false", "no", "off"];
    if TRUE.iter().any(|t| t.eq_ignore_ascii_case(s)) {
        Some(true)
    } else if FALSE.iter().any(|t| t.eq_ignore_ascii_case(s)) {
        Some(false)
    } else {
        None
    }
}

/// Shortens user input quoted back in an error message.
fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(unix)]
fn bytes_to_path(bytes: Vec<u8>, _component: &'static str) -> Result<PathBuf, UriError> {
    use std::os::unix::ffi::OsStringExt;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

#[cfg(not(unix))]
fn bytes_to_path(bytes: Vec<u8>, component: &'static str) -> Result<PathBuf, UriError> {
    String::from_utf8(bytes)
        .map(PathBuf::from)
        .map_err(|_| UriError::InvalidUtf8 { component })
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> Cow<'_, [u8]> {
    use std::os::unix::ffi::OsStrExt;
    Cow::Borrowed(path.as_os_str().as_bytes())
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Cow<'_, [u8]> {
    match path.to_string_lossy() {
        Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
        Cow::Owned(s) => Cow::Owned(s.into_bytes()),
    }
}

// RFC 3986 character classes (ASCII only; callers check `is_ascii` first or
// only ever pass bytes).

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Unencoded bytes allowed in userinfo.
fn is_userinfo_char(b: u8) -> bool {
    is_unreserved(b) || is_sub_delim(b) || b == b':'
}

/// Unencoded bytes allowed in a reg-name host.
fn is_regname_char(b: u8) -> bool {
    is_unreserved(b) || is_sub_delim(b)
}

/// Unencoded bytes allowed in the path (after the leading '/').
fn is_path_char(b: u8) -> bool {
    is_unreserved(b) || is_sub_delim(b) || matches!(b, b':' | b'@' | b'/')
}

/// Unencoded bytes allowed in the query (`&` and `=` are split on before decoding).
fn is_query_char(b: u8) -> bool {
    is_path_char(b) || b == b'?'
}

// What Display leaves unencoded: a subset of what the parser allows, chosen so
// the output is unambiguous (no ':' in userinfo, no '&', '=', '+', ';' in the
// query).

fn is_userinfo_safe(b: u8) -> bool {
    is_userinfo_char(b) && b != b':'
}

fn is_regname_safe(b: u8) -> bool {
    is_regname_char(b)
}

fn is_path_safe(b: u8) -> bool {
    is_path_char(b)
}

fn is_query_safe(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'\'' | b'(' | b')' | b'*' | b',' | b':' | b'@' | b'/'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> NbdUri {
        match NbdUri::parse(s) {
            Ok(u) => u,
            Err(e) => panic!("{s:?} should parse, got: {e}"),
        }
    }

    fn err(s: &str) -> UriError {
        match NbdUri::parse(s) {
            Ok(u) => panic!("{s:?} should fail, parsed as {u:?}"),
            Err(e) => e,
        }
    }

    fn tcp(host: &str, port: u16) -> Transport {
        Transport::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    fn unix(path: &str) -> Transport {
        Transport::Unix {
            path: PathBuf::from(path),
        }
    }

    /// parse -> Display -> parse gives the same value.
    fn assert_round_trip(u: &NbdUri) {
        let s = u.to_string();
        match NbdUri::parse(&s) {
            Ok(back) => assert_eq!(&back, u, "round trip through {s:?}"),
            Err(e) => panic!("rendered {s:?} does not parse: {e}"),
        }
    }

    #[test]
    fn spec_export_name_table() {
        let table = [
            ("nbd://example.com/disk", "disk"),
            ("nbd+unix:///disk?socket=sock", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ];
        for (s, name) in table {
            let u = p(s);
            assert_eq!(u.export_name, name, "{s}");
            assert_round_trip(&u);
        }
    }

    #[test]
    fn spec_examples() {
        let u = p("nbd://example.com:10809/export");
        assert_eq!(u.transport, tcp("example.com", 10809));
        assert!(!u.tls);
        assert_eq!(u.export_name, "export");
        assert_eq!(u.username, None);
        assert!(u.unknown_params.is_empty());

        let u = p("nbd+unix:///export?socket=nbd.sock");
        assert_eq!(u.transport, unix("nbd.sock"));
        assert_eq!(u.export_name, "export");

        let u = p("nbd://h/hello%20world");
        assert_eq!(u.export_name, "hello world");
    }

    #[test]
    fn default_and_explicit_ports() {
        assert_eq!(p("nbd://h").transport, tcp("h", 10809));
        assert_eq!(p("nbd://h:").transport, tcp("h", 10809));
        assert_eq!(p("nbd://h:1/").transport, tcp("h", 1));
        assert_eq!(p("nbd://h:65535/").transport, tcp("h", 65535));
        assert_eq!(p("nbd://h:010810/").transport, tcp("h", 10810));
        assert_eq!(
            p("nbds://192.0.2.1:10810/x").transport,
            tcp("192.0.2.1", 10810)
        );
    }

    #[test]
    fn schemes_and_tls() {
        let cases = [
            ("nbd://h/", false),
            ("nbds://h/", true),
            ("nbd+unix:///?socket=s", false),
            ("nbds+unix:///?socket=s", true),
            ("nbd+vsock:///", false),
            ("nbds+vsock:///", true),
        ];
        for (s, tls) in cases {
            let u = p(s);
            assert_eq!(u.tls, tls, "{s}");
            assert_eq!(u.scheme(), &s[..s.find(':').unwrap()]);
        }
    }

    #[test]
    fn uppercase_schemes() {
        let u = p("NBD://Example.COM/Disk");
        assert_eq!(u.transport, tcp("Example.COM", 10809));
        assert!(!u.tls);
        assert_eq!(u.export_name, "Disk");
        assert!(p("NBDS://h/").tls);
        assert!(p("Nbds+Unix:///?socket=s").tls);
        assert_eq!(p("NBD+UNIX:///?socket=s").transport, unix("s"));
        assert_eq!(
            p("nBd+VsOcK://3").transport,
            Transport::Vsock {
                cid: 3,
                port: 10809
            }
        );
        assert!(p("NBDS+VSOCK:///").tls);
        assert_eq!(p("NBDS://h/").to_string(), "nbds://h/");
    }

    #[test]
    fn ipv6_literals() {
        let u = p("nbd://[::1]:10810/exp");
        assert_eq!(u.transport, tcp("::1", 10810));
        assert_eq!(u.export_name, "exp");
        assert_eq!(u.to_string(), "nbd://[::1]:10810/exp");

        assert_eq!(p("nbd://[::1]").transport, tcp("::1", 10809));
        assert_eq!(p("nbd://[::1]:/").transport, tcp("::1", 10809));
        assert_eq!(
            p("nbd://[2001:DB8::a]/").transport,
            tcp("2001:DB8::a", 10809)
        );
        assert_eq!(
            p("nbd://[::ffff:192.0.2.1]/").transport,
            tcp("::ffff:192.0.2.1", 10809)
        );

        let u = p("nbds://[fe80::1%25eth0]:99/x");
        assert_eq!(u.transport, tcp("fe80::1%eth0", 99));
        assert_eq!(u.to_string(), "nbds://[fe80::1%25eth0]:99/x");
        assert_round_trip(&u);
        assert_eq!(
            p("nbd://[fe80::1%25en%2Fx]/").transport,
            tcp("fe80::1%en/x", 10809)
        );
        // An IPv6 address followed by an empty zone is not a literal: it is
        // rendered as an encoded reg-name, and still round-trips.
        let u = NbdUri::new(tcp("::1%", 10809));
        assert_eq!(u.to_string(), "nbd://%3A%3A1%25/");
        assert_round_trip(&u);
    }

    #[test]
    fn ipv4_and_reg_names() {
        assert_eq!(p("nbd://127.0.0.1/").transport, tcp("127.0.0.1", 10809));
        assert_eq!(
            p("nbd://my-host.example_1~/").transport,
            tcp("my-host.example_1~", 10809)
        );
        assert_eq!(p("nbd://a%2Db/").transport, tcp("a-b", 10809));
        // A percent-encoded ':' is data, not a port separator.
        let u = p("nbd://a%3Ab:5/");
        assert_eq!(u.transport, tcp("a:b", 5));
        assert_eq!(u.to_string(), "nbd://a%3Ab:5/");
        assert_round_trip(&u);
    }

    #[test]
    fn vsock() {
        let u = p("nbd+vsock:///");
        assert_eq!(
            u.transport,
            Transport::Vsock {
                cid: 2,
                port: 10809
            }
        );
        assert_eq!(u.export_name, "");
        assert!(!u.tls);
        assert_eq!(u.to_string(), "nbd+vsock://2/");

        let u = p("nbds+vsock://3:1234/exp");
        assert_eq!(u.transport, Transport::Vsock { cid: 3, port: 1234 });
        assert!(u.tls);
        assert_eq!(u.export_name, "exp");
        assert_eq!(u.to_string(), "nbds+vsock://3:1234/exp");

        assert_eq!(
            p("nbd+vsock://4294967295:4294967295").transport,
            Transport::Vsock {
                cid: u32::MAX,
                port: u32::MAX
            }
        );
        assert_eq!(
            p("nbd+vsock://:7/").transport,
            Transport::Vsock { cid: 2, port: 7 }
        );
        assert_eq!(
            p("nbd+vsock://0:0/").transport,
            Transport::Vsock { cid: 0, port: 0 }
        );
        assert_eq!(p("nbd+vsock://u@5/").username.as_deref(), Some("u"));
    }

    #[test]
    fn unix_sockets() {
        let u = p("nbd+unix:///?socket=/run/nbd%20server.sock");
        assert_eq!(u.transport, unix("/run/nbd server.sock"));
        assert_eq!(u.export_name, "");
        assert_eq!(u.to_string(), "nbd+unix:///?socket=/run/nbd%20server.sock");

        // Empty port after an empty host is tolerated.
        assert_eq!(p("nbd+unix://:/?socket=s").transport, unix("s"));
        // A username is allowed (TLS username).
        let u = p("nbds+unix://bob%40corp@/x?socket=s");
        assert_eq!(u.username.as_deref(), Some("bob@corp"));
        assert_eq!(u.to_string(), "nbds+unix://bob%40corp@/x?socket=s");
        // Last socket wins.
        assert_eq!(p("nbd+unix:///?socket=a&socket=b").transport, unix("b"));
        // Export starting with '/' on a unix URI.
        let u = p("nbd+unix:////disk?socket=s");
        assert_eq!(u.export_name, "/disk");
        assert_eq!(u.to_string(), "nbd+unix:////disk?socket=s");
    }

    #[test]
    fn abstract_socket() {
        let u = p("nbd+unix:///?socket=%00/abstract");
        assert_eq!(u.transport, unix("\0/abstract"));
        assert_eq!(u.to_string(), "nbd+unix:///?socket=%00/abstract");
        // Any byte may follow the leading NUL.
        assert_eq!(p("nbd+unix:///?socket=%00a%00b").transport, unix("\0a\0b"));
        assert_round_trip(&u);
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_socket_path_on_unix() {
        use std::os::unix::ffi::OsStringExt;
        let u = p("nbd+unix:///?socket=/tmp/%FF");
        let want = PathBuf::from(std::ffi::OsString::from_vec(b"/tmp/\xff".to_vec()));
        assert_eq!(u.transport, Transport::Unix { path: want });
        assert_eq!(u.to_string(), "nbd+unix:///?socket=/tmp/%FF");
    }

    #[test]
    fn username() {
        let u = p("nbds://alice@example.com/");
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.transport, tcp("example.com", 10809));
        assert_eq!(u.to_string(), "nbds://alice@example.com/");
        assert_eq!(p("nbd://a%20b@h/").username.as_deref(), Some("a b"));
        // The whole userinfo is kept; ':' is encoded when rendered.
        let u = p("nbd://user:pw@h/");
        assert_eq!(u.username.as_deref(), Some("user:pw"));
        assert_eq!(u.to_string(), "nbd://user%3Apw@h/");
        assert_round_trip(&u);
        // Empty userinfo is kept as an empty name.
        let u = p("nbd://@h/");
        assert_eq!(u.username.as_deref(), Some(""));
        assert_round_trip(&u);
    }

    #[test]
    fn tls_parameters() {
        let u = p(
            "nbds://h/e?tls-type=psk&tls-hostname=srv.example&tls-verify-peer=0\
                   &tls-certificates=/etc/pki/nbd&tls-psk-file=/etc/keys.psk",
        );
        assert_eq!(u.tls_type.as_deref(), Some("psk"));
        assert_eq!(u.tls_hostname.as_deref(), Some("srv.example"));
        assert_eq!(u.tls_verify_peer, Some(false));
        assert_eq!(u.tls_certificates, Some(PathBuf::from("/etc/pki/nbd")));
        assert_eq!(u.tls_psk_file, Some(PathBuf::from("/etc/keys.psk")));
        assert!(u.unknown_params.is_empty());
        assert_eq!(
            u.to_string(),
            "nbds://h/e?tls-type=psk&tls-hostname=srv.example&tls-verify-peer=0\
             &tls-certificates=/etc/pki/nbd&tls-psk-file=/etc/keys.psk"
        );
        assert_round_trip(&u);

        // TLS parameters are allowed on nbd:// too (opportunistic TLS).
        assert_eq!(
            p("nbd://h/?tls-type=x509").tls_type.as_deref(),
            Some("x509")
        );
    }

    #[test]
    fn tls_verify_peer_values() {
        let cases = [
            ("0", false),
            ("1", true),
            ("true", true),
            ("TRUE", true),
            ("false", false),
            ("False", false),
            ("yes", true),
            ("YES", true),
            ("no", false),
            ("nO", false),
            ("on", true),
            ("On", true),
            ("off", false),
            ("OFF", false),
        ];
        for (v, want) in cases {
            let u = p(&format!("nbd://h/?tls-verify-peer={v}"));
            assert_eq!(u.tls_verify_peer, Some(want), "{v}");
        }
        assert_eq!(
            p("nbd://h/?tls-verify-peer=%31").tls_verify_peer,
            Some(true)
        );
        assert_eq!(p("nbd://h/").tls_verify_peer, None);
    }

    #[test]
    fn query_decoding_and_last_wins() {
        // '+' is a literal plus, not a space.
        let u = p("nbd://h/a+b?tls-hostname=a+b&x-k%3D=v%26w+z");
        assert_eq!(u.export_name, "a+b");
        assert_eq!(u.tls_hostname.as_deref(), Some("a+b"));
        assert_eq!(
            u.unknown_params,
            vec![("x-k=".to_owned(), "v&w+z".to_owned())]
        );
        assert_eq!(
            u.to_string(),
            "nbd://h/a+b?tls-hostname=a%2Bb&x-k%3D=v%26w%2Bz"
        );
        assert_round_trip(&u);

        let u = p("nbd://h/?tls-type=anon&tls-type=x509&tls-verify-peer=1&tls-verify-peer=0");
        assert_eq!(u.tls_type.as_deref(), Some("x509"));
        assert_eq!(u.tls_verify_peer, Some(false));

        // '=' inside a value, keys are case-sensitive, empty segments skipped.
        let u = p("nbd://h/?&a=b=c&&Socket=x&flag&");
        assert_eq!(
            u.unknown_params,
            vec![
                ("a".to_owned(), "b=c".to_owned()),
                ("Socket".to_owned(), "x".to_owned()),
                ("flag".to_owned(), String::new()),
            ]
        );
        // '?' and '/' are allowed unencoded in the query.
        assert_eq!(p("nbd+unix:///?socket=/a?b").transport, unix("/a?b"));
    }

    #[test]
    fn unknown_params_are_reported() {
        let u = p("nbd://h/?x-foo=bar&baz&tls-type=psk&x-empty=");
        assert_eq!(
            u.unknown_params,
            vec![
                ("x-foo".to_owned(), "bar".to_owned()),
                ("baz".to_owned(), String::new()),
                ("x-empty".to_owned(), String::new()),
            ]
        );
        assert_eq!(
            u.to_string(),
            "nbd://h/?tls-type=psk&x-foo=bar&baz=&x-empty="
        );
    }

    #[test]
    fn export_name_encoding() {
        let u = p("nbd://h/%E2%82%AC%3F%23%25/x:y@z");
        assert_eq!(u.export_name, "\u{20ac}?#%/x:y@z");
        assert_eq!(u.to_string(), "nbd://h/%E2%82%AC%3F%23%25/x:y@z");
        let u = p("nbd://h/%c3%a9");
        assert_eq!(u.export_name, "\u{e9}");
        assert_eq!(u.to_string(), "nbd://h/%C3%A9");
        // 4096 bytes is the limit, inclusive.
        let name = "a".repeat(4096);
        assert_eq!(p(&format!("nbd://h/{name}")).export_name, name);
    }

    #[test]
    fn from_str_and_new() {
        let u: NbdUri = "nbd://h/x".parse().unwrap();
        assert_eq!(u, p("nbd://h/x"));
        assert_eq!("bad".parse::<NbdUri>(), Err(UriError::NotAUri));

        let mut u = NbdUri::new(tcp("example.com", 10809));
        assert_eq!(u.to_string(), "nbd://example.com/");
        u.tls = true;
        u.export_name = "my disk".to_owned();
        u.tls_verify_peer = Some(true);
        assert_eq!(
            u.to_string(),
            "nbds://example.com/my%20disk?tls-verify-peer=1"
        );
        assert_round_trip(&u);

        let mut u = NbdUri::new(tcp("::1", 1));
        u.username = Some("a:b".to_owned());
        assert_eq!(u.to_string(), "nbd://a%3Ab@[::1]:1/");
        assert_round_trip(&u);
    }

    #[test]
    fn display_round_trips_examples() {
        let examples = [
            "nbd://example.com:10809/export",
            "nbd://example.com:10810/export",
            "nbds://user@[::1]:10810/a%20b?tls-type=psk&x-y=z",
            "nbd+unix:///export?socket=nbd.sock&tls-hostname=srv",
            "nbds+unix://u@/?socket=%00abs&tls-verify-peer=yes",
            "nbd+vsock:///",
            "nbds+vsock://4:5/e?tls-psk-file=/k",
            "NBD://H/%2F",
            "nbd://h/?a&a&b=1",
            "nbd://%E2%82%AC.example/",
        ];
        for s in examples {
            let u = p(s);
            assert_round_trip(&u);
            // Canonical form is a fixed point.
            let canon = u.to_string();
            assert_eq!(p(&canon).to_string(), canon);
        }
    }

    #[test]
    fn is_nbd_uri_heuristic() {
        for s in [
            "nbd://h",
            "nbds://",
            "NBD+UNIX:///?socket=x",
            "nbds+unix://",
            "nbd+vsock:///",
            "Nbds+Vsock://3",
        ] {
            assert!(is_nbd_uri(s), "{s}");
        }
        for s in [
            "",
            "nbd",
            "nbd:",
            "nbd:/",
            "nbd:foo",
            "/tmp/nbd.sock",
            "nbd.sock",
            "http://h/",
            "nbd+tcp://h",
            " nbd://h",
            "\u{e9}nbd://",
            "nbd\u{e9}://",
        ] {
            assert!(!is_nbd_uri(s), "{s}");
        }
    }

    #[test]
    fn error_too_long() {
        let s = format!("nbd://h/{}", "a".repeat(MAX_URI_LEN));
        assert_eq!(
            err(&s),
            UriError::TooLong {
                len: s.len(),
                max: MAX_URI_LEN
            }
        );
        // Just at the limit: parses up to the export name check.
        let s = format!("nbd://h/{}", "a".repeat(MAX_URI_LEN - 8));
        assert_eq!(s.len(), MAX_URI_LEN);
        assert_eq!(
            err(&s),
            UriError::ExportNameTooLong {
                len: MAX_URI_LEN - 8
            }
        );
    }

    #[test]
    fn error_not_a_uri() {
        for s in [
            "",
            "/tmp/nbd.sock",
            "nbd.sock",
            ":foo",
            "1nbd://h/",
            "n bd://h/",
            " nbd://h/",
            "\u{e9}://",
        ] {
            assert_eq!(err(s), UriError::NotAUri, "{s}");
        }
    }

    #[test]
    fn error_missing_slashes() {
        assert_eq!(err("nbd:foo"), UriError::MissingSlashes { scheme: "nbd" });
        assert_eq!(
            err("NBDS:/foo"),
            UriError::MissingSlashes { scheme: "nbds" }
        );
        assert_eq!(
            err("nbd+unix:?socket=x"),
            UriError::MissingSlashes { scheme: "nbd+unix" }
        );
    }

    #[test]
    fn error_unknown_scheme() {
        assert_eq!(err("http://h/"), UriError::UnknownScheme("http".to_owned()));
        assert_eq!(
            err("nbd+tcp://h/"),
            UriError::UnknownScheme("nbd+tcp".to_owned())
        );
        assert_eq!(err("nbdx:foo"), UriError::UnknownScheme("nbdx".to_owned()));
        // Long schemes are shortened in the message.
        let long = "a".repeat(500);
        match err(&format!("{long}://")) {
            UriError::UnknownScheme(s) => assert!(s.len() < 100),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn error_fragment() {
        assert_eq!(err("nbd://h/x#frag"), UriError::FragmentNotAllowed);
        assert_eq!(err("nbd://h/#"), UriError::FragmentNotAllowed);
        assert_eq!(err("nbd+unix:///?socket=a#b"), UriError::FragmentNotAllowed);
    }

    #[test]
    fn error_invalid_character() {
        assert_eq!(
            err("nbd://h/a b"),
            UriError::InvalidCharacter {
                component: "path",
                ch: ' '
            }
        );
        assert_eq!(
            err("nbd://h/\u{e9}"),
            UriError::InvalidCharacter {
                component: "path",
                ch: '\u{e9}'
            }
        );
        assert_eq!(
            err("nbd://h/a\"b"),
            UriError::InvalidCharacter {
                component: "path",
                ch: '"'
            }
        );
        assert_eq!(
            err("nbd://h o/"),
            UriError::InvalidCharacter {
                component: "host",
                ch: ' '
            }
        );
        assert_eq!(
            err("nbd://h]/"),
            UriError::InvalidCharacter {
                component: "host",
                ch: ']'
            }
        );
        assert_eq!(
            err("nbd://a@b@h/"),
            UriError::InvalidCharacter {
                component: "userinfo",
                ch: '@'
            }
        );
        assert_eq!(
            err("nbd://h/?x=a b"),
            UriError::InvalidCharacter {
                component: "query parameter value",
                ch: ' '
            }
        );
        assert_eq!(
            err("nbd://h/?a[=b"),
            UriError::InvalidCharacter {
                component: "query parameter name",
                ch: '['
            }
        );
        assert_eq!(
            err("nbd://[fe80::1%25a.b!]/"),
            UriError::InvalidCharacter {
                component: "IPv6 zone",
                ch: '!'
            }
        );
    }

    #[test]
    fn error_percent_encoding() {
        for (s, component) in [
            ("nbd://h/%", "path"),
            ("nbd://h/%2", "path"),
            ("nbd://h/%zz", "path"),
            ("nbd://h/%-1", "path"),
            ("nbd://h%/", "host"),
            ("nbd://u%4@h/", "userinfo"),
            ("nbd://h/?k%=v", "query parameter name"),
            ("nbd://h/?k=%G0", "query parameter value"),
        ] {
            assert_eq!(
                err(s),
                UriError::InvalidPercentEncoding { component },
                "{s}"
            );
        }
    }

    #[test]
    fn error_invalid_utf8() {
        assert_eq!(
            err("nbd://h/%FF"),
            UriError::InvalidUtf8 { component: "path" }
        );
        assert_eq!(
            err("nbd://%C3/"),
            UriError::InvalidUtf8 { component: "host" }
        );
        assert_eq!(
            err("nbd://%80@h/"),
            UriError::InvalidUtf8 {
                component: "userinfo"
            }
        );
        assert_eq!(
            err("nbd://h/?%FF=1"),
            UriError::InvalidUtf8 {
                component: "query parameter name"
            }
        );
        assert_eq!(
            err("nbd://h/?x=%FF"),
            UriError::InvalidUtf8 {
                component: "query parameter value"
            }
        );
        assert_eq!(
            err("nbd://h/?tls-hostname=%FF"),
            UriError::InvalidUtf8 {
                component: "query parameter value"
            }
        );
    }

    #[test]
    fn error_unexpected_nul() {
        assert_eq!(
            err("nbd://h%00/"),
            UriError::UnexpectedNul { component: "host" }
        );
        assert_eq!(
            err("nbd://a%00@h/"),
            UriError::UnexpectedNul {
                component: "userinfo"
            }
        );
        assert_eq!(
            err("nbd+unix:///?socket=/tmp/a%00b"),
            UriError::UnexpectedNul {
                component: "socket parameter"
            }
        );
        for key in [
            "tls-type",
            "tls-hostname",
            "tls-certificates",
            "tls-psk-file",
            "tls-verify-peer",
        ] {
            assert_eq!(
                err(&format!("nbd://h/?{key}=a%00")),
                UriError::UnexpectedNul {
                    component: "query parameter value"
                },
                "{key}"
            );
        }
        assert_eq!(
            err("nbd://[::1%25a%00]/"),
            UriError::InvalidIpv6Literal("[::1%25a%00]".to_owned())
        );
        // Unknown parameters may carry NUL: they are only reported.
        assert_eq!(
            p("nbd://h/?x=%00").unknown_params,
            vec![("x".to_owned(), "\0".to_owned())]
        );
    }

    #[test]
    fn error_missing_host() {
        assert_eq!(err("nbd:///"), UriError::MissingHost);
        assert_eq!(err("nbds://"), UriError::MissingHost);
        assert_eq!(err("nbd://:10809/x"), UriError::MissingHost);
        assert_eq!(err("nbd://user@/x"), UriError::MissingHost);
    }

    #[test]
    fn error_invalid_port() {
        for (s, port) in [
            ("nbd://h:x/", "x"),
            ("nbd://h:0/", "0"),
            ("nbd://h:65536/", "65536"),
            ("nbd://h:+1/", "+1"),
            ("nbd://h:-1/", "-1"),
            ("nbd://h:1%30/", "1%30"),
            ("nbd://[::1]:99999999999/", "99999999999"),
            ("nbd+vsock://3:4294967296/", "4294967296"),
            ("nbd+vsock://3:p/", "p"),
        ] {
            assert_eq!(err(s), UriError::InvalidPort(port.to_owned()), "{s}");
        }
    }

    #[test]
    fn error_ipv6() {
        assert_eq!(
            err("nbd://[::1/x"),
            UriError::UnclosedIpv6Bracket("[::1".to_owned())
        );
        assert_eq!(
            err("nbd://[::1"),
            UriError::UnclosedIpv6Bracket("[::1".to_owned())
        );
        assert_eq!(
            err("nbd://[/"),
            UriError::UnclosedIpv6Bracket("[".to_owned())
        );
        for (s, lit) in [
            ("nbd://[::g]/", "[::g]"),
            ("nbd://[]/", "[]"),
            ("nbd://[192.0.2.1]/", "[192.0.2.1]"),
            ("nbd://[v1.x]/", "[v1.x]"),
            ("nbd://[::1]x/", "[::1]x"),
            ("nbd://[::1]]/", "[::1]]"),
            ("nbd://[fe80::1%eth0]/", "[fe80::1%eth0]"),
            ("nbd://[fe80::1%25]/", "[fe80::1%25]"),
            ("nbd://[::1%2]/", "[::1%2]"),
        ] {
            assert_eq!(err(s), UriError::InvalidIpv6Literal(lit.to_owned()), "{s}");
        }
        assert_eq!(
            err("nbd://::1/"),
            UriError::UnbracketedIpv6("::1".to_owned())
        );
        assert_eq!(
            err("nbd://fe80::1:10809/"),
            UriError::UnbracketedIpv6("fe80::1:10809".to_owned())
        );
    }

    #[test]
    fn error_vsock_cid() {
        for (s, cid) in [
            ("nbd+vsock://abc/", "abc"),
            ("nbd+vsock://4294967296/", "4294967296"),
            ("nbd+vsock://-1/", "-1"),
            ("nbd+vsock://+3/", "+3"),
            ("nbd+vsock://[::1]/", "[::1]"),
        ] {
            assert_eq!(err(s), UriError::InvalidVsockCid(cid.to_owned()), "{s}");
        }
    }

    #[test]
    fn error_missing_socket() {
        assert_eq!(
            err("nbd+unix:///"),
            UriError::MissingSocket { scheme: "nbd+unix" }
        );
        assert_eq!(
            err("NBDS+UNIX:///exp?tls-type=psk"),
            UriError::MissingSocket {
                scheme: "nbds+unix"
            }
        );
        // Keys are case-sensitive.
        assert_eq!(
            err("nbd+unix:///?SOCKET=x"),
            UriError::MissingSocket { scheme: "nbd+unix" }
        );
    }

    #[test]
    fn error_socket_not_allowed() {
        assert_eq!(
            err("nbd://h/?socket=/s"),
            UriError::SocketNotAllowed { scheme: "nbd" }
        );
        assert_eq!(
            err("nbds://h/?socket="),
            UriError::SocketNotAllowed { scheme: "nbds" }
        );
        assert_eq!(
            err("nbd+vsock:///?socket=/s"),
            UriError::SocketNotAllowed {
                scheme: "nbd+vsock"
            }
        );
    }

    #[test]
    fn error_authority_with_unix() {
        for s in [
            "nbd+unix://localhost/?socket=s",
            "nbd+unix://:5/?socket=s",
            "nbd+unix://[::1]/?socket=s",
            "nbds+unix://u@h/?socket=s",
        ] {
            let scheme = if s.starts_with("nbds") {
                "nbds+unix"
            } else {
                "nbd+unix"
            };
            assert_eq!(err(s), UriError::AuthorityWithUnix { scheme }, "{s}");
        }
    }

    #[test]
    fn error_export_name() {
        assert_eq!(err("nbd://h/a%00b"), UriError::ExportNameContainsNul);
        assert_eq!(
            err("nbd+unix:///%00?socket=s"),
            UriError::ExportNameContainsNul
        );
        let name = "a".repeat(4097);
        assert_eq!(
            err(&format!("nbd://h/{name}")),
            UriError::ExportNameTooLong { len: 4097 }
        );
        // The limit applies to the decoded name.
        let name = "%41".repeat(4097);
        assert_eq!(
            err(&format!("nbd://h/{name}")),
            UriError::ExportNameTooLong { len: 4097 }
        );
    }

    #[test]
    fn error_tls_verify_peer() {
        for v in ["2", "maybe", "t", "y", "10", "%20"] {
            let decoded = if v == "%20" { " " } else { v };
            assert_eq!(
                err(&format!("nbd://h/?tls-verify-peer={v}")),
                UriError::InvalidTlsVerifyPeer(decoded.to_owned()),
                "{v}"
            );
        }
    }

    #[test]
    fn error_empty_parameter() {
        assert_eq!(
            err("nbd+unix:///?socket="),
            UriError::EmptyParameter { key: "socket" }
        );
        assert_eq!(
            err("nbd+unix:///?socket"),
            UriError::EmptyParameter { key: "socket" }
        );
        for key in [
            "tls-type",
            "tls-hostname",
            "tls-verify-peer",
            "tls-certificates",
            "tls-psk-file",
        ] {
            assert_eq!(
                err(&format!("nbd://h/?{key}=")),
                UriError::EmptyParameter { key },
                "{key}"
            );
        }
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let cases: [(&str, &str); 8] = [
            ("nbd:foo", "nbd://"),
            ("http://h", "http"),
            ("nbd+unix:///", "socket="),
            ("nbd://h/?socket=x", "socket="),
            ("nbd://h:x/", "port"),
            ("nbd://[::1", "unclosed"),
            ("nbd+vsock://x/", "CID"),
            ("nbd://h/?tls-verify-peer=2", "tls-verify-peer"),
        ];
        for (s, needle) in cases {
            let msg = err(s).to_string();
            assert!(msg.contains(needle), "{s}: {msg}");
        }
        let msg = err("nbd://h/a b").to_string();
        assert!(msg.contains("' '") && msg.contains("path"), "{msg}");
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        fn text_no_nul(max: usize) -> impl Strategy<Value = String> {
            proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..max)
                .prop_map(|v| v.into_iter().collect())
        }

        fn non_empty_text(max: usize) -> impl Strategy<Value = String> {
            proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 1..max)
                .prop_map(|v| v.into_iter().collect())
        }

        fn host() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?(\\.[a-zA-Z0-9-]{1,10}){0,3}",
                any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
                any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
                (any::<std::net::Ipv6Addr>(), text_no_nul(8)).prop_map(|(a, z)| format!("{a}%{z}")),
                non_empty_text(16),
            ]
        }

        #[cfg(unix)]
        fn path_strategy() -> impl Strategy<Value = PathBuf> {
            use std::os::unix::ffi::OsStringExt;
            prop_oneof![
                // Filesystem path: any bytes but NUL.
                proptest::collection::vec(1u8..=255, 1..40),
                // Abstract namespace: leading NUL, then anything.
                proptest::collection::vec(any::<u8>(), 0..40).prop_map(|mut v| {
                    v.insert(0, 0);
                    v
                }),
            ]
            .prop_map(|v| PathBuf::from(std::ffi::OsString::from_vec(v)))
        }

        #[cfg(not(unix))]
        fn path_strategy() -> impl Strategy<Value = PathBuf> {
            non_empty_text(40).prop_map(PathBuf::from)
        }

        fn file_path() -> impl Strategy<Value = PathBuf> {
            non_empty_text(30).prop_map(PathBuf::from)
        }

        fn transport() -> impl Strategy<Value = Transport> {
            prop_oneof![
                (host(), 1u16..).prop_map(|(host, port)| Transport::Tcp { host, port }),
                path_strategy().prop_map(|path| Transport::Unix { path }),
                (any::<u32>(), any::<u32>()).prop_map(|(cid, port)| Transport::Vsock { cid, port }),
            ]
        }

        fn unknown_params() -> impl Strategy<Value = Vec<(String, String)>> {
            const KNOWN: [&str; 6] = [
                "socket",
                "tls-type",
                "tls-hostname",
                "tls-verify-peer",
                "tls-certificates",
                "tls-psk-file",
            ];
            proptest::collection::vec(
                (
                    any::<String>()
                        .prop_filter("not a known key", |k| !KNOWN.contains(&k.as_str())),
                    any::<String>(),
                ),
                0..4,
            )
        }

        fn nbd_uri() -> impl Strategy<Value = NbdUri> {
            (
                (
                    transport(),
                    any::<bool>(),
                    text_no_nul(40),
                    proptest::option::of(text_no_nul(12)),
                ),
                (
                    proptest::option::of(non_empty_text(8)),
                    proptest::option::of(non_empty_text(20)),
                    proptest::option::of(any::<bool>()),
                    proptest::option::of(file_path()),
                    proptest::option::of(file_path()),
                    unknown_params(),
                ),
            )
                .prop_map(
                    |((transport, tls, export_name, username), (tt, th, tv, tc, tp, unknown))| {
                        NbdUri {
                            transport,
                            tls,
                            export_name,
                            username,
                            tls_type: tt,
                            tls_hostname: th,
                            tls_verify_peer: tv,
                            tls_certificates: tc,
                            tls_psk_file: tp,
                            unknown_params: unknown,
                        }
                    },
                )
        }

        proptest::proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn display_then_parse_round_trips(u in nbd_uri()) {
                let s = u.to_string();
                prop_assert!(is_nbd_uri(&s), "{}", s);
                prop_assert!(s.is_ascii(), "{}", s);
                let back = NbdUri::parse(&s);
                prop_assert_eq!(back.as_ref(), Ok(&u), "rendered as {}", s);
                // The canonical form is a fixed point.
                prop_assert_eq!(back.unwrap().to_string(), s);
            }

            #[test]
            fn export_names_round_trip(name in text_no_nul(64), host in host()) {
                let mut u = NbdUri::new(Transport::Tcp { host, port: 10809 });
                u.export_name = name;
                let s = u.to_string();
                prop_assert_eq!(NbdUri::parse(&s), Ok(u), "rendered as {}", s);
            }

            #[test]
            fn socket_paths_round_trip(path in path_strategy(), tls in any::<bool>()) {
                let mut u = NbdUri::new(Transport::Unix { path });
                u.tls = tls;
                let s = u.to_string();
                prop_assert_eq!(NbdUri::parse(&s), Ok(u), "rendered as {}", s);
            }

            #[test]
            fn parse_never_panics(s in any::<String>()) {
                let _ = NbdUri::parse(&s);
                let _ = is_nbd_uri(&s);
            }

            #[test]
            fn parsed_uris_are_canonical_fixed_points(
                s in "(nbd|NBDS|nbd\\+unix|nbds\\+vsock)://([a-z%0-9:@\\[\\]]{0,12})(/[a-zA-Z0-9%/?=&+ ]{0,24})?"
            ) {
                if let Ok(u) = NbdUri::parse(&s) {
                    let canon = u.to_string();
                    let again = NbdUri::parse(&canon);
                    prop_assert_eq!(again.as_ref(), Ok(&u), "{} -> {}", s, canon);
                    prop_assert_eq!(again.unwrap().to_string(), canon);
                }
            }
        }
    }
}
