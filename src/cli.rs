//! Command-line options, named as `spdk_tgt` names them where they overlap.

use std::path::PathBuf;

use clap::Parser;

/// Ferroplane: a thread-per-core NVMe/TCP storage target with an
/// SPDK-compatible JSON-RPC control plane.
#[derive(Debug, Parser)]
#[command(name = "ferroplane", version, about)]
pub struct Cli {
    /// Core mask in hex, e.g. 0x3 (one reactor per set bit).
    #[arg(short = 'm', long = "cpumask", conflicts_with = "cpus")]
    pub cpumask: Option<String>,

    /// Core list, e.g. 0,1 or 0-3.
    #[arg(long = "cpus")]
    pub cpus: Option<String>,

    /// JSON-RPC Unix socket path.
    #[arg(short = 'r', long = "rpc-socket", default_value = "/var/tmp/spdk.sock")]
    pub rpc_socket: PathBuf,

    /// JSON configuration to load at start-up (the shape save_config
    /// writes: {"subsystems":[...]}).
    #[arg(short = 'c', long = "json", alias = "config")]
    pub config: Option<PathBuf>,

    /// Keep going when a configuration entry fails.
    #[arg(long = "json-ignore-init-errors")]
    pub json_ignore_init_errors: bool,

    /// Start the RPC server in STARTUP state and wait for
    /// `framework_start_init` before loading the configuration's runtime
    /// part.
    #[arg(long = "wait-for-rpc")]
    pub wait_for_rpc: bool,

    /// Reactor poll mode: adaptive (park when idle) or busy (always spin).
    #[arg(long = "poll-mode", default_value = "adaptive", value_parser = ["adaptive", "busy"])]
    pub poll_mode: String,

    /// NVMe/TCP connections the target keeps at once; more are closed as
    /// soon as they are accepted.
    #[arg(long = "nvmf-max-connections",
          default_value_t = nvmf::target::limits::DEFAULT_MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub nvmf_max_connections: u64,

    /// Milliseconds a new NVMe/TCP connection has to send its ICReq and get
    /// a Connect accepted before it is closed.
    #[arg(long = "nvmf-connect-timeout-ms",
          default_value_t = nvmf::target::limits::DEFAULT_CONNECT_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub nvmf_connect_timeout_ms: u64,
}
