//! Option reply parsers: the reply header and the NBD_REP_SERVER,
//! NBD_REP_INFO and NBD_REP_META_CONTEXT payloads, plus the option request
//! encoders (layout of rule 27).
use bytes::BytesMut;
use nbd_core::consts::{info, IHAVEOPT, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC};
use nbd_core::wire::option::{self as wopt, InfoReply};

/// The `wire_option` target's check: call it with one input.
pub fn check(data: &[u8]) {
    if let Some(b) = data.first_chunk::<OPTION_REPLY_HEADER_LEN>() {
        let magic = u64::from_be_bytes(b[..8].try_into().unwrap());
        match wopt::parse_option_reply_header(b) {
            Ok(h) => {
                assert_eq!(magic, OPTION_REPLY_MAGIC);
                assert_eq!(h.option.to_be_bytes(), b[8..12]);
                assert_eq!(h.reply_type.to_be_bytes(), b[12..16]);
                assert_eq!(h.length.to_be_bytes(), b[16..20]);
            }
            Err(_) => assert_ne!(magic, OPTION_REPLY_MAGIC),
        }
    }

    let p = data;
    if let Ok((name, description)) = wopt::parse_server_reply(p) {
        let n = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
        assert_eq!(name.len(), n);
        assert_eq!(name.as_bytes(), &p[4..4 + n]);
        assert!(!name.contains('\0'));
        assert_eq!(description, String::from_utf8_lossy(&p[4 + n..]));
    }

    match wopt::parse_info_reply(p) {
        Ok(InfoReply::Export { size, flags }) => {
            assert_eq!(p.len(), 12);
            assert_eq!(&p[..2], &info::EXPORT.to_be_bytes());
            assert_eq!(size.to_be_bytes(), p[2..10]);
            assert_eq!(flags.to_be_bytes(), p[10..12]);
        }
        Ok(InfoReply::Name(n)) => {
            assert_eq!(&p[..2], &info::NAME.to_be_bytes());
            assert_eq!(n.as_bytes(), &p[2..]);
        }
        Ok(InfoReply::Description(d)) => {
            assert_eq!(&p[..2], &info::DESCRIPTION.to_be_bytes());
            assert_eq!(d, String::from_utf8_lossy(&p[2..]));
        }
        Ok(InfoReply::BlockSize {
            minimum,
            preferred,
            maximum,
        }) => {
            assert_eq!(p.len(), 14);
            assert_eq!(minimum.to_be_bytes(), p[2..6]);
            assert_eq!(preferred.to_be_bytes(), p[6..10]);
            assert_eq!(maximum.to_be_bytes(), p[10..14]);
        }
        Ok(InfoReply::Unknown(t)) => {
            assert!(t > info::BLOCK_SIZE);
            assert_eq!(t.to_be_bytes(), p[..2]);
        }
        Err(_) => {}
    }

    if let Ok((id, name)) = wopt::parse_meta_context_reply(p) {
        assert_eq!(id.to_be_bytes(), p[..4]);
        assert_eq!(name.as_bytes(), &p[4..]);
        assert!(!name.is_empty());
    }

    let text = wopt::human_text(p);
    assert!(text.len() <= 3 * p.len());
    if let Ok(s) = wopt::parse_string("fuzz", p) {
        assert_eq!(s.as_bytes(), p);
        assert!(!s.contains('\0'));
    }

    // Encoders: lengths follow the spec's layouts.
    let text = String::from_utf8_lossy(p);
    let mid = (0..=text.len() / 2)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let (name, rest) = text.split_at(mid);
    let infos: Vec<u16> = p
        .chunks_exact(2)
        .take(8)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let mut d = BytesMut::new();
    wopt::encode_info_request(name, &infos, &mut d);
    assert_eq!(d.len(), 4 + name.len() + 2 + 2 * infos.len());
    let queries: Vec<&str> = rest.split('\n').take(16).collect();
    let mut m = BytesMut::new();
    wopt::encode_meta_context_request(name, &queries, &mut m);
    let qlen: usize = queries.iter().map(|q| 4 + q.len()).sum();
    assert_eq!(m.len(), 4 + name.len() + 4 + qlen);
    let mut o = BytesMut::new();
    wopt::encode_option(9, &m, &mut o);
    assert_eq!(o.len(), 16 + m.len());
    assert_eq!(&o[..8], &IHAVEOPT.to_be_bytes());
    assert_eq!(&o[12..16], &(m.len() as u32).to_be_bytes());
}
