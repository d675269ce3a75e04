//! Shared code of the nbd-core fuzz targets: the `state_machine` harness
//! ([`run_state_machine`]) and the scripted client ([`Driver`]) that both the
//! harness and the seed recorder (`examples/record_seeds.rs`) use, so that a
//! recorded server stream replays through exactly the same client actions.
//!
//! # Input format of `state_machine`
//! ```text
//! byte 0      setup flags (see Setup::from_header)
//! bytes 1..3  seed of the split generator; also: byte 2 bit 0 makes the
//!             client take its output in random partial amounts
//!             (transmit_front / transmit_slices + transmitted); byte 3 &
//!             0x0f bounds the sub-piece size (1 << n bytes; 0 = one byte at
//!             a time, 15 = whole frames); byte 3 bit 4 limits the client to
//!             3 requests in flight (the batch then waits for free slots);
//!             byte 3 bit 5 turns on time and cancellation (a virtual clock
//!             advanced 0-15 ms after every piece, `handle_timeout`, a 40 ms
//!             command and 200 ms handshake timeout, and `cancel` of a request in
//!             flight when the split generator says so); bit 6 makes a
//!             missed command deadline end the connection
//!             (`TimeoutPolicy::CloseConnection`); bit 7 calls `abort`
//!             after frame `byte 1 % 8`
//! then        frames: u16 big-endian length, then that many server bytes
//!             (the last frame may be cut short by the end of the input)
//! ```
//! A frame is what the server sent between two client actions (one socket
//! read when recorded). The client acts (drains output and events, issues
//! options or commands) after every frame and after every sub-piece inside a
//! frame, so a frame boundary is a point where the client may send something
//! the following bytes answer. Within a frame the sub-pieces are cut at
//! pseudo-random points derived from bytes 1..3, so every input also checks
//! that arbitrary splits are handled.
//!
//! After the last frame the harness reports EOF and checks the invariants
//! (see [`Driver`]).
//!
//! [`script`] is nbd-core's own test harness file
//! (`nbd-core/tests/common/script.rs`, included with `#[path]`): the server
//! byte builders the seed recorder uses and the two input paths, shared
//! with nbd-core's integration tests instead of copied.

use std::collections::BTreeSet;
use std::io::IoSlice;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_core::consts::cmd_flags;
use nbd_core::{
    CloseReason, CmdFlags, CommandError, Config, Connection, Cookie, Event, Limits, Phase, Strict,
    TimeoutPolicy, UsageError,
};

#[path = "../../nbd-core/tests/common/script.rs"]
pub mod script;

pub mod alloc_count;
pub mod checks;

/// Length of the input header of `state_machine`.
pub const HEADER_LEN: usize = 4;

/// Meta contexts the harness asks for.
pub const META_CONTEXTS: [&str; 1] = ["base:allocation"];

/// What the input header selects (byte 0, and byte 3 bit 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// Bit 0: option mode (the driver calls opt_* while negotiating).
    pub opt_mode: bool,
    /// Bit 1 clear: ask for extended headers.
    pub extended_headers: bool,
    /// Bit 2: ask for NBD_INFO_NAME and NBD_INFO_DESCRIPTION.
    pub full_info: bool,
    /// Bit 3: feed input through recv_buf/recv_commit instead of handle_input.
    pub recv_path: bool,
    /// Bit 4 clear: ask for structured replies.
    pub structured_replies: bool,
    /// Bit 5 clear: ask for NBD_INFO_BLOCK_SIZE.
    pub block_size: bool,
    /// Bit 6: name the export "exp" instead of the default "".
    pub named_export: bool,
    /// Bit 7: commands at offsets near `u64::MAX` (some wrap around), which
    /// only strict mode off lets through.
    pub hostile_offsets: bool,
    /// Byte 3 bit 4: at most 3 requests in flight.
    pub few_slots: bool,
    /// Byte 3 bit 5: a virtual clock, deadlines and cancellation.
    pub clock: bool,
    /// Byte 3 bit 6: a missed command deadline ends the connection.
    pub close_on_timeout: bool,
    /// Byte 3 bit 7: `abort` after frame `byte 1 % 8`.
    pub abort_at: Option<usize>,
}

impl Setup {
    /// Decodes the setup from the input header.
    pub fn from_header(h: [u8; HEADER_LEN]) -> Setup {
        let b = h[0];
        Setup {
            opt_mode: b & 1 != 0,
            extended_headers: b & 2 == 0,
            full_info: b & 4 != 0,
            recv_path: b & 8 != 0,
            structured_replies: b & 16 == 0,
            block_size: b & 32 == 0,
            named_export: b & 64 != 0,
            hostile_offsets: b & 128 != 0,
            few_slots: h[3] & 0x10 != 0,
            clock: h[3] & 0x20 != 0,
            close_on_timeout: h[3] & 0x40 != 0,
            abort_at: (h[3] & 0x80 != 0).then_some(usize::from(h[1] % 8)),
        }
    }

    /// Encodes the input header (inverse of [`Setup::from_header`]); `split`
    /// gives the split seed and the piece-size bound.
    pub fn to_header(self, split: [u8; 3]) -> [u8; HEADER_LEN] {
        let b = u8::from(self.opt_mode)
            | u8::from(!self.extended_headers) << 1
            | u8::from(self.full_info) << 2
            | u8::from(self.recv_path) << 3
            | u8::from(!self.structured_replies) << 4
            | u8::from(!self.block_size) << 5
            | u8::from(self.named_export) << 6
            | u8::from(self.hostile_offsets) << 7;
        let few = if self.few_slots { 0x10 } else { 0 };
        let clock = if self.clock { 0x20 } else { 0 };
        let close = if self.close_on_timeout { 0x40 } else { 0 };
        let abort = if self.abort_at.is_some() { 0x80 } else { 0 };
        [
            b,
            split[0],
            split[1],
            (split[2] & 0x0f) | few | clock | close | abort,
        ]
    }

    /// The connection configuration: strict mode off, so that every command
    /// the driver issues goes on the wire whatever the server advertised.
    pub fn config(self) -> Config {
        let mut cfg = Config::default();
        cfg.export_name = if self.named_export {
            "exp".into()
        } else {
            String::new()
        };
        cfg.opt_mode = self.opt_mode;
        cfg.request_structured_replies = self.structured_replies;
        cfg.request_extended_headers = self.extended_headers;
        cfg.request_block_size = self.block_size;
        cfg.full_info = self.full_info;
        cfg.meta_contexts = META_CONTEXTS.iter().map(|s| s.to_string()).collect();
        cfg.strict = Strict::NONE;
        cfg.limits = limits();
        cfg.limits.max_in_flight = if self.few_slots { 3 } else { 64 };
        if self.clock {
            cfg.handshake_timeout = Some(5 * CLOCK_TIMEOUT);
            cfg.command_timeout = Some(CLOCK_TIMEOUT);
        } else {
            // No clock is ever given: no deadline may matter.
            cfg.handshake_timeout = None;
        }
        if self.close_on_timeout {
            cfg.on_command_timeout = TimeoutPolicy::CloseConnection;
        }
        cfg
    }
}

/// The command timeout with the virtual clock on (the handshake gets five
/// times as long).
pub const CLOCK_TIMEOUT: Duration = Duration::from_millis(40);

/// The memory limits of the harness: small enough that inputs reach them
/// (every limit has a branch that ends the connection), and what the
/// memory bound of [`run_state_machine`] is computed from.
pub fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_extent_bytes = 64 << 10;
    l.max_error_chunks = 16;
    l.max_meta_contexts = 64;
    l.max_exports = 256;
    l.max_export_list_bytes = 64 << 10;
    l
}

/// The most memory one run may hold beyond its input, from [`limits`]:
/// the receive buffer (256 KiB), one block status chunk's extents, one
/// export list, the meta contexts (4 KiB names), the batch's buffers and
/// the events of one piece (at most 64 KiB of input), each twice for the
/// growth of the vectors that hold them, plus 1 MiB of slack.
pub fn memory_bound() -> usize {
    let l = limits();
    let held = (256 << 10)
        + l.max_extent_bytes as usize
        + l.max_export_list_bytes as usize
        + l.max_meta_contexts * 4200
        + (256 << 10)
        + 64 * (64 << 10);
    2 * held + (1 << 20)
}

/// One command of the batch.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Read {
        off: u64,
        len: usize,
        flags: u16,
        chunks: bool,
    },
    Write {
        off: u64,
        len: usize,
        flags: u16,
    },
    Flush,
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Status {
        off: u64,
        len: u64,
        flags: u16,
    },
    Cache {
        off: u64,
        len: u64,
    },
}

/// The commands issued once the connection is ready: reads (with and
/// without chunk events, with DF), a write, flush, trim, write zeroes, block
/// status (whole and REQ_ONE) and cache, all inside the first MiB (or, with
/// hostile offsets, just below `u64::MAX`, some wrapping around).
fn batch(hostile: bool) -> Vec<Cmd> {
    let base: u64 = if hostile { u64::MAX - 20_000 } else { 0 };
    let at = |o: u64| base.wrapping_add(o);
    vec![
        Cmd::Read {
            off: at(0),
            len: 1024,
            flags: 0,
            chunks: false,
        },
        Cmd::Read {
            off: at(4096),
            len: 2048,
            flags: cmd_flags::DF,
            chunks: true,
        },
        Cmd::Write {
            off: at(16384),
            len: 1024,
            flags: cmd_flags::FUA,
        },
        Cmd::Read {
            off: at(16384),
            len: 1024,
            flags: 0,
            chunks: false,
        },
        Cmd::Flush,
        Cmd::Trim {
            off: at(65536),
            len: 4096,
        },
        Cmd::Zero {
            off: at(131072),
            len: 65536,
        },
        Cmd::Status {
            off: at(0),
            len: 1 << 20,
            flags: 0,
        },
        Cmd::Status {
            off: at(0),
            len: 65536,
            flags: cmd_flags::REQ_ONE,
        },
        Cmd::Read {
            off: at(512 * 1024),
            len: 4096,
            flags: 0,
            chunks: true,
        },
        Cmd::Cache {
            off: at(0),
            len: 4096,
        },
    ]
}

/// The scripted client around a [`Connection`], with invariant checks.
///
/// What it does:
/// - option mode, whenever the phase is `Negotiating`: `opt_starttls`
///   (after an ACK the TLS handshake is taken as done at once), `opt_list`,
///   `opt_extended_headers`, `opt_structured_reply`,
///   `opt_list_meta_context(["base:"])`,
///   `opt_set_meta_context(["base:allocation"])`, `opt_info`, `opt_go`, and
///   `opt_abort` if still negotiating after that (calls the connection
///   refuses, such as LIST without fixed newstyle, are skipped);
/// - once `Ready`: one batch of commands, issued as slots are free (with a
///   small in-flight limit they wait for completions), then `disconnect`
///   once they have all completed.
///
/// What it checks (panicking otherwise):
/// - every cookie a command returned gets exactly one `CommandDone`, and no
///   event names a cookie that is not in flight;
/// - at most one `Event::Closed`, and nothing after it;
/// - the number of events, and the bytes they carry, stay proportional to the
///   input;
/// - after [`Driver::finish`] (EOF): exactly one `Closed`, nothing in flight.
#[derive(Debug)]
pub struct Driver {
    /// The connection under test.
    pub conn: Connection,
    /// Cookies issued and not yet completed.
    pub outstanding: BTreeSet<Cookie>,
    /// Number of `Event::Closed` seen.
    pub closed: usize,
    /// Number of events seen.
    pub events: usize,
    /// Bytes carried by events (names, descriptions, extents).
    pub event_bytes: usize,
    /// Commands issued successfully.
    pub issued: usize,
    /// Debug strings of all events, when recording is on.
    pub log: Option<Vec<String>>,
    /// When set, output is taken in random partial amounts through
    /// `transmit_front`/`transmit_slices` + `transmitted` instead of
    /// `poll_transmit` (the bytes appended to `out` are the same).
    pub tx_rng: Option<SplitRng>,
    /// The virtual clock: its start and how far it has run.
    pub clock: Option<(Instant, Duration)>,
    /// Once the connection died, the completions it queued (only
    /// `ConnectionClosed`/`TimedOut` failures may follow, then `Closed`).
    pub dying: bool,
    /// Work done: pieces fed, events, clock ticks, script steps.
    pub work: usize,
    opt_step: usize,
    queue: Option<std::collections::VecDeque<Cmd>>,
    hostile: bool,
    tls_pending: bool,
    disc_called: bool,
}

impl Driver {
    /// A driver for a new connection with `setup`.
    pub fn new(setup: Setup) -> Driver {
        let start = Instant::now();
        Driver {
            conn: Connection::new(setup.config(), start),
            clock: setup.clock.then_some((start, Duration::ZERO)),
            dying: false,
            work: 0,
            outstanding: BTreeSet::new(),
            closed: 0,
            events: 0,
            event_bytes: 0,
            issued: 0,
            log: None,
            tx_rng: None,
            opt_step: 0,
            queue: None,
            hostile: setup.hostile_offsets,
            tls_pending: false,
            disc_called: false,
        }
    }

    /// Drains output (appended to `out`) and events, and lets the script act,
    /// until nothing more happens.
    pub fn pump(&mut self, out: &mut Vec<u8>) {
        // Each round either issues something or stops; the script has a
        // bounded number of steps, so this terminates.
        for _ in 0..64 {
            self.work += 1;
            self.drain_tx(out);
            while let Some(ev) = self.conn.poll_event() {
                self.on_event(ev);
            }
            self.check_in_flight();
            if !self.act() {
                self.drain_tx(out);
                return;
            }
        }
        panic!("the driver script did not settle");
    }

    /// Moves all queued output to `out`, checking `queued_bytes`.
    fn drain_tx(&mut self, out: &mut Vec<u8>) {
        let queued = self.conn.queued_bytes();
        let start = out.len();
        match &mut self.tx_rng {
            None => self.conn.poll_transmit(out),
            Some(rng) => loop {
                let n = if rng.next_u64() & 1 == 0 {
                    let mut bufs = [IoSlice::new(&[]); 4];
                    let k = self.conn.transmit_slices(&mut bufs);
                    if k == 0 {
                        break;
                    }
                    let total: usize = bufs[..k].iter().map(|b| b.len()).sum();
                    assert!(total > 0, "transmit_slices gave {k} empty slices");
                    let take = 1 + (rng.next_u64() as usize % total);
                    let mut left = take;
                    for b in &bufs[..k] {
                        let m = left.min(b.len());
                        out.extend_from_slice(&b[..m]);
                        left -= m;
                    }
                    take
                } else {
                    let front = self.conn.transmit_front();
                    if front.is_empty() {
                        break;
                    }
                    let take = 1 + (rng.next_u64() as usize % front.len());
                    out.extend_from_slice(&front[..take]);
                    take
                };
                self.conn.transmitted(n);
                assert!(
                    !self.conn.request_in_progress() || self.conn.wants_write(),
                    "a request in progress with nothing left to send"
                );
            },
        }
        assert_eq!(
            out.len() - start,
            queued,
            "bytes sent differ from queued_bytes()"
        );
        assert!(!self.conn.wants_write(), "output left after draining");
        assert!(
            !self.conn.request_in_progress(),
            "a request in progress after draining"
        );
    }

    /// Every command issued is completed or still in flight: the commands
    /// awaiting their completion are the table's requests less the
    /// abandoned ones (cancelled or timed out, whose late reply is due).
    fn check_in_flight(&self) {
        if !self.conn.is_finished() {
            assert_eq!(
                self.outstanding.len() + self.conn.abandoned(),
                self.conn.in_flight(),
                "commands awaiting completion vs. the in-flight table"
            );
        }
    }

    /// Moves the virtual clock on by `step` and hands it to the connection.
    pub fn tick(&mut self, step: Duration) {
        if let Some((start, t)) = &mut self.clock {
            *t += step;
            let now = *start + *t;
            self.work += 1;
            self.conn.handle_timeout(now);
        }
    }

    /// Cancels the oldest command awaiting its completion, if any; its
    /// `CommandDone` must come at once (checked by the next drain).
    pub fn cancel_one(&mut self) {
        // Completions already queued (a deadline that just passed) come
        // first: a command whose CommandDone waits in the queue is no longer
        // in flight, and `cancel` rightly refuses it.
        while let Some(ev) = self.conn.poll_event() {
            self.on_event(ev);
        }
        if let Some(&c) = self.outstanding.iter().next() {
            if !self.conn.is_finished() {
                self.conn
                    .cancel(c)
                    .expect("cancel of a command awaiting its completion");
                let done = self.conn.poll_event();
                assert!(
                    matches!(&done, Some(Event::CommandDone { cookie, result: Err(CommandError::Cancelled { .. }), .. }) if *cookie == c),
                    "cancel completes the command at once: {done:?}"
                );
                if let Some(ev) = done {
                    self.on_event(ev);
                }
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        assert_eq!(self.closed, 0, "event after Event::Closed: {ev:?}");
        self.events += 1;
        self.work += 1;
        // Nothing but the completions of the close, and the close, follows
        // a fatal error.
        if self.dying {
            assert!(
                matches!(
                    &ev,
                    Event::Closed(_)
                        | Event::CommandDone {
                            result: Err(
                                CommandError::ConnectionClosed(_) | CommandError::TimedOut { .. }
                            ),
                            ..
                        }
                ),
                "after the connection died: {ev:?}"
            );
        }
        if let Event::CommandDone {
            result: Err(CommandError::ConnectionClosed(_)),
            ..
        } = &ev
        {
            self.dying = true;
        }
        if let Event::Closed(CloseReason::Protocol(_)) = &ev {
            assert!(self.conn.is_finished());
        }
        if let Some(log) = &mut self.log {
            log.push(format!("{ev:?}"));
        }
        match ev {
            Event::CommandDone { cookie, .. } => {
                assert!(
                    self.outstanding.remove(&cookie),
                    "CommandDone for {cookie:?}, which is not in flight"
                );
            }
            Event::ReadChunk { cookie, .. } => {
                assert!(
                    self.outstanding.contains(&cookie),
                    "ReadChunk for {cookie:?}, which is not in flight"
                );
            }
            Event::BlockStatus {
                cookie, extents, ..
            } => {
                assert!(
                    self.outstanding.contains(&cookie),
                    "BlockStatus for {cookie:?}, which is not in flight"
                );
                assert!(!extents.is_empty(), "BlockStatus without extents");
                assert!(extents.iter().all(|e| e.length > 0), "zero-length extent");
                self.event_bytes += extents.len() * 16;
            }
            Event::ExportListed { name, description } => {
                self.event_bytes += name.len() + description.len();
            }
            Event::MetaContext { name, .. } => self.event_bytes += name.len(),
            Event::StartTls => {
                assert!(
                    !self.conn.wants_read(),
                    "StartTls but the core wants to read"
                );
                self.tls_pending = true;
            }
            Event::Closed(_) => {
                self.closed += 1;
                assert!(self.conn.is_finished(), "Closed but not finished");
            }
            _ => {}
        }
    }

    /// One step of the script; true if it did something.
    fn act(&mut self) -> bool {
        if self.tls_pending {
            // No real TLS here: pretend the handshake succeeded at once.
            self.tls_pending = false;
            // Unless bytes after the ACK (in the same read) already killed
            // the connection: the server must not send before the handshake.
            if !self.conn.is_finished() {
                self.conn
                    .tls_established()
                    .expect("tls_established after Event::StartTls");
            }
            return true;
        }
        match self.conn.phase() {
            Phase::Negotiating => self.opt_step(),
            Phase::Ready => {
                let hostile = self.hostile;
                let queue = self.queue.get_or_insert_with(|| batch(hostile).into());
                if let Some(&cmd) = queue.front() {
                    match self.issue(cmd) {
                        // Wait for a completion to free a slot.
                        Err(UsageError::InFlightLimit { .. }) => return false,
                        Ok(c) => {
                            assert!(self.outstanding.insert(c), "cookie {c:?} issued twice");
                            self.issued += 1;
                        }
                        Err(_) => {}
                    }
                    if let Some(q) = &mut self.queue {
                        q.pop_front();
                    }
                    return true;
                }
                if self.outstanding.is_empty() && !self.disc_called {
                    self.disc_called = true;
                    // Fails harmlessly when the core already sent
                    // NBD_CMD_DISC itself (after NBD_ESHUTDOWN).
                    let _ = self.conn.disconnect();
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    fn issue(&mut self, cmd: Cmd) -> Result<Cookie, UsageError> {
        let c = &mut self.conn;
        match cmd {
            Cmd::Read {
                off,
                len,
                flags,
                chunks: false,
            } => c
                .read(off, BytesMut::zeroed(len), CmdFlags::from_bits(flags))
                .map_err(UsageError::from),
            Cmd::Read {
                off,
                len,
                flags,
                chunks: true,
            } => c
                .read_with_chunks(off, BytesMut::zeroed(len), CmdFlags::from_bits(flags))
                .map_err(UsageError::from),
            Cmd::Write { off, len, flags } => c
                .write(
                    off,
                    Bytes::from(vec![0xa5; len]),
                    CmdFlags::from_bits(flags),
                )
                .map_err(UsageError::from),
            Cmd::Flush => c.flush(CmdFlags::empty()),
            Cmd::Trim { off, len } => c.trim(off, len, CmdFlags::empty()),
            Cmd::Zero { off, len } => c.write_zeroes(off, len, CmdFlags::empty()),
            Cmd::Status { off, len, flags } => c.block_status(off, len, CmdFlags::from_bits(flags)),
            Cmd::Cache { off, len } => c.cache(off, len, CmdFlags::empty()),
        }
    }

    fn opt_step(&mut self) -> bool {
        while self.opt_step < OPT_STEPS {
            let step = self.opt_step;
            self.opt_step += 1;
            let c = &mut self.conn;
            let r = match step {
                0 => c.opt_starttls(),
                1 => c.opt_list(),
                2 => c.opt_extended_headers(),
                3 => c.opt_structured_reply(),
                4 => c.opt_list_meta_context(&["base:"]),
                5 => c.opt_set_meta_context(&["base:allocation"]),
                6 => c.opt_info(),
                7 => c.opt_go(),
                _ => c.opt_abort(),
            };
            if r.is_ok() {
                return true;
            }
        }
        false
    }

    /// Reports EOF and checks the final invariants.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.conn.handle_eof();
        self.pump(out);
        assert!(self.conn.is_finished(), "not finished after handle_eof");
        assert_eq!(self.closed, 1, "expected exactly one Event::Closed");
        assert!(
            self.outstanding.is_empty(),
            "requests never completed: {:?}",
            self.outstanding
        );
        assert!(self.conn.poll_event().is_none());
    }
}

/// Number of steps of the option-mode script.
const OPT_STEPS: usize = 9;

/// Small deterministic generator for split points.
#[derive(Debug, Clone)]
pub struct SplitRng(u64);

impl SplitRng {
    /// Seeds the generator (never zero).
    pub fn new(seed: u64) -> SplitRng {
        SplitRng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next value (xorshift64*).
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Splits the frame part of an input into frames.
pub fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let n = match data {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => 0,
        };
        let rest = data.get(2..).unwrap_or_default();
        let n = n.min(rest.len());
        let (frame, tail) = rest.split_at(n);
        data = tail;
        Some(frame)
    })
}

/// Appends one frame in the input format.
pub fn push_frame(out: &mut Vec<u8>, frame: &[u8]) {
    for chunk in frame.chunks(usize::from(u16::MAX)) {
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Feeds `piece` to the connection through the chosen input path.
pub fn feed(conn: &mut Connection, piece: &[u8], recv_path: bool) {
    let input = if recv_path {
        script::Input::Recv
    } else {
        script::Input::Copy
    };
    script::give(conn, piece, input);
}

/// The `state_machine` fuzz target.
pub fn run_state_machine(data: &[u8]) {
    run_state_machine_logged(data, false);
}

/// [`run_state_machine`], returning the debug strings of the events the
/// client saw when `log` is set (for the `replay` example).
pub fn run_state_machine_logged(data: &[u8], log: bool) -> Vec<String> {
    let Some((header, body)) = data.split_first_chunk::<HEADER_LEN>() else {
        return Vec::new();
    };
    let base = alloc_count::reset_peak();
    let setup = Setup::from_header(*header);
    let mut rng = SplitRng::new(u64::from(u32::from_be_bytes(*header)));
    let mut clock_rng = SplitRng::new(u64::from(header[2]) << 16 | 0xc10c);
    let max_piece = 1usize << (header[3] & 0x0f);
    let mut d = Driver::new(setup);
    if log {
        d.log = Some(Vec::new());
    }
    if header[2] & 1 != 0 {
        d.tx_rng = Some(SplitRng::new(u64::from(header[1]) << 8 | 0x5a));
    }
    let mut out = Vec::new();
    d.pump(&mut out);
    for (frame_no, frame) in frames(body).enumerate() {
        let mut rest = frame;
        while !rest.is_empty() {
            let n = if max_piece >= 1 << 15 {
                rest.len()
            } else {
                1 + (rng.next_u64() as usize % max_piece)
            };
            let (piece, tail) = rest.split_at(n.min(rest.len()));
            feed(&mut d.conn, piece, setup.recv_path);
            assert!(
                !d.conn.reply_in_progress() || d.conn.wants_read(),
                "a reply in progress on a connection that reads no more"
            );
            d.pump(&mut out);
            if setup.clock {
                // 0, 5, 10 or 15 ms pass; a cancel one time in eight.
                let r = clock_rng.next_u64();
                d.tick(Duration::from_millis(r % 4 * 5));
                if (r >> 8) & 7 == 0 {
                    d.cancel_one();
                }
                d.pump(&mut out);
            }
            rest = tail;
        }
        // The client never holds more than it was told plus its own requests.
        out.clear();
        if setup.abort_at == Some(frame_no) {
            d.conn.abort("the fuzz script aborts");
            d.pump(&mut out);
            assert!(d.conn.is_finished(), "abort ends the connection");
        }
    }
    d.finish(&mut out);
    let held = alloc_count::peak().saturating_sub(base);
    assert!(
        held <= memory_bound() + 4 * data.len(),
        "held {held} bytes, bound {} + 4 * {} input bytes",
        memory_bound(),
        data.len()
    );
    // CPU per input byte: every piece fed, event, tick and script step
    // counts; a loop that works without consuming input would show here
    // (and a slow one as a libFuzzer timeout).
    assert!(
        d.work <= 16 * data.len() + 4096,
        "{} steps of work from {} input bytes",
        d.work,
        data.len()
    );
    let budget = data.len() + 64;
    assert!(
        d.events <= budget + d.issued,
        "{} events from {} input bytes",
        d.events,
        data.len()
    );
    assert!(
        d.event_bytes <= 3 * data.len() + 64,
        "events carry {} bytes from {} input bytes",
        d.event_bytes,
        data.len()
    );
    d.log.take().unwrap_or_default()
}
