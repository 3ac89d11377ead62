//! `uring`: a bdev over a file or block device through io_uring (SPDK's
//! bdev_uring; `bdev_aio_*` is served here too, since scripts use both).
//!
//! The file is opened with O_DIRECT (falling back to buffered I/O where the
//! filesystem refuses it, as SPDK's aio module does). Each core gets its own
//! descriptor (a `dup` made when its channel is created) and submits through
//! its core's shared ring (`ring.rs`): reads and writes go straight from
//! and into the I/O's buffer (aligned as direct I/O needs: the bdev's
//! `required_alignment`, which the bdev layer enforces by bounce
//! buffering), flush is `fdatasync`, unmap punches a hole,
//! write_zeroes zeroes a range. Errors from the kernel (EIO, a vanished
//! device) complete the I/O as failed; nothing here panics on them.

mod ring;
pub mod rpc;
#[cfg(test)]
mod tests;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::bdev::{Bdev, BdevProps, IoRequirements};
use crate::channel::BdevChannel;
use crate::error::{BdevError, Result};
use crate::io::{IoBox, IoStatus, IoType};

pub const MODULE: &str = "uring";

/// Which RPC made the bdev, so `save_config` writes it back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatedBy {
    Uring,
    Aio,
}

/// What a file or device looks like to us.
#[derive(Debug, Clone, Copy)]
pub struct FileGeometry {
    pub size_bytes: u64,
    /// The smallest block size direct I/O accepts.
    pub logical_block_size: u32,
    /// Alignment direct I/O needs of memory buffers (1: buffered I/O).
    pub mem_align: u32,
    pub is_block_device: bool,
    pub direct: bool,
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKSSZGET`: `_IO(0x12, 104)`.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `STATX_DIOALIGN` (Linux 6.1): direct I/O alignment in `statx`.
const STATX_DIOALIGN: u32 = 0x2000;

fn errno_error(path: &Path, what: &str, e: std::io::Error) -> BdevError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => BdevError::NotFound(format!("{}: {e}", path.display())),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            BdevError::Claimed(format!("{what} {}: {e}", path.display()))
        }
        _ => BdevError::Invalid(format!("{what} {}: {e}", path.display())),
    }
}

/// Opens `path` read-write, O_DIRECT if the filesystem allows it.
pub fn open_file(path: &Path, readonly: bool) -> Result<(OwnedFd, bool)> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| BdevError::Invalid("filename contains a NUL byte".into()))?;
    let mode = if readonly {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    for direct in [true, false] {
        let flags = mode | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 };
        // SAFETY: a valid C string and flags; the result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd >= 0 {
            if !direct {
                log::warn!(
                    "{}: O_DIRECT not supported here, using buffered I/O",
                    path.display()
                );
            }
            // SAFETY: fd was just returned by open and is owned by nobody else.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, direct));
        }
        let e = std::io::Error::last_os_error();
        if !(direct && e.raw_os_error() == Some(libc::EINVAL)) {
            return Err(errno_error(path, "cannot open", e));
        }
    }
    Err(BdevError::Invalid(format!(
        "cannot open {}",
        path.display()
    )))
}

/// Size and direct-I/O block size of an open file or block device.
pub fn geometry(path: &Path, fd: &OwnedFd, direct: bool) -> Result<FileGeometry> {
    // SAFETY: fstat into a zeroed struct on a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(errno_error(
            path,
            "cannot stat",
            std::io::Error::last_os_error(),
        ));
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Err(BdevError::Invalid(format!(
            "{} is a directory",
            path.display()
        ))),
        libc::S_IFBLK => {
            let mut size: u64 = 0;
            let mut lbs: libc::c_int = 0;
            // SAFETY: these ioctls write one integer each into valid memory.
            let ok = unsafe {
                libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size) == 0
                    && libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &mut lbs) == 0
            };
            if !ok {
                return Err(errno_error(
                    path,
                    "cannot size block device",
                    std::io::Error::last_os_error(),
                ));
            }
            let lbs = (lbs as u32).max(512);
            Ok(FileGeometry {
                size_bytes: size,
                logical_block_size: lbs,
                mem_align: if direct { lbs } else { 1 },
                is_block_device: true,
                direct,
            })
        }
        libc::S_IFREG => {
            let mut align = 512;
            let mut mem_align = if direct { 512 } else { 1 };
            if direct {
                // SAFETY: statx on a valid fd with AT_EMPTY_PATH and an
                // empty path; the struct is zeroed and only read on success.
                let mut stx: libc::statx = unsafe { std::mem::zeroed() };
                let empty = c"";
                let rc = unsafe {
                    libc::statx(
                        fd.as_raw_fd(),
                        empty.as_ptr(),
                        libc::AT_EMPTY_PATH,
                        STATX_DIOALIGN,
                        &mut stx,
                    )
                };
                if rc == 0 && stx.stx_mask & STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
                    align = stx.stx_dio_offset_align;
                    // Filesystems report what they need, often less than
                    // a block; never trust less than 512 bytes.
                    mem_align = stx.stx_dio_mem_align.clamp(512, 4096);
                }
            }
            Ok(FileGeometry {
                size_bytes: st.st_size as u64,
                logical_block_size: align,
                mem_align,
                is_block_device: false,
                direct,
            })
        }
        _ => Err(BdevError::Invalid(format!(
            "{} is not a regular file or block device",
            path.display()
        ))),
    }
}

/// Creation parameters.
#[derive(Debug, Clone)]
pub struct UringOptions {
    pub name: String,
    pub filename: PathBuf,
    /// 0: the file's logical block size.
    pub block_size: u32,
    pub uuid: Option<Uuid>,
    pub readonly: bool,
    pub created_by: CreatedBy,
}

pub struct UringBdev {
    opts: UringOptions,
    uuid: Uuid,
    fd: OwnedFd,
    geometry: FileGeometry,
    block_size: u32,
    num_blocks: u64,
}

impl UringBdev {
    /// Opens and checks the file; registers nothing.
    pub fn open(opts: UringOptions) -> Result<UringBdev> {
        let (fd, direct) = open_file(&opts.filename, opts.readonly)?;
        let geometry = geometry(&opts.filename, &fd, direct)?;
        let block_size = if opts.block_size == 0 {
            geometry.logical_block_size
        } else {
            opts.block_size
        };
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(BdevError::Invalid(format!(
                "block_size {block_size} is not a power of two of at least 512"
            )));
        }
        if block_size < geometry.logical_block_size {
            return Err(BdevError::Invalid(format!(
                "block_size {block_size} is smaller than the logical block size {} of {}",
                geometry.logical_block_size,
                opts.filename.display()
            )));
        }
        let num_blocks = geometry.size_bytes / block_size as u64;
        if num_blocks == 0 {
            return Err(BdevError::Invalid(format!(
                "{} ({} bytes) is smaller than one {block_size}-byte block",
                opts.filename.display(),
                geometry.size_bytes
            )));
        }
        // One ring per core; make sure this one can exist before registering.
        ring::core_ring().map_err(|e| BdevError::Invalid(format!("io_uring: {e}")))?;
        Ok(UringBdev {
            uuid: opts.uuid.unwrap_or_else(Uuid::new_v4),
            opts,
            fd,
            geometry,
            block_size,
            num_blocks,
        })
    }

    pub fn props(&self) -> BdevProps {
        BdevProps::new(
            self.opts.name.clone(),
            self.uuid,
            self.block_size,
            self.num_blocks,
        )
        .with_io(IoRequirements {
            required_alignment: self.geometry.mem_align,
            ..IoRequirements::default()
        })
    }
}

impl Bdev for UringBdev {
    fn module(&self) -> &'static str {
        MODULE
    }

    fn product_name(&self) -> &'static str {
        match self.opts.created_by {
            CreatedBy::Uring => "URING bdev",
            CreatedBy::Aio => "AIO disk",
        }
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Reset => true,
            IoType::Write | IoType::Flush => !self.opts.readonly,
            IoType::Unmap | IoType::WriteZeroes => !self.opts.readonly,
            IoType::Compare => false,
        }
    }

    fn create_channel(&self) -> Rc<dyn BdevChannel> {
        // SAFETY: dup of a valid fd we own; checked below.
        let fd = unsafe { libc::dup(self.fd.as_raw_fd()) };
        let fd = if fd >= 0 {
            // SAFETY: fd was just returned by dup.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        } else {
            log::error!(
                "{}: cannot dup its file descriptor: {}",
                self.opts.name,
                std::io::Error::last_os_error()
            );
            None
        };
        let ring = ring::core_ring()
            .map_err(|e| log::error!("{}: no io_uring on this core: {e}", self.opts.name))
            .ok();
        Rc::new(UringChannel {
            fd,
            ring,
            block_size: self.block_size,
        })
    }

    fn dump_info_json(&self) -> Value {
        let key = match self.opts.created_by {
            CreatedBy::Uring => "uring",
            CreatedBy::Aio => "aio",
        };
        json!({ key: {
            "filename": self.opts.filename.display().to_string(),
            "block_size_override": self.opts.block_size != 0,
            "direct_io": self.geometry.direct,
            "block_device": self.geometry.is_block_device,
            "readonly": self.opts.readonly,
        }})
    }

    fn write_config_json(&self) -> Option<Value> {
        let o = &self.opts;
        Some(match o.created_by {
            CreatedBy::Uring => json!({
                "method": "bdev_uring_create",
                "params": {
                    "name": o.name,
                    "filename": o.filename.display().to_string(),
                    "block_size": self.block_size,
                    "uuid": self.uuid.hyphenated().to_string(),
                }
            }),
            CreatedBy::Aio => json!({
                "method": "bdev_aio_create",
                "params": {
                    "name": o.name,
                    "filename": o.filename.display().to_string(),
                    "block_size": self.block_size,
                    "readonly": o.readonly,
                    "uuid": self.uuid.hyphenated().to_string(),
                }
            }),
        })
    }
}

struct UringChannel {
    fd: Option<OwnedFd>,
    ring: Option<Rc<ring::CoreRing>>,
    block_size: u32,
}

impl BdevChannel for UringChannel {
    #[inline]
    fn submit(self: Rc<Self>, io: IoBox) {
        match (&self.fd, &self.ring) {
            (Some(fd), Some(ring)) => ring.queue(fd.as_raw_fd(), self.block_size, io),
            _ => io.complete(IoStatus::Failed),
        }
    }
}
