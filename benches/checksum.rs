//! Checksum throughput (GB/s) on 4 KiB and 1 MiB buffers: the `crc32c`
//! crate against `crc-fast` for CRC-32C (NVMe/TCP digests, metadata), and
//! `crc-fast` for CRC-64/NVME (snapshot checksums). Keep whichever is
//! faster for each use.
//!
//! `cargo bench --bench checksum` (FP_BENCH_SECS shortens each case).

use std::hint::black_box;
use std::time::{Duration, Instant};

use crc_fast::CrcAlgorithm;

fn secs() -> f64 {
    std::env::var("FP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// Bytes per second of `f` over `buf`, run for about `secs()`.
fn measure(buf: &[u8], mut f: impl FnMut(&[u8]) -> u64) -> f64 {
    for _ in 0..16 {
        black_box(f(black_box(buf)));
    }
    let budget = Duration::from_secs_f64(secs());
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < budget {
        for _ in 0..64 {
            black_box(f(black_box(buf)));
        }
        bytes += 64 * buf.len() as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let data: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // Same answers before any timing.
    assert_eq!(
        crc32c::crc32c(&data) as u64,
        crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, &data)
    );
    println!("{:<34} {:>10} {:>10}", "checksum", "4 KiB", "1 MiB");
    let row = |name: &str, f: &dyn Fn(&[u8]) -> u64| {
        let small = measure(&data[..4096], f) / 1e9;
        let large = measure(&data, f) / 1e9;
        println!("{name:<34} {small:>8.2} GB/s {large:>6.2} GB/s");
    };
    row("crc32c crate, CRC-32C", &|b| crc32c::crc32c(b) as u64);
    row("crc-fast, CRC-32C", &|b| {
        crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, b)
    });
    row("crc-fast, CRC-64/NVME", &|b| {
        crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b)
    });
}
