//! The configuration tree, loaded from TOML files in `config/`. Every section rejects unknown
//! keys; [`Config::validate`] explains each rejection in user terms.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::models::gpt::GptConfig;

pub mod overrides;

/// Errors from loading or validating a configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config value {key} = {value}: {reason}")]
    Invalid { key: String, value: String, reason: String },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Model shape.
    pub model: GptConfig,
    /// Optimisation, batch and schedule settings.
    #[serde(default)]
    pub train: TrainConfig,
    /// Where training data comes from.
    #[serde(default)]
    pub data: DataConfig,
    /// Parallel layout.
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// Progress output, metrics files, evaluation cadence.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Saving and resuming.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Seed of the fault plan's probabilistic faults.
    #[serde(default = "default_fault_seed")]
    pub fault_seed: u64,
    /// Faults to inject (`[[faults]]` tables; see `troupe::runtime::faults`).
    #[serde(default)]
    pub faults: Vec<crate::runtime::faults::Fault>,
}

fn default_fault_seed() -> u64 {
    1
}

/// Learning-rate decay after warm-up (Megatron's `--lr-decay-style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrDecayStyle {
    Constant,
    Linear,
    Cosine,
    /// `max_lr · √(warmup / step)` after warm-up, not below `min_lr` (and `min_lr` past the
    /// decay steps), as Megatron's.
    #[serde(rename = "inverse-square-root")]
    InverseSquareRoot,
    /// Warm-up, stable, decay: `lr` until the last `lr_wsd_decay_iters` steps before the decay
    /// steps end, then down to `min_lr` in the `lr_wsd_decay_style` shape (Megatron's `WSD`).
    #[serde(rename = "WSD", alias = "wsd")]
    Wsd,
}

/// The shape of the decay at the end of a `WSD` schedule (Megatron's `--lr-wsd-decay-style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WsdDecayStyle {
    /// `2·0.5^r − 1` of the way from `min_lr` to `lr` at fraction `r` of the decay.
    Exponential,
    Linear,
    Cosine,
    /// `1 − √r`.
    MinusSqrt,
}

/// What to do when a microbatch's loss is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Stop with an error naming the step and microbatch.
    Abort,
    /// Skip the optimizer step (parameters unchanged), count it, and go on.
    Skip,
}

/// How the log lines of a run read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `step 10 | loss 5.2125 | lr 9.739e-4 | grad norm 1.110 | 7457 tokens/s | 199.4 GFLOP/s`.
    #[default]
    Troupe,
    /// Megatron-LM's lines (` [date] iteration 10/ 100 | consumed samples: … | lm loss: … |` and
    /// its validation blocks), for tools that read Megatron's logs.
    Megatron,
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
    /// Number of optimizer steps to run.
    pub train_iters: u64,
    /// Peak learning rate (reached at the end of warm-up).
    pub lr: f32,
    /// Learning rate at the end of decay.
    pub min_lr: f32,
    /// Decay shape after warm-up.
    pub lr_decay_style: LrDecayStyle,
    /// Steps of linear warm-up from 0 to `lr`.
    pub lr_warmup_iters: u64,
    /// Steps over which the rate decays to `min_lr` (default: `train_iters`).
    pub lr_decay_iters: Option<u64>,
    /// `WSD`: the steps of the final decay (they end where the decay steps end).
    pub lr_wsd_decay_iters: u64,
    /// `WSD`: the shape of the final decay.
    pub lr_wsd_decay_style: WsdDecayStyle,
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
    /// Seed for weights, data order and sampling, 0 to 4294967295: the data order is Megatron's
    /// for the same seed (NumPy's `RandomState` shuffles).
    pub seed: u64,
    /// CPU worker threads (0: one per core).
    pub threads: usize,
    /// NaN/Inf loss handling: `abort` (default) or `skip`.
    pub nan_policy: NanPolicy,
    /// Stop (saving a checkpoint, exit code 0) after a step that is a multiple of this, before
    /// `train_iters` (Megatron's `--exit-interval`; 0: never).
    pub exit_interval: u64,
    /// Stop (saving a checkpoint, exit code 0) after the first step that ends this many minutes
    /// after training started in this process, e.g. before a job's time limit (Megatron's
    /// `--exit-duration-in-mins`; 0: never).
    pub exit_duration_in_mins: f64,
}

impl TrainConfig {
    /// The AdamW settings of this config.
    pub fn adamw(&self) -> crate::optim::AdamWConfig {
        crate::optim::AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            micro_batch_size: 8,
            global_batch_size: 8,
            train_iters: 1000,
            lr: 6e-4,
            min_lr: 6e-5,
            lr_decay_style: LrDecayStyle::Cosine,
            lr_warmup_iters: 0,
            lr_decay_iters: None,
            lr_wsd_decay_iters: 0,
            lr_wsd_decay_style: WsdDecayStyle::Exponential,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            weight_decay: 0.1,
            clip_grad: 1.0,
            seed: 1234,
            threads: 0,
            nan_policy: NanPolicy::Abort,
            exit_interval: 0,
            exit_duration_in_mins: 0.0,
        }
    }
}

/// Training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Megatron-style data path: `["prefix"]` or a blend `["0.3", "a", "0.7", "b"]` of
    /// preprocessed `.bin/.idx` prefixes. A string is split at whitespace as Megatron's
    /// `--data-path` is (`"prefix"`, `"0.3 a 0.7 b"`). Empty: the embedded Shakespeare corpus.
    #[serde(deserialize_with = "words_or_list")]
    pub data_path: Vec<String>,
    /// The training split's own data (Megatron's `--train-data-path`), in `data_path`'s forms;
    /// with it (and `valid_data_path`, `test_data_path`) each split is the whole of its datasets,
    /// `split` is not used, and `data_path` must be empty.
    #[serde(deserialize_with = "words_or_list")]
    pub train_data_path: Vec<String>,
    /// The validation split's own data (`--valid-data-path`); empty: no validation.
    #[serde(deserialize_with = "words_or_list")]
    pub valid_data_path: Vec<String>,
    /// The test split's own data (`--test-data-path`); empty: no test evaluation.
    #[serde(deserialize_with = "words_or_list")]
    pub test_data_path: Vec<String>,
    /// Train/valid/test split over documents, e.g. "949,50,1".
    pub split: String,
    /// Tokenizer: a `tokenizer.json`, a `vocab.txt`, or a directory holding `tokenizer.json`,
    /// `vocab.json` + `merges.txt` or `vocab.txt`. Empty: the embedded Shakespeare tokenizer.
    pub tokenizer: String,
    /// GPT-2 BPE merges file; with it `tokenizer` names the vocabulary (`vocab.json`), as
    /// Megatron's `--vocab-file` and `--merge-file` do, whatever the files are called.
    pub merge_file: String,
    /// Where index caches go (default: next to the data; for the embedded corpus, `.troupe-cache`).
    pub cache_dir: String,
}

/// The ways out of a global batch that `micro × dp` does not divide: the next multiple, or the
/// largest micro-batch size not above `micro` that keeps the global batch (when there is one).
fn batch_advice(global: usize, micro: usize, dp: usize) -> String {
    if global == 0 {
        return format!("; use --global-batch-size {}", micro * dp.max(1));
    }
    let per_dp = (micro * dp).max(1);
    let up = global.div_ceil(per_dp).max(1) * per_dp;
    let keep = (global.is_multiple_of(dp.max(1)))
        .then(|| (1..=micro).rev().find(|m| (global / dp.max(1)).is_multiple_of(*m)))
        .flatten();
    match keep {
        Some(m) => format!("; use --global-batch-size {up}, or --micro-batch-size {m} to keep {global}"),
        None => format!("; use --global-batch-size {up}"),
    }
}

/// A list of strings, or one string split at whitespace.
fn words_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum WordsOrList {
        Words(String),
        List(Vec<String>),
    }
    match WordsOrList::deserialize(d) {
        Ok(WordsOrList::Words(s)) => Ok(s.split_whitespace().map(str::to_owned).collect()),
        Ok(WordsOrList::List(l)) => Ok(l),
        Err(_) => Err(serde::de::Error::custom(
            "expected a list of strings (a prefix, or weights and prefixes) or one such string",
        )),
    }
}

impl DataConfig {
    /// Whether each split names its own data (`train_data_path` and the others).
    pub fn per_split(&self) -> bool {
        !(self.train_data_path.is_empty()
            && self.valid_data_path.is_empty()
            && self.test_data_path.is_empty())
    }

    /// Whether the data is the user's (any data path) rather than the embedded corpus.
    pub fn is_user_data(&self) -> bool {
        !self.data_path.is_empty() || self.per_split()
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            data_path: Vec::new(),
            train_data_path: Vec::new(),
            valid_data_path: Vec::new(),
            test_data_path: Vec::new(),
            split: "949,50,1".into(),
            tokenizer: String::new(),
            merge_file: String::new(),
            cache_dir: String::new(),
        }
    }
}

/// Parallel layout (Megatron's names). The world is `tensor × pipeline × data` ranks; under a
/// launcher the data-parallel size follows from the world size, in one process it is
/// `data_parallel_size`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Tensor-parallel size (only 1 is supported).
    pub tensor_model_parallel_size: usize,
    /// Pipeline-parallel size p.
    pub pipeline_model_parallel_size: usize,
    /// Data-parallel size for in-process runs (ranks as threads); a launched run derives it
    /// from the world size and rejects a different explicit value.
    pub data_parallel_size: usize,
    /// Model chunks per pipeline rank v (0: the schedule's default — 2 for `interleaved` and
    /// `zb-v`, else 1).
    pub virtual_pipeline_model_parallel_size: usize,
    /// Megatron's alternative to the above: layers per chunk (0: unset).
    pub num_layers_per_virtual_pipeline_stage: usize,
    /// `gpipe`, `1f1b`, `interleaved`, `zb-h1`, `zb-h2` or `zb-v`.
    pub pipeline_schedule: String,
    /// Layers of each of the p·v stages, in stage order (empty: as even as possible).
    pub stage_layers: Vec<usize>,
    /// ZeRO-1: shard optimizer state over the data-parallel group.
    pub use_distributed_optimizer: bool,
    /// Gradient bucket size in elements for the overlapped data-parallel reduction.
    pub grad_bucket_size: usize,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            tensor_model_parallel_size: 1,
            pipeline_model_parallel_size: 1,
            data_parallel_size: 1,
            virtual_pipeline_model_parallel_size: 0,
            num_layers_per_virtual_pipeline_stage: 0,
            pipeline_schedule: "1f1b".into(),
            stage_layers: Vec::new(),
            use_distributed_optimizer: false,
            grad_bucket_size: 1 << 20,
        }
    }
}

impl ParallelConfig {
    /// Whether this layout needs the actor runtime (more than one rank, or model chunks).
    pub fn is_distributed(&self) -> bool {
        self.pipeline_model_parallel_size * self.data_parallel_size > 1
    }
}

/// Logging and evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Steps between log lines (and progress-bar refreshes).
    pub log_interval: u64,
    /// Steps between validation runs (0: never).
    pub eval_interval: u64,
    /// Validation iterations per evaluation, as Megatron's `--eval-iters`: each a global batch
    /// (`global_batch_size` sequences, [`Config::eval_microbatches`] microbatches in all);
    /// 0 turns evaluation off, as in Megatron (`eval_interval` reads 0 then).
    pub eval_iters: u64,
    /// How the log lines read: `troupe` or `megatron` (Megatron-LM's wording and layout).
    pub log_format: LogFormat,
    /// Write one JSON record per step to this file (empty: off).
    pub log_json: String,
    /// Write TensorBoard event files into this directory (empty: off), under Megatron-LM's tag
    /// names (`lm loss`, `learning-rate`, `grad-norm`, `lm loss validation`, … and their
    /// `vs samples` twins); only the reporting rank writes.
    pub tensorboard_dir: String,
    /// Steps between TensorBoard scalars, as Megatron's `--tensorboard-log-interval` (evaluations
    /// are always written).
    pub tensorboard_log_interval: u64,
    /// Tokens of sample text generated at each evaluation (0: none).
    pub sample_tokens: usize,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            log_interval: 10,
            eval_interval: 100,
            eval_iters: 10,
            log_format: LogFormat::Troupe,
            log_json: String::new(),
            tensorboard_dir: String::new(),
            tensorboard_log_interval: 1,
            sample_tokens: 0,
        }
    }
}

/// Checkpointing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory to save into (empty: no saving).
    pub save: String,
    /// Steps between saves (0: only at the end and on SIGINT/SIGTERM).
    pub save_interval: u64,
    /// Directory to resume from (empty: start fresh).
    pub load: String,
    /// With `load` set but no checkpoint there, start from scratch instead of failing.
    pub allow_fresh_start: bool,
    /// Take only the weights from `load` (Megatron's `--finetune`): training starts at step 0
    /// with fresh AdamW moments, the data from its start and the learning-rate schedule from
    /// its warm-up.
    pub finetune: bool,
}

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and the reason.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, &[])
    }

    /// Reads a TOML file, applies `key=value` overrides (see [`overrides`]), validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and the reason.
    pub fn load_with(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let cfg = Self::read_with(path, sets)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`Config::load_with`] without [`Config::validate`]: for a first pass whose values decide
    /// further overrides (Megatron's `--lr-warmup-fraction` gives the warm-up that makes the
    /// schedule valid), validated once they are applied.
    ///
    /// # Errors
    /// [`ConfigError::Read`] and [`ConfigError::Parse`].
    pub fn read_with(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Self::parse_toml_str(&text, &p, sets)
    }

    /// Parses TOML text (named `origin` in errors), applies overrides, validates.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn from_toml_str(text: &str, origin: &str, sets: &[String]) -> Result<Self, ConfigError> {
        let cfg = Self::parse_toml_str(text, origin, sets)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`Config::from_toml_str`] without [`Config::validate`] (see [`Config::read_with`]).
    ///
    /// # Errors
    /// [`ConfigError::Parse`] and the overrides' [`ConfigError::Invalid`].
    pub fn parse_toml_str(text: &str, origin: &str, sets: &[String]) -> Result<Self, ConfigError> {
        let mut value: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.into(), message: e.to_string() })?;
        for s in sets {
            overrides::apply(&mut value, s)?;
        }
        // Serde stops at the first unknown key: list them all, each with the key it may stand for.
        let unknown = unknown_keys(&value);
        // A type error may come from an override rather than the file: name them too.
        let cfg: Config = value.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: if sets.is_empty() {
                origin.into()
            } else {
                format!("{origin} with --set {}", sets.join(" --set "))
            },
            message: match unknown.as_slice() {
                _ if !e.message().contains("unknown field") => e.to_string().trim_end().replace('\n', " "),
                [] => e.to_string().trim_end().replace('\n', " "),
                [one] => format!("unknown key {one}"),
                many => format!("{} unknown keys: {}", many.len(), many.join("; ")),
            },
        })?;
        let mut cfg = cfg;
        if cfg.logging.eval_iters == 0 {
            cfg.logging.eval_interval = 0;
        }
        Ok(cfg)
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Every key (dotted, as `--set` takes them) with its value as TOML text, floats as the
    /// shortest text that reads back as the same f32 (`0.0006`, not the f64 widening
    /// `0.0006000000284984708`). Arrays of tables (`faults`) are one value.
    ///
    /// # Errors
    /// When the configuration cannot be rendered as TOML (not the case for a parsed one).
    pub fn flat(&self) -> Result<std::collections::BTreeMap<String, String>, toml::ser::Error> {
        fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        flatten(&key, v, out);
                    }
                }
                toml::Value::Float(x) => {
                    let f = *x as f32;
                    let text = if f64::from(f) == *x { format!("{f:?}") } else { format!("{x:?}") };
                    out.insert(prefix.to_string(), text);
                }
                other => {
                    out.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        flatten("", &toml::Value::try_from(self)?, &mut out);
        Ok(out)
    }

    /// The keys whose values differ between `self` and `other`, in key order, as
    /// `(key, other's value, self's value)` ([`Config::flat`]'s text; a key one side lacks
    /// shows as `unset`).
    pub fn differences(&self, other: &Config) -> Vec<(String, String, String)> {
        let (mine, theirs) = (self.flat().unwrap_or_default(), other.flat().unwrap_or_default());
        let keys: std::collections::BTreeSet<&String> = mine.keys().chain(theirs.keys()).collect();
        let unset = || "unset".to_string();
        keys.into_iter()
            .filter(|k| mine.get(*k) != theirs.get(*k))
            .map(|k| {
                let old = theirs.get(k).cloned().unwrap_or_else(unset);
                (k.clone(), old, mine.get(k).cloned().unwrap_or_else(unset))
            })
            .collect()
    }

    /// Microbatches accumulated per optimizer step over the whole global batch (what one rank
    /// processes when training alone).
    pub fn accumulation_steps(&self) -> usize {
        self.train.global_batch_size / self.train.micro_batch_size.max(1)
    }

    /// Microbatches of one evaluation: `eval_iters` global batches, as Megatron evaluates.
    pub fn eval_microbatches(&self) -> u64 {
        self.logging.eval_iters * self.accumulation_steps() as u64
    }

    /// Microbatches per optimizer step on one data-parallel rank.
    pub fn microbatches_per_dp_rank(&self) -> usize {
        self.accumulation_steps() / self.parallel.data_parallel_size.max(1)
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
            other => {
                ConfigError::Invalid { key: "model".into(), value: String::new(), reason: other.to_string() }
            }
        })?;
        let t = &self.train;
        let invalid = |key: &str, value: String, reason: &str| {
            Err(ConfigError::Invalid { key: key.into(), value, reason: reason.into() })
        };
        if t.micro_batch_size == 0 {
            return invalid("train.micro_batch_size", "0".into(), "must be at least 1");
        }
        if t.global_batch_size == 0 || !t.global_batch_size.is_multiple_of(t.micro_batch_size) {
            return invalid(
                "train.global_batch_size",
                t.global_batch_size.to_string(),
                &format!(
                    "must be a positive multiple of micro_batch_size ({}){}",
                    t.micro_batch_size,
                    batch_advice(t.global_batch_size, t.micro_batch_size, 1)
                ),
            );
        }
        if !(t.lr.is_finite() && t.lr >= 0.0) {
            return invalid("train.lr", t.lr.to_string(), "must be a finite number ≥ 0");
        }
        if t.seed > u64::from(u32::MAX) {
            return invalid(
                "train.seed",
                t.seed.to_string(),
                "must be at most 4294967295: the data order is NumPy's RandomState shuffle, as Megatron's, \
                 and that takes 32-bit seeds",
            );
        }
        for (key, v) in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                return invalid(key, v.to_string(), "must be in [0, 1)");
            }
        }
        if t.adam_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return invalid("train.adam_eps", t.adam_eps.to_string(), "must be > 0");
        }
        if t.weight_decay.is_nan() || t.weight_decay < 0.0 {
            return invalid("train.weight_decay", t.weight_decay.to_string(), "must be ≥ 0");
        }
        if t.clip_grad.is_nan() || t.clip_grad < 0.0 {
            return invalid("train.clip_grad", t.clip_grad.to_string(), "must be ≥ 0 (0 disables clipping)");
        }
        if !(t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return invalid("train.min_lr", t.min_lr.to_string(), &format!("must be in [0, lr = {}]", t.lr));
        }
        if t.train_iters == 0 {
            return invalid("train.train_iters", "0".into(), "must be at least 1");
        }
        if !(t.exit_duration_in_mins.is_finite() && t.exit_duration_in_mins >= 0.0) {
            let v = t.exit_duration_in_mins.to_string();
            return invalid("train.exit_duration_in_mins", v, "must be ≥ 0 (0: no time limit)");
        }
        if let Some(d) = t.lr_decay_iters
            && d < t.lr_warmup_iters
        {
            {
                let reason = format!("must be ≥ lr_warmup_iters ({})", t.lr_warmup_iters);
                return invalid("train.lr_decay_iters", d.to_string(), &reason);
            }
        }
        if t.lr_decay_style == LrDecayStyle::Wsd {
            let span = t.lr_decay_iters.unwrap_or(t.train_iters).saturating_sub(t.lr_warmup_iters);
            if t.lr_wsd_decay_iters == 0 || t.lr_wsd_decay_iters > span {
                let reason = format!(
                    "the WSD schedule's final decay must be 1 to {span} steps (the decay steps after warm-up)"
                );
                return invalid("train.lr_wsd_decay_iters", t.lr_wsd_decay_iters.to_string(), &reason);
            }
        }
        let p = &self.parallel;
        if p.tensor_model_parallel_size != 1 {
            let v = p.tensor_model_parallel_size.to_string();
            return invalid(
                "parallel.tensor_model_parallel_size",
                v,
                "only 1 is supported (no tensor parallelism yet)",
            );
        }
        for (key, v) in [
            ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size),
            ("parallel.data_parallel_size", p.data_parallel_size),
            ("parallel.grad_bucket_size", p.grad_bucket_size),
        ] {
            if v == 0 {
                return invalid(key, "0".into(), "must be at least 1");
            }
        }
        if let Err(e) = p.pipeline_schedule.parse::<crate::schedule::ScheduleKind>() {
            return invalid("parallel.pipeline_schedule", p.pipeline_schedule.clone(), &e);
        }
        let per_dp = t.micro_batch_size * p.data_parallel_size;
        if !t.global_batch_size.is_multiple_of(per_dp) {
            return invalid(
                "train.global_batch_size",
                t.global_batch_size.to_string(),
                &format!(
                    "must be a multiple of micro_batch_size × data_parallel_size = {} × {} = {per_dp}{}",
                    t.micro_batch_size,
                    p.data_parallel_size,
                    batch_advice(t.global_batch_size, t.micro_batch_size, p.data_parallel_size)
                ),
            );
        }
        let d = &self.data;
        if d.per_split() {
            if !d.data_path.is_empty() {
                return invalid(
                    "data.data_path",
                    d.data_path.join(" "),
                    "is one source split by data.split; with data.train_data_path, valid_data_path or \
                     test_data_path (each split's own data) it must be empty",
                );
            }
            if d.train_data_path.is_empty() {
                return invalid(
                    "data.train_data_path",
                    "[]".into(),
                    "must name the training data when data.valid_data_path or data.test_data_path is given",
                );
            }
        }
        if self.logging.log_interval == 0 {
            return invalid("logging.log_interval", "0".into(), "must be at least 1");
        }
        if self.logging.tensorboard_log_interval == 0 {
            return invalid("logging.tensorboard_log_interval", "0".into(), "must be at least 1");
        }
        Ok(())
    }
}

/// Every key a configuration has, as a TOML tree (a config with each optional key set).
fn schema() -> Option<toml::Table> {
    let mut cfg: Config = toml::from_str(
        "[model]\nvocab_size = 1\nseq_length = 1\nnum_layers = 1\nhidden_size = 1\nnum_attention_heads = 1\n",
    )
    .ok()?;
    cfg.train.lr_decay_iters = Some(1);
    match toml::Value::try_from(&cfg).ok()? {
        toml::Value::Table(t) => Some(t),
        _ => None,
    }
}

/// The keys of `value` a configuration does not have, dotted, each with the known key it most
/// likely stands for (`model.num_layer (did you mean model.num_layers?)`). Empty when all are
/// known (or the schema cannot be built: serde's own message stands then).
fn unknown_keys(value: &toml::Table) -> Vec<String> {
    let Some(schema) = schema() else { return Vec::new() };
    let mut leaves = Vec::new();
    for (section, v) in &schema {
        match v.as_table() {
            Some(t) => leaves.extend(t.keys().map(|k| format!("{section}.{k}"))),
            None => leaves.push(section.clone()),
        }
    }
    let mut out = Vec::new();
    for (section, v) in value {
        let Some(known) = schema.get(section) else {
            let sections: Vec<&str> =
                schema.iter().filter(|(_, v)| v.is_table()).map(|(k, _)| k.as_str()).collect();
            out.push(match closest(section, sections.iter().copied()) {
                Some(s) => format!("{section} (did you mean {s}?)"),
                None => format!("{section} (the sections are {})", sections.join(", ")),
            });
            continue;
        };
        let (Some(known), Some(given)) = (known.as_table(), v.as_table()) else { continue };
        for key in given.keys().filter(|k| !known.contains_key(*k)) {
            let dotted = format!("{section}.{key}");
            // The same key in another section, else the nearest spelling in this one.
            let elsewhere = leaves.iter().find(|l| l.rsplit('.').next() == Some(key.as_str()));
            let guess = elsewhere
                .cloned()
                .or_else(|| closest(key, known.keys().map(String::as_str)).map(|k| format!("{section}.{k}")));
            out.push(match guess {
                Some(g) => format!("{dotted} (did you mean {g}?)"),
                None => dotted,
            });
        }
    }
    out
}

/// The candidate nearest to `word` by edit distance, when near enough to be a slip (a third of
/// its length, at least 2) or when one contains the other.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    };
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .map(|c| (distance(word, c), c))
        .filter(|(d, c)| *d <= limit || (word.len() >= 3 && (c.contains(word) || word.contains(c))))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
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
        Config::from_toml_str(s, "test.toml", &[]).map_err(|e| e.to_string())
    }

    /// Differences are listed by key with both values; equal configs have none; an optional
    /// key set on one side only shows as unset on the other.
    #[test]
    fn differences_name_each_key_with_both_values() {
        let a = Config::from_toml_str(MODEL, "t", &[]).unwrap();
        assert!(a.differences(&a.clone()).is_empty());
        let sets = ["train.lr=5e-3".to_string(), "train.seed=9".into(), "train.lr_decay_iters=40".into()];
        let b = Config::from_toml_str(MODEL, "t", &sets).unwrap();
        let d = b.differences(&a);
        let keys: Vec<&str> = d.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(keys, ["train.lr", "train.lr_decay_iters", "train.seed"]);
        assert_eq!(d[1], ("train.lr_decay_iters".to_string(), "unset".to_string(), "40".to_string()));
        assert_eq!(d[2].2, "9");
    }

    /// Every unknown key of a file and its overrides is listed at once, each with the key it may
    /// stand for; a file with known keys only passes.
    #[test]
    fn unknown_keys_are_listed_together_with_what_they_may_mean() {
        let text = format!(
            "{MODEL}hiden_size = 3\n[train]\nlrr = 0.1\nseq_length = 8\nzzz = 1\n[trian]\nx = 1\n[qqq]\n"
        );
        let err =
            Config::from_toml_str(&text, "t.toml", &["data.toknizer=x".into()]).unwrap_err().to_string();
        assert_eq!(
            err,
            "config file t.toml with --set data.toknizer=x is not valid: 7 unknown keys: \
             data.toknizer (did you mean data.tokenizer?); model.hiden_size (did you mean model.hidden_size?); \
             qqq (the sections are checkpoint, data, logging, model, parallel, train); \
             train.lrr (did you mean train.lr?); train.seq_length (did you mean model.seq_length?); \
             train.zzz; trian (did you mean train?)"
        );
        let err = parse(&format!("{MODEL}[train]\nlr_decay_iter = 5\n")).unwrap_err();
        assert!(
            err.ends_with(
                "is not valid: unknown key train.lr_decay_iter (did you mean train.lr_decay_iters?)"
            ),
            "{err}"
        );
        // The schema holds exactly the keys serde takes: each section's list in serde's own
        // message for a stray key (a new optional key must be set in `schema`).
        let schema = schema().expect("schema");
        assert!(toml::Value::Table(schema.clone()).try_into::<Config>().is_ok());
        for (section, v) in &schema {
            let Some(keys) = v.as_table() else { continue };
            let text = if section == "model" {
                format!("{MODEL}zz = 1\n")
            } else {
                format!("{MODEL}[{section}]\nzz = 1\n")
            };
            let message = toml::from_str::<Config>(&text).unwrap_err().to_string();
            let listed = message.split("expected one of").nth(1).unwrap_or_else(|| panic!("{message}"));
            let mut serde: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
            let mut ours: Vec<&str> = keys.keys().map(String::as_str).collect();
            serde.sort_unstable();
            ours.sort_unstable();
            assert_eq!(serde, ours, "[{section}]");
        }
    }

    #[test]
    fn overrides_apply_and_round_trip() {
        let sets = vec!["train.lr=3e-4".to_string(), "checkpoint.save=runs/x".to_string()];
        let c = Config::from_toml_str(MODEL, "t", &sets).unwrap();
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.checkpoint.save, "runs/x");
        let again = Config::from_toml_str(&c.to_toml(), "t", &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn a_type_error_names_the_overrides_as_well_as_the_file() {
        let sets = vec!["model.hidden_size=abc".to_string()];
        let err = Config::from_toml_str(MODEL, "t.toml", &sets).unwrap_err().to_string();
        assert!(err.starts_with("config file t.toml with --set model.hidden_size=abc is not valid"), "{err}");
        assert!(err.contains("model.hidden_size"), "{err}");
        // Without overrides the file alone is named.
        let err = parse(&format!("{MODEL}[train]\nlr = \"fast\"\n")).unwrap_err();
        assert!(err.starts_with("config file test.toml is not valid"), "{err}");
    }

    /// A global batch the data-parallel micro-batches do not divide is refused with both ways out,
    /// and each way out is a valid configuration.
    #[test]
    fn a_global_batch_that_data_parallelism_does_not_divide_names_the_ways_out() {
        let sets = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let base =
            ["train.micro_batch_size=16", "train.global_batch_size=16", "parallel.data_parallel_size=2"];
        let err = Config::from_toml_str(MODEL, "t", &sets(&base)).unwrap_err().to_string();
        assert!(err.contains("use --global-batch-size 32, or --micro-batch-size 8 to keep 16"), "{err}");
        for fix in ["train.global_batch_size=32", "train.micro_batch_size=8"] {
            let mut v = base.to_vec();
            v.push(fix);
            assert!(Config::from_toml_str(MODEL, "t", &sets(&v)).is_ok(), "{fix}");
        }
        let err = Config::from_toml_str(MODEL, "t", &sets(&["train.global_batch_size=4"])).unwrap_err();
        assert!(err.to_string().ends_with("to keep 4"), "{err}");
        assert_eq!(batch_advice(0, 4, 2), "; use --global-batch-size 8");
        // 12 over 8 data-parallel ranks cannot be kept.
        assert_eq!(batch_advice(12, 4, 8), "; use --global-batch-size 32");
        assert_eq!(
            batch_advice(24, 4, 4),
            "; use --global-batch-size 32, or --micro-batch-size 3 to keep 24"
        );
    }

    #[test]
    fn a_data_path_may_be_one_string_as_on_megatrons_command_line() {
        let one = Config::from_toml_str(MODEL, "t", &["data.data_path=data/a_text_document".into()]).unwrap();
        assert_eq!(one.data.data_path, ["data/a_text_document"]);
        let blend = Config::from_toml_str(MODEL, "t", &["data.data_path=\"0.3 a  0.7 b\"".into()]).unwrap();
        assert_eq!(blend.data.data_path, ["0.3", "a", "0.7", "b"]);
        let list = Config::from_toml_str(MODEL, "t", &["data.data_path=[\"0.3\", \"a b\"]".into()]).unwrap();
        assert_eq!(list.data.data_path, ["0.3", "a b"]);
        // Written back as a list, which reads the same.
        assert_eq!(Config::from_toml_str(&blend.to_toml(), "t", &[]).unwrap(), blend);
        let err = Config::from_toml_str(MODEL, "t", &["data.data_path=3".into()]).unwrap_err().to_string();
        assert!(err.contains("expected a list of strings"), "{err}");
    }

    #[test]
    fn bad_parallel_values_are_refused() {
        let err = parse(&format!("{MODEL}[parallel]\ntensor_model_parallel_size = 2\n")).unwrap_err();
        assert!(err.contains("parallel.tensor_model_parallel_size = 2"), "{err}");
        let err = parse(&format!("{MODEL}[parallel]\npipeline_schedule = \"2f2b\"\n")).unwrap_err();
        assert!(err.contains("known: gpipe, 1f1b"), "{err}");
        let err = parse(&format!(
            "{MODEL}[train]\nmicro_batch_size = 2\nglobal_batch_size = 6\n[parallel]\ndata_parallel_size = 2\n"
        ))
        .unwrap_err();
        assert!(err.contains("micro_batch_size × data_parallel_size"), "{err}");
        assert!(parse(&format!("{MODEL}[parallel]\npipeline_model_parallel_size = 2\n")).is_ok());
    }

    const MODEL: &str = "[model]\nvocab_size = 10\nseq_length = 8\nnum_layers = 1\nhidden_size = 8\nnum_attention_heads = 2\n";

    /// Seeds are NumPy's `RandomState` seeds (the data order is its shuffle): 32 bits.
    #[test]
    fn seeds_past_32_bits_are_refused() {
        assert!(Config::from_toml_str(MODEL, "t", &["train.seed=4294967295".into()]).is_ok());
        let e = Config::from_toml_str(MODEL, "t", &["train.seed=4294967296".into()]).unwrap_err().to_string();
        assert!(e.contains("train.seed") && e.contains("at most 4294967295"), "{e}");
    }

    /// `eval_iters = 0` turns evaluation off, as Megatron's `--eval-iters 0` does.
    #[test]
    fn no_eval_iters_is_no_evaluation() {
        let c = Config::from_toml_str(MODEL, "t", &["logging.eval_iters=0".into()]).unwrap();
        assert_eq!((c.logging.eval_interval, c.logging.eval_iters), (0, 0));
        let c = Config::from_toml_str(MODEL, "t", &["logging.eval_iters=3".into()]).unwrap();
        assert_eq!(c.logging.eval_interval, LoggingConfig::default().eval_interval);
    }

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
        let err = parse(&MODEL.replace("num_attention_heads = 2", "num_attention_heads = 3")).unwrap_err();
        assert!(err.contains("model.num_attention_heads = 3"), "{err}");
    }

    #[test]
    fn global_batch_must_be_a_multiple() {
        let err =
            parse(&format!("{MODEL}[train]\nmicro_batch_size = 3\nglobal_batch_size = 8\n")).unwrap_err();
        assert!(err.contains("train.global_batch_size = 8"), "{err}");
    }
}
