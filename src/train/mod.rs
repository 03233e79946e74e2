//! One optimizer step of single-rank training: accumulate gradients over the microbatches of a
//! global batch, clip by global norm, AdamW. The distributed runtime (actors) performs the same
//! arithmetic split over ranks.

pub mod corpus;
pub mod data;
pub mod plot;
pub mod run;

use thiserror::Error;

use crate::config::Config;
use crate::kernels::Backend;
use crate::models::gpt::{Gpt, ModelError, StageInput};
use crate::optim::{AdamW, clip_table_grad_norm};

/// Errors of a training step.
#[derive(Debug, Error, PartialEq)]
pub enum TrainError {
    #[error("step {step}, microbatch {mb}: {source}")]
    Model { step: u64, mb: usize, source: ModelError },
    #[error("step {step}, microbatch {mb}: loss is {loss} (not finite)")]
    NonFiniteLoss { step: u64, mb: usize, loss: f32 },
}

impl TrainError {
    /// True for a non-finite loss (what the NaN policy may skip).
    pub fn is_non_finite(&self) -> bool {
        matches!(self, TrainError::NonFiniteLoss { .. })
    }
}

/// What one step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the global batch.
    pub loss: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// A single-rank GPT trainer: model, optimizer, backend-independent.
#[derive(Debug)]
pub struct Trainer {
    pub model: Gpt,
    pub opt: AdamW,
    pub clip_grad: f32,
}

/// One microbatch: `batch × seq` token ids and the same number of targets.
#[derive(Debug, Clone, Copy)]
pub struct Microbatch<'a> {
    pub tokens: &'a [u32],
    pub targets: &'a [u32],
    pub batch: usize,
    pub seq: usize,
}

impl Trainer {
    /// A freshly initialised model and optimizer from a validated config.
    ///
    /// # Errors
    /// [`ModelError`] when the model shape is invalid.
    pub fn new(cfg: &Config) -> Result<Self, ModelError> {
        Ok(Self::with_model(cfg, Gpt::new(&cfg.model, cfg.train.seed)?))
    }

    /// A trainer of `model` with fresh optimizer state (zero moments) from the config's
    /// settings.
    pub fn with_model(cfg: &Config, model: Gpt) -> Self {
        let opt = AdamW::new(cfg.train.adamw(), model.table().len());
        Self { model, opt, clip_grad: cfg.train.clip_grad }
    }

    /// Forward and backward of every microbatch (gradients accumulate, each loss scaled by
    /// 1/#microbatches), then clipping and one AdamW update with learning rate `lr`.
    ///
    /// # Errors
    /// Bad microbatch shapes or ids ([`TrainError::Model`]), or a non-finite loss
    /// ([`TrainError::NonFiniteLoss`]); in both cases parameters are left unchanged.
    pub fn step(
        &mut self,
        be: &dyn Backend,
        mbs: &[Microbatch<'_>],
        lr: f32,
    ) -> Result<StepStats, TrainError> {
        let step = self.opt.step + 1;
        self.model.zero_grads();
        let scale = 1.0 / mbs.len().max(1) as f32;
        let mut loss_sum = 0.0f64;
        for (i, mb) in mbs.iter().enumerate() {
            let wrap = |source| TrainError::Model { step, mb: i, source };
            let loss = self
                .model
                .forward(
                    be,
                    i as u64,
                    mb.batch,
                    mb.seq,
                    StageInput::Tokens(mb.tokens),
                    Some(mb.targets),
                    scale,
                )
                .map_err(wrap)?
                .unwrap_or(f32::NAN);
            if !loss.is_finite() {
                self.model.release(i as u64);
                return Err(TrainError::NonFiniteLoss { step, mb: i, loss });
            }
            self.model.backward(be, i as u64, None).map_err(wrap)?;
            loss_sum += f64::from(loss);
        }
        self.model.fold_tied_grad(be);
        let (table, params, grads) = self.model.split_mut();
        let grad_norm = clip_table_grad_norm(be, table, grads, self.clip_grad);
        self.opt.update(be, table, params, grads, lr);
        Ok(StepStats { loss: (loss_sum * f64::from(scale)) as f32, grad_norm })
    }

    /// Mean loss over `mbs` without touching gradients or parameters (evaluation).
    ///
    /// # Errors
    /// [`TrainError::Model`] for bad shapes or token ids.
    pub fn eval_loss(&mut self, be: &dyn Backend, mbs: &[Microbatch<'_>]) -> Result<f32, TrainError> {
        let step = self.opt.step;
        let mut sum = 0.0f64;
        for (i, mb) in mbs.iter().enumerate() {
            let id = u64::MAX - 1 - i as u64;
            let loss = self
                .model
                .forward(be, id, mb.batch, mb.seq, StageInput::Tokens(mb.tokens), Some(mb.targets), 1.0)
                .map_err(|source| TrainError::Model { step, mb: i, source })?;
            self.model.release(id);
            sum += f64::from(loss.unwrap_or(f32::NAN));
        }
        Ok((sum / mbs.len().max(1) as f64) as f32)
    }
}
