//! The kernel interface. Model code calls a [`Backend`] for every numeric operation; the CPU
//! backend ([`CpuBackend`]) is pure Rust, the CUDA backend (a later issue) implements the same
//! trait.
//!
//! Dimension letters used by every kernel: B batch, T sequence, C channels, NH heads,
//! HS head size (C / NH), V vocabulary, Vp padded vocabulary, M/K/N matrix dimensions.
//!
//! Memory contract (as in llm.c): **parameter gradients accumulate** (`+=`) so gradient
//! accumulation over microbatches needs no extra buffer; **activation gradients overwrite** (`=`),
//! except where a kernel says it accumulates into the residual stream (`layernorm_backward`).
//!
//! All buffers are host slices. Shapes are checked by the model before a kernel is called;
//! a kernel given slices of the wrong length panics (an internal bug, never user input).
//!
//! Determinism: every reduction runs in an order fixed by the data shape (fixed-size row chunks,
//! partial sums combined in chunk order), never by the thread count, so results are bitwise
//! identical for any `threads` value.

mod cpu;
pub mod naive;
mod profile;

pub use cpu::CpuBackend;
pub use profile::Profiled;

/// AdamW hyper-parameters for one update of one parameter tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (0 for biases and norms).
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
}

/// Every numeric operation the models need. Implementations must be deterministic.
pub trait Backend: Send + Sync {
    /// A short name for logs and benchmark output ("cpu").
    fn name(&self) -> &'static str;

    /// Number of worker threads the backend uses.
    fn threads(&self) -> usize;

    /// `out[M,N] = inp[M,K] · weight[N,K]ᵀ (+ bias[N])`. Weight is stored `[out, in]` like
    /// `nn.Linear`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    );

    /// Backward of [`Backend::matmul_forward`]: `dinp = dout · weight` (overwrite),
    /// `dweight += doutᵀ · inp`, `dbias += Σ_rows dout`. Bitwise equal to
    /// [`Backend::matmul_backward_input`] followed by [`Backend::matmul_backward_weight`].
    #[allow(clippy::too_many_arguments)]
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
    );

    /// The input half of [`Backend::matmul_backward`]: `dinp[M,K] = dout[M,N] · weight[N,K]`
    /// (overwrite). With [`Backend::matmul_backward_weight`] it must give exactly the bits of the
    /// fused call: zero-bubble pipeline schedules run the two halves at different times.
    fn matmul_backward_input(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        weight: &[f32],
        m: usize,
        k: usize,
        n: usize,
    );

    /// The weight half of [`Backend::matmul_backward`]: `dweight[N,K] += doutᵀ · inp[M,K]`,
    /// `dbias[N] += Σ_rows dout` (accumulate).
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_weight(
        &self,
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        m: usize,
        k: usize,
        n: usize,
    );

    /// LayerNorm over the last dimension C of `rows` rows (eps 1e-5). Writes `out`, and the
    /// per-row `mean` and `rstd` that backward needs.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// Fused residual add and LayerNorm: `resid = a + b`, then `out = LN(resid)`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// LayerNorm backward. **Accumulates** into `dinp` (it sits on the residual stream),
    /// `dweight` and `dbias`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// GELU, tanh approximation (GPT-2's `gelu_new`).
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]);

    /// `dinp = gelu'(inp) · dout` (overwrite).
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]);

    /// Causal self-attention from the fused `qkv[B,T,3C]` (Q | K | V, heads contiguous inside
    /// each). Writes `out[B,T,C]` and `lse[B,NH,T]`, the log-sum-exp of each softmax row: that is
    /// all backward keeps; the T×T probabilities are recomputed there.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    );

    /// Attention backward; overwrites `dqkv[B,T,3C]`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// One decoding step of causal attention for a single new position: `q[C]` attends to the
    /// cached keys and values `k_cache[0..len, C]`, `v_cache[0..len, C]` (the new position's own
    /// key and value already appended). Writes `out[C]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        len: usize,
        c: usize,
        nh: usize,
    );

    /// `out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]`. Token ids must be `< rows(wte)`.
    #[allow(clippy::too_many_arguments)]
    fn encoder_forward(
        &self,
        out: &mut [f32],
        tokens: &[u32],
        wte: &[f32],
        wpe: &[f32],
        b: usize,
        t: usize,
        c: usize,
    );

    /// Embedding backward, deterministic: `dwte[tok] += dout`, `dwpe[t] += Σ_b dout`.
    #[allow(clippy::too_many_arguments)]
    fn encoder_backward(
        &self,
        dwte: &mut [f32],
        dwpe: &mut [f32],
        dout: &[f32],
        tokens: &[u32],
        b: usize,
        t: usize,
        c: usize,
    );

    /// Fused softmax + cross-entropy over `rows` rows of `logits[rows, vp]`, of which only the
    /// first `v` columns are real (padded columns are excluded). Writes each row's loss to
    /// `losses` and **replaces the logits by dlogits** = `dloss · (softmax − onehot)` (0 in padded
    /// columns). No separate probability tensor exists.
    #[allow(clippy::too_many_arguments)]
    fn crossentropy_forward_backward(
        &self,
        logits: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
        rows: usize,
        v: usize,
        vp: usize,
        dloss: f32,
    );

    /// Softmax cross-entropy losses only (evaluation): logits are left unchanged.
    fn crossentropy_forward(
        &self,
        losses: &mut [f32],
        logits: &[f32],
        targets: &[u32],
        rows: usize,
        v: usize,
        vp: usize,
    );

    /// One AdamW update of a parameter tensor and its moments (decoupled weight decay, bias
    /// correction, PyTorch semantics).
    fn adamw(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep);

    /// Σ x², accumulated in f64 in a fixed order.
    fn sum_squares(&self, x: &[f32]) -> f64;

    /// `x *= s`.
    fn scale(&self, x: &mut [f32], s: f32);

    /// `dst += src`.
    fn add_assign(&self, dst: &mut [f32], src: &[f32]);
}
