//! Shutdown and idle cost through the real binary: SIGTERM and
//! `spdk_kill_instance` exit 0 and remove the socket; an idle target in
//! adaptive mode with bdevs of every kind (RAID included) costs under 1% of
//! a core.

mod common;

use std::time::Duration;

use common::Target;
use serde_json::{json, Value};

fn populate(t: &Target) {
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 2048, "block_size": 512}),
    );
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M1", "num_blocks": 2048, "block_size": 512}),
    );
    t.ok(
        "bdev_null_create",
        json!({"name": "N0", "num_blocks": 2048, "block_size": 512}),
    );
    t.ok(
        "bdev_delay_create",
        json!({"name": "D0", "base_bdev_name": "M0", "avg_read_latency": 100,
        "p99_read_latency": 100, "avg_write_latency": 100, "p99_write_latency": 100}),
    );
    t.ok("bdev_error_create", json!({"base_name": "M1"}));
    let img = t.dir.join("u0.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    t.ok("bdev_uring_create", json!({"name": "U0", "filename": img}));
    for m in ["M2", "M3"] {
        t.ok(
            "bdev_malloc_create",
            json!({"name": m, "num_blocks": 4096, "block_size": 512}),
        );
    }
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["M2", "M3"], "superblock": true}),
    );
    // Touch each so every core's channels and pollers exist.
    for n in ["D0", "EE_M1", "N0", "U0", "R1"] {
        t.ok(
            "bdev_read",
            json!({"name": n, "offset_blocks": 0, "num_blocks": 1}),
        );
    }
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut t = Target::start();
    populate(&t);
    t.signal(libc::SIGTERM);
    assert_eq!(t.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!t.socket.exists(), "socket file left behind");
    assert!(
        !t.dir.join("rpc.sock.lock").exists(),
        "lock file left behind"
    );
}

#[test]
fn spdk_kill_instance_shuts_down_cleanly() {
    let mut t = Target::start();
    populate(&t);
    assert_eq!(
        t.ok("spdk_kill_instance", json!({"sig_name": "SIGTERM"})),
        json!(true)
    );
    assert_eq!(t.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!t.socket.exists(), "socket file left behind");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_adaptive_target_uses_under_one_percent_of_a_core() {
    let t = Target::start();
    populate(&t);
    // Load, then idle: back to idle within a second (SPEC §6).
    for _ in 0..200 {
        t.ok(
            "bdev_read",
            json!({"name": "N0", "offset_blocks": 0, "num_blocks": 1}),
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    // An NVMe/TCP subsystem with a listener and a connected, idle host.
    let port = t.export_tcp("nqn.2016-06.io.spdk:idle", "N0").port();
    let mut host = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut ic = [0u8; 128];
    ic[2] = 128;
    ic[4] = 128;
    std::io::Write::write_all(&mut host, &ic).unwrap();
    std::io::Read::read_exact(&mut host, &mut ic).unwrap();
    assert_eq!(ic[0], 1, "ICResp");
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(t.pid());
    std::thread::sleep(Duration::from_secs(10));
    let used = (cpu_ticks(t.pid()) - before) as f64 / hz;
    let pct = used / 10.0 * 100.0;
    eprintln!("idle target used {pct:.3}% of a core over 10 s (both reactors together)");
    assert!(pct < 1.0, "idle target used {pct:.2}% of a core");
    // And it still answers.
    assert_eq!(
        t.ok("bdev_get_bdevs", Value::Null)
            .as_array()
            .unwrap()
            .len(),
        9
    );
}
