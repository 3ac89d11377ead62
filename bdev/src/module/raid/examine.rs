//! Reassembling RAIDs from their members' superblocks (SPEC §4): the raid
//! module's examine hook reads every new bdev's superblock copies; a
//! member of a RAID that is not online joins its assembly, and the RAID
//! registers once every member the newest superblock calls current is
//! present. A raid1 missing some waits [`super::DEGRADED_GRACE`], then
//! comes up degraded. A member that arrives after the RAID is online, or
//! that the newest superblock calls stale, is rebuilt.
//!
//! The newest superblock decides, whichever member is found first: a
//! member that lost raid1 writes is recorded failed on the survivors
//! before any of those writes is acknowledged (`channel.rs`), so its own,
//! older superblock calling itself current never outranks that record.
//!
//! While an assembly waits, it holds the RAID's name reservation, so
//! `bdev_wait_for_examine` does not return before the RAID is registered
//! (or given up: a raid0/concat missing a member stays configuring).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use uuid::Uuid;

use super::superblock::{self, Level, RaidSuperblock, SlotState};
use super::{Member, MemberState, RaidEntry, RaidShared, RebuildProgress, MODULE};
use crate::bdev::BdevHandle;
use crate::registry::{self, Descriptor, NameReservation};

/// A RAID being put together from its members.
struct Assembly {
    /// The newest superblock seen among its members.
    auth: RaidSuperblock,
    /// Per slot: the member found, with the sequence number it carried.
    found: Vec<Option<(Descriptor, u64)>>,
    reservation: Option<NameReservation>,
    grace_started: bool,
}

/// How often a returned member waiting for another member's rebuild to
/// end looks again (control path; rebuilds take seconds).
const REBUILD_QUEUE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

thread_local! {
    static ASSEMBLIES: RefCell<BTreeMap<Uuid, Assembly>> = const { RefCell::new(BTreeMap::new()) };
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// Installs the examine hook (once, on the main reactor).
pub fn install() {
    if INSTALLED.with(|i| i.replace(true)) {
        return;
    }
    registry::register_examine(MODULE, |b| Box::pin(examine(b)));
}

/// Reads `b`'s superblock copies; the newest valid one, if any.
async fn read_superblock(b: &BdevHandle) -> Option<RaidSuperblock> {
    let bs = b.block_size() as u64;
    let per = superblock::copy_bytes(b.block_size()) / bs;
    if b.num_blocks() < 2 * per + 1 {
        return None;
    }
    let data = b.get_channel().read(0, 2 * per).await.ok()?;
    let (a, c) = data.split_at((per * bs) as usize);
    RaidSuperblock::newest([a, c])
}

async fn examine(b: BdevHandle) {
    if b.module() == MODULE {
        return;
    }
    let Some(sb) = read_superblock(&b).await else {
        return;
    };
    let Some(slot) = sb.slot_of(b.uuid()) else {
        log::warn!(
            "raid {}: {} carries its superblock but no slot of it names {}",
            sb.name,
            b.name(),
            b.uuid()
        );
        return;
    };
    log::info!(
        "raid {}: found member {} (slot {slot}, superblock seq {})",
        sb.name,
        b.name(),
        sb.seq
    );
    // Online already: a returning member, rebuilt.
    if let Some(shared) = super::find(&sb.name) {
        if shared.uuid != sb.raid_uuid {
            log::warn!(
                "raid {}: {} belongs to another RAID of that name ({})",
                sb.name,
                b.name(),
                sb.raid_uuid
            );
            return;
        }
        let online = super::with_raids(|r| r.get(&sb.name).is_some_and(|e| e.online));
        let free = {
            let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
            members.get(slot).is_some_and(|m| m.bdev.is_none())
        };
        if online && free && shared.level == Level::Raid1 {
            // One rebuild at a time: a member that returns while another
            // is rebuilt waits for its turn (in the background, so examine
            // is not held up), then is rebuilt too.
            if shared.rebuilding() {
                let (shared, b, name) = (shared.clone(), b.clone(), sb.name.clone());
                reactor::spawn_local(async move {
                    while shared.rebuilding() {
                        reactor::sleep(REBUILD_QUEUE_POLL).await;
                    }
                    if b.is_removed() || super::with_raids(|r| r.get(&name).is_none()) {
                        return;
                    }
                    if let Err(e) = super::add_member(&shared, &b, slot).await {
                        log::warn!("raid {name}: re-adding {}: {e}", b.name());
                    }
                });
                return;
            }
            if let Err(e) = super::add_member(&shared, &b, slot).await {
                log::warn!("raid {}: re-adding {}: {e}", sb.name, b.name());
            }
        }
        return;
    }
    let desc = match super::open_member_handle(&b, &sb.name) {
        Ok(d) => d,
        Err(e) => {
            log::warn!("raid {}: cannot claim member {}: {e}", sb.name, b.name());
            return;
        }
    };
    let start_grace = ASSEMBLIES.with(|a| {
        let mut all = a.borrow_mut();
        let asm = all.entry(sb.raid_uuid).or_insert_with(|| Assembly {
            found: (0..sb.slots.len()).map(|_| None).collect(),
            reservation: None,
            grace_started: false,
            auth: sb.clone(),
        });
        if sb.seq > asm.auth.seq && sb.slots.len() >= asm.auth.slots.len() {
            // Newer, possibly grown since (`bdev_raid_grow_base_bdev`).
            asm.found.resize_with(sb.slots.len(), || None);
            asm.auth = sb.clone();
        }
        if let Some(f) = asm.found.get_mut(slot) {
            *f = Some((desc, sb.seq));
        }
        if asm.reservation.is_none() {
            match registry::reserve(&asm.auth.name) {
                Ok(r) => asm.reservation = Some(r),
                Err(e) => log::warn!("raid {}: {e}", asm.auth.name),
            }
        }
        !std::mem::replace(&mut asm.grace_started, true)
    });
    if try_online(sb.raid_uuid, false).await {
        return;
    }
    if start_grace {
        let uuid = sb.raid_uuid;
        reactor::spawn_local(async move {
            reactor::sleep(super::DEGRADED_GRACE).await;
            try_online(uuid, true).await;
        });
    }
}

/// Brings assembly `uuid` online if complete (or, `degraded`, if a raid1
/// has any current member); gives up a degraded raid0/concat. Returns
/// whether the assembly is finished.
async fn try_online(uuid: Uuid, degraded: bool) -> bool {
    let ready = ASSEMBLIES.with(|a| {
        let all = a.borrow();
        let asm = all.get(&uuid)?;
        let current =
            |i: usize| asm.auth.slots[i].state == SlotState::Configured && asm.found[i].is_some();
        let needed = (0..asm.found.len())
            .all(|i| asm.auth.slots[i].state != SlotState::Configured || asm.found[i].is_some());
        let any = (0..asm.found.len()).any(current);
        Some((needed, any, asm.auth.level))
    });
    let Some((complete, any_current, level)) = ready else {
        return true;
    };
    let go = complete || (degraded && any_current && level == Level::Raid1);
    if !go {
        if degraded {
            // A raid0/concat cannot run without a member: release the name
            // (so waiting stops) and stay configuring.
            ASSEMBLIES.with(|a| {
                if let Some(asm) = a.borrow_mut().get_mut(&uuid) {
                    if asm.reservation.take().is_some() {
                        log::warn!(
                            "raid {}: members missing; staying configuring",
                            asm.auth.name
                        );
                    }
                }
            });
        }
        return false;
    }
    let Some(asm) = ASSEMBLIES.with(|a| a.borrow_mut().remove(&uuid)) else {
        return true;
    };
    online(asm).await;
    true
}

async fn online(mut asm: Assembly) {
    let sb = asm.auth.clone();
    let Some(reservation) = asm.reservation.take() else {
        log::warn!("raid {}: name taken; not assembled", sb.name);
        return;
    };
    let n = sb.slots.len();
    let mut stale = Vec::new();
    let mut members = Vec::with_capacity(n);
    let (states, slots) = RaidShared::new_states(n, MemberState::Missing);
    for (i, rec) in sb.slots.iter().enumerate() {
        let found = asm.found[i].take();
        let current = rec.state == SlotState::Configured && found.is_some();
        let (bdev, desc) = match found {
            Some((d, _)) if current => (Some(d.bdev().clone()), Some(d)),
            Some((d, _)) => {
                // Stale (failed or mid-rebuild when recorded): rebuilt
                // once the RAID is online.
                stale.push((i, d));
                (None, None)
            }
            None => (None, None),
        };
        if current {
            states[i].store(MemberState::Operational as u8, Ordering::Release);
        }
        members.push(Member {
            name: bdev
                .as_ref()
                .map_or_else(|| rec.member_uuid.to_string(), |b| b.name().to_string()),
            // The member's UUID now (a re-created bdev may have a new one).
            uuid: Some(bdev.as_ref().map_or(rec.member_uuid, |b| b.uuid())),
            bdev,
            desc,
            data_offset: rec.data_offset,
            data_size: rec.data_size,
        });
    }
    let first = &sb.slots[0];
    let shared = Arc::new(RaidShared {
        name: sb.name.clone(),
        uuid: sb.raid_uuid,
        level: sb.level,
        strip_size_blocks: sb.strip_size_blocks,
        block_size: sb.block_size,
        num_blocks: sb.raid_num_blocks,
        data_offset: first.data_offset,
        data_size: first.data_size,
        superblock: true,
        members: Mutex::new(members),
        states,
        slots,
        generation: AtomicU64::new(1),
        rebuild: RebuildProgress::default(),
        seq: AtomicU64::new(sb.seq),
        // What the newest superblock on disk says, missing members
        // included until the write below records them.
        durable: AtomicU64::new(super::current_mask(&sb)),
    });
    super::with_raids(|r| {
        r.insert(
            sb.name.clone(),
            RaidEntry {
                shared: shared.clone(),
                online: false,
            },
        )
    });
    let degraded = shared.operational() < n;
    if degraded {
        // Record who is missing before serving writes they will not see.
        let _ = super::write_superblock(&shared, false).await;
    }
    if let Err(e) = super::register(reservation, &shared).await {
        log::warn!("raid {}: register: {e}", sb.name);
        super::release_members(&shared);
        super::with_raids(|r| r.remove(&sb.name));
        return;
    }
    for (slot, desc) in stale {
        let b = desc.bdev().clone();
        // Re-opened (and re-claimed) by add_member.
        drop(desc);
        if let Err(e) = super::add_member(&shared, &b, slot).await {
            log::warn!("raid {}: rebuilding stale {}: {e}", sb.name, b.name());
        }
    }
}

/// `bdev_raid_get_bdevs` entries of RAIDs still assembling.
pub fn configuring_json() -> Vec<Value> {
    ASSEMBLIES.with(|a| {
        a.borrow()
            .values()
            .map(|asm| {
                let sb = &asm.auth;
                let list: Vec<Value> = sb
                    .slots
                    .iter()
                    .zip(&asm.found)
                    .map(|(rec, f)| {
                        json!({
                            "name": f.as_ref().map(|(d, _)| d.bdev().name().to_string()),
                            "uuid": rec.member_uuid.hyphenated().to_string(),
                            "is_configured": f.is_some(),
                            "data_offset": rec.data_offset,
                            "data_size": rec.data_size,
                        })
                    })
                    .collect();
                json!({
                    "name": sb.name,
                    "uuid": sb.raid_uuid.hyphenated().to_string(),
                    "strip_size_kb": sb.strip_size_blocks as u64 * sb.block_size as u64 / 1024,
                    "state": "configuring",
                    "raid_level": sb.level.as_str(),
                    "superblock": true,
                    "num_base_bdevs": sb.slots.len(),
                    "num_base_bdevs_discovered": asm.found.iter().filter(|f| f.is_some()).count(),
                    "num_base_bdevs_operational": 0,
                    "base_bdevs_list": list,
                })
            })
            .collect()
    })
}

/// Deletes a RAID still assembling (`bdev_raid_delete` of a configuring
/// one): releases its members and name.
pub fn forget(name: &str) -> bool {
    ASSEMBLIES.with(|a| {
        let mut all = a.borrow_mut();
        let key = all
            .iter()
            .find(|(_, asm)| asm.auth.name == name)
            .map(|(k, _)| *k);
        key.and_then(|k| all.remove(&k)).is_some()
    })
}
