//! Random structured reads whose replies are checked against the NBD
//! spec's rules for read chunks: the Rust counterpart of libnbd's
//! `strict-structured-reads` example.
//!
//! ```text
//! $ qemu-nbd -f raw -r -k /tmp/sock disk.img &
//! $ cargo run -p nbd-std --example strict-structured-reads -- /tmp/sock 1000
//! totals:
//!  data chunks:        1020
//!  ...
//! ```
//!
//! COUNT reads (default 1000), each of up to 2 MiB at a random offset and
//! half of them with the DF (don't fragment) flag when the server allows
//! it, are kept in flight 16 at a time. For every reply the example checks
//! that each chunk lies inside its request, that data and hole chunks are
//! not empty and do not overlap, that holes read as zeroes, that a
//! successful read is covered exactly by its data and hole chunks, and that
//! a DF read came back in one chunk. Reads the server fails (error chunks)
//! are counted, not treated as violations. At the end it prints the totals
//! of chunks and bytes by kind; a server that broke a rule is then reported
//! on stderr (the first violation) with exit status 1.
//!
//! Without structured replies (nbd-server, `nbdkit --no-sr`) every read is
//! one data chunk. The first argument is a Unix socket path or an NBD URI.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use bytes::BytesMut;
use nbd_std::CmdFlags;
use nbd_std::{Client, Completion, Cookie, ReadChunkKind};

#[path = "common/cli.rs"]
mod cli;

/// Largest read (libnbd's example uses the same).
const MAX_READ: u64 = 2 << 20;
const DEFAULT_COUNT: u64 = 1000;
/// Reads kept in flight at once.
const DEPTH: usize = 16;

/// One read in flight.
#[derive(Debug, Clone, Copy)]
struct Request {
    offset: u64,
    len: u64,
    df: bool,
}

#[derive(Debug, Default)]
struct Totals {
    data_chunks: u64,
    data_bytes: u64,
    hole_chunks: u64,
    hole_bytes: u64,
    error_chunks: u64,
    chunks: u64,
    df_reads: u64,
    reads: u64,
    failed_reads: u64,
    bytes: u64,
    compliant: u64,
    /// The first rule the server broke.
    violation: Option<String>,
}

fn main() -> ExitCode {
    cli::run(|args| {
        let (target, rest) = cli::target_and_rest(args, "SOCKET|URI [COUNT]", 1)?;
        let count = cli::parse_count(rest.first(), DEFAULT_COUNT, "count")?;
        let mut nbd = cli::connect(target)?;
        let totals = run(&mut nbd, count).map_err(|e| cli::describe(target, &e))?;
        nbd.shutdown().map_err(|e| cli::describe(target, &e))?;
        cli::write_stdout(report(&totals).as_bytes())?;
        match totals.violation {
            Some(v) => Err(format!("{target}: buggy server: {v}")),
            None => Ok(()),
        }
    })
}

fn run(nbd: &mut Client, count: u64) -> nbd_std::Result<Totals> {
    let info = nbd.export_info()?;
    let size = info.size;
    let can_df = info.can_df();
    let align = info.block_size.map_or(1, |b| u64::from(b.minimum.max(1)));
    if size < 512 {
        return Err(nbd_std::Error::Unsupported(format!(
            "the export ({size} bytes) is too small for useful testing"
        )));
    }
    // Like libnbd: reads of a fixed size, smaller than the export so that
    // the offset can vary.
    let mut len = MAX_READ.min(size - 1).min(nbd.connection().payload_max());
    len -= len % align;
    if len == 0 {
        len = align.min(size);
    }
    let slots = (size - len) / align + 1;

    let mut rng = cli::Rng::from_time();
    let mut totals = Totals::default();
    let mut pending: HashMap<Cookie, Request> = HashMap::new();
    let mut spare: Vec<BytesMut> = Vec::new();
    let mut issued = 0;
    while issued < count || !pending.is_empty() {
        if issued < count && pending.len() < DEPTH {
            let req = Request {
                offset: rng.below(slots) * align,
                len,
                df: can_df && rng.flip(),
            };
            let mut buf = spare.pop().unwrap_or_default();
            // Stale bytes let the hole check see that holes are zeroed.
            buf.resize(len as usize, 0xa5);
            let flags = if req.df {
                CmdFlags::DF
            } else {
                CmdFlags::empty()
            };
            let cookie = nbd.aio_pread_structured(buf, req.offset, flags)?;
            pending.insert(cookie, req);
            issued += 1;
            continue;
        }
        let (cookie, done) = nbd.wait_any()?;
        let Some(req) = pending.remove(&cookie) else {
            continue;
        };
        if let Err(e @ nbd_std::nbd_core::CommandError::ConnectionClosed(_)) = &done.result {
            return Err(nbd_std::Error::Command(e.clone()));
        }
        check(&req, &done, &mut totals);
        if let Some(b) = done.buffer {
            spare.push(b);
        }
    }
    Ok(totals)
}

/// Checks one completed read against the chunk rules and adds it to the totals.
fn check(req: &Request, done: &Completion, t: &mut Totals) {
    let end = req.offset + req.len;
    let mut violation = None;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut errors = 0;
    for &(offset, length, kind) in &done.chunks {
        t.chunks += 1;
        match kind {
            ReadChunkKind::Data => {
                t.data_chunks += 1;
                t.data_bytes += length;
            }
            ReadChunkKind::Hole => {
                t.hole_chunks += 1;
                t.hole_bytes += length;
            }
            ReadChunkKind::Error => {
                t.error_chunks += 1;
                errors += 1;
            }
            // A kind this program does not know: count it, nothing else.
            _ => {}
        }
        let inside = offset >= req.offset && offset.checked_add(length).is_some_and(|e| e <= end);
        if kind == ReadChunkKind::Error {
            if !(inside && (offset < end || req.len == 0)) {
                violation.get_or_insert(format!(
                    "error chunk at offset {offset} outside the read of {} bytes at {}",
                    req.len, req.offset
                ));
            }
            continue;
        }
        if length == 0 {
            violation.get_or_insert(format!("empty chunk at offset {offset}"));
        } else if !inside {
            violation.get_or_insert(format!(
                "chunk of {length} bytes at offset {offset} outside the read of {} bytes at {}",
                req.len, req.offset
            ));
        } else {
            ranges.push((offset, offset + length));
            if kind == ReadChunkKind::Hole {
                let zeroed = done.buffer.as_ref().is_some_and(|b| {
                    let from = (offset - req.offset) as usize;
                    b.get(from..from + length as usize)
                        .is_some_and(|s| s.iter().all(|&x| x == 0))
                });
                if done.result.is_ok() && !zeroed {
                    violation.get_or_insert(format!(
                        "the hole of {length} bytes at offset {offset} did not read as zeroes"
                    ));
                }
            }
        }
    }
    ranges.sort_unstable();
    if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
        violation.get_or_insert(format!(
            "chunks [{}, {}) and [{}, {}) overlap",
            w[0].0, w[0].1, w[1].0, w[1].1
        ));
    }
    t.reads += 1;
    if req.df {
        t.df_reads += 1;
    }
    match &done.result {
        Ok(()) => {
            let covered: u64 = ranges.iter().map(|(s, e)| e - s).sum();
            if errors > 0 {
                violation.get_or_insert(format!(
                    "the read of {} bytes at {} succeeded despite an error chunk",
                    req.len, req.offset
                ));
            } else if covered != req.len {
                violation.get_or_insert(format!(
                    "the read of {} bytes at {} succeeded with only {covered} bytes in chunks",
                    req.len, req.offset
                ));
            }
            if req.df && done.chunks.len() > 1 {
                violation.get_or_insert(format!(
                    "{} chunks for a DF read of {} bytes at {}",
                    done.chunks.len(),
                    req.len,
                    req.offset
                ));
            }
            if violation.is_none() {
                t.bytes += req.len;
                t.compliant += 1;
            }
        }
        Err(_) => t.failed_reads += 1,
    }
    if let Some(v) = violation {
        t.violation.get_or_insert(v);
    }
}

fn report(t: &Totals) -> String {
    let mut s = String::from("totals:\n");
    let mut line = |label: &str, n: u64| {
        let _ = writeln!(s, " {label:<13}{n:>10}");
    };
    line("data chunks:", t.data_chunks);
    line("data bytes:", t.data_bytes);
    line("hole chunks:", t.hole_chunks);
    line("hole bytes:", t.hole_bytes);
    line("error chunks:", t.error_chunks);
    line("all chunks:", t.chunks);
    line("df reads:", t.df_reads);
    line("reads:", t.reads);
    line("failed reads:", t.failed_reads);
    line("bytes read:", t.bytes);
    line("compliant:", t.compliant);
    s
}
