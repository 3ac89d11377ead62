//! Log pages: how transactions are framed into 4 KiB pages of the log
//! ring, and how a load replays them. Pure: the store writes what
//! [`encode_batch`] builds and feeds what it reads to a [`Replayer`]; the
//! checker does the same over a file.
//!
//! ```text
//! log page (4096 bytes)
//!      0  8 magic "FPLVLOG1"
//!      8  2 version major          10 2 flags (bit 0: first page of a batch)
//!     12  4 CRC-32C of the page with this field zeroed
//!     16 16 store UUID
//!     32  8 sequence number (consecutive; ring position follows from it)
//!     40  8 epoch (the superblock epoch of the load that wrote it)
//!     48  2 payload bytes used     50 14 reserved
//!     64    payload: a byte stream of transactions, each a u32 length and
//!           that many bytes (disk::encode_txn); a transaction may span
//!           pages, a batch (one group commit) ends with a whole one
//! ```
//!
//! Replay accepts a page only if its CRC, store UUID and sequence number
//! (the one expected next) are right and its epoch is between the previous
//! page's (or the superblock's `log_min_epoch` for the first) and the
//! superblock's epoch. The first page failing that ends the log. Bytes of
//! a transaction whose end is not in the valid pages are dropped: that
//! commit never returned. A batch's first page drops any such remainder of
//! an earlier, interrupted batch (which only a later epoch can follow).

use uuid::Uuid;

use super::disk::{crc_with_hole, DResult, DecodeError, Rd, Wr, LOG_MAGIC, MD_PAGE_BYTES};

pub const LOG_HEADER_BYTES: usize = 64;
pub const LOG_PAYLOAD_BYTES: usize = MD_PAGE_BYTES - LOG_HEADER_BYTES;
pub const FLAG_BATCH_START: u16 = 1;
const CRC_AT: usize = 12;

/// Pages a batch of transactions of these sizes takes.
pub fn batch_pages(txn_lens: impl IntoIterator<Item = usize>) -> u64 {
    let bytes: usize = txn_lens.into_iter().map(|l| 4 + l).sum();
    bytes.div_ceil(LOG_PAYLOAD_BYTES).max(1) as u64
}

/// Builds the pages of one batch: `txns` framed into consecutive pages
/// from `first_seq`.
pub fn encode_batch(store: &Uuid, first_seq: u64, epoch: u64, txns: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = Wr(Vec::new());
    for t in txns {
        stream.bytes32(t);
    }
    let stream = stream.0;
    let n = batch_pages(txns.iter().map(Vec::len));
    let mut out = vec![0u8; n as usize * MD_PAGE_BYTES];
    for i in 0..n as usize {
        let page = &mut out[i * MD_PAGE_BYTES..(i + 1) * MD_PAGE_BYTES];
        let from = (i * LOG_PAYLOAD_BYTES).min(stream.len());
        let to = ((i + 1) * LOG_PAYLOAD_BYTES).min(stream.len());
        let mut h = Wr(Vec::with_capacity(LOG_HEADER_BYTES));
        h.0.extend_from_slice(LOG_MAGIC);
        h.u16(super::disk::VERSION_MAJOR);
        h.u16(if i == 0 { FLAG_BATCH_START } else { 0 });
        h.u32(0);
        h.uuid(store);
        h.u64(first_seq + i as u64);
        h.u64(epoch);
        h.u16((to - from) as u16);
        page[..h.0.len()].copy_from_slice(&h.0);
        page[LOG_HEADER_BYTES..LOG_HEADER_BYTES + (to - from)].copy_from_slice(&stream[from..to]);
        let crc = crc_with_hole(page, CRC_AT);
        page[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

/// A log page's header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageHeader {
    pub flags: u16,
    pub seq: u64,
    pub epoch: u64,
    pub used: usize,
}

/// Decodes a page that claims to belong to `store`; its payload.
pub fn decode_page<'a>(b: &'a [u8], store: &Uuid) -> DResult<(PageHeader, &'a [u8])> {
    if b.len() < MD_PAGE_BYTES || &b[0..8] != LOG_MAGIC {
        return Err(DecodeError::NoMagic);
    }
    let b = &b[..MD_PAGE_BYTES];
    let mut r = Rd::new(&b[8..]);
    let major = r.u16()?;
    let flags = r.u16()?;
    let crc = r.u32()?;
    if crc_with_hole(b, CRC_AT) != crc {
        return Err(DecodeError::Crc);
    }
    if major != super::disk::VERSION_MAJOR {
        return Err(DecodeError::Version(major));
    }
    if r.uuid()? != *store {
        return Err(DecodeError::Field("store uuid"));
    }
    let seq = r.u64()?;
    let epoch = r.u64()?;
    let used = r.u16()? as usize;
    if used > LOG_PAYLOAD_BYTES {
        return Err(DecodeError::Field("payload length"));
    }
    Ok((
        PageHeader {
            flags,
            seq,
            epoch,
            used,
        },
        &b[LOG_HEADER_BYTES..LOG_HEADER_BYTES + used],
    ))
}

/// Why replay stopped at a page (the normal end of the log, or a page a
/// crash left half-written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd {
    /// Not a valid page of this store (torn, never written, another store).
    Invalid(DecodeError),
    /// A valid page, but from an earlier lap of the ring.
    Seq { found: u64 },
    /// A valid page from an epoch that may not follow (a leftover of a
    /// batch interrupted before a later load).
    Epoch { found: u64 },
}

/// Replays log pages in sequence order.
pub struct Replayer {
    store: Uuid,
    pub next_seq: u64,
    prev_epoch: u64,
    max_epoch: u64,
    carry: Vec<u8>,
    /// Pages accepted so far.
    pub pages: u64,
}

impl Replayer {
    pub fn new(store: Uuid, start_seq: u64, min_epoch: u64, max_epoch: u64) -> Replayer {
        Replayer {
            store,
            next_seq: start_seq,
            prev_epoch: min_epoch,
            max_epoch,
            carry: Vec::new(),
            pages: 0,
        }
    }

    /// Feeds the page at the ring position of `next_seq`. Ok: the
    /// transactions it completes (possibly none); Err(end): the log ends
    /// here. A valid page whose stream does not frame is corruption
    /// (`Ok(Err)` can't express it), so that is the outer error.
    pub fn feed(&mut self, page: &[u8]) -> Result<Result<Vec<Vec<u8>>, LogEnd>, DecodeError> {
        let (h, payload) = match decode_page(page, &self.store) {
            Ok(x) => x,
            Err(e) => return Ok(Err(LogEnd::Invalid(e))),
        };
        if h.seq != self.next_seq {
            return Ok(Err(LogEnd::Seq { found: h.seq }));
        }
        if h.epoch < self.prev_epoch || h.epoch > self.max_epoch {
            return Ok(Err(LogEnd::Epoch { found: h.epoch }));
        }
        if h.flags & FLAG_BATCH_START != 0 {
            self.carry.clear();
        }
        self.carry.extend_from_slice(payload);
        let mut out = Vec::new();
        let mut at = 0;
        while self.carry.len() - at >= 4 {
            let len = u32::from_le_bytes([
                self.carry[at],
                self.carry[at + 1],
                self.carry[at + 2],
                self.carry[at + 3],
            ]) as usize;
            if len > super::MAX_TXN_BYTES {
                return Err(DecodeError::Field("transaction length"));
            }
            if self.carry.len() - at - 4 < len {
                break;
            }
            out.push(self.carry[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        self.carry.drain(..at);
        self.prev_epoch = h.epoch;
        self.next_seq += 1;
        self.pages += 1;
        Ok(Ok(out))
    }

    /// Bytes of an unfinished transaction at the end (dropped).
    pub fn leftover(&self) -> usize {
        self.carry.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txns(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8; len]).collect()
    }

    fn replay(pages: &[u8], start: u64, min_epoch: u64, max_epoch: u64) -> Vec<Vec<u8>> {
        let mut r = Replayer::new(Uuid::from_u128(7), start, min_epoch, max_epoch);
        let mut out = Vec::new();
        for p in pages.chunks(MD_PAGE_BYTES) {
            match r.feed(p).unwrap() {
                Ok(t) => out.extend(t),
                Err(_) => break,
            }
        }
        out
    }

    #[test]
    fn batches_frame_and_replay_and_a_torn_page_ends_the_log() {
        let u = Uuid::from_u128(7);
        let t = txns(5, 3000);
        let b = encode_batch(&u, 10, 1, &t);
        assert_eq!(b.len() as u64 / 4096, batch_pages(t.iter().map(Vec::len)));
        assert_eq!(replay(&b, 10, 1, 1), t);
        // Wrong starting sequence or a too-new epoch: nothing.
        assert!(replay(&b, 11, 1, 1).is_empty());
        assert!(replay(&b, 10, 2, 3).is_empty());
        // Page 2 torn (one sector of the new content missing): only the
        // transactions complete in pages 0-1 come back.
        let mut torn = b.clone();
        torn[2 * 4096 + 1024..2 * 4096 + 1536].fill(0xEE);
        let got = replay(&torn, 10, 1, 1);
        assert_eq!(got, t[..2].to_vec());
    }

    #[test]
    fn a_leftover_of_an_interrupted_batch_is_dropped_by_the_next_epoch() {
        let u = Uuid::from_u128(7);
        // Epoch 1 batch: pages 10-11, one txn spanning both; only page 10
        // landed. Epoch 2 writes page 11 afresh; the stale epoch-1 page 12
        // (from the same interrupted batch) must not follow it.
        let old = encode_batch(&u, 10, 1, &txns(1, 5000));
        let old3 = encode_batch(&u, 10, 1, &[vec![1; 4000], vec![2; 4000], vec![3; 100]]);
        let new = encode_batch(&u, 11, 2, &txns(1, 10));
        let mut log = old[..4096].to_vec();
        log.extend_from_slice(&new);
        log.extend_from_slice(&old3[2 * 4096..3 * 4096]);
        assert_eq!(replay(&log, 10, 1, 2), txns(1, 10));
    }
}
