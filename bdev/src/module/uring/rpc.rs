//! `bdev_uring_create|delete` and `bdev_aio_create|delete` (same module).

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{CreatedBy, UringBdev, UringOptions, MODULE};
use crate::error::Result;
use crate::registry;
use crate::rpc::{RpcTable, StateMask};

#[derive(Debug, Deserialize)]
pub struct UringCreateParams {
    pub name: String,
    pub filename: PathBuf,
    #[serde(default)]
    pub block_size: u32,
    pub uuid: Option<Uuid>,
}

#[derive(Debug, Deserialize)]
pub struct AioCreateParams {
    pub name: String,
    pub filename: PathBuf,
    #[serde(default)]
    pub block_size: u32,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    #[allow(dead_code)] // accepted: unmap is always a punched hole here
    pub fallocate: bool,
    pub uuid: Option<Uuid>,
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pub name: String,
}

/// Opens the file, checks it, and registers the bdev; returns its name.
pub async fn create(o: UringOptions) -> Result<String> {
    let reservation = registry::reserve(&o.name)?;
    let bdev = UringBdev::open(o)?;
    let props = bdev.props();
    let handle = registry::register(reservation, props, Box::new(bdev)).await?;
    Ok(handle.name().to_string())
}

pub fn register(table: &mut RpcTable) {
    table.register_with(
        "bdev_uring_create",
        StateMask::RUNTIME,
        |p: UringCreateParams| async move {
            let name = create(UringOptions {
                name: p.name,
                filename: p.filename,
                block_size: p.block_size,
                uuid: p.uuid,
                readonly: false,
                created_by: CreatedBy::Uring,
            })
            .await?;
            Ok(json!(name))
        },
    );
    table.register_with(
        "bdev_aio_create",
        StateMask::RUNTIME,
        |p: AioCreateParams| async move {
            let name = create(UringOptions {
                name: p.name,
                filename: p.filename,
                block_size: p.block_size,
                uuid: p.uuid,
                readonly: p.readonly,
                created_by: CreatedBy::Aio,
            })
            .await?;
            Ok(json!(name))
        },
    );
    for method in ["bdev_uring_delete", "bdev_aio_delete"] {
        table.register_with(method, StateMask::RUNTIME, |p: DeleteParams| async move {
            registry::unregister(&p.name, Some(MODULE)).await?;
            Ok(json!(true))
        });
    }
}
