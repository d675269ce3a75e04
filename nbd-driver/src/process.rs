//! Servers the client starts itself, as libnbd's `nbd_connect_command` and
//! `nbd_connect_systemd_socket_activation` do: [`connect_command`] (NBD on
//! the child's stdin and stdout, over a socket pair) and
//! [`connect_socket_activation`] (the child gets a listening Unix socket as
//! file descriptor 3, the systemd way). The child lives in a
//! [`Subprocess`], which stops and reaps it when dropped.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::connect::{ConnectError, Connected};
use crate::transport::Socket;

/// How long [`Subprocess`]'s drop waits for the server to exit after its
/// socket closed, and again after `SIGTERM`, before `SIGKILL`.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A server process started by [`connect_command`] or
/// [`connect_socket_activation`]. Keep it as long as the connection (the
/// adapters hold it next to their socket); dropping it stops the server:
/// it waits briefly for the server to exit by itself (a server on stdin
/// exits when its socket closes, so drop the socket first), then sends
/// `SIGTERM`, then `SIGKILL`, and reaps the process in every case.
#[derive(Debug)]
pub struct Subprocess {
    child: Option<Child>,
}

impl Subprocess {
    fn new(child: Child) -> Subprocess {
        Subprocess { child: Some(child) }
    }

    /// The server's process ID (libnbd's `nbd_get_subprocess_pid`), for
    /// messages and for signalling it yourself.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `SIGTERM` to the server now (libnbd's `nbd_kill_subprocess`
    /// with its default signal). Call it to stop a server that does not
    /// exit when the connection closes; the drop still reaps it.
    pub fn terminate(&mut self) -> io::Result<()> {
        match &mut self.child {
            Some(c) => match c.try_wait()? {
                None => signal_term(c.id()),
                Some(_) => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Waits (at most `timeout`) for the server to exit; `Ok(None)` if it
    /// is still running then. Call it after closing the connection to
    /// learn how the server ended.
    pub fn wait_timeout(
        &mut self,
        timeout: Duration,
    ) -> io::Result<Option<std::process::ExitStatus>> {
        let Some(c) = &mut self.child else {
            return Ok(None);
        };
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Subprocess {
    fn drop(&mut self) {
        let Ok(None) = self.wait_timeout(EXIT_GRACE / 4) else {
            return;
        };
        let _ = self.terminate();
        if let Ok(None) = self.wait_timeout(EXIT_GRACE) {
            if let Some(c) = &mut self.child {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn signal_term(pid: u32) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad process ID"))?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).map_err(io::Error::from)
}

fn command_for(argv: &[impl AsRef<OsStr>]) -> Result<(Command, String), ConnectError> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(ConnectError::Io {
            context: "start server".into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty command line"),
        });
    };
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let shown = argv
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    Ok((cmd, shown))
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ConnectError {
    let context = context.into();
    move |source| ConnectError::Io { context, source }
}

/// Starts `argv` (program and arguments) as a server that speaks NBD on
/// its standard input and output, such as `nbdkit -s memory 1M` or
/// `qemu-nbd ... -k /dev/stdin` style wrappers: libnbd's
/// `nbd_connect_command`. The child's stdin and stdout are one end of a
/// Unix socket pair, the client gets the other; stderr is inherited. Call
/// it instead of connecting to an address; keep the returned
/// [`Connected::process`] as long as the connection.
pub fn connect_command(argv: &[impl AsRef<OsStr>]) -> Result<Connected, ConnectError> {
    let (mut cmd, shown) = command_for(argv)?;
    let (ours, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
    let theirs_out = theirs.try_clone().map_err(io_err("socketpair"))?;
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::from(OwnedFd::from(theirs_out)));
    let child = cmd.spawn().map_err(io_err(format!("start {shown}")))?;
    // The Command holds the child's ends of the pair: close them here so
    // the server's exit is seen as end of file.
    drop(cmd);
    let process = Subprocess::new(child);
    let socket = Socket::from_unix(ours).map_err(io_err("set_nonblocking"))?;
    Ok(Connected {
        socket,
        target: shown,
        process: Some(process),
    })
}

/// Starts `argv` with systemd socket activation, as libnbd's
/// `nbd_connect_systemd_socket_activation` does, and connects to it. The
/// server (`qemu-nbd`, `nbdkit`, `qemu-storage-daemon`) gets a listening
/// Unix socket as file descriptor 3 with `LISTEN_FDS=1`, `LISTEN_PID` set
/// to its own PID, and `LISTEN_FDNAMES` set to `name` when given (libnbd's
/// `nbd_set_socket_activation_name`; qemu-storage-daemon uses it). The
/// socket lives in a private directory under the system temporary
/// directory; both are removed once the client is connected.
///
/// `LISTEN_PID` must be the server's PID, known only after the fork: the
/// child is started as `/bin/sh -c '...; exec "$@"'`, which exports its
/// own PID, moves the socket from stdin to fd 3 and replaces itself with
/// `argv` (same PID). Call it instead of connecting to an address; keep
/// the returned [`Connected::process`] as long as the connection.
pub fn connect_socket_activation(
    argv: &[impl AsRef<OsStr>],
    name: Option<&str>,
) -> Result<Connected, ConnectError> {
    let (_, shown) = command_for(argv)?;
    let dir = private_dir()?;
    let path = dir.join("sock");
    let r = (|| {
        let listener =
            UnixListener::bind(&path).map_err(io_err(format!("bind {}", path.display())))?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec 3<&0 </dev/null || exit 127; exec \"$@\"")
            .arg("nbd-socket-activation")
            .args(argv)
            .env("LISTEN_FDS", "1")
            .stdin(Stdio::from(OwnedFd::from(listener)));
        match name {
            Some(n) => cmd.env("LISTEN_FDNAMES", n),
            None => cmd.env_remove("LISTEN_FDNAMES"),
        };
        let child = cmd.spawn().map_err(io_err(format!("start {shown}")))?;
        drop(cmd);
        let process = Subprocess::new(child);
        // The listening socket exists already: the kernel queues this
        // connection until the server accepts it.
        let s =
            UnixStream::connect(&path).map_err(io_err(format!("connect: {}", path.display())))?;
        let socket = Socket::from_unix(s).map_err(io_err("set_nonblocking"))?;
        Ok(Connected {
            socket,
            target: shown,
            process: Some(process),
        })
    })();
    let _ = fs::remove_file(&path);
    let _ = fs::remove_dir(&dir);
    r
}

/// A new directory only this user can enter, for the activation socket.
fn private_dir() -> Result<PathBuf, ConnectError> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir();
    let mut last = None;
    for _ in 0..16 {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("nbd-rs-{}-{n}-{nanos:x}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err(format!("mkdir {}", dir.display()))(e)),
        }
    }
    Err(io_err("mkdir for the activation socket")(
        last.unwrap_or_else(|| io::Error::other("no free name")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn command_gets_the_socket_on_stdin_and_stdout() {
        // `cat` echoes what the client sends: both directions are the pair.
        let c = connect_command(&["cat"]).unwrap();
        let Socket::Unix(s) = c.socket else {
            panic!("not unix")
        };
        s.set_nonblocking(false).unwrap();
        let mut s = s;
        s.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let mut p = c.process.unwrap();
        drop(s);
        // cat sees end of file and exits by itself.
        assert!(p.wait_timeout(Duration::from_secs(5)).unwrap().is_some());
    }

    #[test]
    fn drop_kills_a_server_that_does_not_exit() {
        let c = connect_command(&["sleep", "600"]).unwrap();
        let p = c.process.unwrap();
        let pid = p.pid();
        let t = Instant::now();
        drop(p);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!std::path::Path::new(&format!("/proc/{pid}/stat")).exists());
    }

    #[test]
    fn activation_environment() {
        // The child reports what a socket-activated server would see.
        let script = "test \"$LISTEN_PID\" = $$ && test \"$LISTEN_FDS\" = 1 \
                      && test \"$LISTEN_FDNAMES\" = myname && test -S /proc/self/fd/3 \
                      && exec sleep 5";
        let c = connect_socket_activation(&["sh", "-c", script], Some("myname")).unwrap();
        let mut p = c.process.unwrap();
        // Still running after a moment means every test passed.
        assert!(p
            .wait_timeout(Duration::from_millis(300))
            .unwrap()
            .is_none());
    }

    #[test]
    fn empty_and_missing_commands_are_errors() {
        let none: [&str; 0] = [];
        assert!(connect_command(&none).is_err());
        let e = connect_command(&["/nonexistent/nbd-server-xyz"]).unwrap_err();
        assert!(e.to_string().contains("nbd-server-xyz"), "{e}");
    }
}
