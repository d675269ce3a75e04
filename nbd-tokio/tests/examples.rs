//! The examples as a user runs them: `deadline-read-tokio` against a
//! silent server, nbdkit's delay filter and a normal nbdkit (the same
//! checks as nbd-std's and nbd-mio's `deadline-read`), `get-size`, and a
//! two-second smoke run of `aio-bench-tokio`.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nbd_tests::examples::{cargo, run_command, workspace_dir, Run};
use nbd_tests::servers::{nbdkit, nbdkit_with, scratch_dir};

/// Builds nbd-tokio's examples once per test process.
fn example(name: &str) -> Command {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let ws = workspace_dir();
        let out = cargo()
            .args(["build", "-q", "-p", "nbd-tokio", "--examples"])
            .current_dir(&ws)
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(d) if PathBuf::from(&d).is_absolute() => PathBuf::from(d),
            Some(d) => ws.join(d),
            None => ws.join("target"),
        };
        target.join("debug").join("examples")
    });
    Command::new(dir.join(name))
}

fn run(name: &str, args: &[&str]) -> Run {
    let mut c = example(name);
    c.args(args);
    run_command(c, "")
}

/// The deadline passed, not much later, and not before.
fn in_time(started: Instant, deadline: Duration) {
    let e = started.elapsed();
    assert!(e >= deadline, "gave up early: {e:?}");
    assert!(e < deadline + Duration::from_secs(3), "hung: {e:?}");
}

#[test]
fn deadline_read_tokio_against_a_silent_server() {
    // Accepts (the kernel does, through the backlog) and never speaks.
    let dir = scratch_dir();
    let path = dir.path().join("silent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let uri = format!("nbd+unix:///?socket={}", path.display());
    example("deadline-read-tokio"); // build before the clock starts
    let t = Instant::now();
    let r = run("deadline-read-tokio", &[&uri, "1"]);
    in_time(t, Duration::from_secs(1));
    r.assert_one_line_error("timed out waiting for the server's greeting");
}

#[test]
fn deadline_read_tokio_against_the_delay_filter() {
    let server = nbdkit_with(&["--filter=delay"], &["memory", "1M", "rdelay=3"]);
    example("deadline-read-tokio");
    let t = Instant::now();
    let r = run("deadline-read-tokio", &[&server.uri(), "1"]);
    in_time(t, Duration::from_secs(1));
    r.assert_one_line_error("NBD_CMD_READ timed out");
}

#[test]
fn deadline_read_tokio_against_a_normal_nbdkit() {
    let server = nbdkit(&["memory", "1M"]);
    let r = run("deadline-read-tokio", &[&server.uri(), "2"]);
    r.assert_ok();
    assert_eq!(r.stdout_text(), "ok\n");
    run("deadline-read-tokio", &[&server.uri(), "soon"]).assert_one_line_error("usage");
    run("deadline-read-tokio", &[&server.uri()]).assert_one_line_error("usage");
}

#[test]
fn get_size_prints_the_size() {
    let server = nbdkit(&["memory", "3M"]);
    let r = run("get-size", &[&server.uri()]);
    r.assert_ok();
    assert_eq!(r.stdout_text(), format!("{}\n", 3 << 20));
    let r = run("get-size", &[server.socket().to_str().unwrap()]);
    r.assert_ok();
    assert_eq!(r.stdout_text(), format!("{}\n", 3 << 20));
}

#[test]
fn aio_bench_tokio_smoke_verifies_pattern_data_and_prints_json() {
    let server = nbdkit(&["pattern", "16M"]);
    let r = run(
        "aio-bench-tokio",
        &["-V", "-r", "64k", "-q", "8", &server.uri()],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        r.stdout_text()
            .starts_with("read rs=65536 qd=8 bytes=16777216 "),
        "{r:?}"
    );
    let server = nbdkit(&["null", "16M"]);
    let r = run(
        "aio-bench-tokio",
        &["-w", "-j", "-q", "4", "-i", "2", &server.uri()],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let out = r.stdout_text();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("\"client\":\"nbd-tokio\""), "{out}");
    // Steady state (the second iteration): no allocation per request.
    let allocs: f64 = lines[1]
        .split("\"allocs_per_req\":")
        .nth(1)
        .and_then(|t| t.split([',', '}']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no allocs_per_req in {out}"));
    assert!(allocs < 0.05, "{allocs} allocations per request: {out}");
}
