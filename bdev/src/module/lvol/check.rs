//! The consistency checker: walks a store's metadata and reports what is
//! wrong, as a structured [`CheckReport`] (the RPC and the standalone tool
//! `ferroplane-lvol-check` print it).
//!
//! Errors: no valid superblock, a bad checkpoint, a log page that frames
//! badly, doubly-owned clusters, clusters beyond the store, an allocated
//! count that disagrees with the maps (the leak check: see the module
//! docs), broken parent links (missing parent, a parent that is not
//! read-only, cycles), duplicate names or UUIDs, blob ids at or above the
//! next id. On a live store, also clusters marked in use that nobody owns
//! or has reserved (leaked) and owned ones marked free.
//!
//! Notes (what a crash normally leaves, reported but not errors): a torn
//! superblock copy, an unreadable older checkpoint area, where and why the
//! log ends, an interrupted transaction dropped at its end.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};
use uuid::Uuid;

use super::device::{FileDevice, MdDevice};
use super::disk::{self, Model, Parent, MD_PAGE_BYTES};
use super::store::{self, LvolStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The metadata is inconsistent or damaged.
    Error,
    /// Expected after a crash; for information.
    Note,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    Load,
    SuperblockCopy,
    OtherCheckpoint,
    LogEnd,
    DoublyOwned,
    BeyondStore,
    Leaked,
    MarkedFree,
    Accounting,
    MissingParent,
    ParentNotReadOnly,
    ParentCycle,
    DuplicateName,
    DuplicateUuid,
    BlobId,
    MapLength,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub kind: FindingKind,
    pub lvol: Option<u64>,
    pub cluster: Option<u64>,
    pub message: String,
}

impl Finding {
    fn err(kind: FindingKind, message: String) -> Finding {
        Finding {
            severity: Severity::Error,
            kind,
            lvol: None,
            cluster: None,
            message,
        }
    }

    fn note(kind: FindingKind, message: String) -> Finding {
        Finding {
            severity: Severity::Note,
            ..Finding::err(kind, message)
        }
    }

    fn at(mut self, lvol: Option<u64>, cluster: Option<u64>) -> Finding {
        self.lvol = lvol;
        self.cluster = cluster;
        self
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub store_uuid: Option<Uuid>,
    pub name: Option<String>,
    pub lvols: usize,
    pub total_data_clusters: u64,
    pub allocated_clusters: u64,
    pub log_pages_replayed: u64,
    pub findings: Vec<Finding>,
}

impl CheckReport {
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }

    pub fn is_clean(&self) -> bool {
        self.errors().next().is_none()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "uuid": self.store_uuid.map(|u| u.to_string()),
            "name": self.name,
            "lvols": self.lvols,
            "total_data_clusters": self.total_data_clusters,
            "allocated_clusters": self.allocated_clusters,
            "log_pages_replayed": self.log_pages_replayed,
            "errors": self.errors().count(),
            "findings": self.findings.iter().map(|f| json!({
                "severity": match f.severity { Severity::Error => "error", Severity::Note => "note" },
                "kind": format!("{:?}", f.kind),
                "lvol": f.lvol,
                "cluster": f.cluster,
                "message": f.message,
            })).collect::<Vec<_>>(),
        })
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "lvol store {} ({}): {} lvols, {} of {} data clusters allocated, {} log pages replayed",
            self.name.as_deref().unwrap_or("?"),
            self.store_uuid
                .map(|u| u.to_string())
                .unwrap_or_else(|| "?".into()),
            self.lvols,
            self.allocated_clusters,
            self.total_data_clusters,
            self.log_pages_replayed
        )?;
        for x in &self.findings {
            let sev = match x.severity {
                Severity::Error => "error",
                Severity::Note => "note",
            };
            write!(f, "{sev}: {:?}", x.kind)?;
            if let Some(l) = x.lvol {
                write!(f, " lvol {l}")?;
            }
            if let Some(c) = x.cluster {
                write!(f, " cluster {c}")?;
            }
            writeln!(f, ": {}", x.message)?;
        }
        write!(f, "{} errors", self.errors().count())
    }
}

/// Checks a model (the state as loaded): ownership, parents, identities.
pub fn check_model(m: &Model) -> Vec<Finding> {
    let mut out = Vec::new();
    let (doubly, beyond) = store::ownership_errors(m);
    for (c, owners) in doubly {
        out.push(
            Finding::err(
                FindingKind::DoublyOwned,
                format!("owned by lvols {owners:?}"),
            )
            .at(None, Some(c)),
        );
    }
    for (l, c) in beyond {
        out.push(
            Finding::err(
                FindingKind::BeyondStore,
                format!("beyond the store's {} data clusters", m.total_data_clusters),
            )
            .at(Some(l), Some(c)),
        );
    }
    let mut names: HashMap<&str, u64> = HashMap::new();
    let mut uuids: HashMap<Uuid, u64> = HashMap::new();
    for l in m.lvols.values() {
        if let Some(o) = names.insert(&l.name, l.id) {
            out.push(
                Finding::err(
                    FindingKind::DuplicateName,
                    format!("name {} also on lvol {o}", l.name),
                )
                .at(Some(l.id), None),
            );
        }
        if let Some(o) = uuids.insert(l.uuid, l.id) {
            out.push(
                Finding::err(
                    FindingKind::DuplicateUuid,
                    format!("UUID {} also on lvol {o}", l.uuid),
                )
                .at(Some(l.id), None),
            );
        }
        if l.id >= m.next_blob_id {
            out.push(
                Finding::err(
                    FindingKind::BlobId,
                    format!("blob id not below the next id {}", m.next_blob_id),
                )
                .at(Some(l.id), None),
            );
        }
        if l.map.len() as u64 != l.num_clusters {
            out.push(
                Finding::err(
                    FindingKind::MapLength,
                    "map length differs from size".into(),
                )
                .at(Some(l.id), None),
            );
        }
        if let Parent::Lvol(p) = l.parent {
            match m.lvols.get(&p) {
                None => out.push(
                    Finding::err(
                        FindingKind::MissingParent,
                        format!("parent {p} does not exist"),
                    )
                    .at(Some(l.id), None),
                ),
                Some(pl) if !pl.read_only => out.push(
                    Finding::err(
                        FindingKind::ParentNotReadOnly,
                        format!("parent {} is not read-only", pl.name),
                    )
                    .at(Some(l.id), None),
                ),
                _ => {}
            }
        }
        // A cycle: following parents from here comes back here.
        let mut seen = HashSet::new();
        let mut at = l.parent.clone();
        while let Parent::Lvol(p) = at {
            if p == l.id {
                out.push(
                    Finding::err(
                        FindingKind::ParentCycle,
                        "its ancestry loops back to it".into(),
                    )
                    .at(Some(l.id), None),
                );
                break;
            }
            if !seen.insert(p) {
                break;
            }
            at = m
                .lvols
                .get(&p)
                .map(|x| x.parent.clone())
                .unwrap_or(Parent::None);
        }
    }
    out
}

/// Checks the metadata on a device (read only).
pub async fn check_device(dev: &dyn MdDevice) -> CheckReport {
    let mut r = CheckReport::default();
    let ld = match store::read_metadata(dev).await {
        Ok(ld) => ld,
        Err(e) => {
            r.findings
                .push(Finding::err(FindingKind::Load, e.to_string()));
            return r;
        }
    };
    r.store_uuid = Some(ld.sb.store_uuid);
    r.name = Some(ld.model.name.clone());
    r.lvols = ld.model.lvols.len();
    r.total_data_clusters = ld.model.total_data_clusters;
    r.allocated_clusters = ld.model.lvols.values().map(|l| l.allocated()).sum();
    r.log_pages_replayed = ld.log_pages_replayed;
    for (i, c) in ld.sb_copies.iter().enumerate() {
        if let Err(e) = c {
            r.findings.push(Finding::note(
                FindingKind::SuperblockCopy,
                format!(
                    "superblock copy {i}: {e} (the other copy, seq {}, is used)",
                    ld.sb.seq
                ),
            ));
        }
    }
    if ld.ckpt.allocated != ld.ckpt_counted_allocated {
        r.findings.push(Finding::err(
            FindingKind::Accounting,
            format!(
                "checkpoint generation {} records {} allocated clusters, its maps own {}",
                ld.ckpt.gen, ld.ckpt.allocated, ld.ckpt_counted_allocated
            ),
        ));
    }
    // The other checkpoint area: older, or being written at a crash.
    let l = ld.sb.layout;
    let other = 1 - ld.sb.ckpt_area();
    let bpp = l.blocks_per_page();
    if let Ok(head) = dev.read(l.ckpt_start(other) * bpp, bpp).await {
        if let Some(len) = disk::checkpoint_len(&head) {
            let pages = len.div_ceil(MD_PAGE_BYTES as u64);
            let bad = if len < disk::CKPT_HEADER_BYTES as u64 || pages > l.ckpt_pages {
                Some("length out of range".to_string())
            } else {
                match dev.read(l.ckpt_start(other) * bpp, pages * bpp).await {
                    Ok(b) => disk::decode_checkpoint(&b[..len as usize])
                        .err()
                        .map(|e| e.to_string()),
                    Err(e) => Some(e.to_string()),
                }
            };
            if let Some(e) = bad {
                r.findings.push(Finding::note(
                    FindingKind::OtherCheckpoint,
                    format!("checkpoint area {other} (not in use): {e}"),
                ));
            }
        }
    }
    if let Some(end) = &ld.log_end {
        r.findings.push(Finding::note(
            FindingKind::LogEnd,
            format!(
                "log ends at seq {} after {} pages ({} transactions): {end:?}",
                ld.log_next_seq, ld.log_pages_replayed, ld.txns_replayed
            ),
        ));
    }
    if ld.log_leftover_bytes > 0 {
        r.findings.push(Finding::note(
            FindingKind::LogEnd,
            format!(
                "{} bytes of an interrupted commit at the log's end were dropped",
                ld.log_leftover_bytes
            ),
        ));
    }
    r.findings.extend(check_model(&ld.model));
    r
}

/// Checks a file or block device holding a store, with std I/O.
pub fn check_file(path: &std::path::Path) -> std::io::Result<CheckReport> {
    // The superblock names the block size; 512-byte reads find it.
    let probe = FileDevice::open(path, disk::SECTOR_BYTES as u32)?;
    let mut bs = disk::SECTOR_BYTES as u32;
    if probe.num_blocks() >= (2 * MD_PAGE_BYTES / disk::SECTOR_BYTES) as u64 {
        if let Ok(raw) = futures_lite::future::block_on(probe.read(0, 16)) {
            let (a, b) = raw.split_at(MD_PAGE_BYTES);
            if let (Some(sb), _) = disk::Superblock::newest([a, b]) {
                bs = sb.layout.block_size;
            }
        }
    }
    let dev = FileDevice::open(path, bs)?;
    Ok(futures_lite::future::block_on(check_device(&dev)))
}

impl LvolStore {
    /// Checks the live store: the model, and the free bitmap against it
    /// (leaked: marked in use, owned and reserved by nobody; marked free
    /// while owned).
    pub fn check(&self) -> CheckReport {
        let m = self.model();
        let mut r = CheckReport {
            store_uuid: Some(m.store_uuid),
            name: Some(m.name.clone()),
            lvols: m.lvols.len(),
            total_data_clusters: m.total_data_clusters,
            allocated_clusters: m.lvols.values().map(|l| l.allocated()).sum(),
            ..Default::default()
        };
        r.findings = check_model(&m);
        for (p, leaked) in self.bitmap_mismatches() {
            r.findings.push(if leaked {
                Finding::err(
                    FindingKind::Leaked,
                    "in use, owned by no lvol and not reserved".into(),
                )
                .at(None, Some(p))
            } else {
                Finding::err(FindingKind::MarkedFree, "owned but marked free".into())
                    .at(None, Some(p))
            });
        }
        r
    }
}
