//! The CPU backend: matrix products through the `gemm` crate, everything else as cache-friendly
//! loops parallelised with a private rayon pool of `threads` workers.
//!
//! Determinism: parallel work is split by the data shape (rows, fixed column blocks, (b, h)
//! pairs), never by the number of threads, and no reduction is split across workers, so the
//! result is bitwise the same for any thread count (tested in `tests/kernels_cpu.rs`).

mod attention;
mod elementwise;
mod fastmath;
mod matmul;
mod norm;

use super::{AdamWStep, Backend};

/// The pure-Rust CPU backend. Cheap to share by reference; owns its thread pool.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend").field("threads", &self.threads).finish()
    }
}

impl CpuBackend {
    /// A backend with `threads` workers (0 means one per available core).
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            threads
        };
        // Building a pool only fails when the OS refuses to spawn threads; fall back to the
        // caller's thread then (one worker), which keeps results identical.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("troupe-cpu-{i}"))
            .build()
            .or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build());
        match pool {
            Ok(pool) => Self { pool, threads },
            Err(_) => Self { pool: single_thread_pool(), threads: 1 },
        }
    }
}

fn single_thread_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
        .expect("a one-thread pool on the current thread needs no new OS thread")
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let par = self.threads;
        self.pool.install(|| matmul::forward(out, inp, weight, bias, m, k, n, par));
    }

    fn matmul_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        let par = self.threads;
        self.pool.install(|| matmul::backward(dinp, dweight, dbias, dout, inp, weight, m, k, n, par));
    }

    fn matmul_backward_input(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        weight: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        let par = self.threads;
        self.pool.install(|| matmul::backward_input(dinp, dout, weight, m, k, n, par));
    }

    fn matmul_backward_weight(
        &self,
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        let par = self.threads;
        self.pool.install(|| matmul::backward_weight(dweight, dbias, dout, inp, m, k, n, par));
    }

    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        rows: usize,
        c: usize,
    ) {
        self.pool.install(|| norm::forward(None, out, mean, rstd, inp, None, weight, bias, rows, c));
    }

    fn residual_layernorm_forward(
        &self,
        resid: &mut [f32],
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        a: &[f32],
        b: &[f32],
        weight: &[f32],
        bias: &[f32],
        rows: usize,
        c: usize,
    ) {
        self.pool.install(|| norm::forward(Some(resid), out, mean, rstd, a, Some(b), weight, bias, rows, c));
    }

    fn layernorm_backward(
        &self,
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
        self.pool.install(|| norm::backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, c));
    }

    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        self.pool.install(|| elementwise::gelu_forward(out, inp));
    }

    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        self.pool.install(|| elementwise::gelu_backward(dinp, inp, dout));
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
        self.pool.install(|| attention::forward(out, lse, qkv, b, t, c, nh));
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
        self.pool.install(|| attention::backward(dqkv, dout, out, lse, qkv, b, t, c, nh));
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
        attention::decode(out, q, k, v, len, c, nh);
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
        self.pool.install(|| elementwise::encoder_forward(out, tokens, wte, wpe, b, t, c));
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
        self.pool.install(|| elementwise::encoder_backward(dwte, dwpe, dout, tokens, b, t, c));
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
        self.pool.install(|| elementwise::crossentropy_fused(logits, losses, targets, rows, v, vp, dloss));
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
        self.pool.install(|| elementwise::crossentropy_forward(losses, logits, targets, rows, v, vp));
    }

    fn adamw(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
        self.pool.install(|| elementwise::adamw(params, grads, m, v, h));
    }

    fn sum_squares(&self, x: &[f32]) -> f64 {
        self.pool.install(|| elementwise::sum_squares(x))
    }

    fn scale(&self, x: &mut [f32], s: f32) {
        self.pool.install(|| elementwise::scale(x, s));
    }

    fn add_assign(&self, dst: &mut [f32], src: &[f32]) {
        self.pool.install(|| elementwise::add_assign(dst, src));
    }
}
