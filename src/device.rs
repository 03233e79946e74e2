//! Compute devices: the CPU (always) and CUDA GPUs, found at run time.
//!
//! The crate links `cudarc` with dynamic loading, so it builds and runs on machines without
//! CUDA; [`probe_cuda`] looks for the driver library first (cudarc would panic on the first call
//! without it) and only then asks the driver for devices. `emu` runs the CUDA kernels in their
//! CPU emulator (`crate::gpu::EmuGpu`): very slow, for testing the GPU path without a GPU.

use std::fmt;
use std::str::FromStr;

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
    /// The CUDA kernels in the CPU emulator (tests of the GPU path on machines without a GPU).
    Emu,
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "emu" | "cuda-emu" => Ok(Device::Emu),
            other => Err(format!("unknown device `{other}`; known: cpu, cuda, emu")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Emu => "emu",
        })
    }
}

/// One CUDA device as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
}

/// Why no CUDA device can be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "no CUDA driver on this machine (libcuda.so was not found on the library path); run on a machine with an NVIDIA GPU and driver, or use --device cpu"
    )]
    NoDriver,
    #[error("the CUDA driver reports no device")]
    NoDevice,
    #[error("CUDA driver: {op}: {detail}")]
    Driver { op: &'static str, detail: String },
}

/// The GPU a rank with this local rank opens, of the `visible` ones: its local rank (torchrun's
/// convention, one process per GPU), or the only one visible (a launcher that gives each task its
/// own GPU through `CUDA_VISIBLE_DEVICES`, such as `srun --gpus-per-task=1`).
///
/// # Errors
/// The reason, when the node has more ranks than visible GPUs.
pub fn gpu_for_local_rank(local_rank: usize, visible: usize) -> Result<usize, String> {
    match (local_rank < visible, visible) {
        (true, _) => Ok(local_rank),
        (false, 1) => Ok(0),
        (false, n) => Err(format!(
            "local rank {local_rank} has no GPU of its own: {n} are visible{}; start at most {n} ranks \
             on this node, or give each its own GPU (CUDA_VISIBLE_DEVICES)",
            std::env::var("CUDA_VISIBLE_DEVICES")
                .map_or(String::new(), |v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
        )),
    }
}

/// The CUDA devices of this machine.
///
/// # Errors
/// [`DeviceError::NoDriver`] without the driver library (checked before any other CUDA call),
/// [`DeviceError::NoDevice`] when it lists none, `Driver` when a driver call fails.
pub fn probe_cuda() -> Result<Vec<CudaDeviceInfo>, DeviceError> {
    // SAFETY: only tries to open the driver library by its usual names; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DeviceError::NoDriver);
    }
    let driver = |op: &'static str| {
        move |e: cudarc::driver::DriverError| DeviceError::Driver { op, detail: e.to_string() }
    };
    let count = cudarc::driver::CudaContext::device_count().map_err(driver("counting devices"))?;
    if count <= 0 {
        return Err(DeviceError::NoDevice);
    }
    (0..count as usize)
        .map(|ordinal| {
            let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(driver("creating a context"))?;
            Ok(CudaDeviceInfo {
                ordinal,
                name: ctx.name().map_err(driver("reading the device name"))?,
                compute_capability: ctx
                    .compute_capability()
                    .map_err(driver("reading the compute capability"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("CUDA".parse::<Device>(), Ok(Device::Cuda));
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("emu".parse::<Device>(), Ok(Device::Emu));
        assert!("tpu".parse::<Device>().unwrap_err().contains("known: cpu, cuda, emu"));
    }

    #[test]
    fn each_local_rank_gets_its_own_gpu_or_the_only_one() {
        assert_eq!(gpu_for_local_rank(3, 8), Ok(3));
        assert_eq!(gpu_for_local_rank(0, 1), Ok(0));
        assert_eq!(gpu_for_local_rank(5, 1), Ok(0));
        let err = gpu_for_local_rank(4, 4).unwrap_err();
        assert!(err.contains("local rank 4 has no GPU of its own: 4 are visible"), "{err}");
    }

    #[test]
    fn probing_never_panics() {
        match probe_cuda() {
            Ok(devices) => {
                assert!(!devices.is_empty());
                println!("CUDA devices: {devices:?}");
            }
            Err(e) => println!("SKIPPED the CUDA device check: {e}"),
        }
    }
}
