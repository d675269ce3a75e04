//! NBD protocol constants and payload builders, written independently of
//! `nbd-core`.
//!
//! Use these when scripting a [`FakeServer`](crate::fake::FakeServer) or
//! when a test needs to build or check raw protocol bytes. All integers on
//! the wire are big-endian; the builders here produce wire bytes ready to be
//! sent as an option-reply or reply-chunk payload.
//!
//! Names follow the specification with the `NBD_` prefix dropped, for
//! example `NBD_OPT_GO` is [`OPT_GO`] and `NBD_REPLY_TYPE_OFFSET_DATA` is
//! [`REPLY_TYPE_OFFSET_DATA`].

use bytes::BufMut;

// ---------------------------------------------------------------- magics

/// `NBDMAGIC`: the first 8 bytes of every greeting (ASCII "NBDMAGIC").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: bytes 8..16 of a newstyle greeting, and the start of every
/// option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Bytes 8..16 of an oldstyle greeting.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic at the start of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple (16-byte) reply header.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured (20-byte) reply chunk header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended (32-byte) reply chunk header.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------- sizes

/// Size of a whole oldstyle greeting.
pub const OLDSTYLE_GREETING_LEN: usize = 152;
/// Size of a newstyle greeting (NBDMAGIC, IHAVEOPT, u16 flags).
pub const NEWSTYLE_GREETING_LEN: usize = 18;
/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

// ---------------------------------------------------------------- handshake flags

/// Handshake flag (server): the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server): the server can omit the 124 zero bytes after
/// `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants the 124 zero bytes omitted.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------- transmission flags

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the medium is rotational (a hint).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `CMD_FLAG_DF` is supported on reads.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may be used (shared cache).
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `CMD_RESIZE` is supported (resize extension).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Transmission flag: the filtered (payload) form of `CMD_BLOCK_STATUS` is
/// supported (extended headers only).
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------- options

/// Option: select an export and enter transmission (no option reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: soft disconnect during option haggling.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: withdrawn; never valid.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: ask about an export.
pub const OPT_INFO: u32 = 6;
/// Option: ask about an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: enable extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------- option replies

/// Option reply: success, final.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a `LIST` (not final).
pub const REP_SERVER: u32 = 2;
/// Option reply: one `INFO_*` item (not final).
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context (not final).
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error option reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply error: option not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option reply error: invalid request.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option reply error: not available on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option reply error: TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option reply error: the client must request `INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option reply error: request or reply too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Option reply error: extended headers are required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------- info types

/// Info type: u64 size + u16 transmission flags (reply length 12).
pub const INFO_EXPORT: u16 = 0;
/// Info type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info type: export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: minimum, preferred and maximum block sizes (reply length 14).
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------- commands

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (has a payload).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize (resize extension).
pub const CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------- command flags

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes without punching a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment a structured read.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status with one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes if it cannot be fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------- reply chunks

/// Reply flag: last chunk for this cookie.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload; must carry `DONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: u64 offset followed by data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: u64 offset, u32 hole length.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: u32 context id followed by (u32 length, u32 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type (extended headers): u32 context id, u32 count, then
/// (u64 length, u64 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Chunk type: u32 error, u16 message length, message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Chunk type: u32 error, u16 message length, message, u64 offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------- errors

/// Error value: operation not permitted.
pub const EPERM: u32 = 1;
/// Error value: input/output error.
pub const EIO: u32 = 5;
/// Error value: cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const EINVAL: u32 = 22;
/// Error value: no space left.
pub const ENOSPC: u32 = 28;
/// Error value: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error value: operation not supported.
pub const ENOTSUP: u32 = 95;
/// Error value: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------- base:allocation

/// Name of the standard allocation metadata context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is a hole (not allocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------- payload builders

/// Payload of an `OFFSET_DATA` chunk: u64 offset, then `data`.
pub fn offset_data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + data.len());
    v.put_u64(offset);
    v.put_slice(data);
    v
}

/// Payload of an `OFFSET_HOLE` chunk: u64 offset, u32 hole length.
pub fn offset_hole_payload(offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.put_u64(offset);
    v.put_u32(len);
    v
}

/// Payload of an `ERROR` chunk: u32 error, u16 message length, message.
///
/// The message length field is taken from `msg`; to send an inconsistent
/// length, build the bytes by hand.
pub fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + msg.len());
    v.put_u32(error);
    v.put_u16(msg.len() as u16);
    v.put_slice(msg.as_bytes());
    v
}

/// Payload of an `ERROR_OFFSET` chunk: u32 error, u16 message length,
/// message, u64 offset.
pub fn error_offset_payload(error: u32, msg: &str, offset: u64) -> Vec<u8> {
    let mut v = error_payload(error, msg);
    v.put_u64(offset);
    v
}

/// Payload of a compact `BLOCK_STATUS` chunk: u32 context id, then
/// `(length, flags)` pairs as u32.
pub fn block_status_payload(context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * extents.len());
    v.put_u32(context_id);
    for &(len, flags) in extents {
        v.put_u32(len);
        v.put_u32(flags);
    }
    v
}

/// Payload of an extended `BLOCK_STATUS_EXT` chunk: u32 context id, u32
/// descriptor count, then `(length, flags)` pairs as u64.
pub fn block_status_ext_payload(context_id: u32, extents: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 16 * extents.len());
    v.put_u32(context_id);
    v.put_u32(extents.len() as u32);
    for &(len, flags) in extents {
        v.put_u64(len);
        v.put_u64(flags);
    }
    v
}

/// Option data for `OPT_INFO` / `OPT_GO`: u32 name length, name, u16 count,
/// then the `INFO_*` codes. Handy for hand-written clients in tests.
pub fn info_request_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    v.put_u32(export.len() as u32);
    v.put_slice(export.as_bytes());
    v.put_u16(infos.len() as u16);
    for &i in infos {
        v.put_u16(i);
    }
    v
}

/// Option data for `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT`: u32
/// name length, name, u32 query count, then each query as u32 length +
/// bytes. Handy for hand-written clients in tests.
pub fn meta_context_request_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(export.len() as u32);
    v.put_slice(export.as_bytes());
    v.put_u32(queries.len() as u32);
    for q in queries {
        v.put_u32(q.len() as u32);
        v.put_slice(q.as_bytes());
    }
    v
}

/// Parses the option data of `OPT_INFO` / `OPT_GO` into the export name and
/// the requested `INFO_*` codes. Returns `None` if the layout is invalid
/// (lengths that do not add up exactly).
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut r = Reader(data);
    let name_len = r.u32()? as usize;
    let name = String::from_utf8_lossy(r.take(name_len)?).into_owned();
    let n = r.u16()? as usize;
    let mut infos = Vec::with_capacity(n);
    for _ in 0..n {
        infos.push(r.u16()?);
    }
    r.0.is_empty().then_some((name, infos))
}

/// Parses the option data of `OPT_LIST_META_CONTEXT` /
/// `OPT_SET_META_CONTEXT` into the export name and the queries. Returns
/// `None` if the layout is invalid.
pub fn parse_meta_context_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut r = Reader(data);
    let name_len = r.u32()? as usize;
    let name = String::from_utf8_lossy(r.take(name_len)?).into_owned();
    let n = r.u32()? as usize;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = r.u32()? as usize;
        queries.push(String::from_utf8_lossy(r.take(len)?).into_owned());
    }
    r.0.is_empty().then_some((name, queries))
}

/// Minimal big-endian cursor for the parsers above.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_ascii_where_expected() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(
            OPTION_REPLY_MAGIC.to_be_bytes(),
            [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
        );
        assert_eq!(REP_ERR_EXT_HEADER_REQD, 0x8000_000a);
        assert_eq!(REPLY_TYPE_ERROR_OFFSET, 0x8002);
    }

    #[test]
    fn payload_layouts() {
        assert_eq!(
            offset_hole_payload(1, 2),
            [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]
        );
        assert_eq!(error_payload(5, "ab"), [0, 0, 0, 5, 0, 2, b'a', b'b']);
        assert_eq!(error_offset_payload(5, "", 7).len(), 14);
        assert_eq!(block_status_payload(1, &[(512, 3)]).len(), 12);
        assert_eq!(block_status_ext_payload(1, &[(512, 3), (1, 0)]).len(), 40);
    }

    #[test]
    fn option_data_round_trips() {
        let d = info_request_data("exp", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info_request(&d),
            Some(("exp".to_string(), vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None);

        let d = meta_context_request_data("", &["base:allocation", "qemu:"]);
        assert_eq!(
            parse_meta_context_request(&d),
            Some((
                String::new(),
                vec!["base:allocation".to_string(), "qemu:".to_string()]
            ))
        );
        assert_eq!(parse_meta_context_request(&d[..5]), None);
    }
}
