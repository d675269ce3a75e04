//! [`NbdFile`]: an export used through `std::io::{Read, Write, Seek}`:
//! `io::copy` in and out, seeks from every origin, reads at and past the
//! end (0 bytes), writes past the end (`StorageFull`, short writes at the
//! boundary), flush reaching the backing file, buffered wrappers, and a
//! read-only export.

use nbd_std::CmdFlags;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, ErrorKind, Read, Seek, SeekFrom, Write};

use nbd_std::{Client, Config, NbdFile};
use nbd_tests::servers::{make_file, make_sparse_file, nbdkit, qemu_nbd, scratch_dir};

/// Content of the source file: varies with the offset, never periodic
/// on a power of two.
fn src_byte(i: u64) -> u8 {
    (i % 251) as u8 ^ (i >> 11) as u8
}

fn open(uri: &str) -> NbdFile {
    let c = Client::connect(uri, Config::default()).expect("connect");
    NbdFile::new(c).expect("NbdFile::new")
}

/// The whole tour on an export of an odd size (nbdkit memory, 1000003
/// bytes).
#[test]
fn file_copy_in_seek_around_read_back_and_eof() {
    let size: u64 = 1_000_003;
    let srv = nbdkit(&["memory", "1000003"]);
    let data = scratch_dir();
    let src_path = make_file(data.path(), "src.bin", size, src_byte);
    let src = std::fs::read(&src_path).unwrap();

    let mut f = open(&srv.uri());
    assert_eq!(f.len(), size);
    assert!(!f.is_empty());

    // io::copy a file in; the position ends at the end of the export.
    let n = io::copy(&mut File::open(&src_path).unwrap(), &mut f).unwrap();
    assert_eq!(n, size);
    assert_eq!(f.stream_position().unwrap(), size);
    f.flush().expect("flush");

    // At EOF: reads return 0, writes fail with StorageFull.
    let mut b = [0u8; 16];
    assert_eq!(f.read(&mut b).unwrap(), 0);
    let e = f.write(&[1]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StorageFull, "{e}");
    // An empty write is always fine.
    assert_eq!(f.write(&[]).unwrap(), 0);

    // Read everything back.
    assert_eq!(f.seek(SeekFrom::Start(0)).unwrap(), 0);
    let mut all = Vec::new();
    assert_eq!(f.read_to_end(&mut all).unwrap(), size as usize);
    assert!(all == src, "read back differs from the source");

    // Seeks from every origin.
    assert_eq!(f.seek(SeekFrom::End(-100)).unwrap(), size - 100);
    let mut tail = [0u8; 100];
    f.read_exact(&mut tail).unwrap();
    assert_eq!(&tail[..], &src[src.len() - 100..]);
    assert_eq!(f.seek(SeekFrom::Current(-50)).unwrap(), size - 50);
    let mut t50 = Vec::new();
    f.read_to_end(&mut t50).unwrap();
    assert_eq!(&t50[..], &src[src.len() - 50..]);
    assert_eq!(f.seek(SeekFrom::Start(12345)).unwrap(), 12345);
    assert_eq!(f.seek(SeekFrom::Current(1000)).unwrap(), 13345);
    let mut mid = vec![0u8; 7777];
    f.read_exact(&mut mid).unwrap();
    assert_eq!(&mid[..], &src[13345..13345 + 7777]);
    assert_eq!(f.stream_position().unwrap(), 13345 + 7777);

    // Past the end: allowed, like a file; reads give 0, writes fail.
    assert_eq!(f.seek(SeekFrom::End(10)).unwrap(), size + 10);
    assert_eq!(f.read(&mut b).unwrap(), 0);
    assert_eq!(f.write(&[1, 2]).unwrap_err().kind(), ErrorKind::StorageFull);
    // Before the start: refused, position unchanged.
    let e = f.seek(SeekFrom::Current(-(size as i64) - 100)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(f.stream_position().unwrap(), size + 10);
    assert_eq!(
        f.seek(SeekFrom::End(-(size as i64) - 1))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );

    // Overwrite in the middle, unaligned.
    let mut expect = src.clone();
    f.seek(SeekFrom::Start(3 * 4096 + 7)).unwrap();
    f.write_all(b"hello, world").unwrap();
    expect[3 * 4096 + 7..3 * 4096 + 19].copy_from_slice(b"hello, world");
    assert_eq!(f.stream_position().unwrap(), 3 * 4096 + 19);
    f.seek(SeekFrom::Current(-12)).unwrap();
    let mut hw = [0u8; 12];
    f.read_exact(&mut hw).unwrap();
    assert_eq!(&hw, b"hello, world");

    // A write across the end is short; the next one fails.
    f.seek(SeekFrom::End(-5)).unwrap();
    assert_eq!(f.write(&[9u8; 10]).unwrap(), 5);
    expect[size as usize - 5..].fill(9);
    assert_eq!(f.stream_position().unwrap(), size);
    assert_eq!(
        f.write(&[9u8; 10]).unwrap_err().kind(),
        ErrorKind::StorageFull
    );
    f.seek(SeekFrom::End(-3)).unwrap();
    let e = f.write_all(&[8u8; 4]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StorageFull);
    expect[size as usize - 3..].fill(8);
    f.flush().unwrap();

    // One read never asks for more than the adapter's maximum.
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut big = vec![0u8; 8 << 20];
    let n = f.read(&mut big).unwrap();
    assert!(n > 0 && n as u64 <= size && n <= 4 << 20, "{n}");
    assert_eq!(&big[..n], &expect[..n]);

    // io::copy out, through a BufReader.
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut out = Vec::new();
    let n = io::copy(&mut BufReader::with_capacity(65536, &mut f), &mut out).unwrap();
    assert_eq!(n, size);
    assert!(out == expect, "io::copy out differs");

    // The client is still usable after the adapter.
    let mut c = f.into_inner().unwrap();
    let mut last = [0u8; 8];
    c.pread(&mut last, size - 8, CmdFlags::empty()).unwrap();
    assert_eq!(&last[..], &expect[size as usize - 8..]);
    c.shutdown().unwrap();
}

/// Data written through the adapter (a BufWriter of small writes) reaches
/// qemu-nbd's backing file once flushed.
#[test]
fn file_buffered_writes_and_flush_reach_the_backing_file() {
    let size: u64 = 2 << 20;
    let data = scratch_dir();
    let img = make_sparse_file(data.path(), "disk.raw", size);
    let srv = qemu_nbd(&[], &img);
    let f = open(&srv.uri());
    assert_eq!(f.len(), size);
    let mut w = BufWriter::with_capacity(100_000, f);
    let mut expect = vec![0u8; size as usize];
    // 1 MiB in 333-byte pieces starting at 4097.
    w.seek(SeekFrom::Start(4097)).unwrap();
    let mut at = 4097usize;
    while at < 4097 + (1 << 20) {
        let piece: Vec<u8> = (at..at + 333).map(|i| src_byte(i as u64)).collect();
        w.write_all(&piece).unwrap();
        expect[at..at + 333].copy_from_slice(&piece);
        at += 333;
    }
    w.flush().expect("flush (NBD_CMD_FLUSH)");
    let mut f = w.into_inner().map_err(|e| e.into_error()).unwrap();
    let mut c = {
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert!(back == expect, "read back through the adapter");
        f.into_inner().unwrap()
    };
    c.shutdown().unwrap();
    drop(c);
    drop(srv);
    assert!(std::fs::read(&img).unwrap() == expect, "backing file");
}

/// A read-only export reads fine; writes fail (PermissionDenied, as
/// libnbd's EPERM) without harming the connection.
#[test]
fn file_read_only_export() {
    let srv = nbdkit(&["pattern", "1M"]);
    let mut f = open(&srv.uri());
    f.seek(SeekFrom::Start(4096 + 3)).unwrap();
    let mut b = [0u8; 13];
    f.read_exact(&mut b).unwrap();
    let want: Vec<u8> = (4099u64..4112)
        .map(|i| (i & !7).to_be_bytes()[(i & 7) as usize])
        .collect();
    assert_eq!(&b[..], &want[..]);
    let e = f.write(&[0u8; 512]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    f.flush().expect("flush on a read-only export is a no-op");
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut first = [0u8; 16];
    f.read_exact(&mut first).unwrap();
    assert_eq!(first, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
    f.into_inner().unwrap().shutdown().unwrap();
}

/// Sequential small reads through `Read` are served from the read-ahead
/// window: a 4 KiB `read` loop over 2 MiB makes 8 requests of 256 KiB, not
/// 512 of 4 KiB, and returns the export's bytes; a write through the
/// adapter is visible to the next read (the window is dropped).
#[test]
fn file_small_reads_use_the_read_ahead_window() {
    let srv = nbdkit(&["memory", "2M"]);
    let mut f = open(&srv.uri());
    let size = f.len();
    let data: Vec<u8> = (0..size).map(src_byte).collect();
    f.write_all(&data).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let before = f.client().io_stats().bytes_written;
    let mut back = Vec::new();
    let mut piece = [0u8; 4096];
    loop {
        let n = f.read(&mut piece).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&piece[..n]);
    }
    assert!(back == data, "read back through the window");
    // A read request is a 28-byte header (32 with extended headers): at
    // most 10 requests, where 4 KiB reads without the window make 512.
    let written = f.client().io_stats().bytes_written - before;
    assert!(written <= 10 * 32, "{written} bytes of requests for 2 MiB");

    f.seek(SeekFrom::Start(100)).unwrap();
    let mut b = [0u8; 10];
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(100)).unwrap();
    f.write_all(&[0xee; 10]).unwrap();
    f.seek(SeekFrom::Start(100)).unwrap();
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, [0xee; 10], "the write is seen by the next read");
    f.into_inner().unwrap().shutdown().unwrap();
}
