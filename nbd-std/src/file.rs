//! [`NbdFile`]: an export seen as a file (`Read + Write + Seek`).

use std::io::{self, Read, Seek, SeekFrom, Write};

use bytes::BytesMut;
use nbd_core::{CmdFlags, Cookie};

use crate::client::Client;

/// Default read-ahead window of [`NbdFile`]: 256 KiB, a request size at
/// which one NBD round trip costs little next to the data it carries.
pub const DEFAULT_READ_AHEAD: usize = 256 * 1024;

/// Wraps a connected [`Client`] so that an export can be used wherever a
/// file is expected (`Read + Write + Seek`).
///
/// Reads are served from a read-ahead window (default
/// [`DEFAULT_READ_AHEAD`], set with [`NbdFile::set_read_ahead`]): a small
/// read fetches a whole window, and while the caller consumes it the next
/// window is already requested (`aio_pread`), so sequential reads through
/// `std::io::Read` (or a `BufReader`, `io::copy`) keep the server busy
/// instead of paying a round trip per call. Reads at least a window long
/// go straight into the caller's buffer. Reads stop at the end of the
/// export. Writes go straight to the server at the current position and
/// drop the window (so a read after a write sees the write); writes past
/// the end fail with `StorageFull`. `flush` sends `NBD_CMD_FLUSH` when the
/// server supports it.
#[derive(Debug)]
pub struct NbdFile {
    client: Client,
    pos: u64,
    size: u64,
    max_io: usize,
    window: usize,
    /// Data of the export at `cur_off`, `cur.len()` bytes.
    cur: BytesMut,
    cur_off: u64,
    /// The next window, requested and not yet taken: (cookie, offset).
    next: Option<(Cookie, u64)>,
    /// A buffer kept for the next request.
    spare: BytesMut,
}

impl NbdFile {
    /// Wraps a client in the transmission phase.
    pub fn new(client: Client) -> crate::Result<NbdFile> {
        let size = client.get_size()?;
        let max_io = (client.connection().payload_max() as usize).clamp(4096, 4 << 20);
        Ok(NbdFile {
            client,
            pos: 0,
            size,
            max_io,
            window: DEFAULT_READ_AHEAD.min(max_io),
            cur: BytesMut::new(),
            cur_off: 0,
            next: None,
            spare: BytesMut::new(),
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

    /// Sets the read-ahead window in bytes (capped at the server's
    /// largest request); 0 turns read-ahead off, so every read is one
    /// request of exactly the caller's size. Call it any time; the data
    /// already fetched is dropped.
    pub fn set_read_ahead(&mut self, bytes: usize) -> crate::Result<()> {
        self.drop_window()?;
        self.window = bytes.min(self.max_io);
        Ok(())
    }

    /// The client, for its getters and for calls `NbdFile` does not offer
    /// (block status, trim, ...).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The client, for commands of your own. Writing through it would make
    /// the read-ahead window stale, so this drops the window first (waiting
    /// for a read-ahead request still in flight).
    pub fn client_mut(&mut self) -> crate::Result<&mut Client> {
        self.drop_window()?;
        Ok(&mut self.client)
    }

    /// Gives the client back (after the read-ahead in flight completed).
    pub fn into_inner(mut self) -> crate::Result<Client> {
        self.drop_window()?;
        Ok(self.client)
    }

    /// Forgets the window, and retires the read-ahead in flight.
    fn drop_window(&mut self) -> crate::Result<()> {
        self.cur_off = 0;
        self.cur.clear();
        if let Some((cookie, _)) = self.next.take() {
            let c = self.client.wait(cookie)?;
            if let Some(b) = c.buffer {
                self.spare = b;
            }
        }
        Ok(())
    }

    /// Requests the window after the current one, if there is one.
    fn prefetch(&mut self) {
        let off = self.cur_off + self.cur.len() as u64;
        if self.next.is_some() || self.window == 0 || off >= self.size {
            return;
        }
        let len = (self.size - off).min(self.window as u64) as usize;
        let mut b = std::mem::take(&mut self.spare);
        b.clear();
        b.resize(len, 0);
        // A refusal (limits) only loses the prefetch; the next read asks again.
        if let Ok(cookie) = self.client.aio_pread(b, off, CmdFlags::empty()) {
            self.next = Some((cookie, off));
        }
    }

    /// Makes the window hold `pos` (the prefetched one if it starts there,
    /// else a fresh blocking read); then asks for the one after it.
    fn fill(&mut self, pos: u64) -> crate::Result<()> {
        match self.next {
            Some((cookie, off)) if off == pos => {
                self.next = None;
                let c = self.client.wait(cookie)?;
                let buf = c.buffer.unwrap_or_default();
                match c.result {
                    Ok(()) => {
                        self.spare = std::mem::replace(&mut self.cur, buf);
                        self.cur_off = off;
                    }
                    // Read it again below, to report the error of a read
                    // the caller asked for.
                    Err(_) => {
                        self.spare = buf;
                        self.read_window(pos)?;
                    }
                }
            }
            _ => {
                self.drop_window()?;
                self.read_window(pos)?;
            }
        }
        self.prefetch();
        Ok(())
    }

    fn read_window(&mut self, pos: u64) -> crate::Result<()> {
        let len = (self.size - pos).min(self.window as u64) as usize;
        let mut b = std::mem::take(&mut self.spare);
        b.clear();
        b.resize(len, 0);
        // The old window becomes the spare buffer; if the read fails, no
        // window is left.
        self.spare = std::mem::take(&mut self.cur);
        self.cur_off = pos;
        self.cur = self.client.pread_buf(b, pos, CmdFlags::empty())?;
        Ok(())
    }
}

impl Read for NbdFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let in_window = |f: &NbdFile| f.pos >= f.cur_off && f.pos < f.cur_off + f.cur.len() as u64;
        if !in_window(self) {
            if n >= self.window {
                // Large reads go straight into the caller's buffer.
                let n = n.min(self.max_io);
                self.drop_window()?;
                self.client
                    .pread(&mut buf[..n], self.pos, CmdFlags::empty())?;
                self.pos += n as u64;
                return Ok(n);
            }
            self.fill(self.pos)?;
        }
        let start = (self.pos - self.cur_off) as usize;
        let k = n.min(self.cur.len() - start);
        buf[..k].copy_from_slice(&self.cur[start..start + k]);
        self.pos += k as u64;
        Ok(k)
    }
}

impl Write for NbdFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let left = self.size.saturating_sub(self.pos);
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "write past the end of the export",
            ));
        }
        let n = (buf.len() as u64).min(left).min(self.max_io as u64) as usize;
        self.drop_window()?;
        self.client.pwrite(&buf[..n], self.pos, CmdFlags::empty())?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.client.export_info()?.can_flush() {
            self.client.flush(CmdFlags::empty())?;
        }
        Ok(())
    }
}

impl Seek for NbdFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}
