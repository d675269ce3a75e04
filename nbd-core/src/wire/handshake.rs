//! The initial greeting (oldstyle and newstyle), the client flags, and the
//! special reply to `NBD_OPT_EXPORT_NAME`.

use bytes::{BufMut, BytesMut};
use nom::combinator::map_res;
use nom::sequence::preceded;
use nom::Parser;

use super::{be_u16, be_u64, run_exact, run_fixed, PResult, WireError};
use crate::consts::{IHAVEOPT, NBDMAGIC, OLDSTYLE_MAGIC};

/// Bytes the client must read before it can tell the handshake style.
pub const GREETING_PREFIX_LEN: usize = 16;
/// Bytes of an oldstyle greeting that follow the 16-byte prefix and carry
/// information (size and flags); 124 reserved bytes follow them.
pub const OLDSTYLE_FIELDS_LEN: usize = 12;
/// Bytes of the `NBD_OPT_EXPORT_NAME` reply before its optional zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;

/// The handshake style announced by the first 16 bytes from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `NBDMAGIC` then the oldstyle magic: size and flags follow, no options.
    Oldstyle,
    /// `NBDMAGIC` then `IHAVEOPT`: a u16 of handshake flags follows.
    Newstyle,
}

/// nom parser of the first 16 greeting bytes (spec "Newstyle
/// negotiation", "Oldstyle negotiation"): `NBDMAGIC`, then the magic that
/// tells the style.
fn greeting_prefix(i: &[u8]) -> PResult<'_, Style> {
    let nbdmagic = map_res(be_u64, |m| match m {
        NBDMAGIC => Ok(()),
        other => Err(WireError::BadInitialMagic(other)),
    });
    let style = map_res(be_u64, |m| match m {
        IHAVEOPT => Ok(Style::Newstyle),
        OLDSTYLE_MAGIC => Ok(Style::Oldstyle),
        other => Err(WireError::BadVersionMagic(other)),
    });
    preceded(nbdmagic, style).parse(i)
}

/// Classifies the first 16 bytes the server sent (spec §1.1); call once they
/// are all buffered.
pub fn parse_greeting_prefix(b: &[u8; GREETING_PREFIX_LEN]) -> Result<Style, WireError> {
    run_exact("greeting", b, greeting_prefix)
}

/// The informative fields of an oldstyle greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldstyleFields {
    /// Export size in bytes.
    pub size: u64,
    /// High 16 bits of the flags word: handshake flags, which must be zero.
    pub handshake_flags: u16,
    /// Low 16 bits of the flags word: transmission flags.
    pub transmission_flags: u16,
}

/// nom parser of oldstyle greeting bytes 16..28: u64 size, u32 flags
/// (handshake flags in the high half, transmission flags in the low half).
fn oldstyle_fields(i: &[u8]) -> PResult<'_, (u64, u16, u16)> {
    (be_u64, be_u16, be_u16).parse(i)
}

/// Parses greeting bytes 16..28 of an oldstyle server.
pub fn parse_oldstyle_fields(b: &[u8; OLDSTYLE_FIELDS_LEN]) -> OldstyleFields {
    let (size, handshake_flags, transmission_flags) = run_fixed(b, oldstyle_fields);
    OldstyleFields {
        size,
        handshake_flags,
        transmission_flags,
    }
}

/// Appends the 4-byte client flags that answer a newstyle greeting.
pub fn encode_client_flags(flags: u32, out: &mut BytesMut) {
    out.put_u32(flags);
}

/// nom parser of the first 10 bytes of the `NBD_OPT_EXPORT_NAME` reply:
/// u64 export size, u16 transmission flags.
fn export_name_reply(i: &[u8]) -> PResult<'_, (u64, u16)> {
    (be_u64, be_u16).parse(i)
}

/// Parses the first 10 bytes of the reply to `NBD_OPT_EXPORT_NAME`:
/// export size and transmission flags.
pub fn parse_export_name_reply(b: &[u8; EXPORT_NAME_REPLY_LEN]) -> (u64, u16) {
    run_fixed(b, export_name_reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testing::splits;
    use crate::wire::Fail;

    fn newstyle() -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"NBDMAGIC");
        b[8..].copy_from_slice(b"IHAVEOPT");
        b
    }

    #[test]
    fn greeting_split_at_every_offset() {
        let mut b = newstyle();
        assert_eq!(splits(&b, greeting_prefix), Ok(Style::Newstyle));
        b[8..].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert_eq!(splits(&b, greeting_prefix), Ok(Style::Oldstyle));
        // A bad initial magic is known after 8 bytes, a bad version after 16.
        b[8..].copy_from_slice(b"garbage!");
        let e = Fail::Wire(WireError::BadVersionMagic(u64::from_be_bytes(*b"garbage!")));
        assert_eq!(splits(&b, greeting_prefix), Err(e));
        b[..8].copy_from_slice(b"HTTP/1.1");
        let e = Fail::Wire(WireError::BadInitialMagic(u64::from_be_bytes(*b"HTTP/1.1")));
        assert_eq!(splits(&b, greeting_prefix), Err(e.clone()));
        assert!(matches!(greeting_prefix(&b[..8]), Err(nom::Err::Error(f)) if f == e));
    }

    #[test]
    fn fixed_fields_split_at_every_offset() {
        let mut o = [0u8; 12];
        o[..8].copy_from_slice(&(5u64 << 33).to_be_bytes());
        o[8..].copy_from_slice(&[0, 1, 0, 3]);
        assert_eq!(splits(&o, super::oldstyle_fields), Ok((5 << 33, 1, 3)));
        let f = parse_oldstyle_fields(&o);
        assert_eq!(
            (f.size, f.handshake_flags, f.transmission_flags),
            (5 << 33, 1, 3)
        );
        let mut e = [0u8; 10];
        e[..8].copy_from_slice(&7u64.to_be_bytes());
        e[9] = 0x41;
        assert_eq!(splits(&e, super::export_name_reply), Ok((7, 0x41)));
        assert_eq!(parse_export_name_reply(&e), (7, 0x41));
    }

    #[test]
    fn rule_1_1_styles() {
        let mut b = newstyle();
        assert_eq!(parse_greeting_prefix(&b), Ok(Style::Newstyle));
        b[8..].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert_eq!(parse_greeting_prefix(&b), Ok(Style::Oldstyle));
        b[8..].copy_from_slice(b"garbage!");
        assert!(matches!(
            parse_greeting_prefix(&b),
            Err(WireError::BadVersionMagic(_))
        ));
        b[..8].copy_from_slice(b"HTTP/1.1");
        assert!(matches!(
            parse_greeting_prefix(&b),
            Err(WireError::BadInitialMagic(_))
        ));
    }

    #[test]
    fn oldstyle_fields() {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&2048u64.to_be_bytes());
        b[10..].copy_from_slice(&0x0003u16.to_be_bytes());
        let f = parse_oldstyle_fields(&b);
        assert_eq!(f.size, 2048);
        assert_eq!(f.handshake_flags, 0);
        assert_eq!(f.transmission_flags, 3);
    }

    #[test]
    fn export_name_reply() {
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&(1u64 << 40).to_be_bytes());
        b[8..].copy_from_slice(&0x0101u16.to_be_bytes());
        assert_eq!(parse_export_name_reply(&b), (1 << 40, 0x0101));
    }
}
