//! A scripted fake NBD server, for what real servers cannot produce.
//!
//! Use [`FakeServer`] when a test needs exact control of the bytes the
//! client receives: malformed or unexpected replies, wrong cookies or
//! magics, overlapping or out-of-range chunks, odd option replies, a server
//! that hangs up at a chosen moment, or a check of the exact option and
//! request sequence the client sends. For ordinary interoperability use a
//! real server from [`crate::servers`].
//!
//! The script is a closure run on a thread against the one accepted
//! connection, wrapped in a [`FakeConn`]:
//!
//! ```no_run
//! use nbd_tests::fake::FakeServer;
//! use nbd_tests::proto::*;
//!
//! let server = FakeServer::start(|c| {
//!     let neg = c.standard_handshake(1 << 20, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)?;
//!     assert!(neg.structured_replies);
//!     let req = c.recv_request()?;
//!     assert_eq!(req.typ, CMD_READ);
//!     // A chunk that lies about its offset:
//!     c.send_data_chunk(&req, req.offset + 1, &vec![0; req.length as usize], true)?;
//!     c.expect_eof()
//! });
//! // ... connect the client under test to server.socket() / server.uri() ...
//! server.join().unwrap();
//! ```
//!
//! Every [`FakeConn`] method returns [`io::Result`], so scripts use `?`;
//! a client that sends something unexpected surfaces as an
//! [`io::ErrorKind::InvalidData`] error from [`FakeServer::join`]. The
//! accepted stream has 10 s read and write timeouts, so a script waiting
//! for a client that never speaks fails instead of hanging.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::BufMut;
use tempfile::TempDir;

use crate::proto::*;

/// Read and write timeout of the accepted connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server waits for its one client.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest option data [`FakeConn::recv_option`] accepts.
pub const MAX_OPTION_DATA: usize = 64 * 1024;
/// Largest request payload [`FakeConn::recv_request`] accepts.
pub const MAX_REQUEST_PAYLOAD: u64 = 64 * 1024 * 1024;

/// State shared between the [`FakeServer`] handle and its thread.
struct Shared {
    stop: AtomicBool,
    conn: Mutex<Option<UnixStream>>,
}

/// A fake NBD server that accepts one connection on a Unix socket and runs a
/// script on it.
///
/// Start it with [`FakeServer::start`], connect the client under test to
/// [`FakeServer::socket`] (or [`FakeServer::uri`]), then call
/// [`FakeServer::join`] to get the script's result. Dropping it without
/// joining shuts the connection down and waits for the script to return;
/// it never hangs on a client that did not connect.
///
/// The listening socket is closed as soon as the one client is accepted, so
/// an unexpected second connection attempt is refused.
pub struct FakeServer {
    socket: PathBuf,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<io::Result<()>>>,
    /// Removed last, after the thread has finished.
    _dir: TempDir,
}

impl std::fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeServer")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl FakeServer {
    /// Binds a Unix socket in a fresh temporary directory and starts a
    /// thread that accepts one connection (waiting up to 30 s) and runs
    /// `script` on it. The socket is listening when this returns.
    ///
    /// When the script returns (or panics), the connection is shut down in
    /// both directions, so the client sees EOF after any bytes already sent.
    pub fn start<F>(script: F) -> FakeServer
    where
        F: FnOnce(&mut FakeConn) -> io::Result<()> + Send + 'static,
    {
        let dir = crate::servers::scratch_dir();
        let socket = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake server socket");
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("nbd-fake-server".into())
            .spawn(move || run(listener, &thread_shared, script))
            .expect("spawn fake server thread");
        FakeServer {
            socket,
            shared,
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// Path of the listening Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `nbd+unix:///?socket=PATH`: the default export on this server. The
    /// fake server accepts whatever export name the script accepts.
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// `nbd+unix:///EXPORT?socket=PATH`, with the export name
    /// percent-encoded.
    pub fn uri_for(&self, export: &str) -> String {
        use std::os::unix::ffi::OsStrExt;
        format!(
            "nbd+unix:///{}?socket={}",
            crate::servers::percent_encode(export),
            crate::servers::percent_encode_bytes(self.socket.as_os_str().as_bytes())
        )
    }

    /// Waits for the script to finish and returns its result. If no client
    /// connected within 30 s, returns a [`io::ErrorKind::TimedOut`] error.
    ///
    /// # Panics
    /// If the script panicked (for example a failed `assert!` in it), with
    /// the script's panic message.
    pub fn join(mut self) -> io::Result<()> {
        let handle = self.handle.take().expect("joined twice");
        match handle.join() {
            Ok(r) => r,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-string panic payload)".to_string());
                panic!("fake server script panicked: {msg}")
            }
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(conn) = lock(&self.shared.conn).as_ref() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if let Some(handle) = self.handle.take() {
            // The script's result (or panic) is deliberately ignored here;
            // call `join` to see it.
            let _ = handle.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shuts the connection down when the script finishes, even by panic.
struct ShutdownOnDrop(UnixStream);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Body of the server thread.
fn run<F>(listener: UnixListener, shared: &Shared, script: F) -> io::Result<()>
where
    F: FnOnce(&mut FakeConn) -> io::Result<()>,
{
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let stream = loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "fake server dropped before a client connected",
            ));
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("fake server: no client connected within {ACCEPT_TIMEOUT:?}"),
                    ));
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    drop(listener);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let _guard = ShutdownOnDrop(stream.try_clone()?);
    *lock(&shared.conn) = Some(stream.try_clone()?);
    if shared.stop.load(Ordering::SeqCst) {
        let _ = stream.shutdown(Shutdown::Both);
    }
    let mut conn = FakeConn::new(stream);
    script(&mut conn)
}

// ---------------------------------------------------------------- FakeConn

/// One request as received by the fake server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// [`REQUEST_MAGIC`] (compact, 28 bytes) or [`EXTENDED_REQUEST_MAGIC`]
    /// (extended, 32 bytes).
    pub magic: u32,
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub typ: u16,
    /// The client's cookie, to echo in the reply.
    pub cookie: u64,
    /// Offset field.
    pub offset: u64,
    /// Length field (u32 on the wire for compact requests).
    pub length: u64,
    /// The payload: `length` bytes for a compact `CMD_WRITE`, or for an
    /// extended request with `CMD_FLAG_PAYLOAD_LEN`; otherwise empty.
    pub payload: Vec<u8>,
}

impl Request {
    /// Whether this request used the extended (32-byte) header, so its
    /// replies must use extended chunk headers.
    pub fn is_extended(&self) -> bool {
        self.magic == EXTENDED_REQUEST_MAGIC
    }

    /// The request as wire bytes (header + payload): for hand-written
    /// clients in tests. A compact request truncates `length` to u32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXTENDED_REQUEST_LEN + self.payload.len());
        v.put_u32(self.magic);
        v.put_u16(self.flags);
        v.put_u16(self.typ);
        v.put_u64(self.cookie);
        v.put_u64(self.offset);
        if self.is_extended() {
            v.put_u64(self.length);
        } else {
            v.put_u32(self.length as u32);
        }
        v.put_slice(&self.payload);
        v
    }
}

/// How [`FakeConn::negotiate`] answers options. Build it with
/// [`GoConfig::new`] and change fields as needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoConfig {
    /// Export size sent in `INFO_EXPORT` / the `EXPORT_NAME` reply.
    pub size: u64,
    /// Transmission flags sent as they are (include [`FLAG_HAS_FLAGS`]).
    pub eflags: u16,
    /// Accept `OPT_STRUCTURED_REPLY` (else `ERR_UNSUP`). Default true.
    pub structured_replies: bool,
    /// Accept `OPT_EXTENDED_HEADERS` (else `ERR_UNSUP`). Default false.
    pub extended_headers: bool,
    /// Offer `base:allocation` (id 1 when selected). Default true.
    pub base_allocation: bool,
    /// Send `INFO_BLOCK_SIZE` (min, preferred, max) with every INFO/GO.
    /// Default `None`.
    pub block_size: Option<(u32, u32, u32)>,
    /// Send `INFO_DESCRIPTION` when the client asks for it. Default `None`.
    pub description: Option<String>,
    /// `(name, description)` pairs answered to `OPT_LIST`. Default empty.
    pub exports: Vec<(String, String)>,
}

impl GoConfig {
    /// The defaults described on each field: structured replies and
    /// `base:allocation` offered, extended headers refused.
    pub fn new(size: u64, eflags: u16) -> GoConfig {
        GoConfig {
            size,
            eflags,
            structured_replies: true,
            extended_headers: false,
            base_allocation: true,
            block_size: None,
            description: None,
            exports: Vec::new(),
        }
    }
}

/// What the client and [`FakeConn::negotiate`] agreed on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// `OPT_EXTENDED_HEADERS` was acknowledged.
    pub extended_headers: bool,
    /// `base:allocation` is selected, with context id 1.
    pub base_allocation: bool,
    /// The export name of the final GO (or EXPORT_NAME).
    pub export_name: String,
    /// The client used `OPT_EXPORT_NAME` rather than `OPT_GO`.
    pub used_export_name: bool,
    /// Every option the client sent, in order.
    pub options: Vec<u32>,
}

/// The fake server's side of one connection, with helpers to send and
/// receive NBD messages. Scripts get it from [`FakeServer::start`]; it can
/// also wrap one end of a [`UnixStream::pair`] via [`FakeConn::new`].
#[derive(Debug)]
pub struct FakeConn {
    stream: UnixStream,
    handshake_flags: u16,
    client_flags: u32,
    negotiated: Negotiated,
}

impl FakeConn {
    /// Wraps a connected stream. Timeouts are left as they are.
    pub fn new(stream: UnixStream) -> FakeConn {
        FakeConn {
            stream,
            handshake_flags: 0,
            client_flags: 0,
            negotiated: Negotiated::default(),
        }
    }

    // ------------------------------------------------------------ raw

    /// The underlying stream, for anything the helpers do not cover (for
    /// example a different timeout).
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Receives exactly `n` bytes. EOF first is an
    /// [`io::ErrorKind::UnexpectedEof`] error.
    pub fn recv_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream
            .read_exact(&mut buf)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => io::Error::new(
                    e.kind(),
                    format!("client closed the connection (wanted {n} bytes)"),
                ),
                _ => explain_timeout(e),
            })?;
        Ok(buf)
    }

    /// Shuts the connection down in both directions (the client sees EOF).
    pub fn close(&mut self) -> io::Result<()> {
        match self.stream.shutdown(Shutdown::Both) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        }
    }

    /// Succeeds if the client closes the connection without sending
    /// anything more (a reset counts as closed); unexpected bytes are an
    /// [`io::ErrorKind::InvalidData`] error.
    pub fn expect_eof(&mut self) -> io::Result<()> {
        let mut b = [0u8; 64];
        match self.stream.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(n) => Err(invalid(format!(
                "expected EOF, client sent {n} more bytes: {:02x?}",
                &b[..n]
            ))),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(explain_timeout(e)),
        }
    }

    /// Expects the client's clean shutdown: an `NBD_CMD_DISC` request and
    /// then EOF.
    pub fn expect_disc(&mut self) -> io::Result<()> {
        let req = self.recv_request()?;
        if req.typ != CMD_DISC {
            return Err(invalid(format!("expected NBD_CMD_DISC, got {req:?}")));
        }
        self.expect_eof()
    }

    // ------------------------------------------------------------ greetings

    /// Sends a newstyle greeting: NBDMAGIC, IHAVEOPT, `handshake_flags`
    /// (e.g. `FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES`, or 0 for non-fixed).
    pub fn send_newstyle(&mut self, handshake_flags: u16) -> io::Result<()> {
        self.handshake_flags = handshake_flags;
        let mut v = Vec::with_capacity(NEWSTYLE_GREETING_LEN);
        v.put_u64(NBDMAGIC);
        v.put_u64(IHAVEOPT);
        v.put_u16(handshake_flags);
        self.send(&v)
    }

    /// Receives the client's u32 flags after a newstyle greeting.
    pub fn recv_client_flags(&mut self) -> io::Result<u32> {
        let b = self.recv_exact(4)?;
        self.client_flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        Ok(self.client_flags)
    }

    /// Sends a whole oldstyle greeting (152 bytes): NBDMAGIC, the oldstyle
    /// magic, size, u32 flags (0 in the high half, `eflags` in the low
    /// half) and 124 zero bytes. Transmission follows directly.
    pub fn send_oldstyle(&mut self, size: u64, eflags: u16) -> io::Result<()> {
        let mut v = Vec::with_capacity(OLDSTYLE_GREETING_LEN);
        v.put_u64(NBDMAGIC);
        v.put_u64(OLDSTYLE_MAGIC);
        v.put_u64(size);
        v.put_u32(u32::from(eflags));
        v.put_bytes(0, 124);
        self.send(&v)
    }

    /// The client flags received by [`FakeConn::recv_client_flags`].
    pub fn client_flags(&self) -> u32 {
        self.client_flags
    }

    // ------------------------------------------------------------ options

    /// Receives one option request: checks the IHAVEOPT magic and returns
    /// `(option, data)`. Data longer than [`MAX_OPTION_DATA`] is an error.
    pub fn recv_option(&mut self) -> io::Result<(u32, Vec<u8>)> {
        let h = self.recv_exact(16)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        if magic != IHAVEOPT {
            return Err(invalid(format!(
                "bad option magic {magic:#018x} (header {h:02x?})"
            )));
        }
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        if len > MAX_OPTION_DATA {
            return Err(invalid(format!(
                "option {option} data length {len} exceeds {MAX_OPTION_DATA}"
            )));
        }
        let data = self.recv_exact(len)?;
        Ok((option, data))
    }

    /// Sends one option reply: magic, `option`, `reply_type`, length and
    /// `data`.
    pub fn send_option_reply(
        &mut self,
        option: u32,
        reply_type: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut v = Vec::with_capacity(20 + data.len());
        v.put_u64(OPTION_REPLY_MAGIC);
        v.put_u32(option);
        v.put_u32(reply_type);
        v.put_u32(data.len() as u32);
        v.put_slice(data);
        self.send(&v)
    }

    /// Sends `REP_ACK` for `option`.
    pub fn send_ack(&mut self, option: u32) -> io::Result<()> {
        self.send_option_reply(option, REP_ACK, &[])
    }

    /// Sends one `REP_SERVER` reply to `OPT_LIST`: u32 name length, name,
    /// description.
    pub fn send_server(&mut self, name: &str, description: &str) -> io::Result<()> {
        let mut v = Vec::new();
        v.put_u32(name.len() as u32);
        v.put_slice(name.as_bytes());
        v.put_slice(description.as_bytes());
        self.send_option_reply(OPT_LIST, REP_SERVER, &v)
    }

    /// Sends `REP_INFO` / `INFO_EXPORT` (size, transmission flags).
    pub fn send_info_export(&mut self, option: u32, size: u64, eflags: u16) -> io::Result<()> {
        let mut v = Vec::with_capacity(12);
        v.put_u16(INFO_EXPORT);
        v.put_u64(size);
        v.put_u16(eflags);
        self.send_option_reply(option, REP_INFO, &v)
    }

    /// Sends `REP_INFO` / `INFO_BLOCK_SIZE` (minimum, preferred, maximum).
    pub fn send_info_block_size(
        &mut self,
        option: u32,
        min: u32,
        pref: u32,
        max: u32,
    ) -> io::Result<()> {
        let mut v = Vec::with_capacity(14);
        v.put_u16(INFO_BLOCK_SIZE);
        v.put_u32(min);
        v.put_u32(pref);
        v.put_u32(max);
        self.send_option_reply(option, REP_INFO, &v)
    }

    /// Sends `REP_INFO` / `INFO_NAME` (canonical export name).
    pub fn send_info_name(&mut self, option: u32, name: &str) -> io::Result<()> {
        self.send_info_string(option, INFO_NAME, name)
    }

    /// Sends `REP_INFO` / `INFO_DESCRIPTION`.
    pub fn send_info_description(&mut self, option: u32, description: &str) -> io::Result<()> {
        self.send_info_string(option, INFO_DESCRIPTION, description)
    }

    fn send_info_string(&mut self, option: u32, info: u16, s: &str) -> io::Result<()> {
        let mut v = Vec::with_capacity(2 + s.len());
        v.put_u16(info);
        v.put_slice(s.as_bytes());
        self.send_option_reply(option, REP_INFO, &v)
    }

    /// Sends `REP_META_CONTEXT` (u32 id, name).
    pub fn send_meta_context(&mut self, option: u32, id: u32, name: &str) -> io::Result<()> {
        let mut v = Vec::with_capacity(4 + name.len());
        v.put_u32(id);
        v.put_slice(name.as_bytes());
        self.send_option_reply(option, REP_META_CONTEXT, &v)
    }

    /// Sends an error option reply (`REP_ERR_*`) with a message.
    pub fn send_error(&mut self, option: u32, err_type: u32, msg: &str) -> io::Result<()> {
        self.send_option_reply(option, err_type, msg.as_bytes())
    }

    /// Sends the reply to `OPT_EXPORT_NAME`: size, flags, and 124 zero
    /// bytes unless `no_zeroes`.
    pub fn send_export_name_reply(
        &mut self,
        size: u64,
        eflags: u16,
        no_zeroes: bool,
    ) -> io::Result<()> {
        let mut v = Vec::with_capacity(134);
        v.put_u64(size);
        v.put_u16(eflags);
        if !no_zeroes {
            v.put_bytes(0, 124);
        }
        self.send(&v)
    }

    /// Greets (fixed newstyle with NO_ZEROES), reads the client flags and
    /// runs [`FakeConn::standard_go`]. The shortest way to get a client
    /// into transmission.
    pub fn standard_handshake(&mut self, size: u64, eflags: u16) -> io::Result<Negotiated> {
        self.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        self.recv_client_flags()?;
        self.standard_go(size, eflags)
    }

    /// Answers options like a typical modern server until the client enters
    /// transmission, and returns what was agreed:
    /// `STRUCTURED_REPLY` → ACK; `EXTENDED_HEADERS` → `ERR_UNSUP`;
    /// `SET_META_CONTEXT` → `base:allocation` as id 1 (if asked for) then
    /// ACK; `INFO`/`GO` → `INFO_EXPORT(size, eflags)` then ACK; `LIST` → a
    /// bare ACK. Same as `negotiate(&GoConfig::new(size, eflags))`.
    pub fn standard_go(&mut self, size: u64, eflags: u16) -> io::Result<Negotiated> {
        self.negotiate(&GoConfig::new(size, eflags))
    }

    /// Runs option haggling as configured by `cfg` until a successful GO or
    /// EXPORT_NAME, and returns what was agreed (also kept for
    /// [`FakeConn::serve`]).
    ///
    /// * `STRUCTURED_REPLY`: ACK if `cfg.structured_replies`
    ///   (`ERR_EXT_HEADER_REQD` once extended headers are on), else
    ///   `ERR_UNSUP`; `ERR_INVALID` if data was sent.
    /// * `EXTENDED_HEADERS`: ACK if `cfg.extended_headers`, else `ERR_UNSUP`.
    /// * `LIST`: one `REP_SERVER` per `cfg.exports`, then ACK.
    /// * `LIST_META_CONTEXT` / `SET_META_CONTEXT`: `ERR_INVALID` before
    ///   structured replies or extended headers; otherwise `base:allocation`
    ///   (id 0 in a listing, id 1 when set) if offered and matched, then
    ///   ACK. A SET replaces the selection.
    /// * `INFO` / `GO`: `INFO_EXPORT`, then `INFO_BLOCK_SIZE` if configured,
    ///   `INFO_NAME` and `INFO_DESCRIPTION` if asked for, then ACK;
    ///   `ERR_INVALID` for malformed data.
    /// * `EXPORT_NAME`: the export-name reply (zeroes omitted when both
    ///   sides set NO_ZEROES).
    /// * `ABORT`: ACK, then an [`io::ErrorKind::ConnectionAborted`] error.
    /// * anything else: `ERR_UNSUP`.
    pub fn negotiate(&mut self, cfg: &GoConfig) -> io::Result<Negotiated> {
        let mut neg = Negotiated::default();
        loop {
            let (opt, data) = self.recv_option()?;
            neg.options.push(opt);
            match opt {
                OPT_EXPORT_NAME => {
                    let no_zeroes = self.handshake_flags & FLAG_NO_ZEROES != 0
                        && self.client_flags & FLAG_C_NO_ZEROES != 0;
                    self.send_export_name_reply(cfg.size, cfg.eflags, no_zeroes)?;
                    neg.export_name = String::from_utf8_lossy(&data).into_owned();
                    neg.used_export_name = true;
                    break;
                }
                OPT_ABORT => {
                    self.send_ack(opt)?;
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "client sent NBD_OPT_ABORT",
                    ));
                }
                OPT_LIST => {
                    for (name, desc) in &cfg.exports {
                        self.send_server(name, desc)?;
                    }
                    self.send_ack(opt)?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.send_error(opt, REP_ERR_INVALID, "no data expected")?;
                    } else if neg.extended_headers {
                        self.send_error(opt, REP_ERR_EXT_HEADER_REQD, "extended headers on")?;
                    } else if cfg.structured_replies {
                        self.send_ack(opt)?;
                        neg.structured_replies = true;
                    } else {
                        self.send_error(opt, REP_ERR_UNSUP, "")?;
                    }
                }
                OPT_EXTENDED_HEADERS => {
                    if !data.is_empty() {
                        self.send_error(opt, REP_ERR_INVALID, "no data expected")?;
                    } else if cfg.extended_headers {
                        self.send_ack(opt)?;
                        neg.extended_headers = true;
                    } else {
                        self.send_error(opt, REP_ERR_UNSUP, "")?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = opt == OPT_SET_META_CONTEXT;
                    if set {
                        neg.base_allocation = false;
                    }
                    if !(neg.structured_replies || neg.extended_headers) {
                        self.send_error(opt, REP_ERR_INVALID, "structured replies first")?;
                        continue;
                    }
                    let Some((_, queries)) = parse_meta_context_request(&data) else {
                        self.send_error(opt, REP_ERR_INVALID, "malformed request")?;
                        continue;
                    };
                    let matches = queries
                        .iter()
                        .any(|q| q == CONTEXT_BASE_ALLOCATION || (!set && q == "base:"))
                        || (!set && queries.is_empty());
                    if cfg.base_allocation && matches {
                        self.send_meta_context(opt, u32::from(set), CONTEXT_BASE_ALLOCATION)?;
                        neg.base_allocation = set;
                    }
                    self.send_ack(opt)?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, infos)) = parse_info_request(&data) else {
                        self.send_error(opt, REP_ERR_INVALID, "malformed request")?;
                        continue;
                    };
                    self.send_info_export(opt, cfg.size, cfg.eflags)?;
                    if let Some((min, pref, max)) = cfg.block_size {
                        self.send_info_block_size(opt, min, pref, max)?;
                    }
                    if infos.contains(&INFO_NAME) {
                        self.send_info_name(opt, &name)?;
                    }
                    if let (Some(d), true) = (&cfg.description, infos.contains(&INFO_DESCRIPTION)) {
                        self.send_info_description(opt, d)?;
                    }
                    self.send_ack(opt)?;
                    if opt == OPT_GO {
                        neg.export_name = name;
                        break;
                    }
                }
                _ => self.send_error(opt, REP_ERR_UNSUP, "unsupported option")?,
            }
        }
        self.negotiated = neg.clone();
        Ok(neg)
    }

    /// What the last [`FakeConn::negotiate`] agreed on.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Overrides what [`FakeConn::serve`] believes was negotiated, for
    /// scripts that ran the option phase by hand.
    pub fn set_negotiated(&mut self, negotiated: Negotiated) {
        self.negotiated = negotiated;
    }

    // ------------------------------------------------------------ transmission

    /// Receives one request (compact or extended, chosen by its magic) with
    /// its payload. An unknown magic or a payload over
    /// [`MAX_REQUEST_PAYLOAD`] is an [`io::ErrorKind::InvalidData`] error.
    pub fn recv_request(&mut self) -> io::Result<Request> {
        let m = self.recv_exact(4)?;
        self.recv_request_after_magic(u32::from_be_bytes([m[0], m[1], m[2], m[3]]))
    }

    /// The rest of [`FakeConn::recv_request`] once the magic has been read.
    fn recv_request_after_magic(&mut self, magic: u32) -> io::Result<Request> {
        let rest = match magic {
            REQUEST_MAGIC => REQUEST_LEN - 4,
            EXTENDED_REQUEST_MAGIC => EXTENDED_REQUEST_LEN - 4,
            _ => return Err(invalid(format!("bad request magic {magic:#010x}"))),
        };
        let h = self.recv_exact(rest)?;
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let typ = u16::from_be_bytes([h[2], h[3]]);
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let offset = u64::from_be_bytes(h[12..20].try_into().unwrap());
        let (length, has_payload) = if magic == EXTENDED_REQUEST_MAGIC {
            (
                u64::from_be_bytes(h[20..28].try_into().unwrap()),
                flags & CMD_FLAG_PAYLOAD_LEN != 0,
            )
        } else {
            (
                u64::from(u32::from_be_bytes(h[20..24].try_into().unwrap())),
                typ == CMD_WRITE,
            )
        };
        let payload = if has_payload {
            if length > MAX_REQUEST_PAYLOAD {
                return Err(invalid(format!(
                    "request payload {length} exceeds {MAX_REQUEST_PAYLOAD}"
                )));
            }
            self.recv_exact(length as usize)?
        } else {
            Vec::new()
        };
        Ok(Request {
            magic,
            flags,
            typ,
            cookie,
            offset,
            length,
            payload,
        })
    }

    /// Like [`FakeConn::recv_request`], but a clean EOF before the first
    /// byte gives `Ok(None)`.
    pub fn recv_request_or_eof(&mut self) -> io::Result<Option<Request>> {
        let mut first = [0u8; 1];
        loop {
            match self.stream.read(&mut first) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(explain_timeout(e)),
            }
        }
        let rest = self.recv_exact(3)?;
        let magic = u32::from_be_bytes([first[0], rest[0], rest[1], rest[2]]);
        self.recv_request_after_magic(magic).map(Some)
    }

    /// Sends a simple reply: magic, `error`, `cookie`, then `data` (send
    /// data only for a successful READ).
    pub fn send_simple_reply(&mut self, error: u32, cookie: u64, data: &[u8]) -> io::Result<()> {
        let mut v = Vec::with_capacity(SIMPLE_REPLY_LEN + data.len());
        v.put_u32(SIMPLE_REPLY_MAGIC);
        v.put_u32(error);
        v.put_u64(cookie);
        v.put_slice(data);
        self.send(&v)
    }

    /// Sends a structured reply chunk (20-byte header): magic, `flags`
    /// (e.g. [`REPLY_FLAG_DONE`]), `typ`, `cookie`, length, `payload`.
    pub fn send_chunk(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut v = Vec::with_capacity(STRUCTURED_REPLY_LEN + payload.len());
        v.put_u32(STRUCTURED_REPLY_MAGIC);
        v.put_u16(flags);
        v.put_u16(typ);
        v.put_u64(cookie);
        v.put_u32(payload.len() as u32);
        v.put_slice(payload);
        self.send(&v)
    }

    /// Sends an extended reply chunk (32-byte header): magic, `flags`,
    /// `typ`, `cookie`, `offset` (the request's offset), u64 length,
    /// `payload`.
    pub fn send_ext_chunk(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut v = Vec::with_capacity(EXTENDED_REPLY_LEN + payload.len());
        v.put_u32(EXTENDED_REPLY_MAGIC);
        v.put_u16(flags);
        v.put_u16(typ);
        v.put_u64(cookie);
        v.put_u64(offset);
        v.put_u64(payload.len() as u64);
        v.put_slice(payload);
        self.send(&v)
    }

    /// Sends a chunk answering `req`: an extended chunk (with `req.offset`)
    /// if `req` was extended, else a structured chunk.
    pub fn send_chunk_for(
        &mut self,
        req: &Request,
        flags: u16,
        typ: u16,
        payload: &[u8],
    ) -> io::Result<()> {
        if req.is_extended() {
            self.send_ext_chunk(flags, typ, req.cookie, req.offset, payload)
        } else {
            self.send_chunk(flags, typ, req.cookie, payload)
        }
    }

    /// Sends an `OFFSET_DATA` chunk for `req` carrying `data` at `offset`.
    pub fn send_data_chunk(
        &mut self,
        req: &Request,
        offset: u64,
        data: &[u8],
        done: bool,
    ) -> io::Result<()> {
        self.send_chunk_for(
            req,
            done_flag(done),
            REPLY_TYPE_OFFSET_DATA,
            &offset_data_payload(offset, data),
        )
    }

    /// Answers the read `req` with one `OFFSET_DATA` chunk per byte of
    /// `data` (its bytes for `req.offset..`), in descending order when
    /// `descending` is set, the last one with the done flag: legal, and the
    /// most chunks a read can have. Written in 1 MiB batches, not one
    /// system call per chunk.
    pub fn send_one_byte_chunks(
        &mut self,
        req: &Request,
        data: &[u8],
        descending: bool,
    ) -> io::Result<()> {
        let n = data.len();
        let mut batch = Vec::with_capacity((1 << 20) + 64);
        for k in 0..n {
            let i = if descending { n - 1 - k } else { k };
            let flags = done_flag(k + 1 == n);
            let offset = req.offset + i as u64;
            if req.is_extended() {
                batch.put_u32(EXTENDED_REPLY_MAGIC);
                batch.put_u16(flags);
                batch.put_u16(REPLY_TYPE_OFFSET_DATA);
                batch.put_u64(req.cookie);
                batch.put_u64(req.offset);
                batch.put_u64(9);
            } else {
                batch.put_u32(STRUCTURED_REPLY_MAGIC);
                batch.put_u16(flags);
                batch.put_u16(REPLY_TYPE_OFFSET_DATA);
                batch.put_u64(req.cookie);
                batch.put_u32(9);
            }
            batch.put_u64(offset);
            batch.put_u8(data[i]);
            if batch.len() >= 1 << 20 {
                self.send(&batch)?;
                batch.clear();
            }
        }
        self.send(&batch)
    }

    /// Sends an `OFFSET_HOLE` chunk for `req`.
    pub fn send_hole_chunk(
        &mut self,
        req: &Request,
        offset: u64,
        len: u32,
        done: bool,
    ) -> io::Result<()> {
        self.send_chunk_for(
            req,
            done_flag(done),
            REPLY_TYPE_OFFSET_HOLE,
            &offset_hole_payload(offset, len),
        )
    }

    /// Sends a `NONE` chunk with `DONE` for `req`.
    pub fn send_none_chunk(&mut self, req: &Request) -> io::Result<()> {
        self.send_chunk_for(req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
    }

    /// Sends an `ERROR` chunk for `req`.
    pub fn send_error_chunk(
        &mut self,
        req: &Request,
        error: u32,
        msg: &str,
        done: bool,
    ) -> io::Result<()> {
        self.send_chunk_for(
            req,
            done_flag(done),
            REPLY_TYPE_ERROR,
            &error_payload(error, msg),
        )
    }

    /// Sends an `ERROR_OFFSET` chunk for `req`.
    pub fn send_error_offset_chunk(
        &mut self,
        req: &Request,
        error: u32,
        msg: &str,
        offset: u64,
        done: bool,
    ) -> io::Result<()> {
        self.send_chunk_for(
            req,
            done_flag(done),
            REPLY_TYPE_ERROR_OFFSET,
            &error_offset_payload(error, msg, offset),
        )
    }

    /// Sends a block-status chunk for `req`: `BLOCK_STATUS` with u32 fields
    /// (values truncated) for a compact request, `BLOCK_STATUS_EXT` for an
    /// extended one. `extents` are `(length, flags)` pairs.
    pub fn send_block_status_chunk(
        &mut self,
        req: &Request,
        context_id: u32,
        extents: &[(u64, u64)],
        done: bool,
    ) -> io::Result<()> {
        if req.is_extended() {
            let p = block_status_ext_payload(context_id, extents);
            self.send_chunk_for(req, done_flag(done), REPLY_TYPE_BLOCK_STATUS_EXT, &p)
        } else {
            let short: Vec<(u32, u32)> =
                extents.iter().map(|&(l, f)| (l as u32, f as u32)).collect();
            let p = block_status_payload(context_id, &short);
            self.send_chunk_for(req, done_flag(done), REPLY_TYPE_BLOCK_STATUS, &p)
        }
    }

    /// Answers `req` correctly against the in-memory `disk`, in the reply
    /// style the negotiation implies: extended chunks for extended
    /// requests; with structured replies, READ as one `OFFSET_DATA` chunk
    /// (errors as `ERROR` chunks) and other commands with simple replies;
    /// otherwise simple replies. Out-of-range requests get `EINVAL`.
    /// WRITE, WRITE_ZEROES and TRIM change `disk` (TRIM zeroes). BLOCK_STATUS
    /// reports one allocated extent in context 1 if `base:allocation` was
    /// negotiated, else `EINVAL`. DISC gets no reply.
    pub fn serve_request(&mut self, req: &Request, disk: &mut [u8]) -> io::Result<()> {
        let size = disk.len() as u64;
        let in_range = req.offset <= size && req.length <= size - req.offset;
        let range = if in_range {
            req.offset as usize..(req.offset + req.length) as usize
        } else {
            0..0
        };
        let ext = req.is_extended();
        let structured = ext || self.negotiated.structured_replies;
        let error = match req.typ {
            CMD_DISC => return Ok(()),
            _ if !in_range && req.typ != CMD_FLUSH => EINVAL,
            CMD_READ => {
                if !structured {
                    return self.send_simple_reply(0, req.cookie, &disk[range]);
                }
                if req.length == 0 {
                    return self.send_none_chunk(req);
                }
                return self.send_data_chunk(req, req.offset, &disk[range], true);
            }
            CMD_WRITE => {
                if req.payload.len() as u64 != req.length {
                    EINVAL
                } else {
                    disk[range].copy_from_slice(&req.payload);
                    0
                }
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                disk[range].fill(0);
                0
            }
            CMD_FLUSH | CMD_CACHE => 0,
            CMD_BLOCK_STATUS
                if structured
                    && self.negotiated.base_allocation
                    && req.length > 0
                    && req.flags & CMD_FLAG_PAYLOAD_LEN == 0 =>
            {
                return self.send_block_status_chunk(req, 1, &[(req.length, 0)], true);
            }
            _ => EINVAL,
        };
        if ext || (structured && error != 0 && req.typ == CMD_READ) {
            if error == 0 {
                self.send_none_chunk(req)
            } else {
                self.send_error_chunk(req, error, "fake server error", true)
            }
        } else {
            self.send_simple_reply(error, req.cookie, &[])
        }
    }

    /// Serves requests with [`FakeConn::serve_request`] until
    /// `NBD_CMD_DISC` (returns `Ok`). EOF without DISC is an
    /// [`io::ErrorKind::UnexpectedEof`] error.
    pub fn serve(&mut self, disk: &mut [u8]) -> io::Result<()> {
        loop {
            let Some(req) = self.recv_request_or_eof()? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection without NBD_CMD_DISC",
                ));
            };
            self.serve_request(&req, disk)?;
            if req.typ == CMD_DISC {
                return Ok(());
            }
        }
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Turns a read timeout (reported as `WouldBlock` on Linux) into a
/// [`io::ErrorKind::TimedOut`] error that says what happened.
fn explain_timeout(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("fake server: the client sent nothing for {IO_TIMEOUT:?}"),
        ),
        _ => e,
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn connect(server: &FakeServer) -> UnixStream {
        let c = UnixStream::connect(server.socket()).expect("connect to fake server");
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c
    }

    fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        c.read_exact(&mut b).expect("read from fake server");
        b
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    fn be64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    /// Client side of one option: sends it and returns the replies
    /// `(type, data)` up to and including the final one.
    fn option(c: &mut UnixStream, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        v.put_u64(IHAVEOPT);
        v.put_u32(opt);
        v.put_u32(data.len() as u32);
        v.put_slice(data);
        c.write_all(&v).unwrap();
        let mut replies = Vec::new();
        loop {
            let h = read_n(c, 20);
            assert_eq!(be64(&h), OPTION_REPLY_MAGIC);
            assert_eq!(be32(&h[8..]), opt);
            let typ = be32(&h[12..]);
            let data = read_n(c, be32(&h[16..]) as usize);
            replies.push((typ, data));
            if typ == REP_ACK || typ & REP_FLAG_ERROR != 0 {
                return replies;
            }
        }
    }

    #[test]
    fn newstyle_greeting_bytes() {
        let server = FakeServer::start(|c| {
            c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
            assert_eq!(c.recv_client_flags()?, 3);
            c.expect_eof()
        });
        let mut c = connect(&server);
        let g = read_n(&mut c, 18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        c.write_all(&3u32.to_be_bytes()).unwrap();
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn oldstyle_greeting_bytes() {
        let server = FakeServer::start(|c| c.send_oldstyle(4096, FLAG_HAS_FLAGS | FLAG_READ_ONLY));
        let mut c = connect(&server);
        let mut g = Vec::new();
        c.read_to_end(&mut g).unwrap();
        assert_eq!(g.len(), 152);
        assert_eq!(be64(&g[8..]), OLDSTYLE_MAGIC);
        assert_eq!(be64(&g[16..]), 4096);
        assert_eq!(be32(&g[24..]), 3);
        assert!(g[28..].iter().all(|&b| b == 0));
        server.join().unwrap();
    }

    #[test]
    fn standard_handshake_and_serve_with_hand_written_client() {
        let server = FakeServer::start(|c| {
            let neg = c.standard_handshake(8192, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)?;
            assert!(neg.structured_replies && neg.base_allocation && !neg.extended_headers);
            assert_eq!(neg.export_name, "exp");
            assert_eq!(
                neg.options,
                [
                    OPT_EXTENDED_HEADERS,
                    OPT_STRUCTURED_REPLY,
                    OPT_SET_META_CONTEXT,
                    OPT_GO
                ]
            );
            let mut disk = vec![0u8; 8192];
            c.serve(&mut disk)?;
            assert_eq!(&disk[100..103], b"abc");
            c.expect_eof()
        });
        let mut c = connect(&server);
        read_n(&mut c, 18);
        c.write_all(&3u32.to_be_bytes()).unwrap();
        let r = option(&mut c, OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(r[0].0, REP_ERR_UNSUP);
        assert_eq!(
            option(&mut c, OPT_STRUCTURED_REPLY, &[]),
            [(REP_ACK, vec![])]
        );
        let r = option(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_context_request_data("exp", &["base:allocation"]),
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(be32(&r[0].1), 1);
        assert_eq!(&r[0].1[4..], b"base:allocation");
        let r = option(&mut c, OPT_GO, &info_request_data("exp", &[]));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, REP_INFO);
        assert_eq!(r[0].1, [0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 5]);
        assert_eq!(r[1].0, REP_ACK);

        let mut write = Request {
            magic: REQUEST_MAGIC,
            flags: 0,
            typ: CMD_WRITE,
            cookie: 7,
            offset: 100,
            length: 3,
            payload: b"abc".to_vec(),
        };
        c.write_all(&write.to_bytes()).unwrap();
        let h = read_n(&mut c, 16);
        assert_eq!(
            (be32(&h), be32(&h[4..]), be64(&h[8..])),
            (SIMPLE_REPLY_MAGIC, 0, 7)
        );

        write.typ = CMD_READ;
        write.cookie = 8;
        write.offset = 99;
        write.length = 5;
        write.payload.clear();
        c.write_all(&write.to_bytes()).unwrap();
        let h = read_n(&mut c, 20);
        assert_eq!(be32(&h), STRUCTURED_REPLY_MAGIC);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be64(&h[8..]), 8);
        assert_eq!(be32(&h[16..]), 13);
        let p = read_n(&mut c, 13);
        assert_eq!(be64(&p), 99);
        assert_eq!(&p[8..], b"\0abc\0");

        write.typ = CMD_DISC;
        write.offset = 0;
        write.length = 0;
        c.write_all(&write.to_bytes()).unwrap();
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn extended_request_and_chunk() {
        let server = FakeServer::start(|c| {
            let req = c.recv_request()?;
            assert!(req.is_extended());
            assert_eq!(req.payload, b"hello");
            c.send_block_status_chunk(&req, 1, &[(1 << 33, 3)], true)?;
            assert_eq!(c.recv_request_or_eof()?, None);
            Ok(())
        });
        let mut c = connect(&server);
        let req = Request {
            magic: EXTENDED_REQUEST_MAGIC,
            flags: CMD_FLAG_PAYLOAD_LEN,
            typ: CMD_WRITE,
            cookie: 0x1122,
            offset: 1 << 40,
            length: 5,
            payload: b"hello".to_vec(),
        };
        let bytes = req.to_bytes();
        assert_eq!(bytes.len(), 32 + 5);
        c.write_all(&bytes).unwrap();
        let h = read_n(&mut c, 32);
        assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC);
        assert_eq!(
            u16::from_be_bytes([h[6], h[7]]),
            REPLY_TYPE_BLOCK_STATUS_EXT
        );
        assert_eq!(be64(&h[8..]), 0x1122);
        assert_eq!(be64(&h[16..]), 1 << 40);
        assert_eq!(be64(&h[24..]), 24);
        let p = read_n(&mut c, 24);
        assert_eq!(
            (be32(&p), be32(&p[4..]), be64(&p[8..]), be64(&p[16..])),
            (1, 1, 1 << 33, 3)
        );
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn negotiate_extended_headers_and_serve() {
        let server = FakeServer::start(|c| {
            c.send_newstyle(FLAG_FIXED_NEWSTYLE)?;
            c.recv_client_flags()?;
            let mut cfg = GoConfig::new(4096, FLAG_HAS_FLAGS);
            cfg.extended_headers = true;
            cfg.block_size = Some((1, 4096, 1 << 20));
            let neg = c.negotiate(&cfg)?;
            assert!(neg.extended_headers && !neg.structured_replies);
            c.serve(&mut [0u8; 4096])
        });
        let mut c = connect(&server);
        read_n(&mut c, 18);
        c.write_all(&1u32.to_be_bytes()).unwrap();
        assert_eq!(option(&mut c, OPT_EXTENDED_HEADERS, &[])[0].0, REP_ACK);
        let r = option(&mut c, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].0, REP_ERR_EXT_HEADER_REQD);
        let r = option(&mut c, OPT_GO, &info_request_data("", &[INFO_BLOCK_SIZE]));
        let types: Vec<u32> = r.iter().map(|x| x.0).collect();
        assert_eq!(types, [REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(r[1].1.len(), 14);
        let mut req = Request {
            magic: EXTENDED_REQUEST_MAGIC,
            flags: CMD_FLAG_PAYLOAD_LEN,
            typ: CMD_WRITE,
            cookie: 3,
            offset: 512,
            length: 2,
            payload: vec![1, 2],
        };
        c.write_all(&req.to_bytes()).unwrap();
        let h = read_n(&mut c, 32);
        assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_NONE);
        assert_eq!((be64(&h[8..]), be64(&h[16..]), be64(&h[24..])), (3, 512, 0));
        req.typ = CMD_DISC;
        req.flags = 0;
        req.offset = 0;
        req.length = 0;
        req.payload.clear();
        c.write_all(&req.to_bytes()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn bad_request_magic_is_invalid_data() {
        let server = FakeServer::start(|c| c.recv_request().map(drop));
        let mut c = connect(&server);
        c.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
        let err = server.join().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("0xdeadbeef"), "{err}");
    }

    #[test]
    #[should_panic(expected = "fake server script panicked: boom")]
    fn join_propagates_panics() {
        let server = FakeServer::start(|_| panic!("boom"));
        let _c = connect(&server);
        let _ = server.join();
    }

    #[test]
    fn client_sees_eof_after_script_returns() {
        let server = FakeServer::start(|c| c.send(b"xy"));
        let mut c = connect(&server);
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"xy");
        server.join().unwrap();
    }

    #[test]
    fn drop_does_not_hang() {
        let t = Instant::now();
        drop(FakeServer::start(|c| c.send(b"never")));
        let server = FakeServer::start(|c| c.recv_exact(1).map(drop));
        let c = connect(&server);
        drop(server);
        drop(c);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn only_one_connection_is_accepted() {
        let server = FakeServer::start(|c| c.expect_eof());
        let first = connect(&server);
        // The listener closes right after the first accept.
        let deadline = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(server.socket()).is_ok() {
            assert!(
                Instant::now() < deadline,
                "second connection still accepted"
            );
            thread::sleep(Duration::from_millis(5));
        }
        drop(first);
        server.join().unwrap();
    }

    /// libnbd as an oracle: nbdinfo must accept the standard handshake.
    #[test]
    fn nbdinfo_accepts_standard_handshake() {
        let server = FakeServer::start(|c| {
            let neg = c.standard_handshake(1 << 20, FLAG_HAS_FLAGS | FLAG_READ_ONLY)?;
            assert!(neg.structured_replies);
            c.serve(&mut vec![0u8; 1 << 20])
        });
        let size = crate::servers::nbdinfo(&["--size", &server.uri()]);
        assert_eq!(size.trim(), "1048576");
        server.join().unwrap();
    }

    /// libnbd as an oracle for reads and block status: nbdcopy copies the
    /// fake disk through structured replies.
    #[test]
    fn nbdcopy_reads_fake_disk() {
        let disk: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let expected = disk.clone();
        let server = FakeServer::start(move |c| {
            let mut disk = disk;
            let size = disk.len() as u64;
            c.standard_handshake(size, FLAG_HAS_FLAGS | FLAG_READ_ONLY)?;
            c.serve(&mut disk)
        });
        let dir = crate::servers::scratch_dir();
        let out_path = dir.path().join("copy");
        std::fs::File::create(&out_path).unwrap();
        let out = Command::new("nbdcopy")
            .args(["--connections=1", &server.uri()])
            .arg(&out_path)
            .output()
            .expect("run nbdcopy");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&out_path).unwrap(), expected);
        server.join().unwrap();
    }
}
