//! `nbd copy`: nbdcopy's parallel, sparse-aware copy between NBD exports,
//! files, block devices, standard input/output and `null:`.
//!
//! Each worker thread owns one connection per NBD side (more than one
//! worker only where every NBD side advertises multi-conn) and runs its
//! own mio loop over them: up to `-R` requests in flight, reads landing in
//! buffers of a fixed pool (at most `--queue-size` bytes per worker),
//! written out with no copy (the read buffer is frozen into `Bytes`, and
//! taken back once the write completed), so nothing is allocated per
//! request. Workers take 128 MiB ranges of the source from a shared
//! counter. Holes and zero extents of the source (block status on NBD,
//! `SEEK_DATA`/`SEEK_HOLE` on files) and runs of zero blocks found in the
//! data (`-S`) are not copied but zeroed on the destination (write zeroes,
//! hole punching), or skipped when it is known to be zero.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_mio::mio::{Events, Poll, Token};
use nbd_mio::{CmdFlags, Config, Cookie, Event, NbdConnection};

use crate::common::{
    apply_timeout, fail, parse_size, split_items, Context, Fail, Item, Res, Server,
};

/// Arguments of `nbd copy` (those of nbdcopy).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "SOURCE and DESTINATION are each an NBD URI, a file or block device, \
- (standard input or output), or [ CMD ARGS ... ] (after --); DESTINATION may be null:."
)]
pub struct Args {
    /// Most NBD connections per side (used only if every NBD side has multi-conn).
    #[arg(short = 'C', long, default_value_t = 4, value_name = "N")]
    connections: usize,
    /// Accepted for compatibility: one worker thread runs per connection.
    #[arg(short = 'T', long, value_name = "N")]
    threads: Option<usize>,
    /// Most requests in flight per connection.
    #[arg(short = 'R', long, default_value_t = 64, value_name = "N")]
    requests: usize,
    /// Size of each read and write (a power of two, at most 32M).
    #[arg(long, value_name = "N", value_parser = parse_size, default_value = "256K")]
    request_size: u64,
    /// Most bytes of reads in flight per connection.
    #[arg(long, value_name = "N", value_parser = parse_size, default_value = "16M")]
    queue_size: u64,
    /// Detect all-zero blocks of N bytes and make them sparse (0: off; default
    /// 4096 or the destination's preferred block size).
    #[arg(short = 'S', long, value_name = "N", value_parser = parse_size)]
    sparse: Option<u64>,
    /// Make the destination fully allocated.
    #[arg(long)]
    allocated: bool,
    /// Assume the destination is already zero: skip zero regions.
    #[arg(long, alias = "target-is-zero")]
    destination_is_zero: bool,
    /// Flush the destination at the end.
    #[arg(long)]
    flush: bool,
    /// Ignore the source's extents (read everything).
    #[arg(long)]
    no_extents: bool,
    /// Show progress: a bar on a terminal, else "N/100" lines (to FD if given).
    #[arg(short = 'p', long, value_name = "FD", num_args = 0..=1, require_equals = true,
          default_missing_value = "")]
    progress: Option<String>,
    /// One request at a time, in order.
    #[arg(long)]
    synchronous: bool,
    /// Accepted for compatibility.
    #[arg(short = 'v', long, hide = true)]
    verbose: bool,
    /// Give up if connecting or any request takes longer than SECONDS.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// SOURCE DESTINATION.
    #[arg(value_name = "SOURCE DESTINATION", num_args = 0..)]
    items: Vec<String>,
}

/// Bytes of the source one worker takes at a time.
const RANGE: u64 = 128 << 20;
/// Largest write-zeroes or punch-hole request.
const ZERO_MAX: u64 = 1 << 30;
/// `NBD_STATE_HOLE | NBD_STATE_ZERO`: the zero bit of base:allocation.
const STATE_ZERO: u64 = 2;

enum Spec {
    Nbd(Server),
    Path(PathBuf),
    Stdio,
    Null,
}

fn spec(item: Item, dest: bool) -> Res<Spec> {
    Ok(match item {
        Item::Command(argv) => Spec::Nbd(Server::Command(argv)),
        Item::Word(w) if w == "-" => Spec::Stdio,
        Item::Word(w) if w == "null:" => {
            if !dest {
                return fail("null: can only be the destination");
            }
            Spec::Null
        }
        Item::Word(w) if nbd_mio::nbd_core::uri::is_nbd_uri(&w) => Spec::Nbd(Server::Uri(w)),
        Item::Word(w) => Spec::Path(PathBuf::from(w)),
    })
}

/// Where the data comes from.
enum Reader {
    Nbd(Box<NbdConnection>),
    File(Arc<File>, bool),
    Stream(Box<dyn Read + Send>),
}

/// Where it goes.
enum Writer {
    Nbd(Box<NbdConnection>),
    File(Arc<File>),
    Stream(Box<dyn Write + Send>),
    Null,
}

fn mio_connect(server: &Server, cfg: Config) -> Res<NbdConnection> {
    let mut c = match server {
        Server::Uri(u) => NbdConnection::connect_uri(u, cfg).ctx(u)?,
        Server::Command(argv) => {
            NbdConnection::connect_systemd_socket_activation(argv, cfg).ctx(server.describe())?
        }
    };
    let what = server.describe();
    let mut poll = Poll::new().ctx("poll")?;
    let mut events = Events::with_capacity(8);
    c.register(poll.registry(), Token(0)).ctx(&what)?;
    'outer: loop {
        let t = nbd_mio::poll_timeout_until(c.poll_timeout());
        match poll.poll(&mut events, t) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).ctx("poll"),
        }
        for ev in events.iter() {
            c.handle_event(ev);
        }
        c.handle_timeout(Instant::now());
        while let Some(ev) = c.poll_event() {
            match ev {
                Event::GoSucceeded(_) => break 'outer,
                Event::Closed(r) => return fail(format!("{what}: {r}")),
                _ => {}
            }
        }
    }
    c.deregister(poll.registry()).ctx(&what)?;
    Ok(c)
}

fn block_device_size(f: &File) -> Res<u64> {
    rustix::fs::seek(f, rustix::fs::SeekFrom::End(0)).ctx("seek to the end of the device")
}

/// Runs `nbd copy`.
pub fn run(a: Args) -> Res {
    let items = split_items(&a.items)?;
    if items.len() != 2 {
        return fail("expected SOURCE and DESTINATION (see --help)");
    }
    let mut it = items.into_iter();
    let src_spec = spec(it.next().unwrap_or(Item::Word(String::new())), false)?;
    let dst_spec = spec(it.next().unwrap_or(Item::Word(String::new())), true)?;

    if !a.request_size.is_power_of_two() || a.request_size < 512 || a.request_size > 32 << 20 {
        return fail("--request-size: must be a power of two from 512 to 32M");
    }
    if a.requests == 0 || a.connections == 0 {
        return fail("-R and -C must be at least 1");
    }
    let mut cfg = Config::default();
    apply_timeout(&mut cfg, a.timeout)?;
    let stream_side = matches!(src_spec, Spec::Stdio) || matches!(dst_spec, Spec::Stdio);
    let synchronous = a.synchronous || stream_side;

    // --- open the sides (the first connection of each NBD side) ---
    let mut src_cfg = cfg.clone();
    if !a.no_extents {
        src_cfg.meta_contexts = vec!["base:allocation".into()];
    }
    let (src0, src_size, src_server): (Reader, Option<u64>, Option<Server>) = match &src_spec {
        Spec::Nbd(s) => {
            let c = mio_connect(s, src_cfg.clone())?;
            let size = c.conn().export_info().map(|i| i.size).unwrap_or(0);
            (Reader::Nbd(Box::new(c)), Some(size), Some(s.clone()))
        }
        Spec::Path(p) => {
            let f = OpenOptions::new().read(true).open(p).ctx(p.display())?;
            let ft = f.metadata().ctx(p.display())?.file_type();
            if ft.is_file() {
                let size = f.metadata().ctx(p.display())?.len();
                (Reader::File(Arc::new(f), true), Some(size), None)
            } else if ft.is_block_device() {
                let size = block_device_size(&f)?;
                (Reader::File(Arc::new(f), false), Some(size), None)
            } else {
                (Reader::Stream(Box::new(f)), None, None)
            }
        }
        Spec::Stdio => (Reader::Stream(Box::new(std::io::stdin())), None, None),
        Spec::Null => return fail("null: can only be the destination"),
    };
    let src_stream = matches!(src0, Reader::Stream(_));
    let synchronous = synchronous || src_stream;

    let mut dest_zero = a.destination_is_zero;
    let (dst0, dst_server, dst_file): (Writer, Option<Server>, Option<Arc<File>>) = match &dst_spec
    {
        Spec::Nbd(s) => {
            let c = mio_connect(s, cfg.clone())?;
            let info = c.conn().export_info().cloned().unwrap_or_default();
            if info.is_read_only() {
                return fail(format!("{}: the destination is read-only", s.describe()));
            }
            if let Some(n) = src_size {
                if info.size < n {
                    return fail(format!(
                        "destination size ({}) is smaller than source size ({n})",
                        info.size
                    ));
                }
            }
            (Writer::Nbd(Box::new(c)), Some(s.clone()), None)
        }
        Spec::Path(p) => {
            let exists = std::fs::metadata(p).ok();
            let is_block = exists
                .as_ref()
                .is_some_and(|m| m.file_type().is_block_device());
            let is_regular = exists.as_ref().is_none_or(|m| m.file_type().is_file());
            if is_regular {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .open(p)
                    .ctx(p.display())?;
                if let Some(n) = src_size {
                    f.set_len(n).ctx(p.display())?;
                }
                // A fresh, truncated file reads as zeroes everywhere.
                dest_zero = true;
                let f = Arc::new(f);
                (Writer::File(f.clone()), None, Some(f))
            } else if is_block {
                let f = OpenOptions::new().write(true).open(p).ctx(p.display())?;
                let size = block_device_size(&f)?;
                if let Some(n) = src_size {
                    if size < n {
                        return fail(format!(
                            "destination size ({size}) is smaller than source size ({n})"
                        ));
                    }
                }
                let f = Arc::new(f);
                (Writer::File(f.clone()), None, Some(f))
            } else {
                let f = OpenOptions::new().write(true).open(p).ctx(p.display())?;
                (Writer::Stream(Box::new(f)), None, None)
            }
        }
        Spec::Stdio => (Writer::Stream(Box::new(std::io::stdout())), None, None),
        Spec::Null => (Writer::Null, None, None),
    };
    let dst_stream = matches!(dst0, Writer::Stream(_));
    let synchronous = synchronous || dst_stream;

    // --- request size, sparseness, connections ---
    let mut req = a.request_size;
    let mut dst_pref = 4096u64;
    for c in [reader_conn(&src0), writer_conn(&dst0)]
        .into_iter()
        .flatten()
    {
        let max = c.conn().payload_max().max(512);
        while req > max && req > 512 {
            req /= 2;
        }
        if let Some(b) = c.conn().export_info().and_then(|i| i.block_size) {
            req = req.max(u64::from(b.minimum));
        }
    }
    if let Some(c) = writer_conn(&dst0) {
        if let Some(b) = c.conn().export_info().and_then(|i| i.block_size) {
            dst_pref = dst_pref.max(u64::from(b.preferred));
        }
    }
    let sparse = if a.allocated || dst_stream {
        0
    } else {
        a.sparse.unwrap_or(dst_pref)
    };
    let extents = !a.no_extents && !dst_stream;

    let mut conns = if synchronous { 1 } else { a.connections };
    for c in [reader_conn(&src0), writer_conn(&dst0)]
        .into_iter()
        .flatten()
    {
        if !c.conn().export_info().is_some_and(|i| i.can_multi_conn()) {
            conns = 1;
        }
    }
    if matches!(src_server, Some(Server::Command(_)))
        || matches!(dst_server, Some(Server::Command(_)))
    {
        conns = 1;
    }
    if let Some(t) = a.threads.filter(|&t| t > 0) {
        conns = conns.min(t);
    }
    let requests = if synchronous { 1 } else { a.requests };
    let buffers = requests.min((a.queue_size / req).max(1) as usize);

    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        end: src_size.unwrap_or(u64::MAX),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let plan = Plan {
        req: req as usize,
        buffers,
        requests,
        sparse: sparse as usize,
        allocated: a.allocated,
        dest_zero,
        extents,
        flush: a.flush,
    };

    // --- progress ---
    let progress = match &a.progress {
        None => None,
        Some(fd) => Some(Progress::start(fd, src_size, shared.clone())?),
    };

    // --- the workers ---
    let src_file = match &src0 {
        Reader::File(f, reg) => Some((f.clone(), *reg)),
        _ => None,
    };
    let mut handles = Vec::new();
    let mut first = Some((src0, dst0));
    let mut result: Result<(), String> = Ok(());
    for _ in 0..conns {
        let pair = match first.take() {
            Some(p) => Ok(p),
            None => more_sides(
                &src_server,
                &src_file,
                &src_cfg,
                &dst_server,
                &dst_file,
                &dst_spec,
                &cfg,
            ),
        };
        let (r, w) = match pair {
            Ok(p) => p,
            Err(Fail(m)) => {
                result = Err(m);
                break;
            }
        };
        let shared = shared.clone();
        let plan = plan.clone();
        handles.push(std::thread::spawn(move || {
            let mut w = Worker::new(r, w, plan, shared.clone());
            let r = w.run();
            if r.is_err() {
                shared.stop.store(true, Ordering::SeqCst);
            }
            r
        }));
    }
    if result.is_err() {
        shared.stop.store(true, Ordering::SeqCst);
    }
    for h in handles {
        let r = h
            .join()
            .unwrap_or_else(|_| Err("a copy worker panicked".into()));
        if result.is_ok() {
            result = r;
        }
    }
    if result.is_ok() && a.flush {
        if let Some(f) = &dst_file {
            result = f.sync_all().map_err(|e| format!("flush: {e}"));
        }
    }
    if let Some(p) = progress {
        p.finish(result.is_ok());
    }
    match result {
        Ok(()) => Ok(0),
        Err(m) if m.is_empty() => fail("copy stopped"),
        Err(m) => fail(m),
    }
}

/// The sides of one more worker (multi-conn).
fn more_sides(
    src_server: &Option<Server>,
    src_file: &Option<(Arc<File>, bool)>,
    src_cfg: &Config,
    dst_server: &Option<Server>,
    dst_file: &Option<Arc<File>>,
    dst_spec: &Spec,
    cfg: &Config,
) -> Res<(Reader, Writer)> {
    let r = match (src_server, src_file) {
        (Some(s), _) => Reader::Nbd(Box::new(mio_connect(s, src_cfg.clone())?)),
        (None, Some((f, reg))) => Reader::File(f.clone(), *reg),
        _ => return fail("internal error: a stream source with several workers"),
    };
    let w = match (dst_server, dst_file, dst_spec) {
        (Some(s), _, _) => Writer::Nbd(Box::new(mio_connect(s, cfg.clone())?)),
        (None, Some(f), _) => Writer::File(f.clone()),
        (None, None, Spec::Null) => Writer::Null,
        _ => return fail("internal error: a stream destination with several workers"),
    };
    Ok((r, w))
}

fn reader_conn(r: &Reader) -> Option<&NbdConnection> {
    match r {
        Reader::Nbd(c) => Some(c),
        _ => None,
    }
}

fn writer_conn(w: &Writer) -> Option<&NbdConnection> {
    match w {
        Writer::Nbd(c) => Some(c),
        _ => None,
    }
}

/// What every worker shares.
struct Shared {
    /// Start of the next range to take.
    next: AtomicU64,
    /// End of the source (`u64::MAX`: a stream, until its end).
    end: u64,
    /// Bytes copied so far.
    done: AtomicU64,
    /// Set when a worker failed: the others stop.
    stop: AtomicBool,
}

#[derive(Clone)]
struct Plan {
    req: usize,
    buffers: usize,
    requests: usize,
    sparse: usize,
    allocated: bool,
    dest_zero: bool,
    extents: bool,
    flush: bool,
}

enum Op {
    Read(usize),
    Write(usize),
    Zero,
    BlockStatus,
    Flush,
}

struct Slot {
    buf: Option<BytesMut>,
    frozen: Option<Bytes>,
    off: u64,
    len: u64,
    pending: u32,
}

const SRC: Token = Token(0);
const DST: Token = Token(1);

struct Worker {
    src: Reader,
    dst: Writer,
    plan: Plan,
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    src_ops: HashMap<Cookie, Op>,
    dst_ops: HashMap<Cookie, Op>,
    /// Work not yet submitted: (offset, length, reads as zero).
    extents: VecDeque<(u64, u64, bool)>,
    pos: u64,
    range_end: u64,
    bs: Option<(Cookie, u64)>,
    no_more: bool,
    error: Option<String>,
    zeroes: Bytes,
    base_id: Option<u32>,
    /// The destination takes NBD_CMD_WRITE_ZEROES.
    dst_can_zero: bool,
}

impl Worker {
    fn new(src: Reader, dst: Writer, plan: Plan, shared: Arc<Shared>) -> Worker {
        let slots = (0..plan.buffers)
            .map(|_| Slot {
                buf: Some(BytesMut::zeroed(plan.req)),
                frozen: None,
                off: 0,
                len: 0,
                pending: 0,
            })
            .collect();
        let base_id = reader_conn(&src).and_then(|c| c.conn().meta_context_id("base:allocation"));
        let n = plan.requests * 2 + 8;
        let dst_can_zero =
            writer_conn(&dst).is_some_and(|c| c.conn().export_info().is_some_and(|i| i.can_zero()));
        Worker {
            dst_can_zero,
            free: (0..plan.buffers).rev().collect(),
            slots,
            src_ops: HashMap::with_capacity(n),
            dst_ops: HashMap::with_capacity(n),
            extents: VecDeque::with_capacity(1024),
            pos: 0,
            range_end: 0,
            bs: None,
            no_more: false,
            error: None,
            zeroes: Bytes::new(),
            base_id,
            src,
            dst,
            plan,
            shared,
        }
    }

    fn set_error(&mut self, m: String) {
        if self.error.is_none() {
            self.error = Some(m);
        }
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    fn in_flight(&self) -> bool {
        !self.src_ops.is_empty() || !self.dst_ops.is_empty()
    }

    fn run(&mut self) -> Result<(), String> {
        let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let mut events = Events::with_capacity(64);
        if let Reader::Nbd(c) = &mut self.src {
            c.register(poll.registry(), SRC)
                .map_err(|e| format!("register: {e}"))?;
        }
        if let Writer::Nbd(c) = &mut self.dst {
            c.register(poll.registry(), DST)
                .map_err(|e| format!("register: {e}"))?;
        }
        let mut flushed = false;
        loop {
            if self.error.is_none() && self.shared.stop.load(Ordering::Relaxed) {
                self.error = Some(String::new());
            }
            if self.error.is_none() {
                if let Err(m) = self.submit() {
                    self.set_error(m);
                }
            }
            if !self.in_flight() {
                let finished = self.no_more && self.extents.is_empty();
                if self.error.is_some() || !finished {
                    if self.error.is_none() {
                        self.set_error("internal error: the copy stalled".into());
                    }
                    break;
                }
                if self.plan.flush && !flushed {
                    flushed = true;
                    if let Writer::Nbd(c) = &mut self.dst {
                        if c.conn().export_info().is_some_and(|i| i.can_flush()) {
                            match c.flush_command(CmdFlags::empty()) {
                                Ok(k) => {
                                    self.dst_ops.insert(k, Op::Flush);
                                }
                                Err(e) => self.set_error(format!("flush: {e}")),
                            }
                            continue;
                        }
                    }
                }
                break;
            }
            let deadline = [
                reader_conn_mut(&mut self.src),
                writer_conn_mut(&mut self.dst),
            ]
            .into_iter()
            .flatten()
            .filter_map(|c| c.poll_timeout())
            .min();
            match poll.poll(&mut events, nbd_mio::poll_timeout_until(deadline)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            for ev in events.iter() {
                if ev.token() == SRC {
                    if let Reader::Nbd(c) = &mut self.src {
                        c.handle_event(ev);
                    }
                } else if let Writer::Nbd(c) = &mut self.dst {
                    c.handle_event(ev);
                }
            }
            let now = Instant::now();
            if let Reader::Nbd(c) = &mut self.src {
                c.handle_timeout(now);
            }
            if let Writer::Nbd(c) = &mut self.dst {
                c.handle_timeout(now);
            }
            self.drain();
        }
        self.goodbye(&mut poll, &mut events);
        match self.error.take() {
            None => Ok(()),
            Some(m) if m.is_empty() => Err(String::new()),
            Some(m) => Err(m),
        }
    }

    /// Disconnects the NBD sides politely (bounded wait).
    fn goodbye(&mut self, poll: &mut Poll, events: &mut Events) {
        let clean = self.error.is_none();
        for c in [
            reader_conn_mut(&mut self.src),
            writer_conn_mut(&mut self.dst),
        ]
        .into_iter()
        .flatten()
        {
            if !clean {
                c.abort("copy failed");
            } else if c.disconnect().is_err() {
                c.abort("copy done");
            }
        }
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let mut open = false;
            for c in [
                reader_conn_mut(&mut self.src),
                writer_conn_mut(&mut self.dst),
            ]
            .into_iter()
            .flatten()
            {
                while c.poll_event().is_some() {}
                open |= !c.is_finished();
            }
            if !open || Instant::now() >= until {
                break;
            }
            let _ = poll.poll(events, Some(Duration::from_millis(100)));
            for ev in events.iter() {
                if ev.token() == SRC {
                    if let Reader::Nbd(c) = &mut self.src {
                        c.handle_event(ev);
                    }
                } else if let Writer::Nbd(c) = &mut self.dst {
                    c.handle_event(ev);
                }
            }
        }
    }

    fn drain(&mut self) {
        loop {
            let ev = match &mut self.src {
                Reader::Nbd(c) => c.poll_event(),
                _ => None,
            };
            let Some(ev) = ev else { break };
            self.on_src_event(ev);
        }
        loop {
            let ev = match &mut self.dst {
                Writer::Nbd(c) => c.poll_event(),
                _ => None,
            };
            let Some(ev) = ev else { break };
            self.on_dst_event(ev);
        }
    }

    fn on_src_event(&mut self, ev: Event) {
        match ev {
            Event::BlockStatus {
                cookie,
                context_id,
                extents,
            } => {
                if let Some((k, start)) = self.bs {
                    if k == cookie && Some(context_id) == self.base_id {
                        let mut off = start;
                        for e in extents {
                            if off >= self.range_end || e.length == 0 {
                                break;
                            }
                            let len = e.length.min(self.range_end - off);
                            self.push_extent(off, len, e.flags & STATE_ZERO != 0);
                            off += len;
                        }
                        self.pos = self.pos.max(off);
                    }
                }
            }
            Event::CommandDone {
                cookie,
                result,
                buffer,
            } => match self.src_ops.remove(&cookie) {
                Some(Op::Read(slot)) => {
                    let buf = buffer.unwrap_or_default();
                    match result {
                        Ok(()) => {
                            if let Err(m) = self.got_data(slot, buf) {
                                self.set_error(m);
                            }
                        }
                        Err(e) => {
                            self.slots[slot].buf = Some(buf);
                            self.free.push(slot);
                            let off = self.slots[slot].off;
                            self.set_error(format!("read at offset {off}: {e}"));
                        }
                    }
                }
                Some(Op::BlockStatus) => {
                    if let Some((_, start)) = self.bs.take() {
                        if self.pos <= start {
                            // No usable answer: copy the range as data.
                            let len = self.range_end - start;
                            self.push_extent(start, len, false);
                            self.pos = self.range_end;
                        }
                    }
                }
                _ => {}
            },
            Event::Closed(r) => {
                if self.in_flight() || !self.no_more {
                    self.set_error(format!("source: {r}"));
                }
                self.src_ops.clear();
            }
            _ => {}
        }
    }

    fn on_dst_event(&mut self, ev: Event) {
        match ev {
            Event::CommandDone { cookie, result, .. } => {
                let op = self.dst_ops.remove(&cookie);
                if let Err(e) = result {
                    let what = match op {
                        Some(Op::Flush) => "flush".to_string(),
                        Some(Op::Zero) => "zero".to_string(),
                        Some(Op::Write(s)) => format!("write at offset {}", self.slots[s].off),
                        _ => "command".to_string(),
                    };
                    self.set_error(format!("{what}: {e}"));
                }
                if let Some(Op::Write(slot)) = op {
                    self.slots[slot].pending -= 1;
                    if self.slots[slot].pending == 0 {
                        self.retire(slot);
                    }
                }
            }
            Event::Closed(r) => {
                if !self.dst_ops.is_empty()
                    || !self.no_more
                    || self.error.is_none() && self.in_flight()
                {
                    self.set_error(format!("destination: {r}"));
                }
                self.dst_ops.clear();
            }
            _ => {}
        }
    }

    fn push_extent(&mut self, off: u64, len: u64, zero: bool) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.extents.back_mut() {
            if last.2 == zero && last.0 + last.1 == off {
                last.1 += len;
                return;
            }
        }
        self.extents.push_back((off, len, zero));
    }

    /// Finds the extents of the next part of the source; false if there is
    /// nothing to do now (the end, or waiting for block status).
    fn next_extents(&mut self) -> Result<bool, String> {
        if self.pos >= self.range_end {
            if self.no_more || self.shared.stop.load(Ordering::Relaxed) {
                self.no_more = true;
                return Ok(false);
            }
            let start = self.shared.next.fetch_add(RANGE, Ordering::SeqCst);
            if start >= self.shared.end {
                self.no_more = true;
                return Ok(false);
            }
            self.pos = start;
            self.range_end = start.saturating_add(RANGE).min(self.shared.end);
        }
        let (pos, end) = (self.pos, self.range_end);
        match &mut self.src {
            Reader::Nbd(c) if self.plan.extents && self.base_id.is_some() => {
                let len = (end - pos).min(1 << 31);
                let k = c
                    .block_status(pos, len, CmdFlags::empty())
                    .map_err(|e| format!("block status: {e}"))?;
                self.src_ops.insert(k, Op::BlockStatus);
                self.bs = Some((k, pos));
                Ok(false)
            }
            Reader::File(f, true) if self.plan.extents => {
                let f = f.clone();
                file_extents(&f, pos, end, |o, l, z| self.push_extent(o, l, z));
                self.pos = end;
                Ok(true)
            }
            _ => {
                self.push_extent(pos, end - pos, false);
                self.pos = end;
                Ok(true)
            }
        }
    }

    fn dst_room(&self) -> bool {
        match &self.dst {
            Writer::Nbd(c) => self.dst_ops.len() < self.plan.requests && c.has_room(0),
            _ => true,
        }
    }

    fn submit(&mut self) -> Result<(), String> {
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let Some(&(off, len, zero)) = self.extents.front() else {
                if self.bs.is_some() || !self.next_extents()? {
                    return Ok(());
                }
                continue;
            };
            let n = if zero {
                if self.plan.dest_zero && !self.plan.allocated {
                    len
                } else {
                    if !self.dst_room() {
                        return Ok(());
                    }
                    let n = len.min(ZERO_MAX);
                    self.zero(off, n)?
                }
            } else {
                let Some(slot) = self.free.pop() else {
                    return Ok(());
                };
                let n = len.min(self.plan.req as u64);
                match self.read(slot, off, n)? {
                    Some(got) => got,
                    None => {
                        self.free.push(slot);
                        return Ok(());
                    }
                }
            };
            if zero {
                self.shared.done.fetch_add(n, Ordering::Relaxed);
            }
            let front = self.extents.front_mut().ok_or("internal error")?;
            if n >= front.1 {
                self.extents.pop_front();
            } else {
                front.0 += n;
                front.1 -= n;
            }
            if !zero && n < len.min(self.plan.req as u64) && matches!(self.src, Reader::Stream(_)) {
                // End of the stream.
                self.extents.clear();
                self.no_more = true;
                self.pos = u64::MAX;
                self.range_end = u64::MAX;
            }
        }
    }

    /// Starts (or does) the read of `n` bytes at `off` into `slot`; the
    /// number of bytes taken, `None` if there is no room now.
    fn read(&mut self, slot: usize, off: u64, n: u64) -> Result<Option<u64>, String> {
        let mut buf = self.slots[slot].buf.take().unwrap_or_default();
        buf.resize(n as usize, 0);
        self.slots[slot].off = off;
        match &mut self.src {
            Reader::Nbd(c) => {
                if !c.has_room(n) {
                    self.slots[slot].buf = Some(buf);
                    return Ok(None);
                }
                match c.read(off, buf, CmdFlags::empty()) {
                    Ok(k) => {
                        self.src_ops.insert(k, Op::Read(slot));
                        Ok(Some(n))
                    }
                    Err(r) => {
                        self.slots[slot].buf = Some(r.buffer);
                        Err(format!("read at offset {off}: {}", r.error))
                    }
                }
            }
            Reader::File(f, _) => {
                f.read_exact_at(&mut buf, off)
                    .map_err(|e| format!("read at offset {off}: {e}"))?;
                self.got_data(slot, buf)?;
                Ok(Some(n))
            }
            Reader::Stream(s) => {
                let mut got = 0;
                while got < buf.len() {
                    match s.read(&mut buf[got..]) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("read: {e}")),
                    }
                }
                buf.truncate(got);
                if got == 0 {
                    self.slots[slot].buf = Some(buf);
                    self.free.push(slot);
                    return Ok(Some(0));
                }
                self.got_data(slot, buf)?;
                Ok(Some(got as u64))
            }
        }
    }

    /// Data for `slot` arrived: write it out (its zero blocks as zeroes).
    fn got_data(&mut self, slot: usize, buf: BytesMut) -> Result<(), String> {
        let off = self.slots[slot].off;
        let n = buf.len();
        self.slots[slot].len = n as u64;
        let mut bytes = buf.freeze();
        self.slots[slot].frozen = Some(bytes.clone());
        self.slots[slot].pending = 0;
        let sparse = self.plan.sparse;
        if sparse > 0 && !matches!(self.dst, Writer::Stream(_)) {
            let mut i = 0;
            while i < n {
                let block_end = (i + sparse).min(n);
                let zero_run = is_zero(&bytes[i..block_end]);
                let mut j = block_end;
                while j < n {
                    let e = (j + sparse).min(n);
                    if is_zero(&bytes[j..e]) != zero_run {
                        break;
                    }
                    j = e;
                }
                if zero_run {
                    if !self.plan.dest_zero {
                        self.zero_all(off + i as u64, (j - i) as u64)?;
                    }
                } else {
                    self.write(slot, off + i as u64, bytes.slice(i..j))?;
                }
                i = j;
            }
        } else {
            self.write(slot, off, bytes)?;
            bytes = Bytes::new();
        }
        drop(bytes);
        if self.slots[slot].pending == 0 {
            self.retire(slot);
        }
        Ok(())
    }

    fn write(&mut self, slot: usize, off: u64, data: Bytes) -> Result<(), String> {
        match &mut self.dst {
            Writer::Nbd(c) => {
                let k = c
                    .write(off, data, CmdFlags::empty())
                    .map_err(|r| format!("write at offset {off}: {}", r.error))?;
                self.dst_ops.insert(k, Op::Write(slot));
                self.slots[slot].pending += 1;
            }
            Writer::File(f) => f
                .write_all_at(&data, off)
                .map_err(|e| format!("write at offset {off}: {e}"))?,
            Writer::Stream(s) => s.write_all(&data).map_err(|e| format!("write: {e}"))?,
            Writer::Null => {}
        }
        Ok(())
    }

    /// Zeroes `n` bytes at `off` on the destination now or in flight,
    /// whatever the in-flight limit (used for zero blocks found in data).
    fn zero_all(&mut self, mut off: u64, n: u64) -> Result<(), String> {
        let end = off + n;
        while off < end {
            off += self.zero(off, end - off)?;
        }
        Ok(())
    }

    /// Zeroes up to `n` bytes at `off`; returns how many were handled.
    fn zero(&mut self, off: u64, n: u64) -> Result<u64, String> {
        let allocated = self.plan.allocated;
        let req = self.plan.req as u64;
        match &mut self.dst {
            Writer::Null => Ok(n),
            Writer::Nbd(c) => {
                if self.dst_can_zero {
                    let n = n.min(ZERO_MAX);
                    let flags = if allocated {
                        CmdFlags::NO_HOLE
                    } else {
                        CmdFlags::empty()
                    };
                    let k = c
                        .write_zeroes(off, n, flags)
                        .map_err(|e| format!("zero at offset {off}: {e}"))?;
                    self.dst_ops.insert(k, Op::Zero);
                    Ok(n)
                } else {
                    let n = n.min(req);
                    if self.zeroes.len() < n as usize {
                        self.zeroes = Bytes::from(vec![0u8; req as usize]);
                    }
                    let k = c
                        .write(off, self.zeroes.slice(..n as usize), CmdFlags::empty())
                        .map_err(|r| format!("write at offset {off}: {}", r.error))?;
                    self.dst_ops.insert(k, Op::Zero);
                    Ok(n)
                }
            }
            Writer::File(f) => {
                let n = n.min(ZERO_MAX);
                let mode = if allocated {
                    rustix::fs::FallocateFlags::ZERO_RANGE
                } else {
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE
                };
                if rustix::fs::fallocate(&**f, mode, off, n).is_ok() {
                    return Ok(n);
                }
                let n = n.min(req);
                if self.zeroes.len() < n as usize {
                    self.zeroes = Bytes::from(vec![0u8; req as usize]);
                }
                f.write_all_at(&self.zeroes[..n as usize], off)
                    .map_err(|e| format!("write at offset {off}: {e}"))?;
                Ok(n)
            }
            Writer::Stream(s) => {
                let n = n.min(req);
                if self.zeroes.len() < n as usize {
                    self.zeroes = Bytes::from(vec![0u8; req as usize]);
                }
                s.write_all(&self.zeroes[..n as usize])
                    .map_err(|e| format!("write: {e}"))?;
                Ok(n)
            }
        }
    }

    /// Every write of `slot` completed: its buffer goes back to the pool.
    fn retire(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        self.shared.done.fetch_add(s.len, Ordering::Relaxed);
        let buf = match s.frozen.take().map(Bytes::try_into_mut) {
            Some(Ok(b)) => b,
            // Still shared (not expected): a new buffer.
            _ => BytesMut::zeroed(self.plan.req),
        };
        s.buf = Some(buf);
        self.free.push(slot);
    }
}

fn reader_conn_mut(r: &mut Reader) -> Option<&mut NbdConnection> {
    match r {
        Reader::Nbd(c) => Some(c),
        _ => None,
    }
}

fn writer_conn_mut(w: &mut Writer) -> Option<&mut NbdConnection> {
    match w {
        Writer::Nbd(c) => Some(c),
        _ => None,
    }
}

/// True if every byte is zero (16 bytes at a time).
fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .into_iter()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// The data and hole extents of a regular file in `[pos, end)`.
fn file_extents(f: &File, pos: u64, end: u64, mut push: impl FnMut(u64, u64, bool)) {
    use rustix::fs::{seek, SeekFrom};
    let mut p = pos;
    while p < end {
        let d = match seek(f, SeekFrom::Data(p)) {
            Ok(d) => d.min(end),
            Err(rustix::io::Errno::NXIO) => end,
            Err(_) => {
                push(p, end - p, false);
                return;
            }
        };
        if d > p {
            push(p, d - p, true);
        }
        if d >= end {
            return;
        }
        let h = match seek(f, SeekFrom::Hole(d)) {
            Ok(h) => h.min(end),
            Err(_) => end,
        };
        push(d, h - d, false);
        p = h;
    }
}

/// The progress display: a bar on a terminal, or libnbd's `N/100` lines.
struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(fd: &str, size: Option<u64>, shared: Arc<Shared>) -> Res<Progress> {
        enum Out {
            Bar(indicatif::ProgressBar),
            Lines(Box<dyn Write + Send>),
        }
        let mut out = if fd.is_empty() {
            if std::io::stderr().is_terminal() {
                let bar = indicatif::ProgressBar::new(size.unwrap_or(0));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:50} {percent:>3}% {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                Out::Bar(bar)
            } else {
                Out::Lines(Box::new(std::io::stderr()))
            }
        } else {
            let n: u32 = fd
                .parse()
                .map_err(|_| Fail(format!("--progress: not a file descriptor: {fd}")))?;
            let f = OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{n}"))
                .ctx(format!("--progress={n}"))?;
            Out::Lines(Box::new(f))
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = None;
            loop {
                let done = shared.done.load(Ordering::Relaxed);
                let ended = stop2.load(Ordering::SeqCst);
                match &mut out {
                    Out::Bar(b) => {
                        b.set_position(done);
                        if ended {
                            b.finish();
                        }
                    }
                    Out::Lines(w) => {
                        let pct = match size {
                            Some(0) | None => {
                                if ended {
                                    100
                                } else {
                                    0
                                }
                            }
                            Some(s) => (done.min(s) * 100 / s) as u32,
                        };
                        if last != Some(pct) {
                            let _ = writeln!(w, "{pct}/100");
                            let _ = w.flush();
                            last = Some(pct);
                        }
                    }
                }
                if ended {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Ok(Progress {
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self, _ok: bool) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
