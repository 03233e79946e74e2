//! Host-side launchers of the kernels in `cuda/*.cu`: each function checks shapes, picks the
//! launch geometry and runs the kernels of one operation, on any [`Gpu`]. They are the GPU twins
//! of the CPU backend's methods (`crate::kernels::Backend`) and are tested against them through
//! the emulator (`tests/gpu_kernels_*.rs`).

pub mod attention;
pub mod checksum;
pub mod crossentropy;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod optim;

use super::{DType, Dev, Gpu, GpuError};

/// Threads per block for elementwise kernels.
pub const ELEMENTWISE_BLOCK: u32 = 256;

/// A 1-D grid covering `n` elements with `block` threads per block.
pub fn grid_1d(op: &'static str, n: usize, block: u32) -> Result<[u32; 3], GpuError> {
    let blocks = n.div_ceil(block as usize);
    if blocks == 0 {
        return Err(GpuError::Shape { op, detail: "no elements".into() });
    }
    let x = u32::try_from(blocks)
        .map_err(|_| GpuError::Shape { op, detail: format!("{n} elements need more than 2^32 blocks") })?;
    Ok([x, 1, 1])
}

/// Checks that `d` has room for `elems` elements of `dtype`.
pub fn check_len<G: Gpu>(
    gpu: &G,
    op: &'static str,
    what: &str,
    d: Dev<'_, G::Buf>,
    elems: usize,
    dtype: DType,
) -> Result<(), GpuError> {
    let need = d.offset + elems * dtype.size();
    let have = gpu.buf_len(d.buf);
    if need > have {
        return Err(GpuError::Shape {
            op,
            detail: format!(
                "{what}: {elems} × {dtype:?} at byte {} needs {need} bytes, the buffer has {have}",
                d.offset
            ),
        });
    }
    Ok(())
}
