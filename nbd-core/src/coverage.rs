//! Which bytes of a structured read have arrived, for the rule that chunks
//! of one reply never overlap (doc/proto.md, "Structured reply chunk
//! message types": `NBD_REPLY_TYPE_OFFSET_DATA` and `_OFFSET_HOLE` chunks
//! MUST NOT overlap each other).
//!
//! While chunks arrive in order, the count of bytes received describes them
//! (one run from the request's offset) and nothing is stored. The first
//! chunk out of order switches to a bitmap with one bit per byte of the
//! request: at most `length / 8` bytes (8 MiB for a 64 MiB read), kept
//! between requests so that it is allocated once per slot. Every chunk then
//! costs O(1 + chunk length / 64) whatever the order, so a 1 MiB read sent
//! as 2^20 one-byte chunks in descending order costs 2^20 steps, not 2^40.

/// The out-of-order state of one read (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    /// One bit per byte of the request, valid while `bitmap` is set.
    bits: Vec<u64>,
    bitmap: bool,
}

impl Coverage {
    /// Forgets the previous request (the bitmap keeps its capacity).
    pub(crate) fn reset(&mut self) {
        self.bitmap = false;
    }

    /// True while chunks have arrived in order, so that a chunk starting at
    /// `covered` continues the run.
    pub(crate) fn in_order(&self) -> bool {
        !self.bitmap
    }

    /// Records bytes `[start, end)` of a request of `length` bytes, of
    /// which the first `covered` arrived in order before; `end <= length`.
    /// Returns false, recording nothing, if any of them arrived already.
    pub(crate) fn add(&mut self, start: u64, end: u64, covered: u64, length: u64) -> bool {
        if start >= end {
            return true;
        }
        if !self.bitmap {
            let words = length.div_ceil(64) as usize;
            self.bits.clear();
            self.bits.resize(words, 0);
            set(&mut self.bits, 0, covered);
            self.bitmap = true;
        }
        if any(&self.bits, start, end) {
            return false;
        }
        set(&mut self.bits, start, end);
        true
    }
}

/// The mask of bits `[lo, hi]` (inclusive) of one word.
fn mask(lo: u64, hi: u64) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// Calls `f` with each word index of `[start, end)` and its mask.
fn for_words(start: u64, end: u64, mut f: impl FnMut(usize, u64) -> bool) -> bool {
    let (first, last) = (start / 64, (end - 1) / 64);
    for w in first..=last {
        let lo = if w == first { start % 64 } else { 0 };
        let hi = if w == last { (end - 1) % 64 } else { 63 };
        if f(w as usize, mask(lo, hi)) {
            return true;
        }
    }
    false
}

fn any(bits: &[u64], start: u64, end: u64) -> bool {
    for_words(start, end, |w, m| bits.get(w).is_some_and(|b| b & m != 0))
}

fn set(bits: &mut [u64], start: u64, end: u64) {
    if start >= end {
        return;
    }
    for_words(start, end, |w, m| {
        if let Some(b) = bits.get_mut(w) {
            *b |= m;
        }
        false
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_chunks_are_checked_for_overlap() {
        let mut c = Coverage::default();
        assert!(c.in_order());
        // 100 bytes arrived in order, then [200, 300), [100, 200), [150, 151).
        assert!(c.add(200, 300, 100, 1000));
        assert!(!c.in_order());
        assert!(c.add(100, 200, 100, 1000));
        assert!(!c.add(150, 151, 100, 1000), "overlap");
        assert!(!c.add(0, 1, 100, 1000), "the in-order run counts");
        assert!(c.add(999, 1000, 100, 1000));
        assert!(!c.add(990, 1000, 100, 1000));
        c.reset();
        assert!(c.in_order());
        assert!(c.add(0, 1000, 0, 1000), "a new request starts empty");
    }

    #[test]
    fn descending_one_byte_chunks_cost_linear_time() {
        let len = 1u64 << 20;
        let mut c = Coverage::default();
        for off in (0..len).rev() {
            assert!(c.add(off, off + 1, 0, len));
        }
        assert!(!c.add(len / 2, len / 2 + 1, 0, len));
        assert!(c.bits.iter().all(|&w| w == u64::MAX));
    }

    #[test]
    fn word_edges() {
        for (s, e) in [(0, 64), (63, 65), (64, 128), (1, 127), (5, 6)] {
            let mut c = Coverage::default();
            assert!(c.add(s, e, 0, 200));
            assert!(!c.add(s, s + 1, 0, 200));
            assert!(!c.add(e - 1, e, 0, 200));
            if s > 0 {
                assert!(c.add(s - 1, s, 0, 200));
            }
            assert!(c.add(e, e + 1, 0, 200));
        }
    }
}
