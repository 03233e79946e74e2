//! Elementwise and row-wise kernels: GELU, token + position embedding, fused softmax
//! cross-entropy, AdamW, and the reductions used for gradient clipping.
//!
//! Shapes: tokens `[B,T]`, wte `[Vp,C]`, wpe `[T_max,C]`, logits `[rows,Vp]`.

use rayon::prelude::*;

use super::fastmath;
use crate::kernels::AdamWStep;

/// Elements per parallel task for purely elementwise work.
const CHUNK: usize = 16 * 1024;
/// Column block width for embedding-gradient reductions.
const COL_BLOCK: usize = 64;
/// Fixed number of partial sums for `sum_squares` (independent of the thread count).
const PARTIALS: usize = 64;

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2/pi)

pub(super) fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len(), "gelu");
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            let u = GELU_SCALE * (x + 0.044715 * x * x * x);
            *o = 0.5 * x * (1.0 + fastmath::tanh(u));
        }
    });
}

pub(super) fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert_eq!((dinp.len(), dout.len()), (inp.len(), inp.len()), "gelu backward");
    dinp.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK))).for_each(
        |(d, (x, g))| {
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                let x3 = x * x * x;
                let u = GELU_SCALE * (x + 0.044715 * x3);
                let th = fastmath::tanh(u);
                let sech2 = 1.0 - th * th;
                let local = 0.5 * (1.0 + th) + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
                *d = local * g;
            }
        },
    );
}

#[allow(clippy::too_many_arguments)]
pub(super) fn encoder_forward(
    out: &mut [f32],
    tokens: &[u32],
    wte: &[f32],
    wpe: &[f32],
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!((out.len(), tokens.len()), (b * t * c, b * t), "encoder");
    assert!(wpe.len() >= t * c, "encoder wpe");
    out.par_chunks_mut(c).enumerate().for_each(|(i, o)| {
        let tok = tokens[i] as usize;
        let pos = i % t;
        let (e, p) = (&wte[tok * c..(tok + 1) * c], &wpe[pos * c..(pos + 1) * c]);
        for ((o, &e), &p) in o.iter_mut().zip(e).zip(p) {
            *o = e + p;
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub(super) fn encoder_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!((dout.len(), tokens.len()), (b * t * c, b * t), "encoder backward");
    assert!(dwpe.len() >= t * c, "encoder backward dwpe");
    let vp = dwte.len() / c;
    // Column blocks in parallel; inside a block rows are visited in (b, t) order, so repeated
    // tokens accumulate in a fixed order.
    let wte_p = super::attention::SendPtr(dwte.as_mut_ptr());
    let wpe_p = super::attention::SendPtr(dwpe.as_mut_ptr());
    (0..c.div_ceil(COL_BLOCK)).into_par_iter().for_each(|blk| {
        let j0 = blk * COL_BLOCK;
        let w = COL_BLOCK.min(c - j0);
        for i in 0..b * t {
            let tok = tokens[i] as usize;
            debug_assert!(tok < vp);
            let pos = i % t;
            let g = &dout[i * c + j0..i * c + j0 + w];
            // SAFETY: column block [j0, j0+w) of rows `tok` and `pos` is written only by this
            // task (blocks are disjoint); tok < Vp and pos < T were checked by the caller/asserts.
            unsafe {
                let de = std::slice::from_raw_parts_mut(wte_p.get().add(tok * c + j0), w);
                let dp = std::slice::from_raw_parts_mut(wpe_p.get().add(pos * c + j0), w);
                for ((e, p), &g) in de.iter_mut().zip(dp.iter_mut()).zip(g) {
                    *e += g;
                    *p += g;
                }
            }
        }
    });
}

/// (max, Σ exp(x − max)) of a row: the loss of target t is ln(sum) − (x_t − max), computed the
/// same way by the fused and the forward-only kernel so they agree bitwise.
fn row_max_sum(row: &[f32]) -> (f32, f32) {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let mut sum = 0.0f32;
    for &x in row {
        sum += fastmath::exp(x - mx);
    }
    (mx, sum)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn crossentropy_fused(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    rows: usize,
    v: usize,
    vp: usize,
    dloss: f32,
) {
    assert_eq!((logits.len(), losses.len(), targets.len()), (rows * vp, rows, rows), "xent");
    logits.par_chunks_mut(vp).zip(losses.par_iter_mut()).enumerate().for_each(|(i, (row, loss))| {
        let tgt = targets[i] as usize;
        let real = &mut row[..v];
        // Three passes: max; exp(x − max) written in place and summed; scale. One exp per logit.
        let mx = real.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let target_shifted = real[tgt] - mx;
        let mut sum = 0.0f32;
        for x in real.iter_mut() {
            *x = fastmath::exp(*x - mx);
            sum += *x;
        }
        *loss = sum.ln() - target_shifted;
        let k = dloss / sum;
        for x in real.iter_mut() {
            *x *= k;
        }
        row[tgt] -= dloss;
        row[v..].fill(0.0);
    });
}

pub(super) fn crossentropy_forward(
    losses: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    rows: usize,
    v: usize,
    vp: usize,
) {
    assert_eq!((logits.len(), losses.len(), targets.len()), (rows * vp, rows, rows), "xent");
    losses.par_iter_mut().enumerate().for_each(|(i, loss)| {
        let row = &logits[i * vp..i * vp + v];
        let (mx, sum) = row_max_sum(row);
        *loss = sum.ln() - (row[targets[i] as usize] - mx);
    });
}

pub(super) fn adamw(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
    assert_eq!((grads.len(), m.len(), v.len()), (params.len(), params.len(), params.len()), "adamw");
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
    let step_size = h.lr / bc1;
    let decay = 1.0 - h.lr * h.weight_decay;
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let gi = g[i];
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + h.eps;
                p[i] = p[i] * decay - step_size * m[i] / denom;
            }
        });
}

pub(super) fn sum_squares(x: &[f32]) -> f64 {
    let chunk = x.len().div_ceil(PARTIALS).max(1);
    let mut partials = [0.0f64; PARTIALS];
    partials.par_iter_mut().enumerate().for_each(|(i, acc)| {
        let lo = (i * chunk).min(x.len());
        let hi = ((i + 1) * chunk).min(x.len());
        *acc = x[lo..hi].iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    });
    partials.iter().sum()
}

pub(super) fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|x| x.iter_mut().for_each(|v| *v *= s));
}

pub(super) fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign");
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, &s) in d.iter_mut().zip(s) {
            *d += s;
        }
    });
}
