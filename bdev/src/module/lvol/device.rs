//! The device an lvol store keeps its metadata on: a small async trait
//! ([`MdDevice`]) with three implementations:
//! - [`BdevDevice`], over an open bdev [`Descriptor`] (the store's base
//!   bdev, claimed by the layer above); the bdev layer bounces and splits
//!   as the bdev needs, so the store issues plain 4 KiB-aligned I/O;
//! - [`FileDevice`], a file or block device through std I/O (the
//!   standalone checker; synchronous inside the futures);
//! - [`MemDevice`], sparse memory for tests, which records every write and
//!   flush so a test can build the device as a crash at any write boundary
//!   would leave it: unflushed writes landed in any subset, the write in
//!   flight torn at 512-byte sectors ([`crash_image`]).
//!
//! All offsets and lengths are in device blocks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use crate::io::IoType;
use crate::registry::Descriptor;

use super::disk::SECTOR_BYTES;
use super::LvolError;

pub type DevFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LvolError>> + 'a>>;

/// Block access for metadata. Writes may be reordered and lost until a
/// flush completes; after `flush` returns, every write that completed
/// before it was issued is durable.
pub trait MdDevice {
    fn block_size(&self) -> u32;
    /// Current size (a grown base bdev reports more).
    fn num_blocks(&self) -> u64;
    fn read(&self, offset_blocks: u64, num_blocks: u64) -> DevFuture<'_, Vec<u8>>;
    fn write<'a>(&'a self, offset_blocks: u64, data: &'a [u8]) -> DevFuture<'a, ()>;
    fn flush(&self) -> DevFuture<'_, ()>;
}

/// An lvol store's base bdev, through a descriptor the caller opened for
/// writing (and claimed). I/O goes through the calling core's channel: the
/// store's metadata core.
pub struct BdevDevice {
    desc: Descriptor,
}

impl BdevDevice {
    pub fn new(desc: Descriptor) -> BdevDevice {
        BdevDevice { desc }
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }
}

impl MdDevice for BdevDevice {
    fn block_size(&self) -> u32 {
        self.desc.bdev().block_size()
    }

    fn num_blocks(&self) -> u64 {
        self.desc.bdev().num_blocks()
    }

    fn read(&self, offset_blocks: u64, num_blocks: u64) -> DevFuture<'_, Vec<u8>> {
        Box::pin(async move { Ok(self.desc.channel().read(offset_blocks, num_blocks).await?) })
    }

    fn write<'a>(&'a self, offset_blocks: u64, data: &'a [u8]) -> DevFuture<'a, ()> {
        Box::pin(async move { Ok(self.desc.channel().write(offset_blocks, data).await?) })
    }

    fn flush(&self) -> DevFuture<'_, ()> {
        Box::pin(async move {
            // A bdev without flush (malloc) has no volatile cache to flush.
            if !self.desc.bdev().io_type_supported(IoType::Flush) {
                return Ok(());
            }
            Ok(self.desc.channel().command(IoType::Flush, 0, 0).await?)
        })
    }
}

/// A file or block device through std I/O (the checker tool). Reads only
/// unless opened writable.
pub struct FileDevice {
    file: std::fs::File,
    block_size: u32,
    num_blocks: u64,
}

impl FileDevice {
    /// Opens `path` read-only with blocks of `block_size` bytes.
    pub fn open(path: &std::path::Path, block_size: u32) -> std::io::Result<FileDevice> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::open(path)?;
        // Seek to the end: the size of a block device too.
        let len = file.seek(SeekFrom::End(0))?;
        Ok(FileDevice {
            file,
            block_size,
            num_blocks: len / block_size as u64,
        })
    }
}

impl MdDevice for FileDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    fn read(&self, offset_blocks: u64, num_blocks: u64) -> DevFuture<'_, Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let bs = self.block_size as u64;
        let r = (|| {
            if offset_blocks
                .checked_add(num_blocks)
                .is_none_or(|e| e > self.num_blocks)
            {
                return Err(LvolError::Io("read beyond the end of the device".into()));
            }
            let mut buf = vec![0u8; (num_blocks * bs) as usize];
            self.file
                .read_exact_at(&mut buf, offset_blocks * bs)
                .map_err(|e| LvolError::Io(e.to_string()))?;
            Ok(buf)
        })();
        Box::pin(async move { r })
    }

    fn write<'a>(&'a self, _offset_blocks: u64, _data: &'a [u8]) -> DevFuture<'a, ()> {
        Box::pin(async { Err(LvolError::Io("the file device is read-only".into())) })
    }

    fn flush(&self) -> DevFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// One device event a [`MemDevice`] recorded.
#[derive(Debug, Clone)]
pub enum Event {
    Write { offset_bytes: u64, data: Vec<u8> },
    Flush,
}

/// Sparse device contents: 4 KiB chunks, absent = zeros.
pub type Image = BTreeMap<u64, Box<[u8]>>;
const CHUNK: u64 = 4096;

fn image_write(img: &mut Image, offset: u64, data: &[u8]) {
    let mut at = 0usize;
    while at < data.len() {
        let pos = offset + at as u64;
        let chunk = pos / CHUNK;
        let within = (pos % CHUNK) as usize;
        let n = (CHUNK as usize - within).min(data.len() - at);
        let c = img
            .entry(chunk)
            .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
        c[within..within + n].copy_from_slice(&data[at..at + n]);
        at += n;
    }
}

fn image_read(img: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut at = 0usize;
    while at < len {
        let pos = offset + at as u64;
        let within = (pos % CHUNK) as usize;
        let n = (CHUNK as usize - within).min(len - at);
        if let Some(c) = img.get(&(pos / CHUNK)) {
            out[at..at + n].copy_from_slice(&c[within..within + n]);
        }
        at += n;
    }
    out
}

struct MemState {
    /// What reads return: every write applied.
    image: Image,
    trace: Option<Vec<Event>>,
    /// Fail every I/O from this write count on (a dead device).
    fail_from_write: Option<usize>,
    writes: usize,
    /// Yield once per I/O, so concurrent committers queue up (as they do
    /// on a real device) and group commit can be measured.
    yield_io: bool,
}

/// An in-memory device for tests (see the module docs).
pub struct MemDevice {
    block_size: u32,
    num_blocks: RefCell<u64>,
    st: RefCell<MemState>,
}

impl MemDevice {
    pub fn new(block_size: u32, num_blocks: u64) -> MemDevice {
        MemDevice::from_image(block_size, num_blocks, Image::new())
    }

    pub fn from_image(block_size: u32, num_blocks: u64, image: Image) -> MemDevice {
        MemDevice {
            block_size,
            num_blocks: RefCell::new(num_blocks),
            st: RefCell::new(MemState {
                image,
                trace: None,
                fail_from_write: None,
                writes: 0,
                yield_io: false,
            }),
        }
    }

    /// The contents now (every write landed).
    pub fn image(&self) -> Image {
        self.st.borrow().image.clone()
    }

    /// Starts recording writes and flushes.
    pub fn start_trace(&self) {
        self.st.borrow_mut().trace = Some(Vec::new());
    }

    pub fn take_trace(&self) -> Vec<Event> {
        self.st.borrow_mut().trace.take().unwrap_or_default()
    }

    pub fn set_yield_io(&self, y: bool) {
        self.st.borrow_mut().yield_io = y;
    }

    /// Every I/O fails once this many more writes have been issued.
    pub fn fail_after_writes(&self, n: usize) {
        let mut st = self.st.borrow_mut();
        st.fail_from_write = Some(st.writes + n);
    }

    pub fn writes(&self) -> usize {
        self.st.borrow().writes
    }

    /// The device grew (for grow-store tests).
    pub fn set_num_blocks(&self, n: u64) {
        *self.num_blocks.borrow_mut() = n;
    }

    /// Writes the whole device to a file (for the checker tool's tests).
    pub fn dump(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(path)?;
        f.set_len(*self.num_blocks.borrow() * self.block_size as u64)?;
        for (c, data) in &self.st.borrow().image {
            f.write_all_at(data, c * CHUNK)?;
        }
        Ok(())
    }

    fn failed(&self) -> bool {
        let st = self.st.borrow();
        st.fail_from_write.is_some_and(|f| st.writes >= f)
    }

    async fn maybe_yield(&self) {
        if self.st.borrow().yield_io {
            futures_lite::future::yield_now().await;
        }
    }
}

impl MdDevice for MemDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        *self.num_blocks.borrow()
    }

    fn read(&self, offset_blocks: u64, num_blocks: u64) -> DevFuture<'_, Vec<u8>> {
        Box::pin(async move {
            self.maybe_yield().await;
            if self.failed() {
                return Err(LvolError::Io("device failed".into()));
            }
            if offset_blocks + num_blocks > self.num_blocks() {
                return Err(LvolError::Io("read beyond the end".into()));
            }
            let bs = self.block_size as u64;
            Ok(image_read(
                &self.st.borrow().image,
                offset_blocks * bs,
                (num_blocks * bs) as usize,
            ))
        })
    }

    fn write<'a>(&'a self, offset_blocks: u64, data: &'a [u8]) -> DevFuture<'a, ()> {
        Box::pin(async move {
            let bs = self.block_size as u64;
            if data.is_empty() || !(data.len() as u64).is_multiple_of(bs) {
                return Err(LvolError::Invalid("write of a partial block".into()));
            }
            if offset_blocks + data.len() as u64 / bs > self.num_blocks() {
                return Err(LvolError::Io("write beyond the end".into()));
            }
            let failed = self.failed();
            {
                let mut st = self.st.borrow_mut();
                st.writes += 1;
                if failed {
                    return Err(LvolError::Io("device failed".into()));
                }
                image_write(&mut st.image, offset_blocks * bs, data);
                if let Some(t) = st.trace.as_mut() {
                    t.push(Event::Write {
                        offset_bytes: offset_blocks * bs,
                        data: data.to_vec(),
                    });
                }
            }
            self.maybe_yield().await;
            Ok(())
        })
    }

    fn flush(&self) -> DevFuture<'_, ()> {
        Box::pin(async move {
            self.maybe_yield().await;
            if self.failed() {
                return Err(LvolError::Io("device failed".into()));
            }
            if let Some(t) = self.st.borrow_mut().trace.as_mut() {
                t.push(Event::Flush);
            }
            Ok(())
        })
    }
}

/// How the writes not yet flushed at a crash landed.
#[derive(Debug, Clone)]
pub enum Landing {
    /// None of them.
    None,
    /// All of them; the write in flight too if `inflight`.
    All { inflight: bool },
    /// All but the unflushed write with this index among them.
    AllBut(usize),
    /// All of them, and of the write in flight the sectors `sector %
    /// modulo == residue` (a torn write).
    Torn { modulo: usize, residue: usize },
    /// Only the write in flight, torn to its first `sectors` sectors.
    OnlyInflightPrefix { sectors: usize },
    /// All unflushed writes, and the write in flight except its first
    /// `sectors` sectors (a later page of a batch without an earlier one).
    InflightWithoutPrefix { sectors: usize },
}

/// The device after a crash just as write number `crash_at` (counting
/// writes in `trace` from 0) was in flight, landed per `how`: `base` is
/// the durable contents before the trace.
pub fn crash_image(base: &Image, trace: &[Event], crash_at: usize, how: &Landing) -> Image {
    let mut img = base.clone();
    let mut unflushed: Vec<&Event> = Vec::new();
    let mut inflight = None;
    let mut n = 0;
    for e in trace {
        match e {
            Event::Flush => {
                for w in unflushed.drain(..) {
                    if let Event::Write { offset_bytes, data } = w {
                        image_write(&mut img, *offset_bytes, data);
                    }
                }
            }
            Event::Write { .. } => {
                if n == crash_at {
                    inflight = Some(e);
                    break;
                }
                unflushed.push(e);
                n += 1;
            }
        }
    }
    let land = |img: &mut Image, e: &Event, sectors: &dyn Fn(usize) -> bool| {
        if let Event::Write { offset_bytes, data } = e {
            for (i, s) in data.chunks(SECTOR_BYTES).enumerate() {
                if sectors(i) {
                    image_write(img, offset_bytes + (i * SECTOR_BYTES) as u64, s);
                }
            }
        }
    };
    match how {
        Landing::None => {}
        Landing::All { inflight: inf } => {
            for w in &unflushed {
                land(&mut img, w, &|_| true);
            }
            if let (true, Some(w)) = (*inf, inflight) {
                land(&mut img, w, &|_| true);
            }
        }
        Landing::AllBut(skip) => {
            for (i, w) in unflushed.iter().enumerate() {
                if i != *skip {
                    land(&mut img, w, &|_| true);
                }
            }
        }
        Landing::Torn { modulo, residue } => {
            for w in &unflushed {
                land(&mut img, w, &|_| true);
            }
            if let Some(w) = inflight {
                land(&mut img, w, &|i| i % modulo == *residue);
            }
        }
        Landing::OnlyInflightPrefix { sectors } => {
            if let Some(w) = inflight {
                land(&mut img, w, &|i| i < *sectors);
            }
        }
        Landing::InflightWithoutPrefix { sectors } => {
            for w in &unflushed {
                land(&mut img, w, &|_| true);
            }
            if let Some(w) = inflight {
                land(&mut img, w, &|i| i >= *sectors);
            }
        }
    }
    img
}

/// Writes in a trace.
pub fn trace_writes(trace: &[Event]) -> usize {
    trace
        .iter()
        .filter(|e| matches!(e, Event::Write { .. }))
        .count()
}

/// Unflushed writes before write `crash_at`.
pub fn unflushed_before(trace: &[Event], crash_at: usize) -> usize {
    let mut unflushed = 0;
    let mut n = 0;
    for e in trace {
        match e {
            Event::Flush => unflushed = 0,
            Event::Write { .. } => {
                if n == crash_at {
                    break;
                }
                unflushed += 1;
                n += 1;
            }
        }
    }
    unflushed
}
