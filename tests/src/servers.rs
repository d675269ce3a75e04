//! Launchers for real NBD servers, for interoperability tests.
//!
//! Each launcher starts one server process listening on a Unix socket in a
//! fresh private temporary directory (or, for [`nbdkit_tcp`], on a free
//! 127.0.0.1 port), waits until it is ready (at most 10 s), and returns a
//! [`Server`]. If the server does not come up, the launcher panics with the
//! command line and the server's stderr.
//!
//! Dropping the [`Server`] stops the process by its PID (SIGTERM, then
//! SIGKILL if it has not exited after 5 s) and removes the directory.
//!
//! Which server to pick (see `shared/servers.md`):
//! * [`nbdkit`]: the workhorse. `memory 64M` for read/write round trips,
//!   `pattern` for verifiable data, `null` for sizes, `sh`/`eval` scripts and
//!   filters (`--filter=error`, `--filter=delay`, `--no-sr`, `-o`,
//!   `--mask-handshake=0`, ...) for odd behaviour.
//! * [`qemu_nbd`]: the only peer (with [`qemu_storage_daemon`]) that speaks
//!   extended headers; also named exports with descriptions, block sizes,
//!   `qemu:allocation-depth` and dirty bitmaps.
//! * [`nbd_server`]: an old-school server with simple replies only, several
//!   exports, and a size of 0 reported by `NBD_OPT_INFO`.
//!
//! Child servers (all but nbd-server, which daemonizes) are started with a
//! parent-death signal, so they also stop if the test process is killed.
//! Linux delivers that signal when the *thread* that started the server
//! exits: create and keep a [`Server`] on the same thread (the normal case
//! in a `#[test]` function), not in a short-lived helper thread.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a launcher waits for a server to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits after SIGTERM before sending SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Poll interval while waiting for files and processes.
const POLL: Duration = Duration::from_millis(5);

/// Where a server listens.
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A running NBD server process, stopped and cleaned up on drop.
///
/// Get one from a launcher ([`nbdkit`], [`nbdkit_with`], [`nbdkit_tcp`],
/// [`qemu_nbd`], [`qemu_storage_daemon`], [`nbd_server`]) and connect the
/// client under test to [`Server::socket`] or [`Server::uri`].
#[derive(Debug)]
pub struct Server {
    /// Program name, for messages.
    name: &'static str,
    endpoint: Endpoint,
    /// Export selected by [`Server::uri`].
    default_export: String,
    pid: u32,
    /// The process when it is our child; `None` for a daemon (nbd-server).
    child: Option<Child>,
    stopped: bool,
    log: PathBuf,
    /// Dropped (removed) after `Drop::drop` has stopped the process.
    dir: TempDir,
}

impl Server {
    /// Path of the Unix socket the server listens on. Use it to connect the
    /// client under test directly.
    ///
    /// # Panics
    /// If the server listens on TCP ([`nbdkit_tcp`]); use [`Server::addr`].
    pub fn socket(&self) -> &Path {
        match &self.endpoint {
            Endpoint::Unix(p) => p,
            Endpoint::Tcp(a) => panic!("{} listens on TCP {a}, not on a Unix socket", self.name),
        }
    }

    /// The TCP address for a server from [`nbdkit_tcp`], `None` for a Unix
    /// socket server.
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp(a) => Some(*a),
        }
    }

    /// NBD URI of the server's default export: the `-x` name for qemu-nbd,
    /// the first export for nbd-server and qemu-storage-daemon, `""`
    /// otherwise. Looks like `nbd+unix:///NAME?socket=PATH` or
    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self) -> String {
        self.uri_for(&self.default_export)
    }

    /// NBD URI of the named export on this server. The export name is
    /// percent-encoded (all but unreserved characters and `/`).
    pub fn uri_for(&self, export: &str) -> String {
        let export = percent_encode(export);
        match &self.endpoint {
            Endpoint::Unix(p) => format!(
                "nbd+unix:///{export}?socket={}",
                percent_encode_bytes(p.as_os_str().as_bytes())
            ),
            Endpoint::Tcp(a) => format!("nbd://{a}/{export}"),
        }
    }

    /// Name of the export that [`Server::uri`] selects.
    pub fn default_export(&self) -> &str {
        &self.default_export
    }

    /// PID of the server process (for nbd-server, the daemon's PID from its
    /// pid file). Use with [`pid_alive`] to check that a server survived a
    /// test.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's private temporary directory. It holds the socket, the
    /// pid file and the server's log; tests may put data files there after
    /// the server has started. It is removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server has written to stdout and stderr so far
    /// (nbd-server: only until it daemonized). Use it in assertion messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => pid_alive(self.pid),
        }
    }

    /// Kills the server now with SIGKILL and waits for it to be gone, like
    /// a crash: the kernel closes every connection at once. Use it to test
    /// how the client handles a server that dies mid-request. The directory
    /// stays until drop. Does nothing if the server was already stopped.
    pub fn kill(&mut self) {
        self.halt(true);
    }

    /// Stops the server the polite way, as drop does: SIGTERM, then SIGKILL
    /// if it has not exited after 2 s. Note that nbdkit 1.32 ignores
    /// SIGTERM while a client is still connected, so this takes the full
    /// 2 s unless clients are closed first. Does nothing if the server was
    /// already stopped.
    pub fn stop(&mut self) {
        self.halt(false);
    }

    fn halt(&mut self, now: bool) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        match &mut self.child {
            Some(child) => stop_child(child, now),
            None => stop_daemon(self.pid, now),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- launchers

/// Starts `nbdkit --exit-with-parent -f -U SOCK -P PIDFILE ARGS...` on a
/// Unix socket.
///
/// `args` is the plugin and its parameters, optionally preceded by nbdkit
/// flags, for example `nbdkit(&["memory", "64M"])` or
/// `nbdkit(&["--no-sr", "--filter=delay", "memory", "1M", "rdelay=1s"])`.
/// See [`nbdkit_with`] to keep flags and plugin apart.
pub fn nbdkit(args: &[&str]) -> Server {
    nbdkit_with(&[], args)
}

/// Like [`nbdkit`], with nbdkit's own flags (`--no-sr`, `-o`, `-r`,
/// `--mask-handshake=0`, `--filter=...`) given separately. They are placed
/// before `plugin_and_params`, where nbdkit requires them.
pub fn nbdkit_with(flags: &[&str], plugin_and_params: &[&str]) -> Server {
    let dir = new_dir();
    let sock = dir.path().join("nbdkit.sock");
    let pidfile = dir.path().join("nbdkit.pid");
    let mut args: Vec<OsString> = vec![
        "--exit-with-parent".into(),
        "-f".into(),
        "-U".into(),
        sock.clone().into(),
        "-P".into(),
        pidfile.clone().into(),
    ];
    args.extend(flags.iter().map(OsString::from));
    args.extend(plugin_and_params.iter().map(OsString::from));
    launch_child(
        dir,
        Launch {
            name: "nbdkit",
            args,
            endpoint: Endpoint::Unix(sock),
            default_export: String::new(),
            pidfile,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts nbdkit on a free port of 127.0.0.1 (`-i 127.0.0.1 -p PORT`), with
/// `flags` and `plugin_and_params` as in [`nbdkit_with`]. Use it for tests
/// that need TCP; the URI is `nbd://127.0.0.1:PORT/`.
///
/// The port is chosen by binding port 0 and closing it again; if another
/// process takes it in between, the launch is retried with a new port.
pub fn nbdkit_tcp(flags: &[&str], plugin_and_params: &[&str]) -> Server {
    let mut last_err = String::new();
    for _ in 0..10 {
        let dir = new_dir();
        let pidfile = dir.path().join("nbdkit.pid");
        let port = free_port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut args: Vec<OsString> = vec![
            "--exit-with-parent".into(),
            "-f".into(),
            "-i".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string().into(),
            "-P".into(),
            pidfile.clone().into(),
        ];
        args.extend(flags.iter().map(OsString::from));
        args.extend(plugin_and_params.iter().map(OsString::from));
        match launch_child(
            dir,
            Launch {
                name: "nbdkit",
                args,
                endpoint: Endpoint::Tcp(addr),
                default_export: String::new(),
                pidfile,
            },
        ) {
            Ok(s) => return s,
            Err(e) if e.contains("Address already in use") => last_err = e,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("nbdkit_tcp: no free port after 10 attempts; last error:\n{last_err}")
}

/// Starts `qemu-nbd -k SOCK -t -e 8 --pid-file=PIDFILE ARGS... FILE` in the
/// foreground and waits for its socket.
///
/// `args` may hold any qemu-nbd options: `-x NAME` (then [`Server::uri`]
/// selects that export), `-D DESC`, `-r`, `-A`, `-B BITMAP`, `-f qcow2`, ...
/// Defaults added unless `args` overrides them: `-f raw` (unless `-f`,
/// `--format` or `--image-opts` is given), `-e 8` (unless `-e`/`--shared`),
/// `-t` (unless `--persistent` is given).
pub fn qemu_nbd(args: &[&str], file: &Path) -> Server {
    let dir = new_dir();
    let sock = dir.path().join("qemu-nbd.sock");
    let pidfile = dir.path().join("qemu-nbd.pid");
    let has = |names: &[&str]| {
        args.iter().any(|a| {
            names
                .iter()
                .any(|n| a == n || (n.starts_with("--") && a.starts_with(&format!("{n}="))))
        })
    };
    let mut full: Vec<OsString> = vec!["-k".into(), sock.clone().into()];
    if !has(&["-t", "--persistent"]) {
        full.push("-t".into());
    }
    // `-e N`, `-eN`, `--shared N` or `--shared=N`.
    if !has(&["--shared"]) && !args.iter().any(|a| a.starts_with("-e")) {
        full.extend(["-e".into(), "8".into()]);
    }
    if !has(&["-f", "--format", "--image-opts"]) {
        full.extend(["-f".into(), "raw".into()]);
    }
    let mut pid_arg = OsString::from("--pid-file=");
    pid_arg.push(&pidfile);
    full.push(pid_arg);
    full.extend(args.iter().map(OsString::from));
    full.push(file.into());
    launch_child(
        dir,
        Launch {
            name: "qemu-nbd",
            args: full,
            endpoint: Endpoint::Unix(sock),
            default_export: qemu_nbd_export_name(args),
            pidfile,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The export name given to qemu-nbd by `-x NAME`, `-xNAME`,
/// `--export-name NAME` or `--export-name=NAME`; `""` if none.
fn qemu_nbd_export_name(args: &[&str]) -> String {
    let mut name = String::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == "-x" || *a == "--export-name" {
            if let Some(v) = it.next() {
                name = v.to_string();
            }
        } else if let Some(v) = a.strip_prefix("--export-name=") {
            name = v.to_string();
        } else if let Some(v) = a.strip_prefix("-x") {
            name = v.to_string();
        }
    }
    name
}

/// One export of [`qemu_storage_daemon`]: export name, image file, and
/// extra `--export` options such as `"writable=on"`.
pub type QsdExport<'a> = (&'a str, &'a Path, &'a [&'a str]);

/// Starts one `qemu-storage-daemon` serving several exports on one Unix
/// socket (max-connections 8). Use it where one QEMU process must offer
/// several named exports, for example to test `NBD_OPT_LIST` with
/// descriptions against QEMU, or extended headers with several exports.
///
/// Each entry is `(export name, image file, extra options)`. Extra options
/// are `key=value` strings appended to that export's `--export` option, for
/// example `"writable=on"`, `"description=first export"`,
/// `"allocation-depth=on"`, `"bitmap=bm0"`. The pseudo-option
/// `"format=qcow2"` selects the image format driver (default `raw`).
/// Exports are read-only unless `"writable=on"` is given. [`Server::uri`]
/// selects the first export.
pub fn qemu_storage_daemon(exports: &[QsdExport<'_>]) -> Server {
    assert!(
        !exports.is_empty(),
        "qemu_storage_daemon needs at least one export"
    );
    let dir = new_dir();
    let sock = dir.path().join("qsd.sock");
    let pidfile = dir.path().join("qsd.pid");
    // Order matters: block devices, then the NBD server, then the exports.
    let mut args: Vec<OsString> = Vec::new();
    let mut export_args: Vec<OsString> = Vec::new();
    for (i, (name, file, extra)) in exports.iter().enumerate() {
        let format = extra
            .iter()
            .find_map(|o| o.strip_prefix("format="))
            .unwrap_or("raw");
        let mut filename = OsString::from(format!("driver=file,node-name=f{i},filename="));
        filename.push(qemu_escape_os(file.as_os_str()));
        args.extend(["--blockdev".into(), filename]);
        args.extend([
            "--blockdev".into(),
            format!("driver={format},node-name=d{i},file=f{i}").into(),
        ]);
        let mut export = format!("type=nbd,id=e{i},node-name=d{i},name={}", qemu_escape(name));
        for opt in extra.iter().filter(|o| !o.starts_with("format=")) {
            export.push(',');
            export.push_str(opt);
        }
        export_args.extend(["--export".into(), export.into()]);
    }
    let mut server = OsString::from("addr.type=unix,max-connections=8,addr.path=");
    server.push(qemu_escape_os(sock.as_os_str()));
    args.extend(["--nbd-server".into(), server]);
    args.extend(export_args);
    args.extend(["--pidfile".into(), pidfile.clone().into()]);
    launch_child(
        dir,
        Launch {
            name: "qemu-storage-daemon",
            args,
            endpoint: Endpoint::Unix(sock),
            default_export: exports[0].0.to_string(),
            pidfile,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Doubles commas, as QEMU's `key=value,...` option syntax requires.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn qemu_escape_os(s: &std::ffi::OsStr) -> OsString {
    let mut out = Vec::new();
    for &b in s.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    std::os::unix::ffi::OsStringExt::from_vec(out)
}

/// One export of [`nbd_server`]: export name, file, and extra config lines
/// as `(key, value)` pairs such as `("readonly", "true")`.
pub type NbdServerExport<'a> = (&'a str, &'a Path, &'a [(&'a str, &'a str)]);

/// Starts `nbd-server -C CONF -p PIDFILE` (it daemonizes) serving the given
/// exports on a Unix socket, and waits for its pid file and socket.
///
/// Each entry is `(export name, file, extra config lines)`; the export name
/// is the config section name, and extra lines are `key = value` pairs for
/// that section, for example `("readonly", "true")`, `("trim", "true")`,
/// `("flush", "true")`, `("fua", "true")`, `("maxconnections", "1")`.
/// nbd-server 3.24 has no export descriptions. The `[generic]` section sets
/// `unixsock`, `allowlist = true` (so `NBD_OPT_LIST` works) and
/// `max_threads = 4`; TCP is off. [`Server::uri`] selects the first export.
///
/// Remember that nbd-server 3.24 has no structured replies or meta contexts
/// and answers `NBD_OPT_INFO` with size 0 (`NBD_OPT_GO` is right).
pub fn nbd_server(exports: &[NbdServerExport<'_>]) -> Server {
    nbd_server_with(&[], exports)
}

/// Like [`nbd_server`], with extra `key = value` lines in the `[generic]`
/// section (TLS: `certfile`, `keyfile`, `cacertfile`, `force_tls`).
pub fn nbd_server_with(generic: &[(&str, &str)], exports: &[NbdServerExport<'_>]) -> Server {
    assert!(!exports.is_empty(), "nbd_server needs at least one export");
    let dir = new_dir();
    let sock = dir.path().join("nbd-server.sock");
    let pidfile = dir.path().join("nbd-server.pid");
    let conf = dir.path().join("nbd-server.conf");
    let mut text = format!(
        "[generic]\n    unixsock = {}\n    allowlist = true\n    max_threads = 4\n",
        sock.display()
    );
    for (k, v) in generic {
        text.push_str(&format!("    {k} = {v}\n"));
    }
    for (name, file, extra) in exports {
        assert!(
            !name.is_empty() && !name.contains(['[', ']', '\n']),
            "nbd-server export names must be non-empty section names: {name:?}"
        );
        text.push_str(&format!("[{name}]\n    exportname = {}\n", file.display()));
        for (k, v) in extra.iter() {
            text.push_str(&format!("    {k} = {v}\n"));
        }
    }
    fs::write(&conf, &text).expect("write nbd-server config");
    let log = dir.path().join("server.log");
    let args: Vec<OsString> = vec![
        "-C".into(),
        conf.clone().into(),
        "-p".into(),
        pidfile.clone().into(),
    ];
    let cmdline = command_line("nbd-server", &args);
    let mut parent = spawn("nbd-server", &args, &log, false);
    let fail = |why: String| {
        format!(
            "nbd-server failed to start: {why}\ncommand: {cmdline}\nconfig:\n{text}\n{}",
            log_section(&log)
        )
    };
    // The started process forks the daemon and exits.
    let status = match wait_until(|| parent.try_wait().ok().flatten()) {
        Some(s) => s,
        None => {
            stop_child(&mut parent, true);
            panic!(
                "{}",
                fail("the launcher process did not exit (did it not daemonize?)".into())
            )
        }
    };
    if !status.success() {
        panic!(
            "{}",
            fail(format!("the launcher process exited with {status}"))
        );
    }
    let pid = match wait_until(|| read_pidfile(&pidfile)) {
        Some(p) => p,
        None => panic!("{}", fail("no pid file".into())),
    };
    // The socket file appears at bind(), before listen(): wait until a
    // connection is accepted (nbd-server drops this probe quietly).
    let listening = || std::os::unix::net::UnixStream::connect(&sock).is_ok();
    if wait_until(|| (listening() || !pid_alive(pid)).then_some(())).is_none() || !pid_alive(pid) {
        stop_daemon(pid, true);
        panic!(
            "{}",
            fail(format!("daemon {pid} exited or never created its socket"))
        );
    }
    Server {
        name: "nbd-server",
        endpoint: Endpoint::Unix(sock),
        default_export: exports[0].0.to_string(),
        pid,
        child: None,
        stopped: false,
        log,
        dir,
    }
}

// ---------------------------------------------------------------- helpers (public)

/// Runs `nbdinfo ARGS...` (libnbd's tool, the tests' oracle) and returns
/// its standard output; panics with its standard error if it fails.
pub fn nbdinfo(args: &[&str]) -> String {
    let out = Command::new("nbdinfo")
        .args(args)
        .output()
        .expect("run nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("nbdinfo output is UTF-8")
}

/// Creates a private temporary directory for test data (disk images) that
/// must exist before a server starts. It is removed when the returned value
/// is dropped; keep it alive as long as the server.
pub fn scratch_dir() -> TempDir {
    new_dir()
}

/// Creates `dir/name` of `size` bytes, where byte `i` is `fill(i)`, and
/// returns its path. Use it to make disk images with known content, for
/// example `make_file(dir, "a.img", 1 << 20, |i| (i % 251) as u8)`.
pub fn make_file(dir: &Path, name: &str, size: u64, fill: impl Fn(u64) -> u8) -> PathBuf {
    let path = dir.join(name);
    let mut f = io::BufWriter::with_capacity(1 << 20, File::create(&path).expect("create image"));
    let mut buf = Vec::with_capacity(1 << 16);
    let mut off = 0u64;
    while off < size {
        buf.clear();
        let n = (size - off).min(1 << 16);
        buf.extend((off..off + n).map(&fill));
        f.write_all(&buf).expect("write image");
        off += n;
    }
    f.flush().expect("flush image");
    path
}

/// Creates `dir/name` as a sparse file of `size` bytes (all zeroes, no
/// blocks allocated) and returns its path. Use it for large images and for
/// hole / block-status tests.
pub fn make_sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("create sparse image");
    path
}

/// Whether a process with this PID exists and is not a zombie. Use it to
/// check that a server survived (or did not survive) a test.
///
/// Zombies count as dead: a daemonized server that exits may stay a zombie
/// when PID 1 does not reap it.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

// ---------------------------------------------------------------- internals

/// What `launch_child` needs to start and wait for a server.
struct Launch {
    name: &'static str,
    args: Vec<OsString>,
    endpoint: Endpoint,
    default_export: String,
    pidfile: PathBuf,
}

/// Starts a server as our child and waits until its pid file exists (and,
/// for Unix sockets, the socket). On failure returns a full error message
/// with the server's output; the child has been stopped.
fn launch_child(dir: TempDir, l: Launch) -> Result<Server, String> {
    let log = dir.path().join("server.log");
    let cmdline = command_line(l.name, &l.args);
    let mut child = spawn(l.name, &l.args, &log, true);
    let sock = match &l.endpoint {
        Endpoint::Unix(p) => Some(p.clone()),
        Endpoint::Tcp(_) => None,
    };
    let mut exited = None;
    let ready = wait_until(|| {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return Some(false);
        }
        let sock_ok = match &sock {
            Some(s) => s.exists(),
            None => true,
        };
        (sock_ok && read_pidfile(&l.pidfile).is_some()).then_some(true)
    });
    let why = match (ready, exited) {
        (Some(true), _) => None,
        (_, Some(status)) => Some(format!("it exited with {status}")),
        _ => Some(format!(
            "not ready after {READY_TIMEOUT:?} (no pid file or socket)"
        )),
    };
    if let Some(why) = why {
        stop_child(&mut child, true);
        return Err(format!(
            "{} failed to start: {why}\ncommand: {cmdline}\n{}",
            l.name,
            log_section(&log)
        ));
    }
    Ok(Server {
        name: l.name,
        endpoint: l.endpoint,
        default_export: l.default_export,
        pid: child.id(),
        child: Some(child),
        stopped: false,
        log,
        dir,
    })
}

/// Creates the private temporary directory of a server. The socket path
/// must fit in `sun_path` (108 bytes), so fall back to /tmp when `TMPDIR` is
/// long.
fn new_dir() -> TempDir {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 60 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    tempfile::Builder::new()
        .prefix("nbd-tests-")
        .tempdir_in(base)
        .expect("create temporary directory")
}

/// Spawns `program args` with stdin from /dev/null and stdout and stderr
/// appended to `log` (a file, so a chatty or daemonized server can never
/// block on a full pipe). With `deathsig`, the child gets SIGTERM when the
/// spawning thread dies.
fn spawn(program: &str, args: &[OsString], log: &Path, deathsig: bool) -> Child {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("create server log");
    let err = out.try_clone().expect("clone server log");
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    if deathsig {
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent; this runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run `{}`: {e} (the server packages are installed by .ci/run)",
            command_line(program, args)
        )
    })
}

/// Polls `f` every few milliseconds until it returns `Some`, for at most
/// [`READY_TIMEOUT`].
fn wait_until<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(POLL);
    }
}

/// Reads a pid file once it is complete (ends in a newline).
fn read_pidfile(path: &Path) -> Option<u32> {
    let s = fs::read_to_string(path).ok()?;
    if !s.ends_with('\n') {
        return None;
    }
    s.trim().parse().ok()
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL (at once if `now`);
/// always reaps.
fn stop_child(child: &mut Child, now: bool) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if now {
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    signal(child.id() as libc::pid_t, libc::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops a daemon that is not our child. If it leads its own process group
/// (daemons call `setsid`), the whole group is signalled, so that
/// per-connection children go too.
fn stop_daemon(pid: u32, now: bool) {
    if !pid_alive(pid) {
        return;
    }
    let pid = pid as libc::pid_t;
    // SAFETY: getpgid has no memory-safety requirements.
    let target = if unsafe { libc::getpgid(pid) } == pid {
        -pid
    } else {
        pid
    };
    if !now {
        signal(target, libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !pid_alive(pid as u32) {
                return;
            }
            sleep(POLL);
        }
    }
    signal(target, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while pid_alive(pid as u32) && Instant::now() < deadline {
        sleep(POLL);
    }
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety requirements; the PID is one we
    // started (or its process group).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A shell-like rendering of a command line, for messages.
fn command_line(program: &str, args: &[OsString]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn log_section(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    format!("--- server stdout/stderr ---\n{text}--- end ---")
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Percent-encodes all but RFC 3986 unreserved characters and `/`.
pub(crate) fn percent_encode(s: &str) -> String {
    percent_encode_bytes(s.as_bytes())
}

pub(crate) fn percent_encode_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// Reads the first 8 bytes a fresh connection gets.
    fn greeting_magic(stream: &mut impl Read) -> [u8; 8] {
        let mut b = [0u8; 8];
        stream.read_exact(&mut b).expect("read greeting");
        b
    }

    fn unix_magic(s: &Server) -> [u8; 8] {
        let mut c = UnixStream::connect(s.socket()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        greeting_magic(&mut c)
    }

    fn assert_stops_on_drop(s: Server) {
        let pid = s.pid();
        let dir = s.dir().to_path_buf();
        assert!(pid_alive(pid));
        drop(s);
        assert!(!pid_alive(pid), "server {pid} still running after drop");
        assert!(!dir.exists(), "{} not removed", dir.display());
    }

    #[test]
    fn nbdkit_memory_unix() {
        let s = nbdkit(&["memory", "1M"]);
        assert_eq!(&unix_magic(&s), b"NBDMAGIC");
        assert!(s.uri().starts_with("nbd+unix:///?socket=/"), "{}", s.uri());
        assert_eq!(nbdinfo(&["--size", &s.uri()]).trim(), "1048576");
        assert!(fs::read_to_string(s.dir().join("nbdkit.pid"))
            .unwrap()
            .starts_with(&s.pid().to_string()));
        assert_stops_on_drop(s);
    }

    #[test]
    fn nbdkit_flags_before_plugin() {
        let s = nbdkit_with(&["-o"], &["memory", "4096"]);
        let mut c = UnixStream::connect(s.socket()).unwrap();
        let mut g = [0u8; 16];
        c.read_exact(&mut g).unwrap();
        assert_eq!(&g[8..], &crate::proto::OLDSTYLE_MAGIC.to_be_bytes());
    }

    #[test]
    fn nbdkit_over_tcp() {
        let s = nbdkit_tcp(&[], &["null", "8M"]);
        let addr = s.addr().unwrap();
        assert_eq!(s.uri(), format!("nbd://127.0.0.1:{}/", addr.port()));
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(&greeting_magic(&mut c), b"NBDMAGIC");
        assert_eq!(nbdinfo(&["--size", &s.uri()]).trim(), "8388608");
        drop(c);
        assert_stops_on_drop(s);
    }

    #[test]
    fn kill_stops_now_and_keeps_dir() {
        let mut s = nbdkit(&["null", "1M"]);
        let pid = s.pid();
        assert!(s.is_running());
        // A connected client must not delay the kill, and sees EOF.
        let mut c = UnixStream::connect(s.socket()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(&greeting_magic(&mut c), b"NBDMAGIC");
        let t = Instant::now();
        s.kill();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 10, "rest of the greeting, then EOF");
        assert!(!s.is_running());
        assert!(!pid_alive(pid));
        assert!(s.dir().exists());
        assert!(UnixStream::connect(s.socket()).is_err());
        s.kill();
    }

    #[test]
    fn qemu_nbd_named_export() {
        let data = scratch_dir();
        let img = make_file(data.path(), "disk.raw", 1 << 20, |i| (i % 251) as u8);
        let s = qemu_nbd(&["-x", "my disk", "-D", "a description"], &img);
        assert_eq!(s.default_export(), "my disk");
        assert!(
            s.uri().starts_with("nbd+unix:///my%20disk?socket="),
            "{}",
            s.uri()
        );
        assert_eq!(&unix_magic(&s), b"NBDMAGIC");
        let list = nbdinfo(&["--list", &s.uri()]);
        assert!(
            list.contains("my disk") && list.contains("a description"),
            "{list}"
        );
        assert_eq!(nbdinfo(&["--size", &s.uri()]).trim(), "1048576");
        assert_stops_on_drop(s);
    }

    #[test]
    fn qemu_storage_daemon_two_exports() {
        let data = scratch_dir();
        let a = make_sparse_file(data.path(), "a.raw", 1 << 20);
        let b = make_sparse_file(data.path(), "b.raw", 2 << 20);
        let s = qemu_storage_daemon(&[
            ("alpha", &a, &["writable=on", "description=first export"]),
            ("beta", &b, &[]),
        ]);
        assert_eq!(&unix_magic(&s), b"NBDMAGIC");
        let list = nbdinfo(&["--list", &s.uri()]);
        assert!(list.contains("alpha") && list.contains("beta"), "{list}");
        assert!(list.contains("first export"), "{list}");
        assert_eq!(nbdinfo(&["--size", &s.uri_for("beta")]).trim(), "2097152");
        assert_stops_on_drop(s);
    }

    #[test]
    fn nbd_server_two_exports() {
        let data = scratch_dir();
        let a = make_sparse_file(data.path(), "a.img", 1 << 20);
        let b = make_file(data.path(), "b.img", 4096, |_| 0xaa);
        let s = nbd_server(&[
            ("alpha", a.as_path(), &[("trim", "true")]),
            ("beta", &b, &[("readonly", "true")]),
        ]);
        assert_eq!(&unix_magic(&s), b"NBDMAGIC");
        assert_eq!(s.default_export(), "alpha");
        let list = nbdinfo(&["--list", &s.uri()]);
        assert!(list.contains("alpha") && list.contains("beta"), "{list}");
        assert_eq!(nbdinfo(&["--size", &s.uri_for("beta")]).trim(), "4096");
        assert_eq!(nbdinfo(&["--size", &s.uri()]).trim(), "1048576");
        // A connection still open at drop time must not keep anything alive.
        let held = UnixStream::connect(s.socket()).unwrap();
        assert_stops_on_drop(s);
        drop(held);
    }

    #[test]
    #[should_panic(expected = "nbdkit failed to start")]
    fn failed_start_panics_with_stderr() {
        nbdkit(&["no-such-plugin-xyz"]);
    }

    #[test]
    fn uri_encoding() {
        assert_eq!(percent_encode("a b/c?d"), "a%20b/c%3Fd");
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(qemu_nbd_export_name(&["-r", "-x", "n"]), "n");
        assert_eq!(qemu_nbd_export_name(&["--export-name=m"]), "m");
        assert_eq!(qemu_nbd_export_name(&["-r"]), "");
    }

    #[test]
    fn make_file_content() {
        let d = scratch_dir();
        let p = make_file(d.path(), "f", 70_000, |i| (i % 7) as u8);
        let v = fs::read(p).unwrap();
        assert_eq!(v.len(), 70_000);
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 7) as u8));
    }
}
