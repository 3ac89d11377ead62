//! Request slots of an I/O queue: one per queue entry (the host's queue
//! size, so a host that keeps to it always finds one), allocated when the
//! queue connects and reused for every command after. A slot owns no
//! memory of its own between commands: a command's data buffers come from
//! the core's budgeted pool (`bdev::buf`) when it needs them and go back
//! when the slot is freed.
//!
//! A slot moves through an explicit state machine:
//!
//! ```text
//! Free -> [NeedBuffer ->] Executing -> Free | Sending -> Free
//!      -> [NeedBuffer ->] AwaitingData (R2T sent) -> Executing ...
//! ```
//!
//! `NeedBuffer`: planned, waiting in its queue's pending list for the
//! budget to give it its buffers.
//! `Sending`: the response is queued and its data still referenced by the
//! send queue; the slot is freed when that data has left.
//! From `Executing` until it is free again a slot holds its namespace
//! (`ns`), which is what a namespace removal waits for (`changes.rs`).
//! The slot index is the R2T's transfer tag, so an H2CData finds its slot
//! without a search.

use bdev::{IoBuf, SharedBuf};

use super::changes::NsUse;
use super::io::IoPlan;
use crate::wire::nvme::{Sqe, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Free,
    NeedBuffer,
    AwaitingData,
    Executing,
    Sending,
}

pub struct Request {
    pub state: SlotState,
    pub sqe: Sqe,
    pub plan: Option<IoPlan>,
    /// Host data (write, compare, DSM ranges) or data for the host (read).
    pub buf: IoBuf,
    /// Compare: the blocks read to compare with.
    pub aux: IoBuf,
    /// A zero-copy read's data: a read-only view of the bdev's memory,
    /// which it keeps alive until sent.
    pub lent: SharedBuf,
    /// An in-capsule write's data where it was received: a read-only view
    /// that pins its receive block until dropped.
    pub in_place: SharedBuf,
    /// Host data bytes received so far (in-capsule or H2CData).
    pub received: usize,
    /// Bdev I/Os in flight for this command (DSM: one per range).
    pub outstanding: u32,
    pub status: Status,
    /// The namespace the command was planned against (its instance), and
    /// its hold on it while at the bdev or sending its data.
    pub ns_instance: u64,
    pub ns: Option<NsUse>,
}

impl Request {
    fn new() -> Request {
        Request {
            state: SlotState::Free,
            sqe: Sqe::default(),
            plan: None,
            buf: IoBuf::empty(),
            aux: IoBuf::empty(),
            lent: SharedBuf::empty(),
            in_place: SharedBuf::empty(),
            received: 0,
            outstanding: 0,
            status: Status::SUCCESS,
            ns_instance: 0,
            ns: None,
        }
    }
}

/// The slots of one queue and their free list.
pub struct RequestTable {
    slots: Vec<Request>,
    free: Vec<u16>,
}

impl RequestTable {
    pub fn new(entries: usize) -> RequestTable {
        let entries = entries.clamp(1, u16::MAX as usize);
        RequestTable {
            slots: (0..entries).map(|_| Request::new()).collect(),
            free: (0..entries as u16).rev().collect(),
        }
    }

    /// A free slot set up for `sqe`, or None if the host has more commands
    /// outstanding than its queue holds.
    #[inline]
    pub fn alloc(&mut self, sqe: Sqe) -> Option<u16> {
        let i = self.free.pop()?;
        let r = &mut self.slots[i as usize];
        r.state = SlotState::Executing;
        r.sqe = sqe;
        r.plan = None;
        r.received = 0;
        r.outstanding = 0;
        r.status = Status::SUCCESS;
        debug_assert!(r.ns.is_none());
        Some(i)
    }

    #[inline]
    pub fn release(&mut self, i: u16) {
        let r = &mut self.slots[i as usize];
        debug_assert!(r.state != SlotState::Free);
        r.state = SlotState::Free;
        r.plan = None;
        r.lent = SharedBuf::empty();
        r.in_place = SharedBuf::empty();
        r.ns = None;
        // Back to the core's budget for the next command, on any queue.
        r.buf = IoBuf::empty();
        r.aux = IoBuf::empty();
        self.free.push(i);
    }

    #[inline]
    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether every slot waits for H2CData (none can finish before the
    /// host sends more data).
    pub fn all_awaiting_data(&self) -> bool {
        self.slots
            .iter()
            .all(|r| r.state == SlotState::AwaitingData)
    }

    #[inline]
    pub fn get(&self, i: u16) -> Option<&Request> {
        self.slots.get(i as usize)
    }

    #[inline]
    pub fn get_mut(&mut self, i: u16) -> Option<&mut Request> {
        self.slots.get_mut(i as usize)
    }

    /// How many slots there are (indices `0..capacity`).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Whether a command holds namespace `instance`.
    pub fn holds(&self, instance: u64) -> bool {
        self.slots
            .iter()
            .any(|r| r.ns.as_ref().is_some_and(|n| n.instance() == instance))
    }

    /// What a read sends: the lent view if the bdev lent one, else `buf`.
    #[inline]
    pub fn read_data(&self, i: u16) -> &[u8] {
        match self.slots.get(i as usize) {
            Some(r) if !r.lent.is_empty() => r.lent.as_slice(),
            Some(r) => r.buf.as_slice(),
            None => &[],
        }
    }

    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}
