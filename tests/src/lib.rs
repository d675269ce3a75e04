//! Test support for the nbd-rs workspace.
//!
//! This crate is used only by tests (`tests/tests/*.rs` and the other crates'
//! dev-dependencies). It has no dependency on `nbd-core` or `nbd-std`, so it
//! can be used to test them without a dependency cycle.
//!
//! It offers two kinds of peer for an NBD client under test:
//!
//! * [`servers`]: real servers (nbdkit, qemu-nbd, qemu-storage-daemon,
//!   nbd-server) started as processes on a Unix socket in a private temporary
//!   directory, or on a loopback TCP port. A [`servers::Server`] stops its
//!   process and removes its directory when dropped. Use these for
//!   interoperability: everything a real server can do should be tested
//!   against a real server.
//! * [`fake`]: a scripted in-process fake server ([`fake::FakeServer`]) whose
//!   every byte is under the test's control. Use it for what no real server
//!   sends: malformed or unexpected replies, wrong cookies, overlapping
//!   chunks, early disconnects, and exact protocol sequences.
//!
//! [`examples`] builds and runs nbd-std's example programs as processes.
//!
//! [`proto`] holds the NBD protocol constants and payload builders that both
//! need. They are defined here, independently of `nbd-core`, so that a bug in
//! the client's constants cannot hide itself in the tests.
//!
//! The server binaries are installed by `.ci/run`; tests should not skip when
//! a binary is missing, but fail loudly.

#![warn(missing_docs)]

pub mod examples;
pub mod fake;
pub mod pki;
pub mod proto;
pub mod servers;

pub use fake::{FakeConn, FakeServer, GoConfig, Negotiated, Request};
pub use servers::{
    make_file, make_sparse_file, nbd_server, nbdinfo, nbdkit, nbdkit_tcp, nbdkit_with, pid_alive,
    qemu_nbd, qemu_storage_daemon, scratch_dir, Server,
};
/// The type of [`scratch_dir`]'s directory, for callers that keep one.
pub use tempfile::TempDir;
