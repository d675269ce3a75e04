//! The transmission examples of nbd-std (`get-size`, `fetch-first-sector`,
//! `server-flags`, `reads-and-writes`, `batched-read-write`,
//! `strict-structured-reads`), run as programs against real servers.
//!
//! The examples are built and run by [`nbd_tests::examples`]. Every test
//! checks the exit status, stdout and stderr: success is status 0 with nothing on stderr; a failure
//! is status 1 with exactly one line on stderr and no panic.

use nbd_std::CmdFlags;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use nbd_std::{Client, Config};
use nbd_tests::examples::{run_example, Run};
use nbd_tests::fake::FakeServer;
use nbd_tests::proto::*;
use nbd_tests::{
    make_file, make_sparse_file, nbd_server, nbdinfo, nbdkit, nbdkit_with, qemu_nbd, scratch_dir,
    Server,
};

const MIB: u64 = 1 << 20;

/// Runs example `name` with `args` and no input.
fn run(name: &str, args: &[&str]) -> Run {
    run_example(name, args, "")
}

fn sock(s: &Server) -> &str {
    s.socket().to_str().expect("UTF-8 socket path")
}

const ALL: [&str; 6] = [
    "get-size",
    "fetch-first-sector",
    "server-flags",
    "reads-and-writes",
    "batched-read-write",
    "strict-structured-reads",
];

// ------------------------------------------------------------------ all examples

#[test]
fn bad_socket_path_is_one_line_error() {
    let dir = scratch_dir();
    let missing = dir.path().join("no-such.sock");
    let missing = missing.to_str().unwrap();
    for name in ALL {
        run(name, &[missing]).assert_one_line_error("No such file or directory");
        run(name, &[&format!("nbd+unix:///?socket={missing}")])
            .assert_one_line_error("No such file or directory");
    }
}

#[test]
fn usage_errors_are_one_line() {
    for name in ALL {
        let r = run(name, &[]);
        r.assert_one_line_error("usage:");
        assert!(r.stdout.is_empty(), "{r:?}");
        run(name, &["a", "b", "c"]).assert_one_line_error("usage:");
        run(name, &["nbd://[::1"]).assert_one_line_error("invalid NBD URI");
    }
    run("reads-and-writes", &["/x", "many"]).assert_one_line_error("invalid count");
    run("strict-structured-reads", &["/x", "0"]).assert_one_line_error("invalid count");
}

#[test]
fn every_example_accepts_a_uri() {
    let s = nbdkit(&["memory", "4M"]);
    let uri = s.uri();
    assert_eq!(run("get-size", &[&uri]).assert_ok().stdout, b"4194304\n");
    let r = run("fetch-first-sector", &[&uri]);
    assert_eq!(r.assert_ok().stdout, vec![0u8; 512]);
    assert!(run("server-flags", &[&uri])
        .assert_ok()
        .stdout_text()
        .contains("is_read_only: false\n"));
    assert!(run("reads-and-writes", &[&uri, "50"])
        .assert_ok()
        .stdout
        .is_empty());
    assert_eq!(
        run("batched-read-write", &[&uri]).assert_ok().stdout,
        b"finished OK\n"
    );
    let t = totals(run("strict-structured-reads", &[&uri, "5"]).assert_ok());
    assert_eq!(t["compliant"], 5);
}

// ------------------------------------------------------------------ get-size

#[test]
fn get_size_prints_the_size() {
    let s = nbdkit(&["memory", "1M"]);
    assert_eq!(
        run("get-size", &[sock(&s)]).assert_ok().stdout,
        b"1048576\n"
    );

    let data = scratch_dir();
    let img = make_sparse_file(data.path(), "disk.img", 3 * MIB + 512);
    let q = qemu_nbd(&["-r"], &img);
    assert_eq!(
        run("get-size", &[sock(&q)]).assert_ok().stdout,
        b"3146240\n"
    );
    let n = nbd_server(&[("disk", &img, &[])]);
    assert_eq!(
        run("get-size", &[&n.uri()]).assert_ok().stdout,
        b"3146240\n"
    );
}

// ------------------------------------------------------------------ fetch-first-sector

#[test]
fn fetch_first_sector_writes_512_raw_bytes() {
    let s = nbdkit(&["data", "1 2 3 @0x1fe 0x55 0xaa @0x200 9 9 9", "size=1M"]);
    let mut expected = vec![0u8; 512];
    expected[..3].copy_from_slice(&[1, 2, 3]);
    expected[510..].copy_from_slice(&[0x55, 0xaa]);
    assert_eq!(
        run("fetch-first-sector", &[sock(&s)]).assert_ok().stdout,
        expected
    );
    assert_eq!(
        run("fetch-first-sector", &[&s.uri()]).assert_ok().stdout,
        expected
    );
}

#[test]
fn fetch_first_sector_of_a_tiny_export_fails() {
    let s = nbdkit(&["memory", "100"]);
    let r = run("fetch-first-sector", &[sock(&s)]);
    r.assert_one_line_error("first sector");
    assert!(r.stdout.is_empty(), "{r:?}");
}

// ------------------------------------------------------------------ server-flags

/// The names server-flags prints, in order.
const FLAG_NAMES: [&str; 11] = [
    "can_block_status_payload",
    "can_cache",
    "can_df",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_zero",
    "is_read_only",
    "is_rotational",
];

/// Runs server-flags against `target` and checks its output against
/// `nbdinfo --json` (libnbd) as the oracle; returns the flags.
fn server_flags(target: &str) -> HashMap<String, bool> {
    let r = run("server-flags", &[target]);
    let text = r.assert_ok().stdout_text();
    let mut names = Vec::new();
    let mut ours = HashMap::new();
    for line in text.lines() {
        let (name, value) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("bad line {line:?} in {text}"));
        let value = match value {
            "true" => true,
            "false" => false,
            _ => panic!("bad value in {line:?}"),
        };
        names.push(name.to_string());
        ours.insert(name.to_string(), value);
    }
    assert_eq!(names, FLAG_NAMES, "{text}");

    let oracle = nbdinfo_flags(target);
    for name in FLAG_NAMES {
        match oracle.get(name) {
            Some(v) => assert_eq!(ours[name], *v, "{name} differs from nbdinfo: {text}"),
            // nbdinfo 1.14 predates can_block_status_payload.
            None => assert_eq!(name, "can_block_status_payload", "nbdinfo lacks {name}"),
        }
    }
    ours
}

/// The can_*/is_* values of `nbdinfo --json` for the first export.
fn nbdinfo_flags(target: &str) -> HashMap<String, bool> {
    let uri = if target.contains("://") {
        target.to_string()
    } else {
        format!("nbd+unix:///?socket={target}")
    };
    let json = nbdinfo(&["--json", &uri]);
    let mut flags = HashMap::new();
    for line in json.lines() {
        let line = line.trim().trim_end_matches(',');
        if let Some((key, value)) = line.split_once(": ") {
            let key = key.trim_matches('"');
            if key.starts_with("can_") || key.starts_with("is_") {
                flags.insert(key.to_string(), value == "true");
            }
        }
    }
    assert_eq!(flags.len(), 10, "unexpected nbdinfo output: {json}");
    flags
}

/// Asserts that exactly the `expected_false` flags are false.
fn assert_false_flags(flags: &HashMap<String, bool>, expected_false: &[&str]) {
    let mut falses: Vec<&str> = FLAG_NAMES.iter().copied().filter(|n| !flags[*n]).collect();
    falses.sort_unstable();
    let mut want = expected_false.to_vec();
    want.sort_unstable();
    assert_eq!(falses, want);
}

#[test]
fn server_flags_nbdkit_memory() {
    let s = nbdkit(&["memory", "1M"]);
    let f = server_flags(sock(&s));
    assert_false_flags(
        &f,
        &["can_block_status_payload", "is_read_only", "is_rotational"],
    );
    assert_eq!(server_flags(&s.uri()), f);
}

#[test]
fn server_flags_nbdkit_restricted() {
    // No structured replies (so no DF), no zeroing, no cache, no multi-conn.
    let s = nbdkit_with(
        &[
            "--no-sr",
            "--filter=nozero",
            "--filter=nocache",
            "--filter=multi-conn",
        ],
        &["memory", "1M", "cachemode=none", "multi-conn-mode=disable"],
    );
    assert_false_flags(
        &server_flags(sock(&s)),
        &[
            "can_block_status_payload",
            "can_cache",
            "can_df",
            "can_fast_zero",
            "can_multi_conn",
            "can_zero",
            "is_read_only",
            "is_rotational",
        ],
    );
}

#[test]
fn server_flags_nbdkit_read_only() {
    let s = nbdkit(&["pattern", "1M"]);
    assert_false_flags(
        &server_flags(sock(&s)),
        &[
            "can_block_status_payload",
            "can_fast_zero",
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "is_rotational",
        ],
    );
}

#[test]
fn server_flags_qemu_nbd_and_nbd_server() {
    let data = scratch_dir();
    let img = make_sparse_file(data.path(), "disk.img", MIB);
    let q = qemu_nbd(&[], &img);
    assert_false_flags(
        &server_flags(sock(&q)),
        &["can_block_status_payload", "is_read_only", "is_rotational"],
    );
    let n = nbd_server(&[(
        "disk",
        &img,
        &[("rotational", "true"), ("flush", "true"), ("trim", "true")],
    )]);
    let f = server_flags(&n.uri());
    assert!(f["is_rotational"], "{f:?}");
    assert!(!f["can_df"], "simple replies only: {f:?}");
}

// ------------------------------------------------------------------ reads-and-writes

#[test]
fn reads_and_writes_nbdkit() {
    let s = nbdkit(&["memory", "1M"]);
    let r = run("reads-and-writes", &[sock(&s)]);
    assert!(r.assert_ok().stdout.is_empty(), "{r:?}");
    // Simple replies.
    let s = nbdkit_with(&["--no-sr"], &["memory", "1M"]);
    assert!(run("reads-and-writes", &[&s.uri(), "300"])
        .assert_ok()
        .stdout
        .is_empty());
}

#[test]
fn reads_and_writes_qemu_nbd_and_nbd_server() {
    let data = scratch_dir();
    let img = make_file(data.path(), "q.img", 2 * MIB, |i| (i % 253) as u8);
    let q = qemu_nbd(&[], &img);
    run("reads-and-writes", &[sock(&q), "300"]).assert_ok();
    let img = make_sparse_file(data.path(), "n.img", 2 * MIB);
    let n = nbd_server(&[("disk", &img, &[])]);
    run("reads-and-writes", &[&n.uri(), "300"]).assert_ok();
}

#[test]
fn reads_and_writes_detects_lost_writes() {
    // The null plugin accepts writes and throws them away.
    let s = nbdkit(&["null", "1M"]);
    run("reads-and-writes", &[sock(&s), "100"]).assert_one_line_error("data mismatch at offset");
}

#[test]
fn reads_and_writes_refuses_a_read_only_export() {
    let s = nbdkit(&["pattern", "1M"]);
    run("reads-and-writes", &[sock(&s)]).assert_one_line_error("read-only");
    let s = nbdkit(&["memory", "4095"]);
    run("reads-and-writes", &[sock(&s)]).assert_one_line_error("smaller than one 4096-byte block");
}

#[test]
fn reads_and_writes_reports_a_server_error() {
    let s = nbdkit_with(
        &["--filter=error"],
        &["memory", "1M", "error-pwrite-rate=1"],
    );
    run("reads-and-writes", &[sock(&s), "10"]).assert_one_line_error("EIO");
}

// ------------------------------------------------------------------ batched-read-write

fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

/// Fills an export with [`pattern`] over the client under test.
fn fill(target: &str, len: u64) {
    let mut c = Client::connect(target, Config::default()).expect("connect");
    c.pwrite(&pattern(len), 0, CmdFlags::empty())
        .expect("fill the export");
    c.shutdown().expect("shutdown");
}

fn read_all(target: &str, len: u64) -> Vec<u8> {
    let mut c = Client::connect(target, Config::default()).expect("connect");
    let mut v = vec![0u8; len as usize];
    c.pread(&mut v, 0, CmdFlags::empty())
        .expect("read the export");
    c.shutdown().expect("shutdown");
    v
}

#[test]
fn batched_read_write_serial_server_is_non_destructive() {
    // A server that handles one request at a time: the case where a client
    // that stops reading replies while sending would deadlock.
    let s = nbdkit_with(&["--filter=noparallel"], &["memory", "2M"]);
    fill(sock(&s), 2 * MIB);
    let r = run("batched-read-write", &[sock(&s)]);
    assert_eq!(r.assert_ok().stdout, b"finished OK\n");
    assert!(
        read_all(sock(&s), 2 * MIB) == pattern(2 * MIB),
        "export changed"
    );
}

#[test]
fn batched_read_write_large_export_qemu_nbd() {
    // 2 MiB read and 2 MiB write in flight together, extended headers.
    let data = scratch_dir();
    let img = make_file(data.path(), "q.img", 6 * MIB, |i| (i % 241) as u8);
    let q = qemu_nbd(&[], &img);
    let r = run("batched-read-write", &[&q.uri()]);
    assert_eq!(r.assert_ok().stdout, b"finished OK\n");
    let now = read_all(sock(&q), 6 * MIB);
    assert!(
        now.iter().enumerate().all(|(i, &b)| b == (i % 241) as u8),
        "export changed"
    );
}

#[test]
fn batched_read_write_failures() {
    let s = nbdkit(&["null", "4M"]);
    run("batched-read-write", &[sock(&s)]).assert_one_line_error("data mismatch at offset 2097152");
    let s = nbdkit(&["pattern", "4M"]);
    run("batched-read-write", &[sock(&s)]).assert_one_line_error("read-only");
    let s = nbdkit(&["memory", "1"]);
    run("batched-read-write", &[sock(&s)]).assert_one_line_error("too small");
}

// ------------------------------------------------------------------ strict-structured-reads

/// Parses the totals printed by strict-structured-reads.
fn totals(r: &Run) -> HashMap<String, u64> {
    let text = r.stdout_text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("totals:"), "{text}");
    let mut t = HashMap::new();
    for line in lines {
        let (k, v) = line
            .trim()
            .split_once(':')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        t.insert(k.to_string(), v.trim().parse().expect("a number"));
    }
    let keys = [
        "data chunks",
        "data bytes",
        "hole chunks",
        "hole bytes",
        "error chunks",
        "all chunks",
        "df reads",
        "reads",
        "failed reads",
        "bytes read",
        "compliant",
    ];
    assert_eq!(t.len(), keys.len(), "{text}");
    for k in keys {
        assert!(t.contains_key(k), "no {k:?} in {text}");
    }
    assert_eq!(
        t["all chunks"],
        t["data chunks"] + t["hole chunks"] + t["error chunks"],
        "{text}"
    );
    t
}

#[test]
fn strict_structured_reads_qemu_nbd_sparse_file() {
    let data = scratch_dir();
    let img = make_sparse_file(data.path(), "sparse.img", 8 * MIB);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        for (off, len) in [(MIB / 2, 256 << 10), (3 * MIB, MIB), (6 * MIB + 4096, 8192)] {
            f.write_all_at(&vec![0x5a; len as usize], off).unwrap();
        }
    }
    let q = qemu_nbd(&["-r"], &img);
    let r = run("strict-structured-reads", &[sock(&q), "100"]);
    let t = totals(r.assert_ok());
    assert_eq!(t["reads"], 100);
    assert_eq!(t["compliant"], 100);
    assert_eq!(t["failed reads"], 0);
    assert_eq!(t["error chunks"], 0);
    assert_eq!(t["bytes read"], 100 * 2 * MIB);
    assert_eq!(t["data bytes"] + t["hole bytes"], t["bytes read"]);
    assert!(t["data chunks"] > 0, "{t:?}");
    assert!(t["hole chunks"] > 0, "no holes from a sparse file: {t:?}");
    assert!(t["df reads"] > 0 && t["df reads"] < 100, "{t:?}");
}

#[test]
fn strict_structured_reads_nbdkit_memory() {
    // nbdkit answers every read with one data chunk: all but the DF count
    // is deterministic. Reads are 1M - 1 bytes at offset 0 (like libnbd).
    let s = nbdkit(&["memory", "1M"]);
    let r = run("strict-structured-reads", &[sock(&s), "50"]);
    let t = totals(r.assert_ok());
    let n = 50 * (MIB - 1);
    for (k, v) in [
        ("data chunks", 50),
        ("data bytes", n),
        ("hole chunks", 0),
        ("hole bytes", 0),
        ("error chunks", 0),
        ("all chunks", 50),
        ("reads", 50),
        ("failed reads", 0),
        ("bytes read", n),
        ("compliant", 50),
    ] {
        assert_eq!(t[k], v, "{k}: {t:?}");
    }
}

#[test]
fn strict_structured_reads_simple_replies_exact_output() {
    // nbd-server: simple replies only, no DF, so the output is exact.
    let data = scratch_dir();
    let img = make_sparse_file(data.path(), "n.img", 4 * MIB);
    let n = nbd_server(&[("disk", &img, &[])]);
    let r = run("strict-structured-reads", &[&n.uri(), "20"]);
    let m = 20 * 2 * MIB;
    let expected = format!(
        "totals:\n data chunks:         20\n data bytes:  {m:>10}\n hole chunks:          0\n \
         hole bytes:           0\n error chunks:         0\n all chunks:          20\n \
         df reads:             0\n reads:               20\n failed reads:         0\n \
         bytes read:  {m:>10}\n compliant:           20\n"
    );
    assert_eq!(r.assert_ok().stdout_text(), expected);
}

#[test]
fn strict_structured_reads_counts_error_chunks() {
    let s = nbdkit_with(&["--filter=error"], &["memory", "1M", "error-pread-rate=1"]);
    let r = run("strict-structured-reads", &[sock(&s), "10"]);
    let t = totals(r.assert_ok());
    assert_eq!(t["reads"], 10);
    assert_eq!(t["failed reads"], 10);
    assert_eq!(t["error chunks"], 10);
    assert_eq!(t["data chunks"], 0);
    assert_eq!(t["compliant"], 0);
    assert_eq!(t["bytes read"], 0);
}

#[test]
fn strict_structured_reads_buggy_server_is_one_line_error() {
    // A fake server that answers a DF read with two chunks (a hole then
    // data), which the spec forbids; other reads get one data chunk.
    let server = FakeServer::start(|c| {
        c.standard_handshake(MIB, FLAG_HAS_FLAGS | FLAG_SEND_DF | FLAG_READ_ONLY)?;
        while let Some(req) = c.recv_request_or_eof()? {
            match req.typ {
                CMD_READ if req.flags & CMD_FLAG_DF != 0 => {
                    let half = req.length / 2;
                    c.send_hole_chunk(&req, req.offset, half as u32, false)?;
                    let rest = vec![1u8; (req.length - half) as usize];
                    c.send_data_chunk(&req, req.offset + half, &rest, true)?;
                }
                CMD_READ => {
                    let all = vec![1u8; req.length as usize];
                    c.send_data_chunk(&req, req.offset, &all, true)?;
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    });
    let target = server.socket().to_str().unwrap().to_string();
    let r = run("strict-structured-reads", &[&target, "40"]);
    r.assert_one_line_error("DF");
    drop(server);
}
