//! SPEC §4 repro, with the lvol store on top: two malloc bdevs, a delay
//! bdev of several milliseconds over each, a raid1 with an on-disk
//! superblock over the delays, `bdev_wait_for_examine`, an lvol store on
//! the RAID, an lvol in it, written and read back; then all of it torn
//! down. `FERROPLANE_SPEC4_ROUNDS` times in a row (default 100) in one
//! target. Every other round skips the wait for examine: a create returns
//! only once its bdev is usable, so the store create must work right after
//! the RAID create too.

mod common;

use std::time::Instant;

use common::{hex, unhex, Target};
use serde_json::{json, Value};

const BS: usize = 4096;
const CLUSTER: usize = 1 << 20;
const MEMBER_BLOCKS: u64 = (32 << 20) / BS as u64;
/// Delay bdev latencies, µs: several milliseconds.
const AVG_US: u64 = 4000;
const P99_US: u64 = 8000;

fn rounds() -> usize {
    std::env::var("FERROPLANE_SPEC4_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn round(t: &Target, r: usize) {
    for i in 0..2 {
        t.ok(
            "bdev_malloc_create",
            json!({"name": format!("M{i}"), "num_blocks": MEMBER_BLOCKS, "block_size": BS}),
        );
        t.ok(
            "bdev_delay_create",
            json!({"name": format!("D{i}"), "base_bdev_name": format!("M{i}"),
                   "avg_read_latency": AVG_US, "p99_read_latency": P99_US,
                   "avg_write_latency": AVG_US, "p99_write_latency": P99_US}),
        );
    }
    t.ok(
        "bdev_raid_create",
        json!({"name": "R1", "raid_level": "raid1", "base_bdevs": ["D0", "D1"], "superblock": true}),
    );
    if r.is_multiple_of(2) {
        t.ok("bdev_wait_for_examine", Value::Null);
    }
    let lvs = t
        .call(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "R1", "lvs_name": "lvs0", "cluster_sz": CLUSTER}),
        )
        .unwrap_or_else(|e| panic!("round {r}: bdev_lvol_create_lvstore on the new RAID: {e}"));
    let lv = t
        .call(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "vol", "size_in_mib": 8, "thin_provision": true}),
        )
        .unwrap_or_else(|e| panic!("round {r}: bdev_lvol_create: {e}"));
    let lv = lv.as_str().unwrap();
    let data = common::pattern(16 * BS, r as u8);
    let at = 3 * (CLUSTER / BS) as u64 + 5;
    t.ok(
        "bdev_write",
        json!({"name": lv, "offset_blocks": at, "data": hex(&data)}),
    );
    let got = t.ok(
        "bdev_read",
        json!({"name": "lvs0/vol", "offset_blocks": at, "num_blocks": 16}),
    );
    assert!(
        unhex(got["data"].as_str().unwrap()) == data,
        "round {r}: the lvol read back wrong"
    );
    let info = &t.ok("bdev_lvol_get_lvstores", json!({"uuid": lvs}))[0];
    assert_eq!(info["base_bdev"], "R1", "round {r}: {info}");
    // Down again, in order, so the next round starts from nothing.
    t.ok("bdev_lvol_delete_lvstore", json!({"lvs_name": "lvs0"}));
    t.ok("bdev_raid_delete", json!({"name": "R1"}));
    for i in 0..2 {
        t.ok("bdev_delay_delete", json!({"name": format!("D{i}")}));
        t.ok("bdev_malloc_delete", json!({"name": format!("M{i}")}));
    }
    assert!(
        t.bdev_names().is_empty(),
        "round {r}: left {:?}",
        t.bdev_names()
    );
}

#[test]
fn lvol_store_on_a_new_raid1_over_delay_bdevs_works_every_time() {
    let t = Target::start();
    let n = rounds();
    let started = Instant::now();
    for r in 0..n {
        round(&t, r);
    }
    eprintln!("{n} rounds in {:?}", started.elapsed());
}
