//! The kernel sources, embedded in the binary so that NVRTC and the emulator find them wherever
//! troupe runs.

/// Prepended to every kernel file (bf16 conversions, warp and block reductions).
pub const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");
/// The CUDA subset the CPU emulator provides (see [`crate::gpu::EmuGpu`]).
pub const EMU_HEADER: &str = include_str!("../../cuda/emu/emu.h");
/// The emulator's launcher.
pub const EMU_RUNTIME: &str = include_str!("../../cuda/emu/runtime.cpp");

/// Every kernel file: (file name, source).
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("gelu.cu", include_str!("../../cuda/gelu.cu")),
    ("layernorm.cu", include_str!("../../cuda/layernorm.cu")),
    ("embedding.cu", include_str!("../../cuda/embedding.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("attention_tc.cu", include_str!("../../cuda/attention_tc.cu")),
    ("attention_any.cu", include_str!("../../cuda/attention_any.cu")),
    ("crossentropy.cu", include_str!("../../cuda/crossentropy.cu")),
    ("optim.cu", include_str!("../../cuda/optim.cu")),
    ("checksum.cu", include_str!("../../cuda/checksum.cu")),
];

/// A stable 64-bit FNV-1a hash of some texts (cache keys for compiled kernels).
pub fn hash_texts(texts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in texts {
        for &b in t.as_bytes().iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
