//! TLS-PSK (feature `tls-psk`): the second TLS backend, on OpenSSL,
//! because rustls has no external pre-shared keys. The key file is
//! psktool's format, one `username:hexkey` line per user, as nbdkit
//! `--tls-psk` and QEMU's `tls-creds-psk` read it.
//!
//! OpenSSL runs Sans-IO here as rustls does: its stream is an in-memory
//! buffer pair ([`MemIo`]), which [`crate::Stream`] fills from and drains
//! to the real socket, so the socket stays non-blocking and the adapters'
//! readiness handling is the same for both backends.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslStream, SslVerifyMode};

use crate::tls::{TlsError, TlsSettings};

/// Most plaintext taken by one `write_plain` (one record is 16 KiB).
const MAX_WRITE: usize = 64 * 1024;

/// The in-memory stream under OpenSSL: TLS bytes received from the socket
/// and not yet consumed, and TLS bytes to send.
#[derive(Debug, Default)]
pub(crate) struct MemIo {
    input: VecDeque<u8>,
    output: Vec<u8>,
    eof: bool,
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = self.input.read(buf)?;
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An OpenSSL TLS-PSK client session.
pub(crate) struct PskSession {
    ssl: SslStream<MemIo>,
    handshaking: bool,
    user: String,
}

impl std::fmt::Debug for PskSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskSession")
            .field("user", &self.user)
            .field("handshaking", &self.handshaking)
            .finish_non_exhaustive()
    }
}

/// The user name: the settings', else the login name (libnbd's default).
fn user_name(s: &TlsSettings) -> Result<String, TlsError> {
    if let Some(u) = &s.username {
        return Ok(u.clone());
    }
    ["LOGNAME", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .ok_or_else(|| {
            TlsError::PskRejected(
                "no PSK user name: set tls-username (or a user in the URI)".into(),
            )
        })
}

fn hex_key(path: &std::path::Path, hex: &str) -> Result<Vec<u8>, TlsError> {
    let bad = |why: &str| TlsError::BadCredentials {
        path: path.to_owned(),
        reason: why.to_owned(),
    };
    let hex = hex.trim();
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * 256 {
        return Err(bad(
            "the key is not an even number of hex digits (at most 256 bytes)",
        ));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad("the key is not hex")))
        .collect()
}

/// The key of `user` in the psktool file `path`.
fn read_key(path: &std::path::Path, user: &str) -> Result<Vec<u8>, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| TlsError::BadCredentials {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    for line in text.lines() {
        if let Some((u, k)) = line.split_once(':') {
            if u == user {
                return hex_key(path, k);
            }
        }
    }
    Err(TlsError::BadCredentials {
        path: path.to_owned(),
        reason: format!("no key for user {user:?} in the PSK file"),
    })
}

fn ssl_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Protocol(e.to_string())
}

impl PskSession {
    /// A session for the user and key in `s` (its `psk_file` is set); it
    /// queues the ClientHello.
    pub(crate) fn new(s: &TlsSettings) -> Result<PskSession, TlsError> {
        let path = s
            .psk_file
            .as_deref()
            .ok_or_else(|| TlsError::Protocol("no PSK file".into()))?;
        let user = user_name(s)?;
        let key = read_key(path, &user)?;
        if user.len() > 128 {
            return Err(TlsError::PskRejected(
                "the PSK user name is too long".into(),
            ));
        }
        let mut ctx = SslContext::builder(SslMethod::tls_client()).map_err(ssl_err)?;
        // PSK authenticates both sides; there are no certificates.
        ctx.set_verify(SslVerifyMode::NONE);
        ctx.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL:!MD5:!RC4:!3DES")
            .map_err(ssl_err)?;
        let id = user.clone();
        ctx.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
            let id = id.as_bytes();
            if id.len() + 1 > identity.len() || key.len() > psk.len() {
                return Ok(0);
            }
            identity[..id.len()].copy_from_slice(id);
            identity[id.len()] = 0;
            psk[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        let ctx = ctx.build();
        let ssl = Ssl::new(&ctx).map_err(ssl_err)?;
        let ssl = SslStream::new(ssl, MemIo::default()).map_err(ssl_err)?;
        let mut s = PskSession {
            ssl,
            handshaking: true,
            user,
        };
        s.process()
            .map_err(|e| TlsError::from_io(&e).cloned().unwrap_or_else(|| ssl_err(e)))?;
        Ok(s)
    }

    pub(crate) fn wants_write(&self) -> bool {
        !self.ssl.get_ref().output.is_empty()
    }

    pub(crate) fn write_tls(&mut self, w: &mut dyn Write) -> io::Result<usize> {
        let out = &mut self.ssl.get_mut().output;
        let n = w.write(out)?;
        out.drain(..n);
        Ok(n)
    }

    pub(crate) fn read_tls(&mut self, r: &mut dyn Read) -> io::Result<usize> {
        let mut buf = [0u8; 16 * 1024 + 512];
        let n = r.read(&mut buf)?;
        let m = self.ssl.get_mut();
        if n == 0 {
            m.eof = true;
        }
        m.input.extend(&buf[..n]);
        Ok(n)
    }

    fn refused(&self, e: &openssl::ssl::Error) -> io::Error {
        // OpenSSL reports a refused identity or key as an alert from the
        // server (unknown_psk_identity, decrypt_error, handshake_failure)
        // or as a bad record MAC when the keys differ.
        let m = e.to_string();
        let t = if self.ssl.get_ref().eof && e.code() == ErrorCode::SYSCALL {
            TlsError::ClosedDuringHandshake
        } else {
            TlsError::PskRejected(format!("user {:?}: {m}", self.user))
        };
        io::Error::new(io::ErrorKind::PermissionDenied, t)
    }

    /// Advances the handshake with what arrived; whether input is waiting.
    pub(crate) fn process(&mut self) -> io::Result<bool> {
        if self.handshaking {
            match self.ssl.connect() {
                Ok(()) => self.handshaking = false,
                Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => {
                    if self.ssl.get_ref().eof {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            TlsError::ClosedDuringHandshake,
                        ));
                    }
                }
                Err(e) => return Err(self.refused(&e)),
            }
        }
        Ok(self.has_input())
    }

    pub(crate) fn closed_in_handshake(&self) -> TlsError {
        TlsError::PskRejected(format!(
            "the server closed the session during the handshake: it does not know user {:?}, \
             or its key differs",
            self.user
        ))
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.handshaking
    }

    pub(crate) fn has_input(&self) -> bool {
        self.ssl.ssl().pending() > 0 || !self.ssl.get_ref().input.is_empty()
    }

    pub(crate) fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.ssl.ssl_read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                if self.ssl.get_ref().eof && self.ssl.get_ref().input.is_empty() {
                    Err(io::ErrorKind::UnexpectedEof.into())
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
            Err(e) if e.code() == ErrorCode::SYSCALL && self.ssl.get_ref().eof => {
                Err(io::ErrorKind::UnexpectedEof.into())
            }
            Err(e) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                TlsError::Protocol(e.to_string()),
            )),
        }
    }

    pub(crate) fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut chunk = Vec::new();
        for b in bufs {
            let room = MAX_WRITE - chunk.len();
            if room == 0 {
                break;
            }
            chunk.extend_from_slice(&b[..b.len().min(room)]);
        }
        if chunk.is_empty() {
            return Ok(0);
        }
        // The memory stream takes everything: one call writes it all.
        self.ssl.ssl_write(&chunk).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                TlsError::Protocol(e.to_string()),
            )
        })
    }

    pub(crate) fn close_notify(&mut self) {
        let _ = self.ssl.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psktool_lines_are_parsed() {
        let dir = std::env::temp_dir().join(format!("nbd-psk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys.psk");
        std::fs::write(&f, "bob:00ff\nalice:0102a0\n").unwrap();
        assert_eq!(read_key(&f, "alice").unwrap(), vec![1, 2, 0xa0]);
        assert!(matches!(
            read_key(&f, "carol"),
            Err(TlsError::BadCredentials { .. })
        ));
        std::fs::write(&f, "alice:0g\n").unwrap();
        assert!(read_key(&f, "alice").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
