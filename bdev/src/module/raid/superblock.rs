//! The RAID superblock: what every member carries so a RAID reassembles by
//! itself after a restart (SPEC §4).
//!
//! On disk (all little-endian), two copies of [`SB_BYTES`] at the start of
//! each member, copy `seq % 2` written on each change. A torn write can
//! only spoil the copy being written; the other still holds the previous
//! sequence number. On read the valid copy (magic, version, CRC-32C) with
//! the highest sequence number wins. Member data starts at `data_offset`.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "FPRAIDSB"
//!      8     2  version major (1)        10  2  version minor (0)
//!     12     4  bytes covered by the CRC (4096)
//!     16     4  CRC-32C of those bytes with this field zeroed
//!     20     4  flags (0)
//!     24     8  sequence number, bumped on every change
//!     32    16  RAID UUID
//!     48    64  RAID name, UTF-8, NUL padded
//!    112     1  level (0 raid0, 1 raid1, 2 concat)
//!    113     1  number of slots
//!    114     1  slot of the member this copy is on (0xFF: unknown): a
//!               member is found even if its bdev's UUID changed
//!    115     1  reserved
//!    116     4  block size
//!    120     4  strip size in blocks (0 for raid1)
//!    124     4  reserved
//!    128     8  RAID size in blocks
//!    136    56  reserved
//!    192  64*n  slots: member UUID (16), data_offset (8), data_size (8)
//!               in blocks, state (1), reserved (31)
//! ```

use static_assertions::const_assert;
use uuid::Uuid;

/// Bytes of one superblock copy.
pub const SB_BYTES: usize = 4096;
pub const MAGIC: &[u8; 8] = b"FPRAIDSB";
pub const VERSION_MAJOR: u16 = 1;
pub const VERSION_MINOR: u16 = 0;
const NAME_AT: usize = 48;
pub const NAME_BYTES: usize = 64;
const SLOTS_AT: usize = 192;
const SLOT_BYTES: usize = 64;
/// Most members a RAID may have.
pub const MAX_SLOTS: usize = 32;
const_assert!(SLOTS_AT + MAX_SLOTS * SLOT_BYTES <= SB_BYTES);
const_assert!(NAME_AT + NAME_BYTES <= 112);
/// Default start of member data: 1 MiB, as SPDK reserves.
pub const DATA_OFFSET_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Raid0 = 0,
    Raid1 = 1,
    Concat = 2,
}

impl Level {
    pub fn from_u8(v: u8) -> Option<Level> {
        Some(match v {
            0 => Level::Raid0,
            1 => Level::Raid1,
            2 => Level::Concat,
            _ => return None,
        })
    }

    /// SPDK's `raid_level` spellings.
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_lowercase().as_str() {
            "0" | "raid0" => Level::Raid0,
            "1" | "raid1" => Level::Raid1,
            "concat" => Level::Concat,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Level::Raid0 => "raid0",
            Level::Raid1 => "raid1",
            Level::Concat => "concat",
        }
    }
}

/// A slot's state as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Holds current data.
    Configured = 1,
    /// Was removed or failed: its data is stale until rebuilt.
    Failed = 2,
    /// Being rebuilt: stale until the rebuild finishes.
    Rebuilding = 3,
}

impl SlotState {
    fn from_u8(v: u8) -> Option<SlotState> {
        Some(match v {
            1 => SlotState::Configured,
            2 => SlotState::Failed,
            3 => SlotState::Rebuilding,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    pub member_uuid: Uuid,
    pub data_offset: u64,
    pub data_size: u64,
    pub state: SlotState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaidSuperblock {
    pub seq: u64,
    pub raid_uuid: Uuid,
    pub name: String,
    pub level: Level,
    pub block_size: u32,
    pub strip_size_blocks: u32,
    pub raid_num_blocks: u64,
    pub slots: Vec<SlotRecord>,
    /// The slot of the member this copy was read from or is written to.
    pub own_slot: Option<u8>,
}

/// Why bytes are not a valid superblock.
#[derive(Debug, PartialEq, Eq)]
pub enum SbError {
    NoMagic,
    Version(u16),
    Crc,
    Field(&'static str),
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl RaidSuperblock {
    /// Copy index this superblock is written to.
    pub fn copy(&self) -> usize {
        (self.seq % 2) as usize
    }

    pub fn encode(&self) -> [u8; SB_BYTES] {
        let mut b = [0u8; SB_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        b[10..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        b[12..16].copy_from_slice(&(SB_BYTES as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..48].copy_from_slice(self.raid_uuid.as_bytes());
        let name = self.name.as_bytes();
        let n = name.len().min(NAME_BYTES);
        b[NAME_AT..NAME_AT + n].copy_from_slice(&name[..n]);
        b[112] = self.level as u8;
        b[113] = self.slots.len().min(MAX_SLOTS) as u8;
        b[114] = self.own_slot.unwrap_or(0xFF);
        b[116..120].copy_from_slice(&self.block_size.to_le_bytes());
        b[120..124].copy_from_slice(&self.strip_size_blocks.to_le_bytes());
        b[128..136].copy_from_slice(&self.raid_num_blocks.to_le_bytes());
        for (i, s) in self.slots.iter().take(MAX_SLOTS).enumerate() {
            let at = SLOTS_AT + i * SLOT_BYTES;
            b[at..at + 16].copy_from_slice(s.member_uuid.as_bytes());
            b[at + 16..at + 24].copy_from_slice(&s.data_offset.to_le_bytes());
            b[at + 24..at + 32].copy_from_slice(&s.data_size.to_le_bytes());
            b[at + 32] = s.state as u8;
        }
        let crc = crc32c::crc32c(&b);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<RaidSuperblock, SbError> {
        if b.len() < SB_BYTES || &b[0..8] != MAGIC {
            return Err(SbError::NoMagic);
        }
        let major = le16(b, 8);
        if major != VERSION_MAJOR {
            return Err(SbError::Version(major));
        }
        if le32(b, 12) as usize != SB_BYTES {
            return Err(SbError::Field("length"));
        }
        let mut copy = [0u8; SB_BYTES];
        copy.copy_from_slice(&b[..SB_BYTES]);
        copy[16..20].fill(0);
        if crc32c::crc32c(&copy) != le32(b, 16) {
            return Err(SbError::Crc);
        }
        let level = Level::from_u8(b[112]).ok_or(SbError::Field("level"))?;
        let n = b[113] as usize;
        if n == 0 || n > MAX_SLOTS {
            return Err(SbError::Field("number of slots"));
        }
        let name_raw = &b[NAME_AT..NAME_AT + NAME_BYTES];
        let end = name_raw.iter().position(|&c| c == 0).unwrap_or(NAME_BYTES);
        let name = std::str::from_utf8(&name_raw[..end])
            .map_err(|_| SbError::Field("name"))?
            .to_string();
        let mut slots = Vec::with_capacity(n);
        for i in 0..n {
            let at = SLOTS_AT + i * SLOT_BYTES;
            let mut u = [0u8; 16];
            u.copy_from_slice(&b[at..at + 16]);
            slots.push(SlotRecord {
                member_uuid: Uuid::from_bytes(u),
                data_offset: le64(b, at + 16),
                data_size: le64(b, at + 24),
                state: SlotState::from_u8(b[at + 32]).ok_or(SbError::Field("slot state"))?,
            });
        }
        let block_size = le32(b, 116);
        if block_size == 0 || !block_size.is_multiple_of(512) {
            return Err(SbError::Field("block size"));
        }
        Ok(RaidSuperblock {
            seq: le64(b, 24),
            raid_uuid: Uuid::from_bytes(b[32..48].try_into().map_err(|_| SbError::Field("uuid"))?),
            name,
            level,
            block_size,
            strip_size_blocks: le32(b, 120),
            raid_num_blocks: le64(b, 128),
            own_slot: ((b[114] as usize) < n).then_some(b[114]),
            slots,
        })
    }

    /// The newest valid superblock of two copies, if any is valid.
    pub fn newest(copies: [&[u8]; 2]) -> Option<RaidSuperblock> {
        copies
            .iter()
            .filter_map(|c| RaidSuperblock::decode(c).ok())
            .max_by_key(|sb| sb.seq)
    }

    /// The slot of the member with bdev UUID `uuid` that this copy was
    /// read from: the slot the copy names, else the one recording `uuid`.
    pub fn slot_of(&self, uuid: Uuid) -> Option<usize> {
        self.own_slot
            .map(|s| s as usize)
            .or_else(|| self.slots.iter().position(|s| s.member_uuid == uuid))
    }
}

/// Bytes reserved for one superblock copy on a member with `block_size`.
pub fn copy_bytes(block_size: u32) -> u64 {
    (SB_BYTES as u64).max(block_size as u64)
}

/// Where member data starts, in blocks: after both copies, at least 1 MiB.
pub fn data_offset_blocks(block_size: u32) -> u64 {
    DATA_OFFSET_BYTES.max(2 * copy_bytes(block_size)) / block_size as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> RaidSuperblock {
        RaidSuperblock {
            seq,
            raid_uuid: Uuid::from_u128(0x1234),
            name: "Raid1".into(),
            level: Level::Raid1,
            block_size: 512,
            strip_size_blocks: 0,
            raid_num_blocks: 4096,
            own_slot: Some(1),
            slots: vec![
                SlotRecord {
                    member_uuid: Uuid::from_u128(1),
                    data_offset: 2048,
                    data_size: 4096,
                    state: SlotState::Configured,
                },
                SlotRecord {
                    member_uuid: Uuid::from_u128(2),
                    data_offset: 2048,
                    data_size: 4096,
                    state: SlotState::Failed,
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_rejects_any_flipped_bit() {
        let sb = sample(7);
        let b = sb.encode();
        assert_eq!(RaidSuperblock::decode(&b), Ok(sb));
        for bit in [0, 100, 16 * 8 + 1, 200 * 8, 4095 * 8 + 7] {
            let mut bad = b;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(RaidSuperblock::decode(&bad).is_err(), "bit {bit}");
        }
        let mut v2 = b;
        v2[8] = 2;
        assert_eq!(RaidSuperblock::decode(&v2), Err(SbError::Version(2)));
    }

    #[test]
    fn the_newest_valid_copy_wins_and_a_torn_one_is_ignored() {
        let old = sample(4).encode();
        let new = sample(5).encode();
        assert_eq!(RaidSuperblock::newest([&old, &new]).unwrap().seq, 5);
        assert_eq!(RaidSuperblock::newest([&new, &old]).unwrap().seq, 5);
        // The write of seq 6 (slot 1 back in service) to copy 0 tore after
        // 256 bytes: new header and slot 0, old slot 1.
        let mut six = sample(6);
        six.slots[1].state = SlotState::Configured;
        let mut torn = old;
        torn[..256].copy_from_slice(&six.encode()[..256]);
        assert_ne!(torn, six.encode());
        assert_eq!(RaidSuperblock::newest([&torn, &new]).unwrap().seq, 5);
        let zero = [0u8; SB_BYTES];
        assert!(RaidSuperblock::newest([&zero, &zero]).is_none());
    }

    #[test]
    fn layout_and_offsets() {
        assert_eq!(data_offset_blocks(512), 2048);
        assert_eq!(data_offset_blocks(4096), 256);
        assert_eq!(copy_bytes(512), 4096);
        assert_eq!(Level::parse("RAID1"), Some(Level::Raid1));
        assert_eq!(Level::parse("0"), Some(Level::Raid0));
        assert_eq!(Level::parse("5"), None);
    }
}
