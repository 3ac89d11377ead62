//! A cheap monotonic tick counter for the poll loop and per-I/O latency.
//!
//! On x86_64 this is the TSC (invariant on every machine we target: the
//! loop reads it several times per iteration, and `rdtsc` costs a few
//! nanoseconds where `clock_gettime` costs tens). Elsewhere it falls back to
//! nanoseconds since a process-wide epoch. [`tick_rate`] is calibrated once
//! against the monotonic clock; SPDK reports the same figure as `tick_rate`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the one-time calibration samples the clock.
const CALIBRATION_WINDOW: Duration = Duration::from_millis(20);

#[inline(always)]
pub fn now() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions; x86_64 always has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        epoch().elapsed().as_nanos() as u64
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Ticks per second.
pub fn tick_rate() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(calibrate)
}

fn calibrate() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        let t0 = Instant::now();
        let c0 = now();
        while t0.elapsed() < CALIBRATION_WINDOW {
            std::hint::spin_loop();
        }
        let c1 = now();
        let ns = t0.elapsed().as_nanos() as u64;
        let rate = (c1.wrapping_sub(c0) as u128 * 1_000_000_000 / ns.max(1) as u128) as u64;
        // Round to the nearest 100 kHz: readers compare rates across runs.
        let rate = (rate + 50_000) / 100_000 * 100_000;
        rate.max(1)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = CALIBRATION_WINDOW;
        1_000_000_000
    }
}

pub fn from_duration(d: Duration) -> u64 {
    (d.as_nanos() * tick_rate() as u128 / 1_000_000_000) as u64
}

pub fn from_us(us: u64) -> u64 {
    (us as u128 * tick_rate() as u128 / 1_000_000) as u64
}

pub fn to_duration(ticks: u64) -> Duration {
    Duration::from_nanos((ticks as u128 * 1_000_000_000 / tick_rate() as u128) as u64)
}

pub fn to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000_000 / tick_rate() as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_calibrated() {
        let rate = tick_rate();
        assert!(rate >= 1_000_000, "implausible tick rate {rate}");
        let a = now();
        std::thread::sleep(Duration::from_millis(5));
        let b = now();
        assert!(b > a);
        let elapsed = to_duration(b - a);
        assert!(elapsed >= Duration::from_millis(4), "{elapsed:?}");
        assert_eq!(
            to_duration(from_duration(Duration::from_secs(1))).as_millis(),
            1000
        );
    }
}
