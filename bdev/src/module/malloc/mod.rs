//! `malloc`: a RAM-backed bdev (SPDK's bdev_malloc).
//!
//! The memory is an anonymous private mapping, so a large bdev costs only
//! the pages written. Reads and writes are plain copies on the submitting
//! core; I/O from different cores to the same blocks races like it would on
//! a disk, with unspecified contents but no undefined behaviour (only raw
//! copies touch the mapping, never references). A zero-copy read lends a
//! read-only view of the mapping that holds the channel, and through it the
//! mapping, alive. `optimal_io_boundary` splits I/O at that boundary, as
//! SPDK's malloc does.

pub mod rpc;
#[cfg(test)]
mod tests;

use std::rc::Rc;
use std::sync::Arc;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::bdev::{Bdev, BdevProps, IoRequirements};
use crate::channel::BdevChannel;
use crate::error::{BdevError, Result};
use crate::io::{IoBox, IoStatus, IoType, SharedBuf};

pub const MODULE: &str = "malloc";

/// The bdev's memory: an anonymous mapping of `len` bytes.
struct MallocMemory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory that lives as long as this value; all
// access is through raw copies bounded by `len` (see module docs).
unsafe impl Send for MallocMemory {}
unsafe impl Sync for MallocMemory {}

impl MallocMemory {
    fn new(len: usize) -> Result<MallocMemory> {
        // SAFETY: anonymous private mapping, no fd; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BdevError::NoMemory);
        }
        Ok(MallocMemory {
            ptr: ptr as *mut u8,
            len,
        })
    }
}

impl Drop for MallocMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// Creation parameters, as `bdev_malloc_create` takes them.
#[derive(Debug, Clone)]
pub struct MallocOptions {
    pub name: String,
    pub uuid: Uuid,
    pub num_blocks: u64,
    pub block_size: u32,
    pub physical_block_size: u32,
    pub optimal_io_boundary: u32,
}

pub struct MallocBdev {
    opts: MallocOptions,
    /// Shared with every channel, so a lent view outlives neither.
    mem: Arc<MallocMemory>,
}

impl MallocBdev {
    pub fn new(opts: MallocOptions) -> Result<MallocBdev> {
        super::check_geometry(opts.block_size, opts.physical_block_size, opts.num_blocks)?;
        let len = opts
            .num_blocks
            .checked_mul(opts.block_size as u64)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| BdevError::Invalid("bdev size overflows".into()))?;
        Ok(MallocBdev {
            mem: Arc::new(MallocMemory::new(len)?),
            opts,
        })
    }

    pub fn props(&self) -> BdevProps {
        BdevProps::new(
            self.opts.name.clone(),
            self.opts.uuid,
            self.opts.block_size,
            self.opts.num_blocks,
        )
        .with_io(IoRequirements {
            split_boundary_blocks: self.opts.optimal_io_boundary as u64,
            ..IoRequirements::default()
        })
    }
}

impl Bdev for MallocBdev {
    fn module(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        "Malloc disk"
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        matches!(
            io_type,
            IoType::Read
                | IoType::Write
                | IoType::Flush
                | IoType::Reset
                | IoType::Unmap
                | IoType::WriteZeroes
                | IoType::Compare
        )
    }

    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        Rc::new(MallocChannel {
            base: self.mem.ptr,
            len: self.mem.len,
            block_size: self.opts.block_size as usize,
            _mem: self.mem.clone(),
        })
    }

    fn write_config_json(&self) -> Option<Value> {
        let o = &self.opts;
        Some(json!({
            "method": "bdev_malloc_create",
            "params": {
                "name": o.name,
                "num_blocks": o.num_blocks,
                "block_size": o.block_size,
                "physical_block_size": o.physical_block_size.max(o.block_size),
                "uuid": o.uuid.hyphenated().to_string(),
                "optimal_io_boundary": o.optimal_io_boundary,
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false,
                "dif_pi_format": 0,
                "numa_id": -1,
            }
        }))
    }
}

/// Per-core view of the memory: raw pointers into the mapping it holds.
struct MallocChannel {
    base: *mut u8,
    len: usize,
    block_size: usize,
    _mem: Arc<MallocMemory>,
}

impl BdevChannel for MallocChannel {
    #[inline]
    fn submit(self: Rc<Self>, mut io: IoBox) {
        // The framework validated the range against the bdev's geometry.
        let off = io.offset_blocks as usize * self.block_size;
        let n = io.num_blocks as usize * self.block_size;
        debug_assert!(off + n <= self.len);
        let status = match io.io_type {
            IoType::Read if io.zcopy => {
                let owner: Rc<dyn std::any::Any> = self.clone();
                // SAFETY: off+n <= len; the view holds this channel, which
                // holds the mapping; this core writes the mapping only by
                // raw copies, never while a slice of it is held. A write to
                // the same blocks from another core while the view is being
                // sent races as on a device (module docs): the bytes go to
                // the kernel, nothing in Rust reads them as typed data.
                io.shared = unsafe { SharedBuf::from_raw(self.base.add(off), n, owner) };
                IoStatus::Success
            }
            IoType::Read => {
                // SAFETY: off+n <= len (validated); io.buf holds >= n bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.base.add(off), io.buf.as_mut_ptr(), n)
                };
                IoStatus::Success
            }
            IoType::Write => {
                // SAFETY: as above; the data (buf or shared view) holds >= n.
                unsafe { std::ptr::copy_nonoverlapping(io.data_ptr(), self.base.add(off), n) };
                IoStatus::Success
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // SAFETY: off+n <= len.
                unsafe { std::ptr::write_bytes(self.base.add(off), 0, n) };
                IoStatus::Success
            }
            IoType::Compare => {
                let mut same = true;
                for i in 0..n {
                    // SAFETY: i < n, bounds as above.
                    let a = unsafe { std::ptr::read_volatile(self.base.add(off + i)) };
                    if a != io.data()[i] {
                        same = false;
                        break;
                    }
                }
                if same {
                    IoStatus::Success
                } else {
                    IoStatus::Miscompare
                }
            }
            IoType::Flush | IoType::Reset => IoStatus::Success,
        };
        io.complete(status);
    }
}
