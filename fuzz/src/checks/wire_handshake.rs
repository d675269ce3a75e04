//! Handshake parsers: greeting prefix, oldstyle fields, client flags and the
//! NBD_OPT_EXPORT_NAME reply.
use bytes::BytesMut;
use nbd_core::consts::{IHAVEOPT, NBDMAGIC, OLDSTYLE_MAGIC};
use nbd_core::wire::handshake::{self, Style, EXPORT_NAME_REPLY_LEN, GREETING_PREFIX_LEN};
use nbd_core::wire::WireError;

/// The `wire_handshake` target's check: call it with one input.
pub fn check(data: &[u8]) {
    if let Some(b) = data.first_chunk::<GREETING_PREFIX_LEN>() {
        let magic = u64::from_be_bytes(b[..8].try_into().unwrap());
        let version = u64::from_be_bytes(b[8..].try_into().unwrap());
        match handshake::parse_greeting_prefix(b) {
            Ok(Style::Newstyle) => assert!(magic == NBDMAGIC && version == IHAVEOPT),
            Ok(Style::Oldstyle) => assert!(magic == NBDMAGIC && version == OLDSTYLE_MAGIC),
            Err(WireError::BadInitialMagic(m)) => assert!(m == magic && m != NBDMAGIC),
            Err(WireError::BadVersionMagic(v)) => {
                assert!(magic == NBDMAGIC && v == version);
                assert!(v != IHAVEOPT && v != OLDSTYLE_MAGIC);
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    if let Some(b) = data.first_chunk::<12>() {
        let f = handshake::parse_oldstyle_fields(b);
        assert_eq!(f.size.to_be_bytes(), b[..8]);
        assert_eq!(f.handshake_flags.to_be_bytes(), b[8..10]);
        assert_eq!(f.transmission_flags.to_be_bytes(), b[10..12]);
    }
    if let Some(b) = data.first_chunk::<EXPORT_NAME_REPLY_LEN>() {
        let (size, flags) = handshake::parse_export_name_reply(b);
        assert_eq!(size.to_be_bytes(), b[..8]);
        assert_eq!(flags.to_be_bytes(), b[8..10]);
    }
    if let Some(b) = data.first_chunk::<4>() {
        let flags = u32::from_be_bytes(*b);
        let mut out = BytesMut::new();
        handshake::encode_client_flags(flags, &mut out);
        assert_eq!(&out[..], b);
    }
}
