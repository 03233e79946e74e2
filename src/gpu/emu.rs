//! The CPU emulator of the CUDA kernels (see the module docs of [`crate::gpu`] and
//! `cuda/emu/emu.h`). One fiber per CUDA thread, switched at barriers on the launching thread
//! (`cuda/emu/runtime.cpp`): slow next to a GPU and meant for tests with small shapes.

use std::cell::UnsafeCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Arg, DType, Dev, GeluEpilogue, Gemm, Gpu, GpuError, MemCounter, MemoryStats, check_gemm, check_gemm_gelu,
    check_range, sources,
};

/// How long one emulated launch may take before the process is stopped (a kernel in an endless
/// loop; a thread that skips a barrier is found by the launch and reported as its error).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Launches in progress, checked by one thread that aborts the process when one has run longer
/// than [`LAUNCH_TIMEOUT`] (a thread per launch cost more than many emulated kernels).
struct Watchdog {
    running: std::sync::Mutex<std::collections::HashMap<u64, (std::time::Instant, String)>>,
    next: std::sync::atomic::AtomicU64,
}

/// Removes its launch from the watchdog when dropped.
struct Watched(u64);

impl Watchdog {
    fn watch(&'static self, kernel: &str) -> Watched {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        running.insert(id, (std::time::Instant::now(), kernel.to_string()));
        Watched(id)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        watchdog().running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.0);
    }
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: std::sync::OnceLock<&'static Watchdog> = std::sync::OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::new(Watchdog {
            running: std::sync::Mutex::new(std::collections::HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        }));
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                let running = w.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some((_, kernel)) = running.values().find(|(t, _)| t.elapsed() > LAUNCH_TIMEOUT) {
                    eprintln!(
                        "emulated kernel {kernel} did not finish in {LAUNCH_TIMEOUT:?} (an endless loop?); \
                         aborting"
                    );
                    std::process::abort();
                }
            }
        });
        w
    })
}

/// Prefix of the emulator's own self-test kernels (cuda/emu/runtime.cpp; launchable, but no GPU
/// has them).
const EMU_SELFTEST: &str = "emu_selftest_";

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    u64,
    *mut *mut c_void,
    *mut c_char,
    u64,
    c_int,
    u64,
) -> c_int;
type CountFn = unsafe extern "C" fn() -> c_int;
type NameFn = unsafe extern "C" fn(c_int) -> *const c_char;
type LdmatrixStatsFn = unsafe extern "C" fn(*const c_char, *mut u64, *mut u64) -> c_int;

/// Shared-memory bank conflicts of one kernel's ldmatrix loads, over all its launches on the
/// emulator so far ([`EmuGpu::ldmatrix_bank_conflicts`]): `phases` 8×8 matrices loaded (one phase
/// of eight 16-byte row reads each) and the `extra_wavefronts` beyond one per phase that rows
/// sharing a bank group cost (0 when every load was conflict-free).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LdmatrixConflicts {
    pub phases: u64,
    pub extra_wavefronts: u64,
}

/// The order in which the emulator runs a launch's blocks, and the threads of a block between
/// two barriers (`cuda/emu/runtime.cpp`). A kernel whose threads synchronise as they must gives
/// the same bits under every schedule (troupe's kernels have no float atomics); a race — a
/// thread reading what another writes between the same two barriers, or a block reading
/// another block's output — gives different ones. In order alone hides some races (thread t
/// reading what thread t − 1 wrote without a barrier reads it as if there were one): the other
/// schedules expose them. `TROUPE_EMU_SCHEDULE=in-order|reversed|shuffled:SEED|warps:SEED` sets
/// it for a whole run (`--device emu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Blocks, and threads in each round, by increasing index (the default).
    #[default]
    InOrder,
    /// Both by decreasing index.
    Reversed,
    /// A fresh random permutation of the threads in every round, and of the blocks in every
    /// launch, from the seed and the launch's number on this emulator.
    Shuffled(u64),
    /// A warp at a time, in a random order each round (blocks shuffled too): each warp runs alone
    /// until all its threads wait at a block barrier or have ended. Round-robin over all threads
    /// keeps the warps in step at every warp-collective (shuffle, ldmatrix, mma), which hides
    /// races between warps; this schedule lets one warp run ahead of the others.
    Warps(u64),
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "in-order" => Ok(Schedule::InOrder),
            "reversed" => Ok(Schedule::Reversed),
            _ => {
                let seeded = |prefix: &str| s.strip_prefix(prefix).and_then(|seed| seed.parse().ok());
                seeded("shuffled:")
                    .map(Schedule::Shuffled)
                    .or_else(|| seeded("warps:").map(Schedule::Warps))
                    .ok_or_else(|| {
                        format!(
                            "{s:?}: expected in-order, reversed, shuffled:SEED or warps:SEED (SEED a number)"
                        )
                    })
            }
        }
    }
}

/// Host memory standing in for device memory (8-byte aligned, zeroed).
pub struct EmuBuf {
    data: UnsafeCell<Box<[u64]>>,
    bytes: usize,
    /// The emulator's byte count, given back on drop.
    counter: Arc<MemCounter>,
}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        self.counter.sub(self.bytes);
    }
}

// SAFETY: kernels write through raw pointers while the buffer is shared, exactly as on a GPU; the
// emulator runs one launch at a time and uploads/downloads only between launches.
unsafe impl Send for EmuBuf {}
unsafe impl Sync for EmuBuf {}

impl EmuBuf {
    fn ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.bytes, "device pointer {offset} past a {}-byte buffer", self.bytes);
        // SAFETY: the offset is inside the allocation (checked above).
        unsafe { ((*self.data.get()).as_mut_ptr() as *mut u8).add(offset) }
    }
}

/// Kernels compiled for the CPU (`g++ -std=c++20`), loaded as a shared library.
pub struct EmuGpu {
    lib: libloading::Library,
    kernels: Vec<String>,
    path: PathBuf,
    /// An emulated device memory size (tests of out-of-memory handling).
    limit: Option<usize>,
    memory: Arc<MemCounter>,
    schedule: std::sync::Mutex<Schedule>,
    /// Launches so far (each shuffled launch draws from the seed and its number).
    launches: std::sync::atomic::AtomicU64,
}

impl EmuGpu {
    /// Compiles (or finds in the cache) the emulated kernels. Needs `g++` (12 or newer).
    ///
    /// # Errors
    /// [`GpuError::EmuBuild`] when g++ is missing or the kernels do not compile.
    pub fn new() -> Result<Self, GpuError> {
        let io = |e: GpuError| GpuError::EmuBuild(e.to_string());
        let mut src = String::new();
        src.push_str(&sources::text("emu/emu.h", sources::EMU_HEADER).map_err(io)?);
        src.push_str("\n#line 1 \"prelude.cuh\"\n");
        src.push_str(&sources::text("prelude.cuh", sources::PRELUDE).map_err(io)?);
        for (name, text) in sources::kernel_files().map_err(io)? {
            src.push_str(&format!("\n#line 1 \"{name}\"\n"));
            src.push_str(&text);
        }
        src.push_str("\n#line 1 \"runtime.cpp\"\n");
        src.push_str(&sources::text("emu/runtime.cpp", sources::EMU_RUNTIME).map_err(io)?);
        const FLAGS: &[&str] = &["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-w"];
        let key = sources::hash_texts(&[&src, &FLAGS.join(" ")]);
        let dir = std::env::var_os("TROUPE_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("troupe-cache"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| GpuError::EmuBuild(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(format!("emu-kernels-{key:016x}.so"));
        if !path.exists() {
            let unique = format!("{}-{:?}", std::process::id(), std::thread::current().id());
            let unique: String = unique.chars().filter(char::is_ascii_alphanumeric).collect();
            let cpp = dir.join(format!("emu-kernels-{key:016x}-{unique}.cpp"));
            let tmp = dir.join(format!("emu-kernels-{key:016x}-{unique}.so"));
            std::fs::write(&cpp, &src)
                .map_err(|e| GpuError::EmuBuild(format!("writing {}: {e}", cpp.display())))?;
            // A minute or two of g++ once per kernel-source version: say so rather than stall.
            eprintln!("troupe: building the kernel emulator with g++ (once; cached in {})", dir.display());
            let out = Command::new("g++")
                .args(FLAGS)
                .arg("-o")
                .arg(&tmp)
                .arg(&cpp)
                .output()
                .map_err(|e| GpuError::EmuBuild(format!("running g++ (is it installed?): {e}")))?;
            let _ = std::fs::remove_file(&cpp);
            if !out.status.success() {
                let log = String::from_utf8_lossy(&out.stderr);
                return Err(GpuError::EmuBuild(format!("g++ failed:\n{}", &log[..log.len().min(8000)])));
            }
            std::fs::rename(&tmp, &path)
                .map_err(|e| GpuError::EmuBuild(format!("moving {} into place: {e}", tmp.display())))?;
        }
        // SAFETY: the library is ours, built just now from the embedded sources; its static
        // initialisers only register kernels.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| GpuError::EmuBuild(format!("loading {}: {e}", path.display())))?;
        let kernels = {
            // SAFETY: both symbols are defined in runtime.cpp with these signatures.
            let count: libloading::Symbol<CountFn> = unsafe { lib.get(b"troupe_emu_kernel_count") }
                .map_err(|e| GpuError::EmuBuild(e.to_string()))?;
            let name: libloading::Symbol<NameFn> = unsafe { lib.get(b"troupe_emu_kernel_name") }
                .map_err(|e| GpuError::EmuBuild(e.to_string()))?;
            // SAFETY: indices below the count name registered kernels (static C strings).
            // The emulator's own self-test kernels (runtime.cpp) are not CUDA kernels.
            (0..unsafe { count() })
                .map(|i| unsafe { CStr::from_ptr(name(i)) }.to_string_lossy().into_owned())
                .filter(|n| !n.starts_with(EMU_SELFTEST))
                .collect()
        };
        // TROUPE_EMU_MEMORY=<bytes> (suffix K, M or G allowed) emulates a GPU of that memory size.
        let limit = match std::env::var("TROUPE_EMU_MEMORY") {
            Err(_) => None,
            Ok(v) => Some(parse_bytes(&v).ok_or_else(|| {
                GpuError::EmuBuild(format!("TROUPE_EMU_MEMORY={v}: expected a byte count such as 512M"))
            })?),
        };
        let schedule = match std::env::var("TROUPE_EMU_SCHEDULE") {
            Err(_) => Schedule::InOrder,
            Ok(v) => v.parse().map_err(|e| GpuError::EmuBuild(format!("TROUPE_EMU_SCHEDULE={e}")))?,
        };
        Ok(EmuGpu {
            lib,
            kernels,
            path,
            limit,
            memory: Arc::default(),
            schedule: std::sync::Mutex::new(schedule),
            launches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The emulator with `bytes` of device memory: an allocation past it fails as a GPU's does
    /// when its memory is full (tests of out-of-memory handling).
    ///
    /// # Errors
    /// As [`EmuGpu::new`].
    pub fn with_memory_limit(bytes: usize) -> Result<Self, GpuError> {
        let mut gpu = Self::new()?;
        gpu.limit = Some(bytes);
        Ok(gpu)
    }

    /// Runs the launches from now on under `schedule` (see [`Schedule`]).
    pub fn set_schedule(&self, schedule: Schedule) {
        *self.schedule.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = schedule;
    }

    /// The schedule launches run under.
    pub fn schedule(&self) -> Schedule {
        *self.schedule.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the ldmatrix loads of `kernel` cost in shared-memory bank conflicts so far, counted
    /// as a GPU serves them (see [`LdmatrixConflicts`]): a static performance check of the
    /// shared-memory layouts that needs no GPU.
    ///
    /// # Errors
    /// [`GpuError::Shape`] for a kernel the emulator does not have.
    pub fn ldmatrix_bank_conflicts(&self, kernel: &str) -> Result<LdmatrixConflicts, GpuError> {
        let fail = |why: String| GpuError::Shape {
            op: "reading the emulator's ldmatrix statistics",
            detail: format!("{kernel}: {why}"),
        };
        let name = CString::new(kernel).map_err(|_| fail("kernel name contains NUL".into()))?;
        // SAFETY: defined in runtime.cpp with this signature.
        let stats: libloading::Symbol<LdmatrixStatsFn> =
            unsafe { self.lib.get(b"troupe_emu_ldmatrix_stats") }.map_err(|e| fail(e.to_string()))?;
        let (mut phases, mut extra) = (0u64, 0u64);
        // SAFETY: a NUL-terminated name and two writable u64s.
        if unsafe { stats(name.as_ptr(), &mut phases, &mut extra) } != 0 {
            return Err(fail("no such kernel in the emulator".into()));
        }
        Ok(LdmatrixConflicts { phases, extra_wavefronts: extra })
    }

    /// The names of all CUDA kernels compiled in (the ones `cuda/*.cu` defines; not the
    /// emulator's own self-tests, whose names start with `emu_selftest_`).
    pub fn kernels(&self) -> &[String] {
        &self.kernels
    }
}

/// What [`emu_gemm`] does with each accumulated element.
#[derive(Clone, Copy)]
enum EmuEpilogue {
    /// Store (plus bias, plus C when accumulating).
    Plain,
    /// Store `gelu(x)`, and `x` at this aux pointer.
    Gelu(*mut u8),
    /// Store `x · gelu'(aux)`.
    DGelu(*const u8),
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2/pi), as cuda/gelu.cu

/// `gelu(x)` and `gelu'(x)` with cuda/gelu.cu's arithmetic (tanh approximation, fp32).
fn gelu_and_grad(x: f32) -> (f32, f32) {
    let u = GELU_SCALE * (x + 0.044715 * x * x * x);
    let th = u.tanh();
    let y = 0.5 * x * (1.0 + th);
    let dy = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
    (y, dy)
}

fn emu_gemm(g: &Gemm, c: *mut u8, a: *const u8, b: *const u8, bias: Option<*const u8>) {
    emu_gemm_epilogue(g, c, a, b, bias, EmuEpilogue::Plain);
}

fn emu_gemm_epilogue(
    g: &Gemm,
    c: *mut u8,
    a: *const u8,
    b: *const u8,
    bias: Option<*const u8>,
    epi: EmuEpilogue,
) {
    let load_as = |dtype: DType, p: *const u8, i: usize| -> f32 {
        // SAFETY: callers check every index against the buffer sizes before calling.
        unsafe {
            match dtype {
                DType::F32 => (p as *const f32).add(i).read_unaligned(),
                DType::Bf16 => half::bf16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
            }
        }
    };
    let load = |p: *const u8, i: usize| load_as(g.dtype, p, i);
    for i in 0..g.m {
        for j in 0..g.n {
            let mut acc = 0.0f32;
            for p in 0..g.k {
                let av = load(a, if g.trans_a { p * g.m + i } else { i * g.k + p });
                let bv = load(b, if g.trans_b { j * g.k + p } else { p * g.n + j });
                acc += av * bv;
            }
            if let Some(bias) = bias {
                acc += load(bias, j);
            }
            let idx = i * g.n + j;
            if g.accumulate {
                acc += load_as(g.c_dtype, c as *const u8, idx);
            }
            let store = |p: *mut u8, v: f32| {
                // SAFETY: idx < m·n, checked by the caller for C and the aux matrix.
                unsafe {
                    match g.c_dtype {
                        DType::F32 => (p as *mut f32).add(idx).write_unaligned(v),
                        DType::Bf16 => {
                            (p as *mut u16).add(idx).write_unaligned(half::bf16::from_f32(v).to_bits())
                        }
                    }
                }
            };
            match epi {
                EmuEpilogue::Plain => store(c, acc),
                EmuEpilogue::Gelu(aux) => {
                    store(aux, acc);
                    store(c, gelu_and_grad(acc).0);
                }
                EmuEpilogue::DGelu(aux) => store(c, acc * gelu_and_grad(load_as(g.c_dtype, aux, idx)).1),
            }
        }
    }
}

impl Gpu for EmuGpu {
    type Buf = EmuBuf;

    fn describe(&self) -> String {
        format!("CPU emulator ({} kernels, {})", self.kernels.len(), self.path.display())
    }

    fn tensor_cores(&self) -> bool {
        true
    }

    fn alloc(&self, bytes: usize) -> Result<EmuBuf, GpuError> {
        let oom = |detail: String| GpuError::Driver { op: "allocating device memory".into(), detail };
        let live = self.memory.stats().live;
        if let Some(limit) = self.limit.filter(|&l| live.saturating_add(bytes) > l) {
            return Err(oom(format!(
                "out of memory: {bytes} bytes asked with {live} of {limit} in use (the emulator's limit)"
            )));
        }
        self.memory.add(bytes);
        // Dropped unfinished, `buf` gives the bytes back.
        let mut buf = EmuBuf { data: UnsafeCell::new(Box::default()), bytes, counter: self.memory.clone() };
        let mut words = Vec::new();
        words
            .try_reserve_exact(bytes.div_ceil(8))
            .map_err(|_| oom(format!("out of host memory for {bytes} bytes of emulated device memory")))?;
        words.resize(bytes.div_ceil(8), 0u64);
        buf.data = UnsafeCell::new(words.into_boxed_slice());
        Ok(buf)
    }

    fn memory(&self) -> MemoryStats {
        self.memory.stats()
    }

    fn reset_peak_memory(&self) {
        self.memory.reset_peak();
    }

    fn buf_len(&self, buf: &EmuBuf) -> usize {
        buf.bytes
    }

    fn upload(&self, dst: &mut EmuBuf, offset: usize, src: &[u8]) -> Result<(), GpuError> {
        self.memory.up(src.len());
        check_range("upload", "destination", offset, src.len(), dst.bytes)?;
        // SAFETY: bounds checked above; no launch runs concurrently (launches are synchronous).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr(offset), src.len()) };
        Ok(())
    }

    fn write(&self, dst: Dev<'_, EmuBuf>, src: &[u8]) -> Result<(), GpuError> {
        self.memory.up(src.len());
        check_range("write", "destination", dst.offset, src.len(), dst.buf.bytes)?;
        // SAFETY: bounds checked above; launches are synchronous, so nothing else writes now.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.buf.ptr(dst.offset), src.len()) };
        Ok(())
    }

    fn stable_address(&self, dst: Dev<'_, EmuBuf>) -> Option<(usize, usize)> {
        // The boxed words do not move when the EmuBuf does.
        (dst.offset <= dst.buf.bytes).then(|| (dst.buf.ptr(dst.offset) as usize, dst.buf.bytes - dst.offset))
    }

    unsafe fn write_later(&self, addr: usize, src: &[u8]) -> Result<(), GpuError> {
        self.memory.up(src.len());
        // SAFETY: the caller's contract: `addr` is inside a live buffer with room for `src`;
        // launches are synchronous, so nothing else writes now.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: &EmuBuf, offset: usize, dst: &mut [u8]) -> Result<(), GpuError> {
        self.memory.down(dst.len());
        check_range("download", "source", offset, dst.len(), src.bytes)?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn launch(
        &self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: &[Arg<'_, EmuBuf>],
    ) -> Result<(), GpuError> {
        let fail =
            |detail: String| GpuError::Launch { kernel: kernel.to_string(), grid, block, smem, detail };
        if grid.contains(&0) {
            return Err(fail("empty grid".into()));
        }
        // Argument values live here; the kernel receives pointers to them (cuLaunchKernel's rule).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match a {
                Arg::Ptr(d) => d.buf.ptr(d.offset) as u64,
                Arg::I32(v) => u64::from(*v as u32),
                Arg::U32(v) => u64::from(*v),
                Arg::U64(v) => *v,
                Arg::F32(v) => u64::from(v.to_bits()),
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        let name = CString::new(kernel).map_err(|_| fail("kernel name contains NUL".into()))?;
        // SAFETY: defined in runtime.cpp with this signature.
        let launch: libloading::Symbol<LaunchFn> =
            unsafe { self.lib.get(b"troupe_emu_launch") }.map_err(|e| fail(e.to_string()))?;
        let launch = *launch;
        let mut err = vec![0 as c_char; 512];
        let number = self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (schedule, seed) = match self.schedule() {
            Schedule::InOrder => (0, 0),
            Schedule::Reversed => (1, 0),
            // Each launch its own stream of permutations.
            Schedule::Shuffled(s) => (2, s ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            Schedule::Warps(s) => (3, s ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        };
        let _watch = watchdog().watch(kernel);
        // SAFETY: little-endian x86-64: a pointer to the u64 slot is also a valid pointer to its
        // low 4 bytes, which is how 32-bit arguments are read. Buffers outlive the call.
        let rc = unsafe {
            launch(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                u64::from(smem),
                ptrs.as_mut_ptr(),
                err.as_mut_ptr(),
                err.len() as u64,
                schedule,
                seed,
            )
        };
        if rc != 0 {
            // SAFETY: runtime.cpp wrote a NUL-terminated message into `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(fail(msg));
        }
        Ok(())
    }

    fn gemm(
        &self,
        g: &Gemm,
        c: Dev<'_, EmuBuf>,
        a: Dev<'_, EmuBuf>,
        b: Dev<'_, EmuBuf>,
        bias: Option<Dev<'_, EmuBuf>>,
    ) -> Result<(), GpuError> {
        check_gemm(self, g, c, a, b, bias)?;
        let (cp, ap, bp) = (c.buf.ptr(c.offset), a.buf.ptr(a.offset), b.buf.ptr(b.offset));
        let biasp = bias.map(|d| d.buf.ptr(d.offset));
        emu_gemm(g, cp, ap, bp, biasp.map(|p| p as *const u8));
        Ok(())
    }

    fn gemm_gelu(
        &self,
        g: &Gemm,
        c: Dev<'_, EmuBuf>,
        a: Dev<'_, EmuBuf>,
        b: Dev<'_, EmuBuf>,
        epi: GeluEpilogue<'_, EmuBuf>,
    ) -> Result<bool, GpuError> {
        check_gemm_gelu(self, g, c, a, b, &epi)?;
        let (cp, ap, bp) = (c.buf.ptr(c.offset), a.buf.ptr(a.offset), b.buf.ptr(b.offset));
        match epi {
            GeluEpilogue::Forward { bias, aux } => {
                let e = EmuEpilogue::Gelu(aux.buf.ptr(aux.offset));
                emu_gemm_epilogue(g, cp, ap, bp, Some(bias.buf.ptr(bias.offset) as *const u8), e);
            }
            GeluEpilogue::Backward { aux } => {
                let e = EmuEpilogue::DGelu(aux.buf.ptr(aux.offset) as *const u8);
                emu_gemm_epilogue(g, cp, ap, bp, None, e);
            }
        }
        Ok(true)
    }

    fn copy(&self, dst: Dev<'_, EmuBuf>, src: Dev<'_, EmuBuf>, bytes: usize) -> Result<(), GpuError> {
        for (what, d) in [("destination", dst), ("source", src)] {
            check_range("copy", what, d.offset, bytes, d.buf.bytes)?;
        }
        // SAFETY: bounds checked above; `copy` handles overlap like cudaMemcpy's undefined case
        // would not, which is harmless.
        unsafe { std::ptr::copy(src.buf.ptr(src.offset), dst.buf.ptr(dst.offset), bytes) };
        Ok(())
    }

    fn zero(&self, dst: Dev<'_, EmuBuf>, bytes: usize) -> Result<(), GpuError> {
        check_range("zero", "destination", dst.offset, bytes, dst.buf.bytes)?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(dst.buf.ptr(dst.offset), 0, bytes) };
        Ok(())
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        Ok(())
    }
}

/// The process-wide emulator for tests: built on first use; `None` (after printing why, with
/// "SKIPPED") when it cannot be built here, e.g. without g++, or when `TROUPE_SKIP_EMU` is set (a
/// GPU machine's time is better spent on the CUDA halves).
pub fn shared() -> Option<&'static EmuGpu> {
    static EMU: std::sync::OnceLock<Option<EmuGpu>> = std::sync::OnceLock::new();
    EMU.get_or_init(|| {
        if std::env::var_os("TROUPE_SKIP_EMU").is_some() {
            eprintln!("SKIPPED the emulated GPU kernel tests: TROUPE_SKIP_EMU is set (bench/gpu.sh on a GPU machine)");
            return None;
        }
        shared_build()
    })
    .as_ref()
}

fn shared_build() -> Option<EmuGpu> {
    match EmuGpu::new() {
        Ok(emu) => Some(emu),
        Err(e) => {
            eprintln!("SKIPPED the emulated GPU kernel tests: {e}");
            None
        }
    }
}

/// `123`, `64K`, `512M`, `2G` (binary multiples) as bytes.
fn parse_bytes(text: &str) -> Option<usize> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last()? {
        (i, 'k' | 'K') => (&t[..i], 10),
        (i, 'm' | 'M') => (&t[..i], 20),
        (i, 'g' | 'G') => (&t[..i], 30),
        _ => (t, 0),
    };
    digits.trim().parse::<usize>().ok()?.checked_mul(1usize << shift)
}

/// Compares `got` with `want` elementwise: `|got − want| ≤ atol + rtol·|want|`. Returns a message
/// naming the worst element when any fails (for tests).
pub fn compare(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        let excess = err - (atol + rtol * w.abs());
        let fails = excess.is_nan() || excess > 0.0;
        if fails && worst.is_none_or(|(_, e)| excess > e || e.is_nan()) {
            worst = Some((i, excess));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!(
            "{what}: element {i} is {} but should be {} (rtol {rtol:e}, atol {atol:e})",
            got[i], want[i]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;
    use crate::gpu::{Arg, Dev, Gpu};

    /// The fibers: a block whose odd threads skip the barrier is a deadlock error naming the
    /// kernel and block (not a hang), and the emulator works after it: stores before a barrier
    /// are seen after it by every thread, in every block.
    #[test]
    fn a_skipped_barrier_is_an_error_and_barriers_order_shared_memory() {
        let Some(emu) = super::shared() else { return };
        let err = emu.launch("emu_selftest_skipped_barrier", [2, 1, 1], [64, 1, 1], 0, &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("emu_selftest_skipped_barrier deadlocked in block 0"), "{msg}");
        assert!(msg.contains("32 threads wait"), "{msg}");
        let (blocks, n) = (3usize, 256usize);
        let input: Vec<f32> = (0..blocks * n).map(|i| i as f32).collect();
        let mut inp = emu.alloc(4 * input.len()).unwrap();
        emu.upload(&mut inp, 0, bytemuck::cast_slice(&input)).unwrap();
        let out = emu.alloc(4 * input.len()).unwrap();
        let args = [Arg::Ptr(Dev::new(&out)), Arg::Ptr(Dev::new(&inp))];
        emu.launch("emu_selftest_rotate", [blocks as u32, 1, 1], [n as u32, 1, 1], 0, &args).unwrap();
        let mut bytes = vec![0u8; 4 * input.len()];
        emu.download(&out, 0, &mut bytes).unwrap();
        let got: &[f32] = bytemuck::cast_slice(&bytes);
        for (i, &g) in got.iter().enumerate() {
            let (b, t) = (i / n, i % n);
            assert_eq!(g, (b * n + (t + 1) % n) as f32, "block {b} thread {t}");
        }
    }

    /// Schedules: a race that in order hides (each thread reads what the thread before it wrote,
    /// with no barrier between) gives other bits reversed and shuffled; a race between warps
    /// that every round-robin order hides (a shuffle keeps the warps in step) gives other bits
    /// warp by warp; the rotation through shared memory behind a barrier gives the same bits
    /// under every schedule; a bad `TROUPE_EMU_SCHEDULE` value is named.
    #[test]
    fn other_schedules_expose_a_race_that_in_order_hides() {
        use super::Schedule;
        if super::shared().is_none() {
            return; // no g++: shared() said so
        }
        // A private emulator: its schedule is its own.
        let emu = super::EmuGpu::new().unwrap();
        let (blocks, n) = (3usize, 128usize);
        let input: Vec<f32> = (0..blocks * n).map(|i| i as f32 + 1.0).collect();
        let mut inp = emu.alloc(4 * input.len()).unwrap();
        emu.upload(&mut inp, 0, bytemuck::cast_slice(&input)).unwrap();
        let out = emu.alloc(4 * input.len()).unwrap();
        let run = |kernel: &str, schedule: Schedule| {
            emu.set_schedule(schedule);
            let args = [Arg::Ptr(Dev::new(&out)), Arg::Ptr(Dev::new(&inp))];
            emu.launch(kernel, [blocks as u32, 1, 1], [n as u32, 1, 1], 0, &args).unwrap();
            let mut bytes = vec![0u8; 4 * input.len()];
            emu.download(&out, 0, &mut bytes).unwrap();
            bytemuck::cast_slice::<u8, f32>(&bytes).to_vec()
        };
        let in_order = run("emu_selftest_race", Schedule::InOrder);
        // In order every reader runs after its writer: the race reads as correct code would.
        for (i, &g) in in_order.iter().enumerate() {
            let want = if i % n == 0 { 0.0 } else { input[i - 1] };
            assert_eq!(g, want, "element {i}");
        }
        for schedule in [Schedule::Reversed, Schedule::Shuffled(1), Schedule::Shuffled(2)] {
            assert_ne!(run("emu_selftest_race", schedule), in_order, "{schedule:?} hid the race");
        }
        let rotated = run("emu_selftest_rotate", Schedule::InOrder);
        // Warps racing: hidden in step (any thread order), seen warp by warp.
        let in_step = run("emu_selftest_warp_race", Schedule::InOrder);
        for schedule in [Schedule::Reversed, Schedule::Shuffled(1)] {
            assert_eq!(run("emu_selftest_warp_race", schedule), in_step, "{schedule:?}: warps out of step");
        }
        assert_ne!(run("emu_selftest_warp_race", Schedule::Warps(1)), in_step, "warp by warp hid the race");
        for schedule in [Schedule::Reversed, Schedule::Shuffled(1), Schedule::Shuffled(2), Schedule::Warps(1)]
        {
            assert_eq!(run("emu_selftest_rotate", schedule), rotated, "{schedule:?}: a barrier failed");
        }
        assert_eq!("shuffled:7".parse::<Schedule>(), Ok(Schedule::Shuffled(7)));
        assert_eq!("reversed".parse::<Schedule>(), Ok(Schedule::Reversed));
        let err = "shuffled".parse::<Schedule>().unwrap_err();
        assert!(err.contains("in-order, reversed, shuffled:SEED or warps:SEED"), "{err}");
        assert_eq!("warps:3".parse::<Schedule>(), Ok(Schedule::Warps(3)));
    }

    /// The emulator's cp.async delivers at the two extremes a GPU allows: in odd blocks as each
    /// copy starts (a read before any wait sees the second copy already), in even blocks at the
    /// wait that retires its group (a read before the wait sees the untouched shared memory,
    /// NaN; after the first wait the first copy; after the second the second); rows past the
    /// valid ones fill with zeros.
    #[test]
    fn async_copies_land_at_the_earliest_or_the_latest_moment() {
        let Some(emu) = super::shared() else { return };
        let (blocks, n, valid) = (2usize, 64usize, 40u32);
        let input: Vec<f32> = (0..2 * blocks * n * 4).map(|i| i as f32 + 1.0).collect();
        let mut inp = emu.alloc(4 * input.len()).unwrap();
        emu.upload(&mut inp, 0, bytemuck::cast_slice(&input)).unwrap();
        let seen = emu.alloc(4 * 3 * blocks * n * 4).unwrap();
        let args = [Arg::Ptr(Dev::new(&seen)), Arg::Ptr(Dev::new(&inp)), Arg::U32(valid)];
        emu.launch("emu_selftest_cp_async", [blocks as u32, 1, 1], [n as u32, 1, 1], (16 * n) as u32, &args)
            .unwrap();
        let mut bytes = vec![0u8; 4 * 3 * blocks * n * 4];
        emu.download(&seen, 0, &mut bytes).unwrap();
        let got: &[f32] = bytemuck::cast_slice(&bytes);
        let second = blocks * n * 4;
        for b in 0..blocks {
            for t in 0..n {
                let base = (b * n + t) * 4;
                let copy = |which: usize, i: usize| match t < valid as usize {
                    true => input[base + which * second + i],
                    false => 0.0,
                };
                for i in 0..4 {
                    let at = |phase: usize| got[base * 3 + 4 * phase + i];
                    let before = at(0);
                    if b % 2 == 1 {
                        assert_eq!(before, copy(1, i), "block {b} thread {t}: both copies landed at once");
                        assert_eq!(at(1), copy(1, i), "block {b} thread {t}");
                    } else {
                        assert!(before.is_nan(), "block {b} thread {t}: read {before} before any wait");
                        assert_eq!(at(1), copy(0, i), "block {b} thread {t}: the first group");
                    }
                    assert_eq!(at(2), copy(1, i), "block {b} thread {t}: the second group");
                }
            }
        }
    }

    #[test]
    fn byte_counts_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("64K"), Some(64 << 10));
        assert_eq!(parse_bytes(" 512m "), Some(512 << 20));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("abc"), None);
        assert_eq!(parse_bytes("K"), None);
        assert_eq!(parse_bytes(""), None);
    }
}
