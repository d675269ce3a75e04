//! Legal but hostile reply patterns at full size, with bounded CPU: a 1 MiB
//! read answered as 2^20 one-byte `NBD_REPLY_TYPE_OFFSET_DATA` chunks in
//! descending order (doc/proto.md, "Structured reply chunk message types":
//! chunks may come in any order and MUST NOT overlap), with structured
//! replies and with extended headers. The coverage check costs O(1) per
//! chunk (see nbd-core's `coverage` module); it used to scan every earlier
//! chunk, 328 s for this read.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use nbd_core::consts::{
    chunk, handshake_flags as hf, info, opt, rep, reply_flags, transmission_flags as tf,
    EXTENDED_REPLY_MAGIC, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use nbd_core::{CmdFlags, Config, Connection, Event, ProtocolError};

const SIZE: u64 = 1 << 20;

fn option_reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&typ.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// A connection in the transmission phase with structured replies, or
/// extended headers if `extended`.
fn ready(extended: bool) -> Connection {
    let mut cfg = Config::default();
    cfg.request_extended_headers = extended;
    // Extended headers are asked for only by a client that wants
    // structured replies (libnbd's rule), and imply them.
    cfg.request_structured_replies = true;
    cfg.request_meta_context = false;
    let mut c = Connection::new(cfg);
    let mut s = NBDMAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&(hf::FIXED_NEWSTYLE | hf::NO_ZEROES).to_be_bytes());
    let first = if extended {
        opt::EXTENDED_HEADERS
    } else {
        opt::STRUCTURED_REPLY
    };
    s.extend(option_reply(first, rep::ACK, &[]));
    let mut export = info::EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&SIZE.to_be_bytes());
    export.extend_from_slice(&tf::HAS_FLAGS.to_be_bytes());
    s.extend(option_reply(opt::GO, rep::INFO, &export));
    s.extend(option_reply(opt::GO, rep::ACK, &[]));
    c.handle_input(&s);
    let mut out = Vec::new();
    c.poll_transmit(&mut out);
    assert!(
        std::iter::from_fn(|| c.poll_event()).any(|e| matches!(e, Event::GoSucceeded(_))),
        "handshake"
    );
    c
}

/// One OFFSET_DATA chunk carrying `data` at `offset`.
fn data_chunk(
    extended: bool,
    flags: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
    out: &mut Vec<u8>,
) {
    let len = 8 + data.len();
    if extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&chunk::OFFSET_DATA.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        // The header echoes the request's offset (0 here); the chunk's own
        // offset is in its payload.
        out.extend_from_slice(&0u64.to_be_bytes());
        out.extend_from_slice(&(len as u64).to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&chunk::OFFSET_DATA.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
}

fn one_byte_chunks_descending(extended: bool) {
    let mut c = ready(extended);
    let cookie = c
        .read(0, BytesMut::zeroed(SIZE as usize), CmdFlags::empty())
        .expect("read");
    let mut stream = Vec::with_capacity(SIZE as usize * 40);
    for off in (0..SIZE).rev() {
        let flags = if off == 0 { reply_flags::DONE } else { 0 };
        data_chunk(
            extended,
            flags,
            cookie.0,
            off,
            &[off as u8 ^ 0x5a],
            &mut stream,
        );
    }
    let t = Instant::now();
    for piece in stream.chunks(64 * 1024) {
        c.handle_input(piece);
    }
    let elapsed = t.elapsed();
    let done = std::iter::from_fn(|| c.poll_event()).find_map(|e| match e {
        Event::CommandDone {
            cookie: k,
            result,
            buffer,
        } if k == cookie => Some((result, buffer)),
        _ => None,
    });
    let (result, buffer) = done.expect("the read completed");
    result.expect("a legal reply");
    let buf = buffer.expect("buffer back");
    assert!(
        buf.iter().enumerate().all(|(i, &b)| b == i as u8 ^ 0x5a),
        "data in place"
    );
    // Not a timing assertion of speed, only a guard against the quadratic
    // case (minutes): even an unoptimised build does this in seconds.
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
}

#[test]
fn a_read_as_one_byte_chunks_in_descending_order_structured() {
    one_byte_chunks_descending(false);
}

#[test]
fn a_read_as_one_byte_chunks_in_descending_order_extended() {
    one_byte_chunks_descending(true);
}

/// The same pattern with one byte sent twice is still refused.
#[test]
fn an_overlapping_chunk_out_of_order_is_refused() {
    let mut c = ready(false);
    let cookie = c
        .read(0, BytesMut::zeroed(4096), CmdFlags::empty())
        .expect("read");
    let mut s = Vec::new();
    data_chunk(false, 0, cookie.0, 4000, &[1; 96], &mut s);
    data_chunk(false, 0, cookie.0, 0, &[1; 100], &mut s);
    data_chunk(false, 0, cookie.0, 3999, &[1; 2], &mut s);
    c.handle_input(&s);
    assert!(matches!(
        c.close_reason(),
        Some(nbd_core::CloseReason::Protocol(
            ProtocolError::ChunkOverlap { offset: 3999, .. }
        ))
    ));
}
