//! `troupe train --skip-train` (Megatron's): evaluate the model `--load` names on the validation
//! and test splits, as a run does when it ends, and exit without training or saving. On the CPU,
//! or on one GPU (`--device cuda|emu`, the GPU loop's evaluation).

use indicatif::ProgressBar;
use troupe::checkpoint;
use troupe::comm::env::LaunchEnv;
use troupe::config::Config;
use troupe::kernels::{Backend, CpuBackend};
use troupe::train::run::{self, EvalSplit, Event};
use troupe::train::{Trainer, corpus};

use troupe::data::SampleSource;
use troupe::gpu::Gpu;

use super::UsageError;
use super::train::{OpenGpu, RunLogs, TrainArgs, report};

/// Evaluates and prints `step N | validation loss … | perplexity …` (and the test split's line),
/// with the same records in `--log-json`.
pub fn evaluate_only(args: &TrainArgs, cfg: &Config, launched: Option<&LaunchEnv>) -> anyhow::Result<()> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    if launched.is_some() {
        return Err(usage(
            "--skip-train evaluates in one process (the whole model on one device, whatever the \
             parallel layout): start it without a launcher"
                .into(),
        ));
    }
    if cfg.checkpoint.finetune {
        return Err(usage("--skip-train and --finetune: give one (--skip-train trains nothing)".into()));
    }
    if cfg.logging.eval_iters == 0 {
        return Err(usage("--skip-train with --eval-iters 0: nothing to evaluate".into()));
    }
    // Evaluation is what this run is for, whatever the interval says.
    let mut cfg = cfg.clone();
    cfg.logging.eval_interval = cfg.logging.eval_interval.max(1);
    let cfg = &cfg;
    let data = corpus::open(cfg).map_err(|e| usage(e.to_string()))?;
    let splits: Vec<_> =
        [(EvalSplit::Validation, data.valid.as_deref()), (EvalSplit::Test, data.test.as_deref())]
            .into_iter()
            .filter_map(|(split, source)| source.map(|s| (split, s)))
            .collect();
    if splits.is_empty() {
        let why = data.valid_note.as_deref().unwrap_or("the split leaves no validation or test documents");
        return Err(usage(format!(
            "--skip-train: nothing to evaluate on {} with --split {}: {why}",
            data.description, cfg.data.split
        )));
    }
    if let (None, Some(note)) = (&data.valid, &data.valid_note) {
        eprintln!("troupe: note: no validation loss: {note}");
    }
    let (model, step, from) = match cfg.checkpoint.load.as_str() {
        "" => {
            eprintln!(
                "troupe: note: --skip-train without --load evaluates the initial weights of seed {}",
                cfg.train.seed
            );
            (
                troupe::Gpt::new(&cfg.model, cfg.train.seed)?,
                0,
                format!("a new model (seed {})", cfg.train.seed),
            )
        }
        load => {
            let bad = |e: checkpoint::CheckpointError| usage(format!("--load {load}: {e}"));
            let dir = checkpoint::resolve(std::path::Path::new(load))
                .map_err(bad)?
                .ok_or_else(|| usage(format!("--load {load}: no checkpoint there")))?;
            let loaded = checkpoint::load_model(&dir).map_err(bad)?;
            loaded.check_shape(cfg).map_err(bad)?;
            let mut model = troupe::Gpt::new_zeroed(&cfg.model)?;
            loaded.restore(&mut model, None).map_err(bad)?;
            (model, loaded.state.step, dir.display().to_string())
        }
    };
    let t = &cfg.train;
    let mut trainer = Trainer::with_model(cfg, model);
    let be = CpuBackend::new(t.threads);
    let gpu = OpenGpu::open(args.device, 0)?;
    let on = match &gpu {
        None => format!("{} threads", be.threads()),
        Some(g) => g.describe(),
    };
    eprintln!(
        "troupe: evaluating {from} (step {step}) on {} with {on}: {} microbatch(es) of {} × {} tokens per split",
        data.description,
        cfg.eval_microbatches(),
        t.micro_batch_size,
        cfg.model.seq_length
    );
    let mut logs = RunLogs::open(cfg, true)?;
    // Each split from where Megatron's iterators stand at this step (`eval_first_sample`).
    let sources: Vec<(&dyn SampleSource, u64)> =
        splits.iter().map(|(split, s)| (*s, run::eval_first_sample(cfg, *split, step, false))).collect();
    let dtype = args.dtype.into();
    let losses = match &gpu {
        None => {
            let mut eval =
                |&(s, first): &(&dyn SampleSource, u64)| run::evaluate(cfg, &be, &mut trainer, s, first);
            sources.iter().map(&mut eval).collect::<Result<_, _>>()?
        }
        Some(OpenGpu::Cuda(g)) => on_gpu(g.as_ref(), cfg, &trainer, dtype, &sources)?,
        Some(OpenGpu::Emu(g)) => on_gpu(g, cfg, &trainer, dtype, &sources)?,
    };
    let bar = ProgressBar::hidden();
    for ((split, _), loss) in splits.into_iter().zip(losses) {
        let e = Event::Eval { step, split, loss, perplexity: loss.exp(), sample: None };
        report(&e, &bar, cfg, &mut logs);
    }
    Ok(())
}

/// The losses of `sources` with the model on `gpu`, as the GPU training loop evaluates.
fn on_gpu<G: Gpu>(
    gpu: &G,
    cfg: &Config,
    trainer: &Trainer,
    dtype: troupe::gpu::DType,
    sources: &[(&dyn SampleSource, u64)],
) -> anyhow::Result<Vec<f32>> {
    let mut model = troupe::gpu::train::upload(gpu, cfg, trainer, dtype)
        .map_err(|e| UsageError(format!("putting the model on the GPU: {e}")))?;
    sources.iter().map(|&(s, first)| Ok(troupe::gpu::train::evaluate(cfg, &mut model, s, first)?)).collect()
}
