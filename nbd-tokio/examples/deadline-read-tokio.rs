//! Connects with a handshake deadline, reads the first 4 KiB of the export
//! with a command deadline, and prints `ok`: the tokio client's deadlines
//! in a few lines. The same interface as nbd-std's `deadline-read`.
//!
//! ```text
//! $ nbdkit -U - memory 1M --run 'cargo run -p nbd-tokio --example deadline-read-tokio -- "$uri" 2'
//! ok
//! $ nbdkit -U - --filter=delay memory 1M rdelay=5 --run '... deadline-read-tokio -- "$uri" 1'
//! deadline-read-tokio: reading the first 4096 bytes: NBD_CMD_READ timed out: its deadline passed before the server replied
//! ```
//!
//! `deadline-read-tokio URI SECONDS`: the URI (or a Unix socket path) and
//! the deadline in seconds (fractions allowed) for both the handshake and
//! the read. When a deadline passes, one line containing `timed out` says
//! what timed out, and the exit status is 1; other failures also exit
//! with 1.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::BytesMut;
use nbd_tokio::{Client, CmdFlags, Config};

const NAME: &str = "deadline-read-tokio";

async fn run(target: &str, secs: Duration) -> Result<(), String> {
    let mut cfg = Config::default();
    cfg.handshake_timeout = Some(secs);
    cfg.command_timeout = Some(secs);
    let (nbd, task) = Client::connect(target, cfg)
        .await
        .map_err(|e| format!("{NAME}: connecting to {target}: {e}"))?;
    let task = tokio::spawn(task);
    let size = nbd.size().map_err(|e| format!("{NAME}: {e}"))?;
    let len = size.min(4096) as usize;
    nbd.read(0, BytesMut::zeroed(len), CmdFlags::empty())
        .await
        .map_err(|e| format!("{NAME}: reading the first {len} bytes: {e}"))?;
    // Dropping the last handle ends the connection politely; the task
    // then resolves (bounded, in case the server does not close).
    drop(nbd);
    let _ = tokio::time::timeout(secs, task).await;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [target, secs] => secs
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|d| !d.is_zero())
            .map(|d| (target.as_str(), d)),
        _ => None,
    };
    let outcome = match parsed {
        None => Err(format!(
            "usage: {NAME} URI SECONDS (SECONDS a positive number)"
        )),
        Some((target, secs)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("{NAME}: starting the runtime: {e}"))
            .and_then(|rt| rt.block_on(run(target, secs))),
    };
    match outcome {
        Ok(()) => {
            let _ = std::io::stdout().lock().write_all(b"ok\n");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            let line: String = msg
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                .collect();
            let _ = writeln!(std::io::stderr().lock(), "{}", line.trim_end());
            ExitCode::FAILURE
        }
    }
}
