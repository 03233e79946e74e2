//! The simulator: plays a program with per-instruction costs and a latency + bandwidth message
//! model, and reports the timeline, makespan, per-rank busy/idle, bubble fraction and peak
//! in-flight activations.
//!
//! Execution model (that of an actor runtime with mailboxes): each rank runs its ops in order on
//! one compute stream; a send is asynchronous (it leaves when its producer is done and arrives
//! `latency + bytes/bandwidth` later, taking no compute time); a receive only posts a mailbox slot,
//! and the op that consumes the message waits for its arrival. Stages on the same rank hand over
//! locally at no cost.
//!
//! Definitions: *busy* = time in F/B/I/W; *idle* = makespan − busy; *bubble fraction* = idle /
//! busy (Megatron's "idle over ideal"), reported per rank and as the worst rank; *span bubble*
//! only counts idle time between a rank's own first and last compute op. *In flight* = (mb, chunk)
//! pairs whose forward has run and whose backward (B, or W when split) has not.

use super::error::{Blocked, Result, ScheduleError};
use super::ir::{Op, OpKind, Program};
use serde::{Deserialize, Serialize};

/// Time of one instruction on one chunk, and the message model. Units are arbitrary but shared.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    pub forward: f64,
    /// Full backward B.
    pub backward: f64,
    /// Input-gradient backward I.
    pub backward_input: f64,
    /// Weight-gradient backward W.
    pub backward_weight: f64,
    pub reduce: f64,
    pub step: f64,
    /// Fixed cost of each message.
    pub latency: f64,
    /// Bytes per time unit; infinite means size does not matter.
    pub bandwidth: f64,
    /// Bytes of one activation (and of one gradient) message.
    pub message_bytes: u64,
}

impl Default for Costs {
    /// F = 1, B = 2 (I = W = 1), free communication.
    fn default() -> Self {
        Costs {
            forward: 1.0,
            backward: 2.0,
            backward_input: 1.0,
            backward_weight: 1.0,
            reduce: 0.0,
            step: 0.0,
            latency: 0.0,
            bandwidth: f64::INFINITY,
            message_bytes: 0,
        }
    }
}

impl Costs {
    /// Parse `f=1,b=2,w=1[,i=..][,lat=..][,bw=..][,bytes=..][,reduce=..][,step=..]` on top of the
    /// defaults. When only one of B and I is given, the other follows from `B = I + W`.
    ///
    /// # Errors
    /// [`ScheduleError::Costs`] for unknown keys, non-numbers, negative or inconsistent values.
    pub fn parse(spec: &str) -> Result<Costs> {
        let bad = |reason: String| ScheduleError::Costs { reason };
        let mut c = Costs::default();
        let (mut b, mut i) = (None, None);
        for field in spec.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (key, value) =
                field.split_once('=').ok_or_else(|| bad(format!("`{field}` is not key=value")))?;
            let x: f64 = value.parse().map_err(|_| bad(format!("`{key}={value}` is not a number")))?;
            if x.is_nan() || x < 0.0 {
                return Err(bad(format!("`{key}` must be >= 0, got {value}")));
            }
            match key {
                "f" => c.forward = x,
                "b" => b = Some(x),
                "i" => i = Some(x),
                "w" => c.backward_weight = x,
                "lat" | "latency" => c.latency = x,
                "bw" | "bandwidth" if x > 0.0 => c.bandwidth = x,
                "bytes" => c.message_bytes = x as u64,
                "reduce" => c.reduce = x,
                "step" => c.step = x,
                _ => {
                    return Err(bad(format!(
                        "unknown or invalid key `{key}` (f, b, i, w, lat, bw>0, bytes, reduce, step)"
                    )));
                }
            }
        }
        let w = c.backward_weight;
        match (b, i) {
            (Some(b), Some(i)) => (c.backward, c.backward_input) = (b, i),
            (Some(b), None) if b >= w => (c.backward, c.backward_input) = (b, b - w),
            (Some(b), None) => return Err(bad(format!("b = {b} is smaller than w = {w}"))),
            (None, Some(i)) => (c.backward, c.backward_input) = (i + w, i),
            (None, None) => (c.backward, c.backward_input) = (c.backward_input + w, c.backward_input),
        }
        Ok(c)
    }

    /// Compute time of `kind` (zero for communication ops, which cost no compute time).
    pub fn of(&self, kind: OpKind) -> f64 {
        match kind {
            OpKind::Forward => self.forward,
            OpKind::Backward => self.backward,
            OpKind::BackwardInput => self.backward_input,
            OpKind::BackwardWeight => self.backward_weight,
            OpKind::ReduceGrads => self.reduce,
            OpKind::OptimizerStep => self.step,
            _ => 0.0,
        }
    }

    /// Time from a send leaving to its message arriving.
    pub fn transfer(&self) -> f64 {
        self.latency + self.message_bytes as f64 / self.bandwidth
    }
}

/// One op placed in time. For a send, `end` is the arrival; for a receive, `[posted, arrival]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimedOp {
    pub op: Op,
    pub start: f64,
    pub end: f64,
}

/// Per-rank results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankStats {
    pub busy: f64,
    pub idle: f64,
    /// idle / busy.
    pub bubble: f64,
    /// Idle time between this rank's first and last compute op, over busy.
    pub span_bubble: f64,
    /// Peak number of (mb, chunk) activations held.
    pub peak_in_flight: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub makespan: f64,
    /// Worst rank's idle / busy.
    pub bubble: f64,
    /// Worst rank's span bubble.
    pub span_bubble: f64,
    pub ranks: Vec<RankStats>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    /// `timeline[r][i]` times `program.ranks[r][i]`.
    pub timeline: Vec<Vec<TimedOp>>,
    pub stats: Stats,
}

/// Arrival times of messages, indexed by (receiving rank, mb, chunk), one table per direction.
struct Mailboxes {
    vpp: usize,
    per_rank: usize,
    act: Vec<f64>,
    grad: Vec<f64>,
}

impl Mailboxes {
    fn slot(&self, rank: usize, mb: u32, chunk: u32) -> usize {
        rank * self.per_rank + mb as usize * self.vpp + chunk as usize
    }
    fn table(&mut self, kind: OpKind) -> &mut Vec<f64> {
        if matches!(kind, OpKind::SendAct | OpKind::RecvAct | OpKind::Forward) {
            &mut self.act
        } else {
            &mut self.grad
        }
    }
}

/// Simulate `program` (which should have passed [`super::validate`]; only its sizes and ranges
/// are re-checked here).
///
/// # Errors
/// Range errors as the validator's; [`ScheduleError::Deadlock`] if some op waits for a message
/// that is never sent.
pub fn simulate(program: &Program, costs: &Costs) -> Result<Simulation> {
    simulate_with(program, &|_, _| *costs)
}

/// [`simulate`] with costs that depend on the rank and the instruction (e.g. measured per stage:
/// the first stage also runs the embedding, the last one the LM head and loss; or measured per
/// instruction from a trace). A send uses the message model of the costs given for it.
///
/// # Errors
/// As [`simulate`].
pub fn simulate_with(program: &Program, costs: &dyn Fn(usize, Op) -> Costs) -> Result<Simulation> {
    let p = program;
    super::validate::check_ranges(p)?;
    let per_rank = p.microbatches * p.vpp;
    let mut mail = Mailboxes {
        vpp: p.vpp,
        per_rank,
        act: vec![f64::NAN; p.pp * per_rank],
        grad: vec![f64::NAN; p.pp * per_rank],
    };
    let mut clock = vec![0.0f64; p.pp];
    let mut timeline: Vec<Vec<TimedOp>> = p.ranks.iter().map(|ops| Vec::with_capacity(ops.len())).collect();
    loop {
        let mut progress = false;
        for r in 0..p.pp {
            while let Some(&op) = p.ranks[r].get(timeline[r].len()) {
                let c = costs(r, op);
                let Some(timed) = place(p, &c, &mut mail, &mut clock[r], r, op) else {
                    break;
                };
                timeline[r].push(timed);
                progress = true;
            }
        }
        if (0..p.pp).all(|r| timeline[r].len() == p.ranks[r].len()) {
            break;
        }
        if !progress {
            let blocked = (0..p.pp)
                .filter_map(|rank| {
                    let index = timeline[rank].len();
                    p.ranks[rank].get(index).map(|&op| Blocked { rank, index, op })
                })
                .collect();
            return Err(ScheduleError::Deadlock { blocked });
        }
    }
    let stats = stats(p, &timeline);
    Ok(Simulation { timeline, stats })
}

/// Time one op on rank `r`, or `None` if it needs a message whose send is not simulated yet.
fn place(
    p: &Program,
    costs: &Costs,
    mail: &mut Mailboxes,
    clock: &mut f64,
    r: usize,
    op: Op,
) -> Option<TimedOp> {
    let kind = op.kind();
    let (mb, chunk) = op.pair().unwrap_or_default();
    let now = *clock;
    match kind {
        OpKind::SendAct | OpKind::SendGrad => {
            let (q, want) = super::validate::counterpart(p, r, op)?;
            let (wmb, wchunk) = want.pair()?;
            let arrival = now + costs.transfer();
            let slot = mail.slot(q, wmb, wchunk);
            mail.table(kind)[slot] = arrival;
            Some(TimedOp { op, start: now, end: arrival })
        }
        OpKind::RecvAct | OpKind::RecvGrad => {
            let slot = mail.slot(r, mb, chunk);
            let arrival = mail.table(kind)[slot];
            (!arrival.is_nan()).then_some(TimedOp { op, start: now, end: arrival.max(now) })
        }
        _ => {
            let mut start = now;
            if let Some(input) = cross_rank_input(p, r, op) {
                let slot = mail.slot(r, mb, chunk);
                let arrival = mail.table(input)[slot];
                if arrival.is_nan() {
                    return None;
                }
                start = start.max(arrival);
            }
            let end = start + costs.of(kind);
            *clock = end;
            Some(TimedOp { op, start, end })
        }
    }
}

/// For F and B/I whose input comes from another rank: which mailbox table holds it.
fn cross_rank_input(p: &Program, r: usize, op: Op) -> Option<OpKind> {
    let (_, chunk) = op.pair()?;
    let stage = p.stage_of(r, chunk as usize);
    let (neighbour, table) = match op.kind() {
        OpKind::Forward => (stage.checked_sub(1)?, OpKind::RecvAct),
        OpKind::Backward | OpKind::BackwardInput => (stage + 1, OpKind::RecvGrad),
        _ => return None,
    };
    if neighbour >= p.stages() || p.locate(neighbour).0 == r {
        return None;
    }
    Some(table)
}

fn stats(p: &Program, timeline: &[Vec<TimedOp>]) -> Stats {
    let compute = |t: &&TimedOp| t.op.kind().is_compute();
    let makespan = timeline.iter().flatten().filter(compute).map(|t| t.end).fold(0.0, f64::max);
    let ranks: Vec<RankStats> = timeline
        .iter()
        .enumerate()
        .map(|(r, line)| {
            let busy: f64 = line.iter().filter(compute).map(|t| t.end - t.start).sum();
            let first = line.iter().filter(compute).map(|t| t.start).fold(f64::INFINITY, f64::min);
            let last = line.iter().filter(compute).map(|t| t.end).fold(0.0, f64::max);
            let ratio = |idle: f64| if busy > 0.0 { idle / busy } else { 0.0 };
            let idle = makespan - busy;
            RankStats {
                busy,
                idle,
                bubble: ratio(idle),
                span_bubble: if first.is_finite() { ratio(last - first - busy) } else { 0.0 },
                peak_in_flight: peak_in_flight(&p.ranks[r]),
            }
        })
        .collect();
    Stats {
        makespan,
        bubble: ranks.iter().map(|s| s.bubble).fold(0.0, f64::max),
        span_bubble: ranks.iter().map(|s| s.span_bubble).fold(0.0, f64::max),
        ranks,
    }
}

/// Peak (mb, chunk) activations held by one rank's program: +1 at F, −1 at B or W.
pub fn peak_in_flight(ops: &[Op]) -> usize {
    let (mut held, mut peak) = (0usize, 0usize);
    for op in ops {
        match op.kind() {
            OpKind::Forward => {
                held += 1;
                peak = peak.max(held);
            }
            OpKind::Backward | OpKind::BackwardWeight => held = held.saturating_sub(1),
            _ => {}
        }
    }
    peak
}

/// Peaks per local chunk of one rank's program, `(activations, output gradients)`: a chunk holds
/// a microbatch's activations from its F to its B (or W), and a split backward's output
/// gradients from its I to its W. [`peak_in_flight`] is the peak of their sum over chunks.
pub fn chunk_peaks(ops: &[Op], chunks: usize) -> Vec<(usize, usize)> {
    let mut held = vec![(0usize, 0usize); chunks];
    let mut peak = vec![(0usize, 0usize); chunks];
    for op in ops {
        let Some((_, c)) = op.pair() else { continue };
        let (Some(h), Some(p)) = (held.get_mut(c as usize), peak.get_mut(c as usize)) else { continue };
        match op.kind() {
            OpKind::Forward => h.0 += 1,
            OpKind::Backward => h.0 = h.0.saturating_sub(1),
            OpKind::BackwardInput => h.1 += 1,
            OpKind::BackwardWeight => {
                h.0 = h.0.saturating_sub(1);
                h.1 = h.1.saturating_sub(1);
            }
            _ => {}
        }
        *p = (p.0.max(h.0), p.1.max(h.1));
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One chunk without split backwards: its activation peak is the rank's peak in flight
    /// (1F1B: min(p − r, m)). A zero-bubble schedule also holds output gradients between I and W.
    #[test]
    fn chunk_peaks_agree_with_the_rank_peak() {
        use crate::schedule::{ScheduleKind, ScheduleSpec, generate};
        let p = generate(&ScheduleSpec::new(ScheduleKind::OneFOneB, 4, 8)).unwrap();
        for (r, ops) in p.ranks.iter().enumerate() {
            assert_eq!(chunk_peaks(ops, 1), vec![(peak_in_flight(ops), 0)], "rank {r}");
            assert_eq!(chunk_peaks(ops, 1)[0].0, 4 - r, "rank {r}");
        }
        let zb = generate(&ScheduleSpec::new(ScheduleKind::ZbH1, 4, 8)).unwrap();
        assert!(zb.ranks.iter().all(|ops| chunk_peaks(ops, 1)[0].1 >= 1), "I then W holds output gradients");
    }

    #[test]
    fn costs_parse_and_derive() {
        let c = Costs::parse("f=1,b=2,w=1").unwrap();
        assert_eq!((c.forward, c.backward, c.backward_input, c.backward_weight), (1.0, 2.0, 1.0, 1.0));
        let c = Costs::parse("i=3,w=0.5,lat=0.25,bw=100,bytes=50").unwrap();
        assert_eq!(c.backward, 3.5);
        assert_eq!(c.transfer(), 0.75);
        for bad in ["f", "f=x", "f=-1", "q=1", "b=1,w=2", "bw=0"] {
            assert!(Costs::parse(bad).is_err(), "`{bad}` should be rejected");
        }
    }

    #[test]
    fn messages_cost_latency_plus_size_over_bandwidth() {
        use crate::schedule::{ScheduleKind, ScheduleSpec, generate};
        // 2 ranks, 1 microbatch: F0 → message → F1 → B1 → message → B0
        let program = generate(&ScheduleSpec::new(ScheduleKind::Gpipe, 2, 1)).unwrap();
        let costs = Costs::parse("f=1,b=2,w=1,lat=0.5,bw=50,bytes=100").unwrap();
        let sim = simulate(&program, &costs).unwrap();
        let message = 0.5 + 100.0 / 50.0;
        assert!((sim.stats.makespan - (1.0 + message + 1.0 + 2.0 + message + 2.0)).abs() < 1e-12);
        // rank 1 idles while the activation travels and after its backward
        let r1 = &sim.stats.ranks[1];
        assert!((r1.busy - 3.0).abs() < 1e-12 && (r1.idle - (sim.stats.makespan - 3.0)).abs() < 1e-12);
        // the receive on rank 1 spans posting (t = 0) to arrival (t = 1 + message)
        let recv = sim.timeline[1].iter().find(|t| t.op.kind() == OpKind::RecvAct).unwrap();
        assert_eq!((recv.start, recv.end), (0.0, 1.0 + message));
    }
}
