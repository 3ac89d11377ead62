//! Runs the real `ferroplane-bdevperf` binary against bdevs made by a
//! temporary JSON config: a malloc bdev (512-byte blocks), a null bdev
//! (4096-byte blocks), and for the failure case an error bdev with an
//! injected read failure. Runs are serialised: each one busy-polls a core.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferroplane-bdevperf");

/// A run that takes longer than this has hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const MALLOC_AND_NULL: &str = r#"{
  "subsystems": [
    {"subsystem": "bdev", "config": [
      {"method": "bdev_malloc_create",
       "params": {"name": "Malloc0", "num_blocks": 65536, "block_size": 512}},
      {"method": "bdev_null_create",
       "params": {"name": "Null0", "num_blocks": 262144, "block_size": 4096}},
      {"method": "bdev_wait_for_examine"}
    ]}
  ]
}"#;

/// One read failure injected into an error bdev over a malloc bdev.
const ERROR_INJECTION: &str = r#"{
  "subsystems": [
    {"subsystem": "bdev", "config": [
      {"method": "bdev_malloc_create",
       "params": {"name": "Malloc1", "num_blocks": 16384, "block_size": 512}},
      {"method": "bdev_error_create", "params": {"base_name": "Malloc1"}},
      {"method": "bdev_error_inject_error",
       "params": {"name": "EE_Malloc1", "io_type": "read", "error_type": "failure", "num": 1}}
    ]}
  ]
}"#;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn describe(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn config(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bdevperf-{name}-{}.json", std::process::id()));
    std::fs::write(&path, text).expect("write config");
    path
}

fn run(args: &[&str]) -> Run {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferroplane-bdevperf");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ferroplane-bdevperf {args:?} still running after {RUN_TIMEOUT:?}; stderr:\n{}",
                err_t.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{v} is not an unsigned integer"))
}

#[test]
fn randread_on_null_reports_json() {
    let cfg = config("null", MALLOC_AND_NULL);
    let r = run(&[
        "-c",
        cfg.to_str().unwrap(),
        "-b",
        "Null0",
        "-q",
        "32",
        "-o",
        "4k",
        "-w",
        "randread",
        "-t",
        "1",
        "--cpus",
        "0",
        "--json",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    let v = r.json();
    let jobs = v["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 1, "{v}");
    let j = &jobs[0];
    assert_eq!(j["bdev"], "Null0");
    assert_eq!(j["core"], 0);
    assert_eq!(j["workload"], "randread");
    assert_eq!(u(&j["queue_depth"]), 32);
    assert_eq!(u(&j["io_size"]), 4096);
    assert!(f(&j["iops"]) > 0.0, "{j}");
    assert!((f(&j["mibps"]) - f(&j["iops"]) * 4096.0 / 1048576.0).abs() < 1e-6 * f(&j["iops"]));
    assert_eq!(u(&j["io_failed"]), 0, "{j}");
    assert_eq!(u(&j["verify_failures"]), 0, "{j}");
    let l = &j["latency_us"];
    assert!(f(&l["avg"]) > 0.0, "{l}");
    assert!(f(&l["p50"]) <= f(&l["p99"]), "{l}");
    assert!(f(&l["p99"]) <= f(&l["p99_9"]), "{l}");
    assert!(f(&l["p99_9"]) <= f(&l["max"]), "{l}");
    // Allocation-free hot path: the job's thread allocates only for the
    // reactor's own turns (timers), far less than once per I/O.
    let ios = u(&j["ios"]);
    assert!(ios > 1000, "{j}");
    assert!(
        u(&j["allocations"]) * 20 < ios,
        "the I/O path allocates: {j}"
    );
    let t = &v["total"];
    assert!((f(&t["iops"]) - f(&j["iops"])).abs() < 1e-6 * f(&j["iops"]));
    assert_eq!(u(&t["io_failed"]), 0);
    assert_eq!(u(&t["verify_failures"]), 0);
}

#[test]
fn verify_on_malloc_passes() {
    let cfg = config("verify", MALLOC_AND_NULL);
    let r = run(&[
        "-c",
        cfg.to_str().unwrap(),
        "-b",
        "Malloc0",
        "-q",
        "16",
        "-o",
        "4096",
        "-w",
        "verify",
        "-t",
        "2",
        "--json",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    let v = r.json();
    let j = &v["jobs"][0];
    assert_eq!(j["bdev"], "Malloc0");
    assert_eq!(j["workload"], "verify");
    // 32 MiB is 8192 units of 4 KiB, each written then read: the run goes
    // past the first generation, so rewrites are checked too.
    assert!(u(&j["ios"]) > 2 * 8192, "{j}");
    assert_eq!(u(&j["verify_failures"]), 0, "{j}");
    assert_eq!(u(&j["io_failed"]), 0, "{j}");
}

#[test]
fn verify_catches_a_bdev_that_keeps_no_data() {
    // A null bdev's reads move no data: the poisoned pattern words come back.
    let cfg = config("verify-null", MALLOC_AND_NULL);
    let r = run(&[
        "-c",
        cfg.to_str().unwrap(),
        "-b",
        "Null0",
        "-q",
        "4",
        "-o",
        "4096",
        "-w",
        "verify",
        "-t",
        "1",
        "--json",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(
        r.stderr
            .contains("verify mismatch at offset 0 (block 0): expected 0x0000000000000000 got 0xdeadbeefdeadbeef"),
        "{}",
        r.describe()
    );
    assert!(u(&r.json()["total"]["verify_failures"]) >= 1);
}

#[test]
fn io_size_not_a_multiple_of_the_block_size_is_refused() {
    let cfg = config("bad-o", MALLOC_AND_NULL);
    let r = run(&[
        "-c",
        cfg.to_str().unwrap(),
        "-b",
        "Null0",
        "-q",
        "8",
        "-o",
        "6144",
        "-w",
        "randread",
        "-t",
        "1",
    ]);
    assert_ne!(r.code, Some(0), "{}", r.describe());
    assert!(
        r.stderr
            .contains("-o 6144: the I/O size is not a multiple of bdev Null0's block size 4096"),
        "{}",
        r.describe()
    );
    // Not even a multiple of 512: refused by the option parser.
    let r = run(&[
        "-c",
        cfg.to_str().unwrap(),
        "-q",
        "8",
        "-o",
        "1000",
        "-w",
        "read",
        "-t",
        "1",
    ]);
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(
        r.stderr.contains("not a multiple of 512"),
        "{}",
        r.describe()
    );
}

#[test]
fn unknown_bdev_and_unsupported_workload_are_refused() {
    let cfg = config("refuse", MALLOC_AND_NULL);
    let c = cfg.to_str().unwrap();
    let r = run(&[
        "-c", c, "-b", "Nope", "-q", "1", "-o", "4k", "-w", "read", "-t", "1",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(
        r.stderr
            .contains("bdev Nope not found (the config creates: Malloc0, Null0)"),
        "{}",
        r.describe()
    );
    let r = run(&[
        "-c", c, "-b", "Null0", "-q", "1", "-o", "4k", "-w", "unmap", "-t", "1",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(
        r.stderr.contains("does not support unmap"),
        "{}",
        r.describe()
    );
}

#[test]
fn an_io_error_fails_the_run() {
    let cfg = config("error", ERROR_INJECTION);
    // No -b: the default is every unclaimed bdev, i.e. EE_Malloc1 only.
    let r = run(&[
        "-c",
        cfg.to_str().unwrap(),
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "randread",
        "-t",
        "1",
        "--json",
    ]);
    assert_ne!(r.code, Some(0), "{}", r.describe());
    let v = r.json();
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{v}");
    assert_eq!(jobs[0]["bdev"], "EE_Malloc1");
    assert!(u(&jobs[0]["io_failed"]) >= 1, "{v}");
    assert!(u(&v["total"]["io_failed"]) >= 1, "{v}");
    assert!(r.stderr.contains("I/O failed: read"), "{}", r.describe());
}

/// A raid1 whose second member (an error bdev) fails every read and write
/// once the load is running (queue-depth trigger).
const RAID1_FAILING_MEMBER: &str = r#"{
  "subsystems": [
    {"subsystem": "bdev", "config": [
      {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 16384, "block_size": 4096}},
      {"method": "bdev_malloc_create", "params": {"name": "Malloc1", "num_blocks": 16384, "block_size": 4096}},
      {"method": "bdev_error_create", "params": {"base_name": "Malloc1"}},
      {"method": "bdev_raid_create", "params": {"name": "Raid1", "raid_level": "raid1",
        "base_bdevs": ["Malloc0", "EE_Malloc1"], "superblock": true}},
      {"method": "bdev_error_inject_error",
       "params": {"name": "EE_Malloc1", "io_type": "write", "error_type": "failure", "num": 1000000, "queue_depth": 4}},
      {"method": "bdev_error_inject_error",
       "params": {"name": "EE_Malloc1", "io_type": "read", "error_type": "failure", "num": 1000000, "queue_depth": 4}}
    ]}
  ]
}"#;

#[test]
fn raid1_verify_passes_while_a_member_fails_every_io() {
    let cfg = config("raid1-failing", RAID1_FAILING_MEMBER);
    let r = run(&[
        "-c",
        cfg.to_str().unwrap(),
        "-b",
        "Raid1",
        "-q",
        "16",
        "-o",
        "4096",
        "-w",
        "verify",
        "-t",
        "3",
        "-m",
        "0x3",
        "--json",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    let t = &r.json()["total"];
    assert!(u(&t["ios"]) > 2 * 16384, "{t}");
    assert_eq!(u(&t["verify_failures"]), 0, "{t}");
    assert_eq!(u(&t["io_failed"]), 0, "{t}");
    assert!(
        r.stderr.contains("member EE_Malloc1 failed"),
        "the member did fail: {}",
        r.describe()
    );
}
