//! Encoders and parsers for every NBD message, one file per message family.
//!
//! Parsers take byte slices whose length the caller already knows from the
//! protocol (fixed-size headers, or a payload whose length came in a header
//! that was checked against a limit first). They never allocate more than the
//! slice they are given, never panic, and report malformed input as a
//! [`WireError`] that says what the server sent.
//!
//! Every parser is written with nom combinators over the streaming number
//! parsers (`nom::number::streaming`), so running out of input is always
//! nom's `Incomplete` ("need more") and never a guess. The public functions
//! run them through `run_exact` (the slice is the whole message: too
//! short or too long is [`WireError::BadLength`]) or `run_streaming` (the
//! slice is what has arrived so far: `None` means wait for more).

use nom::error::{ErrorKind, FromExternalError, ParseError};
use nom::{IResult, Parser};

pub mod handshake;
pub mod option;
pub mod reply;
pub mod request;

/// A message from the server does not follow the protocol's layout rules.
///
/// Each variant names what was wrong, with the offending values, so that the
/// error shown to a user says what the server did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The first 8 bytes were not `NBDMAGIC`.
    #[error("server is not an NBD server: bad initial magic {0:#018x}")]
    BadInitialMagic(u64),
    /// Bytes 8..16 were neither `IHAVEOPT` nor the oldstyle magic.
    #[error("server is neither an oldstyle nor a newstyle NBD server: magic {0:#018x}")]
    BadVersionMagic(u64),
    /// An option reply did not start with the option reply magic.
    #[error("bad option reply magic {0:#018x}")]
    BadOptionReplyMagic(u64),
    /// A reply in the transmission phase started with an unknown magic, or
    /// with a magic not allowed in the negotiated header mode.
    #[error("bad reply magic {magic:#010x} (negotiated mode: {mode})")]
    BadReplyMagic {
        /// The magic received.
        magic: u32,
        /// The header mode that was negotiated.
        mode: &'static str,
    },
    /// A payload's length does not fit its type.
    #[error("{what}: invalid length {len}")]
    BadLength {
        /// What was being parsed.
        what: &'static str,
        /// The length the server gave.
        len: u64,
    },
    /// A length field inside a payload points past the payload's end.
    #[error("{what}: inner length {inner} does not fit in payload of {outer} bytes")]
    InnerLengthOverflow {
        /// What was being parsed.
        what: &'static str,
        /// The inner length field's value.
        inner: u64,
        /// The length of the payload that should contain it.
        outer: u64,
    },
    /// A string was not valid UTF-8 or contained NUL.
    #[error("{0}: string is not valid UTF-8 or contains NUL")]
    BadString(&'static str),
    /// A field held a value the protocol forbids.
    #[error("{what}: invalid value {value}")]
    BadValue {
        /// What was being parsed.
        what: &'static str,
        /// The value received.
        value: u64,
    },
    /// A request header (seen by a test server or fuzzer) started with
    /// neither the compact nor the extended request magic.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// A length or count is above a limit this client sets on what it
    /// accepts; reported before anything is allocated for it.
    #[error("{what}: {len} is above the limit of {limit}")]
    OverLimit {
        /// What was being parsed.
        what: &'static str,
        /// The length or count the server gave.
        len: u64,
        /// The limit it exceeds.
        limit: u64,
    },
}

/// Error type of the nom parsers in this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fail {
    /// A nom combinator did not match. None of the parsers here use one
    /// that can (such as `tag` or `verify`); nom's `ParseError` needs the
    /// case, and the wrappers report it as a bad length.
    Mismatch,
    /// A check inside the parser (`map_res`) found a protocol violation.
    Wire(WireError),
}

impl<I> ParseError<I> for Fail {
    fn from_error_kind(_: I, _: ErrorKind) -> Self {
        Fail::Mismatch
    }

    fn append(_: I, _: ErrorKind, other: Self) -> Self {
        other
    }
}

impl<I> FromExternalError<I, WireError> for Fail {
    fn from_external_error(_: I, _: ErrorKind, e: WireError) -> Self {
        Fail::Wire(e)
    }
}

/// Result of the nom parsers in this module.
pub(crate) type PResult<'a, T> = IResult<&'a [u8], T, Fail>;

/// Big-endian integer parsers with the contract of
/// `nom::number::streaming::be_u16`/`be_u32`/`be_u64` (`Incomplete` with
/// the number of bytes missing when the input is short), used in their
/// place in every combinator here. They read with one load instead of
/// nom's byte-at-a-time loop behind a non-inlined call: with nom's, the
/// reply-header loop in `examples/reply_header_loop.rs` ran 2.9 times the
/// instructions.
macro_rules! be_parsers {
    ($($name:ident: $t:ty),*) => {$(
        #[doc = concat!("Parses a big-endian `", stringify!($t), "` (streaming).")]
        #[inline]
        pub(crate) fn $name(i: &[u8]) -> PResult<'_, $t> {
            const N: usize = std::mem::size_of::<$t>();
            match i.split_first_chunk::<N>() {
                Some((b, rest)) => Ok((rest, <$t>::from_be_bytes(*b))),
                None => Err(nom::Err::Incomplete(nom::Needed::new(N - i.len()))),
            }
        }
    )*};
}
be_parsers!(be_u16: u16, be_u32: u32, be_u64: u64);

/// Converts a slice length to the `u64` carried by [`WireError`] variants.
pub(crate) fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Runs `p` over `b`, which must be exactly one whole message.
///
/// Running out of input (nom's `Incomplete`), a mismatch, or bytes left
/// over give [`WireError::BadLength`] naming `what` and `b.len()`; an error
/// raised by a check inside `p` is returned as is.
#[inline]
pub(crate) fn run_exact<'a, T>(
    what: &'static str,
    b: &'a [u8],
    mut p: impl Parser<&'a [u8], Output = T, Error = Fail>,
) -> Result<T, WireError> {
    match p.parse(b) {
        Ok(([], v)) => Ok(v),
        Err(nom::Err::Error(Fail::Wire(e)) | nom::Err::Failure(Fail::Wire(e))) => Err(e),
        _ => Err(WireError::BadLength {
            what,
            len: len64(b.len()),
        }),
    }
}

/// Runs `p`, which reads exactly `N` bytes and checks nothing, over an
/// `N`-byte array, for parsers whose signature promises no error.
///
/// `p` cannot fail on such input; a layout mistake (reading more or fewer
/// than `N` bytes) fails a debug assertion, and gives `T::default()`
/// rather than a panic in release builds.
pub(crate) fn run_fixed<'a, const N: usize, T: Default>(
    b: &'a [u8; N],
    p: impl Parser<&'a [u8], Output = T, Error = Fail>,
) -> T {
    let r = run_exact("fixed-size message", b, p);
    debug_assert!(r.is_ok(), "layout does not match the {N}-byte array");
    r.unwrap_or_default()
}

/// Runs `p` over the bytes `b` that have arrived so far.
///
/// Returns `Ok(None)` when `p` needs more input ("need more"), or
/// `Ok(Some((value, n)))` when it completed after consuming the first `n`
/// bytes. A mismatch gives [`WireError::BadLength`] naming `what`; an error
/// raised by a check inside `p` is returned as is.
pub(crate) fn run_streaming<'a, T>(
    what: &'static str,
    b: &'a [u8],
    mut p: impl Parser<&'a [u8], Output = T, Error = Fail>,
) -> Result<Option<(T, usize)>, WireError> {
    match p.parse(b) {
        Ok((rest, v)) => Ok(Some((v, b.len() - rest.len()))),
        Err(nom::Err::Incomplete(_)) => Ok(None),
        Err(nom::Err::Error(Fail::Wire(e)) | nom::Err::Failure(Fail::Wire(e))) => Err(e),
        Err(_) => Err(WireError::BadLength {
            what,
            len: len64(b.len()),
        }),
    }
}

/// Test support for the parsers of every message family.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Fail, PResult};

    /// Runs the nom parser `p` on every proper prefix of `msg`, then on all
    /// of it, and returns the result for all of it.
    ///
    /// Every prefix must give `Incomplete` ("need more"), except that when
    /// the whole message is refused, a prefix that already holds the
    /// offending field may give that same error. The whole message must be
    /// consumed entirely when it parses.
    pub(crate) fn splits<'a, T: std::fmt::Debug + PartialEq>(
        msg: &'a [u8],
        mut p: impl FnMut(&'a [u8]) -> PResult<'a, T>,
    ) -> Result<T, Fail> {
        let whole = match p(msg) {
            Ok((rest, v)) => {
                assert!(rest.is_empty(), "{} bytes left over", rest.len());
                Ok(v)
            }
            Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Err(e),
            Err(nom::Err::Incomplete(n)) => panic!("whole message incomplete: {n:?}"),
        };
        for k in 0..msg.len() {
            match p(&msg[..k]) {
                Err(nom::Err::Incomplete(_)) => {}
                Err(nom::Err::Error(e) | nom::Err::Failure(e))
                    if whole.as_ref().err() == Some(&e) => {}
                other => panic!("split at {k} of {}: {other:?}, whole: {whole:?}", msg.len()),
            }
        }
        whole
    }
}
