//! The `bdev_lvol_*` methods, with SPDK's names, parameters, results and
//! error codes (module/bdev/lvol/vbdev_lvol_rpc.c, and Longhorn's fork for
//! xattrs, detach_parent and the fragmap).
//!
//! SPDK answers in three ways, and clients test for them: lookups and
//! checks made before any work give the raw `-errno` with `strerror` text
//! (an unknown lvol is `-19`); failures of the operation itself give
//! `-32602` with the `strerror` text; `bdev_lvol_delete` and
//! `bdev_lvol_get_xattr` failures give `-32603` with it.

use std::collections::BTreeMap;
use std::rc::Rc;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::disk::ClearMethod;
use super::lvs::{self, CreateStoreOptions, Lvs};
use super::store::CreateOptions;
use super::LvolError;
use crate::error::strerror;
use crate::rpc::{
    decode_params, RpcError, RpcResult, RpcTable, StateMask, INTERNAL_ERROR, INVALID_PARAMS,
};

/// Raw `-errno` and its text.
fn raw(e: &LvolError) -> RpcError {
    RpcError::new(-e.errno(), strerror(e.errno()))
}

/// `-32602` and the errno's text: a failed operation.
fn failed(e: LvolError) -> RpcError {
    log::info!("lvol: {e}");
    RpcError::new(INVALID_PARAMS, strerror(e.errno()))
}

/// `-32603` and the errno's text.
fn internal(e: LvolError) -> RpcError {
    log::info!("lvol: {e}");
    RpcError::new(INTERNAL_ERROR, strerror(e.errno()))
}

fn no_device() -> RpcError {
    RpcError::new(-libc::ENODEV, strerror(libc::ENODEV))
}

fn invalid(msg: &str) -> RpcError {
    RpcError::new(-libc::EINVAL, msg)
}

/// SPDK's `vbdev_get_lvol_store_by_uuid_xor_name`.
fn store_xor(uuid: Option<&str>, name: Option<&str>) -> Result<Rc<Lvs>, RpcError> {
    match (uuid, name) {
        (Some(_), Some(_)) | (None, None) => Err(invalid(strerror(libc::EINVAL))),
        (u, n) => lvs::find_store(u, n).ok_or_else(no_device),
    }
}

fn lvol(name: &str) -> Result<(Rc<Lvs>, u64), RpcError> {
    lvs::lookup_lvol(name)
        .map(|(l, id, _)| (l, id))
        .ok_or_else(no_device)
}

fn parse_clear(s: Option<&str>, msg: &str) -> Result<ClearMethod, RpcError> {
    Ok(match s.map(|s| s.to_ascii_lowercase()).as_deref() {
        None | Some("default") => ClearMethod::Default,
        Some("none") => ClearMethod::None,
        Some("unmap") => ClearMethod::Unmap,
        Some("write_zeroes") => ClearMethod::WriteZeroes,
        Some(_) => return Err(invalid(msg)),
    })
}

#[derive(Deserialize)]
struct CreateStoreParams {
    bdev_name: String,
    lvs_name: String,
    #[serde(default)]
    cluster_sz: u32,
    clear_method: Option<String>,
    #[serde(default)]
    num_md_pages_per_cluster_ratio: u32,
    #[serde(default)]
    md_page_size: u32,
}

#[derive(Deserialize)]
struct StoreSelector {
    uuid: Option<String>,
    lvs_name: Option<String>,
}

#[derive(Deserialize)]
struct RenameStoreParams {
    old_name: String,
    new_name: String,
}

#[derive(Deserialize)]
struct CreateParams {
    lvol_name: String,
    size_in_mib: u64,
    #[serde(default)]
    thin_provision: bool,
    uuid: Option<String>,
    lvs_name: Option<String>,
    clear_method: Option<String>,
}

#[derive(Deserialize)]
struct NameParams {
    name: String,
}

#[derive(Deserialize)]
struct SnapshotParams {
    lvol_name: String,
    snapshot_name: String,
    #[serde(default)]
    xattrs: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct CloneParams {
    snapshot_name: String,
    clone_name: String,
}

#[derive(Deserialize)]
struct RenameParams {
    old_name: String,
    new_name: String,
}

#[derive(Deserialize)]
struct ResizeParams {
    name: String,
    size_in_mib: u64,
}

#[derive(Deserialize)]
struct SetParentParams {
    lvol_name: String,
    parent_name: String,
}

#[derive(Deserialize)]
struct SetXattrParams {
    name: String,
    xattr_name: String,
    xattr_value: String,
}

#[derive(Deserialize)]
struct GetXattrParams {
    name: String,
    xattr_name: String,
}

#[derive(Deserialize)]
struct FragmapParams {
    name: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    size: u64,
}

#[derive(Deserialize)]
struct GetLvolsParams {
    lvs_uuid: Option<String>,
    /// What Longhorn's client sends for `lvs_uuid`.
    uuid: Option<String>,
    lvs_name: Option<String>,
}

/// Xattr values as SPDK's fork stores them: the string and a NUL.
fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn from_c_string(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn mib_to_clusters(lvs: &Lvs, mib: u64) -> Result<u64, RpcError> {
    let cs = lvs.store.info().cluster_size as u64;
    mib.checked_mul(1024 * 1024)
        .map(|b| b.div_ceil(cs))
        .ok_or_else(|| invalid(strerror(libc::EINVAL)))
}

fn lvol_json(lvs: &Lvs, id: u64) -> Option<Value> {
    let l = lvs.store.lvol(id)?;
    let info = lvs.store.info();
    Some(json!({
        "alias": format!("{}/{}", info.name, l.name),
        "uuid": l.uuid.hyphenated().to_string(),
        "name": l.name,
        "creation_time": l.creation_time,
        "is_thin_provisioned": l.thin,
        "is_snapshot": lvs::is_snapshot(&l),
        "is_clone": lvs::visible_parent(lvs, &l).is_some(),
        "is_esnap_clone": matches!(l.parent, super::disk::Parent::External { .. }),
        "is_degraded": false,
        "lvs": {"name": info.name, "uuid": info.uuid.hyphenated().to_string()},
    }))
}

/// SPDK's base64 of a bit array: LSB first within each byte, padded.
fn fragmap_b64(bits: &[bool]) -> String {
    let mut bytes = vec![0u8; bits.len().div_ceil(8)];
    for (i, &b) in bits.iter().enumerate() {
        if b {
            bytes[i / 8] |= 1 << (i % 8);
        }
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn register(table: &mut RpcTable) {
    lvs::install_examine();

    table.register_with(
        "bdev_lvol_create_lvstore",
        StateMask::RUNTIME,
        |p: CreateStoreParams| async move {
            if p.md_page_size != 0 && p.md_page_size != super::disk::MD_PAGE_BYTES as u32 {
                return Err(invalid(strerror(libc::EINVAL)));
            }
            let clear = parse_clear(p.clear_method.as_deref(), "Invalid clear_method parameter")?;
            let cluster = if p.cluster_sz == 0 {
                lvs::DEFAULT_CLUSTER_SIZE
            } else {
                p.cluster_sz
            };
            let ratio = if p.num_md_pages_per_cluster_ratio == 0 {
                100
            } else {
                p.num_md_pages_per_cluster_ratio
            };
            let r = lvs::create_store(CreateStoreOptions {
                bdev_name: p.bdev_name,
                lvs_name: p.lvs_name,
                cluster_size: cluster,
                clear_method: clear,
                md_pages_per_cluster_ratio: ratio,
            })
            .await;
            match r {
                Ok(u) => Ok(json!(u.hyphenated().to_string())),
                // Checks before any work: raw codes.
                Err(e @ (LvolError::NotFound(_) | LvolError::Perm(_) | LvolError::Exists(_))) => {
                    Err(raw(&e))
                }
                Err(e @ LvolError::Invalid(_)) => Err(raw(&e)),
                Err(e) => Err(failed(e)),
            }
        },
    );

    table.register_with(
        "bdev_lvol_delete_lvstore",
        StateMask::RUNTIME,
        |p: StoreSelector| async move {
            let lvs = store_xor(p.uuid.as_deref(), p.lvs_name.as_deref())?;
            lvs::delete_store(lvs).await.map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register(
        "bdev_lvol_get_lvstores",
        StateMask::RUNTIME,
        |params: Option<Value>| async move {
            let list = match params {
                None | Some(Value::Null) => lvs::stores(),
                p => {
                    let p: StoreSelector = decode_params(p)?;
                    vec![store_xor(p.uuid.as_deref(), p.lvs_name.as_deref())?]
                }
            };
            Ok(Value::Array(
                list.iter().map(|l| lvs::store_json(l)).collect(),
            ))
        },
    );

    table.register_with(
        "bdev_lvol_rename_lvstore",
        StateMask::RUNTIME,
        |p: RenameStoreParams| async move {
            let lvs = lvs::find_store(None, Some(&p.old_name)).ok_or_else(|| {
                RpcError::new(
                    -libc::ENOENT,
                    format!("Lvol store {} not found", p.old_name),
                )
            })?;
            lvs::rename_store(&lvs, &p.new_name).await.map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_grow_lvstore",
        StateMask::RUNTIME,
        |p: StoreSelector| async move {
            let lvs = store_xor(p.uuid.as_deref(), p.lvs_name.as_deref())?;
            let _op = lvs.op_lock.lock().await;
            lvs.store.grow().await.map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_create",
        StateMask::RUNTIME,
        |p: CreateParams| async move {
            let lvs = store_xor(p.uuid.as_deref(), p.lvs_name.as_deref())?;
            let clear = parse_clear(p.clear_method.as_deref(), "Invalid clean_method option")?;
            let clusters = mib_to_clusters(&lvs, p.size_in_mib)?;
            let mut o = CreateOptions::new(p.lvol_name, clusters, p.thin_provision);
            o.clear_method = clear;
            match lvs::create_lvol(&lvs, o).await {
                Ok(l) => Ok(json!(l.uuid.hyphenated().to_string())),
                Err(e @ (LvolError::Exists(_) | LvolError::Invalid(_))) => Err(raw(&e)),
                Err(e) => Err(failed(e)),
            }
        },
    );

    table.register_with(
        "bdev_lvol_delete",
        StateMask::RUNTIME,
        |p: NameParams| async move {
            let (lvs, id) = lvol(&p.name)?;
            lvs::delete_lvol(&lvs, id).await.map_err(internal)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_snapshot",
        StateMask::RUNTIME,
        |p: SnapshotParams| async move {
            let (lvs, id) = lvol(&p.lvol_name)?;
            let xattrs = p
                .xattrs
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| (k.clone(), c_string(v)))
                .collect();
            let info = lvs::snapshot(&lvs, id, &p.snapshot_name, xattrs)
                .await
                .map_err(|e| match e {
                    // A snapshot of a read-only lvol is EINVAL in SPDK.
                    LvolError::Perm(_) => failed(LvolError::Invalid(String::new())),
                    e => failed(e),
                })?;
            Ok(json!(info.uuid.hyphenated().to_string()))
        },
    );

    table.register_with(
        "bdev_lvol_clone",
        StateMask::RUNTIME,
        |p: CloneParams| async move {
            let (lvs, id) = lvol(&p.snapshot_name)?;
            let info = lvs::clone_lvol(&lvs, id, &p.clone_name)
                .await
                .map_err(failed)?;
            Ok(json!(info.uuid.hyphenated().to_string()))
        },
    );

    table.register_with(
        "bdev_lvol_rename",
        StateMask::RUNTIME,
        |p: RenameParams| async move {
            let (lvs, id) = lvol(&p.old_name)?;
            if lvs.store.lvol(id).is_some_and(|l| l.name == p.new_name) {
                return Err(failed(LvolError::Exists(String::new())));
            }
            lvs::rename_lvol(&lvs, id, &p.new_name)
                .await
                .map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_resize",
        StateMask::RUNTIME,
        |p: ResizeParams| async move {
            let (lvs, id) = lvol(&p.name)?;
            let clusters = mib_to_clusters(&lvs, p.size_in_mib)?;
            lvs::resize_lvol(&lvs, id, clusters).await.map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_set_read_only",
        StateMask::RUNTIME,
        |p: NameParams| async move {
            let (lvs, id) = lvol(&p.name)?;
            let l2 = lvs.clone();
            lvs::with_quiesced(&lvs, id, || async move { l2.store.set_read_only(id).await })
                .await
                .map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_set_parent",
        StateMask::RUNTIME,
        |p: SetParentParams| async move {
            let (lvs, id) = lvol(&p.lvol_name)?;
            let (plvs, pid) = lvol(&p.parent_name)?;
            if !Rc::ptr_eq(&lvs, &plvs) {
                return Err(failed(LvolError::Invalid(String::new())));
            }
            let l2 = lvs.clone();
            lvs::with_quiesced(
                &lvs,
                id,
                || async move { l2.store.set_parent(id, pid).await },
            )
            .await
            .map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_detach_parent",
        StateMask::RUNTIME,
        |p: NameParams| async move {
            let (lvs, id) = lvol(&p.name)?;
            let l2 = lvs.clone();
            lvs::with_quiesced(&lvs, id, || async move { l2.store.detach_parent(id).await })
                .await
                .map_err(failed)?;
            Ok(json!(true))
        },
    );

    for (method, decouple) in [
        ("bdev_lvol_inflate", false),
        ("bdev_lvol_decouple_parent", true),
    ] {
        table.register_with(
            method,
            StateMask::RUNTIME,
            move |p: NameParams| async move {
                let (lvs, id) = lvol(&p.name)?;
                lvs::copy_up(&lvs, id, decouple).await.map_err(failed)?;
                Ok(json!(true))
            },
        );
    }

    table.register(
        "bdev_lvol_get_lvols",
        StateMask::RUNTIME,
        |params: Option<Value>| async move {
            let stores = match params {
                None | Some(Value::Null) => lvs::stores(),
                p => {
                    let p: GetLvolsParams = decode_params(p)?;
                    let u = p.lvs_uuid.or(p.uuid);
                    vec![store_xor(u.as_deref(), p.lvs_name.as_deref())?]
                }
            };
            let mut out = Vec::new();
            for s in stores {
                let ids: Vec<u64> = s.bdevs.borrow().keys().copied().collect();
                out.extend(ids.into_iter().filter_map(|id| lvol_json(&s, id)));
            }
            Ok(Value::Array(out))
        },
    );

    table.register_with(
        "bdev_lvol_set_xattr",
        StateMask::RUNTIME,
        |p: SetXattrParams| async move {
            let (lvs, id) = lvol(&p.name)?;
            let _op = lvs.op_lock.lock().await;
            lvs.store
                .set_xattr(id, &p.xattr_name, &c_string(&p.xattr_value), false)
                .await
                .map_err(failed)?;
            Ok(json!(true))
        },
    );

    table.register_with(
        "bdev_lvol_get_xattr",
        StateMask::RUNTIME,
        |p: GetXattrParams| async move {
            let (lvs, id) = lvol(&p.name)?;
            let v = lvs.store.get_xattr(id, &p.xattr_name).map_err(internal)?;
            Ok(json!(from_c_string(&v)))
        },
    );

    // Longhorn's client asks for every snapshot's checksum in each listing
    // and reads -19 as "none computed". Until snapshot checksums exist
    // (they are registered by another method, not built yet) that is the
    // truth for every lvol; unknown lvols are -19 too.
    table.register_with(
        "bdev_lvol_get_snapshot_checksum",
        StateMask::RUNTIME,
        |p: NameParams| async move {
            lvol(&p.name)?;
            Err::<Value, _>(RpcError::new(-libc::ENODEV, strerror(libc::ENODEV)))
        },
    );

    // Ferroplane's own: the consistency checker on a loaded store (its
    // live state, and what its base holds on disk).
    table.register_with(
        "bdev_lvol_check_lvstore",
        StateMask::RUNTIME,
        |p: StoreSelector| async move {
            let lvs = store_xor(p.uuid.as_deref(), p.lvs_name.as_deref())?;
            let live = lvs.store.check();
            let desc = crate::registry::open_handle(&lvs.base, false, None)
                .map_err(|e| failed(LvolError::from(e)))?;
            let disk = super::check::check_device(&super::device::BdevDevice::new(desc)).await;
            Ok(json!({
                "clean": live.is_clean() && disk.is_clean(),
                "live": live.to_json(),
                "on_disk": disk.to_json(),
            }))
        },
    );

    table.register_with(
        "bdev_lvol_get_fragmap",
        StateMask::RUNTIME,
        |p: FragmapParams| async move { fragmap(p) },
    );
}

fn fragmap(p: FragmapParams) -> RpcResult {
    let (lvs, id) = lvol(&p.name)?;
    let l = lvs.store.lvol(id).ok_or_else(no_device)?;
    let cs = lvs.store.info().cluster_size as u64;
    let total = l.num_clusters * cs;
    let size = if p.size == 0 {
        total.saturating_sub(p.offset)
    } else {
        p.size
    };
    if !p.offset.is_multiple_of(cs)
        || !size.is_multiple_of(cs)
        || p.offset.checked_add(size).is_none_or(|e| e > total)
    {
        return Err(failed(LvolError::Invalid(String::new())));
    }
    let table = lvs.store.cluster_table(id).ok_or_else(no_device)?;
    let (first, n) = (p.offset / cs, size / cs);
    let bits: Vec<bool> = (first..first + n)
        .map(|i| {
            table
                .get(i as usize)
                .is_some_and(|e| e.load(std::sync::atomic::Ordering::Acquire) != 0)
        })
        .collect();
    Ok(json!({
        "cluster_size": cs,
        "num_clusters": n,
        "num_allocated_clusters": bits.iter().filter(|b| **b).count(),
        "fragmap": fragmap_b64(&bits),
    }))
}
