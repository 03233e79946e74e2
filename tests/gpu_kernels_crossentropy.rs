//! Cross-entropy kernels (cuda/crossentropy.cu) against the float64 reference
//! (`naive::crossentropy`) and the CPU backend, in the CPU emulator everywhere and on a real GPU
//! when one is present (otherwise that half prints SKIPPED).
//!
//! Tolerances (relative only, no absolute slack):
//! - fp32: 1e-5. Each dlogit is one fp32 exp times dloss/Σ (a few ulp each; on a GPU `expf` is the
//!   fast-math approximation, about 1e-6 relative for the arguments here) and the target column
//!   `dloss·(p − 1)` has no cancellation because p ≪ 1 for these logits; the loss is log Σ plus
//!   max − target, with Σ accumulated in fp32 over ≤ 1000 terms. Measured: ≤ 2e-7.
//! - bf16: the reference is computed from the bf16-rounded logits. Losses are fp32 (1e-5, as
//!   above); dlogits are rounded once to bf16, so 2^-8 (bf16's unit roundoff) + 1e-5 for the fp32
//!   arithmetic before the rounding. Measured: ≤ 3.9e-3 (the rounding itself).
//!
//! These tolerances also cover a GPU (fast-math `expf`/`logf` and division, FMA contraction:
//! ~1e-6 relative here), as does the 1e-5 slack on a row of out-of-vocabulary gradients summing to
//! dloss. The fused and forward-only kernels give bitwise equal losses in the emulator; on a GPU
//! they are separately compiled kernels and only have to agree within the fp32 loss tolerance,
//! 1e-5. Two runs must be bitwise equal on both, the forward-only kernel must leave the logits
//! bit for bit unchanged, and padded columns must be exactly +0.

use troupe::gpu::emu::compare;
use troupe::gpu::ops::crossentropy::{crossentropy_forward, crossentropy_forward_backward};
use troupe::gpu::{DType, Dev, Gpu, download_f32, round_bf16, upload_f32, upload_u32};
use troupe::kernels::{Backend, CpuBackend, naive};

#[path = "common/lcg.rs"]
mod lcg;
use lcg::uniform;

/// Logits `[rows, vp]` with garbage (large values) in the padded columns, which must be ignored.
fn logits(rows: usize, v: usize, vp: usize, seed: u64) -> Vec<f32> {
    let mut x = uniform(rows * vp, seed, 16.0);
    for r in 0..rows {
        for j in v..vp {
            x[r * vp + j] = 1000.0 + j as f32;
        }
    }
    x
}

fn targets(rows: usize, v: usize) -> Vec<u32> {
    // The first and last vocabulary entries are included on purpose.
    (0..rows)
        .map(|r| {
            if r == 0 {
                0
            } else if r == 1 {
                v as u32 - 1
            } else {
                (r * 7919 % v) as u32
            }
        })
        .collect()
}

struct Case {
    rows: usize,
    v: usize,
    vp: usize,
}

/// (losses, dlogits) from the fused kernel, and the losses of the forward-only kernel.
fn run_gpu(
    gpu: &impl Gpu,
    label: &str,
    dtype: DType,
    x: &[f32],
    t: &[u32],
    c: &Case,
    dloss: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = if dtype == DType::Bf16 { round_bf16(x) } else { x.to_vec() };
    let lb = upload_f32(gpu, &x, dtype).unwrap();
    let tb = upload_u32(gpu, t).unwrap();
    let fwd = gpu.alloc(c.rows * 4).unwrap();
    crossentropy_forward(gpu, dtype, Dev::new(&fwd), Dev::new(&lb), Dev::new(&tb), c.rows, c.v, c.vp)
        .unwrap();
    let untouched = download_f32(gpu, Dev::new(&lb), c.rows * c.vp, dtype).unwrap();
    assert!(
        untouched.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()),
        "{label}: forward-only changed the logits"
    );
    let losses = gpu.alloc(c.rows * 4).unwrap();
    crossentropy_forward_backward(
        gpu,
        dtype,
        Dev::new(&lb),
        Dev::new(&losses),
        Dev::new(&tb),
        c.rows,
        c.v,
        c.vp,
        dloss,
    )
    .unwrap();
    (
        download_f32(gpu, Dev::new(&losses), c.rows, DType::F32).unwrap(),
        download_f32(gpu, Dev::new(&lb), c.rows * c.vp, dtype).unwrap(),
        download_f32(gpu, Dev::new(&fwd), c.rows, DType::F32).unwrap(),
    )
}

fn worst_rel(got: &[f32], want: &[f64], floor: f64) -> f64 {
    got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs().max(floor)).fold(0.0, f64::max)
}

/// Whether the fused and forward-only losses must be equal bit for bit: in the emulator, not on
/// a GPU (see the file docs).
fn bitwise_across_kernels(label: &str) -> bool {
    label == "emulator"
}

fn check_reference<G: Gpu>(gpu: &G, label: &str) {
    // Vp a multiple of 8 (vector path) and an odd Vp (scalar path: rows are not 16-byte aligned);
    // V not a multiple of the pack width or of the block.
    let cases = [
        Case { rows: 5, v: 1000, vp: 1024 },
        Case { rows: 3, v: 997, vp: 1001 },
        Case { rows: 2, v: 37, vp: 37 },
    ];
    let dloss = 1.0 / 5.0;
    for c in &cases {
        for dtype in [DType::F32, DType::Bf16] {
            let mut x = logits(c.rows, c.v, c.vp, 3 + c.v as u64);
            if dtype == DType::Bf16 {
                x = round_bf16(&x);
            }
            let t = targets(c.rows, c.v);
            let (losses, dlogits, fwd) = run_gpu(gpu, label, dtype, &x, &t, c, dloss);
            let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let mut want_d = vec![0.0; c.rows * c.vp];
            let mut want_l = vec![0.0; c.rows];
            naive::crossentropy(&mut want_d, &mut want_l, &x64, &t, c.rows, c.v, c.vp, f64::from(dloss));
            let what = format!("{label} {dtype:?} rows {} V {} Vp {}", c.rows, c.v, c.vp);
            let drtol = if dtype == DType::F32 { 1e-5 } else { 1.0 / 256.0 + 1e-5 };
            compare(&format!("losses {what}"), &losses, &want_l, 1e-5, 0.0).unwrap();
            compare(&format!("forward-only losses {what}"), &fwd, &want_l, 1e-5, 0.0).unwrap();
            compare(&format!("dlogits {what}"), &dlogits, &want_d, drtol, 0.0).unwrap();
            if bitwise_across_kernels(label) {
                assert!(
                    losses.iter().zip(&fwd).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: the fused and forward-only losses differ: {losses:?} vs {fwd:?}"
                );
            } else {
                let fwd64: Vec<f64> = fwd.iter().map(|&v| f64::from(v)).collect();
                compare(&format!("fused vs forward-only losses {what}"), &losses, &fwd64, 1e-5, 0.0).unwrap();
            }
            for r in 0..c.rows {
                for j in c.v..c.vp {
                    assert_eq!(dlogits[r * c.vp + j].to_bits(), 0, "{what}: padded column {j} of row {r}");
                }
            }
            eprintln!(
                "{what}: worst relative error loss {:.2e}, dlogits {:.2e}",
                worst_rel(&losses, &want_l, 1e-30),
                worst_rel(&dlogits, &want_d, 1e-30)
            );
        }
    }
}

fn check_cpu_backend<G: Gpu>(gpu: &G, label: &str) {
    let c = Case { rows: 5, v: 1000, vp: 1024 };
    let x = logits(c.rows, c.v, c.vp, 11);
    let t = targets(c.rows, c.v);
    let (losses, dlogits, _) = run_gpu(gpu, label, DType::F32, &x, &t, &c, 0.5);
    let be = CpuBackend::new(1);
    let mut cpu_logits = x.clone();
    let mut cpu_losses = vec![0.0f32; c.rows];
    be.crossentropy_forward_backward(&mut cpu_logits, &mut cpu_losses, &t, c.rows, c.v, c.vp, 0.5);
    let up = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    compare(&format!("{label}: losses vs CPU backend"), &losses, &up(&cpu_losses), 1e-5, 0.0).unwrap();
    compare(&format!("{label}: dlogits vs CPU backend"), &dlogits, &up(&cpu_logits), 1e-5, 0.0).unwrap();
}

fn check_determinism<G: Gpu>(gpu: &G, label: &str) {
    let c = Case { rows: 4, v: 1000, vp: 1024 };
    for dtype in [DType::F32, DType::Bf16] {
        let x = logits(c.rows, c.v, c.vp, 5);
        let t = targets(c.rows, c.v);
        let a = run_gpu(gpu, label, dtype, &x, &t, &c, 0.25);
        let b = run_gpu(gpu, label, dtype, &x, &t, &c, 0.25);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&b.0), "{label} {dtype:?} losses");
        assert_eq!(bits(&a.1), bits(&b.1), "{label} {dtype:?} dlogits");
    }
}

fn check_bad_targets<G: Gpu>(gpu: &G, label: &str) {
    let c = Case { rows: 3, v: 100, vp: 128 };
    let x = logits(c.rows, c.v, c.vp, 9);
    let t = vec![5, 100, u32::MAX]; // 100 = V is a padded column, u32::MAX far out of bounds
    let (losses, dlogits, fwd) = run_gpu(gpu, label, DType::F32, &x, &t, &c, 1.0);
    assert!(losses[0].is_finite() && losses[1].is_nan() && losses[2].is_nan(), "{label}: {losses:?}");
    assert!(fwd[1].is_nan() && fwd[2].is_nan(), "{label}: {fwd:?}");
    assert!(dlogits.iter().all(|v| v.is_finite()), "{label}: dlogits must stay finite");
    // Without the one-hot term a row's gradient is dloss·softmax: it sums to dloss.
    for r in 1..3 {
        let s: f32 = dlogits[r * c.vp..(r + 1) * c.vp].iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "{label}: row {r} sums to {s}");
        assert_eq!(dlogits[r * c.vp + 100], 0.0, "{label}: padded column of row {r}");
    }
}

fn check_shape_errors<G: Gpu>(gpu: &G, label: &str) {
    let lb = gpu.alloc(5 * 1024 * 4).unwrap();
    let losses = gpu.alloc(5 * 4).unwrap();
    let tb = upload_u32(gpu, &[0; 5]).unwrap();
    let (l, o, t) = (Dev::new(&lb), Dev::new(&losses), Dev::new(&tb));
    let err = crossentropy_forward_backward(gpu, DType::F32, l, o, t, 6, 1000, 1024, 1.0).unwrap_err();
    assert!(err.to_string().contains("crossentropy_forward_backward"), "{label}: {err}");
    assert!(err.to_string().contains("logits"), "{label}: {err}");
    let err = crossentropy_forward(gpu, DType::F32, o, l, t, 5, 1025, 1024).unwrap_err();
    assert!(err.to_string().contains("crossentropy_forward: rows 5, V 1025, Vp 1024"), "{label}: {err}");
}

#[test]
fn fused_and_forward_match_the_reference_fp32_and_bf16_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_reference(emu, "emulator");
}

#[test]
fn fused_and_forward_match_the_reference_fp32_and_bf16_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_reference(gpu, "cuda");
}

#[test]
fn fused_fp32_matches_the_cpu_backend_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_cpu_backend(emu, "emulator");
}

#[test]
fn fused_fp32_matches_the_cpu_backend_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_cpu_backend(gpu, "cuda");
}

#[test]
fn results_are_bitwise_deterministic_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_determinism(emu, "emulator");
}

#[test]
fn results_are_bitwise_deterministic_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_determinism(gpu, "cuda");
}

#[test]
fn a_target_outside_the_vocabulary_gives_a_nan_loss_and_finite_gradients_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_bad_targets(emu, "emulator");
}

#[test]
fn a_target_outside_the_vocabulary_gives_a_nan_loss_and_finite_gradients_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_bad_targets(gpu, "cuda");
}

#[test]
fn inconsistent_shapes_are_errors_naming_the_op_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_shape_errors(emu, "emulator");
}

#[test]
fn inconsistent_shapes_are_errors_naming_the_op_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_shape_errors(gpu, "cuda");
}
