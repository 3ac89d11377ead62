//! Cross-core messages: `send` throughput from one reactor to another
//! (messages per second, batches of 1024 in flight) and `call` round-trip
//! latency, in both poll modes.
//!
//! `cargo bench --bench reactor_messages` (FP_BENCH_SECS shortens it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reactor::{CoreSet, PollMode, Runtime, RuntimeConfig};

fn secs() -> f64 {
    std::env::var("FP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0)
}

fn run(mode: PollMode) {
    let cores = CoreSet::parse_list("0,1").expect("two cores");
    let rt = Runtime::start(
        RuntimeConfig::new(cores).poll_mode(mode),
        move || async move {
            let target = reactor::cores()[1];
            let budget = Duration::from_secs_f64(secs());

            // Throughput: keep up to WINDOW messages in flight.
            const WINDOW: u64 = 1024;
            let done = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < budget {
                while sent - done.load(Ordering::Acquire) < WINDOW {
                    let d = done.clone();
                    reactor::send(target, move || {
                        d.fetch_add(1, Ordering::Release);
                    });
                    sent += 1;
                }
                futures_lite::future::yield_now().await;
            }
            while done.load(Ordering::Acquire) < sent {
                futures_lite::future::yield_now().await;
            }
            let rate = sent as f64 / start.elapsed().as_secs_f64();

            // Latency: one call at a time.
            let mut n = 0u64;
            let start = Instant::now();
            while start.elapsed() < budget {
                reactor::call(target, || ()).await.expect("call");
                n += 1;
            }
            let rtt_ns = start.elapsed().as_nanos() as f64 / n as f64;
            println!(
                "{:<9} send {:>6.2} M msg/s   call round trip {:>7.0} ns",
                mode.as_str(),
                rate / 1e6,
                rtt_ns
            );
            reactor::shutdown(0);
        },
    )
    .expect("runtime");
    assert_eq!(rt.join(), 0);
}

fn main() {
    run(PollMode::Busy);
    run(PollMode::Adaptive);
}
