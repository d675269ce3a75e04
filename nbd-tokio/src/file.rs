//! [`NbdFile`]: an export seen as an async file (`AsyncRead + AsyncWrite +
//! AsyncSeek`).

use std::future::Future;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use nbd_core::CmdFlags;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::client::Client;

/// Default read window of [`NbdFile`]: 256 KiB, a request size at which
/// one NBD round trip costs little next to the data it carries.
pub const DEFAULT_READ_AHEAD: usize = 256 * 1024;

type BoxFuture<T> = Pin<Box<dyn Future<Output = crate::Result<T>> + Send>>;

enum State {
    Idle,
    /// A window read at this offset.
    Reading(u64, BoxFuture<BytesMut>),
    /// A write of this many bytes at the position.
    Writing(usize, BoxFuture<()>),
    Flushing(BoxFuture<()>),
}

/// Wraps a [`Client`] in the transmission phase so that an export can be
/// used wherever tokio expects a file: `AsyncRead + AsyncWrite +
/// AsyncSeek` (with `tokio::io::copy`, `BufReader`, `AsyncReadExt`...).
///
/// Reads are served from a window (default [`DEFAULT_READ_AHEAD`], set
/// with [`NbdFile::set_read_ahead`]): a small read fetches a whole window
/// with one command, later reads inside it are copies. Reads stop at the
/// end of the export. Writes go to the server at the current position
/// (copied once into a `Bytes`, since `AsyncWrite` lends its buffer) and
/// report success only once the server acknowledged them; they drop the
/// window, so a read after a write sees it. Writes past the end fail with
/// `StorageFull`. `poll_flush` sends `NBD_CMD_FLUSH` when the server
/// supports it.
///
/// Each request is one boxed future; dropping the `NbdFile` (or seeking
/// away from a read in progress) cancels it safely, as for any call of
/// the client. The [`crate::ConnectionTask`] must be running.
pub struct NbdFile {
    client: Client,
    pos: u64,
    size: u64,
    max_io: usize,
    window: usize,
    cur: BytesMut,
    cur_off: u64,
    state: State,
    can_flush: bool,
}

impl std::fmt::Debug for NbdFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdFile")
            .field("pos", &self.pos)
            .field("size", &self.size)
            .field("window", &self.window)
            .finish()
    }
}

fn io_err(e: crate::Error) -> io::Error {
    e.into()
}

impl NbdFile {
    /// Wraps a client whose connection is in the transmission phase.
    pub fn new(client: Client) -> crate::Result<NbdFile> {
        let size = client.size()?;
        let info = client.export_info();
        let can_flush = info.as_ref().is_some_and(|i| i.can_flush());
        let max_io = (client.payload_max() as usize).clamp(4096, 4 << 20);
        Ok(NbdFile {
            client,
            pos: 0,
            size,
            max_io,
            window: DEFAULT_READ_AHEAD.min(max_io),
            cur: BytesMut::new(),
            cur_off: 0,
            state: State::Idle,
            can_flush,
        })
    }

    /// The export size.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// True for an empty export.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The current position.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Sets the read window in bytes (capped at the server's largest
    /// request); 0 makes every read one request of the caller's size.
    /// The data already fetched is dropped.
    pub fn set_read_ahead(&mut self, bytes: usize) {
        self.drop_window();
        self.window = bytes.min(self.max_io);
    }

    /// The client, for calls `NbdFile` does not offer (block status,
    /// trim, ...). Writing through it leaves the read window stale: call
    /// [`NbdFile::set_read_ahead`] afterwards to drop it.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Gives the client back.
    pub fn into_inner(self) -> Client {
        self.client
    }

    fn drop_window(&mut self) {
        self.cur.clear();
        self.cur_off = 0;
    }

    fn in_window(&self) -> bool {
        self.pos >= self.cur_off && self.pos < self.cur_off + self.cur.len() as u64
    }

    /// Finishes a write or flush in progress (for reads and seeks, which
    /// must not overtake it).
    fn poll_pending_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Writing(n, fut) => {
                let n = *n;
                let r = ready!(fut.as_mut().poll(cx));
                self.state = State::Idle;
                r.map_err(io_err)?;
                self.pos += n as u64;
                Poll::Ready(Ok(()))
            }
            State::Flushing(fut) => {
                let r = ready!(fut.as_mut().poll(cx));
                self.state = State::Idle;
                Poll::Ready(r.map_err(io_err))
            }
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncRead for NbdFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending_write(cx))?;
        loop {
            if this.pos >= this.size || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.in_window() {
                let start = (this.pos - this.cur_off) as usize;
                let k = buf.remaining().min(this.cur.len() - start);
                buf.put_slice(&this.cur[start..start + k]);
                this.pos += k as u64;
                return Poll::Ready(Ok(()));
            }
            match &mut this.state {
                State::Reading(off, fut) if *off == this.pos => {
                    let off = *off;
                    let r = ready!(fut.as_mut().poll(cx));
                    this.state = State::Idle;
                    this.cur = r.map_err(io_err)?;
                    this.cur_off = off;
                }
                _ => {
                    // A read elsewhere (after a seek) is dropped: cancelled.
                    let want = if this.window == 0 {
                        buf.remaining().min(this.max_io)
                    } else {
                        this.window
                    };
                    let len = (this.size - this.pos).min(want as u64) as usize;
                    let mut b = std::mem::take(&mut this.cur);
                    b.clear();
                    b.resize(len, 0);
                    let client = this.client.clone();
                    let off = this.pos;
                    this.state = State::Reading(
                        off,
                        Box::pin(async move { client.read(off, b, CmdFlags::empty()).await }),
                    );
                }
            }
        }
    }
}

impl AsyncWrite for NbdFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Writing(n, fut) => {
                    let n = *n;
                    let r = ready!(fut.as_mut().poll(cx));
                    this.state = State::Idle;
                    r.map_err(io_err)?;
                    this.pos += n as u64;
                    return Poll::Ready(Ok(n));
                }
                State::Flushing(_) => ready!(this.poll_pending_write(cx))?,
                State::Reading(..) | State::Idle => {
                    if buf.is_empty() {
                        return Poll::Ready(Ok(0));
                    }
                    let left = this.size.saturating_sub(this.pos);
                    if left == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::StorageFull,
                            "write past the end of the export",
                        )));
                    }
                    let n = (buf.len() as u64).min(left).min(this.max_io as u64) as usize;
                    this.drop_window();
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    let client = this.client.clone();
                    let off = this.pos;
                    this.state = State::Writing(
                        n,
                        Box::pin(async move { client.write(off, data, CmdFlags::empty()).await }),
                    );
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Writing(..) => ready!(this.poll_pending_write(cx))?,
                State::Flushing(fut) => {
                    let r = ready!(fut.as_mut().poll(cx));
                    this.state = State::Idle;
                    return Poll::Ready(r.map_err(io_err));
                }
                State::Reading(..) | State::Idle => {
                    if !this.can_flush {
                        return Poll::Ready(Ok(()));
                    }
                    let client = this.client.clone();
                    this.state =
                        State::Flushing(Box::pin(
                            async move { client.flush(CmdFlags::empty()).await },
                        ));
                }
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl AsyncSeek for NbdFile {
    fn start_seek(self: Pin<&mut Self>, pos: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        if matches!(this.state, State::Writing(..) | State::Flushing(_)) {
            return Err(io::Error::other(
                "seek while a write or flush is in progress",
            ));
        }
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => this.size.checked_add_signed(d),
            SeekFrom::Current(d) => this.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                this.pos = p;
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        ready!(this.poll_pending_write(cx))?;
        Poll::Ready(Ok(this.pos))
    }
}
