//! Fused softmax cross-entropy on the GPU (`cuda/crossentropy.cu`): twins of
//! `Backend::crossentropy_forward_backward` and `Backend::crossentropy_forward`.
//!
//! Dimensions: `rows` rows (B·T), `v` real vocabulary entries, `vp ≥ v` the padded row length of
//! the logits. Logits are stored as `dtype` (fp32 or bf16), losses are fp32, targets u32.
//! One block of [`XENT_BLOCK`] threads per row; no scratch memory.
//!
//! A target `≥ v` is not an error the host can see without a download: the kernel never reads
//! out of bounds, writes a NaN loss for that row and leaves its gradient as `dloss · softmax`.

use super::check_len;
use crate::gpu::{Arg, DType, Dev, Gpu, GpuError};

/// Threads per block (one block per row).
pub const XENT_BLOCK: u32 = 512;

fn check_shape(op: &'static str, rows: usize, v: usize, vp: usize) -> Result<(u32, u32, u32), GpuError> {
    if rows == 0 || v == 0 || v > vp {
        return Err(GpuError::Shape {
            op,
            detail: format!("rows {rows}, V {v}, Vp {vp}: need rows > 0 and 0 < V ≤ Vp"),
        });
    }
    let too_big =
        |what: &str, x: usize| GpuError::Shape { op, detail: format!("{what} {x} does not fit in 32 bits") };
    let r = u32::try_from(rows).map_err(|_| too_big("rows", rows))?;
    let v32 = u32::try_from(v).map_err(|_| too_big("V", v))?;
    let vp32 = u32::try_from(vp).map_err(|_| too_big("Vp", vp))?;
    Ok((r, v32, vp32))
}

/// Losses and gradients in one pass over `logits[rows, vp]` (storage `dtype`): `losses[rows]`
/// (fp32) are overwritten and the logits are **replaced by dlogits** = `dloss · (softmax −
/// onehot(target))`, exactly 0 in the padded columns `v..vp`.
///
/// # Errors
/// [`GpuError::Shape`] for empty or inconsistent shapes or short buffers; launch errors.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_forward_backward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    logits: Dev<'_, G::Buf>,
    losses: Dev<'_, G::Buf>,
    targets: Dev<'_, G::Buf>,
    rows: usize,
    v: usize,
    vp: usize,
    dloss: f32,
) -> Result<(), GpuError> {
    const OP: &str = "crossentropy_forward_backward";
    let (r, v32, vp32) = check_shape(OP, rows, v, vp)?;
    check_len(gpu, OP, "logits", logits, rows * vp, dtype)?;
    check_len(gpu, OP, "losses", losses, rows, DType::F32)?;
    // Targets are u32: the same size as an fp32 element.
    check_len(gpu, OP, "targets", targets, rows, DType::F32)?;
    gpu.launch(
        &format!("crossentropy_forward_backward_{}", dtype.suffix()),
        [r, 1, 1],
        [XENT_BLOCK, 1, 1],
        0,
        &[
            Arg::Ptr(logits),
            Arg::Ptr(losses),
            Arg::Ptr(targets),
            Arg::F32(dloss),
            Arg::U32(v32),
            Arg::U32(vp32),
        ],
    )
}

/// Losses only (evaluation): `losses[rows]` (fp32) are overwritten, the logits are left unchanged.
///
/// # Errors
/// [`GpuError::Shape`] for empty or inconsistent shapes or short buffers; launch errors.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_forward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    losses: Dev<'_, G::Buf>,
    logits: Dev<'_, G::Buf>,
    targets: Dev<'_, G::Buf>,
    rows: usize,
    v: usize,
    vp: usize,
) -> Result<(), GpuError> {
    const OP: &str = "crossentropy_forward";
    let (r, v32, vp32) = check_shape(OP, rows, v, vp)?;
    check_len(gpu, OP, "logits", logits, rows * vp, dtype)?;
    check_len(gpu, OP, "losses", losses, rows, DType::F32)?;
    check_len(gpu, OP, "targets", targets, rows, DType::F32)?;
    gpu.launch(
        &format!("crossentropy_forward_{}", dtype.suffix()),
        [r, 1, 1],
        [XENT_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(losses), Arg::Ptr(logits), Arg::Ptr(targets), Arg::U32(v32), Arg::U32(vp32)],
    )
}
