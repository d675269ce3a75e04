//! `nbd copy`.

/// Arguments of `nbd copy`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `nbd copy`.
pub fn run(_a: Args) -> crate::common::Res {
    crate::common::fail("not yet")
}
