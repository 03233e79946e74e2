//! Every CPU kernel against its naive float64 twin on random data, including awkward shapes
//! (T and C not multiples of 8, one head, batch 1), plus bitwise independence of the thread
//! count.
//!
//! Tolerance: max |fast − ref| / max(|ref|, 1e-3) ≤ 2e-5 (1e-4 for attention backward and AdamW
//! with tiny denominators). The fast kernels compute in f32 with sums of up to a few hundred
//! terms; f32 rounding of such sums stays below ~1e-6 relative per term, so these bounds leave
//! room for reordering while catching any indexing or formula error (which gives O(1) errors).

use troupe::kernels::{AdamWStep, Backend, CpuBackend, naive};
use troupe::models::Rng;

fn rand_vec(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn up(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max_ref = want.iter().fold(0.0f64, |a, b| a.max(b.abs())).max(1e-3);
    let max_err = got.iter().zip(want).fold(0.0f64, |a, (g, w)| a.max((f64::from(*g) - w).abs()));
    assert!(max_err / max_ref <= tol, "{what}: max err {max_err:e} vs max ref {max_ref:e} (tol {tol:e})");
}

const SHAPES: &[(usize, usize, usize, usize)] = &[
    // (B, T, C, NH)
    (1, 1, 8, 1),
    (1, 7, 12, 1),
    (2, 13, 20, 5),
    (3, 67, 24, 3),
    (2, 130, 32, 4),
];

#[test]
fn matmul_matches_naive() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(1);
    for &(m, k, n) in &[(1, 1, 1), (7, 13, 5), (33, 20, 67), (130, 48, 96)] {
        let inp = rand_vec(&mut rng, m * k, 1.0);
        let w = rand_vec(&mut rng, n * k, 1.0);
        let b = rand_vec(&mut rng, n, 1.0);
        let mut out = vec![0.0; m * n];
        be.matmul_forward(&mut out, &inp, &w, Some(&b), m, k, n);
        let mut want = vec![0.0; m * n];
        naive::matmul_forward(&mut want, &up(&inp), &up(&w), Some(&up(&b)), m, k, n);
        assert_close("matmul out", &out, &want, 2e-5);

        let dout = rand_vec(&mut rng, m * n, 1.0);
        let (mut dinp, mut dw, mut db) =
            (vec![9.0; m * k], rand_vec(&mut rng, n * k, 1.0), rand_vec(&mut rng, n, 1.0));
        let (mut rdinp, mut rdw, mut rdb) = (vec![0.0; m * k], up(&dw), up(&db));
        be.matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dout, &inp, &w, m, k, n);
        naive::matmul_backward(&mut rdinp, &mut rdw, Some(&mut rdb), &up(&dout), &up(&inp), &up(&w), m, k, n);
        assert_close("matmul dinp", &dinp, &rdinp, 2e-5);
        assert_close("matmul dweight (accumulated)", &dw, &rdw, 2e-5);
        assert_close("matmul dbias (accumulated)", &db, &rdb, 2e-5);
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The split halves (zero-bubble "I" and "W") give the fused `matmul_backward`'s bits, in either
/// order, with and without a bias, and each half matches its naive twin.
#[test]
fn matmul_split_backward_equals_fused_bitwise() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(11);
    for &(m, k, n) in &[(1, 1, 1), (7, 13, 5), (33, 20, 67), (130, 48, 96), (257, 72, 130)] {
        let inp = rand_vec(&mut rng, m * k, 1.0);
        let w = rand_vec(&mut rng, n * k, 1.0);
        let dout = rand_vec(&mut rng, m * n, 1.0);
        // Non-zero starting gradients, so accumulation (not overwrite) is what is compared.
        let (dw0, db0) = (rand_vec(&mut rng, n * k, 1.0), rand_vec(&mut rng, n, 1.0));
        for with_bias in [true, false] {
            let (mut dinp, mut dw, mut db) = (vec![9.0; m * k], dw0.clone(), db0.clone());
            be.matmul_backward(
                &mut dinp,
                &mut dw,
                with_bias.then_some(&mut db[..]),
                &dout,
                &inp,
                &w,
                m,
                k,
                n,
            );
            for weight_first in [false, true] {
                let (mut sdinp, mut sdw, mut sdb) = (vec![-3.0; m * k], dw0.clone(), db0.clone());
                if weight_first {
                    be.matmul_backward_weight(
                        &mut sdw,
                        with_bias.then_some(&mut sdb[..]),
                        &dout,
                        &inp,
                        m,
                        k,
                        n,
                    );
                    be.matmul_backward_input(&mut sdinp, &dout, &w, m, k, n);
                } else {
                    be.matmul_backward_input(&mut sdinp, &dout, &w, m, k, n);
                    be.matmul_backward_weight(
                        &mut sdw,
                        with_bias.then_some(&mut sdb[..]),
                        &dout,
                        &inp,
                        m,
                        k,
                        n,
                    );
                }
                let what = format!("({m},{k},{n}) bias {with_bias} weight first {weight_first}");
                assert!(bits(&sdinp) == bits(&dinp), "{what}: dinp differs from the fused call");
                assert!(bits(&sdw) == bits(&dw), "{what}: dweight differs from the fused call");
                assert!(bits(&sdb) == bits(&db), "{what}: dbias differs from the fused call");
            }
        }
        let (mut rdinp, mut rdw, mut rdb) = (vec![0.0; m * k], up(&dw0), up(&db0));
        naive::matmul_backward_input(&mut rdinp, &up(&dout), &up(&w), m, k, n);
        naive::matmul_backward_weight(&mut rdw, Some(&mut rdb), &up(&dout), &up(&inp), m, k, n);
        let (mut dinp, mut dw, mut db) = (vec![0.0; m * k], dw0.clone(), db0.clone());
        be.matmul_backward_input(&mut dinp, &dout, &w, m, k, n);
        be.matmul_backward_weight(&mut dw, Some(&mut db), &dout, &inp, m, k, n);
        assert_close("split dinp", &dinp, &rdinp, 2e-5);
        assert_close("split dweight", &dw, &rdw, 2e-5);
        assert_close("split dbias", &db, &rdb, 2e-5);
    }
}

#[test]
fn layernorm_matches_naive() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(2);
    for &(b, t, c, _) in SHAPES {
        let rows = b * t;
        let (x, y) = (rand_vec(&mut rng, rows * c, 2.0), rand_vec(&mut rng, rows * c, 1.0));
        let (w, bias) = (rand_vec(&mut rng, c, 1.0), rand_vec(&mut rng, c, 1.0));
        let (mut out, mut mean, mut rstd, mut resid) =
            (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * c]);
        be.residual_layernorm_forward(&mut resid, &mut out, &mut mean, &mut rstd, &x, &y, &w, &bias, rows, c);
        let sum: Vec<f64> = x.iter().zip(&y).map(|(a, b)| f64::from(*a) + f64::from(*b)).collect();
        assert_close("residual", &resid, &sum, 1e-6);
        let (mut rout, mut rmean, mut rrstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
        naive::layernorm_forward(&mut rout, &mut rmean, &mut rrstd, &sum, &up(&w), &up(&bias), rows, c);
        assert_close("ln out", &out, &rout, 2e-5);
        assert_close("ln rstd", &rstd, &rrstd, 2e-5);
        let mut out2 = vec![0.0; rows * c];
        be.layernorm_forward(&mut out2, &mut mean, &mut rstd, &resid, &w, &bias, rows, c);
        assert_eq!(out, out2, "fused and plain layernorm agree bitwise");

        let dout = rand_vec(&mut rng, rows * c, 1.0);
        let (mut dinp, mut dw, mut db) =
            (rand_vec(&mut rng, rows * c, 1.0), rand_vec(&mut rng, c, 1.0), rand_vec(&mut rng, c, 1.0));
        let (mut rdinp, mut rdw, mut rdb) = (up(&dinp), up(&dw), up(&db));
        be.layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &resid, &w, &mean, &rstd, rows, c);
        naive::layernorm_backward(
            &mut rdinp,
            &mut rdw,
            &mut rdb,
            &up(&dout),
            &sum,
            &up(&w),
            &rmean,
            &rrstd,
            rows,
            c,
        );
        assert_close("ln dinp (accumulated)", &dinp, &rdinp, 2e-5);
        assert_close("ln dweight", &dw, &rdw, 2e-5);
        assert_close("ln dbias", &db, &rdb, 2e-5);
    }
}

#[test]
fn gelu_matches_naive_and_finite_differences() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(3);
    let x = rand_vec(&mut rng, 1001, 3.0);
    let mut out = vec![0.0; x.len()];
    be.gelu_forward(&mut out, &x);
    let mut want = vec![0.0; x.len()];
    naive::gelu_forward(&mut want, &up(&x));
    assert_close("gelu", &out, &want, 2e-6);
    let g = rand_vec(&mut rng, x.len(), 1.0);
    let mut d = vec![0.0; x.len()];
    be.gelu_backward(&mut d, &x, &g);
    let mut rd = vec![0.0; x.len()];
    naive::gelu_backward(&mut rd, &up(&x), &up(&g));
    assert_close("gelu backward", &d, &rd, 2e-6);
    // The closed-form reference itself against central differences in f64.
    let h = 1e-6;
    for &xi in up(&x).iter().take(50) {
        let (mut a, mut b) = ([0.0], [0.0]);
        naive::gelu_forward(&mut a, &[xi + h]);
        naive::gelu_forward(&mut b, &[xi - h]);
        let mut dd = [0.0];
        naive::gelu_backward(&mut dd, &[xi], &[1.0]);
        assert!(((a[0] - b[0]) / (2.0 * h) - dd[0]).abs() < 1e-6);
    }
}

#[test]
fn attention_matches_naive() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(4);
    for &(b, t, c, nh) in SHAPES {
        let qkv = rand_vec(&mut rng, b * t * 3 * c, 1.0);
        let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
        be.attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh);
        let mut rout = vec![0.0; b * t * c];
        let probs = naive::attention_forward(&mut rout, &up(&qkv), b, t, c, nh);
        assert_close("attention out", &out, &rout, 2e-5);
        let dout = rand_vec(&mut rng, b * t * c, 1.0);
        let mut dqkv = vec![7.0; b * t * 3 * c];
        be.attention_backward(&mut dqkv, &dout, &out, &lse, &qkv, b, t, c, nh);
        let mut rdqkv = vec![0.0; b * t * 3 * c];
        naive::attention_backward(&mut rdqkv, &up(&dout), &probs, &up(&qkv), b, t, c, nh);
        assert_close(&format!("attention dqkv {b}x{t}x{c}/{nh}"), &dqkv, &rdqkv, 1e-4);
    }
}

#[test]
fn encoder_matches_naive() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(5);
    for &(b, t, c, _) in SHAPES {
        let vp = 37;
        let tokens: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 5) as u32).collect();
        let (wte, wpe) = (rand_vec(&mut rng, vp * c, 1.0), rand_vec(&mut rng, t * c, 1.0));
        let mut out = vec![0.0; b * t * c];
        be.encoder_forward(&mut out, &tokens, &wte, &wpe, b, t, c);
        let mut rout = vec![0.0; b * t * c];
        naive::encoder_forward(&mut rout, &tokens, &up(&wte), &up(&wpe), b, t, c);
        assert_close("encoder", &out, &rout, 1e-7);
        let dout = rand_vec(&mut rng, b * t * c, 1.0);
        let (mut dwte, mut dwpe) = (rand_vec(&mut rng, vp * c, 1.0), rand_vec(&mut rng, t * c, 1.0));
        let (mut rdwte, mut rdwpe) = (up(&dwte), up(&dwpe));
        be.encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, b, t, c);
        naive::encoder_backward(&mut rdwte, &mut rdwpe, &up(&dout), &tokens, b, t, c);
        assert_close("dwte", &dwte, &rdwte, 2e-6);
        assert_close("dwpe", &dwpe, &rdwpe, 2e-6);
    }
}

#[test]
fn crossentropy_matches_naive_and_ignores_padding() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(6);
    for &(rows, v, vp) in &[(1, 1, 1), (5, 13, 16), (37, 100, 128)] {
        let mut logits = rand_vec(&mut rng, rows * vp, 3.0);
        for r in 0..rows {
            for j in v..vp {
                logits[r * vp + j] = 1e4; // padded columns must not matter
            }
        }
        let targets: Vec<u32> = (0..rows).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        let mut losses = vec![0.0; rows];
        let mut fwd_only = vec![0.0; rows];
        be.crossentropy_forward(&mut fwd_only, &logits, &targets, rows, v, vp);
        let mut rd = vec![0.0; rows * vp];
        let mut rl = vec![0.0; rows];
        naive::crossentropy(&mut rd, &mut rl, &up(&logits), &targets, rows, v, vp, 0.25);
        be.crossentropy_forward_backward(&mut logits, &mut losses, &targets, rows, v, vp, 0.25);
        assert_close("losses", &losses, &rl, 2e-6);
        assert_eq!(losses, fwd_only, "forward-only and fused losses agree bitwise");
        assert_close("dlogits", &logits, &rd, 2e-6);
    }
}

#[test]
fn adamw_and_norm_match_naive() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(7);
    let n = 40_001;
    let (mut p, g) = (rand_vec(&mut rng, n, 1.0), rand_vec(&mut rng, n, 1.0));
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (mut rp, rg, mut rm, mut rv) = (up(&p), up(&g), vec![0.0; n], vec![0.0; n]);
    for step in 1..=3 {
        let h = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step };
        be.adamw(&mut p, &g, &mut m, &mut v, h);
        naive::adamw(&mut rp, &rg, &mut rm, &mut rv, 1e-2, 0.9, 0.95, 1e-8, 0.1, step);
    }
    assert_close("adamw params", &p, &rp, 1e-5);
    let ss = be.sum_squares(&g);
    let rss: f64 = rg.iter().map(|x| x * x).sum();
    assert!((ss - rss).abs() / rss < 1e-12);
}

/// Every kernel gives the same bits with 1, 2 and 3 threads.
#[test]
fn results_do_not_depend_on_thread_count() {
    let (b, t, c, nh) = (2, 70, 40, 4);
    let run = |threads: usize| {
        let be = CpuBackend::new(threads);
        let mut rng = Rng::new(8);
        let (m, k, n) = (b * t, c, 3 * c);
        let inp = rand_vec(&mut rng, m * k, 1.0);
        let w = rand_vec(&mut rng, n * k, 1.0);
        let mut qkv = vec![0.0; m * n];
        be.matmul_forward(&mut qkv, &inp, &w, None, m, k, n);
        let (mut out, mut lse) = (vec![0.0; m * c], vec![0.0; b * nh * t]);
        be.attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh);
        let mut dqkv = vec![0.0; m * n];
        be.attention_backward(&mut dqkv, &out, &out, &lse, &qkv, b, t, c, nh);
        let (mut dinp, mut dw, mut db) = (vec![0.0; m * k], vec![0.0; n * k], vec![0.0; n]);
        be.matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dqkv, &inp, &w, m, k, n);
        let (mut ln, mut mean, mut rstd) = (vec![0.0; m * c], vec![0.0; m], vec![0.0; m]);
        let ones = vec![1.0; c];
        be.layernorm_forward(&mut ln, &mut mean, &mut rstd, &dinp, &ones, &ones, m, c);
        let (mut d2, mut dw2, mut db2) = (vec![0.0; m * c], vec![0.0; c], vec![0.0; c]);
        be.layernorm_backward(&mut d2, &mut dw2, &mut db2, &ln, &dinp, &ones, &mean, &rstd, m, c);
        let ss = be.sum_squares(&dw);
        (out, dqkv, dinp, dw, db, d2, dw2, db2, ss.to_bits())
    };
    let one = run(1);
    assert!(one == run(2), "2 threads differ from 1");
    assert!(one == run(3), "3 threads differ from 1");
}
