//! Transmission-phase request headers: the 28-byte compact form and the
//! 32-byte extended form, plus the `NBD_CMD_BLOCK_STATUS` filter payload.
//!
//! The client only ever encodes requests; [`parse_request`] exists for the
//! test fake server and for fuzzers.

use bytes::{BufMut, BytesMut};
use nom::combinator::map_res;
use nom::Parser;

use super::{be_u16, be_u32, be_u64, run_exact, Fail, PResult, WireError};
use crate::consts::{EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC};

/// One request header as it goes on the wire.
///
/// Build one for every command the client sends, then hand it to
/// [`encode_request`] or [`encode_request_array`]. In compact mode `length`
/// must fit in a `u32`; in extended mode it is the payload length when
/// `NBD_CMD_FLAG_PAYLOAD_LEN` is set and the effect length otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`consts::cmd_flags`).
    pub flags: u16,
    /// Command type (`consts::cmd`).
    pub typ: u16,
    /// Opaque cookie the server echoes in its reply.
    pub cookie: u64,
    /// Offset into the export (for `NBD_CMD_RESIZE`, the new size).
    pub offset: u64,
    /// Payload or effect length.
    pub length: u64,
}

/// Appends the 28-byte compact header (`extended == false`) or the 32-byte
/// extended header (`extended == true`) to `out`.
///
/// Call this when queueing a request for sending; use `extended == true`
/// exactly when extended headers were negotiated. In compact mode a `length`
/// above `u32::MAX` is rejected with [`WireError::BadLength`] and nothing is
/// written to `out`.
pub fn encode_request(
    h: &RequestHeader,
    extended: bool,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let (bytes, used) = encode_request_array(h, extended)?;
    out.extend_from_slice(bytes.get(..used).unwrap_or_default());
    Ok(())
}

/// Encodes a request header into a fixed array and returns it with the
/// number of bytes used (28 for compact, 32 for extended).
///
/// Call this on allocation-free hot paths instead of [`encode_request`]; only
/// the first `used` bytes of the array are the header. Fails like
/// [`encode_request`] when a compact header cannot hold `length`.
pub fn encode_request_array(
    h: &RequestHeader,
    extended: bool,
) -> Result<([u8; 32], usize), WireError> {
    // Hot path (once per request): plain stores, no parser machinery.
    let mut buf = [0u8; 32];
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    buf[0..4].copy_from_slice(&magic.to_be_bytes());
    buf[4..6].copy_from_slice(&h.flags.to_be_bytes());
    buf[6..8].copy_from_slice(&h.typ.to_be_bytes());
    buf[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    buf[16..24].copy_from_slice(&h.offset.to_be_bytes());
    if extended {
        buf[24..32].copy_from_slice(&h.length.to_be_bytes());
        Ok((buf, 32))
    } else {
        let l = u32::try_from(h.length).map_err(|_| WireError::BadLength {
            what: "compact request length",
            len: h.length,
        })?;
        buf[24..28].copy_from_slice(&l.to_be_bytes());
        Ok((buf, 28))
    }
}

/// Appends the `NBD_CMD_BLOCK_STATUS` filter payload to `out`: the u64
/// effect length, then each context id as a u32.
///
/// Call this right after the extended header of a filtered BLOCK_STATUS
/// request (flags include `NBD_CMD_FLAG_PAYLOAD_LEN`, header length
/// `8 + 4 * ids.len()`), only when the server set
/// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
pub fn encode_block_status_filter(effect_len: u64, ids: &[u32], out: &mut BytesMut) {
    out.reserve(ids.len().saturating_mul(4).saturating_add(8));
    out.put_u64(effect_len);
    for id in ids {
        out.put_u32(*id);
    }
}

/// nom parser of a request magic: `false` for the compact header, `true`
/// for the extended one (spec "Request message").
fn request_magic(i: &[u8]) -> PResult<'_, bool> {
    map_res(be_u32, |m| match m {
        REQUEST_MAGIC => Ok(false),
        EXTENDED_REQUEST_MAGIC => Ok(true),
        other => Err(WireError::BadRequestMagic(other)),
    })
    .parse(i)
}

/// nom parser of a whole request header: the magic, then flags, type,
/// cookie, offset, and a u32 (compact) or u64 (extended) length.
fn request(i: &[u8]) -> PResult<'_, RequestHeader> {
    request_magic
        .flat_map(|extended| {
            let length = move |i| {
                if extended {
                    be_u64(i)
                } else {
                    be_u32.map(u64::from).parse(i)
                }
            };
            (be_u16, be_u16, be_u64, be_u64, length)
        })
        .map(|(flags, typ, cookie, offset, length)| RequestHeader {
            flags,
            typ,
            cookie,
            offset,
            length,
        })
        .parse(i)
}

/// Parses a request header of exactly 28 (compact) or 32 (extended) bytes,
/// telling the two apart by the magic.
///
/// Call this from a test server or a fuzzer once the whole header has
/// arrived. An unknown magic gives [`WireError::BadRequestMagic`]; a slice
/// whose length does not match its magic gives [`WireError::BadLength`].
pub fn parse_request(b: &[u8]) -> Result<RequestHeader, WireError> {
    let what = match request_magic(b) {
        Ok((_, false)) => "compact request header",
        Ok((_, true)) => "extended request header",
        Err(nom::Err::Error(Fail::Wire(e)) | nom::Err::Failure(Fail::Wire(e))) => return Err(e),
        Err(_) => "request header",
    };
    run_exact(what, b, request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::{cmd, cmd_flags, EXTENDED_REQUEST_LEN, REQUEST_LEN};
    use crate::wire::testing::splits;
    use proptest::prelude::*;

    #[test]
    fn split_at_every_offset() {
        for ext in [false, true] {
            let (arr, n) = encode_request_array(&hdr(), ext).unwrap();
            assert_eq!(splits(&arr[..n], request), Ok(hdr()));
        }
        let (mut arr, n) = encode_request_array(&hdr(), false).unwrap();
        arr[0] = 0;
        assert_eq!(
            splits(&arr[..n], request),
            Err(Fail::Wire(WireError::BadRequestMagic(0x0060_9513)))
        );
    }

    fn hdr() -> RequestHeader {
        RequestHeader {
            flags: cmd_flags::FUA,
            typ: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1112_1314_1516_1718,
            length: 0x2122_2324,
        }
    }

    #[test]
    fn compact_layout() {
        let mut out = BytesMut::new();
        encode_request(&hdr(), false, &mut out).unwrap();
        assert_eq!(
            &out[..],
            &[
                0x25, 0x60, 0x95, 0x13, // magic
                0x00, 0x01, // flags
                0x00, 0x01, // type
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
                0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // offset
                0x21, 0x22, 0x23, 0x24, // length
            ][..]
        );
        assert_eq!(out.len(), REQUEST_LEN);
    }

    #[test]
    fn extended_layout() {
        let mut out = BytesMut::new();
        let h = RequestHeader {
            length: 0x3132_3334_3536_3738,
            flags: cmd_flags::PAYLOAD_LEN,
            ..hdr()
        };
        encode_request(&h, true, &mut out).unwrap();
        assert_eq!(
            &out[..],
            &[
                0x21, 0xe4, 0x1c, 0x71, // magic
                0x00, 0x20, // flags
                0x00, 0x01, // type
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
                0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // offset
                0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, // length
            ][..]
        );
    }

    #[test]
    fn array_matches_bytesmut() {
        for ext in [false, true] {
            let mut out = BytesMut::new();
            encode_request(&hdr(), ext, &mut out).unwrap();
            let (arr, n) = encode_request_array(&hdr(), ext).unwrap();
            assert_eq!(n, if ext { 32 } else { 28 });
            assert_eq!(&arr[..n], &out[..]);
            assert!(arr[n..].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn compact_length_limit() {
        let mut out = BytesMut::new();
        let ok = RequestHeader {
            length: u64::from(u32::MAX),
            ..hdr()
        };
        encode_request(&ok, false, &mut out).unwrap();
        assert_eq!(&out[24..28], &[0xff; 4]);

        let big = RequestHeader {
            length: u64::from(u32::MAX) + 1,
            ..hdr()
        };
        let mut out = BytesMut::new();
        assert_eq!(
            encode_request(&big, false, &mut out),
            Err(WireError::BadLength {
                what: "compact request length",
                len: 1 << 32
            })
        );
        assert!(out.is_empty(), "nothing written on error");
        assert!(encode_request_array(&big, false).is_err());
        // The same length is fine in an extended header.
        assert!(encode_request_array(&big, true).is_ok());
    }

    #[test]
    fn block_status_filter() {
        let mut out = BytesMut::new();
        encode_block_status_filter(0x1_0000_0000, &[1, 0xdead_beef], &mut out);
        assert_eq!(
            &out[..],
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef][..]
        );
        let mut out = BytesMut::new();
        encode_block_status_filter(7, &[], &mut out);
        assert_eq!(&out[..], &[0, 0, 0, 0, 0, 0, 0, 7][..]);
    }

    #[test]
    fn parse_valid() {
        for ext in [false, true] {
            let (arr, n) = encode_request_array(&hdr(), ext).unwrap();
            assert_eq!(parse_request(&arr[..n]), Ok(hdr()));
        }
    }

    #[test]
    fn parse_bad_magic() {
        let (mut arr, n) = encode_request_array(&hdr(), false).unwrap();
        arr[..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        assert_eq!(
            parse_request(&arr[..n]),
            Err(WireError::BadRequestMagic(0x1256_0953))
        );
    }

    #[test]
    fn parse_length_mismatch() {
        let (c, _) = encode_request_array(&hdr(), false).unwrap();
        let (e, _) = encode_request_array(&hdr(), true).unwrap();
        // Compact magic with 32 bytes, extended magic with 28 bytes.
        assert_eq!(
            parse_request(&c[..32]),
            Err(WireError::BadLength {
                what: "compact request header",
                len: 32
            })
        );
        assert_eq!(
            parse_request(&e[..28]),
            Err(WireError::BadLength {
                what: "extended request header",
                len: 28
            })
        );
    }

    #[test]
    fn parse_truncated() {
        for ext in [false, true] {
            let (arr, n) = encode_request_array(&hdr(), ext).unwrap();
            for cut in 0..n {
                assert!(
                    matches!(parse_request(&arr[..cut]), Err(WireError::BadLength { .. })),
                    "cut {cut}"
                );
            }
        }
    }

    fn any_header() -> impl Strategy<Value = RequestHeader> {
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(flags, typ, cookie, offset, length)| RequestHeader {
                flags,
                typ,
                cookie,
                offset,
                length,
            })
    }

    proptest! {
        #[test]
        fn roundtrip_extended(h in any_header()) {
            let mut out = BytesMut::new();
            encode_request(&h, true, &mut out).unwrap();
            prop_assert_eq!(out.len(), EXTENDED_REQUEST_LEN);
            prop_assert_eq!(parse_request(&out), Ok(h));
        }

        #[test]
        fn roundtrip_compact(h in any_header(), short in any::<u32>()) {
            let h = RequestHeader { length: u64::from(short), ..h };
            let mut out = BytesMut::new();
            encode_request(&h, false, &mut out).unwrap();
            prop_assert_eq!(out.len(), REQUEST_LEN);
            prop_assert_eq!(parse_request(&out), Ok(h));
        }

        #[test]
        fn compact_rejects_long(h in any_header()) {
            let r = encode_request_array(&h, false);
            prop_assert_eq!(r.is_ok(), h.length <= u64::from(u32::MAX));
        }

        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_request(&b);
        }

        #[test]
        fn parse_never_panics_with_magic(
            ext in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..36),
        ) {
            let magic = if ext { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
            let mut b = magic.to_be_bytes().to_vec();
            b.extend_from_slice(&tail);
            let r = parse_request(&b);
            let want = if ext { EXTENDED_REQUEST_LEN } else { REQUEST_LEN };
            prop_assert_eq!(r.is_ok(), b.len() == want);
        }
    }
}
