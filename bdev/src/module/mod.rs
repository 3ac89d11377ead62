//! The bdev modules. Each folder is one module: its device, its RPC
//! methods (`rpc.rs`) and its tests.

pub mod delay;
pub mod error;
pub mod malloc;
pub mod null;
pub mod uring;

use crate::rpc::RpcTable;

/// Registers every module's RPC methods.
pub fn register_rpcs(table: &mut RpcTable) {
    malloc::rpc::register(table);
    null::rpc::register(table);
    delay::rpc::register(table);
    error::rpc::register(table);
    uring::rpc::register(table);
}
