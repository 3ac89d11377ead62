//! The `nvme` bdev module's options through the real binary: Longhorn's
//! engine's first two calls (`bdev_nvme_set_options{15, 2, 10, 10, 10000}`,
//! `bdev_nvme_set_hotplug{enable, 100000}`, LONGHORN.md §6.1) succeed and
//! are kept; bad combinations get SPDK's EINVAL and change nothing; unknown
//! or mistyped keys are refused; the values survive save_config → `-c`;
//! SPDK's `rpc.py` drives both methods unchanged.

mod common;

use std::time::{Duration, Instant};

use common::{spdk_rpc, spdk_rpc_available, Target};
use serde_json::{json, Value};

/// The engine's call, exactly as its client sends it (`types/nvme.go`).
fn longhorn_options() -> Value {
    json!({"ctrlr_loss_timeout_sec": 15, "reconnect_delay_sec": 2,
           "fast_io_fail_timeout_sec": 10, "transport_ack_timeout": 10,
           "keep_alive_timeout_ms": 10000})
}

fn bdev_config(t: &Target) -> Vec<Value> {
    t.ok("framework_get_config", json!({"name": "bdev"}))
        .as_array()
        .unwrap()
        .clone()
}

/// The params of the `method` entry in the bdev section (exactly one).
fn entry(t: &Target, method: &str) -> Value {
    let cfg = bdev_config(t);
    let found: Vec<&Value> = cfg.iter().filter(|e| e["method"] == method).collect();
    assert_eq!(found.len(), 1, "{method} in {cfg:?}");
    found[0]["params"].clone()
}

fn methods(cfg: &[Value]) -> Vec<&str> {
    cfg.iter().map(|e| e["method"].as_str().unwrap()).collect()
}

#[test]
fn longhorn_first_calls_succeed_and_survive_a_restart() {
    let t = Target::start();
    // Before any call: SPDK's defaults are written.
    let d = entry(&t, "bdev_nvme_set_options");
    assert_eq!(d["keep_alive_timeout_ms"], 10000);
    assert_eq!(d["transport_retry_count"], 4);
    assert_eq!(d["bdev_retry_count"], 3);
    assert_eq!(d["ctrlr_loss_timeout_sec"], 0);
    assert_eq!(d["nvme_adminq_poll_period_us"], 10000);
    assert_eq!(d["delay_cmd_submit"], true);
    assert_eq!(d["action_on_timeout"], "none");
    assert_eq!(d["dhchap_digests"], json!(["sha256", "sha384", "sha512"]));
    assert_eq!(d["multipath_opts"], json!({"policy": "active_passive"}));
    assert_eq!(
        entry(&t, "bdev_nvme_set_hotplug"),
        json!({"period_us": 100000, "enable": false})
    );

    assert_eq!(
        t.ok("bdev_nvme_set_options", longhorn_options()),
        json!(true)
    );
    assert_eq!(
        t.ok(
            "bdev_nvme_set_hotplug",
            json!({"enable": true, "period_us": 100000})
        ),
        json!(true)
    );
    let o = entry(&t, "bdev_nvme_set_options");
    for (k, v) in longhorn_options().as_object().unwrap() {
        assert_eq!(&o[k], v, "{k}");
    }
    // The rest stays at its default.
    assert_eq!(o["transport_retry_count"], 4);
    assert_eq!(o["bdev_retry_count"], 3);
    assert_eq!(o.as_object().unwrap().len(), 33);

    // SPDK's order: layer and module options, the nvme module's options
    // and hotplug, then each bdev's create, then wait_for_examine.
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 64, "block_size": 512}),
    );
    let cfg = bdev_config(&t);
    let m = methods(&cfg);
    let pos = |name: &str| m.iter().position(|x| *x == name).unwrap();
    assert_eq!(m[0], "bdev_set_options");
    assert_eq!(
        pos("bdev_nvme_set_hotplug"),
        pos("bdev_nvme_set_options") + 1
    );
    assert!(pos("bdev_raid_set_options") < pos("bdev_nvme_set_options"));
    assert!(pos("bdev_nvme_set_hotplug") < pos("bdev_malloc_create"));
    assert_eq!(*m.last().unwrap(), "bdev_wait_for_examine");

    // save_config → a fresh process with -c → the same values.
    let saved = t.ok("save_config", Value::Null);
    let file = t.dir.join("saved.json");
    std::fs::write(&file, serde_json::to_string_pretty(&saved).unwrap()).unwrap();
    let t2 = Target::start_with(&["--cpus", "0,1", "-c", file.to_str().unwrap()]);
    assert_eq!(bdev_config(&t2), cfg);
    drop(t2);

    // Also when the config is loaded in the start-up phase (--wait-for-rpc):
    // set_options applies before framework_start_init, hotplug after.
    let t3 = Target::start_with(&[
        "--cpus",
        "0,1",
        "--wait-for-rpc",
        "-c",
        file.to_str().unwrap(),
    ]);
    t3.ok("framework_start_init", Value::Null);
    // The run-time part of the config is applied after that call answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bdev_config(&t3) != cfg && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(bdev_config(&t3), cfg);
}

#[test]
fn set_options_is_allowed_before_framework_start_init_and_hotplug_after() {
    let t = Target::start_with(&["--cpus", "0", "--wait-for-rpc"]);
    assert_eq!(
        t.ok("bdev_nvme_set_options", longhorn_options()),
        json!(true)
    );
    // SPDK registers set_hotplug for the run-time state only.
    assert_eq!(
        t.err_code("bdev_nvme_set_hotplug", json!({"enable": true})),
        -1
    );
    t.ok("framework_start_init", Value::Null);
    t.ok("bdev_nvme_set_hotplug", json!({"enable": true}));
    assert_eq!(
        entry(&t, "bdev_nvme_set_options")["ctrlr_loss_timeout_sec"],
        15
    );
    assert_eq!(
        entry(&t, "bdev_nvme_set_hotplug"),
        json!({"period_us": 100000, "enable": true})
    );
}

#[test]
fn bad_options_get_spdks_errors_and_change_nothing() {
    let t = Target::start();
    t.ok("bdev_nvme_set_options", longhorn_options());
    t.ok(
        "bdev_nvme_set_hotplug",
        json!({"enable": true, "period_us": 5000}),
    );
    let before = bdev_config(&t);

    // Invalid combinations, each over the options in force (15, 2, 10):
    // SPDK's -EINVAL with strerror, and its reason after it.
    for (params, reason) in [
        (
            json!({"ctrlr_loss_timeout_sec": 0}),
            "Both reconnect_delay_sec and fast_io_fail_timeout_sec must be 0",
        ),
        (
            json!({"reconnect_delay_sec": 20}),
            "reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec",
        ),
        (
            json!({"reconnect_delay_sec": 0}),
            "reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0",
        ),
        (
            json!({"fast_io_fail_timeout_sec": 1}),
            "reconnect_delay_sec can't be more than fast_io_fail_timeout_sec",
        ),
        (
            json!({"fast_io_fail_timeout_sec": 16}),
            "fast_io_fail_timeout_sec can't be more than ctrlr_loss_timeout_sec",
        ),
        (
            json!({"ctrlr_loss_timeout_sec": -2}),
            "ctrlr_loss_timeout_sec can't be less than -1",
        ),
        (
            json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 11}),
            "reconnect_delay_sec can't be more than fast_io_fail_timeout_sec",
        ),
        (
            json!({"bdev_retry_count": -2}),
            "bdev_retry_count can't be less than -1",
        ),
        (json!({"timeout_admin_us": 5}), "timeout_admin_us"),
        (
            json!({"multipath_opts": {"policy": "active_active", "min_io": 0}}),
            "min_io must be non-zero",
        ),
    ] {
        let e = t.call("bdev_nvme_set_options", params.clone()).unwrap_err();
        assert_eq!(e["code"], -22, "{params}: {e}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.starts_with("Invalid argument") && msg.contains(reason),
            "{params}: {msg}"
        );
        assert_eq!(bdev_config(&t), before, "{params} changed something");
    }

    // Unknown, mistyped, out of range or null keys: -32602 naming the key,
    // nothing applied (not even the valid keys beside it).
    for (method, params, key) in [
        (
            "bdev_nvme_set_options",
            json!({"keep_alive_timeout_ms": 5000, "no_such_option": true}),
            "no_such_option",
        ),
        (
            "bdev_nvme_set_options",
            json!({"keep_alive_timeout_ms": 5000, "transport_ack_timeout": 256}),
            "transport_ack_timeout",
        ),
        (
            "bdev_nvme_set_options",
            json!({"keep_alive_timeout_ms": 5000, "reconnect_delay_sec": -1}),
            "reconnect_delay_sec",
        ),
        (
            "bdev_nvme_set_options",
            json!({"keep_alive_timeout_ms": "5000"}),
            "keep_alive_timeout_ms",
        ),
        (
            "bdev_nvme_set_options",
            json!({"keep_alive_timeout_ms": 5000, "ctrlr_loss_timeout_sec": null}),
            "ctrlr_loss_timeout_sec",
        ),
        (
            "bdev_nvme_set_options",
            json!({"keep_alive_timeout_ms": 5000, "action_on_timeout": "panic"}),
            "action_on_timeout",
        ),
        (
            "bdev_nvme_set_options",
            json!({"multipath_opts": {"policy": "active_active", "min_ios": 2}}),
            "min_ios",
        ),
        (
            "bdev_nvme_set_hotplug",
            json!({"enable": false, "period": 1}),
            "period",
        ),
        ("bdev_nvme_set_hotplug", json!({"period_us": 1}), "enable"),
        ("bdev_nvme_set_hotplug", json!({"enable": "yes"}), "enable"),
    ] {
        let e = t.call(method, params.clone()).unwrap_err();
        assert_eq!(e["code"], -32602, "{method} {params}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(key),
            "{method} {params}: {e}"
        );
        assert_eq!(
            bdev_config(&t),
            before,
            "{method} {params} changed something"
        );
    }
    assert_eq!(t.err_code("bdev_nvme_set_hotplug", Value::Null), -32602);

    // A valid partial call changes just what it names.
    t.ok(
        "bdev_nvme_set_options",
        json!({"keep_alive_timeout_ms": 5000, "bdev_retry_count": -1}),
    );
    let o = entry(&t, "bdev_nvme_set_options");
    assert_eq!(o["keep_alive_timeout_ms"], 5000);
    assert_eq!(o["bdev_retry_count"], -1);
    assert_eq!(o["ctrlr_loss_timeout_sec"], 15);
    assert_eq!(o["reconnect_delay_sec"], 2);
    // Hotplug: period 0 is the default, longer than 10 s is clamped.
    t.ok(
        "bdev_nvme_set_hotplug",
        json!({"enable": false, "period_us": 0}),
    );
    assert_eq!(
        entry(&t, "bdev_nvme_set_hotplug"),
        json!({"period_us": 100000, "enable": false})
    );
    t.ok(
        "bdev_nvme_set_hotplug",
        json!({"enable": true, "period_us": 99_000_000u64}),
    );
    assert_eq!(
        entry(&t, "bdev_nvme_set_hotplug"),
        json!({"period_us": 10_000_000u64, "enable": true})
    );
}

#[test]
fn spdk_rpc_py_sets_nvme_options_and_hotplug() {
    if !spdk_rpc_available() {
        return;
    }
    let t = Target::start();
    // rpc.py also sends its flag defaults (delay_cmd_submit, the
    // store_true booleans): all must be accepted.
    spdk_rpc(
        &t,
        &[
            "bdev_nvme_set_options",
            "-l",
            "15",
            "-o",
            "2",
            "-u",
            "10",
            "-e",
            "10",
            "-k",
            "10000",
        ],
    )
    .unwrap();
    spdk_rpc(&t, &["bdev_nvme_set_hotplug", "--hotplug", "-r", "100000"]).unwrap();
    let o = entry(&t, "bdev_nvme_set_options");
    for (k, v) in longhorn_options().as_object().unwrap() {
        assert_eq!(&o[k], v, "{k}");
    }
    assert_eq!(
        entry(&t, "bdev_nvme_set_hotplug"),
        json!({"period_us": 100000, "enable": true})
    );
    // Its DH-HMAC-CHAP lists and multipath group arrive as SPDK decodes them.
    spdk_rpc(
        &t,
        &[
            "bdev_nvme_set_options",
            "--dhchap-digests",
            "sha512,sha256",
            "--policy",
            "active_active",
            "--selector",
            "queue_depth",
        ],
    )
    .unwrap();
    let o = entry(&t, "bdev_nvme_set_options");
    assert_eq!(o["dhchap_digests"], json!(["sha256", "sha512"]));
    assert_eq!(
        o["multipath_opts"],
        json!({"policy": "active_active", "selector": "queue_depth"})
    );
    assert_eq!(o["ctrlr_loss_timeout_sec"], 15);

    // A bad combination comes back as rpc.py reports SPDK's.
    let before = bdev_config(&t);
    let e = spdk_rpc(&t, &["bdev_nvme_set_options", "-l", "0"]).unwrap_err();
    assert!(e.contains("-22") && e.contains("Invalid argument"), "{e}");
    assert_eq!(bdev_config(&t), before);

    // rpc.py's save_config, then a fresh process with -c.
    let saved = spdk_rpc(&t, &["save_config"]).unwrap();
    let file = t.dir.join("saved.json");
    std::fs::write(&file, &saved).unwrap();
    let t2 = Target::start_with(&["--cpus", "0,1", "-c", file.to_str().unwrap()]);
    assert_eq!(bdev_config(&t2), before);
    // And rpc.py's load_config into a running target accepts it.
    spdk_rpc(&t2, &["load_config", "-j", file.to_str().unwrap()]).unwrap();
    assert_eq!(bdev_config(&t2), before);
}
