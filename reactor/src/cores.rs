//! Which CPU cores the reactors run on.
//!
//! SPDK users give a hexadecimal core mask (`-m 0x3`) or a core list
//! (`--cpus 0,1`, also accepted in SPDK's bracketed form `[0-1,4]`). Both parse
//! into a [`CoreSet`]: a sorted, de-duplicated, non-empty list of CPU ids. The
//! first core of the set hosts the main reactor.

use std::fmt;

/// A CPU id, as the kernel numbers them (SPDK calls this an lcore).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CoreId(pub u32);

impl fmt::Display for CoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Highest CPU id accepted: bounds the mask parser and per-core tables.
pub const MAX_CORE_ID: u32 = 1023;

/// A non-empty, sorted set of cores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreSet {
    cores: Vec<CoreId>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CoreSetError {
    Empty,
    Malformed(String),
    OutOfRange(u64),
    Unavailable(CoreId),
}

impl fmt::Display for CoreSetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreSetError::Empty => write!(f, "the core set is empty"),
            CoreSetError::Malformed(s) => write!(f, "cannot parse core set '{s}'"),
            CoreSetError::OutOfRange(c) => {
                write!(
                    f,
                    "core {c} is beyond the largest supported id {MAX_CORE_ID}"
                )
            }
            CoreSetError::Unavailable(c) => {
                write!(f, "core {c} is not available to this process")
            }
        }
    }
}

impl std::error::Error for CoreSetError {}

impl CoreSet {
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Result<CoreSet, CoreSetError> {
        let mut cores = Vec::new();
        for id in ids {
            if id > MAX_CORE_ID {
                return Err(CoreSetError::OutOfRange(id as u64));
            }
            cores.push(CoreId(id));
        }
        cores.sort();
        cores.dedup();
        if cores.is_empty() {
            return Err(CoreSetError::Empty);
        }
        Ok(CoreSet { cores })
    }

    /// Parses a hexadecimal mask such as `0x3` or `3` (SPDK's `-m`). A
    /// bracketed list (`[0,1]`) is also accepted there, as SPDK does.
    pub fn parse_mask(mask: &str) -> Result<CoreSet, CoreSetError> {
        let s = mask.trim();
        if s.starts_with('[') {
            return CoreSet::parse_list(s);
        }
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(CoreSetError::Malformed(mask.to_string()));
        }
        let mut ids = Vec::new();
        // Walk the hex digits from the least significant end so masks wider
        // than 64 bits work too.
        for (nibble_index, c) in digits.chars().rev().enumerate() {
            let nibble = c.to_digit(16).unwrap_or(0);
            for bit in 0..4 {
                if nibble & (1 << bit) != 0 {
                    let id = (nibble_index * 4 + bit) as u64;
                    if id > MAX_CORE_ID as u64 {
                        return Err(CoreSetError::OutOfRange(id));
                    }
                    ids.push(id as u32);
                }
            }
        }
        CoreSet::from_ids(ids)
    }

    /// Parses a list such as `0,1`, `0-3,6` or `[0-1]`.
    pub fn parse_list(list: &str) -> Result<CoreSet, CoreSetError> {
        let bad = || CoreSetError::Malformed(list.to_string());
        let s = list.trim();
        let s = s
            .strip_prefix('[')
            .map(|r| r.strip_suffix(']').ok_or_else(bad))
            .transpose()?
            .unwrap_or(s);
        let mut ids = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad());
            }
            let parse = |t: &str| -> Result<u32, CoreSetError> {
                let v: u64 = t.trim().parse().map_err(|_| bad())?;
                if v > MAX_CORE_ID as u64 {
                    return Err(CoreSetError::OutOfRange(v));
                }
                Ok(v as u32)
            };
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (parse(lo)?, parse(hi)?);
                    if lo > hi {
                        return Err(bad());
                    }
                    ids.extend(lo..=hi);
                }
                None => ids.push(parse(part)?),
            }
        }
        CoreSet::from_ids(ids)
    }

    /// Fails unless every core is one this process may run on.
    pub fn check_available(&self) -> Result<(), CoreSetError> {
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        for core in &self.cores {
            if !available.contains(&(core.0 as usize)) {
                return Err(CoreSetError::Unavailable(*core));
            }
        }
        Ok(())
    }

    pub fn cores(&self) -> &[CoreId] {
        &self.cores
    }

    pub fn main_core(&self) -> CoreId {
        self.cores[0]
    }

    pub fn len(&self) -> usize {
        self.cores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    pub fn contains(&self, core: CoreId) -> bool {
        self.cores.binary_search(&core).is_ok()
    }

    /// The mask in SPDK's notation (`0x3`).
    pub fn mask_string(&self) -> String {
        let max = self.cores.last().map(|c| c.0).unwrap_or(0) as usize;
        let mut nibbles = vec![0u8; max / 4 + 1];
        for c in &self.cores {
            nibbles[c.0 as usize / 4] |= 1 << (c.0 % 4);
        }
        let hex: String = nibbles
            .iter()
            .rev()
            .map(|n| char::from_digit(*n as u32, 16).unwrap_or('0'))
            .collect();
        let trimmed = hex.trim_start_matches('0');
        format!("0x{}", if trimmed.is_empty() { "0" } else { trimmed })
    }
}

/// The mask of a single core, as SPDK prints a thread's cpumask.
pub fn single_core_mask(core: CoreId) -> String {
    CoreSet { cores: vec![core] }.mask_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(s: &CoreSet) -> Vec<u32> {
        s.cores().iter().map(|c| c.0).collect()
    }

    #[test]
    fn masks() {
        assert_eq!(ids(&CoreSet::parse_mask("0x3").unwrap()), vec![0, 1]);
        assert_eq!(ids(&CoreSet::parse_mask("3").unwrap()), vec![0, 1]);
        assert_eq!(ids(&CoreSet::parse_mask("0x10").unwrap()), vec![4]);
        assert_eq!(
            ids(&CoreSet::parse_mask("0x10000000000000001").unwrap()),
            vec![0, 64]
        );
        assert_eq!(ids(&CoreSet::parse_mask("[0,2]").unwrap()), vec![0, 2]);
        assert_eq!(CoreSet::parse_mask("0x0"), Err(CoreSetError::Empty));
        assert!(matches!(
            CoreSet::parse_mask("0xg"),
            Err(CoreSetError::Malformed(_))
        ));
        assert!(matches!(
            CoreSet::parse_mask(""),
            Err(CoreSetError::Malformed(_))
        ));
    }

    #[test]
    fn lists() {
        assert_eq!(ids(&CoreSet::parse_list("0,1").unwrap()), vec![0, 1]);
        assert_eq!(ids(&CoreSet::parse_list("1,0,1").unwrap()), vec![0, 1]);
        assert_eq!(
            ids(&CoreSet::parse_list("[0-2,5]").unwrap()),
            vec![0, 1, 2, 5]
        );
        assert!(CoreSet::parse_list("2-1").is_err());
        assert!(CoreSet::parse_list("0,,1").is_err());
        assert!(CoreSet::parse_list("[0,1").is_err());
        assert_eq!(
            CoreSet::parse_list("5000"),
            Err(CoreSetError::OutOfRange(5000))
        );
    }

    #[test]
    fn mask_round_trip() {
        for m in ["0x1", "0x3", "0x10", "0xf0f", "0x8000000000000000"] {
            assert_eq!(CoreSet::parse_mask(m).unwrap().mask_string(), m);
        }
    }
}
