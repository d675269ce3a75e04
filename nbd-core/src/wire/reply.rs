//! Transmission-phase replies: simple reply headers, structured and extended
//! chunk headers, and the payloads of the chunk types a client must check
//! (OFFSET_DATA, OFFSET_HOLE, error chunks and block status chunks).
//!
//! Every parser here takes a slice whose length the caller already knows
//! (a fixed header size, or a chunk length from a header that was checked
//! against a limit), except the block status steps, which take the bytes
//! that have arrived so far and say when they need more (the state machine
//! streams block status payloads through them). They never panic and never
//! allocate more than the input can describe.

use bytes::{BufMut, BytesMut};
use nom::bytes::streaming::take;
use nom::combinator::{cond, map_res};
use nom::Parser;

use super::{be_u16, be_u32, be_u64, len64, run_exact, run_streaming, Fail, PResult, WireError};
use crate::consts::{
    chunk, EXTENDED_REPLY_LEN, EXTENDED_REPLY_MAGIC, MAX_STRING_LEN, SIMPLE_REPLY_LEN,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_LEN, STRUCTURED_REPLY_MAGIC,
};

/// Which reply headers were negotiated for the transmission phase.
///
/// Pick it once, when transmission starts, and pass it to
/// [`reply_header_len`] and [`parse_reply_header`] for every reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderMode {
    /// Nothing negotiated: only simple replies are allowed.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: structured chunks, and
    /// simple replies without payload.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged: extended chunks only.
    Extended,
}

impl HeaderMode {
    /// The mode's lower-case name (`"simple"`, `"structured"` or
    /// `"extended"`); use it in error messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            HeaderMode::Simple => "simple",
            HeaderMode::Structured => "structured",
            HeaderMode::Extended => "extended",
        }
    }
}

/// Returns the total header length (16, 20 or 32) announced by a reply's
/// first 4 bytes (its magic).
///
/// Call this as soon as 4 bytes of a new reply have arrived, to know how many
/// more to wait for. A magic that is unknown, or not allowed in `mode`, gives
/// [`WireError::BadReplyMagic`], which is fatal to the connection. Simple
/// mode allows only the simple magic; structured mode allows the simple and
/// the structured magic; extended mode allows only the extended magic.
pub fn reply_header_len(magic: u32, mode: HeaderMode) -> Result<usize, WireError> {
    match (magic, mode) {
        (SIMPLE_REPLY_MAGIC, HeaderMode::Simple | HeaderMode::Structured) => Ok(SIMPLE_REPLY_LEN),
        (STRUCTURED_REPLY_MAGIC, HeaderMode::Structured) => Ok(STRUCTURED_REPLY_LEN),
        (EXTENDED_REPLY_MAGIC, HeaderMode::Extended) => Ok(EXTENDED_REPLY_LEN),
        _ => Err(WireError::BadReplyMagic {
            magic,
            mode: mode.name(),
        }),
    }
}

/// A parsed reply header: a simple reply or a chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply. Data follows only for a successful READ, and its
    /// length comes from the request.
    Simple {
        /// Error value (0 = success).
        error: u32,
        /// Cookie of the request being answered.
        cookie: u64,
    },
    /// A structured or extended chunk header; `length` payload bytes follow.
    Chunk {
        /// Reply flags (`consts::reply_flags`); unknown bits must be ignored.
        flags: u16,
        /// Chunk type (`consts::chunk`).
        typ: u16,
        /// Cookie of the request being answered.
        cookie: u64,
        /// The request's offset echoed back; `Some` only in extended chunks.
        offset: Option<u64>,
        /// Payload length.
        length: u64,
    },
}

/// Parses a complete reply header.
///
/// Call this once `reply_header_len(magic, mode)` bytes have arrived, with
/// exactly those bytes. A bad magic gives [`WireError::BadReplyMagic`]; a
/// slice of the wrong length gives [`WireError::BadLength`]. The caller still
/// has to check the cookie, the chunk type and the payload length.
pub fn parse_reply_header(b: &[u8], mode: HeaderMode) -> Result<ReplyHeader, WireError> {
    let bad_len = || WireError::BadLength {
        what: "reply header",
        len: len64(b.len()),
    };
    // The magic first: a bad one is reported as such even in a short slice.
    let (i, magic) = be_u32(b).map_err(|_| bad_len())?;
    let want = reply_header_len(magic, mode)?;
    // Checking the whole length up front lets the compiler drop the
    // per-field bounds checks below: this runs once per reply and must stay
    // as cheap as plain indexing (see examples/reply_header_loop.rs).
    if b.len() != want {
        return Err(bad_len());
    }
    // The layouts of spec "Simple reply message" and "Structured reply
    // chunk message" (compact and extended).
    let h = match want {
        SIMPLE_REPLY_LEN => (be_u32, be_u64)
            .map(|(error, cookie)| ReplyHeader::Simple { error, cookie })
            .parse(i),
        STRUCTURED_REPLY_LEN => (be_u16, be_u16, be_u64, be_u32)
            .map(|(flags, typ, cookie, length)| ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                offset: None,
                length: u64::from(length),
            })
            .parse(i),
        _ => (be_u16, be_u16, be_u64, be_u64, be_u64)
            .map(|(flags, typ, cookie, offset, length)| ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                offset: Some(offset),
                length,
            })
            .parse(i),
    };
    h.map(|(_, h)| h).map_err(|_| bad_len())
}

/// Checks the payload length of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: it
/// must hold the 8-byte offset and at least one data byte.
///
/// Call this on the chunk header's length before reading the payload; a
/// violation is "inconsistent contents" and fatal to the connection.
pub fn check_offset_data_len(length: u64) -> Result<(), WireError> {
    if length >= 9 {
        Ok(())
    } else {
        Err(WireError::BadLength {
            what: "OFFSET_DATA chunk",
            len: length,
        })
    }
}

/// Returns the offset carried in the first 8 bytes of an
/// `NBD_REPLY_TYPE_OFFSET_DATA` payload.
///
/// Call this once those 8 bytes have arrived, after the chunk length was
/// checked to be at least 9 (see [`check_offset_data_len`]); the remaining
/// `length - 8` bytes are the data.
pub fn parse_offset_data_prefix(b: &[u8; 8]) -> u64 {
    // One integer from a fixed array, once per OFFSET_DATA chunk: through
    // `run_fixed(b, be_u64)` it costs 2 more instructions (callgrind).
    u64::from_be_bytes(*b)
}

/// Parses an `NBD_REPLY_TYPE_OFFSET_HOLE` payload into `(offset, hole size)`.
///
/// Call this with the whole payload. It must be exactly 12 bytes
/// ([`WireError::BadLength`] otherwise) and the hole size must be nonzero
/// ([`WireError::BadValue`] otherwise); both are fatal to the connection.
pub fn parse_offset_hole(p: &[u8]) -> Result<(u64, u32), WireError> {
    let (offset, size) = run_exact("OFFSET_HOLE chunk", p, offset_hole)?;
    if size == 0 {
        return Err(WireError::BadValue {
            what: "OFFSET_HOLE hole size",
            value: 0,
        });
    }
    Ok((offset, size))
}

/// nom parser of an `NBD_REPLY_TYPE_OFFSET_HOLE` payload: u64 offset, u32
/// hole size.
fn offset_hole(i: &[u8]) -> PResult<'_, (u64, u32)> {
    (be_u64, be_u32).parse(i)
}

/// A parsed error chunk, borrowing its message from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk<'a> {
    /// Error value (never 0).
    pub error: u32,
    /// Human-readable message (normally UTF-8, not checked here), at most
    /// 4096 bytes.
    pub message: &'a [u8],
    /// The offset of an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk; `None` for
    /// other error types.
    pub offset: Option<u64>,
}

/// Parses the payload of an error chunk: `NBD_REPLY_TYPE_ERROR` (0x8001),
/// `NBD_REPLY_TYPE_ERROR_OFFSET` (0x8002), or any other type with bit 15 set
/// (read like ERROR, with bytes after the message ignored).
///
/// Call this for every chunk whose type has bit 15 set, with the whole
/// payload. Rules checked:
/// - the payload is at least 6 bytes (14 for ERROR_OFFSET);
/// - the message fits: ERROR needs exactly `6 + msglen` bytes,
///   ERROR_OFFSET exactly `14 + msglen`, unknown types at least `6 + msglen`;
/// - the error value is nonzero;
/// - the message is at most 4096 bytes.
///
/// Any failure is "inconsistent contents" and fatal to the connection. A type
/// without bit 15 gives [`WireError::BadValue`].
pub fn parse_error_chunk(typ: u16, p: &[u8]) -> Result<ErrorChunk<'_>, WireError> {
    let (what, _) = error_layout(typ)?;
    run_exact(what, p, error_chunk(typ, p.len()))
}

/// Name and length of the fixed fields after the message, for an error
/// chunk type (bit 15 set; anything else is [`WireError::BadValue`]).
fn error_layout(typ: u16) -> Result<(&'static str, usize), WireError> {
    match typ {
        _ if typ & chunk::FLAG_ERROR == 0 => Err(WireError::BadValue {
            what: "error chunk type",
            value: u64::from(typ),
        }),
        chunk::ERROR => Ok(("ERROR chunk", 0)),
        chunk::ERROR_OFFSET => Ok(("ERROR_OFFSET chunk", 8)),
        _ => Ok(("error chunk", 0)),
    }
}

/// nom parser of an error chunk payload of `len` bytes (the chunk
/// header's length): u32 error, u16 message length, the message, the u64
/// offset of ERROR_OFFSET, and for unknown types whatever bytes remain.
/// See [`parse_error_chunk`] for the rules, all checked from the fixed
/// fields before the message is read.
fn error_chunk<'a>(typ: u16, len: usize) -> impl FnMut(&'a [u8]) -> PResult<'a, ErrorChunk<'a>> {
    move |i| {
        let (what, trailer) = error_layout(typ).map_err(fail)?;
        let bad_len = move || WireError::BadLength {
            what,
            len: len64(len),
        };
        // Room left for the message once the fixed fields are accounted for.
        let room = len
            .checked_sub(6 + trailer)
            .ok_or_else(|| fail(bad_len()))?;
        let strict = typ == chunk::ERROR || typ == chunk::ERROR_OFFSET;
        let fields = map_res((be_u32, be_u16), move |(error, msglen)| {
            let msglen = usize::from(msglen);
            if msglen > room {
                Err(WireError::InnerLengthOverflow {
                    what,
                    inner: len64(msglen),
                    outer: len64(len),
                })
            } else if strict && msglen != room {
                Err(bad_len())
            } else if error == 0 {
                Err(WireError::BadValue {
                    what: "error chunk error value",
                    value: 0,
                })
            } else if msglen > MAX_STRING_LEN {
                Err(WireError::BadLength {
                    what: "error chunk message",
                    len: len64(msglen),
                })
            } else {
                Ok((error, msglen))
            }
        });
        fields
            .flat_map(move |(error, msglen)| {
                (
                    take(msglen),
                    cond(typ == chunk::ERROR_OFFSET, be_u64),
                    // Unknown error types may carry more bytes: ignored.
                    take(room - msglen),
                )
                    .map(move |(message, offset, _)| ErrorChunk {
                        error,
                        message,
                        offset,
                    })
            })
            .parse(i)
    }
}

/// A fatal error for a nom parser.
fn fail(e: WireError) -> nom::Err<Fail> {
    nom::Err::Failure(Fail::Wire(e))
}

/// One block status extent: a length (never 0) and its status flags.
///
/// For `NBD_REPLY_TYPE_BLOCK_STATUS` the flags are the 32-bit status
/// zero-extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Number of bytes the extent covers.
    pub length: u64,
    /// Status flags of the metadata context.
    pub flags: u64,
}

/// The fixed part of a block status chunk payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusHead {
    /// The metadata context the extents describe; whether it was
    /// negotiated is for the caller to check.
    pub context_id: u32,
    /// Number of extent descriptors that follow (at least 1).
    pub descriptors: u64,
}

/// Name, fixed-part length and descriptor width of a block status chunk
/// type (spec "Structured reply types": `NBD_REPLY_TYPE_BLOCK_STATUS` and
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).
fn block_status_layout(typ: u16) -> Result<(&'static str, u64, u64), WireError> {
    match typ {
        chunk::BLOCK_STATUS => Ok(("BLOCK_STATUS chunk", 4, 8)),
        chunk::BLOCK_STATUS_EXT => Ok(("BLOCK_STATUS_EXT chunk", 8, 16)),
        other => Err(WireError::BadValue {
            what: "block status chunk type",
            value: u64::from(other),
        }),
    }
}

/// Checks the payload length of a block status chunk and returns its
/// number of extent descriptors N.
///
/// Call this on the chunk header's length, before reading or allocating
/// anything for the payload. Type 5 needs exactly `4 + 8N` bytes, type 6
/// exactly `8 + 16N`, with N ≥ 1 ([`WireError::BadLength`] otherwise); N
/// above `max_extents` gives [`WireError::OverLimit`]; any other type gives
/// [`WireError::BadValue`]. All are fatal to the connection.
pub fn check_block_status_len(typ: u16, length: u64, max_extents: usize) -> Result<u64, WireError> {
    let (what, head, width) = block_status_layout(typ)?;
    let body = length
        .checked_sub(head)
        .filter(|b| *b != 0 && b % width == 0);
    let Some(body) = body else {
        return Err(WireError::BadLength { what, len: length });
    };
    let n = body / width;
    let limit = len64(max_extents);
    if n > limit {
        return Err(WireError::OverLimit {
            what: "block status extents",
            len: n,
            limit,
        });
    }
    Ok(n)
}

/// Parses the fixed part of a block status payload from the bytes `b` that
/// have arrived so far: `Ok(None)` means wait for more, `Ok(Some((head,
/// n)))` means the first `n` bytes held it.
///
/// Call this with the chunk header's `typ` and `length` (see
/// [`check_block_status_len`], which this repeats without a limit). Type 5
/// holds a u32 context id; type 6 a u32 context id and a u32 descriptor
/// count, which must equal the N the length implies
/// ([`WireError::BadValue`] otherwise).
pub fn parse_block_status_head(
    typ: u16,
    length: u64,
    b: &[u8],
) -> Result<Option<(BlockStatusHead, usize)>, WireError> {
    let descriptors = check_block_status_len(typ, length, usize::MAX)?;
    let (what, _, _) = block_status_layout(typ)?;
    let count = map_res(be_u32, |count| {
        if u64::from(count) == descriptors {
            Ok(count)
        } else {
            Err(WireError::BadValue {
                what: "BLOCK_STATUS_EXT descriptor count",
                value: u64::from(count),
            })
        }
    });
    let head = (be_u32, cond(typ == chunk::BLOCK_STATUS_EXT, count)).map(|(context_id, _)| {
        BlockStatusHead {
            context_id,
            descriptors,
        }
    });
    run_streaming(what, b, head)
}

/// nom parser of a narrow extent descriptor (type 5): u32 length, u32
/// flags.
fn descriptor32(i: &[u8]) -> PResult<'_, (u64, u64)> {
    (be_u32, be_u32)
        .map(|(l, f)| (u64::from(l), u64::from(f)))
        .parse(i)
}

/// nom parser of a wide extent descriptor (type 6): u64 length, u64 flags.
fn descriptor64(i: &[u8]) -> PResult<'_, (u64, u64)> {
    (be_u64, be_u64).parse(i)
}

/// Parses each `width`-byte slice of `b` with `descriptor` into `out`,
/// refusing a zero length.
fn push_extents<'a>(
    what: &'static str,
    b: &'a [u8],
    width: usize,
    out: &mut Vec<Extent>,
    mut descriptor: impl FnMut(&'a [u8]) -> PResult<'a, (u64, u64)>,
) -> Result<(), WireError> {
    for d in b.chunks_exact(width) {
        let (length, flags) = run_exact(what, d, &mut descriptor)?;
        if length == 0 {
            return Err(WireError::BadValue {
                what: "block status extent length",
                value: 0,
            });
        }
        out.push(Extent { length, flags });
    }
    Ok(())
}

/// Parses the extent descriptors of a block status payload from the bytes
/// `b` that have arrived so far, appending them to `out`; returns the
/// number of bytes consumed.
///
/// Call this after [`parse_block_status_head`], with the chunk type and
/// the number of descriptors still expected (`left`); it parses as many
/// whole descriptors as `b` holds, up to `left`, reserving room (with
/// `Vec`'s amortized growth) only for those. A result of 0 with `left > 0` means wait for more. A zero-length
/// extent gives [`WireError::BadValue`] (fatal; `out` may then hold the
/// extents before it).
pub fn parse_block_status_extents(
    typ: u16,
    b: &[u8],
    left: u64,
    out: &mut Vec<Extent>,
) -> Result<usize, WireError> {
    let (what, _, width) = block_status_layout(typ)?;
    // Whole descriptors present, at most `b.len() / width`: fits in usize.
    let k = usize::try_from((len64(b.len()) / width).min(left)).unwrap_or(0);
    let width = usize::try_from(width).unwrap_or(usize::MAX);
    let b = b.get(..k * width).unwrap_or_default();
    out.reserve(k);
    // One exact-size slice per descriptor rather than nom's `fold_many_m_n`
    // over the whole input: the compiler then drops the per-field bounds
    // checks, and this loop runs once per extent (up to `max_extents`).
    if typ == chunk::BLOCK_STATUS_EXT {
        push_extents(what, b, width, out, descriptor64)?;
    } else {
        push_extents(what, b, width, out, descriptor32)?;
    }
    Ok(b.len())
}

/// Parses a whole block status chunk payload into `out` and returns its
/// context id.
///
/// Call this with the whole payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` (5)
/// or `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (6) chunk; the caller has already
/// checked that the type fits the header mode. It runs the same three steps
/// a client reading the payload as it streams in runs:
/// [`check_block_status_len`] (with `max_extents`),
/// [`parse_block_status_head`] and [`parse_block_status_extents`].
/// - Type 5: u32 context id, then N × (u32 length, u32 flags); the payload is
///   exactly `4 + 8N` bytes with N ≥ 1.
/// - Type 6: u32 context id, u32 count, then N × (u64 length, u64 flags); the
///   payload is exactly `8 + 16N` bytes with `count == N` ≥ 1.
///
/// `out` is cleared first, receives exactly N extents on success, and is left
/// empty on error. Zero-length extents, bad lengths, count mismatches and
/// more than `max_extents` extents are errors and fatal to the connection.
/// Context id and extent-sum checks are left to the caller.
pub fn parse_block_status(
    typ: u16,
    p: &[u8],
    max_extents: usize,
    out: &mut Vec<Extent>,
) -> Result<u32, WireError> {
    out.clear();
    let r = parse_block_status_inner(typ, p, max_extents, out);
    if r.is_err() {
        out.clear();
    }
    r
}

/// Body of [`parse_block_status`]; may leave partial output on error.
fn parse_block_status_inner(
    typ: u16,
    p: &[u8],
    max_extents: usize,
    out: &mut Vec<Extent>,
) -> Result<u32, WireError> {
    let length = len64(p.len());
    let bad_len = || match block_status_layout(typ) {
        Ok((what, _, _)) => WireError::BadLength { what, len: length },
        Err(e) => e,
    };
    let n = check_block_status_len(typ, length, max_extents)?;
    let (head, used) = parse_block_status_head(typ, length, p)?.ok_or_else(bad_len)?;
    let body = p.get(used..).unwrap_or_default();
    // The whole payload is here: room for exactly N extents, checked
    // against `max_extents` above.
    out.reserve_exact(usize::try_from(n).unwrap_or(0));
    let consumed = parse_block_status_extents(typ, body, n, out)?;
    if consumed != body.len() {
        return Err(bad_len());
    }
    Ok(head.context_id)
}

/// Appends a 16-byte simple reply header to `out`.
///
/// Call this from tests and the fake server to answer a request in simple
/// form; for a successful READ the data must follow separately.
pub fn encode_simple_reply(error: u32, cookie: u64, out: &mut BytesMut) {
    out.reserve(SIMPLE_REPLY_LEN);
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Appends a chunk header to `out`: 20 bytes for [`HeaderMode::Structured`]
/// (the `offset` is ignored and `length` is saturated to `u32::MAX`), 32 bytes
/// for [`HeaderMode::Extended`].
///
/// Call this from tests and the fake server before writing a chunk payload.
/// [`HeaderMode::Simple`] has no chunk header of its own and is encoded like
/// `Structured`, which lets a test send a structured chunk to a client that
/// did not negotiate it.
pub fn encode_chunk_header(
    mode: HeaderMode,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    out: &mut BytesMut,
) {
    match mode {
        HeaderMode::Simple | HeaderMode::Structured => {
            out.reserve(STRUCTURED_REPLY_LEN);
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(cookie);
            out.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
        }
        HeaderMode::Extended => {
            out.reserve(EXTENDED_REPLY_LEN);
            out.put_u32(EXTENDED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(cookie);
            out.put_u64(offset);
            out.put_u64(length);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::reply_flags;
    use crate::wire::testing::splits;
    use proptest::prelude::*;

    const MODES: [HeaderMode; 3] = [
        HeaderMode::Simple,
        HeaderMode::Structured,
        HeaderMode::Extended,
    ];

    fn error_payload(error: u32, msg: &[u8], offset: Option<u64>, extra: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&u16::try_from(msg.len()).unwrap().to_be_bytes());
        v.extend_from_slice(msg);
        if let Some(o) = offset {
            v.extend_from_slice(&o.to_be_bytes());
        }
        v.extend_from_slice(extra);
        v
    }

    fn bs32(id: u32, ext: &[(u32, u32)]) -> Vec<u8> {
        let mut v = id.to_be_bytes().to_vec();
        for (l, f) in ext {
            v.extend_from_slice(&l.to_be_bytes());
            v.extend_from_slice(&f.to_be_bytes());
        }
        v
    }

    fn bs64(id: u32, count: u32, ext: &[(u64, u64)]) -> Vec<u8> {
        let mut v = id.to_be_bytes().to_vec();
        v.extend_from_slice(&count.to_be_bytes());
        for (l, f) in ext {
            v.extend_from_slice(&l.to_be_bytes());
            v.extend_from_slice(&f.to_be_bytes());
        }
        v
    }

    // ---- header mode / magic ----

    #[test]
    fn mode_names() {
        assert_eq!(HeaderMode::Simple.name(), "simple");
        assert_eq!(HeaderMode::Structured.name(), "structured");
        assert_eq!(HeaderMode::Extended.name(), "extended");
    }

    #[test]
    fn header_len_table() {
        use HeaderMode::*;
        assert_eq!(reply_header_len(SIMPLE_REPLY_MAGIC, Simple), Ok(16));
        assert_eq!(reply_header_len(SIMPLE_REPLY_MAGIC, Structured), Ok(16));
        assert_eq!(reply_header_len(STRUCTURED_REPLY_MAGIC, Structured), Ok(20));
        assert_eq!(reply_header_len(EXTENDED_REPLY_MAGIC, Extended), Ok(32));
        let bad = [
            (SIMPLE_REPLY_MAGIC, Extended),
            (STRUCTURED_REPLY_MAGIC, Simple),
            (STRUCTURED_REPLY_MAGIC, Extended),
            (EXTENDED_REPLY_MAGIC, Simple),
            (EXTENDED_REPLY_MAGIC, Structured),
        ];
        for (magic, mode) in bad {
            assert_eq!(
                reply_header_len(magic, mode),
                Err(WireError::BadReplyMagic {
                    magic,
                    mode: mode.name()
                })
            );
        }
        // Reserved historic magics and request magics are never valid.
        for magic in [0x9674_4668, 0x1256_0953, 0x2560_9513, 0x21e4_1c71, 0] {
            for mode in MODES {
                assert!(reply_header_len(magic, mode).is_err());
            }
        }
    }

    // ---- header parsing ----

    #[test]
    fn simple_layout() {
        let mut out = BytesMut::new();
        encode_simple_reply(5, 0x0102_0304_0506_0708, &mut out);
        assert_eq!(
            &out[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8][..]
        );
        for mode in [HeaderMode::Simple, HeaderMode::Structured] {
            assert_eq!(
                parse_reply_header(&out, mode),
                Ok(ReplyHeader::Simple {
                    error: 5,
                    cookie: 0x0102_0304_0506_0708
                })
            );
        }
        assert!(matches!(
            parse_reply_header(&out, HeaderMode::Extended),
            Err(WireError::BadReplyMagic { .. })
        ));
    }

    #[test]
    fn structured_layout() {
        let mut out = BytesMut::new();
        encode_chunk_header(
            HeaderMode::Structured,
            reply_flags::DONE,
            chunk::OFFSET_DATA,
            9,
            0xdead,
            0x1234_5678,
            &mut out,
        );
        assert_eq!(
            &out[..],
            &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0x12, 0x34, 0x56, 0x78][..]
        );
        assert_eq!(
            parse_reply_header(&out, HeaderMode::Structured),
            Ok(ReplyHeader::Chunk {
                flags: 1,
                typ: 1,
                cookie: 9,
                offset: None,
                length: 0x1234_5678
            })
        );
        assert!(parse_reply_header(&out, HeaderMode::Simple).is_err());
        assert!(parse_reply_header(&out, HeaderMode::Extended).is_err());
    }

    #[test]
    fn structured_length_saturates() {
        let mut out = BytesMut::new();
        encode_chunk_header(HeaderMode::Structured, 0, 0, 1, 0, 1 << 40, &mut out);
        assert_eq!(&out[16..20], &[0xff; 4]);
        let mut simple = BytesMut::new();
        encode_chunk_header(HeaderMode::Simple, 0, 0, 1, 0, 1 << 40, &mut simple);
        assert_eq!(out, simple);
    }

    #[test]
    fn extended_layout() {
        let mut out = BytesMut::new();
        encode_chunk_header(
            HeaderMode::Extended,
            0xfffe,
            chunk::ERROR,
            7,
            0x1111_2222_3333_4444,
            0x1_0000_0000,
            &mut out,
        );
        assert_eq!(
            &out[..],
            &[
                0x6e, 0x8a, 0x27, 0x8c, 0xff, 0xfe, 0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 7, 0x11, 0x11,
                0x22, 0x22, 0x33, 0x33, 0x44, 0x44, 0, 0, 0, 1, 0, 0, 0, 0
            ][..]
        );
        assert_eq!(
            parse_reply_header(&out, HeaderMode::Extended),
            Ok(ReplyHeader::Chunk {
                flags: 0xfffe,
                typ: chunk::ERROR,
                cookie: 7,
                offset: Some(0x1111_2222_3333_4444),
                length: 0x1_0000_0000
            })
        );
        assert!(parse_reply_header(&out, HeaderMode::Structured).is_err());
    }

    #[test]
    fn header_wrong_length() {
        let mut s = BytesMut::new();
        encode_simple_reply(0, 1, &mut s);
        let mut c = BytesMut::new();
        encode_chunk_header(HeaderMode::Structured, 0, 0, 1, 0, 0, &mut c);
        let mut e = BytesMut::new();
        encode_chunk_header(HeaderMode::Extended, 0, 0, 1, 0, 0, &mut e);
        for (bytes, mode) in [
            (&s[..], HeaderMode::Simple),
            (&c[..], HeaderMode::Structured),
            (&e[..], HeaderMode::Extended),
        ] {
            // Truncated.
            for cut in 0..bytes.len() {
                let r = parse_reply_header(&bytes[..cut], mode);
                assert_eq!(
                    r,
                    Err(WireError::BadLength {
                        what: "reply header",
                        len: cut as u64
                    }),
                    "{mode:?} cut {cut}"
                );
            }
            // Too long.
            let mut long = bytes.to_vec();
            long.push(0);
            assert!(matches!(
                parse_reply_header(&long, mode),
                Err(WireError::BadLength { .. })
            ));
        }
    }

    #[test]
    fn header_bad_magic_before_length() {
        // A bad magic is reported as such even if the slice is short.
        assert!(matches!(
            parse_reply_header(&[0, 0, 0, 0, 1], HeaderMode::Structured),
            Err(WireError::BadReplyMagic {
                magic: 0,
                mode: "structured"
            })
        ));
    }

    // ---- OFFSET_DATA / OFFSET_HOLE ----

    #[test]
    fn offset_data() {
        assert_eq!(parse_offset_data_prefix(&[0, 0, 0, 0, 0, 0, 2, 0]), 512);
        assert_eq!(parse_offset_data_prefix(&[0xff; 8]), u64::MAX);
        assert!(check_offset_data_len(9).is_ok());
        assert!(check_offset_data_len(u64::MAX).is_ok());
        for l in 0..9 {
            assert_eq!(
                check_offset_data_len(l),
                Err(WireError::BadLength {
                    what: "OFFSET_DATA chunk",
                    len: l
                })
            );
        }
    }

    #[test]
    fn offset_hole_valid() {
        let p = [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0];
        assert_eq!(parse_offset_hole(&p), Ok((4096, 512)));
    }

    #[test]
    fn offset_hole_invalid() {
        let p = [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_offset_hole(&p),
            Err(WireError::BadValue {
                what: "OFFSET_HOLE hole size",
                value: 0
            })
        );
        let long = [1u8; 13];
        for n in (0..12).chain(13..14) {
            assert_eq!(
                parse_offset_hole(&long[..n]),
                Err(WireError::BadLength {
                    what: "OFFSET_HOLE chunk",
                    len: n as u64
                })
            );
        }
    }

    // ---- error chunks ----

    #[test]
    fn error_valid() {
        let p = error_payload(5, b"boom", None, &[]);
        assert_eq!(
            parse_error_chunk(chunk::ERROR, &p),
            Ok(ErrorChunk {
                error: 5,
                message: b"boom",
                offset: None
            })
        );
        let p = error_payload(22, b"", None, &[]);
        assert_eq!(
            parse_error_chunk(chunk::ERROR, &p),
            Ok(ErrorChunk {
                error: 22,
                message: b"",
                offset: None
            })
        );
    }

    #[test]
    fn error_offset_valid() {
        let p = error_payload(5, b"bad sector", Some(0x2000), &[]);
        assert_eq!(
            parse_error_chunk(chunk::ERROR_OFFSET, &p),
            Ok(ErrorChunk {
                error: 5,
                message: b"bad sector",
                offset: Some(0x2000)
            })
        );
        let p = error_payload(5, b"", Some(u64::MAX), &[]);
        assert_eq!(
            parse_error_chunk(chunk::ERROR_OFFSET, &p).unwrap().offset,
            Some(u64::MAX)
        );
    }

    #[test]
    fn unknown_error_type_ignores_trailer() {
        let p = error_payload(95, b"hi", None, &[1, 2, 3]);
        assert_eq!(
            parse_error_chunk(0x8123, &p),
            Ok(ErrorChunk {
                error: 95,
                message: b"hi",
                offset: None
            })
        );
        let p = error_payload(95, b"hi", None, &[]);
        assert!(parse_error_chunk(0xffff, &p).is_ok());
    }

    #[test]
    fn error_not_error_type() {
        let p = error_payload(5, b"", None, &[]);
        assert_eq!(
            parse_error_chunk(chunk::OFFSET_DATA, &p),
            Err(WireError::BadValue {
                what: "error chunk type",
                value: 1
            })
        );
    }

    #[test]
    fn error_too_short() {
        let p = error_payload(5, b"", Some(0), &[]);
        for n in 0..6 {
            for typ in [chunk::ERROR, chunk::ERROR_OFFSET, 0x8003] {
                assert!(
                    matches!(parse_error_chunk(typ, &p[..n]), Err(WireError::BadLength { len, .. }) if len == n as u64),
                    "typ {typ:#x} n {n}"
                );
            }
        }
        for n in 6..14 {
            assert_eq!(
                parse_error_chunk(chunk::ERROR_OFFSET, &p[..n]),
                Err(WireError::BadLength {
                    what: "ERROR_OFFSET chunk",
                    len: n as u64
                })
            );
        }
    }

    #[test]
    fn error_message_overflow() {
        // Message length claims 5 bytes, 4 present.
        let mut p = error_payload(5, b"abcd", None, &[]);
        p[5] = 5;
        for typ in [chunk::ERROR, 0x8055] {
            assert_eq!(
                parse_error_chunk(typ, &p),
                Err(WireError::InnerLengthOverflow {
                    what: if typ == chunk::ERROR {
                        "ERROR chunk"
                    } else {
                        "error chunk"
                    },
                    inner: 5,
                    outer: 10
                })
            );
        }
        // ERROR_OFFSET: message eats into the offset.
        let mut p = error_payload(5, b"abcd", Some(0), &[]);
        p[5] = 5;
        assert_eq!(
            parse_error_chunk(chunk::ERROR_OFFSET, &p),
            Err(WireError::InnerLengthOverflow {
                what: "ERROR_OFFSET chunk",
                inner: 5,
                outer: 18
            })
        );
        // Huge message length in a tiny chunk.
        let p = [0, 0, 0, 5, 0xff, 0xff];
        assert!(matches!(
            parse_error_chunk(chunk::ERROR, &p),
            Err(WireError::InnerLengthOverflow { inner: 65535, .. })
        ));
    }

    #[test]
    fn error_trailing_bytes_strict() {
        let p = error_payload(5, b"abc", None, &[0]);
        assert_eq!(
            parse_error_chunk(chunk::ERROR, &p),
            Err(WireError::BadLength {
                what: "ERROR chunk",
                len: 10
            })
        );
        let p = error_payload(5, b"abc", Some(1), &[0]);
        assert_eq!(
            parse_error_chunk(chunk::ERROR_OFFSET, &p),
            Err(WireError::BadLength {
                what: "ERROR_OFFSET chunk",
                len: 18
            })
        );
    }

    #[test]
    fn error_zero_value() {
        for (typ, off) in [
            (chunk::ERROR, None),
            (chunk::ERROR_OFFSET, Some(0)),
            (0x9000, None),
        ] {
            let p = error_payload(0, b"x", off, &[]);
            assert_eq!(
                parse_error_chunk(typ, &p),
                Err(WireError::BadValue {
                    what: "error chunk error value",
                    value: 0
                })
            );
        }
    }

    #[test]
    fn error_message_limit() {
        let ok = vec![b'a'; MAX_STRING_LEN];
        let p = error_payload(5, &ok, None, &[]);
        assert_eq!(
            parse_error_chunk(chunk::ERROR, &p).unwrap().message.len(),
            4096
        );
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        for (typ, off) in [
            (chunk::ERROR, None),
            (chunk::ERROR_OFFSET, Some(0)),
            (0x8100, None),
        ] {
            let p = error_payload(5, &long, off, &[]);
            assert_eq!(
                parse_error_chunk(typ, &p),
                Err(WireError::BadLength {
                    what: "error chunk message",
                    len: 4097
                })
            );
        }
    }

    // ---- block status ----

    #[test]
    fn block_status_32() {
        let p = bs32(3, &[(4096, 3), (512, 0xffff_ffff)]);
        let mut out = vec![Extent {
            length: 1,
            flags: 1,
        }];
        assert_eq!(
            parse_block_status(chunk::BLOCK_STATUS, &p, usize::MAX, &mut out),
            Ok(3)
        );
        assert_eq!(
            out,
            vec![
                Extent {
                    length: 4096,
                    flags: 3
                },
                Extent {
                    length: 512,
                    flags: 0xffff_ffff
                }
            ]
        );
    }

    #[test]
    fn block_status_64() {
        let p = bs64(9, 2, &[(1 << 40, 1 << 63), (1, 0)]);
        let mut out = Vec::new();
        assert_eq!(
            parse_block_status(chunk::BLOCK_STATUS_EXT, &p, usize::MAX, &mut out),
            Ok(9)
        );
        assert_eq!(
            out,
            vec![
                Extent {
                    length: 1 << 40,
                    flags: 1 << 63
                },
                Extent {
                    length: 1,
                    flags: 0
                }
            ]
        );
    }

    #[test]
    fn block_status_bad_lengths() {
        let mut out = vec![Extent {
            length: 1,
            flags: 1,
        }];
        let p32 = bs32(1, &[(1, 0), (1, 0)]);
        // Every length other than 12 and 20 is wrong for two extents' worth of bytes.
        for n in 0..p32.len() {
            if n == 12 {
                continue;
            }
            assert_eq!(
                parse_block_status(chunk::BLOCK_STATUS, &p32[..n], usize::MAX, &mut out),
                Err(WireError::BadLength {
                    what: "BLOCK_STATUS chunk",
                    len: n as u64
                }),
                "n {n}"
            );
            assert!(out.is_empty());
        }
        let p64 = bs64(1, 1, &[(1, 0), (1, 0)]);
        for n in 0..p64.len() {
            if n == 24 {
                continue;
            }
            assert_eq!(
                parse_block_status(chunk::BLOCK_STATUS_EXT, &p64[..n], usize::MAX, &mut out),
                Err(WireError::BadLength {
                    what: "BLOCK_STATUS_EXT chunk",
                    len: n as u64
                }),
                "n {n}"
            );
        }
    }

    #[test]
    fn block_status_ext_count_mismatch() {
        let mut out = Vec::new();
        for count in [0, 1, 3, u32::MAX] {
            let p = bs64(1, count, &[(1, 0), (1, 0)]);
            assert_eq!(
                parse_block_status(chunk::BLOCK_STATUS_EXT, &p, usize::MAX, &mut out),
                Err(WireError::BadValue {
                    what: "BLOCK_STATUS_EXT descriptor count",
                    value: u64::from(count)
                })
            );
        }
    }

    #[test]
    fn block_status_zero_extent() {
        let mut out = Vec::new();
        let p = bs32(1, &[(512, 0), (0, 0)]);
        assert_eq!(
            parse_block_status(chunk::BLOCK_STATUS, &p, usize::MAX, &mut out),
            Err(WireError::BadValue {
                what: "block status extent length",
                value: 0
            })
        );
        assert!(out.is_empty(), "partial output discarded");
        let p = bs64(1, 1, &[(0, 0)]);
        assert!(parse_block_status(chunk::BLOCK_STATUS_EXT, &p, usize::MAX, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn block_status_wrong_type() {
        let mut out = Vec::new();
        let p = bs32(1, &[(1, 0)]);
        for typ in [0, 1, 2, 3, 4, 7, chunk::ERROR] {
            assert_eq!(
                parse_block_status(typ, &p, usize::MAX, &mut out),
                Err(WireError::BadValue {
                    what: "block status chunk type",
                    value: u64::from(typ)
                })
            );
        }
    }

    #[test]
    fn block_status_allocates_only_n() {
        let mut out = Vec::new();
        let p = bs32(1, &[(1, 0); 3]);
        parse_block_status(chunk::BLOCK_STATUS, &p, usize::MAX, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out.capacity(), 3);
    }

    /// Feeds payload `b` to the streaming block status parsers as the state
    /// machine does, the bytes arriving in two reads split at `cut`.
    fn stream_split(typ: u16, b: &[u8], cut: usize) -> Result<(u32, Vec<Extent>), WireError> {
        let length = len64(b.len());
        let n = check_block_status_len(typ, length, usize::MAX)?;
        let mut avail = cut;
        let mut pos = 0;
        let head = loop {
            match parse_block_status_head(typ, length, &b[pos..avail])? {
                Some((h, used)) => {
                    pos += used;
                    break h;
                }
                None => {
                    assert!(avail < b.len(), "need more with everything there");
                    avail = b.len();
                }
            }
        };
        assert_eq!(head.descriptors, n);
        let mut out = Vec::new();
        let mut left = n;
        while left > 0 {
            let before = out.len();
            let used = parse_block_status_extents(typ, &b[pos..avail], left, &mut out)?;
            if used == 0 {
                assert!(avail < b.len(), "need more with everything there");
                avail = b.len();
                continue;
            }
            assert_eq!(used % if typ == chunk::BLOCK_STATUS { 8 } else { 16 }, 0);
            pos += used;
            left -= len64(out.len() - before);
        }
        assert_eq!(pos, b.len());
        Ok((head.context_id, out))
    }

    #[test]
    fn block_status_split_at_every_offset() {
        let p32 = bs32(7, &[(4096, 1), (512, 2), (1, 3)]);
        let p64 = bs64(8, 2, &[(1 << 33, 1), (5, 1 << 40)]);
        let bad = bs32(7, &[(4096, 1), (0, 2)]);
        for (typ, p) in [
            (chunk::BLOCK_STATUS, &p32),
            (chunk::BLOCK_STATUS_EXT, &p64),
            (chunk::BLOCK_STATUS, &bad),
        ] {
            let mut out = Vec::new();
            let whole = parse_block_status(typ, p, usize::MAX, &mut out);
            for cut in 0..=p.len() {
                let got = stream_split(typ, p, cut);
                match &whole {
                    Ok(id) => assert_eq!(got, Ok((*id, out.clone())), "cut {cut}"),
                    Err(e) => assert_eq!(got.as_ref().err(), Some(e), "cut {cut}"),
                }
            }
        }
    }

    #[test]
    fn block_status_head_needs_more() {
        let p = bs64(3, 1, &[(1, 0)]);
        let len = len64(p.len());
        for cut in 0..8 {
            assert_eq!(
                parse_block_status_head(chunk::BLOCK_STATUS_EXT, len, &p[..cut]),
                Ok(None),
                "cut {cut}"
            );
        }
        let want = BlockStatusHead {
            context_id: 3,
            descriptors: 1,
        };
        for cut in 8..=p.len() {
            assert_eq!(
                parse_block_status_head(chunk::BLOCK_STATUS_EXT, len, &p[..cut]),
                Ok(Some((want, 8)))
            );
        }
        // A bad count is reported as soon as it has arrived.
        let p = bs64(3, 2, &[(1, 0)]);
        assert_eq!(
            parse_block_status_head(chunk::BLOCK_STATUS_EXT, len, &p[..8]),
            Err(WireError::BadValue {
                what: "BLOCK_STATUS_EXT descriptor count",
                value: 2
            })
        );
    }

    #[test]
    fn block_status_over_limit_before_allocation() {
        // A header announcing 2^40 extents is refused from its length alone.
        let huge = 4 + 8 * (1u64 << 40);
        assert_eq!(
            check_block_status_len(chunk::BLOCK_STATUS, huge, 1 << 20),
            Err(WireError::OverLimit {
                what: "block status extents",
                len: 1 << 40,
                limit: 1 << 20
            })
        );
        assert_eq!(
            check_block_status_len(chunk::BLOCK_STATUS_EXT, 8 + 16 * 5, 4),
            Err(WireError::OverLimit {
                what: "block status extents",
                len: 5,
                limit: 4
            })
        );
        assert_eq!(
            check_block_status_len(chunk::BLOCK_STATUS, 4 + 8 * 4, 4),
            Ok(4)
        );
        let mut out = Vec::new();
        let p = bs32(1, &[(1, 0); 5]);
        assert!(matches!(
            parse_block_status(chunk::BLOCK_STATUS, &p, 4, &mut out),
            Err(WireError::OverLimit {
                len: 5,
                limit: 4,
                ..
            })
        ));
        assert_eq!(out.capacity(), 0, "nothing allocated");
    }

    #[test]
    fn block_status_extents_stop_at_left() {
        // Descriptors of the next message are not taken.
        let p = bs32(1, &[(1, 0), (2, 0), (3, 0)]);
        let mut out = Vec::new();
        assert_eq!(
            parse_block_status_extents(chunk::BLOCK_STATUS, &p[4..], 2, &mut out),
            Ok(16)
        );
        assert_eq!(out.len(), 2);
        // Part of a descriptor is not consumed.
        out.clear();
        assert_eq!(
            parse_block_status_extents(chunk::BLOCK_STATUS, &p[4..15], 3, &mut out),
            Ok(8)
        );
        assert_eq!(out.len(), 1);
    }

    // ---- split at every offset ----

    #[test]
    fn reply_header_split_at_every_offset() {
        // The caller's protocol: wait for 4 bytes, learn the length from the
        // magic, wait for that many, parse exactly those.
        let mut s = BytesMut::new();
        encode_simple_reply(5, 9, &mut s);
        let mut c = BytesMut::new();
        encode_chunk_header(HeaderMode::Structured, 1, 2, 3, 0, 4, &mut c);
        let mut e = BytesMut::new();
        encode_chunk_header(HeaderMode::Extended, 1, 2, 3, 4, 5, &mut e);
        for (msg, mode) in [
            (&s[..], HeaderMode::Simple),
            (&s[..], HeaderMode::Structured),
            (&c[..], HeaderMode::Structured),
            (&e[..], HeaderMode::Extended),
        ] {
            let whole = parse_reply_header(msg, mode).unwrap();
            for k in 0..msg.len() {
                let have = &msg[..k];
                if let Some(m) = have.first_chunk::<4>() {
                    let n = reply_header_len(u32::from_be_bytes(*m), mode).unwrap();
                    assert_eq!(n, msg.len());
                    assert!(k < n);
                }
                // Parsing too early is refused, never a wrong header.
                assert_eq!(
                    parse_reply_header(have, mode),
                    Err(WireError::BadLength {
                        what: "reply header",
                        len: len64(k)
                    })
                );
            }
            assert_eq!(parse_reply_header(msg, mode), Ok(whole));
        }
    }

    #[test]
    fn hole_split_at_every_offset() {
        let p = [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0];
        assert_eq!(splits(&p, offset_hole), Ok((4096, 512)));
        assert_eq!(parse_offset_hole(&p), Ok((4096, 512)));
    }

    #[test]
    fn error_chunk_split_at_every_offset() {
        for (typ, p) in [
            (chunk::ERROR, error_payload(5, b"boom", None, &[])),
            (chunk::ERROR, error_payload(5, b"", None, &[])),
            (chunk::ERROR_OFFSET, error_payload(5, b"x", Some(7), &[])),
            (0x8123, error_payload(95, b"hi", None, &[1, 2, 3])),
        ] {
            let whole = parse_error_chunk(typ, &p).unwrap();
            assert_eq!(splits(&p, error_chunk(typ, p.len())), Ok(whole));
        }
        // Bad fixed fields are refused as soon as they are in, before the
        // message is read: a zero error, a message over 4096 bytes.
        let p = error_payload(0, b"x", None, &[]);
        let e = splits(&p, error_chunk(chunk::ERROR, p.len()));
        assert_eq!(
            e,
            Err(Fail::Wire(parse_error_chunk(chunk::ERROR, &p).unwrap_err()))
        );
        assert!(matches!(
            error_chunk(chunk::ERROR, p.len())(&p[..6]),
            Err(nom::Err::Error(Fail::Wire(WireError::BadValue { .. })))
        ));
    }

    #[test]
    fn error_message_over_limit_before_reading_it() {
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        let p = error_payload(5, &long, None, &[]);
        let want = WireError::BadLength {
            what: "error chunk message",
            len: 4097,
        };
        // Only the 6 fixed bytes have arrived: the limit is already known.
        assert_eq!(
            error_chunk(chunk::ERROR, p.len())(&p[..6]),
            Err(nom::Err::Error(Fail::Wire(want.clone())))
        );
        assert_eq!(parse_error_chunk(chunk::ERROR, &p), Err(want));
    }

    // ---- property tests ----

    fn any_mode() -> impl Strategy<Value = HeaderMode> {
        prop_oneof![
            Just(HeaderMode::Simple),
            Just(HeaderMode::Structured),
            Just(HeaderMode::Extended)
        ]
    }

    proptest! {
        #[test]
        fn simple_roundtrip(error in any::<u32>(), cookie in any::<u64>()) {
            let mut out = BytesMut::new();
            encode_simple_reply(error, cookie, &mut out);
            prop_assert_eq!(out.len(), SIMPLE_REPLY_LEN);
            for mode in [HeaderMode::Simple, HeaderMode::Structured] {
                prop_assert_eq!(parse_reply_header(&out, mode), Ok(ReplyHeader::Simple { error, cookie }));
            }
        }

        #[test]
        fn chunk_roundtrip(
            ext in any::<bool>(),
            flags in any::<u16>(),
            typ in any::<u16>(),
            cookie in any::<u64>(),
            offset in any::<u64>(),
            length in any::<u64>(),
        ) {
            let mode = if ext { HeaderMode::Extended } else { HeaderMode::Structured };
            let length = if ext { length } else { length & u64::from(u32::MAX) };
            let mut out = BytesMut::new();
            encode_chunk_header(mode, flags, typ, cookie, offset, length, &mut out);
            let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
            prop_assert_eq!(reply_header_len(magic, mode), Ok(out.len()));
            let want = ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                offset: if ext { Some(offset) } else { None },
                length,
            };
            prop_assert_eq!(parse_reply_header(&out, mode), Ok(want));
        }

        #[test]
        fn header_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40), mode in any_mode()) {
            let _ = parse_reply_header(&b, mode);
        }

        #[test]
        fn header_valid_magic_never_panics(
            magic in prop_oneof![
                Just(SIMPLE_REPLY_MAGIC),
                Just(STRUCTURED_REPLY_MAGIC),
                Just(EXTENDED_REPLY_MAGIC)
            ],
            tail in proptest::collection::vec(any::<u8>(), 0..36),
            mode in any_mode(),
        ) {
            let mut b = magic.to_be_bytes().to_vec();
            b.extend_from_slice(&tail);
            let r = parse_reply_header(&b, mode);
            let ok = reply_header_len(magic, mode) == Ok(b.len());
            prop_assert_eq!(r.is_ok(), ok);
        }

        #[test]
        fn payload_parsers_never_panic(typ in any::<u16>(), p in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_offset_hole(&p);
            let _ = parse_error_chunk(typ, &p);
            let _ = parse_error_chunk(typ | chunk::FLAG_ERROR, &p);
            let mut out = Vec::new();
            for t in [typ, chunk::BLOCK_STATUS, chunk::BLOCK_STATUS_EXT] {
                match parse_block_status(t, &p, usize::MAX, &mut out) {
                    Ok(_) => {
                        prop_assert!(!out.is_empty());
                        prop_assert!(out.len() <= p.len() / 8);
                        prop_assert!(out.iter().all(|e| e.length != 0));
                    }
                    Err(_) => prop_assert!(out.is_empty()),
                }
            }
        }

        #[test]
        fn block_status_streamed_matches_whole(
            p in proptest::collection::vec(any::<u8>(), 0..100),
            ext in any::<bool>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let typ = if ext { chunk::BLOCK_STATUS_EXT } else { chunk::BLOCK_STATUS };
            let mut out = Vec::new();
            let whole = parse_block_status(typ, &p, usize::MAX, &mut out);
            let got = stream_split(typ, &p, cut.index(p.len() + 1));
            match whole {
                Ok(id) => prop_assert_eq!(got, Ok((id, out))),
                Err(e) => prop_assert_eq!(got, Err(e)),
            }
        }

        #[test]
        fn error_roundtrip(
            error in 1..=u32::MAX,
            msg in proptest::collection::vec(any::<u8>(), 0..300),
            offset in any::<u64>(),
            which in 0u8..3,
            extra in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let (typ, off, extra) = match which {
                0 => (chunk::ERROR, None, Vec::new()),
                1 => (chunk::ERROR_OFFSET, Some(offset), Vec::new()),
                _ => (0x8000 | 0x0100, None, extra),
            };
            let p = error_payload(error, &msg, off, &extra);
            let got = parse_error_chunk(typ, &p).unwrap();
            prop_assert_eq!(got, ErrorChunk { error, message: &msg, offset: off });
        }

        #[test]
        fn block_status_roundtrip(
            id in any::<u32>(),
            ext in proptest::collection::vec((1..=u32::MAX, any::<u32>()), 1..40),
            ext64 in proptest::collection::vec((1..=u64::MAX, any::<u64>()), 1..40),
        ) {
            let mut out = Vec::new();
            let p = bs32(id, &ext);
            prop_assert_eq!(parse_block_status(chunk::BLOCK_STATUS, &p, usize::MAX, &mut out), Ok(id));
            let want: Vec<Extent> = ext
                .iter()
                .map(|&(l, f)| Extent { length: u64::from(l), flags: u64::from(f) })
                .collect();
            prop_assert_eq!(&out, &want);

            let p = bs64(id, u32::try_from(ext64.len()).unwrap(), &ext64);
            prop_assert_eq!(parse_block_status(chunk::BLOCK_STATUS_EXT, &p, usize::MAX, &mut out), Ok(id));
            let want: Vec<Extent> = ext64.iter().map(|&(length, flags)| Extent { length, flags }).collect();
            prop_assert_eq!(&out, &want);
        }

        #[test]
        fn hole_roundtrip(offset in any::<u64>(), size in 1..=u32::MAX) {
            let mut p = offset.to_be_bytes().to_vec();
            p.extend_from_slice(&size.to_be_bytes());
            prop_assert_eq!(parse_offset_hole(&p), Ok((offset, size)));
        }
    }
}
