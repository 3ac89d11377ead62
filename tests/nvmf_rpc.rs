//! The NVMe-oF control plane through the real binary: transport,
//! subsystems, namespaces, hosts, listeners, with SPDK's names; errors leave
//! nothing behind; save_config → -c recreates the same target.

mod common;

use common::free_port;
use common::Target;
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427";

#[test]
fn subsystems_namespaces_hosts_and_listeners() {
    let t = Target::start();
    let port = free_port().to_string();
    t.ok(
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 2048, "block_size": 4096}),
    );
    // A listener needs the transport.
    let listen = json!({"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port});
    t.ok(
        "nvmf_create_subsystem",
        json!({"nqn": NQN, "serial_number": "FP0001", "allow_any_host": false}),
    );
    assert_eq!(
        t.err_code(
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address": listen})
        ),
        -22
    );
    assert_eq!(
        t.ok(
            "nvmf_create_transport",
            json!({"trtype": "TCP", "max_io_size": 131072})
        ),
        json!(true)
    );
    assert!(t
        .call("nvmf_create_transport", json!({"trtype": "TCP"}))
        .is_err());
    let tr = t.ok("nvmf_get_transports", Value::Null);
    assert_eq!(tr[0]["trtype"], "TCP");
    assert_eq!(tr[0]["max_queue_depth"], 128);

    assert_eq!(
        t.ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc0"}})
        ),
        json!(1)
    );
    t.ok("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST}));
    t.ok(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": listen}),
    );
    // The port is really bound.
    assert!(std::net::TcpListener::bind(format!("127.0.0.1:{port}")).is_err());

    let subs = t.ok("nvmf_get_subsystems", Value::Null);
    assert_eq!(subs[0]["nqn"], "nqn.2014-08.org.nvmexpress.discovery");
    assert_eq!(subs[0]["subtype"], "Discovery");
    let s = &subs[1];
    assert_eq!(s["nqn"], NQN);
    assert_eq!(s["subtype"], "NVMe");
    assert_eq!(s["serial_number"], "FP0001");
    assert_eq!(s["allow_any_host"], false);
    assert_eq!(s["hosts"][0]["nqn"], HOST);
    assert_eq!(s["listen_addresses"][0]["trsvcid"], json!(port));
    assert_eq!(s["namespaces"][0]["bdev_name"], "Malloc0");
    let malloc_uuid = t.ok("bdev_get_bdevs", json!({"name": "Malloc0"}))[0]["uuid"].clone();
    assert_eq!(s["namespaces"][0]["uuid"], malloc_uuid);
    // One subsystem by NQN (SPDK's filter), ENODEV for an unknown one.
    assert_eq!(t.ok("nvmf_get_subsystems", json!({"nqn": NQN})), json!([s]));
    assert_eq!(
        t.err_code(
            "nvmf_get_subsystems",
            json!({"nqn": "nqn.2016-06.io.x:nope"})
        ),
        -19
    );

    // Errors: codes, and nothing changes.
    let before = t.ok("nvmf_get_subsystems", Value::Null);
    assert_eq!(
        t.err_code("nvmf_create_subsystem", json!({"nqn": NQN})),
        -17
    );
    assert_eq!(
        t.err_code("nvmf_create_subsystem", json!({"nqn": "iqn.bad"})),
        -22
    );
    assert_eq!(
        t.err_code(
            "nvmf_create_subsystem",
            json!({"nqn": "nqn.2016-06.io.x:y", "serial_number": "x".repeat(21)})
        ),
        -22
    );
    assert_eq!(
        t.err_code(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "Nope"}})
        ),
        -19
    );
    assert_eq!(
        t.err_code(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc0", "nsid": 1}})
        ),
        -17
    );
    assert_eq!(
        t.err_code(
            "nvmf_subsystem_add_ns",
            json!({"nqn": "nqn.2016-06.io.x:none", "namespace": {"bdev_name": "Malloc0"}})
        ),
        -19
    );
    assert_eq!(
        t.err_code("nvmf_subsystem_add_ns", json!({"nqn": NQN})),
        -32602
    );
    assert_eq!(
        t.err_code("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST})),
        -17
    );
    assert_eq!(t.err_code("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": {"trtype": "rdma", "traddr": "127.0.0.1", "trsvcid": "1"}})), -22);
    assert_eq!(
        t.err_code(
            "nvmf_delete_subsystem",
            json!({"nqn": "nqn.2014-08.org.nvmexpress.discovery"})
        ),
        -22
    );
    assert_eq!(t.ok("nvmf_get_subsystems", Value::Null), before);

    // save_config → -c recreates the same subsystems (the first target
    // releases its port first).
    let saved = t.ok("save_config", Value::Null);
    assert_eq!(saved["subsystems"][1]["subsystem"], "nvmf");
    let file = t.dir.join("saved.json");
    std::fs::write(&file, saved.to_string()).unwrap();
    t.ok("nvmf_delete_subsystem", json!({"nqn": NQN}));
    assert!(
        std::net::TcpListener::bind(format!("127.0.0.1:{port}")).is_ok(),
        "port released"
    );
    let t2 = Target::start_with(&["--cpus", "0,1", "-c", file.to_str().unwrap()]);
    // The RPC socket opens while the configuration is still being applied
    // (as in SPDK), and adding a namespace waits for every core: wait for
    // the load to finish.
    let mut now = t2.ok("nvmf_get_subsystems", Value::Null);
    for _ in 0..200 {
        if now == before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        now = t2.ok("nvmf_get_subsystems", Value::Null);
    }
    assert_eq!(now, before);

    // Deleting the bdev removes its namespace.
    t2.ok("bdev_malloc_delete", json!({"name": "Malloc0"}));
    for _ in 0..100 {
        let s = t2.ok("nvmf_get_subsystems", Value::Null);
        if s[1]["namespaces"].as_array().unwrap().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("namespace survived its bdev");
}
