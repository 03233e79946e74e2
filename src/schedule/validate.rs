//! The validator: proves a program (generated, or hand-written and parsed) well formed and
//! deadlock-free before anything runs it.
//!
//! Checks, in order: header and ranges; per rank, every `(mb, chunk)` is forwarded once and
//! backwarded once (B, or I then W); local order (a receive before the op that consumes it, F
//! before its backward, I before W, the next stage's backward — or its gradient's receive —
//! before this stage's backward, a send after its producer, `ReduceGrads` after the chunk's last
//! B/W, `OptimizerStep` after every `ReduceGrads`); every send has exactly one matching receive
//! on the right peer; and finally a dry run with **blocking rendezvous** send/recv (a send and its
//! receive complete together) that must reach the end of every rank. The first violation is
//! returned as an error naming the rank, the instruction index and the pair.

use super::error::{Blocked, Result, ScheduleError};
use super::ir::{Op, OpKind, Placement, Program};
use std::collections::HashSet;

/// How the dry run treats point-to-point messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Semantics {
    /// A send blocks until its receive is posted and vice versa (NCCL-like). The strictest.
    Rendezvous,
    /// A send never blocks; a receive blocks until its message was sent (actor mailboxes).
    Buffered,
}

/// Validate `program` completely (structure, pairing, rendezvous dry run).
///
/// # Errors
/// The first violation found, naming rank, instruction index and pair.
pub fn validate(program: &Program) -> Result<()> {
    check_header(program)?;
    let seen = (0..program.pp).map(|rank| check_rank(program, rank)).collect::<Result<Vec<_>>>()?;
    check_matching(program, &seen)?;
    dry_run(program, Semantics::Rendezvous)
}

/// Largest `pp·vpp·microbatches` accepted: the checks keep tables of that many slots per rank.
pub(crate) const MAX_SLOTS: usize = 1 << 26;

/// Whether `pp·vpp·microbatches` is positive and at most `MAX_SLOTS`.
pub fn dims_ok(pp: usize, vpp: usize, microbatches: usize) -> bool {
    let slots = pp.checked_mul(vpp).and_then(|s| s.checked_mul(microbatches));
    slots.is_some_and(|s| (1..=MAX_SLOTS).contains(&s))
}

/// Sizes are positive, not absurd, consistent with the placement and the rank lists.
pub(crate) fn check_header(p: &Program) -> Result<()> {
    let reason = if p.pp == 0 || p.vpp == 0 || p.microbatches == 0 {
        "pp, vpp and microbatches must be at least 1"
    } else if !dims_ok(p.pp, p.vpp, p.microbatches) {
        "pp * vpp * microbatches is too large (at most 2^26)"
    } else if p.placement == Placement::V && p.vpp != 2 {
        "placement v needs exactly vpp = 2"
    } else if p.ranks.len() != p.pp {
        return Err(ScheduleError::RankCount { pp: p.pp, found: p.ranks.len() });
    } else {
        return Ok(());
    };
    Err(ScheduleError::Header { reason: reason.to_string() })
}

/// Where each op of one rank sits (`ABSENT` = nowhere), indexed by `mb·v + chunk`; `u32`
/// keeps the table small enough to stay in cache at p = 64, m = 512, v = 4.
#[derive(Clone)]
struct Seen {
    at: Vec<[u32; 8]>,
}

const ABSENT: u32 = u32::MAX;

const SLOT_KINDS: [OpKind; 8] = [
    OpKind::Forward,
    OpKind::Backward,
    OpKind::BackwardInput,
    OpKind::BackwardWeight,
    OpKind::SendAct,
    OpKind::RecvAct,
    OpKind::SendGrad,
    OpKind::RecvGrad,
];

fn kind_slot(kind: OpKind) -> usize {
    SLOT_KINDS.iter().position(|&k| k == kind).unwrap_or(0)
}

impl Seen {
    fn get(&self, p: &Program, mb: u32, chunk: usize, kind: OpKind) -> Option<usize> {
        let at = self.at[mb as usize * p.vpp + chunk][kind_slot(kind)];
        (at != ABSENT).then_some(at as usize)
    }
}

/// Scan rank `rank`: ranges, duplicates, local order, peers, completeness.
fn check_rank(p: &Program, rank: usize) -> Result<Seen> {
    let mut seen = Seen { at: vec![[ABSENT; 8]; p.microbatches * p.vpp] };
    let mut finals = vec![0usize; p.vpp];
    let mut reduced = vec![false; p.vpp];
    for (index, &op) in p.ranks[rank].iter().enumerate() {
        check_range(p, rank, index, op)?;
        match op {
            Op::ReduceGrads { chunk } => {
                let c = chunk as usize;
                if finals[c] != p.microbatches || reduced[c] {
                    let needs = format!("all {} weight gradients of its chunk (once)", p.microbatches);
                    return Err(ScheduleError::Order { rank, index, op, mb: finals[c] as u32, chunk, needs });
                }
                reduced[c] = true;
            }
            Op::OptimizerStep => {
                if let Some(c) = reduced.iter().position(|r| !r).filter(|_| reduced.iter().any(|&r| r)) {
                    let needs = format!("`{c}RED`");
                    return Err(ScheduleError::Order { rank, index, op, mb: 0, chunk: c as u32, needs });
                }
            }
            _ => {
                check_op(p, rank, index, op, &seen)?;
                let (mb, chunk) = op.pair().unwrap_or_default();
                seen.at[mb as usize * p.vpp + chunk as usize][kind_slot(op.kind())] = index as u32;
                if matches!(op.kind(), OpKind::Backward | OpKind::BackwardWeight) {
                    finals[chunk as usize] += 1;
                }
            }
        }
    }
    check_complete(p, rank, &seen)?;
    Ok(seen)
}

/// Header and per-op ranges only: what the simulator needs to index its tables safely.
pub(crate) fn check_ranges(p: &Program) -> Result<()> {
    check_header(p)?;
    for (rank, ops) in p.ranks.iter().enumerate() {
        for (index, &op) in ops.iter().enumerate() {
            check_range(p, rank, index, op)?;
        }
    }
    Ok(())
}

fn check_range(p: &Program, rank: usize, index: usize, op: Op) -> Result<()> {
    let bad = |reason: String| Err(ScheduleError::OutOfRange { rank, index, op, reason });
    if let Some(c) = op.chunk().filter(|&c| c as usize >= p.vpp) {
        return bad(format!("chunk {c} but vpp = {}", p.vpp));
    }
    if let Some((mb, _)) = op.pair().filter(|&(mb, _)| mb as usize >= p.microbatches) {
        return bad(format!("microbatch {mb} but microbatches = {}", p.microbatches));
    }
    let Some(peer) = op.peer() else { return Ok(()) };
    let (_, chunk) = op.pair().unwrap_or_default();
    let stage = p.stage_of(rank, chunk as usize);
    let other = match op.kind() {
        OpKind::SendAct | OpKind::RecvGrad => stage + 1,
        _ => stage.wrapping_sub(1),
    };
    if other >= p.stages() {
        return bad(format!("stage {stage} has no neighbour in that direction"));
    }
    let (expected, _) = p.locate(other);
    if expected == rank {
        return bad(format!("stages {stage} and {other} are both on rank {rank}: no message needed"));
    }
    if peer as usize != expected {
        return Err(ScheduleError::WrongPeer { rank, index, op, expected });
    }
    Ok(())
}

/// Dependencies of one compute or comm op on earlier ops of the same rank.
fn check_op(p: &Program, rank: usize, index: usize, op: Op, seen: &Seen) -> Result<()> {
    let (mb, chunk) = op.pair().unwrap_or_default();
    let c = chunk as usize;
    let has = |k: OpKind| seen.get(p, mb, c, k);
    if let Some(first) = has(op.kind()) {
        return Err(ScheduleError::Duplicate { rank, index, op, mb, chunk, first });
    }
    let mixed = match op.kind() {
        OpKind::Backward => has(OpKind::BackwardInput).or(has(OpKind::BackwardWeight)).is_some(),
        OpKind::BackwardInput | OpKind::BackwardWeight => has(OpKind::Backward).is_some(),
        _ => false,
    };
    if mixed {
        return Err(ScheduleError::MixedBackward { rank, index, op, mb, chunk });
    }
    match missing_dependency(p, rank, op, seen) {
        Some(needs) => Err(ScheduleError::Order { rank, index, op, mb, chunk, needs }),
        None => Ok(()),
    }
}

/// What `op` needs earlier on this rank and does not have, in words (None: all present).
fn missing_dependency(p: &Program, rank: usize, op: Op, seen: &Seen) -> Option<String> {
    let (mb, chunk) = op.pair().unwrap_or_default();
    let c = chunk as usize;
    let stage = p.stage_of(rank, c);
    let has = |k: OpKind| seen.get(p, mb, c, k);
    match op.kind() {
        OpKind::Forward if stage > 0 => {
            let (pr, pc) = p.locate(stage - 1);
            if pr == rank && seen.get(p, mb, pc, OpKind::Forward).is_none() {
                return Some(format!("the forward of (mb {mb}, chunk {pc}) on this rank"));
            }
            if pr != rank && has(OpKind::RecvAct).is_none() {
                return Some(format!("receiving its activation from rank {pr}"));
            }
        }
        OpKind::Backward | OpKind::BackwardInput => {
            if has(OpKind::Forward).is_none() {
                return Some("its forward".to_string());
            }
            if stage + 1 < p.stages() {
                let (nr, nc) = p.locate(stage + 1);
                let local =
                    seen.get(p, mb, nc, OpKind::Backward).or(seen.get(p, mb, nc, OpKind::BackwardInput));
                if nr == rank && local.is_none() {
                    return Some(format!("the backward of (mb {mb}, chunk {nc}) on this rank"));
                }
                if nr != rank && has(OpKind::RecvGrad).is_none() {
                    return Some(format!("receiving its output gradient from rank {nr}"));
                }
            }
        }
        OpKind::BackwardWeight if has(OpKind::BackwardInput).is_none() => {
            return Some("its input-gradient backward (I)".to_string());
        }
        OpKind::SendAct if has(OpKind::Forward).is_none() => {
            return Some("the forward that produces it".to_string());
        }
        OpKind::SendGrad if has(OpKind::Backward).or(has(OpKind::BackwardInput)).is_none() => {
            return Some("the backward that produces it".to_string());
        }
        _ => {}
    }
    None
}

fn check_complete(p: &Program, rank: usize, seen: &Seen) -> Result<()> {
    for mb in 0..p.microbatches as u32 {
        for c in 0..p.vpp {
            let has = |k: OpKind| seen.get(p, mb, c, k).is_some();
            let what = if !has(OpKind::Forward) {
                "forward (F)"
            } else if !has(OpKind::Backward) && !has(OpKind::BackwardInput) {
                "backward (B, or I then W)"
            } else if has(OpKind::BackwardInput) && !has(OpKind::BackwardWeight) {
                "weight-gradient backward (W) after its I"
            } else {
                continue;
            };
            let index = p.ranks[rank].len();
            return Err(ScheduleError::Missing { rank, index, mb, chunk: c as u32, what });
        }
    }
    Ok(())
}

/// The op the peer must run to match communication op `op` on `rank`: `(peer, op)`.
pub(crate) fn counterpart(p: &Program, rank: usize, op: Op) -> Option<(usize, Op)> {
    let (mb, chunk) = op.pair()?;
    let stage = p.stage_of(rank, chunk as usize);
    let (dir_next, kind) = match op.kind() {
        OpKind::SendAct => (true, OpKind::RecvAct),
        OpKind::RecvAct => (false, OpKind::SendAct),
        OpKind::SendGrad => (false, OpKind::RecvGrad),
        OpKind::RecvGrad => (true, OpKind::SendGrad),
        _ => return None,
    };
    let other = if dir_next { stage + 1 } else { stage.checked_sub(1)? };
    if other >= p.stages() {
        return None;
    }
    let (q, qc) = p.locate(other);
    Some((q, Op::from_parts(kind, mb, qc as u32, rank as u32)))
}

/// Every send and receive has its counterpart on the peer (peers were checked by
/// `check_range`, duplicates by `check_op`, so "present" means "exactly one").
fn check_matching(p: &Program, seen: &[Seen]) -> Result<()> {
    for (rank, ops) in p.ranks.iter().enumerate() {
        for (index, &op) in ops.iter().enumerate() {
            let Some((q, want)) = counterpart(p, rank, op) else {
                continue;
            };
            let (wmb, wchunk) = want.pair().unwrap_or_default();
            if seen[q].get(p, wmb, wchunk as usize, want.kind()).is_none() {
                let (mb, chunk) = op.pair().unwrap_or_default();
                let reason = if matches!(op.kind(), OpKind::SendAct | OpKind::SendGrad) {
                    format!("is sent to rank {q}, which never posts `{want}`")
                } else {
                    format!("is received from rank {q}, which never posts `{want}`")
                };
                return Err(ScheduleError::Unmatched { rank, index, op, mb, chunk, reason });
            }
        }
    }
    Ok(())
}

/// Execute the program abstractly with the given message semantics; fail if it cannot finish.
///
/// # Errors
/// [`ScheduleError::Deadlock`] listing every rank that cannot proceed and its head instruction.
pub fn dry_run(p: &Program, semantics: Semantics) -> Result<()> {
    check_ranges(p)?;
    let mut pc = vec![0usize; p.pp];
    let mut in_flight: HashSet<(usize, Op)> = HashSet::new();
    loop {
        let mut progress = false;
        for r in 0..p.pp {
            while let Some(&op) = p.ranks[r].get(pc[r]) {
                let Some((q, want)) = counterpart(p, r, op) else {
                    pc[r] += 1;
                    progress = true;
                    continue;
                };
                let is_send = matches!(op.kind(), OpKind::SendAct | OpKind::SendGrad);
                let done = match semantics {
                    Semantics::Rendezvous => {
                        if p.ranks[q].get(pc[q]) == Some(&want) {
                            pc[q] += 1;
                            true
                        } else {
                            false
                        }
                    }
                    Semantics::Buffered if is_send => {
                        in_flight.insert((q, want));
                        true
                    }
                    Semantics::Buffered => in_flight.remove(&(r, op)),
                };
                if !done {
                    break;
                }
                pc[r] += 1;
                progress = true;
            }
        }
        if (0..p.pp).all(|r| pc[r] == p.ranks[r].len()) {
            return Ok(());
        }
        if !progress {
            let blocked = (0..p.pp)
                .filter_map(|rank| {
                    p.ranks[rank].get(pc[rank]).map(|&op| Blocked { rank, index: pc[rank], op })
                })
                .collect();
            return Err(ScheduleError::Deadlock { blocked });
        }
    }
}
