//! The actor runtime: pipeline- and data-parallel training that is numerically the training of
//! one rank, only distributed.
//!
//! Every rank runs the actors of [`rank`] over a [`Comm`](crate::comm::Comm) world: threads of one
//! process on the in-process backend ([`train_inproc`]), or one process per rank over TCP
//! ([`run_rank`] with a world from [`crate::comm::tcp::connect_from_env`]). The rank's schedule
//! program (from [`crate::schedule`]) is executed instruction by instruction; see ARCHITECTURE.md
//! ("The actor runtime") for the data flow and the equivalence argument.
//!
//! Equivalence with [`crate::train::Trainer`]: with one data-parallel rank the runtime adds the
//! same numbers in the same order as the single-rank trainer — each chunk accumulates its
//! microbatches' gradients in microbatch order, the tied embedding's gradient is `embedding part +
//! head part` in both, the gradient norm adds per-tensor sums in the full model's tensor order, and
//! AdamW is element-wise — so losses and parameters are bitwise equal for every schedule and
//! pipeline size. With data parallelism the microbatch gradients are summed in a different order
//! (per data-parallel rank, then across ranks), so results agree to rounding only.

mod compute;
mod mailbox;
pub mod plan;
pub mod rank;
pub mod shard;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use thiserror::Error;

use crate::comm::{CommError, CommOptions, inproc};
use crate::config::Config;
use crate::data::SampleSource;
use crate::models::gpt::LayerRange;
use crate::models::params::ParamTable;
use crate::schedule::OpKind;
use crate::trace::{Event, Trace};

pub use mailbox::{Dir, Key};
pub use plan::Plan;
pub use rank::{RankSetup, run_rank};

/// Errors of the runtime. Each names the rank, the step and the instruction or operation.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("parallel layout: {what}: {reason}")]
    Layout { what: String, reason: String },
    #[error("rank {rank}, step {step}, actor {actor}, instruction {op}: {detail}")]
    Actor { actor: String, rank: usize, step: u64, op: String, detail: String },
    #[error("rank {rank}, step {step}, {op}: {source}")]
    Comm { rank: usize, step: u64, op: String, source: Box<CommError> },
    #[error("step {step}: non-finite loss {loss} or gradient norm {grad_norm} (nan_policy = abort)")]
    NonFinite { step: u64, loss: f32, grad_norm: f64 },
    #[error("starting rank {rank}: {detail}")]
    Start { rank: usize, detail: String },
}

impl RuntimeError {
    /// Errors that are consequences of another rank's failure (a lost peer, a message that never
    /// came) rank below errors that describe a failure itself when choosing the root cause.
    fn is_consequence(&self) -> bool {
        match self {
            RuntimeError::Comm { .. } => true,
            RuntimeError::Actor { detail, .. } => {
                detail.contains("arrived within") || detail.contains("receiving the")
            }
            _ => false,
        }
    }
}

/// Settings of a run that are not part of the model configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Longest wait for any message, collective or actor reply.
    pub timeout: Duration,
    /// Record trace events of this step (1-based).
    pub trace_step: Option<u64>,
    /// Per pipeline rank, the order in which the mailbox accepts messages (from a trace).
    pub replay_order: Option<Vec<Vec<Key>>>,
    /// Resume point.
    pub start_step: u64,
    pub consumed_samples: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(600),
            trace_step: None,
            replay_order: None,
            start_step: 0,
            consumed_samples: 0,
        }
    }
}

/// Progress, sent by world rank 0.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    Step {
        step: u64,
        loss: f32,
        lr: f32,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
        skipped: bool,
        /// Worst rank's measured idle / busy time in the pipeline phase.
        bubble: f64,
    },
}

/// One step as every rank agreed on it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f32,
    pub grad_norm: f64,
    pub lr: f32,
    pub skipped: bool,
    pub seconds: f64,
    /// Worst rank's measured bubble (idle / busy) in the pipeline phase.
    pub bubble: f64,
    /// This rank's peak microbatches holding activations, per local chunk.
    pub peak_in_flight: Vec<usize>,
}

/// What a rank returns.
#[derive(Debug, Default)]
pub struct RankResult {
    pub records: Vec<StepRecord>,
    /// Final parameters of each local chunk.
    pub chunks: Vec<(LayerRange, ParamTable, Vec<f32>)>,
    /// Peak in-flight microbatches per local chunk over the run.
    pub peak_in_flight: Vec<usize>,
    pub optimizer_state_bytes: usize,
    pub skipped_steps: u64,
    pub consumed_samples: u64,
    pub interrupted: bool,
    /// Trace events of the recorded step (pipeline rank numbering; data-parallel rank 0 only).
    pub events: Vec<Event>,
    pub sent_bytes: u64,
    pub messages: u64,
    pub instructions: u64,
    /// Wall time executing instructions outside compute jobs (actor and messaging overhead).
    pub overhead_s: f64,
}

/// Trains with every rank of the layout as a thread of this process, on the in-process backend.
/// `threads` kernel threads are shared out over the ranks. Returns each rank's result, by world
/// rank.
///
/// # Errors
/// The root-cause [`RuntimeError`]: the first failure that is not a consequence of another
/// rank's failure.
pub fn train_inproc(
    cfg: &Config,
    data: Arc<dyn SampleSource>,
    opts: RunOptions,
    threads: usize,
    events: Option<std::sync::mpsc::Sender<RunEvent>>,
    stop: Option<Arc<AtomicBool>>,
) -> Result<Vec<RankResult>, RuntimeError> {
    let world = cfg.parallel.pipeline_model_parallel_size * cfg.parallel.data_parallel_size;
    let plan = Arc::new(Plan::new(cfg, world)?);
    let comm_opts = CommOptions { timeout: opts.timeout, ..CommOptions::default() };
    let comms = inproc::world(world, comm_opts)
        .map_err(|e| RuntimeError::Start { rank: 0, detail: e.to_string() })?;
    let per_rank = (threads / world).max(1);
    let mut handles = Vec::with_capacity(world);
    for (r, comm) in comms.into_iter().enumerate() {
        let setup = RankSetup {
            cfg: cfg.clone(),
            plan: plan.clone(),
            world: comm,
            data: data.clone(),
            opts: opts.clone(),
            threads: per_rank,
            events: if r == 0 { events.clone() } else { None },
            stop: stop.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("troupe-rank-{r}"))
            .spawn(move || run_rank(setup))
            .map_err(|e| RuntimeError::Start { rank: r, detail: e.to_string() })?;
        handles.push(h);
    }
    let mut results = Vec::with_capacity(world);
    let mut errors = Vec::new();
    for (r, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(res)) => results.push(res),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(RuntimeError::Start { rank: r, detail: "the rank thread panicked".into() }),
        }
    }
    match root_cause(errors) {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

/// The error to report out of several ranks' errors.
pub fn root_cause(mut errors: Vec<RuntimeError>) -> Option<RuntimeError> {
    let i = errors.iter().position(|e| !e.is_consequence()).unwrap_or(0);
    (!errors.is_empty()).then(|| errors.swap_remove(i))
}

/// The trace of a run's recorded step, from every pipeline rank's events.
pub fn trace_of(plan: &Plan, results: &[RankResult]) -> Trace {
    let mut events: Vec<Event> = results.iter().flat_map(|r| r.events.iter().cloned()).collect();
    let t0 = events.iter().map(|e| e.start).fold(f64::INFINITY, f64::min);
    let t0 = if t0.is_finite() { t0 } else { 0.0 };
    for e in &mut events {
        e.start -= t0;
        e.end -= t0;
    }
    events.sort_by(|a, b| a.start.total_cmp(&b.start).then(a.rank.cmp(&b.rank)));
    Trace {
        pp: plan.pp,
        vpp: plan.vpp,
        microbatches: plan.microbatches,
        placement: plan.program.placement,
        schedule: Some(plan.schedule.name().to_string()),
        events,
    }
}

/// The replay order of a recorded trace: per pipeline rank, its received messages by arrival.
pub fn replay_order(trace: &Trace) -> Vec<Vec<Key>> {
    let mut per: Vec<Vec<(f64, Key)>> = vec![Vec::new(); trace.pp];
    for e in &trace.events {
        let dir = match e.kind {
            OpKind::RecvAct => Dir::Act,
            OpKind::RecvGrad => Dir::Grad,
            _ => continue,
        };
        if let (Some(mb), Some(c), Some(list)) = (e.mb, e.chunk, per.get_mut(e.rank as usize)) {
            list.push((e.end, (dir, mb, c)));
        }
    }
    per.into_iter()
        .map(|mut l| {
            l.sort_by(|a, b| a.0.total_cmp(&b.0));
            l.into_iter().map(|(_, k)| k).collect()
        })
        .collect()
}
