//! LayerNorm on the GPU (`cuda/layernorm.cu`): twins of `Backend::layernorm_forward`,
//! `residual_layernorm_forward` and `layernorm_backward`.
//!
//! Shapes: activations `[rows, C]` (rows = B·T) and parameters `[C]` of `dtype`; `mean`, `rstd`
//! `[rows]` fp32. The parameter gradients `dweight`, `dbias` `[C]` are **fp32 for either dtype**
//! (Megatron's rule: parameter gradients are accumulated in fp32 across microbatches), while the
//! activation gradients `dout`, `dinp` are of `dtype`. Forward overwrites its outputs; backward
//! **accumulates** into `dinp` (a bf16 `dinp` is rounded once per call), `dweight` and `dbias`
//! (added to in fp32, never rounded to bf16).
//!
//! Geometry: forward runs one warp per row, [`LN_BLOCK`] / 32 rows per block. Backward runs
//! blocks of [`backward_rows_per_block`] rows (one warp per row for `dinp`, thread-per-channel
//! partial sums of `dweight`/`dbias` per block), then a reduce kernel adds the partials in block
//! order. The block split depends only on `rows`, so results are bitwise reproducible on any GPU.
//!
//! Scratch: the per-block partials live in an fp32 buffer the **caller** allocates once
//! ([`backward_scratch_len`] floats), so the training step does not allocate.
//!
//! Aliasing: outputs must not overlap inputs (the kernels declare their pointers `__restrict__`,
//! and the CPU twins take `&mut` and `&` slices): no in-place LayerNorm, `resid` apart from `a`
//! and `b`, `dinp` apart from `dout` and `inp`.
//!
//! The `_vec` kernels (16-byte accesses) are chosen when C is a multiple of 16 / element size and
//! every pointer's byte offset is a multiple of 16; buffers themselves are assumed 16-byte aligned
//! (`cudaMalloc` gives 256; the emulator does not need it).

use super::check_len;
use crate::gpu::{Arg, DType, Dev, Gpu, GpuError};

/// Threads per block of the forward and backward kernels (8 warps).
pub const LN_BLOCK: u32 = 256;
/// Threads per block of the partial-sum reduction.
pub const LN_REDUCE_BLOCK: u32 = 256;

/// Rows per block of the backward: at least 16 (two rows per warp), more for very long inputs so
/// that at most ~2048 blocks write partials (the reduce kernel reads `blocks × 2C` floats).
pub fn backward_rows_per_block(rows: usize) -> usize {
    rows.div_ceil(2048).next_multiple_of(8).max(16)
}

/// Blocks of the backward for `rows` rows.
pub fn backward_blocks(rows: usize) -> usize {
    rows.div_ceil(backward_rows_per_block(rows))
}

/// fp32 elements of scratch [`layernorm_backward`] needs: `blocks × 2C`.
pub fn backward_scratch_len(rows: usize, c: usize) -> usize {
    backward_blocks(rows) * 2 * c
}

/// Checks `rows` and `c` are non-zero and fit the kernels' 32-bit parameters.
fn dims(op: &'static str, rows: usize, c: usize) -> Result<(u32, u32), GpuError> {
    if rows == 0 || c == 0 {
        return Err(GpuError::Shape { op, detail: format!("empty input: {rows} rows of {c} channels") });
    }
    let too_big = |what: &str, n: usize| GpuError::Shape {
        op,
        detail: format!("{what} = {n} does not fit in 32 bits"),
    };
    let r = u32::try_from(rows).map_err(|_| too_big("rows", rows))?;
    let c32 = u32::try_from(c).map_err(|_| too_big("C", c))?;
    Ok((r, c32))
}

/// The `_vec` variant's requirements (see the module docs).
fn vectorizable(dtype: DType, c: usize, offsets: &[usize]) -> bool {
    c.is_multiple_of(16 / dtype.size()) && offsets.iter().all(|o| o.is_multiple_of(16))
}

fn kernel(base: &str, dtype: DType, vec: bool) -> String {
    format!("{base}_{}{}", if vec { "vec_" } else { "" }, dtype.suffix())
}

/// `out = (inp − mean) · rstd · weight + bias` per row of `c` channels (eps 1e-5); writes the
/// fp32 `mean` and `rstd` of every row.
///
/// # Errors
/// [`GpuError::Shape`] when a buffer is too short or a dimension is zero or too large.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    out: Dev<'_, G::Buf>,
    mean: Dev<'_, G::Buf>,
    rstd: Dev<'_, G::Buf>,
    inp: Dev<'_, G::Buf>,
    weight: Dev<'_, G::Buf>,
    bias: Dev<'_, G::Buf>,
    rows: usize,
    c: usize,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm_forward";
    let (rows32, c32) = dims(OP, rows, c)?;
    for (what, d, n, dt) in [
        ("out", out, rows * c, dtype),
        ("inp", inp, rows * c, dtype),
        ("weight", weight, c, dtype),
        ("bias", bias, c, dtype),
        ("mean", mean, rows, DType::F32),
        ("rstd", rstd, rows, DType::F32),
    ] {
        check_len(gpu, OP, what, d, n, dt)?;
    }
    let vec = vectorizable(dtype, c, &[out.offset, inp.offset, weight.offset, bias.offset]);
    gpu.launch(
        &kernel("layernorm_forward", dtype, vec),
        forward_grid(OP, rows)?,
        [LN_BLOCK, 1, 1],
        0,
        &[
            Arg::Ptr(out),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::Ptr(inp),
            Arg::Ptr(weight),
            Arg::Ptr(bias),
            Arg::U32(rows32),
            Arg::U32(c32),
        ],
    )
}

/// Fused residual add and LayerNorm: `resid = a + b` (stored as `dtype`), then
/// `out = LN(resid)` of the stored values, with `mean` and `rstd`.
///
/// # Errors
/// [`GpuError::Shape`] when a buffer is too short or a dimension is zero or too large.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    resid: Dev<'_, G::Buf>,
    out: Dev<'_, G::Buf>,
    mean: Dev<'_, G::Buf>,
    rstd: Dev<'_, G::Buf>,
    a: Dev<'_, G::Buf>,
    b: Dev<'_, G::Buf>,
    weight: Dev<'_, G::Buf>,
    bias: Dev<'_, G::Buf>,
    rows: usize,
    c: usize,
) -> Result<(), GpuError> {
    const OP: &str = "residual_layernorm_forward";
    let (rows32, c32) = dims(OP, rows, c)?;
    for (what, d, n, dt) in [
        ("resid", resid, rows * c, dtype),
        ("out", out, rows * c, dtype),
        ("a", a, rows * c, dtype),
        ("b", b, rows * c, dtype),
        ("weight", weight, c, dtype),
        ("bias", bias, c, dtype),
        ("mean", mean, rows, DType::F32),
        ("rstd", rstd, rows, DType::F32),
    ] {
        check_len(gpu, OP, what, d, n, dt)?;
    }
    let vec =
        vectorizable(dtype, c, &[resid.offset, out.offset, a.offset, b.offset, weight.offset, bias.offset]);
    gpu.launch(
        &kernel("residual_layernorm_forward", dtype, vec),
        forward_grid(OP, rows)?,
        [LN_BLOCK, 1, 1],
        0,
        &[
            Arg::Ptr(resid),
            Arg::Ptr(out),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::Ptr(a),
            Arg::Ptr(b),
            Arg::Ptr(weight),
            Arg::Ptr(bias),
            Arg::U32(rows32),
            Arg::U32(c32),
        ],
    )
}

fn forward_grid(op: &'static str, rows: usize) -> Result<[u32; 3], GpuError> {
    let blocks = rows.div_ceil((LN_BLOCK / 32) as usize);
    let x = u32::try_from(blocks)
        .map_err(|_| GpuError::Shape { op, detail: format!("{rows} rows need more than 2^32 blocks") })?;
    Ok([x, 1, 1])
}

/// LayerNorm backward: `dinp += ∂L/∂inp`, `dweight += Σ_rows dout · norm`,
/// `dbias += Σ_rows dout`, from the forward's `mean` and `rstd`. `dinp`, `dout`, `inp` and
/// `weight` are of `dtype`; `dweight` and `dbias` are fp32 whatever `dtype` is. `scratch` holds
/// [`backward_scratch_len`]`(rows, c)` fp32 values; its contents on entry do not matter.
///
/// # Errors
/// [`GpuError::Shape`] when a buffer is too short or a dimension is zero or too large.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    dinp: Dev<'_, G::Buf>,
    dweight: Dev<'_, G::Buf>,
    dbias: Dev<'_, G::Buf>,
    scratch: Dev<'_, G::Buf>,
    dout: Dev<'_, G::Buf>,
    inp: Dev<'_, G::Buf>,
    weight: Dev<'_, G::Buf>,
    mean: Dev<'_, G::Buf>,
    rstd: Dev<'_, G::Buf>,
    rows: usize,
    c: usize,
) -> Result<(), GpuError> {
    const OP: &str = "layernorm_backward";
    let (rows32, c32) = dims(OP, rows, c)?;
    let rpb = backward_rows_per_block(rows);
    let blocks = backward_blocks(rows);
    for (what, d, n, dt) in [
        ("dinp", dinp, rows * c, dtype),
        ("dout", dout, rows * c, dtype),
        ("inp", inp, rows * c, dtype),
        ("dweight", dweight, c, DType::F32),
        ("dbias", dbias, c, DType::F32),
        ("weight", weight, c, dtype),
        ("mean", mean, rows, DType::F32),
        ("rstd", rstd, rows, DType::F32),
        ("scratch", scratch, blocks * 2 * c, DType::F32),
    ] {
        check_len(gpu, OP, what, d, n, dt)?;
    }
    if 2 * c > u32::MAX as usize {
        return Err(GpuError::Shape { op: OP, detail: format!("2C = {} does not fit in 32 bits", 2 * c) });
    }
    // rpb ≤ rows and blocks ≤ rows, both checked to fit u32 by `dims`.
    let (rpb32, blocks32) = (rpb as u32, blocks as u32);
    let vec = vectorizable(dtype, c, &[dinp.offset, dout.offset, inp.offset, weight.offset, scratch.offset]);
    gpu.launch(
        &kernel("layernorm_backward", dtype, vec),
        [blocks32, 1, 1],
        [LN_BLOCK, 1, 1],
        0,
        &[
            Arg::Ptr(dinp),
            Arg::Ptr(scratch),
            Arg::Ptr(dout),
            Arg::Ptr(inp),
            Arg::Ptr(weight),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::U32(rows32),
            Arg::U32(c32),
            Arg::U32(rpb32),
        ],
    )?;
    gpu.launch(
        &format!("layernorm_backward_reduce_{}", dtype.suffix()),
        [(2 * c).div_ceil(32) as u32, 1, 1],
        [LN_REDUCE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(dweight), Arg::Ptr(dbias), Arg::Ptr(scratch), Arg::U32(blocks32), Arg::U32(c32)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_blocks_cover_every_row_once() {
        for rows in [1, 15, 16, 17, 100, 8192, 16_384, 16_385, 1 << 20] {
            let rpb = backward_rows_per_block(rows);
            let blocks = backward_blocks(rows);
            assert!(rpb >= 16 && rpb.is_multiple_of(8), "{rows}: {rpb}");
            assert!(blocks * rpb >= rows && (blocks - 1) * rpb < rows, "{rows}: {blocks} × {rpb}");
            assert!(blocks <= 2048, "{rows}: {blocks}");
        }
        assert_eq!(backward_scratch_len(8192, 768), 512 * 2 * 768);
    }

    #[test]
    fn vector_kernels_need_whole_packs_and_aligned_offsets() {
        assert!(vectorizable(DType::F32, 48, &[0, 16, 4096]));
        assert!(!vectorizable(DType::F32, 50, &[0]));
        assert!(!vectorizable(DType::Bf16, 52, &[0]));
        assert!(vectorizable(DType::Bf16, 56, &[32]));
        assert!(!vectorizable(DType::F32, 48, &[0, 8]));
        assert_eq!(kernel("layernorm_forward", DType::Bf16, true), "layernorm_forward_vec_bf16");
        assert_eq!(kernel("layernorm_backward", DType::F32, false), "layernorm_backward_f32");
    }
}
