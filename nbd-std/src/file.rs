//! [`NbdFile`]: an export seen as a file (`Read + Write + Seek`).

use nbd_core::CmdFlags;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::client::Client;

/// Wraps a connected [`Client`] so that an export can be used wherever a
/// file is expected. Reads and writes go straight to the server at the
/// current position (no caching); reads stop at the end of the export;
/// writes past the end fail with `StorageFull`. `flush` sends
/// `NBD_CMD_FLUSH` when the server supports it.
#[derive(Debug)]
pub struct NbdFile {
    client: Client,
    pos: u64,
    size: u64,
    max_io: usize,
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

    /// Gives the client back.
    pub fn into_inner(self) -> Client {
        self.client
    }
}

impl Read for NbdFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left).min(self.max_io as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.client
            .pread(&mut buf[..n], self.pos, CmdFlags::empty())?;
        self.pos += n as u64;
        Ok(n)
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
