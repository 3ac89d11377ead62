//! RAID bdevs (SPDK's bdev_raid): raid0 striping, raid1 mirroring and
//! concat over base bdevs ("members"), with an optional on-disk superblock
//! (`superblock.rs`) from which a RAID reassembles by itself (`examine.rs`),
//! per-core I/O (`channel.rs`) and background rebuild (`rebuild.rs`).
//!
//! Invariants:
//! - All control state lives on the main reactor: the module's table of
//!   RAIDs (configuring and online), member descriptors and claims, and
//!   every superblock write (serialised, sequence number bumped each time).
//! - The I/O path reads only atomics of [`RaidShared`]: each slot's
//!   [`MemberState`] and a generation counter; a channel refreshes its
//!   member channels (under the members lock, off the per-I/O path) only
//!   when the generation moved.
//! - A RAID is registered (visible) only when online: all recorded members
//!   present, or, for raid1, at least one current member once the others
//!   have had [`DEGRADED_GRACE`] to appear.
//! - Create returns after registration and examine (SPEC §4); a failed
//!   create releases every claim it took.
//! - A raid1 write is acknowledged only once every member the superblock
//!   on disk calls current has it (`channel.rs` holds the others): every
//!   change that takes a member out of service is followed by a superblock
//!   write, and each round on disk publishes [`RaidShared::durable`].

mod channel;
mod examine;
pub(crate) mod rebuild;
pub mod rpc;
pub mod superblock;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::bdev::{Bdev, BdevHandle, BdevProps, LocalFuture};
use crate::channel::BdevChannel;
use crate::error::{BdevError, Result};
use crate::io::IoType;
use crate::registry::{self, Descriptor};
use static_assertions::const_assert;
pub use superblock::Level;
use superblock::{RaidSuperblock, SlotRecord, SlotState};

pub const MODULE: &str = "raid";

/// How long a RAID whose superblock names members not yet seen waits for
/// them before a raid1 comes up degraded.
pub const DEGRADED_GRACE: Duration = Duration::from_millis(1500);

/// A member slot's state at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MemberState {
    /// No bdev in the slot (never found, removed, or failed and released).
    Missing = 0,
    /// Current data; serves reads and writes.
    Operational = 1,
    /// Failed an I/O: no I/O goes to it; released by the main reactor.
    Failed = 2,
    /// Being rebuilt: receives writes, serves no reads.
    Rebuilding = 3,
}

impl MemberState {
    fn from_u8(v: u8) -> MemberState {
        match v {
            1 => MemberState::Operational,
            2 => MemberState::Failed,
            3 => MemberState::Rebuilding,
            _ => MemberState::Missing,
        }
    }
}

/// One slot's member, control side.
pub struct Member {
    /// The base bdev's name (its UUID while missing).
    pub name: String,
    pub uuid: Option<Uuid>,
    pub bdev: Option<BdevHandle>,
    desc: Option<Descriptor>,
    pub data_offset: u64,
    pub data_size: u64,
}

/// Progress of the running rebuild, read by every core.
#[derive(Default)]
pub struct RebuildProgress {
    pub active: AtomicBool,
    pub slot: AtomicU64,
    pub done_blocks: AtomicU64,
    pub total_blocks: AtomicU64,
}

/// What every core's channel and the control plane share.
pub struct RaidShared {
    pub name: String,
    pub uuid: Uuid,
    pub level: Level,
    pub strip_size_blocks: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    /// Where data starts on every member, and how much each holds.
    pub data_offset: u64,
    pub data_size: u64,
    pub superblock: bool,
    pub members: Mutex<Vec<Member>>,
    /// Per slot, [`superblock::MAX_SLOTS`] of them; the first `slots` used.
    states: Vec<AtomicU8>,
    slots: AtomicUsize,
    /// Bumped whenever a slot's bdev changes.
    pub generation: AtomicU64,
    pub rebuild: RebuildProgress,
    /// The superblock's current sequence number.
    pub seq: AtomicU64,
    /// What the superblock on the members' disks says (raid1 write hold):
    /// bit `s` set while it calls slot `s` current, [`DURABLE_LOST`] once
    /// it can no longer be written. Published by [`write_superblock`]
    /// after a round is on disk, read by every channel at each raid1 write
    /// completion; 0 (nothing to wait for) without a superblock.
    pub durable: AtomicU64,
}

/// [`RaidShared::durable`]: no superblock can be written any more (no
/// member left to take it), so writes waiting for one fail. Above every
/// slot bit.
pub const DURABLE_LOST: u64 = 1 << 63;
const_assert!(superblock::MAX_SLOTS < 63);

/// The slots a superblock calls current, as [`RaidShared::durable`] bits.
fn current_mask(sb: &RaidSuperblock) -> u64 {
    sb.slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state == SlotState::Configured)
        .fold(0, |m, (i, _)| m | 1 << i)
}

impl RaidShared {
    pub fn state(&self, slot: usize) -> MemberState {
        self.states.get(slot).map_or(MemberState::Missing, |s| {
            MemberState::from_u8(s.load(Ordering::Acquire))
        })
    }

    pub fn set_state(&self, slot: usize, st: MemberState) {
        if let Some(s) = self.states.get(slot) {
            s.store(st as u8, Ordering::Release);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks `slot` failed if it is in service (operational or
    /// rebuilding); whether this call did, so of several cores seeing the
    /// same member fail at once exactly one reports it.
    pub fn fail(&self, slot: usize) -> bool {
        let Some(s) = self.states.get(slot) else {
            return false;
        };
        let failed = s
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                matches!(
                    MemberState::from_u8(v),
                    MemberState::Operational | MemberState::Rebuilding
                )
                .then_some(MemberState::Failed as u8)
            })
            .is_ok();
        if failed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        failed
    }

    /// Publishes what the members' superblock now says (see
    /// [`RaidShared::durable`]) and has every core recheck the raid1
    /// writes it holds for it. Main reactor, superblock lock held (or
    /// before the RAID serves I/O).
    fn publish_durable(&self, durable: u64) {
        // No current slot on disk: nothing an assembly would serve from.
        let durable = if durable == 0 { DURABLE_LOST } else { durable };
        self.durable.store(durable, Ordering::Release);
        channel::release_sb_waiters_everywhere();
    }

    /// Writes waiting for a superblock fail (see [`DURABLE_LOST`]).
    fn durable_lost(&self) {
        if self.superblock {
            let now = self.durable.load(Ordering::Acquire);
            self.publish_durable(now | DURABLE_LOST);
        }
    }

    pub fn num_slots(&self) -> usize {
        self.slots.load(Ordering::Acquire)
    }

    /// Slot states for a RAID of `n` members, all `st`.
    fn new_states(n: usize, st: MemberState) -> (Vec<AtomicU8>, AtomicUsize) {
        let states = (0..superblock::MAX_SLOTS)
            .map(|i| AtomicU8::new(if i < n { st } else { MemberState::Missing } as u8))
            .collect();
        (states, AtomicUsize::new(n))
    }

    /// A member is being rebuilt (one at a time).
    pub fn rebuilding(&self) -> bool {
        self.rebuild.active.load(Ordering::Acquire)
    }

    pub fn operational(&self) -> usize {
        (0..self.num_slots())
            .filter(|&i| self.state(i) == MemberState::Operational)
            .count()
    }

    pub fn discovered(&self) -> usize {
        (0..self.num_slots())
            .filter(|&i| self.state(i) != MemberState::Missing)
            .count()
    }

    /// The superblock describing the current state (next sequence number).
    fn superblock_now(&self, seq: u64) -> RaidSuperblock {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        RaidSuperblock {
            seq,
            raid_uuid: self.uuid,
            name: self.name.clone(),
            level: self.level,
            block_size: self.block_size,
            strip_size_blocks: self.strip_size_blocks,
            raid_num_blocks: self.num_blocks,
            own_slot: None,
            slots: members
                .iter()
                .enumerate()
                .map(|(i, m)| SlotRecord {
                    member_uuid: m.uuid.unwrap_or_else(Uuid::nil),
                    data_offset: m.data_offset,
                    data_size: m.data_size,
                    state: match self.state(i) {
                        MemberState::Operational => SlotState::Configured,
                        MemberState::Rebuilding => SlotState::Rebuilding,
                        MemberState::Missing | MemberState::Failed => SlotState::Failed,
                    },
                })
                .collect(),
        }
    }

    /// `bdev_raid_get_bdevs`' description of this RAID.
    pub fn info_json(&self, state: &str) -> Value {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let rb = &self.rebuild;
        let rebuilding = rb.active.load(Ordering::Acquire);
        let list: Vec<Value> = members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let st = self.state(i);
                json!({
                    "name": if m.bdev.is_some() { Value::from(m.name.clone()) } else { Value::Null },
                    "uuid": m.uuid.map(|u| u.hyphenated().to_string()),
                    "is_configured": m.bdev.is_some() && st != MemberState::Failed,
                    "data_offset": m.data_offset,
                    "data_size": m.data_size,
                    "state": match st {
                        MemberState::Missing => "missing",
                        MemberState::Operational => "operational",
                        MemberState::Failed => "failed",
                        MemberState::Rebuilding => "rebuilding",
                    },
                })
            })
            .collect();
        let mut v = json!({
            "name": self.name,
            "uuid": self.uuid.hyphenated().to_string(),
            "strip_size_kb": self.strip_size_blocks as u64 * self.block_size as u64 / 1024,
            "state": state,
            "raid_level": self.level.as_str(),
            "superblock": self.superblock,
            "num_base_bdevs": self.num_slots(),
            "num_base_bdevs_discovered": self.discovered(),
            "num_base_bdevs_operational": self.operational(),
            "base_bdevs_list": list,
        });
        if rebuilding {
            let done = rb.done_blocks.load(Ordering::Acquire);
            let total = rb.total_blocks.load(Ordering::Acquire).max(1);
            let slot = rb.slot.load(Ordering::Acquire) as usize;
            v["process"] = json!({
                "type": "rebuild",
                "target": members.get(slot).map(|m| m.name.clone()),
                "progress": {
                    "blocks": done,
                    "total_blocks": total,
                    "percent": (done * 100 / total) as u32,
                }
            });
        }
        v
    }
}

/// The registered bdev of an online RAID.
pub struct RaidBdev {
    pub shared: Arc<RaidShared>,
}

impl Bdev for RaidBdev {
    fn module(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "Raid Volume"
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write => true,
            IoType::Unmap | IoType::WriteZeroes | IoType::Flush | IoType::Reset => {
                let members = self
                    .shared
                    .members
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                members
                    .iter()
                    .filter_map(|m| m.bdev.as_ref())
                    .all(|b| b.io_type_supported(io_type))
            }
            IoType::Compare => false,
        }
    }

    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        channel::RaidChannel::new(self.shared.clone())
    }

    fn dump_info_json(&self) -> Value {
        json!({ "raid": self.shared.info_json("online") })
    }

    fn write_config_json(&self) -> Option<Value> {
        // A RAID with a superblock reassembles from its members' disks;
        // writing its create too would make a reload fail with EEXIST.
        if self.shared.superblock {
            return None;
        }
        let members = self
            .shared
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some(json!({
            "method": "bdev_raid_create",
            "params": {
                "name": self.shared.name,
                "raid_level": self.shared.level.as_str(),
                "strip_size_kb": self.shared.strip_size_blocks as u64 * self.shared.block_size as u64 / 1024,
                "uuid": self.shared.uuid.hyphenated().to_string(),
                "base_bdevs": members.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
                "superblock": false,
            }
        }))
    }

    fn destruct(&self) -> LocalFuture<()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            // Raid1 writes still waiting for a superblock are not
            // acknowledged now: the RAID goes before recording them.
            shared.durable_lost();
            rebuild::cancel(&shared.name).await;
            release_members(&shared);
            RAIDS.with(|r| r.borrow_mut().remove(&shared.name));
        })
    }
}

/// Closes every member descriptor (releasing the claims).
fn release_members(shared: &RaidShared) {
    let descs: Vec<Descriptor> = {
        let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members.iter_mut().filter_map(|m| m.desc.take()).collect()
    };
    drop(descs);
}

/// The module's RAIDs, by name (main reactor).
pub struct RaidEntry {
    pub shared: Arc<RaidShared>,
    /// Registered as a bdev.
    pub online: bool,
}

thread_local! {
    static RAIDS: RefCell<BTreeMap<String, RaidEntry>> = const { RefCell::new(BTreeMap::new()) };
    /// Serialises superblock writes per RAID.
    static SB_LOCKS: RefCell<BTreeMap<String, Rc<reactor::AsyncLock>>> =
        const { RefCell::new(BTreeMap::new()) };
}

pub fn with_raids<R>(f: impl FnOnce(&mut BTreeMap<String, RaidEntry>) -> R) -> R {
    RAIDS.with(|r| f(&mut r.borrow_mut()))
}

pub fn find(name: &str) -> Option<Arc<RaidShared>> {
    with_raids(|r| r.get(name).map(|e| e.shared.clone()))
}

/// Creation parameters, as `bdev_raid_create` takes them.
#[derive(Debug, Clone)]
pub struct RaidOptions {
    pub name: String,
    pub level: Level,
    pub strip_size_kb: u32,
    pub base_bdevs: Vec<String>,
    pub uuid: Option<Uuid>,
    pub superblock: bool,
}

/// Opens and claims `base` as a member of `raid`; when the base goes away
/// its slot is released (raid1) or the RAID goes (raid0, concat).
fn open_member(base: &str, raid: &str) -> Result<Descriptor> {
    let b = registry::lookup(base).ok_or_else(|| BdevError::NoDevice(base.to_string()))?;
    open_member_handle(&b, raid)
}

/// As [`open_member`], for a bdev that may still be under examine.
fn open_member_handle(b: &BdevHandle, raid: &str) -> Result<Descriptor> {
    let raid = raid.to_string();
    let base_name = b.name().to_string();
    let on_remove = Box::new(move || {
        reactor::spawn_local(async move {
            if let Err(e) = member_gone(&raid, &base_name).await {
                log::warn!("raid {raid}: base {base_name} removed: {e}");
            }
        })
    });
    let desc = registry::open_handle(b, true, Some(on_remove))?;
    desc.claim(MODULE)?;
    Ok(desc)
}

/// A member's bdev is going away (hot remove).
async fn member_gone(raid: &str, base: &str) -> Result<()> {
    let Some(shared) = find(raid) else {
        return Ok(());
    };
    match shared.level {
        Level::Raid1 if shared.num_slots() > 1 => remove_member(&shared, base, true).await,
        _ => {
            log::warn!("raid {raid}: member {base} removed, the RAID goes with it");
            let online = with_raids(|r| r.get(raid).is_some_and(|e| e.online));
            if online {
                registry::unregister(raid, Some(MODULE)).await
            } else {
                release_members(&shared);
                with_raids(|r| r.remove(raid));
                Ok(())
            }
        }
    }
}

/// Validates options against the members; returns (strip blocks, block
/// size, per-member data offset and size, RAID size).
fn geometry(o: &RaidOptions, bases: &[BdevHandle]) -> Result<(u32, u32, u64, u64, u64)> {
    let bs = bases[0].block_size();
    if let Some(b) = bases.iter().find(|b| b.block_size() != bs) {
        return Err(BdevError::Invalid(format!(
            "base bdev {} has block size {}, {} has {bs}: members must match",
            b.name(),
            b.block_size(),
            bases[0].name()
        )));
    }
    let strip_blocks = match o.level {
        Level::Raid1 => 0,
        Level::Raid0 | Level::Concat => {
            if o.strip_size_kb == 0 {
                return Err(BdevError::Invalid(format!(
                    "strip_size_kb is required for {}",
                    o.level.as_str()
                )));
            }
            let bytes = o.strip_size_kb as u64 * 1024;
            if !o.strip_size_kb.is_power_of_two() || bytes < bs as u64 {
                return Err(BdevError::Invalid(format!(
                    "strip_size_kb {} must be a power of two and at least one block ({bs} B)",
                    o.strip_size_kb
                )));
            }
            (bytes / bs as u64) as u32
        }
    };
    let data_offset = if o.superblock {
        superblock::data_offset_blocks(bs)
    } else {
        0
    };
    let min = bases.iter().map(|b| b.num_blocks()).min().unwrap_or(0);
    if min <= data_offset {
        return Err(BdevError::Invalid(format!(
            "base bdevs too small for the superblock ({data_offset} blocks)"
        )));
    }
    let mut data_size = min - data_offset;
    if strip_blocks > 0 {
        data_size -= data_size % strip_blocks as u64;
    }
    if data_size == 0 {
        return Err(BdevError::Invalid(
            "base bdevs smaller than one strip".into(),
        ));
    }
    let n = bases.len() as u64;
    let raid_blocks = match o.level {
        Level::Raid0 | Level::Concat => data_size * n,
        Level::Raid1 => data_size,
    };
    Ok((strip_blocks, bs, data_offset, data_size, raid_blocks))
}

/// `bdev_raid_create`: claims the members, writes the superblock if asked,
/// registers the RAID; returns once it is usable. On any error every claim
/// is released and nothing remains.
pub async fn create(o: RaidOptions) -> Result<String> {
    if o.base_bdevs.is_empty() {
        return Err(BdevError::Invalid("base_bdevs is empty".into()));
    }
    if o.base_bdevs.len() > superblock::MAX_SLOTS {
        return Err(BdevError::Invalid(format!(
            "at most {} base bdevs",
            superblock::MAX_SLOTS
        )));
    }
    if o.level == Level::Raid1 && o.base_bdevs.len() < 2 {
        return Err(BdevError::Invalid(
            "raid1 needs at least 2 base bdevs".into(),
        ));
    }
    if o.name.len() > superblock::NAME_BYTES {
        return Err(BdevError::Invalid(format!(
            "name longer than {} bytes",
            superblock::NAME_BYTES
        )));
    }
    for (i, b) in o.base_bdevs.iter().enumerate() {
        if o.base_bdevs[..i].contains(b) {
            return Err(BdevError::Invalid(format!("base bdev {b} named twice")));
        }
    }
    if find(&o.name).is_some() {
        return Err(BdevError::Exists(o.name.clone()));
    }
    let reservation = registry::reserve(&o.name)?;
    let mut descs = Vec::with_capacity(o.base_bdevs.len());
    for b in &o.base_bdevs {
        descs.push(open_member(b, &o.name)?);
    }
    let bases: Vec<BdevHandle> = descs.iter().map(|d| d.bdev().clone()).collect();
    for (i, b) in bases.iter().enumerate() {
        if bases[..i].iter().any(|x| x.id() == b.id()) {
            return Err(BdevError::Invalid(format!(
                "base bdev {} named twice",
                b.name()
            )));
        }
    }
    let (strip, bs, data_offset, data_size, raid_blocks) = geometry(&o, &bases)?;
    let uuid = o.uuid.unwrap_or_else(Uuid::new_v4);
    let members: Vec<Member> = descs
        .into_iter()
        .map(|d| {
            let b = d.bdev().clone();
            Member {
                name: b.name().to_string(),
                uuid: Some(b.uuid()),
                bdev: Some(b),
                desc: Some(d),
                data_offset,
                data_size,
            }
        })
        .collect();
    let (states, slots) = RaidShared::new_states(members.len(), MemberState::Operational);
    let shared = Arc::new(RaidShared {
        name: o.name.clone(),
        uuid,
        level: o.level,
        strip_size_blocks: strip,
        block_size: bs,
        num_blocks: raid_blocks,
        data_offset,
        data_size,
        superblock: o.superblock,
        members: Mutex::new(members),
        states,
        slots,
        generation: AtomicU64::new(1),
        rebuild: RebuildProgress::default(),
        seq: AtomicU64::new(0),
        // Set by the superblock write below.
        durable: AtomicU64::new(0),
    });
    if o.superblock {
        // Both copies at creation, so either is valid from the start.
        write_superblock(&shared, true).await?;
    }
    with_raids(|r| {
        r.insert(
            o.name.clone(),
            RaidEntry {
                shared: shared.clone(),
                online: false,
            },
        )
    });
    match register(reservation, &shared).await {
        Ok(()) => Ok(o.name),
        Err(e) => {
            release_members(&shared);
            with_raids(|r| r.remove(&o.name));
            Err(e)
        }
    }
}

/// Registers an assembled RAID as a bdev.
async fn register(reservation: registry::NameReservation, shared: &Arc<RaidShared>) -> Result<()> {
    // Data the members need aligned is bounced once, here, rather than by
    // every member a mirror write reaches.
    let required_alignment = shared
        .members
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|m| m.bdev.as_ref())
        .map(|b| b.io_requirements().required_alignment)
        .max()
        .unwrap_or(0);
    let props = BdevProps::new(
        shared.name.clone(),
        shared.uuid,
        shared.block_size,
        shared.num_blocks,
    )
    .with_io(crate::bdev::IoRequirements {
        required_alignment,
        ..Default::default()
    });
    // Marked online first: the bdev's own examine may look it up.
    with_raids(|r| {
        if let Some(e) = r.get_mut(&shared.name) {
            e.online = true;
        }
    });
    match registry::register(
        reservation,
        props,
        Box::new(RaidBdev {
            shared: shared.clone(),
        }),
    )
    .await
    {
        Ok(_) => {
            log::info!(
                "raid {}: online, {} of {} members operational",
                shared.name,
                shared.operational(),
                shared.num_slots()
            );
            Ok(())
        }
        Err(e) => {
            with_raids(|r| {
                if let Some(e) = r.get_mut(&shared.name) {
                    e.online = false;
                }
            });
            Err(e)
        }
    }
}

/// Writes the current superblock (next sequence number) to every member
/// that has a bdev and is not failed; `both`: to both copies. Serialised
/// per RAID. A member that fails the write is marked failed, and the round
/// is repeated so the superblock on the others records that too. After
/// each round on disk, [`RaidShared::durable`] is published (releasing the
/// raid1 writes that waited for it); Err, with writes waiting for it
/// failed, when no member takes it.
pub(crate) async fn write_superblock(shared: &Arc<RaidShared>, both: bool) -> Result<()> {
    if !shared.superblock {
        return Ok(());
    }
    let lock = SB_LOCKS.with(|l| {
        l.borrow_mut()
            .entry(shared.name.clone())
            .or_insert_with(|| Rc::new(reactor::AsyncLock::default()))
            .clone()
    });
    let _guard = lock.lock().await;
    // Each round that loses a member takes one target away: bounded.
    for _ in 0..=superblock::MAX_SLOTS {
        let (wrote, failed, sb) = superblock_round(shared, both).await;
        if wrote > 0 {
            shared.publish_durable(current_mask(&sb));
        }
        if failed == 0 && wrote > 0 {
            return Ok(());
        }
        if wrote == 0 && failed == 0 {
            break;
        }
    }
    log::warn!(
        "raid {}: no member took the superblock; writes waiting for it fail",
        shared.name
    );
    shared.durable_lost();
    Err(BdevError::Io)
}

/// One superblock write to every member in service: (members written,
/// members that failed the write and are now marked failed, what was
/// written).
async fn superblock_round(shared: &Arc<RaidShared>, both: bool) -> (usize, usize, RaidSuperblock) {
    let seq = shared.seq.fetch_add(1, Ordering::AcqRel) + 1;
    let mut sb = shared.superblock_now(seq);
    let targets: Vec<(usize, BdevHandle)> = {
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                matches!(
                    shared.state(*i),
                    MemberState::Operational | MemberState::Rebuilding
                )
            })
            .filter_map(|(i, m)| m.bdev.clone().map(|b| (i, b)))
            .collect()
    };
    let (mut wrote, mut failed) = (0, 0);
    for (slot, b) in targets {
        let cb = superblock::copy_bytes(b.block_size());
        sb.own_slot = Some(slot as u8);
        let buf = {
            let mut v = vec![0u8; cb as usize];
            v[..superblock::SB_BYTES].copy_from_slice(&sb.encode());
            v
        };
        let per = cb / b.block_size() as u64;
        let copies: Vec<u64> = if both {
            vec![0, per]
        } else {
            vec![sb.copy() as u64 * per]
        };
        let ch = b.get_channel();
        let mut ok = true;
        for at in copies {
            if ch.write(at, &buf).await.is_err() {
                ok = false;
            }
        }
        if ok
            && ch.command(IoType::Flush, 0, 0).await.is_err()
            && b.io_type_supported(IoType::Flush)
        {
            ok = false;
        }
        if ok {
            wrote += 1;
        } else {
            log::warn!(
                "raid {}: superblock write to {} failed; member marked failed",
                shared.name,
                b.name()
            );
            shared.set_state(slot, MemberState::Failed);
            failed += 1;
        }
    }
    sb.own_slot = None;
    (wrote, failed, sb)
}

/// Erases the superblock copies on every present member, so a deleted RAID
/// does not reassemble at the next start. Best effort: a member that fails
/// the write keeps its (now orphaned) superblock.
pub(crate) async fn wipe_superblocks(shared: &Arc<RaidShared>) {
    if !shared.superblock {
        return;
    }
    let bdevs: Vec<BdevHandle> = {
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members.iter().filter_map(|m| m.bdev.clone()).collect()
    };
    for b in bdevs {
        let bytes = 2 * superblock::copy_bytes(b.block_size());
        if let Err(e) = b.get_channel().write(0, &vec![0u8; bytes as usize]).await {
            log::warn!(
                "raid {}: wiping the superblock on {}: {e}",
                shared.name,
                b.name()
            );
        }
    }
}

/// Takes a member out of a raid1 (`bdev_raid_remove_base_bdev` or hot
/// remove): its slot becomes missing, its claim is released, the
/// superblock on the others records it. Refuses to remove the last
/// operational member (unless the bdev is already going: `forced`).
pub(crate) async fn remove_member(
    shared: &Arc<RaidShared>,
    base: &str,
    forced: bool,
) -> Result<()> {
    let slot = {
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members.iter().position(|m| {
            m.bdev.is_some() && (m.name == base || m.uuid.is_some_and(|u| u.to_string() == base))
        })
    };
    let Some(slot) = slot else {
        return Err(BdevError::NoDevice(format!(
            "{base} is not a member of raid {}",
            shared.name
        )));
    };
    if shared.level != Level::Raid1 {
        return Err(BdevError::Invalid(format!(
            "cannot remove a member of {} {}",
            shared.level.as_str(),
            shared.name
        )));
    }
    let st = shared.state(slot);
    if st == MemberState::Operational && shared.operational() <= 1 && !forced {
        return Err(BdevError::Busy(format!(
            "{base} is the last operational member of {}",
            shared.name
        )));
    }
    if st == MemberState::Rebuilding {
        rebuild::cancel(&shared.name).await;
    }
    shared.set_state(slot, MemberState::Missing);
    let desc = {
        let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        let m = &mut members[slot];
        m.bdev = None;
        m.desc.take()
    };
    drop(desc);
    log::info!(
        "raid {}: member {base} removed from slot {slot}",
        shared.name
    );
    if shared.operational() == 0 {
        // Nothing left to serve from: the RAID goes, and writes waiting
        // for a superblock fail (there is no member left to take one).
        shared.durable_lost();
        let online = with_raids(|r| r.get(&shared.name).is_some_and(|e| e.online));
        if online {
            let _ = registry::unregister(&shared.name, Some(MODULE)).await;
        }
        return Ok(());
    }
    let _ = write_superblock(shared, false).await;
    Ok(())
}

/// Puts `base` into slot `slot` of raid1 `shared` and rebuilds it from the
/// operational members.
pub(crate) async fn add_member(
    shared: &Arc<RaidShared>,
    base: &BdevHandle,
    slot: usize,
) -> Result<()> {
    if shared.level != Level::Raid1 {
        return Err(BdevError::Invalid(format!(
            "{} {} cannot take a member at run time",
            shared.level.as_str(),
            shared.name
        )));
    }
    if shared.state(slot) != MemberState::Missing && shared.state(slot) != MemberState::Failed {
        return Err(BdevError::Busy(format!(
            "slot {slot} of {} is in use",
            shared.name
        )));
    }
    if shared.rebuild.active.load(Ordering::Acquire) {
        return Err(BdevError::Busy(format!(
            "raid {} is already rebuilding a member",
            shared.name
        )));
    }
    let desc = open_member_handle(base, &shared.name)?;
    let b = desc.bdev().clone();
    let (data_offset, data_size) = {
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        let m = members
            .iter()
            .find(|m| m.bdev.is_some())
            .or(members.first())
            .ok_or_else(|| BdevError::Invalid("no members".into()))?;
        (m.data_offset, m.data_size)
    };
    if b.block_size() != shared.block_size {
        return Err(BdevError::Invalid(format!(
            "base bdev {} has block size {}, raid {} has {}",
            b.name(),
            b.block_size(),
            shared.name,
            shared.block_size
        )));
    }
    if b.num_blocks() < data_offset + data_size {
        return Err(BdevError::Invalid(format!(
            "base bdev {} is smaller than the RAID's members ({} blocks)",
            b.name(),
            data_offset + data_size
        )));
    }
    {
        let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        let m = members
            .get_mut(slot)
            .ok_or_else(|| BdevError::Invalid(format!("no slot {slot}")))?;
        m.name = b.name().to_string();
        m.uuid = Some(b.uuid());
        m.bdev = Some(b);
        m.desc = Some(desc);
        m.data_offset = data_offset;
        m.data_size = data_size;
    }
    shared.set_state(slot, MemberState::Rebuilding);
    // The new member carries the RAID's superblock (both copies: whatever
    // it held before must not outrank it) before any data, so a crash
    // mid-rebuild leaves it recognisably stale.
    write_superblock(shared, true).await?;
    rebuild::start(shared.clone(), slot);
    Ok(())
}

/// `bdev_raid_grow_base_bdev`: a raid1 gains a member in a new slot,
/// rebuilt from the others.
pub(crate) async fn grow(shared: &Arc<RaidShared>, base: &BdevHandle) -> Result<()> {
    if shared.level != Level::Raid1 {
        return Err(BdevError::Invalid(format!(
            "growing the members of {} {} is not supported",
            shared.level.as_str(),
            shared.name
        )));
    }
    let slot = shared.num_slots();
    if slot >= superblock::MAX_SLOTS {
        return Err(BdevError::Invalid(format!(
            "raid {} has the most members a RAID may have",
            shared.name
        )));
    }
    {
        let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members.push(Member {
            name: base.name().to_string(),
            uuid: None,
            bdev: None,
            desc: None,
            data_offset: shared.data_offset,
            data_size: shared.data_size,
        });
    }
    shared.slots.store(slot + 1, Ordering::Release);
    if let Err(e) = add_member(shared, base, slot).await {
        let mut members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        members.pop();
        shared.slots.store(slot, Ordering::Release);
        return Err(e);
    }
    Ok(())
}
