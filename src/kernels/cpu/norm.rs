//! LayerNorm forward (optionally fused with the residual add) and backward.
//!
//! Shapes: inp/out/resid `[rows, C]`, mean/rstd `[rows]`, weight/bias `[C]`.
//! Rows are independent in forward and in the input gradient; the weight and bias gradients are
//! reduced over rows by column blocks, each block summing rows in order (deterministic).

use rayon::prelude::*;

pub(super) const EPS: f32 = 1e-5;
const COL_BLOCK: usize = 64;

fn normalize_row(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32]) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = x.iter().sum::<f32>() / c;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / c;
    let rstd = 1.0 / (var + EPS).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * rstd * w + b;
    }
    (mean, rstd)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    resid: Option<&mut [f32]>,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    a: &[f32],
    b: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    c: usize,
) {
    assert_eq!(out.len(), rows * c, "layernorm out");
    assert_eq!(a.len(), rows * c, "layernorm inp");
    assert_eq!((mean.len(), rstd.len()), (rows, rows), "layernorm stats");
    assert_eq!((weight.len(), bias.len()), (c, c), "layernorm params");
    match (resid, b) {
        (Some(resid), Some(b)) => {
            assert_eq!((resid.len(), b.len()), (rows * c, rows * c), "residual");
            out.par_chunks_mut(c)
                .zip(resid.par_chunks_mut(c))
                .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
                .enumerate()
                .for_each(|(i, ((o, r), (mu, rs)))| {
                    let (ra, rb) = (&a[i * c..(i + 1) * c], &b[i * c..(i + 1) * c]);
                    for ((r, &x), &y) in r.iter_mut().zip(ra).zip(rb) {
                        *r = x + y;
                    }
                    (*mu, *rs) = normalize_row(o, r, weight, bias);
                });
        }
        _ => {
            out.par_chunks_mut(c).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).enumerate().for_each(
                |(i, (o, (mu, rs)))| {
                    (*mu, *rs) = normalize_row(o, &a[i * c..(i + 1) * c], weight, bias);
                },
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    c: usize,
) {
    assert_eq!((dinp.len(), dout.len(), inp.len()), (rows * c, rows * c, rows * c), "ln bwd");
    assert_eq!((dweight.len(), dbias.len(), weight.len()), (c, c, c), "ln bwd params");
    assert_eq!((mean.len(), rstd.len()), (rows, rows), "ln bwd stats");
    let cf = c as f32;
    dinp.par_chunks_mut(c).enumerate().for_each(|(i, di)| {
        let (x, g) = (&inp[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c]);
        let (mu, rs) = (mean[i], rstd[i]);
        let mut dnorm_mean = 0.0f32;
        let mut dnorm_norm_mean = 0.0f32;
        for j in 0..c {
            let norm = (x[j] - mu) * rs;
            let dnorm = g[j] * weight[j];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= cf;
        dnorm_norm_mean /= cf;
        for j in 0..c {
            let norm = (x[j] - mu) * rs;
            let dnorm = g[j] * weight[j];
            di[j] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs;
        }
    });
    dweight.par_chunks_mut(COL_BLOCK).zip(dbias.par_chunks_mut(COL_BLOCK)).enumerate().for_each(
        |(blk, (dw, db))| {
            let j0 = blk * COL_BLOCK;
            let w = dw.len();
            for i in 0..rows {
                let (mu, rs) = (mean[i], rstd[i]);
                let x = &inp[i * c + j0..i * c + j0 + w];
                let g = &dout[i * c + j0..i * c + j0 + w];
                for j in 0..w {
                    dw[j] += g[j] * (x[j] - mu) * rs;
                    db[j] += g[j];
                }
            }
        },
    );
}
