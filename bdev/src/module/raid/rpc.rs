//! SPDK's RAID methods: `bdev_raid_create`, `bdev_raid_delete`,
//! `bdev_raid_get_bdevs`, `bdev_raid_add_base_bdev`,
//! `bdev_raid_remove_base_bdev`, `bdev_raid_grow_base_bdev`.

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{examine, Level, RaidOptions, MODULE};
use crate::error::BdevError;
use crate::registry;
use crate::rpc::{RpcError, RpcTable, StateMask};

/// rpc.py sends `base_bdevs` as a list; SPDK also accepts one string of
/// space-separated names.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum BaseBdevs {
    List(Vec<String>),
    Words(String),
}

impl BaseBdevs {
    fn names(self) -> Vec<String> {
        match self {
            BaseBdevs::List(v) => v,
            BaseBdevs::Words(s) => s.split_whitespace().map(String::from).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct CreateParams {
    pub name: String,
    pub raid_level: String,
    #[serde(default)]
    pub strip_size_kb: u32,
    pub base_bdevs: BaseBdevs,
    pub uuid: Option<Uuid>,
    #[serde(default)]
    pub superblock: bool,
    /// Accepted for SPDK compatibility (rpc.py's -d).
    #[serde(default)]
    pub delta_bitmap: bool,
}

#[derive(Debug, Deserialize)]
pub struct NameParams {
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pub name: String,
    /// Erase the superblock on every member (else a superblock RAID
    /// reassembles at the next start, as SPDK's).
    #[serde(default)]
    pub clear_sb: bool,
}

#[derive(Debug, Deserialize)]
pub struct SetOptionsParams {
    pub process_window_size_kb: Option<u64>,
    pub process_max_bandwidth_mb_sec: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct GetParams {
    #[serde(default = "all")]
    pub category: String,
}

fn all() -> String {
    "all".into()
}

#[derive(Debug, Deserialize)]
pub struct AddParams {
    pub base_bdev: String,
    pub raid_bdev: String,
}

#[derive(Debug, Deserialize)]
pub struct GrowParams {
    pub raid_name: String,
    pub base_name: String,
}

/// Every RAID's description, filtered by SPDK's category.
pub fn list(category: &str) -> Vec<Value> {
    let mut out: Vec<Value> = super::with_raids(|r| {
        r.values()
            .map(|e| {
                let state = if e.online { "online" } else { "configuring" };
                e.shared.info_json(state)
            })
            .collect()
    });
    out.extend(examine::configuring_json());
    out.retain(|v| category == "all" || v["state"] == category);
    out
}

pub fn register(table: &mut RpcTable) {
    examine::install();
    table.register_with(
        "bdev_raid_create",
        StateMask::RUNTIME,
        |p: CreateParams| async move {
            let level = Level::parse(&p.raid_level).ok_or_else(|| {
                RpcError::invalid_params(format!(
                    "raid_level {:?} is not one of 0, raid0, 1, raid1, concat",
                    p.raid_level
                ))
            })?;
            super::create(RaidOptions {
                name: p.name,
                level,
                strip_size_kb: p.strip_size_kb,
                base_bdevs: p.base_bdevs.names(),
                uuid: p.uuid,
                superblock: p.superblock,
            })
            .await?;
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_raid_delete",
        StateMask::RUNTIME,
        |p: DeleteParams| async move {
            if examine::forget(&p.name) {
                return Ok(json!(true));
            }
            let online = super::with_raids(|r| r.get(&p.name).map(|e| e.online));
            match online {
                Some(true) => {
                    if let Some(s) = super::find(&p.name).filter(|_| p.clear_sb) {
                        super::rebuild::cancel(&p.name).await;
                        super::wipe_superblocks(&s).await;
                    }
                    registry::unregister(&p.name, Some(MODULE)).await?
                }
                Some(false) => {
                    if let Some(s) = super::find(&p.name) {
                        super::release_members(&s);
                    }
                    super::with_raids(|r| r.remove(&p.name));
                }
                None => return Err(BdevError::NoDevice(p.name).into()),
            }
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_raid_set_options",
        StateMask::ANY,
        |p: SetOptionsParams| async move {
            if let Some(kb) = p.process_window_size_kb {
                if kb == 0 {
                    return Err(RpcError::invalid_params(
                        "process_window_size_kb must be at least 1",
                    ));
                }
                super::rebuild::set_window_kb(kb);
            }
            if let Some(mb) = p.process_max_bandwidth_mb_sec {
                super::rebuild::set_max_bandwidth_mb_s(mb);
            }
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_raid_get_bdevs",
        StateMask::RUNTIME,
        |p: GetParams| async move {
            if !matches!(
                p.category.as_str(),
                "all" | "online" | "configuring" | "offline"
            ) {
                return Err(RpcError::invalid_params(format!(
                    "category {:?} is not one of all, online, configuring, offline",
                    p.category
                )));
            }
            Ok(Value::Array(list(&p.category)))
        },
    );
    table.register_with(
        "bdev_raid_add_base_bdev",
        StateMask::RUNTIME,
        |p: AddParams| async move {
            let shared = super::find(&p.raid_bdev)
                .ok_or_else(|| BdevError::NoDevice(p.raid_bdev.clone()))?;
            let base = registry::lookup(&p.base_bdev)
                .ok_or_else(|| BdevError::NoDevice(p.base_bdev.clone()))?;
            let slot = (0..shared.num_slots())
                .find(|&i| {
                    matches!(
                        shared.state(i),
                        super::MemberState::Missing | super::MemberState::Failed
                    )
                })
                .ok_or_else(|| {
                    BdevError::Busy(format!("raid {} has no empty slot", p.raid_bdev))
                })?;
            super::add_member(&shared, &base, slot).await?;
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_raid_remove_base_bdev",
        StateMask::RUNTIME,
        |p: NameParams| async move {
            let owner = super::with_raids(|r| {
                r.values()
                    .find(|e| {
                        let m = e.shared.members.lock().unwrap_or_else(|x| x.into_inner());
                        m.iter().any(|m| m.bdev.is_some() && m.name == p.name)
                    })
                    .map(|e| e.shared.clone())
            });
            let shared = owner.ok_or_else(|| {
                BdevError::NoDevice(format!("{} is not a member of any RAID", p.name))
            })?;
            super::remove_member(&shared, &p.name, false).await?;
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_raid_grow_base_bdev",
        StateMask::RUNTIME,
        |p: GrowParams| async move {
            let shared = super::find(&p.raid_name)
                .ok_or_else(|| BdevError::NoDevice(p.raid_name.clone()))?;
            let base = registry::lookup(&p.base_name)
                .ok_or_else(|| BdevError::NoDevice(p.base_name.clone()))?;
            super::grow(&shared, &base).await?;
            Ok(json!(true))
        },
    );
}
