//! Split invariance: a server byte stream cut into ANY pieces (down to one
//! byte at a time), through either input path (`handle_input`, or
//! `recv_buf` + `recv_commit`), gives exactly the same events and makes the
//! client send exactly the same bytes as the stream handed over in one piece.
//!
//! Each scenario is a full server conversation built with the harness's
//! scripted server (`common::script`), in two stages:
//! 1. the handshake and the replies to the automatic option sequence (fed in
//!    pieces; the client sends each option from inside `handle_input`);
//! 2. once ready, the test issues a fixed set of commands, and the server's
//!    replies to them (interleaved, out of order, chunked) are fed in pieces.
//!
//! Then the client disconnects and the server closes. Every run goes
//! through the harness's `Pair`, so every cookie must also complete exactly
//! once, with exactly one `Closed` at the end.

mod common;

use bytes::{Bytes, BytesMut};
use common::script::{
    error_offset_payload, error_payload, hole, offset_data, pattern, status, status_ext, Input,
    Server,
};
use common::Pair;
use nbd_core::consts::{
    chunk, errno, handshake_flags as hf, opt, rep, reply_flags, transmission_flags as tf,
};
use nbd_core::wire::reply::HeaderMode;
use nbd_core::{CmdFlags, Config, Connection, Cookie, Phase, UsageError};
use proptest::prelude::*;
use proptest::sample::Index;

// ----- scenario data -----

const DONE: u16 = reply_flags::DONE;
const EXPORT_FLAGS: u16 = tf::HAS_FLAGS
    | tf::SEND_FLUSH
    | tf::SEND_FUA
    | tf::SEND_TRIM
    | tf::SEND_WRITE_ZEROES
    | tf::SEND_DF
    | tf::CAN_MULTI_CONN
    | tf::SEND_CACHE;
const SIZE: u64 = 1 << 20;

// ----- scenarios -----

/// One conversation: configuration, stage-1 bytes, the commands issued once
/// ready, and the stage-2 bytes built from the cookies those commands got.
struct Scenario {
    name: &'static str,
    config: Config,
    stage1: Vec<u8>,
    commands: fn(&mut Connection) -> Vec<Cookie>,
    replies: fn(&[Cookie], bool) -> Vec<u8>,
}

fn accepted(reqs: Vec<Result<Cookie, nbd_core::UsageError>>) -> Vec<Cookie> {
    reqs.into_iter()
        .map(|r| r.expect("command accepted"))
        .collect()
}

/// Structured replies, a meta context, block sizes; nothing unusual in the
/// negotiation, but every kind of chunk in the replies.
fn structured() -> Scenario {
    let mut s = Server::newstyle(hf::FIXED_NEWSTYLE | hf::NO_ZEROES);
    s.opt_reply(
        opt::EXTENDED_HEADERS,
        rep::ERR_UNSUP,
        b"no extended headers here",
    )
    .ack(opt::STRUCTURED_REPLY)
    .meta_context(opt::SET_META_CONTEXT, 7, "base:allocation")
    .ack(opt::SET_META_CONTEXT)
    .info_block_size(opt::GO, 512, 4096, 1 << 20)
    .opt_reply(opt::GO, rep::INFO, &[0, 99, 1, 2, 3]) // unknown info: ignored
    .info_export(opt::GO, SIZE, EXPORT_FLAGS)
    .ack(opt::GO);
    Scenario {
        name: "structured",
        config: Config::with_base_allocation(),
        stage1: s.out,
        commands: |c| {
            let r = vec![
                c.read(0, BytesMut::zeroed(4096), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.read_with_chunks(4096, BytesMut::zeroed(4096), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.write(8192, Bytes::from(pattern(3, 512)), CmdFlags::FUA)
                    .map_err(UsageError::from),
                c.flush(CmdFlags::empty()),
                c.block_status(0, 65536, CmdFlags::empty()),
                c.read_with_chunks(12288, BytesMut::zeroed(1024), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.trim(16384, 4096, CmdFlags::empty()),
                c.write_zeroes(20480, 4096, CmdFlags::NO_HOLE),
            ];
            accepted(r)
        },
        replies: |k, bogus| {
            let m = HeaderMode::Structured;
            let mut s = Server::default();
            // read 0: data for the second half first, then a hole, then NONE.
            s.chunk(
                m,
                0,
                chunk::OFFSET_DATA,
                k[0],
                0,
                &offset_data(2048, &pattern(1, 2048)),
            )
            .chunk(m, 0, chunk::OFFSET_HOLE, k[0], 0, &hole(0, 2048))
            // the write, answered simply, in between
            .simple(0, k[2], &[])
            .chunk(m, DONE, chunk::NONE, k[0], 0, &[])
            // block status, one context
            .chunk(
                m,
                DONE,
                chunk::BLOCK_STATUS,
                k[4],
                0,
                &status(7, &[(4096, 0), (61440, 3)]),
            );
            if bogus {
                // A reply for a cookie never issued: fatal, the rest fail.
                s.simple(0, Cookie(0xdead_beef), &[]);
            }
            // read 1 (with chunk events): data in two pieces, DONE on the last
            s.chunk(
                m,
                0,
                chunk::OFFSET_DATA,
                k[1],
                0,
                &offset_data(4096, &pattern(2, 1000)),
            )
            .chunk(
                m,
                DONE,
                chunk::OFFSET_DATA,
                k[1],
                0,
                &offset_data(5096, &pattern(4, 3096)),
            )
            .chunk(m, DONE, chunk::NONE, k[3], 0, &[])
            // read 5: an error with an offset, then a plain error, then done
            .chunk(
                m,
                0,
                chunk::ERROR_OFFSET,
                k[5],
                0,
                &error_offset_payload(errno::EIO, "bad sector", 12300),
            )
            .chunk(
                m,
                DONE,
                chunk::ERROR,
                k[5],
                0,
                &error_payload(errno::EINVAL, ""),
            )
            .simple(errno::EPERM, k[6], &[])
            .chunk(m, DONE, chunk::NONE, k[7], 0, &[]);
            s.out
        },
    }
}

/// Extended headers: 32-byte chunks echoing the offset, 64-bit status.
fn extended() -> Scenario {
    let mut s = Server::newstyle(hf::FIXED_NEWSTYLE | hf::NO_ZEROES);
    s.ack(opt::EXTENDED_HEADERS)
        .meta_context(opt::SET_META_CONTEXT, 1, "base:allocation")
        .ack(opt::SET_META_CONTEXT)
        .info_export(opt::GO, SIZE, EXPORT_FLAGS | tf::BLOCK_STATUS_PAYLOAD)
        .info_block_size(opt::GO, 1, 4096, 32 << 20)
        .ack(opt::GO);
    Scenario {
        name: "extended",
        config: Config::with_base_allocation(),
        stage1: s.out,
        commands: |c| {
            let r = vec![
                c.read(0, BytesMut::zeroed(3000), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.write(4096, Bytes::from(pattern(9, 700)), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.block_status(4096, 8192, CmdFlags::REQ_ONE),
                c.read_with_chunks(65536, BytesMut::zeroed(8192), CmdFlags::DF)
                    .map_err(UsageError::from),
                c.cache(0, 4096, CmdFlags::empty()),
            ];
            accepted(r)
        },
        replies: |k, bogus| {
            let m = HeaderMode::Extended;
            let mut s = Server::default();
            s.chunk(m, 0, chunk::OFFSET_HOLE, k[0], 0, &hole(1000, 2000))
                .chunk(m, DONE, chunk::NONE, k[1], 4096, &[])
                .chunk(
                    m,
                    DONE,
                    chunk::OFFSET_DATA,
                    k[0],
                    0,
                    &offset_data(0, &pattern(5, 1000)),
                )
                .chunk(
                    m,
                    DONE,
                    chunk::BLOCK_STATUS_EXT,
                    k[2],
                    4096,
                    &status_ext(1, &[(8192, 1)]),
                );
            if bogus {
                s.raw(&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]); // a simple magic: not allowed
                s.raw(&[0; 8]);
            }
            s.chunk(
                m,
                DONE,
                chunk::OFFSET_DATA,
                k[3],
                65536,
                &offset_data(65536, &pattern(6, 8192)),
            )
            .chunk(
                m,
                DONE,
                chunk::ERROR,
                k[4],
                0,
                &error_payload(errno::ENOTSUP, "no cache"),
            );
            s.out
        },
    }
}

/// Nothing but simple replies: the server refuses EXTENDED_HEADERS,
/// STRUCTURED_REPLY and GO, so the client falls back to EXPORT_NAME (with
/// the 124 zero bytes, as the server did not offer NO_ZEROES).
fn simple() -> Scenario {
    let mut s = Server::newstyle(hf::FIXED_NEWSTYLE);
    s.opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[])
        .opt_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, b"old server")
        .opt_reply(opt::GO, rep::ERR_UNSUP, &[])
        .raw(&SIZE.to_be_bytes())
        .raw(&(tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_TRIM).to_be_bytes())
        .raw(&[0; 124]);
    Scenario {
        name: "simple",
        config: Config::default(),
        stage1: s.out,
        commands: |c| {
            let r = vec![
                c.read(0, BytesMut::zeroed(4096), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.read_with_chunks(8192, BytesMut::zeroed(512), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.write(4096, Bytes::from(pattern(7, 512)), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.flush(CmdFlags::empty()),
                c.trim(0, 4096, CmdFlags::empty()),
            ];
            accepted(r)
        },
        replies: |k, bogus| {
            let mut s = Server::default();
            s.simple(0, k[2], &[])
                .simple(0, k[1], &pattern(8, 512))
                .simple(errno::ENOSPC, k[3], &[]);
            if bogus {
                s.raw(b"garbage!garbage!");
            }
            s.simple(0, k[0], &pattern(9, 4096)).simple(0, k[4], &[]);
            s.out
        },
    }
}

/// An oldstyle server: 152-byte greeting, simple replies.
fn oldstyle() -> Scenario {
    let s = Server::oldstyle(SIZE, tf::HAS_FLAGS | tf::SEND_FLUSH);
    Scenario {
        name: "oldstyle",
        config: Config::default(),
        stage1: s.out,
        commands: |c| {
            let r = vec![
                c.read(100, BytesMut::zeroed(1000), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.write(0, Bytes::from(pattern(1, 100)), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.flush(CmdFlags::empty()),
            ];
            accepted(r)
        },
        replies: |k, bogus| {
            let mut s = Server::default();
            s.simple(0, k[0], &pattern(2, 1000));
            if bogus {
                s.simple(0, k[0], &[]); // the same cookie again: no longer in flight
            }
            s.simple(errno::EIO, k[1], &[]).simple(0, k[2], &[]);
            s.out
        },
    }
}

/// Large reads (hundreds of KiB): payloads go straight into the read
/// buffers through `recv_buf`, and the receive buffer wraps many times.
fn large_structured() -> Scenario {
    let mut s = Server::newstyle(hf::FIXED_NEWSTYLE | hf::NO_ZEROES);
    s.opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[])
        .ack(opt::STRUCTURED_REPLY)
        .info_export(opt::GO, 64 << 20, EXPORT_FLAGS)
        .ack(opt::GO);
    Scenario {
        name: "large-structured",
        config: Config::default(),
        stage1: s.out,
        commands: |c| {
            let r = vec![
                c.read(0, BytesMut::zeroed(300_000), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.write(1 << 20, Bytes::from(pattern(1, 200_000)), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.read_with_chunks(4 << 20, BytesMut::zeroed(131_072), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.read(8 << 20, BytesMut::zeroed(4096), CmdFlags::empty())
                    .map_err(UsageError::from),
            ];
            accepted(r)
        },
        replies: |k, bogus| {
            let m = HeaderMode::Structured;
            let mut s = Server::default();
            s.chunk(
                m,
                0,
                chunk::OFFSET_DATA,
                k[0],
                0,
                &offset_data(100_000, &pattern(2, 200_000)),
            )
            .chunk(
                m,
                0,
                chunk::OFFSET_DATA,
                k[2],
                0,
                &offset_data(4 << 20, &pattern(3, 65_536)),
            )
            .chunk(m, DONE, chunk::OFFSET_HOLE, k[3], 0, &hole(8 << 20, 4096))
            .simple(0, k[1], &[]);
            if bogus {
                // Overlaps the first chunk of read 0.
                s.chunk(
                    m,
                    0,
                    chunk::OFFSET_DATA,
                    k[0],
                    0,
                    &offset_data(150_000, &pattern(0, 10)),
                );
            }
            s.chunk(
                m,
                DONE,
                chunk::OFFSET_DATA,
                k[0],
                0,
                &offset_data(0, &pattern(4, 100_000)),
            )
            .chunk(
                m,
                DONE,
                chunk::OFFSET_DATA,
                k[2],
                0,
                &offset_data((4 << 20) + 65_536, &pattern(5, 65_536)),
            );
            s.out
        },
    }
}

/// Large simple-reply reads.
fn large_simple() -> Scenario {
    let s = Server::oldstyle(64 << 20, tf::HAS_FLAGS | tf::SEND_FLUSH);
    Scenario {
        name: "large-simple",
        config: Config::default(),
        stage1: s.out,
        commands: |c| {
            let r = vec![
                c.read(0, BytesMut::zeroed(262_144), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.read(1 << 20, BytesMut::zeroed(70_000), CmdFlags::empty())
                    .map_err(UsageError::from),
                c.flush(CmdFlags::empty()),
            ];
            accepted(r)
        },
        replies: |k, bogus| {
            let mut s = Server::default();
            s.simple(0, k[1], &pattern(6, 70_000)).simple(0, k[2], &[]);
            if bogus {
                s.simple(0, Cookie(k[0].0 + (1 << 32)), &[]); // right slot, wrong generation
            }
            s.simple(0, k[0], &pattern(7, 262_144));
            s.out
        },
    }
}

fn scenarios() -> Vec<Scenario> {
    vec![
        structured(),
        extended(),
        simple(),
        oldstyle(),
        large_structured(),
        large_simple(),
    ]
}

// ----- driving -----

/// What a run produced: every event (Debug) with markers, and every byte sent.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    log: Vec<String>,
    sent: Vec<u8>,
}

/// Moves the events not yet taken into the log.
fn log_events(p: &mut Pair, log: &mut Vec<String>) {
    log.extend(p.take_events().iter().map(|ev| format!("{ev:?}")));
}

fn run(s: &Scenario, bogus: bool, cuts1: &[usize], cuts2: &[usize], input: Input) -> Outcome {
    let mut p = Pair::new(s.config.clone());
    let mut log = Vec::new();
    p.drain();
    p.feed_split(&s.stage1, cuts1, input);
    assert_eq!(
        p.conn.phase(),
        Phase::Ready,
        "{}: not ready after stage 1",
        s.name
    );
    let cookies = (s.commands)(&mut p.conn);
    for &c in &cookies {
        p.register(c);
    }
    log_events(&mut p, &mut log);
    log.push(format!("issued {cookies:?}"));
    p.drain();
    let stage2 = (s.replies)(&cookies, bogus);
    p.feed_split(&stage2, cuts2, input);
    log_events(&mut p, &mut log);
    log.push(format!("in flight after replies: {}", p.conn.in_flight()));
    log.push(format!("disconnect: {:?}", p.conn.disconnect()));
    p.drain();
    p.conn.handle_eof();
    p.drain();
    log_events(&mut p, &mut log);
    log.push(format!("phase {:?}", p.conn.phase()));
    Outcome {
        log,
        sent: p.sent().to_vec(),
    }
}

/// The number of commands and the stage-2 bytes of a scenario.
fn stage2(s: &Scenario, bogus: bool) -> (usize, Vec<u8>) {
    let mut c = Connection::new(s.config.clone(), std::time::Instant::now());
    c.handle_input(&s.stage1);
    let cookies = (s.commands)(&mut c);
    (cookies.len(), (s.replies)(&cookies, bogus))
}

fn whole(s: &Scenario, bogus: bool) -> Outcome {
    run(s, bogus, &[], &[], Input::Copy)
}

/// Sanity: the reference runs do what the scenarios intend.
#[test]
fn reference_runs_complete_every_command() {
    for s in scenarios() {
        let o = whole(&s, false);
        let done = o
            .log
            .iter()
            .filter(|l| l.starts_with("CommandDone"))
            .count();
        let issued = stage2(&s, false).0;
        assert_eq!(done, issued, "{}: {:#?}", s.name, o.log);
        assert!(
            o.log.iter().any(|l| l == "in flight after replies: 0"),
            "{}: {:#?}",
            s.name,
            o.log
        );
        assert_eq!(o.log.last().unwrap(), "phase Closed", "{}", s.name);
        assert!(
            o.log.iter().any(|l| l == "Closed(Disconnected)"),
            "{}: {:#?}",
            s.name,
            o.log
        );
        assert!(
            !o.log.iter().any(|l| l.contains("Protocol")),
            "{}: {:#?}",
            s.name,
            o.log
        );
        // With a bogus reply the connection dies with a protocol error, and
        // every request still completes exactly once.
        let o = whole(&s, true);
        let done = o
            .log
            .iter()
            .filter(|l| l.starts_with("CommandDone"))
            .count();
        assert_eq!(done, issued, "{} (bogus): {:#?}", s.name, o.log);
        assert!(
            o.log.iter().any(|l| l.starts_with("Closed(Protocol(")),
            "{} (bogus): {:#?}",
            s.name,
            o.log
        );
    }
}

/// The payloads land in the read buffers (checked once on the reference run;
/// the split runs are compared with it byte for byte).
#[test]
fn reference_read_data_is_placed() {
    let s = structured();
    let o = whole(&s, false);
    let read0 = o
        .log
        .iter()
        .find(|l| l.starts_with("CommandDone { cookie: Cookie(4294967296)"))
        .expect("read 0 done");
    // First half a hole (zeroes), second half the pattern.
    let mut want = vec![0u8; 2048];
    want.extend_from_slice(&pattern(1, 2048));
    let want = format!("{:?}", BytesMut::from(&want[..]));
    assert!(read0.contains(&want), "{read0}");
}

#[test]
fn one_byte_at_a_time_matches_whole() {
    for s in scenarios() {
        for bogus in [false, true] {
            let reference = whole(&s, bogus);
            let every1: Vec<usize> = (0..s.stage1.len()).collect();
            let stage2_len = stage2(&s, bogus).1.len();
            let every2: Vec<usize> = (0..stage2_len).collect();
            for input in [Input::Copy, Input::Recv] {
                let o = run(&s, bogus, &every1, &every2, input);
                assert_eq!(o, reference, "{} bogus={bogus} {input:?}", s.name);
            }
        }
    }
}

#[test]
fn recv_path_whole_matches_copy_path() {
    for s in scenarios() {
        for bogus in [false, true] {
            assert_eq!(
                run(&s, bogus, &[], &[], Input::Recv),
                whole(&s, bogus),
                "{}",
                s.name
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_split_matches_whole(
        which in 0usize..6,
        bogus in any::<bool>(),
        recv in any::<bool>(),
        cuts1 in proptest::collection::vec(any::<Index>(), 0..24),
        cuts2 in proptest::collection::vec(any::<Index>(), 0..48),
    ) {
        let s = scenarios().swap_remove(which);
        let reference = whole(&s, bogus);
        let len2 = stage2(&s, bogus).1.len();
        let cuts1: Vec<usize> = cuts1.iter().map(|i| i.index(s.stage1.len() + 1)).collect();
        let cuts2: Vec<usize> = cuts2.iter().map(|i| i.index(len2 + 1)).collect();
        let input = if recv { Input::Recv } else { Input::Copy };
        let o = run(&s, bogus, &cuts1, &cuts2, input);
        prop_assert_eq!(o, reference);
    }

    /// Small pieces everywhere: every cut point a few bytes apart.
    #[test]
    fn small_pieces_match_whole(
        which in 0usize..6,
        bogus in any::<bool>(),
        recv in any::<bool>(),
        steps in proptest::collection::vec(1usize..8, 1..64),
    ) {
        let s = scenarios().swap_remove(which);
        let reference = whole(&s, bogus);
        let mut cuts = Vec::new();
        let mut at = 0;
        for st in steps.iter().cycle().take(20_000) {
            at += st;
            cuts.push(at);
        }
        let input = if recv { Input::Recv } else { Input::Copy };
        let o = run(&s, bogus, &cuts, &cuts, input);
        prop_assert_eq!(o, reference);
    }
}
