//! Per-core I/O channels and the completion path.
//!
//! A channel is one bdev's presence on one core (SPDK's io channel): the
//! module's per-core state plus that core's statistics. A core has at most
//! one channel per bdev, shared by every user on that core; it is created
//! on first `get_channel` and destroyed when the last user drops it, its
//! statistics then folded into the bdev's retired totals.
//!
//! Submit is where the framework shapes I/O for the module
//! ([`crate::IoRequirements`]): it splits reads, writes and compares that
//! are too large or cross the bdev's boundary (`split.rs`), and bounces
//! data that is not aligned as the module needs through an aligned buffer
//! from the pool, copying a read's data back at completion.
//!
//! Completions that happen while the core is inside a `submit` are queued
//! and delivered by this core's completion poller on the next loop turn,
//! never recursively. A module that runs out of a resource completes with
//! `NoMemory`; the I/O then waits in its channel (SPDK's nomem_io /
//! io_wait) and is resubmitted when another I/O of the channel completes,
//! or after [`NOMEM_RETRY_DELAY`] if none is in flight: the submitter never
//! sees a transient shortage.
//!
//! Range locks (`range_lock.rs`) hold back I/O that overlaps a locked
//! range in the channel it was submitted to, ahead of any shaping. A
//! channel's `gate` flags say whether a submit needs the locks or the
//! shaping at all, so a bdev with neither takes one test and goes straight
//! to the module.
//!
//! Unregister drains: it waits on every core until the bdev's channel has
//! no I/O in flight before the module's `destruct` runs (`drain_core`).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::bdev::BdevHandle;
use crate::io::{frame_flags, Frame, IoBox, IoBuf, IoCompletion, IoStatus, IoType, SharedBuf};
use crate::stats::IoStat;

/// How long an I/O the module refused for lack of resources waits before
/// it is retried when nothing else on its channel is in flight to signal
/// that resources came back.
pub const NOMEM_RETRY_DELAY: Duration = Duration::from_micros(100);

mod attention {
    /// I/O waits in `nomem`.
    pub const NOMEM: u8 = 1;
    /// Unregister waits in `drain_waiters`.
    pub const DRAIN: u8 = 2;
    /// A range lock waits for I/O admitted before it.
    pub const LOCKS: u8 = 4;
}

/// `ChannelInner::gate`: why a submit leaves the direct path.
mod gate {
    /// The bdev has [`crate::IoRequirements`] (split, bounce).
    pub const SHAPES: u8 = 1;
    /// The channel holds a range lock.
    pub const LOCKS: u8 = 2;
}

/// A module's per-core channel: receives I/O for its bdev on this core.
pub trait BdevChannel {
    /// Starts `io`. The module completes it later (or inline) with
    /// [`IoBox::complete`]. The request has been validated against the
    /// bdev's geometry and supported I/O types, and shaped to its
    /// [`crate::IoRequirements`].
    fn submit(self: Rc<Self>, io: IoBox);
}

pub(crate) struct ChannelInner {
    bdev: BdevHandle,
    module: Rc<dyn BdevChannel>,
    stats: RefCell<IoStat>,
    /// I/O submitted into this channel and not yet completed.
    in_flight: Cell<u64>,
    /// `attention::*`: slow-path work a completion must look at, so the
    /// common completion reads one flag.
    attention: Cell<u8>,
    /// I/O the module completed with `NoMemory`, in order, to resubmit.
    nomem: RefCell<VecDeque<IoBox>>,
    /// In the core's list of channels the retry timer visits.
    nomem_listed: Cell<bool>,
    /// Unregister waiting for `in_flight` to reach zero.
    drain_waiters: RefCell<Vec<reactor::CompletionSender<()>>>,
    /// `gate::*`: a submit takes the direct path when zero.
    gate: Cell<u8>,
    /// Range locks on this channel and the I/O they hold back.
    locks: RefCell<crate::range_lock::ChannelLocks>,
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        if let Ok(mut r) = self.bdev.0.retired_stats.lock() {
            r.merge(&self.stats.borrow());
        }
        let id = self.bdev.id();
        let _ = CORE.try_with(|c| {
            let mut map = c.channels.borrow_mut();
            if map.get(&id).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&id);
            }
        });
    }
}

/// A handle to a bdev's channel on the current core. Not `Send`.
#[derive(Clone)]
pub struct IoChannel(Rc<ChannelInner>);

impl IoChannel {
    pub fn bdev(&self) -> &BdevHandle {
        &self.0.bdev
    }

    /// I/O in this channel not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.0.in_flight.get()
    }

    pub fn stats(&self) -> IoStat {
        *self.0.stats.borrow()
    }

    /// Submits `io`; `cb` receives it back when it completes. Invalid
    /// requests (out of range, buffer too small, unsupported type, removed
    /// bdev) complete with `Failed` without reaching the module.
    #[inline]
    pub fn submit(&self, io: IoBox, cb: Rc<dyn IoCompletion>) {
        self.submit_with(io, cb, 0);
    }

    /// [`IoChannel::submit`] with `frame_flags` for this layer's frame.
    #[inline]
    pub(crate) fn submit_with(&self, io: IoBox, cb: Rc<dyn IoCompletion>, flags: u8) {
        self.submit_frame(io, cb, flags, 0);
    }

    /// Submits `io` as the owner of range lock `owner`
    /// ([`crate::range_lock::RangeLock::owner`]): that lock does not hold
    /// it back (others still do).
    pub fn submit_as_owner(&self, io: IoBox, cb: Rc<dyn IoCompletion>, owner: u64) {
        self.submit_frame(io, cb, 0, owner);
    }

    #[inline]
    fn submit_frame(&self, mut io: IoBox, cb: Rc<dyn IoCompletion>, flags: u8, owner: u64) {
        let frame = Frame {
            channel: self.clone(),
            cb,
            submit_tick: reactor::ticks::now(),
            module_ctx: 0,
            flags,
            lock_slot: 0,
        };
        if !io.push_frame(frame) {
            // Stack overflow: cannot even record a frame; fail to the caller
            // through the frames it already has.
            log::error!("I/O stack deeper than {}", crate::io::MAX_IO_STACK);
            io.complete(IoStatus::Failed);
            return;
        }
        self.0.in_flight.set(self.0.in_flight.get() + 1);
        if !io.shared.is_empty() && io.io_type == IoType::Read {
            // A view left from an earlier zero-copy read of this IoBox.
            io.shared = SharedBuf::empty();
        }
        let ok = self.validate(&io);
        CORE.with(|c| c.submit_depth.set(c.submit_depth.get() + 1));
        if !ok {
            self.fail_invalid(io);
        } else if self.0.gate.get() != 0 {
            self.submit_gated(io, flags, owner);
        } else {
            self.0.module.clone().submit(io);
        }
        CORE.with(|c| c.submit_depth.set(c.submit_depth.get() - 1));
    }

    #[cold]
    fn fail_invalid(&self, mut io: IoBox) {
        if self.0.gate.get() & gate::LOCKS != 0 {
            crate::range_lock::mark_seen(self, &mut io);
        }
        io.complete(IoStatus::Failed);
    }

    /// Submit through the range locks, then the shaping, of this channel.
    fn submit_gated(&self, mut io: IoBox, flags: u8, owner: u64) {
        if self.0.gate.get() & gate::LOCKS != 0 {
            if flags & frame_flags::SPLIT_CHILD != 0 {
                crate::range_lock::mark_seen(self, &mut io);
            } else {
                match crate::range_lock::admit(self, io, owner) {
                    Some(admitted) => io = admitted,
                    None => return,
                }
            }
        }
        if self.0.bdev.0.shapes_io {
            self.submit_shaped(io, flags);
        } else {
            self.0.module.clone().submit(io);
        }
    }

    pub(crate) fn locks(&self) -> &RefCell<crate::range_lock::ChannelLocks> {
        &self.0.locks
    }

    /// Sets whether the channel holds range locks (`has`) and whether one
    /// still waits for I/O admitted before it (`draining`).
    pub(crate) fn set_lock_flags(&self, has: bool, draining: bool) {
        let g = self.0.gate.get() & !gate::LOCKS;
        self.0.gate.set(if has { g | gate::LOCKS } else { g });
        let a = self.0.attention.get() & !attention::LOCKS;
        self.0
            .attention
            .set(if draining { a | attention::LOCKS } else { a });
    }

    /// Submits again, in order, I/O a range lock held back (each is checked
    /// against the locks still there). Completions are deferred as in any
    /// submit.
    pub(crate) fn resubmit_waiting(&self, waiting: VecDeque<(IoBox, u64)>) {
        if waiting.is_empty() {
            return;
        }
        CORE.with(|c| c.submit_depth.set(c.submit_depth.get() + 1));
        for (io, owner) in waiting {
            if self.0.bdev.is_removed() {
                io.complete(IoStatus::Failed);
                continue;
            }
            if let Some(io) = crate::range_lock::admit(self, io, owner) {
                if self.0.bdev.0.shapes_io {
                    self.submit_shaped(io, 0);
                } else {
                    self.0.module.clone().submit(io);
                }
            }
        }
        CORE.with(|c| c.submit_depth.set(c.submit_depth.get() - 1));
    }

    /// Submit for a bdev with [`crate::IoRequirements`]: split, or bounce
    /// misaligned data, then hand to the module.
    fn submit_shaped(&self, mut io: IoBox, flags: u8) {
        let b = &self.0.bdev.0;
        if b.splits
            && flags & frame_flags::SPLIT_CHILD == 0
            && io.io_type.has_data()
            && b.props.io.needs_split(io.offset_blocks, io.num_blocks)
        {
            return crate::split::start(self, io);
        }
        if b.align_mask != 0 && self.misaligned(&io) {
            bounce(&mut io, self.0.bdev.block_size());
        }
        self.0.module.clone().submit(io);
    }

    #[inline]
    fn validate(&self, io: &IoBox) -> bool {
        let b = &self.0.bdev;
        if b.is_removed() || !b.io_type_supported(io.io_type) {
            return false;
        }
        if io.io_type == IoType::Reset || io.io_type == IoType::Flush {
            return io.offset_blocks.saturating_add(io.num_blocks) <= b.num_blocks();
        }
        let Some(end) = io.offset_blocks.checked_add(io.num_blocks) else {
            return false;
        };
        if end > b.num_blocks() || io.num_blocks == 0 {
            return false;
        }
        let need = io.num_blocks * b.block_size() as u64;
        match io.io_type {
            IoType::Read => io.buf.len() as u64 >= need,
            IoType::Write | IoType::Compare => io.data().len() as u64 >= need,
            _ => true,
        }
    }

    /// Whether `io`'s data does not start where the module needs it to.
    #[inline]
    fn misaligned(&self, io: &IoBox) -> bool {
        let mask = self.0.bdev.0.align_mask;
        match io.io_type {
            IoType::Read => io.buf.as_ptr() as usize & mask != 0,
            IoType::Write | IoType::Compare => io.data_ptr() as usize & mask != 0,
            _ => false,
        }
    }

    /// Queues `io`, which the module refused for lack of resources, for
    /// resubmission (its frame stays: it is still in this channel).
    fn queue_nomem(&self, mut io: IoBox) {
        io.set_status(IoStatus::Pending);
        self.0.stats.borrow_mut().nomem += 1;
        self.0.nomem.borrow_mut().push_back(io);
        self.0
            .attention
            .set(self.0.attention.get() | attention::NOMEM);
        if !self.0.nomem_listed.replace(true) {
            CORE.with(|c| c.nomem_channels.borrow_mut().push(self.clone()));
        }
        if self.0.in_flight.get() as usize == self.0.nomem.borrow().len() {
            // Nothing else in flight will complete and retry these.
            CORE.with(|c| c.arm_nomem_retry());
        }
    }

    /// Resubmits the I/O waiting for resources, in order. Inline
    /// completions are deferred (as in any submit), so a module that
    /// refuses again cannot recurse.
    fn retry_nomem(&self) {
        let n = self.0.nomem.borrow().len();
        if n == 0 {
            return;
        }
        CORE.with(|c| c.submit_depth.set(c.submit_depth.get() + 1));
        for _ in 0..n {
            let Some(io) = self.0.nomem.borrow_mut().pop_front() else {
                break;
            };
            if self.0.nomem.borrow().is_empty() {
                self.0
                    .attention
                    .set(self.0.attention.get() & !attention::NOMEM);
            }
            self.0.module.clone().submit(io);
        }
        CORE.with(|c| c.submit_depth.set(c.submit_depth.get() - 1));
    }
}

/// Moves `io`'s data into an aligned buffer from the pool (copying a
/// write's data in); the submitter's buffers wait in the I/O's stash until
/// `unbounce` at this layer's completion.
fn bounce(io: &mut crate::io::BdevIo, block_size: u32) {
    let len = (io.num_blocks * block_size as u64) as usize;
    let mut b = IoBuf::new(len);
    if io.io_type != IoType::Read {
        b.as_mut_slice().copy_from_slice(&io.data()[..len]);
    }
    debug_assert!(io.stash_buf.is_empty() && io.stash_shared.is_empty());
    io.stash_buf = std::mem::replace(&mut io.buf, b);
    io.stash_shared = std::mem::take(&mut io.shared);
    if let Some(f) = io.top_frame() {
        f.flags |= frame_flags::BOUNCED;
    }
}

/// Puts the submitter's buffers back, with a successful read's data.
fn unbounce(io: &mut crate::io::BdevIo) {
    let lent = std::mem::take(&mut io.shared);
    let bounced = std::mem::replace(&mut io.buf, std::mem::take(&mut io.stash_buf));
    io.shared = std::mem::take(&mut io.stash_shared);
    if io.io_type == IoType::Read && io.status().is_success() {
        let src = if lent.is_empty() {
            bounced.as_slice()
        } else {
            lent.as_slice()
        };
        let n = src.len().min(io.buf.len());
        io.buf.as_mut_slice()[..n].copy_from_slice(&src[..n]);
    }
}

/// Pops `io`'s top frame: records the layer's statistics and hands the I/O
/// to that layer's callback. Deferred while the core is inside a submit.
pub(crate) fn complete_io(io: IoBox) {
    let defer = CORE.with(|c| {
        if c.submit_depth.get() > 0 {
            let was_empty = {
                let mut q = c.deferred.borrow_mut();
                let empty = q.is_empty();
                q.push_back(io);
                empty
            };
            if was_empty {
                c.wake_completion_poller();
            }
            None
        } else {
            Some(io)
        }
    });
    if let Some(io) = defer {
        deliver(io, reactor::ticks::now());
    }
}

/// Pops the top frame at time `now` (one clock read serves a whole batch
/// of deferred completions) and hands the I/O to that layer's callback,
/// with the layer's latency recorded in the I/O. An I/O refused for lack
/// of resources stays in its channel instead, to be resubmitted.
#[inline]
fn deliver(mut io: IoBox, now: u64) {
    if io.status() == IoStatus::NoMemory {
        if let Some(ch) = io.top_frame().map(|f| f.channel.clone()) {
            ch.queue_nomem(io);
            return;
        }
    }
    let Some(frame) = io.pop_frame() else {
        log::error!("completed an I/O with no submitter; dropping it");
        return;
    };
    let ch = &frame.channel.0;
    ch.in_flight.set(ch.in_flight.get() - 1);
    let latency = now.saturating_sub(frame.submit_tick);
    io.set_latency_ticks(latency);
    if frame.flags != 0 && !deliver_flagged(&mut io, &frame) {
        // A split's piece: the parent records the statistics.
    } else {
        let bytes = io.num_blocks * ch.bdev.block_size() as u64;
        ch.stats
            .borrow_mut()
            .record(io.io_type, bytes, latency, io.status());
    }
    if ch.attention.get() != 0 {
        return deliver_with_attention(io, frame);
    }
    let cb = frame.cb;
    drop(frame.channel);
    cb.io_done(io);
}

/// The frame flags' part of a completion: the submitter's buffers back
/// after a bounce. Returns whether the layer records statistics.
#[cold]
fn deliver_flagged(io: &mut crate::io::BdevIo, frame: &Frame) -> bool {
    let flags = frame.flags;
    if flags & frame_flags::BOUNCED != 0 {
        unbounce(io);
    }
    if flags & frame_flags::LOCK_SEEN != 0 {
        crate::range_lock::seen_done(&frame.channel, frame.lock_slot);
    }
    flags & frame_flags::SPLIT_CHILD == 0
}

/// A completion on a channel with slow-path work: wake a drain waiting for
/// the last I/O; hand this one on, then retry the I/O waiting for
/// resources (after, so the retries do not overtake its completion).
#[cold]
fn deliver_with_attention(io: IoBox, frame: Frame) {
    let ch = frame.channel.clone();
    let inner = &ch.0;
    if inner.attention.get() & attention::LOCKS != 0 && frame.flags & frame_flags::LOCK_SEEN == 0 {
        crate::range_lock::untracked_done(&ch);
    }
    if inner.in_flight.get() == 0 && inner.attention.get() & attention::DRAIN != 0 {
        inner
            .attention
            .set(inner.attention.get() & !attention::DRAIN);
        for w in inner.drain_waiters.take() {
            w.complete(());
        }
    }
    let cb = frame.cb;
    drop(frame.channel);
    cb.io_done(io);
    if inner.attention.get() & attention::NOMEM != 0 {
        ch.retry_nomem();
    }
}

/// Per-core state of the bdev layer.
struct CoreState {
    channels: RefCell<HashMap<u64, Weak<ChannelInner>>>,
    deferred: RefCell<VecDeque<IoBox>>,
    submit_depth: Cell<u32>,
    poller: RefCell<Option<reactor::PollerHandle>>,
    /// Channels with I/O waiting for resources.
    nomem_channels: RefCell<Vec<IoChannel>>,
    nomem_poller: RefCell<Option<reactor::PollerHandle>>,
}

impl CoreState {
    fn wake_completion_poller(&self) {
        if let Some(p) = self.poller.borrow().as_ref() {
            p.wake();
        }
    }

    fn arm_nomem_retry(&self) {
        let mut p = self.nomem_poller.borrow_mut();
        let p = p.get_or_insert_with(|| {
            reactor::register_on_demand_poller("bdev_nomem_retry", retry_nomem_channels)
        });
        p.wake_after(NOMEM_RETRY_DELAY);
    }
}

thread_local! {
    static CORE: CoreState = CoreState {
        channels: RefCell::new(HashMap::new()),
        deferred: RefCell::new(VecDeque::new()),
        submit_depth: Cell::new(0),
        poller: RefCell::new(None),
        nomem_channels: RefCell::new(Vec::new()),
        nomem_poller: RefCell::new(None),
    };
}

/// The retry timer: resubmits waiting I/O of every channel that has
/// nothing else in flight (the others retry on their own completions). One
/// refused again is queued again, which re-arms the timer.
fn retry_nomem_channels() -> reactor::PollStatus {
    let chans = CORE.with(|c| c.nomem_channels.take());
    let mut work = false;
    for ch in chans {
        ch.0.nomem_listed.set(false);
        let waiting = ch.0.nomem.borrow().len();
        if waiting > 0 && ch.0.in_flight.get() as usize == waiting {
            work = true;
            ch.retry_nomem();
        }
        if !ch.0.nomem.borrow().is_empty() && !ch.0.nomem_listed.replace(true) {
            CORE.with(|c| c.nomem_channels.borrow_mut().push(ch.clone()));
        }
    }
    reactor::PollStatus::from_work(work)
}

/// Resolves once this core's channel of bdev `id` (if any) has no I/O in
/// flight. New I/O is refused meanwhile (the bdev is marked removed), so
/// this is the last of it.
pub(crate) async fn drain_core(id: u64) {
    let ch = CORE.with(|c| c.channels.borrow().get(&id).and_then(|w| w.upgrade()));
    let Some(ch) = ch else { return };
    if ch.in_flight.get() == 0 {
        return;
    }
    let (tx, rx) = reactor::completion();
    ch.drain_waiters.borrow_mut().push(tx);
    ch.attention.set(ch.attention.get() | attention::DRAIN);
    drop(ch);
    let _ = rx.await;
}

/// Delivers the completions queued before this turn; those queued while it
/// runs wait for the next turn, so a resubmitting callback cannot starve
/// the rest of the loop.
fn run_deferred() -> reactor::PollStatus {
    let n = CORE.with(|c| c.deferred.borrow().len());
    let now = reactor::ticks::now();
    for _ in 0..n {
        let Some(io) = CORE.with(|c| c.deferred.borrow_mut().pop_front()) else {
            break;
        };
        deliver(io, now);
    }
    if CORE.with(|c| !c.deferred.borrow().is_empty()) {
        CORE.with(|c| c.wake_completion_poller());
    }
    reactor::PollStatus::from_work(n > 0)
}

fn ensure_completion_poller() {
    CORE.with(|c| {
        let mut p = c.poller.borrow_mut();
        if p.is_none() {
            *p = Some(reactor::register_on_demand_poller(
                "bdev_completions",
                run_deferred,
            ));
        }
    });
}

pub(crate) fn get_channel(bdev: &BdevHandle) -> IoChannel {
    let id = bdev.id();
    if let Some(ch) = CORE.with(|c| c.channels.borrow().get(&id).and_then(|w| w.upgrade())) {
        return IoChannel(ch);
    }
    ensure_completion_poller();
    let module = bdev.ops().create_channel();
    let locks = crate::range_lock::ChannelLocks::for_new_channel(bdev);
    let mut g = if bdev.0.shapes_io { gate::SHAPES } else { 0 };
    if locks.has_locks() {
        g |= gate::LOCKS;
    }
    let inner = Rc::new(ChannelInner {
        gate: Cell::new(g),
        locks: RefCell::new(locks),
        bdev: bdev.clone(),
        module,
        stats: RefCell::new(IoStat::default()),
        in_flight: Cell::new(0),
        attention: Cell::new(0),
        nomem: RefCell::new(VecDeque::new()),
        nomem_listed: Cell::new(false),
        drain_waiters: RefCell::new(Vec::new()),
    });
    CORE.with(|c| c.channels.borrow_mut().insert(id, Rc::downgrade(&inner)));
    IoChannel(inner)
}

/// This core's live channel of bdev `id`, if any.
pub(crate) fn find_channel(id: u64) -> Option<IoChannel> {
    CORE.with(|c| c.channels.borrow().get(&id).and_then(|w| w.upgrade()))
        .map(IoChannel)
}

/// This core's live channel statistics, by bdev id.
pub(crate) fn core_stats() -> Vec<(u64, IoStat)> {
    CORE.with(|c| {
        c.channels
            .borrow()
            .iter()
            .filter_map(|(id, w)| w.upgrade().map(|ch| (*id, *ch.stats.borrow())))
            .collect()
    })
}

/// Applies `mode` to this core's live channel statistics of `ids`.
pub(crate) fn reset_core_stats(ids: &[u64], mode: crate::stats::ResetMode) {
    CORE.with(|c| {
        for (id, w) in c.channels.borrow().iter() {
            if ids.contains(id) {
                if let Some(ch) = w.upgrade() {
                    ch.stats.borrow_mut().reset(mode);
                }
            }
        }
    });
}

/// Completion for control-path I/O awaited by a future (RPC, tests, examine).
/// Allocates; not for the data path.
struct OneShot(RefCell<Option<reactor::CompletionSender<IoBoxSend>>>);

/// `IoBox` is per-core; this wrapper only crosses the event on the same core.
struct IoBoxSend(IoBox);
// SAFETY: the event is completed and awaited on the same core (the one that
// submitted); the IoBox never actually moves to another thread.
unsafe impl Send for IoBoxSend {}

impl IoCompletion for OneShot {
    fn io_done(&self, io: IoBox) {
        if let Some(tx) = self.0.borrow_mut().take() {
            tx.complete(IoBoxSend(io));
        }
    }
}

impl IoChannel {
    /// Submits `io` and waits for it. For control-path use.
    pub async fn submit_wait(&self, io: IoBox) -> IoBox {
        let (tx, rx) = reactor::completion();
        self.submit(io, Rc::new(OneShot(RefCell::new(Some(tx)))));
        match rx.await {
            Ok(IoBoxSend(io)) => io,
            // The sender lives in the I/O's frame; it is dropped unfired only
            // if the reactor is torn down mid-I/O.
            Err(_) => {
                let mut io = IoBox::new();
                io.set_status_failed();
                io
            }
        }
    }

    /// Reads `num_blocks` at `offset_blocks`.
    pub async fn read(&self, offset_blocks: u64, num_blocks: u64) -> crate::Result<Vec<u8>> {
        let len = num_blocks as usize * self.bdev().block_size() as usize;
        let io = IoBox::with(
            IoType::Read,
            offset_blocks,
            num_blocks,
            crate::io::IoBuf::new(len),
        );
        let io = self.submit_wait(io).await;
        self.status_to_result(io.status())?;
        Ok(io.buf.as_slice()[..len].to_vec())
    }

    /// Writes `data` (a whole number of blocks) at `offset_blocks`.
    pub async fn write(&self, offset_blocks: u64, data: &[u8]) -> crate::Result<()> {
        let bs = self.bdev().block_size() as usize;
        if data.is_empty() || !data.len().is_multiple_of(bs) {
            return Err(crate::BdevError::Invalid(format!(
                "write length {} is not a multiple of the block size {bs}",
                data.len()
            )));
        }
        let io = IoBox::with(
            IoType::Write,
            offset_blocks,
            (data.len() / bs) as u64,
            crate::io::IoBuf::from_slice(data),
        );
        self.status_to_result(self.submit_wait(io).await.status())
    }

    /// Submits a data-less I/O (flush, unmap, write_zeroes, reset).
    pub async fn command(
        &self,
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> crate::Result<()> {
        let io = IoBox::with(
            io_type,
            offset_blocks,
            num_blocks,
            crate::io::IoBuf::empty(),
        );
        self.status_to_result(self.submit_wait(io).await.status())
    }

    fn status_to_result(&self, s: IoStatus) -> crate::Result<()> {
        match s {
            IoStatus::Success => Ok(()),
            IoStatus::NoMemory => Err(crate::BdevError::NoMemory),
            IoStatus::Aborted => Err(crate::BdevError::Cancelled),
            _ => Err(crate::BdevError::Io),
        }
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
