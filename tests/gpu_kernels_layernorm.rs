//! LayerNorm kernels (cuda/layernorm.cu) against the float64 reference (`kernels::naive`), in the
//! CPU emulator everywhere and on a real GPU when one is present (otherwise that half prints
//! SKIPPED), on odd shapes: row counts that leave warps of the last block idle and that
//! split unevenly into backward blocks, C a multiple of the 16-byte pack (the `_vec` kernels) and
//! C = 37 (the scalar kernels).
//!
//! Tolerances (`|got − want| ≤ atol + rtol·|want|`):
//! - fp32: rtol 1e-5 plus atol 1e-5. The absolute part covers results that cancel: an output
//!   `norm·w + b`, an input gradient `(dnorm − m1 − norm·m2)·rstd` or a parameter gradient summed
//!   over up to 37 rows is a sum of terms of magnitude ≲ 4 rounded in fp32 (2^-24 ≈ 6e-8 each),
//!   so its absolute error is ~1e-6 whatever the size of the result.
//! - bf16: inputs are rounded to bf16 before the reference sees them, so the reference differs
//!   from the kernel only by the kernel's fp32 arithmetic (~1e-6) and the final rounding of the
//!   output to bf16: half an ulp, at most 2^-8 relative (8 significant bits), which the measured
//!   worst errors reach (3.9e-3). We allow one ulp, 2^-7 relative, plus the same 1e-5 absolute.
//!   Statistics (mean, rstd) are fp32 and keep the fp32 tolerance.
//! - Parameter gradients (dweight, dbias) are fp32 buffers for both storage types (Megatron's rule:
//!   parameter gradients are accumulated in fp32). With bf16 storage the inputs they are computed
//!   from are bf16 values, exact in fp32 and seen as such by the reference, and nothing is rounded
//!   to bf16 on the way, so only the fp32 arithmetic differs: the fp32 tolerance applies to them
//!   in both cases (a bf16 rounding would show up as errors of ~4e-3, far above it). In the
//!   emulator the bf16 kernel's dweight/dbias also equal, bit for bit, the fp32 kernel's on the
//!   same (bf16-valued) inputs: same sums, same order. The starting gradients are arbitrary fp32
//!   values, not bf16-rounded ones, so that any rounding of the result to bf16 is caught.
//!
//! On a GPU the same tolerances apply: `--use_fast_math` (FMA contraction, approximate rsqrtf
//! and division, flushed denormals) moves results by a few fp32 ulp, inside the absolute 1e-5.
//! The fused residual + LayerNorm forward equals the unfused pair bit for bit in the emulator;
//! on a GPU the two kernels may be contracted differently, so there they only have to agree
//! within the tolerances above. Two backward runs must be bitwise equal on both.

use troupe::gpu::emu::compare;
use troupe::gpu::ops::layernorm::{
    backward_scratch_len, layernorm_backward, layernorm_forward, residual_layernorm_forward,
};
use troupe::gpu::{DType, Dev, Gpu, download_f32, round_bf16, upload_f32};
use troupe::kernels::naive;

#[path = "common/lcg.rs"]
mod lcg;

const F32_TOL: (f64, f64) = (1e-5, 1e-5);
const BF16_TOL: (f64, f64) = (1.0 / 128.0, 1e-5);
/// (rows, C): 37 rows leave 3 warps of the last forward block idle and split 16 + 16 + 5 in the
/// backward; C = 37 is not a multiple of any pack.
const SHAPES: [(usize, usize); 4] = [(37, 48), (19, 80), (9, 200), (13, 37)];

fn uniform(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut g = lcg::Lcg::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d);
    (0..n).map(|_| lo + (hi - lo) * g.unit()).collect()
}

/// What a buffer of `dtype` holds for these values.
fn stored(v: Vec<f32>, dtype: DType) -> Vec<f32> {
    if dtype == DType::Bf16 { round_bf16(&v) } else { v }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn tol(dtype: DType) -> (f64, f64) {
    if dtype == DType::F32 { F32_TOL } else { BF16_TOL }
}

/// Compares and prints the worst absolute and relative errors (run with --nocapture to see them).
fn check(what: &str, got: &[f32], want: &[f64], (rtol, atol): (f64, f64)) {
    let (mut abs, mut rel) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let e = (f64::from(g) - w).abs();
        abs = abs.max(e);
        if w.abs() > 1e-3 {
            rel = rel.max(e / w.abs());
        }
    }
    println!("{what}: worst abs {abs:.2e}, worst rel (|want| > 1e-3) {rel:.2e}");
    compare(what, got, want, rtol, atol).unwrap();
}

fn up<G: Gpu>(gpu: &G, v: &[f32], dtype: DType) -> G::Buf {
    upload_f32(gpu, v, dtype).unwrap()
}

fn down<G: Gpu>(gpu: &G, b: &G::Buf, n: usize, dtype: DType) -> Vec<f32> {
    download_f32(gpu, Dev::new(b), n, dtype).unwrap()
}

/// Inputs with a non-zero mean, so the variance pass is exercised.
fn ln_inputs(rows: usize, c: usize, dtype: DType, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        stored(uniform(rows * c, seed, -1.5, 4.5), dtype),
        stored(uniform(c, seed + 1, 0.5, 1.5), dtype),
        stored(uniform(c, seed + 2, -0.5, 0.5), dtype),
    )
}

/// Whether two different kernels computing the same sums in the same order must agree bit for
/// bit: in the emulator (plain g++ arithmetic), not on a GPU (see the file docs).
fn bitwise_across_kernels(label: &str) -> bool {
    label == "emulator"
}

fn check_forward<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        for (rows, c) in SHAPES {
            let (x, w, b) = ln_inputs(rows, c, dtype, 10 + c as u64);
            let (xb, wb, bb) = (up(gpu, &x, dtype), up(gpu, &w, dtype), up(gpu, &b, dtype));
            let out = gpu.alloc(rows * c * dtype.size()).unwrap();
            let (mean, rstd) = (gpu.alloc(rows * 4).unwrap(), gpu.alloc(rows * 4).unwrap());
            let d = Dev::new;
            layernorm_forward(gpu, dtype, d(&out), d(&mean), d(&rstd), d(&xb), d(&wb), d(&bb), rows, c)
                .unwrap();
            let (mut want, mut wmean, mut wrstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
            naive::layernorm_forward(
                &mut want,
                &mut wmean,
                &mut wrstd,
                &f64s(&x),
                &f64s(&w),
                &f64s(&b),
                rows,
                c,
            );
            let tag = format!("{label} {dtype:?} rows {rows} C {c}");
            check(&format!("forward out {tag}"), &down(gpu, &out, rows * c, dtype), &want, tol(dtype));
            check(&format!("forward mean {tag}"), &down(gpu, &mean, rows, DType::F32), &wmean, F32_TOL);
            check(&format!("forward rstd {tag}"), &down(gpu, &rstd, rows, DType::F32), &wrstd, F32_TOL);
        }
    }
}

fn check_residual_forward<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        for (rows, c) in SHAPES {
            let (a, w, bias) = ln_inputs(rows, c, dtype, 20 + c as u64);
            let r = stored(uniform(rows * c, 30 + c as u64, -2.0, 2.0), dtype);
            let (ab, rb, wb, biasb) =
                (up(gpu, &a, dtype), up(gpu, &r, dtype), up(gpu, &w, dtype), up(gpu, &bias, dtype));
            let bytes = rows * c * dtype.size();
            let (resid, out, out2) =
                (gpu.alloc(bytes).unwrap(), gpu.alloc(bytes).unwrap(), gpu.alloc(bytes).unwrap());
            let stats: Vec<G::Buf> = (0..4).map(|_| gpu.alloc(rows * 4).unwrap()).collect();
            let d = Dev::new;
            residual_layernorm_forward(
                gpu,
                dtype,
                d(&resid),
                d(&out),
                d(&stats[0]),
                d(&stats[1]),
                d(&ab),
                d(&rb),
                d(&wb),
                d(&biasb),
                rows,
                c,
            )
            .unwrap();
            // The kernel normalises resid as stored: the sum rounded once to the storage type.
            let sum: Vec<f32> = a.iter().zip(&r).map(|(x, y)| x + y).collect();
            let sum_stored = stored(sum, dtype);
            let (mut want, mut wmean, mut wrstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
            let (w64, b64) = (f64s(&w), f64s(&bias));
            naive::layernorm_forward(
                &mut want,
                &mut wmean,
                &mut wrstd,
                &f64s(&sum_stored),
                &w64,
                &b64,
                rows,
                c,
            );
            let exact_sum: Vec<f64> = a.iter().zip(&r).map(|(&x, &y)| f64::from(x) + f64::from(y)).collect();
            let tag = format!("{label} {dtype:?} rows {rows} C {c}");
            let got_resid = down(gpu, &resid, rows * c, dtype);
            check(&format!("residual resid {tag}"), &got_resid, &exact_sum, tol(dtype));
            check(&format!("residual out {tag}"), &down(gpu, &out, rows * c, dtype), &want, tol(dtype));
            check(&format!("residual mean {tag}"), &down(gpu, &stats[0], rows, DType::F32), &wmean, F32_TOL);
            check(&format!("residual rstd {tag}"), &down(gpu, &stats[1], rows, DType::F32), &wrstd, F32_TOL);
            // Fused and unfused compute the same sums in the same order: bitwise equal in the
            // emulator, within the tolerances on a GPU.
            layernorm_forward(
                gpu,
                dtype,
                d(&out2),
                d(&stats[2]),
                d(&stats[3]),
                d(&resid),
                d(&wb),
                d(&biasb),
                rows,
                c,
            )
            .unwrap();
            let (fused, unfused) = (down(gpu, &out, rows * c, dtype), down(gpu, &out2, rows * c, dtype));
            let (fused_rstd, unfused_rstd) =
                (down(gpu, &stats[1], rows, DType::F32), down(gpu, &stats[3], rows, DType::F32));
            if bitwise_across_kernels(label) {
                assert_eq!(fused, unfused, "fused vs unfused {tag}");
                assert_eq!(fused_rstd, unfused_rstd, "rstd {tag}");
            } else {
                check(&format!("fused vs unfused {tag}"), &fused, &f64s(&unfused), tol(dtype));
                check(&format!("fused vs unfused rstd {tag}"), &fused_rstd, &f64s(&unfused_rstd), F32_TOL);
            }
        }
    }
}

/// The device buffers of one backward call, uploaded from the same host values each time.
struct Backward<B> {
    dinp: B,
    dweight: B,
    dbias: B,
    scratch: B,
    dout: B,
    inp: B,
    weight: B,
    mean: B,
    rstd: B,
}

/// Host values of a backward case; the statistics are the reference's, rounded to fp32, so the
/// kernel and the reference see the same mean and rstd. `dweight0` and `dbias0` are fp32 for any
/// `dtype` (parameter gradients are fp32).
#[derive(Clone)]
struct Case {
    rows: usize,
    c: usize,
    dtype: DType,
    dinp0: Vec<f32>,
    dweight0: Vec<f32>,
    dbias0: Vec<f32>,
    dout: Vec<f32>,
    inp: Vec<f32>,
    weight: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl Case {
    fn new(rows: usize, c: usize, dtype: DType, seed: u64) -> Self {
        let (inp, weight, bias) = ln_inputs(rows, c, dtype, seed);
        let (mut out, mut mean, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
        naive::layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &f64s(&inp),
            &f64s(&weight),
            &f64s(&bias),
            rows,
            c,
        );
        Case {
            rows,
            c,
            dtype,
            // Non-zero starting gradients: the kernels must add to them.
            dinp0: stored(uniform(rows * c, seed + 3, -1.0, 1.0), dtype),
            dweight0: uniform(c, seed + 4, -1.0, 1.0),
            dbias0: uniform(c, seed + 5, -1.0, 1.0),
            dout: stored(uniform(rows * c, seed + 6, -1.0, 1.0), dtype),
            inp,
            weight,
            mean: mean.iter().map(|&m| m as f32).collect(),
            rstd: rstd.iter().map(|&r| r as f32).collect(),
        }
    }

    fn upload<G: Gpu>(&self, gpu: &G) -> Backward<G::Buf> {
        let dt = self.dtype;
        Backward {
            dinp: up(gpu, &self.dinp0, dt),
            dweight: up(gpu, &self.dweight0, DType::F32),
            dbias: up(gpu, &self.dbias0, DType::F32),
            // Garbage in the scratch: the kernel must not read what it did not write.
            scratch: up(gpu, &vec![f32::NAN; backward_scratch_len(self.rows, self.c)], DType::F32),
            dout: up(gpu, &self.dout, dt),
            inp: up(gpu, &self.inp, dt),
            weight: up(gpu, &self.weight, dt),
            mean: up(gpu, &self.mean, DType::F32),
            rstd: up(gpu, &self.rstd, DType::F32),
        }
    }

    fn run<G: Gpu>(&self, gpu: &G, b: &Backward<G::Buf>) {
        let d = Dev::new;
        layernorm_backward(
            gpu,
            self.dtype,
            d(&b.dinp),
            d(&b.dweight),
            d(&b.dbias),
            d(&b.scratch),
            d(&b.dout),
            d(&b.inp),
            d(&b.weight),
            d(&b.mean),
            d(&b.rstd),
            self.rows,
            self.c,
        )
        .unwrap();
    }

    /// (dinp, dweight, dbias) after one backward.
    fn results<G: Gpu>(&self, gpu: &G, b: &Backward<G::Buf>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (n, c, dt) = (self.rows * self.c, self.c, self.dtype);
        (down(gpu, &b.dinp, n, dt), down(gpu, &b.dweight, c, DType::F32), down(gpu, &b.dbias, c, DType::F32))
    }

    fn reference(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut dinp, mut dw, mut db) = (f64s(&self.dinp0), f64s(&self.dweight0), f64s(&self.dbias0));
        naive::layernorm_backward(
            &mut dinp,
            &mut dw,
            &mut db,
            &f64s(&self.dout),
            &f64s(&self.inp),
            &f64s(&self.weight),
            &f64s(&self.mean),
            &f64s(&self.rstd),
            self.rows,
            self.c,
        );
        (dinp, dw, db)
    }
}

fn check_backward<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        for (rows, c) in SHAPES {
            let case = Case::new(rows, c, dtype, 40 + c as u64);
            let bufs = case.upload(gpu);
            case.run(gpu, &bufs);
            let (dinp, dw, db) = case.results(gpu, &bufs);
            let (want_dinp, want_dw, want_db) = case.reference();
            let tag = format!("{label} {dtype:?} rows {rows} C {c}");
            check(&format!("backward dinp {tag}"), &dinp, &want_dinp, tol(dtype));
            // fp32 parameter gradients: the fp32 tolerance for both storage types (file docs).
            check(&format!("backward dweight {tag}"), &dw, &want_dw, F32_TOL);
            check(&format!("backward dbias {tag}"), &db, &want_db, F32_TOL);
            if dtype == DType::Bf16 && bitwise_across_kernels(label) {
                // The fp32 kernel on the same bf16-valued inputs: same sums in the same order.
                let f32_case = Case { dtype: DType::F32, ..case.clone() };
                let f32_bufs = f32_case.upload(gpu);
                f32_case.run(gpu, &f32_bufs);
                let (_, dw32, db32) = f32_case.results(gpu, &f32_bufs);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                assert_eq!(bits(&dw), bits(&dw32), "bf16 vs fp32 kernel dweight {tag}");
                assert_eq!(bits(&db), bits(&db32), "bf16 vs fp32 kernel dbias {tag}");
            }
        }
    }
}

fn check_second_backward<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        let case = Case::new(37, 48, dtype, 7);
        let bufs = case.upload(gpu);
        case.run(gpu, &bufs);
        case.run(gpu, &bufs);
        let (dinp, dw, db) = case.results(gpu, &bufs);
        let (want_dinp, want_dw, want_db) = case.reference();
        // init + 2·grad = 2·(init + grad) − init.
        let twice = |want: &[f64], init: &[f32]| -> Vec<f64> {
            want.iter().zip(init).map(|(&w, &i)| 2.0 * w - f64::from(i)).collect()
        };
        let tag = format!("{label} {dtype:?}");
        // A bf16 dinp is rounded after each call, so the two-call sum is only checked in fp32;
        // the fp32 parameter gradients accumulate across calls (microbatches) at fp32 accuracy.
        if dtype == DType::F32 {
            check(&format!("{tag}: twice dinp"), &dinp, &twice(&want_dinp, &case.dinp0), F32_TOL);
        }
        check(&format!("{tag}: twice dweight"), &dw, &twice(&want_dw, &case.dweight0), F32_TOL);
        check(&format!("{tag}: twice dbias"), &db, &twice(&want_db, &case.dbias0), F32_TOL);
    }
}

fn check_backward_determinism<G: Gpu>(gpu: &G, label: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        let case = Case::new(37, 80, dtype, 50);
        let results: Vec<_> = (0..2)
            .map(|_| {
                let bufs = case.upload(gpu);
                case.run(gpu, &bufs);
                let (a, b, c) = case.results(gpu, &bufs);
                [a, b, c].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
            })
            .collect();
        assert_eq!(results[0], results[1], "{label} {dtype:?}: two runs differ");
    }
}

fn check_shape_errors<G: Gpu>(gpu: &G, label: &str) {
    let case = Case::new(37, 48, DType::F32, 60);
    let mut bufs = case.upload(gpu);
    bufs.scratch = gpu.alloc(16).unwrap();
    let d = Dev::new;
    let err = layernorm_backward(
        gpu,
        DType::F32,
        d(&bufs.dinp),
        d(&bufs.dweight),
        d(&bufs.dbias),
        d(&bufs.scratch),
        d(&bufs.dout),
        d(&bufs.inp),
        d(&bufs.weight),
        d(&bufs.mean),
        d(&bufs.rstd),
        37,
        48,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layernorm_backward") && err.contains("scratch"), "{label}: {err}");
    let err = layernorm_forward(
        gpu,
        DType::F32,
        d(&bufs.dinp),
        d(&bufs.mean),
        d(&bufs.rstd),
        d(&bufs.inp),
        d(&bufs.weight),
        d(&bufs.weight),
        0,
        48,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layernorm_forward") && err.contains("empty"), "{label}: {err}");
}

#[test]
fn layernorm_forward_matches_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_forward(emu, "emulator");
}

#[test]
fn layernorm_forward_matches_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_forward(gpu, "cuda");
}

#[test]
fn residual_layernorm_forward_matches_the_reference_and_the_unfused_pair_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_residual_forward(emu, "emulator");
}

#[test]
fn residual_layernorm_forward_matches_the_reference_and_the_unfused_pair_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_residual_forward(gpu, "cuda");
}

#[test]
fn layernorm_backward_accumulates_and_matches_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_backward(emu, "emulator");
}

#[test]
fn layernorm_backward_accumulates_and_matches_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_backward(gpu, "cuda");
}

#[test]
fn a_second_backward_adds_the_same_gradient_again_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_second_backward(emu, "emulator");
}

#[test]
fn a_second_backward_adds_the_same_gradient_again_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_second_backward(gpu, "cuda");
}

#[test]
fn layernorm_backward_is_bitwise_deterministic_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_backward_determinism(emu, "emulator");
}

#[test]
fn layernorm_backward_is_bitwise_deterministic_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_backward_determinism(gpu, "cuda");
}

#[test]
fn a_short_scratch_is_a_shape_error_naming_the_op_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_shape_errors(emu, "emulator");
}

#[test]
fn a_short_scratch_is_a_shape_error_naming_the_op_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_shape_errors(gpu, "cuda");
}
