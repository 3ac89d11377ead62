//! Identify data structures (NVMe Base 2.0, 5.17.2): controller (CNS 01h),
//! namespace (00h), active namespace list (02h), namespace identification
//! descriptors (03h). Each is 4096 bytes, built into a caller's buffer.

use super::{put16, put32, put64};

pub const IDENTIFY_BYTES: usize = 4096;

/// CNS values (CDW10 bits 7:0).
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_DESCRIPTORS: u8 = 0x03;
    pub const CS_NAMESPACE: u8 = 0x05;
    pub const CS_CONTROLLER: u8 = 0x06;
}

/// ONCS bits (optional NVM commands).
pub mod oncs {
    pub const COMPARE: u16 = 1 << 0;
    pub const DSM: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// Controller type (CNTRLTYPE, byte 111).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ControllerType {
    Io = 1,
    Discovery = 2,
}

/// What a controller reports about itself.
#[derive(Clone, Debug)]
pub struct ControllerIdentity<'a> {
    pub controller_type: ControllerType,
    pub serial_number: &'a str,
    pub model_number: &'a str,
    pub firmware_revision: &'a str,
    pub cntlid: u16,
    pub version: u32,
    /// log2 of the largest transfer in 4 KiB units (0: no limit).
    pub mdts: u8,
    /// Keep-alive granularity in 100 ms units (must be non-zero).
    pub kas_100ms: u16,
    pub max_cmd: u16,
    /// Highest namespace ID.
    pub nn: u32,
    pub oncs: u16,
    pub volatile_write_cache: bool,
    /// In-capsule data bytes an I/O command capsule may carry.
    pub in_capsule_data_bytes: u32,
    pub subnqn: &'a str,
    /// Asynchronous events the controller sends (OAES).
    pub oaes: u32,
}

/// OAES bit 8: namespace attribute notices (AEN when namespaces change).
pub const OAES_NS_ATTRIBUTE: u32 = 1 << 8;
/// OAES bit 31: discovery log page change notices.
pub const OAES_DISCOVERY_LOG_CHANGE: u32 = 1 << 31;

/// Copies `s` into `field`, space padded (SN, MN, FR are ASCII, space
/// padded, not NUL terminated).
fn put_space_padded(field: &mut [u8], s: &str) {
    field.fill(b' ');
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn put_nul_padded(field: &mut [u8], s: &str) {
    field.fill(0);
    let n = s.len().min(field.len() - 1);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Identify Controller (CNS 01h).
pub fn controller(out: &mut [u8; IDENTIFY_BYTES], id: &ControllerIdentity) {
    out.fill(0);
    let io = id.controller_type == ControllerType::Io;
    if io {
        put_space_padded(&mut out[4..24], id.serial_number);
        put_space_padded(&mut out[24..64], id.model_number);
        out[72] = 6; // RAB
        out[76] = 0x02; // CMIC: more than one controller per subsystem
    }
    put_space_padded(&mut out[64..72], id.firmware_revision);
    out[77] = id.mdts;
    put16(out, 78, id.cntlid);
    put32(out, 80, id.version);
    put32(out, 92, id.oaes);
    put32(out, 96, 1); // CTRATT: 128-bit host identifier
    out[111] = id.controller_type as u8;
    out[258] = 3; // ACL: 4 aborts
    out[259] = 3; // AERL: 4 outstanding AERs
    out[260] = 0x03; // FRMW: slot 1 read-only, one slot
    out[261] = 0x04; // LPA: extended data for Get Log Page
    out[262] = 127; // ELPE
    put16(out, 320, id.kas_100ms);
    out[512] = 0x66; // SQES
    out[513] = 0x44; // CQES
    put16(out, 514, id.max_cmd);
    put32(out, 516, id.nn);
    put16(out, 520, id.oncs);
    if io && id.volatile_write_cache {
        // Present; flush with NSID FFFFFFFFh not supported (bits 2:1 = 10b).
        out[525] = 0x01 | (0x2 << 1);
    }
    // SGLS: supported (byte aligned), keyed, SGL offset for in-capsule data.
    put32(out, 536, 0x1 | 1 << 2 | 1 << 20);
    put_nul_padded(&mut out[768..1024], id.subnqn);
    put32(out, 1792, (64 + id.in_capsule_data_bytes) / 16); // IOCCSZ
    put32(out, 1796, 1); // IORCSZ
    put16(out, 1800, 0); // ICDOFF: Linux refuses anything else
    out[1802] = 0; // FCATT: dynamic controller model
    out[1803] = 1; // MSDBD
}

/// What a namespace reports about itself.
#[derive(Clone, Copy, Debug)]
pub struct NamespaceIdentity {
    pub num_blocks: u64,
    pub block_size: u32,
    /// Namespace globally unique identifier (big-endian byte string).
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    /// Deallocated blocks read as zeroes (DLFEAT).
    pub deallocated_reads_zeroes: bool,
    pub optimal_io_boundary_blocks: u16,
}

/// Identify Namespace (CNS 00h), one LBA format.
pub fn namespace(out: &mut [u8; IDENTIFY_BYTES], ns: &NamespaceIdentity) {
    out.fill(0);
    put64(out, 0, ns.num_blocks); // NSZE
    put64(out, 8, ns.num_blocks); // NCAP
    put64(out, 16, ns.num_blocks); // NUSE
    out[25] = 0; // NLBAF: one format
    out[26] = 0; // FLBAS: format 0
    out[30] = 1; // NMIC: may be shared by controllers
    if ns.deallocated_reads_zeroes {
        out[33] = 0x01 | 0x08; // DLFEAT: zeroes; write zeroes may deallocate
    }
    put16(out, 46, ns.optimal_io_boundary_blocks);
    out[104..120].copy_from_slice(&ns.nguid);
    // LBAF0: no metadata, LBADS = log2(block size).
    out[128 + 2] = ns.block_size.trailing_zeros() as u8;
}

/// Namespace identification descriptors (CNS 03h): NGUID, UUID, then CSI
/// last (its 1-byte length leaves the next descriptor unaligned).
pub fn ns_descriptors(out: &mut [u8; IDENTIFY_BYTES], ns: &NamespaceIdentity) {
    out.fill(0);
    let mut pos = 0;
    for (nidt, id) in [(2u8, &ns.nguid[..]), (3u8, &ns.uuid[..])] {
        out[pos] = nidt;
        out[pos + 1] = id.len() as u8;
        out[pos + 4..pos + 4 + id.len()].copy_from_slice(id);
        pos += 4 + id.len();
    }
    out[pos] = 4; // CSI
    out[pos + 1] = 1;
    out[pos + 4] = 0; // NVM command set
}

/// Active namespace list (CNS 02h): the NSIDs greater than `after`,
/// ascending, at most 1024. `nsids` must be sorted.
pub fn active_ns_list(out: &mut [u8; IDENTIFY_BYTES], nsids: &[u32], after: u32) {
    out.fill(0);
    for (i, nsid) in nsids.iter().filter(|&&n| n > after).take(1024).enumerate() {
        put32(out, i * 4, *nsid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{le16, le32, le64};

    fn io_identity() -> ControllerIdentity<'static> {
        ControllerIdentity {
            controller_type: ControllerType::Io,
            serial_number: "FP0001",
            model_number: "Ferroplane Controller",
            firmware_revision: "0.1.0",
            cntlid: 1,
            version: 0x0001_0300,
            mdts: 5,
            kas_100ms: 100,
            max_cmd: 128,
            nn: 32,
            oncs: oncs::DSM | oncs::WRITE_ZEROES | oncs::COMPARE,
            volatile_write_cache: true,
            in_capsule_data_bytes: 4096,
            subnqn: "nqn.2016-06.io.spdk:cnode1",
            oaes: OAES_NS_ATTRIBUTE,
        }
    }

    #[test]
    fn controller_fields_sit_where_linux_reads_them() {
        let mut b = [0u8; IDENTIFY_BYTES];
        controller(&mut b, &io_identity());
        assert_eq!(&b[4..10], b"FP0001");
        assert_eq!(b[23], b' ', "SN is space padded");
        assert_eq!(b[77], 5);
        assert_eq!(le16(&b, 78), 1);
        assert_eq!(le32(&b, 80), 0x0001_0300);
        assert_eq!(b[111], 1);
        assert_eq!(le16(&b, 320), 100);
        assert_eq!((b[512], b[513]), (0x66, 0x44));
        assert_eq!(le32(&b, 516), 32);
        assert_eq!(le16(&b, 520), 0x0D);
        assert_eq!(b[525] & 1, 1);
        assert_ne!(le32(&b, 536) & 0x3, 0, "SGLs must be supported");
        assert_eq!(&b[768..794], b"nqn.2016-06.io.spdk:cnode1");
        assert_eq!(b[794], 0);
        assert_eq!(le32(&b, 1792), 260, "IOCCSZ for 4 KiB in-capsule data");
        assert_eq!(le32(&b, 1796), 1);
        assert_eq!(le16(&b, 1800), 0);
        assert_eq!(b[1803], 1);
    }

    #[test]
    fn namespace_and_descriptors() {
        let ns = NamespaceIdentity {
            num_blocks: 131072,
            block_size: 4096,
            nguid: [0xAB; 16],
            uuid: [0xCD; 16],
            deallocated_reads_zeroes: true,
            optimal_io_boundary_blocks: 0,
        };
        let mut b = [0u8; IDENTIFY_BYTES];
        namespace(&mut b, &ns);
        assert_eq!(le64(&b, 0), 131072);
        assert_eq!(le64(&b, 8), 131072, "NCAP 0 would hide the namespace");
        assert_eq!(b[130], 12, "LBADS of 4096-byte blocks");
        assert_eq!(b[30], 1);
        ns_descriptors(&mut b, &ns);
        assert_eq!((b[0], b[1]), (2, 16));
        assert_eq!(&b[4..20], &[0xAB; 16]);
        assert_eq!((b[20], b[21]), (3, 16));
        assert_eq!(&b[24..40], &[0xCD; 16]);
        assert_eq!((b[40], b[41], b[44]), (4, 1, 0));
        assert_eq!(b[45], 0, "list ends");
        active_ns_list(&mut b, &[1, 2, 5], 1);
        assert_eq!((le32(&b, 0), le32(&b, 4), le32(&b, 8)), (2, 5, 0));
    }
}
