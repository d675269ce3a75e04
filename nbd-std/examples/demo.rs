//! The seed scenario end to end, with nothing else set up: creates a
//! 2048-byte disk image, starts `qemu-nbd` (from qemu-utils) serving it as
//! export `hello` on a private Unix socket, runs the `list-exports` flow
//! against it choosing export 0 (or the index given as the first argument),
//! then stops the server by its PID.
//!
//! ```text
//! $ cargo run -p nbd-std --example demo
//! ```

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "common/list_exports.rs"]
mod list_exports;

/// A qemu-nbd child stopped (and its files removed) on drop.
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server(dir: &Path) -> Result<(Server, PathBuf), String> {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 2048]).map_err(|e| format!("{}: {e}", disk.display()))?;
    let sock = dir.join("sock");
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "hello",
            "-D",
            "nbd-rs demo export",
            "-t",
            "-k",
        ])
        .arg(&sock)
        .arg(&disk)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start qemu-nbd (install qemu-utils): {e}"))?;
    let server = Server {
        child,
        dir: dir.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err("qemu-nbd did not create its socket within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((server, sock))
}

fn main() -> ExitCode {
    let choice = std::env::args().nth(1).unwrap_or_else(|| "0".into());
    let dir = std::env::temp_dir().join(format!("nbd-rs-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("demo: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let (server, sock) = match start_server(&dir) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "demo: qemu-nbd (pid {}) serves a 2048-byte disk as \"hello\" on {}",
        server.child.id(),
        sock.display()
    );
    println!("demo: answering the prompt with {choice}");
    let mut input = Cursor::new(format!("{choice}\n"));
    let result = list_exports::run(
        &sock.display().to_string(),
        &mut input,
        &mut std::io::stdout(),
        true,
    );
    drop(server);
    match result {
        Ok(()) => {
            println!("demo: server stopped, done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
