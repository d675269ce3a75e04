//! Reply slots: how a command's outcome travels from the connection task
//! back to the call that awaits it, without an allocation per call.
//!
//! A [`Slot`] is a small mutex-protected cell with a waker. Calls take one
//! from the client's [`SlotPool`], hand the task a [`Reply`] (a second
//! reference to the same slot) and wait on the slot. The task fills it
//! once ([`Reply::send`]) or drops the `Reply` unsent (the slot then reads
//! as closed). A call that got its outcome puts the slot back in the pool;
//! a call dropped early marks the slot abandoned (which the task sees
//! through [`Reply::is_closed`]) and leaves it to be freed with the last
//! reference, so a slot is reused only once nobody else can touch it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use nbd_driver::Completion;

use tokio::sync::mpsc;

use crate::error::Result;
use crate::task::Ctl;

#[derive(Debug, Default)]
struct State {
    value: Option<Result<Completion>>,
    waker: Option<Waker>,
    /// The call stopped waiting (its future was dropped).
    abandoned: bool,
    /// The task dropped its `Reply` without sending.
    closed: bool,
}

/// One reply cell.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: Mutex<State>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Slots that finished a call, kept for the next ones.
#[derive(Debug)]
pub(crate) struct SlotPool {
    free: Mutex<Vec<Arc<Slot>>>,
    cap: usize,
}

impl SlotPool {
    pub(crate) fn new(cap: usize) -> SlotPool {
        SlotPool {
            free: Mutex::new(Vec::with_capacity(cap)),
            cap,
        }
    }

    fn take(&self) -> Arc<Slot> {
        let slot = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        slot.unwrap_or_default()
    }

    fn put(&self, slot: Arc<Slot>) {
        *slot.lock() = State::default();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.cap {
            free.push(slot);
        }
    }
}

/// The task's end of a slot: send the outcome once, or drop it unsent.
#[derive(Debug)]
pub(crate) struct Reply {
    slot: Option<Arc<Slot>>,
}

impl Reply {
    /// True once the call stopped waiting: its command is to be cancelled.
    pub(crate) fn is_closed(&self) -> bool {
        self.slot.as_ref().is_none_or(|s| s.lock().abandoned)
    }

    /// Delivers the outcome and wakes the call; false (the outcome, with
    /// any buffer, is dropped) if the call stopped waiting.
    pub(crate) fn send(mut self, value: Result<Completion>) -> bool {
        let Some(slot) = self.slot.take() else {
            return false;
        };
        let waker = {
            let mut s = slot.lock();
            if s.abandoned {
                return false;
            }
            s.value = Some(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let waker = {
                let mut s = slot.lock();
                s.closed = true;
                s.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// The call's end of a slot: a future of the outcome (`None`: the task
/// dropped the reply unsent). Dropping it before the outcome abandons the
/// slot and asks the task to cancel the command.
#[derive(Debug)]
pub(crate) struct Waiting<'a> {
    pool: &'a SlotPool,
    ctl: &'a mpsc::UnboundedSender<Ctl>,
    slot: Option<Arc<Slot>>,
}

impl<'a> Waiting<'a> {
    /// A fresh slot from `pool`, and the `Reply` for the task; `ctl`
    /// tells the task when the call is dropped early.
    pub(crate) fn new(
        pool: &'a SlotPool,
        ctl: &'a mpsc::UnboundedSender<Ctl>,
    ) -> (Waiting<'a>, Reply) {
        let slot = pool.take();
        let reply = Reply {
            slot: Some(slot.clone()),
        };
        (
            Waiting {
                pool,
                ctl,
                slot: Some(slot),
            },
            reply,
        )
    }
}

impl Future for Waiting<'_> {
    type Output = Option<Result<Completion>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(slot) = this.slot.as_ref() else {
            return Poll::Ready(None);
        };
        let out = {
            let mut s = slot.lock();
            if let Some(v) = s.value.take() {
                Some(v)
            } else if s.closed {
                None
            } else {
                match &s.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => s.waker = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
        };
        if let Some(slot) = this.slot.take() {
            this.pool.put(slot);
        }
        Poll::Ready(out)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let mut s = slot.lock();
            s.abandoned = true;
            s.waker = None;
            // A completion that arrived meanwhile is freed here.
            s.value = None;
            drop(s);
            // Then the task cancels the command in the core.
            let _ = self.ctl.send(Ctl::Sweep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done() -> Result<Completion> {
        Err(crate::Error::TaskGone)
    }

    fn poll_once(w: &mut Waiting<'_>) -> Poll<Option<Result<Completion>>> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(w).poll(&mut cx)
    }

    #[test]
    fn a_sent_outcome_arrives_and_the_slot_goes_back_to_the_pool() {
        let pool = SlotPool::new(4);
        let (ctl, _rx) = mpsc::unbounded_channel();
        let (mut w, reply) = Waiting::new(&pool, &ctl);
        assert!(poll_once(&mut w).is_pending());
        assert!(!reply.is_closed());
        assert!(reply.send(done()));
        assert!(matches!(poll_once(&mut w), Poll::Ready(Some(Err(_)))));
        drop(w);
        assert_eq!(pool.free.lock().unwrap().len(), 1, "reused");
        // The next call gets the same slot, reset.
        let (mut w, reply) = Waiting::new(&pool, &ctl);
        assert!(pool.free.lock().unwrap().is_empty());
        assert!(poll_once(&mut w).is_pending());
        drop(reply); // the task gave up without an answer
        assert!(matches!(poll_once(&mut w), Poll::Ready(None)));
    }

    #[test]
    fn a_dropped_call_abandons_its_slot_and_asks_for_a_sweep() {
        let pool = SlotPool::new(4);
        let (ctl, mut rx) = mpsc::unbounded_channel();
        let (w, reply) = Waiting::new(&pool, &ctl);
        drop(w);
        assert!(reply.is_closed());
        assert!(matches!(rx.try_recv(), Ok(Ctl::Sweep)));
        assert!(!reply.send(done()), "nobody waits");
        assert!(pool.free.lock().unwrap().is_empty(), "never reused");
    }
}
