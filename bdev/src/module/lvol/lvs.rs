//! Loaded lvol stores and their lvol bdevs: what SPDK's lvol library and
//! vbdev_lvol do between the RPCs and the store's metadata engine
//! ([`super::store::LvolStore`]).
//!
//! Every store lives on the main reactor (its metadata core): created
//! there, or loaded there by examine when a bdev carrying one registers.
//! All of its operations run there, one structural operation per store at
//! a time ([`Lvs::op_lock`]); cluster allocation for first writes
//! ([`allocate`]) runs there too, concurrently with them.
//!
//! Invariants:
//! - An lvol is visible (listed, opened by name) exactly when its bdev is
//!   registered: list calls read [`Lvs::bdevs`], not the store's model, so
//!   a create in flight or one that failed is never seen (SPEC §2).
//! - A structural change to an lvol's chain (snapshot, resize, merge,
//!   parent changes) happens while that lvol is quiesced, and every
//!   channel gets the new chain before the quiesce ends.
//! - Clusters freed by a delete are cleared (per the lvol's clear method)
//!   before the delete commits, so a cluster is never cleared after
//!   another lvol may have been given it.
//! - Clusters a whole-cluster unmap or write-zeroes releases ([`release`])
//!   are cleared and released while no I/O to them is in flight on any
//!   core and none can start (the barrier in `vbdev`), so no late write
//!   lands in, and no late read returns, another lvol's data. Releases run
//!   one at a time per store and never take `op_lock`: a structural
//!   operation quiesces the lvol, which waits for the unmap in flight and
//!   so for its release.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use serde_json::{json, Value};
use uuid::Uuid;

use super::device::{BdevDevice, MdDevice};
use super::disk::{ClearMethod, Parent};
use super::store::{CreateOptions, FormatOptions, LvolInfo, LvolStore, StoreInfo};
use super::vbdev::{self, Chain, LvolBdev, LvolKey};
use super::LvolError;
use crate::bdev::{BdevHandle, BdevProps, IoRequirements};
use crate::io::{IoBox, IoBuf, IoType};
use crate::job::{Job, JobEnd, JobOptions, Step, StepCx};
use crate::range_lock::RangeLock;
use crate::registry::{self, Descriptor};

/// SPDK's default cluster size (`SPDK_LVS_OPTS_CLUSTER_SZ`).
pub const DEFAULT_CLUSTER_SIZE: u32 = 4 * 1024 * 1024;

/// Blocks cleared per command when a store's data region is cleared at
/// creation: bounded commands, so a huge device does not make one.
const CLEAR_CHUNK_BYTES: u64 = 64 * 1024 * 1024;

/// Told when the allocation it waits for is done.
type AllocationWaiter = reactor::CompletionSender<Result<(), LvolError>>;

/// One loaded store.
pub struct Lvs {
    pub uuid: Uuid,
    pub store: LvolStore,
    pub base: BdevHandle,
    /// Registered lvol bdevs by blob id: what is visible.
    pub bdevs: RefCell<BTreeMap<u64, BdevHandle>>,
    /// One structural operation at a time.
    pub op_lock: reactor::AsyncLock,
    /// One cluster release at a time ([`release`]): a channel runs one
    /// release barrier at a time. Not `op_lock`: a structural operation
    /// holding it quiesces the lvol, which waits for the unmap that waits
    /// for the release.
    release_lock: reactor::AsyncLock,
    /// Cluster allocations in flight, by (blob id, cluster): who else waits.
    pending: RefCell<HashMap<(u64, u64), Vec<AllocationWaiter>>>,
}

impl Lvs {
    fn new(store: LvolStore, base: BdevHandle) -> Rc<Lvs> {
        Rc::new(Lvs {
            uuid: store.info().uuid,
            store,
            base,
            bdevs: RefCell::new(BTreeMap::new()),
            op_lock: reactor::AsyncLock::default(),
            release_lock: reactor::AsyncLock::default(),
            pending: RefCell::new(HashMap::new()),
        })
    }
}

thread_local! {
    static STORES: RefCell<Vec<Rc<Lvs>>> = const { RefCell::new(Vec::new()) };
    /// Store names whose create is in flight (SPEC §2: reserved at once).
    static CREATING: RefCell<HashSet<String>> = RefCell::new(HashSet::new());
    static EXAMINE_INSTALLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub fn stores() -> Vec<Rc<Lvs>> {
    STORES.with(|s| s.borrow().clone())
}

pub fn find_store(uuid: Option<&str>, name: Option<&str>) -> Option<Rc<Lvs>> {
    stores().into_iter().find(|l| match (uuid, name) {
        (Some(u), _) => l.uuid.hyphenated().to_string() == u.to_ascii_lowercase(),
        (None, Some(n)) => l.store.info().name == n,
        (None, None) => false,
    })
}

pub fn store_by_uuid(uuid: &Uuid) -> Option<Rc<Lvs>> {
    stores().into_iter().find(|l| &l.uuid == uuid)
}

fn name_in_use(name: &str) -> bool {
    stores().iter().any(|l| l.store.info().name == name)
        || CREATING.with(|c| c.borrow().contains(name))
}

struct CreatingName(String);

impl Drop for CreatingName {
    fn drop(&mut self) {
        CREATING.with(|c| c.borrow_mut().remove(&self.0));
    }
}

/// Options of `bdev_lvol_create_lvstore`.
pub struct CreateStoreOptions {
    pub bdev_name: String,
    pub lvs_name: String,
    pub cluster_size: u32,
    pub clear_method: ClearMethod,
    pub md_pages_per_cluster_ratio: u32,
}

/// Opens `base` for the store, claimed, with a hot-remove that unloads it.
fn open_base(base: &BdevHandle) -> Result<Descriptor, LvolError> {
    let name = base.name().to_string();
    let on_remove = Box::new(move || {
        reactor::spawn_local(async move { unload_by_base(&name).await });
    });
    let desc = registry::open_handle(base, true, Some(on_remove)).map_err(|e| match e {
        crate::BdevError::Claimed(d) => LvolError::Perm(d),
        e => LvolError::from(e),
    })?;
    desc.claim(vbdev::MODULE)
        .map_err(|e| LvolError::Perm(e.to_string()))?;
    Ok(desc)
}

/// `bdev_lvol_create_lvstore`: formats `bdev_name` and loads the new store.
pub async fn create_store(o: CreateStoreOptions) -> Result<Uuid, LvolError> {
    if o.lvs_name.is_empty() || o.lvs_name.len() > super::disk::NAME_MAX_BYTES {
        return Err(LvolError::Invalid(format!(
            "lvs_name must be 1 to {} bytes",
            super::disk::NAME_MAX_BYTES
        )));
    }
    if name_in_use(&o.lvs_name) {
        return Err(LvolError::Exists(format!(
            "lvol store {} exists",
            o.lvs_name
        )));
    }
    CREATING.with(|c| c.borrow_mut().insert(o.lvs_name.clone()));
    let _creating = CreatingName(o.lvs_name.clone());
    let base = registry::lookup(&o.bdev_name)
        .ok_or_else(|| LvolError::NotFound(format!("bdev {} not found", o.bdev_name)))?;
    let desc = open_base(&base)?;
    let dev: Rc<dyn MdDevice> = Rc::new(BdevDevice::new(desc));
    let mut fo = FormatOptions::new(o.lvs_name.clone());
    fo.cluster_size = o.cluster_size;
    fo.md_pages_per_cluster_ratio = o.md_pages_per_cluster_ratio;
    let store = LvolStore::format(dev, fo).await?;
    let info = store.info();
    let data_start = store.cluster_offset_blocks(0);
    let lvs = Lvs::new(store, base.clone());
    // The data region starts cleared, so thick lvols read zeros.
    let clear = match o.clear_method {
        ClearMethod::None => None,
        ClearMethod::WriteZeroes => Some(IoType::WriteZeroes),
        ClearMethod::Default | ClearMethod::Unmap => Some(IoType::Unmap),
    };
    if let Some(t) = clear {
        let end = base.num_blocks();
        clear_blocks(&base, t, data_start, end - data_start.min(end)).await?;
    }
    STORES.with(|s| s.borrow_mut().push(lvs));
    log::info!(
        "lvol store {} ({}) created on {}: {} clusters of {} B",
        info.name,
        info.uuid,
        base.name(),
        info.total_data_clusters,
        info.cluster_size
    );
    Ok(info.uuid)
}

/// Clears `n` blocks from `off` with `t` (unmap falls back to write
/// zeroes where unsupported, and to nothing if neither is).
async fn clear_blocks(base: &BdevHandle, t: IoType, off: u64, n: u64) -> Result<(), LvolError> {
    let t = if base.io_type_supported(t) {
        t
    } else if base.io_type_supported(IoType::WriteZeroes) {
        IoType::WriteZeroes
    } else {
        return Ok(());
    };
    let chunk = (CLEAR_CHUNK_BYTES / base.block_size() as u64).max(1);
    let ch = base.get_channel();
    let mut at = off;
    while at < off + n {
        let k = chunk.min(off + n - at);
        ch.command(t, at, k).await?;
        at += k;
    }
    Ok(())
}

/// Installs the examine hook (once, on the main reactor).
pub fn install_examine() {
    if EXAMINE_INSTALLED.with(|i| i.replace(true)) {
        return;
    }
    registry::register_examine(vbdev::MODULE, |b| Box::pin(examine(b)));
}

/// The examine hook: a bdev carrying a store gets it loaded and its lvols
/// registered before examine ends (so `bdev_wait_for_examine` covers them).
pub async fn examine(b: BdevHandle) {
    if b.module() == vbdev::MODULE || !carries_store(&b).await {
        return;
    }
    if let Err(e) = load(b.clone()).await {
        log::warn!("lvol: {} carries a store that did not load: {e}", b.name());
    }
}

/// Whether either superblock copy has the store's magic (a cheap read of
/// the first two pages before anything is opened for writing).
async fn carries_store(b: &BdevHandle) -> bool {
    let page = super::disk::MD_PAGE_BYTES as u64;
    let bs = b.block_size() as u64;
    if !page.is_multiple_of(bs) || b.num_blocks() < 2 * page / bs {
        return false;
    }
    let Ok(data) = b.get_channel().read(0, 2 * page / bs).await else {
        return false;
    };
    data.chunks(page as usize)
        .any(|p| p.len() >= 8 && &p[..8] == super::disk::SB_MAGIC)
}

async fn load(base: BdevHandle) -> Result<(), LvolError> {
    let desc = open_base(&base)?;
    let dev: Rc<dyn MdDevice> = Rc::new(BdevDevice::new(desc));
    let store = LvolStore::load(dev).await?;
    let info = store.info();
    if store_by_uuid(&info.uuid).is_some() || name_in_use(&info.name) {
        return Err(LvolError::Exists(format!(
            "a store named {} or with UUID {} is loaded already",
            info.name, info.uuid
        )));
    }
    let lvs = Lvs::new(store, base.clone());
    STORES.with(|s| s.borrow_mut().push(lvs.clone()));
    let lvols = lvs.store.lvols();
    log::info!(
        "lvol store {} ({}) loaded from {}: {} lvols",
        info.name,
        info.uuid,
        base.name(),
        lvols.len()
    );
    for l in lvols {
        if let Err(e) = register_lvol(&lvs, &l).await {
            log::warn!("lvol {}/{}: not registered: {e}", info.name, l.name);
        }
    }
    Ok(())
}

/// Unloads the store on `base` (it is going away): its lvol bdevs are
/// unregistered, the store dropped.
async fn unload_by_base(base: &str) {
    let Some(lvs) = stores().into_iter().find(|l| l.base.name() == base) else {
        return;
    };
    unload(&lvs).await;
}

async fn unload(lvs: &Rc<Lvs>) {
    let bdevs: Vec<BdevHandle> = lvs.bdevs.borrow().values().cloned().collect();
    for b in bdevs {
        if let Err(e) = registry::unregister_handle(&b).await {
            log::debug!("lvol {}: unregister: {e}", b.name());
        }
    }
    lvs.bdevs.borrow_mut().clear();
    STORES.with(|s| s.borrow_mut().retain(|l| !Rc::ptr_eq(l, lvs)));
}

/// `bdev_lvol_delete_lvstore`: every lvol goes (their bdevs are
/// hot-removed), then the store's superblocks are wiped, so examine never
/// finds it again.
pub async fn delete_store(lvs: Rc<Lvs>) -> Result<(), LvolError> {
    let _op = lvs.op_lock.lock().await;
    unload(&lvs).await;
    let page = super::disk::MD_PAGE_BYTES;
    lvs.base
        .get_channel()
        .write(0, &vec![0u8; 2 * page])
        .await?;
    if lvs.base.io_type_supported(IoType::Flush) {
        lvs.base.get_channel().command(IoType::Flush, 0, 0).await?;
    }
    Ok(())
}

/// The chain the data path reads for lvol `id`.
pub fn chain_of(lvs: &Lvs, id: u64) -> Result<Chain, LvolError> {
    let info = lvs
        .store
        .lvol(id)
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id}")))?;
    let st = lvs.store.info();
    let mut tables = Vec::new();
    let mut seen = HashSet::new();
    let mut at = Some(id);
    while let Some(i) = at {
        if !seen.insert(i) {
            return Err(LvolError::Corrupt(format!("lvol {id}: parent cycle")));
        }
        let t = lvs
            .store
            .cluster_table(i)
            .ok_or_else(|| LvolError::Corrupt(format!("lvol {i} has no table")))?;
        tables.push(t);
        at = match lvs.store.lvol(i).map(|l| l.parent) {
            Some(Parent::Lvol(p)) => Some(p),
            _ => None,
        };
    }
    let cluster_blocks = (st.cluster_size / st.block_size) as u64;
    Ok(Chain {
        tables,
        cluster_blocks,
        cluster_shift: cluster_blocks
            .is_power_of_two()
            .then(|| cluster_blocks.trailing_zeros()),
        data_start_blocks: lvs.store.cluster_offset_blocks(0),
        read_only: info.read_only,
        releasable: releasable(&info),
    })
}

/// Whether whole-cluster unmap and write-zeroes of lvol `l` release its
/// clusters: thin, writable, no parent (whose data would show through) and
/// no children (whose channels read its clusters outside its barrier).
fn releasable(l: &LvolInfo) -> bool {
    l.thin && !l.read_only && l.parent == Parent::None && l.children.is_empty()
}

/// Releases the whole clusters `start..start+count` of lvol `key` for an
/// unmap or write-zeroes, on the metadata core (the protocol is in the
/// vbdev module docs): barrier on every core, clear what the lvol holds
/// there on the base, release it durably, resume. Returns how many
/// clusters were freed. An lvol that may not release (it changed since
/// the channel looked) has the clusters cleared on the base only.
pub async fn release(key: LvolKey, start: u64, count: u64) -> Result<u64, LvolError> {
    let lvs = store_by_uuid(&key.0)
        .ok_or_else(|| LvolError::NotFound(format!("lvol store {}", key.0)))?;
    let id = key.1;
    let _one = lvs.release_lock.lock().await;
    let l = lvs
        .store
        .lvol(id)
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id}")))?;
    let end = start
        .checked_add(count)
        .filter(|&e| e <= l.num_clusters)
        .ok_or_else(|| LvolError::Invalid("range beyond the lvol".into()))?;
    if l.parent != Parent::None {
        // Unreachable while the unmap is in flight (a parent is set only
        // under a quiesce); zeroing would need allocations.
        return Err(LvolError::Invalid(format!("lvol {} has a parent", l.name)));
    }
    let b = lvs
        .bdevs
        .borrow()
        .get(&id)
        .cloned()
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id} has no bdev")))?;
    let lb = b
        .downcast::<LvolBdev>()
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id} has no bdev")))?;
    vbdev::release_begin(lb, start, end).await;
    let r = release_held(&lvs, id, start, end, releasable(&l)).await;
    vbdev::release_end(lb).await;
    r
}

/// Clears the clusters of `start..end` lvol `id` holds and, if `release`,
/// releases them; nothing is in flight to them (the barrier), and nothing
/// else changes which of them it holds: allocation needs an unheld
/// cluster, structural operations a quiesce.
async fn release_held(
    lvs: &Lvs,
    id: u64,
    start: u64,
    end: u64,
    release: bool,
) -> Result<u64, LvolError> {
    use std::sync::atomic::Ordering::Acquire;
    let table = lvs
        .store
        .cluster_table(id)
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id}")))?;
    let st = lvs.store.info();
    let cb = (st.cluster_size / st.block_size) as u64;
    let held = |i: u64| {
        table
            .get(i as usize)
            .map_or(0, |e| e.load(Acquire))
            .checked_sub(1)
    };
    let mut freed = 0;
    let mut i = start;
    while i < end {
        if held(i).is_none() {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < end {
            let Some(p) = held(j) else {
                break;
            };
            let off = lvs.store.cluster_offset_blocks(p);
            clear_blocks(&lvs.base, IoType::Unmap, off, cb).await?;
            j += 1;
        }
        if release {
            freed += lvs.store.release_clusters(id, i, j - i).await?;
        }
        i = j;
    }
    Ok(freed)
}

fn alias_of(lvs: &Lvs, l: &LvolInfo) -> String {
    format!("{}/{}", lvs.store.info().name, l.name)
}

/// Registers the bdev of lvol `l` (already durable in the store).
pub async fn register_lvol(lvs: &Rc<Lvs>, l: &LvolInfo) -> Result<BdevHandle, LvolError> {
    let name = l.uuid.hyphenated().to_string();
    let reservation = registry::reserve(&name)?;
    let st = lvs.store.info();
    let cluster_blocks = (st.cluster_size / st.block_size) as u64;
    let chain = chain_of(lvs, l.id)?;
    let bdev = LvolBdev::new((lvs.uuid, l.id), lvs.base.clone(), chain);
    let mut props = BdevProps::new(name, l.uuid, st.block_size, l.num_clusters * cluster_blocks)
        .with_io(IoRequirements {
            required_alignment: lvs.base.io_requirements().required_alignment,
            split_boundary_blocks: cluster_blocks,
            max_transfer_blocks: 0,
        });
    props.aliases.push(alias_of(lvs, l));
    let handle = registry::register(reservation, props, Box::new(bdev)).await?;
    lvs.bdevs.borrow_mut().insert(l.id, handle.clone());
    Ok(handle)
}

/// Recomputes and installs the chain of every registered lvol of `lvs`
/// (after a structural change; cheap next to it).
pub async fn refresh_all(lvs: &Rc<Lvs>) {
    let bdevs: Vec<(u64, BdevHandle)> = lvs
        .bdevs
        .borrow()
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    for (id, b) in bdevs {
        let Ok(chain) = chain_of(lvs, id) else {
            continue;
        };
        let chain = Arc::new(chain);
        if let Some(lb) = b.downcast::<LvolBdev>() {
            lb.set_chain(chain.clone());
        }
        vbdev::refresh_channels((lvs.uuid, id), chain).await;
    }
}

/// The lvol a name means: a bdev name, UUID or `lvs/lvol` alias of a
/// registered lvol.
pub fn lookup_lvol(name: &str) -> Option<(Rc<Lvs>, u64, BdevHandle)> {
    let b = registry::lookup(name)?;
    let key = b.downcast::<LvolBdev>()?.key;
    let lvs = store_by_uuid(&key.0)?;
    Some((lvs, key.1, b))
}

/// Allocates logical `cluster` of lvol `key` for a first write (on the
/// metadata core): copies the cluster from the nearest ancestor holding
/// it, or zeroes it, commits the mapping, and returns once the lvol's
/// table has it. Concurrent requests for the same cluster share one
/// allocation. Done already: Ok at once.
pub async fn allocate(key: LvolKey, cluster: u64) -> Result<(), LvolError> {
    allocate_with(key, cluster, None).await.0
}

/// [`allocate`] copying through `buf` (a cluster-sized buffer a caller
/// reuses, such as a job's); given back, or one allocated for this copy.
pub async fn allocate_with(
    key: LvolKey,
    cluster: u64,
    buf: Option<IoBuf>,
) -> (Result<(), LvolError>, Option<IoBuf>) {
    let Some(lvs) = store_by_uuid(&key.0) else {
        return (
            Err(LvolError::NotFound(format!("lvol store {}", key.0))),
            buf,
        );
    };
    let (id, index) = (key.1, cluster);
    let Some(table) = lvs.store.cluster_table(id) else {
        return (Err(LvolError::NotFound(format!("lvol {id}"))), buf);
    };
    if table
        .get(index as usize)
        .is_some_and(|e| e.load(std::sync::atomic::Ordering::Acquire) != 0)
    {
        return (Ok(()), buf);
    }
    let waiter = {
        let mut p = lvs.pending.borrow_mut();
        match p.get_mut(&(id, index)) {
            Some(w) => {
                let (tx, rx) = reactor::completion();
                w.push(tx);
                Some(rx)
            }
            None => {
                p.insert((id, index), Vec::new());
                None
            }
        }
    };
    if let Some(rx) = waiter {
        let r = rx
            .await
            .unwrap_or_else(|_| Err(LvolError::Io("allocation abandoned".into())));
        return (r, buf);
    }
    let (r, buf) = allocate_now(&lvs, id, index, buf).await;
    let waiters = lvs
        .pending
        .borrow_mut()
        .remove(&(id, index))
        .unwrap_or_default();
    for w in waiters {
        w.complete(r.clone());
    }
    (r, buf)
}

async fn allocate_now(
    lvs: &Rc<Lvs>,
    id: u64,
    index: u64,
    buf: Option<IoBuf>,
) -> (Result<(), LvolError>, Option<IoBuf>) {
    let chain = match chain_of(lvs, id) {
        Ok(c) => c,
        Err(e) => return (Err(e), buf),
    };
    let res = match lvs.store.reserve_cluster(id, index) {
        Ok(r) => r,
        Err(e) => return (Err(e), buf),
    };
    let cb = chain.cluster_blocks;
    let (r, buf) = match chain.locate(index) {
        // Copy-on-write from the ancestor that holds the cluster.
        Some((phys, _)) => {
            let bytes = (cb * lvs.base.block_size() as u64) as usize;
            let buf = buf
                .filter(|b| b.capacity() >= bytes)
                .unwrap_or_else(|| IoBuf::new(bytes));
            let from = chain.data_start_blocks + phys * cb;
            let (r, buf) = copy_blocks(&lvs.base, from, res.offset_blocks(), cb, buf).await;
            (r, Some(buf))
        }
        None => (
            clear_blocks(&lvs.base, IoType::WriteZeroes, res.offset_blocks(), cb).await,
            buf,
        ),
    };
    if let Err(e) = r {
        return (Err(e), buf);
    }
    (lvs.store.commit_clusters(vec![res]).await, buf)
}

/// Copies `n` blocks of `base` from `from` to `to` through `buf`.
async fn copy_blocks(
    base: &BdevHandle,
    from: u64,
    to: u64,
    n: u64,
    buf: IoBuf,
) -> (Result<(), LvolError>, IoBuf) {
    let ch = base.get_channel();
    let mut io = ch
        .submit_wait(IoBox::with(IoType::Read, from, n, buf))
        .await;
    if !io.status().is_success() {
        return (
            Err(LvolError::Io("copy-on-write read failed".into())),
            io.take_buf(),
        );
    }
    let buf = io.take_buf();
    let mut io = ch.submit_wait(IoBox::with(IoType::Write, to, n, buf)).await;
    let ok = io.status().is_success();
    let buf = io.take_buf();
    if ok {
        (Ok(()), buf)
    } else {
        (Err(LvolError::Io("copy-on-write write failed".into())), buf)
    }
}

/// What `bdev_lvol_inflate` (every cluster) or `bdev_lvol_decouple_parent`
/// (the clusters the parent holds) must allocate in lvol `id`.
fn needs_copy(lvs: &Lvs, id: u64, index: u64, decouple: bool) -> bool {
    use std::sync::atomic::Ordering::Acquire;
    let held = |t: &ClusterTableRef| t.get(index as usize).is_some_and(|e| e.load(Acquire) != 0);
    let Some(own) = lvs.store.cluster_table(id) else {
        return false;
    };
    if held(&own) {
        return false;
    }
    if !decouple {
        return true;
    }
    match lvs.store.lvol(id).map(|l| l.parent) {
        Some(Parent::Lvol(p)) => lvs.store.cluster_table(p).is_some_and(|t| held(&t)),
        _ => false,
    }
}

type ClusterTableRef = super::store::ClusterTable;

/// Inflate or decouple, one cluster per step, on the metadata core.
struct CopyUpJob {
    lvs: Rc<Lvs>,
    id: u64,
    next: u64,
    total: u64,
    decouple: bool,
}

impl Job for CopyUpJob {
    type Output = ();

    fn total_units(&self) -> u64 {
        self.total
    }

    async fn step(&mut self, cx: &mut StepCx) -> crate::Result<Step<()>> {
        if self.next >= self.total {
            return Ok(Step::Done(()));
        }
        let i = self.next;
        self.next += 1;
        if !needs_copy(&self.lvs, self.id, i, self.decouple) {
            return Ok(Step::Progress { units: 1, bytes: 0 });
        }
        let (r, buf) = allocate_with((self.lvs.uuid, self.id), i, cx.take_buf()).await;
        if let Some(b) = buf {
            cx.put_buf(b);
        }
        r.map_err(bdev_error)?;
        Ok(Step::Progress {
            units: 1,
            bytes: self.lvs.store.info().cluster_size as u64,
        })
    }
}

fn bdev_error(e: LvolError) -> crate::BdevError {
    use crate::BdevError as B;
    match e {
        LvolError::Exists(s) => B::Exists(s),
        LvolError::NotFound(s) => B::NoDevice(s),
        LvolError::NoEntry(s) => B::NotFound(s),
        LvolError::Busy(s) => B::Busy(s),
        LvolError::Perm(s) => B::Claimed(s),
        LvolError::Invalid(s) => B::Invalid(s),
        LvolError::NoSpace(_) => B::NoSpace,
        _ => B::Io,
    }
}

fn lvol_error(e: crate::BdevError) -> LvolError {
    use crate::BdevError as B;
    match e {
        B::NoSpace => LvolError::NoSpace(String::new()),
        B::Cancelled => LvolError::Io("cancelled".into()),
        e => LvolError::from(e),
    }
}

/// `bdev_lvol_inflate` (`decouple` false) and `bdev_lvol_decouple_parent`:
/// copies up what the lvol lacks on the job runner, then drops (inflate)
/// or moves up (decouple) its parent, quiesced.
pub async fn copy_up(lvs: &Rc<Lvs>, id: u64, decouple: bool) -> Result<(), LvolError> {
    let l = lvs
        .store
        .lvol(id)
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id}")))?;
    if decouple && !matches!(l.parent, Parent::Lvol(_)) {
        return Err(LvolError::Invalid(format!("lvol {} has no parent", l.name)));
    }
    if !l.thin {
        return Ok(());
    }
    let needed = (0..l.num_clusters)
        .filter(|&i| needs_copy(lvs, id, i, decouple))
        .count() as u64;
    if needed > lvs.store.info().free_clusters {
        return Err(LvolError::NoSpace(format!(
            "lvol {} needs {needed} clusters",
            l.name
        )));
    }
    let cluster_bytes = lvs.store.info().cluster_size as usize;
    let opts = JobOptions {
        buffers: (1, cluster_bytes),
        ..JobOptions::default()
    };
    let (uuid, total) = (lvs.uuid, l.num_clusters);
    let job = crate::job::spawn(reactor::main_core(), opts, move || {
        let lvs = store_by_uuid(&uuid)
            .ok_or_else(|| crate::BdevError::NoDevice(format!("lvol store {uuid}")))?;
        Ok(CopyUpJob {
            lvs,
            id,
            next: 0,
            total,
            decouple,
        })
    });
    match job.wait().await.map_err(lvol_error)? {
        JobEnd::Done(()) => {}
        JobEnd::Cancelled => return Err(LvolError::Io("cancelled".into())),
    }
    let l2 = lvs.clone();
    with_quiesced(lvs, id, || async move {
        if decouple {
            l2.store.finish_decouple(id).await
        } else {
            l2.store.finish_inflate(id).await
        }
    })
    .await
}

/// Creates lvol `o` in `lvs` and registers its bdev; on any failure nothing
/// is left (SPEC §2).
pub async fn create_lvol(lvs: &Rc<Lvs>, o: CreateOptions) -> Result<LvolInfo, LvolError> {
    let _op = lvs.op_lock.lock().await;
    // Thick clusters come from the free pool, which is cleared: at store
    // creation and whenever a delete frees clusters.
    let info = lvs.store.create_lvol(o).await?;
    match register_lvol(lvs, &info).await {
        Ok(_) => Ok(info),
        Err(e) => {
            let _ = lvs.store.delete_lvol(info.id).await;
            Err(e)
        }
    }
}

/// Quiesces the bdev of lvol `id` if it has one.
async fn quiesce(lvs: &Lvs, id: u64) -> Result<Option<RangeLock>, LvolError> {
    let b = lvs.bdevs.borrow().get(&id).cloned();
    match b {
        Some(b) => Ok(Some(RangeLock::quiesce(&b).await?)),
        None => Ok(None),
    }
}

/// `bdev_lvol_snapshot`.
pub async fn snapshot(
    lvs: &Rc<Lvs>,
    origin: u64,
    name: &str,
    xattrs: BTreeMap<String, Vec<u8>>,
) -> Result<LvolInfo, LvolError> {
    let _op = lvs.op_lock.lock().await;
    let q = quiesce(lvs, origin).await?;
    let r = lvs.store.snapshot(origin, name, xattrs).await;
    let out = match r {
        Ok(info) => {
            refresh_all(lvs).await;
            match register_lvol(lvs, &info).await {
                Ok(_) => Ok(info),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    if let Some(q) = q {
        q.unlock().await;
    }
    out
}

/// `bdev_lvol_clone`.
pub async fn clone_lvol(lvs: &Rc<Lvs>, snapshot: u64, name: &str) -> Result<LvolInfo, LvolError> {
    let _op = lvs.op_lock.lock().await;
    let info = lvs.store.clone_lvol(snapshot, name).await?;
    match register_lvol(lvs, &info).await {
        Ok(_) => Ok(info),
        Err(e) => {
            let _ = lvs.store.delete_lvol(info.id).await;
            Err(e)
        }
    }
}

/// `bdev_lvol_delete`: the bdev goes first (consumers are hot-removed, as
/// SPDK does), then the lvol; a snapshot with one child merges into it.
pub async fn delete_lvol(lvs: &Rc<Lvs>, id: u64) -> Result<(), LvolError> {
    let _op = lvs.op_lock.lock().await;
    let info = lvs
        .store
        .lvol(id)
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id}")))?;
    if info.children.len() > 1 {
        return Err(LvolError::Perm(format!(
            "lvol {} has {} clones",
            info.name,
            info.children.len()
        )));
    }
    let child = info.children.first().copied();
    let q = match child {
        Some(c) => quiesce(lvs, c).await?,
        None => None,
    };
    let b = lvs.bdevs.borrow_mut().remove(&id);
    if let Some(b) = b {
        if let Err(e) = registry::unregister_handle(&b).await {
            log::warn!("lvol {}: unregister: {e}", info.name);
        }
    }
    // Clear what the delete frees: all of its clusters, or with a merge
    // only those the child holds already.
    let freed = freed_clusters(lvs, id, child);
    if info.clear_method != ClearMethod::None {
        let st = lvs.store.info();
        let cb = (st.cluster_size / st.block_size) as u64;
        let t = if info.clear_method == ClearMethod::WriteZeroes {
            IoType::WriteZeroes
        } else {
            IoType::Unmap
        };
        for phys in freed {
            let off = lvs.store.cluster_offset_blocks(phys);
            if let Err(e) = clear_blocks(&lvs.base, t, off, cb).await {
                log::warn!("lvol {}: clearing cluster {phys}: {e}", info.name);
            }
        }
    }
    let r = lvs.store.delete_lvol(id).await.map(|_| ());
    if r.is_ok() {
        refresh_all(lvs).await;
    }
    if let Some(q) = q {
        q.unlock().await;
    }
    r
}

fn freed_clusters(lvs: &Lvs, id: u64, child: Option<u64>) -> Vec<u64> {
    use std::sync::atomic::Ordering::Acquire;
    let Some(own) = lvs.store.cluster_table(id) else {
        return Vec::new();
    };
    let child = child.and_then(|c| lvs.store.cluster_table(c));
    own.iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let e = e.load(Acquire);
            if e == 0 {
                return None;
            }
            match &child {
                Some(c) if c.get(i).is_none_or(|x| x.load(Acquire) == 0) => None,
                _ => Some(e - 1),
            }
        })
        .collect()
}

/// Runs a structural change `f` on lvol `id` while it is quiesced, then
/// refreshes every chain of the store.
pub async fn with_quiesced<T, F, Fut>(lvs: &Rc<Lvs>, id: u64, f: F) -> Result<T, LvolError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, LvolError>>,
{
    let _op = lvs.op_lock.lock().await;
    let q = quiesce(lvs, id).await?;
    let r = f().await;
    if r.is_ok() {
        refresh_all(lvs).await;
    }
    if let Some(q) = q {
        q.unlock().await;
    }
    r
}

/// Renames lvol `id`: the store, then its bdev's alias.
pub async fn rename_lvol(lvs: &Rc<Lvs>, id: u64, name: &str) -> Result<(), LvolError> {
    let _op = lvs.op_lock.lock().await;
    let commit = lvs.store.rename_lvol(id, name);
    with_model_applied(commit, || update_alias(lvs, id)).await
}

/// Awaits a store operation, running `then` as soon as the operation has
/// applied itself to the store's model (its first poll: validation and the
/// model change are one synchronous step, see the module docs of
/// `lvol`), not once it is durable. So what reads the model (listings,
/// `driver_specific`) and what reads the registry (aliases, lookups by
/// name) never disagree between the two (SPEC §2). Not run when the
/// operation is refused at once.
async fn with_model_applied(
    op: impl std::future::Future<Output = Result<(), LvolError>>,
    then: impl FnOnce(),
) -> Result<(), LvolError> {
    let mut op = std::pin::pin!(op);
    match futures_lite::future::poll_once(op.as_mut()).await {
        Some(Err(e)) => Err(e),
        Some(Ok(())) => {
            then();
            Ok(())
        }
        None => {
            then();
            op.await
        }
    }
}

fn update_alias(lvs: &Lvs, id: u64) {
    let (Some(b), Some(l)) = (lvs.bdevs.borrow().get(&id).cloned(), lvs.store.lvol(id)) else {
        return;
    };
    let alias = alias_of(lvs, &l);
    registry::set_aliases(&b, vec![alias, l.uuid.hyphenated().to_string()]);
}

/// Renames the store and every lvol alias under it.
pub async fn rename_store(lvs: &Rc<Lvs>, name: &str) -> Result<(), LvolError> {
    let _op = lvs.op_lock.lock().await;
    if name != lvs.store.info().name && name_in_use(name) {
        return Err(LvolError::Exists(format!("lvol store {name} exists")));
    }
    let commit = lvs.store.rename_store(name);
    with_model_applied(commit, || {
        let ids: Vec<u64> = lvs.bdevs.borrow().keys().copied().collect();
        for id in ids {
            update_alias(lvs, id);
        }
    })
    .await
}

/// Resizes lvol `id` (quiesced: its table is replaced) and its bdev.
pub async fn resize_lvol(lvs: &Rc<Lvs>, id: u64, num_clusters: u64) -> Result<(), LvolError> {
    let l = lvs
        .store
        .lvol(id)
        .ok_or_else(|| LvolError::NotFound(format!("lvol {id}")))?;
    if num_clusters < l.num_clusters {
        // SPDK's bdev layer refuses to shrink an open bdev; refuse before
        // anything changes (SPDK shrinks the blob first).
        let open = lvs
            .bdevs
            .borrow()
            .get(&id)
            .is_some_and(|b| registry::open_count(b) > 0);
        if open {
            return Err(LvolError::Busy(format!("lvol {} is open", l.name)));
        }
        // Nor may a shrink cut off what the snapshots below it hold.
        let chain = chain_of(lvs, id)?;
        let held = chain.tables[1..].iter().any(|t| {
            t.iter()
                .skip(num_clusters as usize)
                .any(|e| e.load(std::sync::atomic::Ordering::Acquire) != 0)
        });
        if held {
            return Err(LvolError::Invalid(format!(
                "lvol {}: its snapshots hold data beyond {num_clusters} clusters",
                l.name
            )));
        }
    }
    let l2 = lvs.clone();
    with_quiesced(lvs, id, || async move {
        l2.store.resize_lvol(id, num_clusters).await
    })
    .await?;
    let st = lvs.store.info();
    let cb = (st.cluster_size / st.block_size) as u64;
    if let Some(b) = lvs.bdevs.borrow().get(&id) {
        b.set_num_blocks(num_clusters * cb);
    }
    Ok(())
}

/// When lvol `key` was created (from the main reactor).
pub fn creation_time(key: LvolKey) -> Option<String> {
    Some(store_by_uuid(&key.0)?.store.lvol(key.1)?.creation_time)
}

/// `bdev_get_bdevs` `driver_specific` of lvol `key` (SPDK's vbdev_lvol
/// dump_info_json), from the main reactor.
pub fn driver_specific(key: LvolKey) -> Option<Value> {
    let lvs = store_by_uuid(&key.0)?;
    let l = lvs.store.lvol(key.1)?;
    let mut o = serde_json::Map::new();
    o.insert(
        "lvol_store_uuid".into(),
        json!(lvs.uuid.hyphenated().to_string()),
    );
    o.insert("base_bdev".into(), json!(lvs.base.name()));
    o.insert("thin_provision".into(), json!(l.thin));
    o.insert(
        "num_allocated_clusters".into(),
        json!(l.num_allocated_clusters),
    );
    let snapshot = is_snapshot(&l);
    o.insert("snapshot".into(), json!(snapshot));
    let parent = visible_parent(&lvs, &l);
    o.insert("clone".into(), json!(parent.is_some()));
    if let Some(p) = parent {
        o.insert("base_snapshot".into(), json!(p.name));
    }
    let children = visible_children(&lvs, &l);
    if snapshot && !children.is_empty() {
        o.insert("clones".into(), json!(children));
    }
    let esnap = matches!(l.parent, Parent::External { .. });
    o.insert("esnap_clone".into(), json!(esnap));
    if let Parent::External { bdev_uuid, .. } = &l.parent {
        o.insert(
            "external_snapshot_name".into(),
            json!(bdev_uuid.hyphenated().to_string()),
        );
    }
    Some(json!({ "lvol": Value::Object(o) }))
}

/// Whether lvol `id`'s bdev is registered: whether the lvol exists for
/// everyone outside the store (a create or snapshot registers it after its
/// commit; a delete unregisters it before).
fn visible(lvs: &Lvs, id: u64) -> bool {
    lvs.bdevs.borrow().contains_key(&id)
}

/// The parent of `l` as observers see it: its nearest ancestor that is
/// visible. While a snapshot of `l` registers, that is `l`'s parent from
/// before; while `l`'s parent is being deleted (merged), the one after.
/// The tree in `bdev_get_bdevs` and `bdev_lvol_get_lvols` thus never
/// names an lvol that is not there yet or any more (SPEC §2).
pub fn visible_parent(lvs: &Lvs, l: &LvolInfo) -> Option<LvolInfo> {
    let mut p = l.parent.clone();
    // The store has no cycles; `seen` only keeps a damaged one finite.
    let mut seen = HashSet::new();
    while let Parent::Lvol(id) = p {
        if !seen.insert(id) {
            return None;
        }
        let pl = lvs.store.lvol(id)?;
        if visible(lvs, id) {
            return Some(pl);
        }
        p = pl.parent;
    }
    None
}

/// The children of `l` as observers see them: its nearest visible
/// descendants (see [`visible_parent`]).
pub fn visible_children(lvs: &Lvs, l: &LvolInfo) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo: Vec<u64> = l.children.iter().rev().copied().collect();
    let mut seen = HashSet::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        let Some(c) = lvs.store.lvol(id) else {
            continue;
        };
        if visible(lvs, id) {
            out.push(c.name);
        } else {
            todo.extend(c.children.iter().rev());
        }
    }
    out
}

/// Snapshots are the read-only lvols (SPDK also calls a read-only lvol a
/// snapshot once it is cloned; before that it says `snapshot: false` for
/// one made read-only by `bdev_lvol_set_read_only`).
pub fn is_snapshot(l: &LvolInfo) -> bool {
    l.read_only
}

/// `bdev_lvol_get_lvstores` element.
pub fn store_json(lvs: &Lvs) -> Value {
    let StoreInfo {
        uuid,
        name,
        block_size,
        cluster_size,
        total_data_clusters,
        free_clusters,
    } = lvs.store.info();
    json!({
        "uuid": uuid.hyphenated().to_string(),
        "name": name,
        "base_bdev": lvs.base.name(),
        "total_data_clusters": total_data_clusters,
        "free_clusters": free_clusters,
        "block_size": block_size,
        "cluster_size": cluster_size,
    })
}
