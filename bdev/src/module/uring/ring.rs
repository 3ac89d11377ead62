//! The per-core io_uring shared by every uring bdev channel on a core.
//!
//! Channels push submission entries as I/O arrives; one poller per core
//! makes a single `io_uring_enter` per loop turn for everything pushed
//! since the last one (batching), then reaps completions and completes
//! their I/O. While anything is in flight the core holds a [`SpinHold`]:
//! this ring's completions cannot wake a parked reactor, so the reactor
//! keeps polling until the last one is reaped, then may park again.
//!
//! Invariants: an in-flight I/O's `IoBox` (and so its buffer, which the
//! kernel reads or writes, or the read-only view a write's data lies in) is
//! owned by the slot table until its completion is reaped; the slot index
//! is the entry's `user_data`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use io_uring::{opcode, squeue, types, IoUring};
use reactor::{PollStatus, PollerHandle, SpinHold};

use crate::io::{IoBox, IoStatus, IoType};

/// Submission queue entries per core: deep enough for several bdevs at
/// QD128 each; more waits in the overflow queue.
const RING_ENTRIES: u32 = 512;

/// Completions reaped per poll; the rest wait for the next turn.
const REAP_BATCH: usize = 256;

/// What the completion of a slot means.
#[derive(Clone, Copy)]
struct Expect {
    /// Bytes a read or write must transfer to succeed (0: any non-negative
    /// result is success).
    len: u32,
}

struct Slots {
    ios: Vec<Option<IoBox>>,
    expect: Vec<Expect>,
    free: Vec<u32>,
}

impl Slots {
    fn insert(&mut self, io: IoBox, expect: Expect) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.ios[i as usize] = Some(io);
                self.expect[i as usize] = expect;
                i
            }
            None => {
                self.ios.push(Some(io));
                self.expect.push(expect);
                (self.ios.len() - 1) as u32
            }
        }
    }

    fn take(&mut self, i: u32) -> Option<(IoBox, Expect)> {
        let io = self.ios.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some((io, self.expect[i as usize]))
    }
}

pub(crate) struct CoreRing {
    ring: RefCell<IoUring>,
    slots: RefCell<Slots>,
    /// Entries that did not fit in the submission queue.
    overflow: RefCell<VecDeque<squeue::Entry>>,
    in_flight: Cell<u32>,
    unsubmitted: Cell<u32>,
    spin: RefCell<Option<SpinHold>>,
    reaped: RefCell<Vec<(u64, i32)>>,
    /// Its closure holds this ring: a cycle that lives as long as the
    /// core's thread, broken when the reactor drops its pollers at stop.
    poller: RefCell<Option<PollerHandle>>,
}

thread_local! {
    static CORE_RING: RefCell<Option<std::rc::Rc<CoreRing>>> = const { RefCell::new(None) };
}

/// This core's ring, created (with its poller) on first use.
pub(crate) fn core_ring() -> std::io::Result<std::rc::Rc<CoreRing>> {
    if let Some(r) = CORE_RING.with(|c| c.borrow().clone()) {
        return Ok(r);
    }
    let ring = IoUring::new(RING_ENTRIES)?;
    let r = std::rc::Rc::new(CoreRing {
        ring: RefCell::new(ring),
        slots: RefCell::new(Slots {
            ios: Vec::new(),
            expect: Vec::new(),
            free: Vec::new(),
        }),
        overflow: RefCell::new(VecDeque::new()),
        in_flight: Cell::new(0),
        unsubmitted: Cell::new(0),
        spin: RefCell::new(None),
        reaped: RefCell::new(Vec::with_capacity(REAP_BATCH)),
        poller: RefCell::new(None),
    });
    let polled = r.clone();
    *r.poller.borrow_mut() = Some(reactor::register_poller("uring", move || polled.poll()));
    CORE_RING.with(|c| *c.borrow_mut() = Some(r.clone()));
    Ok(r)
}

impl CoreRing {
    /// Queues `io` against `fd` for the next submission. Completes it with
    /// `Failed` if the type has no mapping.
    pub(crate) fn queue(&self, fd: i32, block_size: u32, io: IoBox) {
        let off = io.offset_blocks * block_size as u64;
        let len = (io.num_blocks * block_size as u64) as u32;
        let fd = types::Fd(fd);
        let (entry, expect) = match io.io_type {
            IoType::Read => (
                // The buffer lives in the IoBox, owned by the slot table
                // until the completion is reaped.
                opcode::Read::new(fd, io.buf.as_ptr() as *mut u8, len)
                    .offset(off)
                    .build(),
                Expect { len },
            ),
            IoType::Write => (
                opcode::Write::new(fd, io.data_ptr(), len)
                    .offset(off)
                    .build(),
                Expect { len },
            ),
            IoType::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                Expect { len: 0 },
            ),
            IoType::Unmap => (
                opcode::Fallocate::new(fd, len as u64)
                    .offset(off)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
                Expect { len: 0 },
            ),
            IoType::WriteZeroes => (
                opcode::Fallocate::new(fd, len as u64)
                    .offset(off)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
                Expect { len: 0 },
            ),
            IoType::Reset => return io.complete(IoStatus::Success),
            IoType::Compare => return io.complete(IoStatus::Failed),
        };
        let slot = self.slots.borrow_mut().insert(io, expect);
        let entry = entry.user_data(slot as u64);
        self.push(entry);
        self.in_flight.set(self.in_flight.get() + 1);
        if self.spin.borrow().is_none() {
            *self.spin.borrow_mut() = Some(SpinHold::new());
        }
    }

    fn push(&self, entry: squeue::Entry) {
        let mut overflow = self.overflow.borrow_mut();
        if overflow.is_empty() {
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the entry's buffer is owned by the slot table until
            // its completion is reaped (see module invariants).
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted.set(self.unsubmitted.get() + 1);
                return;
            }
        }
        overflow.push_back(entry);
    }

    /// One turn: move overflow into the ring, submit everything pushed since
    /// the last turn with one syscall, reap completions.
    fn poll(&self) -> PollStatus {
        if self.in_flight.get() == 0 {
            return PollStatus::Idle;
        }
        {
            let mut overflow = self.overflow.borrow_mut();
            let mut ring = self.ring.borrow_mut();
            while let Some(e) = overflow.front() {
                // SAFETY: as in `push`.
                if unsafe { ring.submission().push(e) }.is_err() {
                    break;
                }
                overflow.pop_front();
                self.unsubmitted.set(self.unsubmitted.get() + 1);
            }
            if self.unsubmitted.get() > 0 {
                match ring.submit() {
                    Ok(n) => self
                        .unsubmitted
                        .set(self.unsubmitted.get().saturating_sub(n as u32)),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                    Err(e) => log::error!("io_uring submit: {e}"),
                }
            }
            let mut reaped = self.reaped.borrow_mut();
            reaped.clear();
            for cqe in ring.completion().take(REAP_BATCH) {
                reaped.push((cqe.user_data(), cqe.result()));
            }
        }
        let n = self.reaped.borrow().len();
        for i in 0..n {
            let (slot, res) = self.reaped.borrow()[i];
            let Some((io, expect)) = self.slots.borrow_mut().take(slot as u32) else {
                log::error!("io_uring completion for unknown slot {slot}");
                continue;
            };
            self.in_flight.set(self.in_flight.get() - 1);
            let ok = res >= 0 && (expect.len == 0 || res as u32 == expect.len);
            if !ok {
                log::warn!(
                    "uring {:?} of {} blocks at block {} failed: {}",
                    io.io_type,
                    io.num_blocks,
                    io.offset_blocks,
                    if res < 0 {
                        std::io::Error::from_raw_os_error(-res).to_string()
                    } else {
                        format!("short transfer of {res} bytes")
                    }
                );
            }
            io.complete(if ok {
                IoStatus::Success
            } else {
                IoStatus::Failed
            });
        }
        if self.in_flight.get() == 0 {
            self.spin.borrow_mut().take();
        }
        PollStatus::from_work(n > 0)
    }
}
