//! raid1 durability across a crash (SPEC §4; issue 10): a write that one
//! member lost is acknowledged only once the superblock on the survivors
//! records that member's failure. So when the target is killed (SIGKILL)
//! right after acknowledgements, the RAID reassembles degraded at the next
//! start and every acknowledged write reads back; the stale member is
//! rebuilt, never served from.
//!
//! Members are aio bdevs on files in a temp dir, so their data survives
//! the restart (which recreates only those); an error bdev over a member
//! makes it lose writes. After the crash the tests also read the files
//! directly: the survivors' newest superblock must record the failure and
//! hold every acknowledged write.
//!
//! `FERROPLANE_RAID_CRASH_ITERS` (default 2) sets how many crash rounds
//! each concurrent test runs; raise it to loop by hand.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::module::raid::superblock::{self, RaidSuperblock, SlotState};
use common::{hex, unhex, Target};
use nvmf::initiator::{HostPdu, HostQueue};
use nvmf::wire::nvme::{SglDescriptor, Sqe, FLAGS_PSDT_SGL};
use nvmf::wire::pdu::Digests;
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:raid-durability";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:raid-durability";

fn image(dir: &Path, name: &str, bytes: u64) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(bytes).unwrap();
    p.to_string_lossy().into_owned()
}

fn aio(t: &Target, name: &str, file: &str, block_size: u32) {
    t.ok(
        "bdev_aio_create",
        json!({"name": name, "filename": file, "block_size": block_size}),
    );
}

fn raid_info(t: &Target, name: &str) -> Value {
    let all = t.ok("bdev_raid_get_bdevs", json!({"category": "all"}));
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn read(t: &Target, name: &str, off: u64, blocks: u64) -> Vec<u8> {
    let r = t.ok(
        "bdev_read",
        json!({"name": name, "offset_blocks": off, "num_blocks": blocks}),
    );
    unhex(r["data"].as_str().unwrap())
}

fn inject(t: &Target, name: &str, io_type: &str, error_type: &str, num: u32) {
    t.ok(
        "bdev_error_inject_error",
        json!({"name": name, "io_type": io_type, "error_type": error_type, "num": num}),
    );
}

fn write_ops(t: &Target, name: &str) -> u64 {
    t.ok("bdev_get_iostat", json!({"name": name}))["bdevs"][0]["num_write_ops"]
        .as_u64()
        .unwrap()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

fn sigkill(pid: u32) {
    // SAFETY: kill on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// One JSON-RPC call on its own connection that survives the target dying
/// under it: the whole response, or None if the connection ended first.
fn call_or_gone(socket: &Path, method: &str, params: Value) -> Option<Value> {
    call_within(socket, method, params, Duration::from_secs(60))
}

/// As [`call_or_gone`]; None also when no answer came `within`.
fn call_within(socket: &Path, method: &str, params: Value, within: Duration) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    let req = json!({"jsonrpc": "2.0", "method": method, "id": 1, "params": params});
    s.write_all(req.to_string().as_bytes()).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(Ok(v)) = serde_json::Deserializer::from_slice(&buf)
            .into_iter::<Value>()
            .next()
        {
            return Some(v);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The newest valid superblock in a member's file.
fn newest_sb(file: &str, block_size: u32) -> RaidSuperblock {
    let per = superblock::copy_bytes(block_size) as usize;
    let mut head = vec![0u8; 2 * per];
    std::fs::File::open(file)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    RaidSuperblock::newest([&head[..per], &head[per..]])
        .unwrap_or_else(|| panic!("no valid superblock in {file}"))
}

/// Distinct content per unit (its number in every 8 bytes), never zeros:
/// a member that missed the write reads back something else.
fn unit_data(unit: u64, len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| ((unit + 1) << 24 | i as u64).to_le_bytes())
        .collect()
}

/// Member data region as the RAID maps it (raid1: RAID block b is member
/// block data_offset + b).
fn data_offset_bytes(block_size: u32) -> u64 {
    superblock::data_offset_blocks(block_size) * block_size as u64
}

/// The deterministic case. A superblock write is already in flight and
/// stuck (its flush held on EE_U0, which comes first in slot order, so U1
/// has not got it) when EE_U0 starts losing writes; a write that then
/// reaches only U1 must not be acknowledged until a superblock recording
/// EE_U0's failure is on U1. Without the hold it is acknowledged at once,
/// the crash leaves U0 with the newest superblock calling both members
/// current, and after restart the read is served from the stale U0.
#[test]
fn a_write_a_member_lost_is_acknowledged_only_once_the_superblock_records_the_failure() {
    let dir = common::scratch_dir();
    let bs = 512;
    let f0 = image(&dir, "m0.img", 8 << 20);
    let f1 = image(&dir, "m1.img", 8 << 20);
    let at = 64;
    let (old, new) = (unit_data(1, 4096), unit_data(2, 4096));
    let mut t = Target::start();
    aio(&t, "U0", &f0, bs);
    aio(&t, "U1", &f1, bs);
    t.ok(
        "bdev_malloc_create",
        json!({"name": "X", "num_blocks": 16384, "block_size": bs}),
    );
    t.ok("bdev_error_create", json!({"base_name": "U0"}));
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["EE_U0", "U1", "X"], "superblock": true}),
    );
    t.ok(
        "bdev_write",
        json!({"name": "R1", "offset_blocks": at, "data": hex(&old)}),
    );
    // Removing X writes the superblock, EE_U0 first; its flush is held
    // there, and with it the superblock lock.
    inject(&t, "EE_U0", "flush", "pending", 1);
    let before = write_ops(&t, "EE_U0");
    let sock = t.socket.clone();
    let remover = std::thread::spawn(move || {
        call_or_gone(&sock, "bdev_raid_remove_base_bdev", json!({"name": "X"}))
    });
    wait_until(
        "the superblock write to reach EE_U0",
        Duration::from_secs(10),
        || write_ops(&t, "EE_U0") > before,
    );
    inject(&t, "EE_U0", "write", "failure", 1_000_000);
    // The write goes to U1 only (EE_U0 fails it); the target dies the
    // moment it is acknowledged.
    let (tx, rx) = std::sync::mpsc::channel();
    let (sock, pid) = (t.socket.clone(), t.pid());
    let data = hex(&new);
    let writer = std::thread::spawn(move || {
        let r = call_or_gone(
            &sock,
            "bdev_write",
            json!({"name": "R1", "offset_blocks": at, "data": data}),
        );
        if r.as_ref().is_some_and(|v| v.get("result").is_some()) {
            sigkill(pid);
        }
        let _ = tx.send(r);
    });
    let early = rx.recv_timeout(Duration::from_secs(1));
    let held = early.is_err();
    if held {
        // The held flush completes (aborted: EE_U0 is out anyway); the
        // superblock then reaches U1 and the write may be acknowledged.
        let sock = t.socket.clone();
        std::thread::spawn(move || {
            call_or_gone(
                &sock,
                "bdev_error_inject_error",
                json!({"name": "EE_U0", "io_type": "clear", "error_type": "failure"}),
            )
        });
    }
    let reply = match early {
        Ok(r) => r,
        Err(_) => rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the write was never answered"),
    };
    let reply = reply.expect("the target died before answering the write");
    assert_eq!(reply["result"], json!(true), "{reply}");
    writer.join().unwrap();
    let _ = remover.join();
    let _ = t.child.wait();
    drop(t);
    // On disk: U1's superblock is the newest and records the failure.
    let (sb0, sb1) = (newest_sb(&f0, bs), newest_sb(&f1, bs));
    let on_disk = sb1.seq > sb0.seq && sb1.slots[0].state == SlotState::Failed;

    let t = Target::start();
    // Slow rebuild, so the degraded state can be seen.
    t.ok(
        "bdev_raid_set_options",
        json!({"process_max_bandwidth_mb_sec": 1}),
    );
    // The stale member first: alone it looks current.
    aio(&t, "U0", &f0, bs);
    aio(&t, "U1", &f1, bs);
    t.ok("bdev_wait_for_examine", Value::Null);
    assert_eq!(
        read(&t, "R1", at, 8),
        new,
        "the acknowledged write did not read back after the crash: {}",
        raid_info(&t, "R1")
    );
    let info = raid_info(&t, "R1");
    assert_eq!(info["state"], "online", "{info}");
    assert_eq!(info["num_base_bdevs_operational"], 1, "{info}");
    assert_eq!(info["base_bdevs_list"][1]["state"], "operational", "{info}");
    assert_ne!(info["base_bdevs_list"][0]["state"], "operational", "{info}");
    assert!(
        held,
        "the write was acknowledged while no superblock could record the member's failure"
    );
    assert!(on_disk, "after the crash: U0 {sb0:?}\nU1 {sb1:?}");
}

/// A crash round's shape.
struct Crash {
    members: usize,
    /// Slots whose error bdev starts losing writes, one after the other.
    failing: Vec<usize>,
    /// Restart with the survivors' files first (else the stale ones).
    survivors_first: bool,
}

const BLOCK_SIZE: u32 = 4096;
const MEMBER_BYTES: u64 = 32 << 20;
/// One write: 8 KiB, sent by R2T.
const UNIT_BYTES: usize = 8192;
const QUEUES: u16 = 2;
/// Writes in flight per queue.
const QD: u16 = 8;
/// Acknowledged writes before each member starts losing writes.
const ACKS_BEFORE_FAILURE: u64 = 150;
/// Acknowledged writes issued after the last failure before SIGKILL, by
/// round: right after the first, and later ones.
const ACKS_BEFORE_KILL: [u64; 4] = [1, 4, 16, 48];

/// What the writers share.
#[derive(Default)]
struct Progress {
    acked: Mutex<Vec<u64>>,
    acks: AtomicU64,
    /// Set once every failure is injected: writes submitted from then on
    /// lack every failing member.
    all_failing: AtomicBool,
    acks_after: AtomicU64,
    /// Of those, per queue: each must see some (its core released them).
    acks_after_per_queue: [AtomicU64; QUEUES as usize],
    killed: AtomicBool,
    errors: AtomicU64,
    /// The `ACKS_BEFORE_KILL` of this round.
    kill_after: u64,
}

/// I/O queue `qi` writing each unit of `units` once, `QD` at a time; kills
/// `pid` right after the `kill_after`th acknowledgement of a write issued
/// after every failure, once every queue has had one. Ends when the
/// connection does.
fn writer(mut q: HostQueue, qi: usize, units: std::ops::Range<u64>, p: &Progress, pid: u32) {
    let nlb = (UNIT_BYTES / BLOCK_SIZE as usize) as u32;
    let mut slots: Vec<Option<(u64, bool, Vec<u8>)>> = vec![None; QD as usize];
    let mut next = units.start;
    loop {
        for (cid, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() || next >= units.end || p.killed.load(Ordering::Acquire) {
                continue;
            }
            let after = p.all_failing.load(Ordering::Acquire);
            let mut sqe = Sqe::default();
            sqe.set_opcode(0x01)
                .set_flags(FLAGS_PSDT_SGL)
                .set_cid(cid as u16)
                .set_nsid(1)
                .set_rw(next * nlb as u64, nlb)
                .set_sgl(SglDescriptor::transport(UNIT_BYTES as u32));
            if q.send(&sqe, &[]).is_err() {
                return;
            }
            *slot = Some((next, after, unit_data(next, UNIT_BYTES)));
            next += 1;
        }
        if slots.iter().all(Option::is_none) {
            return;
        }
        match q.recv() {
            Err(_) => return,
            Ok(HostPdu::Data(..)) => {}
            Ok(HostPdu::R2T(cid, ttag, off, len)) => {
                let Some(Some((_, _, data))) = slots.get(cid as usize) else {
                    return;
                };
                let d = data[off as usize..(off + len) as usize].to_vec();
                if q.send_h2c(cid, ttag, off, &d).is_err() {
                    return;
                }
            }
            Ok(HostPdu::Resp(c)) => {
                let Some((unit, after, _)) = slots.get_mut(c.cid() as usize).and_then(Option::take)
                else {
                    return;
                };
                if !c.status().is_success() {
                    p.errors.fetch_add(1, Ordering::AcqRel);
                    continue;
                }
                p.acked.lock().unwrap().push(unit);
                p.acks.fetch_add(1, Ordering::AcqRel);
                if !after {
                    continue;
                }
                p.acks_after_per_queue[qi].fetch_add(1, Ordering::AcqRel);
                let total = p.acks_after.fetch_add(1, Ordering::AcqRel) + 1;
                let every_queue = p
                    .acks_after_per_queue
                    .iter()
                    .all(|n| n.load(Ordering::Acquire) > 0);
                if total >= p.kill_after && every_queue && !p.killed.swap(true, Ordering::AcqRel) {
                    sigkill(pid);
                }
            }
        }
    }
}

fn member(i: usize) -> String {
    format!("U{i}")
}

fn crash_round(c: &Crash, round: usize) {
    let dir = common::scratch_dir();
    let files: Vec<String> = (0..c.members)
        .map(|i| image(&dir, &format!("m{i}.img"), MEMBER_BYTES))
        .collect();
    let base = |i: usize| {
        if c.failing.contains(&i) {
            format!("EE_U{i}")
        } else {
            member(i)
        }
    };
    let mut t = Target::start();
    for (i, f) in files.iter().enumerate() {
        aio(&t, &member(i), f, BLOCK_SIZE);
    }
    for &i in &c.failing {
        t.ok("bdev_error_create", json!({"base_name": member(i)}));
    }
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "superblock": true,
               "base_bdevs": (0..c.members).map(base).collect::<Vec<_>>()}),
    );
    let addr = t.export_tcp(NQN, "R1");
    let admin = HostQueue::connect(addr, NQN, HOSTNQN, 0, 0, 31, Digests::default()).unwrap();
    let units = (MEMBER_BYTES - data_offset_bytes(BLOCK_SIZE)) / UNIT_BYTES as u64;
    let per_queue = units / QUEUES as u64;
    let progress = Arc::new(Progress {
        kill_after: ACKS_BEFORE_KILL[round % ACKS_BEFORE_KILL.len()],
        ..Progress::default()
    });
    // Queues land on the cores in turn: writes complete on both at once.
    let writers: Vec<_> = (1..=QUEUES)
        .map(|qid| {
            let q = HostQueue::connect(
                addr,
                NQN,
                HOSTNQN,
                qid,
                admin.cntlid,
                QD - 1,
                Digests::default(),
            )
            .unwrap();
            let range = (qid as u64 - 1) * per_queue..qid as u64 * per_queue;
            let (p, pid) = (progress.clone(), t.pid());
            std::thread::spawn(move || writer(q, qid as usize - 1, range, &p, pid))
        })
        .collect();
    for (n, &i) in c.failing.iter().enumerate() {
        let want = ACKS_BEFORE_FAILURE * (n as u64 + 1);
        wait_until("writes before the failure", Duration::from_secs(60), || {
            progress.acks.load(Ordering::Acquire) >= want
        });
        inject(&t, &format!("EE_U{i}"), "write", "failure", 1_000_000);
    }
    progress.all_failing.store(true, Ordering::Release);
    // (A write held on a core that is never told to release it would hang
    // its queue: time out instead, the target killed on unwinding.)
    wait_until(
        "acknowledgements on every queue, then the kill",
        Duration::from_secs(60),
        || progress.killed.load(Ordering::Acquire),
    );
    for w in writers {
        w.join().unwrap();
    }
    drop(admin);
    assert!(
        progress.killed.load(Ordering::Acquire),
        "round {round}: the writers ran out of units before the kill"
    );
    assert_eq!(progress.errors.load(Ordering::Acquire), 0, "round {round}");
    let _ = t.child.wait();
    drop(t);
    let mut acked = progress.acked.lock().unwrap().clone();
    acked.sort_unstable();
    let survivors: Vec<usize> = (0..c.members).filter(|i| !c.failing.contains(i)).collect();

    // On disk, before anything reads it again: each survivor's newest
    // superblock records every failure and holds every acknowledged write.
    let region = data_offset_bytes(BLOCK_SIZE) as usize;
    for &s in &survivors {
        let sb = newest_sb(&files[s], BLOCK_SIZE);
        for &f in &c.failing {
            assert_eq!(
                sb.slots[f].state,
                SlotState::Failed,
                "round {round}: member {s}'s superblock: {sb:?}"
            );
        }
        let img = std::fs::read(&files[s]).unwrap();
        for &u in &acked {
            let at = region + u as usize * UNIT_BYTES;
            assert!(
                img[at..at + UNIT_BYTES] == unit_data(u, UNIT_BYTES),
                "round {round}: acknowledged unit {u} missing on member {s}"
            );
        }
    }

    let t = Target::start();
    t.ok(
        "bdev_raid_set_options",
        json!({"process_max_bandwidth_mb_sec": 1}),
    );
    let order: Vec<usize> = if c.survivors_first {
        survivors
            .iter()
            .copied()
            .chain(c.failing.iter().copied())
            .collect()
    } else {
        c.failing
            .iter()
            .copied()
            .chain(survivors.iter().copied())
            .collect()
    };
    for &i in &order {
        aio(&t, &member(i), &files[i], BLOCK_SIZE);
    }
    t.ok("bdev_wait_for_examine", Value::Null);
    let info = raid_info(&t, "R1");
    assert_eq!(info["state"], "online", "round {round}: {info}");
    assert_eq!(
        info["num_base_bdevs_operational"],
        survivors.len(),
        "round {round}: {info}"
    );
    for &f in &c.failing {
        assert_ne!(
            info["base_bdevs_list"][f]["state"], "operational",
            "round {round}: {info}"
        );
    }
    let check = |t: &Target, when: &str| {
        // Contiguous runs of acknowledged units, read in one call each.
        let nlb = (UNIT_BYTES / BLOCK_SIZE as usize) as u64;
        let mut i = 0;
        while i < acked.len() {
            let mut j = i + 1;
            while j < acked.len() && acked[j] == acked[j - 1] + 1 && j - i < 32 {
                j += 1;
            }
            let got = read(t, "R1", acked[i] * nlb, (j - i) as u64 * nlb);
            for (k, &u) in acked[i..j].iter().enumerate() {
                assert!(
                    got[k * UNIT_BYTES..(k + 1) * UNIT_BYTES] == unit_data(u, UNIT_BYTES),
                    "round {round}: acknowledged unit {u} reads back wrong {when}"
                );
            }
            i = j;
        }
    };
    check(&t, "degraded");
    // Every stale member is rebuilt, one after the other.
    t.ok(
        "bdev_raid_set_options",
        json!({"process_max_bandwidth_mb_sec": 0}),
    );
    wait_until("the rebuilds", Duration::from_secs(120), || {
        raid_info(&t, "R1")["num_base_bdevs_operational"] == c.members
    });
    check(&t, "after the rebuild");
    let info = raid_info(&t, "R1");
    drop(t);
    let rebuilt = (0..c.members)
        .find(|i| c.failing.contains(i) && info["base_bdevs_list"][*i]["state"] == "operational")
        .expect("a rebuilt member");
    let a = std::fs::read(&files[rebuilt]).unwrap();
    let b = std::fs::read(&files[survivors[0]]).unwrap();
    assert!(
        a[region..] == b[region..],
        "round {round}: the rebuilt member differs from the survivor"
    );
}

fn rounds() -> usize {
    std::env::var("FERROPLANE_RAID_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

#[test]
fn killed_right_after_acks_while_a_member_fails_under_io_every_ack_reads_back() {
    for round in 0..rounds() {
        crash_round(
            &Crash {
                members: 2,
                failing: vec![0],
                survivors_first: round % 2 == 1,
            },
            round,
        );
    }
}

#[test]
fn killed_right_after_acks_while_two_of_three_members_fail_every_ack_reads_back() {
    for round in 0..rounds() {
        crash_round(
            &Crash {
                members: 3,
                failing: vec![0, 1],
                survivors_first: round % 2 == 0,
            },
            round,
        );
    }
}

/// When no survivor can take the superblock recording a member's failure
/// (here the survivor fails its superblock flushes, which no data write
/// uses), a write that reached only the survivor fails (EIO) instead of
/// being acknowledged: nothing on disk would keep the stale member out.
#[test]
fn a_write_fails_when_no_member_can_record_the_failure() {
    let t = Target::start();
    for i in 0..2 {
        t.ok(
            "bdev_malloc_create",
            json!({"name": format!("M{i}"), "num_blocks": 8192, "block_size": 512}),
        );
        t.ok("bdev_error_create", json!({"base_name": format!("M{i}")}));
    }
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["EE_M0", "EE_M1"], "superblock": true}),
    );
    let data = unit_data(3, 4096);
    t.ok(
        "bdev_write",
        json!({"name": "R1", "offset_blocks": 8, "data": hex(&data)}),
    );
    inject(&t, "EE_M1", "flush", "failure", 1_000_000);
    inject(&t, "EE_M0", "write", "failure", 1_000_000);
    let code = t.err_code(
        "bdev_write",
        json!({"name": "R1", "offset_blocks": 8, "data": hex(&unit_data(4, 4096))}),
    );
    assert_eq!(code, -libc::EIO as i64);
    let info = raid_info(&t, "R1");
    assert_eq!(info["num_base_bdevs_operational"], 0, "{info}");
}

/// A second member fails while the superblock recording the first is
/// being written (its superblock flush fails), so the superblock just
/// written still calls it current: it is written again, and writes that
/// then reach only the last member are acknowledged once that is on disk
/// (not held forever, not acknowledged before). After SIGKILL and restart
/// only that member serves, and every acknowledged write reads back.
#[test]
fn a_member_failing_the_superblock_write_is_recorded_by_another_round() {
    let dir = common::scratch_dir();
    let bs = 512;
    let files: Vec<String> = (0..3)
        .map(|i| image(&dir, &format!("m{i}.img"), 8 << 20))
        .collect();
    let mut t = Target::start();
    for (i, f) in files.iter().enumerate() {
        aio(&t, &member(i), f, bs);
    }
    t.ok("bdev_error_create", json!({"base_name": "U0"}));
    t.ok("bdev_error_create", json!({"base_name": "U1"}));
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["EE_U0", "EE_U1", "U2"], "superblock": true}),
    );
    inject(&t, "EE_U1", "flush", "failure", 1_000_000);
    inject(&t, "EE_U0", "write", "failure", 1_000_000);
    let writes: Vec<(u64, Vec<u8>)> = (0..4).map(|i| (i * 16, unit_data(i, 4096))).collect();
    for (at, d) in &writes {
        let r = call_within(
            &t.socket,
            "bdev_write",
            json!({"name": "R1", "offset_blocks": at, "data": hex(d)}),
            Duration::from_secs(10),
        );
        assert_eq!(
            r.as_ref().map(|r| &r["result"]),
            Some(&json!(true)),
            "write at {at}: {r:?}"
        );
    }
    let info = raid_info(&t, "R1");
    assert_eq!(info["num_base_bdevs_operational"], 1, "{info}");
    t.signal(libc::SIGKILL);
    let _ = t.child.wait();
    drop(t);
    let sb = newest_sb(&files[2], bs);
    assert_eq!(sb.slots[0].state, SlotState::Failed, "{sb:?}");
    assert_eq!(sb.slots[1].state, SlotState::Failed, "{sb:?}");

    let t = Target::start();
    t.ok(
        "bdev_raid_set_options",
        json!({"process_max_bandwidth_mb_sec": 1}),
    );
    for (i, f) in files.iter().enumerate() {
        aio(&t, &member(i), f, bs);
    }
    t.ok("bdev_wait_for_examine", Value::Null);
    let info = raid_info(&t, "R1");
    assert_eq!(info["state"], "online", "{info}");
    assert_eq!(info["num_base_bdevs_operational"], 1, "{info}");
    assert_eq!(info["base_bdevs_list"][2]["state"], "operational", "{info}");
    for (at, d) in &writes {
        assert_eq!(&read(&t, "R1", *at, 8), d, "write at {at}");
    }
}
