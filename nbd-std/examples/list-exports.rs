//! List the exports of an NBD server, ask which one to use, connect to it
//! and print its size: the Rust counterpart of libnbd's `list-exports`
//! example and of the nbd_opt_go(3) page.
//!
//! ```text
//! $ qemu-nbd -x hello -t -k /tmp/sock disk.img
//! $ cargo run -p nbd-std --example list-exports -- /tmp/sock
//! [0] hello
//! Which export to connect to (-1 to quit)? 0
//! Connecting to hello ...
//! /tmp/sock: hello: size = 2048 bytes
//! ```
//!
//! The argument is a Unix socket path or an NBD URI. Answering -1 ends the
//! session with NBD_OPT_ABORT.

use std::io;
use std::process::ExitCode;

#[path = "common/list_exports.rs"]
mod list_exports;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 {
        eprintln!("usage: {} SOCKET|URI", args[0]);
        return ExitCode::FAILURE;
    }
    match list_exports::run(&args[1], &mut io::stdin().lock(), &mut io::stdout(), false) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
