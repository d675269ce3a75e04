//! Transmission reply parsers: reply_header_len / parse_reply_header in each
//! HeaderMode (with an encode round trip), OFFSET_DATA length and prefix,
//! OFFSET_HOLE, error chunks and block status chunks. Block status goes
//! through the same calls the state machine makes as a payload streams in
//! (`check_block_status_len`, `parse_block_status_head`,
//! `parse_block_status_extents`), fed in pieces the selector byte picks,
//! and must agree with the whole-payload `parse_block_status`.
use bytes::BytesMut;
use nbd_core::consts::{
    chunk, EXTENDED_REPLY_MAGIC, MAX_STRING_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use nbd_core::wire::reply::{self as wrep, HeaderMode, ReplyHeader};
use nbd_core::wire::WireError;
use nbd_core::Extent;

const MODES: [HeaderMode; 3] = [
    HeaderMode::Simple,
    HeaderMode::Structured,
    HeaderMode::Extended,
];

fn check_header(b: &[u8], mode: HeaderMode) {
    let Some(m) = b.first_chunk::<4>() else {
        assert!(wrep::parse_reply_header(b, mode).is_err());
        return;
    };
    let magic = u32::from_be_bytes(*m);
    let want = match (magic, mode) {
        (SIMPLE_REPLY_MAGIC, HeaderMode::Simple | HeaderMode::Structured) => Some(16),
        (STRUCTURED_REPLY_MAGIC, HeaderMode::Structured) => Some(20),
        (EXTENDED_REPLY_MAGIC, HeaderMode::Extended) => Some(32),
        _ => None,
    };
    assert_eq!(wrep::reply_header_len(magic, mode).ok(), want);
    // The whole slice: accepted only at exactly the header length.
    let whole = wrep::parse_reply_header(b, mode);
    assert_eq!(whole.is_ok(), want == Some(b.len()));
    let Some(n) = want else { return };
    let Some(hb) = b.get(..n) else { return };
    let h = wrep::parse_reply_header(hb, mode).expect("a header of the right length parses");
    let mut out = BytesMut::new();
    match h {
        ReplyHeader::Simple { error, cookie } => {
            assert_eq!(n, 16);
            wrep::encode_simple_reply(error, cookie, &mut out);
        }
        ReplyHeader::Chunk {
            flags,
            typ,
            cookie,
            offset,
            length,
        } => {
            assert_eq!(offset.is_some(), mode == HeaderMode::Extended);
            let enc_mode = if n == 20 {
                HeaderMode::Structured
            } else {
                HeaderMode::Extended
            };
            wrep::encode_chunk_header(
                enc_mode,
                flags,
                typ,
                cookie,
                offset.unwrap_or(0),
                length,
                &mut out,
            );
        }
    }
    assert_eq!(&out[..], hb, "re-encoding a parsed header changed it");
}

/// Limit on extents per chunk, small enough for inputs to reach it.
const MAX_EXTENTS: usize = 64;

/// Feeds the block status payload `b` of type `typ` to the streaming
/// parsers the way the state machine does (length check at the chunk
/// header, then the fixed part, then descriptors as bytes arrive), with
/// each read delivering at most `step` new bytes.
fn stream_block_status(typ: u16, b: &[u8], step: usize) -> Result<(u32, Vec<Extent>), WireError> {
    let length = b.len() as u64;
    let n = wrep::check_block_status_len(typ, length, MAX_EXTENTS)?;
    let mut arrived = 0;
    let mut pos = 0;
    let more = |arrived: &mut usize| {
        let before = *arrived;
        *arrived = (*arrived + step).min(b.len());
        assert!(
            *arrived > before,
            "parser wants more than the payload holds"
        );
    };
    let head = loop {
        match wrep::parse_block_status_head(typ, length, &b[pos..arrived])? {
            Some((h, used)) => {
                pos += used;
                break h;
            }
            None => more(&mut arrived),
        }
    };
    assert_eq!(head.descriptors, n);
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let before = out.len();
        let used = wrep::parse_block_status_extents(typ, &b[pos..arrived], left, &mut out)?;
        if used == 0 {
            more(&mut arrived);
            continue;
        }
        pos += used;
        left -= (out.len() - before) as u64;
    }
    assert_eq!(pos, b.len(), "descriptors left unread");
    Ok((head.context_id, out))
}

/// The `wire_reply` target's check: call it with one input.
pub fn check(data: &[u8]) {
    let Some((&sel, b)) = data.split_first() else {
        return;
    };
    for mode in MODES {
        check_header(b, mode);
    }

    if let Some(l) = b.first_chunk::<8>() {
        let len = u64::from_be_bytes(*l);
        assert_eq!(wrep::check_offset_data_len(len).is_ok(), len >= 9);
        assert_eq!(wrep::parse_offset_data_prefix(l), len);
    }

    match wrep::parse_offset_hole(b) {
        Ok((off, size)) => {
            assert_eq!(b.len(), 12);
            assert_ne!(size, 0);
            assert_eq!(off.to_be_bytes(), b[..8]);
        }
        Err(_) => assert!(b.len() != 12 || b[8..12] == [0; 4]),
    }

    // Error chunks: the type comes from the selector (the common types, or
    // any type from the payload's last two bytes).
    let typ = match sel % 4 {
        0 => chunk::ERROR,
        1 => chunk::ERROR_OFFSET,
        2 => 0x8000 | u16::from(sel),
        _ => b
            .last_chunk::<2>()
            .map_or(chunk::ERROR, |t| u16::from_be_bytes(*t)),
    };
    if let Ok(e) = wrep::parse_error_chunk(typ, b) {
        assert!(typ & chunk::FLAG_ERROR != 0);
        assert_ne!(e.error, 0);
        assert!(e.message.len() <= MAX_STRING_LEN);
        assert_eq!(e.message, &b[6..6 + e.message.len()]);
        let fixed = 6 + e.message.len();
        match typ {
            chunk::ERROR => assert_eq!(b.len(), fixed),
            chunk::ERROR_OFFSET => {
                assert_eq!(b.len(), fixed + 8);
                assert_eq!(
                    e.offset.map(u64::to_be_bytes),
                    Some(b[fixed..].try_into().unwrap())
                );
            }
            _ => assert!(b.len() >= fixed && e.offset.is_none()),
        }
    }

    for typ in [chunk::BLOCK_STATUS, chunk::BLOCK_STATUS_EXT, u16::from(sel)] {
        let mut out = vec![nbd_core::Extent {
            length: 1,
            flags: 0,
        }];
        let whole = wrep::parse_block_status(typ, b, MAX_EXTENTS, &mut out);
        let step = usize::from(sel).max(1);
        match stream_block_status(typ, b, step) {
            Ok((id, ext)) => {
                assert_eq!(whole, Ok(id));
                assert_eq!(ext, out);
            }
            Err(e) => assert_eq!(whole, Err(e)),
        }
        match whole {
            Ok(id) => {
                let (head, width) = if typ == chunk::BLOCK_STATUS {
                    (4, 8)
                } else {
                    assert_eq!(typ, chunk::BLOCK_STATUS_EXT);
                    (8, 16)
                };
                assert_eq!(id.to_be_bytes(), b[..4]);
                assert_eq!((b.len() - head) % width, 0);
                assert_eq!(out.len(), (b.len() - head) / width);
                assert!(!out.is_empty());
                assert!(out.len() <= MAX_EXTENTS);
                assert!(out.iter().all(|e| e.length != 0));
                if typ == chunk::BLOCK_STATUS {
                    assert!(
                        out.iter()
                            .all(|e| e.length <= u64::from(u32::MAX)
                                && e.flags <= u64::from(u32::MAX))
                    );
                }
            }
            Err(_) => assert!(out.is_empty(), "output left behind on error"),
        }
    }
}
