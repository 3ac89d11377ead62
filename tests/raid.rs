//! RAID bdevs through the real target and its RPC socket: SPEC §4 (a create
//! returns when the RAID is usable, a hundred times in a row over slow
//! members), a raid1 member failing under I/O, restart with file-backed
//! members (reassembly, degraded, rebuild to byte-identical members), and
//! bad input that changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::{hex, pattern, unhex, Target};
use serde_json::{json, Value};

fn raid_info(t: &Target, name: &str) -> Value {
    let all = t.ok("bdev_raid_get_bdevs", json!({"category": "all"}));
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn claimed(t: &Target, bdev: &str) -> bool {
    t.ok("bdev_get_bdevs", json!({"name": bdev}))[0]["claimed"]
        .as_bool()
        .unwrap()
}

fn read(t: &Target, name: &str, off: u64, blocks: u64) -> Vec<u8> {
    let r = t.ok(
        "bdev_read",
        json!({"name": name, "offset_blocks": off, "num_blocks": blocks}),
    );
    unhex(r["data"].as_str().unwrap())
}

fn write(t: &Target, name: &str, off: u64, data: &[u8]) {
    t.ok(
        "bdev_write",
        json!({"name": name, "offset_blocks": off, "data": hex(data)}),
    );
}

#[test]
fn raid1_with_superblock_over_slow_members_is_usable_when_create_returns_100_times() {
    let t = Target::start();
    for round in 0..100 {
        for i in 0..2 {
            t.ok(
                "bdev_malloc_create",
                json!({"name": format!("M{i}"), "num_blocks": 4096, "block_size": 512}),
            );
            t.ok(
                "bdev_delay_create",
                json!({"name": format!("D{i}"), "base_bdev_name": format!("M{i}"),
                       "avg_read_latency": 3000, "p99_read_latency": 3000,
                       "avg_write_latency": 3000, "p99_write_latency": 3000}),
            );
        }
        t.ok(
            "bdev_raid_create",
            json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["D0", "D1"], "superblock": true}),
        );
        t.ok("bdev_wait_for_examine", Value::Null);
        // Immediately usable: visible, online, I/O works.
        let b = &t.ok("bdev_get_bdevs", json!({"name": "R1"}))[0];
        assert_eq!(
            b["driver_specific"]["raid"]["state"], "online",
            "round {round}"
        );
        let data = pattern(1024, round as u8);
        write(&t, "R1", 7, &data);
        assert_eq!(read(&t, "R1", 7, 2), data, "round {round}");
        t.ok("bdev_raid_delete", json!({"name": "R1"}));
        for i in 0..2 {
            t.ok("bdev_delay_delete", json!({"name": format!("D{i}")}));
            t.ok("bdev_malloc_delete", json!({"name": format!("M{i}")}));
        }
    }
    assert!(t.bdev_names().is_empty());
}

#[test]
fn raid0_and_concat_map_blocks_onto_members() {
    let t = Target::start();
    for i in 0..2 {
        t.ok(
            "bdev_malloc_create",
            json!({"name": format!("M{i}"), "num_blocks": 1024, "block_size": 512}),
        );
    }
    // raid0, 4 KiB strips (8 blocks), no superblock: strip s on member s%2.
    t.ok(
        "bdev_raid_create",
        json!({"name": "R0", "raid_level": "0", "strip_size_kb": 4, "base_bdevs": "M0 M1"}),
    );
    let b = &t.ok("bdev_get_bdevs", json!({"name": "R0"}))[0];
    assert_eq!(b["num_blocks"], 2048);
    let data = pattern(512 * 24, 3); // blocks 4..28: spans 4 strips
    write(&t, "R0", 4, &data);
    assert_eq!(read(&t, "R0", 4, 24), data);
    // Strip 0 (blocks 0..8) on M0 at 0..8, strip 1 (8..16) on M1 at 0..8,
    // strip 2 (16..24) on M0 at 8..16, strip 3 (24..32) on M1 at 8..16.
    assert_eq!(read(&t, "M0", 4, 4), data[..2048]);
    assert_eq!(read(&t, "M1", 0, 8), data[2048..6144]);
    assert_eq!(read(&t, "M0", 8, 8), data[6144..10240]);
    assert_eq!(read(&t, "M1", 8, 4), data[10240..]);
    assert!(claimed(&t, "M0") && claimed(&t, "M1"));
    // save_config recreates a RAID without superblock.
    let cfg = t.ok("save_config", Value::Null);
    assert!(cfg.to_string().contains("bdev_raid_create"));
    t.ok("bdev_raid_delete", json!({"name": "R0"}));
    assert!(!claimed(&t, "M0") && !claimed(&t, "M1"));
    // concat: M0 then M1.
    t.ok(
        "bdev_raid_create",
        json!({"name": "C0", "raid_level": "concat", "strip_size_kb": 4, "base_bdevs": ["M0", "M1"]}),
    );
    let data = pattern(512 * 4, 9);
    write(&t, "C0", 1022, &data);
    assert_eq!(read(&t, "M0", 1022, 2), data[..1024]);
    assert_eq!(read(&t, "M1", 0, 2), data[1024..]);
    let info = raid_info(&t, "C0");
    assert_eq!(info["raid_level"], "concat");
    assert_eq!(info["num_base_bdevs_operational"], 2);
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let t = Target::start();
    for (name, bs) in [("A", 512), ("B", 512), ("C", 4096)] {
        t.ok(
            "bdev_malloc_create",
            json!({"name": name, "num_blocks": 4096, "block_size": bs}),
        );
    }
    t.ok(
        "bdev_delay_create",
        json!({"name": "DA", "base_bdev_name": "A", "avg_read_latency": 1, "p99_read_latency": 1,
               "avg_write_latency": 1, "p99_write_latency": 1}),
    );
    let before = t.ok("bdev_get_bdevs", Value::Null);
    let cases = [
        // A is claimed by the delay bdev.
        (
            json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["A", "B"]}),
            -1,
        ),
        (
            json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["B", "C"]}),
            -22,
        ),
        (
            json!({"name": "R", "raid_level": "raid0", "base_bdevs": ["B", "DA"]}),
            -22,
        ),
        (
            json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["B", "B"]}),
            -22,
        ),
        (
            json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["B", "nope"]}),
            -19,
        ),
        (
            json!({"name": "R", "raid_level": "raid5", "base_bdevs": ["B", "DA"]}),
            -32602,
        ),
        (
            json!({"name": "R", "raid_level": "raid0", "strip_size_kb": 3, "base_bdevs": ["B", "DA"]}),
            -22,
        ),
    ];
    for (params, code) in cases {
        assert_eq!(
            t.err_code("bdev_raid_create", params.clone()),
            code,
            "{params}"
        );
        assert_eq!(
            t.ok("bdev_get_bdevs", Value::Null),
            before,
            "changed by {params}"
        );
        assert_eq!(t.ok("bdev_raid_get_bdevs", json!({})), json!([]));
    }
    // Removing the last operational member of a raid1.
    t.ok(
        "bdev_raid_create",
        json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["B", "DA"], "superblock": true}),
    );
    t.ok("bdev_raid_remove_base_bdev", json!({"name": "DA"}));
    assert_eq!(raid_info(&t, "R")["num_base_bdevs_operational"], 1);
    assert!(!claimed(&t, "DA"));
    assert_eq!(
        t.err_code("bdev_raid_remove_base_bdev", json!({"name": "B"})),
        -16
    );
    assert_eq!(raid_info(&t, "R")["num_base_bdevs_operational"], 1);
    assert!(claimed(&t, "B"));
    assert_eq!(
        t.err_code("bdev_raid_get_bdevs", json!({"category": "broken"})),
        -32602
    );
    assert_eq!(t.err_code("bdev_raid_delete", json!({"name": "none"})), -19);
}

#[test]
fn raid1_keeps_serving_when_a_member_fails_every_io() {
    let t = Target::start();
    for i in 0..2 {
        t.ok(
            "bdev_malloc_create",
            json!({"name": format!("M{i}"), "num_blocks": 8192, "block_size": 512}),
        );
    }
    t.ok("bdev_error_create", json!({"base_name": "M1"}));
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["M0", "EE_M1"], "superblock": true}),
    );
    let mut written = Vec::new();
    for i in 0..40u64 {
        if i == 20 {
            for io in ["read", "write"] {
                t.ok(
                    "bdev_error_inject_error",
                    json!({"name": "EE_M1", "io_type": io, "error_type": "failure", "num": 1000000}),
                );
            }
        }
        let data = pattern(2048, i as u8);
        write(&t, "R1", 100 + i * 4, &data);
        written.push((100 + i * 4, data));
        // Reads interleaved, some of them landing on the failing member.
        let (off, d) = &written[(i as usize * 7) % written.len()];
        assert_eq!(&read(&t, "R1", *off, 4), d);
    }
    for (off, d) in &written {
        assert_eq!(&read(&t, "R1", *off, 4), d);
    }
    let info = raid_info(&t, "R1");
    assert_eq!(info["state"], "online");
    assert_eq!(info["num_base_bdevs_operational"], 1, "{info}");
    // The failed member was released.
    assert!(!claimed(&t, "EE_M1"));
}

fn image(dir: &std::path::Path, name: &str, bytes: u64) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(bytes).unwrap();
    p.to_string_lossy().into_owned()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn file_backed_raid1_reassembles_runs_degraded_and_rebuilds_to_identical_members() {
    let dir = common::scratch_dir();
    let (fa, fb) = (
        image(&dir, "a.img", 16 << 20),
        image(&dir, "b.img", 16 << 20),
    );
    let aio = |t: &Target, name: &str, f: &str| {
        t.ok(
            "bdev_aio_create",
            json!({"name": name, "filename": f, "block_size": 4096}),
        );
    };
    let mut written = Vec::new();
    {
        let t = Target::start();
        aio(&t, "U0", &fa);
        aio(&t, "U1", &fb);
        t.ok(
            "bdev_raid_create",
            json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["U0", "U1"], "superblock": true}),
        );
        for i in 0..8u64 {
            let d = pattern(8192, i as u8 + 1);
            write(&t, "R1", i * 50, &d);
            written.push((i * 50, d));
        }
        // The superblock RAID is not in save_config: it reassembles.
        let cfg = t.ok("save_config", Value::Null).to_string();
        assert!(!cfg.contains("bdev_raid_create"));
        t.signal(libc::SIGKILL);
    }
    // Both members back, in reverse order: reassembled, data intact.
    {
        let t = Target::start();
        aio(&t, "U1", &fb);
        aio(&t, "U0", &fa);
        t.ok("bdev_wait_for_examine", Value::Null);
        let info = raid_info(&t, "R1");
        assert_eq!(info["state"], "online", "{info}");
        assert_eq!(info["num_base_bdevs_operational"], 2);
        for (off, d) in &written {
            assert_eq!(&read(&t, "R1", *off, 2), d);
        }
        t.signal(libc::SIGKILL);
    }
    // One member missing: degraded, serving I/O; new writes go to U0 only.
    let t = Target::start();
    aio(&t, "U0", &fa);
    t.ok("bdev_wait_for_examine", Value::Null);
    let info = raid_info(&t, "R1");
    assert_eq!(info["state"], "online", "{info}");
    assert_eq!(info["num_base_bdevs_operational"], 1);
    for (off, d) in &written {
        assert_eq!(&read(&t, "R1", *off, 2), d);
    }
    for i in 0..8u64 {
        let d = pattern(8192, i as u8 + 100);
        write(&t, "R1", i * 50 + 10, &d);
        written.push((i * 50 + 10, d));
    }
    // The member returns: it is stale, so it is rebuilt.
    aio(&t, "U1", &fb);
    wait_until("rebuild", Duration::from_secs(60), || {
        raid_info(&t, "R1")["num_base_bdevs_operational"] == 2
    });
    for (off, d) in &written {
        assert_eq!(&read(&t, "R1", *off, 2), d);
    }
    // Deleted without clear_sb: the superblocks stay (as SPDK's), and the
    // RAID reassembles at the next start.
    t.ok("bdev_raid_delete", json!({"name": "R1"}));
    assert!(!claimed(&t, "U0") && !claimed(&t, "U1"));
    drop(t);
    let t = Target::start();
    aio(&t, "U0", &fa);
    aio(&t, "U1", &fb);
    t.ok("bdev_wait_for_examine", Value::Null);
    assert_eq!(raid_info(&t, "R1")["num_base_bdevs_operational"], 2);
    t.ok("bdev_raid_delete", json!({"name": "R1", "clear_sb": true}));
    drop(t);
    let a = std::fs::read(&fa).unwrap();
    let b = std::fs::read(&fb).unwrap();
    let data_offset = 1 << 20;
    assert!(
        a[data_offset..] == b[data_offset..],
        "members' data regions differ after the rebuild"
    );
    // Deleted with clear_sb: the members do not reassemble it.
    let t = Target::start();
    aio(&t, "U0", &fa);
    aio(&t, "U1", &fb);
    t.ok("bdev_wait_for_examine", Value::Null);
    assert_eq!(t.ok("bdev_raid_get_bdevs", json!({})), json!([]));
    assert!(!claimed(&t, "U0") && !claimed(&t, "U1"));
}

#[test]
fn writes_during_a_rebuild_reach_the_new_member_and_delete_cancels_a_rebuild() {
    let t = Target::start();
    for i in 0..3 {
        t.ok(
            "bdev_malloc_create",
            json!({"name": format!("M{i}"), "num_blocks": 32768, "block_size": 512}),
        );
    }
    // The rebuild's source is slow to read (a delay bdev takes the data at
    // submit and completes 20 ms later), so a foreground write can land
    // between the copy's read and its write: the race the rebuild window
    // must catch, else the new member keeps the old data.
    t.ok(
        "bdev_delay_create",
        json!({"name": "S0", "base_bdev_name": "M0", "avg_read_latency": 20000, "p99_read_latency": 20000,
               "avg_write_latency": 0, "p99_write_latency": 0}),
    );
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["S0", "M1"], "superblock": true}),
    );
    let info = raid_info(&t, "R1");
    let data_offset = info["base_bdevs_list"][0]["data_offset"].as_u64().unwrap();
    let data_size = info["base_bdevs_list"][0]["data_size"].as_u64().unwrap();
    t.ok("bdev_raid_remove_base_bdev", json!({"name": "M1"}));
    t.ok(
        "bdev_raid_add_base_bdev",
        json!({"raid_bdev": "R1", "base_bdev": "M2"}),
    );
    // While it rebuilds: progress is reported, and writes land everywhere.
    let mut saw_progress = false;
    let mut i = 0u64;
    loop {
        let info = raid_info(&t, "R1");
        if info["num_base_bdevs_operational"] == 2 {
            break;
        }
        if let Some(p) = info.get("process") {
            assert_eq!(p["type"], "rebuild");
            assert_eq!(p["target"], "M2");
            assert!(p["progress"]["percent"].as_u64().unwrap() <= 100);
            saw_progress = true;
        }
        // Just ahead of the copy: most land in the step being copied.
        let done = info["process"]["progress"]["blocks"].as_u64().unwrap_or(0);
        let off = (done + (i * 613) % 2048).min(data_size - 16);
        write(&t, "R1", off, &pattern(8192, (i % 251) as u8));
        i += 1;
        assert!(i < 20000, "rebuild never finished: {info}");
    }
    assert!(
        saw_progress && i > 10,
        "rebuild too quick to observe ({i} writes)"
    );
    // The new member holds exactly what the old one does.
    let chunk = 2048;
    let mut at = 0;
    while at < data_size {
        let n = chunk.min(data_size - at);
        assert_eq!(
            read(&t, "M0", data_offset + at, n),
            read(&t, "M2", data_offset + at, n),
            "data region differs at block {at}"
        );
        at += n;
    }
    // A second rebuild, cancelled by deleting the RAID: prompt, and every
    // member is released.
    t.ok("bdev_raid_remove_base_bdev", json!({"name": "M2"}));
    t.ok(
        "bdev_raid_add_base_bdev",
        json!({"raid_bdev": "R1", "base_bdev": "M1"}),
    );
    assert!(raid_info(&t, "R1").get("process").is_some());
    let started = Instant::now();
    t.ok("bdev_raid_delete", json!({"name": "R1"}));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "delete waited {:?} for the rebuild",
        started.elapsed()
    );
    assert_eq!(t.ok("bdev_raid_get_bdevs", json!({})), json!([]));
    for b in ["S0", "M1", "M2"] {
        assert!(!claimed(&t, b), "{b} still claimed");
    }
}

#[test]
fn a_raid1_grows_by_a_member_that_is_rebuilt() {
    let t = Target::start();
    for i in 0..3 {
        t.ok(
            "bdev_malloc_create",
            json!({"name": format!("M{i}"), "num_blocks": 8192, "block_size": 512}),
        );
    }
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["M0", "M1"], "superblock": true}),
    );
    let data = pattern(4096, 77);
    write(&t, "R1", 100, &data);
    t.ok(
        "bdev_raid_grow_base_bdev",
        json!({"raid_name": "R1", "base_name": "M2"}),
    );
    wait_until("grow rebuild", Duration::from_secs(20), || {
        raid_info(&t, "R1")["num_base_bdevs_operational"] == 3
    });
    let info = raid_info(&t, "R1");
    assert_eq!(info["num_base_bdevs"], 3);
    assert_eq!(info["base_bdevs_list"][2]["name"], "M2");
    let off = info["base_bdevs_list"][2]["data_offset"].as_u64().unwrap();
    assert_eq!(read(&t, "M2", off + 100, 8), data);
    // Not for raid0.
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M3", "num_blocks": 8192, "block_size": 512}),
    );
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M4", "num_blocks": 8192, "block_size": 512}),
    );
    t.ok(
        "bdev_raid_create",
        json!({"name": "R0", "raid_level": "raid0", "strip_size_kb": 4, "base_bdevs": ["M3", "M4"]}),
    );
    t.ok(
        "bdev_malloc_create",
        json!({"name": "M5", "num_blocks": 8192, "block_size": 512}),
    );
    assert_eq!(
        t.err_code(
            "bdev_raid_grow_base_bdev",
            json!({"raid_name": "R0", "base_name": "M5"})
        ),
        -22
    );
    assert!(!claimed(&t, "M5"));
}

#[test]
fn a_grown_raid1_reassembles_with_all_its_members() {
    let dir = common::scratch_dir();
    let files: Vec<String> = (0..3)
        .map(|i| image(&dir, &format!("g{i}.img"), 8 << 20))
        .collect();
    let aio = |t: &Target, i: usize| {
        t.ok(
            "bdev_aio_create",
            json!({"name": format!("G{i}"), "filename": files[i], "block_size": 512}),
        );
    };
    let data = pattern(8192, 42);
    {
        let t = Target::start();
        aio(&t, 0);
        aio(&t, 1);
        aio(&t, 2);
        t.ok(
            "bdev_raid_create",
            json!({"name": "RG", "raid_level": "raid1", "base_bdevs": ["G0", "G1"], "superblock": true}),
        );
        write(&t, "RG", 300, &data);
        t.ok(
            "bdev_raid_grow_base_bdev",
            json!({"raid_name": "RG", "base_name": "G2"}),
        );
        wait_until("grow rebuild", Duration::from_secs(30), || {
            raid_info(&t, "RG")["num_base_bdevs_operational"] == 3
        });
        t.signal(libc::SIGKILL);
    }
    let t = Target::start();
    // The grown member first: its superblock names three slots.
    aio(&t, 2);
    aio(&t, 0);
    aio(&t, 1);
    t.ok("bdev_wait_for_examine", Value::Null);
    let info = raid_info(&t, "RG");
    assert_eq!(info["num_base_bdevs"], 3, "{info}");
    assert_eq!(info["num_base_bdevs_operational"], 3, "{info}");
    assert_eq!(read(&t, "RG", 300, 16), data);
}
