//! Autoregressive generation with a KV cache: each new token runs one row through every layer
//! and attends to the cached keys and values, so the prefix is never recomputed.
//!
//! Cache per layer: K and V `[T, C]` (T = the model's positions). When the context is full the
//! generator re-fills the cache from the most recent T/2 tokens (a sliding window).

use super::config::ModelError;
use super::{Gpt, sl};
use crate::kernels::Backend;
use crate::models::Rng;

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0 }
    }
}

/// Incremental decoder over a full model (embedding + all layers + head).
#[derive(Debug)]
pub struct Generator<'m> {
    model: &'m Gpt,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    history: Vec<u32>,
    pos: usize,
    x: Vec<f32>,
    ln: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    fc: Vec<f32>,
    fc_gelu: Vec<f32>,
    logits: Vec<f32>,
    stats: [f32; 2],
}

impl<'m> Generator<'m> {
    /// # Errors
    /// [`ModelError::WrongStage`] when `model` is not a full model.
    pub fn new(model: &'m Gpt) -> Result<Self, ModelError> {
        let r = model.range();
        if !(r.embedding && r.head && r.first == 0 && r.last == model.cfg.num_layers) {
            return Err(ModelError::WrongStage("generation needs the full model"));
        }
        let (c, t, l) = (model.cfg.hidden_size, model.cfg.seq_length, model.cfg.num_layers);
        Ok(Self {
            model,
            k: vec![vec![0.0; t * c]; l],
            v: vec![vec![0.0; t * c]; l],
            history: Vec::new(),
            pos: 0,
            x: vec![0.0; c],
            ln: vec![0.0; c],
            qkv: vec![0.0; 3 * c],
            att: vec![0.0; c],
            tmp: vec![0.0; c],
            fc: vec![0.0; 4 * c],
            fc_gelu: vec![0.0; 4 * c],
            logits: vec![0.0; model.cfg.padded_vocab_size()],
            stats: [0.0; 2],
        })
    }

    /// Feeds one token and returns the logits `[V]` for the next one.
    ///
    /// # Errors
    /// [`ModelError::TokenOutOfRange`].
    pub fn push(&mut self, be: &dyn Backend, token: u32) -> Result<&[f32], ModelError> {
        let vocab = self.model.cfg.vocab_size;
        if token as usize >= vocab {
            return Err(ModelError::TokenOutOfRange { token, position: self.history.len(), vocab });
        }
        self.history.push(token);
        if self.pos == self.model.cfg.seq_length {
            let keep = (self.model.cfg.seq_length / 2).max(1);
            let recent: Vec<u32> = self.history[self.history.len() - keep..].to_vec();
            self.pos = 0;
            for &t in &recent {
                self.step(be, t);
            }
        } else {
            self.step(be, token);
        }
        Ok(&self.logits[..vocab])
    }

    fn step(&mut self, be: &dyn Backend, token: u32) {
        let m = self.model;
        let (c, nh, p) = (m.cfg.hidden_size, m.cfg.num_attention_heads, &m.params);
        let (wte, wpe) = (m.layout.wte.expect("full model"), m.layout.wpe.expect("full model"));
        let pos = self.pos;
        be.encoder_forward(
            &mut self.x,
            &[token],
            &p[wte.range()],
            &sl(p, wpe)[pos * c..(pos + 1) * c],
            1,
            1,
            c,
        );
        let [mean, rstd] = &mut self.stats;
        for (li, blk) in m.layout.blocks.iter().enumerate() {
            let (mean, rstd) = (std::slice::from_mut(mean), std::slice::from_mut(rstd));
            be.layernorm_forward(&mut self.ln, mean, rstd, &self.x, sl(p, blk.ln1_w), sl(p, blk.ln1_b), 1, c);
            be.matmul_forward(&mut self.qkv, &self.ln, sl(p, blk.qkv_w), Some(sl(p, blk.qkv_b)), 1, c, 3 * c);
            self.k[li][pos * c..(pos + 1) * c].copy_from_slice(&self.qkv[c..2 * c]);
            self.v[li][pos * c..(pos + 1) * c].copy_from_slice(&self.qkv[2 * c..]);
            be.attention_decode(&mut self.att, &self.qkv[..c], &self.k[li], &self.v[li], pos + 1, c, nh);
            be.matmul_forward(&mut self.tmp, &self.att, sl(p, blk.proj_w), Some(sl(p, blk.proj_b)), 1, c, c);
            be.add_assign(&mut self.x, &self.tmp);
            be.layernorm_forward(&mut self.ln, mean, rstd, &self.x, sl(p, blk.ln2_w), sl(p, blk.ln2_b), 1, c);
            be.matmul_forward(&mut self.fc, &self.ln, sl(p, blk.fc_w), Some(sl(p, blk.fc_b)), 1, c, 4 * c);
            be.gelu_forward(&mut self.fc_gelu, &self.fc);
            let (w, b) = (sl(p, blk.fcproj_w), Some(sl(p, blk.fcproj_b)));
            be.matmul_forward(&mut self.tmp, &self.fc_gelu, w, b, 1, 4 * c, c);
            be.add_assign(&mut self.x, &self.tmp);
        }
        let (w, b) = (m.layout.lnf_w.expect("head"), m.layout.lnf_b.expect("head"));
        let (mean, rstd) = (std::slice::from_mut(mean), std::slice::from_mut(rstd));
        be.layernorm_forward(&mut self.ln, mean, rstd, &self.x, sl(p, w), sl(p, b), 1, c);
        let vp = m.cfg.padded_vocab_size();
        be.matmul_forward(&mut self.logits, &self.ln, sl(p, wte), None, 1, c, vp);
        self.pos += 1;
    }

    /// Feeds `prompt` then samples `max_tokens` tokens; calls `on_token` with each new token.
    ///
    /// # Errors
    /// [`ModelError`] for an empty prompt or out-of-vocabulary ids.
    pub fn generate(
        &mut self,
        be: &dyn Backend,
        prompt: &[u32],
        max_tokens: usize,
        sampling: Sampling,
        rng: &mut Rng,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Vec<u32>, ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::BadLength { what: "prompt tokens", expected: 1, got: 0 });
        }
        let mut logits = Vec::new();
        for &t in prompt {
            logits = self.push(be, t)?.to_vec();
        }
        let mut out = Vec::with_capacity(max_tokens);
        for _ in 0..max_tokens {
            let next = sample(&logits, sampling, rng);
            on_token(next);
            out.push(next);
            logits = self.push(be, next)?.to_vec();
        }
        Ok(out)
    }
}

/// Picks a token from logits with temperature, top-k and top-p (nucleus) filtering.
pub fn sample(logits: &[f32], s: Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
            .0
    };
    if s.temperature <= 0.0 || logits.len() == 1 {
        return argmax() as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let mx = logits[idx[0]];
    let mut probs: Vec<f64> =
        idx.iter().map(|&i| f64::from((logits[i] - mx) / s.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let cut = probs.iter().position(|&p| {
            acc += p;
            acc >= f64::from(s.top_p)
        });
        if let Some(cut) = cut {
            idx.truncate(cut + 1);
            probs.truncate(cut + 1);
        }
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, p) in idx.iter().zip(&probs) {
        if u < *p {
            return *i as u32;
        }
        u -= p;
    }
    idx[idx.len() - 1] as u32
}
