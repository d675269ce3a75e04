//! What the core tells its adapter: events that happened, and the facts
//! negotiated with the server.

use std::fmt;

use bytes::BytesMut;

use crate::consts::{opt, transmission_flags as tf};
use crate::error::{CommandError, OptionError, ProtocolError};

/// An option of the negotiation phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OptionKind {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName,
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info,
    /// `NBD_OPT_GO`.
    Go,
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext,
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext,
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
}

impl OptionKind {
    /// The option's number on the wire.
    pub fn code(self) -> u32 {
        match self {
            OptionKind::ExportName => opt::EXPORT_NAME,
            OptionKind::Abort => opt::ABORT,
            OptionKind::List => opt::LIST,
            OptionKind::StartTls => opt::STARTTLS,
            OptionKind::Info => opt::INFO,
            OptionKind::Go => opt::GO,
            OptionKind::StructuredReply => opt::STRUCTURED_REPLY,
            OptionKind::ListMetaContext => opt::LIST_META_CONTEXT,
            OptionKind::SetMetaContext => opt::SET_META_CONTEXT,
            OptionKind::ExtendedHeaders => opt::EXTENDED_HEADERS,
        }
    }

    /// The spec's name.
    pub fn name(self) -> &'static str {
        match self {
            OptionKind::ExportName => "NBD_OPT_EXPORT_NAME",
            OptionKind::Abort => "NBD_OPT_ABORT",
            OptionKind::List => "NBD_OPT_LIST",
            OptionKind::StartTls => "NBD_OPT_STARTTLS",
            OptionKind::Info => "NBD_OPT_INFO",
            OptionKind::Go => "NBD_OPT_GO",
            OptionKind::StructuredReply => "NBD_OPT_STRUCTURED_REPLY",
            OptionKind::ListMetaContext => "NBD_OPT_LIST_META_CONTEXT",
            OptionKind::SetMetaContext => "NBD_OPT_SET_META_CONTEXT",
            OptionKind::ExtendedHeaders => "NBD_OPT_EXTENDED_HEADERS",
        }
    }
}

impl fmt::Display for OptionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifies one request in flight; unique among the requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

/// The handshake style the server used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// Oldstyle: no options, straight to transmission.
    Oldstyle,
    /// Newstyle without `FIXED_NEWSTYLE`: only `NBD_OPT_EXPORT_NAME`.
    Newstyle,
    /// Fixed newstyle: every option.
    NewstyleFixed,
}

impl Protocol {
    /// libnbd's name for it (`get_protocol`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Oldstyle => "oldstyle",
            Protocol::Newstyle => "newstyle",
            Protocol::NewstyleFixed => "newstyle-fixed",
        }
    }
}

/// Block-size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size (alignment of every offset and length).
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size (`0xffffffff` = no fixed limit).
    pub maximum: u32,
}

impl BlockSize {
    /// Checks the spec's rules (and libnbd's): minimum a power of two up to
    /// 64 KiB, preferred a power of two at least max(minimum, 512), maximum at
    /// least preferred and a multiple of minimum (or `0xffffffff`).
    pub fn is_valid(&self) -> bool {
        let BlockSize {
            minimum,
            preferred,
            maximum,
        } = *self;
        minimum.is_power_of_two()
            && minimum <= 65536
            && preferred.is_power_of_two()
            && preferred >= minimum.max(512)
            && maximum >= preferred
            && (maximum == u32::MAX || maximum % minimum == 0)
    }
}

/// What the server told about an export (from GO, INFO, EXPORT_NAME or an
/// oldstyle greeting).
///
/// Fields may be added; it is built by the connection, read it with the
/// fields and the `can_*`/`is_*` methods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ExportInfo {
    /// The name the client asked for.
    pub name: String,
    /// `NBD_INFO_NAME`, if sent.
    pub canonical_name: Option<String>,
    /// `NBD_INFO_DESCRIPTION`, if sent.
    pub description: Option<String>,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags, with flags that make no sense in the negotiated
    /// mode cleared (DF without structured replies, FAST_ZERO without
    /// WRITE_ZEROES, BLOCK_STATUS_PAYLOAD without extended headers).
    pub flags: u16,
    /// Block-size constraints, if the server sent valid ones.
    pub block_size: Option<BlockSize>,
}

impl ExportInfo {
    fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
    /// `NBD_FLAG_READ_ONLY`.
    pub fn is_read_only(&self) -> bool {
        self.has(tf::READ_ONLY)
    }
    /// `NBD_FLAG_ROTATIONAL`.
    pub fn is_rotational(&self) -> bool {
        self.has(tf::ROTATIONAL)
    }
    /// `NBD_FLAG_SEND_FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.has(tf::SEND_FLUSH)
    }
    /// `NBD_FLAG_SEND_FUA`.
    pub fn can_fua(&self) -> bool {
        self.has(tf::SEND_FUA)
    }
    /// `NBD_FLAG_SEND_TRIM`.
    pub fn can_trim(&self) -> bool {
        self.has(tf::SEND_TRIM)
    }
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub fn can_zero(&self) -> bool {
        self.has(tf::SEND_WRITE_ZEROES)
    }
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub fn can_fast_zero(&self) -> bool {
        self.has(tf::SEND_FAST_ZERO)
    }
    /// `NBD_FLAG_SEND_DF`.
    pub fn can_df(&self) -> bool {
        self.has(tf::SEND_DF)
    }
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub fn can_multi_conn(&self) -> bool {
        self.has(tf::CAN_MULTI_CONN)
    }
    /// `NBD_FLAG_SEND_CACHE`.
    pub fn can_cache(&self) -> bool {
        self.has(tf::SEND_CACHE)
    }
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
    pub fn can_block_status_payload(&self) -> bool {
        self.has(tf::BLOCK_STATUS_PAYLOAD)
    }
}

/// Why the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT` and the server acknowledged or closed.
    Aborted,
    /// The client sent `NBD_CMD_DISC` and the server closed.
    Disconnected,
    /// The server closed the connection during the handshake or option
    /// negotiation, when the protocol did not allow it (for example after
    /// a failed option). Transmission-phase ends are
    /// [`CloseReason::ServerClosed`].
    ServerKilledConnection {
        /// What the client was waiting for.
        during: String,
    },
    /// The server broke the protocol; the client hung up.
    Protocol(ProtocolError),
    /// Negotiation failed (automatic mode): the server refused an option the
    /// connection cannot do without, and the client sent `NBD_OPT_ABORT`.
    NegotiationFailed {
        /// The option refused.
        option: OptionKind,
        /// The server's error.
        error: OptionError,
    },
    /// TLS was required but the server cannot do it.
    TlsRequired(String),
    /// The server ended the transmission phase before the client sent
    /// `NBD_CMD_DISC`: it closed the connection, or the transport failed
    /// (for example a reset) as reported by the adapter. The requests in
    /// flight, `lost` of them, completed with
    /// [`crate::CommandError::ConnectionClosed`].
    ///
    /// With `lost == 0` nothing was lost: every request the caller issued
    /// had completed, so a finished job is still finished. Ask
    /// [`CloseReason::is_loss`]; [`crate::Connection::disconnect`] on such
    /// a connection returns `Ok(())`.
    ServerClosed {
        /// Requests in flight that the end failed.
        lost: usize,
        /// The adapter's transport error, when the end was one (`None`
        /// for a plain end of file).
        transport_error: Option<String>,
    },
    /// The transport failed (reported by the adapter) before the
    /// transmission phase.
    Transport(String),
    /// The handshake deadline ([`crate::Config::handshake_timeout`])
    /// passed while the client was waiting for the server.
    HandshakeTimedOut {
        /// What the client was waiting for ("the reply to NBD_OPT_GO", ...).
        waiting_for: String,
    },
    /// A command missed its deadline under
    /// [`crate::TimeoutPolicy::CloseConnection`]. That command completed
    /// with [`crate::CommandError::TimedOut`], the `lost` other requests
    /// in flight with [`crate::CommandError::ConnectionClosed`].
    CommandTimedOut {
        /// The command, by its spec name.
        command: &'static str,
        /// Its cookie.
        cookie: Cookie,
        /// Other requests in flight that the end failed.
        lost: usize,
    },
    /// The caller ended the connection with [`crate::Connection::abort`]:
    /// nothing more was sent or read, and the `lost` requests in flight
    /// completed with [`crate::CommandError::ConnectionClosed`].
    AbortedByCaller {
        /// The caller's reason.
        reason: String,
        /// Requests in flight that the end failed.
        lost: usize,
    },
}

impl CloseReason {
    /// True for the orderly ends the client asked for and the server
    /// honoured: [`CloseReason::Aborted`] (after `NBD_OPT_ABORT`) and
    /// [`CloseReason::Disconnected`] (after `NBD_CMD_DISC`, with every
    /// request completed). These are the ends that give
    /// [`crate::Phase::Closed`]; every other reason gives
    /// [`crate::Phase::Dead`]. Use it to tell "we hung up" from "something
    /// ended the connection".
    pub fn is_clean(&self) -> bool {
        matches!(self, CloseReason::Aborted | CloseReason::Disconnected)
    }

    /// True if the end cost the caller something: requests that failed
    /// because the connection ended, or a connection that never became
    /// usable (protocol violations, refused negotiation, TLS, transport or
    /// handshake failures). False for the clean ends and for
    /// [`CloseReason::ServerClosed`] with nothing in flight. Use it when
    /// deciding whether a job whose requests all completed may be
    /// reported as a success although the server hung up first.
    pub fn is_loss(&self) -> bool {
        match self {
            CloseReason::Aborted | CloseReason::Disconnected => false,
            CloseReason::ServerClosed { lost, .. } => *lost > 0,
            CloseReason::AbortedByCaller { lost, .. } => *lost > 0,
            _ => true,
        }
    }

    /// How many requests in flight the end failed, when the reason knows
    /// it: `Some(0)` for the clean ends, `Some(lost)` for
    /// [`CloseReason::ServerClosed`], `None` otherwise (the requests in
    /// flight, if any, completed with an error all the same).
    pub fn lost_requests(&self) -> Option<usize> {
        match self {
            CloseReason::Aborted | CloseReason::Disconnected => Some(0),
            CloseReason::ServerClosed { lost, .. } => Some(*lost),
            CloseReason::AbortedByCaller { lost, .. } => Some(*lost),
            CloseReason::CommandTimedOut { lost, .. } => Some(*lost + 1),
            _ => None,
        }
    }
}

impl CloseReason {
    /// The closest `std::io::ErrorKind`: `InvalidData` when the server
    /// broke the protocol, `TimedOut` when a deadline passed,
    /// `NotConnected` otherwise.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        match self {
            CloseReason::Protocol(_) => std::io::ErrorKind::InvalidData,
            CloseReason::HandshakeTimedOut { .. } | CloseReason::CommandTimedOut { .. } => {
                std::io::ErrorKind::TimedOut
            }
            _ => std::io::ErrorKind::NotConnected,
        }
    }
}

impl std::error::Error for CloseReason {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CloseReason::Protocol(e) => Some(e),
            CloseReason::NegotiationFailed { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Aborted => f.write_str("connection closed after NBD_OPT_ABORT"),
            CloseReason::Disconnected => f.write_str("connection closed after NBD_CMD_DISC"),
            CloseReason::ServerKilledConnection { during } => {
                write!(f, "server disconnected unexpectedly while {during}")
            }
            CloseReason::Protocol(e) => write!(f, "server broke the protocol: {e}"),
            CloseReason::NegotiationFailed { option, error } => {
                write!(f, "{option} failed: {error}")
            }
            CloseReason::ServerClosed {
                lost,
                transport_error,
            } => {
                match lost {
                    0 => {
                        f.write_str("server closed the connection while no request was in flight")?
                    }
                    1 => f.write_str("server closed the connection with 1 request in flight")?,
                    n => write!(
                        f,
                        "server closed the connection with {n} requests in flight"
                    )?,
                }
                match transport_error {
                    Some(e) => write!(f, " (transport error: {e})"),
                    None => Ok(()),
                }
            }
            CloseReason::TlsRequired(m) => write!(f, "TLS required: {m}"),
            CloseReason::Transport(m) => write!(f, "transport error: {m}"),
            CloseReason::HandshakeTimedOut { waiting_for } => {
                write!(f, "timed out waiting for {waiting_for}")
            }
            CloseReason::CommandTimedOut {
                command,
                cookie,
                lost,
            } => write!(
                f,
                "{command} (cookie {:#x}) timed out, so the connection was closed \
                 ({lost} other requests in flight failed)",
                cookie.0
            ),
            CloseReason::AbortedByCaller { reason, lost } => {
                write!(
                    f,
                    "aborted by the caller: {reason} ({lost} requests in flight failed)"
                )
            }
        }
    }
}

pub use crate::wire::reply::Extent;

/// Kind of a structured read chunk, reported when the read asked for chunk events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadChunkKind {
    /// `NBD_REPLY_TYPE_OFFSET_DATA` (or a simple reply's payload).
    Data,
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: reads as zeroes.
    Hole,
    /// An error chunk (`NBD_REPLY_TYPE_ERROR_OFFSET` carries an offset).
    Error,
}

/// Something that happened on the connection. Drain them with
/// [`crate::Connection::poll_event`] after every input and command.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// `NBD_OPT_LIST` found an export.
    ExportListed {
        /// Name to use with GO/INFO.
        name: String,
        /// Description (may be empty).
        description: String,
    },
    /// A meta context from LIST_META_CONTEXT (id 0) or SET_META_CONTEXT.
    MetaContext {
        /// The option that produced it.
        option: OptionKind,
        /// Context id (meaningful for SET only).
        id: u32,
        /// Context name.
        name: String,
    },
    /// An option requested by the caller ended with `NBD_REP_ACK`.
    OptionSucceeded(OptionKind),
    /// The server refused an option; negotiation can continue.
    OptionError {
        /// The option.
        option: OptionKind,
        /// The server's error and message.
        error: OptionError,
    },
    /// The server acknowledged STARTTLS: the adapter must run the TLS
    /// handshake now, then call [`crate::Connection::tls_established`].
    StartTls,
    /// The negotiation phase is over; the transmission phase begins.
    GoSucceeded(ExportInfo),
    /// A read completed a chunk (only for reads submitted with chunk events).
    ReadChunk {
        /// The read.
        cookie: Cookie,
        /// Absolute offset of the chunk.
        offset: u64,
        /// Length covered.
        length: u64,
        /// Data, hole or error.
        kind: ReadChunkKind,
    },
    /// Block status for one context of a BLOCK_STATUS request.
    BlockStatus {
        /// The request.
        cookie: Cookie,
        /// The context id.
        context_id: u32,
        /// Extents from the request's offset.
        extents: Vec<Extent>,
    },
    /// A command completed (successfully or not); exactly once per cookie.
    CommandDone {
        /// The request.
        cookie: Cookie,
        /// Outcome.
        result: Result<(), CommandError>,
        /// The read destination buffer, handed back (reads only).
        buffer: Option<BytesMut>,
    },
    /// The connection ended; no further events follow.
    Closed(CloseReason),
}

impl From<CloseReason> for std::io::Error {
    /// The end of a connection as an `io::Error`: `InvalidData` when the
    /// server broke the protocol, `TimedOut` when a deadline passed,
    /// `NotConnected` otherwise (the clean ends included: a call that
    /// needed the connection found it closed).
    fn from(r: CloseReason) -> Self {
        std::io::Error::new(r.io_kind(), r)
    }
}
