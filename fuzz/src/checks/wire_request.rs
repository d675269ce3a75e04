//! Request header parser (used by fake servers): parse_request, with an
//! encode round trip.
use bytes::BytesMut;
use nbd_core::consts::{EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REQUEST_LEN, REQUEST_MAGIC};
use nbd_core::wire::request::{encode_request, encode_request_array, parse_request};

/// The `wire_request` target's check: call it with one input.
pub fn check(data: &[u8]) {
    let r = parse_request(data);
    let magic = data.first_chunk::<4>().map(|m| u32::from_be_bytes(*m));
    let want_len = match magic {
        Some(REQUEST_MAGIC) => Some(REQUEST_LEN),
        Some(EXTENDED_REQUEST_MAGIC) => Some(EXTENDED_REQUEST_LEN),
        _ => None,
    };
    assert_eq!(r.is_ok(), want_len == Some(data.len()));
    if let Ok(h) = r {
        let extended = data.len() == EXTENDED_REQUEST_LEN;
        let mut out = BytesMut::new();
        encode_request(&h, extended, &mut out).expect("a parsed header re-encodes");
        assert_eq!(&out[..], data);
        let (arr, n) = encode_request_array(&h, extended).unwrap();
        assert_eq!(&arr[..n], data);
    }
    // Every prefix of a valid header is rejected, never a panic.
    if let Some(n) = want_len {
        for cut in 0..n.min(data.len()) {
            assert!(parse_request(&data[..cut]).is_err());
        }
    }
}
