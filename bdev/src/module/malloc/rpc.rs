//! `bdev_malloc_create` and `bdev_malloc_delete`.

use std::cell::Cell;

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{MallocBdev, MallocOptions, MODULE};
use crate::error::{BdevError, Result};
use crate::registry;
use crate::rpc::{RpcError, RpcTable, StateMask};

#[derive(Debug, Deserialize)]
pub struct CreateParams {
    pub name: Option<String>,
    pub uuid: Option<Uuid>,
    pub num_blocks: u64,
    pub block_size: u32,
    #[serde(default)]
    pub physical_block_size: u32,
    #[serde(default)]
    pub optimal_io_boundary: u32,
    #[serde(default)]
    pub md_size: u32,
    #[serde(default)]
    pub md_interleave: bool,
    #[serde(default)]
    pub dif_type: i32,
    #[serde(default)]
    pub dif_is_head_of_md: bool,
    #[serde(default)]
    pub dif_pi_format: u32,
    pub numa_id: Option<i32>,
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pub name: String,
}

thread_local! {
    /// SPDK names unnamed malloc bdevs `Malloc<N>` from a process counter.
    static NEXT_AUTO_NAME: Cell<u32> = const { Cell::new(0) };
}

fn auto_name() -> String {
    loop {
        let n = NEXT_AUTO_NAME.with(|c| {
            let n = c.get();
            c.set(n + 1);
            n
        });
        let name = format!("Malloc{n}");
        if registry::lookup(&name).is_none() {
            return name;
        }
    }
}

/// Creates and registers a malloc bdev; returns its name.
pub async fn create(p: CreateParams) -> Result<String> {
    if p.md_size != 0 || p.dif_type != 0 {
        return Err(BdevError::Invalid(
            "separate or interleaved metadata (md_size, dif_type) is not supported".into(),
        ));
    }
    if p.numa_id.is_some_and(|n| n != -1 && n != 0) {
        return Err(BdevError::Invalid(format!(
            "numa_id {} does not exist",
            p.numa_id.unwrap_or_default()
        )));
    }
    let name = p.name.unwrap_or_else(auto_name);
    let reservation = registry::reserve(&name)?;
    let bdev = MallocBdev::new(MallocOptions {
        name,
        uuid: p.uuid.unwrap_or_else(Uuid::new_v4),
        num_blocks: p.num_blocks,
        block_size: p.block_size,
        physical_block_size: p.physical_block_size,
        optimal_io_boundary: p.optimal_io_boundary,
    })?;
    let props = bdev.props();
    let handle = registry::register(reservation, props, Box::new(bdev)).await?;
    Ok(handle.name().to_string())
}

pub fn register(table: &mut RpcTable) {
    table.register_with(
        "bdev_malloc_create",
        StateMask::RUNTIME,
        |p: CreateParams| async move { Ok::<Value, RpcError>(json!(create(p).await?)) },
    );
    table.register_with(
        "bdev_malloc_delete",
        StateMask::RUNTIME,
        |p: DeleteParams| async move {
            registry::unregister(&p.name, Some(MODULE)).await?;
            Ok(json!(true))
        },
    );
}
