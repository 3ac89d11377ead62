//! NVMe/TCP PDU headers (NVMe/TCP Transport Specification 1.0, 3.6).
//!
//! Every PDU starts with an 8-byte common header (type, flags, hlen, pdo,
//! plen). [`check`] validates a received common header against the PDU
//! type's fixed layout and the digests the connection negotiated, and
//! returns where the header digest, data and data digest lie; a failure
//! carries the fatal error status (FES) and field offset (FEI) that a
//! termination request reports. Encoders write the headers this side sends.
//!
//! Wire layout of a PDU: `CH+PSH (hlen) | HDGST (4) | PAD | DATA | DDGST (4)`.

use static_assertions::const_assert_eq;

use super::nvme::{Cqe, Sqe, CQE_BYTES, SQE_BYTES};
use super::{le16, le32, put16, put32};

pub const CH_BYTES: usize = 8;
pub const IC_BYTES: usize = 128;
/// CapsuleCmd header: common header + SQE.
pub const CAPSULE_CMD_HLEN: usize = CH_BYTES + SQE_BYTES;
/// CapsuleResp, H2CData, C2HData, R2T and TermReq headers.
pub const SHORT_HLEN: usize = 24;
pub const DIGEST_BYTES: usize = 4;
/// Largest PDO a receiver accepts: (31 + 1) dwords of alignment.
pub const MAX_PDO: usize = 128;
/// TermReq carries at most this much of the offending header.
pub const TERM_REQ_MAX_DATA: usize = 128;
/// Largest PDU we accept: bounds what a peer can make us buffer (a 16 MiB
/// transfer plus headers; MDTS and MAXH2CDATA keep real PDUs far smaller).
pub const MAX_PLEN: u32 = (16 << 20) + 256;

const_assert_eq!(CAPSULE_CMD_HLEN, 72);
const_assert_eq!(CH_BYTES + CQE_BYTES, SHORT_HLEN);

/// Common-header flags.
pub mod flags {
    pub const HDGSTF: u8 = 0x01;
    pub const DDGSTF: u8 = 0x02;
    /// H2CData/C2HData: last PDU of the transfer.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command succeeded; no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal error status of a termination request (3.6.2.9).
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

impl PduType {
    pub fn from_u8(v: u8) -> Option<PduType> {
        Some(match v {
            0x00 => PduType::IcReq,
            0x01 => PduType::IcResp,
            0x02 => PduType::H2CTermReq,
            0x03 => PduType::C2HTermReq,
            0x04 => PduType::CapsuleCmd,
            0x05 => PduType::CapsuleResp,
            0x06 => PduType::H2CData,
            0x07 => PduType::C2HData,
            0x09 => PduType::R2T,
            _ => return None,
        })
    }

    /// The fixed header length (CH + PDU-specific header).
    pub fn hlen(self) -> usize {
        match self {
            PduType::IcReq | PduType::IcResp => IC_BYTES,
            PduType::CapsuleCmd => CAPSULE_CMD_HLEN,
            _ => SHORT_HLEN,
        }
    }

    /// Whether a negotiated header digest follows this type's header.
    pub fn has_header_digest(self) -> bool {
        matches!(
            self,
            PduType::CapsuleCmd
                | PduType::CapsuleResp
                | PduType::H2CData
                | PduType::C2HData
                | PduType::R2T
        )
    }

    /// Whether this type may carry data (and so a data digest).
    pub fn may_carry_data(self) -> bool {
        matches!(
            self,
            PduType::CapsuleCmd | PduType::H2CData | PduType::C2HData
        )
    }

    /// Sent by the host (received by a controller).
    pub fn is_host_to_controller(self) -> bool {
        matches!(
            self,
            PduType::IcReq | PduType::H2CTermReq | PduType::CapsuleCmd | PduType::H2CData
        )
    }
}

/// The 8-byte common header (3.6.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    pub fn parse(b: &[u8]) -> Option<CommonHeader> {
        if b.len() < CH_BYTES {
            return None;
        }
        Some(CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: le32(b, 4),
        })
    }

    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.pdu_type;
        b[1] = self.flags;
        b[2] = self.hlen;
        b[3] = self.pdo;
        put32(b, 4, self.plen);
    }
}

/// Digests a connection negotiated in ICReq/ICResp.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    pub fn from_bits(b: u8) -> Digests {
        Digests {
            header: b & 0x01 != 0,
            data: b & 0x02 != 0,
        }
    }

    pub fn bits(self) -> u8 {
        self.header as u8 | (self.data as u8) << 1
    }
}

/// A received PDU's fatal problem, as a termination request reports it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PduError {
    pub fes: u16,
    /// Byte offset of the offending field (for FES 1 and 6), else 0.
    pub fei: u32,
    pub reason: &'static str,
}

impl PduError {
    pub fn field(fei: u32, reason: &'static str) -> PduError {
        PduError {
            fes: fes::INVALID_HEADER_FIELD,
            fei,
            reason,
        }
    }

    pub fn sequence(reason: &'static str) -> PduError {
        PduError {
            fes: fes::PDU_SEQUENCE_ERROR,
            fei: 0,
            reason,
        }
    }
}

impl std::fmt::Display for PduError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (FES {:#x}, FEI {})", self.reason, self.fes, self.fei)
    }
}

/// Where the parts of a checked PDU lie, as offsets from its start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PduLayout {
    pub pdu_type: PduType,
    pub hlen: usize,
    /// Whether a header digest follows the header.
    pub header_digest: bool,
    /// Offset of the first data byte (== plen when there is no data).
    pub data_offset: usize,
    pub data_len: usize,
    pub data_digest: bool,
    pub plen: usize,
}

impl PduLayout {
    /// A PDU without data: header (and header digest) only.
    fn header_only(pdu_type: PduType, header_digest: bool, plen: usize) -> PduLayout {
        PduLayout {
            pdu_type,
            hlen: pdu_type.hlen(),
            header_digest,
            data_offset: plen,
            data_len: 0,
            data_digest: false,
            plen,
        }
    }

    /// Bytes to read before the data: header, header digest, padding.
    pub fn header_bytes(&self) -> usize {
        if self.data_len == 0 {
            self.plen
        } else {
            self.data_offset
        }
    }
}

/// Validates a received common header. `from_host`: we are the controller
/// (only host PDU types are legal); `digests`: what was negotiated (before
/// ICResp, none).
pub fn check(ch: &CommonHeader, from_host: bool, digests: Digests) -> Result<PduLayout, PduError> {
    let t = PduType::from_u8(ch.pdu_type).ok_or(PduError::field(0, "unknown PDU type"))?;
    if t.is_host_to_controller() != from_host {
        return Err(PduError::field(0, "PDU type not valid in this direction"));
    }
    let hlen = t.hlen();
    if ch.hlen as usize != hlen {
        return Err(PduError::field(2, "wrong header length for the PDU type"));
    }
    if ch.plen > MAX_PLEN {
        return Err(PduError::field(4, "PDU length too large"));
    }
    let plen = ch.plen as usize;
    let pdo = ch.pdo as usize;
    match t {
        PduType::IcReq | PduType::IcResp => {
            if plen != IC_BYTES {
                return Err(PduError::field(4, "ICReq/ICResp length must be 128"));
            }
            if pdo != 0 {
                return Err(PduError::field(3, "ICReq/ICResp PDO must be 0"));
            }
            return Ok(PduLayout::header_only(t, false, plen));
        }
        PduType::H2CTermReq | PduType::C2HTermReq => {
            if !(SHORT_HLEN..=SHORT_HLEN + TERM_REQ_MAX_DATA).contains(&plen) {
                return Err(PduError::field(4, "TermReq length out of range"));
            }
            return Ok(PduLayout {
                pdu_type: t,
                hlen,
                header_digest: false,
                data_offset: hlen,
                data_len: plen - hlen,
                data_digest: false,
                plen,
            });
        }
        _ => {}
    }
    let hd = if digests.header && t.has_header_digest() {
        DIGEST_BYTES
    } else {
        0
    };
    let header_end = hlen + hd;
    if plen < header_end {
        return Err(PduError::field(4, "PDU length shorter than its header"));
    }
    if plen == header_end {
        if matches!(t, PduType::H2CData | PduType::C2HData) {
            return Err(PduError::field(4, "data PDU without data"));
        }
        return Ok(PduLayout::header_only(t, hd != 0, plen));
    }
    if !t.may_carry_data() {
        return Err(PduError::field(4, "PDU length longer than its header"));
    }
    if pdo < header_end || pdo > MAX_PDO || pdo >= plen {
        return Err(PduError::field(3, "bad PDU data offset"));
    }
    let dd = if digests.data { DIGEST_BYTES } else { 0 };
    if plen < pdo + dd + 1 {
        return Err(PduError::field(4, "PDU length leaves no data"));
    }
    Ok(PduLayout {
        pdu_type: t,
        hlen,
        header_digest: hd != 0,
        data_offset: pdo,
        data_len: plen - pdo - dd,
        data_digest: dd != 0,
        plen,
    })
}

/// Zeroes `b` and writes an ICReq/ICResp common header (hlen = plen = 128).
fn start_ic(b: &mut [u8; IC_BYTES], t: PduType) {
    b.fill(0);
    CommonHeader {
        pdu_type: t as u8,
        flags: 0,
        hlen: IC_BYTES as u8,
        pdo: 0,
        plen: IC_BYTES as u32,
    }
    .write(b);
}

/// ICReq (3.6.2.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment, 0's based dwords.
    pub hpda: u8,
    pub digests: Digests,
    /// Max outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

impl IcReq {
    /// Parses a whole 128-byte ICReq whose common header passed [`check`].
    pub fn parse(b: &[u8]) -> Result<IcReq, PduError> {
        if b.len() < IC_BYTES {
            return Err(PduError::field(4, "short ICReq"));
        }
        let r = IcReq {
            pfv: le16(b, 8),
            hpda: b[10],
            digests: Digests::from_bits(b[11]),
            maxr2t: le32(b, 12),
        };
        if r.pfv != 0 {
            return Err(PduError::field(8, "unsupported PDU format version"));
        }
        if r.hpda > 31 {
            return Err(PduError::field(10, "HPDA out of range"));
        }
        Ok(r)
    }

    pub fn encode(&self, b: &mut [u8; IC_BYTES]) {
        start_ic(b, PduType::IcReq);
        put16(b, 8, self.pfv);
        b[10] = self.hpda;
        b[11] = self.digests.bits();
        put32(b, 12, self.maxr2t);
    }
}

/// ICResp (3.6.2.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment, 0's based dwords (Linux hosts need 0).
    pub cpda: u8,
    pub digests: Digests,
    /// Most data bytes in one H2CData PDU (multiple of 4, >= 4096).
    pub maxh2cdata: u32,
}

impl IcResp {
    pub fn parse(b: &[u8]) -> Result<IcResp, PduError> {
        if b.len() < IC_BYTES {
            return Err(PduError::field(4, "short ICResp"));
        }
        let r = IcResp {
            pfv: le16(b, 8),
            cpda: b[10],
            digests: Digests::from_bits(b[11]),
            maxh2cdata: le32(b, 12),
        };
        if r.pfv != 0 {
            return Err(PduError::field(8, "unsupported PDU format version"));
        }
        if r.maxh2cdata < 4096 || !r.maxh2cdata.is_multiple_of(4) {
            return Err(PduError::field(
                12,
                "MAXH2CDATA below 4096 or not a multiple of 4",
            ));
        }
        Ok(r)
    }

    pub fn encode(&self, b: &mut [u8; IC_BYTES]) {
        start_ic(b, PduType::IcResp);
        put16(b, 8, self.pfv);
        b[10] = self.cpda;
        b[11] = self.digests.bits();
        put32(b, 12, self.maxh2cdata);
    }
}

/// Writes a termination request (C2H when `to_host`) carrying `error` and
/// up to 128 bytes of the offending header; returns its length.
pub fn encode_term_req(
    out: &mut [u8; SHORT_HLEN + TERM_REQ_MAX_DATA],
    to_host: bool,
    error: &PduError,
    offending_header: &[u8],
) -> usize {
    let n = offending_header.len().min(TERM_REQ_MAX_DATA);
    let plen = SHORT_HLEN + n;
    out[..SHORT_HLEN].fill(0);
    CommonHeader {
        pdu_type: if to_host {
            PduType::C2HTermReq
        } else {
            PduType::H2CTermReq
        } as u8,
        flags: 0,
        hlen: SHORT_HLEN as u8,
        pdo: 0,
        plen: plen as u32,
    }
    .write(out);
    put16(out, 8, error.fes);
    let fei = if matches!(
        error.fes,
        fes::INVALID_HEADER_FIELD | fes::UNSUPPORTED_PARAMETER
    ) {
        error.fei
    } else {
        0
    };
    put32(out, 10, fei);
    out[SHORT_HLEN..plen].copy_from_slice(&offending_header[..n]);
    plen
}

/// A received termination request's status.
pub fn parse_term_req(b: &[u8]) -> Option<(u16, u32)> {
    if b.len() < SHORT_HLEN {
        return None;
    }
    Some((le16(b, 8), le32(b, 10)))
}

fn digest_flags(layout_hd: bool, data_dd: bool) -> u8 {
    (if layout_hd { flags::HDGSTF } else { 0 }) | (if data_dd { flags::DDGSTF } else { 0 })
}

/// Writes a CapsuleResp header (and header digest if negotiated); returns
/// its length.
#[inline]
pub fn encode_capsule_resp(
    out: &mut [u8; SHORT_HLEN + DIGEST_BYTES],
    cqe: &Cqe,
    digests: Digests,
) -> usize {
    let hd = if digests.header { DIGEST_BYTES } else { 0 };
    let plen = SHORT_HLEN + hd;
    CommonHeader {
        pdu_type: PduType::CapsuleResp as u8,
        flags: digest_flags(digests.header, false),
        hlen: SHORT_HLEN as u8,
        pdo: 0,
        plen: plen as u32,
    }
    .write(out);
    out[CH_BYTES..SHORT_HLEN].copy_from_slice(&cqe.0);
    if digests.header {
        let d = super::crc32c_digest(&out[..SHORT_HLEN]);
        put32(out, SHORT_HLEN, d);
    }
    plen
}

/// The shared 24-byte header of H2CData, C2HData and R2T (3.6.2.7-3.6.2.8):
/// command id, transfer tag, offset and length.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DataHeader {
    pub cccid: u16,
    /// H2CData: the R2T's tag; R2T: the tag the host must echo;
    /// C2HData: reserved (0).
    pub ttag: u16,
    pub offset: u32,
    pub length: u32,
}

impl DataHeader {
    pub fn parse(b: &[u8]) -> Option<DataHeader> {
        if b.len() < SHORT_HLEN {
            return None;
        }
        Some(DataHeader {
            cccid: le16(b, 8),
            ttag: le16(b, 10),
            offset: le32(b, 12),
            length: le32(b, 16),
        })
    }

    /// Writes a C2HData, H2CData or R2T header (with header digest when
    /// negotiated). For data PDUs, `plen` counts `self.length` data bytes
    /// plus the data digest; the data itself follows at the returned
    /// length. No padding (Linux hosts require CPDA 0). Returns the header
    /// length.
    #[inline]
    pub fn encode(
        &self,
        out: &mut [u8; SHORT_HLEN + DIGEST_BYTES],
        pdu_type: PduType,
        extra_flags: u8,
        digests: Digests,
    ) -> usize {
        let hd = if digests.header { DIGEST_BYTES } else { 0 };
        let header = SHORT_HLEN + hd;
        let carries = pdu_type != PduType::R2T;
        let dd = if carries && digests.data {
            DIGEST_BYTES
        } else {
            0
        };
        let plen = if carries {
            header + self.length as usize + dd
        } else {
            header
        };
        out[..SHORT_HLEN].fill(0);
        CommonHeader {
            pdu_type: pdu_type as u8,
            flags: digest_flags(digests.header, dd != 0) | extra_flags,
            hlen: SHORT_HLEN as u8,
            pdo: if carries { header as u8 } else { 0 },
            plen: plen as u32,
        }
        .write(out);
        put16(out, 8, self.cccid);
        put16(out, 10, self.ttag);
        put32(out, 12, self.offset);
        put32(out, 16, self.length);
        if digests.header {
            let d = super::crc32c_digest(&out[..SHORT_HLEN]);
            put32(out, SHORT_HLEN, d);
        }
        header
    }
}

/// Writes a CapsuleCmd header (CH + SQE + header digest) for `data_len`
/// bytes of in-capsule data; returns the header length (the data follows).
pub fn encode_capsule_cmd(
    out: &mut [u8; CAPSULE_CMD_HLEN + DIGEST_BYTES],
    sqe: &Sqe,
    data_len: usize,
    digests: Digests,
) -> usize {
    let hd = if digests.header { DIGEST_BYTES } else { 0 };
    let header = CAPSULE_CMD_HLEN + hd;
    let dd = if data_len > 0 && digests.data {
        DIGEST_BYTES
    } else {
        0
    };
    CommonHeader {
        pdu_type: PduType::CapsuleCmd as u8,
        flags: digest_flags(digests.header, dd != 0),
        hlen: CAPSULE_CMD_HLEN as u8,
        pdo: if data_len > 0 { header as u8 } else { 0 },
        plen: (header + data_len + dd) as u32,
    }
    .write(out);
    out[CH_BYTES..CAPSULE_CMD_HLEN].copy_from_slice(&sqe.0);
    if digests.header {
        let d = super::crc32c_digest(&out[..CAPSULE_CMD_HLEN]);
        put32(out, CAPSULE_CMD_HLEN, d);
    }
    header
}

/// Verifies a received header digest: `header` is the `hlen` bytes,
/// `digest` the 4 bytes after them.
pub fn header_digest_ok(header: &[u8], digest: &[u8]) -> bool {
    digest.len() >= DIGEST_BYTES && super::crc32c_digest(header) == le32(digest, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::nvme::{SglDescriptor, Status};

    const NONE: Digests = Digests {
        header: false,
        data: false,
    };
    const BOTH: Digests = Digests {
        header: true,
        data: true,
    };

    fn ch(t: PduType, hlen: usize, pdo: usize, plen: usize) -> CommonHeader {
        CommonHeader {
            pdu_type: t as u8,
            flags: 0,
            hlen: hlen as u8,
            pdo: pdo as u8,
            plen: plen as u32,
        }
    }

    #[test]
    fn icreq_and_icresp_round_trip_with_spec_offsets() {
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            digests: BOTH,
            maxr2t: 0,
        };
        let mut b = [0u8; IC_BYTES];
        req.encode(&mut b);
        assert_eq!(&b[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
        assert_eq!(b[11], 0x03);
        let c = CommonHeader::parse(&b).unwrap();
        let l = check(&c, true, NONE).unwrap();
        assert_eq!(l.pdu_type, PduType::IcReq);
        assert_eq!(IcReq::parse(&b).unwrap(), req);
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            digests: BOTH,
            maxh2cdata: 131072,
        };
        resp.encode(&mut b);
        assert_eq!(b[0], 1);
        assert_eq!(&b[12..16], &131072u32.to_le_bytes());
        assert_eq!(IcResp::parse(&b).unwrap(), resp);
        // Bad fields name their offsets.
        b[12] = 1;
        assert_eq!(IcResp::parse(&b).unwrap_err().fei, 12);
        req.encode(&mut b);
        b[8] = 1;
        assert_eq!(IcReq::parse(&b).unwrap_err().fei, 8);
        b[8] = 0;
        b[10] = 32;
        assert_eq!(IcReq::parse(&b).unwrap_err().fei, 10);
    }

    #[test]
    fn capsule_cmd_layouts_with_and_without_digests_and_data() {
        let mut sqe = Sqe::default();
        sqe.set_opcode(0x01)
            .set_cid(9)
            .set_sgl(SglDescriptor::in_capsule(0, 4096));
        for d in [NONE, BOTH] {
            let mut out = [0u8; CAPSULE_CMD_HLEN + DIGEST_BYTES];
            let hl = encode_capsule_cmd(&mut out, &sqe, 4096, d);
            let c = CommonHeader::parse(&out).unwrap();
            let l = check(&c, true, d).unwrap();
            assert_eq!(l.header_digest, d.header);
            assert_eq!(l.data_offset, hl);
            assert_eq!(l.data_len, 4096);
            assert_eq!(l.data_digest, d.data);
            assert_eq!(l.plen, hl + 4096 + if d.data { 4 } else { 0 });
            if d.header {
                assert!(header_digest_ok(&out[..72], &out[72..76]));
                out[20] ^= 1;
                assert!(!header_digest_ok(&out[..72], &out[72..76]));
            }
            // Without data: plen is just the header.
            let hl = encode_capsule_cmd(&mut out, &sqe, 0, d);
            let l = check(&CommonHeader::parse(&out).unwrap(), true, d).unwrap();
            assert_eq!((l.data_len, l.plen), (0, hl));
        }
    }

    #[test]
    fn data_pdus_and_r2t_encode_as_linux_expects() {
        let h = DataHeader {
            cccid: 0x1003,
            ttag: 0,
            offset: 0,
            length: 8192,
        };
        let mut out = [0u8; SHORT_HLEN + DIGEST_BYTES];
        let hl = h.encode(&mut out, PduType::C2HData, flags::LAST_PDU, BOTH);
        assert_eq!(hl, 28);
        let c = CommonHeader::parse(&out).unwrap();
        assert_eq!(c.flags, flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU);
        assert_eq!(c.pdo, 28);
        assert_eq!(c.plen, 28 + 8192 + 4);
        let l = check(&c, false, BOTH).unwrap();
        assert_eq!(l.data_len, 8192);
        assert_eq!(DataHeader::parse(&out).unwrap(), h);
        let r2t = DataHeader {
            cccid: 7,
            ttag: 3,
            offset: 0,
            length: 65536,
        };
        let hl = r2t.encode(&mut out, PduType::R2T, 0, NONE);
        let c = CommonHeader::parse(&out).unwrap();
        assert_eq!((hl, c.plen, c.pdo), (24, 24, 0));
        assert!(check(&c, false, NONE).is_ok());
        let mut resp = [0u8; SHORT_HLEN + DIGEST_BYTES];
        let n = encode_capsule_resp(&mut resp, &Cqe::new(7, Status::SUCCESS), BOTH);
        assert_eq!(n, 28);
        assert!(header_digest_ok(&resp[..24], &resp[24..28]));
    }

    #[test]
    fn malformed_headers_get_the_spec_status_and_field_offset() {
        let cases: [(CommonHeader, bool, Digests, u16, u32); 11] = [
            (
                CommonHeader {
                    pdu_type: 0x08,
                    flags: 0,
                    hlen: 24,
                    pdo: 0,
                    plen: 24,
                },
                true,
                NONE,
                1,
                0,
            ),
            (ch(PduType::CapsuleResp, 24, 0, 24), true, NONE, 1, 0),
            (ch(PduType::CapsuleCmd, 24, 0, 72), true, NONE, 1, 2),
            (ch(PduType::CapsuleCmd, 72, 0, 60), true, NONE, 1, 4),
            (ch(PduType::CapsuleCmd, 72, 0, 72), true, BOTH, 1, 4),
            (ch(PduType::CapsuleCmd, 72, 10, 200), true, NONE, 1, 3),
            (ch(PduType::CapsuleCmd, 72, 200, 300), true, NONE, 1, 3),
            (ch(PduType::IcReq, 128, 0, 129), true, NONE, 1, 4),
            (ch(PduType::H2CData, 24, 24, 24), true, NONE, 1, 4),
            (ch(PduType::H2CTermReq, 24, 0, 500), true, NONE, 1, 4),
            (
                ch(PduType::CapsuleCmd, 72, 72, MAX_PLEN as usize + 1),
                true,
                NONE,
                1,
                4,
            ),
        ];
        for (c, from_host, d, fes, fei) in cases {
            let e = check(&c, from_host, d).unwrap_err();
            assert_eq!((e.fes, e.fei), (fes, fei), "{c:?}: {e}");
        }
    }

    #[test]
    fn term_req_carries_fes_fei_and_the_offending_header() {
        let bad = [0x04u8, 0, 24, 0, 72, 0, 0, 0];
        let mut out = [0u8; SHORT_HLEN + TERM_REQ_MAX_DATA];
        let e = PduError::field(2, "wrong hlen");
        let n = encode_term_req(&mut out, true, &e, &bad);
        assert_eq!(n, 32);
        let c = CommonHeader::parse(&out).unwrap();
        assert_eq!((c.pdu_type, c.plen), (PduType::C2HTermReq as u8, 32));
        assert_eq!(parse_term_req(&out), Some((1, 2)));
        assert_eq!(&out[24..32], &bad);
        // FEI is reserved for sequence errors.
        let n = encode_term_req(&mut out, true, &PduError::sequence("x"), &[0u8; 300]);
        assert_eq!(n, SHORT_HLEN + TERM_REQ_MAX_DATA);
        assert_eq!(parse_term_req(&out), Some((2, 0)));
    }

    /// Any 8 bytes: `check` never panics, and what it accepts is
    /// self-consistent (the parts fit inside plen, in order).
    #[test]
    fn random_headers_never_panic_and_accepted_layouts_are_consistent() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed);
        let mut accepted = 0;
        for i in 0..500_000u32 {
            let mut b = [0u8; 8];
            rng.fill(&mut b[..]);
            // Bias towards plausible types and lengths so checks get deep.
            if i % 2 == 0 {
                b[0] %= 10;
                b[2] = [24u8, 72, 128][(b[2] % 3) as usize];
                b[5..8].fill(0);
            }
            let c = CommonHeader::parse(&b).unwrap();
            for from_host in [true, false] {
                for d in [NONE, BOTH] {
                    if let Ok(l) = check(&c, from_host, d) {
                        accepted += 1;
                        let dd = if l.data_digest { 4 } else { 0 };
                        assert!(l.hlen + if l.header_digest { 4 } else { 0 } <= l.header_bytes());
                        assert!(l.data_offset + l.data_len + dd <= l.plen, "{c:?} {l:?}");
                        assert!(l.plen <= MAX_PLEN as usize);
                    }
                }
            }
        }
        assert!(accepted > 1000, "the generator never reached valid headers");
    }
}
