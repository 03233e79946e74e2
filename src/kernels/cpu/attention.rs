//! Causal multi-head self-attention from a fused `qkv[B,T,3C]`, computed per (b, h) pair in
//! blocks of `QB` query rows (flash-attention style on the CPU).
//!
//! Memory: forward keeps nothing T×T. Per worker thread a scratch of `QB × T` scores (forward) or
//! two of them (backward) is reused across calls; the only thing stored for backward is the
//! row log-sum-exp `lse[B,NH,T]`, from which backward recomputes the probabilities.
//!
//! forward, per block of query rows t ∈ [t0, t1), keys s ∈ [0, t1):
//!   S = scale · Q Kᵀ;  P = exp(S − lse) with s > t masked;  O = P V
//! backward:
//!   dP = dO Vᵀ;  D_t = Σ_d dO·O;  dS = P ∘ (dP − D);  dV += Pᵀ dO;  dQ = scale · dS K;
//!   dK += scale · dSᵀ Q
//! Each (b, h) pair is one task owned by one thread, blocks run in order: deterministic.

use std::cell::RefCell;

use gemm::Parallelism;

use super::fastmath;
use rayon::prelude::*;

/// Query rows per block.
const QB: usize = 64;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw pointer that may cross threads; every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: used only to hand disjoint (b, h) regions of one exclusively borrowed buffer to rayon
// tasks; no two tasks write the same element and the borrow outlives the parallel section.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// dst(rows m × cols n, strides dst_rs) (= or +=) beta · lhs(m×k) · rhs(k×n); strides in
/// elements as (row stride, col stride).
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    // SAFETY: callers pass pointers and strides that stay inside their buffers (see each call).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    assert_eq!(qkv.len(), b * t * 3 * c, "attention qkv");
    assert_eq!(out.len(), b * t * c, "attention out");
    assert_eq!(lse.len(), b * nh * t, "attention lse");
    assert!(nh > 0 && c.is_multiple_of(nh), "attention heads");
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let out_p = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse_row)| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = bi * t * 3 * c + h * hs;
        let (q, k, v) = (qkv[base..].as_ptr(), qkv[base + c..].as_ptr(), qkv[base + 2 * c..].as_ptr());
        with_scratch(QB * t, |p| {
            for t0 in (0..t).step_by(QB) {
                let t1 = (t0 + QB).min(t);
                let rows = t1 - t0;
                // SAFETY: Q rows t0..t1 and K rows 0..t1 lie inside qkv (row stride 3C, head
                // columns h·hs..h·hs+hs); p has QB·t ≥ rows·t1 elements with row stride t.
                unsafe {
                    mm(
                        rows,
                        t1,
                        hs,
                        p.as_mut_ptr(),
                        t,
                        false,
                        q.add(t0 * 3 * c),
                        3 * c,
                        1,
                        k,
                        1,
                        3 * c,
                        scale,
                    );
                }
                for r in 0..rows {
                    let row = &mut p[r * t..r * t + t1];
                    let valid = t0 + r + 1;
                    let mx = row[..valid].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    let mut sum = 0.0f32;
                    for x in &mut row[..valid] {
                        *x = fastmath::exp(*x - mx);
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    for x in &mut row[..valid] {
                        *x *= inv;
                    }
                    row[valid..].fill(0.0);
                    lse_row[t0 + r] = mx + sum.ln();
                }
                // SAFETY: out rows t0..t1 of batch bi, head columns, lie inside out (row stride
                // C) and belong to this (b, h) task only; V rows 0..t1 lie inside qkv.
                unsafe {
                    let dst = out_p.get().add(bi * t * c + t0 * c + h * hs);
                    mm(rows, hs, t1, dst, c, false, p.as_ptr(), t, 1, v, 3 * c, 1, 1.0);
                }
            }
        });
    });
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dqkv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    assert_eq!(qkv.len(), b * t * 3 * c, "attention qkv");
    assert_eq!(dqkv.len(), b * t * 3 * c, "attention dqkv");
    assert_eq!((out.len(), dout.len()), (b * t * c, b * t * c), "attention out");
    assert_eq!(lse.len(), b * nh * t, "attention lse");
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = bi * t * 3 * c + h * hs;
        let (q, k, v) = (qkv[base..].as_ptr(), qkv[base + c..].as_ptr(), qkv[base + 2 * c..].as_ptr());
        // SAFETY: this task owns the head columns of Q, K and V in batch bi of dqkv.
        let (dq, dk, dv) = unsafe {
            let p = dqkv_p.get().add(base);
            (p, p.add(c), p.add(2 * c))
        };
        for s in 0..t {
            for off in [0, c, 2 * c] {
                // SAFETY: row s of this head's columns, inside dqkv and owned by this task.
                unsafe { std::ptr::write_bytes(dq.add(s * 3 * c + off), 0, hs) };
            }
        }
        let lse_row = &lse[bh * t..(bh + 1) * t];
        with_scratch(2 * QB * t, |scratch| {
            let (p, dp) = scratch.split_at_mut(QB * t);
            for t0 in (0..t).step_by(QB) {
                let t1 = (t0 + QB).min(t);
                let rows = t1 - t0;
                let o_off = bi * t * c + t0 * c + h * hs;
                // SAFETY (all products below): Q/dQ/dO rows t0..t1 and K/V/dK/dV rows 0..t1 of
                // this (b, h) lie inside their buffers with the row strides given; p and dp
                // hold rows·t1 elements with row stride t.
                unsafe {
                    mm(
                        rows,
                        t1,
                        hs,
                        p.as_mut_ptr(),
                        t,
                        false,
                        q.add(t0 * 3 * c),
                        3 * c,
                        1,
                        k,
                        1,
                        3 * c,
                        scale,
                    );
                    mm(
                        rows,
                        t1,
                        hs,
                        dp.as_mut_ptr(),
                        t,
                        false,
                        dout[o_off..].as_ptr(),
                        c,
                        1,
                        v,
                        1,
                        3 * c,
                        1.0,
                    );
                }
                for r in 0..rows {
                    let valid = t0 + r + 1;
                    let (go, o) =
                        (&dout[o_off + r * c..o_off + r * c + hs], &out[o_off + r * c..o_off + r * c + hs]);
                    let d: f32 = go.iter().zip(o).map(|(a, b)| a * b).sum();
                    let l = lse_row[t0 + r];
                    let (prow, dprow) = (&mut p[r * t..r * t + t1], &mut dp[r * t..r * t + t1]);
                    for j in 0..valid {
                        let pj = fastmath::exp(prow[j] - l);
                        prow[j] = pj;
                        dprow[j] = pj * (dprow[j] - d);
                    }
                    prow[valid..].fill(0.0);
                    dprow[valid..].fill(0.0);
                }
                unsafe {
                    mm(t1, hs, rows, dv, 3 * c, true, p.as_ptr(), 1, t, dout[o_off..].as_ptr(), c, 1, 1.0);
                    mm(rows, hs, t1, dq.add(t0 * 3 * c), 3 * c, false, dp.as_ptr(), t, 1, k, 3 * c, 1, scale);
                    mm(t1, hs, rows, dk, 3 * c, true, dp.as_ptr(), 1, t, q.add(t0 * 3 * c), 3 * c, 1, scale);
                }
            }
        });
    });
}

/// Single-query attention over a KV cache (generation). Per head: scores over `len` cached
/// positions, softmax, weighted sum of values. Sequential: one row is small.
pub(super) fn decode(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], len: usize, c: usize, nh: usize) {
    assert_eq!((out.len(), q.len()), (c, c), "attention_decode q/out");
    assert!(k.len() >= len * c && v.len() >= len * c && len > 0, "attention_decode cache");
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    with_scratch(len, |p| {
        for h in 0..nh {
            let qh = &q[h * hs..(h + 1) * hs];
            let mut mx = f32::NEG_INFINITY;
            for (s, ps) in p.iter_mut().enumerate() {
                let ks = &k[s * c + h * hs..s * c + (h + 1) * hs];
                *ps = qh.iter().zip(ks).map(|(a, b)| a * b).sum::<f32>() * scale;
                mx = mx.max(*ps);
            }
            let mut sum = 0.0f32;
            for ps in p.iter_mut() {
                *ps = fastmath::exp(*ps - mx);
                sum += *ps;
            }
            let oh = &mut out[h * hs..(h + 1) * hs];
            oh.fill(0.0);
            for (s, &ps) in p.iter().enumerate() {
                let w = ps / sum;
                for (o, &vv) in oh.iter_mut().zip(&v[s * c + h * hs..s * c + (h + 1) * hs]) {
                    *o += w * vv;
                }
            }
        }
    });
}
