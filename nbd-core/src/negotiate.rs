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
    Option(Pending),
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
    /// A SET_META_CONTEXT sent on the caller's behalf before INFO or GO.
    Before(OptionKind),
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

/// The option in flight.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) kind: OptionKind,
    pub(crate) origin: Origin,
    pub(crate) stage: ReplyStage,
    /// INFO/GO: the export name and what the server said so far.
    pub(crate) export: Option<ExportInfo>,
    pub(crate) asked_block_size: bool,
    /// INFO/GO: whether `NBD_INFO_EXPORT` arrived.
    pub(crate) export_seen: bool,
    /// LIST/SET_META_CONTEXT: contexts received so far.
    pub(crate) contexts: Vec<(u32, String)>,
    /// SET_META_CONTEXT: the export it named.
    pub(crate) context_export: String,
}

impl Pending {
    fn new(kind: OptionKind, origin: Origin) -> Self {
        Pending {
            kind,
            origin,
            stage: ReplyStage::Header,
            export: None,
            asked_block_size: false,
            export_seen: false,
            contexts: Vec::new(),
            context_export: String::new(),
        }
    }
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
        self.send_option(OptionKind::List, &[], Origin::User);
        Ok(())
    }

    /// Sends `NBD_OPT_INFO` for the current export name (after an automatic
    /// SET_META_CONTEXT when contexts are configured). On success the
    /// getters report the export and [`Event::OptionSucceeded`] follows.
    pub fn opt_info(&mut self) -> Result<(), UsageError> {
        self.need_negotiating("opt_info")?;
        self.need_fixed("NBD_OPT_INFO")?;
        self.start_info_or_go(OptionKind::Info);
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
            self.start_info_or_go(OptionKind::Go);
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
        self.send_option(OptionKind::Abort, &[], Origin::User);
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
        self.send_option(OptionKind::StructuredReply, &[], Origin::User);
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
        self.send_option(OptionKind::ExtendedHeaders, &[], Origin::User);
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
        self.send_option(OptionKind::StartTls, &[], Origin::User);
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
        self.send_meta_option(OptionKind::ListMetaContext, queries, Origin::User);
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
        self.send_meta_option(OptionKind::SetMetaContext, queries, Origin::User);
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

    fn send_option(&mut self, kind: OptionKind, data: &[u8], origin: Origin) {
        self.tx
            .push_message(|b| wopt::encode_option(kind.code(), data, b));
        self.state = State::Option(Pending::new(kind, origin));
    }

    fn send_meta_option<S: AsRef<str>>(&mut self, kind: OptionKind, queries: &[S], origin: Origin) {
        let mut data = bytes::BytesMut::new();
        let name = self.cfg.export_name.clone();
        wopt::encode_meta_context_request(&name, queries, &mut data);
        self.send_option(kind, &data, origin);
        if let State::Option(p) = &mut self.state {
            p.context_export = name;
        }
    }

    fn want_auto_meta(&self) -> bool {
        self.cfg.request_meta_context
            && !self.cfg.meta_contexts.is_empty()
            && self.header_mode != HeaderMode::Simple
    }

    fn start_info_or_go(&mut self, kind: OptionKind) {
        if self.want_auto_meta() {
            let queries = self.cfg.meta_contexts.clone();
            self.send_meta_option(OptionKind::SetMetaContext, &queries, Origin::Before(kind));
        } else {
            self.send_info_or_go(kind, Origin::User, self.cfg.request_block_size);
        }
    }

    fn send_info_or_go(&mut self, kind: OptionKind, origin: Origin, block_size: bool) {
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
        self.send_option(kind, &data, origin);
        let name = self.cfg.export_name.clone();
        if let State::Option(p) = &mut self.state {
            p.asked_block_size = block_size;
            p.export = Some(ExportInfo {
                name,
                ..ExportInfo::default()
            });
        }
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
                        self.send_option(OptionKind::StartTls, &[], Origin::Auto);
                        return;
                    }
                }
                AutoStep::ExtendedHeaders => {
                    self.auto = AutoStep::StructuredReply;
                    if self.cfg.request_structured_replies
                        && self.cfg.request_extended_headers
                        && self.header_mode != HeaderMode::Extended
                    {
                        self.send_option(OptionKind::ExtendedHeaders, &[], Origin::Auto);
                        return;
                    }
                }
                AutoStep::StructuredReply => {
                    self.auto = AutoStep::Pause;
                    if self.cfg.request_structured_replies && self.header_mode == HeaderMode::Simple
                    {
                        self.send_option(OptionKind::StructuredReply, &[], Origin::Auto);
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
                        self.send_meta_option(OptionKind::SetMetaContext, &q, Origin::Auto);
                        return;
                    }
                }
                AutoStep::Go => {
                    self.auto = AutoStep::Done;
                    let bs = self.cfg.request_block_size;
                    self.send_info_or_go(OptionKind::Go, Origin::Auto, bs);
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

    /// One step of the handshake/option machine over buffered input;
    /// `Ok(false)` means more bytes are needed.
    pub(crate) fn step_negotiation(&mut self) -> Result<bool, ProtocolError> {
        match &self.state {
            State::Greeting => {
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
            State::Oldstyle => self.step_oldstyle(),
            State::HandshakeFlags => self.step_handshake_flags(),
            State::ExportNameReply => self.step_export_name_reply(),
            State::Option(_) => self.step_option_reply(),
            State::Negotiating | State::Tls => {
                if self.rx.len() > 0 {
                    return Err(ProtocolError::UnexpectedData(self.rx.len()));
                }
                Ok(false)
            }
            State::Transmission | State::Closed(_) => Ok(false),
        }
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
        self.enter_transmission(name, f.size, f.transmission_flags, None)?;
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
        self.enter_transmission(name, size, flags, None)?;
        Ok(true)
    }

    /// Validates what the server said and enters the transmission phase.
    fn enter_transmission(
        &mut self,
        name: String,
        size: u64,
        flags: u16,
        base: Option<ExportInfo>,
    ) -> Result<(), ProtocolError> {
        let mut info = base.unwrap_or_default();
        info.name = name;
        info.size = size;
        info.flags = flags;
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

    fn set_stage(&mut self, stage: ReplyStage) {
        if let State::Option(p) = &mut self.state {
            p.stage = stage;
        }
    }

    fn step_option_reply(&mut self) -> Result<bool, ProtocolError> {
        let (kind, stage) = match &self.state {
            State::Option(p) => (p.kind, p.stage),
            _ => return Ok(false),
        };
        match stage {
            ReplyStage::Header => {
                let Some(b) = self.rx.data().first_chunk::<OPTION_REPLY_HEADER_LEN>() else {
                    return Ok(false);
                };
                let h = wopt::parse_option_reply_header(b)?;
                self.rx.consume(OPTION_REPLY_HEADER_LEN);
                if h.option != kind.code() {
                    return Err(ProtocolError::WrongOptionEcho {
                        sent: kind.code(),
                        got: h.option,
                    });
                }
                let stage = self.check_reply_header(kind, &h)?;
                self.set_stage(stage);
                Ok(true)
            }
            ReplyStage::Payload(h) => {
                let len = h.length as usize;
                if self.rx.len() < len {
                    return Ok(false);
                }
                let payload = self.rx.data()[..len].to_vec();
                self.rx.consume(len);
                self.set_stage(ReplyStage::Header);
                self.handle_option_reply(kind, h, &payload)?;
                Ok(true)
            }
            ReplyStage::InfoType(h) => {
                let Some(b) = self.rx.data().first_chunk::<2>() else {
                    return Ok(false);
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
                self.set_stage(ReplyStage::Skip(h.length - 2));
                Ok(true)
            }
            ReplyStage::Skip(remaining) => {
                let n = (remaining as usize).min(self.rx.len());
                if n == 0 && remaining > 0 {
                    return Ok(false);
                }
                self.rx.consume(n);
                let left = remaining - n as u32;
                self.set_stage(if left == 0 {
                    ReplyStage::Header
                } else {
                    ReplyStage::Skip(left)
                });
                Ok(true)
            }
        }
    }

    /// Checks a reply header's type and length against the option in flight
    /// before anything is buffered (rule set §2.8).
    fn check_reply_header(
        &self,
        kind: OptionKind,
        h: &OptionReplyHeader,
    ) -> Result<ReplyStage, ProtocolError> {
        let too_long = |limit: u32| ProtocolError::OptionReplyTooLong {
            option: kind,
            reply_type: h.reply_type,
            len: h.length,
            limit,
        };
        let unexpected = ProtocolError::UnexpectedOptionReply {
            option: kind,
            reply_type: h.reply_type,
        };
        let limit = match h.reply_type {
            rep::ACK => {
                if h.length != 0 {
                    return Err(ProtocolError::AckWithData(kind, h.length));
                }
                0
            }
            t if t & rep::FLAG_ERROR != 0 => MAX_STRING_LEN as u32,
            rep::SERVER if kind == OptionKind::List => MAX_SERVER_REPLY,
            rep::INFO if matches!(kind, OptionKind::Info | OptionKind::Go) => {
                if h.length > MAX_INFO_REPLY {
                    return Ok(ReplyStage::InfoType(*h));
                }
                MAX_INFO_REPLY
            }
            rep::META_CONTEXT
                if matches!(
                    kind,
                    OptionKind::ListMetaContext | OptionKind::SetMetaContext
                ) =>
            {
                MAX_META_CONTEXT_REPLY
            }
            _ => return Err(unexpected),
        };
        if h.length > limit {
            return Err(too_long(limit));
        }
        Ok(ReplyStage::Payload(*h))
    }

    fn handle_option_reply(
        &mut self,
        kind: OptionKind,
        h: OptionReplyHeader,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        match h.reply_type {
            rep::ACK => self.option_acked(kind),
            rep::SERVER => {
                let (name, description) = wopt::parse_server_reply(payload)?;
                self.events.push_back(Event::ExportListed {
                    name: name.to_owned(),
                    description,
                });
                Ok(())
            }
            rep::INFO => {
                let reply = wopt::parse_info_reply(payload)?;
                let State::Option(p) = &mut self.state else {
                    return Ok(());
                };
                let Some(export) = p.export.as_mut() else {
                    return Ok(());
                };
                match reply {
                    InfoReply::Export { size, flags } => {
                        export.size = size;
                        export.flags = flags;
                        p.export_seen = true;
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
                Ok(())
            }
            rep::META_CONTEXT => {
                let (id, name) = wopt::parse_meta_context_reply(payload)?;
                let id = if kind == OptionKind::ListMetaContext {
                    0 // rule 42: ignore the id of LIST replies
                } else {
                    id
                };
                let max = self.cfg.limits.max_meta_contexts;
                let State::Option(p) = &mut self.state else {
                    return Ok(());
                };
                if p.contexts.len() >= max {
                    return Err(ProtocolError::TooManyMetaContexts(max));
                }
                p.contexts.push((id, name.to_owned()));
                Ok(())
            }
            t => {
                let error = OptionError {
                    reply: RepError::from_wire(t),
                    message: wopt::human_text(payload),
                };
                self.option_failed(kind, error);
                Ok(())
            }
        }
    }

    fn take_pending(&mut self) -> Pending {
        match std::mem::replace(&mut self.state, State::Negotiating) {
            State::Option(p) => p,
            other => {
                self.state = other;
                Pending::new(OptionKind::Abort, Origin::User)
            }
        }
    }

    /// The option in flight ended with `NBD_REP_ACK`.
    fn option_acked(&mut self, kind: OptionKind) -> Result<(), ProtocolError> {
        let p = self.take_pending();
        match kind {
            OptionKind::Abort => {
                self.close(CloseReason::Aborted);
                return Ok(());
            }
            OptionKind::StartTls => {
                if self.tls_on {
                    return Err(ProtocolError::StartTlsTwice);
                }
                self.state = State::Tls;
                self.events.push_back(Event::StartTls);
                return Ok(());
            }
            // Extended headers already include structured replies.
            OptionKind::StructuredReply if self.header_mode == HeaderMode::Simple => {
                self.header_mode = HeaderMode::Structured;
            }
            OptionKind::StructuredReply => {}
            OptionKind::ExtendedHeaders => self.header_mode = HeaderMode::Extended,
            OptionKind::SetMetaContext => {
                self.contexts = p.contexts.clone();
                self.contexts_export = Some(p.context_export.clone());
                for (id, name) in p.contexts {
                    self.events.push_back(Event::MetaContext {
                        option: kind,
                        id,
                        name,
                    });
                }
            }
            OptionKind::ListMetaContext => {
                for (id, name) in p.contexts {
                    self.events.push_back(Event::MetaContext {
                        option: kind,
                        id,
                        name,
                    });
                }
            }
            OptionKind::Info | OptionKind::Go => {
                if !p.export_seen {
                    return Err(ProtocolError::MissingExportInfo(kind));
                }
                let export = p.export.unwrap_or_default();
                if kind == OptionKind::Go {
                    let name = export.name.clone();
                    let (size, flags) = (export.size, export.flags);
                    return self.enter_transmission(name, size, flags, Some(export));
                }
                self.info = Some(self.sanitize(export)?);
            }
            OptionKind::List | OptionKind::ExportName => {}
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
            Origin::Before(next) => {
                let bs = self.cfg.request_block_size;
                self.send_info_or_go(next, Origin::User, bs);
            }
        }
    }

    /// The option in flight ended with an error reply.
    fn option_failed(&mut self, kind: OptionKind, error: OptionError) {
        let p = self.take_pending();
        if kind == OptionKind::Abort {
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
        match kind {
            OptionKind::SetMetaContext => {
                // Rule 44: a failed SET still replaced the whole set.
                self.contexts.clear();
                self.contexts_export = None;
            }
            OptionKind::StartTls
                if p.origin == Origin::Auto && self.cfg.tls == TlsMode::Require =>
            {
                self.abort_and_close(CloseReason::TlsRequired(format!(
                    "server refused STARTTLS: {error}"
                )));
                return;
            }
            OptionKind::Info | OptionKind::Go => {
                if error.reply == RepError::Unsup
                    && kind == OptionKind::Go
                    && self.header_mode != HeaderMode::Extended
                {
                    // Rule 31: fall back to EXPORT_NAME.
                    self.send_export_name();
                    return;
                }
                if error.reply == RepError::BlockSizeReqd && !p.asked_block_size {
                    self.send_info_or_go(kind, p.origin, true);
                    return;
                }
                if kind == OptionKind::Go && p.origin == Origin::Auto {
                    self.abort_and_close(CloseReason::NegotiationFailed {
                        option: kind,
                        error,
                    });
                    return;
                }
                if kind == OptionKind::Info {
                    self.info = None;
                }
            }
            _ => {}
        }
        self.option_finished(kind, p.origin, Some(error));
    }

    /// The reason to report when the server closes now.
    pub(crate) fn eof_reason(&self) -> CloseReason {
        let during = match &self.state {
            State::Greeting | State::HandshakeFlags | State::Oldstyle => {
                "reading the server's greeting".to_owned()
            }
            State::Option(p) if p.kind == OptionKind::Abort => return CloseReason::Aborted,
            State::Option(p) => format!("waiting for the reply to {}", p.kind),
            State::ExportNameReply => {
                "waiting for the reply to NBD_OPT_EXPORT_NAME (the server refused the export)"
                    .to_owned()
            }
            State::Negotiating => "negotiating (no option in flight)".to_owned(),
            State::Tls => "starting TLS".to_owned(),
            State::Transmission => {
                if self.xmit.disconnect_sent() && self.xmit.in_flight() == 0 {
                    return CloseReason::Disconnected;
                }
                self.xmit.eof_context()
            }
            State::Closed(r) => return r.clone(),
        };
        CloseReason::ServerKilledConnection { during }
    }
}
