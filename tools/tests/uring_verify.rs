//! uring data integrity under load: `ferroplane-bdevperf -w verify` over a
//! file for 30 s (issue 3) finds no mismatch, at queue depth 32 with the
//! reactor in adaptive mode (so completions arrive while it may park).

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferroplane-bdevperf");

#[test]
fn thirty_seconds_of_verify_on_a_file_find_no_mismatch() {
    let dir = std::env::temp_dir().join(format!("fp-uring-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cfg = dir.join("cfg.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_uring_create", "params": {"name": "Uring0", "filename": img, "block_size": 4096}}
        ]}]})
        .to_string(),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "-c",
            cfg.to_str().unwrap(),
            "-q",
            "32",
            "-o",
            "16k",
            "-w",
            "verify",
        ])
        .args([
            "-t",
            "30",
            "-m",
            "0x1",
            "--poll-mode",
            "adaptive",
            "--json",
            "--progress",
            "0",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_str(&stdout).unwrap();
    let job = &j["jobs"][0];
    assert_eq!(job["verify_failures"], 0);
    assert_eq!(job["io_failed"], 0);
    assert!(job["ios"].as_u64().unwrap() > 1000, "{job}");
}
