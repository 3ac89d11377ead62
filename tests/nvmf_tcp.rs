//! NVMe/TCP connection initialisation and malformed input against the real
//! target, from a raw TCP client: ICReq gets an ICResp with digests echoed;
//! bad PDUs get a C2HTermReq with the spec's FES/FEI and the connection
//! closes; other connections keep working.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Target;
use serde_json::json;

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";

fn target_with_listener() -> (Target, u16) {
    let t = Target::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
