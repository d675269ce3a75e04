//! Hostile reply patterns at full size, with the memory they make the
//! client hold measured by a counting allocator:
//!
//! - endless error chunks without `NBD_REPLY_FLAG_DONE` for one request
//!   (doc/proto.md, section "Structured reply chunk message": a reply ends
//!   with the chunk that carries the done flag; nothing else bounds how many
//!   error chunks come before it): [`Limits::max_error_chunks`] ends the
//!   connection with [`ProtocolError::TooManyErrorChunks`];
//! - block status chunks with more than 2^20 extents, up to payloads of
//!   2^25 bytes, which the spec says a client SHOULD NOT treat as a denial
//!   of service (doc/proto.md, sections "Structured reply chunk message"
//!   and "`NBD_REPLY_TYPE_BLOCK_STATUS`"): accepted within
//!   [`Limits::max_extent_bytes`], refused past it.
//!
//! The tests of this file run one at a time (a lock), so that the
//! allocator's peak is theirs alone.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::script::{error_payload, status, status_ext};
use common::{assert_fatal, Mode, Pair, Setup, MIB};
use nbd_core::consts::{chunk, errno, reply_flags::DONE};
use nbd_core::{CmdFlags, CommandError, Event, Limits, ProtocolError, WireError};

/// The system allocator, counting the bytes live now and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Relaxed) + (new - l.size());
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns how far the live bytes rose above where they were
/// when it started.
fn peak_growth(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    f();
    PEAK.load(Relaxed).saturating_sub(base)
}

/// Feeds `stream` in 64 KiB pieces, as a socket would deliver it.
fn feed(h: &mut Pair, stream: &[u8]) {
    for piece in stream.chunks(64 * 1024) {
        h.feed(piece);
    }
}

/// The error chunks of the pattern: `n` of them for `c`, none with
/// the done flag.
fn error_flood(h: &Pair, c: nbd_core::Cookie, n: u32) -> Vec<u8> {
    let one = h.chunk(0, chunk::ERROR, c, &error_payload(errno::EIO, "I/O error"));
    one.repeat(n as usize)
}

#[test]
fn endless_error_chunks_end_the_connection_at_the_limit() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for mode in [Mode::Structured, Mode::Extended] {
        let limit = Limits::default().max_error_chunks;
        let mut h = Setup::new(mode).connect();
        // Other requests in flight: they too complete, once.
        let other = h.read(4096, 4096);
        let flush = h.flush();
        let c = h.read(0, 4096);
        h.requests();
        // The limit, one more, and what a server that never stops would
        // send next (ignored once the connection is dead).
        let stream = error_flood(&h, c, limit + 1000);
        let t = Instant::now();
        let grew = peak_growth(|| feed(&mut h, &stream));
        let elapsed = t.elapsed();
        let e = h.fatal();
        assert_eq!(
            e,
            ProtocolError::TooManyErrorChunks {
                cookie: c.0,
                count: u64::from(limit) + 1,
                limit
            },
            "{mode:?}"
        );
        assert!(e.to_string().contains("65537 error chunks"), "{e}");
        assert!(h.conn.is_finished());
        // `fatal` checked that all three completed with ConnectionClosed;
        // dropping the pair checks each completed exactly once.
        let _ = (other, flush);
        eprintln!(
            "{mode:?}: {} error chunks in {elapsed:?}, memory grew {grew} bytes",
            limit + 1
        );
        // Flat memory: the receive buffer and the events of one piece.
        assert!(grew < 1 << 20, "{mode:?}: grew {grew} bytes");
        assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    }
}

#[test]
fn error_chunks_up_to_the_limit_then_done_complete_the_read_with_the_first_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut limits = Limits::default();
    limits.max_error_chunks = 1000;
    let mut h = Setup::new(Mode::Structured).limits(limits).connect();
    let c = h.read_flags(0, 4096, CmdFlags::empty());
    h.requests();
    let mut stream = h.chunk(0, chunk::ERROR, c, &error_payload(errno::EPERM, "first"));
    stream.extend(error_flood(&h, c, 998));
    stream.extend(h.chunk(DONE, chunk::ERROR, c, &error_payload(errno::EIO, "last")));
    feed(&mut h, &stream);
    match h.done_err(c) {
        CommandError::Server {
            errno: e, message, ..
        } => {
            assert_eq!(e.0, errno::EPERM);
            assert_eq!(message.as_deref(), Some("first"));
        }
        other => panic!("{other:?}"),
    }
    // The connection is still usable, and the count starts again.
    let c = h.read(0, 4096);
    h.requests();
    let flood = error_flood(&h, c, 1001);
    feed(&mut h, &flood);
    assert_fatal!(
        h,
        ProtocolError::TooManyErrorChunks {
            count: 1001,
            limit: 1000,
            ..
        }
    );
}

/// Read chunk events of an error flood come out per piece fed, so they are
/// bounded by the input between two polls, not by the flood.
#[test]
fn an_error_flood_to_a_read_with_chunk_events_is_bounded_too() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = Setup::new(Mode::Structured).connect();
    let buf = bytes::BytesMut::zeroed(4096);
    let c = h.conn.read_with_chunks(0, buf, CmdFlags::empty());
    let c = h.ok(c);
    h.requests();
    let stream = error_flood(&h, c, Limits::default().max_error_chunks + 10);
    let mut chunks = 0usize;
    let grew = peak_growth(|| {
        for piece in stream.chunks(64 * 1024) {
            h.feed(piece);
            chunks += h
                .events
                .iter()
                .filter(|e| matches!(e, Event::ReadChunk { .. }))
                .count();
            h.events.retain(|e| !matches!(e, Event::ReadChunk { .. }));
        }
    });
    assert_eq!(chunks, Limits::default().max_error_chunks as usize);
    assert_fatal!(h, ProtocolError::TooManyErrorChunks { .. });
    assert!(grew < 1 << 20, "grew {grew} bytes");
}

/// A block status request long enough for `n` one-byte extents.
fn status_request(h: &mut Pair, n: u64) -> nbd_core::Cookie {
    let c = h.block_status(0, n, CmdFlags::empty());
    h.requests();
    c
}

/// One block status chunk (done) of `n` one-byte extents in `mode`.
fn status_chunk(h: &Pair, mode: Mode, c: nbd_core::Cookie, n: u64) -> Vec<u8> {
    if mode == Mode::Extended {
        let ext: Vec<(u64, u64)> = (0..n).map(|i| (1, i & 3)).collect();
        h.chunk(DONE, chunk::BLOCK_STATUS_EXT, c, &status_ext(1, &ext))
    } else {
        let ext: Vec<(u32, u32)> = (0..n).map(|i| (1, (i & 3) as u32)).collect();
        h.chunk(DONE, chunk::BLOCK_STATUS, c, &status(1, &ext))
    }
}

/// Feeds one chunk of `n` extents and checks they all arrive; returns
/// how far memory rose meanwhile.
fn accept_extents(mode: Mode, n: u64) -> usize {
    let mut h = Setup::new(mode).size(64 * MIB).base_allocation(1).connect();
    let c = status_request(&mut h, n);
    let stream = status_chunk(&h, mode, c, n);
    let t = Instant::now();
    let mut got = None;
    let grew = peak_growth(|| {
        feed(&mut h, &stream);
        for ev in h.take_events() {
            if let Event::BlockStatus { extents, .. } = ev {
                got = Some(extents);
            } else if let Event::CommandDone { result, .. } = ev {
                assert_eq!(result, Ok(()));
            }
        }
    });
    let extents = got.expect("one BlockStatus event");
    assert_eq!(extents.len() as u64, n, "{mode:?}");
    assert!(extents
        .iter()
        .enumerate()
        .all(|(i, e)| e.length == 1 && e.flags == (i & 3) as u64));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    grew
}

#[test]
fn a_block_status_chunk_of_2_pow_20_plus_1_extents_is_accepted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for mode in [Mode::Structured, Mode::Extended] {
        let n = (1 << 20) + 1;
        let grew = accept_extents(mode, n);
        eprintln!("{mode:?}: {n} extents, memory grew {grew} bytes");
        // The extents (16 bytes each, allocated once at their exact count)
        // and the receive buffer.
        let bound = 16 * n as usize + (1 << 20);
        assert!(grew <= bound, "{mode:?}: grew {grew}, bound {bound}");
    }
}

/// The largest payloads of at most 2^25 bytes: (2^25 - 4) / 8 narrow
/// extents, (2^25 - 8) / 16 wide ones.
#[test]
fn block_status_payloads_up_to_2_pow_25_bytes_are_accepted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (mode, n) in [
        (Mode::Structured, ((1 << 25) - 4) / 8),
        (Mode::Extended, ((1 << 25) - 8) / 16),
    ] {
        let grew = accept_extents(mode, n);
        eprintln!("{mode:?}: {n} extents, memory grew {grew} bytes");
        let bound = 16 * n as usize + (1 << 20);
        assert!(grew <= bound, "{mode:?}: grew {grew}, bound {bound}");
        assert!(16 * n <= Limits::default().max_extent_bytes);
    }
}

#[test]
fn a_block_status_chunk_past_the_memory_limit_is_refused_on_its_header() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for mode in [Mode::Structured, Mode::Extended] {
        let mut limits = Limits::default();
        limits.max_extent_bytes = 1 << 20; // 65,536 extents
        let mut h = Setup::new(mode)
            .base_allocation(1)
            .limits(limits.clone())
            .connect();
        let other = h.read(0, 512);
        let c = status_request(&mut h, 1 << 17);
        let stream = status_chunk(&h, mode, c, (1 << 16) + 1);
        let grew = peak_growth(|| feed(&mut h, &stream));
        assert_fatal!(
            h,
            ProtocolError::Wire(WireError::OverLimit {
                what: "block status extents",
                len: 65537,
                limit: 65536
            })
        );
        let _ = other;
        assert!(grew < 1 << 20, "{mode:?}: grew {grew}");
        // Exactly at the limit is fine.
        let mut h = Setup::new(mode).base_allocation(1).limits(limits).connect();
        let c = status_request(&mut h, 1 << 17);
        let stream = status_chunk(&h, mode, c, 1 << 16);
        feed(&mut h, &stream);
        assert_eq!(h.done(c).0, Ok(()));
    }
}
