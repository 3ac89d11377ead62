//! `delay`: a virtual bdev that adds latency over any base bdev (SPDK's
//! vbdev_delay).
//!
//! Each read or write gets a deadline at submission: submit time plus the
//! average latency, or the p99 latency for one I/O in a hundred. It goes to
//! the base at once; when the base completes it, the I/O waits in the
//! channel's deadline heap until the deadline passes, so the observed
//! latency is max(base, configured). A per-channel on-demand poller armed
//! at the earliest deadline completes due I/O: waiting never blocks the
//! reactor and wakes a parked one. Other I/O types pass straight through.
//! Latencies live in atomics, so `bdev_delay_update_latency` applies to
//! every core's next I/O.
//!
//! With `hold_writes` (a Ferroplane extension for tests) a write instead
//! waits for its deadline *before* it goes to the base, so its data lands
//! late, as on a device whose slow writes are still in its queue: what a
//! layer above must not mistake for done.

pub mod rpc;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::bdev::{Bdev, BdevHandle, LocalFuture};
use crate::channel::{BdevChannel, IoChannel};
use crate::io::{IoBox, IoCompletion, IoType};
use crate::registry::Descriptor;

pub const MODULE: &str = "delay";

/// One I/O in this many takes the p99 latency.
const P99_ONE_IN: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyKind {
    AvgRead = 0,
    P99Read = 1,
    AvgWrite = 2,
    P99Write = 3,
}

impl LatencyKind {
    pub fn parse(s: &str) -> Option<LatencyKind> {
        Some(match s {
            "avg_read" => LatencyKind::AvgRead,
            "p99_read" => LatencyKind::P99Read,
            "avg_write" => LatencyKind::AvgWrite,
            "p99_write" => LatencyKind::P99Write,
            _ => return None,
        })
    }
}

/// Configured latencies in microseconds, shared by every core.
#[derive(Debug, Default)]
pub struct Latencies {
    us: [AtomicU64; 4],
}

impl Latencies {
    pub fn new(avg_read: u64, p99_read: u64, avg_write: u64, p99_write: u64) -> Latencies {
        Latencies {
            us: [
                AtomicU64::new(avg_read),
                AtomicU64::new(p99_read),
                AtomicU64::new(avg_write),
                AtomicU64::new(p99_write),
            ],
        }
    }

    pub fn get_us(&self, k: LatencyKind) -> u64 {
        self.us[k as usize].load(Ordering::Relaxed)
    }

    pub fn set_us(&self, k: LatencyKind, us: u64) {
        self.us[k as usize].store(us, Ordering::Relaxed)
    }
}

pub struct DelayBdev {
    name: String,
    uuid: Uuid,
    base_name: String,
    base: Mutex<Option<Descriptor>>,
    base_bdev: BdevHandle,
    latencies: Arc<Latencies>,
    pub(crate) hold_writes: bool,
}

impl DelayBdev {
    pub fn latencies(&self) -> &Latencies {
        &self.latencies
    }

    fn params_json(&self) -> Value {
        let l = &self.latencies;
        let mut v = json!({
            "name": self.name,
            "base_bdev_name": self.base_name,
            "uuid": self.uuid.hyphenated().to_string(),
            "avg_read_latency": l.get_us(LatencyKind::AvgRead),
            "p99_read_latency": l.get_us(LatencyKind::P99Read),
            "avg_write_latency": l.get_us(LatencyKind::AvgWrite),
            "p99_write_latency": l.get_us(LatencyKind::P99Write),
        });
        // Only when set: SPDK's own config has no such parameter.
        if self.hold_writes {
            v["hold_writes"] = json!(true);
        }
        v
    }
}

impl Bdev for DelayBdev {
    fn module(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "delay"
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        self.base_bdev.io_type_supported(io_type)
    }

    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        let base = self.base_bdev.get_channel();
        let ch = Rc::new_cyclic(|me: &Weak<DelayChannel>| {
            let me = me.clone();
            DelayChannel {
                base,
                latencies: self.latencies.clone(),
                hold_writes: self.hold_writes,
                state: RefCell::new(DelayState {
                    heap: BinaryHeap::new(),
                    seq: 0,
                    rng: SmallRng::from_os_rng(),
                }),
                poller: reactor::register_on_demand_poller(
                    format!("delay_{}", self.name),
                    move || match me.upgrade() {
                        Some(ch) => ch.complete_due(),
                        None => reactor::PollStatus::Idle,
                    },
                ),
            }
        });
        ch
    }

    fn dump_info_json(&self) -> Value {
        json!({ "delay": self.params_json() })
    }

    fn write_config_json(&self) -> Option<Value> {
        Some(json!({"method": "bdev_delay_create", "params": self.params_json()}))
    }

    fn destruct(&self) -> LocalFuture<()> {
        // Closing the base descriptor releases the claim.
        if let Ok(mut d) = self.base.lock() {
            d.take();
        }
        Box::pin(async {})
    }
}

struct Delayed {
    deadline: u64,
    seq: u64,
    io: IoBox,
    /// A held write: goes to the base when due (`hold_writes`).
    submit: bool,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.deadline, self.seq) == (o.deadline, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    // Reversed: BinaryHeap is a max-heap and we want the earliest deadline.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.deadline, o.seq).cmp(&(self.deadline, self.seq))
    }
}

struct DelayState {
    heap: BinaryHeap<Delayed>,
    seq: u64,
    rng: SmallRng,
}

pub(crate) struct DelayChannel {
    base: IoChannel,
    latencies: Arc<Latencies>,
    hold_writes: bool,
    state: RefCell<DelayState>,
    poller: reactor::PollerHandle,
}

impl DelayChannel {
    fn complete_due(self: &Rc<Self>) -> reactor::PollStatus {
        let now = reactor::ticks::now();
        let mut done = 0;
        loop {
            let io = {
                let mut st = self.state.borrow_mut();
                match st.heap.peek() {
                    Some(d) if d.deadline <= now => st.heap.pop().map(|d| (d.io, d.submit)),
                    Some(d) => {
                        self.poller.wake_at(d.deadline);
                        None
                    }
                    None => None,
                }
            };
            let Some((mut io, submit)) = io else { break };
            done += 1;
            if submit {
                *io.module_ctx() = 0;
                let base = self.base.clone();
                base.submit(io, self.clone());
                continue;
            }
            let status = io.status();
            io.complete(status);
        }
        reactor::PollStatus::from_work(done > 0)
    }
}

impl BdevChannel for DelayChannel {
    fn submit(self: Rc<Self>, mut io: IoBox) {
        let kind = match io.io_type {
            IoType::Read => Some((LatencyKind::AvgRead, LatencyKind::P99Read)),
            IoType::Write => Some((LatencyKind::AvgWrite, LatencyKind::P99Write)),
            _ => None,
        };
        let deadline = kind.map_or(0, |(avg, p99)| {
            let tail = self.state.borrow_mut().rng.random_range(0..P99_ONE_IN) == 0;
            let us = self.latencies.get_us(if tail { p99 } else { avg });
            io.submit_tick() + reactor::ticks::from_us(us)
        });
        if self.hold_writes && io.io_type == IoType::Write && deadline > reactor::ticks::now() {
            self.push(deadline, io, true);
            return;
        }
        *io.module_ctx() = deadline;
        let base = self.base.clone();
        base.submit(io, self);
    }
}

impl IoCompletion for DelayChannel {
    fn io_done(&self, mut io: IoBox) {
        let deadline = *io.module_ctx();
        if deadline <= reactor::ticks::now() {
            let status = io.status();
            io.complete(status);
            return;
        }
        self.push(deadline, io, false);
    }
}

impl DelayChannel {
    fn push(&self, deadline: u64, io: IoBox, submit: bool) {
        let mut st = self.state.borrow_mut();
        st.seq += 1;
        let seq = st.seq;
        let earliest = st.heap.peek().is_none_or(|d| deadline < d.deadline);
        st.heap.push(Delayed {
            deadline,
            seq,
            io,
            submit,
        });
        drop(st);
        if earliest {
            self.poller.wake_at(deadline);
        }
    }
}

/// Creation parameters (`bdev_delay_create`), latencies in µs.
#[derive(Debug, Clone)]
pub struct DelayOptions {
    pub name: String,
    pub base_bdev_name: String,
    pub uuid: Option<Uuid>,
    pub avg_read_latency: u64,
    pub p99_read_latency: u64,
    pub avg_write_latency: u64,
    pub p99_write_latency: u64,
    /// Writes wait for their deadline before going to the base.
    pub hold_writes: bool,
}
