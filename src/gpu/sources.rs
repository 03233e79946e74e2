//! The kernel sources, embedded in the binary so that NVRTC and the emulator find them wherever
//! troupe runs (or, for kernel development, from a directory: [`SOURCES_ENV`]).

use std::borrow::Cow;

use super::GpuError;

/// Prepended to every kernel file (bf16 conversions, warp reductions, the tensor-core helpers).
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

/// Names a directory to read the kernel sources from instead of the copies built into troupe:
/// laid out as the repository's `cuda/` (`prelude.cuh`, `emu/emu.h`, `emu/runtime.cpp` and
/// every file of [`KERNEL_FILES`]). For kernel development — edit a kernel, rerun the emulator
/// or NVRTC, no rebuild of troupe — and `tools/barrier-mutations.sh`. Compiled kernels are
/// cached by the hash of their source text, so edits never meet stale builds.
pub const SOURCES_ENV: &str = "TROUPE_KERNEL_SOURCES";

/// The source of `file` (a path relative to `cuda/`, e.g. "emu/emu.h"), built in (`builtin`)
/// or read from [`SOURCES_ENV`]'s directory when it is set.
///
/// # Errors
/// [`GpuError::Io`] naming the file when the directory lacks it or it cannot be read.
pub fn text(file: &str, builtin: &'static str) -> Result<Cow<'static, str>, GpuError> {
    match std::env::var_os(SOURCES_ENV).filter(|d| !d.is_empty()) {
        None => Ok(Cow::Borrowed(builtin)),
        Some(dir) => {
            let path = std::path::Path::new(&dir).join(file);
            std::fs::read_to_string(&path).map(Cow::Owned).map_err(|source| GpuError::Io {
                op: format!("reading kernel source {} ({SOURCES_ENV})", path.display()),
                source,
            })
        }
    }
}

/// Every kernel file (see [`KERNEL_FILES`]) as [`text`] finds it.
///
/// # Errors
/// As [`text`].
pub fn kernel_files() -> Result<Vec<(&'static str, Cow<'static, str>)>, GpuError> {
    KERNEL_FILES.iter().map(|(name, builtin)| Ok((*name, text(name, builtin)?))).collect()
}

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
