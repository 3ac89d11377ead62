//! NVMe/TCP digests (NVMe/TCP 1.0, 3.6.2.4): CRC-32C with initial value
//! and final XOR 0xFFFFFFFF, stored little-endian. The header digest
//! covers the `hlen` header bytes; the data digest covers one PDU's data.

/// The digest of `bytes` (what goes on the wire, as a `u32` to store LE).
#[inline]
pub fn crc32c_digest(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_crc32c_check_value() {
        assert_eq!(crc32c_digest(b"123456789"), 0xE306_9283);
    }
}
