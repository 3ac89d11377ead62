//! App-level RPC methods: version, method list, reactors and threads,
//! poll mode, kill, and the configuration methods (`framework_get_*`,
//! `save_config`, `framework_start_init`).

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use bdev::rpc::{RpcError, RpcResult, RpcState, RpcTable, StateMask};
use reactor::PollMode;
use serde::Deserialize;
use serde_json::{json, Value};

/// What the handlers need of the running app.
pub struct AppContext {
    pub table: RefCell<Weak<RpcTable>>,
    pub state: Rc<Cell<RpcState>>,
    /// Fired by `framework_start_init` in `--wait-for-rpc` mode.
    pub start_init: RefCell<Option<reactor::CompletionSender<()>>>,
}

/// The subsystems we report, in init order, with their dependencies.
const SUBSYSTEMS: &[(&str, &[&str])] = &[("bdev", &[]), ("nvmf", &["bdev"])];

fn subsystem_config(name: &str) -> Option<Value> {
    match name {
        "bdev" => Some(bdev_config()),
        "nvmf" => Some(nvmf::target::rpc::subsystem_config()),
        _ => None,
    }
}

/// The bdev subsystem's section. SPDK writes the layer's options, then
/// each module's `config_json` (options, and for nvme its controllers and
/// hotplug), then each bdev's create. The `bdev` crate knows nothing of
/// NVMe, so the nvme module's entries go in here, after the leading option
/// entries the bdev crate writes and before the first create.
fn bdev_config() -> Value {
    let mut entries = match bdev::bdev_rpc::subsystem_config() {
        Value::Array(a) => a,
        other => return other,
    };
    let at = entries
        .iter()
        .position(|e| {
            !e["method"]
                .as_str()
                .is_some_and(|m| m.ends_with("_set_options"))
        })
        .unwrap_or(entries.len());
    entries.splice(at..at, nvmf::bdev_nvme::rpc::config_json());
    Value::Array(entries)
}

fn full_config() -> Value {
    let subs: Vec<Value> = SUBSYSTEMS
        .iter()
        .map(|(n, _)| json!({"subsystem": n, "config": subsystem_config(n)}))
        .collect();
    json!({ "subsystems": subs })
}

#[derive(Deserialize)]
struct GetMethodsParams {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    #[allow(dead_code)] // we register no aliases
    include_aliases: bool,
}

#[derive(Deserialize)]
struct KillParams {
    sig_name: String,
}

#[derive(Deserialize)]
struct SetPollModeParams {
    mode: String,
}

#[derive(Deserialize)]
struct GetConfigParams {
    name: String,
    #[serde(default)]
    #[allow(dead_code)] // our lists are flat; flat is valid either way
    with_batches: bool,
}

fn cpumask_of(core: u32) -> String {
    format!("{:x}", 1u128 << core.min(127))
}

fn thread_name(core: reactor::CoreId) -> String {
    if core == reactor::main_core() {
        "app_thread".into()
    } else {
        format!("reactor_{}", core.0)
    }
}

/// Per-core user/system/irq jiffies from /proc/stat (0 when unreadable).
fn proc_stat_cpu(core: u32) -> (u64, u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0, 0);
    };
    let tag = format!("cpu{core} ");
    s.lines()
        .find(|l| l.starts_with(&tag))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let g = |i: usize| f.get(i).copied().unwrap_or(0);
            (g(0) + g(1), g(2), g(5))
        })
        .unwrap_or((0, 0, 0))
}

struct CoreReport {
    stats: reactor::ReactorStats,
    tid: i64,
}

async fn all_reactors() -> Vec<CoreReport> {
    reactor::for_each_core(|| CoreReport {
        stats: reactor::stats(),
        // SAFETY: gettid has no preconditions.
        tid: unsafe { libc::gettid() } as i64,
    })
    .await
}

async fn framework_get_reactors() -> RpcResult {
    let reactors: Vec<Value> = all_reactors()
        .await
        .into_iter()
        .map(|r| {
            let s = &r.stats;
            let (usr, sys, irq) = proc_stat_cpu(s.core.0);
            json!({
                "lcore": s.core.0,
                "tid": r.tid,
                "busy": s.busy_ticks,
                "idle": s.idle_ticks + s.parked_ticks,
                "in_interrupt": s.parked,
                "poll_mode": s.mode.as_str(),
                "irq": irq,
                "sys": sys,
                "usr": usr,
                "iterations": s.iterations,
                "parks": s.parks,
                "lw_threads": [{
                    "name": thread_name(s.core),
                    "id": s.core.0 as u64 + 1,
                    "cpumask": cpumask_of(s.core.0),
                    "elapsed": s.busy_ticks + s.idle_ticks + s.parked_ticks,
                }],
            })
        })
        .collect();
    Ok(json!({
        "tick_rate": reactor::ticks::tick_rate(),
        "pid": std::process::id(),
        "reactors": reactors,
    }))
}

async fn thread_get_stats() -> RpcResult {
    let threads: Vec<Value> = all_reactors()
        .await
        .into_iter()
        .map(|r| {
            let s = &r.stats;
            json!({
                "name": thread_name(s.core),
                "id": s.core.0 as u64 + 1,
                "cpumask": cpumask_of(s.core.0),
                "busy": s.busy_ticks,
                "idle": s.idle_ticks + s.parked_ticks,
                "in_interrupt": s.parked,
                "active_pollers_count": s.active_pollers,
                "timed_pollers_count": s.timed_pollers,
                "paused_pollers_count": s.paused_pollers,
            })
        })
        .collect();
    Ok(json!({"tick_rate": reactor::ticks::tick_rate(), "threads": threads}))
}

async fn thread_get_pollers() -> RpcResult {
    let threads: Vec<Value> = all_reactors()
        .await
        .into_iter()
        .map(|r| {
            let s = &r.stats;
            let (mut active, mut timed, mut paused) = (vec![], vec![], vec![]);
            for (i, p) in s.pollers.iter().enumerate() {
                let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
                v["id"] = json!(i as u64 + 1);
                if p.state == "paused" {
                    paused.push(v);
                } else if p.period_ticks.is_some() {
                    timed.push(v);
                } else {
                    active.push(v);
                }
            }
            json!({
                "name": thread_name(s.core),
                "id": s.core.0 as u64 + 1,
                "active_pollers": active,
                "timed_pollers": timed,
                "paused_pollers": paused,
            })
        })
        .collect();
    Ok(json!({"tick_rate": reactor::ticks::tick_rate(), "threads": threads}))
}

fn signal_number(name: &str) -> Option<i32> {
    let known = [
        ("SIGINT", libc::SIGINT),
        ("SIGTERM", libc::SIGTERM),
        ("SIGQUIT", libc::SIGQUIT),
        ("SIGHUP", libc::SIGHUP),
        ("SIGKILL", libc::SIGKILL),
        ("SIGUSR1", libc::SIGUSR1),
    ];
    known
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .or_else(|| {
            let n: i32 = name.parse().ok()?;
            known.iter().any(|(_, s)| *s == n).then_some(n)
        })
}

pub fn register(table: &mut RpcTable, ctx: Rc<AppContext>) {
    table.register_no_params("spdk_get_version", StateMask::ANY, || async {
        let v = env!("CARGO_PKG_VERSION");
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor, patch) = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        Ok(json!({
            "version": format!("Ferroplane v{v}"),
            "fields": {"major": major, "minor": minor, "patch": patch, "suffix": ""}
        }))
    });

    let c = ctx.clone();
    table.register_with(
        "rpc_get_methods",
        StateMask::ANY,
        move |p: GetMethodsParams| {
            let c = c.clone();
            async move {
                let table = c
                    .table
                    .borrow()
                    .upgrade()
                    .ok_or_else(|| RpcError::new(bdev::rpc::INTERNAL_ERROR, "shutting down"))?;
                let state = p.current.then(|| c.state.get());
                Ok(json!(table.names(state)))
            }
        },
    );

    table.register_no_params(
        "framework_get_reactors",
        StateMask::RUNTIME,
        framework_get_reactors,
    );
    table.register_no_params("thread_get_stats", StateMask::RUNTIME, thread_get_stats);
    table.register_no_params("thread_get_pollers", StateMask::RUNTIME, thread_get_pollers);

    table.register_with(
        "framework_set_poll_mode",
        StateMask::ANY,
        |p: SetPollModeParams| async move {
            let mode = PollMode::parse(&p.mode).ok_or_else(|| {
                RpcError::invalid_params(format!(
                    "Invalid parameters: mode {:?} is not one of adaptive, busy",
                    p.mode
                ))
            })?;
            reactor::for_each_core(move || reactor::set_poll_mode(mode)).await;
            Ok(json!(true))
        },
    );

    table.register_with("spdk_kill_instance", StateMask::RUNTIME, |p: KillParams| async move {
        let sig = signal_number(&p.sig_name).ok_or_else(|| {
            RpcError::invalid_params(format!(
                "Invalid parameters: sig_name {:?} is not one of SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGKILL, SIGUSR1",
                p.sig_name
            ))
        })?;
        match sig {
            libc::SIGINT | libc::SIGTERM => {
                // Let this reply reach the client before the server closes.
                reactor::spawn_local(async {
                    reactor::sleep(Duration::from_millis(20)).await;
                    reactor::shutdown(0);
                });
            }
            // SAFETY: kill on our own pid with a valid signal number.
            _ => unsafe {
                libc::kill(libc::getpid(), sig);
            },
        }
        Ok(json!(true))
    });

    table.register_no_params("framework_get_subsystems", StateMask::RUNTIME, || async {
        let v: Vec<Value> = SUBSYSTEMS
            .iter()
            .map(|(n, deps)| json!({"subsystem": n, "depends_on": deps}))
            .collect();
        Ok(json!(v))
    });

    table.register_with(
        "framework_get_config",
        StateMask::RUNTIME,
        |p: GetConfigParams| async move {
            if !SUBSYSTEMS.iter().any(|(n, _)| *n == p.name) {
                return Err(RpcError::invalid_params(format!(
                    "Subsystem '{}' not found",
                    p.name
                )));
            }
            Ok(subsystem_config(&p.name).unwrap_or(Value::Null))
        },
    );

    // rpc.py assembles save_config client-side; we also answer it directly.
    table.register_no_params("save_config", StateMask::RUNTIME, || async {
        Ok(full_config())
    });

    let c = ctx.clone();
    table.register_no_params("framework_start_init", StateMask::STARTUP, move || {
        let c = c.clone();
        async move {
            let start = c.start_init.borrow_mut().take();
            match start {
                Some(tx) => {
                    tx.complete(());
                    // As SPDK, answered once the target is in its run-time
                    // state, so the client's next call may be a run-time one.
                    while c.state.get() != RpcState::Runtime {
                        reactor::sleep(Duration::from_millis(1)).await;
                    }
                    Ok(json!(true))
                }
                None => Err(RpcError::new(
                    bdev::rpc::INTERNAL_ERROR,
                    "framework_initialization failed",
                )),
            }
        }
    });

    let c = ctx;
    table.register("framework_wait_init", StateMask::ANY, move |_p| {
        let c = c.clone();
        async move {
            while c.state.get() != RpcState::Runtime {
                reactor::sleep(Duration::from_millis(10)).await;
            }
            Ok(json!(true))
        }
    });
}
