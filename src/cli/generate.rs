//! `troupe generate`: sample text from a checkpoint with a KV cache, streaming tokens as they
//! come.

use std::io::Write;
use std::path::{Path, PathBuf};

use troupe::checkpoint;
use troupe::data::{TextTokenizer, TokenizerSpec};
use troupe::kernels::CpuBackend;
use troupe::models::Rng;
use troupe::models::gpt::{Generator, Sampling};
use troupe::train::corpus;

use super::UsageError;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (a `--save` directory with `latest`, or one `iter_*` directory), or a
    /// Hugging Face GPT-2 directory (`config.json` + `model.safetensors`, as `troupe export` writes).
    #[arg(long)]
    pub load: PathBuf,
    /// Text to continue ("": sample unconditionally, from the end-of-document token).
    #[arg(long, default_value = "ROMEO:")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// A Hugging Face GPT-2 directory read straight into a model (as `troupe import` would, without
/// writing a checkpoint), with the directory's tokenizer, else the embedded one (with a note).
fn hf_model(dir: &Path) -> anyhow::Result<(troupe::Gpt, TextTokenizer)> {
    use troupe::checkpoint::hf;
    let usage = |e: hf::HfError| UsageError(format!("--load {}: {e}", dir.display()));
    let hfc = hf::read_config(dir).map_err(usage)?;
    let m = troupe::GptConfig {
        vocab_size: hfc.vocab_size,
        make_vocab_size_divisible_by: 128,
        seq_length: hfc.n_positions,
        num_layers: hfc.n_layer,
        hidden_size: hfc.n_embd,
        num_attention_heads: hfc.n_head,
    };
    let imported = hf::import(dir, &hfc, &m).map_err(usage)?;
    let mut model = troupe::Gpt::new_zeroed(&m)?;
    model.params_and_grads_mut().0.copy_from_slice(&imported.params);
    let tok = match TokenizerSpec::from_path(dir) {
        Ok(spec) => {
            TextTokenizer::load(&spec).map_err(|e| UsageError(format!("--load {}: {e}", dir.display())))?
        }
        Err(_) => {
            eprintln!(
                "troupe: note: {} has no tokenizer; decoding with the embedded Shakespeare tokenizer",
                dir.display()
            );
            corpus::embedded_tokenizer()?
        }
    };
    if tok.vocab_size() > m.vocab_size {
        return Err(UsageError(format!(
            "--load {}: the tokenizer has {} tokens but the model's vocabulary is {}",
            dir.display(),
            tok.vocab_size(),
            m.vocab_size
        ))
        .into());
    }
    Ok((model, tok))
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let top_p_ok = args.top_p > 0.0 && args.top_p <= 1.0;
    if args.temperature.is_nan() || args.temperature < 0.0 || !top_p_ok {
        return Err(UsageError("--temperature must be ≥ 0 and --top-p in (0, 1]".into()).into());
    }
    let (model, tok) = if checkpoint::hf::is_model_dir(&args.load) {
        hf_model(&args.load)?
    } else {
        let usage = |e: checkpoint::CheckpointError| UsageError(e.to_string());
        let dir = checkpoint::resolve(&args.load)
            .map_err(usage)?
            .ok_or_else(|| UsageError(format!("--load {}: no checkpoint there", args.load.display())))?;
        let loaded = checkpoint::load_model(&dir).map_err(usage)?;
        let cfg = &loaded.state.config;
        let mut model = troupe::Gpt::new_zeroed(&cfg.model)?;
        loaded.restore(&mut model, None).map_err(usage)?;
        (model, corpus::tokenizer(cfg).map_err(|e| UsageError(e.to_string()))?)
    };
    // An empty prompt samples unconditionally: from the end-of-document token, which the
    // training data puts before every document.
    let ids = match (tok.encode(&args.prompt)?, tok.eod()) {
        (ids, _) if !ids.is_empty() => ids,
        (_, Some(eod)) if args.prompt.is_empty() => vec![eod],
        _ => {
            return Err(UsageError(
                "--prompt encodes to no tokens (and this tokenizer has no end-of-document token to start \
                 from); give some text"
                    .into(),
            )
            .into());
        }
    };
    let context = model.config().seq_length;
    if ids.len() + args.max_tokens > context {
        eprintln!(
            "troupe: note: the model's context is {context} tokens; past it, each new token sees the \
             most recent {} to {context} (a sliding window)",
            (context / 2).max(1)
        );
    }
    let be = CpuBackend::new(args.threads);
    let mut g = Generator::new(&model)?;
    let mut rng = Rng::new(args.seed);
    let s = Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    g.generate(&be, &ids, args.max_tokens, s, &mut rng, &mut |t| {
        out.push(t);
        // Decode the whole continuation and print what is new, so multi-token characters
        // come out whole.
        if let Ok(text) = tok.decode(&out)
            && text.len() > printed
            && text.is_char_boundary(printed)
        {
            let _ = write!(stdout, "{}", &text[printed..]);
            let _ = stdout.flush();
            printed = text.len();
        }
    })?;
    writeln!(stdout)?;
    Ok(())
}
