//! Runs the real `ferroplane-lvol-check` binary over files holding an lvol
//! store made by the bdev crate's store (on its in-memory device, dumped):
//! a clean store, one with a doubly-owned cluster, one with a damaged
//! checkpoint, a file with no store, and a missing file.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use bdev::module::lvol::disk::{self, Superblock, MD_PAGE_BYTES};
use bdev::module::lvol::{CreateOptions, FormatOptions, LvolStore, MemDevice, Reservation};

const BIN: &str = env!("CARGO_BIN_EXE_ferroplane-lvol-check");

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("fp-lvol-check-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A store with a thick lvol, a snapshot, a clone and thin allocations,
/// dumped to `path`; its model.
fn make_store(path: &Path) -> disk::Model {
    futures_lite::future::block_on(async {
        let dev = Rc::new(MemDevice::new(512, (128 << 20) / 512));
        let mut o = FormatOptions::new("lvs0");
        o.cluster_size = 1 << 20;
        let s = LvolStore::format(dev.clone(), o).await.unwrap();
        let a = s
            .create_lvol(CreateOptions::new("a", 8, false))
            .await
            .unwrap()
            .id;
        let snap = s.snapshot(a, "snap", BTreeMap::new()).await.unwrap().id;
        let c = s.clone_lvol(snap, "c").await.unwrap().id;
        let r: Vec<Reservation> = (0..3).map(|i| s.reserve_cluster(c, i).unwrap()).collect();
        s.commit_clusters(r).await.unwrap();
        dev.dump(path).unwrap();
        s.model()
    })
}

fn newest_sb(path: &Path) -> Superblock {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; 2 * MD_PAGE_BYTES];
    f.read_exact_at(&mut b, 0).unwrap();
    Superblock::newest([&b[..MD_PAGE_BYTES], &b[MD_PAGE_BYTES..]])
        .0
        .unwrap()
}

fn run(path: &Path) -> (i32, String) {
    let out = Command::new(BIN).arg(path).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_checker_tool_passes_a_good_store_and_fails_damaged_ones() {
    let d = dir();
    let good = d.join("good.img");
    let model = make_store(&good);
    let (code, text) = run(&good);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("lvol store lvs0") && text.contains("0 errors"),
        "{text}"
    );
    let json = Command::new(BIN).arg("--json").arg(&good).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["lvols"], 3);
    assert_eq!(v["errors"], 0);

    // A forged checkpoint in which the clone shares a cluster with the
    // snapshot.
    let bad = d.join("double.img");
    std::fs::copy(&good, &bad).unwrap();
    let mut m = model.clone();
    let snap = m.lvols.values().find(|l| l.name == "snap").unwrap().map[5];
    let c = m.lvols.values_mut().find(|l| l.name == "c").unwrap();
    c.map[7] = snap;
    let mut sb = newest_sb(&bad);
    let ck = disk::encode_checkpoint(&m, sb.ckpt_gen, 0);
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    let area = sb.layout.ckpt_start(sb.ckpt_area()) * MD_PAGE_BYTES as u64;
    f.write_all_at(&ck, area).unwrap();
    sb.ckpt_bytes = ck.len() as u64;
    sb.ckpt_crc = crc32c::crc32c(&ck);
    sb.log_start_seq = 1 << 40;
    f.write_all_at(&sb.encode(), sb.copy() as u64 * MD_PAGE_BYTES as u64)
        .unwrap();
    drop(f);
    let (code, text) = run(&bad);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("DoublyOwned") && text.contains(&format!("cluster {}", snap - 1)),
        "{text}"
    );

    // One flipped bit in the checkpoint the superblock names.
    let torn = d.join("crc.img");
    std::fs::copy(&good, &torn).unwrap();
    let sb = newest_sb(&torn);
    let at = sb.layout.ckpt_start(sb.ckpt_area()) * MD_PAGE_BYTES as u64 + 66;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&torn)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    drop(f);
    let (code, text) = run(&torn);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("CRC"), "{text}");

    // No store at all; no file at all.
    let zero = d.join("zero.img");
    std::fs::File::create(&zero)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (code, text) = run(&zero);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("no lvol store"), "{text}");
    let (code, _) = run(&d.join("missing.img"));
    assert_eq!(code, 2);
    let _ = std::fs::remove_dir_all(&d);
}
