//! `null`: a bdev that stores nothing (SPDK's bdev_null). Writes are
//! dropped, reads leave the buffer as it is; every I/O succeeds at once.
//! It measures the framework's own per-I/O cost.

pub mod rpc;
#[cfg(test)]
mod tests;

use std::rc::Rc;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::bdev::{Bdev, BdevProps};
use crate::channel::BdevChannel;
use crate::error::Result;
use crate::io::{IoBox, IoStatus, IoType};

pub const MODULE: &str = "null";

#[derive(Debug, Clone)]
pub struct NullOptions {
    pub name: String,
    pub uuid: Uuid,
    pub num_blocks: u64,
    pub block_size: u32,
    pub physical_block_size: u32,
}

pub struct NullBdev {
    opts: NullOptions,
}

impl NullBdev {
    pub fn new(opts: NullOptions) -> Result<NullBdev> {
        super::check_geometry(opts.block_size, opts.physical_block_size, opts.num_blocks)?;
        Ok(NullBdev { opts })
    }

    pub fn props(&self) -> BdevProps {
        BdevProps::new(
            self.opts.name.clone(),
            self.opts.uuid,
            self.opts.block_size,
            self.opts.num_blocks,
        )
    }
}

impl Bdev for NullBdev {
    fn module(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "Null disk"
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        matches!(
            io_type,
            IoType::Read | IoType::Write | IoType::WriteZeroes | IoType::Reset
        )
    }

    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        Rc::new(NullChannel)
    }

    fn write_config_json(&self) -> Option<Value> {
        let o = &self.opts;
        Some(json!({
            "method": "bdev_null_create",
            "params": {
                "name": o.name,
                "num_blocks": o.num_blocks,
                "block_size": o.block_size,
                "physical_block_size": o.physical_block_size.max(o.block_size),
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false,
                "dif_pi_format": 0,
                "uuid": o.uuid.hyphenated().to_string(),
            }
        }))
    }
}

struct NullChannel;

impl BdevChannel for NullChannel {
    #[inline]
    fn submit(self: Rc<Self>, io: IoBox) {
        io.complete(IoStatus::Success);
    }
}
