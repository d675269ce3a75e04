//! `nbd discard` and `nbd zero` (libnbd 1.24's nbddiscard and nbdzero):
//! trim, or write zeroes over, a range of an export (all of it by default).

use bytes::Bytes;
use nbd_std::{Client, CmdFlags, Config};

use crate::common::{apply_timeout, connect, fail, one_server, parse_size, Context, Res};

/// Arguments shared by discard and zero.
#[derive(Debug, clap::Args)]
pub struct Range {
    /// Start at byte N (default 0).
    #[arg(short = 'o', long, value_name = "N", value_parser = parse_size)]
    offset: Option<u64>,
    /// Act on N bytes (default: to the end of the export).
    #[arg(short = 'n', long, value_name = "N", value_parser = parse_size)]
    length: Option<u64>,
    /// Flush the export afterwards.
    #[arg(long)]
    flush: bool,
    /// Give up if connecting or any request takes longer than SECONDS.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// NBD URI, or [ CMD ARGS ... ] after --.
    #[arg(value_name = "NBD", num_args = 0..)]
    server: Vec<String>,
}

/// Arguments of `nbd discard`.
#[derive(Debug, clap::Args)]
pub struct DiscardArgs {
    #[command(flatten)]
    range: Range,
}

/// Arguments of `nbd zero`.
#[derive(Debug, clap::Args)]
pub struct ZeroArgs {
    #[command(flatten)]
    range: Range,
    /// Fail instead of writing zeroes slowly (NBD_CMD_FLAG_FAST_ZERO).
    #[arg(long)]
    fast: bool,
    /// Allocate the zeroed range instead of punching holes (NBD_CMD_FLAG_NO_HOLE).
    #[arg(long)]
    allocate: bool,
}

/// Largest single trim or zero request (aligned to any block size).
const MAX_REQ: u64 = 1 << 30;

fn open(r: &Range) -> Res<(Client, u64, u64)> {
    let server = one_server(&r.server)?;
    let mut cfg = Config::default();
    apply_timeout(&mut cfg, r.timeout)?;
    let c = connect(&server, cfg)?;
    let info = c.export_info().ctx("get_size")?;
    if info.is_read_only() {
        return fail("the export is read-only");
    }
    let size = info.size;
    let start = r.offset.unwrap_or(0);
    if start > size {
        return fail(format!(
            "offset {start} is beyond the end of the export ({size} bytes)"
        ));
    }
    let len = r.length.unwrap_or(size - start);
    if len > size - start {
        return fail(format!(
            "offset + length ({}) is beyond the end of the export ({size} bytes)",
            start as u128 + len as u128
        ));
    }
    Ok((c, start, start + len))
}

fn finish(mut c: Client, flush: bool) -> Res {
    if flush && c.export_info().is_ok_and(|i| i.can_flush()) {
        c.flush(CmdFlags::empty()).ctx("flush")?;
    }
    c.shutdown().ctx("disconnect")?;
    Ok(0)
}

/// Runs `nbd discard`.
pub fn run_discard(a: DiscardArgs) -> Res {
    let (mut c, mut off, end) = open(&a.range)?;
    if !c.export_info().is_ok_and(|i| i.can_trim()) {
        return fail("the server does not support discard (trim)");
    }
    while off < end {
        let n = (end - off).min(MAX_REQ);
        c.trim(off, n, CmdFlags::empty())
            .ctx(format!("trim at offset {off}"))?;
        off += n;
    }
    finish(c, a.range.flush)
}

/// Runs `nbd zero`.
pub fn run_zero(a: ZeroArgs) -> Res {
    let (mut c, mut off, end) = open(&a.range)?;
    let info = c.export_info().ctx("get_size")?.clone();
    let mut flags = CmdFlags::empty();
    if a.allocate {
        flags |= CmdFlags::NO_HOLE;
    }
    if a.fast {
        if !info.can_fast_zero() {
            return fail("the server does not support fast zeroing");
        }
        flags |= CmdFlags::FAST_ZERO;
    }
    if info.can_zero() {
        while off < end {
            let n = (end - off).min(MAX_REQ);
            c.zero(off, n, flags).ctx(format!("zero at offset {off}"))?;
            off += n;
        }
    } else {
        if a.fast {
            return fail("the server does not support zeroing");
        }
        // No NBD_CMD_WRITE_ZEROES: write buffers of zeroes.
        let max = c.connection().payload_max().clamp(4096, 4 << 20);
        let zeroes = Bytes::from(vec![0u8; max as usize]);
        while off < end {
            let n = (end - off).min(max);
            c.pwrite_bytes(zeroes.slice(..n as usize), off, CmdFlags::empty())
                .ctx(format!("write at offset {off}"))?;
            off += n;
        }
    }
    finish(c, a.range.flush)
}
