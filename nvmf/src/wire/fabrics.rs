//! Fabrics commands (opcode 0x7F; NVMe over Fabrics 1.1, section 3):
//! Connect with its 1024-byte data, Property Get/Set, and the controller
//! registers they reach (NVMe Base 2.0, 3.1.3: CAP, VS, CC, CSTS).

use static_assertions::const_assert_eq;

use super::nvme::Sqe;
use super::{le16, le32, le64};

/// Fabrics command types (SQE byte 4).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECV: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

pub const CONNECT_DATA_BYTES: usize = 1024;
pub const NQN_FIELD_BYTES: usize = 256;
/// NVMe Base 2.0, 4.5: an NQN is at most 223 bytes (its field then has
/// the NUL within the first 224).
pub const NQN_MAX_BYTES: usize = 223;
/// cntlid in an admin Connect asking for the dynamic controller model.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;
/// CATTR bit 2: the host disabled SQ flow control (CQE SQHD = 0xFFFF).
pub const CATTR_DISABLE_SQ_FLOW: u8 = 0x04;

/// Byte offsets of Connect fields, reported in IPO when one is invalid.
pub mod connect_offset {
    /// In the SQE (IATTR 0).
    pub const RECFMT: u16 = 40;
    pub const QID: u16 = 42;
    pub const SQSIZE: u16 = 44;
    /// In the connect data (IATTR 1).
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

/// The Connect fields of a fabrics SQE (3.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ConnectCmd {
    pub recfmt: u16,
    pub qid: u16,
    /// 0's based submission queue size.
    pub sqsize: u16,
    pub cattr: u8,
    /// Keep-alive timeout in milliseconds (admin queue; 0 = none).
    pub kato_ms: u32,
}

impl ConnectCmd {
    pub fn from_sqe(sqe: &Sqe) -> ConnectCmd {
        let b = &sqe.0;
        ConnectCmd {
            recfmt: le16(b, 40),
            qid: le16(b, 42),
            sqsize: le16(b, 44),
            cattr: b[46],
            kato_ms: le32(b, 48),
        }
    }

    pub fn write(&self, sqe: &mut Sqe) {
        sqe.0[40..42].copy_from_slice(&self.recfmt.to_le_bytes());
        sqe.0[42..44].copy_from_slice(&self.qid.to_le_bytes());
        sqe.0[44..46].copy_from_slice(&self.sqsize.to_le_bytes());
        sqe.0[46] = self.cattr;
        sqe.0[48..52].copy_from_slice(&self.kato_ms.to_le_bytes());
    }
}

/// The 1024-byte Connect data (3.3, figure 20).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// A Connect data field that is not a valid NQN: its IPO.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BadConnectField(pub u16);

/// An NQN field: NUL-terminated within [`NQN_MAX_BYTES`] + 1 bytes (as
/// SPDK checks), printable ASCII, and not empty unless `may_be_empty`.
fn nqn_field(b: &[u8], off: u16, may_be_empty: bool) -> Result<String, BadConnectField> {
    let field = &b[off as usize..off as usize + NQN_MAX_BYTES + 1];
    let end = field
        .iter()
        .position(|&c| c == 0)
        .ok_or(BadConnectField(off))?;
    let s = &field[..end];
    if (s.is_empty() && !may_be_empty) || !s.iter().all(|c| c.is_ascii_graphic()) {
        return Err(BadConnectField(off));
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

impl ConnectData {
    pub fn parse(b: &[u8]) -> Result<ConnectData, BadConnectField> {
        if b.len() < CONNECT_DATA_BYTES {
            return Err(BadConnectField(0));
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[..16]);
        Ok(ConnectData {
            hostid,
            cntlid: le16(b, 16),
            subnqn: nqn_field(b, connect_offset::SUBNQN, false)?,
            // SPDK's initiator (v26.x) sends an empty host NQN when none is
            // configured; whether that host may connect is the
            // subsystem's access control's call (allow_any_host).
            hostnqn: nqn_field(b, connect_offset::HOSTNQN, true)?,
        })
    }

    /// Encodes; NQNs longer than 255 bytes are cut (the caller validates).
    pub fn encode(&self, out: &mut [u8; CONNECT_DATA_BYTES]) {
        out.fill(0);
        out[..16].copy_from_slice(&self.hostid);
        out[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        for (off, s) in [(256usize, &self.subnqn), (512, &self.hostnqn)] {
            let n = s.len().min(NQN_FIELD_BYTES - 1);
            out[off..off + n].copy_from_slice(&s.as_bytes()[..n]);
        }
    }
}

/// CQE DW0 for a Connect that failed with Invalid Parameters: the field's
/// offset (IPO) and whether it is in the connect data (IATTR).
pub fn connect_invalid_param_dw0(ipo: u16, in_data: bool) -> u32 {
    ipo as u32 | ((in_data as u32) << 16)
}

/// Property Get/Set (3.4, 3.5).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PropertyCmd {
    /// 4 or 8.
    pub size: u8,
    pub offset: u32,
    /// Property Set only.
    pub value: u64,
}

impl PropertyCmd {
    pub fn from_sqe(sqe: &Sqe) -> PropertyCmd {
        let b = &sqe.0;
        PropertyCmd {
            size: if b[40] & 0x7 == 1 { 8 } else { 4 },
            offset: le32(b, 44),
            value: le64(b, 48),
        }
    }

    pub fn write(&self, sqe: &mut Sqe) {
        sqe.0[40] = if self.size == 8 { 1 } else { 0 };
        sqe.0[44..48].copy_from_slice(&self.offset.to_le_bytes());
        sqe.0[48..56].copy_from_slice(&self.value.to_le_bytes());
    }
}

/// Controller register offsets reachable by Property Get/Set.
pub mod reg {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
}

/// NVMe 1.3: what SPDK and Linux targets report, and what we implement.
pub const VERSION_1_3: u32 = 0x0001_0300;

/// CAP for a fabrics controller: `mqes` 0's based, NVM command set, page
/// size 4 KiB only, `timeout_500ms` worst case for CSTS.RDY to follow CC.EN.
pub fn cap(mqes: u16, timeout_500ms: u8) -> u64 {
    mqes as u64 | 1 << 16 /* CQR */ | (timeout_500ms as u64) << 24 | 1 << 37 /* CSS NVM */
}

/// CC fields (3.1.3.5).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Cc(pub u32);

impl Cc {
    pub fn en(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn css(self) -> u32 {
        (self.0 >> 4) & 0x7
    }
    pub fn mps(self) -> u32 {
        (self.0 >> 7) & 0xF
    }
    pub fn shn(self) -> u32 {
        (self.0 >> 14) & 0x3
    }
    pub fn iosqes(self) -> u32 {
        (self.0 >> 16) & 0xF
    }
    pub fn iocqes(self) -> u32 {
        (self.0 >> 20) & 0xF
    }
}

/// CSTS bits.
pub mod csts {
    pub const RDY: u32 = 0x1;
    pub const CFS: u32 = 0x2;
    /// SHST = 10b: shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 0x2 << 2;
}

const_assert_eq!(CONNECT_DATA_BYTES, 4 * NQN_FIELD_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::nvme::{SglDescriptor, OPC_FABRICS};

    #[test]
    fn connect_round_trips_at_spec_offsets() {
        let mut sqe = Sqe::default();
        sqe.set_opcode(OPC_FABRICS)
            .set_fctype(fctype::CONNECT)
            .set_sgl(SglDescriptor::in_capsule(0, 1024));
        let c = ConnectCmd {
            recfmt: 0,
            qid: 0,
            sqsize: 31,
            cattr: 0,
            kato_ms: 5000,
        };
        c.write(&mut sqe);
        assert_eq!(&sqe.0[44..46], &31u16.to_le_bytes());
        assert_eq!(&sqe.0[48..52], &5000u32.to_le_bytes());
        assert_eq!(ConnectCmd::from_sqe(&sqe), c);
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: "nqn.2016-06.io.spdk:cnode1".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427".into(),
        };
        let mut b = [0u8; CONNECT_DATA_BYTES];
        d.encode(&mut b);
        assert_eq!(&b[16..18], &[0xFF, 0xFF]);
        assert_eq!(&b[256..260], b"nqn.");
        assert_eq!(ConnectData::parse(&b).unwrap(), d);
    }

    #[test]
    fn bad_nqns_report_their_offset() {
        let mut b = [0u8; CONNECT_DATA_BYTES];
        // Empty subsystem NQN.
        assert_eq!(ConnectData::parse(&b), Err(BadConnectField(256)));
        b[256..260].copy_from_slice(b"nqn1");
        // An empty host NQN is well-formed (access control decides).
        assert_eq!(ConnectData::parse(&b).unwrap().hostnqn, "");
        // No NUL in the host NQN field, or none within 224 bytes.
        b[512..768].fill(b'a');
        assert_eq!(ConnectData::parse(&b), Err(BadConnectField(512)));
        b[512 + NQN_MAX_BYTES + 1] = 0;
        assert_eq!(ConnectData::parse(&b), Err(BadConnectField(512)));
        b[512 + NQN_MAX_BYTES] = 0;
        assert_eq!(ConnectData::parse(&b).unwrap().hostnqn.len(), 223);
        b[600] = 0x07; // control character
        assert_eq!(ConnectData::parse(&b), Err(BadConnectField(512)));
        assert_eq!(ConnectData::parse(&b[..100]), Err(BadConnectField(0)));
        assert_eq!(connect_invalid_param_dw0(256, true), 0x1_0100);
    }

    #[test]
    fn property_and_register_fields() {
        let mut sqe = Sqe::default();
        let p = PropertyCmd {
            size: 8,
            offset: reg::CAP,
            value: 0,
        };
        p.write(&mut sqe);
        assert_eq!(sqe.0[40], 1);
        assert_eq!(PropertyCmd::from_sqe(&sqe), p);
        let c = cap(127, 30);
        assert_eq!(c & 0xFFFF, 127);
        assert_eq!((c >> 24) & 0xFF, 30);
        assert_eq!((c >> 48) & 0xF, 0, "MPSMIN must be 0 for Linux hosts");
        assert_ne!(c & (1 << 37), 0);
        // What Linux writes to enable: IOSQES 6, IOCQES 4, EN.
        let cc = Cc(6 << 16 | 4 << 20 | 1);
        assert!(cc.en());
        assert_eq!((cc.iosqes(), cc.iocqes(), cc.mps(), cc.css()), (6, 4, 0, 0));
    }
}
