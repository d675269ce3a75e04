//! Option reply parsers: the reply header and the NBD_REP_SERVER,
//! NBD_REP_INFO and NBD_REP_META_CONTEXT payloads, plus the option request
//! encoders (layout of rule 27).
//!
//! The check itself is `nbd_fuzz::checks::wire_option::check`, which the corpus
//! replay test (`tests/corpus.rs`) also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::checks::wire_option::check(data);
});
