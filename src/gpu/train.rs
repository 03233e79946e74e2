//! The single-GPU training loop: the CPU loop's semantics (`crate::train::run`: gradient
//! accumulation, the LR schedule, the NaN policy, evaluation, checkpoints on an interval and on
//! SIGINT/SIGTERM, resume) with the model on a [`Gpu`].
//!
//! Checkpoints stay in the single-rank format: at a save the fp32 master weights and the AdamW
//! moments are downloaded into the CPU [`Trainer`] and written by `crate::checkpoint`, so a GPU
//! run resumes on the CPU and the other way round. Evaluation samples text with the CPU model
//! after the same download.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::dp::DeviceComm;
use super::model::GpuGpt;
use super::{DType, Dev, Gpu, GpuError};
use crate::checkpoint::{self, TrainState};
use crate::config::{Config, NanPolicy};
use crate::kernels::Backend;
use crate::optim::LrSchedule;
use crate::train::Trainer;
use crate::train::data::BatchBuf;
use crate::train::run::{
    EvalSplit, Event, RunData, RunError, RunSummary, eval_first_sample, exit_due, over_time,
};

/// Errors of a GPU run: the CPU loop's, or the device's.
#[derive(Debug, thiserror::Error)]
pub enum GpuRunError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// Uploads a (possibly resumed) CPU trainer to the GPU.
pub fn upload<'g, G: Gpu>(
    gpu: &'g G,
    cfg: &Config,
    trainer: &Trainer,
    dtype: DType,
) -> Result<GpuGpt<'g, G>, GpuError> {
    let mut model = GpuGpt::from_params(gpu, &cfg.model, trainer.model.params(), dtype)?;
    model.set_optimizer_state(&trainer.opt.m, &trainer.opt.v, trainer.opt.step)?;
    Ok(model)
}

/// Copies the GPU model's master weights and optimizer state into the CPU trainer.
pub fn download<G: Gpu>(model: &GpuGpt<'_, G>, trainer: &mut Trainer) -> Result<(), GpuError> {
    let params = model.params_host()?;
    trainer.model.params_mut().copy_from_slice(&params);
    let (m, v) = model.moments_host()?;
    trainer.opt.m = m;
    trainer.opt.v = v;
    trainer.opt.step = model.steps();
    Ok(())
}

/// Runs training from `state` to `cfg.train.train_iters` on the GPU. `trainer` is the CPU side
/// used for checkpoints and text samples (kept in sync at those points only).
///
/// With `dp`, this is one data-parallel rank: it takes its microbatches of each global batch in
/// Megatron's order (the CPU runtime's), all-reduces each gradient range as the last
/// microbatch's backward finishes it (overlapping the rest of the backward on a GPU), and agrees
/// with the other ranks on the loss and on skipping a step with a non-finite loss. Only
/// data-parallel rank 0 evaluates and writes checkpoints (every rank holds the same parameters).
///
/// # Errors
/// A non-finite loss under the `abort` policy, bad data, a failed checkpoint write, or a device
/// error.
#[allow(clippy::too_many_arguments)]
pub fn run<G: Gpu>(
    cfg: &Config,
    model: &mut GpuGpt<'_, G>,
    cpu: &dyn Backend,
    trainer: &mut Trainer,
    state: &mut TrainState,
    data: &RunData<'_>,
    stop: &AtomicBool,
    dp: Option<&dyn DeviceComm<G>>,
    on: &mut dyn FnMut(&Event),
) -> Result<RunSummary, GpuRunError> {
    if data.train.num_samples() == 0 {
        return Err(RunError::NoData("no training samples").into());
    }
    let t = &cfg.train;
    let sched = LrSchedule::from_train(t);
    let adam = cfg.train.adamw();
    let (dp_rank, dp_size) = dp.map_or((0, 1), |c| (c.rank(), c.size()));
    let mb_size = t.micro_batch_size;
    let accum = cfg.accumulation_steps() / dp_size;
    if accum == 0 || accum * dp_size != cfg.accumulation_steps() {
        return Err(GpuError::Shape {
            op: "data-parallel GPU training",
            detail: format!(
                "global batch {} is not a multiple of micro-batch {mb_size} × {dp_size} data-parallel ranks",
                t.global_batch_size
            ),
        }
        .into());
    }
    let gpu = model.gpu();
    let stats = gpu.alloc(4 * std::mem::size_of::<f32>())?;
    let seq = data.train.sample_tokens().saturating_sub(1);
    let mut bufs: Vec<BatchBuf> = (0..accum).map(|_| BatchBuf::default()).collect();
    let started = Instant::now();
    let mut last = (Instant::now(), state.step);
    let mut final_loss = f32::NAN;
    let mut interrupted = false;
    let start = state.step;
    while state.step < t.train_iters {
        // Data-parallel ranks agree on a stop in the step's all-reduce below (a signal reaches
        // them at slightly different times; a rank that left the loop alone would leave the
        // others waiting in the next step's reduction).
        if dp.is_none() && stop.load(Ordering::SeqCst) {
            interrupted = true;
            on(&Event::Interrupted { step: state.step });
            break;
        }
        for (i, buf) in bufs.iter_mut().enumerate() {
            let first = state.consumed_samples + ((i * dp_size + dp_rank) * mb_size) as u64;
            buf.fill(data.train, first, mb_size).map_err(RunError::from)?;
        }
        let lr = sched.lr(state.step);
        model.zero_grads()?;
        // Gradients are summed over the data-parallel ranks, so each rank scales by the whole
        // step's microbatch count.
        let scale = 1.0 / (accum * dp_size) as f32;
        let gdt = model.grad_dtype();
        // The losses stay on the device until every microbatch's backward is queued: no host
        // sync between a forward and its backward.
        for (i, b) in bufs.iter().enumerate() {
            model.forward_deferred(&b.tokens, &b.targets, mb_size, seq, scale)?;
            match dp.filter(|_| i + 1 == accum) {
                Some(comm) => model.backward_with(&mut |range, grads| {
                    comm.all_reduce_sum(gpu, Dev::new(grads).at(range.start, gdt), range.len(), gdt)
                })?,
                None => model.backward()?,
            }
        }
        let mut loss_sum = 0.0f64;
        let mut bad = None;
        for (i, loss) in model.take_losses()?.into_iter().enumerate() {
            if !loss.is_finite() && bad.is_none() {
                bad = Some((i, loss));
            }
            loss_sum += f64::from(loss);
        }
        let mut loss = (loss_sum / accum as f64) as f32;
        // Past --exit-duration-in-mins by this rank's clock; the ranks agree below, so all of
        // them stop after the same step.
        let mut late = over_time(t, started.elapsed());
        let mut asked = false;
        if let Some(comm) = dp {
            comm.finish(gpu)?;
            // Agree on the loss, on whether any rank saw a non-finite one, on the time limit and
            // on a stop asked for by a signal.
            let flag = if bad.is_some() { 1.0f32 } else { 0.0 };
            let signalled = stop.load(Ordering::SeqCst);
            let mine = [
                if bad.is_some() { 0.0 } else { loss },
                flag,
                f32::from(u8::from(late)),
                f32::from(u8::from(signalled)),
            ];
            gpu.write(Dev::new(&stats), bytemuck::cast_slice(&mine))?;
            comm.all_reduce_sum(gpu, Dev::new(&stats), 4, DType::F32)?;
            comm.finish(gpu)?;
            let all = super::download_f32(gpu, Dev::new(&stats), 4, DType::F32)?;
            loss = all[0] / dp_size as f32;
            if all[1] > 0.0 && bad.is_none() {
                bad = Some((usize::MAX, f32::NAN));
            }
            late = all[2] > 0.0;
            asked = all[3] > 0.0;
        }
        state.step += 1;
        state.consumed_samples += t.global_batch_size as u64;
        match bad {
            None => {
                let grad_norm = model.step(lr, &adam, t.clip_grad)?;
                final_loss = loss;
                let now = Instant::now();
                let secs = now.duration_since(last.0).as_secs_f64().max(1e-9);
                let tokens = (state.step - last.1) as f64 * (t.global_batch_size * seq) as f64;
                last = (now, state.step);
                on(&Event::Step {
                    step: state.step,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_s: tokens / secs,
                    elapsed_s: started.elapsed().as_secs_f64(),
                });
            }
            Some((microbatch, loss)) if t.nan_policy == NanPolicy::Skip => {
                state.skipped_steps += 1;
                tracing::warn!(step = state.step, microbatch, loss, "non-finite loss: step skipped");
                on(&Event::Skipped { step: state.step, microbatch, loss });
            }
            Some((mb, loss)) => {
                let e = crate::train::TrainError::NonFiniteLoss { step: state.step, mb, loss };
                return Err(RunError::Train(e).into());
            }
        }
        let l = &cfg.logging;
        if let Some(valid) = data
            .valid
            .filter(|_| dp_rank == 0 && l.eval_interval > 0 && state.step.is_multiple_of(l.eval_interval))
        {
            let first = eval_first_sample(cfg, EvalSplit::Validation, state.step, true);
            let loss = evaluate(cfg, model, valid, first)?;
            let sample = match data.sample {
                Some(f) => {
                    download(model, trainer)?;
                    Some(f(&trainer.model, cpu))
                }
                None => None,
            };
            on(&Event::Eval {
                step: state.step,
                split: EvalSplit::Validation,
                loss,
                perplexity: loss.exp(),
                sample,
            });
            // The next step's throughput is its own, not the evaluation's (the CPU loop's rule).
            last.0 = Instant::now();
        }
        let c = &cfg.checkpoint;
        if dp_rank == 0
            && !c.save.is_empty()
            && c.save_interval > 0
            && state.step.is_multiple_of(c.save_interval)
        {
            save(cfg, model, trainer, state, on)?;
            last.0 = Instant::now();
        }
        if asked && state.step < t.train_iters {
            interrupted = true;
            on(&Event::Interrupted { step: state.step });
            break;
        }
        if let Some(why) = exit_due(t, state.step, late) {
            interrupted = true;
            on(&Event::Stopped { step: state.step, why });
            break;
        }
    }
    if dp_rank == 0 && !interrupted && state.step > start {
        for (split, source) in data.end_evaluations(state.step, cfg.logging.eval_interval) {
            let first = eval_first_sample(cfg, split, state.step, false);
            let loss = evaluate(cfg, model, source, first)?;
            on(&Event::Eval { step: state.step, split, loss, perplexity: loss.exp(), sample: None });
        }
    }
    let c = &cfg.checkpoint;
    // The last step is saved unless the loop just saved it (at an interval, also when a stop
    // came right after) or no step ran (the checkpoint this run started from holds it).
    let saved_now = c.save_interval > 0 && state.step.is_multiple_of(c.save_interval);
    if dp_rank == 0 && !c.save.is_empty() && !saved_now && state.step > start {
        save(cfg, model, trainer, state, on)?;
    }
    Ok(RunSummary { steps: state.step, final_loss, interrupted, skipped_steps: state.skipped_steps })
}

fn save<G: Gpu>(
    cfg: &Config,
    model: &GpuGpt<'_, G>,
    trainer: &mut Trainer,
    state: &TrainState,
    on: &mut dyn FnMut(&Event),
) -> Result<(), GpuRunError> {
    download(model, trainer)?;
    let dir = checkpoint::save(Path::new(&cfg.checkpoint.save), state, &trainer.model, &trainer.opt)
        .map_err(RunError::from)?;
    on(&Event::Saved { step: state.step, path: dir.display().to_string() });
    Ok(())
}

/// Mean loss over `eval_iters` global batches of `valid` from sample `first` on (the CPU loop's
/// samples: [`eval_first_sample`]).
pub fn evaluate<G: Gpu>(
    cfg: &Config,
    model: &mut GpuGpt<'_, G>,
    valid: &dyn crate::data::SampleSource,
    first: u64,
) -> Result<f32, GpuRunError> {
    let (b, seq) = (cfg.train.micro_batch_size, valid.sample_tokens().saturating_sub(1));
    let mut buf = BatchBuf::default();
    let mut sum = 0.0f64;
    let n = cfg.eval_microbatches().max(1);
    for i in 0..n {
        buf.fill(valid, first + i * b as u64, b).map_err(RunError::from)?;
        sum += f64::from(model.eval_loss(&buf.tokens, &buf.targets, b, seq)?);
    }
    Ok((sum / n as f64) as f32)
}
