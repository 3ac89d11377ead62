//! In-process bdev-layer benchmark: no sockets, no NVMe/TCP.
//!
//! Each case starts a fresh one-reactor runtime on core 0, creates a bdev,
//! opens a channel and keeps `qd` I/Os in flight: every queue slot owns one
//! `IoBox` (allocated once) and a completion object that counts the I/O and
//! resubmits the same `IoBox` from `io_done`, until a deadline. So what is
//! measured is the bdev framework's submit/complete path (frame push,
//! validation, deferred completion through the per-core completion poller,
//! statistics) plus the reactor's loop turn, plus the module's own work
//! (none for null, a 4 KiB memcpy for malloc).
//!
//! Cases:
//! - `null/read/qdN/<mode>`: rate of 4 KiB reads from a null bdev.
//! - `malloc/read/qd32/<mode>`: rate of random 4 KiB reads from a 64 MiB
//!   malloc bdev.
//! - `malloc/{read,write}/lat/<mode>`: QD1 latency of random 4 KiB I/O to a
//!   64 MiB malloc bdev, submit call to `io_done`, in an hdrhistogram.
//! - `ref/memcpy4k`: no bdev at all; the same random 4 KiB copies a malloc
//!   read does, as a plain loop on the reactor's core (a baseline for the
//!   malloc cases, whose cost is mostly this copy from DRAM).
//!
//! Usage: `cargo bench --bench bdev_io [-- FILTER...]`; a case runs when its
//! name contains any FILTER. `FP_BENCH_SECS` sets the measured time of a
//! rate case (default 3; latency cases run 2/3 of it) and `FP_BENCH_WARMUP`
//! the warm-up (default min(0.5, secs/3)).
//!
//! Every completion's status is checked, and the channel's own statistics
//! must agree with the bench's count; malloc reads are checked against a
//! per-block stamp. Any mismatch panics.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::{IoBox, IoBuf, IoChannel, IoCompletion, IoStatus, IoType};
use hdrhistogram::Histogram;
use reactor::{ticks, CoreSet, PollMode, Runtime, RuntimeConfig};

/// SPDK's bdevperf on a null bdev on this machine (given by the issue).
const SPDK_NULL_NS: f64 = 46.0;
const BLOCK_SIZE: u32 = 4096;
const NULL_BLOCKS: u64 = 1 << 20;
const MALLOC_BLOCKS: u64 = (64 << 20) / BLOCK_SIZE as u64;
/// Rate cases read the clock once per this many completions.
const CHECK_EVERY: u64 = 64;
/// Precomputed random block offsets (a power of two).
const OFFSET_TABLE: usize = 1 << 14;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Null,
    Malloc,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Measure {
    Rate,
    Latency,
    /// No bdev: random 4 KiB copies out of a 64 MiB buffer into `qd`
    /// rotating buffers, the work a malloc read does. Measured in the same
    /// run, so the malloc figures can be read as "copy + framework".
    CopyRef,
}

#[derive(Clone)]
struct Case {
    name: String,
    backend: Backend,
    io_type: IoType,
    qd: u32,
    mode: PollMode,
    measure: Measure,
}

#[derive(Clone, Copy)]
struct Settings {
    secs: f64,
    warmup: f64,
}

/// What one case measured, in the measured window.
struct Outcome {
    ios: u64,
    ticks: u64,
    /// Reactor loop iterations per completed I/O over the whole run.
    iters_per_io: f64,
    /// Latency in ticks (latency cases).
    hist: Option<Histogram<u64>>,
    /// Mean latency the bdev layer reported (`IoBox::latency_ticks`), ticks.
    bdev_lat_mean: f64,
}

impl Outcome {
    fn iops(&self) -> f64 {
        self.ios as f64 / ticks::to_duration(self.ticks).as_secs_f64()
    }

    fn ns_per_io(&self) -> f64 {
        1e9 / self.iops()
    }
}

/// State shared by a case's queue slots.
struct Job {
    ch: IoChannel,
    io_type: IoType,
    /// Random block offsets; empty: each slot keeps its offset.
    offsets: Vec<u64>,
    cursor: Cell<usize>,
    warm_end: u64,
    end: u64,
    completed: Cell<u64>,
    measuring: Cell<bool>,
    stopping: Cell<bool>,
    /// (completed, tick) when measuring began and ended.
    start_mark: Cell<(u64, u64)>,
    end_mark: Cell<(u64, u64)>,
    outstanding: Cell<u32>,
    /// Fired when the last slot stops.
    all_stopped: RefCell<Option<reactor::CompletionSender<()>>>,
    /// Completions whose status was not Success.
    bad: Cell<u64>,
    /// Final reads whose data did not carry their block's stamp.
    bad_data: Cell<u64>,
    /// Malloc reads: check the last buffer of each slot.
    verify_stamp: bool,
    hist: Option<RefCell<Histogram<u64>>>,
    /// Sum of the latencies the bdev layer itself reported for the I/Os in
    /// `hist` (a cross-check of its accounting).
    bdev_lat_sum: Cell<u64>,
}

impl Job {
    #[inline]
    fn clock(&self, n: u64, now: u64) {
        if self.measuring.get() {
            if now >= self.end {
                self.end_mark.set((n, now));
                self.measuring.set(false);
                self.stopping.set(true);
            }
        } else if !self.stopping.get() && now >= self.warm_end {
            self.start_mark.set((n, now));
            self.measuring.set(true);
        }
    }

    #[inline]
    fn next_offset(&self) -> u64 {
        let i = self.cursor.get();
        self.cursor.set(i.wrapping_add(1));
        self.offsets[i & (OFFSET_TABLE - 1)]
    }
}

/// One queue slot: its `IoBox` is always in flight until the job stops.
struct Slot {
    job: Rc<Job>,
    me: Weak<Slot>,
    submitted_at: Cell<u64>,
}

impl IoCompletion for Slot {
    fn io_done(&self, mut io: IoBox) {
        let job = &*self.job;
        if io.status() != IoStatus::Success {
            job.bad.set(job.bad.get() + 1);
            job.stopping.set(true);
        }
        let n = job.completed.get() + 1;
        job.completed.set(n);
        match &job.hist {
            Some(h) => {
                let now = ticks::now();
                if job.measuring.get() {
                    h.borrow_mut()
                        .saturating_record(now.saturating_sub(self.submitted_at.get()));
                    job.bdev_lat_sum
                        .set(job.bdev_lat_sum.get() + io.latency_ticks());
                }
                job.clock(n, now);
            }
            None => {
                if n.is_multiple_of(CHECK_EVERY) {
                    job.clock(n, ticks::now());
                }
            }
        }
        if job.stopping.get() {
            if job.verify_stamp && !stamp_matches(&io) {
                job.bad_data.set(job.bad_data.get() + 1);
            }
            job.outstanding.set(job.outstanding.get() - 1);
            if job.outstanding.get() == 0 {
                if let Some(tx) = job.all_stopped.borrow_mut().take() {
                    tx.complete(());
                }
            }
            return; // the IoBox goes back to the pool
        }
        if !job.offsets.is_empty() {
            let offset = job.next_offset();
            io.offset_blocks = offset;
            if job.io_type == IoType::Write {
                stamp(io.buf.as_mut_slice(), offset);
            }
        }
        // The frame's Rc keeps this slot alive during the call.
        let me = self.me.upgrade().expect("slot alive in its own callback");
        if job.hist.is_some() {
            self.submitted_at.set(ticks::now());
        }
        job.ch.submit(io, me);
    }
}

/// Malloc blocks carry their block number in their first 8 bytes.
fn stamp(block: &mut [u8], offset: u64) {
    block[..8].copy_from_slice(&offset.to_le_bytes());
}

fn stamp_matches(io: &IoBox) -> bool {
    io.buf.as_slice()[..8] == io.offset_blocks.to_le_bytes()
}

/// xorshift64*: cheap and deterministic.
fn random_offsets(num_blocks: u64) -> Vec<u64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..OFFSET_TABLE)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D) % num_blocks
        })
        .collect()
}

async fn create_bdev(backend: Backend) -> String {
    match backend {
        Backend::Null => bdev::module::null::rpc::create(bdev::module::null::rpc::CreateParams {
            name: "Null0".into(),
            uuid: None,
            num_blocks: NULL_BLOCKS,
            block_size: BLOCK_SIZE,
            physical_block_size: 0,
            md_size: 0,
            dif_type: 0,
            dif_is_head_of_md: false,
            dif_pi_format: 0,
            preferred_write_alignment: 0,
            preferred_write_granularity: 0,
            optimal_write_size: 0,
            preferred_unmap_alignment: 0,
            preferred_unmap_granularity: 0,
        })
        .await
        .expect("bdev_null_create"),
        Backend::Malloc => {
            bdev::module::malloc::rpc::create(bdev::module::malloc::rpc::CreateParams {
                name: Some("Malloc0".into()),
                uuid: None,
                num_blocks: MALLOC_BLOCKS,
                block_size: BLOCK_SIZE,
                physical_block_size: 0,
                optimal_io_boundary: 0,
                md_size: 0,
                md_interleave: false,
                dif_type: 0,
                dif_is_head_of_md: false,
                dif_pi_format: 0,
                numa_id: None,
            })
            .await
            .expect("bdev_malloc_create")
        }
    }
}

/// Stamps every malloc block and reads a sample back through the
/// control-path helpers.
async fn prepare_malloc(ch: &IoChannel, offsets: &[u64]) -> Result<(), String> {
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    for b in 0..MALLOC_BLOCKS {
        stamp(&mut block, b);
        ch.write(b, &block)
            .await
            .map_err(|e| format!("stamping block {b}: {e}"))?;
    }
    for &b in offsets.iter().take(256) {
        let data = ch.read(b, 1).await.map_err(|e| format!("read {b}: {e}"))?;
        if data[..8] != b.to_le_bytes() || data[8..].iter().any(|&x| x != 0) {
            return Err(format!("block {b} does not read back as written"));
        }
    }
    Ok(())
}

async fn run_case(case: &Case, s: Settings) -> Result<Outcome, String> {
    let name = create_bdev(case.backend).await;
    let desc = bdev::registry::open(&name, case.io_type == IoType::Write, None)
        .map_err(|e| format!("open {name}: {e}"))?;
    let ch = desc.channel();
    let offsets = match case.backend {
        Backend::Null => Vec::new(),
        Backend::Malloc => random_offsets(MALLOC_BLOCKS),
    };
    if case.backend == Backend::Malloc {
        prepare_malloc(&ch, &offsets).await?;
    }
    // One I/O of the measured kind through the awaited path.
    let io = ch
        .submit_wait(IoBox::with(case.io_type, 0, 1, IoBuf::new(4096)))
        .await;
    if io.status() != IoStatus::Success {
        return Err(format!(
            "probe {:?} completed {:?}",
            case.io_type,
            io.status()
        ));
    }
    drop(io);

    let secs = match case.measure {
        Measure::Latency => s.secs * 2.0 / 3.0,
        _ => s.secs,
    };
    let hist = match case.measure {
        Measure::Rate | Measure::CopyRef => None,
        Measure::Latency => Some(RefCell::new(
            Histogram::<u64>::new_with_max(ticks::tick_rate() * 10, 3).expect("histogram"),
        )),
    };
    let (tx, all_stopped) = reactor::completion();
    let before = ch.stats();
    let iters_before = reactor::stats().iterations;
    let start = ticks::now();
    let warm_end = start + ticks::from_duration(Duration::from_secs_f64(s.warmup));
    let job = Rc::new(Job {
        ch: ch.clone(),
        io_type: case.io_type,
        offsets,
        cursor: Cell::new(0),
        warm_end,
        end: warm_end + ticks::from_duration(Duration::from_secs_f64(secs)),
        completed: Cell::new(0),
        measuring: Cell::new(false),
        stopping: Cell::new(false),
        start_mark: Cell::new((0, 0)),
        end_mark: Cell::new((0, 0)),
        outstanding: Cell::new(case.qd),
        all_stopped: RefCell::new(Some(tx)),
        bad: Cell::new(0),
        bad_data: Cell::new(0),
        verify_stamp: case.backend == Backend::Malloc && case.io_type == IoType::Read,
        hist,
        bdev_lat_sum: Cell::new(0),
    });
    for i in 0..case.qd {
        let slot = Rc::new_cyclic(|me| Slot {
            job: job.clone(),
            me: me.clone(),
            submitted_at: Cell::new(0),
        });
        let offset = if job.offsets.is_empty() {
            i as u64
        } else {
            job.next_offset()
        };
        let mut buf = IoBuf::new(BLOCK_SIZE as usize);
        if case.io_type == IoType::Write {
            stamp(buf.as_mut_slice(), offset);
        }
        let io = IoBox::with(case.io_type, offset, 1, buf);
        slot.submitted_at.set(ticks::now());
        ch.submit(io, slot);
    }
    all_stopped
        .await
        .map_err(|_| "the I/O slots were dropped before stopping".to_string())?;
    let iters = reactor::stats().iterations - iters_before;

    let after = ch.stats();
    let (ops, failed) = match case.io_type {
        IoType::Write => (
            after.num_write_ops - before.num_write_ops,
            after.failed - before.failed,
        ),
        _ => (
            after.num_read_ops - before.num_read_ops,
            after.failed - before.failed,
        ),
    };
    let completed = job.completed.get();
    if job.bad.get() > 0 || failed > 0 {
        return Err(format!(
            "{} completions not successful ({} failed in the channel stats)",
            job.bad.get(),
            failed
        ));
    }
    if job.bad_data.get() > 0 {
        return Err(format!(
            "{} reads returned the wrong block",
            job.bad_data.get()
        ));
    }
    if ops != completed {
        return Err(format!("channel counted {ops} I/Os, the bench {completed}"));
    }
    if ch.in_flight() != 0 {
        return Err(format!("{} I/Os still in flight", ch.in_flight()));
    }
    let (n0, t0) = job.start_mark.get();
    let (n1, t1) = job.end_mark.get();
    if t1 <= t0 || n1 <= n0 {
        return Err("the measured window never opened".into());
    }
    let hist = job.hist.as_ref().map(|h| h.borrow().clone());
    let bdev_lat_mean = match &hist {
        Some(h) if !h.is_empty() => job.bdev_lat_sum.get() as f64 / h.len() as f64,
        _ => 0.0,
    };
    drop(job);
    drop(ch);
    drop(desc);
    bdev::registry::unregister_all().await;
    Ok(Outcome {
        ios: n1 - n0,
        ticks: t1 - t0,
        iters_per_io: iters as f64 / completed.max(1) as f64,
        hist,
        bdev_lat_mean,
    })
}

/// The copy a malloc read does, without the bdev layer. Runs on the
/// reactor's core and blocks it, which is fine: nothing else runs there.
fn copy_reference(qd: u32, s: Settings) -> Outcome {
    let len = (MALLOC_BLOCKS * BLOCK_SIZE as u64) as usize;
    let bs = BLOCK_SIZE as usize;
    // Touch every page, as stamping the malloc bdev does.
    let src = vec![1u8; len];
    let mut dst = IoBuf::new(bs * qd as usize);
    let offsets = random_offsets(MALLOC_BLOCKS);
    let start = ticks::now();
    let warm_end = start + ticks::from_duration(Duration::from_secs_f64(s.warmup));
    let end = warm_end + ticks::from_duration(Duration::from_secs_f64(s.secs));
    let (mut n, mut mark) = (0u64, None);
    loop {
        for _ in 0..CHECK_EVERY {
            let off = offsets[n as usize & (OFFSET_TABLE - 1)] as usize * bs;
            let slot = (n % qd as u64) as usize * bs;
            // SAFETY: off + bs <= len (offsets < MALLOC_BLOCKS) and
            // slot + bs <= dst.len(); the buffers do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr().add(off), dst.as_mut_ptr().add(slot), bs)
            };
            std::hint::black_box(dst.as_mut_ptr());
            n += 1;
        }
        let now = ticks::now();
        match mark {
            None if now >= warm_end => mark = Some((n, now)),
            Some((n0, t0)) if now >= end => {
                return Outcome {
                    ios: n - n0,
                    ticks: now - t0,
                    iters_per_io: 0.0,
                    hist: None,
                    bdev_lat_mean: 0.0,
                };
            }
            _ => {}
        }
    }
}

fn run_in_runtime(case: &Case, s: Settings) -> Outcome {
    let out: Arc<Mutex<Option<Result<Outcome, String>>>> = Arc::new(Mutex::new(None));
    let out2 = out.clone();
    let case2 = case.clone();
    let cores = CoreSet::parse_list("0").expect("core 0");
    let rt = Runtime::start(
        RuntimeConfig::new(cores).poll_mode(case.mode),
        move || async move {
            let r = match case2.measure {
                Measure::CopyRef => Ok(copy_reference(case2.qd, s)),
                _ => run_case(&case2, s).await,
            };
            *out2.lock().expect("result lock") = Some(r);
            reactor::shutdown(0);
        },
    )
    .expect("start runtime");
    // A wedged reactor would hang the bench forever: give up loudly.
    let limit = Duration::from_secs_f64((s.warmup + s.secs) * 3.0 + 60.0);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let name = case.name.clone();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(limit) {
            eprintln!("{name}: no result after {limit:?}: the reactor is wedged; aborting");
            std::process::exit(3);
        }
    });
    let code = rt.join();
    drop(done_tx);
    let _ = watchdog.join();
    assert_eq!(code, 0, "{}: a reactor failed", case.name);
    let r = out.lock().expect("result lock").take();
    match r {
        Some(Ok(o)) => o,
        Some(Err(e)) => panic!("{}: {e}", case.name),
        None => panic!("{}: no result", case.name),
    }
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for mode in [PollMode::Busy, PollMode::Adaptive] {
        for qd in [1, 32, 128] {
            v.push(Case {
                name: format!("null/read/qd{qd}/{}", mode.as_str()),
                backend: Backend::Null,
                io_type: IoType::Read,
                qd,
                mode,
                measure: Measure::Rate,
            });
        }
    }
    v.push(Case {
        name: "ref/memcpy4k".into(),
        backend: Backend::Malloc,
        io_type: IoType::Read,
        qd: 32,
        mode: PollMode::Busy,
        measure: Measure::CopyRef,
    });
    for mode in [PollMode::Busy, PollMode::Adaptive] {
        v.push(Case {
            name: format!("malloc/read/qd32/{}", mode.as_str()),
            backend: Backend::Malloc,
            io_type: IoType::Read,
            qd: 32,
            mode,
            measure: Measure::Rate,
        });
    }
    for io_type in [IoType::Read, IoType::Write] {
        for mode in [PollMode::Busy, PollMode::Adaptive] {
            v.push(Case {
                name: format!("malloc/{}/lat/{}", io_type.as_str(), mode.as_str()),
                backend: Backend::Malloc,
                io_type,
                qd: 1,
                mode,
                measure: Measure::Latency,
            });
        }
    }
    v
}

fn env_secs(var: &str) -> Option<f64> {
    let v = std::env::var(var).ok()?;
    match v.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Some(x),
        _ => panic!("{var}={v}: expected a positive number of seconds"),
    }
}

fn main() {
    // cargo passes `--bench`; anything else not starting with '-' filters.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let secs = env_secs("FP_BENCH_SECS").unwrap_or(3.0);
    let warmup = env_secs("FP_BENCH_WARMUP").unwrap_or((secs / 3.0).min(0.5));
    let s = Settings { secs, warmup };
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    if selected.is_empty() {
        eprintln!("no case matches {filters:?}; cases:");
        for c in cases() {
            eprintln!("  {}", c.name);
        }
        std::process::exit(2);
    }
    println!(
        "bdev_io: one reactor on core 0, 4 KiB I/O, {secs:.2} s measured after {warmup:.2} s \
         warm-up (latency cases {:.2} s); tick rate {} Hz",
        secs * 2.0 / 3.0,
        ticks::tick_rate()
    );

    let mut rates = Vec::new();
    let mut lats = Vec::new();
    for case in &selected {
        let o = run_in_runtime(case, s);
        eprintln!(
            "  {:<26} {:>12.0} IO/s {:>8.1} ns/IO",
            case.name,
            o.iops(),
            o.ns_per_io()
        );
        match case.measure {
            Measure::Rate | Measure::CopyRef => rates.push((case.clone(), o)),
            Measure::Latency => lats.push((case.clone(), o)),
        }
    }

    if !rates.is_empty() {
        println!();
        println!("| case | poll mode | QD | IOPS | ns/IO | × SPDK null (46 ns) | loop iters/IO |");
        println!("|---|---|---:|---:|---:|---:|---:|");
        for (c, o) in &rates {
            let (mode, iters) = match c.measure {
                Measure::CopyRef => ("-", "-".to_string()),
                _ => (c.mode.as_str(), format!("{:.3}", o.iters_per_io)),
            };
            println!(
                "| {} | {} | {} | {:.0} | {:.1} | {:.2} | {} |",
                c.name,
                mode,
                c.qd,
                o.iops(),
                o.ns_per_io(),
                o.ns_per_io() / SPDK_NULL_NS,
                iters
            );
        }
    }
    if !lats.is_empty() {
        println!();
        println!(
            "| case | poll mode | I/Os | IOPS | mean ns | p50 ns | p99 ns | p99.9 ns | max ns | bdev-reported mean ns |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (c, o) in &lats {
            let h = o.hist.as_ref().expect("latency histogram");
            let ns = |t: u64| ticks::to_ns(t);
            println!(
                "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {:.0} |",
                c.name,
                c.mode.as_str(),
                h.len(),
                o.iops(),
                h.mean() * 1e9 / ticks::tick_rate() as f64,
                ns(h.value_at_quantile(0.50)),
                ns(h.value_at_quantile(0.99)),
                ns(h.value_at_quantile(0.999)),
                ns(h.max()),
                o.bdev_lat_mean * 1e9 / ticks::tick_rate() as f64
            );
        }
    }
}
