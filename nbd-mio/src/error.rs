//! The error type of the mio adapter.

use nbd_core::uri::UriError;
use nbd_core::UsageError;

/// Why a call of the mio adapter failed.
///
/// Failures *after* a connection exists (the socket breaks, the server hangs
/// up, breaks the protocol or refuses an option) are not errors of any call:
/// they arrive as [`nbd_core::Event`]s from
/// [`NbdConnection::poll_event`](crate::NbdConnection::poll_event), ending
/// with [`nbd_core::Event::Closed`]. This type covers what fails at once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket or registry call failed (creating the socket, connecting,
    /// registering with the `mio::Registry`).
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
    /// Something this adapter does not offer yet (vsock).
    #[error("not supported yet: {0}")]
    Unsupported(String),
    /// The TLS settings cannot work (TLS-PSK in a build without it).
    /// Failures during the session end it with `Event::Closed` instead;
    /// [`crate::NbdConnection::tls_error`] then has the typed cause.
    #[error("TLS: {0}")]
    Tls(#[from] nbd_driver::TlsError),
    /// The URI asks for something its [`nbd_driver::UriPolicy`] does not
    /// allow; nothing was connected.
    #[error("the URI is not allowed: {0}")]
    NotAllowed(String),
    /// A command was refused by the core before anything was sent (wrong
    /// phase, strict-mode check, in-flight limit...). Returned by the
    /// core's own methods; converted here so that `?` works for both.
    #[error(transparent)]
    Usage(#[from] UsageError),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
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

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Uri(_) | Error::Usage(_) => K::InvalidInput,
            Error::Unsupported(_) | Error::Tls(_) => K::Unsupported,
            Error::NotAllowed(_) => K::PermissionDenied,
        };
        match e {
            Error::Io { source, .. } => source,
            other => std::io::Error::new(kind, other),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
