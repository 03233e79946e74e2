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
    // Every tensor-core attention kernel loads its tiles by cp.async (with a source size: rows
    // past T fill with zeros) and overlaps one tile's load with work on the other (a wait that
    // leaves a group in flight), unless TROUPE_NO_CP_ASYNC.
    for hs in [64, 128] {
        for kernel in ["forward", "backward_dkv", "backward_dq"] {
            let name = format!("attention_tc_{kernel}_hs{hs}_bf16");
            let body = ptx
                .split(".entry")
                .find(|k| k.trim_start().starts_with(&name))
                .unwrap_or_else(|| panic!("{name} missing from the PTX"));
            assert!(
                body.contains("cp.async.cg.shared.global") && body.contains("cp.async.wait_group 1"),
                "{name}: no overlapped cp.async"
            );
        }
    }
    assert!(!plain.contains("cp.async"), "TROUPE_NO_CP_ASYNC left cp.async in a kernel");
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    let mut registered = emu.kernels().to_vec();
    registered.sort();
    assert_eq!(entries, registered, "NVRTC's entries vs the emulator's registry");
}

/// ptxas's report of every kernel for Hopper (no GPU needed): the same kernels as the PTX, and
/// none spilling registers beyond one 8-byte value — ptxas keeps
/// attention_tc_backward_dq_hs128_bf16 at 128 registers (a fourth block of 128 threads per SM) by
/// spilling one. A kernel whose accumulators no longer fit (a larger tile, an array indexed at
/// run time) fails here before any GPU run. Only attention_any's kernels, whose per-thread arrays
/// are sized for any head size, have a stack frame beyond that.
#[test]
fn kernels_fit_their_registers_for_sm90() {
    use troupe::gpu::cuda::kernel_resources;
    let kernels = match kernel_resources("sm_90", false, KernelOptions { ldmatrix: true, cp_async: true }) {
        Ok(k) => k,
        Err(troupe::gpu::GpuError::NoNvrtc(why)) => {
            eprintln!("SKIPPED the ptxas register check: {why}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut names: Vec<String> = kernels.iter().map(|k| k.name.clone()).collect();
    names.sort();
    let mut entries = ptx_entries(
        &compile_ptx_with("sm_90", false, KernelOptions { ldmatrix: true, cp_async: true }).unwrap(),
    );
    entries.sort();
    assert_eq!(names, entries, "ptxas's kernels vs the PTX's entries");
    for k in &kernels {
        eprintln!(
            "{}: {} registers, stack {} B, spills {} B stored / {} B loaded",
            k.name, k.registers, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes
        );
        assert!(k.registers > 0 && k.registers <= 255, "{k:?}");
        assert!(k.spill_store_bytes <= 8 && k.spill_load_bytes <= 16, "{} spills: {k:?}", k.name);
        if !k.name.starts_with("attention_any_") {
            assert!(k.stack_bytes <= 8, "{} has a stack frame: {k:?}", k.name);
        }
    }
}
