//! nbd-std's `deadline-read` on a `mio::Poll` loop: connect with a
//! handshake deadline, read the first 4 KiB with a command deadline, print
//! `ok`. The loop shows where time enters: the poll sleeps until readiness
//! or the connection's next deadline, and `handle_timeout` runs after
//! every wake-up.
//!
//! `deadline-read-mio URI SECONDS`: the URI (or a Unix socket path) and the
//! deadline in seconds (fractions allowed). When a deadline passes, one line
//! on stderr containing `timed out` says what timed out, and the exit
//! status is 1; other failures also exit with 1.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Poll, Token};
use nbd_mio::{CmdFlags, Config, Event, NbdConnection};

const NBD: Token = Token(0);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .get(2)
        .and_then(|s| s.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| !d.is_zero());
    let (Some(target), Some(secs), 3) = (args.get(1), secs, args.len()) else {
        eprintln!("usage: deadline-read-mio URI SECONDS (SECONDS a positive number)");
        return ExitCode::FAILURE;
    };
    match run(target, secs) {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("deadline-read-mio: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(target: &str, secs: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut cfg = Config::default();
    cfg.handshake_timeout = Some(secs);
    cfg.command_timeout = Some(secs);
    let mut nbd = NbdConnection::connect(target, cfg).map_err(|e| format!("{target}: {e}"))?;
    // The handshake's budget includes the connect above.
    nbd.set_handshake_deadline(Some(start + secs));
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(16);
    nbd.register(poll.registry(), NBD)
        .map_err(|e| e.to_string())?;
    let mut read_len = 0;
    loop {
        let timeout = nbd_mio::poll_timeout_until(nbd.poll_timeout());
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        for ev in events.iter() {
            if ev.token() == NBD {
                nbd.handle_event(ev);
            }
        }
        nbd.handle_timeout(Instant::now());
        while let Some(ev) = nbd.poll_event() {
            match ev {
                Event::GoSucceeded(info) => {
                    read_len = info.size.min(4096) as usize;
                    nbd.read(0, BytesMut::zeroed(read_len), CmdFlags::empty())
                        .map_err(|r| format!("read: {}", r.error))?;
                }
                Event::CommandDone { result, .. } => {
                    result.map_err(|e| format!("reading the first {read_len} bytes: {e}"))?;
                    // NBD_CMD_DISC goes out at once; no need to wait for the close.
                    let _ = nbd.disconnect();
                    return Ok(());
                }
                Event::Closed(reason) => return Err(format!("connecting to {target}: {reason}")),
                _ => {}
            }
        }
    }
}
