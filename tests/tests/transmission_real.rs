//! The transmission phase against real servers (issue 3, "Tests"): data
//! round trips (IO-01) against qemu-nbd, nbdkit (memory, data, pattern,
//! sparse-random, `--no-sr`) and nbd-server; command flags (IO-02); block
//! status against `qemu-img map` and qemu's dirty bitmaps and allocation
//! depth (IO-04); structured replies and extended headers on and off
//! (HS-10); strict mode on and off (libnbd's `errors-client-*` /
//! `errors-server-*`); error mapping (ERR-01); a server killed with reads in
//! flight (LIFE-01); and the client-side size limits (LIM-01).
//!
//! Every server is started by the test and stopped by PID when its
//! [`Server`] drops. Clients are dropped (or shut down) before their server,
//! because nbdkit ignores SIGTERM while a client is connected.

use nbd_std::CmdFlags;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nbd_core::consts::{state, CONTEXT_BASE_ALLOCATION};
use nbd_core::{BlockSize, CloseReason, CommandError, UsageError};
use nbd_std::{Client, Config, Cookie, Error, Extent, Phase, ReadChunkKind, Strict};
use nbd_tests::servers::{
    make_file, make_sparse_file, nbd_server, nbdkit, nbdkit_with, qemu_nbd, scratch_dir,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A command flag bit no version of the spec defines.
const UNKNOWN_FLAG: CmdFlags = CmdFlags::from_bits(1 << 10);

const HOLE: u64 = state::HOLE as u64;
const ZERO: u64 = state::ZERO as u64;

// ---------------------------------------------------------------- helpers

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn connect(uri: &str, cfg: Config) -> Client {
    Client::connect(uri, cfg).unwrap_or_else(|e| panic!("connect to {uri}: {e}"))
}

fn read_vec(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0xeeu8; len];
    c.pread(&mut v, offset, CmdFlags::empty())
        .unwrap_or_else(|e| panic!("pread {len} bytes at {offset}: {e}"));
    v
}

/// Asserts that the export holds `want` at `offset`, naming the first
/// differing byte.
fn assert_data(c: &mut Client, offset: u64, want: &[u8], what: &str) {
    let got = read_vec(c, offset, want.len());
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte at {} is {:#04x}, expected {:#04x}",
            offset + i as u64,
            got[i],
            want[i]
        );
    }
}

fn assert_zeroes(c: &mut Client, offset: u64, len: usize, what: &str) {
    assert_data(c, offset, &vec![0u8; len], what);
}

/// The server error (errno) behind a failed call; panics on anything else.
fn server_errno(r: Result<(), Error>, what: &str) -> u32 {
    match r {
        Err(Error::Command(CommandError::Server { errno, .. })) => errno.0,
        other => panic!("{what}: expected a server error, got {other:?}"),
    }
}

fn usage(r: Result<(), Error>, what: &str) -> UsageError {
    match r {
        Err(Error::Usage(u)) => u,
        other => panic!("{what}: expected a client-side usage error, got {other:?}"),
    }
}

fn cfg_strict(strict: Strict) -> Config {
    let mut cfg = Config::default();
    cfg.strict = strict;
    cfg
}

/// IO-01: the data round-trip workload. Writes (aligned, unaligned where
/// the block size allows, FUA), flush, write-zeroes (plain, NO_HOLE,
/// FAST_ZERO), trim, cache; every change is mirrored in `shadow` and read
/// back. `trim_zeroes`: whether this server's trim reads back as zeroes
/// (doc/proto.md, "NBD_CMD_TRIM", allows either), else the range is rewritten after
/// the trim. Uses only what the server advertised.
fn io_workload(c: &mut Client, shadow: &mut [u8], trim_zeroes: bool, seed: u64) {
    let size = c.get_size().unwrap();
    assert_eq!(size, shadow.len() as u64, "export size");
    assert!(size >= 2 * MIB, "workload needs at least 2 MiB");
    let info = c.export_info().unwrap().clone();
    let minimum = info.block_size.map(|b| b.minimum).unwrap_or(1) as u64;
    let put = |c: &mut Client, shadow: &mut [u8], off: u64, len: usize, flags: CmdFlags, s: u64| {
        let data = noise(s, len);
        c.pwrite(&data, off, flags)
            .unwrap_or_else(|e| panic!("pwrite {len} at {off} flags {flags:?}: {e}"));
        shadow[off as usize..off as usize + len].copy_from_slice(&data);
    };

    // Plain writes at the start, in the middle and at the very end.
    put(c, shadow, 0, 64 * KIB as usize, CmdFlags::empty(), seed);
    put(
        c,
        shadow,
        MIB,
        200 * KIB as usize,
        CmdFlags::empty(),
        seed + 1,
    );
    put(
        c,
        shadow,
        size - 8 * KIB,
        8 * KIB as usize,
        CmdFlags::empty(),
        seed + 2,
    );
    if minimum == 1 {
        // Unaligned offset and length.
        put(
            c,
            shadow,
            300 * KIB + 123,
            5000,
            CmdFlags::empty(),
            seed + 3,
        );
        put(c, shadow, 7, 1, CmdFlags::empty(), seed + 4);
    }
    if info.can_flush() {
        c.flush(CmdFlags::empty()).expect("flush");
    }
    for (off, len) in [(0, 64 * KIB), (MIB, 200 * KIB), (size - 8 * KIB, 8 * KIB)] {
        assert_data(
            c,
            off,
            &shadow[off as usize..(off + len) as usize],
            "read back after write + flush",
        );
    }
    if minimum == 1 {
        let (a, b) = (300 * KIB as usize + 100, 300 * KIB as usize + 5200);
        assert_data(c, a as u64, &shadow[a..b], "unaligned read back");
    }

    // FUA write (IO-02): accepted because advertised.
    if info.can_fua() {
        put(
            c,
            shadow,
            128 * KIB,
            16 * KIB as usize,
            CmdFlags::FUA,
            seed + 5,
        );
        assert_data(
            c,
            128 * KIB,
            &shadow[128 * KIB as usize..144 * KIB as usize],
            "FUA write read back",
        );
    }

    if info.can_zero() {
        // Plain write-zeroes over data.
        c.zero(16 * KIB, 16 * KIB, CmdFlags::empty()).expect("zero");
        shadow[16 * KIB as usize..32 * KIB as usize].fill(0);
        assert_zeroes(c, 16 * KIB, 16 * KIB as usize, "after write-zeroes");
        // NO_HOLE (meaningful whenever WRITE_ZEROES is).
        put(
            c,
            shadow,
            512 * KIB,
            64 * KIB as usize,
            CmdFlags::empty(),
            seed + 6,
        );
        c.zero(512 * KIB, 64 * KIB, CmdFlags::NO_HOLE)
            .expect("zero NO_HOLE");
        shadow[512 * KIB as usize..576 * KIB as usize].fill(0);
        assert_zeroes(c, 512 * KIB, 64 * KIB as usize, "after zero NO_HOLE");
        // FUA zero.
        if info.can_fua() {
            put(
                c,
                shadow,
                580 * KIB,
                4 * KIB as usize,
                CmdFlags::empty(),
                seed + 7,
            );
            c.zero(580 * KIB, 4 * KIB, CmdFlags::FUA).expect("zero FUA");
            shadow[580 * KIB as usize..584 * KIB as usize].fill(0);
            assert_zeroes(c, 580 * KIB, 4 * KIB as usize, "after zero FUA");
        }
        // FAST_ZERO: either it zeroes, or it fails at once with ENOTSUP
        // (spec: the server may refuse when zeroing would be slow).
        if info.can_fast_zero() {
            put(
                c,
                shadow,
                640 * KIB,
                64 * KIB as usize,
                CmdFlags::empty(),
                seed + 8,
            );
            match c.zero(640 * KIB, 64 * KIB, CmdFlags::FAST_ZERO) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(e.io_kind(), ErrorKind::Unsupported, "FAST_ZERO: {e}");
                    assert!(!e.is_fatal(), "FAST_ZERO failure must not be fatal");
                    c.zero(640 * KIB, 64 * KIB, CmdFlags::empty())
                        .expect("zero after FAST_ZERO");
                }
            }
            shadow[640 * KIB as usize..704 * KIB as usize].fill(0);
            assert_zeroes(c, 640 * KIB, 64 * KIB as usize, "after FAST_ZERO");
        }
    }

    if info.can_trim() {
        put(
            c,
            shadow,
            256 * KIB,
            64 * KIB as usize,
            CmdFlags::empty(),
            seed + 9,
        );
        c.trim(256 * KIB, 64 * KIB, CmdFlags::empty())
            .expect("trim");
        let got = read_vec(c, 256 * KIB, 64 * KIB as usize);
        if trim_zeroes {
            assert!(got.iter().all(|&b| b == 0), "trimmed range reads as zeroes");
            shadow[256 * KIB as usize..320 * KIB as usize].fill(0);
        } else {
            // Unknown content after a trim: make it known again.
            put(
                c,
                shadow,
                256 * KIB,
                64 * KIB as usize,
                CmdFlags::empty(),
                seed + 10,
            );
        }
        if info.can_fua() {
            c.trim(320 * KIB, 4 * KIB, CmdFlags::FUA).expect("trim FUA");
            put(
                c,
                shadow,
                320 * KIB,
                4 * KIB as usize,
                CmdFlags::empty(),
                seed + 11,
            );
        }
    }

    if info.can_cache() {
        c.cache(0, 256 * KIB, CmdFlags::empty()).expect("cache");
        c.cache(0, size, CmdFlags::empty())
            .expect("cache whole export");
    }
    if info.can_flush() {
        c.flush(CmdFlags::empty()).expect("final flush");
    }

    // Everything, in 1 MiB reads.
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        assert_data(
            c,
            off,
            &shadow[off as usize..off as usize + n],
            "final full read",
        );
        off += n as u64;
    }
}

/// A run-length view of block status for comparisons: (offset, length, flags).
type Map = Vec<(u64, u64, u64)>;

/// Adds an extent to a map, merging it with the previous one when the
/// flags are equal.
fn push_extent(map: &mut Map, off: u64, len: u64, flags: u64) {
    if let Some(last) = map.last_mut() {
        if last.2 == flags && last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    map.push((off, len, flags));
}

/// Block status of `[0, size)` for every negotiated context, merged into
/// run-length maps. Each request is answered with as many extents as the
/// server likes; the next request starts where the shortest answer ended.
fn full_maps(c: &mut Client, size: u64, flags: CmdFlags) -> Vec<(String, Map)> {
    let mut maps: Vec<(String, Map)> = Vec::new();
    let mut off = 0;
    let mut rounds = 0;
    while off < size {
        rounds += 1;
        assert!(rounds < 100_000, "block status does not make progress");
        let count = (size - off).min(u32::MAX as u64 & !0xfff);
        let answer = c
            .block_status(off, count, flags)
            .unwrap_or_else(|e| panic!("block_status {count} at {off}: {e}"));
        assert!(!answer.is_empty(), "block status answered no context");
        let covered = |ext: &[Extent]| ext.iter().map(|e| e.length).sum::<u64>().min(count);
        let adv = answer.iter().map(|(_, e)| covered(e)).min().unwrap();
        assert!(adv > 0);
        for (name, ext) in &answer {
            let i = match maps.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    maps.push((name.clone(), Vec::new()));
                    maps.len() - 1
                }
            };
            let mut at = off;
            for e in ext {
                let end = (at + e.length).min(off + adv);
                if end <= at {
                    break;
                }
                push_extent(&mut maps[i].1, at, end - at, e.flags);
                at = end;
            }
        }
        off += adv;
    }
    maps.sort();
    maps
}

fn map_of<'a>(maps: &'a [(String, Map)], name: &str) -> &'a Map {
    &maps
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no map for context {name}: {maps:?}"))
        .1
}

/// Runs a command, failing loudly with its stderr.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The integer or boolean after `"key": ` in a JSON object text.
fn json_field<'a>(obj: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\": ");
    let at = obj
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {obj}"))
        + pat.len();
    let rest = &obj[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim()
}

/// `qemu-img map --output=json` of a raw file, as a base:allocation map
/// (HOLE = not data, ZERO = zero).
fn qemu_img_map(file: &Path) -> Map {
    let json = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", file.to_str().unwrap()],
    );
    let mut map = Map::new();
    for obj in json.split('{').skip(1) {
        let start: u64 = json_field(obj, "start").parse().unwrap();
        let length: u64 = json_field(obj, "length").parse().unwrap();
        let data = json_field(obj, "data") == "true";
        let zero = json_field(obj, "zero") == "true";
        let flags = if data { 0 } else { HOLE } | if zero { ZERO } else { 0 };
        push_extent(&mut map, start, length, flags);
    }
    map
}

/// Writes `data` into `file` at `offset` (to shape a sparse image).
fn poke(file: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

// ---------------------------------------------------------------- IO-01

#[test]
fn io01_qemu_nbd_raw_file_round_trip_reaches_the_file() {
    let data = scratch_dir();
    let size = 4 * MIB;
    let img = make_file(data.path(), "disk.raw", size, |i| (i % 251) as u8);
    let mut shadow = std::fs::read(&img).unwrap();
    let srv = qemu_nbd(&["--discard=unmap"], &img);
    let mut c = connect(&srv.uri(), Config::default());
    assert!(c.get_extended_headers_negotiated(), "qemu-nbd 10 speaks EH");
    io_workload(&mut c, &mut shadow, true, 1);
    c.shutdown().expect("shutdown");
    drop(c);
    drop(srv);
    // After FLUSH and a clean disconnect the backing file holds the data.
    let file = std::fs::read(&img).unwrap();
    assert!(file == shadow, "backing file differs from the shadow copy");
}

#[test]
fn io01_nbdkit_memory_round_trip() {
    let srv = nbdkit(&["memory", "4M"]);
    let mut c = connect(&srv.uri(), Config::default());
    assert!(c.get_structured_replies_negotiated());
    assert!(
        !c.get_extended_headers_negotiated(),
        "nbdkit 1.32 has no EH"
    );
    let mut shadow = vec![0u8; 4 * MIB as usize];
    io_workload(&mut c, &mut shadow, true, 2);
    c.shutdown().expect("shutdown");
}

#[test]
fn io01_nbdkit_no_sr_simple_replies_round_trip() {
    let srv = nbdkit_with(&["--no-sr"], &["memory", "4M"]);
    let mut c = connect(&srv.uri(), Config::with_base_allocation());
    assert!(!c.get_structured_replies_negotiated());
    assert!(!c.can_meta_context(CONTEXT_BASE_ALLOCATION));
    let mut shadow = vec![0u8; 4 * MIB as usize];
    io_workload(&mut c, &mut shadow, true, 3);
    // Block status needs structured replies: refused client-side.
    let u = usage(
        c.block_status(0, 4096, CmdFlags::empty()).map(drop),
        "block status",
    );
    assert!(matches!(u, UsageError::NotAdvertised(_)), "{u:?}");
    c.shutdown().expect("shutdown");
}

#[test]
fn io01_nbdkit_data_plugin_layout_then_round_trip() {
    let srv = nbdkit(&["data", "1 2 3 @0x1fe 0x55 0xaa", "size=2M"]);
    let mut c = connect(&srv.uri(), Config::default());
    assert_eq!(c.get_size().unwrap(), 2 * MIB);
    let mut shadow = vec![0u8; 2 * MIB as usize];
    shadow[..3].copy_from_slice(&[1, 2, 3]);
    shadow[0x1fe] = 0x55;
    shadow[0x1ff] = 0xaa;
    assert_data(&mut c, 0, &shadow[..4096], "data plugin layout");
    assert_eq!(read_vec(&mut c, 0x1fe, 2), [0x55, 0xaa]);
    assert_zeroes(&mut c, 4096, MIB as usize, "data plugin tail");
    io_workload(&mut c, &mut shadow, true, 4);
    c.shutdown().expect("shutdown");
}

/// The pattern plugin: read-only, each 8-byte word holds its offset
/// (big-endian). Reads at odd offsets and lengths, and through structured
/// reads with chunk reporting.
#[test]
fn io01_nbdkit_pattern_self_verifying_reads() {
    let size = 64 * MIB;
    let srv = nbdkit(&["pattern", "64M"]);
    let mut c = connect(&srv.uri(), Config::default());
    let info = c.export_info().unwrap().clone();
    assert_eq!(info.size, size);
    assert!(info.is_read_only());
    let expect = |off: u64, len: usize| -> Vec<u8> {
        (off..off + len as u64)
            .map(|i| ((i & !7).to_be_bytes())[(i & 7) as usize])
            .collect()
    };
    let mut seed = 0x1234_5678u64;
    for i in 0..200u64 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 1 + (seed >> 40) as usize % (256 * KIB as usize);
        let off = (seed >> 7) % (size - len as u64);
        let got = read_vec(&mut c, off, len);
        assert!(
            got == expect(off, len),
            "pattern mismatch, read {i}: {len} at {off}"
        );
    }
    // The last bytes of the export, and a structured read with chunk events.
    assert_data(&mut c, size - 13, &expect(size - 13, 13), "tail");
    let mut buf = vec![0u8; 100_000];
    let mut chunks = Vec::new();
    c.pread_structured(&mut buf, 1_000_003, CmdFlags::empty(), |o, l, k| {
        chunks.push((o, l, k))
    })
    .expect("pread_structured");
    assert!(buf == expect(1_000_003, 100_000));
    let covered: u64 = chunks.iter().map(|&(_, l, _)| l).sum();
    assert_eq!(covered, 100_000, "chunks cover the read: {chunks:?}");
    assert!(chunks.iter().all(|&(_, _, k)| k == ReadChunkKind::Data));
    // DF is advertised by the pattern plugin: one data chunk.
    assert!(info.can_df());
    let mut chunks = Vec::new();
    c.pread_structured(&mut buf, 4096, CmdFlags::DF, |o, l, k| {
        chunks.push((o, l, k))
    })
    .expect("pread DF");
    assert_eq!(chunks, vec![(4096, 100_000, ReadChunkKind::Data)]);
    // Writes to a read-only export: refused client-side (strict), EPERM
    // from the server otherwise; the connection stays usable.
    let u = usage(
        c.pwrite(&[1; 512], 0, CmdFlags::empty()),
        "pwrite read-only",
    );
    assert_eq!(u, UsageError::ReadOnly);
    c.shutdown().unwrap();
    let mut c = connect(&srv.uri(), cfg_strict(Strict::NONE));
    let e = server_errno(
        c.pwrite(&[1; 512], 0, CmdFlags::empty()),
        "pwrite read-only, strict off",
    );
    assert_eq!(e, 1, "EPERM");
    assert_data(&mut c, 0, &expect(0, 4096), "read after refused write");
    c.shutdown().unwrap();
}

/// sparse-random: what block status calls a zero extent reads as zeroes.
/// The plugin is self-verifying: writing back what was read succeeds, and
/// writing anything else fails with EIO (not fatal).
#[test]
fn io01_nbdkit_sparse_random_extents_agree_with_data() {
    let size = 16 * MIB;
    let srv = nbdkit(&[
        "sparse-random",
        "16M",
        "seed=4242",
        "runlength=262144",
        "percent=30",
    ]);
    let mut c = connect(&srv.uri(), Config::with_base_allocation());
    assert!(c.can_meta_context(CONTEXT_BASE_ALLOCATION));
    let mut shadow = vec![0u8; size as usize];
    let mut off = 0;
    while off < size {
        let n = MIB as usize;
        let v = read_vec(&mut c, off, n);
        shadow[off as usize..off as usize + n].copy_from_slice(&v);
        off += n as u64;
    }
    let maps = full_maps(&mut c, size, CmdFlags::empty());
    let map = map_of(&maps, CONTEXT_BASE_ALLOCATION);
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), size);
    let (mut zero_bytes, mut data_bytes) = (0, 0);
    for &(o, l, f) in map {
        let r = &shadow[o as usize..(o + l) as usize];
        if f & ZERO != 0 {
            assert!(r.iter().all(|&b| b == 0), "zero extent {o}+{l} has data");
            zero_bytes += l;
        } else {
            data_bytes += l;
        }
    }
    assert!(zero_bytes > 0 && data_bytes > 0, "{map:?}");
    assert!(shadow.iter().any(|&b| b != 0));
    // Write back what is there (one data run, one hole run): accepted.
    let (d, _, _) = *map.iter().find(|e| e.2 == 0).unwrap();
    let (h, _, _) = *map.iter().find(|e| e.2 & ZERO != 0).unwrap();
    for off in [d, h] {
        let same = shadow[off as usize..off as usize + 4096].to_vec();
        c.pwrite(&same, off, CmdFlags::empty())
            .expect("write back the same data");
    }
    // Different data: the plugin refuses it, the connection carries on.
    let other: Vec<u8> = shadow[d as usize..d as usize + 4096]
        .iter()
        .map(|b| !b)
        .collect();
    assert_eq!(
        server_errno(c.pwrite(&other, d, CmdFlags::empty()), "different data"),
        5
    );
    assert_data(
        &mut c,
        d,
        &shadow[d as usize..d as usize + 4096],
        "unchanged",
    );
    c.zero(h, 4096, CmdFlags::empty())
        .expect("zeroing a hole matches the data");
    c.shutdown().unwrap();
}

/// nbd-server 3.24: simple replies only, no meta contexts.
#[test]
fn io01_nbd_server_simple_replies_round_trip() {
    let data = scratch_dir();
    let size = 4 * MIB;
    let img = make_file(data.path(), "ns.img", size, |i| (i % 13) as u8);
    let mut shadow = std::fs::read(&img).unwrap();
    let srv = nbd_server(&[(
        "alpha",
        img.as_path(),
        &[("trim", "true"), ("flush", "true"), ("fua", "true")],
    )]);
    let mut c = connect(&srv.uri(), Config::with_base_allocation());
    assert!(!c.get_structured_replies_negotiated());
    assert!(!c.get_extended_headers_negotiated());
    assert!(!c.can_meta_context(CONTEXT_BASE_ALLOCATION));
    let info = c.export_info().unwrap().clone();
    assert!(
        info.can_flush() && info.can_fua() && info.can_trim(),
        "{info:?}"
    );
    io_workload(&mut c, &mut shadow, false, 6);
    // Many requests in flight with simple replies.
    let mut cookies = Vec::new();
    for i in 0..32u64 {
        let b = BytesMut::zeroed(16 * KIB as usize);
        cookies.push((
            c.aio_pread(b, i * 64 * KIB, CmdFlags::empty()).unwrap(),
            i * 64 * KIB,
        ));
    }
    for (ck, off) in cookies {
        let done = c.wait(ck).unwrap();
        done.result.expect("read");
        let b = done.buffer.unwrap();
        assert!(b[..] == shadow[off as usize..off as usize + 16 * KIB as usize]);
    }
    c.shutdown().unwrap();
    drop(c);
    drop(srv);
    assert!(std::fs::read(&img).unwrap() == shadow);
}

// ---------------------------------------------------------------- HS-10

/// The same workload with structured replies and extended headers on and
/// off against qemu-nbd, the one server that speaks both.
#[test]
fn hs10_qemu_nbd_structured_and_extended_on_and_off() {
    let data = scratch_dir();
    let size = 4 * MIB;
    let img = make_file(data.path(), "hs10.raw", size, |i| (i % 241) as u8);
    let mut shadow = std::fs::read(&img).unwrap();
    let srv = qemu_nbd(&["--discard=unmap"], &img);
    let cases = [
        // (request SR, request EH) -> (SR negotiated, EH negotiated)
        ((true, true), (true, true)),
        ((true, false), (true, false)),
        ((false, true), (false, false)),
        ((false, false), (false, false)),
    ];
    for (i, ((sr, eh), (want_sr, want_eh))) in cases.into_iter().enumerate() {
        let mut cfg = Config::default();
        cfg.request_structured_replies = sr;
        cfg.request_extended_headers = eh;
        cfg.meta_contexts = vec![CONTEXT_BASE_ALLOCATION.into()];
        let mut c = connect(&srv.uri(), cfg);
        let what = format!("request sr={sr} eh={eh}");
        assert_eq!(c.get_structured_replies_negotiated(), want_sr, "{what}");
        assert_eq!(c.get_extended_headers_negotiated(), want_eh, "{what}");
        assert_eq!(
            c.can_meta_context(CONTEXT_BASE_ALLOCATION),
            want_sr,
            "{what}"
        );
        // qemu-nbd advertises 1/4096/32M (servers.md §4).
        assert_eq!(
            c.get_block_size().unwrap(),
            Some(BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20
            })
        );
        io_workload(&mut c, &mut shadow, true, 100 + i as u64);
        // Pipelined writes and reads, and structured reads with chunks.
        let mut cks = Vec::new();
        for j in 0..48u64 {
            let d = noise(1000 + j + 100 * i as u64, 20_000);
            let off = 2 * MIB + j * 20_000;
            shadow[off as usize..off as usize + 20_000].copy_from_slice(&d);
            cks.push(c.aio_pwrite(d.into(), off, CmdFlags::empty()).unwrap());
        }
        for ck in cks {
            c.wait(ck).unwrap().result.expect("aio write");
        }
        let mut buf = vec![0u8; 960_000];
        let mut chunks = Vec::new();
        c.pread_structured(&mut buf, 2 * MIB, CmdFlags::empty(), |o, l, k| {
            chunks.push((o, l, k))
        })
        .unwrap();
        assert!(buf[..] == shadow[2 * MIB as usize..2 * MIB as usize + 960_000]);
        assert_eq!(chunks.iter().map(|c| c.1).sum::<u64>(), 960_000);
        if want_sr {
            let maps = full_maps(&mut c, size, CmdFlags::empty());
            let map = map_of(&maps, CONTEXT_BASE_ALLOCATION);
            assert_eq!(map.first().unwrap().0, 0);
            assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), size);
        } else {
            let u = usage(
                c.block_status(0, 4096, CmdFlags::empty()).map(drop),
                "block status w/o SR",
            );
            assert!(matches!(u, UsageError::NotAdvertised(_)), "{u:?}");
        }
        c.shutdown().unwrap();
    }
    drop(srv);
    assert!(std::fs::read(&img).unwrap() == shadow);
}

// ---------------------------------------------------------------- IO-04

/// base:allocation of a sparse raw file served by qemu-nbd equals
/// `qemu-img map --output=json`, with 64-bit (EH) and 32-bit extents, and
/// REQ_ONE answers one extent that starts each run.
#[test]
fn io04_block_status_matches_qemu_img_map() {
    let data = scratch_dir();
    let size = 8 * MIB;
    let img = make_sparse_file(data.path(), "sparse.raw", size);
    poke(&img, 192 * KIB, &noise(1, 128 * KIB as usize));
    poke(&img, 2 * MIB + 4 * KIB, &noise(2, 4 * KIB as usize));
    poke(&img, 5 * MIB, &vec![0u8; 64 * KIB as usize]); // allocated zeroes
    poke(&img, size - 4 * KIB, &noise(3, 4 * KIB as usize));
    let expected = qemu_img_map(&img);
    assert!(expected.len() >= 5, "sparse layout expected: {expected:?}");
    let srv = qemu_nbd(&["-r"], &img);
    for eh in [true, false] {
        let mut cfg = Config::with_base_allocation();
        cfg.request_extended_headers = eh;
        let mut c = connect(&srv.uri(), cfg);
        assert_eq!(c.get_extended_headers_negotiated(), eh);
        let maps = full_maps(&mut c, size, CmdFlags::empty());
        assert_eq!(map_of(&maps, CONTEXT_BASE_ALLOCATION), &expected, "eh={eh}");
        // REQ_ONE: exactly one extent, not longer than the request, with
        // the flags of the run it starts.
        for &(off, len, flags) in &expected {
            let ans = c.block_status(off, size - off, CmdFlags::REQ_ONE).unwrap();
            assert_eq!(ans.len(), 1);
            let (name, ext) = &ans[0];
            assert_eq!(name, CONTEXT_BASE_ALLOCATION);
            assert_eq!(ext.len(), 1, "REQ_ONE at {off}: {ext:?}");
            assert_eq!(ext[0].flags, flags, "REQ_ONE at {off}");
            assert!(
                ext[0].length <= len,
                "REQ_ONE at {off}: {ext:?} vs run {len}"
            );
        }
        // Holes read as zeroes, data as written.
        assert_data(&mut c, 192 * KIB, &noise(1, 128 * KIB as usize), "data");
        assert_zeroes(&mut c, 3 * MIB, MIB as usize, "hole");
        c.shutdown().unwrap();
    }
}

/// servers.md §3.2: a qcow2 overlay with a backing file and a dirty bitmap,
/// served with `qemu-nbd -A -B bm0`: the three contexts give the expected
/// maps, and REQ_ONE one extent per context.
#[test]
fn io04_qemu_dirty_bitmap_and_allocation_depth() {
    let data = scratch_dir();
    let base = data.path().join("base.qcow2");
    let top = data.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    run("qemu-img", &["create", "-q", "-f", "qcow2", b, "16M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 1M", b]);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
    );
    run("qemu-img", &["bitmap", "--add", t, "bm0"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 4M 64k", t]);
    let srv = qemu_nbd(&["-f", "qcow2", "-x", "top", "-A", "-B", "bm0"], &top);
    let depth = "qemu:allocation-depth";
    let bitmap = "qemu:dirty-bitmap:bm0";
    let size = 16 * MIB;
    let tail = size - 4 * MIB - 64 * KIB;
    let want_base: Map = vec![
        (0, MIB, 0),
        (MIB, 3 * MIB, HOLE | ZERO),
        (4 * MIB, 64 * KIB, 0),
        (4 * MIB + 64 * KIB, tail, HOLE | ZERO),
    ];
    let want_depth: Map = vec![
        (0, MIB, 2),
        (MIB, 3 * MIB, 0),
        (4 * MIB, 64 * KIB, 1),
        (4 * MIB + 64 * KIB, tail, 0),
    ];
    let want_bitmap: Map = vec![
        (0, 4 * MIB, 0),
        (4 * MIB, 64 * KIB, 1),
        (4 * MIB + 64 * KIB, tail, 0),
    ];
    for eh in [true, false] {
        let mut cfg = Config::default();
        cfg.request_extended_headers = eh;
        cfg.meta_contexts = vec![CONTEXT_BASE_ALLOCATION.into(), depth.into(), bitmap.into()];
        let mut c = connect(&srv.uri(), cfg);
        assert_eq!(c.get_extended_headers_negotiated(), eh);
        for name in [CONTEXT_BASE_ALLOCATION, depth, bitmap] {
            assert!(c.can_meta_context(name), "{name} not negotiated");
        }
        assert_eq!(c.get_size().unwrap(), size);
        let maps = full_maps(&mut c, size, CmdFlags::empty());
        assert_eq!(maps.len(), 3, "{maps:?}");
        assert_eq!(
            map_of(&maps, CONTEXT_BASE_ALLOCATION),
            &want_base,
            "eh={eh}"
        );
        assert_eq!(map_of(&maps, depth), &want_depth, "eh={eh}");
        assert_eq!(map_of(&maps, bitmap), &want_bitmap, "eh={eh}");
        // REQ_ONE at the start of each run: one extent per context.
        for off in [0, MIB, 4 * MIB, 4 * MIB + 64 * KIB] {
            let ans = c.block_status(off, size - off, CmdFlags::REQ_ONE).unwrap();
            assert_eq!(ans.len(), 3, "REQ_ONE at {off}: {ans:?}");
            for (name, ext) in &ans {
                assert_eq!(ext.len(), 1, "REQ_ONE {name} at {off}: {ext:?}");
                let want = match name.as_str() {
                    n if n == CONTEXT_BASE_ALLOCATION => &want_base,
                    n if n == depth => &want_depth,
                    _ => &want_bitmap,
                };
                let run = want.iter().find(|r| r.0 <= off && off < r.0 + r.1).unwrap();
                assert_eq!(ext[0].flags, run.2, "REQ_ONE {name} at {off}");
                assert!(ext[0].length <= run.0 + run.1 - off, "{name} at {off}");
            }
        }
        // The data behind the maps.
        assert_data(&mut c, 0, &vec![0x11; MIB as usize], "backing data");
        assert_data(
            &mut c,
            4 * MIB,
            &vec![0x22; 64 * KIB as usize],
            "overlay data",
        );
        assert_zeroes(&mut c, 2 * MIB, MIB as usize, "absent");
        c.shutdown().unwrap();
    }
}

// ---------------------------------------------------------------- strict mode

/// libnbd's `errors-client-unadvertised-cmd` / `errors-server-unadvertised-cmd`:
/// WRITE_ZEROES on `--filter=nozero`, TRIM on a server without trim, FUA on
/// `--filter=fua` (whose default mode hides FUA).
#[test]
fn errors_client_and_server_unadvertised_cmd() {
    // Zero.
    let srv = nbdkit_with(&["--filter=nozero"], &["memory", "1M"]);
    let mut c = connect(&srv.uri(), Config::default());
    assert!(!c.export_info().unwrap().can_zero());
    let u = usage(c.zero(0, 4096, CmdFlags::empty()), "zero unadvertised");
    assert!(matches!(u, UsageError::NotAdvertised(_)), "{u:?}");
    let e = usage(c.aio_zero(0, 4096, CmdFlags::empty()).map(drop), "aio_zero");
    assert!(matches!(e, UsageError::NotAdvertised(_)));
    drop(c);
    let mut c = connect(&srv.uri(), cfg_strict(Strict::NONE));
    c.pwrite(&[9; 4096], 0, CmdFlags::empty()).unwrap();
    assert_eq!(
        server_errno(c.zero(0, 4096, CmdFlags::empty()), "zero strict off"),
        22
    );
    assert_eq!(read_vec(&mut c, 0, 4096), vec![9; 4096], "still usable");
    c.shutdown().unwrap();
    drop(c);
    drop(srv);

    // Trim: a scripted plugin that cannot trim.
    let srv = nbdkit(&[
        "eval",
        "get_size=echo 1M",
        "pread=head -c $3 /dev/zero",
        "pwrite=cat >/dev/null",
        "can_write=exit 0",
        "can_trim=exit 3",
    ]);
    let mut c = connect(&srv.uri(), Config::default());
    let info = c.export_info().unwrap().clone();
    assert!(!info.can_trim() && !info.is_read_only(), "{info:?}");
    let u = usage(c.trim(0, 4096, CmdFlags::empty()), "trim unadvertised");
    assert!(matches!(u, UsageError::NotAdvertised(_)), "{u:?}");
    drop(c);
    let mut c = connect(&srv.uri(), cfg_strict(Strict::NONE));
    assert_eq!(
        server_errno(c.trim(0, 4096, CmdFlags::empty()), "trim strict off"),
        22
    );
    assert_zeroes(&mut c, 0, 4096, "usable after refused trim");
    c.shutdown().unwrap();
    drop(c);
    drop(srv);

    // FUA.
    let srv = nbdkit_with(&["--filter=fua"], &["memory", "1M"]);
    let mut c = connect(&srv.uri(), Config::default());
    assert!(!c.export_info().unwrap().can_fua());
    let u = usage(c.pwrite(&[1; 512], 0, CmdFlags::FUA), "FUA unadvertised");
    assert!(matches!(u, UsageError::NotAdvertised(_)), "{u:?}");
    drop(c);
    let mut c = connect(&srv.uri(), cfg_strict(Strict::NONE));
    assert_eq!(
        server_errno(c.pwrite(&[1; 512], 0, CmdFlags::FUA), "FUA off"),
        22
    );
    c.pwrite(&[2; 512], 0, CmdFlags::empty()).unwrap();
    assert_eq!(read_vec(&mut c, 0, 512), vec![2; 512]);
    c.shutdown().unwrap();
}

/// libnbd's `errors-client-unaligned` / `errors-server-unaligned` and the
/// oversize variants against nbdkit's blocksize-policy filter (512 / 4096 /
/// 65536, errors enforced by the server).
#[test]
fn errors_client_and_server_unaligned_and_oversize() {
    let srv = nbdkit_with(
        &["--filter=blocksize-policy"],
        &[
            "memory",
            "1M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let want_bs = Some(BlockSize {
        minimum: 512,
        preferred: 4096,
        maximum: 65536,
    });
    // Strict: refused client-side, nothing sent.
    let mut c = connect(&srv.uri(), Config::default());
    assert_eq!(c.get_block_size().unwrap(), want_bs);
    assert_eq!(c.connection().payload_max(), 65536);
    let mut small = [0u8; 100];
    assert_eq!(
        usage(c.pread(&mut small, 0, CmdFlags::empty()), "100-byte read"),
        UsageError::Misaligned(512)
    );
    let mut b512 = [0u8; 512];
    assert_eq!(
        usage(c.pread(&mut b512, 100, CmdFlags::empty()), "read at 100"),
        UsageError::Misaligned(512)
    );
    assert_eq!(
        usage(
            c.pwrite(&[0; 100], 512, CmdFlags::empty()),
            "100-byte write"
        ),
        UsageError::Misaligned(512)
    );
    assert_eq!(
        usage(c.zero(1, 512, CmdFlags::empty()), "zero at 1"),
        UsageError::Misaligned(512)
    );
    let u = usage(
        c.pwrite(&vec![0; 128 * 1024], 0, CmdFlags::empty()),
        "128 KiB write",
    );
    assert!(
        matches!(
            u,
            UsageError::TooLarge {
                length: 131072,
                max: 65536
            }
        ),
        "{u:?}"
    );
    // Reads over the maximum are the server's to refuse (as in libnbd).
    let mut big = vec![0u8; 128 * 1024];
    assert_eq!(
        server_errno(c.pread(&mut big, 0, CmdFlags::empty()), "128 KiB read"),
        22
    );
    c.pwrite(&[7; 4096], 4096, CmdFlags::empty()).unwrap();
    assert_eq!(read_vec(&mut c, 4096, 4096), vec![7; 4096]);
    c.shutdown().unwrap();
    drop(c);

    // Strict off: the server's EINVAL reaches the caller; still usable.
    let mut c = connect(&srv.uri(), cfg_strict(Strict::NONE));
    assert_eq!(
        server_errno(c.pread(&mut small, 0, CmdFlags::empty()), "100-byte read"),
        22
    );
    assert_eq!(
        server_errno(c.pread(&mut b512, 100, CmdFlags::empty()), "read at 100"),
        22
    );
    assert_eq!(
        server_errno(
            c.pwrite(&[1; 100], 512, CmdFlags::empty()),
            "100-byte write"
        ),
        22
    );
    assert_eq!(
        server_errno(
            c.pwrite(&vec![1; 128 * 1024], 0, CmdFlags::empty()),
            "128 KiB write"
        ),
        22
    );
    assert_eq!(
        server_errno(c.pread(&mut big, 0, CmdFlags::empty()), "128 KiB read"),
        22
    );
    // Nothing of the refused writes landed.
    assert_eq!(read_vec(&mut c, 0, 4096), vec![0; 4096]);
    assert_eq!(read_vec(&mut c, 4096, 4096), vec![7; 4096]);
    c.shutdown().unwrap();
}

/// `errors-server-invalid-offset`, `errors-client-zerosize` and unknown
/// flags: strict on refuses them client-side; strict off lets the server
/// answer, and its error surfaces through the completion.
#[test]
fn errors_client_and_server_bounds_zero_size_and_flags() {
    let srv = nbdkit(&["memory", "1M"]);
    let mut c = connect(&srv.uri(), Config::default());
    let mut b = [0u8; 4096];
    let u = usage(c.pread(&mut b, MIB, CmdFlags::empty()), "read past the end");
    assert!(
        matches!(
            u,
            UsageError::OutOfBounds {
                offset: 1048576,
                length: 4096,
                ..
            }
        ),
        "{u:?}"
    );
    let u = usage(
        c.pwrite(&b, MIB - 100, CmdFlags::empty()),
        "write over the end",
    );
    assert!(matches!(u, UsageError::OutOfBounds { .. }), "{u:?}");
    let u = usage(c.trim(0, 0, CmdFlags::empty()), "zero-length trim");
    assert_eq!(u, UsageError::ZeroLength);
    let u = usage(c.pread(&mut b, 0, CmdFlags::FUA), "FUA on a read");
    assert!(matches!(u, UsageError::BadFlags { .. }), "{u:?}");
    let u = usage(c.zero(0, 4096, CmdFlags::REQ_ONE), "REQ_ONE on zero");
    assert!(matches!(u, UsageError::BadFlags { .. }), "{u:?}");
    let u = usage(c.pread(&mut b, 0, UNKNOWN_FLAG), "unknown flag");
    assert!(matches!(u, UsageError::BadFlags { .. }), "{u:?}");
    c.shutdown().unwrap();
    drop(c);

    let mut c = connect(&srv.uri(), cfg_strict(Strict::NONE));
    c.pwrite(&[5; 4096], 0, CmdFlags::empty()).unwrap();
    // The aio path: the server's error arrives in the completion.
    let ck = c
        .aio_pread(BytesMut::zeroed(4096), MIB, CmdFlags::empty())
        .unwrap();
    let done = c.wait(ck).unwrap();
    match done.result {
        Err(CommandError::Server { errno, .. }) => assert_eq!(errno.errno(), 22),
        other => panic!("read past the end: {other:?}"),
    }
    assert!(
        server_errno(
            c.pwrite(&b, MIB - 100, CmdFlags::empty()),
            "write over the end"
        ) != 0
    );
    // nbdkit tolerates FUA on a read, but not a flag it does not know.
    c.pread(&mut b, 0, CmdFlags::FUA)
        .expect("FUA on a read, strict off");
    assert_eq!(
        server_errno(c.pread(&mut b, 0, UNKNOWN_FLAG), "unknown flag"),
        22
    );
    assert_eq!(read_vec(&mut c, 0, 4096), vec![5; 4096], "still usable");
    c.shutdown().unwrap();
}

// ---------------------------------------------------------------- ERR-01

/// ERR-01: `--filter=error error=ENOSPC error-pwrite-rate=100%`: every write
/// fails with StorageFull, and the next read works.
#[test]
fn err01_enospc_write_maps_to_storage_full_and_connection_survives() {
    let srv = nbdkit_with(
        &["--filter=error"],
        &["memory", "1M", "error=ENOSPC", "error-pwrite-rate=100%"],
    );
    let mut c = connect(&srv.uri(), Config::default());
    for round in 0..3 {
        let e = c
            .pwrite(&[0xab; 4096], 8192, CmdFlags::empty())
            .unwrap_err();
        assert_eq!(e.io_kind(), ErrorKind::StorageFull, "round {round}: {e}");
        assert!(!e.is_fatal());
        match &e {
            Error::Command(ce) => assert_eq!(ce.errno(), 28),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::io::Error::from(e).kind(), ErrorKind::StorageFull);
        assert_zeroes(&mut c, 8192, 4096, "read after failed write");
    }
    c.flush(CmdFlags::empty()).expect("flush still works");
    c.shutdown().unwrap();
}

/// ERR-01, every error value the error filter can inject, on reads.
#[test]
fn err01_error_values_map_like_libnbd() {
    for (name, errno, kind) in [
        ("EIO", 5, ErrorKind::Other),
        ("EPERM", 1, ErrorKind::PermissionDenied),
        ("ENOMEM", 12, ErrorKind::OutOfMemory),
        ("EINVAL", 22, ErrorKind::InvalidInput),
        ("ENOSPC", 28, ErrorKind::StorageFull),
    ] {
        let srv = nbdkit_with(
            &["--filter=error"],
            &[
                "memory",
                "1M",
                &format!("error={name}"),
                "error-pread-rate=100%",
            ],
        );
        let mut c = connect(&srv.uri(), Config::default());
        let mut b = [0u8; 512];
        for _ in 0..2 {
            let e = c.pread(&mut b, 0, CmdFlags::empty()).unwrap_err();
            assert_eq!(e.io_kind(), kind, "{name}: {e}");
            match &e {
                Error::Command(ce) => assert_eq!(ce.errno(), errno, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
            c.pwrite(&[1; 512], 0, CmdFlags::empty())
                .expect("write after read error");
        }
        c.shutdown().unwrap();
    }
}

/// doc/proto.md, "Terminating the transmission phase": ESHUTDOWN means the server is going away. The
/// failed command reports ConnectionAborted; the client then disconnects
/// politely (NBD_CMD_DISC once nothing is in flight) and refuses new
/// commands: as a phase error while the server has not closed yet, as
/// `Error::Closed(Disconnected)` once it has.
#[test]
fn err01_eshutdown_triggers_soft_disconnect() {
    let srv = nbdkit_with(
        &["--filter=error"],
        &["memory", "1M", "error=ESHUTDOWN", "error-pread-rate=100%"],
    );
    let mut c = connect(&srv.uri(), Config::default());
    let e = c.pread(&mut [0u8; 512], 0, CmdFlags::empty()).unwrap_err();
    assert_eq!(e.io_kind(), ErrorKind::ConnectionAborted, "{e}");
    assert!(
        matches!(&e, Error::Command(ce) if ce.errno() == 108),
        "{e:?}"
    );
    // The client has queued NBD_CMD_DISC but the server has not closed yet:
    // the connection is alive, so a new command is a phase error.
    let e = c.pwrite(&[1; 512], 0, CmdFlags::empty()).unwrap_err();
    assert!(
        matches!(e, Error::Usage(UsageError::WrongPhase { .. })),
        "{e:?}"
    );
    // The server closes after DISC: a clean end.
    c.shutdown().expect("clean end after ESHUTDOWN");
    assert_eq!(c.phase(), Phase::Closed);
    assert_eq!(
        c.connection().close_reason(),
        Some(&CloseReason::Disconnected)
    );
    // Now the connection is over: a command reports why it ended.
    let e = c.pwrite(&[1; 512], 0, CmdFlags::empty()).unwrap_err();
    assert!(
        matches!(e, Error::Closed(CloseReason::Disconnected)),
        "{e:?}"
    );
}

// ---------------------------------------------------------------- LIFE-01

/// LIFE-01 (libnbd's `server-death`): the server is killed with 64 reads in
/// flight (kept there by the delay filter). Every read completes with an
/// error, none hangs, and the client reports the connection closed.
#[test]
fn life01_server_killed_with_64_reads_in_flight() {
    let mut srv = nbdkit_with(&["--filter=delay"], &["memory", "16M", "rdelay=30"]);
    let mut c = connect(&srv.uri(), Config::default());
    let mut submitted = Vec::new();
    for i in 0..64u64 {
        let ck = c
            .aio_pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty())
            .unwrap();
        submitted.push(ck);
    }
    assert_eq!(c.aio_in_flight(), 64);
    // Push the requests out; the server sits on them.
    c.poll().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.aio_in_flight(), 64);
    let t = Instant::now();
    srv.kill();
    // Collect the completions on another thread so a hang fails the test.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut got: Vec<(Cookie, Result<(), CommandError>, bool)> = Vec::new();
        let mut last = None;
        while got.len() < 64 {
            match c.wait_any() {
                Ok((ck, done)) => got.push((ck, done.result, done.buffer.is_some())),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let after = c.poll();
        let pread_after = c.pread(&mut [0u8; 512], 0, CmdFlags::empty());
        tx.send((
            got,
            last,
            c.phase(),
            c.aio_in_flight(),
            c.connection().close_reason().cloned(),
            after,
            pread_after,
        ))
        .unwrap();
    });
    let (got, last, phase, in_flight, reason, after, pread_after) = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("completions hang after the server died");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        last.is_none(),
        "wait_any failed before all completed: {last:?}"
    );
    assert_eq!(got.len(), 64);
    let mut cookies: Vec<Cookie> = got.iter().map(|g| g.0).collect();
    cookies.sort();
    submitted.sort();
    assert_eq!(cookies, submitted, "each read completes exactly once");
    for (ck, r, has_buf) in &got {
        assert!(
            matches!(r, Err(CommandError::ConnectionClosed(_))),
            "{ck:?}: {r:?}"
        );
        assert!(has_buf, "{ck:?}: the read buffer is handed back");
    }
    assert_eq!(phase, Phase::Dead, "an unexpected end is not a clean close");
    assert_eq!(in_flight, 0);
    assert!(
        matches!(reason, Some(CloseReason::ServerClosed { lost: 64, .. })),
        "{reason:?}"
    );
    assert!(matches!(after, Err(Error::Closed(_))), "{after:?}");
    // A command on the dead connection reports why it died.
    let e = pread_after.unwrap_err();
    assert!(e.is_fatal(), "{e:?}");
    assert!(
        matches!(&e, Error::Closed(r) if Some(r) == reason.as_ref()),
        "{e:?}"
    );
}

// ---------------------------------------------------------------- LIM-01

/// LIM-01 (libnbd's `errors-client-oversize`): reads over 64 MiB are
/// refused client-side whatever strict mode says; writes over the payload
/// maximum (32 MiB when the server gives none) under strict mode; 64 MiB
/// exactly is allowed.
#[test]
fn lim01_oversize_requests_refused_client_side() {
    let srv = nbdkit(&["null", "1G"]);
    for strict in [Strict::ALL, Strict::NONE] {
        let mut c = connect(&srv.uri(), cfg_strict(strict));
        let e = c
            .aio_pread(BytesMut::zeroed(65 * MIB as usize), 0, CmdFlags::empty())
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Usage(UsageError::TooLarge {
                    length: 68157440,
                    max: 67108864
                })
            ),
            "strict {strict:?}: {e:?}"
        );
        assert_eq!(c.aio_in_flight(), 0, "nothing was queued");
        // 64 MiB is the limit, not over it.
        let b = c
            .pread_buf(BytesMut::zeroed(64 * MIB as usize), 0, CmdFlags::empty())
            .unwrap();
        assert_eq!(b.len(), 64 * MIB as usize);
        assert!(b.iter().all(|&x| x == 0));
        if strict == Strict::ALL {
            assert_eq!(c.connection().payload_max(), 32 * MIB);
            let e = c
                .pwrite(&vec![0; 33 * MIB as usize], 0, CmdFlags::empty())
                .unwrap_err();
            assert!(
                matches!(e, Error::Usage(UsageError::TooLarge { .. })),
                "{e:?}"
            );
        }
        c.shutdown().unwrap();
    }
}
