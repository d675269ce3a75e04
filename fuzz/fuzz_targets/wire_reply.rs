//! Transmission reply parsers: reply_header_len / parse_reply_header in each
//! HeaderMode (with an encode round trip), OFFSET_DATA length and prefix,
//! OFFSET_HOLE, error chunks and block status chunks. Block status goes
//! through the same calls the state machine makes as a payload streams in
//! (`check_block_status_len`, `parse_block_status_head`,
//! `parse_block_status_extents`), fed in pieces the selector byte picks,
//! and must agree with the whole-payload `parse_block_status`.
//!
//! The check itself is `nbd_fuzz::checks::wire_reply::check`, which the corpus
//! replay test (`tests/corpus.rs`) also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::checks::wire_reply::check(data);
});
