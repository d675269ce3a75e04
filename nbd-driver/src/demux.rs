//! [`Demux`]: folds the events of one command (read chunks, block-status
//! extents, its completion) into one [`Completion`] per cookie, without
//! I/O, for adapters that hand out whole results (a blocking call that
//! waits for its cookie, a future that resolves once).

use std::collections::HashMap;

use bytes::BytesMut;
use nbd_core::{CommandError, Cookie, Event, Extent, ReadChunkKind};

/// A completed command: its outcome with everything the server sent for
/// it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion {
    /// Outcome.
    pub result: Result<(), CommandError>,
    /// The read buffer, handed back (reads only), filled on success.
    pub buffer: Option<BytesMut>,
    /// Block status answers: (context id, extents), in arrival order.
    pub extents: Vec<(u32, Vec<Extent>)>,
    /// Structured read chunks as (offset, length, kind), in arrival order,
    /// for reads submitted with chunk events
    /// (`Connection::read_with_chunks`).
    pub chunks: Vec<(u64, u64, ReadChunkKind)>,
}

#[derive(Debug, Default)]
struct Partial {
    extents: Vec<(u32, Vec<Extent>)>,
    chunks: Vec<(u64, u64, ReadChunkKind)>,
}

/// The per-cookie fold of command events.
///
/// Feed every event from `Connection::poll_event` to [`Demux::handle`]: the
/// events of commands are kept, everything else (negotiation results, the
/// close) comes back for the caller. Take finished commands with
/// [`Demux::take`] or [`Demux::take_any`]. Its tables are sized for the
/// in-flight limit up front, so steady-state use does not allocate (block
/// status and chunk reports own their vectors).
#[derive(Debug, Default)]
pub struct Demux {
    done: HashMap<Cookie, Completion>,
    partial: HashMap<Cookie, Partial>,
}

impl Demux {
    /// A demultiplexer with room for `in_flight` commands (the
    /// connection's `Limits::max_in_flight`). Call it with the connection.
    pub fn with_capacity(in_flight: usize) -> Demux {
        let n = in_flight.min(4096);
        Demux {
            done: HashMap::with_capacity(n),
            partial: HashMap::new(),
        }
    }

    /// Takes in one event. Command events (`ReadChunk`, `BlockStatus`,
    /// `CommandDone`) are folded in and `None` is returned; every other
    /// event is handed back for the caller to act on.
    pub fn handle(&mut self, ev: Event) -> Option<Event> {
        match ev {
            Event::ReadChunk {
                cookie,
                offset,
                length,
                kind,
            } => {
                self.partial
                    .entry(cookie)
                    .or_default()
                    .chunks
                    .push((offset, length, kind));
                None
            }
            Event::BlockStatus {
                cookie,
                context_id,
                extents,
            } => {
                self.partial
                    .entry(cookie)
                    .or_default()
                    .extents
                    .push((context_id, extents));
                None
            }
            Event::CommandDone {
                cookie,
                result,
                buffer,
            } => {
                let p = self.partial.remove(&cookie).unwrap_or_default();
                self.done.insert(
                    cookie,
                    Completion {
                        result,
                        buffer,
                        extents: p.extents,
                        chunks: p.chunks,
                    },
                );
                None
            }
            other => Some(other),
        }
    }

    /// True once `cookie` has completed and was not taken yet.
    pub fn is_done(&self, cookie: Cookie) -> bool {
        self.done.contains_key(&cookie)
    }

    /// Completed commands not taken yet.
    pub fn completed(&self) -> usize {
        self.done.len()
    }

    /// Takes the completion of `cookie`, if it has completed.
    pub fn take(&mut self, cookie: Cookie) -> Option<Completion> {
        self.done.remove(&cookie)
    }

    /// Takes any one completion (in no particular order).
    pub fn take_any(&mut self) -> Option<(Cookie, Completion)> {
        let k = *self.done.keys().next()?;
        self.done.remove(&k).map(|c| (k, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_extents_fold_into_one_completion() {
        let mut d = Demux::with_capacity(4);
        let c = Cookie(7);
        assert!(d
            .handle(Event::ReadChunk {
                cookie: c,
                offset: 0,
                length: 512,
                kind: ReadChunkKind::Hole,
            })
            .is_none());
        assert!(d
            .handle(Event::BlockStatus {
                cookie: c,
                context_id: 1,
                extents: Vec::new(),
            })
            .is_none());
        assert!(!d.is_done(c));
        assert!(d
            .handle(Event::CommandDone {
                cookie: c,
                result: Ok(()),
                buffer: None,
            })
            .is_none());
        let done = d.take(c).expect("completed");
        assert_eq!(done.chunks, vec![(0, 512, ReadChunkKind::Hole)]);
        assert_eq!(done.extents.len(), 1);
        assert!(d.take(c).is_none(), "taken once");
    }

    #[test]
    fn other_events_come_back() {
        let mut d = Demux::default();
        let ev = d.handle(Event::StartTls);
        assert!(matches!(ev, Some(Event::StartTls)));
        assert!(d.take_any().is_none());
    }
}
