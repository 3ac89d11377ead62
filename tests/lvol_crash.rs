//! Lvol crash test (issue 11): the target is killed with SIGKILL at a
//! random moment while hosts keep many verify writes in flight over
//! NVMe/TCP to thin lvols (two empty ones, and a clone of a snapshot that
//! holds data, so its first writes copy) on a file-backed store and
//! another thread runs snapshots, clones, resizes and deletes (of clones,
//! and of snapshots, which merges them into their one child). After the
//! restart (`-c` with the saved configuration, which re-creates only the
//! aio bdev: the store is found by examine):
//!
//! - the store loads, and the checker finds nothing on the file, both
//!   right after the crash and after the restarted target is stopped;
//! - every acknowledged write reads back on its lvol: each unit holds the
//!   newest acknowledged version or the one write that was in flight to it
//!   (writes to a unit are never concurrent, so nothing else is allowed);
//! - every acknowledged structural change is there: created snapshots and
//!   clones are listed (unless a delete of them was attempted), deleted
//!   ones are not, resized lvols have at least the acknowledged size;
//! - every listed lvol opens and reads, and its store's free clusters are
//!   the total less what the live lvols hold; the store takes new writes.
//!
//! Each round is a new store crashed `FERROPLANE_LVOL_CRASH_CYCLES` times
//! (default 3): the restarted target is checked, then written to and
//! crashed again, so later crashes hit a store that was itself recovered
//! (a new epoch, an older log behind it). Every third crash comes right
//! after an acknowledged structural change instead of at a random moment.
//!
//! `FERROPLANE_LVOL_CRASH_ROUNDS` (default 4) sets the rounds; raise it
//! for a long run by hand. `FERROPLANE_LVOL_CRASH_SEED` repeats a run.

mod common;
#[path = "common/nvme_io.rs"]
mod nvme_io;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{hex, unhex, Target};
use nvme_io::{Cmd, Done, Driver, Op};
use serde_json::{json, Value};

const BS: usize = 4096;
const CLUSTER: u64 = 1 << 20;
const CLUSTER_BLOCKS: u64 = CLUSTER / BS as u64;
/// The store's file: sparse, room for many copy-on-write generations.
const FILE_BYTES: u64 = 256 << 20;
/// Lvols the hosts write to: head0 and head1 start empty; head2 is a clone
/// of a snapshot that holds a version of every unit, so its first writes
/// copy from the snapshot.
const HEADS: usize = 3;
const CLONE_HEAD: usize = 2;
const HEAD_MIB: u64 = 24;
/// Resizes grow a head up to this.
const HEAD_MAX_MIB: u64 = 40;
/// Hosts write to the first clusters of each head only, so snapshots
/// under writes keep copying the same few (and the store never fills).
const WRITE_CLUSTERS: u64 = 8;
/// A write: 8 KiB.
const UNIT_BLOCKS: u64 = 2;
const UNIT_BYTES: usize = UNIT_BLOCKS as usize * BS;
const UNITS: u64 = WRITE_CLUSTERS * CLUSTER_BLOCKS / UNIT_BLOCKS;
const QD: usize = 24;
/// Live snapshots at most: each may hold a copy of every written cluster.
const MAX_SNAPSHOTS: usize = 6;
/// The kill comes this long after the writes start, at random.
const KILL_AFTER_MS: std::ops::Range<u64> = 150..2500;

fn nqn(head: usize) -> String {
    format!("nqn.2016-06.io.spdk:lvol-crash-{head}")
}

/// A unit's content for version `gen` of lvol `head` (never zeros).
fn unit_data(head: usize, unit: u64, gen: u64) -> Vec<u8> {
    (0..UNIT_BYTES / 16)
        .flat_map(|i| {
            let mut w = [0u8; 16];
            w[..8].copy_from_slice(&((head as u64) << 56 | unit << 20 | i as u64).to_le_bytes());
            w[8..].copy_from_slice(&(gen | 0xC8A5 << 48).to_le_bytes());
            w
        })
        .collect()
}

/// The version a unit holds (0: zeros), or None when it is not exactly one
/// whole version of this unit.
fn version(head: usize, unit: u64, got: &[u8]) -> Option<u64> {
    if got.iter().all(|b| *b == 0) {
        return Some(0);
    }
    let gen = u64::from_le_bytes(got[8..16].try_into().unwrap()) & !(0xFFFF << 48);
    (got == unit_data(head, unit, gen).as_slice()).then_some(gen)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Per unit of one head: the newest acknowledged version and the one in
/// flight.
#[derive(Default, Clone, Copy)]
struct UnitState {
    acked: u64,
    inflight: Option<u64>,
}

struct HostWriter {
    head: usize,
    units: Arc<Mutex<Vec<UnitState>>>,
    gen: u64,
    rng: Rng,
    killed: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Driver for HostWriter {
    fn next(&mut self) -> Option<Cmd> {
        if self.killed.load(Ordering::Acquire) {
            return None;
        }
        let mut units = self.units.lock().unwrap();
        let unit = loop {
            let u = self.rng.below(UNITS);
            if units[u as usize].inflight.is_none() {
                break u;
            }
        };
        self.gen += 1;
        units[unit as usize].inflight = Some(self.gen);
        Some(Cmd {
            lba: unit * UNIT_BLOCKS,
            op: Op::Write(unit_data(self.head, unit, self.gen)),
            tag: unit,
        })
    }

    fn done(&mut self, d: Done) {
        let mut units = self.units.lock().unwrap();
        let u = &mut units[d.tag as usize];
        let gen = u.inflight.take();
        if d.ok {
            u.acked = gen.unwrap_or(u.acked);
            self.acks.fetch_add(1, Ordering::AcqRel);
        } else {
            // A failed write may still have landed: keep it allowed.
            u.inflight = gen;
            self.errors.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// One JSON-RPC call on its own connection that survives the target dying
/// under it: the whole response, or None if the connection ended first.
fn call_or_gone(socket: &Path, method: &str, params: Value) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
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

/// What the structural thread learnt from acknowledged replies, carried
/// across the crashes of a round (reconciled with the listing after each
/// restart).
#[derive(Default, Debug)]
struct Structure {
    /// Snapshots and clones that must exist (name -> uuid).
    created: BTreeMap<String, String>,
    /// Names a delete was sent for and not refused (acknowledged or not).
    delete_tried: BTreeSet<String>,
    /// Uuids whose delete was acknowledged.
    deleted: BTreeSet<String>,
    /// Head name -> acknowledged size, MiB.
    resized: BTreeMap<String, u64>,
    /// Each head's size as last asked for, MiB.
    sizes: Vec<u64>,
    snapshots: Vec<String>,
    clones: Vec<String>,
    ops: u64,
    /// Acknowledged structural changes (not listings) this cycle.
    changes: u64,
    /// Replies that were errors, by message.
    refused: BTreeMap<String, u64>,
}

fn sigkill(pid: u32) {
    // SAFETY: kill on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Runs structural RPCs until the target dies. With `kill_after` =
/// (pid, n), it kills the target itself right after the nth acknowledged
/// change of this cycle: the crash then lands just after an
/// acknowledgement, which must be durable.
fn structural(
    socket: PathBuf,
    seed: u64,
    cycle: usize,
    killed: Arc<AtomicBool>,
    st: Arc<Mutex<Structure>>,
    kill_after: Option<(u32, u64)>,
) {
    let mut rng = Rng(seed);
    let mut n = 0;
    while !killed.load(Ordering::Acquire) {
        n += 1;
        let head = rng.below(HEADS as u64) as usize;
        let (method, params, created, deleting) = {
            let mut s = st.lock().unwrap();
            let live = |v: &Vec<String>, s: &Structure| -> Vec<String> {
                v.iter()
                    .filter(|x| !s.delete_tried.contains(*x))
                    .cloned()
                    .collect()
            };
            let snaps = live(&s.snapshots, &s);
            let clones = live(&s.clones, &s);
            let pick = |v: &Vec<String>, r: &mut Rng| -> Option<String> {
                (!v.is_empty()).then(|| v[r.below(v.len() as u64) as usize].clone())
            };
            match rng.below(10) {
                0..=2 if snaps.len() < MAX_SNAPSHOTS => {
                    let name = format!("snap{cycle}_{n}");
                    (
                        "bdev_lvol_snapshot",
                        json!({"lvol_name": format!("lvs0/head{head}"), "snapshot_name": name}),
                        Some(name),
                        None,
                    )
                }
                3 | 4 => match pick(&snaps, &mut rng) {
                    Some(snap) => {
                        let name = format!("clone{cycle}_{n}");
                        (
                            "bdev_lvol_clone",
                            json!({"snapshot_name": format!("lvs0/{snap}"), "clone_name": name}),
                            Some(name),
                            None,
                        )
                    }
                    None => continue,
                },
                5 if s.sizes[head] < HEAD_MAX_MIB => {
                    s.sizes[head] += 1 + rng.below(3);
                    (
                        "bdev_lvol_resize",
                        json!({"name": format!("lvs0/head{head}"), "size_in_mib": s.sizes[head]}),
                        None,
                        None,
                    )
                }
                6 | 7 => match pick(&clones, &mut rng) {
                    Some(c) => (
                        "bdev_lvol_delete",
                        json!({"name": format!("lvs0/{c}")}),
                        None,
                        Some(c),
                    ),
                    None => continue,
                },
                8 => match pick(&snaps, &mut rng) {
                    // Refused (EPERM) while it has two clones; else it goes,
                    // merged into its one child.
                    Some(snap) => (
                        "bdev_lvol_delete",
                        json!({"name": format!("lvs0/{snap}")}),
                        None,
                        Some(snap),
                    ),
                    None => continue,
                },
                _ => {
                    // A listing, as a control plane polls.
                    ("bdev_lvol_get_lvols", Value::Null, None, None)
                }
            }
        };
        if let Some(d) = &deleting {
            st.lock().unwrap().delete_tried.insert(d.clone());
        }
        let Some(reply) = call_or_gone(&socket, method, params.clone()) else {
            return;
        };
        let mut s = st.lock().unwrap();
        s.ops += 1;
        if let Some(e) = reply.get("error") {
            let msg = format!("{method}: {}", e["message"]);
            assert!(
                !msg.contains("Input/output"),
                "{msg} ({params}): the store failed"
            );
            *s.refused.entry(msg).or_default() += 1;
            if let Some(d) = deleting {
                // Refused, not deleted: it is still there, and may be
                // deleted again later.
                s.delete_tried.remove(&d);
            }
            continue;
        }
        let result = &reply["result"];
        match (method, created, deleting) {
            ("bdev_lvol_snapshot", Some(name), _) => {
                s.created
                    .insert(name.clone(), result.as_str().unwrap().to_string());
                s.snapshots.push(name);
            }
            ("bdev_lvol_clone", Some(name), _) => {
                s.created
                    .insert(name.clone(), result.as_str().unwrap().to_string());
                s.clones.push(name);
            }
            ("bdev_lvol_delete", _, Some(d)) => {
                if let Some(u) = s.created.remove(&d) {
                    s.deleted.insert(u);
                }
            }
            ("bdev_lvol_resize", _, _) => {
                let size = params["size_in_mib"].as_u64().unwrap();
                s.resized.insert(format!("head{head}"), size);
            }
            _ => continue,
        }
        s.changes += 1;
        if let Some((pid, after)) = kill_after {
            if s.changes >= after && !killed.swap(true, Ordering::AcqRel) {
                sigkill(pid);
                return;
            }
        }
    }
}

fn rounds() -> usize {
    std::env::var("FERROPLANE_LVOL_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn seed() -> u64 {
    std::env::var("FERROPLANE_LVOL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1
}

/// Runs the checker on the store's file: the `ferroplane-lvol-check`
/// binary when it was built next to `ferroplane` (a workspace build), and
/// always the same check in-process (`bdev::module::lvol::check`, which the
/// tool prints).
fn check_file(file: &Path, when: &str) {
    let report = bdev::module::lvol::check::check_file(file)
        .unwrap_or_else(|e| panic!("{when}: checker cannot read {}: {e}", file.display()));
    assert!(report.is_clean(), "{when}: the checker found:\n{report}");
    let tool = Path::new(common::BIN).with_file_name("ferroplane-lvol-check");
    if tool.exists() {
        let out = std::process::Command::new(&tool)
            .arg(file)
            .output()
            .expect("run ferroplane-lvol-check");
        assert!(
            out.status.success(),
            "{when}: ferroplane-lvol-check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn rpc_read(t: &Target, name: &str, lba: u64, blocks: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < blocks {
        let n = 128.min(blocks - at);
        let r = t.ok(
            "bdev_read",
            json!({"name": name, "offset_blocks": lba + at, "num_blocks": n}),
        );
        out.extend(unhex(r["data"].as_str().unwrap()));
        at += n;
    }
    out
}

/// Head `h` as a clone: version 1 of every unit written to a template
/// over NVMe, which is snapshotted ("base"); `head{h}` is a clone of that.
fn clone_head(t: &Target, h: usize) -> String {
    let tmpl = t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": "template",
               "size_in_mib": HEAD_MIB, "thin_provision": true}),
    );
    let nqn = "nqn.2016-06.io.spdk:lvol-crash-template";
    let addr = t.export_tcp(nqn, tmpl.as_str().unwrap());
    let mut conn = nvme_io::connect(addr, nqn, 32);
    let cmds = (0..UNITS)
        .map(|u| Cmd {
            lba: u * UNIT_BLOCKS,
            op: Op::Write(unit_data(h, u, 1)),
            tag: u,
        })
        .collect();
    let mut b = nvme_io::Batch::new(cmds);
    nvme_io::drive(&mut conn.io, 32, BS, &mut b).expect("template writes");
    assert!(b.done.iter().all(|d| d.ok), "template writes");
    drop(conn);
    t.ok("nvmf_delete_subsystem", json!({"nqn": nqn}));
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/template", "snapshot_name": "base"}),
    );
    let u = t.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs0/base", "clone_name": format!("head{h}")}),
    );
    u.as_str().unwrap().to_string()
}

fn cycles() -> usize {
    std::env::var("FERROPLANE_LVOL_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[derive(Default)]
struct Totals {
    acks: u64,
    ops: u64,
    kills: u64,
}

/// One round: a new store, then `cycles()` crashes of it, each followed by
/// a restart on the same file whose target the next cycle writes to.
fn round(round: usize, seed: u64, totals: &mut Totals) {
    let dir = common::scratch_dir();
    let file = dir.join("lvs.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(FILE_BYTES)
        .unwrap();
    let conf = dir.join("conf.json");
    let mut rng = Rng(seed);
    let tag = format!("round {round} (FERROPLANE_LVOL_CRASH_SEED={seed})");

    let mut t = Target::start();
    t.ok(
        "bdev_aio_create",
        json!({"name": "F0", "filename": file.to_str().unwrap(), "block_size": BS}),
    );
    // Saved before anything else exists: the restart re-creates the file
    // bdev only, and the store comes back by examine.
    let cfg = t.ok("save_config", Value::Null);
    std::fs::write(&conf, serde_json::to_string(&cfg).unwrap()).unwrap();
    t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "F0", "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
    );
    let mut heads = Vec::new();
    for h in 0..HEADS {
        if h == CLONE_HEAD {
            heads.push(clone_head(&t, h));
            continue;
        }
        let u = t.ok(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": format!("head{h}"),
                   "size_in_mib": HEAD_MIB, "thin_provision": true}),
        );
        heads.push(u.as_str().unwrap().to_string());
    }
    let states: Vec<Arc<Mutex<Vec<UnitState>>>> = (0..HEADS)
        .map(|h| {
            let first = UnitState {
                acked: u64::from(h == CLONE_HEAD),
                inflight: None,
            };
            Arc::new(Mutex::new(vec![first; UNITS as usize]))
        })
        .collect();
    let mut gens: [u64; HEADS] = std::array::from_fn(|h| u64::from(h == CLONE_HEAD));
    let st = Arc::new(Mutex::new(Structure {
        sizes: vec![HEAD_MIB; HEADS],
        ..Structure::default()
    }));

    for cycle in 0..cycles() {
        let tag = format!("{tag} cycle {cycle}");
        let killed = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut writers = Vec::new();
        for (h, uuid) in heads.iter().enumerate() {
            let addr = t.export_tcp(&nqn(h), uuid);
            let mut conn = nvme_io::connect(addr, &nqn(h), QD as u16);
            let mut w = HostWriter {
                head: h,
                units: states[h].clone(),
                gen: gens[h],
                rng: Rng(rng.next() | 1),
                killed: killed.clone(),
                acks: acks.clone(),
                errors: errors.clone(),
            };
            writers.push(std::thread::spawn(move || {
                // The whole connection moves here: the admin queue must
                // live as long as the I/O queue (its controller goes with
                // it).
                let conn = &mut conn;
                // Ends with an error when the target dies.
                let _ = nvme_io::drive(&mut conn.io, QD, BS, &mut w);
                w.gen
            }));
        }
        // Every third cycle the crash comes right after an acknowledged
        // structural change; else at a random moment.
        let on_ack = cycle % 3 == 2;
        st.lock().unwrap().changes = 0;
        let ops = {
            let (sock, k, s, sd) = (t.socket.clone(), killed.clone(), st.clone(), rng.next());
            let kill_after = on_ack.then(|| (t.pid(), 1 + rng.below(4)));
            std::thread::spawn(move || structural(sock, sd | 1, cycle, k, s, kill_after))
        };
        let start = Instant::now();
        let wait = if on_ack {
            Duration::from_secs(20)
        } else {
            Duration::from_millis(
                KILL_AFTER_MS.start + rng.below(KILL_AFTER_MS.end - KILL_AFTER_MS.start),
            )
        };
        while start.elapsed() < wait && !killed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !killed.swap(true, Ordering::AcqRel) {
            t.signal(libc::SIGKILL);
        }
        let killed_at = start.elapsed();
        let _ = t.child.wait();
        for (h, w) in writers.into_iter().enumerate() {
            gens[h] = w.join().unwrap();
        }
        ops.join().unwrap();
        drop(t);
        assert_eq!(
            errors.load(Ordering::Acquire),
            0,
            "{tag}: writes failed before the kill"
        );

        check_file(&file, &format!("{tag}, the crashed image"));

        t = Target::start_with(&["--cpus", "0,1", "-c", conf.to_str().unwrap()]);
        t.ok("bdev_wait_for_examine", Value::Null);
        verify(&t, &tag, &heads, &states, &mut st.lock().unwrap());
        let s = st.lock().unwrap();
        eprintln!(
            "{tag}: killed after {killed_at:?}{}, {} writes and {} structural calls acknowledged, refused: {:?}",
            if on_ack { " (right after an acknowledged change)" } else { "" },
            acks.load(Ordering::Acquire),
            s.ops,
            s.refused
        );
        totals.acks += acks.load(Ordering::Acquire);
        totals.kills += 1;
    }
    totals.ops += st.lock().unwrap().ops;
    drop(t);
    check_file(&file, &format!("{tag}, after the last restart"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// After a restart: every acknowledged write and structural change is
/// there, every lvol opens and reads, the accounting adds up, the store
/// takes writes. Then the expectations are brought up to what loaded (the
/// in-flight writes and changes that made it, or not).
fn verify(
    t: &Target,
    tag: &str,
    heads: &[String],
    states: &[Arc<Mutex<Vec<UnitState>>>],
    st: &mut Structure,
) {
    let lvs = t.ok("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"}));
    let lvols = t.ok("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"}));
    let lvols = lvols.as_array().unwrap().clone();
    let listed: BTreeMap<String, String> = lvols
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["uuid"].as_str().unwrap().to_string(),
            )
        })
        .collect();

    // Every acknowledged write, on its head.
    for (h, uuid) in heads.iter().enumerate() {
        assert_eq!(
            listed.get(&format!("head{h}")),
            Some(uuid),
            "{tag}: head{h} lost: {listed:?}"
        );
        // Read back over NVMe (a fresh export: the saved configuration
        // has none), far faster than hex over RPC.
        let addr = t.export_tcp(&nqn(h), uuid);
        let mut conn = nvme_io::connect(addr, &nqn(h), 16);
        let data = nvme_io::read(&mut conn.io, 16, BS, 0, UNITS * UNIT_BLOCKS, 32);
        drop(conn);
        t.ok("nvmf_delete_subsystem", json!({"nqn": nqn(h)}));
        let mut units = states[h].lock().unwrap();
        for (u, s) in units.iter_mut().enumerate() {
            let got = &data[u * UNIT_BYTES..(u + 1) * UNIT_BYTES];
            let v = version(h, u as u64, got);
            assert!(
                v == Some(s.acked) || (v.is_some() && v == s.inflight),
                "{tag}: head{h} unit {u} reads version {v:?}; acknowledged {}, in flight {:?}",
                s.acked,
                s.inflight
            );
            *s = UnitState {
                acked: v.unwrap_or(0),
                inflight: None,
            };
        }
    }
    // Every acknowledged structural change.
    for (name, uuid) in &st.created {
        if st.delete_tried.contains(name) {
            continue;
        }
        assert_eq!(
            listed.get(name),
            Some(uuid),
            "{tag}: acknowledged {name} lost: {listed:?}"
        );
    }
    for uuid in &st.deleted {
        assert!(
            !listed.values().any(|u| u == uuid),
            "{tag}: deleted {uuid} came back: {listed:?}"
        );
    }
    // Every listed lvol opens and reads; allocation adds up.
    let mut held = 0;
    for l in &lvols {
        let uuid = l["uuid"].as_str().unwrap();
        let name = l["name"].as_str().unwrap();
        let b = t.ok("bdev_get_bdevs", json!({"name": uuid}))[0].clone();
        assert_eq!(b["aliases"][0], l["alias"], "{tag}");
        let blocks = b["num_blocks"].as_u64().unwrap();
        if let Some(&mib) = st.resized.get(name) {
            assert!(
                blocks >= mib * CLUSTER_BLOCKS,
                "{tag}: {name} has {blocks} blocks, acknowledged {mib} MiB"
            );
        }
        if let Some(h) = name.strip_prefix("head") {
            st.sizes[h.parse::<usize>().unwrap()] = blocks / CLUSTER_BLOCKS;
        }
        for at in [0, blocks.saturating_sub(1)] {
            t.ok(
                "bdev_read",
                json!({"name": uuid, "offset_blocks": at, "num_blocks": 1}),
            );
        }
        held += b["driver_specific"]["lvol"]["num_allocated_clusters"]
            .as_u64()
            .unwrap();
    }
    let s = &lvs[0];
    assert_eq!(
        s["free_clusters"].as_u64().unwrap(),
        s["total_data_clusters"].as_u64().unwrap() - held,
        "{tag}: {s}"
    );
    // The store takes writes again: one to a cluster of a head beyond the
    // hosts' region.
    let d = vec![0x5Au8; BS];
    let at = (HEAD_MIB - 1) * CLUSTER_BLOCKS;
    t.ok(
        "bdev_write",
        json!({"name": heads[0], "offset_blocks": at, "data": hex(&d)}),
    );
    assert_eq!(rpc_read(t, &heads[0], at, 1), d, "{tag}");

    // From here on, what loaded is what must stay.
    st.created = listed
        .iter()
        .filter(|(n, _)| !n.starts_with("head"))
        .map(|(n, u)| (n.clone(), u.clone()))
        .collect();
    st.snapshots = lvols
        .iter()
        .filter(|l| l["is_snapshot"] == true)
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    st.clones = listed
        .keys()
        .filter(|n| n.starts_with("clone"))
        .cloned()
        .collect();
    st.delete_tried.clear();
}

#[test]
fn killed_at_random_under_writes_and_structural_changes_every_ack_survives() {
    let mut rng = Rng(seed());
    let n = rounds();
    let started = Instant::now();
    let mut totals = Totals::default();
    for r in 0..n {
        round(r, rng.next() | 1, &mut totals);
    }
    eprintln!(
        "{n} rounds, {} crashes in {:?}: {} writes and {} structural calls acknowledged",
        totals.kills,
        started.elapsed(),
        totals.acks,
        totals.ops
    );
}
