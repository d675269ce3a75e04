//! Random 4 KiB reads and writes over a writable export, every read
//! checked: the Rust counterpart of libnbd's `reads-and-writes` example,
//! with verification added. **It overwrites data on the export.**
//!
//! ```text
//! $ nbdkit -U - memory 1M --run 'cargo run -p nbd-std --example reads-and-writes -- $unixsocket 1000'
//! ```
//!
//! Each of COUNT rounds (default 1000) writes random bytes to a random
//! 4 KiB-aligned block, then reads another random block. The example keeps
//! a shadow copy of every block it wrote or read: a read of a block seen
//! before must return what the shadow holds. At the end every block in the
//! shadow is read back once more. Any difference is reported on stderr and
//! the exit status is 1; success prints nothing.
//!
//! The first argument is a Unix socket path or an NBD URI.

use nbd_std::CmdFlags;
use std::collections::HashMap;
use std::process::ExitCode;

#[path = "common/cli.rs"]
mod cli;

/// Size and alignment of every request.
const BLOCK: usize = 4096;
const DEFAULT_COUNT: u64 = 1000;

fn main() -> ExitCode {
    cli::run(|args| {
        let (target, rest) = cli::target_and_rest(args, "SOCKET|URI [COUNT]", 1)?;
        let count = cli::parse_count(rest.first(), DEFAULT_COUNT, "count")?;
        let mut nbd = cli::connect(target)?;
        let err = |e: nbd_std::Error| cli::describe(target, &e);

        let info = nbd.export_info().map_err(err)?;
        if info.is_read_only() {
            return Err(format!("{target}: this NBD export is read-only"));
        }
        let blocks = info.size / BLOCK as u64;
        if blocks == 0 {
            return Err(format!(
                "{target}: the export ({} bytes) is smaller than one {BLOCK}-byte block",
                info.size
            ));
        }

        let mut rng = cli::Rng::from_time();
        // Block number -> the bytes the export must hold there.
        let mut shadow: HashMap<u64, Box<[u8]>> = HashMap::new();
        let mut buf = vec![0u8; BLOCK];

        for _ in 0..count {
            let b = rng.below(blocks);
            rng.fill(&mut buf);
            nbd.pwrite(&buf, b * BLOCK as u64, CmdFlags::empty())
                .map_err(err)?;
            shadow.insert(b, buf.as_slice().into());

            let b = rng.below(blocks);
            nbd.pread(&mut buf, b * BLOCK as u64, CmdFlags::empty())
                .map_err(err)?;
            match shadow.get(&b) {
                Some(expected) => compare(target, b, expected, &buf)?,
                None => {
                    shadow.insert(b, buf.as_slice().into());
                }
            }
        }

        // Everything written or seen must still be there.
        let mut seen: Vec<u64> = shadow.keys().copied().collect();
        seen.sort_unstable();
        for b in seen {
            nbd.pread(&mut buf, b * BLOCK as u64, CmdFlags::empty())
                .map_err(err)?;
            if let Some(expected) = shadow.get(&b) {
                compare(target, b, expected, &buf)?;
            }
        }

        nbd.shutdown().map_err(err)
    })
}

/// Fails with a message naming the first differing byte.
fn compare(target: &str, block: u64, expected: &[u8], got: &[u8]) -> Result<(), String> {
    match expected.iter().zip(got).position(|(e, g)| e != g) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{target}: data mismatch at offset {}: expected 0x{:02x}, read 0x{:02x}",
            block * BLOCK as u64 + i as u64,
            expected[i],
            got[i]
        )),
    }
}
