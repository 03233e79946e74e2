//! `troupe export` and `troupe import`: a checkpoint as a Hugging Face GPT-2 directory that
//! `transformers` loads, and such a directory (the released GPT-2 weights, a fine-tuned model) as
//! a troupe checkpoint at step 0 to train on from (see `troupe::checkpoint::hf`).

use std::path::{Path, PathBuf};

use serde_json::json;
use troupe::checkpoint::hf::{self, HfDtype};
use troupe::checkpoint::{self, TrainState};
use troupe::data::{TextTokenizer, TokenizerSpec};
use troupe::train::corpus;

use super::UsageError;
use super::train::ConfigArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    Fp32,
    Bf16,
    Fp16,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Checkpoint to export (a `--save` directory with `latest`, or one `iter_*` directory).
    #[arg(long)]
    pub load: PathBuf,
    /// Directory to write the Hugging Face model into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Precision of the exported weights (training keeps fp32 master weights: fp32 is exact).
    #[arg(long, value_enum, default_value_t = DtypeArg::Fp32)]
    pub dtype: DtypeArg,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Hugging Face GPT-2 directory: config.json and model.safetensors (or a sharded
    /// model.safetensors.index.json), as `save_pretrained` writes them.
    #[arg(long, value_name = "DIR")]
    pub hf: PathBuf,
    /// The training configuration to write beside the checkpoint (`--save DIR` is required).
    /// The model's sizes come from config.json; `--seq-length` may ask for fewer positions.
    #[command(flatten)]
    pub cfg: ConfigArgs,
}

fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// A directory that holds troupe checkpoints (or is one): export must not write into it.
fn is_checkpoint_dir(p: &Path) -> bool {
    p.join("state.json").exists() || p.join("latest").exists()
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let dir = checkpoint::resolve(&args.load)
        .map_err(usage)?
        .ok_or_else(|| usage(format!("--load {}: no checkpoint there", args.load.display())))?;
    if is_checkpoint_dir(&args.out) {
        return Err(usage(format!(
            "--out {}: holds troupe checkpoints; the export would replace their files. Choose another directory",
            args.out.display()
        )));
    }
    let loaded = checkpoint::load_model(&dir).map_err(usage)?;
    let cfg = loaded.state.config.clone();
    // The run's tokenizer goes with the weights when it can still be found.
    let tokenizer = match corpus::tokenizer(&cfg) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!(
                "troupe: warning: the run's tokenizer cannot be loaded ({e}); exporting the weights without one"
            );
            None
        }
    };
    let dtype = match args.dtype {
        DtypeArg::Fp32 => HfDtype::F32,
        DtypeArg::Bf16 => HfDtype::Bf16,
        DtypeArg::Fp16 => HfDtype::F16,
    };
    let eos = tokenizer.as_ref().and_then(TextTokenizer::eod);
    let out_err = |e: hf::HfError| usage(format!("--out {}: {e}", args.out.display()));
    let report = hf::export(&loaded, &args.out, dtype, eos).map_err(|e| match e {
        hf::HfError::Io { .. } => out_err(e),
        other => usage(other),
    })?;
    match &tokenizer {
        Some(tok) => write_tokenizer(tok, &args.out, cfg.model.seq_length)?,
        None => {
            let stale: Vec<&str> = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
                .into_iter()
                .filter(|f| args.out.join(f).exists())
                .collect();
            if !stale.is_empty() {
                eprintln!(
                    "troupe: warning: {} holds {} from before, which this export did not write and may not \
                     match these weights",
                    args.out.display(),
                    stale.join(", ")
                );
            }
        }
    }
    let c = &report.config;
    eprintln!(
        "troupe: exported step {} of {} to {} as a Hugging Face GPT-2 ({:.2} M parameters: {}, hidden {}, \
         {}, vocabulary {}, {} positions; {} in {}){}",
        report.step,
        dir.display(),
        args.out.display(),
        report.parameters as f64 / 1e6,
        super::count(c.n_layer as u64, "layer"),
        c.n_embd,
        super::count(c.n_head as u64, "head"),
        c.vocab_size,
        c.n_positions,
        dtype.torch_name(),
        megabytes(report.weights_bytes),
        if tokenizer.is_some() { ", with its tokenizer" } else { "" }
    );
    eprintln!(
        "troupe: load it with transformers: GPT2LMHeadModel.from_pretrained({:?}){}",
        args.out.display().to_string(),
        if tokenizer.is_some() { ", AutoTokenizer.from_pretrained(the same)" } else { "" }
    );
    Ok(())
}

/// `tokenizer.json` and a `tokenizer_config.json` that makes `AutoTokenizer` load it as a fast
/// tokenizer with the end-of-document token as GPT-2's `<|endoftext|>` role.
fn write_tokenizer(tok: &TextTokenizer, out: &Path, max_len: usize) -> anyhow::Result<()> {
    troupe::data::tokenizer::save_tokenizer(tok, &out.join("tokenizer.json")).map_err(usage)?;
    let eod = tok.eod().and_then(|id| tok.inner().id_to_token(id));
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = eod {
        for key in ["bos_token", "eos_token", "unk_token"] {
            config[key] = json!(t);
        }
    }
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    hf::write_file(out, "tokenizer_config.json", text.as_bytes()).map_err(usage)
}

pub fn import(args: ImportArgs) -> anyhow::Result<()> {
    let hfc = hf::read_config(&args.hf).map_err(|e| usage(format!("--hf: {e}")))?;
    // The model's sizes from config.json, under the user's flags and --set (which win, and are
    // checked against the weights below); all of config.json's positions unless --seq-length asks
    // for fewer; the directory's tokenizer unless --tokenizer names one.
    let mut sets = vec![
        format!("model.vocab_size={}", hfc.vocab_size),
        format!("model.num_layers={}", hfc.n_layer),
        format!("model.hidden_size={}", hfc.n_embd),
        format!("model.num_attention_heads={}", hfc.n_head),
        format!("model.seq_length={}", hfc.n_positions),
    ];
    let has_tokenizer = TokenizerSpec::from_path(&args.hf).is_ok();
    if has_tokenizer {
        let abs = std::fs::canonicalize(&args.hf).unwrap_or_else(|_| args.hf.clone());
        sets.push(format!("data.tokenizer={}", toml::Value::String(abs.display().to_string())));
    }
    let mut cargs = args.cfg.clone();
    cargs.sets.splice(0..0, sets);
    let mut cfg = cargs.resolve(&[])?;
    // Named on this command line: the default config's own save directory (runs/default) is not
    // where anyone expects an import to land.
    let named = args.cfg.megatron.save.is_some()
        || args.cfg.sets.iter().any(|s| s.trim_start().starts_with("checkpoint.save"));
    let save = cfg.checkpoint.save.clone();
    if !named || save.is_empty() {
        return Err(usage("--save DIR is required: the directory to write the imported checkpoint into"));
    }
    let save_dir = PathBuf::from(&save);
    if let Ok(Some(existing)) = checkpoint::resolve(&save_dir) {
        return Err(usage(format!(
            "--save {save}: already holds a checkpoint ({}); import into an empty directory, so that no \
             run's `latest` is replaced",
            existing.display()
        )));
    }
    let _lock = checkpoint::lock_save_dir(&save_dir, &checkpoint::this_process()).map_err(|e| match e {
        checkpoint::CheckpointError::Busy { .. } => usage(format!("--save {save}: {e}")),
        other => usage(format!("--save {save}: {other}")),
    })?;
    if has_tokenizer || !cfg.data.tokenizer.is_empty() {
        let tok = corpus::tokenizer(&cfg).map_err(|e| usage(format!("--tokenizer: {e}")))?;
        if tok.vocab_size() > cfg.model.vocab_size {
            return Err(usage(format!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                cfg.model.vocab_size
            )));
        }
    }
    let imported = hf::import(&args.hf, &hfc, &cfg.model).map_err(|e| usage(format!("--hf: {e}")))?;
    // Resuming from the checkpoint: `troupe train --config SAVE/config.toml` trains on from it.
    cfg.checkpoint.load = save.clone();
    let state = TrainState {
        step: 0,
        consumed_samples: 0,
        skipped_steps: 0,
        rng_state: cfg.train.seed,
        config: cfg.clone(),
    };
    // Weights alone: a resume from a checkpoint without moments starts them at zero.
    let written = checkpoint::save_weights(&save_dir, &state, &imported.table, &imported.params)
        .map_err(|e| usage(format!("--save {save}: {e}")))?;
    let config_path = save_dir.join("config.toml");
    let header = format!(
        "# Written by `troupe import --hf {}`: the model's sizes are the imported model's.\n\
         # Train on from the imported weights: troupe train --config {}\n",
        args.hf.display(),
        config_path.display()
    );
    hf::write_file(&save_dir, "config.toml", (header + &cfg.to_toml()).as_bytes()).map_err(usage)?;
    let m = &cfg.model;
    eprintln!(
        "troupe: imported {} ({:.2} M parameters: {}, hidden {}, {}, vocabulary {} padded to {}, \
         {} positions{}; stored as {}) into {}",
        args.hf.display(),
        imported.params.len() as f64 / 1e6,
        super::count(m.num_layers as u64, "layer"),
        m.hidden_size,
        super::count(m.num_attention_heads as u64, "head"),
        m.vocab_size,
        m.padded_vocab_size(),
        m.seq_length,
        if m.seq_length < hfc.n_positions { format!(" of its {}", hfc.n_positions) } else { String::new() },
        imported.stored_dtype,
        written.display()
    );
    if !imported.skipped.is_empty() {
        eprintln!(
            "troupe: note: skipped {} tensor(s) that are not part of GPT-2's language model: {}",
            imported.skipped.len(),
            imported.skipped.join(", ")
        );
    }
    if !has_tokenizer && cfg.data.tokenizer.is_empty() {
        eprintln!(
            "troupe: note: {} has no tokenizer; training and `troupe generate` will use the embedded \
             Shakespeare tokenizer unless you pass --tokenizer (to import, or to train)",
            args.hf.display()
        );
    }
    eprintln!(
        "troupe: train on from it: troupe train --config {}   (sample from it: troupe generate --load {save})",
        config_path.display()
    );
    Ok(())
}
