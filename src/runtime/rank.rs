//! The actors of one rank, on `ractor`:
//!
//! - [`Supervisor`] spawns and links the others and owns the step loop: it asks the
//!   [`DataFeeder`] for the step's microbatches, tells every [`StageActor`] to run, collects the
//!   reduced gradients from the [`GradReducer`], agrees with every rank on the loss, the gradient
//!   norm and whether anything is non-finite, and has the [`OptimizerShard`] update.
//! - A [`StageActor`] per local model chunk executes that chunk's instructions of the rank's
//!   schedule program in order: compute on the compute thread (`super::compute`), activations
//!   out with `SendAct`, gradients with `SendGrad`, receives posted at their `Recv*` and buffered
//!   in the rank's `Mailbox` until their instruction comes.
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
use crate::gpu::stage::{LinkOp, LinkTiming};
use crate::kernels::CpuBackend;
use crate::models::gpt::StageInput;
use crate::models::gpt::{Gpt, Hidden, ModelError};
use crate::optim::{AdamWConfig, LrSchedule, clip_coefficient, norm_from_tensor_sums};
use crate::schedule::{Op, OpKind};
use crate::trace::{Event, actor_of};

use super::compute::{Compute, Engine, JobError, ReadyBucket};
use super::mailbox::{Dir, Key, Mailbox};
use super::plan::{Bucket, Plan, buckets};
use super::shard::ChunkShard;
use super::wire::Wire;
use super::{RankResult, RunEvent, RunOptions, RuntimeError, StepRecord};

/// See [`RankCtx::waiting`].
pub struct WaitGuard<'a>(&'a RankCtx);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.progress_ms.store(self.0.clock.at.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Entries kept by the flight recorder.
const FLIGHT: usize = 64;

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
    /// This rank's injected faults, with the instruction index each fires at (pipeline phases).
    pub faults: Vec<(super::faults::Fault, Option<usize>)>,
    pub fault_plan: super::faults::FaultPlan,
    /// How pipeline messages travel (precision, checksums).
    pub wire: Wire,
    /// Pipeline messages to and from other ranks travel between the devices, over the chunks'
    /// device links ([`super::device_messages`]): sends and receives are queued by compute
    /// jobs, in program order, and carry nothing through the host.
    pub device_links: bool,
    /// The stop request shared with the signal handler.
    pub stop: Option<Arc<AtomicBool>>,
    /// The last instructions and messages, dumped when the rank fails.
    pub flight: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// Milliseconds since the clock's origin at the last sign of progress.
    pub progress_ms: AtomicU64,
    /// Waits on peers in progress: a rank waiting for a message or collective is not hung (the
    /// communication timeout names the silent peer instead).
    pub waiting: std::sync::atomic::AtomicUsize,
    pub events: std::sync::Mutex<Vec<Event>>,
    clock: Clock,
    /// Bytes sent by pipeline p2p this run (activations and gradients together), and of them
    /// the gradients.
    pub sent_bytes: AtomicU64,
    pub sent_grad_bytes: AtomicU64,
    pub messages: AtomicU64,
    pub instructions: AtomicU64,
    /// Time spent outside compute while executing instructions (actor and messaging overhead).
    pub overhead_ns: AtomicU64,
    /// Time in compute jobs of pipeline instructions.
    pub busy_ns: AtomicU64,
    /// Time instructions waited for a message.
    pub waited_ns: AtomicU64,
}

impl RankCtx {
    /// The world rank of pipeline rank `pp_rank` in this rank's data-parallel replica.
    fn world_rank_of(&self, pp_rank: usize) -> usize {
        pp_rank * self.plan.dp + self.dp_rank
    }

    /// Whether step `step`'s pipeline messages to other ranks travel over the device links:
    /// with links, every step but the traced one, whose spans should show the device's time
    /// and each message's wait (its messages go through the host, as its forwards are
    /// synchronous).
    fn links(&self, step: u64) -> bool {
        self.device_links && self.record_step != Some(step)
    }

    /// Whether `op` runs as a compute job in ticket order: compute instructions, and with
    /// device links (`links`) the sends and receives too (the device queues a pair's messages
    /// in program order on both sides, as a collective over the pair needs).
    fn ticketed(op: &Op, links: bool) -> bool {
        op.kind().is_compute() || (links && op.peer().is_some())
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        step: u64,
        kind: OpKind,
        mb: Option<u32>,
        chunk: Option<u32>,
        span: (f64, f64),
        bytes: Option<u64>,
        peer: Option<u32>,
    ) {
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

    /// Notes an event in the flight recorder and marks progress.
    pub fn note(&self, step: u64, what: impl FnOnce() -> String) {
        let ms = self.clock.at.elapsed().as_millis() as u64;
        self.progress_ms.store(ms, Ordering::Relaxed);
        let mut f = self.flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() == FLIGHT {
            f.pop_front();
        }
        f.push_back(format!(
            "+{:>9.3} ms  step {step}  {}",
            self.clock.at.elapsed().as_secs_f64() * 1e3,
            what()
        ));
    }

    /// Marks a wait on peers until the guard drops.
    pub fn waiting(&self) -> WaitGuard<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        WaitGuard(self)
    }

    /// The flight recorder's contents, oldest first.
    pub fn flight_dump(&self) -> Vec<String> {
        self.flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
    }

    /// The fault of `kind`s that fires at instruction `index` of `step`, if any.
    fn fault_at(
        &self,
        step: u64,
        index: usize,
        kinds: &[super::faults::FaultKind],
    ) -> Option<&super::faults::Fault> {
        self.faults.iter().find_map(|(f, i)| {
            (f.step == step && *i == Some(index) && kinds.contains(&f.kind) && self.fault_plan.fires(f, step))
                .then_some(f)
        })
    }

    /// The fault of `kind`s placed in `phase` of `step`, if any.
    fn fault_in(
        &self,
        step: u64,
        phase: super::faults::Phase,
        kinds: &[super::faults::FaultKind],
    ) -> Option<&super::faults::Fault> {
        self.faults.iter().find_map(|(f, _)| {
            (f.step == step
                && f.phase == Some(phase)
                && kinds.contains(&f.kind)
                && self.fault_plan.fires(f, step))
            .then_some(f)
        })
    }

    fn tag(step: u64, dir: Dir, mb: u32, chunk: u32) -> u64 {
        ((step & 0xFFFF_FFFF) << 32)
            | (u64::from(dir == Dir::Grad) << 31)
            | (u64::from(chunk) << 20)
            | u64::from(mb)
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
    /// This chunk's instructions with, for compute ones, their ticket offset in the step:
    /// with messages through the host, and over device links (sends and receives ticketed).
    ops: Vec<(Op, Option<u64>, usize)>,
    ops_links: Vec<(Op, Option<u64>, usize)>,
}

impl Actor for StageActor {
    type Msg = StageMsg;
    type State = StageState;
    type Arguments = (Arc<RankCtx>, usize);

    async fn pre_start(
        &self,
        _me: ActorRef<StageMsg>,
        (ctx, chunk): (Arc<RankCtx>, usize),
    ) -> Result<StageState, ActorProcessingErr> {
        let program = &ctx.plan.program.ranks[ctx.pp_rank];
        let ticketed = |links: bool| {
            let mut ops = Vec::new();
            let mut k = 0u64;
            for (i, op) in program.iter().enumerate() {
                let ticket = RankCtx::ticketed(op, links).then(|| {
                    k += 1;
                    k - 1
                });
                if op.chunk() == Some(chunk as u32) {
                    ops.push((*op, ticket, i));
                }
            }
            ops
        };
        let (ops, ops_links) = (ticketed(false), ticketed(true));
        Ok(StageState { ctx, chunk, ops, ops_links })
    }

    async fn handle(
        &self,
        _me: ActorRef<StageMsg>,
        msg: StageMsg,
        st: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
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
    let mut outbox: std::collections::HashMap<Key, Hidden> = std::collections::HashMap::new();
    let mut sends: Vec<(Op, Work<()>)> = Vec::new();
    let fail = |op: &Op, index: usize, detail: String| RuntimeError::Actor {
        actor: format!("stage[{c}]"),
        rank: ctx.world_rank,
        step,
        op: format!("{op} (#{index})"),
        detail,
    };
    let waited0 = ctx.waited_ns.load(Ordering::Relaxed) + ctx.compute.queued_ns.load(Ordering::Relaxed);
    let t_all = Instant::now();
    let busy_start = ctx.busy_ns.load(Ordering::Relaxed);
    use super::faults::{FaultKind as K, Target};
    let mut held: Option<(Op, Buf, usize, u64)> = None;
    let links = ctx.links(step);
    let list = if links { &st.ops_links } else { &st.ops };
    // The instruction index of a receive queued with the send before it.
    let mut grouped: Option<usize> = None;
    for (pos, &(op, ticket, index)) in list.iter().enumerate() {
        ctx.note(step, || format!("#{index} {op} start"));
        if !matches!(op, Op::SendAct { .. } | Op::SendGrad { .. })
            && let Some((hop, buf, hpeer, htag)) = held.take()
        {
            // No later send overtook the held message before this instruction, which may wait
            // on its consequences: send it now.
            sends.push((hop, ctx.pp.send(buf, hpeer, htag)));
        }
        let mut boom = false;
        if let Some(f) = ctx.fault_at(step, index, &[K::Crash, K::Exit, K::Hang]) {
            match f.kind {
                K::Exit => {
                    eprintln!("troupe: injected fault {}: rank {} exits now", f.describe(), ctx.world_rank);
                    std::process::exit(43);
                }
                K::Hang => {
                    ctx.note(step, || format!("#{index} {op}: injected hang ({})", f.describe()));
                    std::future::pending::<()>().await;
                }
                _ => boom = true,
            }
        }
        if let Some(f) = ctx.fault_at(step, index, &[K::Sigterm]) {
            ctx.note(step, || format!("#{index} {op}: injected {}", f.describe()));
            if let Some(flag) = &ctx.stop {
                flag.store(true, Ordering::SeqCst);
            }
        }
        // A straggler: every compute instruction of the step from the fault's position on.
        let slow = ctx
            .faults
            .iter()
            .find(|(f, i)| f.kind == K::Slow && f.step == step && i.is_some_and(|i| index >= i))
            .map(|(f, _)| f.factor.unwrap_or(4.0));
        let poison = ctx.fault_at(step, index, &[K::Nan, K::Inf]).map(|f| {
            let v = if f.kind == K::Nan { f32::NAN } else { f32::INFINITY };
            (f.what.unwrap_or(if matches!(op, Op::Forward { .. }) { Target::Act } else { Target::Grad }), v)
        });
        let msg_fault =
            ctx.fault_at(step, index, &[K::Drop, K::Delay, K::Duplicate, K::Reorder, K::Corrupt]).cloned();
        let mut compute_ns = 0u64;
        ctx.instructions.fetch_add(1, Ordering::Relaxed);
        match op {
            Op::Forward { mb, .. } => {
                // With device links the input arrived on the device (over a link, or handed by
                // the previous stage of this rank) and the output stays there: for its send, or
                // handed now to the next stage of this rank.
                let arrived_in = stage > 0 && links;
                let out_on_device = stage < last_stage && links;
                let hand_to = (stage < last_stage && links)
                    .then(|| program.locate(stage + 1))
                    .filter(|&(r, _)| r == ctx.pp_rank)
                    .map(|(_, c2)| c2);
                let input = if stage == 0 || arrived_in {
                    None
                } else {
                    let key = (Dir::Act, mb, c as u32);
                    let from = program.locate(stage - 1).0;
                    Some(take(ctx, key, from).await.map_err(|d| fail(&op, index, d))?)
                };
                let batch = w.batch.clone();
                let head = stage == last_stage;
                let defer_loss = ctx.record_step != Some(step);
                let ticket = w.base_ticket + ticket.unwrap_or(0);
                let (r, t0, t1) = ctx
                    .compute
                    .run(ticket, move |e: &mut Engine| {
                        assert!(!boom, "injected failure");
                        let Engine { be, chunks, .. } = e;
                        let g = &mut chunks[c];
                        let i = mb as usize;
                        let input = match &input {
                            None if arrived_in => StageInput::Arrived,
                            None => StageInput::Tokens(&batch.tokens[i]),
                            Some(h) => h.as_input(),
                        };
                        let targets = head.then(|| &batch.targets[i][..]);
                        let t = Instant::now();
                        // A device head's loss stays there until the step's end (take_losses),
                        // except in the traced step, whose spans should be the device's.
                        let mut loss = if defer_loss {
                            g.forward_train(&**be, u64::from(mb), mbs, seq, input, targets, scale)?
                        } else {
                            g.forward(&**be, u64::from(mb), mbs, seq, input, targets, scale)?
                        };
                        let mut out = if head || out_on_device { None } else { g.output(u64::from(mb))? };
                        match poison {
                            Some((Target::Act, v)) if out_on_device => g.poison_output(u64::from(mb), v)?,
                            Some((Target::Act, v)) if out.is_some() => {
                                if let Some(o) = out.as_mut() {
                                    o.set_first(v);
                                }
                            }
                            Some((_, v)) if loss.is_some() => loss = Some(v),
                            Some((_, v)) if head => {
                                g.override_deferred_loss(u64::from(mb), v);
                            }
                            _ => {}
                        }
                        if let Some(c2) = hand_to {
                            let (g, next) = two_mut(chunks, c, c2);
                            g.hand_output(u64::from(mb), next)?;
                        }
                        e.note_in_flight(c);
                        if let Some(f) = slow {
                            std::thread::sleep(t.elapsed().mul_f64((f - 1.0).max(0.0)));
                        }
                        Ok::<_, crate::models::gpt::ModelError>((loss, out))
                    })
                    .await
                    .map_err(|e| ctx.job_err(&format!("stage[{c}]"), step, &format!("{op} (#{index})"), e))?;
                let (loss, out) = r.map_err(|e| fail(&op, index, e.to_string()))?;
                compute_ns += (t1 - t0).as_nanos() as u64;
                ctx.record(
                    step,
                    OpKind::Forward,
                    Some(mb),
                    Some(c as u32),
                    (ctx.clock.us(t0), ctx.clock.us(t1)),
                    None,
                    None,
                );
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
                // With device links the output's gradient arrived on the device (over a link, or
                // handed by the next stage of this rank) and the input's stays there: for its
                // send, or handed now to the previous stage of this rank.
                let dout_on_device = stage < last_stage && links;
                let dinp_on_device = stage > 0 && links;
                let hand_to = dinp_on_device
                    .then(|| program.locate(stage - 1))
                    .filter(|&(r, _)| r == ctx.pp_rank)
                    .map(|(_, c2)| c2);
                let dout = if stage == last_stage || dout_on_device {
                    None
                } else {
                    let from = program.locate(stage + 1).0;
                    Some(take(ctx, (Dir::Grad, mb, c as u32), from).await.map_err(|d| fail(&op, index, d))?)
                };
                let split = matches!(op, Op::BackwardInput { .. });
                let ticket = w.base_ticket + ticket.unwrap_or(0);
                let first = stage == 0;
                let (r, t0, t1) = ctx
                    .compute
                    .run(ticket, move |e: &mut Engine| {
                        assert!(!boom, "injected failure");
                        let t = Instant::now();
                        if split {
                            e.chunks[c].backward_input(
                                &*e.be,
                                u64::from(mb),
                                dout.as_ref().map(Hidden::as_grad),
                            )?;
                        } else {
                            let dout = dout.as_ref().map(Hidden::as_grad);
                            weight_backward(e, c, mb, dout, false, poison.map(|p| p.1))?;
                        }
                        if let Some(f) = slow {
                            std::thread::sleep(t.elapsed().mul_f64((f - 1.0).max(0.0)));
                        }
                        if let Some(c2) = hand_to {
                            let (g, prev) = two_mut(&mut e.chunks, c, c2);
                            g.hand_input_grad(u64::from(mb), prev)?;
                        }
                        Ok::<_, crate::models::gpt::ModelError>(
                            (!first && !dinp_on_device).then(|| e.chunks[c].take_input_grad()),
                        )
                    })
                    .await
                    .map_err(|e| ctx.job_err(&format!("stage[{c}]"), step, &format!("{op} (#{index})"), e))?;
                let dinp = r.map_err(|e| fail(&op, index, e.to_string()))?;
                compute_ns += (t1 - t0).as_nanos() as u64;
                ctx.record(
                    step,
                    op.kind(),
                    Some(mb),
                    Some(c as u32),
                    (ctx.clock.us(t0), ctx.clock.us(t1)),
                    None,
                    None,
                );
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
                    .run(ticket, move |e: &mut Engine| {
                        assert!(!boom, "injected failure");
                        let t = Instant::now();
                        let r = weight_backward(e, c, mb, None, true, poison.map(|p| p.1));
                        if let Some(f) = slow {
                            std::thread::sleep(t.elapsed().mul_f64((f - 1.0).max(0.0)));
                        }
                        r
                    })
                    .await
                    .map_err(|e| ctx.job_err(&format!("stage[{c}]"), step, &format!("{op} (#{index})"), e))?;
                r.map_err(|e| fail(&op, index, e.to_string()))?;
                compute_ns += (t1 - t0).as_nanos() as u64;
                ctx.record(
                    step,
                    OpKind::BackwardWeight,
                    Some(mb),
                    Some(c as u32),
                    (ctx.clock.us(t0), ctx.clock.us(t1)),
                    None,
                    None,
                );
            }
            Op::SendAct { .. } | Op::SendGrad { .. } | Op::RecvAct { .. } | Op::RecvGrad { .. } if links => {
                let ticket = w.base_ticket + ticket.unwrap_or(0);
                if grouped == Some(index) {
                    // Queued with the send before it: only its turn on the compute thread.
                    ctx.compute.run(ticket, |_: &mut Engine| ()).await.map_err(|e| {
                        ctx.job_err(&format!("stage[{c}]"), step, &format!("{op} (#{index})"), e)
                    })?;
                    continue;
                }
                // A receive from the same peer right after a send (the rank's next instruction)
                // joins it in one group, so the exchange's two directions progress together.
                let next = list.get(pos + 1).map(|x| x.0).filter(|n| {
                    list[pos + 1].2 == index + 1
                        && matches!(op, Op::SendAct { .. } | Op::SendGrad { .. })
                        && matches!(n, Op::RecvAct { .. } | Op::RecvGrad { .. })
                        && n.peer() == op.peer()
                });
                let batch = (mbs, seq);
                let ops: Vec<LinkOp> =
                    std::iter::once(op).chain(next).filter_map(|o| link_op(o, batch)).collect();
                // Injected corruption: of this send (a damaged copy goes out), or of the receive
                // that is this rank's armed n-th of the step (`recv=`; counted in the order the
                // receives are queued), damaged as it is read.
                let mut damage = Vec::new();
                for (i, o) in std::iter::once(op).chain(next).enumerate() {
                    let hit = match o {
                        Op::SendAct { .. } | Op::SendGrad { .. } => {
                            msg_fault.as_ref().is_some_and(|f| f.kind == K::Corrupt && i == 0)
                        }
                        _ => ctx.mailbox.count_device_arrival(),
                    };
                    if hit {
                        ctx.note(step, || {
                            format!("#{} {o}: injected corrupt (on the device link)", index + i)
                        });
                        damage.push(i);
                    }
                }
                let (r, t0, _) = ctx
                    .compute
                    .run(ticket, move |e: &mut Engine| e.chunks[c].post_messages(&ops, &damage))
                    .await
                    .map_err(|e| ctx.job_err(&format!("stage[{c}]"), step, &format!("{op} (#{index})"), e))?;
                r.map_err(|e| fail(&op, index, e.to_string()))?;
                let bytes = (ctx.hidden_len() * ctx.wire.dtype.size()) as u64;
                let t = ctx.clock.us(t0);
                for o in std::iter::once(op).chain(next) {
                    let (Some(mb), Some(peer)) = (o.pair().map(|p| p.0), o.peer()) else { continue };
                    if matches!(o, Op::SendAct { .. } | Op::SendGrad { .. }) {
                        ctx.note(step, || {
                            format!(
                                "#{index} {o}: {bytes} B queued on the device link to pipeline rank {peer}"
                            )
                        });
                        ctx.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                        if matches!(o, Op::SendGrad { .. }) {
                            ctx.sent_grad_bytes.fetch_add(bytes, Ordering::Relaxed);
                        }
                        ctx.messages.fetch_add(1, Ordering::Relaxed);
                    }
                    ctx.record(step, o.kind(), Some(mb), Some(c as u32), (t, t), Some(bytes), Some(peer));
                }
                grouped = next.map(|_| index + 1);
            }
            Op::SendAct { mb, peer, .. } | Op::SendGrad { mb, peer, .. } => {
                let dir = if matches!(op, Op::SendAct { .. }) { Dir::Act } else { Dir::Grad };
                let data = outbox.remove(&(dir, mb, c as u32)).ok_or_else(|| {
                    fail(&op, index, format!("no {} of microbatch {mb} to send", dir.name()))
                })?;
                let consumer = if dir == Dir::Act { stage + 1 } else { stage - 1 };
                let (_, c2) = program.locate(consumer);
                let bytes = ctx.wire.bytes(data.len());
                let mut data = ctx.wire.pack(data);
                let t = ctx.now_us();
                let tag = RankCtx::tag(step, dir, mb, c2 as u32);
                ctx.note(step, || format!("#{index} {op}: send {bytes} B to pipeline rank {peer}"));
                if let Some(f) = &msg_fault {
                    ctx.note(step, || format!("#{index} {op}: injected {}", f.describe()));
                    match f.kind {
                        K::Drop => continue,
                        K::Delay => tokio::time::sleep(Duration::from_millis(f.ms.unwrap_or(200))).await,
                        K::Corrupt => Wire::corrupt(&mut data),
                        K::Duplicate => sends.push((op, ctx.pp.send(data.clone(), peer as usize, tag))),
                        K::Reorder => {
                            held = Some((op, data, peer as usize, tag));
                            continue;
                        }
                        _ => {}
                    }
                }
                let work = ctx.pp.send(data, peer as usize, tag);
                ctx.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                if dir == Dir::Grad {
                    ctx.sent_grad_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                ctx.messages.fetch_add(1, Ordering::Relaxed);
                ctx.record(step, op.kind(), Some(mb), Some(c as u32), (t, t), Some(bytes), Some(peer));
                sends.push((op, work));
                if let Some((hop, buf, hpeer, htag)) = held.take() {
                    // The held-back message goes out after this one: reordered.
                    sends.push((hop, ctx.pp.send(buf, hpeer, htag)));
                }
            }
            Op::RecvAct { mb, peer, .. } | Op::RecvGrad { mb, peer, .. } => {
                let dir = if matches!(op, Op::RecvAct { .. }) { Dir::Act } else { Dir::Grad };
                let key = (dir, mb, c as u32);
                let wire = ctx.wire;
                let len = wire.elements(ctx.hidden_len());
                let work = ctx.pp.recv(wire.dtype, len, peer as usize, RankCtx::tag(step, dir, mb, c as u32));
                let world_peer = ctx.world_rank_of(peer as usize);
                let ctx2 = st.ctx.clone();
                let posted = ctx.now_us();
                let kind = op.kind();
                tokio::spawn(async move {
                    let r = match work.await {
                        Ok(buf) => wire.unpack(buf, dir.name(), world_peer),
                        Err(e) => Err(e.to_string()),
                    };
                    let bytes = r.as_ref().map(|v| wire.bytes(v.len())).ok();
                    ctx2.record(
                        step,
                        kind,
                        Some(mb),
                        Some(key.2),
                        (posted, ctx2.now_us()),
                        bytes,
                        Some(peer),
                    );
                    ctx2.mailbox.put(key, r);
                });
            }
            Op::ReduceGrads { .. } | Op::OptimizerStep => {}
        }
        ctx.busy_ns.fetch_add(compute_ns, Ordering::Relaxed);
    }
    // Overhead: the time this actor spent on its instructions apart from compute, waiting for
    // messages and waiting for the compute thread's turn. The counters are per rank, so it is
    // only measured with one chunk per rank.
    if ctx.plan.vpp == 1 {
        let waited =
            ctx.waited_ns.load(Ordering::Relaxed) + ctx.compute.queued_ns.load(Ordering::Relaxed) - waited0;
        let busy = ctx.busy_ns.load(Ordering::Relaxed) - busy_start;
        let total = t_all.elapsed().as_nanos() as u64;
        ctx.overhead_ns.fetch_add(total.saturating_sub(busy + waited), Ordering::Relaxed);
    }
    if let Some((hop, buf, hpeer, htag)) = held.take() {
        // A message held back for reordering, with no later send to overtake it.
        sends.push((hop, ctx.pp.send(buf, hpeer, htag)));
    }
    for (op, work) in sends {
        tokio::time::timeout(ctx.timeout, work)
            .await
            .map_err(|_| fail(&op, 0, format!("send not handed over within {:?}", ctx.timeout)))?
            .map_err(|e| RuntimeError::Comm {
                rank: ctx.world_rank,
                step,
                op: op.to_string(),
                source: Box::new(e),
            })?;
    }
    Ok(report)
}

/// Two distinct elements of `v`, both mutable.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b, "two_mut of one element");
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}

/// The device-link message of a send or receive instruction (`batch`: micro-batch size and
/// sequence length); `None` for other instructions.
fn link_op(op: Op, (batch, seq): (usize, usize)) -> Option<LinkOp> {
    Some(match op {
        Op::SendAct { mb, peer, .. } => LinkOp::SendOutput { mb: u64::from(mb), peer: peer as usize },
        Op::SendGrad { mb, peer, .. } => LinkOp::SendInputGrad { mb: u64::from(mb), peer: peer as usize },
        Op::RecvAct { mb, peer, .. } => {
            LinkOp::RecvInput { mb: u64::from(mb), batch, seq, peer: peer as usize }
        }
        Op::RecvGrad { mb, peer, .. } => {
            LinkOp::RecvOutputGrad { mb: u64::from(mb), batch, seq, peer: peer as usize }
        }
        _ => return None,
    })
}

/// Takes a message from the mailbox within the timeout; the error text says what was awaited,
/// and from which rank (`from_pp`, the sender's pipeline rank, in this rank's replica).
async fn take(ctx: &RankCtx, key: Key, from_pp: usize) -> Result<Hidden, String> {
    let _w = ctx.waiting();
    let t = Instant::now();
    let r = take_inner(ctx, key, ctx.world_rank_of(from_pp)).await;
    ctx.waited_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

async fn take_inner(ctx: &RankCtx, key: Key, from: usize) -> Result<Hidden, String> {
    // A second past the communication timeout: a receive that fails reports its own error
    // (naming the peer) first.
    match ctx.mailbox.take(key, ctx.timeout + Duration::from_secs(1)).await {
        Ok(Ok(v)) if v.len() == ctx.hidden_len() => Ok(v),
        Ok(Ok(v)) => Err(format!(
            "{} of microbatch {} has {} values, expected {}",
            key.0.name(),
            key.1,
            v.len(),
            ctx.hidden_len()
        )),
        Ok(Err(e)) => Err(format!("receiving the {} of microbatch {}: {e}", key.0.name(), key.1)),
        Err(()) => Err(format!(
            "no {} for microbatch {} from rank {from} arrived within {:?} (is it dead or hung?)",
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
fn weight_backward(
    e: &mut Engine,
    c: usize,
    mb: u32,
    dout: Option<crate::models::gpt::GradRef<'_>>,
    weight_only: bool,
    poison: Option<f32>,
) -> Result<(), crate::models::gpt::ModelError> {
    e.weight_done[c] += 1;
    let last = e.weight_done[c] == e.microbatches;
    let reduce = e.reduce;
    let Engine { be, chunks, buckets, bucket_tx, handed, nonfinite, .. } = e;
    let g = &mut chunks[c];
    if let Some(v) = poison {
        // An injected non-finite gradient: accumulation keeps it. A chunk that reduces on its
        // device sums it into its peers' gradients, so this rank names itself here (the host
        // reducer finds it in the bucket instead).
        g.poison_grad(v);
        if g.reduces_on_device() && !v.is_finite() {
            *nonfinite = true;
        }
    }
    let wte = g.wte_range();
    let mut hook = |range: std::ops::Range<usize>, arena: &[f32]| {
        if last && let Some(tx) = bucket_tx.as_ref() {
            for (index, b) in buckets[c].iter().enumerate() {
                let is_wte = Some(&b.range) == wte.as_ref();
                if !is_wte && !handed[c][index] && b.range.start >= range.start {
                    handed[c][index] = true;
                    let data = super::compute::finite_or_zero(arena[b.range.clone()].to_vec(), nonfinite);
                    tx(ReadyBucket { chunk: c, index, range: b.range.clone(), data });
                }
            }
        }
    };
    if weight_only {
        g.backward_weight_report(&**be, u64::from(mb), last && reduce, &mut hook)?;
    } else {
        g.backward_report(&**be, u64::from(mb), dout, last && reduce, &mut hook)?;
    }
    if last {
        // Without data parallelism nothing is reduced on the host: a device optimizer's
        // gradients stay on the device (and so do those of a chunk that reduces there).
        g.finish_grads(&**be, !reduce)?;
        e.hand_remaining_buckets(c);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GradReducer

pub enum ReducerMsg {
    /// A finished bucket: start its data-parallel reduction now.
    Bucket(ReadyBucket),
    /// Wait for every reduction started this step and hand back the results.
    Finish(u64, RpcReplyPort<Result<Vec<ReadyBucket>, RuntimeError>>),
}

/// See the module docs.
pub struct GradReducer;

/// A bucket whose reduction is in flight: chunk, bucket index, arena range, work, start (µs).
type PendingBucket = (usize, usize, std::ops::Range<usize>, Work<Buf>, f64);

pub struct ReducerState {
    ctx: Arc<RankCtx>,
    pending: Vec<PendingBucket>,
}

impl Actor for GradReducer {
    type Msg = ReducerMsg;
    type State = ReducerState;
    type Arguments = Arc<RankCtx>;

    async fn pre_start(
        &self,
        _me: ActorRef<ReducerMsg>,
        ctx: Arc<RankCtx>,
    ) -> Result<ReducerState, ActorProcessingErr> {
        Ok(ReducerState { ctx, pending: Vec::new() })
    }

    async fn handle(
        &self,
        _me: ActorRef<ReducerMsg>,
        msg: ReducerMsg,
        st: &mut ReducerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReducerMsg::Bucket(b) => {
                let t = st.ctx.now_us();
                let buf = Buf::F32(b.data);
                let work = if st.ctx.plan.distributed_optimizer {
                    st.ctx.dp.reduce_scatter(buf, ReduceOp::Sum)
                } else {
                    st.ctx.dp.all_reduce(buf, ReduceOp::Sum)
                };
                st.pending.push((b.chunk, b.index, b.range, work, t));
            }
            ReducerMsg::Finish(step, reply) => {
                let _w = st.ctx.waiting();
                let mut out = Vec::with_capacity(st.pending.len());
                let mut err = None;
                let mut span: Vec<(f64, f64)> = vec![(f64::INFINITY, 0.0); st.ctx.plan.vpp];
                for (chunk, index, range, work, t) in st.pending.drain(..) {
                    if err.is_some() {
                        continue;
                    }
                    match tokio::time::timeout(st.ctx.timeout, work).await {
                        Ok(Ok(Buf::F32(data))) => {
                            span[chunk].0 = span[chunk].0.min(t);
                            span[chunk].1 = st.ctx.now_us();
                            out.push(ReadyBucket { chunk, index, range, data });
                        }
                        Ok(Ok(_)) => {
                            err = Some(reducer_err(
                                &st.ctx,
                                step,
                                chunk,
                                "the reduction returned a non-f32 buffer".into(),
                            ))
                        }
                        Ok(Err(e)) => {
                            err = Some(RuntimeError::Comm {
                                rank: st.ctx.world_rank,
                                step,
                                op: format!("{chunk}RED (bucket {index})"),
                                source: Box::new(e),
                            })
                        }
                        Err(_) => {
                            err = Some(reducer_err(
                                &st.ctx,
                                step,
                                chunk,
                                format!("bucket {index} not reduced within {:?}", st.ctx.timeout),
                            ))
                        }
                    }
                }
                for (c, (a, b)) in span.into_iter().enumerate() {
                    if a.is_finite() {
                        st.ctx.record(step, OpKind::ReduceGrads, None, Some(c as u32), (a, b), None, None);
                    }
                }
                let _ = reply.send(match err {
                    Some(e) => Err(e),
                    None => Ok(out),
                });
            }
        }
        Ok(())
    }
}

fn reducer_err(ctx: &RankCtx, step: u64, chunk: usize, detail: String) -> RuntimeError {
    RuntimeError::Actor {
        actor: "grad-reducer".into(),
        rank: ctx.world_rank,
        step,
        op: format!("{chunk}RED"),
        detail,
    }
}

// ---------------------------------------------------------------------------------------------
// OptimizerShard

pub struct OptStep {
    pub step: u64,
    pub ticket: u64,
    pub lr: f32,
    pub clip: Option<f32>,
}

pub enum OptimizerMsg {
    Step(OptStep, RpcReplyPort<Result<(), RuntimeError>>),
    /// Bytes of optimizer state this rank holds.
    StateBytes(RpcReplyPort<usize>),
    /// A copy of the shards and the number of updates applied (for checkpoints).
    Snapshot(RpcReplyPort<(Vec<ChunkShard>, u64)>),
}

/// See the module docs.
pub struct OptimizerShard;

pub struct OptimizerState {
    ctx: Arc<RankCtx>,
    cfg: AdamWConfig,
    shards: Option<Vec<ChunkShard>>,
    updates: u64,
}

impl Actor for OptimizerShard {
    type Msg = OptimizerMsg;
    type State = OptimizerState;
    type Arguments = (Arc<RankCtx>, Vec<ChunkShard>, u64);

    async fn pre_start(
        &self,
        _me: ActorRef<OptimizerMsg>,
        (ctx, shards, updates): Self::Arguments,
    ) -> Result<OptimizerState, ActorProcessingErr> {
        let cfg = ctx.cfg.train.adamw();
        Ok(OptimizerState { ctx, cfg, shards: Some(shards), updates })
    }

    async fn handle(
        &self,
        _me: ActorRef<OptimizerMsg>,
        msg: OptimizerMsg,
        st: &mut OptimizerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            OptimizerMsg::Snapshot(reply) => {
                let _ = reply.send((st.shards.clone().unwrap_or_default(), st.updates));
            }
            OptimizerMsg::StateBytes(reply) => {
                let _ = reply.send(st.shards.iter().flatten().map(ChunkShard::state_bytes).sum());
            }
            OptimizerMsg::Step(s, reply) => {
                let Some(mut shards) = st.shards.take() else {
                    let _ = reply.send(Err(opt_err(
                        &st.ctx,
                        s.step,
                        "optimizer state lost by an earlier failure".into(),
                    )));
                    return Ok(());
                };
                st.updates += 1;
                let (cfg, updates, lr, clip) = (st.cfg, st.updates, s.lr, s.clip);
                let r = st
                    .ctx
                    .compute
                    .run(s.ticket, move |e: &mut Engine| {
                        for (c, shard) in shards.iter_mut().enumerate() {
                            e.chunks[c].optimizer_step(&*e.be, shard, &cfg, updates, lr, clip)?;
                        }
                        Ok::<_, ModelError>(shards)
                    })
                    .await;
                let out = match r {
                    Ok((Err(e), _, _)) => Err(opt_err(&st.ctx, s.step, e.to_string())),
                    Ok((Ok(shards), t0, t1)) => {
                        st.shards = Some(shards);
                        st.ctx.record(
                            s.step,
                            OpKind::OptimizerStep,
                            None,
                            None,
                            (st.ctx.clock.us(t0), st.ctx.clock.us(t1)),
                            None,
                            None,
                        );
                        Ok(())
                    }
                    Err(e) => Err(st.ctx.job_err("optimizer", s.step, "STEP", e)),
                };
                let _ = reply.send(out);
            }
        }
        Ok(())
    }
}

/// A model or device error of a supervisor job.
fn model_err(ctx: &RankCtx, step: u64, op: &str, e: ModelError) -> RuntimeError {
    RuntimeError::Actor {
        actor: "supervisor".into(),
        rank: ctx.world_rank,
        step,
        op: op.into(),
        detail: e.to_string(),
    }
}

fn opt_err(ctx: &RankCtx, step: u64, detail: String) -> RuntimeError {
    RuntimeError::Actor { actor: "optimizer".into(), rank: ctx.world_rank, step, op: "STEP".into(), detail }
}

// ---------------------------------------------------------------------------------------------
// DataFeeder

pub enum FeederMsg {
    /// The microbatches of step `step` (1-based), starting at `consumed` samples.
    Next { step: u64, consumed: u64, reply: RpcReplyPort<Result<Arc<StepBatch>, RuntimeError>> },
}

/// See the module docs.
pub struct DataFeeder;

pub struct FeederState {
    ctx: Arc<RankCtx>,
    source: Arc<dyn SampleSource>,
    want_tokens: bool,
    want_targets: bool,
    prefetch: Option<(u64, tokio::task::JoinHandle<Result<StepBatch, String>>)>,
}

fn load_batch(
    source: &dyn SampleSource,
    consumed: u64,
    plan: &Plan,
    dp_rank: usize,
    want: (bool, bool),
) -> Result<StepBatch, String> {
    let mbs = plan.micro_batch_size;
    let mut batch = StepBatch::default();
    let mut buf = crate::train::data::BatchBuf::default();
    for j in 0..plan.microbatches {
        // Megatron's order: the DP ranks take consecutive microbatches of the global batch.
        let first = consumed + ((j * plan.dp + dp_rank) * mbs) as u64;
        buf.fill(source, first, mbs).map_err(|e| e.to_string())?;
        batch.tokens.push(if want.0 { buf.tokens.clone() } else { Vec::new() });
        batch.targets.push(if want.1 { buf.targets.clone() } else { Vec::new() });
    }
    Ok(batch)
}

impl Actor for DataFeeder {
    type Msg = FeederMsg;
    type State = FeederState;
    type Arguments = (Arc<RankCtx>, Arc<dyn SampleSource>);

    async fn pre_start(
        &self,
        _me: ActorRef<FeederMsg>,
        (ctx, source): Self::Arguments,
    ) -> Result<FeederState, ActorProcessingErr> {
        let p = &ctx.plan;
        let last = p.num_stages() - 1;
        let holds = |stage: usize| p.program.locate(stage).0 == ctx.pp_rank;
        let (want_tokens, want_targets) = (holds(0), holds(last));
        Ok(FeederState { ctx, source, want_tokens, want_targets, prefetch: None })
    }

    async fn handle(
        &self,
        _me: ActorRef<FeederMsg>,
        msg: FeederMsg,
        st: &mut FeederState,
    ) -> Result<(), ActorProcessingErr> {
        let FeederMsg::Next { step, consumed, reply } = msg;
        let want = (st.want_tokens, st.want_targets);
        let spawn = |consumed: u64| {
            let (source, plan, dp_rank) = (st.source.clone(), st.ctx.plan.clone(), st.ctx.dp_rank);
            tokio::task::spawn_blocking(move || load_batch(&*source, consumed, &plan, dp_rank, want))
        };
        let handle = match st.prefetch.take() {
            Some((c, h)) if c == consumed => h,
            _ => spawn(consumed),
        };
        let r = match handle.await {
            Ok(Ok(b)) => Ok(Arc::new(b)),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(format!("the loading thread failed: {e}")),
        };
        let next = consumed + st.ctx.cfg.train.global_batch_size as u64;
        if step < st.ctx.cfg.train.train_iters {
            st.prefetch = Some((next, spawn(next)));
        }
        let _ = reply.send(r.map_err(|detail| RuntimeError::Actor {
            actor: "data-feeder".into(),
            rank: st.ctx.world_rank,
            step,
            op: "load".into(),
            detail,
        }));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Supervisor

/// What a rank is started with.
pub struct RankSetup {
    pub cfg: Config,
    pub plan: Arc<Plan>,
    pub world: Box<dyn Comm>,
    pub data: Arc<dyn SampleSource>,
    pub opts: RunOptions,
    /// Kernel threads of this rank's backend.
    pub threads: usize,
    /// Progress events (world rank 0 sends them).
    pub events: Option<std::sync::mpsc::Sender<RunEvent>>,
    /// Raised by SIGINT/SIGTERM: the ranks agree to stop after the current step.
    pub stop: Option<Arc<AtomicBool>>,
    /// The alarm of this process's store heartbeat (multi-process runs).
    pub alarm: Option<super::heartbeat::Alarm>,
}

pub enum SupMsg {
    Run(RpcReplyPort<Result<RankResult, RuntimeError>>),
}

/// See the module docs.
pub struct Supervisor;

pub struct SupState {
    ctx: Arc<RankCtx>,
    stages: Vec<ActorRef<StageMsg>>,
    reducer: ActorRef<ReducerMsg>,
    optimizer: ActorRef<OptimizerMsg>,
    feeder: ActorRef<FeederMsg>,
    events: Option<std::sync::mpsc::Sender<RunEvent>>,
    stop: Option<Arc<AtomicBool>>,
    opts: RunOptions,
    next_ticket: u64,
    /// Index of each full-model tensor name in the canonical (full model table) order.
    tensor_index: std::collections::HashMap<String, usize>,
    /// Per local chunk: the rank holds global stage 0 / the last stage there.
    chunk_stage: Vec<usize>,
    /// Where a loaded checkpoint left off.
    resume: Option<Resume>,
    /// The embedding group on the device (the tied embedding's gradient stays there).
    emb_device: Option<crate::gpu::stage::DeviceGroup>,
    /// The distributed optimizer gathers the parameter shards on the devices (in its step).
    gather_on_device: bool,
    /// The chunks compute on a device (whose head keeps its losses until the step's end).
    on_device: bool,
}

/// The training state a checkpoint restores.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    pub step: u64,
    pub consumed: u64,
    pub skipped: u64,
    pub updates: u64,
}

fn spawn_err(what: &str, e: impl std::fmt::Display) -> ActorProcessingErr {
    format!("spawning {what}: {e}").into()
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = (RankSetup, Arc<std::sync::OnceLock<Arc<RankCtx>>>);

    async fn pre_start(
        &self,
        me: ActorRef<SupMsg>,
        (s, probe): (RankSetup, Arc<std::sync::OnceLock<Arc<RankCtx>>>),
    ) -> Result<SupState, ActorProcessingErr> {
        let plan = s.plan.clone();
        let world: Arc<dyn Comm> = Arc::from(s.world);
        let wr = world.rank();
        let topo = Topology::new(world.size(), 1, plan.pp, plan.dp).map_err(|e| spawn_err("topology", e))?;
        let coords = topo.coords(wr);
        let group = |kind: GroupKind| -> Result<Arc<dyn Comm>, ActorProcessingErr> {
            let (name, ranks) = topo.group(kind, wr);
            world.new_group(&ranks, &name).map(Arc::from).map_err(|e| spawn_err("communicator", e))
        };
        let pp = group(GroupKind::Pipeline)?;
        let dp = group(GroupKind::Data)?;
        let last_stage = plan.num_stages() - 1;
        let (first_rank, last_rank) = (plan.program.locate(0).0, plan.program.locate(last_stage).0);
        let emb = if first_rank != last_rank && (coords.pp == first_rank || coords.pp == last_rank) {
            Some(group(GroupKind::Embedding)?)
        } else {
            None
        };
        let seq = s.data.sample_tokens().saturating_sub(1);
        let mut chunks = Vec::with_capacity(plan.vpp);
        let mut chunk_buckets = Vec::with_capacity(plan.vpp);
        let mut shards = Vec::with_capacity(plan.vpp);
        for c in 0..plan.vpp {
            let g = Gpt::new_range(&s.cfg.model, plan.range_of(coords.pp, c), s.cfg.train.seed)
                .map_err(|e| spawn_err("model chunk", e))?;
            let b = buckets(g.table(), g.wte_range(), plan.bucket_elems);
            shards.push(ChunkShard::new(g.table().len(), &b, plan.dp, coords.dp, plan.distributed_optimizer));
            chunk_buckets.push(b);
            chunks.push(g);
        }
        let resume =
            load_checkpoint(&s.cfg, &mut chunks, &mut shards).map_err(|e| spawn_err("checkpoint", e))?;
        let reducer_slot: Arc<std::sync::OnceLock<ActorRef<ReducerMsg>>> =
            Arc::new(std::sync::OnceLock::new());
        let slot = reducer_slot.clone();
        // On a device the data-parallel sum runs there (NCCL under a launcher): over a
        // communicator of its own, whose CPU side only carries the setup. With the distributed
        // optimizer the same group gathers the parameter shards after the update.
        let place = super::DevicePlacement::new(
            s.opts.device.as_ref().is_some_and(crate::gpu::stage::StageFactory::has_device_groups),
            plan.dp,
            plan.distributed_optimizer,
            s.opts.host_grad_reduce,
        );
        let device_group = match s.opts.device.as_ref() {
            Some(f) if place.grad_sums && plan.dp > 1 => {
                let (name, ranks) = topo.group(GroupKind::Data, wr);
                let cpu = world
                    .new_group(&ranks, &format!("{name}-device"))
                    .map_err(|e| spawn_err("device data-parallel communicator", e))?;
                let g = f.reduce_group(cpu).map_err(|e| spawn_err("device data-parallel group", e))?;
                tracing::debug!(rank = wr, "data-parallel gradient sums on the device ({})", g.describe());
                Some(g)
            }
            _ => None,
        };
        // The tied embedding's gradient is summed on the devices too when it stays there (the
        // optimizer on the device).
        let emb_device = match (s.opts.device.as_ref(), emb.as_ref()) {
            (Some(f), Some(_)) if place.grad_sums => {
                let (name, ranks) = topo.group(GroupKind::Embedding, wr);
                let cpu = world
                    .new_group(&ranks, &format!("{name}-device"))
                    .map_err(|e| spawn_err("device embedding communicator", e))?;
                Some(f.reduce_group(cpu).map_err(|e| spawn_err("device embedding group", e))?)
            }
            _ => None,
        };
        let bucket_tx: Option<Box<dyn Fn(ReadyBucket) + Send>> = (plan.dp > 1 && device_group.is_none())
            .then(|| {
                Box::new(move |b: ReadyBucket| {
                    if let Some(r) = slot.get() {
                        let _ = r.cast(ReducerMsg::Bucket(b));
                    }
                }) as Box<dyn Fn(ReadyBucket) + Send>
            });
        // On a device the optimizer runs there too; sharded (ZeRO-1) only beside a device group,
        // which gathers the shards (with the data-parallel sums on the host, so are the shards).
        let (device_opt, gather_on_device) = (place.optimizer, place.shards);
        let on_device = s.opts.device.is_some();
        let mut chunks = chunks
            .into_iter()
            .map(|g| match (s.opts.device.as_ref(), device_group.as_ref()) {
                (Some(f), Some(group)) => super::stage::Stage::with_device_group(g, f, group),
                (f, _) => super::stage::Stage::with_optimizer(g, f, device_opt),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| spawn_err("model chunk on the device", e))?;
        if gather_on_device {
            for ((g, b), shard) in chunks.iter_mut().zip(&chunk_buckets).zip(&shards) {
                let ranges: Vec<_> = b.iter().map(|x| x.range.clone()).collect();
                let own = g
                    .shard_optimizer(&ranges)
                    .map_err(|e| spawn_err("distributed optimizer on the device", e))?;
                if own != shard.ranges {
                    return Err(spawn_err(
                        "distributed optimizer on the device",
                        ModelError::Device(format!(
                            "the device group's rank owns {own:?}, the data-parallel rank's shard is {:?}",
                            shard.ranges
                        )),
                    ));
                }
            }
        }
        if let Some(r) = resume {
            for (g, shard) in chunks.iter_mut().zip(&shards) {
                g.load_optimizer_state(shard, r.updates)
                    .map_err(|e| spawn_err("optimizer state on the device", e))?;
            }
        }
        // Pipeline messages between the devices: a two-rank device link with each pipeline
        // peer (of this data-parallel replica), made pair by pair in one global order so that
        // joining a link (NCCL's init waits for the peer) never waits in a cycle.
        // (A message precision other than the device's keeps them on the host, which converts.)
        let device_links = match s.opts.device.as_ref() {
            Some(f) => {
                super::device_messages(
                    f.has_device_groups(),
                    plan.pp,
                    s.opts.host_p2p,
                    // Corruption is injected on the links too (and caught by their checksums).
                    s.opts
                        .faults
                        .faults
                        .iter()
                        .any(|x| x.kind.is_message() && x.kind != super::faults::FaultKind::Corrupt),
                ) && s.opts.message_dtype.is_none_or(|d| d.size() == f.dtype().size())
            }
            None => false,
        };
        if let (true, Some(f)) = (device_links, s.opts.device.as_ref()) {
            let (_, pipeline) = topo.group(GroupKind::Pipeline, wr);
            let mut peers: Vec<usize> =
                plan.program.ranks[coords.pp].iter().filter_map(|op| op.peer().map(|p| p as usize)).collect();
            peers.sort_unstable();
            peers.dedup();
            let mut pairs: Vec<(usize, usize, usize)> = peers
                .into_iter()
                .map(|q| {
                    let other = pipeline[q];
                    (wr.min(other), wr.max(other), q)
                })
                .collect();
            pairs.sort_unstable();
            let mut links = Vec::with_capacity(pairs.len());
            let mut world_peers = Vec::with_capacity(pairs.len());
            for (lo, hi, q) in pairs {
                let cpu = world
                    .new_group(&[lo, hi], &format!("pp-link-{lo}-{hi}"))
                    .map_err(|e| spawn_err("device link communicator", e))?;
                let g = f.link_group(cpu).map_err(|e| spawn_err("device link", e))?;
                links.push((q, g));
                world_peers.push((q, if lo == wr { hi } else { lo }));
            }
            for (c, g) in chunks.iter_mut().enumerate() {
                let stage = plan.program.stage_of(coords.pp, c);
                // Every chunk but the first keeps its input gradients on the device: sent over a
                // link, or handed to the previous stage of this rank.
                g.set_links(&links, stage > 0).map_err(|e| spawn_err("device links", e))?;
                // Messages on the links carry checksums as host messages do (`--no-checksums`
                // turns both off).
                if s.opts.checksums {
                    g.check_links(&world_peers).map_err(|e| spawn_err("device link checksums", e))?;
                }
            }
            tracing::debug!(rank = wr, links = links.len(), "pipeline messages between the devices");
        }
        let handed = chunk_buckets.iter().map(|b| vec![false; b.len()]).collect();
        let engine = Engine {
            be: Box::new(CpuBackend::new(s.threads)),
            chunks,
            microbatches: plan.microbatches,
            buckets: chunk_buckets,
            bucket_tx,
            reduce: plan.dp > 1,
            weight_done: vec![0; plan.vpp],
            handed,
            peak_in_flight: vec![0; plan.vpp],
            nonfinite: false,
        };
        let compute = Compute::start(wr, engine).map_err(|e| spawn_err("compute thread", e))?;
        let mailbox = Mailbox::default();
        if let Some(order) = &s.opts.replay_order {
            mailbox.set_order(order.get(coords.pp).cloned().unwrap_or_default());
        }
        let ctx = Arc::new(RankCtx {
            world_rank: wr,
            pp_rank: coords.pp,
            dp_rank: coords.dp,
            plan: plan.clone(),
            cfg: s.cfg.clone(),
            seq,
            timeout: s.opts.timeout,
            world,
            pp,
            dp,
            emb,
            mailbox,
            compute,
            record_step: s.opts.trace_step,
            faults: {
                let ops = &plan.program.ranks[coords.pp];
                s.opts
                    .faults
                    .for_rank(wr, s.opts.attempt)
                    .into_iter()
                    .map(|f| {
                        let i = f.instruction_in(ops);
                        (f, i)
                    })
                    .collect()
            },
            fault_plan: s.opts.faults.clone(),
            wire: Wire {
                dtype: s.opts.message_dtype.unwrap_or(match s.opts.device.as_ref().map(|d| d.dtype()) {
                    Some(crate::gpu::DType::Bf16) => DType::Bf16,
                    _ => DType::F32,
                }),
                checksums: s.opts.checksums,
            },
            device_links,
            stop: Some(s.stop.clone().unwrap_or_else(|| Arc::new(AtomicBool::new(false)))),
            flight: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(FLIGHT)),
            progress_ms: AtomicU64::new(0),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            events: std::sync::Mutex::new(Vec::new()),
            clock: Clock::now(),
            sent_bytes: AtomicU64::new(0),
            sent_grad_bytes: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            instructions: AtomicU64::new(0),
            overhead_ns: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        });
        let _ = probe.set(ctx.clone());
        let cell = me.get_cell();
        // Actor names are process-global in ractor: prefix them with the supervisor's.
        let tag = me.get_name().unwrap_or_else(|| format!("rank{wr}"));
        let (reducer, _) =
            Actor::spawn_linked(Some(format!("{tag}/grad-reducer")), GradReducer, ctx.clone(), cell.clone())
                .await
                .map_err(|e| spawn_err("grad-reducer", e))?;
        let _ = reducer_slot.set(reducer.clone());
        let mut stages = Vec::with_capacity(plan.vpp);
        for c in 0..plan.vpp {
            let (a, _) = Actor::spawn_linked(
                Some(format!("{tag}/stage{c}")),
                StageActor,
                (ctx.clone(), c),
                cell.clone(),
            )
            .await
            .map_err(|e| spawn_err("stage actor", e))?;
            stages.push(a);
        }
        let (optimizer, _) = Actor::spawn_linked(
            Some(format!("{tag}/optimizer")),
            OptimizerShard,
            (ctx.clone(), shards, resume.map_or(0, |r| r.updates)),
            cell.clone(),
        )
        .await
        .map_err(|e| spawn_err("optimizer", e))?;
        let (feeder, _) = Actor::spawn_linked(
            Some(format!("{tag}/data-feeder")),
            DataFeeder,
            (ctx.clone(), s.data.clone()),
            cell.clone(),
        )
        .await
        .map_err(|e| spawn_err("data feeder", e))?;
        let full =
            crate::models::gpt::param_table(&s.cfg.model, crate::models::gpt::LayerRange::full(&s.cfg.model));
        let tensor_index = full.specs().iter().enumerate().map(|(i, sp)| (sp.name.clone(), i)).collect();
        let chunk_stage = (0..plan.vpp).map(|c| plan.program.stage_of(coords.pp, c)).collect();
        Ok(SupState {
            ctx,
            stages,
            reducer,
            optimizer,
            feeder,
            events: s.events,
            stop: s.stop,
            opts: s.opts,
            next_ticket: 0,
            tensor_index,
            chunk_stage,
            resume,
            emb_device,
            gather_on_device,
            on_device,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SupMsg>,
        msg: SupMsg,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        let SupMsg::Run(reply) = msg;
        let r = train_loop(st).await;
        let _ = reply.send(r);
        me.stop(None);
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<SupMsg>, st: &mut SupState) -> Result<(), ActorProcessingErr> {
        for s in &st.stages {
            s.stop(None);
        }
        st.reducer.stop(None);
        st.optimizer.stop(None);
        st.feeder.stop(None);
        Ok(())
    }
}

impl SupState {
    /// Runs `f` as the next compute job.
    async fn job<R: Send + 'static>(
        &mut self,
        step: u64,
        what: &str,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Result<R, RuntimeError> {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.ctx
            .compute
            .run(t, f)
            .await
            .map(|(r, _, _)| r)
            .map_err(|e| self.ctx.job_err("supervisor", step, what, e))
    }
}

fn rpc<T>(
    actor: &str,
    rank: usize,
    step: u64,
    r: Result<ractor::rpc::CallResult<T>, impl std::fmt::Display>,
) -> Result<T, RuntimeError> {
    let fail =
        |detail: String| RuntimeError::Actor { actor: actor.into(), rank, step, op: "call".into(), detail };
    match r {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(fail("no reply within the timeout".into())),
        Ok(ractor::rpc::CallResult::SenderError) => {
            Err(fail("the actor stopped without replying (it failed)".into()))
        }
        Err(e) => Err(fail(format!("cannot reach the actor: {e}"))),
    }
}

/// All-gathers this rank's f64 values (carried bit for bit as i64) over the world: returns
/// `world × mine.len()` values, rank r's at `[r·len, (r+1)·len)`.
async fn gather_f64(ctx: &RankCtx, step: u64, op: &str, mine: &[f64]) -> Result<Vec<f64>, RuntimeError> {
    let (world, len) = (ctx.world.size(), mine.len());
    let mut all = vec![0i64; world * len];
    for (d, x) in all[ctx.world_rank * len..(ctx.world_rank + 1) * len].iter_mut().zip(mine) {
        *d = x.to_bits() as i64;
    }
    match wait_work(ctx, step, op, ctx.world.all_gather(Buf::I64(all))).await? {
        Buf::I64(bits) => Ok(bits.iter().map(|&b| f64::from_bits(b as u64)).collect()),
        other => Err(RuntimeError::Actor {
            actor: "supervisor".into(),
            rank: ctx.world_rank,
            step,
            op: op.into(),
            detail: format!("expected i64 values, got {:?}", other.dtype()),
        }),
    }
}

async fn train_loop(st: &mut SupState) -> Result<RankResult, RuntimeError> {
    let ctx = st.ctx.clone();
    let cfg = ctx.cfg.clone();
    let plan = ctx.plan.clone();
    let t = &cfg.train;
    let sched = LrSchedule::from_train(t);
    let program_ops = &plan.program.ranks[ctx.pp_rank];
    let ticketed = |links: bool| program_ops.iter().filter(|op| RankCtx::ticketed(op, links)).count() as u64;
    let n_tensors = st.tensor_index.len();
    let slots = n_tensors + 6;
    let last_stage = plan.num_stages() - 1;
    let timeout = ctx.timeout;
    let wr = ctx.world_rank;
    let mut result = RankResult { peak_in_flight: vec![0; plan.vpp], ..RankResult::default() };
    let (mut step, mut consumed, mut skipped) = match st.resume {
        Some(r) => (r.step, r.consumed, r.skipped),
        None => (st.opts.start_step, st.opts.consumed_samples, 0),
    };
    let first = step;
    if let (Some(r), Some(tx)) = (st.resume, &st.events) {
        let _ = tx.send(RunEvent::Resumed { step: r.step, consumed_samples: r.consumed });
    }
    let started = Instant::now();
    let save_dir = cfg.checkpoint.save.clone();
    let save_every = cfg.checkpoint.save_interval;
    let mut saved_at = None;
    let mut reported = (0u64, 0u64, 0u64, 0u64);
    let mut best_busy = vec![f64::INFINITY; ctx.world.size()];
    let mut stragglers = super::straggler::StragglerWatch::new(ctx.world.size());
    while step < t.train_iters {
        let this = step + 1;
        let t_step = Instant::now();
        let batch = rpc(
            "data-feeder",
            wr,
            this,
            st.feeder.call(|r| FeederMsg::Next { step: this, consumed, reply: r }, Some(timeout)).await,
        )??;
        let nth = ctx
            .faults
            .iter()
            .find(|(f, _)| f.step == this && f.kind == super::faults::FaultKind::Corrupt && f.recv.is_some())
            .and_then(|(f, _)| f.recv);
        ctx.mailbox.new_step(nth);
        let links = ctx.links(this);
        st.job(this, "new step", move |e: &mut Engine| -> Result<(), ModelError> {
            e.new_step();
            e.chunks.iter_mut().try_for_each(|g| g.use_links(links))
        })
        .await?
        .map_err(|e| model_err(&ctx, this, "new step", e))?;
        let k = ticketed(links);
        let base = st.next_ticket;
        let busy0 = Instant::now();
        let busy_ns0 = ctx.busy_ns.load(Ordering::Relaxed);
        let mut waits = Vec::with_capacity(st.stages.len());
        for a in &st.stages {
            let work = StageStep { step: this, base_ticket: base, batch: batch.clone() };
            let (tx, rx) = tokio::sync::oneshot::channel();
            a.cast(StageMsg::Run(work, tx.into())).map_err(|e| RuntimeError::Actor {
                actor: "stage".into(),
                rank: wr,
                step: this,
                op: "run".into(),
                detail: e.to_string(),
            })?;
            waits.push(rx);
        }
        // Replies in completion order: the first failing chunk fails the rank at once (its
        // siblings may be blocked behind its unfinished instructions).
        let (rtx, mut rrx) = tokio::sync::mpsc::unbounded_channel();
        let n_waits = waits.len();
        for (c, rx) in waits.into_iter().enumerate() {
            let rtx = rtx.clone();
            tokio::spawn(async move {
                let _ = rtx.send((c, rx.await));
            });
        }
        drop(rtx);
        let mut losses: Vec<(u32, f32)> = Vec::new();
        for _ in 0..n_waits {
            let Some((c, r)) = rrx.recv().await else { break };
            match r {
                Ok(Ok(rep)) => losses.extend(rep.losses),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(RuntimeError::Actor {
                        actor: format!("stage[{c}]"),
                        rank: wr,
                        step: this,
                        op: "run".into(),
                        detail: "the stage actor stopped without replying".into(),
                    });
                }
            }
        }
        let pipeline_s = busy0.elapsed().as_secs_f64();
        let busy_s = (ctx.busy_ns.load(Ordering::Relaxed) - busy_ns0) as f64 * 1e-9;
        // This rank's idle time over its busy time during the pipeline phase (on the host's
        // clock; with device links, on the device's below).
        let mut local_bubble = if busy_s > 0.0 { (pipeline_s - busy_s).max(0.0) / busy_s } else { 0.0 };
        st.next_ticket = base + k;
        // Losses the head chunks' devices kept during the step.
        if st.on_device {
            let device_losses = st
                .job(this, "losses from the device", |e: &mut Engine| -> Result<_, ModelError> {
                    let mut out = Vec::new();
                    let mut timing: Option<LinkTiming> = None;
                    for g in &mut e.chunks {
                        // The step's messages over device links have all landed (a
                        // missing peer shows here, bounded by the timeout).
                        if let Some(t) = g.finish_links()? {
                            // The chunks share the device's one compute stream: their
                            // spans are one, their stalls add up.
                            let sum = timing.map_or(t, |s| LinkTiming {
                                span_s: s.span_s.max(t.span_s),
                                stalled_s: s.stalled_s + t.stalled_s,
                            });
                            timing = Some(sum);
                        }
                        out.extend(g.take_losses()?.into_iter().map(|(mb, l)| (mb as u32, l)));
                    }
                    Ok((out, timing))
                })
                .await?
                .map_err(|e| model_err(&ctx, this, "losses from the device", e))?;
            let (device_losses, timing) = device_losses;
            if let Some(t) = timing {
                // The host only queued the waits for messages: the device's stalls are the
                // bubble (see `LinkTiming`).
                local_bubble = t.bubble();
            }
            losses.extend(device_losses);
        }
        phase_fault(&ctx, this, super::faults::Phase::Reduce, "grad-reducer").await?;
        // Data-parallel reduction (started during the backward), written back.
        let reduced = rpc(
            "grad-reducer",
            wr,
            this,
            st.reducer.call(|r| ReducerMsg::Finish(this, r), Some(timeout * 2)).await,
        )??;
        let (dist, dp, dp_rank) = (plan.distributed_optimizer, plan.dp, ctx.dp_rank);
        let chunk_stage = st.chunk_stage.clone();
        // The tied embedding: this rank's part of wte's gradient (full, or its shard).
        let emb_chunks: Vec<usize> =
            (0..plan.vpp).filter(|&c| chunk_stage[c] == 0 || chunk_stage[c] == last_stage).collect();
        let wte_part = move |e: &Engine, c: usize| -> Option<std::ops::Range<usize>> {
            let w = e.chunks[c].wte_range()?;
            if dist {
                let r = chunk_range(w.len(), dp, dp_rank);
                Some(w.start + r.start..w.start + r.end)
            } else {
                Some(w)
            }
        };
        let local_pair = emb_chunks.len() == 2 && plan.num_stages() > 1;
        let emb_chunks2 = emb_chunks.clone();
        let emb_device = st.emb_device.clone();
        let (emb_send, device_reduced) = st
            .job(this, "write back reduced gradients", move |e: &mut Engine| -> Result<_, ModelError> {
                // Chunks that reduce on their device: their reductions end here.
                let mut spans = Vec::new();
                for (c, g) in e.chunks.iter_mut().enumerate() {
                    if let Some(span) = g.take_reduce_span()? {
                        spans.push((c, span));
                    }
                }
                for b in reduced {
                    let g = e.chunks[b.chunk].grads_mut();
                    if dist {
                        let own = chunk_range(b.range.len(), dp, dp_rank);
                        g[b.range.start + own.start..b.range.start + own.end].copy_from_slice(&b.data[own]);
                    } else {
                        g[b.range].copy_from_slice(&b.data);
                    }
                }
                if local_pair {
                    // Stage 0 and the last stage on this rank (V placement): embedding + head.
                    let (a, b) = (emb_chunks2[0], emb_chunks2[1]);
                    let (Some(ra), Some(rb)) = (wte_part(e, a), wte_part(e, b)) else {
                        return Ok((None, spans));
                    };
                    let head = e.chunks[b].read_grads(rb.clone())?;
                    let mut sum = e.chunks[a].read_grads(ra.clone())?;
                    e.be.add_assign(&mut sum, &head);
                    e.chunks[a].write_grads(ra, &sum)?;
                    e.chunks[b].write_grads(rb, &sum)?;
                    Ok((None, spans))
                } else {
                    let Some(&c) = emb_chunks2.first() else { return Ok((None, spans)) };
                    let Some(r) = wte_part(e, c) else { return Ok((None, spans)) };
                    if let Some(g) = emb_device.as_ref()
                        && e.chunks[c].all_reduce_grads_on_device(r.clone(), g)?
                    {
                        return Ok((None, spans));
                    }
                    let part = e.chunks[c].read_grads(r)?;
                    Ok((Some((c, super::compute::finite_or_zero(part, &mut e.nonfinite))), spans))
                }
            })
            .await?
            .map_err(|e| model_err(&ctx, this, "write back reduced gradients", e))?;
        for (c, (a, b)) in device_reduced {
            let span = (ctx.clock.us(a), ctx.clock.us(b));
            ctx.record(this, OpKind::ReduceGrads, None, Some(c as u32), span, None, None);
        }
        if let (Some(emb), Some((c, part))) = (ctx.emb.clone(), emb_send) {
            let summed =
                wait_work(&ctx, this, "embedding all-reduce", emb.all_reduce(Buf::F32(part), ReduceOp::Sum))
                    .await?;

            let Buf::F32(summed) = summed else {
                return Err(RuntimeError::Actor {
                    actor: "supervisor".into(),
                    rank: wr,
                    step: this,
                    op: "embedding all-reduce".into(),
                    detail: "non-f32 result".into(),
                });
            };
            st.job(this, "write back embedding gradient", move |e: &mut Engine| match wte_part(e, c) {
                Some(r) => e.chunks[c].write_grads(r, &summed),
                None => Ok(()),
            })
            .await?
            .map_err(|e| model_err(&ctx, this, "write back embedding gradient", e))?;
        }
        // Agreement: per-tensor Σg² (canonical order), loss, non-finite and stop flags, bubble.
        let index = st.tensor_index.clone();
        let contributes = dist || dp_rank == 0;
        let mut parts = st
            .job(this, "gradient norm", move |e: &mut Engine| -> Result<Vec<f64>, ModelError> {
                let mut v = vec![0.0f64; slots];
                v[n_tensors + 2] = f64::from(u8::from(e.nonfinite));
                if !contributes {
                    return Ok(v);
                }
                let Engine { be, chunks, buckets, .. } = e;
                for (c, g) in chunks.iter_mut().enumerate() {
                    let tied_copy = g.range().head && !g.range().embedding;
                    let shard = if dist {
                        ChunkShard::new(g.table().len(), &buckets[c], dp, dp_rank, true).ranges
                    } else {
                        std::iter::once(0..g.table().len()).collect()
                    };
                    // (tensor slot, arena range) in a fixed order; summed where they live.
                    let mut parts: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
                    for spec in g.table().specs() {
                        if tied_copy && spec.name == "wte" {
                            continue;
                        }
                        let Some(&j) = index.get(&spec.name) else { continue };
                        let s = spec.span.range();
                        for r in &shard {
                            let (lo, hi) = (s.start.max(r.start), s.end.min(r.end));
                            if lo < hi {
                                parts.push((j, lo..hi));
                            }
                        }
                    }
                    let ranges: Vec<_> = parts.iter().map(|p| p.1.clone()).collect();
                    let sums = g.grad_sum_squares(&**be, &ranges)?;
                    for ((j, _), x) in parts.iter().zip(sums) {
                        v[*j] += x;
                    }
                }
                Ok(v)
            })
            .await?
            .map_err(|e| model_err(&ctx, this, "gradient norm", e))?;
        losses.sort_by_key(|&(mb, _)| mb);
        let loss_sum: f64 = losses.iter().fold(0.0f64, |acc, &(_, l)| acc + f64::from(l));
        let nonfinite = parts[n_tensors + 2] != 0.0
            || losses.iter().any(|(_, l)| !l.is_finite())
            || parts[..n_tensors].iter().any(|x| !x.is_finite());
        // A stop asked for by a signal, or by the configuration (--exit-interval, or
        // --exit-duration-in-mins by this rank's clock): agreed below, so every rank stops after
        // the same step.
        let stop_now = st.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
            || ctx.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
            || crate::train::run::exit_due(t, this, crate::train::run::over_time(t, started.elapsed()))
                .is_some();
        parts[n_tensors] = loss_sum;
        parts[n_tensors + 1] = losses.len() as f64;
        parts[n_tensors + 2] = f64::from(u8::from(nonfinite));
        parts[n_tensors + 3] = f64::from(u8::from(stop_now));
        parts[n_tensors + 4] = local_bubble;
        parts[n_tensors + 5] = busy_s;
        let world = ctx.world.size();
        let vals = gather_f64(&ctx, this, "step agreement (all-gather)", &parts).await?;
        let mut sums = vec![0.0f64; n_tensors];
        let (mut loss_total, mut count, mut any_nonfinite, mut any_stop, mut worst) =
            (0.0f64, 0.0f64, false, false, 0.0f64);
        let mut nonfinite_ranks = Vec::new();
        let mut busy: Vec<(f64, usize)> = Vec::with_capacity(world);
        for r in 0..world {
            let v = &vals[r * slots..(r + 1) * slots];
            for j in 0..n_tensors {
                sums[j] += v[j];
            }
            loss_total += v[n_tensors];
            count += v[n_tensors + 1];
            any_nonfinite |= v[n_tensors + 2] != 0.0;
            if v[n_tensors + 2] != 0.0 {
                nonfinite_ranks.push(r);
            }
            busy.push((v[n_tensors + 5], r));
            any_stop |= v[n_tensors + 3] != 0.0;
            worst = worst.max(v[n_tensors + 4]);
        }
        let rec_nonfinite_here = nonfinite_ranks.contains(&wr);
        // A straggler is slow against ranks doing the same work: its data-parallel peers of the
        // same pipeline stage this step, and its own fastest step so far (pipeline stages differ
        // by design, so they are not compared with each other).
        busy.sort_by_key(|b| b.1);
        let (mut slowest_ratio, mut slowest_rank, mut slowest_excess) = (1.0f64, 0, 0.0f64);
        for &(t, r) in &busy {
            let stage = r / plan.dp;
            let peers = busy
                .iter()
                .filter(|(_, q)| q / plan.dp == stage)
                .map(|(t, _)| *t)
                .fold(f64::INFINITY, f64::min);
            let best = best_busy[r].min(peers);
            let ratio = if best > 0.0 && best.is_finite() { t / best } else { 1.0 };
            if ratio > slowest_ratio {
                (slowest_ratio, slowest_rank, slowest_excess) = (ratio, r, t - best);
            }
        }
        for &(t, r) in &busy {
            if t > 0.0 {
                best_busy[r] = best_busy[r].min(t);
            }
        }
        let rec_slowest = (slowest_rank, slowest_ratio);
        stragglers.observe(slowest_rank, slowest_ratio, slowest_excess);
        let interval = cfg.logging.log_interval.max(1);
        if this.is_multiple_of(interval) || this == t.train_iters {
            match stragglers.report() {
                Some(msg) if wr == 0 => tracing::warn!(step = this, "{msg}"),
                _ => {}
            }
        }
        if !nonfinite_ranks.is_empty() && wr == 0 {
            tracing::warn!(step = this, ranks = ?nonfinite_ranks, "non-finite loss or gradient");
        }
        let norm = norm_from_tensor_sums(&sums);
        let scale = 1.0 / count.max(1.0) as f32;
        let loss = (loss_total * f64::from(scale)) as f32;
        let lr = sched.lr(step);
        step = this;
        consumed += t.global_batch_size as u64;
        let skip = any_nonfinite || !norm.is_finite();
        if skip && t.nan_policy == NanPolicy::Abort {
            return Err(RuntimeError::NonFinite { step: this, loss, grad_norm: norm });
        }
        if skip {
            skipped += 1;
        } else {
            phase_fault(&ctx, this, super::faults::Phase::Optimizer, "optimizer").await?;
            let clip = clip_coefficient(norm, t.clip_grad);
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            rpc(
                "optimizer",
                wr,
                this,
                st.optimizer
                    .call(|r| OptimizerMsg::Step(OptStep { step: this, ticket, lr, clip }, r), Some(timeout))
                    .await,
            )??;
            if dist && dp > 1 && !st.gather_on_device {
                let reads = st
                    .job(this, "read parameter shards", |e: &mut Engine| {
                        let mut out = Vec::new();
                        for (c, bs) in e.buckets.iter().enumerate() {
                            for b in bs {
                                out.push((
                                    c,
                                    b.range.clone(),
                                    e.chunks[c].params()[b.range.clone()].to_vec(),
                                ));
                            }
                        }
                        out
                    })
                    .await?;
                let works: Vec<_> =
                    reads.into_iter().map(|(c, r, v)| (c, r, ctx.dp.all_gather(Buf::F32(v)))).collect();
                let mut full = Vec::with_capacity(works.len());
                for (c, r, w) in works {
                    let b = wait_work(&ctx, this, "parameter all-gather", w).await?;

                    if let Buf::F32(v) = b {
                        full.push((c, r, v));
                    }
                }
                st.job(this, "write parameters", move |e: &mut Engine| {
                    for (c, r, v) in full {
                        e.chunks[c].params_mut()[r].copy_from_slice(&v);
                    }
                })
                .await?;
            }
        }
        let peaks = st.job(this, "peaks", |e: &mut Engine| e.peak_in_flight.clone()).await?;
        for (p, q) in result.peak_in_flight.iter_mut().zip(&peaks) {
            *p = (*p).max(*q);
        }
        let secs = t_step.elapsed().as_secs_f64();
        let tokens = (t.global_batch_size * ctx.seq) as f64;
        let rec = StepRecord {
            nonfinite_ranks,
            slowest_rank,
            slowest_ratio,
            step: this,
            loss,
            grad_norm: norm,
            lr,
            skipped: skip,
            seconds: secs,
            bubble: worst,
            peak_in_flight: peaks,
        };
        crate::telemetry::record_step(
            wr,
            &crate::telemetry::StepMetrics {
                step: this,
                loss,
                grad_norm: norm,
                tokens_per_second: tokens / secs.max(1e-9),
                bubble_fraction: worst,
                step_seconds: secs,
                skipped: skip,
            },
        );
        crate::telemetry::set_queue_depth(wr, "mailbox", ctx.mailbox.take_peak_depth());
        crate::telemetry::set_straggler(wr, rec_slowest.0, rec_slowest.1);
        if rec_nonfinite_here {
            crate::telemetry::add_nonfinite_step(wr);
        }
        let (sent, grad, msgs, instr) = (
            ctx.sent_bytes.load(Ordering::Relaxed),
            ctx.sent_grad_bytes.load(Ordering::Relaxed),
            ctx.messages.load(Ordering::Relaxed),
            ctx.instructions.load(Ordering::Relaxed),
        );
        crate::telemetry::add_bytes_sent(wr, "activation", (sent - grad) - (reported.0 - reported.1));
        crate::telemetry::add_bytes_sent(wr, "gradient", grad - reported.1);
        crate::telemetry::add_messages(wr, "pipeline", msgs - reported.2);
        crate::telemetry::add_instructions(wr, instr - reported.3);
        reported = (sent, grad, msgs, instr);
        if let Some(tx) = &st.events {
            let _ = tx.send(RunEvent::Step {
                step: this,
                loss,
                lr,
                grad_norm: norm,
                tokens_per_s: tokens / secs.max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
                skipped: skip,
                bubble: worst,
            });
        }
        result.records.push(rec);
        let every = cfg.logging.eval_interval;
        if every > 0
            && this.is_multiple_of(every)
            && let Some(valid) = st.opts.valid.clone()
        {
            let first = crate::train::run::eval_first_sample(
                &cfg,
                crate::train::run::EvalSplit::Validation,
                this,
                true,
            );
            let loss = evaluate(st, this, &valid.0, first).await?;
            if let Some(tx) = &st.events {
                let _ = tx.send(RunEvent::Eval {
                    step: this,
                    split: crate::train::run::EvalSplit::Validation,
                    loss,
                });
            }
        }
        if !save_dir.is_empty() && save_every > 0 && this.is_multiple_of(save_every) {
            save_checkpoint(st, this, consumed, skipped).await?;
            saved_at = Some(this);
        }
        if any_stop {
            result.interrupted = true;
            break;
        }
    }
    // Every rank takes the same decisions here (the stop was agreed on, the data is the same), so
    // the end-of-training evaluations run on all of them together.
    if !result.interrupted && step > first {
        let every = cfg.logging.eval_interval;
        let (valid, test) = (st.opts.valid.clone(), st.opts.test.clone());
        for split in crate::train::run::EvalSplit::at_end(step, every, valid.is_some(), test.is_some()) {
            let source = match split {
                crate::train::run::EvalSplit::Validation => valid.as_ref(),
                crate::train::run::EvalSplit::Test => test.as_ref(),
            };
            if let Some(source) = source {
                let first = crate::train::run::eval_first_sample(&cfg, split, step, false);
                let loss = evaluate(st, step, &source.0, first).await?;
                if let Some(tx) = &st.events {
                    let _ = tx.send(RunEvent::Eval { step, split, loss });
                }
            }
        }
    }
    if !save_dir.is_empty() && saved_at != Some(step) && step > st.resume.map_or(0, |r| r.step) {
        save_checkpoint(st, step, consumed, skipped).await?;
    }
    result.skipped_steps = skipped;
    result.consumed_samples = consumed;
    result.optimizer_state_bytes =
        rpc("optimizer", wr, step, st.optimizer.call(OptimizerMsg::StateBytes, Some(timeout)).await)?;
    crate::telemetry::set_optimizer_state_bytes(wr, result.optimizer_state_bytes as u64);
    let _ = reported;
    let mut chunks = st
        .job(step, "collect parameters", |e: &mut Engine| {
            e.chunks
                .iter_mut()
                .map(|g| {
                    g.pull_params()?;
                    Ok((g.range(), g.table().clone(), g.params().to_vec()))
                })
                .collect::<Result<Vec<_>, ModelError>>()
        })
        .await?
        .map_err(|e| model_err(&ctx, step, "collect parameters", e))?;
    if st.gather_on_device && ctx.plan.dp > 1 {
        // The devices hold the fp32 master weights of their own parts only.
        let buckets = st.job(step, "bucket layout", |e: &mut Engine| e.buckets.clone()).await?;
        for ((_, _, p), bs) in chunks.iter_mut().zip(&buckets) {
            gather_bucket_parts(&ctx, step, "master weight all-gather", bs, p).await?;
        }
    }
    result.chunks = chunks;
    result.events =
        std::mem::take(&mut *ctx.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    if ctx.record_step.is_some() {
        gather_events(&ctx, step, &mut result.events).await?;
    }
    result.sent_bytes = ctx.sent_bytes.load(Ordering::Relaxed);
    result.messages = ctx.messages.load(Ordering::Relaxed);
    result.p2p_on_device = ctx.device_links;
    result.instructions = ctx.instructions.load(Ordering::Relaxed);
    result.overhead_s = ctx.overhead_ns.load(Ordering::Relaxed) as f64 * 1e-9;
    Ok(result)
}

/// Runs one rank to the end of training on the calling thread (it builds its own tokio runtime).
///
/// # Errors
/// The first [`RuntimeError`] of any of the rank's actors.
pub fn run_rank(setup: RankSetup) -> Result<RankResult, RuntimeError> {
    let wr = setup.world.rank();
    let watchdog = setup.opts.watchdog.unwrap_or(setup.opts.timeout);
    let alarm = setup.alarm.clone();
    let flight_dir = setup.opts.flight_dir.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        RuntimeError::Start { rank: wr, detail: format!("cannot build the tokio runtime: {e}") }
    })?;
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let probe: Arc<std::sync::OnceLock<Arc<RankCtx>>> = Arc::new(std::sync::OnceLock::new());
    let probe2 = probe.clone();
    let probe3 = probe.clone();
    let out = rt.block_on(async move {
        let probe = probe3;
        let (sup, handle) = Actor::spawn(Some(format!("run{run}/rank{wr}")), Supervisor, (setup, probe2))
            .await
            .map_err(|e| RuntimeError::Start { rank: wr, detail: e.to_string() })?;
        let call = sup.call(SupMsg::Run, None);
        tokio::pin!(call);
        // The watchdog: a rank that shows no progress (no instruction, message or phase) for
        // `watchdog` reports itself hung, naming where it stopped.
        let tick = (watchdog / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let out = loop {
            tokio::select! {
                r = &mut call => break rpc("supervisor", wr, 0, r).and_then(|x| x),
                () = tokio::time::sleep(tick) => {
                    let raised = alarm.as_ref().and_then(|a| a.lock().ok().and_then(|g| g.clone()));
                    if let Some(text) = raised {
                        sup.kill();
                        break Err(RuntimeError::Actor {
                            actor: "heartbeat".into(),
                            rank: wr,
                            step: 0,
                            op: "heartbeat".into(),
                            detail: text,
                        });
                    }
                    let Some(ctx) = probe.get() else { continue };
                    let now = ctx.clock.at.elapsed().as_millis() as u64;
                    let idle = Duration::from_millis(now.saturating_sub(ctx.progress_ms.load(Ordering::Relaxed)));
                    if idle > watchdog && ctx.waiting.load(Ordering::SeqCst) == 0 {
                        let last = ctx.flight_dump().pop().unwrap_or_default();
                        sup.kill();
                        break Err(RuntimeError::Actor {
                            actor: "watchdog".into(),
                            rank: wr,
                            step: 0,
                            op: last.trim().to_string(),
                            detail: format!("rank {wr} made no progress for {:.1} s: hung", idle.as_secs_f64()),
                        });
                    }
                }
            }
        };
        if out.is_ok() {
            let _ = handle.await;
        }
        out
    });
    if out.is_err()
        && let Some(ctx) = probe.get()
    {
        // The events recorded so far in the traced step: a replay order for `--replay-order`.
        if let (Some(dir), Some(_)) = (&flight_dir, ctx.record_step) {
            let events = ctx.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let trace = super::trace_of(&ctx.plan, &events);
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::write(dir.join(format!("trace-rank{wr}.txt")), trace.to_native());
        }
        let lines = ctx.flight_dump();
        let text = lines.join("\n");
        match &flight_dir {
            Some(dir) => {
                let path = dir.join(format!("flight-rank{wr}.txt"));
                let _ = std::fs::create_dir_all(dir);
                if std::fs::write(&path, &text).is_ok() {
                    eprintln!(
                        "troupe: rank {wr} failed; flight recorder ({} events) in {}",
                        lines.len(),
                        path.display()
                    );
                }
            }
            None => {
                let tail = lines.len().saturating_sub(6);
                // One write, so that other ranks' output does not land inside it.
                let msg =
                    format!("troupe: rank {wr} failed; its last events:\n  {}\n", lines[tail..].join("\n  "));
                eprint!("{msg}");
            }
        }
    }
    out
}

/// Brings every pipeline rank's trace events (first data-parallel replica) to world rank 0.
async fn gather_events(ctx: &RankCtx, step: u64, events: &mut Vec<Event>) -> Result<(), RuntimeError> {
    const TAG: u64 = 0x7472_6163_6500_0000; // "trace"
    let (pp, dp) = (ctx.plan.pp, ctx.plan.dp);
    let fail = |op: &str, detail: String| RuntimeError::Actor {
        actor: "supervisor".into(),
        rank: ctx.world_rank,
        step,
        op: op.into(),
        detail,
    };
    if ctx.world_rank == 0 {
        for r in 1..pp {
            let peer = r * dp;
            let Buf::I64(len) =
                wait_work(ctx, step, "trace gather", ctx.world.recv(DType::I64, 1, peer, TAG)).await?
            else {
                return Err(fail("trace gather", "bad length message".into()));
            };
            let n = usize::try_from(len[0]).unwrap_or(0);
            let Buf::I64(words) = wait_work(
                ctx,
                step,
                "trace gather",
                ctx.world.recv(DType::I64, n.div_ceil(8), peer, TAG + 1),
            )
            .await?
            else {
                return Err(fail("trace gather", "bad event message".into()));
            };
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).take(n).collect();
            let theirs: Vec<Event> = serde_json::from_slice(&bytes)
                .map_err(|e| fail("trace gather", format!("rank {peer}: {e}")))?;
            events.extend(theirs);
        }
    } else if ctx.dp_rank == 0 {
        let bytes = serde_json::to_vec(&*events).map_err(|e| fail("trace gather", e.to_string()))?;
        let words: Vec<i64> = bytes
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                i64::from_le_bytes(w)
            })
            .collect();
        wait_work(ctx, step, "trace gather", ctx.world.send(Buf::I64(vec![bytes.len() as i64]), 0, TAG))
            .await?;
        wait_work(ctx, step, "trace gather", ctx.world.send(Buf::I64(words), 0, TAG + 1)).await?;
        events.clear();
    }
    Ok(())
}

/// Fills every bucket of `arena` with its data-parallel owners' parts (`chunk_range` of the
/// bucket over the group; on entry this rank's part is its own): host all-gathers, one per
/// bucket. For checkpoints and the end of a run, where every rank of the group calls it.
async fn gather_bucket_parts(
    ctx: &RankCtx,
    step: u64,
    op: &str,
    buckets: &[Bucket],
    arena: &mut [f32],
) -> Result<(), RuntimeError> {
    for b in buckets {
        let w = ctx.dp.all_gather(Buf::F32(arena[b.range.clone()].to_vec()));
        if let Buf::F32(full) = wait_work(ctx, step, op, w).await? {
            arena[b.range.clone()].copy_from_slice(&full);
        }
    }
    Ok(())
}

/// Writes a shard's values (concatenated in range order) into their ranges of a full arena.
fn scatter_shard(ranges: &[std::ops::Range<usize>], shard: &[f32], arena: &mut [f32]) {
    let mut base = 0;
    for r in ranges {
        arena[r.clone()].copy_from_slice(&shard[base..base + r.len()]);
        base += r.len();
    }
}

/// Awaits a communication within the timeout; errors name the rank, step and operation.
async fn wait_work<T>(ctx: &RankCtx, step: u64, op: &str, w: Work<T>) -> Result<T, RuntimeError> {
    let _w = ctx.waiting();
    tokio::time::timeout(ctx.timeout, w)
        .await
        .map_err(|_| RuntimeError::Actor {
            actor: "supervisor".into(),
            rank: ctx.world_rank,
            step,
            op: op.into(),
            detail: format!("not done within {:?}", ctx.timeout),
        })?
        .map_err(|e| RuntimeError::Comm { rank: ctx.world_rank, step, op: op.into(), source: Box::new(e) })
}

// ---------------------------------------------------------------------------------------------
// Checkpoints: the single-rank format, whatever the layout.

/// Restores this rank's chunks and optimizer shards from `checkpoint.load`, if set.
fn load_checkpoint(
    cfg: &Config,
    chunks: &mut [Gpt],
    shards: &mut [ChunkShard],
) -> Result<Option<Resume>, String> {
    use crate::checkpoint;
    let load = cfg.checkpoint.load.as_str();
    if load.is_empty() {
        return Ok(None);
    }
    let dir = match checkpoint::resolve(std::path::Path::new(load)).map_err(|e| e.to_string())? {
        Some(d) => d,
        None if cfg.checkpoint.allow_fresh_start => return Ok(None),
        None => {
            return Err(format!(
                "--load {load}: no checkpoint there (no `latest` file and no state.json); pass --allow-fresh-start to start from scratch"
            ));
        }
    };
    let finetune = cfg.checkpoint.finetune;
    let loaded = if finetune { checkpoint::load_model(&dir) } else { checkpoint::load(&dir) }
        .map_err(|e| e.to_string())?;
    loaded.check_shape(cfg).map_err(|e| e.to_string())?;
    if finetune {
        // The weights only: every rank starts at step 0 with fresh moments.
        for g in chunks.iter_mut() {
            loaded.restore(g, None).map_err(|e| e.to_string())?;
        }
        return Ok(None);
    }
    let adam = cfg.train.adamw();
    let mut updates = 0;
    for (g, shard) in chunks.iter_mut().zip(shards.iter_mut()) {
        let mut opt = crate::optim::AdamW::new(adam, g.table().len());
        loaded.restore(g, Some(&mut opt)).map_err(|e| e.to_string())?;
        let mut base = 0;
        for r in &shard.ranges {
            shard.m[base..base + r.len()].copy_from_slice(&opt.m[r.clone()]);
            shard.v[base..base + r.len()].copy_from_slice(&opt.v[r.clone()]);
            base += r.len();
        }
        updates = opt.step;
    }
    let s = &loaded.state;
    Ok(Some(Resume { step: s.step, consumed: s.consumed_samples, skipped: s.skipped_steps, updates }))
}

/// Writes a full-model checkpoint of step `step` from world rank 0 in the single-rank format
/// (so any layout, or the single-rank trainer, can resume it): data-parallel shards of the
/// moments are gathered first, then every pipeline rank sends its chunks to rank 0.
async fn save_checkpoint(
    st: &mut SupState,
    step: u64,
    consumed: u64,
    skipped: u64,
) -> Result<(), RuntimeError> {
    const TAG: u64 = 0x636b_7074_0000_0000; // "ckpt"
    const MOMENTS_TAG: u64 = 0x636b_706d_0000_0000; // "ckpm"
    let ctx = st.ctx.clone();
    let plan = ctx.plan.clone();
    let wr = ctx.world_rank;
    phase_fault(&ctx, step, super::faults::Phase::Checkpoint, "checkpoint writer").await?;
    // The optimizer's update count is not stored: a resume derives it from the state's step and
    // skipped steps.
    let (shards, _updates) =
        rpc("optimizer", wr, step, st.optimizer.call(OptimizerMsg::Snapshot, Some(ctx.timeout)).await)?;
    // Parameters are copied where they are written or sent to the writer, and where the
    // devices' parts are gathered (a collective of every data-parallel rank).
    let keep_params = ctx.dp_rank == 0 || (st.gather_on_device && plan.dp > 1);
    let (mut params, mut shards) = st
        .job(step, "read parameters for a checkpoint", move |e: &mut Engine| {
            let mut shards = shards;
            let mut params = Vec::with_capacity(e.chunks.len());
            for (g, shard) in e.chunks.iter_mut().zip(shards.iter_mut()) {
                // A device optimizer's parameters and moments come from the device.
                if keep_params {
                    g.pull_params()?;
                }
                g.optimizer_state_into(shard)?;
                params.push(if keep_params { g.params().to_vec() } else { Vec::new() });
            }
            Ok::<_, ModelError>((params, shards))
        })
        .await?
        .map_err(|e| model_err(&ctx, step, "read parameters for a checkpoint", e))?;
    let buckets = st.job(step, "bucket layout", |e: &mut Engine| e.buckets.clone()).await?;
    if st.gather_on_device && plan.dp > 1 {
        // The devices hold the fp32 master weights of their own parts only.
        for (p, bs) in params.iter_mut().zip(&buckets) {
            gather_bucket_parts(&ctx, step, "checkpoint: master weight all-gather", bs, p).await?;
        }
    }
    // Full-arena moments of every chunk, on data-parallel rank 0 only (it writes, or sends to
    // the writer). Under the distributed optimizer the other data-parallel ranks send it their
    // shards, so no rank but that one ever holds a chunk's full moments: a save keeps the
    // optimizer's memory saving (an all-gather gave every rank the full moments).
    let dist = plan.distributed_optimizer && plan.dp > 1;
    if ctx.dp_rank != 0 {
        if dist {
            let to = wr - ctx.dp_rank;
            let mut tag = MOMENTS_TAG;
            for shard in shards {
                for x in [shard.m, shard.v] {
                    let w = ctx.world.send(Buf::F32(x), to, tag);
                    wait_work(&ctx, step, "checkpoint: send moments to data-parallel rank 0", w).await?;
                    tag += 1;
                }
            }
        }
        return Ok(());
    }
    let mut moments: Vec<(Vec<f32>, Vec<f32>)> = Vec::with_capacity(shards.len());
    let mut tag = MOMENTS_TAG;
    for (c, shard) in shards.iter_mut().enumerate() {
        let n = params[c].len();
        if !dist && shard.ranges.len() == 1 && shard.ranges[0] == (0..n) {
            // A whole-arena shard (no distributed optimizer) is already the full moments.
            moments.push((std::mem::take(&mut shard.m), std::mem::take(&mut shard.v)));
            continue;
        }
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        scatter_shard(&shard.ranges, &shard.m, &mut m);
        scatter_shard(&shard.ranges, &shard.v, &mut v);
        if dist {
            for q in 1..plan.dp {
                let ranges = ChunkShard::new(n, &buckets[c], plan.dp, q, true).ranges;
                let len = ranges.iter().map(std::ops::Range::len).sum();
                for (k, arena) in [&mut m, &mut v].into_iter().enumerate() {
                    let w = ctx.world.recv(DType::F32, len, wr + q, tag + k as u64);
                    let got = wait_work(&ctx, step, "checkpoint: receive moments of a data-parallel rank", w)
                        .await?;
                    let Buf::F32(part) = got else {
                        return Err(RuntimeError::Actor {
                            actor: "supervisor".into(),
                            rank: wr,
                            step,
                            op: "checkpoint".into(),
                            detail: format!("moments of data-parallel rank {q} arrived as another type"),
                        });
                    };
                    scatter_shard(&ranges, &part, arena);
                }
            }
            tag += 2;
        }
        moments.push((m, v));
    }
    if wr != 0 {
        let mut tag = TAG;
        for (p, (m, v)) in params.into_iter().zip(moments) {
            for x in [p, m, v] {
                wait_work(&ctx, step, "checkpoint: send to rank 0", ctx.world.send(Buf::F32(x), 0, tag))
                    .await?;
                tag += 1;
            }
        }
        return Ok(());
    }
    // World rank 0: write the whole model and optimizer, by tensor name.
    let cfg = &ctx.cfg;
    let fail = |detail: String| RuntimeError::Actor {
        actor: "supervisor".into(),
        rank: wr,
        step,
        op: "checkpoint".into(),
        detail,
    };
    // The checkpoint writer takes every tensor from the chunk that holds it, as the chunks are:
    // the whole model is never assembled in one more copy.
    let tables: Vec<crate::models::params::ParamTable> =
        (0..plan.vpp).map(|c| crate::models::gpt::param_table(&cfg.model, plan.range_of(0, c))).collect();
    let mut received: Vec<(crate::models::params::ParamTable, Vec<Vec<f32>>)> = Vec::new();
    for r in 1..plan.pp {
        let peer = r * plan.dp;
        let mut tag = TAG;
        for c in 0..plan.vpp {
            let table = crate::models::gpt::param_table(&cfg.model, plan.range_of(r, c));
            let n = table.len();
            let mut parts = Vec::with_capacity(3);
            for _ in 0..3 {
                let w = ctx.world.recv(DType::F32, n, peer, tag);
                let b = wait_work(&ctx, step, "checkpoint: receive from a pipeline rank", w).await?;
                tag += 1;
                let Buf::F32(x) = b else { return Err(fail("a non-f32 checkpoint part".into())) };
                parts.push(x);
            }
            received.push((table, parts));
        }
    }
    let mut parts: Vec<crate::checkpoint::Part<'_>> = Vec::new();
    for (table, (p, (m, v))) in tables.iter().zip(params.iter().zip(&moments)) {
        parts.push(crate::checkpoint::Part { table, params: p, m, v });
    }
    for (table, x) in &received {
        parts.push(crate::checkpoint::Part { table, params: &x[0], m: &x[1], v: &x[2] });
    }
    let full = crate::models::gpt::param_table(&cfg.model, crate::models::gpt::LayerRange::full(&cfg.model));
    let state = crate::checkpoint::TrainState {
        step,
        consumed_samples: consumed,
        skipped_steps: skipped,
        rng_state: cfg.train.seed,
        config: cfg.clone(),
    };
    use super::faults::FaultKind as K;
    let fault =
        ctx.faults.iter().find(|(f, _)| f.step == step && matches!(f.kind, K::CkptFail | K::CkptKill));
    let fault = fault.map(|(f, _)| {
        if f.kind == K::CkptFail {
            crate::checkpoint::SaveFault::DiskFull
        } else {
            crate::checkpoint::SaveFault::Kill
        }
    });
    let arenas = crate::checkpoint::Arenas { full: &full, parts: &parts };
    let dir =
        crate::checkpoint::save_with_fault(std::path::Path::new(&cfg.checkpoint.save), &state, arenas, fault)
            .map_err(|e| RuntimeError::Actor {
                actor: "checkpoint writer".into(),
                rank: wr,
                step,
                op: "save".into(),
                detail: format!("{e} ({})", crate::checkpoint::KEPT_LATEST),
            })?;
    if let Some(tx) = &st.events {
        let _ = tx.send(RunEvent::Saved { step, path: dir.display().to_string() });
    }
    Ok(())
}

/// Crash, exit, hang or slow faults placed in a step-end phase.
async fn phase_fault(
    ctx: &RankCtx,
    step: u64,
    phase: super::faults::Phase,
    actor: &str,
) -> Result<(), RuntimeError> {
    use super::faults::FaultKind as K;
    let Some(f) = ctx.fault_in(step, phase, &[K::Crash, K::Exit, K::Hang, K::Slow]) else {
        ctx.note(step, || format!("{} phase", phase.name()));
        return Ok(());
    };
    ctx.note(step, || format!("{} phase: injected {}", phase.name(), f.describe()));
    match f.kind {
        K::Exit => {
            eprintln!("troupe: injected fault {}: rank {} exits now", f.describe(), ctx.world_rank);
            std::process::exit(43);
        }
        K::Hang => std::future::pending::<()>().await,
        K::Slow => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
        _ => {}
    }
    Err(RuntimeError::Actor {
        actor: actor.into(),
        rank: ctx.world_rank,
        step,
        op: phase.name().into(),
        detail: format!("injected crash ({})", f.describe()),
    })
}

/// Mean loss over `logging.eval_iters` global batches of `valid` from sample `first` on (the
/// single-rank trainer's samples, `eval_first_sample`): each microbatch goes forward through the stages in order,
/// one at a time; data-parallel replica `d` takes microbatches `i ≡ d (mod dp)`; the per-
/// microbatch losses are gathered and added in microbatch order, so the result has the
/// single-rank bits.
async fn evaluate(
    st: &mut SupState,
    step: u64,
    valid: &Arc<dyn SampleSource>,
    first: u64,
) -> Result<f32, RuntimeError> {
    const TAG: u64 = 0xE7A1 << 48;
    let ctx = st.ctx.clone();
    let plan = ctx.plan.clone();
    let cfg = &ctx.cfg;
    let (b, seq) = (plan.micro_batch_size, ctx.seq);
    let n = cfg.eval_microbatches().max(1) as usize;
    let stages = plan.num_stages();
    let wr = ctx.world_rank;
    let fail = |detail: String| RuntimeError::Actor {
        actor: "evaluator".into(),
        rank: wr,
        step,
        op: "eval".into(),
        detail,
    };
    let mut losses = vec![0.0f64; n];
    let mut mine = vec![false; n];
    let mut buf = crate::train::data::BatchBuf::default();
    for (i, slot) in losses.iter_mut().enumerate() {
        if i % plan.dp != ctx.dp_rank {
            continue;
        }
        buf.fill(valid.as_ref(), first + (i * b) as u64, b).map_err(|e| fail(e.to_string()))?;
        let mut hidden: Option<Hidden> = None;
        for s in 0..stages {
            let (r, c) = plan.program.locate(s);
            if r != ctx.pp_rank {
                continue;
            }
            let input = if s == 0 {
                None
            } else if let Some(h) = hidden.take() {
                Some(h)
            } else {
                let (pr, _) = plan.program.locate(s - 1);
                let wire = Wire { checksums: false, ..ctx.wire };
                let w = ctx.pp.recv(wire.dtype, ctx.hidden_len(), pr, TAG | ((i as u64) << 8) | s as u64);
                let b = wait_work(&ctx, step, "eval: receive activation", w).await?;
                Some(wire.unpack(b, "activation", pr).map_err(fail)?)
            };
            let (tokens, targets) = (buf.tokens.clone(), buf.targets.clone());
            let last = s == stages - 1;
            let id = u64::MAX - 1 - i as u64;
            let r = st
                .job(step, "eval forward", move |e: &mut Engine| {
                    let Engine { be, chunks, .. } = e;
                    let g = &mut chunks[c];
                    let inp = match &input {
                        None => StageInput::Tokens(&tokens),
                        Some(h) => h.as_input(),
                    };
                    let loss = g.forward(&**be, id, b, seq, inp, last.then_some(&targets[..]), 1.0);
                    let out = if last { Ok(None) } else { g.output(id) };
                    g.release(id);
                    loss.and_then(|l| Ok((l, out?)))
                })
                .await?;
            let (loss, out) = r.map_err(|e| fail(e.to_string()))?;
            if let Some(l) = loss {
                *slot = f64::from(l);
                mine[i] = true;
            }
            if let Some(out) = out {
                let (nr, _) = plan.program.locate(s + 1);
                if nr == ctx.pp_rank {
                    hidden = Some(out);
                } else {
                    let buf = Wire { checksums: false, ..ctx.wire }.pack(out);
                    let w = ctx.pp.send(buf, nr, TAG | ((i as u64) << 8) | (s + 1) as u64);
                    wait_work(&ctx, step, "eval: send activation", w).await?;
                }
            }
        }
    }
    // Every rank learns every microbatch's loss (one holder each), then adds them in order.
    let world = ctx.world.size();
    let held: Vec<f64> = losses.iter().zip(&mine).map(|(&l, &m)| if m { l } else { 0.0 }).collect();
    let vals = gather_f64(&ctx, step, "eval: gather losses", &held).await?;
    let mut sum = 0.0f64;
    for i in 0..n {
        sum += (0..world).map(|r| vals[r * n + i]).fold(0.0f64, |a, x| a + x);
    }
    Ok((sum / n as f64) as f32)
}
