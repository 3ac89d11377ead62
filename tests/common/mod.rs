//! Harness for end-to-end tests: starts the real `ferroplane` binary on a
//! private socket and talks JSON-RPC to it the way rpc.py does.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_ferroplane");

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static NEXT: AtomicU64 = AtomicU64::new(0);

pub fn scratch_dir() -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("fp-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running target. Killed (SIGKILL) on drop if still running.
pub struct Target {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Target {
    /// Two reactors, adaptive mode.
    pub fn start() -> Target {
        Target::start_with(&["--cpus", "0,1"])
    }

    pub fn start_with(args: &[&str]) -> Target {
        let dir = scratch_dir();
        let socket = dir.join("rpc.sock");
        let mut cmd = Command::new(BIN);
        // The whole suite can run in busy mode too.
        if let Ok(mode) = std::env::var("FERROPLANE_TEST_POLL_MODE") {
            if !args.contains(&"--poll-mode") {
                cmd.args(["--poll-mode", &mode]);
            }
        }
        let child = cmd
            .args(args)
            .arg("-r")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferroplane");
        let mut t = Target { child, socket, dir };
        t.wait_ready();
        t
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ferroplane exited during start-up: {status}");
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ferroplane did not open {}", self.socket.display());
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// One call on a fresh connection; the result or the error object.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, Value> {
        self.client().call(method, params)
    }

    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    pub fn err_code(&self, method: &str, params: Value) -> i64 {
        match self.call(method, params) {
            Ok(v) => panic!("{method} unexpectedly succeeded: {v}"),
            Err(e) => e["code"].as_i64().unwrap(),
        }
    }

    /// Exports `bdev` as namespace 1 of a new subsystem `nqn` (any host)
    /// listening on a free 127.0.0.1 port, creating the TCP transport
    /// first if there is none.
    pub fn export_tcp(&self, nqn: &str, bdev: &str) -> std::net::SocketAddr {
        let port = free_port();
        // Already there from an earlier export: fine.
        let _ = self.call("nvmf_create_transport", json!({"trtype": "TCP"}));
        self.ok(
            "nvmf_create_subsystem",
            json!({"nqn": nqn, "allow_any_host": true}),
        );
        self.ok(
            "nvmf_subsystem_add_ns",
            json!({"nqn": nqn, "namespace": {"bdev_name": bdev}}),
        );
        self.ok(
            "nvmf_subsystem_add_listener",
            json!({"nqn": nqn, "listen_address": {"trtype": "tcp", "adrfam": "IPv4",
                   "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
        );
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    pub fn bdev_names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .ok("bdev_get_bdevs", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JSON-RPC connection, framed as SPDK frames it.
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
            next_id: 1,
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one JSON value; None on EOF.
    pub fn read_value(&mut self) -> Option<Value> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    self.buf.drain(..used);
                    return Some(v);
                }
                Some(Err(e)) if !e.is_eof() => panic!("bad JSON from server: {e}"),
                _ => {}
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if !params.is_null() {
            req["params"] = params;
        }
        // rpc.py sends pretty-printed requests.
        self.send_raw(serde_json::to_string_pretty(&req).unwrap().as_bytes());
        let resp = self
            .read_value()
            .expect("connection closed before the response");
        assert_eq!(resp["id"], json!(id), "response id");
        if let Some(e) = resp.get("error") {
            Err(e.clone())
        } else {
            Ok(resp["result"].clone())
        }
    }
}

/// `spdk-rpc` (SPDK's rpc.py from PyPI) is on the PATH, or a skip notice
/// is printed; `FERROPLANE_REQUIRE_SPDK_RPC=1` (CI) makes its absence a
/// failure.
pub fn spdk_rpc_available() -> bool {
    let found = Command::new("spdk-rpc")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("FERROPLANE_REQUIRE_SPDK_RPC").as_deref() != Ok("1"),
            "spdk-rpc not found: pip install spdk==26.9"
        );
        eprintln!("SKIPPED: spdk-rpc not installed (pip install spdk==26.9)");
    }
    found
}

/// Runs SPDK's rpc.py against `t`: its stdout, or stdout and stderr.
pub fn spdk_rpc(t: &Target, args: &[&str]) -> Result<String, String> {
    let out = Command::new("spdk-rpc")
        .arg("-s")
        .arg(&t.socket)
        .args(args)
        .output()
        .expect("run spdk-rpc");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Writes `data` through bdev `name` at `offset_blocks` and reads it back.
pub fn write_read(
    t: &Target,
    name: &str,
    offset_blocks: u64,
    data: &[u8],
    block_size: usize,
) -> Vec<u8> {
    t.ok(
        "bdev_write",
        json!({"name": name, "offset_blocks": offset_blocks, "data": hex(data)}),
    );
    let r = t.ok(
        "bdev_read",
        json!({"name": name, "offset_blocks": offset_blocks, "num_blocks": data.len() / block_size}),
    );
    unhex(r["data"].as_str().unwrap())
}

/// An NVM read, write or compare of `nlb` blocks of `bs` bytes at `slba`
/// of namespace 1; its data in the capsule or by R2T/C2H.
pub fn rw_sqe(
    opcode: u8,
    cid: u16,
    slba: u64,
    nlb: u32,
    bs: u32,
    in_capsule: bool,
) -> nvmf::wire::nvme::Sqe {
    use nvmf::wire::nvme::{SglDescriptor, Sqe, FLAGS_PSDT_SGL};
    let len = nlb * bs;
    let mut sqe = Sqe::default();
    sqe.set_opcode(opcode)
        .set_flags(FLAGS_PSDT_SGL)
        .set_cid(cid)
        .set_nsid(1)
        .set_rw(slba, nlb)
        .set_sgl(if in_capsule {
            SglDescriptor::in_capsule(0, len)
        } else {
            SglDescriptor::transport(len)
        });
    sqe
}

/// Blocks per `bdev_read` / `bdev_write` call (the RPC takes up to 256).
pub const RPC_BLOCKS: usize = 64;

/// Writes `data` at block `lba` of bdev `name` over RPC, in calls of
/// [`RPC_BLOCKS`] blocks of `bs` bytes.
pub fn write_blocks(t: &Target, name: &str, lba: u64, data: &[u8], bs: usize) {
    for (i, c) in data.chunks(RPC_BLOCKS * bs).enumerate() {
        t.ok(
            "bdev_write",
            json!({"name": name, "offset_blocks": lba + (i * RPC_BLOCKS) as u64, "data": hex(c)}),
        );
    }
}

/// Reads `blocks` blocks at `lba` of bdev `name` over RPC.
pub fn read_blocks(t: &Target, name: &str, lba: u64, blocks: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < blocks {
        let n = RPC_BLOCKS.min(blocks - at);
        let r = t.ok(
            "bdev_read",
            json!({"name": name, "offset_blocks": lba + at as u64, "num_blocks": n}),
        );
        out.extend(unhex(r["data"].as_str().unwrap()));
        at += n;
    }
    out
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What a test's bdev is backed by: RAM, a file through io_uring or the
/// aio RPC (O_DIRECT, so data must arrive aligned as the kernel needs), or
/// a raid1 of two such files (the layer above shares one buffer between
/// the mirrors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    Malloc,
    UringFile,
    AioFile,
    Raid1Files,
}

impl Backing {
    pub const ALL: [Backing; 4] = [
        Backing::Malloc,
        Backing::UringFile,
        Backing::AioFile,
        Backing::Raid1Files,
    ];

    /// Creates bdev `name` of `num_blocks` x `block_size` backed this way
    /// (files in the target's scratch directory).
    pub fn create(self, t: &Target, name: &str, num_blocks: u64, block_size: u32) {
        match self {
            Backing::Malloc => {
                t.ok(
                    "bdev_malloc_create",
                    json!({"name": name, "num_blocks": num_blocks, "block_size": block_size}),
                );
            }
            Backing::Raid1Files => {
                let members = [format!("{name}_m0"), format!("{name}_m1")];
                for m in &members {
                    Backing::UringFile.create(t, m, num_blocks, block_size);
                }
                t.ok(
                    "bdev_raid_create",
                    json!({"name": name, "raid_level": "raid1", "base_bdevs": members}),
                );
            }
            Backing::UringFile | Backing::AioFile => {
                let path = t.dir.join(format!("{name}.img"));
                let f = std::fs::File::create(&path).unwrap();
                f.set_len(num_blocks * block_size as u64).unwrap();
                let method = if self == Backing::UringFile {
                    "bdev_uring_create"
                } else {
                    "bdev_aio_create"
                };
                t.ok(
                    method,
                    json!({"name": name, "filename": path.display().to_string(), "block_size": block_size}),
                );
            }
        }
    }
}
