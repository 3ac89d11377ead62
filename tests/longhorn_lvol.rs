//! Longhorn's engine tests that need only lvol stores and lvols, replayed
//! call for call against the real binary (the sequences its engine and
//! go-spdk-helper send: `TestReplicaCreateWithStateChecks`, the runtime
//! monitoring verify tests, `TestLinkedCloneSourceDeleteBlocked`,
//! `TestLinkedCloneSyncCleanupTmpHeadOnlyEntrypoint`), with the engine's
//! background monitor polling on a second connection all the while, as it
//! does every 3 s.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Target;
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;
const INTERNAL_HOST: &str = "nqn.2023-01.io.longhorn.spdk:internal-host";

/// The engine's monitor: listings on its own connection until stopped;
/// every answer must be a success.
fn monitor(
    t: &Target,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let mut c = t.client();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for m in [
                "bdev_get_bdevs",
                "bdev_lvol_get_lvstores",
                "bdev_get_iostat",
                "nvmf_get_subsystems",
            ] {
                if let Err(e) = c.call(m, Value::Null) {
                    panic!("monitor: {m}: {e}");
                }
            }
            rounds.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

fn err(t: &Target, method: &str, params: Value) -> (i64, String) {
    let e = t.call(method, params).unwrap_err();
    (
        e["code"].as_i64().unwrap(),
        e["message"].as_str().unwrap().to_string(),
    )
}

fn lvol_of(t: &Target, name: &str) -> Value {
    let b = t.ok("bdev_get_bdevs", json!({"name": name}));
    assert_eq!(b.as_array().unwrap().len(), 1);
    let b = b[0].clone();
    assert_eq!(b["product_name"], "Logical Volume");
    assert!(b["driver_specific"]["lvol"].is_object());
    assert_eq!(b["aliases"].as_array().unwrap().len(), 1, "{b}");
    b
}

/// `updateHeadCache` / `BdevLvolGetByName`: the bdev, then its xattrs
/// (missing ones are exactly -32603 "No such file or directory"), and for
/// snapshots the checksum (-19 when none).
fn engine_lookup(t: &Target, name: &str) -> Value {
    let b = lvol_of(t, name);
    let uuid = b["name"].as_str().unwrap().to_string();
    for x in ["user_created", "snapshot_timestamp"] {
        if let Err(e) = t.call(
            "bdev_lvol_get_xattr",
            json!({"name": uuid, "xattr_name": x}),
        ) {
            assert_eq!(e["code"], -32603, "{e}");
            assert_eq!(e["message"], "No such file or directory", "{e}");
        }
    }
    if b["driver_specific"]["lvol"]["snapshot"] == true {
        assert_eq!(
            err(t, "bdev_lvol_get_snapshot_checksum", json!({"name": uuid})).0,
            -19
        );
    }
    b
}

/// `DiskCreate` over an AIO file: the lvstore's UUID.
fn disk_create(t: &Target, file: &std::path::Path) -> String {
    t.ok("bdev_get_bdevs", Value::Null);
    assert_eq!(
        t.ok(
            "bdev_aio_create",
            json!({"name": "test-disk", "filename": file.to_str().unwrap(), "block_size": 4096}),
        ),
        "test-disk"
    );
    let d = t.ok("bdev_get_bdevs", json!({"name": "test-disk"}));
    assert_eq!(d[0]["product_name"], "AIO disk");
    assert_eq!(
        d[0]["driver_specific"]["aio"]["filename"],
        file.to_str().unwrap()
    );
    let stores = t.ok("bdev_lvol_get_lvstores", Value::Null);
    assert!(stores
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["base_bdev"] != "test-disk"));
    let uuid = t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "test-disk", "lvs_name": "test-disk", "cluster_sz": MIB}),
    );
    let uuid = uuid.as_str().unwrap().to_string();
    let s = t.ok("bdev_lvol_get_lvstores", json!({"uuid": uuid}));
    assert_eq!(s[0]["cluster_size"], MIB);
    assert_eq!(s[0]["block_size"], 4096);
    assert_eq!(s[0]["free_clusters"], s[0]["total_data_clusters"]);
    uuid
}

/// `ReplicaCreate` of a new replica: the head lvol's UUID.
fn replica_create(t: &Target, lvs: &str, name: &str, port: u16) -> String {
    for _ in 0..2 {
        assert_eq!(
            t.ok("bdev_lvol_get_lvstores", json!({"uuid": lvs}))
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
    assert_eq!(
        err(
            t,
            "bdev_get_bdevs",
            json!({"name": format!("test-disk/{name}")})
        )
        .0,
        -19
    );
    let head = t.ok(
        "bdev_lvol_create",
        json!({"uuid": lvs, "lvol_name": name, "size_in_mib": 500, "clear_method": "unmap", "thin_provision": true}),
    );
    let head = head.as_str().unwrap().to_string();
    let b = engine_lookup(t, &format!("test-disk/{name}"));
    assert_eq!(b["name"], head.as_str());
    assert_eq!(
        b["num_blocks"].as_u64().unwrap() * b["block_size"].as_u64().unwrap(),
        500 * MIB
    );
    // StopExposeBdev, StartExposeBdev.
    let nqn = format!("nqn.2023-01.io.longhorn.spdk:{name}");
    let subs = t.ok("nvmf_get_subsystems", Value::Null);
    assert!(subs
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["nqn"] != nqn.as_str()));
    let transports = t.ok("nvmf_get_transports", Value::Null);
    if transports == json!([]) {
        t.ok("nvmf_create_transport", json!({"trtype": "tcp"}));
    }
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": false}),
    );
    t.ok(
        "nvmf_subsystem_add_host",
        json!({"nqn": nqn, "host": INTERNAL_HOST}),
    );
    t.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": head, "nguid": "0123456789abcdef0123456789abcdef"}}),
    );
    t.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    head
}

/// `ReplicaDelete(name, cleanup)`: unexport, the blind -19 deletes, the
/// head.
fn replica_delete(t: &Target, name: &str) {
    let nqn = format!("nqn.2023-01.io.longhorn.spdk:{name}");
    t.ok("nvmf_get_subsystems", Value::Null);
    let l = t.ok("nvmf_subsystem_get_listeners", json!({"nqn": nqn}));
    let addr = l[0]["address"].clone();
    t.ok(
        "nvmf_subsystem_remove_listener",
        json!({"nqn": nqn, "listen_address": addr}),
    );
    t.ok("nvmf_subsystem_remove_ns", json!({"nqn": nqn, "nsid": 1}));
    t.ok("nvmf_delete_subsystem", json!({"nqn": nqn}));
    for suffix in ["-rebuilding", "-cloning", "-cloning-tmp"] {
        assert_eq!(
            err(
                t,
                "bdev_lvol_delete",
                json!({"name": format!("test-disk/{name}{suffix}")})
            )
            .0,
            -19
        );
    }
    assert_eq!(
        t.ok(
            "bdev_lvol_delete",
            json!({"name": format!("test-disk/{name}")})
        ),
        true
    );
}

fn lvol_field(t: &Target, name: &str, field: &str) -> Value {
    lvol_of(t, name)["driver_specific"]["lvol"][field].clone()
}

fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn longhorn_replica_snapshot_and_linked_clone_flows() {
    let dir = common::scratch_dir();
    let file = dir.join("test-disk");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(2048 * MIB)
        .unwrap();
    let t = Target::start();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let mon = monitor(&t, stop.clone(), rounds.clone());
    // NewServer.
    t.ok(
        "bdev_nvme_set_options",
        json!({"ctrlr_loss_timeout_sec": 15, "reconnect_delay_sec": 2, "fast_io_fail_timeout_sec": 10, "transport_ack_timeout": 10, "keep_alive_timeout_ms": 10000}),
    );
    let lvs = disk_create(&t, &file);

    // TestReplicaCreateWithStateChecks: create, stop, create again (the
    // head is reused), delete with cleanup.
    let head = replica_create(&t, &lvs, "test-replica-state", common::free_port());
    let nqn = "nqn.2023-01.io.longhorn.spdk:test-replica-state";
    t.ok("nvmf_delete_subsystem", json!({"nqn": nqn}));
    let b = engine_lookup(&t, "test-disk/test-replica-state");
    assert_eq!(b["name"], head.as_str());
    assert_eq!(b["driver_specific"]["lvol"]["snapshot"], false);
    assert_eq!(
        b["driver_specific"]["lvol"]["lvol_store_uuid"],
        lvs.as_str()
    );
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": false}),
    );
    t.ok(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": head}}),
    );
    t.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": common::free_port().to_string()}}),
    );
    replica_delete(&t, "test-replica-state");

    // TestLinkedCloneSourceDeleteBlocked.
    let (src, dst) = ("lc-src-r-0a1b2c3d", "lc-dst-r-0a1b2c3d");
    let src_head = replica_create(&t, &lvs, src, common::free_port());
    let snap_name = format!("{src}-snap-snap-1");
    let s = t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": src_head, "snapshot_name": snap_name,
               "xattrs": {"user_created": "true", "snapshot_timestamp": ""}}),
    );
    let s = s.as_str().unwrap().to_string();
    let sb = engine_lookup(&t, &s);
    assert_eq!(sb["driver_specific"]["lvol"]["snapshot"], true);
    assert_eq!(sorted(&sb["driver_specific"]["lvol"]["clones"]), [src]);
    assert_eq!(
        t.ok(
            "bdev_lvol_get_xattr",
            json!({"name": s, "xattr_name": "user_created"})
        ),
        "true"
    );
    assert_eq!(
        t.ok(
            "bdev_lvol_get_xattr",
            json!({"name": s, "xattr_name": "snapshot_timestamp"})
        ),
        ""
    );
    let hb = engine_lookup(&t, &src_head);
    let hl = &hb["driver_specific"]["lvol"];
    assert_eq!(hl["clone"], true);
    assert_eq!(hl["base_snapshot"], snap_name.as_str());
    assert_eq!(hl["num_allocated_clusters"], 0);

    replica_create(&t, &lvs, dst, common::free_port());
    for suffix in ["-cloning", "-cloning-tmp"] {
        assert_eq!(
            err(
                &t,
                "bdev_lvol_delete",
                json!({"name": format!("test-disk/{dst}{suffix}")})
            )
            .0,
            -19
        );
    }
    let ep = format!("{src}-clone-ep-snap-1");
    let tmp = format!("{ep}-tmp-head");
    assert_eq!(
        err(
            &t,
            "bdev_lvol_delete",
            json!({"name": format!("test-disk/{tmp}")})
        )
        .0,
        -19
    );
    let tmp_uuid = t.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": s, "clone_name": tmp}),
    );
    let ep_uuid = t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": tmp_uuid, "snapshot_name": ep}),
    );
    engine_lookup(&t, &format!("test-disk/{tmp}"));
    assert_eq!(t.ok("bdev_lvol_delete", json!({"name": tmp_uuid})), true);
    assert_eq!(
        t.ok(
            "bdev_lvol_set_parent",
            json!({"lvol_name": format!("test-disk/{dst}"), "parent_name": format!("test-disk/{ep}")}),
        ),
        true
    );
    engine_lookup(&t, &format!("test-disk/{ep}"));
    // The tree the monitor checks.
    assert_eq!(
        sorted(&lvol_field(&t, &s, "clones")),
        sorted(&json!([src, ep]))
    );
    assert_eq!(
        lvol_field(&t, ep_uuid.as_str().unwrap(), "base_snapshot"),
        snap_name.as_str()
    );
    assert_eq!(
        sorted(&lvol_field(&t, &format!("test-disk/{ep}"), "clones")),
        [dst]
    );
    assert_eq!(lvol_field(&t, &format!("test-disk/{dst}"), "clone"), true);
    assert_eq!(
        lvol_field(&t, &format!("test-disk/{dst}"), "base_snapshot"),
        ep.as_str()
    );
    // A snapshot with two clones cannot be deleted.
    assert_eq!(
        err(&t, "bdev_lvol_delete", json!({"name": s})),
        (-32603, "Operation not permitted".into())
    );
    replica_delete(&t, dst);
    assert_eq!(
        t.ok(
            "bdev_lvol_delete",
            json!({"name": format!("test-disk/{ep}")})
        ),
        true
    );
    replica_delete(&t, src);
    assert_eq!(t.ok("bdev_lvol_delete", json!({"name": s})), true);

    // TestLinkedCloneSyncCleanupTmpHeadOnlyEntrypoint: S -> ep -> tmp-head,
    // then the monitor's cleanup, leaf first.
    let src_head = replica_create(&t, &lvs, src, common::free_port());
    let s = t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": src_head, "snapshot_name": snap_name, "xattrs": {"user_created": "true", "snapshot_timestamp": ""}}),
    );
    engine_lookup(&t, &format!("test-disk/{snap_name}"));
    let tmp_uuid = t.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": s, "clone_name": tmp}),
    );
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": tmp_uuid, "snapshot_name": ep}),
    );
    assert_eq!(
        sorted(&lvol_field(&t, &format!("test-disk/{ep}"), "clones")),
        std::slice::from_ref(&tmp)
    );
    t.ok(
        "bdev_lvol_delete",
        json!({"name": format!("test-disk/{tmp}")}),
    );
    t.ok(
        "bdev_lvol_delete",
        json!({"name": format!("test-disk/{ep}")}),
    );
    assert_eq!(
        err(
            &t,
            "bdev_get_bdevs",
            json!({"name": format!("test-disk/{ep}")})
        )
        .0,
        -19
    );
    assert_eq!(
        err(
            &t,
            "bdev_get_bdevs",
            json!({"name": format!("test-disk/{tmp}")})
        )
        .0,
        -19
    );
    replica_delete(&t, src);
    t.ok("bdev_lvol_delete", json!({"name": s}));

    // TestRuntimeMonitoringVerifyMixedValidAndInvalidLvolNames: four raw
    // creates in flight at once on one connection, then a half-size one;
    // and the 73-byte backing-image temp head.
    let mut c = t.client();
    let names = [
        "matrix-r-1a2b3c4d",
        "matrix-invalid",
        "matrix-r-123",
        "matrix-r-123456789",
    ];
    for (i, n) in names.iter().enumerate() {
        let req = json!({"jsonrpc": "2.0", "id": 100 + i, "method": "bdev_lvol_create",
            "params": {"uuid": lvs, "lvol_name": n, "size_in_mib": 500, "clear_method": "unmap", "thin_provision": true}});
        c.send_raw(serde_json::to_vec(&req).unwrap().as_slice());
    }
    for _ in 0..names.len() {
        let r = c.read_value().expect("a reply");
        assert!(r["result"].is_string(), "{r}");
    }
    t.ok(
        "bdev_lvol_create",
        json!({"uuid": lvs, "lvol_name": "matrix-r-5e6f7a8b", "size_in_mib": 250, "clear_method": "unmap", "thin_provision": true}),
    );
    let half = lvol_of(&t, "test-disk/matrix-r-5e6f7a8b");
    assert_eq!(
        half["num_blocks"].as_u64().unwrap() * half["block_size"].as_u64().unwrap(),
        250 * MIB
    );
    let bi = format!("bi-matrix-bi-0a0b0c0d-disk-{lvs}-temp-head");
    assert_eq!(bi.len(), 73);
    t.ok(
        "bdev_lvol_create",
        json!({"uuid": lvs, "lvol_name": bi, "size_in_mib": 500, "clear_method": "unmap", "thin_provision": true}),
    );
    assert_eq!(
        t.ok(
            "bdev_lvol_delete",
            json!({"name": format!("test-disk/{bi}")})
        ),
        true
    );
    for n in names.iter().chain(["matrix-r-5e6f7a8b"].iter()) {
        assert_eq!(
            t.ok(
                "bdev_lvol_delete",
                json!({"name": format!("test-disk/{n}")})
            ),
            true
        );
        assert_eq!(
            err(
                &t,
                "bdev_lvol_delete",
                json!({"name": format!("test-disk/{n}")})
            )
            .0,
            -19
        );
    }
    let s = t.ok("bdev_lvol_get_lvstores", json!({"uuid": lvs}));
    assert_eq!(s[0]["free_clusters"], s[0]["total_data_clusters"], "{s}");

    // DiskDelete: only the AIO bdev is deleted; the store goes with it.
    t.ok("bdev_lvol_get_lvstores", json!({"uuid": lvs}));
    assert_eq!(t.ok("bdev_aio_delete", json!({"name": "test-disk"})), true);
    assert_eq!(
        err(&t, "bdev_lvol_get_lvstores", json!({"uuid": lvs})).0,
        -19
    );
    stop.store(true, Ordering::Relaxed);
    mon.join().unwrap();
    assert!(rounds.load(Ordering::Relaxed) > 0);
}

#[test]
fn set_parent_takes_a_parent_no_larger_than_the_child() {
    let t = Target::start();
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M", "num_blocks": 64 * 256, "block_size": 4096}),
    );
    t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "M", "lvs_name": "l", "cluster_sz": MIB}),
    );
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "l", "lvol_name": "p", "size_in_mib": 2, "thin_provision": true}),
    );
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "l/p", "snapshot_name": "ps"}),
    );
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "l", "lvol_name": "big", "size_in_mib": 4, "thin_provision": true}),
    );
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "l", "lvol_name": "small", "size_in_mib": 1, "thin_provision": true}),
    );
    // Longhorn's SPDK: a child at least as large as its parent.
    assert_eq!(
        t.ok(
            "bdev_lvol_set_parent",
            json!({"lvol_name": "l/big", "parent_name": "l/ps"})
        ),
        true
    );
    assert_eq!(
        err(
            &t,
            "bdev_lvol_set_parent",
            json!({"lvol_name": "l/small", "parent_name": "l/ps"})
        ),
        (-32602, "Invalid argument".into())
    );
    assert_eq!(
        err(
            &t,
            "bdev_lvol_set_parent",
            json!({"lvol_name": "l/big", "parent_name": "l/ps"})
        ),
        (-32602, "File exists".into())
    );
    assert_eq!(
        err(
            &t,
            "bdev_lvol_set_parent",
            json!({"lvol_name": "l/big", "parent_name": "l/none"})
        )
        .0,
        -19
    );
}
