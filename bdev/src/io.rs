//! The bdev I/O request: [`BdevIo`], owned through a recycled [`IoBox`].
//!
//! An I/O carries a stack of completion frames, one per channel it was
//! submitted into: a caller submits into a bdev's channel, a virtual bdev
//! (delay, error) forwards the same `IoBox` into its base's channel. When
//! the innermost module completes it, each frame is popped in turn: that
//! layer's statistics are recorded and its callback receives the `IoBox`.
//! So stacking costs no allocation and no buffer copy.
//!
//! Invariants:
//! - An `IoBox` belongs to one reactor; it never crosses cores.
//! - Completion never runs inside a `submit` call on the same core: it is
//!   deferred to the per-core completion poller (see `channel.rs`), so a
//!   callback that resubmits cannot recurse without bound.
//! - `IoBox`es come from a per-core free list; steady-state I/O allocates
//!   nothing.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;

pub use crate::buf::{IoBuf, SharedBuf, IO_BUF_ALIGN};
use crate::channel::{self, IoChannel};

/// Deepest stack of channels one I/O can pass through (e.g. nvmf → delay →
/// error → raid → lvol → uring). A bound keeps the frame array inline.
pub const MAX_IO_STACK: usize = 8;

/// Free `IoBox`es kept per core; beyond this they are freed. Sized above
/// the deepest queue a core is expected to keep in flight.
const IO_POOL_MAX: usize = 4096;

/// The I/O types, in SPDK's enum order where they overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoType {
    Read,
    Write,
    Unmap,
    Flush,
    Reset,
    WriteZeroes,
    Compare,
}

impl IoType {
    pub const ALL: [IoType; 7] = [
        IoType::Read,
        IoType::Write,
        IoType::Unmap,
        IoType::Flush,
        IoType::Reset,
        IoType::WriteZeroes,
        IoType::Compare,
    ];

    /// SPDK's name for the type (`supported_io_types` keys).
    pub fn as_str(&self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Unmap => "unmap",
            IoType::Flush => "flush",
            IoType::Reset => "reset",
            IoType::WriteZeroes => "write_zeroes",
            IoType::Compare => "compare",
        }
    }

    /// Whether the I/O moves data through its buffer.
    pub fn has_data(&self) -> bool {
        matches!(self, IoType::Read | IoType::Write | IoType::Compare)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoStatus {
    #[default]
    Pending,
    Success,
    Failed,
    /// The module ran out of a resource; the submitter may retry.
    NoMemory,
    Aborted,
    Miscompare,
}

impl IoStatus {
    pub fn is_success(&self) -> bool {
        *self == IoStatus::Success
    }
}

/// Receives an I/O when a layer it was submitted into completes it.
pub trait IoCompletion {
    fn io_done(&self, io: IoBox);
}

pub(crate) struct Frame {
    pub(crate) channel: IoChannel,
    pub(crate) cb: Rc<dyn IoCompletion>,
    pub(crate) submit_tick: u64,
    /// Scratch word of the module whose channel this frame entered.
    pub(crate) module_ctx: u64,
    /// `frame_flags::*`.
    pub(crate) flags: u8,
    /// With `LOCK_SEEN`: the I/O's entry in the channel's range-lock
    /// tracking (`range_lock::NO_SLOT`: none). In the frame's padding.
    pub(crate) lock_slot: u32,
}

pub(crate) mod frame_flags {
    /// A piece of an I/O the framework split: the parent's frame records
    /// the statistics, not this one.
    pub const SPLIT_CHILD: u8 = 1;
    /// The data was bounced through an aligned buffer at this layer: put
    /// the submitter's buffers back (and a read's data into them) when it
    /// completes.
    pub const BOUNCED: u8 = 2;
    /// Submitted while the channel had a range lock: its range is tracked
    /// (`lock_slot`), or it never reaches the module (see `range_lock.rs`).
    pub const LOCK_SEEN: u8 = 4;
}

/// One I/O request. Fields describing the request are public; the frame
/// stack is the framework's.
///
/// `repr(C)` keeps the fields every submit and completion touches in the
/// first cache line and the first frames right after it: with a few
/// hundred I/Os in flight per core, an I/O that spans fewer lines stays
/// in L1 (deep frames are rarely used).
#[repr(C)]
pub struct BdevIo {
    pub io_type: IoType,
    status: IoStatus,
    depth: u16,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// Writable data: a read's destination, or a write's (compare's) data
    /// when `shared` is empty.
    pub buf: IoBuf,
    /// Read-only data in memory someone else owns. Before submit: a write's
    /// (compare's) data when set, instead of `buf` (a mirror's share of its
    /// parent's data, the data where the transport received it). After a
    /// zero-copy read: the data where the module holds it.
    pub shared: SharedBuf,
    /// The submitter's own tag (slot index, job id), untouched by layers.
    pub tag: u64,
    /// Read: the submitter accepts the data where it already lies. A module
    /// holding the blocks in memory (malloc) then sets `shared` to a view
    /// of them instead of copying into `buf` (SPDK's zero-copy read); the
    /// view keeps that memory alive, and a later write to the same blocks
    /// may show through it, as on a device. Layers that transform data
    /// clear it before passing the I/O down.
    pub zcopy: bool,
    latency_ticks: u64,
    spare_ctx: u64,
    frames: [Option<Frame>; MAX_IO_STACK],
    /// The submitter's buffers while the framework bounces the data
    /// through an aligned one (one bounce per I/O: the bounce buffer is
    /// aligned for every bdev). Rarely used: last.
    pub(crate) stash_buf: IoBuf,
    pub(crate) stash_shared: SharedBuf,
}

impl BdevIo {
    fn blank() -> BdevIo {
        BdevIo {
            io_type: IoType::Read,
            offset_blocks: 0,
            num_blocks: 0,
            buf: IoBuf::empty(),
            shared: SharedBuf::empty(),
            tag: 0,
            zcopy: false,
            stash_buf: IoBuf::empty(),
            stash_shared: SharedBuf::empty(),
            status: IoStatus::Pending,
            frames: Default::default(),
            depth: 0,
            spare_ctx: 0,
            latency_ticks: 0,
        }
    }

    pub fn status(&self) -> IoStatus {
        self.status
    }

    /// The data a write (or compare) carries, or a completed read's: the
    /// read-only view when set, else `buf`.
    #[inline]
    pub fn data(&self) -> &[u8] {
        if self.shared.is_empty() {
            self.buf.as_slice()
        } else {
            self.shared.as_slice()
        }
    }

    /// Where [`BdevIo::data`] starts.
    #[inline]
    pub fn data_ptr(&self) -> *const u8 {
        if self.shared.is_empty() {
            self.buf.as_ptr()
        } else {
            self.shared.as_ptr()
        }
    }

    /// A scratch word for the module whose channel the I/O is currently in
    /// (a deadline, a flag); it survives the I/O's trip through the layers
    /// below and is back in view when they complete it.
    pub fn module_ctx(&mut self) -> &mut u64 {
        match (self.depth as usize).checked_sub(1) {
            Some(d) => match self.frames[d].as_mut() {
                Some(f) => &mut f.module_ctx,
                None => &mut self.spare_ctx,
            },
            // Not in any channel, so no module owns a context.
            None => &mut self.spare_ctx,
        }
    }

    /// In a completion callback: ticks from the submit into the layer that
    /// just completed to its completion (what that layer's statistics
    /// recorded), so submitters need no clock read of their own.
    pub fn latency_ticks(&self) -> u64 {
        self.latency_ticks
    }

    pub(crate) fn set_latency_ticks(&mut self, t: u64) {
        self.latency_ticks = t;
    }

    /// Submit tick of the layer the I/O is currently in.
    pub fn submit_tick(&self) -> u64 {
        (self.depth as usize)
            .checked_sub(1)
            .and_then(|d| self.frames[d].as_ref())
            .map_or(0, |f| f.submit_tick)
    }

    /// Stack depth: how many channels the I/O is currently in.
    pub fn depth(&self) -> usize {
        self.depth as usize
    }

    #[inline]
    pub(crate) fn push_frame(&mut self, frame: Frame) -> bool {
        let d = self.depth as usize;
        if d == MAX_IO_STACK {
            return false;
        }
        self.frames[d] = Some(frame);
        self.depth += 1;
        self.status = IoStatus::Pending;
        true
    }

    /// The frame of the layer the I/O is currently in.
    #[inline]
    pub(crate) fn top_frame(&mut self) -> Option<&mut Frame> {
        let d = (self.depth as usize).checked_sub(1)?;
        self.frames[d].as_mut()
    }

    #[inline]
    pub(crate) fn pop_frame(&mut self) -> Option<Frame> {
        if self.depth == 0 {
            return None;
        }
        self.depth -= 1;
        self.frames[self.depth as usize].take()
    }

    pub(crate) fn set_status(&mut self, status: IoStatus) {
        self.status = status;
    }

    pub(crate) fn set_status_failed(&mut self) {
        self.status = IoStatus::Failed;
    }

    /// Byte length the request covers for `block_size`.
    pub fn len_bytes(&self, block_size: u32) -> u64 {
        self.num_blocks * block_size as u64
    }
}

thread_local! {
    // Boxed so an I/O keeps its address while in flight.
    #[allow(clippy::vec_box)]
    static IO_POOL: RefCell<Vec<Box<BdevIo>>> = const { RefCell::new(Vec::new()) };
}

/// An owned, recycled [`BdevIo`]. Dropping it returns it to this core's
/// free list.
pub struct IoBox(Option<Box<BdevIo>>);

impl IoBox {
    /// A blank I/O from the per-core pool.
    pub fn new() -> IoBox {
        let io = IO_POOL
            .try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Box::new(BdevIo::blank()));
        IoBox(Some(io))
    }

    /// A blank I/O set up as `io_type` over the given blocks, with `buf`.
    pub fn with(io_type: IoType, offset_blocks: u64, num_blocks: u64, buf: IoBuf) -> IoBox {
        let mut io = IoBox::new();
        io.io_type = io_type;
        io.offset_blocks = offset_blocks;
        io.num_blocks = num_blocks;
        io.buf = buf;
        io
    }

    /// Completes the I/O at its current layer with `status`. Called by the
    /// module that owns the innermost channel (or a virtual bdev finishing
    /// its part). Deferred if the core is inside a submit.
    pub fn complete(mut self, status: IoStatus) {
        debug_assert!(status != IoStatus::Pending);
        self.set_status(status);
        channel::complete_io(self);
    }

    /// Takes the buffer out, leaving an empty one.
    pub fn take_buf(&mut self) -> IoBuf {
        std::mem::take(&mut self.buf)
    }
}

impl Default for IoBox {
    fn default() -> Self {
        IoBox::new()
    }
}

impl Deref for IoBox {
    type Target = BdevIo;
    fn deref(&self) -> &BdevIo {
        // The Option is only None inside drop.
        self.0.as_deref().expect("IoBox used after drop")
    }
}

impl DerefMut for IoBox {
    fn deref_mut(&mut self) -> &mut BdevIo {
        self.0.as_deref_mut().expect("IoBox used after drop")
    }
}

impl Drop for IoBox {
    fn drop(&mut self) {
        let Some(mut io) = self.0.take() else { return };
        debug_assert!(
            io.depth == 0 || std::thread::panicking(),
            "IoBox dropped while still in a channel"
        );
        while io.pop_frame().is_some() {}
        // Buffers go back to their own pool (or owner) now, not with the
        // recycled I/O.
        io.buf = IoBuf::empty();
        io.shared = SharedBuf::empty();
        debug_assert!(io.stash_buf.is_empty() && io.stash_shared.is_empty());
        io.status = IoStatus::Pending;
        io.tag = 0;
        io.zcopy = false;
        let _ = IO_POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < IO_POOL_MAX {
                p.push(io);
            }
        });
    }
}
