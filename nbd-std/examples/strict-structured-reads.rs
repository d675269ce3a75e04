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
//!
//! The chunks come to a callback per read (`aio_pread_structured`); the
//! example keeps them per read for its checks, merging a chunk into the one
//! before it when they are adjacent and of the same kind, so that a read
//! split into one chunk per byte in either direction stays one range.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

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

/// The chunks of one read as its callback saw them.
#[derive(Debug, Default)]
struct Chunks {
    /// (offset, length, kind), adjacent chunks of the same kind merged.
    runs: Vec<(u64, u64, ReadChunkKind)>,
    /// Chunks of each kind before merging: data, hole, error, other.
    counts: [u64; 4],
    /// The first chunk with length 0 that is not an error.
    empty: Option<u64>,
}

impl Chunks {
    fn add(&mut self, offset: u64, length: u64, kind: ReadChunkKind) {
        let i = match kind {
            ReadChunkKind::Data => 0,
            ReadChunkKind::Hole => 1,
            ReadChunkKind::Error => 2,
            _ => 3,
        };
        self.counts[i] += 1;
        if length == 0 && kind != ReadChunkKind::Error {
            self.empty.get_or_insert(offset);
        }
        if let Some(last) = self.runs.last_mut() {
            if last.2 == kind && kind != ReadChunkKind::Error && length > 0 {
                if last.0.checked_add(last.1) == Some(offset) {
                    last.1 += length;
                    return;
                }
                if offset.checked_add(length) == Some(last.0) {
                    *last = (offset, last.1 + length, kind);
                    return;
                }
            }
        }
        self.runs.push((offset, length, kind));
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
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
    let mut pending: HashMap<Cookie, (Request, Arc<Mutex<Chunks>>)> = HashMap::new();
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
            let chunks = Arc::new(Mutex::new(Chunks::default()));
            let seen = Arc::clone(&chunks);
            let cookie = nbd.aio_pread_structured(buf, req.offset, flags, move |o, l, k| {
                seen.lock().unwrap_or_else(|e| e.into_inner()).add(o, l, k)
            })?;
            pending.insert(cookie, (req, chunks));
            issued += 1;
            continue;
        }
        let (cookie, done) = nbd.wait_any()?;
        let Some((req, chunks)) = pending.remove(&cookie) else {
            continue;
        };
        if let Err(e @ nbd_std::nbd_core::CommandError::ConnectionClosed(_)) = &done.result {
            return Err(nbd_std::Error::Command(e.clone()));
        }
        let chunks = std::mem::take(&mut *chunks.lock().unwrap_or_else(|e| e.into_inner()));
        check(&req, &done, &chunks, &mut totals);
        if let Some(b) = done.buffer {
            spare.push(b);
        }
    }
    Ok(totals)
}

/// Checks one completed read against the chunk rules and adds it to the totals.
fn check(req: &Request, done: &Completion, chunks: &Chunks, t: &mut Totals) {
    let end = req.offset + req.len;
    let mut violation = None;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let [data, holes, errors, other] = chunks.counts;
    t.chunks += data + holes + errors + other;
    t.data_chunks += data;
    t.hole_chunks += holes;
    t.error_chunks += errors;
    if let Some(offset) = chunks.empty {
        violation.get_or_insert(format!("empty chunk at offset {offset}"));
    }
    for &(offset, length, kind) in &chunks.runs {
        match kind {
            ReadChunkKind::Data => t.data_bytes += length,
            ReadChunkKind::Hole => t.hole_bytes += length,
            // Errors and kinds this program does not know: counted above.
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
            if req.df && chunks.total() > 1 {
                violation.get_or_insert(format!(
                    "{} chunks for a DF read of {} bytes at {}",
                    chunks.total(),
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
