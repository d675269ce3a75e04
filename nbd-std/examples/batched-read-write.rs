//! Pipelined reads and writes, many in flight on one connection: the Rust
//! counterpart of libnbd's `batched-read-write` example.
//!
//! ```text
//! $ nbdkit -U - --filter=noparallel memory 2M \
//!     --run 'cargo run -p nbd-std --example batched-read-write -- $unixsocket'
//! finished OK
//! ```
//!
//! Let P be half the export, at most 2 MiB. The example
//!
//! 1. reads the first 2P bytes as a batch of 64 KiB reads, all queued
//!    before any reply is awaited;
//! 2. queues one P-byte read of `[0, P)` and one P-byte write of
//!    `[P, 2P)` (the bytes read there, inverted) before waiting for either:
//!    with a server that handles one request at a time (nbdkit's
//!    `noparallel` filter) a client that stopped reading replies while it
//!    is still sending the write would deadlock, so a watchdog ends the
//!    program after 20 s;
//! 3. checks that the large read returned what step 1 read, and reads
//!    `[P, 2P)` back in a batch to check the write;
//! 4. writes the original bytes back as a batch of 64 KiB writes and
//!    checks them once more, so the export ends as it started.
//!
//! It prints `finished OK` on success. Errors, including any data
//! difference, are one line on stderr and exit status 1. The export must
//! be writable, and nothing else may write to it meanwhile.
//!
//! The argument is a Unix socket path or an NBD URI.

use nbd_std::CmdFlags;
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_std::{Client, Cookie};

#[path = "common/cli.rs"]
mod cli;

/// Largest P (libnbd's example uses the same bound).
const MAX_PACKET: u64 = 2 << 20;
/// Size of each request of a batch.
const PIECE: u64 = 64 << 10;
const WATCHDOG: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    cli::run(|args| {
        let (target, _) = cli::target_and_rest(args, "SOCKET|URI", 0)?;
        let mut nbd = cli::connect(target)?;
        run(&mut nbd, target)?;
        nbd.shutdown().map_err(|e| cli::describe(target, &e))?;
        cli::write_stdout(b"finished OK\n")
    })
}

fn run(nbd: &mut Client, target: &str) -> Result<(), String> {
    let err = |e: nbd_std::Error| cli::describe(target, &e);
    let info = nbd.export_info().map_err(err)?;
    if info.is_read_only() {
        return Err(format!("{target}: this NBD export is read-only"));
    }
    // Requests must respect the server's alignment and payload limit.
    let align = info.block_size.map_or(1, |b| u64::from(b.minimum.max(1)));
    let mut p = (info.size / 2)
        .min(MAX_PACKET)
        .min(nbd.connection().payload_max());
    p -= p % align;
    if p == 0 {
        return Err(format!(
            "{target}: the export ({} bytes) is too small",
            info.size
        ));
    }
    let piece = PIECE.min(p) / align * align;
    cli::watchdog(WATCHDOG, "timed out after 20 s: deadlock probably occurred");

    // 1. A batch of reads.
    let before = read_batch(nbd, 0, 2 * p, piece).map_err(err)?;
    let (a, b) = before.split_at(p as usize);

    // 2. One large read and one large write in flight together.
    let inverted: Bytes = b.iter().map(|x| !x).collect();
    let rc = nbd
        .aio_pread(BytesMut::zeroed(p as usize), 0, CmdFlags::empty())
        .map_err(err)?;
    let wc = nbd
        .aio_pwrite(inverted.clone(), p, CmdFlags::empty())
        .map_err(err)?;
    let read = wait_read(nbd, rc).map_err(err)?;
    wait_write(nbd, wc).map_err(err)?;

    // 3. Verification.
    compare(target, 0, a, &read)?;
    let now = read_batch(nbd, p, p, piece).map_err(err)?;
    compare(target, p, &inverted, &now)?;

    // 4. Put the original bytes back, as a batch of writes.
    let original = Bytes::copy_from_slice(b);
    write_batch(nbd, p, &original, piece).map_err(err)?;
    let now = read_batch(nbd, p, p, piece).map_err(err)?;
    compare(target, p, &original, &now)
}

/// Reads `len` bytes at `offset` as requests of `piece` bytes, all queued
/// before the first reply is awaited.
fn read_batch(nbd: &mut Client, offset: u64, len: u64, piece: u64) -> nbd_std::Result<Vec<u8>> {
    let mut cookies = Vec::new();
    let mut at = 0;
    while at < len {
        let n = piece.min(len - at);
        cookies.push(nbd.aio_pread(
            BytesMut::zeroed(n as usize),
            offset + at,
            CmdFlags::empty(),
        )?);
        at += n;
    }
    let mut out = Vec::with_capacity(len as usize);
    for c in cookies {
        out.extend_from_slice(&wait_read(nbd, c)?);
    }
    Ok(out)
}

/// Writes `data` at `offset` as requests of `piece` bytes (slices of
/// `data`, not copies), all queued before the first reply is awaited.
fn write_batch(nbd: &mut Client, offset: u64, data: &Bytes, piece: u64) -> nbd_std::Result<()> {
    let mut cookies = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = (piece as usize).min(data.len() - at);
        cookies.push(nbd.aio_pwrite(
            data.slice(at..at + n),
            offset + at as u64,
            CmdFlags::empty(),
        )?);
        at += n;
    }
    cookies.into_iter().try_for_each(|c| wait_write(nbd, c))
}

fn wait_read(nbd: &mut Client, cookie: Cookie) -> nbd_std::Result<BytesMut> {
    let c = nbd.wait(cookie)?;
    c.result?;
    Ok(c.buffer.unwrap_or_default())
}

fn wait_write(nbd: &mut Client, cookie: Cookie) -> nbd_std::Result<()> {
    Ok(nbd.wait(cookie)?.result?)
}

/// Fails with a message naming the first differing byte.
fn compare(target: &str, offset: u64, expected: &[u8], got: &[u8]) -> Result<(), String> {
    if expected.len() != got.len() {
        return Err(format!(
            "{target}: read {} bytes at offset {offset}, expected {}",
            got.len(),
            expected.len()
        ));
    }
    match expected.iter().zip(got).position(|(e, g)| e != g) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{target}: data mismatch at offset {}: expected 0x{:02x}, read 0x{:02x}",
            offset + i as u64,
            expected[i],
            got[i]
        )),
    }
}
