//! Legal but hostile reply patterns at full size, with bounded CPU: a 1 MiB
//! read answered as 2^20 one-byte `NBD_REPLY_TYPE_OFFSET_DATA` chunks in
//! descending order (doc/proto.md, "Structured reply chunk message types":
//! chunks may come in any order and MUST NOT overlap), with structured
//! replies and with extended headers. The coverage check costs O(1) per
//! chunk (nbd-core's `coverage` module); it used to scan every earlier
//! chunk, 328 s for this read.

mod common;

use std::time::{Duration, Instant};

use common::{assert_fatal, Mode, Setup, MIB};
use nbd_core::consts::reply_flags::DONE;
use nbd_core::ProtocolError;

fn one_byte_chunks_descending(mode: Mode) {
    let mut h = Setup::new(mode).connect();
    let c = h.read(0, MIB);
    h.sent();
    let mut stream = Vec::with_capacity(MIB as usize * 40);
    for off in (0..MIB).rev() {
        let flags = if off == 0 { DONE } else { 0 };
        stream.extend(h.data(flags, c, off, &[off as u8 ^ 0x5a]));
    }
    let t = Instant::now();
    for piece in stream.chunks(64 * 1024) {
        h.feed(piece);
    }
    let elapsed = t.elapsed();
    let buf = h.done_ok(c).expect("buffer back");
    assert!(
        buf.iter().enumerate().all(|(i, &b)| b == i as u8 ^ 0x5a),
        "data in place"
    );
    // Not an assertion of speed, a guard against the quadratic case
    // (minutes): even an unoptimised build takes seconds.
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
}

#[test]
fn a_read_as_one_byte_chunks_in_descending_order_structured() {
    one_byte_chunks_descending(Mode::Structured);
}

#[test]
fn a_read_as_one_byte_chunks_in_descending_order_extended() {
    one_byte_chunks_descending(Mode::Extended);
}

/// Out of order, a byte sent twice is still refused.
#[test]
fn an_overlapping_chunk_out_of_order_is_refused() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 4096);
    h.sent();
    let mut s = h.data(0, c, 4000, &[1; 96]);
    s.extend(h.data(0, c, 0, &[1; 100]));
    s.extend(h.data(0, c, 3999, &[1; 2]));
    h.feed(&s);
    assert_fatal!(h, ProtocolError::ChunkOverlap { offset: 3999, .. });
}
