//! SPEC §7 through the real binary, with connected hosts doing I/O with
//! several commands in flight: removing a namespace, hot-removing its bdev,
//! deleting the subsystem, removing a host and turning allow_any_host off
//! each take effect before the RPC returns. I/O in flight then completes
//! first (the RPC waits for it: a delay bdev holds the reads), new I/O gets
//! Invalid Namespace or the host's queues are closed, the namespace
//! attribute notice reaches the admin queue, and the bdev's channels are
//! released so it can be deleted. Each case runs over a malloc bdev and
//! over a uring bdev on a file (with R2T writes: small in-capsule writes to
//! O_DIRECT files are a separate, known bug).
//!
//! Also SPEC §5: an empty host NQN (SPDK v26.x's initiator without one
//! configured) connects where any host is allowed and is refused, with
//! Connect Invalid Host, where a host list applies.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{free_port, pattern, Client, Target};
use nvmf::initiator::connect_command;
use nvmf::wire::fabrics::{fctype, reg, PropertyCmd, CNTLID_DYNAMIC, NQN_MAX_BYTES};
use nvmf::wire::nvme::{Cqe, SglDescriptor, Sqe, FLAGS_PSDT_SGL, OPC_FABRICS};
use nvmf::wire::pdu::{
    check, encode_capsule_cmd, CommonHeader, DataHeader, Digests, IcReq, PduType, CH_BYTES,
    IC_BYTES,
};
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const HOST1: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2fa1-11d2-883f-0016d3cca427";
const HOST2: &str = "nqn.2014-08.org.nvmexpress:uuid:22222222-2fa1-11d2-883f-0016d3cca427";
const BLOCK: usize = 4096;
/// Blocks per command: 8 KiB, above the 4 KiB in-capsule size, so writes
/// go by R2T.
const NLB: usize = 2;
/// How long the delay bdev holds a read once slowed down.
const SLOW: Duration = Duration::from_millis(1000);
/// How long a slowed read has been in flight when the RPC starts.
const HEAD_START: Duration = Duration::from_millis(200);
const INVALID_NAMESPACE: (u8, u8) = (0, 0x0B);
const AEN_NS_ATTRIBUTE_CHANGED: u32 = 0x0004_0002;

#[derive(Clone, Copy, Debug)]
enum Backing {
    Malloc,
    File,
}

/// A target with subsystem `NQN` listening on a port: namespace 1 is
/// delay bdev `D0` over base `B0` (malloc or a file), namespace 2 malloc
/// `M1`.
fn setup(backing: Backing, allow_any_host: bool) -> (Target, u16) {
    let t = Target::start();
    let port = free_port();
    t.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": NQN, "allow_any_host": allow_any_host}),
    );
    t.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "tcp", "adrfam": "IPv4",
               "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    match backing {
        Backing::Malloc => {
            t.ok(
                "bdev_malloc_create",
                json!({"name": "B0", "num_blocks": 1024, "block_size": BLOCK}),
            );
        }
        Backing::File => {
            let f = t.dir.join("b0.img");
            std::fs::File::create(&f)
                .unwrap()
                .set_len(1024 * BLOCK as u64)
                .unwrap();
            t.ok(
                "bdev_uring_create",
                json!({"name": "B0", "filename": f, "block_size": BLOCK}),
            );
        }
    }
    t.ok(
        "bdev_delay_create",
        json!({"name": "D0", "base_bdev_name": "B0", "avg_read_latency": 0,
               "p99_read_latency": 0, "avg_write_latency": 0, "p99_write_latency": 0}),
    );
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M1", "num_blocks": 256, "block_size": BLOCK}),
    );
    for (nsid, b) in [(1, "D0"), (2, "M1")] {
        t.ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": b, "nsid": nsid}}),
        );
    }
    (t, port)
}

fn delete_base(t: &Target, backing: Backing) {
    let method = match backing {
        Backing::Malloc => "bdev_malloc_delete",
        Backing::File => "bdev_uring_delete",
    };
    t.ok(method, json!({"name": "B0"}));
}

/// Reads of D0 take `SLOW` from now on.
fn slow_reads(t: &Target) {
    for kind in ["avg_read", "p99_read"] {
        t.ok(
            "bdev_delay_update_latency",
            json!({"delay_bdev_name": "D0", "latency_type": kind,
                   "latency_us": SLOW.as_micros() as u64}),
        );
    }
}

/// `bdev`'s live channels, on any core.
fn channels(t: &Target, bdev: &str) -> usize {
    t.ok(
        "bdev_get_iostat",
        json!({"name": bdev, "per_channel": true}),
    )["channels"]
        .as_array()
        .unwrap()
        .len()
}

/// Runs `method` on its own RPC connection in another thread; the result
/// and how long it took.
fn call_in_background(
    socket: PathBuf,
    method: &'static str,
    params: Value,
) -> std::thread::JoinHandle<(Result<Value, Value>, Duration)> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let r = Client::connect(&socket).call(method, params);
        (r, start.elapsed())
    })
}

fn status(c: &Cqe) -> (u8, u8) {
    let s = c.status();
    (s.sct, s.sc)
}

enum Pdu {
    Resp(Cqe),
    Data(u16, Vec<u8>),
    R2T(u16, u16, u32),
}

/// A host queue pair over a plain socket (timeouts, so a target that
/// fails to close a connection fails the test instead of hanging it).
/// Commands may be sent back to back; R2Ts are answered from the data
/// given at submission.
struct Host {
    s: TcpStream,
    cntlid: u16,
    r2t_data: HashMap<u16, Vec<u8>>,
    read_data: HashMap<u16, Vec<u8>>,
}

impl Host {
    fn tcp(port: u16) -> Host {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut h = Host {
            s,
            cntlid: 0,
            r2t_data: HashMap::new(),
            read_data: HashMap::new(),
        };
        let mut ic = [0u8; IC_BYTES];
        IcReq {
            pfv: 0,
            hpda: 0,
            digests: Digests::default(),
            maxr2t: 0,
        }
        .encode(&mut ic);
        h.s.write_all(&ic).unwrap();
        h.s.read_exact(&mut ic).unwrap();
        assert_eq!(ic[0], PduType::IcResp as u8);
        h
    }

    /// Sends a Connect for queue `qid`; its completion.
    fn try_connect(port: u16, hostnqn: &str, qid: u16, cntlid: u16) -> (Host, Cqe) {
        Host::try_connect_raw(port, qid, cntlid, |d| {
            d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes())
        })
    }

    /// Like [`Host::try_connect`] with the host NQN field written by `nqn`.
    fn try_connect_raw(
        port: u16,
        qid: u16,
        cntlid: u16,
        nqn: impl FnOnce(&mut [u8]),
    ) -> (Host, Cqe) {
        let mut h = Host::tcp(port);
        let sqsize = if qid == 0 { 31 } else { 127 };
        let (sqe, mut data) = connect_command(qid, sqsize, 0, cntlid, NQN, "");
        nqn(&mut data[..]);
        h.send(&sqe, &data);
        let c = h.expect_resp();
        (h, c)
    }

    /// An enabled admin queue (a new controller) for `hostnqn`.
    fn admin(port: u16, hostnqn: &str) -> Host {
        let (mut h, c) = Host::try_connect(port, hostnqn, 0, CNTLID_DYNAMIC);
        assert_eq!(status(&c), (0, 0), "admin connect: {c:?}");
        h.cntlid = c.dw0() as u16;
        let mut set = Sqe::default();
        set.set_opcode(OPC_FABRICS)
            .set_flags(FLAGS_PSDT_SGL)
            .set_fctype(fctype::PROPERTY_SET)
            .set_cid(1);
        PropertyCmd {
            size: 4,
            offset: reg::CC,
            value: (6 << 16) | (4 << 20) | 1,
        }
        .write(&mut set);
        h.send(&set, &[]);
        assert_eq!(status(&h.expect_resp()), (0, 0));
        h
    }

    /// An I/O queue of `admin`'s controller.
    fn io(port: u16, hostnqn: &str, admin: &Host) -> Host {
        let (mut h, c) = Host::try_connect(port, hostnqn, 1, admin.cntlid);
        assert_eq!(status(&c), (0, 0), "I/O connect: {c:?}");
        h.cntlid = admin.cntlid;
        h
    }

    fn send(&mut self, sqe: &Sqe, data: &[u8]) {
        let mut hdr = [0u8; 76];
        let n = encode_capsule_cmd(&mut hdr, sqe, data.len(), Digests::default());
        let mut pdu = hdr[..n].to_vec();
        pdu.extend_from_slice(data);
        self.s.write_all(&pdu).unwrap();
    }

    fn recv(&mut self) -> std::io::Result<Pdu> {
        let mut ch = [0u8; CH_BYTES];
        self.s.read_exact(&mut ch)?;
        let h = CommonHeader::parse(&ch).unwrap();
        let l = check(&h, false, Digests::default()).unwrap();
        let mut pdu = ch.to_vec();
        pdu.resize(l.plen, 0);
        self.s.read_exact(&mut pdu[CH_BYTES..])?;
        Ok(match l.pdu_type {
            PduType::CapsuleResp => Pdu::Resp(Cqe::from_bytes(&pdu[CH_BYTES..]).unwrap()),
            PduType::C2HData => {
                let d = DataHeader::parse(&pdu).unwrap();
                Pdu::Data(
                    d.cccid,
                    pdu[l.data_offset..l.data_offset + l.data_len].to_vec(),
                )
            }
            PduType::R2T => {
                let d = DataHeader::parse(&pdu).unwrap();
                assert_eq!(d.offset, 0);
                Pdu::R2T(d.cccid, d.ttag, d.length)
            }
            t => panic!("unexpected {t:?}"),
        })
    }

    fn expect_resp(&mut self) -> Cqe {
        match self.recv().unwrap() {
            Pdu::Resp(c) => c,
            _ => panic!("expected a CapsuleResp"),
        }
    }

    /// Sends a command without waiting; `data` goes in the capsule (SGL
    /// in-capsule) or answers its R2T.
    fn submit(&mut self, sqe: &Sqe, data: &[u8]) {
        if sqe.sgl().is_transport() && !data.is_empty() {
            self.r2t_data.insert(sqe.cid(), data.to_vec());
            self.send(sqe, &[]);
        } else {
            self.send(sqe, data);
        }
    }

    /// Waits for `n` completions (answering R2Ts meanwhile): by CID, the
    /// CQE and the data read.
    fn wait(&mut self, n: usize) -> HashMap<u16, (Cqe, Vec<u8>)> {
        let mut out = HashMap::new();
        while out.len() < n {
            match self.recv().expect("waiting for completions") {
                Pdu::Resp(c) => {
                    let data = self.read_data.remove(&c.cid()).unwrap_or_default();
                    assert!(out.insert(c.cid(), (c, data)).is_none());
                }
                Pdu::Data(cid, d) => self.read_data.entry(cid).or_default().extend(d),
                Pdu::R2T(cid, ttag, len) => {
                    let data = self.r2t_data.remove(&cid).expect("R2T for a write");
                    assert_eq!(len as usize, data.len());
                    let h = DataHeader {
                        cccid: cid,
                        ttag,
                        offset: 0,
                        length: len,
                    };
                    let mut hdr = [0u8; 28];
                    let n = h.encode(
                        &mut hdr,
                        PduType::H2CData,
                        nvmf::wire::pdu::flags::LAST_PDU,
                        Digests::default(),
                    );
                    let mut pdu = hdr[..n].to_vec();
                    pdu.extend_from_slice(&data);
                    self.s.write_all(&pdu).unwrap();
                }
            }
        }
        out
    }

    /// Runs one command to completion.
    fn run(&mut self, sqe: &Sqe, data: &[u8]) -> (Cqe, Vec<u8>) {
        self.submit(sqe, data);
        let mut r = self.wait(1);
        r.remove(&sqe.cid()).expect("its own completion")
    }

    /// Whether the target closed this connection (EOF or reset within a
    /// few seconds; anything still queued before it is skipped).
    fn closed_by_target(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

fn rw(opcode: u8, cid: u16, nsid: u32, slba: u64, in_capsule: bool) -> Sqe {
    let len = (NLB * BLOCK) as u32;
    let mut s = Sqe::default();
    s.set_opcode(opcode)
        .set_flags(FLAGS_PSDT_SGL)
        .set_cid(cid)
        .set_nsid(nsid)
        .set_rw(slba, NLB as u32)
        .set_sgl(if in_capsule {
            SglDescriptor::in_capsule(0, len)
        } else {
            SglDescriptor::transport(len)
        });
    s
}

fn read(cid: u16, nsid: u32, slba: u64) -> Sqe {
    rw(0x02, cid, nsid, slba, false)
}

fn write(cid: u16, nsid: u32, slba: u64) -> Sqe {
    rw(0x01, cid, nsid, slba, false)
}

fn admin_cmd(opcode: u8, cid: u16) -> Sqe {
    let mut s = Sqe::default();
    s.set_opcode(opcode).set_flags(FLAGS_PSDT_SGL).set_cid(cid);
    s
}

fn active_namespaces(admin: &mut Host, cid: u16) -> Vec<u32> {
    let mut id = admin_cmd(0x06, cid);
    id.set_cdw(10, 0x02).set_sgl(SglDescriptor::transport(4096));
    let (c, data) = admin.run(&id, &[]);
    assert_eq!(status(&c), (0, 0));
    data.chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .take_while(|&n| n != 0)
        .collect()
}

fn block_data(slba: u64, seed: u8) -> Vec<u8> {
    pattern(NLB * BLOCK, seed ^ slba as u8)
}

/// Four writes then four reads in flight on namespace `nsid`, verified.
/// CIDs `base..base + 8`.
fn verified_io(io: &mut Host, nsid: u32, base: u16, seed: u8) {
    for k in 0..4u16 {
        let slba = k as u64 * NLB as u64;
        io.submit(&write(base + k, nsid, slba), &block_data(slba, seed));
    }
    for (cid, (c, _)) in io.wait(4) {
        assert_eq!(status(&c), (0, 0), "write {cid} of namespace {nsid}");
    }
    for k in 0..4u16 {
        io.submit(&read(base + 4 + k, nsid, k as u64 * NLB as u64), &[]);
    }
    for (cid, (c, data)) in io.wait(4) {
        assert_eq!(status(&c), (0, 0), "read {cid} of namespace {nsid}");
        let slba = (cid - base - 4) as u64 * NLB as u64;
        assert_eq!(
            data,
            block_data(slba, seed),
            "read {cid} of namespace {nsid}"
        );
    }
}

/// Four reads of namespace 1 held by the delay bdev (CIDs `base..+4`),
/// given a head start so they are at the bdev.
fn reads_in_flight(t: &Target, io: &mut Host, base: u16) {
    slow_reads(t);
    for k in 0..4u16 {
        io.submit(&read(base + k, 1, k as u64 * NLB as u64), &[]);
    }
    std::thread::sleep(HEAD_START);
}

/// The reads of [`reads_in_flight`] all got the data of [`verified_io`].
fn reads_completed(io: &mut Host, base: u16, seed: u8) {
    for (cid, (c, data)) in io.wait(4) {
        assert_eq!(status(&c), (0, 0), "in-flight read {cid}");
        let slba = (cid - base) as u64 * NLB as u64;
        assert_eq!(data, block_data(slba, seed), "in-flight read {cid}");
    }
}

/// The RPC waited for the held reads: it cannot have returned before
/// they left the delay bdev.
fn waited_for_drain(took: Duration, what: &str) {
    let min = SLOW - HEAD_START - Duration::from_millis(150);
    assert!(
        took >= min,
        "{what} returned after {took:?}, before the I/O in flight ({SLOW:?}) completed"
    );
}

/// New I/O to a removed namespace: Invalid Namespace, in-capsule or by
/// R2T (refused before any R2T), read or write.
fn refused_as_invalid_namespace(io: &mut Host, base: u16) {
    let data = block_data(0, 0xEE);
    for (i, (sqe, d)) in [
        (read(base, 1, 0), &[][..]),
        (write(base + 1, 1, 0), &data[..]),
        (rw(0x01, base + 2, 1, 0, true), &data[..BLOCK * NLB]),
    ]
    .into_iter()
    .enumerate()
    {
        // Written without the R2T helper: none must come.
        io.send(&sqe, if sqe.sgl().is_transport() { &[] } else { d });
        let c = io.expect_resp();
        assert_eq!(c.cid(), sqe.cid());
        assert_eq!(status(&c), INVALID_NAMESPACE, "command {i} after removal");
    }
}

fn aer(admin: &mut Host, cid: u16) {
    admin.send(&admin_cmd(0x0C, cid), &[]);
}

fn notice_arrives(admin: &mut Host, cid: u16) {
    let c = admin.expect_resp();
    assert_eq!(c.cid(), cid, "the held AER completes");
    assert_eq!(status(&c), (0, 0));
    assert_eq!(c.dw0(), AEN_NS_ATTRIBUTE_CHANGED);
}

fn namespaces_of(t: &Target) -> Vec<u64> {
    let subs = t.ok("nvmf_get_subsystems", Value::Null);
    let s = subs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == NQN)
        .unwrap();
    s["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nsid"].as_u64().unwrap())
        .collect()
}

fn controllers(t: &Target) -> Vec<String> {
    t.ok("nvmf_subsystem_get_controllers", json!({"nqn": NQN}))
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["hostnqn"].as_str().unwrap().to_string())
        .collect()
}

fn remove_ns(backing: Backing) {
    let (t, port) = setup(backing, true);
    let mut admin = Host::admin(port, HOST1);
    let mut io = Host::io(port, HOST1, &admin);
    verified_io(&mut io, 1, 10, 1);
    verified_io(&mut io, 2, 20, 2);
    assert_eq!(active_namespaces(&mut admin, 5), [1, 2]);
    aer(&mut admin, 77);
    assert!(channels(&t, "D0") > 0);

    reads_in_flight(&t, &mut io, 30);
    let (r, took) = call_in_background(
        t.socket.clone(),
        "nvmf_subsystem_remove_ns",
        json!({"nqn": NQN, "nsid": 1}),
    )
    .join()
    .unwrap();
    assert_eq!(r, Ok(json!(true)));
    waited_for_drain(took, "nvmf_subsystem_remove_ns");
    reads_completed(&mut io, 30, 1);

    refused_as_invalid_namespace(&mut io, 40);
    verified_io(&mut io, 2, 50, 3);
    notice_arrives(&mut admin, 77);
    assert_eq!(active_namespaces(&mut admin, 6), [2]);
    assert_eq!(namespaces_of(&t), [2]);
    assert_eq!(channels(&t, "D0"), 0, "D0's channels released");
    t.ok("bdev_delay_delete", json!({"name": "D0"}));
    delete_base(&t, backing);
    assert_eq!(t.bdev_names(), ["M1"]);
}

#[test]
fn remove_ns_drains_refuses_announces_and_lets_the_bdev_go_malloc() {
    remove_ns(Backing::Malloc);
}

#[test]
fn remove_ns_drains_refuses_announces_and_lets_the_bdev_go_file() {
    remove_ns(Backing::File);
}

/// The exported bdev goes away underneath (its base deleted: the delay
/// bdev goes with it): the namespace is removed as by the RPC, and the
/// delete returns only once that is done.
fn hot_remove(backing: Backing) {
    let (t, port) = setup(backing, true);
    let mut admin = Host::admin(port, HOST1);
    let mut io = Host::io(port, HOST1, &admin);
    verified_io(&mut io, 1, 10, 4);
    aer(&mut admin, 77);

    reads_in_flight(&t, &mut io, 30);
    let method = match backing {
        Backing::Malloc => "bdev_malloc_delete",
        Backing::File => "bdev_uring_delete",
    };
    let (r, took) = call_in_background(t.socket.clone(), method, json!({"name": "B0"}))
        .join()
        .unwrap();
    assert!(r.is_ok(), "{method}: {r:?}");
    waited_for_drain(took, method);
    reads_completed(&mut io, 30, 4);

    refused_as_invalid_namespace(&mut io, 40);
    verified_io(&mut io, 2, 50, 5);
    notice_arrives(&mut admin, 77);
    assert_eq!(active_namespaces(&mut admin, 6), [2]);
    assert_eq!(namespaces_of(&t), [2]);
    assert_eq!(t.bdev_names(), ["M1"], "D0 and B0 gone");
}

#[test]
fn a_hot_removed_bdev_takes_its_namespace_with_it_malloc() {
    hot_remove(Backing::Malloc);
}

#[test]
fn a_hot_removed_bdev_takes_its_namespace_with_it_file() {
    hot_remove(Backing::File);
}

fn delete_subsystem(backing: Backing) {
    let (t, port) = setup(backing, true);
    let mut admin = Host::admin(port, HOST1);
    let mut io = Host::io(port, HOST1, &admin);
    verified_io(&mut io, 1, 10, 6);

    reads_in_flight(&t, &mut io, 30);
    let (r, took) = call_in_background(
        t.socket.clone(),
        "nvmf_delete_subsystem",
        json!({"nqn": NQN}),
    )
    .join()
    .unwrap();
    assert_eq!(r, Ok(json!(true)));
    waited_for_drain(took, "nvmf_delete_subsystem");
    assert!(io.closed_by_target(), "I/O queue closed");
    assert!(admin.closed_by_target(), "admin queue closed");
    assert_eq!(channels(&t, "D0"), 0, "D0's channels released");
    assert_eq!(channels(&t, "M1"), 0, "M1's channels released");
    // Its only listener went with it: the port is free.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    t.ok("bdev_delay_delete", json!({"name": "D0"}));
    delete_base(&t, backing);
    t.ok("bdev_malloc_delete", json!({"name": "M1"}));
    assert!(t.bdev_names().is_empty());
}

#[test]
fn a_deleted_subsystem_drops_its_hosts_after_draining_malloc() {
    delete_subsystem(Backing::Malloc);
}

#[test]
fn a_deleted_subsystem_drops_its_hosts_after_draining_file() {
    delete_subsystem(Backing::File);
}

fn remove_host(backing: Backing) {
    let (t, port) = setup(backing, false);
    for h in [HOST1, HOST2] {
        t.ok("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": h}));
    }
    let mut admin1 = Host::admin(port, HOST1);
    let mut io1 = Host::io(port, HOST1, &admin1);
    let mut admin2 = Host::admin(port, HOST2);
    let mut io2 = Host::io(port, HOST2, &admin2);
    verified_io(&mut io1, 1, 10, 7);
    verified_io(&mut io2, 2, 10, 8);

    reads_in_flight(&t, &mut io1, 30);
    let (r, took) = call_in_background(
        t.socket.clone(),
        "nvmf_subsystem_remove_host",
        json!({"nqn": NQN, "host": HOST1}),
    )
    .join()
    .unwrap();
    assert_eq!(r, Ok(json!(true)));
    waited_for_drain(took, "nvmf_subsystem_remove_host");
    assert!(
        io1.closed_by_target(),
        "the removed host's I/O queue closed"
    );
    assert!(
        admin1.closed_by_target(),
        "the removed host's admin queue closed"
    );
    assert_eq!(controllers(&t), [HOST2]);
    // The other host is untouched.
    verified_io(&mut io2, 1, 60, 9);
    verified_io(&mut io2, 2, 70, 10);
    assert_eq!(active_namespaces(&mut admin2, 5), [1, 2]);
    // And the removed one cannot come back.
    let (_, c) = Host::try_connect(port, HOST1, 0, CNTLID_DYNAMIC);
    assert_eq!(
        (status(&c), c.dw0()),
        ((1, 0x84), 0),
        "Connect Invalid Host"
    );
}

#[test]
fn a_removed_host_is_dropped_after_draining_malloc() {
    remove_host(Backing::Malloc);
}

#[test]
fn a_removed_host_is_dropped_after_draining_file() {
    remove_host(Backing::File);
}

fn allow_any_host_off(backing: Backing) {
    let (t, port) = setup(backing, true);
    t.ok(
        "nvmf_subsystem_add_host",
        json!({"nqn": NQN, "host": HOST2}),
    );
    let mut admin1 = Host::admin(port, HOST1);
    let mut io1 = Host::io(port, HOST1, &admin1);
    let mut admin2 = Host::admin(port, HOST2);
    verified_io(&mut io1, 1, 10, 11);

    reads_in_flight(&t, &mut io1, 30);
    let (r, took) = call_in_background(
        t.socket.clone(),
        "nvmf_subsystem_allow_any_host",
        json!({"nqn": NQN, "allow_any_host": false}),
    )
    .join()
    .unwrap();
    assert_eq!(r, Ok(json!(true)));
    waited_for_drain(took, "nvmf_subsystem_allow_any_host");
    assert!(
        io1.closed_by_target(),
        "an unlisted host's I/O queue closed"
    );
    assert!(
        admin1.closed_by_target(),
        "an unlisted host's admin queue closed"
    );
    assert_eq!(controllers(&t), [HOST2]);
    assert_eq!(
        active_namespaces(&mut admin2, 5),
        [1, 2],
        "a listed host stays"
    );
    // No I/O queue is left: nothing holds the bdevs' channels.
    assert_eq!(channels(&t, "D0"), 0);
    let (_, c) = Host::try_connect(port, HOST1, 0, CNTLID_DYNAMIC);
    assert_eq!(
        (status(&c), c.dw0()),
        ((1, 0x84), 0),
        "Connect Invalid Host"
    );
    let mut io2 = Host::io(port, HOST2, &admin2);
    verified_io(&mut io2, 1, 40, 12);
}

#[test]
fn turning_allow_any_host_off_drops_unlisted_hosts_malloc() {
    allow_any_host_off(Backing::Malloc);
}

#[test]
fn turning_allow_any_host_off_drops_unlisted_hosts_file() {
    allow_any_host_off(Backing::File);
}

/// SPDK v26.x's initiator sends an empty host NQN when none is configured:
/// accepted where any host is allowed (as SPDK's target does), refused
/// with Connect Invalid Host where a host list applies; a host NQN field
/// with no NUL within 224 bytes is an invalid parameter at offset 512.
#[test]
fn an_empty_host_nqn_connects_only_where_any_host_is_allowed() {
    let (t, port) = setup(Backing::Malloc, true);
    let mut admin = Host::admin(port, "");
    let mut io = Host::io(port, "", &admin);
    verified_io(&mut io, 1, 10, 13);
    assert_eq!(active_namespaces(&mut admin, 5), [1, 2]);
    assert_eq!(controllers(&t), [""]);
    // The discovery service too.
    let mut d = Host::tcp(port);
    let (sqe, data) = connect_command(
        0,
        31,
        0,
        CNTLID_DYNAMIC,
        "nqn.2014-08.org.nvmexpress.discovery",
        "",
    );
    d.send(&sqe, &data);
    assert_eq!(status(&d.expect_resp()), (0, 0), "discovery");

    let (_, c) = Host::try_connect_raw(port, 0, CNTLID_DYNAMIC, |d| {
        d[512..512 + NQN_MAX_BYTES + 1].fill(b'a')
    });
    assert_eq!(
        (status(&c), c.dw0()),
        ((1, 0x82), 0x1_0200),
        "host NQN not terminated within 224 bytes"
    );

    // With a host list the empty NQN is no host of it: refused, and the
    // queues it has are closed.
    t.ok(
        "nvmf_subsystem_add_host",
        json!({"nqn": NQN, "host": HOST1}),
    );
    t.ok(
        "nvmf_subsystem_allow_any_host",
        json!({"nqn": NQN, "allow_any_host": false}),
    );
    assert!(io.closed_by_target());
    let (_, c) = Host::try_connect(port, "", 0, CNTLID_DYNAMIC);
    assert_eq!(
        (status(&c), c.dw0()),
        ((1, 0x84), 0),
        "Connect Invalid Host, as SPDK answers"
    );
    let mut admin1 = Host::admin(port, HOST1);
    assert_eq!(active_namespaces(&mut admin1, 5), [1, 2]);
}

/// A host that stops reading keeps its reads' data (and so the namespace)
/// in the target's send queue: the removal closes that host's connection
/// after `DRAIN_TIMEOUT` rather than waiting for it forever.
#[test]
fn a_host_that_stops_reading_cannot_hold_a_removal_forever() {
    use std::os::fd::AsRawFd;
    let (t, port) = setup(Backing::Malloc, true);
    let admin = Host::admin(port, HOST1);
    let mut io = Host::io(port, HOST1, &admin);
    // A small receive buffer, never read: the target's sends back up.
    let small: libc::c_int = 16 * 1024;
    // SAFETY: setsockopt on a socket we own, with an int-sized value.
    let rc = unsafe {
        libc::setsockopt(
            io.s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    // 128 reads of 128 KiB: far more than the sockets hold.
    let (nlb, len) = (32u32, 128 * 1024u32);
    for cid in 0..128u16 {
        let mut s = Sqe::default();
        s.set_opcode(0x02)
            .set_flags(FLAGS_PSDT_SGL)
            .set_cid(cid)
            .set_nsid(2)
            .set_rw(0, nlb)
            .set_sgl(SglDescriptor::transport(len));
        io.send(&s, &[]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    t.ok("nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 2}));
    let took = start.elapsed();
    let limit = nvmf::target::changes::DRAIN_TIMEOUT;
    assert!(
        took >= limit - Duration::from_secs(1) && took < limit + Duration::from_secs(5),
        "remove_ns took {took:?} with a host not reading (limit {limit:?})"
    );
    assert!(io.closed_by_target(), "the stalled host's queue closed");
    assert_eq!(channels(&t, "M1"), 0);
    t.ok("bdev_malloc_delete", json!({"name": "M1"}));
}
