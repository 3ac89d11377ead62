//! A RAID's channel on one core: maps each I/O onto member I/Os ("children")
//! submitted to the members' channels on the same core, and completes the
//! I/O when its children have.
//!
//! - raid0: split at strip boundaries, strip `s` on member `s % n`.
//! - concat: members back to back, split at member boundaries.
//! - raid1: writes (and unmap, write zeroes, flush, reset) go to every
//!   operational or rebuilding member and succeed if an operational one
//!   did; a member that fails a write is marked failed. Reads go to the
//!   operational member with the fewest I/Os outstanding on this core and
//!   are retried on the others if they fail.
//!
//! Children carry pieces of the parent's data, never a copy: read-only
//! shares of a write's (every mirror gets the same bytes), writable windows
//! of a read's, through the parent slot's [`BufLender`]; the parent waits
//! in a per-channel slab (no allocation per I/O once it has grown) and gets
//! its buffer back when the children are done. A child's tag is
//! `parent << 8 | slot`.
//!
//! Durability of raid1 writes (as Linux md holds writes while
//! `MD_SB_CHANGE_PENDING`): a write is acknowledged only once every member
//! the superblock on disk calls current has it. One that a member lost
//! (its child failed, or the member was already out of service in memory
//! when it was issued) stays in the slab, children done, until a
//! superblock recording that member's failure is on the survivors
//! ([`RaidShared::durable`], published by the main reactor with a message
//! to every core); it fails if no superblock can be written any more. Else
//! a crash in between leaves the stale member looking current, and reads
//! after reassembly may return the data it lost. The normal path pays one
//! atomic load per write completion; the held path may allocate.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Level, MemberState, RaidShared, DURABLE_LOST};
use crate::buf::{BufLender, SharedBuf};
use crate::channel::{BdevChannel, IoChannel};
use crate::io::{IoBox, IoBuf, IoCompletion, IoStatus, IoType};
use crate::slab::Slab;

#[derive(Default)]
struct Parent {
    io: Option<IoBox>,
    /// Lends the parent's buffer to its children.
    lender: BufLender,
    /// A write's read-only data, sliced for the children.
    shared: SharedBuf,
    /// Children still in flight.
    remaining: u32,
    failed: bool,
    /// raid1 writes: children that succeeded on operational members.
    ok_operational: u32,
    /// raid1 reads: members already tried.
    tried: u64,
    /// raid1 writes: the slots whose child succeeded.
    ok_mask: u64,
}

pub(super) struct RaidChannel {
    shared: Arc<RaidShared>,
    generation: Cell<u64>,
    members: RefCell<Vec<Option<IoChannel>>>,
    /// This core's I/Os outstanding per member (raid1 read balancing).
    outstanding: RefCell<Vec<u32>>,
    parents: RefCell<Slab<Parent>>,
    /// Children being planned (kept to reuse its allocation).
    scratch: RefCell<Vec<(usize, IoBox)>>,
    /// raid1 writes done on their members, waiting for the superblock to
    /// record a member they missed (parents).
    sb_wait: RefCell<std::collections::VecDeque<u32>>,
    /// In this core's [`SB_WAITERS`].
    sb_listed: Cell<bool>,
    me: Weak<RaidChannel>,
}

thread_local! {
    /// This core's channels holding writes for a superblock, rechecked
    /// when the main reactor publishes one.
    static SB_WAITERS: RefCell<Vec<Weak<RaidChannel>>> = const { RefCell::new(Vec::new()) };
}

/// Has every core recheck the writes its channels hold for a superblock
/// (after [`RaidShared::durable`] changed). Main reactor.
pub(super) fn release_sb_waiters_everywhere() {
    for core in reactor::cores() {
        reactor::send(core, release_sb_waiters);
    }
}

fn release_sb_waiters() {
    let listed = SB_WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    for ch in listed.iter().filter_map(Weak::upgrade) {
        ch.sb_listed.set(false);
    }
    for ch in listed.iter().filter_map(Weak::upgrade) {
        ch.recheck_sb();
    }
}

impl RaidChannel {
    pub(super) fn new(shared: Arc<RaidShared>) -> Rc<RaidChannel> {
        let n = shared.num_slots();
        Rc::new_cyclic(|me: &Weak<RaidChannel>| RaidChannel {
            shared,
            generation: Cell::new(0),
            members: RefCell::new(vec![None; n]),
            outstanding: RefCell::new(vec![0; n]),
            parents: RefCell::new(Slab::default()),
            scratch: RefCell::new(Vec::new()),
            sb_wait: RefCell::new(std::collections::VecDeque::new()),
            sb_listed: Cell::new(false),
            me: me.clone(),
        })
    }

    /// Picks up member changes (rare): takes the members lock, off the
    /// per-I/O path.
    fn refresh(&self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g == self.generation.get() {
            return;
        }
        let members = self
            .shared
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut chans = self.members.borrow_mut();
        chans.resize(members.len(), None);
        self.outstanding.borrow_mut().resize(members.len(), 0);
        for (i, m) in members.iter().enumerate() {
            let usable = matches!(
                self.shared.state(i),
                MemberState::Operational | MemberState::Rebuilding
            );
            let same = chans[i]
                .as_ref()
                .zip(m.bdev.as_ref())
                .is_some_and(|(c, b)| c.bdev().id() == b.id());
            if !usable || m.bdev.is_none() {
                chans[i] = None;
            } else if !same {
                chans[i] = m.bdev.as_ref().map(|b| b.get_channel());
            }
        }
        self.generation.set(g);
    }

    fn channel(&self, slot: usize) -> Option<IoChannel> {
        self.members.borrow().get(slot).cloned().flatten()
    }

    fn park(&self, mut io: IoBox) -> u32 {
        let shared = if io.io_type == IoType::Read {
            SharedBuf::empty()
        } else {
            std::mem::take(&mut io.shared)
        };
        let buf = io.take_buf();
        let mut parents = self.parents.borrow_mut();
        let i = parents.alloc();
        if let Some(p) = parents.get_mut(i) {
            let lender = std::mem::take(&mut p.lender);
            *p = Parent {
                io: Some(io),
                lender,
                shared,
                ..Parent::default()
            };
            // The slot's previous children are all gone (it was released),
            // so its lender takes the new buffer.
            let lent = p.lender.lend(buf).is_ok();
            debug_assert!(lent, "raid parent slot reused with pieces out");
        }
        i
    }

    /// Takes a finished parent out of the slab, its data back in place.
    fn unpark(&self, p: u32) -> Option<IoBox> {
        let mut reusable = true;
        let io = {
            let mut parents = self.parents.borrow_mut();
            let parent = parents.get_mut(p)?;
            let mut io = parent.io.take();
            if let Some(io) = io.as_mut() {
                io.shared = std::mem::take(&mut parent.shared);
                match parent.lender.reclaim() {
                    Some(buf) => io.buf = buf,
                    None => {
                        // A member kept a piece: the slot stays out of use.
                        log::error!("raid {}: a child kept its buffer", self.shared.name);
                        reusable = false;
                    }
                }
            }
            io
        };
        if reusable {
            self.parents.borrow_mut().release(p);
        }
        io
    }

    /// Holds raid1 write `p` (children done, reached the members in its
    /// `ok_mask`) until the superblock on disk no longer calls current a
    /// member it missed. Slow path.
    fn wait_for_sb(&self, p: u32) {
        // Still in this channel, so a rebuild window's range lock waits for
        // it; the superblock write that releases it may wait for the
        // rebuild to be cancelled, which is why the rebuild's lock wait
        // gives way to a cancel (`rebuild.rs`).
        self.sb_wait.borrow_mut().push_back(p);
        self.list_for_sb();
    }

    fn list_for_sb(&self) {
        if !self.sb_listed.replace(true) {
            SB_WAITERS.with(|w| w.borrow_mut().push(self.me.clone()));
        }
    }

    /// Acknowledges the held writes the superblock on disk now allows,
    /// fails them all if none can be written any more.
    fn recheck_sb(&self) {
        let durable = self.shared.durable.load(Ordering::Acquire);
        let n = self.sb_wait.borrow().len();
        let mut released = 0;
        for _ in 0..n {
            let Some(p) = self.sb_wait.borrow_mut().pop_front() else {
                break;
            };
            let Some(ok_mask) = self.parents.borrow().get(p).map(|x| x.ok_mask) else {
                continue;
            };
            // No borrow is held across a completion (it may submit here).
            if durable & DURABLE_LOST != 0 {
                self.complete(p, IoStatus::Failed);
            } else if durable & !ok_mask == 0 {
                released += 1;
                self.complete(p, IoStatus::Success);
            } else {
                self.sb_wait.borrow_mut().push_back(p);
            }
        }
        if released > 0 {
            log::debug!(
                "raid {}: {released} writes acknowledged once their member's failure was on disk",
                self.shared.name
            );
        }
        if !self.sb_wait.borrow().is_empty() {
            self.list_for_sb();
        }
    }

    fn complete(&self, p: u32, status: IoStatus) {
        // No borrow is held here: the completion may run the submitter,
        // which may submit to this channel again.
        if let Some(io) = self.unpark(p) {
            io.complete(status);
        }
    }

    /// A child of parent `p` for member `slot`: `nblocks` at member block
    /// `member_off` (before the data offset), data at `buf_off` blocks
    /// into the parent's buffer.
    fn child(
        &self,
        p: u32,
        slot: usize,
        io_type: IoType,
        member_off: u64,
        nblocks: u64,
        buf_off: u64,
    ) -> Option<IoBox> {
        let offset = if nblocks == 0 {
            0
        } else {
            self.shared.data_offset + member_off
        };
        let mut io = IoBox::with(io_type, offset, nblocks, IoBuf::empty());
        if io_type.has_data() {
            let parents = self.parents.borrow();
            let parent = parents.get(p)?;
            let bs = self.shared.block_size as u64;
            let (at, len) = ((buf_off * bs) as usize, (nblocks * bs) as usize);
            // Reads write into disjoint windows; writes share the data.
            if io_type == IoType::Read {
                io.buf = parent.lender.window(at, len)?;
            } else if !parent.shared.is_empty() {
                io.shared = parent.shared.slice(at, len)?;
            } else {
                io.shared = parent.lender.share(at, len)?;
            }
        }
        io.tag = (p as u64) << 8 | slot as u64;
        Some(io)
    }

    fn send(self: &Rc<Self>, slot: usize, io: IoBox) {
        if let Some(o) = self.outstanding.borrow_mut().get_mut(slot) {
            *o += 1;
        }
        match self.channel(slot) {
            Some(ch) => ch.submit(io, self.clone()),
            // Checked by the caller; a failed child if it happens anyway.
            None => {
                let (tag, t) = (io.tag, io.io_type);
                drop(io);
                self.child_done(tag, false, t);
            }
        }
    }

    /// raid0 and concat: one child per strip (raid0) or member (concat)
    /// piece of the range; flush and reset go to every member.
    fn striped(self: &Rc<Self>, p: u32, io_type: IoType, off: u64, len: u64) {
        let n = self.shared.num_slots() as u64;
        let mut children = self.scratch.take();
        if matches!(io_type, IoType::Flush | IoType::Reset) || len == 0 {
            for slot in 0..n as usize {
                if let Some(c) = self.child(p, slot, io_type, 0, 0, 0) {
                    children.push((slot, c));
                }
            }
        } else {
            let (strip, ds) = (self.shared.strip_size_blocks as u64, self.shared.data_size);
            let end = off + len;
            let mut o = off;
            while o < end {
                let (slot, moff, k) = match self.shared.level {
                    Level::Concat => {
                        let slot = o / ds;
                        let moff = o % ds;
                        (slot as usize, moff, (ds - moff).min(end - o))
                    }
                    _ => {
                        let s = o / strip;
                        let within = o % strip;
                        let slot = (s % n) as usize;
                        (
                            slot,
                            (s / n) * strip + within,
                            (strip - within).min(end - o),
                        )
                    }
                };
                match self.child(p, slot, io_type, moff, k, o - off) {
                    Some(c) => children.push((slot, c)),
                    None => {
                        children.clear();
                        break;
                    }
                }
                o += k;
            }
        }
        self.launch(p, children);
    }

    /// raid1 writes and other commands: every operational or rebuilding
    /// member.
    fn mirrored(self: &Rc<Self>, p: u32, io_type: IoType, off: u64, len: u64) {
        let mut children = self.scratch.take();
        for slot in 0..self.shared.num_slots() {
            if self.channel(slot).is_none() {
                continue;
            }
            let (moff, k) = if matches!(io_type, IoType::Flush | IoType::Reset) {
                (0, 0)
            } else {
                (off, len)
            };
            if let Some(c) = self.child(p, slot, io_type, moff, k, 0) {
                children.push((slot, c));
            }
        }
        self.launch(p, children);
    }

    /// Submits `children` of `p`; fails `p` when there are none or a
    /// member they need has no channel (raid0/concat with a member gone).
    fn launch(self: &Rc<Self>, p: u32, mut children: Vec<(usize, IoBox)>) {
        let usable =
            !children.is_empty() && children.iter().all(|(s, _)| self.channel(*s).is_some());
        if usable {
            if let Some(parent) = self.parents.borrow_mut().get_mut(p) {
                parent.remaining = children.len() as u32;
            }
            for (slot, c) in children.drain(..) {
                self.send(slot, c);
            }
        } else {
            children.clear();
        }
        // The (empty) scratch goes back for the next I/O.
        self.scratch.replace(children);
        if !usable {
            self.complete(p, IoStatus::Failed);
        }
    }

    /// raid1 read: the untried operational member with the fewest I/Os
    /// outstanding here; None when all have been tried.
    fn pick_reader(&self, tried: u64) -> Option<usize> {
        let out = self.outstanding.borrow();
        (0..self.shared.num_slots())
            .filter(|&s| {
                tried & (1 << s) == 0
                    && self.shared.state(s) == MemberState::Operational
                    && self.members.borrow().get(s).is_some_and(|c| c.is_some())
            })
            .min_by_key(|&s| out.get(s).copied().unwrap_or(0))
    }

    fn read_from(self: &Rc<Self>, p: u32) {
        let (tried, off, len) = {
            let parents = self.parents.borrow();
            let Some(parent) = parents.get(p) else {
                return;
            };
            let Some(io) = parent.io.as_ref() else { return };
            (parent.tried, io.offset_blocks, io.num_blocks)
        };
        let Some(slot) = self.pick_reader(tried) else {
            return self.complete(p, IoStatus::Failed);
        };
        if let Some(parent) = self.parents.borrow_mut().get_mut(p) {
            parent.tried |= 1 << slot;
            parent.remaining = 1;
        }
        match self.child(p, slot, IoType::Read, off, len, 0) {
            Some(c) => self.send(slot, c),
            None => self.complete(p, IoStatus::Failed),
        }
    }

    /// A member failed an I/O: no more I/O to it; the main reactor releases
    /// it and records that in the superblock.
    fn member_failed(&self, slot: usize) {
        if !self.shared.fail(slot) {
            // Already out of service (another I/O or core reported it).
            return;
        }
        let name = self.shared.name.clone();
        reactor::send(reactor::main_core(), move || {
            reactor::spawn_local(super::rebuild::member_failed(name, slot))
        });
    }
}

impl BdevChannel for RaidChannel {
    fn submit(self: Rc<Self>, io: IoBox) {
        self.refresh();
        let (io_type, off, len) = (io.io_type, io.offset_blocks, io.num_blocks);
        let p = self.park(io);
        match (self.shared.level, io_type) {
            (Level::Raid1, IoType::Read) => self.read_from(p),
            (Level::Raid1, _) => self.mirrored(p, io_type, off, len),
            _ => self.striped(p, io_type, off, len),
        }
    }
}

impl IoCompletion for RaidChannel {
    fn io_done(&self, child: IoBox) {
        let ok = child.status().is_success();
        let (tag, t) = (child.tag, child.io_type);
        drop(child);
        self.child_done(tag, ok, t);
    }
}

impl RaidChannel {
    fn child_done(&self, tag: u64, ok: bool, io_type: IoType) {
        let Some(me) = self.me.upgrade() else { return };
        let p = (tag >> 8) as u32;
        let slot = (tag & 0xFF) as usize;
        if let Some(o) = self.outstanding.borrow_mut().get_mut(slot) {
            *o = o.saturating_sub(1);
        }
        let raid1 = self.shared.level == Level::Raid1;
        if raid1 && io_type == IoType::Read {
            if ok {
                return self.complete(p, IoStatus::Success);
            }
            log::warn!(
                "raid {}: read failed on slot {slot}, retrying on another member",
                self.shared.name
            );
            return me.read_from(p);
        }
        let done = {
            let mut parents = self.parents.borrow_mut();
            let Some(parent) = parents.get_mut(p) else {
                return;
            };
            parent.remaining = parent.remaining.saturating_sub(1);
            if ok {
                parent.ok_mask |= 1 << slot;
                if self.shared.state(slot) == MemberState::Operational {
                    parent.ok_operational += 1;
                }
            } else {
                parent.failed = true;
            }
            (parent.remaining == 0).then_some((
                parent.failed,
                parent.ok_operational,
                parent.ok_mask,
            ))
        };
        // Only a lost write makes a member stale; a failed flush or reset
        // fails the I/O but leaves the member's data as it was.
        let write = matches!(io_type, IoType::Write | IoType::WriteZeroes | IoType::Unmap);
        if !ok && raid1 && write {
            self.member_failed(slot);
        }
        if let Some((failed, ok_operational, ok_mask)) = done {
            let status = if raid1 {
                if ok_operational > 0 {
                    IoStatus::Success
                } else {
                    IoStatus::Failed
                }
            } else if failed {
                IoStatus::Failed
            } else {
                IoStatus::Success
            };
            if raid1 && write && status == IoStatus::Success {
                let durable = self.shared.durable.load(Ordering::Acquire);
                if durable & !ok_mask != 0 {
                    if durable & DURABLE_LOST != 0 {
                        // No superblock will come to release it.
                        return self.complete(p, IoStatus::Failed);
                    }
                    return self.wait_for_sb(p);
                }
            }
            self.complete(p, status);
        }
    }
}
