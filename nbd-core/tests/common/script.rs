//! The scripted server: the bytes an NBD server sends, built by hand (with
//! the `nbd_core::wire` reply encoders where nbd-core has one), and the two
//! ways an adapter hands bytes to a [`Connection`].
//!
//! Everything here is a plain function from values to bytes (`Vec<u8>`),
//! plus [`Server`], a builder that appends them one after another. It
//! depends on nothing but `nbd_core` and `bytes`, so that the fuzz crate
//! (`fuzz/src/lib.rs`, a separate workspace) can include this very file
//! with `#[path]` instead of carrying its own copy; see `mod.rs` for why it
//! is not a module of the nbd-core library.
//!
//! Cookies are the wire's `u64` in the free functions and [`Cookie`] in
//! [`Server`]'s methods.

use bytes::BytesMut;
use nbd_core::consts::{
    handshake_flags as hf, info, opt, rep, IHAVEOPT, NBDMAGIC, OLDSTYLE_MAGIC, OPTION_REPLY_MAGIC,
};
use nbd_core::wire::reply::{encode_chunk_header, encode_simple_reply, HeaderMode};
use nbd_core::{Connection, Cookie};

// ----- greetings -----

/// A newstyle greeting with these handshake flags: fixed newstyle when
/// `flags` has `FIXED_NEWSTYLE`.
pub fn greeting(flags: u16) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// The usual fixed-newstyle greeting: `FIXED_NEWSTYLE | NO_ZEROES`.
pub fn fixed_newstyle() -> Vec<u8> {
    greeting(hf::FIXED_NEWSTYLE | hf::NO_ZEROES)
}

/// An oldstyle greeting (152 bytes): size, the 32-bit flags field (handshake
/// flags in the high half, transmission flags in the low half), 124 zeroes.
pub fn oldstyle(size: u64, flags32: u32) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags32.to_be_bytes());
    v.extend_from_slice(&[0; 124]);
    v
}

/// The reply to NBD_OPT_EXPORT_NAME without the 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

// ----- option replies -----

/// An option reply header announcing `len` payload bytes (which need not
/// follow).
pub fn opt_reply_header(option: u32, typ: u32, len: u32) -> Vec<u8> {
    let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// The payload of one option reply (what follows its 20-byte header).
pub fn opt_reply_payload(reply: &[u8]) -> &[u8] {
    &reply[20..]
}

/// An option reply with its payload.
pub fn opt_reply(option: u32, typ: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("option reply payload fits u32");
    let mut v = opt_reply_header(option, typ, len);
    v.extend_from_slice(payload);
    v
}

/// NBD_REP_ACK.
pub fn ack(option: u32) -> Vec<u8> {
    opt_reply(option, rep::ACK, &[])
}

/// NBD_REP_INFO of type `typ` with these fields one after another.
pub fn info_reply(option: u32, typ: u16, fields: &[&[u8]]) -> Vec<u8> {
    let mut p = typ.to_be_bytes().to_vec();
    for f in fields {
        p.extend_from_slice(f);
    }
    opt_reply(option, rep::INFO, &p)
}

/// NBD_INFO_EXPORT: size and transmission flags.
pub fn info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    info_reply(
        option,
        info::EXPORT,
        &[&size.to_be_bytes(), &flags.to_be_bytes()],
    )
}

/// NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum.
pub fn info_block_size(option: u32, min: u32, pref: u32, max: u32) -> Vec<u8> {
    info_reply(
        option,
        info::BLOCK_SIZE,
        &[&min.to_be_bytes(), &pref.to_be_bytes(), &max.to_be_bytes()],
    )
}

/// NBD_INFO_NAME.
pub fn info_name(option: u32, name: &str) -> Vec<u8> {
    info_reply(option, info::NAME, &[name.as_bytes()])
}

/// NBD_INFO_DESCRIPTION.
pub fn info_description(option: u32, description: &str) -> Vec<u8> {
    info_reply(option, info::DESCRIPTION, &[description.as_bytes()])
}

/// NBD_REP_META_CONTEXT: context id and name.
pub fn meta_context(option: u32, id: u32, name: &str) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    opt_reply(option, rep::META_CONTEXT, &p)
}

/// The payload of NBD_REP_SERVER: name length, name, description.
pub fn server_payload(name: &str, description: &str) -> Vec<u8> {
    let len = u32::try_from(name.len()).expect("name fits u32");
    let mut p = len.to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(description.as_bytes());
    p
}

/// NBD_REP_SERVER, one export of a LIST reply.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    opt_reply(opt::LIST, rep::SERVER, &server_payload(name, description))
}

/// GO (or INFO) success: NBD_INFO_EXPORT then ACK.
pub fn go_ok(option: u32, size: u64, flags: u16) -> Vec<u8> {
    cat(&[&info_export(option, size, flags), &ack(option)])
}

// ----- transmission replies -----

/// A simple reply header (16 bytes); read data, if any, follows it.
pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_simple_reply(error, cookie, &mut b);
    b.to_vec()
}

/// A structured (20-byte) or extended (32-byte, echoing `req_offset`) chunk
/// header followed by `payload`.
pub fn chunk(
    mode: HeaderMode,
    flags: u16,
    typ: u16,
    cookie: u64,
    req_offset: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_chunk_header(
        mode,
        flags,
        typ,
        cookie,
        req_offset,
        payload.len() as u64,
        &mut b,
    );
    b.extend_from_slice(payload);
    b.to_vec()
}

/// The payload of NBD_REPLY_TYPE_OFFSET_DATA.
pub fn offset_data(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + data.len());
    p.extend_from_slice(&offset.to_be_bytes());
    p.extend_from_slice(data);
    p
}

/// The payload of NBD_REPLY_TYPE_OFFSET_HOLE.
pub fn hole(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

/// The payload of NBD_REPLY_TYPE_ERROR: errno, message length, message.
pub fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let len = u16::try_from(msg.len()).expect("message fits u16");
    let mut p = error.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p
}

/// The payload of NBD_REPLY_TYPE_ERROR_OFFSET: an error payload and the
/// offset.
pub fn error_offset_payload(error: u32, msg: &str, offset: u64) -> Vec<u8> {
    let mut p = error_payload(error, msg);
    p.extend_from_slice(&offset.to_be_bytes());
    p
}

/// The payload of NBD_REPLY_TYPE_BLOCK_STATUS: context id, then
/// (length, flags) pairs of 32 bits.
pub fn status(ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = ctx.to_be_bytes().to_vec();
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

/// The payload of NBD_REPLY_TYPE_BLOCK_STATUS_EXT: context id, count, then
/// (length, flags) pairs of 64 bits.
pub fn status_ext(ctx: u32, extents: &[(u64, u64)]) -> Vec<u8> {
    let count = u32::try_from(extents.len()).expect("count fits u32");
    let mut p = ctx.to_be_bytes().to_vec();
    p.extend_from_slice(&count.to_be_bytes());
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

// ----- data -----

/// A recognisable data pattern.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The parts one after another.
pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ----- a builder -----

/// A server's byte stream, built by appending messages.
#[derive(Debug, Default)]
pub struct Server {
    /// Everything appended so far.
    pub out: Vec<u8>,
}

impl Server {
    /// Starts with a newstyle greeting.
    pub fn newstyle(flags: u16) -> Server {
        Server {
            out: greeting(flags),
        }
    }

    /// Starts with an oldstyle greeting (`flags` are the transmission flags).
    pub fn oldstyle(size: u64, flags: u16) -> Server {
        Server {
            out: oldstyle(size, u32::from(flags)),
        }
    }

    /// Appends raw bytes.
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }

    /// See [`opt_reply`].
    pub fn opt_reply(&mut self, option: u32, typ: u32, payload: &[u8]) -> &mut Self {
        self.raw(&opt_reply(option, typ, payload))
    }

    /// See [`ack`].
    pub fn ack(&mut self, option: u32) -> &mut Self {
        self.raw(&ack(option))
    }

    /// See [`info_export`].
    pub fn info_export(&mut self, option: u32, size: u64, flags: u16) -> &mut Self {
        self.raw(&info_export(option, size, flags))
    }

    /// See [`info_block_size`].
    pub fn info_block_size(&mut self, option: u32, min: u32, pref: u32, max: u32) -> &mut Self {
        self.raw(&info_block_size(option, min, pref, max))
    }

    /// See [`meta_context`].
    pub fn meta_context(&mut self, option: u32, id: u32, name: &str) -> &mut Self {
        self.raw(&meta_context(option, id, name))
    }

    /// A simple reply followed by `data`.
    pub fn simple(&mut self, error: u32, cookie: Cookie, data: &[u8]) -> &mut Self {
        self.raw(&simple_reply(error, cookie.0)).raw(data)
    }

    /// See [`chunk`].
    pub fn chunk(
        &mut self,
        mode: HeaderMode,
        flags: u16,
        typ: u16,
        cookie: Cookie,
        req_offset: u64,
        payload: &[u8],
    ) -> &mut Self {
        self.raw(&chunk(mode, flags, typ, cookie.0, req_offset, payload))
    }
}

// ----- handing bytes over -----

/// The two ways an adapter gives the core what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `handle_input` with each piece.
    Copy,
    /// `recv_buf` + `recv_commit`, at most one piece per read.
    Recv,
}

/// Gives `piece` to the connection the way `input` says. Through `Recv`,
/// as many `recv_buf` rounds as the piece needs (none once the connection
/// is finished).
pub fn give(conn: &mut Connection, mut piece: &[u8], input: Input) {
    match input {
        Input::Copy => conn.handle_input(piece),
        Input::Recv => {
            while !piece.is_empty() && !conn.is_finished() {
                let buf = conn.recv_buf();
                assert!(
                    !buf.is_empty(),
                    "recv_buf is empty while the connection expects input"
                );
                let n = buf.len().min(piece.len());
                buf[..n].copy_from_slice(&piece[..n]);
                conn.recv_commit(n);
                piece = &piece[n..];
            }
        }
    }
}

/// Cuts `data` at the given positions (clamped, sorted, duplicates
/// dropped) into non-empty pieces.
pub fn pieces<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(data.len())).collect();
    cuts.push(0);
    cuts.push(data.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}
