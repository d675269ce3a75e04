//! nbd-tokio against real servers (nbdkit, qemu-nbd, nbd-server): many
//! tasks on one connection checked against a shadow copy, cancellation
//! under load with nbdkit's delay filter, a server that dies with requests
//! in flight, option mode, the file adapter, and the ends.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_tests::servers::{make_file, nbd_server, nbdkit, nbdkit_with, qemu_nbd, scratch_dir};
use nbd_tokio::{Client, CmdFlags, CommandError, Config, ConnectionTask, Error, NbdFile};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// nbdkit's pattern plugin: each 8-byte word is its own offset, big-endian.
fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| ((o & !7).to_be_bytes())[(o & 7) as usize])
        .collect()
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn connect(uri: &str, cfg: Config) -> (Client, JoinHandle<Result<(), Error>>) {
    let (nbd, task) = Client::connect(uri, cfg).await.expect("connect");
    (nbd, tokio::spawn(task))
}

/// Waits (at most 10 s) until the core's in-flight table is empty.
async fn settle(nbd: &Client) {
    let t = Instant::now();
    while nbd.in_flight() != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "in-flight slots leaked: {} ({} abandoned)",
            nbd.in_flight(),
            nbd.abandoned()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(nbd.abandoned(), 0);
}

const TASKS: u64 = 8;
const REGION: u64 = 256 * 1024;

/// `TASKS` tasks, each on its own region of the export, issue random
/// writes and reads (and zeroes where the server has them) and check
/// every read against a shared shadow copy; a burst of concurrent reads
/// per task keeps many requests in flight at once.
async fn shadow_run(uri: &str, zeroes: bool) {
    let (nbd, task) = connect(uri, Config::default()).await;
    let size = nbd.size().unwrap();
    assert!(size >= TASKS * REGION, "export too small: {size}");
    // Start from a known state.
    for t in 0..TASKS {
        nbd.write(
            t * REGION,
            Bytes::from(vec![0u8; REGION as usize]),
            CmdFlags::empty(),
        )
        .await
        .unwrap();
    }
    let shadow = Arc::new(Mutex::new(vec![0u8; (TASKS * REGION) as usize]));
    let mut workers = Vec::new();
    for t in 0..TASKS {
        let nbd = nbd.clone();
        let shadow = shadow.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
            let base = t * REGION;
            let check = |off: u64, got: &[u8]| {
                let s = shadow.lock().unwrap();
                let want = &s[off as usize..off as usize + got.len()];
                assert!(want == got, "task {t}: data differs at {off}");
            };
            for i in 0..60u64 {
                let len = 512 * (1 + rng.below(32));
                let off = base + 512 * rng.below((REGION - len) / 512);
                match rng.below(if zeroes { 4 } else { 3 }) {
                    0 => {
                        let fill = (i as u8) ^ (t as u8) ^ 0x5a;
                        let data = vec![fill; len as usize];
                        nbd.write(off, Bytes::from(data.clone()), CmdFlags::empty())
                            .await
                            .unwrap();
                        shadow.lock().unwrap()[off as usize..(off + len) as usize]
                            .copy_from_slice(&data);
                    }
                    1 | 2 => {
                        let b = nbd
                            .read(off, BytesMut::zeroed(len as usize), CmdFlags::empty())
                            .await
                            .unwrap();
                        check(off, &b);
                    }
                    _ => {
                        nbd.zero(off, len, CmdFlags::empty()).await.unwrap();
                        shadow.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
                    }
                }
                if i % 20 == 19 {
                    // A burst: 16 reads in flight from this task alone.
                    let reads: Vec<_> = (0..16u64)
                        .map(|k| {
                            let nbd = nbd.clone();
                            let off = base + k * 4096;
                            tokio::spawn(async move {
                                let b = nbd
                                    .read(off, BytesMut::zeroed(4096), CmdFlags::empty())
                                    .await
                                    .unwrap();
                                (off, b)
                            })
                        })
                        .collect();
                    for r in reads {
                        let (off, b) = r.await.unwrap();
                        check(off, &b);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    // The whole range once more, in one pipelined batch.
    let reads: Vec<_> = (0..TASKS * REGION / 65536)
        .map(|k| {
            let nbd = nbd.clone();
            tokio::spawn(async move {
                nbd.read(k * 65536, BytesMut::zeroed(65536), CmdFlags::empty())
                    .await
                    .map(|b| (k * 65536, b))
            })
        })
        .collect();
    for r in reads {
        let (off, b) = r.await.unwrap().unwrap();
        let s = shadow.lock().unwrap();
        assert!(
            s[off as usize..off as usize + b.len()] == b[..],
            "final check at {off}"
        );
    }
    nbd.flush(CmdFlags::empty()).await.unwrap();
    assert_eq!(nbd.in_flight(), 0);
    nbd.disconnect().await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn many_tasks_on_one_connection_match_a_shadow_copy_nbdkit() {
    let server = nbdkit(&["memory", "4M"]);
    shadow_run(&server.uri(), true).await;
}

#[tokio::test]
async fn many_tasks_on_one_connection_match_a_shadow_copy_qemu_nbd() {
    let dir = scratch_dir();
    let file = make_file(dir.path(), "disk.raw", 4 << 20, |_| 0);
    let server = qemu_nbd(&[], &file);
    shadow_run(&server.uri(), true).await;
}

#[tokio::test]
async fn many_tasks_on_one_connection_match_a_shadow_copy_nbd_server() {
    let dir = scratch_dir();
    let file = make_file(dir.path(), "disk.raw", 4 << 20, |_| 0);
    let server = nbd_server(&[("disk", &file, &[("flush", "true")])]);
    // nbd-server 3.24: simple replies only.
    shadow_run(&server.uri(), false).await;
}

/// doc/proto.md, "Request message": a client may give up on a request,
/// but the server still answers it; the late reply must be consumed.
#[tokio::test]
async fn cancelled_calls_under_load_leave_the_connection_correct_and_leak_nothing() {
    let server = nbdkit_with(&["--filter=delay"], &["pattern", "4M", "rdelay=300ms"]);
    let (nbd, task) = connect(&server.uri(), Config::default()).await;
    let cancelled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let nbd = nbd.clone();
        let cancelled = cancelled.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..3u64 {
                let off = (t * 3 + round) * 8192;
                tokio::select! {
                    r = nbd.read(off, BytesMut::zeroed(8192), CmdFlags::empty()) => {
                        assert_eq!(r.unwrap()[..], pattern_at(off, 8192)[..]);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(20 + 5 * t)) => {
                        cancelled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            // tokio::time::timeout around a call works the same way.
            let r = tokio::time::timeout(
                Duration::from_millis(30),
                nbd.read(t * 4096, BytesMut::zeroed(4096), CmdFlags::empty()),
            )
            .await;
            assert!(r.is_err(), "a 300 ms read cannot finish in 30 ms");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(cancelled.load(std::sync::atomic::Ordering::Relaxed) >= 40);
    assert!(nbd.abandoned() > 0, "the late replies are still due");
    // Every later request returns the right data, late replies or not.
    let reads: Vec<_> = (0..32u64)
        .map(|k| {
            let nbd = nbd.clone();
            tokio::spawn(async move {
                let off = 1_000_000 + k * 12_345;
                let b = nbd
                    .read(off, BytesMut::zeroed(1000), CmdFlags::empty())
                    .await
                    .unwrap();
                assert_eq!(b[..], pattern_at(off, 1000)[..], "read at {off}");
            })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
    settle(&nbd).await;
    nbd.disconnect().await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_core_deadline_times_out_a_command_and_the_next_succeeds() {
    let server = nbdkit_with(&["--filter=delay"], &["pattern", "1M", "rdelay=1"]);
    let mut cfg = Config::default();
    cfg.command_timeout = Some(Duration::from_millis(200));
    let (nbd, task) = connect(&server.uri(), cfg).await;
    let t = Instant::now();
    let err = nbd
        .read(0, BytesMut::zeroed(4096), CmdFlags::empty())
        .await
        .expect_err("times out");
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        matches!(err, Error::Command(CommandError::TimedOut { .. })),
        "{err}"
    );
    assert_eq!(err.io_kind(), std::io::ErrorKind::TimedOut);
    nbd.set_command_timeout(None).await.unwrap();
    let b = nbd
        .read(65536, BytesMut::zeroed(4096), CmdFlags::empty())
        .await
        .unwrap();
    assert_eq!(b[..], pattern_at(65536, 4096)[..]);
    settle(&nbd).await;
    drop(nbd);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_server_that_dies_with_requests_in_flight_fails_every_call() {
    let mut server = nbdkit_with(&["--filter=delay"], &["memory", "4M", "rdelay=5"]);
    let (nbd, task) = connect(&server.uri(), Config::default()).await;
    let calls: Vec<_> = (0..24u64)
        .map(|k| {
            let nbd = nbd.clone();
            tokio::spawn(async move {
                nbd.read(k * 4096, BytesMut::zeroed(4096), CmdFlags::empty())
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(nbd.in_flight() > 0);
    let t = Instant::now();
    server.kill();
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("every future resolves")
            .unwrap();
        let e = r.expect_err("the server died");
        assert!(e.is_fatal(), "{e}");
    }
    assert!(t.elapsed() < Duration::from_secs(4));
    let end = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(end, Err(Error::Closed(_))), "{end:?}");
    let later = nbd
        .read(0, BytesMut::zeroed(512), CmdFlags::empty())
        .await
        .expect_err("closed");
    assert!(matches!(later, Error::Closed(_)), "{later}");
}

#[tokio::test]
async fn option_mode_lists_and_selects_an_export() {
    let dir = scratch_dir();
    make_file(dir.path(), "a", 1 << 20, |_| 1);
    make_file(dir.path(), "b", 2 << 20, |_| 2);
    let dirarg = format!("dir={}", dir.path().display());
    let server = nbdkit(&["file", &dirarg]);
    let mut cfg = Config::default();
    cfg.opt_mode = true;
    let (nbd, task) = connect(&server.uri(), cfg).await;
    assert_eq!(nbd.phase(), nbd_tokio::Phase::Negotiating);
    let mut names: Vec<String> = nbd
        .opt_list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    nbd.set_export_name("b").await.unwrap();
    nbd.opt_info().await.unwrap();
    assert_eq!(nbd.size().unwrap(), 2 << 20);
    nbd.opt_go().await.unwrap();
    assert_eq!(nbd.phase(), nbd_tokio::Phase::Ready);
    let b = nbd
        .read(4096, BytesMut::zeroed(16), CmdFlags::empty())
        .await
        .unwrap();
    assert_eq!(b[..], [2u8; 16]);
    nbd.disconnect().await.unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_file_adapter_writes_seeks_and_reads_back() {
    let server = nbdkit(&["memory", "1M"]);
    let (nbd, task) = connect(&server.uri(), Config::default()).await;
    let mut f = NbdFile::new(nbd.clone()).unwrap();
    assert_eq!(f.len(), 1 << 20);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    f.seek(std::io::SeekFrom::Start(1000)).await.unwrap();
    f.write_all(&data).await.unwrap();
    f.flush().await.unwrap();
    f.seek(std::io::SeekFrom::Start(1000)).await.unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact(&mut back).await.unwrap();
    assert!(back == data);
    // Reads stop at the end of the export.
    f.seek(std::io::SeekFrom::End(-10)).await.unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).await.unwrap();
    assert_eq!(tail.len(), 10);
    let err = f.write_all(b"x").await.expect_err("past the end");
    assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
    drop(f);
    drop(nbd);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("dropping the clients ends the connection")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn dropping_every_client_with_a_silent_server_does_not_hang() {
    let server = nbdkit_with(&["--filter=delay"], &["memory", "1M", "rdelay=30"]);
    let (nbd, task) = connect(&server.uri(), Config::default()).await;
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        nbd.read(0, BytesMut::zeroed(512), CmdFlags::empty()),
    )
    .await;
    assert!(r.is_err());
    // The task cancels the dropped call on its next turn.
    let t = Instant::now();
    while nbd.abandoned() != 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "never cancelled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(nbd.in_flight(), 1, "its slot waits for the late reply");
    drop(nbd);
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("no hang")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    // Only an abandoned reply was owed: nobody lost anything.
    assert!(end.is_ok(), "{end:?}");
}

#[tokio::test]
async fn connect_command_and_abort() {
    let (nbd, task): (Client, ConnectionTask) = Client::connect_command(
        &["nbdkit", "-s", "--exit-with-parent", "memory", "1M"],
        Config::default(),
    )
    .await
    .unwrap();
    let task = tokio::spawn(task);
    nbd.write(0, Bytes::from_static(b"hello"), CmdFlags::FUA)
        .await
        .unwrap();
    let b = nbd
        .read(0, BytesMut::zeroed(5), CmdFlags::empty())
        .await
        .unwrap();
    assert_eq!(&b[..], b"hello");
    nbd.abort("test is done");
    let end = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_ok(), "nothing was lost: {end:?}");
    let e = nbd.flush(CmdFlags::empty()).await.expect_err("aborted");
    assert!(matches!(e, Error::Closed(_)), "{e}");
}

#[tokio::test]
async fn every_transport_of_nbd_driver_connects() {
    // TCP (URI and host/port), a Unix socket path, socket activation.
    let tcp = nbd_tests::servers::nbdkit_tcp(&[], &["memory", "1M"]);
    let addr = tcp.addr().unwrap();
    let unix = nbdkit(&["memory", "2M"]);
    let mut ends = Vec::new();
    for (nbd, task) in [
        Client::connect(&tcp.uri(), Config::default())
            .await
            .unwrap(),
        Client::connect_tcp(&addr.ip().to_string(), addr.port(), Config::default())
            .await
            .unwrap(),
        Client::connect(unix.socket().to_str().unwrap(), Config::default())
            .await
            .unwrap(),
        Client::connect_unix(unix.socket(), Config::default())
            .await
            .unwrap(),
        Client::connect_systemd_socket_activation(&["nbdkit", "memory", "3M"], Config::default())
            .await
            .unwrap(),
    ] {
        let task = tokio::spawn(task);
        let size = nbd.size().unwrap();
        assert!([1 << 20, 2 << 20, 3 << 20].contains(&size), "{size}");
        let b = nbd
            .read(size - 512, BytesMut::zeroed(512), CmdFlags::empty())
            .await
            .unwrap();
        assert_eq!(b.len(), 512);
        nbd.disconnect().await.unwrap();
        ends.push(task);
    }
    for t in ends {
        t.await.unwrap().unwrap();
    }
    // TLS URIs are refused before anything is sent.
    let e = Client::connect("nbds+unix:///?socket=/nonexistent", Config::default())
        .await
        .expect_err("no TLS yet");
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}
