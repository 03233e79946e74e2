//! The CUDA implementation of [`Gpu`] (being written).

use super::{Arg, Dev, Gemm, Gpu, GpuError};

/// A CUDA device.
pub struct CudaGpu {
    _private: (),
}

/// Device memory of a [`CudaGpu`].
pub struct CudaBuf {
    _private: (),
}

impl CudaGpu {
    pub fn new(_ordinal: usize) -> Result<Self, GpuError> {
        Err(GpuError::NoNvrtc("the CUDA backend is not built yet".into()))
    }
}

impl Gpu for CudaGpu {
    type Buf = CudaBuf;
    fn describe(&self) -> String {
        String::new()
    }
    fn alloc(&self, _bytes: usize) -> Result<CudaBuf, GpuError> {
        unimplemented!()
    }
    fn buf_len(&self, _buf: &CudaBuf) -> usize {
        0
    }
    fn upload(&self, _dst: &mut CudaBuf, _offset: usize, _src: &[u8]) -> Result<(), GpuError> {
        unimplemented!()
    }
    fn download(&self, _src: &CudaBuf, _offset: usize, _dst: &mut [u8]) -> Result<(), GpuError> {
        unimplemented!()
    }
    fn launch(
        &self,
        _k: &str,
        _g: [u32; 3],
        _b: [u32; 3],
        _s: u32,
        _a: &[Arg<'_, CudaBuf>],
    ) -> Result<(), GpuError> {
        unimplemented!()
    }
    fn gemm(
        &self,
        _g: &Gemm,
        _c: Dev<'_, CudaBuf>,
        _a: Dev<'_, CudaBuf>,
        _b: Dev<'_, CudaBuf>,
        _bias: Option<Dev<'_, CudaBuf>>,
    ) -> Result<(), GpuError> {
        unimplemented!()
    }
    fn synchronize(&self) -> Result<(), GpuError> {
        unimplemented!()
    }
}
