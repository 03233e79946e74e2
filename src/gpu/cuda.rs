//! The CUDA implementation of [`Gpu`]: kernels from `cuda/*.cu` compiled by NVRTC, launched with
//! cudarc on a compute stream; matrix products through cuBLASLt; a second stream for
//! communication ordered against compute by events (never by host synchronisation).
//!
//! Every entry point probes the library it needs (`is_culib_present`) before the first call into
//! it, because cudarc panics when a dynamically loaded CUDA library is missing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::{
    Arg, DType, Dev, GeluEpilogue, Gemm, Gpu, GpuError, KernelTime, MemCounter, MemoryStats, check_gemm,
    check_gemm_gelu, check_range, sources,
};

/// cuBLASLt workspace (what cuBLAS itself uses on Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

fn driver(op: &str) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError + '_ {
    move |e| GpuError::Driver { op: op.to_string(), detail: e.to_string() }
}

fn blas(op: &str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> GpuError + '_ {
    move |e| GpuError::Blas { op: op.to_string(), detail: format!("{e:?}") }
}

/// The full source NVRTC compiles: the prelude and every kernel file, in one module.
///
/// # Errors
/// A source directory ([`sources::SOURCES_ENV`]) without one of the files.
pub fn kernel_source() -> Result<String, GpuError> {
    let mut src = sources::text("prelude.cuh", sources::PRELUDE)?.into_owned();
    for (name, text) in sources::kernel_files()? {
        src.push_str(&format!("\n#line 1 \"{name}\"\n"));
        src.push_str(&text);
    }
    Ok(src)
}

/// Where compiled PTX is cached: `$TROUPE_CACHE_DIR`, else `$XDG_CACHE_HOME/troupe`, else
/// `~/.cache/troupe`, else the temporary directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TROUPE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("troupe");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("troupe");
    }
    std::env::temp_dir().join("troupe-cache")
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether `TROUPE_NO_LDMATRIX` asks for the tensor-core attention's element-wise fragment
/// loads instead of ldmatrix (set, and not "0"): a fallback, should a GPU disagree with the
/// emulator's ldmatrix (the `ldmatrix_selftest` kernel's test says so).
pub fn ldmatrix_disabled() -> bool {
    env_flag("TROUPE_NO_LDMATRIX")
}

/// Whether `TROUPE_NO_CP_ASYNC` asks for synchronous tile loads in the tensor-core attention
/// kernels instead of cp.async (set, and not "0"): a fallback and a comparison.
pub fn cp_async_disabled() -> bool {
    env_flag("TROUPE_NO_CP_ASYNC")
}

/// How the kernels are built: the tensor-core attention's fragment loads (`ldmatrix`, else
/// element-wise: `-DTROUPE_NO_LDMATRIX`) and its tile loads (`cp_async`, else synchronous:
/// `-DTROUPE_NO_CP_ASYNC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOptions {
    pub ldmatrix: bool,
    pub cp_async: bool,
}

impl KernelOptions {
    /// Both on unless `TROUPE_NO_LDMATRIX` / `TROUPE_NO_CP_ASYNC` say otherwise.
    pub fn from_env() -> Self {
        KernelOptions { ldmatrix: !ldmatrix_disabled(), cp_async: !cp_async_disabled() }
    }
}

/// Compiles every kernel to PTX for `arch` (e.g. "sm_90") with NVRTC — no GPU needed, only
/// libnvrtc. Cached on disk by source hash, options and architecture; `fresh` skips the cache.
/// Built with [`KernelOptions::from_env`].
///
/// # Errors
/// [`GpuError::NoNvrtc`] without libnvrtc; [`GpuError::Compile`] with NVRTC's log.
pub fn compile_ptx(arch: &str, fresh: bool) -> Result<String, GpuError> {
    compile_ptx_with(arch, fresh, KernelOptions::from_env())
}

/// [`compile_ptx`] with the kernel options explicit.
///
/// # Errors
/// As [`compile_ptx`].
pub fn compile_ptx_with(arch: &str, fresh: bool, options: KernelOptions) -> Result<String, GpuError> {
    nvrtc_present()?;
    let src = kernel_source()?;
    let opts = nvrtc_options(arch, options);
    let key = sources::hash_texts(&[&src, &opts.join(" "), &nvrtc_version()]);
    let path = cache_dir().join(format!("kernels-{key:016x}-{arch}.ptx"));
    if !fresh && let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok(ptx);
    }
    // Tens of seconds once per kernel-source version and architecture: say so rather than stall.
    eprintln!(
        "troupe: compiling the CUDA kernels for {arch} with NVRTC {} (once; cached in {})",
        nvrtc_version(),
        cache_dir().display()
    );
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        &src,
        cudarc::nvrtc::CompileOptions {
            options: opts.clone(),
            name: Some("troupe.cu".into()),
            ..Default::default()
        },
    )
    .map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        GpuError::Compile { file: "cuda/*.cu".into(), arch: arch.to_string(), log }
    })?
    .to_src();
    write_cache(&path, &ptx);
    Ok(ptx)
}

/// Puts a compiled text into the kernel cache (written aside, then renamed into place, so a
/// concurrent reader sees all of it or nothing). The cache is an optimisation: a read-only home
/// directory only costs a recompile.
fn write_cache(path: &std::path::Path, text: &str) {
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

fn nvrtc_present() -> Result<(), GpuError> {
    // SAFETY: only tries to open the library by its usual names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    Err(GpuError::NoNvrtc(
        "libnvrtc.so was not found on the library path (pip's nvidia-cuda-nvrtc puts it in \
         site-packages/nvidia/cu13/lib; add that to LD_LIBRARY_PATH)"
            .into(),
    ))
}

/// NVRTC's options for the kernels: the architecture, C++17, fast math and the kernel options.
fn nvrtc_options(arch: &str, options: KernelOptions) -> Vec<String> {
    let mut opts =
        vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "--use_fast_math".to_string()];
    if !options.ldmatrix {
        opts.push("-DTROUPE_NO_LDMATRIX".to_string());
    }
    if !options.cp_async {
        opts.push("-DTROUPE_NO_CP_ASYNC".to_string());
    }
    opts
}

/// What ptxas reports of one compiled kernel: registers per thread and the bytes of its stack
/// frame and of its register spills (stores and loads in the code, not per launch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// Every kernel's resources as ptxas reports them for a real architecture (`arch` "sm_90", not
/// "compute_90"): the kernels compiled to machine code by NVRTC with `--ptxas-options=-v` — no
/// GPU needed, only libnvrtc. Register pressure and spills show here before any GPU run. Cached
/// like [`compile_ptx`] (the report's text); `fresh` skips the cache.
///
/// # Errors
/// [`GpuError::NoNvrtc`] without libnvrtc; [`GpuError::Compile`] with NVRTC's log when the
/// kernels do not compile, `arch` is not a real architecture or the report cannot be read.
pub fn kernel_resources(
    arch: &str,
    fresh: bool,
    options: KernelOptions,
) -> Result<Vec<KernelResources>, GpuError> {
    use cudarc::nvrtc::result as nv;
    let compile_err =
        |log: String| GpuError::Compile { file: "cuda/*.cu".into(), arch: arch.to_string(), log };
    if !arch
        .strip_prefix("sm_")
        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric()))
    {
        return Err(compile_err(format!(
            "a register report needs a real architecture such as sm_90 (ptxas runs for it), not {arch:?}"
        )));
    }
    nvrtc_present()?;
    let src = kernel_source()?;
    let mut opts = nvrtc_options(arch, options);
    opts.push("--ptxas-options=-v".to_string());
    let key = sources::hash_texts(&[&src, &opts.join(" "), &nvrtc_version()]);
    let path = cache_dir().join(format!("kernels-{key:016x}-{arch}.ptxas.txt"));
    let cached = if fresh { None } else { std::fs::read_to_string(&path).ok() };
    let log = match cached {
        Some(log) => log,
        None => {
            eprintln!(
                "troupe: compiling the CUDA kernels for {arch} with NVRTC {} and ptxas -v",
                nvrtc_version()
            );
            let csrc = std::ffi::CString::new(src)
                .map_err(|_| compile_err("the kernel source holds a NUL byte".into()))?;
            let prog = nv::create_program(&csrc, Some(c"troupe.cu"))
                .map_err(|e| compile_err(format!("creating the NVRTC program: {e:?}")))?;
            // SAFETY: `prog` was just created and is destroyed once, below; `csrc` outlives it.
            let compiled = unsafe { nv::compile_program(prog, &opts) };
            // SAFETY: as above.
            let raw = unsafe { nv::get_program_log(prog) };
            // SAFETY: as above; not used after this.
            let _ = unsafe { nv::destroy_program(prog) };
            let log = raw
                .map(|v| {
                    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .map_err(|e| compile_err(format!("reading NVRTC's log: {e:?}")))?;
            if compiled.is_err() {
                return Err(compile_err(log));
            }
            write_cache(&path, &log);
            log
        }
    };
    let kernels = parse_ptxas_report(&log);
    if kernels.is_empty() {
        return Err(compile_err(format!("no kernel in ptxas's report:\n{log}")));
    }
    Ok(kernels)
}

/// The kernels of a ptxas `-v` report (NVRTC's log), in its order. A kernel's lines follow its
/// "Compiling entry function 'NAME'" line: "N bytes stack frame, N bytes spill stores, N bytes
/// spill loads" and "Used N registers"; other lines (warnings, "Function properties") are
/// skipped, and a value the report does not give reads 0.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    // The number just before `label` in `line`, if `label` is there.
    fn before(line: &str, label: &str) -> Option<u32> {
        let head = &line[..line.find(label)?];
        head.split(|c: char| !c.is_ascii_digit()).rfind(|w| !w.is_empty())?.parse().ok()
    }
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources {
                name,
                registers: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if let Some(v) = before(line, "bytes stack frame") {
            k.stack_bytes = v;
            k.spill_store_bytes = before(line, "bytes spill stores").unwrap_or(0);
            k.spill_load_bytes = before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ")
            && let Some(v) = before(line, " registers")
        {
            k.registers = v;
        }
    }
    out
}

/// NVRTC's version as "major.minor" (or "unknown").
pub fn nvrtc_version() -> String {
    // SAFETY: probes the library first; the call only writes the two integers.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return "unknown".into();
    }
    let (mut major, mut minor) = (0i32, 0i32);
    match unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) } {
        cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS => format!("{major}.{minor}"),
        _ => "unknown".into(),
    }
}

/// The driver's CUDA version as "major.minor" (or "unknown").
pub fn driver_version() -> String {
    let mut v = 0i32;
    // SAFETY: the driver library was found (probe_cuda); the call only writes `v`.
    match unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) } {
        cudarc::driver::sys::CUresult::CUDA_SUCCESS => format!("{}.{}", v / 1000, (v % 1000) / 10),
        _ => "unknown".into(),
    }
}

/// Device memory of a [`CudaGpu`].
pub struct CudaBuf {
    slice: CudaSlice<u8>,
    /// The GPU's byte count, given back on drop.
    counter: Arc<MemCounter>,
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        self.counter.sub(self.slice.len());
    }
}

/// One CUDA device: a context, a compute stream, the streams of its NCCL communicators (one
/// each), the compiled kernels and a cuBLASLt handle.
pub struct CudaGpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Every communication stream made by [`CudaGpu::new_comm_stream`] and still in use.
    comm_streams: Mutex<Vec<std::sync::Weak<CudaStream>>>,
    functions: HashMap<String, CudaFunction>,
    blas: BlasLt,
    name: String,
    arch: String,
    compute_capability: (i32, i32),
    /// (name, start, end) of every launch while profiling; `None` when off.
    profile: Mutex<Option<Vec<(String, CudaEvent, CudaEvent)>>>,
    /// Bytes held in this GPU's buffers.
    memory: Arc<MemCounter>,
    /// Longest wait for queued GPU work (`TROUPE_GPU_TIMEOUT`, seconds; default 10 minutes).
    timeout: std::time::Duration,
    /// Whether a product's first call times cuBLASLt's candidate algorithms and keeps the
    /// fastest ([`CudaGpu::set_gemm_autotune`]; `TROUPE_GEMM_AUTOTUNE`).
    gemm_autotune: std::sync::atomic::AtomicBool,
    /// Products tuned so far, and how many of them chose another algorithm than the heuristic's
    /// first.
    gemm_tuned: std::sync::atomic::AtomicUsize,
    gemm_retuned: std::sync::atomic::AtomicUsize,
}

/// Candidates cuBLASLt's heuristic is asked for when tuning a product.
const GEMM_CANDIDATES: usize = 8;
/// Timed runs of each candidate (after one untimed run).
const GEMM_TUNING_RUNS: usize = 3;

/// The bound on every host wait for GPU work: `TROUPE_GPU_TIMEOUT` seconds, or 10 minutes.
fn gpu_timeout() -> Result<std::time::Duration, GpuError> {
    parse_gpu_timeout(
        std::env::var_os("TROUPE_GPU_TIMEOUT").map(|v| v.to_string_lossy().into_owned()).as_deref(),
    )
}

fn parse_gpu_timeout(raw: Option<&str>) -> Result<std::time::Duration, GpuError> {
    let Some(text) = raw else {
        return Ok(std::time::Duration::from_secs(600));
    };
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(std::time::Duration::from_secs_f64(s)),
        _ => Err(GpuError::Driver {
            op: "reading TROUPE_GPU_TIMEOUT".into(),
            detail: format!("{text:?} is not a positive number of seconds"),
        }),
    }
}

/// What picks a cuBLASLt algorithm: the problem, the epilogue (0 none, 1 bias, 2 GELU_AUX_BIAS,
/// 3 DGELU), and the alignments (bytes) of A, B, C, the bias and the aux matrix.
type AlgoKey = (Gemm, u8, [u32; 5]);

struct BlasLt {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// Chosen algorithms by problem (heuristics are slow to ask for every call); `None` where a
    /// GELU epilogue has none (the caller falls back to separate kernels).
    algos: Mutex<HashMap<AlgoKey, Option<ltsys::cublasLtMatmulAlgo_t>>>,
}

// SAFETY: cuBLASLt handles may be shared across threads, and the runtime's in-process ranks do
// call from several; every product is ordered on the one compute stream, so the shared
// workspace serves one product at a time, and the algorithm cache is behind a mutex.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: created in CudaGpu::new and destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl CudaGpu {
    /// Opens the GPU of a rank with this local rank (see [`crate::device::gpu_for_local_rank`]).
    ///
    /// # Errors
    /// As [`CudaGpu::new`]; more local ranks than visible GPUs.
    pub fn for_local_rank(local_rank: usize) -> Result<Self, GpuError> {
        let visible = crate::device::probe_cuda()?.len();
        let ordinal = crate::device::gpu_for_local_rank(local_rank, visible)
            .map_err(|detail| GpuError::Driver { op: "choosing this rank's GPU".into(), detail })?;
        Self::new(ordinal)
    }

    /// Opens device `ordinal`, compiles (or loads from the cache) the kernels for its
    /// architecture and creates the cuBLASLt handle.
    ///
    /// # Errors
    /// No driver, no such device, no NVRTC or cuBLASLt library, a compile error.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        let devices = crate::device::probe_cuda()?;
        if ordinal >= devices.len() {
            return Err(GpuError::Driver {
                op: "opening a device".into(),
                detail: format!("device {ordinal} requested, {} present", devices.len()),
            });
        }
        // SAFETY: probes the library by name only.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(GpuError::Blas {
                op: "loading".into(),
                detail: "libcublasLt.so was not found on the library path".into(),
            });
        }
        let info = &devices[ordinal];
        let arch = format!("sm_{}{}", info.compute_capability.0, info.compute_capability.1);
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        let stream = ctx.new_stream().map_err(driver("creating the compute stream"))?;
        // SAFETY: troupe orders its streams itself: every buffer is allocated and used by cudarc on
        // the compute stream only, and NCCL's accesses on a communicator's stream are ordered by
        // explicit events (`NcclComm::after_compute` / `compute_after`). cudarc's per-slice
        // event tracking would add an event record to every kernel argument for nothing.
        unsafe { ctx.disable_event_tracking() };
        if ldmatrix_disabled() {
            eprintln!(
                "troupe: TROUPE_NO_LDMATRIX is set: the tensor-core attention loads its fragments element by element"
            );
        }
        if cp_async_disabled() {
            eprintln!(
                "troupe: TROUPE_NO_CP_ASYNC is set: the tensor-core attention loads its tiles synchronously"
            );
        }
        let autotune = std::env::var_os("TROUPE_GEMM_AUTOTUNE").is_some_and(|v| !v.is_empty() && v != "0");
        if autotune {
            eprintln!(
                "troupe: TROUPE_GEMM_AUTOTUNE is set: each matrix product's first call times cuBLASLt's top \
                 candidates"
            );
        }
        let ptx = compile_ptx(&arch, false)?;
        let names = ptx_entries(&ptx);
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| GpuError::Driver {
            op: "loading the kernel module".into(),
            detail: format!(
                "{e} (PTX from NVRTC {}; the driver supports CUDA {}: an NVRTC newer than the driver \
                     writes PTX the driver cannot load — use the NVRTC of the driver's CUDA version)",
                nvrtc_version(),
                driver_version()
            ),
        })?;
        let mut functions = HashMap::new();
        for name in names {
            let f = module.load_function(&name).map_err(driver("finding a kernel"))?;
            functions.insert(name, f);
        }
        let handle = lt::create_handle().map_err(blas("creating the handle"))?;
        // SAFETY: zero-initialised scratch owned by the handle's user.
        let workspace =
            stream.alloc_zeros::<u8>(BLAS_WORKSPACE).map_err(driver("allocating the cuBLASLt workspace"))?;
        let timeout = gpu_timeout()?;
        Ok(CudaGpu {
            ctx,
            stream,
            comm_streams: Mutex::new(Vec::new()),
            functions,
            blas: BlasLt { handle, workspace, algos: Mutex::new(HashMap::new()) },
            name: info.name.clone(),
            arch,
            compute_capability: info.compute_capability,
            profile: Mutex::new(None),
            memory: Arc::default(),
            timeout,
            gemm_autotune: std::sync::atomic::AtomicBool::new(autotune),
            gemm_tuned: std::sync::atomic::AtomicUsize::new(0),
            gemm_retuned: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Turns the tuning of matrix products on or off: when on, the first call of each product
    /// (shape, transposes, epilogue, alignments) runs each of cuBLASLt's top candidate
    /// algorithms a few times on its own operands, timed by events, and keeps the fastest;
    /// when off, the heuristic's first choice. Off unless `TROUPE_GEMM_AUTOTUNE` is set (and not
    /// "0"). Choices already made stay.
    pub fn set_gemm_autotune(&self, on: bool) {
        self.gemm_autotune.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Products tuned so far, and how many of them kept another algorithm than the heuristic's
    /// first choice.
    pub fn gemm_tuning(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.gemm_tuned.load(Relaxed), self.gemm_retuned.load(Relaxed))
    }

    /// The compute stream (kernels and matrix products).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new stream for one NCCL communicator's work, which [`Gpu::synchronize`] waits for too
    /// while it is in use. A stream per communicator: a pipeline link's receive, posted early and
    /// waiting for its peer, does not hold back the data-parallel sums queued after it, nor do
    /// those sums hold back the link's next send (PyTorch's process groups do the same).
    ///
    /// # Errors
    /// The driver cannot create a stream.
    pub fn new_comm_stream(&self) -> Result<Arc<CudaStream>, GpuError> {
        let s = self.ctx.new_stream().map_err(driver("creating a communication stream"))?;
        let mut streams = self.comm_streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        streams.retain(|w| w.strong_count() > 0);
        streams.push(Arc::downgrade(&s));
        Ok(s)
    }

    /// Makes the compute stream wait for `event` (recorded on another stream), without waiting
    /// on the host.
    pub fn compute_waits(&self, event: &CudaEvent) -> Result<(), GpuError> {
        self.stream.wait(event).map_err(driver("ordering compute after an event"))
    }

    /// Makes `stream` wait for everything queued on the compute stream so far (an event, not a
    /// host wait): a gradient bucket is sent or summed once the backward has written it.
    pub fn after_compute(&self, stream: &CudaStream) -> Result<(), GpuError> {
        let ev = self.stream.record_event(None).map_err(driver("recording a compute event"))?;
        stream.wait(&ev).map_err(driver("ordering communication after compute"))
    }

    /// Makes the compute stream wait for everything queued on `stream` so far.
    pub fn compute_after(&self, stream: &CudaStream) -> Result<(), GpuError> {
        let ev = stream.record_event(None).map_err(driver("recording a communication event"))?;
        self.stream.wait(&ev).map_err(driver("ordering compute after communication"))
    }

    /// Runs `f` (which queues work on the compute stream) between two timing events when
    /// profiling is on.
    fn timed<R>(
        &self,
        name: impl FnOnce() -> String,
        f: impl FnOnce() -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        let on = self.profile.lock().map(|p| p.is_some()).unwrap_or(false);
        if !on {
            return f();
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags).map_err(driver("recording a timing event"))?;
        let out = f()?;
        let end = self.stream.record_event(flags).map_err(driver("recording a timing event"))?;
        if let Ok(mut p) = self.profile.lock()
            && let Some(list) = p.as_mut()
        {
            list.push((name(), start, end));
        }
        Ok(out)
    }

    /// The device's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The raw device pointer of `d` (for NCCL).
    pub fn device_ptr(&self, d: Dev<'_, CudaBuf>) -> u64 {
        // Raw driver and cuBLASLt calls use the thread's current context: the actor runtime calls
        // from its compute thread, not the thread that made the context. Binding is a cheap check
        // when it is current already; a failure resurfaces from the call that follows.
        let _ = self.stream.context().bind_to_thread();
        let (ptr, _sync) = d.buf.slice.device_ptr(&self.stream);
        ptr + d.offset as u64
    }
}

/// The kernel names a PTX module defines (its `.entry` directives). Kernel files generate many
/// kernels with macros, so the compiled module, not the source text, is the list.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l
                .trim_start()
                .strip_prefix(".visible .entry ")
                .or_else(|| l.trim_start().strip_prefix(".entry "))?;
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// A row-major [`Gemm`] as the column-major problem cuBLASLt solves: row-major `C = op(A)·op(B)`
/// is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLASLt's first operand is our `b` and its second
/// our `a`, with the transposes carried over. Kept apart from the call so that a test can check
/// it against a plain column-major GEMM on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LtProblem {
    /// cuBLASLt's M, N, K.
    pub m: u64,
    pub n: u64,
    pub k: u64,
    /// Transposes of cuBLASLt's A (our `b`) and B (our `a`).
    pub trans_a: bool,
    pub trans_b: bool,
    /// Stored (rows, cols, leading dimension) of cuBLASLt's A and B; C is (m, n, m).
    pub a: (u64, u64, i64),
    pub b: (u64, u64, i64),
}

impl LtProblem {
    pub fn of(g: &Gemm) -> Self {
        let (m, n, k) = (g.n as u64, g.m as u64, g.k as u64);
        LtProblem {
            m,
            n,
            k,
            trans_a: g.trans_b,
            trans_b: g.trans_a,
            a: if g.trans_b { (k, m, k as i64) } else { (m, k, m as i64) },
            b: if g.trans_a { (n, k, n as i64) } else { (k, n, k as i64) },
        }
    }
}

fn lt_type(d: DType) -> ltsys::cudaDataType {
    match d {
        DType::F32 => ltsys::cudaDataType_t::CUDA_R_32F,
        DType::Bf16 => ltsys::cudaDataType_t::CUDA_R_16BF,
    }
}

struct Layouts {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    c: ltsys::cublasLtMatrixLayout_t,
}

impl Drop for Layouts {
    fn drop(&mut self) {
        // SAFETY: each was created once in `gemm` and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Gpu for CudaGpu {
    type Buf = CudaBuf;

    fn describe(&self) -> String {
        format!("{} ({})", self.name, self.arch)
    }

    fn tensor_cores(&self) -> bool {
        self.compute_capability.0 >= 8
    }

    fn alloc(&self, bytes: usize) -> Result<CudaBuf, GpuError> {
        let slice =
            self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(driver("allocating device memory"))?;
        self.memory.add(slice.len());
        Ok(CudaBuf { slice, counter: self.memory.clone() })
    }

    fn memory(&self) -> MemoryStats {
        self.memory.stats()
    }

    fn reset_peak_memory(&self) {
        self.memory.reset_peak();
    }

    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.slice.len()
    }

    fn upload(&self, dst: &mut CudaBuf, offset: usize, src: &[u8]) -> Result<(), GpuError> {
        self.memory.up(src.len());
        check_range("upload", "destination", offset, src.len(), dst.slice.len())?;
        self.wait_for(&self.stream, "waiting for the GPU before a copy to the device")?;
        let mut view = dst.slice.slice_mut(offset..offset + src.len());
        self.stream.memcpy_htod(src, &mut view).map_err(driver("copying to the device"))?;
        self.wait_for(&self.stream, "waiting for a copy to the device")
    }

    fn write(&self, dst: Dev<'_, CudaBuf>, src: &[u8]) -> Result<(), GpuError> {
        self.memory.up(src.len());
        check_range("write", "destination", dst.offset, src.len(), dst.buf.slice.len())?;
        let ptr = self.device_ptr(dst);
        self.wait_for(&self.stream, "waiting for the GPU before a copy to the device")?;
        // SAFETY: the range is inside a device buffer of this context (checked above); the copy is
        // ordered on the compute stream and finished before returning, so `src` may be reused.
        unsafe { cudarc::driver::result::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(driver("copying to the device"))?;
        self.wait_for(&self.stream, "waiting for a copy to the device")
    }

    fn download(&self, src: &CudaBuf, offset: usize, dst: &mut [u8]) -> Result<(), GpuError> {
        self.memory.down(dst.len());
        check_range("download", "source", offset, dst.len(), src.slice.len())?;
        // A copy into pageable memory blocks until it is done: wait (bounded) for the work before
        // it first.
        self.wait_for(&self.stream, "waiting for the GPU before a copy from the device")?;
        let view = src.slice.slice(offset..offset + dst.len());
        self.stream.memcpy_dtoh(&view, dst).map_err(driver("copying from the device"))?;
        self.wait_for(&self.stream, "waiting for a copy from the device")
    }

    fn launch(
        &self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: &[Arg<'_, CudaBuf>],
    ) -> Result<(), GpuError> {
        self.timed(|| kernel.to_string(), || self.launch_now(kernel, grid, block, smem, args))
    }

    fn gemm(
        &self,
        g: &Gemm,
        c: Dev<'_, CudaBuf>,
        a: Dev<'_, CudaBuf>,
        b: Dev<'_, CudaBuf>,
        bias: Option<Dev<'_, CudaBuf>>,
    ) -> Result<(), GpuError> {
        let name = || {
            let t = |x: bool| if x { "T" } else { "N" };
            format!(
                "gemm {}x{}x{} {}{}{}",
                g.m,
                g.n,
                g.k,
                t(g.trans_a),
                t(g.trans_b),
                if bias.is_some() { " +bias" } else { "" }
            )
        };
        self.timed(name, || {
            check_gemm(self, g, c, a, b, bias)?;
            let epi = match bias {
                None => LtEpilogue::None,
                Some(d) => LtEpilogue::Bias(d),
            };
            if self.gemm_lt(g, c, a, b, epi)? {
                Ok(())
            } else {
                Err(GpuError::Blas {
                    op: format!("matmul {g:?}"),
                    detail: "cuBLASLt has no algorithm for this product".into(),
                })
            }
        })
    }

    fn gemm_gelu(
        &self,
        g: &Gemm,
        c: Dev<'_, CudaBuf>,
        a: Dev<'_, CudaBuf>,
        b: Dev<'_, CudaBuf>,
        epi: GeluEpilogue<'_, CudaBuf>,
    ) -> Result<bool, GpuError> {
        check_gemm_gelu(self, g, c, a, b, &epi)?;
        let name = || {
            let which = if matches!(epi, GeluEpilogue::Forward { .. }) { "+bias+gelu" } else { "·dgelu" };
            format!("gemm {}x{}x{} {}", g.m, g.n, g.k, which)
        };
        let epi = match epi {
            GeluEpilogue::Forward { bias, aux } => LtEpilogue::GeluAuxBias { bias, aux },
            GeluEpilogue::Backward { aux } => LtEpilogue::DGelu { aux },
        };
        self.timed(name, || self.gemm_lt(g, c, a, b, epi))
    }

    fn stream_time(&self) -> Result<super::StreamTime, GpuError> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = self.stream.record_event(flags).map_err(driver("recording a timing event"))?;
        Ok(super::StreamTime::Event(event))
    }

    fn stream_seconds(&self, start: &super::StreamTime, end: &super::StreamTime) -> Result<f64, GpuError> {
        use super::StreamTime::Event;
        let (Event(a), Event(b)) = (start, end) else {
            return Err(GpuError::Driver {
                op: "Gpu::stream_seconds".into(),
                detail: "stream times of another device".into(),
            });
        };
        // Bounded here, so that reading the times (which waits for both events) cannot hang.
        self.wait_event(b, "waiting for a timing event")?;
        let ms = a.elapsed_ms(b).map_err(driver("reading a timing event"))?;
        Ok(f64::from(ms) * 1e-3)
    }

    fn set_profiling(&self, on: bool) {
        if let Ok(mut p) = self.profile.lock() {
            *p = if on { Some(Vec::new()) } else { None };
        }
    }

    fn take_profile(&self) -> Result<Vec<KernelTime>, GpuError> {
        let events = match self.profile.lock() {
            Ok(mut p) => p.as_mut().map(std::mem::take).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut by_name: HashMap<String, (usize, f64)> = HashMap::new();
        for (name, start, end) in events {
            let ms = start.elapsed_ms(&end).map_err(driver("reading a timing event"))?;
            let e = by_name.entry(name).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += f64::from(ms);
        }
        let mut out: Vec<KernelTime> =
            by_name.into_iter().map(|(name, (calls, ms))| KernelTime { name, calls, ms }).collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(out)
    }
    fn copy(&self, dst: Dev<'_, CudaBuf>, src: Dev<'_, CudaBuf>, bytes: usize) -> Result<(), GpuError> {
        for (what, d) in [("destination", dst), ("source", src)] {
            check_range("copy", what, d.offset, bytes, d.buf.slice.len())?;
        }
        if bytes == 0 {
            return Ok(());
        }
        let (s, d) = (self.device_ptr(src), self.device_ptr(dst));
        // SAFETY: both ranges are inside device buffers of this context (checked above); the copy
        // is ordered on the compute stream.
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, bytes, self.stream.cu_stream()) }
            .map_err(driver("copying on the device"))
    }

    fn zero(&self, dst: Dev<'_, CudaBuf>, bytes: usize) -> Result<(), GpuError> {
        check_range("zero", "destination", dst.offset, bytes, dst.buf.slice.len())?;
        if bytes == 0 {
            return Ok(());
        }
        let d = self.device_ptr(dst);
        // SAFETY: inside a device buffer of this context (checked above); ordered on the stream.
        unsafe { cudarc::driver::result::memset_d8_async(d, 0, bytes, self.stream.cu_stream()) }
            .map_err(driver("zeroing device memory"))
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.wait_for(&self.stream, "synchronising the compute stream")?;
        let live: Vec<Arc<CudaStream>> = {
            let streams = self.comm_streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            streams.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        for s in &live {
            self.wait_for(s, "synchronising a communication stream")?;
        }
        Ok(())
    }
}

impl CudaGpu {
    /// Waits until `stream` has run the work queued on it so far, for at most the GPU timeout
    /// (a kernel that never ends or a collective whose peer never arrives is an error naming
    /// `what`, not a hang). Polls an event: spinning briefly, then yielding, then sleeping 50 µs.
    fn wait_for(&self, stream: &CudaStream, what: &str) -> Result<(), GpuError> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let event = stream.record_event(flags).map_err(driver(what))?;
        self.wait_event(&event, what)
    }

    /// Waits until the device has passed `event`, bounded like [`CudaGpu::wait_for`].
    fn wait_event(&self, event: &CudaEvent, what: &str) -> Result<(), GpuError> {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        loop {
            if event.try_is_complete().map_err(driver(what))? {
                return Ok(());
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                return Err(GpuError::Driver {
                    op: what.to_string(),
                    detail: format!(
                        "the GPU did not finish its queued work within {:?} (a kernel that does not end, or a \
                         collective whose peer never came); TROUPE_GPU_TIMEOUT=<seconds> sets the limit",
                        self.timeout
                    ),
                });
            }
            if waited < Duration::from_micros(200) {
                std::hint::spin_loop();
            } else if waited < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn launch_now(
        &self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: &[Arg<'_, CudaBuf>],
    ) -> Result<(), GpuError> {
        let fail =
            |detail: String| GpuError::Launch { kernel: kernel.to_string(), grid, block, smem, detail };
        let func = self.functions.get(kernel).ok_or_else(|| fail("no kernel of that name".into()))?;
        let views: Vec<_> = args
            .iter()
            .filter_map(|a| match a {
                Arg::Ptr(d) => Some(d.buf.slice.slice(d.offset..)),
                _ => None,
            })
            .collect();
        let mut builder = self.stream.launch_builder(func);
        let mut next_view = views.iter();
        for a in args {
            match a {
                Arg::Ptr(_) => {
                    if let Some(v) = next_view.next() {
                        builder.arg(v);
                    }
                }
                Arg::I32(v) => {
                    builder.arg(v);
                }
                Arg::U32(v) => {
                    builder.arg(v);
                }
                Arg::U64(v) => {
                    builder.arg(v);
                }
                Arg::F32(v) => {
                    builder.arg(v);
                }
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (block[0], block[1], block[2]),
            shared_mem_bytes: smem,
        };
        // SAFETY: argument order and types follow the kernel's parameter list (the ops layer's
        // contract, checked by the emulated tests); buffer sizes were checked by the caller.
        unsafe { builder.launch(cfg) }.map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// One cuBLASLt product with epilogue `epi` (operands already checked). `Ok(false)`, with
    /// nothing queued, when a GELU epilogue has no algorithm for the problem (a plain or bias
    /// product without one is an error).
    fn gemm_lt(
        &self,
        g: &Gemm,
        c: Dev<'_, CudaBuf>,
        a: Dev<'_, CudaBuf>,
        b: Dev<'_, CudaBuf>,
        epi: LtEpilogue<'_>,
    ) -> Result<bool, GpuError> {
        let (bias, aux) = match epi {
            LtEpilogue::None => (None, None),
            LtEpilogue::Bias(b) => (Some(b), None),
            LtEpilogue::GeluAuxBias { bias, aux } => (Some(bias), Some(aux)),
            LtEpilogue::DGelu { aux } => (None, Some(aux)),
        };
        let gelu = aux.is_some();
        let aux_ptr = aux.map(|d| self.device_ptr(d));
        // GELU's aux matrix: leading dimension (our row length) a multiple of 8 elements, and
        // 16-byte aligned; otherwise the caller's separate kernels do it.
        if let Some(p) = aux_ptr
            && (!g.n.is_multiple_of(8) || !p.is_multiple_of(16))
        {
            return Ok(false);
        }
        // Row-major C[m,n] = op(A)·op(B) is column-major Cᵀ[n,m] = op(B)ᵀ·op(A)ᵀ: cuBLASLt
        // multiplies B' = our A after A' = our B, with the transposes carried over.
        let p = LtProblem::of(g);
        let (m, n) = (p.m, p.n);
        let ty = lt_type(g.dtype);
        let (a_rows, a_cols, lda) = p.a;
        let (b_rows, b_cols, ldb) = p.b;
        let compute = ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let layouts = Layouts {
            desc: lt::create_matmul_desc(compute, ltsys::cudaDataType_t::CUDA_R_32F)
                .map_err(blas("matmul descriptor"))?,
            a: lt::create_matrix_layout(ty, a_rows, a_cols, lda).map_err(blas("layout of A"))?,
            b: lt::create_matrix_layout(ty, b_rows, b_cols, ldb).map_err(blas("layout of B"))?,
            c: lt::create_matrix_layout(lt_type(g.c_dtype), m, n, m as i64).map_err(blas("layout of C"))?,
        };
        let set = |attr: ltsys::cublasLtMatmulDescAttributes_t, value: &[u8]| {
            // SAFETY: the descriptor is alive; the value has the attribute's size.
            unsafe { lt::set_matmul_desc_attribute(layouts.desc, attr, value.as_ptr().cast(), value.len()) }
                .map_err(blas("matmul attribute"))
        };
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let op = |t: bool| i32::from(t);
        set(
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(p.trans_a).to_ne_bytes(),
        )?;
        set(
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(p.trans_b).to_ne_bytes(),
        )?;
        // The bias epilogue wants a 16-byte-aligned vector (other libraries report failures with
        // less); a bias inside the parameter arena need not be (hidden sizes that are not a
        // multiple of 8), so such a bias is first copied to an aligned buffer, ordered on the
        // stream before the product (freed stream-ordered after it).
        let mut _bias_copy = None;
        let bias_ptr = match bias {
            None => None,
            Some(d) if self.device_ptr(d).is_multiple_of(16) => Some(self.device_ptr(d)),
            Some(d) => {
                let bytes = g.n * g.dtype.size();
                let copy = self.alloc(bytes)?;
                self.copy(Dev::new(&copy), d, bytes)?;
                let ptr = self.device_ptr(Dev::new(&copy));
                _bias_copy = Some(copy);
                Some(ptr)
            }
        };
        use ltsys::cublasLtEpilogue_t as E;
        let (epi_code, epi_kind) = match epi {
            LtEpilogue::None => (E::CUBLASLT_EPILOGUE_DEFAULT, 0u8),
            LtEpilogue::Bias(_) => (E::CUBLASLT_EPILOGUE_BIAS, 1),
            LtEpilogue::GeluAuxBias { .. } => (E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS, 2),
            LtEpilogue::DGelu { .. } => (E::CUBLASLT_EPILOGUE_DGELU, 3),
        };
        if epi_kind != 0 {
            let code = epi_code as u32;
            set(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &code.to_ne_bytes())?;
        }
        if let Some(ptr) = aux_ptr {
            // The aux matrix has C's layout: column-major n × m (our m × n row-major), ld = n.
            set(
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                &ptr.to_ne_bytes(),
            )?;
            set(
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                &(g.n as i64).to_ne_bytes(),
            )?;
            set(
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE,
                &(lt_type(g.dtype) as i32).to_ne_bytes(),
            )?;
        }
        if let Some(ptr) = bias_ptr {
            set(
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &ptr.to_ne_bytes(),
            )?;
            // The bias is stored like A and B (its default would be D's type, which differs for
            // fp32 outputs of bf16 operands).
            set(
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &(lt_type(g.dtype) as i32).to_ne_bytes(),
            )?;
        }
        // cuBLASLt assumes 256-byte-aligned operands unless told otherwise; parameter views inside
        // the arena can be less aligned, so the actual alignments pick the algorithm (and key it).
        let align = |p: u64| -> u32 { 1u32 << p.trailing_zeros().min(8) };
        let (a_ptr, b_ptr, c_ptr) = (self.device_ptr(b), self.device_ptr(a), self.device_ptr(c));
        let aligns = [
            align(a_ptr),
            align(b_ptr),
            align(c_ptr),
            bias_ptr.map_or(256, align),
            aux_ptr.map_or(256, align),
        ];
        let key = (*g, epi_kind, aligns);
        let algo = {
            let mut algos = self.blas.algos.lock().map_err(|_| GpuError::Blas {
                op: "algorithm cache".into(),
                detail: "a thread panicked while holding it".into(),
            })?;
            match algos.get(&key) {
                Some(Some(a)) => *a,
                Some(None) => return Ok(false),
                None => {
                    let pref = lt::create_matmul_pref().map_err(blas("preferences"))?;
                    let ws = BLAS_WORKSPACE;
                    // SAFETY: `pref` is alive; the value is a usize as the attribute requires.
                    unsafe {
                        lt::set_matmul_pref_attribute(
                            pref,
                            ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                            (&ws as *const usize).cast(),
                            std::mem::size_of::<usize>(),
                        )
                    }
                    .map_err(blas("workspace preference"))?;
                    use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
                    for (attr, bytes) in [
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aligns[0]),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, aligns[1]),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, aligns[2]),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, aligns[2]),
                    ] {
                        // SAFETY: `pref` is alive; the value is a u32 as the attribute requires.
                        unsafe {
                            lt::set_matmul_pref_attribute(
                                pref,
                                attr,
                                (&bytes as *const u32).cast(),
                                std::mem::size_of::<u32>(),
                            )
                        }
                        .map_err(blas("alignment preference"))?;
                    }
                    let tune = self.gemm_autotune.load(std::sync::atomic::Ordering::Relaxed);
                    let found = self.heuristics(&layouts, pref, if tune { GEMM_CANDIDATES } else { 1 });
                    // SAFETY: created above, destroyed once.
                    unsafe {
                        let _ = lt::destroy_matmul_pref(pref);
                    }
                    let candidates = match found {
                        Ok(c) => c,
                        Err(e) if gelu => {
                            tracing::debug!(
                                "cuBLASLt has no GELU epilogue for {g:?} ({e}): separate kernels"
                            );
                            algos.insert(key, None);
                            return Ok(false);
                        }
                        Err(e) => return Err(blas("choosing an algorithm")(e)),
                    };
                    let algo = if candidates.len() > 1 {
                        let run = |algo: &ltsys::cublasLtMatmulAlgo_t, c_ptr: u64| {
                            self.lt_matmul(&layouts, g.accumulate, [a_ptr, b_ptr, c_ptr], algo)
                        };
                        // C is read by the product when it accumulates, or when it is the aux
                        // input of an in-place DGELU: tuning runs go to a scratch C then.
                        let reads_c = g.accumulate
                            || (matches!(epi, LtEpilogue::DGelu { .. }) && aux_ptr == Some(c_ptr));
                        self.fastest(g, &candidates, c_ptr, reads_c, &run)?
                    } else {
                        candidates[0]
                    };
                    algos.insert(key, Some(algo));
                    algo
                }
            }
        };
        self.lt_matmul(&layouts, g.accumulate, [a_ptr, b_ptr, c_ptr], &algo)?;
        Ok(true)
    }

    /// Up to `count` algorithms cuBLASLt's heuristic proposes for a product, best first (only
    /// those that succeed and fit the workspace).
    fn heuristics(
        &self,
        layouts: &Layouts,
        pref: ltsys::cublasLtMatmulPreference_t,
        count: usize,
    ) -> Result<Vec<ltsys::cublasLtMatmulAlgo_t>, cudarc::cublaslt::result::CublasError> {
        // SAFETY: a plain C struct of integers and an enum whose zero is CUBLAS_STATUS_SUCCESS;
        // cuBLASLt overwrites the first `found` entries.
        let mut results: Vec<ltsys::cublasLtMatmulHeuristicResult_t> =
            (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut found = 0i32;
        // SAFETY: every handle passed is alive; `results` has room for `count` entries.
        unsafe {
            ltsys::cublasLtMatmulAlgoGetHeuristic(
                self.blas.handle,
                layouts.desc,
                layouts.a,
                layouts.b,
                layouts.c,
                layouts.c,
                pref,
                count as i32,
                results.as_mut_ptr(),
                &mut found,
            )
        }
        .result()?;
        let ok = ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        let algos: Vec<_> = results
            .iter()
            .take(found.max(0) as usize)
            .filter(|r| r.state == ok && r.workspaceSize <= BLAS_WORKSPACE)
            .map(|r| r.algo)
            .collect();
        if algos.is_empty() {
            return Err(cudarc::cublaslt::result::CublasError(
                ltsys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            ));
        }
        Ok(algos)
    }

    /// The fastest of `candidates` for product `g` (heuristic order breaks ties), each run once
    /// and then [`GEMM_TUNING_RUNS`] times between timing events on the compute stream. `run`
    /// computes the product with an algorithm into the C at a pointer: a product that reads its
    /// C (`reads_c`: it accumulates, or C is its DGELU input) is tuned into a zeroed scratch C
    /// (the real one must be used once), any other on its own output (and GELU aux), which the
    /// real call then overwrites whole. A candidate that fails to run is passed over.
    fn fastest(
        &self,
        g: &Gemm,
        candidates: &[ltsys::cublasLtMatmulAlgo_t],
        c_ptr: u64,
        reads_c: bool,
        run: &dyn Fn(&ltsys::cublasLtMatmulAlgo_t, u64) -> Result<(), GpuError>,
    ) -> Result<ltsys::cublasLtMatmulAlgo_t, GpuError> {
        use std::sync::atomic::Ordering::Relaxed;
        let scratch = match reads_c {
            true => {
                let bytes = g.m * g.n * g.c_dtype.size();
                let buf = self.alloc(bytes)?;
                self.zero(Dev::new(&buf), bytes)?;
                Some(buf)
            }
            false => None,
        };
        let target = scratch.as_ref().map_or(c_ptr, |b| self.device_ptr(Dev::new(b)));
        let mut best: Option<(f64, usize)> = None;
        let mut times = Vec::new();
        for (i, algo) in candidates.iter().enumerate() {
            if let Err(e) = run(algo, target) {
                tracing::debug!("cuBLASLt candidate {i} for {g:?} does not run: {e}");
                continue;
            }
            let start = self.stream_time()?;
            for _ in 0..GEMM_TUNING_RUNS {
                run(algo, target)?;
            }
            let end = self.stream_time()?;
            let t = self.stream_seconds(&start, &end)?;
            times.push((i, t));
            if best.is_none_or(|(b, _)| t < b) {
                best = Some((t, i));
            }
        }
        let Some((t, i)) = best else {
            return Err(GpuError::Blas {
                op: "tuning a product".into(),
                detail: format!("none of the {} candidate algorithms for {g:?} runs", candidates.len()),
            });
        };
        self.gemm_tuned.fetch_add(1, Relaxed);
        if i > 0 {
            self.gemm_retuned.fetch_add(1, Relaxed);
        }
        tracing::debug!(
            "cuBLASLt tuning of {g:?}: candidate {i} of {} ({:.1} µs per run); all: {times:?}",
            candidates.len(),
            t * 1e6 / GEMM_TUNING_RUNS as f64
        );
        Ok(candidates[i])
    }

    /// One cuBLASLt product with `algo`: `ptrs` = [cuBLASLt's A (our B), its B (our A), C],
    /// C added to (`accumulate`) or overwritten.
    fn lt_matmul(
        &self,
        layouts: &Layouts,
        accumulate: bool,
        ptrs: [u64; 3],
        algo: &ltsys::cublasLtMatmulAlgo_t,
    ) -> Result<(), GpuError> {
        let [a_ptr, b_ptr, c_ptr] = ptrs;
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        let (ws, _sync) = self.blas.workspace.device_ptr(&self.stream);
        // SAFETY: shapes checked above; all descriptors alive; pointers are device memory of
        // this context; the call is ordered on the compute stream.
        unsafe {
            lt::matmul(
                self.blas.handle,
                layouts.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a_ptr as *const _,
                layouts.a,
                b_ptr as *const _,
                layouts.b,
                c_ptr as *const _,
                layouts.c,
                c_ptr as *mut _,
                layouts.c,
                algo,
                ws as *mut _,
                BLAS_WORKSPACE,
                self.stream.cu_stream() as *mut _,
            )
        }
        .map_err(blas("matmul"))
    }
}

/// The epilogue of one cuBLASLt product.
#[derive(Clone, Copy)]
enum LtEpilogue<'a> {
    None,
    Bias(Dev<'a, CudaBuf>),
    GeluAuxBias { bias: Dev<'a, CudaBuf>, aux: Dev<'a, CudaBuf> },
    DGelu { aux: Dev<'a, CudaBuf> },
}

/// The process-wide CUDA device 0 for tests: `None` (after printing "SKIPPED" and why) on a
/// machine without a usable GPU, driver, NVRTC or cuBLASLt.
pub fn shared() -> Option<&'static CudaGpu> {
    static GPU: std::sync::OnceLock<Option<CudaGpu>> = std::sync::OnceLock::new();
    GPU.get_or_init(|| match CudaGpu::new(0) {
        Ok(gpu) => {
            eprintln!("GPU tests run on {}", gpu.describe());
            Some(gpu)
        }
        Err(e) => {
            eprintln!("SKIPPED the CUDA half of the GPU kernel tests (no GPU here): {e}");
            None
        }
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_reports_are_read_kernel_by_kernel() {
        let log = "troupe.cu(3): warning #1556-D: something\n\
            ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'dq_hs128' for 'sm_90'\n\
            ptxas info    : Function properties for dq_hs128\n\
            ptxas         .     8 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads\n\
            ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size\n\
            ptxas info    : Compiling entry function 'gelu' for 'sm_90'\n\
            ptxas info    : Function properties for gelu\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 18 registers, used 0 barriers, 380 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'bare' for 'sm_90'\n";
        let k = parse_ptxas_report(log);
        let row = |name: &str, registers, stack_bytes, spill_store_bytes, spill_load_bytes| KernelResources {
            name: name.into(),
            registers,
            stack_bytes,
            spill_store_bytes,
            spill_load_bytes,
        };
        assert_eq!(
            k,
            vec![row("dq_hs128", 128, 8, 8, 16), row("gelu", 18, 0, 0, 0), row("bare", 0, 0, 0, 0)]
        );
        assert!(parse_ptxas_report("nvrtc: error: failed to open libnvrtc-builtins.so.13.0").is_empty());
        let e = kernel_resources("compute_90", false, KernelOptions::from_env()).unwrap_err().to_string();
        assert!(e.contains("real architecture") && e.contains("compute_90"), "{e}");
    }

    #[test]
    fn the_gpu_timeout_defaults_to_ten_minutes_and_refuses_nonsense() {
        use std::time::Duration;
        assert_eq!(parse_gpu_timeout(None).unwrap(), Duration::from_secs(600));
        assert_eq!(parse_gpu_timeout(Some(" 2.5 ")).unwrap(), Duration::from_millis(2500));
        for bad in ["", "0", "-1", "inf", "NaN", "ten"] {
            let e = parse_gpu_timeout(Some(bad)).expect_err(bad).to_string();
            assert!(e.contains("TROUPE_GPU_TIMEOUT") && e.contains("positive"), "{bad:?}: {e}");
        }
    }

    /// BLAS's column-major `C = op(A)·op(B)` (element (i, j) at `i + j·ld`).
    #[allow(clippy::too_many_arguments)]
    fn colmajor(p: &LtProblem, a: &[f64], b: &[f64]) -> Vec<f64> {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (lda, ldb) = (p.a.2 as usize, p.b.2 as usize);
        let at = |i: usize, l: usize| if p.trans_a { a[l + i * lda] } else { a[i + l * lda] };
        let bt = |l: usize, j: usize| if p.trans_b { b[j + l * ldb] } else { b[l + j * ldb] };
        let mut c = vec![0.0; m * n];
        for j in 0..n {
            for i in 0..m {
                c[i + j * m] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    #[test]
    fn the_column_major_mapping_computes_the_row_major_product() {
        let (m, k, n) = (5usize, 7usize, 3usize);
        let vals = |len: usize, seed: usize| -> Vec<f64> {
            (0..len).map(|i| ((i * 7 + seed) % 11) as f64 - 5.0).collect()
        };
        for g in [
            Gemm::linear(m, k, n, DType::F32),
            Gemm::linear_backward_input(m, k, n, DType::F32),
            Gemm::linear_backward_weight(m, k, n, DType::F32),
        ] {
            let (a, b) = (vals(g.m * g.k, 1), vals(g.k * g.n, 2));
            // Row-major reference with the Gemm's own conventions.
            let mut want = vec![0.0; g.m * g.n];
            for i in 0..g.m {
                for j in 0..g.n {
                    want[i * g.n + j] = (0..g.k)
                        .map(|l| {
                            let av = if g.trans_a { a[l * g.m + i] } else { a[i * g.k + l] };
                            let bv = if g.trans_b { b[j * g.k + l] } else { b[l * g.n + j] };
                            av * bv
                        })
                        .sum();
                }
            }
            let p = LtProblem::of(&g);
            // cuBLASLt's A is our b and its B our a; the column-major result is C's bytes.
            let got = colmajor(&p, &b, &a);
            assert_eq!(got, want, "{g:?} → {p:?}");
            let (rows, cols, ld) = p.a;
            assert!(ld as u64 >= rows && rows * cols == (g.k * g.n) as u64, "{p:?}");
        }
    }
}
