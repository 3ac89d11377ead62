//! SPEC §2 stress test for lvols: many RPC clients, each on its own
//! connection, create, snapshot, clone, write, rename, resize, list and
//! delete lvols in one store for a bounded time, with names drawn from
//! small shared pools so that clients race on the same names all the time.
//!
//! Checked while it runs: a listed lvol is complete (its bdev answers by
//! UUID with the listed alias, unless a rename to its new alias ran in
//! between; if it does not answer, it must be gone from the next listing
//! too: deleted meanwhile, never half-made); every parent and child one
//! `bdev_get_bdevs` answer names is in that answer; no name is ever listed
//! twice; a create of a taken name fails with -17 and nothing else;
//! nothing fails with EIO but writes when the store is full (it is small,
//! so thick creates and first writes run out of clusters now and then).
//! At the end and after a restart (SIGKILL, then `-c` with the saved aio
//! bdev; the store comes back by examine): every listed lvol opens and
//! reads, free clusters = total − the clusters the live lvols hold, the
//! same set (UUIDs and names) reloads, the store still takes writes, and
//! the checker finds nothing on the file.
//!
//! `FERROPLANE_LVOL_STRESS_SECS` (default 20) sets how long the clients
//! run; `FERROPLANE_LVOL_STRESS_CLIENTS` (default 8) how many;
//! `FERROPLANE_LVOL_STRESS_SEED` repeats a run's choices.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{hex, Client, Target};
use serde_json::{json, Value};

const BS: usize = 4096;
const CLUSTER: u64 = 1 << 20;
const CLUSTER_BLOCKS: u64 = CLUSTER / BS as u64;
/// Small: thick creates and first writes run out of clusters now and
/// then, so failures that must leave nothing behind happen too.
const FILE_BYTES: u64 = 24 << 20;
/// "Full" for a failed write: at most this many free clusters when asked
/// just after (see [`store_full`]).
const FULL_SLACK: u64 = 4;
/// Names per pool (lvols, snapshots, clones), shared by every client.
const POOL: u64 = 6;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

fn any_name(r: &mut Rng) -> String {
    let p = ["v", "s", "c"][r.below(3) as usize];
    format!("{p}{}", r.below(POOL))
}

#[derive(Default)]
struct Tally {
    /// (method, outcome) -> count; outcome "ok" or the error.
    outcomes: BTreeMap<(String, String), u64>,
    listings: u64,
    /// Lvols seen listed whose bdev was gone (then gone from a re-listing).
    raced_away: u64,
    /// Listed under a name their bdev no longer had (a rename between).
    renamed_between: u64,
    /// Every rename sent: (new name, sent, answered).
    renames: Vec<(String, Instant, Option<Instant>)>,
}

/// Whether a rename to `name` may have landed between `from` and `to`.
fn renamed_within(t: &Tally, name: &str, from: Instant, to: Instant) -> bool {
    t.renames
        .iter()
        .any(|(n, sent, done)| n == name && *sent <= to && done.is_none_or(|d| d >= from))
}

/// A listing's lvols as (name, uuid, alias), checked complete.
fn check_listing(c: &mut Client, tally: &Mutex<Tally>) {
    let listed_at = Instant::now();
    let lvols = c
        .call("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"}))
        .unwrap_or_else(|e| panic!("bdev_lvol_get_lvols: {e}"));
    let lvols = lvols.as_array().unwrap();
    let mut names = BTreeSet::new();
    for l in lvols {
        let name = l["name"].as_str().unwrap();
        let uuid = l["uuid"].as_str().unwrap();
        assert!(names.insert(name), "{name} listed twice: {lvols:?}");
        assert_eq!(l["alias"], format!("lvs0/{name}"), "{l}");
        assert_eq!(l["lvs"]["name"], "lvs0", "{l}");
        match c.call("bdev_get_bdevs", json!({"name": uuid})) {
            Ok(b) => {
                assert_eq!(b[0]["name"], uuid, "{b}");
                // A UUID is one lvol for ever (a re-created name gets a
                // new one): its alias is the listed one, unless a rename
                // to the alias it has now ran in between.
                if b[0]["aliases"] != json!([l["alias"]]) {
                    let now = b[0]["aliases"][0].as_str().unwrap_or("");
                    let mut ta = tally.lock().unwrap();
                    assert!(
                        renamed_within(
                            &ta,
                            now.trim_start_matches("lvs0/"),
                            listed_at,
                            Instant::now()
                        ),
                        "listed {l}, but bdev {b}, and no rename ran"
                    );
                    ta.renamed_between += 1;
                }
                assert_eq!(b[0]["product_name"], "Logical Volume", "{b}");
            }
            Err(e) => {
                assert_eq!(e["code"], -19, "bdev_get_bdevs of listed {uuid}: {e}");
                let again = c
                    .call("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"}))
                    .unwrap();
                assert!(
                    !again.as_array().unwrap().iter().any(|x| x["uuid"] == uuid),
                    "{name} ({uuid}) is listed but has no bdev: half-made"
                );
                tally.lock().unwrap().raced_away += 1;
            }
        }
    }
    // One answer is one moment: every parent and child an lvol names is
    // in the same answer (a clone being created is not a snapshot's
    // child before it exists, nor after its delete).
    let all = c.call("bdev_get_bdevs", Value::Null).unwrap();
    let names: BTreeSet<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["product_name"] == "Logical Volume")
        .filter_map(|b| b["aliases"][0].as_str())
        .map(|a| a.trim_start_matches("lvs0/"))
        .collect();
    for b in all.as_array().unwrap() {
        let d = &b["driver_specific"]["lvol"];
        if d.is_null() {
            continue;
        }
        for c in d["clones"].as_array().into_iter().flatten() {
            assert!(
                names.contains(c.as_str().unwrap()),
                "{} names clone {c}, which is not in the same answer",
                b["aliases"][0]
            );
        }
        if let Some(p) = d["base_snapshot"].as_str() {
            assert!(
                names.contains(p),
                "{} names base snapshot {p}, which is not in the same answer",
                b["aliases"][0]
            );
        }
    }
    tally.lock().unwrap().listings += 1;
}

fn client_loop(socket: &Path, seed: u64, stop: &AtomicBool, tally: &Mutex<Tally>) {
    let mut c = Client::connect(socket);
    let mut r = Rng(seed);
    while !stop.load(Ordering::Acquire) {
        let (method, params) = match r.below(14) {
            0..=2 => {
                let thin = r.below(4) != 0;
                (
                    "bdev_lvol_create",
                    json!({"lvs_name": "lvs0", "lvol_name": format!("v{}", r.below(POOL)),
                           "size_in_mib": 1 + r.below(12), "thin_provision": thin}),
                )
            }
            3 | 4 => (
                "bdev_lvol_snapshot",
                json!({"lvol_name": format!("lvs0/{}", any_name(&mut r)),
                       "snapshot_name": format!("s{}", r.below(POOL))}),
            ),
            5 => (
                "bdev_lvol_clone",
                json!({"snapshot_name": format!("lvs0/s{}", r.below(POOL)),
                       "clone_name": format!("c{}", r.below(POOL))}),
            ),
            6 | 7 => (
                "bdev_lvol_delete",
                json!({"name": format!("lvs0/{}", any_name(&mut r))}),
            ),
            8 | 9 => {
                // One block somewhere in the first MiB: a first write
                // allocates (or copies) a cluster. Not to snapshots (s*),
                // which are read-only: writes there fail by design.
                let blk = r.below(CLUSTER_BLOCKS);
                let name = format!("{}{}", ["v", "c"][r.below(2) as usize], r.below(POOL));
                (
                    "bdev_write",
                    json!({"name": format!("lvs0/{name}"), "offset_blocks": blk,
                           "data": hex(&vec![(blk as u8) | 1; BS])}),
                )
            }
            10 => {
                // Renames race with creates of the same names.
                let p = ["v", "c"][r.below(2) as usize];
                (
                    "bdev_lvol_rename",
                    json!({"old_name": format!("lvs0/{p}{}", r.below(POOL)),
                           "new_name": format!("{p}{}", r.below(POOL))}),
                )
            }
            11 => (
                "bdev_lvol_resize",
                json!({"name": format!("lvs0/{}", any_name(&mut r)), "size_in_mib": 1 + r.below(6)}),
            ),
            _ => {
                check_listing(&mut c, tally);
                continue;
            }
        };
        let rename = (method == "bdev_lvol_rename").then(|| {
            let mut ta = tally.lock().unwrap();
            let n = params["new_name"].as_str().unwrap().to_string();
            ta.renames.push((n, Instant::now(), None));
            ta.renames.len() - 1
        });
        let reply = c.call(method, params.clone());
        if let Some(i) = rename {
            tally.lock().unwrap().renames[i].2 = Some(Instant::now());
        }
        let outcome = match reply {
            Ok(_) => "ok".to_string(),
            Err(e) => {
                let msg = format!("{} {}", e["code"], e["message"]);
                let mut shown = params.to_string();
                shown.truncate(200);
                // A thin write finding no free cluster fails (EIO, as SPDK
                // fails the I/O); anything else failing with EIO means the
                // store failed.
                let full = method == "bdev_write" && store_full(&mut c);
                assert!(
                    full || !(msg.contains("Input/output") || msg.contains("Illegal byte")),
                    "{method} {shown}: {msg}"
                );
                if method == "bdev_lvol_create" && msg.contains("File exists") {
                    assert_eq!(e["code"], -17, "{method} {shown}: {msg}");
                }
                msg
            }
        };
        *tally
            .lock()
            .unwrap()
            .outcomes
            .entry((method.to_string(), outcome))
            .or_default() += 1;
    }
}

/// Whether the store has (almost) no free cluster: a write that needed
/// one may have failed for lack of it (others free and take clusters all
/// the time, so "almost").
fn store_full(c: &mut Client) -> bool {
    let s = c
        .call("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"}))
        .unwrap();
    s[0]["free_clusters"].as_u64().unwrap() <= FULL_SLACK
}

/// Every lvol listed: (uuid, name), each checked to open, read and answer
/// by UUID; and the store's accounting.
fn final_check(t: &Target, when: &str) -> BTreeSet<(String, String)> {
    let lvols = t.ok("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"}));
    let mut set = BTreeSet::new();
    let mut held = 0;
    for l in lvols.as_array().unwrap() {
        let uuid = l["uuid"].as_str().unwrap().to_string();
        let b = t.ok("bdev_get_bdevs", json!({"name": uuid}))[0].clone();
        assert_eq!(b["aliases"], json!([l["alias"]]), "{when}: {b}");
        let blocks = b["num_blocks"].as_u64().unwrap();
        for at in [0, blocks.saturating_sub(1)] {
            t.ok(
                "bdev_read",
                json!({"name": uuid, "offset_blocks": at, "num_blocks": 1}),
            );
        }
        held += b["driver_specific"]["lvol"]["num_allocated_clusters"]
            .as_u64()
            .unwrap();
        assert!(
            set.insert((uuid, l["name"].as_str().unwrap().to_string())),
            "{when}: {l} twice"
        );
    }
    let s = &t.ok("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"}))[0];
    assert_eq!(
        s["free_clusters"].as_u64().unwrap(),
        s["total_data_clusters"].as_u64().unwrap() - held,
        "{when}: free clusters are not total - held by live lvols: {s}"
    );
    set
}

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

#[test]
fn concurrent_clients_racing_on_names_never_see_half_made_lvols() {
    let secs = env("FERROPLANE_LVOL_STRESS_SECS", 20);
    let clients = env("FERROPLANE_LVOL_STRESS_CLIENTS", 8);
    let seed = env(
        "FERROPLANE_LVOL_STRESS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    ) | 1;
    eprintln!("FERROPLANE_LVOL_STRESS_SEED={seed}");
    let dir = common::scratch_dir();
    let file = dir.join("lvs.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(FILE_BYTES)
        .unwrap();
    let conf = dir.join("conf.json");
    let t = Target::start();
    t.ok(
        "bdev_aio_create",
        json!({"name": "F0", "filename": file.to_str().unwrap(), "block_size": BS}),
    );
    let cfg = t.ok("save_config", Value::Null);
    std::fs::write(&conf, serde_json::to_string(&cfg).unwrap()).unwrap();
    t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "F0", "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut rng = Rng(seed);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (sock, s, ta, sd) = (t.socket.clone(), stop.clone(), tally.clone(), rng.next());
            std::thread::spawn(move || client_loop(&sock, sd | 1, &s, &ta))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Release);
    for th in threads {
        th.join().expect("a client failed");
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let mut calls = 0;
    for ((m, o), n) in &tally.outcomes {
        eprintln!("{n:8} {m}: {o}");
        calls += n;
    }
    eprintln!(
        "{calls} calls and {} listings by {clients} clients in {:?}; {} listed lvols raced away, {} renamed meanwhile",
        tally.listings,
        started.elapsed(),
        tally.raced_away,
        tally.renamed_between
    );
    for m in [
        "bdev_lvol_create",
        "bdev_lvol_snapshot",
        "bdev_lvol_clone",
        "bdev_lvol_delete",
        "bdev_write",
    ] {
        assert!(
            tally
                .outcomes
                .contains_key(&(m.to_string(), "ok".to_string())),
            "no {m} ever succeeded"
        );
    }
    assert!(
        tally
            .outcomes
            .keys()
            .any(|(m, o)| m == "bdev_lvol_create" && o.starts_with("-17")),
        "no duplicate-name race happened"
    );

    let before = final_check(&t, "at the end");
    assert!(
        tally
            .outcomes
            .keys()
            .any(|(_, o)| o.contains("No space left")),
        "the store never filled up"
    );
    eprintln!("{} lvols at the end", before.len());
    t.signal(libc::SIGKILL);
    drop(t);
    let t = Target::start_with(&["--cpus", "0,1", "-c", conf.to_str().unwrap()]);
    t.ok("bdev_wait_for_examine", Value::Null);
    let after = final_check(&t, "after the restart");
    assert_eq!(before, after, "a different set reloaded");
    // Not poisoned by the failed writes: a new lvol takes a write.
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": "probe", "size_in_mib": 1, "thin_provision": true}),
    );
    let st = t.ok("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"}));
    if st[0]["free_clusters"].as_u64().unwrap() > 0 {
        let d = vec![0x3Cu8; BS];
        t.ok(
            "bdev_write",
            json!({"name": "lvs0/probe", "offset_blocks": 1, "data": hex(&d)}),
        );
        let r = t.ok(
            "bdev_read",
            json!({"name": "lvs0/probe", "offset_blocks": 1, "num_blocks": 1}),
        );
        assert_eq!(r["data"], hex(&d));
    }
    drop(t);
    check_file(&file, "after the restart");
    let _ = std::fs::remove_dir_all(&dir);
}
