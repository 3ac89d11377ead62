//! The uring bdev through the real binary: acknowledged writes survive a
//! SIGKILL of the target, the bdev comes back over the same file, `aio`
//! names work, and bad input is refused with nothing registered.

mod common;

use common::{pattern, Target};
use serde_json::{json, Value};

fn image(t: &Target, name: &str, len: u64) -> String {
    let p = t.dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn acknowledged_writes_survive_a_kill_and_the_bdev_comes_back() {
    let mut t = Target::start();
    let file = image(&t, "disk.img", 8 << 20);
    assert_eq!(
        t.ok(
            "bdev_uring_create",
            json!({"name": "U0", "filename": file, "block_size": 4096})
        ),
        json!("U0")
    );
    let b = &t.ok("bdev_get_bdevs", json!({"name": "U0"}))[0];
    assert_eq!(b["num_blocks"], 2048);
    assert_eq!(b["driver_specific"]["uring"]["filename"], json!(file));
    let mut written = Vec::new();
    for i in 0..16u64 {
        let data = pattern(8192, i as u8);
        t.ok(
            "bdev_write",
            json!({"name": "U0", "offset_blocks": i * 100, "data": common::hex(&data)}),
        );
        written.push((i * 100, data));
    }
    // No flush: with O_DIRECT an acknowledged write is on the device.
    t.signal(libc::SIGKILL);
    t.wait_exit(std::time::Duration::from_secs(5));
    let dir = t.dir.clone();
    std::mem::forget(t); // keep the directory (and the image) for the next target
    let t2 = Target::start();
    t2.ok(
        "bdev_aio_create",
        json!({"name": "A0", "filename": file, "block_size": 4096}),
    );
    assert_eq!(
        t2.ok("bdev_get_bdevs", json!({"name": "A0"}))[0]["product_name"],
        "AIO disk"
    );
    for (off, data) in &written {
        let r = t2.ok(
            "bdev_read",
            json!({"name": "A0", "offset_blocks": off, "num_blocks": 2}),
        );
        assert_eq!(
            &common::unhex(r["data"].as_str().unwrap()),
            data,
            "block {off}"
        );
    }
    // save_config writes the aio create back.
    let cfg = t2.ok("framework_get_config", json!({"name": "bdev"}));
    assert!(cfg
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["method"] == "bdev_aio_create"));
    t2.ok("bdev_aio_delete", json!({"name": "A0"}));
    assert!(t2.bdev_names().is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_input_is_refused_with_nothing_registered() {
    let t = Target::start();
    let file = image(&t, "ok.img", 1 << 20);
    let tiny = image(&t, "tiny.img", 100);
    let dir = t.dir.to_str().unwrap().to_string();
    let cases: [(Value, i64, &str); 6] = [
        (
            json!({"name": "X", "filename": "/nonexistent/x.img"}),
            -2,
            "",
        ),
        (json!({"name": "X", "filename": dir}), -22, "directory"),
        (
            json!({"name": "X", "filename": tiny, "block_size": 512}),
            -22,
            "smaller than one",
        ),
        (
            json!({"name": "X", "filename": file, "block_size": 3000}),
            -22,
            "power of two",
        ),
        (
            json!({"name": "X", "filename": file, "block_size": 256}),
            -22,
            "power of two",
        ),
        (json!({"name": "X"}), -32602, "filename"),
    ];
    for (params, code, text) in cases {
        let e = t.call("bdev_uring_create", params.clone()).unwrap_err();
        assert_eq!(e["code"], code, "{params}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(text),
            "{params}: {e}"
        );
    }
    assert!(t.bdev_names().is_empty());
    t.ok("bdev_uring_create", json!({"name": "X", "filename": file}));
    assert_eq!(
        t.err_code("bdev_uring_create", json!({"name": "X", "filename": file})),
        -17
    );
    assert_eq!(
        t.err_code("bdev_uring_delete", json!({"name": "nope"})),
        -19
    );
}
