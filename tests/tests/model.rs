//! Model-based tests (proptest): random command sequences (write, read,
//! trim, write-zeroes, flush, cache; random offsets and lengths, some out
//! of bounds or empty) run against an in-memory model and against a server,
//! and must agree:
//!
//! * every read returns what the model holds;
//! * requests that strict mode must refuse (zero length, past the end)
//!   fail client-side with the matching [`UsageError`] and change nothing;
//! * everything else succeeds.
//!
//! After a trim the content is unspecified (doc/proto.md, "NBD_CMD_TRIM": the server may
//! or may not zero it), so the model marks trimmed bytes unknown until they
//! are written or zeroed again.
//!
//! Commands go out in pipelined batches: consecutive commands join a batch
//! until one would overlap a command of the batch that changes data (the
//! spec leaves the order of overlapping requests open), so each read has
//! one right answer. The servers: nbdkit `memory`, and the scripted
//! [`FakeServer`] answering each batch in a shuffled order, with read
//! replies split into data and hole chunks that interleave with other
//! replies — in simple, structured and extended-header mode.

use nbd_std::CmdFlags;
use std::cell::RefCell;
use std::sync::mpsc;

use bytes::{Bytes, BytesMut};
use nbd_core::UsageError;
use nbd_std::{Client, Config, Cookie, Error};
use nbd_tests::fake::{FakeConn, FakeServer, GoConfig, Request};
use nbd_tests::proto::*;
use nbd_tests::servers::nbdkit;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write(u8),
    Read,
    Trim,
    Zero,
    Flush,
    Cache,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    off: u64,
    len: u64,
}

impl Op {
    fn changes_data(&self) -> bool {
        matches!(self.kind, Kind::Write(_) | Kind::Trim | Kind::Zero)
    }
    fn ranged(&self) -> bool {
        self.kind != Kind::Flush
    }
    fn overlaps(&self, o: &Op) -> bool {
        self.ranged()
            && o.ranged()
            && self.off < o.off.saturating_add(o.len)
            && o.off < self.off.saturating_add(self.len)
    }
    /// What strict mode must say about it, if it must refuse it.
    fn refusal(&self) -> Option<UsageError> {
        if !self.ranged() {
            return None;
        }
        if self.len == 0 {
            return Some(UsageError::ZeroLength);
        }
        if self.off + self.len > SIZE {
            return Some(UsageError::OutOfBounds {
                offset: self.off,
                length: self.len,
                size: SIZE,
            });
        }
        None
    }
}

/// Write payloads: a function of the seed and the absolute offset, so a
/// misplaced write shows.
fn payload(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|i| (i as u8).wrapping_mul(seed | 1) ^ (i >> 8) as u8 ^ seed)
        .collect()
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        6 => any::<u8>().prop_map(Kind::Write),
        6 => Just(Kind::Read),
        2 => Just(Kind::Trim),
        2 => Just(Kind::Zero),
        1 => Just(Kind::Flush),
        1 => Just(Kind::Cache),
    ];
    let off = prop_oneof![
        6 => (0..SIZE / 512).prop_map(|b| b * 512),
        3 => 0..SIZE,
        1 => (SIZE - 40_000)..(SIZE + 4096),
    ];
    let len = prop_oneof![
        1 => Just(0u64),
        6 => (1u64..=128).prop_map(|b| b * 512),
        3 => 1u64..70_000,
    ];
    (kind, off, len).prop_map(|(kind, off, len)| Op { kind, off, len })
}

/// The model: bytes and whether each is known.
struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    fn zeroed() -> Model {
        Model {
            data: vec![0; SIZE as usize],
            known: vec![true; SIZE as usize],
        }
    }

    fn apply(&mut self, op: &Op) {
        let r = op.off as usize..(op.off + op.len) as usize;
        match op.kind {
            Kind::Write(seed) => {
                self.data[r.clone()].copy_from_slice(&payload(seed, op.off, op.len));
                self.known[r].fill(true);
            }
            Kind::Zero => {
                self.data[r.clone()].fill(0);
                self.known[r].fill(true);
            }
            Kind::Trim => self.known[r].fill(false),
            Kind::Read | Kind::Flush | Kind::Cache => {}
        }
    }

    /// Compares a read of `got` at `off` with the known bytes.
    fn check(&self, off: u64, got: &[u8]) -> Result<(), TestCaseError> {
        for (i, &b) in got.iter().enumerate() {
            let at = off as usize + i;
            if self.known[at] && self.data[at] != b {
                return Err(TestCaseError::fail(format!(
                    "byte at {at} is {b:#04x}, the model says {:#04x}",
                    self.data[at]
                )));
            }
        }
        Ok(())
    }
}

/// A command in flight, with what a read must return: the model's bytes
/// at submission and which of them are known.
struct Pending {
    cookie: Cookie,
    op: Op,
    expect: Option<(Vec<u8>, Vec<bool>)>,
}

/// Submits one command through the pipelined API.
fn submit(c: &mut Client, op: &Op) -> Result<Cookie, Error> {
    match op.kind {
        Kind::Write(seed) => c.aio_pwrite(
            Bytes::from(payload(seed, op.off, op.len)),
            op.off,
            CmdFlags::empty(),
        ),
        Kind::Read => c.aio_pread(BytesMut::zeroed(op.len as usize), op.off, CmdFlags::empty()),
        Kind::Trim => c.aio_trim(op.off, op.len, CmdFlags::empty()),
        Kind::Zero => c.aio_zero(op.off, op.len, CmdFlags::empty()),
        Kind::Flush => c.aio_flush(CmdFlags::empty()),
        Kind::Cache => c.aio_cache(op.off, op.len, CmdFlags::empty()),
    }
}

/// Runs `ops` in conflict-free pipelined batches; `batch_sent(k)` is told
/// how many commands each batch put on the wire before its replies are
/// awaited. Reads are checked against the model as it was when they were
/// submitted (no command of the batch changes their bytes).
fn execute(
    c: &mut Client,
    model: &mut Model,
    ops: &[Op],
    batch_sent: &mut dyn FnMut(usize),
) -> Result<(), TestCaseError> {
    let mut i = 0;
    while i < ops.len() {
        let mut batch: Vec<Op> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        // A wrong answer to a submission; reported once the batch is
        // retired, so the connection stays in step for the next case.
        let mut wrong: Option<TestCaseError> = None;
        while i < ops.len() && pending.len() < 64 && wrong.is_none() {
            let op = ops[i];
            let clash = batch
                .iter()
                .any(|b| (b.changes_data() || op.changes_data()) && b.overlaps(&op));
            if clash {
                break;
            }
            i += 1;
            let r = submit(c, &op);
            match (op.refusal(), r) {
                (Some(want), Err(Error::Usage(got))) if got == want => {}
                (Some(want), other) => {
                    wrong = Some(TestCaseError::fail(format!(
                        "{op:?}: expected {want:?}, got {other:?}"
                    )));
                    if let Ok(cookie) = other {
                        pending.push(Pending {
                            cookie,
                            op,
                            expect: None,
                        });
                    }
                }
                (None, Ok(cookie)) => {
                    let expect = (op.kind == Kind::Read).then(|| {
                        let r = op.off as usize..(op.off + op.len) as usize;
                        (model.data[r.clone()].to_vec(), model.known[r].to_vec())
                    });
                    model.apply(&op);
                    batch.push(op);
                    pending.push(Pending { cookie, op, expect });
                }
                (None, Err(e)) => {
                    wrong = Some(TestCaseError::fail(format!("{op:?}: refused: {e}")));
                }
            }
        }
        if !pending.is_empty() {
            batch_sent(pending.len());
        }
        let mut done = Vec::new();
        for p in pending {
            let comp = c
                .wait(p.cookie)
                .map_err(|e| TestCaseError::fail(format!("{:?}: wait: {e}", p.op)))?;
            done.push((p, comp));
        }
        if let Some(e) = wrong {
            return Err(e);
        }
        for (p, comp) in done {
            let op = p.op;
            if let Err(e) = &comp.result {
                return Err(TestCaseError::fail(format!("{op:?} failed: {e}")));
            }
            if let Some((want, known)) = p.expect {
                let got = comp.buffer.expect("read buffer");
                prop_assert_eq!(got.len() as u64, op.len);
                for (j, &b) in got.iter().enumerate() {
                    if known[j] && want[j] != b {
                        return Err(TestCaseError::fail(format!(
                            "{op:?}: byte at {} is {b:#04x}, the model says {:#04x}",
                            op.off + j as u64,
                            want[j]
                        )));
                    }
                }
            }
        }
    }
    // Finally the whole disk, as one more batch of reads.
    let mut cookies = Vec::new();
    for off in (0..SIZE).step_by(65536) {
        let ck = c
            .aio_pread(BytesMut::zeroed(65536), off, CmdFlags::empty())
            .map_err(|e| TestCaseError::fail(format!("final read at {off}: {e}")))?;
        cookies.push((ck, off));
    }
    batch_sent(cookies.len());
    for (ck, off) in cookies {
        let comp = c
            .wait(ck)
            .map_err(|e| TestCaseError::fail(format!("final read at {off}: {e}")))?;
        if let Err(e) = comp.result {
            return Err(TestCaseError::fail(format!("final read at {off}: {e}")));
        }
        model.check(off, &comp.buffer.expect("read buffer"))?;
    }
    Ok(())
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(PtConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..PtConfig::default()
    })
}

fn ops_strategy() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op_strategy(), 1..48)
}

/// Against nbdkit's memory plugin, one connection for all cases; each case
/// starts from an all-zero disk.
#[test]
fn model_vs_nbdkit_memory() {
    let srv = nbdkit(&["memory", "1M"]);
    let client = RefCell::new(Client::connect(&srv.uri(), Config::default()).unwrap());
    let mut batches = 0usize;
    let batches_cell = RefCell::new(&mut batches);
    runner(32)
        .run(&ops_strategy(), |ops| {
            let mut c = client.borrow_mut();
            c.zero(0, SIZE, CmdFlags::empty()).expect("reset the disk");
            let mut model = Model::zeroed();
            let mut n = batches_cell.borrow_mut();
            execute(&mut c, &mut model, &ops, &mut |_| **n += 1)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(batches > 32, "pipelined batches were run: {batches}");
    client.into_inner().shutdown().unwrap();
}

// ---------------------------------------------------------------- fake server

/// Cheap deterministic shuffling for the fake server.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One message of a reply still to send.
enum Piece {
    /// A whole reply from [`FakeConn::serve_request`].
    Whole,
    Data(u64, u64),
    Hole(u64, u64),
}

/// The pieces of `req`'s reply: for a structured read, up to three chunks
/// (holes where the disk is zero) in a shuffled order; otherwise one whole
/// reply.
fn pieces(req: &Request, disk: &[u8], structured: bool, rng: &mut Rng) -> Vec<Piece> {
    if !(structured && req.typ == CMD_READ) {
        return vec![Piece::Whole];
    }
    let (off, len) = (req.offset, req.length);
    let mut cuts = vec![off, off + len];
    for _ in 0..2 {
        if len > 1 {
            cuts.push(off + 1 + rng.below(len as usize - 1) as u64);
        }
    }
    cuts.sort();
    cuts.dedup();
    let mut out: Vec<Piece> = cuts
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            if disk[a as usize..b as usize].iter().all(|&x| x == 0) && rng.below(4) != 0 {
                Piece::Hole(a, b - a)
            } else {
                Piece::Data(a, b - a)
            }
        })
        .collect();
    for k in (1..out.len()).rev() {
        out.swap(k, rng.below(k + 1));
    }
    out
}

/// Answers a batch of `k` requests: reads them all, then sends the replies
/// with the requests in a shuffled order and the chunks of different reads
/// interleaved.
fn answer_batch(
    c: &mut FakeConn,
    k: usize,
    disk: &mut [u8],
    structured: bool,
    rng: &mut Rng,
) -> std::io::Result<()> {
    let mut reqs = Vec::with_capacity(k);
    for _ in 0..k {
        reqs.push(c.recv_request()?);
    }
    let mut plan: Vec<(Request, Vec<Piece>)> = reqs
        .into_iter()
        .map(|r| {
            let p = pieces(&r, disk, structured, rng);
            (r, p)
        })
        .collect();
    while !plan.is_empty() {
        let i = rng.below(plan.len());
        let piece = plan[i].1.pop().expect("a piece");
        let last = plan[i].1.is_empty();
        let req = plan[i].0.clone();
        match piece {
            Piece::Whole => c.serve_request(&req, disk)?,
            Piece::Data(o, l) => {
                let data = disk[o as usize..(o + l) as usize].to_vec();
                c.send_data_chunk(&req, o, &data, last)?;
            }
            Piece::Hole(o, l) => c.send_hole_chunk(&req, o, l as u32, last)?,
        }
        if last {
            plan.swap_remove(i);
        }
    }
    Ok(())
}

/// Reply styles of the fake server.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

fn model_vs_fake(mode: Mode, cases: u32) {
    let (tx, rx) = mpsc::channel::<usize>();
    let server = FakeServer::start(move |c| {
        c.send_newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)?;
        c.recv_client_flags()?;
        let mut cfg = GoConfig::new(
            SIZE,
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_CACHE,
        );
        cfg.structured_replies = !matches!(mode, Mode::Simple);
        cfg.extended_headers = matches!(mode, Mode::Extended);
        let neg = c.negotiate(&cfg)?;
        let structured = neg.structured_replies || neg.extended_headers;
        let mut disk = vec![0u8; SIZE as usize];
        let mut rng = Rng(0x1234_5678_9abc_def1);
        // One message per batch; the channel closes at the end.
        while let Ok(k) = rx.recv() {
            answer_batch(c, k, &mut disk, structured, &mut rng)?;
        }
        c.expect_disc()
    });
    let mut c = Client::connect(&server.uri(), Config::default()).unwrap();
    assert_eq!(
        c.get_extended_headers_negotiated(),
        matches!(mode, Mode::Extended)
    );
    assert_eq!(
        c.get_structured_replies_negotiated(),
        !matches!(mode, Mode::Simple)
    );
    let client = RefCell::new(&mut c);
    let tx_cell = RefCell::new(&tx);
    let mut batches = 0usize;
    let batches_cell = RefCell::new(&mut batches);
    runner(cases)
        .run(&ops_strategy(), |ops| {
            let mut c = client.borrow_mut();
            let tx = tx_cell.borrow();
            let mut n = batches_cell.borrow_mut();
            let mut sent = |k: usize| {
                **n += 1;
                tx.send(k).expect("fake server gone");
            };
            // Reset to zeroes (one batch of one command).
            let ck = c.aio_zero(0, SIZE, CmdFlags::empty()).expect("reset");
            sent(1);
            c.wait(ck).expect("reset").result.expect("reset");
            let mut model = Model::zeroed();
            execute(&mut c, &mut model, &ops, &mut sent)
        })
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    drop(tx);
    assert!(batches > cases as usize, "{mode:?}: batches run: {batches}");
    c.shutdown().expect("shutdown");
    server.join().expect("fake server script");
}

#[test]
fn model_vs_fake_server_simple_replies_reordered() {
    model_vs_fake(Mode::Simple, 16);
}

#[test]
fn model_vs_fake_server_structured_replies_reordered_and_split() {
    model_vs_fake(Mode::Structured, 16);
}

#[test]
fn model_vs_fake_server_extended_headers_reordered_and_split() {
    model_vs_fake(Mode::Extended, 16);
}
