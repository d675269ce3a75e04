//! The one error type of the tokio client.

use nbd_core::uri::UriError;
use nbd_core::{CloseReason, CommandError, OptionError, OptionKind, UsageError};

/// Why a call of the tokio client failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call was invalid now (wrong phase, out of bounds, strict-mode
    /// violation, ...); nothing was sent and the connection is unchanged.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The server refused an option; in option mode the connection stays
    /// usable.
    #[error("{option}: {error}")]
    Option {
        /// The option.
        option: OptionKind,
        /// The server's error and message.
        error: OptionError,
    },
    /// The command failed: the server reported an error, it timed out
    /// ([`CommandError::TimedOut`]), or the connection ended while it was
    /// in flight ([`CommandError::ConnectionClosed`]). Except for the last
    /// one, the connection stays usable.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The connection is over, with the reason it ended. Returned by every
    /// call made after the end, and by the connection task itself when the
    /// end was not clean.
    #[error("{0}")]
    Closed(CloseReason),
    /// The connection task is gone (it was dropped or its runtime shut
    /// down) without reporting how the connection ended.
    #[error("the NBD connection task is not running")]
    TaskGone,
    /// A socket call failed before the connection existed (connecting,
    /// registering with the reactor).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error, shared so that the error can be cloned.
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    /// The URI could not be parsed.
    #[error("invalid NBD URI: {0}")]
    Uri(#[from] UriError),
    /// A feature this client does not offer yet (TLS, vsock).
    #[error("not supported: {0}")]
    Unsupported(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source: std::sync::Arc::new(source),
        }
    }

    /// The closest `std::io::ErrorKind`: `TimedOut` for every deadline
    /// (handshake or command), `NotConnected` once the connection is gone.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self {
            Error::Usage(UsageError::ReadOnly) => K::PermissionDenied,
            Error::Usage(_) | Error::Uri(_) => K::InvalidInput,
            Error::Option { error, .. } => error.reply.io_kind(),
            Error::Command(e) => e.io_kind(),
            Error::Closed(r) => r.io_kind(),
            Error::TaskGone => K::NotConnected,
            Error::Io { source, .. } => source.kind(),
            Error::Unsupported(_) => K::Unsupported,
        }
    }

    /// True if the connection can no longer be used.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Closed(_)
                | Error::TaskGone
                | Error::Io { .. }
                | Error::Command(CommandError::ConnectionClosed(_))
        )
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::new(e.io_kind(), e)
    }
}

impl From<nbd_driver::ConnectError> for Error {
    fn from(e: nbd_driver::ConnectError) -> Self {
        use nbd_driver::ConnectError as C;
        match e {
            C::Uri(u) => Error::Uri(u),
            C::Unsupported(m) => Error::Unsupported(m),
            C::Io { context, source } => Error::io(context, source),
            other => Error::Unsupported(other.to_string()),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
