//! Every kernel file compiles under NVRTC for Hopper (sm_90), and the compiled module defines
//! exactly the kernels the CPU emulator registers (so a kernel tested in the emulator exists on
//! the GPU under the same name). Needs only libnvrtc (no GPU): CI installs pip's
//! nvidia-cuda-nvrtc and puts its lib directory on LD_LIBRARY_PATH; elsewhere the test prints
//! SKIPPED.

use troupe::gpu::cuda::{compile_ptx, ptx_entries};

#[test]
fn kernels_compile_for_sm90_and_match_the_emulator() {
    let ptx = match compile_ptx("sm_90", true) {
        Ok(ptx) => ptx,
        Err(troupe::gpu::GpuError::NoNvrtc(why)) => {
            eprintln!("SKIPPED the NVRTC compile check: {why}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert!(ptx.contains(".target sm_90"), "{}", &ptx[..ptx.len().min(400)]);
    let mut entries = ptx_entries(&ptx);
    entries.sort();
    for expected in ["gelu_forward_bf16", "attention_forward_hs64_bf16", "adamw_grad_bf16_copy_bf16"] {
        assert!(entries.iter().any(|e| e == expected), "{expected} missing from {entries:?}");
    }
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    let mut registered = emu.kernels().to_vec();
    registered.sort();
    assert_eq!(entries, registered, "NVRTC's entries vs the emulator's registry");
}
