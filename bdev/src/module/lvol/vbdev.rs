//! Lvol bdevs: each lvol of a loaded store is a bdev named by its UUID,
//! with the one alias `lvs_name/lvol_name` (SPDK's vbdev_lvol), and its
//! data path.
//!
//! Data path, per core: a channel holds the base bdev's channel and the
//! lvol's [`Chain`] (its own cluster table, then each ancestor's). The
//! framework splits every read and write at cluster boundaries
//! (`split_boundary_blocks` = blocks per cluster), so an I/O touches one
//! cluster: a read goes to the first table in the chain that holds the
//! cluster, or is zeros when none does; a write to a cluster the lvol
//! itself holds goes straight to the base. Both are a table load and an
//! offset change: no lock, no allocation, no other core.
//!
//! A write to a cluster the lvol does not hold yet (thin, or a clone) waits
//! in the channel while the store's metadata core allocates it
//! ([`super::lvs::allocate`]: copy-on-write from the ancestor that holds
//! it, or zeros, then a durable commit); every write to that cluster on
//! this core waits behind the first and all are resubmitted once the
//! table says where the cluster is. That is the one cross-core step, once
//! per cluster.
//!
//! The chain changes only under a quiesce of the lvol (snapshot, resize,
//! parent changes, merge), or with the same physical clusters either way
//! (a descendant's view of a merge), so channels take a new one by a
//! per-core message ([`refresh_channels`]) and never see a cluster mapped
//! to two places.
//!
//! # Releasing clusters (unmap, write-zeroes)
//!
//! An unmap or write-zeroes covering whole clusters of a thin lvol with no
//! parent and no children ([`Chain::releasable`]) gives those clusters
//! back to the store (SPDK's blob unmap); partial clusters, and every
//! other lvol, are forwarded to the base as before. The danger is an I/O
//! on another core that read the table (physical cluster P) and is still
//! in flight to P when the metadata core frees P and hands it to another
//! lvol: a late write would land in that lvol's data, a late read would
//! return it. A range lock cannot be used: it waits for every I/O admitted
//! before it, the unmap included. Instead ([`super::lvs::release`], one
//! release per store at a time, on the metadata core):
//!
//! 1. [`release_begin`]: on every core the lvol's channel marks the
//!    clusters as *releasing* and flips its epoch, in one step. From then
//!    on a read of a releasing cluster returns zeros (what it reads after
//!    the release; a read racing the unmap may see either) and a write
//!    parks in the channel. Then it waits until every I/O the channel
//!    forwarded to the base under the old epoch has completed: each
//!    forwarded I/O counts itself in the channel's counter of its epoch's
//!    parity (recorded in the top bit of its `module_ctx`), and the last
//!    completion of the old parity wakes the barrier (RCU-style). A
//!    channel created meanwhile starts with the mark (it is also kept on
//!    the bdev) and nothing in flight.
//! 2. Nothing is in flight to the lvol's clusters in the range, and
//!    nothing can start. The metadata core reads which of them the lvol
//!    holds, clears them on the base (the free pool is kept cleared: a
//!    thick lvol takes clusters from it as zeros), and releases them
//!    durably (`LvolStore::release_clusters`; the table entries clear).
//!    An allocation already under way for an unheld cluster in the range
//!    still completes (it is zeroed; its write parks and lands after).
//! 3. [`release_end`]: on every core the mark goes and the parked writes
//!    are resubmitted: they see the cluster unallocated and allocate a
//!    fresh, zeroed one. The unmap completes after that, so a write
//!    submitted after its completion survives; a write racing it ends up
//!    before it (and is released) or after it (and survives).
//!
//! Cost on the data path: two `Cell` updates per forwarded I/O (counter up
//! at submit, down at completion) and one flag test at submit; no atomics,
//! no allocation, no other core. Structural operations quiesce the lvol,
//! which waits for an unmap in flight and so for its release, and a
//! release needs no `op_lock`, so the two never wait on each other.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use uuid::Uuid;

use super::store::ClusterTable;
use crate::bdev::{Bdev, BdevHandle, LocalFuture};
use crate::channel::{BdevChannel, IoChannel};
use crate::io::{IoBox, IoBuf, IoCompletion, IoStatus, IoType};

pub const MODULE: &str = "lvol";
pub const PRODUCT_NAME: &str = "Logical Volume";

/// Which lvol: its store and blob id.
pub type LvolKey = (Uuid, u64);

/// How an lvol's logical clusters map to the base bdev, as the data path
/// reads it.
pub struct Chain {
    /// The lvol's own table, then its parent's, grandparent's, ...
    pub tables: Vec<ClusterTable>,
    /// Blocks per cluster (lvol and base share the block size).
    pub cluster_blocks: u64,
    /// log2 of `cluster_blocks` when it is a power of two (the usual case):
    /// a shift instead of two divisions per I/O.
    pub cluster_shift: Option<u32>,
    /// Base block of data cluster 0.
    pub data_start_blocks: u64,
    pub read_only: bool,
    /// Whole-cluster unmap and write-zeroes release clusters: a writable
    /// thin lvol with no parent and no children (a hint; the metadata core
    /// checks again).
    pub releasable: bool,
}

impl Chain {
    /// The physical cluster holding logical `cluster`, and whether the lvol
    /// holds it itself (depth 0).
    #[inline]
    pub fn locate(&self, cluster: u64) -> Option<(u64, bool)> {
        for (depth, t) in self.tables.iter().enumerate() {
            let e = match t.get(cluster as usize) {
                Some(e) => e.load(Ordering::Acquire),
                // An ancestor smaller than its child: beyond it, zeros.
                None => return None,
            };
            if e != 0 {
                return Some((e - 1, depth == 0));
            }
        }
        None
    }

    #[inline]
    fn base_offset(&self, physical: u64, offset_in_cluster: u64) -> u64 {
        self.data_start_blocks + physical * self.cluster_blocks + offset_in_cluster
    }

    /// (cluster, offset in it) of lvol block `lba`.
    #[inline]
    pub fn split_lba(&self, lba: u64) -> (u64, u64) {
        match self.cluster_shift {
            Some(s) => (lba >> s, lba & (self.cluster_blocks - 1)),
            None => (lba / self.cluster_blocks, lba % self.cluster_blocks),
        }
    }

    /// Where a read of `lba` goes: the base block, or None for zeros.
    #[inline]
    fn read_target(&self, lba: u64) -> Option<u64> {
        let (c, o) = self.split_lba(lba);
        self.locate(c).map(|(p, _)| self.base_offset(p, o))
    }

    /// Where a write of `lba` goes: the base block, or Err(cluster) when the
    /// lvol does not hold the cluster yet; Err(u64::MAX) beyond the end or
    /// read-only.
    #[inline]
    fn write_target(&self, lba: u64) -> Result<u64, u64> {
        if self.read_only {
            return Err(u64::MAX);
        }
        let (c, o) = self.split_lba(lba);
        match self.tables[0].get(c as usize) {
            Some(e) => match e.load(Ordering::Acquire) {
                0 => Err(c),
                e => Ok(self.base_offset(e - 1, o)),
            },
            None => Err(u64::MAX),
        }
    }
}

/// One lvol bdev. The store itself lives on its metadata core
/// ([`super::lvs`]); this holds what the data path and channel creation
/// need on any core.
pub struct LvolBdev {
    pub(crate) key: LvolKey,
    pub(crate) base: BdevHandle,
    chain: Mutex<Arc<Chain>>,
    /// The clusters being released (`NOT_RELEASING`: none), for channels
    /// created during a release.
    releasing: Mutex<(u64, u64)>,
}

/// `releasing` when no release is under way (an empty range).
const NOT_RELEASING: (u64, u64) = (0, 0);

/// The bit of a forwarded I/O's `module_ctx` that holds its epoch parity
/// (the rest is its lvol offset, far below 2^63 blocks).
const EPOCH_BIT: u64 = 1 << 63;

impl LvolBdev {
    pub(crate) fn new(key: LvolKey, base: BdevHandle, chain: Chain) -> LvolBdev {
        LvolBdev {
            key,
            base,
            chain: Mutex::new(Arc::new(chain)),
            releasing: Mutex::new(NOT_RELEASING),
        }
    }

    pub fn store_uuid(&self) -> Uuid {
        self.key.0
    }

    pub fn blob_id(&self) -> u64 {
        self.key.1
    }

    pub(crate) fn chain(&self) -> Arc<Chain> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_chain(&self, c: Arc<Chain>) {
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    fn set_releasing(&self, r: (u64, u64)) {
        *self.releasing.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }
}

impl Bdev for LvolBdev {
    fn module(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write | IoType::Reset | IoType::Flush => true,
            IoType::Unmap => self.base.io_type_supported(IoType::Unmap),
            IoType::WriteZeroes => true,
            IoType::Compare => false,
        }
    }

    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        let ch = Rc::new(LvolChannel {
            key: self.key,
            base: self.base.get_channel(),
            chain: RefCell::new(self.chain()),
            waiting: RefCell::new(HashMap::new()),
            me: RefCell::new(Weak::new()),
            releasing: Cell::new(*self.releasing.lock().unwrap_or_else(|e| e.into_inner())),
            parked: RefCell::new(Vec::new()),
            epoch: Cell::new(0),
            in_flight: [Cell::new(0), Cell::new(0)],
            drain_waker: RefCell::new(None),
            drain_waiting: Cell::new(false),
        });
        *ch.me.borrow_mut() = Rc::downgrade(&ch);
        // An earlier channel of this core may live on while its I/O is in
        // flight (its users are gone): keep it reachable for barriers.
        CHANNELS.with(|c| {
            let mut c = c.borrow_mut();
            let v = c.entry(self.key).or_default();
            v.retain(|w| w.strong_count() > 0);
            v.push(Rc::downgrade(&ch));
        });
        ch
    }

    fn creation_time(&self) -> String {
        super::lvs::creation_time(self.key).unwrap_or_default()
    }

    fn dump_info_json(&self) -> Value {
        super::lvs::driver_specific(self.key).unwrap_or_else(|| json!({}))
    }

    /// Stores and their lvols are found again by examine, as SPDK does.
    fn write_config_json(&self) -> Option<Value> {
        None
    }

    fn destruct(&self) -> LocalFuture<()> {
        let key = self.key;
        Box::pin(async move {
            reactor::for_each_core(move || {
                CHANNELS.with(|c| {
                    let mut c = c.borrow_mut();
                    if let Some(v) = c.get_mut(&key) {
                        v.retain(|w| w.strong_count() > 0);
                        if v.is_empty() {
                            c.remove(&key);
                        }
                    }
                })
            })
            .await;
        })
    }
}

thread_local! {
    /// This core's lvol channels, for chain refreshes and release barriers.
    static CHANNELS: RefCell<HashMap<LvolKey, Vec<Weak<LvolChannel>>>> = RefCell::new(HashMap::new());
}

/// This core's live channels of lvol `key`.
fn channels_of(key: LvolKey) -> Vec<Rc<LvolChannel>> {
    CHANNELS.with(|c| {
        c.borrow()
            .get(&key)
            .map(|v| v.iter().filter_map(|w| w.upgrade()).collect())
            .unwrap_or_default()
    })
}

/// Gives every core's channel of lvol `key` the chain `chain` (already set
/// on the bdev, so channels created from now on start with it).
pub(crate) async fn refresh_channels(key: LvolKey, chain: Arc<Chain>) {
    reactor::for_each_core(move || {
        for ch in channels_of(key) {
            *ch.chain.borrow_mut() = chain.clone();
        }
    })
    .await;
}

/// Step 1 of a release (module docs): marks clusters `start..end` of lvol
/// `bdev` as releasing on every core and waits until no I/O forwarded
/// before the mark is in flight. Callers serialise releases per lvol (one
/// barrier per channel at a time).
pub(crate) async fn release_begin(bdev: &LvolBdev, start: u64, end: u64) {
    let key = bdev.key;
    bdev.set_releasing((start, end));
    reactor::for_each_core(move || {
        for ch in channels_of(key) {
            ch.releasing.set((start, end));
            ch.epoch.set(ch.epoch.get() ^ 1);
        }
    })
    .await;
    for core in reactor::cores() {
        let r = reactor::call_async(core, move || async move {
            for ch in channels_of(key) {
                ch.drained().await;
            }
        })
        .await;
        if r.is_err() {
            log::warn!("lvol {}: release barrier: core {core:?} gone", key.0);
        }
    }
}

/// Step 3 of a release: the marks go and parked writes are resubmitted.
pub(crate) async fn release_end(bdev: &LvolBdev) {
    let key = bdev.key;
    bdev.set_releasing(NOT_RELEASING);
    reactor::for_each_core(move || {
        for ch in channels_of(key) {
            ch.releasing.set(NOT_RELEASING);
            let parked = std::mem::take(&mut *ch.parked.borrow_mut());
            for io in parked {
                ch.clone().submit(io);
            }
        }
    })
    .await;
}

pub(crate) struct LvolChannel {
    key: LvolKey,
    base: IoChannel,
    chain: RefCell<Arc<Chain>>,
    /// Writes waiting for the allocation of their cluster, by cluster.
    waiting: RefCell<HashMap<u64, Vec<IoBox>>>,
    me: RefCell<Weak<LvolChannel>>,
    /// Clusters `start..end` being released (`NOT_RELEASING`: none).
    releasing: Cell<(u64, u64)>,
    /// Writes to releasing clusters, until the release ends.
    parked: RefCell<Vec<IoBox>>,
    /// Parity of the current epoch (0 or 1).
    epoch: Cell<u64>,
    /// I/O forwarded to the base and not completed, by epoch parity.
    in_flight: [Cell<u32>; 2],
    /// The release barrier waiting for the old epoch to drain.
    drain_waker: RefCell<Option<std::task::Waker>>,
    drain_waiting: Cell<bool>,
}

impl LvolChannel {
    /// Counts an I/O to the base in the current epoch; its parity, for
    /// [`Self::leave`].
    #[inline]
    fn enter(&self) -> u64 {
        let e = self.epoch.get();
        let c = &self.in_flight[e as usize];
        c.set(c.get() + 1);
        e
    }

    #[inline]
    fn leave(&self, e: u64) {
        let c = &self.in_flight[(e & 1) as usize];
        let n = c.get() - 1;
        c.set(n);
        if n == 0 && self.drain_waiting.get() {
            self.wake_drain();
        }
    }

    #[cold]
    fn wake_drain(&self) {
        if let Some(w) = self.drain_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Until no I/O of the previous epoch is in flight.
    async fn drained(&self) {
        std::future::poll_fn(|cx| {
            let old = (self.epoch.get() ^ 1) as usize;
            if self.in_flight[old].get() == 0 {
                self.drain_waiting.set(false);
                std::task::Poll::Ready(())
            } else {
                *self.drain_waker.borrow_mut() = Some(cx.waker().clone());
                self.drain_waiting.set(true);
                std::task::Poll::Pending
            }
        })
        .await
    }

    #[inline]
    fn forward(self: Rc<Self>, mut io: IoBox, base_offset: u64) {
        let e = self.enter();
        *io.module_ctx() = io.offset_blocks | (e << 63);
        io.offset_blocks = base_offset;
        let base = self.base.clone();
        base.submit(io, self);
    }

    /// A read or write while a release is under way: one to a releasing
    /// cluster reads zeros or parks; any other goes on.
    #[cold]
    fn submit_releasing(self: Rc<Self>, io: IoBox) {
        let (start, end) = self.releasing.get();
        let c = self.chain.borrow().split_lba(io.offset_blocks).0;
        if !(start..end).contains(&c) {
            return self.submit_rw(io);
        }
        if io.io_type == IoType::Read {
            Self::read_zeros(io, self.base.bdev().block_size());
        } else {
            self.parked.borrow_mut().push(io);
        }
    }

    #[inline]
    fn submit_rw(self: Rc<Self>, io: IoBox) {
        if io.io_type == IoType::Read {
            // The borrow ends before the I/O goes on.
            let at = self.chain.borrow().read_target(io.offset_blocks);
            match at {
                Some(at) => self.forward(io, at),
                None => Self::read_zeros(io, self.base.bdev().block_size()),
            }
        } else {
            let at = self.chain.borrow().write_target(io.offset_blocks);
            match at {
                Ok(at) => self.forward(io, at),
                Err(u64::MAX) => io.complete(IoStatus::Failed),
                Err(cluster) => self.wait_for_allocation(io, cluster),
            }
        }
    }

    /// Reads of clusters nobody in the chain holds: zeros.
    #[cold]
    fn read_zeros(mut io: IoBox, block_size: u32) {
        let len = io.num_blocks as usize * block_size as usize;
        io.zcopy = false;
        if io.buf.len() >= len {
            io.buf.as_mut_slice()[..len].fill(0);
        } else {
            io.buf = IoBuf::zeroed(len);
        }
        io.complete(IoStatus::Success);
    }

    /// The first write to `cluster` here: park it, and ask the metadata
    /// core to allocate the cluster unless a request is out already.
    #[cold]
    fn wait_for_allocation(self: Rc<Self>, io: IoBox, cluster: u64) {
        let mut waiting = self.waiting.borrow_mut();
        if let Some(q) = waiting.get_mut(&cluster) {
            q.push(io);
            return;
        }
        waiting.insert(cluster, vec![io]);
        drop(waiting);
        let key = self.key;
        let me = self.clone();
        reactor::spawn_local(async move {
            let r = reactor::call_async(reactor::main_core(), move || {
                super::lvs::allocate(key, cluster)
            })
            .await;
            let ok = matches!(r, Ok(Ok(())));
            if let Ok(Err(e)) = &r {
                log::warn!("lvol {}: allocating cluster {cluster}: {e}", key.0);
            }
            let ios = me.waiting.borrow_mut().remove(&cluster).unwrap_or_default();
            for io in ios {
                if ok {
                    me.clone().submit(io);
                } else {
                    io.complete(IoStatus::Failed);
                }
            }
        });
    }

    /// Unmap and write-zeroes may span clusters; rare enough to run as a
    /// task (one allocation per command) that does each cluster in turn.
    #[cold]
    fn data_less(self: Rc<Self>, io: IoBox) {
        reactor::spawn_local(async move {
            let status = self.clone().clear_range(&io).await;
            io.complete(status);
        });
    }

    /// A flush covers the whole base (its cache holds every lvol's data).
    #[cold]
    fn flush(self: Rc<Self>, io: IoBox) {
        // A base that takes no flush (a read-only file) has nothing to flush;
        // the lvol still answers one, as it says it supports it.
        if !self.base.bdev().io_type_supported(IoType::Flush) {
            io.complete(IoStatus::Success);
            return;
        }
        reactor::spawn_local(async move {
            let ok = self.base.command(IoType::Flush, 0, 0).await.is_ok();
            io.complete(if ok {
                IoStatus::Success
            } else {
                IoStatus::Failed
            });
        });
    }

    async fn clear_range(self: Rc<Self>, io: &IoBox) -> IoStatus {
        let (io_type, start, end) = (
            io.io_type,
            io.offset_blocks,
            io.offset_blocks + io.num_blocks,
        );
        let first = self.chain.borrow().clone();
        let cb = first.cluster_blocks;
        // The whole clusters the store takes back (module docs); the
        // metadata core clears them once nothing is in flight to them.
        let (rel_start, rel_end) = if first.releasable && !first.read_only {
            (start.div_ceil(cb), end / cb)
        } else {
            (0, 0)
        };
        let mut off = start;
        while off < end {
            let chain = self.chain.borrow().clone();
            if chain.read_only {
                return IoStatus::Failed;
            }
            let cluster = off / cb;
            let n = (cb - off % cb).min(end - off);
            let (rs, re) = self.releasing.get();
            // Released below, or by a release under way (it reads zeros
            // after that; this command races it).
            if (rel_start..rel_end).contains(&cluster) || (rs..re).contains(&cluster) {
                off += n;
                continue;
            }
            match chain.locate(cluster) {
                Some((phys, true)) => {
                    let at = chain.base_offset(phys, off % cb);
                    let t = if io_type == IoType::Unmap
                        && !self.base.bdev().io_type_supported(IoType::Unmap)
                    {
                        IoType::WriteZeroes
                    } else {
                        io_type
                    };
                    // Counted like a forwarded I/O: a release barrier
                    // waits for it.
                    let e = self.enter();
                    let r = self.base.command(t, at, n).await;
                    self.leave(e);
                    if r.is_err() {
                        return IoStatus::Failed;
                    }
                }
                // Not held by anyone: it reads zeros already.
                None => {}
                // An ancestor's data shows through: an unmap may leave it
                // (its data is undefined after), write-zeroes may not.
                Some((_, false)) if io_type == IoType::Unmap => {}
                Some((_, false)) => {
                    let key = self.key;
                    let r = reactor::call_async(reactor::main_core(), move || {
                        super::lvs::allocate(key, cluster)
                    })
                    .await;
                    if !matches!(r, Ok(Ok(()))) {
                        return IoStatus::Failed;
                    }
                    // Allocated now: the next turn of the loop zeroes it.
                    continue;
                }
            }
            off += n;
        }
        if rel_start < rel_end {
            let key = self.key;
            let r = reactor::call_async(reactor::main_core(), move || {
                super::lvs::release(key, rel_start, rel_end - rel_start)
            })
            .await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    log::warn!(
                        "lvol {}: releasing clusters {rel_start}..{rel_end}: {e}",
                        key.0
                    );
                    return IoStatus::Failed;
                }
                Err(_) => return IoStatus::Failed,
            }
        }
        IoStatus::Success
    }
}

impl BdevChannel for LvolChannel {
    #[inline]
    fn submit(self: Rc<Self>, io: IoBox) {
        match io.io_type {
            IoType::Read | IoType::Write => {
                if self.releasing.get().1 != 0 {
                    self.submit_releasing(io)
                } else {
                    self.submit_rw(io)
                }
            }
            IoType::Unmap | IoType::WriteZeroes => self.data_less(io),
            IoType::Flush => self.flush(io),
            IoType::Reset | IoType::Compare => {
                let ok = io.io_type == IoType::Reset;
                io.complete(if ok {
                    IoStatus::Success
                } else {
                    IoStatus::Failed
                })
            }
        }
    }
}

impl IoCompletion for LvolChannel {
    #[inline]
    fn io_done(&self, mut io: IoBox) {
        let ctx = *io.module_ctx();
        io.offset_blocks = ctx & !EPOCH_BIT;
        self.leave(ctx >> 63);
        let status = io.status();
        io.complete(status);
    }
}
