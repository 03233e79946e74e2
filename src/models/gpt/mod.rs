//! GPT with explicit forward and backward per layer.
//!
//! Dimension letters: B batch, T sequence, C hidden, NH heads, Vp padded vocabulary, N = B·T.
//!
//! A [`Gpt`] holds a contiguous [`LayerRange`] of the model (optionally with the embedding and/or
//! the head); the full model is the range that covers everything. Forward of microbatch `mb`
//! stores that microbatch's activations under its id; its backward consumes and frees them, so any
//! number of microbatches may be in flight (what pipeline schedules need). Parameter gradients
//! accumulate across microbatches until [`Gpt::zero_grads`].
//!
//! Zero-bubble schedules split a backward in two (`split.rs`): **I**, [`Gpt::backward_input`],
//! computes only the gradient w.r.t. the range input (what the previous stage waits for) and
//! keeps the gradient at the output of every op with parameters; **W**,
//! [`Gpt::backward_weight`], later turns those into the parameter gradients and frees the
//! microbatch, whose activations stay stored (and counted by [`Gpt::in_flight`]) until then. I
//! then W runs the same kernels on the same values as [`Gpt::backward`], so it gives the same bits;
//! with several microbatches split, gradients accumulate in the order of their W's, exactly as
//! fused backwards in that order would.

mod acts;
pub mod config;
mod generate;
mod layout;
mod split;

use std::collections::HashMap;

use acts::{Acts, LayerActs, OutputGrads, Scratch};
pub use config::{GptConfig, LayerRange, ModelError};
pub use generate::{Generator, Sampling, sample};
use layout::{BlockSpans, Layout};

use crate::kernels::Backend;
use crate::models::params::{ParamTable, Span, two_mut};
use crate::tensor::Tensor;

/// Host bytes a [`Gpt`] of one layer range holds on the CPU, computed without building it.
/// Every figure is what the model's arenas and buffers allocate, so an estimate built from it
/// tracks the code (tested against the allocations themselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RangeMemory {
    /// Parameter arena (fp32).
    pub params: u64,
    /// Gradient arena plus the head's separate tied-embedding gradient.
    pub grads: u64,
    /// Activations one in-flight microbatch keeps from its forward to its backward.
    pub acts_per_microbatch: u64,
    /// Output gradients one microbatch keeps between a split backward's halves.
    pub output_grads_per_microbatch: u64,
    /// Scratch reused by every microbatch.
    pub scratch: u64,
}

impl RangeMemory {
    /// Bytes of a model instance of `range` training microbatches of `batch × seq` tokens
    /// (`split`: a zero-bubble schedule splits its backwards).
    pub fn of(cfg: &GptConfig, range: LayerRange, batch: usize, seq: usize, split: bool) -> Self {
        let (table, layout) = layout::build(cfg, range);
        let c = cfg.hidden_size;
        let layers = range.last.saturating_sub(range.first);
        let tied = if range.head { layout.wte.map_or(0, |s| s.len) } else { 0 };
        let vp = range.head.then(|| cfg.padded_vocab_size());
        let words = |w: usize| 4 * w as u64;
        Self {
            params: words(table.len()),
            grads: words(table.len() + tied),
            acts_per_microbatch: words(acts::acts_words(batch, seq, c, cfg.num_attention_heads, layers, vp)),
            output_grads_per_microbatch: words(acts::output_grads_words(
                batch,
                seq,
                c,
                layers,
                range.head,
                range.embedding,
            )),
            scratch: words(acts::scratch_words(batch * seq, c, split)),
        }
    }
}

/// The parameter table of `range` (names, shapes, arena order) without building the model.
pub fn param_table(cfg: &GptConfig, range: LayerRange) -> ParamTable {
    layout::build(cfg, range).0
}

/// What a range consumes: token ids (first stage) or hidden states `[B,T,C]` from the previous
/// stage.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a [f32]),
    /// Hidden states as bf16 (a bf16 stage's output, as a pipeline message carries it): a bf16
    /// GPU stage takes them as they are; the CPU model widens them to fp32.
    HiddenBf16(&'a [half::bf16]),
    /// The hidden states already arrived on the stage's device: a pipeline message the GPU
    /// stage received there itself (device links). Only GPU stages take it.
    Arrived,
}

/// The gradient of a stage's output as a backward takes it: fp32, or bf16 as a bf16 stage sent
/// it (a bf16 GPU stage uploads it as it is; others widen it, exactly).
#[derive(Debug, Clone, Copy)]
pub enum GradRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl<'a> GradRef<'a> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            GradRef::F32(v) => v.len(),
            GradRef::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as fp32: borrowed, or widened (exactly) from bf16.
    pub fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        match self {
            GradRef::F32(v) => std::borrow::Cow::Borrowed(v),
            GradRef::Bf16(v) => std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }
}

/// Hidden states or their gradient as a stage hands them over: fp32, or bf16 when a bf16 GPU
/// stage computed them (its values are bf16, so nothing is rounded).
#[derive(Debug, Clone, PartialEq)]
pub enum Hidden {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Default for Hidden {
    fn default() -> Self {
        Hidden::F32(Vec::new())
    }
}

impl Hidden {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Hidden::F32(v) => v.len(),
            Hidden::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as fp32 (exact: bf16 widens without rounding).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Hidden::F32(v) => v,
            Hidden::Bf16(v) => v.into_iter().map(half::bf16::to_f32).collect(),
        }
    }

    /// These values as the gradient a backward takes.
    pub fn as_grad(&self) -> GradRef<'_> {
        match self {
            Hidden::F32(v) => GradRef::F32(v),
            Hidden::Bf16(v) => GradRef::Bf16(v),
        }
    }

    /// A model input of these hidden states.
    pub fn as_input(&self) -> StageInput<'_> {
        match self {
            Hidden::F32(v) => StageInput::Hidden(v),
            Hidden::Bf16(v) => StageInput::HiddenBf16(v),
        }
    }

    /// Overwrites the first value (fault injection); nothing when empty.
    pub fn set_first(&mut self, x: f32) {
        match self {
            Hidden::F32(v) => {
                if let Some(a) = v.first_mut() {
                    *a = x;
                }
            }
            Hidden::Bf16(v) => {
                if let Some(a) = v.first_mut() {
                    *a = half::bf16::from_f32(x);
                }
            }
        }
    }
}

/// A GPT (or a layer range of one) with its parameter and gradient arenas.
#[derive(Debug)]
pub struct Gpt {
    cfg: GptConfig,
    range: LayerRange,
    table: ParamTable,
    layout: Layout,
    params: Vec<f32>,
    grads: Vec<f32>,
    /// Gradient of the LM head's use of the tied `wte`, kept apart from the embedding's so that
    /// `wte`'s gradient is always `embedding part + head part` in that order, whether the two
    /// parts live in one range or in two pipeline stages (see [`Gpt::fold_tied_grad`]).
    tied_grad: Vec<f32>,
    in_flight: HashMap<u64, Acts>,
    free: Vec<Acts>,
    /// Microbatches whose backward-input ran and backward-weight has not: the output gradients
    /// W needs (their activations stay in `in_flight`). Keys are always in `in_flight` too.
    pending_w: HashMap<u64, OutputGrads>,
    free_pending_w: Vec<OutputGrads>,
    scratch: Scratch,
}

impl Gpt {
    /// The whole model, initialised from `seed`.
    ///
    /// # Errors
    /// [`ModelError::BadConfig`] when the configuration is invalid.
    pub fn new(cfg: &GptConfig, seed: u64) -> Result<Self, ModelError> {
        Self::new_range(cfg, LayerRange::full(cfg), seed)
    }

    /// Layers `range.first..range.last` (plus embedding/head as the range says), with exactly the
    /// initial values those tensors have in the full model built from the same seed.
    ///
    /// # Errors
    /// [`ModelError::BadConfig`] or [`ModelError::BadRange`].
    pub fn new_range(cfg: &GptConfig, range: LayerRange, seed: u64) -> Result<Self, ModelError> {
        Self::build(cfg, range, Some(seed))
    }

    /// The whole model with every parameter zero, for weights about to be restored from a
    /// checkpoint (skips the random initialisation, which dominates loading a large model).
    ///
    /// # Errors
    /// [`ModelError::BadConfig`] when the configuration is invalid.
    pub fn new_zeroed(cfg: &GptConfig) -> Result<Self, ModelError> {
        Self::build(cfg, LayerRange::full(cfg), None)
    }

    fn build(cfg: &GptConfig, range: LayerRange, seed: Option<u64>) -> Result<Self, ModelError> {
        cfg.validate()?;
        if range.first > range.last || range.last > cfg.num_layers {
            return Err(ModelError::BadRange {
                first: range.first,
                last: range.last,
                num_layers: cfg.num_layers,
            });
        }
        let (table, layout) = layout::build(cfg, range);
        let mut params = vec![0.0; table.len()];
        if let Some(seed) = seed {
            layout::init(cfg, &table, &mut params, seed);
        }
        let grads = vec![0.0; table.len()];
        let tied_grad = if range.head { vec![0.0; layout.wte.map_or(0, |s| s.len)] } else { Vec::new() };
        Ok(Self {
            cfg: cfg.clone(),
            range,
            table,
            layout,
            params,
            grads,
            tied_grad,
            in_flight: HashMap::new(),
            free: Vec::new(),
            pending_w: HashMap::new(),
            free_pending_w: Vec::new(),
            scratch: Scratch::default(),
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// The (name, shape) table of this range's parameters, in arena order.
    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// Parameters and gradients at once (what an optimizer step needs).
    pub fn params_and_grads_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.params, &mut self.grads)
    }

    /// The table with mutable parameters and gradients (an optimizer step without copying the
    /// table).
    pub fn split_mut(&mut self) -> (&ParamTable, &mut [f32], &mut [f32]) {
        (&self.table, &mut self.params, &mut self.grads)
    }

    /// A named parameter tensor.
    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.table.get(name).map(|s| &self.params[s.span.range()])
    }

    pub fn param_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let span = self.table.get(name)?.span;
        Some(&mut self.params[span.range()])
    }

    /// A named gradient tensor.
    pub fn grad(&self, name: &str) -> Option<&[f32]> {
        self.table.get(name).map(|s| &self.grads[s.span.range()])
    }

    pub fn grad_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let span = self.table.get(name)?.span;
        Some(&mut self.grads[span.range()])
    }

    /// Zeroes the gradient arena and the head's pending tied-embedding gradient.
    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
        self.tied_grad.fill(0.0);
    }

    /// Adds the head's accumulated `wte` gradient into the arena's `wte` gradient and clears it.
    /// Call once after the last backward of a step, before reading `wte`'s gradient: for a range
    /// with both embedding and head this forms `embedding part + head part`; for a head-only
    /// pipeline stage it forms the head part, which the embedding group then adds to the first
    /// stage's embedding part — the same sum, so the same bits.
    pub fn fold_tied_grad(&mut self, be: &dyn Backend) {
        if let Some(wte) = self.layout.wte.filter(|_| self.range.head) {
            be.add_assign(&mut self.grads[wte.range()], &self.tied_grad);
            self.tied_grad.fill(0.0);
        }
    }

    /// Arena range of the tied `wte`, if this range holds it.
    pub fn wte_range(&self) -> Option<std::ops::Range<usize>> {
        self.layout.wte.map(|s| s.range())
    }

    /// Number of microbatches whose activations are stored (forward ran; backward, or
    /// backward-weight, has not).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes stored for in-flight microbatches: their activations, plus the output gradients
    /// kept between a split backward's input and weight halves.
    pub fn activation_bytes(&self) -> usize {
        self.in_flight.values().map(Acts::bytes).sum::<usize>()
            + self.pending_w.values().map(OutputGrads::bytes).sum::<usize>()
    }

    /// Every byte the instance holds in its arenas and buffers, in the fields of
    /// [`RangeMemory`] (activations and output gradients as currently held, free ones included).
    pub fn held_bytes(&self) -> RangeMemory {
        let acts = self.in_flight.values().chain(&self.free).map(Acts::bytes).sum::<usize>();
        let outs = self.pending_w.values().chain(&self.free_pending_w).map(OutputGrads::bytes).sum::<usize>();
        RangeMemory {
            params: 4 * self.params.len() as u64,
            grads: 4 * (self.grads.len() + self.tied_grad.len()) as u64,
            acts_per_microbatch: acts as u64,
            output_grads_per_microbatch: outs as u64,
            scratch: self.scratch.bytes() as u64,
        }
    }

    /// Output hidden states `[B,T,C]` of an in-flight microbatch (what a non-last stage sends).
    pub fn output(&self, mb: u64) -> Option<&[f32]> {
        let a = self.in_flight.get(&mb)?;
        Some(a.layers.last().map_or(&a.input, |l| &l.out))
    }

    /// Gradient w.r.t. the range input after the latest backward or backward-input (what a
    /// non-first stage sends back). Overwritten by the next one of those.
    pub fn input_grad(&self) -> &[f32] {
        &self.scratch.dinput
    }

    /// Drops the stored activations of `mb` (and output gradients, if its backward-input ran)
    /// without finishing its backward (evaluation).
    pub fn release(&mut self, mb: u64) {
        if let Some(a) = self.in_flight.remove(&mb) {
            self.free.push(a);
        }
        if let Some(d) = self.pending_w.remove(&mb) {
            self.free_pending_w.push(d);
        }
    }

    fn check_input(
        &self,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
    ) -> Result<(), ModelError> {
        if self.in_flight.contains_key(&mb) {
            return Err(ModelError::MicrobatchInFlight { mb });
        }
        if batch == 0 || seq == 0 {
            return Err(ModelError::BadLength { what: "batch × sequence", expected: 1, got: 0 });
        }
        if seq > self.cfg.seq_length {
            return Err(ModelError::SequenceTooLong { got: seq, max: self.cfg.seq_length });
        }
        let n = batch * seq;
        let vocab = self.cfg.vocab_size;
        let check_ids = |what: &'static str, ids: &[u32]| -> Result<(), ModelError> {
            if ids.len() != n {
                return Err(ModelError::BadLength { what, expected: n, got: ids.len() });
            }
            match ids.iter().position(|&t| t as usize >= vocab) {
                Some(position) => Err(ModelError::TokenOutOfRange { token: ids[position], position, vocab }),
                None => Ok(()),
            }
        };
        match (input, self.range.embedding) {
            (StageInput::Tokens(t), true) => check_ids("tokens", t)?,
            (StageInput::Hidden(_) | StageInput::HiddenBf16(_), false) => {
                let expected = n * self.cfg.hidden_size;
                let got = match input {
                    StageInput::Hidden(h) => h.len(),
                    StageInput::HiddenBf16(h) => h.len(),
                    StageInput::Tokens(t) => t.len(),
                    StageInput::Arrived => 0,
                };
                if got != expected {
                    return Err(ModelError::BadLength { what: "hidden states", expected, got });
                }
            }
            (StageInput::Tokens(_), false) => {
                return Err(ModelError::WrongStage("this range has no embedding: pass hidden states"));
            }
            (StageInput::Arrived, _) => {
                return Err(ModelError::WrongStage(
                    "hidden states that arrived on a device: this range computes on the CPU",
                ));
            }
            (StageInput::Hidden(_) | StageInput::HiddenBf16(_), true) => {
                return Err(ModelError::WrongStage("this range starts with the embedding: pass tokens"));
            }
        }
        match (targets, self.range.head) {
            (Some(t), true) => check_ids("targets", t),
            (Some(_), false) => Err(ModelError::WrongStage("targets given to a range without the head")),
            (None, _) => Ok(()),
        }
    }

    fn take_acts(&mut self, batch: usize, seq: usize) -> Acts {
        match self.free.iter().position(|a| a.batch == batch && a.seq == seq) {
            Some(i) => self.free.swap_remove(i),
            None => {
                let vp = self.range.head.then(|| self.cfg.padded_vocab_size());
                let layers = self.range.last - self.range.first;
                Acts::new(batch, seq, self.cfg.hidden_size, self.cfg.num_attention_heads, layers, vp)
            }
        }
    }

    /// Forward of microbatch `mb` (`batch` sequences of `seq` tokens). With the head and
    /// `targets`, returns the mean loss and prepares dlogits scaled by `loss_scale / (B·T)`;
    /// without targets the head keeps the logits (see [`Gpt::logits`]).
    ///
    /// # Errors
    /// Bad shapes, token ids outside the vocabulary, a sequence longer than the positions, a
    /// microbatch id already in flight, or an input kind that does not fit the range.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<Option<f32>, ModelError> {
        self.check_input(mb, batch, seq, input, targets)?;
        let mut acts = self.take_acts(batch, seq);
        let (c, nh, n) = (self.cfg.hidden_size, self.cfg.num_attention_heads, batch * seq);
        self.scratch.ensure(n, c);
        let p = &self.params;
        match input {
            StageInput::Tokens(tokens) => {
                acts.tokens.copy_from_slice(tokens);
                let (wte, wpe) = (self.layout.wte.expect("embedding"), self.layout.wpe.expect("embedding"));
                be.encoder_forward(&mut acts.input, tokens, &p[wte.range()], &p[wpe.range()], batch, seq, c);
            }
            StageInput::Hidden(h) => acts.input.copy_from_slice(h),
            StageInput::HiddenBf16(h) => {
                for (a, b) in acts.input.iter_mut().zip(h) {
                    *a = b.to_f32();
                }
            }
            // Refused by check_input.
            StageInput::Arrived => {}
        }
        for li in 0..acts.layers.len() {
            let (done, rest) = acts.layers.split_at_mut(li);
            let x = done.last().map_or(&acts.input[..], |l| &l.out[..]);
            let blk = &self.layout.blocks[li];
            layer_forward(be, blk, p, x, &mut rest[0], &mut self.scratch.tmp, batch, seq, c, nh);
        }
        let mut loss = None;
        if let Some(head) = acts.head.as_mut() {
            let x = acts.layers.last().map_or(&acts.input[..], |l| &l.out[..]);
            let (w, b) = (self.layout.lnf_w.expect("head"), self.layout.lnf_b.expect("head"));
            be.layernorm_forward(
                &mut head.lnf,
                &mut head.lnf_mean,
                &mut head.lnf_rstd,
                x,
                &p[w.range()],
                &p[b.range()],
                n,
                c,
            );
            let wte = self.layout.wte.expect("tied head");
            let vp = self.cfg.padded_vocab_size();
            be.matmul_forward(&mut head.dlogits, &head.lnf, &p[wte.range()], None, n, c, vp);
            if let Some(targets) = targets {
                let dloss = loss_scale / n as f32;
                be.crossentropy_forward_backward(
                    &mut head.dlogits,
                    &mut head.losses,
                    targets,
                    n,
                    self.cfg.vocab_size,
                    vp,
                    dloss,
                );
                let mean = head.losses.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64;
                loss = Some(mean as f32);
            }
        }
        self.in_flight.insert(mb, acts);
        Ok(loss)
    }

    /// Logits `[B,T,V]` (padding columns dropped) of a full-model forward, for tests and tools.
    ///
    /// # Errors
    /// As [`Gpt::forward`]; also when this range lacks the embedding or the head.
    pub fn logits(
        &mut self,
        be: &dyn Backend,
        tokens: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Tensor, ModelError> {
        if !(self.range.embedding && self.range.head) {
            return Err(ModelError::WrongStage("logits need a range with embedding and head"));
        }
        let mb = u64::MAX;
        self.forward(be, mb, batch, seq, StageInput::Tokens(tokens), None, 1.0)?;
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab_size());
        let acts = self.in_flight.get(&mb).ok_or(ModelError::UnknownMicrobatch { mb })?;
        let head = acts.head.as_ref().ok_or(ModelError::WrongStage("no head"))?;
        let out: Vec<f32> = head.dlogits.chunks(vp).flat_map(|r| r[..v].iter().copied()).collect();
        self.release(mb);
        Tensor::from_vec(&[batch, seq, v], out).map_err(|_| ModelError::BadLength {
            what: "logits",
            expected: batch * seq * v,
            got: 0,
        })
    }

    /// Backward of microbatch `mb`, freeing its activations. The head range computes from its
    /// stored dlogits (`dout` must be `None`); other ranges take `dout` = gradient of their output
    /// `[B,T,C]`. Parameter gradients accumulate; the input gradient is in [`Gpt::input_grad`].
    ///
    /// # Errors
    /// Unknown microbatch, a microbatch whose split [`Gpt::backward_input`] already ran, a wrong
    /// `dout` length, or `dout` given/missing for the range kind.
    pub fn backward(&mut self, be: &dyn Backend, mb: u64, dout: Option<&[f32]>) -> Result<(), ModelError> {
        self.backward_with(be, mb, dout, &mut |_, _| {})
    }

    /// [`Gpt::backward`] that reports progress: `ready(range, arena)` is called with an arena
    /// range, and the whole gradient arena, as soon as this microbatch's contribution to that
    /// range is complete — the final LayerNorm first, then each block from the last to the first, then
    /// `wte`/`wpe` on the embedding range. Ranges come in decreasing arena order and never
    /// overlap. (The head's tied `wte` part stays apart until [`Gpt::fold_tied_grad`].) A
    /// data-parallel reducer uses this on the last microbatch to start reducing early buckets
    /// while the rest of the backward runs.
    ///
    /// # Errors
    /// As [`Gpt::backward`].
    pub fn backward_with(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        dout: Option<&[f32]>,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        if self.pending_w.contains_key(&mb) {
            return Err(ModelError::BackwardInputDone { mb });
        }
        let acts = self.in_flight.remove(&mb).ok_or(ModelError::UnknownMicrobatch { mb })?;
        let result = self.backward_inner(be, &acts, dout, ready);
        self.free.push(acts);
        result
    }

    fn backward_inner(
        &mut self,
        be: &dyn Backend,
        acts: &Acts,
        dout: Option<&[f32]>,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        let (c, nh) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let (batch, seq) = (acts.batch, acts.seq);
        let n = batch * seq;
        let Gpt { params: p, grads: g, tied_grad, scratch: s, layout, cfg, .. } = self;
        s.ensure(n, c);
        let last_out = acts.layers.last().map_or(&acts.input[..], |l| &l.out[..]);
        match (&acts.head, dout) {
            (Some(head), None) => {
                let wte = layout.wte.expect("tied head");
                let vp = cfg.padded_vocab_size();
                be.matmul_backward(
                    &mut s.dln,
                    tied_grad,
                    None,
                    &head.dlogits,
                    &head.lnf,
                    &p[wte.range()],
                    n,
                    c,
                    vp,
                );
                s.dres.fill(0.0);
                let (w, b) = (layout.lnf_w.expect("head"), layout.lnf_b.expect("head"));
                let (dw, db) = two_mut(g, w, b);
                be.layernorm_backward(
                    &mut s.dres,
                    dw,
                    db,
                    &s.dln,
                    last_out,
                    &p[w.range()],
                    &head.lnf_mean,
                    &head.lnf_rstd,
                    n,
                    c,
                );
                let lnf = w.offset..b.range().end;
                ready(lnf, g);
            }
            (None, Some(d)) => {
                if d.len() != n * c {
                    return Err(ModelError::BadLength {
                        what: "output gradient",
                        expected: n * c,
                        got: d.len(),
                    });
                }
                s.dres.copy_from_slice(d);
            }
            (Some(_), Some(_)) => {
                return Err(ModelError::WrongStage("the head range computes its own output gradient"));
            }
            (None, None) => {
                return Err(ModelError::WrongStage("a range without the head needs the output gradient"));
            }
        }
        for li in (0..acts.layers.len()).rev() {
            let x = if li == 0 { &acts.input[..] } else { &acts.layers[li - 1].out[..] };
            let blk = &layout.blocks[li];
            layer_backward(be, blk, p, g, x, &acts.layers[li], s, batch, seq, c, nh);
            ready(blk.ln1_w.offset..blk.fcproj_b.range().end, g);
        }
        if let (Some(wte), Some(wpe)) = (layout.wte.filter(|_| layout.wpe.is_some()), layout.wpe) {
            let (dwte, dwpe) = two_mut(g, wte, wpe);
            be.encoder_backward(dwte, dwpe, &s.dres, &acts.tokens, batch, seq, c);
            ready(wte.offset..wpe.range().end, g);
        } else {
            s.dinput.copy_from_slice(&s.dres);
        }
        Ok(())
    }
}

fn sl(p: &[f32], s: Span) -> &[f32] {
    &p[s.range()]
}

#[allow(clippy::too_many_arguments)]
fn layer_forward(
    be: &dyn Backend,
    blk: &BlockSpans,
    p: &[f32],
    x: &[f32],
    a: &mut LayerActs,
    tmp: &mut [f32],
    batch: usize,
    seq: usize,
    c: usize,
    nh: usize,
) {
    let n = batch * seq;
    be.layernorm_forward(
        &mut a.ln1,
        &mut a.ln1_mean,
        &mut a.ln1_rstd,
        x,
        sl(p, blk.ln1_w),
        sl(p, blk.ln1_b),
        n,
        c,
    );
    be.matmul_forward(&mut a.qkv, &a.ln1, sl(p, blk.qkv_w), Some(sl(p, blk.qkv_b)), n, c, 3 * c);
    be.attention_forward(&mut a.atty, &mut a.lse, &a.qkv, batch, seq, c, nh);
    be.matmul_forward(tmp, &a.atty, sl(p, blk.proj_w), Some(sl(p, blk.proj_b)), n, c, c);
    be.residual_layernorm_forward(
        &mut a.resid2,
        &mut a.ln2,
        &mut a.ln2_mean,
        &mut a.ln2_rstd,
        x,
        tmp,
        sl(p, blk.ln2_w),
        sl(p, blk.ln2_b),
        n,
        c,
    );
    be.matmul_forward(&mut a.fch, &a.ln2, sl(p, blk.fc_w), Some(sl(p, blk.fc_b)), n, c, 4 * c);
    be.gelu_forward(&mut a.fch_gelu, &a.fch);
    be.matmul_forward(tmp, &a.fch_gelu, sl(p, blk.fcproj_w), Some(sl(p, blk.fcproj_b)), n, 4 * c, c);
    a.out.copy_from_slice(&a.resid2);
    be.add_assign(&mut a.out, tmp);
}

/// Backward of one block. On entry `s.dres` holds the gradient of the block output; on exit the
/// gradient of its input.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    be: &dyn Backend,
    blk: &BlockSpans,
    p: &[f32],
    g: &mut [f32],
    x: &[f32],
    a: &LayerActs,
    s: &mut Scratch,
    batch: usize,
    seq: usize,
    c: usize,
    nh: usize,
) {
    let n = batch * seq;
    {
        let (dw, db) = two_mut(g, blk.fcproj_w, blk.fcproj_b);
        be.matmul_backward(
            &mut s.dbig1,
            dw,
            Some(db),
            &s.dres,
            &a.fch_gelu,
            sl(p, blk.fcproj_w),
            n,
            4 * c,
            c,
        );
    }
    be.gelu_backward(&mut s.dbig2, &a.fch, &s.dbig1);
    {
        let (dw, db) = two_mut(g, blk.fc_w, blk.fc_b);
        be.matmul_backward(&mut s.dln, dw, Some(db), &s.dbig2, &a.ln2, sl(p, blk.fc_w), n, c, 4 * c);
    }
    {
        let (dw, db) = two_mut(g, blk.ln2_w, blk.ln2_b);
        be.layernorm_backward(
            &mut s.dres,
            dw,
            db,
            &s.dln,
            &a.resid2,
            sl(p, blk.ln2_w),
            &a.ln2_mean,
            &a.ln2_rstd,
            n,
            c,
        );
    }
    {
        let (dw, db) = two_mut(g, blk.proj_w, blk.proj_b);
        be.matmul_backward(&mut s.datty, dw, Some(db), &s.dres, &a.atty, sl(p, blk.proj_w), n, c, c);
    }
    be.attention_backward(&mut s.dqkv, &s.datty, &a.atty, &a.lse, &a.qkv, batch, seq, c, nh);
    {
        let (dw, db) = two_mut(g, blk.qkv_w, blk.qkv_b);
        be.matmul_backward(&mut s.dln, dw, Some(db), &s.dqkv, &a.ln1, sl(p, blk.qkv_w), n, c, 3 * c);
    }
    let (dw, db) = two_mut(g, blk.ln1_w, blk.ln1_b);
    be.layernorm_backward(&mut s.dres, dw, db, &s.dln, x, sl(p, blk.ln1_w), &a.ln1_mean, &a.ln1_rstd, n, c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CpuBackend;

    /// The memory a range is estimated to hold, without building it, is what it allocates: for
    /// a full model, a first stage, a middle one and a head, through a fused backward and
    /// through a split one (where one microbatch holds activations and output gradients).
    #[test]
    fn range_memory_is_what_the_model_allocates() {
        let cfg = GptConfig {
            vocab_size: 61,
            make_vocab_size_divisible_by: 8,
            seq_length: 12,
            num_layers: 4,
            hidden_size: 16,
            num_attention_heads: 4,
        };
        let be = CpuBackend::new(1);
        let (b, t, c) = (2, 10, cfg.hidden_size);
        let tokens: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 61).collect();
        let ranges = [
            LayerRange::full(&cfg),
            LayerRange { first: 0, last: 1, embedding: true, head: false },
            LayerRange { first: 1, last: 3, embedding: false, head: false },
            LayerRange { first: 3, last: 4, embedding: false, head: true },
        ];
        for range in ranges {
            for split in [false, true] {
                let mut m = Gpt::new_range(&cfg, range, 5).unwrap();
                let hidden = vec![0.1f32; b * t * c];
                let input =
                    if range.embedding { StageInput::Tokens(&tokens) } else { StageInput::Hidden(&hidden) };
                let targets = range.head.then_some(&tokens[..]);
                m.forward(&be, 0, b, t, input, targets, 1.0).unwrap();
                let dout = (!range.head).then_some(&hidden[..]);
                let want = RangeMemory::of(&cfg, range, b, t, split);
                let held = if split {
                    m.backward_input(&be, 0, dout).unwrap();
                    let during = m.held_bytes();
                    m.backward_weight(&be, 0).unwrap();
                    assert_eq!(
                        during.output_grads_per_microbatch, want.output_grads_per_microbatch,
                        "{range:?}"
                    );
                    m.held_bytes()
                } else {
                    m.backward(&be, 0, dout).unwrap();
                    m.held_bytes()
                };
                let what = format!("{range:?}, split {split}");
                assert_eq!(held.params, want.params, "{what}");
                assert_eq!(held.grads, want.grads, "{what}");
                assert_eq!(held.acts_per_microbatch, want.acts_per_microbatch, "{what}");
                assert_eq!(held.scratch, want.scratch, "{what}");
            }
        }
    }

    /// bf16 hidden states (a bf16 stage's message) give the CPU model the same forward as their
    /// fp32 widening; a wrong length is an error, not a panic.
    #[test]
    fn bf16_hidden_states_are_widened_exactly() {
        let cfg = GptConfig {
            vocab_size: 64,
            make_vocab_size_divisible_by: 8,
            seq_length: 8,
            num_layers: 2,
            hidden_size: 16,
            num_attention_heads: 2,
        };
        let range = LayerRange { first: 1, last: 2, embedding: false, head: true };
        let be = CpuBackend::new(1);
        let (b, t) = (2, 8);
        let h: Vec<half::bf16> =
            (0..b * t * 16).map(|i| half::bf16::from_f32((i as f32 * 0.37).sin())).collect();
        let wide = Hidden::Bf16(h.clone()).into_f32();
        let targets: Vec<u32> = (0..b * t).map(|i| (i % 64) as u32).collect();
        let mut a = Gpt::new_range(&cfg, range, 3).expect("model");
        let mut c = Gpt::new_range(&cfg, range, 3).expect("model");
        let la =
            a.forward(&be, 0, b, t, StageInput::HiddenBf16(&h), Some(&targets), 1.0).expect("bf16 input");
        let lc = c.forward(&be, 0, b, t, StageInput::Hidden(&wide), Some(&targets), 1.0).expect("fp32 input");
        assert_eq!(la.map(f32::to_bits), lc.map(f32::to_bits));
        let err = a.forward(&be, 1, b, t, StageInput::HiddenBf16(&h[1..]), Some(&targets), 1.0);
        assert!(matches!(err, Err(ModelError::BadLength { .. })), "{err:?}");
    }
}
