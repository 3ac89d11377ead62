//! The reactor set end to end: real pinned executors on two cores.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reactor::{CancelToken, CoreId, CoreSet, PollMode, PollStatus, Runtime, RuntimeConfig};

fn two_cores() -> CoreSet {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    CoreSet::from_ids(0..(n.min(2) as u32)).unwrap()
}

fn other_core() -> CoreId {
    *reactor::cores().last().unwrap()
}

/// Runs `body` on the main reactor of a fresh reactor set, then shuts down.
fn run<F, Fut>(mode: PollMode, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let cfg = RuntimeConfig::new(two_cores()).poll_mode(mode);
    let rt = Runtime::start(cfg, move || async move {
        body().await;
        reactor::shutdown(0);
    })
    .unwrap();
    assert_eq!(rt.join(), 0);
}

#[test]
fn call_runs_on_the_target_core_and_returns_its_result() {
    run(PollMode::Adaptive, || async {
        let main = reactor::current_core();
        assert!(reactor::is_main_core());
        let target = other_core();
        let (core, value) = reactor::call(target, || (reactor::current_core(), 41 + 1))
            .await
            .unwrap();
        assert_eq!(core, target);
        assert_eq!(value, 42);
        assert_eq!(reactor::current_core(), main);
        let seen = reactor::for_each_core(reactor::current_core).await;
        assert_eq!(seen, reactor::cores());
        // A core with no reactor is an error, not a hang.
        assert!(reactor::call(CoreId(1000), || ()).await.is_err());
    });
}

#[test]
fn every_message_posted_before_shutdown_runs() {
    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = ran.clone();
    run(PollMode::Adaptive, move || async move {
        let target = other_core();
        for _ in 0..10_000 {
            let ran = ran2.clone();
            reactor::send(target, move || {
                ran.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    assert_eq!(ran.load(Ordering::Relaxed), 10_000);
}

#[test]
fn adaptive_reactor_parks_when_idle_and_wakes_for_messages() {
    run(PollMode::Adaptive, || async {
        let target = other_core();
        reactor::sleep(Duration::from_millis(50)).await;
        let before = reactor::call(target, reactor::stats).await.unwrap();
        reactor::sleep(Duration::from_millis(50)).await;
        // Parked: a message still gets through, promptly.
        let t = Instant::now();
        let after = reactor::call(target, reactor::stats).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
        assert!(after.parks > 0, "never parked");
        // Of the 50 ms idle, nearly all was spent parked, not spinning
        // (a wake costs one spin window before it parks again).
        let parked = reactor::ticks::to_duration(after.parked_ticks - before.parked_ticks);
        assert!(
            parked >= Duration::from_millis(40),
            "parked only {parked:?} of 50 ms idle ({} iterations)",
            after.iterations - before.iterations
        );
    });
}

#[test]
fn busy_reactor_never_parks_and_mode_switches_at_run_time() {
    run(PollMode::Busy, || async {
        let target = other_core();
        reactor::sleep(Duration::from_millis(20)).await;
        let s = reactor::call(target, reactor::stats).await.unwrap();
        assert_eq!(s.mode, PollMode::Busy);
        assert_eq!(s.parks, 0);
        reactor::call(target, || reactor::set_poll_mode(PollMode::Adaptive))
            .await
            .unwrap();
        reactor::sleep(Duration::from_millis(20)).await;
        let s = reactor::call(target, reactor::stats).await.unwrap();
        assert_eq!(s.mode, PollMode::Adaptive);
        assert!(s.parks > 0);
    });
}

#[test]
fn timed_and_on_demand_pollers_fire_while_parked() {
    run(PollMode::Adaptive, || async {
        let fired = Rc::new(Cell::new(0u32));
        let f2 = fired.clone();
        let timed = reactor::register_timed_poller("tick", Duration::from_millis(5), move || {
            f2.set(f2.get() + 1);
            PollStatus::Idle
        });
        let at = Rc::new(Cell::new(None::<Instant>));
        let at2 = at.clone();
        let once = reactor::register_on_demand_poller("once", move || {
            at2.set(Some(Instant::now()));
            PollStatus::Busy
        });
        let armed = Instant::now();
        once.wake_after(Duration::from_millis(30));
        reactor::sleep(Duration::from_millis(60)).await;
        let n = fired.get();
        assert!((6..=13).contains(&n), "timed poller ran {n} times in 60 ms");
        let fired_after = at.get().expect("on-demand poller never ran") - armed;
        assert!(
            fired_after >= Duration::from_millis(30) && fired_after < Duration::from_millis(40),
            "{fired_after:?}"
        );
        assert_eq!(once.run_count(), 1);
        drop(timed);
        let n = fired.get();
        reactor::sleep(Duration::from_millis(20)).await;
        assert_eq!(fired.get(), n, "unregistered poller still runs");
    });
}

#[test]
fn a_poller_may_unregister_itself() {
    run(PollMode::Adaptive, || async {
        let slot: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::new(Cell::new(None));
        let slot2 = slot.clone();
        let runs = Rc::new(Cell::new(0));
        let runs2 = runs.clone();
        let h = reactor::register_poller("self-remove", move || {
            runs2.set(runs2.get() + 1);
            drop(slot2.take());
            PollStatus::Busy
        });
        slot.set(Some(h));
        reactor::sleep(Duration::from_millis(10)).await;
        assert_eq!(runs.get(), 1);
    });
}

/// Work that holds a buffer across several polls per step: cancel must not
/// resolve while a step is in progress or the buffer is held.
#[test]
fn cancel_resolves_only_after_the_work_reaches_a_safe_point() {
    const POLLS_PER_STEP: u32 = 3;
    run(PollMode::Adaptive, || async {
        let target = other_core();
        for round in 0..200u64 {
            let token = CancelToken::new();
            let mid_step = Arc::new(AtomicBool::new(false));
            let buffers_held = Arc::new(AtomicU64::new(0));
            let steps = Arc::new(AtomicU64::new(0));
            let (t, m, b, s) = (
                token.clone(),
                mid_step.clone(),
                buffers_held.clone(),
                steps.clone(),
            );
            reactor::call(target, move || {
                let guard = Rc::new(Cell::new(Some(t.begin().unwrap())));
                b.fetch_add(1, Ordering::SeqCst); // the work's buffer
                let phase = Cell::new(0u32);
                let handle: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::new(Cell::new(None));
                let h2 = handle.clone();
                let p = reactor::register_poller("background-work", move || {
                    if phase.get() == 0 {
                        // Step boundary: the only place cancellation is honoured.
                        if t.is_cancelled() {
                            b.fetch_sub(1, Ordering::SeqCst);
                            drop(guard.take()); // safe point reached
                            drop(h2.take());
                            return PollStatus::Idle;
                        }
                        m.store(true, Ordering::SeqCst);
                    }
                    phase.set(phase.get() + 1);
                    if phase.get() == POLLS_PER_STEP {
                        phase.set(0);
                        m.store(false, Ordering::SeqCst);
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    PollStatus::Busy
                });
                handle.set(Some(p));
            })
            .await
            .unwrap();
            // Let it run a varying number of steps.
            while steps.load(Ordering::SeqCst) < round % 7 {
                reactor::sleep(Duration::from_micros(50)).await;
            }
            token.cancel().await;
            assert!(!mid_step.load(Ordering::SeqCst), "resolved mid-step");
            assert_eq!(
                buffers_held.load(Ordering::SeqCst),
                0,
                "resolved holding a buffer"
            );
            assert!(!token.is_running());
            assert!(token.begin().is_err(), "cancelled token accepted new work");
        }
        // Nothing running: resolves at once.
        CancelToken::new().cancel().await;
    });
}

#[test]
fn shutdown_hooks_run_before_reactors_stop() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    run(PollMode::Adaptive, move || async move {
        let (a, b) = (o.clone(), o.clone());
        reactor::on_shutdown(move || async move { a.lock().unwrap().push("first-registered") });
        reactor::on_shutdown(move || async move {
            // Other reactors still answer while hooks run.
            let core = reactor::call(other_core(), reactor::current_core).await;
            assert!(core.is_ok());
            b.lock().unwrap().push("second-registered")
        });
    });
    assert_eq!(
        *order.lock().unwrap(),
        vec!["second-registered", "first-registered"]
    );
}

#[test]
fn shutdown_from_a_foreign_thread_returns_its_code() {
    let cfg = RuntimeConfig::new(two_cores());
    let rt = Runtime::start(cfg, || async {}).unwrap();
    let h = rt.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        h.shutdown(3);
        h.shutdown(4); // the first code wins
    });
    assert_eq!(rt.join(), 3);
}

#[test]
fn unavailable_core_is_refused() {
    let cfg = RuntimeConfig::new(CoreSet::from_ids([1000]).unwrap());
    assert!(Runtime::start(cfg, || async {}).is_err());
}

/// Foreign threads posting to a reactor that parks between messages always
/// get through (this hung with upstream glommio 0.9.0 under CPU contention:
/// vendor/glommio/PATCHED.md). A hog thread per core makes the reactors get
/// descheduled mid-iteration, as on a busy machine.
#[test]
fn foreign_posts_to_a_parking_reactor_are_never_lost() {
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let rt = Runtime::start(RuntimeConfig::new(two_cores()), || async {}).unwrap();
    let h = rt.handle();
    let posters: Vec<_> = (0..3)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                let target = h.cores().cores()[t % h.cores().cores().len()];
                for i in 0..1500u64 {
                    let (tx, rx) = std::sync::mpsc::channel();
                    h.send(target, move || {
                        reactor::spawn_local(async move {
                            let _ = tx.send(());
                        })
                    });
                    rx.recv_timeout(Duration::from_secs(10))
                        .unwrap_or_else(|_| panic!("poster {t}: message {i} never ran"));
                    std::thread::sleep(Duration::from_micros(i * 37 % 400));
                }
            })
        })
        .collect();
    for p in posters {
        p.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for hog in hogs {
        hog.join().unwrap();
    }
    h.shutdown(0);
    assert_eq!(rt.join(), 0);
}
