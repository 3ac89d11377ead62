//! Rebuilding a raid1 member, and what happens when a member fails.
//!
//! A rebuild is a task on the main reactor that copies the data region
//! from an operational member to the target one [`STEP_BYTES`] at a time.
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
//!
//! Next step: the framework's job runner (`crate::job`) is the natural
//! home for this loop (steps, budget, progress, rate limit, cancel).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use reactor::CancelToken;

use super::{MemberState, RaidShared};
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

/// Starts rebuilding slot `target` of `shared` (already `Rebuilding`).
pub(super) fn start(shared: Arc<RaidShared>, target: usize) {
    let token = CancelToken::new();
    let Ok(guard) = token.begin() else { return };
    RUNNING.with(|r| r.borrow_mut().insert(shared.name.clone(), token.clone()));
    reactor::spawn_local(async move {
        let result = copy_all(&shared, target, &token).await;
        shared.rebuild.active.store(false, Ordering::Release);
        RUNNING.with(|r| r.borrow_mut().remove(&shared.name));
        match result {
            Ok(true) => {
                shared.set_state(target, MemberState::Operational);
                log::info!("raid {}: rebuild of slot {target} done", shared.name);
                let _ = super::write_superblock(&shared, false).await;
            }
            Ok(false) => log::info!("raid {}: rebuild of slot {target} cancelled", shared.name),
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

/// Copies the whole data region; Ok(false) when cancelled.
async fn copy_all(
    shared: &Arc<RaidShared>,
    target: usize,
    token: &CancelToken,
) -> crate::Result<bool> {
    let rb = &shared.rebuild;
    let bs = shared.block_size as u64;
    let total = shared.data_size;
    let step = (WINDOW_BYTES.load(Ordering::Relaxed) / bs).max(1);
    let started = std::time::Instant::now();
    rb.slot.store(target as u64, Ordering::Release);
    rb.total_blocks.store(total, Ordering::Release);
    rb.done_blocks.store(0, Ordering::Release);
    rb.active.store(true, Ordering::Release);
    // The windows are locked on the RAID bdev itself: its channels hold
    // the foreground writes (raid1 block x is member data block x).
    let raid = crate::registry::lookup(&shared.name)
        .filter(|b| b.module() == super::MODULE)
        .ok_or_else(|| crate::BdevError::NoDevice(shared.name.clone()))?;
    let total = total.min(raid.num_blocks());
    log::info!(
        "raid {}: rebuilding slot {target}, {total} blocks",
        shared.name
    );
    let mut at = 0;
    while at < total {
        if token.is_cancelled() {
            return Ok(false);
        }
        if shared.state(target) != MemberState::Rebuilding {
            return Err(crate::BdevError::Io);
        }
        let n = step.min(total - at);
        // Lock the window: resolves once the writes admitted before it
        // are done; a cancel meanwhile withdraws it.
        let lock = futures_lite::future::or(
            async { Some(RangeLock::acquire(&raid, at, n, LockKind::Writes).await) },
            async {
                while !token.is_cancelled() {
                    reactor::sleep(CANCEL_POLL).await;
                }
                None
            },
        )
        .await;
        let Some(lock) = lock else {
            return Ok(false);
        };
        let lock = lock?;
        let copied = copy_step(shared, target, at, n).await;
        lock.unlock().await;
        copied?;
        at += n;
        rb.done_blocks.store(at, Ordering::Release);
        // Yield to foreground work between steps; keep under the cap.
        let cap = MAX_BANDWIDTH.load(Ordering::Relaxed);
        let due =
            (cap > 0).then(|| std::time::Duration::from_secs_f64((at * bs) as f64 / cap as f64));
        match due.and_then(|d| d.checked_sub(started.elapsed())) {
            Some(wait) => reactor::sleep(wait).await,
            None => futures_lite::future::yield_now().await,
        }
    }
    Ok(true)
}

/// Copies blocks `[at, at+n)` of the data region from an operational
/// member to `target`.
async fn copy_step(shared: &Arc<RaidShared>, target: usize, at: u64, n: u64) -> crate::Result<()> {
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
    let off = shared.data_offset + at;
    let data = source.get_channel().read(off, n).await?;
    dest.get_channel().write(off, &data).await
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
