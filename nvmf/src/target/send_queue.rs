//! A connection's outgoing bytes, sent with one vectored `sendmsg` per
//! poll: small PDUs (headers, responses, digests) are appended to one
//! growing byte buffer, and data that already lies in a request slot's
//! buffer (read data) is referenced in place, not copied.
//!
//! Invariants: segments leave in order; a slot segment keeps its slot out
//! of reuse until its last byte has been handed to the socket, when
//! [`SendQueue::advance`] reports the slot done. The byte buffer holds the
//! unsent bytes and at most as many sent ones again (it is compacted as it
//! drains), so [`SendQueue::queued_bytes`] is what it costs in memory even
//! while it never runs empty; the connection stops taking commands while
//! that is above its limit.

use std::collections::VecDeque;
use std::io::IoSlice;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    /// `bytes[start..end]`.
    Bytes { start: usize, end: usize },
    /// `slot`'s buffer `[start..end]`.
    Slot { slot: u16, start: usize, end: usize },
}

impl Segment {
    fn len(&self) -> usize {
        match *self {
            Segment::Bytes { start, end } | Segment::Slot { start, end, .. } => end - start,
        }
    }
}

/// Most slices handed to one `sendmsg`.
pub const MAX_IOV: usize = 64;

pub struct SendQueue {
    bytes: Vec<u8>,
    segments: VecDeque<Segment>,
    /// Bytes of the first segment already sent.
    head_sent: usize,
}

impl SendQueue {
    pub fn with_capacity(bytes: usize, segments: usize) -> SendQueue {
        SendQueue {
            bytes: Vec::with_capacity(bytes),
            segments: VecDeque::with_capacity(segments),
            head_sent: 0,
        }
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Bytes of PDUs copied in and held (sent ones not yet compacted away
    /// included); slot data is not counted (the slots own it).
    #[inline]
    pub fn queued_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Appends a copy of `b` (merged with the previous segment when that
    /// one is bytes too).
    #[inline]
    pub fn push_bytes(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        let end = self.bytes.len();
        if let Some(Segment::Bytes { end: last_end, .. }) = self.segments.back_mut() {
            if *last_end == start {
                *last_end = end;
                return;
            }
        }
        self.segments.push_back(Segment::Bytes { start, end });
    }

    /// Appends `len` bytes of `slot`'s buffer from `start`, sent from
    /// where they lie. An empty range still reports the slot done.
    #[inline]
    pub fn push_slot(&mut self, slot: u16, start: usize, len: usize) {
        self.segments.push_back(Segment::Slot {
            slot,
            start,
            end: start + len,
        });
    }

    /// Fills `out` with the queued data, in order, up to its length;
    /// `slot_data(slot)` gives a slot's buffer. Returns the slices filled.
    #[inline]
    pub fn gather<'a>(
        &'a self,
        slot_data: impl Fn(u16) -> &'a [u8],
        out: &mut [IoSlice<'a>],
    ) -> usize {
        let mut n = 0;
        for (i, seg) in self.segments.iter().enumerate() {
            if n == out.len() {
                break;
            }
            let skip = if i == 0 { self.head_sent } else { 0 };
            let s: &'a [u8] = match *seg {
                Segment::Bytes { start, end } => &self.bytes[start + skip..end],
                Segment::Slot { slot, start, end } => {
                    let d = slot_data(slot);
                    d.get(start + skip..end).unwrap_or(&[])
                }
            };
            if s.is_empty() {
                continue;
            }
            out[n] = IoSlice::new(s);
            n += 1;
        }
        n
    }

    /// Drops `sent` bytes from the front; `slot_done` gets each slot whose
    /// segment is now fully sent.
    #[inline]
    pub fn advance(&mut self, mut sent: usize, mut slot_done: impl FnMut(u16)) {
        while let Some(seg) = self.segments.front() {
            let left = seg.len() - self.head_sent;
            if sent < left {
                self.head_sent += sent;
                break;
            }
            sent -= left;
            self.head_sent = 0;
            if let Some(Segment::Slot { slot, .. }) = self.segments.pop_front() {
                slot_done(slot);
            }
        }
        if self.segments.is_empty() {
            self.bytes.clear();
            self.head_sent = 0;
        } else {
            self.compact();
        }
    }

    /// Drops the sent bytes at the front of the byte buffer once they are
    /// at least half of it (each byte is moved at most once on average).
    fn compact(&mut self) {
        let mut first = None;
        for (i, seg) in self.segments.iter().enumerate() {
            if let Segment::Bytes { start, .. } = *seg {
                first = Some(start + if i == 0 { self.head_sent } else { 0 });
                break;
            }
        }
        // No bytes segment left: every byte in the buffer was sent.
        let dead = first.unwrap_or(self.bytes.len());
        if dead == 0 || dead < self.bytes.len() - dead {
            return;
        }
        self.bytes.drain(..dead);
        for (i, seg) in self.segments.iter_mut().enumerate() {
            if let Segment::Bytes { start, end } = seg {
                // The head segment's sent part goes with the rest.
                if i == 0 {
                    *start += self.head_sent;
                }
                *start -= dead;
                *end -= dead;
            }
        }
        if matches!(self.segments.front(), Some(Segment::Bytes { .. })) {
            self.head_sent = 0;
        }
    }

    /// Forgets everything queued; `slot_done` gets every slot referenced.
    pub fn clear(&mut self, mut slot_done: impl FnMut(u16)) {
        for seg in self.segments.drain(..) {
            if let Segment::Slot { slot, .. } = seg {
                slot_done(slot);
            }
        }
        self.bytes.clear();
        self.head_sent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flatten(q: &SendQueue, slots: &[Vec<u8>]) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let n = q.gather(|s| &slots[s as usize], &mut iov);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn bytes_merge_and_slots_are_referenced_in_order() {
        let slots = vec![b"DATA0".to_vec(), b"DATA1".to_vec()];
        let mut q = SendQueue::with_capacity(16, 4);
        q.push_bytes(b"h0");
        q.push_bytes(b"h1");
        q.push_slot(1, 1, 3);
        q.push_bytes(b"r");
        assert_eq!(q.segments.len(), 3);
        assert_eq!(flatten(&q, &slots), b"h0h1ATAr");
    }

    #[test]
    fn partial_sends_resume_mid_segment_and_release_slots_once_sent() {
        let slots = vec![b"abcdef".to_vec()];
        let mut q = SendQueue::with_capacity(16, 4);
        q.push_bytes(b"xy");
        q.push_slot(0, 0, 6);
        q.push_bytes(b"z");
        let mut done = Vec::new();
        q.advance(3, |s| done.push(s));
        assert!(done.is_empty());
        assert_eq!(flatten(&q, &slots), b"bcdefz");
        q.advance(5, |s| done.push(s));
        assert_eq!(done, vec![0]);
        assert_eq!(flatten(&q, &slots), b"z");
        q.advance(1, |s| done.push(s));
        assert!(q.is_empty());
        assert!(q.bytes.is_empty());
    }

    #[test]
    fn a_queue_that_never_empties_keeps_its_memory_bounded() {
        // A slow reader: every round queues responses and read data and
        // the socket takes as much, but the queue never runs empty; the
        // buffer must not keep every byte ever queued.
        let slots = vec![vec![7u8; 100]];
        let mut q = SendQueue::with_capacity(16, 4);
        let mut pending = 0usize;
        let mut sent_total = Vec::new();
        let mut queued_total = Vec::new();
        // Without compaction the bound fails within 20 rounds.
        let rounds: u32 = if cfg!(miri) { 200 } else { 10_000 };
        for round in 0..rounds {
            let rsp = round.to_le_bytes();
            q.push_bytes(&rsp);
            q.push_slot(0, 0, 100);
            q.push_bytes(&rsp);
            queued_total.extend_from_slice(&rsp);
            queued_total.extend_from_slice(&slots[0]);
            queued_total.extend_from_slice(&rsp);
            pending += 108;
            // Half the first round stays behind: always something unsent.
            let take = if round == 0 { 50 } else { 108 };
            let all = flatten(&q, &slots);
            assert_eq!(all.len(), pending);
            sent_total.extend_from_slice(&all[..take]);
            q.advance(take, |_| {});
            pending -= take;
            assert!(
                q.queued_bytes() <= 2 * (pending + 8) + 16,
                "round {round}: {} bytes held for {pending} unsent",
                q.queued_bytes()
            );
        }
        sent_total.extend_from_slice(&flatten(&q, &slots));
        assert!(sent_total == queued_total, "everything leaves, in order");
    }

    #[test]
    fn clear_reports_every_referenced_slot() {
        let mut q = SendQueue::with_capacity(16, 4);
        q.push_slot(3, 0, 0);
        q.push_bytes(b"a");
        q.push_slot(5, 0, 4);
        let mut done = Vec::new();
        q.clear(|s| done.push(s));
        assert_eq!(done, vec![3, 5]);
        assert!(q.is_empty());
    }
}
