//! [`Demux`]: folds the events of one command (block-status extents, its
//! completion) into one [`Completion`] per cookie, without I/O, for
//! adapters that hand out whole results (a blocking call that waits for
//! its cookie, a future that resolves once). Structured read chunks are
//! not kept: they come back to the caller as they arrive, to be handed to
//! a chunk callback (libnbd's `pread_structured` model), because a server
//! may split a read into one chunk per byte.

use std::collections::HashMap;

use bytes::BytesMut;
use nbd_core::{CommandError, Cookie, Event, Extent};

/// A completed command: its outcome with everything the server sent for
/// it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion {
    /// Outcome.
    pub result: Result<(), CommandError>,
    /// The read buffer, handed back (reads only), filled on success.
    pub buffer: Option<BytesMut>,
    /// Block status answers: (context id, extents), in arrival order: at
    /// most one per negotiated context (the core refuses a second), each
    /// within `Limits::max_extent_bytes`.
    pub extents: Vec<(u32, Vec<Extent>)>,
}

/// The per-cookie fold of command events.
///
/// Feed every event from `Connection::poll_event` to [`Demux::handle`]:
/// block status answers and completions are kept, everything else
/// (negotiation results, the close, and [`Event::ReadChunk`]) comes back
/// for the caller. Take finished commands with [`Demux::take`] or
/// [`Demux::take_any`].
///
/// # Memory
///
/// Per command in flight it keeps the block status answers (at most one
/// per negotiated context) and nothing else; per completed command not yet
/// taken, its [`Completion`]. Nothing is kept per read chunk, so a read
/// answered as one chunk per byte costs no more here than one answered in
/// one chunk. Its tables are sized for the in-flight limit up front, so
/// steady-state use does not allocate (block status answers own their
/// vectors).
#[derive(Debug, Default)]
pub struct Demux {
    done: HashMap<Cookie, Completion>,
    partial: HashMap<Cookie, Vec<(u32, Vec<Extent>)>>,
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

    /// Takes in one event: call it with every event the connection
    /// reports, in order. `BlockStatus` and `CommandDone` are folded in and
    /// `None` is returned; every other event, `ReadChunk` included, is
    /// handed back for the caller to act on (a read chunk at once, to the
    /// read's chunk callback, since it is not kept).
    pub fn handle(&mut self, ev: Event) -> Option<Event> {
        match ev {
            Event::BlockStatus {
                cookie,
                context_id,
                extents,
            } => {
                self.partial
                    .entry(cookie)
                    .or_default()
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
                        extents: p,
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

    use nbd_core::ReadChunkKind;

    #[test]
    fn extents_fold_into_one_completion_and_read_chunks_come_back() {
        let mut d = Demux::with_capacity(4);
        let c = Cookie(7);
        let back = d.handle(Event::ReadChunk {
            cookie: c,
            offset: 0,
            length: 512,
            kind: ReadChunkKind::Hole,
        });
        assert!(matches!(back, Some(Event::ReadChunk { length: 512, .. })));
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
