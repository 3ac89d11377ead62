//! A connection's receive buffers: bytes taken from the socket and not yet
//! handled (`pending`), in aligned blocks from the bdev buffer pool.
//!
//! In-capsule write data is handed to the bdev where it was received, as a
//! read-only [`SharedBuf`] view that holds its block: a block with views
//! out is *pinned* and is never written or moved again until the last view
//! is dropped. When the current block is pinned and full, pending bytes
//! move to another block instead of to its front. At most
//! [`MAX_RECV_BLOCKS`] blocks exist; one is always free to receive into.
//!
//! An empty or compacted block starts receiving at `home`, chosen so that
//! the data of a command capsule at the front lands on an
//! [`bdev::io::IO_BUF_ALIGN`] boundary: a write whose data is the first in
//! its receive needs no bounce for an O_DIRECT bdev (the bdev layer bounces
//! the others).
//!
//! Invariants: views cover bytes before `start` of their block (consumed);
//! the socket writes only at or after `end`; bytes a view covers are never
//! written while it lives (`Block` hands out mutable slices only of ranges
//! no view covers).

use std::cell::UnsafeCell;
use std::rc::Rc;

use bdev::io::IO_BUF_ALIGN;
use bdev::{IoBuf, SharedBuf};

/// Receive blocks a connection may have: the current one plus those still
/// pinned by writes in flight. Bounds a connection's receive memory at
/// `MAX_RECV_BLOCKS` times the block size.
pub const MAX_RECV_BLOCKS: usize = 4;

/// One block of receive memory.
struct Block {
    /// Reached only through `bytes` / `bytes_mut`, never as a whole while
    /// views are out.
    mem: UnsafeCell<IoBuf>,
}

impl Block {
    fn new(cap: usize) -> Rc<Block> {
        Rc::new(Block {
            mem: UnsafeCell::new(IoBuf::zeroed(cap)),
        })
    }

    fn cap(&self) -> usize {
        // SAFETY: reads the length only.
        unsafe { (*self.mem.get()).len() }
    }

    fn base(&self) -> *mut u8 {
        // SAFETY: reads the pointer only.
        unsafe { (*self.mem.get()).as_ptr() as *mut u8 }
    }

    fn views_out(self: &Rc<Self>) -> bool {
        Rc::strong_count(self) > 1
    }

    /// Bytes `at..at+len`, which nothing writes while the slice is held
    /// (the socket writes only at or after `end`, module invariants).
    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        assert!(at + len <= self.cap());
        // SAFETY: in bounds, initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.base().add(at), len) }
    }

    /// Bytes `at..at+len` to write into. The caller guarantees no view and
    /// no other slice covers them (a range at or after `end`, or any range
    /// of a block without views), and `&mut` on the owning `RecvBuf` keeps
    /// other slices of this call's range from existing.
    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= self.cap());
        // SAFETY: in bounds; exclusive by the caller's guarantee above.
        unsafe { std::slice::from_raw_parts_mut(self.base().add(at), len) }
    }

    /// Moves `start..end` to `to` within the block (no views out).
    fn move_within(self: &Rc<Self>, start: usize, end: usize, to: usize) {
        debug_assert!(!self.views_out());
        assert!(end <= self.cap() && to + (end - start) <= self.cap());
        // SAFETY: both ranges in bounds; no view or slice exists (no views
        // out, and the caller holds `&mut RecvBuf`); copy handles overlap.
        unsafe { std::ptr::copy(self.base().add(start), self.base().add(to), end - start) }
    }
}

pub struct RecvBuf {
    cur: Rc<Block>,
    /// The other blocks: free, or pinned by views.
    others: Vec<Rc<Block>>,
    start: usize,
    end: usize,
    /// Where an empty block starts receiving (see module docs).
    home: usize,
}

impl RecvBuf {
    pub fn new(cap: usize) -> RecvBuf {
        RecvBuf {
            cur: Block::new(cap),
            others: Vec::new(),
            start: 0,
            end: 0,
            home: 0,
        }
    }

    /// Received bytes not yet handled.
    pub fn pending(&self) -> &[u8] {
        self.cur.bytes(self.start, self.end - self.start)
    }

    /// Marks `n` pending bytes handled.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end && !self.cur.views_out() {
            self.start = self.home;
            self.end = self.home;
        }
    }

    /// Whether the current block may be written from its start again.
    pub fn unpinned(&self) -> bool {
        !self.cur.views_out()
    }

    /// Whether another view may pin a block: one block always stays free
    /// to receive into.
    pub fn can_pin(&self) -> bool {
        let pinned = self.others.iter().filter(|b| b.views_out()).count();
        pinned + 1 < MAX_RECV_BLOCKS
    }

    /// A read-only view of `len` pending bytes from `offset` (pins the
    /// block until dropped).
    pub fn share(&self, offset: usize, len: usize) -> Option<SharedBuf> {
        if offset.checked_add(len)? > self.end - self.start {
            return None;
        }
        let owner: Rc<dyn std::any::Any> = self.cur.clone();
        // SAFETY: in bounds of the block, which `owner` keeps allocated; a
        // block with views out is never written again until they are all
        // dropped (module invariants).
        Some(unsafe { SharedBuf::from_raw(self.cur.base().add(self.start + offset), len, owner) })
    }

    /// Sets where an empty block starts receiving: `data_offset` bytes of a
    /// capsule then end on an aligned boundary.
    pub fn align_capsule_data(&mut self, data_offset: usize) {
        self.home = (IO_BUF_ALIGN - data_offset % IO_BUF_ALIGN) % IO_BUF_ALIGN;
        if self.start == self.end && !self.cur.views_out() {
            self.start = self.home;
            self.end = self.home;
        }
    }

    /// Free space at the end for at least `want` more bytes if it can be
    /// made, by moving the pending bytes: to `home` in this block, or, if
    /// it is pinned, to `home` in a free one. Fill it, then call
    /// [`RecvBuf::filled`].
    pub fn space(&mut self, want: usize) -> &mut [u8] {
        if self.cur.cap() - self.end < want {
            let n = self.end - self.start;
            if !self.cur.views_out() {
                if self.start != self.home {
                    self.cur.move_within(self.start, self.end, self.home);
                    self.start = self.home;
                    self.end = self.home + n;
                }
            } else if let Some(next) = self.free_block() {
                next.bytes_mut(self.home, n)
                    .copy_from_slice(self.cur.bytes(self.start, n));
                let old = std::mem::replace(&mut self.cur, next);
                self.others.push(old);
                self.start = self.home;
                self.end = self.home + n;
            }
        }
        let (end, cap) = (self.end, self.cur.cap());
        self.cur.bytes_mut(end, cap - end)
    }

    /// `n` bytes were written at the start of [`RecvBuf::space`].
    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.cur.cap());
        self.end += n;
    }

    /// When nothing is pending and the block is free: the whole block from
    /// `home`, to receive into (then [`RecvBuf::filled`]).
    pub fn empty_space(&mut self) -> Option<&mut [u8]> {
        if self.start != self.end || self.cur.views_out() {
            return None;
        }
        self.start = self.home;
        self.end = self.home;
        let (home, cap) = (self.home, self.cur.cap());
        Some(self.cur.bytes_mut(home, cap - home))
    }

    /// A block without views, or a new one while under the limit.
    fn free_block(&mut self) -> Option<Rc<Block>> {
        if let Some(i) = self.others.iter().position(|b| !b.views_out()) {
            return Some(self.others.swap_remove(i));
        }
        if self.others.len() + 1 < MAX_RECV_BLOCKS {
            return Some(Block::new(self.cur.cap()));
        }
        None
    }

    /// Grows the blocks to hold `cap` bytes after `home` (at Connect,
    /// before any view).
    pub fn grow(&mut self, cap: usize) {
        let cap = cap + self.home;
        if cap <= self.cur.cap() || self.cur.views_out() {
            return;
        }
        let next = Block::new(cap);
        let n = self.end - self.start;
        next.bytes_mut(self.home, n)
            .copy_from_slice(self.cur.bytes(self.start, n));
        self.cur = next;
        self.start = self.home;
        self.end = self.home + n;
        self.others.retain(|b| b.views_out());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives `data` into the buffer as a socket would.
    fn recv(rx: &mut RecvBuf, data: &[u8]) -> usize {
        let space = rx.space(32);
        let n = data.len().min(space.len());
        space[..n].copy_from_slice(&data[..n]);
        rx.filled(n);
        n
    }

    #[test]
    fn viewed_bytes_are_never_moved_or_overwritten() {
        let mut rx = RecvBuf::new(128);
        let first: Vec<u8> = (0..100u8).collect();
        assert_eq!(recv(&mut rx, &first), 100);
        // A write takes bytes 10..60 in place, and they are consumed.
        let view = rx.share(10, 50).unwrap();
        let block = Rc::as_ptr(&rx.cur);
        rx.consume(60);
        assert_eq!(view.as_slice(), &first[10..60]);
        // Lots more input: the pending tail moves to another block rather
        // than to the front of the pinned one.
        for round in 0..20u8 {
            let more = vec![0xA0 ^ round; 90];
            let n = recv(&mut rx, &more);
            assert!(n > 0, "round {round}: no room");
            let pending = rx.pending().len();
            rx.consume(pending.saturating_sub(40));
            assert_eq!(view.as_slice(), &first[10..60], "round {round}");
        }
        assert_ne!(Rc::as_ptr(&rx.cur), block, "moved to another block");
        // Dropped, the old block is free for reuse.
        drop(view);
        assert!(rx.others.iter().all(|b| !b.views_out()));
        assert!(rx.can_pin());

        // All input consumed while viewed: the next receive goes after it,
        // not back to the start.
        let mut rx = RecvBuf::new(128);
        recv(&mut rx, &[1; 50]);
        let view = rx.share(0, 50).unwrap();
        rx.consume(50);
        recv(&mut rx, &[2; 50]);
        assert_eq!(view.as_slice(), [1; 50]);
        rx.consume(50);
        drop(view);
        rx.consume(0);
        assert_eq!((rx.start, rx.end), (0, 0), "free again once unpinned");
    }

    #[test]
    fn views_are_bounded_so_one_block_always_receives() {
        let mut rx = RecvBuf::new(64);
        let mut views = Vec::new();
        for _ in 0..MAX_RECV_BLOCKS {
            if !rx.can_pin() {
                break;
            }
            recv(&mut rx, &[7; 64]);
            views.push(rx.share(0, 64).unwrap());
            rx.consume(64);
            // Full: forces a move to a fresh block for the next round.
            let _ = rx.space(64);
        }
        assert_eq!(views.len(), MAX_RECV_BLOCKS - 1);
        assert!(!rx.can_pin());
        assert!(rx.unpinned(), "the current block is free");
        assert!(!rx.space(16).is_empty());
        assert!(rx.share(0, 1).is_none(), "nothing pending to view");
    }

    #[test]
    fn capsule_data_at_the_front_lands_aligned() {
        let mut rx = RecvBuf::new(16384);
        rx.align_capsule_data(72);
        let space = rx.space(8192);
        let at = space.as_ptr() as usize;
        assert_eq!((at + 72) % IO_BUF_ALIGN, 0);
        space[..100].fill(3);
        rx.filled(100);
        rx.consume(30);
        // Compaction moves the pending bytes back home.
        let _ = rx.space(16384 - 4096);
        assert_eq!((rx.pending().as_ptr() as usize + 72) % IO_BUF_ALIGN, 0);
        rx.grow(20000);
        assert_eq!(rx.pending().len(), 70);
        assert_eq!((rx.pending().as_ptr() as usize + 72) % IO_BUF_ALIGN, 0);
    }
}
