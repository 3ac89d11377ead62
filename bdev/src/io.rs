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

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;

use crate::channel::{self, IoChannel};

/// Deepest stack of channels one I/O can pass through (e.g. nvmf → delay →
/// error → raid → lvol → uring). A bound keeps the frame array inline.
pub const MAX_IO_STACK: usize = 8;

/// Data buffers are aligned for O_DIRECT on any device block size we accept.
pub const IO_BUF_ALIGN: usize = 4096;

/// Free `IoBox`es kept per core; beyond this they are freed. Sized above
/// the deepest queue a core is expected to keep in flight.
const IO_POOL_MAX: usize = 4096;

/// Buffers larger than this are not kept with a pooled `IoBox`.
const POOLED_BUF_MAX: usize = 128 * 1024;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
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

/// A data buffer, aligned to [`IO_BUF_ALIGN`]. Either owned (freed on drop)
/// or borrowed from another I/O's buffer (RAID children), in which case the
/// owner guarantees it outlives this one.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    owned: bool,
}

impl IoBuf {
    pub const fn empty() -> IoBuf {
        IoBuf {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
            owned: false,
        }
    }

    /// A zeroed, aligned buffer of `len` bytes.
    pub fn new(len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf::empty();
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len,
            cap: len,
            owned: true,
        }
    }

    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// A view of another buffer's memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid, and not be accessed through another
    /// path while this I/O is in flight, until this `IoBuf` is dropped.
    pub unsafe fn borrowed(ptr: *mut u8, len: usize) -> IoBuf {
        IoBuf {
            ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
            len,
            cap: len,
            owned: false,
        }
    }

    fn layout(cap: usize) -> Layout {
        // Cannot fail: IO_BUF_ALIGN is a power of two and sizes stay far
        // below isize::MAX.
        Layout::from_size_align(cap, IO_BUF_ALIGN).expect("I/O buffer layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Resizes to `len`, reallocating (and zeroing) only when it exceeds the
    /// capacity.
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            *self = IoBuf::new(len);
        } else {
            self.len = len;
        }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (owned allocation, or the
        // borrowed contract), or dangling with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Default for IoBuf {
    fn default() -> Self {
        IoBuf::empty()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.owned && self.cap > 0 {
            // SAFETY: allocated in `new` with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
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
    pub buf: IoBuf,
    /// The submitter's own tag (slot index, job id), untouched by layers.
    pub tag: u64,
    /// Read: the submitter accepts the data where it already lies. A module
    /// holding the blocks in memory (malloc) then sets [`BdevIo::lent`] to
    /// a view of them instead of copying into `buf` (SPDK's zero-copy read).
    /// Layers that transform or inspect data must clear it before passing
    /// the I/O down.
    pub zcopy: bool,
    /// A completed zero-copy read: a borrowed view of the module's memory
    /// (empty otherwise). Valid while the bdev exists: the submitter keeps
    /// a channel of the bdev while it uses the view. A concurrent write to
    /// the same blocks may show through, as it may on a device.
    pub lent: IoBuf,
    latency_ticks: u64,
    spare_ctx: u64,
    frames: [Option<Frame>; MAX_IO_STACK],
}

impl BdevIo {
    fn blank() -> BdevIo {
        BdevIo {
            io_type: IoType::Read,
            offset_blocks: 0,
            num_blocks: 0,
            buf: IoBuf::empty(),
            tag: 0,
            zcopy: false,
            lent: IoBuf::empty(),
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
        if io.buf.capacity() > POOLED_BUF_MAX || !io.buf.owned {
            io.buf = IoBuf::empty();
        }
        io.status = IoStatus::Pending;
        io.tag = 0;
        io.zcopy = false;
        io.lent = IoBuf::empty();
        let _ = IO_POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < IO_POOL_MAX {
                p.push(io);
            }
        });
    }
}
