//! Measures what `Client::pread_structured` costs against a server that
//! answers every read as one-byte `OFFSET_DATA` chunks in descending order
//! (legal: doc/proto.md, section "Structured reply chunk message types").
//! Run it under `/usr/bin/time -v` for the peak memory:
//!
//! ```text
//! cargo build --release -p nbd-tests --example structured_read_memory
//! /usr/bin/time -v target/release/examples/structured_read_memory 8 2097152
//! ```
//!
//! Arguments: the number of reads (default 8) and their size (default
//! 2 MiB). It prints the chunks seen and the time taken.

use std::time::Instant;

use nbd_std::{Client, CmdFlags, Config};
use nbd_tests::fake::FakeServer;
use nbd_tests::proto::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let reads: usize = args.next().map_or(8, |a| a.parse().expect("reads"));
    let size: usize = args.next().map_or(2 << 20, |a| a.parse().expect("size"));
    let disk: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
    let expected = disk.clone();
    let server = FakeServer::start(move |c| {
        c.standard_handshake(size as u64 * 4, FLAG_HAS_FLAGS)?;
        for _ in 0..reads {
            let req = c.recv_request()?;
            c.send_one_byte_chunks(&req, &disk, true)?;
        }
        c.expect_disc()
    });
    let mut client = Client::connect_unix(server.socket(), Config::default()).expect("connect");
    let t = Instant::now();
    let mut chunks = 0u64;
    let mut buf = vec![0u8; size];
    for _ in 0..reads {
        client
            .pread_structured(&mut buf, 0, CmdFlags::empty(), |_, _, _| chunks += 1)
            .expect("read");
        assert!(buf == expected);
    }
    let elapsed = t.elapsed();
    client.shutdown().expect("shutdown");
    server.join().expect("server");
    println!("{reads} reads of {size} bytes, {chunks} chunks, {elapsed:?}");
}
