//! Naive float64 twins of every CPU kernel: the references the fast kernels are tested against.
//! Written for obviousness, not speed. Same shapes and memory contract as [`super::Backend`].

/// out = inp · wᵀ + b
pub fn matmul_forward(
    out: &mut [f64],
    inp: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = b.map_or(0.0, |b| b[j]);
            for p in 0..k {
                acc += inp[i * k + p] * w[j * k + p];
            }
            out[i * n + j] = acc;
        }
    }
}

/// dinp = dout · w; dw += doutᵀ · inp; db += Σ dout
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f64],
    dw: &mut [f64],
    db: Option<&mut [f64]>,
    dout: &[f64],
    inp: &[f64],
    w: &[f64],
    m: usize,
    k: usize,
    n: usize,
) {
    matmul_backward_input(dinp, dout, w, m, k, n);
    matmul_backward_weight(dw, db, dout, inp, m, k, n);
}

/// dinp = dout · w
pub fn matmul_backward_input(dinp: &mut [f64], dout: &[f64], w: &[f64], m: usize, k: usize, n: usize) {
    for i in 0..m {
        for p in 0..k {
            dinp[i * k + p] = (0..n).map(|j| dout[i * n + j] * w[j * k + p]).sum();
        }
    }
}

/// dw += doutᵀ · inp; db += Σ dout
pub fn matmul_backward_weight(
    dw: &mut [f64],
    db: Option<&mut [f64]>,
    dout: &[f64],
    inp: &[f64],
    m: usize,
    k: usize,
    n: usize,
) {
    for j in 0..n {
        for p in 0..k {
            dw[j * k + p] += (0..m).map(|i| dout[i * n + j] * inp[i * k + p]).sum::<f64>();
        }
    }
    if let Some(db) = db {
        for j in 0..n {
            db[j] += (0..m).map(|i| dout[i * n + j]).sum::<f64>();
        }
    }
}

/// LayerNorm (eps 1e-5) returning (mean, rstd) per row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f64],
    mean: &mut [f64],
    rstd: &mut [f64],
    inp: &[f64],
    w: &[f64],
    b: &[f64],
    rows: usize,
    c: usize,
) {
    for i in 0..rows {
        let x = &inp[i * c..(i + 1) * c];
        let mu = x.iter().sum::<f64>() / c as f64;
        let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + 1e-5).sqrt();
        for j in 0..c {
            out[i * c + j] = (x[j] - mu) * rs * w[j] + b[j];
        }
        mean[i] = mu;
        rstd[i] = rs;
    }
}

/// LayerNorm backward; accumulates into dinp, dw, db.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f64],
    dw: &mut [f64],
    db: &mut [f64],
    dout: &[f64],
    inp: &[f64],
    w: &[f64],
    mean: &[f64],
    rstd: &[f64],
    rows: usize,
    c: usize,
) {
    for i in 0..rows {
        let norm: Vec<f64> = (0..c).map(|j| (inp[i * c + j] - mean[i]) * rstd[i]).collect();
        let dnorm: Vec<f64> = (0..c).map(|j| dout[i * c + j] * w[j]).collect();
        let m1 = dnorm.iter().sum::<f64>() / c as f64;
        let m2 = dnorm.iter().zip(&norm).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for j in 0..c {
            dinp[i * c + j] += (dnorm[j] - m1 - norm[j] * m2) * rstd[i];
            dw[j] += dout[i * c + j] * norm[j];
            db[j] += dout[i * c + j];
        }
    }
}

fn gelu(x: f64) -> f64 {
    let s = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (s * (x + 0.044715 * x * x * x)).tanh())
}

pub fn gelu_forward(out: &mut [f64], inp: &[f64]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = gelu(x);
    }
}

/// Derivative by the closed form, cross-checked against finite differences in tests.
pub fn gelu_backward(dinp: &mut [f64], inp: &[f64], dout: &[f64]) {
    let s = (2.0 / std::f64::consts::PI).sqrt();
    for i in 0..inp.len() {
        let x = inp[i];
        let th = (s * (x + 0.044715 * x * x * x)).tanh();
        let local = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * s * (1.0 + 3.0 * 0.044715 * x * x);
        dinp[i] = local * dout[i];
    }
}

/// Materialises the full T×T probabilities (the reference may; the fast kernel does not).
/// Returns the probabilities `[B,NH,T,T]` for use by [`attention_backward`].
pub fn attention_forward(out: &mut [f64], qkv: &[f64], b: usize, t: usize, c: usize, nh: usize) -> Vec<f64> {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut probs = vec![0.0; b * nh * t * t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = |d: usize| qkv[(bi * t + i) * 3 * c + h * hs + d];
                let mut s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hs).map(|d| q(d) * qkv[(bi * t + j) * 3 * c + c + h * hs + d]).sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - mx).exp();
                        *x
                    })
                    .sum();
                for j in 0..=i {
                    let p = s[j] / sum;
                    probs[((bi * nh + h) * t + i) * t + j] = p;
                }
                for d in 0..hs {
                    out[(bi * t + i) * c + h * hs + d] = (0..=i)
                        .map(|j| {
                            probs[((bi * nh + h) * t + i) * t + j]
                                * qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + d]
                        })
                        .sum();
                }
            }
        }
    }
    probs
}

/// Attention backward from the probabilities returned by [`attention_forward`]; overwrites dqkv.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f64],
    dout: &[f64],
    probs: &[f64],
    qkv: &[f64],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    dqkv.iter_mut().for_each(|x| *x = 0.0);
    for bi in 0..b {
        for h in 0..nh {
            let at = |row: usize, part: usize, d: usize| (bi * t + row) * 3 * c + part * c + h * hs + d;
            for i in 0..t {
                let p = |j: usize| probs[((bi * nh + h) * t + i) * t + j];
                let go = |d: usize| dout[(bi * t + i) * c + h * hs + d];
                let dp: Vec<f64> = (0..=i).map(|j| (0..hs).map(|d| go(d) * qkv[at(j, 2, d)]).sum()).collect();
                let dsum: f64 = (0..=i).map(|j| p(j) * dp[j]).sum();
                for j in 0..=i {
                    for d in 0..hs {
                        dqkv[at(j, 2, d)] += p(j) * go(d);
                    }
                    let ds = p(j) * (dp[j] - dsum) * scale;
                    for d in 0..hs {
                        dqkv[at(i, 0, d)] += ds * qkv[at(j, 1, d)];
                        dqkv[at(j, 1, d)] += ds * qkv[at(i, 0, d)];
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn encoder_forward(
    out: &mut [f64],
    tokens: &[u32],
    wte: &[f64],
    wpe: &[f64],
    b: usize,
    t: usize,
    c: usize,
) {
    for i in 0..b * t {
        let (tok, pos) = (tokens[i] as usize, i % t);
        for j in 0..c {
            out[i * c + j] = wte[tok * c + j] + wpe[pos * c + j];
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn encoder_backward(
    dwte: &mut [f64],
    dwpe: &mut [f64],
    dout: &[f64],
    tokens: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    for i in 0..b * t {
        let (tok, pos) = (tokens[i] as usize, i % t);
        for j in 0..c {
            dwte[tok * c + j] += dout[i * c + j];
            dwpe[pos * c + j] += dout[i * c + j];
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// Per-row losses and dlogits = dloss·(softmax − onehot) over the first v of vp columns.
pub fn crossentropy(
    dlogits: &mut [f64],
    losses: &mut [f64],
    logits: &[f64],
    targets: &[u32],
    rows: usize,
    v: usize,
    vp: usize,
    dloss: f64,
) {
    for i in 0..rows {
        let row = &logits[i * vp..i * vp + v];
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - mx).exp()).sum();
        let tgt = targets[i] as usize;
        losses[i] = mx + sum.ln() - row[tgt];
        for j in 0..vp {
            dlogits[i * vp + j] = if j < v {
                ((row[j] - mx).exp() / sum - if j == tgt { 1.0 } else { 0.0 }) * dloss
            } else {
                0.0
            };
        }
    }
}

/// AdamW (PyTorch semantics) on f64.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    step: u64,
) {
    for i in 0..p.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let mhat = m[i] / (1.0 - b1.powi(step as i32));
        let vhat = v[i] / (1.0 - b2.powi(step as i32));
        p[i] = p[i] * (1.0 - lr * wd) - lr * mhat / (vhat.sqrt() + eps);
    }
}
