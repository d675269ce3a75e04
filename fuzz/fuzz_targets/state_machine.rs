//! A server byte stream fed to a `Connection` in arbitrary pieces, with a
//! scripted client acting between pieces; see `nbd_fuzz` for the input
//! format and the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_fuzz::run_state_machine(data);
});
