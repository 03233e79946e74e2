//! Embedding kernels (cuda/embedding.cu) run in the CPU emulator against the float64 reference
//! (`kernels::naive`) and, for the fp32 backward, bitwise against the CPU backend. Shapes: B = 3,
//! T = 7 with a position table longer than T, a vocabulary of 11 rows so tokens repeat (one token
//! appears at many positions), C a multiple of the 16-byte pack (`_vec` kernels) and C = 37
//! (scalar kernels).
//!
//! Tolerances (`|got − want| ≤ atol + rtol·|want|`):
//! - fp32 forward: one fp32 addition, correctly rounded: rtol 1e-6, atol 0.
//! - fp32 backward: the starting gradient plus up to B·T terms of magnitude ≤ 1 added in fp32
//!   (~6e-8 absolute each): rtol 1e-5 plus atol 1e-6 for sums that cancel.
//! - bf16: the reference sees the bf16-rounded inputs, so only the fp32 arithmetic and the final
//!   rounding to bf16 differ; that rounding is at most 2^-8 relative. We allow one bf16 ulp,
//!   2^-7 relative, plus atol 1e-6.

use troupe::gpu::emu::{EmuBuf, EmuGpu, compare, shared};
use troupe::gpu::ops::embedding::{backward_workspace_bytes, encoder_backward, encoder_forward};
use troupe::gpu::{DType, Dev, Gpu, download_f32, round_bf16, upload_f32, upload_u32};
use troupe::kernels::naive;
use troupe::{Backend, CpuBackend};

const B: usize = 3;
const T: usize = 7;
const MAX_T: usize = 9;
const V: usize = 11;
const CHANNELS: [usize; 3] = [48, 80, 37];

fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            2.0 * ((s >> 40) as f32 / (1u64 << 24) as f32) - 1.0
        })
        .collect()
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

fn up(gpu: &EmuGpu, v: &[f32], dtype: DType) -> EmuBuf {
    upload_f32(gpu, v, dtype).unwrap()
}

fn down(gpu: &EmuGpu, b: &EmuBuf, n: usize, dtype: DType) -> Vec<f32> {
    download_f32(gpu, Dev::new(b), n, dtype).unwrap()
}

#[test]
fn encoder_forward_matches_the_reference() {
    let Some(gpu) = shared() else { return };
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
            check(&format!("forward {dtype:?} C {c}"), &down(gpu, &out, B * T * c, dtype), &want, rtol, atol);
        }
    }
}

#[test]
fn an_out_of_vocabulary_token_gives_a_nan_row_not_a_wild_read() {
    let Some(gpu) = shared() else { return };
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
        assert_eq!(vals.iter().all(|x| x.is_nan()), row == 5, "row {row}");
        assert!(row == 5 || vals.iter().all(|x| x.is_finite()), "row {row}");
    }
}

/// Starting gradients and dout of a backward case, as stored.
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
            dwte0: stored(uniform(V * c, seed), dtype),
            dwpe0: stored(uniform(MAX_T * c, seed + 1), dtype),
            dout: stored(uniform(B * T * c, seed + 2), dtype),
        }
    }

    /// (dwte, dwpe) after one backward on fresh device copies.
    fn run(&self, gpu: &EmuGpu, toks: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let (c, dt) = (self.c, self.dtype);
        let (dwte, dwpe, dout) =
            (up(gpu, &self.dwte0, dt), up(gpu, &self.dwpe0, dt), up(gpu, &self.dout, dt));
        let mut ws = gpu.alloc(backward_workspace_bytes(B * T)).unwrap();
        let d = Dev::new;
        encoder_backward(gpu, dt, d(&dwte), d(&dwpe), d(&dout), toks, &mut ws, B, T, c, V).unwrap();
        (down(gpu, &dwte, V * c, dt), down(gpu, &dwpe, MAX_T * c, dt))
    }
}

#[test]
fn encoder_backward_accumulates_and_matches_the_reference() {
    let Some(gpu) = shared() else { return };
    let toks = tokens();
    for dtype in [DType::F32, DType::Bf16] {
        for c in CHANNELS {
            let case = Case::new(c, dtype, 100 + c as u64);
            let (dwte, dwpe) = case.run(gpu, &toks);
            let (mut want_wte, mut want_wpe) = (f64s(&case.dwte0), f64s(&case.dwpe0));
            naive::encoder_backward(&mut want_wte, &mut want_wpe, &f64s(&case.dout), &toks, B, T, c);
            let (rtol, atol) = if dtype == DType::F32 { (1e-5, 1e-6) } else { (1.0 / 128.0, 1e-6) };
            check(&format!("backward dwte {dtype:?} C {c}"), &dwte, &want_wte, rtol, atol);
            check(&format!("backward dwpe {dtype:?} C {c}"), &dwpe, &want_wpe, rtol, atol);
            // Rows T..MAX_T of dwpe and tokens that never occur keep their starting values.
            assert_eq!(dwpe[T * c..], case.dwpe0[T * c..], "{dtype:?} C {c}: dwpe past T");
            let unused = (0..V as u32).find(|v| !toks.contains(v)).expect("some token is unused");
            let row = unused as usize * c..(unused as usize + 1) * c;
            assert_eq!(dwte[row.clone()], case.dwte0[row], "{dtype:?} C {c}: unused token {unused}");
        }
    }
}

#[test]
fn encoder_backward_fp32_is_bitwise_the_cpu_backend_and_deterministic() {
    let Some(gpu) = shared() else { return };
    let toks = tokens();
    for c in CHANNELS {
        let case = Case::new(c, DType::F32, 200 + c as u64);
        let first = case.run(gpu, &toks);
        let second = case.run(gpu, &toks);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            (bits(&first.0), bits(&first.1)),
            (bits(&second.0), bits(&second.1)),
            "C {c}: runs differ"
        );
        let (mut cpu_wte, mut cpu_wpe) = (case.dwte0.clone(), case.dwpe0.clone());
        CpuBackend::new(2).encoder_backward(&mut cpu_wte, &mut cpu_wpe, &case.dout, &toks, B, T, c);
        assert_eq!(bits(&first.0), bits(&cpu_wte), "C {c}: dwte differs from the CPU backend");
        assert_eq!(bits(&first.1), bits(&cpu_wpe), "C {c}: dwpe differs from the CPU backend");
    }
    let case = Case::new(80, DType::Bf16, 300);
    assert_eq!(case.run(gpu, &toks), case.run(gpu, &toks), "bf16 runs differ");
}

#[test]
fn bad_tokens_and_short_workspaces_are_shape_errors() {
    let Some(gpu) = shared() else { return };
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
    assert!(err.contains("encoder_backward") && err.contains("token id 11 at position 9"), "{err}");
    let mut small = gpu.alloc(16).unwrap();
    let err =
        encoder_backward(gpu, DType::F32, d(&dwte), d(&dwpe), d(&dout), &tokens(), &mut small, B, T, c, V)
            .unwrap_err()
            .to_string();
    assert!(err.contains("encoder_backward") && err.contains("workspace"), "{err}");
    // Nothing ran: the gradients are untouched.
    assert_eq!(down(gpu, &dwte, V * c, DType::F32), case.dwte0);
}
