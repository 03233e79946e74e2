//! The configuration tree, loaded from TOML files in `config/`. Every section rejects unknown
//! keys; [`Config::validate`] explains each rejection in user terms.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::models::gpt::GptConfig;

/// Errors from loading or validating a configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config value {key} = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Model shape.
    pub model: GptConfig,
    /// Optimisation and batch settings.
    #[serde(default)]
    pub train: TrainConfig,
}

/// Training hyper-parameters (Megatron names where one exists).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per microbatch on one rank.
    pub micro_batch_size: usize,
    /// Sequences per optimizer step across all data-parallel ranks; a multiple of
    /// `micro_batch_size` (the quotient is the number of accumulated microbatches).
    pub global_batch_size: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// AdamW β1.
    pub adam_beta1: f32,
    /// AdamW β2.
    pub adam_beta2: f32,
    /// AdamW ε.
    pub adam_eps: f32,
    /// Decoupled weight decay for matrices and embeddings (not biases or norms).
    pub weight_decay: f32,
    /// Global-norm gradient clipping threshold (0 disables).
    pub clip_grad: f32,
    /// Seed for weights, data order and sampling.
    pub seed: u64,
    /// CPU worker threads (0: one per core).
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            micro_batch_size: 8,
            global_batch_size: 8,
            lr: 6e-4,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            weight_decay: 0.1,
            clip_grad: 1.0,
            seed: 1234,
            threads: 0,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and the reason.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: p,
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Microbatches accumulated per optimizer step (one data-parallel rank).
    pub fn accumulation_steps(&self) -> usize {
        self.train.global_batch_size / self.train.micro_batch_size.max(1)
    }

    /// Checks every value; the error names the key, the value and what would be accepted.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate().map_err(|e| match e {
            crate::models::gpt::ModelError::BadConfig { field, reason } => ConfigError::Invalid {
                key: format!("model.{field}"),
                value: model_value(&self.model, field),
                reason,
            },
            other => ConfigError::Invalid {
                key: "model".into(),
                value: String::new(),
                reason: other.to_string(),
            },
        })?;
        let t = &self.train;
        let invalid = |key: &str, value: String, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                value,
                reason: reason.into(),
            })
        };
        if t.micro_batch_size == 0 {
            return invalid("train.micro_batch_size", "0".into(), "must be at least 1");
        }
        if t.global_batch_size == 0 || t.global_batch_size % t.micro_batch_size != 0 {
            return invalid(
                "train.global_batch_size",
                t.global_batch_size.to_string(),
                &format!(
                    "must be a positive multiple of micro_batch_size ({})",
                    t.micro_batch_size
                ),
            );
        }
        if !(t.lr.is_finite() && t.lr >= 0.0) {
            return invalid("train.lr", t.lr.to_string(), "must be a finite number ≥ 0");
        }
        for (key, v) in [
            ("train.adam_beta1", t.adam_beta1),
            ("train.adam_beta2", t.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return invalid(key, v.to_string(), "must be in [0, 1)");
            }
        }
        if !(t.adam_eps > 0.0) {
            return invalid("train.adam_eps", t.adam_eps.to_string(), "must be > 0");
        }
        if !(t.weight_decay >= 0.0) {
            return invalid(
                "train.weight_decay",
                t.weight_decay.to_string(),
                "must be ≥ 0",
            );
        }
        if !(t.clip_grad >= 0.0) {
            return invalid(
                "train.clip_grad",
                t.clip_grad.to_string(),
                "must be ≥ 0 (0 disables clipping)",
            );
        }
        Ok(())
    }
}

fn model_value(m: &GptConfig, field: &str) -> String {
    match field {
        "vocab_size" => m.vocab_size.to_string(),
        "seq_length" => m.seq_length.to_string(),
        "num_layers" => m.num_layers.to_string(),
        "hidden_size" => m.hidden_size.to_string(),
        "num_attention_heads" => m.num_attention_heads.to_string(),
        "make_vocab_size_divisible_by" => m.make_vocab_size_divisible_by.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    const MODEL: &str = "[model]\nvocab_size = 10\nseq_length = 8\nnum_layers = 1\nhidden_size = 8\nnum_attention_heads = 2\n";

    #[test]
    fn defaults_fill_train() {
        let c = parse(MODEL).unwrap();
        assert_eq!(c.train, TrainConfig::default());
        assert_eq!(c.model.padded_vocab_size(), 128);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse(&format!("{MODEL}[train]\nlearning_rate = 1.0\n")).unwrap_err();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn heads_must_divide_hidden() {
        let err = parse(&MODEL.replace("num_attention_heads = 2", "num_attention_heads = 3"))
            .unwrap_err();
        assert!(err.contains("model.num_attention_heads = 3"), "{err}");
    }

    #[test]
    fn global_batch_must_be_a_multiple() {
        let err = parse(&format!(
            "{MODEL}[train]\nmicro_batch_size = 3\nglobal_batch_size = 8\n"
        ))
        .unwrap_err();
        assert!(err.contains("train.global_batch_size = 8"), "{err}");
    }
}
