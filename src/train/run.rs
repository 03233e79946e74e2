//! The training loop: steps with gradient accumulation, the LR schedule, NaN policy,
//! evaluation, checkpoints on an interval and on SIGINT/SIGTERM, and resume. It reports
//! through an observer so the CLI decides how to show progress (bar, plain lines, JSON).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use thiserror::Error;

use super::data::BatchBuf;
use super::{Microbatch, TrainError, Trainer};
use crate::checkpoint::{self, CheckpointError, TrainState};
use crate::config::{Config, NanPolicy};
use crate::data::{DatasetError, SampleSource};
use crate::kernels::Backend;
use crate::models::gpt::ModelError;
use crate::optim::LrSchedule;

/// Errors of a training run.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("step {step}, saving the checkpoint: {source} ({})", checkpoint::KEPT_LATEST)]
    Save { step: u64, source: CheckpointError },
    #[error(
        "--load {path}: no checkpoint there (no `latest` file and no state.json); pass --allow-fresh-start to start from scratch"
    )]
    NothingToLoad { path: String },
    #[error("the training data is empty: {0}")]
    NoData(&'static str),
    #[error("training data: {0}")]
    Data(#[from] DatasetError),
}

/// What the loop reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Resumed {
        step: u64,
        consumed_samples: u64,
        from: String,
    },
    Step {
        step: u64,
        loss: f32,
        lr: f32,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
    },
    Skipped {
        step: u64,
        microbatch: usize,
        loss: f32,
    },
    Eval {
        step: u64,
        split: EvalSplit,
        loss: f32,
        perplexity: f32,
        sample: Option<String>,
    },
    Saved {
        step: u64,
        path: String,
    },
    Interrupted {
        step: u64,
    },
    /// Training stops early by its configuration (`exit_interval`, `exit_duration_in_mins`).
    Stopped {
        step: u64,
        why: String,
    },
}

/// Whether `exit_duration_in_mins` has passed `elapsed` into training.
pub fn over_time(t: &crate::config::TrainConfig, elapsed: std::time::Duration) -> bool {
    t.exit_duration_in_mins > 0.0 && elapsed.as_secs_f64() / 60.0 >= t.exit_duration_in_mins
}

/// Why training stops after `step` (before `train_iters`): a multiple of `exit_interval`, or
/// `over_time` (decided by the caller, agreed between ranks where there are several). `None`:
/// it goes on.
pub fn exit_due(t: &crate::config::TrainConfig, step: u64, over_time: bool) -> Option<String> {
    if step >= t.train_iters {
        return None;
    }
    if t.exit_interval > 0 && step.is_multiple_of(t.exit_interval) {
        return Some(format!("--exit-interval {} reached", t.exit_interval));
    }
    (over_time && t.exit_duration_in_mins > 0.0)
        .then(|| format!("--exit-duration-in-mins {} passed", t.exit_duration_in_mins))
}

/// Which held-out split an evaluation used: the validation split every `eval_interval` steps and
/// at the end of training, the test split at the end (as Megatron-LM does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    Validation,
    Test,
}

impl EvalSplit {
    /// `validation` or `test`, as the log lines say it.
    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Validation => "validation",
            EvalSplit::Test => "test",
        }
    }

    /// `val` or `test`: the prefix of the `--log-json` keys (`val_loss`, `test_perplexity`).
    pub fn key(self) -> &'static str {
        match self {
            EvalSplit::Validation => "val",
            EvalSplit::Test => "test",
        }
    }

    /// The evaluations due when training ends at `step`: the validation split unless the loop
    /// has just evaluated it (`step` a multiple of `eval_interval`), then the test split.
    pub fn at_end(step: u64, eval_interval: u64, valid: bool, test: bool) -> Vec<EvalSplit> {
        let mut out = Vec::new();
        if valid && eval_interval > 0 && !step.is_multiple_of(eval_interval) {
            out.push(EvalSplit::Validation);
        }
        if test {
            out.push(EvalSplit::Test);
        }
        out
    }
}

/// Text sampler called at each evaluation (e.g. generate from a prompt and decode).
pub type SampleFn<'a> = &'a dyn Fn(&crate::models::gpt::Gpt, &dyn Backend) -> String;

/// Data for a run.
pub struct RunData<'a> {
    pub train: &'a dyn SampleSource,
    pub valid: Option<&'a dyn SampleSource>,
    /// Evaluated once when training ends (not after a stop).
    pub test: Option<&'a dyn SampleSource>,
    /// Called at each evaluation; its text goes into [`Event::Eval`].
    pub sample: Option<SampleFn<'a>>,
}

impl<'a> RunData<'a> {
    /// The held-out evaluations due when training ends at `step`, each with its samples (see
    /// [`EvalSplit::at_end`]).
    pub fn end_evaluations(&self, step: u64, eval_interval: u64) -> Vec<(EvalSplit, &'a dyn SampleSource)> {
        EvalSplit::at_end(step, eval_interval, self.valid.is_some(), self.test.is_some())
            .into_iter()
            .filter_map(|split| match split {
                EvalSplit::Validation => self.valid.map(|s| (split, s)),
                EvalSplit::Test => self.test.map(|s| (split, s)),
            })
            .collect()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub steps: u64,
    pub final_loss: f32,
    pub interrupted: bool,
    pub skipped_steps: u64,
}

/// Handles SIGINT and SIGTERM: the first raises the returned flag, which the loop checks at
/// each step boundary (it then saves a checkpoint and stops), and says so on stderr. A second
/// SIGINT (Ctrl-C twice) ends the process at once with exit code 130, for a step that would not
/// end; SIGTERM never does, since a scheduler and a launcher may both send one for the same stop
/// (and follow it with SIGKILL after their own grace period). The signals are taken by a thread
/// of their own: nothing runs inside the handler.
///
/// # Errors
/// When the OS refuses to install a handler or the thread cannot start.
pub fn stop_flag() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let raised = Arc::clone(&flag);
    std::thread::Builder::new().name("troupe-signals".into()).spawn(move || {
        let mut interrupts = 0;
        for sig in signals.forever() {
            let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
            if sig == SIGINT {
                interrupts += 1;
            }
            if interrupts >= 2 {
                eprintln!("troupe: SIGINT again: stopping now, without a checkpoint of the current step");
                std::process::exit(130);
            }
            if !raised.swap(true, Ordering::SeqCst) {
                eprintln!("troupe: {name}: stopping after the current step (Ctrl-C again to stop at once)");
            }
        }
    })?;
    Ok(flag)
}

/// Builds the trainer, restoring from `cfg.checkpoint.load` when set.
///
/// # Errors
/// [`RunError::NothingToLoad`], checkpoint verification or shape errors.
pub fn prepare(cfg: &Config) -> Result<(Trainer, TrainState, Option<String>), RunError> {
    let mut trainer = Trainer::new(cfg)?;
    let mut state = TrainState {
        step: 0,
        consumed_samples: 0,
        skipped_steps: 0,
        rng_state: cfg.train.seed,
        config: cfg.clone(),
    };
    let load = cfg.checkpoint.load.as_str();
    if load.is_empty() {
        return Ok((trainer, state, None));
    }
    match checkpoint::resolve(Path::new(load))? {
        None if cfg.checkpoint.allow_fresh_start => Ok((trainer, state, None)),
        None => Err(RunError::NothingToLoad { path: load.into() }),
        Some(dir) => {
            // Fine-tuning takes the weights only: step 0, fresh moments, the data and schedule
            // from their start.
            let finetune = cfg.checkpoint.finetune;
            let loaded = if finetune { checkpoint::load_model(&dir)? } else { checkpoint::load(&dir)? };
            loaded.check_shape(cfg)?;
            loaded.restore(&mut trainer.model, (!finetune).then_some(&mut trainer.opt))?;
            if finetune {
                return Ok((trainer, state, Some(dir.display().to_string())));
            }
            state.step = loaded.state.step;
            state.consumed_samples = loaded.state.consumed_samples;
            state.skipped_steps = loaded.state.skipped_steps;
            state.rng_state = loaded.state.rng_state;
            Ok((trainer, state, Some(dir.display().to_string())))
        }
    }
}

/// Runs training from `state` to `cfg.train.train_iters`.
///
/// # Errors
/// A non-finite loss under the `abort` policy, bad data, or a failed checkpoint write.
pub fn run(
    cfg: &Config,
    be: &dyn Backend,
    trainer: &mut Trainer,
    state: &mut TrainState,
    data: &RunData<'_>,
    stop: &AtomicBool,
    on: &mut dyn FnMut(&Event),
) -> Result<RunSummary, RunError> {
    if data.train.num_samples() == 0 {
        return Err(RunError::NoData("no training samples"));
    }
    let t = &cfg.train;
    let sched = LrSchedule::from_train(t);
    let (mb_size, accum) = (t.micro_batch_size, cfg.accumulation_steps());
    let seq = data.train.sample_tokens().saturating_sub(1);
    let mut bufs: Vec<BatchBuf> = (0..accum).map(|_| BatchBuf::default()).collect();
    let started = Instant::now();
    let mut last = (Instant::now(), state.step);
    let mut final_loss = f32::NAN;
    let mut interrupted = false;
    let start = state.step;
    while state.step < t.train_iters {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            on(&Event::Interrupted { step: state.step });
            break;
        }
        for (i, buf) in bufs.iter_mut().enumerate() {
            buf.fill(data.train, state.consumed_samples + (i * mb_size) as u64, mb_size)?;
        }
        let mbs: Vec<Microbatch<'_>> = bufs
            .iter()
            .map(|b| Microbatch { tokens: &b.tokens, targets: &b.targets, batch: mb_size, seq })
            .collect();
        let lr = sched.lr(state.step);
        let result = trainer.step(be, &mbs, lr);
        state.step += 1;
        state.consumed_samples += t.global_batch_size as u64;
        match result {
            Ok(stats) => {
                final_loss = stats.loss;
                tracing::debug!(
                    step = state.step,
                    loss = stats.loss,
                    lr,
                    grad_norm = stats.grad_norm,
                    "step"
                );
                let now = Instant::now();
                let secs = now.duration_since(last.0).as_secs_f64().max(1e-9);
                let tokens = (state.step - last.1) as f64 * (t.global_batch_size * seq) as f64;
                last = (now, state.step);
                on(&Event::Step {
                    step: state.step,
                    loss: stats.loss,
                    lr,
                    grad_norm: stats.grad_norm,
                    tokens_per_s: tokens / secs,
                    elapsed_s: started.elapsed().as_secs_f64(),
                });
            }
            Err(TrainError::NonFiniteLoss { mb, loss, .. }) if t.nan_policy == NanPolicy::Skip => {
                state.skipped_steps += 1;
                tracing::warn!(step = state.step, microbatch = mb, loss, "non-finite loss: step skipped");
                on(&Event::Skipped { step: state.step, microbatch: mb, loss });
            }
            Err(e) => return Err(e.into()),
        }
        let l = &cfg.logging;
        if let Some(valid) =
            data.valid.filter(|_| l.eval_interval > 0 && state.step.is_multiple_of(l.eval_interval))
        {
            let first = eval_first_sample(cfg, EvalSplit::Validation, state.step, true);
            let loss = evaluate(cfg, be, trainer, valid, first)?;
            tracing::info!(step = state.step, val_loss = loss, "evaluation");
            let sample = data.sample.map(|f| f(&trainer.model, be));
            on(&Event::Eval {
                step: state.step,
                split: EvalSplit::Validation,
                loss,
                perplexity: loss.exp(),
                sample,
            });
            // The next step's throughput is its own, not the evaluation's (as Megatron stops its
            // interval timer around an evaluation).
            last.0 = Instant::now();
        }
        let c = &cfg.checkpoint;
        if !c.save.is_empty() && c.save_interval > 0 && state.step.is_multiple_of(c.save_interval) {
            save(cfg, trainer, state, on)?;
            last.0 = Instant::now();
        }
        if let Some(why) = exit_due(t, state.step, over_time(t, started.elapsed())) {
            interrupted = true;
            on(&Event::Stopped { step: state.step, why });
            break;
        }
    }
    if !interrupted && state.step > start {
        for (split, source) in data.end_evaluations(state.step, cfg.logging.eval_interval) {
            let first = eval_first_sample(cfg, split, state.step, false);
            let loss = evaluate(cfg, be, trainer, source, first)?;
            on(&Event::Eval { step: state.step, split, loss, perplexity: loss.exp(), sample: None });
        }
    }
    let c = &cfg.checkpoint;
    // The last step is saved unless the loop just saved it (at an interval, also when a stop
    // came right after) or no step ran (the checkpoint this run started from holds it).
    let saved_now = c.save_interval > 0 && state.step.is_multiple_of(c.save_interval);
    if !c.save.is_empty() && !saved_now && state.step > start {
        save(cfg, trainer, state, on)?;
    }
    Ok(RunSummary { steps: state.step, final_loss, interrupted, skipped_steps: state.skipped_steps })
}

fn save(
    cfg: &Config,
    trainer: &Trainer,
    state: &TrainState,
    on: &mut dyn FnMut(&Event),
) -> Result<(), RunError> {
    let dir = checkpoint::save(Path::new(&cfg.checkpoint.save), state, &trainer.model, &trainer.opt)
        .map_err(|source| RunError::Save { step: state.step, source })?;
    tracing::info!(step = state.step, path = %dir.display(), "checkpoint saved");
    on(&Event::Saved { step: state.step, path: dir.display().to_string() });
    Ok(())
}

/// The first sample of `split` an evaluation at `step` reads, as Megatron's iterators move on:
/// the validation split is read in blocks of `eval_iters` global batches, the `periodic`
/// evaluation at step `k · eval_interval` reading block `k − 1`, and an evaluation at any other
/// point (the end of training, `--skip-train` on a checkpoint of step `s`) the block after the
/// last periodic one, `⌊s / eval_interval⌋` (Megatron's `consumed_valid_samples`); the test split
/// is read from its start. The validation split is sized for every block a run reads
/// (`corpus::open`); past its end the reads wrap around.
pub fn eval_first_sample(cfg: &Config, split: EvalSplit, step: u64, periodic: bool) -> u64 {
    let every = cfg.logging.eval_interval;
    if split == EvalSplit::Test || every == 0 {
        return 0;
    }
    let block = (step / every).saturating_sub(u64::from(periodic && step.is_multiple_of(every)));
    block * cfg.eval_microbatches() * cfg.train.micro_batch_size as u64
}

/// Mean loss over `eval_iters` global batches ([`Config::eval_microbatches`]) of `valid` from
/// sample `first` on ([`eval_first_sample`]).
///
/// # Errors
/// [`RunError::Train`] on bad shapes.
pub fn evaluate(
    cfg: &Config,
    be: &dyn Backend,
    trainer: &mut Trainer,
    valid: &dyn SampleSource,
    first: u64,
) -> Result<f32, RunError> {
    let (b, seq) = (cfg.train.micro_batch_size, valid.sample_tokens().saturating_sub(1));
    let mut buf = BatchBuf::default();
    let mut sum = 0.0f64;
    let n = cfg.eval_microbatches().max(1);
    for i in 0..n {
        buf.fill(valid, first + i * b as u64, b)?;
        let mb = Microbatch { tokens: &buf.tokens, targets: &buf.targets, batch: b, seq };
        sum += f64::from(trainer.eval_loss(be, &[mb])?);
    }
    Ok((sum / n as f64) as f32)
}
