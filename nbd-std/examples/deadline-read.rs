//! Connects with a handshake deadline, reads the first 4 KiB of the export
//! with a command deadline, and prints `ok`: the blocking client's
//! deadlines in a few lines.
//!
//! ```text
//! $ nbdkit -U - memory 1M --run 'cargo run -p nbd-std --example deadline-read -- $uri 2'
//! ok
//! $ nbdkit -U - --filter=delay memory 1M rdelay=5 --run '... deadline-read -- $uri 1'
//! deadline-read: reading the first 4096 bytes: NBD_CMD_READ timed out: its deadline passed before the server replied
//! ```
//!
//! `deadline-read URI SECONDS`: the URI (or a Unix socket path) and the
//! deadline in seconds (fractions allowed) for both the handshake and the
//! read. When a deadline passes, one line containing `timed out` says what
//! timed out, and the exit status is 1; other failures also exit with 1.

use std::process::ExitCode;
use std::time::Duration;

use nbd_std::{Client, CmdFlags, Config};

#[path = "common/cli.rs"]
mod cli;

fn main() -> ExitCode {
    cli::run(|args| {
        let (target, rest) = cli::target_and_rest(args, "URI SECONDS", 1)?;
        let secs = rest
            .first()
            .and_then(|s| s.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|d| !d.is_zero())
            .ok_or("usage: deadline-read URI SECONDS (SECONDS a positive number)")?;
        let mut cfg = Config::default();
        cfg.handshake_timeout = Some(secs);
        cfg.command_timeout = Some(secs);
        let mut nbd = Client::connect(target, cfg)
            .map_err(|e| format!("deadline-read: connecting to {target}: {e}"))?;
        let size = nbd.get_size().map_err(|e| format!("deadline-read: {e}"))?;
        let mut buf = vec![0u8; size.min(4096) as usize];
        nbd.pread(&mut buf, 0, CmdFlags::empty())
            .map_err(|e| format!("deadline-read: reading the first {} bytes: {e}", buf.len()))?;
        cli::write_stdout(b"ok\n")
    })
}
