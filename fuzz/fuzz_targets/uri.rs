//! NbdUri::parse on arbitrary text; whatever parses must render (Display)
//! to a string that parses back to the same value, and rendering is stable.
//!
//! The check itself is `nbd_fuzz::checks::uri::check`, which the corpus
//! replay test (`tests/corpus.rs`) also runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::checks::uri::check(data);
});
