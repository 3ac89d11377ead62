//! The reactors themselves: one pinned glommio executor per core, each
//! running the poll loop, and the process-wide set that starts and stops
//! them.
//!
//! The poll loop is a single glommio task per core that calls pollers
//! directly (no task switch per poller or per I/O), drains the core's
//! mailbox of cross-core messages, and runs due timed pollers. Between
//! batches of iterations it yields so other glommio tasks on the core (RPC
//! handlers, control-plane futures) run.
//!
//! Poll modes (SPEC §6): in `busy` mode the loop never parks. In `adaptive`
//! mode it parks once no poller has found work for [`SPIN_WINDOW`] and
//! nothing holds it awake ([`SpinHold`]); it then sleeps in glommio until a
//! local wake, a cross-core message (the sender wakes the loop task from its
//! own thread), or the earliest poller deadline.
//!
//! Invariants: every cross-core message posted before a reactor stops is run
//! by it; a parked reactor is woken by anything that gives it work.

use std::cell::{Cell, OnceCell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use crossbeam_queue::SegQueue;
use glommio::{LocalExecutorBuilder, Placement};

use crate::cores::{CoreId, CoreSet};
use crate::poller::{PollStatus, PollerHandle, PollerKind, PollerSet, PollerStats};
use crate::ticks;

/// A closure run on another reactor.
pub(crate) type Message = Box<dyn FnOnce() + Send>;

/// Iterations between yields to other glommio tasks: bounds how long an RPC
/// handler waits behind a busy loop, while keeping the yield off the
/// per-I/O cost.
const ITERATIONS_PER_YIELD: u32 = 64;

/// Messages run per iteration at most, so a flood cannot starve pollers.
const MESSAGES_PER_ITERATION: usize = 256;

/// How long an adaptive reactor keeps spinning after its last useful work.
/// Long enough to cover a network round trip at queue depth 1 (so adaptive
/// latency matches busy), short enough that an idle target is at ~0% CPU.
pub const SPIN_WINDOW: Duration = Duration::from_micros(200);

/// glommio's preemption period: how often glommio-managed I/O (the RPC
/// socket, glommio timers) is serviced while the loop is busy.
const PREEMPT_PERIOD: Duration = Duration::from_millis(1);

/// Registered I/O memory per executor. Small: the data path does not use
/// glommio's buffers, and the memlock limit may be 8 MiB for the process.
const GLOMMIO_IO_MEMORY_BYTES: usize = 512 * 1024;

/// Upper bound on iterations spent draining at stop.
const STOP_DRAIN_ITERATIONS: u32 = 100_000;

/// How a reactor waits for work (SPEC §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Spin while there is work, park when idle. The default.
    Adaptive,
    /// Always spin: for dedicated cores.
    Busy,
}

impl PollMode {
    pub fn parse(s: &str) -> Option<PollMode> {
        match s {
            "adaptive" => Some(PollMode::Adaptive),
            "busy" => Some(PollMode::Busy),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            PollMode::Adaptive => "adaptive",
            PollMode::Busy => "busy",
        }
    }
}

/// Start-up configuration of the reactor set.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub cores: CoreSet,
    pub poll_mode: PollMode,
    /// Thread name prefix (`reactor_<core>`).
    pub name: String,
}

impl RuntimeConfig {
    pub fn new(cores: CoreSet) -> RuntimeConfig {
        RuntimeConfig {
            cores,
            poll_mode: PollMode::Adaptive,
            name: "reactor".to_string(),
        }
    }

    pub fn poll_mode(mut self, mode: PollMode) -> RuntimeConfig {
        self.poll_mode = mode;
        self
    }
}

/// The part of a reactor other threads may touch.
pub(crate) struct ReactorShared {
    pub(crate) core: CoreId,
    mailbox: SegQueue<Message>,
    /// The loop intends to park (or has): senders must wake it.
    parked: AtomicBool,
    /// The loop task's waker while parked; woken from any thread (glommio
    /// supports foreign wakes).
    waker: Mutex<Option<Waker>>,
    /// Loop iterations, read by the stall watchdog.
    heartbeat: std::sync::atomic::AtomicU64,
}

impl ReactorShared {
    pub(crate) fn post(&self, msg: Message) {
        self.mailbox.push(msg);
        // Pairs with the fence in `Reactor::park`: either the loop sees the
        // message before parking or we see `parked`.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    fn wake(&self) {
        let waker = self.waker.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Process-wide state of one reactor set.
pub(crate) struct RuntimeShared {
    pub(crate) cores: CoreSet,
    pub(crate) reactors: Vec<Arc<ReactorShared>>,
    exit_code: AtomicI32,
    shutdown_requested: AtomicBool,
    initial_mode: PollMode,
}

impl RuntimeShared {
    pub(crate) fn reactor(&self, core: CoreId) -> Option<&Arc<ReactorShared>> {
        self.cores
            .cores()
            .binary_search(&core)
            .ok()
            .map(|i| &self.reactors[i])
    }

    pub(crate) fn main_core(&self) -> CoreId {
        self.cores.main_core()
    }

    /// A reactor died (panicked): stop every other reactor at once, without
    /// shutdown hooks, so the process ends instead of wedging.
    fn abort(&self) {
        self.exit_code.store(101, Ordering::SeqCst);
        self.shutdown_requested.store(true, Ordering::SeqCst);
        for r in &self.reactors {
            r.post(Box::new(|| {
                try_with_current(|r| r.stop());
            }));
            r.wake();
        }
    }

    fn request_shutdown(self: &Arc<Self>, code: i32) {
        if self.shutdown_requested.swap(true, Ordering::SeqCst) {
            return;
        }
        self.exit_code.store(code, Ordering::SeqCst);
        if let Some(main) = self.reactor(self.main_core()) {
            main.post(Box::new(|| with_current(|r| r.begin_shutdown())));
        }
    }
}

type ShutdownHook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>>>;

/// Counters of one reactor's loop.
#[derive(Default)]
struct LoopCounters {
    busy_ticks: Cell<u64>,
    idle_ticks: Cell<u64>,
    parked_ticks: Cell<u64>,
    iterations: Cell<u64>,
    parks: Cell<u64>,
}

/// One core's reactor. Lives in a thread-local on its own thread.
pub struct Reactor {
    pub(crate) shared: Arc<ReactorShared>,
    pub(crate) runtime: Arc<RuntimeShared>,
    pollers: PollerSet,
    mode: Cell<PollMode>,
    /// Set by local wakes; consumed when the loop resumes.
    woken: Cell<bool>,
    /// The loop is (about to be) parked: local work must wake it.
    parked_local: Cell<bool>,
    stopping: Cell<bool>,
    stopped: Cell<bool>,
    spin_holds: Cell<u32>,
    counters: LoopCounters,
    shutdown_hooks: RefCell<Vec<ShutdownHook>>,
    shutdown_started: Cell<bool>,
    /// Run just before the loop parks (see [`crate::on_park`]).
    park_hooks: RefCell<Vec<Rc<dyn Fn()>>>,
}

thread_local! {
    static CURRENT: OnceCell<Rc<Reactor>> = const { OnceCell::new() };
}

/// Runs `f` with the current reactor. Panics off a reactor thread: every
/// caller is reactor code, so that is a programming error.
#[inline]
pub(crate) fn with_current<R>(f: impl FnOnce(&Rc<Reactor>) -> R) -> R {
    CURRENT.with(|c| match c.get() {
        Some(r) => f(r),
        None => panic!("not on a reactor thread"),
    })
}

#[inline]
pub(crate) fn try_with_current<R>(f: impl FnOnce(&Rc<Reactor>) -> R) -> Option<R> {
    CURRENT.with(|c| c.get().map(f))
}

impl Reactor {
    pub(crate) fn pollers(&self) -> &PollerSet {
        &self.pollers
    }

    pub fn core(&self) -> CoreId {
        self.shared.core
    }

    pub fn is_main(&self) -> bool {
        self.shared.core == self.runtime.main_core()
    }

    /// Wakes the loop if it is parked (cheap when it is not).
    #[inline]
    pub(crate) fn wake_loop(&self) {
        if self.parked_local.get() {
            self.woken.set(true);
            self.shared.wake();
        }
    }

    pub(crate) fn register(
        self: &Rc<Self>,
        name: String,
        kind: PollerKind,
        f: Box<dyn FnMut() -> PollStatus>,
    ) -> PollerHandle {
        let entry = self.pollers.register(name, kind, f);
        self.wake_loop();
        PollerHandle {
            entry,
            set: Rc::downgrade(self),
        }
    }

    pub(crate) fn mode(&self) -> PollMode {
        self.mode.get()
    }

    pub(crate) fn set_mode(&self, mode: PollMode) {
        self.mode.set(mode);
        self.woken.set(true);
        self.shared.wake();
    }

    pub(crate) fn hold_spin(&self) {
        self.spin_holds.set(self.spin_holds.get() + 1);
        self.wake_loop();
    }

    pub(crate) fn release_spin(&self) {
        self.spin_holds.set(self.spin_holds.get().saturating_sub(1));
    }

    pub(crate) fn add_park_hook(&self, hook: Rc<dyn Fn()>) {
        self.park_hooks.borrow_mut().push(hook);
    }

    pub(crate) fn add_shutdown_hook(&self, hook: ShutdownHook) {
        self.shutdown_hooks.borrow_mut().push(hook);
    }

    fn drain_mailbox(&self, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match self.shared.mailbox.pop() {
                Some(msg) => {
                    msg();
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// One pass over all work sources. Returns whether any found work.
    #[inline]
    fn iteration(&self, now: u64) -> bool {
        let mut busy = false;
        if !self.shared.mailbox.is_empty() {
            busy |= self.drain_mailbox(MESSAGES_PER_ITERATION) > 0;
        }
        busy |= self.pollers.run_ready();
        busy |= self.pollers.run_every_loop();
        busy |= self.pollers.run_due(now);
        self.pollers.compact();
        busy
    }

    fn may_park(&self) -> bool {
        self.mode.get() == PollMode::Adaptive
            && self.spin_holds.get() == 0
            && !self.pollers.has_ready()
            && !self.stopping.get()
    }

    async fn park(&self) {
        // Hooks arm their wake sources (a socket poll) before the loop's
        // state says parked; what they wake runs after this task yields.
        let hooks = self.park_hooks.borrow().clone();
        for h in hooks.iter() {
            h();
        }
        self.parked_local.set(true);
        self.shared.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.shared.mailbox.is_empty() || self.woken.get() || !self.may_park() {
            self.unpark();
            return;
        }
        let start = ticks::now();
        let mut timer = self.pollers.next_deadline().map(|deadline| {
            glommio::timer::Timer::new(ticks::to_duration(deadline.saturating_sub(start)))
        });
        std::future::poll_fn(|cx| {
            if self.woken.get() || !self.shared.mailbox.is_empty() {
                return Poll::Ready(());
            }
            if let Some(t) = timer.as_mut() {
                if Pin::new(t).poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            if let Ok(mut w) = self.shared.waker.lock() {
                *w = Some(cx.waker().clone());
            }
            // A sender may have posted between our check and storing the
            // waker; it saw `parked` and found no waker to wake.
            if !self.shared.mailbox.is_empty() {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        self.unpark();
        let parked = ticks::now().saturating_sub(start);
        self.counters
            .parked_ticks
            .set(self.counters.parked_ticks.get() + parked);
        self.counters
            .idle_ticks
            .set(self.counters.idle_ticks.get() + parked);
        self.counters.parks.set(self.counters.parks.get() + 1);
    }

    fn unpark(&self) {
        self.shared.parked.store(false, Ordering::SeqCst);
        self.parked_local.set(false);
        self.woken.set(false);
        if let Ok(mut w) = self.shared.waker.lock() {
            w.take();
        }
    }

    async fn run_loop(self: Rc<Self>) {
        let spin_window = ticks::from_duration(SPIN_WINDOW);
        let mut last_busy = ticks::now();
        loop {
            let mut park = false;
            // One clock read per iteration: each iteration's end is the
            // next one's start (the clock costs ~12 ns on some VMs).
            let mut start = ticks::now();
            for _ in 0..ITERATIONS_PER_YIELD {
                let busy = self.iteration(start);
                let end = ticks::now();
                let spent = end.saturating_sub(start);
                let c = &self.counters;
                c.iterations.set(c.iterations.get() + 1);
                self.shared
                    .heartbeat
                    .store(c.iterations.get(), Ordering::Relaxed);
                if busy {
                    c.busy_ticks.set(c.busy_ticks.get() + spent);
                    last_busy = end;
                } else {
                    c.idle_ticks.set(c.idle_ticks.get() + spent);
                    if end.saturating_sub(last_busy) > spin_window && self.may_park() {
                        park = true;
                        break;
                    }
                }
                start = end;
                if self.stopping.get() || glommio::executor().need_preempt() {
                    break;
                }
            }
            if self.stopping.get() {
                self.drain_for_stop();
                return;
            }
            if park {
                self.park().await;
            } else {
                // glommio looks at I/O only between task-queue runs; this
                // loop keeps its queue busy, so poll it here (socket
                // readiness, timers) rather than wait for the preempt tick.
                glommio::executor().poll_io();
                futures_lite::future::yield_now().await;
            }
        }
    }

    /// Runs messages and ready work until none is left, then drops every
    /// remaining poller.
    fn drain_for_stop(&self) {
        for _ in 0..STOP_DRAIN_ITERATIONS {
            let busy = (self.drain_mailbox(usize::MAX) > 0) | self.pollers.run_ready();
            self.pollers.compact();
            if !busy && self.shared.mailbox.is_empty() {
                break;
            }
        }
        let left = self.pollers.clear();
        if !left.is_empty() {
            log::debug!(
                "reactor {} stopped with pollers still registered: {:?}",
                self.core(),
                left
            );
        }
        self.stopped.set(true);
    }

    fn begin_shutdown(self: &Rc<Self>) {
        if self.shutdown_started.replace(true) {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let hooks: Vec<ShutdownHook> = me.shutdown_hooks.borrow_mut().drain(..).collect();
            for hook in hooks.into_iter().rev() {
                hook().await;
            }
            let main = me.core();
            for core in me.runtime.cores.cores().to_vec() {
                if core != main {
                    crate::call(core, || with_current(|r| r.stop())).await.ok();
                }
            }
            me.stop();
        })
        .detach();
    }

    fn stop(&self) {
        self.stopping.set(true);
        self.woken.set(true);
        self.shared.wake();
    }

    pub(crate) fn stats(&self) -> ReactorStats {
        let (active, timed, paused) = self.pollers.counts();
        ReactorStats {
            core: self.core(),
            mode: self.mode(),
            busy_ticks: self.counters.busy_ticks.get(),
            idle_ticks: self.counters.idle_ticks.get(),
            parked_ticks: self.counters.parked_ticks.get(),
            iterations: self.counters.iterations.get(),
            parks: self.counters.parks.get(),
            parked: self.parked_local.get(),
            active_pollers: active,
            timed_pollers: timed,
            paused_pollers: paused,
            pollers: self.pollers.stats(),
        }
    }
}

/// A snapshot of one reactor's counters.
#[derive(Clone, Debug)]
pub struct ReactorStats {
    pub core: CoreId,
    pub mode: PollMode,
    pub busy_ticks: u64,
    pub idle_ticks: u64,
    pub parked_ticks: u64,
    pub iterations: u64,
    pub parks: u64,
    /// Parked right now (SPDK: `in_interrupt`).
    pub parked: bool,
    pub active_pollers: usize,
    pub timed_pollers: usize,
    pub paused_pollers: usize,
    pub pollers: Vec<PollerStats>,
}

/// A running set of reactors.
pub struct Runtime {
    shared: Arc<RuntimeShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// A `Send` handle to a running set of reactors, for threads that are not
/// reactors (signal handling, tests).
#[derive(Clone)]
pub struct RuntimeHandle {
    pub(crate) shared: Arc<RuntimeShared>,
}

impl RuntimeHandle {
    /// Posts `f` to run on `core`. Returns false if `core` has no reactor.
    pub fn send(&self, core: CoreId, f: impl FnOnce() + Send + 'static) -> bool {
        match self.shared.reactor(core) {
            Some(r) => {
                r.post(Box::new(f));
                true
            }
            None => false,
        }
    }

    /// Starts an orderly shutdown: shutdown hooks run on the main reactor,
    /// then every reactor drains and stops. The first code given wins.
    pub fn shutdown(&self, code: i32) {
        self.shared.request_shutdown(code);
    }

    pub fn cores(&self) -> &CoreSet {
        &self.shared.cores
    }
}

impl Runtime {
    /// Starts one reactor per core of `config`, and runs `main` as a task on
    /// the main reactor.
    pub fn start<F, Fut>(config: RuntimeConfig, main: F) -> std::io::Result<Runtime>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let _ = ticks::tick_rate(); // calibrate before any reactor runs
        let reactors = config
            .cores
            .cores()
            .iter()
            .map(|&core| {
                Arc::new(ReactorShared {
                    core,
                    mailbox: SegQueue::new(),
                    parked: AtomicBool::new(false),
                    waker: Mutex::new(None),
                    heartbeat: std::sync::atomic::AtomicU64::new(0),
                })
            })
            .collect();
        let shared = Arc::new(RuntimeShared {
            cores: config.cores.clone(),
            reactors,
            exit_code: AtomicI32::new(0),
            shutdown_requested: AtomicBool::new(false),
            initial_mode: config.poll_mode,
        });
        let mut main = Some(main);
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        for (i, &core) in config.cores.cores().iter().enumerate() {
            let thread_shared = shared.clone();
            let main_fn = if i == 0 { main.take() } else { None };
            let ready_tx = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}_{}", config.name, core.0))
                .spawn(move || reactor_thread(thread_shared, i, main_fn, ready_tx));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.request_shutdown(1);
                    return Err(e);
                }
            }
        }
        drop(ready_tx);
        for _ in 0..threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // Stop the reactors that did start.
                    shared.request_shutdown(1);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
                Err(_) => break,
            }
        }
        // Diagnostic: FERROPLANE_REACTOR_WATCHDOG=1 reports a reactor whose
        // mailbox holds messages while its loop makes no progress (how the
        // glommio park-with-runnable-tasks hang was found).
        if std::env::var("FERROPLANE_REACTOR_WATCHDOG").is_ok() {
            let wd = shared.clone();
            std::thread::spawn(move || {
                let mut last = vec![(0u64, 0usize); wd.reactors.len()];
                loop {
                    std::thread::sleep(Duration::from_millis(500));
                    for (i, r) in wd.reactors.iter().enumerate() {
                        let hb = r.heartbeat.load(Ordering::Relaxed);
                        let len = r.mailbox.len();
                        if len > 0 && last[i].1 > 0 && hb == last[i].0 {
                            let w = r.waker.lock().map(|w| w.is_some()).unwrap_or(false);
                            log::error!(
                                "reactor {}: {len} messages waiting, no progress (parked {}, waker stored {w}, iterations {hb})",
                                r.core,
                                r.parked.load(Ordering::SeqCst)
                            );
                        }
                        last[i] = (hb, len);
                    }
                }
            });
        }
        Ok(Runtime { shared, threads })
    }

    pub fn handle(&self) -> RuntimeHandle {
        RuntimeHandle {
            shared: self.shared.clone(),
        }
    }

    /// Waits for every reactor to stop; returns the exit code given to
    /// shutdown.
    pub fn join(self) -> i32 {
        let mut panicked = false;
        for t in self.threads {
            panicked |= t.join().is_err();
        }
        if panicked {
            return 101;
        }
        self.shared.exit_code.load(Ordering::SeqCst)
    }
}

fn reactor_thread<F, Fut>(
    shared: Arc<RuntimeShared>,
    index: usize,
    main: Option<F>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let core = shared.cores.cores()[index];
    let executor = LocalExecutorBuilder::new(Placement::Fixed(core.0 as usize))
        .name(&format!("reactor_{}", core.0))
        .preempt_timer(PREEMPT_PERIOD)
        .io_memory(GLOMMIO_IO_MEMORY_BYTES)
        .make();
    let executor = match executor {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::other(format!(
                "cannot start reactor on core {core}: {e}"
            ))));
            return;
        }
    };
    let reactor = Rc::new(Reactor {
        shared: shared.reactors[index].clone(),
        runtime: shared.clone(),
        pollers: PollerSet::default(),
        mode: Cell::new(shared.initial_mode),
        woken: Cell::new(false),
        parked_local: Cell::new(false),
        stopping: Cell::new(false),
        stopped: Cell::new(false),
        spin_holds: Cell::new(0),
        counters: LoopCounters::default(),
        shutdown_hooks: RefCell::new(Vec::new()),
        shutdown_started: Cell::new(false),
        park_hooks: RefCell::new(Vec::new()),
    });
    CURRENT.with(|c| {
        let _ = c.set(reactor.clone());
    });
    struct AbortOnPanic(Arc<RuntimeShared>);
    impl Drop for AbortOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.abort();
            }
        }
    }
    let _abort_on_panic = AbortOnPanic(shared.clone());
    let _ = ready.send(Ok(()));
    drop(ready);
    executor.run(async move {
        if let Some(main) = main {
            glommio::spawn_local(main()).detach();
        }
        reactor.run_loop().await;
    });
}
