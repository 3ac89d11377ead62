//! NVM I/O commands on an I/O queue (NVMe NVM Command Set 1.0, 3): read,
//! write, flush, write zeroes, dataset management (deallocate → unmap),
//! checked against the namespace before reaching the bdev channel of the
//! queue's own core.

use bdev::{IoChannel, IoType};

use super::admin::NamespaceView;
use crate::wire::nvme::{sc, Sqe, Status};

pub mod opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
}

/// Where a command's data comes from or goes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Transfer {
    None,
    /// Host → controller, `len` bytes (in the capsule or by R2T).
    ToController(usize),
    /// Controller → host, `len` bytes.
    ToHost(usize),
}

/// A validated I/O command.
pub struct IoPlan {
    pub transfer: Transfer,
    pub channel: IoChannel,
    pub slba: u64,
    pub nlb: u64,
}

/// Checks `sqe` against the namespaces; the status to return if it fails.
pub fn plan(sqe: &Sqe, namespaces: &[NamespaceView], max_io_size: u32) -> Result<IoPlan, Status> {
    let ns = namespaces
        .iter()
        .find(|n| n.nsid == sqe.nsid())
        .ok_or(Status::generic(sc::INVALID_NAMESPACE).dnr())?;
    let bs = ns.block_size as u64;
    let channel = ns.bdev.get_channel();
    let sgl_len = sqe.sgl().length() as usize;
    let rw = |to_host: bool| -> Result<IoPlan, Status> {
        let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
        if slba.checked_add(nlb).is_none_or(|end| end > ns.num_blocks) {
            return Err(Status::generic(sc::LBA_OUT_OF_RANGE).dnr());
        }
        let len = (nlb * bs) as usize;
        if len > max_io_size as usize || sgl_len < len {
            return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr());
        }
        Ok(IoPlan {
            transfer: if to_host {
                Transfer::ToHost(len)
            } else {
                Transfer::ToController(len)
            },
            channel: channel.clone(),
            slba,
            nlb,
        })
    };
    match sqe.opcode() {
        opc::READ => rw(true),
        opc::WRITE => rw(false),
        opc::WRITE_ZEROES => {
            // No data: only the range is checked.
            let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
            if slba.checked_add(nlb).is_none_or(|end| end > ns.num_blocks) {
                return Err(Status::generic(sc::LBA_OUT_OF_RANGE).dnr());
            }
            Ok(IoPlan {
                transfer: Transfer::None,
                channel,
                slba,
                nlb,
            })
        }
        opc::FLUSH => Ok(IoPlan {
            transfer: Transfer::None,
            channel,
            slba: 0,
            nlb: 0,
        }),
        opc::DSM => {
            let ranges = (sqe.cdw(10) & 0xFF) as usize + 1;
            if sgl_len < ranges * 16 {
                return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr());
            }
            Ok(IoPlan {
                transfer: Transfer::ToController(sgl_len.min(4096)),
                channel,
                slba: 0,
                nlb: ranges as u64,
            })
        }
        _ => Err(Status::generic(sc::INVALID_OPCODE).dnr()),
    }
}

fn io_status(r: bdev::Result<()>) -> Status {
    match r {
        Ok(()) => Status::SUCCESS,
        Err(_) => Status::generic(sc::INTERNAL_ERROR),
    }
}

/// Runs a planned command once its host data (if any) is in `data`;
/// returns the status and, for reads, the data for the host.
pub async fn execute(sqe: &Sqe, p: &IoPlan, data: &[u8]) -> (Status, Vec<u8>) {
    let ch = &p.channel;
    match sqe.opcode() {
        opc::READ => match ch.read(p.slba, p.nlb).await {
            Ok(d) => (Status::SUCCESS, d),
            Err(_) => (Status::generic(sc::INTERNAL_ERROR), Vec::new()),
        },
        opc::WRITE => (io_status(ch.write(p.slba, data).await), Vec::new()),
        opc::WRITE_ZEROES => (
            io_status(ch.command(IoType::WriteZeroes, p.slba, p.nlb).await),
            Vec::new(),
        ),
        opc::FLUSH => {
            let s = if ch.bdev().io_type_supported(IoType::Flush) {
                io_status(ch.command(IoType::Flush, 0, 0).await)
            } else {
                Status::SUCCESS
            };
            (s, Vec::new())
        }
        opc::DSM => {
            // Only deallocate (AD, CDW11 bit 2) does anything.
            if sqe.cdw(11) & 0x4 == 0 || !ch.bdev().io_type_supported(IoType::Unmap) {
                return (Status::SUCCESS, Vec::new());
            }
            for r in data.chunks_exact(16).take(p.nlb as usize) {
                let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
                let mut s = [0u8; 8];
                s.copy_from_slice(&r[8..16]);
                let slba = u64::from_le_bytes(s);
                if nlb == 0 {
                    continue;
                }
                if slba
                    .checked_add(nlb)
                    .is_none_or(|e| e > ch.bdev().num_blocks())
                {
                    return (Status::generic(sc::LBA_OUT_OF_RANGE).dnr(), Vec::new());
                }
                let st = io_status(ch.command(IoType::Unmap, slba, nlb).await);
                if !st.is_success() {
                    return (st, Vec::new());
                }
            }
            (Status::SUCCESS, Vec::new())
        }
        _ => (Status::generic(sc::INVALID_OPCODE).dnr(), Vec::new()),
    }
}
