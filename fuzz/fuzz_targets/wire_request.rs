//! Request header parser (used by fake servers): parse_request, with an
//! encode round trip.
//!
//! The check itself is `nbd_fuzz::checks::wire_request::check`, which the corpus
//! replay test (`tests/corpus.rs`) also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::checks::wire_request::check(data);
});
