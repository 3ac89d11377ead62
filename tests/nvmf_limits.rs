//! SPEC §8 through the real binary: what hosts can make the NVMe/TCP
//! target hold is bounded by named limits, and a host that abuses them
//! hurts only itself.
//!
//! - A host that pipelines far more commands than its queue holds (large
//!   in-capsule writes and reads) and one that keeps its queue full of
//!   large R2T writes, while another host does verified I/O over a
//!   file-backed namespace: the flooder's surplus waits in its socket
//!   (TCP backpressure) and every command of every host succeeds; the
//!   target's RSS stays under the bound the limits give.
//! - A host that sends reads and admin commands and never reads its
//!   sockets: the target stops reading them (the host's writes stall),
//!   memory stays bounded, the other host is served.
//! - Half-open connections (nothing sent; ICReq and no Connect) are closed
//!   after the connect timeout; connections beyond the limit are closed at
//!   once; a QID live on its controller or beyond the queues granted is
//!   refused; a log page larger than MDTS is refused.
//!
//! The flooding tests run `FERROPLANE_FLOOD_SECS` seconds each (10 by
//! default; the long variant is e.g. `FERROPLANE_FLOOD_SECS=40`).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, Backing, Target};
use nvmf::initiator::{HostError, HostPdu, HostQueue};
use nvmf::wire::nvme::{Cqe, SglDescriptor, Sqe, Status, FLAGS_PSDT_SGL};
use nvmf::wire::pdu::{encode_capsule_cmd, Digests, IcReq, CAPSULE_CMD_HLEN, IC_BYTES};
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:limits";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:7e9d0a52-8c4a-4b38-9d7e-2f1c0d6b5a11";
const BS: usize = 4096;
/// Both namespaces: 16 MiB files (the floods overwrite the same blocks).
const BLOCKS: u64 = 4096;
const CORES: usize = 2;

/// The transport the flooding tests run with: a small shared-buffer pool
/// (so the RSS bound is tight), 64 KiB in-capsule data (so large writes
/// can be pipelined without R2T), SPDK's other defaults.
const NUM_SHARED_BUFFERS: usize = 192;
const IO_UNIT_SIZE: usize = 128 * 1024;
const MAX_IO_SIZE: usize = 128 * 1024;
const ICD: usize = 64 * 1024;

fn flood_secs() -> u64 {
    std::env::var("FERROPLANE_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// A target on two cores with `args`, a subsystem of two uring-file
/// namespaces (1: "Good", 2: "Bad") and a listener.
fn export(args: &[&str], transport: Value) -> (Target, SocketAddr) {
    let mut all = vec!["--cpus", "0,1"];
    all.extend_from_slice(args);
    let t = Target::start_with(&all);
    Backing::UringFile.create(&t, "Good", BLOCKS, BS as u32);
    Backing::UringFile.create(&t, "Bad", BLOCKS, BS as u32);
    t.ok("nvmf_create_transport", transport);
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": NQN, "allow_any_host": true}),
    );
    for (nsid, b) in [(1, "Good"), (2, "Bad")] {
        t.ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": b, "nsid": nsid}}),
        );
    }
    let port = free_port();
    t.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "tcp", "adrfam": "IPv4",
               "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    (t, format!("127.0.0.1:{port}").parse().unwrap())
}

fn flood_transport() -> Value {
    json!({"trtype": "TCP", "num_shared_buffers": NUM_SHARED_BUFFERS,
           "io_unit_size": IO_UNIT_SIZE, "max_io_size": MAX_IO_SIZE,
           "in_capsule_data_size": ICD})
}

fn admin_queue(addr: SocketAddr) -> HostQueue {
    HostQueue::connect(addr, NQN, HOSTNQN, 0, 0, 31, Digests::default()).expect("admin Connect")
}

fn io_queue(addr: SocketAddr, cntlid: u16, qid: u16, sqsize: u16) -> Result<HostQueue, HostError> {
    HostQueue::connect(addr, NQN, HOSTNQN, qid, cntlid, sqsize, Digests::default())
}

fn rw(opcode: u8, cid: u16, nsid: u32, slba: u64, len: usize, in_capsule: bool) -> Sqe {
    let mut sqe = Sqe::default();
    sqe.set_opcode(opcode)
        .set_flags(FLAGS_PSDT_SGL)
        .set_cid(cid)
        .set_nsid(nsid)
        .set_rw(slba, (len / BS) as u32)
        .set_sgl(if in_capsule {
            SglDescriptor::in_capsule(0, len as u32)
        } else {
            SglDescriptor::transport(len as u32)
        });
    sqe
}

/// An admin command with a data buffer of `len` for the controller to fill.
fn admin_sqe(opcode: u8, cid: u16, cdw10: u32, cdw11: u32, len: u32) -> Sqe {
    let mut sqe = Sqe::default();
    sqe.set_opcode(opcode)
        .set_flags(FLAGS_PSDT_SGL)
        .set_cid(cid)
        .set_cdw(10, cdw10)
        .set_cdw(11, cdw11)
        .set_sgl(SglDescriptor::transport(len));
    sqe
}

/// Get Log Page `lid` of `len` bytes (a multiple of 4).
fn log_page(cid: u16, lid: u8, len: usize) -> Sqe {
    let numd = (len / 4 - 1) as u32;
    admin_sqe(
        0x02,
        cid,
        lid as u32 | (numd & 0xFFFF) << 16,
        numd >> 16,
        len as u32,
    )
}

/// Sends one command and waits for its response; returns its data.
fn command(q: &mut HostQueue, sqe: &Sqe, data: &[u8]) -> (Vec<u8>, Cqe) {
    q.send(sqe, data).unwrap();
    q.flush().unwrap();
    let mut got = Vec::new();
    loop {
        match q.recv().unwrap() {
            HostPdu::Data(_, _, _) => got.extend_from_slice(q.data()),
            HostPdu::Resp(c) => return (got, c),
            HostPdu::R2T(cid, ttag, off, len) => {
                let (off, len) = (off as usize, len as usize);
                q.send_h2c(cid, ttag, off as u32, &data[off..off + len])
                    .unwrap();
                q.flush().unwrap();
            }
        }
    }
}

fn block(lba: u64, round: u64) -> Vec<u8> {
    (0..BS as u64)
        .map(|j| (lba.wrapping_mul(131) ^ j.wrapping_mul(7) ^ round.wrapping_mul(29)) as u8)
        .collect()
}

/// Runs `cmds` (sqe, data) with all in flight at once; returns each
/// command's status and read data by cid.
fn batch(io: &mut HostQueue, cmds: &[(Sqe, Vec<u8>)]) -> HashMap<u16, (Status, Vec<u8>)> {
    let by_cid: HashMap<u16, &Vec<u8>> = cmds.iter().map(|(s, d)| (s.cid(), d)).collect();
    for (sqe, data) in cmds {
        let in_capsule = sqe.sgl().is_in_capsule();
        io.send(sqe, if in_capsule { data } else { &[] }).unwrap();
    }
    io.flush().unwrap();
    let mut out = HashMap::new();
    let mut reads: HashMap<u16, Vec<u8>> = HashMap::new();
    while out.len() < cmds.len() {
        match io.recv().unwrap() {
            HostPdu::Resp(c) => {
                let d = reads.remove(&c.cid()).unwrap_or_default();
                assert!(out.insert(c.cid(), (c.status(), d)).is_none());
            }
            HostPdu::Data(cid, _, _) => reads.entry(cid).or_default().extend_from_slice(io.data()),
            HostPdu::R2T(cid, ttag, off, len) => {
                let data = by_cid[&cid];
                let (off, len) = (off as usize, len as usize);
                io.send_h2c(cid, ttag, off as u32, &data[off..off + len])
                    .unwrap();
                io.flush().unwrap();
            }
        }
    }
    out
}

/// The well-behaved host: rounds of a Keep Alive, writes (in-capsule 4 KiB
/// and 32 KiB by R2T) to namespace 1, then reads of the same blocks,
/// compared.
struct GoodHost {
    admin: HostQueue,
    io: HostQueue,
    round: u64,
}

impl GoodHost {
    fn connect(addr: SocketAddr) -> GoodHost {
        let admin = admin_queue(addr);
        let io = io_queue(addr, admin.cntlid, 1, 15).expect("I/O Connect");
        GoodHost {
            admin,
            io,
            round: 0,
        }
    }

    /// One round; panics on any error or wrong data.
    fn round(&mut self) -> Duration {
        let start = Instant::now();
        let r = self.round;
        self.round += 1;
        // As a host does: its 30 s keep-alive timeout never runs out.
        let (_, c) = command(&mut self.admin, &admin_sqe(0x18, 99, 0, 0, 0), &[]);
        assert!(
            c.status().is_success(),
            "good host: Keep Alive: {:?}",
            c.status()
        );
        let base = (r * 40) % (BLOCKS - 40);
        let mut cmds = Vec::new();
        let mut expect: HashMap<u64, Vec<u8>> = HashMap::new();
        for i in 0..4u64 {
            let lba = base + i;
            let d = block(lba, r);
            expect.insert(lba, d.clone());
            cmds.push((rw(0x01, i as u16, 1, lba, BS, true), d));
        }
        for i in 0..4u64 {
            let lba = base + 8 + i * 8;
            let d: Vec<u8> = (0..8).flat_map(|k| block(lba + k, r)).collect();
            for k in 0..8 {
                expect.insert(lba + k, block(lba + k, r));
            }
            cmds.push((rw(0x01, 10 + i as u16, 1, lba, 8 * BS, false), d));
        }
        for (cid, (st, _)) in batch(&mut self.io, &cmds) {
            assert!(st.is_success(), "good host: round {r} write {cid}: {st:?}");
        }
        let mut cmds = Vec::new();
        for i in 0..4u64 {
            cmds.push((rw(0x02, 20 + i as u16, 1, base + i, BS, false), Vec::new()));
        }
        for i in 0..4u64 {
            let lba = base + 8 + i * 8;
            cmds.push((rw(0x02, 30 + i as u16, 1, lba, 8 * BS, false), Vec::new()));
        }
        for (cid, (st, data)) in batch(&mut self.io, &cmds) {
            assert!(st.is_success(), "good host: round {r} read {cid}: {st:?}");
            let (lba, n) = if cid < 30 {
                (base + (cid - 20) as u64, 1)
            } else {
                (base + 8 + (cid - 30) as u64 * 8, 8)
            };
            let want: Vec<u8> = (0..n).flat_map(|k| expect[&(lba + k)].clone()).collect();
            assert!(data == want, "good host: round {r} read at {lba} differs");
        }
        start.elapsed()
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Samples the target's RSS every 20 ms until stopped; returns the peak.
fn rss_sampler(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

/// The most a target may grow by over its RSS with the good host
/// connected and warmed up, from the limits (`num_shared_buffers` ×
/// `io_unit_size` the transport's buffers, `icd` its in-capsule data
/// size, max_io_size 128 KiB):
///
/// ```text
/// cores × (budget + POOL_FREE_BYTES_PER_CORE)
///   budget = max(num_shared_buffers × io_unit_size / cores, 2 × max_io_size)
/// + connections × (MAX_RECV_BLOCKS × receive block
///                  + 2 × MAX_SEND_QUEUE_BYTES + max_io_size
///                  + queue entries × (icd + 1 KiB))
///   receive block = the pool class of max(RX_BUF_BYTES, icd + 8 KiB)
/// + 32 MiB for the allocator, stacks and logs
/// ```
fn rss_growth_bound(
    shared_bytes: usize,
    icd: usize,
    connections: usize,
    queue_entries: usize,
) -> u64 {
    use nvmf::target::limits;
    let budget = (shared_bytes / CORES).max(2 * MAX_IO_SIZE);
    let per_core = budget + bdev::buf::POOL_FREE_BYTES_PER_CORE;
    let rx_block = bdev::buf::capacity_for(limits::RX_BUF_BYTES.max(icd + 8192));
    let per_conn = limits::MAX_RECV_BLOCKS * rx_block
        + 2 * limits::MAX_SEND_QUEUE_BYTES
        + MAX_IO_SIZE
        + queue_entries * (icd + 1024);
    (CORES * per_core + connections * per_conn + (32 << 20)) as u64
}

fn flood_bound(connections: usize, queue_entries: usize) -> u64 {
    rss_growth_bound(
        NUM_SHARED_BUFFERS * IO_UNIT_SIZE,
        ICD,
        connections,
        queue_entries,
    )
}

/// Connects an admin queue (no keep-alive timeout: the host sends none)
/// and an I/O queue of `sqsize` and hands back their sockets, for a host
/// that drives them itself.
fn raw_queues(addr: SocketAddr, sqsize: u16) -> (TcpStream, TcpStream) {
    let admin = HostQueue::connect_kato(addr, NQN, HOSTNQN, 0, 0, 31, Digests::default(), 0)
        .expect("admin Connect");
    let io = io_queue(addr, admin.cntlid, 1, sqsize).expect("I/O Connect");
    (
        admin.into_stream().expect("admin socket"),
        io.into_stream().expect("I/O socket"),
    )
}

fn capsule(sqe: &Sqe, data: &[u8]) -> Vec<u8> {
    let mut hdr = [0u8; CAPSULE_CMD_HLEN + 4];
    let n = encode_capsule_cmd(&mut hdr, sqe, data.len(), Digests::default());
    let mut v = hdr[..n].to_vec();
    v.extend_from_slice(data);
    v
}

/// Reads one PDU (no digests): its type and the whole of it.
fn read_pdu(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut ch = [0u8; 8];
    s.read_exact(&mut ch)?;
    let plen = u32::from_le_bytes(ch[4..8].try_into().unwrap()) as usize;
    let mut pdu = vec![0u8; plen];
    pdu[..8].copy_from_slice(&ch);
    s.read_exact(&mut pdu[8..])?;
    Ok((ch[0], pdu))
}

/// What a flooding host saw.
#[derive(Default)]
struct FloodStats {
    completed: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl FloodStats {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().unwrap().get_or_insert(why);
    }
}

/// A host with an I/O queue of 32 entries that keeps `window` commands
/// outstanding (far more than 32): 64 KiB in-capsule writes, 128 KiB and
/// 4 KiB reads, to namespace 2. One thread writes, one reads responses.
fn pipelining_flooder(
    addr: SocketAddr,
    window: usize,
    stop: Arc<AtomicBool>,
    stats: Arc<FloodStats>,
) -> Vec<std::thread::JoinHandle<()>> {
    let (admin, io) = raw_queues(addr, 31);
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut reader = io.try_clone().unwrap();
    // Every command answered in time, however long it waited.
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let (o, st, s2) = (outstanding.clone(), stats.clone(), stop.clone());
    let rx = std::thread::spawn(move || {
        let _admin = admin;
        loop {
            // Done once stopped and every command sent has its answer.
            if s2.load(Ordering::Acquire) && o.load(Ordering::Acquire) == 0 {
                return;
            }
            let (ty, pdu) = match read_pdu(&mut reader) {
                Ok(p) => p,
                Err(e) => {
                    st.fail(format!(
                        "flooder socket, {} commands outstanding: {e}",
                        o.load(Ordering::Acquire)
                    ));
                    return;
                }
            };
            match ty {
                0x07 => {}
                0x05 => {
                    let c = Cqe::from_bytes(&pdu[8..24]).unwrap();
                    if c.status().is_success() {
                        st.completed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        st.fail(format!("flooder cid {}: {:?}", c.cid(), c.status()));
                    }
                    o.fetch_sub(1, Ordering::AcqRel);
                }
                t => st.fail(format!("flooder: unexpected PDU {t:#x}")),
            }
        }
    });
    let tx = std::thread::spawn(move || {
        let mut w = std::io::BufWriter::with_capacity(256 << 10, io);
        let write_data = vec![0x5Au8; ICD];
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            if outstanding.load(Ordering::Acquire) >= window {
                if w.flush().is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let cid = (n % 60000) as u16;
            let lba = (n * 16) % (BLOCKS - 32);
            let bytes = match n % 3 {
                0 => capsule(&rw(0x01, cid, 2, lba, ICD, true), &write_data),
                1 => capsule(&rw(0x02, cid, 2, lba, 128 << 10, false), &[]),
                _ => capsule(&rw(0x02, cid, 2, lba, BS, false), &[]),
            };
            outstanding.fetch_add(1, Ordering::AcqRel);
            if w.write_all(&bytes).is_err() {
                return;
            }
            n += 1;
        }
        let _ = w.flush();
    });
    vec![rx, tx]
}

/// A host that keeps its 32-entry queue full of 128 KiB writes by R2T
/// (each waits for a data buffer, then for the host's data) to namespace 2.
fn r2t_flooder(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<FloodStats>,
) -> std::thread::JoinHandle<()> {
    let admin = HostQueue::connect_kato(addr, NQN, HOSTNQN, 0, 0, 31, Digests::default(), 0)
        .expect("admin Connect");
    let mut io = io_queue(addr, admin.cntlid, 1, 31).expect("I/O Connect");
    std::thread::spawn(move || {
        let _admin = admin;
        let data = vec![0xC3u8; 128 << 10];
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let cmds: Vec<(Sqe, Vec<u8>)> = (0..32u16)
                .map(|i| {
                    let lba = ((round * 32 + i as u64) * 32) % (BLOCKS - 32);
                    (rw(0x01, i, 2, lba, 128 << 10, false), data.clone())
                })
                .collect();
            for (cid, (st, _)) in batch(&mut io, &cmds) {
                if st.is_success() {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.fail(format!("R2T flooder cid {cid}: {st:?}"));
                }
            }
            round += 1;
        }
    })
}

/// Runs the good host until `stop`; returns its slowest round and rounds.
fn good_host_until(host: &mut GoodHost, until: Instant) -> (Duration, u64) {
    let mut slowest = Duration::ZERO;
    let mut rounds = 0;
    while Instant::now() < until {
        slowest = slowest.max(host.round());
        rounds += 1;
    }
    (slowest, rounds)
}

/// A good host round may wait behind the floods on a busy machine, but
/// never for long.
const ROUND_LATENCY_BOUND: Duration = Duration::from_secs(5);

#[test]
fn a_flooding_host_is_pushed_back_and_bounded_while_another_is_served() {
    let (t, addr) = export(&[], flood_transport());
    let mut good = GoodHost::connect(addr);
    for _ in 0..3 {
        good.round();
    }
    let baseline = rss_bytes(t.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(t.pid(), stop.clone());
    let stats = Arc::new(FloodStats::default());
    let flood_stop = Arc::new(AtomicBool::new(false));
    let mut threads = pipelining_flooder(addr, 256, flood_stop.clone(), stats.clone());
    threads.push(r2t_flooder(addr, flood_stop.clone(), stats.clone()));
    let secs = flood_secs();
    let (slowest, rounds) = good_host_until(&mut good, Instant::now() + Duration::from_secs(secs));
    flood_stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    // good host 2 + pipelining flooder 2 + R2T flooder 2 connections.
    let bound = flood_bound(6, 32);
    eprintln!(
        "flood {secs} s: flooders completed {} commands; good host {rounds} rounds, slowest {slowest:?}; \
         RSS baseline {} MiB, peak {} MiB, bound +{} MiB",
        stats.completed.load(Ordering::Relaxed),
        baseline >> 20,
        peak >> 20,
        bound >> 20
    );
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "a flooding host's commands wait, they do not fail: {:?}",
        stats.first_failure.lock().unwrap()
    );
    assert!(
        stats.completed.load(Ordering::Relaxed) > 1000,
        "the flooders made progress"
    );
    assert!(
        rounds > 0 && slowest < ROUND_LATENCY_BOUND,
        "good host: slowest round {slowest:?}"
    );
    assert!(
        peak <= baseline + bound,
        "RSS {} MiB over the bound ({} + {} MiB)",
        peak >> 20,
        baseline >> 20,
        bound >> 20
    );
    // Everyone still served afterwards.
    good.round();
}

#[test]
fn a_host_that_never_reads_is_stopped_and_bounded_while_another_is_served() {
    let (t, addr) = export(&[], flood_transport());
    let mut good = GoodHost::connect(addr);
    for _ in 0..3 {
        good.round();
    }
    let baseline = rss_bytes(t.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(t.pid(), stop.clone());
    // Reads of 128 KiB on its I/O queue and log pages (128 KiB, and 1 MiB
    // ones the target refuses) on its admin queue, sent as fast as the
    // sockets take them; its responses are never read.
    let (admin, io) = raw_queues(addr, 31);
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for (mut s, admin) in [(admin, true), (io, false)] {
        let written = written.clone();
        writers.push(std::thread::spawn(move || {
            let mut n: u64 = 0;
            loop {
                let cid = (n % 60000) as u16;
                let mut burst = Vec::new();
                for k in 0..64u64 {
                    let sqe = if admin {
                        log_page(
                            cid.wrapping_add(k as u16),
                            0x02,
                            if k % 2 == 0 { 128 << 10 } else { 1 << 20 },
                        )
                    } else {
                        rw(
                            0x02,
                            cid.wrapping_add(k as u16),
                            2,
                            ((n + k) * 32) % (BLOCKS - 32),
                            128 << 10,
                            false,
                        )
                    };
                    burst.extend_from_slice(&capsule(&sqe, &[]));
                }
                if s.write_all(&burst).is_err() {
                    return;
                }
                written.fetch_add(burst.len() as u64, Ordering::Relaxed);
                n += 64;
            }
        }));
    }
    let secs = flood_secs();
    let (slowest, rounds) = good_host_until(&mut good, Instant::now() + Duration::from_secs(secs));
    let sent_by_then = written.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    let sent_after = written.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    // good host 2 + the reader that never reads 2 connections.
    let bound = flood_bound(4, 32);
    eprintln!(
        "never-reader {secs} s: it wrote {} KiB; good host {rounds} rounds, slowest {slowest:?}; \
         RSS baseline {} MiB, peak {} MiB, bound +{} MiB",
        sent_after >> 10,
        baseline >> 20,
        peak >> 20,
        bound >> 20
    );
    assert!(
        rounds > 0 && slowest < ROUND_LATENCY_BOUND,
        "good host: slowest round {slowest:?}"
    );
    assert!(
        peak <= baseline + bound,
        "RSS {} MiB over the bound ({} + {} MiB)",
        peak >> 20,
        baseline >> 20,
        bound >> 20
    );
    // The target stopped reading: the host's writes stalled once the
    // kernel's socket buffers were full (a few MiB), and stay stalled.
    assert!(
        sent_after < 64 << 20,
        "the target kept reading: {} MiB taken from a host that never reads",
        sent_after >> 20
    );
    assert_eq!(
        sent_after, sent_by_then,
        "still taking input from a host that never reads"
    );
    good.round();
    // Killing the target ends the blocked writers.
    drop(t);
    for w in writers {
        w.join().unwrap();
    }
}

/// Whether the target closed `s` within `within` (EOF or reset, rather
/// than a read timeout).
fn closed_by_target(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn icreq() -> [u8; IC_BYTES] {
    let mut ic = [0u8; IC_BYTES];
    IcReq {
        pfv: 0,
        hpda: 0,
        digests: Digests::default(),
        maxr2t: 0,
    }
    .encode(&mut ic);
    ic
}

/// Sends an ICReq and reads the ICResp.
fn icreq_only(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&icreq()).unwrap();
    let mut resp = [0u8; IC_BYTES];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut resp).expect("ICResp");
    assert_eq!(resp[0], 0x01, "ICResp");
    s
}

#[test]
fn half_open_connections_are_reaped_after_the_connect_timeout() {
    let (_t, addr) = export(
        &["--nvmf-connect-timeout-ms", "1500"],
        json!({"trtype": "TCP"}),
    );
    // A host connected before, and one connecting while they wait.
    let mut before = GoodHost::connect(addr);
    let started = Instant::now();
    let mut silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut no_connect: Vec<TcpStream> = (0..20).map(|_| icreq_only(addr)).collect();
    // Half an ICReq is not an ICReq.
    let mut partial = TcpStream::connect(addr).unwrap();
    partial.write_all(&icreq()[..64]).unwrap();
    let mut during = GoodHost::connect(addr);
    during.round();
    // Nothing is closed before its time.
    let early = Duration::from_millis(1200).saturating_sub(started.elapsed());
    if !early.is_zero() {
        assert!(!closed_by_target(&mut silent[0], early), "closed early");
    }
    for (what, list) in [("no ICReq", &mut silent), ("no Connect", &mut no_connect)] {
        for (i, s) in list.iter_mut().enumerate() {
            assert!(
                closed_by_target(s, Duration::from_secs(5)),
                "{what} #{i}: still open {:?} after it was opened",
                started.elapsed()
            );
        }
    }
    assert!(
        closed_by_target(&mut partial, Duration::from_secs(5)),
        "half an ICReq"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "reaped before the timeout"
    );
    // Connected queues have no such deadline; new hosts still connect.
    std::thread::sleep(Duration::from_millis(500));
    before.round();
    during.round();
    GoodHost::connect(addr).round();
}

#[test]
fn connections_beyond_the_limit_are_closed_and_the_others_keep_working() {
    let (_t, addr) = export(
        &[
            "--nvmf-max-connections",
            "8",
            "--nvmf-connect-timeout-ms",
            "60000",
        ],
        json!({"trtype": "TCP"}),
    );
    // 8 live: a host's two queues and six that only sent their ICReq.
    let mut host = GoodHost::connect(addr);
    let mut idle: Vec<TcpStream> = (0..6).map(|_| icreq_only(addr)).collect();
    for _ in 0..3 {
        let mut extra = TcpStream::connect(addr).unwrap();
        let _ = extra.write_all(&icreq());
        assert!(
            closed_by_target(&mut extra, Duration::from_secs(5)),
            "a ninth connection was kept"
        );
    }
    host.round();
    for s in &mut idle {
        assert!(
            !closed_by_target(s, Duration::from_millis(50)),
            "a kept one was closed"
        );
    }
    // One gone: room for one more (once its core has let it go).
    drop(idle.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&icreq()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut resp = [0u8; IC_BYTES];
        if s.read_exact(&mut resp).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    host.round();
}

/// Set Features Number of Queues asking for `n` I/O queues; the CQE.
fn set_queues(admin: &mut HostQueue, n: u32) -> Cqe {
    let sqe = admin_sqe(0x09, 77, 0x07, (n - 1) | (n - 1) << 16, 0);
    command(admin, &sqe, &[]).1
}

fn refused(r: Result<HostQueue, HostError>) -> Cqe {
    match r {
        Err(HostError::Status(c)) => c,
        Err(e) => panic!("Connect failed otherwise: {e}"),
        Ok(_) => panic!("Connect accepted"),
    }
}

#[test]
fn a_live_qid_and_qids_beyond_the_grant_are_refused() {
    let (_t, addr) = export(&[], json!({"trtype": "TCP", "max_io_qpairs_per_ctrlr": 4}));
    let invalid_qid = Status::command_specific(0x01);
    let mut admin = admin_queue(addr);
    let c = set_queues(&mut admin, 2);
    assert!(c.status().is_success());
    assert_eq!(c.dw0(), 1 | 1 << 16, "2 granted");
    let mut q1 = io_queue(addr, admin.cntlid, 1, 15).expect("QID 1");
    // The same QID again, while the first is live: refused as SPDK does
    // (Invalid Queue Identifier, no IPO).
    let c = refused(io_queue(addr, admin.cntlid, 1, 15));
    assert_eq!((c.status(), c.dw0()), (invalid_qid, 0), "duplicate QID");
    // Beyond the two granted.
    let c = refused(io_queue(addr, admin.cntlid, 3, 15));
    assert_eq!(
        (c.status(), c.dw0()),
        (invalid_qid, 0),
        "QID beyond the grant"
    );
    let _q2 = io_queue(addr, admin.cntlid, 2, 15).expect("QID 2");
    // QID 1 works, and once it is closed it can be connected again.
    let (_, c) = command(&mut q1, &rw(0x02, 5, 1, 0, BS, false), &[]);
    assert!(c.status().is_success());
    drop(q1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let _again = loop {
        match io_queue(addr, admin.cntlid, 1, 15) {
            Ok(q) => break q,
            Err(HostError::Status(c)) if c.status() == invalid_qid => {
                assert!(
                    Instant::now() < deadline,
                    "QID 1 still live after its close"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reconnecting QID 1: {e}"),
        }
    };
    // Without Set Features: the transport's maximum.
    let other = admin_queue(addr);
    let c = refused(io_queue(addr, other.cntlid, 5, 15));
    assert_eq!(
        (c.status(), c.dw0()),
        (invalid_qid, 0),
        "QID beyond max_io_qpairs_per_ctrlr"
    );
    let _q4 = io_queue(addr, other.cntlid, 4, 15).expect("QID 4 of 4");
}

#[test]
fn a_log_page_larger_than_mdts_is_refused() {
    let (_t, addr) = export(&[], json!({"trtype": "TCP"}));
    let mut admin = admin_queue(addr);
    // MDTS is max_io_size (128 KiB = 2^5 pages).
    let (id, c) = command(&mut admin, &admin_sqe(0x06, 1, 1, 0, 4096), &[]);
    assert!(c.status().is_success());
    assert_eq!(id[77], 5, "MDTS");
    for (len, ok) in [
        (4096, true),
        (128 << 10, true),
        ((128 << 10) + 4, false),
        (1 << 20, false),
    ] {
        let (data, c) = command(&mut admin, &log_page(2, 0x02, len), &[]);
        if ok {
            assert!(c.status().is_success(), "{len}: {:?}", c.status());
            assert_eq!(data.len(), len);
        } else {
            assert_eq!(
                c.status(),
                Status::generic(0x02).dnr(),
                "{len} bytes: Invalid Field in Command"
            );
            assert!(data.is_empty(), "{len} bytes: no data");
        }
    }
}

fn pending_data_buffer(t: &Target) -> u64 {
    t.ok("nvmf_get_stats", Value::Null)["poll_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["transports"][0]["pending_data_buffer"].as_u64().unwrap())
        .sum()
}

#[test]
fn data_buffers_are_the_cores_budget_and_waiting_commands_resume_when_it_returns() {
    // Two 128 KiB buffers per core: the least the budget can be.
    let (shared, icd) = (2 * 128 * 1024, 4096);
    let (t, addr) = export(
        &[],
        json!({"trtype": "TCP", "num_shared_buffers": 2, "io_unit_size": 131072}),
    );
    let mut good = GoodHost::connect(addr);
    good.round();
    let baseline = rss_bytes(t.pid());
    // 12 hosts each keep 128 reads of 128 KiB outstanding and read none
    // of the data (their receive buffers kept small, so the kernel holds
    // little of it): with a buffer per slot that would be 192 MiB.
    let mut holders = Vec::new();
    for _ in 0..12 {
        let (admin, mut io) = raw_queues(addr, 127);
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt on our own socket with a valid int.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&io),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &small as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let mut burst = Vec::new();
        for cid in 0..128u16 {
            let lba = (cid as u64 * 32) % (BLOCKS - 32);
            burst.extend_from_slice(&capsule(&rw(0x02, cid, 2, lba, 128 << 10, false), &[]));
        }
        io.write_all(&burst).unwrap();
        holders.push((admin, io));
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_bytes(t.pid());
    let bound = rss_growth_bound(shared, icd, 26, 128);
    eprintln!(
        "budget: RSS baseline {} MiB, with the holders {} MiB, bound +{} MiB",
        baseline >> 20,
        rss >> 20,
        bound >> 20
    );
    assert!(
        rss <= baseline + bound,
        "RSS {} MiB over the bound ({} + {} MiB)",
        rss >> 20,
        baseline >> 20,
        bound >> 20
    );
    // The good host's queue shares its core with the holders: its
    // commands wait for buffers, and go on once the holders are gone.
    let waited = pending_data_buffer(&t);
    let h = std::thread::spawn(move || {
        let took = good.round();
        (good, took)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending_data_buffer(&t) == waited {
        assert!(
            Instant::now() < deadline,
            "the good host never waited for a buffer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(holders);
    let (mut good, took) = h.join().unwrap();
    eprintln!("budget: the good host's round took {took:?} (waiting for the holders)");
    good.round();
}
