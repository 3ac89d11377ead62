//! The `ferroplane` target: parses the command line, starts one reactor per
//! core, runs the app on the main reactor, and turns SIGINT/SIGTERM into an
//! orderly shutdown (exit 0, RPC socket removed).

mod app;
mod app_rpc;
mod cli;
mod jsonrpc;

use clap::Parser;
use reactor::{CoreSet, PollMode, Runtime, RuntimeConfig};

use cli::Cli;

fn core_set(cli: &Cli) -> Result<CoreSet, String> {
    let set = match (&cli.cpumask, &cli.cpus) {
        (Some(m), _) => CoreSet::parse_mask(m).map_err(|e| format!("-m {m}: {e}"))?,
        (None, Some(l)) => CoreSet::parse_list(l).map_err(|e| format!("--cpus {l}: {e}"))?,
        (None, None) => CoreSet::parse_mask("0x1").map_err(|e| e.to_string())?,
    };
    set.check_available().map_err(|e| e.to_string())?;
    Ok(set)
}

/// Blocks the termination signals in this thread, so every reactor thread
/// (spawned after) inherits the mask and only `wait_for_signal` sees them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a local set, then masking the
    // calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is a valid initialised sigset; `sig` is a valid out
    // pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cores = match core_set(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferroplane: {e}");
            std::process::exit(1);
        }
    };
    nvmf::target::limits::set_max_connections(cli.nvmf_max_connections as usize);
    nvmf::target::limits::set_connect_timeout(std::time::Duration::from_millis(
        cli.nvmf_connect_timeout_ms,
    ));
    let mode = PollMode::parse(&cli.poll_mode).unwrap_or(PollMode::Adaptive);
    let sigset = block_signals();
    let config = RuntimeConfig::new(cores).poll_mode(mode);
    let runtime = match Runtime::start(config, move || app::run(cli)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferroplane: cannot start reactors: {e}");
            std::process::exit(1);
        }
    };
    let handle = runtime.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let sig = wait_for_signal(&sigset);
            log::info!("signal {sig}: shutting down");
            handle.shutdown(0);
        })
        .expect("spawn signal thread");
    let code = runtime.join();
    log::info!("exit {code}");
    std::process::exit(code);
}
