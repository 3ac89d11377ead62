//! The bdev modules. Each folder is one module: its device, its RPC
//! methods (`rpc.rs`) and its tests.

pub mod delay;
pub mod error;
pub mod lvol;
pub mod malloc;
pub mod null;
pub mod raid;
pub mod uring;

use crate::error::{BdevError, Result};
use crate::rpc::RpcTable;

/// SPDK's geometry rules for bdevs made from parameters (malloc, null):
/// block sizes are multiples of 512, at least one block.
pub(crate) fn check_geometry(
    block_size: u32,
    physical_block_size: u32,
    num_blocks: u64,
) -> Result<()> {
    if block_size == 0 || !block_size.is_multiple_of(512) {
        return Err(BdevError::Invalid(format!(
            "block_size {block_size} is not a multiple of 512"
        )));
    }
    if !physical_block_size.is_multiple_of(512) {
        return Err(BdevError::Invalid(format!(
            "physical_block_size {physical_block_size} is not a multiple of 512"
        )));
    }
    if num_blocks == 0 {
        return Err(BdevError::Invalid("Disk must be more than 0 blocks".into()));
    }
    Ok(())
}

/// Registers every module's RPC methods.
pub fn register_rpcs(table: &mut RpcTable) {
    malloc::rpc::register(table);
    null::rpc::register(table);
    delay::rpc::register(table);
    error::rpc::register(table);
    uring::rpc::register(table);
    raid::rpc::register(table);
    lvol::rpc::register(table);
}
