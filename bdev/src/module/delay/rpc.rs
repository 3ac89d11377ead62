//! `bdev_delay_create`, `bdev_delay_delete`, `bdev_delay_update_latency`.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{DelayBdev, DelayOptions, Latencies, LatencyKind, MODULE};
use crate::bdev::BdevProps;
use crate::error::{BdevError, Result};
use crate::registry;
use crate::rpc::{RpcError, RpcTable, StateMask};

#[derive(Debug, Deserialize)]
pub struct CreateParams {
    pub name: String,
    pub base_bdev_name: String,
    pub uuid: Option<Uuid>,
    pub avg_read_latency: u64,
    pub p99_read_latency: u64,
    pub avg_write_latency: u64,
    pub p99_write_latency: u64,
    /// Ferroplane extension (tests): writes reach the base only at their
    /// deadline, as on a device whose slow writes land late.
    #[serde(default)]
    pub hold_writes: bool,
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct UpdateLatencyParams {
    pub delay_bdev_name: String,
    pub latency_type: String,
    pub latency_us: u64,
}

/// Creates a delay bdev over an existing base, claiming the base. If the
/// base goes away, the delay bdev is removed with it.
pub async fn create(o: DelayOptions) -> Result<String> {
    if o.p99_read_latency < o.avg_read_latency || o.p99_write_latency < o.avg_write_latency {
        return Err(BdevError::Invalid(
            "p99 latency is less than average latency".into(),
        ));
    }
    let reservation = registry::reserve(&o.name)?;
    let desc = registry::open_base(&o.base_bdev_name, &o.name, MODULE)?;
    let base = desc.bdev().clone();
    let uuid = o.uuid.unwrap_or_else(Uuid::new_v4);
    let bdev = DelayBdev {
        name: o.name.clone(),
        uuid,
        base_name: base.name().to_string(),
        base_bdev: base.clone(),
        base: Mutex::new(Some(desc)),
        latencies: Arc::new(Latencies::new(
            o.avg_read_latency,
            o.p99_read_latency,
            o.avg_write_latency,
            o.p99_write_latency,
        )),
        hold_writes: o.hold_writes,
    };
    let props = BdevProps::new(o.name, uuid, base.block_size(), base.num_blocks());
    let handle = registry::register(reservation, props, Box::new(bdev)).await?;
    Ok(handle.name().to_string())
}

pub fn register(table: &mut RpcTable) {
    table.register_with(
        "bdev_delay_create",
        StateMask::RUNTIME,
        |p: CreateParams| async move {
            let name = create(DelayOptions {
                name: p.name,
                base_bdev_name: p.base_bdev_name,
                uuid: p.uuid,
                avg_read_latency: p.avg_read_latency,
                p99_read_latency: p.p99_read_latency,
                avg_write_latency: p.avg_write_latency,
                p99_write_latency: p.p99_write_latency,
                hold_writes: p.hold_writes,
            })
            .await?;
            Ok(json!(name))
        },
    );
    table.register_with(
        "bdev_delay_delete",
        StateMask::RUNTIME,
        |p: DeleteParams| async move {
            registry::unregister(&p.name, Some(MODULE)).await?;
            Ok(json!(true))
        },
    );
    table.register_with(
        "bdev_delay_update_latency",
        StateMask::RUNTIME,
        |p: UpdateLatencyParams| async move {
            let kind = LatencyKind::parse(&p.latency_type).ok_or_else(|| {
                RpcError::invalid_params(format!(
                    "Please specify a valid latency type: latency_type {:?} is not one of avg_read, p99_read, avg_write, p99_write",
                    p.latency_type
                ))
            })?;
            let bdev = registry::lookup(&p.delay_bdev_name)
                .ok_or_else(|| BdevError::NoDevice(p.delay_bdev_name.clone()))?;
            let delay = bdev
                .downcast::<DelayBdev>()
                .ok_or_else(|| BdevError::NoDevice(p.delay_bdev_name.clone()))?;
            delay.latencies().set_us(kind, p.latency_us);
            Ok(json!(true))
        },
    );
}
