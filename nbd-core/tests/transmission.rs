//! Transmission-phase tests: a `Connection` is taken through a complete
//! fixed-newstyle negotiation with hand-built server bytes, then driven with
//! hand-built replies. Tests are named after the spec checklist
//! (`/work/shared/nbd-protocol.md`): `sN_M_*` for sections, `rule_N_*` for
//! the numbered client rules, `strict_*` for libnbd's strict mode and
//! `life_*` for the lifecycle scenarios.
//!
//! Every test goes through the harness's [`Pair`] (`common/mod.rs`), which
//! records each event as it is drained and, when dropped, ends the
//! connection and asserts that every cookie handed out completed exactly
//! once, that no cookie completed that was never handed out, and that
//! exactly one `Closed` came last.

mod common;

use std::collections::{HashMap, HashSet};

use bytes::{BufMut, Bytes, BytesMut};
use common::script::{
    cat, error_offset_payload, error_payload, hole, offset_data, pattern, status, status_ext,
};
use common::{assert_fatal, server_err, Mode, Pair, Sent, Setup, ALL_FLAGS, KIB, MIB};
use nbd_core::consts::{
    chunk, cmd, cmd_flags as cf, errno, reply_flags::DONE, transmission_flags as tf, NBDMAGIC,
};
use nbd_core::wire::reply::{encode_chunk_header, HeaderMode};
use nbd_core::wire::WireError;
use nbd_core::{
    CloseReason, CmdFlags, CommandError, Config, Connection, Cookie, Event, Extent, Limits,
    NbdErrno, Phase, ProtocolError, ReadChunkKind, Strict, UsageError,
};

// ===========================================================================
// §3.3 / §3.5: simple replies
// ===========================================================================

#[test]
fn s3_3_simple_read_data_lands_in_buffer() {
    let mut h = Setup::new(Mode::Simple).connect();
    let c = h.read(4096, 4096);
    let s = h.sent_one();
    assert_eq!(s.header_len, 28);
    assert_eq!(s.header.typ, cmd::READ);
    assert_eq!((s.header.offset, s.header.length), (4096, 4096));
    assert_eq!(s.header.cookie, c.0);
    let data = pattern(7, 4096);
    let r = h.simple(0, c);
    h.feed(&cat(&[&r, &data]));
    let buf = h.done_ok(c).expect("read buffer returned");
    assert_eq!(&buf[..], &data[..]);
    assert_eq!(h.conn.in_flight(), 0);
    h.no_events();
}

#[test]
fn s3_3_simple_read_split_bytewise() {
    let mut h = Setup::new(Mode::Simple).connect();
    let a = h.read(0, 512);
    let b = h.read(512, 512);
    h.requests();
    let da = pattern(1, 512);
    let db = pattern(2, 512);
    // Replies out of order, fed one byte at a time.
    let stream = cat(&[&h.simple(0, b), &db, &h.simple(0, a), &da]);
    h.feed_bytewise(&stream);
    assert_eq!(&h.done_ok(a).unwrap()[..], &da[..]);
    assert_eq!(&h.done_ok(b).unwrap()[..], &db[..]);
}

#[test]
fn s3_3_simple_write_flush_trim_out_of_order() {
    let mut h = Setup::new(Mode::Simple).connect();
    let data = pattern(3, 1024);
    let w = h.write(0, &data);
    let f = h.flush();
    let t = h.conn.trim(8192, 4096, CmdFlags::FUA);
    let t = h.ok(t);
    let s = h.requests();
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].header.typ, cmd::WRITE);
    assert_eq!(
        s[0].payload, data,
        "write payload follows its header (rule 79)"
    );
    assert_eq!(s[0].header.flags & cf::PAYLOAD_LEN, 0);
    assert_eq!(s[1].header.typ, cmd::FLUSH);
    assert_eq!((s[1].header.offset, s[1].header.length), (0, 0), "rule 82");
    assert_eq!(s[2].header.typ, cmd::TRIM);
    assert_eq!(s[2].header.flags, cf::FUA);
    let cookies: HashSet<u64> = s.iter().map(|x| x.header.cookie).collect();
    assert_eq!(cookies.len(), 3, "rule 64: distinct cookies in flight");
    let stream = cat(&[&h.simple(0, t), &h.simple(0, f), &h.simple(0, w)]);
    h.feed(&stream);
    assert_eq!(h.done_ok(w), None, "writes hand back no buffer");
    h.done_ok(f);
    h.done_ok(t);
}

#[test]
fn s3_12_simple_error_reply_maps_errno() {
    use std::io::ErrorKind as K;
    let cases = [
        (errno::EPERM, 1, K::PermissionDenied),
        (errno::EIO, 5, K::Other),
        (errno::ENOMEM, 12, K::OutOfMemory),
        (errno::EINVAL, 22, K::InvalidInput),
        (errno::ENOSPC, 28, K::StorageFull),
        (errno::EOVERFLOW, 75, K::InvalidInput),
        (errno::ENOTSUP, 95, K::Unsupported),
    ];
    let mut h = Setup::new(Mode::Simple).connect();
    for (wire, posix, kind) in cases {
        let c = h.write(0, &[0; 512]);
        h.requests();
        let r = h.simple(wire, c);
        h.feed(&r);
        let e = h.done_err(c);
        assert_eq!(
            e,
            CommandError::Server {
                errno: NbdErrno(wire),
                message: None,
                offset: None
            }
        );
        assert_eq!(e.errno(), posix);
        assert_eq!(e.io_kind(), kind);
    }
    assert_eq!(
        h.conn.phase(),
        Phase::Ready,
        "errors leave the connection usable"
    );
}

#[test]
fn rule_103_unknown_error_value_maps_to_einval() {
    let mut h = Setup::new(Mode::Simple).connect();
    let c = h.write(0, &[1; 512]);
    h.requests();
    let r = h.simple(0x1234, c);
    h.feed(&r);
    let e = h.done_err(c);
    assert_eq!(server_err(&e).0, 0x1234, "raw value kept");
    assert_eq!(e.errno(), 22, "unknown error value means EINVAL");
    assert_eq!(e.io_kind(), std::io::ErrorKind::InvalidInput);
    // Not a reason to disconnect.
    let c2 = h.flush();
    h.requests();
    let r = h.simple(0, c2);
    h.feed(&r);
    h.done_ok(c2);
    assert_eq!(h.conn.phase(), Phase::Ready);
}

#[test]
fn s3_5_simple_read_error_carries_no_payload() {
    let mut h = Setup::new(Mode::Simple).connect();
    let a = h.read(0, 4096);
    let b = h.read(4096, 512);
    h.requests();
    let db = pattern(9, 512);
    // The failed read has no data: the next bytes are the next reply.
    let stream = cat(&[&h.simple(errno::EIO, a), &h.simple(0, b), &db]);
    h.feed(&stream);
    let (r, buf) = h.done(a);
    assert_eq!(server_err(&r.unwrap_err()).0, errno::EIO);
    assert!(buf.is_some(), "the buffer comes back even on failure");
    assert_eq!(&h.done_ok(b).unwrap()[..], &db[..]);
}

#[test]
fn s3_14_eof_mid_simple_read_payload_is_fatal() {
    let mut h = Setup::new(Mode::Simple).connect();
    let c = h.read(0, 4096);
    let other = h.flush();
    h.requests();
    let r = h.simple(0, c);
    h.feed(&cat(&[&r, &pattern(0, 1000)]));
    h.not_done(c);
    h.conn.handle_eof();
    let (r, buf) = h.done(c);
    assert!(matches!(r, Err(CommandError::ConnectionClosed(_))), "{r:?}");
    assert_eq!(buf.map(|b| b.len()), Some(4096));
    assert!(matches!(
        h.done_err(other),
        CommandError::ConnectionClosed(_)
    ));
    let ev = h.take_events();
    assert!(
        matches!(
            &ev[..],
            [Event::Closed(CloseReason::ServerClosed {
                lost: 2,
                transport_error: None
            })]
        ),
        "{ev:?}"
    );
    assert_eq!(h.conn.phase(), Phase::Dead);
}

#[test]
fn s3_14_structured_chunk_when_only_simple_negotiated_is_fatal() {
    let mut h = Setup::new(Mode::Simple).connect();
    let c = h.read(0, 512);
    h.requests();
    // encode_chunk_header in Simple mode writes a structured chunk.
    let r = h.none(c);
    h.feed(&r);
    assert!(matches!(
        h.fatal(),
        ProtocolError::Wire(WireError::BadReplyMagic { mode: "simple", .. })
    ));
}

#[test]
fn s3_14_bad_reply_magic_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.flush();
    h.requests();
    let mut r = h.simple(0, c);
    r[0] ^= 0x40;
    h.feed(&r);
    assert!(matches!(
        h.fatal(),
        ProtocolError::Wire(WireError::BadReplyMagic { .. })
    ));
}

#[test]
fn s3_14_unknown_cookie_fatal() {
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut h = Setup::new(mode).connect();
        let c = h.flush();
        h.requests();
        let bogus = Cookie(c.0 ^ 0x5555_0000_0000);
        let r = if mode == Mode::Extended {
            h.chunk_at(DONE, chunk::NONE, bogus, 0, &[])
        } else {
            h.simple(0, bogus)
        };
        h.feed(&r);
        assert_eq!(h.fatal(), ProtocolError::UnknownCookie(bogus.0), "{mode:?}");
    }
}

// ===========================================================================
// Zero-copy input path
// ===========================================================================

#[test]
fn zero_copy_simple_read_lands_in_callers_buffer() {
    let mut h = Setup::new(Mode::Simple).connect();
    let len = MIB as usize;
    let buf = BytesMut::zeroed(len);
    let base = buf.as_ptr() as usize;
    let c = h.conn.read(0, buf, CmdFlags::empty());
    let c = h.ok(c);
    h.requests();
    let data = pattern(42, len);
    let r = h.simple(0, c);
    h.feed(&r);
    // The header is consumed: the adapter is offered the read's own buffer.
    let mut pos = 0;
    let mut step = 100_000;
    while pos < len {
        let rb = h.conn.recv_buf();
        assert_eq!(rb.len(), len - pos, "recv_buf is the remaining payload");
        assert_eq!(
            rb.as_ptr() as usize,
            base + pos,
            "recv_buf is the read's buffer"
        );
        let n = step.min(len - pos);
        rb[..n].copy_from_slice(&data[pos..pos + n]);
        h.conn.recv_commit(n);
        pos += n;
        step += 77_777;
        if pos < len {
            h.not_done(c);
        }
    }
    let out = h.done_ok(c).unwrap();
    assert_eq!(out.as_ptr() as usize, base, "same allocation handed back");
    assert!(out[..] == data[..]);
    // Afterwards the core's own buffer is offered again.
    let rb = h.conn.recv_buf();
    assert_ne!(rb.as_ptr() as usize, base);
}

#[test]
fn zero_copy_header_with_partial_payload() {
    let mut h = Setup::new(Mode::Simple).connect();
    let len = MIB as usize;
    let c = h.conn.read(0, BytesMut::zeroed(len), CmdFlags::empty());
    let c = h.ok(c);
    let next = h.flush();
    h.requests();
    let data = pattern(5, len);
    let r = h.simple(0, c);
    h.feed(&cat(&[&r, &data[..300]]));
    assert_eq!(h.conn.recv_buf().len(), len - 300);
    // The rest, followed by the next reply, through the copying path.
    let f = h.simple(0, next);
    h.feed(&cat(&[&data[300..], &f]));
    assert!(h.done_ok(c).unwrap()[..] == data[..]);
    h.done_ok(next);
}

/// `reply_in_progress` tells an adapter that the rest of a reply is on its
/// way: true from a reply's first byte to its last, false between replies
/// (and in negotiation), whatever the reply format.
#[test]
fn reply_in_progress_spans_first_byte_to_last() {
    let mut fresh = Connection::new(Config::default(), std::time::Instant::now());
    assert!(!fresh.reply_in_progress(), "negotiation");
    fresh.handle_input(&NBDMAGIC.to_be_bytes()[..3]);
    assert!(!fresh.reply_in_progress(), "a partial greeting is no reply");

    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut h = Setup::new(mode).connect();
        assert!(!h.conn.reply_in_progress(), "{mode:?}: idle");
        let c = h.read(0, 4096);
        h.requests();
        assert!(!h.conn.reply_in_progress(), "{mode:?}: request out");
        let data = pattern(3, 4096);
        let reply = if mode == Mode::Simple {
            cat(&[&h.simple(0, c), &data])
        } else {
            h.chunk(DONE, chunk::OFFSET_DATA, c, &offset_data(0, &data))
        };
        let header = reply.len() - data.len();
        // Any cut strictly inside the reply leaves it in progress.
        for cut in [1, header - 1, header, header + 1, reply.len() - 1] {
            let mut h2 = Setup::new(mode).connect();
            let c2 = h2.read(0, 4096);
            h2.requests();
            assert_eq!(c2, c, "same cookie in a fresh connection");
            h2.feed(&reply[..cut]);
            assert!(h2.conn.reply_in_progress(), "{mode:?}: cut at {cut}");
            h2.feed(&reply[cut..]);
            assert!(!h2.conn.reply_in_progress(), "{mode:?}: complete");
            h2.done_ok(c2);
        }
        h.feed(&reply);
        assert!(!h.conn.reply_in_progress(), "{mode:?}: whole reply");
        h.done_ok(c);
    }
}

/// `request_in_progress` tells an adapter that the server is reading a
/// request of ours: true from its first byte sent to its last, across the
/// header and the write payload, false between requests.
#[test]
fn request_in_progress_spans_header_and_payload() {
    let mut h = Setup::new(Mode::Structured).connect();
    h.write(0, &pattern(1, 1000));
    h.flush();
    assert!(!h.conn.request_in_progress(), "nothing sent yet");
    let total = h.conn.queued_bytes();
    assert_eq!(total, 28 + 1000 + 28);
    for (n, mid) in [
        (1, true),
        (27, true),
        (999, true),
        (1, false),
        (10, true),
        (18, false),
    ] {
        h.conn.transmitted(n);
        assert_eq!(h.conn.request_in_progress(), mid, "after {n} more bytes");
    }
    assert!(!h.conn.wants_write());
}

#[test]
fn zero_copy_offset_data_chunk_targets_its_region() {
    let mut h = Setup::new(Mode::Structured).connect();
    let len = 512 * KIB as usize;
    let buf = BytesMut::zeroed(len);
    let base = buf.as_ptr() as usize;
    let c = h.conn.read(MIB, buf, CmdFlags::empty());
    let c = h.ok(c);
    h.requests();
    let data = pattern(11, len);
    let half = len / 2;
    // Second half first: header and the 8-byte offset, no data yet.
    let second = h.data(0, c, MIB + half as u64, &data[half..]);
    h.feed(&second[..20 + 8]);
    let rb = h.conn.recv_buf();
    assert_eq!(rb.as_ptr() as usize, base + half);
    assert_eq!(rb.len(), len - half);
    rb.copy_from_slice(&data[half..]);
    h.conn.recv_commit(len - half);
    h.not_done(c);
    let first = h.data(DONE, c, MIB, &data[..half]);
    h.feed(&first[..28]);
    let rb = h.conn.recv_buf();
    assert_eq!((rb.as_ptr() as usize, rb.len()), (base, half));
    rb.copy_from_slice(&data[..half]);
    h.conn.recv_commit(half);
    let out = h.done_ok(c).unwrap();
    assert_eq!(out.as_ptr() as usize, base);
    assert!(out[..] == data[..]);
}

#[test]
fn zero_copy_large_reads_keep_receive_buffer_reads_short() {
    // With large reads in flight, the core offers only a short piece of its
    // own buffer while a reply header is awaited, so that the payload after
    // the header is read straight into the read's buffer, not copied.
    let mut h = Setup::new(Mode::Structured).connect();
    let len = 256 * KIB as usize;
    let buf = BytesMut::zeroed(len);
    let base = buf.as_ptr() as usize;
    let c = h.conn.read(0, buf, CmdFlags::empty());
    let c = h.ok(c);
    h.requests();
    let data = pattern(3, len);
    let reply = h.data(DONE, c, 0, &data);
    let rb = h.conn.recv_buf();
    assert!(rb.len() <= 4096, "short read offered: {}", rb.len());
    // A socket read that fills the offer: header, offset, start of the data.
    let n = rb.len();
    rb.copy_from_slice(&reply[..n]);
    h.conn.recv_commit(n);
    let copied = n - 28;
    let rb = h.conn.recv_buf();
    assert_eq!(
        (rb.as_ptr() as usize, rb.len()),
        (base + copied, len - copied)
    );
    rb.copy_from_slice(&data[copied..]);
    h.conn.recv_commit(len - copied);
    let out = h.done_ok(c).unwrap();
    assert!(out[..] == data[..]);
    // Small reads in flight: the whole free buffer is offered again, so
    // that one socket read can take many replies.
    let c = h.conn.read(0, BytesMut::zeroed(4096), CmdFlags::empty());
    h.ok(c);
    h.requests();
    assert!(h.conn.recv_buf().len() > 64 * KIB as usize);
}

// ===========================================================================
// §3.8 / §3.9: structured replies
// ===========================================================================

#[test]
fn rule_99_out_of_order_offset_data_reassembled() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(8192, 4096);
    h.requests();
    let data = pattern(17, 4096);
    let order = [3usize, 0, 2, 1];
    let mut stream = Vec::new();
    for (i, &k) in order.iter().enumerate() {
        let flags = if i == order.len() - 1 { DONE } else { 0 };
        let part = &data[k * 1024..(k + 1) * 1024];
        stream.extend(h.data(flags, c, 8192 + (k as u64) * 1024, part));
    }
    h.feed(&stream);
    assert_eq!(&h.done_ok(c).unwrap()[..], &data[..]);
}

#[test]
fn s3_8_offset_hole_zero_fills() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096); // buffer pre-filled with 0xff
    h.requests();
    let data = pattern(23, 1024);
    let stream = cat(&[
        &h.hole(0, c, 1024, 2048),
        &h.data(0, c, 0, &data),
        &h.data(0, c, 3072, &data),
        &h.none(c),
    ]);
    h.feed(&stream);
    let buf = h.done_ok(c).unwrap();
    assert_eq!(&buf[..1024], &data[..]);
    assert!(
        buf[1024..3072].iter().all(|&b| b == 0),
        "hole reads as zeroes"
    );
    assert_eq!(&buf[3072..], &data[..]);
}

#[test]
fn s3_8_read_with_chunk_events() {
    let mut h = Setup::new(Mode::Structured).connect();
    let r = h
        .conn
        .read_with_chunks(0, BytesMut::zeroed(2048), CmdFlags::empty());
    let c = h.ok(r);
    h.requests();
    let stream = cat(&[&h.data(0, c, 1024, &[7; 1024]), &h.hole(DONE, c, 0, 1024)]);
    h.feed(&stream);
    let ev = h.take_events();
    let chunks: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            Event::ReadChunk {
                cookie,
                offset,
                length,
                kind,
            } => {
                assert_eq!(*cookie, c);
                Some((*offset, *length, *kind))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        chunks,
        vec![
            (1024, 1024, ReadChunkKind::Data),
            (0, 1024, ReadChunkKind::Hole)
        ]
    );
    assert!(matches!(
        ev.last(),
        Some(Event::CommandDone { result: Ok(()), .. })
    ));
}

#[test]
fn rule_105_chunk_outside_request_is_fatal() {
    // Past the end, before the start, and a hole past the end.
    for case in 0..3 {
        let mut h = Setup::new(Mode::Structured).connect();
        let c = h.read(4096, 4096);
        h.requests();
        let r = match case {
            0 => h.data(0, c, 4096 + 3072, &[0; 2048]),
            1 => h.data(0, c, 4095, &[0; 16]),
            _ => h.hole(0, c, 8191, 2),
        };
        h.feed(&r);
        assert_fatal!(h, ProtocolError::ChunkOutOfRange { .. });
    }
}

#[test]
fn rule_105_overlapping_chunks_are_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.requests();
    let stream = cat(&[&h.data(0, c, 0, &[1; 2048]), &h.hole(0, c, 2047, 100)]);
    h.feed(&stream);
    assert_fatal!(h, ProtocolError::ChunkOverlap { length: 100, .. });
}

#[test]
fn s3_9_done_with_gap_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.requests();
    let stream = cat(&[
        &h.data(0, c, 0, &[1; 1024]),
        &h.data(DONE, c, 2048, &[2; 2048]),
    ]);
    h.feed(&stream);
    assert_fatal!(
        h,
        ProtocolError::ReadIncomplete {
            covered: 3072,
            length: 4096,
            ..
        }
    );
}

#[test]
fn s3_9_none_with_gap_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.requests();
    let stream = cat(&[&h.hole(0, c, 0, 1024), &h.none(c)]);
    h.feed(&stream);
    assert_fatal!(h, ProtocolError::ReadIncomplete { .. });
}

#[test]
fn s3_8_none_with_payload_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.flush();
    h.requests();
    let r = h.chunk(DONE, chunk::NONE, c, &[0; 4]);
    h.feed(&r);
    assert_fatal!(
        h,
        ProtocolError::BadNoneChunk {
            length: 4,
            done: true,
            ..
        }
    );
}

#[test]
fn s3_8_none_without_done_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.flush();
    h.requests();
    let r = h.chunk(0, chunk::NONE, c, &[]);
    h.feed(&r);
    assert_fatal!(
        h,
        ProtocolError::BadNoneChunk {
            length: 0,
            done: false,
            ..
        }
    );
}

#[test]
fn s3_8_offset_data_too_short_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 512);
    h.requests();
    // 8 bytes: an offset and no data.
    let r = h.chunk(DONE, chunk::OFFSET_DATA, c, &0u64.to_be_bytes());
    h.feed(&r);
    assert!(matches!(
        h.fatal(),
        ProtocolError::Wire(WireError::BadLength { .. })
    ));
}

#[test]
fn s3_8_offset_hole_bad_length_or_zero_size_is_fatal() {
    for case in 0..2 {
        let mut h = Setup::new(Mode::Structured).connect();
        let c = h.read(0, 512);
        h.requests();
        let r = if case == 0 {
            h.chunk(DONE, chunk::OFFSET_HOLE, c, &[0; 16])
        } else {
            h.hole(DONE, c, 0, 0)
        };
        h.feed(&r);
        assert!(matches!(
            h.fatal(),
            ProtocolError::Wire(WireError::BadLength { .. } | WireError::BadValue { .. })
        ));
    }
}

#[test]
fn s3_8_error_chunk_fails_request_and_connection_continues() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.requests();
    // Content, then an error, then more content and DONE: the read fails
    // (rule 100: no partial success).
    let stream = cat(&[
        &h.data(0, c, 0, &[1; 1024]),
        &h.error(0, c, errno::EIO, "disk on fire"),
        &h.data(DONE, c, 1024, &[2; 3072]),
    ]);
    h.feed(&stream);
    let e = h.done_err(c);
    assert_eq!(server_err(&e), (errno::EIO, Some("disk on fire"), None));
    assert_eq!(e.errno(), 5);
    assert_eq!(h.conn.phase(), Phase::Ready);
    // The next request works.
    let d = h.read(0, 512);
    h.requests();
    let r = h.data(DONE, d, 0, &[9; 512]);
    h.feed(&r);
    assert_eq!(&h.done_ok(d).unwrap()[..], &[9; 512][..]);
}

#[test]
fn s3_8_error_chunk_to_write_with_done() {
    let mut h = Setup::new(Mode::Structured).connect();
    let w = h.write(0, &[0; 512]);
    h.requests();
    let r = h.error(DONE, w, errno::ENOSPC, "");
    h.feed(&r);
    assert_eq!(server_err(&h.done_err(w)), (errno::ENOSPC, None, None));
}

#[test]
fn s3_8_first_error_wins() {
    let mut h = Setup::new(Mode::Structured).connect();
    let w = h.write(0, &[0; 512]);
    h.requests();
    let stream = cat(&[
        &h.error(0, w, errno::EPERM, "first"),
        &h.error(DONE, w, errno::EIO, "second"),
    ]);
    h.feed(&stream);
    assert_eq!(
        server_err(&h.done_err(w)),
        (errno::EPERM, Some("first"), None)
    );
}

#[test]
fn s3_8_error_offset_inside_request_is_reported() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(4096, 4096);
    h.requests();
    let p = error_offset_payload(errno::EIO, "bad sector", 6144);
    let stream = cat(&[
        &h.data(0, c, 4096, &[0; 2048]),
        &h.chunk(0, chunk::ERROR_OFFSET, c, &p),
        &h.none(c),
    ]);
    h.feed(&stream);
    let e = h.done_err(c);
    assert_eq!(server_err(&e), (errno::EIO, Some("bad sector"), Some(6144)));
    assert!(e.to_string().contains("at offset 6144"));
}

#[test]
fn s3_8_error_offset_outside_request_is_fatal() {
    for off in [4095u64, 8192] {
        let mut h = Setup::new(Mode::Structured).connect();
        let c = h.read(4096, 4096);
        h.requests();
        let p = error_offset_payload(errno::EIO, "", off);
        let r = h.chunk(DONE, chunk::ERROR_OFFSET, c, &p);
        h.feed(&r);
        assert_fatal!(h, ProtocolError::ErrorOffsetOutOfRange { .. });
    }
}

#[test]
fn s3_8_error_chunk_too_short_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.flush();
    h.requests();
    let r = h.chunk(DONE, chunk::ERROR, c, &[0, 0, 0, 5, 0]);
    h.feed(&r);
    assert!(matches!(h.fatal(), ProtocolError::Wire(_)));
}

#[test]
fn rule_97_unknown_error_chunk_fails_request_and_continues() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 1024);
    h.requests();
    // Type 0x8123: unknown, bit 15 set; trailing bytes after the message ignored.
    let mut p = error_payload(errno::EPERM, "nope");
    p.extend_from_slice(&[0xaa; 10]);
    let stream = cat(&[&h.chunk(0, 0x8123, c, &p), &h.data(DONE, c, 0, &[0; 1024])]);
    h.feed(&stream);
    assert_eq!(
        server_err(&h.done_err(c)),
        (errno::EPERM, Some("nope"), None)
    );
    assert_eq!(h.conn.phase(), Phase::Ready);
    let f = h.flush();
    h.requests();
    let r = h.none(f);
    h.feed(&r);
    h.done_ok(f);
}

#[test]
fn rule_97_error_chunk_type_unexpected_for_command_fails_request() {
    // ERROR_OFFSET is not valid for FLUSH: falls under the bit-15 rule.
    let mut h = Setup::new(Mode::Structured).connect();
    let f = h.flush();
    h.requests();
    let p = error_offset_payload(errno::EIO, "", 0);
    let r = h.chunk(DONE, chunk::ERROR_OFFSET, f, &p);
    h.feed(&r);
    assert_eq!(server_err(&h.done_err(f)).0, errno::EIO);
    assert_eq!(h.conn.phase(), Phase::Ready);
}

#[test]
fn rule_97_unknown_error_chunk_message_overflow_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.flush();
    h.requests();
    let mut p = Vec::new();
    p.put_u32(errno::EIO);
    p.put_u16(100); // claims 100 bytes of message
    p.put_slice(b"short");
    let r = h.chunk(DONE, 0x8077, c, &p);
    h.feed(&r);
    assert!(matches!(
        h.fatal(),
        ProtocolError::Wire(WireError::InnerLengthOverflow { .. })
    ));
}

#[test]
fn rule_96_unknown_non_error_chunk_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 512);
    h.requests();
    let r = h.chunk(DONE, 0x0042, c, &[0; 8]);
    h.feed(&r);
    assert_fatal!(h, ProtocolError::UnexpectedChunkType { chunk_type: 66, .. });
}

#[test]
fn rule_96_content_chunk_to_non_read_is_fatal() {
    for typ in [chunk::OFFSET_DATA, chunk::OFFSET_HOLE] {
        let mut h = Setup::new(Mode::Structured).connect();
        let w = h.write(0, &[0; 512]);
        h.requests();
        let p = if typ == chunk::OFFSET_DATA {
            offset_data(0, &[0; 512])
        } else {
            hole(0, 512)
        };
        let r = h.chunk(DONE, typ, w, &p);
        h.feed(&r);
        assert_fatal!(
            h,
            ProtocolError::UnexpectedChunkType {
                command: "NBD_CMD_WRITE",
                ..
            }
        );
    }
}

#[test]
fn rule_96_block_status_chunk_to_read_is_fatal() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.read(0, 512);
    h.requests();
    let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &[(512, 0)]));
    h.feed(&r);
    assert_fatal!(
        h,
        ProtocolError::UnexpectedChunkType {
            chunk_type: 5,
            command: "NBD_CMD_READ",
            ..
        }
    );
}

#[test]
fn s3_1_simple_reply_to_read_in_structured_mode_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 512);
    h.requests();
    let r = h.simple(0, c);
    h.feed(&cat(&[&r, &[0; 512]]));
    assert_fatal!(h, ProtocolError::SimpleReplyToStructuredRead { .. });
}

#[test]
fn s3_1_simple_reply_without_payload_allowed_in_structured_mode() {
    let mut h = Setup::new(Mode::Structured).connect();
    let w = h.write(0, &[1; 512]);
    let f = h.flush();
    h.requests();
    let stream = cat(&[&h.simple(0, f), &h.simple(errno::EIO, w)]);
    h.feed(&stream);
    h.done_ok(f);
    assert_eq!(server_err(&h.done_err(w)).0, errno::EIO);
}

#[test]
fn s3_14_chunk_after_done_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 512);
    h.requests();
    let r = h.data(DONE, c, 0, &[3; 512]);
    h.feed(&r);
    h.done_ok(c);
    // The cookie is retired: a late chunk (here a NONE) is a framing error.
    let late = h.none(c);
    h.feed(&late);
    assert_eq!(h.fatal(), ProtocolError::UnknownCookie(c.0));
}

#[test]
fn s3_14_stale_cookie_after_slot_reuse_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let a = h.flush();
    h.requests();
    let r = h.none(a);
    h.feed(&r);
    h.done_ok(a);
    // A new request may reuse the slot, but never the cookie.
    let b = h.flush();
    h.requests();
    assert_ne!(a, b);
    let late = h.none(a);
    h.feed(&late);
    assert_eq!(h.fatal(), ProtocolError::UnknownCookie(a.0));
}

#[test]
fn s3_4_replies_out_of_order_across_many_requests() {
    let mut h = Setup::new(Mode::Structured).connect();
    let n = 32usize;
    let mut reads = Vec::new();
    for i in 0..n {
        let c = h.read(i as u64 * 4096, 4096);
        reads.push(c);
    }
    let writes: Vec<_> = (0..8)
        .map(|i| h.write(MIB + i * 512, &[i as u8; 512]))
        .collect();
    assert_eq!(h.requests().len(), n + 8);
    // Each read gets two chunks; interleave: all second halves in reverse
    // order, then the writes, then all first halves (with DONE).
    let datas: Vec<_> = (0..n).map(|i| pattern(i as u8, 4096)).collect();
    let mut stream = Vec::new();
    for i in (0..n).rev() {
        stream.extend(h.data(0, reads[i], i as u64 * 4096 + 2048, &datas[i][2048..]));
    }
    for (k, w) in writes.iter().enumerate() {
        if k % 2 == 0 {
            stream.extend(h.none(*w));
        } else {
            stream.extend(h.simple(0, *w));
        }
    }
    for i in (0..n).step_by(2).chain((1..n).step_by(2)) {
        stream.extend(h.data(DONE, reads[i], i as u64 * 4096, &datas[i][..2048]));
    }
    // Split the stream at awkward places.
    for piece in stream.chunks(1000) {
        h.feed(piece);
    }
    for (i, c) in reads.iter().enumerate() {
        assert_eq!(&h.done_ok(*c).unwrap()[..], &datas[i][..], "read {i}");
    }
    for w in writes {
        h.done_ok(w);
    }
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn rule_95_unknown_reply_flags_ignored() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 512);
    h.requests();
    let stream = cat(&[
        &h.data(0x7ff0, c, 0, &[5; 256]),
        &h.data(0x8000 | DONE, c, 256, &[6; 256]),
    ]);
    h.feed(&stream);
    let buf = h.done_ok(c).unwrap();
    assert_eq!(&buf[..256], &[5; 256][..]);
    assert_eq!(&buf[256..], &[6; 256][..]);
}

#[test]
fn s3_6_df_read_with_two_content_chunks_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read_flags(0, 1024, CmdFlags::DF);
    let s = h.sent_one();
    assert_eq!(s.header.flags, cf::DF);
    let stream = cat(&[&h.data(0, c, 0, &[1; 512]), &h.hole(DONE, c, 512, 512)]);
    h.feed(&stream);
    assert_fatal!(h, ProtocolError::FragmentedDfRead { .. });
}

#[test]
fn s3_6_df_read_single_chunk_ok() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read_flags(0, 1024, CmdFlags::DF);
    h.requests();
    let r = h.data(DONE, c, 0, &[1; 1024]);
    h.feed(&r);
    h.done_ok(c);
}

#[test]
fn s3_14_extended_chunk_in_structured_mode_is_fatal() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.flush();
    h.requests();
    let r = h.chunk_in(HeaderMode::Extended, DONE, chunk::NONE, c, 0, &[]);
    h.feed(&r);
    assert!(matches!(
        h.fatal(),
        ProtocolError::Wire(WireError::BadReplyMagic {
            mode: "structured",
            ..
        })
    ));
}

#[test]
fn s3_11_unreasonably_large_chunk_is_fatal() {
    let mut h = Setup::new(Mode::Extended).connect();
    let c = h.read(0, 4096);
    h.requests();
    // Only the header: a 1 GiB payload is announced.
    let mut b = BytesMut::new();
    encode_chunk_header(
        HeaderMode::Extended,
        DONE,
        chunk::OFFSET_DATA,
        c.0,
        0,
        1 << 30,
        &mut b,
    );
    h.feed(&b);
    assert_fatal!(h, ProtocolError::ChunkTooLong { .. });
}

// ===========================================================================
// Extended headers
// ===========================================================================

#[test]
fn rule_48_75_extended_requests_are_32_bytes_with_payload_len() {
    let mut h = Setup::new(Mode::Extended).connect();
    let data = pattern(1, 4096);
    let w = h.write(4096, &data);
    let r = h.read(0, 512);
    let f = h.flush();
    let s = h.requests();
    assert_eq!(s.len(), 3);
    for x in &s {
        assert_eq!(x.header_len, 32, "extended header for {}", x.header.typ);
    }
    assert_eq!(s[0].header.typ, cmd::WRITE);
    assert_eq!(s[0].header.flags & cf::PAYLOAD_LEN, cf::PAYLOAD_LEN);
    assert_eq!(s[0].header.length, 4096, "length is the payload length");
    assert_eq!(s[0].payload, data);
    assert_eq!(s[1].header.flags & cf::PAYLOAD_LEN, 0, "no payload on READ");
    assert_eq!(s[2].header.flags & cf::PAYLOAD_LEN, 0);
    let stream = cat(&[&h.none(w), &h.data(DONE, r, 0, &[4; 512]), &h.none(f)]);
    h.feed(&stream);
    h.done_ok(w);
    h.done_ok(r);
    h.done_ok(f);
}

#[test]
fn rule_48_auto_flag_off_sends_callers_flags() {
    let mut h = Setup::new(Mode::Extended)
        .strict(Strict::ALL - Strict::AUTO_FLAG)
        .connect();
    let w = h.write(0, &[1; 512]);
    let s = h.sent_one();
    assert_eq!(s.header.flags & cf::PAYLOAD_LEN, 0, "caller's choice kept");
    assert_eq!(s.payload.len(), 512);
    let r = h.none(w);
    h.feed(&r);
    h.done_ok(w);
}

#[test]
fn rule_74_compact_write_never_sets_payload_len() {
    let mut h = Setup::new(Mode::Structured).connect();
    let w = h
        .conn
        .write(0, Bytes::from_static(&[1; 512]), CmdFlags::PAYLOAD_LEN);
    let w = h.ok(w);
    let s = h.sent_one();
    assert_eq!(s.header_len, 28);
    assert_eq!(s.header.flags & cf::PAYLOAD_LEN, 0, "auto flag clears it");
    let r = h.none(w);
    h.feed(&r);
    h.done_ok(w);
}

#[test]
fn s3_3_extended_reply_offset_mismatch_is_fatal() {
    let mut h = Setup::new(Mode::Extended).connect();
    let c = h.read(8192, 1024);
    h.requests();
    // The payload's own offset is right; the header's echo is wrong.
    let r = h.chunk_at(
        DONE,
        chunk::OFFSET_DATA,
        c,
        8193,
        &offset_data(8192, &[0; 1024]),
    );
    h.feed(&r);
    assert_fatal!(
        h,
        ProtocolError::ReplyOffsetMismatch {
            expected: 8192,
            got: 8193,
            ..
        }
    );
}

#[test]
fn s3_3_extended_reply_offset_echoes_request_not_chunk() {
    let mut h = Setup::new(Mode::Extended).connect();
    let c = h.read(8192, 1024);
    h.requests();
    // Second half first: header offset stays the request's offset.
    let stream = cat(&[
        &h.data(0, c, 8192 + 512, &[2; 512]),
        &h.data(DONE, c, 8192, &[1; 512]),
    ]);
    h.feed(&stream);
    let b = h.done_ok(c).unwrap();
    assert_eq!(&b[..512], &[1; 512][..]);
    assert_eq!(&b[512..], &[2; 512][..]);
}

#[test]
fn s3_14_simple_reply_in_extended_mode_is_fatal() {
    let mut h = Setup::new(Mode::Extended).connect();
    let c = h.flush();
    h.requests();
    let r = h.simple(0, c);
    h.feed(&r);
    assert!(matches!(
        h.fatal(),
        ProtocolError::Wire(WireError::BadReplyMagic {
            mode: "extended",
            ..
        })
    ));
}

#[test]
fn s3_14_structured_chunk_in_extended_mode_is_fatal() {
    let mut h = Setup::new(Mode::Extended).connect();
    let c = h.flush();
    h.requests();
    let r = h.chunk_in(HeaderMode::Structured, DONE, chunk::NONE, c, 0, &[]);
    h.feed(&r);
    assert!(matches!(
        h.fatal(),
        ProtocolError::Wire(WireError::BadReplyMagic { .. })
    ));
}

#[test]
fn s3_2_extended_64bit_effect_lengths() {
    let size = 1u64 << 40;
    let mut h = Setup::new(Mode::Extended).size(size).connect();
    let len = (1u64 << 33) + 4096;
    let t = h.conn.trim(0, len, CmdFlags::empty());
    let t = h.ok(t);
    let z = h.conn.write_zeroes(4096, len, CmdFlags::NO_HOLE);
    let z = h.ok(z);
    let s = h.requests();
    assert_eq!(s[0].header.length, len);
    assert_eq!(s[1].header.length, len);
    assert_eq!(s[1].header.flags, cf::NO_HOLE);
    assert!(s.iter().all(|x| x.payload.is_empty()));
    let stream = cat(&[&h.none(z), &h.none(t)]);
    h.feed(&stream);
    h.done_ok(t);
    h.done_ok(z);
}

#[test]
fn s3_10_block_status_ext_with_64bit_lengths() {
    let size = 1u64 << 40;
    let mut h = Setup::new(Mode::Extended)
        .size(size)
        .base_allocation(7)
        .connect();
    let len = 1u64 << 36;
    let c = h.block_status(0, len, CmdFlags::empty());
    let s = h.sent_one();
    assert_eq!((s.header_len, s.header.length), (32, len));
    let big = (1u64 << 33) + 512;
    let p = status_ext(7, &[(big, 3), (len - big - 4096, 0), (1 << 40, 0)]);
    let r = h.chunk(DONE, chunk::BLOCK_STATUS_EXT, c, &p);
    h.feed(&r);
    let ev = h.take_events();
    match &ev[..] {
        [Event::BlockStatus {
            cookie,
            context_id: 7,
            extents,
        }, Event::CommandDone {
            cookie: c2,
            result: Ok(()),
            ..
        }] => {
            assert_eq!((*cookie, *c2), (c, c));
            assert_eq!(
                extents,
                &vec![
                    Extent {
                        length: big,
                        flags: 3
                    },
                    Extent {
                        length: len - big - 4096,
                        flags: 0
                    },
                    Extent {
                        length: 1 << 40,
                        flags: 0
                    },
                ]
            );
        }
        other => panic!("unexpected events {other:?}"),
    }
}

#[test]
fn s3_8_block_status_ext_count_mismatch_is_fatal() {
    let mut h = Setup::new(Mode::Extended).base_allocation(1).connect();
    let c = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let mut p = status_ext(1, &[(4096, 0)]);
    p[4..8].copy_from_slice(&2u32.to_be_bytes());
    let r = h.chunk(DONE, chunk::BLOCK_STATUS_EXT, c, &p);
    h.feed(&r);
    assert!(matches!(h.fatal(), ProtocolError::Wire(_)));
}

#[test]
fn s3_8_block_status_type5_in_extended_mode_is_fatal() {
    let mut h = Setup::new(Mode::Extended).base_allocation(1).connect();
    let c = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &[(4096, 0)]));
    h.feed(&r);
    assert_fatal!(
        h,
        ProtocolError::ChunkTypeWrongMode {
            chunk_type: chunk::BLOCK_STATUS,
            mode: HeaderMode::Extended,
            ..
        }
    );
}

#[test]
fn s3_8_block_status_ext_in_structured_mode_is_fatal() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let r = h.chunk(
        DONE,
        chunk::BLOCK_STATUS_EXT,
        c,
        &status_ext(1, &[(4096, 0)]),
    );
    h.feed(&r);
    assert_fatal!(
        h,
        ProtocolError::ChunkTypeWrongMode {
            chunk_type: chunk::BLOCK_STATUS_EXT,
            mode: HeaderMode::Structured,
            ..
        }
    );
}

// ===========================================================================
// §3.10: block status
// ===========================================================================

fn two_contexts() -> Pair {
    Setup::new(Mode::Structured)
        .contexts(&[(1, "base:allocation"), (9, "qemu:dirty-bitmap:b")])
        .connect()
}

#[test]
fn s3_10_block_status_event_per_context() {
    let mut h = two_contexts();
    assert_eq!(h.conn.meta_context_id("base:allocation"), Some(1));
    let c = h.block_status(MIB, 64 * KIB, CmdFlags::empty());
    let s = h.sent_one();
    assert_eq!(s.header.typ, cmd::BLOCK_STATUS);
    assert_eq!((s.header.offset, s.header.length), (MIB, 64 * KIB));
    // Contexts answered in any order, then a NONE.
    let stream = cat(&[
        &h.chunk(0, chunk::BLOCK_STATUS, c, &status(9, &[(65536, 1)])),
        &h.chunk(
            0,
            chunk::BLOCK_STATUS,
            c,
            &status(1, &[(4096, 3), (4096, 3), (57344, 0xf000_0000)]),
        ),
        &h.none(c),
    ]);
    h.feed(&stream);
    let ev = h.take_events();
    assert_eq!(ev.len(), 3, "{ev:?}");
    let mut seen = HashMap::new();
    for e in &ev[..2] {
        match e {
            Event::BlockStatus {
                cookie,
                context_id,
                extents,
            } => {
                assert_eq!(*cookie, c);
                seen.insert(*context_id, extents.clone());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen[&9],
        vec![Extent {
            length: 65536,
            flags: 1
        }]
    );
    // Rules 101/102: equal neighbours and unknown flag bits passed through.
    assert_eq!(
        seen[&1],
        vec![
            Extent {
                length: 4096,
                flags: 3
            },
            Extent {
                length: 4096,
                flags: 3
            },
            Extent {
                length: 57344,
                flags: 0xf000_0000
            },
        ]
    );
    assert!(matches!(
        &ev[2],
        Event::CommandDone { cookie, result: Ok(()), buffer: None } if *cookie == c
    ));
}

#[test]
fn s3_10_block_status_done_on_last_status_chunk() {
    let mut h = two_contexts();
    let c = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let stream = cat(&[
        &h.chunk(0, chunk::BLOCK_STATUS, c, &status(1, &[(4096, 0)])),
        &h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(9, &[(8192, 0)])),
    ]);
    // Split inside the descriptors.
    for piece in stream.chunks(5) {
        h.feed(piece);
    }
    h.done_ok(c);
    let n = h
        .take_events()
        .iter()
        .filter(|e| matches!(e, Event::BlockStatus { .. }))
        .count();
    assert_eq!(n, 2);
}

#[test]
fn s3_10_block_status_error_chunk_fails_request_and_continues() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let r = h.error(DONE, c, errno::EINVAL, "out of range");
    h.feed(&r);
    assert_eq!(server_err(&h.done_err(c)).0, errno::EINVAL);
    let d = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let r = h.chunk(DONE, chunk::BLOCK_STATUS, d, &status(1, &[(4096, 0)]));
    h.feed(&r);
    h.done_ok(d);
}

#[test]
fn s3_10_unknown_context_id_is_fatal() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(2, &[(4096, 0)]));
    h.feed(&r);
    assert_fatal!(h, ProtocolError::UnknownContextId { context: 2, .. });
}

#[test]
fn s3_10_duplicate_context_is_fatal() {
    let mut h = two_contexts();
    let c = h.block_status(0, 4096, CmdFlags::empty());
    h.requests();
    let stream = cat(&[
        &h.chunk(0, chunk::BLOCK_STATUS, c, &status(1, &[(4096, 0)])),
        &h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &[(4096, 0)])),
    ]);
    h.feed(&stream);
    assert_fatal!(h, ProtocolError::DuplicateContext { context: 1, .. });
}

#[test]
fn s3_10_req_one_with_two_extents_is_fatal() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 8192, CmdFlags::REQ_ONE);
    assert_eq!(h.sent_one().header.flags, cf::REQ_ONE);
    let r = h.chunk(
        DONE,
        chunk::BLOCK_STATUS,
        c,
        &status(1, &[(4096, 0), (4096, 1)]),
    );
    h.feed(&r);
    assert_fatal!(h, ProtocolError::ReqOneViolated { count: 2, .. });
}

#[test]
fn s3_10_req_one_extent_longer_than_request_is_fatal() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 8192, CmdFlags::REQ_ONE);
    h.requests();
    let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &[(8193, 0)]));
    h.feed(&r);
    assert_fatal!(
        h,
        ProtocolError::ReqOneViolated {
            count: 1,
            first_length: 8193,
            ..
        }
    );
}

#[test]
fn s3_10_req_one_single_short_extent_ok() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 8192, CmdFlags::REQ_ONE);
    h.requests();
    let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &[(512, 0)]));
    h.feed(&r);
    h.done_ok(c);
}

#[test]
fn s3_10_zero_length_extent_is_fatal() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 8192, CmdFlags::empty());
    h.requests();
    let r = h.chunk(
        DONE,
        chunk::BLOCK_STATUS,
        c,
        &status(1, &[(4096, 0), (0, 1)]),
    );
    h.feed(&r);
    assert_eq!(
        h.fatal(),
        ProtocolError::Wire(WireError::BadValue {
            what: "block status extent length",
            value: 0
        })
    );
}

#[test]
fn s3_10_first_extents_reaching_request_length_is_fatal() {
    // First N-1 extents sum to exactly, then past, the request length.
    for ext in [
        [(4096u32, 0u32), (4096, 0), (512, 0)],
        [(4096, 0), (8192, 0), (512, 0)],
    ] {
        let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
        let c = h.block_status(0, 8192, CmdFlags::empty());
        h.requests();
        let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &ext));
        h.feed(&r);
        assert_fatal!(h, ProtocolError::ExtentsPastRequest { .. });
    }
}

#[test]
fn s3_10_last_extent_may_exceed_request() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let c = h.block_status(0, 8192, CmdFlags::empty());
    h.requests();
    let r = h.chunk(
        DONE,
        chunk::BLOCK_STATUS,
        c,
        &status(1, &[(4096, 0), (4095, 1), (1 << 30, 2)]),
    );
    h.feed(&r);
    h.done_ok(c);
    let ev = h.take_events();
    assert!(matches!(&ev[..], [Event::BlockStatus { extents, .. }] if extents.len() == 3));
}

#[test]
fn s3_8_block_status_bad_length_is_fatal() {
    for p in [
        status(1, &[]),
        [status(1, &[(4096, 0)]), vec![0; 3]].concat(),
    ] {
        let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
        let c = h.block_status(0, 4096, CmdFlags::empty());
        h.requests();
        let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &p);
        h.feed(&r);
        assert!(matches!(
            h.fatal(),
            ProtocolError::Wire(WireError::BadLength { .. })
        ));
    }
}

#[test]
fn s3_10_too_many_extents_is_fatal() {
    let mut limits = Limits::default();
    limits.max_extent_bytes = 4 * 16;
    let mut h = Setup::new(Mode::Structured)
        .base_allocation(1)
        .limits(limits)
        .connect();
    let c = h.block_status(0, 8192, CmdFlags::empty());
    h.requests();
    let ext: Vec<_> = (0..5).map(|_| (512u32, 0u32)).collect();
    let r = h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &ext));
    h.feed(&r);
    // Refused at the chunk header, before any extent is read or stored.
    assert_eq!(
        h.fatal(),
        ProtocolError::Wire(WireError::OverLimit {
            what: "block status extents",
            len: 5,
            limit: 4
        })
    );
}

// ===========================================================================
// Strict mode (libnbd §2.6): each switch on refuses without sending; off
// lets the request reach the wire.
// ===========================================================================

/// Runs `f` on a fresh connection: with `on` the call must fail with an
/// error matching `expect` and nothing may be queued; without `on` the
/// request must reach the wire (checked by `wire`).
fn strict_case(
    setup: impl Fn(Strict) -> Setup,
    on: Strict,
    f: impl Fn(&mut Connection) -> Result<Cookie, UsageError>,
    expect: impl Fn(&UsageError) -> bool,
    wire: impl Fn(&Sent),
) {
    let mut h = setup(Strict::ALL).connect();
    let before = h.conn.in_flight();
    let e = f(&mut h.conn).expect_err("strict mode should refuse");
    assert!(expect(&e), "unexpected error {e:?}");
    h.nothing_sent();
    assert_eq!(h.conn.in_flight(), before);
    h.no_events();
    drop(h);

    let mut h = setup(Strict::ALL - on).connect();
    let r = f(&mut h.conn);
    let c = h.ok(r);
    let s = h.sent_one();
    assert_eq!(s.header.cookie, c.0);
    wire(&s);
}

#[test]
fn strict_commands_read_only_export() {
    let ro = |s| {
        Setup::new(Mode::Structured)
            .flags(ALL_FLAGS | tf::READ_ONLY)
            .strict(s)
    };
    let is_ro = |e: &UsageError| *e == UsageError::ReadOnly;
    strict_case(
        ro,
        Strict::COMMANDS,
        |c| {
            c.write(0, Bytes::from_static(&[0; 512]), CmdFlags::empty())
                .map_err(UsageError::from)
        },
        is_ro,
        |s| assert_eq!(s.header.typ, cmd::WRITE),
    );
    strict_case(
        ro,
        Strict::COMMANDS,
        |c| c.trim(0, 512, CmdFlags::empty()),
        is_ro,
        |s| assert_eq!(s.header.typ, cmd::TRIM),
    );
    strict_case(
        ro,
        Strict::COMMANDS,
        |c| c.write_zeroes(0, 512, CmdFlags::empty()),
        is_ro,
        |s| assert_eq!(s.header.typ, cmd::WRITE_ZEROES),
    );
    // Reading a read-only export is fine.
    let mut h = ro(Strict::ALL).connect();
    h.read(0, 512);
    h.sent_one();
}

#[test]
fn strict_commands_unadvertised_commands() {
    type Cmd = fn(&mut Connection) -> Result<Cookie, UsageError>;
    let cases: [(u16, Cmd, u16); 4] = [
        (tf::SEND_FLUSH, |c| c.flush(CmdFlags::empty()), cmd::FLUSH),
        (
            tf::SEND_TRIM,
            |c| c.trim(0, 512, CmdFlags::empty()),
            cmd::TRIM,
        ),
        (
            tf::SEND_WRITE_ZEROES,
            |c| c.write_zeroes(0, 512, CmdFlags::empty()),
            cmd::WRITE_ZEROES,
        ),
        (
            tf::SEND_CACHE,
            |c| c.cache(0, 512, CmdFlags::empty()),
            cmd::CACHE,
        ),
    ];
    for (flag, f, typ) in cases {
        strict_case(
            |s| {
                Setup::new(Mode::Structured)
                    .flags(ALL_FLAGS & !flag)
                    .strict(s)
            },
            Strict::COMMANDS,
            f,
            |e| matches!(e, UsageError::NotAdvertised(_)),
            |s| assert_eq!(s.header.typ, typ),
        );
    }
}

#[test]
fn strict_commands_fua_without_send_fua() {
    strict_case(
        |s| {
            Setup::new(Mode::Structured)
                .flags(ALL_FLAGS & !tf::SEND_FUA)
                .strict(s)
        },
        Strict::COMMANDS,
        |c| {
            c.write(0, Bytes::from_static(&[0; 512]), CmdFlags::FUA)
                .map_err(UsageError::from)
        },
        |e| *e == UsageError::NotAdvertised("the FUA flag"),
        |s| assert_eq!(s.header.flags & cf::FUA, cf::FUA),
    );
}

#[test]
fn strict_commands_df_without_send_df() {
    strict_case(
        |s| {
            Setup::new(Mode::Structured)
                .flags(ALL_FLAGS & !tf::SEND_DF)
                .strict(s)
        },
        Strict::COMMANDS,
        |c| {
            c.read(0, BytesMut::zeroed(512), CmdFlags::DF)
                .map_err(UsageError::from)
        },
        |e| *e == UsageError::NotAdvertised("the DF flag"),
        |s| assert_eq!(s.header.flags, cf::DF),
    );
    // Without structured replies DF is never advertised (sanitized away).
    let mut h = Setup::new(Mode::Simple).connect();
    let e = h
        .conn
        .read(0, BytesMut::zeroed(512), CmdFlags::DF)
        .unwrap_err()
        .error;
    assert_eq!(e, UsageError::NotAdvertised("the DF flag"));
    h.nothing_sent();
}

#[test]
fn strict_commands_fast_zero_without_send_fast_zero() {
    strict_case(
        |s| {
            Setup::new(Mode::Structured)
                .flags(ALL_FLAGS & !tf::SEND_FAST_ZERO)
                .strict(s)
        },
        Strict::COMMANDS,
        |c| c.write_zeroes(0, 512, CmdFlags::FAST_ZERO),
        |e| *e == UsageError::NotAdvertised("the FAST_ZERO flag"),
        |s| assert_eq!(s.header.flags, cf::FAST_ZERO),
    );
}

#[test]
fn strict_flags_unknown_or_misplaced_flags() {
    type Cmd = fn(&mut Connection) -> Result<Cookie, UsageError>;
    let cases: [(Cmd, u16); 5] = [
        (
            |c| {
                c.read(0, BytesMut::zeroed(512), CmdFlags::FUA)
                    .map_err(UsageError::from)
            },
            cf::FUA,
        ),
        (
            |c| {
                c.read(0, BytesMut::zeroed(512), CmdFlags::from_bits(0x8000))
                    .map_err(UsageError::from)
            },
            0x8000,
        ),
        (|c| c.flush(CmdFlags::NO_HOLE), cf::NO_HOLE),
        (
            |c| {
                c.write(0, Bytes::from_static(&[0; 512]), CmdFlags::REQ_ONE)
                    .map_err(UsageError::from)
            },
            cf::REQ_ONE,
        ),
        (|c| c.trim(0, 512, CmdFlags::FAST_ZERO), cf::FAST_ZERO),
    ];
    for (f, flag) in cases {
        strict_case(
            |s| Setup::new(Mode::Structured).strict(s),
            Strict::FLAGS,
            f,
            |e| matches!(e, UsageError::BadFlags { flags, .. } if *flags == flag),
            |s| assert_eq!(s.header.flags & flag, flag),
        );
    }
}

#[test]
fn strict_bounds_out_of_bounds() {
    let size = MIB;
    type Cmd = fn(&mut Connection) -> Result<Cookie, UsageError>;
    let cases: [Cmd; 4] = [
        |c| {
            c.read(MIB - 512, BytesMut::zeroed(1024), CmdFlags::empty())
                .map_err(UsageError::from)
        },
        |c| {
            c.write(MIB, Bytes::from_static(&[0; 512]), CmdFlags::empty())
                .map_err(UsageError::from)
        },
        |c| c.trim(u64::MAX - 511, 1024, CmdFlags::empty()),
        |c| c.cache(0, MIB + 1, CmdFlags::empty()),
    ];
    for f in cases {
        strict_case(
            |s| Setup::new(Mode::Structured).size(size).strict(s),
            Strict::BOUNDS,
            f,
            |e| matches!(e, UsageError::OutOfBounds { size: s, .. } if *s == MIB),
            |_| {},
        );
    }
}

#[test]
fn strict_zero_size() {
    type Cmd = fn(&mut Connection) -> Result<Cookie, UsageError>;
    let cases: [Cmd; 4] = [
        |c| {
            c.read(0, BytesMut::new(), CmdFlags::empty())
                .map_err(UsageError::from)
        },
        |c| {
            c.write(0, Bytes::new(), CmdFlags::empty())
                .map_err(UsageError::from)
        },
        |c| c.trim(0, 0, CmdFlags::empty()),
        |c| c.block_status(0, 0, CmdFlags::empty()),
    ];
    for f in cases {
        strict_case(
            |s| Setup::new(Mode::Structured).base_allocation(1).strict(s),
            Strict::ZERO_SIZE,
            f,
            |e| *e == UsageError::ZeroLength,
            |s| assert_eq!(s.header.length, 0),
        );
    }
    // Flush has no range: never a zero-length error.
    let mut h = Setup::new(Mode::Structured).connect();
    h.flush();
    h.sent_one();
}

#[test]
fn strict_zero_length_read_completes() {
    // With strict mode off a zero-length read can be answered by NONE.
    let mut h = Setup::new(Mode::Structured)
        .strict(Strict::ALL - Strict::ZERO_SIZE)
        .connect();
    let c = h.read(0, 0);
    h.requests();
    let r = h.none(c);
    h.feed(&r);
    assert_eq!(h.done_ok(c).unwrap().len(), 0);
    // And in simple mode by a bare simple reply.
    let mut h = Setup::new(Mode::Simple)
        .strict(Strict::ALL - Strict::ZERO_SIZE)
        .connect();
    let c = h.read(0, 0);
    let f = h.flush();
    h.requests();
    let stream = cat(&[&h.simple(0, c), &h.simple(0, f)]);
    h.feed(&stream);
    h.done_ok(c);
    h.done_ok(f);
}

#[test]
fn strict_align_with_advertised_minimum() {
    for min in [512u32, 4096, 65536] {
        let setup = move |s| {
            Setup::new(Mode::Structured)
                .block_size(min, min.max(4096), 32 << 20)
                .strict(s)
        };
        let m = u64::from(min);
        type Cmd = Box<dyn Fn(&mut Connection) -> Result<Cookie, UsageError>>;
        let cases: Vec<Cmd> = vec![
            Box::new(move |c| {
                c.read(m / 2, BytesMut::zeroed(min as usize), CmdFlags::empty())
                    .map_err(UsageError::from)
            }),
            Box::new(move |c| {
                c.read(m, BytesMut::zeroed(min as usize + 1), CmdFlags::empty())
                    .map_err(UsageError::from)
            }),
            Box::new(move |c| {
                c.write(0, Bytes::from(vec![0; min as usize / 2]), CmdFlags::empty())
                    .map_err(UsageError::from)
            }),
            Box::new(move |c| c.trim(m + 1, m, CmdFlags::empty())),
            Box::new(move |c| c.write_zeroes(0, 3 * m - 256, CmdFlags::empty())),
        ];
        for f in cases {
            strict_case(
                setup,
                Strict::ALIGN,
                |c| f(c),
                |e| *e == UsageError::Misaligned(min),
                |_| {},
            );
        }
        // Aligned requests pass.
        let mut h = setup(Strict::ALL).connect();
        h.read(m, m);
        h.write(2 * m, &vec![0; min as usize]);
        assert_eq!(h.requests().len(), 2);
    }
}

#[test]
fn strict_align_without_block_size_allows_any_offset() {
    let mut h = Setup::new(Mode::Structured).connect();
    h.read(1, 3);
    h.sent_one();
}

#[test]
fn strict_payload_write_over_max() {
    let max = MIB as u32;
    let setup = |s| {
        Setup::new(Mode::Structured)
            .block_size(512, 4096, max)
            .strict(s)
    };
    strict_case(
        setup,
        Strict::PAYLOAD,
        |c| {
            c.write(
                0,
                Bytes::from(vec![0; MIB as usize + 512]),
                CmdFlags::empty(),
            )
            .map_err(UsageError::from)
        },
        |e| matches!(e, UsageError::TooLarge { max: m, .. } if *m == MIB),
        |s| assert_eq!(s.payload.len(), MIB as usize + 512),
    );
    // Exactly the maximum is fine; a structured read beyond it is too.
    let mut h = setup(Strict::ALL).connect();
    assert_eq!(h.conn.payload_max(), MIB);
    h.write(0, &vec![0; MIB as usize]);
    h.read(0, 2 * MIB);
    assert_eq!(h.requests().len(), 2);
}

#[test]
fn strict_payload_simple_read_over_max() {
    // With simple replies READ is also bound by the payload maximum.
    strict_case(
        |s| {
            Setup::new(Mode::Simple)
                .block_size(512, 4096, 65536)
                .strict(s)
        },
        Strict::PAYLOAD,
        |c| {
            c.read(0, BytesMut::zeroed(65536 + 512), CmdFlags::empty())
                .map_err(UsageError::from)
        },
        |e| matches!(e, UsageError::TooLarge { max: 65536, .. }),
        |_| {},
    );
}

#[test]
fn strict_payload_default_is_32mib() {
    let mut h = Setup::new(Mode::Structured).size(1 << 30).connect();
    assert_eq!(h.conn.payload_max(), 32 * MIB);
    let e = h
        .conn
        .write(
            0,
            Bytes::from(vec![0; 32 * MIB as usize + 512]),
            CmdFlags::empty(),
        )
        .unwrap_err()
        .error;
    assert!(matches!(e, UsageError::TooLarge { .. }));
    h.nothing_sent();
}

#[test]
fn always_read_over_64mib_refused() {
    for strict in [Strict::ALL, Strict::NONE] {
        let mut h = Setup::new(Mode::Structured)
            .size(1 << 30)
            .strict(strict)
            .connect();
        let e = h
            .conn
            .read(
                0,
                BytesMut::zeroed(64 * MIB as usize + 512),
                CmdFlags::empty(),
            )
            .unwrap_err()
            .error;
        assert_eq!(
            e,
            UsageError::TooLarge {
                length: 64 * MIB + 512,
                max: 64 * MIB
            }
        );
        h.nothing_sent();
        assert_eq!(h.conn.in_flight(), 0);
    }
}

#[test]
fn always_non_data_length_over_u32_without_extended_refused() {
    let len = 1u64 << 32;
    type Cmd = fn(&mut Connection, u64) -> Result<Cookie, UsageError>;
    let cases: [Cmd; 4] = [
        |c, l| c.trim(0, l, CmdFlags::empty()),
        |c, l| c.write_zeroes(0, l, CmdFlags::empty()),
        |c, l| c.cache(0, l, CmdFlags::empty()),
        |c, l| c.block_status(0, l, CmdFlags::empty()),
    ];
    for mode in [Mode::Simple, Mode::Structured] {
        for f in cases {
            let mut h = Setup::new(mode)
                .size(1 << 40)
                .base_allocation(1)
                .strict(Strict::NONE)
                .connect();
            let e = f(&mut h.conn, len).unwrap_err();
            assert_eq!(
                e,
                UsageError::TooLarge {
                    length: len,
                    max: u64::from(u32::MAX)
                }
            );
            h.nothing_sent();
            // u32::MAX itself fits.
            let ok = f(&mut h.conn, len - 1);
            h.ok(ok);
            assert_eq!(h.sent_one().header.length, len - 1);
        }
    }
}

#[test]
fn strict_commands_block_status_without_context() {
    // No context negotiated.
    strict_case(
        |s| Setup::new(Mode::Structured).strict(s),
        Strict::COMMANDS,
        |c| c.block_status(0, 4096, CmdFlags::empty()),
        |e| matches!(e, UsageError::NotAdvertised(m) if m.contains("meta context")),
        |s| assert_eq!(s.header.typ, cmd::BLOCK_STATUS),
    );
    // No structured replies (contexts configured but never negotiated).
    strict_case(
        |s| Setup::new(Mode::Simple).base_allocation(1).strict(s),
        Strict::COMMANDS,
        |c| c.block_status(0, 4096, CmdFlags::empty()),
        |e| matches!(e, UsageError::NotAdvertised(_)),
        |s| assert_eq!(s.header_len, 28),
    );
}

#[test]
fn strict_block_status_filter_checks() {
    let ctx = [(1, "base:allocation"), (4, "qemu:allocation-depth")];
    let ext = |s| Setup::new(Mode::Extended).contexts(&ctx).strict(s);
    // Unknown id, empty list.
    strict_case(
        ext,
        Strict::COMMANDS,
        |c| c.block_status_filter(0, 4096, &[1, 3], CmdFlags::empty()),
        |e| matches!(e, UsageError::UnknownContext(_)),
        |s| assert_eq!(s.payload.len(), 16),
    );
    strict_case(
        ext,
        Strict::COMMANDS,
        |c| c.block_status_filter(0, 4096, &[], CmdFlags::empty()),
        |e| matches!(e, UsageError::UnknownContext(_)),
        |s| assert_eq!(s.payload.len(), 8),
    );
    // Server without BLOCK_STATUS_PAYLOAD.
    strict_case(
        |s| {
            Setup::new(Mode::Extended)
                .contexts(&ctx)
                .flags(ALL_FLAGS & !tf::BLOCK_STATUS_PAYLOAD)
                .strict(s)
        },
        Strict::COMMANDS,
        |c| c.block_status_filter(0, 4096, &[4], CmdFlags::empty()),
        |e| matches!(e, UsageError::NotAdvertised(_)),
        |_| {},
    );
    // Without extended headers the flag is never in force.
    let mut h = Setup::new(Mode::Structured).contexts(&ctx).connect();
    let e = h
        .conn
        .block_status_filter(0, 4096, &[4], CmdFlags::empty())
        .unwrap_err();
    assert!(matches!(e, UsageError::NotAdvertised(_)));
    h.nothing_sent();
    // The flag given by the caller for the plain form is checked too.
    let mut h = ext(Strict::ALL).connect();
    let e = h
        .conn
        .block_status(0, 4096, CmdFlags::FUA | CmdFlags::DF)
        .unwrap_err();
    assert!(matches!(e, UsageError::BadFlags { .. }));
    h.nothing_sent();
}

#[test]
fn rule_77_block_status_filter_on_the_wire() {
    let ctx = [(1, "base:allocation"), (4, "qemu:allocation-depth")];
    let mut h = Setup::new(Mode::Extended).contexts(&ctx).connect();
    let c = h
        .conn
        .block_status_filter(8192, 1 << 20, &[4], CmdFlags::empty());
    let c = h.ok(c);
    let s = h.sent_one();
    assert_eq!(s.header_len, 32);
    assert_eq!(s.header.typ, cmd::BLOCK_STATUS);
    assert_eq!(s.header.flags, cf::PAYLOAD_LEN);
    assert_eq!(s.header.offset, 8192);
    assert_eq!(s.header.length, 12, "header length is the payload length");
    let mut want = Vec::new();
    want.put_u64(1 << 20);
    want.put_u32(4);
    assert_eq!(s.payload, want);
    // Only context 4 answers; extents are checked against the effect length.
    let r = h.chunk(
        DONE,
        chunk::BLOCK_STATUS_EXT,
        c,
        &status_ext(4, &[(1 << 19, 0), (1 << 19, 1)]),
    );
    h.feed(&r);
    h.done_ok(c);
}

#[test]
fn life_03_commands_after_disconnect_refused() {
    let mut h = Setup::new(Mode::Structured)
        .base_allocation(1)
        .strict(Strict::NONE)
        .connect();
    h.conn.disconnect().unwrap();
    let s = h.sent_one();
    assert_eq!(s.header.typ, cmd::DISC);
    assert_eq!(
        (s.header.offset, s.header.length, s.header.flags),
        (0, 0, 0),
        "rule 80"
    );
    let wrong = |e: UsageError| matches!(e, UsageError::WrongPhase { .. });
    assert!(wrong(
        h.conn
            .read(0, BytesMut::zeroed(512), CmdFlags::empty())
            .unwrap_err()
            .error
    ));
    assert!(wrong(
        h.conn
            .write(0, Bytes::from_static(&[0; 512]), CmdFlags::empty())
            .unwrap_err()
            .error
    ));
    assert!(wrong(h.conn.flush(CmdFlags::empty()).unwrap_err()));
    assert!(wrong(h.conn.trim(0, 512, CmdFlags::empty()).unwrap_err()));
    assert!(wrong(h.conn.cache(0, 512, CmdFlags::empty()).unwrap_err()));
    assert!(wrong(
        h.conn.write_zeroes(0, 512, CmdFlags::empty()).unwrap_err()
    ));
    assert!(wrong(
        h.conn.block_status(0, 512, CmdFlags::empty()).unwrap_err()
    ));
    assert!(wrong(h.conn.disconnect().unwrap_err()), "second disconnect");
    h.nothing_sent(); // rule 81
    h.conn.handle_eof();
    let ev = h.take_events();
    assert!(matches!(
        &ev[..],
        [Event::Closed(CloseReason::Disconnected)]
    ));
    assert_eq!(h.conn.phase(), Phase::Closed);
    // And once closed.
    assert!(wrong(h.conn.flush(CmdFlags::empty()).unwrap_err()));
}

// ===========================================================================
// Limits
// ===========================================================================

#[test]
fn limits_max_in_flight() {
    let mut limits = Limits::default();
    limits.max_in_flight = 4;
    let mut h = Setup::new(Mode::Structured).limits(limits).connect();
    let cookies: Vec<_> = (0..4).map(|_| h.flush()).collect();
    assert_eq!(h.conn.in_flight(), 4);
    assert!(!h.conn.has_room(0));
    let e = h.conn.flush(CmdFlags::empty()).unwrap_err();
    assert_eq!(
        e,
        UsageError::InFlightLimit {
            requests: 4,
            bytes: 0
        }
    );
    assert_eq!(h.requests().len(), 4, "the refused request was not sent");
    let r = h.none(cookies[2]);
    h.feed(&r);
    h.done_ok(cookies[2]);
    assert!(h.conn.has_room(0));
    let again = h.flush();
    assert!(!cookies.contains(&again), "cookies unique among requests");
    h.sent_one();
}

#[test]
fn limits_bytes_in_flight() {
    let mut limits = Limits::default();
    limits.max_bytes_in_flight = MIB;
    let mut h = Setup::new(Mode::Structured).limits(limits).connect();
    let a = h.read(0, 512 * KIB);
    let _b = h.write(MIB, &vec![0; 512 * KIB as usize]);
    assert!(!h.conn.has_room(512));
    assert!(h.conn.has_room(0), "commands without payload still fit");
    let e = h
        .conn
        .read(0, BytesMut::zeroed(512), CmdFlags::empty())
        .unwrap_err()
        .error;
    assert_eq!(
        e,
        UsageError::InFlightLimit {
            requests: 2,
            bytes: MIB
        }
    );
    let e = h
        .conn
        .write(0, Bytes::from_static(&[0; 512]), CmdFlags::empty())
        .unwrap_err()
        .error;
    assert!(matches!(e, UsageError::InFlightLimit { .. }));
    h.flush();
    assert_eq!(h.requests().len(), 3);
    // A completion frees its bytes.
    let r = h.data(DONE, a, 0, &vec![0; 512 * KIB as usize]);
    h.feed(&r);
    h.done_ok(a);
    assert!(h.conn.has_room(512 * KIB));
    assert!(!h.conn.has_room(512 * KIB + 1));
}

#[test]
fn limits_single_request_larger_than_byte_limit_allowed_when_idle() {
    let mut limits = Limits::default();
    limits.max_bytes_in_flight = 64 * KIB;
    let mut h = Setup::new(Mode::Structured).limits(limits).connect();
    assert!(h.conn.has_room(MIB));
    let w = h.write(0, &vec![0; MIB as usize]);
    assert!(!h.conn.has_room(1));
    assert!(matches!(
        h.conn
            .read(0, BytesMut::zeroed(512), CmdFlags::empty())
            .unwrap_err()
            .error,
        UsageError::InFlightLimit { .. }
    ));
    assert_eq!(h.sent_one().payload.len(), MIB as usize);
    let r = h.none(w);
    h.feed(&r);
    h.done_ok(w);
    let c = h.read(0, MIB);
    h.sent_one();
    let r = h.data(DONE, c, 0, &vec![1; MIB as usize]);
    h.feed(&r);
    h.done_ok(c);
}

// ===========================================================================
// Lifecycle
// ===========================================================================

#[test]
fn life_01_server_dies_with_64_requests_in_flight() {
    let mut h = Setup::new(Mode::Structured).connect();
    let mut cookies = HashSet::new();
    for i in 0..64u64 {
        let c = match i % 3 {
            0 => h.read(i * 4096, 4096),
            1 => h.write(i * 4096, &[i as u8; 4096]),
            _ => h.flush(),
        };
        cookies.insert(c);
    }
    assert_eq!(cookies.len(), 64);
    assert_eq!(h.conn.in_flight(), 64);
    assert!(!h.conn.has_room(0));
    assert_eq!(h.requests().len(), 64);
    h.conn.handle_eof();
    let ev = h.take_events();
    assert_eq!(ev.len(), 65);
    let mut done = HashSet::new();
    for e in &ev[..64] {
        match e {
            Event::CommandDone {
                cookie,
                result: Err(CommandError::ConnectionClosed(_)),
                ..
            } => assert!(done.insert(*cookie)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(done, cookies);
    assert!(matches!(
        &ev[64],
        Event::Closed(CloseReason::ServerClosed { lost: 64, .. })
    ));
    assert_eq!(h.conn.in_flight(), 0);
    assert_eq!(h.conn.phase(), Phase::Dead);
    // Nothing more after the end.
    h.conn.handle_eof();
    h.feed(&[0; 16]);
    h.no_events();
}

#[test]
fn life_01_transport_error_fails_everything() {
    let mut h = Setup::new(Mode::Extended).connect();
    let a = h.read(0, 512);
    let b = h.flush();
    h.conn.handle_transport_error("connection reset");
    assert!(matches!(h.done_err(a), CommandError::ConnectionClosed(_)));
    assert!(matches!(h.done_err(b), CommandError::ConnectionClosed(_)));
    let ev = h.take_events();
    assert!(matches!(
        &ev[..],
        [Event::Closed(CloseReason::ServerClosed { lost: 2, transport_error: Some(m) })] if m == "connection reset"
    ));
    assert!(h.conn.close_reason().unwrap().is_loss());
}

#[test]
fn s3_13_disconnect_after_completions_then_eof_is_clean() {
    let mut h = Setup::new(Mode::Structured).connect();
    let a = h.read(0, 512);
    let w = h.write(512, &[1; 512]);
    h.requests();
    let stream = cat(&[&h.data(DONE, a, 0, &[2; 512]), &h.none(w)]);
    h.feed(&stream);
    h.done_ok(a);
    h.done_ok(w);
    h.conn.disconnect().unwrap();
    let s = h.sent_one();
    assert_eq!(s.header.typ, cmd::DISC);
    assert_eq!(s.header_len, 28);
    h.conn.handle_eof();
    let ev = h.take_events();
    assert!(
        matches!(&ev[..], [Event::Closed(CloseReason::Disconnected)]),
        "{ev:?}"
    );
    assert_eq!(h.conn.phase(), Phase::Closed);
}

#[test]
fn s3_13_disconnect_with_requests_in_flight_still_completes_them() {
    let mut h = Setup::new(Mode::Extended).connect();
    let a = h.read(0, 512);
    h.conn.disconnect().unwrap();
    let s = h.requests();
    assert_eq!(s.len(), 2);
    assert_eq!((s[1].header.typ, s[1].header_len), (cmd::DISC, 32));
    // The server finishes outstanding work after DISC.
    let r = h.data(DONE, a, 0, &[3; 512]);
    h.feed(&r);
    h.done_ok(a);
    h.conn.handle_eof();
    let ev = h.take_events();
    assert!(matches!(
        &ev[..],
        [Event::Closed(CloseReason::Disconnected)]
    ));
}

#[test]
fn s3_13_eof_after_disconnect_with_reply_missing_is_not_clean() {
    let mut h = Setup::new(Mode::Structured).connect();
    let a = h.flush();
    h.conn.disconnect().unwrap();
    h.requests();
    h.conn.handle_eof();
    assert!(matches!(h.done_err(a), CommandError::ConnectionClosed(_)));
    let ev = h.take_events();
    assert!(matches!(
        &ev[..],
        [Event::Closed(CloseReason::ServerClosed { lost: 1, .. })]
    ));
    assert!(h.conn.close_reason().unwrap().is_loss());
    assert_eq!(h.conn.phase(), Phase::Dead);
}

#[test]
fn s3_13_eof_while_idle_is_server_closed_nothing_lost() {
    let mut h = Setup::new(Mode::Simple).connect();
    h.conn.handle_eof();
    let ev = h.take_events();
    assert!(matches!(
        &ev[..],
        [Event::Closed(CloseReason::ServerClosed {
            lost: 0,
            transport_error: None
        })]
    ));
    let r = h.conn.close_reason().unwrap();
    assert!(!r.is_clean() && !r.is_loss());
    assert_eq!(r.lost_requests(), Some(0));
    // Not an orderly end the client asked for, but nothing was lost.
    assert_eq!(h.conn.phase(), Phase::Dead);
}

/// The server acks GO, then closes (EOF) while the client is idle; the
/// client disconnects later. Nothing was in flight, so nothing was lost:
/// `disconnect()` succeeds and sends nothing, and the reason stays.
#[test]
fn s3_13_eof_after_go_then_disconnect_is_ok() {
    for reset in [false, true] {
        let mut h = Setup::new(Mode::Structured).connect();
        if reset {
            h.conn.handle_transport_error("Connection reset by peer");
        } else {
            h.conn.handle_eof();
        }
        h.drain_events();
        assert_eq!(h.conn.disconnect(), Ok(()), "reset {reset}");
        h.nothing_sent();
        let ev = h.take_events();
        assert!(
            matches!(
                &ev[..],
                [Event::Closed(CloseReason::ServerClosed { lost: 0, .. })]
            ),
            "{ev:?}"
        );
        assert!(!h.conn.close_reason().unwrap().is_loss());
        // Commands are still refused.
        assert!(h.conn.flush(CmdFlags::empty()).is_err());
    }
}

/// `disconnect()` queued with nothing in flight: however the server then
/// ends the connection (EOF or a reset), the end is clean.
#[test]
fn s3_13_eof_or_reset_after_disc_queued_is_clean() {
    for reset in [false, true] {
        let mut h = Setup::new(Mode::Extended).connect();
        h.conn.disconnect().unwrap();
        // Even before the DISC bytes left the queue.
        if reset {
            h.conn.handle_transport_error("Broken pipe");
        } else {
            h.conn.handle_eof();
        }
        let ev = h.take_events();
        assert!(
            matches!(&ev[..], [Event::Closed(CloseReason::Disconnected)]),
            "reset {reset}: {ev:?}"
        );
        assert_eq!(h.conn.phase(), Phase::Closed);
        assert!(h.conn.close_reason().unwrap().is_clean());
    }
}

/// EOF with a read in flight is a loss: the read completes once, with an
/// error, and `disconnect()` afterwards is refused.
#[test]
fn s3_13_eof_with_a_read_in_flight_is_a_loss() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.requests();
    h.conn.handle_eof();
    let (r, buf) = h.done(c);
    assert!(matches!(r, Err(CommandError::ConnectionClosed(_))), "{r:?}");
    assert_eq!(buf.map(|b| b.len()), Some(4096));
    let ev = h.take_events();
    assert!(
        matches!(
            &ev[..],
            [Event::Closed(CloseReason::ServerClosed { lost: 1, .. })]
        ),
        "{ev:?}"
    );
    let reason = h.conn.close_reason().unwrap();
    assert!(reason.is_loss());
    assert_eq!(reason.lost_requests(), Some(1));
    assert!(matches!(
        h.conn.disconnect(),
        Err(UsageError::WrongPhase { .. })
    ));
    // And the same with DISC queued behind the read.
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.conn.disconnect().unwrap();
    h.requests();
    h.conn.handle_eof();
    assert!(matches!(h.done_err(c), CommandError::ConnectionClosed(_)));
    let ev = h.take_events();
    assert!(matches!(
        &ev[..],
        [Event::Closed(CloseReason::ServerClosed { lost: 1, .. })]
    ));
}

#[test]
fn rule_104_eshutdown_sends_disc_once_idle() {
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut h = Setup::new(mode).connect();
        let w = h.write(0, &[1; 512]);
        let f = h.flush();
        h.requests();
        let r = if mode == Mode::Simple {
            h.simple(errno::ESHUTDOWN, w)
        } else {
            h.error(DONE, w, errno::ESHUTDOWN, "going down")
        };
        h.feed(&r);
        let e = h.done_err(w);
        assert_eq!(server_err(&e).0, errno::ESHUTDOWN);
        assert_eq!(e.errno(), 108);
        // Something is still in flight: no DISC yet (rule 106).
        h.nothing_sent();
        let r = if mode == Mode::Simple {
            h.simple(0, f)
        } else {
            h.none(f)
        };
        h.feed(&r);
        h.done_ok(f);
        let s = h.sent_one();
        assert_eq!(s.header.typ, cmd::DISC, "{mode:?}");
        assert_eq!(s.header_len, if mode == Mode::Extended { 32 } else { 28 });
        // Only once; and no further commands.
        h.feed(&[]);
        h.nothing_sent();
        assert!(matches!(
            h.conn.flush(CmdFlags::empty()).unwrap_err(),
            UsageError::WrongPhase { .. }
        ));
        assert!(h.conn.disconnect().is_err());
        h.conn.handle_eof();
        let ev = h.take_events();
        assert!(matches!(
            &ev[..],
            [Event::Closed(CloseReason::Disconnected)]
        ));
    }
}

#[test]
fn rule_104_eshutdown_on_last_request_sends_disc_at_once() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.requests();
    // Error first, then the content: completion comes from the data path.
    let stream = cat(&[
        &h.error(0, c, errno::ESHUTDOWN, ""),
        &h.data(DONE, c, 0, &[0; 4096]),
    ]);
    h.feed(&stream);
    assert_eq!(server_err(&h.done_err(c)).0, errno::ESHUTDOWN);
    assert_eq!(h.sent_one().header.typ, cmd::DISC);
}

#[test]
fn rule_104_eshutdown_via_zero_copy_completion() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.conn.read(0, BytesMut::zeroed(4096), CmdFlags::empty());
    let c = h.ok(c);
    h.requests();
    let e = h.error(0, c, errno::ESHUTDOWN, "");
    let d = h.data(DONE, c, 0, &[0; 4096]);
    h.feed(&cat(&[&e, &d[..28]]));
    let rb = h.conn.recv_buf();
    assert_eq!(rb.len(), 4096);
    rb.fill(1);
    h.conn.recv_commit(4096);
    assert_eq!(server_err(&h.done_err(c)).0, errno::ESHUTDOWN);
    assert_eq!(h.sent_one().header.typ, cmd::DISC);
}

// ===========================================================================
// Hostile values with strict mode off: no panic, a clean protocol error.
// ===========================================================================

#[test]
fn strict_off_request_range_past_u64_max_does_not_panic() {
    // Regression: `r.offset + r.length` overflowed in the containment check.
    let mut h = Setup::new(Mode::Structured).strict(Strict::NONE).connect();
    let off = u64::MAX - 1023;
    let c = h.read(off, 4096);
    h.sent_one();
    let r = h.data(DONE, c, off, &[0; 512]);
    h.feed(&r);
    // The chunk fits what the u64 range can describe; the read is short.
    assert_fatal!(
        h,
        ProtocolError::ReadIncomplete {
            covered: 512,
            length: 4096,
            ..
        }
    );
    // A chunk that wraps around is outside the request.
    let mut h = Setup::new(Mode::Structured).strict(Strict::NONE).connect();
    let c = h.read(off, 4096);
    h.sent_one();
    let r = h.data(0, c, off + 512, &[0; 1024]);
    h.feed(&r);
    assert_fatal!(h, ProtocolError::ChunkOutOfRange { .. });
}

#[test]
fn strict_off_error_offset_past_u64_max_does_not_panic() {
    // Regression: the ERROR_OFFSET range check overflowed the same way.
    let mut h = Setup::new(Mode::Structured).strict(Strict::NONE).connect();
    let off = u64::MAX - 1023;
    let c = h.read(off, 4096);
    h.sent_one();
    let p = error_offset_payload(errno::EIO, "", off + 10);
    let r = h.chunk(DONE, chunk::ERROR_OFFSET, c, &p);
    h.feed(&r);
    assert_eq!(
        server_err(&h.done_err(c)),
        (errno::EIO, None, Some(off + 10))
    );
    assert_eq!(h.conn.phase(), Phase::Ready);
}

#[test]
fn unlimited_max_read_limit_does_not_panic() {
    // Regression: `dos_limit + 64` overflowed when `max_read` is u64::MAX.
    let mut limits = Limits::default();
    limits.max_read = u64::MAX;
    let mut h = Setup::new(Mode::Structured).limits(limits).connect();
    let c = h.read(0, 512);
    h.requests();
    let r = h.data(DONE, c, 0, &[1; 512]);
    h.feed(&r);
    h.done_ok(c);
}

#[test]
fn commands_before_transmission_are_refused() {
    let mut conn = Connection::new(Config::default(), std::time::Instant::now());
    let e = conn
        .read(0, BytesMut::zeroed(512), CmdFlags::empty())
        .unwrap_err()
        .error;
    assert!(matches!(e, UsageError::WrongPhase { .. }));
    assert!(conn.flush(CmdFlags::empty()).is_err());
    assert!(conn.disconnect().is_err());
    assert!(!conn.has_room(0));
    assert!(!conn.wants_write());
}

#[test]
fn zero_copy_done_chunk_with_gap_is_fatal() {
    // The coverage check also runs when the last bytes arrive through
    // recv_buf/recv_commit; the read then completes once, with an error.
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.conn.read(0, BytesMut::zeroed(8192), CmdFlags::empty());
    let c = h.ok(c);
    h.requests();
    let d = h.data(DONE, c, 4096, &[7; 4096]);
    h.feed(&d[..28]);
    let rb = h.conn.recv_buf();
    assert_eq!(rb.len(), 4096);
    rb.fill(7);
    h.conn.recv_commit(4096);
    assert_fatal!(
        h,
        ProtocolError::ReadIncomplete {
            covered: 4096,
            length: 8192,
            ..
        }
    );
}

/// A refused read or write hands its buffer back untouched, and nothing
/// is sent.
#[test]
fn refused_read_and_write_return_their_buffers() {
    let mut h = Setup::new(Mode::Structured).size(MIB).connect();
    let mut buf = BytesMut::zeroed(4096);
    buf[0] = 0xab;
    let r = h.conn.read(MIB, buf, CmdFlags::empty()).unwrap_err();
    assert!(matches!(r.error(), UsageError::OutOfBounds { .. }));
    let (_, buf) = r.into_parts();
    assert_eq!((buf.len(), buf[0]), (4096, 0xab));
    let r = h
        .conn
        .read_with_chunks(0, buf, CmdFlags::from_bits(0x8000))
        .unwrap_err();
    assert!(matches!(
        r.error,
        UsageError::BadFlags { flags: 0x8000, .. }
    ));
    assert_eq!(r.buffer.len(), 4096);
    let data = Bytes::from_static(b"payload!");
    let r = h.conn.write(MIB, data.clone(), CmdFlags::FUA).unwrap_err();
    assert_eq!(r.buffer, data);
    let e: UsageError = r.into();
    assert!(matches!(e, UsageError::OutOfBounds { .. }));
    h.nothing_sent();
    assert_eq!(h.conn.in_flight(), 0);
}

/// `Debug` shows the state, not the buffers.
#[test]
fn debug_of_a_connection_is_short() {
    let conn = Connection::new(Config::default(), std::time::Instant::now());
    let s = format!("{conn:?}");
    assert!(s.len() < 2000, "{} bytes: {s}", s.len());
    let mut h = Setup::new(Mode::Extended).connect();
    let c = h.read(0, 64 * KIB);
    let s = format!("{:?}", h.conn);
    assert!(s.len() < 2000, "{} bytes: {s}", s.len());
    assert!(s.contains("Extended") && s.contains("in_flight: 1"), "{s}");
    let r = h.conn.read(
        u64::MAX - 10,
        BytesMut::zeroed(MIB as usize),
        CmdFlags::empty(),
    );
    let s = format!("{:?}", r.unwrap_err());
    assert!(s.len() < 200, "{s}");
    assert_eq!(h.conn.header_mode(), HeaderMode::Extended);
    h.feed(&h.data(DONE, c, 0, &vec![0; 64 * KIB as usize]));
    h.done_ok(c);
}

/// Spec §3.11 ("Structured reply chunk message"): a chunk header whose
/// length no legal chunk can have for its request fails on the header
/// alone; the client never waits for a payload that cannot be right.
#[test]
fn s3_11_impossible_chunk_length_fails_on_the_header() {
    for mode in [Mode::Structured, Mode::Extended] {
        // OFFSET_DATA longer than the read (plus its 8-byte offset).
        let mut h = Setup::new(mode).connect();
        let c = h.read(0, 4096);
        h.requests();
        let mut b = BytesMut::new();
        encode_chunk_header(h.mode, DONE, chunk::OFFSET_DATA, c.0, 0, 4096 + 9, &mut b);
        h.feed(&b);
        assert_fatal!(
            h,
            ProtocolError::ChunkTooLong {
                length: 4105,
                limit: 4104,
                ..
            }
        );
        // Any type, a length far past every limit (0xfffffff0).
        let mut h = Setup::new(mode).connect();
        let c = h.flush();
        h.requests();
        let mut b = BytesMut::new();
        encode_chunk_header(h.mode, DONE, chunk::ERROR, c.0, 0, 0xffff_fff0, &mut b);
        h.feed(&b);
        assert_fatal!(
            h,
            ProtocolError::ChunkTooLong {
                length: 0xffff_fff0,
                ..
            }
        );
        // An error chunk longer than a 4096-byte message allows.
        for (typ, limit) in [(chunk::ERROR, 6 + 4096), (chunk::ERROR_OFFSET, 14 + 4096)] {
            let mut h = Setup::new(mode).connect();
            let c = h.read(0, 4096);
            h.requests();
            let mut b = BytesMut::new();
            encode_chunk_header(h.mode, DONE, typ, c.0, 0, limit + 1, &mut b);
            h.feed(&b);
            assert_fatal!(h, ProtocolError::ChunkTooLong { limit: l, .. } if l == limit);
        }
        // Block status announcing more extents than the limit.
        let mut limits = Limits::default();
        limits.max_extent_bytes = 4 * 16;
        let mut h = Setup::new(mode).base_allocation(1).limits(limits).connect();
        let c = h.block_status(0, 4096, CmdFlags::empty());
        h.requests();
        let (typ, len) = if mode == Mode::Extended {
            (chunk::BLOCK_STATUS_EXT, 8 + 16 * 5)
        } else {
            (chunk::BLOCK_STATUS, 4 + 8 * 5)
        };
        let mut b = BytesMut::new();
        encode_chunk_header(h.mode, DONE, typ, c.0, 0, len, &mut b);
        h.feed(&b);
        assert_fatal!(
            h,
            ProtocolError::Wire(WireError::OverLimit {
                len: 5,
                limit: 4,
                ..
            })
        );
    }
}

/// Spec "Terminating the transmission phase": a server that answers with
/// `NBD_ESHUTDOWN` is shutting down, and the client must soft-disconnect,
/// sending `NBD_CMD_DISC` once its requests completed. Every reply that can
/// carry an error to a read: a simple reply (every mode where it is
/// allowed), an error chunk, an offset error chunk, an extended chunk, and
/// ESHUTDOWN after another error was already recorded.
#[test]
fn rule_104_eshutdown_on_a_read_sends_disc() {
    type Reply = fn(&Pair, Cookie) -> Vec<u8>;
    let simple: Reply = |h, c| h.simple(errno::ESHUTDOWN, c);
    let chunk: Reply = |h, c| h.error(DONE, c, errno::ESHUTDOWN, "bye");
    let offset: Reply = |h, c| {
        let p = error_offset_payload(errno::ESHUTDOWN, "bye", 0);
        h.chunk(DONE, chunk::ERROR_OFFSET, c, &p)
    };
    let after_eio: Reply = |h, c| {
        cat(&[
            &h.error(0, c, errno::EIO, "first"),
            &h.error(DONE, c, errno::ESHUTDOWN, "then"),
        ])
    };
    let cases: [(Mode, Reply, &str); 8] = [
        (Mode::Simple, simple, "simple reply, simple mode"),
        (Mode::Structured, simple, "simple reply, structured mode"),
        (Mode::Structured, chunk, "error chunk"),
        (Mode::Structured, offset, "offset error chunk"),
        (Mode::Structured, after_eio, "after another error"),
        (Mode::Extended, chunk, "extended error chunk"),
        (Mode::Extended, offset, "extended offset error chunk"),
        (Mode::Extended, after_eio, "extended, after another error"),
    ];
    for (mode, reply, what) in cases {
        let mut h = Setup::new(mode).connect();
        let c = h.read(0, 4096);
        h.requests();
        let r = reply(&h, c);
        h.feed(&r);
        let e = h.done_err(c);
        assert!(matches!(e, CommandError::Server { .. }), "{what}: {e:?}");
        let s = h.requests();
        assert!(
            s.len() == 1 && s[0].header.typ == cmd::DISC,
            "{what}: expected NBD_CMD_DISC, sent {s:?}"
        );
        h.conn.handle_eof();
        let ev = h.take_events();
        assert!(
            matches!(&ev[..], [Event::Closed(CloseReason::Disconnected)]),
            "{what}: {ev:?}"
        );
    }
}

/// The typed violations say what the server did, with its values, and the
/// close reason is an `Error` whose source is the violation.
#[test]
fn protocol_errors_display_what_the_server_sent() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(4096, 4096);
    h.requests();
    let r = h.hole(DONE, c, 8191, 2);
    h.feed(&r);
    let e = h.fatal();
    assert!(matches!(
        e,
        ProtocolError::ChunkOutOfRange {
            offset: 8191,
            length: 2,
            request_offset: 4096,
            request_length: 4096,
            ..
        }
    ));
    let text = e.to_string();
    assert!(
        text.contains("offset 8191 length 2") && text.contains("4096+4096"),
        "{text}"
    );
    let reason = h.conn.close_reason().unwrap().clone();
    let as_error: &dyn std::error::Error = &reason;
    assert_eq!(as_error.source().map(|s| s.to_string()), Some(text));
}
