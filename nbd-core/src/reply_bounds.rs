//! Bounds on what one reply can make the client do, beyond what the
//! request itself bounds (see [`crate::Limits::max_error_chunks`] and
//! [`crate::Limits::max_extent_bytes`]).
//!
//! The chunks of one structured reply (doc/proto.md, section "Structured
//! reply chunk message") end with the one that carries
//! `NBD_REPLY_FLAG_DONE`. Content chunks of a read are bounded by its
//! length (each covers at least one byte, and none may overlap another),
//! block status chunks by the contexts negotiated (one each), and
//! `NBD_REPLY_TYPE_NONE` is always the last. Only error chunks have no
//! natural bound, so they are counted per request.

use crate::config::Limits;
use crate::error::ProtocolError;
use crate::event::Extent;

/// Counts one more error chunk for the request with `cookie`, of which
/// `*seen` arrived before; fails once past `limit`.
pub(crate) fn count_error_chunk(
    seen: &mut u32,
    limit: u32,
    cookie: u64,
) -> Result<(), ProtocolError> {
    let count = u64::from(*seen) + 1;
    if count > u64::from(limit) {
        return Err(ProtocolError::TooManyErrorChunks {
            cookie,
            count,
            limit,
        });
    }
    *seen = seen.saturating_add(1);
    Ok(())
}

/// Most extents one block status chunk may carry under `limits`.
pub(crate) fn max_extents(limits: &Limits) -> usize {
    let n = limits.max_extent_bytes / std::mem::size_of::<Extent>() as u64;
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_th_error_chunk_is_accepted_and_the_next_refused() {
        let mut seen = 0;
        for _ in 0..3 {
            count_error_chunk(&mut seen, 3, 9).expect("within the limit");
        }
        assert_eq!(
            count_error_chunk(&mut seen, 3, 9),
            Err(ProtocolError::TooManyErrorChunks {
                cookie: 9,
                count: 4,
                limit: 3
            })
        );
    }

    #[test]
    fn the_default_extent_memory_takes_a_payload_of_2_pow_25_bytes() {
        // Narrow descriptors: 8 bytes each after a 4-byte head.
        assert!(max_extents(&Limits::default()) as u64 >= ((1 << 25) - 4) / 8);
    }
}
