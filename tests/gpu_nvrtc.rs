//! Every kernel file compiles under NVRTC for Hopper (sm_90), and the compiled module defines
//! exactly the kernels the CPU emulator registers (so a kernel tested in the emulator exists on
//! the GPU under the same name). Needs only libnvrtc (no GPU): CI installs pip's
//! nvidia-cuda-nvrtc and puts its lib directory on LD_LIBRARY_PATH; elsewhere the test prints
//! SKIPPED.

use troupe::gpu::cuda::{KernelOptions, compile_ptx, compile_ptx_with, ptx_entries};

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
    // The tensor-core attention loads fragments with ldmatrix, unless built without it (the
    // TROUPE_NO_LDMATRIX fallback), which must compile too and define the same kernels.
    assert!(ptx.contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16"), "no ldmatrix in the PTX");
    assert!(ptx.contains("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16"), "no transposing ldmatrix");
    let plain = compile_ptx_with("sm_90", true, KernelOptions { ldmatrix: false, cp_async: false }).unwrap();
    let mut plain_entries = ptx_entries(&plain);
    plain_entries.sort();
    assert_eq!(plain_entries, entries, "the fallback's kernels");
    let outside_selftest = |p: &str| {
        p.split(".entry")
            .filter(|k| !k.trim_start().starts_with("ldmatrix_selftest"))
            .any(|k| k.contains("ldmatrix.sync"))
    };
    assert!(!outside_selftest(&plain), "TROUPE_NO_LDMATRIX left ldmatrix in a kernel");
    assert!(outside_selftest(&ptx), "ldmatrix only in its self-test");
    // The forward's tiles by cp.async (with a source size: rows past T fill with zeros), unless
    // TROUPE_NO_CP_ASYNC.
    assert!(
        ptx.contains("cp.async.cg.shared.global") && ptx.contains("cp.async.wait_group 1"),
        "no cp.async"
    );
    assert!(!plain.contains("cp.async"), "TROUPE_NO_CP_ASYNC left cp.async in a kernel");
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    let mut registered = emu.kernels().to_vec();
    registered.sort();
    assert_eq!(entries, registered, "NVRTC's entries vs the emulator's registry");
}
