//! Copy-on-write through NVMe/TCP with many commands in flight (issue 11):
//! a host keeps 48 writes outstanding on a thin lvol, several to the same
//! cluster at once and most of them partial-cluster first writes, while
//! the lvol is snapshotted; the snapshot is cloned and the clone exported
//! too. Then, over NVMe: the clone reads exactly the snapshot, and both
//! hold for every unit a version the host could have seen at the moment
//! of the snapshot; the origin reads the newest version of everything;
//! allocated-cluster counts are exactly what the data says; a few writes
//! to the clone take exactly that many clusters and leave the rest of
//! each cluster as the snapshot has it. Over malloc and over an aio file,
//! `FERROPLANE_LVOL_COW_ROUNDS` times each (default 3).

mod common;
#[path = "common/nvme_io.rs"]
mod nvme_io;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{unhex, Backing, Target};
use nvme_io::{Cmd, Done, Driver, Op};
use serde_json::{json, Value};

const BS: usize = 4096;
const CLUSTER: usize = 1 << 20;
const CLUSTER_BLOCKS: u64 = (CLUSTER / BS) as u64;
/// A write: 16 KiB, so 64 units per cluster.
const UNIT_BLOCKS: u64 = 4;
const UNIT_BYTES: usize = UNIT_BLOCKS as usize * BS;
const UNITS_PER_CLUSTER: u64 = CLUSTER_BLOCKS / UNIT_BLOCKS;
/// Clusters the host writes to (of the lvol's 16).
const CLUSTERS: u64 = 12;
const QD: usize = 48;
/// Acknowledged writes before the snapshot, and after it before the host
/// stops.
const ACKS_BEFORE: u64 = 96;
const ACKS_AFTER: u64 = 600;

/// A unit's content for version `gen` (never zeros).
fn unit_data(unit: u64, gen: u64) -> Vec<u8> {
    (0..UNIT_BYTES / 16)
        .flat_map(|i| {
            let mut w = [0u8; 16];
            w[..8].copy_from_slice(&(unit << 20 | i as u64).to_le_bytes());
            w[8..].copy_from_slice(&(gen | 0xC0E0 << 48).to_le_bytes());
            w
        })
        .collect()
}

/// The version a unit holds: 0 for zeros; panics on anything that is not
/// exactly one version of this unit.
fn version(unit: u64, got: &[u8], what: &str) -> u64 {
    if got.iter().all(|b| *b == 0) {
        return 0;
    }
    let gen = u64::from_le_bytes(got[8..16].try_into().unwrap()) & !(0xFFFF << 48);
    assert!(
        got == unit_data(unit, gen).as_slice(),
        "{what}: unit {unit} holds neither zeros nor one whole version"
    );
    gen
}

/// One write's history.
#[derive(Clone, Copy)]
struct Write {
    gen: u64,
    submitted: Instant,
    acked: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    /// Per unit, its writes in order (one in flight at a time per unit).
    history: Mutex<Vec<Vec<Write>>>,
    acks: AtomicU64,
    snapping: AtomicBool,
    /// Writes in flight now.
    inflight: AtomicU64,
    /// Most writes seen in flight while the snapshot ran.
    max_inflight_during: AtomicU64,
    stop: AtomicBool,
    errors: AtomicU64,
}

struct Host {
    s: Arc<Shared>,
    busy: Vec<bool>,
    inflight: u64,
    gen: u64,
    rng: u64,
}

impl Host {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl Driver for Host {
    fn next(&mut self) -> Option<Cmd> {
        if self.s.stop.load(Ordering::Acquire) {
            return None;
        }
        // A cluster, then a free unit in it: several writes per cluster
        // are in flight at once.
        let unit = loop {
            let c = self.rand() % CLUSTERS;
            let u = c * UNITS_PER_CLUSTER + self.rand() % UNITS_PER_CLUSTER;
            if !self.busy[u as usize] {
                break u;
            }
        };
        self.busy[unit as usize] = true;
        self.gen += 1;
        self.inflight += 1;
        self.s.inflight.store(self.inflight, Ordering::Release);
        if self.s.snapping.load(Ordering::Acquire) {
            self.s
                .max_inflight_during
                .fetch_max(self.inflight, Ordering::AcqRel);
        }
        self.s.history.lock().unwrap()[unit as usize].push(Write {
            gen: self.gen,
            submitted: Instant::now(),
            acked: None,
        });
        Some(Cmd {
            lba: unit * UNIT_BLOCKS,
            op: Op::Write(unit_data(unit, self.gen)),
            tag: unit,
        })
    }

    fn done(&mut self, d: Done) {
        self.busy[d.tag as usize] = false;
        self.inflight -= 1;
        self.s.inflight.store(self.inflight, Ordering::Release);
        if !d.ok {
            self.s.errors.fetch_add(1, Ordering::AcqRel);
            return;
        }
        if let Some(w) = self.s.history.lock().unwrap()[d.tag as usize].last_mut() {
            w.acked = Some(Instant::now());
        }
        self.s.acks.fetch_add(1, Ordering::AcqRel);
    }
}

fn bdev(t: &Target, name: &str) -> Value {
    t.ok("bdev_get_bdevs", json!({"name": name}))[0].clone()
}

fn allocated(t: &Target, name: &str) -> u64 {
    bdev(t, name)["driver_specific"]["lvol"]["num_allocated_clusters"]
        .as_u64()
        .unwrap()
}

fn free(t: &Target) -> u64 {
    t.ok("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"}))[0]["free_clusters"]
        .as_u64()
        .unwrap()
}

fn rpc_read(t: &Target, name: &str, lba: u64, blocks: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < blocks {
        let n = 64.min(blocks - at);
        let r = t.ok(
            "bdev_read",
            json!({"name": name, "offset_blocks": lba + at, "num_blocks": n}),
        );
        out.extend(unhex(r["data"].as_str().unwrap()));
        at += n;
    }
    out
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("timed out waiting for {what}");
}

/// Clusters whose data differ between two images of the written region.
fn clusters_differing(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(CLUSTER)
        .zip(b.chunks(CLUSTER))
        .filter(|(x, y)| x != y)
        .count() as u64
}

fn clusters_nonzero(a: &[u8]) -> u64 {
    a.chunks(CLUSTER)
        .filter(|c| c.iter().any(|b| *b != 0))
        .count() as u64
}

fn run(backing: Backing) {
    let t = Target::start();
    backing.create(&t, "B0", 64 * CLUSTER_BLOCKS, BS as u32);
    t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "B0", "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
    );
    let total = free(&t);
    let origin = t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": "origin", "size_in_mib": 16, "thin_provision": true}),
    );
    let origin = origin.as_str().unwrap().to_string();
    let addr = t.export_tcp("nqn.2016-06.io.spdk:cow-origin", &origin);
    let mut conn = nvme_io::connect(addr, "nqn.2016-06.io.spdk:cow-origin", QD as u16);

    let units = (CLUSTERS * UNITS_PER_CLUSTER) as usize;
    let shared = Arc::new(Shared {
        history: Mutex::new(vec![Vec::new(); units]),
        ..Shared::default()
    });
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("{backing:?}: seed {seed}");
    let mut host = Host {
        s: shared.clone(),
        busy: vec![false; units],
        inflight: 0,
        gen: 0,
        rng: seed,
    };
    let writer = std::thread::spawn(move || {
        nvme_io::drive(&mut conn.io, QD, BS, &mut host).expect("NVMe writes");
        conn
    });
    wait_until(
        "writes before the snapshot",
        Duration::from_secs(60),
        || shared.acks.load(Ordering::Acquire) >= ACKS_BEFORE,
    );
    shared.snapping.store(true, Ordering::Release);
    let snap_start = Instant::now();
    shared
        .max_inflight_during
        .fetch_max(shared.inflight.load(Ordering::Acquire), Ordering::AcqRel);
    let snap = t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/origin", "snapshot_name": "snap"}),
    );
    let snap_end = Instant::now();
    shared.snapping.store(false, Ordering::Release);
    let snap = snap.as_str().unwrap().to_string();
    let acks_at_snap = shared.acks.load(Ordering::Acquire);
    wait_until("writes after the snapshot", Duration::from_secs(60), || {
        shared.acks.load(Ordering::Acquire) >= acks_at_snap + ACKS_AFTER
    });
    shared.stop.store(true, Ordering::Release);
    let mut conn = writer.join().unwrap();
    assert_eq!(shared.errors.load(Ordering::Acquire), 0, "{backing:?}");
    let inflight = shared.max_inflight_during.load(Ordering::Acquire);
    assert!(
        inflight >= 32,
        "{backing:?}: only {inflight} writes were in flight during the snapshot"
    );
    eprintln!(
        "{backing:?}: snapshot took {:?} with up to {inflight} writes in flight",
        snap_end - snap_start
    );

    let clone = t.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs0/snap", "clone_name": "clone"}),
    );
    let clone = clone.as_str().unwrap().to_string();
    let caddr = t.export_tcp("nqn.2016-06.io.spdk:cow-clone", &clone);
    let mut cconn = nvme_io::connect(caddr, "nqn.2016-06.io.spdk:cow-clone", 32);

    let region = CLUSTERS * CLUSTER_BLOCKS;
    let o = nvme_io::read(&mut conn.io, QD, BS, 0, region, 32);
    let c = nvme_io::read(&mut cconn.io, 32, BS, 0, region, 32);
    // The snapshot too (read-only, exported as well).
    let saddr = t.export_tcp("nqn.2016-06.io.spdk:cow-snap", &snap);
    let mut sconn = nvme_io::connect(saddr, "nqn.2016-06.io.spdk:cow-snap", 32);
    let s = nvme_io::read(&mut sconn.io, 32, BS, 0, region, 32);
    assert!(
        c == s,
        "{backing:?}: the clone does not read as its snapshot"
    );
    let history = shared.history.lock().unwrap();
    let mut in_between = 0;
    for (u, h) in history.iter().enumerate() {
        let u64u = u as u64;
        let at = u * UNIT_BYTES..(u + 1) * UNIT_BYTES;
        // The origin: the last version written (every write was
        // acknowledged).
        let newest = h.last().map_or(0, |w| w.gen);
        assert_eq!(
            version(u64u, &o[at.clone()], "origin"),
            newest,
            "{backing:?}: origin unit {u}"
        );
        // The snapshot: at least the newest acknowledged before it began;
        // at most one submitted before it ended.
        let floor = h
            .iter()
            .filter(|w| w.acked.is_some_and(|a| a < snap_start))
            .map(|w| w.gen)
            .max()
            .unwrap_or(0);
        let allowed: Vec<u64> = std::iter::once(floor)
            .chain(
                h.iter()
                    .filter(|w| {
                        w.gen > floor
                            && w.submitted < snap_end
                            && w.acked.is_some_and(|a| a >= snap_start)
                    })
                    .map(|w| w.gen),
            )
            .collect();
        in_between += allowed.len() - 1;
        let got = version(u64u, &s[at], "snapshot");
        assert!(
            allowed.contains(&got),
            "{backing:?}: snapshot unit {u} holds version {got}, allowed {allowed:?}"
        );
    }
    drop(history);
    eprintln!("{backing:?}: {in_between} writes overlapped the snapshot");

    // Allocation is exactly what the data says: the snapshot holds every
    // cluster with data in it, the origin every cluster it changed since.
    let (sa, oa, ca) = (
        allocated(&t, &snap),
        allocated(&t, &origin),
        allocated(&t, &clone),
    );
    assert_eq!(sa, clusters_nonzero(&s), "{backing:?}: snapshot clusters");
    assert_eq!(
        oa,
        clusters_differing(&o, &s),
        "{backing:?}: origin clusters"
    );
    assert_eq!(ca, 0, "{backing:?}: a new clone holds nothing");
    assert_eq!(free(&t), total - sa - oa, "{backing:?}");

    // Partial writes to three clusters of the clone (one of them beyond
    // what the host wrote, one already in the snapshot): three clusters
    // taken, the rest of each as the snapshot has it.
    let before = free(&t);
    let targets = [(1u64, 7u64), (5, 100), (14, 3)];
    let mut cmds = Vec::new();
    for (i, (cl, blk)) in targets.iter().enumerate() {
        cmds.push(Cmd {
            lba: cl * CLUSTER_BLOCKS + blk,
            op: Op::Write(vec![0xA0 + i as u8; 2 * BS]),
            tag: i as u64,
        });
    }
    let mut b = nvme_io::Batch::new(cmds);
    nvme_io::drive(&mut cconn.io, 32, BS, &mut b).expect("clone writes");
    assert!(b.done.iter().all(|d| d.ok), "{backing:?}: clone writes");
    assert_eq!(free(&t), before - 3, "{backing:?}");
    assert_eq!(allocated(&t, &clone), 3, "{backing:?}");
    let c2 = nvme_io::read(&mut cconn.io, 32, BS, 0, 16 * CLUSTER_BLOCKS, 32);
    let mut s_full = s.clone();
    s_full.resize(16 * CLUSTER, 0);
    let mut want = s_full.clone();
    for (i, (cl, blk)) in targets.iter().enumerate() {
        let at = (cl * CLUSTER_BLOCKS + blk) as usize * BS;
        want[at..at + 2 * BS].fill(0xA0 + i as u8);
    }
    assert!(c2 == want, "{backing:?}: the clone after its own writes");
    // Neither the origin nor the snapshot saw them.
    assert!(
        nvme_io::read(&mut conn.io, QD, BS, 0, region, 32) == o,
        "{backing:?}: origin changed by writes to the clone"
    );
    assert!(
        nvme_io::read(&mut sconn.io, 32, BS, 0, region, 32) == s,
        "{backing:?}: snapshot changed"
    );
    // And over RPC, the snapshot's first cluster as NVMe read it.
    assert!(
        rpc_read(&t, &snap, 0, CLUSTER_BLOCKS) == s[..CLUSTER],
        "{backing:?}: snapshot over RPC"
    );
}

/// `FERROPLANE_LVOL_COW_ROUNDS` (default 3): each a new target, another
/// moment for the snapshot.
fn rounds() -> usize {
    std::env::var("FERROPLANE_LVOL_COW_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[test]
fn snapshot_under_48_writes_in_flight_then_clone_over_nvme_malloc() {
    for _ in 0..rounds() {
        run(Backing::Malloc);
    }
}

#[test]
fn snapshot_under_48_writes_in_flight_then_clone_over_nvme_aio_file() {
    for _ in 0..rounds() {
        run(Backing::AioFile);
    }
}

/// Writes 16 KiB units at random over `clusters` clusters until told to
/// stop; counts what completed how.
struct Flood {
    clusters: u64,
    rng: u64,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Driver for Flood {
    fn next(&mut self) -> Option<Cmd> {
        if self.stop.load(Ordering::Acquire) {
            return None;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = self.rng % (self.clusters * UNITS_PER_CLUSTER);
        Some(Cmd {
            lba: unit * UNIT_BLOCKS,
            op: Op::Write(unit_data(unit, 1)),
            tag: unit,
        })
    }

    fn done(&mut self, d: Done) {
        if d.ok {
            self.acks.fetch_add(1, Ordering::AcqRel);
        } else {
            self.errors.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// SPDK deletes an lvol even while its bdev is open (an NVMe-oF
/// namespace): the bdev is hot-removed first. Here the host has 32 writes
/// in flight, most of them first writes allocating clusters, when the
/// delete comes: the delete succeeds, every command completes (none
/// hangs), and afterwards nothing of the lvol is left: not listed, no
/// bdev, every cluster free again, and the store works and checks clean.
#[test]
fn deleting_an_exported_thin_lvol_under_first_writes_leaves_nothing() {
    for backing in [Backing::Malloc, Backing::AioFile] {
        let t = Target::start();
        backing.create(&t, "B0", 64 * CLUSTER_BLOCKS, BS as u32);
        t.ok(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "B0", "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
        );
        let total = free(&t);
        let victim = t.ok(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "victim", "size_in_mib": 32, "thin_provision": true}),
        );
        let victim = victim.as_str().unwrap().to_string();
        let nqn = "nqn.2016-06.io.spdk:victim";
        let addr = t.export_tcp(nqn, &victim);
        let mut conn = nvme_io::connect(addr, nqn, 32);
        let (stop, acks, errors) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let mut flood = Flood {
            clusters: 32,
            rng: 0x9E37_79B9_7F4A_7C15,
            stop: stop.clone(),
            acks: acks.clone(),
            errors: errors.clone(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let conn = &mut conn;
            let r = nvme_io::drive(&mut conn.io, 32, BS, &mut flood).map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        wait_until("first writes", Duration::from_secs(60), || {
            acks.load(Ordering::Acquire) >= 40
        });
        let r = t.call("bdev_lvol_delete", json!({"name": "lvs0/victim"}));
        stop.store(true, Ordering::Release);
        assert_eq!(r, Ok(json!(true)), "{backing:?}: delete under I/O");
        let ended = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{backing:?}: writes hang after the delete"));
        writer.join().unwrap();
        eprintln!(
            "{backing:?}: {} writes acknowledged, {} failed, host saw {ended:?}",
            acks.load(Ordering::Acquire),
            errors.load(Ordering::Acquire)
        );
        assert_eq!(
            t.call("bdev_get_bdevs", json!({"name": victim}))
                .unwrap_err()["code"],
            -19,
            "{backing:?}"
        );
        let l = t.ok("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"}));
        assert_eq!(l, json!([]), "{backing:?}");
        assert_eq!(free(&t), total, "{backing:?}: clusters of the deleted lvol");
        // The store still works.
        t.ok(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "after", "size_in_mib": 2, "thin_provision": true}),
        );
        t.ok(
            "bdev_write",
            json!({"name": "lvs0/after", "offset_blocks": 3, "data": common::hex(&[7u8; BS])}),
        );
        assert_eq!(free(&t), total - 1, "{backing:?}");
        if backing == Backing::AioFile {
            let file = t.dir.join("B0.img");
            let report = bdev::module::lvol::check::check_file(&file).unwrap();
            assert!(report.is_clean(), "{backing:?}:\n{report}");
        }
    }
}
