//! A [`Backend`] decorator that times every kernel call, for the per-kernel breakdown of
//! `troupe bench train --profile`. Costs two clock reads per call; not used unless asked for.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{AdamWStep, Backend};

/// Wraps a backend and accumulates (calls, time) per kernel name.
#[derive(Debug)]
pub struct Profiled<B> {
    inner: B,
    stats: Mutex<BTreeMap<&'static str, (u64, Duration)>>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Self { inner, stats: Mutex::new(BTreeMap::new()) }
    }

    fn time<R>(&self, name: &'static str, f: impl FnOnce(&B) -> R) -> R {
        let t0 = Instant::now();
        let r = f(&self.inner);
        let dt = t0.elapsed();
        if let Ok(mut s) = self.stats.lock() {
            let e = s.entry(name).or_default();
            e.0 += 1;
            e.1 += dt;
        }
        r
    }

    /// (kernel, calls, total time) sorted by time, descending.
    pub fn report(&self) -> Vec<(&'static str, u64, Duration)> {
        let mut v: Vec<_> = match self.stats.lock() {
            Ok(s) => s.iter().map(|(k, (n, d))| (*k, *n, *d)).collect(),
            Err(_) => Vec::new(),
        };
        v.sort_by_key(|e| std::cmp::Reverse(e.2));
        v
    }

    pub fn reset(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.clear();
        }
    }
}

impl<B: Backend> Backend for Profiled<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn threads(&self) -> usize {
        self.inner.threads()
    }
    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        self.time("matmul_forward", |be| be.matmul_forward(out, inp, w, b, m, k, n))
    }
    fn matmul_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        self.time("matmul_backward", |be| be.matmul_backward(dinp, dw, db, dout, inp, w, m, k, n))
    }
    fn matmul_backward_input(&self, dinp: &mut [f32], dout: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
        self.time("matmul_backward_input", |be| be.matmul_backward_input(dinp, dout, w, m, k, n))
    }
    fn matmul_backward_weight(
        &self,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        self.time("matmul_backward_weight", |be| be.matmul_backward_weight(dw, db, dout, inp, m, k, n))
    }
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
        rows: usize,
        c: usize,
    ) {
        self.time("layernorm_forward", |be| be.layernorm_forward(out, mean, rstd, inp, w, b, rows, c))
    }
    fn residual_layernorm_forward(
        &self,
        resid: &mut [f32],
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        a: &[f32],
        b: &[f32],
        w: &[f32],
        bias: &[f32],
        rows: usize,
        c: usize,
    ) {
        self.time("layernorm_forward", |be| {
            be.residual_layernorm_forward(resid, out, mean, rstd, a, b, w, bias, rows, c)
        })
    }
    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        rows: usize,
        c: usize,
    ) {
        self.time("layernorm_backward", |be| {
            be.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, rows, c)
        })
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        self.time("gelu_forward", |be| be.gelu_forward(out, inp))
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        self.time("gelu_backward", |be| be.gelu_backward(dinp, inp, dout))
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) {
        self.time("attention_forward", |be| be.attention_forward(out, lse, qkv, b, t, c, nh))
    }
    fn attention_backward(
        &self,
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
        self.time("attention_backward", |be| be.attention_backward(dqkv, dout, out, lse, qkv, b, t, c, nh))
    }
    fn attention_decode(
        &self,
        out: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        len: usize,
        c: usize,
        nh: usize,
    ) {
        self.time("attention_decode", |be| be.attention_decode(out, q, k, v, len, c, nh))
    }
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: &[f32],
        b: usize,
        t: usize,
        c: usize,
    ) {
        self.time("encoder_forward", |be| be.encoder_forward(out, tokens, wte, wpe, b, t, c))
    }
    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: &mut [f32],
        dout: &[f32],
        tokens: &[u32],
        b: usize,
        t: usize,
        c: usize,
    ) {
        self.time("encoder_backward", |be| be.encoder_backward(dwte, dwpe, dout, tokens, b, t, c))
    }
    fn crossentropy_forward_backward(
        &self,
        logits: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
        rows: usize,
        v: usize,
        vp: usize,
        dloss: f32,
    ) {
        self.time("crossentropy", |be| {
            be.crossentropy_forward_backward(logits, losses, targets, rows, v, vp, dloss)
        })
    }
    fn crossentropy_forward(
        &self,
        losses: &mut [f32],
        logits: &[f32],
        targets: &[u32],
        rows: usize,
        v: usize,
        vp: usize,
    ) {
        self.time("crossentropy", |be| be.crossentropy_forward(losses, logits, targets, rows, v, vp))
    }
    fn adamw(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
        self.time("adamw", |be| be.adamw(p, g, m, v, h))
    }
    fn sum_squares(&self, x: &[f32]) -> f64 {
        self.time("grad_norm", |be| be.sum_squares(x))
    }
    fn scale(&self, x: &mut [f32], s: f32) {
        self.time("grad_clip", |be| be.scale(x, s))
    }
    fn add_assign(&self, dst: &mut [f32], src: &[f32]) {
        self.time("residual_add", |be| be.add_assign(dst, src))
    }
}
