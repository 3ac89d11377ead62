//! Pollers: the cooperative units of work a reactor runs.
//!
//! A poller is a closure that does a bounded amount of work and says whether
//! it found any ([`PollStatus::Busy`]) or not. There are three kinds, as in
//! SPDK:
//! - *every-loop* pollers run on each iteration of the reactor loop (socket
//!   and completion-queue polling);
//! - *timed* pollers run once per period (keep-alive checks, statistics);
//! - *on-demand* pollers run only when woken, now ([`PollerHandle::wake`])
//!   or at a deadline ([`PollerHandle::wake_at`]), which is how a module
//!   that waits for time (the delay bdev) costs nothing while it waits.
//!
//! Invariants: a poller runs only on the reactor that registered it; it is
//! never re-entered; unregistering it from inside its own closure is allowed
//! and takes effect before it could run again. Deadlines are kept in a heap
//! with lazy deletion, so re-arming is O(log n) and never searches.

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::ticks;

/// What one run of a poller found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    Busy,
    Idle,
}

impl PollStatus {
    pub fn from_work(did_work: bool) -> PollStatus {
        if did_work {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PollerKind {
    EveryLoop,
    Timed { period_ticks: u64 },
    OnDemand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PollerState {
    Running,
    Paused,
    Unregistered,
}

/// Sentinel for "no deadline armed".
const UNARMED: u64 = u64::MAX;

pub(crate) struct PollerEntry {
    name: String,
    kind: PollerKind,
    f: RefCell<Box<dyn FnMut() -> PollStatus>>,
    state: Cell<PollerState>,
    /// The deadline the heap will honour; heap slots with another tick are
    /// stale and skipped.
    next_tick: Cell<u64>,
    /// Already in the ready list.
    queued: Cell<bool>,
    run_count: Cell<u64>,
    busy_count: Cell<u64>,
}

impl PollerEntry {
    fn run(&self) -> PollStatus {
        let status = (self.f.borrow_mut())();
        self.run_count.set(self.run_count.get() + 1);
        if status == PollStatus::Busy {
            self.busy_count.set(self.busy_count.get() + 1);
        }
        status
    }

    fn runnable(&self) -> bool {
        self.state.get() == PollerState::Running
    }
}

struct TimerSlot {
    tick: u64,
    seq: u64,
    entry: Rc<PollerEntry>,
}

impl PartialEq for TimerSlot {
    fn eq(&self, other: &Self) -> bool {
        self.tick == other.tick && self.seq == other.seq
    }
}
impl Eq for TimerSlot {}
impl PartialOrd for TimerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerSlot {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .tick
            .cmp(&self.tick)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// Statistics of one poller, as `thread_get_pollers` reports them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PollerStats {
    pub name: String,
    pub state: &'static str,
    pub run_count: u64,
    pub busy_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_ticks: Option<u64>,
}

/// All pollers of one reactor.
#[derive(Default)]
pub(crate) struct PollerSet {
    every: RefCell<Vec<Rc<PollerEntry>>>,
    timed: RefCell<Vec<Rc<PollerEntry>>>,
    on_demand: RefCell<Vec<Rc<PollerEntry>>>,
    heap: RefCell<BinaryHeap<TimerSlot>>,
    ready: RefCell<Vec<Rc<PollerEntry>>>,
    /// Reused by `run_ready` so draining the ready list never allocates.
    ready_spare: RefCell<Vec<Rc<PollerEntry>>>,
    seq: Cell<u64>,
    /// Some entry was unregistered: compact the lists after this iteration.
    dirty: Cell<bool>,
}

impl PollerSet {
    pub(crate) fn register(
        &self,
        name: String,
        kind: PollerKind,
        f: Box<dyn FnMut() -> PollStatus>,
    ) -> Rc<PollerEntry> {
        let entry = Rc::new(PollerEntry {
            name,
            kind,
            f: RefCell::new(f),
            state: Cell::new(PollerState::Running),
            next_tick: Cell::new(UNARMED),
            queued: Cell::new(false),
            run_count: Cell::new(0),
            busy_count: Cell::new(0),
        });
        match kind {
            PollerKind::EveryLoop => self.every.borrow_mut().push(entry.clone()),
            PollerKind::Timed { period_ticks } => {
                self.timed.borrow_mut().push(entry.clone());
                self.arm(&entry, ticks::now().saturating_add(period_ticks));
            }
            PollerKind::OnDemand => self.on_demand.borrow_mut().push(entry.clone()),
        }
        entry
    }

    fn arm(&self, entry: &Rc<PollerEntry>, tick: u64) {
        entry.next_tick.set(tick);
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        self.heap.borrow_mut().push(TimerSlot {
            tick,
            seq,
            entry: entry.clone(),
        });
    }

    pub(crate) fn wake(&self, entry: &Rc<PollerEntry>) {
        if entry.queued.replace(true) {
            return;
        }
        self.ready.borrow_mut().push(entry.clone());
    }

    /// Arms a one-shot deadline; an earlier armed deadline wins.
    pub(crate) fn wake_at(&self, entry: &Rc<PollerEntry>, tick: u64) {
        if entry.next_tick.get() <= tick {
            return;
        }
        self.arm(entry, tick);
    }

    pub(crate) fn unregister(&self, entry: &Rc<PollerEntry>) {
        if entry.state.replace(PollerState::Unregistered) != PollerState::Unregistered {
            self.dirty.set(true);
        }
    }

    pub(crate) fn set_paused(&self, entry: &Rc<PollerEntry>, paused: bool) {
        match (entry.state.get(), paused) {
            (PollerState::Running, true) => entry.state.set(PollerState::Paused),
            (PollerState::Paused, false) => entry.state.set(PollerState::Running),
            _ => {}
        }
    }

    /// Runs woken on-demand pollers. Returns whether any found work.
    pub(crate) fn run_ready(&self) -> bool {
        if self.ready.borrow().is_empty() {
            return false;
        }
        let mut batch = std::mem::take(&mut *self.ready_spare.borrow_mut());
        std::mem::swap(&mut batch, &mut *self.ready.borrow_mut());
        let mut busy = false;
        for entry in batch.drain(..) {
            entry.queued.set(false);
            if entry.runnable() {
                busy |= entry.run() == PollStatus::Busy;
            }
        }
        *self.ready_spare.borrow_mut() = batch;
        busy
    }

    pub(crate) fn run_every_loop(&self) -> bool {
        let mut busy = false;
        let mut i = 0;
        loop {
            // Re-borrow each time: a poller may register another.
            let entry = match self.every.borrow().get(i) {
                Some(e) => e.clone(),
                None => break,
            };
            if entry.runnable() {
                busy |= entry.run() == PollStatus::Busy;
            }
            i += 1;
        }
        busy
    }

    /// Runs every poller whose deadline has passed.
    pub(crate) fn run_due(&self, now: u64) -> bool {
        let mut busy = false;
        loop {
            let slot = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(top) if top.tick <= now => heap.pop(),
                    _ => None,
                }
            };
            let Some(slot) = slot else { break };
            let entry = slot.entry;
            if entry.next_tick.get() != slot.tick || entry.state.get() == PollerState::Unregistered
            {
                continue; // stale slot
            }
            entry.next_tick.set(UNARMED);
            if let PollerKind::Timed { period_ticks } = entry.kind {
                // Skip missed periods rather than running a burst.
                let mut next = slot.tick.saturating_add(period_ticks);
                if next <= now {
                    next = now.saturating_add(period_ticks);
                }
                self.arm(&entry, next);
            }
            if entry.runnable() {
                busy |= entry.run() == PollStatus::Busy;
            }
        }
        busy
    }

    /// The earliest armed deadline, for parking.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        let mut heap = self.heap.borrow_mut();
        // Drop stale slots so a long-gone deadline does not cause a wake-up.
        while let Some(top) = heap.peek() {
            if top.entry.next_tick.get() == top.tick
                && top.entry.state.get() != PollerState::Unregistered
            {
                return Some(top.tick);
            }
            heap.pop();
        }
        None
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    /// Removes unregistered entries (after an iteration, never during one).
    pub(crate) fn compact(&self) {
        if !self.dirty.replace(false) {
            return;
        }
        let keep = |e: &Rc<PollerEntry>| e.state.get() != PollerState::Unregistered;
        self.every.borrow_mut().retain(keep);
        self.timed.borrow_mut().retain(keep);
        self.on_demand.borrow_mut().retain(keep);
        let mut heap = self.heap.borrow_mut();
        if heap.iter().any(|s| !keep(&s.entry)) {
            let slots = std::mem::take(&mut *heap).into_vec();
            *heap = slots.into_iter().filter(|s| keep(&s.entry)).collect();
        }
    }

    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let count = |v: &RefCell<Vec<Rc<PollerEntry>>>, state| {
            v.borrow().iter().filter(|e| e.state.get() == state).count()
        };
        let active =
            count(&self.every, PollerState::Running) + count(&self.on_demand, PollerState::Running);
        let timed = count(&self.timed, PollerState::Running);
        let paused = count(&self.every, PollerState::Paused)
            + count(&self.timed, PollerState::Paused)
            + count(&self.on_demand, PollerState::Paused);
        (active, timed, paused)
    }

    pub(crate) fn stats(&self) -> Vec<PollerStats> {
        let mut out = Vec::new();
        for list in [&self.every, &self.timed, &self.on_demand] {
            for e in list.borrow().iter() {
                let state = match e.state.get() {
                    PollerState::Running => "running",
                    PollerState::Paused => "paused",
                    PollerState::Unregistered => continue,
                };
                out.push(PollerStats {
                    name: e.name.clone(),
                    state,
                    run_count: e.run_count.get(),
                    busy_count: e.busy_count.get(),
                    period_ticks: match e.kind {
                        PollerKind::Timed { period_ticks } => Some(period_ticks),
                        _ => None,
                    },
                });
            }
        }
        out
    }

    /// Drops every poller (reactor shutdown). Returns the names still live.
    pub(crate) fn clear(&self) -> Vec<String> {
        let mut names = Vec::new();
        for list in [&self.every, &self.timed, &self.on_demand] {
            for e in list.borrow_mut().drain(..) {
                if e.state.replace(PollerState::Unregistered) != PollerState::Unregistered {
                    names.push(e.name.clone());
                }
            }
        }
        self.heap.borrow_mut().clear();
        self.ready.borrow_mut().clear();
        names
    }
}

/// Owner's handle to a registered poller. Dropping it unregisters the poller.
pub struct PollerHandle {
    pub(crate) entry: Rc<PollerEntry>,
    pub(crate) set: Weak<crate::runtime::Reactor>,
}

impl PollerHandle {
    /// Runs an on-demand poller at the next loop iteration (no-op for other
    /// kinds, which run anyway).
    pub fn wake(&self) {
        if let Some(r) = self.set.upgrade() {
            r.pollers().wake(&self.entry);
            r.wake_loop();
        }
    }

    /// Runs the poller once at `tick` (see [`crate::ticks`]) unless an
    /// earlier deadline is already armed.
    pub fn wake_at(&self, tick: u64) {
        if let Some(r) = self.set.upgrade() {
            r.pollers().wake_at(&self.entry, tick);
            r.wake_loop();
        }
    }

    pub fn wake_after(&self, delay: Duration) {
        self.wake_at(ticks::now().saturating_add(ticks::from_duration(delay)));
    }

    pub fn pause(&self) {
        if let Some(r) = self.set.upgrade() {
            r.pollers().set_paused(&self.entry, true);
        }
    }

    pub fn resume(&self) {
        if let Some(r) = self.set.upgrade() {
            r.pollers().set_paused(&self.entry, false);
            r.wake_loop();
        }
    }

    pub fn name(&self) -> &str {
        &self.entry.name
    }

    pub fn run_count(&self) -> u64 {
        self.entry.run_count.get()
    }

    /// Unregisters now (also done on drop).
    pub fn unregister(self) {}
}

impl Drop for PollerHandle {
    fn drop(&mut self) {
        if let Some(r) = self.set.upgrade() {
            r.pollers().unregister(&self.entry);
        } else {
            self.entry.state.set(PollerState::Unregistered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> (Rc<Cell<u32>>, Box<dyn FnMut() -> PollStatus>) {
        let c = Rc::new(Cell::new(0));
        let c2 = c.clone();
        (
            c,
            Box::new(move || {
                c2.set(c2.get() + 1);
                PollStatus::Busy
            }),
        )
    }

    #[test]
    fn every_loop_and_unregister() {
        let set = PollerSet::default();
        let (c, f) = counter();
        let e = set.register("a".into(), PollerKind::EveryLoop, f);
        assert!(set.run_every_loop());
        assert!(set.run_every_loop());
        assert_eq!(c.get(), 2);
        set.unregister(&e);
        assert!(!set.run_every_loop());
        set.compact();
        assert_eq!(set.every.borrow().len(), 0);
    }

    #[test]
    fn on_demand_runs_once_per_wake() {
        let set = PollerSet::default();
        let (c, f) = counter();
        let e = set.register("a".into(), PollerKind::OnDemand, f);
        assert!(!set.run_ready());
        set.wake(&e);
        set.wake(&e);
        assert!(set.run_ready());
        assert!(!set.run_ready());
        assert_eq!(c.get(), 1);
    }

    #[test]
    fn deadlines_fire_in_order_and_rearm_lazily() {
        let set = PollerSet::default();
        let (c, f) = counter();
        let e = set.register("a".into(), PollerKind::OnDemand, f);
        set.wake_at(&e, 1000);
        set.wake_at(&e, 500); // earlier wins
        set.wake_at(&e, 800); // later ignored
        assert_eq!(set.next_deadline(), Some(500));
        assert!(!set.run_due(499));
        assert!(set.run_due(500));
        assert_eq!(c.get(), 1);
        // The stale slot at 1000 must not fire.
        assert!(!set.run_due(2000));
        assert_eq!(c.get(), 1);
        assert_eq!(set.next_deadline(), None);
    }

    #[test]
    fn timed_poller_repeats_without_bursts() {
        let set = PollerSet::default();
        let (c, f) = counter();
        let _e = set.register("t".into(), PollerKind::Timed { period_ticks: 10 }, f);
        let first = set.next_deadline().unwrap();
        assert!(set.run_due(first));
        // Far in the future: runs once, not once per missed period.
        assert!(set.run_due(first + 1000));
        assert_eq!(c.get(), 2);
        assert_eq!(set.next_deadline(), Some(first + 1010));
    }
}
