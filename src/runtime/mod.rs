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

pub mod agree;
mod compute;
pub mod faults;
pub mod heartbeat;
mod mailbox;
pub mod matrix;
pub mod plan;
pub mod rank;
pub mod shard;
pub mod stage;
pub mod straggler;
pub mod wire;

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
    pub fn is_consequence(&self) -> bool {
        match self {
            RuntimeError::Comm { .. } => true,
            RuntimeError::Actor { detail, .. } => {
                !detail.contains("corrupt")
                    && (detail.contains("arrived within")
                        || detail.contains("sent no heartbeat")
                        || detail.contains("receiving the")
                        || detail.contains("not done within")
                        // A reduction or send that waited on a peer in vain.
                        || detail.contains("not reduced within")
                        || detail.contains("not handed over within")
                        // A device link or group whose peer failed (through the host, or NCCL).
                        || detail.contains("lost peer")
                        || detail.contains("a peer is missing or stuck"))
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
    /// Faults to inject (see [`faults`]).
    pub faults: faults::FaultPlan,
    /// The launcher's restart attempt (faults fire in their own attempt only).
    pub attempt: u64,
    /// Append and verify a checksum on every pipeline message (a CRC32 on host messages, a
    /// 64-bit checksum on device links).
    pub checksums: bool,
    /// A rank that makes no progress for this long reports itself hung (default: `timeout`).
    pub watchdog: Option<Duration>,
    /// Write each failing rank's flight recorder (its last instructions and messages) here.
    pub flight_dir: Option<std::path::PathBuf>,
    /// Validation data: every `logging.eval_interval` steps the ranks evaluate
    /// `logging.eval_iters` global batches of it through the pipeline.
    pub valid: Option<ValidData>,
    /// Test data: evaluated once, the same way, when training ends (not after a stop).
    pub test: Option<ValidData>,
    /// Run each chunk's forwards and backwards on this device (see [`stage`]); `None`: the CPU.
    pub device: Option<crate::gpu::stage::StageFactory>,
    /// Precision of pipeline messages (see [`wire`]). `None`: bf16 when the chunks compute in
    /// bf16 on a device (the values are bf16 already: nothing is lost), else fp32. Forcing bf16
    /// elsewhere rounds every activation and gradient that crosses a stage.
    pub message_dtype: Option<crate::comm::DType>,
    /// With chunks on a device and data parallelism, sum the gradients through the host's
    /// reducer (drain, CPU all-reduce or reduce-scatter, upload) instead of on the device (NCCL
    /// under a launcher; see `stage::Stage::with_device_group`). With the distributed optimizer
    /// its shards then live on the host too.
    pub host_grad_reduce: bool,
    /// With chunks on a device that has device groups and pipeline parallelism, send the
    /// pipeline messages through the host (download, the CPU communicator, upload) instead of
    /// between the devices (see [`device_messages`]).
    pub host_p2p: bool,
}

/// Whether pipeline messages between ranks travel between the devices (a two-rank device link
/// per pair of pipeline neighbours: NCCL under a launcher, through the host's communicator on
/// the emulator): for chunks on a device with device groups (`device_groups`), more than one
/// pipeline rank (`pp`), unless `host_p2p` asks for the host path or message faults that need
/// host messages (drop, delay, duplicate, reorder: the host's mailbox and sequence checks) are
/// planned. Corruption is injected on the device links too, where their checksums catch it.
///
/// ```
/// use troupe::runtime::device_messages;
/// assert!(device_messages(true, 2, false, false));
/// assert!(!device_messages(true, 1, false, false)); // no pipeline: no messages
/// assert!(!device_messages(false, 4, false, false)); // in-process CUDA ranks: the host
/// assert!(!device_messages(true, 4, true, false)); // --host-p2p
/// assert!(!device_messages(true, 4, false, true)); // drop, delay, … go into host messages
/// ```
pub fn device_messages(device_groups: bool, pp: usize, host_p2p: bool, message_faults: bool) -> bool {
    device_groups && pp > 1 && !host_p2p && !message_faults
}

/// Where the work around the backward runs when chunks compute on a device: what the ranks
/// build (see `rank.rs`) and what `troupe train` and `troupe bench` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePlacement {
    /// Data-parallel and tied-embedding gradient sums on the devices (device groups).
    pub grad_sums: bool,
    /// AdamW on the devices (the host's copy of the parameters is stale between checkpoints).
    pub optimizer: bool,
    /// The distributed optimizer's shards on the devices, gathered over the device group.
    pub shards: bool,
}

impl DevicePlacement {
    /// The placement for a device whose factory has device groups (`device_groups`), `dp`
    /// data-parallel ranks, the distributed optimizer (`distributed`) and `host_grad_reduce`.
    ///
    /// ```
    /// use troupe::runtime::DevicePlacement;
    /// // ZeRO-1 over two replicas with NCCL (or host-backed) device groups: all on the devices.
    /// let p = DevicePlacement::new(true, 2, true, false);
    /// assert!(p.grad_sums && p.optimizer && p.shards);
    /// // Without device groups (in-process CUDA ranks) the shards stay on the host.
    /// let p = DevicePlacement::new(false, 2, true, false);
    /// assert!(!p.grad_sums && !p.optimizer && !p.shards);
    /// // Unsharded AdamW is on the device either way.
    /// assert!(DevicePlacement::new(false, 2, false, false).optimizer);
    /// ```
    pub fn new(device_groups: bool, dp: usize, distributed: bool, host_grad_reduce: bool) -> Self {
        let grad_sums = device_groups && !host_grad_reduce;
        // Sharded AdamW runs on the device only where the device group can gather the shards;
        // one replica's "shard" is the whole arena (`host_grad_reduce` keeps it on the host).
        let shards = distributed && dp > 1 && grad_sums;
        let optimizer = !distributed || shards || (dp == 1 && !host_grad_reduce);
        DevicePlacement { grad_sums, optimizer, shards }
    }
}

/// Validation samples for [`RunOptions::valid`].
#[derive(Clone)]
pub struct ValidData(pub Arc<dyn SampleSource>);

impl std::fmt::Debug for ValidData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ValidData({} samples)", self.0.num_samples())
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(600),
            trace_step: None,
            replay_order: None,
            start_step: 0,
            consumed_samples: 0,
            faults: faults::FaultPlan::default(),
            attempt: 0,
            checksums: true,
            watchdog: None,
            flight_dir: None,
            valid: None,
            test: None,
            device: None,
            message_dtype: None,
            host_grad_reduce: false,
            host_p2p: false,
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
    /// Training continues from a checkpoint.
    Resumed { step: u64, consumed_samples: u64 },
    /// A checkpoint was written (by world rank 0).
    Saved { step: u64, path: String },
    /// Mean loss over `logging.eval_iters` global batches of a held-out split.
    Eval { step: u64, split: crate::train::run::EvalSplit, loss: f32 },
}

/// One step as every rank agreed on it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// World ranks that found a non-finite loss or gradient this step.
    pub nonfinite_ranks: Vec<usize>,
    /// The world rank most behind this step and by how much: its compute time over the smaller
    /// of its data-parallel peers' (same stage) and its own best step so far.
    pub slowest_rank: usize,
    pub slowest_ratio: f64,
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
    /// Pipeline messages to other ranks traveled between the devices (see [`device_messages`]).
    pub p2p_on_device: bool,
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
    let all = train_inproc_all(cfg, data, opts, threads, events, stop)?;
    let mut results = Vec::with_capacity(all.len());
    let mut errors = Vec::new();
    for r in all {
        match r {
            Ok(x) => results.push(x),
            Err(e) => errors.push(e),
        }
    }
    match root_cause(errors) {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

/// [`train_inproc`] returning every rank's own outcome, by world rank.
///
/// # Errors
/// Only for a layout that cannot start (bad plan, no threads).
pub fn train_inproc_all(
    cfg: &Config,
    data: Arc<dyn SampleSource>,
    opts: RunOptions,
    threads: usize,
    events: Option<std::sync::mpsc::Sender<RunEvent>>,
    stop: Option<Arc<AtomicBool>>,
) -> Result<Vec<Result<RankResult, RuntimeError>>, RuntimeError> {
    let world = cfg.parallel.pipeline_model_parallel_size * cfg.parallel.data_parallel_size;
    let plan = Arc::new(Plan::new(cfg, world)?);
    opts.faults
        .check(&plan, world, cfg.train.train_iters)
        .map_err(|e| RuntimeError::Layout { what: "fault plan".into(), reason: e.to_string() })?;
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
            alarm: None,
        };
        let h = std::thread::Builder::new()
            .name(format!("troupe-rank-{r}"))
            .spawn(move || run_rank(setup))
            .map_err(|e| RuntimeError::Start { rank: r, detail: e.to_string() })?;
        handles.push(h);
    }
    Ok(handles
        .into_iter()
        .enumerate()
        .map(|(r, h)| {
            h.join().unwrap_or_else(|_| {
                Err(RuntimeError::Start { rank: r, detail: "the rank thread panicked".into() })
            })
        })
        .collect())
}

/// The error to report out of several ranks' errors (see [`root_cause_index`]).
pub fn root_cause(mut errors: Vec<RuntimeError>) -> Option<RuntimeError> {
    let refs: Vec<&RuntimeError> = errors.iter().collect();
    let i = root_cause_index(&refs)?;
    Some(errors.swap_remove(i))
}

/// Which of several ranks' errors is the root cause: a failure itself if any; else a rank that
/// waited in vain for a silent peer (it names that peer); else the first.
pub fn root_cause_index(errors: &[&RuntimeError]) -> Option<usize> {
    if errors.is_empty() {
        return None;
    }
    errors
        .iter()
        .position(|e| !e.is_consequence())
        .or_else(|| errors.iter().position(|e| !e.to_string().contains("lost peer")))
        .or(Some(0))
}

/// The trace of a run's recorded step from the events world rank 0 gathered (every pipeline rank
/// of the first data-parallel replica). Times start at 0. A send's end is set to the arrival its
/// receiver recorded when the receive was already posted, so the message latency can be
/// estimated from the trace.
pub fn trace_of(plan: &Plan, events: &[Event]) -> Trace {
    let mut events: Vec<Event> = events.to_vec();
    let t0 = events.iter().map(|e| e.start).fold(f64::INFINITY, f64::min);
    let t0 = if t0.is_finite() { t0 } else { 0.0 };
    for e in &mut events {
        e.start -= t0;
        e.end -= t0;
    }
    let program = &plan.program;
    // (posted, arrived) of every receive.
    let arrivals: std::collections::HashMap<(u32, OpKind, u32, u32), (f64, f64)> = events
        .iter()
        .filter(|e| matches!(e.kind, OpKind::RecvAct | OpKind::RecvGrad))
        .filter_map(|e| Some(((e.rank, e.kind, e.mb?, e.chunk?), (e.start, e.end))))
        .collect();
    for e in &mut events {
        let (Some(mb), Some(c), Some(peer)) = (e.mb, e.chunk, e.peer) else { continue };
        let (recv, next) = match e.kind {
            OpKind::SendAct => (OpKind::RecvAct, 1isize),
            OpKind::SendGrad => (OpKind::RecvGrad, -1),
            _ => continue,
        };
        let stage = program.stage_of(e.rank as usize, c as usize) as isize + next;
        let Ok(stage) = usize::try_from(stage) else { continue };
        if stage >= plan.num_stages() {
            continue;
        }
        let (_, c2) = program.locate(stage);
        // Only a receive posted before the send saw the real arrival; a message that waited for
        // its receive to be posted keeps a zero-length send (transit unknown).
        if let Some(&(posted, arrival)) = arrivals.get(&(peer, recv, mb, c2 as u32))
            && posted <= e.start
        {
            e.end = e.end.max(arrival);
        }
    }
    events.sort_by(|a, b| a.start.total_cmp(&b.start).then(a.rank.cmp(&b.rank)));
    Trace {
        pp: plan.pp,
        vpp: plan.vpp,
        microbatches: plan.microbatches,
        placement: program.placement,
        schedule: Some(plan.schedule.name().to_string()),
        events,
    }
}

/// Measured against predicted pipeline bubble of a recorded step.
#[derive(Debug, Clone, PartialEq)]
pub struct BubbleReport {
    /// Worst rank's idle / busy over the step's compute makespan, measured.
    pub measured: f64,
    /// The simulator's worst-rank bubble for this program with every instruction's measured
    /// duration and the mean measured message latency.
    pub predicted: f64,
    /// The same with each instruction kind's mean duration per (rank, chunk) (what a cost model
    /// knows before the run).
    pub predicted_mean_costs: f64,
    /// Measured makespan of the compute phase (µs), and the simulated one.
    pub measured_makespan_us: f64,
    pub predicted_makespan_us: f64,
}

/// Compares a recorded step with the simulator (see [`BubbleReport`]).
///
/// # Errors
/// When the trace has no compute events or the program cannot be simulated.
pub fn bubble_report(plan: &Plan, trace: &Trace) -> Result<BubbleReport, crate::trace::TraceError> {
    use crate::schedule::{Costs, Op, simulate_with};
    let compute = || trace.events.iter().filter(|e| e.kind.is_compute());
    let first = compute().map(|e| e.start).fold(f64::INFINITY, f64::min);
    let last = compute().map(|e| e.end).fold(f64::NEG_INFINITY, f64::max);
    if !first.is_finite() {
        return Err(crate::trace::TraceError::Empty { what: "compute events" });
    }
    let makespan = last - first;
    let mut measured = 0.0f64;
    for r in 0..plan.pp as u32 {
        let busy: f64 = compute().filter(|e| e.rank == r).map(|e| e.end - e.start).sum();
        if busy > 0.0 {
            measured = measured.max((makespan - busy) / busy);
        }
    }
    let mut global = crate::trace::estimate_costs(trace)?;
    // Transit time: sends whose arrival was observed (see `trace_of`).
    let transits: Vec<f64> = trace
        .events
        .iter()
        .filter(|e| matches!(e.kind, OpKind::SendAct | OpKind::SendGrad) && e.end > e.start)
        .map(|e| e.end - e.start)
        .collect();
    global.latency =
        if transits.is_empty() { 0.0 } else { transits.iter().sum::<f64>() / transits.len() as f64 };
    let mut each: std::collections::HashMap<(u32, OpKind, u32, u32), f64> = std::collections::HashMap::new();
    let mut sums: std::collections::HashMap<(u32, u32, OpKind), (f64, f64)> =
        std::collections::HashMap::new();
    for e in compute() {
        if let (Some(mb), Some(c)) = (e.mb, e.chunk) {
            each.insert((e.rank, e.kind, mb, c), e.end - e.start);
            let s = sums.entry((e.rank, c, e.kind)).or_default();
            *s = (s.0 + e.end - e.start, s.1 + 1.0);
        }
    }
    let mean = |r: u32, c: u32, kind: OpKind| sums.get(&(r, c, kind)).map(|(t, n)| t / n);
    let with = |d: f64, kind: OpKind| {
        let mut c = global;
        match kind {
            OpKind::Forward => c.forward = d,
            OpKind::Backward => c.backward = d,
            OpKind::BackwardInput => c.backward_input = d,
            OpKind::BackwardWeight => c.backward_weight = d,
            _ => {}
        }
        c
    };
    let per_op = |r: usize, op: Op| -> Costs {
        let kind = op.kind();
        match op.pair() {
            Some((mb, c)) if kind.is_compute() => {
                let d = each.get(&(r as u32, kind, mb, c)).copied().or_else(|| mean(r as u32, c, kind));
                d.map_or(global, |d| with(d, kind))
            }
            _ => global,
        }
    };
    let per_stage = |r: usize, op: Op| -> Costs {
        let kind = op.kind();
        match op.pair() {
            Some((_, c)) if kind.is_compute() => mean(r as u32, c, kind).map_or(global, |d| with(d, kind)),
            _ => global,
        }
    };
    let sim = simulate_with(&plan.program, &per_op)?;
    let sim_mean = simulate_with(&plan.program, &per_stage)?;
    Ok(BubbleReport {
        measured,
        predicted: sim.stats.bubble,
        predicted_mean_costs: sim_mean.stats.bubble,
        measured_makespan_us: makespan,
        predicted_makespan_us: sim.stats.makespan,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(rank: usize, actor: &str, detail: &str) -> RuntimeError {
        RuntimeError::Actor { actor: actor.into(), rank, step: 2, op: "0RED".into(), detail: detail.into() }
    }

    /// A hung rank 3 seen from the ranks that wait on it: every waiter's timeout is a
    /// consequence, so the hung rank's own report is the root cause whatever the order.
    #[test]
    fn waiting_in_vain_is_a_consequence_and_the_failure_itself_is_the_root_cause() {
        let waits = [
            actor(0, "grad-reducer", "bucket 0 not reduced within 1s"),
            actor(1, "stage[0]", "send not handed over within 1s"),
            actor(
                1,
                "stage[0]",
                "no gradient for microbatch 3 from rank 3 arrived within 1s (is it dead or hung?)",
            ),
            actor(2, "supervisor", "not done within 1s"),
        ];
        for w in &waits {
            assert!(w.is_consequence(), "{w}");
        }
        let hung = actor(3, "watchdog", "rank 3 made no progress for 1.1 s: hung");
        assert!(!hung.is_consequence());
        let mut all: Vec<&RuntimeError> = waits.iter().collect();
        all.push(&hung);
        assert_eq!(root_cause_index(&all), Some(4));
        all.rotate_right(2);
        assert_eq!(root_cause_index(&all), Some(1));
        // Corruption is a failure even though the receiver reports it.
        let corrupt = actor(1, "stage[0]", "receiving the gradient of microbatch 1: corrupt message");
        assert!(!corrupt.is_consequence());
    }
}
