//! Split backward on the GPU for zero-bubble schedules, as the CPU model's `split.rs`: **I**
//! ([`GpuGpt::backward_input_mb`]) computes the gradient w.r.t. the range input and keeps, per
//! microbatch, the gradient at the output of every op with parameters; **W**
//! ([`GpuGpt::backward_weight_mb`]) later turns those and the microbatch's stored activations
//! into the parameter gradients and frees the microbatch.
//!
//! Both halves launch exactly the kernels of the fused backward on the same inputs: each
//! linear's input-gradient GEMM in I and its weight-gradient GEMM and bias sum in W; LayerNorm's
//! fused backward kernel runs in both halves with the unwanted half sent to a sink (its parameter
//! gradients in I, its input gradient in W — the two halves do not read each other). Every
//! parameter receives one contribution per microbatch either way, so I then W gives the fused
//! backward's bits, and several microbatches give the bits of fused backwards in the order of
//! their W's.

use super::{Acts, GpuGpt, GradsReady, OutGrad, Scratch, attention, embedding};
use crate::gpu::{DType, Dev, Gemm, Gpu, GpuError};
use crate::models::gpt::GradRef;

/// What I keeps of one block for W.
pub(super) struct LayerStash<B> {
    /// Gradient at the block output (the MLP projection's output gradient).
    dres_top: B,
    /// Gradient at the MLP's first linear's output (after the GELU backward).
    dbig2: B,
    /// Gradient at the second LayerNorm's output.
    dln2: B,
    /// Gradient at the attention projection's output (the residual stream mid-block).
    dres_mid: B,
    /// Gradient at the QKV linear's output.
    dqkv: B,
    /// Gradient at the first LayerNorm's output.
    dln1: B,
}

/// What I keeps of one microbatch for W.
pub(super) struct Stash<B> {
    n: usize,
    layers: Vec<LayerStash<B>>,
    /// Gradient at the final LayerNorm's output (head range).
    dlnf: Option<B>,
    /// Gradient at the embedding's output (embedding range).
    dres_bottom: Option<B>,
}

impl<G: Gpu> GpuGpt<'_, G> {
    fn take_stash(&mut self, n: usize) -> Result<Stash<G::Buf>, GpuError> {
        if let Some(i) = self.free_stash.iter().position(|s| s.n == n) {
            return Ok(self.free_stash.swap_remove(i));
        }
        self.free_stash.clear();
        let (g, c) = (self.gpu, self.cfg.hidden_size);
        let act = |elems: usize| g.alloc(elems * self.dtype.size());
        let layers = (0..self.blocks.len())
            .map(|_| {
                Ok(LayerStash {
                    dres_top: act(n * c)?,
                    dbig2: act(n * 4 * c)?,
                    dln2: act(n * c)?,
                    dres_mid: act(n * c)?,
                    dqkv: act(n * 3 * c)?,
                    dln1: act(n * c)?,
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(Stash {
            n,
            layers,
            dlnf: if self.range.head { Some(act(n * c)?) } else { None },
            dres_bottom: if self.range.embedding { Some(act(n * c)?) } else { None },
        })
    }

    /// The input half (I) of microbatch `mb`'s backward. `dout` as for
    /// [`GpuGpt::backward_mb`]. Leaves the gradient w.r.t. the range input in
    /// [`GpuGpt::input_grad`] and keeps what [`GpuGpt::backward_weight_mb`] needs; the parameter
    /// gradients are untouched and the activations stay in flight.
    ///
    /// # Errors
    /// As [`GpuGpt::backward_mb`]; also when I already ran for `mb`.
    pub fn backward_input_mb(&mut self, mb: u64, dout: Option<&[f32]>) -> Result<(), GpuError> {
        self.backward_input_mb_grad(mb, dout.map(GradRef::F32))
    }

    /// [`GpuGpt::backward_input_mb`] with the output gradient as sent.
    ///
    /// # Errors
    /// As [`GpuGpt::backward_input_mb`].
    pub fn backward_input_mb_grad(&mut self, mb: u64, dout: Option<GradRef<'_>>) -> Result<(), GpuError> {
        const OP: &str = "GpuGpt::backward_input";
        let (arrived, n) = self.prepare_backward(OP, mb, dout)?;
        let dout = OutGrad::of(dout, arrived.as_ref());
        self.ensure_scratch(n)?;
        let mut stash = self.take_stash(n)?;
        let mut scratch =
            self.scratch.take().ok_or(GpuError::Shape { op: OP, detail: "no scratch".into() })?;
        let result = match self.in_flight.get(&mb) {
            Some(a) => self.input_half(a, &mut scratch, &mut stash, dout),
            None => Err(GpuError::Shape { op: OP, detail: "lost".into() }),
        };
        self.scratch = Some(scratch);
        if let Some(b) = arrived {
            self.recycle_message(b);
        }
        match result {
            Ok(()) => {
                self.pending_w.insert(mb, stash);
                self.last_backward_n = Some(n);
                Ok(())
            }
            Err(e) => {
                self.free_stash.push(stash);
                self.last_backward_n = None;
                Err(e)
            }
        }
    }

    /// The weight half (W) of microbatch `mb`'s backward: accumulates its parameter gradients,
    /// reporting finished arena ranges through `ready` as [`GpuGpt::backward_with`] does (same
    /// ranges, same order), and frees the microbatch.
    ///
    /// # Errors
    /// `mb` unknown or its I has not run; device errors and whatever `ready` returns.
    pub fn backward_weight_mb(
        &mut self,
        mb: u64,
        ready: &mut GradsReady<'_, G::Buf>,
    ) -> Result<(), GpuError> {
        const OP: &str = "GpuGpt::backward_weight";
        let Some(stash) = self.pending_w.remove(&mb) else {
            let detail = if self.in_flight.contains_key(&mb) {
                format!("microbatch {mb}: backward_weight before its backward_input")
            } else {
                format!("no stored activations for microbatch {mb}: backward without forward")
            };
            return Err(GpuError::Shape { op: OP, detail });
        };
        let Some(acts) = self.in_flight.remove(&mb) else {
            self.free_stash.push(stash);
            return Err(GpuError::Shape { op: OP, detail: format!("microbatch {mb} lost its activations") });
        };
        let prepared = self.ensure_scratch(stash.n);
        let result = prepared.and_then(|()| match self.scratch.take() {
            Some(mut scratch) => {
                let r = self.weight_half(&acts, &mut scratch, &stash, ready);
                self.scratch = Some(scratch);
                r
            }
            None => Err(GpuError::Shape { op: OP, detail: "no scratch".into() }),
        });
        self.free.push(acts);
        self.free_stash.push(stash);
        result
    }

    fn input_half(
        &self,
        a: &Acts<G::Buf>,
        s: &mut Scratch<G::Buf>,
        st: &mut Stash<G::Buf>,
        dout: Option<OutGrad<'_, G::Buf>>,
    ) -> Result<(), GpuError> {
        let (g, dt) = (self.gpu, self.dtype);
        let (batch, seq) = (a.batch, a.seq);
        let n = batch * seq;
        let (c, nh, vp) = (self.cfg.hidden_size, self.cfg.num_attention_heads, self.cfg.padded_vocab_size());
        let d = Dev::new;
        let bytes = n * c * dt.size();
        let sink_w = d(&s.dparam_sink).at(0, DType::F32);
        let sink_b = d(&s.dparam_sink).at(c, DType::F32);
        match (&a.head, self.lnf, self.wte, dout, st.dlnf.as_ref()) {
            (Some(h), Some((lnf_w, _)), Some(wte), None, Some(dlnf)) => {
                g.gemm(&Gemm::linear_backward_input(n, c, vp, dt), d(dlnf), d(&h.logits), self.p(wte), None)?;
                g.zero(d(&s.dres), bytes)?;
                let last_out = a.layers.last().map_or(d(&a.input), |l| d(&l.out));
                self.ln_backward(
                    s,
                    d(&s.dres),
                    (sink_w, sink_b),
                    d(dlnf),
                    last_out,
                    lnf_w,
                    (d(&h.lnf_mean), d(&h.lnf_rstd)),
                    n,
                )?;
            }
            (None, _, _, Some(h), _) => h.write(g, &mut s.dres, n * c, dt)?,
            _ => {
                return Err(GpuError::Shape {
                    op: "GpuGpt::backward_input",
                    detail: "the output gradient does not fit the layer range".into(),
                });
            }
        }
        for li in (0..self.blocks.len()).rev() {
            let blk = self.blocks[li];
            let x = if li == 0 { d(&a.input) } else { d(&a.layers[li - 1].out) };
            let (l, k) = (&a.layers[li], &st.layers[li]);
            g.copy(d(&k.dres_top), d(&s.dres), bytes)?;
            let input_grad = |dinp: Dev<'_, G::Buf>, dout: Dev<'_, G::Buf>, w, k: usize, out: usize| {
                g.gemm(&Gemm::linear_backward_input(n, k, out, dt), dinp, dout, self.p(w), None)
            };
            self.mlp_input_grad(d(&k.dbig2), d(&s.dbig1), d(&s.dres), d(&l.fch), blk.fcproj_w, n)?;
            input_grad(d(&k.dln2), d(&k.dbig2), blk.fc_w, c, 4 * c)?;
            self.ln_backward(
                s,
                d(&s.dres),
                (sink_w, sink_b),
                d(&k.dln2),
                d(&l.resid2),
                blk.ln2_w,
                (d(&l.ln2_mean), d(&l.ln2_rstd)),
                n,
            )?;
            g.copy(d(&k.dres_mid), d(&s.dres), bytes)?;
            input_grad(d(&s.datty), d(&s.dres), blk.proj_w, c, c)?;
            attention::attention_backward(
                g,
                dt,
                d(&k.dqkv),
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
            input_grad(d(&k.dln1), d(&k.dqkv), blk.qkv_w, c, 3 * c)?;
            self.ln_backward(
                s,
                d(&s.dres),
                (sink_w, sink_b),
                d(&k.dln1),
                x,
                blk.ln1_w,
                (d(&l.ln1_mean), d(&l.ln1_rstd)),
                n,
            )?;
        }
        if let Some(bottom) = st.dres_bottom.as_ref() {
            g.copy(d(bottom), d(&s.dres), bytes)?;
        }
        Ok(())
    }

    fn weight_half(
        &self,
        a: &Acts<G::Buf>,
        s: &mut Scratch<G::Buf>,
        st: &Stash<G::Buf>,
        ready: &mut GradsReady<'_, G::Buf>,
    ) -> Result<(), GpuError> {
        let (g, dt) = (self.gpu, self.dtype);
        let (batch, seq) = (a.batch, a.seq);
        let n = batch * seq;
        let (c, vp) = (self.cfg.hidden_size, self.cfg.padded_vocab_size());
        let d = Dev::new;
        let sink = d(&s.dinp_sink);
        if let (Some(h), Some((lnf_w, lnf_b)), Some(wte), Some(dlnf)) =
            (&a.head, self.lnf, self.wte, st.dlnf.as_ref())
        {
            self.linear_backward_weight(s, d(&h.logits), d(&h.lnf), wte, None, n, c, vp)?;
            let last_out = a.layers.last().map_or(d(&a.input), |l| d(&l.out));
            self.ln_backward(
                s,
                sink,
                (self.gr(lnf_w), self.gr(lnf_b)),
                d(dlnf),
                last_out,
                lnf_w,
                (d(&h.lnf_mean), d(&h.lnf_rstd)),
                n,
            )?;
            ready(lnf_w.offset..lnf_b.range().end, &self.grads)?;
        }
        for li in (0..self.blocks.len()).rev() {
            let blk = self.blocks[li];
            let x = if li == 0 { d(&a.input) } else { d(&a.layers[li - 1].out) };
            let (l, k) = (&a.layers[li], &st.layers[li]);
            self.linear_backward_weight(
                s,
                d(&k.dres_top),
                d(&l.fch_gelu),
                blk.fcproj_w,
                Some(blk.fcproj_b),
                n,
                4 * c,
                c,
            )?;
            self.linear_backward_weight(s, d(&k.dbig2), d(&l.ln2), blk.fc_w, Some(blk.fc_b), n, c, 4 * c)?;
            self.ln_backward(
                s,
                sink,
                (self.gr(blk.ln2_w), self.gr(blk.ln2_b)),
                d(&k.dln2),
                d(&l.resid2),
                blk.ln2_w,
                (d(&l.ln2_mean), d(&l.ln2_rstd)),
                n,
            )?;
            self.linear_backward_weight(
                s,
                d(&k.dres_mid),
                d(&l.atty),
                blk.proj_w,
                Some(blk.proj_b),
                n,
                c,
                c,
            )?;
            self.linear_backward_weight(s, d(&k.dqkv), d(&l.ln1), blk.qkv_w, Some(blk.qkv_b), n, c, 3 * c)?;
            self.ln_backward(
                s,
                sink,
                (self.gr(blk.ln1_w), self.gr(blk.ln1_b)),
                d(&k.dln1),
                x,
                blk.ln1_w,
                (d(&l.ln1_mean), d(&l.ln1_rstd)),
                n,
            )?;
            ready(blk.ln1_w.offset..blk.fcproj_b.range().end, &self.grads)?;
        }
        if let (Some(wte), Some(wpe), Some(bottom)) = (self.wte, self.wpe, st.dres_bottom.as_ref()) {
            embedding::encoder_backward(
                g,
                dt,
                self.gr(wte),
                self.gr(wpe),
                d(bottom),
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
}
