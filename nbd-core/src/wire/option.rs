//! Option requests (client to server) and option replies (server to client)
//! of the fixed-newstyle negotiation, with the payloads of `NBD_REP_SERVER`,
//! `NBD_REP_INFO` and `NBD_REP_META_CONTEXT`.

use bytes::{BufMut, BytesMut};

use super::WireError;
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

/// Parses an option reply header, checking its magic.
pub fn parse_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, WireError> {
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[..8]);
    let magic = u64::from_be_bytes(m);
    if magic != OPTION_REPLY_MAGIC {
        return Err(WireError::BadOptionReplyMagic(magic));
    }
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Ok(OptionReplyHeader {
        option: u32_at(8),
        reply_type: u32_at(12),
        length: u32_at(16),
    })
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

fn split_u32_len<'a>(what: &'static str, p: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), WireError> {
    if p.len() < 4 {
        return Err(WireError::BadLength {
            what,
            len: p.len() as u64,
        });
    }
    let n = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as u64;
    let rest = &p[4..];
    if n > rest.len() as u64 {
        return Err(WireError::InnerLengthOverflow {
            what,
            inner: n,
            outer: p.len() as u64,
        });
    }
    Ok(rest.split_at(n as usize))
}

/// Parses an `NBD_REP_SERVER` payload into the export name and the
/// implementation-specific details (in practice a description).
pub fn parse_server_reply(p: &[u8]) -> Result<(&str, String), WireError> {
    let (name, details) = split_u32_len("NBD_REP_SERVER", p)?;
    Ok((
        parse_string("NBD_REP_SERVER name", name)?,
        human_text(details),
    ))
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

/// Parses an `NBD_REP_INFO` payload. Known types must have their exact
/// lengths; unknown types are reported as [`InfoReply::Unknown`].
pub fn parse_info_reply(p: &[u8]) -> Result<InfoReply, WireError> {
    if p.len() < 2 {
        return Err(WireError::BadLength {
            what: "NBD_REP_INFO",
            len: p.len() as u64,
        });
    }
    let typ = u16::from_be_bytes([p[0], p[1]]);
    let body = &p[2..];
    let exact = |what: &'static str, n: usize| {
        if p.len() == n {
            Ok(())
        } else {
            Err(WireError::BadLength {
                what,
                len: p.len() as u64,
            })
        }
    };
    let be32 = |i: usize| u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    Ok(match typ {
        info::EXPORT => {
            exact("NBD_INFO_EXPORT", 12)?;
            let mut s = [0u8; 8];
            s.copy_from_slice(&body[..8]);
            InfoReply::Export {
                size: u64::from_be_bytes(s),
                flags: u16::from_be_bytes([body[8], body[9]]),
            }
        }
        info::NAME => InfoReply::Name(parse_string("NBD_INFO_NAME", body)?.to_owned()),
        info::DESCRIPTION => InfoReply::Description(human_text(body)),
        info::BLOCK_SIZE => {
            exact("NBD_INFO_BLOCK_SIZE", 14)?;
            InfoReply::BlockSize {
                minimum: be32(0),
                preferred: be32(4),
                maximum: be32(8),
            }
        }
        other => InfoReply::Unknown(other),
    })
}

/// Parses an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_meta_context_reply(p: &[u8]) -> Result<(u32, &str), WireError> {
    if p.len() < 5 {
        return Err(WireError::BadLength {
            what: "NBD_REP_META_CONTEXT",
            len: p.len() as u64,
        });
    }
    let id = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
    Ok((id, parse_string("NBD_REP_META_CONTEXT name", &p[4..])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::opt;

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
