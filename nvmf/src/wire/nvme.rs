//! NVMe submission and completion queue entries, SGL descriptors and
//! status codes (NVMe Base Specification 2.0: 4.2 SQE, 4.6 CQE, 4.3.2
//! SGL, 4.6.1.2 status). On NVMe/TCP the SQE rides in a CapsuleCmd and the
//! CQE in a CapsuleResp.

use static_assertions::const_assert_eq;

use super::{le16, le32, le64, put16, put32, put64};

pub const SQE_BYTES: usize = 64;
pub const CQE_BYTES: usize = 16;
pub const SGL_BYTES: usize = 16;

/// Opcode of every fabrics command (Connect, Property Get/Set, ...).
pub const OPC_FABRICS: u8 = 0x7F;

/// CDW0 flags: PSDT = 01b, SGLs with a contiguous metadata buffer. Every
/// NVMe/TCP host sets it (the Linux target refuses anything else).
pub const FLAGS_PSDT_SGL: u8 = 0x40;
const FLAGS_FUSE_MASK: u8 = 0x03;
const FLAGS_PSDT_MASK: u8 = 0xC0;

/// A submission queue entry, as received (64 bytes, 4.2).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; SQE_BYTES]);
const_assert_eq!(std::mem::size_of::<Sqe>(), SQE_BYTES);

impl Default for Sqe {
    fn default() -> Self {
        Sqe([0; SQE_BYTES])
    }
}

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqe")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("cdw10", &format_args!("{:#x}", self.cdw(10)))
            .finish()
    }
}

impl Sqe {
    pub fn from_bytes(b: &[u8]) -> Option<Sqe> {
        Some(Sqe(b.get(..SQE_BYTES)?.try_into().ok()?))
    }

    pub fn opcode(&self) -> u8 {
        self.0[0]
    }

    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// FUSE bits (0: normal, 1: first of a fused pair, 2: second).
    pub fn fuse(&self) -> u8 {
        self.0[1] & FLAGS_FUSE_MASK
    }

    /// PSDT: 0 PRPs, 1 SGL with contiguous metadata, 2 SGL with SGL metadata.
    pub fn psdt(&self) -> u8 {
        (self.0[1] & FLAGS_PSDT_MASK) >> 6
    }

    pub fn cid(&self) -> u16 {
        le16(&self.0, 2)
    }

    pub fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }

    /// Fabrics command type (byte 4 of a fabrics SQE).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }

    /// The data pointer as SGL descriptor 1 (bytes 24..40).
    pub fn sgl(&self) -> SglDescriptor {
        let mut d = [0u8; SGL_BYTES];
        d.copy_from_slice(&self.0[24..40]);
        SglDescriptor(d)
    }

    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        debug_assert!((2..=15).contains(&n));
        le32(&self.0, n * 4)
    }

    /// Starting LBA of a read/write/compare/write zeroes (CDW11:CDW10).
    pub fn slba(&self) -> u64 {
        le64(&self.0, 40)
    }

    /// Number of logical blocks (CDW12 bits 15:0 are 0's based).
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xFFFF) + 1
    }

    pub fn set_opcode(&mut self, op: u8) -> &mut Self {
        self.0[0] = op;
        self
    }

    pub fn set_flags(&mut self, flags: u8) -> &mut Self {
        self.0[1] = flags;
        self
    }

    pub fn set_cid(&mut self, cid: u16) -> &mut Self {
        put16(&mut self.0, 2, cid);
        self
    }

    pub fn set_nsid(&mut self, nsid: u32) -> &mut Self {
        put32(&mut self.0, 4, nsid);
        self
    }

    pub fn set_fctype(&mut self, fctype: u8) -> &mut Self {
        self.0[4] = fctype;
        self
    }

    pub fn set_sgl(&mut self, sgl: SglDescriptor) -> &mut Self {
        self.0[24..40].copy_from_slice(&sgl.0);
        self
    }

    pub fn set_cdw(&mut self, n: usize, v: u32) -> &mut Self {
        put32(&mut self.0, n * 4, v);
        self
    }

    /// Read/write addressing: SLBA and a 1-based block count.
    pub fn set_rw(&mut self, slba: u64, nlb: u32) -> &mut Self {
        put64(&mut self.0, 40, slba);
        let c12 = (self.cdw(12) & !0xFFFF) | (nlb.saturating_sub(1) & 0xFFFF);
        self.set_cdw(12, c12)
    }
}

/// SGL descriptor types (upper nibble of byte 15).
pub mod sgl_type {
    pub const DATA_BLOCK: u8 = 0x0;
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
}

/// SGL descriptor subtypes (lower nibble of byte 15).
pub mod sgl_subtype {
    pub const ADDRESS: u8 = 0x0;
    pub const OFFSET: u8 = 0x1;
    pub const TRANSPORT: u8 = 0xA;
}

/// One SGL descriptor (16 bytes, 4.3.2). NVMe/TCP uses two forms: data in
/// the capsule (`0x01`: data block, offset subtype; address = offset into
/// the in-capsule data) and data moved by R2T/H2CData or C2HData (`0x5A`:
/// transport data block, transport subtype).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct SglDescriptor(pub [u8; SGL_BYTES]);
const_assert_eq!(std::mem::size_of::<SglDescriptor>(), SGL_BYTES);

impl std::fmt::Debug for SglDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sgl(type {:#04x}, addr {}, len {})",
            self.type_byte(),
            self.addr(),
            self.length()
        )
    }
}

impl SglDescriptor {
    pub fn new(desc_type: u8, subtype: u8, addr: u64, length: u32) -> SglDescriptor {
        let mut d = [0u8; SGL_BYTES];
        put64(&mut d, 0, addr);
        put32(&mut d, 8, length);
        d[15] = (desc_type << 4) | (subtype & 0xF);
        SglDescriptor(d)
    }

    /// Data carried in the capsule, at `offset` into the in-capsule data.
    pub fn in_capsule(offset: u64, length: u32) -> SglDescriptor {
        SglDescriptor::new(sgl_type::DATA_BLOCK, sgl_subtype::OFFSET, offset, length)
    }

    /// Data moved by the transport (R2T/H2CData, C2HData); length 0 for
    /// commands without data.
    pub fn transport(length: u32) -> SglDescriptor {
        SglDescriptor::new(
            sgl_type::TRANSPORT_DATA_BLOCK,
            sgl_subtype::TRANSPORT,
            0,
            length,
        )
    }

    pub fn addr(&self) -> u64 {
        le64(&self.0, 0)
    }

    pub fn length(&self) -> u32 {
        le32(&self.0, 8)
    }

    pub fn type_byte(&self) -> u8 {
        self.0[15]
    }

    pub fn is_in_capsule(&self) -> bool {
        self.type_byte() == (sgl_type::DATA_BLOCK << 4 | sgl_subtype::OFFSET)
    }

    pub fn is_transport(&self) -> bool {
        self.type_byte() == (sgl_type::TRANSPORT_DATA_BLOCK << 4 | sgl_subtype::TRANSPORT)
    }
}

/// A completion status: type (SCT), code (SC) and Do Not Retry (4.6.1.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status::generic(0x00);

    pub const fn generic(sc: u8) -> Status {
        Status {
            sct: 0,
            sc,
            dnr: false,
        }
    }

    pub const fn command_specific(sc: u8) -> Status {
        Status {
            sct: 1,
            sc,
            dnr: false,
        }
    }

    pub const fn media(sc: u8) -> Status {
        Status {
            sct: 2,
            sc,
            dnr: false,
        }
    }

    pub const fn dnr(mut self) -> Status {
        self.dnr = true;
        self
    }

    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The CQE status field: phase 0, SC bits 8:1, SCT bits 11:9, DNR 15.
    pub fn to_field(self) -> u16 {
        ((self.sc as u16) << 1) | (((self.sct & 0x7) as u16) << 9) | ((self.dnr as u16) << 15)
    }

    pub fn from_field(v: u16) -> Status {
        Status {
            sc: (v >> 1) as u8,
            sct: ((v >> 9) & 0x7) as u8,
            dnr: v & 0x8000 != 0,
        }
    }
}

/// Generic command status codes (SCT 0) the target uses.
pub mod sc {
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const COMMAND_ID_CONFLICT: u8 = 0x03;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const INTERNAL_ERROR: u8 = 0x06;
    pub const ABORTED_BY_REQUEST: u8 = 0x07;
    pub const INVALID_NAMESPACE: u8 = 0x0B;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0C;
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0F;
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    pub const INVALID_SGL_OFFSET: u8 = 0x16;
    pub const COMMAND_TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
}

/// Fabrics command-specific status codes (SCT 1, NVMe over Fabrics 1.1).
pub mod fabrics_sc {
    /// Invalid Queue Identifier (a base command-specific status): what
    /// SPDK answers a Connect for a QID beyond the controller's queues or
    /// already live on it.
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    pub const INCOMPATIBLE_FORMAT: u8 = 0x80;
    pub const CONTROLLER_BUSY: u8 = 0x81;
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    pub const RESTART_DISCOVERY: u8 = 0x83;
    pub const INVALID_HOST: u8 = 0x84;
}

/// A completion queue entry (16 bytes, 4.6).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Cqe(pub [u8; CQE_BYTES]);
const_assert_eq!(std::mem::size_of::<Cqe>(), CQE_BYTES);

impl std::fmt::Debug for Cqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cqe")
            .field("cid", &self.cid())
            .field("status", &self.status())
            .field("dw0", &self.dw0())
            .finish()
    }
}

impl Cqe {
    pub fn new(cid: u16, status: Status) -> Cqe {
        let mut c = Cqe::default();
        c.set_cid(cid).set_status(status);
        c
    }

    pub fn from_bytes(b: &[u8]) -> Option<Cqe> {
        Some(Cqe(b.get(..CQE_BYTES)?.try_into().ok()?))
    }

    pub fn dw0(&self) -> u32 {
        le32(&self.0, 0)
    }

    pub fn dw1(&self) -> u32 {
        le32(&self.0, 4)
    }

    /// DW1:DW0 as one 64-bit result (Property Get of an 8-byte property).
    pub fn result64(&self) -> u64 {
        le64(&self.0, 0)
    }

    pub fn sq_head(&self) -> u16 {
        le16(&self.0, 8)
    }

    pub fn sq_id(&self) -> u16 {
        le16(&self.0, 10)
    }

    pub fn cid(&self) -> u16 {
        le16(&self.0, 12)
    }

    pub fn status(&self) -> Status {
        Status::from_field(le16(&self.0, 14))
    }

    pub fn set_dw0(&mut self, v: u32) -> &mut Self {
        put32(&mut self.0, 0, v);
        self
    }

    pub fn set_result64(&mut self, v: u64) -> &mut Self {
        put64(&mut self.0, 0, v);
        self
    }

    pub fn set_sq_head(&mut self, v: u16) -> &mut Self {
        put16(&mut self.0, 8, v);
        self
    }

    pub fn set_sq_id(&mut self, v: u16) -> &mut Self {
        put16(&mut self.0, 10, v);
        self
    }

    pub fn set_cid(&mut self, v: u16) -> &mut Self {
        put16(&mut self.0, 12, v);
        self
    }

    pub fn set_status(&mut self, s: Status) -> &mut Self {
        put16(&mut self.0, 14, s.to_field());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_fields_sit_where_the_spec_puts_them() {
        let mut s = Sqe::default();
        s.set_opcode(0x02)
            .set_flags(FLAGS_PSDT_SGL)
            .set_cid(0x1234)
            .set_nsid(1)
            .set_sgl(SglDescriptor::transport(8192))
            .set_rw(0x0102_0304_0506, 16);
        let b = s.0;
        assert_eq!(b[0], 0x02);
        assert_eq!(b[1], 0x40);
        assert_eq!(&b[2..4], &[0x34, 0x12]);
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        // SGL at 24: addr 0, length 8192 at 32, type byte 0x5A at 39.
        assert_eq!(&b[32..36], &8192u32.to_le_bytes());
        assert_eq!(b[39], 0x5A);
        // SLBA in CDW10/11, NLB 0's based in CDW12.
        assert_eq!(&b[40..48], &0x0102_0304_0506u64.to_le_bytes());
        assert_eq!(&b[48..50], &15u16.to_le_bytes());
        assert_eq!(s.slba(), 0x0102_0304_0506);
        assert_eq!(s.nlb(), 16);
        assert_eq!(s.psdt(), 1);
        assert_eq!(s.fuse(), 0);
        assert!(s.sgl().is_transport());
        assert_eq!(Sqe::from_bytes(&b), Some(s));
        assert_eq!(Sqe::from_bytes(&b[..63]), None);
    }

    #[test]
    fn in_capsule_sgl_is_type_0x01() {
        let d = SglDescriptor::in_capsule(0, 1024);
        assert_eq!(d.type_byte(), 0x01);
        assert!(d.is_in_capsule());
        assert!(!d.is_transport());
        assert_eq!(d.length(), 1024);
    }

    #[test]
    fn status_field_encoding_matches_linux() {
        // Linux's NVME_SC_CONNECT_INVALID_PARAM (0x182) goes on the wire as
        // 0x182 << 1.
        let s = Status::command_specific(fabrics_sc::CONNECT_INVALID_PARAMETERS);
        assert_eq!(s.to_field(), 0x182 << 1);
        let s = Status::generic(sc::INVALID_FIELD).dnr();
        assert_eq!(s.to_field(), 0x8004);
        assert_eq!(Status::from_field(0x8004), s);
        let mut c = Cqe::new(7, Status::generic(sc::LBA_OUT_OF_RANGE));
        c.set_sq_head(3).set_sq_id(1).set_dw0(0xAABBCCDD);
        assert_eq!(c.cid(), 7);
        assert_eq!(c.status().sc, 0x80);
        assert_eq!(&c.0[12..14], &7u16.to_le_bytes());
        assert_eq!(Cqe::from_bytes(&c.0), Some(c));
    }
}
