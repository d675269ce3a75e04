//! Connects to an NBD server and prints the size of the export in bytes:
//! the Rust counterpart of libnbd's `get-size` example.
//!
//! ```text
//! $ nbdkit -U - memory 1M --run 'cargo run -p nbd-std --example get-size -- $unixsocket'
//! 1048576
//! ```
//!
//! The argument is a Unix socket path or an NBD URI
//! (`nbd+unix:///export?socket=/tmp/sock`, `nbd://host:port/export`).

use std::process::ExitCode;

#[path = "common/cli.rs"]
mod cli;

fn main() -> ExitCode {
    cli::run(|args| {
        let (target, _) = cli::target_and_rest(args, "SOCKET|URI", 0)?;
        let mut nbd = cli::connect(target)?;
        let size = nbd.get_size().map_err(|e| cli::describe(target, &e))?;
        nbd.shutdown().map_err(|e| cli::describe(target, &e))?;
        cli::write_stdout(format!("{size}\n").as_bytes())
    })
}
