//! GPT on a [`Gpu`]: the same model as `crate::models::gpt::Gpt` (same parameter table and
//! initialisation, same sequence of operations), with parameters, gradients, optimizer state and
//! activations in device memory.
//!
//! Precision: with [`DType::Bf16`] the parameters the kernels read, the activations and the
//! activation gradients are bf16; parameter gradients are fp32 (accumulated in fp32 over the
//! microbatches and all-reduced in fp32, Megatron's main grads), fp32 master weights and fp32
//! AdamW moments are kept beside them and the update writes a fresh bf16 copy; statistics
//! (LayerNorm mean/rstd, attention log-sum-exp, losses) and every reduction are fp32 (the gradient
//! norm f64). With [`DType::F32`] everything
//! is fp32 and the master weights are the parameters: that mode is for parity with the CPU model.
//!
//! One microbatch is in flight at a time (forward, then its backward); gradients accumulate over
//! microbatches until [`GpuGpt::zero_grads`]. All work is queued on the GPU's compute stream;
//! only the loss (N floats) and the gradient norm (one f64) come back to the host each step.

use super::ops::{attention, crossentropy, embedding, gelu, layernorm, optim};
use super::{DType, Dev, Gemm, Gpu, GpuError, download_f32, encode};
use crate::kernels::AdamWStep;
use crate::models::gpt::{Gpt, GptConfig, LayerRange, param_table};
use crate::models::params::{ParamTable, Span};
use crate::optim::AdamWConfig;

/// The callback of [`GpuGpt::backward_with`]: an arena range whose gradient is complete, and the
/// gradient buffer.
pub type GradsReady<'a, B> = dyn FnMut(std::ops::Range<usize>, &B) -> Result<(), GpuError> + 'a;

/// Spans of one transformer block in the parameter arena.
#[derive(Debug, Clone, Copy)]
struct Block {
    ln1_w: Span,
    ln1_b: Span,
    qkv_w: Span,
    qkv_b: Span,
    proj_w: Span,
    proj_b: Span,
    ln2_w: Span,
    ln2_b: Span,
    fc_w: Span,
    fc_b: Span,
    fcproj_w: Span,
    fcproj_b: Span,
}

/// Activations of one layer for the microbatch in flight.
struct LayerBufs<B> {
    ln1: B,
    ln1_mean: B,
    ln1_rstd: B,
    qkv: B,
    atty: B,
    lse: B,
    resid2: B,
    ln2: B,
    ln2_mean: B,
    ln2_rstd: B,
    fch: B,
    fch_gelu: B,
    out: B,
}

/// Everything sized by the microbatch shape (B, T).
struct Acts<B> {
    batch: usize,
    seq: usize,
    input: B,
    layers: Vec<LayerBufs<B>>,
    lnf: B,
    lnf_mean: B,
    lnf_rstd: B,
    /// Logits, then dlogits after the fused cross-entropy.
    logits: B,
    losses: B,
    targets: B,
    tokens: B,
    host_tokens: Vec<u32>,
    // Backward scratch.
    dres: B,
    dln: B,
    datty: B,
    dqkv: B,
    dbig1: B,
    dbig2: B,
    tmp: B,
    dsum: B,
    ln_scratch: B,
    bias_scratch: B,
    emb_workspace: B,
}

/// A whole GPT (embedding, blocks, tied head) on one GPU.
pub struct GpuGpt<'g, G: Gpu> {
    gpu: &'g G,
    cfg: GptConfig,
    dtype: DType,
    table: ParamTable,
    wte: Span,
    wpe: Span,
    lnf_w: Span,
    lnf_b: Span,
    blocks: Vec<Block>,
    /// Parameters as the kernels read them (`dtype`).
    params: G::Buf,
    /// fp32 master weights in bf16 mode (`None` in fp32 mode: `params` are the master).
    master: Option<G::Buf>,
    grads: G::Buf,
    m: G::Buf,
    v: G::Buf,
    norm_scratch: G::Buf,
    adam_steps: u64,
    acts: Option<Acts<G::Buf>>,
    /// A forward ran whose backward has not.
    pending_backward: bool,
}

fn span(table: &ParamTable, name: &str) -> Result<Span, GpuError> {
    table.get(name).map(|s| s.span).ok_or_else(|| GpuError::Shape {
        op: "GpuGpt",
        detail: format!("the parameter table has no `{name}`"),
    })
}

fn model_err(e: crate::models::gpt::ModelError) -> GpuError {
    GpuError::Shape { op: "GpuGpt", detail: e.to_string() }
}

impl<'g, G: Gpu> GpuGpt<'g, G> {
    /// The model initialised from `seed` exactly as the CPU model is (initialised on the host,
    /// then uploaded).
    ///
    /// # Errors
    /// An invalid configuration, a head size above [`attention::MAX_HEAD_SIZE`], out of device
    /// memory.
    pub fn new(gpu: &'g G, cfg: &GptConfig, seed: u64, dtype: DType) -> Result<Self, GpuError> {
        let cpu = Gpt::new(cfg, seed).map_err(model_err)?;
        Self::from_params(gpu, cfg, cpu.params(), dtype)
    }

    /// The model with the given parameter arena (the CPU model's order; e.g. from a checkpoint).
    ///
    /// # Errors
    /// As [`GpuGpt::new`], and a parameter arena of the wrong length.
    pub fn from_params(gpu: &'g G, cfg: &GptConfig, host: &[f32], dtype: DType) -> Result<Self, GpuError> {
        cfg.validate().map_err(model_err)?;
        let hs = cfg.head_size();
        if hs == 0 || hs > attention::MAX_HEAD_SIZE {
            return Err(GpuError::Shape {
                op: "GpuGpt",
                detail: format!(
                    "head size {hs} (hidden {} / {} heads) has no attention kernel; supported: 1 to {}",
                    cfg.hidden_size,
                    cfg.num_attention_heads,
                    attention::MAX_HEAD_SIZE
                ),
            });
        }
        let table = param_table(cfg, LayerRange::full(cfg));
        if host.len() != table.len() {
            return Err(GpuError::Shape {
                op: "GpuGpt",
                detail: format!("{} parameters given, the model has {}", host.len(), table.len()),
            });
        }
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let s = |n: &str| span(&table, &format!("h.{i}.{n}"));
                Ok(Block {
                    ln1_w: s("ln_1.weight")?,
                    ln1_b: s("ln_1.bias")?,
                    qkv_w: s("attn.qkv.weight")?,
                    qkv_b: s("attn.qkv.bias")?,
                    proj_w: s("attn.proj.weight")?,
                    proj_b: s("attn.proj.bias")?,
                    ln2_w: s("ln_2.weight")?,
                    ln2_b: s("ln_2.bias")?,
                    fc_w: s("mlp.fc.weight")?,
                    fc_b: s("mlp.fc.bias")?,
                    fcproj_w: s("mlp.proj.weight")?,
                    fcproj_b: s("mlp.proj.bias")?,
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        let n = table.len();
        let mut params = gpu.alloc(n * dtype.size())?;
        gpu.upload(&mut params, 0, &encode(host, dtype))?;
        let master = if dtype == DType::F32 {
            None
        } else {
            let mut m = gpu.alloc(n * 4)?;
            gpu.upload(&mut m, 0, bytemuck::cast_slice(host))?;
            Some(m)
        };
        let norm_bytes = optim::sum_squares_scratch_bytes(table.specs().iter().map(|s| s.span.len));
        Ok(GpuGpt {
            gpu,
            cfg: cfg.clone(),
            dtype,
            wte: span(&table, "wte")?,
            wpe: span(&table, "wpe")?,
            lnf_w: span(&table, "ln_f.weight")?,
            lnf_b: span(&table, "ln_f.bias")?,
            blocks,
            grads: gpu.alloc(n * 4)?,
            m: gpu.alloc(n * 4)?,
            v: gpu.alloc(n * 4)?,
            norm_scratch: gpu.alloc(norm_bytes)?,
            table,
            params,
            master,
            adam_steps: 0,
            acts: None,
            pending_backward: false,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The GPU the model lives on.
    pub fn gpu(&self) -> &'g G {
        self.gpu
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The parameter table (names, shapes, arena order — the CPU model's).
    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// Number of AdamW updates applied.
    pub fn steps(&self) -> u64 {
        self.adam_steps
    }

    /// The (master) parameters as fp32, in the CPU model's arena order.
    pub fn params_host(&self) -> Result<Vec<f32>, GpuError> {
        match &self.master {
            Some(m) => download_f32(self.gpu, Dev::new(m), self.table.len(), DType::F32),
            None => download_f32(self.gpu, Dev::new(&self.params), self.table.len(), DType::F32),
        }
    }

    /// Storage type of the parameter gradients (always fp32).
    pub fn grad_dtype(&self) -> DType {
        DType::F32
    }

    /// The accumulated gradients (fp32).
    pub fn grads_host(&self) -> Result<Vec<f32>, GpuError> {
        download_f32(self.gpu, Dev::new(&self.grads), self.table.len(), DType::F32)
    }

    /// The AdamW moments (m, v) as fp32.
    pub fn moments_host(&self) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        let n = self.table.len();
        Ok((
            download_f32(self.gpu, Dev::new(&self.m), n, DType::F32)?,
            download_f32(self.gpu, Dev::new(&self.v), n, DType::F32)?,
        ))
    }

    /// Replaces the AdamW state (resuming from a checkpoint): moments and the update count.
    pub fn set_optimizer_state(&mut self, m: &[f32], v: &[f32], steps: u64) -> Result<(), GpuError> {
        let n = self.table.len();
        if m.len() != n || v.len() != n {
            return Err(GpuError::Shape {
                op: "set_optimizer_state",
                detail: format!("moments of {} and {} values for {n} parameters", m.len(), v.len()),
            });
        }
        self.gpu.upload(&mut self.m, 0, bytemuck::cast_slice(m))?;
        self.gpu.upload(&mut self.v, 0, bytemuck::cast_slice(v))?;
        self.adam_steps = steps;
        Ok(())
    }

    fn p(&self, s: Span) -> Dev<'_, G::Buf> {
        Dev::new(&self.params).at(s.offset, self.dtype)
    }

    fn ensure_acts(&mut self, batch: usize, seq: usize) -> Result<(), GpuError> {
        if self.acts.as_ref().is_some_and(|a| a.batch == batch && a.seq == seq) {
            return Ok(());
        }
        self.acts = None; // free the old shape first
        let g = self.gpu;
        let (c, nh, vp) = (self.cfg.hidden_size, self.cfg.num_attention_heads, self.cfg.padded_vocab_size());
        let n = batch * seq;
        let es = self.dtype.size();
        let act = |elems: usize| g.alloc(elems * es);
        let f32s = |elems: usize| g.alloc(elems * 4);
        let layers = (0..self.cfg.num_layers)
            .map(|_| {
                Ok(LayerBufs {
                    ln1: act(n * c)?,
                    ln1_mean: f32s(n)?,
                    ln1_rstd: f32s(n)?,
                    qkv: act(n * 3 * c)?,
                    atty: act(n * c)?,
                    lse: f32s(batch * nh * seq)?,
                    resid2: act(n * c)?,
                    ln2: act(n * c)?,
                    ln2_mean: f32s(n)?,
                    ln2_rstd: f32s(n)?,
                    fch: act(n * 4 * c)?,
                    fch_gelu: act(n * 4 * c)?,
                    out: act(n * c)?,
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        let bias_elems =
            [c, 3 * c, 4 * c].iter().map(|&w| optim::bias_grad_scratch_elems(n, w)).max().unwrap_or(0);
        self.acts = Some(Acts {
            batch,
            seq,
            input: act(n * c)?,
            layers,
            lnf: act(n * c)?,
            lnf_mean: f32s(n)?,
            lnf_rstd: f32s(n)?,
            logits: act(n * vp)?,
            losses: f32s(n)?,
            targets: g.alloc(n * 4)?,
            tokens: g.alloc(n * 4)?,
            host_tokens: vec![0; n],
            dres: act(n * c)?,
            dln: act(n * c)?,
            datty: act(n * c)?,
            dqkv: act(n * 3 * c)?,
            dbig1: act(n * 4 * c)?,
            dbig2: act(n * 4 * c)?,
            tmp: act(n * c)?,
            dsum: f32s(batch * nh * seq)?,
            ln_scratch: f32s(layernorm::backward_scratch_len(n, c))?,
            bias_scratch: f32s(bias_elems)?,
            emb_workspace: g.alloc(embedding::backward_workspace_bytes(n))?,
        });
        Ok(())
    }

    /// Checks a microbatch before any device work: no backward pending, a shape that fits the
    /// positions, and `B·T` ids below the vocabulary in each of `ids`.
    fn check_batch(
        &self,
        op: &'static str,
        ids: &[(&str, &[u32])],
        batch: usize,
        seq: usize,
    ) -> Result<(), GpuError> {
        if self.pending_backward {
            return Err(GpuError::Shape {
                op,
                detail: "the previous microbatch's backward has not run".into(),
            });
        }
        let n = batch * seq;
        if n == 0 || seq > self.cfg.seq_length {
            return Err(GpuError::Shape {
                op,
                detail: format!("{batch} × {seq} tokens (at most {} positions)", self.cfg.seq_length),
            });
        }
        for &(what, ids) in ids {
            if ids.len() != n {
                return Err(GpuError::Shape {
                    op,
                    detail: format!("{what}: {} ids for {batch} × {seq}", ids.len()),
                });
            }
            if let Some(pos) = ids.iter().position(|&t| t as usize >= self.cfg.vocab_size) {
                return Err(GpuError::Shape {
                    op,
                    detail: format!(
                        "{what}[{pos}] = {} is outside the vocabulary of {}",
                        ids[pos], self.cfg.vocab_size
                    ),
                });
            }
        }
        Ok(())
    }

    /// Forward of one microbatch of `batch` sequences of `seq` tokens with next-token `targets`.
    /// Returns the mean loss and leaves dlogits scaled by `loss_scale / (B·T)` for
    /// [`GpuGpt::backward`].
    ///
    /// # Errors
    /// Bad lengths, token ids outside the vocabulary, a sequence longer than the positions, a
    /// forward while another microbatch's backward is pending; device errors.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
        loss_scale: f32,
    ) -> Result<f32, GpuError> {
        const OP: &str = "GpuGpt::forward";
        self.check_batch(OP, &[("tokens", tokens), ("targets", targets)], batch, seq)?;
        self.ensure_acts(batch, seq)?;
        let mut acts = self.acts.take().ok_or(GpuError::Shape { op: OP, detail: "no activations".into() })?;
        let result = self.forward_inner(&mut acts, tokens, Some(targets), loss_scale);
        self.acts = Some(acts);
        if result.is_ok() {
            self.pending_backward = true;
        }
        result
    }

    /// The forward; with `targets`, the fused cross-entropy turns the logits into dlogits and the
    /// mean loss is returned; without, the logits stay (and 0 is returned).
    fn forward_inner(
        &self,
        a: &mut Acts<G::Buf>,
        tokens: &[u32],
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<f32, GpuError> {
        let g = self.gpu;
        let dt = self.dtype;
        let (batch, seq) = (a.batch, a.seq);
        let n = batch * seq;
        let (c, nh, v, vp) = (
            self.cfg.hidden_size,
            self.cfg.num_attention_heads,
            self.cfg.vocab_size,
            self.cfg.padded_vocab_size(),
        );
        a.host_tokens.copy_from_slice(tokens);
        g.upload(&mut a.tokens, 0, bytemuck::cast_slice(tokens))?;
        if let Some(targets) = targets {
            g.upload(&mut a.targets, 0, bytemuck::cast_slice(targets))?;
        }
        let d = Dev::new;
        embedding::encoder_forward(
            g,
            dt,
            d(&a.input),
            d(&a.tokens),
            self.p(self.wte),
            self.p(self.wpe),
            batch,
            seq,
            c,
            vp,
        )?;
        for li in 0..self.blocks.len() {
            let blk = self.blocks[li];
            let x = if li == 0 { d(&a.input) } else { d(&a.layers[li - 1].out) };
            let l = &a.layers[li];
            layernorm::layernorm_forward(
                g,
                dt,
                d(&l.ln1),
                d(&l.ln1_mean),
                d(&l.ln1_rstd),
                x,
                self.p(blk.ln1_w),
                self.p(blk.ln1_b),
                n,
                c,
            )?;
            g.gemm(
                &Gemm::linear(n, c, 3 * c, dt),
                d(&l.qkv),
                d(&l.ln1),
                self.p(blk.qkv_w),
                Some(self.p(blk.qkv_b)),
            )?;
            attention::attention_forward(g, dt, d(&l.atty), d(&l.lse), d(&l.qkv), batch, seq, c, nh)?;
            g.gemm(
                &Gemm::linear(n, c, c, dt),
                d(&a.tmp),
                d(&l.atty),
                self.p(blk.proj_w),
                Some(self.p(blk.proj_b)),
            )?;
            layernorm::residual_layernorm_forward(
                g,
                dt,
                d(&l.resid2),
                d(&l.ln2),
                d(&l.ln2_mean),
                d(&l.ln2_rstd),
                x,
                d(&a.tmp),
                self.p(blk.ln2_w),
                self.p(blk.ln2_b),
                n,
                c,
            )?;
            g.gemm(
                &Gemm::linear(n, c, 4 * c, dt),
                d(&l.fch),
                d(&l.ln2),
                self.p(blk.fc_w),
                Some(self.p(blk.fc_b)),
            )?;
            gelu::gelu_forward(g, dt, d(&l.fch_gelu), d(&l.fch), n * 4 * c)?;
            g.gemm(
                &Gemm::linear(n, 4 * c, c, dt),
                d(&a.tmp),
                d(&l.fch_gelu),
                self.p(blk.fcproj_w),
                Some(self.p(blk.fcproj_b)),
            )?;
            g.copy(d(&l.out), d(&l.resid2), n * c * dt.size())?;
            optim::add_assign(g, dt, d(&l.out), d(&a.tmp), n * c)?;
        }
        let x = a.layers.last().map_or(d(&a.input), |l| d(&l.out));
        layernorm::layernorm_forward(
            g,
            dt,
            d(&a.lnf),
            d(&a.lnf_mean),
            d(&a.lnf_rstd),
            x,
            self.p(self.lnf_w),
            self.p(self.lnf_b),
            n,
            c,
        )?;
        g.gemm(&Gemm::linear(n, c, vp, dt), d(&a.logits), d(&a.lnf), self.p(self.wte), None)?;
        if targets.is_none() {
            return Ok(0.0);
        }
        let dloss = loss_scale / n as f32;
        crossentropy::crossentropy_forward_backward(
            g,
            dt,
            d(&a.logits),
            d(&a.losses),
            d(&a.targets),
            n,
            v,
            vp,
            dloss,
        )?;
        let losses = download_f32(g, d(&a.losses), n, DType::F32)?;
        let mean = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64;
        Ok(mean as f32)
    }

    /// Logits `[B·T, V]` (padding columns dropped) of one forward, as fp32 (tests and tools).
    ///
    /// # Errors
    /// As [`GpuGpt::forward`].
    pub fn logits(&mut self, tokens: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>, GpuError> {
        self.check_batch("GpuGpt::logits", &[("tokens", tokens)], batch, seq)?;
        self.ensure_acts(batch, seq)?;
        let mut acts = self
            .acts
            .take()
            .ok_or(GpuError::Shape { op: "GpuGpt::logits", detail: "no activations".into() })?;
        let result = self.forward_inner(&mut acts, tokens, None, 1.0);
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab_size());
        let logits =
            result.and_then(|_| download_f32(self.gpu, Dev::new(&acts.logits), batch * seq * vp, self.dtype));
        self.acts = Some(acts);
        Ok(logits?.chunks(vp).flat_map(|r| r[..v].iter().copied()).collect())
    }

    /// Mean loss of one microbatch without touching the gradients (evaluation).
    ///
    /// # Errors
    /// As [`GpuGpt::forward`].
    pub fn eval_loss(
        &mut self,
        tokens: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<f32, GpuError> {
        let loss = self.forward(tokens, targets, batch, seq, 1.0)?;
        self.pending_backward = false;
        Ok(loss)
    }

    /// Backward of the microbatch of the last forward; parameter gradients accumulate.
    ///
    /// # Errors
    /// No forward pending; device errors.
    pub fn backward(&mut self) -> Result<(), GpuError> {
        self.backward_with(&mut |_, _| Ok(()))
    }

    /// [`GpuGpt::backward`] that reports progress: `ready(range, grads)` is called with a range of
    /// the parameter arena (elements) and the gradient buffer as soon as this microbatch's
    /// contribution to that range has been queued — the final LayerNorm first, then each block
    /// from the last to the first, then `wte`/`wpe` — like the CPU model's `backward_with`. A
    /// data-parallel trainer starts the all-reduce of each range there (ordered after the queued
    /// compute by an event) while the rest of the backward runs.
    ///
    /// # Errors
    /// As [`GpuGpt::backward`], and whatever `ready` returns.
    pub fn backward_with(&mut self, ready: &mut GradsReady<'_, G::Buf>) -> Result<(), GpuError> {
        if !self.pending_backward {
            return Err(GpuError::Shape { op: "GpuGpt::backward", detail: "no forward is pending".into() });
        }
        let mut acts = self
            .acts
            .take()
            .ok_or(GpuError::Shape { op: "GpuGpt::backward", detail: "no activations".into() })?;
        let result = self.backward_inner(&mut acts, ready);
        self.acts = Some(acts);
        self.pending_backward = false;
        result
    }

    fn gr(&self, s: Span) -> Dev<'_, G::Buf> {
        Dev::new(&self.grads).at(s.offset, DType::F32)
    }

    /// `dinp = dout·W` (overwrite), `dW += doutᵀ·inp`, `db += Σ_rows dout`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        a: &Acts<G::Buf>,
        dinp: Dev<'_, G::Buf>,
        dout: Dev<'_, G::Buf>,
        inp: Dev<'_, G::Buf>,
        w: Span,
        b: Option<Span>,
        n: usize,
        k: usize,
        out: usize,
    ) -> Result<(), GpuError> {
        let (g, dt) = (self.gpu, self.dtype);
        g.gemm(&Gemm::linear_backward_input(n, k, out, dt), dinp, dout, self.p(w), None)?;
        g.gemm(&Gemm::linear_backward_weight(n, k, out, dt), self.gr(w), dout, inp, None)?;
        if let Some(b) = b {
            optim::bias_grad(g, self.gr(b), DType::F32, dout, dt, n, out, Dev::new(&a.bias_scratch))?;
        }
        Ok(())
    }

    fn backward_inner(
        &self,
        a: &mut Acts<G::Buf>,
        ready: &mut GradsReady<'_, G::Buf>,
    ) -> Result<(), GpuError> {
        let g = self.gpu;
        let dt = self.dtype;
        let (batch, seq) = (a.batch, a.seq);
        let n = batch * seq;
        let (c, nh, vp) = (self.cfg.hidden_size, self.cfg.num_attention_heads, self.cfg.padded_vocab_size());
        let d = Dev::new;
        // Head: dlnf = dlogits·wte; the tied wte gradient accumulates here and again in the
        // embedding backward below.
        self.linear_backward(a, d(&a.dln), d(&a.logits), d(&a.lnf), self.wte, None, n, c, vp)?;
        g.zero(d(&a.dres), n * c * dt.size())?;
        let last_out = a.layers.last().map_or(d(&a.input), |l| d(&l.out));
        layernorm::layernorm_backward(
            g,
            dt,
            d(&a.dres),
            self.gr(self.lnf_w),
            self.gr(self.lnf_b),
            d(&a.ln_scratch),
            d(&a.dln),
            last_out,
            self.p(self.lnf_w),
            d(&a.lnf_mean),
            d(&a.lnf_rstd),
            n,
            c,
        )?;
        ready(self.lnf_w.offset..self.lnf_b.range().end, &self.grads)?;
        for li in (0..self.blocks.len()).rev() {
            let blk = self.blocks[li];
            let x = if li == 0 { d(&a.input) } else { d(&a.layers[li - 1].out) };
            let l = &a.layers[li];
            self.linear_backward(
                a,
                d(&a.dbig1),
                d(&a.dres),
                d(&l.fch_gelu),
                blk.fcproj_w,
                Some(blk.fcproj_b),
                n,
                4 * c,
                c,
            )?;
            gelu::gelu_backward(g, dt, d(&a.dbig2), d(&l.fch), d(&a.dbig1), n * 4 * c)?;
            self.linear_backward(
                a,
                d(&a.dln),
                d(&a.dbig2),
                d(&l.ln2),
                blk.fc_w,
                Some(blk.fc_b),
                n,
                c,
                4 * c,
            )?;
            layernorm::layernorm_backward(
                g,
                dt,
                d(&a.dres),
                self.gr(blk.ln2_w),
                self.gr(blk.ln2_b),
                d(&a.ln_scratch),
                d(&a.dln),
                d(&l.resid2),
                self.p(blk.ln2_w),
                d(&l.ln2_mean),
                d(&l.ln2_rstd),
                n,
                c,
            )?;
            self.linear_backward(
                a,
                d(&a.datty),
                d(&a.dres),
                d(&l.atty),
                blk.proj_w,
                Some(blk.proj_b),
                n,
                c,
                c,
            )?;
            attention::attention_backward(
                g,
                dt,
                d(&a.dqkv),
                d(&a.dsum),
                d(&a.datty),
                d(&l.atty),
                d(&l.lse),
                d(&l.qkv),
                batch,
                seq,
                c,
                nh,
            )?;
            self.linear_backward(
                a,
                d(&a.dln),
                d(&a.dqkv),
                d(&l.ln1),
                blk.qkv_w,
                Some(blk.qkv_b),
                n,
                c,
                3 * c,
            )?;
            layernorm::layernorm_backward(
                g,
                dt,
                d(&a.dres),
                self.gr(blk.ln1_w),
                self.gr(blk.ln1_b),
                d(&a.ln_scratch),
                d(&a.dln),
                x,
                self.p(blk.ln1_w),
                d(&l.ln1_mean),
                d(&l.ln1_rstd),
                n,
                c,
            )?;
            ready(blk.ln1_w.offset..blk.fcproj_b.range().end, &self.grads)?;
        }
        embedding::encoder_backward(
            g,
            dt,
            self.gr(self.wte),
            self.gr(self.wpe),
            d(&a.dres),
            &a.host_tokens,
            &mut a.emb_workspace,
            batch,
            seq,
            c,
            self.cfg.vocab_size,
        )?;
        ready(self.wte.offset..self.wpe.range().end, &self.grads)?;
        Ok(())
    }

    /// Zeroes the gradients.
    pub fn zero_grads(&mut self) -> Result<(), GpuError> {
        self.gpu.zero(Dev::new(&self.grads), self.table.len() * 4)
    }

    /// L2 norm of all gradients (f64 accumulation, fixed order).
    pub fn grad_norm(&self) -> Result<f64, GpuError> {
        let parts: Vec<_> =
            self.table.specs().iter().map(|s| (DType::F32, self.gr(s.span), s.span.len)).collect();
        Ok(optim::sum_squares_many(self.gpu, &parts, Dev::new(&self.norm_scratch))?.sqrt())
    }

    /// Clips the gradients to `max_norm` (0 disables clipping; Megatron's global-norm rule) and
    /// applies one AdamW update with learning rate `lr`. Returns the norm before clipping.
    pub fn step(&mut self, lr: f32, adam: &AdamWConfig, max_norm: f32) -> Result<f64, GpuError> {
        let norm = self.grad_norm()?;
        let scale = crate::optim::clip_coefficient(norm, max_norm).unwrap_or(1.0);
        self.adam_steps += 1;
        let master = self.master.as_ref().unwrap_or(&self.params);
        for spec in self.table.specs() {
            let s = spec.span;
            let h = AdamWStep {
                lr,
                beta1: adam.beta1,
                beta2: adam.beta2,
                eps: adam.eps,
                weight_decay: if spec.decay { adam.weight_decay } else { 0.0 },
                step: self.adam_steps,
            };
            let bufs = optim::AdamWBufs {
                params: Dev::new(master).at(s.offset, DType::F32),
                m: Dev::new(&self.m).at(s.offset, DType::F32),
                v: Dev::new(&self.v).at(s.offset, DType::F32),
                grads: self.gr(s),
                grad_dtype: DType::F32,
                copy: self.master.as_ref().map(|_| (self.p(s), self.dtype)),
            };
            optim::adamw(self.gpu, &bufs, s.len, &h, scale)?;
        }
        Ok(norm)
    }
}
