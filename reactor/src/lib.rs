//! Crate `reactor`: pinned thread-per-core reactors.
//!
//! One glommio executor per core of the core set, each running a poll loop
//! ([`runtime`]) over its pollers ([`poller`]) and its mailbox of cross-core
//! messages. The first core hosts the *main reactor*, which owns all
//! control-plane state. This crate knows nothing of storage.
//!
//! The free functions here act on the calling thread's reactor and panic
//! when called from a thread that is not one: all of their callers are
//! reactor code.

mod async_lock;
mod cancel;
pub mod cores;
pub mod event;
pub mod poller;
pub mod runtime;
pub mod ticks;

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

pub use async_lock::{AsyncLock, AsyncLockGuard};
pub use cancel::{CancelToken, Cancelled, WorkGuard};
pub use cores::{CoreId, CoreSet, CoreSetError};
pub use event::{completion, Abandoned, CompletionEvent, CompletionSender};
pub use poller::{PollStatus, PollerHandle, PollerStats};
pub use runtime::{PollMode, ReactorStats, Runtime, RuntimeConfig, RuntimeHandle, SPIN_WINDOW};

use poller::PollerKind;
use runtime::{try_with_current, with_current};

/// The core the calling reactor runs on.
pub fn current_core() -> CoreId {
    with_current(|r| r.core())
}

/// The calling thread's core, or `None` off a reactor thread.
pub fn try_current_core() -> Option<CoreId> {
    try_with_current(|r| r.core())
}

pub fn is_main_core() -> bool {
    with_current(|r| r.is_main())
}

pub fn main_core() -> CoreId {
    with_current(|r| r.runtime.main_core())
}

/// Every core of this reactor set, in order (the main core first).
pub fn cores() -> Vec<CoreId> {
    with_current(|r| r.runtime.cores.cores().to_vec())
}

pub fn core_set() -> CoreSet {
    with_current(|r| r.runtime.cores.clone())
}

/// A handle usable from any thread.
pub fn handle() -> RuntimeHandle {
    with_current(|r| RuntimeHandle {
        shared: r.runtime.clone(),
    })
}

/// Runs `f` on `core`'s reactor at its next iteration, even when `core` is
/// the current one. Returns false if no reactor runs on `core`.
pub fn send(core: CoreId, f: impl FnOnce() + Send + 'static) -> bool {
    with_current(|r| match r.runtime.reactor(core) {
        Some(target) => {
            target.post(Box::new(f));
            true
        }
        None => false,
    })
}

/// Runs `f` on `core` and returns its result. On the current core it runs
/// inline. Errs if `core` has no reactor or stopped before running `f`.
pub async fn call<R, F>(core: CoreId, f: F) -> Result<R, Abandoned>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    if try_current_core() == Some(core) {
        return Ok(f());
    }
    let (tx, rx) = completion();
    if !send(core, move || tx.complete(f())) {
        return Err(Abandoned);
    }
    rx.await
}

/// Starts the future made by `f` as a task on `core` and returns its output.
pub async fn call_async<R, F, Fut>(core: CoreId, f: F) -> Result<R, Abandoned>
where
    R: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
{
    if try_current_core() == Some(core) {
        return Ok(f().await);
    }
    let (tx, rx) = completion();
    let sent = send(core, move || {
        glommio::spawn_local(async move { tx.complete(f().await) }).detach();
    });
    if !sent {
        return Err(Abandoned);
    }
    rx.await
}

/// Runs `f` on every core in turn (SPDK's `for_each_channel`), collecting
/// the results in core order.
pub async fn for_each_core<R, F>(f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn() -> R + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let mut out = Vec::new();
    for core in cores() {
        let f = f.clone();
        if let Ok(r) = call(core, move || f()).await {
            out.push(r);
        }
    }
    out
}

/// Registers a poller run on every loop iteration of the current reactor.
pub fn register_poller(
    name: impl Into<String>,
    f: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    with_current(|r| r.register(name.into(), PollerKind::EveryLoop, Box::new(f)))
}

/// Registers a poller run once per `period`.
pub fn register_timed_poller(
    name: impl Into<String>,
    period: Duration,
    f: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    let period_ticks = ticks::from_duration(period).max(1);
    with_current(|r| r.register(name.into(), PollerKind::Timed { period_ticks }, Box::new(f)))
}

/// Registers a poller that runs only when woken through its handle.
pub fn register_on_demand_poller(
    name: impl Into<String>,
    f: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    with_current(|r| r.register(name.into(), PollerKind::OnDemand, Box::new(f)))
}

/// Wakes the current reactor's loop if it is parked. Work sources that do
/// not go through a poller handle (a queue a poller drains) call this.
#[inline]
pub fn wake_loop() {
    try_with_current(|r| r.wake_loop());
}

/// Registers `hook` to run on the current reactor each time its loop is
/// about to park (adaptive mode): the place to arm a wake source that
/// costs something to keep armed, such as an io_uring poll on sockets the
/// loop otherwise polls itself. A hook must not block.
pub fn on_park(hook: impl Fn() + 'static) {
    with_current(|r| r.add_park_hook(Rc::new(hook)));
}

/// Keeps the current reactor spinning while alive: for in-flight work whose
/// completion cannot wake a parked reactor (a private io_uring polled by a
/// poller).
pub struct SpinHold {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl SpinHold {
    pub fn new() -> SpinHold {
        with_current(|r| r.hold_spin());
        SpinHold {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Default for SpinHold {
    fn default() -> Self {
        SpinHold::new()
    }
}

impl Drop for SpinHold {
    fn drop(&mut self) {
        try_with_current(|r| r.release_spin());
    }
}

pub fn poll_mode() -> PollMode {
    with_current(|r| r.mode())
}

/// Sets the current reactor's poll mode.
pub fn set_poll_mode(mode: PollMode) {
    with_current(|r| r.set_mode(mode))
}

/// A snapshot of the current reactor's counters and pollers.
pub fn stats() -> ReactorStats {
    with_current(|r| r.stats())
}

/// Requests an orderly shutdown of the whole reactor set.
pub fn shutdown(code: i32) {
    handle().shutdown(code);
}

/// Adds a hook run on the main reactor at shutdown, before any reactor
/// stops; hooks run in reverse order of registration. Call on the main
/// reactor.
pub fn on_shutdown<F, Fut>(hook: F)
where
    F: FnOnce() -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    with_current(|r| {
        r.add_shutdown_hook(Box::new(move || Box::pin(hook())));
    })
}

/// Spawns a detached task on the current reactor.
pub fn spawn_local(fut: impl Future<Output = ()> + 'static) {
    glommio::spawn_local(fut).detach();
}

/// Spawns a task on the current reactor and returns its join handle.
pub fn spawn_local_joinable<T: 'static>(
    fut: impl Future<Output = T> + 'static,
) -> glommio::task::JoinHandle<T> {
    glommio::spawn_local(fut).detach()
}

/// Sleeps without blocking the reactor.
pub async fn sleep(d: Duration) {
    glommio::timer::sleep(d).await;
}
