//! [`AsyncLock`]: mutual exclusion for async work on one reactor (a
//! control-path operation that awaits I/O while others of its kind wait),
//! granted in arrival order. Not for the I/O path.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::{Poll, Waker};

/// A mutual exclusion for async work on one reactor.
#[derive(Default)]
pub struct AsyncLock {
    locked: Cell<bool>,
    waiters: RefCell<VecDeque<Waker>>,
}

pub struct AsyncLockGuard<'a>(&'a AsyncLock);

impl AsyncLock {
    pub async fn lock(&self) -> AsyncLockGuard<'_> {
        std::future::poll_fn(|cx| {
            if self.locked.get() {
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            } else {
                self.locked.set(true);
                Poll::Ready(())
            }
        })
        .await;
        AsyncLockGuard(self)
    }
}

impl Drop for AsyncLockGuard<'_> {
    fn drop(&mut self) {
        self.0.locked.set(false);
        if let Some(w) = self.0.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }
}
