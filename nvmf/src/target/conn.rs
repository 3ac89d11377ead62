//! One NVMe/TCP connection (queue pair) on its reactor: receive-side PDU
//! framing and checks, connection initialisation (ICReq → ICResp with the
//! digests echoed), fabrics Connect, the admin queue (`admin.rs`) and NVM
//! I/O (`io.rs`) with many commands in flight, each in a request slot
//! (`request.rs`), and the send queue (`send_queue.rs`).
//!
//! Driven by the core's poll group (`poll_group.rs`): [`Connection::on_readable`]
//! receives everything the socket has (as few `readv` calls as possible,
//! large H2CData payloads straight into the request's buffer) and handles
//! every complete PDU in it; [`Connection::service`] turns finished bdev
//! I/O into responses and sends the whole send queue with one `sendmsg`.
//! Nothing here blocks or allocates per I/O in steady state.
//!
//! A malformed PDU ends this connection with a C2HTermReq naming the fatal
//! error status and field; nothing else is affected. Connect needs the main
//! reactor: it runs as a task that writes its result back and wakes the
//! loop. Namespaces come from the core's table (`changes.rs`), which the
//! main reactor updates in place; an admin queue looks at it when kicked
//! and before each command (Identify, the namespace-attribute notice).
//!
//! A closed connection whose commands are still at their bdevs keeps
//! those slots (and their namespace holds) until the I/O comes back, so
//! whoever closed it can wait for that ([`Connection::in_flight_done`]).
//!
//! Backpressure (SPEC §8, `limits.rs`): a capsule that finds no free slot,
//! a send queue at [`MAX_SEND_QUEUE_BYTES`], or in-capsule data with
//! neither a receive block to pin nor a buffer to copy into, stays in the
//! receive buffer and the connection *stalls*: it parses nothing more and
//! stops reading its socket (and asks epoll not to report input), so TCP
//! pushes back on the host. Whatever frees the resource runs in
//! [`Connection::service`] (completions, sends, buffers returned to the
//! core's budget, which wakes a parked reactor), and that resumes parsing.
//! Data buffers come from the core's budgeted pool when a command needs
//! them and go back when it ends; a command that cannot get one waits in
//! its queue's pending list (in order) while parsing goes on.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::rc::Rc;

use bdev::{IoBox, IoBuf, IoCompletion, IoType, SharedBuf};
use reactor::{CompletionEvent, CompletionSender};

use super::admin::{self, AdminOutcome, Controller, SubsystemView};
use super::changes::{self, Attachment, NsUse};
use super::io::{self, opc, Transfer};
use super::limits::{self, ConnectionPermit, MAX_SEND_QUEUE_BYTES, RX_BUF_BYTES};
use super::poll_group;
use super::recv_buf::RecvBuf;
use super::request::{Request, RequestTable, SlotState};
use super::send_queue::{SendQueue, MAX_IOV};
use super::socket::{PolledSocket, Received};
use crate::wire::fabrics::{fctype, ConnectCmd, ConnectData, CONNECT_DATA_BYTES};
use crate::wire::nvme::{sc, Cqe, Sqe, Status, OPC_FABRICS};
use crate::wire::pdu::{
    self, check, encode_capsule_resp, encode_term_req, header_digest_ok, CommonHeader, DataHeader,
    Digests, IcReq, IcResp, PduError, PduLayout, PduType, CAPSULE_CMD_HLEN, CH_BYTES, DIGEST_BYTES,
    IC_BYTES, SHORT_HLEN, TERM_REQ_MAX_DATA,
};

/// In-capsule data accepted on the admin queue and before Connect
/// (Connect's own data is 1 KiB).
const ADMIN_IN_CAPSULE_BYTES: usize = 8192;
/// Slack in the receive buffer beyond in-capsule data: header, header
/// digest, padding (PDO ≤ 128) and data digest.
const RX_SLACK: usize = 256;
/// An H2CData payload at least this large is received straight into its
/// request's buffer.
const DIRECT_RECV_MIN: usize = 4096;
/// `readv` calls per readiness report, so one busy connection cannot keep
/// the reactor from the others.
const RECV_ROUNDS: usize = 4;

/// Discovery controllers without a KATO are still reaped (as SPDK does),
/// after this long.
const DISCOVERY_DEFAULT_KATO_MS: u32 = 120_000;

/// A queue pair registered with the main reactor. Dropping it tells the
/// main reactor the queue is gone (and, for an admin queue, that its
/// controller is).
struct QpairGuard {
    id: u64,
    /// Admin queue: the controller to destroy with it.
    cntlid: Option<u16>,
}

impl Drop for QpairGuard {
    fn drop(&mut self) {
        let (id, cntlid) = (self.id, self.cntlid);
        reactor::send(reactor::main_core(), move || {
            admin::qpair_closed(id);
            if let Some(c) = cntlid {
                admin::destroy(c, id);
            }
        });
    }
}

/// An I/O queue's state.
struct IoQueue {
    /// The subsystem's settings as of Connect (its namespaces are in
    /// `subsystem`).
    view: SubsystemView,
    /// The subsystem's namespaces on this core.
    subsystem: Attachment,
    reqs: RequestTable,
    /// Slots waiting for data buffers, oldest first.
    pending: VecDeque<u16>,
    _guard: QpairGuard,
}

impl IoQueue {
    /// The queue is closing: its slots are all that stays.
    fn into_reqs(self) -> RequestTable {
        self.reqs
    }
}

/// What a queue is, once Connect has run on it.
enum Queue {
    Unconnected,
    /// Connect is with the main reactor.
    Connecting,
    Admin {
        ctrl: Box<Controller>,
        /// The subsystem's namespaces on this core (none for discovery).
        attach: Option<Attachment>,
        guard: QpairGuard,
    },
    Io(Box<IoQueue>),
}

/// Where the receive side is within the byte stream.
#[derive(Clone, Copy, Debug)]
enum RxState {
    /// Waiting for the ICReq.
    Init,
    /// At a PDU boundary.
    Header,
    /// Inside an H2CData payload headed for `slot`'s buffer.
    Data(H2cData),
}

#[derive(Clone, Copy, Debug)]
struct H2cData {
    slot: u16,
    /// Where this PDU's data starts in the slot's buffer, and its length.
    start: usize,
    len: usize,
    /// Payload bytes received so far.
    got: usize,
    /// Data digest: expected, and bytes of it received (None: not
    /// negotiated).
    digest: Option<([u8; DIGEST_BYTES], usize)>,
}

/// Why the capsule at the front of the receive buffer waits (see the
/// module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stall {
    /// Every request slot is in use.
    Slot,
    /// The send queue holds [`MAX_SEND_QUEUE_BYTES`] or more.
    SendQueue,
    /// In-capsule data with no receive block to pin and no buffer to copy
    /// it into.
    CapsuleData,
}

/// Why a connection ended.
enum Ending {
    /// Peer closed or a socket error.
    Gone,
    /// Fatal protocol error: a C2HTermReq is sent first.
    Fatal(PduError, Vec<u8>),
}

struct ConnState {
    token: u64,
    sock: PolledSocket,
    rx: RecvBuf,
    rx_state: RxState,
    digests: Digests,
    maxh2cdata: u32,
    queue: Queue,
    send: SendQueue,
    /// When bytes last arrived (keep-alive).
    last_rx_tick: u64,
    /// When the connection was accepted (ICReq and Connect timeout).
    born_tick: u64,
    /// Parsing and receiving stopped, and why.
    stalled: Option<Stall>,
    /// Output is blocked: wait for room to write.
    out_blocked: bool,
    /// What epoll is asked to report for the socket now: (input, output).
    interest: (bool, bool),
    closed: bool,
    /// Closed: the slots whose I/O is still at the bdev, and who waits for
    /// them to come back.
    orphans: Option<RequestTable>,
    orphan_waiters: Vec<CompletionSender<()>>,
    /// Scratch for draining completions without allocating.
    done: Vec<IoBox>,
    /// Counts this connection against the target's limit while it lives.
    _permit: ConnectionPermit,
}

/// One connection. Shared by the poll group, tasks working for it (weakly)
/// and the bdev I/Os it has in flight (as their completion callback).
pub struct Connection {
    pub token: u64,
    state: RefCell<ConnState>,
    /// Bdev I/Os handed back by their channels, handled by `service`.
    completions: RefCell<Vec<IoBox>>,
    /// Set when something other than the socket gave it work.
    pub(crate) kicked: Cell<bool>,
}

impl IoCompletion for Connection {
    fn io_done(&self, io: IoBox) {
        self.completions.borrow_mut().push(io);
    }
}

thread_local! {
    /// NVM commands completed on this core (`nvmf_get_stats`).
    static COMPLETED_NVME_IO: Cell<u64> = const { Cell::new(0) };
    /// Commands that had to wait for a data buffer on this core (SPDK's
    /// `pending_data_buffer` transport statistic).
    static PENDING_DATA_BUFFER: Cell<u64> = const { Cell::new(0) };
}

/// This core's count of completed NVM commands.
pub fn completed_nvme_io() -> u64 {
    COMPLETED_NVME_IO.with(|c| c.get())
}

/// This core's count of commands that waited for a data buffer.
pub fn pending_data_buffer() -> u64 {
    PENDING_DATA_BUFFER.with(|c| c.get())
}

/// How long an admin queue may be silent: KATO rounded up to the keep-alive
/// granularity we advertise (1 s); none when KATO is 0 (except discovery).
fn keep_alive_timeout(kato_ms: u32, discovery: bool) -> Option<std::time::Duration> {
    let kato = match (kato_ms, discovery) {
        (0, true) => DISCOVERY_DEFAULT_KATO_MS,
        (0, false) => return None,
        (k, _) => k,
    };
    Some(std::time::Duration::from_millis(
        kato.div_ceil(1000) as u64 * 1000,
    ))
}

fn cqe(cid: u16, status: Status) -> Cqe {
    Cqe::new(cid, status)
}

impl Connection {
    pub fn new(
        token: u64,
        sock: PolledSocket,
        maxh2cdata: u32,
        permit: ConnectionPermit,
    ) -> Connection {
        let now = reactor::ticks::now();
        Connection {
            token,
            state: RefCell::new(ConnState {
                token,
                sock,
                rx: RecvBuf::new(RX_BUF_BYTES),
                rx_state: RxState::Init,
                digests: Digests::default(),
                maxh2cdata,
                queue: Queue::Unconnected,
                send: SendQueue::with_capacity(MAX_SEND_QUEUE_BYTES, 256),
                last_rx_tick: now,
                born_tick: now,
                stalled: None,
                out_blocked: false,
                interest: (true, false),
                closed: false,
                orphans: None,
                orphan_waiters: Vec::new(),
                done: Vec::with_capacity(256),
                _permit: permit,
            }),
            completions: RefCell::new(Vec::with_capacity(256)),
            kicked: Cell::new(false),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state.borrow().closed
    }

    /// Parsing and receiving stopped (backpressure).
    pub fn is_stalled(&self) -> bool {
        self.state.borrow().stalled.is_some()
    }

    /// The socket hung up or failed: a stalled connection (which would
    /// notice only when it reads again) is closed now; others find out
    /// when they receive.
    pub fn hung_up(&self) {
        if self.is_stalled() {
            self.close("connection reset by peer");
        }
    }

    /// Closed, and none of its I/O is at a bdev any more: it can go.
    pub fn is_finished(&self) -> bool {
        let st = self.state.borrow();
        st.closed && st.orphans.is_none()
    }

    /// For a closed connection with I/O still at its bdevs: an event fired
    /// when the last of it is back.
    pub fn in_flight_done(&self) -> Option<CompletionEvent<()>> {
        let mut st = self.state.borrow_mut();
        st.orphans.as_ref()?;
        let (tx, rx) = reactor::completion();
        st.orphan_waiters.push(tx);
        Some(rx)
    }

    /// Whether a command of this connection holds namespace `instance`.
    pub fn holds_namespace(&self, instance: u64) -> bool {
        match &self.state.borrow().queue {
            Queue::Io(q) => q.reqs.holds(instance),
            _ => false,
        }
    }

    /// The socket has something: receive it all and handle every complete
    /// PDU. Returns whether anything arrived. A stalled connection leaves
    /// its input in the socket.
    pub fn on_readable(self: &Rc<Self>) -> bool {
        let mut st = self.state.borrow_mut();
        if st.closed || st.stalled.is_some() {
            return false;
        }
        let mut any = false;
        for _ in 0..RECV_ROUNDS {
            let (got, asked) = match st.receive() {
                Ok(r) => r,
                Err(Ending::Gone) => {
                    drop(st);
                    self.close("connection closed by peer");
                    return true;
                }
                Err(e @ Ending::Fatal(..)) => {
                    st.end(e);
                    drop(st);
                    self.close("fatal transport error");
                    return true;
                }
            };
            if got == 0 {
                break;
            }
            any = true;
            st.last_rx_tick = reactor::ticks::now();
            if let Err(e) = st.handle_received(self) {
                st.end(e);
                drop(st);
                self.close("fatal transport error");
                return true;
            }
            if st.closed {
                return true;
            }
            if got < asked || st.stalled.is_some() {
                break;
            }
        }
        any
    }

    /// Turns finished I/O into responses and sends what is queued.
    /// Returns whether it did anything.
    pub fn service(self: &Rc<Self>) -> bool {
        let kicked = self.kicked.replace(false);
        let mut work = kicked;
        let mut st = self.state.borrow_mut();
        if st.closed && st.orphans.is_none() {
            return work;
        }
        let mut done = std::mem::take(&mut st.done);
        std::mem::swap(&mut done, &mut *self.completions.borrow_mut());
        if !done.is_empty() {
            work = true;
            for io in done.drain(..) {
                if st.closed {
                    st.orphan_completed(io);
                } else {
                    st.io_completed(self, io);
                }
            }
        }
        st.done = done;
        if st.closed {
            return work;
        }
        if kicked {
            st.sync_admin();
        }
        work |= st.retry_pending(self);
        for round in 0..2 {
            if !st.send.is_empty() {
                work = true;
                if let Err(e) = st.flush() {
                    drop(st);
                    self.close(&format!("send failed: {e}"));
                    return true;
                }
            }
            // Whatever the completions and the send freed may let a
            // stalled capsule in; what it produces goes out at once.
            if round == 1 || st.stalled.is_none() {
                break;
            }
            st.stalled = None;
            if let Err(e) = st.handle_received(self) {
                st.end(e);
                drop(st);
                self.close("fatal transport error");
                return true;
            }
            if st.closed {
                return true;
            }
            work |= st.stalled.is_none();
        }
        st.update_interest();
        work
    }

    /// Ends the connection: unregisters it, closes the socket's both
    /// directions and drops the queue (telling the main reactor). I/O still
    /// in flight completes into the void.
    pub fn close(&self, why: &str) {
        let mut st = self.state.borrow_mut();
        if st.closed {
            return;
        }
        st.closed = true;
        log::debug!(
            "NVMe/TCP {} -> {}: closing ({why})",
            st.sock.peer,
            st.sock.local
        );
        // One last attempt to send what is queued (a TermReq).
        let _ = st.flush();
        poll_group::unwatch(st.sock.fd());
        st.sock.shutdown();
        st.send.clear(|_| {});
        // Dropping the queue tells the main reactor (and detaches it from
        // the namespace table); commands still at a bdev stay behind.
        if let Queue::Io(q) = std::mem::replace(&mut st.queue, Queue::Unconnected) {
            let reqs = q.into_reqs();
            st.orphans = st.orphan(reqs);
        }
        poll_group::reap_later();
    }

    /// Deadline check: an admin queue silent for longer than its KATO
    /// loses its controller, so the host can connect again at once (SPEC
    /// §3); a connection without a queue (no ICReq, or no Connect accepted)
    /// after the connect timeout is closed (SPEC §8). Returns why, if due.
    pub fn expired(&self, now: u64) -> Option<&'static str> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        let st = self.state.borrow();
        match &st.queue {
            Queue::Admin { ctrl: c, .. } => {
                log::warn!(
                    "controller {} of {}: keep alive timeout ({} ms), disconnecting",
                    c.cntlid,
                    c.subsystem.nqn,
                    c.kato_ms
                );
                Some("keep alive timeout")
            }
            _ => {
                log::warn!(
                    "NVMe/TCP {} -> {}: no {} within {:?}, closing",
                    st.sock.peer,
                    st.sock.local,
                    if matches!(st.rx_state, RxState::Init) {
                        "ICReq"
                    } else {
                        "Connect"
                    },
                    limits::connect_timeout()
                );
                Some("ICReq and Connect timeout")
            }
        }
    }

    /// When this connection's deadline comes if nothing happens before
    /// (ticks): an admin queue's keep-alive timeout, or the connect timeout
    /// of one not yet connected; None for I/O queues and closed ones.
    pub fn deadline(&self) -> Option<u64> {
        let st = self.state.borrow();
        if st.closed {
            return None;
        }
        match &st.queue {
            Queue::Admin { ctrl: c, .. } => {
                let t = keep_alive_timeout(c.kato_ms, c.subsystem.discovery)?;
                Some(st.last_rx_tick + reactor::ticks::from_duration(t))
            }
            Queue::Unconnected | Queue::Connecting => {
                Some(st.born_tick + reactor::ticks::from_duration(limits::connect_timeout()))
            }
            Queue::Io(_) => None,
        }
    }

    /// Marks the connection as having work and wakes the reactor (for
    /// tasks that changed its state, and namespace changes).
    pub(crate) fn kick(&self) {
        self.kicked.set(true);
        reactor::wake_loop();
    }
}

impl ConnState {
    /// A closing I/O queue's slots: frees those not at a bdev and keeps
    /// the rest (with their namespace holds and receive-buffer pins) until
    /// their I/O is back. None if nothing is in flight.
    fn orphan(&mut self, mut reqs: RequestTable) -> Option<RequestTable> {
        let mut kept = 0;
        for i in 0..reqs.capacity() as u16 {
            let Some(r) = reqs.get_mut(i) else { continue };
            match r.state {
                SlotState::Free => continue,
                SlotState::Executing if r.outstanding > 0 => {
                    kept += 1;
                    continue;
                }
                _ => {}
            }
            // Releasing drops the slot's receive-block view (its pin).
            reqs.release(i);
        }
        (kept > 0).then_some(reqs)
    }

    /// A bdev I/O of a closed connection came back: its slot is freed
    /// once all of its command's I/O is, and the waiters told when the
    /// last one is.
    fn orphan_completed(&mut self, io: IoBox) {
        let Some(reqs) = &mut self.orphans else {
            return;
        };
        let i = io.tag as u16;
        // The I/O may hold a view of a receive block: gone with it.
        drop(io);
        if let Some(r) = reqs.get_mut(i).filter(|r| r.state == SlotState::Executing) {
            r.outstanding = r.outstanding.saturating_sub(1);
            if r.outstanding == 0 {
                reqs.release(i);
            }
        }
        if reqs.in_use() == 0 {
            self.orphans = None;
            for tx in self.orphan_waiters.drain(..) {
                tx.complete(());
            }
            poll_group::reap_later();
        }
    }

    /// An admin queue takes its subsystem's current namespaces (for
    /// Identify) and, if they changed, answers a held AER with the
    /// namespace attribute notice (or owes it to the next AER).
    fn sync_admin(&mut self) {
        let Queue::Admin {
            ctrl,
            attach: Some(a),
            ..
        } = &mut self.queue
        else {
            return;
        };
        ctrl.namespaces_changed(a.generation(), || a.views());
        if let Some(c) = ctrl.take_notice() {
            push_capsule_resp(&mut self.send, &c, self.digests);
        }
    }

    /// One `readv`; returns (bytes received, bytes asked for).
    fn receive(&mut self) -> Result<(usize, usize), Ending> {
        // A large payload with nothing buffered ahead of it goes straight
        // into its request's buffer; what follows it lands in `rx`.
        if let RxState::Data(d) = self.rx_state {
            let left = d.len - d.got;
            if self.rx.pending().is_empty() && self.rx.unpinned() && left >= DIRECT_RECV_MIN {
                if let (Queue::Io(q), Some(tail)) = (&mut self.queue, self.rx.empty_space()) {
                    if let Some(r) = q.reqs.get_mut(d.slot) {
                        let dst = &mut r.buf.as_mut_slice()[d.start + d.got..d.start + d.len];
                        let asked = dst.len() + tail.len();
                        let mut iov = [IoSliceMut::new(dst), IoSliceMut::new(tail)];
                        return match self.sock.recv_vectored(&mut iov) {
                            Ok(Received::Bytes(n)) => {
                                let direct = n.min(left);
                                if let RxState::Data(d) = &mut self.rx_state {
                                    d.got += direct;
                                }
                                self.rx.filled(n - direct);
                                Ok((n, asked))
                            }
                            Ok(Received::Nothing) => Ok((0, asked)),
                            Ok(Received::Closed) | Err(_) => Err(Ending::Gone),
                        };
                    }
                }
            }
        }
        let pinned = !self.rx.unpinned();
        let space = self.rx.space(RX_SLACK);
        let asked = space.len();
        if asked == 0 && pinned {
            // Every buffer holds data of writes in flight: receive once
            // they complete (the socket stays readable meanwhile).
            return Ok((0, 0));
        }
        if asked == 0 {
            // Cannot happen: every PDU we wait for fits the buffer.
            return Err(Ending::Fatal(
                PduError::field(4, "PDU larger than the receive buffer"),
                Vec::new(),
            ));
        }
        match self.sock.recv_vectored(&mut [IoSliceMut::new(space)]) {
            Ok(Received::Bytes(n)) => {
                self.rx.filled(n);
                Ok((n, asked))
            }
            Ok(Received::Nothing) => Ok((0, asked)),
            Ok(Received::Closed) | Err(_) => Err(Ending::Gone),
        }
    }

    /// Sends the TermReq of a fatal error (the caller then closes).
    fn end(&mut self, e: Ending) {
        if let Ending::Fatal(err, header) = e {
            log::warn!("NVMe/TCP {}: terminating connection: {err}", self.sock.peer);
            let mut out = [0u8; SHORT_HLEN + TERM_REQ_MAX_DATA];
            let n = encode_term_req(&mut out, true, &err, &header);
            self.send.push_bytes(&out[..n]);
        }
    }

    /// Handles every complete PDU (and payload bytes) in the buffer.
    fn handle_received(&mut self, conn: &Rc<Connection>) -> Result<(), Ending> {
        loop {
            if self.closed {
                return Ok(());
            }
            match self.rx_state {
                RxState::Data(d) => {
                    if !self.h2c_payload(conn, d)? {
                        return Ok(());
                    }
                }
                RxState::Init => {
                    if self.rx.pending().len() < IC_BYTES {
                        // Check the common header early: garbage is
                        // refused before a full ICReq's worth arrives.
                        if let Some(ch) = CommonHeader::parse(self.rx.pending()) {
                            if ch.pdu_type != PduType::IcReq as u8 {
                                return Err(fatal(
                                    PduError::sequence("first PDU is not an ICReq"),
                                    self.rx.pending(),
                                ));
                            }
                            check(&ch, true, Digests::default())
                                .map_err(|e| fatal(e, self.rx.pending()))?;
                        }
                        return Ok(());
                    }
                    self.icreq()?;
                }
                RxState::Header => {
                    if !self.next_pdu(conn)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn icreq(&mut self) -> Result<(), Ending> {
        let mut ic = [0u8; IC_BYTES];
        ic.copy_from_slice(&self.rx.pending()[..IC_BYTES]);
        let ch = CommonHeader::parse(&ic).ok_or_else(|| fatal(PduError::field(4, "short"), &ic))?;
        if ch.pdu_type != PduType::IcReq as u8 {
            return Err(fatal(
                PduError::sequence("first PDU is not an ICReq"),
                &ic[..CH_BYTES],
            ));
        }
        check(&ch, true, Digests::default()).map_err(|e| fatal(e, &ic[..CH_BYTES]))?;
        let req = IcReq::parse(&ic).map_err(|e| fatal(e, &ic))?;
        self.rx.consume(IC_BYTES);
        self.digests = req.digests;
        // We ask for no padding (CPDA 0): capsule data follows the header
        // and its digest.
        self.rx.align_capsule_data(
            CAPSULE_CMD_HLEN + if req.digests.header { DIGEST_BYTES } else { 0 },
        );
        log::debug!(
            "NVMe/TCP {} -> {}: ICReq (hpda {}, maxr2t {}), digests header {} data {}",
            self.sock.peer,
            self.sock.local,
            req.hpda,
            req.maxr2t,
            req.digests.header,
            req.digests.data
        );
        let mut out = [0u8; IC_BYTES];
        IcResp {
            pfv: 0,
            cpda: 0,
            digests: req.digests,
            maxh2cdata: self.maxh2cdata,
        }
        .encode(&mut out);
        self.send.push_bytes(&out);
        self.rx_state = RxState::Header;
        Ok(())
    }

    /// Largest in-capsule data this queue accepts.
    fn in_capsule_limit(&self) -> usize {
        match &self.queue {
            Queue::Io(q) => (q.view.in_capsule_data_size as usize).max(ADMIN_IN_CAPSULE_BYTES),
            _ => ADMIN_IN_CAPSULE_BYTES,
        }
    }

    /// Handles the PDU at the front of the buffer if its header (and, for
    /// capsules, its data) is complete. Returns whether it did.
    fn next_pdu(&mut self, conn: &Rc<Connection>) -> Result<bool, Ending> {
        let pending = self.rx.pending();
        let Some(ch) = CommonHeader::parse(pending) else {
            return Ok(false);
        };
        if ch.pdu_type == PduType::IcReq as u8 {
            return Err(fatal(
                PduError::sequence("second ICReq"),
                &pending[..CH_BYTES],
            ));
        }
        let layout = check(&ch, true, self.digests).map_err(|e| fatal(e, &pending[..CH_BYTES]))?;
        let need = match layout.pdu_type {
            PduType::CapsuleCmd => {
                if layout.data_len > self.in_capsule_limit() {
                    return Err(fatal(
                        PduError {
                            fes: pdu::fes::DATA_LIMIT_EXCEEDED,
                            fei: 0,
                            reason: "in-capsule data larger than the queue accepts",
                        },
                        &pending[..CH_BYTES],
                    ));
                }
                layout.plen
            }
            PduType::H2CData => layout.data_offset,
            _ => layout.plen,
        };
        if pending.len() < need {
            return Ok(false);
        }
        if layout.header_digest
            && !header_digest_ok(
                &pending[..layout.hlen],
                &pending[layout.hlen..layout.hlen + DIGEST_BYTES],
            )
        {
            return Err(fatal(
                PduError {
                    fes: pdu::fes::HEADER_DIGEST_ERROR,
                    fei: 0,
                    reason: "header digest mismatch",
                },
                &pending[..layout.hlen],
            ));
        }
        match layout.pdu_type {
            PduType::CapsuleCmd => {
                if let Some(why) = self.capsule(conn, &layout)? {
                    // Left where it is: handled again once `why` clears.
                    self.stalled = Some(why);
                    return Ok(false);
                }
                self.rx.consume(layout.plen);
            }
            PduType::H2CData => {
                self.h2c_header(&layout)?;
                self.rx.consume(layout.data_offset);
            }
            PduType::H2CTermReq => {
                let (fes, fei) = pdu::parse_term_req(pending).unwrap_or((0, 0));
                log::warn!(
                    "NVMe/TCP {}: host terminated the connection (FES {fes:#x}, FEI {fei})",
                    self.sock.peer
                );
                return Err(Ending::Gone);
            }
            _ => {
                return Err(fatal(
                    PduError::sequence("data PDU with no transfer in progress"),
                    &pending[..layout.hlen],
                ))
            }
        }
        Ok(true)
    }

    /// Whether a capsule's data digest (if negotiated) matches its data.
    fn capsule_digest_ok(layout: &PduLayout, pdu: &[u8]) -> bool {
        if !layout.data_digest {
            return true;
        }
        let data = &pdu[layout.data_offset..layout.data_offset + layout.data_len];
        let got = u32::from_le_bytes(
            pdu[layout.plen - 4..layout.plen]
                .try_into()
                .unwrap_or([0; 4]),
        );
        crate::wire::crc32c_digest(data) == got
    }

    /// A complete CapsuleCmd at the front of the receive buffer: handled
    /// (None), or not taken yet for want of a resource (the stall; nothing
    /// of it has been done).
    #[inline]
    fn capsule(
        &mut self,
        conn: &Rc<Connection>,
        layout: &PduLayout,
    ) -> Result<Option<Stall>, Ending> {
        // Every command may add to the send queue (an admin one up to
        // max_io_size): none is taken while it is full.
        if self.send.queued_bytes() >= MAX_SEND_QUEUE_BYTES {
            return Ok(Some(Stall::SendQueue));
        }
        let pdu = &self.rx.pending()[..layout.plen];
        let Some(sqe) = Sqe::from_bytes(&pdu[CH_BYTES..]) else {
            return Ok(None);
        };
        if !Self::capsule_digest_ok(layout, pdu) {
            // SPDK: transient transport error, connection kept.
            self.respond(
                &sqe,
                cqe(
                    sqe.cid(),
                    Status::generic(sc::COMMAND_TRANSIENT_TRANSPORT_ERROR),
                ),
                &[],
            );
            return Ok(None);
        }
        let (ds, dl) = (layout.data_offset, layout.data_len);
        let fabrics = sqe.opcode() == OPC_FABRICS;
        match &mut self.queue {
            Queue::Unconnected if fabrics && sqe.fctype() == fctype::CONNECT => {
                let data = self.rx.pending()[ds..ds + dl].to_vec();
                self.connect(conn, sqe, data);
            }
            // Nothing but Connect before a controller exists.
            Queue::Unconnected | Queue::Connecting => self.respond(
                &sqe,
                cqe(sqe.cid(), Status::generic(sc::COMMAND_SEQUENCE_ERROR)),
                &[],
            ),
            Queue::Admin {
                ctrl,
                attach,
                guard,
            } => {
                if let Some(a) = attach {
                    ctrl.namespaces_changed(a.generation(), || a.views());
                }
                let granted = ctrl.io_queues_granted;
                let out = if fabrics {
                    ctrl.fabrics(&sqe)
                } else {
                    ctrl.admin(&sqe)
                };
                if ctrl.io_queues_granted != granted {
                    // I/O Connects are checked against the grant on the
                    // main reactor: it learns of it before the host does.
                    let (cntlid, id, n) = (ctrl.cntlid, guard.id, ctrl.io_queues_granted);
                    let record = move || admin::io_queues_granted(cntlid, id, n);
                    if reactor::is_main_core() {
                        record();
                    } else {
                        reactor::send(reactor::main_core(), record);
                    }
                }
                self.respond_outcome(&sqe, out);
                // An AER just held may be owed the notice already.
                self.sync_admin();
            }
            Queue::Io(_) if fabrics => self.respond(
                &sqe,
                cqe(sqe.cid(), Status::generic(sc::INVALID_OPCODE).dnr()),
                &[],
            ),
            Queue::Io(q) => {
                if !q.reqs.has_free() {
                    // The host has more commands out than its queue holds.
                    // Wait for one to finish, unless every slot waits for
                    // data that can only come after this capsule.
                    if q.reqs.all_awaiting_data() {
                        log::warn!(
                            "NVMe/TCP {}: host exceeded its queue size with every command waiting for its data, closing",
                            self.sock.peer
                        );
                        return Err(Ending::Gone);
                    }
                    return Ok(Some(Stall::Slot));
                }
                let mut in_place = SharedBuf::empty();
                let mut copy = IoBuf::empty();
                if dl > 0 {
                    let view = (sqe.opcode() == opc::WRITE && self.rx.can_pin())
                        .then(|| self.rx.share(ds, dl))
                        .flatten();
                    if let Some(view) = view {
                        // The write reads its data where it was received
                        // (the view pins that receive block).
                        in_place = view;
                    } else if let Some(mut b) = IoBuf::try_budgeted(dl) {
                        b.as_mut_slice()
                            .copy_from_slice(&self.rx.pending()[ds..ds + dl]);
                        copy = b;
                    } else {
                        // Pinned receive blocks come back as their writes
                        // complete; buffers as any command on this core ends.
                        bdev::buf::wake_on_budget_return();
                        return Ok(Some(Stall::CapsuleData));
                    }
                }
                let Some(i) = q.reqs.alloc(sqe) else {
                    return Ok(Some(Stall::Slot));
                };
                if let Some(r) = q.reqs.get_mut(i) {
                    if dl > 0 {
                        r.in_place = in_place;
                        r.buf = copy;
                    }
                    r.received = dl;
                }
                self.start_io(conn, i);
            }
        }
        Ok(None)
    }

    /// Queues a response: `data` (cut to what the SGL asked) as one
    /// C2HData, then the CapsuleResp.
    fn respond(&mut self, sqe: &Sqe, c: Cqe, data: &[u8]) {
        let data = &data[..data.len().min(sqe.sgl().length() as usize)];
        if !data.is_empty() {
            push_c2h_header(&mut self.send, sqe.cid(), data.len(), self.digests);
            self.send.push_bytes(data);
            push_data_digest(&mut self.send, data, self.digests);
        }
        push_capsule_resp(&mut self.send, &c, self.digests);
    }

    fn respond_outcome(&mut self, sqe: &Sqe, out: AdminOutcome) {
        if let Some(c) = out.cqe {
            self.respond(sqe, c, &out.data);
        }
    }

    /// Fabrics Connect: checked here, decided by the main reactor.
    fn connect(&mut self, conn: &Rc<Connection>, sqe: Sqe, data: Vec<u8>) {
        let cid = sqe.cid();
        let fail = move |dw0: u32, status: Status| {
            let mut c = cqe(cid, status);
            c.set_dw0(dw0);
            c
        };
        if data.len() < CONNECT_DATA_BYTES {
            let c = fail(0, Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr());
            self.respond(&sqe, c, &[]);
            return;
        }
        let cmd = ConnectCmd::from_sqe(&sqe);
        let cdata = match ConnectData::parse(&data) {
            Ok(d) => d,
            Err(bad) => {
                let c = fail(
                    crate::wire::fabrics::connect_invalid_param_dw0(bad.0, true),
                    Status::command_specific(
                        crate::wire::nvme::fabrics_sc::CONNECT_INVALID_PARAMETERS,
                    )
                    .dnr(),
                );
                self.respond(&sqe, c, &[]);
                return;
            }
        };
        self.queue = Queue::Connecting;
        let site = admin::QueueSite {
            local: self.sock.local,
            peer: self.sock.peer,
            core: reactor::current_core().0,
            token: self.token,
        };
        let peer = site.peer;
        let hostnqn = cdata.hostnqn.clone();
        let weak = Rc::downgrade(conn);
        spawn_after_poll(async move {
            let main = reactor::main_core();
            let (c2, d2) = (cmd, cdata.clone());
            let mut result =
                reactor::call(main, move || admin::connect(&c2, &d2, site, false)).await;
            if matches!(result, Ok(Err(r)) if r.retry) {
                // A live queue has this QID: maybe one the host is closing.
                reactor::sleep(limits::DUPLICATE_QID_RETRY).await;
                result =
                    reactor::call(main, move || admin::connect(&cmd, &cdata, site, true)).await;
            }
            // Registered from here on: dropping the guard (even unused,
            // if the connection died meanwhile) unregisters it.
            let accepted = match result {
                Ok(Ok((cntlid, view, id))) => {
                    let guard = QpairGuard {
                        id,
                        cntlid: (cmd.qid == 0).then_some(cntlid),
                    };
                    Ok((cntlid, view, guard))
                }
                Ok(Err(r)) => Err(fail(r.dw0, r.status)),
                Err(_) => Err(fail(0, Status::generic(sc::INTERNAL_ERROR))),
            };
            let Some(conn) = weak.upgrade() else { return };
            let mut st = conn.state.borrow_mut();
            if st.closed {
                return;
            }
            match accepted {
                Ok((cntlid, view, guard)) => {
                    log::debug!(
                        "NVMe/TCP {peer}: Connect qid {} sqsize {} kato {} ms to {} -> cntlid {cntlid}",
                        cmd.qid,
                        cmd.sqsize,
                        cmd.kato_ms,
                        view.nqn
                    );
                    if cmd.qid == 0 {
                        poll_group::keep_alive_changed();
                        let attach = (!view.discovery).then(|| changes::attach(&view, false));
                        let mut ctrl = Controller::new(cntlid, hostnqn, view, cmd.kato_ms);
                        if let Some(a) = &attach {
                            // A change that overtook this Connect: the
                            // host learns the list by Identify, no notice.
                            ctrl.namespaces_changed(a.generation(), || a.views());
                            ctrl.ns_notice_owed = false;
                        }
                        st.queue = Queue::Admin {
                            ctrl: Box::new(ctrl),
                            attach,
                            guard,
                        };
                    } else {
                        let entries = cmd.sqsize as usize + 1;
                        let icd = view.in_capsule_data_size as usize;
                        st.rx.grow(icd.max(ADMIN_IN_CAPSULE_BYTES) + RX_SLACK);
                        let q = IoQueue {
                            subsystem: changes::attach(&view, true),
                            view: view.without_namespaces(),
                            reqs: RequestTable::new(entries),
                            pending: VecDeque::with_capacity(entries),
                            _guard: guard,
                        };
                        st.queue = Queue::Io(Box::new(q));
                    }
                    let mut c = cqe(cid, Status::SUCCESS);
                    c.set_dw0(cntlid as u32);
                    st.respond(&sqe, c, &[]);
                }
                Err(c) => {
                    log::info!(
                        "NVMe/TCP {peer}: Connect qid {} refused: {:?} (dw0 {:#x})",
                        cmd.qid,
                        c.status(),
                        c.dw0()
                    );
                    st.queue = Queue::Unconnected;
                    st.respond(&sqe, c, &[]);
                }
            }
            drop(st);
            conn.kick();
        });
    }

    /// Starts the I/O command in slot `i` (its in-capsule data, if any,
    /// already in the slot): plans it, then gets its data buffers and goes
    /// on, or queues it behind those already waiting for buffers.
    #[inline]
    fn start_io(&mut self, conn: &Rc<Connection>, i: u16) {
        let Queue::Io(q) = &mut self.queue else {
            return;
        };
        let Some(r) = q.reqs.get_mut(i) else { return };
        let sqe = r.sqe;
        let Some(ns) = q.subsystem.namespace(sqe.nsid()) else {
            return self.complete(i, Status::generic(sc::INVALID_NAMESPACE).dnr());
        };
        let plan = match io::plan(&sqe, Some(&ns.view), q.view.max_io_size) {
            Ok(p) => p,
            Err(st) => return self.complete(i, st),
        };
        r.plan = Some(plan);
        r.ns_instance = ns.instance();
        if let Transfer::ToController(len) = plan.transfer {
            if r.received > 0 {
                if r.received < len {
                    return self.complete(i, Status::generic(sc::DATA_SGL_LENGTH_INVALID).dnr());
                }
                if r.in_place.is_empty() {
                    r.buf.resize(len);
                } else if let Some(v) = r.in_place.slice(0, len) {
                    r.in_place = v;
                }
            }
        }
        if !q.pending.is_empty() || !acquire_buffers(r) {
            // Waiting holds nothing but the slot: the namespace is looked
            // up again when the command goes on.
            r.state = SlotState::NeedBuffer;
            q.pending.push_back(i);
            bdev::buf::wake_on_budget_return();
            PENDING_DATA_BUFFER.with(|c| c.set(c.get() + 1));
            return;
        }
        if matches!(plan.transfer, Transfer::ToController(_)) && r.received == 0 {
            // The R2T.
            return self.proceed(conn, i);
        }
        r.ns = Some(NsUse::new(ns));
        self.execute(conn, i);
    }

    /// Slot `i` has its buffers: asks the host for its data, or executes.
    #[inline]
    fn proceed(&mut self, conn: &Rc<Connection>, i: u16) {
        let Queue::Io(q) = &mut self.queue else {
            return;
        };
        let Some(r) = q.reqs.get_mut(i) else { return };
        let Some(plan) = r.plan else { return };
        match plan.transfer {
            Transfer::ToController(len) if r.received == 0 => {
                // Waiting for the host holds nothing: the namespace is
                // looked up again when the data is in.
                // Ask for the data: one R2T for the whole transfer (MAXH2CDATA
                // is the largest transfer we accept), tagged with the slot.
                r.state = SlotState::AwaitingData;
                let mut hdr = [0u8; SHORT_HLEN + DIGEST_BYTES];
                let n = DataHeader {
                    cccid: r.sqe.cid(),
                    ttag: i,
                    offset: 0,
                    length: len as u32,
                }
                .encode(&mut hdr, PduType::R2T, 0, self.digests);
                self.send.push_bytes(&hdr[..n]);
            }
            _ => {
                r.state = SlotState::Executing;
                self.execute(conn, i);
            }
        }
    }

    /// Gives the commands waiting for data buffers theirs, oldest first,
    /// while the core's budget lasts. Returns whether any went on.
    #[inline]
    fn retry_pending(&mut self, conn: &Rc<Connection>) -> bool {
        let mut any = false;
        loop {
            let Queue::Io(q) = &mut self.queue else {
                return any;
            };
            let Some(&i) = q.pending.front() else {
                return any;
            };
            let Some(r) = q.reqs.get_mut(i) else {
                q.pending.pop_front();
                continue;
            };
            if !acquire_buffers(r) {
                bdev::buf::wake_on_budget_return();
                return any;
            }
            q.pending.pop_front();
            any = true;
            self.proceed(conn, i);
        }
    }

    /// An H2CData header: checks it against the slot its tag names.
    fn h2c_header(&mut self, layout: &PduLayout) -> Result<(), Ending> {
        let pending = self.rx.pending();
        let header = &pending[..layout.hlen];
        let h =
            DataHeader::parse(pending).ok_or_else(|| fatal(PduError::field(4, "short"), header))?;
        let slot = match &self.queue {
            Queue::Io(q) => q.reqs.get(h.ttag),
            _ => None,
        };
        let Some(r) = slot.filter(|r| r.state == SlotState::AwaitingData) else {
            return Err(fatal(
                PduError::field(10, "H2CData for no transfer in progress"),
                header,
            ));
        };
        if h.cccid != r.sqe.cid() {
            return Err(fatal(
                PduError::field(8, "H2CData for another command"),
                header,
            ));
        }
        let total = r.buf.len();
        if h.offset as usize != r.received
            || h.length as usize != layout.data_len
            || r.received + layout.data_len > total
        {
            return Err(fatal(
                PduError {
                    fes: pdu::fes::DATA_OUT_OF_RANGE,
                    fei: 0,
                    reason: "H2CData offset or length out of range",
                },
                header,
            ));
        }
        if layout.data_len > self.maxh2cdata as usize {
            return Err(fatal(
                PduError {
                    fes: pdu::fes::DATA_LIMIT_EXCEEDED,
                    fei: 0,
                    reason: "H2CData larger than MAXH2CDATA",
                },
                header,
            ));
        }
        self.rx_state = RxState::Data(H2cData {
            slot: h.ttag,
            start: h.offset as usize,
            len: layout.data_len,
            got: 0,
            digest: layout.data_digest.then_some(([0; DIGEST_BYTES], 0)),
        });
        Ok(())
    }

    /// Moves buffered payload (and digest) bytes of the current H2CData
    /// into place. Returns whether the PDU is complete.
    fn h2c_payload(&mut self, conn: &Rc<Connection>, mut d: H2cData) -> Result<bool, Ending> {
        let Queue::Io(q) = &mut self.queue else {
            return Err(Ending::Gone);
        };
        let Some(r) = q.reqs.get_mut(d.slot) else {
            return Err(Ending::Gone);
        };
        let pending = self.rx.pending();
        let n = pending.len().min(d.len - d.got);
        if n > 0 {
            let at = d.start + d.got;
            r.buf.as_mut_slice()[at..at + n].copy_from_slice(&pending[..n]);
            d.got += n;
        }
        let mut used = n;
        if let Some((mut digest, mut have)) = d.digest {
            if d.got == d.len {
                let m = (pending.len() - used).min(DIGEST_BYTES - have);
                digest[have..have + m].copy_from_slice(&pending[used..used + m]);
                have += m;
                used += m;
            }
            d.digest = Some((digest, have));
        }
        self.rx.consume(used);
        let complete = d.got == d.len && d.digest.is_none_or(|(_, have)| have == DIGEST_BYTES);
        if !complete {
            self.rx_state = RxState::Data(d);
            return Ok(false);
        }
        self.rx_state = RxState::Header;
        if let Some((digest, _)) = d.digest {
            let data = &r.buf.as_slice()[d.start..d.start + d.len];
            if crate::wire::crc32c_digest(data) != u32::from_le_bytes(digest) {
                // As SPDK: the command fails with a transient transport
                // error; the connection stays.
                r.status = Status::generic(sc::COMMAND_TRANSIENT_TRANSPORT_ERROR);
            }
        }
        r.received += d.len;
        if r.received == r.buf.len() {
            let status = r.status;
            if status.is_success() {
                self.execute(conn, d.slot);
            } else {
                self.complete(d.slot, status);
            }
        }
        Ok(true)
    }

    /// Submits slot `i`'s planned command (its data in place) to the
    /// namespace's bdev channel on this core.
    fn execute(&mut self, conn: &Rc<Connection>, i: u16) {
        let Queue::Io(q) = &mut self.queue else {
            return;
        };
        let Some(r) = q.reqs.get_mut(i) else { return };
        let Some(plan) = r.plan else { return };
        let opcode = r.sqe.opcode();
        if r.ns.is_none() {
            // Its data came by R2T: the namespace must still be the one
            // the command was planned against.
            let ns = q
                .subsystem
                .namespace(r.sqe.nsid())
                .filter(|n| n.instance() == r.ns_instance);
            let Some(ns) = ns else {
                return self.complete(i, Status::generic(sc::INVALID_NAMESPACE).dnr());
            };
            r.ns = Some(NsUse::new(ns));
        }
        let Some(io_type) = plan.io_type else {
            return self.complete(i, Status::SUCCESS);
        };
        let Some(ch) = r.ns.as_ref().map(|n| n.channel()) else {
            return self.complete(i, Status::generic(sc::INVALID_NAMESPACE).dnr());
        };
        let ch = &ch;
        r.state = SlotState::Executing;
        let cb: Rc<dyn IoCompletion> = conn.clone();
        let submit = |io_type, slba, nlb, buf| {
            let mut io = IoBox::with(io_type, slba, nlb, buf);
            io.tag = i as u64;
            // A read may be sent from where the bdev holds it.
            io.zcopy = opcode == opc::READ;
            ch.submit(io, cb.clone());
        };
        match opcode {
            opc::DSM => {
                let num_blocks = ch.bdev().num_blocks();
                let ranges = plan.nlb as usize;
                let list = r.buf.as_slice();
                let bad = io::dsm_ranges(list, ranges, num_blocks).find_map(|x| x.err());
                if let Some(st) = bad {
                    return self.complete(i, st);
                }
                let mut n = 0;
                for (slba, nlb) in io::dsm_ranges(list, ranges, num_blocks).flatten() {
                    n += 1;
                    submit(IoType::Unmap, slba, nlb, IoBuf::empty());
                }
                r.outstanding = n;
                if n == 0 {
                    self.complete(i, Status::SUCCESS);
                }
            }
            opc::COMPARE => {
                r.aux.resize(r.buf.len());
                r.outstanding = 1;
                let aux = std::mem::take(&mut r.aux);
                submit(io_type, plan.slba, plan.nlb, aux);
            }
            _ => {
                r.outstanding = 1;
                let mut io = IoBox::with(io_type, plan.slba, plan.nlb, IoBuf::empty());
                if !r.in_place.is_empty() {
                    io.shared = std::mem::take(&mut r.in_place);
                } else if io_type.has_data() {
                    io.buf = std::mem::take(&mut r.buf);
                }
                io.tag = i as u64;
                io.zcopy = opcode == opc::READ;
                ch.submit(io, cb.clone());
            }
        }
    }

    /// A bdev I/O of one of our commands finished.
    fn io_completed(&mut self, _conn: &Rc<Connection>, mut io: IoBox) {
        let Queue::Io(q) = &mut self.queue else {
            return;
        };
        let i = io.tag as u16;
        let Some(r) = q.reqs.get_mut(i) else { return };
        if r.state != SlotState::Executing {
            return;
        }
        if io.io_type.has_data() {
            let buf = io.take_buf();
            if r.sqe.opcode() == opc::COMPARE {
                r.aux = buf;
            } else if !buf.is_empty() {
                r.buf = buf;
            }
            if io.io_type == IoType::Read {
                // A zero-copy read's data: a view that keeps the bdev's
                // memory alive until it has been sent. The buffer it did
                // not need goes back to the budget now.
                r.lent = std::mem::take(&mut io.shared);
                if !r.lent.is_empty() {
                    r.buf = IoBuf::empty();
                }
            }
        }
        if !io.status().is_success() && r.status.is_success() {
            r.status = Status::generic(sc::INTERNAL_ERROR);
        }
        drop(io);
        r.outstanding = r.outstanding.saturating_sub(1);
        if r.outstanding > 0 {
            return;
        }
        let status = r.status;
        match r.sqe.opcode() {
            opc::READ if status.is_success() => self.send_read_data(i),
            opc::COMPARE if status.is_success() => {
                let same = r.buf.as_slice() == &r.aux.as_slice()[..r.buf.len().min(r.aux.len())];
                let st = if same {
                    Status::SUCCESS
                } else {
                    io::COMPARE_FAILURE
                };
                self.complete(i, st)
            }
            _ => self.complete(i, status),
        }
    }

    /// Responds to slot `i`'s command with `status` and frees the slot.
    fn complete(&mut self, i: u16, status: Status) {
        let Queue::Io(q) = &mut self.queue else {
            return;
        };
        let Some(r) = q.reqs.get_mut(i) else { return };
        // Unpins the receive block of an in-capsule write.
        r.in_place = SharedBuf::empty();
        push_capsule_resp(&mut self.send, &cqe(r.sqe.cid(), status), self.digests);
        q.reqs.release(i);
        COMPLETED_NVME_IO.with(|c| c.set(c.get() + 1));
    }

    /// A read's data, sent from the slot's buffer (C2HData header, data in
    /// place, digest, CapsuleResp); the slot is freed once its data left.
    fn send_read_data(&mut self, i: u16) {
        let Queue::Io(q) = &mut self.queue else {
            return;
        };
        let Some(cid) = q.reqs.get(i).map(|r| r.sqe.cid()) else {
            return;
        };
        let data = q.reqs.read_data(i);
        push_c2h_header(&mut self.send, cid, data.len(), self.digests);
        self.send.push_slot(i, 0, data.len());
        push_data_digest(&mut self.send, data, self.digests);
        push_capsule_resp(&mut self.send, &cqe(cid, Status::SUCCESS), self.digests);
        if let Some(r) = q.reqs.get_mut(i) {
            r.state = SlotState::Sending;
        }
        COMPLETED_NVME_IO.with(|c| c.set(c.get() + 1));
    }

    /// Sends as much of the send queue as the socket takes, one `sendmsg`
    /// per [`MAX_IOV`] slices; when the socket is full, asks the poll group
    /// to report it writable.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.send.is_empty() {
            let reqs = match &mut self.queue {
                Queue::Io(q) => Some(&mut q.reqs),
                _ => None,
            };
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = {
                let reqs = reqs.as_deref();
                self.send
                    .gather(|slot| reqs.map_or(&[][..], |t| t.read_data(slot)), &mut iov)
            };
            let sent = if n == 0 {
                0
            } else {
                match self.sock.send_vectored(&iov[..n]) {
                    Ok(0) => {
                        self.out_blocked = true;
                        self.update_interest();
                        return Ok(());
                    }
                    Ok(s) => s,
                    Err(e) => return Err(e),
                }
            };
            let mut reqs = reqs;
            self.send.advance(sent, |slot| {
                if let Some(t) = reqs.as_deref_mut() {
                    t.release(slot);
                }
            });
        }
        if self.out_blocked {
            self.out_blocked = false;
            self.update_interest();
        }
        Ok(())
    }

    /// Tells epoll what this connection waits for: input unless stalled,
    /// room to write while output is blocked (only when that changed).
    #[inline]
    fn update_interest(&mut self) {
        let want = (self.stalled.is_none(), self.out_blocked);
        if want != self.interest && !self.closed {
            self.interest = want;
            poll_group::set_interest(self.sock.fd(), self.token, want.0, want.1);
        }
    }
}

/// Gets slot `r`'s data buffers for its planned transfer from the core's
/// budget (the host's data by R2T, a read's destination, a Compare's
/// blocks); false, holding none of them, if the budget is spent.
#[inline]
fn acquire_buffers(r: &mut Request) -> bool {
    let Some(plan) = r.plan else { return true };
    let (buf_len, aux_len) = match plan.transfer {
        // A read: the common case, one buffer.
        Transfer::ToHost(len) => return budgeted(&mut r.buf, len),
        Transfer::None => return true,
        Transfer::ToController(len) => (
            if r.received == 0 { len } else { 0 },
            if r.sqe.opcode() == opc::COMPARE {
                len
            } else {
                0
            },
        ),
    };
    let had = !r.buf.is_empty();
    if buf_len > 0 && !budgeted(&mut r.buf, buf_len) {
        return false;
    }
    if aux_len > 0 && !budgeted(&mut r.aux, aux_len) {
        if !had {
            r.buf = IoBuf::empty();
        }
        return false;
    }
    true
}

/// `b` holds data already, or gets `len` bytes of the core's budget.
#[inline]
fn budgeted(b: &mut IoBuf, len: usize) -> bool {
    if !b.is_empty() {
        return true;
    }
    match IoBuf::try_budgeted(len) {
        Some(x) => {
            *b = x;
            true
        }
        None => false,
    }
}

/// Spawns work for a connection from inside the poll group. glommio may
/// poll a new task at once; the task first yields, so it never finds the
/// connection's state still borrowed by the poller that spawned it.
fn spawn_after_poll(fut: impl std::future::Future<Output = ()> + 'static) {
    reactor::spawn_local(async move {
        futures_lite::future::yield_now().await;
        fut.await
    });
}

/// Queues the header of a C2HData carrying `len` bytes of command `cid`
/// (the data follows it).
#[inline]
fn push_c2h_header(send: &mut SendQueue, cid: u16, len: usize, digests: Digests) {
    let mut hdr = [0u8; SHORT_HLEN + DIGEST_BYTES];
    let n = DataHeader {
        cccid: cid,
        ttag: 0,
        offset: 0,
        length: len as u32,
    }
    .encode(&mut hdr, PduType::C2HData, pdu::flags::LAST_PDU, digests);
    send.push_bytes(&hdr[..n]);
}

/// Queues the data digest of `data` when negotiated.
#[inline]
fn push_data_digest(send: &mut SendQueue, data: &[u8], digests: Digests) {
    if digests.data {
        send.push_bytes(&crate::wire::crc32c_digest(data).to_le_bytes());
    }
}

#[inline]
fn push_capsule_resp(send: &mut SendQueue, c: &Cqe, digests: Digests) {
    let mut rsp = [0u8; SHORT_HLEN + DIGEST_BYTES];
    let n = encode_capsule_resp(&mut rsp, c, digests);
    send.push_bytes(&rsp[..n]);
}

fn fatal(e: PduError, header: &[u8]) -> Ending {
    Ending::Fatal(e, header[..header.len().min(TERM_REQ_MAX_DATA)].to_vec())
}
