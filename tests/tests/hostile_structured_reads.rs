//! `Client::pread_structured` against hostile but legal servers, at full
//! size, with the memory the client holds measured by a counting
//! allocator (doc/proto.md, section "Structured reply chunk message
//! types": chunks may come in any order, one byte each; a reply ends only
//! with the done flag):
//!
//! - a 2 MiB read sent as 2^21 one-byte chunks in descending order: the
//!   chunk callback sees every chunk and nothing is kept per chunk (it
//!   used to cost 24 bytes a chunk, 48 MiB for this read);
//! - endless error chunks without the done flag: the connection ends with
//!   `ProtocolError::TooManyErrorChunks` at `Limits::max_error_chunks`,
//!   the read and the one in flight beside it complete once each.
//!
//! The tests of this file run one at a time (a lock), so the allocator's
//! peak is theirs alone; the fake server's thread allocates too, and its
//! 1 MiB write batches count against the bounds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use bytes::BytesMut;
use nbd_std::nbd_core::{CloseReason, CommandError, ProtocolError};
use nbd_std::{Client, CmdFlags, Config, Error, ReadChunkKind};
use nbd_tests::fake::FakeServer;
use nbd_tests::proto::*;

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

/// Runs `f`; returns its result and how far the live bytes rose meanwhile.
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let r = f();
    (r, PEAK.load(Relaxed).saturating_sub(base))
}

const MIB: usize = 1 << 20;

#[test]
fn a_2_mib_read_as_one_byte_chunks_descending_keeps_nothing_per_chunk() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let size = 2 * MIB;
    let disk: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
    let expected = disk.clone();
    let server = FakeServer::start(move |c| {
        c.standard_handshake(4 * size as u64, FLAG_HAS_FLAGS)?;
        let req = c.recv_request()?;
        c.send_one_byte_chunks(&req, &disk, true)?;
        c.expect_disc()
    });
    let mut client = Client::connect_unix(server.socket(), Config::default()).expect("connect");
    let mut buf = vec![0u8; size];
    let mut chunks = 0usize;
    let mut next = size as u64;
    let (r, grew) = peak_growth(|| {
        client.pread_structured(&mut buf, 0, CmdFlags::empty(), |o, l, k| {
            assert_eq!((o, l, k), (next - 1, 1, ReadChunkKind::Data));
            next -= 1;
            chunks += 1;
        })
    });
    r.expect("read");
    assert_eq!(chunks, size);
    assert!(buf == expected, "data in place");
    // The read's buffer (2 MiB), the server's 1 MiB batch and the receive
    // buffers; 24 bytes a chunk would be 48 MiB.
    eprintln!("{chunks} chunks, memory grew {grew} bytes");
    assert!(grew < 8 * MIB, "grew {grew} bytes");
    client.shutdown().expect("shutdown");
    server.join().expect("server");
}

#[test]
fn endless_error_chunks_end_the_connection_and_complete_every_read_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = FakeServer::start(|c| {
        c.standard_handshake(1 << 20, FLAG_HAS_FLAGS)?;
        let _other = c.recv_request()?;
        let req = c.recv_request()?;
        // Error chunks without the done flag until the client hangs up
        // (the write then fails, which ends this script).
        let mut batch = Vec::new();
        for _ in 0..1000 {
            batch.extend_from_slice(&chunk_bytes(&req));
        }
        loop {
            if c.send(&batch).is_err() {
                return Ok(());
            }
        }
    });
    let mut client = Client::connect_unix(server.socket(), Config::default()).expect("connect");
    let other = client
        .aio_pread(BytesMut::zeroed(512), 4096, CmdFlags::empty())
        .expect("aio_pread");
    let mut buf = vec![0u8; 4096];
    let mut errors = 0u64;
    let (r, grew) = peak_growth(|| {
        client.pread_structured(&mut buf, 0, CmdFlags::empty(), |_, l, k| {
            assert_eq!((l, k), (0, ReadChunkKind::Error));
            errors += 1;
        })
    });
    let limit = nbd_std::Limits::default().max_error_chunks;
    // The read failed as every request in flight does when the connection
    // dies; the connection says why.
    assert!(
        matches!(r, Err(Error::Command(CommandError::ConnectionClosed(_)))),
        "{r:?}"
    );
    match client.connection().close_reason() {
        Some(CloseReason::Protocol(ProtocolError::TooManyErrorChunks {
            count, limit: l, ..
        })) => {
            let (count, l) = (*count, *l);
            assert_eq!(l, limit);
            assert_eq!(count, u64::from(limit) + 1);
        }
        other => panic!("expected TooManyErrorChunks, got {other:?}"),
    }
    match client.flush(CmdFlags::empty()) {
        Err(Error::Closed(CloseReason::Protocol(ProtocolError::TooManyErrorChunks { .. }))) => {}
        other => panic!("later calls report the close: {other:?}"),
    }
    assert_eq!(
        errors,
        u64::from(limit),
        "every error chunk up to the limit seen"
    );
    // The read beside it completed once, with the connection's end.
    let done = client.wait(other).expect("the other read completed");
    assert!(matches!(
        done.result,
        Err(CommandError::ConnectionClosed(_))
    ));
    assert!(client.aio_command_completed(other).is_none(), "only once");
    eprintln!("{errors} error chunks, memory grew {grew} bytes");
    assert!(grew < 4 * MIB, "grew {grew} bytes");
    drop(client);
    server.join().expect("server");
}

/// One `NBD_REPLY_TYPE_ERROR` chunk (EIO, short message) without the done
/// flag for `req`.
fn chunk_bytes(req: &nbd_tests::fake::Request) -> Vec<u8> {
    let payload = error_payload(5, "I/O error");
    let mut v = Vec::new();
    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
    v.extend_from_slice(&req.cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(&payload);
    v
}
