//! `error`: a virtual bdev that injects failures into I/O to a base bdev
//! (SPDK's vbdev_error). It is named `EE_<base>` and spans the whole base.
//!
//! A rule per I/O type (read, write, unmap, flush) says what to do to the
//! next N matching I/Os: fail them, fail them with NOMEM, hold them
//! (pending) until a reset or `clear`, or corrupt one byte of their data
//! (writes before they reach the base, reads after). Rules live in
//! atomics shared by every core; a rule's count is taken with a
//! compare-and-swap so N injections happen exactly N times across cores.

pub mod rpc;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::bdev::{Bdev, BdevHandle, LocalFuture};
use crate::channel::{BdevChannel, IoChannel};
use crate::io::{IoBox, IoBuf, IoCompletion, IoStatus, IoType, SharedBuf};
use crate::registry::Descriptor;

pub const MODULE: &str = "error";

/// How often a channel holding pending I/O checks whether to release it.
/// Only runs while something is held, so an idle bdev costs nothing.
const PENDING_CHECK_PERIOD: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorKind {
    None = 0,
    Failure = 1,
    Pending = 2,
    CorruptData = 3,
    NoMemory = 4,
}

impl ErrorKind {
    pub fn parse(s: &str) -> Option<ErrorKind> {
        Some(match s {
            "failure" | "nvme_failure" => ErrorKind::Failure,
            "pending" => ErrorKind::Pending,
            "corrupt_data" => ErrorKind::CorruptData,
            "nomem" => ErrorKind::NoMemory,
            _ => return None,
        })
    }

    fn from_u8(v: u8) -> ErrorKind {
        match v {
            1 => ErrorKind::Failure,
            2 => ErrorKind::Pending,
            3 => ErrorKind::CorruptData,
            4 => ErrorKind::NoMemory,
            _ => ErrorKind::None,
        }
    }
}

/// The I/O types a rule can target, as slots.
const RULE_TYPES: [IoType; 4] = [IoType::Read, IoType::Write, IoType::Unmap, IoType::Flush];

fn rule_slot(t: IoType) -> Option<usize> {
    RULE_TYPES.iter().position(|r| *r == t)
}

#[derive(Debug, Default)]
struct ErrorRule {
    kind: AtomicU8,
    remaining: AtomicU32,
    queue_depth: AtomicU64,
    corrupt_offset: AtomicU64,
    corrupt_value: AtomicU8,
}

impl ErrorRule {
    /// Takes one injection if the rule applies at `in_flight`.
    fn take(&self, in_flight: u64) -> Option<(ErrorKind, u64, u8)> {
        let kind = ErrorKind::from_u8(self.kind.load(Ordering::Relaxed));
        if kind == ErrorKind::None || in_flight < self.queue_depth.load(Ordering::Relaxed) {
            return None;
        }
        self.remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()?;
        Some((
            kind,
            self.corrupt_offset.load(Ordering::Relaxed),
            self.corrupt_value.load(Ordering::Relaxed),
        ))
    }
}

/// What `bdev_error_inject_error` asks for.
#[derive(Debug, Clone)]
pub struct Injection {
    /// None = `clear`; otherwise the targeted types.
    pub io_types: Option<Vec<IoType>>,
    pub kind: ErrorKind,
    pub num: u32,
    pub queue_depth: u64,
    pub corrupt_offset: u64,
    pub corrupt_value: u8,
}

#[derive(Debug, Default)]
pub struct ErrorRules {
    rules: [ErrorRule; 4],
    /// Bumped by `clear`, reset and removal: channels release held I/O.
    release_epoch: AtomicU64,
}

impl ErrorRules {
    pub fn inject(&self, inj: &Injection) {
        match &inj.io_types {
            None => {
                for r in &self.rules {
                    r.remaining.store(0, Ordering::Release);
                    r.kind.store(ErrorKind::None as u8, Ordering::Release);
                }
                self.release_epoch.fetch_add(1, Ordering::AcqRel);
            }
            Some(types) => {
                for t in types {
                    if let Some(i) = rule_slot(*t) {
                        let r = &self.rules[i];
                        r.queue_depth.store(inj.queue_depth, Ordering::Relaxed);
                        r.corrupt_offset
                            .store(inj.corrupt_offset, Ordering::Relaxed);
                        r.corrupt_value.store(inj.corrupt_value, Ordering::Relaxed);
                        r.kind.store(inj.kind as u8, Ordering::Release);
                        r.remaining.store(inj.num, Ordering::Release);
                    }
                }
            }
        }
    }

    fn release_all(&self) {
        self.release_epoch.fetch_add(1, Ordering::AcqRel);
    }
}

pub struct ErrorBdev {
    base_name: String,
    /// Only written to the config when the user gave it, as SPDK does.
    uuid_given: Option<Uuid>,
    base: Mutex<Option<Descriptor>>,
    base_bdev: BdevHandle,
    rules: Arc<ErrorRules>,
}

impl ErrorBdev {
    pub fn rules(&self) -> &ErrorRules {
        &self.rules
    }
}

impl Bdev for ErrorBdev {
    fn module(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "Error Injection Disk"
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        self.base_bdev.io_type_supported(io_type)
    }

    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        Rc::new_cyclic(|me: &Weak<ErrorChannel>| ErrorChannel {
            me: me.clone(),
            base: self.base_bdev.get_channel(),
            rules: self.rules.clone(),
            in_flight: Cell::new(0),
            pending: RefCell::new(Vec::new()),
            pending_epoch: Cell::new(0),
            release_poller: RefCell::new(None),
        })
    }

    fn dump_info_json(&self) -> Value {
        json!({"error_disk": {"base_bdev": self.base_name}})
    }

    fn write_config_json(&self) -> Option<Value> {
        let mut params = json!({"base_name": self.base_name});
        if let Some(u) = self.uuid_given {
            params["uuid"] = json!(u.hyphenated().to_string());
        }
        Some(json!({"method": "bdev_error_create", "params": params}))
    }

    fn destruct(&self) -> LocalFuture<()> {
        self.rules.release_all();
        if let Ok(mut d) = self.base.lock() {
            d.take();
        }
        Box::pin(async {})
    }
}

/// Set in the I/O's module context: corrupt this read on completion.
const CTX_CORRUPT_READ: u64 = 1 << 63;

pub(crate) struct ErrorChannel {
    me: Weak<ErrorChannel>,
    base: IoChannel,
    rules: Arc<ErrorRules>,
    in_flight: Cell<u64>,
    pending: RefCell<Vec<IoBox>>,
    pending_epoch: Cell<u64>,
    release_poller: RefCell<Option<reactor::PollerHandle>>,
}

impl ErrorChannel {
    fn hold(&self, io: IoBox) {
        let mut p = self.pending.borrow_mut();
        if p.is_empty() {
            self.pending_epoch
                .set(self.rules.release_epoch.load(Ordering::Acquire));
            let me = self.me.clone();
            *self.release_poller.borrow_mut() = Some(reactor::register_timed_poller(
                "error_pending",
                PENDING_CHECK_PERIOD,
                move || match me.upgrade() {
                    Some(ch) => ch.check_release(),
                    None => reactor::PollStatus::Idle,
                },
            ));
        }
        p.push(io);
    }

    fn check_release(&self) -> reactor::PollStatus {
        if self.rules.release_epoch.load(Ordering::Acquire) == self.pending_epoch.get() {
            return reactor::PollStatus::Idle;
        }
        self.release_pending();
        reactor::PollStatus::Busy
    }

    /// Completes held I/O as aborted, as SPDK's reset does.
    fn release_pending(&self) {
        let held = std::mem::take(&mut *self.pending.borrow_mut());
        // Dropping the handle inside its own poller run is fine: the reactor
        // unregisters it after the run.
        self.release_poller.borrow_mut().take();
        for io in held {
            self.in_flight.set(self.in_flight.get() - 1);
            io.complete(IoStatus::Aborted);
        }
    }
}

impl BdevChannel for ErrorChannel {
    fn submit(self: Rc<Self>, mut io: IoBox) {
        // Corruption is injected into the read buffer: no lent views.
        io.zcopy = false;
        self.in_flight.set(self.in_flight.get() + 1);
        if io.io_type == IoType::Reset {
            self.release_pending();
        }
        let injected =
            rule_slot(io.io_type).and_then(|i| self.rules.rules[i].take(self.in_flight.get()));
        *io.module_ctx() = 0;
        if let Some((kind, offset, value)) = injected {
            match kind {
                ErrorKind::None => {}
                ErrorKind::Failure => {
                    self.in_flight.set(self.in_flight.get() - 1);
                    return io.complete(IoStatus::Failed);
                }
                ErrorKind::NoMemory => {
                    self.in_flight.set(self.in_flight.get() - 1);
                    return io.complete(IoStatus::NoMemory);
                }
                ErrorKind::Pending => return self.hold(io),
                ErrorKind::CorruptData => match io.io_type {
                    IoType::Write => {
                        let len = io.len_bytes(self.base.bdev().block_size()) as usize;
                        corrupt_write(&mut io, len, offset, value)
                    }
                    IoType::Read => *io.module_ctx() = CTX_CORRUPT_READ | offset,
                    _ => {}
                },
            }
        }
        let base = self.base.clone();
        base.submit(io, self);
    }
}

/// Flips `value` into byte `offset` of a read's data (its own buffer).
fn corrupt(io: &mut IoBox, offset: u64, value: u8) {
    let buf = io.buf.as_mut_slice();
    if let Some(b) = usize::try_from(offset).ok().and_then(|o| buf.get_mut(o)) {
        *b ^= value;
    }
}

/// A write's data may be shared (a mirror's other copy, the host's data
/// where it was received): the corrupted data (`len` bytes) is written
/// from a copy, which replaces the I/O's buffers; the submitter's data is
/// left as it was.
fn corrupt_write(io: &mut IoBox, len: usize, offset: u64, value: u8) {
    let mut copy = IoBuf::new(len);
    copy.as_mut_slice().copy_from_slice(&io.data()[..len]);
    io.shared = SharedBuf::empty();
    io.buf = copy;
    corrupt(io, offset, value);
}

impl IoCompletion for ErrorChannel {
    fn io_done(&self, mut io: IoBox) {
        self.in_flight.set(self.in_flight.get() - 1);
        let ctx = *io.module_ctx();
        if ctx & CTX_CORRUPT_READ != 0 && io.status().is_success() {
            let value = self.rules.rules[0].corrupt_value.load(Ordering::Relaxed);
            corrupt(&mut io, ctx & !CTX_CORRUPT_READ, value);
        }
        let status = io.status();
        io.complete(status);
    }
}

/// Creation parameters (`bdev_error_create`).
#[derive(Debug, Clone)]
pub struct ErrorOptions {
    pub base_name: String,
    pub uuid: Option<Uuid>,
}
