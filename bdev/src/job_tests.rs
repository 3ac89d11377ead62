//! The job runner: completion with progress, cancel at a step boundary
//! after the step's I/O, foreground I/O served during a long job, and the
//! rate limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::registry;
use crate::testutil::{malloc, other_core, run};

const BS: usize = 512;

/// Copies `total` windows of `win` blocks from `src` to `dst` through the
/// runner's buffer; returns the bytes copied.
struct Copy {
    src: crate::IoChannel,
    dst: crate::IoChannel,
    at: u64,
    win: u64,
    total: u64,
    /// Set while a step's I/O is in flight.
    in_step: Arc<AtomicBool>,
}

impl Job for Copy {
    type Output = u64;
    fn total_units(&self) -> u64 {
        self.total
    }
    async fn step(&mut self, cx: &mut StepCx) -> Result<Step<u64>> {
        if self.at == self.total {
            return Ok(Step::Done(self.total * self.win * BS as u64));
        }
        self.in_step.store(true, Ordering::SeqCst);
        let buf = cx.take_buf().ok_or(BdevError::NoMemory)?;
        let off = self.at * self.win;
        let io = crate::IoBox::with(crate::IoType::Read, off, self.win, buf);
        let mut io = self.src.submit_wait(io).await;
        if !io.status().is_success() {
            return Err(BdevError::Io);
        }
        io.io_type = crate::IoType::Write;
        let mut io = self.dst.submit_wait(io).await;
        cx.put_buf(io.take_buf());
        self.in_step.store(false, Ordering::SeqCst);
        if !io.status().is_success() {
            return Err(BdevError::Io);
        }
        self.at += 1;
        Ok(Step::Progress {
            units: 1,
            bytes: self.win * BS as u64,
        })
    }
}

/// A copy job's maker, to run on the job's core (names are looked up
/// here, on the main reactor).
fn copy_job(
    src: &str,
    dst: &str,
    win: u64,
    total: u64,
    in_step: Arc<AtomicBool>,
) -> impl FnOnce() -> Result<Copy> + Send + 'static {
    let src = registry::lookup(src).ok_or(BdevError::NoDevice(src.into()));
    let dst = registry::lookup(dst).ok_or(BdevError::NoDevice(dst.into()));
    move || {
        let (src, dst) = (src?, dst?);
        Ok(Copy {
            src: src.get_channel(),
            dst: dst.get_channel(),
            at: 0,
            win,
            total,
            in_step,
        })
    }
}

fn buffers(win: u64) -> JobOptions {
    JobOptions {
        buffers: (1, win as usize * BS),
        ..JobOptions::default()
    }
}

#[test]
fn a_job_runs_to_completion_on_its_core_with_progress() {
    run(|| async {
        let a = malloc("J_a", 1024, BS as u32).await;
        malloc("J_b", 1024, BS as u32).await;
        let data: Vec<u8> = (0..1024 * BS).map(|i| (i * 31 % 251) as u8).collect();
        a.get_channel().write(0, &data).await.unwrap();
        // Slow the copy so progress can be seen midway.
        crate::module::delay::rpc::create(crate::module::delay::DelayOptions {
            name: "J_slow".into(),
            base_bdev_name: "J_b".into(),
            uuid: None,
            avg_read_latency: 0,
            p99_read_latency: 0,
            avg_write_latency: 2000,
            p99_write_latency: 2000,
            hold_writes: false,
        })
        .await
        .unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let core = other_core();
        let job = spawn(core, buffers(16), copy_job("J_a", "J_slow", 16, 64, f));
        let mut seen_mid = false;
        while job.state() == JobState::Running {
            let (done, total) = job.progress();
            assert!(done <= total);
            seen_mid |= done > 0 && done < total && total == 64;
            reactor::sleep(Duration::from_millis(1)).await;
        }
        assert!(seen_mid, "progress visible from another core while running");
        assert_eq!(job.progress(), (64, 64));
        let steps = job.stats().steps.load(Ordering::SeqCst);
        assert_eq!(steps, 65, "64 windows and the final step");
        match job.wait().await.unwrap() {
            JobEnd::Done(bytes) => assert_eq!(bytes, 1024 * BS as u64),
            JobEnd::Cancelled => panic!("not cancelled"),
        }
        let b = registry::lookup("J_b").unwrap();
        assert_eq!(b.get_channel().read(0, 1024).await.unwrap(), data);
        // A job whose construction fails reports it.
        let bad = spawn(
            core,
            buffers(1),
            copy_job("nope", "J_b", 1, 1, Arc::default()),
        );
        assert!(matches!(bad.wait().await, Err(BdevError::NoDevice(_))));
    });
}

#[test]
fn cancel_stops_at_a_step_boundary_after_the_steps_io() {
    run(|| async {
        malloc("C_a", 4096, BS as u32).await;
        malloc("C_b", 4096, BS as u32).await;
        crate::module::delay::rpc::create(crate::module::delay::DelayOptions {
            name: "C_slow".into(),
            base_bdev_name: "C_b".into(),
            uuid: None,
            avg_read_latency: 0,
            p99_read_latency: 0,
            avg_write_latency: 20_000,
            p99_write_latency: 20_000,
            hold_writes: false,
        })
        .await
        .unwrap();
        let in_step = Arc::new(AtomicBool::new(false));
        let f = in_step.clone();
        let job = spawn(
            other_core(),
            buffers(8),
            copy_job("C_a", "C_slow", 8, 512, f),
        );
        // Cancel while a step's 20 ms write is in flight.
        while job.progress().0 < 2 || !in_step.load(Ordering::SeqCst) {
            reactor::sleep(Duration::from_micros(200)).await;
        }
        let t = Instant::now();
        job.cancel().await;
        assert!(!in_step.load(Ordering::SeqCst), "cancel resolved mid-step");
        assert!(t.elapsed() < Duration::from_secs(2), "prompt");
        let (done, total) = job.progress();
        assert!(done < total);
        // Nothing of the job is left in flight on the delay bdev.
        let slow = registry::lookup("C_slow").unwrap();
        let left = reactor::call(other_core(), move || slow.get_channel().in_flight())
            .await
            .unwrap();
        assert_eq!(left, 0, "its I/O drained");
        assert_eq!(job.state(), JobState::Cancelled);
        let steps = job.stats().steps.load(Ordering::SeqCst);
        reactor::sleep(Duration::from_millis(50)).await;
        assert_eq!(job.stats().steps.load(Ordering::SeqCst), steps, "stopped");
        assert!(matches!(job.wait().await, Ok(JobEnd::Cancelled)));
    });
}

/// Steps that each burn CPU without awaiting anything.
struct Spin {
    left: u64,
    each: Duration,
}

impl Job for Spin {
    type Output = ();
    fn total_units(&self) -> u64 {
        1000
    }
    async fn step(&mut self, _cx: &mut StepCx) -> Result<Step<()>> {
        if self.left == 0 {
            return Ok(Step::Done(()));
        }
        let t = Instant::now();
        while t.elapsed() < self.each {
            std::hint::spin_loop();
        }
        self.left -= 1;
        Ok(Step::Progress { units: 1, bytes: 0 })
    }
}

#[test]
fn foreground_io_on_the_jobs_core_is_served_while_it_runs() {
    run(|| async {
        let m = malloc("F_m", 256, BS as u32).await;
        // 300 steps of 200 us: 60 ms of CPU on this core.
        let job = spawn(reactor::current_core(), JobOptions::default(), || {
            Ok(Spin {
                left: 300,
                each: Duration::from_micros(200),
            })
        });
        let ch = m.get_channel();
        let mut waits = Vec::new();
        let data = vec![5u8; 4 * BS];
        while job.state() == JobState::Running {
            let t = Instant::now();
            ch.write(0, &data).await.unwrap();
            waits.push(t.elapsed());
        }
        // A write waits for at most a turn (500 us) plus a step. Judged by
        // the median, since on a loaded machine the OS may stall any one;
        // without yielding between turns no write completes until the end.
        assert!(
            waits.len() > 20,
            "only {} writes while the job ran",
            waits.len()
        );
        waits.sort_unstable();
        let median = waits[waits.len() / 2];
        assert!(median < Duration::from_millis(5), "median wait {median:?}");
        job.wait().await.unwrap();
    });
}

/// Steps that do nothing: the rate limit alone paces them.
struct Tick(Arc<AtomicU64>);

impl Job for Tick {
    type Output = ();
    fn total_units(&self) -> u64 {
        u64::MAX
    }
    async fn step(&mut self, _cx: &mut StepCx) -> Result<Step<()>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Step::Progress {
            units: 1,
            bytes: 4096,
        })
    }
}

#[test]
fn a_rate_limit_bounds_the_work_over_time() {
    run(|| async {
        for (rate, per) in [
            (RateLimit::UnitsPerSec(500), 1u64),
            (RateLimit::BytesPerSec(500 * 4096), 1),
        ] {
            let n = Arc::new(AtomicU64::new(0));
            let n2 = n.clone();
            let started = Instant::now();
            let opts = JobOptions {
                rate: Some(rate),
                ..JobOptions::default()
            };
            let job = spawn(other_core(), opts, move || Ok(Tick(n2)));
            for _ in 0..10 {
                reactor::sleep(Duration::from_millis(10)).await;
                let steps = n.load(Ordering::SeqCst);
                let bound = 500.0 * started.elapsed().as_secs_f64() + 2.0;
                assert!(
                    (steps * per) as f64 <= bound,
                    "{steps} steps after {:?}",
                    started.elapsed()
                );
            }
            assert!(n.load(Ordering::SeqCst) > 5, "it progresses");
            job.cancel().await;
            assert!(matches!(job.wait().await, Ok(JobEnd::Cancelled)));
        }
    });
}
