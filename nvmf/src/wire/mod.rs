//! NVMe/TCP and NVMe wire formats, independent of who uses them (target,
//! initiator, fuzz target). Everything on the wire is little-endian.
//!
//! - [`pdu`]: PDU headers (NVMe/TCP 1.0, sections 3.6.x) and the checks a
//!   receiver makes before trusting a header: a failed check names the
//!   fatal error status and the offending field's offset, as a C2HTermReq
//!   or H2CTermReq reports them.
//! - [`nvme`]: the 64-byte submission queue entry, the 16-byte completion
//!   queue entry, SGL descriptors and status codes (NVMe Base 2.0, 4.2-4.6).
//! - [`digest`]: CRC-32C header and data digests.
//!
//! Structures are fixed byte arrays with typed accessors: no unsafe, no
//! alignment assumptions, sizes checked at compile time.

pub mod digest;
pub mod discovery;
pub mod fabrics;
pub mod identify;
pub mod nvme;
pub mod pdu;

pub use digest::crc32c_digest;
pub use nvme::{Cqe, SglDescriptor, Sqe, Status};
pub use pdu::{CommonHeader, PduError, PduType};

#[inline]
pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

#[inline]
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[inline]
pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

#[inline]
pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

#[inline]
pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
