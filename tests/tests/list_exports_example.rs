//! The seed program (issue 2, "The example"): nbd-std's `list-exports`
//! example must behave exactly like libnbd's. It is built once
//! ([`nbd_tests::examples`]), then run as a process with scripted standard input against real servers and the
//! fake server. The `demo` example (the README's first command) runs too.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nbd_tests::examples::{cargo, examples_dir, run_command, run_example, Run};
use nbd_tests::fake::FakeConn;
use nbd_tests::proto::*;
use nbd_tests::{make_file, nbdkit, nbdkit_with, qemu_nbd, scratch_dir, FakeServer, Server};

fn list_exports(args: &[&str], stdin: &str) -> Run {
    run_example("list-exports", args, stdin)
}

fn sock(s: &Server) -> String {
    s.socket().to_str().unwrap().to_owned()
}

fn qemu_hello(dir: &Path, extra: &[&str]) -> Server {
    let img = make_file(dir, "disk.img", 2048, |i| i as u8);
    let mut args = vec!["-x", "hello"];
    args.extend_from_slice(extra);
    qemu_nbd(&args, &img)
}

/// A fake server for the example's listing: newstyle greeting,
/// EXTENDED_HEADERS refused, STRUCTURED_REPLY acknowledged, LIST answered
/// with `exports` (name, description) and an ACK. The first other option
/// (or the error that came instead, such as EOF) ends the loop and goes to
/// `then`, with every option seen so far, that one included.
fn listing_server<F>(exports: &'static [(&'static str, &'static str)], then: F) -> FakeServer
where
    F: FnOnce(&mut FakeConn, io::Result<u32>, Vec<u32>) -> io::Result<()> + Send + 'static,
{
    FakeServer::start(move |c: &mut FakeConn| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        let mut seen = Vec::new();
        loop {
            let opt = match c.recv_option() {
                Ok((opt, _)) => opt,
                Err(e) => return then(c, Err(e), seen),
            };
            seen.push(opt);
            match opt {
                OPT_EXTENDED_HEADERS => c.send_error(opt, REP_ERR_UNSUP, "")?,
                OPT_STRUCTURED_REPLY => c.send_ack(opt)?,
                OPT_LIST => {
                    for (name, description) in exports {
                        c.send_server(name, description)?;
                    }
                    c.send_ack(opt)?;
                }
                _ => return then(c, Ok(opt), seen),
            }
        }
    })
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
        r.stdout_text(),
        format!("[0] hello\n{PROMPT}Connecting to hello ...\n{sock}: hello: size = 2048 bytes\n")
    );
    assert_eq!(r.code, Some(0));
}

#[test]
fn qemu_hello_with_description() {
    let data = scratch_dir();
    let s = qemu_hello(data.path(), &["-D", "test export"]);
    let sock = sock(&s);
    let r = list_exports(&[&sock], "0\n");
    assert_eq!(
        r.stdout_text(),
        format!(
            "[0] hello\n  (test export)\n{PROMPT}Connecting to hello ...\n\
             {sock}: hello: size = 2048 bytes\n"
        )
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

/// The URI form of the argument; the URI is what gets printed.
#[test]
fn uri_argument() {
    let data = scratch_dir();
    let s = qemu_hello(data.path(), &[]);
    let uri = format!("nbd+unix:///?socket={}", sock(&s));
    let r = list_exports(&[&uri], "0\n");
    assert_eq!(
        r.stdout_text(),
        format!("[0] hello\n{PROMPT}Connecting to hello ...\n{uri}: hello: size = 2048 bytes\n")
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
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
        r.stdout_text(),
        format!("[0] foo\n[1] foobar\n{PROMPT}Connecting to foobar ...\n{sock}: foobar: size = 7 bytes\n")
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

// ------------------------------------------------------------------ -1, bad indexes

/// -1 quits with NBD_OPT_ABORT (checked on the wire) and exit status 0.
#[test]
fn minus_one_sends_abort_and_exits_0() {
    let exports = &[("first", ""), ("second", "the second one")];
    let server = listing_server(exports, |c, opt, seen| {
        assert_eq!(
            seen,
            [
                OPT_EXTENDED_HEADERS,
                OPT_STRUCTURED_REPLY,
                OPT_LIST,
                OPT_ABORT
            ]
        );
        c.send_ack(opt?)?;
        c.expect_eof()
    });
    let target = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&target], "-1\n");
    assert_eq!(
        r.stdout_text(),
        format!("[0] first\n[1] second\n  (the second one)\n{PROMPT}")
    );
    assert_eq!(r.stderr, "");
    assert_eq!(r.code, Some(0));
    server.join().unwrap();
}

/// doc/proto.md, "NBD_OPT_LIST": a listing may have no `NBD_REP_SERVER`
/// reply at all. Like libnbd's example, ours still prompts; -1 quits with
/// `NBD_OPT_ABORT` (seen by the server) and exit status 0.
#[test]
fn empty_list_minus_one_sends_abort_and_exits_0() {
    // The listing: no NBD_REP_SERVER, only the ACK.
    let server = listing_server(&[], |c, opt, _| {
        assert_eq!(opt?, OPT_ABORT);
        c.send_ack(OPT_ABORT)?;
        c.expect_eof()
    });
    let target = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&target], "-1\n");
    assert_eq!(r.stdout_text(), PROMPT);
    assert_eq!(r.stderr, "");
    assert_eq!(r.code, Some(0));
    server.join().unwrap();
}

/// doc/proto.md, "NBD_OPT_LIST": with no exports listed, index 0 is out of
/// range, as in libnbd's example: one line on stderr, exit status 1.
#[test]
fn empty_list_index_0_is_out_of_range() {
    // Whatever the client does after the listing (ABORT or hanging up),
    // it must not ask for an export. It need not wait for the ACK either:
    // the reply may meet a closed socket.
    let server = listing_server(&[], |c, opt, _| match opt {
        Ok(OPT_ABORT) => {
            let _ = c.send_ack(OPT_ABORT);
            Ok(())
        }
        Ok(other) => panic!("unexpected option {other} after a bad index"),
        Err(_) => Ok(()),
    });
    let target = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&target], "0\n");
    assert_eq!(r.stdout_text(), PROMPT);
    assert_eq!(r.stderr, "index 0 out of range\n");
    assert_eq!(r.code, Some(1));
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
        assert_eq!(r.code, Some(1));
        assert_eq!(r.stdout_text(), format!("[0] hello\n{PROMPT}"));
    }
    for input in ["abc\n", ""] {
        let r = list_exports(&[&sock], input);
        r.assert_one_line_error("");
        assert!(!r.stdout_text().contains("Connecting"), "{r:?}");
    }
}

// ------------------------------------------------------------------ failures

#[test]
fn oldstyle_server_cannot_list() {
    let s = nbdkit_with(&["-o"], &["memory", "1M"]);
    let r = list_exports(&[&sock(&s)], "0\n");
    assert_eq!(r.stderr, "Server does not support listing exports.\n");
    assert_eq!(r.stdout_text(), "");
    assert_eq!(r.code, Some(1));
}

/// Plain newstyle has no NBD_OPT_LIST either.
#[test]
fn plain_newstyle_server_cannot_list() {
    let s = nbdkit_with(&["--mask-handshake=0"], &["memory", "1M"]);
    let r = list_exports(&[&sock(&s)], "0\n");
    assert_eq!(r.stderr, "Server does not support listing exports.\n");
    assert_eq!(r.code, Some(1));
}

#[test]
fn missing_socket() {
    let dir = scratch_dir();
    let path = dir.path().join("no-such.sock");
    let r = list_exports(&[path.to_str().unwrap()], "0\n");
    r.assert_one_line_error("");
    assert!(r.stderr.contains("no-such.sock"), "{}", r.stderr);
    assert_eq!(r.stdout_text(), "");
}

#[test]
fn no_argument_prints_usage() {
    for args in [&[][..], &["a", "b"][..]] {
        let r = list_exports(args, "");
        assert_eq!(r.code, Some(1));
        assert!(r.stderr.starts_with("usage: "), "{}", r.stderr);
        assert!(r.stderr.contains("SOCKET|URI"), "{}", r.stderr);
        assert_eq!(r.stdout_text(), "");
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
    r.assert_one_line_error("");
    assert!(r.stderr.starts_with(&format!("{target}: ")), "{}", r.stderr);
    assert_eq!(r.stdout_text(), "", "nothing listed from a broken listing");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    server.join().unwrap();
}

/// A server that dies after the listing, when the chosen export is
/// requested.
#[test]
fn server_dies_at_go() {
    let server = listing_server(&[("x", "")], |c, opt, _| {
        assert_eq!(opt?, OPT_GO);
        c.close()
    });
    let sock = server.socket().to_str().unwrap().to_owned();
    let r = list_exports(&[&sock], "0\n");
    assert_eq!(
        r.stdout_text(),
        format!("[0] x\n{PROMPT}Connecting to x ...\n")
    );
    r.assert_one_line_error("");
    server.join().unwrap();
}

// ------------------------------------------------------------------ demo

/// The README's first command: the demo starts its own qemu-nbd.
#[test]
fn demo_example_runs_end_to_end() {
    // Build first (quietly) so the run itself is quick.
    examples_dir();
    let mut cmd = cargo();
    cmd.args(["run", "-q", "-p", "nbd-std", "--example", "demo"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let r = run_command(cmd, "");
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(r.stdout_text().contains("[0] hello\n"), "{r:?}");
    assert!(r.stdout_text().contains("Connecting to hello ..."), "{r:?}");
    assert!(
        r.stdout_text().contains("hello: size = 2048 bytes\n"),
        "{r:?}"
    );
}
