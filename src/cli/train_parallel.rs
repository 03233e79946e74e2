//! `troupe train` on the actor runtime: pipeline- and data-parallel layouts, as threads of this
//! process (the default) or as one process per rank under `troupe launch`, `torchrun` or
//! `mpirun`. Prints the same progress as the single-rank trainer from world rank 0, writes the
//! trace of one step with `--trace`, and ends with the measured bubble beside the simulator's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::ProgressBar;
use troupe::comm::CommOptions;
use troupe::comm::env::LaunchEnv;
use troupe::config::Config;
use troupe::data::SampleSource;
use troupe::runtime::{self, Plan, RankResult, RankSetup, RunEvent, RunOptions};
use troupe::trace::Trace;
use troupe::train::corpus;
use troupe::train::run::Event;

use super::UsageError;
use super::train::{RunLogs, TrainArgs, progress_bar, report};

/// Runtime options of `troupe train` that are not configuration keys.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuntimeArgs {
    /// Shard optimizer state over the data-parallel group (ZeRO-1).
    #[arg(long)]
    pub use_distributed_optimizer: bool,
    /// Alias of --virtual-pipeline-model-parallel-size.
    #[arg(long, value_name = "V")]
    pub virtual_pipeline_size: Option<usize>,
    /// Run on the actor runtime even with one rank (it is used automatically for more).
    #[arg(long)]
    pub actors: bool,
    /// Record every instruction and message of one step (see --trace-step) to FILE: Chrome
    /// trace JSON (Perfetto) when FILE ends in .json, else troupe's native text form.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// The step --trace records (default: the last one).
    #[arg(long, value_name = "STEP")]
    pub trace_step: Option<u64>,
    /// Re-execute forcing the order of message handling recorded in TRACE (a --trace file).
    #[arg(long, value_name = "TRACE")]
    pub replay_order: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this port (under a launcher: port + local rank).
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Longest wait for any message or collective, in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub comm_timeout: f64,
    /// Inject a fault, `KIND[:key=value,...]` (repeatable), e.g. `crash:rank=1,step=3,phase=steady`;
    /// kinds: crash exit hang slow drop delay duplicate reorder corrupt nan inf sigterm ckpt-fail ckpt-kill.
    #[arg(long = "inject", value_name = "SPEC")]
    pub inject: Vec<String>,
    /// Do not add and verify checksums on pipeline messages (a CRC32 on host messages, a 64-bit
    /// checksum on device links).
    #[arg(long)]
    pub no_checksums: bool,
    /// GPU chunks with data parallelism: sum gradients through the host's reducer (download,
    /// CPU all-reduce, upload) instead of on the devices (NCCL when launched, one process per
    /// GPU).
    #[arg(long)]
    pub host_grad_reduce: bool,
    /// GPU chunks with pipeline parallelism: send activations and gradients through the host
    /// (download, CPU communicator, upload) instead of between the devices (NCCL when launched).
    #[arg(long)]
    pub host_p2p: bool,
    /// A rank that makes no progress for this many seconds reports itself hung (default: the
    /// communication timeout).
    #[arg(long, value_name = "SECS")]
    pub watchdog_timeout: Option<f64>,
    /// Write a failing rank's flight recorder (its last 64 instructions and messages) to
    /// DIR/flight-rank<r>.txt.
    #[arg(long, value_name = "DIR")]
    pub flight_recorder: Option<PathBuf>,
    /// Multi-process runs: a rank whose heartbeat through the rendezvous store stops for this
    /// many seconds is reported dead or hung (default: the communication timeout).
    #[arg(long, value_name = "SECS")]
    pub heartbeat_timeout: Option<f64>,
}

impl RuntimeArgs {
    /// Config overrides implied by these flags.
    pub fn sets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.use_distributed_optimizer {
            out.push("parallel.use_distributed_optimizer=true".into());
        }
        if let Some(v) = self.virtual_pipeline_size {
            out.push(format!("parallel.virtual_pipeline_model_parallel_size={v}"));
        }
        out
    }
}

/// Whether `troupe train` should use the actor runtime.
pub fn wanted(cfg: &Config, args: &RuntimeArgs, launched: Option<&LaunchEnv>) -> bool {
    args.actors
        || cfg.parallel.is_distributed()
        || launched.is_some_and(|e| e.world_size > 1)
        || args.trace.is_some()
        || args.replay_order.is_some()
        || !args.inject.is_empty()
        || !cfg.faults.is_empty()
}

fn options(args: &RuntimeArgs, cfg: &Config, attempt: u64) -> anyhow::Result<RunOptions> {
    let mut faults = cfg.faults.clone();
    for spec in &args.inject {
        faults.push(
            spec.parse()
                .map_err(|e: troupe::runtime::faults::FaultError| UsageError(format!("--inject {e}")))?,
        );
    }
    let watchdog = match args.watchdog_timeout {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(
                UsageError(format!("--watchdog-timeout {s}: must be a positive number of seconds")).into()
            );
        }
    };
    if !(args.comm_timeout.is_finite() && args.comm_timeout > 0.0) {
        return Err(UsageError(format!(
            "--comm-timeout {}: must be a positive number of seconds",
            args.comm_timeout
        ))
        .into());
    }
    let replay_order = match &args.replay_order {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| UsageError(format!("--replay-order {}: {e}", p.display())))?;
            let trace = Trace::parse(&text)
                .map_err(|e| UsageError(format!("--replay-order {}: {e}", p.display())))?;
            Some(runtime::replay_order(&trace))
        }
    };
    let trace_step = args.trace.as_ref().map(|_| args.trace_step.unwrap_or(cfg.train.train_iters));
    if let Some(s) = trace_step
        && (s == 0 || s > cfg.train.train_iters)
    {
        return Err(UsageError(format!("--trace-step {s}: must be in 1..={}", cfg.train.train_iters)).into());
    }
    Ok(RunOptions {
        timeout: Duration::from_secs_f64(args.comm_timeout),
        trace_step,
        replay_order,
        faults: troupe::runtime::faults::FaultPlan { faults, seed: cfg.fault_seed },
        attempt,
        checksums: !args.no_checksums,
        host_grad_reduce: args.host_grad_reduce,
        host_p2p: args.host_p2p,
        watchdog,
        flight_dir: args.flight_recorder.clone(),
        ..RunOptions::default()
    })
}

/// Trains on the actor runtime; `launched` is the launcher environment of a multi-process run.
pub fn train(args: &TrainArgs, mut cfg: Config, launched: Option<LaunchEnv>) -> anyhow::Result<()> {
    let rt = &args.runtime;
    let (world, rank, local) = match &launched {
        Some(env) => {
            let pp = cfg.parallel.pipeline_model_parallel_size;
            if !env.world_size.is_multiple_of(pp) {
                return Err(UsageError(format!(
                    "--pipeline-model-parallel-size {pp} does not divide the launcher's world of {} ranks",
                    env.world_size
                ))
                .into());
            }
            let dp = env.world_size / pp;
            if cfg.parallel.data_parallel_size != 1 && cfg.parallel.data_parallel_size != dp {
                return Err(UsageError(format!(
                    "--data-parallel-size {} disagrees with world {} / pipeline {pp} = {dp}",
                    cfg.parallel.data_parallel_size, env.world_size
                ))
                .into());
            }
            cfg.parallel.data_parallel_size = dp;
            cfg.validate().map_err(|e| UsageError(e.to_string()))?;
            (env.world_size, env.rank, env.local_rank)
        }
        None => (cfg.parallel.pipeline_model_parallel_size * cfg.parallel.data_parallel_size, 0, 0),
    };
    let plan = Plan::new(&cfg, world).map_err(|e| UsageError(e.to_string()))?;
    let attempt = launched.as_ref().map_or(0, |e| e.restart_count);
    let opts = options(rt, &cfg, attempt)?;
    opts.faults
        .check(&plan, world, cfg.train.train_iters)
        .map_err(|e| UsageError(format!("fault plan: {e}")))?;
    if rank == 0 && !opts.faults.faults.is_empty() {
        let list: Vec<String> = opts.faults.faults.iter().map(|f| f.describe()).collect();
        eprintln!("troupe: injecting faults (attempt {attempt}): {}", list.join("; "));
    }
    if let Some(port) = rt.metrics_port {
        let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port.saturating_add(local as u16)));
        troupe::telemetry::serve_prometheus(addr).map_err(|e| UsageError(format!("--metrics-port: {e}")))?;
        if rank == 0 || launched.is_some() {
            eprintln!("troupe: serving Prometheus metrics on http://{addr}/metrics");
        }
    }
    let data = corpus::open(&cfg).map_err(|e| UsageError(e.to_string()))?;
    let source: Arc<dyn SampleSource> = Arc::from(data.train);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match cfg.train.threads {
        0 => cores,
        t => t,
    };
    if rank == 0 {
        eprintln!(
            "troupe: training a {}-layer GPT ({:.2} M parameters) on {} — {} ranks: pipeline {} × data {}, \
             {} chunk(s) per rank, schedule {}, {} microbatches per rank{}, for {} of {} each",
            cfg.model.num_layers,
            cfg.model.num_params() as f64 / 1e6,
            data.description,
            world,
            plan.pp,
            plan.dp,
            plan.vpp,
            plan.schedule,
            plan.microbatches,
            if plan.distributed_optimizer { ", distributed optimizer" } else { "" },
            super::count(cfg.train.train_iters, "step"),
            super::train::step_flops(&cfg)
        );
    }
    // Host memory, when the chunks compute on the CPU: this process holds its ranks (all of them
    // in process, one when launched), and a launched node holds its local ranks together.
    let estimate = (args.device == troupe::device::Device::Cpu).then(|| match &launched {
        None => plan.memory_in_process(&cfg),
        Some(_) => plan.memory_of(&cfg, rank, true),
    });
    if let Some(mine) = &estimate {
        if rank == 0 {
            super::train::announce_memory(mine);
        }
        let (together, processes) = match &launched {
            None => (mine.total(), 1),
            Some(env) => {
                let first = env.rank - env.local_rank.min(env.rank);
                let node = first..(first + env.local_world_size).min(world);
                (node.clone().map(|r| plan.memory_of(&cfg, r, true).total()).sum(), node.len())
            }
        };
        super::train::check_memory(mine, together, processes, args.skip_memory_check)?;
    }
    if rank == 0 && plan.pp > 1 && plan.microbatches < plan.pp {
        eprintln!(
            "troupe: note: {} microbatch(es) per step for {} pipeline stages: stages cannot overlap; raise \
             --global-batch-size or lower --micro-batch-size for at least {} microbatches",
            plan.microbatches,
            plan.pp,
            4 * plan.pp
        );
    }
    if rank == 0 && cfg.logging.eval_interval > 0 && cfg.logging.sample_tokens > 0 {
        eprintln!("troupe: note: the parallel runtime evaluates but does not generate text samples");
    }
    if let Some(note) = data.tokenizer_note.as_ref().filter(|_| rank == 0) {
        eprintln!("troupe: warning: {note}");
    }
    if let Some(note) = data.valid_note.as_ref().filter(|_| rank == 0) {
        eprintln!("troupe: warning: no evaluation will run: {note}");
    }
    let mut opts = opts;
    opts.valid = data.valid.map(|v| runtime::ValidData(Arc::from(v)));
    opts.test = data.test.map(|v| runtime::ValidData(Arc::from(v)));
    // Launched ranks are one process per GPU, so their data-parallel groups can be NCCL
    // communicators; in-process ranks share this process's GPU and reduce through the host.
    let nccl = launched.as_ref().map(|_| opts.timeout);
    // A launched rank joins the others and agrees on its settings before its device is set up
    // (kernel builds, NCCL), so ranks that differ stop at once.
    let joined = match &launched {
        None => None,
        Some(env) => {
            let comm_opts = CommOptions { timeout: opts.timeout, ..CommOptions::default() };
            let eval = [&opts.valid, &opts.test].map(|d| d.as_ref().map(|d| d.0.as_ref()));
            Some(join(env, comm_opts, &rank_settings(&cfg, args, source.as_ref(), eval, "actor runtime"))?)
        }
    };
    opts.device = super::train::stage_factory(args.device, args.dtype.into(), local, nccl)?;
    if let Some(f) = opts.device.as_ref().filter(|_| rank == 0) {
        let p = &cfg.parallel;
        let place = runtime::DevicePlacement::new(
            f.has_device_groups(),
            p.data_parallel_size,
            p.use_distributed_optimizer,
            opts.host_grad_reduce,
        );
        let reduce = match (p.data_parallel_size > 1 || p.pipeline_model_parallel_size > 1, place.grad_sums) {
            (false, _) => "",
            (true, false) => ", gradient sums on the host",
            (true, true) if nccl.is_some() && args.device == troupe::device::Device::Cuda => {
                ", gradient sums on the devices with NCCL"
            }
            (true, true) => ", gradient sums on the device through the host's communicator",
        };
        let adamw = match (place.optimizer, place.shards) {
            (false, _) => "on the host: the distributed optimizer's shards",
            (true, true) => "on the device: the distributed optimizer's shards, gathered there",
            (true, false) => "on the device",
        };
        let messages = runtime::device_messages(
            f.has_device_groups(),
            p.pipeline_model_parallel_size,
            opts.host_p2p,
            opts.faults.faults.iter().any(|x| x.kind.is_message()),
        );
        let p2p = match (p.pipeline_model_parallel_size > 1, messages) {
            (false, _) => "",
            (true, false) => ", pipeline messages through the host",
            (true, true) if nccl.is_some() && args.device == troupe::device::Device::Cuda => {
                ", pipeline messages between the devices with NCCL"
            }
            (true, true) => ", pipeline messages between the devices through the host's communicator",
        };
        eprintln!("troupe: each chunk computes on {} (AdamW {adamw}{reduce}{p2p})", f.describe());
    }
    // Opened before any rank starts, so a log that cannot be written stops the run at once.
    let mut logs = RunLogs::open(&cfg, rank == 0)?;
    let stop = troupe::train::run::stop_flag().context("installing SIGINT/SIGTERM handlers")?;
    let began = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<RunEvent>();
    let events = (rank == 0).then_some(tx);
    let cfg2 = cfg.clone();
    let worker = match (&launched, joined) {
        (Some(env), Some((comm, store))) => {
            let per_rank =
                if cfg.train.threads == 0 { (cores / env.local_world_size.max(1)).max(1) } else { threads };
            let bound = match rt.heartbeat_timeout {
                None => opts.timeout,
                Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
                Some(s) => {
                    return Err(UsageError(format!(
                        "--heartbeat-timeout {s}: must be a positive number of seconds"
                    ))
                    .into());
                }
            };
            let heartbeat = runtime::heartbeat::Heartbeat::start(store, env.rank, env.world_size, bound);
            let setup = RankSetup {
                cfg: cfg2,
                plan: Arc::new(plan.clone()),
                world: comm,
                data: source,
                opts,
                threads: per_rank,
                events,
                stop: Some(stop.clone()),
                alarm: Some(heartbeat.alarm()),
            };
            std::thread::spawn(move || {
                let r = runtime::run_rank(setup).map(|r| vec![r]);
                drop(heartbeat);
                r
            })
        }
        _ => {
            let cores_for_ranks = threads;
            let stop = stop.clone();
            std::thread::spawn(move || {
                runtime::train_inproc(&cfg2, source, opts, cores_for_ranks, events, Some(stop))
            })
        }
    };
    let bar = if rank == 0 { progress_bar(&cfg, 0, args.no_progress) } else { ProgressBar::hidden() };
    let mut last_bubble = 0.0;
    for ev in rx {
        match ev {
            RunEvent::Step { step, loss, lr, grad_norm, tokens_per_s, elapsed_s, skipped, bubble } => {
                last_bubble = bubble;
                let e = if skipped {
                    Event::Skipped { step, microbatch: 0, loss }
                } else {
                    Event::Step { step, loss, lr, grad_norm, tokens_per_s, elapsed_s }
                };
                report(&e, &bar, &cfg, &mut logs);
            }
            RunEvent::Saved { step, path } => {
                report(&Event::Saved { step, path }, &bar, &cfg, &mut logs);
            }
            RunEvent::Eval { step, split, loss } => {
                let e = Event::Eval { step, split, loss, perplexity: loss.exp(), sample: None };
                report(&e, &bar, &cfg, &mut logs);
            }
            RunEvent::Resumed { step, consumed_samples } => {
                bar.set_position(step);
                eprintln!("troupe: resumed at step {step} ({consumed_samples} samples consumed)");
            }
        }
    }
    let results: Vec<RankResult> =
        worker.join().map_err(|_| anyhow::anyhow!("the runtime thread panicked"))??;
    bar.finish_and_clear();
    if rank != 0 {
        return Ok(());
    }
    let r0 = &results[0];
    let last = r0.records.last();
    if r0.interrupted {
        let at = last.map_or(0, |r| r.step);
        // Not a signal (here or, through the step agreement, on another rank): the
        // configuration's --exit-interval, or --exit-duration-in-mins by this clock, which
        // started before the loop's.
        let late = troupe::train::run::over_time(&cfg.train, began.elapsed());
        let why = (!stop.load(std::sync::atomic::Ordering::SeqCst))
            .then(|| troupe::train::run::exit_due(&cfg.train, at, late))
            .flatten();
        let resume = match cfg.checkpoint.save.as_str() {
            "" => String::new(),
            s => format!("; resume with --load {s}"),
        };
        match why {
            Some(why) => eprintln!("troupe: stopped at step {at} ({why}){resume}"),
            None => eprintln!("troupe: interrupted at step {at}{resume}"),
        }
    }
    // A stopped run said so above; its numbers follow without a second verdict.
    let head = if r0.interrupted {
        "troupe: last loss".to_string()
    } else {
        format!("troupe: done: {}, final loss", super::count(last.map_or(0, |r| r.step), "step"))
    };
    eprintln!(
        "{head} {:.4}, last step's measured bubble {:.3}, optimizer state {:.2} MiB on rank 0{}",
        last.map_or(f32::NAN, |r| r.loss),
        last_bubble,
        r0.optimizer_state_bytes as f64 / (1 << 20) as f64,
        super::train::peak_memory_note(estimate.as_ref())
    );
    let instr: u64 = results.iter().map(|r| r.instructions).sum();
    let overhead: f64 = results.iter().map(|r| r.overhead_s).sum();
    if instr > 0 {
        eprintln!(
            "troupe: actor and messaging overhead {:.1} µs per instruction ({} instructions, {:.2} MiB of activations and gradients sent by rank 0)",
            overhead / instr as f64 * 1e6,
            instr,
            r0.sent_bytes as f64 / (1 << 20) as f64
        );
    }
    if let Some(path) = &rt.trace {
        let trace = runtime::trace_of(&plan, &r0.events);
        let text = if path.extension().is_some_and(|e| e == "json") {
            troupe::trace::to_chrome(&trace)
        } else {
            trace.to_native()
        };
        std::fs::write(path, text).with_context(|| format!("writing the trace to {}", path.display()))?;
        match runtime::bubble_report(&plan, &trace) {
            Ok(b) => eprintln!(
                "troupe: trace of step {} written to {}; bubble measured {:.3} vs simulated {:.3} from the measured costs \
                 (makespan {:.1} ms vs {:.1} ms)",
                opts_step(rt, &cfg),
                path.display(),
                b.measured,
                b.predicted,
                b.measured_makespan_us / 1e3,
                b.predicted_makespan_us / 1e3
            ),
            Err(e) => eprintln!("troupe: trace written to {}; no bubble comparison: {e}", path.display()),
        }
    }
    Ok(())
}

/// Joins the launched world: the TCP communicator, and a store connection on which the ranks
/// agree on their settings (see [`runtime::agree`]) and which then carries the heartbeats.
pub(super) fn join(
    env: &LaunchEnv,
    opts: CommOptions,
    mine: &runtime::agree::Settings,
) -> anyhow::Result<(Box<dyn troupe::comm::Comm>, troupe::comm::store::StoreClient)> {
    let timeout = opts.timeout;
    let comm = troupe::comm::tcp::connect_from_env(env, opts)
        .map_err(|e| anyhow::anyhow!("rank {}: connecting to the other ranks: {e}", env.rank))?;
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    let mut store = troupe::comm::store::StoreClient::connect(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("rank {}: connecting to the rendezvous store: {e}", env.rank))?
        .with_prefix(&format!("troupe/attempt_{}", env.restart_count));
    runtime::agree::agree(&mut store, env.rank, env.world_size, mine, timeout).map_err(|e| match e {
        // Different settings are the user's to fix: a usage error, which the launcher does not
        // restart.
        runtime::agree::AgreeError::Disagree { .. } => anyhow::Error::new(UsageError(e.to_string())),
        other => anyhow::Error::new(other),
    })?;
    Ok((comm, store))
}

/// What every rank of a launched run must share (see [`runtime::agree`]): the configuration,
/// the flags that change the messages or the math (the same list on the actor runtime and the
/// GPU loop, so ranks that took different paths disagree too), and the training data in brief.
/// `engine` names the rank's training loop (`--actors` and some flags choose the actor runtime).
pub(super) fn rank_settings(
    cfg: &Config,
    args: &TrainArgs,
    source: &dyn SampleSource,
    [valid, test]: [Option<&dyn SampleSource>; 2],
    engine: &str,
) -> runtime::agree::Settings {
    let mut s = runtime::agree::Settings::of_config(cfg);
    s.set("training loop", engine);
    s.set("--device", args.device);
    if args.device != troupe::device::Device::Cpu {
        s.set("--dtype", format!("{:?}", args.dtype).to_lowercase());
        // Stages built from different kernel sources (TROUPE_KERNEL_SOURCES on some hosts) would
        // compute different functions; the hash is that of the text NVRTC or the emulator builds.
        let kernels = troupe::gpu::cuda::kernel_source()
            .map(|src| format!("{:016x}", troupe::gpu::sources::hash_texts(&[&src])))
            .unwrap_or_else(|e| format!("unreadable ({e})"));
        s.set("kernel sources hash", kernels);
    }
    let rt = &args.runtime;
    s.set("--no-checksums", rt.no_checksums);
    s.set("--host-p2p", rt.host_p2p);
    s.set("--host-grad-reduce", rt.host_grad_reduce);
    // `[[faults]]` tables are configuration keys; the flags are compared as parsed.
    let faults: Vec<String> = rt
        .inject
        .iter()
        .map(|x| x.parse::<troupe::runtime::faults::Fault>().map_or_else(|_| x.clone(), |f| f.describe()))
        .collect();
    s.set("--inject", if faults.is_empty() { "none".into() } else { faults.join("; ") });
    s.set("training data", runtime::agree::data_fingerprint(source));
    // Each split may have data of its own (`--valid-data-path`), at a path of each host's.
    let none = || "none".to_string();
    s.set("validation data", valid.map_or_else(none, runtime::agree::data_fingerprint));
    s.set("test data", test.map_or_else(none, runtime::agree::data_fingerprint));
    s
}

fn opts_step(rt: &RuntimeArgs, cfg: &Config) -> u64 {
    rt.trace_step.unwrap_or(cfg.train.train_iters)
}
