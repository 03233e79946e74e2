//! Where each GPT parameter lives in the arena, and how it is initialised.
//!
//! Names follow GPT-2 (`wte`, `wpe`, `h.{i}.ln_1.weight`, …, `ln_f.bias`) but matrices are stored
//! `[out, in]` like `nn.Linear` (Hugging Face's Conv1D stores the transpose). A range holding the
//! head also holds `wte` (the tied LM head); when the embedding lives in another range, this copy
//! is kept in sync by the embedding group (see ARCHITECTURE.md).

use super::config::{GptConfig, LayerRange};
use crate::models::Rng;
use crate::models::params::{ParamTable, Span};

/// Spans of one transformer block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSpans {
    pub ln1_w: Span,
    pub ln1_b: Span,
    pub qkv_w: Span,
    pub qkv_b: Span,
    pub proj_w: Span,
    pub proj_b: Span,
    pub ln2_w: Span,
    pub ln2_b: Span,
    pub fc_w: Span,
    pub fc_b: Span,
    pub fcproj_w: Span,
    pub fcproj_b: Span,
}

/// Spans of everything a range holds.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub wte: Option<Span>,
    pub wpe: Option<Span>,
    pub blocks: Vec<BlockSpans>,
    pub lnf_w: Option<Span>,
    pub lnf_b: Option<Span>,
}

pub(crate) fn build(cfg: &GptConfig, range: LayerRange) -> (ParamTable, Layout) {
    let (c, vp, t) = (cfg.hidden_size, cfg.padded_vocab_size(), cfg.seq_length);
    let mut tab = ParamTable::default();
    let wte = (range.embedding || range.head).then(|| tab.push("wte", &[vp, c], true));
    let wpe = range.embedding.then(|| tab.push("wpe", &[t, c], true));
    let blocks = (range.first..range.last)
        .map(|i| {
            let p = |s: &str| format!("h.{i}.{s}");
            BlockSpans {
                ln1_w: tab.push(p("ln_1.weight"), &[c], false),
                ln1_b: tab.push(p("ln_1.bias"), &[c], false),
                qkv_w: tab.push(p("attn.qkv.weight"), &[3 * c, c], true),
                qkv_b: tab.push(p("attn.qkv.bias"), &[3 * c], false),
                proj_w: tab.push(p("attn.proj.weight"), &[c, c], true),
                proj_b: tab.push(p("attn.proj.bias"), &[c], false),
                ln2_w: tab.push(p("ln_2.weight"), &[c], false),
                ln2_b: tab.push(p("ln_2.bias"), &[c], false),
                fc_w: tab.push(p("mlp.fc.weight"), &[4 * c, c], true),
                fc_b: tab.push(p("mlp.fc.bias"), &[4 * c], false),
                fcproj_w: tab.push(p("mlp.proj.weight"), &[c, 4 * c], true),
                fcproj_b: tab.push(p("mlp.proj.bias"), &[c], false),
            }
        })
        .collect();
    let lnf_w = range.head.then(|| tab.push("ln_f.weight", &[c], false));
    let lnf_b = range.head.then(|| tab.push("ln_f.bias", &[c], false));
    (tab, Layout { wte, wpe, blocks, lnf_w, lnf_b })
}

/// GPT-2 / Megatron initialisation: N(0, 0.02) for matrices and embeddings, N(0, 0.02/√(2L)) for
/// the two projections that write into the residual stream, zeros for biases, ones for norm
/// weights. Each tensor draws from its own stream keyed by (seed, name), so a layer range gets
/// exactly the values the full model has for those layers.
pub(crate) fn init(cfg: &GptConfig, table: &ParamTable, params: &mut [f32], seed: u64) {
    let resid_std = 0.02 / (2.0 * cfg.num_layers as f64).sqrt();
    for spec in table.specs() {
        let dst = &mut params[spec.span.range()];
        let name = spec.name.as_str();
        if name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight") || name == "ln_f.weight" {
            dst.fill(1.0);
        } else if spec.shape.len() == 1 {
            dst.fill(0.0);
        } else {
            let std = if name.ends_with("attn.proj.weight") || name.ends_with("mlp.proj.weight") {
                resid_std
            } else {
                0.02
            };
            let mut rng = Rng::derived(seed, name);
            for x in dst.iter_mut() {
                *x = (rng.normal() * std) as f32;
            }
        }
    }
}
