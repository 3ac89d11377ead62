//! Completion events: a one-shot value sent from any core (or any thread)
//! to a task waiting on a reactor. `call(core, f).await` is built on it.
//!
//! The receiver's waker is stored beside the value with the reactor it
//! waits on. A sender on another thread does not wake it directly (glommio
//! only looks at foreign wakes between task-queue runs, every preempt
//! period, so a busy reactor would see it up to ~1 ms late); it posts the
//! wake to the waiter's reactor mailbox, which every loop turn drains and
//! which wakes a parked reactor.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::cores::CoreId;
use crate::runtime::RuntimeHandle;

/// The sender went away without completing (its reactor stopped, or the
/// work was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the completion was abandoned")
    }
}

impl std::error::Error for Abandoned {}

struct Slot<T> {
    value: Option<T>,
    closed: bool,
    waker: Option<Waiter>,
}

/// The waiting task's waker and, when it waits on a reactor, which one.
struct Waiter {
    waker: Waker,
    reactor: Option<(RuntimeHandle, CoreId)>,
}

impl Waiter {
    fn wake(self) {
        match self.reactor {
            Some((handle, core)) if crate::try_current_core() != Some(core) => {
                let waker = self.waker.clone();
                if !handle.send(core, move || waker.wake()) {
                    self.waker.wake();
                }
            }
            _ => self.waker.wake(),
        }
    }
}

/// The sending half: `Send`, completes at most once.
pub struct CompletionSender<T> {
    slot: Option<Arc<Mutex<Slot<T>>>>,
}

/// The receiving half: a future of the value.
pub struct CompletionEvent<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

pub fn completion<T: Send>() -> (CompletionSender<T>, CompletionEvent<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        closed: false,
        waker: None,
    }));
    (
        CompletionSender {
            slot: Some(slot.clone()),
        },
        CompletionEvent { slot },
    )
}

impl<T> CompletionSender<T> {
    pub fn complete(mut self, value: T) {
        if let Some(slot) = self.slot.take() {
            finish(&slot, Some(value));
        }
    }
}

fn finish<T>(slot: &Mutex<Slot<T>>, value: Option<T>) {
    let waker = match slot.lock() {
        Ok(mut s) => {
            s.value = value;
            s.closed = true;
            s.waker.take()
        }
        Err(_) => None,
    };
    if let Some(w) = waker {
        w.wake();
    }
}

impl<T> Drop for CompletionSender<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            finish(&slot, None);
        }
    }
}

impl<T> Future for CompletionEvent<T> {
    type Output = Result<T, Abandoned>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = match self.slot.lock() {
            Ok(s) => s,
            Err(_) => return Poll::Ready(Err(Abandoned)),
        };
        if let Some(v) = s.value.take() {
            return Poll::Ready(Ok(v));
        }
        if s.closed {
            return Poll::Ready(Err(Abandoned));
        }
        let reactor = crate::try_current_core().map(|c| (crate::handle(), c));
        s.waker = Some(Waiter {
            waker: cx.waker().clone(),
            reactor,
        });
        Poll::Pending
    }
}

impl<T> CompletionEvent<T> {
    /// Whether the value (or abandonment) has arrived.
    pub fn is_complete(&self) -> bool {
        self.slot.lock().map(|s| s.closed).unwrap_or(true)
    }
}
