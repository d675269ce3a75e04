//! The `nbd` tool against real servers, differentially against libnbd's
//! own tools (nbdinfo, nbdcopy, nbddump 1.14) on the same servers.
//!
//! libnbd 1.14 predates two outputs of current libnbd that `nbd info`
//! prints: the top-level `"extended"` key (and `using extended packets`)
//! and the per-export `can_block_status_payload`; the comparisons allow
//! exactly those and nothing else.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use nbd_tests::servers::{self, nbd_server, nbdkit, qemu_nbd, scratch_dir};
use serde_json::Value;

const NBD: &str = env!("CARGO_BIN_EXE_nbd");

fn nbd(args: &[&str]) -> Output {
    Command::new(NBD).args(args).output().expect("run nbd")
}

fn tool(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .expect("run libnbd tool")
}

fn ok_stdout(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("UTF-8 output")
}

/// Keys `nbd info --json` prints that nbdinfo 1.14 does not know yet.
const NEWER_KEYS: &[&str] = &["extended", "can_block_status_payload"];

fn assert_json_like_nbdinfo(ours: &Value, theirs: &Value, path: &str) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                let Some(mine) = a.get(k) else {
                    panic!("{path}: key {k:?} missing from nbd info's JSON");
                };
                assert_json_like_nbdinfo(mine, v, &format!("{path}.{k}"));
            }
            for k in a.keys() {
                assert!(
                    b.contains_key(k) || NEWER_KEYS.contains(&k.as_str()),
                    "{path}: extra key {k:?}"
                );
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: array lengths");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_json_like_nbdinfo(x, y, &format!("{path}[{i}]"));
            }
        }
        (a, b) => assert_eq!(a, b, "{path}"),
    }
}

fn compare_info_json(args: &[&str], uri: &str) {
    let mut a: Vec<&str> = args.to_vec();
    a.push(uri);
    let ours: Value =
        serde_json::from_str(&ok_stdout(nbd(&[&["info"], &a[..]].concat()), "nbd info"))
            .expect("nbd info prints JSON");
    let theirs: Value = serde_json::from_str(&ok_stdout(tool("nbdinfo", &a), "nbdinfo"))
        .expect("nbdinfo prints JSON");
    assert_json_like_nbdinfo(&ours, &theirs, "$");
}

/// The text report without the lines libnbd 1.14 does not print.
fn normalize_text(s: &str) -> String {
    s.lines()
        .filter(|l| !l.trim_start().starts_with("can_block_status_payload:"))
        .map(|l| l.replace("using extended packets", "using structured packets"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn compare_info_text(args: &[&str], uri: &str) {
    let mut a: Vec<&str> = args.to_vec();
    a.push(uri);
    let ours = ok_stdout(nbd(&[&["info"], &a[..]].concat()), "nbd info");
    let theirs = ok_stdout(tool("nbdinfo", &a), "nbdinfo");
    assert_eq!(
        normalize_text(&ours),
        normalize_text(&theirs),
        "nbd info {a:?}"
    );
}

fn exit_code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// One line on stderr, starting with the subcommand's name.
fn assert_one_line_error(o: &Output, sub: &str) {
    assert_eq!(
        exit_code(o),
        1,
        "exit status; stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.starts_with(&format!("nbd {sub}: ")), "{err:?}");
    assert!(o.stdout.is_empty(), "nothing on stdout");
}

/// A qemu-nbd export over a sparse raw file with 1 MiB of 0x11 at 1 MiB and
/// 64 KiB of 0x22 at 20 MiB.
fn sparse_image(dir: &Path) -> std::path::PathBuf {
    let p = servers::make_sparse_file(dir, "sparse.raw", 64 << 20);
    let st = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x11 1M 1M",
            "-c",
            "write -P 0x22 20M 64k",
        ])
        .arg(&p)
        .stdout(Stdio::null())
        .status()
        .expect("qemu-io");
    assert!(st.success());
    p
}

fn allocated_kib(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() / 2
}

// ---------------------------------------------------------------- info

/// `nbd info --json` has nbdinfo's keys and values on nbdkit (memory,
/// data, a read-only null), qemu-nbd (named export, description, block
/// sizes, extended headers) and nbd-server (simple replies only).
#[test]
fn info_json_matches_nbdinfo() {
    let mem = nbdkit(&["memory", "1M"]);
    compare_info_json(&["--json"], &mem.uri());
    let data = nbdkit(&["data", "1 2 3 @0x1fe 0x55 0xaa", "size=1000000"]);
    compare_info_json(&["--json"], &data.uri());
    let null = nbdkit(&["-r", "null", "3M"]);
    compare_info_json(&["--json"], &null.uri_for("exp"));

    let dir = scratch_dir();
    let img = sparse_image(dir.path());
    let q = qemu_nbd(&["-x", "exp1", "-D", "test export"], &img);
    compare_info_json(&["--json"], &q.uri());
    compare_info_text(&[], &q.uri());

    let f = servers::make_file(dir.path(), "a.img", 1 << 20, |i| (i % 251) as u8);
    let ns = nbd_server(&[("alpha", &f, &[("flush", "true"), ("trim", "true")])]);
    compare_info_json(&["--json"], &ns.uri());
    compare_info_text(&[], &ns.uri());
}

/// The text report is nbdinfo's, line for line.
#[test]
fn info_text_matches_nbdinfo() {
    let mem = nbdkit(&["memory", "1M"]);
    compare_info_text(&[], &mem.uri());
    let data = nbdkit(&["data", "1 2 3 @0x1fe 0x55 0xaa", "size=1000000"]);
    compare_info_text(&[], &data.uri());
    compare_info_text(&["--no-content"], &data.uri());
    compare_info_text(&["--size"], &data.uri());
    compare_info_text(&["--size", "--json"], &data.uri());
}

/// `--list` (text and JSON) on servers with several exports.
#[test]
fn info_list_matches_nbdinfo() {
    let dir = scratch_dir();
    let a = servers::make_file(dir.path(), "a.img", 1 << 20, |_| 1);
    let b = servers::make_file(dir.path(), "b.img", 2 << 20, |_| 2);
    let ns = nbd_server(&[("alpha", &a, &[]), ("beta", &b, &[("readonly", "true")])]);
    compare_info_json(&["--list", "--json"], &ns.uri());
    compare_info_text(&["--list"], &ns.uri());

    let files = scratch_dir();
    servers::make_file(files.path(), "one", 4096, |_| 0);
    servers::make_file(files.path(), "two", 8192, |i| i as u8);
    let d = format!("dir={}", files.path().display());
    let k = nbdkit(&["file", &d]);
    compare_info_json(&["--list", "--json"], &k.uri());
    compare_info_json(&["--list", "--json", "--content"], &k.uri());
    compare_info_text(&["--list"], &k.uri());
}

/// `--map`, `--map --totals`, with and without `--json`, for
/// base:allocation and qemu's allocation depth.
#[test]
fn info_map_matches_nbdinfo() {
    let data = nbdkit(&[
        "data",
        "1 2 3 @0x10000 \"hello\" @0x30000 1",
        "size=1000000",
    ]);
    let dir = scratch_dir();
    let img = sparse_image(dir.path());
    let q = qemu_nbd(&["-A"], &img);
    for uri in [data.uri(), q.uri()] {
        compare_info_text(&["--map"], &uri);
        compare_info_text(&["--map", "--totals"], &uri);
        compare_info_json(&["--map", "--json"], &uri);
        compare_info_json(&["--map", "--totals", "--json"], &uri);
    }
    compare_info_text(&["--map=qemu:allocation-depth"], &q.uri());
    compare_info_json(&["--map=qemu:allocation-depth", "--json"], &q.uri());
    let o = nbd(&["info", "--map=foo:bar", &q.uri()]);
    assert_one_line_error(&o, "info");
}

/// `--can`, `--is`, `--has` answer with nbdinfo's exit status (0 true,
/// 2 false); an unknown flag is an error (1).
#[test]
fn info_flags_exit_like_nbdinfo() {
    let rw = nbdkit(&["memory", "1M"]);
    let ro = nbdkit(&["-r", "null", "1M"]);
    let noextents = nbdkit_with_filter("noextents");
    for s in [&rw, &ro] {
        for (opt, flag) in [
            ("--can", "connect"),
            ("--can", "read"),
            ("--can", "write"),
            ("--can", "trim"),
            ("--can", "zero"),
            ("--can", "fast-zero"),
            ("--can", "flush"),
            ("--can", "fua"),
            ("--can", "cache"),
            ("--can", "df"),
            ("--can", "multi-conn"),
            ("--can", "structured-reply"),
            ("--is", "read-only"),
            ("--is", "rotational"),
            ("--is", "tls"),
        ] {
            let ours = exit_code(&nbd(&["info", opt, flag, &s.uri()]));
            let theirs = exit_code(&tool("nbdinfo", &[opt, flag, &s.uri()]));
            assert_eq!(ours, theirs, "{opt} {flag} on {}", s.uri());
            let neg = match opt {
                "--can" => "--cannot",
                _ => "--isnt",
            };
            let negated = exit_code(&nbd(&["info", neg, flag, &s.uri()]));
            assert_eq!(negated, 2 - ours, "{neg} {flag}");
        }
    }
    assert_eq!(
        exit_code(&nbd(&["info", "--is", "read-only", &ro.uri()])),
        0
    );
    assert_eq!(
        exit_code(&nbd(&["info", "--is", "read-only", &rw.uri()])),
        2
    );
    assert_eq!(
        exit_code(&nbd(&["info", "--has", "base:allocation", &rw.uri()])),
        0
    );
    assert_eq!(
        exit_code(&nbd(&["info", "--has", "qemu:nope", &rw.uri()])),
        2
    );
    assert_eq!(
        exit_code(&nbd(&[
            "info",
            "--has",
            "base:allocation",
            &noextents.uri()
        ])),
        0
    );
    let o = nbd(&["info", "--can", "foo", &rw.uri()]);
    assert_one_line_error(&o, "info");
}

fn nbdkit_with_filter(filter: &str) -> servers::Server {
    servers::nbdkit_with(&[&format!("--filter={filter}")], &["memory", "1M"])
}

/// `--uri` prints the export's URI (a JSON string with `--json`).
#[test]
fn info_uri() {
    let s = nbdkit(&["memory", "1M"]);
    let u = s.uri_for("exp");
    assert_eq!(
        ok_stdout(nbd(&["info", "--uri", &u]), "nbd info --uri"),
        format!("{u}\n")
    );
    let j: Value =
        serde_json::from_str(&ok_stdout(nbd(&["info", "--uri", "--json", &u]), "json")).unwrap();
    assert_eq!(j, Value::String(u));
}

/// Bad input: one line on stderr, exit 1, nothing on stdout.
#[test]
fn errors_are_one_line_and_exit_1() {
    let dir = scratch_dir();
    let missing = format!("nbd+unix:///?socket={}/nope.sock", dir.path().display());
    assert_one_line_error(&nbd(&["info", &missing]), "info");
    assert_one_line_error(&nbd(&["info", "nbd://[bad"]), "info");
    assert_one_line_error(&nbd(&["dump", &missing]), "dump");
    assert_one_line_error(&nbd(&["copy", &missing, "null:"]), "copy");
    assert_one_line_error(&nbd(&["info"]), "info");
    let o = nbd(&["info", "--bogus"]);
    assert_eq!(exit_code(&o), 1);
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
    assert!(nbd(&["--help"]).status.success());
    assert!(nbd(&["copy", "--help"]).status.success());
    let v = ok_stdout(nbd(&["--version"]), "--version");
    assert!(v.starts_with("nbd "), "{v}");
}

// ---------------------------------------------------------------- dump

/// The hexdump is nbddump's, byte for byte.
#[test]
fn dump_matches_nbddump() {
    let data = nbdkit(&[
        "data",
        "1 2 3 @0x1fe 0x55 0xaa @0x10000 \"hello, world!\"",
        "size=1M",
    ]);
    let small = nbdkit(&["data", "1 2 3 0x41 0x7e 0x7f 0x80", "size=37"]);
    let pat = nbdkit(&["pattern", "64K"]);
    for u in [data.uri(), small.uri(), pat.uri()] {
        let ours = nbd(&["dump", &u]);
        let theirs = tool("nbddump", &[&u]);
        assert!(ours.status.success() && theirs.status.success());
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "{u}"
        );
        let ours = nbd(&["dump", "-n", "64", &u]);
        let theirs = tool("nbddump", &["-n", "64", &u]);
        assert_eq!(ours.stdout, theirs.stdout, "-n 64 {u}");
    }
    // --offset: the dump of the whole export from that line on.
    let full = String::from_utf8(nbd(&["dump", &pat.uri()]).stdout).unwrap();
    let tail =
        String::from_utf8(nbd(&["dump", "--offset=0x100", "--length=32", &pat.uri()]).stdout)
            .unwrap();
    let want: Vec<&str> = full.lines().skip(16).take(2).collect();
    assert_eq!(tail.lines().collect::<Vec<_>>(), want);
}

// ---------------------------------------------------------------- copy

fn nbdcopy_to_file(uri: &str, path: &Path) {
    let st = Command::new("nbdcopy").arg(uri).arg(path).status().unwrap();
    assert!(st.success(), "nbdcopy {uri}");
}

fn same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert!(
        x.len() == y.len() && x == y,
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// Copies in every direction (NBD to file, file to NBD, NBD to NBD with
/// and without multi-conn, stdin, stdout, null:), each checked against
/// nbdcopy's read of the same data.
#[test]
fn copy_round_trips() {
    let dir = scratch_dir();
    let d = dir.path();
    let pat = nbdkit(&["pattern", "20M"]);
    let ref_img = d.join("ref.raw");
    nbdcopy_to_file(&pat.uri(), &ref_img);

    // NBD -> file.
    let out = d.join("out.raw");
    ok_stdout(
        nbd(&["copy", &pat.uri(), out.to_str().unwrap()]),
        "copy nbd->file",
    );
    same_file(&out, &ref_img);

    // file -> NBD, NBD -> NBD (4 connections), -C 1, --synchronous, small requests.
    let a = nbdkit(&["memory", "20M"]);
    let b = nbdkit(&["memory", "20M"]);
    ok_stdout(
        nbd(&["copy", ref_img.to_str().unwrap(), &a.uri()]),
        "copy file->nbd",
    );
    let back = d.join("back.raw");
    nbdcopy_to_file(&a.uri(), &back);
    same_file(&back, &ref_img);
    for extra in [
        &[][..],
        &["-C", "1"],
        &["--synchronous"],
        &["--request-size=4096", "-R", "16"],
    ] {
        let (au, bu) = (a.uri(), b.uri());
        let mut args = vec!["copy"];
        args.extend_from_slice(extra);
        args.push(&au);
        args.push(&bu);
        ok_stdout(nbd(&args), "copy nbd->nbd");
        let back2 = d.join("back2.raw");
        nbdcopy_to_file(&b.uri(), &back2);
        same_file(&back2, &ref_img);
        let z = nbd(&["zero", &b.uri()]);
        assert!(z.status.success(), "{}", String::from_utf8_lossy(&z.stderr));
    }

    // stdout and stdin.
    let o = Command::new(NBD)
        .args(["copy", &pat.uri(), "-"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stdout == std::fs::read(&ref_img).unwrap(), "stdout copy");
    let st = Command::new(NBD)
        .args(["copy", "-", &b.uri()])
        .stdin(std::fs::File::open(&ref_img).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let back3 = d.join("back3.raw");
    nbdcopy_to_file(&b.uri(), &back3);
    same_file(&back3, &ref_img);

    // null:
    ok_stdout(nbd(&["copy", &pat.uri(), "null:"]), "copy to null:");
}

/// Holes stay holes: a sparse qemu-nbd export, a sparse file and an
/// nbdkit memory export copied to files allocate only their data; with
/// --allocated everything is allocated. The bytes are the same each time.
#[test]
fn sparse_copies_stay_sparse() {
    let dir = scratch_dir();
    let d = dir.path();
    let img = sparse_image(d);
    let q = qemu_nbd(&["-r"], &img);

    let out = d.join("from-nbd.raw");
    ok_stdout(nbd(&["copy", &q.uri(), out.to_str().unwrap()]), "copy");
    same_file(&out, &img);
    assert!(
        allocated_kib(&out) <= 2048,
        "{} KiB allocated",
        allocated_kib(&out)
    );

    let out2 = d.join("from-file.raw");
    ok_stdout(
        nbd(&["copy", img.to_str().unwrap(), out2.to_str().unwrap()]),
        "copy",
    );
    same_file(&out2, &img);
    assert!(
        allocated_kib(&out2) <= 2048,
        "{} KiB allocated",
        allocated_kib(&out2)
    );

    // Zero detection: data that is zero but allocated (no extents).
    let full = servers::make_file(d, "zeroes.raw", 8 << 20, |i| if i < 4096 { 7 } else { 0 });
    let out3 = d.join("detected.raw");
    ok_stdout(
        nbd(&["copy", full.to_str().unwrap(), out3.to_str().unwrap()]),
        "copy",
    );
    same_file(&out3, &full);
    assert!(
        allocated_kib(&out3) <= 256,
        "{} KiB allocated",
        allocated_kib(&out3)
    );

    // Into NBD and back: the memory export stays sparse too.
    let m = nbdkit(&["memory", "64M"]);
    ok_stdout(
        nbd(&["copy", img.to_str().unwrap(), &m.uri()]),
        "copy to memory",
    );
    let map = ok_stdout(nbd(&["info", "--map", "--totals", &m.uri()]), "map");
    assert!(map.contains("hole,zero"), "{map}");
    let out4 = d.join("alloc.raw");
    ok_stdout(
        nbd(&["copy", "--allocated", &m.uri(), out4.to_str().unwrap()]),
        "copy --allocated",
    );
    same_file(&out4, &img);
    assert!(
        allocated_kib(&out4) >= 64 * 1024 - 64,
        "{} KiB allocated",
        allocated_kib(&out4)
    );
}

/// --progress=FD writes "N/100" lines ending with 100/100.
#[test]
fn copy_progress_lines() {
    let dir = scratch_dir();
    let pat = nbdkit(&["pattern", "8M"]);
    let p = dir.path().join("progress");
    let f = std::fs::File::create(&p).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {NBD} copy --progress=3 '{}' null: 3>&0",
            pat.uri()
        ))
        .stdin(f)
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&p).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"100/100"), "{text:?}");
    for l in lines {
        let n: u32 = l.strip_suffix("/100").unwrap().parse().unwrap();
        assert!(n <= 100);
    }
}

/// Failures are failures: a destination smaller than the source, a read
/// error, a read-only destination, a server killed in the middle.
#[test]
fn copy_failures_exit_nonzero() {
    let dir = scratch_dir();
    let small = nbdkit(&["memory", "1M"]);
    let pat = nbdkit(&["pattern", "4M"]);
    assert_one_line_error(&nbd(&["copy", &pat.uri(), &small.uri()]), "copy");
    assert_one_line_error(&nbd(&["copy", &small.uri(), &pat.uri()]), "copy");

    let errs = servers::nbdkit_with(
        &["--filter=error"],
        &["pattern", "4M", "error-pread-rate=1"],
    );
    let out = dir.path().join("e.raw");
    assert_one_line_error(&nbd(&["copy", &errs.uri(), out.to_str().unwrap()]), "copy");

    // A slow server killed mid-copy.
    let mut slow = servers::nbdkit_with(&["--filter=delay"], &["pattern", "64M", "rdelay=50ms"]);
    let child = Command::new(NBD)
        .args(["copy", &slow.uri(), "null:"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    slow.kill();
    let o = child.wait_with_output().unwrap();
    assert_ne!(exit_code(&o), 0, "a copy from a killed server must fail");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).lines().count(),
        1,
        "{:?}",
        o.stderr
    );
}

// ---------------------------------------------------------------- discard / zero

/// discard and zero act on the range asked for, and flush.
#[test]
fn discard_and_zero() {
    let m = nbdkit(&["memory", "4M"]);
    let dir = scratch_dir();
    let img = servers::make_file(dir.path(), "ones.raw", 4 << 20, |_| 0xff);
    ok_stdout(nbd(&["copy", img.to_str().unwrap(), &m.uri()]), "fill");
    ok_stdout(
        nbd(&["zero", "--offset=1M", "--length=1M", "--flush", &m.uri()]),
        "zero",
    );
    ok_stdout(nbd(&["discard", "--offset=3M", &m.uri()]), "discard");
    let out = dir.path().join("out.raw");
    nbdcopy_to_file(&m.uri(), &out);
    let v = std::fs::read(&out).unwrap();
    assert!(v[..1 << 20].iter().all(|&b| b == 0xff));
    assert!(v[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert!(v[2 << 20..3 << 20].iter().all(|&b| b == 0xff));
    assert!(
        v[3 << 20..].iter().all(|&b| b == 0),
        "memory plugin trims to zeroes"
    );
    // Out of range and read-only: errors.
    assert_one_line_error(&nbd(&["zero", "--offset=5M", &m.uri()]), "zero");
    let ro = nbdkit(&["-r", "memory", "1M"]);
    assert_one_line_error(&nbd(&["discard", &ro.uri()]), "discard");
}

// ---------------------------------------------------------------- subprocess, timeout

/// `[ CMD ARGS ... ]` after `--` runs the server with systemd socket
/// activation, as libnbd's tools do; the server is gone afterwards.
#[test]
fn subprocess_servers() {
    let sub = ["--", "[", "nbdkit", "memory", "1M", "]"];
    let ours: Value = serde_json::from_str(&ok_stdout(
        nbd(&[&["info", "--json"][..], &sub].concat()),
        "info",
    ))
    .unwrap();
    let theirs: Value = serde_json::from_str(&ok_stdout(
        tool("nbdinfo", &[&["--json"][..], &sub].concat()),
        "nbdinfo",
    ))
    .unwrap();
    assert_json_like_nbdinfo(&ours, &theirs, "$");
    assert!(
        ours["exports"][0].get("uri").is_none(),
        "no URI for a subprocess"
    );
    assert_eq!(
        ok_stdout(
            nbd(&["info", "--size", "--", "[", "nbdkit", "null", "3M", "]"]),
            "size"
        ),
        "3145728\n"
    );
    // Copy from one subprocess into another, then dump from a third.
    let dir = scratch_dir();
    let out = dir.path().join("p.raw");
    let o = nbd(&[
        "copy",
        "--",
        "[",
        "nbdkit",
        "pattern",
        "1M",
        "]",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = Command::new("nbdcopy")
        .args(["--", "[", "nbdkit", "pattern", "1M", "]", "-"])
        .output()
        .unwrap()
        .stdout;
    assert!(std::fs::read(&out).unwrap() == want);
    let ours = nbd(&["dump", "--", "[", "nbdkit", "pattern", "64K", "]"]);
    let theirs = tool("nbddump", &["--", "[", "nbdkit", "pattern", "64K", "]"]);
    assert_eq!(ours.stdout, theirs.stdout);
    // The failed exec reports on the child's stderr too; ours is one line.
    let o = nbd(&["info", "--", "[", "/nonexistent/server", "]"]);
    assert_eq!(exit_code(&o), 1);
    let err = String::from_utf8_lossy(&o.stderr);
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("nbd info: "))
        .collect();
    assert_eq!(ours.len(), 1, "{err}");
}

/// `--timeout` gives up on a server that does not answer in time.
#[test]
fn timeout_gives_up() {
    let slow = servers::nbdkit_with(&["--filter=delay"], &["memory", "1M", "rdelay=10"]);
    let t = std::time::Instant::now();
    let o = nbd(&["dump", "--timeout", "1", &slow.uri()]);
    assert_one_line_error(&o, "dump");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        t.elapsed()
    );
    let t = std::time::Instant::now();
    let o = nbd(&["copy", "--timeout=1", &slow.uri(), "null:", "--no-extents"]);
    assert_one_line_error(&o, "copy");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        t.elapsed()
    );
}
