//! Optimizer-side operations on the GPU (`cuda/optim.cu`): AdamW on fp32 master weights, the sum
//! of squares behind the global gradient norm, `scale`, `add_assign`, fp32 ↔ bf16 casts and the
//! bias gradient of a linear layer. Twins of `Backend::adamw`, `sum_squares`, `scale`,
//! `add_assign` and the `dbias` half of `matmul_backward_weight`.
//!
//! Dimensions: `n` elements of a flat buffer; for the bias gradient `rows` rows of `dout[rows, n]`.
//!
//! Scratch memory is the **caller's**, allocated once (the training step does not allocate): the
//! sum of squares needs [`sum_squares_scratch_bytes`] bytes, the bias gradient
//! [`bias_grad_scratch_elems`] fp32 elements. All results are deterministic: reductions run in an
//! order fixed by the shapes (the launch geometry is a function of the shapes only).

use super::{ELEMENTWISE_BLOCK, check_len};
use crate::gpu::{Arg, DType, Dev, Gpu, GpuError};
use crate::kernels::AdamWStep;

/// Elements per vector access in `cuda/optim.cu` (`OPTIM_W`).
const PACK: usize = 4;
/// Elementwise grids stop growing here (grid-stride loops cover the rest).
const MAX_ELEMENTWISE_BLOCKS: usize = 16 * 1024;
/// At most this many double partials per buffer in the sum of squares.
pub const SUM_SQUARES_MAX_PARTIALS: usize = 1024;
/// Elements summed per thread (at least) before the sum of squares uses another block.
const SUM_SQUARES_PER_THREAD: usize = 16;
/// Threads of the one block that sums the partials.
const FINISH_BLOCK: u32 = 256;
/// Bias gradient, partial kernel: columns per block (`BIAS_COLS`: 32 lanes × 8 columns, for
/// either dtype) and warps per block, one per row phase (`BIAS_WARPS`).
const BIAS_COLS: usize = 256;
const BIAS_WARPS: u32 = 16;
/// Bias gradient: rows per chunk at least (16 phases × 4 rows loaded per batch, `BIAS_UNROLL`).
const BIAS_MIN_ROWS_PER_CHUNK: usize = 64;
/// Bias gradient: blocks per partial launch aimed at (column tiles × chunks, never more): two
/// 512-thread blocks on each of an H100's 132 SMs, one wave. Also the most chunks there can be.
const BIAS_TARGET_BLOCKS: usize = 2 * 132;

fn shape(op: &'static str, detail: String) -> GpuError {
    GpuError::Shape { op, detail }
}

/// A grid-stride grid for `n` elements (`n > 0`).
fn stride_grid(n: usize) -> [u32; 3] {
    let blocks = n.div_ceil(ELEMENTWISE_BLOCK as usize * PACK).clamp(1, MAX_ELEMENTWISE_BLOCKS);
    [blocks as u32, 1, 1]
}

/// Checks that `d` has room for `doubles` f64 values and is 8-byte aligned.
fn check_f64<G: Gpu>(
    gpu: &G,
    op: &'static str,
    what: &str,
    d: Dev<'_, G::Buf>,
    doubles: usize,
) -> Result<(), GpuError> {
    let (need, have) = (d.offset + 8 * doubles, gpu.buf_len(d.buf));
    if need > have {
        return Err(shape(
            op,
            format!("{what}: {doubles} × f64 at byte {} needs {need} bytes, the buffer has {have}", d.offset),
        ));
    }
    if !d.offset.is_multiple_of(8) {
        return Err(shape(op, format!("{what} at byte {} is not 8-byte aligned", d.offset)));
    }
    Ok(())
}

/// The buffers of one AdamW update of `n` parameters.
pub struct AdamWBufs<'a, B> {
    /// fp32 master weights, updated in place.
    pub params: Dev<'a, B>,
    /// fp32 first moments, updated in place.
    pub m: Dev<'a, B>,
    /// fp32 second moments, updated in place.
    pub v: Dev<'a, B>,
    /// Gradients, stored as `grad_dtype`.
    pub grads: Dev<'a, B>,
    pub grad_dtype: DType,
    /// The model's copy of the parameters and its storage type, overwritten with the updated
    /// values; `None` writes no copy (the model reads the master weights).
    pub copy: Option<(Dev<'a, B>, DType)>,
}

/// One AdamW step (PyTorch semantics, the CPU backend's order of operations) on `n` parameters,
/// with the gradient multiplied by `grad_scale` first (gradient clipping; 1.0 changes nothing).
/// Bias corrections are computed here in fp32 exactly as the CPU backend computes them.
///
/// # Errors
/// [`GpuError::Shape`] for a short buffer or `h.step == 0`; launch errors.
pub fn adamw<G: Gpu>(
    gpu: &G,
    b: &AdamWBufs<'_, G::Buf>,
    n: usize,
    h: &AdamWStep,
    grad_scale: f32,
) -> Result<(), GpuError> {
    const OP: &str = "adamw";
    let (step_size, bc2_sqrt, decay) = adamw_scalars(OP, h)?;
    for (what, d) in [("params", b.params), ("m", b.m), ("v", b.v)] {
        check_len(gpu, OP, what, d, n, DType::F32)?;
    }
    check_len(gpu, OP, "grads", b.grads, n, b.grad_dtype)?;
    if let Some((c, dt)) = b.copy {
        check_len(gpu, OP, "copy", c, n, dt)?;
    }
    if n == 0 {
        return Ok(());
    }
    let (mut args, copy_dtype) = adamw_args(b, h, (step_size, bc2_sqrt, decay), grad_scale);
    args.push(Arg::U64(n as u64));
    let kernel = format!("adamw_grad_{}_copy_{}", b.grad_dtype.suffix(), copy_dtype.suffix());
    gpu.launch(&kernel, stride_grid(n), [ELEMENTWISE_BLOCK, 1, 1], 0, &args)
}

/// Most runs [`adamw_runs`] takes (`OPTIM_MAX_RUNS` in `cuda/optim.cu`).
pub const ADAMW_MAX_RUNS: usize = 1024;

/// An arena's runs of consecutive tensors with the same weight-decay flag, on the device: what
/// [`adamw_runs`] updates in one launch.
pub struct DecayRuns<B> {
    starts: B,
    flags: B,
    runs: u32,
    len: usize,
}

impl<B> DecayRuns<B> {
    /// The runs of tensors given in arena order as (offset, length, decays); `None` when the
    /// tensors do not tile the arena from 0 in order, there are more than [`ADAMW_MAX_RUNS`]
    /// runs, or no elements (the caller then updates tensor by tensor).
    ///
    /// # Errors
    /// Device errors.
    pub fn new<G: Gpu<Buf = B>>(
        gpu: &G,
        tensors: impl IntoIterator<Item = (usize, usize, bool)>,
    ) -> Result<Option<Self>, GpuError> {
        let (mut starts, mut flags, mut len) = (Vec::<u64>::new(), Vec::<u32>::new(), 0usize);
        for (offset, n, decay) in tensors {
            if offset != len {
                return Ok(None);
            }
            if n == 0 {
                continue;
            }
            if flags.last() != Some(&u32::from(decay)) {
                starts.push(len as u64);
                flags.push(u32::from(decay));
            }
            len += n;
        }
        if starts.is_empty() || starts.len() > ADAMW_MAX_RUNS {
            return Ok(None);
        }
        let mut sbuf = gpu.alloc(8 * starts.len())?;
        gpu.upload(&mut sbuf, 0, bytemuck::cast_slice(&starts))?;
        let mut fbuf = gpu.alloc(4 * flags.len())?;
        gpu.upload(&mut fbuf, 0, bytemuck::cast_slice(&flags))?;
        Ok(Some(DecayRuns { starts: sbuf, flags: fbuf, runs: starts.len() as u32, len }))
    }

    /// Elements the runs cover.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the runs cover nothing (never: `new` returns `None` then).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of runs.
    pub fn runs(&self) -> usize {
        self.runs as usize
    }
}

/// [`adamw`] of a whole arena in one launch: elements in runs whose flag is set get the weight
/// decay of `h` (`h.weight_decay`), the others none — the bits of one [`adamw`] per tensor.
/// Gradients are fp32 (the models' gradient type).
///
/// # Errors
/// [`GpuError::Shape`] for short buffers, gradients not fp32 or `h.step == 0`; launch errors.
pub fn adamw_runs<G: Gpu>(
    gpu: &G,
    b: &AdamWBufs<'_, G::Buf>,
    runs: &DecayRuns<G::Buf>,
    h: &AdamWStep,
    grad_scale: f32,
) -> Result<(), GpuError> {
    const OP: &str = "adamw_runs";
    let n = runs.len;
    if b.grad_dtype != DType::F32 {
        return Err(shape(OP, "gradients must be fp32".into()));
    }
    let (step_size, bc2_sqrt, decay) = adamw_scalars(OP, h)?;
    for (what, d) in [("params", b.params), ("m", b.m), ("v", b.v), ("grads", b.grads)] {
        check_len(gpu, OP, what, d, n, DType::F32)?;
    }
    if let Some((c, dt)) = b.copy {
        check_len(gpu, OP, "copy", c, n, dt)?;
    }
    let (mut args, copy_dtype) = adamw_args(b, h, (step_size, bc2_sqrt, decay), grad_scale);
    args.extend([
        Arg::Ptr(Dev::new(&runs.starts)),
        Arg::Ptr(Dev::new(&runs.flags)),
        Arg::U32(runs.runs),
        Arg::U64(n as u64),
    ]);
    let kernel = format!("adamw_runs_grad_f32_copy_{}", copy_dtype.suffix());
    gpu.launch(&kernel, stride_grid(n), [ELEMENTWISE_BLOCK, 1, 1], 0, &args)
}

/// The arguments both AdamW kernels start with (buffers, then the step's scalars), and the
/// copy's storage type for the kernel name.
fn adamw_args<'a, B>(
    b: &AdamWBufs<'a, B>,
    h: &AdamWStep,
    (step_size, bc2_sqrt, decay): (f32, f32, f32),
    grad_scale: f32,
) -> (Vec<Arg<'a, B>>, DType) {
    let (copy_arg, copy_dtype) = match b.copy {
        Some((c, dt)) => (Arg::Ptr(c), dt),
        // A null pointer: kernel pointer parameters are 8-byte values on both GPU and emulator.
        None => (Arg::U64(0), DType::F32),
    };
    let args = vec![
        Arg::Ptr(b.params),
        Arg::Ptr(b.m),
        Arg::Ptr(b.v),
        copy_arg,
        Arg::Ptr(b.grads),
        Arg::F32(h.beta1),
        Arg::F32(h.beta2),
        Arg::F32(h.eps),
        Arg::F32(step_size),
        Arg::F32(bc2_sqrt),
        Arg::F32(decay),
        Arg::F32(grad_scale),
    ];
    (args, copy_dtype)
}

/// AdamW's per-step scalars as the CPU backend computes them (fp32): step size, √(1 − β2^t),
/// decay factor.
fn adamw_scalars(op: &'static str, h: &AdamWStep) -> Result<(f32, f32, f32), GpuError> {
    if h.step == 0 {
        return Err(shape(op, "step is 1-based (bias correction divides by 1 − β^step)".into()));
    }
    let step =
        i32::try_from(h.step).map_err(|_| shape(op, format!("step {} does not fit in i32", h.step)))?;
    let bc1 = 1.0 - h.beta1.powi(step);
    let bc2_sqrt = (1.0 - h.beta2.powi(step)).sqrt();
    Ok((h.lr / bc1, bc2_sqrt, 1.0 - h.lr * h.weight_decay))
}

/// How many double partials [`sum_squares_partials`] writes for `n` elements.
pub fn sum_squares_partial_count(n: usize) -> usize {
    n.div_ceil(ELEMENTWISE_BLOCK as usize * SUM_SQUARES_PER_THREAD).clamp(1, SUM_SQUARES_MAX_PARTIALS)
}

/// Scratch bytes for [`sum_squares_many`] over buffers of these lengths (one double for the total,
/// then the partials of every buffer); with one length, what [`sum_squares`] needs.
pub fn sum_squares_scratch_bytes(lens: impl IntoIterator<Item = usize>) -> usize {
    8 * (1 + lens.into_iter().map(sum_squares_partial_count).sum::<usize>())
}

/// Writes [`sum_squares_partial_count`]`(n)` double partials of `Σ x²` over `x[n]` (storage
/// `dtype`) to `partials` (8-byte aligned); returns how many. Partials of several buffers written
/// side by side and summed by one [`sum_squares_finish`] give a global gradient norm.
///
/// # Errors
/// [`GpuError::Shape`] for short or misaligned buffers; launch errors.
pub fn sum_squares_partials<G: Gpu>(
    gpu: &G,
    dtype: DType,
    partials: Dev<'_, G::Buf>,
    x: Dev<'_, G::Buf>,
    n: usize,
) -> Result<usize, GpuError> {
    const OP: &str = "sum_squares_partials";
    let count = sum_squares_partial_count(n);
    check_len(gpu, OP, "x", x, n, dtype)?;
    check_f64(gpu, OP, "partials", partials, count)?;
    gpu.launch(
        &format!("sum_squares_partial_{}", dtype.suffix()),
        [count as u32, 1, 1],
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(partials), Arg::Ptr(x), Arg::U64(n as u64)],
    )?;
    Ok(count)
}

/// `out[0] = Σ partials[0..count)` (doubles, 8-byte aligned), summed in a fixed order by one block.
///
/// # Errors
/// [`GpuError::Shape`] for short or misaligned buffers or `count == 0`; launch errors.
pub fn sum_squares_finish<G: Gpu>(
    gpu: &G,
    out: Dev<'_, G::Buf>,
    partials: Dev<'_, G::Buf>,
    count: usize,
) -> Result<(), GpuError> {
    const OP: &str = "sum_squares_finish";
    let c = u32::try_from(count)
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| shape(OP, format!("{count} partials: need 1 to 2^32 − 1")))?;
    check_f64(gpu, OP, "out", out, 1)?;
    check_f64(gpu, OP, "partials", partials, count)?;
    gpu.launch(
        "sum_squares_finish",
        [1, 1, 1],
        [FINISH_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(out), Arg::Ptr(partials), Arg::U32(c)],
    )
}

/// `Σ x²` over `x[n]` (storage `dtype`), accumulated in double, returned to the host.
/// `scratch` holds [`sum_squares_scratch_bytes`]`([n])` bytes, 8-byte aligned.
///
/// # Errors
/// As [`sum_squares_many`].
pub fn sum_squares<G: Gpu>(
    gpu: &G,
    dtype: DType,
    x: Dev<'_, G::Buf>,
    n: usize,
    scratch: Dev<'_, G::Buf>,
) -> Result<f64, GpuError> {
    sum_squares_many(gpu, &[(dtype, x, n)], scratch)
}

/// `Σ x²` over several buffers `(dtype, x, n)` (the global gradient norm squared), in double and
/// in a fixed order, returned to the host. `scratch` holds [`sum_squares_scratch_bytes`] of the
/// lengths, 8-byte aligned.
///
/// # Errors
/// [`GpuError::Shape`] for no buffers, short or misaligned buffers; launch and copy errors.
pub fn sum_squares_many<G: Gpu>(
    gpu: &G,
    parts: &[(DType, Dev<'_, G::Buf>, usize)],
    scratch: Dev<'_, G::Buf>,
) -> Result<f64, GpuError> {
    const OP: &str = "sum_squares";
    if parts.is_empty() {
        return Err(shape(OP, "no buffers".into()));
    }
    let need = sum_squares_scratch_bytes(parts.iter().map(|p| p.2));
    check_f64(gpu, OP, "scratch", scratch, need / 8)?;
    let mut count = 0;
    for &(dtype, x, n) in parts {
        count += sum_squares_partials(
            gpu,
            dtype,
            Dev { buf: scratch.buf, offset: scratch.offset + 8 * (1 + count) },
            x,
            n,
        )?;
    }
    sum_squares_finish(gpu, scratch, Dev { buf: scratch.buf, offset: scratch.offset + 8 }, count)?;
    let mut bytes = [0u8; 8];
    gpu.download(scratch.buf, scratch.offset, &mut bytes)?;
    Ok(f64::from_le_bytes(bytes))
}

/// `x *= s` over `n` elements of `dtype`.
///
/// # Errors
/// [`GpuError::Shape`] for a short buffer; launch errors.
pub fn scale<G: Gpu>(gpu: &G, dtype: DType, x: Dev<'_, G::Buf>, s: f32, n: usize) -> Result<(), GpuError> {
    const OP: &str = "scale";
    check_len(gpu, OP, "x", x, n, dtype)?;
    if n == 0 {
        return Ok(());
    }
    gpu.launch(
        &format!("scale_{}", dtype.suffix()),
        stride_grid(n),
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(x), Arg::F32(s), Arg::U64(n as u64)],
    )
}

/// `dst += src` over `n` elements of `dtype` (fp32 arithmetic, rounded once to `dtype`).
///
/// # Errors
/// [`GpuError::Shape`] for a short buffer; launch errors.
pub fn add_assign<G: Gpu>(
    gpu: &G,
    dtype: DType,
    dst: Dev<'_, G::Buf>,
    src: Dev<'_, G::Buf>,
    n: usize,
) -> Result<(), GpuError> {
    const OP: &str = "add_assign";
    check_len(gpu, OP, "dst", dst, n, dtype)?;
    check_len(gpu, OP, "src", src, n, dtype)?;
    if n == 0 {
        return Ok(());
    }
    gpu.launch(
        &format!("add_{}", dtype.suffix()),
        stride_grid(n),
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(dst), Arg::Ptr(src), Arg::U64(n as u64)],
    )
}

/// `out = inp` converted from `in_dtype` to `out_dtype` (fp32 → bf16 rounds to nearest even;
/// bf16 → fp32 is exact).
///
/// # Errors
/// [`GpuError::Shape`] for equal dtypes or short buffers; launch errors.
pub fn cast<G: Gpu>(
    gpu: &G,
    out: Dev<'_, G::Buf>,
    out_dtype: DType,
    inp: Dev<'_, G::Buf>,
    in_dtype: DType,
    n: usize,
) -> Result<(), GpuError> {
    const OP: &str = "cast";
    let kernel = match (in_dtype, out_dtype) {
        (DType::F32, DType::Bf16) => "cast_f32_to_bf16",
        (DType::Bf16, DType::F32) => "cast_bf16_to_f32",
        (a, b) => {
            return Err(shape(OP, format!("{a:?} → {b:?} is not a conversion (copy the bytes instead)")));
        }
    };
    check_len(gpu, OP, "out", out, n, out_dtype)?;
    check_len(gpu, OP, "inp", inp, n, in_dtype)?;
    if n == 0 {
        return Ok(());
    }
    gpu.launch(
        kernel,
        stride_grid(n),
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(out), Arg::Ptr(inp), Arg::U64(n as u64)],
    )
}

/// (chunks, rows per chunk) of the bias gradient's row split, a function of the shape only: as
/// many chunks as fill [`BIAS_TARGET_BLOCKS`] together with the `ceil(n / 256)` column tiles, but
/// at least [`BIAS_MIN_ROWS_PER_CHUNK`] rows each (the last chunk may be shorter).
fn bias_grad_split(rows: usize, n: usize) -> (usize, usize) {
    let tiles = n.div_ceil(BIAS_COLS).max(1);
    let chunks = (BIAS_TARGET_BLOCKS / tiles).min(rows.div_ceil(BIAS_MIN_ROWS_PER_CHUNK)).max(1);
    let per = rows.div_ceil(chunks).max(1);
    (rows.div_ceil(per).max(1), per)
}

/// Scratch fp32 elements [`bias_grad`] needs for `dout[rows, n]` (either dtype; at most 264·n).
pub fn bias_grad_scratch_elems(rows: usize, n: usize) -> usize {
    bias_grad_split(rows, n).0 * n
}

/// `dbias[n] += Σ_rows dout[rows, n]` (accumulate), `dout` stored as `dout_dtype`, `dbias` as
/// `dbias_dtype` (fp32 recommended: a bf16 accumulator rounds every step). Rows are summed in fp32
/// in fixed chunks into `scratch` ([`bias_grad_scratch_elems`] fp32 elements), then the chunks in
/// ascending order: deterministic, no atomics. `dout` is read with 16-byte loads when it is 16-byte
/// aligned and `n` is a multiple of 8 (bf16) or 4 (fp32), element by element otherwise; both paths
/// add in the same order and give the same bits.
///
/// # Errors
/// [`GpuError::Shape`] for empty shapes, sizes past 32 bits or short buffers; launch errors.
#[allow(clippy::too_many_arguments)]
pub fn bias_grad<G: Gpu>(
    gpu: &G,
    dbias: Dev<'_, G::Buf>,
    dbias_dtype: DType,
    dout: Dev<'_, G::Buf>,
    dout_dtype: DType,
    rows: usize,
    n: usize,
    scratch: Dev<'_, G::Buf>,
) -> Result<(), GpuError> {
    const OP: &str = "bias_grad";
    if rows == 0 || n == 0 {
        return Err(shape(OP, format!("dout [{rows}, {n}] is empty")));
    }
    let (chunks, per) = bias_grad_split(rows, n);
    let r32 = u32::try_from(rows).map_err(|_| shape(OP, format!("{rows} rows do not fit in 32 bits")))?;
    let n32 = u32::try_from(n).map_err(|_| shape(OP, format!("{n} columns do not fit in 32 bits")))?;
    check_len(gpu, OP, "dbias", dbias, n, dbias_dtype)?;
    check_len(gpu, OP, "dout", dout, rows * n, dout_dtype)?;
    check_len(gpu, OP, "scratch", scratch, chunks * n, DType::F32)?;
    gpu.launch(
        &format!("bias_grad_partial_{}", dout_dtype.suffix()),
        [n32.div_ceil(BIAS_COLS as u32), chunks as u32, 1],
        [32, BIAS_WARPS, 1],
        0,
        &[Arg::Ptr(scratch), Arg::Ptr(dout), Arg::U32(r32), Arg::U32(n32), Arg::U32(per as u32)],
    )?;
    gpu.launch(
        &format!("bias_grad_finish_{}", dbias_dtype.suffix()),
        [n32.div_ceil(ELEMENTWISE_BLOCK), 1, 1],
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(dbias), Arg::Ptr(scratch), Arg::U32(chunks as u32), Arg::U32(n32)],
    )
}
