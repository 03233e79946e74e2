//! Attention kernels (cuda/attention.cu: SIMT; cuda/attention_tc.cu: bf16 tensor cores) against
//! the float64 reference (`kernels::naive::attention_forward/backward`), in the CPU emulator
//! everywhere and on a real GPU when one is present (otherwise that half prints SKIPPED), on small
//! odd shapes: T = 1, T not a multiple of any tile, several query and key tiles, every head size
//! with tiled kernels, and the any-head-size fallback (cuda/attention_any.cu) at head sizes 4, 8,
//! 20 and 48 (T 1, 13, 37, and 130 for two 128-row blocks). Also: the fragment layouts of the warp-level MMA (`mma_selftest_bf16`), the
//! tensor-core path against the SIMT path on the same inputs, and what the tensor-core path
//! refuses.
//!
//! Tolerances, `|got − want| ≤ atol + rtol·|want|`, with `atol` a fraction of the largest
//! `|want|` of the tensor (outputs and gradients are sums of O(1) terms that can cancel to
//! near zero, where no relative bound holds):
//! - fp32 (SIMT and the fallback): rtol 1e-5, atol 2e-6·max: fp32 accumulation over ≤ 130 keys/queries and HS
//!   products, exp2f, and Q pre-scaled by scale·log2 e (one rounding) each cost a few 1e-7 of the
//!   largest term (measured worst 6e-7·max in the emulator; a GPU contracts to FMA and rounds
//!   differently, hence the factor 3 of headroom).
//! - bf16 (SIMT and the fallback, which rounds the same things): the reference sees the bf16-rounded qkv and dout. Forward rounds `out` to bf16:
//!   rtol 2^-8 (one bf16 ulp), atol 2^-9·max. Backward also starts from the forward's bf16 `out`
//!   (D = Σ dout·out carries 2^-9 relative error into every dS) and rounds dqkv:
//!   rtol 2^-6, atol 2^-7·max (measured worst 3.7e-3·max). lse is fp32 for both storage types
//!   and computed from the same (rounded) inputs as the reference: rtol 1e-5, atol 1e-5·max.
//! - bf16 (tensor cores): the products are exact in fp32 and accumulate in fp32 like the SIMT
//!   kernels, but P is rounded to bf16 before P·V (forward) and Pᵀ·dO (dV), and dS before dSᵀ·Q
//!   (dK) and dS·K (dQ). A rounded weight p(1 + δ), |δ| ≤ 2^-9, moves an output by at most
//!   2^-9·max|v| in absolute terms, about 2^-9·max|out| for these inputs (|v| ≤ 2), on top of
//!   the final rounding: out gets rtol 2^-8, atol 2^-8·max (twice the SIMT atol; measured worst
//!   2.6e-3·max vs 2.0e-3 for SIMT). In backward the extra roundings are of the size D already
//!   carries: dqkv keeps the SIMT tolerances (measured worst 3.2e-3·max). l sums the unrounded
//!   P, so lse keeps its fp32 tolerance (measured worst 1.1e-7·max).
//! - tensor cores vs SIMT: the sum of both tolerances (measured worst out 4.0e-3·max, dqkv
//!   6.4e-3·max at HS 128).
//! - the MMA self-test: small integers, every sum exact whatever the order: bitwise, on a GPU
//!   too; random bf16 values: 2^-20 of the sum of |terms|.
//!
//! The same tolerances should cover a GPU: `--use_fast_math` (approximate exp2f and division,
//! FMA contraction, flushed denormals) and the tensor cores' own accumulation order cost a few
//! fp32 ulp per term, inside the headroom above. Two forward and two backward runs must be
//! bitwise equal on both. The check that every head size's kernels are compiled in uses
//! `EmuGpu::kernels()` and runs only in the emulator. `TROUPE_ATTENTION=simt` turns the automatic
//! path into the SIMT one; the explicit-path checks run the same either way.

use troupe::gpu::emu::compare;
use troupe::gpu::ops::attention::{self, Path};
use troupe::gpu::{Arg, DType, Dev, Gpu, download_f32, round_bf16, upload_f32};
use troupe::kernels::naive;

#[path = "common/lcg.rs"]
mod lcg;

fn uniform(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut g = lcg::Lcg::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..n).map(|_| (g.unit() * 2.0 - 1.0) * amp).collect()
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
    /// Raw bytes of out and lse from two forward runs (determinism).
    fwd_bytes: [Vec<u8>; 2],
    /// Raw bytes of dqkv from two backward runs (determinism).
    dqkv_bytes: [Vec<u8>; 2],
}

/// Forward twice, then backward twice, on `path` (`None`: the automatic choice of
/// `attention_forward` / `attention_backward`).
#[allow(clippy::too_many_arguments)]
fn run<G: Gpu>(
    gpu: &G,
    path: Option<Path>,
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
    let (out_n, lse_n) = (b * t * c, b * nh * t);
    let mut fwd_bytes: [Vec<u8>; 2] = Default::default();
    let mut fwd = Vec::new();
    for bytes in &mut fwd_bytes {
        // NaN first: forward overwrites every element.
        let out_d = filled(gpu, out_n, f32::NAN, dtype);
        let lse_d = filled(gpu, lse_n, f32::NAN, DType::F32);
        let (o, l, q) = (Dev::new(&out_d), Dev::new(&lse_d), Dev::new(&qkv_d));
        match path {
            None => attention::attention_forward(gpu, dtype, o, l, q, b, t, c, nh),
            Some(p) => attention::attention_forward_on(gpu, p, dtype, o, l, q, b, t, c, nh),
        }
        .unwrap();
        *bytes = vec![0; out_n * dtype.size() + lse_n * 4];
        let (ob, lb) = bytes.split_at_mut(out_n * dtype.size());
        gpu.download(&out_d, 0, ob).unwrap();
        gpu.download(&lse_d, 0, lb).unwrap();
        fwd.push((out_d, lse_d));
    }
    let (out_d, lse_d) = &fwd[0];
    let dsum = filled(gpu, b * nh * t, f32::NAN, DType::F32);
    let mut dqkv_bytes: [Vec<u8>; 2] = Default::default();
    for bytes in &mut dqkv_bytes {
        // Garbage first: backward overwrites every element.
        let dqkv_d = filled(gpu, b * t * 3 * c, 1e3, dtype);
        let (dq, ds, g) = (Dev::new(&dqkv_d), Dev::new(&dsum), Dev::new(&dout_d));
        let (o, l, q) = (Dev::new(out_d), Dev::new(lse_d), Dev::new(&qkv_d));
        match path {
            None => attention::attention_backward(gpu, dtype, dq, ds, g, o, l, q, b, t, c, nh),
            Some(p) => attention::attention_backward_on(gpu, p, dtype, dq, ds, g, o, l, q, b, t, c, nh),
        }
        .unwrap();
        *bytes = vec![0; b * t * 3 * c * dtype.size()];
        gpu.download(&dqkv_d, 0, bytes).unwrap();
    }
    Outputs {
        out: troupe::gpu::decode(&fwd_bytes[0][..out_n * dtype.size()], dtype),
        lse: troupe::gpu::decode(&fwd_bytes[0][out_n * dtype.size()..], DType::F32),
        dqkv: troupe::gpu::decode(&dqkv_bytes[0], dtype),
        fwd_bytes,
        dqkv_bytes,
    }
}

/// Tolerances `(rtol, atol as a fraction of max|want|)` for (out, lse, dqkv) of one path and
/// storage type (see the module docs).
fn tolerances(path: Path, dtype: DType) -> [(f64, f64); 3] {
    match (path, dtype) {
        (_, DType::F32) => [(1e-5, 2e-6), (1e-5, 1e-5), (1e-5, 2e-6)],
        (Path::Simt, DType::Bf16) => [(1.0 / 256.0, 1.0 / 512.0), (1e-5, 1e-5), (1.0 / 64.0, 1.0 / 128.0)],
        (Path::TensorCore, DType::Bf16) => {
            [(1.0 / 256.0, 1.0 / 256.0), (1e-5, 1e-5), (1.0 / 64.0, 1.0 / 64.0)]
        }
    }
}

/// The path a call with these shapes takes, for the tolerances.
fn resolved(path: Option<Path>, dtype: DType, hs: usize) -> Path {
    path.unwrap_or_else(|| {
        let buf = ();
        attention::auto_path(dtype, hs, &[Dev::new(&buf)])
    })
}

/// Inputs of one shape: qkv (amplitude 2) and dout (amplitude 1), rounded to bf16 for bf16.
fn inputs(dtype: DType, b: usize, t: usize, c: usize, hs: usize) -> (Vec<f32>, Vec<f32>) {
    let seed = (b * 1000 + t * 10 + hs) as u64;
    let (mut qkv, mut dout) = (uniform(b * t * 3 * c, seed, 2.0), uniform(b * t * c, seed + 1, 1.0));
    if dtype == DType::Bf16 {
        (qkv, dout) = (round_bf16(&qkv), round_bf16(&dout));
    }
    (qkv, dout)
}

/// Runs one shape in `dtype` on `path` (`None`: automatic) and checks out, lse, dqkv and
/// determinism against the float64 reference; returns the outputs and the worst normalised
/// errors (out, lse, dqkv).
#[allow(clippy::too_many_arguments)]
fn check<G: Gpu>(
    gpu: &G,
    label: &str,
    path: Option<Path>,
    dtype: DType,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> (Outputs, [f64; 3]) {
    let c = nh * hs;
    let (qkv, dout) = inputs(dtype, b, t, c, hs);
    let got = run(gpu, path, dtype, &qkv, &dout, b, t, c, nh);

    let qkv64: Vec<f64> = qkv.iter().map(|&v| f64::from(v)).collect();
    let dout64: Vec<f64> = dout.iter().map(|&v| f64::from(v)).collect();
    let mut out = vec![0.0; b * t * c];
    let probs = naive::attention_forward(&mut out, &qkv64, b, t, c, nh);
    let mut dqkv = vec![0.0; b * t * 3 * c];
    naive::attention_backward(&mut dqkv, &dout64, &probs, &qkv64, b, t, c, nh);
    let lse = lse_f64(&qkv64, b, t, c, nh);

    let p = resolved(path, dtype, hs);
    let what = |x: &str| format!("{label}: {x} ({p:?}, {dtype:?}, B {b}, T {t}, NH {nh}, HS {hs})");
    let [(rf, af), (rl, al), (rb, ab)] = tolerances(p, dtype);
    compare(&what("out"), &got.out, &out, rf, af * max_abs(&out)).unwrap();
    compare(&what("lse"), &got.lse, &lse, rl, al * max_abs(&lse)).unwrap();
    compare(&what("dqkv"), &got.dqkv, &dqkv, rb, ab * max_abs(&dqkv)).unwrap();
    assert!(got.fwd_bytes[0] == got.fwd_bytes[1], "{}: two runs differ", what("forward"));
    assert!(got.dqkv_bytes[0] == got.dqkv_bytes[1], "{}: two runs differ", what("backward"));
    let errs = [worst(&got.out, &out), worst(&got.lse, &lse), worst(&got.dqkv, &dqkv)];
    eprintln!(
        "{}: worst |err|/max|ref| out {:.2e} lse {:.2e} dqkv {:.2e}",
        what("attention"),
        errs[0],
        errs[1],
        errs[2]
    );
    (got, errs)
}

fn check_head_size_32<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        // 1 row; one partial tile; 64 < T < 2·64 (partial diagonal and tail); three tiles.
        for t in [1, 37, 70, 130] {
            check(gpu, label, None, dtype, 2, t, 2, 32);
        }
    }
}

/// The SIMT kernels at head sizes 64 and 128, in both storage types (bf16 explicitly on the SIMT
/// path: the automatic choice takes the tensor cores there).
fn check_head_sizes_64_and_128<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        check(gpu, label, Some(Path::Simt), dtype, 2, 45, 2, 64);
        // T 40 spans 3 of the 16-row tiles of the backward kernels and 2 forward tiles.
        check(gpu, label, Some(Path::Simt), dtype, 1, 40, 2, 128);
    }
}

/// The fallback kernels (cuda/attention_any.cu) at head sizes without tiled kernels, in both
/// storage types, on the automatic path (which is the fallback there): T 1 (one row), 13, 37
/// (partial 128-row blocks, several heads), 130 (two blocks: the dK/dV threads of the second
/// block start at its first key).
fn check_any_head_sizes<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        for hs in [4, 8, 20, 48] {
            check(gpu, label, None, dtype, 2, 1, 2, hs);
            check(gpu, label, None, dtype, 2, 13, 2, hs);
            check(gpu, label, None, dtype, 1, 37, 3, hs);
        }
        check(gpu, label, None, dtype, 1, 130, 2, 8);
        // Explicitly on the SIMT path too (the same kernels).
        check(gpu, label, Some(Path::Simt), dtype, 1, 13, 1, 1);
    }
}

/// The tensor-core kernels (bf16) against the reference, bitwise determinism, and agreement with
/// the SIMT kernels on the same bf16 inputs: T 1 (one row), 50 (one partial tile), 130 (three
/// 64-row tiles, the last partial); HS 128 at T 80 (two forward tiles; five 16-row tiles in
/// both backward kernels, with warps skipped above the diagonal).
fn check_tensor_cores<G: Gpu>(gpu: &G, label: &str) {
    for (b, t, nh, hs) in [(2, 1, 2, 64), (1, 50, 2, 64), (2, 130, 1, 64), (1, 80, 2, 128)] {
        let (tc, _) = check(gpu, label, Some(Path::TensorCore), DType::Bf16, b, t, nh, hs);
        // The automatic choice is the tensor-core path here (unless TROUPE_ATTENTION=simt).
        if resolved(None, DType::Bf16, hs) == Path::TensorCore {
            let c = nh * hs;
            let (qkv, dout) = inputs(DType::Bf16, b, t, c, hs);
            let auto = run(gpu, None, DType::Bf16, &qkv, &dout, b, t, c, nh);
            assert!(
                auto.fwd_bytes[0] == tc.fwd_bytes[0] && auto.dqkv_bytes[0] == tc.dqkv_bytes[0],
                "{label}"
            );
        }
        // SIMT vs tensor cores: each is within its tolerance of the reference; between them
        // the sum of both.
        let (simt, _) = check(gpu, label, Some(Path::Simt), DType::Bf16, b, t, nh, hs);
        let what = |x: &str| format!("{label}: {x} tensor cores vs SIMT (B {b}, T {t}, NH {nh}, HS {hs})");
        let [(rf0, af0), _, (rb0, ab0)] = tolerances(Path::Simt, DType::Bf16);
        let [(rf1, af1), (rl, al), (rb1, ab1)] = tolerances(Path::TensorCore, DType::Bf16);
        let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let (so, sl, sd) = (f64s(&simt.out), f64s(&simt.lse), f64s(&simt.dqkv));
        compare(&what("out"), &tc.out, &so, rf0 + rf1, (af0 + af1) * max_abs(&so)).unwrap();
        compare(&what("lse"), &tc.lse, &sl, 2.0 * rl, 2.0 * al * max_abs(&sl)).unwrap();
        compare(&what("dqkv"), &tc.dqkv, &sd, rb0 + rb1, (ab0 + ab1) * max_abs(&sd)).unwrap();
        eprintln!(
            "{}: worst |tc − simt|/max|simt| out {:.2e} lse {:.2e} dqkv {:.2e}",
            what("attention"),
            worst(&tc.out, &so),
            worst(&tc.lse, &sl),
            worst(&tc.dqkv, &sd)
        );
    }
}

/// The tensor-core path refuses what it cannot run (fp32, head size 32, misaligned pointers)
/// with a shape error instead of launching.
fn check_tensor_core_refusals<G: Gpu>(gpu: &G, label: &str) {
    let big = gpu.alloc(1 << 16).unwrap();
    let d = Dev::new(&big);
    let fwd = |dtype, out: Dev<'_, G::Buf>, c, nh| {
        attention::attention_forward_on(gpu, Path::TensorCore, dtype, out, d, d, 1, 4, c, nh)
            .unwrap_err()
            .to_string()
    };
    let msg = fwd(DType::F32, d, 128, 2);
    assert!(msg.contains("bf16") && msg.contains("[64, 128]"), "{label}: {msg}");
    let msg = fwd(DType::Bf16, d, 64, 2);
    assert!(msg.contains("head size in [64, 128]"), "{label}: {msg}");
    let msg = fwd(DType::Bf16, d.at(4, DType::Bf16), 128, 2);
    assert!(msg.contains("out") && msg.contains("16-byte"), "{label}: {msg}");
    let err = attention::attention_backward_on(
        gpu,
        Path::TensorCore,
        DType::Bf16,
        d.at(4, DType::Bf16),
        d,
        d,
        d,
        d,
        d,
        1,
        4,
        128,
        2,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("dqkv") && err.contains("16-byte"), "{label}: {err}");
}

/// mma_selftest_bf16: one m16n8k16 product d = a·b + c against the host. Small integers first
/// (every sum exact in fp32 whatever the order: a fragment-layout mistake cannot hide in a
/// tolerance, and the GPU must match bitwise), then random bf16 values within fp32 accumulation
/// error.
fn check_mma_layout<G: Gpu>(gpu: &G, label: &str) {
    for (case, seed) in [("integers", 7u64), ("random", 11)] {
        let ints = case == "integers";
        let values = |n, s, amp| -> Vec<f32> {
            let v = uniform(n, s, amp);
            if ints { v.iter().map(|x| x.round()).collect() } else { round_bf16(&v) }
        };
        let (a, b, c) = (values(256, seed, 8.0), values(128, seed + 1, 8.0), values(128, seed + 2, 64.0));
        let ad = upload_f32(gpu, &a, DType::Bf16).unwrap();
        let bd = upload_f32(gpu, &b, DType::Bf16).unwrap();
        let cd = upload_f32(gpu, &c, DType::F32).unwrap();
        let dd = filled(gpu, 128, f32::NAN, DType::F32);
        let args = [
            Arg::Ptr(Dev::new(&dd)),
            Arg::Ptr(Dev::new(&ad)),
            Arg::Ptr(Dev::new(&bd)),
            Arg::Ptr(Dev::new(&cd)),
        ];
        gpu.launch("mma_selftest_bf16", [1, 1, 1], [32, 1, 1], 0, &args).unwrap();
        let got = download_f32(gpu, Dev::new(&dd), 128, DType::F32).unwrap();
        let mut want = vec![0.0f64; 128];
        let mut first_bad = None;
        for i in 0..16 {
            for j in 0..8 {
                let terms: Vec<f64> =
                    (0..16).map(|k| f64::from(a[i * 16 + k]) * f64::from(b[k * 8 + j])).collect();
                want[i * 8 + j] = terms.iter().sum::<f64>() + f64::from(c[i * 8 + j]);
                let mag = terms.iter().map(|x| x.abs()).sum::<f64>() + f64::from(c[i * 8 + j]).abs();
                let tol = if ints { 0.0 } else { mag * 2f64.powi(-20) };
                let g = f64::from(got[i * 8 + j]);
                if first_bad.is_none() && (g - want[i * 8 + j]).abs() > tol {
                    first_bad = Some((i, j, g, want[i * 8 + j], tol));
                }
            }
        }
        if let Some((i, j, g, w, tol)) = first_bad {
            // The whole picture, so that the layout can be worked out from the log afterwards
            // (a GPU session is short): inputs, what came back, what was expected.
            let rows = |name: &str, v: &[f64], cols: usize| {
                eprintln!("{label}: mma {case}: {name} ({} × {cols}, row-major):", v.len() / cols);
                for r in v.chunks(cols) {
                    eprintln!("  {}", r.iter().map(|x| format!("{x:>8}")).collect::<Vec<_>>().join(" "));
                }
            };
            let f = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            rows("a", &f(&a), 16);
            rows("b", &f(&b), 8);
            rows("c", &f(&c), 8);
            rows("d from the device", &f(&got), 8);
            rows("d expected", &want, 8);
            panic!(
                "{label}: mma {case}: d[{i}][{j}] is {g}, want {w} (tolerance {tol:e}): \
                 the fragment layouts of mma_bf16_16816 are wrong (matrices above)"
            );
        }
    }
}

/// ldmatrix_selftest: the tensor-core attention's fragment loads, element-wise and by ldmatrix,
/// of a 16×16 tile of distinct values: both give each lane the words the mma fragment layouts
/// of prelude.cuh say (A of the whole tile, B along rows at n0 = 8, B down columns at n0 = 8).
/// On a GPU this is what checks the emulator's ldmatrix against the hardware.
fn check_ldmatrix_layout<G: Gpu>(gpu: &G, label: &str) {
    // Distinct bf16 values: element i is i (integers up to 256 are exact in bf16).
    let tile: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let bits: Vec<u16> = tile.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
    let src = upload_f32(gpu, &tile, DType::Bf16).unwrap();
    let out = filled(gpu, 32 * 16, f32::NAN, DType::F32);
    let args = [Arg::Ptr(Dev::new(&out)), Arg::Ptr(Dev::new(&src))];
    gpu.launch("ldmatrix_selftest", [1, 1, 1], [32, 1, 1], 16 * 24 * 2, &args).unwrap();
    let mut raw = vec![0u8; 32 * 16 * 4];
    gpu.download(&out, 0, &mut raw).unwrap();
    let words: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let pair = |r0: usize, c0: usize, r1: usize, c1: usize| {
        u32::from(bits[r0 * 16 + c0]) | (u32::from(bits[r1 * 16 + c1]) << 16)
    };
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        let want = [
            // A: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][..], a[2] = A[g][2t+8, ..], a[3] = A[g+8][2t+8, ..]
            pair(g, 2 * t, g, 2 * t + 1),
            pair(g + 8, 2 * t, g + 8, 2 * t + 1),
            pair(g, 2 * t + 8, g, 2 * t + 9),
            pair(g + 8, 2 * t + 8, g + 8, 2 * t + 9),
            // B[k][n] = tile[8 + n][k]: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
            pair(8 + g, 2 * t, 8 + g, 2 * t + 1),
            pair(8 + g, 2 * t + 8, 8 + g, 2 * t + 9),
            // B[k][n] = tile[k][8 + n]
            pair(2 * t, 8 + g, 2 * t + 1, 8 + g),
            pair(2 * t + 8, 8 + g, 2 * t + 9, 8 + g),
        ];
        let got = &words[lane * 16..lane * 16 + 16];
        assert_eq!(&got[..8], &want, "{label}: lane {lane}: element-wise fragment loads (words {got:08x?})");
        assert_eq!(
            &got[8..],
            &want,
            "{label}: lane {lane}: ldmatrix fragment loads (element-wise gave {want:08x?})"
        );
    }
}

#[test]
fn ldmatrix_fragment_loads_match_the_layouts_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_ldmatrix_layout(emu, "emulator");
}

/// The padded tiles of the tensor-core attention (row stride HS + 8 elements) make every ldmatrix
/// phase conflict-free: the emulator counts, as a GPU serves them, the wavefronts that rows
/// sharing a bank group would add (see `LdmatrixConflicts`). Without the pad a row stride of
/// 128 or 256 bytes puts all eight rows of a phase in one group (8 wavefronts instead of 1).
#[test]
fn ldmatrix_loads_are_free_of_bank_conflicts_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_ldmatrix_layout(emu, "emulator");
    for (b, t, nh, hs) in [(1, 80, 2, 64), (1, 80, 1, 128)] {
        let c = nh * hs;
        let (qkv, dout) = inputs(DType::Bf16, b, t, c, hs);
        run(emu, Some(Path::TensorCore), DType::Bf16, &qkv, &dout, b, t, c, nh);
    }
    for hs in [64, 128] {
        for kernel in ["forward", "backward_dkv", "backward_dq"] {
            let name = format!("attention_tc_{kernel}_hs{hs}_bf16");
            let seen = emu.ldmatrix_bank_conflicts(&name).unwrap();
            eprintln!("{name}: {seen:?}");
            assert!(seen.phases > 0, "{name} loaded nothing by ldmatrix: {seen:?}");
            assert_eq!(seen.extra_wavefronts, 0, "{name} has bank conflicts: {seen:?}");
        }
    }
    let seen = emu.ldmatrix_bank_conflicts("ldmatrix_selftest").unwrap();
    assert!(seen.phases > 0 && seen.extra_wavefronts == 0, "{seen:?}");
    assert!(emu.ldmatrix_bank_conflicts("no_such_kernel").is_err());
}

#[test]
fn ldmatrix_fragment_loads_match_the_layouts_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_ldmatrix_layout(gpu, "cuda");
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
    for hs in attention::TC_HEAD_SIZES {
        for k in ["forward", "backward_dkv", "backward_dq"] {
            let name = format!("attention_tc_{k}_hs{hs}_bf16");
            assert!(gpu.kernels().contains(&name), "{name} is not compiled in");
        }
    }
    for dt in ["f32", "bf16"] {
        for k in ["forward", "backward_dkv", "backward_dq"] {
            let name = format!("attention_any_{k}_{dt}");
            assert!(gpu.kernels().contains(&name), "{name} is not compiled in");
        }
    }
    assert!(gpu.kernels().iter().any(|k| k == "mma_selftest_bf16"));
    assert!(gpu.kernels().iter().any(|k| k == "ldmatrix_selftest"));
}

fn check_shape_errors<G: Gpu>(gpu: &G, label: &str) {
    let big = gpu.alloc(1 << 16).unwrap();
    let (b, t) = (1, 4);
    // C 600 with NH 2: head size 300, above the largest supported (256).
    let err = attention::attention_forward(
        gpu,
        DType::F32,
        Dev::new(&big),
        Dev::new(&big),
        Dev::new(&big),
        b,
        t,
        600,
        2,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("attention_forward") && msg.contains("head size 300"), "{label}: {msg}");
    assert!(msg.contains("256"), "{label}: {msg}");
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
fn any_head_size_falls_back_and_matches_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_any_head_sizes(emu, "emulator");
}

#[test]
fn any_head_size_falls_back_and_matches_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_any_head_sizes(gpu, "cuda");
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

#[test]
fn mma_fragment_layouts_match_the_host_product_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_mma_layout(emu, "emulator");
}

#[test]
fn mma_fragment_layouts_match_the_host_product_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_mma_layout(gpu, "cuda");
}

#[test]
fn tensor_core_kernels_match_the_reference_and_the_simt_kernels_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_tensor_cores(emu, "emulator");
}

#[test]
fn tensor_core_kernels_match_the_reference_and_the_simt_kernels_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_tensor_cores(gpu, "cuda");
}

#[test]
fn the_tensor_core_path_refuses_what_it_cannot_run_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_tensor_core_refusals(emu, "emulator");
}

#[test]
fn the_tensor_core_path_refuses_what_it_cannot_run_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_tensor_core_refusals(gpu, "cuda");
}
