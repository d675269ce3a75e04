//! The one error type of the blocking client.

use nbd_core::uri::UriError;
use nbd_core::{CloseReason, CommandError, OptionError, OptionKind, UsageError};

/// Why a call of the blocking client failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call was invalid now (wrong phase, strict-mode violation, ...);
    /// nothing was sent and the connection is unchanged. Only while the
    /// connection is alive: once it has ended, a call that needs it is
    /// [`Error::Closed`] instead, even one in the wrong phase.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The server refused an option; in option mode the connection stays usable.
    #[error("{option}: {error}")]
    Option {
        /// The option.
        option: OptionKind,
        /// The server's error and message.
        error: OptionError,
    },
    /// The server reported an error for a command; the connection stays
    /// usable. Also a command that was in flight when the connection ended
    /// ([`CommandError::ConnectionClosed`]); later calls then get
    /// [`Error::Closed`].
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The connection is over, with the reason it ended: cleanly
    /// ([`CloseReason::Disconnected`] after `shutdown`,
    /// [`CloseReason::Aborted`] after `opt_abort`) or not (the server hung
    /// up or broke the protocol, negotiation failed, the socket failed...).
    ///
    /// Returned by the call that was waiting on the server when it ended,
    /// and then by every later call that needs the connection (`opt_*`,
    /// `set_export_name`, `aio_*` and blocking commands), whether the end was
    /// clean or not; a clean end is not an error for `shutdown` itself.
    #[error("{0}")]
    Closed(CloseReason),
    /// The socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The URI could not be parsed.
    #[error("invalid NBD URI: {0}")]
    Uri(#[from] UriError),
    /// A feature this client does not offer yet.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// TLS failed: the server's certificate was rejected, the server
    /// refused the session or asked for a client certificate, the
    /// credentials could not be loaded... The connection is over.
    #[error("TLS: {0}")]
    Tls(#[from] nbd_driver::TlsError),
    /// The URI asks for something its [`nbd_driver::UriPolicy`] does not
    /// allow; nothing was connected.
    #[error("the URI is not allowed: {0}")]
    NotAllowed(String),
}

impl Error {
    /// The closest `std::io::ErrorKind`.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self {
            // libnbd: writes to a read-only export fail with EPERM.
            Error::Usage(UsageError::ReadOnly) => K::PermissionDenied,
            Error::Usage(_) | Error::Uri(_) => K::InvalidInput,
            Error::Option { error, .. } => error.reply.io_kind(),
            Error::Command(e) => e.io_kind(),
            Error::Closed(r) => r.io_kind(),
            Error::Io { source, .. } => source.kind(),
            Error::Unsupported(_) => K::Unsupported,
            Error::Tls(nbd_driver::TlsError::PskUnsupported(_)) => K::Unsupported,
            Error::Tls(_) => K::PermissionDenied,
            Error::NotAllowed(_) => K::PermissionDenied,
        }
    }

    /// True if the connection can no longer be used.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::Closed(_) | Error::Io { .. } | Error::Tls(_))
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, .. } => source,
            other => std::io::Error::new(other.io_kind(), other),
        }
    }
}

impl From<nbd_driver::ConnectError> for Error {
    fn from(e: nbd_driver::ConnectError) -> Self {
        use nbd_driver::ConnectError as C;
        match e {
            C::Uri(u) => Error::Uri(u),
            C::Unsupported(m) => Error::Unsupported(m),
            C::Io { context, source } => Error::Io { context, source },
            C::NotAllowed(m) => Error::NotAllowed(m),
            C::Tls(t) => Error::Tls(t),
            other => Error::Unsupported(other.to_string()),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
