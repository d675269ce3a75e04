//! Plumbing shared by the transmission examples (`get-size`,
//! `fetch-first-sector`, `server-flags`, `reads-and-writes`,
//! `batched-read-write`, `strict-structured-reads`): argument handling,
//! connecting, one-line error reports, and a small random number generator.
//!
//! Every example reports a failure as exactly one line on stderr and exits
//! with status 1; none of them panics on bad input or a misbehaving server.

// Each example includes this file and uses a different part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use nbd_std::{Client, Config, Error};

/// Runs an example: hands it the command-line arguments (program name
/// first) and turns its outcome into the exit status. An error message is
/// printed on one line of stderr.
pub fn run(body: impl FnOnce(&[String]) -> Result<(), String>) -> ExitCode {
    let args: Result<Vec<String>, OsString> =
        std::env::args_os().map(OsString::into_string).collect();
    let outcome = match args {
        Ok(args) => body(&args),
        Err(bad) => Err(format!("argument {bad:?} is not valid UTF-8")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            let line: String = msg
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                .collect();
            // Nothing more can be done if stderr itself is gone.
            let _ = writeln!(io::stderr().lock(), "{}", line.trim_end());
            ExitCode::FAILURE
        }
    }
}

/// Splits the arguments into the target (first argument) and the optional
/// ones that follow; more than `max_optional` of those, or no target, is a
/// usage error.
pub fn target_and_rest<'a>(
    args: &'a [String],
    usage: &str,
    max_optional: usize,
) -> Result<(&'a str, &'a [String]), String> {
    let program = args.first().map(String::as_str).unwrap_or("example");
    match args.get(1..) {
        Some([target, rest @ ..]) if rest.len() <= max_optional => Ok((target.as_str(), rest)),
        _ => Err(format!("usage: {program} {usage}")),
    }
}

/// Parses an optional positive count argument.
pub fn parse_count(arg: Option<&String>, default: u64, what: &str) -> Result<u64, String> {
    match arg {
        None => Ok(default),
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("invalid {what} {s:?}: expected a positive integer")),
        },
    }
}

/// Connects to `target` (an NBD URI or a Unix socket path) with the default
/// configuration and returns once the export is ready.
pub fn connect(target: &str) -> Result<Client, String> {
    Client::connect(target, Config::default()).map_err(|e| describe(target, &e))
}

/// An error message that names the target once.
pub fn describe(target: &str, e: &Error) -> String {
    let msg = e.to_string();
    if msg.contains(target) {
        msg
    } else {
        format!("{target}: {msg}")
    }
}

/// Writes `bytes` to stdout and flushes it.
pub fn write_stdout(bytes: &[u8]) -> Result<(), String> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// SplitMix64: small, fast and good enough to pick offsets and fill
/// buffers. Not for anything security related.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from the clock and the process id.
    pub fn from_time() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            // Multiply-shift: unbiased enough for test traffic.
            ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
        }
    }

    /// A coin flip.
    pub fn flip(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// Starts a thread that ends the process with status 1 and `message` on
/// stderr if it is still running after `limit` (libnbd's examples use
/// `alarm(2)` for the same purpose).
pub fn watchdog(limit: std::time::Duration, message: &'static str) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = writeln!(io::stderr().lock(), "{message}");
        std::process::exit(1);
    });
}
