//! What the client asks for and how much it trusts the server: negotiation
//! settings, strict-mode switches, memory limits and timeouts.

use std::time::Duration;

use crate::consts::{client_flags, CONTEXT_BASE_ALLOCATION};
pub use crate::deadline::TimeoutPolicy;

/// The default [`Config::handshake_timeout`]: generous for a server across
/// the world doing TLS, short enough that a silent server is noticed.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether to use TLS (the TLS itself is done by the adapter when the core
/// emits [`crate::Event::StartTls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsMode {
    /// Never send `NBD_OPT_STARTTLS` (libnbd's default).
    #[default]
    Disable,
    /// Try TLS; continue in plaintext if the server refuses it.
    Allow,
    /// Insist on TLS; end the session if the server cannot do it.
    Require,
}

/// Client-side validation switches, like libnbd's `set_strict_mode`. All are
/// on by default; tests and fuzzers switch them off to reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strict(pub u32);

impl Strict {
    /// Refuse commands and command flags the server did not advertise, and
    /// writes to a read-only export.
    pub const COMMANDS: Strict = Strict(0x01);
    /// Refuse flags that are not meaningful for the command.
    pub const FLAGS: Strict = Strict(0x02);
    /// Refuse requests that reach past the end of the export.
    pub const BOUNDS: Strict = Strict(0x04);
    /// Refuse zero-length requests.
    pub const ZERO_SIZE: Strict = Strict(0x08);
    /// Refuse offsets and lengths not aligned to the advertised minimum block size.
    pub const ALIGN: Strict = Strict(0x10);
    /// Refuse write payloads over the payload maximum.
    pub const PAYLOAD: Strict = Strict(0x20);
    /// Set or clear `NBD_CMD_FLAG_PAYLOAD_LEN` automatically.
    pub const AUTO_FLAG: Strict = Strict(0x40);
    /// Every check (the default).
    pub const ALL: Strict = Strict(0x7f);
    /// No check: send what the caller asked for.
    pub const NONE: Strict = Strict(0);

    /// True if every switch in `other` is on.
    pub fn contains(self, other: Strict) -> bool {
        self.0 & other.0 == other.0
    }
}

impl Default for Strict {
    fn default() -> Self {
        Strict::ALL
    }
}

impl std::ops::BitOr for Strict {
    type Output = Strict;
    fn bitor(self, rhs: Strict) -> Strict {
        Strict(self.0 | rhs.0)
    }
}

impl std::ops::Sub for Strict {
    type Output = Strict;
    fn sub(self, rhs: Strict) -> Strict {
        Strict(self.0 & !rhs.0)
    }
}

/// Bounds on what a server can make the client hold in memory.
///
/// New limits may be added, so build one from the defaults and change the
/// fields you care about (a struct literal does not compile outside this
/// crate):
///
/// ```
/// let mut limits = nbd_core::Limits::default();
/// limits.max_in_flight = 16;
/// let mut cfg = nbd_core::Config::default();
/// cfg.limits = limits;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Most requests in flight at once (nbdcopy uses 64).
    pub max_in_flight: usize,
    /// Most payload bytes (reads plus writes) in flight at once.
    pub max_bytes_in_flight: u64,
    /// Largest read request (libnbd: 64 MiB).
    pub max_read: u64,
    /// Largest write payload when the server gave no maximum (the spec's
    /// interoperable default is 32 MiB); a server's advertised maximum is
    /// clamped to at most 64 MiB.
    pub default_max_write: u64,
    /// Most meta contexts kept from one LIST/SET_META_CONTEXT.
    pub max_meta_contexts: usize,
    /// Most memory, in bytes, the extents of one block-status chunk may
    /// take once parsed: `n * size_of::<Extent>()` (16 bytes an extent),
    /// allocated once when the chunk header arrives. Default 64 MiB, that
    /// is 2^22 extents: every payload up to 2^25 bytes fits (doc/proto.md,
    /// section "Structured reply chunk message": payloads up to 2^25 bytes
    /// SHOULD NOT be treated as a denial of service). A chunk announcing
    /// more ends the connection with
    /// [`crate::wire::WireError::OverLimit`] before any extent is read.
    ///
    /// [`Extent`]: crate::Extent
    pub max_extent_bytes: u64,
    /// Most error chunks (any reply type with bit 15 set) one request may
    /// receive before its `NBD_REPLY_FLAG_DONE` (default 65,536). Every
    /// other chunk type is bounded by the request already: data and holes
    /// by its length (each covers at least one byte, none twice), block
    /// status by the contexts negotiated (one chunk each), `NONE` by being
    /// last. Real servers send one error chunk per failed request (nbdkit,
    /// qemu-nbd); even one per KiB of a 64 MiB read stays under the
    /// default. Past it the connection ends with
    /// [`crate::ProtocolError::TooManyErrorChunks`].
    pub max_error_chunks: u32,
    /// Most exports one `NBD_OPT_LIST` may report (default 100,000; real
    /// servers list a handful). Past it the connection ends with
    /// [`crate::ProtocolError::ExportListTooLong`].
    pub max_exports: usize,
    /// Most bytes of export names and descriptions one `NBD_OPT_LIST` may
    /// report (default 64 MiB).
    pub max_export_list_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: 64,
            max_bytes_in_flight: 64 << 20,
            max_read: 64 << 20,
            default_max_write: 32 << 20,
            max_meta_contexts: 4096,
            max_exports: 100_000,
            max_export_list_bytes: 64 << 20,
            max_extent_bytes: 64 << 20,
            max_error_chunks: 1 << 16,
        }
    }
}

/// Everything a connection negotiates and enforces; build it before
/// creating a [`crate::Connection`]. Defaults follow libnbd's.
///
/// New settings may be added, so start from [`Config::default`] and change
/// the fields you need (`Config { opt_mode: true, ..Config::default() }`
/// does not compile outside this crate):
///
/// ```
/// let mut cfg = nbd_core::Config::default();
/// cfg.opt_mode = true;
/// cfg.export_name = "disk".into();
/// let conn = nbd_core::Connection::new(cfg, std::time::Instant::now());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Export to select (empty = the server's default export).
    pub export_name: String,
    /// Pause after the automatic options so the caller can drive
    /// negotiation with `opt_*` calls (libnbd's `set_opt_mode`).
    pub opt_mode: bool,
    /// Try `NBD_OPT_STRUCTURED_REPLY`; false also disables extended headers.
    pub request_structured_replies: bool,
    /// Try `NBD_OPT_EXTENDED_HEADERS` first.
    pub request_extended_headers: bool,
    /// Send `NBD_OPT_SET_META_CONTEXT` automatically before GO/INFO when
    /// contexts were added.
    pub request_meta_context: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE` in GO/INFO.
    pub request_block_size: bool,
    /// Also ask for `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`.
    pub full_info: bool,
    /// Meta contexts to select (for example `base:allocation`).
    pub meta_contexts: Vec<String>,
    /// Client flags offered; only those the server advertised are sent.
    pub handshake_flags: u32,
    /// TLS policy.
    pub tls: TlsMode,
    /// Strict-mode switches.
    pub strict: Strict,
    /// Memory limits.
    pub limits: Limits,
    /// How long connecting may take, from [`crate::Connection::new`] to
    /// the transmission phase: the greeting, every option, TLS (see
    /// [`crate::Connection::set_handshake_deadline`] to include the time
    /// spent before the core existed, such as the TCP connect). Only the
    /// time the server has the turn counts: in option mode the clock stops
    /// while the caller decides, and each option the caller sends gets the
    /// full timeout again. When it passes, the connection ends with
    /// [`crate::CloseReason::HandshakeTimedOut`], naming what it was
    /// waiting for. Default 30 s (libnbd has none: a server that accepts
    /// and never speaks blocks it forever); `None` waits forever.
    pub handshake_timeout: Option<Duration>,
    /// Deadline of every command, from its submission (more precisely,
    /// from the first time the adapter passes in after it, which adapters
    /// do at once). Default `None`: a trim or a cache of a large range
    /// may legitimately take long. Set one command's deadline with
    /// [`crate::Connection::set_deadline`]; what happens when it passes is
    /// [`Config::on_command_timeout`].
    pub command_timeout: Option<Duration>,
    /// What a missed command deadline does: fail that command and keep the
    /// connection (the default), or end the connection.
    pub on_command_timeout: TimeoutPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            export_name: String::new(),
            opt_mode: false,
            request_structured_replies: true,
            request_extended_headers: true,
            request_meta_context: true,
            request_block_size: true,
            full_info: false,
            meta_contexts: Vec::new(),
            handshake_flags: client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES,
            tls: TlsMode::Disable,
            strict: Strict::ALL,
            limits: Limits::default(),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            command_timeout: None,
            on_command_timeout: TimeoutPolicy::FailCommand,
        }
    }
}

impl Config {
    /// Convenience: a default configuration that also selects `base:allocation`.
    pub fn with_base_allocation() -> Self {
        Config {
            meta_contexts: vec![CONTEXT_BASE_ALLOCATION.to_owned()],
            ..Config::default()
        }
    }
}
