//! NVMe/TCP connections: accepting on the bound listeners, spreading
//! connections over the reactors, connection initialisation (ICReq →
//! ICResp with digests echoed) and PDU framing with the receive-side
//! checks. A malformed PDU ends that connection with a C2HTermReq naming
//! the fatal error status and field, and nothing else is affected.
//!
//! Transitional: sockets use glommio's stream API (correct and idle-friendly:
//! a parked reactor wakes on socket readiness), not yet the batched
//! non-blocking path DESIGN.md calls for, and a queue runs one command at
//! a time (commands that arrive during a write's R2T transfer wait their
//! turn). Served: fabrics Connect (admin and I/O queues), the admin queue's
//! commands (`admin.rs`), and NVM I/O (`io.rs`) with in-capsule data or
//! R2T/H2CData for writes and one C2HData per read.

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::admin::{self, AdminOutcome, Controller, SubsystemView};
use crate::wire::fabrics::{fctype, ConnectCmd, ConnectData, CONNECT_DATA_BYTES};
use crate::wire::nvme::{sc, Cqe, Sqe, Status, OPC_FABRICS};
use crate::wire::pdu::{
    self, check, encode_capsule_resp, encode_term_req, header_digest_ok, CommonHeader, DataHeader,
    Digests, IcReq, IcResp, PduError, PduLayout, PduType, CH_BYTES, DIGEST_BYTES, IC_BYTES,
    SHORT_HLEN, TERM_REQ_MAX_DATA,
};

/// What a queue is, once Connect has run on it.
enum Queue {
    Unconnected,
    Admin(Box<Controller>, u64),
    Io {
        subsystem: SubsystemView,
        hostnqn: String,
        qpair_id: u64,
    },
}

impl Drop for Queue {
    fn drop(&mut self) {
        let id = match self {
            Queue::Admin(_, id) | Queue::Io { qpair_id: id, .. } => Some(*id),
            Queue::Unconnected => None,
        };
        if let Some(id) = id {
            LIVE_QPAIRS.with(|m| m.borrow_mut().remove(&id));
        }
        match self {
            Queue::Admin(c, id) => {
                let (cntlid, id) = (c.cntlid, *id);
                reactor::send(reactor::main_core(), move || {
                    admin::qpair_closed(id);
                    admin::destroy(cntlid)
                });
            }
            Queue::Io { qpair_id, .. } => {
                let id = *qpair_id;
                reactor::send(reactor::main_core(), move || admin::qpair_closed(id));
            }
            Queue::Unconnected => {}
        }
    }
}

thread_local! {
    /// NVM commands completed on this core (`nvmf_get_stats`).
    static COMPLETED_NVME_IO: Cell<u64> = const { Cell::new(0) };
    /// Sockets of this core's connected queue pairs, by qpair id: lets the
    /// controller's teardown close them. An entry is removed before its
    /// socket closes, on this core, so a stale id never reaches a reused fd.
    static LIVE_QPAIRS: std::cell::RefCell<std::collections::HashMap<u64, std::os::fd::RawFd>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Shuts down queue pair `id`'s socket if it is still open on this core;
/// its connection task then sees the end of the stream and closes.
pub fn shutdown_qpair(id: u64) {
    if let Some(fd) = LIVE_QPAIRS.with(|m| m.borrow().get(&id).copied()) {
        // SAFETY: fd is open (its entry is removed before it closes) and
        // owned by this core's connection task.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// This core's count of completed NVM commands.
pub fn completed_nvme_io() -> u64 {
    COMPLETED_NVME_IO.with(|c| c.get())
}

/// The two ends of a connection, for queue pair records.
#[derive(Clone, Copy)]
struct Ends {
    listen: std::net::SocketAddr,
    peer: std::net::SocketAddr,
}

/// Sends `data` (if any, cut to what the SGL asked) as one C2HData, then
/// the CapsuleResp.
async fn respond(
    stream: &mut TcpStream,
    digests: Digests,
    sqe: &Sqe,
    out: AdminOutcome,
) -> std::io::Result<()> {
    let Some(cqe) = out.cqe else { return Ok(()) };
    let len = out.data.len().min(sqe.sgl().length() as usize);
    // One write for the whole response: C2HData header, data, digest, and
    // the CapsuleResp.
    let mut wire = Vec::with_capacity(2 * (SHORT_HLEN + DIGEST_BYTES) + len + DIGEST_BYTES);
    if len > 0 {
        let h = DataHeader {
            cccid: sqe.cid(),
            ttag: 0,
            offset: 0,
            length: len as u32,
        };
        let mut hdr = [0u8; SHORT_HLEN + DIGEST_BYTES];
        let n = h.encode(&mut hdr, PduType::C2HData, pdu::flags::LAST_PDU, digests);
        wire.extend_from_slice(&hdr[..n]);
        wire.extend_from_slice(&out.data[..len]);
        if digests.data {
            let d = crate::wire::crc32c_digest(&out.data[..len]);
            wire.extend_from_slice(&d.to_le_bytes());
        }
    }
    let mut rsp = [0u8; SHORT_HLEN + DIGEST_BYTES];
    let n = encode_capsule_resp(&mut rsp, &cqe, digests);
    wire.extend_from_slice(&rsp[..n]);
    stream.write_all(&wire).await?;
    stream.flush().await
}

/// Runs a fabrics Connect on an unconnected queue.
async fn connect(
    queue: &mut Queue,
    sqe: &Sqe,
    data: &[u8],
    ends: Ends,
    fd: std::os::fd::RawFd,
) -> AdminOutcome {
    let cid = sqe.cid();
    let fail = |status: Status, dw0: u32| {
        let mut c = Cqe::new(cid, status);
        c.set_dw0(dw0);
        AdminOutcome {
            cqe: Some(c),
            data: Vec::new(),
        }
    };
    if data.len() < CONNECT_DATA_BYTES {
        return fail(Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr(), 0);
    }
    let cmd = ConnectCmd::from_sqe(sqe);
    let cdata = match ConnectData::parse(data) {
        Ok(d) => d,
        Err(bad) => {
            return fail(
                Status::command_specific(crate::wire::nvme::fabrics_sc::CONNECT_INVALID_PARAMETERS)
                    .dnr(),
                crate::wire::fabrics::connect_invalid_param_dw0(bad.0, true),
            )
        }
    };
    let core = reactor::current_core().0;
    let hostnqn = cdata.hostnqn.clone();
    let result = reactor::call(reactor::main_core(), move || {
        admin::connect(&cmd, &cdata, ends.listen).map(|(cntlid, view)| {
            let id = admin::qpair_connected(admin::QpairRecord {
                cntlid,
                qid: cmd.qid,
                subnqn: cdata.subnqn.clone(),
                hostnqn: cdata.hostnqn.clone(),
                core,
                listen: ends.listen,
                peer: ends.peer,
            });
            (cntlid, view, id)
        })
    })
    .await;
    match result {
        Ok(Ok((cntlid, view, qpair_id))) => {
            log::debug!(
                "NVMe/TCP {}: Connect qid {} sqsize {} kato {} ms to {} -> cntlid {cntlid}",
                ends.peer,
                cmd.qid,
                cmd.sqsize,
                cmd.kato_ms,
                view.nqn
            );
            LIVE_QPAIRS.with(|m| m.borrow_mut().insert(qpair_id, fd));
            *queue = if cmd.qid == 0 {
                Queue::Admin(
                    Box::new(Controller::new(cntlid, hostnqn, view, cmd.kato_ms)),
                    qpair_id,
                )
            } else {
                Queue::Io {
                    subsystem: view,
                    hostnqn,
                    qpair_id,
                }
            };
            let mut c = Cqe::new(cid, Status::SUCCESS);
            c.set_dw0(cntlid as u32);
            AdminOutcome {
                cqe: Some(c),
                data: Vec::new(),
            }
        }
        Ok(Err(r)) => {
            log::info!(
                "NVMe/TCP {}: Connect qid {} refused: {:?} (dw0 {:#x})",
                ends.peer,
                cmd.qid,
                r.status,
                r.dw0
            );
            fail(r.status, r.dw0)
        }
        Err(_) => fail(Status::generic(sc::INTERNAL_ERROR), 0),
    }
}

/// Starts accepting on `listener` (a dup of the bound socket) from the
/// main reactor; returns the task, cancelled when the address is released.
pub fn start_acceptor(
    addr: SocketAddr,
    listener: &std::net::TcpListener,
    maxh2cdata: u32,
) -> std::io::Result<glommio::task::JoinHandle<()>> {
    let fd = listener.try_clone()?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `fd` is a freshly duplicated listening socket owned by nobody
    // else; glommio's listener takes ownership.
    let gl = unsafe { TcpListener::from_raw_fd(fd) };
    let next = Rc::new(Cell::new(0usize));
    Ok(reactor::spawn_local_joinable(async move {
        log::info!("NVMe/TCP listening on {addr}");
        loop {
            let accepted = match gl.shared_accept().await {
                Ok(a) => a,
                Err(e) => {
                    log::warn!("accept on {addr}: {e}");
                    reactor::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let cores = reactor::cores();
            let core = cores[next.get() % cores.len()];
            next.set(next.get() + 1);
            reactor::send(core, move || {
                let stream = accepted.bind_to_executor();
                reactor::spawn_local(async move {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = serve(stream, maxh2cdata).await {
                        log::debug!("NVMe/TCP connection from {peer:?} ended: {e}");
                    }
                });
            });
        }
    }))
}

#[derive(Debug)]
enum ConnError {
    Io(std::io::Error),
    /// The peer sent something fatal; a TermReq was sent.
    Pdu(PduError),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "{e}"),
            ConnError::Pdu(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        ConnError::Io(e)
    }
}

async fn terminate(stream: &mut TcpStream, e: PduError, header: &[u8]) -> ConnError {
    let mut out = [0u8; SHORT_HLEN + TERM_REQ_MAX_DATA];
    let n = encode_term_req(&mut out, true, &e, header);
    let _ = stream.write_all(&out[..n]).await;
    let _ = stream.flush().await;
    log::warn!(
        "NVMe/TCP: terminating connection fd {}: {e}",
        stream.as_raw_fd()
    );
    ConnError::Pdu(e)
}

/// Reads and checks the next PDU (header digest included). None at a
/// clean end of stream.
async fn next_pdu(
    stream: &mut TcpStream,
    digests: Digests,
) -> Result<Option<(PduLayout, Vec<u8>)>, ConnError> {
    let mut chb = [0u8; CH_BYTES];
    if let Err(e) = stream.read_exact(&mut chb).await {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(e.into())
        };
    }
    let ch =
        CommonHeader::parse(&chb).ok_or_else(|| ConnError::Pdu(PduError::field(4, "short")))?;
    if ch.pdu_type == PduType::IcReq as u8 {
        let e = PduError::sequence("second ICReq");
        return Err(terminate(stream, e, &chb).await);
    }
    let layout = match check(&ch, true, digests) {
        Ok(l) => l,
        Err(e) => return Err(terminate(stream, e, &chb).await),
    };
    let mut buf = Vec::with_capacity(layout.plen);
    buf.extend_from_slice(&chb);
    buf.resize(layout.plen, 0);
    stream.read_exact(&mut buf[CH_BYTES..]).await?;
    if layout.header_digest
        && !header_digest_ok(
            &buf[..layout.hlen],
            &buf[layout.hlen..layout.hlen + DIGEST_BYTES],
        )
    {
        let e = PduError {
            fes: pdu::fes::HEADER_DIGEST_ERROR,
            fei: 0,
            reason: "header digest mismatch",
        };
        return Err(terminate(stream, e, &buf[..layout.hlen]).await);
    }
    Ok(Some((layout, buf)))
}

/// Whether a PDU's data digest (if negotiated) matches its data.
fn data_digest_ok(layout: &PduLayout, buf: &[u8]) -> bool {
    if !layout.data_digest {
        return true;
    }
    let data = &buf[layout.data_offset..layout.data_offset + layout.data_len];
    let got = u32::from_le_bytes(
        buf[layout.plen - 4..layout.plen]
            .try_into()
            .unwrap_or([0; 4]),
    );
    crate::wire::crc32c_digest(data) == got
}

/// Asks the host for `len` bytes of command `cid` with one R2T and collects
/// the H2CData PDUs that answer it. Commands that arrive meanwhile wait in
/// `pending`. A data PDU out of order ends the connection (FES 4/2).
async fn receive_h2c(
    stream: &mut TcpStream,
    digests: Digests,
    cid: u16,
    len: usize,
    pending: &mut VecDeque<(PduLayout, Vec<u8>)>,
) -> Result<Option<Vec<u8>>, ConnError> {
    const TTAG: u16 = 1;
    let r2t = DataHeader {
        cccid: cid,
        ttag: TTAG,
        offset: 0,
        length: len as u32,
    };
    let mut hdr = [0u8; SHORT_HLEN + DIGEST_BYTES];
    let n = r2t.encode(&mut hdr, PduType::R2T, 0, digests);
    stream.write_all(&hdr[..n]).await?;
    stream.flush().await?;
    let mut data = Vec::with_capacity(len);
    let mut digest_ok = true;
    while data.len() < len {
        let Some((layout, buf)) = next_pdu(stream, digests).await? else {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        };
        if layout.pdu_type == PduType::CapsuleCmd {
            pending.push_back((layout, buf));
            continue;
        }
        if layout.pdu_type != PduType::H2CData {
            let e = PduError::sequence("unexpected PDU during a data transfer");
            return Err(terminate(stream, e, &buf[..layout.hlen]).await);
        }
        let h = DataHeader::parse(&buf).ok_or(ConnError::Pdu(PduError::field(4, "short")))?;
        if h.cccid != cid || h.ttag != TTAG {
            let e = PduError::field(
                if h.cccid != cid { 8 } else { 10 },
                "H2CData for another transfer",
            );
            return Err(terminate(stream, e, &buf[..layout.hlen]).await);
        }
        if h.offset as usize != data.len()
            || h.length as usize != layout.data_len
            || data.len() + layout.data_len > len
        {
            let e = PduError {
                fes: pdu::fes::DATA_OUT_OF_RANGE,
                fei: 0,
                reason: "H2CData offset or length out of range",
            };
            return Err(terminate(stream, e, &buf[..layout.hlen]).await);
        }
        digest_ok &= data_digest_ok(&layout, &buf);
        data.extend_from_slice(&buf[layout.data_offset..layout.data_offset + layout.data_len]);
    }
    Ok(digest_ok.then_some(data))
}

/// One I/O command on an I/O queue.
async fn io_command(
    stream: &mut TcpStream,
    digests: Digests,
    sqe: &Sqe,
    in_capsule: &[u8],
    subsystem: &SubsystemView,
    pending: &mut VecDeque<(PduLayout, Vec<u8>)>,
) -> Result<AdminOutcome, ConnError> {
    let cid = sqe.cid();
    // Every NVM command gets a completion, failed or not.
    COMPLETED_NVME_IO.with(|c| c.set(c.get() + 1));
    let status_only = |st: Status| AdminOutcome {
        cqe: Some(Cqe::new(cid, st)),
        data: Vec::new(),
    };
    let plan = match super::io::plan(sqe, &subsystem.namespaces, subsystem.max_io_size) {
        Ok(p) => p,
        Err(st) => return Ok(status_only(st)),
    };
    let host_data = match plan.transfer {
        super::io::Transfer::ToController(len) if !in_capsule.is_empty() => {
            if in_capsule.len() < len {
                return Ok(status_only(
                    Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr(),
                ));
            }
            in_capsule[..len].to_vec()
        }
        super::io::Transfer::ToController(len) => {
            match receive_h2c(stream, digests, cid, len, pending).await? {
                Some(d) => d,
                None => {
                    return Ok(status_only(Status::generic(
                        sc::COMMAND_TRANSIENT_TRANSPORT_ERROR,
                    )))
                }
            }
        }
        _ => Vec::new(),
    };
    let (st, data) = super::io::execute(sqe, &plan, &host_data).await;
    Ok(AdminOutcome {
        cqe: Some(Cqe::new(cid, st)),
        data,
    })
}

/// While the host holds an AER: waits for the next command or a namespace
/// change, whichever comes first. On a change, refreshes the controller's
/// view and answers one AER with the namespace attribute notice; returns
/// whether it did.
async fn notice_namespace_change(
    stream: &mut TcpStream,
    digests: Digests,
    c: &mut Controller,
) -> Result<bool, ConnError> {
    let (cntlid, nqn, host, seen) = (
        c.cntlid,
        c.subsystem.nqn.clone(),
        c.hostnqn.clone(),
        c.subsystem.ns_generation,
    );
    let watch = reactor::call(reactor::main_core(), move || {
        admin::watch_namespaces(cntlid, &nqn, &host, seen)
    })
    .await;
    let changed = match watch {
        Ok(Ok(view)) => Some(view),
        Ok(Err(Some(rx))) => {
            let woke = futures_lite::future::or(async { rx.await.is_ok() }, async {
                let mut b = [0u8; 1];
                let _ = stream.peek(&mut b).await;
                false
            })
            .await;
            if !woke {
                return Ok(false);
            }
            let (nqn, host) = (c.subsystem.nqn.clone(), c.hostnqn.clone());
            reactor::call(reactor::main_core(), move || {
                admin::current_view(&nqn, &host)
            })
            .await
            .ok()
            .flatten()
        }
        _ => None,
    };
    let Some(view) = changed else {
        return Ok(false);
    };
    c.subsystem = view;
    if let Some(cqe) = c.complete_aer(admin::AEN_NS_ATTRIBUTE_CHANGED) {
        let mut rsp = [0u8; SHORT_HLEN + DIGEST_BYTES];
        let n = encode_capsule_resp(&mut rsp, &cqe, digests);
        stream.write_all(&rsp[..n]).await?;
        stream.flush().await?;
    }
    Ok(true)
}

/// Discovery controllers without a KATO are still reaped (as SPDK does),
/// after this long.
const DISCOVERY_DEFAULT_KATO_MS: u32 = 120_000;

/// How long an admin queue may be silent: KATO rounded up to the keep-alive
/// granularity we advertise (1 s); none when KATO is 0 (except discovery).
fn keep_alive_timeout(kato_ms: u32, discovery: bool) -> std::time::Duration {
    let kato = match (kato_ms, discovery) {
        (0, true) => DISCOVERY_DEFAULT_KATO_MS,
        (0, false) => return std::time::Duration::from_secs(365 * 24 * 3600),
        (k, _) => k,
    };
    std::time::Duration::from_millis(kato.div_ceil(1000) as u64 * 1000)
}

/// One connection from ICReq to close.
async fn serve(mut stream: TcpStream, maxh2cdata: u32) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let ends = Ends {
        listen: stream.local_addr().unwrap_or(unspecified),
        peer: stream.peer_addr().unwrap_or(unspecified),
    };
    // Connection initialisation: the first PDU must be an ICReq.
    let mut ic = [0u8; IC_BYTES];
    stream.read_exact(&mut ic[..CH_BYTES]).await?;
    let ch = CommonHeader::parse(&ic).ok_or_else(|| ConnError::Pdu(PduError::field(4, "short")))?;
    if ch.pdu_type != PduType::IcReq as u8 {
        let e = PduError::sequence("first PDU is not an ICReq");
        return Err(terminate(&mut stream, e, &ic[..CH_BYTES]).await);
    }
    if let Err(e) = check(&ch, true, Digests::default()) {
        return Err(terminate(&mut stream, e, &ic[..CH_BYTES]).await);
    }
    stream.read_exact(&mut ic[CH_BYTES..]).await?;
    let req = match IcReq::parse(&ic) {
        Ok(r) => r,
        Err(e) => return Err(terminate(&mut stream, e, &ic).await),
    };
    let digests = req.digests;
    log::debug!(
        "NVMe/TCP {} -> {}: ICReq (hpda {}, maxr2t {}), digests header {} data {}",
        ends.peer,
        ends.listen,
        req.hpda,
        req.maxr2t,
        digests.header,
        digests.data
    );
    let resp = IcResp {
        pfv: 0,
        cpda: 0,
        digests,
        maxh2cdata,
    };
    let mut out = [0u8; IC_BYTES];
    resp.encode(&mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;

    let mut queue = Queue::Unconnected;
    let mut pending: VecDeque<(PduLayout, Vec<u8>)> = VecDeque::new();
    loop {
        // Keep alive (SPEC §3): an admin queue silent for longer than its
        // KATO loses its controller, so the host can connect again at once.
        let kato = match &queue {
            Queue::Admin(c, _) => Some(keep_alive_timeout(c.kato_ms, c.subsystem.discovery)),
            _ => None,
        };
        let _ = stream.set_read_timeout(kato);
        if pending.is_empty() {
            if let Queue::Admin(c, _) = &mut queue {
                if !c.pending_aers.is_empty()
                    && notice_namespace_change(&mut stream, digests, c).await?
                {
                    continue;
                }
            }
        }
        let (layout, buf) = match pending.pop_front() {
            Some(p) => p,
            None => match next_pdu(&mut stream, digests).await {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if let Queue::Admin(c, _) = &queue {
                        log::warn!(
                            "controller {} of {}: keep alive timeout ({} ms), disconnecting",
                            c.cntlid,
                            c.subsystem.nqn,
                            c.kato_ms
                        );
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            },
        };
        match layout.pdu_type {
            PduType::H2CTermReq => {
                let (fes, fei) = pdu::parse_term_req(&buf).unwrap_or((0, 0));
                log::warn!("NVMe/TCP: host terminated the connection (FES {fes:#x}, FEI {fei})");
                return Ok(());
            }
            PduType::CapsuleCmd => {
                let Some(sqe) = Sqe::from_bytes(&buf[CH_BYTES..]) else {
                    continue;
                };
                let data = &buf[layout.data_offset..layout.data_offset + layout.data_len];
                {
                    if !data_digest_ok(&layout, &buf) {
                        // SPDK: transient transport error, connection kept.
                        let out = AdminOutcome {
                            cqe: Some(Cqe::new(
                                sqe.cid(),
                                Status::generic(sc::COMMAND_TRANSIENT_TRANSPORT_ERROR),
                            )),
                            data: Vec::new(),
                        };
                        respond(&mut stream, digests, &sqe, out).await?;
                        continue;
                    }
                }
                let fabrics = sqe.opcode() == OPC_FABRICS;
                let out = match &mut queue {
                    Queue::Unconnected if fabrics && sqe.fctype() == fctype::CONNECT => {
                        let data = data.to_vec();
                        connect(&mut queue, &sqe, &data, ends, stream.as_raw_fd()).await
                    }
                    // Nothing but Connect before a controller exists.
                    Queue::Unconnected => AdminOutcome {
                        cqe: Some(Cqe::new(
                            sqe.cid(),
                            Status::generic(sc::COMMAND_SEQUENCE_ERROR),
                        )),
                        data: Vec::new(),
                    },
                    Queue::Admin(ctrl, _) if fabrics => ctrl.fabrics(&sqe),
                    Queue::Admin(ctrl, _) => ctrl.admin(&sqe),
                    Queue::Io {
                        subsystem, hostnqn, ..
                    } if !fabrics => {
                        // A namespace added since Connect: refresh the view.
                        if !subsystem.namespaces.iter().any(|n| n.nsid == sqe.nsid()) {
                            let (nqn, host) = (subsystem.nqn.clone(), hostnqn.clone());
                            if let Ok(Some(v)) = reactor::call(reactor::main_core(), move || {
                                admin::current_view(&nqn, &host)
                            })
                            .await
                            {
                                *subsystem = v;
                            }
                        }
                        let (sub, data) = (subsystem.clone(), data.to_vec());
                        io_command(&mut stream, digests, &sqe, &data, &sub, &mut pending).await?
                    }
                    Queue::Io { .. } => AdminOutcome {
                        cqe: Some(Cqe::new(
                            sqe.cid(),
                            Status::generic(sc::INVALID_OPCODE).dnr(),
                        )),
                        data: Vec::new(),
                    },
                };
                respond(&mut stream, digests, &sqe, out).await?;
            }
            _ => {
                let e = PduError::sequence("data PDU with no transfer in progress");
                return Err(terminate(&mut stream, e, &buf[..layout.hlen]).await);
            }
        }
    }
}
