//! The options phase, structure-aware: replies to GO/INFO built from the
//! input as records of every info and reply type (see
//! `nbd_fuzz::checks::negotiation` for the input format and the checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::checks::negotiation::check(data);
});
