//! The three kinds of error: the server broke the protocol
//! ([`ProtocolError`], fatal), the caller asked for something invalid
//! ([`UsageError`], returned at once), and the server reported a failure
//! ([`OptionError`], [`CommandError`], data that leaves the connection usable).

use std::fmt;

use crate::consts::{errno, rep};
use crate::event::OptionKind;
use crate::wire::reply::HeaderMode;
use crate::wire::WireError;

/// Escapes text from the server for display: control characters and
/// non-printables become `\xNN` / `\u{..}` escapes, so a hostile message
/// cannot forge terminal output.
pub fn escape_server_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            // Also the invisible format characters that reorder or hide
            // text on a terminal (bidi overrides, "Trojan Source").
            c if c.is_control()
                || matches!(c, '\u{61c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}')
                || matches!(c, '\u{2060}'..='\u{2069}' | '\u{feff}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// The server broke the protocol; the connection is over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A message had a malformed layout.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// An option reply echoed another option than the one sent.
    #[error("option reply is for option {got}, but option {sent} was sent")]
    WrongOptionEcho {
        /// Option sent.
        sent: u32,
        /// Option echoed by the server.
        got: u32,
    },
    /// A reply type that makes no sense for the option in flight.
    #[error("unexpected option reply type {reply_type:#x} to {option}")]
    UnexpectedOptionReply {
        /// Option in flight.
        option: OptionKind,
        /// Reply type received.
        reply_type: u32,
    },
    /// An option reply longer than this client accepts for its type.
    #[error("option reply of type {reply_type:#x} to {option} has length {len}, limit is {limit}")]
    OptionReplyTooLong {
        /// Option in flight.
        option: OptionKind,
        /// Reply type.
        reply_type: u32,
        /// Length announced.
        len: u32,
        /// Limit applied.
        limit: u32,
    },
    /// `NBD_REP_ACK` carried data.
    #[error("NBD_REP_ACK to {0} carries {1} bytes of data")]
    AckWithData(OptionKind, u32),
    /// GO/INFO was acknowledged without `NBD_INFO_EXPORT` before it.
    #[error("server acknowledged {0} without sending NBD_INFO_EXPORT")]
    MissingExportInfo(OptionKind),
    /// Transmission flags without `NBD_FLAG_HAS_FLAGS`.
    #[error("transmission flags {0:#06x} lack NBD_FLAG_HAS_FLAGS")]
    BadTransmissionFlags(u16),
    /// An oldstyle server set handshake flags.
    #[error("oldstyle server set handshake flags {0:#06x}")]
    OldstyleHandshakeFlags(u16),
    /// The export size does not fit in a signed 64-bit offset.
    #[error("export size {0} exceeds 2^63-1")]
    ExportTooLarge(u64),
    /// More meta contexts than the configured limit.
    #[error("server sent more than {0} meta contexts")]
    TooManyMetaContexts(usize),
    /// An `NBD_OPT_LIST` reply went past [`crate::Limits::max_exports`]
    /// exports or [`crate::Limits::max_export_list_bytes`] bytes of names
    /// and descriptions.
    #[error(
        "the server listed more than {max_exports} exports or {max_bytes} bytes of names \
         and descriptions (at export {exports}, {bytes} bytes)"
    )]
    ExportListTooLong {
        /// Exports received so far, the one that broke the limit included.
        exports: usize,
        /// Bytes of names and descriptions so far.
        bytes: u64,
        /// The configured count limit.
        max_exports: usize,
        /// The configured byte limit.
        max_bytes: u64,
    },
    /// A second acknowledgement of STARTTLS once TLS is running.
    #[error("server acknowledged STARTTLS although TLS is already running")]
    StartTlsTwice,
    /// A reply named a cookie that is not in flight.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    /// A chunk header announced a payload longer than any legal chunk of
    /// its type can be for the request (spec "Structured reply chunk
    /// message"); caught on the header, before any payload is awaited.
    #[error("reply to cookie {cookie:#x}: chunk of type {chunk_type} announces {length} bytes, at most {limit} are possible")]
    ChunkTooLong {
        /// Cookie of the request.
        cookie: u64,
        /// Chunk type.
        chunk_type: u16,
        /// Length announced.
        length: u64,
        /// Longest legal length.
        limit: u64,
    },
    /// A chunk type the request cannot receive: unknown, or meant for
    /// another command (spec "Structured reply types": a client MUST
    /// treat an unexpected non-error type as a protocol violation).
    #[error("reply to {command} (cookie {cookie:#x}): unexpected chunk type {chunk_type}")]
    UnexpectedChunkType {
        /// Command name.
        command: &'static str,
        /// Cookie of the request.
        cookie: u64,
        /// Chunk type received.
        chunk_type: u16,
    },
    /// A block status chunk type that belongs to the other header mode
    /// (`NBD_REPLY_TYPE_BLOCK_STATUS` needs compact headers,
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` extended headers).
    #[error("reply to cookie {cookie:#x}: chunk type {chunk_type} is not allowed in {} mode", .mode.name())]
    ChunkTypeWrongMode {
        /// Cookie of the request.
        cookie: u64,
        /// Chunk type received.
        chunk_type: u16,
        /// The negotiated header mode.
        mode: HeaderMode,
    },
    /// `NBD_REPLY_TYPE_NONE` with a payload, or without `NBD_REPLY_FLAG_DONE`.
    #[error("reply to cookie {cookie:#x}: NBD_REPLY_TYPE_NONE with {length} payload bytes, done flag {done}")]
    BadNoneChunk {
        /// Cookie of the request.
        cookie: u64,
        /// Payload length announced.
        length: u64,
        /// Whether `NBD_REPLY_FLAG_DONE` was set.
        done: bool,
    },
    /// An extended reply header echoed another offset than the request's.
    #[error("reply to cookie {cookie:#x}: extended reply offset {got} differs from the request's {expected}")]
    ReplyOffsetMismatch {
        /// Cookie of the request.
        cookie: u64,
        /// The request's offset.
        expected: u64,
        /// The offset in the reply header.
        got: u64,
    },
    /// A simple reply with data answered a read although structured
    /// replies were negotiated (spec: the server MUST use structured
    /// replies for reads then).
    #[error("reply to cookie {cookie:#x}: simple reply with data to a read in structured mode")]
    SimpleReplyToStructuredRead {
        /// Cookie of the read.
        cookie: u64,
    },
    /// A read chunk (data or hole) reaches outside the request.
    #[error("reply to cookie {cookie:#x}: chunk at offset {offset} length {length} lies outside the request ({request_offset}+{request_length})")]
    ChunkOutOfRange {
        /// Cookie of the read.
        cookie: u64,
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        length: u64,
        /// The request's offset.
        request_offset: u64,
        /// The request's length.
        request_length: u64,
    },
    /// A read chunk overlaps one received before (the spec forbids
    /// sending any byte twice).
    #[error("reply to cookie {cookie:#x}: chunk at offset {offset} length {length} overlaps an earlier chunk")]
    ChunkOverlap {
        /// Cookie of the read.
        cookie: u64,
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        length: u64,
    },
    /// A read with `NBD_CMD_FLAG_DF` got more than one content chunk.
    #[error("reply to cookie {cookie:#x}: more than one content chunk for a read with DF")]
    FragmentedDfRead {
        /// Cookie of the read.
        cookie: u64,
    },
    /// A successful read ended (`NBD_REPLY_FLAG_DONE`) without its whole
    /// range covered by data and holes.
    #[error(
        "reply to cookie {cookie:#x}: read completed but covers only {covered} of {length} bytes"
    )]
    ReadIncomplete {
        /// Cookie of the read.
        cookie: u64,
        /// Bytes covered.
        covered: u64,
        /// Bytes requested.
        length: u64,
    },
    /// An `NBD_REPLY_TYPE_ERROR_OFFSET` offset outside the request.
    #[error("reply to cookie {cookie:#x}: error offset {offset} lies outside the request")]
    ErrorOffsetOutOfRange {
        /// Cookie of the request.
        cookie: u64,
        /// The offset given.
        offset: u64,
    },
    /// Block status for a context id that was not negotiated.
    #[error("reply to cookie {cookie:#x}: block status for unknown context id {context}")]
    UnknownContextId {
        /// Cookie of the request.
        cookie: u64,
        /// The context id.
        context: u32,
    },
    /// Two block status chunks for the same context in one reply.
    #[error("reply to cookie {cookie:#x}: two block status chunks for context {context}")]
    DuplicateContext {
        /// Cookie of the request.
        cookie: u64,
        /// The context id.
        context: u32,
    },
    /// A block status chunk without any extent.
    #[error("reply to cookie {cookie:#x}: block status chunk without extents")]
    NoExtents {
        /// Cookie of the request.
        cookie: u64,
    },
    /// `NBD_CMD_FLAG_REQ_ONE` answered with more than one extent, or with
    /// one longer than the request.
    #[error("reply to cookie {cookie:#x}: REQ_ONE answered with {count} extents, the first {first_length} bytes long, for a request of {request_length}")]
    ReqOneViolated {
        /// Cookie of the request.
        cookie: u64,
        /// Extents received.
        count: usize,
        /// Length of the first extent.
        first_length: u64,
        /// The request's length.
        request_length: u64,
    },
    /// Extents before the last one already cover the whole request (only
    /// the last extent may reach past its end).
    #[error("reply to cookie {cookie:#x}: extents run past the request: the first {count} sum to {sum}, the request has {request_length}")]
    ExtentsPastRequest {
        /// Cookie of the request.
        cookie: u64,
        /// Extents before the last.
        count: usize,
        /// Their total length.
        sum: u64,
        /// The request's length.
        request_length: u64,
    },
    /// One request received more error chunks than
    /// [`crate::Limits::max_error_chunks`] without the chunk that ends its
    /// reply (`NBD_REPLY_FLAG_DONE`): a server that never finishes.
    #[error(
        "reply to cookie {cookie:#x}: {count} error chunks without the done flag, \
         the limit is {limit}"
    )]
    TooManyErrorChunks {
        /// Cookie of the request.
        cookie: u64,
        /// Error chunks received for it, the one past the limit included.
        count: u64,
        /// The configured limit.
        limit: u32,
    },
    /// The server sent data when the client expected none.
    #[error("server sent {0} unexpected bytes")]
    UnexpectedData(usize),
}

/// Option-phase error reply type (`NBD_REP_ERR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RepError {
    /// `NBD_REP_ERR_UNSUP`.
    Unsup,
    /// `NBD_REP_ERR_POLICY`.
    Policy,
    /// `NBD_REP_ERR_INVALID`.
    Invalid,
    /// `NBD_REP_ERR_PLATFORM`.
    Platform,
    /// `NBD_REP_ERR_TLS_REQD`.
    TlsReqd,
    /// `NBD_REP_ERR_UNKNOWN`.
    Unknown,
    /// `NBD_REP_ERR_SHUTDOWN`.
    Shutdown,
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
    BlockSizeReqd,
    /// `NBD_REP_ERR_TOO_BIG`.
    TooBig,
    /// `NBD_REP_ERR_EXT_HEADER_REQD`.
    ExtHeaderReqd,
    /// An error type this client does not know (bit 31 set).
    Other(u32),
}

impl RepError {
    /// Decodes an error reply type (bit 31 set).
    pub fn from_wire(t: u32) -> RepError {
        match t {
            rep::ERR_UNSUP => RepError::Unsup,
            rep::ERR_POLICY => RepError::Policy,
            rep::ERR_INVALID => RepError::Invalid,
            rep::ERR_PLATFORM => RepError::Platform,
            rep::ERR_TLS_REQD => RepError::TlsReqd,
            rep::ERR_UNKNOWN => RepError::Unknown,
            rep::ERR_SHUTDOWN => RepError::Shutdown,
            rep::ERR_BLOCK_SIZE_REQD => RepError::BlockSizeReqd,
            rep::ERR_TOO_BIG => RepError::TooBig,
            rep::ERR_EXT_HEADER_REQD => RepError::ExtHeaderReqd,
            other => RepError::Other(other),
        }
    }

    /// The spec's name of this error.
    pub fn name(self) -> String {
        match self {
            RepError::Unsup => "NBD_REP_ERR_UNSUP".into(),
            RepError::Policy => "NBD_REP_ERR_POLICY".into(),
            RepError::Invalid => "NBD_REP_ERR_INVALID".into(),
            RepError::Platform => "NBD_REP_ERR_PLATFORM".into(),
            RepError::TlsReqd => "NBD_REP_ERR_TLS_REQD".into(),
            RepError::Unknown => "NBD_REP_ERR_UNKNOWN".into(),
            RepError::Shutdown => "NBD_REP_ERR_SHUTDOWN".into(),
            RepError::BlockSizeReqd => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
            RepError::TooBig => "NBD_REP_ERR_TOO_BIG".into(),
            RepError::ExtHeaderReqd => "NBD_REP_ERR_EXT_HEADER_REQD".into(),
            RepError::Other(t) => format!("unknown option error {t:#010x}"),
        }
    }

    /// The errno libnbd reports for this error, if any.
    pub fn errno(self) -> Option<i32> {
        match self {
            RepError::Unsup | RepError::TlsReqd => Some(95), // ENOTSUP
            RepError::Invalid | RepError::TooBig | RepError::BlockSizeReqd => Some(22),
            RepError::Unknown => Some(2),    // ENOENT
            RepError::Shutdown => Some(108), // ESHUTDOWN
            _ => None,
        }
    }

    /// The closest `std::io::ErrorKind`.
    pub fn io_kind(self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self {
            RepError::Unsup | RepError::TlsReqd | RepError::Platform | RepError::ExtHeaderReqd => {
                K::Unsupported
            }
            RepError::Policy => K::PermissionDenied,
            RepError::Invalid | RepError::TooBig | RepError::BlockSizeReqd => K::InvalidInput,
            RepError::Unknown => K::NotFound,
            RepError::Shutdown => K::ConnectionAborted,
            RepError::Other(_) => K::Other,
        }
    }
}

/// The server refused an option: its error type and its message. Built by
/// the connection (fields may be added); read it in
/// [`crate::Event::OptionError`] and [`crate::CloseReason::NegotiationFailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OptionError {
    /// Error type.
    pub reply: RepError,
    /// The server's message, unescaped (may be empty).
    pub message: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server replied {}", self.reply.name())?;
        if !self.message.is_empty() {
            write!(f, ": {}", escape_server_text(&self.message))?;
        }
        Ok(())
    }
}

impl std::error::Error for OptionError {}

/// An NBD error value from a simple reply or an error chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NbdErrno(pub u32);

impl NbdErrno {
    /// The POSIX errno this value stands for (unknown values mean EINVAL, rule 103).
    pub fn errno(self) -> i32 {
        match self.0 {
            errno::EPERM => 1,
            errno::EIO => 5,
            errno::ENOMEM => 12,
            errno::EINVAL => 22,
            errno::ENOSPC => 28,
            errno::EOVERFLOW => 75,
            errno::ENOTSUP => 95,
            errno::ESHUTDOWN => 108,
            _ => 22,
        }
    }

    /// The spec's name of the value.
    pub fn name(self) -> &'static str {
        match self.0 {
            errno::EPERM => "EPERM",
            errno::EIO => "EIO",
            errno::ENOMEM => "ENOMEM",
            errno::EINVAL => "EINVAL",
            errno::ENOSPC => "ENOSPC",
            errno::EOVERFLOW => "EOVERFLOW",
            errno::ENOTSUP => "ENOTSUP",
            errno::ESHUTDOWN => "ESHUTDOWN",
            _ => "EINVAL (unknown error value)",
        }
    }

    /// The closest `std::io::ErrorKind`.
    pub fn io_kind(self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self.0 {
            errno::EPERM => K::PermissionDenied,
            errno::EIO => K::Other,
            errno::ENOMEM => K::OutOfMemory,
            errno::ENOSPC => K::StorageFull,
            errno::EOVERFLOW => K::InvalidInput,
            errno::ENOTSUP => K::Unsupported,
            errno::ESHUTDOWN => K::ConnectionAborted,
            _ => K::InvalidInput,
        }
    }
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The server reported an error for this request.
    #[error("server error {}{}{}", .errno.name(),
        .offset.map(|o| format!(" at offset {o}")).unwrap_or_default(),
        .message.as_deref().map(|m| format!(": {}", escape_server_text(m))).unwrap_or_default())]
    Server {
        /// The NBD error value.
        errno: NbdErrno,
        /// The server's message, if it sent one.
        message: Option<String>,
        /// The offset of the failure (ERROR_OFFSET chunks).
        offset: Option<u64>,
    },
    /// The connection ended before the reply arrived.
    #[error("connection closed before the reply arrived: {0}")]
    ConnectionClosed(String),
    /// The command's deadline passed before its reply arrived
    /// ([`crate::Config::command_timeout`], [`crate::Connection::set_deadline`]).
    /// The server may still carry it out: a timed-out write may have
    /// been applied, or may be applied later.
    #[error("{command} timed out: its deadline passed before the server replied")]
    TimedOut {
        /// The command, by its spec name (`NBD_CMD_READ`, ...).
        command: &'static str,
    },
    /// The caller cancelled the command ([`crate::Connection::cancel`])
    /// before its reply arrived. As for a timeout, the server may still
    /// carry it out.
    #[error("{command} was cancelled before the server replied")]
    Cancelled {
        /// The command, by its spec name.
        command: &'static str,
    },
}

impl CommandError {
    /// The closest `std::io::ErrorKind`.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        match self {
            CommandError::Server { errno, .. } => errno.io_kind(),
            CommandError::ConnectionClosed(_) => std::io::ErrorKind::NotConnected,
            CommandError::TimedOut { .. } => std::io::ErrorKind::TimedOut,
            // Not `Interrupted`: std's read loops retry on that.
            CommandError::Cancelled { .. } => std::io::ErrorKind::Other,
        }
    }

    /// The POSIX errno libnbd would report.
    pub fn errno(&self) -> i32 {
        match self {
            CommandError::Server { errno, .. } => errno.errno(),
            CommandError::ConnectionClosed(_) => 107, // ENOTCONN
            CommandError::TimedOut { .. } => 110,     // ETIMEDOUT
            CommandError::Cancelled { .. } => 125,    // ECANCELED
        }
    }
}

/// The caller asked for something the connection cannot do now; nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// The call is not allowed in the connection's current phase.
    #[error("invalid state: {call} needs the connection to be {needed}, but it is {actual}")]
    WrongPhase {
        /// The call.
        call: &'static str,
        /// What it needs.
        needed: &'static str,
        /// The current phase.
        actual: &'static str,
    },
    /// The server cannot do this (for example LIST on a non-fixed newstyle server).
    #[error("{0}")]
    Unsupported(String),
    /// A string argument longer than 4096 bytes, or containing NUL (rule 1).
    #[error("{what} is too long or contains NUL ({len} bytes)")]
    BadString {
        /// Which argument.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A meta context query without a `namespace:` prefix (rule 40).
    #[error("meta context query {0:?} does not start with 'namespace:'")]
    BadQuery(String),
    /// The server did not advertise this command or flag (strict mode).
    #[error("server does not support {0}")]
    NotAdvertised(&'static str),
    /// Writes to a read-only export (strict mode).
    #[error("server does not support write operations (export is read-only)")]
    ReadOnly,
    /// A flag that does not belong to this command (strict mode).
    #[error("invalid flags {flags:#x} for {command}")]
    BadFlags {
        /// The command.
        command: &'static str,
        /// The flags given.
        flags: u16,
    },
    /// Past the end of the export (strict mode).
    #[error("request out of bounds: offset {offset} + length {length} > export size {size}")]
    OutOfBounds {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// Zero-length request (strict mode).
    #[error("zero-length request")]
    ZeroLength,
    /// Not aligned to the minimum block size (strict mode).
    #[error("request is not aligned to the server's minimum block size {0}")]
    Misaligned(u32),
    /// Longer than this client or the server accepts.
    #[error("request length {length} exceeds the maximum {max}")]
    TooLarge {
        /// Length asked.
        length: u64,
        /// Limit.
        max: u64,
    },
    /// The cookie names no command the caller still awaits: it completed
    /// (its [`crate::Event::CommandDone`] may still be queued), or it never
    /// existed on this connection.
    #[error("no command with cookie {:#x} is in flight", .0.0)]
    NotInFlight(crate::Cookie),
    /// Submitting now would pass the in-flight limits; wait for a completion.
    #[error("too many requests in flight ({requests} requests, {bytes} bytes)")]
    InFlightLimit {
        /// Requests in flight.
        requests: usize,
        /// Payload bytes in flight.
        bytes: u64,
    },
    /// A read buffer's length does not match the requested length.
    #[error("read buffer holds {0} bytes; size it to the read length first")]
    BufferLength(usize),
    /// The meta context is not negotiated.
    #[error("meta context {0:?} was not negotiated")]
    UnknownContext(String),
}

/// A command that carries a buffer was refused: the [`UsageError`] says
/// why, and the buffer comes back unchanged so the caller can reuse it.
///
/// Returned by [`crate::Connection::read`] and
/// [`crate::Connection::read_with_chunks`] (`Refused<BytesMut>`) and by
/// [`crate::Connection::write`] (`Refused<Bytes>`). Nothing was sent. Match
/// on [`Refused::error`], take both parts with [`Refused::into_parts`], or
/// turn it into the plain [`UsageError`] with `?`/`From` when the buffer
/// is not wanted.
pub struct Refused<B> {
    /// Why the command was refused.
    pub error: UsageError,
    /// The caller's buffer, handed back.
    pub buffer: B,
}

impl<B> Refused<B> {
    /// Why the command was refused.
    pub fn error(&self) -> &UsageError {
        &self.error
    }

    /// The error and the buffer.
    pub fn into_parts(self) -> (UsageError, B) {
        (self.error, self.buffer)
    }

    /// The buffer, dropping the error.
    pub fn into_buffer(self) -> B {
        self.buffer
    }
}

impl<B: AsRef<[u8]>> fmt::Debug for Refused<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The buffer may be megabytes: show its size, not its bytes.
        f.debug_struct("Refused")
            .field("error", &self.error)
            .field("buffer_len", &self.buffer.as_ref().len())
            .finish()
    }
}

impl<B> fmt::Display for Refused<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<B: AsRef<[u8]>> std::error::Error for Refused<B> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl<B> From<Refused<B>> for UsageError {
    fn from(r: Refused<B>) -> UsageError {
        r.error
    }
}

impl From<CommandError> for std::io::Error {
    /// A failed command as an `io::Error` of the closest kind (the server's
    /// errno mapped as libnbd maps it), for `Read`/`Write` adapters and `?`
    /// in functions returning `io::Result`.
    fn from(e: CommandError) -> Self {
        std::io::Error::new(e.io_kind(), e)
    }
}

impl From<UsageError> for std::io::Error {
    /// A refused call as an `io::Error`: `PermissionDenied` for a write to
    /// a read-only export (libnbd's EPERM), `InvalidInput` otherwise.
    fn from(e: UsageError) -> Self {
        let kind = match e {
            UsageError::ReadOnly => std::io::ErrorKind::PermissionDenied,
            _ => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, e)
    }
}

impl From<ProtocolError> for std::io::Error {
    /// A protocol violation by the server as `InvalidData`.
    fn from(e: ProtocolError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

#[cfg(test)]
mod io_error_tests {
    use super::*;

    #[test]
    fn errors_convert_to_io_errors_of_the_closest_kind() {
        let e: std::io::Error = CommandError::Server {
            errno: NbdErrno(28),
            message: None,
            offset: None,
        }
        .into();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
        let e: std::io::Error = UsageError::ReadOnly.into();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        let e: std::io::Error = UsageError::ZeroLength.into();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let e: std::io::Error = ProtocolError::UnknownCookie(7).into();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.get_ref().is_some_and(|inner| inner.is::<ProtocolError>()));
    }
}
