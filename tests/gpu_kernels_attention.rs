//! Attention kernels (cuda/attention.cu) against the float64 reference
//! (`kernels::naive::attention_forward/backward`), in the CPU emulator everywhere and on a real GPU
//! when one is present (otherwise that half prints SKIPPED), on small odd shapes: T = 1, T not a multiple of
//! any tile, several query and key tiles, every head size with kernels.
//!
//! Tolerances, `|got − want| ≤ atol + rtol·|want|`, with `atol` a fraction of the largest
//! `|want|` of the tensor (outputs and gradients are sums of O(1) terms that can cancel to
//! near zero, where no relative bound holds):
//! - fp32: rtol 1e-5, atol 2e-6·max: fp32 accumulation over ≤ 130 keys/queries and HS products,
//!   exp2f, and Q pre-scaled by scale·log2 e (one rounding) each cost a few 1e-7 of the largest
//!   term (measured worst 6e-7·max in the emulator; a GPU contracts to FMA and rounds
//!   differently, hence the factor 3 of headroom).
//! - bf16: the reference sees the bf16-rounded qkv and dout. Forward rounds `out` to bf16:
//!   rtol 2^-8 (one bf16 ulp), atol 2^-9·max. Backward also starts from the forward's bf16 `out`
//!   (D = Σ dout·out carries 2^-9 relative error into every dS) and rounds dqkv:
//!   rtol 2^-6, atol 2^-7·max (measured worst 3e-3·max). lse is fp32 for both storage types
//!   and computed from the same (rounded) inputs as the reference: rtol 1e-5, atol 1e-5·max.
//!
//! The same tolerances should cover a GPU: `--use_fast_math` (approximate exp2f and division,
//! FMA contraction, flushed denormals) costs a few fp32 ulp per term, inside the headroom above.
//! Two backward runs must be bitwise equal on both. The check that every head size's kernels are
//! compiled in uses `EmuGpu::kernels()` and runs only in the emulator.

use troupe::gpu::emu::compare;
use troupe::gpu::ops::attention;
use troupe::gpu::{DType, Dev, Gpu, download_f32, round_bf16, upload_f32};
use troupe::kernels::naive;

fn uniform(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// The float64 log-sum-exp of every causal softmax row, `[B,NH,T]`.
fn lse_f64(qkv: &[f64], b: usize, t: usize, c: usize, nh: usize) -> Vec<f64> {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut lse = vec![0.0; b * nh * t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let q = (bi * t + i) * 3 * c + h * hs;
                        let k = (bi * t + j) * 3 * c + c + h * hs;
                        (0..hs).map(|d| qkv[q + d] * qkv[k + d]).sum::<f64>() * scale
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse[(bi * nh + h) * t + i] = mx + s.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            }
        }
    }
    lse
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Worst `|got − want| / max|want|` (for the report).
fn worst(got: &[f32], want: &[f64]) -> f64 {
    let m = max_abs(want).max(f64::MIN_POSITIVE);
    got.iter().zip(want).fold(0.0, |w, (&g, &x)| w.max((f64::from(g) - x).abs() / m))
}

/// A buffer of `n` elements of `dtype` filled with `value` (to catch elements a kernel skips).
fn filled<G: Gpu>(gpu: &G, n: usize, value: f32, dtype: DType) -> G::Buf {
    upload_f32(gpu, &vec![value; n], dtype).unwrap()
}

struct Outputs {
    out: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<f32>,
    /// Raw bytes of dqkv from two backward runs (determinism).
    dqkv_bytes: [Vec<u8>; 2],
}

#[allow(clippy::too_many_arguments)]
fn run<G: Gpu>(
    gpu: &G,
    dtype: DType,
    qkv: &[f32],
    dout: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Outputs {
    let qkv_d = upload_f32(gpu, qkv, dtype).unwrap();
    let dout_d = upload_f32(gpu, dout, dtype).unwrap();
    let out_d = filled(gpu, b * t * c, f32::NAN, dtype);
    let lse_d = filled(gpu, b * nh * t, f32::NAN, DType::F32);
    attention::attention_forward(
        gpu,
        dtype,
        Dev::new(&out_d),
        Dev::new(&lse_d),
        Dev::new(&qkv_d),
        b,
        t,
        c,
        nh,
    )
    .unwrap();
    let dsum = filled(gpu, b * nh * t, f32::NAN, DType::F32);
    let mut dqkv_bytes: [Vec<u8>; 2] = Default::default();
    for bytes in &mut dqkv_bytes {
        // Garbage first: backward overwrites every element.
        let dqkv_d = filled(gpu, b * t * 3 * c, 1e3, dtype);
        attention::attention_backward(
            gpu,
            dtype,
            Dev::new(&dqkv_d),
            Dev::new(&dsum),
            Dev::new(&dout_d),
            Dev::new(&out_d),
            Dev::new(&lse_d),
            Dev::new(&qkv_d),
            b,
            t,
            c,
            nh,
        )
        .unwrap();
        *bytes = vec![0; b * t * 3 * c * dtype.size()];
        gpu.download(&dqkv_d, 0, bytes).unwrap();
    }
    Outputs {
        out: download_f32(gpu, Dev::new(&out_d), b * t * c, dtype).unwrap(),
        lse: download_f32(gpu, Dev::new(&lse_d), b * nh * t, DType::F32).unwrap(),
        dqkv: troupe::gpu::decode(&dqkv_bytes[0], dtype),
        dqkv_bytes,
    }
}

/// Runs one shape in `dtype` and checks out, lse, dqkv and determinism; returns the worst
/// normalised errors (out, lse, dqkv).
fn check<G: Gpu>(gpu: &G, label: &str, dtype: DType, b: usize, t: usize, nh: usize, hs: usize) -> [f64; 3] {
    let c = nh * hs;
    let seed = (b * 1000 + t * 10 + hs) as u64;
    let (mut qkv, mut dout) = (uniform(b * t * 3 * c, seed, 2.0), uniform(b * t * c, seed + 1, 1.0));
    if dtype == DType::Bf16 {
        (qkv, dout) = (round_bf16(&qkv), round_bf16(&dout));
    }
    let got = run(gpu, dtype, &qkv, &dout, b, t, c, nh);

    let qkv64: Vec<f64> = qkv.iter().map(|&v| f64::from(v)).collect();
    let dout64: Vec<f64> = dout.iter().map(|&v| f64::from(v)).collect();
    let mut out = vec![0.0; b * t * c];
    let probs = naive::attention_forward(&mut out, &qkv64, b, t, c, nh);
    let mut dqkv = vec![0.0; b * t * 3 * c];
    naive::attention_backward(&mut dqkv, &dout64, &probs, &qkv64, b, t, c, nh);
    let lse = lse_f64(&qkv64, b, t, c, nh);

    let what = |x: &str| format!("{label}: {x} ({dtype:?}, B {b}, T {t}, NH {nh}, HS {hs})");
    let ((rf, af), (rb, ab), lse_tol) = match dtype {
        DType::F32 => ((1e-5, 2e-6), (1e-5, 2e-6), 1e-5),
        DType::Bf16 => ((1.0 / 256.0, 1.0 / 512.0), (1.0 / 64.0, 1.0 / 128.0), 1e-5),
    };
    compare(&what("out"), &got.out, &out, rf, af * max_abs(&out)).unwrap();
    compare(&what("lse"), &got.lse, &lse, lse_tol, lse_tol * max_abs(&lse)).unwrap();
    compare(&what("dqkv"), &got.dqkv, &dqkv, rb, ab * max_abs(&dqkv)).unwrap();
    assert!(got.dqkv_bytes[0] == got.dqkv_bytes[1], "{}: two runs differ", what("backward"));
    let errs = [worst(&got.out, &out), worst(&got.lse, &lse), worst(&got.dqkv, &dqkv)];
    eprintln!(
        "{}: worst |err|/max|ref| out {:.2e} lse {:.2e} dqkv {:.2e}",
        what("attention"),
        errs[0],
        errs[1],
        errs[2]
    );
    errs
}

fn check_head_size_32<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        // 1 row; one partial tile; 64 < T < 2·64 (partial diagonal and tail); three tiles.
        for t in [1, 37, 70, 130] {
            check(gpu, label, dtype, 2, t, 2, 32);
        }
    }
}

fn check_head_sizes_64_and_128<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        check(gpu, label, dtype, 2, 45, 2, 64);
        // T 40 spans 3 of the 16-row tiles of the backward kernels and 2 forward tiles.
        check(gpu, label, dtype, 1, 40, 2, 128);
    }
}

/// Emulator only: `EmuGpu::kernels()` lists the compiled kernels.
#[test]
fn every_head_size_has_its_kernels_in_the_emulator() {
    let Some(gpu) = troupe::gpu::emu::shared() else { return };
    for hs in attention::HEAD_SIZES {
        for dt in ["f32", "bf16"] {
            for k in ["forward", "backward_dkv", "backward_dq"] {
                let name = format!("attention_{k}_hs{hs}_{dt}");
                assert!(gpu.kernels().contains(&name), "{name} is not compiled in");
            }
        }
    }
}

fn check_shape_errors<G: Gpu>(gpu: &G, label: &str) {
    let big = gpu.alloc(1 << 16).unwrap();
    let (b, t) = (1, 4);
    // C 96 with NH 2: head size 48.
    let err = attention::attention_forward(
        gpu,
        DType::F32,
        Dev::new(&big),
        Dev::new(&big),
        Dev::new(&big),
        b,
        t,
        96,
        2,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("attention_forward") && msg.contains("head size 48"), "{label}: {msg}");
    assert!(msg.contains("[32, 64, 128]"), "{label}: {msg}");
    let err = attention::attention_forward(
        gpu,
        DType::F32,
        Dev::new(&big),
        Dev::new(&big),
        Dev::new(&big),
        b,
        t,
        64,
        3,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{label}: {err}");
    // qkv needs B·T·3C = 768 floats = 3072 bytes.
    let small = gpu.alloc(3000).unwrap();
    let err = attention::attention_forward(
        gpu,
        DType::F32,
        Dev::new(&big),
        Dev::new(&big),
        Dev::new(&small),
        b,
        t,
        64,
        2,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("qkv") && msg.contains("3072 bytes"), "{label}: {msg}");
    let err = attention::attention_backward(
        gpu,
        DType::F32,
        Dev::new(&big),
        Dev::new(&small).at(749, DType::F32),
        Dev::new(&big),
        Dev::new(&big),
        Dev::new(&big),
        Dev::new(&big),
        b,
        t,
        64,
        2,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("attention_backward") && msg.contains("dsum"), "{label}: {msg}");
}

#[test]
fn head_size_32_matches_the_reference_on_odd_lengths_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_head_size_32(emu, "emulator");
}

#[test]
fn head_size_32_matches_the_reference_on_odd_lengths_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_head_size_32(gpu, "cuda");
}

#[test]
fn head_sizes_64_and_128_match_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_head_sizes_64_and_128(emu, "emulator");
}

#[test]
fn head_sizes_64_and_128_match_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_head_sizes_64_and_128(gpu, "cuda");
}

#[test]
fn unsupported_head_sizes_and_short_buffers_are_shape_errors_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_shape_errors(emu, "emulator");
}

#[test]
fn unsupported_head_sizes_and_short_buffers_are_shape_errors_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_shape_errors(gpu, "cuda");
}
