//! The initial greeting (oldstyle and newstyle), the client flags, and the
//! special reply to `NBD_OPT_EXPORT_NAME`.

use bytes::{BufMut, BytesMut};

use super::WireError;
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

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Classifies the first 16 bytes the server sent (spec §1.1); call once they
/// are all buffered.
pub fn parse_greeting_prefix(b: &[u8; GREETING_PREFIX_LEN]) -> Result<Style, WireError> {
    let magic = be64(&b[..8]);
    if magic != NBDMAGIC {
        return Err(WireError::BadInitialMagic(magic));
    }
    match be64(&b[8..]) {
        IHAVEOPT => Ok(Style::Newstyle),
        OLDSTYLE_MAGIC => Ok(Style::Oldstyle),
        other => Err(WireError::BadVersionMagic(other)),
    }
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

/// Parses greeting bytes 16..28 of an oldstyle server.
pub fn parse_oldstyle_fields(b: &[u8; OLDSTYLE_FIELDS_LEN]) -> OldstyleFields {
    OldstyleFields {
        size: be64(&b[..8]),
        handshake_flags: u16::from_be_bytes([b[8], b[9]]),
        transmission_flags: u16::from_be_bytes([b[10], b[11]]),
    }
}

/// Appends the 4-byte client flags that answer a newstyle greeting.
pub fn encode_client_flags(flags: u32, out: &mut BytesMut) {
    out.put_u32(flags);
}

/// Parses the first 10 bytes of the reply to `NBD_OPT_EXPORT_NAME`:
/// export size and transmission flags.
pub fn parse_export_name_reply(b: &[u8; EXPORT_NAME_REPLY_LEN]) -> (u64, u16) {
    (be64(&b[..8]), u16::from_be_bytes([b[8], b[9]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_1_1_styles() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"NBDMAGIC");
        b[8..].copy_from_slice(b"IHAVEOPT");
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
