//! Embedding kernels (cuda/embedding.cu) against the float64 reference (`kernels::naive`) and, for
//! the fp32 backward, the CPU backend, in the CPU emulator everywhere and on a real GPU when one is
//! present (otherwise that half prints SKIPPED). Shapes: B = 3,
//! T = 7 with a position table longer than T, a vocabulary of 11 rows so tokens repeat (one token
//! appears at many positions), C a multiple of the 16-byte pack (`_vec` kernels) and C = 37
//! (scalar kernels).
//!
//! Tolerances (`|got − want| ≤ atol + rtol·|want|`):
//! - fp32 forward: one fp32 addition, correctly rounded: rtol 1e-6, atol 0.
//! - fp32 backward: the starting gradient plus up to B·T terms of magnitude ≤ 1 added in fp32
//!   (~6e-8 absolute each): rtol 1e-5 plus atol 1e-6 for sums that cancel.
//! - bf16 forward: the reference sees the bf16-rounded inputs, so only the fp32 arithmetic and the
//!   final rounding to bf16 differ; that rounding is at most 2^-8 relative. We allow one bf16
//!   ulp, 2^-7 relative, plus atol 1e-6.
//! - bf16 backward: dwte and dwpe are fp32 buffers (Megatron's rule: parameter gradients are
//!   accumulated in fp32), only dout is bf16. Its bf16 values are exact in fp32 and the reference
//!   sees the same values, and nothing is rounded to bf16 on the way, so the kernel differs from
//!   the reference only by its fp32 additions: the fp32 backward tolerance applies (a bf16
//!   rounding would show up as errors of ~4e-3, far above it). The starting gradients are
//!   arbitrary fp32 values, not bf16-rounded ones, so that any rounding to bf16 is caught; and in
//!   the emulator the bf16 backward equals the CPU backend's fp32 backward on the widened dout bit
//!   for bit.
//!
//! The same tolerances apply on a GPU (these kernels only add, so `--use_fast_math` changes
//! nothing but the contraction and denormal flushing, a few ulp at most). The fp32 backward equals
//! the CPU backend bit for bit in the emulator; on a GPU it only has to match it within the fp32
//! backward tolerance. Two runs must be bitwise equal on both, and rows the backward does not
//! touch must keep their starting values exactly.

use troupe::gpu::emu::compare;
use troupe::gpu::ops::embedding::{backward_workspace_bytes, encoder_backward, encoder_forward};
use troupe::gpu::{DType, Dev, Gpu, download_f32, round_bf16, upload_f32, upload_u32};
use troupe::kernels::naive;
use troupe::{Backend, CpuBackend};

#[path = "common/lcg.rs"]
mod lcg;

const B: usize = 3;
const T: usize = 7;
const MAX_T: usize = 9;
const V: usize = 11;
const CHANNELS: [usize; 3] = [48, 80, 37];

fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut g = lcg::Lcg::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d);
    (0..n).map(|_| 2.0 * g.unit() - 1.0).collect()
}

/// B·T token ids below V with heavy repetition: token 3 at every fourth position.
fn tokens() -> Vec<u32> {
    (0..B * T).map(|i| if i % 4 == 0 { 3 } else { ((i * 7 + i / 5) % V) as u32 }).collect()
}

fn stored(v: Vec<f32>, dtype: DType) -> Vec<f32> {
    if dtype == DType::Bf16 { round_bf16(&v) } else { v }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn check(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    let worst = got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).abs()).fold(0.0f64, f64::max);
    println!("{what}: worst abs error {worst:.2e}");
    compare(what, got, want, rtol, atol).unwrap();
}

fn up<G: Gpu>(gpu: &G, v: &[f32], dtype: DType) -> G::Buf {
    upload_f32(gpu, v, dtype).unwrap()
}

fn down<G: Gpu>(gpu: &G, b: &G::Buf, n: usize, dtype: DType) -> Vec<f32> {
    download_f32(gpu, Dev::new(b), n, dtype).unwrap()
}

fn check_forward<G: Gpu>(gpu: &G, label: &str) {
    let toks = tokens();
    let tok_buf = upload_u32(gpu, &toks).unwrap();
    for dtype in [DType::F32, DType::Bf16] {
        for c in CHANNELS {
            let wte = stored(uniform(V * c, c as u64), dtype);
            let wpe = stored(uniform(MAX_T * c, c as u64 + 1), dtype);
            let (wte_b, wpe_b) = (up(gpu, &wte, dtype), up(gpu, &wpe, dtype));
            let out = gpu.alloc(B * T * c * dtype.size()).unwrap();
            let d = Dev::new;
            encoder_forward(gpu, dtype, d(&out), d(&tok_buf), d(&wte_b), d(&wpe_b), B, T, c, V).unwrap();
            let mut want = vec![0.0; B * T * c];
            naive::encoder_forward(&mut want, &toks, &f64s(&wte), &f64s(&wpe), B, T, c);
            let (rtol, atol) = if dtype == DType::F32 { (1e-6, 0.0) } else { (1.0 / 128.0, 1e-6) };
            let got = down(gpu, &out, B * T * c, dtype);
            check(&format!("{label}: forward {dtype:?} C {c}"), &got, &want, rtol, atol);
        }
    }
}

fn check_out_of_vocabulary<G: Gpu>(gpu: &G, label: &str) {
    let c = 48;
    let mut toks = tokens();
    toks[5] = V as u32 + 1000;
    let tok_buf = upload_u32(gpu, &toks).unwrap();
    let (wte, wpe) = (up(gpu, &uniform(V * c, 1), DType::F32), up(gpu, &uniform(T * c, 2), DType::F32));
    let out = gpu.alloc(B * T * c * 4).unwrap();
    let d = Dev::new;
    encoder_forward(gpu, DType::F32, d(&out), d(&tok_buf), d(&wte), d(&wpe), B, T, c, V).unwrap();
    let got = down(gpu, &out, B * T * c, DType::F32);
    for (row, vals) in got.chunks(c).enumerate() {
        assert_eq!(vals.iter().all(|x| x.is_nan()), row == 5, "{label}: row {row}");
        assert!(row == 5 || vals.iter().all(|x| x.is_finite()), "{label}: row {row}");
    }
}

/// Starting gradients (fp32 for any `dtype`) and dout (of `dtype`) of a backward case, as stored.
struct Case {
    c: usize,
    dtype: DType,
    dwte0: Vec<f32>,
    dwpe0: Vec<f32>,
    dout: Vec<f32>,
}

impl Case {
    fn new(c: usize, dtype: DType, seed: u64) -> Self {
        Case {
            c,
            dtype,
            // Non-zero starting gradients: the kernels must add to them.
            dwte0: uniform(V * c, seed),
            dwpe0: uniform(MAX_T * c, seed + 1),
            dout: stored(uniform(B * T * c, seed + 2), dtype),
        }
    }

    /// (dwte, dwpe) after one backward on fresh device copies.
    fn run<G: Gpu>(&self, gpu: &G, toks: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let (c, dt) = (self.c, self.dtype);
        let (dwte, dwpe, dout) =
            (up(gpu, &self.dwte0, DType::F32), up(gpu, &self.dwpe0, DType::F32), up(gpu, &self.dout, dt));
        let mut ws = gpu.alloc(backward_workspace_bytes(B * T)).unwrap();
        let d = Dev::new;
        encoder_backward(gpu, dt, d(&dwte), d(&dwpe), d(&dout), toks, &mut ws, B, T, c, V).unwrap();
        (down(gpu, &dwte, V * c, DType::F32), down(gpu, &dwpe, MAX_T * c, DType::F32))
    }
}

fn check_backward<G: Gpu>(gpu: &G, label: &str) {
    let toks = tokens();
    for dtype in [DType::F32, DType::Bf16] {
        for c in CHANNELS {
            let case = Case::new(c, dtype, 100 + c as u64);
            let (dwte, dwpe) = case.run(gpu, &toks);
            let (mut want_wte, mut want_wpe) = (f64s(&case.dwte0), f64s(&case.dwpe0));
            naive::encoder_backward(&mut want_wte, &mut want_wpe, &f64s(&case.dout), &toks, B, T, c);
            // fp32 gradients: the fp32 backward tolerance for both dout types (file docs).
            let (rtol, atol) = (1e-5, 1e-6);
            check(&format!("{label}: backward dwte {dtype:?} C {c}"), &dwte, &want_wte, rtol, atol);
            check(&format!("{label}: backward dwpe {dtype:?} C {c}"), &dwpe, &want_wpe, rtol, atol);
            // Rows T..MAX_T of dwpe and tokens that never occur keep their starting values.
            assert_eq!(dwpe[T * c..], case.dwpe0[T * c..], "{label} {dtype:?} C {c}: dwpe past T");
            let unused = (0..V as u32).find(|v| !toks.contains(v)).expect("some token is unused");
            let row = unused as usize * c..(unused as usize + 1) * c;
            assert_eq!(dwte[row.clone()], case.dwte0[row], "{label} {dtype:?} C {c}: unused token {unused}");
        }
    }
}

/// Whether the fp32 backward must equal the CPU backend bit for bit: in the emulator, not on a
/// GPU (see the file docs).
fn bitwise_vs_cpu(label: &str) -> bool {
    label == "emulator"
}

fn check_backward_vs_cpu_and_determinism<G: Gpu>(gpu: &G, label: &str) {
    let toks = tokens();
    for c in CHANNELS {
        let case = Case::new(c, DType::F32, 200 + c as u64);
        let first = case.run(gpu, &toks);
        let second = case.run(gpu, &toks);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            (bits(&first.0), bits(&first.1)),
            (bits(&second.0), bits(&second.1)),
            "{label} C {c}: runs differ"
        );
        let (mut cpu_wte, mut cpu_wpe) = (case.dwte0.clone(), case.dwpe0.clone());
        CpuBackend::new(2).encoder_backward(&mut cpu_wte, &mut cpu_wpe, &case.dout, &toks, B, T, c);
        if bitwise_vs_cpu(label) {
            assert_eq!(bits(&first.0), bits(&cpu_wte), "{label} C {c}: dwte differs from the CPU backend");
            assert_eq!(bits(&first.1), bits(&cpu_wpe), "{label} C {c}: dwpe differs from the CPU backend");
        } else {
            // On a GPU: the fp32 backward tolerance (see the file docs), not bit for bit.
            let what = |x: &str| format!("{label} C {c}: {x} vs the CPU backend");
            check(&what("dwte"), &first.0, &f64s(&cpu_wte), 1e-5, 1e-6);
            check(&what("dwpe"), &first.1, &f64s(&cpu_wpe), 1e-5, 1e-6);
        }
    }
    for c in CHANNELS {
        let case = Case::new(c, DType::Bf16, 300 + c as u64);
        let (first, second) = (case.run(gpu, &toks), case.run(gpu, &toks));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            (bits(&first.0), bits(&first.1)),
            (bits(&second.0), bits(&second.1)),
            "{label} C {c}: bf16 runs differ"
        );
        // The fp32 gradients of a bf16 dout: the CPU backend's fp32 backward on the same values.
        let (mut cpu_wte, mut cpu_wpe) = (case.dwte0.clone(), case.dwpe0.clone());
        CpuBackend::new(2).encoder_backward(&mut cpu_wte, &mut cpu_wpe, &case.dout, &toks, B, T, c);
        if bitwise_vs_cpu(label) {
            assert_eq!(
                bits(&first.0),
                bits(&cpu_wte),
                "{label} C {c}: bf16 dwte differs from the CPU backend"
            );
            assert_eq!(
                bits(&first.1),
                bits(&cpu_wpe),
                "{label} C {c}: bf16 dwpe differs from the CPU backend"
            );
        } else {
            let what = |x: &str| format!("{label} C {c}: bf16 {x} vs the CPU backend");
            check(&what("dwte"), &first.0, &f64s(&cpu_wte), 1e-5, 1e-6);
            check(&what("dwpe"), &first.1, &f64s(&cpu_wpe), 1e-5, 1e-6);
        }
    }
}

fn check_shape_errors<G: Gpu>(gpu: &G, label: &str) {
    let c = 48;
    let case = Case::new(c, DType::F32, 400);
    let (dwte, dwpe, dout) =
        (up(gpu, &case.dwte0, DType::F32), up(gpu, &case.dwpe0, DType::F32), up(gpu, &case.dout, DType::F32));
    let d = Dev::new;
    let mut toks = tokens();
    toks[9] = V as u32;
    let mut ws = gpu.alloc(backward_workspace_bytes(B * T)).unwrap();
    let err = encoder_backward(gpu, DType::F32, d(&dwte), d(&dwpe), d(&dout), &toks, &mut ws, B, T, c, V)
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder_backward") && err.contains("token id 11 at position 9"), "{label}: {err}");
    let mut small = gpu.alloc(16).unwrap();
    let err =
        encoder_backward(gpu, DType::F32, d(&dwte), d(&dwpe), d(&dout), &tokens(), &mut small, B, T, c, V)
            .unwrap_err()
            .to_string();
    assert!(err.contains("encoder_backward") && err.contains("workspace"), "{label}: {err}");
    // Nothing ran: the gradients are untouched.
    assert_eq!(down(gpu, &dwte, V * c, DType::F32), case.dwte0, "{label}: dwte changed");
}

#[test]
fn encoder_forward_matches_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_forward(emu, "emulator");
}

#[test]
fn encoder_forward_matches_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_forward(gpu, "cuda");
}

#[test]
fn an_out_of_vocabulary_token_gives_a_nan_row_not_a_wild_read_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_out_of_vocabulary(emu, "emulator");
}

#[test]
fn an_out_of_vocabulary_token_gives_a_nan_row_not_a_wild_read_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_out_of_vocabulary(gpu, "cuda");
}

#[test]
fn encoder_backward_accumulates_and_matches_the_reference_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_backward(emu, "emulator");
}

#[test]
fn encoder_backward_accumulates_and_matches_the_reference_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_backward(gpu, "cuda");
}

#[test]
fn encoder_backward_fp32_matches_the_cpu_backend_and_is_deterministic_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_backward_vs_cpu_and_determinism(emu, "emulator");
}

#[test]
fn encoder_backward_fp32_matches_the_cpu_backend_and_is_deterministic_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_backward_vs_cpu_and_determinism(gpu, "cuda");
}

#[test]
fn bad_tokens_and_short_workspaces_are_shape_errors_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_shape_errors(emu, "emulator");
}

#[test]
fn bad_tokens_and_short_workspaces_are_shape_errors_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_shape_errors(gpu, "cuda");
}
