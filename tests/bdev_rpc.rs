//! Every bdev kind created, listed, written, read and deleted through the
//! real binary's socket, and every class of bad request answered with the
//! right error while the registry stays as it was.

mod common;

use common::{pattern, write_read, Client, Target};
use serde_json::{json, Value};

fn create_all(t: &Target) {
    assert_eq!(
        t.ok(
            "bdev_malloc_create",
            json!({"name": "Malloc0", "num_blocks": 2048, "block_size": 512})
        ),
        json!("Malloc0")
    );
    assert_eq!(
        t.ok(
            "bdev_malloc_create",
            json!({"name": "Malloc1", "num_blocks": 256, "block_size": 4096})
        ),
        json!("Malloc1")
    );
    assert_eq!(
        t.ok(
            "bdev_null_create",
            json!({"name": "Null0", "num_blocks": 1024, "block_size": 4096})
        ),
        json!("Null0")
    );
    assert_eq!(
        t.ok(
            "bdev_delay_create",
            json!({"name": "Delay0", "base_bdev_name": "Malloc0", "avg_read_latency": 100,
                   "p99_read_latency": 200, "avg_write_latency": 100, "p99_write_latency": 200})
        ),
        json!("Delay0")
    );
    assert_eq!(
        t.ok("bdev_error_create", json!({"base_name": "Malloc1"})),
        json!(true)
    );
}

#[test]
fn each_bdev_kind_is_created_listed_used_and_deleted() {
    let t = Target::start();
    create_all(&t);
    assert_eq!(
        t.bdev_names(),
        ["Delay0", "EE_Malloc1", "Malloc0", "Malloc1", "Null0"]
    );

    let all = t.ok("bdev_get_bdevs", Value::Null);
    let by = |n: &str| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == n)
            .unwrap()
            .clone()
    };
    let m0 = by("Malloc0");
    assert_eq!(m0["product_name"], "Malloc disk");
    assert_eq!(m0["block_size"], 512);
    assert_eq!(m0["num_blocks"], 2048);
    assert_eq!(m0["claimed"], true, "Delay0 claims its base");
    // SPDK's strings; claim_type only when claimed (bdev_rpc.c).
    assert_eq!(m0["claim_type"], "exclusive_write");
    assert_eq!(by("Null0")["claimed"], false);
    assert!(by("Null0").get("claim_type").is_none());
    assert_eq!(m0["aliases"], json!([m0["uuid"]]));
    assert_eq!(m0["supported_io_types"]["read"], true);
    assert_eq!(m0["driver_specific"], json!({}));
    assert_eq!(by("Null0")["product_name"], "Null disk");
    assert_eq!(by("Null0")["supported_io_types"]["unmap"], false);
    let d = by("Delay0");
    assert_eq!(d["product_name"], "delay");
    assert_eq!(d["driver_specific"]["delay"]["base_bdev_name"], "Malloc0");
    assert_eq!(d["driver_specific"]["delay"]["avg_read_latency"], 100);
    assert_eq!(by("EE_Malloc1")["product_name"], "Error Injection Disk");
    assert_eq!(
        by("EE_Malloc1")["driver_specific"],
        json!({"error_disk": {"base_bdev": "Malloc1"}})
    );

    // Lookup by name, by UUID alias, with timeout.
    let one = t.ok("bdev_get_bdevs", json!({"name": "Malloc0"}));
    assert_eq!(one.as_array().unwrap().len(), 1);
    let by_uuid = t.ok("bdev_get_bdevs", json!({"name": m0["uuid"]}));
    assert_eq!(by_uuid[0]["name"], "Malloc0");

    // Data through each kind. A claimed base refuses writers (EPERM).
    t.ok(
        "bdev_malloc_create",
        json!({"name": "Malloc2", "num_blocks": 64, "block_size": 512}),
    );
    let data = pattern(4096, 1);
    assert_eq!(write_read(&t, "Malloc2", 3, &data, 512), data);
    assert_eq!(
        t.err_code(
            "bdev_write",
            json!({"name": "Malloc0", "offset_blocks": 0, "data": common::hex(&data)})
        ),
        -1
    );
    let data = pattern(1024, 2);
    assert_eq!(write_read(&t, "Delay0", 100, &data, 512), data);
    // Delay0 writes landed on Malloc0.
    let r = t.ok(
        "bdev_read",
        json!({"name": "Malloc0", "offset_blocks": 100, "num_blocks": 2}),
    );
    assert_eq!(common::unhex(r["data"].as_str().unwrap()), data);
    let data = pattern(8192, 3);
    assert_eq!(write_read(&t, "EE_Malloc1", 7, &data, 4096), data);
    let r = t.ok(
        "bdev_read",
        json!({"name": "Malloc1", "offset_blocks": 7, "num_blocks": 2}),
    );
    assert_eq!(common::unhex(r["data"].as_str().unwrap()), data);
    // Null stores nothing, but the I/O succeeds.
    t.ok(
        "bdev_write",
        json!({"name": "Null0", "offset_blocks": 0, "data": common::hex(&pattern(4096, 4))}),
    );
    t.ok(
        "bdev_read",
        json!({"name": "Null0", "offset_blocks": 0, "num_blocks": 1}),
    );

    // Error injection through the socket: two reads fail, then success.
    t.ok(
        "bdev_error_inject_error",
        json!({"name": "EE_Malloc1", "io_type": "read", "error_type": "failure", "num": 2}),
    );
    for _ in 0..2 {
        assert_eq!(
            t.err_code(
                "bdev_read",
                json!({"name": "EE_Malloc1", "offset_blocks": 7, "num_blocks": 1})
            ),
            -5
        );
    }
    t.ok(
        "bdev_read",
        json!({"name": "EE_Malloc1", "offset_blocks": 7, "num_blocks": 1}),
    );

    // Statistics count what went through.
    let st = t.ok("bdev_get_iostat", json!({"name": "Malloc1"}));
    assert!(st["bdevs"][0]["num_read_ops"].as_u64().unwrap() >= 1);
    assert!(st["tick_rate"].as_u64().unwrap() > 0);
    let st = t.ok("bdev_get_iostat", json!({"per_channel": false}));
    assert_eq!(st["bdevs"].as_array().unwrap().len(), 6);
    let ee = st["bdevs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "EE_Malloc1")
        .unwrap();
    assert_eq!(ee["io_error"]["failed"], 2);

    // Update latency at run time.
    t.ok(
        "bdev_delay_update_latency",
        json!({"delay_bdev_name": "Delay0", "latency_type": "avg_read", "latency_us": 150}),
    );
    assert_eq!(
        t.ok("bdev_get_bdevs", json!({"name": "Delay0"}))[0]["driver_specific"]["delay"]
            ["avg_read_latency"],
        150
    );

    // Delete each kind (virtual bdevs first).
    assert_eq!(
        t.ok("bdev_error_delete", json!({"name": "EE_Malloc1"})),
        json!(true)
    );
    assert_eq!(
        t.ok("bdev_delay_delete", json!({"name": "Delay0"})),
        json!(true)
    );
    assert_eq!(
        t.ok("bdev_get_bdevs", json!({"name": "Malloc0"}))[0]["claimed"],
        false
    );
    assert_eq!(
        t.ok("bdev_malloc_delete", json!({"name": "Malloc0"})),
        json!(true)
    );
    assert_eq!(
        t.ok("bdev_malloc_delete", json!({"name": "Malloc1"})),
        json!(true)
    );
    assert_eq!(
        t.ok("bdev_malloc_delete", json!({"name": "Malloc2"})),
        json!(true)
    );
    assert_eq!(
        t.ok("bdev_null_delete", json!({"name": "Null0"})),
        json!(true)
    );
    assert!(t.bdev_names().is_empty());
}

#[test]
fn deleting_a_base_removes_the_virtual_bdevs_on_it() {
    let t = Target::start();
    create_all(&t);
    t.ok("bdev_malloc_delete", json!({"name": "Malloc0"}));
    t.ok("bdev_malloc_delete", json!({"name": "Malloc1"}));
    t.ok("bdev_wait_for_examine", Value::Null);
    // The vbdevs' removal is asynchronous to the base's delete reply.
    for _ in 0..100 {
        if t.bdev_names() == ["Null0"] {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("left: {:?}", t.bdev_names());
}

#[test]
fn errors_have_the_right_codes_and_change_nothing() {
    let t = Target::start();
    create_all(&t);
    let before = t.ok("bdev_get_bdevs", Value::Null);

    // Duplicate name → EEXIST (also across modules, and the UUID alias).
    assert_eq!(
        t.err_code(
            "bdev_malloc_create",
            json!({"name": "Malloc0", "num_blocks": 8, "block_size": 512})
        ),
        -17
    );
    assert_eq!(
        t.err_code(
            "bdev_null_create",
            json!({"name": "Malloc0", "num_blocks": 8, "block_size": 512})
        ),
        -17
    );
    let uuid = before[0]["uuid"].clone();
    assert_eq!(
        t.err_code(
            "bdev_null_create",
            json!({"name": uuid, "num_blocks": 8, "block_size": 512})
        ),
        -17
    );
    assert_eq!(
        t.err_code("bdev_error_create", json!({"base_name": "Malloc1"})),
        -17
    );
    // Unknown bdev → ENODEV, for every delete and lookup.
    for m in [
        "bdev_malloc_delete",
        "bdev_null_delete",
        "bdev_delay_delete",
        "bdev_error_delete",
    ] {
        assert_eq!(t.err_code(m, json!({"name": "Nope"})), -19, "{m}");
    }
    // A delete through the wrong module is ENODEV too (SPDK's behaviour).
    assert_eq!(
        t.err_code("bdev_null_delete", json!({"name": "Malloc0"})),
        -19
    );
    assert_eq!(t.err_code("bdev_get_bdevs", json!({"name": "Nope"})), -19);
    assert_eq!(t.err_code("bdev_get_iostat", json!({"name": "Nope"})), -19);
    assert_eq!(t.err_code("bdev_delay_create", json!({"name": "D9", "base_bdev_name": "Nope",
        "avg_read_latency": 1, "p99_read_latency": 1, "avg_write_latency": 1, "p99_write_latency": 1})), -19);
    assert_eq!(
        t.err_code(
            "bdev_error_inject_error",
            json!({"name": "Nope", "io_type": "read", "error_type": "failure"})
        ),
        -19
    );
    // A claimed base cannot get a second virtual bdev.
    assert_eq!(t.err_code("bdev_delay_create", json!({"name": "D9", "base_bdev_name": "Malloc0",
        "avg_read_latency": 1, "p99_read_latency": 1, "avg_write_latency": 1, "p99_write_latency": 1})), -1);
    // Bad values → EINVAL.
    assert_eq!(
        t.err_code(
            "bdev_malloc_create",
            json!({"name": "X", "num_blocks": 8, "block_size": 100})
        ),
        -22
    );
    assert_eq!(
        t.err_code(
            "bdev_malloc_create",
            json!({"name": "X", "num_blocks": 0, "block_size": 512})
        ),
        -22
    );
    assert_eq!(t.err_code("bdev_delay_create", json!({"name": "D9", "base_bdev_name": "Null0",
        "avg_read_latency": 10, "p99_read_latency": 1, "avg_write_latency": 1, "p99_write_latency": 1})), -22);
    // I/O out of range fails with EIO and nothing is written.
    assert_eq!(
        t.err_code(
            "bdev_read",
            json!({"name": "Malloc0", "offset_blocks": 2047, "num_blocks": 2})
        ),
        -5
    );

    // Wrong types and missing parameters → -32602 naming the parameter.
    let cases = [
        (
            "bdev_malloc_create",
            json!({"name": "X", "num_blocks": "many", "block_size": 512}),
            "num_blocks",
        ),
        (
            "bdev_malloc_create",
            json!({"name": "X", "block_size": 512}),
            "num_blocks",
        ),
        (
            "bdev_malloc_create",
            json!({"name": "X", "num_blocks": 8, "block_size": -1}),
            "block_size",
        ),
        (
            "bdev_malloc_create",
            json!({"name": 7, "num_blocks": 8, "block_size": 512}),
            "name",
        ),
        (
            "bdev_malloc_create",
            json!({"name": "X", "num_blocks": 8, "block_size": 512, "uuid": "not-a-uuid"}),
            "uuid",
        ),
        (
            "bdev_null_create",
            json!({"num_blocks": 8, "block_size": 512}),
            "name",
        ),
        (
            "bdev_delay_create",
            json!({"name": "D", "base_bdev_name": "Null0", "avg_read_latency": 1}),
            "p99_read_latency",
        ),
        (
            "bdev_delay_update_latency",
            json!({"delay_bdev_name": "Delay0", "latency_type": "bogus", "latency_us": 1}),
            "latency_type",
        ),
        ("bdev_error_create", json!({}), "base_name"),
        (
            "bdev_error_inject_error",
            json!({"name": "EE_Malloc1", "io_type": "sideways", "error_type": "failure"}),
            "io_type",
        ),
        ("bdev_malloc_delete", json!({"name": ["Malloc0"]}), "name"),
        ("bdev_get_bdevs", json!({"timeout": "soon"}), "timeout"),
        (
            "spdk_kill_instance",
            json!({"sig_name": "SIGFOO"}),
            "sig_name",
        ),
    ];
    for (method, params, param) in cases {
        let e = t.call(method, params.clone()).unwrap_err();
        assert_eq!(e["code"], -32602, "{method} {params}: {e}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains(param),
            "{method}: message {msg:?} does not name {param}"
        );
    }
    // Params that are not an object.
    assert_eq!(t.err_code("bdev_malloc_create", json!([1, 2])), -32602);
    // Methods that take none reject some.
    assert_eq!(t.err_code("bdev_wait_for_examine", json!({"x": 1})), -32602);
    // Unknown method.
    assert_eq!(t.err_code("bdev_frobnicate", Value::Null), -32601);

    assert_eq!(
        t.ok("bdev_get_bdevs", Value::Null),
        before,
        "an error changed the registry"
    );
}

#[test]
fn malformed_json_gets_a_parse_error_and_others_keep_being_served() {
    let t = Target::start();
    create_all(&t);
    let mut bad = Client::connect(&t.socket);
    let mut good = Client::connect(&t.socket);
    // Half a request on one connection does not block another.
    bad.send_raw(br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","#);
    assert_eq!(
        good.call("bdev_get_bdevs", json!({"name": "Null0"}))
            .unwrap()[0]["name"],
        "Null0"
    );
    bad.send_raw(b"!!}");
    let resp = bad.read_value().expect("a parse error response");
    assert_eq!(resp["error"]["code"], -32700);
    assert_eq!(resp["id"], Value::Null);
    assert!(
        bad.read_value().is_none(),
        "connection closed after a parse error"
    );
    // Invalid request shapes.
    let mut c = Client::connect(&t.socket);
    c.send_raw(br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":1,"bogus":1}"#);
    assert_eq!(c.read_value().unwrap()["error"]["code"], -32600);
    c.send_raw(br#"[1]"#);
    assert_eq!(c.read_value().unwrap()[0]["error"]["code"], -32600);
    // Batches and pipelined requests on one connection.
    c.send_raw(br#"[{"jsonrpc":"2.0","method":"spdk_get_version","id":"a"},{"jsonrpc":"2.0","method":"nope","id":"b"}]"#);
    let batch = c.read_value().unwrap();
    assert_eq!(batch[0]["id"], "a");
    assert_eq!(batch[1]["error"]["code"], -32601);
    c.send_raw(br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":5}{"jsonrpc":"2.0","method":"spdk_get_version","id":6}"#);
    assert_eq!(c.read_value().unwrap()["id"], 5);
    assert_eq!(c.read_value().unwrap()["id"], 6);
    // Still serving, registry intact.
    assert_eq!(
        good.call("bdev_get_bdevs", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn framework_methods_answer_in_spdk_shape() {
    let t = Target::start();
    let v = t.ok("spdk_get_version", Value::Null);
    assert!(v["version"].as_str().unwrap().contains("Ferroplane"));
    let methods = t.ok(
        "rpc_get_methods",
        json!({"current": false, "include_aliases": false}),
    );
    let methods: Vec<&str> = methods
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in [
        "spdk_get_version",
        "rpc_get_methods",
        "framework_get_reactors",
        "thread_get_stats",
        "spdk_kill_instance",
        "save_config",
        "bdev_get_bdevs",
        "bdev_get_iostat",
        "bdev_wait_for_examine",
        "bdev_set_options",
        "bdev_malloc_create",
        "bdev_malloc_delete",
        "bdev_null_create",
        "bdev_null_delete",
        "bdev_delay_create",
        "bdev_delay_delete",
        "bdev_delay_update_latency",
        "bdev_error_create",
        "bdev_error_delete",
        "bdev_error_inject_error",
        "framework_get_config",
        "framework_get_subsystems",
    ] {
        assert!(methods.contains(&m), "{m} missing from rpc_get_methods");
    }
    // framework_start_init is startup-only: not current at run time.
    let current = t.ok("rpc_get_methods", json!({"current": true}));
    assert!(!current
        .as_array()
        .unwrap()
        .contains(&json!("framework_start_init")));

    let r = t.ok("framework_get_reactors", Value::Null);
    assert_eq!(r["reactors"].as_array().unwrap().len(), 2);
    assert_eq!(r["reactors"][0]["poll_mode"], "adaptive");
    assert_eq!(r["reactors"][0]["lw_threads"][0]["name"], "app_thread");
    t.ok("framework_set_poll_mode", json!({"mode": "busy"}));
    let r = t.ok("framework_get_reactors", Value::Null);
    assert!(r["reactors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["poll_mode"] == "busy"));
    t.ok("framework_set_poll_mode", json!({"mode": "adaptive"}));
    let s = t.ok("thread_get_stats", Value::Null);
    assert_eq!(s["threads"].as_array().unwrap().len(), 2);
    assert!(s["threads"][0]["busy"].is_u64());
    let subs = t.ok("framework_get_subsystems", Value::Null);
    assert_eq!(subs[0]["subsystem"], "bdev");
    assert_eq!(
        t.err_code("framework_get_config", json!({"name": "nope"})),
        -32602
    );
}
