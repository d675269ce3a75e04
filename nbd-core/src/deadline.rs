//! Deadlines: time as an input. The core never reads a clock; the adapter
//! passes `now` in ([`crate::Connection::new`],
//! [`crate::Connection::handle_timeout`]) and asks when to call again
//! ([`crate::Connection::poll_timeout`]).
//!
//! Two kinds of deadline exist:
//! - the **handshake deadline** ([`crate::Config::handshake_timeout`]):
//!   from the connection's creation to the transmission phase, counted
//!   only while the server has the turn (in option mode the clock is
//!   suspended while the caller decides, and each option the caller sends
//!   gets the full timeout again);
//! - a **deadline per command** ([`crate::Config::command_timeout`] for
//!   every command, or [`crate::Connection::set_deadline`] for one).
//!
//! Command deadlines live in an indexed binary heap over the slots of the
//! in-flight table, allocated once when the transmission phase starts:
//! arming, disarming and expiring one costs `O(log n)` in the requests in
//! flight and never allocates, and a connection with no deadline set pays
//! one comparison per [`crate::Connection::poll_timeout`].

use std::time::Instant;

/// What happens when a command misses its deadline
/// ([`crate::Config::on_command_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TimeoutPolicy {
    /// The command completes with [`crate::CommandError::TimedOut`] and its
    /// buffer comes back; the connection stays usable. The server may
    /// still be working on the request, so its slot stays reserved (it
    /// counts against the in-flight limits) until the reply arrives, and
    /// that late reply is read and dropped without touching the buffer
    /// the caller got back. A timed-out write or trim may therefore still
    /// be applied by the server.
    #[default]
    FailCommand,
    /// The connection ends with [`crate::CloseReason::CommandTimedOut`]:
    /// the command that missed its deadline completes with
    /// [`crate::CommandError::TimedOut`], every other request in flight
    /// with [`crate::CommandError::ConnectionClosed`]. For callers that
    /// would rather reconnect than leave the server working on requests
    /// they no longer track.
    CloseConnection,
}

const NONE: u32 = u32::MAX;

/// An indexed min-heap of `(deadline, slot)`: one entry per slot at most,
/// found by slot in `O(1)` and removed in `O(log n)`.
#[derive(Debug, Default)]
pub(crate) struct DeadlineHeap {
    /// Slots, heap-ordered by `when[slot]`.
    heap: Vec<u32>,
    /// Per slot: its index in `heap`, or `NONE`.
    pos: Vec<u32>,
    /// Per slot: its deadline (meaningful while in the heap).
    when: Vec<Option<Instant>>,
}

impl DeadlineHeap {
    /// Makes room for `slots` slots (once, when transmission starts).
    pub(crate) fn reset(&mut self, slots: usize) {
        self.heap = Vec::with_capacity(slots);
        self.pos = vec![NONE; slots];
        self.when = vec![None; slots];
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// The earliest deadline and its slot.
    pub(crate) fn peek(&self) -> Option<(Instant, u32)> {
        let &slot = self.heap.first()?;
        Some((self.when[slot as usize]?, slot))
    }

    /// Sets (or moves) the deadline of `slot`.
    pub(crate) fn set(&mut self, slot: u32, at: Instant) {
        let s = slot as usize;
        if s >= self.pos.len() {
            return;
        }
        self.when[s] = Some(at);
        let i = match self.pos[s] {
            NONE => {
                self.heap.push(slot);
                let i = self.heap.len() - 1;
                self.pos[s] = i as u32;
                i
            }
            i => i as usize,
        };
        let i = self.sift_up(i);
        self.sift_down(i);
    }

    /// Removes the deadline of `slot`, if it has one. Free when no
    /// deadline is set at all (the common case: every completion calls it).
    #[inline]
    pub(crate) fn remove(&mut self, slot: u32) {
        if !self.heap.is_empty() {
            self.remove_slow(slot);
        }
    }

    fn remove_slow(&mut self, slot: u32) {
        let s = slot as usize;
        let Some(&i) = self.pos.get(s) else {
            return;
        };
        if i == NONE {
            return;
        }
        let i = i as usize;
        let last = self.heap.len() - 1;
        self.heap.swap(i, last);
        self.heap.pop();
        self.pos[s] = NONE;
        self.when[s] = None;
        if i < self.heap.len() {
            self.pos[self.heap[i] as usize] = i as u32;
            let i = self.sift_up(i);
            self.sift_down(i);
        }
    }

    fn key(&self, i: usize) -> Option<Instant> {
        self.when[self.heap[i] as usize]
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a] as usize] = a as u32;
        self.pos[self.heap[b] as usize] = b as u32;
    }

    fn sift_up(&mut self, mut i: usize) -> usize {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.key(i) < self.key(parent) {
                self.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
        i
    }

    fn sift_down(&mut self, mut i: usize) -> usize {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < self.heap.len() && self.key(l) < self.key(m) {
                m = l;
            }
            if r < self.heap.len() && self.key(r) < self.key(m) {
                m = r;
            }
            if m == i {
                return i;
            }
            self.swap(i, m);
            i = m;
        }
    }
}

/// The handshake deadline's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeTimer {
    /// No deadline (none configured, or the handshake is over).
    Off,
    /// The server has the turn and must finish by then.
    Armed(Instant),
    /// The caller has the turn (option mode); the next option sent restarts
    /// the full timeout.
    Suspended,
}

impl HandshakeTimer {
    /// Armed for `deadline`, or off without one.
    pub(crate) fn until(deadline: Option<Instant>) -> HandshakeTimer {
        match deadline {
            Some(at) => HandshakeTimer::Armed(at),
            None => HandshakeTimer::Off,
        }
    }

    /// Armed for `timeout` from `now` (off without one, or past the end
    /// of time).
    pub(crate) fn starting(timeout: Option<std::time::Duration>, now: Instant) -> HandshakeTimer {
        HandshakeTimer::until(timeout.and_then(|d| now.checked_add(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn heap_orders_and_removes() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = DeadlineHeap::default();
        h.reset(8);
        for (slot, s) in [(0, 5), (1, 3), (2, 9), (3, 1), (4, 7)] {
            h.set(slot, at(s));
        }
        assert_eq!(h.peek(), Some((at(1), 3)));
        h.remove(3);
        assert_eq!(h.peek(), Some((at(3), 1)));
        h.set(2, at(0)); // moved earlier
        assert_eq!(h.peek(), Some((at(0), 2)));
        h.set(2, at(10)); // moved later
        assert_eq!(h.peek(), Some((at(3), 1)));
        let mut order = Vec::new();
        while let Some((_, slot)) = h.peek() {
            order.push(slot);
            h.remove(slot);
        }
        assert_eq!(order, [1, 0, 4, 2]);
        assert!(h.is_empty());
        h.remove(7); // not present: no effect
        h.set(99, at(1)); // out of range: ignored
        assert!(h.is_empty());
    }
}
