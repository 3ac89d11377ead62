//! Splitting an I/O into the pieces its bdev takes: reads, writes and
//! compares larger than `max_transfer_blocks` or crossing a multiple of
//! `split_boundary_blocks` ([`crate::IoRequirements`]) become children,
//! each within the limits, submitted into the same channel.
//!
//! The parent waits in this core's table (a slab reused across I/Os, so
//! steady state allocates nothing) and completes when its last child has,
//! failing if any child failed. Children carry pieces of the parent's data:
//! writable windows of a read's buffer, read-only shares of a write's (a
//! [`BufLender`] per slot hands them out and takes the buffer back), or
//! slices of a write's read-only view. A child's frame records no
//! statistics: the parent counts once, as SPDK's split does.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use crate::buf::{BufLender, SharedBuf};
use crate::channel::IoChannel;
use crate::io::{frame_flags, IoBox, IoCompletion, IoStatus, IoType};
use crate::slab::Slab;

#[derive(Default)]
struct Parent {
    io: Option<IoBox>,
    lender: BufLender,
    /// A write's read-only data, sliced for the children (given back).
    shared: SharedBuf,
    remaining: u32,
    status: IoStatus,
}

struct SplitTable {
    parents: RefCell<Slab<Parent>>,
    /// Children being planned (kept to reuse its allocation).
    scratch: RefCell<Vec<IoBox>>,
    me: Weak<SplitTable>,
}

thread_local! {
    static TABLE: Rc<SplitTable> = Rc::new_cyclic(|me| SplitTable {
        parents: RefCell::new(Slab::default()),
        scratch: RefCell::new(Vec::new()),
        me: me.clone(),
    });
}

/// Splits `parent` (validated, in `ch`'s frame) into children within the
/// bdev's limits and submits them into `ch`.
pub(crate) fn start(ch: &IoChannel, mut parent: IoBox) {
    let table = TABLE.with(|t| t.clone());
    let req = ch.bdev().io_requirements();
    let bs = ch.bdev().block_size() as usize;
    let (io_type, offset, num_blocks) = (parent.io_type, parent.offset_blocks, parent.num_blocks);
    // The parent's data: a write's read-only view is sliced; otherwise its
    // buffer is lent out in pieces (it is held either way, and given back).
    let shared = std::mem::take(&mut parent.shared);
    let buf = parent.take_buf();
    let idx = table.park(parent);
    let sliced = io_type != IoType::Read && !shared.is_empty();
    let lent = table.with_parent(idx, |p| p.lender.lend(buf).is_ok()) == Some(true);
    let mut children = table.scratch.take();
    let mut at = offset;
    let end = offset + num_blocks;
    let mut failed = !lent;
    while at < end && !failed {
        let n = req.piece_blocks(at, end - at);
        let (start, len) = ((at - offset) as usize * bs, n as usize * bs);
        let mut child = IoBox::with(io_type, at, n, crate::io::IoBuf::empty());
        child.tag = idx as u64;
        let piece = match io_type {
            IoType::Read => table
                .with_parent(idx, |p| p.lender.window(start, len))
                .flatten()
                .map(|w| child.buf = w),
            _ if sliced => shared.slice(start, len).map(|s| child.shared = s),
            _ => table
                .with_parent(idx, |p| p.lender.share(start, len))
                .flatten()
                .map(|s| child.shared = s),
        };
        // None cannot happen: validate checked the data covers the range.
        failed = piece.is_none();
        children.push(child);
        at += n;
    }
    table.with_parent(idx, |p| p.shared = shared);
    if failed {
        children.clear();
        table.scratch.replace(children);
        table.finish(idx, IoStatus::Failed);
        return;
    }
    table.with_parent(idx, |p| p.remaining = children.len() as u32);
    let cb: Rc<dyn IoCompletion> = table.clone();
    for child in children.drain(..) {
        ch.submit_with(child, cb.clone(), frame_flags::SPLIT_CHILD);
    }
    table.scratch.replace(children);
}

impl SplitTable {
    fn park(&self, io: IoBox) -> u32 {
        let mut parents = self.parents.borrow_mut();
        let i = parents.alloc();
        if let Some(p) = parents.get_mut(i) {
            p.io = Some(io);
            p.remaining = 0;
            p.status = IoStatus::Success;
        }
        i
    }

    fn with_parent<R>(&self, i: u32, f: impl FnOnce(&mut Parent) -> R) -> Option<R> {
        self.parents.borrow_mut().get_mut(i).map(f)
    }

    /// Completes parent `i` with `status`, its buffer back in place.
    fn finish(&self, i: u32, mut status: IoStatus) {
        let mut reusable = true;
        let io = {
            let mut parents = self.parents.borrow_mut();
            let Some(p) = parents.get_mut(i) else { return };
            let io = p.io.take();
            if let Some(mut io) = io {
                io.shared = std::mem::take(&mut p.shared);
                match p.lender.reclaim() {
                    Some(buf) => io.buf = buf,
                    None => {
                        // A layer below kept a piece of the data: the buffer
                        // stays with the pieces and the I/O fails.
                        log::error!("split I/O: a child's buffer was not returned");
                        status = IoStatus::Failed;
                        reusable = false;
                    }
                }
                Some(io)
            } else {
                None
            }
        };
        if reusable {
            self.parents.borrow_mut().release(i);
        }
        // No borrow held: completing runs the submitter, which may submit.
        if let Some(io) = io {
            io.complete(status);
        }
    }
}

impl IoCompletion for SplitTable {
    fn io_done(&self, child: IoBox) {
        let i = child.tag as u32;
        let st = child.status();
        drop(child);
        let done = {
            let mut parents = self.parents.borrow_mut();
            let Some(p) = parents.get_mut(i) else {
                return;
            };
            if !st.is_success() && p.status.is_success() {
                p.status = st;
            }
            p.remaining = p.remaining.saturating_sub(1);
            (p.remaining == 0).then_some(p.status)
        };
        if let Some(status) = done {
            if let Some(t) = self.me.upgrade() {
                t.finish(i, status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::bdev::IoRequirements;

    #[test]
    fn pieces_respect_boundary_and_size() {
        let r = IoRequirements {
            required_alignment: 0,
            split_boundary_blocks: 8,
            max_transfer_blocks: 3,
        };
        assert!(!r.needs_split(0, 3));
        assert!(r.needs_split(0, 4), "too large");
        assert!(r.needs_split(7, 2), "crosses 8");
        let mut at = 5;
        let mut pieces = Vec::new();
        while at < 21 {
            let n = r.piece_blocks(at, 21 - at);
            pieces.push((at, n));
            at += n;
        }
        assert_eq!(
            pieces,
            vec![(5, 3), (8, 3), (11, 3), (14, 2), (16, 3), (19, 2)]
        );
        let none = IoRequirements::default();
        assert!(!none.needs_split(1 << 40, 1 << 30));
    }
}
