//! On-disk structures of an lvol store: the layout of the metadata region,
//! the superblock, the checkpoint (the whole metadata state, compact) and
//! the typed records that log pages carry. Pure encode/decode: no I/O, so
//! the store, the checker and the standalone tool share every byte of it.
//!
//! All integers are little-endian. Every structure starts with a magic and
//! a version and is covered by a CRC-32C; decoding never panics on any
//! input (bounds-checked readers), it returns a [`DecodeError`].

use std::collections::BTreeMap;

use static_assertions::const_assert;
use uuid::Uuid;

/// Metadata I/O unit: superblock copies, checkpoint pages and log pages are
/// 4 KiB, SPDK's blobstore metadata page size.
pub const MD_PAGE_BYTES: usize = 4096;
/// The torn-write granularity assumed for the crash reasoning (a sector).
pub const SECTOR_BYTES: usize = 512;
const_assert!(MD_PAGE_BYTES.is_multiple_of(SECTOR_BYTES));

pub const SB_MAGIC: &[u8; 8] = b"FPLVSTOR";
pub const CKPT_MAGIC: &[u8; 8] = b"FPLVCKPT";
pub const LOG_MAGIC: &[u8; 8] = b"FPLVLOG1";
/// Format version. A store with a newer major version is refused; minor
/// versions are backwards compatible additions.
pub const VERSION_MAJOR: u16 = 1;
pub const VERSION_MINOR: u16 = 0;

/// Names of stores and lvols: Longhorn's fork raised SPDK's limit to 256
/// bytes including the NUL (`<vol>-r-<8hex>-snap-<snapname>`).
pub const NAME_MAX_BYTES: usize = 255;
/// Xattr names: as names.
pub const XATTR_NAME_MAX_BYTES: usize = 255;
/// Xattr values: SPDK keeps one xattr descriptor within one 4 KiB metadata
/// page, so no client can rely on more.
pub const XATTR_VALUE_MAX_BYTES: usize = 3840;
/// Xattrs per lvol (each kind): bounds an lvol record, hence a log
/// transaction creating it.
pub const XATTRS_MAX: usize = 64;
/// Bytes a cluster-map run takes in a checkpoint: logical start (8),
/// physical start (8), length (4). The metadata region reserves this for
/// every data cluster, so an allocation never fails for metadata space.
pub const RUN_BYTES: usize = 20;
/// SPDK's default lvstore cluster size (`SPDK_LVS_OPTS_CLUSTER_SZ`).
pub const DEFAULT_CLUSTER_SIZE: u32 = 4 << 20;
/// SPDK's default `num_md_pages_per_cluster_ratio`: one 4 KiB metadata
/// page per cluster.
pub const DEFAULT_MD_PAGES_PER_CLUSTER_RATIO: u32 = 100;
/// Log pages: at least this many, so a checkpoint is not needed every few
/// commits on a small store.
pub const MIN_LOG_PAGES: u64 = 64;
/// Log pages: at most 16 MiB, so a load never replays more than that.
pub const MAX_LOG_PAGES: u64 = 4096;
/// Smallest checkpoint area: room for a few lvols on a tiny store.
pub const MIN_CKPT_PAGES: u64 = 8;
/// Checkpoint bytes kept for lvol records on top of the cluster runs: a
/// store whose metadata region cannot hold this is refused at format.
pub const MIN_RECORD_SPACE_BYTES: u64 = 16 << 10;

/// Why bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    NoMagic,
    /// A newer major format version than this build understands.
    Version(u16),
    Crc,
    /// Too short or a length field out of range.
    Truncated,
    Field(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NoMagic => write!(f, "no magic"),
            DecodeError::Version(v) => write!(
                f,
                "format version {v} is newer than this build supports ({VERSION_MAJOR})"
            ),
            DecodeError::Crc => write!(f, "CRC mismatch"),
            DecodeError::Truncated => write!(f, "truncated"),
            DecodeError::Field(s) => write!(f, "bad field: {s}"),
        }
    }
}

pub type DResult<T> = Result<T, DecodeError>;

// ---------------------------------------------------------------------------
// Byte helpers.

/// Appends little-endian fields.
#[derive(Default)]
pub struct Wr(pub Vec<u8>);

impl Wr {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn uuid(&mut self, u: &Uuid) {
        self.0.extend_from_slice(u.as_bytes());
    }
    /// A string of at most `u16::MAX` bytes (callers bound it far lower).
    pub fn str16(&mut self, s: &str) {
        debug_assert!(s.len() <= u16::MAX as usize);
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
    }
    pub fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

/// Reads little-endian fields, bounds-checked.
pub struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Rd<'a> {
    pub fn new(b: &'a [u8]) -> Rd<'a> {
        Rd { b, at: 0 }
    }
    pub fn left(&self) -> usize {
        self.b.len() - self.at
    }
    pub fn take(&mut self, n: usize) -> DResult<&'a [u8]> {
        if self.left() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> DResult<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> DResult<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    pub fn u32(&mut self) -> DResult<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    pub fn u64(&mut self) -> DResult<u64> {
        let mut x = [0u8; 8];
        x.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(x))
    }
    pub fn uuid(&mut self) -> DResult<Uuid> {
        let mut x = [0u8; 16];
        x.copy_from_slice(self.take(16)?);
        Ok(Uuid::from_bytes(x))
    }
    pub fn str16(&mut self, max: usize) -> DResult<String> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(DecodeError::Field("string length"));
        }
        std::str::from_utf8(self.take(n)?)
            .map(str::to_string)
            .map_err(|_| DecodeError::Field("utf-8"))
    }
    pub fn bytes32(&mut self, max: usize) -> DResult<Vec<u8>> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::Field("value length"));
        }
        Ok(self.take(n)?.to_vec())
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// CRC-32C of `b` with the 4 bytes at `crc_at` taken as zero.
pub fn crc_with_hole(b: &[u8], crc_at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..crc_at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[crc_at + 4..])
}

// ---------------------------------------------------------------------------
// Layout.

/// Where everything is, in 4 KiB metadata pages from the start of the
/// device, and where data clusters start (fixed at format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u32,
    pub cluster_size: u32,
    /// Pages of one checkpoint area; area `i` starts at `ckpt_start(i)`.
    pub ckpt_pages: u64,
    /// Pages of the log ring, starting at `log_start()`.
    pub log_pages: u64,
    /// Device cluster where data cluster 0 lives (the metadata region,
    /// rounded up to whole clusters, comes first).
    pub data_start_cluster: u64,
}

impl Layout {
    /// Superblock copy `i` (0 or 1) is page `i`.
    pub fn sb_page(i: usize) -> u64 {
        i as u64
    }
    pub fn ckpt_start(&self, area: usize) -> u64 {
        2 + area as u64 * self.ckpt_pages
    }
    pub fn log_start(&self) -> u64 {
        2 + 2 * self.ckpt_pages
    }
    pub fn md_pages(&self) -> u64 {
        self.log_start() + self.log_pages
    }
    pub fn blocks_per_page(&self) -> u64 {
        MD_PAGE_BYTES as u64 / self.block_size as u64
    }
    pub fn blocks_per_cluster(&self) -> u64 {
        self.cluster_size as u64 / self.block_size as u64
    }
    /// First device block of data cluster `p`.
    pub fn cluster_offset_blocks(&self, p: u64) -> u64 {
        (self.data_start_cluster + p) * self.blocks_per_cluster()
    }
    /// Data clusters a device of `num_blocks` holds with this layout.
    pub fn data_clusters_for(&self, num_blocks: u64) -> u64 {
        (num_blocks / self.blocks_per_cluster()).saturating_sub(self.data_start_cluster)
    }
    /// Largest checkpoint in bytes.
    pub fn ckpt_capacity_bytes(&self) -> u64 {
        self.ckpt_pages * MD_PAGE_BYTES as u64
    }
    /// Whether a store of `data_clusters` leaves the minimum room for lvol
    /// records next to the worst-case cluster runs.
    pub fn fits(&self, data_clusters: u64) -> bool {
        CKPT_FIXED_BYTES as u64 + data_clusters * RUN_BYTES as u64 + MIN_RECORD_SPACE_BYTES
            <= self.ckpt_capacity_bytes()
    }

    /// The layout `format` uses. SPDK sizes the blobstore metadata as
    /// `num_md_pages = ratio * total_clusters / 100` pages of 4 KiB (one
    /// per cluster by default) plus a few pages of masks; the same page
    /// budget is given here to two checkpoint areas and a log ring (1/16
    /// of it, clamped to [`MIN_LOG_PAGES`, `MAX_LOG_PAGES`]), raised to a
    /// small minimum. EINVAL-style errors as text.
    pub fn compute(
        block_size: u32,
        num_blocks: u64,
        cluster_size: u32,
        md_pages_per_cluster_ratio: u32,
    ) -> Result<Layout, String> {
        if block_size == 0
            || !block_size.is_power_of_two()
            || block_size as usize > MD_PAGE_BYTES
            || (block_size as usize) < SECTOR_BYTES
        {
            return Err(format!(
                "block size {block_size} is not a power of two between 512 and 4096"
            ));
        }
        if cluster_size == 0 || !cluster_size.is_multiple_of(MD_PAGE_BYTES as u32) {
            return Err(format!(
                "cluster size {cluster_size} is not a non-zero multiple of {MD_PAGE_BYTES}"
            ));
        }
        if md_pages_per_cluster_ratio == 0 {
            return Err("num_md_pages_per_cluster_ratio must be more than 0".into());
        }
        let bpc = (cluster_size / block_size) as u64;
        let total_clusters = num_blocks / bpc;
        let wanted = (md_pages_per_cluster_ratio as u64 * total_clusters) / 100;
        let log_pages = (wanted / 16).clamp(MIN_LOG_PAGES, MAX_LOG_PAGES);
        let ckpt_pages = (wanted.saturating_sub(2 + log_pages) / 2).max(MIN_CKPT_PAGES);
        let mut l = Layout {
            block_size,
            cluster_size,
            ckpt_pages,
            log_pages,
            data_start_cluster: 0,
        };
        let md_bytes = l.md_pages() * MD_PAGE_BYTES as u64;
        l.data_start_cluster = md_bytes.div_ceil(cluster_size as u64);
        if l.data_start_cluster >= total_clusters {
            return Err(format!(
                "the device ({total_clusters} clusters of {cluster_size} bytes) is too small \
                 for the metadata ({md_bytes} bytes)"
            ));
        }
        if !l.fits(total_clusters - l.data_start_cluster) {
            return Err(format!(
                "num_md_pages_per_cluster_ratio {md_pages_per_cluster_ratio} leaves too little \
                 metadata space for {} clusters",
                total_clusters - l.data_start_cluster
            ));
        }
        Ok(l)
    }
}

// ---------------------------------------------------------------------------
// Superblock.

/// One superblock copy. Copy `seq % 2` is written on each change (format,
/// load, checkpoint); the valid copy with the higher sequence wins.
///
/// ```text
/// offset size field
///      0    8 magic "FPLVSTOR"
///      8    2 version major       10  2 version minor
///     12    4 CRC-32C of the 4 KiB page with this field zeroed
///     16    8 sequence number
///     24   16 store UUID
///     40    4 block size          44  4 cluster size (bytes)
///     48    8 checkpoint area pages
///     56    8 log pages
///     64    8 data start (device cluster of data cluster 0)
///     72    8 device blocks at format
///     80    8 epoch: bumped at every load that may write
///     88    8 checkpoint generation (area = generation % 2)
///     96    8 checkpoint bytes   104  4 checkpoint CRC-32C  108 4 reserved
///    112    8 log: first sequence number to replay
///    120    8 log: ring position (page index) of that sequence number
///    128    8 log: smallest epoch a replayed page may carry
///    136      reserved (zero) to 4096
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub seq: u64,
    pub store_uuid: Uuid,
    pub layout: Layout,
    pub format_blocks: u64,
    pub epoch: u64,
    pub ckpt_gen: u64,
    pub ckpt_bytes: u64,
    pub ckpt_crc: u32,
    pub log_start_seq: u64,
    pub log_start_pos: u64,
    pub log_min_epoch: u64,
}

const SB_CRC_AT: usize = 12;

impl Superblock {
    pub fn copy(&self) -> usize {
        (self.seq % 2) as usize
    }

    pub fn ckpt_area(&self) -> usize {
        (self.ckpt_gen % 2) as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr(Vec::with_capacity(MD_PAGE_BYTES));
        w.0.extend_from_slice(SB_MAGIC);
        w.u16(VERSION_MAJOR);
        w.u16(VERSION_MINOR);
        w.u32(0);
        w.u64(self.seq);
        w.uuid(&self.store_uuid);
        w.u32(self.layout.block_size);
        w.u32(self.layout.cluster_size);
        w.u64(self.layout.ckpt_pages);
        w.u64(self.layout.log_pages);
        w.u64(self.layout.data_start_cluster);
        w.u64(self.format_blocks);
        w.u64(self.epoch);
        w.u64(self.ckpt_gen);
        w.u64(self.ckpt_bytes);
        w.u32(self.ckpt_crc);
        w.u32(0);
        w.u64(self.log_start_seq);
        w.u64(self.log_start_pos);
        w.u64(self.log_min_epoch);
        debug_assert_eq!(w.0.len(), 136);
        let mut b = w.0;
        b.resize(MD_PAGE_BYTES, 0);
        let crc = crc_with_hole(&b, SB_CRC_AT);
        b[SB_CRC_AT..SB_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> DResult<Superblock> {
        if b.len() < MD_PAGE_BYTES || &b[0..8] != SB_MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let b = &b[..MD_PAGE_BYTES];
        if crc_with_hole(b, SB_CRC_AT) != le32(b, SB_CRC_AT) {
            return Err(DecodeError::Crc);
        }
        let mut r = Rd::new(&b[8..]);
        let major = r.u16()?;
        if major != VERSION_MAJOR {
            return Err(DecodeError::Version(major));
        }
        let _minor = r.u16()?;
        let _crc = r.u32()?;
        let seq = r.u64()?;
        let store_uuid = r.uuid()?;
        let layout = Layout {
            block_size: r.u32()?,
            cluster_size: r.u32()?,
            ckpt_pages: r.u64()?,
            log_pages: r.u64()?,
            data_start_cluster: r.u64()?,
        };
        let sb = Superblock {
            seq,
            store_uuid,
            layout,
            format_blocks: r.u64()?,
            epoch: r.u64()?,
            ckpt_gen: r.u64()?,
            ckpt_bytes: r.u64()?,
            ckpt_crc: r.u32()?,
            log_start_seq: {
                r.u32()?;
                r.u64()?
            },
            log_start_pos: r.u64()?,
            log_min_epoch: r.u64()?,
        };
        let l = &sb.layout;
        let sane = l.block_size.is_power_of_two()
            && (SECTOR_BYTES..=MD_PAGE_BYTES).contains(&(l.block_size as usize))
            && l.cluster_size != 0
            && l.cluster_size.is_multiple_of(MD_PAGE_BYTES as u32)
            && l.ckpt_pages >= MIN_CKPT_PAGES
            && l.ckpt_pages < (1 << 32)
            && (MIN_LOG_PAGES..=MAX_LOG_PAGES).contains(&l.log_pages)
            && l.data_start_cluster * l.cluster_size as u64 >= l.md_pages() * MD_PAGE_BYTES as u64
            && sb.ckpt_bytes >= CKPT_HEADER_BYTES as u64
            && sb.ckpt_bytes <= l.ckpt_capacity_bytes()
            && sb.log_start_pos < l.log_pages
            && sb.log_min_epoch <= sb.epoch;
        if !sane {
            return Err(DecodeError::Field("superblock geometry"));
        }
        Ok(sb)
    }

    /// The newest valid copy of two, and why each other one was not valid.
    pub fn newest(copies: [&[u8]; 2]) -> (Option<Superblock>, [DResult<Superblock>; 2]) {
        let d = [Superblock::decode(copies[0]), Superblock::decode(copies[1])];
        let best = d
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .max_by_key(|sb| sb.seq)
            .cloned();
        (best, d)
    }
}

// ---------------------------------------------------------------------------
// The metadata state (what a checkpoint holds and records change).

/// How an lvol's clusters are cleared on delete (SPDK's
/// `lvol_clear_method`); stored for the layer above, which does the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearMethod {
    Default = 0,
    None = 1,
    Unmap = 2,
    WriteZeroes = 3,
}

impl ClearMethod {
    pub fn from_u8(v: u8) -> DResult<ClearMethod> {
        Ok(match v {
            0 => ClearMethod::Default,
            1 => ClearMethod::None,
            2 => ClearMethod::Unmap,
            3 => ClearMethod::WriteZeroes,
            _ => return Err(DecodeError::Field("clear method")),
        })
    }

    /// SPDK's RPC spellings.
    pub fn parse(s: &str) -> Option<ClearMethod> {
        Some(match s {
            "none" => ClearMethod::None,
            "unmap" => ClearMethod::Unmap,
            "write_zeroes" => ClearMethod::WriteZeroes,
            _ => return None,
        })
    }
}

/// What an lvol reads through to where it has no cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    None,
    /// Another lvol of the store (a snapshot), by blob id.
    Lvol(u64),
    /// An external snapshot ("esnap" clone): a bdev outside the store,
    /// identified by its UUID and the name it had.
    External {
        bdev_uuid: Uuid,
        bdev_name: String,
    },
}

/// One lvol as stored: identity, geometry, flags, parent, xattrs and the
/// cluster map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvolRecord {
    /// The blob id: unique within the store and never reused.
    pub id: u64,
    pub uuid: Uuid,
    pub name: String,
    pub num_clusters: u64,
    pub thin: bool,
    pub read_only: bool,
    pub clear_method: ClearMethod,
    pub parent: Parent,
    /// RFC 3339 UTC, `YYYY-MM-DDTHH:MM:SSZ` (SPDK's internal xattr).
    pub creation_time: String,
    /// Public xattrs (`bdev_lvol_set_xattr`, snapshot xattrs).
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Internal xattrs, for the layers above (never shown to clients).
    pub internal_xattrs: BTreeMap<String, Vec<u8>>,
    /// Logical cluster `i` → data cluster `map[i] - 1`; 0: not allocated
    /// here. Always `num_clusters` long.
    pub map: Vec<u64>,
}

/// A run of the cluster map: `len` logical clusters from `logical` map to
/// consecutive data clusters from `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub logical: u64,
    pub physical: u64,
    pub len: u32,
}

/// The runs of a map (phys+1 encoding, 0 = hole).
pub fn runs_of(map: &[u64]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (i, &m) in map.iter().enumerate() {
        if m == 0 {
            continue;
        }
        let p = m - 1;
        if let Some(r) = out.last_mut() {
            if r.logical + r.len as u64 == i as u64
                && r.physical + r.len as u64 == p
                && r.len < u32::MAX
            {
                r.len += 1;
                continue;
            }
        }
        out.push(Run {
            logical: i as u64,
            physical: p,
            len: 1,
        });
    }
    out
}

fn put_parent(w: &mut Wr, p: &Parent) {
    match p {
        Parent::None => w.u8(0),
        Parent::Lvol(id) => {
            w.u8(1);
            w.u64(*id);
        }
        Parent::External {
            bdev_uuid,
            bdev_name,
        } => {
            w.u8(2);
            w.uuid(bdev_uuid);
            w.str16(bdev_name);
        }
    }
}

fn get_parent(r: &mut Rd) -> DResult<Parent> {
    Ok(match r.u8()? {
        0 => Parent::None,
        1 => Parent::Lvol(r.u64()?),
        2 => Parent::External {
            bdev_uuid: r.uuid()?,
            bdev_name: r.str16(NAME_MAX_BYTES)?,
        },
        _ => return Err(DecodeError::Field("parent kind")),
    })
}

fn put_xattrs(w: &mut Wr, x: &BTreeMap<String, Vec<u8>>) {
    w.u16(x.len() as u16);
    for (k, v) in x {
        w.str16(k);
        w.bytes32(v);
    }
}

fn get_xattrs(r: &mut Rd) -> DResult<BTreeMap<String, Vec<u8>>> {
    let n = r.u16()? as usize;
    if n > XATTRS_MAX {
        return Err(DecodeError::Field("xattr count"));
    }
    let mut x = BTreeMap::new();
    for _ in 0..n {
        let k = r.str16(XATTR_NAME_MAX_BYTES)?;
        let v = r.bytes32(XATTR_VALUE_MAX_BYTES)?;
        x.insert(k, v);
    }
    Ok(x)
}

/// Largest lvol size in clusters a record may claim (keeps a corrupt
/// record from making the loader allocate without bound: 2^40 clusters is
/// 4 EiB of 4 KiB clusters).
pub const MAX_LVOL_CLUSTERS: u64 = 1 << 40;

impl LvolRecord {
    /// Bytes of this record without its runs (what metadata space
    /// accounting charges an lvol; runs are reserved per data cluster).
    pub fn fixed_bytes(&self) -> usize {
        let x = |m: &BTreeMap<String, Vec<u8>>| {
            2 + m
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
        };
        let parent = match &self.parent {
            Parent::None => 1,
            Parent::Lvol(_) => 9,
            Parent::External { bdev_name, .. } => 1 + 16 + 2 + bdev_name.len(),
        };
        8 + 16
            + 2
            + self.name.len()
            + 8
            + 1
            + 1
            + parent
            + 2
            + self.creation_time.len()
            + x(&self.xattrs)
            + x(&self.internal_xattrs)
            + 4
    }

    pub fn encode(&self, w: &mut Wr) {
        w.u64(self.id);
        w.uuid(&self.uuid);
        w.str16(&self.name);
        w.u64(self.num_clusters);
        w.u8(self.thin as u8 | (self.read_only as u8) << 1);
        w.u8(self.clear_method as u8);
        put_parent(w, &self.parent);
        w.str16(&self.creation_time);
        put_xattrs(w, &self.xattrs);
        put_xattrs(w, &self.internal_xattrs);
        let runs = runs_of(&self.map);
        w.u32(runs.len() as u32);
        for r in runs {
            w.u64(r.logical);
            w.u64(r.physical);
            w.u32(r.len);
        }
    }

    /// Decodes a record; `data_clusters` bounds physical clusters only
    /// loosely (the checker reports those beyond the store).
    pub fn decode(r: &mut Rd) -> DResult<LvolRecord> {
        let id = r.u64()?;
        let uuid = r.uuid()?;
        let name = r.str16(NAME_MAX_BYTES)?;
        let num_clusters = r.u64()?;
        if num_clusters > MAX_LVOL_CLUSTERS {
            return Err(DecodeError::Field("num_clusters"));
        }
        let flags = r.u8()?;
        if flags & !3 != 0 {
            return Err(DecodeError::Field("lvol flags"));
        }
        let clear_method = ClearMethod::from_u8(r.u8()?)?;
        let parent = get_parent(r)?;
        let creation_time = r.str16(64)?;
        let xattrs = get_xattrs(r)?;
        let internal_xattrs = get_xattrs(r)?;
        let nruns = r.u32()? as usize;
        if nruns.saturating_mul(RUN_BYTES) > r.left() {
            return Err(DecodeError::Truncated);
        }
        let mut map = vec![0u64; num_clusters as usize];
        for _ in 0..nruns {
            let logical = r.u64()?;
            let physical = r.u64()?;
            let len = r.u32()? as u64;
            if len == 0
                || logical.checked_add(len).is_none_or(|e| e > num_clusters)
                || physical.checked_add(len).is_none()
            {
                return Err(DecodeError::Field("run"));
            }
            for k in 0..len {
                map[(logical + k) as usize] = physical + k + 1;
            }
        }
        Ok(LvolRecord {
            id,
            uuid,
            name,
            num_clusters,
            thin: flags & 1 != 0,
            read_only: flags & 2 != 0,
            clear_method,
            parent,
            creation_time,
            xattrs,
            internal_xattrs,
            map,
        })
    }

    pub fn allocated(&self) -> u64 {
        self.map.iter().filter(|&&m| m != 0).count() as u64
    }
}

/// The whole metadata state of a store: what a checkpoint holds and what
/// load rebuilds. Plain data, comparable, so tests compare states exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub store_uuid: Uuid,
    pub name: String,
    pub total_data_clusters: u64,
    /// The next blob id to hand out: ids are never reused, even after the
    /// newest lvol is deleted.
    pub next_blob_id: u64,
    pub lvols: BTreeMap<u64, LvolRecord>,
}

/// Checkpoint header bytes (see [`encode_checkpoint`]).
pub const CKPT_HEADER_BYTES: usize = 64;
/// Checkpoint bytes besides the lvol records: header and store record.
pub const CKPT_FIXED_BYTES: usize = CKPT_HEADER_BYTES + 2 + NAME_MAX_BYTES + 8 + 8 + 8 + 4;
const CKPT_CRC_AT: usize = 12;

/// A checkpoint of `m` as of log sequence `seq_through` (everything
/// before it is included).
///
/// ```text
/// header (64 bytes)
///      0  8 magic "FPLVCKPT"     8 2 version major  10 2 minor
///     12  4 CRC-32C of the whole checkpoint with this field zeroed
///     16 16 store UUID          32 8 generation     40 8 bytes in all
///     48  8 log sequence the state is as of (first not included)
///     56  8 allocated data clusters (cross-check for the checker)
/// store: name (u16 len + bytes), total data clusters u64, next blob id
///        u64, reserved u64, lvol count u32
/// lvols: LvolRecord encoding each (runs at the end of each)
/// ```
pub fn encode_checkpoint(m: &Model, gen: u64, seq_through: u64) -> Vec<u8> {
    let mut w = Wr(Vec::with_capacity(4096));
    w.0.extend_from_slice(CKPT_MAGIC);
    w.u16(VERSION_MAJOR);
    w.u16(VERSION_MINOR);
    w.u32(0);
    w.uuid(&m.store_uuid);
    w.u64(gen);
    w.u64(0);
    w.u64(seq_through);
    w.u64(m.lvols.values().map(LvolRecord::allocated).sum());
    debug_assert_eq!(w.0.len(), CKPT_HEADER_BYTES);
    w.str16(&m.name);
    w.u64(m.total_data_clusters);
    w.u64(m.next_blob_id);
    w.u64(0);
    w.u32(m.lvols.len() as u32);
    for l in m.lvols.values() {
        l.encode(&mut w);
    }
    let mut b = w.0;
    let len = b.len() as u64;
    b[40..48].copy_from_slice(&len.to_le_bytes());
    let crc = crc_with_hole(&b, CKPT_CRC_AT);
    b[CKPT_CRC_AT..CKPT_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What a checkpoint header says besides the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub gen: u64,
    pub seq_through: u64,
    pub allocated: u64,
}

pub fn decode_checkpoint(b: &[u8]) -> DResult<(Model, CheckpointInfo)> {
    if b.len() < CKPT_HEADER_BYTES || &b[0..8] != CKPT_MAGIC {
        return Err(DecodeError::NoMagic);
    }
    let mut r = Rd::new(&b[8..]);
    let major = r.u16()?;
    if major != VERSION_MAJOR {
        return Err(DecodeError::Version(major));
    }
    r.u16()?;
    r.u32()?;
    let store_uuid = r.uuid()?;
    let gen = r.u64()?;
    let len = r.u64()?;
    if len as usize != b.len() {
        return Err(DecodeError::Truncated);
    }
    if crc_with_hole(b, CKPT_CRC_AT) != le32(b, CKPT_CRC_AT) {
        return Err(DecodeError::Crc);
    }
    let seq_through = r.u64()?;
    let allocated = r.u64()?;
    let name = r.str16(NAME_MAX_BYTES)?;
    let total_data_clusters = r.u64()?;
    let next_blob_id = r.u64()?;
    r.u64()?;
    let n = r.u32()? as usize;
    let mut lvols = BTreeMap::new();
    for _ in 0..n {
        let l = LvolRecord::decode(&mut r)?;
        if lvols.insert(l.id, l).is_some() {
            return Err(DecodeError::Field("duplicate blob id"));
        }
    }
    if r.left() != 0 {
        return Err(DecodeError::Field("trailing bytes"));
    }
    Ok((
        Model {
            store_uuid,
            name,
            total_data_clusters,
            next_blob_id,
            lvols,
        },
        CheckpointInfo {
            gen,
            seq_through,
            allocated,
        },
    ))
}

/// Reads the 8-byte header length of a checkpoint prefix (for the checker
/// reading an area without a superblock).
pub fn checkpoint_len(prefix: &[u8]) -> Option<u64> {
    (prefix.len() >= CKPT_HEADER_BYTES && &prefix[0..8] == CKPT_MAGIC).then(|| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&prefix[40..48]);
        u64::from_le_bytes(x)
    })
}

// ---------------------------------------------------------------------------
// Records: the typed changes a log transaction carries.

/// One change to the [`Model`]. A transaction is a list of records applied
/// all or none; the same [`Model::apply`] runs live and at replay, so a
/// replayed store equals the live one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    CreateLvol(Box<LvolRecord>),
    DeleteLvol(u64),
    RenameLvol(u64, String),
    RenameStore(String),
    SetXattr {
        id: u64,
        internal: bool,
        name: String,
        value: Vec<u8>,
    },
    RemoveXattr {
        id: u64,
        internal: bool,
        name: String,
    },
    SetFlags {
        id: u64,
        thin: bool,
        read_only: bool,
    },
    SetParent(u64, Parent),
    /// New size; a shrink drops the map beyond it.
    Resize(u64, u64),
    /// Map runs of logical clusters (allocation, thick grow).
    Map(u64, Vec<Run>),
    /// Drop the map of `count` logical clusters from `start` (release).
    Unmap(u64, u64, u64),
    /// Snapshot: `to` takes `from`'s whole map, `from`'s map empties.
    MoveMap {
        from: u64,
        to: u64,
    },
    /// Deleting a snapshot with one child: the child takes the snapshot's
    /// clusters where it has none (within its size); they leave the
    /// snapshot's map.
    Merge {
        snapshot: u64,
        child: u64,
    },
    GrowStore(u64),
}

/// Records above this many runs are split by the encoder's caller; a
/// bound on one record's size.
pub const MAX_RUNS_PER_RECORD: usize = 4096;

impl Record {
    pub fn encode(&self, w: &mut Wr) {
        match self {
            Record::CreateLvol(l) => {
                w.u8(1);
                l.encode(w);
            }
            Record::DeleteLvol(id) => {
                w.u8(2);
                w.u64(*id);
            }
            Record::RenameLvol(id, n) => {
                w.u8(3);
                w.u64(*id);
                w.str16(n);
            }
            Record::RenameStore(n) => {
                w.u8(4);
                w.str16(n);
            }
            Record::SetXattr {
                id,
                internal,
                name,
                value,
            } => {
                w.u8(5);
                w.u64(*id);
                w.u8(*internal as u8);
                w.str16(name);
                w.bytes32(value);
            }
            Record::RemoveXattr { id, internal, name } => {
                w.u8(6);
                w.u64(*id);
                w.u8(*internal as u8);
                w.str16(name);
            }
            Record::SetFlags {
                id,
                thin,
                read_only,
            } => {
                w.u8(7);
                w.u64(*id);
                w.u8(*thin as u8 | (*read_only as u8) << 1);
            }
            Record::SetParent(id, p) => {
                w.u8(8);
                w.u64(*id);
                put_parent(w, p);
            }
            Record::Resize(id, n) => {
                w.u8(9);
                w.u64(*id);
                w.u64(*n);
            }
            Record::Map(id, runs) => {
                w.u8(10);
                w.u64(*id);
                w.u32(runs.len() as u32);
                for r in runs {
                    w.u64(r.logical);
                    w.u64(r.physical);
                    w.u32(r.len);
                }
            }
            Record::Unmap(id, s, c) => {
                w.u8(11);
                w.u64(*id);
                w.u64(*s);
                w.u64(*c);
            }
            Record::MoveMap { from, to } => {
                w.u8(12);
                w.u64(*from);
                w.u64(*to);
            }
            Record::Merge { snapshot, child } => {
                w.u8(13);
                w.u64(*snapshot);
                w.u64(*child);
            }
            Record::GrowStore(n) => {
                w.u8(14);
                w.u64(*n);
            }
        }
    }

    pub fn decode(r: &mut Rd) -> DResult<Record> {
        Ok(match r.u8()? {
            1 => Record::CreateLvol(Box::new(LvolRecord::decode(r)?)),
            2 => Record::DeleteLvol(r.u64()?),
            3 => Record::RenameLvol(r.u64()?, r.str16(NAME_MAX_BYTES)?),
            4 => Record::RenameStore(r.str16(NAME_MAX_BYTES)?),
            5 => Record::SetXattr {
                id: r.u64()?,
                internal: r.u8()? != 0,
                name: r.str16(XATTR_NAME_MAX_BYTES)?,
                value: r.bytes32(XATTR_VALUE_MAX_BYTES)?,
            },
            6 => Record::RemoveXattr {
                id: r.u64()?,
                internal: r.u8()? != 0,
                name: r.str16(XATTR_NAME_MAX_BYTES)?,
            },
            7 => {
                let id = r.u64()?;
                let f = r.u8()?;
                Record::SetFlags {
                    id,
                    thin: f & 1 != 0,
                    read_only: f & 2 != 0,
                }
            }
            8 => Record::SetParent(r.u64()?, get_parent(r)?),
            9 => Record::Resize(r.u64()?, r.u64()?),
            10 => {
                let id = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_RUNS_PER_RECORD || n * RUN_BYTES > r.left() {
                    return Err(DecodeError::Field("run count"));
                }
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    runs.push(Run {
                        logical: r.u64()?,
                        physical: r.u64()?,
                        len: r.u32()?,
                    });
                }
                Record::Map(id, runs)
            }
            11 => Record::Unmap(r.u64()?, r.u64()?, r.u64()?),
            12 => Record::MoveMap {
                from: r.u64()?,
                to: r.u64()?,
            },
            13 => Record::Merge {
                snapshot: r.u64()?,
                child: r.u64()?,
            },
            14 => Record::GrowStore(r.u64()?),
            _ => return Err(DecodeError::Field("record type")),
        })
    }
}

/// Encodes a transaction (its records, framed by the log).
pub fn encode_txn(recs: &[Record]) -> Vec<u8> {
    let mut w = Wr::default();
    w.u32(recs.len() as u32);
    for r in recs {
        r.encode(&mut w);
    }
    w.0
}

pub fn decode_txn(b: &[u8]) -> DResult<Vec<Record>> {
    let mut r = Rd::new(b);
    let n = r.u32()? as usize;
    if n > b.len() {
        return Err(DecodeError::Field("record count"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Record::decode(&mut r)?);
    }
    if r.left() != 0 {
        return Err(DecodeError::Field("trailing bytes in transaction"));
    }
    Ok(out)
}

impl Model {
    fn lvol_mut(&mut self, id: u64) -> Result<&mut LvolRecord, &'static str> {
        self.lvols
            .get_mut(&id)
            .ok_or("record names an unknown lvol")
    }

    /// Applies one record. Errors only on records that cannot apply to
    /// this state (corruption): live operations validate first.
    pub fn apply(&mut self, rec: &Record) -> Result<(), &'static str> {
        match rec {
            Record::CreateLvol(l) => {
                if self.lvols.contains_key(&l.id) {
                    return Err("create of an existing blob id");
                }
                self.next_blob_id = self.next_blob_id.max(l.id + 1);
                self.lvols.insert(l.id, (**l).clone());
            }
            Record::DeleteLvol(id) => {
                self.lvols.remove(id).ok_or("delete of an unknown lvol")?;
            }
            Record::RenameLvol(id, n) => self.lvol_mut(*id)?.name = n.clone(),
            Record::RenameStore(n) => self.name = n.clone(),
            Record::SetXattr {
                id,
                internal,
                name,
                value,
            } => {
                let l = self.lvol_mut(*id)?;
                let m = if *internal {
                    &mut l.internal_xattrs
                } else {
                    &mut l.xattrs
                };
                if !m.contains_key(name) && m.len() >= XATTRS_MAX {
                    return Err("too many xattrs");
                }
                m.insert(name.clone(), value.clone());
            }
            Record::RemoveXattr { id, internal, name } => {
                let l = self.lvol_mut(*id)?;
                if *internal {
                    l.internal_xattrs.remove(name);
                } else {
                    l.xattrs.remove(name);
                }
            }
            Record::SetFlags {
                id,
                thin,
                read_only,
            } => {
                let l = self.lvol_mut(*id)?;
                l.thin = *thin;
                l.read_only = *read_only;
            }
            Record::SetParent(id, p) => self.lvol_mut(*id)?.parent = p.clone(),
            Record::Resize(id, n) => {
                if *n > MAX_LVOL_CLUSTERS {
                    return Err("resize beyond the largest lvol");
                }
                let l = self.lvol_mut(*id)?;
                l.num_clusters = *n;
                l.map.resize(*n as usize, 0);
            }
            Record::Map(id, runs) => {
                let l = self.lvol_mut(*id)?;
                for r in runs {
                    let end = r.logical.checked_add(r.len as u64).ok_or("run overflows")?;
                    if end > l.num_clusters || r.len == 0 {
                        return Err("run beyond the lvol");
                    }
                    for k in 0..r.len as u64 {
                        l.map[(r.logical + k) as usize] = r.physical + k + 1;
                    }
                }
            }
            Record::Unmap(id, s, c) => {
                let l = self.lvol_mut(*id)?;
                let end = s.checked_add(*c).ok_or("unmap overflows")?;
                if end > l.num_clusters {
                    return Err("unmap beyond the lvol");
                }
                l.map[*s as usize..end as usize].fill(0);
            }
            Record::MoveMap { from, to } => {
                let src = std::mem::take(&mut self.lvol_mut(*from)?.map);
                let n = src.len();
                let dst = self.lvol_mut(*to)?;
                if dst.num_clusters as usize != n || dst.map.iter().any(|&m| m != 0) {
                    let f = self.lvol_mut(*from)?;
                    f.map = src;
                    return Err("map move to a differently sized or non-empty lvol");
                }
                dst.map = src;
                self.lvol_mut(*from)?.map = vec![0; n];
            }
            Record::Merge { snapshot, child } => {
                let s = self.lvols.get(snapshot).ok_or("merge of an unknown lvol")?;
                let mut smap = s.map.clone();
                let c = self.lvol_mut(*child)?;
                for (i, m) in smap.iter_mut().enumerate() {
                    if i < c.map.len() && c.map[i] == 0 && *m != 0 {
                        c.map[i] = *m;
                        *m = 0;
                    }
                }
                self.lvol_mut(*snapshot)?.map = smap;
            }
            Record::GrowStore(n) => {
                if *n < self.total_data_clusters {
                    return Err("store shrink");
                }
                self.total_data_clusters = *n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_lvol(id: u64) -> LvolRecord {
        let mut x = BTreeMap::new();
        x.insert("user_created".to_string(), b"true\0".to_vec());
        LvolRecord {
            id,
            uuid: Uuid::from_u128(id as u128 + 77),
            name: format!("lvol{id}"),
            num_clusters: 10,
            thin: true,
            read_only: false,
            clear_method: ClearMethod::Unmap,
            parent: Parent::External {
                bdev_uuid: Uuid::from_u128(5),
                bdev_name: "ext".into(),
            },
            creation_time: "2026-12-02T01:00:00Z".into(),
            xattrs: x,
            internal_xattrs: BTreeMap::new(),
            map: vec![0, 5, 6, 7, 0, 0, 100, 0, 0, 1],
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_flipped_bits_and_newer_versions() {
        let l = Layout::compute(512, 1 << 21, 1 << 20, 100).unwrap();
        let sb = Superblock {
            seq: 9,
            store_uuid: Uuid::from_u128(3),
            layout: l,
            format_blocks: 1 << 21,
            epoch: 4,
            ckpt_gen: 2,
            ckpt_bytes: 500,
            ckpt_crc: 0xdead,
            log_start_seq: 77,
            log_start_pos: 13,
            log_min_epoch: 3,
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b), Ok(sb.clone()));
        for bit in [0, 70, 12 * 8 + 1, 130 * 8, 4095 * 8 + 7] {
            let mut bad = b.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Superblock::decode(&bad).is_err(), "bit {bit}");
        }
        // A newer major version (with a valid CRC) is refused as such.
        let mut v2 = b.clone();
        v2[8] = 2;
        let crc = crc_with_hole(&v2, SB_CRC_AT);
        v2[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Superblock::decode(&v2), Err(DecodeError::Version(2)));
        // A torn newer copy (its CRC sector missing) loses to the old one.
        let mut newer = sb.clone();
        newer.seq = 10;
        let mut torn = newer.encode();
        torn[..512].copy_from_slice(&b[..512]);
        torn[1000] = 1;
        let (best, why) = Superblock::newest([&torn, &b]);
        assert_eq!(best.unwrap().seq, 9);
        assert_eq!(why[0], Err(DecodeError::Crc));
    }

    #[test]
    fn checkpoint_and_records_round_trip() {
        let mut m = Model {
            store_uuid: Uuid::from_u128(1),
            name: "lvs".into(),
            total_data_clusters: 1000,
            next_blob_id: 9,
            lvols: BTreeMap::new(),
        };
        m.lvols.insert(3, sample_lvol(3));
        let mut l4 = sample_lvol(4);
        l4.parent = Parent::Lvol(3);
        l4.map = vec![0; 10];
        m.lvols.insert(4, l4);
        let b = encode_checkpoint(&m, 5, 42);
        let (m2, info) = decode_checkpoint(&b).unwrap();
        assert_eq!(m2, m);
        assert_eq!(info.gen, 5);
        assert_eq!(info.seq_through, 42);
        assert_eq!(info.allocated, 5);
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert_eq!(decode_checkpoint(&bad).map(|_| ()), Err(DecodeError::Crc));
        for cut in [0, 10, 63, 64, b.len() - 1] {
            assert!(decode_checkpoint(&b[..cut]).is_err());
        }
        let recs = vec![
            Record::CreateLvol(Box::new(sample_lvol(9))),
            Record::Map(
                9,
                vec![Run {
                    logical: 0,
                    physical: 30,
                    len: 1,
                }],
            ),
            Record::SetParent(9, Parent::None),
            Record::Merge {
                snapshot: 3,
                child: 4,
            },
            Record::SetXattr {
                id: 9,
                internal: true,
                name: "a".into(),
                value: vec![1, 2],
            },
        ];
        let t = encode_txn(&recs);
        assert_eq!(decode_txn(&t).unwrap(), recs);
        for cut in 0..t.len() {
            assert!(decode_txn(&t[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn merge_gives_the_child_what_it_lacks() {
        let mut m = Model {
            store_uuid: Uuid::nil(),
            name: "s".into(),
            total_data_clusters: 100,
            next_blob_id: 3,
            lvols: BTreeMap::new(),
        };
        let mut s = sample_lvol(1);
        s.map = vec![1, 2, 3, 0, 5, 0, 0, 0, 0, 9];
        let mut c = sample_lvol(2);
        c.num_clusters = 8;
        c.map = vec![0, 20, 0, 0, 0, 0, 0, 0];
        m.lvols.insert(1, s);
        m.lvols.insert(2, c);
        m.apply(&Record::Merge {
            snapshot: 1,
            child: 2,
        })
        .unwrap();
        assert_eq!(m.lvols[&2].map, vec![1, 20, 3, 0, 5, 0, 0, 0]);
        // What stays with the snapshot is freed when it is deleted.
        assert_eq!(m.lvols[&1].map, vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 9]);
    }

    #[test]
    fn layout_follows_the_md_page_ratio() {
        // 1 GiB, 1 MiB clusters, ratio 100: 1024 md pages wanted.
        let l = Layout::compute(4096, 1 << 18, 1 << 20, 100).unwrap();
        assert_eq!(l.log_pages, 64);
        assert_eq!(l.ckpt_pages, (1024 - 2 - 64) / 2);
        assert_eq!(l.md_pages(), 2 + 2 * 479 + 64);
        assert_eq!(l.data_start_cluster, 4);
        assert_eq!(l.cluster_offset_blocks(0), 4 * 256);
        assert!(Layout::compute(4096, 1 << 18, 1000, 100).is_err());
        assert!(Layout::compute(8192, 1 << 18, 1 << 20, 100).is_err());
        assert!(Layout::compute(4096, 1 << 18, 1 << 20, 0).is_err());
        // Too small a device for its metadata.
        assert!(Layout::compute(4096, 256, 1 << 20, 100).is_err());
    }
}
