//! Connects to an NBD server and prints what it told about the export, one
//! `name: true|false` line per fact, with libnbd's names: the Rust
//! counterpart of libnbd's `server-flags` example.
//!
//! ```text
//! $ nbdkit -U - memory 1M --run 'cargo run -p nbd-std --example server-flags -- $unixsocket'
//! can_block_status_payload: false
//! can_cache: true
//! can_df: true
//! can_fast_zero: true
//! can_flush: true
//! can_fua: true
//! can_multi_conn: true
//! can_trim: true
//! can_zero: true
//! is_read_only: false
//! is_rotational: false
//! ```
//!
//! These are the facts carried by the export's transmission flags, in
//! alphabetical order: libnbd's example prints the same ones except
//! `can_block_status_payload` (added in libnbd 1.18). `can_meta_context`
//! is not a flag but a question about one named context, so it is left
//! out; `nbdinfo` lists the negotiated contexts separately too.
//!
//! The argument is a Unix socket path or an NBD URI.

use std::fmt::Write as _;
use std::process::ExitCode;

#[path = "common/cli.rs"]
mod cli;

fn main() -> ExitCode {
    cli::run(|args| {
        let (target, _) = cli::target_and_rest(args, "SOCKET|URI", 0)?;
        let mut nbd = cli::connect(target)?;
        let flags = nbd.flags_report().map_err(|e| cli::describe(target, &e))?;
        nbd.shutdown().map_err(|e| cli::describe(target, &e))?;
        let mut text = String::new();
        for (name, value) in flags {
            if name != "can_meta_context" {
                let _ = writeln!(text, "{name}: {value}");
            }
        }
        cli::write_stdout(text.as_bytes())
    })
}
