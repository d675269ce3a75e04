//! What no real server does on cue, from the scripted fake server: a read
//! whose future is dropped while its payload is half through the socket
//! (the payload was going straight into the read's buffer), and a server
//! that hangs up mid-reply.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use nbd_tests::fake::FakeServer;
use nbd_tests::proto::*;
use nbd_tokio::{Client, CmdFlags, Config, Error};

const LEN: usize = 256 * 1024;

/// The header of a structured `OFFSET_DATA` chunk (DONE set) for `cookie`
/// carrying `len` bytes at `offset`.
fn data_chunk_header(cookie: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h.extend(1u16.to_be_bytes()); // NBD_REPLY_FLAG_DONE
    h.extend(1u16.to_be_bytes()); // NBD_REPLY_TYPE_OFFSET_DATA
    h.extend(cookie.to_be_bytes());
    h.extend((8 + len as u32).to_be_bytes());
    h.extend(offset.to_be_bytes());
    h
}

/// doc/proto.md, "Structured reply chunk message": the rest of a reply
/// whose read was abandoned must still be read off the socket, and must
/// not land in memory the caller got back or freed.
#[tokio::test]
async fn a_read_dropped_mid_payload_is_discarded_and_the_next_gets_its_data() {
    let server = FakeServer::start(|c| {
        c.standard_handshake(4 << 20, FLAG_HAS_FLAGS)?;
        let a = c.recv_request()?;
        let mut first = data_chunk_header(a.cookie, a.offset, LEN);
        first.extend(vec![0xaa; LEN / 2]);
        c.send(&first)?;
        std::thread::sleep(Duration::from_millis(400));
        c.send(&vec![0xaa; LEN / 2])?;
        let b = c.recv_request()?;
        c.send_data_chunk(&b, b.offset, &vec![0x11; b.length as usize], true)?;
        c.expect_disc()
    });
    let (nbd, task) = Client::connect(&server.uri(), Config::default())
        .await
        .unwrap();
    let task = tokio::spawn(task);
    tokio::select! {
        r = nbd.read(0, BytesMut::zeroed(LEN), CmdFlags::empty()) => panic!("finished: {r:?}"),
        _ = tokio::time::sleep(Duration::from_millis(150)) => {}
    }
    let b = nbd
        .read(1 << 20, BytesMut::zeroed(LEN), CmdFlags::empty())
        .await
        .unwrap();
    assert!(
        b.iter().all(|&x| x == 0x11),
        "the late payload went elsewhere"
    );
    assert_eq!(nbd.in_flight(), 0);
    assert_eq!(nbd.abandoned(), 0);
    nbd.disconnect().await.unwrap();
    task.await.unwrap().unwrap();
    server.join().unwrap();
}

#[tokio::test]
async fn a_server_that_hangs_up_mid_reply_fails_the_calls_in_flight() {
    let server = FakeServer::start(|c| {
        c.standard_handshake(4 << 20, FLAG_HAS_FLAGS)?;
        let a = c.recv_request()?;
        let _b = c.recv_request()?;
        let mut half = data_chunk_header(a.cookie, a.offset, 4096);
        half.extend(vec![0xaa; 1000]);
        c.send(&half)?;
        c.close()
    });
    let (nbd, task) = Client::connect(&server.uri(), Config::default())
        .await
        .unwrap();
    let task = tokio::spawn(task);
    let t = Instant::now();
    let (a, b) = tokio::join!(
        nbd.read(0, BytesMut::zeroed(4096), CmdFlags::empty()),
        nbd.read(4096, BytesMut::zeroed(4096), CmdFlags::empty()),
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    for r in [a, b] {
        let e = r.expect_err("the server hung up");
        assert!(e.is_fatal(), "{e}");
        assert_eq!(e.io_kind(), std::io::ErrorKind::NotConnected, "{e}");
    }
    assert!(matches!(task.await.unwrap(), Err(Error::Closed(_))));
    server.join().unwrap();
}
