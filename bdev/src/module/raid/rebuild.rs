//! Rebuilding a raid1 member, and what happens when a member fails.
//!
//! A rebuild is a [`crate::job`] on the main reactor that copies the data
//! region from an operational member to the target one [`STEP_BYTES`] at
//! a time (one step per window, through one buffer reused for the whole
//! rebuild; `bdev_raid_set_options`' bandwidth cap is the job's rate
//! limit).
//! Each step takes a writes range lock ([`RangeLock`]) of its range (the
//! rebuild window) on the RAID bdev: foreground writes that overlap it wait
//! in their channel until the step is done, and the copy starts only once
//! every write admitted before the lock has completed. So a write never
//! races the copy of its blocks, and the rebuild always progresses. Writes
//! outside the window go ahead, to the target member too. Between steps the
//! task yields to I/O and checks its [`CancelToken`]: deleting the RAID or
//! removing the target member cancels it at a step boundary. Waiting for a
//! window's lock also gives way to a cancel: a raid1 write held for a
//! superblock keeps the lock waiting, and the superblock write that
//! releases it may first cancel this rebuild (`member_failed`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use reactor::CancelToken;

use super::{MemberState, RaidShared};
use crate::bdev::BdevHandle;
use crate::io::{IoBox, IoType};
use crate::job::{self, Job, JobEnd, JobOptions, RateLimit, Step, StepCx};
use crate::range_lock::{LockKind, RangeLock};

/// How often a window's lock wait looks at the cancel token.
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_micros(100);

/// Bytes copied per step by default (SPDK's process window): bounded work
/// between yields and cancel checks. `bdev_raid_set_options` changes it.
pub const STEP_BYTES: u64 = 1 << 20;

static WINDOW_BYTES: AtomicU64 = AtomicU64::new(STEP_BYTES);
/// Rebuild bandwidth cap in bytes/s (0: none).
static MAX_BANDWIDTH: AtomicU64 = AtomicU64::new(0);

/// `bdev_raid_set_options` as it stands, for `save_config`.
pub(crate) fn options_json() -> serde_json::Value {
    serde_json::json!({
        "method": "bdev_raid_set_options",
        "params": {
            "process_window_size_kb": WINDOW_BYTES.load(Ordering::Relaxed) / 1024,
            "process_max_bandwidth_mb_sec": MAX_BANDWIDTH.load(Ordering::Relaxed) >> 20,
        }
    })
}

pub(super) fn set_window_kb(kb: u64) {
    WINDOW_BYTES.store(kb.saturating_mul(1024), Ordering::Relaxed);
}

pub(super) fn set_max_bandwidth_mb_s(mb: u64) {
    MAX_BANDWIDTH.store(mb.saturating_mul(1 << 20), Ordering::Relaxed);
}

thread_local! {
    static RUNNING: RefCell<BTreeMap<String, CancelToken>> = const { RefCell::new(BTreeMap::new()) };
}

/// Starts rebuilding slot `target` of `shared` (already `Rebuilding`): a
/// [`crate::job`] on the main reactor, then the result recorded.
pub(super) fn start(shared: Arc<RaidShared>, target: usize) {
    let token = CancelToken::new();
    // Held until the result is recorded, so a cancel waits for that too.
    let Ok(guard) = token.begin() else { return };
    RUNNING.with(|r| r.borrow_mut().insert(shared.name.clone(), token.clone()));
    let window = WINDOW_BYTES
        .load(Ordering::Relaxed)
        .max(shared.block_size as u64);
    let step = window / shared.block_size as u64;
    let opts = JobOptions {
        buffers: (1, (step * shared.block_size as u64) as usize),
        cancel: Some(token),
        ..JobOptions::default()
    };
    let s = shared.clone();
    let job = job::spawn(reactor::current_core(), opts, move || {
        Rebuild::new(s, target, step)
    });
    reactor::spawn_local(async move {
        let result = job.wait().await;
        shared.rebuild.active.store(false, Ordering::Release);
        RUNNING.with(|r| r.borrow_mut().remove(&shared.name));
        match result {
            Ok(JobEnd::Done(())) => {
                shared.set_state(target, MemberState::Operational);
                log::info!("raid {}: rebuild of slot {target} done", shared.name);
                let _ = super::write_superblock(&shared, false).await;
            }
            Ok(JobEnd::Cancelled) => {
                log::info!("raid {}: rebuild of slot {target} cancelled", shared.name)
            }
            Err(e) => {
                log::warn!("raid {}: rebuild of slot {target} failed: {e}", shared.name);
            }
        }
        drop(guard);
    });
}

/// Cancels the rebuild of RAID `name`, if any, and waits until it stopped.
pub(super) async fn cancel(name: &str) {
    let token = RUNNING.with(|r| r.borrow().get(name).cloned());
    if let Some(t) = token {
        t.cancel().await;
    }
}

/// The rebuild as a job: one window per step.
struct Rebuild {
    shared: Arc<RaidShared>,
    target: usize,
    /// The windows are locked on the RAID bdev itself: its channels hold
    /// the foreground writes (raid1 block x is member data block x).
    raid: BdevHandle,
    at: u64,
    total: u64,
    step: u64,
}

impl Rebuild {
    fn new(shared: Arc<RaidShared>, target: usize, step: u64) -> crate::Result<Rebuild> {
        let raid = crate::registry::lookup(&shared.name)
            .filter(|b| b.module() == super::MODULE)
            .ok_or_else(|| crate::BdevError::NoDevice(shared.name.clone()))?;
        let total = shared.data_size.min(raid.num_blocks());
        let rb = &shared.rebuild;
        rb.slot.store(target as u64, Ordering::Release);
        rb.total_blocks.store(total, Ordering::Release);
        rb.done_blocks.store(0, Ordering::Release);
        rb.active.store(true, Ordering::Release);
        log::info!(
            "raid {}: rebuilding slot {target}, {total} blocks",
            shared.name
        );
        Ok(Rebuild {
            shared,
            target,
            raid,
            at: 0,
            total,
            step: step.max(1),
        })
    }
}

impl Job for Rebuild {
    type Output = ();

    fn total_units(&self) -> u64 {
        self.total
    }

    /// `bdev_raid_set_options`' cap, which may change during the rebuild.
    fn rate(&self) -> Option<RateLimit> {
        let cap = MAX_BANDWIDTH.load(Ordering::Relaxed);
        (cap > 0).then_some(RateLimit::BytesPerSec(cap))
    }

    /// Copies the next window under its range lock.
    async fn step(&mut self, cx: &mut StepCx) -> crate::Result<Step<()>> {
        if self.at >= self.total {
            return Ok(Step::Done(()));
        }
        if self.shared.state(self.target) != MemberState::Rebuilding {
            return Err(crate::BdevError::Io);
        }
        let (at, n) = (self.at, self.step.min(self.total - self.at));
        // Resolves once the writes admitted before it are done; a cancel
        // meanwhile withdraws it and the runner stops at this boundary.
        let lock = futures_lite::future::or(
            async { Some(RangeLock::acquire(&self.raid, at, n, LockKind::Writes).await) },
            async {
                while !cx.is_cancelled() {
                    reactor::sleep(CANCEL_POLL).await;
                }
                None
            },
        )
        .await;
        let Some(lock) = lock else {
            return Ok(Step::Progress { units: 0, bytes: 0 });
        };
        let lock = lock?;
        let copied = copy_step(&self.shared, self.target, at, n, cx).await;
        lock.unlock().await;
        copied?;
        self.at += n;
        self.shared
            .rebuild
            .done_blocks
            .store(self.at, Ordering::Release);
        Ok(Step::Progress {
            units: n,
            bytes: n * self.shared.block_size as u64,
        })
    }
}

/// Copies blocks `[at, at+n)` of the data region from an operational
/// member to `target` through the job's buffer.
async fn copy_step(
    shared: &Arc<RaidShared>,
    target: usize,
    at: u64,
    n: u64,
    cx: &mut StepCx,
) -> crate::Result<()> {
    let (source, dest) = {
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        let source = (0..members.len())
            .filter(|&i| i != target && shared.state(i) == MemberState::Operational)
            .find_map(|i| members[i].bdev.clone());
        (source, members.get(target).and_then(|m| m.bdev.clone()))
    };
    let (Some(source), Some(dest)) = (source, dest) else {
        return Err(crate::BdevError::Io);
    };
    let buf = cx.take_buf().ok_or(crate::BdevError::NoMemory)?;
    let off = shared.data_offset + at;
    let mut io = source
        .get_channel()
        .submit_wait(IoBox::with(IoType::Read, off, n, buf))
        .await;
    let read_ok = io.status().is_success();
    if read_ok {
        io.io_type = IoType::Write;
        io = dest.get_channel().submit_wait(io).await;
    }
    let ok = read_ok && io.status().is_success();
    cx.put_buf(io.take_buf());
    if ok {
        Ok(())
    } else {
        Err(crate::BdevError::Io)
    }
}

/// A member failed an I/O (reported by a channel): release it, stop a
/// rebuild onto it, record it in the superblock of the others (which
/// releases the raid1 writes its channels hold until that is on disk).
pub(super) async fn member_failed(name: String, slot: usize) {
    let Some(shared) = super::find(&name) else {
        return;
    };
    let rebuilding_it = shared.rebuild.active.load(Ordering::Acquire)
        && shared.rebuild.slot.load(Ordering::Acquire) == slot as u64;
    if rebuilding_it {
        cancel(&name).await;
    }
    let desc = {
        let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members.get_mut(slot).and_then(|m| {
            log::warn!("raid {name}: member {} failed, released", m.name);
            m.bdev = None;
            m.desc.take()
        })
    };
    drop(desc);
    shared.generation.fetch_add(1, Ordering::AcqRel);
    // Also with no operational member left: then no member takes it, and
    // the writes waiting for it fail instead of waiting forever.
    let _ = super::write_superblock(&shared, false).await;
}
