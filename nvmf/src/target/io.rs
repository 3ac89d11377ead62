//! NVM I/O commands on an I/O queue (NVMe NVM Command Set 1.0, 3): read,
//! write, compare, flush, write zeroes and dataset management (deallocate
//! → unmap). [`plan`] checks a command against its namespace and says what
//! data moves which way; the connection (`conn.rs`) moves the data and
//! submits to the bdev channel of its own core.

use bdev::IoType;

use super::admin::NamespaceView;
use crate::wire::nvme::{sc, Sqe, Status};

pub mod opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
}

/// Compare Failure (SCT 2h media and data integrity errors, SC 85h).
pub const COMPARE_FAILURE: Status = Status::media(0x85);

/// Largest DSM range list: 256 ranges of 16 bytes.
pub const DSM_MAX_BYTES: usize = 256 * 16;

/// Where a command's data comes from or goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    None,
    /// Host → controller, `len` bytes (in the capsule or by R2T).
    ToController(usize),
    /// Controller → host, `len` bytes.
    ToHost(usize),
}

/// A validated I/O command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoPlan {
    pub transfer: Transfer,
    /// What reaches the bdev (DSM: unmap per range; flush on a bdev
    /// without flush, or DSM without deallocate: nothing).
    pub io_type: Option<IoType>,
    pub slba: u64,
    /// Blocks (DSM: ranges).
    pub nlb: u64,
}

/// Checks `sqe` against its namespace (None: no such namespace); the status
/// to return if it fails.
pub fn plan(sqe: &Sqe, ns: Option<&NamespaceView>, max_io_size: u32) -> Result<IoPlan, Status> {
    let ns = ns.ok_or(Status::generic(sc::INVALID_NAMESPACE).dnr())?;
    let supported = |t: IoType| ns.bdev.io_type_supported(t);
    let sgl_len = sqe.sgl().length() as usize;
    let range = || -> Result<(u64, u64), Status> {
        let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
        if slba.checked_add(nlb).is_none_or(|end| end > ns.num_blocks) {
            return Err(Status::generic(sc::LBA_OUT_OF_RANGE).dnr());
        }
        Ok((slba, nlb))
    };
    let data = |io_type: IoType, to_host: bool| -> Result<IoPlan, Status> {
        let (slba, nlb) = range()?;
        let len = (nlb * ns.block_size as u64) as usize;
        if len > max_io_size as usize || sgl_len < len {
            return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr());
        }
        Ok(IoPlan {
            transfer: if to_host {
                Transfer::ToHost(len)
            } else {
                Transfer::ToController(len)
            },
            io_type: Some(io_type),
            slba,
            nlb,
        })
    };
    match sqe.opcode() {
        opc::READ => data(IoType::Read, true),
        opc::WRITE => data(IoType::Write, false),
        // Host data first, then a read of the same blocks to compare with.
        opc::COMPARE => data(IoType::Read, false),
        opc::WRITE_ZEROES => {
            let (slba, nlb) = range()?;
            Ok(IoPlan {
                transfer: Transfer::None,
                io_type: Some(IoType::WriteZeroes),
                slba,
                nlb,
            })
        }
        opc::FLUSH => Ok(IoPlan {
            transfer: Transfer::None,
            io_type: supported(IoType::Flush).then_some(IoType::Flush),
            slba: 0,
            nlb: 0,
        }),
        opc::DSM => {
            let ranges = (sqe.cdw(10) & 0xFF) as usize + 1;
            if sgl_len < ranges * 16 {
                return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr());
            }
            // Only deallocate (AD, CDW11 bit 2) does anything.
            let deallocate = sqe.cdw(11) & 0x4 != 0 && supported(IoType::Unmap);
            Ok(IoPlan {
                transfer: Transfer::ToController(ranges * 16),
                io_type: deallocate.then_some(IoType::Unmap),
                slba: 0,
                nlb: ranges as u64,
            })
        }
        _ => Err(Status::generic(sc::INVALID_OPCODE).dnr()),
    }
}

/// The `(slba, nlb)` of each non-empty range of a DSM range list, or the
/// status if one lies outside the namespace.
pub fn dsm_ranges(
    list: &[u8],
    ranges: usize,
    num_blocks: u64,
) -> impl Iterator<Item = Result<(u64, u64), Status>> + '_ {
    list.chunks_exact(16).take(ranges).filter_map(move |r| {
        let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
        let mut s = [0u8; 8];
        s.copy_from_slice(&r[8..16]);
        let slba = u64::from_le_bytes(s);
        if nlb == 0 {
            return None;
        }
        Some(if slba.checked_add(nlb).is_none_or(|e| e > num_blocks) {
            Err(Status::generic(sc::LBA_OUT_OF_RANGE).dnr())
        } else {
            Ok((slba, nlb))
        })
    })
}
