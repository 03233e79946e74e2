//! The actor runtime's behaviour beyond equivalence: failure attribution without hangs, traces of
//! real runs with the measured and predicted bubble, replaying a recorded message order, the
//! distributed optimizer's memory, and agreeing to stop.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use troupe::config::Config;
use troupe::data::SampleSource;
use troupe::models::Rng;
use troupe::runtime::faults::FaultPlan;
use troupe::runtime::{
    Plan, RunOptions, RuntimeError, bubble_report, replay_order, trace_of, train_inproc, train_inproc_all,
};
use troupe::schedule::OpKind;
use troupe::trace::{Trace, recorded_program};
use troupe::train::data::TokenWindows;

#[path = "common/scratch.rs"]
mod scratch;
use scratch::Scratch;

const CONFIG: &str = r#"
[model]
vocab_size = 61
make_vocab_size_divisible_by = 16
seq_length = 16
num_layers = 4
hidden_size = 32
num_attention_heads = 4

[train]
micro_batch_size = 2
global_batch_size = 8
train_iters = 3
lr = 1e-3
seed = 5

[logging]
eval_interval = 0

[checkpoint]
save = ""
"#;

fn setup<S: AsRef<str>>(sets: &[S]) -> Result<(Config, Arc<dyn SampleSource>)> {
    let sets: Vec<String> = sets.iter().map(|s| s.as_ref().to_string()).collect();
    let cfg = Config::from_toml_str(CONFIG, "test", &sets)?;
    let mut rng = Rng::derived(1, "actors-data");
    let tokens: Vec<u32> = (0..3000).map(|_| (rng.next_u64() % 61) as u32).collect();
    Ok((cfg, Arc::new(TokenWindows::new(tokens, 16, 2).expect("tokens"))))
}

fn opts(timeout_s: u64) -> RunOptions {
    RunOptions { timeout: Duration::from_secs(timeout_s), ..RunOptions::default() }
}

#[test]
fn a_failing_actor_is_named_and_its_peers_do_not_hang() -> Result<()> {
    let (cfg, data) = setup(&["parallel.pipeline_model_parallel_size=2"])?;
    let plan = Plan::new(&cfg, 2)?;
    let instruction = plan.program.ranks[1].iter().position(|op| op.kind() == OpKind::Forward).unwrap_or(0);
    let timeout = 2;
    let crash = format!("crash:rank=1,step=2,instruction={instruction}").parse()?;
    let o = RunOptions { faults: FaultPlan { faults: vec![crash], seed: 1 }, ..opts(timeout) };
    let t0 = Instant::now();
    let all = train_inproc_all(&cfg, data.clone(), o.clone(), 2, None, None)?;
    let took = t0.elapsed();
    ensure!(took < Duration::from_secs(timeout + 6), "took {took:?}: something waited past the timeout");
    let failed = match &all[1] {
        Err(e) => e.to_string(),
        Ok(_) => anyhow::bail!("rank 1 should have failed"),
    };
    for want in ["rank 1", "step 2", "stage[0]", "injected failure", &format!("#{instruction}")] {
        ensure!(failed.contains(want), "rank 1's error lacks `{want}`: {failed}");
    }
    let peer = match &all[0] {
        Err(e) => e.to_string(),
        Ok(_) => anyhow::bail!("rank 0 should have failed too"),
    };
    ensure!(peer.contains("rank 0") && peer.contains("peer 1"), "rank 0's error should name peer 1: {peer}");
    // The root cause reported for the run is rank 1's failure, not rank 0's timeout.
    let root = train_inproc(&cfg, data, o, 2, None, None).expect_err("fails").to_string();
    ensure!(root.contains("injected failure"), "root cause: {root}");
    Ok(())
}

/// A rank whose peer hangs times out waiting for its message and names the rank it waited for
/// (world ranks); the hung rank reports itself, and that report is the run's root cause.
#[test]
fn a_receive_that_times_out_names_the_rank_it_waited_for() -> Result<()> {
    let (cfg, data) = setup(&["parallel.pipeline_model_parallel_size=2"])?;
    let hang = "hang:rank=1,step=2".parse()?;
    let o = RunOptions { faults: FaultPlan { faults: vec![hang], seed: 1 }, ..opts(1) };
    let all = train_inproc_all(&cfg, data.clone(), o.clone(), 2, None, None)?;
    let waited = match &all[0] {
        Err(e) => e.to_string(),
        Ok(_) => anyhow::bail!("rank 0 should have failed"),
    };
    // Named by the communicator's timeout (`waiting for peer 1`) or, should the message never be
    // posted there, by the mailbox's (`from rank 1 arrived within`).
    ensure!(
        waited.contains("waiting for peer 1") || waited.contains("from rank 1 arrived within"),
        "rank 0's error should name rank 1: {waited}"
    );
    let root = train_inproc(&cfg, data, o, 2, None, None).expect_err("fails").to_string();
    ensure!(root.starts_with("rank 1,") && root.contains("no progress"), "root cause: {root}");
    Ok(())
}

#[test]
fn traces_of_real_runs_replay_and_compare_with_the_simulator() -> Result<()> {
    let (cfg, data) =
        setup(&["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=\"1f1b\""])?;
    let plan = Plan::new(&cfg, 2)?;
    let o = RunOptions { trace_step: Some(3), ..opts(30) };
    let results = train_inproc(&cfg, data.clone(), o, 2, None, None)?;
    let trace = trace_of(&plan, &results[0].events);
    let m = plan.microbatches;
    for (kind, want) in
        [(OpKind::Forward, 2 * m), (OpKind::Backward, 2 * m), (OpKind::SendAct, m), (OpKind::RecvGrad, m)]
    {
        let n = trace.events.iter().filter(|e| e.kind == kind).count();
        ensure!(n == want, "{} {kind:?} events, expected {want}", n);
    }
    ensure!(trace.events.iter().any(|e| e.kind == OpKind::OptimizerStep), "optimizer step recorded");
    // The recorded order is the program's compute order.
    let recorded = recorded_program(&trace)?;
    ensure!(
        recorded.compute_only() == plan.program.compute_only(),
        "recorded order differs from the program"
    );
    // Native and Chrome forms round-trip.
    ensure!(Trace::from_native(&trace.to_native())?.events.len() == trace.events.len());
    let chrome = troupe::trace::to_chrome(&trace);
    ensure!(troupe::trace::from_chrome(&chrome)?.events.len() >= trace.events.len() / 2);
    let b = bubble_report(&plan, &trace)?;
    ensure!(b.measured.is_finite() && b.measured >= 0.0 && b.predicted > 0.0, "{b:?}");

    // Replaying the recorded message order gives the same training, bit for bit.
    let order = replay_order(&trace);
    ensure!(order.iter().map(Vec::len).sum::<usize>() == 2 * m, "one entry per received message");
    let replayed =
        train_inproc(&cfg, data, RunOptions { replay_order: Some(order), ..opts(30) }, 2, None, None)?;
    for (a, b) in results.iter().zip(&replayed) {
        ensure!(a.chunks.iter().map(|c| &c.2).eq(b.chunks.iter().map(|c| &c.2)), "replay changed the result");
    }
    Ok(())
}

#[test]
fn the_distributed_optimizer_shards_state_over_data_parallel_ranks() -> Result<()> {
    let bytes = |dist: bool| -> Result<Vec<usize>> {
        let (cfg, data) = setup(&[
            "parallel.data_parallel_size=2",
            &format!("parallel.use_distributed_optimizer={dist}"),
            "parallel.grad_bucket_size=5000",
        ])?;
        Ok(train_inproc(&cfg, data, opts(30), 2, None, None)?
            .iter()
            .map(|r| r.optimizer_state_bytes)
            .collect())
    };
    let (full, sharded) = (bytes(false)?, bytes(true)?);
    for (f, s) in full.iter().zip(&sharded) {
        // Each bucket splits into two halves of equal size or one element apart.
        let diff = (2 * s).abs_diff(*f);
        ensure!(diff <= 8 * 16, "sharded {s} B vs full {f} B: not half");
    }
    Ok(())
}

#[test]
fn a_stop_request_ends_every_rank_after_the_same_step() -> Result<()> {
    let (cfg, data) = setup(&["parallel.pipeline_model_parallel_size=2", "train.train_iters=50"])?;
    let stop = Arc::new(AtomicBool::new(true));
    let results = train_inproc(&cfg, data, opts(30), 2, None, Some(stop))?;
    for r in &results {
        ensure!(r.interrupted && r.records.len() == 1, "stopped after {} steps", r.records.len());
    }
    // --exit-interval (and --exit-duration-in-mins, agreed the same way) stops every rank after
    // the same step; an interval that divides train_iters does not cut the last step short.
    for (iters, want) in [(5u64, 2usize), (4, 4)] {
        let sets = [
            "parallel.pipeline_model_parallel_size=2".to_string(),
            "parallel.data_parallel_size=2".into(),
            "train.global_batch_size=8".into(),
            format!("train.train_iters={iters}"),
            if want == 2 { "train.exit_interval=2".into() } else { "train.exit_interval=4".into() },
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let (cfg, data) = setup(&sets)?;
        let results = train_inproc(&cfg, data, opts(30), 2, None, None)?;
        for r in &results {
            let stopped = want < iters as usize;
            ensure!(
                r.interrupted == stopped && r.records.len() == want,
                "{iters} steps, exit interval: stopped {} after {} steps",
                r.interrupted,
                r.records.len()
            );
        }
    }
    Ok(())
}

#[test]
fn bad_layouts_are_errors_before_training() -> Result<()> {
    let (cfg, data) = setup(&["parallel.pipeline_model_parallel_size=2", "parallel.stage_layers=[1,1]"])?;
    let err = train_inproc(&cfg, data.clone(), opts(5), 2, None, None).expect_err("bad stage list");
    ensure!(matches!(err, RuntimeError::Layout { .. }) && err.to_string().contains("summing to 4"), "{err}");
    let (cfg, data) = setup(&[
        "parallel.pipeline_model_parallel_size=2",
        "parallel.pipeline_schedule=\"interleaved\"",
        "train.global_batch_size=6",
    ])?;
    let err = train_inproc(&cfg, data, opts(5), 2, None, None).expect_err("m = 3 cannot interleave");
    ensure!(err.to_string().contains("pipeline_schedule"), "{err}");
    Ok(())
}

fn params_of(results: &[troupe::runtime::RankResult]) -> Vec<Vec<u32>> {
    results.iter().flat_map(|r| r.chunks.iter().map(|c| c.2.iter().map(|x| x.to_bits()).collect())).collect()
}

#[test]
fn checkpoints_resume_exactly_on_any_layout() -> Result<()> {
    let dir = Scratch::new("rt-ckpt");
    let save = format!("checkpoint.save=\"{}\"", dir.display());
    let load = format!("checkpoint.load=\"{}\"", dir.display());
    let layout = [
        "parallel.pipeline_model_parallel_size=2",
        "parallel.data_parallel_size=2",
        "parallel.use_distributed_optimizer=true",
        "parallel.grad_bucket_size=4000",
        "train.global_batch_size=8",
        // The LR schedule must not depend on where a run stops.
        "train.lr_decay_iters=4",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        layout.iter().copied().chain(extra.iter().copied()).map(str::to_string).collect()
    };
    // Uninterrupted: 4 steps.
    let (cfg, data) = setup(&with(&["train.train_iters=4"]))?;
    let straight = train_inproc(&cfg, data.clone(), opts(30), 2, None, None)?;
    // Interrupted after 2 steps (saved), then resumed to 4.
    let (cfg, _) = setup(&with(&["train.train_iters=2", &save, "checkpoint.save_interval=2"]))?;
    train_inproc(&cfg, data.clone(), opts(30), 2, None, None)?;
    let (cfg, _) = setup(&with(&["train.train_iters=4", &load]))?;
    let resumed = train_inproc(&cfg, data.clone(), opts(30), 2, None, None)?;
    ensure!(resumed[0].records.len() == 2 && resumed[0].records[0].step == 3, "resumed at step 3");
    for (a, b) in straight[0].records[2..].iter().zip(&resumed[0].records) {
        ensure!(a.loss.to_bits() == b.loss.to_bits(), "step {}: {} vs {}", a.step, a.loss, b.loss);
    }
    ensure!(params_of(&straight) == params_of(&resumed), "resumed parameters differ");

    // The checkpoint is the single-rank format: the plain trainer resumes a PP=2 checkpoint and
    // matches its own uninterrupted run bit for bit (PP with one data-parallel rank is exact).
    let _ = std::fs::remove_dir_all(&dir);
    let decay = "train.lr_decay_iters=4";
    let pp2 = [
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=2",
        decay,
        &save,
        "checkpoint.save_interval=2",
    ];
    let (cfg, _) = setup(&pp2)?;
    train_inproc(&cfg, data.clone(), opts(30), 2, None, None)?;
    let single = |sets: &[&str]| -> Result<Vec<u32>> {
        let (cfg, _) = setup(sets)?;
        let be = troupe::kernels::CpuBackend::new(1);
        let (mut trainer, mut state, _) = troupe::train::run::prepare(&cfg)?;
        let stop = AtomicBool::new(false);
        let d = troupe::train::run::RunData { train: data.as_ref(), valid: None, test: None, sample: None };
        troupe::train::run::run(&cfg, &be, &mut trainer, &mut state, &d, &stop, &mut |_| {})?;
        Ok(trainer.model.params().iter().map(|x| x.to_bits()).collect())
    };
    let resumed_single = single(&["train.train_iters=4", decay, &load])?;
    let straight_single = single(&["train.train_iters=4", decay])?;
    ensure!(resumed_single == straight_single, "single-rank resume of a PP=2 checkpoint differs");

    // Fine-tuning from that checkpoint (its weights, step 0, fresh moments) on PP 2 gives the
    // single-rank trainer's fine-tuning bit for bit, and is not the resume.
    let ft = [decay, &load, "checkpoint.finetune=true", "train.train_iters=2"];
    let pp_ft = [&ft[..], &["parallel.pipeline_model_parallel_size=2"]].concat();
    let (cfg, _) = setup(&pp_ft)?;
    let tuned = train_inproc(&cfg, data.clone(), opts(30), 2, None, None)?;
    ensure!(
        tuned[0].records.len() == 2 && tuned[0].records[0].step == 1,
        "the fine-tuning did not start at step 1"
    );
    let (cfg, _) = setup(&ft)?;
    let (mut trainer, mut state, _) = troupe::train::run::prepare(&cfg)?;
    ensure!(state.step == 0, "the single trainer's fine-tuning starts at step {}", state.step);
    let d = troupe::train::run::RunData { train: data.as_ref(), valid: None, test: None, sample: None };
    let be = troupe::kernels::CpuBackend::new(1);
    troupe::train::run::run(&cfg, &be, &mut trainer, &mut state, &d, &AtomicBool::new(false), &mut |_| {})?;
    let mut compared = 0;
    for (_, table, params) in tuned.iter().flat_map(|r| r.chunks.iter()) {
        for spec in table.specs() {
            let single = trainer.model.param(&spec.name).context("no such tensor")?;
            let ours = &params[spec.span.range()];
            ensure!(
                ours.iter().zip(single).all(|(a, b)| a.to_bits() == b.to_bits()),
                "PP 2 fine-tuning differs from the single trainer's in {}",
                spec.name
            );
            compared += 1;
        }
    }
    ensure!(compared >= trainer.model.table().specs().len(), "compared {compared} tensors");
    let tuned_single: Vec<u32> = trainer.model.params().iter().map(|x| x.to_bits()).collect();
    ensure!(tuned_single != resumed_single, "fine-tuning resumed instead");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_non_finite_loss_is_skipped_or_aborts_on_every_rank_together() -> Result<()> {
    let layout =
        ["parallel.pipeline_model_parallel_size=2", "parallel.data_parallel_size=2", "train.train_iters=3"];
    // Skip: step 2 changes nothing, on every rank; training continues.
    let (cfg, data) = setup(&[&layout[..], &["train.nan_policy=\"skip\""]].concat())?;
    let clean = train_inproc(&cfg, data.clone(), RunOptions { ..opts(30) }, 2, None, None)?;
    // World rank 2 is the last pipeline stage of data-parallel replica 0: its loss turns NaN.
    let nan = "nan:rank=2,step=2,what=loss".parse()?;
    let o = RunOptions { faults: FaultPlan { faults: vec![nan], seed: 1 }, ..opts(30) };
    let skipped = train_inproc(&cfg, data.clone(), o.clone(), 2, None, None)?;
    for r in &skipped {
        let flags: Vec<bool> = r.records.iter().map(|x| x.skipped).collect();
        ensure!(flags == [false, true, false] && r.skipped_steps == 1, "rank's steps: {flags:?}");
    }
    ensure!(params_of(&clean) != params_of(&skipped), "the skipped step changed nothing at all?");
    // Abort: every rank stops with the non-finite error at step 2.
    let (cfg, data) = setup(&[&layout[..], &["train.nan_policy=\"abort\""]].concat())?;
    let all = train_inproc_all(&cfg, data, o, 2, None, None)?;
    for (rank, r) in all.iter().enumerate() {
        match r {
            Err(RuntimeError::NonFinite { step: 2, .. }) => {}
            other => anyhow::bail!(
                "rank {rank}: expected a non-finite abort at step 2, got {:?}",
                other.as_ref().err()
            ),
        }
    }
    Ok(())
}

#[test]
fn evaluation_through_the_pipeline_matches_the_single_rank_trainer() -> Result<()> {
    let (base, data) = setup(&["logging.eval_interval=1", "logging.eval_iters=3"])?;
    let mut rng = Rng::derived(2, "actors-valid");
    let tokens: Vec<u32> = (0..2000).map(|_| (rng.next_u64() % 61) as u32).collect();
    let valid: Arc<dyn SampleSource> = Arc::new(TokenWindows::new(tokens, 16, 4).expect("tokens"));
    // The single-rank trainer's evaluation after each step.
    let be = troupe::kernels::CpuBackend::new(1);
    let (mut trainer, mut state, _) = troupe::train::run::prepare(&base)?;
    let stop = AtomicBool::new(false);
    // The validation windows double as the test split (evaluated once, at the end).
    let d = troupe::train::run::RunData {
        train: data.as_ref(),
        valid: Some(valid.as_ref()),
        test: Some(valid.as_ref()),
        sample: None,
    };
    let mut want = Vec::new();
    troupe::train::run::run(&base, &be, &mut trainer, &mut state, &d, &stop, &mut |e| {
        if let troupe::train::run::Event::Eval { loss, .. } = e {
            want.push(*loss);
        }
    })?;
    ensure!(want.len() == 4, "{want:?}");
    for layout in [
        &["parallel.pipeline_model_parallel_size=2"][..],
        &["parallel.pipeline_model_parallel_size=2", "parallel.data_parallel_size=2"],
    ] {
        let sets: Vec<&str> = ["logging.eval_interval=1", "logging.eval_iters=3"]
            .into_iter()
            .chain(layout.iter().copied())
            .collect();
        let (cfg, _) = setup(&sets)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let o = RunOptions {
            valid: Some(troupe::runtime::ValidData(valid.clone())),
            test: Some(troupe::runtime::ValidData(valid.clone())),
            ..opts(30)
        };
        train_inproc(&cfg, data.clone(), o, 2, Some(tx), None)?;
        let got: Vec<f32> = rx
            .try_iter()
            .filter_map(
                |e| if let troupe::runtime::RunEvent::Eval { loss, .. } = e { Some(loss) } else { None },
            )
            .collect();
        // DP = 1 trains bitwise like one rank, so its evaluations are bitwise too; with DP = 2 the
        // parameters differ in the last bits, and so do the losses.
        if layout.len() == 1 {
            ensure!(
                got.iter().map(|x| x.to_bits()).eq(want.iter().map(|x| x.to_bits())),
                "{got:?} vs {want:?}"
            );
        } else {
            ensure!(
                got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| ((a - b) / b).abs() < 1e-5),
                "{got:?} vs {want:?}"
            );
        }
    }
    Ok(())
}
