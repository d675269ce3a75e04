//! The transmission phase: issuing commands (with libnbd's strict-mode
//! checks and this crate's memory limits), the table of requests in flight
//! keyed by cookie, and the reply parser that assembles simple replies,
//! structured chunks and extended chunks, checking every rule of spec §3.8–3.10
//! and applying the fatal/per-request table of §3.14.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::client::Connection;
use crate::config::{Config, Limits, Strict};
use crate::consts::{
    chunk, cmd, cmd_flags as cf, errno, reply_flags, transmission_flags as tf, MAX_STRING_LEN,
};
use crate::coverage::Coverage;
use crate::deadline::{DeadlineHeap, TimeoutPolicy};
use crate::error::{CommandError, NbdErrno, ProtocolError, Refused, UsageError};
use crate::event::{Cookie, Event, ExportInfo, Extent, ReadChunkKind};
use crate::flags::CmdFlags;
use crate::negotiate::State;
use crate::wire::reply::{self as wrep, HeaderMode, ReplyHeader};
use crate::wire::request::{encode_block_status_filter, encode_request_array, RequestHeader};
use crate::wire::WireError;

/// Largest buffered (non-data) chunk payload: error chunks with a maximal
/// message, holes and NONE. Block status is parsed as it streams in.
const MAX_BUFFERED_CHUNK: u64 = 64 * 1024;
/// Payload sizes up to this are never treated as hostile (spec §3.11).
const MIN_DOS_THRESHOLD: u64 = 32 << 20;
/// Average payload per request in flight from which reply payloads are
/// better read straight into read buffers than copied from the receive
/// buffer (a copy of this size costs more than one more system call).
const DIRECT_READ_MIN: u64 = 64 * 1024;
/// Receive-buffer read size while large payloads are expected: room for
/// any reply header and many small replies (write acknowledgements), while
/// little of a following payload gets copied out of the receive buffer.
const HEADER_READ_CAP: usize = 512;

/// The spec's name of a command, for messages.
pub fn command_name(c: u16) -> &'static str {
    match c {
        cmd::READ => "NBD_CMD_READ",
        cmd::WRITE => "NBD_CMD_WRITE",
        cmd::DISC => "NBD_CMD_DISC",
        cmd::FLUSH => "NBD_CMD_FLUSH",
        cmd::TRIM => "NBD_CMD_TRIM",
        cmd::CACHE => "NBD_CMD_CACHE",
        cmd::WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        cmd::BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        cmd::RESIZE => "NBD_CMD_RESIZE",
        _ => "unknown command",
    }
}

/// One request in flight.
#[derive(Debug, Default)]
struct Request {
    cmd: u16,
    flags: u16,
    offset: u64,
    length: u64,
    /// Read destination.
    buf: Option<BytesMut>,
    chunk_events: bool,
    /// First error reported by the server (first one wins).
    error: Option<CommandError>,
    /// Content bytes received (reads).
    covered: u64,
    content_chunks: u32,
    /// Bytes of content received, tracked only once chunks arrive out of
    /// order.
    coverage: Coverage,
    /// Contexts answered (block status).
    contexts_seen: Vec<u32>,
    /// Error chunks received (bounded by `Limits::max_error_chunks`).
    error_chunks: u32,
    /// Payload bytes charged against the in-flight byte limit.
    charged: u64,
    /// Its deadline is the default ([`Config::command_timeout`]), to start
    /// at the next time input (see `Transmission::unarmed`).
    default_deadline: bool,
}

/// A request checked and encoded, not yet in flight (see `Connection::prepare`).
struct Prepared {
    slot: u32,
    generation: u32,
    cookie: Cookie,
    cmd: u16,
    flags: u16,
    offset: u64,
    length: u64,
    charged: u64,
    header: [u8; 32],
    header_len: usize,
}

/// Where a slot of the in-flight table is in a request's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum SlotState {
    /// Not in use.
    #[default]
    Free,
    /// Sent (or queued); the caller awaits its completion.
    Waiting,
    /// Already completed towards the caller (timed out or cancelled), its
    /// buffer handed back; the server's reply is still due and will be
    /// read and dropped. Still counts against the in-flight limits.
    Abandoned,
}

/// A slot of the in-flight table; its vectors keep their capacity across
/// requests so steady-state traffic does not allocate.
#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    state: SlotState,
    /// Listed in `Transmission::unarmed` (once at most, whoever occupies
    /// the slot by the time the list is taken).
    listed: bool,
    req: Request,
}

/// How far the current reply has been read.
#[derive(Debug, Clone, Copy)]
enum Rx {
    /// Waiting for a reply header.
    Header,
    /// Simple reply data, or OFFSET_DATA data, going to the read buffer
    /// at `pos..end` (offsets within the buffer).
    Data {
        slot: u32,
        pos: usize,
        end: usize,
        done: bool,
    },
    /// OFFSET_DATA: waiting for the 8-byte offset.
    DataPrefix { slot: u32, length: u64, flags: u16 },
    /// A small chunk payload to buffer whole.
    Buffered {
        slot: u32,
        typ: u16,
        flags: u16,
        length: usize,
    },
    /// Block status: header (context id, and count in extended mode).
    StatusHeader {
        slot: u32,
        typ: u16,
        flags: u16,
        length: u64,
    },
    /// Block status descriptors streaming in; `remaining` of them to come.
    StatusBody {
        slot: u32,
        typ: u16,
        flags: u16,
        context: u32,
        remaining: u64,
    },
}

/// Transmission-phase state.
#[derive(Debug)]
pub(crate) struct Transmission {
    mode: HeaderMode,
    strict: Strict,
    limits: Limits,
    size: u64,
    flags: u16,
    minimum: u32,
    payload_max: u64,
    dos_limit: u64,
    contexts: Vec<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    /// Slots in `SlotState::Abandoned` (part of `in_flight`).
    abandoned: usize,
    bytes_in_flight: u64,
    /// Command deadlines by slot.
    deadlines: DeadlineHeap,
    /// Slots whose default deadline ([`Config::command_timeout`]) starts at
    /// the next time input (at most one entry per slot: `Request::unarmed`).
    unarmed: Vec<u32>,
    command_timeout: Option<Duration>,
    policy: TimeoutPolicy,
    rx: Rx,
    disc_sent: bool,
    disc_wanted: bool,
    extents: Vec<Extent>,
    scratch: Vec<u8>,
}

impl Transmission {
    pub(crate) fn new(limits: &Limits) -> Self {
        Transmission {
            mode: HeaderMode::Simple,
            strict: Strict::ALL,
            limits: limits.clone(),
            size: 0,
            flags: 0,
            minimum: 1,
            payload_max: limits.default_max_write,
            dos_limit: MIN_DOS_THRESHOLD,
            contexts: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            abandoned: 0,
            bytes_in_flight: 0,
            deadlines: DeadlineHeap::default(),
            unarmed: Vec::new(),
            command_timeout: None,
            policy: TimeoutPolicy::FailCommand,
            rx: Rx::Header,
            disc_sent: false,
            disc_wanted: false,
            extents: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Sets up the phase from what negotiation agreed.
    pub(crate) fn start(
        &mut self,
        info: &ExportInfo,
        mode: HeaderMode,
        contexts: &[(u32, String)],
        cfg: &Config,
    ) {
        self.mode = mode;
        self.strict = cfg.strict;
        self.limits = cfg.limits.clone();
        self.size = info.size;
        self.flags = info.flags;
        self.minimum = info.block_size.map(|b| b.minimum).unwrap_or(1).max(1);
        self.payload_max = match info.block_size {
            Some(b) => u64::from(b.maximum).min(64 << 20),
            None => cfg.limits.default_max_write,
        };
        self.dos_limit = self
            .payload_max
            .max(self.limits.max_read)
            .max(MIN_DOS_THRESHOLD);
        self.contexts = contexts.iter().map(|(id, _)| *id).collect();
        let n = cfg.limits.max_in_flight.clamp(1, 1 << 20);
        self.slots = (0..n).map(|_| Slot::default()).collect();
        self.free = (0..n as u32).rev().collect();
        self.deadlines.reset(n);
        self.unarmed = Vec::with_capacity(n);
        self.command_timeout = cfg.command_timeout;
        self.policy = cfg.on_command_timeout;
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn disconnect_sent(&self) -> bool {
        self.disc_sent
    }

    /// How many bytes the adapter should read into the receive buffer at
    /// once. Unlimited, except while the requests in flight carry large
    /// payloads on average and a reply header is awaited: then a short read
    /// takes the header, and the payload that follows goes straight into
    /// the read's buffer ([`Transmission::direct_target`]) instead of being
    /// copied out of the receive buffer.
    pub(crate) fn recv_cap(&self) -> usize {
        if self.large_payloads() && matches!(self.rx, Rx::Header | Rx::DataPrefix { .. }) {
            HEADER_READ_CAP
        } else {
            usize::MAX
        }
    }

    /// How much of the receive buffer to offer behind a direct payload in
    /// a vectored read: room for the next headers, but not for payloads
    /// that would then have to be copied out.
    pub(crate) fn recv_cap_behind_payload(&self) -> usize {
        if self.large_payloads() {
            HEADER_READ_CAP
        } else {
            usize::MAX
        }
    }

    /// True between a reply's first byte and its last (the header alone
    /// counts as a start only once parsed; see `Connection`).
    pub(crate) fn mid_reply(&self) -> bool {
        !matches!(self.rx, Rx::Header)
    }

    fn large_payloads(&self) -> bool {
        self.in_flight > 0 && self.bytes_in_flight / self.in_flight as u64 >= DIRECT_READ_MIN
    }

    /// Where payload bytes may be read directly (a read's own buffer).
    pub(crate) fn direct_target(&mut self) -> Option<&mut [u8]> {
        if let Rx::Data { slot, pos, end, .. } = self.rx {
            let buf = self.slots.get_mut(slot as usize)?.req.buf.as_mut()?;
            return buf.get_mut(pos..end);
        }
        None
    }

    /// `n` bytes were written into [`Transmission::direct_target`].
    pub(crate) fn direct_commit(
        &mut self,
        n: usize,
        events: &mut VecDeque<Event>,
    ) -> Result<(), ProtocolError> {
        if let Rx::Data {
            slot,
            pos,
            end,
            done,
        } = self.rx
        {
            let pos = (pos + n).min(end);
            self.rx = Rx::Data {
                slot,
                pos,
                end,
                done,
            };
            if pos == end {
                self.rx = Rx::Header;
                if done {
                    self.finish(slot, events)?;
                }
            }
        }
        Ok(())
    }

    /// Requests in flight whose caller still awaits the completion (the
    /// abandoned ones already got theirs).
    pub(crate) fn waiting(&self) -> usize {
        self.in_flight - self.abandoned
    }

    pub(crate) fn abandoned(&self) -> usize {
        self.abandoned
    }

    /// Completes every request in flight with an error (connection over).
    pub(crate) fn fail_all(&mut self, why: &str, events: &mut VecDeque<Event>) {
        for i in 0..self.slots.len() {
            if self.slots[i].state != SlotState::Free {
                let err = CommandError::ConnectionClosed(why.to_owned());
                self.complete(i as u32, Err(err), events);
            }
        }
        self.rx = Rx::Header;
    }

    fn cookie(&self, slot: u32) -> Cookie {
        let g = self
            .slots
            .get(slot as usize)
            .map(|s| s.generation)
            .unwrap_or(0);
        Cookie(u64::from(g) << 32 | u64::from(slot))
    }

    fn lookup(&self, cookie: u64) -> Result<u32, ProtocolError> {
        let slot = (cookie & 0xffff_ffff) as u32;
        let generation = (cookie >> 32) as u32;
        match self.slots.get(slot as usize) {
            Some(s) if s.state != SlotState::Free && s.generation == generation => Ok(slot),
            _ => Err(ProtocolError::UnknownCookie(cookie)),
        }
    }

    fn req(&mut self, slot: u32) -> &mut Request {
        &mut self.slots[slot as usize].req
    }

    fn complete(
        &mut self,
        slot: u32,
        result: Result<(), CommandError>,
        events: &mut VecDeque<Event>,
    ) {
        let cookie = self.cookie(slot);
        let s = &mut self.slots[slot as usize];
        let was = std::mem::replace(&mut s.state, SlotState::Free);
        let buffer = s.req.buf.take();
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(s.req.charged);
        self.in_flight = self.in_flight.saturating_sub(1);
        self.free.push(slot);
        self.deadlines.remove(slot);
        match was {
            SlotState::Waiting => events.push_back(Event::CommandDone {
                cookie,
                result,
                buffer,
            }),
            // The caller got its completion when the request was abandoned;
            // this was the late reply.
            SlotState::Abandoned => self.abandoned -= 1,
            SlotState::Free => {}
        }
    }

    /// Completes a request towards the caller now (timed out or cancelled)
    /// and hands its buffer back, keeping the slot reserved until the
    /// server's reply arrives and is dropped.
    fn abandon(&mut self, slot: u32, error: CommandError, events: &mut VecDeque<Event>) {
        let cookie = self.cookie(slot);
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.state != SlotState::Waiting {
            return;
        }
        s.state = SlotState::Abandoned;
        s.req.chunk_events = false;
        let buffer = s.req.buf.take();
        self.abandoned += 1;
        self.deadlines.remove(slot);
        events.push_back(Event::CommandDone {
            cookie,
            result: Err(error),
            buffer,
        });
    }

    /// The slot of an in-flight request the caller still awaits.
    fn waiting_slot(&self, cookie: Cookie) -> Option<u32> {
        let slot = self.lookup(cookie.0).ok()?;
        (self.slots[slot as usize].state == SlotState::Waiting).then_some(slot)
    }

    /// The earliest command deadline: the current time if some command's
    /// default deadline still waits for a time input to start.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if !self.unarmed.is_empty() {
            return Some(now);
        }
        self.deadlines.peek().map(|(t, _)| t)
    }

    /// Starts the default deadlines waiting for a time input, then expires
    /// every command whose deadline is at or before `now`. Returns the
    /// expired command to end the connection for, under
    /// [`TimeoutPolicy::CloseConnection`].
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        events: &mut VecDeque<Event>,
    ) -> Option<(&'static str, Cookie)> {
        if !self.unarmed.is_empty() {
            let at = self.command_timeout.and_then(|d| now.checked_add(d));
            let mut unarmed = std::mem::take(&mut self.unarmed);
            for slot in unarmed.drain(..) {
                let s = &mut self.slots[slot as usize];
                s.listed = false;
                if std::mem::take(&mut s.req.default_deadline) && s.state == SlotState::Waiting {
                    if let Some(at) = at {
                        self.deadlines.set(slot, at);
                    }
                }
            }
            self.unarmed = unarmed;
        }
        while let Some((at, slot)) = self.deadlines.peek() {
            if at > now {
                break;
            }
            let command = command_name(self.slots[slot as usize].req.cmd);
            let cookie = self.cookie(slot);
            self.abandon(slot, CommandError::TimedOut { command }, events);
            if self.policy == TimeoutPolicy::CloseConnection {
                return Some((command, cookie));
            }
        }
        None
    }

    /// The request's last chunk arrived: check coverage and complete it.
    fn finish(&mut self, slot: u32, events: &mut VecDeque<Event>) -> Result<(), ProtocolError> {
        let r = self.req(slot);
        let (cmd_, covered, length) = (r.cmd, r.covered, r.length);
        let result = match r.error.take() {
            Some(e) => Err(e),
            None => {
                if cmd_ == cmd::READ && covered != length {
                    return Err(ProtocolError::ReadIncomplete {
                        cookie: self.cookie(slot).0,
                        covered,
                        length,
                    });
                }
                Ok(())
            }
        };
        self.complete(slot, result, events);
        Ok(())
    }

    /// Records an error the server reported for a request (the first one
    /// is what the request completes with).
    fn set_error(&mut self, slot: u32, e: CommandError) {
        if let CommandError::Server {
            errno: NbdErrno(errno::ESHUTDOWN),
            ..
        } = e
        {
            // Spec "Terminating the transmission phase" (rule 104): the
            // server is shutting down, so soft-disconnect once the requests
            // in flight complete, even if this error does not win.
            self.disc_wanted = true;
        }
        let r = self.req(slot);
        if r.error.is_none() {
            r.error = Some(e);
        }
    }

    /// Records a content chunk `[off, off+len)` of a read: inside the request,
    /// not overlapping earlier chunks (rules 99, 105), at most one with DF.
    fn add_content(&mut self, slot: u32, off: u64, len: u64) -> Result<usize, ProtocolError> {
        let r = &self.slots[slot as usize].req;
        let end = off.checked_add(len);
        let req_end = r.offset.saturating_add(r.length);
        if off < r.offset || end.is_none_or(|e| e > req_end) {
            return Err(ProtocolError::ChunkOutOfRange {
                cookie: self.cookie(slot).0,
                offset: off,
                length: len,
                request_offset: r.offset,
                request_length: r.length,
            });
        }
        if r.flags & cf::DF != 0 && r.content_chunks >= 1 {
            return Err(ProtocolError::FragmentedDfRead {
                cookie: self.cookie(slot).0,
            });
        }
        let cookie = self.cookie(slot).0;
        let end = off + len;
        let r = self.req(slot);
        // While chunks arrive in order, `covered` alone describes them (one
        // run from the request's offset), so nothing is recorded or allocated.
        if !(r.coverage.in_order() && off == r.offset + r.covered) {
            let (start, stop) = (off - r.offset, end - r.offset);
            if !r.coverage.add(start, stop, r.covered, r.length) {
                return Err(ProtocolError::ChunkOverlap {
                    cookie,
                    offset: off,
                    length: len,
                });
            }
        }
        r.covered += len;
        r.content_chunks += 1;
        Ok((off - r.offset) as usize)
    }

    fn want_disc(&self) -> bool {
        self.disc_wanted && !self.disc_sent && self.in_flight == 0
    }
}

impl Connection {
    // ----- commands -----

    fn need_ready(&self, call: &'static str) -> Result<(), UsageError> {
        if !matches!(self.state, State::Transmission) {
            return Err(UsageError::WrongPhase {
                call,
                needed: "ready (transmission phase)",
                actual: self.phase().name(),
            });
        }
        if self.xmit.disc_sent {
            return Err(UsageError::WrongPhase {
                call,
                needed: "ready (transmission phase)",
                actual: "disconnecting (NBD_CMD_DISC was sent)",
            });
        }
        Ok(())
    }

    /// Checks a command against strict mode and the limits; returns the
    /// flags to send.
    fn check_command(
        &self,
        c: u16,
        flags: CmdFlags,
        offset: u64,
        length: u64,
    ) -> Result<u16, UsageError> {
        let flags = flags.bits();
        let x = &self.xmit;
        let s = x.strict;
        let name = command_name(c);
        let allowed = match c {
            cmd::READ => cf::DF,
            cmd::WRITE => cf::FUA | cf::PAYLOAD_LEN,
            cmd::FLUSH | cmd::CACHE => 0,
            cmd::TRIM => cf::FUA,
            cmd::WRITE_ZEROES => cf::FUA | cf::NO_HOLE | cf::FAST_ZERO,
            cmd::BLOCK_STATUS => cf::REQ_ONE | cf::PAYLOAD_LEN,
            _ => 0,
        };
        if s.contains(Strict::FLAGS) && flags & !allowed != 0 {
            return Err(UsageError::BadFlags {
                command: name,
                flags,
            });
        }
        if s.contains(Strict::COMMANDS) {
            let has = |f: u16| x.flags & f != 0;
            if matches!(c, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) && has(tf::READ_ONLY) {
                return Err(UsageError::ReadOnly);
            }
            let need = |ok: bool, what: &'static str| {
                if ok {
                    Ok(())
                } else {
                    Err(UsageError::NotAdvertised(what))
                }
            };
            match c {
                cmd::FLUSH => need(has(tf::SEND_FLUSH), "flush")?,
                cmd::TRIM => need(has(tf::SEND_TRIM), "trim")?,
                cmd::WRITE_ZEROES => need(has(tf::SEND_WRITE_ZEROES), "write zeroes")?,
                cmd::CACHE => need(has(tf::SEND_CACHE), "cache")?,
                cmd::BLOCK_STATUS => {
                    need(
                        x.mode != HeaderMode::Simple,
                        "block status without structured replies",
                    )?;
                    need(
                        !x.contexts.is_empty(),
                        "block status: no meta context was negotiated",
                    )?;
                }
                _ => {}
            }
            if flags & cf::FUA != 0 {
                need(has(tf::SEND_FUA), "the FUA flag")?;
            }
            if flags & cf::DF != 0 {
                need(has(tf::SEND_DF), "the DF flag")?;
            }
            if flags & cf::FAST_ZERO != 0 {
                need(has(tf::SEND_FAST_ZERO), "the FAST_ZERO flag")?;
            }
        }
        let ranged = !matches!(c, cmd::FLUSH | cmd::DISC);
        if ranged {
            if s.contains(Strict::ZERO_SIZE) && length == 0 {
                return Err(UsageError::ZeroLength);
            }
            if s.contains(Strict::BOUNDS) && offset.checked_add(length).is_none_or(|e| e > x.size) {
                return Err(UsageError::OutOfBounds {
                    offset,
                    length,
                    size: x.size,
                });
            }
            if s.contains(Strict::ALIGN)
                && (offset % u64::from(x.minimum) != 0 || length % u64::from(x.minimum) != 0)
            {
                return Err(UsageError::Misaligned(x.minimum));
            }
        }
        // Always enforced, whatever strict mode says.
        if c == cmd::READ && length > x.limits.max_read {
            return Err(UsageError::TooLarge {
                length,
                max: x.limits.max_read,
            });
        }
        let payload_checked = c == cmd::WRITE || (c == cmd::READ && x.mode == HeaderMode::Simple);
        if s.contains(Strict::PAYLOAD) && payload_checked && length > x.payload_max {
            return Err(UsageError::TooLarge {
                length,
                max: x.payload_max,
            });
        }
        if x.mode != HeaderMode::Extended && length > u64::from(u32::MAX) {
            return Err(UsageError::TooLarge {
                length,
                max: u64::from(u32::MAX),
            });
        }
        let mut flags = flags;
        if s.contains(Strict::AUTO_FLAG) && c == cmd::WRITE {
            if x.mode == HeaderMode::Extended {
                flags |= cf::PAYLOAD_LEN;
            } else {
                flags &= !cf::PAYLOAD_LEN;
            }
        }
        Ok(flags)
    }

    fn check_limits(&self, bytes: u64) -> Result<u32, UsageError> {
        let x = &self.xmit;
        let over_bytes =
            x.in_flight > 0 && x.bytes_in_flight + bytes > x.limits.max_bytes_in_flight;
        match x.free.last() {
            Some(&slot) if !over_bytes => Ok(slot),
            _ => Err(UsageError::InFlightLimit {
                requests: x.in_flight,
                bytes: x.bytes_in_flight,
            }),
        }
    }

    /// Builds the request header for the next request in `slot`, before
    /// anything is committed, so that a refusal leaves no trace.
    /// `payload_len` is the length of the payload sent with the request.
    fn prepare(
        &self,
        c: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload_len: Option<u64>,
    ) -> Result<Prepared, UsageError> {
        let charged = if matches!(c, cmd::READ | cmd::WRITE) {
            length
        } else {
            0
        };
        let slot = self.check_limits(charged)?;
        let x = &self.xmit;
        let generation = x.slots[slot as usize].generation.wrapping_add(1).max(1);
        let cookie = Cookie(u64::from(generation) << 32 | u64::from(slot));
        let extended = x.mode == HeaderMode::Extended;
        let wire_len = match payload_len {
            // Extended mode: the header length of a payload-carrying command
            // is the payload length (rule 48).
            Some(p) if flags & cf::PAYLOAD_LEN != 0 || !extended => p,
            _ => length,
        };
        let h = RequestHeader {
            flags,
            typ: c,
            cookie: cookie.0,
            offset,
            length: wire_len,
        };
        let (header, header_len) =
            encode_request_array(&h, extended).map_err(|_| UsageError::TooLarge {
                length: wire_len,
                max: u64::from(u32::MAX),
            })?;
        Ok(Prepared {
            slot,
            generation,
            cookie,
            cmd: c,
            flags,
            offset,
            length,
            charged,
            header,
            header_len,
        })
    }

    /// Commits a prepared request: records it in flight and queues it.
    fn issue(
        &mut self,
        p: Prepared,
        buf: Option<BytesMut>,
        payload: Option<Bytes>,
        chunk_events: bool,
    ) -> Cookie {
        let x = &mut self.xmit;
        // `prepare` took the slot from the top of the free list, untouched since.
        x.free.pop();
        let s = &mut x.slots[p.slot as usize];
        s.generation = p.generation;
        s.state = SlotState::Waiting;
        let r = &mut s.req;
        r.cmd = p.cmd;
        r.flags = p.flags;
        r.offset = p.offset;
        r.length = p.length;
        r.buf = buf;
        r.chunk_events = chunk_events;
        r.error = None;
        r.covered = 0;
        r.content_chunks = 0;
        r.coverage.reset();
        r.contexts_seen.clear();
        r.error_chunks = 0;
        r.charged = p.charged;
        r.default_deadline = x.command_timeout.is_some();
        if r.default_deadline && !s.listed {
            s.listed = true;
            x.unarmed.push(p.slot);
        }
        x.in_flight += 1;
        x.bytes_in_flight += p.charged;
        self.tx.push_header(&p.header[..p.header_len]);
        if let Some(payload) = payload {
            self.tx.push_payload(payload);
        }
        p.cookie
    }

    /// Queues `NBD_CMD_READ` of `buf.len()` bytes at `offset` into `buf`
    /// (flags: [`CmdFlags::DF`]). The buffer comes back in
    /// [`Event::CommandDone`], filled; payload bytes land in it straight
    /// from the socket where possible. If the read is refused, the error
    /// hands `buf` back ([`Refused`]) and nothing is sent.
    pub fn read(
        &mut self,
        offset: u64,
        buf: BytesMut,
        flags: CmdFlags,
    ) -> Result<Cookie, Refused<BytesMut>> {
        self.read_inner(offset, buf, flags, false)
    }

    /// Like [`Connection::read`], and also reports each structured chunk as
    /// an [`Event::ReadChunk`] (libnbd's `pread_structured`).
    pub fn read_with_chunks(
        &mut self,
        offset: u64,
        buf: BytesMut,
        flags: CmdFlags,
    ) -> Result<Cookie, Refused<BytesMut>> {
        self.read_inner(offset, buf, flags, true)
    }

    fn read_inner(
        &mut self,
        offset: u64,
        buf: BytesMut,
        flags: CmdFlags,
        chunks: bool,
    ) -> Result<Cookie, Refused<BytesMut>> {
        let len = buf.len() as u64;
        let checked = self
            .need_ready("read")
            .and_then(|()| self.check_command(cmd::READ, flags, offset, len))
            .and_then(|flags| self.prepare(cmd::READ, flags, offset, len, None));
        match checked {
            Ok(p) => Ok(self.issue(p, Some(buf), None, chunks)),
            Err(error) => Err(Refused { error, buffer: buf }),
        }
    }

    /// Queues `NBD_CMD_WRITE` of `data` at `offset` (flags:
    /// [`CmdFlags::FUA`]; with extended headers [`CmdFlags::PAYLOAD_LEN`] is
    /// set automatically). The payload is sent from `data` itself, without
    /// a copy. If the write is refused, the error hands `data` back
    /// ([`Refused`]) and nothing is sent.
    pub fn write(
        &mut self,
        offset: u64,
        data: Bytes,
        flags: CmdFlags,
    ) -> Result<Cookie, Refused<Bytes>> {
        let len = data.len() as u64;
        let checked = self
            .need_ready("write")
            .and_then(|()| self.check_command(cmd::WRITE, flags, offset, len))
            .and_then(|flags| self.prepare(cmd::WRITE, flags, offset, len, Some(len)));
        match checked {
            Ok(p) => Ok(self.issue(p, None, Some(data), false)),
            Err(error) => Err(Refused {
                error,
                buffer: data,
            }),
        }
    }

    /// Checks and queues a command that carries no payload and expects no
    /// data back (flush, trim, cache, write zeroes, block status).
    fn bare_command(
        &mut self,
        call: &'static str,
        typ: u16,
        offset: u64,
        length: u64,
        flags: CmdFlags,
    ) -> Result<Cookie, UsageError> {
        self.need_ready(call)?;
        let flags = self.check_command(typ, flags, offset, length)?;
        let p = self.prepare(typ, flags, offset, length, None)?;
        Ok(self.issue(p, None, None, false))
    }

    /// Queues `NBD_CMD_FLUSH`.
    pub fn flush(&mut self, flags: CmdFlags) -> Result<Cookie, UsageError> {
        self.bare_command("flush", cmd::FLUSH, 0, 0, flags)
    }

    /// Queues `NBD_CMD_TRIM` of `length` bytes at `offset` (flags: `FUA`).
    pub fn trim(
        &mut self,
        offset: u64,
        length: u64,
        flags: CmdFlags,
    ) -> Result<Cookie, UsageError> {
        self.bare_command("trim", cmd::TRIM, offset, length, flags)
    }

    /// Queues `NBD_CMD_CACHE` (a prefetch hint).
    pub fn cache(
        &mut self,
        offset: u64,
        length: u64,
        flags: CmdFlags,
    ) -> Result<Cookie, UsageError> {
        self.bare_command("cache", cmd::CACHE, offset, length, flags)
    }

    /// Queues `NBD_CMD_WRITE_ZEROES` (libnbd's `zero`; flags: `FUA`,
    /// `NO_HOLE`, `FAST_ZERO`).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        length: u64,
        flags: CmdFlags,
    ) -> Result<Cookie, UsageError> {
        self.bare_command("zero", cmd::WRITE_ZEROES, offset, length, flags)
    }

    /// Queues `NBD_CMD_BLOCK_STATUS` for every negotiated context (flags:
    /// `REQ_ONE`). Each context's answer is an [`Event::BlockStatus`].
    pub fn block_status(
        &mut self,
        offset: u64,
        length: u64,
        flags: CmdFlags,
    ) -> Result<Cookie, UsageError> {
        self.bare_command("block_status", cmd::BLOCK_STATUS, offset, length, flags)
    }

    /// Queues `NBD_CMD_BLOCK_STATUS` limited to the given context ids (needs
    /// extended headers and `NBD_FLAG_BLOCK_STATUS_PAYLOAD`).
    pub fn block_status_filter(
        &mut self,
        offset: u64,
        length: u64,
        ids: &[u32],
        flags: CmdFlags,
    ) -> Result<Cookie, UsageError> {
        self.need_ready("block_status_filter")?;
        let flags = self.check_command(
            cmd::BLOCK_STATUS,
            flags | CmdFlags::PAYLOAD_LEN,
            offset,
            length,
        )?;
        if self.xmit.strict.contains(Strict::COMMANDS) {
            if self.xmit.flags & tf::BLOCK_STATUS_PAYLOAD == 0 {
                return Err(UsageError::NotAdvertised("block status payload (filter)"));
            }
            if ids.is_empty() {
                return Err(UsageError::UnknownContext(String::new()));
            }
            if let Some(id) = ids.iter().find(|id| !self.xmit.contexts.contains(id)) {
                return Err(UsageError::UnknownContext(format!("id {id}")));
            }
        }
        let mut payload = BytesMut::with_capacity(8 + 4 * ids.len());
        encode_block_status_filter(length, ids, &mut payload);
        let payload = payload.freeze();
        let p = self.prepare(
            cmd::BLOCK_STATUS,
            flags,
            offset,
            length,
            Some(payload.len() as u64),
        )?;
        Ok(self.issue(p, None, Some(payload), false))
    }

    /// Queues `NBD_CMD_DISC` (soft disconnect). Requests already in flight
    /// still complete; the connection ends with
    /// [`crate::CloseReason::Disconnected`] when the server closes (or the
    /// transport fails) after answering them all. In option mode use
    /// `opt_abort` instead.
    ///
    /// If the server already hung up with nothing in flight
    /// ([`crate::CloseReason::ServerClosed`] with `lost == 0`), there is
    /// nothing left to end and nothing was lost: this returns `Ok(())` and
    /// sends nothing. On a connection that ended any other way it is a
    /// [`UsageError::WrongPhase`].
    pub fn disconnect(&mut self) -> Result<(), UsageError> {
        if let State::Closed(crate::CloseReason::ServerClosed { lost: 0, .. }) = self.state {
            return Ok(());
        }
        self.need_ready("disconnect")?;
        self.send_disc();
        Ok(())
    }

    fn send_disc(&mut self) {
        let h = RequestHeader {
            flags: 0,
            typ: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        if let Ok((b, n)) = encode_request_array(&h, self.xmit.mode == HeaderMode::Extended) {
            self.tx.push_header(&b[..n]);
        }
        self.xmit.disc_sent = true;
    }

    /// True if a request carrying `bytes` of payload fits within the
    /// in-flight limits now (otherwise submitting it returns
    /// [`UsageError::InFlightLimit`]; wait for a completion first).
    pub fn has_room(&self, bytes: u64) -> bool {
        self.check_limits(bytes).is_ok()
    }

    /// Requests queued or awaiting their reply: the slots of the in-flight
    /// table in use, including those of abandoned requests (timed out or
    /// cancelled) whose late reply is still due.
    pub fn in_flight(&self) -> usize {
        self.xmit.in_flight
    }

    /// How many of [`Connection::in_flight`] are abandoned: completed
    /// towards the caller (timed out or cancelled) while the server's reply
    /// is still due. They hold their slots (and count against the limits)
    /// until that reply arrives and is dropped.
    pub fn abandoned(&self) -> usize {
        self.xmit.abandoned()
    }

    // ----- deadlines and cancellation -----

    /// Gives one in-flight command a deadline (`None` removes it), replacing
    /// the default of [`Config::command_timeout`]. Call it right after
    /// submitting the command, or later to extend or shorten it; when the
    /// deadline passes, [`Connection::handle_timeout`] completes the
    /// command with [`CommandError::TimedOut`] (see
    /// [`Config::on_command_timeout`]). Fails with
    /// [`UsageError::NotInFlight`] if the cookie's command already
    /// completed.
    pub fn set_deadline(
        &mut self,
        cookie: Cookie,
        deadline: Option<Instant>,
    ) -> Result<(), UsageError> {
        let x = &mut self.xmit;
        let slot = x
            .waiting_slot(cookie)
            .ok_or(UsageError::NotInFlight(cookie))?;
        x.slots[slot as usize].req.default_deadline = false;
        match deadline {
            Some(at) => x.deadlines.set(slot, at),
            None => x.deadlines.remove(slot),
        }
        Ok(())
    }

    /// Sets the default deadline of the commands submitted from now on
    /// ([`Config::command_timeout`]; `None`: none). Commands already in
    /// flight keep theirs.
    pub fn set_command_timeout(&mut self, timeout: Option<Duration>) {
        self.cfg.command_timeout = timeout;
        self.xmit.command_timeout = timeout;
    }

    /// Cancels an in-flight command: it completes at once, in the next
    /// [`Event::CommandDone`], with [`CommandError::Cancelled`] and its
    /// buffer. The request may already be on its way, so the server may
    /// still carry it out (a cancelled write may be applied); its slot
    /// stays reserved until the server's reply arrives, which is then read
    /// and dropped without touching the buffer you got back. The
    /// connection stays usable. Fails with [`UsageError::NotInFlight`] if
    /// the command already completed (its completion may be waiting in the
    /// event queue).
    pub fn cancel(&mut self, cookie: Cookie) -> Result<(), UsageError> {
        let x = &mut self.xmit;
        let slot = x
            .waiting_slot(cookie)
            .ok_or(UsageError::NotInFlight(cookie))?;
        let command = command_name(x.slots[slot as usize].req.cmd);
        x.abandon(slot, CommandError::Cancelled { command }, &mut self.events);
        Ok(())
    }

    /// The largest write payload this connection sends (libnbd's
    /// `get_block_size(PAYLOAD)`).
    pub fn payload_max(&self) -> u64 {
        self.xmit.payload_max
    }

    // ----- replies -----

    /// One step of the reply parser; `Ok(false)` means more bytes are needed.
    pub(crate) fn step_transmission(&mut self) -> Result<bool, ProtocolError> {
        let progressed = self.step_reply()?;
        if self.xmit.want_disc() {
            self.send_disc();
        }
        Ok(progressed)
    }

    fn step_reply(&mut self) -> Result<bool, ProtocolError> {
        let x = &mut self.xmit;
        match x.rx {
            Rx::Header => {
                let data = self.rx.data();
                let Some(m) = data.first_chunk::<4>() else {
                    return Ok(false);
                };
                let hlen = wrep::reply_header_len(u32::from_be_bytes(*m), x.mode)?;
                let Some(hb) = data.get(..hlen) else {
                    return Ok(false);
                };
                let h = wrep::parse_reply_header(hb, x.mode)?;
                self.rx.consume(hlen);
                self.handle_reply_header(h)?;
                Ok(true)
            }
            Rx::Data {
                slot,
                pos,
                end,
                done,
            } => {
                let avail = self.rx.len();
                if avail == 0 {
                    return Ok(false);
                }
                let n = avail.min(end - pos);
                if let Some(dst) = x.slots[slot as usize]
                    .req
                    .buf
                    .as_mut()
                    .and_then(|b| b.get_mut(pos..pos + n))
                {
                    dst.copy_from_slice(&self.rx.data()[..n]);
                }
                self.rx.consume(n);
                let pos = pos + n;
                if pos == end {
                    x.rx = Rx::Header;
                    if done {
                        x.finish(slot, &mut self.events)?;
                    }
                } else {
                    x.rx = Rx::Data {
                        slot,
                        pos,
                        end,
                        done,
                    };
                }
                Ok(true)
            }
            Rx::DataPrefix {
                slot,
                length,
                flags,
            } => {
                let Some(b) = self.rx.data().first_chunk::<8>() else {
                    return Ok(false);
                };
                let off = wrep::parse_offset_data_prefix(b);
                self.rx.consume(8);
                let len = length - 8;
                let start = x.add_content(slot, off, len)?;
                let r = &x.slots[slot as usize].req;
                if r.chunk_events {
                    let cookie = x.cookie(slot);
                    self.events.push_back(Event::ReadChunk {
                        cookie,
                        offset: off,
                        length: len,
                        kind: ReadChunkKind::Data,
                    });
                }
                x.rx = Rx::Data {
                    slot,
                    pos: start,
                    end: start + len as usize,
                    done: flags & reply_flags::DONE != 0,
                };
                Ok(true)
            }
            Rx::Buffered {
                slot,
                typ,
                flags,
                length,
            } => {
                let Some(p) = self.rx.data().get(..length) else {
                    return Ok(false);
                };
                // Copy into a scratch buffer kept across replies (no allocation
                // in steady state), so the receive buffer can move on.
                let mut scratch = std::mem::take(&mut x.scratch);
                scratch.clear();
                scratch.extend_from_slice(p);
                self.rx.consume(length);
                self.xmit.rx = Rx::Header;
                let r = self.handle_buffered_chunk(slot, typ, flags, &scratch);
                self.xmit.scratch = scratch;
                r
            }
            Rx::StatusHeader {
                slot,
                typ,
                flags,
                length,
            } => {
                let parsed = wrep::parse_block_status_head(typ, length, self.rx.data())?;
                let Some((head, used)) = parsed else {
                    return Ok(false);
                };
                let context = head.context_id;
                self.rx.consume(used);
                if !x.contexts.contains(&context) {
                    let cookie = x.cookie(slot).0;
                    return Err(ProtocolError::UnknownContextId { cookie, context });
                }
                let cookie = x.cookie(slot).0;
                let r = x.req(slot);
                if r.contexts_seen.contains(&context) {
                    return Err(ProtocolError::DuplicateContext { cookie, context });
                }
                r.contexts_seen.push(context);
                x.extents.clear();
                // All of it at once, so the capacity is exactly what the
                // length announced (checked against `max_extent_bytes`).
                let n = usize::try_from(head.descriptors).unwrap_or(usize::MAX);
                x.extents
                    .reserve_exact(n.min(crate::reply_bounds::max_extents(&x.limits)));
                x.rx = Rx::StatusBody {
                    slot,
                    typ,
                    flags,
                    context,
                    remaining: head.descriptors,
                };
                Ok(true)
            }
            Rx::StatusBody {
                slot,
                typ,
                flags,
                context,
                remaining,
            } => {
                let before = x.extents.len();
                let consumed = wrep::parse_block_status_extents(
                    typ,
                    self.rx.data(),
                    remaining,
                    &mut x.extents,
                )?;
                if consumed == 0 {
                    return Ok(false);
                }
                self.rx.consume(consumed);
                let left = remaining - (x.extents.len() - before) as u64;
                if left > 0 {
                    x.rx = Rx::StatusBody {
                        slot,
                        typ,
                        flags,
                        context,
                        remaining: left,
                    };
                    return Ok(true);
                }
                x.rx = Rx::Header;
                self.finish_status_chunk(slot, flags, context)?;
                Ok(true)
            }
        }
    }

    fn finish_status_chunk(
        &mut self,
        slot: u32,
        flags: u16,
        context: u32,
    ) -> Result<(), ProtocolError> {
        let x = &mut self.xmit;
        let r = &x.slots[slot as usize].req;
        let n = x.extents.len();
        let cookie = x.cookie(slot).0;
        let Some(first) = x.extents.first() else {
            return Err(ProtocolError::NoExtents { cookie });
        };
        if r.flags & cf::REQ_ONE != 0 && (n != 1 || first.length > r.length) {
            return Err(ProtocolError::ReqOneViolated {
                cookie,
                count: n,
                first_length: first.length,
                request_length: r.length,
            });
        }
        let head: u64 = x.extents[..n - 1]
            .iter()
            .fold(0u64, |a, e| a.saturating_add(e.length));
        if n > 1 && head >= r.length {
            return Err(ProtocolError::ExtentsPastRequest {
                cookie,
                count: n - 1,
                sum: head,
                request_length: r.length,
            });
        }
        let cookie = x.cookie(slot);
        // An abandoned request's late answer is checked, then dropped.
        if x.slots[slot as usize].state == SlotState::Waiting {
            let extents = std::mem::take(&mut x.extents);
            self.events.push_back(Event::BlockStatus {
                cookie,
                context_id: context,
                extents,
            });
        }
        if flags & reply_flags::DONE != 0 {
            x.finish(slot, &mut self.events)?;
        }
        Ok(())
    }

    fn handle_reply_header(&mut self, h: ReplyHeader) -> Result<(), ProtocolError> {
        let x = &mut self.xmit;
        match h {
            ReplyHeader::Simple { error, cookie } => {
                let slot = x.lookup(cookie)?;
                let r = &x.slots[slot as usize].req;
                if r.cmd == cmd::READ && x.mode != HeaderMode::Simple && error == 0 {
                    return Err(ProtocolError::SimpleReplyToStructuredRead { cookie });
                }
                if error != 0 {
                    let e = CommandError::Server {
                        errno: NbdErrno(error),
                        message: None,
                        offset: None,
                    };
                    x.set_error(slot, e);
                    return x.finish(slot, &mut self.events);
                }
                if r.cmd == cmd::READ && r.length > 0 {
                    let end = r.length as usize;
                    let cookie = x.cookie(slot);
                    let r = x.req(slot);
                    r.covered = r.length;
                    if r.chunk_events {
                        let (offset, length) = (r.offset, r.length);
                        self.events.push_back(Event::ReadChunk {
                            cookie,
                            offset,
                            length,
                            kind: ReadChunkKind::Data,
                        });
                    }
                    x.rx = Rx::Data {
                        slot,
                        pos: 0,
                        end,
                        done: true,
                    };
                    return Ok(());
                }
                let r = x.req(slot);
                r.covered = r.length;
                x.finish(slot, &mut self.events)
            }
            ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                offset,
                length,
            } => {
                let slot = x.lookup(cookie)?;
                let r = &x.slots[slot as usize].req;
                if let Some(o) = offset {
                    if o != r.offset {
                        return Err(ProtocolError::ReplyOffsetMismatch {
                            cookie,
                            expected: r.offset,
                            got: o,
                        });
                    }
                }
                let too_long = |limit: u64| ProtocolError::ChunkTooLong {
                    cookie,
                    chunk_type: typ,
                    length,
                    limit,
                };
                // Spec §3.11: whatever the type, a length no legal chunk can
                // have fails on the header, before any payload is awaited.
                let limit = x.dos_limit.saturating_add(64);
                if length > limit {
                    return Err(too_long(limit));
                }
                let done = flags & reply_flags::DONE != 0;
                let is_read = r.cmd == cmd::READ;
                let is_status = r.cmd == cmd::BLOCK_STATUS;
                match typ {
                    chunk::NONE => {
                        if length != 0 || !done {
                            return Err(ProtocolError::BadNoneChunk {
                                cookie,
                                length,
                                done,
                            });
                        }
                        // `finish` checks that a successful read is covered.
                        x.finish(slot, &mut self.events)
                    }
                    chunk::OFFSET_DATA if is_read => {
                        wrep::check_offset_data_len(length)?;
                        // 8 bytes of offset, then at most the whole request.
                        let limit = r.length.saturating_add(8);
                        if length > limit {
                            return Err(too_long(limit));
                        }
                        x.rx = Rx::DataPrefix {
                            slot,
                            length,
                            flags,
                        };
                        Ok(())
                    }
                    chunk::OFFSET_HOLE if is_read => {
                        if length != 12 {
                            return Err(WireError::BadLength {
                                what: "NBD_REPLY_TYPE_OFFSET_HOLE",
                                len: length,
                            }
                            .into());
                        }
                        x.rx = Rx::Buffered {
                            slot,
                            typ,
                            flags,
                            length: 12,
                        };
                        Ok(())
                    }
                    chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT if is_status => {
                        let ext = x.mode == HeaderMode::Extended;
                        let wide = typ == chunk::BLOCK_STATUS_EXT;
                        if ext != wide {
                            return Err(ProtocolError::ChunkTypeWrongMode {
                                cookie,
                                chunk_type: typ,
                                mode: x.mode,
                            });
                        }
                        let max = crate::reply_bounds::max_extents(&x.limits);
                        wrep::check_block_status_len(typ, length, max)?;
                        x.rx = Rx::StatusHeader {
                            slot,
                            typ,
                            flags,
                            length,
                        };
                        Ok(())
                    }
                    t if t & chunk::FLAG_ERROR != 0 => {
                        let limit = x.limits.max_error_chunks;
                        let seen = &mut x.slots[slot as usize].req.error_chunks;
                        crate::reply_bounds::count_error_chunk(seen, limit, cookie)?;
                        // Error value, message length, a message of at most
                        // 4096 bytes (spec "Structured reply types"), and the
                        // offset of ERROR_OFFSET. Unknown error types may
                        // carry more; they are bounded by the buffer.
                        let known = match t {
                            chunk::ERROR => Some(6),
                            chunk::ERROR_OFFSET => Some(14),
                            _ => None,
                        };
                        if let Some(fixed) = known {
                            let limit = fixed + MAX_STRING_LEN as u64;
                            if length > limit {
                                return Err(too_long(limit));
                            }
                        }
                        if length > MAX_BUFFERED_CHUNK {
                            return Err(WireError::BadLength {
                                what: "error chunk",
                                len: length,
                            }
                            .into());
                        }
                        x.rx = Rx::Buffered {
                            slot,
                            typ,
                            flags,
                            length: length as usize,
                        };
                        Ok(())
                    }
                    // Rule 96: unknown or unexpected non-error chunk type.
                    t => Err(ProtocolError::UnexpectedChunkType {
                        command: command_name(r.cmd),
                        cookie,
                        chunk_type: t,
                    }),
                }
            }
        }
    }

    fn handle_buffered_chunk(
        &mut self,
        slot: u32,
        typ: u16,
        flags: u16,
        p: &[u8],
    ) -> Result<bool, ProtocolError> {
        let x = &mut self.xmit;
        let done = flags & reply_flags::DONE != 0;
        if typ == chunk::OFFSET_HOLE {
            let (off, len) = wrep::parse_offset_hole(p)?;
            let start = x.add_content(slot, off, u64::from(len))?;
            let r = x.req(slot);
            if let Some(b) = r
                .buf
                .as_mut()
                .and_then(|b| b.get_mut(start..start + len as usize))
            {
                b.fill(0);
            }
            if r.chunk_events {
                let cookie = x.cookie(slot);
                self.events.push_back(Event::ReadChunk {
                    cookie,
                    offset: off,
                    length: u64::from(len),
                    kind: ReadChunkKind::Hole,
                });
            }
        } else {
            let e = wrep::parse_error_chunk(typ, p)?;
            let r = &x.slots[slot as usize].req;
            if let Some(o) = e.offset {
                if o < r.offset || o >= r.offset.saturating_add(r.length.max(1)) {
                    let cookie = x.cookie(slot).0;
                    return Err(ProtocolError::ErrorOffsetOutOfRange { cookie, offset: o });
                }
            }
            let message =
                (!e.message.is_empty()).then(|| String::from_utf8_lossy(e.message).into_owned());
            let (errno_v, offset) = (e.error, e.offset);
            if r.chunk_events {
                let cookie = x.cookie(slot);
                self.events.push_back(Event::ReadChunk {
                    cookie,
                    offset: offset.unwrap_or(r.offset),
                    length: 0,
                    kind: ReadChunkKind::Error,
                });
            }
            x.set_error(
                slot,
                CommandError::Server {
                    errno: NbdErrno(errno_v),
                    message,
                    offset,
                },
            );
        }
        if done {
            x.finish(slot, &mut self.events)?;
        }
        Ok(true)
    }
}
