//! Crate `bdev`.
