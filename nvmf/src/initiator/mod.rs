//! NVMe/TCP host side: a blocking queue-pair connection (ICReq, fabrics
//! Connect, Property Set, capsules out, PDUs in), built on `crate::wire`.
//! Sends are batched and receives read ahead, so a pipelined load
//! generator makes few system calls per command. Used by `ferroplane-perf`;
//! the `nvme` bdev module will build on the same wire code with
//! reactor-driven sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::wire::fabrics::{
    fctype, ConnectCmd, ConnectData, PropertyCmd, CNTLID_DYNAMIC, CONNECT_DATA_BYTES,
};
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
    /// C2HData: command id, offset, length; the data is in
    /// [`HostQueue::data`] until the next `recv`.
    Data(u16, u32, usize),
    /// R2T: command id, tag, offset, length.
    R2T(u16, u16, u32, u32),
}

/// A socket that, when non-blocking, spins instead of failing with
/// `WouldBlock`: a busy-polling host (as spdk_nvme_perf is) sees a response
/// as soon as it lands instead of after a scheduler wake-up.
struct SpinningStream(TcpStream);

impl Read for SpinningStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                r => return r,
            }
        }
    }
}

impl Write for SpinningStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A fabrics Connect for queue `qid` (SQ size `sqsize`, 0's based) and its
/// 1 KiB of in-capsule data (controller `cntlid`: `CNTLID_DYNAMIC` for a new
/// one on the admin queue).
pub fn connect_command(
    qid: u16,
    sqsize: u16,
    kato_ms: u32,
    cntlid: u16,
    subnqn: &str,
    hostnqn: &str,
) -> (Sqe, [u8; CONNECT_DATA_BYTES]) {
    let mut sqe = Sqe::default();
    sqe.set_opcode(OPC_FABRICS)
        .set_flags(FLAGS_PSDT_SGL)
        .set_fctype(fctype::CONNECT)
        .set_sgl(SglDescriptor::in_capsule(0, CONNECT_DATA_BYTES as u32));
    ConnectCmd {
        recfmt: 0,
        qid,
        sqsize,
        cattr: 0,
        kato_ms,
    }
    .write(&mut sqe);
    let mut data = [0u8; CONNECT_DATA_BYTES];
    ConnectData {
        hostid: [0x42; 16],
        cntlid,
        subnqn: subnqn.into(),
        hostnqn: hostnqn.into(),
    }
    .encode(&mut data);
    (sqe, data)
}

/// Read-ahead per queue: many PDUs per `read`.
const RX_BUF_BYTES: usize = 256 * 1024;

/// One connected queue pair. Sends are buffered and go out in one write
/// when the queue is about to wait for the controller ([`HostQueue::recv`])
/// or on [`HostQueue::flush`]; receives read ahead.
pub struct HostQueue {
    reader: BufReader<SpinningStream>,
    writer: SpinningStream,
    tx: Vec<u8>,
    /// The last PDU received (its data, for C2HData).
    pdu: Vec<u8>,
    data: std::ops::Range<usize>,
    discard_data: bool,
    pub digests: Digests,
    pub maxh2cdata: u32,
    pub cntlid: u16,
}

impl HostQueue {
    /// Connects the queue `qid` (0: admin, creating a controller with a
    /// 30 s keep-alive timeout) of `subnqn` as `hostnqn`.
    pub fn connect(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        qid: u16,
        cntlid: u16,
        sqsize: u16,
        digests: Digests,
    ) -> Result<HostQueue, HostError> {
        let kato_ms = if qid == 0 { 30_000 } else { 0 };
        Self::connect_kato(addr, subnqn, hostnqn, qid, cntlid, sqsize, digests, kato_ms)
    }

    /// [`HostQueue::connect`] with the keep-alive timeout to ask for (an
    /// admin queue; 0: none).
    #[allow(clippy::too_many_arguments)]
    pub fn connect_kato(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        qid: u16,
        cntlid: u16,
        sqsize: u16,
        digests: Digests,
        kato_ms: u32,
    ) -> Result<HostQueue, HostError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut q = HostQueue {
            writer: SpinningStream(stream.try_clone()?),
            reader: BufReader::with_capacity(RX_BUF_BYTES, SpinningStream(stream)),
            tx: Vec::with_capacity(64 * 1024),
            pdu: Vec::with_capacity(RX_BUF_BYTES),
            data: 0..0,
            discard_data: false,
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
        q.writer.write_all(&ic)?;
        q.reader.read_exact(&mut ic)?;
        let resp = IcResp::parse(&ic).map_err(|e| HostError::Protocol(e.to_string()))?;
        if resp.digests != digests || resp.cpda != 0 {
            return Err(HostError::Protocol(
                "ICResp does not match the ICReq".into(),
            ));
        }
        q.digests = digests;
        q.maxh2cdata = resp.maxh2cdata;
        let (sqe, data) = connect_command(
            qid,
            sqsize,
            kato_ms,
            if qid == 0 { CNTLID_DYNAMIC } else { cntlid },
            subnqn,
            hostnqn,
        );
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
        self.tx.extend_from_slice(&hdr[..n]);
        if !data.is_empty() {
            self.tx.extend_from_slice(data);
            if self.digests.data {
                self.tx
                    .extend_from_slice(&crate::wire::crc32c_digest(data).to_le_bytes());
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
            self.tx.extend_from_slice(&hdr[..hl]);
            self.tx.extend_from_slice(&data[off..off + n]);
            if self.digests.data {
                self.tx.extend_from_slice(
                    &crate::wire::crc32c_digest(&data[off..off + n]).to_le_bytes(),
                );
            }
            off += n;
        }
        Ok(())
    }

    /// The connected socket, for a caller that drives the queue itself from
    /// here on (a test host that floods or never reads); None while sends
    /// or received bytes are still buffered.
    pub fn into_stream(self) -> Option<TcpStream> {
        if self.has_buffered_input() || !self.tx.is_empty() {
            return None;
        }
        Some(self.writer.0)
    }

    /// Busy-polls the socket (spins on it) instead of sleeping in the
    /// kernel while waiting for the controller.
    pub fn set_busy_poll(&mut self, on: bool) -> Result<(), HostError> {
        self.writer.0.set_nonblocking(on)?;
        Ok(())
    }

    /// Sends everything buffered.
    pub fn flush(&mut self) -> Result<(), HostError> {
        if !self.tx.is_empty() {
            self.writer.write_all(&self.tx)?;
            self.tx.clear();
        }
        Ok(())
    }

    /// Whether received bytes are waiting to be parsed (so `recv` will not
    /// block on the socket).
    pub fn has_buffered_input(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    /// Drops `n` received bytes without copying them.
    fn skip(&mut self, mut n: usize) -> Result<(), HostError> {
        while n > 0 {
            let avail = self.reader.fill_buf()?.len();
            if avail == 0 {
                return Err(HostError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let k = avail.min(n);
            self.reader.consume(k);
            n -= k;
        }
        Ok(())
    }

    /// Read data is not kept (a load generator does not look at it):
    /// C2HData payloads are skipped in the receive buffer, not copied.
    pub fn set_discard_data(&mut self, on: bool) {
        self.discard_data = on;
    }

    /// The data of the last C2HData received (empty when discarded).
    pub fn data(&self) -> &[u8] {
        &self.pdu[self.data.clone()]
    }

    /// Reads the next PDU from the controller, first sending what is
    /// buffered if it would otherwise wait.
    pub fn recv(&mut self) -> Result<HostPdu, HostError> {
        if !self.has_buffered_input() {
            self.flush()?;
        }
        let mut chb = [0u8; CH_BYTES];
        self.reader.read_exact(&mut chb)?;
        let ch = CommonHeader::parse(&chb).ok_or(HostError::Protocol("short".into()))?;
        let l: PduLayout =
            check(&ch, false, self.digests).map_err(|e| HostError::Protocol(e.to_string()))?;
        self.pdu.clear();
        self.pdu.extend_from_slice(&chb);
        let skip = if self.discard_data && l.pdu_type == PduType::C2HData {
            l.plen - l.data_offset
        } else {
            0
        };
        self.pdu.resize(l.plen - skip, 0);
        self.reader.read_exact(&mut self.pdu[CH_BYTES..])?;
        self.skip(skip)?;
        let buf = &self.pdu;
        match l.pdu_type {
            PduType::CapsuleResp => Ok(HostPdu::Resp(
                Cqe::from_bytes(&buf[CH_BYTES..]).ok_or(HostError::Protocol("short".into()))?,
            )),
            PduType::C2HData => {
                let h = DataHeader::parse(buf).ok_or(HostError::Protocol("short".into()))?;
                self.data = if skip > 0 {
                    0..0
                } else {
                    l.data_offset..l.data_offset + l.data_len
                };
                Ok(HostPdu::Data(h.cccid, h.offset, l.data_len))
            }
            PduType::R2T => {
                let h = DataHeader::parse(buf).ok_or(HostError::Protocol("short".into()))?;
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
