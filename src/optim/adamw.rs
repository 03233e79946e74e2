//! AdamW over a model's flat parameter arena. Moments `m` and `v` are arenas laid out by the same
//! table; weight decay applies only to tensors the table marks (`decay`: matrices and embeddings,
//! not biases or norms).

use serde::{Deserialize, Serialize};

use crate::kernels::{AdamWStep, Backend};
use crate::models::params::ParamTable;

/// AdamW hyper-parameters (PyTorch / Megatron defaults for GPT pre-training).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// AdamW state for one parameter arena.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Number of updates applied so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, num_params: usize) -> Self {
        Self { cfg, m: vec![0.0; num_params], v: vec![0.0; num_params], step: 0 }
    }

    /// One update of every tensor in `table` with learning rate `lr`.
    ///
    /// # Panics
    /// When the arenas do not match the table (a caller bug).
    pub fn update(
        &mut self,
        be: &dyn Backend,
        table: &ParamTable,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
    ) {
        assert_eq!(params.len(), self.m.len(), "AdamW state does not match the parameters");
        self.step += 1;
        for spec in table.specs() {
            let r = spec.span.range();
            let h = AdamWStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if spec.decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
            };
            be.adamw(&mut params[r.clone()], &grads[r.clone()], &mut self.m[r.clone()], &mut self.v[r], h);
        }
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        4 * (self.m.len() + self.v.len())
    }
}
