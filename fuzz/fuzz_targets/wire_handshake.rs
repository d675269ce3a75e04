//! Handshake parsers: greeting prefix, oldstyle fields, client flags and the
//! NBD_OPT_EXPORT_NAME reply.
//!
//! The check itself is `nbd_fuzz::checks::wire_handshake::check`, which the corpus
//! replay test (`tests/corpus.rs`) also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::checks::wire_handshake::check(data);
});
