//! The training loop's policies: a non-finite loss aborts with an error naming the step and the
//! microbatch, or (nan_policy = skip) skips the step leaving parameters bitwise unchanged; the
//! model rejects bad input with typed errors.

use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail, ensure};
use troupe::config::Config;
use troupe::models::Rng;
use troupe::train::TrainError;
use troupe::train::data::TokenWindows;
use troupe::train::run::{Event, RunData, RunError, prepare, run};
use troupe::{CpuBackend, Gpt, GptConfig, ModelError, StageInput};

const CFG: &str = r#"
[model]
vocab_size = 50
make_vocab_size_divisible_by = 16
seq_length = 8
num_layers = 1
hidden_size = 16
num_attention_heads = 2
[train]
micro_batch_size = 2
global_batch_size = 4
train_iters = 3
threads = 1
[logging]
eval_interval = 0
"#;

fn windows() -> TokenWindows {
    let mut rng = Rng::new(1);
    TokenWindows::new((0..500).map(|_| (rng.next_u64() % 50) as u32).collect(), 8, 2).expect("tokens")
}

#[test]
fn nan_loss_aborts_or_skips() -> Result<()> {
    let be = CpuBackend::new(1);
    let src = windows();
    let data = RunData { train: &src, valid: None, test: None, sample: None };
    let stop = AtomicBool::new(false);

    let cfg = Config::from_toml_str(CFG, "t", &[])?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    trainer.model.param_mut("ln_f.weight").expect("ln_f")[0] = f32::NAN;
    match run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |_| {}) {
        Err(RunError::Train(TrainError::NonFiniteLoss { step: 1, mb: 0, .. })) => {}
        other => bail!("expected an abort naming step 1, microbatch 0; got {other:?}"),
    }

    let cfg = Config::from_toml_str(CFG, "t", &["train.nan_policy=\"skip\"".into()])?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    trainer.model.param_mut("ln_f.weight").expect("ln_f")[0] = f32::NAN;
    let before: Vec<u32> = trainer.model.params().iter().map(|x| x.to_bits()).collect();
    let mut skipped = 0;
    let summary = run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |e| {
        if matches!(e, Event::Skipped { .. }) {
            skipped += 1;
        }
    })?;
    let after: Vec<u32> = trainer.model.params().iter().map(|x| x.to_bits()).collect();
    ensure!(skipped == 3 && summary.skipped_steps == 3, "skipped {skipped}");
    ensure!(before == after, "skipped steps changed the parameters");
    ensure!(trainer.opt.step == 0, "optimizer advanced on skipped steps");
    Ok(())
}

#[test]
fn bad_input_gives_typed_errors() -> Result<()> {
    let be = CpuBackend::new(1);
    let mut cfg = GptConfig::tiny();
    cfg.num_attention_heads = 5;
    ensure!(matches!(Gpt::new(&cfg, 0), Err(ModelError::BadConfig { field: "num_attention_heads", .. })));
    let cfg = GptConfig::tiny();
    let mut m = Gpt::new(&cfg, 0)?;
    let toks = vec![1u32; 17];
    ensure!(matches!(
        m.forward(&be, 0, 1, 17, StageInput::Tokens(&toks), None, 1.0),
        Err(ModelError::SequenceTooLong { got: 17, max: 16 })
    ));
    let mut toks = vec![1u32; 16];
    toks[5] = 50;
    ensure!(matches!(
        m.forward(&be, 0, 1, 16, StageInput::Tokens(&toks), None, 1.0),
        Err(ModelError::TokenOutOfRange { token: 50, position: 5, vocab: 50 })
    ));
    ensure!(matches!(m.backward(&be, 3, None), Err(ModelError::UnknownMicrobatch { mb: 3 })));
    ensure!(matches!(
        m.forward(&be, 0, 2, 16, StageInput::Tokens(&[1; 16]), None, 1.0),
        Err(ModelError::BadLength { what: "tokens", expected: 32, got: 16 })
    ));
    Ok(())
}

#[path = "common/scratch.rs"]
mod scratch_dir;
use scratch_dir::Scratch;

/// Each step is written once: a stop right after a step the interval saved does not save it
/// again, and a run resumed at its last step writes nothing.
#[test]
fn a_stop_after_a_saved_step_and_a_finished_resume_write_no_second_copy() -> Result<()> {
    let be = CpuBackend::new(1);
    let src = windows();
    let data = RunData { train: &src, valid: None, test: None, sample: None };
    let dir = Scratch::new("train-loop-saves");
    let save = format!("checkpoint.save={:?}", dir.display().to_string());
    let cfg = Config::from_toml_str(CFG, "t", &[save.clone(), "checkpoint.save_interval=1".into()])?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    let stop = AtomicBool::new(false);
    let mut saved = Vec::new();
    let summary = run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |e| {
        if let Event::Saved { step, .. } = e {
            saved.push(*step);
            if *step == 2 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })?;
    ensure!(summary.interrupted && summary.steps == 2, "{summary:?}");
    ensure!(saved == [1, 2], "saved steps {saved:?}, expected [1, 2]");

    // Resumed at step 2 with train_iters 2: no step, no save.
    let load = format!("checkpoint.load={:?}", dir.display().to_string());
    let cfg = Config::from_toml_str(CFG, "t", &[save, load, "train.train_iters=2".into()])?;
    let (mut trainer, mut state, resumed) = prepare(&cfg)?;
    ensure!(resumed.is_some() && state.step == 2, "did not resume at step 2");
    let stop = AtomicBool::new(false);
    let mut saved = Vec::new();
    run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |e| {
        if let Event::Saved { step, .. } = e {
            saved.push(*step);
        }
    })?;
    ensure!(saved.is_empty(), "a resume with nothing to train saved {saved:?}");
    Ok(())
}

/// Held-out evaluations: the validation split every `eval_interval` steps and once more when
/// training ends between two of them, the test split once at the end (its loss is the final
/// model's on the test samples), none at the end of a stopped run.
#[test]
fn validation_runs_at_its_interval_and_at_the_end_and_test_once_at_the_end() -> Result<()> {
    use troupe::train::run::{EvalSplit, evaluate};
    let be = CpuBackend::new(1);
    let src = windows();
    let mut rng = Rng::new(9);
    let held =
        TokenWindows::new((0..300).map(|_| (rng.next_u64() % 50) as u32).collect(), 8, 2).expect("tokens");
    let mut rng = Rng::new(10);
    let test =
        TokenWindows::new((0..300).map(|_| (rng.next_u64() % 50) as u32).collect(), 8, 2).expect("tokens");
    let data = RunData { train: &src, valid: Some(&held), test: Some(&test), sample: None };
    for (iters, want) in [
        (3u64, vec![(2u64, EvalSplit::Validation), (3, EvalSplit::Validation), (3, EvalSplit::Test)]),
        (4, vec![(2, EvalSplit::Validation), (4, EvalSplit::Validation), (4, EvalSplit::Test)]),
    ] {
        let sets = [
            format!("train.train_iters={iters}"),
            "logging.eval_interval=2".into(),
            "logging.eval_iters=2".into(),
        ];
        let cfg = Config::from_toml_str(CFG, "t", &sets)?;
        let (mut trainer, mut state, _) = prepare(&cfg)?;
        let stop = AtomicBool::new(false);
        let mut got = Vec::new();
        let mut test_loss = None;
        run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |e| {
            if let Event::Eval { step, split, loss, .. } = e {
                got.push((*step, *split));
                if *split == EvalSplit::Test {
                    test_loss = Some(*loss);
                }
            }
        })?;
        ensure!(got == want, "{iters} steps: evaluations {got:?}, expected {want:?}");
        let again = evaluate(&cfg, &be, &mut trainer, &test, 0)?;
        ensure!(test_loss.map(f32::to_bits) == Some(again.to_bits()), "test loss {test_loss:?} vs {again}");
    }
    // A run stopped after its first step evaluates nothing at its end.
    let cfg = Config::from_toml_str(CFG, "t", &["logging.eval_interval=2".into()])?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    let stop = AtomicBool::new(false);
    let mut evals = 0;
    run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |e| match e {
        Event::Step { .. } => stop.store(true, std::sync::atomic::Ordering::SeqCst),
        Event::Eval { .. } => evals += 1,
        _ => {}
    })?;
    ensure!(evals == 0, "a stopped run evaluated {evals} times");
    Ok(())
}

/// `exit_interval` stops the loop after a multiple of it (saving once, evaluating nothing at the
/// end), a resume goes on to the next multiple, and the last step is never cut short;
/// `exit_duration_in_mins` stops after the first step past it.
#[test]
fn exit_interval_and_duration_stop_training_early_and_save() -> Result<()> {
    let be = CpuBackend::new(1);
    let src = windows();
    let held = windows();
    let data = RunData { train: &src, valid: Some(&held), test: Some(&held), sample: None };
    let dir = Scratch::new("train-loop-exit");
    let save = format!("checkpoint.save={:?}", dir.display().to_string());
    let load = format!("checkpoint.load={:?}", dir.display().to_string());
    let mut stops = Vec::new();
    for round in 0..3 {
        let mut sets = vec![save.clone(), "train.train_iters=6".into(), "train.exit_interval=3".into()];
        sets.push("logging.eval_interval=100".into());
        if round > 0 {
            sets.push(load.clone());
        }
        let cfg = Config::from_toml_str(CFG, "t", &sets)?;
        let (mut trainer, mut state, _) = prepare(&cfg)?;
        let stop = AtomicBool::new(false);
        let (mut saved, mut evals, mut why) = (Vec::new(), 0, None);
        let summary = run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |e| match e {
            Event::Saved { step, .. } => saved.push(*step),
            Event::Eval { .. } => evals += 1,
            Event::Stopped { why: w, .. } => why = Some(w.clone()),
            _ => {}
        })?;
        stops.push((summary.steps, summary.interrupted, saved, evals, why));
    }
    let reached = Some("--exit-interval 3 reached".to_string());
    ensure!(stops[0] == (3, true, vec![3], 0, reached.clone()), "first run: {:?}", stops[0]);
    // Step 6 is the last: it is not cut short, so the end-of-training evaluations run.
    ensure!(stops[1] == (6, false, vec![6], 2, None), "resumed run: {:?}", stops[1]);
    ensure!(stops[2] == (6, false, vec![], 0, None), "finished run: {:?}", stops[2]);

    let cfg = Config::from_toml_str(CFG, "t", &["train.exit_duration_in_mins=1e-9".into()])?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    let stop = AtomicBool::new(false);
    let summary = run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |_| {})?;
    ensure!(summary.interrupted && summary.steps == 1, "{summary:?}");
    Ok(())
}

/// `checkpoint.finetune`: the checkpoint's weights only. Training starts at step 0 with zero
/// moments and the data from its start, and gives, bit for bit, the losses of a fresh run whose
/// initial weights are set to the checkpoint's by hand. Without it the same load resumes.
#[test]
fn finetune_takes_the_weights_and_starts_over() -> Result<()> {
    let be = CpuBackend::new(1);
    let src = windows();
    let data = RunData { train: &src, valid: None, test: None, sample: None };
    let dir = Scratch::new("train-loop-finetune");
    let save = format!("checkpoint.save={:?}", dir.display().to_string());
    let cfg = Config::from_toml_str(CFG, "t", &[save])?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    let stop = AtomicBool::new(false);
    run(&cfg, &be, &mut trainer, &mut state, &data, &stop, &mut |_| {})?;
    let pretrained = trainer.model.params().to_vec();

    let losses =
        |trainer: &mut troupe::train::Trainer, state: &mut troupe::checkpoint::TrainState, cfg: &Config| {
            let mut out = Vec::new();
            run(cfg, &be, trainer, state, &data, &stop, &mut |e| {
                if let Event::Step { loss, .. } = e {
                    out.push(loss.to_bits());
                }
            })
            .map(|_| out)
        };
    let load = format!("checkpoint.load={:?}", dir.display().to_string());
    let sets = [load.clone(), "checkpoint.finetune=true".into(), "train.train_iters=2".into()];
    let cfg = Config::from_toml_str(CFG, "t", &sets)?;
    let (mut ft, mut ft_state, from) = prepare(&cfg)?;
    ensure!(from.is_some(), "finetune loaded nothing");
    ensure!(ft_state.step == 0 && ft_state.consumed_samples == 0, "finetune starts at {ft_state:?}");
    ensure!(ft.opt.step == 0 && ft.opt.m.iter().chain(&ft.opt.v).all(|&x| x == 0.0), "moments not fresh");
    ensure!(ft.model.params() == pretrained.as_slice(), "finetune did not take the checkpoint's weights");
    let got = losses(&mut ft, &mut ft_state, &cfg)?;

    let cfg = Config::from_toml_str(CFG, "t", &["train.train_iters=2".into()])?;
    let (mut fresh, mut fresh_state, _) = prepare(&cfg)?;
    fresh.model.params_and_grads_mut().0.copy_from_slice(&pretrained);
    let want = losses(&mut fresh, &mut fresh_state, &cfg)?;
    ensure!(got.len() == 2 && got == want, "finetune losses {got:?} vs {want:?}");

    // The same load without finetune resumes at step 3 with its moments.
    let cfg = Config::from_toml_str(CFG, "t", &[load, "train.train_iters=4".into()])?;
    let (resumed, resumed_state, _) = prepare(&cfg)?;
    ensure!(resumed_state.step == 3 && resumed.opt.step == 3, "resume at {}", resumed_state.step);
    Ok(())
}

/// Each evaluation reads the next `eval_iters` global batches of the validation split, as
/// Megatron's iterator moves on: with the weights held still (learning rate 0), the evaluations
/// at steps 2, 4 and the end (5) are the blocks from samples 0, 8 and 16, and differ; the test
/// split is read from its start; `--skip-train` on step 4 reads the block after step 4's.
#[test]
fn evaluations_move_on_through_the_validation_split() -> Result<()> {
    use troupe::train::run::{EvalSplit, eval_first_sample, evaluate};
    let be = CpuBackend::new(1);
    let held = windows();
    let sets = [
        "train.train_iters=5".to_string(),
        "train.lr=0".into(),
        "train.min_lr=0".into(),
        "logging.eval_interval=2".into(),
        "logging.eval_iters=2".into(),
    ];
    let cfg = Config::from_toml_str(CFG, "t", &sets)?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    let src = windows();
    let data = RunData { train: &src, valid: Some(&held), test: Some(&held), sample: None };
    let mut got = Vec::new();
    run(&cfg, &be, &mut trainer, &mut state, &data, &AtomicBool::new(false), &mut |e| {
        if let Event::Eval { step, split, loss, .. } = e {
            got.push((*step, *split, *loss));
        }
    })?;
    let g = cfg.train.global_batch_size as u64;
    ensure!(g == 4, "the test expects a global batch of 4, not {g}");
    let valid = EvalSplit::Validation;
    let want = [(2, valid, 0), (4, valid, 2 * g), (5, valid, 4 * g), (5, EvalSplit::Test, 0)];
    ensure!(got.len() == want.len(), "evaluations {got:?}");
    for (&(step, split, loss), &(want_step, want_split, first)) in got.iter().zip(&want) {
        ensure!((step, split) == (want_step, want_split), "{got:?}");
        ensure!(eval_first_sample(&cfg, split, step, split == valid && step % 2 == 0) == first, "{step}");
        let again = evaluate(&cfg, &be, &mut trainer, &held, first)?;
        ensure!(
            again.to_bits() == loss.to_bits(),
            "step {step} {split:?}: {loss} vs samples from {first}: {again}"
        );
    }
    ensure!(got[0].2 != got[1].2 && got[1].2 != got[2].2, "the blocks gave one loss: {got:?}");
    // `--skip-train` on a checkpoint of step 4: Megatron's consumed_valid_samples, 2 blocks.
    ensure!(eval_first_sample(&cfg, valid, 4, false) == 4 * g);
    ensure!(eval_first_sample(&cfg, EvalSplit::Test, 4, false) == 0);
    Ok(())
}

/// A step's reported throughput is its own: the time an evaluation takes (here a text sample
/// that waits 400 ms) is not charged to the step after it, as Megatron stops its interval timer
/// around an evaluation. The tiny model's steps take milliseconds, so the margin is wide.
#[test]
fn the_step_after_an_evaluation_is_not_charged_for_it() -> Result<()> {
    let be = CpuBackend::new(1);
    let (src, held) = (windows(), windows());
    let slow = |_: &Gpt, _: &dyn troupe::Backend| -> String {
        std::thread::sleep(std::time::Duration::from_millis(400));
        String::new()
    };
    let data = RunData { train: &src, valid: Some(&held), test: None, sample: Some(&slow) };
    let sets =
        ["train.train_iters=4".to_string(), "logging.eval_interval=2".into(), "logging.eval_iters=1".into()];
    let cfg = Config::from_toml_str(CFG, "t", &sets)?;
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    let mut rates = Vec::new();
    let mut evals = 0;
    run(&cfg, &be, &mut trainer, &mut state, &data, &AtomicBool::new(false), &mut |e| match e {
        Event::Step { step, tokens_per_s, .. } => rates.push((*step, *tokens_per_s)),
        Event::Eval { .. } => evals += 1,
        _ => {}
    })?;
    ensure!(evals == 2, "{evals} evaluations");
    let tokens = (cfg.train.global_batch_size * cfg.model.seq_length) as f64;
    let (step, rate) = rates[2];
    ensure!(step == 3, "{rates:?}");
    ensure!(
        tokens / rate < 0.4,
        "step 3 took {:.3} s by its throughput: the evaluation's 0.4 s were charged",
        tokens / rate
    );
    Ok(())
}

/// An evaluation covers `eval_iters` global batches, as Megatron's does: one iteration of a
/// 4-sequence global batch in 2-sequence microbatches is the same samples, and the same loss to
/// the bit, as two iterations of 2-sequence global batches; one iteration of those is not.
#[test]
fn an_evaluation_covers_eval_iters_global_batches() -> Result<()> {
    use troupe::train::run::evaluate;
    let be = CpuBackend::new(1);
    let held = windows();
    let loss = |sets: &[&str]| -> Result<f32> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = Config::from_toml_str(CFG, "t", &sets)?;
        let (mut trainer, _, _) = prepare(&cfg)?;
        Ok(evaluate(&cfg, &be, &mut trainer, &held, 0)?)
    };
    let one_of_four = loss(&["logging.eval_iters=1"])?;
    let two_of_two = loss(&["logging.eval_iters=2", "train.global_batch_size=2"])?;
    let one_of_two = loss(&["logging.eval_iters=1", "train.global_batch_size=2"])?;
    ensure!(one_of_four.to_bits() == two_of_two.to_bits(), "{one_of_four} vs {two_of_two}");
    ensure!(one_of_four != one_of_two, "one microbatch gave the loss of two: {one_of_two}");
    Ok(())
}
