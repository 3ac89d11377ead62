//! The discovery log page (LID 70h; NVMe over Fabrics 1.1, 5.3): a
//! 1024-byte header and one 1024-byte entry per reachable subsystem port.

use super::{put16, put64};

pub const LOG_DISCOVERY: u8 = 0x70;
pub const HEADER_BYTES: usize = 1024;
pub const ENTRY_BYTES: usize = 1024;

/// One subsystem port a host may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub ipv6: bool,
    /// 2: NVM subsystem, 3: this discovery subsystem.
    pub subtype: u8,
    pub portid: u16,
    pub asqsz: u16,
    pub trsvcid: String,
    pub traddr: String,
    pub subnqn: String,
}

fn put_str(field: &mut [u8], s: &str, pad: u8) {
    field.fill(pad);
    let n = s.len().min(field.len() - 1);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
    if pad == 0 {
        field[n] = 0;
    }
}

/// The whole log page for `entries`.
pub fn log_page(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_BYTES + ENTRY_BYTES * entries.len()];
    put64(&mut b, 0, genctr);
    put64(&mut b, 8, entries.len() as u64);
    for (i, e) in entries.iter().enumerate() {
        let o = HEADER_BYTES + i * ENTRY_BYTES;
        let d = &mut b[o..o + ENTRY_BYTES];
        d[0] = 3; // TCP
        d[1] = if e.ipv6 { 2 } else { 1 };
        d[2] = e.subtype;
        d[3] = 0x2; // secure channel not required
        put16(d, 4, e.portid);
        put16(d, 6, 0xFFFF); // dynamic controller model
        put16(d, 8, e.asqsz);
        // SPDK space-pads the address fields; hosts trim either.
        put_str(&mut d[32..64], &e.trsvcid, b' ');
        put_str(&mut d[256..512], &e.subnqn, 0);
        put_str(&mut d[512..768], &e.traddr, b' ');
        d[768] = 0; // TCP sectype: none
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{le16, le64};

    #[test]
    fn entries_sit_where_libnvme_reads_them() {
        let e = DiscoveryEntry {
            ipv6: false,
            subtype: 2,
            portid: 1,
            asqsz: 128,
            trsvcid: "4420".into(),
            traddr: "127.0.0.1".into(),
            subnqn: "nqn.2016-06.io.spdk:cnode1".into(),
        };
        let b = log_page(7, &[e]);
        assert_eq!(b.len(), 2048);
        assert_eq!((le64(&b, 0), le64(&b, 8)), (7, 1));
        let d = &b[1024..];
        assert_eq!((d[0], d[1], d[2]), (3, 1, 2));
        assert_eq!(le16(d, 6), 0xFFFF);
        assert_eq!(&d[32..36], b"4420");
        assert_eq!(d[36], b' ');
        assert_eq!(&d[256..282], b"nqn.2016-06.io.spdk:cnode1");
        assert_eq!(d[282], 0);
        assert_eq!(&d[512..521], b"127.0.0.1");
    }
}
