//! GELU kernels (cuda/gelu.cu) against the float64 reference, in the CPU emulator everywhere and
//! on a real GPU when one is present (otherwise that half prints SKIPPED). Tolerances: fp32 1e-5
//! relative + 1e-6 absolute (tanhf vs the CPU backend's fast tanh, both within a few ulp); bf16
//! storage rounds inputs and outputs to 8 significant bits, so the reference is computed from the
//! rounded inputs and compared within 2^-8 relative (one bf16 ulp). The same tolerances apply on a
//! GPU, where `--use_fast_math` (FMA contraction, flushed denormals, approximate tanhf) moves
//! results by a few fp32 ulp, well inside them. The kernel-registry and launch-check test uses the
//! emulator's own API and messages and runs only there.
//!
//! The GELU fused into a matrix product's epilogue (`Gpu::gemm_gelu`, cuBLASLt's GELU_AUX_BIAS and
//! DGELU on a GPU) against float64 products of the same (rounded) operands: fp32 within 1e-5
//! relative + 1e-5 absolute (the products sum 24 to 64 terms of magnitude ≤ 1 in another order);
//! bf16 outputs are rounded once from the fp32 accumulator, so within 2^-8 relative plus the
//! same absolute term.
//!
//! Tuned products (`CudaGpu::set_gemm_autotune`, GPU only) against float64 under the same
//! relative tolerances (absolute 1e-4: 192- and 256-term sums of products up to 1).

use troupe::gpu::emu::compare;
use troupe::gpu::ops::gelu;
use troupe::gpu::{DType, Dev, GeluEpilogue, Gemm, Gpu, download_f32, round_bf16, upload_f32};
use troupe::kernels::naive;

#[path = "common/lcg.rs"]
mod lcg;

fn inputs(n: usize, seed: u64) -> Vec<f32> {
    lcg::uniform(n, seed, 8.0)
}

fn check_gelu<G: Gpu>(gpu: &G, label: &str) {
    let n = 1000; // not a multiple of the block: the tail guard is exercised
    for dtype in [DType::F32, DType::Bf16] {
        let (x, g) = (inputs(n, 1), inputs(n, 2));
        let (x, g) = if dtype == DType::Bf16 { (round_bf16(&x), round_bf16(&g)) } else { (x, g) };
        let xb = upload_f32(gpu, &x, dtype).unwrap();
        let gb = upload_f32(gpu, &g, dtype).unwrap();
        let out = gpu.alloc(n * dtype.size()).unwrap();
        let din = gpu.alloc(n * dtype.size()).unwrap();
        gelu::gelu_forward(gpu, dtype, Dev::new(&out), Dev::new(&xb), n).unwrap();
        gelu::gelu_backward(gpu, dtype, Dev::new(&din), Dev::new(&xb), Dev::new(&gb), n).unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let g64: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
        let mut want = vec![0.0; n];
        naive::gelu_forward(&mut want, &x64);
        let mut dwant = vec![0.0; n];
        naive::gelu_backward(&mut dwant, &x64, &g64);
        let (rtol, atol) = if dtype == DType::F32 { (1e-5, 1e-6) } else { (1.0 / 256.0, 1e-6) };
        let got = download_f32(gpu, Dev::new(&out), n, dtype).unwrap();
        compare(&format!("{label}: gelu forward {dtype:?}"), &got, &want, rtol, atol).unwrap();
        let got = download_f32(gpu, Dev::new(&din), n, dtype).unwrap();
        compare(&format!("{label}: gelu backward {dtype:?}"), &got, &dwant, rtol, atol).unwrap();
    }
}

fn check_short_buffer<G: Gpu>(gpu: &G, label: &str) {
    let small = gpu.alloc(16).unwrap();
    let err = gelu::gelu_forward(gpu, DType::F32, Dev::new(&small), Dev::new(&small), 100).unwrap_err();
    assert!(err.to_string().contains("gelu_forward"), "{label}: {err}");
    assert!(err.to_string().contains("400 bytes"), "{label}: {err}");
}

#[test]
fn gelu_forward_and_backward_match_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_gelu(emu, "emulator");
}

#[test]
fn gelu_forward_and_backward_match_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_gelu(gpu, "cuda");
}

#[test]
fn a_short_buffer_is_a_shape_error_not_a_crash_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_short_buffer(emu, "emulator");
}

#[test]
fn a_short_buffer_is_a_shape_error_not_a_crash_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_short_buffer(gpu, "cuda");
}

/// Emulator only: `EmuGpu::kernels()` and the emulator's own launch checks (the CUDA backend
/// names a missing kernel differently and leaves block sizes to the driver).
#[test]
fn unknown_kernels_and_bad_blocks_are_named_in_the_emulator() {
    let Some(gpu) = troupe::gpu::emu::shared() else { return };
    assert!(gpu.kernels().iter().any(|k| k == "gelu_forward_f32"), "{:?}", gpu.kernels());
    let buf = gpu.alloc(64).unwrap();
    let err = gpu.launch("no_such_kernel", [1, 1, 1], [32, 1, 1], 0, &[]).unwrap_err();
    assert!(err.to_string().contains("no kernel named no_such_kernel"), "{err}");
    let err = gpu
        .launch("gelu_forward_f32", [1, 1, 1], [33, 1, 1], 0, &[troupe::gpu::Arg::Ptr(Dev::new(&buf))])
        .unwrap_err();
    assert!(err.to_string().contains("multiple of 32"), "{err}");
}

/// `gemm_gelu` forward (`aux = x·Wᵀ + b`, `out = gelu(aux)`) and backward (`dx = (dy·W) ·
/// gelu'(aux)`) against float64; `false` when the GPU has no such epilogue (nothing to check).
fn check_gemm_gelu<G: Gpu>(gpu: &G, label: &str) -> bool {
    let (m, k, n) = (40usize, 24usize, 64usize);
    for dtype in [DType::F32, DType::Bf16] {
        let round = |v: Vec<f32>| if dtype == DType::Bf16 { round_bf16(&v) } else { v };
        let scale = |v: Vec<f32>, s: f32| v.into_iter().map(|x| x * s).collect::<Vec<_>>();
        let x = round(scale(inputs(m * k, 3), 0.25));
        let w = round(scale(inputs(n * k, 4), 0.25));
        let b = round(scale(inputs(n, 5), 0.25));
        let up = |v: &[f32]| upload_f32(gpu, v, dtype).unwrap();
        let (xb, wb, bb) = (up(&x), up(&w), up(&b));
        let (out, aux) = (gpu.alloc(m * n * dtype.size()).unwrap(), gpu.alloc(m * n * dtype.size()).unwrap());
        let fwd = GeluEpilogue::Forward { bias: Dev::new(&bb), aux: Dev::new(&aux) };
        let g = Gemm::linear(m, k, n, dtype);
        if !gpu.gemm_gelu(&g, Dev::new(&out), Dev::new(&xb), Dev::new(&wb), fwd).unwrap() {
            eprintln!("{label}: no GELU epilogue for {g:?}; the model uses separate kernels");
            return false;
        }
        let f = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let (x64, w64, b64) = (f(&x), f(&w), f(&b));
        let pre: Vec<f64> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                b64[j] + (0..k).map(|p| x64[i * k + p] * w64[j * k + p]).sum::<f64>()
            })
            .collect();
        let mut want = vec![0.0; m * n];
        naive::gelu_forward(&mut want, &pre);
        let rtol = if dtype == DType::F32 { 1e-5 } else { 1.0 / 256.0 };
        let got_aux = download_f32(gpu, Dev::new(&aux), m * n, dtype).unwrap();
        compare(&format!("{label}: gemm+bias+gelu aux {dtype:?}"), &got_aux, &pre, rtol, 1e-5).unwrap();
        let got = download_f32(gpu, Dev::new(&out), m * n, dtype).unwrap();
        compare(&format!("{label}: gemm+bias+gelu out {dtype:?}"), &got, &want, rtol, 1e-5).unwrap();

        // Backward through the next product: dy [m, k] · W [k, n] → [m, n], times gelu'(aux).
        let dy = round(scale(inputs(m * k, 6), 0.25));
        let w2 = round(scale(inputs(k * n, 7), 0.25));
        let (dyb, w2b) = (up(&dy), up(&w2));
        let dx = gpu.alloc(m * n * dtype.size()).unwrap();
        let g2 = Gemm::linear_backward_input(m, n, k, dtype);
        let bwd = GeluEpilogue::Backward { aux: Dev::new(&aux) };
        assert!(
            gpu.gemm_gelu(&g2, Dev::new(&dx), Dev::new(&dyb), Dev::new(&w2b), bwd).unwrap(),
            "{label}: the forward epilogue ran but the backward's did not"
        );
        let (dy64, w264) = (f(&dy), f(&w2));
        let prod: Vec<f64> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k).map(|p| dy64[i * k + p] * w264[p * n + j]).sum::<f64>()
            })
            .collect();
        let mut dwant = vec![0.0; m * n];
        naive::gelu_backward(&mut dwant, &f(&got_aux), &prod);
        let got = download_f32(gpu, Dev::new(&dx), m * n, dtype).unwrap();
        compare(&format!("{label}: gemm·dgelu {dtype:?}"), &got, &dwant, rtol, 1e-5).unwrap();
    }
    true
}

#[test]
fn the_gelu_epilogue_of_a_product_matches_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    assert!(check_gemm_gelu(emu, "emulator"), "the emulator always has the epilogue");
}

#[test]
fn the_gelu_epilogue_of_a_product_matches_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_gemm_gelu(gpu, "cuda");
}

#[test]
fn a_gelu_epilogue_on_an_accumulating_product_is_an_error() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    let buf = emu.alloc(4096).unwrap();
    let g = Gemm::linear_backward_weight(4, 4, 8, DType::F32);
    let epi = GeluEpilogue::Backward { aux: Dev::new(&buf) };
    let err = emu.gemm_gelu(&g, Dev::new(&buf), Dev::new(&buf), Dev::new(&buf), epi).unwrap_err();
    assert!(err.to_string().contains("GELU epilogue"), "{err}");
}

/// Tuned matrix products: the first call of each product runs cuBLASLt's candidate algorithms on
/// its own operands before keeping the fastest, so an accumulating product (a weight gradient)
/// must still be added to exactly once, and every product must be right — on a GPU of its own
/// with tuning on, against float64, twice over (tuning at the first call, the kept choice at the
/// second).
#[test]
fn tuned_products_are_the_products_on_a_gpu() {
    if troupe::gpu::cuda::shared().is_none() {
        return;
    }
    let gpu = troupe::gpu::CudaGpu::new(0).expect("a second context on the GPU");
    gpu.set_gemm_autotune(true);
    let (m, k, n) = (256usize, 192usize, 320usize);
    for dtype in [DType::F32, DType::Bf16] {
        let round = |v: Vec<f32>| if dtype == DType::Bf16 { round_bf16(&v) } else { v };
        let scale = |v: Vec<f32>| v.into_iter().map(|x| x * 0.25).collect::<Vec<_>>();
        let (x, w, b, dy) = (
            round(scale(inputs(m * k, 11))),
            round(scale(inputs(n * k, 12))),
            round(scale(inputs(n, 13))),
            round(scale(inputs(m * n, 14))),
        );
        let up = |v: &[f32]| upload_f32(&gpu, v, dtype).unwrap();
        let (xb, wb, bb, dyb) = (up(&x), up(&w), up(&b), up(&dy));
        let f = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let (x64, w64, b64, dy64) = (f(&x), f(&w), f(&b), f(&dy));
        let pre: Vec<f64> = (0..m * n)
            .map(|ij| {
                b64[ij % n] + (0..k).map(|p| x64[(ij / n) * k + p] * w64[(ij % n) * k + p]).sum::<f64>()
            })
            .collect();
        let grad: Vec<f64> = (0..n * k)
            .map(|jp| (0..m).map(|i| dy64[i * n + jp / k] * x64[i * k + jp % k]).sum::<f64>())
            .collect();
        let rtol = if dtype == DType::F32 { 1e-5 } else { 1.0 / 256.0 };
        let dw = upload_f32(&gpu, &vec![1.0; n * k], DType::F32).unwrap();
        for call in 1..=2 {
            let what = format!("tuned {dtype:?}, call {call}");
            let out = gpu.alloc(m * n * dtype.size()).unwrap();
            let g = Gemm::linear(m, k, n, dtype);
            gpu.gemm(&g, Dev::new(&out), Dev::new(&xb), Dev::new(&wb), Some(Dev::new(&bb))).unwrap();
            let got = download_f32(&gpu, Dev::new(&out), m * n, dtype).unwrap();
            compare(&format!("{what}: x·Wᵀ + b"), &got, &pre, rtol, 1e-4).unwrap();
            // dW += dyᵀ·x, into fp32 that starts at 1: after call c it is 1 + c·dyᵀ·x.
            let gw = Gemm::linear_backward_weight(m, k, n, dtype);
            gpu.gemm(&gw, Dev::new(&dw), Dev::new(&dyb), Dev::new(&xb), None).unwrap();
            let want: Vec<f64> = grad.iter().map(|g| 1.0 + f64::from(call) * g).collect();
            let got = download_f32(&gpu, Dev::new(&dw), n * k, DType::F32).unwrap();
            compare(&format!("{what}: dW added to once"), &got, &want, 1e-5, 1e-4).unwrap();
            let (act, aux) =
                (gpu.alloc(m * n * dtype.size()).unwrap(), gpu.alloc(m * n * dtype.size()).unwrap());
            let fwd = GeluEpilogue::Forward { bias: Dev::new(&bb), aux: Dev::new(&aux) };
            if gpu.gemm_gelu(&g, Dev::new(&act), Dev::new(&xb), Dev::new(&wb), fwd).unwrap() {
                let mut want = vec![0.0; m * n];
                naive::gelu_forward(&mut want, &pre);
                let got = download_f32(&gpu, Dev::new(&act), m * n, dtype).unwrap();
                compare(&format!("{what}: gelu(x·Wᵀ + b)"), &got, &want, rtol, 1e-4).unwrap();
            }
        }
    }
    let (tuned, other) = gpu.gemm_tuning();
    eprintln!("cuda: {tuned} products tuned, {other} of them away from the heuristic's first choice");
    assert!(tuned > 0, "no product had more than one candidate algorithm to tune");
}
