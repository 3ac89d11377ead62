//! Delay bdev latency through the real binary: reads take the configured
//! average (within 10%), and I/O to another bdev on the same reactor is not
//! held up meanwhile. Runs alone in its binary so timing is not disturbed
//! by other targets.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::Target;
use serde_json::json;

#[test]
fn delayed_reads_take_the_configured_latency_and_hold_up_nothing_else() {
    let t = Arc::new(Target::start());
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 2048, "block_size": 512}),
    );
    t.ok(
        "bdev_malloc_create",
        json!({"name": "Fast", "num_blocks": 2048, "block_size": 512}),
    );
    const AVG_US: u64 = 20_000;
    t.ok(
        "bdev_delay_create",
        json!({"name": "D0", "base_bdev_name": "M0",
        "avg_read_latency": AVG_US, "p99_read_latency": AVG_US,
        "avg_write_latency": 1000, "p99_write_latency": 1000}),
    );
    let read = |c: &mut common::Client, name: &str| {
        c.call(
            "bdev_read",
            json!({"name": name, "offset_blocks": 0, "num_blocks": 1}),
        )
        .unwrap();
    };
    let mut c = t.client();
    // Baseline: the RPC round trip itself, through a bdev with no delay.
    let n = 20;
    let start = Instant::now();
    for _ in 0..n {
        read(&mut c, "Fast");
    }
    let rpc_us = start.elapsed().as_micros() as f64 / n as f64;
    let start = Instant::now();
    for _ in 0..n {
        read(&mut c, "D0");
    }
    let delayed_us = start.elapsed().as_micros() as f64 / n as f64 - rpc_us;
    eprintln!("delay read: {delayed_us:.0} us measured vs {AVG_US} us configured (RPC overhead {rpc_us:.0} us)");
    let err = (delayed_us - AVG_US as f64).abs() / AVG_US as f64;
    assert!(
        err < 0.10,
        "measured {delayed_us:.0} us, configured {AVG_US} us"
    );

    // Slow reads keep the delay bdev busy; a second client's reads of
    // another bdev on the same (main) reactor still complete fast.
    t.ok(
        "bdev_delay_update_latency",
        json!({"delay_bdev_name": "D0", "latency_type": "avg_read", "latency_us": 500_000}),
    );
    t.ok(
        "bdev_delay_update_latency",
        json!({"delay_bdev_name": "D0", "latency_type": "p99_read", "latency_us": 500_000}),
    );
    let slow = {
        let t = t.clone();
        thread::spawn(move || {
            let mut c = t.client();
            let s = Instant::now();
            c.call(
                "bdev_read",
                json!({"name": "D0", "offset_blocks": 0, "num_blocks": 1}),
            )
            .unwrap();
            s.elapsed()
        })
    };
    thread::sleep(Duration::from_millis(50));
    let mut fast = t.client();
    let s = Instant::now();
    for _ in 0..50 {
        read(&mut fast, "Fast");
    }
    let fast_total = s.elapsed();
    let slow_took = slow.join().unwrap();
    assert!(slow_took >= Duration::from_millis(500), "{slow_took:?}");
    assert!(
        fast_total < Duration::from_millis(250),
        "50 reads of another bdev took {fast_total:?} while a delayed read was outstanding"
    );
}
