//! aio-bench-tokio: sequential read or write throughput over ONE NBD
//! connection with a fixed queue depth, on nbd-tokio. The same flags,
//! workload and output as nbd-mio's `aio-bench` (and so libnbd's
//! `libnbd-aio-bench.c`), so `bench/compare.py` can race it
//! (`NBD_RS_B=target/release/examples/aio-bench-tokio`):
//!
//! - one connection, the default handshake (structured replies requested
//!   unless `-S`, no meta context, no TLS), on a current-thread runtime;
//! - the byte range `[0, TOTAL)` cut into REQSIZE requests issued in
//!   ascending offset order (a shared counter), wrapping around the export;
//! - DEPTH worker tasks, each with one buffer allocated and touched before
//!   timing, each issuing its next request as its previous one completes:
//!   at most DEPTH in flight. Reads move the worker's `BytesMut` into the
//!   core and get it back filled; writes send a clone of the worker's
//!   `Bytes` (a reference count, no copy) holding `0xa5 ^ worker`;
//! - the clock runs from the first request to the last reply.
//!
//! ```text
//! aio-bench-tokio [-w] [-r REQSIZE] [-q DEPTH] [-n TOTAL] [-i ITER] [-S] [-I] [-V] [-j] [-T SECONDS] URI
//! ```
//!
//! Output, as aio-bench: `read rs=262144 qd=16 bytes=1073741824 secs=0.412
//! GiB/s=2.427 usr=0.101 sys=0.297 cpu_s_per_GiB=0.398`; with `-j` one JSON
//! object per iteration (`"client":"nbd-tokio"`). A counting global
//! allocator reports the heap allocations per request of the timed phase
//! (`allocs_per_req`: 0 expected once each worker's reply slot exists), and the
//! socket calls per request (`syscalls_per_req`: reads, empty reads,
//! writes, full writes; tokio's epoll waits are not counted).

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::exit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nbd_tokio::{Client, CmdFlags, Config};
use tokio::sync::{mpsc, watch};

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
    let prog = args
        .first()
        .map_or("aio-bench-tokio", String::as_str)
        .to_owned();
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

/// What the workers share.
struct Shared {
    next: AtomicU64,
    rs: u64,
    size: u64,
    write: bool,
    verify: bool,
    failed: AtomicBool,
}

/// One worker: waits for an iteration's start (its total), then issues
/// requests until the range is used up, and reports the first error.
async fn worker(
    nbd: Client,
    sh: Arc<Shared>,
    mut rbuf: BytesMut,
    wbuf: Bytes,
    mut start: watch::Receiver<u64>,
    done: mpsc::Sender<Option<String>>,
) {
    while start.changed().await.is_ok() {
        let total = *start.borrow_and_update();
        let mut err = None;
        loop {
            let n = sh.next.fetch_add(sh.rs, Ordering::Relaxed);
            if n >= total || sh.failed.load(Ordering::Relaxed) {
                break;
            }
            let off = n % sh.size;
            let r = if sh.write {
                nbd.write(off, wbuf.clone(), CmdFlags::empty()).await
            } else {
                match nbd
                    .read(off, std::mem::take(&mut rbuf), CmdFlags::empty())
                    .await
                {
                    Ok(b) => {
                        rbuf = b;
                        if sh.verify {
                            check_pattern(&rbuf, off);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = r {
                sh.failed.store(true, Ordering::Relaxed);
                err = Some(format!("request failed: {e}"));
                break;
            }
        }
        if done.send(err).await.is_err() {
            return;
        }
    }
}

fn main() {
    let o = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(format!("runtime: {e}")));
    rt.block_on(run(o));
}

async fn run(o: Opts) {
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
    let (nbd, task) = Client::connect_uri(&o.uri, cfg)
        .await
        .unwrap_or_else(|e| die(format!("{}: {e}", o.uri)));
    let task = tokio::spawn(task);
    let t_conn = t_conn0.elapsed().as_secs_f64();
    let info = nbd.export_info().unwrap_or_else(|| die("no export info"));

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

    let sh = Arc::new(Shared {
        next: AtomicU64::new(0),
        rs,
        size,
        write: o.write,
        verify: o.verify,
        failed: AtomicBool::new(false),
    });
    // The workers and their buffers, non-zero and touched now so that
    // page faults (and task spawns) are not timed.
    let (start_tx, _) = watch::channel(0u64);
    let (done_tx, mut done_rx) = mpsc::channel(depth);
    for i in 0..depth {
        let fill = 0xa5 ^ i as u8;
        let (rbuf, wbuf) = if o.write {
            let wbuf = Bytes::from(vec![fill; rs as usize]);
            // The first clone of a Vec-backed Bytes moves it to shared
            // storage (one allocation): do it now, not in the timed loop.
            drop(wbuf.clone());
            (BytesMut::new(), wbuf)
        } else {
            let mut rbuf = BytesMut::zeroed(rs as usize);
            rbuf.fill(fill);
            (rbuf, Bytes::new())
        };
        tokio::spawn(worker(
            nbd.clone(),
            sh.clone(),
            rbuf,
            wbuf,
            start_tx.subscribe(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);
    tokio::task::yield_now().await; // the workers wait for the start
    let structured = nbd.structured_replies_negotiated();

    for iteration in 0..o.iterations {
        sh.next.store(0, Ordering::Relaxed);
        let stats0 = nbd.io_stats();

        let allocs0 = ALLOCS.load(Ordering::Relaxed);
        let (usr0, sys0) = cpu_times();
        let t0 = Instant::now();

        start_tx.send_replace(total);
        let mut first_error = None;
        for _ in 0..depth {
            match done_rx.recv().await {
                Some(e) => {
                    if first_error.is_none() {
                        first_error = e;
                    }
                }
                None => die("a worker ended"),
            }
        }

        let secs = t0.elapsed().as_secs_f64();
        let (usr1, sys1) = cpu_times();
        let allocs = ALLOCS.load(Ordering::Relaxed) - allocs0;
        if let Some(e) = first_error {
            die(e);
        }
        let (usr, sys) = (usr1 - usr0, sys1 - sys0);
        let gib = total as f64 / (1u64 << 30) as f64;
        let requests = (total / rs).max(1) as f64;
        let allocs_per_req = allocs as f64 / requests;
        let st = nbd.io_stats();
        let sum = |s: &nbd_tokio::IoStats| s.reads + s.reads_blocked + s.writes + s.writes_blocked;
        let calls = sum(&st) - sum(&stats0);
        let op = if o.write { "write" } else { "read" };
        if o.json {
            println!(
                "{{\"client\":\"nbd-tokio\",\"op\":\"{op}\",\"request_size\":{rs},\
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
                 writes {:.2}, partial {:.2}, full {:.2})",
                calls as f64 / requests,
                per(st.reads, stats0.reads),
                per(st.reads_blocked, stats0.reads_blocked),
                per(st.writes, stats0.writes),
                per(st.partial_writes, stats0.partial_writes),
                per(st.writes_blocked, stats0.writes_blocked),
            );
        }
    }

    // Orderly end: NBD_CMD_DISC, then the server's close.
    drop(start_tx);
    if let Err(e) = nbd.disconnect().await {
        die(e);
    }
    match task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => die(e),
        Err(e) => die(e),
    }
}
