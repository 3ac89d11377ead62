//! LBA range locks and quiesce (SPDK's `bdev_lock_lba_range` and
//! `spdk_bdev_quiesce`): hold a block range of a bdev still while the
//! holder copies, snapshots or checks it.
//!
//! [`RangeLock::acquire`] records the range on every core's channel of the
//! bdev (one message per core) and resolves once every I/O the lock
//! blocks that the channels admitted before has completed, on every core.
//! From then until unlock, I/O the lock blocks waits in its channel, in
//! order, and is never failed; when the lock goes ([`RangeLock::unlock`],
//! or dropping the guard) the waiting I/O is submitted again. What a lock
//! blocks ([`LockKind`]): [`LockKind::Writes`] blocks writes, unmaps and
//! write-zeroes overlapping it (reads go ahead, as in SPDK);
//! [`LockKind::All`] blocks every I/O overlapping it. A quiesce
//! ([`RangeLock::quiesce`]) is an `All` lock of the whole bdev, which
//! also holds data-less commands (flush, reset).
//!
//! Invariants:
//! - Between `acquire` resolving and the unlock starting, no I/O the lock
//!   blocks is in the bdev's module on any core, except the owner's: I/O
//!   submitted through [`RangeLock::submit`] (or with [`RangeLock::owner`])
//!   passes this lock (other locks still apply).
//! - Overlapping locks (of any kind) are held one at a time, granted in the
//!   order they were asked for; non-overlapping ones are independent.
//! - A channel created while a lock is held starts with it.
//! - A lock waits only for I/O admitted before it reached that core: what
//!   it blocks waits instead, and the owner's does not count. I/O admitted
//!   while no lock existed is not recorded (that would cost the hot path),
//!   so a lock waits for all of it, overlapping or not: still bounded,
//!   since it is already in the module.
//! - Split pieces are not checked: their parent was, and it stays in the
//!   channel until they are done.
//!
//! Use from a module: a lock waits for the I/O it covers that is already
//! in the bdev, so a module must not await a lock on its own bdev while it
//! holds an overlapping I/O of that bdev (it would wait for itself). Lock
//! the bdev below it instead (submitting its own I/O there as the owner),
//! or take the lock from a control task before the I/O that needs it is
//! admitted (the RAID rebuild locks its windows on the RAID bdev from the
//! rebuild job; its copy goes to the members, not through the lock).
//!
//! Cost: a channel with no lock pays nothing beyond the one flag test it
//! already makes for I/O shaping (`gate`); a channel with a lock records
//! each admitted I/O's range in a per-channel slab (no allocation once it
//! has grown) and checks it against the channel's few locks.
//!
//! Errors: a range outside the bdev, or empty, is `Invalid`; a bdev being
//! unregistered is `NoDevice`. Dropping an `acquire` that has not resolved
//! withdraws the lock (a caller may race it against cancellation).

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bdev::BdevHandle;
use crate::channel::IoChannel;
use crate::error::{BdevError, Result};
use crate::io::{frame_flags, IoBox, IoCompletion, IoType};
use crate::slab::Slab;

/// What a lock holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Writes, unmaps and write-zeroes overlapping the range.
    Writes,
    /// Every I/O overlapping the range.
    All,
}

/// Owner tokens, unique in the process (0: no owner).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Marks a tracked-slab index as absent in a frame.
pub(crate) const NO_SLOT: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
pub(crate) struct LockDesc {
    id: u64,
    start: u64,
    end: u64,
    kind: LockKind,
    /// Covers the whole bdev and also holds data-less commands.
    quiesce: bool,
}

impl LockDesc {
    fn overlaps(&self, o: &LockDesc) -> bool {
        self.start < o.end && o.start < self.end
    }

    /// Whether the lock holds back an I/O of `t` over `[off, off+n)`.
    #[inline]
    fn blocks(&self, t: IoType, off: u64, n: u64) -> bool {
        let overlap = if n == 0 {
            self.quiesce
        } else {
            off < self.end && self.start < off.saturating_add(n)
        };
        overlap
            && match self.kind {
                LockKind::All => true,
                LockKind::Writes => {
                    matches!(t, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
                }
            }
    }
}

/// The bdev-wide lock table (in the bdev's shared state). Touched only by
/// lock, unlock and channel creation, never per I/O.
#[derive(Default)]
pub(crate) struct LockTable {
    /// Granted or being granted; `true`: being released (new channels do
    /// not take it, new locks still wait for it).
    active: Vec<(LockDesc, bool)>,
    /// Waiting for an overlapping lock, in the order asked.
    pending: VecDeque<(LockDesc, reactor::CompletionSender<()>)>,
}

impl LockTable {
    fn blocked(&self, d: &LockDesc) -> bool {
        self.active.iter().any(|(a, _)| a.overlaps(d))
            || self.pending.iter().any(|(p, _)| p.overlaps(d))
    }

    /// Moves pending locks that no longer overlap an active one or an
    /// earlier pending one to active; returns their wake-ups.
    fn promote(&mut self) -> Vec<reactor::CompletionSender<()>> {
        let mut woken = Vec::new();
        let mut still: VecDeque<(LockDesc, reactor::CompletionSender<()>)> = VecDeque::new();
        for (d, tx) in std::mem::take(&mut self.pending) {
            let free = !self.active.iter().any(|(a, _)| a.overlaps(&d))
                && !still.iter().any(|(p, _)| p.overlaps(&d));
            if free {
                self.active.push((d, false));
                woken.push(tx);
            } else {
                still.push_back((d, tx));
            }
        }
        self.pending = still;
        woken
    }
}

/// A held (or being acquired) range lock. Dropping it unlocks in the
/// background; [`RangeLock::unlock`] unlocks and waits until every core
/// has let its waiting I/O go.
pub struct RangeLock {
    bdev: BdevHandle,
    desc: LockDesc,
    released: bool,
}

impl RangeLock {
    /// Locks `[offset_blocks, offset_blocks + num_blocks)` of `bdev`
    /// against what `kind` says; resolves once granted (see the module
    /// docs). Any core.
    pub async fn acquire(
        bdev: &BdevHandle,
        offset_blocks: u64,
        num_blocks: u64,
        kind: LockKind,
    ) -> Result<RangeLock> {
        let end = offset_blocks.checked_add(num_blocks);
        if num_blocks == 0 || end.is_none_or(|e| e > bdev.num_blocks()) {
            return Err(BdevError::Invalid(format!(
                "bdev {}: lock range {offset_blocks}+{num_blocks} outside its {} blocks",
                bdev.name(),
                bdev.num_blocks()
            )));
        }
        let quiesce =
            offset_blocks == 0 && num_blocks == bdev.num_blocks() && kind == LockKind::All;
        Self::acquire_desc(bdev, offset_blocks, num_blocks, kind, quiesce).await
    }

    /// Quiesces `bdev`: an [`LockKind::All`] lock of all of it, which also
    /// holds flush and reset. Resolves once no I/O is in its module.
    pub async fn quiesce(bdev: &BdevHandle) -> Result<RangeLock> {
        Self::acquire_desc(bdev, 0, bdev.num_blocks(), LockKind::All, true).await
    }

    async fn acquire_desc(
        bdev: &BdevHandle,
        start: u64,
        n: u64,
        kind: LockKind,
        quiesce: bool,
    ) -> Result<RangeLock> {
        if bdev.is_removed() {
            return Err(BdevError::NoDevice(bdev.name().to_string()));
        }
        let desc = LockDesc {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            start,
            end: start + n,
            kind,
            quiesce,
        };
        let wait = {
            let mut t = bdev.lock_table();
            if t.blocked(&desc) {
                let (tx, rx) = reactor::completion();
                t.pending.push_back((desc, tx));
                Some(rx)
            } else {
                t.active.push((desc, false));
                None
            }
        };
        // From here the guard exists, so a dropped acquire withdraws.
        let guard = RangeLock {
            bdev: bdev.clone(),
            desc,
            released: false,
        };
        if let Some(rx) = wait {
            if rx.await.is_err() {
                return Err(BdevError::NoDevice(bdev.name().to_string()));
            }
        }
        // Record it everywhere first (synchronously on each core, so an
        // unlock's later message finds it), then wait for the drains.
        let mut drains = Vec::new();
        for core in reactor::cores() {
            let b = bdev.clone();
            if let Ok(Some(rx)) = reactor::call(core, move || lock_arrived(&b, desc)).await {
                drains.push(rx);
            }
        }
        for rx in drains {
            // Abandoned: the lock was withdrawn on that core meanwhile.
            let _ = rx.await;
        }
        Ok(guard)
    }

    /// The token that lets I/O pass this lock
    /// ([`IoChannel::submit_as_owner`]).
    pub fn owner(&self) -> u64 {
        self.desc.id
    }

    pub fn bdev(&self) -> &BdevHandle {
        &self.bdev
    }

    /// `(offset_blocks, num_blocks)` locked.
    pub fn range(&self) -> (u64, u64) {
        (self.desc.start, self.desc.end - self.desc.start)
    }

    /// Submits the owner's `io` into `ch` (a channel of this lock's bdev),
    /// passing this lock.
    pub fn submit(&self, ch: &IoChannel, io: IoBox, cb: Rc<dyn IoCompletion>) {
        ch.submit_as_owner(io, cb, self.desc.id);
    }

    /// Unlocks and waits until every core has resubmitted the I/O the lock
    /// held back.
    pub async fn unlock(mut self) {
        self.released = true;
        release(self.bdev.clone(), self.desc.id).await;
    }
}

impl Drop for RangeLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (bdev, id) = (self.bdev.clone(), self.desc.id);
        if reactor::try_current_core().is_some() {
            reactor::spawn_local(release(bdev, id));
        } else {
            // No reactor (teardown): no channel is left to visit.
            let woken = {
                let mut t = bdev.lock_table();
                t.active.retain(|(d, _)| d.id != id);
                t.pending.retain(|(d, _)| d.id != id);
                t.promote()
            };
            drop(woken);
        }
    }
}

/// Takes lock `id` off every core's channel (resubmitting what waited),
/// then out of the table, granting locks that waited for it.
async fn release(bdev: BdevHandle, id: u64) {
    let was_pending = {
        let mut t = bdev.lock_table();
        let before = t.pending.len();
        t.pending.retain(|(d, _)| d.id != id);
        for (d, releasing) in t.active.iter_mut() {
            if d.id == id {
                *releasing = true;
            }
        }
        t.pending.len() != before
    };
    if !was_pending {
        for core in reactor::cores() {
            let b = bdev.clone();
            let _ = reactor::call(core, move || lock_left(&b, id)).await;
        }
    }
    let woken = {
        let mut t = bdev.lock_table();
        t.active.retain(|(d, _)| d.id != id);
        t.promote()
    };
    for tx in woken {
        tx.complete(());
    }
}

/// A lock as one channel holds it.
struct ChLock {
    desc: LockDesc,
    /// Admissions on this channel when the lock reached it: tracked I/O
    /// with a sequence number up to this one was admitted before.
    seq: u64,
    /// I/O admitted before the lock that it still waits for.
    left: u64,
    /// Of `left`, I/O admitted while no lock existed (not tracked).
    untracked_left: u64,
    grant: Option<reactor::CompletionSender<()>>,
}

/// An I/O admitted into a channel that had a lock.
#[derive(Default, Clone, Copy)]
struct Tracked {
    io_type: Option<IoType>,
    start: u64,
    n: u64,
    seq: u64,
}

/// One channel's part of the range locks (in `ChannelInner`).
#[derive(Default)]
pub(crate) struct ChannelLocks {
    locks: Vec<ChLock>,
    /// I/O held back by a lock, in arrival order, with its owner token.
    waiting: VecDeque<(IoBox, u64)>,
    tracked: Slab<Tracked>,
    /// Frames marked `LOCK_SEEN` still in the channel.
    seen_in_flight: u64,
    /// Admissions while the channel had a lock (tracked sequence numbers).
    seq: u64,
}

impl ChannelLocks {
    /// The locks to start a channel with: those held on its bdev.
    pub(crate) fn for_new_channel(bdev: &BdevHandle) -> ChannelLocks {
        let t = bdev.lock_table();
        ChannelLocks {
            locks: t
                .active
                .iter()
                .filter(|(_, releasing)| !releasing)
                .map(|(d, _)| ChLock {
                    desc: *d,
                    seq: 0,
                    left: 0,
                    untracked_left: 0,
                    grant: None,
                })
                .collect(),
            ..ChannelLocks::default()
        }
    }

    pub(crate) fn has_locks(&self) -> bool {
        !self.locks.is_empty()
    }

    /// Whether a lock still waits for I/O admitted before it.
    fn draining(&self) -> bool {
        self.locks.iter().any(|l| l.left > 0)
    }

    /// One I/O a lock was waiting for completed.
    fn count_down(l: &mut ChLock) {
        l.left -= 1;
        if l.left == 0 {
            if let Some(tx) = l.grant.take() {
                tx.complete(());
            }
        }
    }
}

/// On a core: records lock `d` on this core's channel of `bdev`, if any.
/// Some(event) when it must wait for I/O admitted before.
fn lock_arrived(bdev: &BdevHandle, d: LockDesc) -> Option<reactor::CompletionEvent<()>> {
    let ch = crate::channel::find_channel(bdev.id())?;
    let mut l = ch.locks().borrow_mut();
    if l.locks.iter().any(|k| k.desc.id == d.id) {
        // The channel was created after the lock entered the table.
        return None;
    }
    let untracked = ch.in_flight().saturating_sub(l.seen_in_flight);
    let mut overlapping = 0;
    let mut i = 0;
    while let Some(t) = l.tracked.get(i) {
        if t.io_type.is_some_and(|ty| d.blocks(ty, t.start, t.n)) {
            overlapping += 1;
        }
        i += 1;
    }
    let left = untracked + overlapping;
    let (grant, rx) = if left > 0 {
        let (tx, rx) = reactor::completion();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let seq = l.seq;
    l.locks.push(ChLock {
        desc: d,
        seq,
        left,
        untracked_left: untracked,
        grant,
    });
    let draining = l.draining();
    drop(l);
    ch.set_lock_flags(true, draining);
    rx
}

/// On a core: takes lock `id` off this core's channel of `bdev` and
/// resubmits, in order, what waited.
fn lock_left(bdev: &BdevHandle, id: u64) {
    let Some(ch) = crate::channel::find_channel(bdev.id()) else {
        return;
    };
    let waiting = {
        let mut l = ch.locks().borrow_mut();
        // Dropping a lock still draining abandons its grant.
        l.locks.retain(|k| k.desc.id != id);
        std::mem::take(&mut l.waiting)
    };
    let (has, draining) = {
        let l = ch.locks().borrow();
        (l.has_locks(), l.draining())
    };
    ch.set_lock_flags(has, draining);
    ch.resubmit_waiting(waiting);
}

/// Admission of `io` (top-level, validated, in `ch`'s frame) into a
/// channel with locks: Some(io) to hand to the module, its range tracked;
/// None when a lock holds it back (queued in the channel).
pub(crate) fn admit(ch: &IoChannel, mut io: IoBox, owner: u64) -> Option<IoBox> {
    let mut l = ch.locks().borrow_mut();
    let (t, off, n) = (io.io_type, io.offset_blocks, io.num_blocks);
    let f = io.top_frame()?;
    if f.flags & frame_flags::LOCK_SEEN == 0 {
        f.flags |= frame_flags::LOCK_SEEN;
        f.lock_slot = NO_SLOT;
        l.seen_in_flight += 1;
    }
    if l.locks
        .iter()
        .any(|k| k.desc.id != owner && k.desc.blocks(t, off, n))
    {
        l.waiting.push_back((io, owner));
        return None;
    }
    l.seq += 1;
    let seq = l.seq;
    let slot = l.tracked.alloc();
    if let Some(e) = l.tracked.get_mut(slot) {
        *e = Tracked {
            io_type: Some(t),
            start: off,
            n,
            seq,
        };
    }
    if let Some(f) = io.top_frame() {
        f.lock_slot = slot;
    }
    Some(io)
}

/// Marks a frame that will not reach the module (failed validation, a
/// split piece) as seen by a channel with locks, so no lock counts it as
/// I/O admitted before it.
pub(crate) fn mark_seen(ch: &IoChannel, io: &mut IoBox) {
    if let Some(f) = io.top_frame() {
        if f.flags & frame_flags::LOCK_SEEN == 0 {
            f.flags |= frame_flags::LOCK_SEEN;
            f.lock_slot = NO_SLOT;
            ch.locks().borrow_mut().seen_in_flight += 1;
        }
    }
}

/// A frame marked `LOCK_SEEN` left `ch`: forget its range, and count it
/// down for the locks that waited for it.
pub(crate) fn seen_done(ch: &IoChannel, slot: u32) {
    let mut guard = ch.locks().borrow_mut();
    let l = &mut *guard;
    l.seen_in_flight = l.seen_in_flight.saturating_sub(1);
    if slot == NO_SLOT {
        return;
    }
    let Some(t) = l.tracked.get_mut(slot).map(std::mem::take) else {
        return;
    };
    l.tracked.release(slot);
    let Some(ty) = t.io_type else { return };
    let mut any = false;
    for k in l.locks.iter_mut().filter(|k| k.left > 0) {
        if t.seq <= k.seq && k.desc.blocks(ty, t.start, t.n) {
            ChannelLocks::count_down(k);
        }
        any |= k.left > 0;
    }
    let has = l.has_locks();
    drop(guard);
    if !any {
        ch.set_lock_flags(has, false);
    }
}

/// An I/O admitted while no lock existed left `ch`: every lock still
/// draining counted it.
pub(crate) fn untracked_done(ch: &IoChannel) {
    let mut l = ch.locks().borrow_mut();
    let mut any = false;
    for k in l.locks.iter_mut() {
        if k.untracked_left > 0 {
            k.untracked_left -= 1;
            ChannelLocks::count_down(k);
        }
        any |= k.left > 0;
    }
    let has = l.has_locks();
    drop(l);
    if !any {
        ch.set_lock_flags(has, false);
    }
}

#[cfg(test)]
#[path = "range_lock_tests.rs"]
mod tests;
