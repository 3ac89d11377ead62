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

use std::cell::RefCell;
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
}

impl LvolBdev {
    pub(crate) fn new(key: LvolKey, base: BdevHandle, chain: Chain) -> LvolBdev {
        LvolBdev {
            key,
            base,
            chain: Mutex::new(Arc::new(chain)),
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
        });
        *ch.me.borrow_mut() = Rc::downgrade(&ch);
        CHANNELS.with(|c| c.borrow_mut().insert(self.key, Rc::downgrade(&ch)));
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
                    if c.get(&key).is_some_and(|w| w.strong_count() == 0) {
                        c.remove(&key);
                    }
                })
            })
            .await;
        })
    }
}

thread_local! {
    /// This core's lvol channels, for chain refreshes.
    static CHANNELS: RefCell<HashMap<LvolKey, Weak<LvolChannel>>> = RefCell::new(HashMap::new());
}

/// Gives every core's channel of lvol `key` the chain `chain` (already set
/// on the bdev, so channels created from now on start with it).
pub(crate) async fn refresh_channels(key: LvolKey, chain: Arc<Chain>) {
    reactor::for_each_core(move || {
        let ch = CHANNELS.with(|c| c.borrow().get(&key).and_then(|w| w.upgrade()));
        if let Some(ch) = ch {
            *ch.chain.borrow_mut() = chain.clone();
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
}

impl LvolChannel {
    #[inline]
    fn forward(self: Rc<Self>, mut io: IoBox, base_offset: u64) {
        *io.module_ctx() = io.offset_blocks;
        io.offset_blocks = base_offset;
        let base = self.base.clone();
        base.submit(io, self);
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
        let (io_type, mut off, end) = (
            io.io_type,
            io.offset_blocks,
            io.offset_blocks + io.num_blocks,
        );
        while off < end {
            let chain = self.chain.borrow().clone();
            if chain.read_only {
                return IoStatus::Failed;
            }
            let cb = chain.cluster_blocks;
            let cluster = off / cb;
            let n = (cb - off % cb).min(end - off);
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
                    if self.base.command(t, at, n).await.is_err() {
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
        IoStatus::Success
    }
}

impl BdevChannel for LvolChannel {
    #[inline]
    fn submit(self: Rc<Self>, io: IoBox) {
        match io.io_type {
            IoType::Read => {
                // The borrow ends before the I/O goes on.
                let at = self.chain.borrow().read_target(io.offset_blocks);
                match at {
                    Some(at) => self.forward(io, at),
                    None => Self::read_zeros(io, self.base.bdev().block_size()),
                }
            }
            IoType::Write => {
                let at = self.chain.borrow().write_target(io.offset_blocks);
                match at {
                    Ok(at) => self.forward(io, at),
                    Err(u64::MAX) => io.complete(IoStatus::Failed),
                    Err(cluster) => self.wait_for_allocation(io, cluster),
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
        io.offset_blocks = *io.module_ctx();
        let status = io.status();
        io.complete(status);
    }
}
