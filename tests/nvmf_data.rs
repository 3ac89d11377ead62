//! Data through NVMe/TCP over every kind of backing bdev (RAM, a file
//! through io_uring, a file through the aio RPC — both O_DIRECT), with and
//! without header and data digests, many commands in flight: in-capsule
//! writes (which the target hands to the bdev from its receive buffer,
//! bounced where the bdev needs aligned data), R2T writes of several
//! H2CData PDUs, reads, and compare. Driven by the in-tree host.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::{Backing, Target};
use nvmf::initiator::{HostPdu, HostQueue};
use nvmf::wire::nvme::Sqe;
use nvmf::wire::pdu::Digests;
use serde_json::json;

const NQN: &str = "nqn.2016-06.io.spdk:data";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5b4e28ba-2fa1-11d2-883f-0016d3cca427";
const BS: usize = 4096;
const BLOCKS: u64 = 4096;

fn export(t: &Target, backing: Backing) -> SocketAddr {
    backing.create(t, "D0", BLOCKS, BS as u32);
    export_bdev(t, "D0")
}

/// Exports bdev `name` as namespace 1 of `NQN` on a free port.
fn export_bdev(t: &Target, name: &str) -> SocketAddr {
    t.export_tcp(NQN, name)
}

fn block_data(lba: u64, seed: u8) -> Vec<u8> {
    (0..BS as u64)
        .map(|j| (lba.wrapping_mul(131) ^ j.wrapping_mul(7) ^ seed as u64) as u8)
        .collect()
}

fn rw(opcode: u8, cid: u16, slba: u64, nlb: u32, in_capsule: bool) -> Sqe {
    common::rw_sqe(opcode, cid, slba, nlb, BS as u32, in_capsule)
}

/// Runs every command of `cmds` (sqe, data to send) with all of them in
/// flight at once; returns each command's status and read data by cid.
fn run_batch(io: &mut HostQueue, cmds: &[(Sqe, Vec<u8>)]) -> HashMap<u16, (bool, Vec<u8>)> {
    let by_cid: HashMap<u16, &Vec<u8>> = cmds.iter().map(|(s, d)| (s.cid(), d)).collect();
    for (sqe, data) in cmds {
        let in_capsule = sqe.sgl().is_in_capsule();
        io.send(sqe, if in_capsule { data } else { &[] }).unwrap();
    }
    io.flush().unwrap();
    let mut out: HashMap<u16, (bool, Vec<u8>)> = HashMap::new();
    let mut reads: HashMap<u16, Vec<u8>> = HashMap::new();
    while out.len() < cmds.len() {
        match io.recv().unwrap() {
            HostPdu::Resp(c) => {
                let d = reads.remove(&c.cid()).unwrap_or_default();
                assert!(
                    out.insert(c.cid(), (c.status().is_success(), d)).is_none(),
                    "one completion per command"
                );
            }
            HostPdu::Data(cid, off, _) => {
                let d = reads.entry(cid).or_default();
                assert_eq!(off as usize, d.len(), "C2HData in order");
                d.extend_from_slice(io.data());
            }
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

fn exercise(backing: Backing, digests: Digests) {
    let t = Target::start();
    let addr = export(&t, backing);
    let admin = HostQueue::connect(addr, NQN, HOSTNQN, 0, 0, 31, digests).unwrap();
    let mut io = HostQueue::connect(addr, NQN, HOSTNQN, 1, admin.cntlid, 127, digests).unwrap();
    let what = format!("{backing:?} digests {digests:?}");
    // 96 in-capsule 4 KiB writes, 16 R2T writes of 32 KiB (MAXH2CDATA
    // splits them into several H2CData PDUs), all in flight at once.
    let mut cmds = Vec::new();
    let mut expect: HashMap<u64, Vec<u8>> = HashMap::new();
    for i in 0..96u16 {
        let lba = i as u64 * 3;
        let d = block_data(lba, 1);
        expect.insert(lba, d.clone());
        cmds.push((rw(0x01, i, lba, 1, true), d));
    }
    for i in 0..16u16 {
        let lba = 1000 + i as u64 * 8;
        let mut d = Vec::new();
        for k in 0..8 {
            let b = block_data(lba + k, 2);
            expect.insert(lba + k, b.clone());
            d.extend(b);
        }
        cmds.push((rw(0x01, 200 + i, lba, 8, false), d));
    }
    for (cid, (ok, _)) in run_batch(&mut io, &cmds) {
        assert!(ok, "{what}: write cid {cid} failed");
    }
    // Reads of all of it, 64 in flight, single blocks and 32 KiB ones.
    let mut cmds = Vec::new();
    for i in 0..96u16 {
        cmds.push((rw(0x02, 300 + i, i as u64 * 3, 1, false), Vec::new()));
    }
    for i in 0..16u16 {
        cmds.push((rw(0x02, 500 + i, 1000 + i as u64 * 8, 8, false), Vec::new()));
    }
    for (cid, (ok, data)) in run_batch(&mut io, &cmds) {
        assert!(ok, "{what}: read cid {cid} failed");
        let (lba, n) = if cid < 500 {
            ((cid - 300) as u64 * 3, 1)
        } else {
            (1000 + (cid - 500) as u64 * 8, 8)
        };
        let want: Vec<u8> = (0..n).flat_map(|k| expect[&(lba + k)].clone()).collect();
        assert!(data == want, "{what}: read cid {cid} at {lba} differs");
    }
    // Compare: in-capsule and by R2T, equal and different.
    let same = expect[&0].clone();
    let mut other = same.clone();
    other[100] ^= 0xFF;
    let big: Vec<u8> = (0..8).flat_map(|k| expect[&(1000 + k)].clone()).collect();
    let cmds = vec![
        (rw(0x05, 700, 0, 1, true), same),
        (rw(0x05, 701, 0, 1, true), other),
        (rw(0x05, 702, 1000, 8, false), big),
    ];
    let res = run_batch(&mut io, &cmds);
    assert!(
        res[&700].0 && !res[&701].0 && res[&702].0,
        "{what}: compare"
    );
    // The bytes are on the bdev itself (read past the target's data path).
    let r = t.ok(
        "bdev_read",
        json!({"name": "D0", "offset_blocks": 1008, "num_blocks": 8}),
    );
    let want: Vec<u8> = (0..8).flat_map(|k| expect[&(1008 + k)].clone()).collect();
    assert_eq!(r["data"].as_str().unwrap(), common::hex(&want), "{what}");
    drop(io);
    drop(admin);
}

#[test]
fn data_round_trips_over_every_backing_without_digests() {
    for backing in Backing::ALL {
        exercise(backing, Digests::default());
    }
}

#[test]
fn data_round_trips_over_every_backing_with_digests() {
    for backing in Backing::ALL {
        exercise(
            backing,
            Digests {
                header: true,
                data: true,
            },
        );
    }
}

#[test]
fn a_module_short_of_resources_is_retried_not_failed_to_the_host() {
    // A bdev that refuses I/O with NoMemory (an error bdev injecting it)
    // under a host with many commands in flight: the bdev layer queues and
    // resubmits them (io_wait); the host sees every command succeed.
    let t = Target::start();
    Backing::UringFile.create(&t, "D0", BLOCKS, BS as u32);
    t.ok("bdev_error_create", json!({"base_name": "D0"}));
    let addr = export_bdev(&t, "EE_D0");
    let admin = HostQueue::connect(addr, NQN, HOSTNQN, 0, 0, 31, Digests::default()).unwrap();
    let mut io =
        HostQueue::connect(addr, NQN, HOSTNQN, 1, admin.cntlid, 127, Digests::default()).unwrap();
    // (Examine has read the bdev already: count from here.)
    let before = t.ok("bdev_get_iostat", json!({"name": "EE_D0"}))["bdevs"][0].clone();
    for io_type in ["write", "read"] {
        t.ok(
            "bdev_error_inject_error",
            json!({"name": "EE_D0", "io_type": io_type, "error_type": "nomem", "num": 40}),
        );
    }
    let writes: Vec<(Sqe, Vec<u8>)> = (0..32u16)
        .map(|i| {
            (
                rw(0x01, i, i as u64, 1, i % 2 == 0),
                block_data(i as u64, 5),
            )
        })
        .collect();
    for (cid, (ok, _)) in run_batch(&mut io, &writes) {
        assert!(ok, "write cid {cid} failed");
    }
    let reads: Vec<(Sqe, Vec<u8>)> = (0..32u16)
        .map(|i| (rw(0x02, 100 + i, i as u64, 1, false), Vec::new()))
        .collect();
    for (cid, (ok, data)) in run_batch(&mut io, &reads) {
        assert!(ok, "read cid {cid} failed");
        assert!(data == block_data(cid as u64 - 100, 5), "read cid {cid}");
    }
    let st = t.ok("bdev_get_iostat", json!({"name": "EE_D0"}));
    let b = &st["bdevs"][0];
    let ops = |k: &str| b[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(
        (ops("num_write_ops"), ops("num_read_ops")),
        (32, 32),
        "{st}"
    );
    assert_eq!(
        b["io_error"]["nomem"], 80,
        "every refusal was retried: {st}"
    );
}
