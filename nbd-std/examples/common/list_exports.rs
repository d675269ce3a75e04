//! The list-exports flow shared by the `list-exports` and `demo` examples.

use std::io::{self, BufRead, Write};

use nbd_std::nbd_core::UsageError;
use nbd_std::{Client, Config, Error, Phase};

const NO_LISTING: &str = "Server does not support listing exports.";

/// Lists the exports at `target`, asks on `input` which one to use,
/// connects to it and prints its size; an error is one line of text.
/// With `echo`, the answer read is also written out (for scripted input).
pub fn run(
    target: &str,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    echo: bool,
) -> Result<(), String> {
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    let mut nbd = Client::connect(target, cfg).map_err(|e| format!("{target}: {e}"))?;
    // An oldstyle server goes straight to the transmission phase.
    if nbd.phase() != Phase::Negotiating {
        return Err(NO_LISTING.into());
    }
    let exports = match nbd.opt_list() {
        Ok(e) => e,
        Err(Error::Usage(UsageError::Unsupported(_))) => return Err(NO_LISTING.into()),
        Err(e) => return Err(format!("{target}: {e}")),
    };
    // An empty listing still gets the prompt, as in libnbd's example:
    // -1 quits, any index is out of range.
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
    if echo {
        writeln!(out, "{}", line.trim_end()).map_err(w)?;
    }
    let i: i64 = line
        .trim()
        .parse()
        .map_err(|_| format!("invalid index {:?}", line.trim()))?;
    if i == -1 {
        nbd.opt_abort().map_err(|e| format!("{target}: {e}"))?;
        return Ok(());
    }
    let Some((name, _)) = usize::try_from(i).ok().and_then(|i| exports.get(i)) else {
        return Err(format!("index {i} out of range"));
    };
    writeln!(out, "Connecting to {name} ...").map_err(w)?;
    nbd.set_export_name(name)
        .map_err(|e| format!("{target}: {e}"))?;
    nbd.opt_go().map_err(|e| format!("{target}: {name}: {e}"))?;
    let size = nbd.get_size().map_err(|e| format!("{target}: {e}"))?;
    writeln!(out, "{target}: {name}: size = {size} bytes").map_err(w)?;
    nbd.shutdown().map_err(|e| format!("{target}: {e}"))?;
    Ok(())
}
