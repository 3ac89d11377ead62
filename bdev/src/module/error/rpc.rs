//! `bdev_error_create`, `bdev_error_delete`, `bdev_error_inject_error`.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{ErrorBdev, ErrorKind, ErrorOptions, ErrorRules, Injection, MODULE};
use crate::bdev::BdevProps;
use crate::error::{BdevError, Result};
use crate::io::IoType;
use crate::registry;
use crate::rpc::{RpcError, RpcTable, StateMask};

#[derive(Debug, Deserialize)]
pub struct CreateParams {
    pub base_name: String,
    pub uuid: Option<Uuid>,
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct InjectParams {
    pub name: String,
    pub io_type: String,
    pub error_type: String,
    #[serde(default = "one")]
    pub num: u32,
    #[serde(default)]
    pub queue_depth: u64,
    #[serde(default)]
    pub corrupt_offset: u64,
    #[serde(default)]
    pub corrupt_value: u8,
    pub nvme_sct: Option<i32>,
    pub nvme_sc: Option<i32>,
}

fn one() -> u32 {
    1
}

/// Creates `EE_<base>` over `base_name`, claiming the base; returns the
/// new bdev's name. Removed with its base.
pub async fn create(o: ErrorOptions) -> Result<String> {
    let name = format!("EE_{}", o.base_name);
    let reservation = registry::reserve(&name)?;
    let desc = registry::open_base(&o.base_name, &name, MODULE)?;
    let base = desc.bdev().clone();
    let uuid = o.uuid.unwrap_or_else(|| derived_uuid(base.uuid()));
    let props = BdevProps::new(name, uuid, base.block_size(), base.num_blocks());
    let bdev = ErrorBdev {
        base_name: o.base_name,
        uuid_given: o.uuid,
        base_bdev: base,
        base: Mutex::new(Some(desc)),
        rules: Arc::new(ErrorRules::default()),
    };
    let handle = registry::register(reservation, props, Box::new(bdev)).await?;
    Ok(handle.name().to_string())
}

/// SPDK saves an error bdev's UUID only when the user gave one, so an
/// unnamed one must come back the same from its base: derive it from the
/// base's UUID (a fixed byte mix, then marked as a v4-format UUID).
fn derived_uuid(base: Uuid) -> Uuid {
    let mut b = *base.as_bytes();
    for (i, x) in b.iter_mut().enumerate() {
        *x ^= 0xee ^ (i as u8).wrapping_mul(0x3b);
    }
    uuid::Builder::from_random_bytes(b).into_uuid()
}

fn parse_injection(p: &InjectParams) -> std::result::Result<Injection, RpcError> {
    let io_types = match p.io_type.as_str() {
        "clear" => None,
        "all" => Some(vec![
            IoType::Read,
            IoType::Write,
            IoType::Unmap,
            IoType::Flush,
        ]),
        "read" => Some(vec![IoType::Read]),
        "write" => Some(vec![IoType::Write]),
        "unmap" => Some(vec![IoType::Unmap]),
        "flush" => Some(vec![IoType::Flush]),
        other => {
            return Err(RpcError::invalid_params(format!(
                "Invalid parameters: io_type {other:?} is not one of read, write, unmap, flush, all, clear"
            )))
        }
    };
    let kind = ErrorKind::parse(&p.error_type).ok_or_else(|| {
        RpcError::invalid_params(format!(
            "Invalid parameters: error_type {:?} is not one of failure, pending, corrupt_data, nomem",
            p.error_type
        ))
    })?;
    if kind == ErrorKind::CorruptData && p.corrupt_value == 0 && io_types.is_some() {
        return Err(
            BdevError::Invalid("corrupt_value must be nonzero for corrupt_data".into()).into(),
        );
    }
    Ok(Injection {
        io_types,
        kind,
        num: p.num,
        queue_depth: p.queue_depth,
        corrupt_offset: p.corrupt_offset,
        corrupt_value: p.corrupt_value,
    })
}

pub fn register(table: &mut RpcTable) {
    table.register_with(
        "bdev_error_create",
        StateMask::RUNTIME,
        |p: CreateParams| async move {
            create(ErrorOptions {
                base_name: p.base_name,
                uuid: p.uuid,
            })
            .await?;
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_error_delete",
        StateMask::RUNTIME,
        |p: DeleteParams| async move {
            registry::unregister(&p.name, Some(MODULE)).await?;
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_error_inject_error",
        StateMask::RUNTIME,
        |p: InjectParams| async move {
            let inj = parse_injection(&p)?;
            let bdev =
                registry::lookup(&p.name).ok_or_else(|| BdevError::NoDevice(p.name.clone()))?;
            let eb = bdev
                .downcast::<ErrorBdev>()
                .ok_or_else(|| BdevError::NoDevice(p.name.clone()))?;
            eb.rules().inject(&inj);
            Ok(json!(true))
        },
    );
}
