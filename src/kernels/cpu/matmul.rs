//! Matrix products through the `gemm` crate. Weights are `[N, K]` (`nn.Linear` layout).
//!
//! forward:  out[M,N]  = inp[M,K] · W[N,K]ᵀ (+ bias)
//! backward: dinp[M,K] = dout[M,N] · W[N,K]        (overwrite)            — `backward_input`
//!           dW[N,K]  += dout[M,N]ᵀ · inp[M,K]      (accumulate)           — `backward_weight`
//!           db[N]    += Σ_m dout[m,:]              (accumulate, column blocks in parallel)
//!
//! `backward` is `backward_input` then `backward_weight`; the halves share nothing, so a
//! zero-bubble schedule may run them apart (and in any order) and get the fused result's bits.

use gemm::Parallelism;
use rayon::prelude::*;

/// Column block width for bias reductions: fixed so the split never depends on thread count.
const COL_BLOCK: usize = 64;

fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    assert_eq!(out.len(), m * n, "matmul_forward out");
    assert_eq!(inp.len(), m * k, "matmul_forward inp");
    assert_eq!(weight.len(), n * k, "matmul_forward weight");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "matmul_forward bias");
        out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(bias));
    }
    // SAFETY: the asserts above prove every index gemm touches lies inside the slices: dst is
    // m×n row-major (rs = n), lhs m×k row-major (rs = k), rhs is Wᵀ read from the n×k weight
    // (element (kk, nn) at nn·k + kk, so rs = 1, cs = k). `out` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            bias.is_some(),
            inp.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(threads),
        );
    }
}

/// The fused backward: exactly [`backward_input`] followed by [`backward_weight`] (the two are
/// independent, so splitting them for a zero-bubble schedule changes no bit).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    backward_input(dinp, dout, weight, m, k, n, threads);
    backward_weight(dweight, dbias, dout, inp, m, k, n, threads);
}

/// `dinp[M,K] = dout[M,N] · W[N,K]` (overwrite).
pub(super) fn backward_input(
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    assert_eq!(dinp.len(), m * k, "matmul_backward_input dinp");
    assert_eq!(dout.len(), m * n, "matmul_backward_input dout");
    assert_eq!(weight.len(), n * k, "matmul_backward_input weight");
    // SAFETY: dinp is m×k (rs = k), dout m×n (rs = n), weight n×k (rs = k); all lengths checked.
    unsafe {
        gemm::gemm(
            m,
            k,
            n,
            dinp.as_mut_ptr(),
            1,
            k as isize,
            false,
            dout.as_ptr(),
            1,
            n as isize,
            weight.as_ptr(),
            1,
            k as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(threads),
        );
    }
}

/// `dW[N,K] += dout[M,N]ᵀ · inp[M,K]`, `db[N] += Σ_m dout[m,:]` (accumulate).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_weight(
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    assert_eq!(dweight.len(), n * k, "matmul_backward_weight dweight");
    assert_eq!(dout.len(), m * n, "matmul_backward_weight dout");
    assert_eq!(inp.len(), m * k, "matmul_backward_weight inp");
    // SAFETY: dweight is n×k (rs = k); lhs is doutᵀ read from the m×n dout (element (nn, mm) at
    // mm·n + nn, so rs = 1, cs = n); rhs is inp m×k (rs = k). Lengths checked above.
    unsafe {
        gemm::gemm(
            n,
            k,
            m,
            dweight.as_mut_ptr(),
            1,
            k as isize,
            true,
            dout.as_ptr(),
            n as isize,
            1,
            inp.as_ptr(),
            1,
            k as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(threads),
        );
    }
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len(), n, "matmul_backward_weight dbias");
        column_sums_into(dbias, dout, m, n);
    }
}

/// `acc[j] += Σ_i x[i, j]`, column blocks in parallel, rows summed in order.
pub(super) fn column_sums_into(acc: &mut [f32], x: &[f32], rows: usize, cols: usize) {
    acc.par_chunks_mut(COL_BLOCK).enumerate().for_each(|(blk, acc)| {
        let j0 = blk * COL_BLOCK;
        for i in 0..rows {
            let row = &x[i * cols + j0..i * cols + j0 + acc.len()];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    });
}
