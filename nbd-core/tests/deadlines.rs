//! Deadlines and cancellation with time as an input: the handshake deadline
//! (naming what it waited for, suspended while the caller has the turn in
//! option mode), command deadlines (default and per command, both
//! policies), `cancel`, `abort`, and late replies to abandoned requests,
//! which are read and dropped while the slot stays reserved. Ends with a
//! property test over random interleavings.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::script::{self, ack, fixed_newstyle, info_export, opt_reply_header};
use common::{Mode, Pair, Setup, ALL_FLAGS, KIB};
use nbd_core::consts::{chunk as ct, opt, reply_flags::DONE};
use nbd_core::{
    CloseReason, CmdFlags, CommandError, Config, Event, Limits, Phase, TimeoutPolicy, UsageError,
};
use proptest::prelude::*;

const SEC: Duration = Duration::from_secs(1);

fn handshake_timeout(secs: u64) -> Pair {
    Pair::with(|c| c.handshake_timeout = Some(Duration::from_secs(secs)))
}

fn timed_out_waiting_for(p: &mut Pair) -> String {
    p.drain_events();
    assert_eq!(p.conn.phase(), Phase::Dead);
    match p.closed() {
        Some(CloseReason::HandshakeTimedOut { waiting_for }) => waiting_for.clone(),
        other => panic!("expected HandshakeTimedOut, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The handshake
// ---------------------------------------------------------------------------

#[test]
fn a_silent_server_times_out_waiting_for_the_greeting() {
    let mut p = handshake_timeout(5);
    let t0 = p.conn.now();
    assert_eq!(p.conn.poll_timeout(), Some(t0 + 5 * SEC));
    p.conn.handle_timeout(t0 + 4 * SEC);
    p.no_events();
    p.conn.handle_timeout(t0 + 5 * SEC);
    assert_eq!(timed_out_waiting_for(&mut p), "the server's greeting");
    let reason = p.conn.close_reason().unwrap().clone();
    assert_eq!(
        reason.to_string(),
        "timed out waiting for the server's greeting"
    );
    assert_eq!(
        std::io::Error::from(reason).kind(),
        std::io::ErrorKind::TimedOut
    );
    assert_eq!(p.conn.poll_timeout(), None, "nothing left to wake up for");
}

#[test]
fn the_default_handshake_timeout_is_finite_and_commands_have_none() {
    let cfg = Config::default();
    assert_eq!(cfg.handshake_timeout, Some(Duration::from_secs(30)));
    assert_eq!(cfg.command_timeout, None);
    assert_eq!(cfg.on_command_timeout, TimeoutPolicy::FailCommand);
    let mut p = Pair::new(cfg);
    let t0 = p.conn.now();
    assert_eq!(p.conn.poll_timeout(), Some(t0 + 30 * SEC));
    p.conn.handle_timeout(t0 + 31 * SEC);
    timed_out_waiting_for(&mut p);
}

#[test]
fn no_handshake_timeout_means_none_is_ever_due() {
    let mut p = Pair::with(|c| c.handshake_timeout = None);
    assert_eq!(p.conn.poll_timeout(), None);
    p.conn.handle_timeout(p.conn.now() + 1_000_000 * SEC);
    p.no_events();
    assert_eq!(p.conn.phase(), Phase::Connecting);
}

#[test]
fn a_stall_inside_an_option_reply_names_the_option() {
    let mut p = handshake_timeout(5);
    let t0 = p.conn.now();
    let mut s = fixed_newstyle();
    s.extend(ack(opt::EXTENDED_HEADERS));
    let go = info_export(opt::GO, 1 << 20, ALL_FLAGS);
    s.extend(&go[..go.len() - 3]); // the GO reply stops mid-payload
    p.feed(&s);
    p.conn.handle_timeout(t0 + 6 * SEC);
    assert_eq!(timed_out_waiting_for(&mut p), "the reply to NBD_OPT_GO");
}

#[test]
fn a_stall_after_the_handshake_flags_names_the_option_sent() {
    let mut p = handshake_timeout(2);
    let t0 = p.conn.now();
    p.feed(&fixed_newstyle());
    p.conn.handle_timeout(t0 + 2 * SEC);
    assert_eq!(
        timed_out_waiting_for(&mut p),
        "the reply to NBD_OPT_EXTENDED_HEADERS"
    );
}

#[test]
fn a_stall_inside_the_greeting_names_the_greeting() {
    let mut p = handshake_timeout(2);
    let t0 = p.conn.now();
    p.feed(&fixed_newstyle()[..10]);
    p.conn.handle_timeout(t0 + 3 * SEC);
    assert_eq!(timed_out_waiting_for(&mut p), "the server's greeting");
}

#[test]
fn option_mode_suspends_the_clock_while_the_caller_decides() {
    let mut p = Pair::with(|c| {
        c.opt_mode = true;
        c.handshake_timeout = Some(Duration::from_secs(10));
    });
    let t0 = p.conn.now();
    let mut s = fixed_newstyle();
    s.extend(ack(opt::EXTENDED_HEADERS));
    p.feed(&s);
    p.sent();
    assert_eq!(p.conn.phase(), Phase::Negotiating);
    assert_eq!(p.conn.poll_timeout(), None, "the caller has the turn");
    // The caller thinks for a minute: no timeout.
    p.conn.handle_timeout(t0 + 60 * SEC);
    p.no_events();
    // The next option gets a full timeout again, from the next time input.
    p.conn.opt_list().unwrap();
    let due = p.conn.poll_timeout().unwrap();
    assert!(due <= p.conn.now(), "a started deadline asks for the time");
    p.conn.handle_timeout(t0 + 61 * SEC);
    assert_eq!(p.conn.poll_timeout(), Some(t0 + 71 * SEC));
    p.conn.handle_timeout(t0 + 70 * SEC);
    p.no_events();
    p.conn.handle_timeout(t0 + 71 * SEC);
    assert_eq!(timed_out_waiting_for(&mut p), "the reply to NBD_OPT_LIST");
}

#[test]
fn the_handshake_deadline_is_off_once_ready_and_can_be_replaced() {
    let mut h = Setup::new(Mode::Structured).connect();
    assert_eq!(h.conn.poll_timeout(), None);
    h.conn.handle_timeout(h.conn.now() + 3600 * SEC);
    h.no_events();
    assert_eq!(h.conn.phase(), Phase::Ready);

    let mut p = Pair::new(Config::default());
    let at = p.conn.now() + 2 * SEC;
    p.conn.set_handshake_deadline(Some(at));
    assert_eq!(p.conn.poll_timeout(), Some(at));
    p.conn.set_handshake_deadline(None);
    assert_eq!(p.conn.poll_timeout(), None);
    p.eof();
}

#[test]
fn time_does_not_go_backwards() {
    let mut p = handshake_timeout(5);
    let t0 = p.conn.now();
    p.conn.handle_timeout(t0 + 3 * SEC);
    p.conn.handle_timeout(t0); // an older instant
    assert_eq!(p.conn.now(), t0 + 3 * SEC);
    p.eof();
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

fn with_command_timeout(mode: Mode, secs: u64) -> Pair {
    let setup = Setup::new(mode);
    match secs {
        1 => setup.tweak(|c| c.command_timeout = Some(Duration::from_secs(1))),
        2 => setup.tweak(|c| c.command_timeout = Some(Duration::from_secs(2))),
        _ => setup,
    }
    .connect()
}

/// Arms the deadlines that wait for a time input, at `now`.
fn tick(h: &mut Pair, now: Instant) {
    h.conn.handle_timeout(now);
    h.drain_events();
}

#[test]
fn no_deadline_means_no_timer() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 512);
    assert_eq!(h.conn.poll_timeout(), None);
    h.conn.handle_timeout(h.conn.now() + 3600 * SEC);
    h.not_done(c);
    let s = h.data(DONE, c, 0, &[7; 512]);
    h.feed(&s);
    assert_eq!(&h.done_ok(c).unwrap()[..], &[7; 512][..]);
}

#[test]
fn a_read_past_its_default_deadline_completes_once_and_its_late_reply_is_dropped() {
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut h = with_command_timeout(mode, 2);
        let c = h.read(0, 4 * KIB);
        h.sent();
        // Submitted: the deadline starts at the next time input.
        assert!(h.conn.poll_timeout().unwrap() <= h.conn.now());
        let t1 = h.conn.now() + SEC;
        tick(&mut h, t1);
        assert_eq!(h.conn.poll_timeout(), Some(t1 + 2 * SEC));
        tick(&mut h, t1 + SEC);
        h.not_done(c);
        tick(&mut h, t1 + 2 * SEC);
        let (r, buf) = h.done(c);
        assert_eq!(
            r,
            Err(CommandError::TimedOut {
                command: "NBD_CMD_READ"
            })
        );
        let buf = buf.expect("the buffer comes back");
        assert!(buf.iter().all(|&b| b == 0xff), "untouched");
        // The slot stays reserved until the server answers.
        assert_eq!((h.conn.in_flight(), h.conn.abandoned()), (1, 1));
        assert_eq!(h.conn.poll_timeout(), None);
        // The late reply is read and dropped: no event.
        let late = match mode {
            Mode::Simple => script::cat(&[&h.simple(0, c), &[9; 4096]]),
            _ => h.data(DONE, c, 0, &[9; 4096]),
        };
        h.feed(&late);
        h.no_events();
        assert_eq!((h.conn.in_flight(), h.conn.abandoned()), (0, 0));
        // The next command works and gets its own data.
        let d = h.read(4096, 512);
        h.requests();
        let reply = match mode {
            Mode::Simple => script::cat(&[&h.simple(0, d), &[5; 512]]),
            _ => h.data(DONE, d, 4096, &[5; 512]),
        };
        h.feed(&reply);
        assert_eq!(&h.done_ok(d).unwrap()[..], &[5; 512][..]);
    }
}

#[test]
fn a_timeout_in_the_middle_of_a_read_payload_hands_the_buffer_back() {
    let mut h = with_command_timeout(Mode::Structured, 1);
    let c = h.read(0, 64 * KIB);
    h.sent();
    let t1 = h.conn.now();
    tick(&mut h, t1);
    let reply = h.data(DONE, c, 0, &vec![3; 64 * 1024]);
    let half = reply.len() / 2;
    // Through the zero-copy path: the payload lands in the read's buffer.
    common::script::give(&mut h.conn, &reply[..half], common::script::Input::Recv);
    h.drain_events();
    h.not_done(c);
    tick(&mut h, t1 + SEC);
    let buf = h.done(c).1.unwrap();
    let snapshot = buf.clone();
    // The rest of the payload goes nowhere near the returned buffer.
    common::script::give(&mut h.conn, &reply[half..], common::script::Input::Recv);
    h.no_events();
    assert_eq!(buf, snapshot);
    assert_eq!(h.conn.in_flight(), 0);
    let d = h.read(0, 16);
    let s = h.data(DONE, d, 0, &[1; 16]);
    h.feed(&s);
    assert_eq!(&h.done_ok(d).unwrap()[..], &[1; 16][..]);
}

#[test]
fn late_chunks_and_block_status_of_abandoned_requests_make_no_events() {
    let mut h = Setup::new(Mode::Structured).base_allocation(1).connect();
    let r = h
        .conn
        .read_with_chunks(0, BytesMut::zeroed(1024), CmdFlags::empty());
    let r = h.ok(r);
    let b = h.block_status(0, 4096, CmdFlags::empty());
    h.sent();
    h.conn.cancel(r).unwrap();
    h.conn.cancel(b).unwrap();
    assert_eq!(
        h.done_err(r),
        CommandError::Cancelled {
            command: "NBD_CMD_READ"
        }
    );
    assert_eq!(
        h.done_err(b),
        CommandError::Cancelled {
            command: "NBD_CMD_BLOCK_STATUS"
        }
    );
    // Late replies: the harness fails on any event naming a completed cookie.
    let mut s = h.data(0, r, 0, &[1; 512]);
    s.extend(h.hole(DONE, r, 512, 512));
    s.extend(h.chunk(DONE, ct::BLOCK_STATUS, b, &script::status(1, &[(4096, 0)])));
    h.feed(&s);
    h.no_events();
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn a_late_reply_that_breaks_the_protocol_still_ends_the_connection() {
    let mut h = Setup::new(Mode::Structured).connect();
    let c = h.read(0, 1024);
    h.sent();
    h.conn.cancel(c).unwrap();
    h.done_err(c);
    // A chunk past the end of the request: a protocol error, cancelled or not.
    let s = h.data(DONE, c, 4096, &[0; 16]);
    h.feed(&s);
    assert!(matches!(
        h.protocol_error(),
        nbd_core::ProtocolError::ChunkOutOfRange { .. }
    ));
}

#[test]
fn cancel_completes_at_once_and_only_once() {
    let mut h = Setup::new(Mode::Simple).connect();
    let w = h.write(0, &[1; 4096]);
    h.sent();
    h.conn.cancel(w).unwrap();
    assert_eq!(
        h.done_err(w),
        CommandError::Cancelled {
            command: "NBD_CMD_WRITE"
        }
    );
    assert_eq!(h.conn.cancel(w), Err(UsageError::NotInFlight(w)));
    assert_eq!(
        h.conn.set_deadline(w, Some(h.conn.now())),
        Err(UsageError::NotInFlight(w))
    );
    let e = CommandError::Cancelled {
        command: "NBD_CMD_WRITE",
    };
    assert_eq!(e.errno(), 125);
    assert_eq!(
        CommandError::TimedOut { command: "x" }.io_kind(),
        std::io::ErrorKind::TimedOut
    );
    let s = h.simple(0, w);
    h.feed(&s);
    h.no_events();
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn abandoned_requests_keep_counting_against_the_in_flight_limit() {
    let mut limits = Limits::default();
    limits.max_in_flight = 1;
    let mut h = Setup::new(Mode::Simple).limits(limits).connect();
    let c = h.read(0, 512);
    h.conn.cancel(c).unwrap();
    h.done_err(c);
    let refused = h
        .conn
        .read(0, BytesMut::zeroed(512), CmdFlags::empty())
        .unwrap_err();
    assert!(matches!(refused.error, UsageError::InFlightLimit { .. }));
    assert!(!h.conn.has_room(0));
    let s = script::cat(&[&h.simple(0, c), &[0; 512]]);
    h.feed(&s);
    assert!(h.conn.has_room(512));
    let d = h.read(0, 512);
    let s = script::cat(&[&h.simple(0, d), &[4; 512]]);
    h.feed(&s);
    assert_eq!(&h.done_ok(d).unwrap()[..], &[4; 512][..]);
}

#[test]
fn a_per_command_deadline_overrides_the_default() {
    let mut h = with_command_timeout(Mode::Structured, 2);
    let t0 = h.conn.now();
    let soon = h.read(0, 512);
    let never = h.read(512, 512);
    let default = h.read(1024, 512);
    h.conn.set_deadline(soon, Some(t0 + SEC / 2)).unwrap();
    h.conn.set_deadline(never, None).unwrap();
    tick(&mut h, t0);
    assert_eq!(h.conn.poll_timeout(), Some(t0 + SEC / 2));
    tick(&mut h, t0 + SEC);
    assert!(matches!(h.done_err(soon), CommandError::TimedOut { .. }));
    h.not_done(never);
    h.not_done(default);
    assert_eq!(h.conn.poll_timeout(), Some(t0 + 2 * SEC));
    tick(&mut h, t0 + 3600 * SEC);
    assert!(matches!(h.done_err(default), CommandError::TimedOut { .. }));
    h.not_done(never);
    assert_eq!(h.conn.poll_timeout(), None);
    let s = h.data(DONE, never, 512, &[2; 512]);
    h.feed(&s);
    assert_eq!(&h.done_ok(never).unwrap()[..], &[2; 512][..]);
}

#[test]
fn the_close_policy_ends_the_connection_on_a_timeout() {
    let mut h = Setup::new(Mode::Structured)
        .tweak(|c| {
            c.command_timeout = Some(Duration::from_secs(1));
            c.on_command_timeout = TimeoutPolicy::CloseConnection;
        })
        .connect();
    let t0 = h.conn.now();
    let a = h.read(0, 512);
    tick(&mut h, t0);
    let b = h.read(512, 512);
    h.conn.set_deadline(b, None).unwrap();
    tick(&mut h, t0 + SEC);
    assert_eq!(
        h.done_err(a),
        CommandError::TimedOut {
            command: "NBD_CMD_READ"
        }
    );
    assert!(matches!(h.done_err(b), CommandError::ConnectionClosed(_)));
    assert_eq!(
        h.closed(),
        Some(&CloseReason::CommandTimedOut {
            command: "NBD_CMD_READ",
            cookie: a,
            lost: 1
        })
    );
    assert_eq!(h.conn.phase(), Phase::Dead);
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn abort_fails_everything_in_flight_and_closes() {
    let mut h = Setup::new(Mode::Extended).connect();
    let a = h.read(0, 512);
    let b = h.write(0, &[1; 512]);
    let c = h.read(0, 512);
    h.conn.cancel(c).unwrap();
    h.done_err(c);
    h.conn.abort("the caller gave up");
    for cookie in [a, b] {
        assert!(matches!(
            h.done_err(cookie),
            CommandError::ConnectionClosed(_)
        ));
    }
    let reason = h.closed().unwrap().clone();
    assert_eq!(
        reason,
        CloseReason::AbortedByCaller {
            reason: "the caller gave up".into(),
            lost: 2
        }
    );
    assert!(reason.is_loss() && !reason.is_clean());
    assert!(h.conn.is_finished());
    assert_eq!(h.conn.in_flight(), 0);
    h.take_events();
    h.conn.abort("again"); // no effect
    h.no_events();
}

#[test]
fn a_server_that_closes_counts_only_requests_the_caller_still_awaits_as_lost() {
    let mut h = Setup::new(Mode::Simple).connect();
    let a = h.read(0, 512);
    let b = h.read(0, 512);
    h.conn.cancel(a).unwrap();
    h.done_err(a);
    h.eof();
    h.done_err(b);
    assert!(matches!(
        h.closed(),
        Some(CloseReason::ServerClosed { lost: 1, .. })
    ));
}

#[test]
fn an_option_reply_header_then_silence_times_out() {
    let mut p = handshake_timeout(1);
    let t0 = p.conn.now();
    let mut s = fixed_newstyle();
    s.extend(opt_reply_header(opt::EXTENDED_HEADERS, 1, 0)[..12].to_vec());
    p.feed(&s);
    p.conn.handle_timeout(t0 + SEC);
    assert_eq!(
        timed_out_waiting_for(&mut p),
        "the reply to NBD_OPT_EXTENDED_HEADERS"
    );
}

// ---------------------------------------------------------------------------
// Random interleavings
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    /// Submit a read of `len` bytes (with a deadline `secs` from now).
    Read { len: u16, secs: Option<u8> },
    /// The server answers the `n`-th outstanding request (mod count).
    Reply(u8),
    /// Time passes.
    Wait(u8),
    /// Cancel the `n`-th request the caller still awaits.
    Cancel(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u16..2048, proptest::option::of(0u8..4)).prop_map(|(len, secs)| Step::Read { len, secs }),
        any::<u8>().prop_map(Step::Reply),
        (0u8..3).prop_map(Step::Wait),
        any::<u8>().prop_map(Step::Cancel),
    ]
}

/// The data the server sends for a byte at `offset` of read number `n`.
fn content(n: u64, offset: u64) -> u8 {
    (n.wrapping_mul(31) ^ offset) as u8
}

fn interleave(mode: Mode, default_timeout: bool, steps: Vec<Step>) {
    let setup = Setup::new(mode);
    let setup = if default_timeout {
        setup.tweak(|c| c.command_timeout = Some(Duration::from_secs(2)))
    } else {
        setup
    };
    let mut limits = Limits::default();
    limits.max_in_flight = 8;
    let mut h = setup.limits(limits).connect();
    let mut now = h.conn.now();
    // Requests the server has not answered: (cookie, read number, len).
    let mut outstanding: Vec<(nbd_core::Cookie, u64, u64)> = Vec::new();
    // Cookies the caller awaits.
    let mut awaited: Vec<nbd_core::Cookie> = Vec::new();
    let mut numbers = 0u64;
    let check_events =
        |h: &mut Pair,
         awaited: &mut Vec<nbd_core::Cookie>,
         numbers: &std::collections::HashMap<u64, (u64, u64)>| {
            for ev in h.take_events() {
                if let Event::CommandDone {
                    cookie,
                    result,
                    buffer,
                } = ev
                {
                    let i = awaited.iter().position(|c| *c == cookie).expect("awaited");
                    awaited.remove(i);
                    if result.is_ok() {
                        let (n, len) = numbers[&cookie.0];
                        let buf = buffer.unwrap();
                        assert_eq!(buf.len() as u64, len);
                        assert!(buf
                            .iter()
                            .enumerate()
                            .all(|(i, &b)| b == content(n, i as u64)));
                    } else {
                        assert!(matches!(
                            result,
                            Err(CommandError::TimedOut { .. } | CommandError::Cancelled { .. })
                        ));
                    }
                }
            }
        };
    let mut by_cookie = std::collections::HashMap::new();
    for s in steps {
        match s {
            Step::Read { len, secs } => {
                if !h.conn.has_room(u64::from(len)) {
                    continue;
                }
                let c = h.read(0, u64::from(len));
                if let Some(secs) = secs {
                    h.conn
                        .set_deadline(c, Some(now + Duration::from_secs(u64::from(secs))))
                        .unwrap();
                }
                by_cookie.insert(c.0, (numbers, u64::from(len)));
                outstanding.push((c, numbers, u64::from(len)));
                awaited.push(c);
                numbers += 1;
            }
            Step::Reply(i) if !outstanding.is_empty() => {
                let (c, n, len) = outstanding.remove(i as usize % outstanding.len());
                let data: Vec<u8> = (0..len).map(|o| content(n, o)).collect();
                let bytes = match mode {
                    Mode::Simple => script::cat(&[&h.simple(0, c), &data]),
                    _ => h.data(DONE, c, 0, &data),
                };
                h.feed(&bytes);
            }
            Step::Reply(_) => {}
            Step::Wait(secs) => {
                now += Duration::from_secs(u64::from(secs));
                h.conn.handle_timeout(now);
            }
            Step::Cancel(i) if !awaited.is_empty() => {
                let c = awaited[i as usize % awaited.len()];
                h.conn.cancel(c).unwrap();
            }
            Step::Cancel(_) => {}
        }
        check_events(&mut h, &mut awaited, &by_cookie);
        // Every slot in use is a request the server has not answered.
        assert_eq!(h.conn.in_flight(), outstanding.len());
        assert_eq!(h.conn.abandoned(), outstanding.len() - awaited.len());
        // Nothing is due before the time the core says.
        if let Some(t) = h.conn.poll_timeout() {
            if t > now {
                let before = awaited.len();
                h.conn.handle_timeout(now);
                check_events(&mut h, &mut awaited, &by_cookie);
                assert_eq!(awaited.len(), before, "a deadline fired before it was due");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn interleavings_keep_exactly_once_the_accounting_and_the_data(
        mode in prop_oneof![Just(Mode::Simple), Just(Mode::Structured), Just(Mode::Extended)],
        default_timeout in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        interleave(mode, default_timeout, steps);
    }
}
