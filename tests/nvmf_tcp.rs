//! NVMe/TCP connection initialisation and malformed input against the real
//! target, from a raw TCP client: ICReq gets an ICResp with digests echoed;
//! bad PDUs get a C2HTermReq with the spec's FES/FEI and the connection
//! closes; other connections keep working.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Backing, Target};
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";

fn target_with_listener() -> (Target, u16) {
    let t = Target::start();
    let port = common::free_port();
    t.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": NQN, "allow_any_host": true}),
    );
    t.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    (t, port)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn icreq(digest: u8) -> [u8; 128] {
    let mut b = [0u8; 128];
    b[2] = 128;
    b[4] = 128;
    b[11] = digest;
    b
}

/// Reads one C2HTermReq; returns (FES, FEI) and checks the socket closes.
fn expect_term_req(s: &mut TcpStream) -> (u16, u32) {
    let mut h = [0u8; 24];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[0], 0x03, "C2HTermReq");
    let plen = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; plen - 24];
    s.read_exact(&mut rest).unwrap();
    let mut more = [0u8; 1];
    assert_eq!(
        s.read(&mut more).unwrap_or(0),
        0,
        "connection closed after TermReq"
    );
    (
        u16::from_le_bytes(h[8..10].try_into().unwrap()),
        u32::from_le_bytes(h[10..14].try_into().unwrap()),
    )
}

#[test]
fn icreq_gets_icresp_and_malformed_pdus_end_only_their_connection() {
    let (_t, port) = target_with_listener();
    // A healthy connection with both digests, kept open throughout.
    let mut good = connect(port);
    good.write_all(&icreq(0x03)).unwrap();
    let mut r = [0u8; 128];
    good.read_exact(&mut r).unwrap();
    assert_eq!((r[0], r[2], r[4]), (0x01, 128, 128), "ICResp header");
    assert_eq!(r[10], 0, "CPDA 0 (Linux hosts require it)");
    assert_eq!(r[11], 0x03, "digests echoed");
    let maxh2c = u32::from_le_bytes(r[12..16].try_into().unwrap());
    assert!(maxh2c >= 4096 && maxh2c % 4 == 0);

    // Bad PFV → FES 1 at offset 8.
    let mut s = connect(port);
    let mut b = icreq(0);
    b[8] = 1;
    s.write_all(&b).unwrap();
    assert_eq!(expect_term_req(&mut s), (1, 8));
    // HPDA out of range → offset 10.
    let mut s = connect(port);
    let mut b = icreq(0);
    b[10] = 40;
    s.write_all(&b).unwrap();
    assert_eq!(expect_term_req(&mut s), (1, 10));
    // A CapsuleCmd before ICReq → sequence error.
    let mut s = connect(port);
    let mut b = [0u8; 72];
    b[0] = 4;
    b[2] = 72;
    b[4] = 72;
    s.write_all(&b).unwrap();
    assert_eq!(expect_term_req(&mut s).0, 2);
    // After ICReq: unknown PDU type, wrong hlen, a second ICReq.
    for (bad, fes, fei) in [
        ([0x08u8, 0, 24, 0, 24, 0, 0, 0], 1, 0),
        ([0x04u8, 0, 24, 0, 72, 0, 0, 0], 1, 2),
        ([0x00u8, 0, 128, 0, 128, 0, 0, 0], 2, 0),
    ] {
        let mut s = connect(port);
        s.write_all(&icreq(0)).unwrap();
        s.read_exact(&mut r).unwrap();
        s.write_all(&bad).unwrap();
        assert_eq!(expect_term_req(&mut s), (fes, fei), "{bad:?}");
    }
    // Header digest negotiated but wrong → FES 3.
    let mut s = connect(port);
    s.write_all(&icreq(0x01)).unwrap();
    s.read_exact(&mut r).unwrap();
    let mut cmd = [0u8; 76];
    cmd[..8].copy_from_slice(&[0x04, 0x01, 72, 0, 76, 0, 0, 0]);
    cmd[8] = 0x06; // identify
    s.write_all(&cmd).unwrap();
    assert_eq!(expect_term_req(&mut s).0, 3);

    // The healthy connection still answers: a command before fabrics
    // Connect is out of sequence (SCT 0, SC 0x0C), header digest included.
    let mut cmd = [0u8; 76];
    cmd[..8].copy_from_slice(&[0x04, 0x01, 72, 0, 76, 0, 0, 0]);
    cmd[8] = 0x06;
    cmd[10..12].copy_from_slice(&0x1234u16.to_le_bytes());
    let d = crc32c::crc32c(&cmd[..72]);
    cmd[72..76].copy_from_slice(&d.to_le_bytes());
    good.write_all(&cmd).unwrap();
    let mut resp = [0u8; 28];
    good.read_exact(&mut resp).unwrap();
    assert_eq!((resp[0], resp[4]), (0x05, 28));
    assert_eq!(
        u32::from_le_bytes(resp[24..28].try_into().unwrap()),
        crc32c::crc32c(&resp[..24])
    );
    assert_eq!(
        u16::from_le_bytes(resp[20..22].try_into().unwrap()),
        0x1234,
        "CID"
    );
    let status = u16::from_le_bytes(resp[22..24].try_into().unwrap());
    assert_eq!((status >> 1) & 0xFF, 0x0C);
}

/// A raw NVMe/TCP host queue (no digests) for driving the target.
struct HostQueue {
    s: TcpStream,
}

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427";

impl HostQueue {
    fn open(port: u16) -> HostQueue {
        let mut s = connect(port);
        s.write_all(&icreq(0)).unwrap();
        let mut r = [0u8; 128];
        s.read_exact(&mut r).unwrap();
        assert_eq!(r[0], 1);
        HostQueue { s }
    }

    /// Sends a command (64-byte SQE, in-capsule `data`), returns the C2H
    /// data and the CQE bytes.
    fn cmd(&mut self, sqe: [u8; 64], data: &[u8]) -> (Vec<u8>, [u8; 16]) {
        self.s.write_all(&capsule(sqe, data)).unwrap();
        let mut got = Vec::new();
        loop {
            let mut h = [0u8; 24];
            self.s.read_exact(&mut h).unwrap();
            match h[0] {
                0x07 => {
                    let len = u32::from_le_bytes(h[16..20].try_into().unwrap()) as usize;
                    let mut d = vec![0u8; len];
                    self.s.read_exact(&mut d).unwrap();
                    got.extend_from_slice(&d);
                }
                0x05 => return (got, h[8..24].try_into().unwrap()),
                t => panic!("unexpected PDU type {t:#x}"),
            }
        }
    }
}

impl HostQueue {
    /// A write whose data goes by R2T/H2CData (SGL 0x5A): sends the
    /// capsule, answers the R2T, returns the CQE.
    fn write_r2t(&mut self, sqe: [u8; 64], data: &[u8]) -> [u8; 16] {
        self.s.write_all(&capsule(sqe, &[])).unwrap();
        let mut h = [0u8; 24];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(h[0], 0x09, "R2T");
        let cccid = u16::from_le_bytes(h[8..10].try_into().unwrap());
        let ttag = u16::from_le_bytes(h[10..12].try_into().unwrap());
        let r2to = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
        let r2tl = u32::from_le_bytes(h[16..20].try_into().unwrap()) as usize;
        assert_eq!(
            (cccid, r2to, r2tl),
            (u16::from_le_bytes([sqe[2], sqe[3]]), 0, data.len())
        );
        // Two H2CData PDUs, as a host limited by MAXH2CDATA would send.
        let half = data.len() / 2;
        for (off, chunk) in [(0, &data[..half]), (half, &data[half..])] {
            let mut d = vec![0u8; 24 + chunk.len()];
            d[0] = 0x06;
            d[1] = if off == half { 0x04 } else { 0 };
            d[2] = 24;
            d[3] = 24;
            d[4..8].copy_from_slice(&((24 + chunk.len()) as u32).to_le_bytes());
            d[8..10].copy_from_slice(&cccid.to_le_bytes());
            d[10..12].copy_from_slice(&ttag.to_le_bytes());
            d[12..16].copy_from_slice(&(off as u32).to_le_bytes());
            d[16..20].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
            d[24..].copy_from_slice(chunk);
            self.s.write_all(&d).unwrap();
        }
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(h[0], 0x05);
        h[8..24].try_into().unwrap()
    }
}

/// A CapsuleCmd PDU without digests carrying `data` in the capsule.
fn capsule(sqe: [u8; 64], data: &[u8]) -> Vec<u8> {
    let plen = 72 + data.len();
    let mut pdu = vec![0u8; plen];
    pdu[0] = 4;
    pdu[2] = 72;
    pdu[3] = if data.is_empty() { 0 } else { 72 };
    pdu[4..8].copy_from_slice(&(plen as u32).to_le_bytes());
    pdu[8..72].copy_from_slice(&sqe);
    pdu[72..].copy_from_slice(data);
    pdu
}

fn rw(opcode: u8, cid: u16, slba: u64, nlb: u16, len: u32, in_capsule: bool) -> [u8; 64] {
    let mut b = with_sgl(sqe(opcode, cid), len, in_capsule);
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[40..48].copy_from_slice(&slba.to_le_bytes());
    b[48..50].copy_from_slice(&(nlb - 1).to_le_bytes());
    b
}

fn sqe(opcode: u8, cid: u16) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0] = opcode;
    b[1] = 0x40;
    b[2..4].copy_from_slice(&cid.to_le_bytes());
    b
}

fn sqe_ns(opcode: u8, cid: u16) -> [u8; 64] {
    let mut b = sqe(opcode, cid);
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b
}

fn with_sgl(mut b: [u8; 64], len: u32, in_capsule: bool) -> [u8; 64] {
    b[32..36].copy_from_slice(&len.to_le_bytes());
    b[39] = if in_capsule { 0x01 } else { 0x5A };
    b
}

fn connect_cmd(qid: u16, sqsize: u16, kato: u32) -> [u8; 64] {
    let mut b = with_sgl(sqe(0x7F, 1), 1024, true);
    b[4] = 0x01;
    b[42..44].copy_from_slice(&qid.to_le_bytes());
    b[44..46].copy_from_slice(&sqsize.to_le_bytes());
    b[48..52].copy_from_slice(&kato.to_le_bytes());
    b
}

fn connect_data(cntlid: u16, subnqn: &str, hostnqn: &str) -> Vec<u8> {
    let mut d = vec![0u8; 1024];
    d[16..18].copy_from_slice(&cntlid.to_le_bytes());
    d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
    d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
    d
}

fn status(cqe: &[u8; 16]) -> (u8, u8) {
    let v = u16::from_le_bytes(cqe[14..16].try_into().unwrap());
    (((v >> 9) & 7) as u8, (v >> 1) as u8)
}

fn dw0(cqe: &[u8; 16]) -> u32 {
    u32::from_le_bytes(cqe[0..4].try_into().unwrap())
}

fn property(get: bool, offset: u32, size8: bool, value: u64) -> [u8; 64] {
    let mut b = sqe(0x7F, 2);
    b[4] = if get { 0x04 } else { 0x00 };
    b[40] = size8 as u8;
    b[44..48].copy_from_slice(&offset.to_le_bytes());
    b[48..56].copy_from_slice(&value.to_le_bytes());
    b
}

#[test]
fn the_linux_host_connect_sequence_gets_a_working_controller() {
    for backing in Backing::ALL {
        linux_host_connect_sequence(backing);
    }
}

fn linux_host_connect_sequence(backing: Backing) {
    let (t, port) = target_with_listener();
    backing.create(&t, "M0", 2048, 4096);
    t.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "M0"}}),
    );

    let mut admin = HostQueue::open(port);
    // Commands before Connect are out of sequence.
    let (_, c) = admin.cmd(with_sgl(sqe(0x06, 9), 4096, false), &[]);
    assert_eq!(status(&c), (0, 0x0C));
    // Admin Connect as Linux sends it.
    let (_, c) = admin.cmd(
        connect_cmd(0, 31, 5000),
        &connect_data(0xFFFF, NQN, HOSTNQN),
    );
    assert_eq!(status(&c), (0, 0), "connect failed: dw0 {:#x}", dw0(&c));
    let cntlid = dw0(&c) as u16;
    assert!(cntlid >= 1);
    // CAP (8 bytes), then CC EN=0, CC EN=1, CSTS.RDY.
    let (_, c) = admin.cmd(property(true, 0x00, true, 0), &[]);
    let cap = u64::from_le_bytes(c[0..8].try_into().unwrap());
    assert_eq!(cap & 0xFFFF, 127, "MQES");
    assert_eq!((cap >> 48) & 0xF, 0, "MPSMIN");
    let cc = (6u64 << 16) | (4 << 20);
    assert_eq!(
        status(&admin.cmd(property(false, 0x14, false, cc), &[]).1),
        (0, 0)
    );
    assert_eq!(
        status(&admin.cmd(property(false, 0x14, false, cc | 1), &[]).1),
        (0, 0)
    );
    let (_, c) = admin.cmd(property(true, 0x1C, false, 0), &[]);
    assert_eq!(dw0(&c) & 1, 1, "CSTS.RDY");
    let (_, c) = admin.cmd(property(true, 0x08, false, 0), &[]);
    assert_eq!(dw0(&c), 0x0001_0300);
    // Identify controller: 4096 bytes by C2HData.
    let mut id = with_sgl(sqe(0x06, 10), 4096, false);
    id[40] = 0x01;
    let (data, c) = admin.cmd(id, &[]);
    assert_eq!(status(&c), (0, 0));
    assert_eq!(data.len(), 4096);
    assert_eq!(u16::from_le_bytes(data[78..80].try_into().unwrap()), cntlid);
    assert_eq!(&data[768..768 + NQN.len()], NQN.as_bytes());
    assert_eq!(
        u32::from_le_bytes(data[1792..1796].try_into().unwrap()),
        260
    );
    // Active namespaces, then namespace 1.
    let mut list = with_sgl(sqe(0x06, 11), 4096, false);
    list[40] = 0x02;
    let (data, _) = admin.cmd(list, &[]);
    assert_eq!(u32::from_le_bytes(data[0..4].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(data[4..8].try_into().unwrap()), 0);
    let mut ns = with_sgl(sqe(0x06, 12), 4096, false);
    ns[4] = 1;
    let (data, _) = admin.cmd(ns, &[]);
    assert_eq!(u64::from_le_bytes(data[0..8].try_into().unwrap()), 2048);
    assert_eq!(data[130], 12, "LBADS 4096");
    // Number of queues, keep alive.
    let mut nq = sqe(0x09, 13);
    nq[40] = 0x07;
    nq[44..48].copy_from_slice(&(3u32 | 3 << 16).to_le_bytes());
    let (_, c) = admin.cmd(nq, &[]);
    assert_eq!(dw0(&c), 3 | 3 << 16);
    assert_eq!(status(&admin.cmd(sqe(0x18, 14), &[]).1), (0, 0));

    // An I/O queue joins the controller.
    let mut io = HostQueue::open(port);
    let (_, c) = io.cmd(connect_cmd(1, 127, 0), &connect_data(cntlid, NQN, HOSTNQN));
    assert_eq!(status(&c), (0, 0));
    // The RPCs see the controller and both queue pairs.
    let ctrls = t.ok("nvmf_subsystem_get_controllers", json!({"nqn": NQN}));
    assert_eq!(ctrls[0]["cntlid"], cntlid);
    assert_eq!(ctrls[0]["hostnqn"], HOSTNQN);
    assert_eq!(ctrls[0]["num_io_qpairs"], 1);
    let qps = t.ok("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}));
    let qids: Vec<u64> = qps
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["qid"].as_u64().unwrap())
        .collect();
    assert_eq!(qids, [0, 1]);
    assert_eq!(qps[0]["listen_address"]["trsvcid"], port.to_string());
    assert_eq!(qps[0]["state"], "enabled");
    // Data: 4 KiB in the capsule, 8 KiB by R2T (above the 4 KiB ICD).
    let a: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    let (_, c) = io.cmd(rw(0x01, 20, 10, 1, 4096, true), &a);
    assert_eq!(status(&c), (0, 0), "in-capsule write to {backing:?}");
    let c = io.write_r2t(rw(0x01, 21, 11, 2, 8192, false), &b);
    assert_eq!(status(&c), (0, 0), "R2T write to {backing:?}");
    let (data, c) = io.cmd(rw(0x02, 22, 10, 3, 12288, false), &[]);
    assert_eq!(status(&c), (0, 0));
    assert_eq!(&data[..4096], &a[..]);
    assert_eq!(&data[4096..], &b[..]);
    // The bytes are in the bdev itself.
    let r = t.ok(
        "bdev_read",
        json!({"name": "M0", "offset_blocks": 11, "num_blocks": 2}),
    );
    assert_eq!(r["data"].as_str().unwrap(), common::hex(&b));
    // Flush, write zeroes, deallocate.
    assert_eq!(status(&io.cmd(sqe_ns(0x00, 23), &[]).1), (0, 0));
    assert_eq!(
        status(&io.cmd(rw(0x08, 24, 11, 1, 0, false), &[]).1),
        (0, 0)
    );
    let mut dsm = with_sgl(sqe_ns(0x09, 25), 16, true);
    dsm[44..48].copy_from_slice(&4u32.to_le_bytes()); // AD
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&1u32.to_le_bytes());
    range[8..16].copy_from_slice(&12u64.to_le_bytes());
    assert_eq!(status(&io.cmd(dsm, &range).1), (0, 0));
    let (data, _) = io.cmd(rw(0x02, 26, 10, 3, 12288, false), &[]);
    assert_eq!(&data[..4096], &a[..]);
    assert!(
        data[4096..].iter().all(|&x| x == 0),
        "zeroed and deallocated"
    );
    // Errors: LBA out of range, unknown namespace, SGL too short.
    assert_eq!(
        status(&io.cmd(rw(0x02, 27, 2047, 2, 8192, false), &[]).1),
        (0, 0x80)
    );
    let mut bad_ns = rw(0x02, 28, 0, 1, 4096, false);
    bad_ns[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(status(&io.cmd(bad_ns, &[]).1), (0, 0x0B));
    assert_eq!(
        status(&io.cmd(rw(0x02, 29, 0, 2, 4096, false), &[]).1),
        (0, 0x0F)
    );
    let stats = t.ok("nvmf_get_stats", Value::Null);
    let done: u64 = stats["poll_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["completed_nvme_io"].as_u64().unwrap())
        .sum();
    assert_eq!(done, 10, "{stats}");
    // A subsystem is reachable only on its own listeners.
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": "nqn.2016-06.io.spdk:elsewhere", "allow_any_host": true}),
    );
    let mut q = HostQueue::open(port);
    let (_, c) = q.cmd(
        connect_cmd(0, 31, 0),
        &connect_data(0xFFFF, "nqn.2016-06.io.spdk:elsewhere", HOSTNQN),
    );
    assert_eq!(
        (status(&c), dw0(&c)),
        ((1, 0x82), 0x1_0100),
        "not listening here"
    );
    // Refusals carry the spec's status and the offending field.
    let mut q = HostQueue::open(port);
    let (_, c) = q.cmd(
        connect_cmd(1, 127, 0),
        &connect_data(cntlid + 100, NQN, HOSTNQN),
    );
    assert_eq!(
        (status(&c), dw0(&c)),
        ((1, 0x82), 0x1_0010),
        "unknown cntlid"
    );
    let (_, c) = q.cmd(
        connect_cmd(0, 31, 0),
        &connect_data(0xFFFF, "nqn.2016-06.io.x:none", HOSTNQN),
    );
    assert_eq!(
        (status(&c), dw0(&c)),
        ((1, 0x82), 0x1_0100),
        "unknown subsystem"
    );
    let (_, c) = q.cmd(connect_cmd(0, 0, 0), &connect_data(0xFFFF, NQN, HOSTNQN));
    assert_eq!((status(&c), dw0(&c)), ((1, 0x82), 44), "sqsize 0");
    t.ok(
        "nvmf_subsystem_allow_any_host",
        json!({"nqn": NQN, "allow_any_host": false}),
    );
    let (_, c) = q.cmd(connect_cmd(0, 31, 0), &connect_data(0xFFFF, NQN, HOSTNQN));
    assert_eq!(status(&c), (1, 0x84), "host not allowed");
    t.ok(
        "nvmf_subsystem_add_host",
        json!({"nqn": NQN, "host": HOSTNQN}),
    );
    let (_, c) = q.cmd(connect_cmd(0, 31, 0), &connect_data(0xFFFF, NQN, HOSTNQN));
    assert_eq!(status(&c), (0, 0), "allowed host");
    assert_ne!(
        dw0(&c) as u16,
        cntlid,
        "a second controller gets its own cntlid"
    );
}

#[test]
fn discovery_lists_the_subsystems_a_host_may_reach() {
    let (t, port) = target_with_listener();
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": "nqn.2016-06.io.spdk:hidden", "allow_any_host": false}),
    );
    t.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": "nqn.2016-06.io.spdk:hidden", "listen_address": {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    let mut q = HostQueue::open(port);
    let (_, c) = q.cmd(
        connect_cmd(0, 31, 0),
        &connect_data(0xFFFF, "nqn.2014-08.org.nvmexpress.discovery", HOSTNQN),
    );
    assert_eq!(status(&c), (0, 0));
    let cc = (6u64 << 16) | (4 << 20) | 1;
    assert_eq!(
        status(&q.cmd(property(false, 0x14, false, cc), &[]).1),
        (0, 0)
    );
    // Identify: a discovery controller.
    let mut id = with_sgl(sqe(0x06, 3), 4096, false);
    id[40] = 0x01;
    let (data, _) = q.cmd(id, &[]);
    assert_eq!(data[111], 2, "CNTRLTYPE discovery");
    // Header first (as libnvme reads it), then the whole page.
    let log = |len: u32, cid: u16| {
        let mut b = with_sgl(sqe(0x02, cid), len, false);
        b[40] = 0x70;
        b[42..44].copy_from_slice(&((len / 4 - 1) as u16).to_le_bytes());
        b
    };
    let (hdr, c) = q.cmd(log(1024, 4), &[]);
    assert_eq!(status(&c), (0, 0));
    let numrec = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    assert_eq!(numrec, 1, "only the subsystem this host may reach");
    let (page, _) = q.cmd(log(1024 * (1 + numrec as u32), 5), &[]);
    let e = &page[1024..2048];
    assert_eq!((e[0], e[1], e[2]), (3, 1, 2));
    assert_eq!(&e[256..256 + NQN.len()], NQN.as_bytes());
    assert_eq!(&e[512..521], b"127.0.0.1");
    assert_eq!(
        std::str::from_utf8(&e[32..64]).unwrap().trim(),
        port.to_string()
    );
}

/// SPEC §3: a host that goes silent loses its controller after its
/// keep-alive timeout, so reconnecting is never blocked by stale state.
#[test]
fn a_silent_host_is_disconnected_after_its_keep_alive_timeout() {
    let (_t, port) = target_with_listener();
    let mut admin = HostQueue::open(port);
    let (_, c) = admin.cmd(
        connect_cmd(0, 31, 1000),
        &connect_data(0xFFFF, NQN, HOSTNQN),
    );
    assert_eq!(status(&c), (0, 0));
    let cntlid = dw0(&c) as u16;
    // Keep alives keep it.
    let cc = (6u64 << 16) | (4 << 20) | 1;
    admin.cmd(property(false, 0x14, false, cc), &[]);
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(status(&admin.cmd(sqe(0x18, 40 + i), &[]).1), (0, 0));
    }
    // Then silence: closed within KATO (1 s) plus slack.
    let start = std::time::Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(
        admin.s.read(&mut b).unwrap_or(0),
        0,
        "target closed the admin queue"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // The controller is gone: an I/O queue cannot join it...
    let mut q = HostQueue::open(port);
    let (_, c) = q.cmd(connect_cmd(1, 127, 0), &connect_data(cntlid, NQN, HOSTNQN));
    assert_eq!(status(&c), (1, 0x82));
    // ...and the same host connects again at once.
    let (_, c) = q.cmd(connect_cmd(0, 31, 0), &connect_data(0xFFFF, NQN, HOSTNQN));
    assert_eq!(status(&c), (0, 0));
}

/// Adding a namespace answers a held AER with the namespace attribute
/// notice; the controller and existing I/O queues then see the namespace.
#[test]
fn a_new_namespace_is_announced_and_usable_at_once() {
    let (t, port) = target_with_listener();
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 256, "block_size": 4096}),
    );
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M1", "num_blocks": 512, "block_size": 4096}),
    );
    t.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "M0"}}),
    );
    let mut admin = HostQueue::open(port);
    let (_, c) = admin.cmd(connect_cmd(0, 31, 0), &connect_data(0xFFFF, NQN, HOSTNQN));
    let cntlid = dw0(&c) as u16;
    let cc = (6u64 << 16) | (4 << 20) | 1;
    admin.cmd(property(false, 0x14, false, cc), &[]);
    let mut io = HostQueue::open(port);
    let (_, c) = io.cmd(connect_cmd(1, 127, 0), &connect_data(cntlid, NQN, HOSTNQN));
    assert_eq!(status(&c), (0, 0));
    // The host leaves an AER outstanding: no answer yet.
    let mut aer = [0u8; 72];
    aer[0] = 4;
    aer[2] = 72;
    aer[4] = 72;
    aer[8..72].copy_from_slice(&sqe(0x0C, 77));
    admin.s.write_all(&aer).unwrap();
    admin
        .s
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut h = [0u8; 24];
    assert!(
        admin.s.read_exact(&mut h).is_err(),
        "AER answered too early"
    );
    admin
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A namespace arrives: the AER completes with the notice.
    assert_eq!(
        t.ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "M1"}})
        ),
        json!(2)
    );
    admin.s.read_exact(&mut h).unwrap();
    assert_eq!(h[0], 0x05);
    let cqe: [u8; 16] = h[8..24].try_into().unwrap();
    assert_eq!(u16::from_le_bytes([cqe[12], cqe[13]]), 77);
    assert_eq!(dw0(&cqe), 0x0004_0002);
    // Identify sees it, and the existing I/O queue can use it.
    let mut list = with_sgl(sqe(0x06, 78), 4096, false);
    list[40] = 0x02;
    let (data, _) = admin.cmd(list, &[]);
    assert_eq!(u32::from_le_bytes(data[4..8].try_into().unwrap()), 2);
    let mut r = rw(0x02, 79, 511, 1, 4096, false);
    r[4..8].copy_from_slice(&2u32.to_le_bytes());
    let (data, c) = io.cmd(r, &[]);
    assert_eq!(status(&c), (0, 0));
    assert_eq!(data.len(), 4096);
}

/// SPEC §3: when a controller goes (its admin queue closed), its I/O
/// queues are closed too, so no state of the old association lingers.
#[test]
fn closing_the_admin_queue_closes_the_controllers_io_queues() {
    let (t, port) = target_with_listener();
    let (admin, mut io) = connected_queues(port);
    drop(admin);
    io.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        io.s.read(&mut b).unwrap_or(0),
        0,
        "I/O queue closed by the target"
    );
    for _ in 0..100 {
        let q = t.ok("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}));
        if q.as_array().unwrap().is_empty() {
            assert_eq!(
                t.ok("nvmf_subsystem_get_controllers", json!({"nqn": NQN})),
                json!([])
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("queue pairs left behind");
}

/// Random and mutated PDU streams on 300 connections: the target never
/// crashes or wedges, and a well-behaved host is served afterwards.
#[test]
fn random_pdu_streams_never_take_the_target_down() {
    let (t, port) = target_with_listener();
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 256, "block_size": 4096}),
    );
    t.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "M0"}}),
    );
    // A valid admin Connect capsule to mutate.
    let mut valid = vec![0u8; 72 + 1024];
    valid[0] = 4;
    valid[2] = 72;
    valid[3] = 72;
    valid[4..8].copy_from_slice(&((72 + 1024) as u32).to_le_bytes());
    valid[8..72].copy_from_slice(&connect_cmd(0, 31, 0));
    valid[72..].copy_from_slice(&connect_data(0xFFFF, NQN, HOSTNQN));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..300 {
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = s.write_all(&icreq((next() % 4) as u8));
        let mut msg = if i % 2 == 0 {
            // Mutate a few bytes of a valid capsule (headers and SQE).
            let mut m = valid.clone();
            for _ in 0..(1 + next() % 4) {
                let at = (next() % 80) as usize;
                m[at] = next() as u8;
            }
            m
        } else {
            // Random bytes, sometimes truncated mid-header.
            (0..(next() % 200)).map(|_| next() as u8).collect()
        };
        if i % 7 == 0 {
            msg.truncate((next() % 40) as usize);
        }
        let _ = s.write_all(&msg);
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    // Still serving: RPC and a clean NVMe/TCP host.
    assert_eq!(
        t.ok("nvmf_get_subsystems", Value::Null)
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let mut admin = HostQueue::open(port);
    let (_, c) = admin.cmd(connect_cmd(0, 31, 0), &connect_data(0xFFFF, NQN, HOSTNQN));
    assert_eq!(status(&c), (0, 0));
}

/// Sends one CapsuleCmd (in-capsule `data`) without waiting.
fn send_capsule(s: &mut TcpStream, sqe: [u8; 64], data: &[u8]) {
    s.write_all(&capsule(sqe, data)).unwrap();
}

/// An admin queue with a controller and an I/O queue (128 entries) on it.
fn connected_queues(port: u16) -> (HostQueue, HostQueue) {
    let mut admin = HostQueue::open(port);
    let (_, c) = admin.cmd(connect_cmd(0, 31, 0), &connect_data(0xFFFF, NQN, HOSTNQN));
    assert_eq!(status(&c), (0, 0));
    let cntlid = dw0(&c) as u16;
    let mut io = HostQueue::open(port);
    let (_, c) = io.cmd(connect_cmd(1, 127, 0), &connect_data(cntlid, NQN, HOSTNQN));
    assert_eq!(status(&c), (0, 0));
    (admin, io)
}

/// Reads one PDU without digests: (type, 24-byte header, data).
fn read_pdu(s: &mut TcpStream) -> (u8, [u8; 24], Vec<u8>) {
    let mut h = [0u8; 24];
    s.read_exact(&mut h).unwrap();
    let plen = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let mut d = vec![0u8; plen - 24];
    s.read_exact(&mut d).unwrap();
    (h[0], h, d)
}

fn cqe_cid(h: &[u8; 24]) -> u16 {
    u16::from_le_bytes(h[20..22].try_into().unwrap())
}

fn block(i: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8)
        .collect()
}

#[test]
fn many_commands_in_flight_on_one_queue_complete_with_the_right_data() {
    for backing in Backing::ALL {
        many_commands_in_flight(backing);
    }
}

fn many_commands_in_flight(backing: Backing) {
    let (t, port) = target_with_listener();
    backing.create(&t, "M0", 1024, 4096);
    t.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "M0"}}),
    );
    let (_admin, mut io) = connected_queues(port);
    let s = &mut io.s;

    // 100 writes in one burst (one TCP write), then 100 reads likewise.
    let mut burst = Vec::new();
    for i in 0..100u16 {
        let sqe = rw(0x01, i, i as u64 * 3, 1, 4096, true);
        burst.extend_from_slice(&capsule(sqe, &block(i as u64)));
    }
    s.write_all(&burst).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 100 {
        let (ty, h, _) = read_pdu(s);
        assert_eq!(ty, 0x05);
        assert_eq!(
            status(&h[8..24].try_into().unwrap()),
            (0, 0),
            "write to {backing:?}"
        );
        assert!(seen.insert(cqe_cid(&h)), "one completion per command");
    }
    for i in 0..100u16 {
        send_capsule(s, rw(0x02, 1000 + i, i as u64 * 3, 1, 4096, false), &[]);
    }
    let mut data: std::collections::HashMap<u16, Vec<u8>> = Default::default();
    let mut done = 0;
    while done < 100 {
        match read_pdu(s) {
            (0x07, h, d) => {
                let cid = u16::from_le_bytes(h[8..10].try_into().unwrap());
                data.entry(cid).or_default().extend_from_slice(&d);
            }
            (0x05, h, _) => {
                assert_eq!(status(&h[8..24].try_into().unwrap()), (0, 0));
                let cid = cqe_cid(&h);
                assert_eq!(data[&cid], block(cid as u64 - 1000), "read {cid}");
                done += 1;
            }
            (t, ..) => panic!("unexpected PDU {t:#x}"),
        }
    }

    // An R2T write in flight while reads pass it: its capsule, then a read;
    // the read's data may arrive before we answer the R2T.
    let big: Vec<u8> = block(7).into_iter().chain(block(8)).collect();
    send_capsule(s, rw(0x01, 500, 600, 2, 8192, false), &[]);
    send_capsule(s, rw(0x02, 501, 3, 1, 4096, false), &[]);
    let mut r2t = None;
    let mut read_ok = false;
    while r2t.is_none() || !read_ok {
        match read_pdu(s) {
            (0x09, h, _) => r2t = Some(h),
            (0x07, h, d) => {
                assert_eq!(u16::from_le_bytes(h[8..10].try_into().unwrap()), 501);
                assert_eq!(d, block(1));
            }
            (0x05, h, _) => {
                assert_eq!(cqe_cid(&h), 501);
                read_ok = true;
            }
            (t, ..) => panic!("unexpected PDU {t:#x}"),
        }
    }
    let h = r2t.unwrap();
    let ttag = u16::from_le_bytes(h[10..12].try_into().unwrap());
    let mut d = vec![0u8; 24 + big.len()];
    d[0] = 0x06;
    d[1] = 0x04;
    d[2] = 24;
    d[3] = 24;
    d[4..8].copy_from_slice(&((24 + big.len()) as u32).to_le_bytes());
    d[8..10].copy_from_slice(&500u16.to_le_bytes());
    d[10..12].copy_from_slice(&ttag.to_le_bytes());
    d[16..20].copy_from_slice(&(big.len() as u32).to_le_bytes());
    d[24..].copy_from_slice(&big);
    s.write_all(&d).unwrap();
    let (ty, h, _) = read_pdu(s);
    assert_eq!((ty, cqe_cid(&h)), (0x05, 500));
    assert_eq!(status(&h[8..24].try_into().unwrap()), (0, 0));

    // Compare: equal data succeeds, different data is a Compare Failure.
    let c = io.write_r2t(rw(0x05, 601, 600, 2, 8192, false), &big);
    assert_eq!(status(&c), (0, 0), "compare of equal data");
    let mut other = big.clone();
    other[5000] ^= 1;
    let c = io.write_r2t(rw(0x05, 602, 600, 2, 8192, false), &other);
    assert_eq!(status(&c), (2, 0x85), "compare failure");
    let (_, c) = io.cmd(rw(0x05, 603, 3, 1, 4096, true), &block(1));
    assert_eq!(status(&c), (0, 0), "in-capsule compare");
}

#[test]
fn in_capsule_writes_held_by_a_slow_bdev_keep_their_data() {
    for backing in Backing::ALL {
        in_capsule_writes_held_by_a_slow_bdev(backing);
    }
}

fn in_capsule_writes_held_by_a_slow_bdev(backing: Backing) {
    // Writes take their data from the receive buffers in place; with a
    // bdev that holds them for milliseconds, a burst pins every buffer the
    // connection may have and the rest must fall back to copies — all of
    // it landing intact (bounced where the bdev needs aligned data).
    let (t, port) = target_with_listener();
    backing.create(&t, "M0", 1024, 4096);
    t.ok(
        "bdev_delay_create",
        json!({"name": "D0", "base_bdev_name": "M0", "avg_read_latency": 0, "p99_read_latency": 0,
               "avg_write_latency": 3000, "p99_write_latency": 3000}),
    );
    t.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "D0"}}),
    );
    let (_admin, mut io) = connected_queues(port);
    for round in 0..3u64 {
        let mut burst = Vec::new();
        for i in 0..120u16 {
            let sqe = rw(0x01, i, i as u64 * 5 + round, 1, 4096, true);
            burst.extend_from_slice(&capsule(sqe, &block(i as u64 + round * 1000)));
        }
        io.s.write_all(&burst).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 120 {
            let (ty, h, _) = read_pdu(&mut io.s);
            assert_eq!(ty, 0x05);
            assert_eq!(status(&h[8..24].try_into().unwrap()), (0, 0), "{backing:?}");
            assert!(seen.insert(cqe_cid(&h)));
        }
        for i in 0..120u16 {
            let (data, c) = io.cmd(rw(0x02, 500 + i, i as u64 * 5 + round, 1, 4096, false), &[]);
            assert_eq!(status(&c), (0, 0));
            assert_eq!(
                data,
                block(i as u64 + round * 1000),
                "round {round} block {i}"
            );
        }
    }
}
