//! Megatron-LM flags that `troupe train` does not take as options of its own, so a command line
//! ported from a Megatron script meets an explanation instead of clap's `unexpected argument`.
//!
//! Before clap parses, [`port`] takes these flags out of a `train` or `config show` command line
//! and sorts each into one of four cases:
//! - the same as troupe's fixed model (`--normalization LayerNorm`, `--hidden-dropout 0`,
//!   `--init-method-std 0.02`): accepted without a word;
//! - an implementation or logging choice that does not change the result (`--use-flash-attn`,
//!   `--num-workers 2`, `--tensorboard-queue-size`, `--sequence-parallel` at tensor-parallel size 1):
//!   ignored, with a note saying why;
//! - a different name for what troupe has (`--bf16` → `--dtype bf16`, `--tokenizer-model` →
//!   `--tokenizer`, `--train-samples` → steps, `--lr-warmup-fraction`, `--ffn-hidden-size` and
//!   `--max-position-embeddings`, the last three checked against the resolved config);
//! - a model or training feature troupe does not have (`--swiglu`, `--fp16`, non-zero dropout,
//!   `--rampup-batch-size`): a usage error naming the flag and what troupe does instead.
//!
//! Every error of a command line is reported at once (exit code 2).

use std::ffi::OsString;
use std::path::Path;

/// What a flag means to troupe.
#[derive(Clone, Copy)]
enum Rule {
    /// Ignored (does not change the result), with the reason as a note.
    Ignore(&'static str),
    /// Refused: a feature troupe lacks; the text says what it does instead.
    Refuse(&'static str),
    /// Accepted when the value is one of these (ASCII case ignored); otherwise refused with the text.
    Only(&'static [&'static str], &'static str),
    /// Handled by [`port`] itself.
    Special,
}

/// Why the experiment-tracking flags (Weights & Biases, one-logger) are ignored.
const NO_WANDB: &str = "use --tensorboard-dir, --log-json and `troupe plot`, or --metrics-port";
/// Why Megatron's checkpoint-format flags are ignored.
const OWN_CHECKPOINTS: &str =
    "troupe writes its own checkpoints (safetensors); `troupe export` writes Hugging Face's";

/// Flag (without `--`), whether it takes a value, and its rule.
const FLAGS: &[(&str, bool, Rule)] = &[
    ("use-flash-attn", false, Rule::Ignore("attention always runs troupe's own fused kernel")),
    (
        "no-masked-softmax-fusion",
        false,
        Rule::Ignore("kernel fusion choices do not apply to troupe's kernels"),
    ),
    ("no-bias-gelu-fusion", false, Rule::Ignore("kernel fusion choices do not apply to troupe's kernels")),
    ("no-bias-dropout-fusion", false, Rule::Ignore("kernel fusion choices do not apply to troupe's kernels")),
    (
        "no-gradient-accumulation-fusion",
        false,
        Rule::Ignore("kernel fusion choices do not apply to troupe's kernels"),
    ),
    (
        "overlap-grad-reduce",
        false,
        Rule::Ignore("gradient buckets are always reduced while the backward pass runs"),
    ),
    (
        "overlap-param-gather",
        false,
        Rule::Ignore("troupe schedules the distributed optimizer's all-gather itself"),
    ),
    ("use-mcore-models", false, Rule::Ignore("troupe has one GPT implementation")),
    ("transformer-impl", true, Rule::Ignore("troupe has one GPT implementation")),
    (
        "distributed-backend",
        true,
        Rule::Ignore("the backend follows --device: NCCL on GPUs, TCP or in-process on CPUs"),
    ),
    ("data-impl", true, Rule::Ignore("indexed datasets are always memory-mapped")),
    ("num-workers", true, Rule::Ignore("the training process reads its memory-mapped dataset itself")),
    ("tokenizer-type", true, Rule::Ignore("the tokenizer's kind is read from its files (see --tokenizer)")),
    (
        "log-throughput",
        false,
        Rule::Ignore("the log lines always give tokens/s, and --tensorboard-dir always gets `throughput`"),
    ),
    ("timing-log-level", true, Rule::Ignore("use --trace for a step's timeline")),
    ("log-params-norm", false, Rule::Ignore("not logged; the log lines give the gradient norm")),
    ("log-num-zeros-in-grad", false, Rule::Ignore("not logged; the log lines give the gradient norm")),
    ("timing-log-option", true, Rule::Ignore("use --trace for a step's timeline")),
    ("log-progress", false, Rule::Ignore("progress is on the terminal and, per step, in --log-json")),
    (
        "log-timers-to-tensorboard",
        false,
        Rule::Ignore("--tensorboard-dir always gets `iteration-time`; use --trace for a step's timeline"),
    ),
    (
        "log-validation-ppl-to-tensorboard",
        false,
        Rule::Ignore("--tensorboard-dir always gets `lm loss validation ppl`"),
    ),
    ("log-memory-to-tensorboard", false, Rule::Ignore("the closing line gives the peak host memory")),
    ("log-world-size-to-tensorboard", false, Rule::Ignore("the first line gives the layout")),
    (
        "tensorboard-queue-size",
        true,
        Rule::Ignore("each step's TensorBoard scalars are written to the file as the step ends"),
    ),
    (
        "exit-signal-handler",
        false,
        Rule::Ignore("a run always saves a checkpoint and exits on SIGTERM or SIGINT"),
    ),
    ("attention-softmax-in-fp32", false, Rule::Ignore("softmax statistics are always kept in fp32")),
    (
        "apply-query-key-layer-scaling",
        false,
        Rule::Ignore("it changes the result only in fp16, which troupe does not train in"),
    ),
    (
        "ckpt-format",
        true,
        Rule::Ignore(
            "troupe writes its own checkpoints (safetensors); `troupe export` writes Hugging Face's",
        ),
    ),
    (
        "no-async-tensor-model-parallel-allreduce",
        false,
        Rule::Ignore("there is no tensor parallelism to overlap"),
    ),
    ("loss-scale", true, Rule::Ignore("loss scaling is for fp16, which troupe does not train in")),
    ("initial-loss-scale", true, Rule::Ignore("loss scaling is for fp16, which troupe does not train in")),
    ("min-loss-scale", true, Rule::Ignore("loss scaling is for fp16, which troupe does not train in")),
    ("loss-scale-window", true, Rule::Ignore("loss scaling is for fp16, which troupe does not train in")),
    ("hysteresis", true, Rule::Ignore("loss scaling is for fp16, which troupe does not train in")),
    ("wandb-project", true, Rule::Ignore(NO_WANDB)),
    ("wandb-exp-name", true, Rule::Ignore(NO_WANDB)),
    ("wandb-save-dir", true, Rule::Ignore(NO_WANDB)),
    ("wandb-entity", true, Rule::Ignore(NO_WANDB)),
    ("enable-one-logger", false, Rule::Ignore(NO_WANDB)),
    ("no-one-logger", false, Rule::Ignore(NO_WANDB)),
    ("one-logger-project", true, Rule::Ignore(NO_WANDB)),
    ("one-logger-run-name", true, Rule::Ignore(NO_WANDB)),
    ("one-logger-async", false, Rule::Ignore(NO_WANDB)),
    ("app-tag-run-name", true, Rule::Ignore(NO_WANDB)),
    ("app-tag-run-version", true, Rule::Ignore(NO_WANDB)),
    ("use-dist-ckpt", false, Rule::Ignore(OWN_CHECKPOINTS)),
    ("dist-ckpt-format", true, Rule::Ignore(OWN_CHECKPOINTS)),
    ("auto-detect-ckpt-format", false, Rule::Ignore(OWN_CHECKPOINTS)),
    ("mmap-warmup", false, Rule::Ignore("indexed datasets are memory-mapped; pages load as they are read")),
    (
        "mid-level-dataset-surplus",
        true,
        Rule::Only(&["0.005"], "troupe's blends ask each dataset for Megatron's default surplus, 0.005"),
    ),
    (
        "legacy-tokenizer",
        false,
        Rule::Ignore("the tokenizer's kind is read from its files (see --tokenizer)"),
    ),
    ("spec", true, Rule::Ignore("troupe has one GPT implementation")),
    (
        "async-tensor-model-parallel-allreduce",
        false,
        Rule::Ignore("there is no tensor parallelism to overlap"),
    ),
    ("fp8-format", true, Rule::Refuse("troupe trains in bf16 (--bf16) or fp32; there is no FP8")),
    ("fp8-recipe", true, Rule::Refuse("troupe trains in bf16 (--bf16) or fp32; there is no FP8")),
    ("fp8-margin", true, Rule::Refuse("troupe trains in bf16 (--bf16) or fp32; there is no FP8")),
    ("fp8-param-gather", false, Rule::Refuse("troupe trains in bf16 (--bf16) or fp32; there is no FP8")),
    ("hidden-dropout", true, Rule::Only(&["0", "0.0"], "troupe's GPT has no dropout; pass 0")),
    ("attention-dropout", true, Rule::Only(&["0", "0.0"], "troupe's GPT has no dropout; pass 0")),
    (
        "normalization",
        true,
        Rule::Only(&["layernorm"], "troupe's GPT uses LayerNorm (GPT-2); there is no RMSNorm"),
    ),
    (
        "position-embedding-type",
        true,
        Rule::Only(&["learned_absolute"], "troupe's GPT learns absolute positions (GPT-2); there is no RoPE"),
    ),
    (
        "init-method-std",
        true,
        Rule::Only(
            &["0.02"],
            "troupe initialises as GPT-2 and Megatron's default do: std 0.02, output projections scaled by 1/√(2·layers)",
        ),
    ),
    (
        "dataloader-type",
        true,
        Rule::Only(
            &["single"],
            "troupe's sampler is Megatron's `single` one: the shuffled samples in order, resumable from the samples consumed",
        ),
    ),
    ("lr-warmup-init", true, Rule::Only(&["0"], "warm-up starts from a learning rate of 0")),
    ("weight-decay-incr-style", true, Rule::Only(&["constant"], "the weight decay is constant")),
    ("swiglu", false, Rule::Refuse("troupe's MLP uses GELU; there is no SwiGLU")),
    (
        "group-query-attention",
        false,
        Rule::Refuse("troupe's attention has a key and value head per query head (GPT-2)"),
    ),
    (
        "num-query-groups",
        true,
        Rule::Refuse("troupe's attention has a key and value head per query head (GPT-2)"),
    ),
    (
        "rampup-batch-size",
        true,
        Rule::Refuse("there is no batch-size ramp-up: every step takes --global-batch-size sequences"),
    ),
    (
        "mock-data",
        false,
        Rule::Refuse(
            "there is no mock dataset; without --data-path troupe trains on its embedded Shakespeare corpus",
        ),
    ),
    (
        "no-save-optim",
        false,
        Rule::Refuse("checkpoints always hold the optimizer state; `troupe export` writes the weights alone"),
    ),
    (
        "no-save-rng",
        false,
        Rule::Refuse("checkpoints always hold the RNG state; `troupe export` writes the weights alone"),
    ),
    (
        "untie-embeddings-and-output-weights",
        false,
        Rule::Refuse("troupe ties the output layer to the word embeddings (GPT-2)"),
    ),
    ("disable-bias-linear", false, Rule::Refuse("troupe's linear layers always have biases (GPT-2)")),
    (
        "fp16",
        false,
        Rule::Refuse(
            "there is no loss-scaled fp16 training: CPU training is fp32; on a GPU use --dtype bf16 (the default)",
        ),
    ),
    (
        "sequence-parallel",
        false,
        Rule::Ignore(
            "it splits activations over tensor-parallel ranks, and troupe's tensor-parallel size is 1 \
             (Megatron turns it off there too)",
        ),
    ),
    ("recompute-activations", false, Rule::Refuse("there is no activation recomputation yet")),
    ("recompute-granularity", true, Rule::Refuse("there is no activation recomputation yet")),
    ("recompute-method", true, Rule::Refuse("there is no activation recomputation yet")),
    ("recompute-num-layers", true, Rule::Refuse("there is no activation recomputation yet")),
    (
        "no-load-optim",
        false,
        Rule::Refuse(
            "a resume always restores the optimizer state; --finetune takes the weights alone and starts at step 0",
        ),
    ),
    (
        "no-load-rng",
        false,
        Rule::Refuse(
            "a resume always restores the RNG state; --finetune starts afresh from the weights alone",
        ),
    ),
    ("no-persist-layer-norm", false, Rule::Ignore("kernel choices do not apply to troupe's kernels")),
    (
        "no-create-attention-mask-in-dataloader",
        false,
        Rule::Ignore("troupe's attention is causal by construction"),
    ),
    ("empty-unused-memory-level", true, Rule::Ignore("troupe does not use PyTorch's caching allocator")),
    ("manual-gc", false, Rule::Ignore("there is no garbage collector to drive")),
    ("manual-gc-interval", true, Rule::Ignore("there is no garbage collector to drive")),
    ("manual-gc-eval", true, Rule::Ignore("there is no garbage collector to drive")),
    ("DDP-impl", true, Rule::Ignore("troupe has one data-parallel implementation")),
    ("use-legacy-models", false, Rule::Ignore("troupe has one GPT implementation")),
    ("tp-comm-overlap", false, Rule::Ignore("there is no tensor parallelism to overlap")),
    ("num-dataset-builder-threads", true, Rule::Ignore("dataset indices are built once and cached")),
    ("mmap-bin-files", false, Rule::Ignore("indexed datasets are always memory-mapped")),
    ("no-mmap-bin-files", false, Rule::Ignore("indexed datasets are always memory-mapped")),
    (
        "use-cpu-initialization",
        false,
        Rule::Ignore("weights are always initialised on the host from --seed, whatever the device"),
    ),
    (
        "no-initialization",
        false,
        Rule::Ignore("initialising from --seed takes milliseconds; a resume replaces the weights"),
    ),
    (
        "deterministic-mode",
        false,
        Rule::Ignore(
            "troupe's kernels and reductions are deterministic: the same config and seed give the same bits",
        ),
    ),
    (
        "accumulate-allreduce-grads-in-fp32",
        false,
        Rule::Ignore("parameter gradients are always fp32, accumulated and reduced in fp32"),
    ),
    (
        "check-for-nan-in-loss-and-grad",
        false,
        Rule::Ignore("every step checks its loss and gradients; train.nan_policy (abort or skip) decides"),
    ),
    (
        "no-check-for-nan-in-loss-and-grad",
        false,
        Rule::Ignore("every step checks its loss and gradients; train.nan_policy (abort or skip) decides"),
    ),
    (
        "override-opt_param-scheduler",
        false,
        Rule::Ignore("a resume always takes the command line's schedule, and names what changed"),
    ),
    (
        "openai-gelu",
        false,
        Rule::Ignore(
            "troupe's GELU is always the tanh approximation (GPT-2's gelu_new), which this flag asks for",
        ),
    ),
    (
        "log-loss-scale-to-tensorboard",
        false,
        Rule::Ignore("loss scaling is for fp16, which troupe does not train in"),
    ),
    ("log-straggler", false, Rule::Ignore("troupe warns of a rank that falls behind its peers itself")),
    ("profile", false, Rule::Ignore("use --trace FILE (a step's timeline; --trace-step N picks the step)")),
    (
        "use-pytorch-profiler",
        false,
        Rule::Ignore("use --trace FILE (a step's timeline; --trace-step N picks the step)"),
    ),
    (
        "profile-step-start",
        true,
        Rule::Ignore("use --trace FILE (a step's timeline; --trace-step N picks the step)"),
    ),
    (
        "profile-step-end",
        true,
        Rule::Ignore("use --trace FILE (a step's timeline; --trace-step N picks the step)"),
    ),
    (
        "profile-ranks",
        true,
        Rule::Ignore("use --trace FILE (a step's timeline; --trace-step N picks the step)"),
    ),
    ("async-save", false, Rule::Ignore("checkpoints are written at step boundaries, atomically")),
    ("ckpt-fully-parallel-save", false, Rule::Ignore("troupe writes its own checkpoints (safetensors)")),
    ("ckpt-fully-parallel-load", false, Rule::Ignore("troupe writes its own checkpoints (safetensors)")),
    (
        "ckpt-assume-constant-structure",
        false,
        Rule::Ignore("troupe writes its own checkpoints (safetensors)"),
    ),
    (
        "dist-ckpt-strictness",
        true,
        Rule::Ignore("troupe checks every tensor of a checkpoint by name, shape and checksum"),
    ),
    (
        "save-retain-interval",
        true,
        Rule::Ignore("troupe keeps every checkpoint it saves; remove old iter_* directories yourself"),
    ),
    (
        "non-persistent-save-interval",
        true,
        Rule::Ignore(
            "troupe saves every --save-interval steps, at a planned stop and on SIGTERM/SIGINT only",
        ),
    ),
    ("exit-on-missing-checkpoint", false, Rule::Special),
    (
        "decoder-seq-length",
        true,
        Rule::Ignore("it is for encoder-decoder models; a GPT has --seq-length only"),
    ),
    ("vocab-extra-ids", true, Rule::Only(&["0"], "extra sentinel tokens are for T5; troupe's GPT has none")),
    (
        "optimizer",
        true,
        Rule::Only(&["adam"], "troupe's optimizer is AdamW (Megatron's adam); there is no SGD"),
    ),
    ("sgd-momentum", true, Rule::Ignore("it is for --optimizer sgd; troupe's optimizer is AdamW")),
    (
        "norm-epsilon",
        true,
        Rule::Only(&["1e-5"], "troupe's LayerNorm ε is 1e-5 (GPT-2's and Megatron's default)"),
    ),
    (
        "layernorm-epsilon",
        true,
        Rule::Only(&["1e-5"], "troupe's LayerNorm ε is 1e-5 (GPT-2's and Megatron's default)"),
    ),
    (
        "start-weight-decay",
        true,
        Rule::Refuse(
            "the weight decay is constant (--weight-decay-incr-style constant): give --weight-decay",
        ),
    ),
    (
        "end-weight-decay",
        true,
        Rule::Refuse(
            "the weight decay is constant (--weight-decay-incr-style constant): give --weight-decay",
        ),
    ),
    (
        "fp32-residual-connection",
        false,
        Rule::Refuse(
            "the residual stream is bf16 under --dtype bf16 (fp32 on CPUs); use --dtype fp32 for an fp32 model",
        ),
    ),
    (
        "use-rotary-position-embeddings",
        false,
        Rule::Refuse("troupe's GPT learns absolute positions (GPT-2); there is no RoPE"),
    ),
    ("no-position-embedding", false, Rule::Refuse("troupe's GPT learns absolute positions (GPT-2)")),
    (
        "eod-mask-loss",
        false,
        Rule::Refuse("the loss counts every target token, end-of-document ones too (Megatron's default)"),
    ),
    (
        "reset-position-ids",
        false,
        Rule::Refuse("positions run over the whole sequence across documents (Megatron's default)"),
    ),
    (
        "reset-attention-mask",
        false,
        Rule::Refuse("attention spans the whole sequence across documents (Megatron's default)"),
    ),
    (
        "calculate-per-token-loss",
        false,
        Rule::Refuse("the loss is the mean over each microbatch's tokens, averaged over the microbatches"),
    ),
    (
        "full-validation",
        false,
        Rule::Refuse("validation takes --eval-iters global batches; raise it to cover the validation set"),
    ),
    (
        "use-torch-fsdp2",
        false,
        Rule::Refuse("there is no FSDP; --use-distributed-optimizer shards the optimizer state"),
    ),
    ("encoder-seq-length", true, Rule::Special),
    ("ckpt-step", true, Rule::Special),
    ("bf16", false, Rule::Special),
    ("tokenizer-model", true, Rule::Special),
    ("vocab-file", true, Rule::Special),
    ("merge-file", true, Rule::Special),
    ("lr-warmup-fraction", true, Rule::Special),
    ("ffn-hidden-size", true, Rule::Special),
    ("max-position-embeddings", true, Rule::Special),
    ("kv-channels", true, Rule::Special),
    ("train-samples", true, Rule::Special),
    ("lr-decay-samples", true, Rule::Special),
    ("lr-warmup-samples", true, Rule::Special),
    ("lr-wsd-decay-samples", true, Rule::Special),
    ("distributed-timeout-minutes", true, Rule::Special),
    ("data-cache-path", true, Rule::Special),
    ("data-args-path", true, Rule::Special),
    ("per-split-data-args-path", true, Rule::Special),
];

/// Ported flags checked against the resolved config (see [`Ported::apply`]).
#[derive(Debug, Clone, Default)]
pub struct Ported {
    pub lr_warmup_fraction: Option<f64>,
    pub ffn_hidden_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub kv_channels: Option<usize>,
    /// Megatron's sample-based training: sequences, turned into steps of the global batch.
    pub train_samples: Option<u64>,
    pub lr_decay_samples: Option<u64>,
    pub lr_warmup_samples: Option<u64>,
    pub lr_wsd_decay_samples: Option<u64>,
    /// Megatron's `--ckpt-step N`: resume from `iter_N` of `--load` rather than its latest.
    pub ckpt_step: Option<u64>,
    /// Megatron's `--exit-on-missing-checkpoint`: no fresh start when `--load` (also `--save`)
    /// holds nothing yet.
    pub exit_on_missing_checkpoint: bool,
}

/// A command line with the Megatron flags of [`FLAGS`] taken out.
pub struct PortedArgs {
    /// What clap parses.
    pub args: Vec<OsString>,
    /// Notes to print (ignored flags).
    pub notes: Vec<String>,
    /// Usage errors, one per refused flag.
    pub errors: Vec<String>,
    pub ported: Ported,
}

/// Index of the subcommand word after the global options (`-v`, `--nccl-lib PATH`).
fn subcommand_at(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_str()?;
        if a == "--nccl-lib" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(i);
        }
    }
    None
}

/// Takes the flags of [`FLAGS`] out of a `troupe train` or `troupe config show` command line
/// (other command lines pass through unchanged).
pub fn port(args: Vec<OsString>) -> PortedArgs {
    let mut out =
        PortedArgs { args: Vec::new(), notes: Vec::new(), errors: Vec::new(), ported: Ported::default() };
    let start = match subcommand_at(&args) {
        Some(i) if args[i] == "train" => i + 1,
        Some(i) if args[i] == "config" && args.get(i + 1).is_some_and(|a| a == "show") => i + 2,
        _ => {
            out.args = args;
            return out;
        }
    };
    out.args.extend_from_slice(&args[..start]);
    let (mut vocab, mut merges): (Option<String>, Option<String>) = (None, None);
    let mut i = start;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(text) = arg.to_str() else {
            out.args.push(arg.clone());
            continue;
        };
        if text == "--" {
            out.args.extend_from_slice(&args[i - 1..]);
            break;
        }
        let Some(body) = text.strip_prefix("--") else {
            out.args.push(arg.clone());
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(&(_, takes_value, rule)) = FLAGS.iter().find(|(f, _, _)| *f == name) else {
            out.args.push(arg.clone());
            continue;
        };
        let value = if takes_value {
            match inline {
                Some(v) => Some(v),
                None => match args.get(i).and_then(|v| v.to_str()) {
                    Some(v) if !v.starts_with("--") => {
                        i += 1;
                        Some(v.to_string())
                    }
                    _ => {
                        out.errors.push(format!("--{name} needs a value"));
                        continue;
                    }
                },
            }
        } else {
            if inline.is_some() {
                out.errors.push(format!("--{name} takes no value"));
                continue;
            }
            None
        };
        let v = value.unwrap_or_default();
        if name == "rampup-batch-size" {
            // It takes three values (start, increment, samples): leave none for clap.
            while args.get(i).and_then(|a| a.to_str()).is_some_and(|a| !a.starts_with("--")) {
                i += 1;
            }
        }
        let megatron = format!("--{name} (a Megatron-LM flag)");
        match rule {
            Rule::Ignore(why) => out.notes.push(format!("{megatron} is ignored: {why}")),
            Rule::Refuse(why) => out.errors.push(format!("{megatron}: {why}")),
            Rule::Only(ok, why) => {
                let same = |o: &&str| {
                    o.eq_ignore_ascii_case(&v)
                        || matches!((o.parse::<f64>(), v.parse::<f64>()), (Ok(a), Ok(b)) if a == b)
                };
                if !ok.iter().any(same) {
                    out.errors.push(format!("--{name} {v} (a Megatron-LM flag): {why}"));
                }
            }
            Rule::Special => match name {
                // `config show` takes train's options too (and prints only the config).
                "bf16" => out.args.extend(["--dtype".into(), "bf16".into()]),
                "tokenizer-model" => out.args.extend(["--tokenizer".into(), v.into()]),
                "vocab-file" => vocab = Some(v),
                "merge-file" => merges = Some(v),
                "lr-warmup-fraction" => match v.parse::<f64>() {
                    Ok(f) if (0.0..=1.0).contains(&f) => out.ported.lr_warmup_fraction = Some(f),
                    _ => out.errors.push(format!("--lr-warmup-fraction {v}: must be a number from 0 to 1")),
                },
                "ffn-hidden-size" => match v.parse::<usize>() {
                    Ok(n) => out.ported.ffn_hidden_size = Some(n),
                    Err(_) => out.errors.push(format!("--ffn-hidden-size {v}: not a whole number")),
                },
                "max-position-embeddings" => match v.parse::<usize>() {
                    Ok(n) => out.ported.max_position_embeddings = Some(n),
                    Err(_) => out.errors.push(format!("--max-position-embeddings {v}: not a whole number")),
                },
                "kv-channels" => match v.parse::<usize>() {
                    Ok(n) => out.ported.kv_channels = Some(n),
                    Err(_) => out.errors.push(format!("--kv-channels {v}: not a whole number")),
                },
                "train-samples" | "lr-decay-samples" | "lr-warmup-samples" | "lr-wsd-decay-samples" => {
                    let slot = match name {
                        "train-samples" => &mut out.ported.train_samples,
                        "lr-decay-samples" => &mut out.ported.lr_decay_samples,
                        "lr-wsd-decay-samples" => &mut out.ported.lr_wsd_decay_samples,
                        _ => &mut out.ported.lr_warmup_samples,
                    };
                    match v.parse::<u64>() {
                        Ok(n) => *slot = Some(n),
                        Err(_) => out.errors.push(format!("--{name} {v}: not a whole number of samples")),
                    }
                }
                "distributed-timeout-minutes" => match v.parse::<f64>() {
                    Ok(m) if m > 0.0 && m.is_finite() => {
                        out.args.extend(["--comm-timeout".into(), format!("{}", m * 60.0).into()])
                    }
                    _ => out
                        .errors
                        .push(format!("--distributed-timeout-minutes {v}: must be a positive number")),
                },
                "data-args-path" | "per-split-data-args-path" => {
                    let given = |flags: &[&str]| {
                        args[start..].iter().filter_map(|a| a.to_str()).any(|a| {
                            flags
                                .iter()
                                .any(|f| a == *f || a.strip_prefix(*f).is_some_and(|r| r.starts_with('=')))
                        })
                    };
                    let clash: &[&str] = if name == "data-args-path" {
                        &["--data-path", "--per-split-data-args-path"]
                    } else {
                        &["--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"]
                    };
                    if given(clash) {
                        out.errors.push(format!(
                            "--{name} and {} both name the data; give one",
                            clash.join(" or ")
                        ));
                        continue;
                    }
                    match data_args(name, &v) {
                        Ok(sets) => {
                            for set in sets {
                                out.args.extend(["--set".into(), set.into()]);
                            }
                        }
                        Err(e) => out.errors.push(format!("--{name} {v}: {e}")),
                    }
                }
                // A GPT's one sequence length under Megatron's other name for it.
                "encoder-seq-length" => out.args.extend(["--seq-length".into(), v.into()]),
                // A --load that holds nothing stops the run even when it is also --save.
                "exit-on-missing-checkpoint" => out.ported.exit_on_missing_checkpoint = true,
                "ckpt-step" => match v.parse::<u64>() {
                    Ok(n) => out.ported.ckpt_step = Some(n),
                    Err(_) => out.errors.push(format!("--ckpt-step {v}: not a step number")),
                },
                "data-cache-path" => out.args.extend([
                    "--set".into(),
                    format!("data.cache_dir={}", toml::Value::String(v.clone())).into(),
                ]),
                _ => unreachable!("every Special flag is matched"),
            },
        }
    }
    match (vocab, merges) {
        (None, None) => {}
        (Some(v), None) => out.args.extend(["--tokenizer".into(), v.into()]),
        (None, Some(_)) => out.errors.push("--merge-file needs --vocab-file".into()),
        (Some(v), Some(m)) => match gpt2_dir(Path::new(&v), Path::new(&m)) {
            Some(dir) => out.args.extend(["--tokenizer".into(), dir]),
            // Files named otherwise (Megatron's own gpt2-vocab.json, gpt2-merges.txt): the pair.
            None => out.args.extend([
                "--tokenizer".into(),
                v.into(),
                "--set".into(),
                format!("data.merge_file={}", toml::Value::String(m)).into(),
            ]),
        },
    }
    out
}

/// The directory of a GPT-2 vocabulary and merges pair named as `--tokenizer DIR` reads them.
/// The `--set` overrides of Megatron's data-argument files: `--data-args-path` holds
/// `--data-path`'s words (whitespace-separated), `--per-split-data-args-path` a JSON object whose
/// `train`, `valid` and `test` entries are such a string or a list of words.
fn data_args(flag: &str, path: &str) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let array = |words: Vec<String>| toml::Value::Array(words.into_iter().map(toml::Value::String).collect());
    if flag == "data-args-path" {
        let words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
        if words.is_empty() {
            return Err("the file names no data".into());
        }
        return Ok(vec![format!("data.data_path={}", array(words))]);
    }
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let object = json.as_object().ok_or("expected a JSON object with train, valid and test entries")?;
    if let Some(other) = object.keys().find(|k| !["train", "valid", "test"].contains(&k.as_str())) {
        return Err(format!("unknown entry {other:?}; the entries are train, valid and test"));
    }
    let mut sets = Vec::new();
    for split in ["train", "valid", "test"] {
        let words: Vec<String> = match object.get(split) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    serde_json::Value::String(s) => Ok(s.trim().to_owned()),
                    serde_json::Value::Number(n) => Ok(n.to_string()),
                    other => Err(format!("{split}: {other} is not a weight or a path")),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("{split}: expected a string or a list, not {other}")),
        };
        if !words.is_empty() {
            sets.push(format!("data.{split}_data_path={}", array(words)));
        }
    }
    Ok(sets)
}

fn gpt2_dir(vocab: &Path, merges: &Path) -> Option<OsString> {
    let dir = vocab.parent()?;
    let named = vocab.file_name()? == "vocab.json" && merges.file_name()? == "merges.txt";
    (named && merges.parent()? == dir).then(|| match dir.as_os_str().is_empty() {
        true => OsString::from("."),
        false => dir.as_os_str().to_owned(),
    })
}

impl Ported {
    /// Settings to add to the config for the ported flags, given the config resolved without
    /// them; a ported value troupe's model cannot take is an error naming it.
    ///
    /// # Errors
    /// The message of a usage error.
    ///
    /// `explicit(key)` tells whether the command line set `key` itself (a Megatron flag and the
    /// troupe flag for the same setting are refused together, as Megatron refuses them).
    pub fn apply(
        &self,
        cfg: &troupe::config::Config,
        explicit: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, String> {
        let mut sets = Vec::new();
        let m = &cfg.model;
        if let Some(k) = self.kv_channels
            && k * m.num_attention_heads != m.hidden_size
        {
            return Err(format!(
                "--kv-channels {k} (a Megatron-LM flag): troupe's heads are hidden size / heads = {} wide",
                m.hidden_size / m.num_attention_heads.max(1)
            ));
        }
        if let Some(n) = self.ffn_hidden_size
            && n != 4 * m.hidden_size
        {
            return Err(format!(
                "--ffn-hidden-size {n} (a Megatron-LM flag): troupe's MLP is 4 × hidden size = {}",
                4 * m.hidden_size
            ));
        }
        if let Some(n) = self.max_position_embeddings
            && n < m.seq_length
        {
            return Err(format!(
                "--max-position-embeddings {n} is below --seq-length {}: the positions would not fit",
                m.seq_length
            ));
        }
        if let Some(n) = self.ckpt_step {
            let load = &cfg.checkpoint.load;
            if load.is_empty() {
                return Err(format!(
                    "--ckpt-step {n} (a Megatron-LM flag) picks a checkpoint of --load; give --load"
                ));
            }
            let dir = Path::new(load).join(troupe::checkpoint::iter_dir_name(n));
            if !dir.is_dir() {
                return Err(format!("--ckpt-step {n}: {} does not exist", dir.display()));
            }
            sets.push(format!("checkpoint.load={}", toml::Value::String(dir.display().to_string())));
        }
        let t = &cfg.train;
        let gbs = t.global_batch_size.max(1) as u64;
        let mut train_iters = t.train_iters;
        if let Some(n) = self.train_samples {
            if explicit("train.train_iters") {
                return Err("give --train-samples or --train-iters, not both".into());
            }
            // Megatron: iterations = samples ÷ global batch, rounded down.
            train_iters = n / gbs;
            if train_iters == 0 {
                return Err(format!("--train-samples {n} is less than one global batch ({gbs} sequences)"));
            }
            sets.push(format!("train.train_iters={train_iters}"));
        }
        let mut decay = t.lr_decay_iters.unwrap_or(train_iters);
        if let Some(n) = self.lr_decay_samples {
            if explicit("train.lr_decay_iters") {
                return Err("give --lr-decay-samples or --lr-decay-iters, not both".into());
            }
            decay = steps_of(n, gbs);
            sets.push(format!("train.lr_decay_iters={decay}"));
        }
        let warmups = [
            self.lr_warmup_fraction.is_some(),
            self.lr_warmup_samples.is_some(),
            explicit("train.lr_warmup_iters"),
        ];
        if warmups.iter().filter(|&&w| w).count() > 1 {
            return Err("give one of --lr-warmup-fraction, --lr-warmup-samples and --lr-warmup-iters".into());
        }
        if let Some(f) = self.lr_warmup_fraction {
            // Megatron: warm-up steps = fraction × decay steps (the schedule's decay length).
            sets.push(format!("train.lr_warmup_iters={}", (f * decay as f64).round() as u64));
        }
        if let Some(n) = self.lr_warmup_samples {
            sets.push(format!("train.lr_warmup_iters={}", steps_of(n, gbs)));
        }
        if let Some(n) = self.lr_wsd_decay_samples {
            if explicit("train.lr_wsd_decay_iters") {
                return Err("give --lr-wsd-decay-samples or --lr-wsd-decay-iters, not both".into());
            }
            sets.push(format!("train.lr_wsd_decay_iters={}", steps_of(n, gbs)));
        }
        Ok(sets)
    }

    /// Notes on the ported values: a `--max-position-embeddings` larger than the sequence
    /// (Megatron keeps the unused rows; troupe's position table has --seq-length rows), and
    /// sample counts that are not whole global batches (troupe counts steps).
    pub fn notes(&self, cfg: &troupe::config::Config) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(n) = self.max_position_embeddings
            && n > cfg.model.seq_length
        {
            notes.push(format!(
                "--max-position-embeddings {n}: troupe's position table has --seq-length = {} rows \
                 (positions past the sequence are never used)",
                cfg.model.seq_length
            ));
        }
        let gbs = cfg.train.global_batch_size.max(1) as u64;
        let flags = [
            // Megatron's training length is rounded down, the schedule's lengths to the nearest step.
            ("train-samples", self.train_samples, self.train_samples.map(|n| n / gbs)),
            ("lr-decay-samples", self.lr_decay_samples, self.lr_decay_samples.map(|n| steps_of(n, gbs))),
            ("lr-warmup-samples", self.lr_warmup_samples, self.lr_warmup_samples.map(|n| steps_of(n, gbs))),
            (
                "lr-wsd-decay-samples",
                self.lr_wsd_decay_samples,
                self.lr_wsd_decay_samples.map(|n| steps_of(n, gbs)),
            ),
        ];
        for (flag, samples, steps) in flags {
            if let (Some(n), Some(steps)) = (samples, steps)
                && n % gbs != 0
            {
                notes.push(format!(
                    "--{flag} {n} is {:.2} global batches of {gbs}: troupe counts steps and takes {steps}",
                    n as f64 / gbs as f64
                ));
            }
        }
        notes
    }
}

/// Samples as steps of `gbs` sequences, to the nearest step.
fn steps_of(samples: u64, gbs: u64) -> u64 {
    (samples + gbs / 2) / gbs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ported(line: &str) -> PortedArgs {
        port(line.split_whitespace().map(OsString::from).collect())
    }

    fn strings(p: &PortedArgs) -> Vec<String> {
        p.args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn megatron_flags_are_taken_out_sorted_and_explained() {
        let p = ported(
            "troupe -v train --lr 3e-4 --use-flash-attn --num-workers=2 --hidden-dropout 0.0 \
             --normalization LayerNorm --init-method-std 0.02 --bf16 --train-iters 5",
        );
        assert_eq!(
            strings(&p),
            ["troupe", "-v", "train", "--lr", "3e-4", "--dtype", "bf16", "--train-iters", "5"]
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.notes.len(), 2, "{:?}", p.notes);
        assert!(p.notes[0].contains("--use-flash-attn (a Megatron-LM flag) is ignored"));

        let p = ported(
            "troupe train --swiglu --hidden-dropout 0.1 --normalization RMSNorm --fp16 --recompute-method",
        );
        assert_eq!(p.errors.len(), 5, "{:?}", p.errors);
        assert!(p.errors[0].contains("--swiglu (a Megatron-LM flag): troupe's MLP uses GELU"));
        assert!(p.errors[1].contains("--hidden-dropout 0.1"));
        assert!(p.errors[2].contains("RMSNorm"));
        assert!(p.errors[4].contains("--recompute-method needs a value"));
        assert_eq!(strings(&p), ["troupe", "train"]);

        // Megatron's GPT sequence length under its encoder name; equal values of fixed settings
        // in any spelling; the loss and position options troupe does not have.
        let p = ported(
            "troupe train --encoder-seq-length 128 --norm-epsilon 0.00001 --optimizer adam \
             --vocab-extra-ids 0 --openai-gelu --ckpt-step 20 --eod-mask-loss --optimizer sgd \
             --start-weight-decay 0.01 --reset-position-ids",
        );
        assert_eq!(strings(&p), ["troupe", "train", "--seq-length", "128"]);
        assert_eq!((p.notes.len(), p.ported.ckpt_step), (1, Some(20)), "{:?}", p.notes);
        assert_eq!(p.errors.len(), 4, "{:?}", p.errors);
        assert!(p.errors[0].contains("--eod-mask-loss") && p.errors[1].contains("--optimizer sgd"));
        assert!(p.errors[2].contains("give --weight-decay") && p.errors[3].contains("across documents"));

        // Checkpoint-format and tracking flags are notes; FP8 and another blend surplus are not.
        let p = ported(
            "troupe train --use-dist-ckpt --wandb-save-dir w --mid-level-dataset-surplus 0.005 \
             --mid-level-dataset-surplus 0.01 --fp8-format hybrid",
        );
        assert_eq!(strings(&p), ["troupe", "train"]);
        assert_eq!((p.notes.len(), p.errors.len()), (2, 2), "{:?} {:?}", p.notes, p.errors);
        assert!(p.notes[1].contains("--tensorboard-dir"), "{:?}", p.notes);
        assert!(p.errors[0].contains("surplus, 0.005") && p.errors[1].contains("no FP8"), "{:?}", p.errors);
    }

    #[test]
    fn other_commands_and_arguments_after_a_double_dash_pass_through() {
        let p = ported("troupe launch --nproc-per-node 2 -- troupe train --swiglu");
        assert_eq!(strings(&p).len(), 8);
        assert!(p.errors.is_empty());
        let p = ported("troupe --nccl-lib /x train --inject exit:rank=1,step=2 --set a.b=1");
        assert_eq!(strings(&p).len(), 8);
        let p = ported("troupe config show --max-position-embeddings 256 --lr-warmup-fraction 0.01 --bf16");
        assert_eq!(strings(&p), ["troupe", "config", "show", "--dtype", "bf16"]);
        assert_eq!(p.ported.max_position_embeddings, Some(256));
        assert_eq!(p.ported.lr_warmup_fraction, Some(0.01));
    }

    /// A flag troupe's own options gained would be shadowed by this table: none may be one.
    #[test]
    fn no_ported_flag_is_an_option_of_troupe_train() {
        use clap::Parser as _;
        for (flag, takes_value, _) in FLAGS {
            let mut line = vec!["troupe".to_string(), "train".into(), format!("--{flag}")];
            if *takes_value {
                line.push("1".into());
            }
            let err = crate::cli::Cli::try_parse_from(&line).expect_err(flag);
            assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "--{flag}: {err}");
        }
    }

    #[test]
    fn tokenizer_files_become_the_tokenizer_flag() {
        let p = ported(
            "troupe train --tokenizer-type GPT2BPETokenizer --vocab-file gpt2/vocab.json --merge-file gpt2/merges.txt",
        );
        assert_eq!(strings(&p)[2..], ["--tokenizer", "gpt2"]);
        let p = ported("troupe train --vocab-file vocab.json --merge-file merges.txt");
        assert_eq!(strings(&p)[2..], ["--tokenizer", "."]);
        // Megatron's own file names: the pair, the merges in a key of their own.
        let p = ported("troupe train --vocab-file a/gpt2-vocab.json --merge-file b/gpt2-merges.txt");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(
            strings(&p)[2..],
            ["--tokenizer", "a/gpt2-vocab.json", "--set", "data.merge_file=\"b/gpt2-merges.txt\""]
        );
        let p = ported("troupe train --vocab-file bert/vocab.txt");
        assert_eq!(strings(&p)[2..], ["--tokenizer", "bert/vocab.txt"]);
    }

    #[test]
    fn ported_sizes_are_checked_against_the_config_and_the_warmup_fraction_becomes_steps() {
        let cfg = troupe::config::Config::from_toml_str(
            "[model]\nvocab_size = 64\nseq_length = 32\nnum_layers = 1\nhidden_size = 16\nnum_attention_heads = 2\n\
             [train]\ntrain_iters = 1000\nlr_decay_iters = 800\n",
            "t",
            &[],
        )
        .unwrap();
        let p = Ported {
            ffn_hidden_size: Some(64),
            max_position_embeddings: Some(32),
            lr_warmup_fraction: Some(0.01),
            kv_channels: Some(8),
            ..Ported::default()
        };
        let none = |_: &str| false;
        assert_eq!(p.apply(&cfg, &none).unwrap(), ["train.lr_warmup_iters=8"]);
        assert!(p.notes(&cfg).is_empty());
        let warmup = |k: &str| k == "train.lr_warmup_iters";
        assert!(p.apply(&cfg, &warmup).unwrap_err().contains("give one of"));
        let p = Ported { ffn_hidden_size: Some(48), ..Ported::default() };
        assert!(p.apply(&cfg, &none).unwrap_err().contains("4 × hidden size = 64"));
        let p = Ported { max_position_embeddings: Some(16), ..Ported::default() };
        assert!(p.apply(&cfg, &none).unwrap_err().contains("below --seq-length 32"));
        let p = Ported { max_position_embeddings: Some(64), ..Ported::default() };
        assert!(p.notes(&cfg)[0].contains("has --seq-length = 32 rows"));
        let p = Ported { kv_channels: Some(4), ..Ported::default() };
        assert!(p.apply(&cfg, &none).unwrap_err().contains("hidden size / heads = 8 wide"));
    }

    /// Megatron's sample-based lengths become steps of the global batch: training rounded down
    /// (as Megatron computes its iterations), the schedule's lengths to the nearest step, with
    /// a note when a count is not whole batches; mixing the two ways of one setting is refused.
    #[test]
    fn sample_counts_become_steps_of_the_global_batch() {
        let cfg = troupe::config::Config::from_toml_str(
            "[model]\nvocab_size = 64\nseq_length = 32\nnum_layers = 1\nhidden_size = 16\nnum_attention_heads = 2\n\
             [train]\nmicro_batch_size = 4\nglobal_batch_size = 16\ntrain_iters = 1000\n",
            "t",
            &[],
        )
        .unwrap();
        let none = |_: &str| false;
        let p = ported("troupe train --train-samples 1000 --lr-decay-samples 800 --lr-warmup-samples 40");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let sets = p.ported.apply(&cfg, &none).unwrap();
        // 1000 / 16 = 62.5 → 62 steps; 800 / 16 = 50; 40 / 16 = 2.5 → 3 (nearest, ties up).
        assert_eq!(sets, ["train.train_iters=62", "train.lr_decay_iters=50", "train.lr_warmup_iters=3"]);
        let notes = p.ported.notes(&cfg);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].contains("--train-samples 1000 is 62.50 global batches of 16")
                && notes[0].contains("62")
        );
        assert!(notes[1].contains("--lr-warmup-samples 40") && notes[1].ends_with("takes 3"), "{notes:?}");
        // A warm-up fraction is of the decay length in steps, as Megatron's is of its samples.
        let p = ported("troupe train --train-samples 1600 --lr-warmup-fraction 0.1");
        assert_eq!(
            p.ported.apply(&cfg, &none).unwrap(),
            ["train.train_iters=100", "train.lr_warmup_iters=10"]
        );
        let iters = |k: &str| k == "train.train_iters";
        assert!(p.ported.apply(&cfg, &iters).unwrap_err().contains("--train-samples or --train-iters"));
        let p = ported("troupe train --train-samples 15");
        assert!(p.ported.apply(&cfg, &none).unwrap_err().contains("less than one global batch (16"));
        let p = ported("troupe train --lr-warmup-samples 32 --lr-warmup-fraction 0.1");
        assert!(p.ported.apply(&cfg, &none).unwrap_err().contains("give one of"));
        // WSD's final decay in samples, as the other lengths.
        let p = ported("troupe train --lr-decay-style WSD --lr-wsd-decay-samples 200");
        assert_eq!(p.ported.apply(&cfg, &none).unwrap(), ["train.lr_wsd_decay_iters=13"]);
        let wsd = |k: &str| k == "train.lr_wsd_decay_iters";
        assert!(p.ported.apply(&cfg, &wsd).unwrap_err().contains("--lr-wsd-decay-iters, not both"));
        let p = ported("troupe train --train-samples many");
        assert!(p.errors[0].contains("not a whole number of samples"), "{:?}", p.errors);
    }

    #[test]
    fn timeouts_cache_paths_and_many_valued_flags_are_ported() {
        let p = ported("troupe train --distributed-timeout-minutes 2 --data-cache-path /tmp/c d --lr 1");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        // The cache path's stray word stays for clap to refuse; the timeout is in seconds.
        assert_eq!(
            strings(&p),
            [
                "troupe",
                "train",
                "--comm-timeout",
                "120",
                "--set",
                "data.cache_dir=\"/tmp/c\"",
                "d",
                "--lr",
                "1"
            ]
        );
        // --rampup-batch-size takes three values: all go with the refused flag.
        let p = ported("troupe train --rampup-batch-size 32 32 2000000 --lr 1");
        assert_eq!(strings(&p), ["troupe", "train", "--lr", "1"]);
        assert!(p.errors[0].contains("no batch-size ramp-up"), "{:?}", p.errors);
        let p = ported(
            "troupe train --distributed-timeout-minutes 0 --dataloader-type cyclic --lr-warmup-init 0.0",
        );
        assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
        assert!(p.errors[0].contains("must be a positive number") && p.errors[1].contains("`single`"));
        let p = ported("troupe config show --distributed-timeout-minutes 5");
        assert_eq!(strings(&p), ["troupe", "config", "show", "--comm-timeout", "300"]);
    }

    /// Megatron's data-argument files become the data-path keys; a file that cannot be read or
    /// understood, or one given with the flags it stands for, is refused.
    #[test]
    fn data_argument_files_become_the_data_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path.display().to_string()
        };
        let blend = file("blend.txt", "0.3 /d/a_text_document\n 0.7 /d/b_text_document\n");
        let p = ported(&format!("troupe train --data-args-path {blend} --lr 1"));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let set = r#"data.data_path=["0.3", "/d/a_text_document", "0.7", "/d/b_text_document"]"#;
        assert_eq!(strings(&p), ["troupe", "train", "--set", set, "--lr", "1"]);

        let splits = file("splits.json", r#"{"train": "0.5 a 0.5 b", "valid": ["v", "w"], "test": null}"#);
        let p = ported(&format!("troupe config show --per-split-data-args-path {splits}"));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let sets = [r#"data.train_data_path=["0.5", "a", "0.5", "b"]"#, r#"data.valid_data_path=["v", "w"]"#];
        assert_eq!(strings(&p), ["troupe", "config", "show", "--set", sets[0], "--set", sets[1]]);

        for (line, error) in [
            (format!("troupe train --data-args-path {blend} --data-path x"), "both name the data"),
            (format!("troupe train --per-split-data-args-path {splits} --valid-data-path=x"), "both name"),
            ("troupe train --data-args-path /nonexistent/args".into(), "cannot read it"),
            (format!("troupe train --data-args-path {}", file("empty.txt", " \n")), "names no data"),
            (format!("troupe train --per-split-data-args-path {blend}"), "not JSON"),
            (
                format!("troupe train --per-split-data-args-path {}", file("t.json", r#"{"tran": "a"}"#)),
                "\"tran\"",
            ),
            (
                format!("troupe train --per-split-data-args-path {}", file("u.json", r#"{"train": 3}"#)),
                "a string or a list",
            ),
        ] {
            let p = ported(&line);
            assert_eq!(p.errors.len(), 1, "{line}: {:?}", p.errors);
            assert!(p.errors[0].contains(error), "{line}: {:?}", p.errors);
        }
    }
}
