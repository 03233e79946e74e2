//! The fault matrix: every fault kind × pipeline phase × seed on a small PP = 2 × DP = 2 run on
//! the in-process backend, each scenario classified (detected and attributed, survived, or
//! recovered by a restart from the latest checkpoint) and compared with a fault-free run. Used by
//! `tests/fault_matrix.rs` and `troupe bench faults`.
//!
//! Kinds that end the process (`exit`, `ckpt-kill`) cannot run in-process; the multi-process
//! tests cover them through `troupe launch --max-restarts`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::faults::{Fault, FaultKind, FaultPlan, Phase, Target};
use super::{RankResult, RunOptions, RuntimeError, train_inproc_all};
use crate::config::Config;
use crate::data::SampleSource;

/// The model and run every scenario uses.
pub const MATRIX_CONFIG: &str = r#"
[model]
vocab_size = 61
make_vocab_size_divisible_by = 16
seq_length = 16
num_layers = 4
hidden_size = 32
num_attention_heads = 4

[train]
micro_batch_size = 1
global_batch_size = 8
train_iters = 4
lr = 1e-3
lr_decay_iters = 4
seed = 3
nan_policy = "skip"

[parallel]
pipeline_model_parallel_size = 2
data_parallel_size = 2

[logging]
eval_interval = 0

[checkpoint]
save_interval = 1
allow_fresh_start = true
"#;

/// How a scenario ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub kind: FaultKind,
    pub phase: Phase,
    pub seed: u64,
    pub fault: String,
    /// The run failed and every rank returned (no hang).
    pub detected: bool,
    /// Wall time of the failing attempt (an upper bound on the detection time).
    pub detect_s: f64,
    /// The reported root cause (or warning) names the faulty rank.
    pub attributed: Option<bool>,
    /// The run needed a restart, and the restarted run ended with the fault-free run's bits.
    pub resumed_bitwise: Option<bool>,
    /// Samples consumed at the end minus the fault-free run's (0: none lost or repeated).
    pub sample_delta: i64,
    /// Flight recorders written by failing ranks.
    pub flight_files: usize,
    pub note: String,
}

/// Scenarios of the matrix: (kind, phase) pairs where the fault can happen in-process.
pub fn scenarios() -> Vec<(FaultKind, Phase)> {
    use FaultKind as K;
    let pipeline = [Phase::Warmup, Phase::Steady, Phase::Cooldown];
    let mut out = Vec::new();
    for kind in [K::Crash, K::Hang, K::Slow] {
        for p in Phase::ALL {
            out.push((kind, p));
        }
    }
    for kind in [K::Drop, K::Delay, K::Duplicate, K::Reorder, K::Corrupt, K::Nan, K::Inf, K::Sigterm] {
        for p in pipeline {
            out.push((kind, p));
        }
    }
    out.push((K::CkptFail, Phase::Checkpoint));
    out
}

/// How many times the timeout a scenario whose fault must be survived may wait (see [`run`]).
pub const SURVIVED_WAIT: u32 = 10;

/// Whether a fault of this kind must fail the run (be detected): a crash, a hang, a corrupt or
/// dropped message, a failed checkpoint write (and the kinds that end the process, which only
/// the multi-process tests run). The other kinds must be survived.
pub fn fails_the_run(kind: FaultKind) -> bool {
    use FaultKind as K;
    matches!(kind, K::Crash | K::Exit | K::Hang | K::Corrupt | K::Drop | K::CkptFail | K::CkptKill)
}

/// Whether every scenario of this kind must name the faulty rank (crash, hang, NaN, Inf, corrupt):
/// the summary's attribution figure counts these.
pub fn must_be_attributed(kind: FaultKind) -> bool {
    use FaultKind as K;
    matches!(kind, K::Crash | K::Hang | K::Nan | K::Inf | K::Corrupt)
}

/// The fault of one scenario: the rank and step follow from the seed.
fn fault_for(kind: FaultKind, phase: Phase, seed: u64, plan: &super::Plan) -> Fault {
    let world = plan.pp * plan.dp;
    let mut rank = (seed as usize * 3 + 1) % world;
    let step = 2 + seed % 2;
    let mut what = None;
    if matches!(kind, FaultKind::Nan | FaultKind::Inf) {
        // Activations are produced by forwards, which the cool-down has none of.
        // Forwards (activations) are what the warm-up has; backwards (gradients) the cool-down.
        what = Some(match phase {
            Phase::Warmup => Target::Act,
            Phase::Cooldown => Target::Grad,
            _ if seed.is_multiple_of(2) => Target::Grad,
            _ => Target::Act,
        });
        if what == Some(Target::Act) {
            // Activations cross from the first stage (world ranks 0..dp).
            rank %= plan.dp;
        }
    }
    if matches!(kind, FaultKind::CkptFail) || phase == Phase::Checkpoint {
        rank = 0;
    }
    let make = |rank: usize| Fault {
        kind,
        rank,
        step,
        phase: Some(phase),
        instruction: None,
        mb: None,
        what,
        factor: Some(6.0),
        ms: Some(50),
        prob: None,
        attempt: 0,
        recv: None,
    };
    // The seed's rank, or the next one where the fault can happen (e.g. a rank that sends in
    // that phase).
    (0..world)
        .map(|i| make((rank + i) % world))
        .find(|f| f.check(plan, world, 4).is_ok())
        .unwrap_or_else(|| make(rank))
}

/// The numbers a report prints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub scenarios: usize,
    pub hangs: usize,
    pub detect_max_s: f64,
    pub must_attribute: usize,
    pub attributed: usize,
    pub resumed: usize,
    pub resumed_bitwise: usize,
    pub sample_errors: usize,
}

/// Runs the matrix for `seeds`, in `dir` (checkpoints, flight recorders); `timeout` bounds every
/// wait (and is the watchdog's bound) in the fault-free runs and in the scenarios whose fault
/// must fail the run (see [`fails_the_run`]). A scenario that must be survived (a straggler, a
/// delayed, duplicated or reordered message, a NaN, a stop request) waits up to [`SURVIVED_WAIT`]
/// times as long: a straggler slower than the timeout is a hang by definition, and on a loaded
/// machine a 6× straggler's wait for it can pass a short timeout without anything being wrong.
/// Returns each scenario and the summary.
///
/// # Errors
/// When the fault-free reference run itself fails.
pub fn run(
    data: &Arc<dyn SampleSource>,
    dir: &Path,
    seeds: &[u64],
    timeout: Duration,
    on: &mut dyn FnMut(&Scenario),
) -> Result<(Vec<Scenario>, Summary), RuntimeError> {
    let base = Config::from_toml_str(MATRIX_CONFIG, "the fault matrix", &[])
        .map_err(|e| RuntimeError::Start { rank: 0, detail: e.to_string() })?;
    let plan = super::Plan::new(&base, 4)?;
    let opts_within = |timeout: Duration, faults: Vec<Fault>, flight: Option<PathBuf>| RunOptions {
        timeout,
        watchdog: Some(timeout),
        faults: FaultPlan { faults, seed: 1 },
        flight_dir: flight,
        ..RunOptions::default()
    };
    let opts = |faults, flight| opts_within(timeout, faults, flight);
    let with_dirs = |save: &Path| -> Config {
        let mut c = base.clone();
        c.checkpoint.save = save.display().to_string();
        c.checkpoint.load = save.display().to_string();
        c
    };
    // The fault-free run.
    let clean_dir = dir.join("clean");
    let _ = std::fs::remove_dir_all(&clean_dir);
    let clean = ok_results(train_inproc_all(
        &with_dirs(&clean_dir),
        data.clone(),
        opts(vec![], None),
        2,
        None,
        None,
    )?)?;
    let clean_bits = bits(&clean);
    let clean_consumed = clean[0].consumed_samples as i64;
    let mut out = Vec::new();
    for &seed in seeds {
        for (kind, phase) in scenarios() {
            let fault = fault_for(kind, phase, seed, &plan);
            let name = format!("{}-{}-{seed}", kind.name(), phase.name());
            let sdir = dir.join(&name);
            let _ = std::fs::remove_dir_all(&sdir);
            let cfg = with_dirs(&sdir.join("ckpt"));
            let flight = sdir.join("flight");
            let t0 = Instant::now();
            let wait = if fails_the_run(kind) { timeout } else { timeout * SURVIVED_WAIT };
            let first = train_inproc_all(
                &cfg,
                data.clone(),
                opts_within(wait, vec![fault.clone()], Some(flight.clone())),
                2,
                None,
                None,
            )?;
            let took = t0.elapsed().as_secs_f64();
            let errors: Vec<&RuntimeError> = first.iter().filter_map(|r| r.as_ref().err()).collect();
            let mut sc = Scenario {
                kind,
                phase,
                seed,
                fault: fault.describe(),
                detected: !errors.is_empty(),
                detect_s: if errors.is_empty() { 0.0 } else { took },
                attributed: None,
                resumed_bitwise: None,
                sample_delta: 0,
                flight_files: std::fs::read_dir(&flight).map_or(0, |d| d.count()),
                note: String::new(),
            };
            let faulty = fault.rank;
            sc.note = format!("[{}] ", fault.describe());
            let oks: Vec<&RankResult> = first.iter().filter_map(|r| r.as_ref().ok()).collect();
            if sc.detected {
                let root = super::root_cause_index(&errors).map(|i| errors[i]);
                let text = root.map(|e| e.to_string()).unwrap_or_default();
                sc.attributed = Some(names_rank(&text, faulty, kind));
                sc.note += &text.chars().take(150).collect::<String>();
                if sc.attributed == Some(false) {
                    // Every rank's error, to see which one was taken for the root cause.
                    for (r, e) in first.iter().enumerate() {
                        if let Err(e) = e {
                            sc.note += &format!(" | rank {r}: {e}");
                        }
                    }
                }
            } else if matches!(kind, FaultKind::Nan | FaultKind::Inf) {
                let rec = oks.first().and_then(|r| r.records.iter().find(|x| x.step == fault.step));
                sc.attributed = Some(rec.is_some_and(|x| x.skipped && x.nonfinite_ranks.contains(&faulty)));
                sc.note += &format!("step {} skipped on every rank", fault.step);
            } else if kind == FaultKind::Slow
                && !matches!(phase, Phase::Reduce | Phase::Optimizer | Phase::Checkpoint)
            {
                let rec = oks.first().and_then(|r| r.records.iter().find(|x| x.step == fault.step));
                sc.attributed = Some(rec.is_some_and(|x| x.slowest_rank == faulty));
                sc.note += &rec
                    .map(|x| format!("straggler rank {} at {:.1}×", x.slowest_rank, x.slowest_ratio))
                    .unwrap_or_default();
            }
            // A run that failed or stopped early restarts from its latest checkpoint.
            let interrupted = sc.detected || oks.iter().any(|r| r.interrupted);
            let final_results: Option<Vec<RankResult>> = if interrupted {
                let again = train_inproc_all(&cfg, data.clone(), opts(vec![], None), 2, None, None)?;
                let again = ok_results(again).ok();
                sc.resumed_bitwise = Some(again.as_ref().is_some_and(|r| bits(r) == clean_bits));
                again
            } else {
                None
            };
            let consumed = match (&final_results, oks.first()) {
                (Some(r), _) => r[0].consumed_samples as i64,
                (None, Some(r)) => r.consumed_samples as i64,
                _ => 0,
            };
            sc.sample_delta = consumed - clean_consumed;
            if !interrupted && !matches!(kind, FaultKind::Nan | FaultKind::Inf) {
                // Survived faults (delay, duplicate, reorder, slow) must not change the result.
                let same = first_bits(&oks) == clean_bits;
                if !same {
                    sc.note = format!("{} RESULT DIFFERS from the fault-free run", sc.note);
                }
            }
            on(&sc);
            out.push(sc);
        }
    }
    let summary = summarize(&out);
    Ok((out, summary))
}

fn first_bits(r: &[&RankResult]) -> Vec<Vec<u32>> {
    r.iter().flat_map(|x| x.chunks.iter().map(|c| c.2.iter().map(|v| v.to_bits()).collect())).collect()
}

fn bits(r: &[RankResult]) -> Vec<Vec<u32>> {
    r.iter().flat_map(|x| x.chunks.iter().map(|c| c.2.iter().map(|v| v.to_bits()).collect())).collect()
}

fn ok_results(all: Vec<Result<RankResult, RuntimeError>>) -> Result<Vec<RankResult>, RuntimeError> {
    let mut out = Vec::with_capacity(all.len());
    let mut errs = Vec::new();
    for r in all {
        match r {
            Ok(x) => out.push(x),
            Err(e) => errs.push(e),
        }
    }
    match super::root_cause(errs) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Whether an error text names the faulty rank the way its kind should: the failing rank itself
/// (crash, hang, checkpoint), the sending rank (corrupt, drop: the receiver names its peer).
fn names_rank(text: &str, faulty: usize, kind: FaultKind) -> bool {
    match kind {
        // (A receive that timed out names its sender too: only the corruption report counts.)
        FaultKind::Corrupt => text.contains("corrupt") && text.contains(&format!("from rank {faulty}")),
        FaultKind::Drop => text.contains(&format!("peer {faulty}")),
        _ => {
            text.starts_with(&format!("rank {faulty},"))
                || text.contains(&format!("rank {faulty} made no progress"))
        }
    }
}

/// The summary figures of a matrix run.
pub fn summarize(s: &[Scenario]) -> Summary {
    let must = must_be_attributed;
    Summary {
        scenarios: s.len(),
        hangs: 0,
        detect_max_s: s.iter().map(|x| x.detect_s).fold(0.0, f64::max),
        must_attribute: s.iter().filter(|x| must(x.kind)).count(),
        attributed: s.iter().filter(|x| must(x.kind) && x.attributed == Some(true)).count(),
        resumed: s.iter().filter(|x| x.resumed_bitwise.is_some()).count(),
        resumed_bitwise: s.iter().filter(|x| x.resumed_bitwise == Some(true)).count(),
        sample_errors: s.iter().filter(|x| x.sample_delta != 0).count(),
    }
}

/// One line per scenario and the summary, as a text table.
pub fn table(s: &[Scenario], sum: &Summary, timeout: Duration) -> String {
    let mut t = String::from(
        "kind        phase       seed  detected  detect s  attributed  resumed bitwise  samples Δ  note\n",
    );
    for x in s {
        let yn = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        t += &format!(
            "{:<11} {:<11} {:>4}  {:<8}  {:>8.2}  {:<10}  {:<15}  {:>9}  {}\n",
            x.kind.name(),
            x.phase.name(),
            x.seed,
            if x.detected { "yes" } else { "no" },
            x.detect_s,
            yn(x.attributed),
            yn(x.resumed_bitwise),
            x.sample_delta,
            x.note
        );
    }
    t += &format!(
        "\nscenarios {} | hangs {} | detection max {:.2} s (bound: timeout {:.1} s + 2 s) | attribution {}/{} (crash, hang, nan, inf, corrupt) | resumed bitwise {}/{} | samples lost or repeated in {} runs\n",
        sum.scenarios,
        sum.hangs,
        sum.detect_max_s,
        timeout.as_secs_f64(),
        sum.attributed,
        sum.must_attribute,
        sum.resumed_bitwise,
        sum.resumed,
        sum.sample_errors
    );
    t
}
