//! Running nbd-std's example programs as processes, for the tests that
//! check what a user of an example sees (`tests/tests/examples_*.rs`,
//! `list_exports_example.rs`, `defects_pending.rs`).
//!
//! The examples are built once per test process with `cargo build -p
//! nbd-std --examples` and run from `target/debug/examples` (or
//! `$CARGO_TARGET_DIR/debug/examples`), with scripted standard input and
//! a time limit.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Longest any example may run before the test fails as a hang.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// What a program did: exit code (`None` if killed by a signal), standard
/// output and standard error.
pub struct Run {
    /// The exit code, `None` if a signal ended the program.
    pub code: Option<i32>,
    /// Everything written to standard output.
    pub stdout: Vec<u8>,
    /// Everything written to standard error (lossily decoded).
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    /// Shows stdout as (lossy) text, which is what a reader of a failed
    /// assertion wants to see.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("code", &self.code)
            .field("stdout", &String::from_utf8_lossy(&self.stdout))
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl Run {
    /// Standard output as text; panics if it is not UTF-8.
    pub fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    /// Asserts status 0 and nothing on stderr.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "{self:?}");
        assert_eq!(self.stderr, "", "{self:?}");
        self
    }

    /// Asserts status 1 and exactly one non-empty line on stderr that
    /// contains `needle`, and no panic.
    pub fn assert_one_line_error(&self, needle: &str) -> &Self {
        assert_eq!(self.code, Some(1), "{self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        assert!(
            self.stderr.ends_with('\n') && self.stderr.matches('\n').count() == 1,
            "stderr is not one line: {self:?}"
        );
        assert!(
            self.stderr.trim().len() > 1,
            "empty error message: {self:?}"
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:?}"
        );
        self
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace directory")
        .to_path_buf()
}

/// The cargo that runs the tests (`$CARGO`), or `cargo` from `PATH`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the examples of nbd-std and nbd-mio (once per process) and returns the directory
/// that holds them.
pub fn examples_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let workspace = workspace_dir();
        let out = cargo()
            .args([
                "build",
                "-q",
                "-p",
                "nbd-std",
                "-p",
                "nbd-mio",
                "--examples",
            ])
            .current_dir(&workspace)
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
            Some(d) => workspace.join(d),
            None => workspace.join("target"),
        };
        target.join("debug").join("examples")
    })
}

/// Runs example `name` with `args`, `stdin` as its standard input.
pub fn run_example(name: &str, args: &[&str], stdin: &str) -> Run {
    let path = examples_dir().join(name);
    let mut cmd = Command::new(&path);
    cmd.args(args);
    run_command(cmd, stdin)
}

/// Runs `cmd` with `stdin` as standard input and collects what it writes;
/// panics (after killing it) if it has not exited within [`RUN_TIMEOUT`].
pub fn run_command(mut cmd: Command, stdin: &str) -> Run {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin pipe");
    let stdin = stdin.to_owned();
    // The program may exit before reading everything: ignore EPIPE.
    let writer = thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    // Drain the pipes on threads so that a chatty program cannot block.
    let out_t = drain(child.stdout.take().expect("stdout pipe"));
    let err_t = drain(child.stderr.take().expect("stderr pipe"));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the program") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    writer.join().expect("stdin writer");
    Run {
        code: status.code(),
        stdout: out_t.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&err_t.join().expect("stderr reader")).into_owned(),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = pipe.read_to_end(&mut v);
        v
    })
}
