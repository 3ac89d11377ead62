//! SPDK's own `rpc.py` (PyPI package `spdk`, command `spdk-rpc`) drives the
//! real binary unchanged: creates, lists, injects, saves and reloads the
//! configuration, and kills the instance.
//!
//! Skipped with a notice when `spdk-rpc` is not installed, unless
//! `FERROPLANE_REQUIRE_SPDK_RPC=1` (CI sets it) makes that a failure.

mod common;

use std::time::Duration;

use common::{spdk_rpc, spdk_rpc_available, Target};
use serde_json::Value;

fn ok(t: &Target, args: &[&str]) -> String {
    spdk_rpc(t, args).unwrap_or_else(|e| panic!("spdk-rpc {args:?} failed:\n{e}"))
}

#[test]
fn spdk_rpc_py_drives_the_target_unchanged() {
    if !spdk_rpc_available() {
        return;
    }
    let mut t = Target::start();
    assert!(ok(&t, &["spdk_get_version"]).contains("version"));
    assert_eq!(
        ok(&t, &["bdev_malloc_create", "-b", "Malloc0", "8", "512"]).trim(),
        "Malloc0"
    );
    // Unnamed malloc: SPDK's auto name.
    assert_eq!(
        ok(&t, &["bdev_malloc_create", "4", "4096"]).trim(),
        "Malloc1"
    );
    assert_eq!(
        ok(&t, &["bdev_null_create", "Null0", "8", "512"]).trim(),
        "Null0"
    );
    ok(
        &t,
        &[
            "bdev_delay_create",
            "-b",
            "Malloc0",
            "-d",
            "Delay0",
            "-r",
            "10",
            "-t",
            "20",
            "-w",
            "10",
            "-n",
            "20",
        ],
    );
    ok(&t, &["bdev_error_create", "Malloc1"]);
    ok(
        &t,
        &[
            "bdev_error_inject_error",
            "EE_Malloc1",
            "read",
            "failure",
            "-n",
            "2",
        ],
    );
    // File-backed bdevs under both of SPDK's names.
    let img = t.dir.join("u.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let img = img.to_str().unwrap();
    assert_eq!(
        ok(&t, &["bdev_uring_create", img, "Uring0", "4096"]).trim(),
        "Uring0"
    );
    ok(&t, &["bdev_uring_delete", "Uring0"]);
    assert_eq!(
        ok(&t, &["bdev_aio_create", img, "Aio0", "4096"]).trim(),
        "Aio0"
    );
    ok(&t, &["bdev_aio_delete", "Aio0"]);
    ok(
        &t,
        &["bdev_delay_update_latency", "Delay0", "avg_read", "15"],
    );
    let d: Value = serde_json::from_str(&ok(&t, &["bdev_get_bdevs", "-b", "Delay0"])).unwrap();
    assert_eq!(d[0]["driver_specific"]["delay"]["avg_read_latency"], 15);
    let all: Value = serde_json::from_str(&ok(&t, &["bdev_get_bdevs"])).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 5);
    let st: Value = serde_json::from_str(&ok(&t, &["bdev_get_iostat"])).unwrap();
    assert_eq!(st["bdevs"].as_array().unwrap().len(), 5);
    let one: Value =
        serde_json::from_str(&ok(&t, &["bdev_get_iostat", "--names", "Malloc0,Null0"])).unwrap();
    assert_eq!(one["bdevs"].as_array().unwrap().len(), 2);
    ok(&t, &["bdev_get_iostat", "-c", "--names", "Malloc0"]);
    ok(&t, &["bdev_wait_for_examine"]);
    let r: Value = serde_json::from_str(&ok(&t, &["framework_get_reactors"])).unwrap();
    assert_eq!(r["reactors"].as_array().unwrap().len(), 2);
    ok(&t, &["thread_get_stats"]);
    ok(&t, &["thread_get_pollers"]);
    ok(&t, &["rpc_get_methods"]);

    // Errors come back as rpc.py reports them.
    let e = spdk_rpc(&t, &["bdev_malloc_create", "-b", "Malloc0", "8", "512"]).unwrap_err();
    assert!(e.contains("-17") && e.contains("File exists"), "{e}");
    let e = spdk_rpc(&t, &["bdev_malloc_delete", "Nope"]).unwrap_err();
    assert!(e.contains("-19") && e.contains("No such device"), "{e}");

    // save_config, wipe, load_config: the same bdevs come back.
    let saved = ok(&t, &["save_config"]);
    let before: Value = serde_json::from_str(&ok(&t, &["bdev_get_bdevs"])).unwrap();
    for (m, n) in [
        ("bdev_error_delete", "EE_Malloc1"),
        ("bdev_delay_delete", "Delay0"),
        ("bdev_null_delete", "Null0"),
        ("bdev_malloc_delete", "Malloc0"),
        ("bdev_malloc_delete", "Malloc1"),
    ] {
        ok(&t, &[m, n]);
    }
    assert_eq!(ok(&t, &["bdev_get_bdevs"]).trim(), "[]");
    let file = t.dir.join("saved.json");
    std::fs::write(&file, &saved).unwrap();
    ok(&t, &["load_config", "-j", file.to_str().unwrap()]);
    let after: Value = serde_json::from_str(&ok(&t, &["bdev_get_bdevs"])).unwrap();
    let key = |v: &Value| {
        let mut k: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().into(),
                    b["uuid"].as_str().unwrap().into(),
                )
            })
            .collect();
        k.sort();
        k
    };
    assert_eq!(key(&after), key(&before));

    ok(&t, &["spdk_kill_instance", "SIGTERM"]);
    assert_eq!(t.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!t.socket.exists());
}

#[test]
fn spdk_rpc_py_drives_raid_unchanged() {
    if !spdk_rpc_available() {
        return;
    }
    let t = Target::start();
    for m in ["M0", "M1", "M2"] {
        ok(&t, &["bdev_malloc_create", "-b", m, "8", "512"]);
    }
    ok(&t, &["bdev_raid_set_options", "-w", "512"]);
    let cfg = ok(&t, &["save_config"]);
    assert!(cfg.contains("\"process_window_size_kb\": 512"), "{cfg}");
    ok(
        &t,
        &[
            "bdev_raid_create",
            "-n",
            "R0",
            "-z",
            "64",
            "-r",
            "0",
            "-b",
            "M0 M1",
        ],
    );
    let raids: Value = serde_json::from_str(&ok(&t, &["bdev_raid_get_bdevs", "online"])).unwrap();
    assert_eq!(raids[0]["name"], "R0");
    assert_eq!(raids[0]["raid_level"], "raid0");
    assert_eq!(raids[0]["strip_size_kb"], 64);
    assert_eq!(raids[0]["num_base_bdevs_discovered"], 2);
    let b: Value = serde_json::from_str(&ok(&t, &["bdev_get_bdevs", "-b", "R0"])).unwrap();
    assert_eq!(b[0]["driver_specific"]["raid"]["state"], "online");
    ok(&t, &["bdev_raid_delete", "R0"]);
    ok(
        &t,
        &[
            "bdev_raid_create",
            "-n",
            "R1",
            "-r",
            "raid1",
            "-b",
            "M0 M1",
            "-s",
        ],
    );
    ok(&t, &["bdev_raid_remove_base_bdev", "M1"]);
    ok(&t, &["bdev_raid_add_base_bdev", "R1", "M2"]);
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r: Value = serde_json::from_str(&ok(&t, &["bdev_raid_get_bdevs", "all"])).unwrap();
        if r[0]["num_base_bdevs_operational"] == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "rebuild did not finish: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A member already claimed: rpc.py reports the error, nothing changes.
    let e = spdk_rpc(
        &t,
        &["bdev_raid_create", "-n", "R2", "-r", "1", "-b", "M0 M1"],
    )
    .unwrap_err();
    assert!(e.contains("claimed"), "{e}");
    ok(&t, &["bdev_raid_delete", "R1", "--clear-sb"]);
    assert_eq!(ok(&t, &["bdev_raid_get_bdevs", "all"]).trim(), "[]");
}
