//! List the exports of an NBD server, ask which one to use, connect to it
//! and print its size: nbd-std's `list-exports` example, driven by a
//! `mio::Poll` loop instead of blocking calls.
//!
//! ```text
//! $ qemu-nbd -x hello -t -k /tmp/sock disk.img
//! $ cargo run -p nbd-mio --example list-exports-mio -- /tmp/sock
//! [0] hello
//! Which export to connect to (-1 to quit)? 0
//! Connecting to hello ...
//! /tmp/sock: hello: size = 2048 bytes
//! ```
//!
//! The argument is a Unix socket path or an NBD URI. Answering -1 ends the
//! session with NBD_OPT_ABORT.

use std::io::{self, BufRead, Write};
use std::process::ExitCode;

use mio::{Events, Poll, Token};
use nbd_mio::nbd_core::UsageError;
use nbd_mio::{Config, Event, NbdConnection, OptionKind, Phase};

const NBD: Token = Token(0);
const NO_LISTING: &str = "Server does not support listing exports.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 {
        eprintln!("usage: {} SOCKET|URI", args[0]);
        return ExitCode::FAILURE;
    }
    match run(&args[1], &mut io::stdin().lock(), &mut io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// The mio loop around one connection.
struct Driver {
    poll: Poll,
    events: Events,
    nbd: NbdConnection,
}

/// What a step of the loop decided.
enum Step<T> {
    /// Keep turning the loop.
    Wait,
    /// Stop with this value.
    Done(T),
}

impl Driver {
    /// Turns the loop, passing every core event to `on_event`, until it (or
    /// `check`, consulted once the events are drained) says `Done`. The
    /// connection's end is an error unless `on_event` consumed it.
    fn run<T>(
        &mut self,
        mut on_event: impl FnMut(&mut NbdConnection, Event) -> Result<Step<T>, String>,
        check: impl Fn(&NbdConnection) -> Option<T>,
    ) -> Result<T, String> {
        loop {
            while let Some(ev) = self.nbd.poll_event() {
                if let Step::Done(v) = on_event(&mut self.nbd, ev)? {
                    return Ok(v);
                }
            }
            if let Some(v) = check(&self.nbd) {
                return Ok(v);
            }
            if self.nbd.is_finished() {
                let why = self.nbd.conn().close_reason().cloned();
                return Err(why.map_or("connection closed".into(), |r| r.to_string()));
            }
            self.poll
                .poll(&mut self.events, None)
                .map_err(|e| format!("poll: {e}"))?;
            for ev in self.events.iter() {
                if ev.token() == NBD {
                    self.nbd.handle_event(ev);
                }
            }
        }
    }

    /// Runs until the connection has ended; fails unless it ended cleanly.
    fn run_to_close(&mut self) -> Result<(), String> {
        self.run(
            |_, ev| match ev {
                Event::Closed(r) if r.is_clean() => Ok(Step::Done(())),
                Event::Closed(r) => Err(r.to_string()),
                _ => Ok(Step::Wait),
            },
            |_| None,
        )
    }
}

fn run(target: &str, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<(), String> {
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    let nbd = NbdConnection::connect(target, cfg).map_err(|e| format!("{target}: {e}"))?;
    let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut d = Driver {
        poll,
        events: Events::with_capacity(16),
        nbd,
    };
    d.nbd
        .register(d.poll.registry(), NBD)
        .map_err(|e| format!("{target}: {e}"))?;

    // The handshake: option mode stops in the negotiating phase.
    let ctx = |e: String| format!("{target}: {e}");
    let phase = d
        .run(
            |_, _| Ok(Step::Wait),
            |n| (n.phase() != Phase::Connecting).then(|| n.phase()),
        )
        .map_err(ctx)?;
    // An oldstyle server goes straight to the transmission phase.
    if phase != Phase::Negotiating {
        return Err(NO_LISTING.into());
    }

    match d.nbd.opt_list() {
        Ok(()) => {}
        Err(nbd_mio::Error::Usage(UsageError::Unsupported(_))) => return Err(NO_LISTING.into()),
        Err(e) => return Err(ctx(e.to_string())),
    }
    let mut exports = Vec::new();
    d.run(
        |_, ev| match ev {
            Event::ExportListed { name, description } => {
                exports.push((name, description));
                Ok(Step::Wait)
            }
            Event::OptionSucceeded(OptionKind::List) => Ok(Step::Done(())),
            Event::OptionError { option, error } => Err(format!("{option}: {error}")),
            Event::Closed(r) => Err(r.to_string()),
            _ => Ok(Step::Wait),
        },
        |_| None,
    )
    .map_err(ctx)?;
    if exports.is_empty() {
        return Err(NO_LISTING.into());
    }

    let w = |e: io::Error| format!("stdout: {e}");
    for (i, (name, description)) in exports.iter().enumerate() {
        writeln!(out, "[{i}] {name}").map_err(w)?;
        if !description.is_empty() {
            writeln!(out, "  ({description})").map_err(w)?;
        }
    }
    write!(out, "Which export to connect to (-1 to quit)? ").map_err(w)?;
    out.flush().map_err(w)?;
    let mut line = String::new();
    let n = input
        .read_line(&mut line)
        .map_err(|e| format!("stdin: {e}"))?;
    if n == 0 {
        return Err("no export chosen (end of input)".into());
    }
    let i: i64 = line
        .trim()
        .parse()
        .map_err(|_| format!("invalid index {:?}", line.trim()))?;
    if i == -1 {
        d.nbd.opt_abort().map_err(|e| ctx(e.to_string()))?;
        return d.run_to_close().map_err(ctx);
    }
    let Some((name, _)) = usize::try_from(i).ok().and_then(|i| exports.get(i)) else {
        return Err(format!("index {i} out of range"));
    };

    writeln!(out, "Connecting to {name} ...").map_err(w)?;
    d.nbd
        .set_export_name(name)
        .map_err(|e| ctx(e.to_string()))?;
    d.nbd
        .opt_go()
        .map_err(|e| format!("{target}: {name}: {e}"))?;
    let size = d
        .run(
            |_, ev| match ev {
                Event::GoSucceeded(info) => Ok(Step::Done(info.size)),
                Event::OptionError { option, error } => Err(format!("{option}: {error}")),
                Event::Closed(r) => Err(r.to_string()),
                _ => Ok(Step::Wait),
            },
            |_| None,
        )
        .map_err(|e| format!("{target}: {name}: {e}"))?;
    writeln!(out, "{target}: {name}: size = {size} bytes").map_err(w)?;

    d.nbd.disconnect().map_err(|e| ctx(e.to_string()))?;
    d.run_to_close().map_err(ctx)
}
