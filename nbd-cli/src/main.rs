//! `nbd`: the command-line tool of nbd-rs.
//!
//! One binary with a subcommand per libnbd tool, taking that tool's flags
//! and printing its output, so that scripts can switch:
//!
//! | subcommand | libnbd tool |
//! |---|---|
//! | `nbd info` | nbdinfo |
//! | `nbd copy` | nbdcopy |
//! | `nbd dump` | nbddump |
//! | `nbd discard` | nbddiscard |
//! | `nbd zero` | nbdzero |
//!
//! Errors are one line on standard error and exit status 1 (libnbd's
//! `EXIT_FAILURE`); `nbd info --can/--is/--has` exits 2 for "false".

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod common;
mod copy;
mod dump;
mod info;
mod trim;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::common::Fail;

/// NBD client tools: info, copy, dump, discard and zero (libnbd-compatible).
#[derive(Debug, Parser)]
#[command(name = "nbd", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Display information and metadata about NBD servers and exports (nbdinfo).
    Info(info::Args),
    /// Copy to and from an NBD server (nbdcopy).
    Copy(copy::Args),
    /// Hexdump the content of an export (nbddump).
    Dump(dump::Args),
    /// Discard (trim) a range of an export (nbddiscard).
    Discard(trim::DiscardArgs),
    /// Write zeroes over a range of an export (nbdzero).
    Zero(trim::ZeroArgs),
}

impl Cmd {
    fn name(&self) -> &'static str {
        match self {
            Cmd::Info(_) => "info",
            Cmd::Copy(_) => "copy",
            Cmd::Dump(_) => "dump",
            Cmd::Discard(_) => "discard",
            Cmd::Zero(_) => "zero",
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            match e.kind() {
                K::DisplayHelp
                | K::DisplayVersion
                | K::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    return if e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    };
                }
                _ => {
                    // One line: clap's first line, without its usage and tips.
                    let text = e.render().to_string();
                    let line = text.lines().next().unwrap_or("invalid arguments");
                    let line = line.strip_prefix("error: ").unwrap_or(line);
                    eprintln!("nbd: {line} (see nbd --help)");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let name = cli.cmd.name();
    let r = match cli.cmd {
        Cmd::Info(a) => info::run(a),
        Cmd::Copy(a) => copy::run(a),
        Cmd::Dump(a) => dump::run(a),
        Cmd::Discard(a) => trim::run_discard(a),
        Cmd::Zero(a) => trim::run_zero(a),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(Fail(msg)) => {
            eprintln!("nbd {name}: {msg}");
            ExitCode::FAILURE
        }
    }
}
