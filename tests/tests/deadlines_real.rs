//! Deadlines over real sockets: a fake server that stalls at every point of
//! the conversation, nbdkit's delay filter, and the two `deadline-read`
//! examples against a silent server, the delay filter and a normal nbdkit.
//!
//! Each stall must end with the right timed-out error (what it was waiting
//! for, `io::ErrorKind::TimedOut`) once the deadline passes: the checks on
//! elapsed time are generous bounds that tell "timed out" from "hung" or
//! "gave up early", not measurements of speed.

use std::io::{self, Read};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_std::{Client, CmdFlags, CommandError, Config, Error};
use nbd_tests::examples::run_example;
use nbd_tests::fake::{FakeConn, FakeServer, Request};
use nbd_tests::proto::*;
use nbd_tests::servers::{nbdkit, nbdkit_with, scratch_dir};

const T: Duration = Duration::from_millis(500);

/// Reads and drops whatever the client sends until it closes.
fn stall(c: &mut FakeConn) -> io::Result<()> {
    let mut b = [0u8; 64 * 1024];
    loop {
        match c.stream().read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn cfg_with(handshake: Duration, command: Option<Duration>) -> Config {
    let mut cfg = Config::default();
    cfg.handshake_timeout = Some(handshake);
    cfg.command_timeout = command;
    cfg
}

/// The deadline passed, not much later, and not before.
fn in_time(started: Instant, deadline: Duration) {
    let e = started.elapsed();
    assert!(e >= deadline, "gave up early: {e:?}");
    assert!(e < deadline + Duration::from_secs(3), "hung: {e:?}");
}

fn connect_times_out(
    script: impl FnOnce(&mut FakeConn) -> io::Result<()> + Send + 'static,
) -> Error {
    let server = FakeServer::start(script);
    let t = Instant::now();
    let err = Client::connect(&server.uri(), cfg_with(T, None)).expect_err("must time out");
    in_time(t, T);
    assert_eq!(err.io_kind(), io::ErrorKind::TimedOut, "{err}");
    server.join().unwrap();
    err
}

#[test]
fn a_server_that_never_greets_times_out_naming_the_greeting() {
    let err = connect_times_out(stall);
    assert_eq!(
        err.to_string(),
        "timed out waiting for the server's greeting"
    );
}

#[test]
fn a_stall_after_the_client_flags_names_the_first_option() {
    let err = connect_times_out(|c| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        stall(c)
    });
    assert!(
        err.to_string()
            .contains("timed out waiting for the reply to NBD_OPT_EXTENDED_HEADERS"),
        "{err}"
    );
}

#[test]
fn a_stall_in_the_middle_of_an_option_reply_names_the_option() {
    let err = connect_times_out(|c| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        let (option, _) = c.recv_option()?;
        // Half an option reply header.
        let mut half = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        half.extend(option.to_be_bytes());
        c.send(&half)?;
        stall(c)
    });
    assert!(err.to_string().contains("the reply to NBD_OPT_"), "{err}");
}

#[test]
fn a_stall_before_the_go_reply_names_go() {
    let err = connect_times_out(|c| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        loop {
            let (option, _) = c.recv_option()?;
            if option == OPT_GO {
                return stall(c);
            }
            c.send_error(option, REP_ERR_UNSUP, "")?;
        }
    });
    assert!(
        err.to_string()
            .contains("timed out waiting for the reply to NBD_OPT_GO"),
        "{err}"
    );
}

/// Runs `pread` of 4 KiB against a server that answers the handshake, then
/// does `after_request` with the READ; the read must time out after `T`.
fn read_times_out(after_request: fn(&mut FakeConn, &Request) -> io::Result<()>) {
    let server = FakeServer::start(move |c| {
        c.standard_handshake(1 << 20, FLAG_HAS_FLAGS)?;
        let req = c.recv_request()?;
        after_request(c, &req)?;
        stall(c)
    });
    let mut nbd =
        Client::connect(&server.uri(), cfg_with(Duration::from_secs(10), Some(T))).unwrap();
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    let err = nbd
        .pread(&mut buf, 0, CmdFlags::empty())
        .expect_err("times out");
    in_time(t, T);
    assert!(
        matches!(
            err,
            Error::Command(CommandError::TimedOut {
                command: "NBD_CMD_READ"
            })
        ),
        "{err}"
    );
    assert_eq!(err.io_kind(), io::ErrorKind::TimedOut);
    // One slot stays reserved for the late reply.
    assert_eq!(nbd.connection().abandoned(), 1);
    drop(nbd);
    server.join().unwrap();
}

#[test]
fn an_unanswered_read_times_out() {
    read_times_out(|_, _| Ok(()));
}

#[test]
fn a_stall_in_the_middle_of_a_reply_header_times_out() {
    read_times_out(|c, _| c.send(&STRUCTURED_REPLY_MAGIC.to_be_bytes()[..]));
}

#[test]
fn a_stall_in_the_middle_of_a_read_payload_times_out() {
    read_times_out(|c, req| {
        // The chunk header and half of the data, then nothing.
        let mut chunk = Vec::new();
        chunk.extend(STRUCTURED_REPLY_MAGIC.to_be_bytes());
        chunk.extend(1u16.to_be_bytes()); // NBD_REPLY_FLAG_DONE
        chunk.extend(1u16.to_be_bytes()); // NBD_REPLY_TYPE_OFFSET_DATA
        chunk.extend(req.cookie.to_be_bytes());
        chunk.extend((8u32 + 4096).to_be_bytes());
        chunk.extend(req.offset.to_be_bytes());
        chunk.extend(vec![0xaa; 2048]);
        c.send(&chunk)
    });
}

#[test]
fn writes_to_a_server_that_stops_reading_time_out() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = FakeServer::start(move |c| {
        c.standard_handshake(64 << 20, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)?;
        // Read nothing more until the client has given up.
        let _ = rx.recv_timeout(Duration::from_secs(20));
        stall(c)
    });
    let mut nbd =
        Client::connect(&server.uri(), cfg_with(Duration::from_secs(10), Some(T))).unwrap();
    let data = Bytes::from(vec![0x5a; 1 << 20]);
    let t = Instant::now();
    let cookies: Vec<_> = (0..4u64)
        .map(|i| {
            nbd.aio_pwrite(data.clone(), i << 20, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    for c in cookies {
        let done = nbd.wait(c).unwrap();
        assert!(
            matches!(
                done.result,
                Err(CommandError::TimedOut {
                    command: "NBD_CMD_WRITE"
                })
            ),
            "{:?}",
            done.result
        );
    }
    in_time(t, T);
    // A blocking write fails the same way.
    let t = Instant::now();
    let err = nbd
        .pwrite(&data, 0, CmdFlags::empty())
        .expect_err("times out");
    in_time(t, T);
    assert_eq!(err.io_kind(), io::ErrorKind::TimedOut);
    // Giving up on the server: no hang.
    nbd.abort("the server stopped reading");
    // Commands now fail at once; getters still answer from the negotiation.
    let err = nbd
        .pwrite(&data, 0, CmdFlags::empty())
        .expect_err("aborted");
    assert!(
        matches!(
            err,
            Error::Closed(nbd_std::CloseReason::AbortedByCaller { .. })
        ),
        "{err}"
    );
    assert_eq!(nbd.get_size().unwrap(), 64 << 20);
    drop(nbd);
    tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn a_late_reply_is_dropped_and_the_connection_goes_on() {
    let server = FakeServer::start(|c| {
        c.standard_handshake(1 << 20, FLAG_HAS_FLAGS)?;
        let first = c.recv_request()?;
        std::thread::sleep(T * 3);
        c.send_data_chunk(
            &first,
            first.offset,
            &vec![0xee; first.length as usize],
            true,
        )?;
        let second = c.recv_request()?;
        c.send_data_chunk(
            &second,
            second.offset,
            &vec![0x11; second.length as usize],
            true,
        )?;
        c.expect_disc()
    });
    let mut nbd = Client::connect(&server.uri(), cfg_with(Duration::from_secs(10), None)).unwrap();
    let c = nbd
        .aio_pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
        .unwrap();
    nbd.aio_set_deadline(c, Some(Instant::now() + T)).unwrap();
    let done = nbd.wait(c).unwrap();
    assert!(matches!(done.result, Err(CommandError::TimedOut { .. })));
    let buf = done.buffer.expect("the buffer comes back");
    assert!(buf.iter().all(|&b| b == 0), "untouched");
    let mut second = vec![0u8; 512];
    nbd.pread(&mut second, 4096, CmdFlags::empty()).unwrap();
    assert!(second.iter().all(|&b| b == 0x11));
    assert!(buf.iter().all(|&b| b == 0), "the late data went elsewhere");
    assert_eq!(nbd.connection().in_flight(), 0);
    nbd.shutdown().unwrap();
    server.join().unwrap();
}

#[test]
fn cancel_hands_the_buffer_back_and_the_connection_goes_on() {
    let server = FakeServer::start(|c| {
        c.standard_handshake(1 << 20, FLAG_HAS_FLAGS)?;
        let a = c.recv_request()?;
        let b = c.recv_request()?;
        c.send_data_chunk(&a, a.offset, &vec![1; a.length as usize], true)?;
        c.send_data_chunk(&b, b.offset, &vec![2; b.length as usize], true)?;
        c.expect_disc()
    });
    let mut nbd = Client::connect(&server.uri(), Config::default()).unwrap();
    let a = nbd
        .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
        .unwrap();
    let b = nbd
        .aio_pread(BytesMut::zeroed(512), 512, CmdFlags::empty())
        .unwrap();
    nbd.aio_cancel(a).unwrap();
    let done = nbd.aio_command_completed(a).expect("completed at once");
    assert!(matches!(done.result, Err(CommandError::Cancelled { .. })));
    assert!(nbd.aio_cancel(a).is_err(), "only once");
    let done = nbd.wait(b).unwrap();
    assert!(done.result.is_ok());
    assert!(done.buffer.unwrap().iter().all(|&x| x == 2));
    nbd.shutdown().unwrap();
    server.join().unwrap();
}

#[test]
fn shutdown_does_not_wait_forever_for_an_abandoned_reply() {
    let server = FakeServer::start(|c| {
        c.standard_handshake(1 << 20, FLAG_HAS_FLAGS)?;
        c.recv_request()?;
        stall(c)
    });
    let mut cfg = cfg_with(T, Some(T));
    cfg.handshake_timeout = Some(Duration::from_secs(1));
    let mut nbd = Client::connect(&server.uri(), cfg).unwrap();
    let mut buf = [0u8; 512];
    assert!(nbd.pread(&mut buf, 0, CmdFlags::empty()).is_err());
    let t = Instant::now();
    let r = nbd.shutdown();
    in_time(t, Duration::from_secs(1));
    assert!(r.is_err(), "the server never answered");
    server.join().unwrap();
}

// ---------------------------------------------------------------------------
// nbdkit's delay filter
// ---------------------------------------------------------------------------

/// nbdkit's pattern plugin: each 8-byte word is its own offset, big-endian.
fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| ((o & !7).to_be_bytes())[(o & 7) as usize])
        .collect()
}

#[test]
fn the_delay_filter_a_read_times_out_and_the_next_succeeds() {
    let server = nbdkit_with(&["--filter=delay"], &["pattern", "1M", "rdelay=2"]);
    let mut nbd = Client::connect(
        &server.uri(),
        cfg_with(Duration::from_secs(10), Some(Duration::from_secs(1))),
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    let err = nbd
        .pread(&mut buf, 0, CmdFlags::empty())
        .expect_err("times out");
    in_time(t, Duration::from_secs(1));
    assert_eq!(err.io_kind(), io::ErrorKind::TimedOut);
    // No deadline for the next one: it waits out the delay and gets the
    // right data, not the late reply's.
    nbd.set_command_timeout(None);
    let mut next = vec![0u8; 4096];
    nbd.pread(&mut next, 65536, CmdFlags::empty()).unwrap();
    assert_eq!(next, pattern_at(65536, 4096));
    assert_eq!(
        nbd.connection().in_flight(),
        0,
        "the late reply was consumed"
    );
    nbd.shutdown().unwrap();
}

#[test]
fn nbd_mio_reports_the_same_timeouts() {
    let server = nbdkit_with(&["--filter=delay"], &["pattern", "1M", "rdelay=2"]);
    let run = run_example("deadline-read-mio", &[&server.uri(), "0.5"], "");
    run.assert_one_line_error("NBD_CMD_READ timed out");
}

// ---------------------------------------------------------------------------
// The examples
// ---------------------------------------------------------------------------

fn silent_listener() -> (tempfile::TempDir, String, UnixListener) {
    let dir = scratch_dir();
    let path = dir.path().join("silent.sock");
    let l = UnixListener::bind(&path).unwrap();
    let uri = format!("nbd+unix:///?socket={}", path.display());
    (dir, uri, l)
}

#[test]
fn the_deadline_read_examples_against_a_silent_server() {
    for example in ["deadline-read", "deadline-read-mio"] {
        // Accepts (the kernel does, through the backlog) and never speaks.
        let (_dir, uri, _listener) = silent_listener();
        let t = Instant::now();
        let run = run_example(example, &[&uri, "1"], "");
        in_time(t, Duration::from_secs(1));
        run.assert_one_line_error("timed out waiting for the server's greeting");
    }
}

#[test]
fn the_deadline_read_examples_against_the_delay_filter() {
    let server = nbdkit_with(&["--filter=delay"], &["memory", "1M", "rdelay=3"]);
    for example in ["deadline-read", "deadline-read-mio"] {
        let t = Instant::now();
        let run = run_example(example, &[&server.uri(), "1"], "");
        in_time(t, Duration::from_secs(1));
        run.assert_one_line_error("NBD_CMD_READ timed out");
    }
}

#[test]
fn the_deadline_read_examples_against_a_normal_nbdkit() {
    let server = nbdkit(&["memory", "1M"]);
    for example in ["deadline-read", "deadline-read-mio"] {
        let run = run_example(example, &[&server.uri(), "2"], "");
        run.assert_ok();
        assert_eq!(run.stdout_text(), "ok\n");
    }
    // Usage errors are one line too.
    run_example("deadline-read", &[&server.uri(), "soon"], "").assert_one_line_error("usage");
}

#[test]
fn dropping_a_client_with_commands_in_flight_neither_hangs_nor_panics() {
    let server = FakeServer::start(|c| {
        c.standard_handshake(1 << 20, FLAG_HAS_FLAGS)?;
        for _ in 0..4 {
            c.recv_request()?;
        }
        // Never answers; the client's drop must close the connection.
        stall(c)
    });
    let mut nbd = Client::connect(&server.uri(), Config::default()).unwrap();
    for i in 0..4u64 {
        nbd.aio_pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty())
            .unwrap();
    }
    nbd.poll().unwrap(); // the requests go out
    let t = Instant::now();
    drop(nbd);
    assert!(t.elapsed() < Duration::from_secs(1), "drop waited");
    server.join().unwrap();
}
