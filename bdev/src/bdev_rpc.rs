//! The bdev layer's own RPC methods: `bdev_get_bdevs`, `bdev_get_iostat`,
//! `bdev_reset_iostat`, `bdev_wait_for_examine`, `bdev_set_options`, and
//! Ferroplane's `bdev_read`/`bdev_write` for moving data through a bdev
//! over the socket (tests, debugging); plus the bdev subsystem's
//! `save_config` section.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::bdev::BdevHandle;
use crate::channel;
use crate::error::BdevError;
use crate::io::IoType;
use crate::registry;
use crate::rpc::{RpcError, RpcResult, RpcTable, StateMask};
use crate::stats::{IoStat, ResetMode};

/// Largest transfer `bdev_read`/`bdev_write` move in one call; the reply
/// is hex text, so this keeps a reply near 2 MiB.
pub const MAX_RPC_IO_BYTES: usize = 1 << 20;

/// SPDK's `SPDK_BDEV_IO_POOL_SIZE` default, echoed in `bdev_set_options`.
const BDEV_IO_POOL_SIZE: u32 = 64 * 1024 - 1;

#[derive(Debug, Deserialize)]
struct GetBdevsParams {
    name: Option<String>,
    /// Milliseconds to wait for `name` to appear.
    #[serde(default)]
    timeout: u64,
}

#[derive(Debug, Deserialize)]
struct GetIostatParams {
    name: Option<String>,
    names: Option<Vec<String>>,
    #[serde(default)]
    per_channel: bool,
    reset_mode: Option<ResetMode>,
}

#[derive(Debug, Deserialize)]
struct ResetIostatParams {
    name: Option<String>,
    mode: Option<ResetMode>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)] // accepted for SPDK compatibility; nothing to tune
struct SetOptionsParams {
    bdev_io_pool_size: Option<u32>,
    bdev_io_cache_size: Option<u32>,
    bdev_auto_examine: Option<bool>,
    iobuf_small_cache_size: Option<u32>,
    iobuf_large_cache_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ReadParams {
    name: String,
    offset_blocks: u64,
    num_blocks: u64,
}

#[derive(Debug, Deserialize)]
struct WriteParams {
    name: String,
    offset_blocks: u64,
    /// Hex-encoded data, a whole number of blocks.
    data: String,
}

#[derive(Debug, Deserialize)]
struct CommandParams {
    name: String,
    /// `flush`, `unmap`, `write_zeroes` or `reset`.
    io_type: String,
    #[serde(default)]
    offset_blocks: u64,
    #[serde(default)]
    num_blocks: u64,
}

/// One bdev as `bdev_get_bdevs` shows it (SPDK's field order).
pub fn bdev_json(b: &BdevHandle) -> Value {
    let view = registry::view(b);
    let aliases = view.as_ref().map(|v| v.aliases.clone()).unwrap_or_default();
    let claimed_by = view.as_ref().and_then(|v| v.claimed_by);
    let claim_type = view.as_ref().and_then(|v| v.claim_type);
    let mut o = Map::new();
    o.insert("name".into(), json!(b.name()));
    o.insert("aliases".into(), json!(aliases));
    o.insert("product_name".into(), json!(b.ops().product_name()));
    o.insert("block_size".into(), json!(b.block_size()));
    o.insert("num_blocks".into(), json!(b.num_blocks()));
    for k in [
        "preferred_write_alignment",
        "preferred_write_granularity",
        "optimal_write_size",
        "preferred_unmap_alignment",
        "preferred_unmap_granularity",
    ] {
        o.insert(k.into(), json!(0));
    }
    o.insert("uuid".into(), json!(b.uuid().hyphenated().to_string()));
    o.insert("creation_time".into(), json!(b.ops().creation_time()));
    o.insert(
        "assigned_rate_limits".into(),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}),
    );
    // As SPDK's bdev_rpc.c: claim_type only when claimed.
    o.insert("claimed".into(), json!(claim_type.is_some()));
    if let Some(t) = claim_type {
        o.insert("claim_type".into(), json!(t.as_str()));
    }
    if let Some(m) = claimed_by {
        o.insert("claimed_by".into(), json!(m));
    }
    o.insert("zoned".into(), json!(false));
    let mut io = Map::new();
    for (k, t) in [
        ("read", Some(IoType::Read)),
        ("write", Some(IoType::Write)),
        ("unmap", Some(IoType::Unmap)),
        ("flush", Some(IoType::Flush)),
        ("reset", Some(IoType::Reset)),
        ("nvme_admin", None),
        ("nvme_io", None),
        ("nvme_io_md", None),
        ("write_zeroes", Some(IoType::WriteZeroes)),
        ("zcopy", None),
        ("get_zone_info", None),
        ("zone_management", None),
        ("zone_append", None),
        ("compare", Some(IoType::Compare)),
        ("compare_and_write", None),
        ("abort", None),
        ("seek_hole", None),
        ("seek_data", None),
        ("copy", None),
        ("nvme_iov_md", None),
    ] {
        io.insert(k.into(), json!(t.is_some_and(|t| b.io_type_supported(t))));
    }
    o.insert("supported_io_types".into(), Value::Object(io));
    o.insert("driver_specific".into(), b.ops().dump_info_json());
    Value::Object(o)
}

async fn get_bdevs(p: GetBdevsParams) -> RpcResult {
    let Some(name) = p.name else {
        return Ok(Value::Array(
            registry::list().iter().map(bdev_json).collect(),
        ));
    };
    let deadline = Instant::now() + Duration::from_millis(p.timeout);
    loop {
        if let Some(b) = registry::lookup(&name) {
            return Ok(json!([bdev_json(&b)]));
        }
        if Instant::now() >= deadline {
            return Err(BdevError::NoDevice(name).into());
        }
        // Control path: poll the registry while waiting for the bdev.
        reactor::sleep(Duration::from_millis(10)).await;
    }
}

/// Sums every core's channel statistics (and retired ones) per bdev id.
async fn collect_stats() -> HashMap<u64, IoStat> {
    let per_core = reactor::for_each_core(channel::core_stats).await;
    let mut out: HashMap<u64, IoStat> = HashMap::new();
    for core in per_core {
        for (id, s) in core {
            out.entry(id).or_default().merge(&s);
        }
    }
    out
}

fn resolve_names(names: Option<Vec<String>>) -> Result<Vec<BdevHandle>, RpcError> {
    match names {
        None => Ok(registry::list()),
        Some(names) => names
            .into_iter()
            .map(|n| registry::lookup(&n).ok_or_else(|| BdevError::NoDevice(n).into()))
            .collect(),
    }
}

async fn reset_stats(bdevs: &[BdevHandle], mode: ResetMode) {
    if mode == ResetMode::None {
        return;
    }
    for b in bdevs {
        if let Ok(mut r) = b.0.retired_stats.lock() {
            r.reset(mode);
        }
    }
    let ids: Vec<u64> = bdevs.iter().map(|b| b.id()).collect();
    reactor::for_each_core(move || channel::reset_core_stats(&ids, mode)).await;
}

async fn get_iostat(p: GetIostatParams) -> RpcResult {
    if p.name.is_some() && p.names.is_some() {
        return Err(BdevError::Invalid("give name or names, not both".into()).into());
    }
    let names = p.names.or(p.name.map(|n| vec![n]));
    if p.per_channel && names.as_ref().is_none_or(|n| n.len() != 1) {
        return Err(BdevError::Invalid("per_channel needs exactly one bdev name".into()).into());
    }
    let bdevs = resolve_names(names)?;
    let tick_rate = reactor::ticks::tick_rate();
    let ticks = reactor::ticks::now();
    if p.per_channel {
        let id = bdevs[0].id();
        let per_core = reactor::for_each_core(move || {
            (
                reactor::current_core().0,
                channel::core_stats().into_iter().find(|(i, _)| *i == id),
            )
        })
        .await;
        let channels: Vec<Value> = per_core
            .into_iter()
            .filter_map(|(core, s)| {
                s.map(|(_, s)| {
                    let mut o = Map::new();
                    o.insert("thread_id".into(), json!(core as u64 + 1));
                    s.to_json_fields(&mut o);
                    Value::Object(o)
                })
            })
            .collect();
        return Ok(
            json!({"tick_rate": tick_rate, "ticks": ticks, "name": bdevs[0].name(), "channels": channels}),
        );
    }
    let live = collect_stats().await;
    let out: Vec<Value> = bdevs
        .iter()
        .map(|b| {
            let mut s = b.0.retired_stats.lock().map(|r| *r).unwrap_or_default();
            if let Some(l) = live.get(&b.id()) {
                s.merge(l);
            }
            let mut o = Map::new();
            o.insert("name".into(), json!(b.name()));
            s.to_json_fields(&mut o);
            Value::Object(o)
        })
        .collect();
    if let Some(mode) = p.reset_mode {
        reset_stats(&bdevs, mode).await;
    }
    Ok(json!({"tick_rate": tick_rate, "ticks": ticks, "bdevs": out}))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

fn open_for_io(name: &str, write: bool) -> Result<registry::Descriptor, RpcError> {
    Ok(registry::open(name, write, None)?)
}

async fn rpc_read(p: ReadParams) -> RpcResult {
    let desc = open_for_io(&p.name, false)?;
    let bytes = p.num_blocks.saturating_mul(desc.bdev().block_size() as u64);
    if p.num_blocks == 0 || bytes > MAX_RPC_IO_BYTES as u64 {
        return Err(RpcError::invalid_params(format!(
            "Invalid parameters: num_blocks must be 1..={} blocks",
            MAX_RPC_IO_BYTES as u64 / desc.bdev().block_size() as u64
        )));
    }
    let data = desc.channel().read(p.offset_blocks, p.num_blocks).await?;
    Ok(json!({"data": hex_encode(&data)}))
}

async fn rpc_write(p: WriteParams) -> RpcResult {
    let data = hex_decode(&p.data)
        .ok_or_else(|| RpcError::invalid_params("Invalid parameters: data: not a hex string"))?;
    if data.len() > MAX_RPC_IO_BYTES {
        return Err(RpcError::invalid_params(format!(
            "Invalid parameters: data: longer than {MAX_RPC_IO_BYTES} bytes"
        )));
    }
    let desc = open_for_io(&p.name, true)?;
    desc.channel().write(p.offset_blocks, &data).await?;
    Ok(json!(true))
}

async fn rpc_command(p: CommandParams) -> RpcResult {
    let t = match p.io_type.as_str() {
        "flush" => IoType::Flush,
        "unmap" => IoType::Unmap,
        "write_zeroes" => IoType::WriteZeroes,
        "reset" => IoType::Reset,
        other => {
            return Err(RpcError::invalid_params(format!(
            "Invalid parameters: io_type {other:?} is not one of flush, unmap, write_zeroes, reset"
        )))
        }
    };
    let desc = open_for_io(&p.name, true)?;
    if !desc.bdev().io_type_supported(t) {
        return Err(BdevError::NotSupported.into());
    }
    desc.channel()
        .command(t, p.offset_blocks, p.num_blocks)
        .await?;
    Ok(json!(true))
}

/// The bdev subsystem's `framework_get_config` section, in SPDK's order:
/// options (the layer's, then modules'), then each bdev's create call in registration order (so a
/// virtual bdev follows its base), then `bdev_wait_for_examine`.
pub fn subsystem_config() -> Value {
    let mut out = vec![json!({
        "method": "bdev_set_options",
        "params": {
            "bdev_io_pool_size": BDEV_IO_POOL_SIZE,
            "bdev_io_cache_size": 256,
            "bdev_auto_examine": true,
            "iobuf_small_cache_size": 128,
            "iobuf_large_cache_size": 16
        }
    })];
    out.push(crate::module::raid::rebuild::options_json());
    for b in registry::list() {
        if let Some(c) = b.ops().write_config_json() {
            out.push(c);
        }
    }
    out.push(json!({"method": "bdev_wait_for_examine"}));
    Value::Array(out)
}

pub fn register(table: &mut RpcTable) {
    table.register_with("bdev_get_bdevs", StateMask::RUNTIME, get_bdevs);
    table.register_with("bdev_get_iostat", StateMask::RUNTIME, get_iostat);
    table.register_with(
        "bdev_reset_iostat",
        StateMask::RUNTIME,
        |p: ResetIostatParams| async move {
            let bdevs = resolve_names(p.name.map(|n| vec![n]))?;
            reset_stats(&bdevs, p.mode.unwrap_or(ResetMode::All)).await;
            Ok(json!(true))
        },
    );
    table.register_no_params("bdev_wait_for_examine", StateMask::RUNTIME, || async {
        registry::wait_for_examine().await;
        Ok(json!(true))
    });
    // SPDK allows this only before framework_start_init; we have nothing
    // to tune after start, so accept it in both states (rpc.py load_config
    // then replays a saved config without skipping it).
    table.register_with(
        "bdev_set_options",
        StateMask::ANY,
        |_p: SetOptionsParams| async { Ok(json!(true)) },
    );
    table.register_with("bdev_read", StateMask::RUNTIME, rpc_read);
    table.register_with("bdev_write", StateMask::RUNTIME, rpc_write);
    table.register_with("bdev_io_command", StateMask::RUNTIME, rpc_command);
}
