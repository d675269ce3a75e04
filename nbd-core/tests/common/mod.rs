//! The one in-memory harness of nbd-core's integration tests: a scripted
//! server ([`script`]) and a [`Pair`] that drives a [`Connection`] with it
//! and records what the client sent and reported.
//!
//! Each test file says `mod common;` and keeps only its tests and their
//! scenario data. The pieces:
//! - [`script`]: the server's bytes (greetings, option replies, simple
//!   replies, structured and extended chunks and their payloads), the
//!   [`script::Server`] builder, and the two input paths
//!   ([`script::Input`]: `handle_input`, or `recv_buf` + `recv_commit`);
//! - [`Pair`]: the connection plus everything it sent (decoded into option
//!   requests or transmission requests on demand) and every event it
//!   reported, checked as they pass: every cookie handed out completes
//!   exactly once, no event names a cookie never handed out, nothing comes
//!   after `Closed`; and, when the pair is dropped, EOF ends the connection
//!   and exactly one `Closed` must have come;
//! - [`Setup`]: a fixed-newstyle negotiation in one of three reply styles
//!   ([`Mode`]), checked, that hands back a [`Pair`] ready for commands;
//! - [`assert_fatal!`] / [`Pair::fatal`]: the connection died of a
//!   protocol error, and everything in flight failed with
//!   `ConnectionClosed`.
//!
//! Why test code and not a `testing` module of nbd-core: integration tests
//! link the library built without `cfg(test)`, and a feature would have to
//! be switched on by a dev-dependency of nbd-core on itself, so the tests
//! could not see it by default. The fuzz crate (its own workspace, not
//! published) needs only the byte builders and the input paths, which
//! `script.rs` keeps free of everything else; it includes that file with
//! `#[path]`, so the published crate carries no test API at all.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

pub mod script;

use std::collections::{HashMap, HashSet};

use bytes::{Bytes, BytesMut};
use nbd_core::consts::{
    chunk as ct, client_flags, cmd, cmd_flags as cf, opt, rep, reply_flags::DONE,
    transmission_flags as tf, EXTENDED_REQUEST_MAGIC, IHAVEOPT, REQUEST_MAGIC,
};
use nbd_core::wire::reply::HeaderMode;
use nbd_core::wire::request::{parse_request, RequestHeader};
use nbd_core::{
    CloseReason, CmdFlags, CommandError, Config, Connection, Cookie, Event, ExportInfo, Limits,
    Phase, ProtocolError, Strict, UsageError,
};

use script::Input;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Every feature a server can advertise (strict mode lets everything through).
pub const ALL_FLAGS: u16 = tf::HAS_FLAGS
    | tf::SEND_FLUSH
    | tf::SEND_FUA
    | tf::SEND_TRIM
    | tf::SEND_WRITE_ZEROES
    | tf::SEND_DF
    | tf::SEND_CACHE
    | tf::SEND_FAST_ZERO
    | tf::BLOCK_STATUS_PAYLOAD;

// ---------------------------------------------------------------------------
// The pair
// ---------------------------------------------------------------------------

/// A transmission request as the client put it on the wire.
#[derive(Debug, Clone)]
pub struct Sent {
    pub header: RequestHeader,
    /// 28 or 32.
    pub header_len: usize,
    pub payload: Vec<u8>,
}

/// A connection driven by a test that plays the server: what it sent, what
/// it reported, and the exactly-once bookkeeping of its cookies.
pub struct Pair {
    pub conn: Connection,
    /// The reply format chunks are built in ([`Pair::chunk`]); set by
    /// [`Setup::connect`].
    pub mode: HeaderMode,
    /// Events drained from the connection and not yet taken by the test.
    pub events: Vec<Event>,
    /// Every byte the client sent, in order (pulled by [`Pair::sent`]).
    wire: Vec<u8>,
    /// How much of `wire` is negotiation or already decoded into requests.
    parsed: usize,
    /// Requests seen on the wire, by cookie.
    requests: HashMap<u64, RequestHeader>,
    /// Cookies handed out by successful submissions.
    issued: HashSet<Cookie>,
    /// Cookies that got their `CommandDone`.
    completed: HashSet<Cookie>,
    closed: usize,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // End the connection (if it is still up) so every request completes.
        self.conn.handle_eof();
        self.drain_events();
        // `drain_events` refuses events after Closed, so Closed came last.
        assert_eq!(self.closed, 1, "exactly one Closed event");
        let missing: Vec<_> = self.issued.difference(&self.completed).collect();
        assert!(missing.is_empty(), "cookies never completed: {missing:?}");
        assert_eq!(self.conn.in_flight(), 0);
        assert!(self.conn.is_finished());
    }
}

impl Pair {
    /// A new connection with `cfg`; nothing fed yet.
    pub fn new(cfg: Config) -> Pair {
        Pair {
            conn: Connection::new(cfg, std::time::Instant::now()),
            mode: HeaderMode::Simple,
            events: Vec::new(),
            wire: Vec::new(),
            parsed: 0,
            requests: HashMap::new(),
            issued: HashSet::new(),
            completed: HashSet::new(),
            closed: 0,
        }
    }

    /// A new connection with the default settings changed by `f`.
    pub fn with(f: impl FnOnce(&mut Config)) -> Pair {
        Pair::new(config(f))
    }

    /// A new connection in option mode, otherwise with default settings.
    pub fn opt_mode() -> Pair {
        Pair::with(|cfg| cfg.opt_mode = true)
    }

    // ----- input -----

    /// Feeds `b` whole through `handle_input`, then drains the events.
    pub fn feed(&mut self, b: &[u8]) -> &mut Self {
        self.conn.handle_input(b);
        self.drain_events();
        self
    }

    /// Feeds `b` one byte at a time.
    pub fn feed_bytewise(&mut self, b: &[u8]) -> &mut Self {
        for byte in b {
            self.feed(std::slice::from_ref(byte));
        }
        self
    }

    /// Feeds `data` cut at `cuts` (see [`script::pieces`]) through `input`,
    /// draining output and events after every piece.
    pub fn feed_split(&mut self, data: &[u8], cuts: &[usize], input: Input) -> &mut Self {
        for piece in script::pieces(data, cuts) {
            script::give(&mut self.conn, piece, input);
            self.drain();
        }
        self
    }

    /// Reports EOF, then drains the events.
    pub fn eof(&mut self) -> &mut Self {
        self.conn.handle_eof();
        self.drain_events();
        self
    }

    // ----- events -----

    /// Moves the connection's events into `events`, checking the
    /// exactly-once rules as they pass.
    pub fn drain_events(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            assert_eq!(self.closed, 0, "event after Closed: {ev:?}");
            match &ev {
                Event::CommandDone { cookie, .. } => {
                    assert!(
                        self.issued.contains(cookie),
                        "completion for a cookie never issued: {cookie:?}"
                    );
                    assert!(
                        self.completed.insert(*cookie),
                        "cookie completed twice: {cookie:?}"
                    );
                }
                Event::ReadChunk { cookie, .. } | Event::BlockStatus { cookie, .. } => {
                    assert!(self.issued.contains(cookie));
                    assert!(
                        !self.completed.contains(cookie),
                        "event for a completed cookie: {ev:?}"
                    );
                }
                Event::Closed(_) => self.closed += 1,
                _ => {}
            }
            self.events.push(ev);
        }
    }

    /// Pulls the client's output (see [`Pair::sent`]) and its events.
    pub fn drain(&mut self) {
        self.conn.poll_transmit(&mut self.wire);
        self.drain_events();
    }

    /// All events not yet taken.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.drain_events();
        std::mem::take(&mut self.events)
    }

    /// Asserts that no event is waiting.
    pub fn no_events(&mut self) {
        let ev = self.take_events();
        assert!(ev.is_empty(), "unexpected events: {ev:?}");
    }

    /// The `Closed` event, if one came (and not taken); never more than one.
    pub fn closed(&self) -> Option<&CloseReason> {
        let closes: Vec<_> = self
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Closed(r) => Some(r),
                _ => None,
            })
            .collect();
        assert!(closes.len() <= 1, "more than one Closed: {:?}", self.events);
        closes.first().copied()
    }

    /// The protocol error the connection was closed for (must be one).
    pub fn protocol_error(&self) -> &ProtocolError {
        match self.closed() {
            Some(CloseReason::Protocol(e)) => e,
            other => panic!(
                "expected Closed(Protocol(..)), got {other:?}; events {:?}",
                self.events
            ),
        }
    }

    /// The export of the `GoSucceeded` event (must be one).
    pub fn go_info(&self) -> &ExportInfo {
        self.events
            .iter()
            .find_map(|e| match e {
                Event::GoSucceeded(i) => Some(i),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no GoSucceeded in {:?}", self.events))
    }

    /// Takes the completion of `cookie` (which must have happened).
    pub fn done(&mut self, cookie: Cookie) -> (Result<(), CommandError>, Option<BytesMut>) {
        self.drain_events();
        let i = self
            .events
            .iter()
            .position(|e| matches!(e, Event::CommandDone { cookie: c, .. } if *c == cookie))
            .unwrap_or_else(|| panic!("no CommandDone for {cookie:?}; events: {:?}", self.events));
        match self.events.remove(i) {
            Event::CommandDone { result, buffer, .. } => (result, buffer),
            _ => unreachable!(),
        }
    }

    pub fn done_ok(&mut self, cookie: Cookie) -> Option<BytesMut> {
        let (r, b) = self.done(cookie);
        assert_eq!(r, Ok(()), "{cookie:?} should succeed");
        b
    }

    pub fn done_err(&mut self, cookie: Cookie) -> CommandError {
        self.done(cookie).0.expect_err("request should fail")
    }

    /// Asserts `cookie` has not completed yet.
    pub fn not_done(&mut self, cookie: Cookie) {
        self.drain_events();
        assert!(
            !self.completed.contains(&cookie),
            "{cookie:?} completed early"
        );
    }

    /// The connection must have been hard-disconnected for a protocol
    /// violation; every request still in flight failed with
    /// `ConnectionClosed`. Takes the events and returns the violation.
    pub fn fatal(&mut self) -> ProtocolError {
        self.drain_events();
        assert_eq!(self.conn.phase(), Phase::Dead, "events: {:?}", self.events);
        assert_eq!(self.conn.in_flight(), 0);
        let reason = match self.events.last() {
            Some(Event::Closed(CloseReason::Protocol(e))) => e.clone(),
            other => panic!("expected Closed(Protocol), got {other:?}"),
        };
        // Everything the close completed failed with ConnectionClosed.
        let closing: Vec<_> = self
            .events
            .drain(..)
            .filter_map(|e| match e {
                Event::CommandDone { result, .. } => Some(result),
                _ => None,
            })
            .collect();
        for r in closing {
            assert!(
                matches!(r, Err(CommandError::ConnectionClosed(_))),
                "request completed by close with {r:?}"
            );
        }
        assert_eq!(
            self.conn.close_reason(),
            Some(&CloseReason::Protocol(reason.clone()))
        );
        reason
    }

    // ----- commands -----

    /// Registers a cookie handed out outside [`Pair::ok`].
    pub fn register(&mut self, c: Cookie) {
        assert!(
            self.issued.insert(c),
            "cookie {c:?} issued twice while in flight"
        );
    }

    /// Registers a successful submission.
    pub fn ok(&mut self, r: Result<Cookie, impl Into<UsageError>>) -> Cookie {
        let c = r.map_err(Into::into).expect("submission should succeed");
        self.register(c);
        c
    }

    /// A read into a buffer pre-filled with 0xff.
    pub fn read(&mut self, offset: u64, len: u64) -> Cookie {
        self.read_flags(offset, len, CmdFlags::empty())
    }

    pub fn read_flags(&mut self, offset: u64, len: u64, flags: CmdFlags) -> Cookie {
        let r = self
            .conn
            .read(offset, BytesMut::from(&vec![0xff; len as usize][..]), flags);
        self.ok(r)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Cookie {
        let r = self
            .conn
            .write(offset, Bytes::copy_from_slice(data), CmdFlags::empty());
        self.ok(r)
    }

    pub fn flush(&mut self) -> Cookie {
        let r = self.conn.flush(CmdFlags::empty());
        self.ok(r)
    }

    pub fn block_status(&mut self, offset: u64, len: u64, flags: CmdFlags) -> Cookie {
        let r = self.conn.block_status(offset, len, flags);
        self.ok(r)
    }

    // ----- output -----

    /// Every byte the client sent so far (pulls what is queued).
    pub fn sent(&mut self) -> &[u8] {
        self.conn.poll_transmit(&mut self.wire);
        &self.wire
    }

    /// The client flags (the first 4 bytes sent).
    pub fn client_flags(&mut self) -> u32 {
        u32::from_be_bytes(self.sent()[..4].try_into().unwrap())
    }

    /// The option requests sent after the client flags: (option, data).
    pub fn options(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        let sent = self.sent();
        let mut b = sent.get(4..).unwrap_or_default();
        while !b.is_empty() {
            assert!(b.len() >= 16, "truncated option in {sent:?}");
            assert_eq!(&b[..8], &IHAVEOPT.to_be_bytes(), "option magic");
            let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(b[12..16].try_into().unwrap()) as usize;
            v.push((option, b[16..16 + len].to_vec()));
            b = &b[16 + len..];
        }
        v
    }

    /// The option codes sent.
    pub fn option_codes(&mut self) -> Vec<u32> {
        self.options().into_iter().map(|(o, _)| o).collect()
    }

    /// Marks everything sent so far as negotiation: [`Pair::requests`]
    /// decodes what comes after.
    pub fn negotiated(&mut self) {
        self.sent();
        self.parsed = self.wire.len();
    }

    /// Transmission requests the client sent since the last call.
    pub fn requests(&mut self) -> Vec<Sent> {
        self.sent();
        let mut out = Vec::new();
        while let Some(m) = self.wire[self.parsed..].first_chunk::<4>() {
            let b = &self.wire[self.parsed..];
            let header_len = match u32::from_be_bytes(*m) {
                REQUEST_MAGIC => 28,
                EXTENDED_REQUEST_MAGIC => 32,
                other => panic!("bad request magic {other:#x}"),
            };
            if b.len() < header_len {
                break;
            }
            let header = parse_request(&b[..header_len]).unwrap();
            let plen = if header.typ == cmd::WRITE || header.flags & cf::PAYLOAD_LEN != 0 {
                header.length as usize
            } else {
                0
            };
            if b.len() < header_len + plen {
                break;
            }
            let payload = b[header_len..header_len + plen].to_vec();
            self.parsed += header_len + plen;
            self.requests.insert(header.cookie, header);
            out.push(Sent {
                header,
                header_len,
                payload,
            });
        }
        assert_eq!(
            self.parsed,
            self.wire.len(),
            "partial request left on the wire"
        );
        out
    }

    /// Exactly one request was sent; returns it.
    pub fn sent_one(&mut self) -> Sent {
        let mut s = self.requests();
        assert_eq!(s.len(), 1, "expected exactly one request, got {s:?}");
        s.pop().unwrap()
    }

    /// Nothing was queued for the server, nor sent since the last
    /// [`Pair::requests`].
    pub fn nothing_sent(&mut self) {
        assert!(!self.conn.wants_write(), "unexpected output queued");
        assert_eq!(self.conn.queued_bytes(), 0);
        assert_eq!(self.parsed, self.wire.len(), "unexpected output sent");
    }

    // ----- replies, in the negotiated format -----

    pub fn simple(&self, error: u32, c: Cookie) -> Vec<u8> {
        script::simple_reply(error, c.0)
    }

    /// A chunk in the negotiated mode; extended chunks echo the request's offset.
    pub fn chunk(&self, flags: u16, typ: u16, c: Cookie, payload: &[u8]) -> Vec<u8> {
        let offset = self.requests.get(&c.0).map_or(0, |h| h.offset);
        self.chunk_at(flags, typ, c, offset, payload)
    }

    pub fn chunk_at(
        &self,
        flags: u16,
        typ: u16,
        c: Cookie,
        offset: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        self.chunk_in(self.mode, flags, typ, c, offset, payload)
    }

    pub fn chunk_in(
        &self,
        mode: HeaderMode,
        flags: u16,
        typ: u16,
        c: Cookie,
        offset: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        script::chunk(mode, flags, typ, c.0, offset, payload)
    }

    pub fn data(&self, flags: u16, c: Cookie, off: u64, data: &[u8]) -> Vec<u8> {
        self.chunk(flags, ct::OFFSET_DATA, c, &script::offset_data(off, data))
    }

    pub fn hole(&self, flags: u16, c: Cookie, off: u64, len: u32) -> Vec<u8> {
        self.chunk(flags, ct::OFFSET_HOLE, c, &script::hole(off, len))
    }

    pub fn none(&self, c: Cookie) -> Vec<u8> {
        self.chunk(DONE, ct::NONE, c, &[])
    }

    pub fn error(&self, flags: u16, c: Cookie, err: u32, msg: &str) -> Vec<u8> {
        self.chunk(flags, ct::ERROR, c, &script::error_payload(err, msg))
    }
}

/// The default settings changed by `f`.
pub fn config(f: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = Config::default();
    f(&mut cfg);
    cfg
}

/// The data of an INFO/GO request: (name, requested info types); asserts
/// the option's length is exact (rule 27).
pub fn info_request(d: &[u8]) -> (String, Vec<u16>) {
    let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
    let name = String::from_utf8(d[4..4 + n].to_vec()).unwrap();
    let k = u16::from_be_bytes(d[4 + n..6 + n].try_into().unwrap()) as usize;
    assert_eq!(d.len(), 6 + n + 2 * k, "rule 27: exact option length");
    let infos = d[6 + n..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    (name, infos)
}

/// The parts of a server error (must be one).
pub fn server_err(e: &CommandError) -> (u32, Option<&str>, Option<u64>) {
    match e {
        CommandError::Server {
            errno,
            message,
            offset,
        } => (errno.0, message.as_deref(), *offset),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// The connection ended for a protocol violation matching the pattern
/// (see [`Pair::fatal`]).
#[allow(unused_macros)]
macro_rules! assert_fatal {
    ($h:expr, $p:pat $(if $guard:expr)?) => {{
        let e = $h.fatal();
        assert!(
            matches!(e, $p $(if $guard)?),
            "expected {}, got {e:?}",
            stringify!($p)
        );
    }};
}
#[allow(unused_imports)]
pub(crate) use assert_fatal;

// ---------------------------------------------------------------------------
// A negotiation to the ready phase
// ---------------------------------------------------------------------------

/// Which reply style the scripted server agrees to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// EXTENDED_HEADERS and STRUCTURED_REPLY both refused.
    Simple,
    /// EXTENDED_HEADERS refused, STRUCTURED_REPLY acknowledged.
    Structured,
    /// EXTENDED_HEADERS acknowledged.
    Extended,
}

impl Mode {
    pub fn header_mode(self) -> HeaderMode {
        match self {
            Mode::Simple => HeaderMode::Simple,
            Mode::Structured => HeaderMode::Structured,
            Mode::Extended => HeaderMode::Extended,
        }
    }
}

/// What the scripted server says during a fixed-newstyle negotiation, and
/// the client's config.
pub struct Setup {
    mode: Mode,
    size: u64,
    flags: u16,
    block_size: Option<(u32, u32, u32)>,
    contexts: Vec<(u32, &'static str)>,
    strict: Strict,
    limits: Limits,
    tweak: fn(&mut Config),
}

impl Setup {
    /// 64 MiB, [`ALL_FLAGS`], no block sizes, no contexts, strict mode all
    /// on, default limits.
    pub fn new(mode: Mode) -> Self {
        Setup {
            mode,
            size: 64 * MIB,
            flags: ALL_FLAGS,
            block_size: None,
            contexts: Vec::new(),
            strict: Strict::ALL,
            limits: Limits::default(),
            tweak: |_| {},
        }
    }
    pub fn size(mut self, size: u64) -> Self {
        self.size = size;
        self
    }
    pub fn flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }
    pub fn block_size(mut self, min: u32, pref: u32, max: u32) -> Self {
        self.block_size = Some((min, pref, max));
        self
    }
    pub fn contexts(mut self, c: &[(u32, &'static str)]) -> Self {
        self.contexts = c.to_vec();
        self
    }
    pub fn base_allocation(self, id: u32) -> Self {
        self.contexts(&[(id, "base:allocation")])
    }
    pub fn strict(mut self, s: Strict) -> Self {
        self.strict = s;
        self
    }
    pub fn limits(mut self, l: Limits) -> Self {
        self.limits = l;
        self
    }
    /// Any other setting of the client's config (timeouts, ...).
    pub fn tweak(mut self, f: fn(&mut Config)) -> Self {
        self.tweak = f;
        self
    }

    pub fn config(&self) -> Config {
        let mut cfg = Config::default();
        cfg.meta_contexts = self.contexts.iter().map(|(_, n)| n.to_string()).collect();
        cfg.strict = self.strict;
        cfg.limits = self.limits.clone();
        (self.tweak)(&mut cfg);
        cfg
    }

    /// The server's stream, in the order the automatic sequence sends the
    /// options, plus the options expected from the client.
    pub fn server_bytes(&self) -> (Vec<u8>, Vec<u32>) {
        use script::{ack, info_block_size, info_export, meta_context, opt_reply};
        let mut b = script::fixed_newstyle();
        let mut expected = vec![opt::EXTENDED_HEADERS];
        if self.mode == Mode::Extended {
            b.extend(ack(opt::EXTENDED_HEADERS));
        } else {
            b.extend(opt_reply(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]));
            expected.push(opt::STRUCTURED_REPLY);
            if self.mode == Mode::Structured {
                b.extend(ack(opt::STRUCTURED_REPLY));
            } else {
                b.extend(opt_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]));
            }
        }
        if self.mode != Mode::Simple && !self.contexts.is_empty() {
            expected.push(opt::SET_META_CONTEXT);
            for (id, name) in &self.contexts {
                b.extend(meta_context(opt::SET_META_CONTEXT, *id, name));
            }
            b.extend(ack(opt::SET_META_CONTEXT));
        }
        expected.push(opt::GO);
        b.extend(info_export(opt::GO, self.size, self.flags));
        if let Some((min, pref, max)) = self.block_size {
            b.extend(info_block_size(opt::GO, min, pref, max));
        }
        b.extend(ack(opt::GO));
        (b, expected)
    }

    /// Runs the whole negotiation, checks it, and returns a pair in the
    /// ready phase with the negotiation's events taken.
    pub fn connect(self) -> Pair {
        let mut p = Pair::new(self.config());
        let (server, expected) = self.server_bytes();
        p.feed(&server);
        assert_eq!(
            p.client_flags(),
            client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES,
            "client flags FIXED_NEWSTYLE|NO_ZEROES"
        );
        assert_eq!(p.option_codes(), expected, "options sent");
        p.negotiated();
        let mut contexts_seen = 0;
        let mut go = None;
        for ev in p.take_events() {
            match ev {
                Event::MetaContext { .. } => contexts_seen += 1,
                Event::GoSucceeded(i) => go = Some(i),
                other => panic!("unexpected event during negotiation: {other:?}"),
            }
        }
        let info = go.expect("GoSucceeded");
        assert_eq!(info.size, self.size);
        assert_eq!(p.conn.phase(), Phase::Ready);
        assert_eq!(
            p.conn.extended_headers_negotiated(),
            self.mode == Mode::Extended
        );
        assert_eq!(
            p.conn.structured_replies_negotiated(),
            self.mode != Mode::Simple
        );
        if self.mode != Mode::Simple {
            assert_eq!(contexts_seen, self.contexts.len());
        }
        assert!(!p.conn.wants_write(), "nothing queued once ready");
        p.mode = self.mode.header_mode();
        p
    }
}
