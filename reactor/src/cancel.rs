//! Cancellation of long background work (checksums, rebuilds, inflation).
//!
//! The work holds a [`WorkGuard`] for as long as it holds anything that a
//! canceller must see released (buffers, channels, a claim). It checks
//! [`CancelToken::is_cancelled`] between bounded steps, and on seeing it,
//! releases what it holds and drops the guard. [`CancelToken::cancel`]
//! resolves only once every guard is gone, so a caller that awaits it may
//! then delete the object the work was reading.
//!
//! Invariant: `cancel().await` never resolves while a guard is alive, and
//! once cancelled a token refuses new work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::event::{completion, CompletionSender};

#[derive(Default)]
struct CancelState {
    active: u32,
    waiters: Vec<CompletionSender<()>>,
}

struct CancelInner {
    cancelled: AtomicBool,
    state: Mutex<CancelState>,
}

/// Cheap to clone and `Send`: give one clone to the work, keep another.
#[derive(Clone)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

/// Held by running work; dropping it reports that the work reached a safe
/// point and released what it held.
pub struct WorkGuard {
    inner: Arc<CancelInner>,
}

/// The token was already cancelled when work tried to start under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken::new()
    }
}

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken {
            inner: Arc::new(CancelInner {
                cancelled: AtomicBool::new(false),
                state: Mutex::new(CancelState::default()),
            }),
        }
    }

    /// Checked by the work between steps.
    #[inline]
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Registers running work. Fails once cancelled, so no new work starts
    /// after a cancel.
    pub fn begin(&self) -> Result<WorkGuard, Cancelled> {
        let mut s = self.lock();
        if self.is_cancelled() {
            return Err(Cancelled);
        }
        s.active += 1;
        Ok(WorkGuard {
            inner: self.inner.clone(),
        })
    }

    /// Whether any work is registered under this token.
    pub fn is_running(&self) -> bool {
        self.lock().active > 0
    }

    /// Requests cancellation and waits until all work under this token has
    /// stopped at a safe point. Resolves at once if none is running.
    pub async fn cancel(&self) {
        let waiter = {
            let mut s = self.lock();
            self.inner.cancelled.store(true, Ordering::Release);
            if s.active == 0 {
                return;
            }
            let (tx, rx) = completion();
            s.waiters.push(tx);
            rx
        };
        let _ = waiter.await;
    }

    /// Waits until no work is running, without cancelling.
    pub async fn stopped(&self) {
        let waiter = {
            let mut s = self.lock();
            if s.active == 0 {
                return;
            }
            let (tx, rx) = completion();
            s.waiters.push(tx);
            rx
        };
        let _ = waiter.await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        // A panic while holding this lock aborts the process (see the
        // binary's panic hook), so poisoning cannot be observed in practice.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        let waiters = {
            let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            s.active -= 1;
            if s.active > 0 {
                return;
            }
            std::mem::take(&mut s.waiters)
        };
        for w in waiters {
            w.complete(());
        }
    }
}
