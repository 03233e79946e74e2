//! GPU execution: one [`Gpu`] interface with two implementations.
//!
//! - [`CudaGpu`] runs the kernels of `cuda/*.cu` on an NVIDIA GPU: NVRTC compiles them at run time
//!   (once per process and device, cached on disk by source hash and architecture), cudarc launches
//!   them, cuBLASLt does the matrix products.
//! - [`EmuGpu`] compiles the **same kernel sources** as C++20 with the machine's `g++` against a
//!   small CUDA emulation header (`cuda/emu/emu.h`) and runs every CUDA thread of a block as an OS
//!   thread. It exists so that the kernels and the host code that launches them (grid sizes, shared
//!   memory, argument order, the sequence of launches in [`ops`]) are tested against the CPU
//!   backend on machines without a GPU, which is where CI runs.
//!
//! Buffers are untyped bytes; a kernel's name says which element types it reads (`_f32`,
//! `_bf16`). [`Dev`] is a pointer into a buffer (buffer + byte offset), the unit kernels take.

pub mod cuda;
pub mod dp;
pub mod emu;
pub mod model;
pub mod nccl;
pub mod ops;
pub mod sources;
pub mod stage;
pub mod train;

pub use cuda::CudaGpu;
pub use emu::EmuGpu;

/// Element types stored in GPU buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The suffix of kernel names for this storage type.
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

/// What can go wrong on a GPU (or in the emulator).
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("CUDA driver: {op}: {detail}")]
    Driver { op: String, detail: String },
    #[error("NVRTC could not compile {file} for {arch}:\n{log}")]
    Compile { file: String, arch: String, log: String },
    #[error("NVRTC is not available: {0}")]
    NoNvrtc(String),
    #[error("NCCL {op} on rank {rank} of group {group}: {detail}")]
    Nccl { op: String, rank: usize, group: String, detail: String },
    #[error("cuBLASLt: {op}: {detail}")]
    Blas { op: String, detail: String },
    #[error("kernel {kernel} (grid {grid:?}, block {block:?}, {smem} B shared): {detail}")]
    Launch { kernel: String, grid: [u32; 3], block: [u32; 3], smem: u32, detail: String },
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("the CPU kernel emulator could not be built: {0}")]
    EmuBuild(String),
    /// A pipeline message whose checksum on arrival differs from its sender's (device links).
    #[error(
        "corrupt {what} of microbatch {mb} from rank {from} (device checksum {got:016x}, sent {sent:016x}): the device link from rank {from} damaged it"
    )]
    Corrupt { what: &'static str, mb: u64, from: usize, got: u64, sent: u64 },
    #[error("I/O while {op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// A device pointer: a buffer and a byte offset into it.
pub struct Dev<'a, B> {
    pub buf: &'a B,
    pub offset: usize,
}

impl<B> Clone for Dev<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Dev<'_, B> {}

impl<'a, B> Dev<'a, B> {
    pub fn new(buf: &'a B) -> Self {
        Dev { buf, offset: 0 }
    }

    /// The pointer `elems` elements of `dtype` further on.
    pub fn at(self, elems: usize, dtype: DType) -> Self {
        Dev { buf: self.buf, offset: self.offset + elems * dtype.size() }
    }
}

/// One kernel argument, in the order of the kernel's parameter list.
pub enum Arg<'a, B> {
    Ptr(Dev<'a, B>),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
}

/// `c[m,n] (=|+=) op(a)[m,k] · op(b)[k,n] (+ bias[n])`, row-major like the CPU backend.
/// `a` is stored `[m,k]`, or `[k,m]` with `trans_a`; `b` is stored `[k,n]`, or `[n,k]` with
/// `trans_b`. Inputs (and the bias) have storage type `dtype`, the output `c_dtype` (fp32 for
/// parameter gradients, which accumulate in fp32 whatever the activations are); products
/// accumulate in fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// `c += …` instead of `c = …`.
    pub accumulate: bool,
    pub dtype: DType,
    pub c_dtype: DType,
}

impl Gemm {
    /// The CPU backend's `matmul_forward`: `out[m,n] = inp[m,k] · weight[n,k]ᵀ`.
    pub fn linear(m: usize, k: usize, n: usize, dtype: DType) -> Self {
        Gemm { m, n, k, trans_a: false, trans_b: true, accumulate: false, dtype, c_dtype: dtype }
    }

    /// `dinp[m,k] = dout[m,n] · weight[n,k]`.
    pub fn linear_backward_input(m: usize, k: usize, n: usize, dtype: DType) -> Self {
        Gemm { m, n: k, k: n, trans_a: false, trans_b: false, accumulate: false, dtype, c_dtype: dtype }
    }

    /// `dweight[n,k] += dout[m,n]ᵀ · inp[m,k]`, the gradient in fp32.
    pub fn linear_backward_weight(m: usize, k: usize, n: usize, dtype: DType) -> Self {
        Gemm { m: n, n: k, k: m, trans_a: true, trans_b: false, accumulate: true, dtype, c_dtype: DType::F32 }
    }
}

/// A GPU, real or emulated. Calls are ordered as on one CUDA stream: each launch sees the
/// effects of the previous ones; [`Gpu::download`] waits for all of them.
pub trait Gpu: Send + Sync {
    /// Device memory.
    type Buf: Send + Sync;

    /// A one-line description for logs ("NVIDIA H100 80GB HBM3 (sm_90)", "CPU emulator").
    fn describe(&self) -> String;

    /// Whether the device has bf16 tensor cores with `mma.sync` (sm_80 and newer; the emulator
    /// emulates them).
    fn tensor_cores(&self) -> bool;

    /// `bytes` of zeroed device memory.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf, GpuError>;

    /// Size of a buffer in bytes.
    fn buf_len(&self, buf: &Self::Buf) -> usize;

    /// Copies `src` into `dst` from byte `offset` on.
    fn upload(&self, dst: &mut Self::Buf, offset: usize, src: &[u8]) -> Result<(), GpuError>;

    /// Copies `src` to the device memory at `dst` (a shared pointer, like a kernel's output),
    /// ordered after the work queued so far; returns once `src` may be reused.
    fn write(&self, dst: Dev<'_, Self::Buf>, src: &[u8]) -> Result<(), GpuError>;

    /// Where the memory at `dst` lives for as long as its buffer does (the buffer object may
    /// move; its memory does not), for a write that completes later through
    /// [`Gpu::write_later`], and how many bytes of the buffer follow it. `None` where a GPU
    /// offers no such writes (CUDA: collectives through the host then complete when issued).
    fn stable_address(&self, _dst: Dev<'_, Self::Buf>) -> Option<(usize, usize)> {
        None
    }

    /// Copies `src` to an address from [`Gpu::stable_address`] (the emulator's stand-in for a
    /// collective that finishes after it was queued).
    ///
    /// # Safety
    /// `addr` came from [`Gpu::stable_address`] of this GPU, its buffer is still alive and
    /// `src` fits in the bytes that followed it.
    unsafe fn write_later(&self, _addr: usize, _src: &[u8]) -> Result<(), GpuError> {
        Err(GpuError::Shape { op: "Gpu::write_later", detail: "this GPU has no stable addresses".into() })
    }

    /// Copies `dst.len()` bytes from byte `offset` of `src`, after all earlier work finished.
    fn download(&self, src: &Self::Buf, offset: usize, dst: &mut [u8]) -> Result<(), GpuError>;

    /// Runs `kernel` (a name from `cuda/*.cu`) on a `grid` of `block`s with `smem` bytes of dynamic
    /// shared memory.
    fn launch(
        &self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: &[Arg<'_, Self::Buf>],
    ) -> Result<(), GpuError>;

    /// A matrix product (see [`Gemm`]); `bias` is added to every row of the result.
    fn gemm(
        &self,
        g: &Gemm,
        c: Dev<'_, Self::Buf>,
        a: Dev<'_, Self::Buf>,
        b: Dev<'_, Self::Buf>,
        bias: Option<Dev<'_, Self::Buf>>,
    ) -> Result<(), GpuError>;

    /// [`Gpu::gemm`] with GELU (tanh approximation, GPT-2's) fused into the product's epilogue
    /// (see [`GeluEpilogue`]); `g` must not accumulate and its output type must be its input
    /// type, as must `aux`'s. Returns `Ok(false)`, having written nothing, when this GPU has no
    /// such epilogue for the problem: the caller then runs the product and the GELU kernel
    /// separately. Applied to the fp32 accumulator, before the output is rounded.
    ///
    /// # Errors
    /// Operands outside their buffers; device errors.
    fn gemm_gelu(
        &self,
        g: &Gemm,
        c: Dev<'_, Self::Buf>,
        a: Dev<'_, Self::Buf>,
        b: Dev<'_, Self::Buf>,
        epi: GeluEpilogue<'_, Self::Buf>,
    ) -> Result<bool, GpuError> {
        check_gemm_gelu(self, g, c, a, b, &epi)?;
        Ok(false)
    }

    /// Copies `bytes` from `src` to `dst` on the device (ordered like a launch).
    fn copy(&self, dst: Dev<'_, Self::Buf>, src: Dev<'_, Self::Buf>, bytes: usize) -> Result<(), GpuError>;

    /// Sets `bytes` at `dst` to zero (ordered like a launch).
    fn zero(&self, dst: Dev<'_, Self::Buf>, bytes: usize) -> Result<(), GpuError>;

    /// Waits for all queued work.
    fn synchronize(&self) -> Result<(), GpuError>;

    /// The compute stream's clock at this point of its queue: the moment the work queued so far
    /// has run. Where work runs as it is queued (the emulator) that is now, on the host's clock;
    /// on CUDA a timing event recorded on the compute stream. Two of them give the device time
    /// between ([`Gpu::stream_seconds`]): how long the stream stalled for a pipeline message,
    /// or how long a step kept it.
    ///
    /// # Errors
    /// Recording the event fails.
    fn stream_time(&self) -> Result<StreamTime, GpuError> {
        Ok(StreamTime::Host(std::time::Instant::now()))
    }

    /// Seconds of device time from `start` to `end` (both from [`Gpu::stream_time`], `start`
    /// queued first); waits, bounded by the GPU timeout, until the device has passed `end`.
    ///
    /// # Errors
    /// Times of another kind than this device's; the wait times out; reading the events fails.
    fn stream_seconds(&self, start: &StreamTime, end: &StreamTime) -> Result<f64, GpuError> {
        match (start, end) {
            (StreamTime::Host(a), StreamTime::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64()),
            _ => Err(GpuError::Driver {
                op: "Gpu::stream_seconds".into(),
                detail: "stream times of another device".into(),
            }),
        }
    }

    /// Starts (or stops) timing every kernel and GEMM on the device (CUDA events around each);
    /// a no-op where timing means nothing (the emulator).
    fn set_profiling(&self, _on: bool) {}

    /// Device time per kernel name since profiling started, longest first, and clears it.
    fn take_profile(&self) -> Result<Vec<KernelTime>, GpuError> {
        Ok(Vec::new())
    }

    /// Bytes of device memory held in this GPU's buffers now and at most since the last
    /// [`Gpu::reset_peak_memory`] (library workspaces and the CUDA context are not counted),
    /// and the bytes copied between host and device so far.
    fn memory(&self) -> MemoryStats;

    /// Starts a new peak from the bytes held now.
    fn reset_peak_memory(&self);
}

/// See [`Gpu::memory`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub live: usize,
    pub peak: usize,
    /// Bytes copied host → device since the GPU was opened (uploads and writes).
    pub to_device: u64,
    /// Bytes copied device → host since the GPU was opened (downloads).
    pub to_host: u64,
}

/// The live and peak bytes of a GPU's buffers, shared with the buffers (which give theirs back
/// on drop).
#[derive(Debug, Default)]
pub(crate) struct MemCounter {
    live: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    to_device: std::sync::atomic::AtomicU64,
    to_host: std::sync::atomic::AtomicU64,
}

impl MemCounter {
    pub(crate) fn add(&self, bytes: usize) -> usize {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.live.fetch_add(bytes, SeqCst) + bytes;
        self.peak.fetch_max(now, SeqCst);
        now
    }

    pub(crate) fn sub(&self, bytes: usize) {
        self.live.fetch_sub(bytes, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        use std::sync::atomic::Ordering::SeqCst;
        MemoryStats {
            live: self.live.load(SeqCst),
            peak: self.peak.load(SeqCst),
            to_device: self.to_device.load(SeqCst),
            to_host: self.to_host.load(SeqCst),
        }
    }

    /// Counts a host → device copy.
    pub(crate) fn up(&self, bytes: usize) {
        self.to_device.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a device → host copy.
    pub(crate) fn down(&self, bytes: usize) {
        self.to_host.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn reset_peak(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.peak.store(self.live.load(SeqCst), SeqCst);
    }
}

/// Checks that `bytes` at `offset` fit in a buffer of `len` bytes (the copies of both GPUs).
pub(crate) fn check_range(
    op: &'static str,
    what: &str,
    offset: usize,
    bytes: usize,
    len: usize,
) -> Result<(), GpuError> {
    if offset.checked_add(bytes).is_none_or(|end| end > len) {
        return Err(GpuError::Shape {
            op,
            detail: format!("{what}: {bytes} bytes at offset {offset} of a {len}-byte buffer"),
        });
    }
    Ok(())
}

/// The GELU epilogue of [`Gpu::gemm_gelu`] (cuBLASLt's `GELU_AUX_BIAS` and `DGELU`).
pub enum GeluEpilogue<'a, B> {
    /// `aux = a·b + bias` (the pre-activation, which the backward needs) and `c = gelu(a·b +
    /// bias)`, both from the same fp32 accumulator.
    Forward { bias: Dev<'a, B>, aux: Dev<'a, B> },
    /// `c = (a·b) · gelu'(aux)`: from the gradient at the GELU's output (the product) to the one
    /// at its input.
    Backward { aux: Dev<'a, B> },
}

/// The checks of [`Gpu::gemm_gelu`] (both GPUs): the operands fit and the problem is one the
/// epilogue serves.
pub(crate) fn check_gemm_gelu<G: Gpu + ?Sized>(
    gpu: &G,
    g: &Gemm,
    c: Dev<'_, G::Buf>,
    a: Dev<'_, G::Buf>,
    b: Dev<'_, G::Buf>,
    epi: &GeluEpilogue<'_, G::Buf>,
) -> Result<(), GpuError> {
    if g.accumulate || g.c_dtype != g.dtype {
        return Err(GpuError::Shape {
            op: "gemm_gelu",
            detail: format!("{g:?}: a GELU epilogue overwrites an output of the input type"),
        });
    }
    let (bias, aux) = match epi {
        GeluEpilogue::Forward { bias, aux } => (Some(*bias), *aux),
        GeluEpilogue::Backward { aux } => (None, *aux),
    };
    check_gemm(gpu, g, c, a, b, bias)?;
    check_range(
        "gemm_gelu",
        &format!("aux of {g:?}"),
        aux.offset,
        g.m * g.n * g.dtype.size(),
        gpu.buf_len(aux.buf),
    )
}

/// Checks that every operand of a [`Gemm`] fits its buffer (both GPUs, before any pointer is
/// formed). The bias has `g.n` elements.
pub(crate) fn check_gemm<G: Gpu + ?Sized>(
    gpu: &G,
    g: &Gemm,
    c: Dev<'_, G::Buf>,
    a: Dev<'_, G::Buf>,
    b: Dev<'_, G::Buf>,
    bias: Option<Dev<'_, G::Buf>>,
) -> Result<(), GpuError> {
    let (es, ces) = (g.dtype.size(), g.c_dtype.size());
    let mut operands = vec![("c", c, g.m * g.n * ces), ("a", a, g.m * g.k * es), ("b", b, g.k * g.n * es)];
    operands.extend(bias.map(|d| ("bias", d, g.n * es)));
    for (what, d, bytes) in operands {
        check_range("gemm", &format!("{what} of {g:?}"), d.offset, bytes, gpu.buf_len(d.buf))?;
    }
    Ok(())
}

/// A point on a device's compute stream ([`Gpu::stream_time`]).
pub enum StreamTime {
    /// The host's clock, for a device that runs work as it is queued (the emulator).
    Host(std::time::Instant),
    /// A timing event recorded on a CUDA compute stream.
    Event(cudarc::driver::CudaEvent),
}

impl std::fmt::Debug for StreamTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamTime::Host(t) => write!(f, "StreamTime::Host({t:?})"),
            StreamTime::Event(_) => f.write_str("StreamTime::Event"),
        }
    }
}

/// Device time spent in one kernel (or GEMM shape) while profiling.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub calls: usize,
    pub ms: f64,
}

/// Uploads fp32 values as storage of `dtype` into a new buffer.
pub fn upload_f32<G: Gpu>(gpu: &G, values: &[f32], dtype: DType) -> Result<G::Buf, GpuError> {
    let bytes = encode(values, dtype);
    let mut buf = gpu.alloc(bytes.len())?;
    gpu.upload(&mut buf, 0, &bytes)?;
    Ok(buf)
}

/// Downloads `n` elements of `dtype` from `src` as fp32 values.
pub fn download_f32<G: Gpu>(
    gpu: &G,
    src: Dev<'_, G::Buf>,
    n: usize,
    dtype: DType,
) -> Result<Vec<f32>, GpuError> {
    let mut bytes = vec![0u8; n * dtype.size()];
    gpu.download(src.buf, src.offset, &mut bytes)?;
    Ok(decode(&bytes, dtype))
}

/// Uploads 32-bit integers (token ids, targets) into a new buffer.
pub fn upload_u32<G: Gpu>(gpu: &G, values: &[u32]) -> Result<G::Buf, GpuError> {
    let mut buf = gpu.alloc(values.len() * 4)?;
    gpu.upload(&mut buf, 0, bytemuck::cast_slice(values))?;
    Ok(buf)
}

/// fp32 values as little-endian storage bytes of `dtype` (bf16 rounded to nearest even).
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
    }
}

/// Storage bytes of `dtype` as fp32 values.
pub fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Rounds fp32 values to bf16 and back (what a bf16 buffer would hold).
pub fn round_bf16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}
