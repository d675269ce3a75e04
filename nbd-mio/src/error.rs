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
    /// Something this adapter does not offer yet (TLS, vsock).
    #[error("not supported yet: {0}")]
    Unsupported(String),
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

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
