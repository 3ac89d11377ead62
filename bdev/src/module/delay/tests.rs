use std::time::{Duration, Instant};

use super::rpc::create;
use super::{DelayBdev, DelayOptions, LatencyKind};
use crate::registry;
use crate::testutil::{malloc, run};

fn opts(name: &str, base: &str, read_us: u64, write_us: u64) -> DelayOptions {
    DelayOptions {
        name: name.into(),
        base_bdev_name: base.into(),
        uuid: None,
        avg_read_latency: read_us,
        p99_read_latency: read_us,
        avg_write_latency: write_us,
        p99_write_latency: write_us,
        hold_writes: false,
    }
}

#[test]
fn reads_take_the_configured_latency_without_holding_up_other_io() {
    run(|| async {
        malloc("Base", 64, 512).await;
        malloc("Fast", 64, 512).await;
        create(opts("D0", "Base", 20_000, 5_000)).await.unwrap();
        let d = registry::open("D0", true, None).unwrap();
        d.channel().write(0, &[7u8; 512]).await.unwrap();
        // Sequential reads at QD1: each within 10% of 20 ms.
        for _ in 0..5 {
            let t = Instant::now();
            let data = d.channel().read(0, 1).await.unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            // Never early; the strict 10% bound is checked end to end in
            // tests/delay.rs, which runs alone (here other tests share the cores).
            assert!((20.0..40.0).contains(&ms), "read took {ms} ms");
            assert_eq!(data, vec![7u8; 512]);
        }
        // While a delayed read is outstanding, I/O to another bdev on this
        // reactor completes at once.
        let ch = d.channel();
        let slow = reactor::spawn_local_joinable(async move { ch.read(0, 1).await });
        let fast = registry::open("Fast", false, None).unwrap();
        let t = Instant::now();
        for _ in 0..10 {
            fast.channel().read(0, 1).await.unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(15), "{:?}", t.elapsed());
        slow.await.unwrap().unwrap();
        // Runtime update applies to the next I/O.
        d.bdev()
            .downcast::<DelayBdev>()
            .unwrap()
            .latencies()
            .set_us(LatencyKind::AvgRead, 1_000);
        let t = Instant::now();
        d.channel().read(0, 1).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(15));
    });
}

#[test]
fn base_is_claimed_and_its_removal_takes_the_delay_bdev_with_it() {
    run(|| async {
        malloc("B1", 64, 512).await;
        create(opts("D1", "B1", 10, 10)).await.unwrap();
        assert_eq!(
            registry::view(&registry::lookup("B1").unwrap())
                .unwrap()
                .claimed_by,
            Some("delay")
        );
        // A second delay over the claimed base fails and leaves nothing.
        let e = create(opts("D2", "B1", 10, 10)).await.unwrap_err();
        assert_eq!(e.errno(), libc::EPERM);
        assert!(registry::lookup("D2").is_none());
        // p99 < avg is rejected.
        let mut bad = opts("D3", "B1", 10, 10);
        bad.p99_read_latency = 5;
        assert_eq!(create(bad).await.unwrap_err().errno(), libc::EINVAL);
        // Missing base: ENODEV.
        assert_eq!(
            create(opts("D4", "nope", 1, 1)).await.unwrap_err().errno(),
            libc::ENODEV
        );
        registry::unregister("B1", None).await.unwrap();
        registry::wait_for_examine().await;
        for _ in 0..100 {
            if registry::list().is_empty() {
                break;
            }
            reactor::sleep(Duration::from_millis(1)).await;
        }
        assert!(registry::list().is_empty());
    });
}

#[test]
fn held_writes_reach_the_base_only_at_their_deadline() {
    run(|| async {
        malloc("HB", 64, 512).await;
        let mut o = opts("HD", "HB", 0, 30_000);
        o.hold_writes = true;
        create(o).await.unwrap();
        let d = registry::open("HD", true, None).unwrap();
        let base = registry::open("HB", false, None).unwrap();
        let ch = d.channel();
        let t = Instant::now();
        let w = reactor::spawn_local_joinable(async move { ch.write(0, &[9u8; 512]).await });
        // Midway the base does not have the data yet.
        reactor::sleep(Duration::from_millis(10)).await;
        assert_eq!(base.channel().read(0, 1).await.unwrap(), vec![0u8; 512]);
        w.await.unwrap().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert_eq!(base.channel().read(0, 1).await.unwrap(), vec![9u8; 512]);
    });
}
