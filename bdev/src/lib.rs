//! Crate `bdev`: block devices.
//!
//! Owns the [`Bdev`] trait and per-core I/O channels, the registry and the
//! bdev lifecycle (reserve, register, examine, open, claim, unregister),
//! per-bdev I/O statistics, the JSON-RPC method table shared by every
//! crate, and the bdev modules under `module/`. Framework services every
//! module uses: LBA range locks and quiesce ([`range_lock`]), exclusive
//! and shared read-only claims ([`registry::ClaimType`]), and the
//! background job runner ([`job`]).

pub mod error;
pub mod rpc;

pub use error::{BdevError, Result};
pub mod bdev;
pub mod bdev_rpc;
pub mod buf;
pub mod channel;
pub mod config;
pub mod io;
pub mod job;
pub mod range_lock;
pub mod registry;
pub mod slab;
mod split;
pub mod stats;

pub use bdev::{Bdev, BdevHandle, BdevProps, IoRequirements, LocalFuture};
pub use buf::{BufLender, SharedBuf};
pub use channel::{BdevChannel, IoChannel};
pub use io::{BdevIo, IoBox, IoBuf, IoCompletion, IoStatus, IoType};
pub use range_lock::{LockKind, RangeLock};
pub use registry::{ClaimType, Descriptor, NameReservation};
pub mod module;
#[cfg(test)]
mod testutil;

/// Registers every bdev-layer and module RPC method.
pub fn register_rpcs(table: &mut rpc::RpcTable) {
    bdev_rpc::register(table);
    module::register_rpcs(table);
}
