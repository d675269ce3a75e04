//! The receive buffer the adapter reads into, and the queue of bytes waiting
//! to be sent.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Receive buffer: one allocation, zeroed once, reused for the life of the
/// connection. The adapter reads into [`RecvBuffer::spare`] and commits what
/// it read; the state machine consumes from the front.
pub(crate) struct RecvBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for RecvBuffer {
    /// Sizes only: the buffer itself is 256 KiB.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBuffer")
            .field("buffered", &self.len())
            .field("capacity", &self.buf.len())
            .finish()
    }
}

impl RecvBuffer {
    pub(crate) fn new(capacity: usize) -> Self {
        RecvBuffer {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space after the data, moving the data to the front first when
    /// that makes room.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies `src` in, as much as fits; returns how much was taken.
    pub(crate) fn fill_from(&mut self, src: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(src.len());
        spare[..n].copy_from_slice(&src[..n]);
        self.commit(n);
        n
    }
}

/// Bytes offered to one vectored write at most (a few socket buffers).
const MAX_BYTES_PER_WRITE: usize = 1 << 20;

/// One queued piece of output.
#[derive(Debug)]
enum Segment {
    /// A request header, stored inline so that queuing it never allocates;
    /// `payload` when the request's payload is the next segment.
    Inline {
        buf: [u8; 32],
        start: u8,
        end: u8,
        payload: bool,
    },
    /// An option message or a caller's write payload.
    Shared(Bytes),
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Inline {
                buf, start, end, ..
            } => &buf[*start as usize..*end as usize],
            Segment::Shared(b) => b,
        }
    }
}

/// Bytes waiting for the socket: request headers inline, option messages
/// built in a scratch buffer, and write payloads as the caller's own `Bytes`
/// (no copy), so the adapter can send everything with one vectored write and
/// steady-state traffic allocates nothing.
#[derive(Default)]
pub(crate) struct SendQueue {
    segments: VecDeque<Segment>,
    scratch: BytesMut,
    queued: usize,
    /// Part of a message has been sent and the rest has not.
    mid_message: bool,
}

impl std::fmt::Debug for SendQueue {
    /// Counts only: write payloads may be megabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("segments", &self.segments.len())
            .field("queued_bytes", &self.queued)
            .field("mid_message", &self.mid_message)
            .finish()
    }
}

impl SendQueue {
    /// A queue with room for `segments` pieces, so that steady traffic with
    /// many requests in flight does not grow it.
    pub(crate) fn with_capacity(segments: usize) -> Self {
        SendQueue {
            segments: VecDeque::with_capacity(segments),
            ..SendQueue::default()
        }
    }

    /// Queues a message (an option request, the client flags) built by
    /// `encode` in the scratch buffer.
    pub(crate) fn push_message(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        encode(&mut self.scratch);
        self.seal();
    }

    /// Queues what was appended to the scratch buffer; the scratch buffer is
    /// empty again afterwards, so no other method needs to check it.
    fn seal(&mut self) {
        if !self.scratch.is_empty() {
            let b = self.scratch.split().freeze();
            self.queued += b.len();
            self.segments.push_back(Segment::Shared(b));
        }
    }

    /// Queues a request header (at most 32 bytes) without allocating.
    pub(crate) fn push_header(&mut self, h: &[u8]) {
        let mut buf = [0u8; 32];
        let n = h.len().min(32);
        buf[..n].copy_from_slice(&h[..n]);
        self.queued += n;
        self.segments.push_back(Segment::Inline {
            buf,
            start: 0,
            end: n as u8,
            payload: false,
        });
    }

    /// Queues a payload without copying it, as the rest of the request
    /// whose header was queued last.
    pub(crate) fn push_payload(&mut self, b: Bytes) {
        if !b.is_empty() {
            if let Some(Segment::Inline { payload, .. }) = self.segments.back_mut() {
                *payload = true;
            }
            self.queued += b.len();
            self.segments.push_back(Segment::Shared(b));
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// True when part of a message is sent and the rest is still queued.
    pub(crate) fn mid_message(&self) -> bool {
        self.mid_message && self.queued > 0
    }

    pub(crate) fn len(&self) -> usize {
        self.queued
    }

    pub(crate) fn slices<'a>(&'a mut self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut bytes = 0;
        for (slot, seg) in out.iter_mut().zip(self.segments.iter()) {
            // More than a socket buffer holds is never taken by one write;
            // offering it would only cost work on every call.
            if bytes >= MAX_BYTES_PER_WRITE {
                break;
            }
            let b = seg.bytes();
            bytes += b.len();
            *slot = IoSlice::new(b);
            n += 1;
        }
        n
    }

    pub(crate) fn front(&mut self) -> &[u8] {
        self.segments.front().map(Segment::bytes).unwrap_or(&[])
    }

    pub(crate) fn advance(&mut self, mut n: usize) {
        n = n.min(self.queued);
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            let len = front.bytes().len();
            if n >= len {
                n -= len;
                self.mid_message = matches!(front, Segment::Inline { payload: true, .. });
                self.segments.pop_front();
            } else {
                match front {
                    Segment::Inline { start, .. } => *start += n as u8,
                    Segment::Shared(b) => b.advance(n),
                }
                self.mid_message = true;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request is in progress from its first byte sent until its last,
    /// across the header and payload segments and whatever the write sizes.
    #[test]
    fn mid_message_spans_header_and_payload() {
        let mut q = SendQueue::with_capacity(4);
        q.push_header(&[1; 28]);
        q.push_payload(Bytes::from(vec![2; 100]));
        q.push_header(&[3; 28]);
        assert!(!q.mid_message(), "nothing sent");
        q.advance(10);
        assert!(q.mid_message(), "part of the header");
        q.advance(18);
        assert!(q.mid_message(), "the header, not the payload");
        q.advance(99);
        assert!(q.mid_message(), "all but one payload byte");
        q.advance(1);
        assert!(!q.mid_message(), "the first request is out");
        q.advance(27);
        assert!(q.mid_message(), "a header without payload, partly");
        q.advance(1);
        assert!(!q.mid_message(), "everything is out");
        assert!(q.is_empty());

        q.push_message(|b| b.extend_from_slice(&[4; 16]));
        q.advance(16);
        assert!(!q.mid_message(), "an option message sent whole");
        q.push_message(|b| b.extend_from_slice(&[5; 16]));
        q.advance(8);
        assert!(q.mid_message(), "an option message cut short");
    }

    #[test]
    fn debug_shows_sizes_not_bytes() {
        let r = RecvBuffer::new(256 * 1024);
        assert!(format!("{r:?}").len() < 100);
        let mut q = SendQueue::with_capacity(4);
        q.push_header(&[1; 28]);
        q.push_payload(Bytes::from(vec![2; 1 << 20]));
        let s = format!("{q:?}");
        assert!(s.len() < 100 && s.contains("1048604"), "{s}");
    }
}
