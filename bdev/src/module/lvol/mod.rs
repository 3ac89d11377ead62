//! Logical volume stores: the on-disk format and metadata engine beneath
//! the lvol bdevs (SPDK's blobstore + lvol library, in one layer).
//!
//! This module owns the metadata of a store on its base device: the store
//! (UUID, name, cluster size, data clusters, free clusters) and its lvols
//! (blob id, UUID, name, size, thin, read-only, cluster map, parent,
//! xattrs, clear method), every change to them, crash safety, load, and a
//! consistency checker. It does no data I/O and registers no bdev: the lvol
//! bdev layer above moves data (copy-on-write, inflate copies, clearing)
//! and calls the operations of [`store::LvolStore`].
//!
//! # Layout
//!
//! ```text
//!  device (4 KiB metadata pages; data clusters after the metadata region)
//!  +------+------+--------------------+--------------------+-------------+--//--+-----------+----
//!  | SB A | SB B | checkpoint area 0  | checkpoint area 1  |  log ring   | pad  | cluster 0 | ...
//!  +------+------+--------------------+--------------------+-------------+--//--+-----------+----
//!  page 0  page 1  C pages              C pages              L pages       to a cluster boundary
//! ```
//!
//! - **Superblock** (two copies, [`disk::Superblock`]): magic, version,
//!   store UUID, sequence number, geometry, the current checkpoint
//!   (generation, length, CRC-32C) and where the log starts (sequence,
//!   ring position, smallest epoch), the epoch, its own CRC-32C. Copy
//!   `seq % 2` is written at format, at every load (epoch bump) and after
//!   every checkpoint; the valid copy with the higher sequence wins.
//! - **Checkpoint** ([`disk::encode_checkpoint`]): the whole state in one
//!   CRC-covered byte string: store record, then per lvol its record with
//!   xattrs and its cluster map as runs (logical, physical, length).
//!   Generation `g` goes to area `g % 2`, never over the one the newest
//!   superblock names.
//! - **Log** ([`journal`]): 4 KiB pages with magic, store UUID, sequence
//!   number, epoch, CRC-32C, carrying transactions (lists of typed
//!   [`disk::Record`]s) framed as a byte stream. Page `seq` lives at ring
//!   position `start_pos + (seq - start_seq) mod L`.
//!
//! Sizing: SPDK gives its blobstore `num_md_pages_per_cluster_ratio *
//! clusters / 100` metadata pages of 4 KiB (one per cluster by default).
//! The same page budget is used here: 1/16 of it (64 to 4096 pages) for
//! the log and the rest split between the two checkpoint areas, raised to
//! a small minimum ([`disk::Layout::compute`]). A checkpoint area reserves
//! [`disk::RUN_BYTES`] for every data cluster (the worst case, every
//! cluster its own run), so an allocation never fails for lack of metadata
//! space; lvol records (names, xattrs) use the rest, and creating an lvol
//! or setting an xattr fails with ENOSPC when it is full.
//!
//! There is no on-disk allocation bitmap: a data cluster is in use exactly
//! when some lvol's map names it, and load derives the free bitmap from
//! the maps. A leak (allocated, owned by nobody) therefore cannot exist on
//! disk by construction; the checkpoint records its allocated-cluster
//! count so the checker can still catch an accounting error.
//!
//! # Operations and commits
//!
//! Every operation validates against the in-memory model, applies its
//! records to it and queues its transaction in one synchronous step, then
//! waits until the transaction is durable. One committer at a time is the
//! *leader*: it takes everything queued, writes it as consecutive log
//! pages, flushes, and completes all of them (group commit); committers
//! that arrive meanwhile form the next batch. Thin allocation is the hot
//! case: [`store::LvolStore::reserve_cluster`] takes a free cluster
//! synchronously (so concurrent writers never get the same one), the
//! caller writes the data, and [`store::LvolStore::commit_clusters`]
//! makes the mapping durable; many of those share one log write.
//!
//! When the log is half full, the leader also writes a checkpoint next to
//! a batch, with the same flush. It does so only in a round that takes the
//! whole queue: transactions are applied to the model when they are
//! queued, so only then is the model exactly the state after the batch
//! (serialised before any await). The batch's committers are answered,
//! then the new superblock moves the log's start past the batch. A round
//! that cannot take the whole queue (more than a quarter of the log) writes
//! a prefix without a checkpoint. Committers wait for a checkpoint only
//! when the first queued transaction is too large for the log or the log
//! is full: then the whole queue is committed by a checkpoint alone. On a
//! reactor the leader is a task of its own, so dropping an operation's
//! future never stops a commit halfway.
//!
//! # Crash safety
//!
//! Assumptions: a write in flight at a crash may land partially, in any
//! set of 512-byte sectors; writes since the last completed flush may or
//! may not have landed, in any subset; a completed flush makes every write
//! completed before it durable.
//!
//! - *Every structure is self-validating*: a page or checkpoint that did
//!   not fully land fails its CRC (the CRC covers all its sectors).
//! - *Superblock*: the copy written is the one not holding the newest
//!   sequence, so a torn superblock write leaves the previous one valid,
//!   and what the previous one names is still intact (below).
//! - *Checkpoint*: written to the area the newest superblock does not
//!   name, flushed, and only then named by a new superblock. A torn
//!   checkpoint is never named by a valid superblock.
//! - *Log*: a commit returns only after its pages are flushed. Replay
//!   takes pages with consecutive sequence numbers from the superblock's
//!   start and stops at the first that is invalid, from another store, out
//!   of sequence (an earlier lap of the ring) or out of epoch order. A
//!   transaction is applied only if all of its bytes are in the accepted
//!   pages, so a torn or partly landed batch loses only commits that had
//!   not returned, and the state is before or after each of them: exactly
//!   a prefix of the transaction order.
//! - *Epochs*: after a crash, pages of an interrupted batch may lie beyond
//!   the log's end with valid CRCs. Each load writes a superblock with a
//!   new epoch before writing any page, and new pages carry it; replay
//!   refuses a page whose epoch is below its predecessor's (or, for the
//!   first, below the superblock's `log_min_epoch`), so a stale page can
//!   never follow a newer one into the replayed state.
//! - *The ring is never overwritten while needed*: pages from the durable
//!   superblock's start on are kept until a newer superblock (after a
//!   checkpoint that includes them) moves the start past them.
//! - *Freed clusters* return to the free bitmap only once the commit that
//!   freed them is durable, so data of a new owner never lands in a
//!   cluster a crash could give back to its old owner. A reserved cluster
//!   is in no durable map: a crash before its commit leaves it free (no
//!   leak); a reservation dropped uncommitted is freed.
//! - *Format* first erases both superblock copies and flushes, so a crash
//!   midway leaves the earlier store intact, no store, or the new one.
//! - *Dirty shutdown*: load reads the newest superblock, one checkpoint
//!   and at most L log pages; nothing scans the device.
//!
//! # Concurrency
//!
//! A store is owned by the core that formatted or loaded it (its metadata
//! core; [`store::LvolStore`] is `!Send`). Every mutation runs there. The
//! data path on any core reads an lvol's [`store::ClusterTable`]
//! (`Arc<[AtomicU64]>`, data cluster + 1, 0 = unallocated) without a lock;
//! the metadata core updates entries (Release) only once durable. Resize
//! replaces an lvol's table: the layer above swaps the new one into its
//! channels. Structural operations on an lvol (delete, resize, snapshot,
//! parent changes, read-only) return EBUSY while allocations on it are in
//! flight: the layer above quiesces the lvol's I/O first. A release
//! (whole-cluster unmap) is EBUSY only while one of its own clusters is
//! being allocated: it clears map entries no allocation touches, and the
//! layer above keeps I/O away from them by a barrier instead of a quiesce
//! (`vbdev`, "Releasing clusters").
//!
//! A failed metadata write poisons the store (the model may be ahead of
//! the disk): every later operation fails with EIO until it is reloaded.

pub mod check;
pub mod device;
pub mod disk;
pub mod journal;
pub mod lvs;
pub mod rpc;
pub mod store;
pub mod vbdev;

#[cfg(test)]
mod tests;

pub use check::{CheckReport, Finding, FindingKind, Severity};
pub use device::{BdevDevice, FileDevice, MdDevice, MemDevice};
pub use disk::{ClearMethod, Parent};
pub use store::{
    ClusterTable, CreateOptions, DeleteOutcome, FormatOptions, LvolInfo, LvolStore, Reservation,
    StoreInfo,
};

/// Largest transaction written to the log: a bound on a log frame that
/// replay checks. Larger ones (a thick lvol over badly fragmented free
/// space) are committed by a checkpoint instead.
pub const MAX_TXN_BYTES: usize = 1 << 20;

/// What an lvol store operation can fail with; each maps to the errno SPDK
/// returns for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LvolError {
    /// EEXIST: the name or UUID is taken (or the parent is already set).
    Exists(String),
    /// ENODEV: no such lvol (SPDK answers -19 for unknown lvols).
    NotFound(String),
    /// ENOENT: no such xattr.
    NoEntry(String),
    /// EBUSY: clones, or allocations in flight.
    Busy(String),
    /// EPERM: the lvol is read-only.
    Perm(String),
    /// EINVAL
    Invalid(String),
    /// ENOSPC: no free clusters, or the metadata region is full.
    NoSpace(String),
    /// EIO: a device error, or the store was poisoned by one.
    Io(String),
    /// EILSEQ: the device carries no lvol store.
    NoStore(String),
    /// EILSEQ: a newer format version than this build knows.
    Unsupported(String),
    /// EILSEQ: the metadata is damaged (run the checker).
    Corrupt(String),
}

impl LvolError {
    pub fn errno(&self) -> i32 {
        match self {
            LvolError::Exists(_) => libc::EEXIST,
            LvolError::NotFound(_) => libc::ENODEV,
            LvolError::NoEntry(_) => libc::ENOENT,
            LvolError::Busy(_) => libc::EBUSY,
            LvolError::Perm(_) => libc::EPERM,
            LvolError::Invalid(_) => libc::EINVAL,
            LvolError::NoSpace(_) => libc::ENOSPC,
            LvolError::Io(_) => libc::EIO,
            LvolError::NoStore(_) | LvolError::Unsupported(_) | LvolError::Corrupt(_) => {
                libc::EILSEQ
            }
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            LvolError::Exists(s)
            | LvolError::NotFound(s)
            | LvolError::NoEntry(s)
            | LvolError::Busy(s)
            | LvolError::Perm(s)
            | LvolError::Invalid(s)
            | LvolError::NoSpace(s)
            | LvolError::Io(s)
            | LvolError::NoStore(s)
            | LvolError::Unsupported(s)
            | LvolError::Corrupt(s) => s,
        }
    }
}

impl std::fmt::Display for LvolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.detail())
    }
}

impl std::error::Error for LvolError {}

impl From<crate::BdevError> for LvolError {
    fn from(e: crate::BdevError) -> LvolError {
        LvolError::Io(format!("{e} ({})", e.detail().unwrap_or("")))
    }
}

pub type Result<T, E = LvolError> = std::result::Result<T, E>;
