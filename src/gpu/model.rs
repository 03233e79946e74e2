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
//! Like the CPU model, a [`GpuGpt`] holds a [`LayerRange`] (the whole model, or one pipeline
//! stage: a contiguous run of blocks, with the embedding on the first stage and the final
//! LayerNorm + tied head + loss on the last), and any number of microbatches may be in flight:
//! [`GpuGpt::forward_mb`] stores microbatch `mb`'s activations under its id and
//! [`GpuGpt::backward_mb`] consumes them (a pipeline schedule's order); the backward scratch is
//! shared. The whole-model calls [`GpuGpt::forward`] / [`GpuGpt::backward`] run one microbatch at a
//! time. Gradients accumulate over microbatches until [`GpuGpt::zero_grads`]. All work is queued
//! on the GPU's compute stream; only the loss (N floats) and the gradient norm (one f64) come
//! back to the host each step, plus a stage's output activations and input gradients when it is
//! a pipeline stage.

mod messages;
mod split;

pub use messages::{Arrival, ArrivalCheck, Ready, SumLabel};

use super::ops::{attention, crossentropy, embedding, gelu, layernorm, optim};
use super::{DType, Dev, GeluEpilogue, Gemm, Gpu, GpuError, download_f32, encode};
use crate::kernels::AdamWStep;
use crate::models::gpt::{Gpt, GptConfig, GradRef, Hidden, LayerRange, StageInput, param_table};
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

impl Block {
    /// The block's parameters in the arena (contiguous, from ln_1's weight to the MLP
    /// projection's bias).
    fn range(&self) -> std::ops::Range<usize> {
        self.ln1_w.offset..self.fcproj_b.range().end
    }
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

/// The head's activations of one microbatch (last stage).
struct HeadBufs<B> {
    lnf: B,
    lnf_mean: B,
    lnf_rstd: B,
    /// Logits, then dlogits after the fused cross-entropy.
    logits: B,
    losses: B,
    targets: B,
}

/// What one in-flight microbatch keeps for its backward, sized by its shape (B, T).
struct Acts<B> {
    batch: usize,
    seq: usize,
    /// The range's input: the embedding's output, or the previous stage's hidden states.
    input: B,
    layers: Vec<LayerBufs<B>>,
    head: Option<HeadBufs<B>>,
    /// Token ids on the device and on the host (the embedding's deterministic backward sorts
    /// them on the host); only a range with the embedding fills them.
    tokens: B,
    host_tokens: Vec<u32>,
}

/// Backward scratch shared by all microbatches, sized by N = B·T.
struct Scratch<B> {
    n: usize,
    /// The gradient flowing down the residual stream; after a backward, the gradient of the
    /// range's input (what a pipeline stage sends to the previous one).
    dres: B,
    dln: B,
    datty: B,
    dqkv: B,
    dbig1: B,
    dbig2: B,
    /// Forward scratch too (projection outputs before the residual add).
    tmp: B,
    dsum: B,
    ln_scratch: B,
    bias_scratch: B,
    emb_workspace: B,
    /// Where the unwanted half of a LayerNorm backward goes in a split backward: the parameter
    /// gradients (2·C fp32) during the input half, the input gradient (N·C) during the weight half.
    dparam_sink: B,
    dinp_sink: B,
}

/// The microbatch id of the whole-model calls ([`GpuGpt::forward`] and friends).
const WHOLE: u64 = u64::MAX - 1;
/// The microbatch id of [`GpuGpt::logits`].
const LOGITS: u64 = u64::MAX;

/// A GPT, or a pipeline stage's layer range of one, on one GPU.
pub struct GpuGpt<'g, G: Gpu> {
    gpu: &'g G,
    cfg: GptConfig,
    dtype: DType,
    range: LayerRange,
    table: ParamTable,
    /// The tied embedding (on the embedding range and on the head range).
    wte: Option<Span>,
    wpe: Option<Span>,
    /// Final LayerNorm weight and bias (head range).
    lnf: Option<(Span, Span)>,
    blocks: Vec<Block>,
    /// Parameters as the kernels read them (`dtype`).
    params: G::Buf,
    /// fp32 master weights in bf16 mode (`None` in fp32 mode: `params` are the master), of the
    /// optimizer's parts only (`opt_parts`, concatenated as the moments are): the whole arena,
    /// or this rank's shard under the distributed optimizer, whose owners hold the rest.
    master: Option<G::Buf>,
    grads: G::Buf,
    /// AdamW's first and second moments (fp32) of the optimizer's part of the arena
    /// (`opt_parts`, concatenated), allocated by the first update or restore: a pipeline stage
    /// whose optimizer shards live on the host never holds them.
    moments: Option<(G::Buf, G::Buf)>,
    /// The arena ranges AdamW updates here: the whole arena, or this rank's shard under the
    /// distributed optimizer ([`GpuGpt::set_optimizer_shard`]).
    opt_parts: Vec<OptPart<G::Buf>>,
    norm_scratch: G::Buf,
    /// Scratch of [`GpuGpt::grad_sum_squares`], grown on demand.
    sq_scratch: Option<G::Buf>,
    /// Fuse the MLP's GELU into its first product's epilogue (and GELU's backward into the
    /// second's input gradient) where the GPU can; `TROUPE_GELU_EPILOGUE=0` turns it off.
    gelu_epilogue: bool,
    adam_steps: u64,
    in_flight: std::collections::HashMap<u64, Acts<G::Buf>>,
    /// Microbatches whose split backward's input half ran: what the weight half needs (their
    /// activations stay in `in_flight` until then). See `model/split.rs`.
    pending_w: std::collections::HashMap<u64, split::Stash<G::Buf>>,
    /// The next head forward keeps its per-token losses on the device ([`GpuGpt::forward_deferred`]).
    defer_loss: bool,
    /// Per-token losses of deferred forwards, side by side, and each one's token count.
    deferred: Option<G::Buf>,
    deferred_counts: Vec<usize>,
    /// Smaller buffers `deferred` outgrew, kept until the queued copies out of them are done.
    retired: Vec<G::Buf>,
    free_stash: Vec<split::Stash<G::Buf>>,
    /// Activation sets of finished microbatches, reused by later ones of the same shape.
    free: Vec<Acts<G::Buf>>,
    scratch: Option<Scratch<G::Buf>>,
    /// N of the latest backward: [`GpuGpt::input_grad`] reads that many rows of `dres`.
    last_backward_n: Option<usize>,
    /// Parameter ranges whose values are still on their way ([`GpuGpt::params_arriving`]),
    /// in the order they land.
    fences: std::sync::Mutex<Vec<ParamFence>>,
    /// Pipeline messages on the device (see `model/messages.rs`).
    messages: messages::Messages<G::Buf>,
}

impl<G: Gpu> Drop for GpuGpt<'_, G> {
    fn drop(&mut self) {
        // Collectives still writing into the parameters land before their memory goes (through
        // the host they would write it later otherwise).
        if let Err(e) = self.await_all_params() {
            tracing::warn!("parameters still arriving when a GPU model was dropped: {e}");
        }
        // Likewise messages still arriving into (or sent from) its message buffers.
        if let Err(e) = self.messages.settle() {
            tracing::warn!("pipeline messages still in transfer when a GPU model was dropped: {e}");
        }
    }
}

/// Parameters of an arena range that a queued collective is still writing (the distributed
/// optimizer's gather), and what orders the GPU's later work after it: `ready` is called
/// before the first kernel that reads the range (and covers every fence before it).
pub struct ParamFence {
    pub range: std::ops::Range<usize>,
    pub ready: Box<dyn FnOnce() -> Result<(), GpuError> + Send>,
}

/// The mean of per-token losses, summed in double.
fn mean_loss(losses: &[f32]) -> f32 {
    (losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len().max(1) as f64) as f32
}

/// A range of the arena the optimizer updates, where its moments start in the moment buffers,
/// and its weight-decay runs (one AdamW launch; `None`: one launch per tensor piece).
struct OptPart<B> {
    range: std::ops::Range<usize>,
    base: usize,
    runs: Option<optim::DecayRuns<B>>,
}

/// The optimizer parts of `ranges` (sorted, disjoint, inside the arena; empty ones dropped).
fn opt_parts<G: Gpu>(
    gpu: &G,
    table: &ParamTable,
    ranges: &[std::ops::Range<usize>],
) -> Result<Vec<OptPart<G::Buf>>, GpuError> {
    let mut parts = Vec::with_capacity(ranges.len());
    let mut base = 0;
    for r in ranges.iter().filter(|r| !r.is_empty()) {
        // The tensors' pieces inside r, rebased to r.start (they tile it in arena order).
        let pieces = table.specs().iter().filter_map(|s| {
            let t = s.span.range();
            let (lo, hi) = (t.start.max(r.start), t.end.min(r.end));
            (lo < hi).then(|| (lo - r.start, hi - lo, s.decay))
        });
        let runs = optim::DecayRuns::new(gpu, pieces)?.filter(|runs| runs.len() == r.len());
        parts.push(OptPart { range: r.clone(), base, runs });
        base += r.len();
    }
    Ok(parts)
}

fn span(table: &ParamTable, name: &str) -> Result<Span, GpuError> {
    table.get(name).map(|s| s.span).ok_or_else(|| GpuError::Shape {
        op: "GpuGpt",
        detail: format!("the parameter table has no `{name}`"),
    })
}

/// An output gradient into the device buffer `dst` of storage `dtype`: bf16 into bf16 as it is,
/// anything else converted.
pub(super) fn upload_grad<G: Gpu>(
    gpu: &G,
    dst: &mut G::Buf,
    h: GradRef<'_>,
    dtype: DType,
) -> Result<(), GpuError> {
    match (h, dtype) {
        (GradRef::Bf16(v), DType::Bf16) => gpu.upload(dst, 0, bytemuck::cast_slice(v)),
        (h, _) => gpu.upload(dst, 0, &encode(&h.to_f32(), dtype)),
    }
}

/// The gradient of a range's output as a backward reads it: host values, or a device buffer
/// it arrived in (`model/messages.rs`).
enum OutGrad<'a, B> {
    Host(GradRef<'a>),
    Device(&'a B),
}

impl<'a, B> OutGrad<'a, B> {
    /// The given gradient, else the one that arrived on the device, else none (the head).
    fn of(given: Option<GradRef<'a>>, arrived: Option<&'a B>) -> Option<Self> {
        match (given, arrived) {
            (Some(h), _) => Some(OutGrad::Host(h)),
            (None, Some(b)) => Some(OutGrad::Device(b)),
            (None, None) => None,
        }
    }
}

// By hand: a derive would ask `B: Copy`.
impl<B> Clone for OutGrad<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for OutGrad<'_, B> {}

impl<B> OutGrad<'_, B> {
    /// Into the backward's running residual gradient `dres` (`elems` values of `dtype`).
    fn write<G: Gpu<Buf = B>>(
        self,
        gpu: &G,
        dres: &mut B,
        elems: usize,
        dtype: DType,
    ) -> Result<(), GpuError> {
        match self {
            OutGrad::Host(h) => upload_grad(gpu, dres, h, dtype),
            OutGrad::Device(b) => gpu.copy(Dev::new(dres), Dev::new(b), elems * dtype.size()),
        }
    }
}

/// `n` values of `dtype` downloaded as they are stored (bf16 stays bf16).
fn download_native<G: Gpu>(
    gpu: &G,
    src: Dev<'_, G::Buf>,
    n: usize,
    dtype: DType,
) -> Result<Hidden, GpuError> {
    match dtype {
        DType::F32 => download_f32(gpu, src, n, DType::F32).map(Hidden::F32),
        DType::Bf16 => {
            let mut v = vec![half::bf16::ZERO; n];
            gpu.download(src.buf, src.offset, bytemuck::cast_slice_mut(&mut v))?;
            Ok(Hidden::Bf16(v))
        }
    }
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

    /// The whole model with the given parameter arena (the CPU model's order; e.g. from a
    /// checkpoint).
    ///
    /// # Errors
    /// As [`GpuGpt::new`], and a parameter arena of the wrong length.
    pub fn from_params(gpu: &'g G, cfg: &GptConfig, host: &[f32], dtype: DType) -> Result<Self, GpuError> {
        Self::from_range_params(gpu, cfg, LayerRange::full(cfg), host, dtype)
    }

    /// Layer range `range` of the model (a pipeline stage) with the given parameter arena, in
    /// the order of `param_table(cfg, range)` (the CPU `Gpt::new_range`'s arena).
    ///
    /// # Errors
    /// As [`GpuGpt::from_params`], and a range outside the model.
    pub fn from_range_params(
        gpu: &'g G,
        cfg: &GptConfig,
        range: LayerRange,
        host: &[f32],
        dtype: DType,
    ) -> Result<Self, GpuError> {
        cfg.validate().map_err(model_err)?;
        if range.first > range.last || range.last > cfg.num_layers {
            return Err(model_err(crate::models::gpt::ModelError::BadRange {
                first: range.first,
                last: range.last,
                num_layers: cfg.num_layers,
            }));
        }
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
        let table = param_table(cfg, range);
        if host.len() != table.len() {
            return Err(GpuError::Shape {
                op: "GpuGpt",
                detail: format!("{} parameters given, the layer range has {}", host.len(), table.len()),
            });
        }
        let blocks = (range.first..range.last)
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
        let norm_bytes = optim::sum_squares_scratch_bytes([n]);
        let opt_parts = opt_parts(gpu, &table, std::slice::from_ref(&(0..n)))?;
        let lnf =
            if range.head { Some((span(&table, "ln_f.weight")?, span(&table, "ln_f.bias")?)) } else { None };
        Ok(GpuGpt {
            gpu,
            cfg: cfg.clone(),
            dtype,
            range,
            wte: if range.embedding || range.head { Some(span(&table, "wte")?) } else { None },
            wpe: if range.embedding { Some(span(&table, "wpe")?) } else { None },
            lnf,
            blocks,
            grads: gpu.alloc(n * 4)?,
            moments: None,
            opt_parts,
            norm_scratch: gpu.alloc(norm_bytes)?,
            sq_scratch: None,
            gelu_epilogue: std::env::var("TROUPE_GELU_EPILOGUE").map_or(true, |v| v != "0"),
            table,
            params,
            master,
            adam_steps: 0,
            in_flight: std::collections::HashMap::new(),
            pending_w: std::collections::HashMap::new(),
            defer_loss: false,
            deferred: None,
            deferred_counts: Vec::new(),
            retired: Vec::new(),
            free_stash: Vec::new(),
            free: Vec::new(),
            scratch: None,
            last_backward_n: None,
            fences: std::sync::Mutex::new(Vec::new()),
            messages: messages::Messages::default(),
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

    /// The (master) parameters as fp32, in the CPU model's arena order. With a sharded
    /// optimizer in bf16 ([`GpuGpt::set_optimizer_shard`]) the master weights here are the
    /// shard's: elsewhere this returns the bf16 copy the kernels read, widened (the fp32 values
    /// are their owners').
    pub fn params_host(&self) -> Result<Vec<f32>, GpuError> {
        self.await_all_params()?;
        let n = self.table.len();
        let Some(m) = &self.master else {
            return download_f32(self.gpu, Dev::new(&self.params), n, DType::F32);
        };
        if self.master_is_whole() {
            return download_f32(self.gpu, Dev::new(m), n, DType::F32);
        }
        let mut out = download_f32(self.gpu, Dev::new(&self.params), n, self.dtype)?;
        let own = download_f32(self.gpu, Dev::new(m), self.optimizer_len(), DType::F32)?;
        for part in &self.opt_parts {
            out[part.range.clone()].copy_from_slice(&own[part.base..part.base + part.range.len()]);
        }
        Ok(out)
    }

    /// Whether the master weights (if any) cover the whole arena in arena order.
    fn master_is_whole(&self) -> bool {
        self.optimizer_len() == self.table.len()
    }

    /// Storage type of the parameter gradients (always fp32).
    pub fn grad_dtype(&self) -> DType {
        DType::F32
    }

    /// The accumulated gradients (fp32).
    pub fn grads_host(&self) -> Result<Vec<f32>, GpuError> {
        self.grads_range_host(0..self.table.len())
    }

    /// The device buffer of the accumulated gradients (fp32, arena order).
    pub fn grads_buf(&self) -> &G::Buf {
        &self.grads
    }

    /// The accumulated gradients of an arena range (fp32).
    ///
    /// # Errors
    /// A range outside the arena; device errors.
    pub fn grads_range_host(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>, GpuError> {
        if range.start > range.end || range.end > self.table.len() {
            return Err(GpuError::Shape {
                op: "GpuGpt::grads_range_host",
                detail: format!("range {range:?} of {} gradients", self.table.len()),
            });
        }
        let at = Dev::new(&self.grads).at(range.start, DType::F32);
        download_f32(self.gpu, at, range.len(), DType::F32)
    }

    /// The AdamW moments (m, v) as fp32: of the whole arena, or of the optimizer shard's ranges
    /// concatenated in arena order ([`GpuGpt::set_optimizer_shard`]).
    pub fn moments_host(&self) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        let n = self.optimizer_len();
        match &self.moments {
            None => Ok((vec![0.0; n], vec![0.0; n])),
            Some((m, v)) => Ok((
                download_f32(self.gpu, Dev::new(m), n, DType::F32)?,
                download_f32(self.gpu, Dev::new(v), n, DType::F32)?,
            )),
        }
    }

    /// The moments, allocated (zero) on first use.
    fn moments_mut(&mut self) -> Result<&mut (G::Buf, G::Buf), GpuError> {
        if self.moments.is_none() {
            let n = self.optimizer_len();
            self.moments = Some((self.gpu.alloc(n * 4)?, self.gpu.alloc(n * 4)?));
        }
        self.moments
            .as_mut()
            .ok_or_else(|| GpuError::Shape { op: "GpuGpt::moments", detail: "allocated above".into() })
    }

    /// Replaces the AdamW state (resuming from a checkpoint): moments (as
    /// [`GpuGpt::moments_host`] returns them) and the update count.
    pub fn set_optimizer_state(&mut self, m: &[f32], v: &[f32], steps: u64) -> Result<(), GpuError> {
        let n = self.optimizer_len();
        if m.len() != n || v.len() != n {
            return Err(GpuError::Shape {
                op: "set_optimizer_state",
                detail: format!("moments of {} and {} values for {n} parameters", m.len(), v.len()),
            });
        }
        let gpu = self.gpu;
        let (dm, dv) = self.moments_mut()?;
        gpu.upload(dm, 0, bytemuck::cast_slice(m))?;
        gpu.upload(dv, 0, bytemuck::cast_slice(v))?;
        self.adam_steps = steps;
        Ok(())
    }

    /// Fuses the MLP's GELU into the products' epilogues where the GPU can (the default;
    /// `TROUPE_GELU_EPILOGUE=0` in the environment starts it off), or runs the GELU kernels.
    pub fn set_gelu_epilogue(&mut self, on: bool) {
        self.gelu_epilogue = on;
    }

    /// The layer range this model holds.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// Replaces the parameters with `host` (fp32, this range's arena order): the master weights
    /// and the copy the kernels read. A pipeline stage whose optimizer runs on the host (ZeRO-1) calls
    /// this after each update.
    ///
    /// # Errors
    /// A wrong length; device errors.
    pub fn set_params(&mut self, host: &[f32]) -> Result<(), GpuError> {
        let n = self.table.len();
        if host.len() != n {
            return Err(GpuError::Shape {
                op: "GpuGpt::set_params",
                detail: format!("{} values for {n} parameters", host.len()),
            });
        }
        self.await_all_params()?;
        let whole = self.master_is_whole();
        match self.master.as_mut() {
            None => self.gpu.upload(&mut self.params, 0, bytemuck::cast_slice(host)),
            Some(m) if whole => {
                // fp32 up once; the bf16 copy is rounded on the device (to nearest even, as
                // `encode` does on the host).
                self.gpu.upload(m, 0, bytemuck::cast_slice(host))?;
                let (dst, src) = (Dev::new(&self.params), Dev::new(&*m));
                optim::cast(self.gpu, dst, self.dtype, src, DType::F32, n)
            }
            Some(m) => {
                // A shard's master weights: its parts in fp32, the whole copy rounded here.
                for part in &self.opt_parts {
                    self.gpu.upload(m, part.base * 4, bytemuck::cast_slice(&host[part.range.clone()]))?;
                }
                self.gpu.upload(&mut self.params, 0, &encode(host, self.dtype))
            }
        }
    }

    /// Number of microbatches whose activations are stored (forward ran, backward has not).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn p(&self, s: Span) -> Dev<'_, G::Buf> {
        Dev::new(&self.params).at(s.offset, self.dtype)
    }

    /// An activation set for a (B, T) microbatch: a freed one of that shape, or a new one.
    fn take_acts(&mut self, batch: usize, seq: usize) -> Result<Acts<G::Buf>, GpuError> {
        if let Some(i) = self.free.iter().position(|a| a.batch == batch && a.seq == seq) {
            return Ok(self.free.swap_remove(i));
        }
        // Shapes change rarely (evaluation, the last partial batch): drop sets of other shapes.
        self.free.clear();
        let g = self.gpu;
        let (c, nh, vp) = (self.cfg.hidden_size, self.cfg.num_attention_heads, self.cfg.padded_vocab_size());
        let n = batch * seq;
        let es = self.dtype.size();
        let act = |elems: usize| g.alloc(elems * es);
        let f32s = |elems: usize| g.alloc(elems * 4);
        let layers = (0..self.blocks.len())
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
        let head = if self.range.head {
            Some(HeadBufs {
                lnf: act(n * c)?,
                lnf_mean: f32s(n)?,
                lnf_rstd: f32s(n)?,
                logits: act(n * vp)?,
                losses: f32s(n)?,
                targets: g.alloc(n * 4)?,
            })
        } else {
            None
        };
        let ids = if self.range.embedding { n } else { 0 };
        Ok(Acts {
            batch,
            seq,
            input: act(n * c)?,
            layers,
            head,
            tokens: g.alloc(ids * 4)?,
            host_tokens: vec![0; ids],
        })
    }

    /// The backward scratch for N = B·T rows.
    fn ensure_scratch(&mut self, n: usize) -> Result<(), GpuError> {
        if self.scratch.as_ref().is_some_and(|s| s.n == n) {
            return Ok(());
        }
        self.scratch = None; // free the old size first
        let g = self.gpu;
        let (c, nh) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let es = self.dtype.size();
        let act = |elems: usize| g.alloc(elems * es);
        let f32s = |elems: usize| g.alloc(elems * 4);
        let bias_elems =
            [c, 3 * c, 4 * c].iter().map(|&w| optim::bias_grad_scratch_elems(n, w)).max().unwrap_or(0);
        let emb = if self.range.embedding { embedding::backward_workspace_bytes(n) } else { 0 };
        self.scratch = Some(Scratch {
            n,
            dres: act(n * c)?,
            dln: act(n * c)?,
            datty: act(n * c)?,
            dqkv: act(n * 3 * c)?,
            dbig1: act(n * 4 * c)?,
            dbig2: act(n * 4 * c)?,
            tmp: act(n * c)?,
            dsum: f32s(nh * n)?,
            ln_scratch: f32s(layernorm::backward_scratch_len(n, c))?,
            bias_scratch: f32s(bias_elems)?,
            emb_workspace: g.alloc(emb)?,
            dparam_sink: f32s(2 * c)?,
            dinp_sink: act(n * c)?,
        });
        Ok(())
    }

    /// Checks a microbatch before any device work: an id not in flight, a shape that fits the
    /// positions, the input kind and length the range takes, and ids below the vocabulary.
    fn check_input(
        &self,
        op: &'static str,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
    ) -> Result<(), GpuError> {
        let bad = |detail: String| GpuError::Shape { op, detail };
        if self.in_flight.contains_key(&mb) {
            return Err(bad(if mb == WHOLE {
                "the previous microbatch's backward has not run".into()
            } else {
                format!("microbatch {mb} is already in flight (forward ran, backward has not)")
            }));
        }
        let n = batch * seq;
        if n == 0 || seq > self.cfg.seq_length {
            return Err(bad(format!("{batch} × {seq} tokens (at most {} positions)", self.cfg.seq_length)));
        }
        let check_ids = |what: &str, ids: &[u32]| -> Result<(), GpuError> {
            if ids.len() != n {
                return Err(bad(format!("{what}: {} ids for {batch} × {seq}", ids.len())));
            }
            if let Some(pos) = ids.iter().position(|&t| t as usize >= self.cfg.vocab_size) {
                return Err(bad(format!(
                    "{what}[{pos}] = {} is outside the vocabulary of {}",
                    ids[pos], self.cfg.vocab_size
                )));
            }
            Ok(())
        };
        match (input, self.range.embedding) {
            (StageInput::Tokens(t), true) => check_ids("tokens", t)?,
            (StageInput::Hidden(_) | StageInput::HiddenBf16(_), false) => {
                let want = n * self.cfg.hidden_size;
                let got = match input {
                    StageInput::Hidden(h) => h.len(),
                    StageInput::HiddenBf16(h) => h.len(),
                    StageInput::Tokens(t) => t.len(),
                    StageInput::Arrived => want,
                };
                if got != want {
                    return Err(bad(format!("hidden states: {got} values, expected {want}")));
                }
            }
            (StageInput::Tokens(_), false) => {
                return Err(bad("this layer range has no embedding: pass hidden states".into()));
            }
            (StageInput::Arrived, false) if self.has_arrived_input(mb) => {}
            (StageInput::Arrived, false) => {
                return Err(bad(format!("the input of microbatch {mb} has not arrived on the device")));
            }
            (StageInput::Arrived, true) => {
                return Err(bad("this layer range starts with the embedding: pass tokens".into()));
            }
            (StageInput::Hidden(_) | StageInput::HiddenBf16(_), true) => {
                return Err(bad("this layer range starts with the embedding: pass tokens".into()));
            }
        }
        match (targets, self.range.head) {
            (Some(t), true) => check_ids("targets", t),
            (Some(_), false) => Err(bad("targets given to a layer range without the head".into())),
            (None, _) => Ok(()),
        }
    }

    /// Forward of microbatch `mb` (`batch` sequences of `seq` positions) of this layer range,
    /// keeping its activations until [`GpuGpt::backward_mb`] (or [`GpuGpt::release`]). The
    /// embedding range takes token ids, the others the previous stage's hidden states `[B,T,C]`.
    /// With the head and `targets`, returns the mean loss and leaves dlogits scaled by
    /// `loss_scale / (B·T)`; without targets the head keeps the logits.
    ///
    /// # Errors
    /// Bad lengths, token ids outside the vocabulary, a sequence longer than the positions, an
    /// input kind the range does not take, an id already in flight; device errors.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_mb(
        &mut self,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<Option<f32>, GpuError> {
        const OP: &str = "GpuGpt::forward";
        self.check_input(OP, mb, batch, seq, input, targets)?;
        self.ensure_scratch(batch * seq)?;
        let arrived = match input {
            StageInput::Arrived => Some(self.take_arrived_input(OP, mb)?),
            _ => None,
        };
        let mut acts = match self.take_acts(batch, seq) {
            Ok(a) => a,
            Err(e) => {
                if let Some(b) = arrived {
                    self.recycle_message(b);
                }
                return Err(e);
            }
        };
        let mut scratch =
            self.scratch.take().ok_or(GpuError::Shape { op: OP, detail: "no scratch".into() })?;
        let mut result =
            self.forward_inner(&mut acts, &mut scratch, input, arrived.as_ref(), targets, loss_scale);
        if let Some(b) = arrived {
            // Copied into the activations: free for the next message (whose transfer is
            // queued after the copy).
            self.recycle_message(b);
        }
        // Ranges no layer read (none, as the arena is laid out now) are due by the backward.
        result = result.and_then(|loss| self.await_all_params().map(|()| loss));
        self.scratch = Some(scratch);
        if self.defer_loss
            && targets.is_some()
            && let (Ok(Some(_)), Some(h)) = (&result, acts.head.as_ref())
        {
            result = self.stash_losses(&h.losses, batch * seq).map(|()| None);
        }
        match result {
            Ok(loss) => {
                self.in_flight.insert(mb, acts);
                Ok(loss)
            }
            Err(e) => {
                self.free.push(acts);
                Err(e)
            }
        }
    }

    /// Forward of one whole-model microbatch with next-token `targets`: the mean loss, with
    /// dlogits scaled by `loss_scale / (B·T)` left for [`GpuGpt::backward`].
    ///
    /// # Errors
    /// As [`GpuGpt::forward_mb`]; also a forward while the previous one's backward is pending.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
        loss_scale: f32,
    ) -> Result<f32, GpuError> {
        self.whole("GpuGpt::forward")?;
        let loss =
            self.forward_mb(WHOLE, batch, seq, StageInput::Tokens(tokens), Some(targets), loss_scale)?;
        Ok(loss.unwrap_or(f32::NAN))
    }

    /// Declares parameter ranges that queued collectives are still writing, in the order they
    /// will land (each after the ones before it): the forward orders each layer's kernels after
    /// the fences of its parameters only — so the distributed optimizer's gather of later
    /// layers overlaps the compute of earlier ones, as Megatron's overlapped parameter gather
    /// does — and everything else that reads or writes parameters waits for all of them.
    pub fn params_arriving(&self, fences: Vec<ParamFence>) {
        self.fences.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(fences);
    }

    /// Orders later GPU work after the fences of every range up to the last that meets `range`.
    fn await_params(&self, range: std::ops::Range<usize>) -> Result<(), GpuError> {
        let mut fences = self.fences.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(last) = fences.iter().rposition(|f| f.range.start < range.end && range.start < f.range.end)
        else {
            return Ok(());
        };
        // The last one covers the earlier ones (they landed before it).
        let mut due: Vec<ParamFence> = fences.drain(..=last).collect();
        drop(fences);
        due.pop().map_or(Ok(()), |f| (f.ready)())
    }

    /// Orders later GPU work after every parameter fence.
    fn await_all_params(&self) -> Result<(), GpuError> {
        self.await_params(0..self.table.len().max(1))
    }

    fn whole(&self, op: &'static str) -> Result<(), GpuError> {
        if self.range.embedding && self.range.head {
            Ok(())
        } else {
            Err(GpuError::Shape { op, detail: "this call needs the whole model (embedding and head)".into() })
        }
    }

    /// The forward; with `targets`, the fused cross-entropy turns the logits into dlogits and the
    /// mean loss is returned.
    fn forward_inner(
        &self,
        a: &mut Acts<G::Buf>,
        s: &mut Scratch<G::Buf>,
        input: StageInput<'_>,
        arrived: Option<&G::Buf>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<Option<f32>, GpuError> {
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
        let d = Dev::new;
        match (input, self.wte, self.wpe) {
            (StageInput::Tokens(tokens), Some(wte), Some(wpe)) => {
                a.host_tokens.copy_from_slice(tokens);
                g.upload(&mut a.tokens, 0, bytemuck::cast_slice(tokens))?;
                self.await_params(wte.range())?;
                self.await_params(wpe.range())?;
                embedding::encoder_forward(
                    g,
                    dt,
                    d(&a.input),
                    d(&a.tokens),
                    self.p(wte),
                    self.p(wpe),
                    batch,
                    seq,
                    c,
                    vp,
                )?;
            }
            (StageInput::Hidden(h), _, _) => g.upload(&mut a.input, 0, &encode(h, dt))?,
            // bf16 values into a bf16 model as they are; widened for an fp32 one.
            (StageInput::HiddenBf16(h), _, _) if dt == DType::Bf16 => {
                g.upload(&mut a.input, 0, bytemuck::cast_slice(h))?;
            }
            (StageInput::HiddenBf16(h), _, _) => {
                let wide: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
                g.upload(&mut a.input, 0, &encode(&wide, dt))?;
            }
            (StageInput::Arrived, _, _) => match arrived {
                Some(b) => g.copy(d(&a.input), d(b), n * c * dt.size())?,
                None => {
                    return Err(GpuError::Shape { op: "GpuGpt::forward", detail: "no arrived input".into() });
                }
            },
            (StageInput::Tokens(_), _, _) => {
                return Err(GpuError::Shape { op: "GpuGpt::forward", detail: "no embedding".into() });
            }
        }
        for li in 0..self.blocks.len() {
            let blk = self.blocks[li];
            self.await_params(blk.range())?;
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
            self.linear(d(&l.qkv), d(&l.ln1), blk.qkv_w, Some(blk.qkv_b), n, c, 3 * c)?;
            attention::attention_forward(g, dt, d(&l.atty), d(&l.lse), d(&l.qkv), batch, seq, c, nh)?;
            self.linear(d(&s.tmp), d(&l.atty), blk.proj_w, Some(blk.proj_b), n, c, c)?;
            layernorm::residual_layernorm_forward(
                g,
                dt,
                d(&l.resid2),
                d(&l.ln2),
                d(&l.ln2_mean),
                d(&l.ln2_rstd),
                x,
                d(&s.tmp),
                self.p(blk.ln2_w),
                self.p(blk.ln2_b),
                n,
                c,
            )?;
            // fch = ln2·W + b (kept for the backward), fch_gelu = gelu(fch): in the product's
            // epilogue where the GPU has one, else a GELU kernel after it.
            let fused = self.gelu_epilogue
                && g.gemm_gelu(
                    &Gemm::linear(n, c, 4 * c, dt),
                    d(&l.fch_gelu),
                    d(&l.ln2),
                    self.p(blk.fc_w),
                    GeluEpilogue::Forward { bias: self.p(blk.fc_b), aux: d(&l.fch) },
                )?;
            if !fused {
                self.linear(d(&l.fch), d(&l.ln2), blk.fc_w, Some(blk.fc_b), n, c, 4 * c)?;
                gelu::gelu_forward(g, dt, d(&l.fch_gelu), d(&l.fch), n * 4 * c)?;
            }
            self.linear(d(&s.tmp), d(&l.fch_gelu), blk.fcproj_w, Some(blk.fcproj_b), n, 4 * c, c)?;
            g.copy(d(&l.out), d(&l.resid2), n * c * dt.size())?;
            optim::add_assign(g, dt, d(&l.out), d(&s.tmp), n * c)?;
        }
        if let (Some(t), Some(h)) = (targets, a.head.as_mut()) {
            g.upload(&mut h.targets, 0, bytemuck::cast_slice(t))?;
        }
        let (Some(h), Some((lnf_w, lnf_b)), Some(wte)) = (&a.head, self.lnf, self.wte) else {
            return Ok(None);
        };
        let x = a.layers.last().map_or(d(&a.input), |l| d(&l.out));
        self.await_params(lnf_w.offset..lnf_b.range().end)?;
        self.await_params(wte.range())?;
        layernorm::layernorm_forward(
            g,
            dt,
            d(&h.lnf),
            d(&h.lnf_mean),
            d(&h.lnf_rstd),
            x,
            self.p(lnf_w),
            self.p(lnf_b),
            n,
            c,
        )?;
        self.linear(d(&h.logits), d(&h.lnf), wte, None, n, c, vp)?;
        if targets.is_none() {
            return Ok(None);
        }
        let dloss = loss_scale / n as f32;
        crossentropy::crossentropy_forward_backward(
            g,
            dt,
            d(&h.logits),
            d(&h.losses),
            d(&h.targets),
            n,
            v,
            vp,
            dloss,
        )?;
        if self.defer_loss {
            // forward_mb keeps the losses on the device.
            return Ok(Some(f32::NAN));
        }
        let losses = download_f32(g, d(&h.losses), n, DType::F32)?;
        Ok(Some(mean_loss(&losses)))
    }

    /// Queues a copy of a forward's `n` per-token losses behind the deferred ones.
    fn stash_losses(&mut self, losses: &G::Buf, n: usize) -> Result<(), GpuError> {
        let g = self.gpu;
        let used: usize = self.deferred_counts.iter().sum();
        let need = 4 * (used + n);
        let have = self.deferred.as_ref().map_or(0, |b| g.buf_len(b));
        if have < need {
            let grown = g.alloc(need.max(2 * have))?;
            if let Some(old) = self.deferred.take() {
                g.copy(Dev::new(&grown), Dev::new(&old), 4 * used)?;
                self.retired.push(old);
            }
            self.deferred = Some(grown);
        }
        let Some(buf) = self.deferred.as_ref() else {
            return Err(GpuError::Shape { op: "GpuGpt::stash_losses", detail: "no loss buffer".into() });
        };
        g.copy(Dev::new(buf).at(used, DType::F32), Dev::new(losses), 4 * n)?;
        self.deferred_counts.push(n);
        Ok(())
    }

    /// [`GpuGpt::forward`] without waiting for the loss: the per-token losses stay on the device
    /// and the host queues the backward at once (the forward's loss is a host sync per
    /// microbatch otherwise). [`GpuGpt::take_losses`] returns the losses of the deferred forwards
    /// so far, with one copy.
    ///
    /// # Errors
    /// As [`GpuGpt::forward`].
    pub fn forward_deferred(
        &mut self,
        tokens: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
        loss_scale: f32,
    ) -> Result<(), GpuError> {
        self.whole("GpuGpt::forward")?;
        self.forward_mb_deferred(WHOLE, batch, seq, StageInput::Tokens(tokens), Some(targets), loss_scale)
    }

    /// [`GpuGpt::forward_mb`] whose loss (on a range with the head, given targets) stays on the
    /// device for [`GpuGpt::take_losses`]; see [`GpuGpt::forward_deferred`].
    ///
    /// # Errors
    /// As [`GpuGpt::forward_mb`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_mb_deferred(
        &mut self,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<(), GpuError> {
        self.defer_loss = true;
        let r = self.forward_mb(mb, batch, seq, input, targets, loss_scale);
        self.defer_loss = false;
        r.map(|_| ())
    }

    /// The mean losses of the forwards deferred since the last call, in order (the bits
    /// [`GpuGpt::forward`] returns for them); waits for them.
    ///
    /// # Errors
    /// Device errors.
    pub fn take_losses(&mut self) -> Result<Vec<f32>, GpuError> {
        let counts = std::mem::take(&mut self.deferred_counts);
        let total: usize = counts.iter().sum();
        let all = match (&self.deferred, total) {
            (_, 0) | (None, _) => Vec::new(),
            (Some(b), _) => download_f32(self.gpu, Dev::new(b), total, DType::F32)?,
        };
        self.retired.clear();
        let mut at = 0;
        Ok(counts
            .iter()
            .map(|&n| {
                at += n;
                mean_loss(&all[at - n..at])
            })
            .collect())
    }

    /// Output hidden states `[B,T,C]` of in-flight microbatch `mb` as fp32 (what a stage without
    /// the head sends to the next one); `None` when `mb` is not in flight.
    ///
    /// # Errors
    /// Device errors.
    pub fn output(&self, mb: u64) -> Result<Option<Vec<f32>>, GpuError> {
        Ok(self.output_native(mb)?.map(Hidden::into_f32))
    }

    /// [`GpuGpt::output`] in the model's storage type (bf16 values stay bf16).
    ///
    /// # Errors
    /// Device errors.
    pub fn output_native(&self, mb: u64) -> Result<Option<Hidden>, GpuError> {
        let Some(a) = self.in_flight.get(&mb) else { return Ok(None) };
        let out = a.layers.last().map_or(&a.input, |l| &l.out);
        let n = a.batch * a.seq * self.cfg.hidden_size;
        download_native(self.gpu, Dev::new(out), n, self.dtype).map(Some)
    }

    /// Gradient of the range's input `[B,T,C]` after the latest [`GpuGpt::backward_mb`], as fp32
    /// (what a stage without the embedding sends to the previous one).
    ///
    /// # Errors
    /// No backward has run; device errors.
    pub fn input_grad(&self) -> Result<Vec<f32>, GpuError> {
        self.input_grad_native().map(Hidden::into_f32)
    }

    /// [`GpuGpt::input_grad`] in the model's storage type (bf16 values stay bf16: what a
    /// pipeline message carries, without a conversion).
    ///
    /// # Errors
    /// No backward has run; device errors.
    pub fn input_grad_native(&self) -> Result<Hidden, GpuError> {
        let (Some(n), Some(s)) = (self.last_backward_n, self.scratch.as_ref()) else {
            return Err(GpuError::Shape { op: "GpuGpt::input_grad", detail: "no backward has run".into() });
        };
        download_native(self.gpu, Dev::new(&s.dres), n * self.cfg.hidden_size, self.dtype)
    }

    /// Drops the stored activations of `mb` without its backward (evaluation).
    pub fn release(&mut self, mb: u64) {
        if let Some(a) = self.in_flight.remove(&mb) {
            self.free.push(a);
        }
        if let Some(st) = self.pending_w.remove(&mb) {
            self.free_stash.push(st);
        }
    }

    /// Logits `[B·T, V]` (padding columns dropped) of one forward, as fp32 (tests and tools).
    ///
    /// # Errors
    /// As [`GpuGpt::forward`].
    pub fn logits(&mut self, tokens: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>, GpuError> {
        self.whole("GpuGpt::logits")?;
        self.forward_mb(LOGITS, batch, seq, StageInput::Tokens(tokens), None, 1.0)?;
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab_size());
        let logits = match self.in_flight.get(&LOGITS).and_then(|a| a.head.as_ref()) {
            Some(h) => download_f32(self.gpu, Dev::new(&h.logits), batch * seq * vp, self.dtype),
            None => Err(GpuError::Shape { op: "GpuGpt::logits", detail: "no head".into() }),
        };
        self.release(LOGITS);
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
        self.release(WHOLE);
        Ok(loss)
    }

    /// Backward of the whole-model microbatch of the last [`GpuGpt::forward`]; parameter
    /// gradients accumulate.
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
        if !self.in_flight.contains_key(&WHOLE) {
            return Err(GpuError::Shape { op: "GpuGpt::backward", detail: "no forward is pending".into() });
        }
        self.backward_mb(WHOLE, None, ready)
    }

    /// Backward of in-flight microbatch `mb`, freeing its activations. The head range starts
    /// from its stored dlogits (`dout` must be `None`); other ranges take `dout`, the gradient of
    /// their output `[B,T,C]`. Parameter gradients accumulate (the head's use of the tied `wte`
    /// adds into `wte`'s gradient directly); the input gradient is then in
    /// [`GpuGpt::input_grad`]. `ready` reports finished arena ranges as in
    /// [`GpuGpt::backward_with`].
    ///
    /// # Errors
    /// An unknown microbatch, `dout` missing, given to the head or of the wrong length; device
    /// errors and whatever `ready` returns.
    pub fn backward_mb(
        &mut self,
        mb: u64,
        dout: Option<&[f32]>,
        ready: &mut GradsReady<'_, G::Buf>,
    ) -> Result<(), GpuError> {
        self.backward_mb_grad(mb, dout.map(GradRef::F32), ready)
    }

    /// [`GpuGpt::backward_mb`] with the output gradient as sent (a bf16 gradient goes up as it
    /// is into a bf16 model).
    ///
    /// # Errors
    /// As [`GpuGpt::backward_mb`].
    pub fn backward_mb_grad(
        &mut self,
        mb: u64,
        dout: Option<GradRef<'_>>,
        ready: &mut GradsReady<'_, G::Buf>,
    ) -> Result<(), GpuError> {
        const OP: &str = "GpuGpt::backward";
        let (arrived, n) = self.prepare_backward(OP, mb, dout)?;
        let dout = OutGrad::of(dout, arrived.as_ref());
        self.ensure_scratch(n)?;
        let acts = self.in_flight.remove(&mb).ok_or(GpuError::Shape { op: OP, detail: "lost".into() })?;
        let mut scratch =
            self.scratch.take().ok_or(GpuError::Shape { op: OP, detail: "no scratch".into() })?;
        let result = self.backward_inner(&acts, &mut scratch, dout, ready);
        self.scratch = Some(scratch);
        if let Some(b) = arrived {
            self.recycle_message(b);
        }
        self.free.push(acts);
        self.last_backward_n = result.is_ok().then_some(n);
        result
    }

    /// Checks a backward of `mb` before any device work: in flight, no split backward started,
    /// `dout` present exactly when the range has no head, of the output's length. Returns N.
    /// Before a backward of `mb` given `dout`: the output gradient that arrived on the device
    /// (if any) and N, after the checks; a refused backward frees the arrival.
    fn prepare_backward(
        &mut self,
        op: &'static str,
        mb: u64,
        dout: Option<GradRef<'_>>,
    ) -> Result<(Option<G::Buf>, usize), GpuError> {
        let arrived = self.arrived_dout(op, mb, dout)?;
        match self.check_backward(op, mb, OutGrad::of(dout, arrived.as_ref())) {
            Ok(n) => Ok((arrived, n)),
            Err(e) => {
                if let Some(b) = arrived {
                    self.recycle_message(b);
                }
                Err(e)
            }
        }
    }

    fn check_backward(
        &self,
        op: &'static str,
        mb: u64,
        dout: Option<OutGrad<'_, G::Buf>>,
    ) -> Result<usize, GpuError> {
        let Some(a) = self.in_flight.get(&mb) else {
            return Err(GpuError::Shape {
                op,
                detail: format!("no stored activations for microbatch {mb}: backward without forward"),
            });
        };
        if self.pending_w.contains_key(&mb) {
            return Err(GpuError::Shape {
                op,
                detail: format!(
                    "microbatch {mb}: backward_input already ran, so only its backward_weight may follow"
                ),
            });
        }
        let n = a.batch * a.seq;
        match (dout, self.range.head) {
            (Some(_), true) => {
                return Err(GpuError::Shape {
                    op,
                    detail: "the head range starts from its dlogits: pass no output gradient".into(),
                });
            }
            (None, false) => {
                return Err(GpuError::Shape {
                    op,
                    detail: "a range without the head needs the gradient of its output".into(),
                });
            }
            (Some(OutGrad::Host(h)), false) if h.len() != n * self.cfg.hidden_size => {
                return Err(GpuError::Shape {
                    op,
                    detail: format!(
                        "output gradient: {} values, expected {}",
                        h.len(),
                        n * self.cfg.hidden_size
                    ),
                });
            }
            (Some(OutGrad::Device(b)), false)
                if self.gpu.buf_len(b) != n * self.cfg.hidden_size * self.dtype.size() =>
            {
                return Err(GpuError::Shape {
                    op,
                    detail: format!(
                        "output gradient arrived on the device: {} bytes, expected {}",
                        self.gpu.buf_len(b),
                        n * self.cfg.hidden_size * self.dtype.size()
                    ),
                });
            }
            _ => {}
        }
        Ok(n)
    }

    fn gr(&self, s: Span) -> Dev<'_, G::Buf> {
        Dev::new(&self.grads).at(s.offset, DType::F32)
    }

    /// LayerNorm backward over N rows with weight `w` and the forward's (mean, rstd): `dx +=`
    /// the input gradient, `(dw, db) +=` the parameter gradients (a split backward sends the half
    /// it does not want to a sink).
    #[allow(clippy::too_many_arguments)]
    fn ln_backward(
        &self,
        s: &Scratch<G::Buf>,
        dx: Dev<'_, G::Buf>,
        (dw, db): (Dev<'_, G::Buf>, Dev<'_, G::Buf>),
        dout: Dev<'_, G::Buf>,
        x: Dev<'_, G::Buf>,
        w: Span,
        (mean, rstd): (Dev<'_, G::Buf>, Dev<'_, G::Buf>),
        n: usize,
    ) -> Result<(), GpuError> {
        let scratch = Dev::new(&s.ln_scratch);
        let c = self.cfg.hidden_size;
        layernorm::layernorm_backward(
            self.gpu,
            self.dtype,
            dx,
            dw,
            db,
            scratch,
            dout,
            x,
            self.p(w),
            mean,
            rstd,
            n,
            c,
        )
    }

    /// `out = inp·Wᵀ + b` over N rows, `inp` `[N, k]`, `out` `[N, m]` (overwrite).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        out: Dev<'_, G::Buf>,
        inp: Dev<'_, G::Buf>,
        w: Span,
        b: Option<Span>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<(), GpuError> {
        self.gpu.gemm(&Gemm::linear(n, k, m, self.dtype), out, inp, self.p(w), b.map(|b| self.p(b)))
    }

    /// `dinp = dout·W` (overwrite), `dW += doutᵀ·inp`, `db += Σ_rows dout`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        s: &Scratch<G::Buf>,
        dinp: Dev<'_, G::Buf>,
        dout: Dev<'_, G::Buf>,
        inp: Dev<'_, G::Buf>,
        w: Span,
        b: Option<Span>,
        n: usize,
        k: usize,
        out: usize,
    ) -> Result<(), GpuError> {
        self.gpu.gemm(&Gemm::linear_backward_input(n, k, out, self.dtype), dinp, dout, self.p(w), None)?;
        self.linear_backward_weight(s, dout, inp, w, b, n, k, out)
    }

    /// The gradient at the MLP's pre-activation `fch` from the gradient `dres` at the MLP's
    /// output: `dfch = (dres·W_proj) · gelu'(fch)`, in the product's epilogue where the GPU has
    /// one, else through `dtmp` and the GELU backward kernel.
    fn mlp_input_grad(
        &self,
        dfch: Dev<'_, G::Buf>,
        dtmp: Dev<'_, G::Buf>,
        dres: Dev<'_, G::Buf>,
        fch: Dev<'_, G::Buf>,
        w: Span,
        n: usize,
    ) -> Result<(), GpuError> {
        let (g, dt, c) = (self.gpu, self.dtype, self.cfg.hidden_size);
        let gemm = Gemm::linear_backward_input(n, 4 * c, c, dt);
        if self.gelu_epilogue
            && g.gemm_gelu(&gemm, dfch, dres, self.p(w), GeluEpilogue::Backward { aux: fch })?
        {
            return Ok(());
        }
        g.gemm(&gemm, dtmp, dres, self.p(w), None)?;
        gelu::gelu_backward(g, dt, dfch, fch, dtmp, n * 4 * c)
    }

    /// The parameter half of [`GpuGpt::linear_backward`]: `dW += doutᵀ·inp`, `db += Σ_rows dout`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_weight(
        &self,
        s: &Scratch<G::Buf>,
        dout: Dev<'_, G::Buf>,
        inp: Dev<'_, G::Buf>,
        w: Span,
        b: Option<Span>,
        n: usize,
        k: usize,
        out: usize,
    ) -> Result<(), GpuError> {
        let (g, dt) = (self.gpu, self.dtype);
        g.gemm(&Gemm::linear_backward_weight(n, k, out, dt), self.gr(w), dout, inp, None)?;
        if let Some(b) = b {
            optim::bias_grad(g, self.gr(b), DType::F32, dout, dt, n, out, Dev::new(&s.bias_scratch))?;
        }
        Ok(())
    }

    fn backward_inner(
        &self,
        a: &Acts<G::Buf>,
        s: &mut Scratch<G::Buf>,
        dout: Option<OutGrad<'_, G::Buf>>,
        ready: &mut GradsReady<'_, G::Buf>,
    ) -> Result<(), GpuError> {
        let g = self.gpu;
        let dt = self.dtype;
        let (batch, seq) = (a.batch, a.seq);
        let n = batch * seq;
        let (c, nh, vp) = (self.cfg.hidden_size, self.cfg.num_attention_heads, self.cfg.padded_vocab_size());
        let d = Dev::new;
        match (&a.head, self.lnf, self.wte, dout) {
            (Some(h), Some((lnf_w, lnf_b)), Some(wte), None) => {
                // Head: dlnf = dlogits·wte; the tied wte gradient accumulates here (and again in
                // the embedding backward of the range that holds the embedding).
                self.linear_backward(s, d(&s.dln), d(&h.logits), d(&h.lnf), wte, None, n, c, vp)?;
                g.zero(d(&s.dres), n * c * dt.size())?;
                let last_out = a.layers.last().map_or(d(&a.input), |l| d(&l.out));
                self.ln_backward(
                    s,
                    d(&s.dres),
                    (self.gr(lnf_w), self.gr(lnf_b)),
                    d(&s.dln),
                    last_out,
                    lnf_w,
                    (d(&h.lnf_mean), d(&h.lnf_rstd)),
                    n,
                )?;
                ready(lnf_w.offset..lnf_b.range().end, &self.grads)?;
            }
            (None, _, _, Some(h)) => h.write(g, &mut s.dres, n * c, dt)?,
            _ => {
                return Err(GpuError::Shape {
                    op: "GpuGpt::backward",
                    detail: "the output gradient does not fit the layer range".into(),
                });
            }
        }
        for li in (0..self.blocks.len()).rev() {
            let blk = self.blocks[li];
            let x = if li == 0 { d(&a.input) } else { d(&a.layers[li - 1].out) };
            let l = &a.layers[li];
            self.mlp_input_grad(d(&s.dbig2), d(&s.dbig1), d(&s.dres), d(&l.fch), blk.fcproj_w, n)?;
            self.linear_backward_weight(
                s,
                d(&s.dres),
                d(&l.fch_gelu),
                blk.fcproj_w,
                Some(blk.fcproj_b),
                n,
                4 * c,
                c,
            )?;
            self.linear_backward(
                s,
                d(&s.dln),
                d(&s.dbig2),
                d(&l.ln2),
                blk.fc_w,
                Some(blk.fc_b),
                n,
                c,
                4 * c,
            )?;
            self.ln_backward(
                s,
                d(&s.dres),
                (self.gr(blk.ln2_w), self.gr(blk.ln2_b)),
                d(&s.dln),
                d(&l.resid2),
                blk.ln2_w,
                (d(&l.ln2_mean), d(&l.ln2_rstd)),
                n,
            )?;
            self.linear_backward(
                s,
                d(&s.datty),
                d(&s.dres),
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
                d(&s.dqkv),
                d(&s.dsum),
                d(&s.datty),
                d(&l.atty),
                d(&l.lse),
                d(&l.qkv),
                batch,
                seq,
                c,
                nh,
            )?;
            self.linear_backward(
                s,
                d(&s.dln),
                d(&s.dqkv),
                d(&l.ln1),
                blk.qkv_w,
                Some(blk.qkv_b),
                n,
                c,
                3 * c,
            )?;
            self.ln_backward(
                s,
                d(&s.dres),
                (self.gr(blk.ln1_w), self.gr(blk.ln1_b)),
                d(&s.dln),
                x,
                blk.ln1_w,
                (d(&l.ln1_mean), d(&l.ln1_rstd)),
                n,
            )?;
            ready(blk.range(), &self.grads)?;
        }
        if let (true, Some(wte), Some(wpe)) = (self.range.embedding, self.wte, self.wpe) {
            embedding::encoder_backward(
                g,
                dt,
                self.gr(wte),
                self.gr(wpe),
                d(&s.dres),
                &a.host_tokens,
                &mut s.emb_workspace,
                batch,
                seq,
                c,
                self.cfg.vocab_size,
            )?;
            ready(wte.offset..wpe.range().end, &self.grads)?;
        }
        Ok(())
    }

    /// Zeroes the gradients.
    pub fn zero_grads(&mut self) -> Result<(), GpuError> {
        self.gpu.zero(Dev::new(&self.grads), self.table.len() * 4)
    }

    /// L2 norm of all gradients (f64 accumulation, fixed order).
    pub fn grad_norm(&self) -> Result<f64, GpuError> {
        // The arena is contiguous: one sum over all of it (two launches, not one per tensor).
        let n = self.table.len();
        Ok(optim::sum_squares(self.gpu, DType::F32, Dev::new(&self.grads), n, Dev::new(&self.norm_scratch))?
            .sqrt())
    }

    /// Clips the gradients to `max_norm` (0 disables clipping; Megatron's global-norm rule) and
    /// applies one AdamW update with learning rate `lr`. Returns the norm before clipping.
    pub fn step(&mut self, lr: f32, adam: &AdamWConfig, max_norm: f32) -> Result<f64, GpuError> {
        let norm = self.grad_norm()?;
        let scale = crate::optim::clip_coefficient(norm, max_norm).unwrap_or(1.0);
        self.adamw_update(lr, adam, self.adam_steps + 1, scale)?;
        Ok(norm)
    }

    /// One AdamW update numbered `step` (1-based; bias corrections use it) with the gradients
    /// multiplied by `grad_scale` first (a clip coefficient computed elsewhere, e.g. from the
    /// global norm of all pipeline stages). The update count becomes `step`.
    ///
    /// # Errors
    /// `step == 0`; device errors.
    pub fn adamw_update(
        &mut self,
        lr: f32,
        adam: &AdamWConfig,
        step: u64,
        grad_scale: f32,
    ) -> Result<(), GpuError> {
        if step == 0 {
            return Err(GpuError::Shape { op: "GpuGpt::adamw_update", detail: "step is 1-based".into() });
        }
        self.await_all_params()?;
        self.moments_mut()?;
        self.adam_steps = step;
        let Some((m, v)) = self.moments.as_ref() else {
            return Err(GpuError::Shape { op: "GpuGpt::adamw_update", detail: "no moments".into() });
        };
        let h = |decay: bool| AdamWStep {
            lr,
            beta1: adam.beta1,
            beta2: adam.beta2,
            eps: adam.eps,
            weight_decay: if decay { adam.weight_decay } else { 0.0 },
            step,
        };
        // Buffers of `len` elements from arena element `at` (moments, and the master weights
        // when there are any, from `base + at - start`).
        let bufs = |at: usize, moment: usize| optim::AdamWBufs {
            params: match &self.master {
                Some(master) => Dev::new(master).at(moment, DType::F32),
                None => Dev::new(&self.params).at(at, DType::F32),
            },
            m: Dev::new(m).at(moment, DType::F32),
            v: Dev::new(v).at(moment, DType::F32),
            grads: Dev::new(&self.grads).at(at, DType::F32),
            grad_dtype: DType::F32,
            copy: self.master.as_ref().map(|_| (Dev::new(&self.params).at(at, self.dtype), self.dtype)),
        };
        for part in &self.opt_parts {
            let r = &part.range;
            if let Some(runs) = part.runs.as_ref() {
                // `weight_decay` is the decaying runs' own; the others get none in the kernel.
                optim::adamw_runs(self.gpu, &bufs(r.start, part.base), runs, &h(true), grad_scale)?;
                continue;
            }
            for spec in self.table.specs() {
                let t = spec.span.range();
                let (lo, hi) = (t.start.max(r.start), t.end.min(r.end));
                if lo < hi {
                    let b = bufs(lo, part.base + lo - r.start);
                    optim::adamw(self.gpu, &b, hi - lo, &h(spec.decay), grad_scale)?;
                }
            }
        }
        Ok(())
    }

    /// Restricts the optimizer to arena `ranges` (sorted, disjoint): this rank's shard under
    /// the distributed optimizer (ZeRO-1). Moments, and in bf16 the fp32 master weights, are
    /// then held for those elements only (Megatron's distributed optimizer; the bf16 copy the
    /// kernels read stays whole), and [`GpuGpt::adamw_update`] changes only them (the other
    /// ranks' parts come from their owners: [`GpuGpt::params_range`]). Call before the first
    /// update or restore.
    ///
    /// # Errors
    /// Ranges unsorted, overlapping or outside the arena; moments already allocated; master
    /// weights already sharded; device errors.
    pub fn set_optimizer_shard(&mut self, ranges: &[std::ops::Range<usize>]) -> Result<(), GpuError> {
        const OP: &str = "GpuGpt::set_optimizer_shard";
        let n = self.table.len();
        let mut end = 0;
        for r in ranges {
            if r.start < end || r.start > r.end || r.end > n {
                return Err(GpuError::Shape {
                    op: OP,
                    detail: format!("ranges {ranges:?} are not sorted, disjoint ranges of {n} parameters"),
                });
            }
            end = r.end;
        }
        if self.moments.is_some() {
            return Err(GpuError::Shape {
                op: OP,
                detail: "the moments are already allocated (set the shard before the first update)".into(),
            });
        }
        let parts = opt_parts(self.gpu, &self.table, ranges)?;
        let len: usize = parts.iter().map(|p| p.range.len()).sum();
        if self.master.is_some() && !self.master_is_whole() {
            return Err(GpuError::Shape {
                op: OP,
                detail: "the master weights are already sharded (their other parts are gone)".into(),
            });
        }
        if let Some(m) = self.master.as_ref().filter(|_| len < n) {
            // Keep the shard's fp32 master weights only, side by side as the moments will be.
            let kept = self.gpu.alloc(len * 4)?;
            for p in &parts {
                let (dst, src) =
                    (Dev::new(&kept).at(p.base, DType::F32), Dev::new(m).at(p.range.start, DType::F32));
                self.gpu.copy(dst, src, p.range.len() * 4)?;
            }
            self.master = Some(kept);
        }
        self.opt_parts = parts;
        Ok(())
    }

    /// The arena ranges the optimizer updates here (the whole arena unless sharded).
    pub fn optimizer_shard(&self) -> Vec<std::ops::Range<usize>> {
        self.opt_parts.iter().map(|p| p.range.clone()).collect()
    }

    /// Parameters the optimizer updates here (the length of each moment buffer).
    pub fn optimizer_len(&self) -> usize {
        self.opt_parts.iter().map(|p| p.range.len()).sum()
    }

    /// The parameters the kernels read in arena `range` on the device, and their type (bf16 or
    /// fp32), for a collective that fills them in place: the distributed optimizer's gather,
    /// which broadcasts each part from its owner (whose [`GpuGpt::adamw_update`] wrote them,
    /// rounded from its master weights in bf16) — in bf16, half the bytes of the fp32 masters.
    ///
    /// # Errors
    /// A range outside the arena.
    pub fn params_range(&self, range: std::ops::Range<usize>) -> Result<(Dev<'_, G::Buf>, DType), GpuError> {
        self.await_all_params()?;
        let n = self.table.len();
        if range.start > range.end || range.end > n {
            return Err(GpuError::Shape {
                op: "GpuGpt::params_range",
                detail: format!("range {range:?} of {n} parameters"),
            });
        }
        Ok((Dev::new(&self.params).at(range.start, self.dtype), self.dtype))
    }

    /// `Σ g²` of each arena range of the gradients, in double and a fixed order (one download
    /// for all of them): the per-tensor sums a pipeline's global gradient norm is built from.
    ///
    /// # Errors
    /// A range outside the arena; device errors.
    pub fn grad_sum_squares(&mut self, ranges: &[std::ops::Range<usize>]) -> Result<Vec<f64>, GpuError> {
        let n = self.table.len();
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > n) {
            return Err(GpuError::Shape {
                op: "GpuGpt::grad_sum_squares",
                detail: format!("range {r:?} of {n} gradients"),
            });
        }
        let live: Vec<usize> = (0..ranges.len()).filter(|&i| !ranges[i].is_empty()).collect();
        let mut out = vec![0.0f64; ranges.len()];
        if live.is_empty() {
            return Ok(out);
        }
        // Layout: one total per range, then every range's partials side by side.
        let counts: Vec<usize> =
            live.iter().map(|&i| optim::sum_squares_partial_count(ranges[i].len())).collect();
        let bytes = 8 * (live.len() + counts.iter().sum::<usize>());
        if self.sq_scratch.as_ref().is_none_or(|b| self.gpu.buf_len(b) < bytes) {
            self.sq_scratch = None;
            self.sq_scratch = Some(self.gpu.alloc(bytes)?);
        }
        let Some(scratch) = self.sq_scratch.as_ref() else {
            return Err(GpuError::Shape { op: "GpuGpt::grad_sum_squares", detail: "no scratch".into() });
        };
        let mut at = 8 * live.len();
        for (k, &i) in live.iter().enumerate() {
            let r = &ranges[i];
            let x = Dev::new(&self.grads).at(r.start, DType::F32);
            let partials = Dev { buf: scratch, offset: at };
            let c = optim::sum_squares_partials(self.gpu, DType::F32, partials, x, r.len())?;
            optim::sum_squares_finish(self.gpu, Dev { buf: scratch, offset: 8 * k }, partials, c)?;
            at += 8 * c;
        }
        let mut totals = vec![0u8; 8 * live.len()];
        self.gpu.download(scratch, 0, &mut totals)?;
        for (k, &i) in live.iter().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&totals[8 * k..8 * k + 8]);
            out[i] = f64::from_le_bytes(b);
        }
        Ok(out)
    }

    /// Overwrites an arena range of the gradients with fp32 `values` (ordered after the queued
    /// work): reduced or injected gradients coming back from the host.
    ///
    /// # Errors
    /// A range outside the arena or of another length than `values`; device errors.
    pub fn set_grads_range(&mut self, range: std::ops::Range<usize>, values: &[f32]) -> Result<(), GpuError> {
        let n = self.table.len();
        if range.start > range.end || range.end > n || range.len() != values.len() {
            return Err(GpuError::Shape {
                op: "GpuGpt::set_grads_range",
                detail: format!("{} values for range {range:?} of {n} gradients", values.len()),
            });
        }
        let at = Dev::new(&self.grads).at(range.start, DType::F32);
        self.gpu.write(at, bytemuck::cast_slice(values))
    }
}
