//! GELU (tanh approximation) on the GPU: twins of `Backend::gelu_forward` / `gelu_backward`.

use super::{ELEMENTWISE_BLOCK, check_len, grid_1d};
use crate::gpu::{Arg, DType, Dev, Gpu, GpuError};

/// `out = gelu(inp)` over `n` elements of `dtype`.
pub fn gelu_forward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    out: Dev<'_, G::Buf>,
    inp: Dev<'_, G::Buf>,
    n: usize,
) -> Result<(), GpuError> {
    const OP: &str = "gelu_forward";
    check_len(gpu, OP, "out", out, n, dtype)?;
    check_len(gpu, OP, "inp", inp, n, dtype)?;
    let kernel = format!("gelu_forward_{}", dtype.suffix());
    gpu.launch(
        &kernel,
        grid_1d(OP, n, ELEMENTWISE_BLOCK)?,
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(out), Arg::Ptr(inp), Arg::U64(n as u64)],
    )
}

/// `dinp = gelu'(inp) · dout` (overwrite) over `n` elements of `dtype`.
pub fn gelu_backward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    dinp: Dev<'_, G::Buf>,
    inp: Dev<'_, G::Buf>,
    dout: Dev<'_, G::Buf>,
    n: usize,
) -> Result<(), GpuError> {
    const OP: &str = "gelu_backward";
    for (what, d) in [("dinp", dinp), ("inp", inp), ("dout", dout)] {
        check_len(gpu, OP, what, d, n, dtype)?;
    }
    let kernel = format!("gelu_backward_{}", dtype.suffix());
    gpu.launch(
        &kernel,
        grid_1d(OP, n, ELEMENTWISE_BLOCK)?,
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(dinp), Arg::Ptr(inp), Arg::Ptr(dout), Arg::U64(n as u64)],
    )
}
