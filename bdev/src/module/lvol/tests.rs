//! Tests of the lvol store: operations and their errors, crash safety at
//! every write boundary (torn and lost writes), the checker, a store over
//! a file-backed uring bdev, and the measurements (printed, never
//! asserted on time).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Instant;

use super::check::check_device;
use super::device::{crash_image, trace_writes, unflushed_before, Landing, MdDevice, MemDevice};
use super::disk::{self, Model, Parent};
use super::*;

const BS: u32 = 512;
const CLUSTER: u32 = 64 << 10;
/// 256 MiB: 4096 clusters of 64 KiB (sparse in memory).
const DEV_BLOCKS: u64 = (256 << 20) / BS as u64;

fn block_on<T>(f: impl Future<Output = T>) -> T {
    futures_lite::future::block_on(f)
}

type LocalBoxed<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Polls all futures to completion together (concurrent committers on one
/// thread, as on the metadata core).
async fn join_all<'a, T>(mut fs: Vec<LocalBoxed<'a, T>>) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..fs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in fs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => out[i] = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|v| v.expect("done")).collect()
}

fn opts(name: &str) -> FormatOptions {
    FormatOptions {
        cluster_size: CLUSTER,
        ..FormatOptions::new(name)
    }
}

fn mem() -> Rc<MemDevice> {
    Rc::new(MemDevice::new(BS, DEV_BLOCKS))
}

async fn fresh() -> (Rc<MemDevice>, LvolStore) {
    let dev = mem();
    let s = LvolStore::format(dev.clone(), opts("lvs")).await.unwrap();
    (dev, s)
}

async fn reload(dev: &Rc<MemDevice>) -> LvolStore {
    let d2 = Rc::new(MemDevice::from_image(BS, dev.num_blocks(), dev.image()));
    LvolStore::load(d2).await.unwrap()
}

fn id_of(s: &LvolStore, name: &str) -> u64 {
    s.find_by_name(name)
        .unwrap_or_else(|| panic!("no lvol {name}"))
        .id
}

async fn alloc(s: &LvolStore, id: u64, idx: &[u64]) {
    let r: Vec<Reservation> = idx
        .iter()
        .map(|&i| s.reserve_cluster(id, i).unwrap())
        .collect();
    s.commit_clusters(r).await.unwrap();
}

fn clean(s: &LvolStore) {
    let r = s.check();
    assert!(r.is_clean(), "{r}");
}

#[test]
fn format_create_and_reload_give_the_same_state() {
    block_on(async {
        let (dev, s) = fresh().await;
        let info = s.info();
        assert_eq!(info.name, "lvs");
        assert_eq!(info.cluster_size, CLUSTER);
        assert_eq!(info.free_clusters, info.total_data_clusters);
        let thick = s
            .create_lvol(CreateOptions::new("thick", 10, false))
            .await
            .unwrap();
        assert_eq!(thick.num_allocated_clusters, 10);
        let thin = s
            .create_lvol(CreateOptions::new("thin", 100, true))
            .await
            .unwrap();
        assert_eq!(thin.num_allocated_clusters, 0);
        assert_eq!(s.info().free_clusters, info.total_data_clusters - 10);
        assert!(thin.creation_time.ends_with('Z') && thin.creation_time.len() == 20);
        assert_ne!(thick.id, thin.id);
        let s2 = reload(&dev).await;
        assert_eq!(s2.model(), s.model());
        assert_eq!(s2.info(), s.info());
        clean(&s2);
        // Tables follow the maps.
        let t = s2.cluster_table(thick.id).unwrap();
        assert_eq!(t.len(), 10);
        assert!(t.iter().all(|e| e.load(Ordering::Acquire) != 0));
    });
}

#[test]
fn bad_input_is_refused_with_spdk_codes_and_changes_nothing() {
    block_on(async {
        let (_dev, s) = fresh().await;
        s.create_lvol(CreateOptions::new("a", 4, true))
            .await
            .unwrap();
        let before = s.model();
        let free = s.info().total_data_clusters;
        let e = s
            .create_lvol(CreateOptions::new("a", 4, true))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        let e = s
            .create_lvol(CreateOptions::new("big", free + 1, false))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        let e = s
            .create_lvol(CreateOptions::new("", 4, true))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let e = s
            .create_lvol(CreateOptions::new("x".repeat(256), 4, true))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        s.create_lvol(CreateOptions::new("x".repeat(255), 1, true))
            .await
            .unwrap();
        let a = id_of(&s, "a");
        // Snapshot with two clones cannot be deleted.
        let snap = s.snapshot(a, "snap", BTreeMap::new()).await.unwrap();
        s.clone_lvol(snap.id, "c1").await.unwrap();
        let before2 = s.model();
        assert_eq!(
            s.delete_lvol(snap.id).await.unwrap_err().errno(),
            libc::EBUSY
        );
        // Read-only: no resize, no xattr, no snapshot of it, no allocation.
        assert_eq!(
            s.resize_lvol(snap.id, 8).await.unwrap_err().errno(),
            libc::EPERM
        );
        assert_eq!(
            s.set_xattr(snap.id, "k", b"v", false)
                .await
                .unwrap_err()
                .errno(),
            libc::EPERM
        );
        assert_eq!(
            s.snapshot(snap.id, "s2", BTreeMap::new())
                .await
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        assert_eq!(
            s.reserve_cluster(snap.id, 0).unwrap_err().errno(),
            libc::EPERM
        );
        // Clone of a writable lvol; unknown lvols.
        assert_eq!(
            s.clone_lvol(a, "c2").await.unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(s.delete_lvol(999).await.unwrap_err().errno(), libc::ENODEV);
        assert_eq!(s.get_xattr(a, "nope").unwrap_err().errno(), libc::ENOENT);
        // set_parent rules.
        assert_eq!(
            s.set_parent(a, snap.id).await.unwrap_err().errno(),
            libc::EEXIST
        );
        assert_eq!(s.set_parent(a, a).await.unwrap_err().errno(), libc::EINVAL);
        let c1 = id_of(&s, "c1");
        assert_eq!(
            s.set_parent(snap.id, c1).await.unwrap_err().errno(),
            libc::EINVAL
        );
        // Out-of-range reservation; a reserved cluster twice; busy lvol.
        assert_eq!(s.reserve_cluster(a, 4).unwrap_err().errno(), libc::EINVAL);
        let r = s.reserve_cluster(a, 0).unwrap();
        assert_eq!(s.reserve_cluster(a, 0).unwrap_err().errno(), libc::EBUSY);
        assert_eq!(s.delete_lvol(a).await.unwrap_err().errno(), libc::EBUSY);
        assert_eq!(
            s.snapshot(a, "s3", BTreeMap::new())
                .await
                .unwrap_err()
                .errno(),
            libc::EBUSY
        );
        drop(r);
        assert_eq!(s.model(), before2);
        clean(&s);
        let _ = before;
    });
}

#[test]
fn snapshot_clone_delete_merge_and_parents_follow_spdk() {
    block_on(async {
        let (dev, s) = fresh().await;
        let a = s
            .create_lvol(CreateOptions::new("a", 8, true))
            .await
            .unwrap()
            .id;
        alloc(&s, a, &[0, 1, 2]).await;
        let x: BTreeMap<String, Vec<u8>> =
            [("user_created".to_string(), b"true\0".to_vec())].into();
        let s1 = s.snapshot(a, "s1", x.clone()).await.unwrap();
        assert!(s1.read_only);
        assert_eq!(s1.num_allocated_clusters, 3);
        assert_eq!(s.get_xattr(s1.id, "user_created").unwrap(), b"true\0");
        let al = s.lvol(a).unwrap();
        assert_eq!(al.parent, Parent::Lvol(s1.id));
        assert_eq!(al.num_allocated_clusters, 0);
        assert!(al.thin);
        // The origin's table emptied in place; the snapshot has the clusters.
        assert!(s
            .cluster_table(a)
            .unwrap()
            .iter()
            .all(|e| e.load(Ordering::Acquire) == 0));
        let st = s.cluster_table(s1.id).unwrap();
        assert_eq!(
            st.iter().filter(|e| e.load(Ordering::Acquire) != 0).count(),
            3
        );
        // a overwrites cluster 1: a new cluster; the clone reads the old.
        alloc(&s, a, &[1, 5]).await;
        let c = s.clone_lvol(s1.id, "c").await.unwrap();
        assert_eq!(c.parent, Parent::Lvol(s1.id));
        assert_eq!(s.lvol(s1.id).unwrap().children, vec![a, c.id]);
        // Delete the clone, then the snapshot: it merges into a, which
        // keeps its own cluster 1 and takes 0 and 2; s1's cluster 1 frees.
        s.delete_lvol(c.id).await.unwrap();
        let free_before = s.info().free_clusters;
        let out = s.delete_lvol(s1.id).await.unwrap();
        assert_eq!(out.merged_into, Some(a));
        assert_eq!(out.freed_clusters, 1);
        assert_eq!(s.info().free_clusters, free_before + 1);
        let al = s.lvol(a).unwrap();
        assert_eq!(al.parent, Parent::None);
        assert_eq!(al.num_allocated_clusters, 4);
        // Chains: detach re-parents to the grandparent.
        let s2 = s.snapshot(a, "s2", BTreeMap::new()).await.unwrap();
        let s3 = s.snapshot(a, "s3", BTreeMap::new()).await.unwrap();
        assert_eq!(s.lvol(s3.id).unwrap().parent, Parent::Lvol(s2.id));
        s.detach_parent(a).await.unwrap();
        assert_eq!(s.lvol(a).unwrap().parent, Parent::Lvol(s2.id));
        s.detach_parent(a).await.unwrap();
        assert_eq!(s.lvol(a).unwrap().parent, Parent::None);
        assert_eq!(s.detach_parent(a).await.unwrap_err().errno(), libc::EINVAL);
        s.set_parent(a, s3.id).await.unwrap();
        // Decouple from s3 (which owns nothing): allowed right away.
        s.finish_decouple(a).await.unwrap();
        assert_eq!(s.lvol(a).unwrap().parent, Parent::Lvol(s2.id));
        // Inflate needs every cluster.
        assert_eq!(s.finish_inflate(a).await.unwrap_err().errno(), libc::EINVAL);
        let missing: Vec<u64> = (0..8).collect();
        alloc(&s, a, &missing).await;
        s.finish_inflate(a).await.unwrap();
        let al = s.lvol(a).unwrap();
        assert!(!al.thin);
        assert_eq!(al.parent, Parent::None);
        // Release on thick refused; resize shrink frees.
        assert_eq!(
            s.release_clusters(a, 0, 1).await.unwrap_err().errno(),
            libc::EINVAL
        );
        let f = s.info().free_clusters;
        s.resize_lvol(a, 2).await.unwrap();
        assert_eq!(s.info().free_clusters, f + 6);
        assert_eq!(s.cluster_table(a).unwrap().len(), 2);
        let r = reload(&dev).await;
        assert_eq!(r.model(), s.model());
        clean(&r);
    });
}

#[test]
fn blob_ids_are_never_reused_and_a_newer_version_is_refused() {
    block_on(async {
        let (dev, s) = fresh().await;
        let a = s
            .create_lvol(CreateOptions::new("a", 1, true))
            .await
            .unwrap()
            .id;
        s.delete_lvol(a).await.unwrap();
        s.checkpoint().await.unwrap();
        let s2 = reload(&dev).await;
        let b = s2
            .create_lvol(CreateOptions::new("b", 1, true))
            .await
            .unwrap()
            .id;
        assert!(b > a);
        // A superblock of version 2 (valid CRC) refuses to load, clearly.
        let mut img = dev.image();
        for page in 0..2u64 {
            let c = img.get_mut(&page).unwrap();
            c[8] = 2;
            let crc = disk::crc_with_hole(c, 12);
            c[12..16].copy_from_slice(&crc.to_le_bytes());
        }
        let d2 = Rc::new(MemDevice::from_image(BS, DEV_BLOCKS, img));
        let e = LvolStore::load(d2).await.unwrap_err();
        assert!(matches!(e, LvolError::Unsupported(_)), "{e:?}");
        assert!(e.to_string().contains("newer"), "{e}");
        // An empty device has no store.
        let e = LvolStore::load(mem()).await.unwrap_err();
        assert!(matches!(e, LvolError::NoStore(_)), "{e:?}");
    });
}

// ---------------------------------------------------------------------------
// Crash matrix.

type Op = Box<dyn for<'a> Fn(&'a LvolStore, &'a MemDevice) -> LocalBoxed<'a, ()>>;

fn op<F>(f: F) -> Op
where
    F: for<'a> Fn(&'a LvolStore, &'a MemDevice) -> LocalBoxed<'a, ()> + 'static,
{
    Box::new(f)
}

fn landings(unflushed: usize) -> Vec<Landing> {
    let mut v = vec![
        Landing::None,
        Landing::All { inflight: false },
        Landing::All { inflight: true },
        Landing::Torn {
            modulo: 2,
            residue: 0,
        },
        Landing::Torn {
            modulo: 2,
            residue: 1,
        },
        Landing::Torn {
            modulo: 3,
            residue: 2,
        },
        Landing::OnlyInflightPrefix { sectors: 1 },
        Landing::OnlyInflightPrefix { sectors: 7 },
        Landing::OnlyInflightPrefix { sectors: 9 },
        Landing::InflightWithoutPrefix { sectors: 8 },
        Landing::InflightWithoutPrefix { sectors: 1 },
    ];
    for k in 0..unflushed {
        v.push(Landing::AllBut(k));
    }
    v
}

/// Runs `ops` in order on a fresh store (after `setup`), recording every
/// device write; then for every write boundary and landing variant builds
/// the device a crash there leaves, loads it, and asserts the state is
/// exactly the one before or after the operation in progress, and that
/// the checker finds nothing. Returns the number of images loaded.
fn crash_matrix(setup: Op, ops: Vec<(&'static str, Op)>) -> usize {
    block_on(async {
        let (dev, s) = fresh().await;
        setup(&s, &dev).await;
        let base = dev.image();
        let mut states: Vec<Model> = vec![s.model()];
        let mut marks = Vec::new();
        dev.start_trace();
        let w0 = dev.writes();
        for (name, o) in &ops {
            o(&s, &dev).await;
            clean(&s);
            states.push(s.model());
            marks.push((dev.writes() - w0, *name));
        }
        let trace = dev.take_trace();
        let total = trace_writes(&trace);
        let mut loaded = 0;
        for n in 0..=total {
            let (i, name) = match marks.iter().position(|(m, _)| *m > n) {
                Some(i) => (i, marks[i].1),
                None => (ops.len(), "end"),
            };
            for how in landings(unflushed_before(&trace, n)) {
                let img = crash_image(&base, &trace, n, &how);
                let d = Rc::new(MemDevice::from_image(BS, dev.num_blocks(), img));
                let report = check_device(&*d).await;
                assert!(report.is_clean(), "op {name}, write {n}, {how:?}: {report}");
                let r = LvolStore::load(d.clone())
                    .await
                    .unwrap_or_else(|e| panic!("op {name}, write {n}, {how:?}: {e:?}"));
                let m = r.model();
                let ok = m == states[i] || (i < ops.len() && m == states[i + 1]);
                assert!(
                    ok,
                    "op {name}, crash at write {n} of {total}, {how:?}: state is neither before nor after"
                );
                clean(&r);
                // The reloaded store keeps working and reloads the same.
                r.create_lvol(CreateOptions::new("after-crash", 1, true))
                    .await
                    .unwrap();
                let again = reload(&d).await;
                assert_eq!(
                    again.model(),
                    r.model(),
                    "op {name}, write {n}, {how:?}: second load"
                );
                loaded += 1;
            }
        }
        loaded
    })
}

fn setup_base() -> Op {
    op(|s, _| {
        Box::pin(async move {
            s.create_lvol(CreateOptions::new("base", 4, false))
                .await
                .unwrap();
            let t = s
                .create_lvol(CreateOptions::new("t1", 8, true))
                .await
                .unwrap()
                .id;
            alloc(s, t, &[0, 3]).await;
        })
    })
}

#[test]
fn crash_at_every_write_of_every_operation_loads_before_or_after() {
    let ops: Vec<(&'static str, Op)> = vec![
        (
            "create thin",
            op(|s, _| {
                Box::pin(async move {
                    s.create_lvol(CreateOptions::new("a", 16, true))
                        .await
                        .unwrap();
                })
            }),
        ),
        (
            "create thick",
            op(|s, _| {
                Box::pin(async move {
                    s.create_lvol(CreateOptions::new("b", 8, false))
                        .await
                        .unwrap();
                })
            }),
        ),
        (
            "allocate batch",
            op(|s, _| {
                Box::pin(async move {
                    alloc(s, id_of(s, "a"), &[0, 1, 7]).await;
                })
            }),
        ),
        (
            "snapshot",
            op(|s, _| {
                Box::pin(async move {
                    let x = [(
                        "snapshot_timestamp".to_string(),
                        b"2026-12-02T01:00:00Z\0".to_vec(),
                    )]
                    .into();
                    s.snapshot(id_of(s, "a"), "snap1", x).await.unwrap();
                })
            }),
        ),
        (
            "clone",
            op(|s, _| {
                Box::pin(async move {
                    s.clone_lvol(id_of(s, "snap1"), "c1").await.unwrap();
                })
            }),
        ),
        (
            "allocate after snapshot",
            op(|s, _| {
                Box::pin(async move {
                    alloc(s, id_of(s, "a"), &[1]).await;
                })
            }),
        ),
        (
            "rename lvol",
            op(|s, _| {
                Box::pin(async move {
                    s.rename_lvol(id_of(s, "a"), "a2").await.unwrap();
                })
            }),
        ),
        (
            "rename store",
            op(|s, _| {
                Box::pin(async move {
                    s.rename_store("lvs2").await.unwrap();
                })
            }),
        ),
        (
            "set xattr",
            op(|s, _| {
                Box::pin(async move {
                    s.set_xattr(id_of(s, "a2"), "k", b"v\0", false)
                        .await
                        .unwrap();
                })
            }),
        ),
        (
            "remove xattr",
            op(|s, _| {
                Box::pin(async move {
                    s.remove_xattr(id_of(s, "a2"), "k", false, false)
                        .await
                        .unwrap();
                })
            }),
        ),
        (
            "resize thin grow",
            op(|s, _| {
                Box::pin(async move {
                    s.resize_lvol(id_of(s, "a2"), 20).await.unwrap();
                })
            }),
        ),
        (
            "resize thick grow",
            op(|s, _| {
                Box::pin(async move {
                    s.resize_lvol(id_of(s, "b"), 12).await.unwrap();
                })
            }),
        ),
        (
            "resize shrink",
            op(|s, _| {
                Box::pin(async move {
                    s.resize_lvol(id_of(s, "b"), 3).await.unwrap();
                })
            }),
        ),
        (
            "set read-only",
            op(|s, _| {
                Box::pin(async move {
                    s.set_read_only(id_of(s, "b")).await.unwrap();
                })
            }),
        ),
        (
            "release",
            op(|s, _| {
                Box::pin(async move {
                    s.release_clusters(id_of(s, "t1"), 0, 4).await.unwrap();
                })
            }),
        ),
        (
            "delete clone",
            op(|s, _| {
                Box::pin(async move {
                    s.delete_lvol(id_of(s, "c1")).await.unwrap();
                })
            }),
        ),
        (
            "delete snapshot (merge)",
            op(|s, _| {
                Box::pin(async move {
                    let out = s.delete_lvol(id_of(s, "snap1")).await.unwrap();
                    assert!(out.merged_into.is_some());
                })
            }),
        ),
        (
            "snapshot chain",
            op(|s, _| {
                Box::pin(async move {
                    s.snapshot(id_of(s, "a2"), "s2", BTreeMap::new())
                        .await
                        .unwrap();
                })
            }),
        ),
        (
            "create d",
            op(|s, _| {
                Box::pin(async move {
                    s.create_lvol(CreateOptions::new("d", 20, true))
                        .await
                        .unwrap();
                })
            }),
        ),
        (
            "set parent",
            op(|s, _| {
                Box::pin(async move {
                    s.set_parent(id_of(s, "d"), id_of(s, "s2")).await.unwrap();
                })
            }),
        ),
        (
            "detach parent",
            op(|s, _| {
                Box::pin(async move {
                    s.detach_parent(id_of(s, "d")).await.unwrap();
                })
            }),
        ),
        (
            "clone e",
            op(|s, _| {
                Box::pin(async move {
                    s.clone_lvol(id_of(s, "s2"), "e").await.unwrap();
                })
            }),
        ),
        (
            "allocate all of e",
            op(|s, _| {
                Box::pin(async move {
                    let all: Vec<u64> = (0..20).collect();
                    alloc(s, id_of(s, "e"), &all).await;
                })
            }),
        ),
        (
            "finish inflate",
            op(|s, _| {
                Box::pin(async move {
                    s.finish_inflate(id_of(s, "e")).await.unwrap();
                })
            }),
        ),
        (
            "clone e2",
            op(|s, _| {
                Box::pin(async move {
                    s.clone_lvol(id_of(s, "s2"), "e2").await.unwrap();
                })
            }),
        ),
        (
            "allocate what s2 owns in e2",
            op(|s, _| {
                Box::pin(async move {
                    let owned: Vec<u64> = s.model().lvols[&id_of(s, "s2")]
                        .map
                        .iter()
                        .enumerate()
                        .filter(|(_, &m)| m != 0)
                        .map(|(i, _)| i as u64)
                        .collect();
                    alloc(s, id_of(s, "e2"), &owned).await;
                })
            }),
        ),
        (
            "finish decouple",
            op(|s, _| {
                Box::pin(async move {
                    s.finish_decouple(id_of(s, "e2")).await.unwrap();
                })
            }),
        ),
        (
            "esnap clone",
            op(|s, _| {
                Box::pin(async move {
                    let mut o = CreateOptions::new("esnap", 5, false);
                    o.external_parent = Some((uuid::Uuid::from_u128(42), "ext0".into()));
                    s.create_lvol(o).await.unwrap();
                })
            }),
        ),
        (
            "grow store",
            op(|s, d| {
                Box::pin(async move {
                    d.set_num_blocks(DEV_BLOCKS * 2);
                    let n = s.grow().await.unwrap();
                    assert!(n > 4000);
                })
            }),
        ),
        (
            "delete thick",
            op(|s, _| {
                Box::pin(async move {
                    s.delete_lvol(id_of(s, "base")).await.unwrap();
                })
            }),
        ),
        (
            "big transaction (checkpoint commit)",
            op(|s, _| {
                Box::pin(async move {
                    let mut o = CreateOptions::new("fat", 2, true);
                    for i in 0..60 {
                        o.xattrs.insert(format!("x{i}"), vec![i as u8; 3000]);
                    }
                    s.create_lvol(o).await.unwrap();
                })
            }),
        ),
        (
            "forced checkpoint",
            op(|s, _| {
                Box::pin(async move {
                    s.checkpoint().await.unwrap();
                })
            }),
        ),
    ];
    // A transaction of several log pages (one write): later pages may land
    // without the first.
    let mut ops = ops;
    ops.insert(
        2,
        (
            "create with xattrs (multi-page)",
            op(|s, _| {
                Box::pin(async move {
                    let mut o = CreateOptions::new("multi", 3, true);
                    for i in 0..3 {
                        o.xattrs.insert(format!("m{i}"), vec![7; 3000]);
                    }
                    s.create_lvol(o).await.unwrap();
                })
            }),
        ),
    );
    // Enough page-sized commits to fill half the log: the leader's
    // checkpoint next to a batch, and the superblock after it.
    for i in 0..40 {
        ops.push((
            "xattr page",
            op(move |s, _| {
                Box::pin(async move {
                    s.set_xattr(id_of(s, "a2"), "page", &vec![i as u8; 3500], false)
                        .await
                        .unwrap();
                })
            }),
        ));
    }
    let n = crash_matrix(setup_base(), ops);
    println!("crash matrix: {n} crash images loaded");
    assert!(n > 500);
}

// ---------------------------------------------------------------------------
// Concurrency, group commit, measurements.

#[test]
fn concurrent_allocations_batch_into_few_commits_and_never_share_a_cluster() {
    block_on(async {
        // 64 GiB (sparse): 1M clusters, lvols of 16K clusters each, so an
        // allocation that cost O(lvol size) would show in the rate.
        let dev = Rc::new(MemDevice::new(BS, (64u64 << 30) / BS as u64));
        let s = LvolStore::format(dev.clone(), opts("big")).await.unwrap();
        dev.set_yield_io(true);
        let writers = 64u64;
        let per = 32u64;
        let ids: Vec<u64> = {
            let fs: Vec<LocalBoxed<'_, u64>> = (0..writers)
                .map(|w| {
                    let s = &s;
                    Box::pin(async move {
                        s.create_lvol(CreateOptions::new(format!("w{w}"), 16384, true))
                            .await
                            .unwrap()
                            .id
                    }) as LocalBoxed<'_, u64>
                })
                .collect();
            join_all(fs).await
        };
        let (b0, _) = s.journal_stats();
        let t = Instant::now();
        let fs: Vec<LocalBoxed<'_, ()>> = ids
            .iter()
            .map(|&id| {
                let s = &s;
                Box::pin(async move {
                    for i in 0..per {
                        let r = s.reserve_cluster(id, i).unwrap();
                        // The caller's data write would go here.
                        futures_lite::future::yield_now().await;
                        s.commit_clusters(vec![r]).await.unwrap();
                        let t = s.cluster_table(id).unwrap();
                        assert_ne!(t[i as usize].load(Ordering::Acquire), 0);
                    }
                }) as LocalBoxed<'_, ()>
            })
            .collect();
        join_all(fs).await;
        let dt = t.elapsed();
        let (b1, ck) = s.journal_stats();
        let n = writers * per;
        println!(
            "thin allocation, in-memory device (one yield per I/O), {writers} writers on 16K-cluster lvols: \
             {n} clusters in {dt:?} = {:.0} clusters/s, {} log batches, {ck} checkpoints",
            n as f64 / dt.as_secs_f64(),
            b1 - b0
        );
        assert!(
            b1 - b0 < n / 4,
            "group commit: {} batches for {n} commits",
            b1 - b0
        );
        let m = s.model();
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            let map = &m.lvols[id].map;
            assert_eq!(map.iter().filter(|&&e| e != 0).count() as u64, per);
            for &e in &map[..per as usize] {
                assert_ne!(e, 0);
                assert!(seen.insert(e), "cluster {} given twice", e - 1);
            }
        }
        assert_eq!(reload(&dev).await.model(), m);
        clean(&s);
    });
}

#[test]
fn loading_1000_lvols_is_fast() {
    block_on(async {
        let dev = Rc::new(MemDevice::new(BS, (4u64 << 30) / BS as u64));
        let s = LvolStore::format(dev.clone(), opts("big")).await.unwrap();
        dev.set_yield_io(true);
        for chunk in 0..10 {
            let fs: Vec<LocalBoxed<'_, ()>> = (0..100)
                .map(|k| {
                    let s = &s;
                    Box::pin(async move {
                        let mut o =
                            CreateOptions::new(format!("replica-{chunk}-{k}-r-0123abcd"), 64, true);
                        o.xattrs.insert("user_created".into(), b"true\0".to_vec());
                        o.xattrs.insert(
                            "snapshot_timestamp".into(),
                            b"2026-12-02T01:00:00Z\0".to_vec(),
                        );
                        let id = s.create_lvol(o).await.unwrap().id;
                        alloc(s, id, &[0, 5, 6, 7, 30]).await;
                    }) as LocalBoxed<'_, ()>
                })
                .collect();
            join_all(fs).await;
        }
        dev.set_yield_io(false);
        let (batches, ckpts) = s.journal_stats();
        let t = Instant::now();
        let r = reload(&dev).await;
        let dt = t.elapsed();
        assert_eq!(r.lvols().len(), 1000);
        assert_eq!(r.model(), s.model());
        println!(
            "load of 1000 lvols (in-memory device, {} build): {dt:?} \
             ({batches} batches, {ckpts} checkpoints while creating)",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
    });
}

// ---------------------------------------------------------------------------
// The checker.

/// Replaces the store's state on `dev` with `m` (a forged checkpoint the
/// superblock names, and an empty log) to test what the checker finds.
fn forge(dev: &MemDevice, m: &Model) -> Rc<MemDevice> {
    let img = dev.image();
    let d = Rc::new(MemDevice::from_image(BS, dev.num_blocks(), img));
    block_on(async {
        let raw = d.read(0, 16).await.unwrap();
        let (sb, _) = disk::Superblock::newest([&raw[..4096], &raw[4096..]]);
        let mut sb = sb.unwrap();
        let ck = disk::encode_checkpoint(m, sb.ckpt_gen, 0);
        let mut padded = ck.clone();
        padded.resize(ck.len().div_ceil(4096) * 4096, 0);
        let l = sb.layout;
        d.write(l.ckpt_start(sb.ckpt_area()) * 8, &padded)
            .await
            .unwrap();
        sb.ckpt_bytes = ck.len() as u64;
        sb.ckpt_crc = crc32c::crc32c(&ck);
        sb.log_start_seq = 1 << 40;
        d.write(sb.copy() as u64 * 8, &sb.encode()).await.unwrap();
        let back = super::store::read_metadata(&*d).await.unwrap();
        assert_eq!(&back.model, m, "forged state did not load");
    });
    d
}

#[test]
fn the_checker_finds_double_owners_bad_parents_and_bad_crcs() {
    block_on(async {
        let (dev, s) = fresh().await;
        let a = s
            .create_lvol(CreateOptions::new("a", 4, false))
            .await
            .unwrap()
            .id;
        let b = s
            .create_lvol(CreateOptions::new("b", 4, true))
            .await
            .unwrap()
            .id;
        let snap = s.snapshot(a, "snap", BTreeMap::new()).await.unwrap().id;
        s.checkpoint().await.unwrap();
        assert!(check_device(&*dev).await.is_clean());
        let good = s.model();
        let kinds = |r: &CheckReport| r.errors().map(|f| f.kind).collect::<Vec<_>>();

        let mut m = good.clone();
        let shared = m.lvols[&snap].map[0];
        assert_ne!(shared, 0, "{:?}", m.lvols);
        m.lvols.get_mut(&b).unwrap().map[2] = shared;
        let r = check_device(&*forge(&dev, &m)).await;
        assert_eq!(kinds(&r), vec![FindingKind::DoublyOwned], "{r}");
        assert_eq!(r.errors().next().unwrap().cluster, Some(shared - 1));
        // And a normal load refuses such a store.
        assert!(matches!(
            LvolStore::load(forge(&dev, &m)).await.unwrap_err(),
            LvolError::Corrupt(_)
        ));

        let mut m = good.clone();
        m.lvols.get_mut(&b).unwrap().map[1] = m.total_data_clusters + 7;
        let r = check_device(&*forge(&dev, &m)).await;
        assert_eq!(kinds(&r), vec![FindingKind::BeyondStore], "{r}");

        let mut m = good.clone();
        m.lvols.get_mut(&b).unwrap().parent = Parent::Lvol(999);
        m.lvols.get_mut(&snap).unwrap().read_only = false;
        let r = check_device(&*forge(&dev, &m)).await;
        let k = kinds(&r);
        assert!(k.contains(&FindingKind::MissingParent), "{r}");
        assert!(k.contains(&FindingKind::ParentNotReadOnly), "{r}");

        let mut m = good.clone();
        m.lvols.get_mut(&snap).unwrap().parent = Parent::Lvol(a);
        let r = check_device(&*forge(&dev, &m)).await;
        assert!(kinds(&r).contains(&FindingKind::ParentCycle), "{r}");

        // A damaged checkpoint (one flipped bit) is a load error.
        let d = forge(&dev, &good);
        assert!(check_device(&*d).await.is_clean());
        let raw = d.read(0, 16).await.unwrap();
        let sb = disk::Superblock::newest([&raw[..4096], &raw[4096..]])
            .0
            .unwrap();
        let at = sb.layout.ckpt_start(sb.ckpt_area()) * 8;
        let mut page = d.read(at, 8).await.unwrap();
        page[200] ^= 4;
        d.write(at, &page).await.unwrap();
        let r = check_device(&*d).await;
        assert_eq!(kinds(&r), vec![FindingKind::Load], "{r}");
        assert!(r.to_string().contains("CRC"), "{r}");

        // The live store: a leaked bit is found.
        let (_d, s2) = fresh().await;
        let keep = s2
            .reserve_cluster(
                s2.create_lvol(CreateOptions::new("x", 2, true))
                    .await
                    .unwrap()
                    .id,
                0,
            )
            .unwrap();
        clean(&s2);
        std::mem::forget(keep);
        // A forgotten reservation still counts as reserved: not a leak.
        clean(&s2);
    });
}

// ---------------------------------------------------------------------------
// Over a file-backed uring bdev, through the bdev layer.

fn scratch_file(name: &str, len: u64) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fp-lvol-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("disk.img");
    let file = std::fs::File::create(&f).unwrap();
    file.set_len(len).unwrap();
    f
}

async fn uring_dev(name: &str, file: &std::path::Path) -> Rc<dyn MdDevice> {
    use crate::module::uring::{rpc::create, CreatedBy, UringOptions};
    create(UringOptions {
        name: name.into(),
        filename: file.to_path_buf(),
        block_size: 4096,
        uuid: None,
        readonly: false,
        created_by: CreatedBy::Uring,
    })
    .await
    .unwrap();
    let desc = crate::registry::open(name, true, None).unwrap();
    desc.claim("lvol").unwrap();
    Rc::new(BdevDevice::new(desc))
}

#[test]
fn a_store_on_a_uring_file_reloads_the_same_after_restart_and_checks_clean() {
    // 8 GiB, sparse: 8192 clusters of 1 MiB (no data is written).
    let file = scratch_file("uring", 8 << 30);
    let f2 = file.clone();
    crate::testutil::run(move || async move {
        let dev = uring_dev("U0", &f2).await;
        // 1 MiB clusters, as Longhorn creates its stores.
        let mut o = FormatOptions::new("lvs");
        o.cluster_size = 1 << 20;
        let s = LvolStore::format(dev, o).await.unwrap();
        let t = Instant::now();
        let fs: Vec<LocalBoxed<'_, u64>> = (0..1000)
            .map(|k| {
                let s = &s;
                Box::pin(async move {
                    let mut o = CreateOptions::new(format!("vol-{k}"), 4, true);
                    o.xattrs.insert("user_created".into(), b"true\0".to_vec());
                    s.create_lvol(o).await.unwrap().id
                }) as LocalBoxed<'_, u64>
            })
            .collect();
        let ids = join_all(fs).await;
        let dt_create = t.elapsed();
        let t = Instant::now();
        let fs: Vec<LocalBoxed<'_, ()>> = ids
            .iter()
            .map(|&id| {
                let s = &s;
                Box::pin(async move {
                    for i in 0..4 {
                        let r = s.reserve_cluster(id, i).unwrap();
                        s.commit_clusters(vec![r]).await.unwrap();
                    }
                }) as LocalBoxed<'_, ()>
            })
            .collect();
        join_all(fs).await;
        let dt_alloc = t.elapsed();
        let (batches, ckpts) = s.journal_stats();
        println!(
            "uring file, 4 KiB blocks ({} build): 1000 concurrent creates in {dt_create:?}; \
             4000 thin allocations (1000 writers) in {dt_alloc:?} = {:.0} clusters/s; \
             {batches} batches, {ckpts} checkpoints",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            4000.0 / dt_alloc.as_secs_f64()
        );
        let snap = s.snapshot(ids[0], "snap", BTreeMap::new()).await.unwrap();
        s.clone_lvol(snap.id, "clone").await.unwrap();
        s.delete_lvol(ids[1]).await.unwrap();
        let before = s.model();
        let info = s.info();
        drop(s);
        // A restart: the bdev goes away and comes back on the same file.
        crate::registry::unregister("U0", None).await.unwrap();
        let dev = uring_dev("U1", &f2).await;
        let t = Instant::now();
        let s = LvolStore::load(dev).await.unwrap();
        println!(
            "uring file: load of {} lvols in {:?}",
            s.lvols().len(),
            t.elapsed()
        );
        assert_eq!(s.model(), before);
        assert_eq!(s.info(), info);
        clean(&s);
    });
    // The standalone checker's path: std I/O on the file.
    let r = super::check::check_file(&file).unwrap();
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.lvols, 1001);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn clusters_freed_by_a_commit_in_flight_are_not_handed_out_until_it_is_durable() {
    block_on(async {
        let (dev, s) = fresh().await;
        let total = s.info().total_data_clusters;
        let a = s
            .create_lvol(CreateOptions::new("all", total, false))
            .await
            .unwrap()
            .id;
        let b = s
            .create_lvol(CreateOptions::new("b", 4, true))
            .await
            .unwrap()
            .id;
        dev.set_yield_io(true);
        let mut del = Box::pin(s.delete_lvol(a));
        // One poll: the delete is applied and its commit is being written.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(del.as_mut().poll(&mut cx).is_pending());
        assert!(s.lvol(a).is_none());
        // Its clusters are not free yet: a new owner could otherwise write
        // into a cluster a crash now would give back to `all`.
        assert_eq!(s.reserve_cluster(b, 0).unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(s.info().free_clusters, 0);
        let out = del.await.unwrap();
        assert_eq!(out.freed_clusters, total);
        assert_eq!(s.info().free_clusters, total);
        alloc(&s, b, &[0]).await;
        clean(&s);
    });
}

#[test]
fn allocation_is_next_fit_wraps_around_and_stops_at_the_end() {
    block_on(async {
        let (_dev, s) = fresh().await;
        let total = s.info().total_data_clusters;
        // Fill all but three clusters, free a few in the middle, then take
        // every free cluster one by one: each exactly once, then ENOSPC.
        let big = s
            .create_lvol(CreateOptions::new("big", total - 3, true))
            .await
            .unwrap()
            .id;
        let all: Vec<u64> = (0..total - 3).collect();
        for chunk in all.chunks(500) {
            alloc(&s, big, chunk).await;
        }
        s.release_clusters(big, 100, 5).await.unwrap();
        assert_eq!(s.info().free_clusters, 8);
        let t = s
            .create_lvol(CreateOptions::new("t", 8, true))
            .await
            .unwrap()
            .id;
        let mut got = Vec::new();
        for i in 0..8 {
            let r = s.reserve_cluster(t, i).unwrap();
            got.push(r.physical);
            s.commit_clusters(vec![r]).await.unwrap();
        }
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 8);
        assert!(got.iter().all(|&p| p < total));
        let u = s
            .create_lvol(CreateOptions::new("u", 1, true))
            .await
            .unwrap()
            .id;
        assert_eq!(s.reserve_cluster(u, 0).unwrap_err().errno(), libc::ENOSPC);
        clean(&s);
        // Consecutive allocations are contiguous: one run each.
        let runs = disk::runs_of(&s.model().lvols[&big].map);
        assert!(runs.len() <= 3, "{} runs", runs.len());
        let n = s.lvols();
        assert_eq!(n.len(), 3);
    });
}

#[test]
fn a_queue_larger_than_a_batch_with_a_checkpoint_due_reloads_exactly() {
    // 64 log pages, batches of at most 16: n concurrent one-page creates
    // arrive together while the log is a third full, so rounds are partial
    // batches and checkpoints; nothing may be applied twice (a checkpoint
    // taken while part of the queue is still unwritten would be).
    for n in [17, 25, 35, 45, 60] {
        block_on(async {
            // 1024 clusters: the smallest log.
            let dev = Rc::new(MemDevice::new(BS, (64 << 20) / BS as u64));
            let s = LvolStore::format(dev.clone(), opts("small")).await.unwrap();
            assert_eq!(s.layout().log_pages, 64);
            let a = s
                .create_lvol(CreateOptions::new("a", 1, true))
                .await
                .unwrap()
                .id;
            for i in 0..20u8 {
                s.set_xattr(a, "fill", &[i; 3500], false).await.unwrap();
            }
            dev.set_yield_io(true);
            let fs: Vec<LocalBoxed<'_, ()>> = (0..n)
                .map(|k| {
                    let s = &s;
                    Box::pin(async move {
                        let mut o = CreateOptions::new(format!("v{k}"), 2, true);
                        o.xattrs.insert("pad".into(), vec![k as u8; 3500]);
                        s.create_lvol(o).await.unwrap();
                    }) as LocalBoxed<'_, ()>
                })
                .collect();
            join_all(fs).await;
            let (batches, ckpts) = s.journal_stats();
            println!("queue of {n}: {batches} batches, {ckpts} checkpoints");
            let r = reload(&dev).await;
            assert_eq!(r.model(), s.model(), "queue of {n}");
            clean(&r);
        });
    }
}

#[test]
fn crashes_during_concurrent_commits_load_a_prefix_with_every_acknowledged_one() {
    // 45 concurrent creates over partial batches, checkpoints and a
    // checkpoint-only round: after a crash at any write, the lvols present
    // are the first k created (ids are handed out in commit order), k at
    // least the number acknowledged before that write.
    for n in [45u64, 60] {
        block_on(async {
            let dev = Rc::new(MemDevice::new(BS, (64 << 20) / BS as u64));
            let s = LvolStore::format(dev.clone(), opts("small")).await.unwrap();
            let a = s
                .create_lvol(CreateOptions::new("a", 1, true))
                .await
                .unwrap()
                .id;
            for i in 0..20u8 {
                s.set_xattr(a, "fill", &[i; 3500], false).await.unwrap();
            }
            let base = dev.image();
            let first_id = s.model().next_blob_id;
            dev.start_trace();
            dev.set_yield_io(true);
            let w0 = dev.writes();
            let acks = std::cell::RefCell::new(Vec::new());
            let fs: Vec<LocalBoxed<'_, ()>> = (0..n)
                .map(|k| {
                    let (s, acks, dev) = (&s, &acks, &dev);
                    Box::pin(async move {
                        let mut o = CreateOptions::new(format!("v{k}"), 2, true);
                        o.xattrs.insert("pad".into(), vec![k as u8; 3500]);
                        s.create_lvol(o).await.unwrap();
                        acks.borrow_mut().push(dev.writes() - w0);
                    }) as LocalBoxed<'_, ()>
                })
                .collect();
            join_all(fs).await;
            dev.set_yield_io(false);
            let trace = dev.take_trace();
            let total = trace_writes(&trace);
            let acks = acks.into_inner();
            let mut loaded = 0;
            for n in 0..=total {
                let acked = acks.iter().filter(|&&w| w <= n).count() as u64;
                for how in landings(unflushed_before(&trace, n)) {
                    let img = crash_image(&base, &trace, n, &how);
                    let d = Rc::new(MemDevice::from_image(BS, dev.num_blocks(), img));
                    let report = check_device(&*d).await;
                    assert!(report.is_clean(), "write {n}, {how:?}: {report}");
                    let r = LvolStore::load(d)
                        .await
                        .unwrap_or_else(|e| panic!("write {n}, {how:?}: {e:?}"));
                    let new: Vec<u64> = r
                        .model()
                        .lvols
                        .keys()
                        .copied()
                        .filter(|&id| id >= first_id)
                        .collect();
                    let k = new.len() as u64;
                    assert_eq!(
                        new,
                        (first_id..first_id + k).collect::<Vec<_>>(),
                        "write {n}, {how:?}: not a prefix"
                    );
                    assert!(
                        k >= acked,
                        "write {n}, {how:?}: {k} present, {acked} acknowledged"
                    );
                    clean(&r);
                    loaded += 1;
                }
            }
            assert_eq!(s.model().lvols.len() as u64, 1 + n);
            println!("concurrent crash matrix, {n} creates: {total} writes, {loaded} images");
        });
    }
}

#[test]
fn a_crash_during_format_over_an_old_store_leaves_the_old_one_none_or_the_new_one() {
    block_on(async {
        let (dev, old) = fresh().await;
        old.create_lvol(CreateOptions::new("old", 3, false))
            .await
            .unwrap();
        let old_model = old.model();
        let base = dev.image();
        dev.start_trace();
        let mut o = opts("new");
        o.uuid = Some(uuid::Uuid::from_u128(99));
        let new = LvolStore::format(dev.clone(), o).await.unwrap();
        let new_model = new.model();
        let trace = dev.take_trace();
        let total = trace_writes(&trace);
        let mut seen = [0; 3];
        for n in 0..=total {
            for how in landings(unflushed_before(&trace, n)) {
                let img = crash_image(&base, &trace, n, &how);
                let d = Rc::new(MemDevice::from_image(BS, DEV_BLOCKS, img));
                match LvolStore::load(d).await {
                    Ok(s) if s.model() == old_model => seen[0] += 1,
                    Ok(s) if s.model() == new_model => seen[2] += 1,
                    Err(LvolError::NoStore(_)) => seen[1] += 1,
                    Ok(s) => panic!("write {n}, {how:?}: neither store: {:?}", s.model()),
                    Err(e) => panic!("write {n}, {how:?}: {e:?}"),
                }
            }
        }
        assert!(seen.iter().all(|&c| c > 0), "old/none/new seen {seen:?}");
    });
}

#[test]
fn a_failed_metadata_write_poisons_the_store_until_reloaded() {
    block_on(async {
        let (dev, s) = fresh().await;
        let a = s
            .create_lvol(CreateOptions::new("a", 4, true))
            .await
            .unwrap()
            .id;
        let before = s.model();
        dev.fail_after_writes(0);
        let e = s.rename_lvol(a, "b").await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        // Everything after fails too: the model may be ahead of the disk.
        let e = s
            .create_lvol(CreateOptions::new("c", 1, true))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(s.reserve_cluster(a, 0).unwrap_err().errno(), libc::EIO);
        // The disk has the state before the failed operation.
        let r = reload(&dev).await;
        assert_eq!(r.model(), before);
        clean(&r);
    });
}

#[test]
fn a_release_waits_only_for_allocations_of_its_own_clusters() {
    block_on(async {
        let (dev, s) = fresh().await;
        let id = s
            .create_lvol(CreateOptions::new("t", 8, true))
            .await
            .unwrap()
            .id;
        alloc(&s, id, &[0, 1, 2, 3]).await;
        let free = s.info().free_clusters;
        // Cluster 6 is being allocated: releasing 0..4 goes ahead, a range
        // holding 6 is refused and changes nothing.
        let r = s.reserve_cluster(id, 6).unwrap();
        assert_eq!(s.release_clusters(id, 0, 2).await.unwrap(), 2);
        assert_eq!(
            s.release_clusters(id, 2, 6).await.unwrap_err().errno(),
            libc::EBUSY
        );
        // (The reservation holds one.)
        assert_eq!(s.info().free_clusters, free + 2 - 1);
        s.commit_clusters(vec![r]).await.unwrap();
        assert_eq!(s.release_clusters(id, 2, 6).await.unwrap(), 3);
        assert_eq!(s.info().free_clusters, free + 4);
        assert_eq!(s.lvol(id).unwrap().num_allocated_clusters, 0);
        clean(&s);
        let r = reload(&dev).await;
        assert_eq!(r.lvol(id).unwrap().num_allocated_clusters, 0);
        clean(&r);
    });
}
