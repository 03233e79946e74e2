//! Causal multi-head self-attention on the GPU (flash-attention style): twins of
//! `Backend::attention_forward` / `attention_backward`, with two sets of kernels.
//!
//! - **Tensor cores** (`cuda/attention_tc.cu`, [`Path::TensorCore`]): bf16 storage and head sizes
//!   [`TC_HEAD_SIZES`] (64, 128). Every matrix product (forward: Q Kᵀ, P V; backward: Sᵀ, dPᵀ,
//!   dV, dK per key tile and S, dP, dQ per query tile) is a warp-level `mma.sync` m16n8k16 with
//!   bf16 inputs and fp32 accumulation; softmax statistics and accumulators are fp32. P (and dS)
//!   are rounded to bf16 before they enter a product, which the SIMT kernels do not do. Needs
//!   sm_80 or newer (on older GPUs the module still compiles, but these kernels trap).
//! - **SIMT** (`cuda/attention.cu`, [`Path::Simt`]): fp32 arithmetic on CUDA cores, fp32 or bf16
//!   storage, head sizes [`HEAD_SIZES`] (32, 64, 128).
//! - **Fallback** (`cuda/attention_any.cu`): every other head size from 1 to [`MAX_HEAD_SIZE`]
//!   (256), fp32 or bf16 storage, fp32 arithmetic: one thread per row (forward and dQ per query,
//!   dK/dV per key) with the head's vectors in per-thread arrays. Simple and deterministic, not
//!   fast. [`Path::Simt`] runs it for a head size outside [`HEAD_SIZES`] (so does the automatic
//!   choice); [`Path::TensorCore`] refuses such head sizes.
//!
//! [`attention_forward`] / [`attention_backward`] take the tensor-core kernels whenever they apply
//! (bf16, a head size in [`TC_HEAD_SIZES`], `qkv`/`out`/`dout`/`dqkv` 16-byte aligned, which every
//! buffer from `Gpu::alloc` is at offset 0) and the SIMT kernels otherwise. The environment
//! variable **`TROUPE_ATTENTION=simt`** forces the SIMT kernels everywhere (for comparisons on a
//! GPU); `auto` or unset is the default; it is read once per process. [`attention_forward_on`] /
//! [`attention_backward_on`] run an explicit [`Path`]. Both paths write the same outputs with the
//! same meaning, so a forward on one path may be followed by a backward on the other.
//!
//! Dimensions: B batch, T sequence, C channels, NH heads, HS = C / NH head size (1 to 256).
//! `qkv[B,T,3C]` is Q | K | V with heads contiguous inside each; `out[B,T,C]`; `lse[B,NH,T]` is
//! the (natural) log-sum-exp of each softmax row and is always fp32, whatever the storage type of
//! the rest.
//!
//! Memory contract: forward overwrites `out` and `lse`; backward overwrites all of `dqkv` and the
//! caller's scratch `dsum[B,NH,T]` (fp32), which the caller allocates once (the training step
//! does not allocate). `dqkv` must not overlap `qkv`, `out` or `dout`. Both paths are bitwise
//! deterministic (no atomics).
//!
//! Launch geometry: the tile sizes, block sizes and shared memory below mirror the tables at the
//! top of `cuda/attention.cu` and `cuda/attention_tc.cu`; change both together. Every block uses
//! at most 48 KiB of dynamic shared memory, so no launch needs the opt-in attribute for more. The
//! fallback uses none: grid (B·NH, ⌈T / 128⌉), 128 threads (see `cuda/attention_any.cu`).

use std::sync::OnceLock;

use super::check_len;
use crate::gpu::{Arg, DType, Dev, Gpu, GpuError};

/// Head sizes with tiled kernels (every other head size up to [`MAX_HEAD_SIZE`] runs the
/// fallback kernels of `cuda/attention_any.cu`).
pub const HEAD_SIZES: [usize; 3] = [32, 64, 128];

/// The largest head size any attention kernel supports (`ATTN_ANY_MAX_HS` in
/// `cuda/attention_any.cu`).
pub const MAX_HEAD_SIZE: usize = 256;

/// Threads per block of the fallback kernels (`ATTN_ANY_THREADS`), one row each.
const ANY_THREADS: u32 = 128;

/// Head sizes with tensor-core kernels (bf16 storage only).
pub const TC_HEAD_SIZES: [usize; 2] = [64, 128];

/// Which kernels compute an attention call (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// `cuda/attention.cu`: fp32 arithmetic on CUDA cores; fp32 or bf16 storage, [`HEAD_SIZES`];
    /// any other head size up to [`MAX_HEAD_SIZE`] runs the fallback of `cuda/attention_any.cu`.
    Simt,
    /// `cuda/attention_tc.cu`: bf16 `mma.sync` products with fp32 accumulation; bf16 storage,
    /// [`TC_HEAD_SIZES`], 16-byte aligned `qkv`, `out`, `dout` and `dqkv`.
    TensorCore,
}

/// Rows of a tensor-core block's own tile (4 warps × 16 rows) and its threads.
const TC_OWN: usize = 64;
const TC_THREADS: u32 = 128;

/// Whether `TROUPE_ATTENTION=simt` forces the SIMT kernels (read once per process; `auto` or
/// unset chooses; another value is reported once and treated as `auto`).
fn forced_simt() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var("TROUPE_ATTENTION") {
        Ok(v) if v.eq_ignore_ascii_case("simt") => true,
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("auto") => false,
        Ok(v) => {
            tracing::warn!("TROUPE_ATTENTION={v:?} is neither \"simt\" nor \"auto\"; using auto");
            false
        }
        Err(_) => false,
    })
}

/// The path [`attention_forward`] / [`attention_backward`] take for storage `dtype`, head size
/// `hs` and the given device pointers (`qkv`, `out`, and for backward `dout` and `dqkv`).
pub fn auto_path<B>(dtype: DType, hs: usize, ptrs: &[Dev<'_, B>]) -> Path {
    if !forced_simt() && tc_supports(dtype, hs) && ptrs.iter().all(|p| p.offset.is_multiple_of(16)) {
        Path::TensorCore
    } else {
        Path::Simt
    }
}

fn tc_supports(dtype: DType, hs: usize) -> bool {
    dtype == DType::Bf16 && TC_HEAD_SIZES.contains(&hs)
}

/// Checks that the tensor-core kernels can run a call (an explicit [`Path::TensorCore`]).
fn check_tc<B>(
    op: &'static str,
    dtype: DType,
    hs: usize,
    ptrs: &[(&str, Dev<'_, B>)],
) -> Result<(), GpuError> {
    if !tc_supports(dtype, hs) {
        return Err(GpuError::Shape {
            op,
            detail: format!(
                "the tensor-core kernels need bf16 storage and a head size in {TC_HEAD_SIZES:?}, not {dtype:?} and {hs}"
            ),
        });
    }
    for (what, p) in ptrs {
        if !p.offset.is_multiple_of(16) {
            return Err(GpuError::Shape {
                op,
                detail: format!(
                    "{what} at byte offset {} is not 16-byte aligned (tensor-core kernels)",
                    p.offset
                ),
            });
        }
    }
    Ok(())
}

/// Largest dynamic shared memory a block may use without `cuFuncSetAttribute`.
const SMEM_LIMIT: usize = 48 * 1024;

/// Threads per block of the `dsum` kernel: 8 warps, one (b, t, h) row each.
const DSUM_BLOCK: u32 = 256;

/// The three tiled kernels of one head size.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Forward,
    BackwardDkv,
    BackwardDq,
}

/// One tiled kernel's geometry: `tile` rows of T per block, `threads` per block, shared bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    tile: usize,
    threads: u32,
    smem: usize,
}

/// The tile table of `cuda/attention.cu` (`AttnFwdTiles`, `AttnDkvTiles`, `AttnDqTiles`):
/// (rows of the block's own tile, rows of the tiles it loops over, TY). The block has 16·TY
/// threads.
fn tiles(kernel: Kernel, hs: usize) -> Option<(usize, usize, u32)> {
    Some(match (kernel, hs) {
        (Kernel::Forward, 32 | 64) => (64, 64, 16),
        (Kernel::Forward, 128) => (32, 32, 8),
        (Kernel::BackwardDkv, 32) => (64, 32, 16),
        (Kernel::BackwardDkv, 64) => (32, 32, 8),
        (Kernel::BackwardDkv, 128) => (16, 16, 8),
        (Kernel::BackwardDq, 32) => (64, 64, 16),
        (Kernel::BackwardDq, 64) => (64, 32, 16),
        (Kernel::BackwardDq, 128) => (32, 16, 8),
        _ => return None,
    })
}

/// Threads and shared memory of one kernel, as `cuda/attention.cu` lays out its shared tiles.
fn geometry(kernel: Kernel, hs: usize) -> Option<Geometry> {
    let (own, other, ty) = tiles(kernel, hs)?;
    let floats = match kernel {
        // Q tile + K and V tiles + P, which reuses K's space when it fits (BQ ≤ HS).
        Kernel::Forward => (own + 2 * other) * hs + if own <= hs { 0 } else { own * other },
        // K, V (own) + Q, dO (other) + Pᵀ and dSᵀ + lse and D of the query tile.
        Kernel::BackwardDkv => (2 * own + 2 * other) * hs + 2 * own * other + 2 * other,
        // Q, dO (own) + K, V (other) + dS, which reuses V's space when it fits (BQ ≤ HS).
        Kernel::BackwardDq => (2 * own + 2 * other) * hs + if own <= hs { 0 } else { own * other },
    };
    Some(Geometry { tile: own, threads: 16 * ty, smem: floats * 4 })
}

/// The tile table of `cuda/attention_tc.cu` (`AttnTcTiles`): rows of the tiles a block loops over
/// (its own tile is always [`TC_OWN`] rows).
fn tc_tiles(kernel: Kernel, hs: usize) -> Option<usize> {
    Some(match (kernel, hs) {
        (Kernel::Forward, 64 | 128) => 64,
        (Kernel::BackwardDkv | Kernel::BackwardDq, 64) => 64,
        (Kernel::BackwardDkv | Kernel::BackwardDq, 128) => 16,
        _ => return None,
    })
}

/// Threads and shared memory of one tensor-core kernel: bf16 tiles with rows of HS + 8 elements.
fn tc_geometry(kernel: Kernel, hs: usize) -> Option<Geometry> {
    let other = tc_tiles(kernel, hs)?;
    let row = (hs + 8) * 2;
    let bytes = match kernel {
        // K and V tiles (Q lives in registers).
        Kernel::Forward => 2 * other * row,
        // K, V (own) + Q, dO (other) + lse and D of the query tile.
        Kernel::BackwardDkv => (2 * TC_OWN + 2 * other) * row + 2 * other * 4,
        // Q, dO (own) + K, V (other).
        Kernel::BackwardDq => (2 * TC_OWN + 2 * other) * row,
    };
    Some(Geometry { tile: TC_OWN, threads: TC_THREADS, smem: bytes })
}

/// The geometry of one kernel on one path.
fn path_geometry(path: Path, kernel: Kernel, hs: usize) -> Option<Geometry> {
    match path {
        Path::Simt => geometry(kernel, hs),
        Path::TensorCore => tc_geometry(kernel, hs),
    }
}

/// The name of one tiled kernel.
fn kernel_name(path: Path, kernel: Kernel, hs: usize, dtype: DType) -> String {
    let k = match kernel {
        Kernel::Forward => "forward",
        Kernel::BackwardDkv => "backward_dkv",
        Kernel::BackwardDq => "backward_dq",
    };
    let p = match path {
        Path::Simt => "",
        Path::TensorCore => "tc_",
    };
    format!("attention_{p}{k}_hs{hs}_{}", dtype.suffix())
}

/// Checked dimensions of one attention call.
struct Dims {
    hs: usize,
    /// `T` and `NH` as the kernels take them.
    t: i32,
    nh: i32,
}

fn dims(op: &'static str, b: usize, t: usize, c: usize, nh: usize) -> Result<Dims, GpuError> {
    let shape = |detail: String| GpuError::Shape { op, detail };
    if b == 0 || t == 0 || c == 0 || nh == 0 {
        return Err(shape(format!("empty shape: B {b}, T {t}, C {c}, NH {nh}")));
    }
    if !c.is_multiple_of(nh) {
        return Err(shape(format!("C {c} is not a multiple of NH {nh}")));
    }
    let hs = c / nh;
    if hs > MAX_HEAD_SIZE {
        return Err(shape(format!(
            "head size {hs} (C {c} / NH {nh}) exceeds the largest supported head size {MAX_HEAD_SIZE}"
        )));
    }
    // Kernels index with 64-bit offsets but take T, NH and B·NH (grid x) as 32-bit values, and
    // the tile count along T is grid y (at most 65535).
    let too_big = || shape(format!("B {b}, T {t}, NH {nh} exceed the kernels' 32-bit grid limits"));
    let t32 = i32::try_from(t).map_err(|_| too_big())?;
    let nh32 = i32::try_from(nh).map_err(|_| too_big())?;
    let bh = b.checked_mul(nh).ok_or_else(too_big)?;
    let bt = b.checked_mul(t).ok_or_else(too_big)?;
    bt.checked_mul(3 * c).ok_or_else(too_big)?;
    if i32::try_from(bh).is_err() || i32::try_from(bt).is_err() || t.div_ceil(16) > 65535 {
        return Err(too_big());
    }
    Ok(Dims { hs, t: t32, nh: nh32 })
}

/// Launches one tiled kernel over the grid (B·NH, tiles along T).
#[allow(clippy::too_many_arguments)]
fn launch_tiled<G: Gpu>(
    gpu: &G,
    op: &'static str,
    path: Path,
    kernel: Kernel,
    dtype: DType,
    b: usize,
    t: usize,
    d: &Dims,
    args: &[Arg<'_, G::Buf>],
) -> Result<(), GpuError> {
    let g = path_geometry(path, kernel, d.hs).ok_or_else(|| GpuError::Shape {
        op,
        detail: format!("no {path:?} {kernel:?} tiles for head size {}", d.hs),
    })?;
    let name = kernel_name(path, kernel, d.hs, dtype);
    debug_assert!(g.smem <= SMEM_LIMIT, "{kernel:?} hs {}: {} bytes of shared memory", d.hs, g.smem);
    // SAFETY (device memory): the callers' check_len calls cover every element the kernels
    // touch: rows < T of qkv and dqkv (3C wide), of out and dout (C wide), and B·NH·T of lse and
    // dsum. Both grid sizes fit in u32: dims() bounded B·NH and T.
    let grid = [(b * d.nh as usize) as u32, t.div_ceil(g.tile) as u32, 1];
    gpu.launch(&name, grid, [g.threads, 1, 1], g.smem as u32, args)
}

/// Launches one fallback kernel (`attention_any_{forward,backward_dq,backward_dkv}`) over the
/// grid (B·NH, ⌈T / 128⌉) with 128 threads, one row each.
fn launch_any<G: Gpu>(
    gpu: &G,
    kernel: Kernel,
    dtype: DType,
    b: usize,
    t: usize,
    d: &Dims,
    args: &[Arg<'_, G::Buf>],
) -> Result<(), GpuError> {
    let k = match kernel {
        Kernel::Forward => "forward",
        Kernel::BackwardDkv => "backward_dkv",
        Kernel::BackwardDq => "backward_dq",
    };
    // SAFETY (device memory): as launch_tiled; each thread touches its own row < T (and the rows
    // before or after it, < T) of one (b, h). dims() bounded B·NH and T.
    let grid = [(b * d.nh as usize) as u32, t.div_ceil(ANY_THREADS as usize) as u32, 1];
    gpu.launch(&format!("attention_any_{k}_{}", dtype.suffix()), grid, [ANY_THREADS, 1, 1], 0, args)
}

/// Causal attention forward: writes `out[B,T,C]` (storage `dtype`) and `lse[B,NH,T]` (fp32)
/// from `qkv[B,T,3C]` (storage `dtype`), on the tensor cores when they apply (see the module
/// docs and [`auto_path`]).
///
/// # Errors
/// [`GpuError::Shape`] for an empty shape, `C` not a multiple of `NH`, a head size above
/// [`MAX_HEAD_SIZE`], shapes beyond the grid limits or buffers that are too short;
/// launch errors from the device.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    out: Dev<'_, G::Buf>,
    lse: Dev<'_, G::Buf>,
    qkv: Dev<'_, G::Buf>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<(), GpuError> {
    let path = if gpu.tensor_cores() {
        auto_path(dtype, c.checked_div(nh).unwrap_or(0), &[out, qkv])
    } else {
        Path::Simt
    };
    attention_forward_on(gpu, path, dtype, out, lse, qkv, b, t, c, nh)
}

/// [`attention_forward`] on an explicit [`Path`].
///
/// # Errors
/// As [`attention_forward`]; also [`GpuError::Shape`] when `path` is [`Path::TensorCore`] and
/// the storage type, head size or pointer alignment does not suit it.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_on<G: Gpu>(
    gpu: &G,
    path: Path,
    dtype: DType,
    out: Dev<'_, G::Buf>,
    lse: Dev<'_, G::Buf>,
    qkv: Dev<'_, G::Buf>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<(), GpuError> {
    const OP: &str = "attention_forward";
    let d = dims(OP, b, t, c, nh)?;
    check_len(gpu, OP, "out", out, b * t * c, dtype)?;
    check_len(gpu, OP, "lse", lse, b * nh * t, DType::F32)?;
    check_len(gpu, OP, "qkv", qkv, b * t * 3 * c, dtype)?;
    if path == Path::TensorCore {
        check_tc(OP, dtype, d.hs, &[("out", out), ("qkv", qkv)])?;
    }
    if path == Path::Simt && !HEAD_SIZES.contains(&d.hs) {
        let args = [
            Arg::Ptr(out),
            Arg::Ptr(lse),
            Arg::Ptr(qkv),
            Arg::I32(d.t),
            Arg::I32(d.nh),
            Arg::I32(d.hs as i32),
        ];
        return launch_any(gpu, Kernel::Forward, dtype, b, t, &d, &args);
    }
    let args = [Arg::Ptr(out), Arg::Ptr(lse), Arg::Ptr(qkv), Arg::I32(d.t), Arg::I32(d.nh)];
    launch_tiled(gpu, OP, path, Kernel::Forward, dtype, b, t, &d, &args)
}

/// Causal attention backward: overwrites `dqkv[B,T,3C]` from `dout[B,T,C]`, the forward's
/// `out[B,T,C]` and `lse[B,NH,T]`, and `qkv[B,T,3C]`. `dsum` is caller-owned fp32 scratch of
/// `B·NH·T` elements (overwritten with `D = Σ_d dout·out` per row). Three launches: `dsum`,
/// then dK/dV per key tile (row, in the fallback), then dQ per query tile (row) — no atomics, bitwise deterministic. On the
/// tensor cores when they apply (see the module docs and [`auto_path`]).
///
/// # Errors
/// As [`attention_forward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    dqkv: Dev<'_, G::Buf>,
    dsum: Dev<'_, G::Buf>,
    dout: Dev<'_, G::Buf>,
    out: Dev<'_, G::Buf>,
    lse: Dev<'_, G::Buf>,
    qkv: Dev<'_, G::Buf>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<(), GpuError> {
    let path = if gpu.tensor_cores() {
        auto_path(dtype, c.checked_div(nh).unwrap_or(0), &[dqkv, dout, qkv])
    } else {
        Path::Simt
    };
    attention_backward_on(gpu, path, dtype, dqkv, dsum, dout, out, lse, qkv, b, t, c, nh)
}

/// [`attention_backward`] on an explicit [`Path`] (the `dsum` pre-kernel is the same on both).
///
/// # Errors
/// As [`attention_forward_on`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_on<G: Gpu>(
    gpu: &G,
    path: Path,
    dtype: DType,
    dqkv: Dev<'_, G::Buf>,
    dsum: Dev<'_, G::Buf>,
    dout: Dev<'_, G::Buf>,
    out: Dev<'_, G::Buf>,
    lse: Dev<'_, G::Buf>,
    qkv: Dev<'_, G::Buf>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<(), GpuError> {
    const OP: &str = "attention_backward";
    let d = dims(OP, b, t, c, nh)?;
    check_len(gpu, OP, "dqkv", dqkv, b * t * 3 * c, dtype)?;
    check_len(gpu, OP, "dsum", dsum, b * nh * t, DType::F32)?;
    check_len(gpu, OP, "dout", dout, b * t * c, dtype)?;
    check_len(gpu, OP, "out", out, b * t * c, dtype)?;
    check_len(gpu, OP, "lse", lse, b * nh * t, DType::F32)?;
    check_len(gpu, OP, "qkv", qkv, b * t * 3 * c, dtype)?;
    if path == Path::TensorCore {
        check_tc(OP, dtype, d.hs, &[("dqkv", dqkv), ("dout", dout), ("qkv", qkv)])?;
    }
    let sfx = dtype.suffix();

    let rows = b * t * nh;
    let warps = (DSUM_BLOCK / 32) as usize;
    let blocks = u32::try_from(rows.div_ceil(warps))
        .map_err(|_| GpuError::Shape { op: OP, detail: format!("{rows} rows need too many blocks") })?;
    // dims() bounded B·T by i32::MAX.
    let bt = (b * t) as i32;
    // SAFETY (device memory): one warp per (b, t, h) row < B·T·NH of out and dout (checked above).
    gpu.launch(
        &format!("attention_backward_dsum_{sfx}"),
        [blocks, 1, 1],
        [DSUM_BLOCK, 1, 1],
        0,
        &[
            Arg::Ptr(dsum),
            Arg::Ptr(out),
            Arg::Ptr(dout),
            Arg::I32(bt),
            Arg::I32(d.t),
            Arg::I32(d.nh),
            Arg::I32(d.hs as i32),
        ],
    )?;

    if path == Path::Simt && !HEAD_SIZES.contains(&d.hs) {
        let args = [
            Arg::Ptr(dqkv),
            Arg::Ptr(dout),
            Arg::Ptr(qkv),
            Arg::Ptr(lse),
            Arg::Ptr(dsum),
            Arg::I32(d.t),
            Arg::I32(d.nh),
            Arg::I32(d.hs as i32),
        ];
        launch_any(gpu, Kernel::BackwardDkv, dtype, b, t, &d, &args)?;
        return launch_any(gpu, Kernel::BackwardDq, dtype, b, t, &d, &args);
    }
    let args = [
        Arg::Ptr(dqkv),
        Arg::Ptr(dout),
        Arg::Ptr(qkv),
        Arg::Ptr(lse),
        Arg::Ptr(dsum),
        Arg::I32(d.t),
        Arg::I32(d.nh),
    ];
    launch_tiled(gpu, OP, path, Kernel::BackwardDkv, dtype, b, t, &d, &args)?;
    launch_tiled(gpu, OP, path, Kernel::BackwardDq, dtype, b, t, &d, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(BQ, BK, TY)` of `template <> struct {name}<{hs}>` in cuda/attention.cu.
    fn tiles_in_kernel_file(name: &str, hs: usize) -> (usize, usize, u32) {
        let src = crate::gpu::sources::KERNEL_FILES.iter().find(|(f, _)| *f == "attention.cu").unwrap().1;
        let head = format!("template <> struct {name}<{hs}> {{");
        let line = src.lines().find(|l| l.starts_with(&head)).unwrap_or_else(|| panic!("no {head}"));
        let get = |key: &str| -> usize {
            let at =
                line.find(&format!("{key} = ")).unwrap_or_else(|| panic!("{key} in {line}")) + key.len() + 3;
            line[at..].split(|ch: char| !ch.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        (get("BQ"), get("BK"), get("TY") as u32)
    }

    #[test]
    fn the_tile_table_matches_the_kernel_file_and_fits_in_48_kib() {
        for hs in HEAD_SIZES {
            let (bq, bk, ty) = tiles_in_kernel_file("AttnFwdTiles", hs);
            assert_eq!(tiles(Kernel::Forward, hs), Some((bq, bk, ty)), "forward hs {hs}");
            let (bq, bk, ty) = tiles_in_kernel_file("AttnDkvTiles", hs);
            assert_eq!(tiles(Kernel::BackwardDkv, hs), Some((bk, bq, ty)), "dkv hs {hs}");
            let (bq, bk, ty) = tiles_in_kernel_file("AttnDqTiles", hs);
            assert_eq!(tiles(Kernel::BackwardDq, hs), Some((bq, bk, ty)), "dq hs {hs}");
            for k in [Kernel::Forward, Kernel::BackwardDkv, Kernel::BackwardDq] {
                let g = geometry(k, hs).unwrap();
                assert!(g.smem <= SMEM_LIMIT, "{k:?} hs {hs}: {} bytes", g.smem);
                assert!(g.threads.is_multiple_of(32) && g.threads <= 1024, "{k:?} hs {hs}");
            }
        }
        // The sizes quoted in the kernel file's header.
        let kib = |k, hs| geometry(k, hs).unwrap().smem as f64 / 1024.0;
        let fwd = [kib(Kernel::Forward, 32), kib(Kernel::Forward, 64), kib(Kernel::Forward, 128)];
        assert_eq!(fwd, [40.0, 48.0, 48.0]);
        let dkv = [kib(Kernel::BackwardDkv, 32), kib(Kernel::BackwardDkv, 64), kib(Kernel::BackwardDkv, 128)];
        assert_eq!(dkv, [40.25, 40.25, 34.125]);
        let dq = [kib(Kernel::BackwardDq, 32), kib(Kernel::BackwardDq, 64), kib(Kernel::BackwardDq, 128)];
        assert_eq!(dq, [48.0, 48.0, 48.0]);
        assert!(geometry(Kernel::Forward, 96).is_none());
    }

    /// `{key} = N` in the line `template <> struct AttnTcTiles<{hs}> {` of cuda/attention_tc.cu.
    fn tc_tile_in_kernel_file(key: &str, hs: usize) -> usize {
        let src = crate::gpu::sources::KERNEL_FILES.iter().find(|(f, _)| *f == "attention_tc.cu").unwrap().1;
        let head = format!("template <> struct AttnTcTiles<{hs}> {{");
        let line = src.lines().find(|l| l.starts_with(&head)).unwrap_or_else(|| panic!("no {head}"));
        let at = line.find(&format!("{key} = ")).unwrap_or_else(|| panic!("{key} in {line}")) + key.len() + 3;
        line[at..].split(|ch: char| !ch.is_ascii_digit()).next().unwrap().parse().unwrap()
    }

    #[test]
    fn the_tensor_core_tile_table_matches_the_kernel_file_and_fits_in_48_kib() {
        for hs in TC_HEAD_SIZES {
            assert_eq!(tc_tiles(Kernel::Forward, hs), Some(tc_tile_in_kernel_file("FWD_BK", hs)), "hs {hs}");
            assert_eq!(
                tc_tiles(Kernel::BackwardDkv, hs),
                Some(tc_tile_in_kernel_file("DKV_BQ", hs)),
                "hs {hs}"
            );
            assert_eq!(
                tc_tiles(Kernel::BackwardDq, hs),
                Some(tc_tile_in_kernel_file("DQ_BK", hs)),
                "hs {hs}"
            );
        }
        // The sizes quoted in the kernel file's header.
        let kib = |k, hs| tc_geometry(k, hs).unwrap().smem as f64 / 1024.0;
        assert_eq!([kib(Kernel::Forward, 64), kib(Kernel::Forward, 128)], [18.0, 34.0]);
        assert_eq!([kib(Kernel::BackwardDkv, 64), kib(Kernel::BackwardDkv, 128)], [36.5, 42.625]);
        assert_eq!([kib(Kernel::BackwardDq, 64), kib(Kernel::BackwardDq, 128)], [36.0, 42.5]);
        for hs in TC_HEAD_SIZES {
            for k in [Kernel::Forward, Kernel::BackwardDkv, Kernel::BackwardDq] {
                let g = tc_geometry(k, hs).unwrap();
                assert!(g.smem <= SMEM_LIMIT, "{k:?} hs {hs}: {} bytes", g.smem);
                assert_eq!((g.tile, g.threads), (64, 128));
            }
        }
        assert!(tc_geometry(Kernel::Forward, 32).is_none());
        assert_eq!(
            kernel_name(Path::TensorCore, Kernel::BackwardDq, 64, DType::Bf16),
            "attention_tc_backward_dq_hs64_bf16"
        );
        assert_eq!(kernel_name(Path::Simt, Kernel::Forward, 32, DType::F32), "attention_forward_hs32_f32");
    }

    #[test]
    fn the_automatic_path_takes_the_tensor_cores_only_where_they_apply() {
        let buf = ();
        let at0 = Dev::new(&buf);
        let at8 = Dev { buf: &buf, offset: 8 };
        if forced_simt() {
            assert_eq!(auto_path(DType::Bf16, 64, &[at0]), Path::Simt);
            return;
        }
        assert_eq!(auto_path(DType::Bf16, 64, &[at0, at0]), Path::TensorCore);
        assert_eq!(auto_path(DType::Bf16, 128, &[at0]), Path::TensorCore);
        assert_eq!(auto_path(DType::Bf16, 32, &[at0]), Path::Simt);
        assert_eq!(auto_path(DType::F32, 64, &[at0]), Path::Simt);
        assert_eq!(auto_path(DType::Bf16, 64, &[at0, at8]), Path::Simt);
    }
}
