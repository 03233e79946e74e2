//! The actors of one rank, on `ractor`:
//!
//! - [`Supervisor`] spawns and links the others and owns the step loop: it asks the
//!   [`DataFeeder`] for the step's microbatches, tells every [`StageActor`] to run, collects the
//!   reduced gradients from the [`GradReducer`], agrees with every rank on the loss, the gradient
//!   norm and whether anything is non-finite, and has the [`OptimizerShard`] update.
//! - A [`StageActor`] per local model chunk executes that chunk's instructions of the rank's
//!   schedule program in order: compute on the compute thread ([`super::compute`]), activations
//!   out with `SendAct`, gradients with `SendGrad`, receives posted at their `Recv*` and buffered
//!   in the rank's [`Mailbox`] until their instruction comes.
//! - The [`GradReducer`] starts a data-parallel all-reduce (or reduce-scatter) per gradient bucket
//!   as soon as the compute thread hands it over — during the chunk's last backward — so it runs
//!   while the remaining backward work runs.
//! - The [`OptimizerShard`] holds AdamW moments for this rank's shard of the parameters.
//! - The [`DataFeeder`] prefetches the next step's microbatches on a blocking thread.
//!
//! Every failure becomes a [`RuntimeError`] naming the actor, rank, step and instruction; every
//! wait is bounded by the communication timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::comm::{Buf, Comm, DType, GroupKind, ReduceOp, Topology, Work, chunk_range};
use crate::config::{Config, NanPolicy};
use crate::data::SampleSource;
use crate::kernels::CpuBackend;
use crate::models::Gpt;
use crate::models::gpt::StageInput;
use crate::optim::{AdamWConfig, LrSchedule, clip_coefficient, norm_from_tensor_sums};
use crate::schedule::{Op, OpKind};
use crate::trace::{Event, actor_of};

use super::compute::{Compute, Engine, JobError, ReadyBucket};
use super::mailbox::{Dir, Key, Mailbox};
use super::plan::{Plan, buckets};
use super::shard::ChunkShard;
use super::{RankResult, RunEvent, RunOptions, RuntimeError, StepRecord};

/// Microseconds since the Unix epoch for an `Instant` (shared clock for traces across ranks
/// and processes on one host).
#[derive(Clone, Copy)]
struct Clock {
    at: Instant,
    unix_us: f64,
}

impl Clock {
    fn now() -> Clock {
        let unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e6);
        Clock { at: Instant::now(), unix_us }
    }
    fn us(&self, t: Instant) -> f64 {
        if t >= self.at {
            self.unix_us + (t - self.at).as_secs_f64() * 1e6
        } else {
            self.unix_us - (self.at - t).as_secs_f64() * 1e6
        }
    }
}

/// The step's input: token ids (first stage) and targets (last stage), per local microbatch.
#[derive(Debug, Default)]
pub struct StepBatch {
    pub tokens: Vec<Vec<u32>>,
    pub targets: Vec<Vec<u32>>,
}

/// What every actor of a rank shares.
pub struct RankCtx {
    pub world_rank: usize,
    pub pp_rank: usize,
    pub dp_rank: usize,
    pub plan: Arc<Plan>,
    pub cfg: Config,
    pub seq: usize,
    pub timeout: Duration,
    pub world: Arc<dyn Comm>,
    pub pp: Arc<dyn Comm>,
    pub dp: Arc<dyn Comm>,
    /// The embedding group (first and last pipeline rank) when they are different ranks.
    pub emb: Option<Arc<dyn Comm>>,
    pub mailbox: Mailbox,
    pub compute: Compute,
    /// Which steps record trace events, and the events.
    pub record_step: Option<u64>,
    pub events: std::sync::Mutex<Vec<Event>>,
    clock: Clock,
    /// Bytes sent by pipeline p2p this run.
    pub sent_bytes: AtomicU64,
    pub messages: AtomicU64,
    pub instructions: AtomicU64,
    /// Time spent outside compute while executing instructions (actor and messaging overhead).
    pub overhead_ns: AtomicU64,
}

impl RankCtx {
    fn record(&self, step: u64, kind: OpKind, mb: Option<u32>, chunk: Option<u32>, span: (f64, f64), bytes: Option<u64>, peer: Option<u32>) {
        if self.record_step != Some(step) || self.dp_rank != 0 {
            return;
        }
        let e = Event {
            rank: self.pp_rank as u32,
            actor: actor_of(kind).to_string(),
            kind,
            mb,
            chunk,
            start: span.0,
            end: span.1,
            bytes,
            peer,
        };
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(e);
    }

    fn now_us(&self) -> f64 {
        self.clock.us(Instant::now())
    }

    fn tag(step: u64, dir: Dir, mb: u32, chunk: u32) -> u64 {
        ((step & 0xFFFF_FFFF) << 32) | (u64::from(dir == Dir::Grad) << 31) | (u64::from(chunk) << 20) | u64::from(mb)
    }

    fn hidden_len(&self) -> usize {
        self.plan.micro_batch_size * self.seq * self.cfg.model.hidden_size
    }

    fn job_err(&self, actor: &str, step: u64, op: &str, e: JobError) -> RuntimeError {
        RuntimeError::Actor {
            actor: actor.to_string(),
            rank: self.world_rank,
            step,
            op: op.to_string(),
            detail: match e {
                JobError::Panicked(m) => format!("compute job panicked: {m}"),
                JobError::Gone => "the compute thread is gone".into(),
            },
        }
    }
}

/// Work for one step of one stage actor.
pub struct StageStep {
    pub step: u64,
    /// Ticket of this rank's first compute instruction this step.
    pub base_ticket: u64,
    pub batch: Arc<StepBatch>,
}

/// What a stage actor reports after a step.
#[derive(Debug, Default)]
pub struct StageReport {
    /// Loss of each microbatch (last stage only), by microbatch.
    pub losses: Vec<(u32, f32)>,
}

pub enum StageMsg {
    Run(StageStep, RpcReplyPort<Result<StageReport, RuntimeError>>),
}

/// Executes one chunk's instructions; see the module docs.
pub struct StageActor;

pub struct StageState {
    ctx: Arc<RankCtx>,
    chunk: usize,
    /// This chunk's instructions with, for compute ones, their ticket offset in the step.
    ops: Vec<(Op, Option<u64>, usize)>,
}

impl Actor for StageActor {
    type Msg = StageMsg;
    type State = StageState;
    type Arguments = (Arc<RankCtx>, usize);

    async fn pre_start(&self, _me: ActorRef<StageMsg>, (ctx, chunk): (Arc<RankCtx>, usize)) -> Result<StageState, ActorProcessingErr> {
        let mut ops = Vec::new();
        let mut k = 0u64;
        for (i, op) in ctx.plan.program.ranks[ctx.pp_rank].iter().enumerate() {
            let ticket = op.kind().is_compute().then(|| {
                k += 1;
                k - 1
            });
            if op.chunk() == Some(chunk as u32) {
                ops.push((*op, ticket, i));
            }
        }
        Ok(StageState { ctx, chunk, ops })
    }

    async fn handle(&self, _me: ActorRef<StageMsg>, msg: StageMsg, st: &mut StageState) -> Result<(), ActorProcessingErr> {
        let StageMsg::Run(work, reply) = msg;
        let r = run_stage(st, &work).await;
        let _ = reply.send(r);
        Ok(())
    }
}

async fn run_stage(st: &StageState, w: &StageStep) -> Result<StageReport, RuntimeError> {
    let ctx = &st.ctx;
    let plan = &ctx.plan;
    let program = &plan.program;
    let c = st.chunk;
    let stage = program.stage_of(ctx.pp_rank, c);
    let last_stage = plan.num_stages() - 1;
    let (mbs, seq) = (plan.micro_batch_size, ctx.seq);
    let scale = 1.0 / (plan.microbatches * plan.dp) as f32;
    let step = w.step;
    let mut report = StageReport::default();
    let mut outbox: std::collections::HashMap<Key, Vec<f32>> = std::collections::HashMap::new();
    let mut sends: Vec<(Op, Work<()>)> = Vec::new();
    let fail = |op: &Op, index: usize, detail: String| RuntimeError::Actor {
        actor: format!("stage[{c}]"),
        rank: ctx.world_rank,
        step,
        op: format!("{op} (#{index})"),
        detail,
    };
    for &(op, ticket, index) in &st.ops {
        let t_op = Instant::now();
        let mut compute_ns = 0u64;
        ctx.instructions.fetch_add(1, Ordering::Relaxed);
        match op {
            Op::Forward { mb, .. } => {
                let input = if stage == 0 {
                    None
                } else {
                    let key = (Dir::Act, mb, c as u32);
                    Some(take(ctx, key).await.map_err(|d| fail(&op, index, d))?)
                };
                let batch = w.batch.clone();
                let head = stage == last_stage;
                let ticket = w.base_ticket + ticket.unwrap_or(0);
                let (r, t0, t1) = ctx
                    .compute
                    .run(ticket, move |e: &mut Engine| {
                        let Engine { be, chunks, .. } = e;
                        let g = &mut chunks[c];
                        let i = mb as usize;
                        let input = match &input {
                            None => StageInput::Tokens(&batch.tokens[i]),
                            Some(h) => StageInput::Hidden(h),
                        };
                        let targets = head.then(|| &batch.targets[i][..]);
                        let loss = g.forward(&**be, u64::from(mb), mbs, seq, input, targets, scale)?;
                        let out = if head { None } else { g.output(u64::from(mb)).map(<[f32]>::to_vec) };
                        e.note_in_flight(c);
                        Ok::<_, crate::models::gpt::ModelError>((loss, out))
                    })
                    .await
                    .map_err(|e| ctx.job_err(&format!("stage[{c}]"), step, &op.to_string(), e))?;
                let (loss, out) = r.map_err(|e| fail(&op, index, e.to_string()))?;
                compute_ns += (t1 - t0).as_nanos() as u64;
                ctx.record(step, OpKind::Forward, Some(mb), Some(c as u32), (ctx.clock.us(t0), ctx.clock.us(t1)), None, None);
                if let Some(l) = loss {
                    report.losses.push((mb, l));
                }
                if let Some(out) = out {
                    let (r, c2) = program.locate(stage + 1);
                    if r == ctx.pp_rank {
                        ctx.mailbox.put((Dir::Act, mb, c2 as u32), Ok(out));
                    } else {
                        outbox.insert((Dir::Act, mb, c as u32), out);
                    }
                }
            }
            Op::Backward { mb, .. } | Op::BackwardInput { mb, .. } => {
                let dout = if stage == last_stage {
                    None
                } else {
                    Some(take(ctx, (Dir::Grad, mb, c as u32)).await.map_err(|d| fail(&op, index, d))?)
                };
                let split = matches!(op, Op::BackwardInput { .. });
                let ticket = w.base_ticket + ticket.unwrap_or(0);
                let first = stage == 0;
                let (r, t0, t1) = ctx
                    .compute
                    .run(ticket, move |e: &mut Engine| {
                        if split {
                            e.chunks[c].backward_input(&*e.be, u64::from(mb), dout.as_deref())?;
                        } else {
                            weight_backward(e, c, mb, dout.as_deref(), false)?;
                        }
                        Ok::<_, crate::models::gpt::ModelError>((!first).then(|| e.chunks[c].input_grad().to_vec()))
                    })
                    .await
                    .map_err(|e| ctx.job_err(&format!("stage[{c}]"), step, &op.to_string(), e))?;
                let dinp = r.map_err(|e| fail(&op, index, e.to_string()))?;
                compute_ns += (t1 - t0).as_nanos() as u64;
                ctx.record(step, op.kind(), Some(mb), Some(c as u32), (ctx.clock.us(t0), ctx.clock.us(t1)), None, None);
                if let Some(d) = dinp {
                    let (r, c2) = program.locate(stage - 1);
                    if r == ctx.pp_rank {
                        ctx.mailbox.put((Dir::Grad, mb, c2 as u32), Ok(d));
                    } else {
                        outbox.insert((Dir::Grad, mb, c as u32), d);
                    }
                }
            }
            Op::BackwardWeight { mb, .. } => {
                let ticket = w.base_ticket + ticket.unwrap_or(0);
                let (r, t0, t1) = ctx
                    .compute
                    .run(ticket, move |e: &mut Engine| weight_backward(e, c, mb, None, true))
                    .await
                    .map_err(|e| ctx.job_err(&format!("stage[{c}]"), step, &op.to_string(), e))?;
                r.map_err(|e| fail(&op, index, e.to_string()))?;
                compute_ns += (t1 - t0).as_nanos() as u64;
                ctx.record(step, OpKind::BackwardWeight, Some(mb), Some(c as u32), (ctx.clock.us(t0), ctx.clock.us(t1)), None, None);
            }
            Op::SendAct { mb, peer, .. } | Op::SendGrad { mb, peer, .. } => {
                let dir = if matches!(op, Op::SendAct { .. }) { Dir::Act } else { Dir::Grad };
                let data = outbox
                    .remove(&(dir, mb, c as u32))
                    .ok_or_else(|| fail(&op, index, format!("no {} of microbatch {mb} to send", dir.name())))?;
                let consumer = if dir == Dir::Act { stage + 1 } else { stage - 1 };
                let (_, c2) = program.locate(consumer);
                let bytes = 4 * data.len() as u64;
                let t = ctx.now_us();
                let work = ctx.pp.send(Buf::F32(data), peer as usize, RankCtx::tag(step, dir, mb, c2 as u32));
                ctx.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                ctx.messages.fetch_add(1, Ordering::Relaxed);
                ctx.record(step, op.kind(), Some(mb), Some(c as u32), (t, t), Some(bytes), Some(peer));
                sends.push((op, work));
            }
            Op::RecvAct { mb, peer, .. } | Op::RecvGrad { mb, peer, .. } => {
                let dir = if matches!(op, Op::RecvAct { .. }) { Dir::Act } else { Dir::Grad };
                let key = (dir, mb, c as u32);
                let work = ctx.pp.recv(DType::F32, ctx.hidden_len(), peer as usize, RankCtx::tag(step, dir, mb, c as u32));
                let ctx2 = st.ctx.clone();
                let posted = ctx.now_us();
                let kind = op.kind();
                tokio::spawn(async move {
                    let r = match work.await {
                        Ok(Buf::F32(v)) => Ok(v),
                        Ok(other) => Err(format!("expected f32 {}, got {:?}", dir.name(), other.dtype())),
                        Err(e) => Err(e.to_string()),
                    };
                    let bytes = r.as_ref().map(|v| 4 * v.len() as u64).ok();
                    ctx2.record(step, kind, Some(mb), Some(key.2), (posted, ctx2.now_us()), bytes, Some(peer));
                    ctx2.mailbox.put(key, r);
                });
            }
            Op::ReduceGrads { .. } | Op::OptimizerStep => {}
        }
        let total = t_op.elapsed().as_nanos() as u64;
        ctx.overhead_ns.fetch_add(total.saturating_sub(compute_ns), Ordering::Relaxed);
    }
    for (op, work) in sends {
        tokio::time::timeout(ctx.timeout, work)
            .await
            .map_err(|_| fail(&op, 0, format!("send not handed over within {:?}", ctx.timeout)))?
            .map_err(|e| RuntimeError::Comm { rank: ctx.world_rank, step, op: op.to_string(), source: e })?;
    }
    Ok(report)
}

/// Takes a message from the mailbox within the timeout; the error text says what was awaited.
async fn take(ctx: &RankCtx, key: Key) -> Result<Vec<f32>, String> {
    match ctx.mailbox.take(key, ctx.timeout).await {
        Ok(Ok(v)) if v.len() == ctx.hidden_len() => Ok(v),
        Ok(Ok(v)) => Err(format!("{} of microbatch {} has {} values, expected {}", key.0.name(), key.1, v.len(), ctx.hidden_len())),
        Ok(Err(e)) => Err(format!("receiving the {} of microbatch {}: {e}", key.0.name(), key.1)),
        Err(()) => Err(format!(
            "no {} for microbatch {} arrived within {:?} (peer dead or hung?)",
            key.0.name(),
            key.1,
            ctx.timeout
        )),
    }
}

/// Full backward (`weight_only == false`, with `dout`) or the W half of a split one, of `(mb,
/// chunk)`. On the chunk's last weight-producing backward of the step, finished gradient
/// buckets go to the reducer as the backward produces them, the head's tied gradient is folded,
/// and the remaining buckets (with `wte`) follow.
fn weight_backward(e: &mut Engine, c: usize, mb: u32, dout: Option<&[f32]>, weight_only: bool) -> Result<(), crate::models::gpt::ModelError> {
    e.weight_done[c] += 1;
    let last = e.weight_done[c] == e.microbatches;
    let Engine { be, chunks, buckets, bucket_tx, handed, .. } = e;
    let g = &mut chunks[c];
    let wte = g.wte_range();
    let mut hook = |range: std::ops::Range<usize>, arena: &[f32]| {
        if last && let Some(tx) = bucket_tx.as_ref() {
            for (index, b) in buckets[c].iter().enumerate() {
                let is_wte = Some(&b.range) == wte.as_ref();
                if !is_wte && !handed[c][index] && b.range.start >= range.start {
                    handed[c][index] = true;
                    tx(ReadyBucket { chunk: c, index, range: b.range.clone(), data: arena[b.range.clone()].to_vec() });
                }
            }
        }
    };
    if weight_only {
        g.backward_weight_with(&**be, u64::from(mb), &mut hook)?;
    } else {
        g.backward_with(&**be, u64::from(mb), dout, &mut hook)?;
    }
    if last {
        g.fold_tied_grad(&**be);
        let arena = g.grads().to_vec();
        e.hand_buckets(c, &arena, None);
    }
    Ok(())
}

