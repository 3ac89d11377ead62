//! `save_config` output loaded with `-c` into a fresh process recreates the
//! same bdevs, including a config in SPDK's own order (virtual bdevs
//! before their bases).

mod common;

use common::Target;
use serde_json::{json, Value};

/// What must survive a save/load: identity, geometry and module settings.
fn fingerprint(t: &Target) -> Vec<Value> {
    let mut v: Vec<Value> = t
        .ok("bdev_get_bdevs", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            json!({
                "name": b["name"], "uuid": b["uuid"], "product_name": b["product_name"],
                "block_size": b["block_size"], "num_blocks": b["num_blocks"],
                "claimed": b["claimed"], "driver_specific": b["driver_specific"],
            })
        })
        .collect();
    v.sort_by_key(|b| b["name"].as_str().unwrap().to_string());
    v
}

#[test]
fn saved_config_recreates_the_same_bdevs() {
    let t = Target::start();
    t.ok(
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 2048, "block_size": 512}),
    );
    t.ok(
        "bdev_malloc_create",
        json!({"num_blocks": 16, "block_size": 4096}),
    );
    t.ok(
        "bdev_null_create",
        json!({"name": "Null0", "num_blocks": 100, "block_size": 4096}),
    );
    t.ok(
        "bdev_delay_create",
        json!({"name": "Delay0", "base_bdev_name": "Malloc0", "avg_read_latency": 30,
        "p99_read_latency": 90, "avg_write_latency": 40, "p99_write_latency": 120}),
    );
    t.ok(
        "bdev_delay_update_latency",
        json!({"delay_bdev_name": "Delay0", "latency_type": "p99_write", "latency_us": 150}),
    );
    t.ok(
        "bdev_error_create",
        json!({"base_name": "Null0", "uuid": "c0ffee00-0000-4000-8000-000000000001"}),
    );
    let before = fingerprint(&t);
    assert_eq!(before.len(), 5);

    // The client-side path (rpc.py save_config) and the server-side one agree.
    let subsystems = t.ok("framework_get_subsystems", Value::Null);
    let mut assembled = vec![];
    for s in subsystems.as_array().unwrap() {
        let name = s["subsystem"].as_str().unwrap();
        let cfg = t.ok(
            "framework_get_config",
            json!({"name": name, "with_batches": false}),
        );
        assembled.push(json!({"subsystem": name, "config": cfg}));
    }
    let saved = t.ok("save_config", Value::Null);
    assert_eq!(saved, json!({"subsystems": assembled}));
    let bdev_cfg = saved["subsystems"][0]["config"].as_array().unwrap();
    assert_eq!(bdev_cfg.first().unwrap()["method"], "bdev_set_options");
    assert_eq!(
        bdev_cfg.last().unwrap(),
        &json!({"method": "bdev_wait_for_examine"})
    );

    let file = t.dir.join("saved.json");
    std::fs::write(&file, serde_json::to_string_pretty(&saved).unwrap()).unwrap();
    let t2 = Target::start_with(&["--cpus", "0,1", "-c", file.to_str().unwrap()]);
    assert_eq!(fingerprint(&t2), before);
    drop(t2);

    // SPDK writes module-level vbdev configs before the per-bdev creates.
    let mut reordered: Vec<Value> = bdev_cfg.clone();
    let vb: Vec<Value> = reordered
        .iter()
        .filter(|e| e["method"] == "bdev_delay_create" || e["method"] == "bdev_error_create")
        .cloned()
        .collect();
    reordered.retain(|e| e["method"] != "bdev_delay_create" && e["method"] != "bdev_error_create");
    for (i, e) in vb.into_iter().enumerate() {
        reordered.insert(1 + i, e);
    }
    let spdk_order = json!({"subsystems": [{"subsystem": "bdev", "config": reordered}]});
    let file = t.dir.join("spdk-order.json");
    std::fs::write(&file, spdk_order.to_string()).unwrap();
    let t3 = Target::start_with(&["--cpus", "0,1", "-c", file.to_str().unwrap()]);
    assert_eq!(fingerprint(&t3), before);
}

#[test]
fn a_bad_config_stops_start_up_with_a_reason() {
    let dir = common::scratch_dir();
    let file = dir.join("bad.json");
    std::fs::write(
        &file,
        r#"{"subsystems":[{"subsystem":"bdev","config":[
            {"method":"bdev_malloc_create","params":{"name":"A","num_blocks":8,"block_size":512}},
            {"method":"bdev_malloc_create","params":{"name":"A","num_blocks":8,"block_size":512}}]}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["--cpus", "0", "-r"])
        .arg(dir.join("s.sock"))
        .arg("-c")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("File exists"), "{err}");
    assert!(!dir.join("s.sock").exists(), "socket left behind");
}

#[test]
fn the_rpc_socket_opens_only_once_the_configuration_is_loaded() {
    // A configuration that takes a while to load: a raid1 with a superblock
    // over delay bdevs (the superblock write waits out their latency), and
    // an NVMe/TCP export of it, whose namespace reaches every core.
    let dir = common::scratch_dir();
    let cfg = dir.join("slow.json");
    let mut bdevs = Vec::new();
    for i in 0..2 {
        bdevs.push(json!({"method": "bdev_malloc_create",
            "params": {"name": format!("M{i}"), "num_blocks": 4096, "block_size": 512}}));
        bdevs.push(json!({"method": "bdev_delay_create",
            "params": {"name": format!("D{i}"), "base_bdev_name": format!("M{i}"),
                "avg_read_latency": 20000, "p99_read_latency": 20000,
                "avg_write_latency": 20000, "p99_write_latency": 20000}}));
    }
    bdevs.push(
        json!({"method": "bdev_raid_create", "params": {"name": "R0",
        "raid_level": "raid1", "base_bdevs": ["D0", "D1"], "superblock": true}}),
    );
    let nqn = "nqn.2016-06.io.spdk:slow";
    let config = json!({"subsystems": [
        {"subsystem": "bdev", "config": bdevs},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": true}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": nqn, "namespace": {"bdev_name": "R0"}}}
        ]}
    ]});
    std::fs::write(&cfg, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let cfg_arg = cfg.display().to_string();
    let t = Target::start_with(&["--cpus", "0,1", "-c", &cfg_arg]);
    // The first answer on the socket already sees all of it.
    let names = t.bdev_names();
    assert_eq!(names, ["D0", "D1", "M0", "M1", "R0"], "{names:?}");
    let subs = t.ok("nvmf_get_subsystems", json!({"nqn": nqn}));
    assert_eq!(subs[0]["namespaces"][0]["bdev_name"], "R0", "{subs}");
    let _ = std::fs::remove_dir_all(&dir);
}
