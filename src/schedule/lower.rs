//! The lowering pass: compute-only order → full program with sends, receives, `ReduceGrads` and
//! `OptimizerStep`.
//!
//! Like torch's `_add_send_recv`, it replays the ranks round-robin, one compute op per rank per
//! round, taking an op only once its input is available (a receive already placed on this rank, or
//! the producing op done on this rank for stages that sit on the same rank, as in the V). When an
//! op's output crosses ranks, the send is appended to the producer **and the matching receive to
//! the consumer's list at the same moment**. The order in which the lists were built is then a
//! valid execution even with blocking rendezvous send/recv, so the result is deadlock-free by
//! construction. `ReduceGrads{chunk}` follows a chunk's m-th B or W; `OptimizerStep` ends each
//! rank.

use super::error::{Blocked, Result, ScheduleError};
use super::ir::{Op, OpKind, Program};

/// Per-rank progress of the lowering replay.
struct RankState {
    todo: Vec<Op>,
    next: usize,
    out: Vec<Op>,
    fwd_done: Vec<bool>,
    bwd_done: Vec<bool>,
    act_here: Vec<bool>,
    grad_here: Vec<bool>,
    grads_final: Vec<usize>,
}

/// Lower a compute order (non-compute ops in the input are ignored) to a full program.
///
/// # Errors
/// [`ScheduleError::Header`]/[`ScheduleError::RankCount`] for bad sizes;
/// [`ScheduleError::OutOfRange`] for an op naming a chunk or microbatch outside the program;
/// [`ScheduleError::Stuck`] when some rank's next op can never get its input.
pub fn lower(compute: &Program) -> Result<Program> {
    let (pp, vpp, m) = (compute.pp, compute.vpp, compute.microbatches);
    super::validate::check_header(compute)?;
    let mut ranks: Vec<RankState> = Vec::with_capacity(pp);
    for (rank, ops) in compute.ranks.iter().enumerate() {
        let todo: Vec<Op> = ops.iter().copied().filter(|op| op.kind().is_compute()).collect();
        for (index, op) in todo.iter().enumerate() {
            let (mb, chunk) = op.pair().unwrap_or_default();
            if mb as usize >= m || chunk as usize >= vpp {
                let reason = format!("needs mb < {m} and chunk < {vpp}");
                return Err(ScheduleError::OutOfRange { rank, index, op: *op, reason });
            }
        }
        let cap = todo.len() * 2 + vpp + 1;
        ranks.push(RankState {
            todo,
            next: 0,
            out: Vec::with_capacity(cap),
            fwd_done: vec![false; m * vpp],
            bwd_done: vec![false; m * vpp],
            act_here: vec![false; m * vpp],
            grad_here: vec![false; m * vpp],
            grads_final: vec![0; vpp],
        });
    }
    loop {
        let mut progress = false;
        let mut finished = true;
        for r in 0..pp {
            let Some(&op) = ranks[r].todo.get(ranks[r].next) else {
                continue;
            };
            finished = false;
            if ready(compute, &ranks[r], r, op) {
                step(compute, &mut ranks, r, op);
                progress = true;
            }
        }
        if finished {
            break;
        }
        if !progress {
            let blocked = ranks
                .iter()
                .enumerate()
                .filter_map(|(rank, s)| s.todo.get(s.next).map(|&op| Blocked { rank, index: s.next, op }))
                .collect();
            return Err(ScheduleError::Stuck { blocked });
        }
    }
    let ranks = ranks
        .into_iter()
        .map(|mut s| {
            s.out.push(Op::OptimizerStep);
            s.out
        })
        .collect();
    Ok(Program { ranks, ..compute.clone() })
}

fn slot(vpp: usize, mb: u32, chunk: usize) -> usize {
    mb as usize * vpp + chunk
}

/// Is `op` (the head of rank `r`) able to run given what has been placed so far?
fn ready(p: &Program, s: &RankState, r: usize, op: Op) -> bool {
    let (mb, chunk) = op.pair().unwrap_or_default();
    let (vpp, c) = (p.vpp, chunk as usize);
    let stage = p.stage_of(r, c);
    match op.kind() {
        OpKind::Forward if stage == 0 => true,
        OpKind::Forward => {
            let (pr, pc) = p.locate(stage - 1);
            if pr == r { s.fwd_done[slot(vpp, mb, pc)] } else { s.act_here[slot(vpp, mb, c)] }
        }
        OpKind::Backward | OpKind::BackwardInput => {
            if !s.fwd_done[slot(vpp, mb, c)] {
                return false;
            }
            if stage + 1 == p.stages() {
                return true;
            }
            let (nr, nc) = p.locate(stage + 1);
            if nr == r { s.bwd_done[slot(vpp, mb, nc)] } else { s.grad_here[slot(vpp, mb, c)] }
        }
        _ => s.bwd_done[slot(vpp, mb, c)],
    }
}

/// Append `op` to rank `r`, plus any send (and the peer's matching receive) it causes.
fn step(p: &Program, ranks: &mut [RankState], r: usize, op: Op) {
    let (mb, chunk) = op.pair().unwrap_or_default();
    let (vpp, m, c) = (p.vpp, p.microbatches, chunk as usize);
    let stage = p.stage_of(r, c);
    ranks[r].next += 1;
    ranks[r].out.push(op);
    match op.kind() {
        OpKind::Forward => {
            ranks[r].fwd_done[slot(vpp, mb, c)] = true;
            if stage + 1 < p.stages() {
                let (q, qc) = p.locate(stage + 1);
                if q != r {
                    ranks[r].out.push(Op::SendAct { mb, chunk, peer: q as u32 });
                    ranks[q].out.push(Op::RecvAct { mb, chunk: qc as u32, peer: r as u32 });
                    ranks[q].act_here[slot(vpp, mb, qc)] = true;
                }
            }
        }
        OpKind::Backward | OpKind::BackwardInput => {
            ranks[r].bwd_done[slot(vpp, mb, c)] = true;
            if stage > 0 {
                let (q, qc) = p.locate(stage - 1);
                if q != r {
                    ranks[r].out.push(Op::SendGrad { mb, chunk, peer: q as u32 });
                    ranks[q].out.push(Op::RecvGrad { mb, chunk: qc as u32, peer: r as u32 });
                    ranks[q].grad_here[slot(vpp, mb, qc)] = true;
                }
            }
        }
        _ => {}
    }
    if matches!(op.kind(), OpKind::Backward | OpKind::BackwardWeight) {
        ranks[r].grads_final[c] += 1;
        if ranks[r].grads_final[c] == m {
            ranks[r].out.push(Op::ReduceGrads { chunk });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ir::Placement;

    #[test]
    fn two_rank_gpipe_gets_paired_comms() {
        let compute = Program {
            pp: 2,
            vpp: 1,
            microbatches: 1,
            placement: Placement::Looped,
            ranks: vec![
                vec![Op::Forward { mb: 0, chunk: 0 }, Op::Backward { mb: 0, chunk: 0 }],
                vec![Op::Forward { mb: 0, chunk: 0 }, Op::Backward { mb: 0, chunk: 0 }],
            ],
        };
        let full = lower(&compute).unwrap();
        let text: Vec<String> = full.ranks[0].iter().map(ToString::to_string).collect();
        assert_eq!(text, ["0F0", "0SA0:1", "0RG0:1", "0B0", "0RED", "STEP"]);
        let text: Vec<String> = full.ranks[1].iter().map(ToString::to_string).collect();
        assert_eq!(text, ["0RA0:0", "0F0", "0B0", "0SG0:0", "0RED", "STEP"]);
    }

    #[test]
    fn backward_before_forward_is_stuck() {
        let compute = Program {
            pp: 1,
            vpp: 1,
            microbatches: 1,
            placement: Placement::Looped,
            ranks: vec![vec![Op::Backward { mb: 0, chunk: 0 }, Op::Forward { mb: 0, chunk: 0 }]],
        };
        let err = lower(&compute).unwrap_err();
        assert!(matches!(err, ScheduleError::Stuck { ref blocked } if blocked[0].index == 0), "{err}");
    }
}
