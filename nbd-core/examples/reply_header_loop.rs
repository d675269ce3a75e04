//! Parses 1,000,000 reply headers (simple, structured and extended, in
//! turn) for instruction counting; run under
//! `valgrind --tool=callgrind` on a release build. Not a benchmark.

use std::hint::black_box;

use bytes::BytesMut;
use nbd_core::consts::chunk;
use nbd_core::wire::reply::{
    encode_chunk_header, encode_simple_reply, parse_reply_header, reply_header_len, HeaderMode,
};

const N: u32 = 1_000_000;

fn main() {
    let mut simple = BytesMut::new();
    encode_simple_reply(0, 7, &mut simple);
    let mut structured = BytesMut::new();
    encode_chunk_header(
        HeaderMode::Structured,
        1,
        chunk::OFFSET_DATA,
        7,
        0,
        4104,
        &mut structured,
    );
    let mut extended = BytesMut::new();
    encode_chunk_header(
        HeaderMode::Extended,
        1,
        chunk::OFFSET_DATA,
        7,
        4096,
        4104,
        &mut extended,
    );
    let inputs = [
        (&simple[..], HeaderMode::Structured),
        (&structured[..], HeaderMode::Structured),
        (&extended[..], HeaderMode::Extended),
    ];
    let mut sum = 0u64;
    for i in 0..N {
        let (b, mode) = inputs[(i % 3) as usize];
        let b = black_box(b);
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let len = reply_header_len(magic, mode).unwrap();
        if let Ok(h) = parse_reply_header(black_box(&b[..len]), mode) {
            sum = sum.wrapping_add(match h {
                nbd_core::wire::reply::ReplyHeader::Simple { cookie, .. } => cookie,
                nbd_core::wire::reply::ReplyHeader::Chunk { length, .. } => length,
            });
        }
    }
    println!("{sum}");
}
