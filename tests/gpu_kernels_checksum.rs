//! The message checksum kernel (cuda/checksum.cu) against its host reference
//! (`message_checksum_host`), in the CPU emulator everywhere and on a real GPU when one is
//! present (otherwise that half prints SKIPPED): integer sums, so the results are equal, not
//! close. Sizes cover a lone half word, a partial block, and a message past the grid's 1024
//! blocks (each thread then sums several words). Also: damage (one flipped bit) always changes
//! the checksum, and bad arguments are errors.

use troupe::gpu::ops::checksum::{damage_message, message_checksum, message_checksum_host};
use troupe::gpu::{Dev, Gpu};

#[path = "common/lcg.rs"]
mod lcg;

fn message(bytes: usize, seed: u64) -> Vec<u8> {
    let mut g = lcg::Lcg::new(seed);
    (0..bytes).map(|_| (g.next_u64() >> 56) as u8).collect()
}

fn device_checksum<G: Gpu>(gpu: &G, data: &G::Buf, offset: usize, bytes: usize) -> u64 {
    let out = gpu.alloc(16).unwrap();
    message_checksum(gpu, Dev { buf: data, offset }, bytes, Dev { buf: &out, offset: 8 }).unwrap();
    let mut raw = [0u8; 16];
    gpu.download(&out, 0, &mut raw).unwrap();
    assert_eq!(u64::from_le_bytes(raw[..8].try_into().unwrap()), 0, "wrote outside its slot");
    u64::from_le_bytes(raw[8..].try_into().unwrap())
}

fn check<G: Gpu>(gpu: &G, label: &str) {
    let big = 1024 * 256 * 4 * 3 / 2 + 6; // past 1024 blocks of 256 words, a half word at the end
    for bytes in [2, 4, 6, 1000, 4098, big] {
        let host = message(bytes + 8, bytes as u64);
        let mut buf = gpu.alloc(host.len()).unwrap();
        gpu.upload(&mut buf, 0, &host).unwrap();
        for offset in [0, 8] {
            let want = message_checksum_host(&host[offset..offset + bytes]);
            let got = device_checksum(gpu, &buf, offset, bytes);
            assert_eq!(got, want, "{label}: {bytes} bytes at offset {offset}: {got:016x} vs {want:016x}");
        }
        // Damage: one bit of the first byte, seen by the checksum, and the host twin agrees.
        damage_message(gpu, Dev { buf: &buf, offset: 8 }).unwrap();
        let mut damaged = vec![0u8; host.len()];
        gpu.download(&buf, 0, &mut damaged).unwrap();
        assert_eq!(damaged[8], host[8] ^ 0x40, "{label}: damage flips bit 6 of the first byte");
        assert_eq!(damaged[..8], host[..8], "{label}: damage stays in its message");
        assert_eq!(damaged[9..], host[9..], "{label}: damage is one byte");
        let got = device_checksum(gpu, &buf, 8, bytes);
        assert_eq!(got, message_checksum_host(&damaged[8..8 + bytes]), "{label}: damaged, {bytes} bytes");
        assert_ne!(got, message_checksum_host(&host[8..8 + bytes]), "{label}: damage unseen, {bytes} bytes");
    }
    // Bad arguments: an odd or empty message, misaligned data or slot, past the buffer.
    let (buf, out) = (gpu.alloc(64).unwrap(), gpu.alloc(16).unwrap());
    let d = |offset| Dev { buf: &buf, offset };
    let o = |offset| Dev { buf: &out, offset };
    for (data, bytes, slot, needle) in [
        (d(0), 3, o(0), "3 bytes"),
        (d(0), 0, o(0), "0 bytes"),
        (d(2), 8, o(0), "4-byte alignment"),
        (d(0), 8, o(4), "needs 8"),
        (d(0), 72, o(0), "the buffer has 64"),
        (d(0), 8, o(16), "the buffer has 16"),
    ] {
        let err = message_checksum(gpu, data, bytes, slot).unwrap_err().to_string();
        assert!(err.contains("message_checksum") && err.contains(needle), "{label}: {err}");
    }
}

#[test]
fn message_checksums_match_the_host_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check(emu, "emulator");
}

#[test]
fn message_checksums_match_the_host_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check(gpu, "cuda");
}
