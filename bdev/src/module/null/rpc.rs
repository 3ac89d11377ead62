//! `bdev_null_create` and `bdev_null_delete`.

use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{NullBdev, NullOptions, MODULE};
use crate::error::{BdevError, Result};
use crate::registry;
use crate::rpc::{RpcTable, StateMask};

#[derive(Debug, Deserialize)]
pub struct CreateParams {
    pub name: String,
    pub uuid: Option<Uuid>,
    pub num_blocks: u64,
    pub block_size: u32,
    #[serde(default)]
    pub physical_block_size: u32,
    #[serde(default)]
    pub md_size: u32,
    #[serde(default)]
    pub dif_type: i32,
    #[serde(default)]
    pub dif_is_head_of_md: bool,
    #[serde(default)]
    pub dif_pi_format: u32,
    #[serde(default)]
    pub preferred_write_alignment: u32,
    #[serde(default)]
    pub preferred_write_granularity: u32,
    #[serde(default)]
    pub optimal_write_size: u32,
    #[serde(default)]
    pub preferred_unmap_alignment: u32,
    #[serde(default)]
    pub preferred_unmap_granularity: u32,
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pub name: String,
}

pub async fn create(p: CreateParams) -> Result<String> {
    if p.md_size != 0 || p.dif_type != 0 {
        return Err(BdevError::Invalid(
            "metadata (md_size, dif_type) is not supported".into(),
        ));
    }
    let reservation = registry::reserve(&p.name)?;
    let bdev = NullBdev::new(NullOptions {
        name: p.name,
        uuid: p.uuid.unwrap_or_else(Uuid::new_v4),
        num_blocks: p.num_blocks,
        block_size: p.block_size,
        physical_block_size: p.physical_block_size,
    })?;
    let props = bdev.props();
    let handle = registry::register(reservation, props, Box::new(bdev)).await?;
    Ok(handle.name().to_string())
}

pub fn register(table: &mut RpcTable) {
    table.register_with(
        "bdev_null_create",
        StateMask::RUNTIME,
        |p: CreateParams| async move { Ok(json!(create(p).await?)) },
    );
    table.register_with(
        "bdev_null_delete",
        StateMask::RUNTIME,
        |p: DeleteParams| async move {
            registry::unregister(&p.name, Some(MODULE)).await?;
            Ok(json!(true))
        },
    );
}
