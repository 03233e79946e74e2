//! GPT shape configuration, the layer range a model instance covers, and model errors.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Shape of a GPT (Megatron / GPT-2 architecture: pre-LayerNorm blocks, learned positions,
/// fused QKV, 4h MLP, final LayerNorm, LM head tied to the token embedding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Real vocabulary size (tokens the tokenizer can produce).
    pub vocab_size: usize,
    /// The embedding table is padded up to a multiple of this (Megatron's
    /// `make_vocab_size_divisible_by`); padded logits are excluded from the loss.
    #[serde(default = "default_divisible_by")]
    pub make_vocab_size_divisible_by: usize,
    /// Maximum sequence length (number of learned positions).
    pub seq_length: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Hidden size C.
    pub hidden_size: usize,
    /// Number of attention heads NH (must divide the hidden size).
    pub num_attention_heads: usize,
}

fn default_divisible_by() -> usize {
    128
}

impl GptConfig {
    /// A very small model for doc examples and smoke tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 50,
            make_vocab_size_divisible_by: 16,
            seq_length: 16,
            num_layers: 2,
            hidden_size: 32,
            num_attention_heads: 4,
        }
    }

    /// The vocabulary rounded up to `make_vocab_size_divisible_by`.
    pub fn padded_vocab_size(&self) -> usize {
        let m = self.make_vocab_size_divisible_by.max(1);
        self.vocab_size.div_ceil(m) * m
    }

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Number of parameters of the whole model (tied head counted once, padded vocabulary).
    pub fn num_params(&self) -> usize {
        let (c, l) = (self.hidden_size, self.num_layers);
        let per_layer = 12 * c * c + 13 * c;
        self.padded_vocab_size() * c + self.seq_length * c + l * per_layer + 2 * c
    }

    /// Model FLOPs per token of one training step (forward + backward), Megatron's formula
    /// without recompute: `72·l·h² + 12·l·s·h + 6·V·h` (Korthikanti et al. 2022, App. A).
    pub fn flops_per_token(&self) -> f64 {
        let (l, h, s) = (self.num_layers as f64, self.hidden_size as f64, self.seq_length as f64);
        let v = self.padded_vocab_size() as f64;
        72.0 * l * h * h + 12.0 * l * s * h + 6.0 * v * h
    }

    /// Checks the shape; every rejection says which value is wrong and what would work.
    ///
    /// # Errors
    /// [`ModelError::BadConfig`] naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, reason: String| Err(ModelError::BadConfig { field, reason });
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("seq_length", self.seq_length),
            ("num_layers", self.num_layers),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("make_vocab_size_divisible_by", self.make_vocab_size_divisible_by),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}; use a divisor of {}",
                    self.num_attention_heads, self.hidden_size, self.hidden_size
                ),
            );
        }
        if self.vocab_size > u32::MAX as usize {
            return bad("vocab_size", format!("{} exceeds the u32 token range", self.vocab_size));
        }
        Ok(())
    }
}

/// Which part of the model an instance holds: layers `[first, last)`, plus the embedding (first
/// stage) and/or the final LayerNorm + tied LM head + loss (last stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRange {
    pub first: usize,
    pub last: usize,
    pub embedding: bool,
    pub head: bool,
}

impl LayerRange {
    /// The whole model.
    pub fn full(cfg: &GptConfig) -> Self {
        Self { first: 0, last: cfg.num_layers, embedding: true, head: true }
    }

    /// Splits the model at the layer boundaries `cuts` (ascending, each in `0..=num_layers`)
    /// into consecutive ranges: the first holds the embedding, the last the head. Empty ranges
    /// are allowed (a stage with only the embedding, or only the head).
    ///
    /// # Errors
    /// [`ModelError::BadRange`] when the cuts are out of order or past the last layer.
    pub fn partition(cfg: &GptConfig, cuts: &[usize]) -> Result<Vec<Self>, ModelError> {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(cfg.num_layers);
        let last = bounds.len() - 2;
        bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                if w[0] > w[1] || w[1] > cfg.num_layers {
                    return Err(ModelError::BadRange { first: w[0], last: w[1], num_layers: cfg.num_layers });
                }
                Ok(Self { first: w[0], last: w[1], embedding: i == 0, head: i == last })
            })
            .collect()
    }
}

/// Errors from building or running a model. Messages name the offending value.
#[derive(Debug, Error, PartialEq)]
pub enum ModelError {
    #[error("invalid model config: {field}: {reason}")]
    BadConfig { field: &'static str, reason: String },
    #[error("invalid layer range [{first}, {last}) for a {num_layers}-layer model")]
    BadRange { first: usize, last: usize, num_layers: usize },
    #[error("sequence length {got} exceeds the model's {max} positions")]
    SequenceTooLong { got: usize, max: usize },
    #[error("token id {token} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, position: usize, vocab: usize },
    #[error("{what}: expected {expected} values, got {got}")]
    BadLength { what: &'static str, expected: usize, got: usize },
    #[error("microbatch {mb} is already in flight (forward ran, backward has not)")]
    MicrobatchInFlight { mb: u64 },
    #[error("no stored activations for microbatch {mb}: backward without forward")]
    UnknownMicrobatch { mb: u64 },
    #[error(
        "microbatch {mb}: backward_input already ran, so only its backward_weight may follow \
         (not another backward_input or a fused backward)"
    )]
    BackwardInputDone { mb: u64 },
    #[error("microbatch {mb}: backward_weight before its backward_input")]
    BackwardInputMissing { mb: u64 },
    #[error("{0}")]
    WrongStage(&'static str),
    #[error("non-finite loss {loss} in microbatch {mb}")]
    NonFiniteLoss { mb: u64, loss: f32 },
    /// The chunk's compute runs on a device (`crate::gpu::stage`) and the device failed.
    #[error("on the GPU: {0}")]
    Device(String),
}
