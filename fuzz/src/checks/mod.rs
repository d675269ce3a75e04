//! The checks of the byte-level fuzz targets, one module each, as
//! functions: the cargo-fuzz binaries in `fuzz_targets/` call them, and so
//! does the corpus replay test (`tests/corpus.rs`) under plain `cargo test`.
//! Each one panics when an invariant breaks.

pub mod negotiation;
pub mod uri;
pub mod wire_handshake;
pub mod wire_option;
pub mod wire_reply;
pub mod wire_request;
