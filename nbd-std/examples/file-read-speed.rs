//! file-read-speed: how fast `NbdFile` reads an export through
//! `std::io::copy` (8 KiB reads), with and without its read-ahead window,
//! against `pread` calls of 256 KiB on the same connection.
//!
//! ```text
//! file-read-speed URI [MiB]
//! ```
//! Prints one line per method: `name MiB secs MiB/s`.

use std::io::{self, Read};
use std::time::Instant;

use nbd_std::{Client, CmdFlags, Config, NbdFile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri = args.next().ok_or("usage: file-read-speed URI [MiB]")?;
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(256);
    let report = |name: &str, bytes: u64, t: Instant| {
        let secs = t.elapsed().as_secs_f64();
        let m = bytes as f64 / (1 << 20) as f64;
        println!("{name} {m:.0} {secs:.3} {:.0}", m / secs);
    };

    let mut c = Client::connect(&uri, Config::default())?;
    let len = (mib << 20).min(c.get_size()?);
    let mut buf = vec![0u8; 256 << 10];
    let t = Instant::now();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        c.pread(&mut buf[..n], off, CmdFlags::empty())?;
        off += n as u64;
    }
    report("pread-256k", len, t);

    for window in [0, nbd_std::DEFAULT_READ_AHEAD] {
        let mut f = NbdFile::new(c)?;
        f.set_read_ahead(window)?;
        let t = Instant::now();
        let n = io::copy(&mut (&mut f).take(len), &mut io::sink())?;
        report(&format!("nbdfile-copy-window-{window}"), n, t);
        c = f.into_inner()?;
    }
    c.shutdown()?;
    Ok(())
}
