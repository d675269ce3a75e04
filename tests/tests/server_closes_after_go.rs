//! A server that closes straight after GO: nothing was in flight, so
//! nothing was lost, and a finished job must not turn into a failure.
//!
//! The scenario: a server acknowledges `NBD_OPT_GO` (`NBD_REP_INFO` with
//! `NBD_INFO_EXPORT`, then `NBD_REP_ACK`) and closes the connection at once.
//! The negotiation succeeded and nothing is in flight afterwards, so the
//! client has lost nothing: libnbd's list-exports example prints the size
//! and exits 0, and ending the session reports no error. The close races
//! with the client reading the ACK, hence the repeated runs.

use std::thread::sleep;
use std::time::Duration;

use nbd_std::{Client, Config};
use nbd_tests::examples::run_example;
use nbd_tests::fake::FakeConn;
use nbd_tests::proto::*;
use nbd_tests::FakeServer;

const SIZE: u64 = 1 << 20;
const PROMPT: &str = "Which export to connect to (-1 to quit)? ";

/// A fake server that lists one export, `x`, answers `NBD_OPT_GO` with
/// the export's size and an ACK, and then hangs up without waiting for
/// anything. Other options are refused with `NBD_REP_ERR_UNSUP`, except
/// `NBD_OPT_STRUCTURED_REPLY` (acknowledged).
fn go_then_close_server() -> FakeServer {
    FakeServer::start(|c: &mut FakeConn| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        loop {
            let (opt, _) = c.recv_option()?;
            match opt {
                OPT_STRUCTURED_REPLY => c.send_ack(opt)?,
                OPT_LIST => {
                    c.send_server("x", "")?;
                    c.send_ack(opt)?;
                }
                OPT_GO => {
                    c.send_info_export(opt, SIZE, FLAG_HAS_FLAGS)?;
                    c.send_ack(opt)?;
                    return c.close();
                }
                other => c.send_error(other, REP_ERR_UNSUP, "")?,
            }
        }
    })
}

/// doc/proto.md, "NBD_OPT_GO": after the final `NBD_REP_ACK` the
/// transmission phase has begun, so the example has its size whether or
/// not the server is still there: it prints it and exits 0, every time.
#[test]
fn list_exports_example_prints_size_when_server_closes_right_after_go() {
    for run in 0..20 {
        let server = go_then_close_server();
        let sock = server.socket().to_str().unwrap().to_owned();
        let r = run_example("list-exports", &[&sock], "0\n");
        assert_eq!(
            r.stdout_text(),
            format!("[0] x\n{PROMPT}Connecting to x ...\n{sock}: x: size = {SIZE} bytes\n"),
            "run {run}: {r:?}"
        );
        assert_eq!(r.stderr, "", "run {run}: {r:?}");
        assert_eq!(r.code, Some(0), "run {run}: {r:?}");
        server.join().unwrap();
    }
}

/// doc/proto.md, "Terminating the transmission phase": with nothing in
/// flight, the server's close loses nothing, so `shutdown` after it
/// reports success.
#[test]
fn shutdown_is_ok_when_server_closed_after_go_with_nothing_in_flight() {
    let server = go_then_close_server();
    let mut client =
        Client::connect(server.socket().to_str().unwrap(), Config::default()).expect("connect");
    assert_eq!(client.get_size().expect("size"), SIZE);
    sleep(Duration::from_millis(50));
    client.shutdown().expect("shutdown after the server closed");
    server.join().unwrap();
}
