//! PAR-01 (libnbd's `aio-parallel`): several connections, each with 64
//! requests in flight through the pipelined API, random 4–64 KiB aligned
//! reads and writes for a bounded time, verified against a shadow copy.
//!
//! Each connection (one thread each) owns a stripe of the disk, so its
//! writes never race with another connection's; all connections also read a
//! shared region that nobody writes. Within a connection, a request is only
//! issued when it does not overlap a request in flight that changes the
//! same bytes (the spec leaves the order of overlapping requests
//! undefined), so every read has exactly one right answer: the shadow's.
//!
//! The duration is `NBD_SOAK_SECS` seconds per server (default 3).

use nbd_std::CmdFlags;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_std::{Client, Config, Cookie};
use nbd_tests::servers::{make_file, nbdkit, qemu_nbd, scratch_dir};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CONNECTIONS: u64 = 4;
const DEPTH: usize = 64;
const ALIGN: u64 = 4 * KIB;
/// The region every connection reads and none writes.
const SHARED: u64 = 8 * MIB;

fn soak_time() -> Duration {
    let secs = std::env::var("NBD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs.max(0.1))
}

/// xorshift64*: cheap, deterministic per seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// Initial content of the disk outside the stripes' own writes.
fn pattern(off: u64) -> u8 {
    ((off / 8).wrapping_mul(31) ^ (off % 8)) as u8
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    reads: u64,
    writes: u64,
    bytes: u64,
    mismatches: u64,
    peak_in_flight: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.bytes += o.bytes;
        self.mismatches += o.mismatches;
        self.peak_in_flight = self.peak_in_flight.max(o.peak_in_flight);
    }
}

/// A request in flight: absolute offset, length, and whether it writes.
#[derive(Debug, Clone, Copy)]
struct Pending {
    off: u64,
    len: u64,
    write: bool,
}

/// One connection's soak: random reads and writes in its own stripe
/// `[base, base + len)` and reads in the shared region, `DEPTH` in flight.
fn worker(
    uri: &str,
    id: u64,
    base: u64,
    len: u64,
    shared_base: u64,
    init: fn(u64) -> u8,
    time: Duration,
) -> Stats {
    let mut c = Client::connect(uri, Config::default()).expect("connect");
    let mut shadow: Vec<u8> = (base..base + len).map(init).collect();
    let shared: Vec<u8> = (shared_base..shared_base + SHARED).map(init).collect();
    let mut rng = Rng::new(0x5eed + id);
    let mut pending: HashMap<Cookie, Pending> = HashMap::new();
    let mut st = Stats::default();
    // The clock starts once this connection is set up.
    let deadline = Instant::now() + time;
    let check = |st: &mut Stats, p: &Pending, got: &[u8], shadow: &[u8], shared: &[u8]| {
        let want = if p.off >= shared_base {
            &shared[(p.off - shared_base) as usize..(p.off - shared_base + p.len) as usize]
        } else {
            &shadow[(p.off - base) as usize..(p.off - base + p.len) as usize]
        };
        if got != want {
            st.mismatches += 1;
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            eprintln!(
                "connection {id}: read of {} at {} differs at byte {}",
                p.len,
                p.off,
                p.off + i as u64
            );
        }
    };
    let retire =
        |c: &mut Client, pending: &mut HashMap<Cookie, Pending>, st: &mut Stats, shadow: &[u8]| {
            let (ck, done) = c.wait_any().expect("wait_any");
            let p = pending
                .remove(&ck)
                .expect("completion for a cookie in flight");
            done.result
                .unwrap_or_else(|e| panic!("connection {id}: {p:?} failed: {e}"));
            if !p.write {
                let b = done.buffer.expect("read buffer handed back");
                assert_eq!(b.len() as u64, p.len);
                check(st, &p, &b, shadow, &shared);
            }
        };

    while Instant::now() < deadline {
        while pending.len() < DEPTH {
            let write = rng.below(2) == 0;
            let n = ALIGN * (1 + rng.below(16));
            // One read in eight goes to the shared region.
            let in_shared = !write && rng.below(8) == 0;
            let (lo, span) = if in_shared {
                (shared_base, SHARED)
            } else {
                (base, len)
            };
            let off = lo + ALIGN * rng.below((span - n) / ALIGN + 1);
            let p = Pending { off, len: n, write };
            let clash = pending
                .values()
                .any(|q| (q.write || p.write) && q.off < p.off + p.len && p.off < q.off + q.len);
            if clash {
                break;
            }
            let ck = if write {
                let data = rng.fill(n as usize);
                let at = (off - base) as usize;
                shadow[at..at + n as usize].copy_from_slice(&data);
                st.writes += 1;
                c.aio_pwrite(Bytes::from(data), off, CmdFlags::empty())
                    .expect("aio_pwrite")
            } else {
                st.reads += 1;
                c.aio_pread(BytesMut::zeroed(n as usize), off, CmdFlags::empty())
                    .expect("aio_pread")
            };
            st.bytes += n;
            assert!(
                pending.insert(ck, p).is_none(),
                "cookie reused while in flight"
            );
            st.peak_in_flight = st.peak_in_flight.max(c.aio_in_flight());
        }
        retire(&mut c, &mut pending, &mut st, &shadow);
    }
    while !pending.is_empty() {
        retire(&mut c, &mut pending, &mut st, &shadow);
    }
    assert_eq!(c.aio_in_flight(), 0);
    if c.export_info().unwrap().can_flush() {
        c.flush(CmdFlags::empty()).expect("flush");
    }
    // The whole stripe, read back at the end.
    let mut off = base;
    while off < base + len {
        let n = (base + len - off).min(MIB);
        let b = c
            .pread_buf(BytesMut::zeroed(n as usize), off, CmdFlags::empty())
            .unwrap();
        let p = Pending {
            off,
            len: n,
            write: false,
        };
        check(&mut st, &p, &b, &shadow, &shared);
        off += n;
    }
    c.shutdown().expect("shutdown");
    st
}

/// Runs `CONNECTIONS` workers against `uri` (a disk of `size` bytes whose
/// content is `init`): stripes first, the shared region last.
fn par01(label: &str, uri: &str, size: u64, init: fn(u64) -> u8) {
    let stripe = (size - SHARED) / CONNECTIONS / ALIGN * ALIGN;
    let shared_base = size - SHARED;
    let time = soak_time();
    let per: Vec<Stats> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..CONNECTIONS)
            .map(|i| s.spawn(move || worker(uri, i, i * stripe, stripe, shared_base, init, time)))
            .collect();
        hs.into_iter().map(|h| h.join().expect("worker")).collect()
    });
    let mut total = Stats::default();
    for (i, st) in per.iter().enumerate() {
        assert!(
            st.reads > 10 && st.writes > 10,
            "{label}: connection {i} did too little: {st:?}"
        );
        total += *st;
    }
    println!(
        "PAR-01 {label}: {CONNECTIONS} connections x {DEPTH} in flight for {time:?}: \
         {} reads, {} writes, {} MiB, peak {} in flight, {} mismatches",
        total.reads,
        total.writes,
        total.bytes / MIB,
        total.peak_in_flight,
        total.mismatches
    );
    assert_eq!(
        total.peak_in_flight, DEPTH,
        "{label}: {DEPTH} requests in flight"
    );
    assert_eq!(total.mismatches, 0, "{label}: data mismatches");
}

/// The shared region of the memory disk is written once before the soak;
/// the stripes start as zeroes.
fn memory_init(off: u64) -> u8 {
    if off >= 64 * MIB - SHARED {
        pattern(off)
    } else {
        0
    }
}

#[test]
fn par01_nbdkit_memory_4_connections_64_in_flight() {
    let size = 64 * MIB;
    let srv = nbdkit(&["memory", "64M"]);
    let uri = srv.uri();
    {
        let mut c = Client::connect(&uri, Config::default()).unwrap();
        assert!(c.export_info().unwrap().can_multi_conn());
        let shared: Vec<u8> = (size - SHARED..size).map(pattern).collect();
        c.pwrite(&shared, size - SHARED, CmdFlags::empty()).unwrap();
        c.flush(CmdFlags::empty()).unwrap();
        c.shutdown().unwrap();
    }
    par01("nbdkit memory 64M", &uri, size, memory_init);
}

#[test]
fn par01_qemu_nbd_4_connections_64_in_flight() {
    let size = 64 * MIB;
    let data = scratch_dir();
    let img = make_file(data.path(), "soak.raw", size, pattern);
    let srv = qemu_nbd(&["-e", "8"], &img);
    par01("qemu-nbd -e 8", &srv.uri(), size, pattern);
}
