//! `nbd dump`: nbddump's hexdump of an export.

use std::io::Write;

use bytes::BytesMut;
use nbd_std::{CmdFlags, Config};

use crate::common::{apply_timeout, connect, one_server, parse_size, Context, Res};

/// Arguments of `nbd dump` (those of nbddump).
#[derive(Debug, clap::Args)]
#[command(after_help = "NBD is an NBD URI or, after --, [ CMD ARGS ... ].")]
pub struct Args {
    /// Dump at most N bytes.
    #[arg(short = 'n', long, alias = "limit", value_name = "N", value_parser = parse_size)]
    length: Option<u64>,
    /// Start at byte N.
    #[arg(short = 'o', long, alias = "skip", value_name = "N", value_parser = parse_size)]
    offset: Option<u64>,
    /// Accepted for compatibility (output is never coloured).
    #[arg(
        long,
        alias = "colour",
        alias = "no-color",
        alias = "no-colour",
        hide = true
    )]
    color: bool,
    /// Give up if connecting or any request takes longer than SECONDS.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// NBD URI, or [ CMD ARGS ... ] after --.
    #[arg(value_name = "NBD", num_args = 0..)]
    server: Vec<String>,
}

/// Bytes read per request.
const CHUNK: usize = 1 << 20;

/// Runs `nbd dump`.
pub fn run(a: Args) -> Res {
    let server = one_server(&a.server)?;
    let mut cfg = Config::default();
    apply_timeout(&mut cfg, a.timeout)?;
    let mut c = connect(&server, cfg)?;
    let size = c.get_size().ctx("get_size")?;
    let start = a.offset.unwrap_or(0).min(size);
    let end = match a.length {
        Some(n) => start.saturating_add(n).min(size),
        None => size,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut d = Dumper::default();
    let mut buf = BytesMut::zeroed(CHUNK);
    let mut off = start;
    while off < end {
        let n = ((end - off) as usize).min(CHUNK);
        buf.resize(n, 0);
        buf = c
            .pread_buf(buf, off, CmdFlags::empty())
            .ctx(format!("pread at offset {off}"))?;
        let last = off + n as u64 == end;
        let r = d.feed(&mut out, off, &buf[..n], last && end == size);
        if let Err(e) = r {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(0);
            }
            return Err(e).ctx("write to stdout");
        }
        off += n as u64;
    }
    match d.end(&mut out, end == size).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(e).ctx("write to stdout")
        }
        _ => {}
    }
    let _ = c.shutdown();
    Ok(0)
}

/// The hexdump state: lines of 16 bytes, a run of lines equal to the one
/// before collapsed into one `*` line.
#[derive(Default)]
pub struct Dumper {
    prev: Option<[u8; 16]>,
    starred: bool,
    /// A partial line carried over to the next chunk.
    pending: Vec<u8>,
    pending_off: u64,
}

impl Dumper {
    /// Feeds `data` found at `off`. `last`: the final chunk ends the
    /// export, whose last line is then shown even if it repeats (as
    /// nbddump shows it); a dump cut short by `--length` ends without it.
    pub fn feed(
        &mut self,
        out: &mut impl Write,
        mut off: u64,
        mut data: &[u8],
        last: bool,
    ) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let need = 16 - self.pending.len();
            let take = need.min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            off += take as u64;
            if self.pending.len() == 16 {
                let line: [u8; 16] = self.pending[..].try_into().unwrap_or([0; 16]);
                let lo = self.pending_off;
                self.pending.clear();
                self.line(out, lo, &line, last && data.is_empty())?;
            }
        }
        let chunks = data.chunks_exact(16);
        let n = chunks.len();
        let rest = chunks.remainder();
        for (i, ch) in chunks.enumerate() {
            let line: [u8; 16] = ch.try_into().unwrap_or([0; 16]);
            let is_last = last && i + 1 == n && rest.is_empty();
            self.line(out, off, &line, is_last)?;
            off += 16;
        }
        if !rest.is_empty() {
            if self.pending.is_empty() {
                self.pending_off = off;
            }
            self.pending.extend_from_slice(rest);
        }
        Ok(())
    }

    /// Ends the dump: a final partial line is shown unless it repeats the
    /// start of the line before (and does not end the export).
    pub fn end(&mut self, out: &mut impl Write, at_export_end: bool) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(&mut self.pending);
        let repeat = self.prev.is_some_and(|prev| prev[..p.len()] == p[..]);
        if repeat && !at_export_end {
            if !self.starred {
                out.write_all(b"*\n")?;
            }
            return Ok(());
        }
        write_line(out, self.pending_off, &p)
    }

    fn line(
        &mut self,
        out: &mut impl Write,
        off: u64,
        l: &[u8; 16],
        last: bool,
    ) -> std::io::Result<()> {
        if self.prev.as_ref() == Some(l) && !last {
            if !self.starred {
                out.write_all(b"*\n")?;
                self.starred = true;
            }
            return Ok(());
        }
        self.starred = false;
        self.prev = Some(*l);
        write_line(out, off, l)
    }
}

fn write_line(out: &mut impl Write, off: u64, bytes: &[u8]) -> std::io::Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = Vec::with_capacity(80);
    let _ = write!(s, "{off:010x}: ");
    for i in 0..16 {
        match bytes.get(i) {
            Some(b) => {
                s.push(HEX[(b >> 4) as usize]);
                s.push(HEX[(b & 15) as usize]);
                s.push(b' ');
            }
            None => s.extend_from_slice(b"   "),
        }
        if i == 7 {
            s.push(b' ');
        }
    }
    s.push(b'|');
    for i in 0..16 {
        s.push(match bytes.get(i) {
            Some(&b) if (0x20..0x7f).contains(&b) => b,
            Some(_) => b'.',
            None => b' ',
        });
    }
    s.extend_from_slice(b"|\n");
    out.write_all(&s)
}

#[cfg(test)]
mod tests {
    use super::Dumper;

    fn dump(data: &[u8], split: usize) -> String {
        let mut d = Dumper::default();
        let mut out = Vec::new();
        let mut off = 0;
        let pieces: Vec<&[u8]> = data.chunks(split.max(1)).collect();
        for (i, p) in pieces.iter().enumerate() {
            d.feed(&mut out, off, p, i + 1 == pieces.len()).unwrap();
            off += p.len() as u64;
        }
        d.end(&mut out, true).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn layout_and_squash() {
        let mut data = vec![0u8; 37];
        data[..3].copy_from_slice(&[1, 2, 3]);
        let want = "0000000000: 01 02 03 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n\
                    0000000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n\
                    0000000020: 00 00 00 00 00                                   |.....           |\n";
        assert_eq!(dump(&data, 37), want);
        assert_eq!(dump(&data, 5), want);
        let z = vec![0u8; 64];
        let s = dump(&z, 7);
        assert_eq!(s.lines().count(), 3, "{s}");
        assert!(s.contains("*\n0000000030:"), "{s}");
    }
}
