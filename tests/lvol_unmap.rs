//! Unmap and write-zeroes of whole clusters give a thin lvol's clusters
//! back to its store, through the real binary: counts, zeros, allocation
//! again; partial clusters, thick lvols and clones keep theirs; and under
//! NVMe/TCP load from two queues (two cores) a release never lets a write
//! in flight land in another lvol's cluster.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backing, Target};
use nvmf::initiator::{HostPdu, HostQueue};
use nvmf::wire::nvme::{SglDescriptor, Sqe, FLAGS_PSDT_SGL};
use nvmf::wire::pdu::Digests;
use serde_json::json;

const BS: usize = 4096;
const CLUSTER: usize = 1 << 20;
const CB: u64 = (CLUSTER / BS) as u64;
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5b4e28ba-2fa1-11d2-883f-0016d3cca427";

fn store_on(t: &Target, base: &str) {
    t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": base, "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
    );
}

fn free(t: &Target) -> u64 {
    t.ok("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"}))[0]["free_clusters"]
        .as_u64()
        .unwrap()
}

fn allocated(t: &Target, name: &str) -> u64 {
    t.ok("bdev_get_bdevs", json!({"name": name}))[0]["driver_specific"]["lvol"]
        ["num_allocated_clusters"]
        .as_u64()
        .unwrap()
}

fn create(t: &Target, name: &str, mib: u64, thin: bool) {
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": name, "size_in_mib": mib, "thin_provision": thin}),
    );
}

fn write(t: &Target, name: &str, lba: u64, data: &[u8]) {
    common::write_blocks(t, name, lba, data, BS)
}

fn read(t: &Target, name: &str, lba: u64, blocks: usize) -> Vec<u8> {
    common::read_blocks(t, name, lba, blocks)
}

fn command(t: &Target, name: &str, io_type: &str, lba: u64, blocks: u64) {
    t.ok(
        "bdev_io_command",
        json!({"name": name, "io_type": io_type, "offset_blocks": lba, "num_blocks": blocks}),
    );
}

fn zeros(len: usize) -> Vec<u8> {
    vec![0; len]
}

fn check_clean(t: &Target) {
    let c = t.ok("bdev_lvol_check_lvstore", json!({"lvs_name": "lvs0"}));
    assert_eq!(c["clean"], true, "{c}");
}

fn releases_whole_clusters(backing: Backing) {
    let t = Target::start();
    backing.create(&t, "B0", 64 * CB, BS as u32);
    store_on(&t, "B0");
    let f0 = free(&t);
    create(&t, "thin", 8, true);
    create(&t, "thick", 4, false);
    let v = "lvs0/thin";
    let data = common::pattern(4 * CLUSTER, 7);
    write(&t, v, 0, &data);
    assert_eq!(allocated(&t, v), 4);
    assert_eq!(free(&t), f0 - 8);

    // Unmap of clusters 0 and 1 (and half of 2): 0 and 1 go back.
    command(&t, v, "unmap", 0, 2 * CB + CB / 2);
    assert_eq!(allocated(&t, v), 2, "{backing:?}");
    assert_eq!(free(&t), f0 - 6);
    assert_eq!(read(&t, v, 0, 2 * CB as usize), zeros(2 * CLUSTER));
    // The half of cluster 2 reads zeros, its other half is kept.
    assert_eq!(read(&t, v, 2 * CB, CB as usize / 2), zeros(CLUSTER / 2));
    assert!(
        read(&t, v, 2 * CB + CB / 2, CB as usize / 2)
            == data[2 * CLUSTER + CLUSTER / 2..3 * CLUSTER]
    );

    // Write-zeroes of cluster 3 exactly: released too; of a part of
    // cluster 2: kept.
    command(&t, v, "write_zeroes", 3 * CB, CB);
    assert_eq!(allocated(&t, v), 1);
    command(&t, v, "write_zeroes", 2 * CB + 1, CB - 1);
    assert_eq!(allocated(&t, v), 1);
    assert_eq!(free(&t), f0 - 5);
    assert_eq!(read(&t, v, 2 * CB, 4 * CB as usize), zeros(4 * CLUSTER));

    // An unmap of clusters never written changes nothing.
    command(&t, v, "unmap", 4 * CB, 4 * CB);
    assert_eq!(allocated(&t, v), 1);

    // A later write allocates again (a fresh, zeroed cluster).
    let again = common::pattern(BS * 8, 9);
    write(&t, v, CB + 16, &again);
    assert_eq!(allocated(&t, v), 2);
    assert_eq!(free(&t), f0 - 6);
    let back = read(&t, v, CB, CB as usize);
    assert!(back[16 * BS..24 * BS] == again[..]);
    assert!(back[..16 * BS]
        .iter()
        .chain(&back[24 * BS..])
        .all(|&b| b == 0));

    // A thick lvol keeps its clusters (and reads zeros where unmapped).
    let tk = "lvs0/thick";
    write(&t, tk, 0, &data[..CLUSTER]);
    command(&t, tk, "unmap", 0, 4 * CB);
    assert_eq!(allocated(&t, tk), 4);
    assert_eq!(free(&t), f0 - 6);
    command(&t, tk, "write_zeroes", 0, CB);
    assert_eq!(read(&t, tk, 0, 8), zeros(8 * BS));
    check_clean(&t);
}

#[test]
fn whole_cluster_unmap_and_write_zeroes_release_a_thin_lvols_clusters() {
    for b in [Backing::Malloc, Backing::UringFile] {
        releases_whole_clusters(b);
    }
}

#[test]
fn a_clone_keeps_its_clusters_and_its_parents_data() {
    let t = Target::start();
    Backing::Malloc.create(&t, "B0", 64 * CB, BS as u32);
    store_on(&t, "B0");
    create(&t, "origin", 4, true);
    let data = common::pattern(4 * CLUSTER, 3);
    write(&t, "lvs0/origin", 0, &data);
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/origin", "snapshot_name": "snap"}),
    );
    t.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs0/snap", "clone_name": "clone"}),
    );
    let c = "lvs0/clone";
    let own = common::pattern(CLUSTER, 5);
    write(&t, c, 0, &own);
    assert_eq!(allocated(&t, c), 1);
    let f = free(&t);
    // Unmap of every cluster of the clone: nothing is released; where it
    // did not write, its parent's data still shows.
    command(&t, c, "unmap", 0, 4 * CB);
    assert_eq!(allocated(&t, c), 1);
    assert_eq!(free(&t), f);
    assert!(read(&t, c, CB, CB as usize) == data[CLUSTER..2 * CLUSTER]);
    // Write-zeroes of a parent's cluster allocates it in the clone, zeroed.
    command(&t, c, "write_zeroes", 2 * CB, CB);
    assert_eq!(allocated(&t, c), 2);
    assert_eq!(read(&t, c, 2 * CB, CB as usize), zeros(CLUSTER));
    // The origin (now a clone of the snapshot too) keeps its clusters.
    command(&t, "lvs0/origin", "unmap", 0, 4 * CB);
    assert_eq!(free(&t), f - 1);
    assert!(read(&t, "lvs0/snap", 0, 4 * CB as usize) == data);
    check_clean(&t);
}

// ---- NVMe/TCP under load ----

fn rw(opcode: u8, cid: u16, slba: u64, nlb: u32, in_capsule: bool) -> Sqe {
    common::rw_sqe(opcode, cid, slba, nlb, BS as u32, in_capsule)
}

fn write_zeroes(cid: u16, slba: u64, nlb: u32) -> Sqe {
    let mut sqe = Sqe::default();
    sqe.set_opcode(0x08)
        .set_cid(cid)
        .set_nsid(1)
        .set_rw(slba, nlb);
    sqe
}

/// DSM deallocate of one range; its range list is the data.
fn dsm(cid: u16, slba: u64, nlb: u32) -> (Sqe, Vec<u8>) {
    let mut sqe = Sqe::default();
    sqe.set_opcode(0x09)
        .set_flags(FLAGS_PSDT_SGL)
        .set_cid(cid)
        .set_nsid(1)
        .set_cdw(10, 0)
        .set_cdw(11, 0x4)
        .set_sgl(SglDescriptor::in_capsule(0, 16));
    let mut r = vec![0u8; 16];
    r[4..8].copy_from_slice(&nlb.to_le_bytes());
    r[8..16].copy_from_slice(&slba.to_le_bytes());
    (sqe, r)
}

/// Runs `cmds` all in flight at once; each command's status and read data
/// by cid.
fn run_batch(io: &mut HostQueue, cmds: &[(Sqe, Vec<u8>)]) -> HashMap<u16, (bool, Vec<u8>)> {
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
                out.insert(c.cid(), (c.status().is_success(), d));
            }
            HostPdu::Data(cid, off, _) => {
                let d = reads.entry(cid).or_default();
                assert_eq!(off as usize, d.len());
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

fn connect(addr: SocketAddr, nqn: &str) -> (HostQueue, HostQueue) {
    let d = Digests::default();
    let admin = HostQueue::connect(addr, nqn, HOSTNQN, 0, 0, 31, d).unwrap();
    let io = HostQueue::connect(addr, nqn, HOSTNQN, 1, admin.cntlid, 127, d).unwrap();
    (admin, io)
}

/// A block of lvol A at `lba`: stamped so that any reader can tell whose
/// and which block it is.
fn a_block(lba: u64, seed: u8) -> Vec<u8> {
    let mut b = vec![0xAA; BS];
    b[0] = b'A';
    b[1..9].copy_from_slice(&lba.to_le_bytes());
    b[9] = seed;
    b
}

/// What a read of lvol A at `lba` may return: zeros, or a block A wrote
/// there (never one it wrote elsewhere, never B's).
fn check_a(lba: u64, got: &[u8]) {
    for (k, blk) in got.chunks(BS).enumerate() {
        let at = lba + k as u64;
        let zero = blk.iter().all(|&b| b == 0);
        let own =
            blk[0] == b'A' && blk[1..9] == at.to_le_bytes() && blk[10..].iter().all(|&b| b == 0xAA);
        assert!(
            zero || own,
            "lvol A block {at} holds {:02x?}: another block's data",
            &blk[..16]
        );
    }
}

/// Block `lba` of lvol B in round `round`.
fn b_block(lba: u64, round: u32) -> Vec<u8> {
    let mut b = common::pattern(BS, (lba as u8).wrapping_add(round as u8));
    b[0] = b'B';
    b[1..9].copy_from_slice(&lba.to_le_bytes());
    b[9..13].copy_from_slice(&round.to_le_bytes());
    b
}

/// Clusters of each lvol the load touches.
const LOAD_CLUSTERS: u64 = 4;

/// Lvol A gets single-block writes, whole-cluster unmaps (one queue) or
/// write-zeroes (the other) and reads of the same clusters, all in flight
/// together, round after round; until `stop`.
fn hammer_a(mut io: HostQueue, unmap: bool, stop: Arc<AtomicBool>) -> u64 {
    let mut rounds = 0u64;
    let mut seed = 0u8;
    while !stop.load(Ordering::Relaxed) {
        let mut cmds = Vec::new();
        let mut reads = HashMap::new();
        let mut cid = 0u16;
        for c in 0..LOAD_CLUSTERS {
            for k in 0..40u64 {
                seed = seed.wrapping_add(1);
                let lba = c * CB + (k * 37 + rounds * 11 + unmap as u64 * 5) % CB;
                if k % 5 == 4 {
                    cmds.push((rw(0x02, cid, lba, 1, false), Vec::new()));
                    reads.insert(cid, lba);
                } else {
                    cmds.push((rw(0x01, cid, lba, 1, true), a_block(lba, seed)));
                }
                cid += 1;
                if k == 20 {
                    if unmap {
                        cmds.push(dsm(cid, c * CB, CB as u32));
                    } else {
                        cmds.push((write_zeroes(cid, c * CB, CB as u32), Vec::new()));
                    }
                    cid += 1;
                }
            }
        }
        for (cid, (ok, data)) in run_batch(&mut io, &cmds) {
            assert!(ok, "lvol A: command {cid} failed");
            if let Some(&lba) = reads.get(&cid) {
                check_a(lba, &data);
            }
        }
        rounds += 1;
    }
    rounds
}

/// Lvol A gets single-block writes with `QD` always in flight (not in
/// rounds, so some arrive while a release is under way), until `stop`.
fn stream_a(mut io: HostQueue, stop: Arc<AtomicBool>) -> u64 {
    const QD: u16 = 16;
    let mut n = 0u64;
    let mut in_flight = 0;
    let mut next = |cid: u16, io: &mut HostQueue| {
        n += 1;
        let lba = (n * 7919) % (LOAD_CLUSTERS * CB);
        io.send(&rw(0x01, cid, lba, 1, true), &a_block(lba, n as u8))
            .unwrap();
        io.flush().unwrap();
    };
    for cid in 0..QD {
        next(cid, &mut io);
        in_flight += 1;
    }
    while in_flight > 0 {
        match io.recv().unwrap() {
            HostPdu::Resp(c) => {
                assert!(c.status().is_success(), "lvol A: streamed write failed");
                if stop.load(Ordering::Relaxed) {
                    in_flight -= 1;
                } else {
                    next(c.cid(), &mut io);
                }
            }
            _ => panic!("unexpected PDU"),
        }
    }
    n
}

/// Lvol B: each round writes its clusters whole (they were released at
/// the end of the round before, so they are allocated afresh, often from
/// clusters A just gave back), waits out A's slowest writes, reads them
/// back, then unmaps them.
fn cycle_b(io: &mut HostQueue, round: u32, settle: Duration) {
    let mut cmds = Vec::new();
    let mut expect = Vec::new();
    for c in 0..LOAD_CLUSTERS {
        for k in 0..CB / 32 {
            let lba = c * CB + k * 32;
            let d: Vec<u8> = (0..32).flat_map(|j| b_block(lba + j, round)).collect();
            expect.push((lba, d.clone()));
            cmds.push((rw(0x01, cmds.len() as u16, lba, 32, false), d));
        }
    }
    for (cid, (ok, _)) in run_batch(io, &cmds) {
        assert!(ok, "lvol B: write {cid} failed");
    }
    std::thread::sleep(settle);
    let cmds: Vec<(Sqe, Vec<u8>)> = expect
        .iter()
        .enumerate()
        .map(|(i, (lba, _))| (rw(0x02, i as u16, *lba, 32, false), Vec::new()))
        .collect();
    let res = run_batch(io, &cmds);
    for (i, (lba, want)) in expect.iter().enumerate() {
        let (ok, got) = &res[&(i as u16)];
        assert!(ok, "lvol B: read at {lba} failed");
        if got != want {
            let bad = got
                .chunks(BS)
                .zip(want.chunks(BS))
                .position(|(g, w)| g != w)
                .unwrap();
            let g = &got[bad * BS..bad * BS + 16];
            panic!(
                "lvol B round {round}: block {} holds {:02x?}, not its own data{}",
                lba + bad as u64,
                g,
                if got[bad * BS] == b'A' {
                    " (lvol A's write landed in B's cluster)"
                } else {
                    ""
                }
            );
        }
    }
    let cmds: Vec<(Sqe, Vec<u8>)> = (0..LOAD_CLUSTERS)
        .map(|c| dsm(c as u16, c * CB, CB as u32))
        .collect();
    for (cid, (ok, _)) in run_batch(io, &cmds) {
        assert!(ok, "lvol B: unmap {cid} failed");
    }
}

#[test]
fn releases_under_load_never_let_a_write_land_in_another_lvol() {
    let t = Target::start_with(&["--cpus", "0,1"]);
    // A slow tail: one write in a hundred lands P99_US late, so writes
    // are in flight to a cluster long after its release was asked for.
    const P99_US: u64 = 150_000;
    // A small store: released clusters are reused at once.
    Backing::Malloc.create(&t, "M0", 12 * CB, BS as u32);
    t.ok(
        "bdev_delay_create",
        json!({"name": "D0", "base_bdev_name": "M0",
        "avg_read_latency": 0, "p99_read_latency": 0,
        "avg_write_latency": 0, "p99_write_latency": P99_US, "hold_writes": true}),
    );
    store_on(&t, "D0");
    create(&t, "a", 4, true);
    create(&t, "b", 4, true);
    let addr_a = t.export_tcp("nqn.2016-06.io.spdk:a", "lvs0/a");
    let addr_b = t.export_tcp("nqn.2016-06.io.spdk:b", "lvs0/b");
    let stop = Arc::new(AtomicBool::new(false));
    let mut hammers = Vec::new();
    let mut admins = Vec::new();
    for unmap in [true, false] {
        // Each connection's queue is placed on a core of its own in turn.
        let (admin, io) = connect(addr_a, "nqn.2016-06.io.spdk:a");
        admins.push(admin);
        let stop = stop.clone();
        hammers.push(std::thread::spawn(move || hammer_a(io, unmap, stop)));
    }
    let (admin, io) = connect(addr_a, "nqn.2016-06.io.spdk:a");
    admins.push(admin);
    let streamer = {
        let stop = stop.clone();
        std::thread::spawn(move || stream_a(io, stop))
    };
    let (_admin_b, mut io_b) = connect(addr_b, "nqn.2016-06.io.spdk:b");
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut round = 0;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        while Instant::now() < deadline {
            cycle_b(&mut io_b, round, Duration::from_micros(2 * P99_US));
            round += 1;
        }
    }));
    stop.store(true, Ordering::Relaxed);
    let rounds: Vec<u64> = hammers.into_iter().map(|h| h.join().unwrap()).collect();
    let streamed = streamer.join().unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
    assert!(
        round >= 3 && rounds.iter().all(|&r| r > 5) && streamed > 100,
        "rounds of B {round}, of A {rounds:?}, streamed writes {streamed}"
    );
    // What A holds now: its own blocks or zeros, everywhere (a write that
    // landed late in a cluster A got again would show here).
    let (_admin, mut io) = connect(addr_a, "nqn.2016-06.io.spdk:a");
    let cmds: Vec<(Sqe, Vec<u8>)> = (0..LOAD_CLUSTERS * CB / 32)
        .map(|i| (rw(0x02, i as u16, i * 32, 32, false), Vec::new()))
        .collect();
    for (cid, (ok, data)) in run_batch(&mut io, &cmds) {
        assert!(ok);
        check_a(cid as u64 * 32, &data);
    }
    // B released everything at the end of its last round.
    let d = &t.ok("bdev_get_bdevs", json!({"name": "lvs0/b"}))[0]["driver_specific"]["lvol"];
    assert_eq!(d["num_allocated_clusters"], 0, "{d}");
    check_clean(&t);
}
