//! NVMe/TCP I/O for end-to-end tests that need many commands in flight on
//! one queue: a [`Driver`] says what to submit next and hears each
//! completion; [`drive`] keeps up to `qd` commands outstanding (writes by
//! R2T, reads by C2HData) until the driver has nothing more and everything
//! has completed, or the connection ends.
//!
//! Included with `#[path = "common/nvme_io.rs"] mod nvme_io;` by the tests
//! that use it (the shared harness stays free of nvmf types).

#![allow(dead_code)]

use std::net::SocketAddr;

use nvmf::initiator::{HostError, HostPdu, HostQueue};
use nvmf::wire::nvme::{SglDescriptor, Sqe, FLAGS_PSDT_SGL};
use nvmf::wire::pdu::Digests;

pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:lvol-tests";

const OPC_WRITE: u8 = 0x01;
const OPC_READ: u8 = 0x02;

/// An admin queue (kept so the controller lives) and one I/O queue.
pub struct Conn {
    pub admin: HostQueue,
    pub io: HostQueue,
}

/// Connects to namespace 1 of `nqn` with an I/O queue that takes `qd`
/// commands at once.
pub fn connect(addr: SocketAddr, nqn: &str, qd: u16) -> Conn {
    let admin = HostQueue::connect(addr, nqn, HOSTNQN, 0, 0, 31, Digests::default())
        .unwrap_or_else(|e| panic!("admin connect to {nqn}: {e}"));
    let io = HostQueue::connect(
        addr,
        nqn,
        HOSTNQN,
        1,
        admin.cntlid,
        qd.max(2) - 1,
        Digests::default(),
    )
    .unwrap_or_else(|e| panic!("I/O queue connect to {nqn}: {e}"));
    Conn { admin, io }
}

pub enum Op {
    /// The data to write (a whole number of blocks).
    Write(Vec<u8>),
    /// Blocks to read.
    Read(u32),
}

pub struct Cmd {
    pub lba: u64,
    pub op: Op,
    /// The driver's own tag, handed back on completion.
    pub tag: u64,
}

pub struct Done {
    pub lba: u64,
    pub tag: u64,
    pub write: bool,
    pub ok: bool,
    /// The data written, or read (on success).
    pub data: Vec<u8>,
}

pub trait Driver {
    /// The next command, or None when there is nothing to submit now
    /// (`drive` returns once nothing is in flight either).
    fn next(&mut self) -> Option<Cmd>;
    fn done(&mut self, d: Done);
}

struct Slot {
    lba: u64,
    tag: u64,
    write: bool,
    data: Vec<u8>,
}

/// Runs `driver` on `q` with up to `qd` commands in flight, blocks of
/// `block_size` bytes. Err when the connection fails (e.g. the target was
/// killed); completions seen before that were all reported.
pub fn drive(
    q: &mut HostQueue,
    qd: usize,
    block_size: usize,
    driver: &mut dyn Driver,
) -> Result<(), HostError> {
    let mut slots: Vec<Option<Slot>> = (0..qd).map(|_| None).collect();
    loop {
        for (cid, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let Some(cmd) = driver.next() else {
                break;
            };
            let (opc, blocks, write, data) = match cmd.op {
                Op::Write(d) => (OPC_WRITE, d.len() / block_size, true, d),
                Op::Read(n) => (
                    OPC_READ,
                    n as usize,
                    false,
                    Vec::with_capacity(n as usize * block_size),
                ),
            };
            assert!(blocks > 0, "empty command");
            let mut sqe = Sqe::default();
            sqe.set_opcode(opc)
                .set_flags(FLAGS_PSDT_SGL)
                .set_cid(cid as u16)
                .set_nsid(1)
                .set_rw(cmd.lba, blocks as u32)
                .set_sgl(SglDescriptor::transport((blocks * block_size) as u32));
            q.send(&sqe, &[])?;
            *slot = Some(Slot {
                lba: cmd.lba,
                tag: cmd.tag,
                write,
                data,
            });
        }
        if slots.iter().all(Option::is_none) {
            return Ok(());
        }
        match q.recv()? {
            HostPdu::Data(cid, off, _) => {
                let Some(Some(s)) = slots.get_mut(cid as usize) else {
                    return Err(HostError::Protocol(format!("C2HData for idle cid {cid}")));
                };
                if off as usize != s.data.len() {
                    return Err(HostError::Protocol(format!("C2HData out of order ({off})")));
                }
                s.data.extend_from_slice(q.data());
            }
            HostPdu::R2T(cid, ttag, off, len) => {
                let Some(Some(s)) = slots.get(cid as usize) else {
                    return Err(HostError::Protocol(format!("R2T for idle cid {cid}")));
                };
                let (o, l) = (off as usize, len as usize);
                let chunk = s.data[o..o + l].to_vec();
                q.send_h2c(cid, ttag, off, &chunk)?;
                q.flush()?;
            }
            HostPdu::Resp(c) => {
                let Some(s) = slots.get_mut(c.cid() as usize).and_then(Option::take) else {
                    return Err(HostError::Protocol(format!(
                        "response for idle cid {}",
                        c.cid()
                    )));
                };
                driver.done(Done {
                    lba: s.lba,
                    tag: s.tag,
                    write: s.write,
                    ok: c.status().is_success(),
                    data: s.data,
                });
            }
        }
    }
}

/// A driver over a fixed list of commands; completions collected.
pub struct Batch {
    pub cmds: std::vec::IntoIter<Cmd>,
    pub done: Vec<Done>,
}

impl Batch {
    pub fn new(cmds: Vec<Cmd>) -> Batch {
        Batch {
            cmds: cmds.into_iter(),
            done: Vec::new(),
        }
    }
}

impl Driver for Batch {
    fn next(&mut self) -> Option<Cmd> {
        self.cmds.next()
    }
    fn done(&mut self, d: Done) {
        self.done.push(d);
    }
}

/// Reads `blocks` blocks at `lba` in commands of up to `per_cmd` blocks
/// (within the target's MDTS: 128 KiB by default),
/// `qd` at a time.
pub fn read(
    q: &mut HostQueue,
    qd: usize,
    block_size: usize,
    lba: u64,
    blocks: u64,
    per_cmd: u32,
) -> Vec<u8> {
    let mut cmds = Vec::new();
    let mut at = 0;
    while at < blocks {
        let n = (per_cmd as u64).min(blocks - at);
        cmds.push(Cmd {
            lba: lba + at,
            op: Op::Read(n as u32),
            tag: at,
        });
        at += n;
    }
    let mut b = Batch::new(cmds);
    drive(q, qd, block_size, &mut b).expect("NVMe read");
    b.done.sort_by_key(|d| d.tag);
    let mut out = Vec::with_capacity((blocks as usize) * block_size);
    for d in b.done {
        assert!(d.ok, "NVMe read at lba {} failed", d.lba);
        out.extend_from_slice(&d.data);
    }
    out
}
