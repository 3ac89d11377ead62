//! `ferroplane-rpc`: command-line JSON-RPC client for a Ferroplane target,
//! the counterpart of SPDK's `scripts/rpc.py`.
//!
//! It speaks JSON-RPC 2.0 over a Unix stream socket with SPDK's framing: the
//! request is one compact JSON object, the reply one JSON value followed by a
//! newline. Each subcommand is named after the method it calls and sends the
//! same params `rpc.py` sends; `call METHOD [JSON]` reaches any other method.
//! The result is printed as pretty JSON on stdout; an error response, a
//! connection failure or a bad argument prints `error: ...` on stderr and
//! exits with status 1.

use std::fmt;
use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "ferroplane-rpc",
    version,
    about = "JSON-RPC client for Ferroplane (rpc.py-compatible)"
)]
struct Cli {
    /// RPC Unix socket path
    #[arg(short = 's', long = "socket", default_value = "/var/tmp/spdk.sock")]
    socket: PathBuf,
    /// Seconds to wait for each response
    #[arg(short = 't', long = "timeout", default_value = "60", value_parser = parse_timeout)]
    timeout: Duration,
    /// Print the request JSON instead of sending it
    #[arg(long)]
    dry_run: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

// Options before the subcommand belong to the client (not `global`), as with
// rpc.py, so subcommands may reuse `-t` and `-s` for their own flags.
// Subcommands are snake_case method names but flags are kebab-case as in
// rpc.py; clap passes the enum's casing down to the flags, so variants with
// multi-word flags name themselves and reset the casing (a test checks all).
#[derive(Subcommand, Debug)]
#[command(rename_all = "snake_case")]
enum Cmd {
    /// Call any method; JSON is its params object
    Call {
        method: String,
        /// Params as JSON, e.g. '{"name":"Malloc0"}'
        params: Option<String>,
    },
    /// Get the target's version
    SpdkGetVersion,
    /// List the supported RPC methods
    #[command(name = "rpc_get_methods", rename_all = "kebab-case")]
    RpcGetMethods {
        /// Only methods callable in the current state
        #[arg(short = 'c', long)]
        current: bool,
        /// Include deprecated aliases
        #[arg(short = 'i', long)]
        include_aliases: bool,
    },
    /// List reactors and their threads
    FrameworkGetReactors,
    /// Set the reactors' poll mode
    FrameworkSetPollMode {
        #[arg(value_parser = ["adaptive", "busy"])]
        mode: String,
    },
    /// Per-thread statistics
    ThreadGetStats,
    /// Pollers of each thread
    ThreadGetPollers,
    /// Send a signal to the target
    SpdkKillInstance {
        #[arg(default_value = "SIGTERM")]
        sig_name: String,
    },
    /// Print the running configuration of all subsystems
    SaveConfig,
    /// Replay a configuration written by save_config
    LoadConfig {
        /// Configuration file (default: stdin)
        #[arg(short = 'j', long = "json-conf")]
        json_conf: Option<PathBuf>,
    },
    /// List subsystems and their dependencies
    FrameworkGetSubsystems,
    /// Configuration of one subsystem
    FrameworkGetConfig { name: String },
    /// List bdevs, or one bdev
    BdevGetBdevs {
        /// Bdev name or alias
        #[arg(short = 'b', long)]
        name: Option<String>,
        /// Milliseconds to wait for the bdev to appear
        #[arg(short = 't', long)]
        timeout: Option<u64>,
    },
    /// I/O statistics of all bdevs, or one bdev
    BdevGetIostat {
        #[arg(short = 'b', long)]
        name: Option<String>,
    },
    /// Wait until every bdev has been examined
    BdevWaitForExamine,
    /// Create a RAM-backed bdev
    BdevMallocCreate {
        #[arg(short = 'b', long)]
        name: Option<String>,
        /// UUID of the new bdev
        #[arg(short = 'u', long)]
        uuid: Option<String>,
        /// Size in MiB (float > 0)
        total_size: f64,
        /// Block size in bytes
        block_size: u64,
    },
    /// Delete a malloc bdev
    BdevMallocDelete { name: String },
    /// Create a bdev that discards writes and reads zeroes
    BdevNullCreate {
        name: String,
        /// Size in MiB (float > 0)
        total_size: f64,
        /// Block size in bytes
        block_size: u64,
        /// UUID of the new bdev
        #[arg(short = 'u', long)]
        uuid: Option<String>,
    },
    /// Delete a null bdev
    BdevNullDelete { name: String },
    /// Create a bdev adding latency to a base bdev
    #[command(name = "bdev_delay_create", rename_all = "kebab-case")]
    BdevDelayCreate {
        /// Base bdev
        #[arg(short = 'b', long)]
        base_bdev_name: String,
        #[arg(short = 'd', long)]
        name: String,
        /// Average read latency, microseconds
        #[arg(short = 'r', long)]
        avg_read_latency: u64,
        /// p99 read latency, microseconds
        #[arg(short = 't', long)]
        nine_nine_read_latency: u64,
        /// Average write latency, microseconds
        #[arg(short = 'w', long)]
        avg_write_latency: u64,
        /// p99 write latency, microseconds
        #[arg(short = 'n', long)]
        nine_nine_write_latency: u64,
        /// UUID of the new bdev
        #[arg(short = 'u', long)]
        uuid: Option<String>,
    },
    /// Delete a delay bdev
    BdevDelayDelete { name: String },
    /// Change one latency of a delay bdev
    BdevDelayUpdateLatency {
        delay_bdev_name: String,
        /// avg_read, p99_read, avg_write or p99_write
        latency_type: String,
        latency_us: u64,
    },
    /// Create an error-injection bdev on a base bdev
    BdevErrorCreate {
        base_name: String,
        /// UUID of the new bdev
        #[arg(long)]
        uuid: Option<String>,
    },
    /// Delete an error-injection bdev
    BdevErrorDelete { name: String },
    /// Arm error injection on an error bdev
    #[command(name = "bdev_error_inject_error", rename_all = "kebab-case")]
    BdevErrorInjectError {
        name: String,
        /// clear, read, write, unmap, flush or all
        io_type: String,
        /// failure, pending, corrupt_data or nomem
        error_type: String,
        /// Number of commands to fail
        #[arg(short = 'n', long)]
        num: Option<u64>,
        /// Queue depth at which to trigger the error
        #[arg(short = 'q', long)]
        queue_depth: Option<u64>,
        /// Byte offset to xor with corrupt_value
        #[arg(short = 'o', long)]
        corrupt_offset: Option<u64>,
        /// Value to xor (1-255)
        #[arg(short = 'v', long)]
        corrupt_value: Option<u64>,
    },
    /// Create a bdev on a file or block device, via io_uring
    #[command(name = "bdev_uring_create", rename_all = "kebab-case")]
    BdevUringCreate {
        /// File or block device path
        filename: String,
        name: String,
        /// Block size in bytes (default: the device's)
        #[arg(short = 'b', long)]
        block_size: Option<u64>,
        /// UUID of the new bdev
        #[arg(short = 'u', long)]
        uuid: Option<String>,
    },
    /// Delete a uring bdev
    BdevUringDelete { name: String },
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("not a number: {s}"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("must be > 0".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// Why a command failed; `main` prints it after `error: `.
#[derive(Debug)]
enum Failure {
    /// The server answered with a JSON-RPC error object.
    Rpc { code: i64, message: String },
    /// EOF before any byte of a response.
    Closed,
    /// EOF in the middle of a response.
    Partial,
    /// Reading the response failed (timeouts included).
    Io(io::Error),
    /// Anything else, fully worded.
    Other(String),
    /// Another failure, prefixed with what was being done.
    Context(String, Box<Failure>),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Rpc { code, message } => write!(f, "{message} (code {code})"),
            Failure::Closed => f.write_str("connection closed without response"),
            Failure::Partial => f.write_str("connection closed with partial response"),
            Failure::Io(e) => write!(f, "cannot read response: {}", io_msg(e)),
            Failure::Other(m) => f.write_str(m),
            Failure::Context(what, inner) => write!(f, "{what}: {inner}"),
        }
    }
}

/// An io::Error's text without Rust's " (os error N)" suffix, so messages
/// read like the C tools' strerror output.
fn io_msg(e: &io::Error) -> String {
    let s = e.to_string();
    match e.raw_os_error() {
        Some(code) => s
            .strip_suffix(&format!(" (os error {code})"))
            .map(str::to_owned)
            .unwrap_or(s),
        None => s,
    }
}

/// One method call, before an id is assigned.
#[derive(Debug, Clone, PartialEq)]
struct Req {
    method: String,
    params: Option<Value>,
}

impl Req {
    fn new(method: &str, params: Option<Value>) -> Self {
        Req {
            method: method.to_owned(),
            params,
        }
    }

    fn to_json(&self, id: u64) -> Value {
        let mut v = json!({"jsonrpc": "2.0", "method": self.method, "id": id});
        // JSON-RPC allows omitting params; SPDK handlers of param-less
        // methods reject any params, so never send a null or empty stand-in.
        if let Some(p) = self.params.as_ref().filter(|p| !p.is_null()) {
            v["params"] = p.clone();
        }
        v
    }
}

/// What a command does on the wire.
#[derive(Debug, PartialEq)]
enum Plan {
    /// One call whose result is printed.
    Call(Req),
    /// framework_get_subsystems, then framework_get_config for each.
    SaveConfig,
    /// Calls replayed in order; nothing printed.
    LoadConfig(Vec<Req>),
}

/// Params object from `json!({...})` with the null members dropped: rpc.py
/// omits optional params that were not given, and no method here takes an
/// explicit null.
fn obj(v: Value) -> Option<Value> {
    match v {
        Value::Object(mut m) => {
            m.retain(|_, v| !v.is_null());
            Some(Value::Object(m))
        }
        other => Some(other),
    }
}

/// rpc.py's `(total_size * 1024 * 1024) // block_size` on floats. Python's
/// float floor division is not floor(a / b) when a / b rounds up to an
/// integer, so mirror its algorithm to send the same num_blocks.
fn num_blocks(total_size_mb: f64, block_size: u64) -> Result<u64, Failure> {
    if !(total_size_mb.is_finite() && total_size_mb > 0.0) {
        return Err(Failure::Other("total_size must be a number > 0".into()));
    }
    if block_size == 0 {
        return Err(Failure::Other("block_size must be > 0".into()));
    }
    let (a, b) = (total_size_mb * 1024.0 * 1024.0, block_size as f64);
    let div = (a - a % b) / b;
    let mut q = div.floor();
    if div - q > 0.5 {
        q += 1.0;
    }
    Ok(q as u64)
}

fn plan(cmd: &Cmd, stdin: &mut dyn Read) -> Result<Plan, Failure> {
    use Cmd::*;
    let call = |method: &str, params: Option<Value>| Ok(Plan::Call(Req::new(method, params)));
    match cmd {
        Call { method, params } => {
            let params = match params {
                None => None,
                Some(text) => match serde_json::from_str::<Value>(text) {
                    Ok(v @ (Value::Object(_) | Value::Array(_))) => Some(v),
                    Ok(_) => {
                        return Err(Failure::Other(
                            "params must be a JSON object or array".into(),
                        ))
                    }
                    Err(e) => return Err(Failure::Other(format!("invalid params JSON: {e}"))),
                },
            };
            call(method, params)
        }
        SpdkGetVersion => call("spdk_get_version", None),
        RpcGetMethods {
            current,
            include_aliases,
        } => call(
            "rpc_get_methods",
            obj(json!({"current": current, "include_aliases": include_aliases})),
        ),
        FrameworkGetReactors => call("framework_get_reactors", None),
        FrameworkSetPollMode { mode } => {
            call("framework_set_poll_mode", obj(json!({"mode": mode})))
        }
        ThreadGetStats => call("thread_get_stats", None),
        ThreadGetPollers => call("thread_get_pollers", None),
        SpdkKillInstance { sig_name } => {
            call("spdk_kill_instance", obj(json!({"sig_name": sig_name})))
        }
        SaveConfig => Ok(Plan::SaveConfig),
        LoadConfig { json_conf } => {
            let (text, source) = match json_conf {
                Some(path) => (fs::read_to_string(path), path.display().to_string()),
                None => {
                    let mut s = String::new();
                    (stdin.read_to_string(&mut s).map(|_| s), "stdin".to_owned())
                }
            };
            let text =
                text.map_err(|e| Failure::Other(format!("cannot read {source}: {}", io_msg(&e))))?;
            Ok(Plan::LoadConfig(config_requests(&text)?))
        }
        FrameworkGetSubsystems => call("framework_get_subsystems", None),
        FrameworkGetConfig { name } => call("framework_get_config", obj(json!({"name": name}))),
        BdevGetBdevs { name, timeout } => call(
            "bdev_get_bdevs",
            obj(json!({"name": name, "timeout": timeout})),
        ),
        BdevGetIostat { name } => call("bdev_get_iostat", obj(json!({"name": name}))),
        BdevWaitForExamine => call("bdev_wait_for_examine", None),
        BdevMallocCreate {
            name,
            uuid,
            total_size,
            block_size,
        } => call(
            "bdev_malloc_create",
            obj(json!({
                "name": name,
                "uuid": uuid,
                "num_blocks": num_blocks(*total_size, *block_size)?,
                "block_size": block_size,
            })),
        ),
        BdevMallocDelete { name } => call("bdev_malloc_delete", obj(json!({"name": name}))),
        BdevNullCreate {
            name,
            total_size,
            block_size,
            uuid,
        } => call(
            "bdev_null_create",
            obj(json!({
                "name": name,
                "num_blocks": num_blocks(*total_size, *block_size)?,
                "block_size": block_size,
                "uuid": uuid,
            })),
        ),
        BdevNullDelete { name } => call("bdev_null_delete", obj(json!({"name": name}))),
        BdevDelayCreate {
            base_bdev_name,
            name,
            avg_read_latency,
            nine_nine_read_latency,
            avg_write_latency,
            nine_nine_write_latency,
            uuid,
        } => call(
            "bdev_delay_create",
            obj(json!({
                "base_bdev_name": base_bdev_name,
                "name": name,
                "avg_read_latency": avg_read_latency,
                "p99_read_latency": nine_nine_read_latency,
                "avg_write_latency": avg_write_latency,
                "p99_write_latency": nine_nine_write_latency,
                "uuid": uuid,
            })),
        ),
        BdevDelayDelete { name } => call("bdev_delay_delete", obj(json!({"name": name}))),
        BdevDelayUpdateLatency {
            delay_bdev_name,
            latency_type,
            latency_us,
        } => call(
            "bdev_delay_update_latency",
            obj(json!({
                "delay_bdev_name": delay_bdev_name,
                "latency_type": latency_type,
                "latency_us": latency_us,
            })),
        ),
        BdevErrorCreate { base_name, uuid } => call(
            "bdev_error_create",
            obj(json!({"base_name": base_name, "uuid": uuid})),
        ),
        BdevErrorDelete { name } => call("bdev_error_delete", obj(json!({"name": name}))),
        BdevErrorInjectError {
            name,
            io_type,
            error_type,
            num,
            queue_depth,
            corrupt_offset,
            corrupt_value,
        } => call(
            "bdev_error_inject_error",
            obj(json!({
                "name": name,
                "io_type": io_type,
                "error_type": error_type,
                "num": num,
                "queue_depth": queue_depth,
                "corrupt_offset": corrupt_offset,
                "corrupt_value": corrupt_value,
            })),
        ),
        BdevUringCreate {
            filename,
            name,
            block_size,
            uuid,
        } => call(
            "bdev_uring_create",
            obj(json!({
                "filename": filename,
                "name": name,
                "block_size": block_size,
                "uuid": uuid,
            })),
        ),
        BdevUringDelete { name } => call("bdev_uring_delete", obj(json!({"name": name}))),
    }
}

/// The calls a save_config document replays, in document order.
fn config_requests(text: &str) -> Result<Vec<Req>, Failure> {
    let bad = |what: String| Failure::Other(format!("invalid configuration: {what}"));
    let conf: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let subsystems = conf
        .get("subsystems")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"subsystems\" array".into()))?;
    let mut reqs = Vec::new();
    for (i, sub) in subsystems.iter().enumerate() {
        let entries = match sub.get("config") {
            // save_config writes null for a subsystem with nothing configured.
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(bad(format!("subsystems[{i}].config is not an array"))),
        };
        for (j, entry) in entries.iter().enumerate() {
            let method = entry
                .get("method")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("subsystems[{i}].config[{j}] has no \"method\"")))?;
            reqs.push(Req::new(method, entry.get("params").cloned()));
        }
    }
    Ok(reqs)
}

/// Reads from the socket, failing with TimedOut once `deadline` passes; the
/// socket's own read timeout only bounds a single read, not a whole response.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Decodes the response to request `id` from `reader`. It parses exactly one
/// JSON value and leaves any following bytes (SPDK's trailing newline, a
/// later response) in `reader`.
fn read_response<R: Read>(reader: R, id: u64) -> Result<Value, Failure> {
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    let response = match values.next() {
        None => return Err(Failure::Closed),
        Some(Ok(v)) => v,
        Some(Err(e)) if e.is_eof() => return Err(Failure::Partial),
        Some(Err(e)) if e.is_io() => return Err(Failure::Io(e.into())),
        Some(Err(e)) => return Err(Failure::Other(format!("invalid JSON in response: {e}"))),
    };
    // An error may carry id null (the server could not parse the request),
    // so report it before checking the id.
    if let Some(err) = response.get("error") {
        return Err(Failure::Rpc {
            code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: match err.get("message").and_then(Value::as_str) {
                Some(m) => m.to_owned(),
                None => err.to_string(),
            },
        });
    }
    if response.get("id") != Some(&json!(id)) {
        return Err(Failure::Other(format!(
            "response id {} does not match request id {id}",
            response.get("id").unwrap_or(&Value::Null)
        )));
    }
    match response.get("result") {
        Some(result) => Ok(result.clone()),
        None => Err(Failure::Other(format!(
            "response has neither result nor error: {response}"
        ))),
    }
}

/// One connection; calls on it are sequential, with ids 1, 2, ...
struct Conn {
    reader: BufReader<DeadlineReader>,
    path: PathBuf,
    timeout: Duration,
    next_id: u64,
}

impl Conn {
    fn connect(path: &Path, timeout: Duration) -> Result<Conn, Failure> {
        let stream = UnixStream::connect(path).map_err(|e| {
            Failure::Other(format!(
                "cannot connect to {}: {}",
                path.display(),
                io_msg(&e)
            ))
        })?;
        Ok(Conn {
            reader: BufReader::new(DeadlineReader {
                stream,
                deadline: Instant::now(),
            }),
            path: path.to_owned(),
            timeout,
            next_id: 1,
        })
    }

    fn call(&mut self, req: &Req) -> Result<Value, Failure> {
        let id = self.next_id;
        self.next_id += 1;
        // Compact, no trailing newline: exactly what rpc.py writes.
        let bytes = req.to_json(id).to_string();
        let inner = self.reader.get_mut();
        inner.deadline = Instant::now() + self.timeout;
        let sent = inner
            .stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| inner.stream.write_all(bytes.as_bytes()));
        if let Err(e) = sent {
            return Err(Failure::Other(format!(
                "cannot send request to {}: {}",
                self.path.display(),
                io_msg(&e)
            )));
        }
        read_response(&mut self.reader, id).map_err(|f| match f {
            Failure::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                Failure::Other(format!(
                    "no response from {} within {}s",
                    self.path.display(),
                    self.timeout.as_secs_f64()
                ))
            }
            f => f,
        })
    }
}

fn print_json(out: &mut dyn Write, v: &Value) -> Result<(), Failure> {
    // Value's Serialize cannot fail; a write error (e.g. a closed pipe) can.
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure::Other(e.to_string()))?;
    writeln!(out, "{text}")
        .map_err(|e| Failure::Other(format!("cannot write output: {}", io_msg(&e))))
}

/// Runs the command: builds its requests, then prints them (dry run) or
/// sends them and prints the outcome to `out`.
fn run(cli: &Cli, stdin: &mut dyn Read, out: &mut dyn Write) -> Result<(), Failure> {
    let plan = plan(&cli.cmd, stdin)?;
    if cli.dry_run {
        let reqs = match plan {
            Plan::Call(req) => vec![req],
            // Later requests depend on this one's answer.
            Plan::SaveConfig => vec![Req::new("framework_get_subsystems", None)],
            Plan::LoadConfig(reqs) => reqs,
        };
        for (i, req) in reqs.iter().enumerate() {
            print_json(out, &req.to_json(i as u64 + 1))?;
        }
        return Ok(());
    }
    let mut conn = Conn::connect(&cli.socket, cli.timeout)?;
    match plan {
        Plan::Call(req) => match conn.call(&req) {
            Ok(result) => print_json(out, &result),
            // The target may exit before it answers; that is the point.
            Err(Failure::Closed) if req.method == "spdk_kill_instance" => Ok(()),
            Err(e) => Err(e),
        },
        Plan::SaveConfig => {
            let subsystems = conn.call(&Req::new("framework_get_subsystems", None))?;
            let names = subsystems
                .as_array()
                .and_then(|subs| {
                    subs.iter()
                        .map(|s| s.get("subsystem").and_then(Value::as_str))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    Failure::Other(format!(
                        "unexpected framework_get_subsystems result: {subsystems}"
                    ))
                })?;
            let mut configs = Vec::with_capacity(names.len());
            for name in names {
                let req = Req::new("framework_get_config", obj(json!({"name": name})));
                let config = conn.call(&req).map_err(|e| {
                    Failure::Context(format!("framework_get_config {name}"), Box::new(e))
                })?;
                configs.push(json!({"subsystem": name, "config": config}));
            }
            print_json(out, &json!({"subsystems": configs}))
        }
        Plan::LoadConfig(reqs) => {
            for req in &reqs {
                conn.call(req)
                    .map_err(|e| Failure::Context(req.method.clone(), Box::new(e)))?;
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli, &mut io::stdin().lock(), &mut io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::{self, JoinHandle};

    fn cli(args: &[&str]) -> Cli {
        let argv = std::iter::once("ferroplane-rpc").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(c) => c,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    /// The single request a subcommand would send.
    fn request(args: &[&str]) -> Value {
        match plan(&cli(args).cmd, &mut io::empty()) {
            Ok(Plan::Call(req)) => req.to_json(1),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn params(args: &[&str]) -> Value {
        request(args)["params"].clone()
    }

    #[test]
    fn names_follow_rpc_py() {
        use clap::CommandFactory;
        for sub in Cli::command().get_subcommands() {
            assert!(!sub.get_name().contains('-'), "{}", sub.get_name());
            for arg in sub.get_arguments() {
                let long = arg.get_long().unwrap_or("");
                assert!(!long.contains('_'), "{} --{long}", sub.get_name());
            }
        }
    }

    #[test]
    fn malloc_create_params() {
        assert_eq!(
            params(&["bdev_malloc_create", "-b", "Malloc0", "64", "512"]),
            json!({"name": "Malloc0", "num_blocks": 131072, "block_size": 512})
        );
        // Fractional MiB, uuid given, name omitted.
        assert_eq!(
            params(&["bdev_malloc_create", "0.1", "512", "-u", "u-1"]),
            json!({"uuid": "u-1", "num_blocks": 204, "block_size": 512})
        );
        assert!(plan(
            &cli(&["bdev_malloc_create", "8", "0"]).cmd,
            &mut io::empty()
        )
        .is_err());
    }

    #[test]
    fn python_floor_division() {
        assert_eq!(num_blocks(1.0, 4096).ok(), Some(256));
        assert_eq!(num_blocks(1.5, 1000).ok(), Some(1572));
        assert!(num_blocks(-1.0, 512).is_err());
        assert!(num_blocks(f64::NAN, 512).is_err());
    }

    #[test]
    fn other_subcommand_params() {
        assert_eq!(
            params(&["bdev_null_create", "Null0", "8", "4096"]),
            json!({"name": "Null0", "num_blocks": 2048, "block_size": 4096})
        );
        assert_eq!(
            params(&[
                "bdev_delay_create",
                "-b",
                "Malloc0",
                "-d",
                "Delay0",
                "-r",
                "10",
                "-t",
                "20",
                "-w",
                "30",
                "-n",
                "40",
            ]),
            json!({
                "base_bdev_name": "Malloc0", "name": "Delay0",
                "avg_read_latency": 10, "p99_read_latency": 20,
                "avg_write_latency": 30, "p99_write_latency": 40,
            })
        );
        assert_eq!(
            params(&[
                "bdev_error_inject_error",
                "EE_Malloc0",
                "read",
                "failure",
                "-n",
                "3"
            ]),
            json!({"name": "EE_Malloc0", "io_type": "read", "error_type": "failure", "num": 3})
        );
        assert_eq!(
            params(&["rpc_get_methods", "--current"]),
            json!({"current": true, "include_aliases": false})
        );
        assert_eq!(
            params(&["spdk_kill_instance"]),
            json!({"sig_name": "SIGTERM"})
        );
        assert_eq!(
            params(&["bdev_get_bdevs", "-t", "500"]),
            json!({"timeout": 500})
        );
        assert_eq!(
            params(&["bdev_uring_create", "/dev/nvme0n1", "U0", "-b", "4096"]),
            json!({"filename": "/dev/nvme0n1", "name": "U0", "block_size": 4096})
        );
        assert!(Cli::try_parse_from(["x", "framework_set_poll_mode", "lazy"]).is_err());
    }

    #[test]
    fn request_framing() {
        // No params: the member is absent, not null or {}.
        assert_eq!(
            request(&["spdk_get_version"]),
            json!({"jsonrpc": "2.0", "method": "spdk_get_version", "id": 1})
        );
        assert_eq!(
            request(&["call", "bdev_get_bdevs", r#"{"name":"M0"}"#]),
            json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1, "params": {"name": "M0"}})
        );
        for bad in ["{", "3"] {
            let c = cli(&["call", "m", bad]);
            assert!(matches!(
                plan(&c.cmd, &mut io::empty()),
                Err(Failure::Other(_))
            ));
        }
    }

    #[test]
    fn load_config_plan() {
        let conf = r#"{"subsystems": [
            {"subsystem": "scheduler", "config": null},
            {"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}},
                {"method": "bdev_wait_for_examine"}
            ]}
        ]}"#;
        let c = cli(&["load_config"]);
        let Ok(Plan::LoadConfig(reqs)) = plan(&c.cmd, &mut conf.as_bytes()) else {
            panic!("load_config plan failed");
        };
        let methods: Vec<_> = reqs.iter().map(|r| r.method.as_str()).collect();
        assert_eq!(methods, ["bdev_malloc_create", "bdev_wait_for_examine"]);
        assert_eq!(reqs[1].params, None);
        assert!(config_requests(r#"{"subsystems": [{"config": [{}]}]}"#).is_err());
    }

    #[test]
    fn decode_responses() {
        let ok = br#"  {"jsonrpc":"2.0","id":1,"result":{"a":[1,2]}}"#;
        assert_eq!(read_response(&ok[..], 1).ok(), Some(json!({"a": [1, 2]})));
        let err = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-19,"message":"No such device"}}"#;
        match read_response(&err[..], 1) {
            Err(e @ Failure::Rpc { .. }) => assert_eq!(e.to_string(), "No such device (code -19)"),
            other => panic!("{other:?}"),
        }
        let partial = br#"{"jsonrpc":"2.0","id":1,"res"#;
        assert!(matches!(
            read_response(&partial[..], 1),
            Err(Failure::Partial)
        ));
        assert!(matches!(read_response(&b"\n"[..], 1), Err(Failure::Closed)));
        let wrong_id = br#"{"jsonrpc":"2.0","id":7,"result":true}"#;
        assert!(matches!(
            read_response(&wrong_id[..], 1),
            Err(Failure::Other(_))
        ));
        // Two responses back to back: each read takes exactly one.
        let mut two = &b"{\"id\":1,\"result\":1}\n{\"id\":2,\"result\":2}\n"[..];
        assert_eq!(read_response(&mut two, 1).ok(), Some(json!(1)));
        assert_eq!(read_response(&mut two, 2).ok(), Some(json!(2)));
    }

    /// What the test server writes back for one request: the chunks of the
    /// response, or nothing (and it hangs up).
    type Reply = Vec<&'static [u8]>;

    /// A socket path unique to this test process and call.
    fn socket_path() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!(
            "ferroplane-rpc-test-{}-{n}.sock",
            std::process::id()
        ))
    }

    /// Serves one connection: for each reply, reads one request, then writes
    /// the reply's chunks; then hangs up. Returns the requests it read.
    fn serve(replies: Vec<Reply>) -> (PathBuf, JoinHandle<Vec<Value>>) {
        let path = socket_path();
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind test socket");
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut writer = stream.try_clone().expect("clone");
            let mut requests = serde_json::Deserializer::from_reader(stream).into_iter::<Value>();
            let mut seen = Vec::new();
            for reply in replies {
                // The client may hang up early (a test of that); stop then.
                match requests.next() {
                    Some(Ok(request)) => seen.push(request),
                    _ => break,
                }
                for (i, chunk) in reply.iter().enumerate() {
                    if i > 0 {
                        // Let the client see the first chunk on its own.
                        thread::sleep(Duration::from_millis(20));
                    }
                    writer.write_all(chunk).expect("write");
                    writer.flush().expect("flush");
                }
            }
            seen
        });
        (path, handle)
    }

    fn run_against(path: &Path, args: &[&str], stdin: &str) -> (Result<(), Failure>, String) {
        let path = path.to_str().expect("utf-8 temp path");
        let mut argv = vec!["-s", path, "-t", "10"];
        argv.extend_from_slice(args);
        let mut out = Vec::new();
        let r = run(&cli(&argv), &mut stdin.as_bytes(), &mut out);
        (r, String::from_utf8(out).expect("utf-8 output"))
    }

    fn finish(path: &Path, handle: JoinHandle<Vec<Value>>) -> Vec<Value> {
        let seen = handle.join().expect("server thread");
        let _ = fs::remove_file(path);
        seen
    }

    #[test]
    fn e2e_result() {
        let (path, server) = serve(vec![vec![
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"Malloc0\"}\n",
        ]]);
        let (r, out) = run_against(
            &path,
            &["bdev_malloc_create", "-b", "Malloc0", "64", "512"],
            "",
        );
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(out, "\"Malloc0\"\n");
        assert_eq!(
            finish(&path, server),
            [json!({
                "jsonrpc": "2.0", "method": "bdev_malloc_create", "id": 1,
                "params": {"name": "Malloc0", "num_blocks": 131072, "block_size": 512},
            })]
        );
    }

    #[test]
    fn e2e_response_in_two_chunks() {
        let (path, server) = serve(vec![vec![
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":[{\"name\":\"Mal",
            b"loc0\",\"block_size\":512}]}\n",
        ]]);
        let (r, out) = run_against(&path, &["bdev_get_bdevs", "-b", "Malloc0"], "");
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(
            out,
            "[\n  {\n    \"name\": \"Malloc0\",\n    \"block_size\": 512\n  }\n]\n"
        );
        assert_eq!(
            finish(&path, server)[0]["params"],
            json!({"name": "Malloc0"})
        );
    }

    #[test]
    fn e2e_error_response() {
        let (path, server) = serve(vec![vec![
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":-19,\"message\":\"No such device\"}}\n",
        ]]);
        let (r, out) = run_against(&path, &["bdev_malloc_delete", "Nope"], "");
        match r {
            Err(e @ Failure::Rpc { .. }) => assert_eq!(e.to_string(), "No such device (code -19)"),
            other => panic!("{other:?}"),
        }
        assert_eq!(out, "");
        assert_eq!(finish(&path, server)[0]["params"], json!({"name": "Nope"}));
    }

    #[test]
    fn e2e_partial_response() {
        let (path, server) = serve(vec![vec![b"{\"jsonrpc\":\"2.0\",\"id\":1,\"res"]]);
        let (r, _) = run_against(&path, &["spdk_get_version"], "");
        finish(&path, server);
        let e = r.expect_err("partial response must fail");
        assert_eq!(e.to_string(), "connection closed with partial response");
    }

    #[test]
    fn e2e_kill_instance_eof_is_success() {
        let (path, server) = serve(vec![vec![]]);
        let (r, out) = run_against(&path, &["spdk_kill_instance", "SIGINT"], "");
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(out, "");
        assert_eq!(
            finish(&path, server)[0]["params"],
            json!({"sig_name": "SIGINT"})
        );
        // Any other method treats the same EOF as a failure.
        let (path, server) = serve(vec![vec![]]);
        let (r, _) = run_against(&path, &["spdk_get_version"], "");
        finish(&path, server);
        assert!(matches!(r, Err(Failure::Closed)));
    }

    #[test]
    fn e2e_save_config() {
        let (path, server) = serve(vec![
            vec![b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":[{\"subsystem\":\"bdev\",\"depends_on\":[]},{\"subsystem\":\"nvmf\",\"depends_on\":[\"bdev\"]}]}\n"],
            vec![b"{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":[{\"method\":\"bdev_wait_for_examine\"}]}\n"],
            vec![b"{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":[]}\n"],
        ]);
        let (r, out) = run_against(&path, &["save_config"], "");
        assert!(r.is_ok(), "{r:?}");
        let saved: Value = serde_json::from_str(&out).expect("JSON output");
        assert_eq!(
            saved,
            json!({"subsystems": [
                {"subsystem": "bdev", "config": [{"method": "bdev_wait_for_examine"}]},
                {"subsystem": "nvmf", "config": []},
            ]})
        );
        let seen = finish(&path, server);
        assert_eq!(seen[1]["params"], json!({"name": "bdev"}));
        assert_eq!(seen[2]["id"], json!(3));
    }

    #[test]
    fn e2e_load_config_stops_at_first_error() {
        let conf = r#"{"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}},
            {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}},
            {"method": "bdev_wait_for_examine"}
        ]}]}"#;
        let (path, server) = serve(vec![
            vec![b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"M0\"}\n"],
            vec![b"{\"jsonrpc\":\"2.0\",\"id\":2,\"error\":{\"code\":-17,\"message\":\"File exists\"}}\n"],
        ]);
        let (r, out) = run_against(&path, &["load_config"], conf);
        let e = r.expect_err("second call fails");
        assert_eq!(e.to_string(), "bdev_malloc_create: File exists (code -17)");
        assert_eq!(out, "");
        // The server hung up after two requests, so the third was never sent.
        assert_eq!(finish(&path, server).len(), 2);
    }

    #[test]
    fn connect_failure_names_socket() {
        let path = socket_path();
        let (r, _) = run_against(&path, &["spdk_get_version"], "");
        let e = r.expect_err("no server");
        assert_eq!(
            e.to_string(),
            format!(
                "cannot connect to {}: No such file or directory",
                path.display()
            )
        );
    }

    #[test]
    fn dry_run_does_not_connect() {
        let path = socket_path();
        let (r, out) = run_against(&path, &["--dry-run", "bdev_null_delete", "Null0"], "");
        assert!(r.is_ok(), "{r:?}");
        let printed: Value = serde_json::from_str(&out).expect("JSON request");
        assert_eq!(
            printed,
            json!({"jsonrpc": "2.0", "method": "bdev_null_delete", "id": 1, "params": {"name": "Null0"}})
        );
    }

    #[test]
    fn timeout_without_response() {
        // The server reads the request and waits for a second one that never
        // comes, keeping the connection open until the client gives up.
        let (path, server) = serve(vec![vec![], vec![]]);
        let p = path.to_str().expect("utf-8 temp path");
        let mut out = Vec::new();
        let r = run(
            &cli(&["-s", p, "-t", "0.2", "spdk_get_version"]),
            &mut io::empty(),
            &mut out,
        );
        let e = r.expect_err("must time out");
        assert_eq!(e.to_string(), format!("no response from {p} within 0.2s"));
        // The client has closed the socket, so the server's second read ends.
        let _ = server.join();
        let _ = fs::remove_file(&path);
    }
}
