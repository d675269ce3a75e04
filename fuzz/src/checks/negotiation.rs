//! The options phase as the state machine sees it, structure-aware: a
//! fixed-newstyle greeting, then the replies to `NBD_OPT_GO` (and, with
//! option mode, `NBD_OPT_INFO` first) built from the input as records, so
//! that every `NBD_INFO` type (export, name, description, block size, and
//! unknown ones) and every reply type (ACK, errors, unknown) comes with
//! arbitrary payloads of any length, well formed or not, much more often
//! than byte-level mutation of a whole stream finds them (doc/proto.md,
//! sections "Option reply types" and "`NBD_OPT_INFO` and `NBD_OPT_GO`").
//!
//! Input: byte 0 selects the configuration (bit 0 full info, bit 1 no
//! block-size request, bit 2 option mode with `opt_info` before `opt_go`,
//! bit 3 named export), byte 1 how the stream is split (1 << (b & 7)
//! bytes a piece); then records of a kind byte, a length byte and that
//! many payload bytes. Kind % 8: 0 `NBD_INFO_EXPORT`, 1 `NBD_INFO_NAME`, 2
//! `NBD_INFO_DESCRIPTION`, 3 `NBD_INFO_BLOCK_SIZE`, 4 an `NBD_REP_INFO` of
//! the type in the payload's first two bytes, 5 a reply of the type in the
//! payload's first four bytes (ACK, errors, unknown), 6 an ACK, 7 a reply
//! echoing another option. After the records: an ACK.
//!
//! Checked: no panic; at most one `Closed` and nothing after it; `Ready`
//! only after an ACK to GO with a well-formed `NBD_INFO_EXPORT` before it,
//! and the size reported is one the server sent; the events stay bounded
//! by the input.

use nbd_core::consts::{info, opt, rep};
use nbd_core::{Config, Connection, Event, Phase};

use crate::script::{ack, fixed_newstyle, opt_reply};

/// Builds the server's reply for one record to `option`; also returns the
/// export size it announces, if it is a well-formed `NBD_INFO_EXPORT`.
fn record(option: u32, kind: u8, p: &[u8]) -> (Vec<u8>, Option<u64>) {
    let info_of = |typ: u16, body: &[u8]| {
        let mut v = typ.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        opt_reply(option, rep::INFO, &v)
    };
    match kind % 8 {
        0 => {
            let size = p
                .first_chunk::<8>()
                .filter(|_| p.len() == 10)
                .map(|b| u64::from_be_bytes(*b));
            (info_of(info::EXPORT, p), size)
        }
        1 => (info_of(info::NAME, p), None),
        2 => (info_of(info::DESCRIPTION, p), None),
        3 => (info_of(info::BLOCK_SIZE, p), None),
        4 => {
            let typ = p.first_chunk::<2>().map_or(4, |b| u16::from_be_bytes(*b));
            let body = p.get(2..).unwrap_or_default();
            // The type may well be NBD_INFO_EXPORT itself (found by the
            // campaign: the check then missed the size it announced).
            let size = (typ == info::EXPORT && body.len() == 10)
                .then(|| body.first_chunk::<8>().map(|b| u64::from_be_bytes(*b)))
                .flatten();
            (info_of(typ, body), size)
        }
        5 => {
            let typ = p
                .first_chunk::<4>()
                .map_or(rep::ERR_UNSUP, |b| u32::from_be_bytes(*b));
            (opt_reply(option, typ, p.get(4..).unwrap_or_default()), None)
        }
        6 => (ack(option), None),
        _ => (opt_reply(opt::LIST, rep::ACK, p), None),
    }
}

/// The `negotiation` target's check: call it with one input.
pub fn check(data: &[u8]) {
    let Some(([setup, split], mut rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut cfg = Config::default();
    cfg.full_info = setup & 1 != 0;
    cfg.request_block_size = setup & 2 == 0;
    cfg.opt_mode = setup & 4 != 0;
    if setup & 8 != 0 {
        cfg.export_name = "exp".into();
    }
    cfg.request_structured_replies = false;
    cfg.request_extended_headers = false;
    cfg.request_meta_context = false;
    let option = if cfg.opt_mode { opt::INFO } else { opt::GO };
    let mut stream = Vec::new();
    let mut sizes = Vec::new();
    while let [kind, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (p, next) = tail.split_at(n);
        let (bytes, size) = record(option, *kind, p);
        stream.extend(bytes);
        sizes.extend(size);
        rest = next;
    }
    stream.extend(ack(option));
    let opt_mode = cfg.opt_mode;
    let mut conn = Connection::new(cfg, std::time::Instant::now());
    let mut out = Vec::new();
    conn.handle_input(&fixed_newstyle());
    if opt_mode {
        // The replies answer opt_info.
        if conn.phase() == Phase::Negotiating {
            conn.opt_info().expect("opt_info once negotiating");
        }
    }
    let piece = 1usize << (split & 7);
    let (mut events, mut closed) = (0usize, 0usize);
    for p in stream.chunks(piece) {
        conn.handle_input(p);
        conn.poll_transmit(&mut out);
        while let Some(ev) = conn.poll_event() {
            assert_eq!(closed, 0, "event after Closed: {ev:?}");
            events += 1;
            match ev {
                Event::GoSucceeded(i) => {
                    assert!(sizes.contains(&i.size), "size {} never sent", i.size);
                    // Ready, unless bytes after the ACK in the same piece
                    // already ended it.
                    assert!(conn.phase() == Phase::Ready || conn.is_finished());
                }
                Event::Closed(_) => closed += 1,
                _ => {}
            }
        }
    }
    if conn.phase() == Phase::Ready {
        assert!(!opt_mode, "ready in option mode without opt_go");
        assert!(
            !sizes.is_empty(),
            "ready without a well-formed NBD_INFO_EXPORT"
        );
    }
    conn.handle_eof();
    while let Some(ev) = conn.poll_event() {
        assert_eq!(closed, 0, "event after Closed: {ev:?}");
        events += 1;
        if let Event::Closed(_) = ev {
            closed += 1;
        }
    }
    assert_eq!(closed, 1, "exactly one Closed");
    assert!(
        events <= 8 + data.len(),
        "{events} events from {} bytes",
        data.len()
    );
}
