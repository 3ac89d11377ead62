//! I/O data buffers and the per-core pool they come from.
//!
//! - [`IoBuf`]: a buffer an I/O may write into (a read's destination) or
//!   read from. Always exclusive: its own allocation, or a *window*, a
//!   range of a parent buffer that a [`BufLender`] lent to this I/O alone.
//! - [`SharedBuf`]: a read-only view of memory another owner keeps alive: a
//!   mirror write's share of its parent's data, a write's data where the
//!   transport received it, a zero-copy read of a RAM disk. It has no way
//!   to give out `&mut`.
//! - [`BufLender`]: lends one parent I/O's buffer to its child I/Os, as
//!   read-only shares (the same data written to several places) or as
//!   writable windows (the parts of a split read), and takes it back when
//!   every piece has been dropped.
//! - The pool: allocations are rounded up to a power-of-two size class
//!   (4 KiB to 128 KiB) and recycled per core, so steady-state I/O does not
//!   reach the allocator. *Budgeted* allocations
//!   ([`IoBuf::try_budgeted`]) are those a remote client can make us take
//!   (transport data buffers): they count against a per-core budget and
//!   fail, rather than grow, when it is spent; a caller that has to wait
//!   asks to be woken ([`wake_on_budget_return`]) when one comes back.
//!
//! Invariants:
//! - Memory is aligned to [`IO_BUF_ALIGN`] and always initialised (fresh
//!   allocations are zeroed; recycled ones hold old data).
//! - Every view holds its owner (a per-core `Rc`), so memory outlives every
//!   view of it. Nothing here is `Send`: buffers never cross cores, and the
//!   pool and budget are the core's own, without locks.
//! - A lent buffer has shares or windows out, never both; windows never
//!   overlap (each starts at or after the end of the previous one while any
//!   is out); the parent gets the buffer back only once every piece is gone.

use std::alloc::{self, Layout};
use std::any::Any;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::ptr::NonNull;
use std::rc::Rc;

/// Data buffers are aligned for O_DIRECT on any device block size we accept.
pub const IO_BUF_ALIGN: usize = 4096;

/// Smallest size class: one page, the alignment.
const MIN_CLASS_SHIFT: u32 = 12;
/// Largest pooled size class: the largest transfer a host normally sends in
/// one command (SPDK's large iobuf is 132 KiB). Larger buffers are freed.
const MAX_CLASS_SHIFT: u32 = 17;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// Free memory kept per size class per core. Beyond it buffers are freed:
/// a burst does not pin its peak for ever.
const POOL_FREE_BYTES_PER_CLASS: usize = 16 << 20;
/// Free memory kept per core over all classes: with the budget, what bounds
/// the memory a core's I/O buffers hold (live budgeted buffers plus this).
pub const POOL_FREE_BYTES_PER_CORE: usize = 32 << 20;

/// Budget of [`IoBuf::try_budgeted`] allocations per core unless set
/// otherwise: SPDK's TCP transport default of 511 shared 128 KiB buffers.
pub const DEFAULT_BUDGET_BYTES_PER_CORE: usize = 511 * (128 << 10);

#[inline]
fn class_of(len: usize) -> Option<usize> {
    let shift = len
        .max(1 << MIN_CLASS_SHIFT)
        .next_power_of_two()
        .trailing_zeros();
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

/// The size class whose buffers are exactly `cap` bytes, if any (what an
/// allocation of that capacity is recycled as).
#[inline]
fn pooled_class(cap: usize) -> Option<usize> {
    let shift = cap.trailing_zeros();
    (cap.is_power_of_two() && (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT).contains(&shift))
        .then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

fn layout(cap: usize) -> Layout {
    // Cannot fail: IO_BUF_ALIGN is a power of two and sizes stay far below
    // isize::MAX.
    Layout::from_size_align(cap, IO_BUF_ALIGN).expect("I/O buffer layout")
}

/// The capacity an allocation of `len` bytes gets (what it costs the
/// budget, for a budgeted one).
#[inline]
pub fn capacity_for(len: usize) -> usize {
    match class_of(len) {
        Some(c) => 1 << (c as u32 + MIN_CLASS_SHIFT),
        None => len.div_ceil(IO_BUF_ALIGN) * IO_BUF_ALIGN,
    }
}

struct Pool {
    free: [Vec<NonNull<u8>>; CLASSES],
    /// Bytes in `free`, over all classes.
    free_bytes: usize,
    budget_bytes: usize,
    budget_used_bytes: usize,
    /// Someone waits for budget: the next budgeted buffer returned wakes
    /// the reactor.
    budget_waiter: bool,
    /// Allocations made and not yet freed or recycled, for tests and stats.
    live: usize,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (c, list) in self.free.iter_mut().enumerate() {
            let cap = 1usize << (c as u32 + MIN_CLASS_SHIFT);
            for p in list.drain(..) {
                // SAFETY: allocated by `alloc_memory` with this capacity.
                unsafe { alloc::dealloc(p.as_ptr(), layout(cap)) }
            }
        }
    }
}

thread_local! {
    // Const-initialised: reached on every I/O, with no lazy-init check.
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            free: [const { Vec::new() }; CLASSES],
            free_bytes: 0,
            budget_bytes: DEFAULT_BUDGET_BYTES_PER_CORE,
            budget_used_bytes: 0,
            budget_waiter: false,
            live: 0,
        })
    };
}

/// `cap` bytes, from this core's pool or the allocator; `budgeted`: also
/// charged to the core's budget, None if that would exceed it (one visit
/// to the pool either way: this is per I/O).
#[inline]
fn alloc_memory(cap: usize, budgeted: bool) -> Option<NonNull<u8>> {
    debug_assert!(cap > 0 && cap.is_multiple_of(IO_BUF_ALIGN));
    let class = pooled_class(cap);
    let recycled = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        if budgeted {
            if p.budget_used_bytes + cap > p.budget_bytes {
                return None;
            }
            p.budget_used_bytes += cap;
        }
        p.live += 1;
        let got = class.and_then(|c| p.free[c].pop());
        if got.is_some() {
            p.free_bytes -= cap;
        }
        Some(got)
    });
    match recycled {
        Ok(None) => None,
        Ok(Some(Some(p))) => Some(p),
        // Fresh memory (the pool is gone only at thread exit).
        Ok(Some(None)) | Err(_) => Some(fresh_memory(cap)),
    }
}

/// `cap` zeroed bytes from the allocator.
#[cold]
#[inline(never)]
fn fresh_memory(cap: usize) -> NonNull<u8> {
    // SAFETY: the layout has a non-zero size.
    let raw = unsafe { alloc::alloc_zeroed(layout(cap)) };
    match NonNull::new(raw) {
        Some(p) => p,
        None => alloc::handle_alloc_error(layout(cap)),
    }
}

/// Gives `cap` bytes at `ptr` back to the pool (or the allocator), and a
/// budgeted allocation's share of the budget (waking the reactor if
/// someone waits for it).
fn free_memory(ptr: NonNull<u8>, cap: usize, budgeted: bool) {
    let (kept, wake) = POOL
        .try_with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else {
                return (false, false);
            };
            p.live = p.live.saturating_sub(1);
            let wake = budgeted && {
                p.budget_used_bytes = p.budget_used_bytes.saturating_sub(cap);
                std::mem::take(&mut p.budget_waiter)
            };
            let kept = match pooled_class(cap) {
                Some(c)
                    if (p.free[c].len() + 1) * cap <= POOL_FREE_BYTES_PER_CLASS
                        && p.free_bytes + cap <= POOL_FREE_BYTES_PER_CORE =>
                {
                    p.free[c].push(ptr);
                    p.free_bytes += cap;
                    true
                }
                _ => false,
            };
            (kept, wake)
        })
        .unwrap_or((false, false));
    if !kept {
        // SAFETY: allocated by `alloc_memory` with this capacity.
        unsafe { alloc::dealloc(ptr.as_ptr(), layout(cap)) }
    }
    if wake {
        reactor::wake_loop();
    }
}

/// Sets this core's budget for [`IoBuf::try_budgeted`].
pub fn set_budget_bytes(bytes: usize) {
    POOL.with(|p| p.borrow_mut().budget_bytes = bytes);
}

/// This core's budget and how much of it is in use, in bytes.
pub fn budget_bytes() -> (usize, usize) {
    POOL.with(|p| {
        let p = p.borrow();
        (p.budget_bytes, p.budget_used_bytes)
    })
}

/// Buffers allocated on this core and not yet dropped.
pub fn live_buffers() -> usize {
    POOL.with(|p| p.borrow().live)
}

/// Free memory this core's pool keeps for reuse, in bytes (at most
/// [`POOL_FREE_BYTES_PER_CORE`]).
pub fn pool_free_bytes() -> usize {
    POOL.with(|p| p.borrow().free_bytes)
}

/// A [`IoBuf::try_budgeted`] allocation failed and its caller waits: the
/// next budgeted buffer returned on this core wakes the reactor (if parked),
/// so the waiter retries at its next poll. Once per call.
pub fn wake_on_budget_return() {
    POOL.with(|p| p.borrow_mut().budget_waiter = true);
}

enum Origin {
    /// No memory: length 0.
    Empty,
    /// Our own allocation of `cap` bytes; `budgeted` if it counts against
    /// the core's budget.
    Owned { budgeted: bool },
    /// A window of a lent buffer, kept alive by its lender.
    Window(#[allow(dead_code)] Rc<Lent>),
}

/// An exclusive, writable, aligned data buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    origin: Origin,
}

impl IoBuf {
    pub const fn empty() -> IoBuf {
        IoBuf {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
            origin: Origin::Empty,
        }
    }

    /// An aligned buffer of `len` bytes from this core's pool; its contents
    /// are unspecified (zero when fresh, old data when recycled).
    pub fn new(len: usize) -> IoBuf {
        IoBuf::alloc(len)
    }

    /// An aligned buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut b = IoBuf::new(len);
        b.as_mut_slice().fill(0);
        b
    }

    /// Like [`IoBuf::new`], but counted against this core's budget: None
    /// when that would exceed it (the caller waits for buffers to return).
    #[inline]
    pub fn try_budgeted(len: usize) -> Option<IoBuf> {
        let cap = capacity_for(len.max(1));
        Some(IoBuf {
            ptr: alloc_memory(cap, true)?,
            len,
            cap,
            origin: Origin::Owned { budgeted: true },
        })
    }

    fn alloc(len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf::empty();
        }
        let cap = capacity_for(len);
        // Only budgeted allocations can be refused.
        let ptr = alloc_memory(cap, false).unwrap_or_else(|| fresh_memory(cap));
        IoBuf {
            ptr,
            len,
            cap,
            origin: Origin::Owned { budgeted: false },
        }
    }

    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
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

    /// Whether this is a window of another I/O's buffer (not our own memory).
    pub fn is_window(&self) -> bool {
        matches!(self.origin, Origin::Window(_))
    }

    /// Resizes to `len`, reallocating only when it exceeds the capacity (a
    /// window then becomes an allocation of its own).
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            let budgeted = matches!(self.origin, Origin::Owned { budgeted: true });
            *self = IoBuf::alloc(len);
            debug_assert!(!budgeted, "budgeted buffers are not grown");
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
        // SAFETY: ptr is valid and initialised for len bytes (our own
        // allocation, or a window its lender keeps alive and lends to us
        // alone), or dangling with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access: nothing
        // else can reach these bytes (module invariants).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Default for IoBuf {
    fn default() -> Self {
        IoBuf::empty()
    }
}

impl Drop for IoBuf {
    // Inline: most drops are of empty buffers (a slot's between commands),
    // which must cost a compare, not a call.
    #[inline]
    fn drop(&mut self) {
        if let Origin::Owned { budgeted } = self.origin {
            free_memory(self.ptr, self.cap, budgeted);
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} of {} bytes)", self.len, self.cap)
    }
}

/// A read-only view of memory that `owner` keeps alive. Clones share the
/// owner; none can write.
#[derive(Clone)]
pub struct SharedBuf {
    ptr: NonNull<u8>,
    len: usize,
    owner: Option<Rc<dyn Any>>,
}

impl SharedBuf {
    pub const fn empty() -> SharedBuf {
        SharedBuf {
            ptr: NonNull::dangling(),
            len: 0,
            owner: None,
        }
    }

    /// A view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be initialised and stay allocated for as long as
    /// `owner` lives, and must not be written while a slice from
    /// [`SharedBuf::as_slice`] of it is held (writes between accesses, as a
    /// device's data changes under a later read, are allowed).
    pub unsafe fn from_raw(ptr: *const u8, len: usize, owner: Rc<dyn Any>) -> SharedBuf {
        SharedBuf {
            ptr: NonNull::new(ptr as *mut u8).unwrap_or(NonNull::dangling()),
            len,
            owner: Some(owner),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the owner keeps the memory allocated and initialised
        // (`from_raw`'s contract); nothing writes it while this borrow of
        // `self` is held.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The view of `len` bytes from `start` within this one (same owner);
    /// None when out of range.
    pub fn slice(&self, start: usize, len: usize) -> Option<SharedBuf> {
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(SharedBuf {
            // SAFETY: start <= len of a valid range.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(start)) },
            len,
            owner: self.owner.clone(),
        })
    }
}

impl Default for SharedBuf {
    fn default() -> Self {
        SharedBuf::empty()
    }
}

impl std::fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBuf({} bytes)", self.len)
    }
}

/// What a [`BufLender`] has handed out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lending {
    Nothing,
    Shares,
    Windows,
}

struct Lent {
    /// Only reached through raw pointers while pieces are out; replaced
    /// only while none are.
    buf: UnsafeCell<IoBuf>,
    lending: Cell<Lending>,
    /// End of the last window handed out (windows start at or after it).
    cursor: Cell<usize>,
}

/// Lends a parent I/O's buffer to its children in pieces (see the module
/// docs). Meant to live as long as the parent's slot, so lending allocates
/// nothing.
pub struct BufLender(Rc<Lent>);

impl Default for BufLender {
    fn default() -> Self {
        BufLender::new()
    }
}

impl BufLender {
    pub fn new() -> BufLender {
        BufLender(Rc::new(Lent {
            buf: UnsafeCell::new(IoBuf::empty()),
            lending: Cell::new(Lending::Nothing),
            cursor: Cell::new(0),
        }))
    }

    /// Pieces (shares or windows) still out.
    pub fn pieces_out(&self) -> usize {
        Rc::strong_count(&self.0) - 1
    }

    fn idle(&self) -> bool {
        if self.pieces_out() == 0 {
            self.0.lending.set(Lending::Nothing);
            self.0.cursor.set(0);
            true
        } else {
            false
        }
    }

    /// Takes `buf` to lend; gives it back if pieces of the previous one are
    /// still out.
    pub fn lend(&self, buf: IoBuf) -> Result<(), IoBuf> {
        if !self.idle() {
            return Err(buf);
        }
        // SAFETY: no piece is out, so nothing else points into the old
        // buffer, and `&self` is the only way in.
        unsafe { *self.0.buf.get() = buf };
        Ok(())
    }

    fn buf_ptr_len(&self) -> (*mut u8, usize) {
        // SAFETY: reading the pointer and length only; the buffer itself
        // is replaced only while no piece is out.
        let b = unsafe { &*self.0.buf.get() };
        (b.ptr.as_ptr(), b.len)
    }

    /// A read-only view of `len` bytes from `start`; None when out of range
    /// or while windows are out.
    pub fn share(&self, start: usize, len: usize) -> Option<SharedBuf> {
        self.idle();
        if self.0.lending.get() == Lending::Windows {
            return None;
        }
        let (ptr, buf_len) = self.buf_ptr_len();
        if start.checked_add(len)? > buf_len {
            return None;
        }
        self.0.lending.set(Lending::Shares);
        let owner: Rc<dyn Any> = self.0.clone();
        // SAFETY: in range of the lent buffer, which `owner` keeps (it is
        // replaced only once no piece is out) and which nothing writes
        // while shares are out: windows are refused and the parent has
        // given it up.
        Some(unsafe { SharedBuf::from_raw(ptr.add(start), len, owner) })
    }

    /// A writable window of `len` bytes from `start`; None when out of
    /// range, while shares are out, or when it would overlap a window out
    /// (windows are handed out at increasing offsets).
    pub fn window(&self, start: usize, len: usize) -> Option<IoBuf> {
        self.idle();
        if self.0.lending.get() == Lending::Shares || start < self.0.cursor.get() {
            return None;
        }
        let (ptr, buf_len) = self.buf_ptr_len();
        let end = start.checked_add(len)?;
        if end > buf_len {
            return None;
        }
        self.0.lending.set(Lending::Windows);
        self.0.cursor.set(end);
        Some(IoBuf {
            // SAFETY: start <= buf_len of a valid allocation.
            ptr: unsafe { NonNull::new_unchecked(ptr.add(start)) },
            len,
            cap: len,
            origin: Origin::Window(self.0.clone()),
        })
    }

    /// The buffer back, once no piece is out.
    pub fn reclaim(&self) -> Option<IoBuf> {
        if !self.idle() {
            return None;
        }
        // SAFETY: no piece is out.
        Some(std::mem::take(unsafe { &mut *self.0.buf.get() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_aligned_recycled_and_sized_by_class() {
        let a = IoBuf::new(5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.capacity(), 8192);
        assert_eq!(a.as_ptr() as usize % IO_BUF_ALIGN, 0);
        let p = a.as_ptr();
        drop(a);
        let b = IoBuf::new(8192);
        assert_eq!(b.as_ptr(), p, "the freed buffer is reused");
        let big = IoBuf::new(300 << 10);
        assert_eq!(big.capacity(), 300 << 10);
        assert_eq!(big.as_ptr() as usize % IO_BUF_ALIGN, 0);
        assert!(IoBuf::zeroed(4096).as_slice().iter().all(|&x| x == 0));
        assert!(IoBuf::new(0).is_empty());
    }

    #[test]
    fn budgeted_allocations_stop_at_the_budget_and_return_it() {
        let (_, used0) = budget_bytes();
        set_budget_bytes(used0 + 3 * 4096);
        let a = IoBuf::try_budgeted(4096).expect("first");
        let b = IoBuf::try_budgeted(100).expect("second, rounded to a page");
        let c = IoBuf::try_budgeted(4096).expect("third");
        assert!(IoBuf::try_budgeted(1).is_none(), "over budget");
        assert_eq!(budget_bytes().1, used0 + 3 * 4096);
        // A waiter is woken by the next return, once.
        wake_on_budget_return();
        drop(b);
        assert!(
            !POOL.with(|p| p.borrow().budget_waiter),
            "the return took the waiter"
        );
        assert!(IoBuf::try_budgeted(4096).is_some());
        drop((a, c));
        assert_eq!(budget_bytes().1, used0);
        set_budget_bytes(DEFAULT_BUDGET_BYTES_PER_CORE);
    }

    #[test]
    // Allocates 48 MiB: too slow under Miri, and no raw views involved.
    #[cfg_attr(miri, ignore)]
    fn the_pool_keeps_a_bounded_amount_of_free_memory() {
        let before = pool_free_bytes();
        // 16 MiB in each of three classes: each within its class's cap,
        // together above the core's.
        let bufs: Vec<IoBuf> = [128 << 10, 64 << 10, 32 << 10]
            .iter()
            .flat_map(|&len| (0..(16 << 20) / len).map(move |_| IoBuf::new(len)))
            .collect();
        drop(bufs);
        let kept = pool_free_bytes();
        assert!(kept <= POOL_FREE_BYTES_PER_CORE, "kept {kept}");
        assert!(kept >= before.max(16 << 20), "the pool still recycles");
    }

    #[test]
    fn shares_are_read_only_views_that_keep_the_buffer() {
        let lender = BufLender::new();
        let data: Vec<u8> = (0..64u8).collect();
        lender.lend(IoBuf::from_slice(&data)).unwrap();
        let s1 = lender.share(0, 64).unwrap();
        let s2 = lender.share(16, 8).unwrap();
        assert_eq!(s2.as_slice(), &data[16..24]);
        assert!(lender.share(60, 8).is_none(), "out of range");
        assert!(lender.window(0, 8).is_none(), "no windows while shared");
        assert!(lender.reclaim().is_none(), "pieces out");
        assert!(lender.lend(IoBuf::new(8)).is_err(), "cannot replace");
        let s3 = s1.slice(32, 32).unwrap();
        assert!(s1.slice(33, 32).is_none());
        drop((s1, s2));
        assert_eq!(lender.pieces_out(), 1);
        assert_eq!(s3.as_slice(), &data[32..]);
        drop(s3);
        let back = lender.reclaim().unwrap();
        assert_eq!(back.as_slice(), &data[..]);
        assert!(lender.reclaim().unwrap().is_empty(), "lent once");
    }

    #[test]
    fn windows_never_overlap_and_write_into_the_parent() {
        let lender = BufLender::new();
        lender.lend(IoBuf::zeroed(32)).unwrap();
        let mut w1 = lender.window(0, 8).unwrap();
        assert!(lender.window(4, 8).is_none(), "overlaps w1");
        let mut w2 = lender.window(16, 16).unwrap();
        assert!(lender.window(8, 4).is_none(), "below the cursor");
        assert!(lender.share(0, 4).is_none(), "no shares while windows");
        assert!(lender.window(24, 16).is_none(), "out of range");
        w1.as_mut_slice().fill(1);
        w2.as_mut_slice().fill(2);
        assert!(w2.is_window());
        // A window grown past its size becomes its own allocation.
        w2.resize(64);
        assert!(!w2.is_window());
        drop(w1);
        drop(w2);
        // Idle again: windows start from the beginning.
        let w3 = lender.window(8, 8).unwrap();
        drop(w3);
        let back = lender.reclaim().unwrap();
        assert_eq!(&back.as_slice()[..8], &[1; 8]);
        assert_eq!(&back.as_slice()[16..], &[2; 16]);
    }
}
