//! Split backward for zero-bubble pipeline schedules (ZB-H1 and kin): each microbatch's backward
//! runs as **I** ([`Gpt::backward_input`], the gradient w.r.t. the range input, which the previous
//! stage is waiting for) and, later, **W** ([`Gpt::backward_weight`], the parameter gradients,
//! which nobody waits for and so can fill pipeline bubbles).
//!
//! Dimension letters as in the parent module (N = B·T rows, C hidden, Vp padded vocabulary).
//!
//! I runs exactly the input-gradient kernels of the fused [`Gpt::backward`], in the same order,
//! and stores in [`OutputGrads`] the gradient at the output of every op that has parameters — the
//! `dout` the fused backward hands to that op's weight gradient. W runs exactly the weight-gradient
//! kernels of the fused backward on those stored gradients and the microbatch's activations,
//! which stay in flight until then. Both halves call the same kernels as the fused path on the
//! same inputs (matmul split into [`Backend::matmul_backward_input`] /
//! [`Backend::matmul_backward_weight`]; LayerNorm runs its fused backward with the unwanted half
//! sent to a scratch sink), so I then W gives the fused backward's bits, and several microbatches
//! give the bits of fused backwards run in the order of their W's.

use super::acts::{Acts, LayerActs, LayerOutputGrads, OutputGrads, Scratch};
use super::layout::{BlockSpans, Layout};
use super::{Gpt, GptConfig, ModelError, sl};
use crate::kernels::Backend;
use crate::models::params::two_mut;

impl Gpt {
    /// The input half (I) of microbatch `mb`'s backward. `dout` follows [`Gpt::backward`]: `None`
    /// for the head range, the gradient of the range output `[B,T,C]` otherwise. Writes the
    /// gradient w.r.t. the range input to [`Gpt::input_grad`] (non-embedding ranges) and keeps
    /// what [`Gpt::backward_weight`] needs; the microbatch's activations stay in flight.
    /// Parameter gradients are untouched.
    ///
    /// # Errors
    /// Unknown microbatch, I already ran for `mb`, a wrong `dout` length, or `dout` given/missing
    /// for the range kind. On error nothing changes.
    pub fn backward_input(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        dout: Option<&[f32]>,
    ) -> Result<(), ModelError> {
        if self.pending_w.contains_key(&mb) {
            return Err(ModelError::BackwardInputDone { mb });
        }
        let acts = self.in_flight.get(&mb).ok_or(ModelError::UnknownMicrobatch { mb })?;
        let (batch, seq) = (acts.batch, acts.seq);
        let expected = batch * seq * self.cfg.hidden_size;
        match (acts.head.is_some(), dout) {
            (true, None) => {}
            (false, Some(d)) if d.len() != expected => {
                return Err(ModelError::BadLength { what: "output gradient", expected, got: d.len() });
            }
            (false, Some(_)) => {}
            (true, Some(_)) => {
                return Err(ModelError::WrongStage("the head range computes its own output gradient"));
            }
            (false, None) => {
                return Err(ModelError::WrongStage("a range without the head needs the output gradient"));
            }
        }
        let mut d = self.take_output_grads(batch, seq);
        let Gpt { params, scratch, layout, cfg, in_flight, .. } = self;
        input_half(be, cfg, layout, params, &in_flight[&mb], &mut d, scratch, dout);
        self.pending_w.insert(mb, d);
        Ok(())
    }

    /// The weight half (W) of microbatch `mb`'s backward: accumulates its parameter gradients
    /// (the head's tied `wte` part into the pending tied gradient, as [`Gpt::backward`] does) and
    /// frees the microbatch.
    ///
    /// # Errors
    /// Unknown microbatch, or [`Gpt::backward_input`] has not run for `mb`.
    pub fn backward_weight(&mut self, be: &dyn Backend, mb: u64) -> Result<(), ModelError> {
        self.backward_weight_with(be, mb, &mut |_, _| {})
    }

    /// [`Gpt::backward_weight`] that reports finished gradient ranges through `ready` exactly as
    /// [`Gpt::backward_with`] does: same ranges, same order.
    ///
    /// # Errors
    /// As [`Gpt::backward_weight`].
    pub fn backward_weight_with(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        let Some(d) = self.pending_w.remove(&mb) else {
            return Err(if self.in_flight.contains_key(&mb) {
                ModelError::BackwardInputMissing { mb }
            } else {
                ModelError::UnknownMicrobatch { mb }
            });
        };
        // `pending_w` keys are always in flight too (release and W remove both).
        let Some(acts) = self.in_flight.remove(&mb) else {
            self.free_pending_w.push(d);
            return Err(ModelError::UnknownMicrobatch { mb });
        };
        let Gpt { params, grads, tied_grad, scratch, layout, cfg, .. } = self;
        let sink = &mut scratch.dinp_sink;
        sink.resize(acts.batch * acts.seq * cfg.hidden_size, 0.0);
        weight_half(be, cfg, layout, params, grads, tied_grad, &acts, &d, sink, ready);
        self.free.push(acts);
        self.free_pending_w.push(d);
        Ok(())
    }

    fn take_output_grads(&mut self, batch: usize, seq: usize) -> OutputGrads {
        match self.free_pending_w.iter().position(|d| d.batch == batch && d.seq == seq) {
            Some(i) => self.free_pending_w.swap_remove(i),
            None => {
                let (c, layers) = (self.cfg.hidden_size, self.range.last - self.range.first);
                OutputGrads::new(batch, seq, c, layers, self.range.head, self.range.embedding)
            }
        }
    }
}

/// I for a whole range; `dout` has been checked against the range kind and shape.
#[allow(clippy::too_many_arguments)]
fn input_half(
    be: &dyn Backend,
    cfg: &GptConfig,
    layout: &Layout,
    p: &[f32],
    acts: &Acts,
    d: &mut OutputGrads,
    s: &mut Scratch,
    dout: Option<&[f32]>,
) {
    let (c, nh) = (cfg.hidden_size, cfg.num_attention_heads);
    let (batch, seq) = (acts.batch, acts.seq);
    let n = batch * seq;
    s.ensure(n, c);
    let last_out = acts.layers.last().map_or(&acts.input[..], |l| &l.out[..]);
    match dout {
        Some(dout) => s.dres.copy_from_slice(dout),
        None => {
            // The head range (the caller checked that only it comes without `dout`).
            if let (Some(head), Some(dlnf)) = (&acts.head, d.dlnf.as_mut()) {
                let wte = layout.wte.expect("tied head");
                let vp = cfg.padded_vocab_size();
                be.matmul_backward_input(dlnf, &head.dlogits, &p[wte.range()], n, c, vp);
                s.dres.fill(0.0);
                let w = layout.lnf_w.expect("head");
                let (mean, rstd) = (&head.lnf_mean, &head.lnf_rstd);
                ln_backward_input(
                    be,
                    &mut s.dres,
                    &mut s.dparam_sink,
                    dlnf,
                    last_out,
                    &p[w.range()],
                    mean,
                    rstd,
                    c,
                );
            }
        }
    }
    for li in (0..acts.layers.len()).rev() {
        let x = if li == 0 { &acts.input[..] } else { &acts.layers[li - 1].out[..] };
        let blk = &layout.blocks[li];
        layer_backward_input(be, blk, p, x, &acts.layers[li], &mut d.layers[li], s, batch, seq, c, nh);
    }
    match d.dembed.as_mut() {
        Some(dembed) => dembed.copy_from_slice(&s.dres),
        None => s.dinput.copy_from_slice(&s.dres),
    }
}

/// W for a whole range, reporting finished ranges in [`Gpt::backward_with`]'s order.
#[allow(clippy::too_many_arguments)]
fn weight_half(
    be: &dyn Backend,
    cfg: &GptConfig,
    layout: &Layout,
    p: &[f32],
    g: &mut [f32],
    tied_grad: &mut [f32],
    acts: &Acts,
    d: &OutputGrads,
    sink: &mut [f32],
    ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
) {
    let c = cfg.hidden_size;
    let (batch, seq) = (acts.batch, acts.seq);
    let n = batch * seq;
    let last_out = acts.layers.last().map_or(&acts.input[..], |l| &l.out[..]);
    if let (Some(head), Some(dlnf)) = (&acts.head, &d.dlnf) {
        be.matmul_backward_weight(tied_grad, None, &head.dlogits, &head.lnf, n, c, cfg.padded_vocab_size());
        let (w, b) = (layout.lnf_w.expect("head"), layout.lnf_b.expect("head"));
        let (dw, db) = two_mut(g, w, b);
        let (mean, rstd) = (&head.lnf_mean, &head.lnf_rstd);
        ln_backward_weight(be, dw, db, sink, dlnf, last_out, &p[w.range()], mean, rstd, c);
        ready(w.offset..b.range().end, g);
    }
    for li in (0..acts.layers.len()).rev() {
        let x = if li == 0 { &acts.input[..] } else { &acts.layers[li - 1].out[..] };
        let blk = &layout.blocks[li];
        layer_backward_weight(be, blk, p, g, x, &acts.layers[li], &d.layers[li], sink, n, c);
        ready(blk.ln1_w.offset..blk.fcproj_b.range().end, g);
    }
    if let (Some(wte), Some(wpe), Some(dembed)) = (layout.wte, layout.wpe, &d.dembed) {
        let (dwte, dwpe) = two_mut(g, wte, wpe);
        be.encoder_backward(dwte, dwpe, dembed, &acts.tokens, batch, seq, c);
        ready(wte.offset..wpe.range().end, g);
    }
}

/// I of one block: the input-gradient kernels of `layer_backward`, in its order. On entry
/// `s.dres` holds the gradient of the block output; on exit the gradient of its input. Every
/// `dout` a weight gradient will need is written to `d`.
#[allow(clippy::too_many_arguments)]
fn layer_backward_input(
    be: &dyn Backend,
    blk: &BlockSpans,
    p: &[f32],
    x: &[f32],
    a: &LayerActs,
    d: &mut LayerOutputGrads,
    s: &mut Scratch,
    batch: usize,
    seq: usize,
    c: usize,
    nh: usize,
) {
    let n = batch * seq;
    d.dout.copy_from_slice(&s.dres);
    be.matmul_backward_input(&mut s.dbig1, &d.dout, sl(p, blk.fcproj_w), n, 4 * c, c);
    be.gelu_backward(&mut d.dfch, &a.fch, &s.dbig1);
    be.matmul_backward_input(&mut d.dln2, &d.dfch, sl(p, blk.fc_w), n, c, 4 * c);
    let (w2, mean2, rstd2) = (sl(p, blk.ln2_w), &a.ln2_mean, &a.ln2_rstd);
    ln_backward_input(be, &mut s.dres, &mut s.dparam_sink, &d.dln2, &a.resid2, w2, mean2, rstd2, c);
    d.dresid2.copy_from_slice(&s.dres);
    be.matmul_backward_input(&mut s.datty, &d.dresid2, sl(p, blk.proj_w), n, c, c);
    be.attention_backward(&mut d.dqkv, &s.datty, &a.atty, &a.lse, &a.qkv, batch, seq, c, nh);
    be.matmul_backward_input(&mut d.dln1, &d.dqkv, sl(p, blk.qkv_w), n, c, 3 * c);
    let (w1, mean1, rstd1) = (sl(p, blk.ln1_w), &a.ln1_mean, &a.ln1_rstd);
    ln_backward_input(be, &mut s.dres, &mut s.dparam_sink, &d.dln1, x, w1, mean1, rstd1, c);
}

/// W of one block: the weight-gradient kernels of `layer_backward` on the output gradients I
/// stored. `sink` (`[N,C]`) takes the LayerNorm input gradients, which are dropped.
#[allow(clippy::too_many_arguments)]
fn layer_backward_weight(
    be: &dyn Backend,
    blk: &BlockSpans,
    p: &[f32],
    g: &mut [f32],
    x: &[f32],
    a: &LayerActs,
    d: &LayerOutputGrads,
    sink: &mut [f32],
    n: usize,
    c: usize,
) {
    let (dw, db) = two_mut(g, blk.fcproj_w, blk.fcproj_b);
    be.matmul_backward_weight(dw, Some(db), &d.dout, &a.fch_gelu, n, 4 * c, c);
    let (dw, db) = two_mut(g, blk.fc_w, blk.fc_b);
    be.matmul_backward_weight(dw, Some(db), &d.dfch, &a.ln2, n, c, 4 * c);
    let (dw, db) = two_mut(g, blk.ln2_w, blk.ln2_b);
    let (w2, mean2, rstd2) = (sl(p, blk.ln2_w), &a.ln2_mean, &a.ln2_rstd);
    ln_backward_weight(be, dw, db, sink, &d.dln2, &a.resid2, w2, mean2, rstd2, c);
    let (dw, db) = two_mut(g, blk.proj_w, blk.proj_b);
    be.matmul_backward_weight(dw, Some(db), &d.dresid2, &a.atty, n, c, c);
    let (dw, db) = two_mut(g, blk.qkv_w, blk.qkv_b);
    be.matmul_backward_weight(dw, Some(db), &d.dqkv, &a.ln1, n, c, 3 * c);
    let (dw, db) = two_mut(g, blk.ln1_w, blk.ln1_b);
    let (w1, mean1, rstd1) = (sl(p, blk.ln1_w), &a.ln1_mean, &a.ln1_rstd);
    ln_backward_weight(be, dw, db, sink, &d.dln1, x, w1, mean1, rstd1, c);
}

/// The input gradient of a LayerNorm, **accumulated** into `dinp` as the fused backward does; the
/// weight and bias gradients go to `sink` (`[2C]`) and are dropped. The fused kernel computes the
/// two halves independently, so `dinp` gets the fused call's bits.
#[allow(clippy::too_many_arguments)]
fn ln_backward_input(
    be: &dyn Backend,
    dinp: &mut [f32],
    sink: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    sink.fill(0.0);
    let (dw, db) = sink.split_at_mut(c);
    be.layernorm_backward(dinp, dw, db, dout, inp, weight, mean, rstd, mean.len(), c);
}

/// The weight and bias gradients of a LayerNorm (accumulated); the input gradient goes to `sink`
/// (`[N,C]`) and is dropped.
#[allow(clippy::too_many_arguments)]
fn ln_backward_weight(
    be: &dyn Backend,
    dweight: &mut [f32],
    dbias: &mut [f32],
    sink: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    sink.fill(0.0);
    be.layernorm_backward(sink, dweight, dbias, dout, inp, weight, mean, rstd, mean.len(), c);
}
