//! aio-bench: sequential read or write throughput over ONE NBD connection
//! with a fixed queue depth, driven by a mio loop. It mirrors
//! `libnbd-aio-bench.c` (shared/bench) flag for flag and line for line, so
//! `bench-driver.py` can run it as the CANDIDATE:
//!
//! - one connection, the default handshake (structured replies requested
//!   unless `-S`, no meta context, no TLS);
//! - the byte range `[0, TOTAL)` cut into REQSIZE requests issued in
//!   ascending offset order, wrapping around the export;
//! - at most DEPTH requests in flight, a new one issued as each completes;
//! - one buffer per slot, allocated and touched before timing, reused for
//!   every request: reads hand the slot's `BytesMut` to the core and get it
//!   back in the completion, writes send a clone of the slot's `Bytes` (a
//!   reference count, no copy) holding the non-zero `0xa5 ^ slot` pattern;
//! - the clock runs from the first request to the last reply.
//!
//! ```text
//! aio-bench [-w] [-r REQSIZE] [-q DEPTH] [-n TOTAL] [-i ITER] [-S] [-I] [-V] [-j] URI
//!   -w  write instead of read        -r  request size (k/m/g suffix; 256k)
//!   -q  requests in flight (16)      -n  bytes per iteration (export size)
//!   -i  iterations (1)               -S  no structured replies
//!   -I  accepted, no effect (read buffers are never zeroed anyway)
//!   -V  verify nbdkit pattern data   -j  one JSON object per iteration
//! ```
//!
//! Output, as the C program: `read rs=262144 qd=16 bytes=1073741824
//! secs=0.412 GiB/s=2.427 usr=0.101 sys=0.297 cpu_s_per_GiB=0.398`, usr/sys
//! being this process's CPU time in the timed phase (getrusage). Not in the C
//! program: a counting global allocator; the allocations made during the
//! timed phase per request, and the socket and poll calls per request, go to
//! stderr (and into the JSON object with `-j`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::exit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::{Events, Poll, Token};
use nbd_mio::nbd_core::CmdFlags;
use nbd_mio::{Config, Cookie, Event, NbdConnection};

/// Counts every allocation (and reallocation) the process makes.
struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged, so System's guarantees hold; counting has no effect
// on memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const NBD: Token = Token(0);
const USAGE: &str =
    "[-w] [-r REQSIZE] [-q DEPTH] [-n TOTAL] [-i ITER] [-S] [-I] [-V] [-j] [-T SECONDS] URI";

/// Command-line options, as `getopt(argc, argv, "wr:q:n:i:SIVjT:")` reads
/// them. `-T SECONDS` (nbd-rs only) gives every command that deadline, to
/// measure what deadlines cost.
struct Opts {
    write: bool,
    reqsize: u64,
    depth: u64,
    total: u64,
    iterations: u64,
    no_sr: bool,
    verify: bool,
    json: bool,
    deadline: Option<Duration>,
    uri: String,
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("{msg}");
    exit(1)
}

/// `strtoull` digits plus an optional k/m/g suffix, nothing after.
fn parse_size(s: &str) -> u64 {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let v = s[..digits]
        .parse::<u64>()
        .unwrap_or(if digits == 0 { 0 } else { u64::MAX });
    let shift = match &s[digits..] {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        _ => die(format!("bad size: {s}")),
    };
    v.wrapping_shl(shift)
}

fn parse_args() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let prog = args.first().map_or("aio-bench", String::as_str).to_owned();
    let usage = || -> ! { die(format!("usage: {prog} {USAGE}")) };
    let mut o = Opts {
        write: false,
        reqsize: 256 * 1024,
        depth: 16,
        total: 0,
        iterations: 1,
        no_sr: false,
        verify: false,
        json: false,
        deadline: None,
        uri: String::new(),
    };
    let mut positional = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            positional.extend(it.by_ref().cloned());
            break;
        }
        if a.len() < 2 || !a.starts_with('-') {
            // GNU getopt permutes: options may follow the URI.
            positional.push(a.clone());
            continue;
        }
        for (k, c) in a[1..].char_indices() {
            match c {
                'w' => o.write = true,
                'S' => o.no_sr = true,
                'I' => {} // read buffers are never zeroed: nothing to turn off
                'V' => o.verify = true,
                'j' => o.json = true,
                'r' | 'q' | 'n' | 'i' | 'T' => {
                    let rest = &a[1 + k + 1..];
                    let v = if rest.is_empty() {
                        it.next().cloned().unwrap_or_else(|| usage())
                    } else {
                        rest.to_owned()
                    };
                    if c == 'T' {
                        let secs = v.parse::<f64>().ok();
                        o.deadline = secs.and_then(|s| Duration::try_from_secs_f64(s).ok());
                        if o.deadline.is_none() {
                            usage();
                        }
                        break;
                    }
                    let v = parse_size(&v);
                    match c {
                        'r' => o.reqsize = v,
                        'q' => o.depth = v,
                        'n' => o.total = v,
                        _ => o.iterations = v,
                    }
                    break;
                }
                _ => usage(),
            }
        }
    }
    if positional.len() != 1 || o.depth == 0 || o.reqsize == 0 || o.iterations == 0 {
        die(format!("{prog}: need exactly one URI; sizes must be > 0"));
    }
    o.uri = positional.remove(0);
    o
}

/// User and system CPU seconds of this process so far.
fn cpu_times() -> (f64, f64) {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: RUSAGE_SELF is a valid target and `ru` points to writable
    // memory of the right type; all-zero bytes are a valid `rusage`, and the
    // call fills it in when it succeeds.
    let ru = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) != 0 {
            die(format!("getrusage: {}", std::io::Error::last_os_error()));
        }
        ru.assume_init()
    };
    let s = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

/// nbdkit's pattern plugin: at every multiple of 8, the 8 bytes are the
/// offset as a big-endian 64-bit integer.
fn check_pattern(buf: &[u8], offset: u64) {
    for (i, w) in buf.chunks_exact(8).enumerate() {
        let o = offset + 8 * i as u64;
        let v = u64::from_be_bytes(w.try_into().unwrap_or_default());
        if v != o {
            die(format!("verify failed at offset {o}"));
        }
    }
}

/// One request slot and its buffer.
struct Slot {
    offset: u64,
    cookie: Option<Cookie>,
    /// The read buffer while the slot is idle (the core holds it meanwhile).
    rbuf: Option<BytesMut>,
    /// The write payload; each write sends a clone (a reference count).
    wbuf: Bytes,
}

/// The mio loop around the connection.
struct Loop {
    poll: Poll,
    events: Events,
    nbd: NbdConnection,
    polls: u64,
}

impl Loop {
    /// Waits for readiness and hands it to the connection; the drain of
    /// `poll_event` that follows does the rest of the I/O.
    fn turn(&mut self) {
        // The timer loop of nbd-mio's docs; the clock is read only when a
        // deadline is pending.
        let due = self.nbd.poll_timeout();
        let timeout = nbd_mio::poll_timeout_until(due);
        if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                die(format!("poll: {e}"));
            }
        }
        self.polls += 1;
        for ev in self.events.iter() {
            if ev.token() == NBD {
                self.nbd.handle_event(ev);
            }
        }
        if due.is_some() {
            self.nbd.handle_timeout(Instant::now());
        }
    }
}

/// Issues the next request on slot `i`, if any bytes are left to issue.
fn submit(
    nbd: &mut NbdConnection,
    s: &mut Slot,
    next: &mut u64,
    total: u64,
    size: u64,
    o: &Opts,
) -> bool {
    if *next >= total {
        return false;
    }
    let rs = o.reqsize;
    let off = *next % size;
    s.offset = off;
    let c = if o.write {
        nbd.write(off, s.wbuf.clone(), CmdFlags::empty())
            .map_err(|r| r.error)
    } else {
        let buf = s.rbuf.take().unwrap_or_default();
        nbd.read(off, buf, CmdFlags::empty()).map_err(|r| r.error)
    };
    s.cookie = Some(c.unwrap_or_else(|e| die(e)));
    *next += rs;
    true
}

fn main() {
    let o = parse_args();
    let rs = o.reqsize;
    let depth = o.depth as usize;

    let mut cfg = Config::default();
    cfg.request_structured_replies = !o.no_sr;
    // Room for DEPTH requests of REQSIZE, and libnbd's 64 MiB request cap.
    cfg.limits.max_in_flight = cfg.limits.max_in_flight.max(depth);
    cfg.limits.max_bytes_in_flight = cfg
        .limits
        .max_bytes_in_flight
        .max(rs.saturating_mul(o.depth));
    cfg.limits.default_max_write = cfg.limits.default_max_write.max(64 << 20);
    cfg.command_timeout = o.deadline;

    let t_conn0 = Instant::now();
    let nbd = NbdConnection::connect_uri(&o.uri, cfg).unwrap_or_else(|e| die(e));
    let mut lp = Loop {
        poll: Poll::new().unwrap_or_else(|e| die(format!("poll: {e}"))),
        events: Events::with_capacity(64),
        nbd,
        polls: 0,
    };
    if let Err(e) = lp.nbd.register(lp.poll.registry(), NBD) {
        die(e);
    }
    let info = loop {
        match lp.nbd.poll_event() {
            Some(Event::GoSucceeded(info)) => break info,
            Some(Event::Closed(r)) => die(format!("{}: {r}", o.uri)),
            Some(_) => {}
            None => lp.turn(),
        }
    };
    let t_conn = t_conn0.elapsed().as_secs_f64();

    let size = info.size;
    let total = if o.total == 0 { size } else { o.total };
    if size < rs || size % rs != 0 {
        die(format!(
            "export size {size} must be a multiple of the request size {rs}"
        ));
    }
    if total % rs != 0 {
        die("total must be a multiple of the request size");
    }
    if o.write && info.is_read_only() {
        die("export is read-only");
    }

    // One buffer per slot, non-zero and touched now so that page faults
    // are not timed.
    let mut slots: Vec<Slot> = (0..depth)
        .map(|i| {
            let fill = 0xa5 ^ i as u8;
            let (rbuf, wbuf) = if o.write {
                let wbuf = Bytes::from(vec![fill; rs as usize]);
                // The first clone of a Vec-backed Bytes moves it to shared
                // storage (one allocation): do it now, not in the timed loop.
                drop(wbuf.clone());
                (None, wbuf)
            } else {
                let mut rbuf = BytesMut::zeroed(rs as usize);
                rbuf.fill(fill);
                (Some(rbuf), Bytes::new())
            };
            Slot {
                offset: 0,
                cookie: None,
                rbuf,
                wbuf,
            }
        })
        .collect();
    let structured = lp.nbd.conn().structured_replies_negotiated();

    for iteration in 0..o.iterations {
        let mut bytes_done = 0u64;
        let mut next = 0u64;
        let mut first_error = None;
        let stats0 = lp.nbd.io_stats();
        let polls0 = lp.polls;

        let allocs0 = ALLOCS.load(Ordering::Relaxed);
        let (usr0, sys0) = cpu_times();
        let t0 = Instant::now();

        // The first DEPTH requests; then a new one as each completes,
        // submitted inside the drain of events so that one vectored write
        // takes the batch.
        for s in slots.iter_mut() {
            if !submit(&mut lp.nbd, s, &mut next, total, size, &o) {
                break;
            }
        }
        while bytes_done < total {
            lp.turn();
            while let Some(ev) = lp.nbd.poll_event() {
                match ev {
                    Event::CommandDone {
                        cookie,
                        result,
                        buffer,
                    } => {
                        let Some(i) = slots.iter().position(|s| s.cookie == Some(cookie)) else {
                            die(format!("completion for unknown cookie {cookie:?}"));
                        };
                        let s = &mut slots[i];
                        s.cookie = None;
                        if buffer.is_some() {
                            s.rbuf = buffer;
                        }
                        match result {
                            Err(e) => {
                                first_error.get_or_insert(e);
                            }
                            Ok(()) if o.verify => {
                                let data = s.rbuf.as_deref().unwrap_or(&s.wbuf);
                                check_pattern(data, s.offset);
                            }
                            Ok(()) => {}
                        }
                        bytes_done += rs;
                        submit(&mut lp.nbd, s, &mut next, total, size, &o);
                    }
                    Event::Closed(r) => die(r),
                    _ => {}
                }
            }
            if let Some(e) = first_error.take() {
                die(format!("request failed: {e}"));
            }
        }

        let secs = t0.elapsed().as_secs_f64();
        let (usr1, sys1) = cpu_times();
        let allocs = ALLOCS.load(Ordering::Relaxed) - allocs0;
        let (usr, sys) = (usr1 - usr0, sys1 - sys0);
        let gib = total as f64 / (1u64 << 30) as f64;
        let requests = (total / rs).max(1) as f64;
        let allocs_per_req = allocs as f64 / requests;
        let st = lp.nbd.io_stats();
        let sum = |s: &nbd_mio::IoStats| {
            s.reads + s.reads_blocked + s.writes + s.writes_blocked + s.waits
        };
        let calls = sum(&st) - sum(&stats0) + (lp.polls - polls0);
        let op = if o.write { "write" } else { "read" };
        if o.json {
            println!(
                "{{\"client\":\"nbd-mio\",\"op\":\"{op}\",\"request_size\":{rs},\
                 \"queue_depth\":{depth},\"bytes\":{total},\"iteration\":{iteration},\
                 \"secs\":{secs:.6},\"gib_per_s\":{:.4},\"user_s\":{usr:.4},\
                 \"sys_s\":{sys:.4},\"cpu_s_per_gib\":{:.4},\"connect_s\":{t_conn:.6},\
                 \"structured\":{},\"pread_initialize\":0,\
                 \"allocs_per_req\":{allocs_per_req:.4},\"syscalls_per_req\":{:.3}}}",
                gib / secs,
                (usr + sys) / gib,
                u8::from(structured),
                calls as f64 / requests,
            );
        } else {
            println!(
                "{op} rs={rs} qd={depth} bytes={total} secs={secs:.3} GiB/s={:.3} \
                 usr={usr:.3} sys={sys:.3} cpu_s_per_GiB={:.3}",
                gib / secs,
                (usr + sys) / gib,
            );
            let per = |now: u64, then: u64| (now - then) as f64 / requests;
            eprintln!(
                "allocs_per_req={allocs_per_req:.4} allocs={allocs} requests={requests} \
                 syscalls_per_req={:.3} (per request: reads {:.2}, empty reads {:.2}, \
                 writes {:.2}, partial {:.2}, full {:.2}, polls {:.2}, registry {:.2})",
                calls as f64 / requests,
                per(st.reads, stats0.reads),
                per(st.reads_blocked, stats0.reads_blocked),
                per(st.writes, stats0.writes),
                per(st.partial_writes, stats0.partial_writes),
                per(st.writes_blocked, stats0.writes_blocked),
                per(lp.polls, polls0),
                per(st.waits, stats0.waits),
            );
        }
    }

    // Orderly end: NBD_CMD_DISC, then wait for the server to close.
    if let Err(e) = lp.nbd.disconnect() {
        die(e);
    }
    loop {
        match lp.nbd.poll_event() {
            Some(Event::Closed(r)) if r.is_clean() => break,
            Some(Event::Closed(r)) => die(r),
            Some(_) => {}
            None => lp.turn(),
        }
    }
}
