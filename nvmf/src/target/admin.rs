//! Controllers and the admin queue: fabrics Connect (admin and I/O queues)
//! against the subsystem table, Property Get/Set (CAP, VS, CC, CSTS),
//! Identify, Get/Set Features, Get Log Page, Keep Alive, Abort and
//! Asynchronous Event Request. Command handling is a pure function of the
//! controller's state and the command, so it is tested without sockets.
//!
//! A controller is created by an admin Connect (dynamic model, cntlid from
//! the subsystem's range) and lives as long as its admin queue (or until
//! its host loses access, `changes.rs`); the table of live controllers and
//! connected queue pairs is on the main reactor, so I/O Connects on any
//! core can find theirs and a change can find every queue it must close.
//! A controller has at most the I/O queues Set Features Number of Queues
//! granted (the transport's `max_io_qpairs_per_ctrlr` until then), each
//! QID live once; what one admin command returns is at most
//! `max_io_size` (the MDTS we report).

use std::collections::BTreeMap;

use crate::wire::fabrics::{
    self, connect_invalid_param_dw0, connect_offset, csts, fctype, reg, Cc, ConnectCmd,
    ConnectData, PropertyCmd, CNTLID_DYNAMIC,
};
use crate::wire::identify::{self, cns, ControllerIdentity, ControllerType, NamespaceIdentity};
use crate::wire::nvme::{fabrics_sc, sc, Cqe, Sqe, Status};

use super::subsystem::{with_target, Target};

/// What an admin queue needs to know of its subsystem, copied at Connect.
#[derive(Clone, Debug)]
pub struct SubsystemView {
    pub nqn: String,
    pub discovery: bool,
    pub serial: String,
    pub model: String,
    pub max_namespaces: u32,
    pub namespaces: Vec<NamespaceView>,
    pub max_queue_depth: u32,
    pub max_aq_depth: u32,
    pub max_io_qpairs: u32,
    pub in_capsule_data_size: u32,
    pub max_io_size: u32,
    /// Discovery subsystem: what the connecting host may reach, and the
    /// generation of that information.
    pub discovery_log: Vec<crate::wire::discovery::DiscoveryEntry>,
    pub discovery_genctr: u64,
    /// The subsystem's namespace generation this view was taken at.
    pub ns_generation: u64,
}

impl SubsystemView {
    /// The view without its namespace list (the per-core table serves it).
    pub fn without_namespaces(&self) -> SubsystemView {
        SubsystemView {
            namespaces: Vec::new(),
            discovery_log: Vec::new(),
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug)]
pub struct NamespaceView {
    pub nsid: u32,
    /// Which add of the namespace this is (unique per target), so an nsid
    /// removed and added again is never mistaken for the old one.
    pub instance: u64,
    /// For I/O queues: the bdev, whose channel on the queue's core serves it.
    pub bdev: bdev::BdevHandle,
    pub num_blocks: u64,
    pub block_size: u32,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
}

/// A refused Connect: its status and CQE DW0 (IPO/IATTR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub status: Status,
    pub dw0: u32,
    /// The QID is live on the controller: worth one more look after
    /// `limits::DUPLICATE_QID_RETRY` (its queue may be closing), as SPDK.
    pub retry: bool,
}

impl ConnectRefusal {
    fn new(status: Status, dw0: u32) -> ConnectRefusal {
        ConnectRefusal {
            status,
            dw0,
            retry: false,
        }
    }
}

fn invalid_param(ipo: u16, in_data: bool) -> ConnectRefusal {
    ConnectRefusal::new(
        Status::command_specific(fabrics_sc::CONNECT_INVALID_PARAMETERS).dnr(),
        connect_invalid_param_dw0(ipo, in_data),
    )
}

/// Invalid Queue Identifier, as SPDK answers a QID beyond the controller's
/// queues or already live (no IPO, no DNR).
fn invalid_qid() -> ConnectRefusal {
    ConnectRefusal::new(
        Status::command_specific(fabrics_sc::INVALID_QUEUE_IDENTIFIER),
        0,
    )
}

/// The table of live controllers (main reactor).
#[derive(Default)]
pub struct Controllers {
    pub live: BTreeMap<u16, ControllerRecord>,
    next: u16,
    pub qpairs: BTreeMap<u64, QpairRecord>,
    next_qpair: u64,
    pub stats: BTreeMap<u32, PollGroupStats>,
}

pub struct ControllerRecord {
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub io_qpairs: u32,
    /// I/O queues Set Features Number of Queues granted; 0 until then
    /// (the transport's maximum applies).
    pub io_queues_granted: u32,
    /// The admin queue pair's id: only its own closing destroys this
    /// controller (its cntlid may be reused once it is gone).
    pub admin_qpair: u64,
}

/// The discovery log for `hostnqn`: every port of every NVM subsystem the
/// host may connect to, then the discovery subsystem's own ports.
fn discovery_entries(t: &Target, hostnqn: &str) -> Vec<crate::wire::discovery::DiscoveryEntry> {
    let asqsz = t.transport.as_ref().map_or(128, |tr| tr.max_aq_depth) as u16;
    let mut out = Vec::new();
    let subs = t
        .subsystems
        .values()
        .filter(|s| !s.discovery && s.host_allowed(hostnqn))
        .chain(t.subsystems.values().filter(|s| s.discovery));
    for s in subs {
        for (i, l) in s.listeners.iter().enumerate() {
            out.push(crate::wire::discovery::DiscoveryEntry {
                ipv6: l.adrfam.eq_ignore_ascii_case("ipv6"),
                subtype: if s.discovery { 3 } else { 2 },
                portid: i as u16 + 1,
                asqsz,
                trsvcid: l.trsvcid.clone(),
                traddr: l.traddr.clone(),
                subnqn: s.nqn.clone(),
            });
        }
    }
    out
}

fn view(t: &Target, nqn: &str, hostnqn: &str) -> Option<SubsystemView> {
    let s = t.subsystems.get(nqn)?;
    let tr = t.transport.clone().unwrap_or_default();
    Some(SubsystemView {
        nqn: s.nqn.clone(),
        discovery: s.discovery,
        serial: s.serial_number.clone(),
        model: s.model_number.clone(),
        max_namespaces: s.max_namespaces,
        namespaces: s.namespace_views(),
        max_queue_depth: tr.max_queue_depth,
        max_aq_depth: tr.max_aq_depth,
        max_io_qpairs: tr.max_io_qpairs_per_ctrlr,
        in_capsule_data_size: tr.in_capsule_data_size,
        max_io_size: tr.max_io_size,
        ns_generation: s.ns_generation,
        discovery_log: if s.discovery {
            discovery_entries(t, hostnqn)
        } else {
            Vec::new()
        },
        discovery_genctr: t.genctr,
    })
}

/// Where a connecting queue is: its addresses, core and connection token.
#[derive(Clone, Copy, Debug)]
pub struct QueueSite {
    pub local: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
    pub core: u32,
    pub token: u64,
}

/// Validates a Connect, creates the controller for an admin queue and
/// records the queue pair, all at once on the main reactor, so a change
/// that comes after finds the queue. Returns the cntlid, the subsystem
/// view and the queue pair's id. `retried`: the caller waited after a
/// refusal marked `retry` (a QID still live is refused for good now).
pub fn connect(
    cmd: &ConnectCmd,
    data: &ConnectData,
    site: QueueSite,
    retried: bool,
) -> Result<(u16, SubsystemView, u64), ConnectRefusal> {
    let (cntlid, view, controller) = accept(cmd, data, site.local, retried)?;
    let id = qpair_connected(QpairRecord {
        cntlid,
        controller,
        qid: cmd.qid,
        subnqn: data.subnqn.clone(),
        hostnqn: data.hostnqn.clone(),
        core: site.core,
        token: site.token,
        listen: site.local,
        peer: site.peer,
    });
    if cmd.qid == 0 {
        with_target(|t| {
            if let Some(r) = t.controllers.live.get_mut(&cntlid) {
                r.admin_qpair = id;
            }
            // The admin queue's record names its controller by its own id.
            if let Some(q) = t.controllers.qpairs.get_mut(&id) {
                q.controller = id;
            }
        });
    }
    Ok((cntlid, view, id))
}

/// Checks a Connect; returns the cntlid, the view and, for an I/O queue,
/// its controller's admin queue pair id (0 for an admin queue).
fn accept(
    cmd: &ConnectCmd,
    data: &ConnectData,
    local: std::net::SocketAddr,
    retried: bool,
) -> Result<(u16, SubsystemView, u64), ConnectRefusal> {
    with_target(|t| {
        if cmd.recfmt != 0 {
            return Err(ConnectRefusal::new(
                Status::command_specific(fabrics_sc::INCOMPATIBLE_FORMAT).dnr(),
                0,
            ));
        }
        let v = view(t, &data.subnqn, &data.hostnqn)
            .ok_or(invalid_param(connect_offset::SUBNQN, true))?;
        // An NVM subsystem is reachable only where it listens (SPDK's rule);
        // the discovery service answers on every port.
        let listens_here = t.subsystems.get(&data.subnqn).is_some_and(|s| {
            s.discovery
                || s.listeners.iter().any(|l| {
                    l.socket_addr().is_ok_and(|a| {
                        a.port() == local.port()
                            && (a.ip() == local.ip() || a.ip().is_unspecified())
                    })
                })
        });
        if !listens_here {
            return Err(invalid_param(connect_offset::SUBNQN, true));
        }
        let allowed = t
            .subsystems
            .get(&data.subnqn)
            .is_some_and(|s| s.host_allowed(&data.hostnqn));
        if !allowed {
            // As SPDK: Connect Invalid Host carries no IPO/IATTR (those
            // belong to Connect Invalid Parameters).
            return Err(ConnectRefusal::new(
                Status::command_specific(fabrics_sc::INVALID_HOST).dnr(),
                0,
            ));
        }
        let depth_limit = if cmd.qid == 0 {
            v.max_aq_depth
        } else {
            v.max_queue_depth
        };
        if cmd.sqsize == 0 || cmd.sqsize as u32 >= depth_limit {
            return Err(invalid_param(connect_offset::SQSIZE, false));
        }
        let ctrls = &mut t.controllers;
        if cmd.qid == 0 {
            if data.cntlid != CNTLID_DYNAMIC {
                return Err(invalid_param(connect_offset::CNTLID, true));
            }
            let s = &t.subsystems[&data.subnqn];
            let (min, max) = (s.min_cntlid, s.max_cntlid);
            let span = (max - min) as u32 + 1;
            let mut cntlid = None;
            for i in 0..span {
                let c = min + ((ctrls.next as u32 + i) % span) as u16;
                if !ctrls.live.contains_key(&c) {
                    cntlid = Some(c);
                    break;
                }
            }
            let Some(c) = cntlid else {
                return Err(ConnectRefusal::new(
                    Status::command_specific(fabrics_sc::CONTROLLER_BUSY),
                    0,
                ));
            };
            ctrls.next = c.wrapping_sub(min).wrapping_add(1);
            ctrls.live.insert(
                c,
                ControllerRecord {
                    subnqn: data.subnqn.clone(),
                    hostnqn: data.hostnqn.clone(),
                    hostid: data.hostid,
                    io_qpairs: 0,
                    io_queues_granted: 0,
                    admin_qpair: 0,
                },
            );
            Ok((c, v, 0))
        } else {
            let rec = ctrls
                .live
                .get_mut(&data.cntlid)
                .filter(|r| r.subnqn == data.subnqn)
                .ok_or(invalid_param(connect_offset::CNTLID, true))?;
            if rec.hostnqn != data.hostnqn {
                return Err(invalid_param(connect_offset::HOSTNQN, true));
            }
            // QIDs 1..=n for the n I/O queues the controller has (SPDK
            // checks the transport's maximum only; a grant below it is
            // what the host was told it may use).
            let queues = match rec.io_queues_granted {
                0 => v.max_io_qpairs,
                n => n.min(v.max_io_qpairs),
            };
            if cmd.qid as u32 > queues {
                log::warn!(
                    "controller {} of {}: Connect for QID {} beyond its {queues} I/O queues",
                    data.cntlid,
                    data.subnqn,
                    cmd.qid
                );
                return Err(invalid_qid());
            }
            let controller = rec.admin_qpair;
            let live = ctrls
                .qpairs
                .values()
                .any(|q| q.controller == controller && q.qid == cmd.qid);
            if live {
                log::warn!(
                    "controller {} of {}: Connect for QID {}, which is live{}",
                    data.cntlid,
                    data.subnqn,
                    cmd.qid,
                    if retried { "" } else { " (checking again)" }
                );
                return Err(ConnectRefusal {
                    retry: !retried,
                    ..invalid_qid()
                });
            }
            rec.io_qpairs += 1;
            Ok((data.cntlid, v, controller))
        }
    })
}

/// Set Features Number of Queues on controller `cntlid` (whose admin queue
/// pair is `admin_qpair`) granted `n` I/O queues (main reactor).
pub fn io_queues_granted(cntlid: u16, admin_qpair: u64, n: u32) {
    with_target(|t| {
        if let Some(r) = t
            .controllers
            .live
            .get_mut(&cntlid)
            .filter(|r| r.admin_qpair == admin_qpair)
        {
            r.io_queues_granted = n;
        }
    })
}

/// CQE DW0 of the namespace attribute changed notice: type Notice (2),
/// info 0, log page 04h (changed namespace list).
pub const AEN_NS_ATTRIBUTE_CHANGED: u32 = 0x0004_0002;

/// Forgets a controller whose admin queue (`admin_qpair`) went away and
/// closes its I/O queues (main reactor), so nothing of it outlives the
/// association. Nothing happens if the controller is gone already (its
/// host lost access) and its cntlid went to another.
pub fn destroy(cntlid: u16, admin_qpair: u64) {
    let io: Vec<(u32, u64)> = with_target(|t| {
        let c = &mut t.controllers;
        if c.live
            .get(&cntlid)
            .is_none_or(|r| r.admin_qpair != admin_qpair)
        {
            return Vec::new();
        }
        c.live.remove(&cntlid);
        c.qpairs
            .values()
            .filter(|q| q.cntlid == cntlid && q.qid != 0)
            .map(|q| (q.core, q.token))
            .collect()
    });
    for (core, token) in io {
        reactor::send(reactor::CoreId(core), move || {
            super::poll_group::close_connections(&[token], "controller destroyed");
        });
    }
}

/// A connected queue pair, for `nvmf_subsystem_get_qpairs`.
#[derive(Clone, Debug)]
pub struct QpairRecord {
    pub cntlid: u16,
    /// Its controller's admin queue pair id (a cntlid is reused once its
    /// controller is gone; this is not).
    pub controller: u64,
    pub qid: u16,
    pub subnqn: String,
    pub hostnqn: String,
    pub core: u32,
    /// The connection's token in its core's poll group: it can be closed
    /// by it from the moment Connect accepted it.
    pub token: u64,
    pub listen: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
}

/// Records a queue pair that Connect bound (main reactor); returns its id.
fn qpair_connected(rec: QpairRecord) -> u64 {
    with_target(|t| {
        let q = &mut t.controllers;
        q.next_qpair += 1;
        let stats = q.stats.entry(rec.core).or_default();
        if rec.qid == 0 {
            stats.admin_qpairs += 1;
        } else {
            stats.io_qpairs += 1;
        }
        q.qpairs.insert(q.next_qpair, rec);
        q.next_qpair
    })
}

/// Forgets a queue pair that closed (main reactor).
pub fn qpair_closed(id: u64) {
    with_target(|t| forget_qpair(&mut t.controllers, id))
}

/// Forgets queue pair `id` if still recorded (each closing reports it, and
/// a change that closed it may have forgotten it first).
pub fn forget_qpair(c: &mut Controllers, id: u64) {
    if let Some(q) = c.qpairs.remove(&id) {
        if q.qid != 0 {
            if let Some(r) = c.live.get_mut(&q.cntlid) {
                r.io_qpairs = r.io_qpairs.saturating_sub(1);
            }
        }
    }
}

/// Queue pairs ever connected per core (`nvmf_get_stats`).
#[derive(Clone, Copy, Debug, Default)]
pub struct PollGroupStats {
    pub admin_qpairs: u64,
    pub io_qpairs: u64,
}

/// An admin queue's controller.
pub struct Controller {
    pub cntlid: u16,
    pub hostnqn: String,
    pub subsystem: SubsystemView,
    pub kato_ms: u32,
    pub cc: Cc,
    pub csts: u32,
    pub async_event_config: u32,
    /// Outstanding Asynchronous Event Requests (CIDs), answered on events.
    pub pending_aers: Vec<u16>,
    /// The namespaces changed since the host was last told: the next AER
    /// (held or coming) gets the namespace attribute notice. Changes
    /// before the host hears of them are told once.
    pub ns_notice_owed: bool,
    pub io_queues_granted: u32,
}

/// AERL + 1: how many AERs a host may leave outstanding.
const MAX_AERS: usize = 4;
/// Keep-alive granularity we advertise (KAS), in 100 ms units.
const KAS_100MS: u16 = 10;

/// What the admin queue does with one command.
pub struct AdminOutcome {
    /// None: no response now (a held AER).
    pub cqe: Option<Cqe>,
    /// Data for the host (C2H), already cut to what the command asked.
    pub data: Vec<u8>,
}

fn reply(cid: u16, status: Status) -> AdminOutcome {
    AdminOutcome {
        cqe: Some(Cqe::new(cid, status)),
        data: Vec::new(),
    }
}

impl Controller {
    pub fn new(cntlid: u16, hostnqn: String, subsystem: SubsystemView, kato_ms: u32) -> Controller {
        Controller {
            cntlid,
            hostnqn,
            subsystem,
            kato_ms,
            cc: Cc(0),
            csts: 0,
            async_event_config: 0,
            pending_aers: Vec::new(),
            ns_notice_owed: false,
            io_queues_granted: 0,
        }
    }

    fn cap(&self) -> u64 {
        let mqes = (self.subsystem.max_queue_depth.clamp(2, 65536) - 1) as u16;
        fabrics::cap(mqes, 30)
    }

    fn property(&mut self, sqe: &Sqe, set: bool) -> AdminOutcome {
        let p = PropertyCmd::from_sqe(sqe);
        let cid = sqe.cid();
        let bad = || {
            reply(
                cid,
                Status::command_specific(fabrics_sc::CONNECT_INVALID_PARAMETERS).dnr(),
            )
        };
        if set {
            if p.offset != reg::CC || p.size != 4 {
                return bad();
            }
            let new = Cc(p.value as u32);
            if new.shn() != 0 {
                self.csts = (self.csts & !(0x3 << 2)) | csts::SHST_COMPLETE;
            }
            if new.en() && !self.cc.en() {
                if new.iosqes() == 6 && new.iocqes() == 4 && new.mps() == 0 {
                    self.csts |= csts::RDY;
                } else {
                    self.csts |= csts::CFS;
                }
            } else if !new.en() {
                self.csts &= !csts::RDY;
            }
            self.cc = new;
            return reply(cid, Status::SUCCESS);
        }
        let v = match (p.offset, p.size) {
            (reg::CAP, _) => self.cap(),
            (reg::VS, 4) => fabrics::VERSION_1_3 as u64,
            (reg::CC, 4) => self.cc.0 as u64,
            (reg::CSTS, 4) => self.csts as u64,
            _ => return bad(),
        };
        let mut c = Cqe::new(cid, Status::SUCCESS);
        c.set_result64(if p.size == 4 { v & 0xFFFF_FFFF } else { v });
        AdminOutcome {
            cqe: Some(c),
            data: Vec::new(),
        }
    }

    fn identify(&self, sqe: &Sqe) -> AdminOutcome {
        let cid = sqe.cid();
        let s = &self.subsystem;
        let mut b = [0u8; identify::IDENTIFY_BYTES];
        let nsid = sqe.nsid();
        match (sqe.cdw(10) & 0xFF) as u8 {
            cns::CONTROLLER => {
                let mdts = (s.max_io_size / 4096).max(1).trailing_zeros() as u8;
                identify::controller(
                    &mut b,
                    &ControllerIdentity {
                        controller_type: if s.discovery {
                            ControllerType::Discovery
                        } else {
                            ControllerType::Io
                        },
                        serial_number: &s.serial,
                        model_number: &s.model,
                        firmware_revision: env!("CARGO_PKG_VERSION"),
                        cntlid: self.cntlid,
                        version: fabrics::VERSION_1_3,
                        mdts,
                        kas_100ms: KAS_100MS,
                        max_cmd: s.max_queue_depth as u16,
                        nn: s.max_namespaces,
                        oncs: identify::oncs::DSM
                            | identify::oncs::WRITE_ZEROES
                            | identify::oncs::COMPARE,
                        volatile_write_cache: true,
                        in_capsule_data_bytes: s.in_capsule_data_size,
                        subnqn: &s.nqn,
                        oaes: if s.discovery {
                            identify::OAES_DISCOVERY_LOG_CHANGE
                        } else {
                            identify::OAES_NS_ATTRIBUTE
                        },
                    },
                );
            }
            cns::NAMESPACE | cns::NS_DESCRIPTORS => {
                if nsid == 0 || nsid > s.max_namespaces {
                    return reply(cid, Status::generic(sc::INVALID_NAMESPACE).dnr());
                }
                match s.namespaces.iter().find(|n| n.nsid == nsid) {
                    // An inactive NSID reads as zeroes (CNS 00h).
                    None if (sqe.cdw(10) & 0xFF) as u8 == cns::NAMESPACE => {}
                    None => return reply(cid, Status::generic(sc::INVALID_NAMESPACE).dnr()),
                    Some(n) => {
                        let id = NamespaceIdentity {
                            num_blocks: n.num_blocks,
                            block_size: n.block_size,
                            nguid: n.nguid,
                            uuid: n.uuid,
                            deallocated_reads_zeroes: true,
                            optimal_io_boundary_blocks: 0,
                        };
                        if (sqe.cdw(10) & 0xFF) as u8 == cns::NAMESPACE {
                            identify::namespace(&mut b, &id);
                        } else {
                            identify::ns_descriptors(&mut b, &id);
                        }
                    }
                }
            }
            cns::ACTIVE_NS_LIST => {
                if nsid >= 0xFFFF_FFFE {
                    return reply(cid, Status::generic(sc::INVALID_NAMESPACE).dnr());
                }
                let ids: Vec<u32> = s.namespaces.iter().map(|n| n.nsid).collect();
                identify::active_ns_list(&mut b, &ids, nsid);
            }
            // Command-set specific structures: no limits to report.
            cns::CS_NAMESPACE | cns::CS_CONTROLLER => {}
            _ => return reply(cid, Status::generic(sc::INVALID_FIELD).dnr()),
        }
        AdminOutcome {
            cqe: Some(Cqe::new(cid, Status::SUCCESS)),
            data: b.to_vec(),
        }
    }

    fn features(&mut self, sqe: &Sqe, set: bool) -> AdminOutcome {
        let cid = sqe.cid();
        let fid = (sqe.cdw(10) & 0xFF) as u8;
        let mut c = Cqe::new(cid, Status::SUCCESS);
        match fid {
            // Number of queues: grant up to the transport's limit.
            0x07 => {
                let max = self.subsystem.max_io_qpairs.max(1);
                if set {
                    let want = (sqe.cdw(11) & 0xFFFF) + 1;
                    self.io_queues_granted = want.min(max);
                }
                let n = if self.io_queues_granted == 0 {
                    max
                } else {
                    self.io_queues_granted
                };
                c.set_dw0((n - 1) | (n - 1) << 16);
            }
            0x0B => {
                if set {
                    self.async_event_config = sqe.cdw(11);
                }
                c.set_dw0(self.async_event_config);
            }
            0x0F => {
                if set {
                    self.kato_ms = sqe.cdw(11);
                }
                c.set_dw0(self.kato_ms);
            }
            // Arbitration, power management, temperature, error recovery,
            // volatile write cache: report defaults, accept and ignore sets.
            0x01 | 0x02 | 0x04 | 0x05 => {}
            // Volatile write cache: enabled.
            0x06 => {
                c.set_dw0(1);
            }
            _ => return reply(cid, Status::generic(sc::INVALID_FIELD).dnr()),
        }
        AdminOutcome {
            cqe: Some(c),
            data: Vec::new(),
        }
    }

    fn log_page(&self, sqe: &Sqe) -> AdminOutcome {
        let cid = sqe.cid();
        let lid = (sqe.cdw(10) & 0xFF) as u8;
        let numd = ((sqe.cdw(10) >> 16) | (sqe.cdw(11) & 0xFFFF) << 16) as usize + 1;
        let len = numd * 4;
        // More than the MDTS we report: what NVMe says a command exceeding
        // it gets (and what bounds the data one admin capsule makes us
        // queue).
        if len > self.subsystem.max_io_size as usize {
            return reply(cid, Status::generic(sc::INVALID_FIELD).dnr());
        }
        // Log page offset (LPOL/LPOU), in bytes.
        let offset = (sqe.cdw(12) as u64 | (sqe.cdw(13) as u64) << 32) as usize;
        if lid == crate::wire::discovery::LOG_DISCOVERY && self.subsystem.discovery {
            let page = crate::wire::discovery::log_page(
                self.subsystem.discovery_genctr,
                &self.subsystem.discovery_log,
            );
            let mut data = vec![0u8; len];
            if offset < page.len() {
                let n = (page.len() - offset).min(len);
                data[..n].copy_from_slice(&page[offset..offset + n]);
            }
            return AdminOutcome {
                cqe: Some(Cqe::new(cid, Status::SUCCESS)),
                data,
            };
        }
        match lid {
            // Error information, SMART / health, firmware slot, changed
            // namespace list, commands supported: nothing to report.
            0x01..=0x05 => AdminOutcome {
                cqe: Some(Cqe::new(cid, Status::SUCCESS)),
                data: vec![0; len],
            },
            _ => reply(cid, Status::generic(sc::INVALID_FIELD).dnr()),
        }
    }

    /// Takes a held AER to answer with `dw0`, if the host left one.
    pub fn complete_aer(&mut self, dw0: u32) -> Option<Cqe> {
        let cid = self.pending_aers.pop()?;
        let mut c = Cqe::new(cid, Status::SUCCESS);
        c.set_dw0(dw0);
        Some(c)
    }

    /// The subsystem's namespaces are at `generation` now: if that is not
    /// what this controller has, takes the new list (`views`) and owes the
    /// host the notice. Returns whether it changed.
    pub fn namespaces_changed(
        &mut self,
        generation: u64,
        views: impl FnOnce() -> Vec<NamespaceView>,
    ) -> bool {
        if generation == self.subsystem.ns_generation {
            return false;
        }
        self.subsystem.namespaces = views();
        self.subsystem.ns_generation = generation;
        self.ns_notice_owed = true;
        true
    }

    /// The namespace attribute notice, if owed and the host left an AER.
    pub fn take_notice(&mut self) -> Option<Cqe> {
        if !self.ns_notice_owed {
            return None;
        }
        let c = self.complete_aer(AEN_NS_ATTRIBUTE_CHANGED)?;
        self.ns_notice_owed = false;
        Some(c)
    }

    /// One admin command (not fabrics).
    pub fn admin(&mut self, sqe: &Sqe) -> AdminOutcome {
        let cid = sqe.cid();
        if self.csts & csts::RDY == 0 && sqe.opcode() != 0x7F {
            return reply(cid, Status::generic(sc::COMMAND_SEQUENCE_ERROR));
        }
        match sqe.opcode() {
            0x02 => self.log_page(sqe),
            0x06 => self.identify(sqe),
            0x08 => {
                // Abort: we never find the command in time (DW0 bit 0 = 1).
                let mut c = Cqe::new(cid, Status::SUCCESS);
                c.set_dw0(1);
                AdminOutcome {
                    cqe: Some(c),
                    data: Vec::new(),
                }
            }
            0x09 => self.features(sqe, true),
            0x0A => self.features(sqe, false),
            0x0C => {
                if self.pending_aers.len() >= MAX_AERS {
                    return reply(cid, Status::command_specific(0x05));
                }
                self.pending_aers.push(cid);
                AdminOutcome {
                    cqe: None,
                    data: Vec::new(),
                }
            }
            0x18 => reply(cid, Status::SUCCESS),
            _ => reply(cid, Status::generic(sc::INVALID_OPCODE).dnr()),
        }
    }

    /// A fabrics command on the established admin queue.
    pub fn fabrics(&mut self, sqe: &Sqe) -> AdminOutcome {
        match sqe.fctype() {
            fctype::PROPERTY_GET => self.property(sqe, false),
            fctype::PROPERTY_SET => self.property(sqe, true),
            _ => reply(sqe.cid(), Status::generic(sc::INVALID_OPCODE).dnr()),
        }
    }
}
