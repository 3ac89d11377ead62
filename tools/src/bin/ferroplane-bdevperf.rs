//! `ferroplane-bdevperf`: an in-process load generator over any bdev, the
//! counterpart of SPDK's `examples/bdev/bdevperf`.
//!
//! It starts one reactor per core of the core mask, creates the bdevs of a
//! JSON configuration (SPDK's `save_config` shape, `-c`), and runs one *job*
//! per core per selected bdev. A job keeps `-q` I/Os of `-o` bytes in flight
//! through its core's channel for `-t` seconds, then stops submitting, waits
//! for what is in flight, and reports IOPS, MiB/s and latency percentiles
//! (text like bdevperf, or `--json`). Workloads: `read`, `write`,
//! `randread`, `randwrite`, `rw`/`randrw` (read share `-M`), `verify`,
//! `unmap`, `flush`, `write_zeroes`. Jobs on the same bdev split it into
//! disjoint regions, as bdevperf's `-C` does.
//!
//! The hot path allocates nothing: every queue slot owns one [`IoBox`] and
//! its [`IoBuf`], allocated before the run; the completion callback (the
//! job itself, behind an `Rc`) records the latency in a preallocated
//! histogram, picks the next offset with a xorshift PRNG or a cursor, and
//! resubmits the same `IoBox`. A counting global allocator checks this: the
//! allocations made on each job's thread during the run are reported.
//!
//! `verify` gives each queue slot its own set of I/O-size units of the job's
//! region (slot `s` owns units `s, s+q, s+2q, ...`), so slots never race on
//! the same blocks. A slot writes a unit with a pattern derived from
//! (offset, generation, slot), reads it back into the same buffer (after
//! poisoning the pattern words, so a read that moves no data is caught) and
//! compares; then moves to its next unit, bumping the generation each time
//! it wraps. Every read therefore follows its own write; nothing unwritten
//! is compared.
//!
//! Exit status: 0 on success; 1 on an I/O error, a verify mismatch or a
//! setup error (bad `-o` for the bdev, unknown bdev, unsupported I/O type);
//! 2 on a command-line error.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use bdev::rpc::{RpcState, RpcTable};
use bdev::{Descriptor, IoBox, IoBuf, IoChannel, IoCompletion, IoStatus, IoType};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use reactor::{ticks, CompletionEvent, CompletionSender, CoreId, CoreSet, PollMode};
use serde_json::{json, Value};

/// Deepest queue per job. Matches the bdev layer's per-core `IoBox` free
/// list (`IO_POOL_MAX`), so every slot's `IoBox` returns to the pool after
/// the run; deeper queues than this also exceed what any device we target
/// keeps in flight per queue, so they measure only queueing.
const MAX_QUEUE_DEPTH: u32 = 4096;

/// Largest I/O: each slot owns a buffer of this size, allocated up front.
const MAX_IO_SIZE: u64 = 64 << 20;

/// Most buffer memory one job may allocate (queue depth × I/O size), so a
/// typo such as `-q 4096 -o 64m` fails with a message instead of the OOM
/// killer.
const MAX_JOB_BUFFER_BYTES: u64 = 4 << 30;

/// How long the stop waits for in-flight I/O to drain before giving up
/// (an I/O a module holds forever, e.g. an error bdev's `pending` rule).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the main reactor checks whether every job has ended early.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Latencies above this are recorded as this (the histogram's bound).
const LATENCY_CEILING: Duration = Duration::from_secs(60);

/// Significant figures of the latency histograms (0.1% resolution).
const HISTOGRAM_SIGFIG: u8 = 3;

/// The verify pattern repeats every this many bytes ...
const PATTERN_SECTOR: usize = 512;
/// ... as this many u64 words at the start of each sector.
const PATTERN_WORDS: usize = 4;
/// Written over the pattern words before a verify read.
const POISON: u64 = 0xdead_beef_dead_beef;

const DEFAULT_SEED: u64 = 0x6264_6576_7065_7266; // "bdevperf"

#[derive(Parser, Debug)]
#[command(
    name = "ferroplane-bdevperf",
    version,
    about = "In-process bdev load generator (SPDK bdevperf-compatible options)"
)]
struct Args {
    /// JSON configuration that creates the bdevs (SPDK save_config shape)
    #[arg(short = 'c', long = "json-config", value_name = "FILE")]
    config: PathBuf,
    /// I/Os in flight per job (1..=4096)
    #[arg(short = 'q', long = "queue-depth", value_parser = clap::value_parser!(u32).range(1..=MAX_QUEUE_DEPTH as i64))]
    queue_depth: u32,
    /// I/O size in bytes, a multiple of the bdev block size (4096, 4k, 1m)
    #[arg(short = 'o', long = "io-size", value_parser = parse_size)]
    io_size: u64,
    /// Workload
    #[arg(short = 'w', long = "workload")]
    workload: Workload,
    /// Read share in percent for rw and randrw
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: u32,
    /// Run time in seconds
    #[arg(short = 't', long = "time", value_parser = parse_seconds)]
    time: Duration,
    /// Core mask, hexadecimal (0x3)
    #[arg(short = 'm', long = "cpumask", conflicts_with = "cpus")]
    cpumask: Option<String>,
    /// Core list (0,1 or 0-3)
    #[arg(long = "cpus")]
    cpus: Option<String>,
    /// Bdev to test; repeat for several (default: every unclaimed bdev)
    #[arg(short = 'b', long = "bdev", value_name = "NAME")]
    bdevs: Vec<String>,
    /// Reactor poll mode
    #[arg(long = "poll-mode", default_value = "busy", value_parser = ["busy", "adaptive"])]
    poll_mode: String,
    /// Print the results as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Seed of the random offsets and read/write mix
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Seconds between progress lines on stderr; 0 = none
    /// (default: 1 when -t is over 2 s, else none)
    #[arg(long, value_parser = parse_progress)]
    progress: Option<Duration>,
    /// Keep going after an I/O error or a verify mismatch
    #[arg(short = 'f', long = "continue-on-error")]
    continue_on_error: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    #[value(name = "read")]
    Read,
    #[value(name = "write")]
    Write,
    #[value(name = "randread")]
    RandRead,
    #[value(name = "randwrite")]
    RandWrite,
    #[value(name = "rw")]
    Rw,
    #[value(name = "randrw")]
    RandRw,
    #[value(name = "verify")]
    Verify,
    #[value(name = "unmap")]
    Unmap,
    #[value(name = "flush")]
    Flush,
    #[value(name = "write_zeroes")]
    WriteZeroes,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::Unmap => "unmap",
            Workload::Flush => "flush",
            Workload::WriteZeroes => "write_zeroes",
        }
    }

    fn random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    fn mixed(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }

    /// The I/O types the workload submits.
    fn io_types(self, rwmixread: u32) -> Vec<IoType> {
        match self {
            Workload::Read | Workload::RandRead => vec![IoType::Read],
            Workload::Write | Workload::RandWrite => vec![IoType::Write],
            Workload::Rw | Workload::RandRw => match rwmixread {
                100 => vec![IoType::Read],
                0 => vec![IoType::Write],
                _ => vec![IoType::Read, IoType::Write],
            },
            Workload::Verify => vec![IoType::Write, IoType::Read],
            Workload::Unmap => vec![IoType::Unmap],
            Workload::Flush => vec![IoType::Flush],
            Workload::WriteZeroes => vec![IoType::WriteZeroes],
        }
    }

    /// The type of a fixed-type workload's I/O (mixed ones choose per I/O).
    fn fixed_type(self) -> IoType {
        match self {
            Workload::Read | Workload::RandRead | Workload::Rw | Workload::RandRw => IoType::Read,
            Workload::Write | Workload::RandWrite | Workload::Verify => IoType::Write,
            Workload::Unmap => IoType::Unmap,
            Workload::Flush => IoType::Flush,
            Workload::WriteZeroes => IoType::WriteZeroes,
        }
    }

    fn has_data(self) -> bool {
        !matches!(
            self,
            Workload::Unmap | Workload::Flush | Workload::WriteZeroes
        )
    }

    fn writes(self) -> bool {
        !matches!(self, Workload::Read | Workload::RandRead)
    }
}

/// `4096`, `4k`, `4KiB`, `1m`, `1g` (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4096, 4k, 1m)"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("'{s}': unknown size suffix '{suffix}'")),
    };
    let v = n
        .checked_mul(1 << shift)
        .filter(|v| *v > 0 && *v <= MAX_IO_SIZE)
        .ok_or_else(|| format!("'{s}': the I/O size must be 1 byte to {MAX_IO_SIZE} bytes"))?;
    if !v.is_multiple_of(512) {
        return Err(format!(
            "{v} bytes is not a multiple of 512, the smallest block size"
        ));
    }
    Ok(v)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() && x < 1e9 => Ok(Duration::from_secs_f64(x)),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

fn parse_progress(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => parse_seconds(s),
    }
}

// ---------------------------------------------------------------------------
// Allocation counting: per thread, so each job's core can be checked.

struct CountingAlloc;

thread_local! {
    // Const-initialised and without a destructor: touching it never
    // allocates, so the allocator may use it.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn count_alloc() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn thread_allocs() -> u64 {
    ALLOCS.try_with(Cell::get).unwrap_or(0)
}

// SAFETY: forwards every call to the system allocator unchanged; the
// counter is a plain thread-local cell.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// Jobs: run on their own core, found there by id.

/// What a job is to do; built on the main core, sent to the job's core.
#[derive(Clone, Debug)]
struct JobSpec {
    id: u64,
    bdev: String,
    core: CoreId,
    workload: Workload,
    queue_depth: u32,
    io_size: u64,
    block_size: u64,
    blocks_per_io: u64,
    /// The job's region: `region_units` I/O-size units from this block.
    region_start: u64,
    region_units: u64,
    rwmixread: u32,
    seed: u64,
    continue_on_error: bool,
}

/// Per queue slot state.
struct Slot {
    /// Verify: index of the slot's current unit among those it owns.
    unit_index: Cell<u64>,
    /// Verify: how many times the slot has gone through its units, from 1.
    generation: Cell<u64>,
}

struct Job {
    me: Weak<Job>,
    spec: JobSpec,
    ch: IoChannel,
    /// Held until the job is dropped (after its channel: field order).
    _desc: Descriptor,
    slots: Box<[Slot]>,
    rng: Cell<u64>,
    cursor: Cell<u64>,
    stopping: Cell<bool>,
    outstanding: Cell<u32>,
    done: RefCell<Option<CompletionSender<()>>>,
    ios: Cell<u64>,
    failed: Cell<u64>,
    miscompares: Cell<u64>,
    nomem_retries: Cell<u64>,
    first_error: RefCell<Option<String>>,
    hist: RefCell<Histogram<u64>>,
    start_tick: Cell<u64>,
    end_tick: Cell<u64>,
    allocs_at_start: Cell<u64>,
    allocs_at_stop: Cell<Option<u64>>,
    ios_at_stop: Cell<u64>,
}

thread_local! {
    static JOBS: RefCell<HashMap<u64, Rc<Job>>> = RefCell::new(HashMap::new());
}

/// xorshift64*: a handful of instructions, good enough for offsets.
#[inline]
fn xorshift(state: &Cell<u64>) -> u64 {
    let mut x = state.get();
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    state.set(x);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// A uniform value in `0..n` from a random word, without a division.
#[inline]
fn below(r: u64, n: u64) -> u64 {
    ((r as u128 * n as u128) >> 64) as u64
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The verify pattern words of the sector at byte `offset` of the bdev.
#[inline]
fn pattern(offset: u64, generation: u64, slot: u64) -> [u64; PATTERN_WORDS] {
    [
        offset,
        generation,
        slot,
        splitmix(offset ^ generation.rotate_left(40) ^ slot.rotate_left(20)),
    ]
}

#[inline]
fn put_word(buf: &mut [u8], at: usize, w: u64) {
    buf[at..at + 8].copy_from_slice(&w.to_le_bytes());
}

#[inline]
fn get_word(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Job {
    fn rc(&self) -> Rc<Job> {
        // The I/O's frame holds an Rc of the job during its own callback.
        self.me.upgrade().expect("job alive in its own completion")
    }

    /// Verify: the first block of slot `s`'s unit `k`.
    #[inline]
    fn verify_offset(&self, s: u64, k: u64) -> u64 {
        let unit = s + k * self.spec.queue_depth as u64;
        self.spec.region_start + unit * self.spec.blocks_per_io
    }

    /// Verify: how many units slot `s` owns (at least 1: q <= units).
    #[inline]
    fn verify_units(&self, s: u64) -> u64 {
        let q = self.spec.queue_depth as u64;
        (self.spec.region_units - s).div_ceil(q)
    }

    fn fill_pattern(&self, io: &mut IoBox, generation: u64, slot: u64) {
        let base = io.offset_blocks * self.spec.block_size;
        let buf = io.buf.as_mut_slice();
        let mut at = 0;
        while at + PATTERN_SECTOR <= buf.len() {
            let words = pattern(base + at as u64, generation, slot);
            for (j, w) in words.iter().enumerate() {
                put_word(buf, at + 8 * j, *w);
            }
            at += PATTERN_SECTOR;
        }
    }

    fn poison(&self, io: &mut IoBox) {
        let buf = io.buf.as_mut_slice();
        let mut at = 0;
        while at + PATTERN_SECTOR <= buf.len() {
            for j in 0..PATTERN_WORDS {
                put_word(buf, at + 8 * j, POISON);
            }
            at += PATTERN_SECTOR;
        }
    }

    /// Compares a verify read with the pattern its slot wrote; reports the
    /// first mismatch.
    fn check(&self, io: &IoBox, slot: u64) -> bool {
        let generation = self.slots[slot as usize].generation.get();
        let base = io.offset_blocks * self.spec.block_size;
        let buf = io.buf.as_slice();
        let mut at = 0;
        while at + PATTERN_SECTOR <= buf.len() {
            let words = pattern(base + at as u64, generation, slot);
            for (j, want) in words.iter().enumerate() {
                let got = get_word(buf, at + 8 * j);
                if got != *want {
                    let offset = base + (at + 8 * j) as u64;
                    self.record_error(|| {
                        format!(
                        "verify mismatch at offset {offset} (block {}): expected {want:#018x} got {got:#018x} \
                         [bdev {}, core {}, slot {slot}, generation {generation}]",
                        offset / self.spec.block_size,
                        self.spec.bdev,
                        self.spec.core
                    )
                    });
                    return false;
                }
            }
            at += PATTERN_SECTOR;
        }
        true
    }

    /// Keeps the job's first error for the report; later ones only go to
    /// the debug log. `msg` runs only when needed, so a run that keeps going
    /// past errors (`-f`) does not format (and allocate) for each.
    fn record_error(&self, msg: impl FnOnce() -> String) {
        let mut first = self.first_error.borrow_mut();
        if first.is_none() {
            *first = Some(msg());
        } else if log::log_enabled!(log::Level::Debug) {
            log::debug!("{}", msg());
        }
    }

    /// Sets up `io` (whose previous I/O, if any, has completed) as the
    /// slot's next I/O. `first`: the slot's first I/O of the run.
    #[inline]
    fn prepare(&self, io: &mut IoBox, slot: u64, first: bool) {
        let w = self.spec.workload;
        if w == Workload::Verify {
            let st = &self.slots[slot as usize];
            if !first && io.io_type == IoType::Write {
                // Read back what was just written, into the same buffer.
                self.poison(io);
                io.io_type = IoType::Read;
                return;
            }
            if !first {
                let k = st.unit_index.get() + 1;
                if k >= self.verify_units(slot) {
                    st.unit_index.set(0);
                    st.generation.set(st.generation.get() + 1);
                } else {
                    st.unit_index.set(k);
                }
            }
            io.io_type = IoType::Write;
            io.offset_blocks = self.verify_offset(slot, st.unit_index.get());
            self.fill_pattern(io, st.generation.get(), slot);
            return;
        }
        if w.mixed() {
            io.io_type = if below(xorshift(&self.rng), 100) < self.spec.rwmixread as u64 {
                IoType::Read
            } else {
                IoType::Write
            };
        }
        let unit = if w.random() {
            below(xorshift(&self.rng), self.spec.region_units)
        } else {
            let c = self.cursor.get();
            let next = c + 1;
            self.cursor.set(if next == self.spec.region_units {
                0
            } else {
                next
            });
            c
        };
        io.offset_blocks = self.spec.region_start + unit * self.spec.blocks_per_io;
    }

    /// Submits `io` as `slot`'s I/O.
    #[inline]
    fn submit(&self, mut io: IoBox, slot: u64) {
        io.tag = slot;
        self.ch.submit(io, self.rc());
    }

    /// An I/O that will not be resubmitted: counts it out of the queue.
    fn retire(&self, io: IoBox, now: u64) {
        drop(io); // back to this core's IoBox pool
        let left = self.outstanding.get() - 1;
        self.outstanding.set(left);
        if left == 0 {
            self.end_tick.set(now);
            if let Some(tx) = self.done.borrow_mut().take() {
                tx.complete(());
            }
        }
    }

    fn stop(&self) {
        if !self.stopping.get() {
            self.stopping.set(true);
            self.ios_at_stop.set(self.ios.get());
            self.allocs_at_stop.set(Some(thread_allocs()));
        }
    }

    fn result(&self) -> JobResult {
        let end = if self.outstanding.get() == 0 {
            self.end_tick.get()
        } else {
            ticks::now()
        };
        let allocs = self
            .allocs_at_stop
            .get()
            .unwrap_or_else(thread_allocs)
            .saturating_sub(self.allocs_at_start.get());
        JobResult {
            spec: self.spec.clone(),
            ios: self.ios.get(),
            failed: self.failed.get(),
            miscompares: self.miscompares.get(),
            nomem_retries: self.nomem_retries.get(),
            elapsed: ticks::to_duration(end.saturating_sub(self.start_tick.get())),
            hist: self.hist.borrow().clone(),
            first_error: self.first_error.borrow().clone(),
            allocations: allocs,
            ios_before_stop: self.ios_at_stop.get(),
            drained: self.outstanding.get() == 0,
        }
    }
}

impl IoCompletion for Job {
    fn io_done(&self, mut io: IoBox) {
        // The framework measured this I/O's latency at our layer already.
        let latency = io.latency_ticks();
        let slot = io.tag;
        let status = io.status();
        if status == IoStatus::NoMemory {
            // The module is out of a resource: try the same I/O again, as
            // bdevperf does after waiting for one.
            self.nomem_retries.set(self.nomem_retries.get() + 1);
            self.ch.submit(io, self.rc());
            return;
        }
        self.hist.borrow_mut().saturating_record(latency);
        self.ios.set(self.ios.get() + 1);
        let ok = if !status.is_success() {
            self.failed.set(self.failed.get() + 1);
            self.record_error(|| {
                format!(
                    "I/O failed: {} of {} blocks at block {} on {} (core {}): {status:?}",
                    io.io_type.as_str(),
                    io.num_blocks,
                    io.offset_blocks,
                    self.spec.bdev,
                    self.spec.core
                )
            });
            false
        } else if self.spec.workload == Workload::Verify && io.io_type == IoType::Read {
            let same = self.check(&io, slot);
            if !same {
                self.miscompares.set(self.miscompares.get() + 1);
            }
            same
        } else {
            true
        };
        if !ok && !self.spec.continue_on_error {
            self.stop();
        }
        if self.stopping.get() {
            self.retire(io, ticks::now());
            return;
        }
        if !ok && self.spec.workload == Workload::Verify {
            // Go on with the slot's next unit, written afresh.
            io.io_type = IoType::Read;
        }
        self.prepare(&mut io, slot, false);
        self.submit(io, slot);
    }
}

/// Builds the job on this core, preallocates its slots and starts them.
/// Returns the event fired once the job has stopped and drained.
fn start_job(spec: JobSpec, desc: Descriptor) -> Result<CompletionEvent<()>, String> {
    let ch = desc.channel();
    let q = spec.queue_depth as usize;
    let hist = Histogram::<u64>::new_with_bounds(
        1,
        ticks::from_duration(LATENCY_CEILING).max(2),
        HISTOGRAM_SIGFIG,
    )
    .map_err(|e| format!("latency histogram: {e}"))?;
    let (tx, rx) = reactor::completion();
    let mut seed = splitmix(spec.seed ^ spec.id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if seed == 0 {
        seed = DEFAULT_SEED;
    }
    let slots = (0..q)
        .map(|_| Slot {
            unit_index: Cell::new(0),
            generation: Cell::new(1),
        })
        .collect();
    let job = Rc::new_cyclic(|me| Job {
        me: me.clone(),
        ch,
        _desc: desc,
        slots,
        rng: Cell::new(seed),
        cursor: Cell::new(0),
        stopping: Cell::new(false),
        outstanding: Cell::new(spec.queue_depth),
        done: RefCell::new(Some(tx)),
        ios: Cell::new(0),
        failed: Cell::new(0),
        miscompares: Cell::new(0),
        nomem_retries: Cell::new(0),
        first_error: RefCell::new(None),
        hist: RefCell::new(hist),
        start_tick: Cell::new(0),
        end_tick: Cell::new(0),
        allocs_at_start: Cell::new(0),
        allocs_at_stop: Cell::new(None),
        ios_at_stop: Cell::new(0),
        spec,
    });
    JOBS.with(|j| j.borrow_mut().insert(job.spec.id, job.clone()));
    // Every slot's IoBox and buffer, before the clock starts.
    let buf_len = if job.spec.workload.has_data() {
        job.spec.io_size as usize
    } else {
        0
    };
    let ios: Vec<IoBox> = (0..q)
        .map(|s| {
            let mut io = IoBox::with(
                job.spec.workload.fixed_type(),
                0,
                job.spec.blocks_per_io,
                IoBuf::new(buf_len),
            );
            job.prepare(&mut io, s as u64, true);
            io
        })
        .collect();
    job.allocs_at_start.set(thread_allocs());
    job.start_tick.set(ticks::now());
    for (s, io) in ios.into_iter().enumerate() {
        job.submit(io, s as u64);
    }
    Ok(rx)
}

fn with_job<R>(id: u64, f: impl FnOnce(&Job) -> R) -> Option<R> {
    let job = JOBS.with(|j| j.borrow().get(&id).cloned())?;
    Some(f(&job))
}

/// Everything the report needs about one job; sent back to the main core.
struct JobResult {
    spec: JobSpec,
    ios: u64,
    failed: u64,
    miscompares: u64,
    nomem_retries: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    first_error: Option<String>,
    /// Allocations on the job's thread between its start and stop.
    allocations: u64,
    ios_before_stop: u64,
    drained: bool,
}

impl JobResult {
    fn iops(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ios as f64 / s
        } else {
            0.0
        }
    }

    fn mibps(&self) -> f64 {
        self.iops() * self.spec.io_size as f64 / (1u64 << 20) as f64
    }
}

// ---------------------------------------------------------------------------
// Reporting.

fn us(t: u64) -> f64 {
    ticks::to_ns(t) as f64 / 1000.0
}

struct Latency {
    avg: f64,
    min: f64,
    p50: f64,
    p99: f64,
    p99_9: f64,
    max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency {
                avg: 0.0,
                min: 0.0,
                p50: 0.0,
                p99: 0.0,
                p99_9: 0.0,
                max: 0.0,
            };
        }
        Latency {
            avg: h.mean() * 1e6 / ticks::tick_rate() as f64,
            min: us(h.min()),
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }

    fn json(&self) -> Value {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "avg": r(self.avg),
            "min": r(self.min),
            "p50": r(self.p50),
            "p99": r(self.p99),
            "p99_9": r(self.p99_9),
            "max": r(self.max),
        })
    }
}

const TABLE_HEADER: &str = "                        runtime(s)         IOPS      MiB/s   avg(us)   p50(us)   p99(us) p99.9(us)   max(us)   failed  miscmp";

fn row(
    label: &str,
    runtime: Option<f64>,
    iops: f64,
    mibps: f64,
    l: &Latency,
    f: u64,
    m: u64,
) -> String {
    let runtime = runtime.map_or(String::new(), |r| format!("{r:.2}"));
    format!(
        "{label:<22}: {runtime:>10} {iops:>12.2} {mibps:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {f:>8} {m:>7}",
        l.avg, l.p50, l.p99, l.p99_9, l.max
    )
}

struct Totals {
    iops: f64,
    mibps: f64,
    ios: u64,
    failed: u64,
    miscompares: u64,
    latency: Latency,
}

fn totals(results: &[JobResult]) -> Totals {
    let mut merged: Option<Histogram<u64>> = None;
    for r in results {
        match &mut merged {
            None => merged = Some(r.hist.clone()),
            Some(m) => {
                if let Err(e) = m.add(&r.hist) {
                    log::warn!("merging latency histograms: {e}");
                }
            }
        }
    }
    Totals {
        iops: results.iter().map(JobResult::iops).sum(),
        mibps: results.iter().map(JobResult::mibps).sum(),
        ios: results.iter().map(|r| r.ios).sum(),
        failed: results.iter().map(|r| r.failed).sum(),
        miscompares: results.iter().map(|r| r.miscompares).sum(),
        latency: merged.as_ref().map_or(
            Latency {
                avg: 0.0,
                min: 0.0,
                p50: 0.0,
                p99: 0.0,
                p99_9: 0.0,
                max: 0.0,
            },
            Latency::of,
        ),
    }
}

fn report_text(results: &[JobResult], t: &Totals) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:>99}\n", "Latency(us)"));
    out.push_str(TABLE_HEADER);
    out.push('\n');
    for r in results {
        let s = &r.spec;
        out.push_str(&format!(
            "Job: {} (Core {}) workload {}, depth {}, IO size {}\n",
            s.bdev,
            s.core,
            s.workload.name(),
            s.queue_depth,
            s.io_size
        ));
        out.push_str(&row(
            &format!("  {}", s.bdev),
            Some(r.elapsed.as_secs_f64()),
            r.iops(),
            r.mibps(),
            &Latency::of(&r.hist),
            r.failed,
            r.miscompares,
        ));
        out.push('\n');
    }
    out.push_str(&"=".repeat(TABLE_HEADER.len()));
    out.push('\n');
    out.push_str(&row(
        "Total",
        None,
        t.iops,
        t.mibps,
        &t.latency,
        t.failed,
        t.miscompares,
    ));
    out.push('\n');
    let ios: u64 = results.iter().map(|r| r.ios).sum::<u64>().max(1);
    let allocs: u64 = results.iter().map(|r| r.allocations).sum();
    out.push_str(&format!(
        "ns per I/O per core: {:.1}; allocations on job threads during the run: {allocs} ({:.6} per I/O)\n",
        ns_per_io(results),
        allocs as f64 / ios as f64
    ));
    out
}

/// Busy time per I/O: each job owns its core's time for its run.
fn ns_per_io(results: &[JobResult]) -> f64 {
    let ns: f64 = results.iter().map(|r| r.elapsed.as_secs_f64() * 1e9).sum();
    let ios: u64 = results.iter().map(|r| r.ios).sum();
    if ios == 0 {
        0.0
    } else {
        ns / ios as f64
    }
}

fn report_json(results: &[JobResult], t: &Totals) -> Value {
    let jobs: Vec<Value> = results
        .iter()
        .map(|r| {
            let s = &r.spec;
            json!({
                "bdev": s.bdev,
                "core": s.core.0,
                "workload": s.workload.name(),
                "queue_depth": s.queue_depth,
                "io_size": s.io_size,
                "runtime_s": r.elapsed.as_secs_f64(),
                "ios": r.ios,
                "iops": r.iops(),
                "mibps": r.mibps(),
                "latency_us": Latency::of(&r.hist).json(),
                "io_failed": r.failed,
                "verify_failures": r.miscompares,
                "nomem_retries": r.nomem_retries,
                "allocations": r.allocations,
                "ios_before_stop": r.ios_before_stop,
            })
        })
        .collect();
    json!({
        "jobs": jobs,
        "total": {
            "ios": t.ios,
            "iops": t.iops,
            "mibps": t.mibps,
            "ns_per_io_per_core": ns_per_io(results),
            "latency_us": t.latency.json(),
            "io_failed": t.failed,
            "verify_failures": t.miscompares,
        }
    })
}

// ---------------------------------------------------------------------------
// The main reactor's task.

/// Loads the configuration into the bdev layer. Methods of other
/// subsystems (sock, nvmf, accel ...) that a full save_config holds are
/// skipped: bdevperf runs only the bdev layer.
async fn load_config(args: &Args) -> Result<(), String> {
    let mut table = RpcTable::new();
    bdev::register_rpcs(&mut table);
    let entries = bdev::config::read(&args.config)?;
    let (known, unknown): (Vec<_>, Vec<_>) =
        entries.into_iter().partition(|e| table.contains(&e.method));
    for e in &unknown {
        log::warn!(
            "config: skipping {} ({} subsystem): not part of the bdev layer",
            e.method,
            e.subsystem
        );
    }
    let skipped = bdev::config::apply(&table, known, RpcState::Runtime, false).await?;
    for e in skipped {
        log::warn!("config: {} is not allowed at run time; skipped", e.method);
    }
    bdev::registry::wait_for_examine().await;
    Ok(())
}

/// The bdevs to test: those named with -b, or every unclaimed one.
fn select_bdevs(args: &Args) -> Result<Vec<bdev::BdevHandle>, String> {
    let all = bdev::registry::list();
    if args.bdevs.is_empty() {
        let picked: Vec<_> = all
            .into_iter()
            .filter(|b| bdev::registry::view(b).is_some_and(|v| v.claimed_by.is_none()))
            .collect();
        if picked.is_empty() {
            return Err(format!("{} creates no bdev to test", args.config.display()));
        }
        return Ok(picked);
    }
    let mut picked = Vec::new();
    for name in &args.bdevs {
        let b = bdev::registry::lookup(name).ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|b| b.name()).collect();
            format!(
                "bdev {name} not found (the config creates: {})",
                names.join(", ")
            )
        })?;
        if !picked.contains(&b) {
            picked.push(b);
        }
    }
    Ok(picked)
}

/// Checks the options against one bdev and splits it among `njobs` jobs.
/// Returns (blocks per I/O, units per job).
fn plan(args: &Args, b: &bdev::BdevHandle, njobs: u64) -> Result<(u64, u64), String> {
    let bs = b.block_size() as u64;
    let name = b.name();
    if !args.io_size.is_multiple_of(bs) {
        return Err(format!(
            "-o {}: the I/O size is not a multiple of bdev {name}'s block size {bs}",
            args.io_size
        ));
    }
    let w = args.workload;
    for t in w.io_types(args.rwmixread) {
        if !b.io_type_supported(t) {
            return Err(format!(
                "bdev {name} ({} module) does not support {} I/O, which workload {} needs",
                b.module(),
                t.as_str(),
                w.name()
            ));
        }
    }
    let q = args.queue_depth as u64;
    if w.has_data() && q * args.io_size > MAX_JOB_BUFFER_BYTES {
        return Err(format!(
            "-q {q} × -o {} needs {} MiB of buffers per job; the limit is {} MiB",
            args.io_size,
            (q * args.io_size) >> 20,
            MAX_JOB_BUFFER_BYTES >> 20
        ));
    }
    let blocks_per_io = args.io_size / bs;
    let units = b.num_blocks() / blocks_per_io / njobs;
    if units == 0 {
        return Err(format!(
            "bdev {name} ({} bytes) is smaller than one {}-byte I/O per job ({njobs} jobs)",
            b.size_bytes(),
            args.io_size
        ));
    }
    if w == Workload::Verify && units < q {
        return Err(format!(
            "verify gives each queue slot its own blocks: -q {q} needs at least {q} I/Os of {} bytes \
             per job, but bdev {name} has room for {units} per job ({njobs} jobs)",
            args.io_size
        ));
    }
    Ok((blocks_per_io, units))
}

struct Running {
    core: CoreId,
    id: u64,
    label: String,
    done: CompletionEvent<()>,
}

async fn stop_all(jobs: &[Running]) -> bool {
    for j in jobs {
        let id = j.id;
        let _ = reactor::call(j.core, move || with_job(id, Job::stop)).await;
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        if jobs.iter().all(|j| j.done.is_complete()) {
            return true;
        }
        if Instant::now() >= deadline {
            for j in jobs.iter().filter(|j| !j.done.is_complete()) {
                eprintln!(
                    "ferroplane-bdevperf: job {} did not drain within {:?}",
                    j.label, DRAIN_TIMEOUT
                );
            }
            return false;
        }
        reactor::sleep(Duration::from_millis(1)).await;
    }
}

async fn snapshot(jobs: &[Running]) -> Vec<u64> {
    let mut v = Vec::with_capacity(jobs.len());
    for j in jobs {
        let id = j.id;
        let n = reactor::call(j.core, move || with_job(id, |job| job.ios.get()))
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        v.push(n);
    }
    v
}

async fn run_for(args: &Args, jobs: &[Running]) {
    let progress = args
        .progress
        .unwrap_or(if args.time > Duration::from_secs(2) {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        });
    let start = Instant::now();
    let end = start + args.time;
    let mut last = (start, vec![0u64; jobs.len()]);
    let mut next_progress = (!progress.is_zero()).then(|| start + progress);
    loop {
        let now = Instant::now();
        if now >= end || jobs.iter().all(|j| j.done.is_complete()) {
            return;
        }
        let mut wake = (now + WAIT_SLICE).min(end);
        if let Some(p) = next_progress {
            wake = wake.min(p);
        }
        reactor::sleep(wake.saturating_duration_since(now)).await;
        if let Some(p) = next_progress {
            let now = Instant::now();
            if now >= p {
                let counts = snapshot(jobs).await;
                let now = Instant::now();
                let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
                let rates: Vec<f64> = counts
                    .iter()
                    .zip(&last.1)
                    .map(|(c, l)| c.saturating_sub(*l) as f64 / dt)
                    .collect();
                let total: f64 = rates.iter().sum();
                let mut line = format!(
                    "[{:>7.2} s] {total:>12.0} IOPS {:>10.2} MiB/s",
                    now.duration_since(start).as_secs_f64(),
                    total * args.io_size as f64 / (1u64 << 20) as f64
                );
                if jobs.len() > 1 {
                    let parts: Vec<String> = jobs
                        .iter()
                        .zip(&rates)
                        .map(|(j, r)| format!("{} {r:.0}", j.label))
                        .collect();
                    line.push_str(&format!("  ({})", parts.join(", ")));
                }
                eprintln!("{line}");
                last = (now, counts);
                next_progress = Some(p + progress);
            }
        }
    }
}

async fn bench(args: Args) -> Result<i32, String> {
    load_config(&args).await?;
    let bdevs = select_bdevs(&args)?;
    let cores = reactor::cores();
    let njobs = cores.len() as u64;
    let mut specs = Vec::new();
    for b in &bdevs {
        let (blocks_per_io, units) = plan(&args, b, njobs)?;
        for (i, core) in cores.iter().enumerate() {
            specs.push(JobSpec {
                id: specs.len() as u64,
                bdev: b.name().to_string(),
                core: *core,
                workload: args.workload,
                queue_depth: args.queue_depth,
                io_size: args.io_size,
                block_size: b.block_size() as u64,
                blocks_per_io,
                region_start: i as u64 * units * blocks_per_io,
                region_units: units,
                rwmixread: args.rwmixread,
                seed: args.seed,
                continue_on_error: args.continue_on_error,
            });
        }
    }
    let mut descs = Vec::new();
    for s in &specs {
        let d = bdev::registry::open(&s.bdev, args.workload.writes(), None)
            .map_err(|e| format!("cannot open bdev {}: {e}", s.bdev))?;
        descs.push(d);
    }
    eprintln!(
        "Running I/O for {:.2} seconds: {} job(s), workload {}, depth {}, IO size {}, cores {}, {} polling",
        args.time.as_secs_f64(),
        specs.len(),
        args.workload.name(),
        args.queue_depth,
        args.io_size,
        reactor::core_set().mask_string(),
        args.poll_mode
    );
    let mut running = Vec::new();
    let mut start_error = None;
    for (spec, desc) in specs.into_iter().zip(descs) {
        let (core, id) = (spec.core, spec.id);
        let label = format!("{}@{}", spec.bdev, core);
        match reactor::call(core, move || start_job(spec, desc)).await {
            Ok(Ok(done)) => running.push(Running {
                core,
                id,
                label,
                done,
            }),
            Ok(Err(e)) => {
                start_error = Some(format!("job {label}: {e}"));
                break;
            }
            Err(_) => {
                start_error = Some(format!("job {label}: reactor {core} stopped"));
                break;
            }
        }
    }
    if start_error.is_none() {
        run_for(&args, &running).await;
    }
    let drained = stop_all(&running).await;
    let mut results = Vec::new();
    for j in &running {
        let id = j.id;
        let r = reactor::call(j.core, move || {
            let r = with_job(id, Job::result);
            JOBS.with(|m| m.borrow_mut().remove(&id));
            r
        })
        .await
        .ok()
        .flatten();
        match r {
            Some(r) => results.push(r),
            None => return Err(format!("job {}: result lost", j.label)),
        }
    }
    if let Some(e) = start_error {
        return Err(e);
    }
    let t = totals(&results);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report_json(&results, &t)).unwrap_or_default()
        );
    } else {
        print!("{}", report_text(&results, &t));
    }
    let _ = std::io::stdout().flush();
    for r in &results {
        if let Some(e) = &r.first_error {
            eprintln!("ferroplane-bdevperf: {e}");
        }
    }
    let mut code = 0;
    if t.failed > 0 {
        eprintln!("ferroplane-bdevperf: {} I/O(s) failed", t.failed);
        code = 1;
    }
    if t.miscompares > 0 {
        eprintln!("ferroplane-bdevperf: {} verify mismatch(es)", t.miscompares);
        code = 1;
    }
    if !drained || results.iter().any(|r| !r.drained) {
        code = 1;
    }
    Ok(code)
}

fn core_set(args: &Args) -> Result<CoreSet, String> {
    let set = match (&args.cpumask, &args.cpus) {
        (Some(m), _) => CoreSet::parse_mask(m).map_err(|e| format!("-m {m}: {e}"))?,
        (None, Some(l)) => CoreSet::parse_list(l).map_err(|e| format!("--cpus {l}: {e}"))?,
        (None, None) => CoreSet::parse_mask("0x1").map_err(|e| e.to_string())?,
    };
    set.check_available().map_err(|e| e.to_string())?;
    Ok(set)
}

fn main() {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cores = match core_set(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferroplane-bdevperf: {e}");
            std::process::exit(1);
        }
    };
    let mode = PollMode::parse(&args.poll_mode).unwrap_or(PollMode::Busy);
    let config = reactor::RuntimeConfig::new(cores).poll_mode(mode);
    let runtime = reactor::Runtime::start(config, move || async move {
        let code = match bench(args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ferroplane-bdevperf: {e}");
                1
            }
        };
        bdev::registry::unregister_all().await;
        reactor::shutdown(code);
    });
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferroplane-bdevperf: cannot start reactors: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(runtime.join());
}
