//! The in-memory lvol store: the metadata [`Model`], the free-cluster
//! bitmap, per-lvol cluster tables for the data path, cluster
//! reservations, the commit queue (group commit into the log), checkpoints
//! and load. See the module docs (`mod.rs`) for the design; this file's
//! invariants:
//!
//! - Every mutation validates against the model and applies its records
//!   to it synchronously (no await in between), then awaits its commit.
//!   Validation therefore always sees every earlier operation, and the log
//!   holds transactions in the order they were applied.
//! - A cluster is in the free bitmap only if no durable state owns it:
//!   clusters an operation frees return to the bitmap only after its
//!   commit is durable, so no new owner can overwrite them while a crash
//!   could still bring the old owner back.
//! - A cluster table entry (what the data path reads) changes only after
//!   the commit that made it so is durable.
//! - A failed metadata write poisons the store: the model may be ahead of
//!   the disk, so every later operation fails with EIO until a reload.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use uuid::Uuid;

use super::device::MdDevice;
use super::disk::{
    self, encode_checkpoint, encode_txn, ClearMethod, Layout, LvolRecord, Model, Parent, Record,
    Superblock, CKPT_FIXED_BYTES, MD_PAGE_BYTES, NAME_MAX_BYTES, RUN_BYTES, XATTRS_MAX,
    XATTR_NAME_MAX_BYTES, XATTR_VALUE_MAX_BYTES,
};
use super::journal::{self, LogEnd, Replayer};
use super::{LvolError, Result, MAX_TXN_BYTES};

/// A cluster table: entry `i` is data cluster + 1 of logical cluster `i`,
/// 0 when not allocated in this lvol. Shared with every core's channel;
/// written only by the metadata core (Release), read anywhere (Acquire).
pub type ClusterTable = Arc<[AtomicU64]>;

fn new_table(map: &[u64]) -> ClusterTable {
    map.iter().map(|&m| AtomicU64::new(m)).collect()
}

/// Log pages read per device read at load.
const LOAD_READ_PAGES: u64 = 64;

/// Options of [`LvolStore::format`].
#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub name: String,
    /// Bytes; a multiple of 4096 and of the block size.
    pub cluster_size: u32,
    /// SPDK's `num_md_pages_per_cluster_ratio` (100: one 4 KiB metadata
    /// page per cluster).
    pub md_pages_per_cluster_ratio: u32,
    /// None: a new random UUID.
    pub uuid: Option<Uuid>,
}

impl FormatOptions {
    pub fn new(name: impl Into<String>) -> FormatOptions {
        FormatOptions {
            name: name.into(),
            cluster_size: disk::DEFAULT_CLUSTER_SIZE,
            md_pages_per_cluster_ratio: disk::DEFAULT_MD_PAGES_PER_CLUSTER_RATIO,
            uuid: None,
        }
    }
}

/// What `bdev_lvol_get_lvstores` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    pub uuid: Uuid,
    pub name: String,
    pub block_size: u32,
    pub cluster_size: u32,
    pub total_data_clusters: u64,
    pub free_clusters: u64,
}

/// One lvol as the layers above see it (the map stays in the store; the
/// data path uses [`LvolStore::cluster_table`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvolInfo {
    pub id: u64,
    pub uuid: Uuid,
    pub name: String,
    pub num_clusters: u64,
    pub thin: bool,
    pub read_only: bool,
    pub clear_method: ClearMethod,
    pub parent: Parent,
    pub creation_time: String,
    /// Clusters allocated in this lvol itself (SPDK's
    /// `num_allocated_clusters`).
    pub num_allocated_clusters: u64,
    /// Lvols whose parent this is (SPDK's clones), by id.
    pub children: Vec<u64>,
    pub xattr_names: Vec<String>,
}

/// Options of [`LvolStore::create_lvol`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub name: String,
    pub num_clusters: u64,
    pub thin: bool,
    pub clear_method: ClearMethod,
    /// None: a new random UUID.
    pub uuid: Option<Uuid>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Some: an external-snapshot ("esnap") clone of that bdev; forces thin.
    pub external_parent: Option<(Uuid, String)>,
}

impl CreateOptions {
    pub fn new(name: impl Into<String>, num_clusters: u64, thin: bool) -> CreateOptions {
        CreateOptions {
            name: name.into(),
            num_clusters,
            thin,
            clear_method: ClearMethod::Default,
            uuid: None,
            xattrs: BTreeMap::new(),
            external_parent: None,
        }
    }
}

/// What a delete did besides removing the lvol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// The single child the deleted snapshot was merged into.
    pub merged_into: Option<u64>,
    pub freed_clusters: u64,
}

/// A data cluster reserved for logical cluster `index` of lvol `lvol`
/// (from [`LvolStore::reserve_cluster`]). The caller writes the cluster's
/// data at [`Reservation::offset_blocks`], then passes it to
/// [`LvolStore::commit_clusters`]. Dropped uncommitted, the cluster is
/// free again. Nobody else is given this cluster meanwhile.
pub struct Reservation {
    store: Rc<Inner>,
    pub lvol: u64,
    pub index: u64,
    pub physical: u64,
    offset_blocks: u64,
    live: bool,
}

impl Reservation {
    /// First device block of the reserved cluster.
    pub fn offset_blocks(&self) -> u64 {
        self.offset_blocks
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.live {
            let mut st = self.store.st.borrow_mut();
            st.unreserve(self.lvol, self.index);
            st.release_clusters(&[self.physical]);
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reservation({}[{}] -> {})",
            self.lvol, self.index, self.physical
        )
    }
}

/// A table change to publish once a commit is durable.
enum Publish {
    Set(u64, Vec<(u64, u64)>),
    Replace(u64),
    Remove(u64),
}

/// A cell a committer waits on.
#[derive(Default)]
struct Slot {
    v: RefCell<Option<Result<()>>>,
    waker: RefCell<Option<Waker>>,
}

impl Slot {
    fn set(&self, r: Result<()>) {
        *self.v.borrow_mut() = Some(r);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    async fn wait(&self) -> Result<()> {
        std::future::poll_fn(|cx| match self.v.borrow_mut().take() {
            Some(r) => Poll::Ready(r),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

struct Pending {
    txn: Vec<u8>,
    frees: Vec<u64>,
    publish: Vec<Publish>,
    /// Lvols whose in-flight allocation count drops when durable.
    unbusy: Vec<u64>,
    slot: Rc<Slot>,
}

/// Live state besides the model.
struct State {
    model: Model,
    /// Bit set: data cluster in use (owned, or reserved, or freed by a
    /// commit not yet durable).
    used: Vec<u64>,
    free_count: u64,
    hint: u64,
    tables: HashMap<u64, ClusterTable>,
    /// (lvol, logical cluster) → reserved data cluster.
    reserved: HashMap<(u64, u64), u64>,
    /// Per lvol: reservations plus allocation commits not yet durable.
    busy: HashMap<u64, u32>,
    /// Sum of `LvolRecord::fixed_bytes` (metadata space accounting).
    record_bytes: u64,
    failed: Option<String>,
}

impl State {
    fn is_used(&self, p: u64) -> bool {
        self.used[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    fn mark(&mut self, p: u64) {
        debug_assert!(!self.is_used(p));
        self.used[(p / 64) as usize] |= 1 << (p % 64);
        self.free_count -= 1;
    }

    fn release_clusters(&mut self, ps: &[u64]) {
        for &p in ps {
            assert!(self.is_used(p), "freeing free cluster {p}");
            self.used[(p / 64) as usize] &= !(1 << (p % 64));
            self.free_count += 1;
        }
    }

    fn grow_bitmap(&mut self, total: u64) {
        let old = self.model.total_data_clusters;
        self.used.resize(total.div_ceil(64) as usize, 0);
        self.free_count += total - old;
        self.model.total_data_clusters = total;
    }

    /// A free cluster, next-fit from the hint (so consecutive allocations
    /// get consecutive clusters: few runs); marked used.
    fn take_free(&mut self) -> Option<u64> {
        let total = self.model.total_data_clusters;
        if self.free_count == 0 {
            return None;
        }
        let words = self.used.len() as u64;
        let hint = if self.hint >= total { 0 } else { self.hint };
        let first = hint / 64;
        // Visit the hint's word from the hint on, every other word, then
        // the hint's word below the hint.
        for k in 0..=words {
            let w = (first + k) % words;
            let mut free = !self.used[w as usize];
            if k == 0 {
                free &= !0u64 << (hint % 64);
            } else if k == words {
                free &= (1u64 << (hint % 64)).wrapping_sub(1);
            }
            if free == 0 {
                continue;
            }
            let p = w * 64 + free.trailing_zeros() as u64;
            if p >= total {
                // Bits past the end of the last word are never in use.
                continue;
            }
            self.mark(p);
            self.hint = p + 1;
            return Some(p);
        }
        debug_assert!(false, "free_count {} but no free bit", self.free_count);
        None
    }

    fn unreserve(&mut self, lvol: u64, index: u64) {
        self.reserved.remove(&(lvol, index));
        self.unbusy(lvol);
    }

    fn unbusy(&mut self, lvol: u64) {
        if let Some(b) = self.busy.get_mut(&lvol) {
            *b -= 1;
            if *b == 0 {
                self.busy.remove(&lvol);
            }
        }
    }

    fn lvol(&self, id: u64) -> Result<&LvolRecord> {
        self.model
            .lvols
            .get(&id)
            .ok_or_else(|| LvolError::NotFound(format!("no lvol with blob id {id}")))
    }

    fn not_busy(&self, id: u64) -> Result<()> {
        if self.busy.contains_key(&id) {
            return Err(LvolError::Busy(format!(
                "lvol {id} has cluster allocations in flight"
            )));
        }
        Ok(())
    }

    fn name_taken(&self, name: &str) -> bool {
        self.model.lvols.values().any(|l| l.name == name)
    }

    fn children(&self, id: u64) -> Vec<u64> {
        self.model
            .lvols
            .values()
            .filter(|l| l.parent == Parent::Lvol(id))
            .map(|l| l.id)
            .collect()
    }

    /// Metadata space check for `extra` more record bytes.
    fn room_for(&self, layout: &Layout, extra: u64) -> Result<()> {
        let need = CKPT_FIXED_BYTES as u64
            + self.record_bytes
            + extra
            + self.model.total_data_clusters * RUN_BYTES as u64;
        if need > layout.ckpt_capacity_bytes() {
            return Err(LvolError::NoSpace(
                "the store's metadata region is full".into(),
            ));
        }
        Ok(())
    }

    /// Applies a transaction to the model: the clusters it frees and the
    /// table changes to publish when durable.
    fn apply(&mut self, recs: &[Record]) -> Result<(Vec<u64>, Vec<Publish>)> {
        let mut touched = BTreeSet::new();
        for r in recs {
            for id in record_ids(r) {
                touched.insert(id);
            }
        }
        // Metadata space: the touched records' fixed parts (O(xattrs)).
        let bytes = |m: &Model| -> u64 {
            touched
                .iter()
                .filter_map(|id| m.lvols.get(id))
                .map(|l| l.fixed_bytes() as u64)
                .sum()
        };
        let bytes_before = bytes(&self.model);
        let mut frees = Vec::new();
        let mut publish = Vec::new();
        for r in recs {
            let prev = match r {
                Record::MoveMap { from, .. } => self.model.lvols.get(from).map(|l| l.map.clone()),
                Record::Merge { child, .. } => self.model.lvols.get(child).map(|l| l.map.clone()),
                _ => None,
            };
            if let Record::GrowStore(n) = r {
                self.grow_bitmap(*n);
            }
            // What this record frees, from the state just before it: only
            // these records drop clusters (a merge moves them), so an
            // allocation commit costs O(its runs), not O(the lvol).
            let owned = |map: &[u64]| -> Vec<u64> {
                map.iter().filter(|&&m| m != 0).map(|m| m - 1).collect()
            };
            match r {
                Record::DeleteLvol(id) => frees.extend(
                    self.model
                        .lvols
                        .get(id)
                        .map(|l| owned(&l.map))
                        .unwrap_or_default(),
                ),
                Record::Resize(id, n) => frees.extend(
                    self.model
                        .lvols
                        .get(id)
                        .map(|l| owned(l.map.get(*n as usize..).unwrap_or(&[])))
                        .unwrap_or_default(),
                ),
                Record::Unmap(id, start, count) => frees.extend(
                    self.model
                        .lvols
                        .get(id)
                        .and_then(|l| {
                            l.map
                                .get(*start as usize..start.saturating_add(*count) as usize)
                        })
                        .map(owned)
                        .unwrap_or_default(),
                ),
                _ => {}
            }
            self.model
                .apply(r)
                .map_err(|e| LvolError::Corrupt(format!("internal: {e}")))?;
            match r {
                Record::CreateLvol(l) => publish.push(Publish::Replace(l.id)),
                Record::DeleteLvol(id) => publish.push(Publish::Remove(*id)),
                Record::Resize(id, _) => publish.push(Publish::Replace(*id)),
                Record::Map(id, runs) => publish.push(Publish::Set(
                    *id,
                    runs.iter()
                        .flat_map(|r| {
                            (0..r.len as u64).map(|k| (r.logical + k, r.physical + k + 1))
                        })
                        .collect(),
                )),
                Record::Unmap(id, s, c) => {
                    publish.push(Publish::Set(*id, (*s..s + c).map(|i| (i, 0)).collect()))
                }
                Record::MoveMap { from, to } => {
                    let old = prev.unwrap_or_default();
                    publish.push(Publish::Set(
                        *from,
                        old.iter()
                            .enumerate()
                            .filter(|(_, &m)| m != 0)
                            .map(|(i, _)| (i as u64, 0))
                            .collect(),
                    ));
                    publish.push(Publish::Replace(*to));
                }
                Record::Merge { child, .. } => {
                    let old = prev.unwrap_or_default();
                    let new = &self.model.lvols[child].map;
                    publish.push(Publish::Set(
                        *child,
                        old.iter()
                            .zip(new.iter())
                            .enumerate()
                            .filter(|(_, (a, b))| a != b)
                            .map(|(i, (_, &b))| (i as u64, b))
                            .collect(),
                    ));
                }
                _ => {}
            }
        }
        self.record_bytes = self.record_bytes + bytes(&self.model) - bytes_before;
        frees.sort_unstable();
        debug_assert!(
            frees.windows(2).all(|w| w[0] != w[1]),
            "a cluster freed twice"
        );
        Ok((frees, publish))
    }

    fn publish(&mut self, changes: Vec<Publish>) {
        for c in changes {
            match c {
                Publish::Set(id, entries) => {
                    if let Some(t) = self.tables.get(&id) {
                        for (i, v) in entries {
                            if let Some(e) = t.get(i as usize) {
                                e.store(v, Ordering::Release);
                            }
                        }
                    }
                }
                Publish::Replace(id) => {
                    if let Some(l) = self.model.lvols.get(&id) {
                        self.tables.insert(id, new_table(&l.map));
                    }
                }
                Publish::Remove(id) => {
                    self.tables.remove(&id);
                }
            }
        }
    }
}

fn record_ids(r: &Record) -> Vec<u64> {
    match r {
        Record::CreateLvol(l) => vec![l.id],
        Record::DeleteLvol(id)
        | Record::RenameLvol(id, _)
        | Record::SetParent(id, _)
        | Record::Resize(id, _)
        | Record::Map(id, _)
        | Record::Unmap(id, _, _) => vec![*id],
        Record::SetXattr { id, .. }
        | Record::RemoveXattr { id, .. }
        | Record::SetFlags { id, .. } => vec![*id],
        Record::MoveMap { from, to } => vec![*from, *to],
        Record::Merge { snapshot, child } => vec![*snapshot, *child],
        Record::RenameStore(_) | Record::GrowStore(_) => vec![],
    }
}

/// The log's writer state.
struct Journal {
    /// The newest superblock on disk.
    sb: Superblock,
    next_seq: u64,
    queue: Vec<Pending>,
    /// The round the leader is writing.
    in_flight: Vec<Pending>,
    leader: bool,
    /// Counters for tests and the measurements.
    batches: u64,
    checkpoints: u64,
}

impl Journal {
    fn pos(&self, seq: u64) -> u64 {
        (self.sb.log_start_pos + (seq - self.sb.log_start_seq)) % self.sb.layout.log_pages
    }
}

struct Inner {
    dev: Rc<dyn MdDevice>,
    layout: Layout,
    st: RefCell<State>,
    j: RefCell<Journal>,
    /// Set while loading read-only (the checker): no writes.
    read_only: Cell<bool>,
}

/// An lvol store, owned by the core that formatted or loaded it (the
/// metadata core; the type is `!Send`). Mutations serialise on that core;
/// each returns once it is durable. See the module docs for the contract
/// of each operation.
#[derive(Clone)]
pub struct LvolStore {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for LvolStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.st.borrow();
        write!(
            f,
            "LvolStore({}, {} lvols)",
            st.model.name,
            st.model.lvols.len()
        )
    }
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > NAME_MAX_BYTES || name.contains('\0') {
        return Err(LvolError::Invalid(format!(
            "{what} name must be 1 to {NAME_MAX_BYTES} bytes without NUL"
        )));
    }
    Ok(())
}

fn check_xattr(name: &str, value: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX_BYTES {
        return Err(LvolError::Invalid(format!(
            "xattr name must be 1 to {XATTR_NAME_MAX_BYTES} bytes"
        )));
    }
    if value.len() > XATTR_VALUE_MAX_BYTES {
        return Err(LvolError::Invalid(format!(
            "xattr value must be at most {XATTR_VALUE_MAX_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Reads `pages` metadata pages from page `at`.
async fn read_pages(dev: &dyn MdDevice, l: &Layout, at: u64, pages: u64) -> Result<Vec<u8>> {
    dev.read(at * l.blocks_per_page(), pages * l.blocks_per_page())
        .await
}

async fn write_pages(dev: &dyn MdDevice, l: &Layout, at: u64, data: &[u8]) -> Result<()> {
    debug_assert!(data.len().is_multiple_of(MD_PAGE_BYTES));
    dev.write(at * l.blocks_per_page(), data).await
}

fn pad_to_pages(mut b: Vec<u8>) -> Vec<u8> {
    b.resize(b.len().div_ceil(MD_PAGE_BYTES) * MD_PAGE_BYTES, 0);
    b
}

/// What reading a store's metadata found (shared with the checker).
pub struct Loaded {
    pub sb: Superblock,
    /// Why each superblock copy is or is not valid.
    pub sb_copies: [std::result::Result<Superblock, disk::DecodeError>; 2],
    pub model: Model,
    pub ckpt: disk::CheckpointInfo,
    /// The log's end: next sequence number, pages replayed, why it ended.
    pub log_next_seq: u64,
    pub log_pages_replayed: u64,
    pub log_end: Option<LogEnd>,
    pub log_leftover_bytes: usize,
    pub txns_replayed: u64,
    /// Clusters the checkpoint's maps own (its header records a count).
    pub ckpt_counted_allocated: u64,
}

/// Reads superblock, checkpoint and log without writing anything.
pub async fn read_metadata(dev: &dyn MdDevice) -> Result<Loaded> {
    let bs = dev.block_size();
    if bs == 0 || bs as usize > MD_PAGE_BYTES || !MD_PAGE_BYTES.is_multiple_of(bs as usize) {
        return Err(LvolError::Invalid(format!("unsupported block size {bs}")));
    }
    let bpp = (MD_PAGE_BYTES / bs as usize) as u64;
    if dev.num_blocks() < 2 * bpp {
        return Err(LvolError::NoStore("the device is too small".into()));
    }
    let raw = dev.read(0, 2 * bpp).await?;
    let (a, b) = raw.split_at(MD_PAGE_BYTES);
    let (best, copies) = Superblock::newest([a, b]);
    let Some(sb) = best else {
        for c in &copies {
            if let Err(disk::DecodeError::Version(v)) = c {
                return Err(LvolError::Unsupported(format!(
                    "lvol store format version {v} is newer than this build supports ({})",
                    disk::VERSION_MAJOR
                )));
            }
        }
        if copies
            .iter()
            .all(|c| matches!(c, Err(disk::DecodeError::NoMagic)))
        {
            return Err(LvolError::NoStore("no lvol store superblock".into()));
        }
        return Err(LvolError::Corrupt(format!(
            "no valid lvol store superblock ({:?}, {:?})",
            copies[0].as_ref().err(),
            copies[1].as_ref().err()
        )));
    };
    let l = sb.layout;
    if l.block_size != bs {
        return Err(LvolError::Invalid(format!(
            "the store was formatted with {}-byte blocks, the device has {bs}",
            l.block_size
        )));
    }
    if dev.num_blocks() < l.md_pages() * l.blocks_per_page() {
        return Err(LvolError::Corrupt(
            "the device is smaller than the store's metadata region".into(),
        ));
    }
    let pages = sb.ckpt_bytes.div_ceil(MD_PAGE_BYTES as u64);
    let raw = read_pages(dev, &l, l.ckpt_start(sb.ckpt_area()), pages).await?;
    let ck = &raw[..sb.ckpt_bytes as usize];
    if crc32c::crc32c(ck) != sb.ckpt_crc {
        return Err(LvolError::Corrupt(format!(
            "checkpoint generation {} in area {}: CRC mismatch",
            sb.ckpt_gen,
            sb.ckpt_area()
        )));
    }
    let (mut model, ckpt) = disk::decode_checkpoint(ck).map_err(|e| match e {
        disk::DecodeError::Version(v) => LvolError::Unsupported(format!(
            "checkpoint format version {v} is newer than this build supports"
        )),
        e => LvolError::Corrupt(format!("checkpoint generation {}: {e}", sb.ckpt_gen)),
    })?;
    if model.store_uuid != sb.store_uuid || ckpt.gen != sb.ckpt_gen {
        return Err(LvolError::Corrupt(
            "the checkpoint belongs to another store or generation".into(),
        ));
    }
    let ckpt_counted_allocated = model.lvols.values().map(LvolRecord::allocated).sum();
    let mut rp = Replayer::new(sb.store_uuid, sb.log_start_seq, sb.log_min_epoch, sb.epoch);
    let mut pos = sb.log_start_pos;
    let mut end = None;
    let mut txns = 0;
    'outer: while rp.pages < l.log_pages {
        let n = LOAD_READ_PAGES
            .min(l.log_pages - pos)
            .min(l.log_pages - rp.pages);
        let raw = read_pages(dev, &l, l.log_start() + pos, n).await?;
        for page in raw.chunks(MD_PAGE_BYTES) {
            match rp.feed(page) {
                Err(e) => {
                    return Err(LvolError::Corrupt(format!(
                        "log page seq {}: {e}",
                        rp.next_seq
                    )))
                }
                Ok(Err(e)) => {
                    end = Some(e);
                    break 'outer;
                }
                Ok(Ok(done)) => {
                    for t in done {
                        let recs = disk::decode_txn(&t).map_err(|e| {
                            LvolError::Corrupt(format!(
                                "log transaction before seq {}: {e}",
                                rp.next_seq
                            ))
                        })?;
                        for r in &recs {
                            model.apply(r).map_err(|e| {
                                LvolError::Corrupt(format!(
                                    "log transaction before seq {}: {e}",
                                    rp.next_seq
                                ))
                            })?;
                        }
                        txns += 1;
                    }
                }
            }
        }
        pos = (pos + n) % l.log_pages;
    }
    Ok(Loaded {
        log_next_seq: rp.next_seq,
        log_pages_replayed: rp.pages,
        log_end: end,
        log_leftover_bytes: rp.leftover(),
        txns_replayed: txns,
        ckpt_counted_allocated,
        sb,
        sb_copies: copies,
        model,
        ckpt,
    })
}

/// Data clusters owned by more than one lvol or beyond the store, from a
/// model (what load refuses and the checker reports).
/// (cluster, owners) of doubly-owned clusters; (lvol, cluster) beyond.
pub type Ownership = (Vec<(u64, Vec<u64>)>, Vec<(u64, u64)>);

pub fn ownership_errors(m: &Model) -> Ownership {
    let mut owners: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut beyond = Vec::new();
    for l in m.lvols.values() {
        for &e in &l.map {
            if e == 0 {
                continue;
            }
            if e > m.total_data_clusters {
                beyond.push((l.id, e - 1));
            } else {
                owners.entry(e - 1).or_default().push(l.id);
            }
        }
    }
    let mut doubly: Vec<(u64, Vec<u64>)> =
        owners.into_iter().filter(|(_, o)| o.len() > 1).collect();
    doubly.sort();
    (doubly, beyond)
}

// Each operation moves its `RefMut<State>` into `stage()`, which drops it
// before the operation awaits its commit; the lint cannot see through the
// move (the binding's storage stays live). A borrow really held across an
// await would panic in the tests' concurrent commits.
#[allow(clippy::await_holding_refcell_ref)]
impl LvolStore {
    fn build(
        dev: Rc<dyn MdDevice>,
        sb: Superblock,
        model: Model,
        next_seq: u64,
    ) -> Result<LvolStore> {
        let (doubly, beyond) = ownership_errors(&model);
        if !doubly.is_empty() || !beyond.is_empty() {
            return Err(LvolError::Corrupt(format!(
                "{} clusters owned twice, {} beyond the store: run the checker",
                doubly.len(),
                beyond.len()
            )));
        }
        let total = model.total_data_clusters;
        let mut used = vec![0u64; total.div_ceil(64) as usize];
        let mut n = 0;
        let mut tables = HashMap::new();
        let mut record_bytes = 0;
        for l in model.lvols.values() {
            for &e in l.map.iter().filter(|&&e| e != 0) {
                used[((e - 1) / 64) as usize] |= 1 << ((e - 1) % 64);
                n += 1;
            }
            tables.insert(l.id, new_table(&l.map));
            record_bytes += l.fixed_bytes() as u64;
        }
        let layout = sb.layout;
        Ok(LvolStore {
            inner: Rc::new(Inner {
                dev,
                layout,
                st: RefCell::new(State {
                    model,
                    used,
                    free_count: total - n,
                    hint: 0,
                    tables,
                    reserved: HashMap::new(),
                    busy: HashMap::new(),
                    record_bytes,
                    failed: None,
                }),
                j: RefCell::new(Journal {
                    sb,
                    next_seq,
                    queue: Vec::new(),
                    in_flight: Vec::new(),
                    leader: false,
                    batches: 0,
                    checkpoints: 0,
                }),
                read_only: Cell::new(false),
            }),
        })
    }

    /// Creates a store on `dev` (everything on it is lost; a crash midway
    /// leaves the earlier store, no store, or the new one). The metadata
    /// region comes first, sized from `md_pages_per_cluster_ratio` as SPDK
    /// sizes its blobstore metadata (see [`Layout::compute`]); data
    /// clusters follow, cluster aligned. Returns once the store is
    /// durable. EINVAL for bad options or a device too small for them.
    pub async fn format(dev: Rc<dyn MdDevice>, o: FormatOptions) -> Result<LvolStore> {
        check_name("lvol store", &o.name)?;
        if o.cluster_size < dev.block_size() || !o.cluster_size.is_multiple_of(dev.block_size()) {
            return Err(LvolError::Invalid(format!(
                "cluster size {} is smaller than or not a multiple of the block size {}",
                o.cluster_size,
                dev.block_size()
            )));
        }
        let layout = Layout::compute(
            dev.block_size(),
            dev.num_blocks(),
            o.cluster_size,
            o.md_pages_per_cluster_ratio,
        )
        .map_err(LvolError::Invalid)?;
        let uuid = o.uuid.unwrap_or_else(Uuid::new_v4);
        let model = Model {
            store_uuid: uuid,
            name: o.name,
            total_data_clusters: layout.data_clusters_for(dev.num_blocks()),
            next_blob_id: 1,
            lvols: BTreeMap::new(),
        };
        let ck = encode_checkpoint(&model, 0, 0);
        let mut sb = Superblock {
            seq: 1,
            store_uuid: uuid,
            layout,
            format_blocks: dev.num_blocks(),
            epoch: 1,
            ckpt_gen: 0,
            ckpt_bytes: ck.len() as u64,
            ckpt_crc: crc32c::crc32c(&ck),
            log_start_seq: 0,
            log_start_pos: 0,
            log_min_epoch: 1,
        };
        // First retire any earlier store's superblocks, durably: until then
        // its metadata is untouched and loads as it was; after, the device
        // holds no store until the new superblocks land. (Log pages of an
        // earlier store carry its UUID, so they never replay into this one.)
        write_pages(&*dev, &layout, 0, &[0u8; 2 * MD_PAGE_BYTES]).await?;
        dev.flush().await?;
        write_pages(&*dev, &layout, layout.ckpt_start(0), &pad_to_pages(ck)).await?;
        dev.flush().await?;
        let copy1 = sb.encode();
        sb.seq = 2;
        let copy0 = sb.encode();
        let mut both = copy0;
        both.extend_from_slice(&copy1);
        write_pages(&*dev, &layout, 0, &both).await?;
        dev.flush().await?;
        LvolStore::build(dev, sb, model, 0)
    }

    /// Loads the store on `dev`: the newest valid superblock, its
    /// checkpoint, then the log pages after it (bounded by the log size:
    /// no scan of anything else). Then bumps the epoch in a new superblock
    /// (so pages a crash left beyond the log's end can never be replayed
    /// after pages written from now on) and returns. Errors: NoStore (no
    /// store on it), Unsupported (a newer format version), Corrupt.
    pub async fn load(dev: Rc<dyn MdDevice>) -> Result<LvolStore> {
        let ld = read_metadata(&*dev).await?;
        let need = ld
            .sb
            .layout
            .cluster_offset_blocks(ld.model.total_data_clusters);
        if dev.num_blocks() < need {
            return Err(LvolError::Corrupt(format!(
                "the device has {} blocks, the store needs {need}",
                dev.num_blocks()
            )));
        }
        let mut sb = ld.sb.clone();
        sb.seq += 1;
        sb.epoch += 1;
        write_pages(&*dev, &sb.layout, Layout::sb_page(sb.copy()), &sb.encode()).await?;
        dev.flush().await?;
        LvolStore::build(dev, sb, ld.model, ld.log_next_seq)
    }

    /// Loads without writing (for inspection; mutations then fail).
    pub async fn load_read_only(dev: Rc<dyn MdDevice>) -> Result<LvolStore> {
        let ld = read_metadata(&*dev).await?;
        let s = LvolStore::build(dev, ld.sb, ld.model, ld.log_next_seq)?;
        s.inner.read_only.set(true);
        s.inner.st.borrow_mut().failed = Some("loaded read-only".into());
        Ok(s)
    }

    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    pub fn info(&self) -> StoreInfo {
        let st = self.inner.st.borrow();
        StoreInfo {
            uuid: st.model.store_uuid,
            name: st.model.name.clone(),
            block_size: self.inner.layout.block_size,
            cluster_size: self.inner.layout.cluster_size,
            total_data_clusters: st.model.total_data_clusters,
            free_clusters: st.free_count,
        }
    }

    /// The whole metadata state (tests compare it; the checker walks it).
    pub fn model(&self) -> Model {
        self.inner.st.borrow().model.clone()
    }

    fn info_of(st: &State, l: &LvolRecord) -> LvolInfo {
        LvolInfo {
            children: st.children(l.id),
            ..Self::info_of_without_children(l)
        }
    }

    fn info_of_without_children(l: &LvolRecord) -> LvolInfo {
        LvolInfo {
            id: l.id,
            uuid: l.uuid,
            name: l.name.clone(),
            num_clusters: l.num_clusters,
            thin: l.thin,
            read_only: l.read_only,
            clear_method: l.clear_method,
            parent: l.parent.clone(),
            creation_time: l.creation_time.clone(),
            num_allocated_clusters: l.allocated(),
            children: Vec::new(),
            xattr_names: l.xattrs.keys().cloned().collect(),
        }
    }

    pub fn lvols(&self) -> Vec<LvolInfo> {
        let st = self.inner.st.borrow();
        st.model
            .lvols
            .values()
            .map(|l| Self::info_of(&st, l))
            .collect()
    }

    pub fn lvol(&self, id: u64) -> Option<LvolInfo> {
        let st = self.inner.st.borrow();
        st.model.lvols.get(&id).map(|l| Self::info_of(&st, l))
    }

    pub fn find_by_name(&self, name: &str) -> Option<LvolInfo> {
        let st = self.inner.st.borrow();
        let l = st.model.lvols.values().find(|l| l.name == name)?;
        Some(Self::info_of(&st, l))
    }

    pub fn find_by_uuid(&self, uuid: &Uuid) -> Option<LvolInfo> {
        let st = self.inner.st.borrow();
        let l = st.model.lvols.values().find(|l| l.uuid == *uuid)?;
        Some(Self::info_of(&st, l))
    }

    /// A public xattr; ENOENT when absent (SPDK's `-ENOENT`).
    pub fn get_xattr(&self, id: u64, name: &str) -> Result<Vec<u8>> {
        let st = self.inner.st.borrow();
        st.lvol(id)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or_else(|| LvolError::NoEntry(format!("no xattr {name}")))
    }

    pub fn get_internal_xattr(&self, id: u64, name: &str) -> Result<Vec<u8>> {
        let st = self.inner.st.borrow();
        st.lvol(id)?
            .internal_xattrs
            .get(name)
            .cloned()
            .ok_or_else(|| LvolError::NoEntry(format!("no internal xattr {name}")))
    }

    /// The cluster table of lvol `id` for the data path. Replaced (a new
    /// Arc) by resize; updated in place by allocations, releases, merges
    /// and snapshots once durable.
    pub fn cluster_table(&self, id: u64) -> Option<ClusterTable> {
        self.inner.st.borrow().tables.get(&id).cloned()
    }

    /// First device block of data cluster `physical`.
    pub fn cluster_offset_blocks(&self, physical: u64) -> u64 {
        self.inner.layout.cluster_offset_blocks(physical)
    }

    /// (group commit batches written, checkpoints written) since load.
    pub fn journal_stats(&self) -> (u64, u64) {
        let j = self.inner.j.borrow();
        (j.batches, j.checkpoints)
    }

    /// Data clusters whose bitmap bit disagrees with the maps and live
    /// reservations: (cluster, true = in use but unowned). Meaningful while
    /// no commit is in flight.
    pub(crate) fn bitmap_mismatches(&self) -> Vec<(u64, bool)> {
        let st = self.inner.st.borrow();
        let mut owned = vec![false; st.model.total_data_clusters as usize];
        for l in st.model.lvols.values() {
            for &e in l.map.iter().filter(|&&e| e != 0) {
                if let Some(o) = owned.get_mut((e - 1) as usize) {
                    *o = true;
                }
            }
        }
        for &p in st.reserved.values() {
            if let Some(o) = owned.get_mut(p as usize) {
                *o = true;
            }
        }
        let mut out = Vec::new();
        for (p, &o) in owned.iter().enumerate() {
            let u = st.is_used(p as u64);
            if u != o {
                out.push((p as u64, u));
            }
        }
        let counted = owned.iter().filter(|&&o| o).count() as u64;
        if out.is_empty() && st.free_count != st.model.total_data_clusters - counted {
            out.push((u64::MAX, true));
        }
        out
    }

    fn writable(&self) -> Result<std::cell::RefMut<'_, State>> {
        let st = self.inner.st.borrow_mut();
        if let Some(f) = &st.failed {
            return Err(LvolError::Io(format!("the lvol store is unusable: {f}")));
        }
        Ok(st)
    }

    /// Applies `recs` (already validated) and queues them; the caller
    /// then awaits [`Self::commit_wait`] on the result.
    fn stage(
        &self,
        mut st: std::cell::RefMut<'_, State>,
        recs: Vec<Record>,
    ) -> Result<(Rc<Slot>, u64)> {
        self.run_with(&mut st, recs, Vec::new())?;
        Ok(self.enqueue_last(st))
    }

    /// Applies and queues; the slot to wait on is the last queued.
    fn run_with(&self, st: &mut State, recs: Vec<Record>, unbusy: Vec<u64>) -> Result<()> {
        let (frees, publish) = st.apply(&recs)?;
        let txn = encode_txn(&recs);
        self.inner.j.borrow_mut().queue.push(Pending {
            txn,
            frees,
            publish,
            unbusy,
            slot: Rc::new(Slot::default()),
        });
        Ok(())
    }

    fn enqueue_last(&self, st: std::cell::RefMut<'_, State>) -> (Rc<Slot>, u64) {
        drop(st);
        let j = self.inner.j.borrow();
        let p = j.queue.last().expect("just queued");
        (p.slot.clone(), p.frees.len() as u64)
    }

    /// Waits until the staged transaction is durable. On a reactor the
    /// group-commit leader runs as its own task, so dropping a waiting
    /// operation cancels nothing (it still commits). Without a reactor
    /// (tests, tools) the first waiter leads inline; if that future is
    /// dropped mid-write the store is poisoned (the batch's fate on disk is
    /// unknown) and every waiter gets EIO.
    async fn commit_wait(&self, (slot, freed): (Rc<Slot>, u64)) -> Result<u64> {
        let lead = {
            let mut j = self.inner.j.borrow_mut();
            !std::mem::replace(&mut j.leader, true)
        };
        if lead {
            if reactor::try_current_core().is_some() {
                let me = self.clone();
                reactor::spawn_local(async move { me.lead().await });
            } else {
                let guard = LeaderGuard(self);
                self.lead().await;
                std::mem::forget(guard);
            }
        }
        slot.wait().await.map(|_| freed)
    }

    /// The group-commit leader: writes what is queued, round after round,
    /// until the queue is empty. Committers that arrive meanwhile queue
    /// and are written by the next round.
    async fn lead(&self) {
        loop {
            let plan = {
                let mut j = self.inner.j.borrow_mut();
                if j.queue.is_empty() {
                    j.leader = false;
                    return;
                }
                let st = self.inner.st.borrow();
                plan_round(&st, &mut j)
            };
            let r = self.write_round(plan).await;
            let done: Vec<Pending> = std::mem::take(&mut self.inner.j.borrow_mut().in_flight);
            let sb_next = match r {
                Ok(sb_next) => {
                    let mut st = self.inner.st.borrow_mut();
                    for p in done {
                        st.release_clusters(&p.frees);
                        st.publish(p.publish);
                        for id in p.unbusy {
                            st.unbusy(id);
                        }
                        p.slot.set(Ok(()));
                    }
                    sb_next
                }
                Err(e) => {
                    for p in done {
                        p.slot
                            .set(Err(LvolError::Io(format!("metadata write failed: {e}"))));
                    }
                    self.poison(&e);
                    None
                }
            };
            if let Some(sb) = sb_next {
                // The round is durable and answered; the new superblock
                // only moves the log's start past it.
                if let Err(e) = self.write_superblock(sb).await {
                    self.poison(&e);
                }
            }
        }
    }

    /// Marks the store failed and fails everything queued or in flight.
    fn poison(&self, e: &LvolError) {
        let mut st = self.inner.st.borrow_mut();
        if st.failed.is_none() {
            st.failed = Some(format!("metadata write failed: {e}"));
        }
        drop(st);
        let q: Vec<Pending> = {
            let mut j = self.inner.j.borrow_mut();
            let mut q: Vec<Pending> = j.in_flight.drain(..).collect();
            q.append(&mut j.queue);
            q
        };
        for p in q {
            p.slot
                .set(Err(LvolError::Io("metadata write failed".into())));
        }
    }

    async fn write_superblock(&self, sb: Superblock) -> Result<()> {
        let dev = &*self.inner.dev;
        write_pages(dev, &sb.layout, Layout::sb_page(sb.copy()), &sb.encode()).await?;
        dev.flush().await?;
        self.inner.j.borrow_mut().sb = sb;
        Ok(())
    }

    /// Writes one planned round durably: its log pages and its checkpoint
    /// side by side, one flush. A checkpoint-only round (the commit is the
    /// checkpoint) also writes the superblock naming it before returning;
    /// otherwise the superblock that moves the log's start is returned, to
    /// be written after the round's committers are answered.
    async fn write_round(&self, plan: Plan) -> Result<Option<Superblock>> {
        let l = self.inner.layout;
        let dev = &*self.inner.dev;
        let ckpt_write = async {
            let Some((ck, gen, through)) = &plan.ckpt else {
                return Ok(None);
            };
            if ck.len() as u64 > l.ckpt_capacity_bytes() {
                return Err(LvolError::NoSpace("checkpoint larger than its area".into()));
            }
            // Never the area the newest superblock names.
            let area = (*gen % 2) as usize;
            write_pages(dev, &l, l.ckpt_start(area), &pad_to_pages(ck.clone())).await?;
            let j = self.inner.j.borrow();
            debug_assert_ne!(area, j.sb.ckpt_area());
            let mut sb = j.sb.clone();
            sb.seq += 1;
            sb.ckpt_gen = *gen;
            sb.ckpt_bytes = ck.len() as u64;
            sb.ckpt_crc = crc32c::crc32c(ck);
            sb.log_start_pos = j.pos(*through);
            sb.log_start_seq = *through;
            sb.log_min_epoch = sb.epoch;
            Ok(Some(sb))
        };
        let log_write = async {
            let Some(p) = &plan.pages else {
                return Ok(());
            };
            let (start, n) = {
                let j = self.inner.j.borrow();
                (j.pos(plan.first_seq), (p.len() / MD_PAGE_BYTES) as u64)
            };
            let cut = (n.min(l.log_pages - start) as usize) * MD_PAGE_BYTES;
            write_pages(dev, &l, l.log_start() + start, &p[..cut]).await?;
            if cut < p.len() {
                write_pages(dev, &l, l.log_start(), &p[cut..]).await?;
            }
            Ok::<(), LvolError>(())
        };
        let (sb_next, logged) = futures_lite::future::zip(ckpt_write, log_write).await;
        logged?;
        let mut sb_next = sb_next?;
        dev.flush().await?;
        {
            let mut j = self.inner.j.borrow_mut();
            j.batches += 1;
            if let Some(p) = &plan.pages {
                j.next_seq += (p.len() / MD_PAGE_BYTES) as u64;
            }
            if sb_next.is_some() {
                j.checkpoints += 1;
            }
        }
        if plan.pages.is_none() {
            // Committed by the checkpoint alone: durable only once the
            // superblock names it, before anyone is told.
            if let Some(sb) = sb_next.take() {
                self.write_superblock(sb).await?;
            }
        }
        Ok(sb_next)
    }

    // -----------------------------------------------------------------
    // Operations.

    /// Renames the store. EINVAL for a bad name.
    pub async fn rename_store(&self, name: &str) -> Result<()> {
        check_name("lvol store", name)?;
        let st = self.writable()?;
        if st.model.name == name {
            return Ok(());
        }
        self.commit_wait(self.stage(st, vec![Record::RenameStore(name.to_string())])?)
            .await
            .map(|_| ())
    }

    /// Takes in a base device that grew: the data clusters it now holds
    /// beyond the old end become free. A no-op when it did not grow.
    /// ENOSPC when the metadata region cannot describe that many clusters.
    pub async fn grow(&self) -> Result<u64> {
        let st = self.writable()?;
        let n = self
            .inner
            .layout
            .data_clusters_for(self.inner.dev.num_blocks());
        if n <= st.model.total_data_clusters {
            return Ok(st.model.total_data_clusters);
        }
        if !self.inner.layout.fits(n) {
            return Err(LvolError::NoSpace(format!(
                "the metadata region cannot describe {n} clusters"
            )));
        }
        let extra = (n - st.model.total_data_clusters) * RUN_BYTES as u64;
        st.room_for(&self.inner.layout, extra)?;
        self.commit_wait(self.stage(st, vec![Record::GrowStore(n)])?)
            .await?;
        Ok(n)
    }

    /// Creates an lvol: thin (no clusters) or thick (all clusters now;
    /// ENOSPC if not enough are free). EEXIST for a taken name or UUID,
    /// EINVAL for bad options, ENOSPC when metadata space is full.
    pub async fn create_lvol(&self, o: CreateOptions) -> Result<LvolInfo> {
        check_name("lvol", &o.name)?;
        for (k, v) in &o.xattrs {
            check_xattr(k, v)?;
        }
        if o.xattrs.len() > XATTRS_MAX {
            return Err(LvolError::Invalid(format!("more than {XATTRS_MAX} xattrs")));
        }
        if o.num_clusters > disk::MAX_LVOL_CLUSTERS {
            return Err(LvolError::Invalid("lvol too large".into()));
        }
        let mut st = self.writable()?;
        let thin = o.thin || o.external_parent.is_some();
        let parent = match o.external_parent {
            Some((bdev_uuid, bdev_name)) => {
                check_name("external snapshot bdev", &bdev_name)?;
                Parent::External {
                    bdev_uuid,
                    bdev_name,
                }
            }
            None => Parent::None,
        };
        let rec = self.new_record(
            &st,
            o.name,
            o.uuid,
            o.num_clusters,
            thin,
            o.clear_method,
            parent,
            o.xattrs,
        )?;
        let mut rec = rec;
        if !thin {
            if st.free_count < o.num_clusters {
                return Err(LvolError::NoSpace(format!(
                    "{} clusters needed, {} free",
                    o.num_clusters, st.free_count
                )));
            }
            // Enough are free (checked), so take_free cannot fail; the
            // clusters taken are the model's once the record applies.
            for i in 0..o.num_clusters as usize {
                let p = st
                    .take_free()
                    .ok_or(LvolError::NoSpace("no free cluster".into()))?;
                rec.map[i] = p + 1;
            }
        }
        let id = rec.id;
        self.commit_wait(self.stage(st, vec![Record::CreateLvol(Box::new(rec))])?)
            .await?;
        self.lvol(id)
            .ok_or_else(|| LvolError::NotFound("lvol vanished".into()))
    }

    #[allow(clippy::too_many_arguments)]
    fn new_record(
        &self,
        st: &State,
        name: String,
        uuid: Option<Uuid>,
        num_clusters: u64,
        thin: bool,
        clear_method: ClearMethod,
        parent: Parent,
        xattrs: BTreeMap<String, Vec<u8>>,
    ) -> Result<LvolRecord> {
        if st.name_taken(&name) {
            return Err(LvolError::Exists(format!("lvol {name} exists")));
        }
        let uuid = uuid.unwrap_or_else(Uuid::new_v4);
        if st.model.lvols.values().any(|l| l.uuid == uuid) {
            return Err(LvolError::Exists(format!(
                "an lvol with UUID {uuid} exists"
            )));
        }
        let rec = LvolRecord {
            id: st.model.next_blob_id,
            uuid,
            name,
            num_clusters,
            thin,
            read_only: false,
            clear_method,
            parent,
            creation_time: now_rfc3339(),
            xattrs,
            internal_xattrs: BTreeMap::new(),
            map: vec![0; num_clusters as usize],
        };
        st.room_for(&self.inner.layout, rec.fixed_bytes() as u64)?;
        Ok(rec)
    }

    /// Deletes lvol `id`, freeing its clusters. A snapshot with two or more
    /// children: EBUSY. With exactly one child: merged into it (the child
    /// takes the clusters it lacks, and the snapshot's parent). EBUSY too
    /// while allocations on it (or that child) are in flight. Open
    /// descriptors are the caller's to refuse.
    pub async fn delete_lvol(&self, id: u64) -> Result<DeleteOutcome> {
        let st = self.writable()?;
        let l = st.lvol(id)?;
        st.not_busy(id)?;
        let children = st.children(id);
        let mut recs = Vec::new();
        let mut merged_into = None;
        match children.as_slice() {
            [] => {}
            [c] => {
                st.not_busy(*c)?;
                recs.push(Record::Merge {
                    snapshot: id,
                    child: *c,
                });
                recs.push(Record::SetParent(*c, l.parent.clone()));
                merged_into = Some(*c);
            }
            _ => {
                return Err(LvolError::Busy(format!(
                    "lvol {} has {} clones",
                    l.name,
                    children.len()
                )))
            }
        }
        recs.push(Record::DeleteLvol(id));
        let freed = self.commit_wait(self.stage(st, recs)?).await?;
        Ok(DeleteOutcome {
            merged_into,
            freed_clusters: freed,
        })
    }

    /// Renames lvol `id`. EEXIST if another lvol has that name.
    pub async fn rename_lvol(&self, id: u64, name: &str) -> Result<()> {
        check_name("lvol", name)?;
        let st = self.writable()?;
        let l = st.lvol(id)?;
        if l.name == name {
            return Ok(());
        }
        if st.name_taken(name) {
            return Err(LvolError::Exists(format!("lvol {name} exists")));
        }
        st.room_for(
            &self.inner.layout,
            name.len().saturating_sub(l.name.len()) as u64,
        )?;
        self.commit_wait(self.stage(st, vec![Record::RenameLvol(id, name.to_string())])?)
            .await
            .map(|_| ())
    }

    /// Resizes lvol `id` to `num_clusters`. Growing a thick lvol allocates
    /// the new clusters (ENOSPC if not enough); shrinking frees the
    /// clusters beyond the new end. EPERM for a read-only lvol (SPDK), EBUSY
    /// while allocations are in flight. The lvol's cluster table is
    /// replaced: the caller swaps the new one into its channels.
    pub async fn resize_lvol(&self, id: u64, num_clusters: u64) -> Result<()> {
        if num_clusters > disk::MAX_LVOL_CLUSTERS {
            return Err(LvolError::Invalid("lvol too large".into()));
        }
        let mut st = self.writable()?;
        let l = st.lvol(id)?;
        if l.read_only {
            return Err(LvolError::Perm(format!("lvol {} is read-only", l.name)));
        }
        st.not_busy(id)?;
        let old = l.num_clusters;
        if old == num_clusters {
            return Ok(());
        }
        let thin = l.thin;
        let mut recs = vec![Record::Resize(id, num_clusters)];
        if num_clusters > old && !thin {
            let need = num_clusters - old;
            if st.free_count < need {
                return Err(LvolError::NoSpace(format!(
                    "{need} clusters needed, {} free",
                    st.free_count
                )));
            }
            let mut map = Vec::with_capacity(need as usize);
            for _ in 0..need {
                map.push(
                    st.take_free()
                        .ok_or(LvolError::NoSpace("no free cluster".into()))?
                        + 1,
                );
            }
            let mut full = vec![0u64; old as usize];
            full.extend_from_slice(&map);
            recs.extend(
                disk::runs_of(&full)
                    .chunks(disk::MAX_RUNS_PER_RECORD)
                    .map(|c| Record::Map(id, c.to_vec())),
            );
        }
        self.commit_wait(self.stage(st, recs)?).await.map(|_| ())
    }

    /// Sets a public xattr. EPERM on a read-only lvol unless
    /// `allow_read_only` (the snapshot checksum, which SPDK's fork writes on
    /// snapshots itself).
    pub async fn set_xattr(
        &self,
        id: u64,
        name: &str,
        value: &[u8],
        allow_read_only: bool,
    ) -> Result<()> {
        self.set_xattr_kind(id, name, value, allow_read_only, false)
            .await
    }

    /// Sets an internal xattr (any lvol).
    pub async fn set_internal_xattr(&self, id: u64, name: &str, value: &[u8]) -> Result<()> {
        self.set_xattr_kind(id, name, value, true, true).await
    }

    async fn set_xattr_kind(
        &self,
        id: u64,
        name: &str,
        value: &[u8],
        allow_read_only: bool,
        internal: bool,
    ) -> Result<()> {
        check_xattr(name, value)?;
        let st = self.writable()?;
        let l = st.lvol(id)?;
        if l.read_only && !allow_read_only {
            return Err(LvolError::Perm(format!("lvol {} is read-only", l.name)));
        }
        let m = if internal {
            &l.internal_xattrs
        } else {
            &l.xattrs
        };
        let old = m.get(name);
        if old.is_none() && m.len() >= XATTRS_MAX {
            return Err(LvolError::NoSpace(format!(
                "lvol {} has {XATTRS_MAX} xattrs",
                l.name
            )));
        }
        let extra = (2 + name.len() + 4 + value.len()) as u64;
        st.room_for(&self.inner.layout, extra)?;
        self.commit_wait(self.stage(
            st,
            vec![Record::SetXattr {
                id,
                internal,
                name: name.to_string(),
                value: value.to_vec(),
            }],
        )?)
        .await
        .map(|_| ())
    }

    /// Removes a public (or internal) xattr; ENOENT when absent.
    pub async fn remove_xattr(
        &self,
        id: u64,
        name: &str,
        internal: bool,
        allow_read_only: bool,
    ) -> Result<()> {
        let st = self.writable()?;
        let l = st.lvol(id)?;
        if l.read_only && !allow_read_only {
            return Err(LvolError::Perm(format!("lvol {} is read-only", l.name)));
        }
        let m = if internal {
            &l.internal_xattrs
        } else {
            &l.xattrs
        };
        if !m.contains_key(name) {
            return Err(LvolError::NoEntry(format!("no xattr {name}")));
        }
        self.commit_wait(self.stage(
            st,
            vec![Record::RemoveXattr {
                id,
                internal,
                name: name.to_string(),
            }],
        )?)
        .await
        .map(|_| ())
    }

    /// Makes lvol `id` read-only (`bdev_lvol_set_read_only`). EBUSY while
    /// allocations are in flight.
    pub async fn set_read_only(&self, id: u64) -> Result<()> {
        let st = self.writable()?;
        let l = st.lvol(id)?;
        if l.read_only {
            return Ok(());
        }
        st.not_busy(id)?;
        let thin = l.thin;
        self.commit_wait(self.stage(
            st,
            vec![Record::SetFlags {
                id,
                thin,
                read_only: true,
            }],
        )?)
        .await
        .map(|_| ())
    }

    /// Snapshots lvol `origin`: a new read-only lvol `name` takes the
    /// origin's clusters, parent and size, with public `xattrs`; the origin
    /// keeps its id and UUID, becomes thin with no clusters, its parent the
    /// snapshot. EINVAL for a read-only origin (SPDK), EBUSY while
    /// allocations on it are in flight (the caller quiesces I/O first).
    /// The snapshot gets a new cluster table; the origin's is emptied in
    /// place once durable.
    pub async fn snapshot(
        &self,
        origin: u64,
        name: &str,
        xattrs: BTreeMap<String, Vec<u8>>,
    ) -> Result<LvolInfo> {
        check_name("snapshot", name)?;
        if xattrs.len() > XATTRS_MAX {
            return Err(LvolError::Invalid(format!("more than {XATTRS_MAX} xattrs")));
        }
        for (k, v) in &xattrs {
            check_xattr(k, v)?;
        }
        let st = self.writable()?;
        let o = st.lvol(origin)?.clone();
        if o.read_only {
            return Err(LvolError::Invalid(format!(
                "cannot snapshot read-only lvol {}",
                o.name
            )));
        }
        st.not_busy(origin)?;
        let mut snap = self.new_record(
            &st,
            name.to_string(),
            None,
            o.num_clusters,
            o.thin,
            o.clear_method,
            o.parent.clone(),
            xattrs,
        )?;
        snap.read_only = true;
        let sid = snap.id;
        let recs = vec![
            Record::CreateLvol(Box::new(snap)),
            Record::MoveMap {
                from: origin,
                to: sid,
            },
            Record::SetParent(origin, Parent::Lvol(sid)),
            Record::SetFlags {
                id: origin,
                thin: true,
                read_only: false,
            },
        ];
        self.commit_wait(self.stage(st, recs)?).await?;
        self.lvol(sid)
            .ok_or_else(|| LvolError::NotFound("snapshot vanished".into()))
    }

    /// Clones read-only lvol `snapshot`: a new thin lvol `name` of its size
    /// whose parent it is. EINVAL if `snapshot` is not read-only.
    pub async fn clone_lvol(&self, snapshot: u64, name: &str) -> Result<LvolInfo> {
        check_name("clone", name)?;
        let st = self.writable()?;
        let s = st.lvol(snapshot)?;
        if !s.read_only {
            return Err(LvolError::Invalid(format!(
                "cannot clone {}: not a snapshot (read-only lvol)",
                s.name
            )));
        }
        let (n, cm) = (s.num_clusters, s.clear_method);
        let rec = self.new_record(
            &st,
            name.to_string(),
            None,
            n,
            true,
            cm,
            Parent::Lvol(snapshot),
            BTreeMap::new(),
        )?;
        let id = rec.id;
        self.commit_wait(self.stage(st, vec![Record::CreateLvol(Box::new(rec))])?)
            .await?;
        self.lvol(id)
            .ok_or_else(|| LvolError::NotFound("clone vanished".into()))
    }

    /// `bdev_lvol_set_parent`: makes read-only lvol `parent` the parent of
    /// thin lvol `id`, as SPDK: EINVAL if they are the same, the parent is
    /// not read-only, the sizes differ, the child is not thin, or the
    /// parent descends from the child; EEXIST if it already is the parent.
    pub async fn set_parent(&self, id: u64, parent: u64) -> Result<()> {
        let st = self.writable()?;
        let c = st.lvol(id)?;
        let p = st.lvol(parent)?;
        if id == parent {
            return Err(LvolError::Invalid(
                "an lvol cannot be its own parent".into(),
            ));
        }
        if c.parent == Parent::Lvol(parent) {
            return Err(LvolError::Exists(format!(
                "{} is already the parent",
                p.name
            )));
        }
        if !p.read_only {
            return Err(LvolError::Invalid(format!("{} is not a snapshot", p.name)));
        }
        // Longhorn's SPDK accepts a child larger than its parent (a rebuild
        // after an expansion re-parents a grown snapshot); beyond the
        // parent's end the child reads zeros.
        if p.num_clusters > c.num_clusters {
            return Err(LvolError::Invalid(
                "the parent is larger than the child".into(),
            ));
        }
        if !c.thin {
            return Err(LvolError::Invalid(format!(
                "{} is not thin provisioned",
                c.name
            )));
        }
        let mut at = Parent::Lvol(parent);
        let mut hops = 0;
        while let Parent::Lvol(a) = at {
            if a == id || hops > st.model.lvols.len() {
                return Err(LvolError::Invalid("that would make a parent cycle".into()));
            }
            hops += 1;
            at = st.lvol(a).map(|l| l.parent.clone()).unwrap_or(Parent::None);
        }
        st.not_busy(id)?;
        self.commit_wait(self.stage(st, vec![Record::SetParent(id, Parent::Lvol(parent))])?)
            .await
            .map(|_| ())
    }

    /// Longhorn's `bdev_lvol_detach_parent`: lvol `id` reads through to its
    /// grandparent (or nothing) instead of its parent; no data moves.
    /// EINVAL without a parent or with an external one; a no-op for a
    /// thick lvol (as the fork).
    pub async fn detach_parent(&self, id: u64) -> Result<()> {
        let st = self.writable()?;
        let c = st.lvol(id)?;
        let Parent::Lvol(p) = c.parent else {
            return Err(LvolError::Invalid(format!(
                "{} has no parent snapshot in the store",
                c.name
            )));
        };
        if !c.thin {
            return Ok(());
        }
        st.not_busy(id)?;
        let gp = st.lvol(p)?.parent.clone();
        self.commit_wait(self.stage(st, vec![Record::SetParent(id, gp)])?)
            .await
            .map(|_| ())
    }

    /// Ends an inflate: after the layer above allocated and wrote every
    /// cluster of lvol `id` (through reservations), it becomes thick with
    /// no parent. EINVAL if any cluster is still unallocated.
    pub async fn finish_inflate(&self, id: u64) -> Result<()> {
        let st = self.writable()?;
        let l = st.lvol(id)?;
        if l.read_only {
            return Err(LvolError::Perm(format!("lvol {} is read-only", l.name)));
        }
        if let Some(i) = l.map.iter().position(|&m| m == 0) {
            return Err(LvolError::Invalid(format!(
                "cluster {i} of {} is not allocated",
                l.name
            )));
        }
        st.not_busy(id)?;
        let recs = vec![
            Record::SetParent(id, Parent::None),
            Record::SetFlags {
                id,
                thin: false,
                read_only: false,
            },
        ];
        self.commit_wait(self.stage(st, recs)?).await.map(|_| ())
    }

    /// Ends a decouple: after the layer above allocated in lvol `id` every
    /// cluster its parent has allocated, its parent becomes the
    /// grandparent. EINVAL without an lvol parent or if one of those
    /// clusters is missing.
    pub async fn finish_decouple(&self, id: u64) -> Result<()> {
        let st = self.writable()?;
        let l = st.lvol(id)?;
        let Parent::Lvol(p) = l.parent else {
            return Err(LvolError::Invalid(format!(
                "{} has no parent snapshot",
                l.name
            )));
        };
        let pl = st.lvol(p)?;
        for (i, &m) in pl.map.iter().enumerate().take(l.map.len()) {
            if m != 0 && l.map[i] == 0 {
                return Err(LvolError::Invalid(format!(
                    "cluster {i} of {} is allocated in the parent, not in it",
                    l.name
                )));
            }
        }
        st.not_busy(id)?;
        let gp = pl.parent.clone();
        self.commit_wait(self.stage(st, vec![Record::SetParent(id, gp)])?)
            .await
            .map(|_| ())
    }

    /// Reserves a free data cluster for logical cluster `index` of lvol
    /// `id` (a thin lvol's first write there, or a copy by inflate). EPERM
    /// for a read-only lvol, EINVAL beyond its size, EEXIST if that cluster
    /// is allocated, EBUSY if it is reserved already, ENOSPC if none is
    /// free. Synchronous: concurrent writers never get the same cluster.
    pub fn reserve_cluster(&self, id: u64, index: u64) -> Result<Reservation> {
        let mut st = self.writable()?;
        let l = st.lvol(id)?;
        if l.read_only {
            return Err(LvolError::Perm(format!("lvol {} is read-only", l.name)));
        }
        if index >= l.num_clusters {
            return Err(LvolError::Invalid(format!(
                "cluster {index} is beyond lvol {} ({} clusters)",
                l.name, l.num_clusters
            )));
        }
        if l.map[index as usize] != 0 {
            return Err(LvolError::Exists(format!("cluster {index} is allocated")));
        }
        if st.reserved.contains_key(&(id, index)) {
            return Err(LvolError::Busy(format!(
                "cluster {index} is being allocated"
            )));
        }
        let p = st
            .take_free()
            .ok_or_else(|| LvolError::NoSpace("no free cluster".into()))?;
        st.reserved.insert((id, index), p);
        *st.busy.entry(id).or_default() += 1;
        Ok(Reservation {
            store: self.inner.clone(),
            lvol: id,
            index,
            physical: p,
            offset_blocks: self.inner.layout.cluster_offset_blocks(p),
            live: true,
        })
    }

    /// Commits reservations whose data the caller has written: they become
    /// the lvols' clusters, durably, in one transaction (and concurrent
    /// calls share log writes: group commit). Their cluster table entries
    /// are set (Release) before this returns.
    pub async fn commit_clusters(&self, res: Vec<Reservation>) -> Result<()> {
        if res.is_empty() {
            return Ok(());
        }
        let mut st = self.writable()?;
        let mut per: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
        let mut unbusy = Vec::new();
        for mut r in res {
            if !Rc::ptr_eq(&r.store, &self.inner) {
                return Err(LvolError::Invalid("reservation of another store".into()));
            }
            // Structural operations on the lvol wait for its reservations
            // (EBUSY), so the lvol and the hole are still there.
            assert!(
                st.reserved.remove(&(r.lvol, r.index)).is_some(),
                "reservation not held"
            );
            r.live = false;
            per.entry(r.lvol).or_default().push((r.index, r.physical));
            unbusy.push(r.lvol);
        }
        let mut recs = Vec::new();
        for (id, mut v) in per {
            st.lvol(id)?;
            v.sort_unstable();
            // Runs straight from the sorted pairs: O(reservations).
            let mut runs: Vec<disk::Run> = Vec::new();
            for (i, p) in v {
                match runs.last_mut() {
                    Some(r) if r.logical + r.len as u64 == i && r.physical + r.len as u64 == p => {
                        r.len += 1
                    }
                    _ => runs.push(disk::Run {
                        logical: i,
                        physical: p,
                        len: 1,
                    }),
                }
            }
            recs.extend(
                runs.chunks(disk::MAX_RUNS_PER_RECORD)
                    .map(|c| Record::Map(id, c.to_vec())),
            );
        }
        self.run_with(&mut st, recs, unbusy)?;
        let staged = self.enqueue_last(st);
        self.commit_wait(staged).await.map(|_| ())
    }

    /// Releases the clusters `start..start+count` of thin lvol `id` (an
    /// unmap or write_zeroes of whole clusters). They are free once this
    /// returns; the caller makes sure no I/O to them is in flight (the lvol
    /// bdev layer's release barrier, `lvs::release`). EPERM read-only,
    /// EINVAL thick or out of range, EBUSY while one of those clusters is
    /// being allocated. Allocations of other clusters of the lvol may be in
    /// flight: they touch other map entries, and their commits are ordered
    /// with this one in the log.
    pub async fn release_clusters(&self, id: u64, start: u64, count: u64) -> Result<u64> {
        let st = self.writable()?;
        let l = st.lvol(id)?;
        if l.read_only {
            return Err(LvolError::Perm(format!("lvol {} is read-only", l.name)));
        }
        if !l.thin {
            return Err(LvolError::Invalid(format!("lvol {} is thick", l.name)));
        }
        if start.checked_add(count).is_none_or(|e| e > l.num_clusters) {
            return Err(LvolError::Invalid("range beyond the lvol".into()));
        }
        let in_range = |&(l, i): &(u64, u64)| l == id && (start..start + count).contains(&i);
        if st.reserved.keys().any(in_range) {
            return Err(LvolError::Busy(format!(
                "lvol {}: a cluster in {start}..{} is being allocated",
                l.name,
                start + count
            )));
        }
        if l.map[start as usize..(start + count) as usize]
            .iter()
            .all(|&m| m == 0)
        {
            return Ok(0);
        }
        self.commit_wait(self.stage(st, vec![Record::Unmap(id, start, count)])?)
            .await
    }

    /// Forces a checkpoint (tests; a clean shutdown may call it so the
    /// next load replays nothing).
    pub async fn checkpoint(&self) -> Result<()> {
        // An empty transaction that is committed through a checkpoint.
        drop(self.writable()?);
        self.run_with_forced_checkpoint().await
    }

    async fn run_with_forced_checkpoint(&self) -> Result<()> {
        let slot = Rc::new(Slot::default());
        self.inner.j.borrow_mut().queue.push(Pending {
            // Larger than any log transaction: committed by checkpoint.
            txn: vec![0u8; MAX_TXN_BYTES + 1],
            frees: Vec::new(),
            publish: Vec::new(),
            unbusy: Vec::new(),
            slot: slot.clone(),
        });
        self.commit_wait((slot, 0)).await.map(|_| ())
    }
}

/// What one round of the leader writes.
struct Plan {
    /// Log pages from `first_seq`, or None for a checkpoint-only round.
    pages: Option<Vec<u8>>,
    first_seq: u64,
    /// (checkpoint bytes, generation, log sequence it is as of).
    ckpt: Option<(Vec<u8>, u64, u64)>,
}

/// Takes the next round out of the queue into `in_flight`; synchronous,
/// so the model is exactly the state after everything written plus
/// everything queued. A checkpoint therefore serialises the model only in
/// a round that takes the whole queue:
/// - the whole queue fits the log (no transaction above
///   [`MAX_TXN_BYTES`], at most a quarter of the log, room left): one
///   batch; with a checkpoint next to it once the log is half full;
/// - else a prefix that fits: a batch without checkpoint;
/// - else (a huge transaction first, or the log full): the whole queue
///   is committed by a checkpoint alone.
fn plan_round(st: &State, j: &mut Journal) -> Plan {
    let l = st_layout(j);
    let limit = (l.log_pages / 4).max(1);
    let used = j.next_seq - j.sb.log_start_seq;
    let lens: Vec<usize> = j.queue.iter().map(|p| p.txn.len()).collect();
    // The longest prefix that fits (one pass: stream bytes add up).
    let mut n = 0;
    let mut bytes = 0usize;
    for &t in &lens {
        let pages = (bytes + 4 + t).div_ceil(journal::LOG_PAYLOAD_BYTES) as u64;
        if t > MAX_TXN_BYTES || pages > limit || used + pages > l.log_pages {
            break;
        }
        bytes += 4 + t;
        n += 1;
    }
    let all = lens.len();
    let (take, pages, ckpt_through) = if n == all {
        let pages = journal::batch_pages(lens.iter().copied());
        let ck = (used + pages > l.log_pages / 2).then_some(j.next_seq + pages);
        (all, true, ck)
    } else if n > 0 {
        (n, true, None)
    } else {
        (all, false, Some(j.next_seq))
    };
    let batch: Vec<Pending> = j.queue.drain(..take).collect();
    let txns: Vec<Vec<u8>> = batch.iter().map(|p| p.txn.clone()).collect();
    debug_assert!(ckpt_through.is_none() || j.queue.is_empty());
    let plan = Plan {
        pages: pages
            .then(|| journal::encode_batch(&st.model.store_uuid, j.next_seq, j.sb.epoch, &txns)),
        first_seq: j.next_seq,
        ckpt: ckpt_through.map(|through| {
            let gen = j.sb.ckpt_gen + 1;
            (encode_checkpoint(&st.model, gen, through), gen, through)
        }),
    };
    j.in_flight = batch;
    plan
}

fn st_layout(j: &Journal) -> Layout {
    j.sb.layout
}

/// Poisons the store if an inline leader is dropped mid-round.
struct LeaderGuard<'a>(&'a LvolStore);

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        self.0.poison(&LvolError::Io(
            "the committing operation was dropped".into(),
        ));
        self.0.inner.j.borrow_mut().leader = false;
    }
}
