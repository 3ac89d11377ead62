//! The [`Bdev`] trait a module implements, and [`BdevHandle`], the
//! framework's shared view of a registered bdev.
//!
//! The trait is SPDK's `spdk_bdev_fn_table`: a handful of functions. Names,
//! aliases, claims, descriptors and statistics are the framework's job.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use uuid::Uuid;

use crate::channel::{BdevChannel, IoChannel};
use crate::io::IoType;
use crate::stats::IoStat;

pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// What a module implements for each bdev it exposes.
pub trait Bdev: AsAnyRef + Send + Sync + 'static {
    /// The owning module's name (`malloc`, `delay`, ...).
    fn module(&self) -> &'static str;

    /// SPDK's `product_name` (`"Malloc disk"`).
    fn product_name(&self) -> &'static str;

    fn io_type_supported(&self, io_type: IoType) -> bool;

    /// Creates this bdev's channel for the calling core. Called at most
    /// once per core at a time; the framework shares it between users.
    fn create_channel(&self) -> Rc<dyn BdevChannel>;

    /// `creation_time` in `bdev_get_bdevs` (Longhorn's SPDK adds it: RFC
    /// 3339 UTC, empty when the module does not know it).
    fn creation_time(&self) -> String {
        String::new()
    }

    /// `driver_specific` in `bdev_get_bdevs`.
    fn dump_info_json(&self) -> Value {
        Value::Object(Default::default())
    }

    /// The RPC call that recreates this bdev (`{"method":..,"params":..}`),
    /// or None when the module writes its config elsewhere.
    fn write_config_json(&self) -> Option<Value>;

    /// Releases the bdev's resources. Runs on the main reactor once every
    /// descriptor has closed.
    fn destruct(&self) -> LocalFuture<()> {
        Box::pin(async {})
    }
}

/// How a module needs its I/O shaped (SPDK's `required_alignment`,
/// `optimal_io_boundary` with `split_on_optimal_io_boundary`, and
/// `max_rw_size`). The bdev layer honours them for every submitter: it
/// bounces data that is not aligned and splits reads, writes and compares
/// that are too large or cross a boundary, so no module or transport
/// repeats that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoRequirements {
    /// Alignment of data buffers in bytes (a power of two, at most
    /// [`crate::io::IO_BUF_ALIGN`]); 0 or 1: any.
    pub required_alignment: u32,
    /// No read or write crosses a multiple of this many blocks (0: none).
    pub split_boundary_blocks: u64,
    /// Largest read or write in blocks (0: no limit).
    pub max_transfer_blocks: u64,
}

impl IoRequirements {
    /// Whether an I/O of `num_blocks` at `offset_blocks` must be split.
    #[inline]
    pub fn needs_split(&self, offset_blocks: u64, num_blocks: u64) -> bool {
        (self.max_transfer_blocks != 0 && num_blocks > self.max_transfer_blocks)
            || (self.split_boundary_blocks != 0
                && offset_blocks % self.split_boundary_blocks + num_blocks
                    > self.split_boundary_blocks)
    }

    /// Blocks from `offset_blocks` that one piece of a split I/O of `left`
    /// blocks may cover.
    pub fn piece_blocks(&self, offset_blocks: u64, left: u64) -> u64 {
        let mut n = left;
        if self.max_transfer_blocks != 0 {
            n = n.min(self.max_transfer_blocks);
        }
        if self.split_boundary_blocks != 0 {
            let b = self.split_boundary_blocks;
            n = n.min(b - offset_blocks % b);
        }
        n
    }
}

/// The identity and geometry a module gives at registration.
#[derive(Debug, Clone)]
pub struct BdevProps {
    pub name: String,
    pub uuid: Uuid,
    pub block_size: u32,
    pub num_blocks: u64,
    /// Extra names the bdev is also known by (the UUID is added too).
    pub aliases: Vec<String>,
    pub io: IoRequirements,
}

impl BdevProps {
    /// Props with no extra aliases (the UUID alias is added at register).
    pub fn new(name: impl Into<String>, uuid: Uuid, block_size: u32, num_blocks: u64) -> BdevProps {
        BdevProps {
            name: name.into(),
            uuid,
            block_size,
            num_blocks,
            aliases: Vec::new(),
            io: IoRequirements::default(),
        }
    }

    pub fn with_io(mut self, io: IoRequirements) -> BdevProps {
        self.io = io;
        self
    }
}

pub(crate) struct BdevShared {
    pub(crate) id: u64,
    pub(crate) props: BdevProps,
    pub(crate) ops: Box<dyn Bdev>,
    /// Set once unregister starts: new submits fail.
    pub(crate) removed: AtomicBool,
    /// The size now: `props.num_blocks` at registration, changed by a
    /// resize ([`BdevHandle::set_num_blocks`]).
    pub(crate) num_blocks: AtomicU64,
    /// Statistics of channels that have been destroyed.
    pub(crate) retired_stats: Mutex<IoStat>,
    /// `io_type_supported` for every type, asked once at registration so
    /// the submit path needs no virtual call (bit = `IoType as u8`).
    pub(crate) supported_mask: u8,
    /// `props.io.required_alignment - 1` (0: any alignment).
    pub(crate) align_mask: usize,
    /// Whether `props.io` asks for splitting at all.
    pub(crate) splits: bool,
    /// Whether `props.io` asks for anything (alignment or splitting): the
    /// submit path checks this one flag for bdevs that take any I/O.
    pub(crate) shapes_io: bool,
    /// Range locks held or asked for (`range_lock.rs`); never per I/O.
    pub(crate) locks: Mutex<crate::range_lock::LockTable>,
}

/// A registered bdev. Cheap to clone and `Send`: channels on every core
/// hold one.
#[derive(Clone)]
pub struct BdevHandle(pub(crate) Arc<BdevShared>);

impl BdevHandle {
    pub(crate) fn new(id: u64, props: BdevProps, ops: Box<dyn Bdev>) -> BdevHandle {
        let supported_mask = IoType::ALL
            .iter()
            .filter(|t| ops.io_type_supported(**t))
            .fold(0u8, |m, t| m | (1 << *t as u8));
        let align_mask = (props.io.required_alignment.max(1) as usize) - 1;
        let splits = props.io.split_boundary_blocks != 0 || props.io.max_transfer_blocks != 0;
        BdevHandle(Arc::new(BdevShared {
            supported_mask,
            align_mask,
            splits,
            shapes_io: splits || align_mask != 0,
            id,
            num_blocks: AtomicU64::new(props.num_blocks),
            props,
            ops,
            removed: AtomicBool::new(false),
            retired_stats: Mutex::new(IoStat::default()),
            locks: Mutex::new(Default::default()),
        }))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    pub fn name(&self) -> &str {
        &self.0.props.name
    }

    pub fn uuid(&self) -> Uuid {
        self.0.props.uuid
    }

    pub fn block_size(&self) -> u32 {
        self.0.props.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.0.num_blocks.load(Ordering::Relaxed)
    }

    /// Resizes the bdev (SPDK's `spdk_bdev_notify_blockcnt_change`): I/O
    /// checked from now on is checked against the new size. The module
    /// makes sure its own data path follows first.
    pub fn set_num_blocks(&self, n: u64) {
        self.0.num_blocks.store(n, Ordering::Relaxed);
    }

    pub fn size_bytes(&self) -> u64 {
        self.num_blocks() * self.0.props.block_size as u64
    }

    pub fn props(&self) -> &BdevProps {
        &self.0.props
    }

    pub fn io_requirements(&self) -> IoRequirements {
        self.0.props.io
    }

    pub fn ops(&self) -> &dyn Bdev {
        &*self.0.ops
    }

    /// The module-specific object behind this bdev, if it is a `T`.
    pub fn downcast<T: Bdev>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = self.ops_any();
        any.downcast_ref::<T>()
    }

    fn ops_any(&self) -> &dyn std::any::Any {
        // Through the vtable, so this is the module's concrete type.
        (*self.0.ops).as_any_ref()
    }

    pub fn module(&self) -> &'static str {
        self.0.ops.module()
    }

    #[inline]
    pub fn io_type_supported(&self, t: IoType) -> bool {
        self.0.supported_mask & (1 << t as u8) != 0
    }

    pub fn is_removed(&self) -> bool {
        self.0.removed.load(Ordering::Acquire)
    }

    pub(crate) fn lock_table(&self) -> std::sync::MutexGuard<'_, crate::range_lock::LockTable> {
        // A panic while holding it aborts the process: poison is not seen.
        self.0.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This core's channel to the bdev, created on first use.
    pub fn get_channel(&self) -> IoChannel {
        crate::channel::get_channel(self)
    }
}

impl std::fmt::Debug for BdevHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bdev({})", self.name())
    }
}

impl PartialEq for BdevHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Lets the framework downcast a `dyn Bdev` without every module writing
/// an `as_any` method.
pub trait AsAnyRef {
    fn as_any_ref(&self) -> &dyn std::any::Any;
}

impl<T: std::any::Any> AsAnyRef for T {
    fn as_any_ref(&self) -> &dyn std::any::Any {
        self
    }
}
