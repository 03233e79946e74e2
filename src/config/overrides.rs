//! `--set key=value` overrides on the TOML tree, and the Megatron-style flag names that map to
//! config keys (`--lr` → `train.lr`, …).
//!
//! A value is parsed as a TOML literal (`3e-4`, `true`, `"text"`, `[1, 2]`); anything that does
//! not parse as one is taken as a string, so `--set checkpoint.save=runs/a` works unquoted.

use super::ConfigError;

/// Megatron flag → config key.
pub const MEGATRON_FLAGS: &[(&str, &str)] = &[
    ("num-layers", "model.num_layers"),
    ("hidden-size", "model.hidden_size"),
    ("num-attention-heads", "model.num_attention_heads"),
    ("seq-length", "model.seq_length"),
    ("vocab-size", "model.vocab_size"),
    ("make-vocab-size-divisible-by", "model.make_vocab_size_divisible_by"),
    ("micro-batch-size", "train.micro_batch_size"),
    ("global-batch-size", "train.global_batch_size"),
    ("lr", "train.lr"),
    ("min-lr", "train.min_lr"),
    ("lr-decay-style", "train.lr_decay_style"),
    ("lr-warmup-iters", "train.lr_warmup_iters"),
    ("lr-decay-iters", "train.lr_decay_iters"),
    ("train-iters", "train.train_iters"),
    ("weight-decay", "train.weight_decay"),
    ("clip-grad", "train.clip_grad"),
    ("adam-beta1", "train.adam_beta1"),
    ("adam-beta2", "train.adam_beta2"),
    ("adam-eps", "train.adam_eps"),
    ("seed", "train.seed"),
    ("exit-interval", "train.exit_interval"),
    ("exit-duration-in-mins", "train.exit_duration_in_mins"),
    ("save", "checkpoint.save"),
    ("load", "checkpoint.load"),
    ("save-interval", "checkpoint.save_interval"),
    ("eval-interval", "logging.eval_interval"),
    ("eval-iters", "logging.eval_iters"),
    ("log-interval", "logging.log_interval"),
    ("data-path", "data.data_path"),
    ("split", "data.split"),
    ("tokenizer", "data.tokenizer"),
    ("tensor-model-parallel-size", "parallel.tensor_model_parallel_size"),
    ("pipeline-model-parallel-size", "parallel.pipeline_model_parallel_size"),
    ("data-parallel-size", "parallel.data_parallel_size"),
    ("virtual-pipeline-model-parallel-size", "parallel.virtual_pipeline_model_parallel_size"),
    ("num-layers-per-virtual-pipeline-stage", "parallel.num_layers_per_virtual_pipeline_stage"),
    ("pipeline-schedule", "parallel.pipeline_schedule"),
    ("grad-bucket-size", "parallel.grad_bucket_size"),
];

/// Applies one `dotted.key=value` to the tree.
///
/// # Errors
/// [`ConfigError::Invalid`] when the text has no `=`, the key is empty, or a path segment is
/// not a table.
pub fn apply(root: &mut toml::Table, set: &str) -> Result<(), ConfigError> {
    let invalid =
        |reason: &str| ConfigError::Invalid { key: set.into(), value: String::new(), reason: reason.into() };
    let (key, raw) = set.split_once('=').ok_or_else(|| invalid("expected KEY=VALUE, e.g. train.lr=3e-4"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(invalid("expected a dotted key such as train.lr"));
    }
    let value = parse_value(raw.trim());
    let mut table = root;
    for seg in &parts[..parts.len() - 1] {
        let entry = table.entry(seg.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| invalid(&format!("`{seg}` is not a section")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_or_string() {
        let mut t = toml::Table::new();
        apply(&mut t, "a.b=3").unwrap();
        apply(&mut t, "a.c=runs/x").unwrap();
        apply(&mut t, "a.d=[\"0.3\", \"p\"]").unwrap();
        assert_eq!(t["a"]["b"].as_integer(), Some(3));
        assert_eq!(t["a"]["c"].as_str(), Some("runs/x"));
        assert_eq!(t["a"]["d"].as_array().map(Vec::len), Some(2));
        assert!(apply(&mut t, "novalue").is_err());
        assert!(apply(&mut t, "a.b.c=1").is_err(), "a.b is a number, not a section");
    }
}
