//! Option requests (client to server) and option replies (server to client)
//! of the fixed-newstyle negotiation, with the payloads of `NBD_REP_SERVER`,
//! `NBD_REP_INFO` and `NBD_REP_META_CONTEXT`.

use bytes::{BufMut, BytesMut};
use nom::bytes::streaming::take;
use nom::combinator::map_res;
use nom::sequence::preceded;
use nom::Parser;

use super::{be_u16, be_u32, be_u64, len64, run_exact, Fail, PResult, WireError};
use crate::consts::{info, IHAVEOPT, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC};

/// Appends an option request: `IHAVEOPT`, the option, the data length and the data.
pub fn encode_option(option: u32, data: &[u8], out: &mut BytesMut) {
    out.reserve(16 + data.len());
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Appends the data of an `NBD_OPT_INFO` or `NBD_OPT_GO` request: the export
/// name, then the list of `NBD_INFO_*` codes wanted (rule 27).
pub fn encode_info_request(name: &str, infos: &[u16], out: &mut BytesMut) {
    out.put_u32(name.len() as u32);
    out.put_slice(name.as_bytes());
    out.put_u16(infos.len() as u16);
    for i in infos {
        out.put_u16(*i);
    }
}

/// Appends the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
/// the export name, then each query with its length.
pub fn encode_meta_context_request<S: AsRef<str>>(name: &str, queries: &[S], out: &mut BytesMut) {
    out.put_u32(name.len() as u32);
    out.put_slice(name.as_bytes());
    out.put_u32(queries.len() as u32);
    for q in queries {
        let q = q.as_ref();
        out.put_u32(q.len() as u32);
        out.put_slice(q.as_bytes());
    }
}

/// The fixed 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option the server says it answers.
    pub option: u32,
    /// `NBD_REP_*` reply type.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// nom parser of an option reply header (spec "Option reply"): the
/// option reply magic, then option, reply type and length as u32s.
fn option_reply_header(i: &[u8]) -> PResult<'_, OptionReplyHeader> {
    let magic = map_res(be_u64, |m| match m {
        OPTION_REPLY_MAGIC => Ok(()),
        other => Err(WireError::BadOptionReplyMagic(other)),
    });
    preceded(magic, (be_u32, be_u32, be_u32))
        .map(|(option, reply_type, length)| OptionReplyHeader {
            option,
            reply_type,
            length,
        })
        .parse(i)
}

/// Parses an option reply header, checking its magic.
pub fn parse_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, WireError> {
    run_exact("option reply header", b, option_reply_header)
}

/// Checks that `b` is a protocol string: valid UTF-8 without NUL.
pub fn parse_string<'a>(what: &'static str, b: &'a [u8]) -> Result<&'a str, WireError> {
    match std::str::from_utf8(b) {
        Ok(s) if !s.contains('\0') => Ok(s),
        _ => Err(WireError::BadString(what)),
    }
}

/// Decodes human-readable text (descriptions, error messages) without
/// failing: invalid UTF-8 is replaced, so a message is never lost.
pub fn human_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fatal error for a nom parser.
fn fail(e: WireError) -> nom::Err<Fail> {
    nom::Err::Failure(Fail::Wire(e))
}

/// Fails with [`WireError::BadLength`] unless the payload length `len`
/// (from the option reply header) is at least `min`.
fn at_least(what: &'static str, len: usize, min: usize) -> Result<usize, nom::Err<Fail>> {
    len.checked_sub(min).ok_or_else(|| {
        fail(WireError::BadLength {
            what,
            len: len64(len),
        })
    })
}

/// nom parser of an `NBD_REP_SERVER` payload of `len` bytes: u32 name
/// length, name, then the rest as details.
fn server_reply<'a>(len: usize) -> impl FnMut(&'a [u8]) -> PResult<'a, (&'a str, String)> {
    move |i| {
        let room = at_least("NBD_REP_SERVER", len, 4)?;
        let name_len = map_res(be_u32, move |n| {
            usize::try_from(n)
                .ok()
                .filter(|n| *n <= room)
                .ok_or(WireError::InnerLengthOverflow {
                    what: "NBD_REP_SERVER",
                    inner: u64::from(n),
                    outer: len64(len),
                })
        });
        name_len
            .flat_map(move |n| {
                (
                    map_res(take(n), |b| parse_string("NBD_REP_SERVER name", b)),
                    take(room - n).map(human_text),
                )
            })
            .parse(i)
    }
}

/// Parses an `NBD_REP_SERVER` payload into the export name and the
/// implementation-specific details (in practice a description).
pub fn parse_server_reply(p: &[u8]) -> Result<(&str, String), WireError> {
    run_exact("NBD_REP_SERVER", p, server_reply(p.len()))
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`: the canonical export name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        maximum: u32,
    },
    /// A type this client does not know; ignored (rule 29).
    Unknown(u16),
}

/// nom parser of an `NBD_REP_INFO` payload of `len` bytes: u16 type,
/// then the body its type has (spec "`NBD_REP_INFO`").
fn info_reply<'a>(len: usize) -> impl FnMut(&'a [u8]) -> PResult<'a, InfoReply> {
    move |i| {
        let body = at_least("NBD_REP_INFO", len, 2)?;
        let exact = |what: &'static str, n: usize| {
            if len == n {
                Ok(())
            } else {
                Err(fail(WireError::BadLength {
                    what,
                    len: len64(len),
                }))
            }
        };
        let (i, typ) = be_u16(i)?;
        match typ {
            info::EXPORT => {
                exact("NBD_INFO_EXPORT", 12)?;
                (be_u64, be_u16)
                    .map(|(size, flags)| InfoReply::Export { size, flags })
                    .parse(i)
            }
            info::NAME => map_res(take(body), |b| {
                parse_string("NBD_INFO_NAME", b).map(|s| InfoReply::Name(s.to_owned()))
            })
            .parse(i),
            info::DESCRIPTION => take(body)
                .map(|b| InfoReply::Description(human_text(b)))
                .parse(i),
            info::BLOCK_SIZE => {
                exact("NBD_INFO_BLOCK_SIZE", 14)?;
                (be_u32, be_u32, be_u32)
                    .map(|(minimum, preferred, maximum)| InfoReply::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    })
                    .parse(i)
            }
            other => take(body).map(|_| InfoReply::Unknown(other)).parse(i),
        }
    }
}

/// Parses an `NBD_REP_INFO` payload. Known types must have their exact
/// lengths; unknown types are reported as [`InfoReply::Unknown`].
pub fn parse_info_reply(p: &[u8]) -> Result<InfoReply, WireError> {
    run_exact("NBD_REP_INFO", p, info_reply(p.len()))
}

/// nom parser of an `NBD_REP_META_CONTEXT` payload of `len` bytes: u32
/// context id, then a non-empty name.
fn meta_context_reply<'a>(len: usize) -> impl FnMut(&'a [u8]) -> PResult<'a, (u32, &'a str)> {
    move |i| {
        let name = at_least("NBD_REP_META_CONTEXT", len, 5)? + 1;
        (
            be_u32,
            map_res(take(name), |b| parse_string("NBD_REP_META_CONTEXT name", b)),
        )
            .parse(i)
    }
}

/// Parses an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_meta_context_reply(p: &[u8]) -> Result<(u32, &str), WireError> {
    run_exact("NBD_REP_META_CONTEXT", p, meta_context_reply(p.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::{opt, rep};
    use crate::wire::testing::splits;

    fn wire(e: WireError) -> Fail {
        Fail::Wire(e)
    }

    #[test]
    fn reply_header_split_at_every_offset() {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        b[12..16].copy_from_slice(&rep::INFO.to_be_bytes());
        b[16..].copy_from_slice(&12u32.to_be_bytes());
        let want = OptionReplyHeader {
            option: opt::GO,
            reply_type: rep::INFO,
            length: 12,
        };
        assert_eq!(splits(&b, option_reply_header), Ok(want));
        assert_eq!(parse_option_reply_header(&b), Ok(want));
        b[7] ^= 1;
        let magic = u64::from_be_bytes(b[..8].try_into().unwrap());
        assert_eq!(
            splits(&b, option_reply_header),
            Err(wire(WireError::BadOptionReplyMagic(magic)))
        );
    }

    #[test]
    fn payloads_split_at_every_offset() {
        let mut server = 3u32.to_be_bytes().to_vec();
        server.extend_from_slice(b"abcdesc");
        assert_eq!(
            splits(&server, server_reply(server.len())),
            Ok(("abc", "desc".to_owned()))
        );

        let mut export = info::EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 40).to_be_bytes());
        export.extend_from_slice(&3u16.to_be_bytes());
        let mut bs = info::BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, 1 << 25] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        let mut name = info::NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        let mut desc = info::DESCRIPTION.to_be_bytes().to_vec();
        desc.extend_from_slice(b"a \xff disk");
        let unknown = [0u8, 99, 1, 2, 3];
        for (p, want) in [
            (
                &export[..],
                InfoReply::Export {
                    size: 1 << 40,
                    flags: 3,
                },
            ),
            (
                &bs[..],
                InfoReply::BlockSize {
                    minimum: 1,
                    preferred: 4096,
                    maximum: 1 << 25,
                },
            ),
            (&name[..], InfoReply::Name("disk".into())),
            (&desc[..], InfoReply::Description("a \u{fffd} disk".into())),
            (&unknown[..], InfoReply::Unknown(99)),
        ] {
            assert_eq!(splits(p, info_reply(p.len())), Ok(want.clone()));
            assert_eq!(parse_info_reply(p), Ok(want));
        }

        let mut mc = 9u32.to_be_bytes().to_vec();
        mc.extend_from_slice(b"base:allocation");
        assert_eq!(
            splits(&mc, super::meta_context_reply(mc.len())),
            Ok((9, "base:allocation"))
        );
    }

    #[test]
    fn payload_errors_split_at_every_offset() {
        // Name length past the payload: known once the length field is in.
        let mut p = vec![0, 0, 0, 9];
        p.extend_from_slice(b"abc");
        assert_eq!(
            splits(&p, server_reply(p.len())),
            Err(wire(WireError::InnerLengthOverflow {
                what: "NBD_REP_SERVER",
                inner: 9,
                outer: 7
            }))
        );
        // A wrong length for a known info type: known from the type.
        let mut p = info::EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&[0; 11]);
        assert_eq!(
            splits(&p, info_reply(p.len())),
            Err(wire(WireError::BadLength {
                what: "NBD_INFO_EXPORT",
                len: 13
            }))
        );
        // NUL in a context name: known at the end.
        let mut p = 9u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"a\0b");
        assert_eq!(
            splits(&p, super::meta_context_reply(p.len())),
            Err(wire(WireError::BadString("NBD_REP_META_CONTEXT name")))
        );
    }

    #[test]
    fn option_request_layout() {
        let mut b = BytesMut::new();
        let mut d = BytesMut::new();
        encode_info_request("ab", &[info::BLOCK_SIZE], &mut d);
        // rule 27: option length is exactly 4 + N + 2 + 2K
        assert_eq!(d.len(), 4 + 2 + 2 + 2);
        encode_option(opt::GO, &d, &mut b);
        assert_eq!(&b[..8], b"IHAVEOPT");
        assert_eq!(&b[8..12], &7u32.to_be_bytes());
        assert_eq!(&b[12..16], &10u32.to_be_bytes());
        assert_eq!(&b[16..20], &2u32.to_be_bytes());
        assert_eq!(&b[20..22], b"ab");
    }

    #[test]
    fn meta_context_request_layout() {
        let mut d = BytesMut::new();
        encode_meta_context_request("e", &["base:allocation"], &mut d);
        assert_eq!(d.len(), 4 + 1 + 4 + 4 + 15);
    }

    #[test]
    fn reply_header_magic_checked() {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&3u32.to_be_bytes());
        b[12..16].copy_from_slice(&1u32.to_be_bytes());
        let h = parse_option_reply_header(&b).unwrap();
        assert_eq!((h.option, h.reply_type, h.length), (3, 1, 0));
        b[0] = 0xff;
        assert!(parse_option_reply_header(&b).is_err());
    }

    #[test]
    fn rule_2_8_inner_name_length_larger_than_reply() {
        let mut p = vec![0, 0, 0, 9];
        p.extend_from_slice(b"abc");
        assert!(matches!(
            parse_server_reply(&p),
            Err(WireError::InnerLengthOverflow { inner: 9, .. })
        ));
        let mut p = vec![0, 0, 0, 3];
        p.extend_from_slice(b"abcdesc");
        assert_eq!(parse_server_reply(&p).unwrap(), ("abc", "desc".into()));
    }

    #[test]
    fn info_lengths() {
        let mut p = vec![0, 0];
        p.extend_from_slice(&5u64.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        assert_eq!(
            parse_info_reply(&p).unwrap(),
            InfoReply::Export { size: 5, flags: 1 }
        );
        p.push(0);
        assert!(parse_info_reply(&p).is_err());
        assert_eq!(
            parse_info_reply(&[0, 99, 1, 2]).unwrap(),
            InfoReply::Unknown(99)
        );
        assert!(parse_info_reply(&[0]).is_err());
        assert!(parse_info_reply(&[0, 3, 0]).is_err());
    }

    #[test]
    fn meta_context_reply() {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_context_reply(&p).unwrap(),
            (7, "base:allocation")
        );
        assert!(parse_meta_context_reply(&p[..4]).is_err());
        p.push(0);
        assert!(parse_meta_context_reply(&p).is_err());
    }
}
