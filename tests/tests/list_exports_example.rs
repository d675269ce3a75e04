//! The seed program (issue 2, "The example"): nbd-std's `list-exports`
//! example must behave exactly like libnbd's. It is built once, then run
//! as a process with scripted standard input against real servers and the
//! fake server. The `demo` example (the README's first command) runs too.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nbd_tests::fake::FakeConn;
use nbd_tests::proto::*;
use nbd_tests::{make_file, nbdkit, nbdkit_with, qemu_nbd, scratch_dir, FakeServer, Server};

/// How long one run of the example may take before it counts as a hang.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(d)
            }
        }
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// Builds `cargo build -p nbd-std --example list-exports` once per test
/// run and returns the binary.
fn example() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "nbd-std", "--example", "list-exports"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "building the list-exports example failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = target_dir().join("debug/examples/list-exports");
        assert!(bin.exists(), "{} not found after the build", bin.display());
        bin
    })
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `program args` with `stdin` as standard input; panics (after
/// killing it) if it has not exited within [`RUN_TIMEOUT`].
fn run_with(mut cmd: Command, stdin: &str) -> Run {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the example");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    // The child may exit before reading everything: ignore EPIPE.
    let writer = thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the example") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} hung for {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    writer.join().unwrap();
    Run {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn list_exports(args: &[&str], stdin: &str) -> Run {
    let mut cmd = Command::new(example());
    cmd.args(args);
    run_with(cmd, stdin)
}

fn sock(s: &Server) -> String {
    s.socket().to_str().unwrap().to_owned()
}

/// One clear line on stderr and exit status 1.
fn assert_one_line_failure(r: &Run, what: &str) {
    assert_eq!(r.status.code(), Some(1), "{what}: {}", r.stderr);
    assert_eq!(
        r.stderr.lines().count(),
        1,
        "{what}: stderr should be one line: {:?}",
        r.stderr
    );
    assert!(
        r.stderr.ends_with('\n') && r.stderr.trim().len() > 5,
        "{what}: {:?}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
}

fn qemu_hello(dir: &Path, extra: &[&str]) -> Server {
    let img = make_file(dir, "disk.img", 2048, |i| i as u8);
    let mut args = vec!["-x", "hello"];
    args.extend_from_slice(extra);
    qemu_nbd(&args, &img)
}

const PROMPT: &str = "Which export to connect to (-1 to quit)? ";

// ------------------------------------------------------------------ the transcript

#[test]
fn qemu_hello_choose_0() {
    let data = scratch_dir();
    let s = qemu_hello(data.path(), &[]);
    let sock = sock(&s);
    let r = list_exports(&[&sock], "0\n");
    assert_eq!(r.stderr, "");
    assert_eq!(
        r.stdout,
        format!("[0] hello\n{PROMPT}Connecting to hello ...\n{sock}: hello: size = 2048 bytes\n")
    );
    assert_eq!(r.status.code(), Some(0));
}

#[test]
fn qemu_hello_with_description() {
    let data = scratch_dir();
    let s = qemu_hello(data.path(), &["-D", "test export"]);
    let sock = sock(&s);
    let r = list_exports(&[&sock], "0\n");
    assert_eq!(
        r.stdout,
        format!(
            "[0] hello\n  (test export)\n{PROMPT}Connecting to hello ...\n\
             {sock}: hello: size = 2048 bytes\n"
        )
    );
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

/// The URI form of the argument; the URI is what gets printed.
#[test]
fn uri_argument() {
    let data = scratch_dir();
    let s = qemu_hello(data.path(), &[]);
    let uri = format!("nbd+unix:///?socket={}", sock(&s));
    let r = list_exports(&[&uri], "0\n");
    assert_eq!(
        r.stdout,
        format!("[0] hello\n{PROMPT}Connecting to hello ...\n{uri}: hello: size = 2048 bytes\n")
    );
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

/// libnbd's own test scenario: nbdkit eval with exports foo and foobar.
#[test]
fn nbdkit_eval_foo_foobar_choose_1() {
    let s = nbdkit(&[
        "eval",
        "list_exports=echo NAMES; echo foo; echo foobar",
        "open=echo \"$3\"",
        "get_size=echo \"$2\" | wc -c",
        "pread=head -c \"$3\" /dev/zero",
    ]);
    let sock = sock(&s);
    let r = list_exports(&[&sock], "1\n");
    assert_eq!(
        r.stdout,
        format!("[0] foo\n[1] foobar\n{PROMPT}Connecting to foobar ...\n{sock}: foobar: size = 7 bytes\n")
    );
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

// ------------------------------------------------------------------ -1, bad indexes

/// -1 quits with NBD_OPT_ABORT (checked on the wire) and exit status 0.
#[test]
fn minus_one_sends_abort_and_exits_0() {
    let server = FakeServer::start(|c: &mut FakeConn| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        let mut seen = Vec::new();
        loop {
            let (opt, _) = c.recv_option()?;
            seen.push(opt);
            match opt {
                OPT_EXTENDED_HEADERS => c.send_error(opt, REP_ERR_UNSUP, "")?,
                OPT_STRUCTURED_REPLY => c.send_ack(opt)?,
                OPT_LIST => {
                    c.send_server("first", "")?;
                    c.send_server("second", "the second one")?;
                    c.send_ack(opt)?;
                }
                OPT_ABORT => {
                    c.send_ack(opt)?;
                    break;
                }
                other => panic!("unexpected option {other}"),
            }
        }
        assert_eq!(
            seen,
            [
                OPT_EXTENDED_HEADERS,
                OPT_STRUCTURED_REPLY,
                OPT_LIST,
                OPT_ABORT
            ]
        );
        c.expect_eof()
    });
    let target = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&target], "-1\n");
    assert_eq!(
        r.stdout,
        format!("[0] first\n[1] second\n  (the second one)\n{PROMPT}")
    );
    assert_eq!(r.stderr, "");
    assert_eq!(r.status.code(), Some(0));
    server.join().unwrap();
}

/// doc/proto.md, "NBD_OPT_LIST": a listing may have no `NBD_REP_SERVER`
/// reply at all. Like libnbd's example, ours still prompts; -1 quits with
/// `NBD_OPT_ABORT` (seen by the server) and exit status 0.
#[test]
fn empty_list_minus_one_sends_abort_and_exits_0() {
    let server = FakeServer::start(|c: &mut FakeConn| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        loop {
            let (opt, _) = c.recv_option()?;
            match opt {
                OPT_EXTENDED_HEADERS => c.send_error(opt, REP_ERR_UNSUP, "")?,
                // The listing: no NBD_REP_SERVER, only the ACK.
                OPT_STRUCTURED_REPLY | OPT_LIST => c.send_ack(opt)?,
                OPT_ABORT => {
                    c.send_ack(opt)?;
                    return c.expect_eof();
                }
                other => panic!("unexpected option {other}"),
            }
        }
    });
    let target = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&target], "-1\n");
    assert_eq!(r.stdout, PROMPT);
    assert_eq!(r.stderr, "");
    assert_eq!(r.status.code(), Some(0));
    server.join().unwrap();
}

/// doc/proto.md, "NBD_OPT_LIST": with no exports listed, index 0 is out of
/// range, as in libnbd's example: one line on stderr, exit status 1.
#[test]
fn empty_list_index_0_is_out_of_range() {
    let server = FakeServer::start(|c: &mut FakeConn| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        loop {
            let (opt, _) = c.recv_option()?;
            match opt {
                OPT_EXTENDED_HEADERS => c.send_error(opt, REP_ERR_UNSUP, "")?,
                OPT_STRUCTURED_REPLY | OPT_LIST => c.send_ack(opt)?,
                other => panic!("unexpected option {other}"),
            }
            if opt == OPT_LIST {
                break;
            }
        }
        // Whatever the client does next (ABORT or hanging up), it must
        // not ask for an export.
        match c.recv_option() {
            Ok((OPT_ABORT, _)) => c.send_ack(OPT_ABORT),
            Ok((other, _)) => panic!("unexpected option {other} after a bad index"),
            Err(_) => Ok(()),
        }
    });
    let target = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&target], "0\n");
    assert_eq!(r.stdout, PROMPT);
    assert_eq!(r.stderr, "index 0 out of range\n");
    assert_eq!(r.status.code(), Some(1));
    server.join().unwrap();
}

#[test]
fn out_of_range_and_invalid_indexes() {
    let data = scratch_dir();
    let s = qemu_hello(data.path(), &[]);
    let sock = sock(&s);
    for (input, want) in [
        ("5\n", "index 5 out of range"),
        ("-2\n", "index -2 out of range"),
        ("1\n", "index 1 out of range"),
    ] {
        let r = list_exports(&[&sock], input);
        assert_eq!(r.stderr, format!("{want}\n"), "input {input:?}");
        assert_eq!(r.status.code(), Some(1));
        assert_eq!(r.stdout, format!("[0] hello\n{PROMPT}"));
    }
    for input in ["abc\n", ""] {
        let r = list_exports(&[&sock], input);
        assert_one_line_failure(&r, &format!("input {input:?}"));
        assert!(!r.stdout.contains("Connecting"), "{}", r.stdout);
    }
}

// ------------------------------------------------------------------ failures

#[test]
fn oldstyle_server_cannot_list() {
    let s = nbdkit_with(&["-o"], &["memory", "1M"]);
    let r = list_exports(&[&sock(&s)], "0\n");
    assert_eq!(r.stderr, "Server does not support listing exports.\n");
    assert_eq!(r.stdout, "");
    assert_eq!(r.status.code(), Some(1));
}

/// Plain newstyle has no NBD_OPT_LIST either.
#[test]
fn plain_newstyle_server_cannot_list() {
    let s = nbdkit_with(&["--mask-handshake=0"], &["memory", "1M"]);
    let r = list_exports(&[&sock(&s)], "0\n");
    assert_eq!(r.stderr, "Server does not support listing exports.\n");
    assert_eq!(r.status.code(), Some(1));
}

#[test]
fn missing_socket() {
    let dir = scratch_dir();
    let path = dir.path().join("no-such.sock");
    let r = list_exports(&[path.to_str().unwrap()], "0\n");
    assert_one_line_failure(&r, "missing socket");
    assert!(r.stderr.contains("no-such.sock"), "{}", r.stderr);
    assert_eq!(r.stdout, "");
}

#[test]
fn no_argument_prints_usage() {
    for args in [&[][..], &["a", "b"][..]] {
        let r = list_exports(args, "");
        assert_eq!(r.status.code(), Some(1));
        assert!(r.stderr.starts_with("usage: "), "{}", r.stderr);
        assert!(r.stderr.contains("SOCKET|URI"), "{}", r.stderr);
        assert_eq!(r.stdout, "");
    }
}

/// A server that dies in the middle of the listing: one line, exit 1, no
/// hang.
#[test]
fn server_dies_mid_negotiation() {
    let server = FakeServer::start(|c| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        loop {
            let (opt, _) = c.recv_option()?;
            match opt {
                OPT_EXTENDED_HEADERS => c.send_error(opt, REP_ERR_UNSUP, "")?,
                OPT_STRUCTURED_REPLY => c.send_ack(opt)?,
                OPT_LIST => {
                    c.send_server("doomed", "")?;
                    // Half of the next reply header, then the server is gone.
                    c.send(&OPTION_REPLY_MAGIC.to_be_bytes()[..5])?;
                    return c.close();
                }
                other => panic!("unexpected option {other}"),
            }
        }
    });
    let target = server.uri();
    let t = Instant::now();
    let r = list_exports(&[&target], "0\n");
    assert_one_line_failure(&r, "server died");
    assert!(r.stderr.starts_with(&format!("{target}: ")), "{}", r.stderr);
    assert_eq!(r.stdout, "", "nothing listed from a broken listing");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    server.join().unwrap();
}

/// A server that dies after the listing, when the chosen export is
/// requested.
#[test]
fn server_dies_at_go() {
    let server = FakeServer::start(|c| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        loop {
            let (opt, _) = c.recv_option()?;
            match opt {
                OPT_EXTENDED_HEADERS => c.send_error(opt, REP_ERR_UNSUP, "")?,
                OPT_STRUCTURED_REPLY => c.send_ack(opt)?,
                OPT_LIST => {
                    c.send_server("x", "")?;
                    c.send_ack(opt)?;
                }
                OPT_GO => return c.close(),
                other => panic!("unexpected option {other}"),
            }
        }
    });
    let sock = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&sock], "0\n");
    assert_eq!(r.stdout, format!("[0] x\n{PROMPT}Connecting to x ...\n"));
    assert_one_line_failure(&r, "server died at GO");
    server.join().unwrap();
}

// ------------------------------------------------------------------ demo

/// The README's first command: the demo starts its own qemu-nbd.
#[test]
fn demo_example_runs_end_to_end() {
    // Build first (quietly) so the run itself is quick.
    example();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["run", "-q", "-p", "nbd-std", "--example", "demo"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let r = run_with(cmd, "");
    assert_eq!(r.status.code(), Some(0), "stderr: {}", r.stderr);
    assert!(r.stdout.contains("[0] hello\n"), "{}", r.stdout);
    assert!(r.stdout.contains("Connecting to hello ..."), "{}", r.stdout);
    assert!(
        r.stdout.contains("hello: size = 2048 bytes\n"),
        "{}",
        r.stdout
    );
}
