//! Connects to an NBD server, reads the first 512-byte sector of the export
//! (usually a boot sector, partition table or superblock) and writes it to
//! stdout as raw bytes: the Rust counterpart of libnbd's
//! `fetch-first-sector` example. Pipe it into `hexdump -C` to look at it.
//!
//! ```text
//! $ nbdkit -U - floppy . --run 'cargo run -p nbd-std --example fetch-first-sector -- $unixsocket' | hexdump -C
//! ```
//!
//! The argument is a Unix socket path or an NBD URI.

use nbd_std::CmdFlags;
use std::process::ExitCode;

#[path = "common/cli.rs"]
mod cli;

const SECTOR: usize = 512;

fn main() -> ExitCode {
    cli::run(|args| {
        let (target, _) = cli::target_and_rest(args, "SOCKET|URI", 0)?;
        let mut nbd = cli::connect(target)?;
        let mut sector = [0u8; SECTOR];
        nbd.pread(&mut sector, 0, CmdFlags::empty())
            .map_err(|e| format!("{target}: reading the first sector: {e}"))?;
        nbd.shutdown().map_err(|e| cli::describe(target, &e))?;
        cli::write_stdout(&sector)
    })
}
