//! `troupe bench train`: times full training steps (forward, backward, clipping, AdamW) of a
//! config's model on random tokens and prints exactly one JSON line, with the same fields as
//! `bench/pytorch_gpt.py` so the two can be compared in one run (`bench/compare_pytorch.sh`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use troupe::config::Config;
use troupe::kernels::{Backend, CpuBackend, Profiled};
use troupe::models::Rng;
use troupe::train::{Microbatch, Trainer};

use super::UsageError;

#[derive(Debug, clap::Args)]
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
}

pub fn train(args: TrainBenchArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config).map_err(|e| UsageError(e.to_string()))?;
    if args.steps == 0 {
        return Err(UsageError("--steps must be at least 1".into()).into());
    }
    let threads = args.threads.unwrap_or(cfg.train.threads);
    let cpu = CpuBackend::new(threads);
    let threads = cpu.threads();
    let profiled = Profiled::new(cpu);
    let mut trainer = Trainer::new(&cfg).context("building the model")?;
    let (b, t, v) = (cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size);
    let accum = cfg.accumulation_steps();
    let mut rng = Rng::new(cfg.train.seed);
    let data: Vec<(Vec<u32>, Vec<u32>)> = (0..accum)
        .map(|_| {
            let seq: Vec<u32> = (0..b * (t + 1)).map(|_| (rng.next_u64() % v as u64) as u32).collect();
            let (mut x, mut y) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
            for row in seq.chunks(t + 1) {
                x.extend_from_slice(&row[..t]);
                y.extend_from_slice(&row[1..]);
            }
            (x, y)
        })
        .collect();
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
    println!("{out}");
    Ok(())
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
