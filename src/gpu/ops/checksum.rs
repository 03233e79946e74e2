//! Checksums of pipeline messages on the device (`cuda/checksum.cu`): what a device link sends
//! next to each message and checks on arrival, as host messages carry a CRC32
//! (`crate::runtime::wire`), and the fault injection that damages a message.

use super::check_len;
use crate::gpu::{Arg, DType, Dev, Gpu, GpuError};

/// Threads per block of the checksum kernel.
const BLOCK: u32 = 256;
/// At most this many blocks (each thread then sums several words).
const MAX_BLOCKS: usize = 1024;

/// Adds the checksum of the `bytes` bytes at `data` to the 64-bit value at `out` (zero it first):
/// the sum, modulo 2^64, of a bijective mix of each 32-bit word and its index (see
/// `cuda/checksum.cu`), so any damage confined to one word always changes it. Equals
/// [`message_checksum_host`] of the same bytes.
///
/// # Errors
/// No bytes, an odd count, `data` not 4-byte or `out` not 8-byte aligned in its buffer, either
/// past its buffer's end; device errors.
pub fn message_checksum<G: Gpu>(
    gpu: &G,
    data: Dev<'_, G::Buf>,
    bytes: usize,
    out: Dev<'_, G::Buf>,
) -> Result<(), GpuError> {
    const OP: &str = "message_checksum";
    if bytes == 0 || !bytes.is_multiple_of(2) {
        return Err(GpuError::Shape {
            op: OP,
            detail: format!("a message of {bytes} bytes: not a positive whole number of 16-bit elements"),
        });
    }
    if !data.offset.is_multiple_of(4) || !out.offset.is_multiple_of(8) {
        return Err(GpuError::Shape {
            op: OP,
            detail: format!(
                "data at byte {} (needs 4-byte alignment), checksum at byte {} (needs 8)",
                data.offset, out.offset
            ),
        });
    }
    check_len(gpu, OP, "data", data, bytes / 2, DType::Bf16)?;
    check_len(gpu, OP, "checksum", out, 2, DType::F32)?;
    let blocks = (bytes / 4).div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    gpu.launch(
        "message_checksum",
        [blocks, 1, 1],
        [BLOCK, 1, 1],
        0,
        &[Arg::Ptr(data), Arg::U64(bytes as u64), Arg::Ptr(out)],
    )
}

/// Fault injection: flips bit 6 of the first byte at `data` (in bf16 the first element's top
/// mantissa bit, the bit the host path's injected corruption flips).
///
/// # Errors
/// `data` past its buffer's end; device errors.
pub fn damage_message<G: Gpu>(gpu: &G, data: Dev<'_, G::Buf>) -> Result<(), GpuError> {
    check_len(gpu, "damage_message", "data", data, 1, DType::Bf16)?;
    gpu.launch("message_damage", [1, 1, 1], [32, 1, 1], 0, &[Arg::Ptr(data)])
}

/// splitmix64's finaliser: a bijection of 64-bit values.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The checksum [`message_checksum`] computes on the device, on the host (its reference).
pub fn message_checksum_host(bytes: &[u8]) -> u64 {
    let words = bytes.chunks(4).enumerate().map(|(i, c)| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        ((i as u64) << 32) | u64::from(u32::from_le_bytes(w))
    });
    words.fold(0u64, |s, x| s.wrapping_add(mix(x)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_damaged_word_always_changes_the_host_checksum() {
        let bytes: Vec<u8> = (0..64u32).flat_map(|i| (i * 2_654_435_761).to_le_bytes()).collect();
        let base = message_checksum_host(&bytes);
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut d = bytes.clone();
                d[byte] ^= 1 << bit;
                assert_ne!(message_checksum_host(&d), base, "flip of bit {bit} of byte {byte} unseen");
            }
        }
        // Two words swapped: their places are in the sum.
        let mut d = bytes.clone();
        d.swap(0, 4);
        d.swap(1, 5);
        d.swap(2, 6);
        d.swap(3, 7);
        assert_ne!(message_checksum_host(&d), base, "two words swapped unseen");
        // A trailing half word counts.
        assert_ne!(message_checksum_host(&bytes[..62]), message_checksum_host(&bytes[..60]));
    }
}
