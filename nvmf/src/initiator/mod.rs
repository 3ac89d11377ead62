//! NVMe/TCP host side: a blocking queue-pair connection (ICReq, fabrics
//! Connect, Property Set, capsules out, PDUs in), built on `crate::wire`.
//! Used by `ferroplane-perf` now; the `nvme` bdev module will build on the
//! same wire code with reactor-driven sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::wire::fabrics::{fctype, ConnectCmd, ConnectData, PropertyCmd, CNTLID_DYNAMIC};
use crate::wire::nvme::{Cqe, SglDescriptor, Sqe, FLAGS_PSDT_SGL, OPC_FABRICS};
use crate::wire::pdu::{
    check, encode_capsule_cmd, CommonHeader, DataHeader, Digests, IcReq, IcResp, PduLayout,
    PduType, CAPSULE_CMD_HLEN, CH_BYTES, DIGEST_BYTES, IC_BYTES, SHORT_HLEN,
};

#[derive(Debug)]
pub enum HostError {
    Io(std::io::Error),
    Protocol(String),
    Status(Cqe),
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::Io(e) => write!(f, "{e}"),
            HostError::Protocol(s) => write!(f, "protocol error: {s}"),
            HostError::Status(c) => write!(f, "command failed: {:?}", c.status()),
        }
    }
}

impl From<std::io::Error> for HostError {
    fn from(e: std::io::Error) -> Self {
        HostError::Io(e)
    }
}

/// What the host reads back for one PDU.
pub enum HostPdu {
    Resp(Cqe),
    /// C2HData: command id, offset, data.
    Data(u16, u32, Vec<u8>),
    /// R2T: command id, tag, offset, length.
    R2T(u16, u16, u32, u32),
}

/// One connected queue pair.
pub struct HostQueue {
    stream: TcpStream,
    pub digests: Digests,
    pub maxh2cdata: u32,
    pub cntlid: u16,
}

impl HostQueue {
    /// Connects the queue `qid` (0: admin, creating a controller) of
    /// `subnqn` as `hostnqn`.
    pub fn connect(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        qid: u16,
        cntlid: u16,
        sqsize: u16,
        digests: Digests,
    ) -> Result<HostQueue, HostError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut q = HostQueue {
            stream,
            digests: Digests::default(),
            maxh2cdata: 0,
            cntlid,
        };
        let mut ic = [0u8; IC_BYTES];
        IcReq {
            pfv: 0,
            hpda: 0,
            digests,
            maxr2t: 0,
        }
        .encode(&mut ic);
        q.stream.write_all(&ic)?;
        q.stream.read_exact(&mut ic)?;
        let resp = IcResp::parse(&ic).map_err(|e| HostError::Protocol(e.to_string()))?;
        if resp.digests != digests || resp.cpda != 0 {
            return Err(HostError::Protocol(
                "ICResp does not match the ICReq".into(),
            ));
        }
        q.digests = digests;
        q.maxh2cdata = resp.maxh2cdata;
        let mut sqe = Sqe::default();
        sqe.set_opcode(OPC_FABRICS)
            .set_flags(FLAGS_PSDT_SGL)
            .set_fctype(fctype::CONNECT)
            .set_sgl(SglDescriptor::in_capsule(0, 1024));
        ConnectCmd {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato_ms: if qid == 0 { 30_000 } else { 0 },
        }
        .write(&mut sqe);
        let mut data = [0u8; 1024];
        ConnectData {
            hostid: [0x42; 16],
            cntlid: if qid == 0 { CNTLID_DYNAMIC } else { cntlid },
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        }
        .encode(&mut data);
        q.send(&sqe, &data)?;
        let cqe = q.expect_resp()?;
        q.cntlid = cqe.dw0() as u16;
        if qid == 0 {
            // Enable: IOSQES 6, IOCQES 4, EN.
            let mut set = Sqe::default();
            set.set_opcode(OPC_FABRICS)
                .set_flags(FLAGS_PSDT_SGL)
                .set_fctype(fctype::PROPERTY_SET);
            PropertyCmd {
                size: 4,
                offset: crate::wire::fabrics::reg::CC,
                value: (6 << 16) | (4 << 20) | 1,
            }
            .write(&mut set);
            q.send(&set, &[])?;
            q.expect_resp()?;
        }
        Ok(q)
    }

    /// Sends a capsule with `data` in it.
    pub fn send(&mut self, sqe: &Sqe, data: &[u8]) -> Result<(), HostError> {
        let mut hdr = [0u8; CAPSULE_CMD_HLEN + DIGEST_BYTES];
        let n = encode_capsule_cmd(&mut hdr, sqe, data.len(), self.digests);
        self.stream.write_all(&hdr[..n])?;
        if !data.is_empty() {
            self.stream.write_all(data)?;
            if self.digests.data {
                self.stream
                    .write_all(&crate::wire::crc32c_digest(data).to_le_bytes())?;
            }
        }
        Ok(())
    }

    /// Answers an R2T with one H2CData PDU per MAXH2CDATA bytes.
    pub fn send_h2c(
        &mut self,
        cid: u16,
        ttag: u16,
        offset: u32,
        data: &[u8],
    ) -> Result<(), HostError> {
        let chunk = (self.maxh2cdata as usize).max(4096);
        let mut off = 0;
        while off < data.len() {
            let n = chunk.min(data.len() - off);
            let h = DataHeader {
                cccid: cid,
                ttag,
                offset: offset + off as u32,
                length: n as u32,
            };
            let last = off + n == data.len();
            let mut hdr = [0u8; SHORT_HLEN + DIGEST_BYTES];
            let hl = h.encode(
                &mut hdr,
                PduType::H2CData,
                if last {
                    crate::wire::pdu::flags::LAST_PDU
                } else {
                    0
                },
                self.digests,
            );
            self.stream.write_all(&hdr[..hl])?;
            self.stream.write_all(&data[off..off + n])?;
            if self.digests.data {
                self.stream
                    .write_all(&crate::wire::crc32c_digest(&data[off..off + n]).to_le_bytes())?;
            }
            off += n;
        }
        Ok(())
    }

    /// Reads the next PDU from the controller.
    pub fn recv(&mut self) -> Result<HostPdu, HostError> {
        let mut chb = [0u8; CH_BYTES];
        self.stream.read_exact(&mut chb)?;
        let ch = CommonHeader::parse(&chb).ok_or(HostError::Protocol("short".into()))?;
        let l: PduLayout =
            check(&ch, false, self.digests).map_err(|e| HostError::Protocol(e.to_string()))?;
        let mut buf = vec![0u8; l.plen];
        buf[..CH_BYTES].copy_from_slice(&chb);
        self.stream.read_exact(&mut buf[CH_BYTES..])?;
        match l.pdu_type {
            PduType::CapsuleResp => Ok(HostPdu::Resp(
                Cqe::from_bytes(&buf[CH_BYTES..]).ok_or(HostError::Protocol("short".into()))?,
            )),
            PduType::C2HData => {
                let h = DataHeader::parse(&buf).ok_or(HostError::Protocol("short".into()))?;
                let d = buf[l.data_offset..l.data_offset + l.data_len].to_vec();
                Ok(HostPdu::Data(h.cccid, h.offset, d))
            }
            PduType::R2T => {
                let h = DataHeader::parse(&buf).ok_or(HostError::Protocol("short".into()))?;
                Ok(HostPdu::R2T(h.cccid, h.ttag, h.offset, h.length))
            }
            t => Err(HostError::Protocol(format!("unexpected {t:?}"))),
        }
    }

    fn expect_resp(&mut self) -> Result<Cqe, HostError> {
        match self.recv()? {
            HostPdu::Resp(c) if c.status().is_success() => Ok(c),
            HostPdu::Resp(c) => Err(HostError::Status(c)),
            _ => Err(HostError::Protocol("expected a CapsuleResp".into())),
        }
    }
}
