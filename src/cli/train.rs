//! `troupe train` and `troupe config show`: resolve the configuration (file or embedded default,
//! `--set` overrides, Megatron-style flags), open the data, train with a progress bar (plain lines
//! when stderr is not a terminal), write `--log-json` records, save and resume checkpoints.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use troupe::checkpoint;
use troupe::config::{Config, LogFormat};
use troupe::kernels::{Backend, CpuBackend};
use troupe::memory::{MemoryEstimate, gib};
use troupe::models::Rng;
use troupe::models::gpt::{Generator, Sampling};
use troupe::train::corpus;
use troupe::train::run::{self, EvalSplit, Event, RunData, RunError};

use super::UsageError;

/// The embedded default configuration (`config/default.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// Configuration selection shared by `train` and `config show`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Config file (TOML). Default: the embedded `config/default.toml`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any key: `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Megatron-style flags (`--lr 3e-4`, `--num-layers 12`, …); see `troupe train --help`.
    #[command(flatten)]
    pub megatron: MegatronFlags,
    /// Megatron flags troupe takes under other names or checks against the config (see
    /// `cli::megatron`); filled in after parsing.
    #[arg(skip)]
    pub ported: super::megatron::Ported,
}

macro_rules! megatron_flags {
    ($($field:ident => $flag:literal, $key:literal, $doc:literal;)*) => {
        /// Megatron-LM option names, each an alias for one config key.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct MegatronFlags {
            /// One or more dataset prefixes, or a blend of weights and prefixes, as
            /// `--data-path 0.3 a_text_document 0.7 b_text_document` (config key `data.data_path`).
            #[arg(long = "data-path", value_name = "PREFIX", num_args = 1.., action = clap::ArgAction::Set)]
            pub data_path: Option<Vec<String>>,
            /// The training split's own data, in --data-path's forms (Megatron's; config key
            /// `data.train_data_path`): each split is then the whole of its own data and --split is not used.
            #[arg(long = "train-data-path", value_name = "PREFIX", num_args = 1.., action = clap::ArgAction::Set)]
            pub train_data_path: Option<Vec<String>>,
            /// The validation split's own data (config key `data.valid_data_path`).
            #[arg(long = "valid-data-path", value_name = "PREFIX", num_args = 1.., action = clap::ArgAction::Set)]
            pub valid_data_path: Option<Vec<String>>,
            /// The test split's own data (config key `data.test_data_path`).
            #[arg(long = "test-data-path", value_name = "PREFIX", num_args = 1.., action = clap::ArgAction::Set)]
            pub test_data_path: Option<Vec<String>>,
            $(
                #[arg(long = $flag, value_name = "VALUE", allow_negative_numbers = true, help = concat!($doc, " (config key `", $key, "`)"))]
                pub $field: Option<String>,
            )*
        }

        /// The flags above (but the data paths) with the config keys they set.
        #[cfg(test)]
        pub(crate) const FLAG_KEYS: &[(&str, &str)] = &[$(($flag, $key)),*];

        impl MegatronFlags {
            /// The flags given, as `key=value` overrides in flag order.
            pub fn to_sets(&self) -> Vec<String> {
                let mut out = Vec::new();
                for (key, v) in [
                    ("data.data_path", &self.data_path),
                    ("data.train_data_path", &self.train_data_path),
                    ("data.valid_data_path", &self.valid_data_path),
                    ("data.test_data_path", &self.test_data_path),
                ] {
                    if let Some(v) = v {
                        out.push(format!("{key}={}", quote(key, &v.join(" "))));
                    }
                }
                $(
                    if let Some(v) = &self.$field {
                        out.push(format!("{}={}", $key, quote($key, v)));
                    }
                )*
                out
            }
        }
    };
}

megatron_flags! {
    num_layers => "num-layers", "model.num_layers", "Transformer layers";
    hidden_size => "hidden-size", "model.hidden_size", "Hidden size h; the MLP is 4h";
    num_attention_heads => "num-attention-heads", "model.num_attention_heads", "Attention heads; they divide the hidden size";
    seq_length => "seq-length", "model.seq_length", "Tokens per sequence, also the positions the model has";
    vocab_size => "vocab-size", "model.vocab_size", "Vocabulary size before padding; default: the tokenizer's";
    make_vocab_size_divisible_by => "make-vocab-size-divisible-by", "model.make_vocab_size_divisible_by", "Pad the vocabulary to a multiple of this";
    micro_batch_size => "micro-batch-size", "train.micro_batch_size", "Sequences per microbatch on one rank";
    global_batch_size => "global-batch-size", "train.global_batch_size", "Sequences per optimizer step over all data-parallel ranks";
    lr => "lr", "train.lr", "Peak learning rate";
    min_lr => "min-lr", "train.min_lr", "Learning rate at the end of the decay";
    lr_decay_style => "lr-decay-style", "train.lr_decay_style", "Decay after warm-up: constant, linear, cosine, inverse-square-root or WSD";
    lr_wsd_decay_iters => "lr-wsd-decay-iters", "train.lr_wsd_decay_iters", "WSD: steps of the final decay, ending where the decay steps end";
    lr_wsd_decay_style => "lr-wsd-decay-style", "train.lr_wsd_decay_style", "WSD: shape of the final decay: exponential, linear, cosine or minus_sqrt";
    lr_warmup_iters => "lr-warmup-iters", "train.lr_warmup_iters", "Steps of linear warm-up";
    lr_decay_iters => "lr-decay-iters", "train.lr_decay_iters", "Steps over which the rate decays; default: --train-iters";
    train_iters => "train-iters", "train.train_iters", "Optimizer steps to run";
    weight_decay => "weight-decay", "train.weight_decay", "AdamW decoupled weight decay of matrices and embeddings";
    clip_grad => "clip-grad", "train.clip_grad", "Global gradient-norm clipping threshold; 0: off";
    adam_beta1 => "adam-beta1", "train.adam_beta1", "AdamW β1";
    adam_beta2 => "adam-beta2", "train.adam_beta2", "AdamW β2";
    adam_eps => "adam-eps", "train.adam_eps", "AdamW ε";
    seed => "seed", "train.seed", "Seed of the weights, the data order (Megatron's for the same seed) and sampling; 0 to 4294967295";
    exit_interval => "exit-interval", "train.exit_interval", "Save and exit 0 after a step that is a multiple of this; 0: never";
    exit_duration_in_mins => "exit-duration-in-mins", "train.exit_duration_in_mins", "Save and exit 0 once this many minutes have passed; 0: never";
    save => "save", "checkpoint.save", "Directory to save checkpoints into";
    load => "load", "checkpoint.load", "Checkpoint directory to resume from";
    save_interval => "save-interval", "checkpoint.save_interval", "Steps between saves; 0: at the end and on SIGINT/SIGTERM only";
    eval_interval => "eval-interval", "logging.eval_interval", "Steps between validation runs; 0: never";
    eval_iters => "eval-iters", "logging.eval_iters", "Validation iterations per evaluation, each a global batch as in Megatron";
    log_interval => "log-interval", "logging.log_interval", "Steps between log lines";
    log_format => "log-format", "logging.log_format", "How log lines read: troupe, or megatron (Megatron-LM's lines, for tools that read them)";
    tensorboard_dir => "tensorboard-dir", "logging.tensorboard_dir", "Write TensorBoard event files here, under Megatron's tag names";
    tensorboard_log_interval => "tensorboard-log-interval", "logging.tensorboard_log_interval", "Steps between TensorBoard scalars";
    split => "split", "data.split", "Train/valid/test split over documents, e.g. 949,50,1";
    tokenizer => "tokenizer", "data.tokenizer", "Tokenizer: a tokenizer.json, a vocab.txt, or a directory holding tokenizer.json, vocab.json + merges.txt or vocab.txt";
    tensor_model_parallel_size => "tensor-model-parallel-size", "parallel.tensor_model_parallel_size", "Tensor-parallel size; only 1 is supported";
    pipeline_model_parallel_size => "pipeline-model-parallel-size", "parallel.pipeline_model_parallel_size", "Pipeline-parallel size";
    data_parallel_size => "data-parallel-size", "parallel.data_parallel_size", "Data-parallel size of an in-process run; a launched run takes it from the world size";
    virtual_pipeline_model_parallel_size => "virtual-pipeline-model-parallel-size", "parallel.virtual_pipeline_model_parallel_size", "Model chunks per pipeline rank; 0: the schedule's default";
    num_layers_per_virtual_pipeline_stage => "num-layers-per-virtual-pipeline-stage", "parallel.num_layers_per_virtual_pipeline_stage", "Layers per model chunk, Megatron's other way to set the chunks";
    pipeline_schedule => "pipeline-schedule", "parallel.pipeline_schedule", "gpipe, 1f1b, interleaved, zb-h1, zb-h2 or zb-v";
    grad_bucket_size => "grad-bucket-size", "parallel.grad_bucket_size", "Gradient bucket size in elements for the overlapped data-parallel reduction";
}

/// String-valued keys are quoted so that e.g. `--save 123` stays a path, not a number.
fn quote(key: &str, v: &str) -> String {
    const STRINGS: &[&str] = &[
        "checkpoint.save",
        "checkpoint.load",
        "data.split",
        "data.data_path",
        "data.train_data_path",
        "data.valid_data_path",
        "data.test_data_path",
        "data.tokenizer",
        "logging.tensorboard_dir",
        "logging.log_format",
        "train.lr_decay_style",
        "train.lr_wsd_decay_style",
        "parallel.pipeline_schedule",
    ];
    if STRINGS.contains(&key) { toml::Value::String(v.to_string()).to_string() } else { v.to_string() }
}

impl ConfigArgs {
    /// Loads, overrides and validates; every failure is a usage error (exit code 2).
    pub fn resolve(&self, extra: &[String]) -> anyhow::Result<Config> {
        let mut sets = self.sets.clone();
        sets.extend(self.megatron.to_sets());
        sets.extend_from_slice(extra);
        // A first pass unchecked: the ported flags' values may be what makes the config valid.
        let read = |sets: &[String]| {
            match &self.config {
                Some(path) => Config::read_with(path, sets),
                None => Config::parse_toml_str(
                    DEFAULT_CONFIG,
                    "config/default.toml (embedded in the binary)",
                    sets,
                ),
            }
            .map_err(|e| anyhow::Error::from(UsageError(e.to_string())))
        };
        let load = |sets: &[String]| {
            let cfg = read(sets)?;
            cfg.validate().map_err(|e| anyhow::Error::from(UsageError(e.to_string())))?;
            Ok::<_, anyhow::Error>(cfg)
        };
        let cfg = read(&sets)?;
        let explicit =
            |key: &str| sets.iter().any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key));
        let more = self.ported.apply(&cfg, &explicit).map_err(UsageError)?;
        let split_set = explicit("data.split");
        for note in self.ported.notes(&cfg) {
            eprintln!("troupe: note: {note}");
        }
        sets.extend(more);
        let cfg = load(&sets)?;
        if let Some(note) = self.split_note(&cfg, split_set) {
            eprintln!("troupe: note: {note}");
        }
        Ok(cfg)
    }

    /// Megatron warns when `--data-path` comes without `--split` and falls back to `969, 30, 1`;
    /// troupe's default is `949,50,1`. Said when neither a flag, a `--set` nor the config file
    /// names the split, since the split decides which samples each split holds.
    fn split_note(&self, cfg: &Config, split_set: bool) -> Option<String> {
        if cfg.data.data_path.is_empty() || split_set {
            return None;
        }
        let in_file = self.config.as_ref().is_some_and(|path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.parse::<toml::Table>().ok())
                .is_some_and(|t| t.get("data").and_then(|d| d.get("split")).is_some())
        });
        (!in_file).then(|| {
            format!(
                "no --split given: the documents split {} (troupe's default; Megatron falls back to \
                 969,30,1 there), so give --split for the samples a Megatron run of the same data reads",
                cfg.data.split
            )
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Write one JSON record per step (step, loss, lr, grad_norm, tokens_per_s, elapsed) here.
    #[arg(long)]
    pub log_json: Option<PathBuf>,
    /// With --load: start from scratch when no checkpoint is there instead of failing.
    #[arg(long)]
    pub allow_fresh_start: bool,
    /// With --load: take the checkpoint's weights only and start at step 0 (fresh optimizer state,
    /// data from the start, the learning-rate schedule from its warm-up), as Megatron's --finetune.
    #[arg(long)]
    pub finetune: bool,
    /// With --load: the model's sizes (and its tokenizer, unless --tokenizer is given) from the
    /// checkpoint, over the config and the flags, as Megatron's --use-checkpoint-args.
    #[arg(long)]
    pub use_checkpoint_args: bool,
    /// With --load: the learning-rate schedule (peak and minimum rate, decay style, warm-up and
    /// decay steps) and the weight decay from the checkpoint, over the config and the flags, as
    /// Megatron's --use-checkpoint-opt_param-scheduler.
    #[arg(long = "use-checkpoint-opt_param-scheduler", alias = "use-checkpoint-opt-param-scheduler")]
    pub use_checkpoint_scheduler: bool,
    /// Evaluate the model of --load on the validation and test splits (--eval-iters global batches
    /// each) and exit, without training or saving, as Megatron's --skip-train. One process, on
    /// the CPU or one GPU (--device).
    #[arg(long)]
    pub skip_train: bool,
    /// CPU threads (0: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Never draw a progress bar (plain log lines instead).
    #[arg(long)]
    pub no_progress: bool,
    /// Start even when the host memory the run is estimated to hold exceeds what the machine has
    /// available (CPU compute only; the estimate is printed at the start).
    #[arg(long)]
    pub skip_memory_check: bool,
    /// `cpu`, `cuda` (the GPU of this process's LOCAL_RANK; one process per GPU under a
    /// launcher), or `emu` (the CUDA kernels in their CPU emulator: very slow, for testing the
    /// GPU path without a GPU). One GPU and plain data parallelism run the GPU training loop;
    /// pipeline parallelism, the distributed optimizer, traces and faults run the actor runtime
    /// with each chunk's compute on the GPU.
    #[arg(long, default_value = "cpu")]
    pub device: troupe::device::Device,
    /// Storage type on the GPU: bf16 (fp32 master weights, moments and statistics) or fp32.
    #[arg(long, default_value = "bf16")]
    pub dtype: GpuDtype,
    #[command(flatten)]
    pub runtime: super::train_parallel::RuntimeArgs,
}

/// GPU storage type (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuDtype {
    Bf16,
    Fp32,
}

impl From<GpuDtype> for troupe::gpu::DType {
    fn from(d: GpuDtype) -> Self {
        match d {
            GpuDtype::Bf16 => troupe::gpu::DType::Bf16,
            GpuDtype::Fp32 => troupe::gpu::DType::F32,
        }
    }
}

/// Model FLOPs of one optimizer step (forward and backward of the global batch, Megatron's
/// formula), e.g. `1.25 TFLOP`: what a step costs before the first one reports its speed.
pub(super) fn step_flops(cfg: &Config) -> String {
    let f = cfg.model.flops_per_token() * (cfg.train.global_batch_size * cfg.model.seq_length) as f64;
    let (v, unit) = [(1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")]
        .into_iter()
        .find(|(scale, _)| f >= *scale)
        .map_or((f / 1e6, "MFLOP"), |(scale, unit)| (f / scale, unit));
    format!("{v:.3} {unit}")
}

/// A FLOP rate with a readable unit: `152.3 GFLOP/s`.
pub(super) fn flop_rate(f: f64) -> String {
    let (v, unit) = [(1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s")]
        .into_iter()
        .find(|(scale, _)| f >= *scale)
        .map_or((f / 1e6, "MFLOP/s"), |(scale, unit)| (f / scale, unit));
    format!("{v:.1} {unit}")
}

/// Prints how much host memory a CPU run will hold in this process, and what is available.
pub(super) fn announce_memory(est: &MemoryEstimate) {
    let room = troupe::memory::available().map_or(String::new(), |a| format!("; {} available", gib(a.bytes)));
    eprintln!("troupe: host memory: about {} in this process{room}", est.describe());
}

/// Refuses, as a usage error, a CPU run the machine cannot hold: `processes` processes of it on
/// this machine (launched ranks of one node; `mine` is this one's share) together needing
/// `together`, more than is available now. Without this check a model too large for the
/// machine failed in its first allocation, or was killed by the kernel's out-of-memory killer
/// during its first step.
pub(super) fn check_memory(
    mine: &MemoryEstimate,
    together: u64,
    processes: usize,
    skip: bool,
) -> anyhow::Result<()> {
    let Some(avail) = troupe::memory::available().filter(|a| together > a.bytes && !skip) else {
        return Ok(());
    };
    let who = if processes > 1 {
        format!("the {processes} ranks on this machine need about {} together", gib(together))
    } else {
        format!("this run needs about {}", mine.describe())
    };
    Err(UsageError(format!(
        "{who}: more host memory than the {} available ({}). Use a smaller model or \
         --micro-batch-size, spread the layers over more processes (--pipeline-model-parallel-size \
         under `troupe launch` on several machines), or pass --skip-memory-check to start anyway",
        gib(avail.bytes),
        avail.source
    ))
    .into())
}

/// The closing figure of a run: this process's peak resident memory, beside the estimate.
pub(super) fn peak_memory_note(estimate: Option<&MemoryEstimate>) -> String {
    match (troupe::memory::peak_rss(), estimate) {
        (Some(p), Some(e)) => format!("; peak host memory {} (estimated {})", gib(p), gib(e.total())),
        (Some(p), None) => format!("; peak host memory {}", gib(p)),
        (None, _) => String::new(),
    }
}

/// Refuses `--device cuda` on a machine without a usable driver or GPU, with the reason.
pub(super) fn check_device(device: troupe::device::Device) -> anyhow::Result<()> {
    if device != troupe::device::Device::Cuda {
        return Ok(());
    }
    troupe::device::probe_cuda().map_err(|e| UsageError(format!("--device cuda: {e}")))?;
    Ok(())
}

/// A GPU (or the emulator) for `--device`, or a usage error naming what is missing.
pub(super) enum OpenGpu {
    Cuda(Box<troupe::gpu::CudaGpu>),
    Emu(troupe::gpu::EmuGpu),
}

impl OpenGpu {
    /// The GPU of this process's local rank (as its launcher gives it: torchrun, MPI, Slurm).
    pub(super) fn open(device: troupe::device::Device, local_rank: usize) -> anyhow::Result<Option<Self>> {
        use troupe::device::Device;
        Ok(match device {
            Device::Cpu => None,
            Device::Cuda => Some(OpenGpu::Cuda(Box::new(
                troupe::gpu::CudaGpu::for_local_rank(local_rank)
                    .map_err(|e| UsageError(format!("--device cuda: {e}")))?,
            ))),
            Device::Emu => Some(OpenGpu::Emu(
                troupe::gpu::EmuGpu::new().map_err(|e| UsageError(format!("--device emu: {e}")))?,
            )),
        })
    }

    pub(super) fn describe(&self) -> String {
        use troupe::gpu::Gpu;
        match self {
            OpenGpu::Cuda(g) => g.describe(),
            OpenGpu::Emu(g) => g.describe(),
        }
    }
}

/// What every GPU rank of a run shares.
struct GpuRank<'a> {
    dtype: troupe::gpu::DType,
    cfg: &'a Config,
    be: &'a CpuBackend,
    data: &'a RunData<'a>,
    stop: &'a std::sync::atomic::AtomicBool,
}

impl GpuRank<'_> {
    fn run<G: troupe::gpu::Gpu>(
        &self,
        gpu: &G,
        trainer: &mut troupe::train::Trainer,
        state: &mut troupe::checkpoint::TrainState,
        dp: Option<&dyn troupe::gpu::dp::DeviceComm<G>>,
        on: &mut dyn FnMut(&Event),
    ) -> anyhow::Result<run::RunSummary> {
        let mut model = troupe::gpu::train::upload(gpu, self.cfg, trainer, self.dtype)
            .map_err(|e| UsageError(format!("putting the model on the GPU: {e}")))?;
        Ok(troupe::gpu::train::run(
            self.cfg, &mut model, self.be, trainer, state, self.data, self.stop, dp, on,
        )?)
    }
}

/// Whether a GPU run needs the actor runtime: pipeline parallelism, the distributed optimizer,
/// schedule traces, fault injection or `--actors` (the GPU training loop runs one GPU or plain
/// data parallelism, with the optimizer on the device and NCCL all-reduces).
fn gpu_needs_runtime(args: &TrainArgs, cfg: &Config) -> bool {
    let p = &cfg.parallel;
    p.pipeline_model_parallel_size > 1
        || p.virtual_pipeline_model_parallel_size > 1
        || p.use_distributed_optimizer
        || args.runtime.actors
        || args.runtime.trace.is_some()
        || args.runtime.replay_order.is_some()
        || !args.runtime.inject.is_empty()
        || !cfg.faults.is_empty()
}

/// The data-parallel size of a GPU run on the GPU training loop.
fn gpu_dp_size(cfg: &Config, launched: Option<&troupe::comm::env::LaunchEnv>) -> anyhow::Result<usize> {
    let p = &cfg.parallel;
    let dp = launched.map_or(p.data_parallel_size, |e| e.world_size);
    if launched.is_some() && p.data_parallel_size > 1 && p.data_parallel_size != dp {
        return Err(UsageError(format!(
            "--data-parallel-size {} but the launcher started {dp} ranks",
            p.data_parallel_size
        ))
        .into());
    }
    Ok(dp.max(1))
}

/// The device stages of an actor-runtime run on `--device cuda|emu` (`None` for the CPU): the
/// GPU of this process's local rank (or the emulator), kept for the life of the process. With
/// `nccl` (a join timeout; launched ranks, one per GPU) CUDA stages sum gradients over their
/// data-parallel and embedding groups with NCCL; without, CUDA ranks (sharing this process's
/// GPU) sum on the host; emulated stages have device groups that go through the host.
pub(super) fn stage_factory(
    device: troupe::device::Device,
    dtype: troupe::gpu::DType,
    local_rank: usize,
    nccl: Option<std::time::Duration>,
) -> anyhow::Result<Option<troupe::gpu::stage::StageFactory>> {
    use troupe::device::Device;
    use troupe::gpu::stage::StageFactory;
    Ok(match device {
        Device::Cpu => None,
        Device::Cuda => {
            let gpu = troupe::gpu::CudaGpu::for_local_rank(local_rank)
                .map_err(|e| UsageError(format!("--device cuda (local rank {local_rank}): {e}")))?;
            let gpu: &'static troupe::gpu::CudaGpu = Box::leak(Box::new(gpu));
            Some(match nccl {
                Some(timeout) => StageFactory::cuda_nccl(gpu, dtype, timeout),
                None => StageFactory::new(gpu, dtype),
            })
        }
        Device::Emu => {
            let gpu = troupe::gpu::EmuGpu::new().map_err(|e| UsageError(format!("--device emu: {e}")))?;
            let gpu: &'static troupe::gpu::EmuGpu = Box::leak(Box::new(gpu));
            // Device groups through the host: the emulator runs the GPU runtime's path.
            Some(StageFactory::new(gpu, dtype).with_host_groups(gpu))
        }
    })
}

/// Communicator settings of a GPU data-parallel run (`--comm-timeout` bounds every wait).
fn comm_options(args: &TrainArgs) -> anyhow::Result<troupe::comm::CommOptions> {
    let t = args.runtime.comm_timeout;
    if !(t.is_finite() && t > 0.0) {
        return Err(UsageError(format!("--comm-timeout {t}: must be a positive number of seconds")).into());
    }
    Ok(troupe::comm::CommOptions { timeout: std::time::Duration::from_secs_f64(t), ..Default::default() })
}

/// An NCCL data-parallel group over the launcher's ranks (one GPU per process), its unique id
/// shared through `store` (the joined world's connection). The TCP world stays alive beside it
/// because rank 0 may host the rendezvous store in it.
fn nccl_from_env(
    gpu: &troupe::gpu::CudaGpu,
    env: &troupe::comm::env::LaunchEnv,
    store: troupe::comm::store::StoreClient,
    timeout: std::time::Duration,
) -> anyhow::Result<troupe::gpu::nccl::NcclComm> {
    let mut store = store.with_prefix(&format!("troupe/attempt_{}/nccl", env.restart_count));
    let id = troupe::gpu::nccl::share_unique_id(&mut store, "dp", env.rank, timeout)?;
    Ok(troupe::gpu::nccl::NcclComm::init(gpu, id, env.rank, env.world_size, "dp", timeout)?)
}

/// Data parallelism in the kernel emulator with ranks as threads of this process (tests of the
/// GPU data-parallel path on machines without GPUs). Rank 0 reports; its trainer and state are
/// the caller's.
fn emu_dp_threads(
    gpu: &troupe::gpu::EmuGpu,
    dp: usize,
    opts: troupe::comm::CommOptions,
    rank: &GpuRank<'_>,
    trainer: &mut troupe::train::Trainer,
    state: &mut troupe::checkpoint::TrainState,
    on: &mut (dyn FnMut(&Event) + Send),
) -> anyhow::Result<run::RunSummary> {
    let comms = troupe::comm::inproc::world(dp, opts)?;
    let (dtype, cfg, be, train, stop) = (rank.dtype, rank.cfg, rank.be, rank.data.train, rank.stop);
    std::thread::scope(|scope| {
        let mut comms = comms.into_iter().map(troupe::gpu::dp::HostComm::new);
        let first = comms.next().ok_or_else(|| anyhow::anyhow!("no ranks"))?;
        let handles: Vec<_> = comms
            .map(|comm| {
                let start = state.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    let quiet = RunData { train, valid: None, test: None, sample: None };
                    let me = GpuRank { dtype, cfg, be, data: &quiet, stop };
                    let (mut t, _, _) = run::prepare(cfg)?;
                    let mut st = start;
                    me.run(gpu, &mut t, &mut st, Some(&comm), &mut |_| {})?;
                    Ok(())
                })
            })
            .collect();
        let summary = rank.run(gpu, trainer, state, Some(&first), on);
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a data-parallel rank panicked"))??;
        }
        summary
    })
}

/// `troupe config show` takes `troupe train`'s command line and prints the configuration that
/// run would resolve (flags that set no key, such as `--device`, are accepted and change nothing).
#[derive(Debug, clap::Args)]
pub struct ConfigShowArgs {
    #[command(flatten)]
    pub train: TrainArgs,
}

pub fn config_show(args: ConfigShowArgs) -> anyhow::Result<()> {
    let cfg = resolve_config(&args.train)?;
    print!("{}", cfg.to_toml());
    Ok(())
}

/// The configuration of a `troupe train` command line: the file or the default, the flags, the
/// keys the other options set, and with `--use-checkpoint-args` the checkpoint's model sizes
/// (said on stderr).
fn resolve_config(args: &TrainArgs) -> anyhow::Result<Config> {
    let mut extra = Vec::new();
    if args.allow_fresh_start {
        extra.push("checkpoint.allow_fresh_start=true".to_string());
    }
    if args.finetune {
        extra.push("checkpoint.finetune=true".to_string());
    }
    if let Some(t) = args.threads {
        extra.push(format!("train.threads={t}"));
    }
    if let Some(p) = &args.log_json {
        extra.push(format!("logging.log_json={}", toml::Value::String(p.display().to_string())));
    }
    extra.extend(args.runtime.sets());
    let mut cfg = args.cfg.resolve(&extra)?;
    // A job script that resumes itself names one directory as --load and --save (Megatron starts
    // afresh when it holds nothing yet): its first run starts from scratch, saying so. A --load
    // of its own that holds nothing stays an error (a mistyped path should not train from zero).
    let c = &cfg.checkpoint;
    if !c.allow_fresh_start
        && !c.finetune
        && !args.skip_train
        && !args.cfg.ported.exit_on_missing_checkpoint
        && !c.load.is_empty()
        && same_dir(&c.load, &c.save)
        && matches!(checkpoint::resolve(std::path::Path::new(&c.load)), Ok(None))
    {
        eprintln!(
            "troupe: note: --load {} holds no checkpoint yet, and it is also --save: starting from scratch",
            c.load
        );
        extra.push("checkpoint.allow_fresh_start=true".to_string());
        cfg = args.cfg.resolve(&extra)?;
    }
    if args.use_checkpoint_args {
        let (from, sets) = checkpoint_args(&cfg)?;
        if !sets.is_empty() {
            extra.extend(sets);
            cfg = args.cfg.resolve(&extra)?;
            let m = &cfg.model;
            eprintln!(
                "troupe: the model's sizes from {}: {}, hidden {}, {}, vocabulary {}, {} positions{}",
                from.display(),
                super::count(m.num_layers as u64, "layer"),
                m.hidden_size,
                super::count(m.num_attention_heads as u64, "head"),
                m.vocab_size,
                m.seq_length,
                if cfg.data.tokenizer.is_empty() {
                    String::new()
                } else {
                    format!(", tokenizer {}", cfg.data.tokenizer)
                }
            );
        }
    }
    if args.use_checkpoint_scheduler
        && let Some((sets, line)) = checkpoint_scheduler(&cfg)?
    {
        extra.extend(sets);
        cfg = args.cfg.resolve(&extra)?;
        eprintln!("{line}");
    }
    Ok(cfg)
}

/// Whether two directory names are one directory: the same path once `.` parts and trailing
/// slashes are dropped, or (both existing) the same canonical path.
fn same_dir(a: &str, b: &str) -> bool {
    let (a, b) = (std::path::Path::new(a), std::path::Path::new(b));
    let plain = |p: &std::path::Path| -> std::path::PathBuf {
        p.components().filter(|c| *c != std::path::Component::CurDir).collect()
    };
    plain(a) == plain(b) || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// The checkpoint `--load` names and its step, when that step is already `train.train_iters`
/// or past it. A checkpoint that cannot be read is left to the run, which reports it.
fn finished_checkpoint(cfg: &Config) -> Option<(std::path::PathBuf, u64)> {
    if cfg.checkpoint.load.is_empty() || cfg.checkpoint.finetune {
        return None;
    }
    let dir = checkpoint::resolve(std::path::Path::new(&cfg.checkpoint.load)).ok()??;
    let step = checkpoint::read_state(&dir).ok()?.step;
    (step >= cfg.train.train_iters).then_some((dir, step))
}

/// Settings of a resume that differ from those of the run that saved the checkpoint, as a note:
/// Megatron refuses a changed learning-rate schedule unless told to override it; troupe takes
/// the command line's, and says what changed — and when the change reorders the data, that the
/// samples no longer continue where the saved run stopped. Layout, logging, checkpointing and
/// the training length are expected to change and are not listed.
fn resume_note(cfg: &Config) -> Option<String> {
    if cfg.checkpoint.load.is_empty() || cfg.checkpoint.finetune {
        return None;
    }
    let dir = checkpoint::resolve(std::path::Path::new(&cfg.checkpoint.load)).ok()??;
    let mut saved = checkpoint::read_state(&dir).ok()?.config;
    // A decay length left unset is the run's length: compare the lengths the schedules use, so
    // a longer run whose decay follows it shows as the changed schedule it is.
    let mut cfg = cfg.clone();
    let follows = [saved.train.lr_decay_iters.is_none(), cfg.train.lr_decay_iters.is_none()];
    for c in [&mut cfg, &mut saved] {
        c.train.lr_decay_iters = Some(c.train.lr_decay_iters.unwrap_or(c.train.train_iters));
    }
    const EXPECTED: &[&str] = &["checkpoint.", "logging.", "parallel.", "faults", "fault_seed"];
    const PER_RUN: &[&str] = &[
        "train.threads",
        "train.train_iters",
        "train.exit_interval",
        "train.exit_duration_in_mins",
        "data.cache_dir",
    ];
    let changed: Vec<(String, String, String)> = cfg
        .differences(&saved)
        .into_iter()
        .filter(|(k, _, _)| !EXPECTED.iter().any(|p| k.starts_with(p)) && !PER_RUN.contains(&k.as_str()))
        .collect();
    if changed.is_empty() {
        return None;
    }
    let list: Vec<String> = changed
        .iter()
        .map(|(k, old, new)| {
            let [old_follows, new_follows] =
                follows.map(|f| if f && k == "train.lr_decay_iters" { " (= train_iters)" } else { "" });
            format!("{k} {old}{old_follows} → {new}{new_follows}")
        })
        .collect();
    // What the data order depends on: the shuffle's seed, the documents, and how they are split
    // into samples.
    const ORDER: &[&str] =
        &["train.seed", "data.data_path", "data.train_data_path", "data.split", "model.seq_length"];
    let reordered: Vec<&str> =
        changed.iter().map(|(k, _, _)| k.as_str()).filter(|k| ORDER.contains(k)).collect();
    let order = match reordered.as_slice() {
        [] => String::new(),
        keys => format!(
            "; with {} changed the samples are drawn in another order, so the run does not continue the \
             saved run's data where it stopped",
            keys.join(", ")
        ),
    };
    Some(format!(
        "resuming {} with settings that differ from the run that saved it: {}{order}",
        dir.display(),
        list.join(", ")
    ))
}

/// `--use-checkpoint-args`: `key=value` overrides that give the model the sizes of the checkpoint
/// `--load` names (and its tokenizer when the command names none), and where they come from.
/// Nothing when there is no checkpoint yet and `--allow-fresh-start` allows that.
fn checkpoint_args(cfg: &Config) -> anyhow::Result<(std::path::PathBuf, Vec<String>)> {
    let Some((dir, saved)) = saved_config(cfg, "--use-checkpoint-args")? else {
        return Ok((cfg.checkpoint.load.clone().into(), Vec::new()));
    };
    let m = &saved.model;
    let mut sets = vec![
        format!("model.vocab_size={}", m.vocab_size),
        format!("model.make_vocab_size_divisible_by={}", m.make_vocab_size_divisible_by),
        format!("model.seq_length={}", m.seq_length),
        format!("model.num_layers={}", m.num_layers),
        format!("model.hidden_size={}", m.hidden_size),
        format!("model.num_attention_heads={}", m.num_attention_heads),
    ];
    if cfg.data.tokenizer.is_empty() && !saved.data.tokenizer.is_empty() {
        sets.push(format!("data.tokenizer={}", toml::Value::String(saved.data.tokenizer.clone())));
        sets.push(format!("data.merge_file={}", toml::Value::String(saved.data.merge_file.clone())));
    }
    Ok((dir, sets))
}

/// The checkpoint `--load` names and the config it was saved with, for `flag`; `None` when there
/// is no checkpoint yet and `--allow-fresh-start` allows that.
fn saved_config(cfg: &Config, flag: &str) -> anyhow::Result<Option<(std::path::PathBuf, Config)>> {
    let load = &cfg.checkpoint.load;
    if load.is_empty() {
        return Err(UsageError(format!("{flag} reads the checkpoint --load names; give --load")).into());
    }
    let dir = match checkpoint::resolve(std::path::Path::new(load)) {
        Ok(Some(dir)) => dir,
        Ok(None) if cfg.checkpoint.allow_fresh_start => return Ok(None),
        Ok(None) => {
            return Err(UsageError(format!(
                "--load {load}: no checkpoint there to take {flag}'s values from"
            ))
            .into());
        }
        Err(e) => return Err(UsageError(format!("--load {load}: {e}")).into()),
    };
    let saved = checkpoint::read_state(&dir).map_err(|e| UsageError(format!("--load {load}: {e}")))?.config;
    Ok(Some((dir, saved)))
}

/// `--use-checkpoint-opt_param-scheduler`: `key=value` overrides that give the run the saved
/// run's learning-rate schedule and weight decay (a decay length left to `train_iters` there
/// becomes that run's `train_iters`), and a line saying what they are.
fn checkpoint_scheduler(cfg: &Config) -> anyhow::Result<Option<(Vec<String>, String)>> {
    let Some((dir, saved)) = saved_config(cfg, "--use-checkpoint-opt_param-scheduler")? else {
        return Ok(None);
    };
    let flat = saved.flat().map_err(|e| UsageError(format!("{}: its config: {e}", dir.display())))?;
    let t = &saved.train;
    let decay = t.lr_decay_iters.unwrap_or(t.train_iters);
    let mut sets: Vec<String> = [
        "train.lr",
        "train.min_lr",
        "train.lr_decay_style",
        "train.lr_warmup_iters",
        "train.lr_wsd_decay_iters",
        "train.lr_wsd_decay_style",
        "train.weight_decay",
    ]
    .iter()
    .filter_map(|k| flat.get(*k).map(|v| format!("{k}={v}")))
    .collect();
    sets.push(format!("train.lr_decay_iters={decay}"));
    let line = format!(
        "troupe: the learning-rate schedule from {}: {} from {} to {}, {} warm-up steps, decay over {decay} steps, weight decay {}",
        dir.display(),
        flat.get("train.lr_decay_style").map_or("", |s| s.trim_matches('"')),
        flat.get("train.lr").map_or("?", String::as_str),
        flat.get("train.min_lr").map_or("?", String::as_str),
        t.lr_warmup_iters,
        flat.get("train.weight_decay").map_or("?", String::as_str),
    );
    Ok(Some((sets, line)))
}

/// `--finetune` needs `--load`; says what it loads, and how to resume the fine-tuning itself once
/// its `--save` holds a checkpoint (running the same command again starts over from step 0).
fn announce_finetune(cfg: &Config, reporting: bool) -> anyhow::Result<()> {
    let (load, save) = (&cfg.checkpoint.load, &cfg.checkpoint.save);
    if load.is_empty() {
        return Err(UsageError(
            "--finetune takes the weights of the checkpoint --load names; give --load".into(),
        )
        .into());
    }
    if !reporting {
        return Ok(());
    }
    eprintln!(
        "troupe: fine-tuning from the weights of {load}: step 0, fresh optimizer state, data from its start"
    );
    if !save.is_empty()
        && std::fs::canonicalize(save).ok() != std::fs::canonicalize(load).ok()
        && let Ok(Some(existing)) = checkpoint::resolve(std::path::Path::new(save))
    {
        eprintln!(
            "troupe: note: --save {save} already holds {}; to go on with that fine-tuning instead of \
             starting it over, run with --load {save} and without --finetune",
            existing.display()
        );
    }
    Ok(())
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    check_device(args.device)?;
    let cfg = resolve_config(&args)?;
    let launched = troupe::comm::env::LaunchEnv::detect()
        .map_err(|e| UsageError(format!("reading the launcher environment: {e}")))?
        .filter(|e| e.world_size > 1);
    if args.skip_train {
        return super::eval_only::evaluate_only(&args, &cfg, launched.as_ref());
    }
    if let Some(done) = finished_checkpoint(&cfg) {
        // A resumed run that has already reached its last step (a finished job requeued, or
        // --train-iters left as it was): say so and stop, without building the model or
        // rewriting that checkpoint.
        eprintln!(
            "troupe: {} is at step {}, and --train-iters is {}: nothing to train (raise --train-iters to go on from it)",
            done.0.display(),
            done.1,
            cfg.train.train_iters
        );
        return Ok(());
    }
    if cfg.checkpoint.finetune {
        announce_finetune(&cfg, launched.as_ref().is_none_or(|e| e.rank == 0))?;
    }
    if let Some(note) = resume_note(&cfg).filter(|_| launched.as_ref().is_none_or(|e| e.rank == 0)) {
        eprintln!("troupe: note: {note}");
    }
    let unwritable = |e: &dyn std::fmt::Display| {
        UsageError(format!(
            "--save {}: cannot write there ({e}); choose a writable directory",
            cfg.checkpoint.save
        ))
    };
    // The process that writes the run's checkpoints (world rank 0) holds the save directory for
    // as long as it runs, so a second run pointed at it stops here. Claimed first, so that the
    // claim knows whether it created the directory (and removes it again if the run writes
    // nothing there).
    let _save_lock = match (&launched, cfg.checkpoint.save.as_str()) {
        (_, "") => None,
        (Some(env), _) if env.rank != 0 => None,
        (_, save) => checkpoint::lock_save_dir(std::path::Path::new(save), &checkpoint::this_process())
            .map_err(|e| match e {
                checkpoint::CheckpointError::Busy { .. } => UsageError(format!(
                    "--save {save}: {e}. Wait for it to finish or stop it, or choose another --save"
                )),
                other => unwritable(&other),
            })?,
    };
    if !cfg.checkpoint.save.is_empty() {
        checkpoint::check_writable(std::path::Path::new(&cfg.checkpoint.save)).map_err(|e| unwritable(&e))?;
    }
    if !cfg.checkpoint.save.is_empty()
        && cfg.checkpoint.load.is_empty()
        && let Ok(Some(existing)) = checkpoint::resolve(std::path::Path::new(&cfg.checkpoint.save))
    {
        eprintln!(
            "troupe: note: {} already holds {}; this fresh run replaces checkpoints of the same steps \
             (pass --load {} to resume it instead)",
            cfg.checkpoint.save,
            existing.display(),
            cfg.checkpoint.save
        );
    }
    let parallel = super::train_parallel::wanted(&cfg, &args.runtime, launched.as_ref());
    let on_gpu = args.device != troupe::device::Device::Cpu;
    if parallel && (!on_gpu || gpu_needs_runtime(&args, &cfg)) {
        return super::train_parallel::train(&args, cfg, launched);
    }
    let gpu_dp = if parallel { Some(gpu_dp_size(&cfg, launched.as_ref())?) } else { None };
    let data = corpus::open(&cfg).map_err(|e| UsageError(e.to_string()))?;
    // Launched data-parallel ranks join and agree on their settings before the device is set up
    // (kernel builds, NCCL), as on the actor runtime.
    let mut joined = match (&launched, gpu_dp) {
        (Some(env), Some(dp)) => {
            // The data-parallel size as the actor runtime records it (the world's), so a rank
            // started on the other loop differs in the training loop alone.
            let mut seen = cfg.clone();
            seen.parallel.data_parallel_size = dp;
            let mine = super::train_parallel::rank_settings(
                &seen,
                &args,
                data.train.as_ref(),
                [data.valid.as_deref(), data.test.as_deref()],
                "GPU data-parallel loop",
            );
            Some(super::train_parallel::join(env, comm_options(&args)?, &mine)?)
        }
        _ => None,
    };
    // The host holds the model only when it computes there (a GPU run's arenas are on the device).
    let estimate = (!on_gpu).then(|| MemoryEstimate::single_rank(&cfg));
    if let Some(est) = &estimate {
        check_memory(est, est.total(), 1, args.skip_memory_check)?;
    }
    let gpu = OpenGpu::open(args.device, launched.as_ref().map_or(0, |e| e.local_rank))?;
    let (mut trainer, mut state, resumed) = run::prepare(&cfg).map_err(|e| match e {
        RunError::Checkpoint(_) | RunError::NothingToLoad { .. } => {
            anyhow::Error::from(UsageError(e.to_string()))
        }
        other => other.into(),
    })?;
    let be = CpuBackend::new(cfg.train.threads);
    let stop = run::stop_flag().context("installing SIGINT/SIGTERM handlers")?;
    let began = std::time::Instant::now();
    // Under a launcher (GPU data parallelism) every rank runs this loop; rank 0 reports.
    let reporting = launched.as_ref().is_none_or(|e| e.rank == 0);
    let mut logs = RunLogs::open(&cfg, reporting)?;
    let on_what = match &gpu {
        None => format!("{} threads", be.threads()),
        Some(g) => {
            format!("{} in {}", g.describe(), if args.dtype == GpuDtype::Bf16 { "bf16" } else { "fp32" })
        }
    };
    eprintln!(
        "troupe: training a {}-layer GPT ({:.2} M parameters) on {} with {on_what} for {} of {} each",
        cfg.model.num_layers,
        cfg.model.num_params() as f64 / 1e6,
        data.description,
        super::count(cfg.train.train_iters, "step"),
        step_flops(&cfg)
    );
    if let Some(est) = estimate.as_ref().filter(|_| reporting) {
        announce_memory(est);
    }
    if let Some(from) = resumed.as_ref().filter(|_| !cfg.checkpoint.finetune) {
        eprintln!(
            "troupe: resumed from {from} at step {} ({} samples consumed)",
            state.step, state.consumed_samples
        );
    }
    if let Some(note) = &data.valid_note {
        eprintln!("troupe: warning: no evaluation will run: {note}");
    }
    if let Some(note) = data.tokenizer_note.as_ref().filter(|_| reporting) {
        eprintln!("troupe: warning: {note}");
    }
    let tokenizer = &data.tokenizer;
    let sample_tokens = cfg.logging.sample_tokens;
    let seed = cfg.train.seed;
    let sampler = move |model: &troupe::Gpt, be: &dyn Backend| -> String {
        sample_text(model, be, tokenizer, "\n", sample_tokens, seed).unwrap_or_else(|e| format!("<{e}>"))
    };
    let run_data = RunData {
        train: data.train.as_ref(),
        valid: data.valid.as_deref(),
        test: data.test.as_deref(),
        sample: (sample_tokens > 0).then_some(&sampler as run::SampleFn<'_>),
    };
    let bar = progress_bar(&cfg, state.step, args.no_progress);
    let mut on = |e: &Event| {
        if reporting {
            report(e, &bar, &cfg, &mut logs)
        }
    };
    let dtype = args.dtype.into();
    let rank = GpuRank { dtype, cfg: &cfg, be: &be, data: &run_data, stop: &stop };
    let summary = match (&gpu, gpu_dp) {
        (None, _) => run::run(&cfg, &be, &mut trainer, &mut state, &run_data, &stop, &mut on)?,
        (Some(OpenGpu::Cuda(g)), None) => rank.run(g.as_ref(), &mut trainer, &mut state, None, &mut on)?,
        (Some(OpenGpu::Emu(g)), None) => rank.run(g, &mut trainer, &mut state, None, &mut on)?,
        (Some(OpenGpu::Cuda(g)), Some(_)) => {
            let env = launched.as_ref().ok_or_else(|| {
                UsageError(
                    "--device cuda with data parallelism needs one process per GPU: \
                            troupe launch --nproc-per-node N -- troupe train --device cuda …"
                        .into(),
                )
            })?;
            let (_world, store) =
                joined.take().ok_or_else(|| anyhow::anyhow!("the launched world was not joined"))?;
            let comm = nccl_from_env(g.as_ref(), env, store, comm_options(&args)?.timeout)?;
            rank.run(g.as_ref(), &mut trainer, &mut state, Some(&comm), &mut on)?
        }
        (Some(OpenGpu::Emu(g)), Some(dp)) => match &launched {
            Some(_) => {
                let (world, _store) =
                    joined.take().ok_or_else(|| anyhow::anyhow!("the launched world was not joined"))?;
                let comm = troupe::gpu::dp::HostComm::new(world);
                rank.run(g, &mut trainer, &mut state, Some(&comm), &mut on)?
            }
            None => emu_dp_threads(g, dp, comm_options(&args)?, &rank, &mut trainer, &mut state, &mut on)?,
        },
    };
    bar.finish_and_clear();
    let why = (summary.interrupted && !stop.load(std::sync::atomic::Ordering::SeqCst))
        .then(|| {
            troupe::train::run::exit_due(
                &cfg.train,
                summary.steps,
                run::over_time(&cfg.train, began.elapsed()),
            )
        })
        .flatten();
    if let Some(why) = why {
        let resume = match cfg.checkpoint.save.as_str() {
            "" => "no --save directory was given, nothing was saved".to_string(),
            s => format!("resume with --load {s}"),
        };
        eprintln!("troupe: stopped at step {} ({why}); {resume}", summary.steps);
    } else if summary.interrupted && cfg.checkpoint.save.is_empty() {
        eprintln!(
            "troupe: interrupted at step {}; no --save directory was given, nothing was saved",
            summary.steps
        );
    } else if summary.interrupted {
        eprintln!(
            "troupe: interrupted at step {}; resume with --load {}",
            summary.steps, cfg.checkpoint.save
        );
    } else {
        eprintln!(
            "troupe: done: {}, final loss {:.4}{}",
            super::count(summary.steps, "step"),
            summary.final_loss,
            peak_memory_note(estimate.as_ref())
        );
    }
    Ok(())
}

pub(super) fn progress_bar(cfg: &Config, step: u64, no_progress: bool) -> ProgressBar {
    if no_progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(cfg.train.train_iters);
    bar.set_position(step);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

/// Where a run's records go besides the terminal: the `--log-json` file and the TensorBoard event
/// file (`--tensorboard-dir`), both opened by the reporting rank only.
#[derive(Default)]
pub(super) struct RunLogs {
    json: Option<std::fs::File>,
    tensorboard: Option<troupe::tensorboard::EventWriter>,
    /// The steps since the previous log line: their summed loss, their count and their seconds.
    since_line: Interval,
}

impl RunLogs {
    /// Opens the logs `cfg` names, if `reporting` (else none). The TensorBoard file is a new one
    /// in its directory (a resumed run's sits beside the first run's).
    pub(super) fn open(cfg: &Config, reporting: bool) -> Result<Self, UsageError> {
        let l = &cfg.logging;
        if !reporting {
            return Ok(Self::default());
        }
        let json = match l.log_json.as_str() {
            "" => None,
            p => Some(std::fs::File::create(p).map_err(|e| UsageError(format!("--log-json {p}: {e}")))?),
        };
        let tensorboard = match l.tensorboard_dir.as_str() {
            "" => None,
            d => Some(
                troupe::tensorboard::EventWriter::create(std::path::Path::new(d))
                    .map_err(|e| UsageError(format!("--tensorboard-dir {d}: {e}")))?,
            ),
        };
        Ok(Self { json, tensorboard, since_line: Interval::default() })
    }

    /// Writes `paired` and `alone` at `step`, and `paired` again at `samples` under `… vs samples`
    /// tags (the ones Megatron pairs so). A write that fails (a full disk) is said once and ends
    /// the TensorBoard log; training goes on.
    fn scalars(&mut self, step: u64, samples: u64, paired: &[(&str, f32)], alone: &[(&str, f32)]) {
        let Some(w) = &mut self.tensorboard else { return };
        let vs: Vec<String> = paired.iter().map(|(tag, _)| format!("{tag} vs samples")).collect();
        let by_samples: Vec<(&str, f32)> =
            vs.iter().zip(paired).map(|(t, (_, v))| (t.as_str(), *v)).collect();
        let by_step = [paired, alone].concat();
        let wrote = w.scalars(step as i64, &by_step).and_then(|()| w.scalars(samples as i64, &by_samples));
        if let Err(e) = wrote {
            eprintln!("troupe: warning: {e}; TensorBoard gets nothing more from this run");
            self.tensorboard = None;
        }
    }
}

/// The steps since the previous log line.
#[derive(Default)]
struct Interval {
    /// Summed loss of the steps taken.
    loss_sum: f64,
    /// Steps taken.
    steps: u64,
    /// Their seconds.
    secs: f64,
    /// Steps skipped for a non-finite loss.
    skipped: u64,
}

/// `v` as Python's `{:.6E}` writes it (`5.212500E+00`), the form of Megatron's log lines.
fn sci(v: f64) -> String {
    let s = format!("{v:.6E}");
    match s.split_once('E') {
        Some((m, e)) => {
            let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
            format!("{m}E{sign}{digits:0>2}")
        }
        None => s, // inf, NaN
    }
}

/// The local date and time as Megatron's lines give it (`2026-12-02 11:50:00`).
fn local_time() -> String {
    // SAFETY: `time` and `localtime_r` write only into the locals passed to them.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return String::from("?");
        }
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        )
    }
}

pub(super) fn report(e: &Event, bar: &ProgressBar, cfg: &Config, logs: &mut RunLogs) {
    let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    let log_interval = cfg.logging.log_interval;
    match e {
        Event::Step { step, loss, lr, grad_norm, tokens_per_s, elapsed_s } => {
            // Model FLOP/s of the whole run (Megatron's formula, as `troupe bench` counts them).
            let flops = cfg.model.flops_per_token() * tokens_per_s;
            let rate = flop_rate(flops);
            bar.set_position(*step);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s {rate}"));
            // A log line gives the mean loss and the throughput of the steps since the previous
            // line, as Megatron's do (a single step's loss is noisy); the learning rate and the
            // gradient norm are this step's. The bar and the records give each step's own.
            let gbs = cfg.train.global_batch_size;
            let tokens_per_step = (gbs * cfg.model.seq_length) as f64;
            // Ranks the model FLOP/s are shared by (Megatron's throughput is per GPU).
            let p = &cfg.parallel;
            let ranks = (p.pipeline_model_parallel_size * p.data_parallel_size).max(1) as f64;
            let at = &mut logs.since_line;
            at.loss_sum += f64::from(*loss);
            at.steps += 1;
            at.secs += tokens_per_step / tokens_per_s.max(f64::MIN_POSITIVE);
            if step % log_interval == 0 || *step == 1 {
                let at = std::mem::take(&mut logs.since_line);
                let mean = at.loss_sum / at.steps as f64;
                let tps = at.steps as f64 * tokens_per_step / at.secs.max(f64::MIN_POSITIVE);
                let flops = cfg.model.flops_per_token() * tps;
                if bar.is_hidden() && cfg.logging.log_format == LogFormat::Megatron {
                    // Megatron's training_log line, field for field (the throughput always; the
                    // loss scale of a bf16 run, 1.0; troupe skips only non-finite steps, so the
                    // two counts are one).
                    eprintln!(
                        " [{}] iteration {step:8}/{:8} | consumed samples: {:12} | elapsed time per iteration (ms): {:.1} | \
                         throughput per GPU (TFLOP/s/GPU): {:.1} | learning rate: {} | global batch size: {gbs:5} | \
                         lm loss: {} | loss scale: 1.0 | grad norm: {grad_norm:.3} | number of skipped iterations: {:3} | \
                         number of nan iterations: {:3} |",
                        local_time(),
                        cfg.train.train_iters,
                        step * gbs as u64,
                        at.secs / at.steps as f64 * 1e3,
                        flops / 1e12 / ranks,
                        sci(f64::from(*lr)),
                        sci(mean),
                        at.skipped,
                        at.skipped,
                    );
                } else if bar.is_hidden() {
                    let rate = flop_rate(flops);
                    eprintln!(
                        "step {step:>6} | loss {mean:.4} | lr {lr:.3e} | grad norm {grad_norm:.3} | {tps:.0} tokens/s | {rate}"
                    );
                }
            }
            if let Some(f) = &mut logs.json {
                let rec = serde_json::json!({
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s, "model_flops_per_s": flops, "elapsed": elapsed_s,
                });
                let _ = writeln!(f, "{rec}");
            }
            if step.is_multiple_of(cfg.logging.tensorboard_log_interval) {
                // Megatron's tags; `iteration-time` and `throughput` (model TFLOP/s per rank)
                // are the ones its --log-timers-to-tensorboard and --log-throughput add.
                logs.scalars(
                    *step,
                    step * gbs as u64,
                    &[
                        ("lm loss", *loss),
                        ("learning-rate", *lr),
                        ("batch-size", gbs as f32),
                        ("grad-norm", *grad_norm as f32),
                    ],
                    &[
                        ("iteration-time", (tokens_per_step / tokens_per_s) as f32),
                        ("throughput", (flops / 1e12 / ranks) as f32),
                        ("tokens-per-second", *tokens_per_s as f32),
                    ],
                );
            }
        }
        Event::Eval { step, split, loss, perplexity, sample } => {
            if cfg.logging.log_format == LogFormat::Megatron {
                // Megatron's evaluate_and_print_results block.
                let at_end = *split == EvalSplit::Test
                    || (*step == cfg.train.train_iters
                        && !step.is_multiple_of(cfg.logging.eval_interval.max(1)));
                let prefix = match (split, at_end) {
                    (EvalSplit::Test, _) => "the end of training for test data".to_string(),
                    (_, true) => "the end of training for val data".to_string(),
                    _ => format!("iteration {step}"),
                };
                let line = format!(
                    " validation loss at {prefix} | lm loss value: {} | lm loss PPL: {} | ",
                    sci(f64::from(*loss)),
                    sci(f64::from(*perplexity))
                );
                let rule = "-".repeat(line.len() + 1);
                say(format!("{rule}\n{line}\n{rule}"));
            } else {
                say(format!("step {step:>6} | {} loss {loss:.4} | perplexity {perplexity:.2}", split.name()));
            }
            if let Some(text) = sample {
                say(format!("---- sample at step {step} ----\n{text}\n----"));
            }
            // `lm loss validation` and `lm loss test`, with the perplexity beside each.
            let tag = format!("lm loss {}", split.name());
            let ppl = format!("{tag} ppl");
            let samples = step * cfg.train.global_batch_size as u64;
            logs.scalars(*step, samples, &[(tag.as_str(), *loss), (ppl.as_str(), *perplexity)], &[]);
            if let Some(f) = &mut logs.json {
                let mut rec = serde_json::Map::new();
                rec.insert("step".into(), (*step).into());
                rec.insert(format!("{}_loss", split.key()), f64::from(*loss).into());
                rec.insert(format!("{}_perplexity", split.key()), f64::from(*perplexity).into());
                let _ = writeln!(f, "{}", serde_json::Value::Object(rec));
            }
        }
        Event::Skipped { step, microbatch, loss } => {
            logs.since_line.skipped += 1;
            say(format!(
                "step {step:>6} | skipped: loss {loss} in microbatch {microbatch} (nan_policy = skip)"
            ));
        }
        Event::Saved { step, path } => say(format!("step {step:>6} | saved checkpoint {path}")),
        Event::Interrupted { step } => say(format!("step {step:>6} | stop requested; saving and exiting")),
        Event::Stopped { step, why } => say(format!("step {step:>6} | {why}: stopping")),
        Event::Resumed { .. } => {}
    }
}

/// Generates `n` tokens after `prompt` (greedy-free: temperature 0.8, top-k 40) and decodes them.
pub fn sample_text(
    model: &troupe::Gpt,
    be: &dyn Backend,
    tok: &troupe::data::TextTokenizer,
    prompt: &str,
    n: usize,
    seed: u64,
) -> anyhow::Result<String> {
    let ids = tok.encode(prompt)?;
    let mut g = Generator::new(model)?;
    let mut rng = Rng::derived(seed, "eval-sample");
    let s = Sampling { temperature: 0.8, top_k: 40, top_p: 1.0 };
    let out = g.generate(be, &ids, n, s, &mut rng, &mut |_| {})?;
    Ok(tok.decode(&out)?)
}

#[cfg(test)]
mod tests {
    use super::sci;

    #[test]
    fn numbers_read_as_pythons_six_digit_exponent_form() {
        // Python: '{:.6E}'.format(x) for each x.
        let cases = [
            (5.2125, "5.212500E+00"),
            (1.8e-4, "1.800000E-04"),
            (2045.036, "2.045036E+03"),
            (1e100, "1.000000E+100"),
            (-3.5e-12, "-3.500000E-12"),
            (0.0, "0.000000E+00"),
        ];
        for (x, want) in cases {
            assert_eq!(sci(x), want, "{x}");
        }
        assert_eq!(sci(f64::INFINITY), "inf");
    }
}
