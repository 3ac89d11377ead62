//! Lvol stores and lvols through the real binary: SPDK's result shapes and
//! error codes, copy-on-write seen from both sides, reload by examine.

mod common;

use common::{hex, Backing, Target};
use serde_json::{json, Value};

const BS: usize = 4096;
/// 1 MiB clusters, as Longhorn creates its stores.
const CLUSTER: usize = 1 << 20;
const CLUSTER_BLOCKS: u64 = (CLUSTER / BS) as u64;

fn store(t: &Target, backing: Backing) -> String {
    backing.create(t, "B0", 64 * CLUSTER_BLOCKS, BS as u32);
    let u = t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "B0", "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
    );
    u.as_str().unwrap().to_string()
}

fn lvs_info(t: &Target) -> Value {
    t.ok("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"}))[0].clone()
}

fn free(t: &Target) -> u64 {
    lvs_info(t)["free_clusters"].as_u64().unwrap()
}

fn bdev(t: &Target, name: &str) -> Value {
    t.ok("bdev_get_bdevs", json!({"name": name}))[0].clone()
}

fn write(t: &Target, name: &str, lba: u64, data: &[u8]) {
    common::write_blocks(t, name, lba, data, BS)
}

fn read(t: &Target, name: &str, lba: u64, blocks: usize) -> Vec<u8> {
    common::read_blocks(t, name, lba, blocks)
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    common::pattern(len, seed)
}

fn l_creation(t: &Target, alias: &str) -> Value {
    let l = t.ok("bdev_lvol_get_lvols", Value::Null);
    l.as_array()
        .unwrap()
        .iter()
        .find(|l| l["alias"] == alias)
        .unwrap()["creation_time"]
        .clone()
}

fn error(t: &Target, method: &str, params: Value) -> (i64, String) {
    let e = t.call(method, params).unwrap_err();
    (
        e["code"].as_i64().unwrap(),
        e["message"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn store_and_lvol_shapes_are_spdks() {
    let t = Target::start();
    let uuid = store(&t, Backing::Malloc);
    let s = lvs_info(&t);
    assert_eq!(s["uuid"], uuid.as_str());
    assert_eq!(s["name"], "lvs0");
    assert_eq!(s["base_bdev"], "B0");
    assert_eq!(s["block_size"], BS);
    assert_eq!(s["cluster_size"], CLUSTER);
    let total = s["total_data_clusters"].as_u64().unwrap();
    assert!(total > 50 && total < 64, "{s}");
    assert_eq!(s["free_clusters"].as_u64().unwrap(), total);
    assert_eq!(bdev(&t, "B0")["claimed"], true);

    let lv = t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": "vol1", "size_in_mib": 8, "thin_provision": true, "clear_method": "unmap"}),
    );
    let lv = lv.as_str().unwrap().to_string();
    let b = bdev(&t, "lvs0/vol1");
    assert_eq!(b["name"], lv.as_str());
    assert_eq!(b["uuid"], lv.as_str());
    assert_eq!(b["aliases"], json!(["lvs0/vol1"]));
    assert_eq!(b["product_name"], "Logical Volume");
    assert_eq!(b["block_size"], BS);
    assert_eq!(b["num_blocks"], 8 * CLUSTER_BLOCKS);
    let d = &b["driver_specific"]["lvol"];
    assert_eq!(d["lvol_store_uuid"], uuid.as_str());
    assert_eq!(d["base_bdev"], "B0");
    assert_eq!(d["thin_provision"], true);
    assert_eq!(d["num_allocated_clusters"], 0);
    assert_eq!(d["snapshot"], false);
    assert_eq!(d["clone"], false);
    assert_eq!(d["esnap_clone"], false);
    assert_eq!(b["creation_time"], l_creation(&t, "lvs0/vol1"));
    assert_eq!(bdev(&t, "B0")["creation_time"], "");
    // Flush reaches the base and succeeds.
    t.ok(
        "bdev_io_command",
        json!({"name": "lvs0/vol1", "io_type": "flush", "offset_blocks": 0, "num_blocks": 8 * CLUSTER_BLOCKS}),
    );
    // Found by UUID as well.
    assert_eq!(bdev(&t, &lv)["name"], lv.as_str());

    let l = t.ok("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"}));
    assert_eq!(l.as_array().unwrap().len(), 1);
    assert_eq!(l[0]["alias"], "lvs0/vol1");
    assert_eq!(l[0]["uuid"], lv.as_str());
    assert_eq!(l[0]["name"], "vol1");
    assert_eq!(l[0]["is_thin_provisioned"], true);
    assert_eq!(l[0]["lvs"]["name"], "lvs0");
    let ct = l[0]["creation_time"].as_str().unwrap();
    assert!(ct.len() == 20 && ct.ends_with('Z'), "{ct}");
    // Thick: every cluster taken at once.
    t.ok(
        "bdev_lvol_create",
        json!({"uuid": uuid, "lvol_name": "thick", "size_in_mib": 4}),
    );
    assert_eq!(free(&t), total - 4);
    assert_eq!(
        bdev(&t, "lvs0/thick")["driver_specific"]["lvol"]["num_allocated_clusters"],
        4
    );
}

#[test]
fn copy_on_write_seen_from_both_sides() {
    for backing in [Backing::Malloc, Backing::UringFile] {
        let t = Target::start();
        store(&t, backing);
        let total = free(&t);
        t.ok(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "origin", "size_in_mib": 4, "thin_provision": true}),
        );
        // Never written: zeros, nothing allocated.
        assert_eq!(read(&t, "lvs0/origin", 0, 4), vec![0u8; 4 * BS]);
        assert_eq!(free(&t), total);
        // Two clusters of pattern, written in pieces (first writes are
        // partial: the rest of each cluster must read zeros).
        let a = fill(2 * CLUSTER, 1);
        for (i, chunk) in a.chunks(64 * 1024).enumerate() {
            write(&t, "lvs0/origin", (i * 16) as u64, chunk);
        }
        assert_eq!(free(&t), total - 2, "{backing:?}");
        assert_eq!(read(&t, "lvs0/origin", 0, 2 * CLUSTER / BS), a);
        assert_eq!(
            read(&t, "lvs0/origin", 2 * CLUSTER_BLOCKS, 1),
            vec![0u8; BS]
        );

        let snap = t.ok(
            "bdev_lvol_snapshot",
            json!({"lvol_name": "lvs0/origin", "snapshot_name": "snap1",
                   "xattrs": {"user_created": "true", "snapshot_timestamp": ""}}),
        );
        let snap = snap.as_str().unwrap().to_string();
        assert_eq!(free(&t), total - 2, "a snapshot copies nothing");
        let clone = t.ok(
            "bdev_lvol_clone",
            json!({"snapshot_name": "lvs0/snap1", "clone_name": "clone1"}),
        );
        let clone = clone.as_str().unwrap().to_string();
        // Overwrite the first 8 KiB of the origin: one cluster copied.
        let b = fill(2 * BS, 9);
        write(&t, "lvs0/origin", 0, &b);
        assert_eq!(free(&t), total - 3, "{backing:?}");
        let mut want = a.clone();
        want[..2 * BS].copy_from_slice(&b);
        assert_eq!(
            read(&t, "lvs0/origin", 0, 2 * CLUSTER / BS),
            want,
            "{backing:?}"
        );
        assert_eq!(
            read(&t, "lvs0/clone1", 0, 2 * CLUSTER / BS),
            a,
            "{backing:?}"
        );
        assert_eq!(
            read(&t, "lvs0/snap1", 0, 2 * CLUSTER / BS),
            a,
            "{backing:?}"
        );

        let s = &bdev(&t, &snap)["driver_specific"]["lvol"];
        assert_eq!(s["snapshot"], true);
        assert_eq!(s["num_allocated_clusters"], 2);
        let mut clones: Vec<String> = s["clones"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        clones.sort();
        assert_eq!(clones, ["clone1", "origin"]);
        let o = &bdev(&t, "lvs0/origin")["driver_specific"]["lvol"];
        assert_eq!(o["clone"], true);
        assert_eq!(o["base_snapshot"], "snap1");
        assert_eq!(o["num_allocated_clusters"], 1);
        let c = &bdev(&t, &clone)["driver_specific"]["lvol"];
        assert_eq!(c["clone"], true);
        assert_eq!(c["num_allocated_clusters"], 0);
        assert_eq!(
            t.ok(
                "bdev_lvol_get_xattr",
                json!({"name": snap, "xattr_name": "user_created"})
            ),
            "true"
        );
        assert_eq!(
            t.ok(
                "bdev_lvol_get_xattr",
                json!({"name": snap, "xattr_name": "snapshot_timestamp"})
            ),
            ""
        );
        // Two clones: the snapshot cannot go. One: it merges into it.
        assert_eq!(
            error(&t, "bdev_lvol_delete", json!({"name": snap})),
            (-32603, "Operation not permitted".into())
        );
        t.ok("bdev_lvol_delete", json!({"name": clone}));
        assert_eq!(free(&t), total - 3);
        t.ok("bdev_lvol_delete", json!({"name": snap}));
        assert_eq!(
            free(&t),
            total - 2,
            "the snapshot's overwritten cluster is freed"
        );
        assert_eq!(
            read(&t, "lvs0/origin", 0, 2 * CLUSTER / BS),
            want,
            "{backing:?}"
        );
        let o = &bdev(&t, "lvs0/origin")["driver_specific"]["lvol"];
        assert_eq!(o["clone"], false);
        assert_eq!(o["num_allocated_clusters"], 2);
        assert_eq!(error(&t, "bdev_get_bdevs", json!({"name": snap})).0, -19);
    }
}

#[test]
fn a_store_on_a_file_reloads_by_examine_after_a_restart() {
    let dir = common::scratch_dir();
    let file = dir.join("lvs.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 * CLUSTER as u64)
        .unwrap();
    let conf = dir.join("conf.json");
    let data = fill(CLUSTER + 3 * BS, 5);
    let (uuid, lv) = {
        let t = Target::start();
        t.ok(
            "bdev_uring_create",
            json!({"name": "F0", "filename": file.to_str().unwrap(), "block_size": BS}),
        );
        let uuid = t.ok(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "F0", "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
        );
        let lv = t.ok(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "vol", "size_in_mib": 8, "thin_provision": true}),
        );
        write(&t, "lvs0/vol", 5, &data);
        t.ok(
            "bdev_lvol_snapshot",
            json!({"lvol_name": "lvs0/vol", "snapshot_name": "s"}),
        );
        let cfg = t.ok("save_config", Value::Null);
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(
            !text.contains("bdev_lvol"),
            "stores are examined, not saved"
        );
        std::fs::write(&conf, text).unwrap();
        (uuid, lv)
    };
    let t = Target::start_with(&["-c", conf.to_str().unwrap()]);
    t.ok("bdev_wait_for_examine", Value::Null);
    let s = lvs_info(&t);
    assert_eq!(s["uuid"], uuid);
    assert_eq!(
        s["free_clusters"].as_u64().unwrap(),
        s["total_data_clusters"].as_u64().unwrap() - 2
    );
    assert_eq!(read(&t, "lvs0/vol", 5, data.len() / BS), data);
    assert_eq!(read(&t, "lvs0/s", 5, data.len() / BS), data);
    assert_eq!(bdev(&t, "lvs0/vol")["name"], lv);
    assert_eq!(
        bdev(&t, "lvs0/vol")["driver_specific"]["lvol"]["base_snapshot"],
        "s"
    );
}

#[test]
fn bad_input_gets_spdks_codes_and_changes_nothing() {
    let t = Target::start();
    let uuid = store(&t, Backing::Malloc);
    let total = free(&t);
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": "v", "size_in_mib": 2, "thin_provision": true}),
    );
    // Duplicate name: raw -17.
    assert_eq!(
        error(
            &t,
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "v", "size_in_mib": 2})
        )
        .0,
        -17
    );
    // Thick larger than the free space.
    assert_eq!(
        error(
            &t,
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "big", "size_in_mib": 1000})
        ),
        (-32602, "No space left on device".into())
    );
    assert_eq!(free(&t), total);
    // Unknown store, neither or both selectors.
    assert_eq!(
        error(
            &t,
            "bdev_lvol_create",
            json!({"lvs_name": "nope", "lvol_name": "x", "size_in_mib": 2})
        )
        .0,
        -19
    );
    assert_eq!(
        error(
            &t,
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "uuid": uuid, "lvol_name": "x", "size_in_mib": 2})
        )
        .0,
        -22
    );
    assert_eq!(error(&t, "bdev_lvol_get_lvstores", json!({})).0, -22);
    assert_eq!(
        error(
            &t,
            "bdev_lvol_get_lvstores",
            json!({"uuid": "00000000-0000-0000-0000-000000000000"})
        )
        .0,
        -19
    );
    // A store on a claimed bdev, and a second store name.
    assert_eq!(
        error(
            &t,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "B0", "lvs_name": "other"})
        )
        .0,
        -1
    );
    t.ok(
        "bdev_malloc_create",
        json!({"name": "B1", "num_blocks": 16 * CLUSTER_BLOCKS, "block_size": BS}),
    );
    assert_eq!(
        error(
            &t,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "B1", "lvs_name": "lvs0"})
        )
        .0,
        -17
    );
    assert_eq!(bdev(&t, "B1")["claimed"], false, "the failed create let go");
    // Xattrs.
    assert_eq!(
        error(
            &t,
            "bdev_lvol_get_xattr",
            json!({"name": "lvs0/v", "xattr_name": "missing"})
        ),
        (-32603, "No such file or directory".into())
    );
    t.ok(
        "bdev_lvol_set_xattr",
        json!({"name": "lvs0/v", "xattr_name": "k", "xattr_value": "val"}),
    );
    assert_eq!(
        t.ok(
            "bdev_lvol_get_xattr",
            json!({"name": "lvs0/v", "xattr_name": "k"})
        ),
        "val"
    );
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/v", "snapshot_name": "snap"}),
    );
    assert_eq!(
        error(
            &t,
            "bdev_lvol_set_xattr",
            json!({"name": "lvs0/snap", "xattr_name": "k", "xattr_value": "v"})
        ),
        (-32602, "Operation not permitted".into())
    );
    // Unknown lvols.
    for m in [
        "bdev_lvol_delete",
        "bdev_lvol_set_read_only",
        "bdev_lvol_detach_parent",
    ] {
        assert_eq!(error(&t, m, json!({"name": "lvs0/none"})).0, -19, "{m}");
    }
    // Writes to a snapshot fail; its data stays.
    assert!(t
        .call(
            "bdev_write",
            json!({"name": "lvs0/snap", "offset_blocks": 0, "data": hex(&[1u8; BS])})
        )
        .is_err());
    // A shrink below what the snapshots under an lvol hold, and of an open
    // lvol, is refused and changes nothing; a grow and a plain shrink work.
    write(&t, "lvs0/v", CLUSTER_BLOCKS, &fill(BS, 8));
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/v", "snapshot_name": "s2"}),
    );
    assert_eq!(
        error(
            &t,
            "bdev_lvol_resize",
            json!({"name": "lvs0/v", "size_in_mib": 1})
        ),
        (-32602, "Invalid argument".into())
    );
    assert_eq!(bdev(&t, "lvs0/v")["num_blocks"], 2 * CLUSTER_BLOCKS);
    t.ok(
        "bdev_lvol_resize",
        json!({"name": "lvs0/v", "size_in_mib": 4}),
    );
    assert_eq!(bdev(&t, "lvs0/v")["num_blocks"], 4 * CLUSTER_BLOCKS);
    t.ok(
        "bdev_lvol_resize",
        json!({"name": "lvs0/v", "size_in_mib": 3}),
    );
    let v = bdev(&t, "lvs0/v")["name"].as_str().unwrap().to_string();
    t.export_tcp("nqn.2016-06.io.spdk:v", &v);
    assert_eq!(
        error(
            &t,
            "bdev_lvol_resize",
            json!({"name": "lvs0/v", "size_in_mib": 2})
        ),
        (-32602, "Device or resource busy".into())
    );
    assert_eq!(bdev(&t, "lvs0/v")["num_blocks"], 3 * CLUSTER_BLOCKS);
    // Names up to 255 bytes.
    let long = "n".repeat(255);
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": long, "size_in_mib": 1, "thin_provision": true}),
    );
    assert!(t
        .call(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "n".repeat(256), "size_in_mib": 1, "thin_provision": true})
        )
        .is_err());
}

#[test]
fn inflate_decouple_and_detach_parent_move_data_and_links() {
    let t = Target::start();
    store(&t, Backing::UringFile);
    t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": "vol", "size_in_mib": 4, "thin_provision": true}),
    );
    let a = fill(BS, 1);
    let b = fill(BS, 2);
    write(&t, "lvs0/vol", 0, &a);
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/vol", "snapshot_name": "s1"}),
    );
    write(&t, "lvs0/vol", CLUSTER_BLOCKS, &b);
    t.ok(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/vol", "snapshot_name": "s2"}),
    );
    t.ok(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs0/s2", "clone_name": "c"}),
    );
    let before = free(&t);

    // Decouple: the clusters of the parent (s2 holds cluster 1) are
    // copied, the parent becomes the grandparent.
    t.ok("bdev_lvol_decouple_parent", json!({"name": "lvs0/c"}));
    assert_eq!(free(&t), before - 1);
    let d = &bdev(&t, "lvs0/c")["driver_specific"]["lvol"];
    assert_eq!(d["base_snapshot"], "s1");
    assert_eq!(d["num_allocated_clusters"], 1);
    assert_eq!(d["thin_provision"], true);
    assert_eq!(read(&t, "lvs0/c", 0, 1), a);
    assert_eq!(read(&t, "lvs0/c", CLUSTER_BLOCKS, 1), b);

    // Inflate: every cluster, no parent, thick.
    t.ok("bdev_lvol_inflate", json!({"name": "lvs0/vol"}));
    assert_eq!(free(&t), before - 1 - 4);
    let d = &bdev(&t, "lvs0/vol")["driver_specific"]["lvol"];
    assert_eq!(d["clone"], false);
    assert_eq!(d["thin_provision"], false);
    assert_eq!(d["num_allocated_clusters"], 4);
    assert_eq!(read(&t, "lvs0/vol", 0, 1), a);
    assert_eq!(read(&t, "lvs0/vol", CLUSTER_BLOCKS, 1), b);
    assert_eq!(read(&t, "lvs0/vol", 2 * CLUSTER_BLOCKS, 1), vec![0u8; BS]);

    // Detach (Longhorn): no copy; s1 has no parent, so c's parent goes and
    // what only s1 held reads as zeros.
    t.ok("bdev_lvol_detach_parent", json!({"name": "lvs0/c"}));
    assert_eq!(free(&t), before - 1 - 4);
    let d = &bdev(&t, "lvs0/c")["driver_specific"]["lvol"];
    assert_eq!(d["clone"], false);
    assert_eq!(read(&t, "lvs0/c", 0, 1), vec![0u8; BS]);
    assert_eq!(read(&t, "lvs0/c", CLUSTER_BLOCKS, 1), b);
    // Decouple without a parent: EINVAL after the lookup.
    assert_eq!(
        error(&t, "bdev_lvol_decouple_parent", json!({"name": "lvs0/c"})),
        (-32602, "Invalid argument".into())
    );
}

#[test]
fn removing_the_base_unloads_the_store_and_adding_it_back_loads_it() {
    let dir = common::scratch_dir();
    let file = dir.join("aio.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(32 * CLUSTER as u64)
        .unwrap();
    let t = Target::start();
    let aio = json!({"name": "A0", "filename": file.to_str().unwrap(), "block_size": BS});
    t.ok("bdev_aio_create", aio.clone());
    t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "A0", "lvs_name": "A0", "cluster_sz": CLUSTER}),
    );
    let lv = t.ok(
        "bdev_lvol_create",
        json!({"lvs_name": "A0", "lvol_name": "r", "size_in_mib": 4, "thin_provision": true}),
    );
    let data = fill(2 * BS, 3);
    write(&t, "A0/r", 7, &data);
    // Exported: the namespace goes with the hot-removed lvol.
    t.export_tcp("nqn.2023-01.io.longhorn.spdk:r", lv.as_str().unwrap());
    // Longhorn deletes a disk with bdev_aio_delete only.
    t.ok("bdev_aio_delete", json!({"name": "A0"}));
    assert_eq!(t.ok("bdev_lvol_get_lvstores", Value::Null), json!([]));
    assert_eq!(error(&t, "bdev_get_bdevs", json!({"name": "A0/r"})).0, -19);
    let subs = t.ok(
        "nvmf_get_subsystems",
        json!({"nqn": "nqn.2023-01.io.longhorn.spdk:r"}),
    );
    assert_eq!(subs[0]["namespaces"], json!([]));
    t.ok("bdev_aio_create", aio);
    t.ok("bdev_wait_for_examine", Value::Null);
    assert_eq!(bdev(&t, "A0/r")["name"], lv);
    assert_eq!(read(&t, "A0/r", 7, 2), data);
}

#[test]
fn spdk_rpc_py_drives_lvols_unchanged() {
    if !common::spdk_rpc_available() {
        return;
    }
    let t = Target::start();
    let rpc = |args: &[&str]| {
        common::spdk_rpc(&t, args).unwrap_or_else(|e| panic!("rpc.py {args:?}: {e}"))
    };
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 64 * CLUSTER_BLOCKS, "block_size": BS}),
    );
    let u = rpc(&["bdev_lvol_create_lvstore", "M0", "lvs0", "-c", "1048576"]);
    let u = u.trim().to_string();
    let stores: Value =
        serde_json::from_str(&rpc(&["bdev_lvol_get_lvstores", "-l", "lvs0"])).unwrap();
    assert_eq!(stores[0]["uuid"], u.as_str());
    let lv = rpc(&[
        "bdev_lvol_create",
        "-l",
        "lvs0",
        "-t",
        "-c",
        "default",
        "vol",
        "8",
    ]);
    let lv = lv.trim().to_string();
    rpc(&["bdev_lvol_create", "-u", &u, "thick", "2"]);
    write(&t, "lvs0/vol", 0, &fill(BS, 4));
    let snap = rpc(&["bdev_lvol_snapshot", "lvs0/vol", "snap"]);
    let clone = rpc(&["bdev_lvol_clone", "lvs0/snap", "c"]);
    assert_eq!(read(&t, clone.trim(), 0, 1), fill(BS, 4));
    let lvols: Value = serde_json::from_str(&rpc(&["bdev_lvol_get_lvols", "-l", "lvs0"])).unwrap();
    assert_eq!(lvols.as_array().unwrap().len(), 4);
    rpc(&["bdev_lvol_resize", "lvs0/vol", "16"]);
    assert_eq!(bdev(&t, &lv)["num_blocks"], 16 * CLUSTER_BLOCKS);
    rpc(&["bdev_lvol_rename", "lvs0/vol", "vol2"]);
    assert_eq!(bdev(&t, &lv)["aliases"], json!(["lvs0/vol2"]));
    rpc(&["bdev_lvol_inflate", "lvs0/c"]);
    rpc(&["bdev_lvol_set_read_only", "lvs0/thick"]);
    rpc(&["bdev_lvol_decouple_parent", "lvs0/vol2"]);
    rpc(&["bdev_lvol_delete", "lvs0/c"]);
    rpc(&["bdev_lvol_delete", snap.trim()]);
    rpc(&["bdev_lvol_rename_lvstore", "lvs0", "lvs1"]);
    assert_eq!(bdev(&t, &lv)["aliases"], json!(["lvs1/vol2"]));
    let e = common::spdk_rpc(&t, &["bdev_lvol_delete", "lvs1/none"]).unwrap_err();
    assert!(e.contains("-19"), "{e}");
    rpc(&["bdev_lvol_delete_lvstore", "-l", "lvs1"]);
    assert_eq!(rpc(&["bdev_lvol_get_lvstores"]).trim(), "[]");
    assert_eq!(error(&t, "bdev_get_bdevs", json!({"name": lv})).0, -19);
    // The wiped store is not found again.
    t.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "M0", "lvs_name": "again"}),
    );
}
