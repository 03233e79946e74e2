//! `troupe device`: what this machine offers troupe's GPU path (driver, GPUs, NVRTC, cuBLASLt,
//! NCCL, the kernel emulator), and the global `--nccl-lib` option.
//!
//! pip's NCCL ships only `libnccl.so.2`, a name cudarc does not try; `--nccl-lib PATH` (or
//! `TROUPE_NCCL_LIB`) makes a directory with a `libnccl.so` link to it and re-executes troupe with
//! that directory first on `LD_LIBRARY_PATH` (the dynamic loader reads it only at start).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::UsageError;

#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Also compile the kernels to machine code for ARCH with NVRTC and print what ptxas reports
    /// of each (registers per thread, stack frame, spills). Needs libnvrtc only, no GPU.
    #[arg(long, value_name = "ARCH", num_args = 0..=1, default_missing_value = "sm_90")]
    pub kernels: Option<String>,
}

/// Set after the re-execution, so a library that still does not load is an error, not a loop.
const SHIM_ENV: &str = "TROUPE_NCCL_SHIM";

/// Makes NCCL loadable from `path` (the library file or its directory), re-executing this process
/// when needed. Returns when NCCL already loads.
pub fn ensure_nccl(path: &Path) -> anyhow::Result<()> {
    if troupe::gpu::nccl::nccl_available().is_ok() {
        return Ok(());
    }
    let lib = if path.is_dir() {
        ["libnccl.so.2", "libnccl.so"].iter().map(|n| path.join(n)).find(|p| p.exists()).ok_or_else(|| {
            UsageError(format!(
                "--nccl-lib {}: no libnccl.so.2 or libnccl.so in that directory",
                path.display()
            ))
        })?
    } else if path.exists() {
        path.to_path_buf()
    } else {
        return Err(UsageError(format!("--nccl-lib {}: no such file or directory", path.display())).into());
    };
    if let Some(shim) = std::env::var_os(SHIM_ENV) {
        return Err(UsageError(format!(
            "--nccl-lib {}: libnccl still does not load with {} on LD_LIBRARY_PATH (is it an NCCL library?)",
            lib.display(),
            PathBuf::from(shim).display()
        ))
        .into());
    }
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    let key = troupe::gpu::sources::hash_texts(&[&lib.display().to_string()]);
    let dir = troupe::gpu::cuda::cache_dir().join(format!("nccl-shim-{key:016x}"));
    std::fs::create_dir_all(&dir).map_err(|e| UsageError(format!("creating {}: {e}", dir.display())))?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(lib.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .map_err(|e| UsageError(format!("linking {} to {}: {e}", link.display(), lib.display())))?;
    }
    let mut search = OsString::from(dir.as_os_str());
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|o| !o.is_empty()) {
        search.push(":");
        search.push(old);
    }
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("finding troupe's own executable: {e}"))?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", search)
        .env(SHIM_ENV, &dir)
        .exec();
    Err(anyhow::anyhow!("re-executing troupe with {} on LD_LIBRARY_PATH: {err}", dir.display()))
}

fn yes_no(found: bool) -> &'static str {
    if found { "found" } else { "not found" }
}

pub fn run(args: DeviceArgs) -> anyhow::Result<()> {
    match troupe::device::probe_cuda() {
        Ok(devices) => {
            println!("CUDA driver: found (CUDA {})", troupe::gpu::cuda::driver_version());
            for d in devices {
                let (major, minor) = d.compute_capability;
                println!("GPU {}: {} (sm_{major}{minor})", d.ordinal, d.name);
            }
        }
        Err(e) => println!("CUDA driver: {e}"),
    }
    // SAFETY (all three): only try to open the libraries by their usual names.
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    let version =
        if nvrtc { format!(" (NVRTC {})", troupe::gpu::cuda::nvrtc_version()) } else { String::new() };
    println!("NVRTC: {}{version}", yes_no(nvrtc));
    println!("cuBLASLt: {}", yes_no(unsafe { cudarc::cublaslt::sys::is_culib_present() }));
    match troupe::gpu::nccl::nccl_available() {
        Ok(()) => {
            let via = std::env::var_os(SHIM_ENV)
                .map(|d| format!(" (via --nccl-lib, linked in {})", PathBuf::from(d).display()))
                .unwrap_or_default();
            println!("NCCL: found{via}");
        }
        Err(_) => println!(
            "NCCL: not found (pip's nvidia-nccl-cu13 installs site-packages/nvidia/nccl/lib/libnccl.so.2: pass --nccl-lib that directory)"
        ),
    }
    match std::process::Command::new("g++").arg("--version").output() {
        Ok(out) if out.status.success() => {
            let first = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
            println!("kernel emulator (--device emu): g++ found ({first})");
        }
        _ => println!("kernel emulator (--device emu): g++ not found"),
    }
    println!("kernel cache: {}", troupe::gpu::cuda::cache_dir().display());
    if let Some(arch) = &args.kernels {
        print_kernel_resources(arch)?;
    }
    Ok(())
}

/// The ptxas report of every kernel for `arch`, as a table (spilling kernels marked).
fn print_kernel_resources(arch: &str) -> anyhow::Result<()> {
    use troupe::gpu::cuda::{KernelOptions, kernel_resources};
    let options = KernelOptions::from_env();
    let kernels =
        kernel_resources(arch, false, options).map_err(|e| UsageError(format!("--kernels {arch}: {e}")))?;
    println!(
        "\nkernels for {arch} (ptxas -v; ldmatrix {}, cp.async {}): {}",
        if options.ldmatrix { "on" } else { "off" },
        if options.cp_async { "on" } else { "off" },
        kernels.len()
    );
    let width = kernels.iter().map(|k| k.name.len()).max().unwrap_or(0);
    println!("{:width$}  registers  stack B  spill stores B  spill loads B", "kernel");
    for k in &kernels {
        let mark = if k.spill_store_bytes > 0 || k.spill_load_bytes > 0 { "  spills" } else { "" };
        println!(
            "{:width$}  {:>9}  {:>7}  {:>14}  {:>13}{mark}",
            k.name, k.registers, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes
        );
    }
    Ok(())
}
