//! The handshake and option-haggling state machine: greeting, client flags,
//! libnbd's automatic sequence (STARTTLS, EXTENDED_HEADERS,
//! STRUCTURED_REPLY, SET_META_CONTEXT, GO with the EXPORT_NAME fallback), and
//! option mode, where the caller sends options one at a time.

use crate::client::Connection;
use crate::config::TlsMode;
use crate::consts::{
    client_flags as cf, handshake_flags as hf, info, rep, transmission_flags as tf, MAX_STRING_LEN,
    OPTION_REPLY_HEADER_LEN, ZERO_PAD_LEN,
};
use crate::error::{OptionError, ProtocolError, RepError, UsageError};
use crate::event::{BlockSize, CloseReason, Event, ExportInfo, OptionKind, Protocol};
use crate::wire::handshake::{
    self, Style, EXPORT_NAME_REPLY_LEN, GREETING_PREFIX_LEN, OLDSTYLE_FIELDS_LEN,
};
use crate::wire::option::{self as wopt, InfoReply, OptionReplyHeader};
use crate::wire::reply::HeaderMode;

/// Longest `NBD_REP_SERVER` payload accepted: a maximal name and a generous
/// description.
const MAX_SERVER_REPLY: u32 = 4 + MAX_STRING_LEN as u32 + 65536;
/// Longest `NBD_REP_INFO` payload buffered; longer ones of unknown type are
/// skipped without buffering.
const MAX_INFO_REPLY: u32 = 2 + MAX_STRING_LEN as u32;
/// Longest `NBD_REP_INFO` payload of an unknown type that is skipped;
/// longer ones fail on their header (no legal reply needs more).
const MAX_SKIPPED_INFO: u32 = 1 << 20;
/// Longest `NBD_REP_META_CONTEXT` payload (id + maximal name).
const MAX_META_CONTEXT_REPLY: u32 = 4 + MAX_STRING_LEN as u32;

/// Internal state of the connection.
#[derive(Debug)]
pub(crate) enum State {
    /// Waiting for the 16-byte greeting prefix.
    Greeting,
    /// Oldstyle: waiting for size, flags and 124 zero bytes.
    Oldstyle,
    /// Newstyle: waiting for the 16-bit handshake flags.
    HandshakeFlags,
    /// Idle between options (option mode).
    Negotiating,
    /// An option was sent; its reply is expected.
    /// (Boxed: the state moves on every step, and this is its largest part.)
    Option(Box<Pending>),
    /// `NBD_OPT_EXPORT_NAME` was sent; its special reply is expected.
    ExportNameReply,
    /// STARTTLS was acknowledged; the adapter runs the TLS handshake.
    Tls,
    /// Transmission phase.
    Transmission,
    /// Over, for this reason.
    Closed(CloseReason),
}

impl State {
    /// A short name for `Debug` output.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            State::Greeting => "greeting",
            State::Oldstyle => "oldstyle greeting",
            State::HandshakeFlags => "handshake flags",
            State::Negotiating => "negotiating",
            State::Option(_) => "option reply",
            State::ExportNameReply => "export name reply",
            State::Tls => "TLS handshake",
            State::Transmission => "transmission",
            State::Closed(_) => "closed",
        }
    }
}

/// Who asked for the option in flight, which decides what happens when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The automatic connect sequence: failures are handled internally.
    Auto,
    /// The caller's `opt_*` call: results become events.
    User,
    /// A SET_META_CONTEXT sent on the caller's behalf before INFO
    /// (`go` false) or GO.
    Before { go: bool },
}

/// Next step of the automatic sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AutoStep {
    StartTls,
    ExtendedHeaders,
    StructuredReply,
    Pause,
    SetMeta,
    Go,
    Done,
}

/// How far the reply to the option in flight has been read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReplyStage {
    Header,
    Payload(OptionReplyHeader),
    /// A long INFO reply: its 2-byte type decides whether to skip it.
    InfoType(OptionReplyHeader),
    /// Skipping an unknown long INFO reply.
    Skip(u32),
}

/// An option answered by an ACK or an error alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlainOption {
    Abort,
    StartTls,
    StructuredReply,
    ExtendedHeaders,
}

impl PlainOption {
    fn kind(self) -> OptionKind {
        match self {
            PlainOption::Abort => OptionKind::Abort,
            PlainOption::StartTls => OptionKind::StartTls,
            PlainOption::StructuredReply => OptionKind::StructuredReply,
            PlainOption::ExtendedHeaders => OptionKind::ExtendedHeaders,
        }
    }
}

/// The option in flight, with what it gathers from its replies until it
/// ends.
#[derive(Debug)]
pub(crate) enum Op {
    Plain(PlainOption),
    /// `NBD_OPT_LIST`: its exports are reported as they arrive; how many
    /// and how many bytes of names and descriptions so far, against
    /// [`crate::Limits::max_exports`] and
    /// [`crate::Limits::max_export_list_bytes`].
    List {
        exports: usize,
        bytes: u64,
    },
    /// INFO (`go` false) or GO: what the server said about the export so far.
    Export {
        go: bool,
        info: ExportInfo,
        asked_block_size: bool,
        /// Whether `NBD_INFO_EXPORT` arrived.
        seen: bool,
    },
    /// LIST (`set` false) or SET_META_CONTEXT: contexts received so far,
    /// and the export the request named.
    Meta {
        set: bool,
        list: Vec<(u32, String)>,
        export: String,
    },
}

impl Op {
    pub(crate) fn kind(&self) -> OptionKind {
        match self {
            Op::Plain(o) => o.kind(),
            Op::List { .. } => OptionKind::List,
            Op::Export { go: true, .. } => OptionKind::Go,
            Op::Export { go: false, .. } => OptionKind::Info,
            Op::Meta { set: true, .. } => OptionKind::SetMetaContext,
            Op::Meta { set: false, .. } => OptionKind::ListMetaContext,
        }
    }
}

/// The option in flight.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) origin: Origin,
    pub(crate) stage: ReplyStage,
    pub(crate) op: Op,
}

/// How one step over the reply to the option in flight ended.
enum OptionStep {
    /// More bytes are needed.
    More,
    /// Part of the reply was consumed; the option is still in flight.
    Progress,
    /// `NBD_REP_ACK`: the option succeeded.
    Acked,
    /// An error reply: the option failed.
    Failed(OptionError),
}

fn check_string(what: &'static str, s: &str) -> Result<(), UsageError> {
    if s.len() > MAX_STRING_LEN || s.contains('\0') {
        return Err(UsageError::BadString { what, len: s.len() });
    }
    Ok(())
}

/// Rule 40/46: a query or context name starts with a non-empty namespace
/// of printable characters without whitespace, then a colon.
fn check_query(q: &str) -> Result<(), UsageError> {
    check_string("meta context query", q)?;
    match q.split_once(':') {
        Some((ns, _)) if !ns.is_empty() && ns.chars().all(|c| c.is_ascii_graphic()) => Ok(()),
        _ => Err(UsageError::BadQuery(q.to_owned())),
    }
}

impl Connection {
    // ----- the caller's option-mode commands -----

    fn need_negotiating(&self, call: &'static str) -> Result<(), UsageError> {
        if matches!(self.state, State::Negotiating) {
            Ok(())
        } else {
            Err(UsageError::WrongPhase {
                call,
                needed: "negotiating (option mode, no option in flight)",
                actual: self.phase().name(),
            })
        }
    }

    fn need_fixed(&self, what: &str) -> Result<(), UsageError> {
        if self.protocol == Some(Protocol::NewstyleFixed) {
            Ok(())
        } else {
            Err(UsageError::Unsupported(format!(
                "server is not using fixed newstyle protocol: {what} is not possible"
            )))
        }
    }

    /// Changes the export that GO/INFO will name (option mode). Forgets what
    /// was learnt about the previous export.
    pub fn set_export_name(&mut self, name: &str) -> Result<(), UsageError> {
        check_string("export name", name)?;
        if !matches!(
            self.state,
            State::Greeting | State::HandshakeFlags | State::Negotiating
        ) {
            return Err(UsageError::WrongPhase {
                call: "set_export_name",
                needed: "created or negotiating",
                actual: self.phase().name(),
            });
        }
        if self.cfg.export_name != name {
            self.cfg.export_name = name.to_owned();
            self.info = None;
        }
        Ok(())
    }

    /// Replaces the list of meta contexts that GO/INFO select automatically.
    pub fn set_meta_contexts<S: AsRef<str>>(&mut self, names: &[S]) -> Result<(), UsageError> {
        for n in names {
            check_query(n.as_ref())?;
        }
        self.cfg.meta_contexts = names.iter().map(|n| n.as_ref().to_owned()).collect();
        Ok(())
    }

    /// Sends `NBD_OPT_LIST`: each export becomes [`Event::ExportListed`],
    /// then [`Event::OptionSucceeded`] or [`Event::OptionError`].
    pub fn opt_list(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_list")?;
        self.need_fixed("listing exports")?;
        self.send_op(
            Op::List {
                exports: 0,
                bytes: 0,
            },
            &[],
            Origin::User,
        );
        Ok(())
    }

    /// Sends `NBD_OPT_INFO` for the current export name (after an automatic
    /// SET_META_CONTEXT when contexts are configured). On success the
    /// getters report the export and [`Event::OptionSucceeded`] follows.
    pub fn opt_info(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_info")?;
        self.need_fixed("NBD_OPT_INFO")?;
        self.start_info_or_go(false);
        Ok(())
    }

    /// Sends `NBD_OPT_GO` for the current export name (after an automatic
    /// SET_META_CONTEXT when contexts are configured), falling back to
    /// `NBD_OPT_EXPORT_NAME` if the server does not know GO. Success is
    /// [`Event::GoSucceeded`]; failure is [`Event::OptionError`] and the
    /// connection stays in option mode (or ends, if the server hangs up).
    pub fn opt_go(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_go")?;
        if self.protocol == Some(Protocol::Newstyle) {
            self.send_export_name();
        } else {
            self.start_info_or_go(true);
        }
        Ok(())
    }

    /// Sends `NBD_OPT_ABORT`; the connection ends with
    /// [`CloseReason::Aborted`] when the server acknowledges or closes.
    pub fn opt_abort(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_abort")?;
        if self.protocol != Some(Protocol::NewstyleFixed) {
            // No soft disconnect exists here: hang up (spec §1.4).
            self.close(CloseReason::Aborted);
            return Ok(());
        }
        self.send_option(PlainOption::Abort, Origin::User);
        Ok(())
    }

    /// Sends `NBD_OPT_STRUCTURED_REPLY`; succeeds at once without sending
    /// anything if structured replies are already on.
    pub fn opt_structured_reply(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_structured_reply")?;
        self.need_fixed("NBD_OPT_STRUCTURED_REPLY")?;
        if self.header_mode != HeaderMode::Simple {
            self.events
                .push_back(Event::OptionSucceeded(OptionKind::StructuredReply));
            return Ok(());
        }
        self.send_option(PlainOption::StructuredReply, Origin::User);
        Ok(())
    }

    /// Sends `NBD_OPT_EXTENDED_HEADERS`; succeeds at once without sending
    /// anything if they are already on.
    pub fn opt_extended_headers(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_extended_headers")?;
        self.need_fixed("NBD_OPT_EXTENDED_HEADERS")?;
        if self.header_mode == HeaderMode::Extended {
            self.events
                .push_back(Event::OptionSucceeded(OptionKind::ExtendedHeaders));
            return Ok(());
        }
        self.send_option(PlainOption::ExtendedHeaders, Origin::User);
        Ok(())
    }

    /// Sends `NBD_OPT_STARTTLS`. On acknowledgement the core emits
    /// [`Event::StartTls`]; the adapter runs the TLS handshake and calls
    /// [`Connection::tls_established`].
    pub fn opt_starttls(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_starttls")?;
        self.need_fixed("STARTTLS")?;
        if self.tls_on {
            return Err(UsageError::Unsupported(
                "TLS is already running (rule 55)".into(),
            ));
        }
        self.send_option(PlainOption::StartTls, Origin::User);
        Ok(())
    }

    /// Sends `NBD_OPT_LIST_META_CONTEXT` for the current export with these
    /// queries (empty = every context). Each reply is an [`Event::MetaContext`],
    /// reported only once the server acknowledged (rule 41).
    pub fn opt_list_meta_context<S: AsRef<str>>(
        &mut self,
        queries: &[S],
    ) -> Result<(), UsageError> {
        self.need_negotiating("opt_list_meta_context")?;
        self.need_fixed("NBD_OPT_LIST_META_CONTEXT")?;
        for q in queries {
            check_query(q.as_ref())?;
        }
        self.send_meta_option(false, queries, Origin::User);
        Ok(())
    }

    /// Sends `NBD_OPT_SET_META_CONTEXT` for the current export with these
    /// queries; the replies replace the negotiated context list (rule 44).
    pub fn opt_set_meta_context<S: AsRef<str>>(&mut self, queries: &[S]) -> Result<(), UsageError> {
        self.need_negotiating("opt_set_meta_context")?;
        self.need_fixed("NBD_OPT_SET_META_CONTEXT")?;
        for q in queries {
            check_query(q.as_ref())?;
        }
        self.send_meta_option(true, queries, Origin::User);
        Ok(())
    }

    /// Tells the core that the adapter finished the TLS handshake after
    /// [`Event::StartTls`]; everything negotiated before is forgotten (rule 38).
    pub fn tls_established(&mut self) -> Result<(), UsageError> {
        if !matches!(self.state, State::Tls) {
            return Err(UsageError::WrongPhase {
                call: "tls_established",
                needed: "waiting for the TLS handshake",
                actual: self.phase().name(),
            });
        }
        self.tls_on = true;
        self.header_mode = HeaderMode::Simple;
        self.contexts.clear();
        self.contexts_export = None;
        self.state = State::Negotiating;
        if self.auto != AutoStep::Done {
            self.advance_auto();
        } else {
            self.events
                .push_back(Event::OptionSucceeded(OptionKind::StartTls));
        }
        Ok(())
    }

    // ----- sending -----

    fn send_option(&mut self, o: PlainOption, origin: Origin) {
        self.send_op(Op::Plain(o), &[], origin);
    }

    fn send_op(&mut self, op: Op, data: &[u8], origin: Origin) {
        let code = op.kind().code();
        if matches!(self.state, State::Negotiating)
            && origin != Origin::Auto
            && self.handshake_timer != crate::deadline::HandshakeTimer::Off
        {
            // The caller had the turn (option mode); the server gets a full
            // timeout again, started at the next time input.
            self.handshake_timer = crate::deadline::HandshakeTimer::Suspended;
        }
        self.tx.push_message(|b| wopt::encode_option(code, data, b));
        self.state = State::Option(Box::new(Pending {
            origin,
            stage: ReplyStage::Header,
            op,
        }));
    }

    /// Sends LIST_META_CONTEXT (`set` false) or SET_META_CONTEXT.
    fn send_meta_option<S: AsRef<str>>(&mut self, set: bool, queries: &[S], origin: Origin) {
        let mut data = bytes::BytesMut::new();
        let export = self.cfg.export_name.clone();
        wopt::encode_meta_context_request(&export, queries, &mut data);
        let op = Op::Meta {
            set,
            list: Vec::new(),
            export,
        };
        self.send_op(op, &data, origin);
    }

    fn want_auto_meta(&self) -> bool {
        self.cfg.request_meta_context
            && !self.cfg.meta_contexts.is_empty()
            && self.header_mode != HeaderMode::Simple
    }

    /// INFO (`go` false) or GO, after SET_META_CONTEXT if contexts are wanted.
    fn start_info_or_go(&mut self, go: bool) {
        if self.want_auto_meta() {
            let queries = self.cfg.meta_contexts.clone();
            self.send_meta_option(true, &queries, Origin::Before { go });
        } else {
            self.send_info_or_go(go, Origin::User, self.cfg.request_block_size);
        }
    }

    fn send_info_or_go(&mut self, go: bool, origin: Origin, block_size: bool) {
        let mut infos = Vec::with_capacity(3);
        // Extended headers: always ask for block sizes (spec §2.3.10).
        let block_size = block_size || self.header_mode == HeaderMode::Extended;
        if block_size {
            infos.push(info::BLOCK_SIZE);
        }
        if self.cfg.full_info {
            infos.push(info::NAME);
            infos.push(info::DESCRIPTION);
        }
        let mut data = bytes::BytesMut::new();
        wopt::encode_info_request(&self.cfg.export_name, &infos, &mut data);
        let op = Op::Export {
            go,
            info: ExportInfo {
                name: self.cfg.export_name.clone(),
                ..ExportInfo::default()
            },
            asked_block_size: block_size,
            seen: false,
        };
        self.send_op(op, &data, origin);
    }

    fn send_export_name(&mut self) {
        let name = self.cfg.export_name.clone();
        self.tx.push_message(|b| {
            wopt::encode_option(OptionKind::ExportName.code(), name.as_bytes(), b)
        });
        self.state = State::ExportNameReply;
    }

    /// Sends `NBD_OPT_ABORT` and ends the connection at once (automatic
    /// mode gives up; rule 16 requires the soft disconnect).
    fn abort_and_close(&mut self, reason: CloseReason) {
        if self.protocol == Some(Protocol::NewstyleFixed) {
            self.tx
                .push_message(|b| wopt::encode_option(OptionKind::Abort.code(), &[], b));
        }
        self.close(reason);
    }

    /// Runs the automatic sequence until it sends an option or pauses.
    fn advance_auto(&mut self) {
        loop {
            match self.auto {
                AutoStep::StartTls => {
                    self.auto = AutoStep::ExtendedHeaders;
                    if self.cfg.tls != TlsMode::Disable && !self.tls_on {
                        self.send_option(PlainOption::StartTls, Origin::Auto);
                        return;
                    }
                }
                AutoStep::ExtendedHeaders => {
                    self.auto = AutoStep::StructuredReply;
                    if self.cfg.request_structured_replies
                        && self.cfg.request_extended_headers
                        && self.header_mode != HeaderMode::Extended
                    {
                        self.send_option(PlainOption::ExtendedHeaders, Origin::Auto);
                        return;
                    }
                }
                AutoStep::StructuredReply => {
                    self.auto = AutoStep::Pause;
                    if self.cfg.request_structured_replies && self.header_mode == HeaderMode::Simple
                    {
                        self.send_option(PlainOption::StructuredReply, Origin::Auto);
                        return;
                    }
                }
                AutoStep::Pause => {
                    if self.cfg.opt_mode {
                        self.auto = AutoStep::Done;
                        self.state = State::Negotiating;
                        return;
                    }
                    self.auto = AutoStep::SetMeta;
                }
                AutoStep::SetMeta => {
                    self.auto = AutoStep::Go;
                    if self.want_auto_meta() {
                        let q = self.cfg.meta_contexts.clone();
                        self.send_meta_option(true, &q, Origin::Auto);
                        return;
                    }
                }
                AutoStep::Go => {
                    self.auto = AutoStep::Done;
                    let bs = self.cfg.request_block_size;
                    self.send_info_or_go(true, Origin::Auto, bs);
                    return;
                }
                AutoStep::Done => {
                    self.state = State::Negotiating;
                    return;
                }
            }
        }
    }

    // ----- receiving -----

    /// One step of the state machine over buffered input, whatever the
    /// phase; `Ok(false)` means more bytes are needed.
    pub(crate) fn step(&mut self) -> Result<bool, ProtocolError> {
        // The hot path: no state to move.
        if let State::Transmission = self.state {
            return self.step_transmission();
        }
        // The state is taken by value so that each arm sees exactly its own
        // state; every arm but the option in flight puts it straight back.
        match std::mem::replace(&mut self.state, State::Negotiating) {
            State::Option(p) => self.step_option(p),
            State::Greeting => {
                self.state = State::Greeting;
                self.step_greeting()
            }
            State::Oldstyle => {
                self.state = State::Oldstyle;
                self.step_oldstyle()
            }
            State::HandshakeFlags => {
                self.state = State::HandshakeFlags;
                self.step_handshake_flags()
            }
            State::ExportNameReply => {
                self.state = State::ExportNameReply;
                self.step_export_name_reply()
            }
            s @ (State::Negotiating | State::Tls) => {
                self.state = s;
                // Nothing is expected from the server now.
                if self.rx.len() > 0 {
                    return Err(ProtocolError::UnexpectedData(self.rx.len()));
                }
                Ok(false)
            }
            State::Transmission => {
                self.state = State::Transmission;
                self.step_transmission()
            }
            // Over: input is no longer read.
            s @ State::Closed(_) => {
                self.state = s;
                Ok(false)
            }
        }
    }

    /// Reads the reply to the option in flight, `p`, taken out of the
    /// state; puts it back unless the reply ended it.
    fn step_option(&mut self, mut p: Box<Pending>) -> Result<bool, ProtocolError> {
        match self.step_option_reply(&mut p)? {
            OptionStep::More => {
                self.state = State::Option(p);
                Ok(false)
            }
            OptionStep::Progress => {
                self.state = State::Option(p);
                Ok(true)
            }
            OptionStep::Acked => {
                self.option_acked(*p)?;
                Ok(true)
            }
            OptionStep::Failed(error) => {
                self.option_failed(*p, error);
                Ok(true)
            }
        }
    }

    fn step_greeting(&mut self) -> Result<bool, ProtocolError> {
        let Some(b) = self.rx.data().first_chunk::<GREETING_PREFIX_LEN>() else {
            return Ok(false);
        };
        let style = handshake::parse_greeting_prefix(b)?;
        self.rx.consume(GREETING_PREFIX_LEN);
        self.state = match style {
            Style::Oldstyle => State::Oldstyle,
            Style::Newstyle => State::HandshakeFlags,
        };
        Ok(true)
    }

    fn step_oldstyle(&mut self) -> Result<bool, ProtocolError> {
        let need = OLDSTYLE_FIELDS_LEN + ZERO_PAD_LEN;
        let Some(b) = self.rx.data().first_chunk::<OLDSTYLE_FIELDS_LEN>() else {
            return Ok(false);
        };
        if self.rx.len() < need {
            return Ok(false);
        }
        let f = handshake::parse_oldstyle_fields(b);
        self.rx.consume(need);
        self.protocol = Some(Protocol::Oldstyle);
        if f.handshake_flags != 0 {
            return Err(ProtocolError::OldstyleHandshakeFlags(f.handshake_flags));
        }
        if self.cfg.tls == TlsMode::Require {
            self.close(CloseReason::TlsRequired(
                "oldstyle server cannot do TLS".into(),
            ));
            return Ok(false);
        }
        let name = self.cfg.export_name.clone();
        self.enter_transmission(ExportInfo {
            name,
            size: f.size,
            flags: f.transmission_flags,
            ..ExportInfo::default()
        })?;
        Ok(true)
    }

    fn step_handshake_flags(&mut self) -> Result<bool, ProtocolError> {
        let Some(b) = self.rx.data().first_chunk::<2>() else {
            return Ok(false);
        };
        let gflags = u16::from_be_bytes(*b);
        self.rx.consume(2);
        self.server_handshake_flags = gflags;
        // Rules 8-10: only flags the server advertised, only bits 0 and 1.
        let mut flags = 0;
        if gflags & hf::FIXED_NEWSTYLE != 0 {
            flags |= self.cfg.handshake_flags & cf::FIXED_NEWSTYLE;
        }
        if gflags & hf::NO_ZEROES != 0 {
            flags |= self.cfg.handshake_flags & cf::NO_ZEROES;
        }
        self.client_flags = flags;
        self.tx
            .push_message(|b| handshake::encode_client_flags(flags, b));
        if flags & cf::FIXED_NEWSTYLE != 0 {
            self.protocol = Some(Protocol::NewstyleFixed);
            self.state = State::Negotiating;
            self.advance_auto();
        } else {
            self.protocol = Some(Protocol::Newstyle);
            if self.cfg.tls == TlsMode::Require {
                self.close(CloseReason::TlsRequired(
                    "server is not fixed newstyle, so it cannot do TLS".into(),
                ));
                return Ok(false);
            }
            self.auto = AutoStep::Done;
            if self.cfg.opt_mode {
                self.state = State::Negotiating;
            } else {
                self.send_export_name();
            }
        }
        Ok(true)
    }

    fn step_export_name_reply(&mut self) -> Result<bool, ProtocolError> {
        let pad = if self.client_flags & cf::NO_ZEROES != 0 {
            0
        } else {
            ZERO_PAD_LEN
        };
        let Some(b) = self.rx.data().first_chunk::<EXPORT_NAME_REPLY_LEN>() else {
            return Ok(false);
        };
        if self.rx.len() < EXPORT_NAME_REPLY_LEN + pad {
            return Ok(false);
        }
        let (size, flags) = handshake::parse_export_name_reply(b);
        self.rx.consume(EXPORT_NAME_REPLY_LEN + pad);
        let name = self.cfg.export_name.clone();
        self.enter_transmission(ExportInfo {
            name,
            size,
            flags,
            ..ExportInfo::default()
        })?;
        Ok(true)
    }

    /// Validates what the server said and enters the transmission phase.
    fn enter_transmission(&mut self, info: ExportInfo) -> Result<(), ProtocolError> {
        let info = self.sanitize(info)?;
        self.info = Some(info.clone());
        self.state = State::Transmission;
        self.xmit
            .start(&info, self.header_mode, &self.contexts, &self.cfg);
        if self.contexts_export.as_deref() != Some(info.name.as_str()) {
            // Rule 86: contexts count only for the export finally selected.
            self.contexts.clear();
        }
        self.events.push_back(Event::GoSucceeded(info));
        Ok(())
    }

    fn sanitize(&self, mut info: ExportInfo) -> Result<ExportInfo, ProtocolError> {
        if info.flags & tf::HAS_FLAGS == 0 {
            return Err(ProtocolError::BadTransmissionFlags(info.flags));
        }
        if info.size > i64::MAX as u64 {
            return Err(ProtocolError::ExportTooLarge(info.size));
        }
        if self.header_mode == HeaderMode::Simple {
            info.flags &= !tf::SEND_DF;
        }
        if info.flags & tf::SEND_WRITE_ZEROES == 0 {
            info.flags &= !tf::SEND_FAST_ZERO;
        }
        if self.header_mode != HeaderMode::Extended {
            info.flags &= !tf::BLOCK_STATUS_PAYLOAD;
        }
        Ok(info)
    }

    /// One step over the reply to the option in flight, `p`, which the
    /// caller took out of the state.
    fn step_option_reply(&mut self, p: &mut Pending) -> Result<OptionStep, ProtocolError> {
        let kind = p.op.kind();
        match p.stage {
            ReplyStage::Header => {
                let Some(b) = self.rx.data().first_chunk::<OPTION_REPLY_HEADER_LEN>() else {
                    return Ok(OptionStep::More);
                };
                let h = wopt::parse_option_reply_header(b)?;
                self.rx.consume(OPTION_REPLY_HEADER_LEN);
                if h.option != kind.code() {
                    return Err(ProtocolError::WrongOptionEcho {
                        sent: kind.code(),
                        got: h.option,
                    });
                }
                p.stage = Self::check_reply_header(&p.op, &h)?;
                Ok(OptionStep::Progress)
            }
            ReplyStage::Payload(h) => {
                let len = h.length as usize;
                let Some(payload) = self.rx.data().get(..len) else {
                    return Ok(OptionStep::More);
                };
                let payload = payload.to_vec();
                self.rx.consume(len);
                p.stage = ReplyStage::Header;
                self.handle_option_reply(p, h, &payload)
            }
            ReplyStage::InfoType(h) => {
                let Some(b) = self.rx.data().first_chunk::<2>() else {
                    return Ok(OptionStep::More);
                };
                let typ = u16::from_be_bytes(*b);
                if matches!(
                    typ,
                    info::EXPORT | info::NAME | info::DESCRIPTION | info::BLOCK_SIZE
                ) {
                    return Err(ProtocolError::OptionReplyTooLong {
                        option: kind,
                        reply_type: h.reply_type,
                        len: h.length,
                        limit: MAX_INFO_REPLY,
                    });
                }
                self.rx.consume(2);
                p.stage = ReplyStage::Skip(h.length.saturating_sub(2));
                Ok(OptionStep::Progress)
            }
            ReplyStage::Skip(remaining) => {
                let n = (remaining as usize).min(self.rx.len());
                if n == 0 && remaining > 0 {
                    return Ok(OptionStep::More);
                }
                self.rx.consume(n);
                let left = remaining - n as u32;
                p.stage = if left == 0 {
                    ReplyStage::Header
                } else {
                    ReplyStage::Skip(left)
                };
                Ok(OptionStep::Progress)
            }
        }
    }

    /// A complete reply payload (or an ACK) to the option in flight.
    fn handle_option_reply(
        &mut self,
        p: &mut Pending,
        h: OptionReplyHeader,
        payload: &[u8],
    ) -> Result<OptionStep, ProtocolError> {
        let unexpected = ProtocolError::UnexpectedOptionReply {
            option: p.op.kind(),
            reply_type: h.reply_type,
        };
        match (h.reply_type, &mut p.op) {
            (rep::ACK, _) => Ok(OptionStep::Acked),
            (t, _) if t & rep::FLAG_ERROR != 0 => Ok(OptionStep::Failed(OptionError {
                reply: RepError::from_wire(t),
                message: wopt::human_text(payload),
            })),
            (rep::SERVER, Op::List { exports, bytes }) => {
                let (name, description) = wopt::parse_server_reply(payload)?;
                // The adapter may keep every export (nbd-std returns them
                // all): bound what one listing can make it hold.
                *exports += 1;
                *bytes += (name.len() + description.len()) as u64;
                let limits = &self.cfg.limits;
                if *exports > limits.max_exports || *bytes > limits.max_export_list_bytes {
                    return Err(ProtocolError::ExportListTooLong {
                        exports: *exports,
                        bytes: *bytes,
                        max_exports: limits.max_exports,
                        max_bytes: limits.max_export_list_bytes,
                    });
                }
                self.events.push_back(Event::ExportListed {
                    name: name.to_owned(),
                    description,
                });
                Ok(OptionStep::Progress)
            }
            (
                rep::INFO,
                Op::Export {
                    info: export, seen, ..
                },
            ) => {
                match wopt::parse_info_reply(payload)? {
                    InfoReply::Export { size, flags } => {
                        export.size = size;
                        export.flags = flags;
                        *seen = true;
                    }
                    InfoReply::Name(n) => export.canonical_name = Some(n),
                    InfoReply::Description(d) => export.description = Some(d),
                    InfoReply::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => {
                        let bs = BlockSize {
                            minimum,
                            preferred,
                            maximum,
                        };
                        // libnbd ignores triples that break the rules.
                        export.block_size = bs.is_valid().then_some(bs);
                    }
                    InfoReply::Unknown(_) => {}
                }
                Ok(OptionStep::Progress)
            }
            (rep::META_CONTEXT, Op::Meta { set, list, .. }) => {
                let (id, name) = wopt::parse_meta_context_reply(payload)?;
                // Rule 42: ignore the id of LIST replies.
                let id = if *set { id } else { 0 };
                let max = self.cfg.limits.max_meta_contexts;
                if list.len() >= max {
                    return Err(ProtocolError::TooManyMetaContexts(max));
                }
                list.push((id, name.to_owned()));
                Ok(OptionStep::Progress)
            }
            // `check_reply_header` lets only the pairs above through.
            _ => Err(unexpected),
        }
    }

    /// The option in flight ended with `NBD_REP_ACK`.
    fn option_acked(&mut self, p: Pending) -> Result<(), ProtocolError> {
        let kind = p.op.kind();
        match p.op {
            Op::Plain(PlainOption::Abort) => {
                self.close(CloseReason::Aborted);
                return Ok(());
            }
            Op::Plain(PlainOption::StartTls) => {
                if self.tls_on {
                    return Err(ProtocolError::StartTlsTwice);
                }
                self.state = State::Tls;
                self.events.push_back(Event::StartTls);
                return Ok(());
            }
            // Extended headers already include structured replies.
            Op::Plain(PlainOption::StructuredReply) => {
                if self.header_mode == HeaderMode::Simple {
                    self.header_mode = HeaderMode::Structured;
                }
            }
            Op::Plain(PlainOption::ExtendedHeaders) => self.header_mode = HeaderMode::Extended,
            // The exports were reported as they arrived.
            Op::List { .. } => {}
            Op::Meta { set, list, export } => {
                if set {
                    self.contexts = list.clone();
                    self.contexts_export = Some(export);
                }
                for (id, name) in list {
                    self.events.push_back(Event::MetaContext {
                        option: kind,
                        id,
                        name,
                    });
                }
            }
            Op::Export { go, info, seen, .. } => {
                if !seen {
                    return Err(ProtocolError::MissingExportInfo(kind));
                }
                if go {
                    return self.enter_transmission(info);
                }
                self.info = Some(self.sanitize(info)?);
            }
        }
        self.option_finished(kind, p.origin, None);
        Ok(())
    }

    /// What happens after an option ended (ACK or error), by who asked.
    fn option_finished(&mut self, kind: OptionKind, origin: Origin, error: Option<OptionError>) {
        match origin {
            Origin::Auto => self.advance_auto(),
            Origin::User => {
                self.state = State::Negotiating;
                self.events.push_back(match error {
                    None => Event::OptionSucceeded(kind),
                    Some(error) => Event::OptionError {
                        option: kind,
                        error,
                    },
                });
            }
            Origin::Before { go } => {
                let bs = self.cfg.request_block_size;
                self.send_info_or_go(go, Origin::User, bs);
            }
        }
    }

    /// The option in flight ended with an error reply.
    fn option_failed(&mut self, p: Pending, error: OptionError) {
        let kind = p.op.kind();
        if let Op::Plain(PlainOption::Abort) = p.op {
            self.close(CloseReason::Aborted);
            return;
        }
        if error.reply == RepError::Shutdown {
            // Rule 19: the client must soft-disconnect.
            if p.origin == Origin::User {
                self.events.push_back(Event::OptionError {
                    option: kind,
                    error: error.clone(),
                });
            }
            self.abort_and_close(CloseReason::NegotiationFailed {
                option: kind,
                error,
            });
            return;
        }
        match p.op {
            Op::Meta { set: true, .. } => {
                // Rule 44: a failed SET still replaced the whole set.
                self.contexts.clear();
                self.contexts_export = None;
            }
            Op::Plain(PlainOption::StartTls)
                if p.origin == Origin::Auto && self.cfg.tls == TlsMode::Require =>
            {
                self.abort_and_close(CloseReason::TlsRequired(format!(
                    "server refused STARTTLS: {error}"
                )));
                return;
            }
            Op::Export {
                go,
                asked_block_size,
                ..
            } => {
                if error.reply == RepError::Unsup && go && self.header_mode != HeaderMode::Extended
                {
                    // Rule 31: fall back to EXPORT_NAME.
                    self.send_export_name();
                    return;
                }
                if error.reply == RepError::BlockSizeReqd && !asked_block_size {
                    self.send_info_or_go(go, p.origin, true);
                    return;
                }
                if go && p.origin == Origin::Auto {
                    self.abort_and_close(CloseReason::NegotiationFailed {
                        option: kind,
                        error,
                    });
                    return;
                }
                if !go {
                    self.info = None;
                }
            }
            Op::Plain(_) | Op::List { .. } | Op::Meta { set: false, .. } => {}
        }
        self.option_finished(kind, p.origin, Some(error));
    }

    /// Checks a reply header's type and length against the option in flight
    /// before anything is buffered, so that a length no legal reply of its
    /// type can have fails at once (spec "Option reply" and the per-option
    /// reply lists of §2.8).
    fn check_reply_header(op: &Op, h: &OptionReplyHeader) -> Result<ReplyStage, ProtocolError> {
        let kind = op.kind();
        let too_long = |limit: u32| ProtocolError::OptionReplyTooLong {
            option: kind,
            reply_type: h.reply_type,
            len: h.length,
            limit,
        };
        let limit = match (h.reply_type, op) {
            (rep::ACK, _) => {
                if h.length != 0 {
                    return Err(ProtocolError::AckWithData(kind, h.length));
                }
                0
            }
            (t, _) if t & rep::FLAG_ERROR != 0 => MAX_STRING_LEN as u32,
            (rep::SERVER, Op::List { .. }) => MAX_SERVER_REPLY,
            (rep::INFO, Op::Export { .. }) => {
                if h.length > MAX_SKIPPED_INFO {
                    return Err(too_long(MAX_SKIPPED_INFO));
                }
                if h.length > MAX_INFO_REPLY {
                    // Too long for a known type: skipped if its type is unknown.
                    return Ok(ReplyStage::InfoType(*h));
                }
                MAX_INFO_REPLY
            }
            (rep::META_CONTEXT, Op::Meta { .. }) => MAX_META_CONTEXT_REPLY,
            _ => {
                return Err(ProtocolError::UnexpectedOptionReply {
                    option: kind,
                    reply_type: h.reply_type,
                })
            }
        };
        if h.length > limit {
            return Err(too_long(limit));
        }
        Ok(ReplyStage::Payload(*h))
    }

    /// What the handshake is waiting for, for a timeout's message.
    pub(crate) fn waiting_for(&self) -> String {
        match &self.state {
            State::Greeting | State::Oldstyle => "the server's greeting".to_owned(),
            State::HandshakeFlags => "the server's handshake flags".to_owned(),
            State::Option(p) => format!("the reply to {}", p.op.kind()),
            State::ExportNameReply => "the reply to NBD_OPT_EXPORT_NAME".to_owned(),
            State::Tls => "the TLS handshake".to_owned(),
            State::Negotiating => "the caller's next option".to_owned(),
            State::Transmission => "replies".to_owned(),
            State::Closed(_) => "nothing (closed)".to_owned(),
        }
    }

    /// The reason to report when the server closes now (`transport_error`
    /// `None`) or the transport fails with that message.
    pub(crate) fn end_reason(&self, transport_error: Option<String>) -> CloseReason {
        let during = match &self.state {
            // Rule 23: once NBD_OPT_ABORT is sent, however the server ends
            // the connection is the expected end (nbd-server 3.24 resets it).
            State::Option(p) if matches!(p.op, Op::Plain(PlainOption::Abort)) => {
                return CloseReason::Aborted;
            }
            State::Transmission => {
                let lost = self.xmit.waiting();
                // Spec "Terminating the transmission phase": after
                // NBD_CMD_DISC the server closes; with every request
                // answered that is the orderly end, EOF or reset alike.
                if self.xmit.disconnect_sent() && lost == 0 {
                    return CloseReason::Disconnected;
                }
                return CloseReason::ServerClosed {
                    lost,
                    transport_error,
                };
            }
            State::Closed(r) => return r.clone(),
            State::Greeting | State::HandshakeFlags | State::Oldstyle => {
                "reading the server's greeting".to_owned()
            }
            State::Option(p) => format!("waiting for the reply to {}", p.op.kind()),
            State::ExportNameReply => {
                "waiting for the reply to NBD_OPT_EXPORT_NAME (the server refused the export)"
                    .to_owned()
            }
            State::Negotiating => "negotiating (no option in flight)".to_owned(),
            State::Tls => "starting TLS".to_owned(),
        };
        match transport_error {
            Some(m) => CloseReason::Transport(m),
            None => CloseReason::ServerKilledConnection { during },
        }
    }
}
