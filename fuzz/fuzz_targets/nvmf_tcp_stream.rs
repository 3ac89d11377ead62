//! Fuzzes the NVMe/TCP target's receive path and command dispatch with the
//! real code: an in-process target (one reactor, a malloc namespace, a
//! listener on loopback) gets each input as the byte stream of a fresh
//! connection, after a valid prefix chosen by the input's first byte
//! (nothing, ICReq, or ICReq + admin Connect, or ICReq + I/O Connect), so
//! the fuzzer reaches the states behind connection set-up. After every
//! input, a new connection must still get its ICResp: a target that
//! crashed, hung or stopped accepting fails the run.

#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nvmf::initiator::connect_command;
use nvmf::wire::fabrics::CNTLID_DYNAMIC;
use nvmf::wire::pdu::{
    encode_capsule_cmd, Digests, IcReq, CAPSULE_CMD_HLEN, DIGEST_BYTES, IC_BYTES,
};

const NQN: &str = "nqn.2016-06.io.ferroplane:fuzz";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000f0220";

fn port() -> u16 {
    std::env::var("FERROPLANE_FUZZ_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(4499)
}

/// Starts the in-process target once.
fn target() -> SocketAddr {
    static TARGET: OnceLock<SocketAddr> = OnceLock::new();
    *TARGET.get_or_init(|| {
        let addr: SocketAddr = ([127, 0, 0, 1], port()).into();
        let config = format!(
            r#"{{"subsystems":[{{"subsystem":"bdev","config":[
              {{"method":"bdev_malloc_create","params":{{"name":"Fuzz0","num_blocks":256,"block_size":512}}}}]}},
             {{"subsystem":"nvmf","config":[
              {{"method":"nvmf_create_transport","params":{{"trtype":"TCP"}}}},
              {{"method":"nvmf_create_subsystem","params":{{"nqn":"{NQN}","allow_any_host":true}}}},
              {{"method":"nvmf_subsystem_add_ns","params":{{"nqn":"{NQN}","namespace":{{"bdev_name":"Fuzz0","nsid":1}}}}}},
              {{"method":"nvmf_subsystem_add_listener","params":{{"nqn":"{NQN}","listen_address":{{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{}"}}}}}}]}}]}}"#,
            addr.port()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cores = reactor::CoreSet::parse_mask("0x1").expect("core 0");
            let rt = reactor::Runtime::start(reactor::RuntimeConfig::new(cores), move || async move {
                let mut table = bdev::rpc::RpcTable::new();
                bdev::register_rpcs(&mut table);
                nvmf::register_rpcs(&mut table);
                let table = Rc::new(table);
                let entries = bdev::config::parse(&config).expect("fuzz config");
                let r = bdev::config::apply(&table, entries, bdev::rpc::RpcState::Runtime, false).await;
                let _ = tx.send(r.map(|_| ()));
                // Keep the table (and so the methods) alive for the run.
                std::future::pending::<()>().await;
            })
            .expect("start reactor");
            rt.join();
        });
        match rx.recv() {
            Ok(Ok(())) => addr,
            other => panic!("fuzz target did not start: {other:?}"),
        }
    })
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

fn connect(qid: u16, cntlid: u16) -> Vec<u8> {
    let kato = if qid == 0 { 5000 } else { 0 };
    let (sqe, data) = connect_command(qid, 31, kato, cntlid, NQN, HOSTNQN);
    let mut hdr = [0u8; CAPSULE_CMD_HLEN + DIGEST_BYTES];
    let n = encode_capsule_cmd(&mut hdr, &sqe, data.len(), Digests::default());
    let mut out = hdr[..n].to_vec();
    out.extend_from_slice(&data);
    out
}

/// Reads until the target closes or goes quiet.
fn drain(s: &mut TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

fn alive(addr: SocketAddr) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect("target stopped accepting");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(&icreq()).expect("send ICReq");
    let mut resp = [0u8; IC_BYTES];
    s.read_exact(&mut resp)
        .expect("target stopped answering ICReq");
    assert_eq!(resp[0], 0x01, "ICResp expected");
}

fuzz_target!(|data: &[u8]| {
    let addr = target();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(mut s) = TcpStream::connect(addr) else {
        panic!("connect failed")
    };
    let _ = s.set_nodelay(true);
    let mut prefix = Vec::new();
    if mode % 4 >= 1 {
        prefix.extend_from_slice(&icreq());
    }
    if mode % 4 == 2 {
        prefix.extend_from_slice(&connect(0, CNTLID_DYNAMIC));
    }
    if mode % 4 == 3 {
        // An I/O queue needs a controller: make one on an admin queue kept
        // open for the duration of this input.
        let mut admin = TcpStream::connect(addr).expect("admin connect");
        admin.write_all(&icreq()).expect("admin ICReq");
        admin
            .write_all(&connect(0, CNTLID_DYNAMIC))
            .expect("admin Connect");
        let mut r = [0u8; IC_BYTES + 24];
        let _ = admin.set_read_timeout(Some(Duration::from_secs(5)));
        if admin.read_exact(&mut r).is_ok() {
            let cntlid = u16::from_le_bytes([r[IC_BYTES + 8], r[IC_BYTES + 9]]);
            prefix.extend_from_slice(&icreq());
            prefix.extend_from_slice(&connect(1, cntlid));
        }
        let _ = s.write_all(&prefix);
        let _ = s.write_all(rest);
        let _ = s.shutdown(std::net::Shutdown::Write);
        drain(&mut s);
        drop(admin);
        alive(addr);
        return;
    }
    let _ = s.write_all(&prefix);
    let _ = s.write_all(rest);
    let _ = s.shutdown(std::net::Shutdown::Write);
    drain(&mut s);
    alive(addr);
});
