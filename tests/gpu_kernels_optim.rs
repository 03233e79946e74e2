//! Optimizer-side kernels (cuda/optim.cu) against the float64 references (`naive::adamw`,
//! `naive::matmul_backward_weight`, f64 sums) and the CPU backend, in the CPU emulator everywhere
//! and on a real GPU when one is present (otherwise that half prints SKIPPED).
//!
//! Tolerances:
//! - AdamW, fp32 master weights: 1e-5 relative + 1e-7 absolute over 3 steps against float64 (the
//!   same fp32 formula as the CPU backend). A parameter is a difference of terms of size |p0| and
//!   lr = 1e-2 and can cancel to near 0, where its error is a few fp32 ulp of those terms (measured
//!   4e-9 at p ≈ 3e-4); 1e-7 is 1e-5 of one update. m: 1e-5 relative + 1e-8 absolute (m is a sum of
//!   terms of either sign, up to (1−β1)·|g| ≈ 1e-2, that can cancel; a few fp32 ulp of those is
//!   ~3e-9). v (positive terms, no cancellation): 1e-5 relative. bf16 gradients: the reference
//!   uses the bf16-rounded gradients, so the same tolerances. The bf16 copy must equal the fp32
//!   master weights rounded to bf16, bit for bit.
//! - Sums of squares accumulate in double: 1e-12 relative against f64 sums.
//! - `scale`, `add_assign` and the casts do one fp32 operation and at most one rounding: bitwise
//!   against the same operation on the host.
//! - Bias gradients: fp32 sums of up to 700 terms in [-1, 1]: 1e-5 relative + 1e-5 absolute (a
//!   column sum can cancel to near 0, where only the absolute error, a few 2^-24·Σ|x|, is
//!   meaningful); a bf16 dbias adds one rounding: 2^-8 relative. The 16-byte-load path (aligned
//!   `dout`, n a multiple of the pack) and the scalar path (misaligned `dout`, or other n) add the
//!   same values in the same order: bitwise equal, in the emulator and on a GPU alike.
//!
//! On a GPU the same tolerances apply: `--use_fast_math` (approximate sqrtf and division in
//! AdamW, FMA contraction) costs a few fp32 ulp per step, far inside them, and does not touch the
//! double sums. `scale`, `add_assign` and the casts stay bitwise on a GPU too: a single IEEE
//! multiply, add or conversion is correctly rounded there as well, and no input or result here is
//! a denormal. The AdamW vector and scalar paths agree bit for bit in the emulator; on a GPU they
//! are compiled separately, so there the scalar path only has to match the vector path within the
//! AdamW tolerances (and its bf16 copy must still be its own master weights rounded, bit for bit).
//! Two runs must be bitwise equal on both.
//!
//! AdamW over a whole arena in one launch (`adamw_runs`: runs of tensors with and without weight
//! decay) against one `adamw` launch per tensor: bitwise in the emulator (the same per-element
//! arithmetic), within the AdamW tolerances on a GPU (separately compiled code, as above), with
//! tensor lengths that make 4-element packs straddle two runs.

use troupe::gpu::emu::compare;
use troupe::gpu::ops::optim::{
    AdamWBufs, adamw, add_assign, bias_grad, bias_grad_scratch_elems, cast, scale, sum_squares,
    sum_squares_many, sum_squares_scratch_bytes,
};
use troupe::gpu::{DType, Dev, Gpu, download_f32, round_bf16, upload_f32};
use troupe::kernels::{AdamWStep, Backend, CpuBackend, naive};

#[path = "common/lcg.rs"]
mod lcg;
use lcg::uniform;

fn up(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Absolute slack for parameters: 1e-5 of one update (see the file docs).
const PARAM_ATOL: f64 = 1e-7;

/// Absolute slack for first moments (see the file docs).
const M_ATOL: f64 = 1e-8;

const H: AdamWStep = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 1 };

/// Runs one AdamW step per gradient on `gpu`, with `pad` elements in front of every tensor
/// (pad 1 misaligns every pointer for the 4-element vector path, exercising the scalar loop);
/// returns (params, m, v, copy) after the last step.
fn run_adamw<G: Gpu>(
    gpu: &G,
    p0: &[f32],
    grads: &[Vec<f32>],
    grad_dtype: DType,
    copy_dtype: Option<DType>,
    pad: usize,
    grad_scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let n = p0.len();
    let padded = |v: &[f32]| [vec![0.0; pad], v.to_vec()].concat();
    let p = upload_f32(gpu, &padded(p0), DType::F32).unwrap();
    let m = gpu.alloc((n + pad) * 4).unwrap();
    let v = gpu.alloc((n + pad) * 4).unwrap();
    let copy = copy_dtype.map(|dt| (gpu.alloc((n + pad) * dt.size()).unwrap(), dt));
    fn at<B>(b: &B, dt: DType, pad: usize) -> Dev<'_, B> {
        Dev::new(b).at(pad, dt)
    }
    for (i, g) in grads.iter().enumerate() {
        let gb = upload_f32(gpu, &padded(g), grad_dtype).unwrap();
        let bufs = AdamWBufs {
            params: at(&p, DType::F32, pad),
            m: at(&m, DType::F32, pad),
            v: at(&v, DType::F32, pad),
            grads: at(&gb, grad_dtype, pad),
            grad_dtype,
            copy: copy.as_ref().map(|(b, dt)| (at(b, *dt, pad), *dt)),
        };
        adamw(gpu, &bufs, n, &AdamWStep { step: i as u64 + 1, ..H }, grad_scale).unwrap();
    }
    let get = |b: &G::Buf, dt: DType| download_f32(gpu, at(b, dt, pad), n, dt).unwrap();
    (get(&p, DType::F32), get(&m, DType::F32), get(&v, DType::F32), copy.as_ref().map(|(b, dt)| get(b, *dt)))
}

/// The float64 reference after all steps, with gradients multiplied by `grad_scale`.
fn reference_adamw(p0: &[f32], grads: &[Vec<f32>], grad_scale: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = p0.len();
    let (mut p, mut m, mut v) = (up(p0), vec![0.0; n], vec![0.0; n]);
    for (i, g) in grads.iter().enumerate() {
        let g: Vec<f64> = g.iter().map(|&x| f64::from(x * grad_scale)).collect();
        let h = H;
        naive::adamw(
            &mut p,
            &g,
            &mut m,
            &mut v,
            f64::from(h.lr),
            f64::from(h.beta1),
            f64::from(h.beta2),
            f64::from(h.eps),
            f64::from(h.weight_decay),
            i as u64 + 1,
        );
    }
    (p, m, v)
}

/// Whether the AdamW vector and scalar paths must agree bit for bit: in the emulator, not on a
/// GPU (see the file docs).
fn bitwise_across_paths(label: &str) -> bool {
    label == "emulator"
}

fn check_adamw_reference<G: Gpu>(gpu: &G, label: &str) {
    let n = 1003; // not a multiple of the pack, the block or the grid
    let p0 = uniform(n, 1, 2.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|s| uniform(n, 10 + s, 0.2)).collect();
    for grad_dtype in [DType::F32, DType::Bf16] {
        let grads = if grad_dtype == DType::Bf16 {
            grads.iter().map(|g| round_bf16(g)).collect()
        } else {
            grads.clone()
        };
        let (rp, rm, rv) = reference_adamw(&p0, &grads, 1.0);
        for copy_dtype in [None, Some(DType::F32), Some(DType::Bf16)] {
            let what = format!("{label}: grads {grad_dtype:?}, copy {copy_dtype:?}");
            let (p, m, v, copy) = run_adamw(gpu, &p0, &grads, grad_dtype, copy_dtype, 0, 1.0);
            compare(&format!("params, {what}"), &p, &rp, 1e-5, PARAM_ATOL).unwrap();
            compare(&format!("m, {what}"), &m, &rm, 1e-5, M_ATOL).unwrap();
            compare(&format!("v, {what}"), &v, &rv, 1e-5, 0.0).unwrap();
            if let Some(copy) = copy {
                let want = if copy_dtype == Some(DType::Bf16) { round_bf16(&p) } else { p.clone() };
                assert_eq!(bits(&copy), bits(&want), "{what}: the copy is not the rounded master weights");
            }
            let err = |f: fn(f64, f64) -> f64| {
                p.iter().zip(&rp).map(|(&g, &w)| f(f64::from(g), w)).fold(0.0, f64::max)
            };
            eprintln!(
                "adamw {what}: after 3 steps, worst params error {:.2e} absolute, {:.2e} relative where |p| > 0.01",
                err(|g, w| (g - w).abs()),
                err(|g, w| if w.abs() > 0.01 { ((g - w) / w).abs() } else { 0.0 })
            );
        }
    }
}

fn check_adamw_cpu_and_scalar_path<G: Gpu>(gpu: &G, label: &str) {
    let n = 515;
    let p0 = uniform(n, 2, 2.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|s| uniform(n, 20 + s, 0.2)).collect();
    let be = CpuBackend::new(1);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
    for (i, g) in grads.iter().enumerate() {
        be.adamw(&mut p, g, &mut m, &mut v, AdamWStep { step: i as u64 + 1, ..H });
    }
    let aligned = run_adamw(gpu, &p0, &grads, DType::F32, Some(DType::Bf16), 0, 1.0);
    let misaligned = run_adamw(gpu, &p0, &grads, DType::F32, Some(DType::Bf16), 1, 1.0);
    compare(&format!("{label}: params vs CPU backend"), &aligned.0, &up(&p), 1e-5, PARAM_ATOL).unwrap();
    compare(&format!("{label}: m vs CPU backend"), &aligned.1, &up(&m), 1e-5, M_ATOL).unwrap();
    compare(&format!("{label}: v vs CPU backend"), &aligned.2, &up(&v), 1e-5, 0.0).unwrap();
    let same = aligned.0.iter().zip(&p).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
    eprintln!("adamw {label}: {same} of {n} params bitwise equal to the CPU backend");
    // The vector and scalar loops do the same arithmetic per element.
    if bitwise_across_paths(label) {
        assert_eq!(bits(&aligned.0), bits(&misaligned.0), "{label}: params: vector vs scalar path");
        assert_eq!(bits(&aligned.2), bits(&misaligned.2), "{label}: v: vector vs scalar path");
        assert_eq!(bits(aligned.3.as_ref().unwrap()), bits(misaligned.3.as_ref().unwrap()), "{label}: copy");
    } else {
        let what = |x: &str| format!("{label}: {x}: scalar vs vector path");
        compare(&what("params"), &misaligned.0, &up(&aligned.0), 1e-5, PARAM_ATOL).unwrap();
        compare(&what("m"), &misaligned.1, &up(&aligned.1), 1e-5, M_ATOL).unwrap();
        compare(&what("v"), &misaligned.2, &up(&aligned.2), 1e-5, 0.0).unwrap();
        assert_eq!(
            bits(misaligned.3.as_ref().unwrap()),
            bits(&round_bf16(&misaligned.0)),
            "{label}: the scalar path's copy is not its rounded master weights"
        );
    }
}

fn check_adamw_grad_scale<G: Gpu>(gpu: &G, label: &str) {
    let n = 257;
    let p0 = uniform(n, 3, 2.0);
    let grads: Vec<Vec<f32>> = (0..2).map(|s| uniform(n, 30 + s, 0.2)).collect();
    let (rp, _, _) = reference_adamw(&p0, &grads, 0.25);
    let a = run_adamw(gpu, &p0, &grads, DType::F32, None, 0, 0.25);
    let b = run_adamw(gpu, &p0, &grads, DType::F32, None, 0, 0.25);
    compare(&format!("{label}: params with grad_scale 0.25"), &a.0, &rp, 1e-5, PARAM_ATOL).unwrap();
    assert_eq!(bits(&a.0), bits(&b.0), "{label}: two identical runs differ");
}

fn check_adamw_errors<G: Gpu>(gpu: &G, label: &str) {
    let big = gpu.alloc(100 * 4).unwrap();
    let small = gpu.alloc(99 * 4).unwrap();
    let bufs = AdamWBufs {
        params: Dev::new(&big),
        m: Dev::new(&small),
        v: Dev::new(&big),
        grads: Dev::new(&big),
        grad_dtype: DType::F32,
        copy: None,
    };
    let err = adamw(gpu, &bufs, 100, &H, 1.0).unwrap_err().to_string();
    assert!(err.starts_with("adamw: m: 100 × F32"), "{label}: {err}");
    let bufs = AdamWBufs { m: Dev::new(&big), ..bufs };
    let err = adamw(gpu, &bufs, 100, &AdamWStep { step: 0, ..H }, 1.0).unwrap_err().to_string();
    assert!(err.contains("adamw") && err.contains("1-based"), "{label}: {err}");
}

fn check_sum_squares<G: Gpu>(gpu: &G, label: &str) {
    // 10_001 elements need 3 partials (256 threads × 16 per block): the finish step is exercised.
    let sizes = [10_001usize, 1, 333];
    let xs: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| uniform(n, 40 + i as u64, 6.0)).collect();
    let be = CpuBackend::new(1);
    for dtype in [DType::F32, DType::Bf16] {
        let xs: Vec<Vec<f32>> =
            xs.iter().map(|x| if dtype == DType::Bf16 { round_bf16(x) } else { x.clone() }).collect();
        let bufs: Vec<_> = xs.iter().map(|x| upload_f32(gpu, x, dtype).unwrap()).collect();
        let scratch = gpu.alloc(sum_squares_scratch_bytes(sizes)).unwrap();
        let want: Vec<f64> =
            xs.iter().map(|x| x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()).collect();
        for (i, x) in xs.iter().enumerate() {
            let got = sum_squares(gpu, dtype, Dev::new(&bufs[i]), sizes[i], Dev::new(&scratch)).unwrap();
            assert!(
                (got - want[i]).abs() <= 1e-12 * want[i],
                "{label} {dtype:?} buffer {i}: {got} vs {}",
                want[i]
            );
            let cpu = be.sum_squares(x);
            assert!(
                (got - cpu).abs() <= 1e-12 * cpu,
                "{label} {dtype:?} buffer {i}: {got} vs CPU backend {cpu}"
            );
        }
        let parts: Vec<_> = bufs.iter().zip(sizes).map(|(b, n)| (dtype, Dev::new(b), n)).collect();
        let total = sum_squares_many(gpu, &parts, Dev::new(&scratch)).unwrap();
        let again = sum_squares_many(gpu, &parts, Dev::new(&scratch)).unwrap();
        let want_total: f64 = want.iter().sum();
        assert!(
            (total - want_total).abs() <= 1e-12 * want_total,
            "{label} {dtype:?} total {total} vs {want_total}"
        );
        assert_eq!(total.to_bits(), again.to_bits(), "{label} {dtype:?}: two runs differ");
        eprintln!(
            "sum_squares {label} {dtype:?}: relative error {:.2e}",
            (total - want_total).abs() / want_total
        );
    }
    let scratch = gpu.alloc(8).unwrap();
    let x = gpu.alloc(4 * 10).unwrap();
    let err = sum_squares(gpu, DType::F32, Dev::new(&x), 10, Dev::new(&scratch)).unwrap_err().to_string();
    assert!(err.contains("sum_squares") && err.contains("scratch"), "{label}: {err}");
}

fn check_scale_add_casts<G: Gpu>(gpu: &G, label: &str) {
    let n = 1001;
    let (x, y) = (uniform(n, 50, 10.0), uniform(n, 51, 10.0));
    let be = CpuBackend::new(1);
    // fp32 against the CPU backend, bitwise.
    let xb = upload_f32(gpu, &x, DType::F32).unwrap();
    let yb = upload_f32(gpu, &y, DType::F32).unwrap();
    scale(gpu, DType::F32, Dev::new(&xb), 0.37, n).unwrap();
    add_assign(gpu, DType::F32, Dev::new(&xb), Dev::new(&yb), n).unwrap();
    let mut want = x.clone();
    be.scale(&mut want, 0.37);
    be.add_assign(&mut want, &y);
    assert_eq!(
        bits(&download_f32(gpu, Dev::new(&xb), n, DType::F32).unwrap()),
        bits(&want),
        "{label}: fp32 scale + add"
    );
    // bf16: one fp32 operation, one rounding, each.
    let (xr, yr) = (round_bf16(&x), round_bf16(&y));
    let xb = upload_f32(gpu, &xr, DType::Bf16).unwrap();
    let yb = upload_f32(gpu, &yr, DType::Bf16).unwrap();
    scale(gpu, DType::Bf16, Dev::new(&xb), 0.37, n).unwrap();
    let scaled = round_bf16(&xr.iter().map(|&v| v * 0.37).collect::<Vec<_>>());
    assert_eq!(
        bits(&download_f32(gpu, Dev::new(&xb), n, DType::Bf16).unwrap()),
        bits(&scaled),
        "{label}: bf16 scale"
    );
    add_assign(gpu, DType::Bf16, Dev::new(&xb), Dev::new(&yb), n).unwrap();
    let summed = round_bf16(&scaled.iter().zip(&yr).map(|(a, b)| a + b).collect::<Vec<_>>());
    assert_eq!(
        bits(&download_f32(gpu, Dev::new(&xb), n, DType::Bf16).unwrap()),
        bits(&summed),
        "{label}: bf16 add"
    );
    // Casts, from a misaligned start too (scalar path).
    for pad in [0, 1] {
        let src = upload_f32(gpu, &x, DType::F32).unwrap();
        let half = gpu.alloc(n * 2).unwrap();
        let back = gpu.alloc(n * 4).unwrap();
        let m = n - pad;
        cast(
            gpu,
            Dev::new(&half).at(pad, DType::Bf16),
            DType::Bf16,
            Dev::new(&src).at(pad, DType::F32),
            DType::F32,
            m,
        )
        .unwrap();
        cast(
            gpu,
            Dev::new(&back).at(pad, DType::F32),
            DType::F32,
            Dev::new(&half).at(pad, DType::Bf16),
            DType::Bf16,
            m,
        )
        .unwrap();
        let got = download_f32(gpu, Dev::new(&back).at(pad, DType::F32), m, DType::F32).unwrap();
        assert_eq!(bits(&got), bits(&round_bf16(&x[pad..])), "{label}: cast round trip, pad {pad}");
    }
    let err = cast(gpu, Dev::new(&xb), DType::F32, Dev::new(&yb), DType::F32, 1).unwrap_err().to_string();
    assert!(err.starts_with("cast: F32 → F32"), "{label}: {err}");
}

/// Runs [`bias_grad`] once on `dout[rows, n]` (uploaded as `dout_dtype` with `pad` elements in
/// front: pad 1 misaligns it for the 16-byte path, so the scalar loop runs) into `db0` (uploaded
/// as `dbias_dtype`); returns dbias.
#[allow(clippy::too_many_arguments)]
fn run_bias_grad<G: Gpu>(
    gpu: &G,
    dout: &[f32],
    db0: &[f32],
    rows: usize,
    n: usize,
    dout_dtype: DType,
    dbias_dtype: DType,
    pad: usize,
) -> Vec<f32> {
    let scratch = gpu.alloc(bias_grad_scratch_elems(rows, n) * 4).unwrap();
    let ob = upload_f32(gpu, &[vec![0.0; pad], dout.to_vec()].concat(), dout_dtype).unwrap();
    let db = upload_f32(gpu, db0, dbias_dtype).unwrap();
    bias_grad(
        gpu,
        Dev::new(&db),
        dbias_dtype,
        Dev::new(&ob).at(pad, dout_dtype),
        dout_dtype,
        rows,
        n,
        Dev::new(&scratch),
    )
    .unwrap();
    download_f32(gpu, Dev::new(&db), n, dbias_dtype).unwrap()
}

fn check_bias_grad<G: Gpu>(gpu: &G, label: &str) {
    // 700 rows: 11 row chunks of 64 (the last 60); 45 columns: one partial column tile, scalar
    // path. 5 × 33: one short chunk. 300 × 768: 3 full column tiles of 256, 5 chunks of 60 rows
    // (row phases with and without a full batch of 4 rows), 16-byte path when aligned. 300 × 37:
    // scalar path for either dtype (37 is not a multiple of 4 or 8). 130 × 264: 16-byte path with
    // a second tile of 8 columns (lanes whose packs lie past n).
    for (rows, n) in [(700usize, 45usize), (5, 33), (300, 768), (300, 37), (130, 264)] {
        let dout = uniform(rows * n, 60, 2.0);
        let db0 = uniform(n, 61, 1.0);
        for (dout_dtype, dbias_dtype) in [
            (DType::F32, DType::F32),
            (DType::Bf16, DType::F32),
            (DType::Bf16, DType::Bf16),
            (DType::F32, DType::Bf16),
        ] {
            let what = format!("{label}: rows {rows}, n {n}, dout {dout_dtype:?}, dbias {dbias_dtype:?}");
            let dout = if dout_dtype == DType::Bf16 { round_bf16(&dout) } else { dout.clone() };
            let db0 = if dbias_dtype == DType::Bf16 { round_bf16(&db0) } else { db0.clone() };
            let run = |pad| run_bias_grad(gpu, &dout, &db0, rows, n, dout_dtype, dbias_dtype, pad);
            let (first, second, misaligned) = (run(0), run(0), run(1));
            assert_eq!(bits(&first), bits(&second), "{what}: two runs differ");
            assert_eq!(bits(&first), bits(&misaligned), "{what}: aligned vs misaligned dout (scalar path)");
            let mut want = up(&db0);
            naive::matmul_backward_weight(&mut [], Some(&mut want), &up(&dout), &[], rows, 0, n);
            let rtol = if dbias_dtype == DType::Bf16 { 1.0 / 256.0 + 1e-5 } else { 1e-5 };
            compare(&format!("dbias, {what}"), &first, &want, rtol, 1e-5).unwrap();
            let worst = first.iter().zip(&want).map(|(&g, &w)| (f64::from(g) - w).abs()).fold(0.0, f64::max);
            eprintln!("bias_grad {what}: worst absolute error {worst:.2e}");
        }
    }
    let small = gpu.alloc(4).unwrap();
    let db = gpu.alloc(45 * 4).unwrap();
    let ob = gpu.alloc(700 * 45 * 4).unwrap();
    let err = bias_grad(gpu, Dev::new(&db), DType::F32, Dev::new(&ob), DType::F32, 700, 45, Dev::new(&small))
        .unwrap_err()
        .to_string();
    let need = format!("bias_grad: scratch: {} × F32", bias_grad_scratch_elems(700, 45));
    assert!(err.starts_with(&need), "{label}: {err}");
}

#[test]
fn bias_grad_scratch_fits_the_row_split() {
    // 700 rows of 45 columns: 11 chunks of 64 rows. GPT-2 124M shapes (16384 rows): 264 blocks
    // of 256-column tiles × chunks, one chunk per (264 / tiles) at most.
    assert_eq!(bias_grad_scratch_elems(700, 45), 11 * 45);
    assert_eq!(bias_grad_scratch_elems(5, 33), 33);
    for (n, chunks) in [(768, 88), (2304, 29), (3072, 22)] {
        assert_eq!(bias_grad_scratch_elems(16384, n), chunks * n, "n {n}");
    }
    assert!(bias_grad_scratch_elems(1 << 20, 1) <= 264);
}

#[test]
fn adamw_tracks_the_float64_reference_over_three_steps_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_adamw_reference(emu, "emulator");
}

#[test]
fn adamw_tracks_the_float64_reference_over_three_steps_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_adamw_reference(gpu, "cuda");
}

#[test]
fn adamw_matches_the_cpu_backend_and_the_scalar_path_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_adamw_cpu_and_scalar_path(emu, "emulator");
}

#[test]
fn adamw_matches_the_cpu_backend_and_the_scalar_path_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_adamw_cpu_and_scalar_path(gpu, "cuda");
}

#[test]
fn adamw_grad_scale_scales_the_gradient_and_runs_are_bitwise_equal_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_adamw_grad_scale(emu, "emulator");
}

#[test]
fn adamw_grad_scale_scales_the_gradient_and_runs_are_bitwise_equal_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_adamw_grad_scale(gpu, "cuda");
}

#[test]
fn adamw_rejects_bad_shapes_and_step_zero_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_adamw_errors(emu, "emulator");
}

#[test]
fn adamw_rejects_bad_shapes_and_step_zero_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_adamw_errors(gpu, "cuda");
}

#[test]
fn sums_of_squares_match_float64_and_are_deterministic_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_sum_squares(emu, "emulator");
}

#[test]
fn sums_of_squares_match_float64_and_are_deterministic_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_sum_squares(gpu, "cuda");
}

#[test]
fn scale_add_and_casts_are_exact_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_scale_add_casts(emu, "emulator");
}

#[test]
fn scale_add_and_casts_are_exact_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_scale_add_casts(gpu, "cuda");
}

#[test]
fn bias_gradients_match_float64_and_are_deterministic_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_bias_grad(emu, "emulator");
}

#[test]
fn bias_gradients_match_float64_and_are_deterministic_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_bias_grad(gpu, "cuda");
}

/// `adamw_runs` over an arena of tensors against one `adamw` per tensor (3 steps, fp32 or bf16
/// copy, a clip scale), and the float64 reference with each tensor's decay.
fn check_adamw_runs<G: Gpu>(gpu: &G, label: &str) {
    use troupe::gpu::ops::optim::{DecayRuns, adamw_runs};
    let lens = [5usize, 3, 64, 7, 1, 130, 2, 33, 12, 9];
    let decays = [false, false, true, false, true, true, false, true, false, true];
    let n: usize = lens.iter().sum();
    let p0 = uniform(n, 21, 2.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|s| uniform(n, 30 + s, 0.2)).collect();
    let scale = 0.75f32;
    let mut offsets = Vec::new();
    let mut at = 0;
    for &l in &lens {
        offsets.push(at);
        at += l;
    }
    let tensors = || offsets.iter().zip(&lens).zip(&decays).map(|((&o, &l), &d)| (o, l, d));
    let runs = DecayRuns::new(gpu, tensors()).unwrap().expect("runs");
    assert_eq!((runs.len(), runs.runs()), (n, 8), "{label}: runs of {decays:?}");
    for copy_dtype in [None, Some(DType::Bf16)] {
        let mut out = Vec::new();
        for one_launch in [true, false] {
            let p = upload_f32(gpu, &p0, DType::F32).unwrap();
            let (m, v) = (gpu.alloc(n * 4).unwrap(), gpu.alloc(n * 4).unwrap());
            let copy = copy_dtype.map(|dt| (gpu.alloc(n * dt.size()).unwrap(), dt));
            for (i, g) in grads.iter().enumerate() {
                let gb = upload_f32(gpu, g, DType::F32).unwrap();
                let h = AdamWStep { step: i as u64 + 1, ..H };
                if one_launch {
                    let bufs = AdamWBufs {
                        params: Dev::new(&p),
                        m: Dev::new(&m),
                        v: Dev::new(&v),
                        grads: Dev::new(&gb),
                        grad_dtype: DType::F32,
                        copy: copy.as_ref().map(|(b, dt)| (Dev::new(b), *dt)),
                    };
                    adamw_runs(gpu, &bufs, &runs, &h, scale).unwrap();
                } else {
                    for (o, l, d) in tensors() {
                        let bufs = AdamWBufs {
                            params: Dev::new(&p).at(o, DType::F32),
                            m: Dev::new(&m).at(o, DType::F32),
                            v: Dev::new(&v).at(o, DType::F32),
                            grads: Dev::new(&gb).at(o, DType::F32),
                            grad_dtype: DType::F32,
                            copy: copy.as_ref().map(|(b, dt)| (Dev::new(b).at(o, *dt), *dt)),
                        };
                        let wd = if d { H.weight_decay } else { 0.0 };
                        adamw(gpu, &bufs, l, &AdamWStep { weight_decay: wd, ..h }, scale).unwrap();
                    }
                }
            }
            let get = |b: &G::Buf, dt: DType| download_f32(gpu, Dev::new(b), n, dt).unwrap();
            let c = copy.as_ref().map(|(b, dt)| get(b, *dt));
            out.push((get(&p, DType::F32), get(&m, DType::F32), get(&v, DType::F32), c));
        }
        let what = format!("{label}: adamw_runs vs per tensor, copy {copy_dtype:?}");
        if bitwise_across_paths(label) {
            assert_eq!(bits(&out[0].0), bits(&out[1].0), "{what}: parameters");
            assert_eq!(bits(&out[0].1), bits(&out[1].1), "{what}: m");
            assert_eq!(bits(&out[0].2), bits(&out[1].2), "{what}: v");
        }
        if let Some(c) = &out[0].3 {
            assert_eq!(bits(c), bits(&round_bf16(&out[0].0)), "{what}: the copy is the master rounded");
        }
        // Against float64, tensor by tensor with its decay.
        for (o, l, d) in tensors() {
            let mut p = up(&p0[o..o + l]);
            let (mut m, mut v) = (vec![0.0; l], vec![0.0; l]);
            for (i, g) in grads.iter().enumerate() {
                let g: Vec<f64> = g[o..o + l].iter().map(|&x| f64::from(x * scale)).collect();
                let wd = if d { f64::from(H.weight_decay) } else { 0.0 };
                let (lr, b1, b2, eps) =
                    (f64::from(H.lr), f64::from(H.beta1), f64::from(H.beta2), f64::from(H.eps));
                naive::adamw(&mut p, &g, &mut m, &mut v, lr, b1, b2, eps, wd, i as u64 + 1);
            }
            let got = &out[0].0[o..o + l];
            compare(&format!("{what}: tensor at {o}"), got, &p, 1e-5, PARAM_ATOL).unwrap();
        }
    }
}

#[test]
fn adamw_over_decay_runs_matches_per_tensor_launches_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_adamw_runs(emu, "emulator");
}

#[test]
fn adamw_over_decay_runs_matches_per_tensor_launches_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_adamw_runs(gpu, "cuda");
}
