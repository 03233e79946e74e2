//! `troupe bench train`: times full training steps (forward, backward, clipping, AdamW) of a
//! config's model on random tokens and prints exactly one JSON line, with the same fields as
//! `bench/pytorch_gpt.py` so the two can be compared in one run (`bench/compare_pytorch.sh`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use troupe::config::Config;
use troupe::kernels::{Backend, CpuBackend, Profiled};
use troupe::memory::MemoryEstimate;
use troupe::models::Rng;
use troupe::train::{Microbatch, Trainer};

use super::UsageError;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// Model/training config (TOML), e.g. config/cpu-small.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Timed steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// CPU threads (default: the config's `train.threads`, 0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also time every kernel and print the breakdown (to stderr, and as "breakdown" in the JSON).
    #[arg(long)]
    pub profile: bool,
    /// Pipeline-parallel size: run through the actor runtime with ranks as threads.
    #[arg(long, default_value_t = 1)]
    pub pipeline_model_parallel_size: usize,
    /// Data-parallel size (actor runtime).
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: usize,
    /// Microbatches per step and data-parallel rank (default: the config's global batch ÷ its
    /// micro-batch size, so the global batch grows with --data-parallel-size).
    #[arg(long)]
    pub microbatches: Option<usize>,
    /// Pipeline schedule (actor runtime).
    #[arg(long, default_value = "1f1b")]
    pub pipeline_schedule: String,
    /// Chunks per rank (interleaved schedules).
    #[arg(long)]
    pub virtual_pipeline_size: Option<usize>,
    /// Use the actor runtime even for one rank, and also time the plain trainer in the same run.
    #[arg(long)]
    pub actors: bool,
    /// Shard optimizer state over the data-parallel ranks (ZeRO-1).
    #[arg(long)]
    pub use_distributed_optimizer: bool,
    /// Do not checksum pipeline messages (to measure what the always-on checks cost).
    #[arg(long)]
    pub no_checksums: bool,
    /// Pipeline messages of device chunks through the host (download, CPU communicator, upload)
    /// instead of between the devices.
    #[arg(long)]
    pub host_p2p: bool,
    /// `cpu`, `cuda` (GPU 0; with pipeline or data parallelism, ranks as threads share it) or
    /// `emu` (the CUDA kernels in their CPU emulator; slow).
    #[arg(long, default_value = "cpu")]
    pub device: troupe::device::Device,
    /// GPU storage type: bf16 (fp32 master weights) or fp32.
    #[arg(long, default_value = "bf16")]
    pub dtype: super::train::GpuDtype,
    /// Micro-batch size (default: the config's); with no --microbatches, one microbatch per step.
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Peak dense TFLOP/s of the GPU for MFU (H100 SXM bf16: 989).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// Start even when the host-memory estimate exceeds the memory available (CPU runs).
    #[arg(long)]
    pub skip_memory_check: bool,
}

/// `troupe bench faults`: the fault matrix (every fault kind × phase × seed on PP = 2 × DP = 2,
/// in-process), printed as a table with the summary figures.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultBenchArgs {
    /// Seeds (each picks the faulty rank and step).
    #[arg(long, num_args = 1.., default_values_t = [1u64, 2])]
    pub seeds: Vec<u64>,
    /// Communication timeout and watchdog bound, in seconds (scenarios whose fault must be
    /// survived, such as a straggler, wait 10 times as long).
    #[arg(long, default_value_t = 1.0)]
    pub timeout: f64,
    /// Scratch directory for checkpoints and flight recorders (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn faults(args: FaultBenchArgs) -> anyhow::Result<()> {
    use std::sync::Arc;
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(
            UsageError(format!("--timeout {}: must be a positive number of seconds", args.timeout)).into()
        );
    }
    let timeout = std::time::Duration::from_secs_f64(args.timeout);
    let mut rng = Rng::derived(4, "fault-matrix");
    let tokens: Vec<u32> = (0..4000).map(|_| (rng.next_u64() % 61) as u32).collect();
    let data = troupe::train::data::TokenWindows::new(tokens, 16, 5).context("matrix data")?;
    let data: Arc<dyn troupe::data::SampleSource> = Arc::new(data);
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("troupe-faults-{}", std::process::id())));
    let started = Instant::now();
    let ran = troupe::runtime::matrix::run(&data, &dir, &args.seeds, timeout, &mut |s| {
        eprintln!(
            "{:>10} {:<10} seed {}: {}",
            s.kind.name(),
            s.phase.name(),
            s.seed,
            if s.detected { "detected" } else { "survived" }
        );
    });
    // The scratch directory goes whether the matrix finished or not (its checkpoints and flight
    // recorders are for the matrix's own checks).
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (rows, sum) = ran?;
    println!("{}", troupe::runtime::matrix::table(&rows, &sum, timeout));
    println!("wall time {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn train(args: TrainBenchArgs) -> anyhow::Result<()> {
    super::train::check_device(args.device)?;
    let mut sets = vec![
        format!("parallel.pipeline_model_parallel_size={}", args.pipeline_model_parallel_size),
        format!("parallel.data_parallel_size={}", args.data_parallel_size),
        format!("parallel.pipeline_schedule={}", toml::Value::String(args.pipeline_schedule.clone())),
    ];
    if args.use_distributed_optimizer {
        sets.push("parallel.use_distributed_optimizer=true".into());
    }
    if let Some(v) = args.virtual_pipeline_size {
        sets.push(format!("parallel.virtual_pipeline_model_parallel_size={v}"));
    }
    if args.microbatches == Some(0) {
        return Err(UsageError("--microbatches must be at least 1".into()).into());
    }
    if !(args.peak_tflops.is_finite() && args.peak_tflops > 0.0) {
        return Err(
            UsageError(format!("--peak-tflops {}: must be a positive number", args.peak_tflops)).into()
        );
    }
    let base = Config::load(&args.config).map_err(|e| UsageError(e.to_string()))?;
    // Each data-parallel rank runs the config's microbatches (weak scaling) unless told otherwise.
    let per_rank = match (args.microbatches, args.micro_batch_size) {
        (Some(m), _) => Some(m),
        (None, None) if args.data_parallel_size > 1 => {
            Some((base.train.global_batch_size / base.train.micro_batch_size.max(1)).max(1))
        }
        _ => None,
    };
    if let Some(m) = per_rank {
        let gbs = m * args.micro_batch_size.unwrap_or(base.train.micro_batch_size) * args.data_parallel_size;
        sets.push(format!("train.global_batch_size={gbs}"));
    }
    if let Some(m) = args.micro_batch_size {
        sets.push(format!("train.micro_batch_size={m}"));
        if per_rank.is_none() {
            sets.push(format!("train.global_batch_size={}", m * args.data_parallel_size));
        }
    }
    let cfg = Config::load_with(&args.config, &sets).map_err(|e| UsageError(e.to_string()))?;
    if args.actors || cfg.parallel.is_distributed() {
        return runtime_bench(&args, &cfg);
    }
    if args.device != troupe::device::Device::Cpu {
        return gpu_bench(&args, &cfg).map(|out| println!("{out}"));
    }
    plain(&args, &cfg).map(|out| println!("{out}"))
}

/// The plain single-rank trainer; returns the JSON record.
fn plain(args: &TrainBenchArgs, cfg: &Config) -> anyhow::Result<serde_json::Value> {
    let cfg = cfg.clone();
    if args.steps == 0 {
        return Err(UsageError("--steps must be at least 1".into()).into());
    }
    let threads = args.threads.unwrap_or(cfg.train.threads);
    let cpu = CpuBackend::new(threads);
    let threads = cpu.threads();
    let profiled = Profiled::new(cpu);
    let estimate = MemoryEstimate::single_rank(&cfg);
    super::train::check_memory(&estimate, estimate.total(), 1, args.skip_memory_check)?;
    let mut trainer = Trainer::new(&cfg).context("building the model")?;
    let (b, t) = (cfg.train.micro_batch_size, cfg.model.seq_length);
    let accum = cfg.accumulation_steps();
    let data = random_batches(&cfg);
    let mbs: Vec<Microbatch<'_>> =
        data.iter().map(|(x, y)| Microbatch { tokens: x, targets: y, batch: b, seq: t }).collect();
    let be: &dyn Backend = &profiled;
    for _ in 0..args.warmup {
        trainer.step(be, &mbs, 1e-4)?;
    }
    profiled.reset();
    let mut times = Vec::with_capacity(args.steps);
    let mut loss = 0.0;
    for _ in 0..args.steps {
        let t0 = Instant::now();
        loss = trainer.step(be, &mbs, 1e-4)?.loss;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens_per_step = (accum * b * t) as f64;
    let tokens_per_s = tokens_per_step / median;
    let gflops = cfg.model.flops_per_token() * tokens_per_s / 1e9;
    let name = args.config.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let mut out = serde_json::json!({
        "impl": "troupe",
        "config": name,
        "threads": threads,
        "params": cfg.model.num_params(),
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms_median": round(median * 1e3, 2),
        "model_gflops_per_s": round(gflops, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "estimated_memory_mb": round(estimate.total() as f64 / 1048576.0, 1),
        "final_loss": loss,
    });
    if args.profile {
        let total: f64 = times.iter().sum();
        let rows: Vec<_> = profiled
            .report()
            .into_iter()
            .map(|(k, n, d)| {
                let share = d.as_secs_f64() / total;
                eprintln!("{k:>20}: {:8.2} ms/step  {:5.1}%  ({} calls)", d.as_secs_f64() * 1e3 / args.steps as f64, share * 100.0, n);
                serde_json::json!({"kernel": k, "ms_per_step": round(d.as_secs_f64() * 1e3 / args.steps as f64, 2), "share": round(share, 4)})
            })
            .collect();
        out["breakdown"] = serde_json::Value::Array(rows);
    }
    Ok(out)
}

/// One step's microbatches of random tokens (tokens, next-token targets), from the config's seed.
fn random_batches(cfg: &Config) -> Vec<(Vec<u32>, Vec<u32>)> {
    let (b, t, v) = (cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size);
    let mut rng = Rng::new(cfg.train.seed);
    (0..cfg.accumulation_steps())
        .map(|_| {
            let seq: Vec<u32> = (0..b * (t + 1)).map(|_| (rng.next_u64() % v as u64) as u32).collect();
            let (mut x, mut y) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
            for row in seq.chunks(t + 1) {
                x.extend_from_slice(&row[..t]);
                y.extend_from_slice(&row[1..]);
            }
            (x, y)
        })
        .collect()
}

/// Full training steps on a GPU (or the emulator): one JSON line with tokens/s and MFU.
fn gpu_bench(args: &TrainBenchArgs, cfg: &Config) -> anyhow::Result<serde_json::Value> {
    use super::train::OpenGpu;
    if args.steps == 0 {
        return Err(UsageError("--steps must be at least 1".into()).into());
    }
    let Some(gpu) = OpenGpu::open(args.device, 0)? else {
        return Err(UsageError("gpu_bench needs --device cuda or emu".into()).into());
    };
    let describe = gpu.describe();
    let dtype: troupe::gpu::DType = args.dtype.into();
    let (times, loss, profile) = match &gpu {
        OpenGpu::Cuda(g) => gpu_steps(g.as_ref(), args, cfg, dtype)?,
        OpenGpu::Emu(g) => gpu_steps(g, args, cfg, dtype)?,
    };
    let peak = match &gpu {
        OpenGpu::Cuda(g) => troupe::gpu::Gpu::memory(g.as_ref()).peak,
        OpenGpu::Emu(g) => troupe::gpu::Gpu::memory(g).peak,
    };
    // Products tuned (TROUPE_GEMM_AUTOTUNE) and how many left the heuristic's first choice, and
    // how the tensor-core attention loads its fragments (TROUPE_NO_LDMATRIX): the row says
    // which variant it measured.
    let kernels = troupe::gpu::cuda::KernelOptions::from_env();
    let (gemm_tuning, ldmatrix, cp_async) = match &gpu {
        OpenGpu::Cuda(g) => {
            let (tuned, other) = g.gemm_tuning();
            (
                serde_json::json!({"tuned": tuned, "other_than_first": other}),
                kernels.ldmatrix,
                kernels.cp_async,
            )
        }
        // The emulator always builds both (and delivers cp.async copies at either extreme).
        OpenGpu::Emu(_) => (serde_json::Value::Null, true, true),
    };
    let median = times[times.len() / 2];
    let (b, t) = (cfg.train.micro_batch_size, cfg.model.seq_length);
    let tokens_per_step = (cfg.accumulation_steps() * b * t) as f64;
    let tokens_per_s = tokens_per_step / median;
    let flops = cfg.model.flops_per_token() * tokens_per_s;
    let name = args.config.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let total_ms: f64 = profile.iter().map(|k| k.ms).sum();
    let breakdown: Vec<_> = profile
        .iter()
        .map(|k| {
            let per_step = k.ms / args.steps as f64;
            eprintln!(
                "{:>44}: {per_step:8.3} ms/step  {:5.1}%  ({} calls)",
                k.name,
                100.0 * k.ms / total_ms.max(1e-12),
                k.calls
            );
            serde_json::json!({"kernel": k.name, "ms_per_step": round(per_step, 3), "calls": k.calls})
        })
        .collect();
    Ok(serde_json::json!({
        "breakdown": if args.profile { serde_json::Value::Array(breakdown) } else { serde_json::Value::Null },
        "impl": "troupe",
        "config": name,
        "device": args.device.to_string(),
        "gpu": describe,
        "dtype": dtype.suffix(),
        "params": cfg.model.num_params(),
        "micro_batch_size": b,
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms_median": round(median * 1e3, 2),
        "model_gflops_per_s": round(flops / 1e9, 2),
        "mfu": round(flops / (args.peak_tflops * 1e12), 4),
        "peak_tflops": args.peak_tflops,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device_memory_peak_mb": round(peak as f64 / 1048576.0, 1),
        "gemm_tuning": gemm_tuning,
        "ldmatrix": ldmatrix,
        "cp_async": cp_async,
        "final_loss": loss,
    }))
}

/// Sorted step times (seconds), the last loss, and with `--profile` the device time per kernel
/// over the timed steps (CUDA events around every launch, which slow the steps slightly).
fn gpu_steps<G: troupe::gpu::Gpu>(
    gpu: &G,
    args: &TrainBenchArgs,
    cfg: &Config,
    dtype: troupe::gpu::DType,
) -> anyhow::Result<(Vec<f64>, f32, Vec<troupe::gpu::KernelTime>)> {
    gpu.reset_peak_memory();
    let mut model = troupe::gpu::model::GpuGpt::new(gpu, &cfg.model, cfg.train.seed, dtype)
        .map_err(|e| UsageError(format!("putting the model on the GPU: {e}")))?;
    let adam = cfg.train.adamw();
    let data = random_batches(cfg);
    let (b, t) = (cfg.train.micro_batch_size, cfg.model.seq_length);
    let scale = 1.0 / data.len() as f32;
    let step = |model: &mut troupe::gpu::model::GpuGpt<'_, G>| -> anyhow::Result<f32> {
        model.zero_grads()?;
        for (x, y) in &data {
            model.forward_deferred(x, y, b, t, scale)?;
            model.backward()?;
        }
        let loss: f64 = model.take_losses()?.iter().map(|&l| f64::from(l)).sum();
        model.step(1e-4, &adam, cfg.train.clip_grad)?;
        gpu.synchronize()?;
        Ok((loss * f64::from(scale)) as f32)
    };
    for _ in 0..args.warmup {
        step(&mut model)?;
    }
    gpu.set_profiling(args.profile);
    let mut times = Vec::with_capacity(args.steps);
    let mut loss = f32::NAN;
    for _ in 0..args.steps {
        let t0 = Instant::now();
        loss = step(&mut model)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let profile = gpu.take_profile()?;
    gpu.set_profiling(false);
    times.sort_by(f64::total_cmp);
    Ok((times, loss, profile))
}

/// The actor runtime (ranks as threads), with the plain trainer timed in the same run when the
/// layout is a single rank.
fn runtime_bench(args: &TrainBenchArgs, cfg: &Config) -> anyhow::Result<()> {
    use std::sync::Arc;
    use troupe::runtime::{Plan, RunOptions, bubble_report, trace_of, train_inproc};
    if args.steps == 0 {
        return Err(UsageError("--steps must be at least 1".into()).into());
    }
    let world = cfg.parallel.pipeline_model_parallel_size * cfg.parallel.data_parallel_size;
    let plan = Plan::new(cfg, world).map_err(|e| UsageError(e.to_string()))?;
    let mut cfg = cfg.clone();
    let total = (args.warmup + args.steps) as u64;
    cfg.train.train_iters = total;
    cfg.checkpoint.save.clear();
    // Host memory of the ranks (all in this process) when their chunks compute on the CPU.
    let estimate = (args.device == troupe::device::Device::Cpu).then(|| plan.memory_in_process(&cfg));
    if let Some(est) = &estimate {
        super::train::check_memory(est, est.total(), 1, args.skip_memory_check)?;
    }
    let t = cfg.model.seq_length;
    let mut rng = Rng::new(cfg.train.seed);
    let need = (total as usize + 1) * cfg.train.global_batch_size * t + 1;
    let tokens: Vec<u32> = (0..need).map(|_| (rng.next_u64() % cfg.model.vocab_size as u64) as u32).collect();
    let data = troupe::train::data::TokenWindows::new(tokens, t, cfg.train.seed).context("benchmark data")?;
    let threads = match args.threads.unwrap_or(cfg.train.threads) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let device = super::train::stage_factory(args.device, args.dtype.into(), 0, None)?;
    let describe = device.as_ref().map(|d| d.describe().to_string());
    // Where the data-parallel and embedding gradient sums and AdamW run (see
    // `Stage::with_device_group`).
    let place = device.as_ref().map(|d| {
        troupe::runtime::DevicePlacement::new(
            d.has_device_groups(),
            cfg.parallel.data_parallel_size,
            cfg.parallel.use_distributed_optimizer,
            false,
        )
    });
    let grad_sums = if place.is_some_and(|p| p.grad_sums) { "device" } else { "host" };
    let memory = device.clone();
    let opts = RunOptions {
        trace_step: Some(total),
        checksums: !args.no_checksums,
        host_p2p: args.host_p2p,
        device,
        ..RunOptions::default()
    };
    let before = memory.as_ref().map(troupe::gpu::stage::StageFactory::memory);
    let results = train_inproc(&cfg, Arc::new(data), opts, threads, None, None)?;
    // Host ↔ device copies per step (setup and the final read of the parameters included).
    let copies_mb = memory.as_ref().zip(before).map(|(d, b)| {
        let a = d.memory();
        round(((a.to_device - b.to_device) + (a.to_host - b.to_host)) as f64 / 1048576.0 / total as f64, 2)
    });
    let r0 = &results[0];
    let mut times: Vec<f64> = r0.records.iter().skip(args.warmup).map(|r| r.seconds).collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens_per_s = (cfg.train.global_batch_size * t) as f64 / median;
    let instructions: u64 = results.iter().map(|r| r.instructions).sum();
    let overhead: f64 = results.iter().map(|r| r.overhead_s).sum();
    let trace = trace_of(&plan, &r0.events);
    let bubble = bubble_report(&plan, &trace).ok();
    let name = args.config.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let mut out = serde_json::json!({
        "impl": "troupe-actors",
        "config": name,
        "threads": threads,
        "pp": plan.pp,
        "dp": plan.dp,
        "vpp": plan.vpp,
        "schedule": plan.schedule.name(),
        "microbatches": plan.microbatches,
        "tokens_per_step": cfg.train.global_batch_size * t,
        "steps": args.steps,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms_median": round(median * 1e3, 2),
        "instructions_per_step": instructions / total,
        "overhead_us_per_instruction": if plan.vpp == 1 { round(overhead / instructions.max(1) as f64 * 1e6, 2) } else { f64::NAN },
        "bubble_measured": bubble.as_ref().map(|b| round(b.measured, 4)),
        "bubble_simulated": bubble.as_ref().map(|b| round(b.predicted, 4)),
        "bubble_simulated_mean_costs": bubble.as_ref().map(|b| round(b.predicted_mean_costs, 4)),
        "bubble_ideal_1f1b": round((plan.pp as f64 - 1.0) / plan.microbatches as f64, 4),
        "final_loss": r0.records.last().map(|r| r.loss),
        "distributed_optimizer": plan.distributed_optimizer,
        "checksums": !args.no_checksums,
        "optimizer_state_mb_per_rank": results.iter().map(|r| round(r.optimizer_state_bytes as f64 / 1048576.0, 2)).collect::<Vec<_>>(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "estimated_memory_mb": estimate.map(|e| round(e.total() as f64 / 1048576.0, 1)),
        "device": args.device.to_string(),
        "gpu": describe,
        "device_memory_peak_mb": memory.map(|d| round(d.memory().peak as f64 / 1048576.0, 1)),
        "host_device_copies_mb_per_step": copies_mb,
        "optimizer": if place.is_some_and(|p| p.optimizer) { "device" } else { "host" },
        "grad_sums": grad_sums,
        "p2p": if results.iter().any(|r| r.p2p_on_device) { "device" } else { "host" },
        "mfu": describe.as_ref().map(|_| {
            round(cfg.model.flops_per_token() * tokens_per_s / (args.peak_tflops * 1e12), 4)
        }),
    });
    if let Some(b) = bubble.as_ref().filter(|_| plan.pp > 1) {
        out["bubble_relative_error"] =
            serde_json::json!(round((b.measured - b.predicted).abs() / b.predicted.max(1e-12), 4));
    }
    if world == 1 && args.device != troupe::device::Device::Cpu {
        // The same rank on the GPU training loop (device optimizer, no host round trips).
        let g = gpu_bench(&TrainBenchArgs { profile: false, ..args.clone() }, &cfg)?;
        let loop_tps = g["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        out["gpu_loop_tokens_per_s"] = serde_json::json!(loop_tps);
        out["actors_over_gpu_loop"] = serde_json::json!(round(tokens_per_s / loop_tps, 4));
    } else if world == 1 {
        let p = plain(&TrainBenchArgs { profile: false, threads: Some(threads), ..args.clone() }, &cfg)?;
        let plain_tps = p["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        out["plain_tokens_per_s"] = serde_json::json!(plain_tps);
        out["actors_over_plain"] = serde_json::json!(round(tokens_per_s / plain_tps, 4));
        let per_step_us =
            (1.0 / tokens_per_s - 1.0 / plain_tps) * (cfg.train.global_batch_size * t) as f64 * 1e6;
        out["extra_us_per_instruction_vs_plain"] =
            serde_json::json!(round(per_step_us / (instructions / total).max(1) as f64, 2));
    }
    println!("{out}");
    Ok(())
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
fn peak_rss_mb() -> f64 {
    troupe::memory::peak_rss().map_or(0.0, |b| b as f64 / (1u64 << 20) as f64)
}
