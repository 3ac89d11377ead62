//! Crate `nvmf`: NVMe over TCP.
//!
//! `wire` holds the NVMe/TCP PDU formats and the NVMe command, completion,
//! fabrics and identify structures, shared by target and initiator;
//! `target` the NVMe/TCP target; `initiator` the host side; `bdev_nvme`
//! the `nvme` bdev module (its options so far).

pub mod bdev_nvme;
pub mod initiator;
pub mod target;
pub mod wire;

/// Registers the nvmf RPC methods.
pub fn register_rpcs(table: &mut bdev::rpc::RpcTable) {
    target::rpc::register(table);
    bdev_nvme::rpc::register(table);
}
