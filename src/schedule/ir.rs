//! The schedule IR: a [`Program`] is, for each pipeline rank, an ordered list of [`Op`]s.
//!
//! Notation used throughout `schedule/`: `p` pipeline ranks (`pp`), `v` model chunks per rank
//! (`vpp`), `m` microbatches, `S = p·v` stages. Every op names a *local* chunk `c ∈ [0, v)` of the
//! rank it sits on; the [`Placement`] maps `(rank, chunk)` to a global stage. In a send, `(mb,
//! chunk)` is the producing chunk on the sending rank; in a receive it is the consuming chunk on
//! the receiving rank; `peer` is always the other rank. A program is only trusted after
//! [`crate::schedule::validate`] has accepted it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How chunks map to global stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Megatron's looped placement: chunk `c` on rank `r` is stage `c·p + r`.
    Looped,
    /// The V placement of ZB-V (exactly 2 chunks): chunk 0 is stage `r`, chunk 1 is `2p−1−r`.
    V,
}

impl Placement {
    /// The global stage of local chunk `chunk` on `rank`. Saturating, so out-of-range input (an
    /// unvalidated trace event) gives a nonsense stage rather than an overflow.
    pub fn stage(self, pp: usize, rank: usize, chunk: usize) -> usize {
        match self {
            Placement::Looped => chunk.saturating_mul(pp).saturating_add(rank),
            Placement::V if chunk == 0 => rank,
            Placement::V => pp.saturating_mul(2).saturating_sub(1).saturating_sub(rank),
        }
    }

    /// The `(rank, chunk)` that holds global stage `stage`.
    pub fn locate(self, pp: usize, stage: usize) -> (usize, usize) {
        match self {
            Placement::Looped => (stage % pp, stage / pp),
            Placement::V if stage < pp => (stage, 0),
            Placement::V => (2 * pp - 1 - stage, 1),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Placement::Looped => "looped",
            Placement::V => "v",
        }
    }
}

/// One instruction of a rank's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Forward of microbatch `mb` through local chunk `chunk` (the last stage also computes loss).
    Forward { mb: u32, chunk: u32 },
    /// Full backward (input and weight gradients) of `(mb, chunk)`.
    Backward { mb: u32, chunk: u32 },
    /// Input-gradient half of a split backward (zero-bubble "B", torch "I").
    BackwardInput { mb: u32, chunk: u32 },
    /// Weight-gradient half of a split backward (zero-bubble "W"); sends nothing.
    BackwardWeight { mb: u32, chunk: u32 },
    /// Send the activation produced by `(mb, chunk)` to `peer`.
    SendAct { mb: u32, chunk: u32, peer: u32 },
    /// Receive from `peer` the activation that `(mb, chunk)` consumes.
    RecvAct { mb: u32, chunk: u32, peer: u32 },
    /// Send the input gradient produced by the backward of `(mb, chunk)` to `peer`.
    SendGrad { mb: u32, chunk: u32, peer: u32 },
    /// Receive from `peer` the output gradient that the backward of `(mb, chunk)` consumes.
    RecvGrad { mb: u32, chunk: u32, peer: u32 },
    /// All of `chunk`'s gradients are final: its data-parallel reduction may start.
    ReduceGrads { chunk: u32 },
    /// Step the optimizer (after every chunk's gradients are reduced).
    OptimizerStep,
}

/// The broad class of an op, used by the simulator, traces and renderers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Forward,
    Backward,
    BackwardInput,
    BackwardWeight,
    SendAct,
    RecvAct,
    SendGrad,
    RecvGrad,
    ReduceGrads,
    OptimizerStep,
}

impl OpKind {
    pub const ALL: [OpKind; 10] = [
        OpKind::Forward,
        OpKind::Backward,
        OpKind::BackwardInput,
        OpKind::BackwardWeight,
        OpKind::SendAct,
        OpKind::RecvAct,
        OpKind::SendGrad,
        OpKind::RecvGrad,
        OpKind::ReduceGrads,
        OpKind::OptimizerStep,
    ];

    /// Short stable name used by the text forms (`F`, `B`, `I`, `W`, `SA`, `RA`, `SG`, `RG`, …).
    pub fn code(self) -> &'static str {
        match self {
            OpKind::Forward => "F",
            OpKind::Backward => "B",
            OpKind::BackwardInput => "I",
            OpKind::BackwardWeight => "W",
            OpKind::SendAct => "SA",
            OpKind::RecvAct => "RA",
            OpKind::SendGrad => "SG",
            OpKind::RecvGrad => "RG",
            OpKind::ReduceGrads => "RED",
            OpKind::OptimizerStep => "STEP",
        }
    }

    pub fn from_code(code: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn is_compute(self) -> bool {
        matches!(self, OpKind::Forward | OpKind::Backward | OpKind::BackwardInput | OpKind::BackwardWeight)
    }

    pub fn is_comm(self) -> bool {
        matches!(self, OpKind::SendAct | OpKind::RecvAct | OpKind::SendGrad | OpKind::RecvGrad)
    }
}

impl Op {
    pub fn kind(self) -> OpKind {
        match self {
            Op::Forward { .. } => OpKind::Forward,
            Op::Backward { .. } => OpKind::Backward,
            Op::BackwardInput { .. } => OpKind::BackwardInput,
            Op::BackwardWeight { .. } => OpKind::BackwardWeight,
            Op::SendAct { .. } => OpKind::SendAct,
            Op::RecvAct { .. } => OpKind::RecvAct,
            Op::SendGrad { .. } => OpKind::SendGrad,
            Op::RecvGrad { .. } => OpKind::RecvGrad,
            Op::ReduceGrads { .. } => OpKind::ReduceGrads,
            Op::OptimizerStep => OpKind::OptimizerStep,
        }
    }

    /// `(mb, chunk)` for compute and communication ops.
    pub fn pair(self) -> Option<(u32, u32)> {
        match self {
            Op::Forward { mb, chunk }
            | Op::Backward { mb, chunk }
            | Op::BackwardInput { mb, chunk }
            | Op::BackwardWeight { mb, chunk }
            | Op::SendAct { mb, chunk, .. }
            | Op::RecvAct { mb, chunk, .. }
            | Op::SendGrad { mb, chunk, .. }
            | Op::RecvGrad { mb, chunk, .. } => Some((mb, chunk)),
            Op::ReduceGrads { .. } | Op::OptimizerStep => None,
        }
    }

    /// The local chunk an op concerns, if any.
    pub fn chunk(self) -> Option<u32> {
        match self {
            Op::ReduceGrads { chunk } => Some(chunk),
            other => other.pair().map(|(_, c)| c),
        }
    }

    pub fn peer(self) -> Option<u32> {
        match self {
            Op::SendAct { peer, .. }
            | Op::RecvAct { peer, .. }
            | Op::SendGrad { peer, .. }
            | Op::RecvGrad { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// Build a compute or comm op from its parts (`peer` ignored for compute ops).
    pub fn from_parts(kind: OpKind, mb: u32, chunk: u32, peer: u32) -> Op {
        match kind {
            OpKind::Forward => Op::Forward { mb, chunk },
            OpKind::Backward => Op::Backward { mb, chunk },
            OpKind::BackwardInput => Op::BackwardInput { mb, chunk },
            OpKind::BackwardWeight => Op::BackwardWeight { mb, chunk },
            OpKind::SendAct => Op::SendAct { mb, chunk, peer },
            OpKind::RecvAct => Op::RecvAct { mb, chunk, peer },
            OpKind::SendGrad => Op::SendGrad { mb, chunk, peer },
            OpKind::RecvGrad => Op::RecvGrad { mb, chunk, peer },
            OpKind::ReduceGrads => Op::ReduceGrads { chunk },
            OpKind::OptimizerStep => Op::OptimizerStep,
        }
    }
}

/// Text token of an op: `<chunk><code><mb>` for compute (`1F3`), `<chunk><code><mb>:<peer>` for
/// communication (`0SA3:1`), `<chunk>RED`, `STEP`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.kind().code();
        match *self {
            Op::ReduceGrads { chunk } => write!(f, "{chunk}{code}"),
            Op::OptimizerStep => f.write_str(code),
            op => {
                let (mb, chunk) = op.pair().unwrap_or_default();
                match op.peer() {
                    Some(peer) => write!(f, "{chunk}{code}{mb}:{peer}"),
                    None => write!(f, "{chunk}{code}{mb}"),
                }
            }
        }
    }
}

/// A whole pipeline schedule: one ordered op list per rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Pipeline-parallel size `p` (number of ranks).
    pub pp: usize,
    /// Model chunks per rank `v`.
    pub vpp: usize,
    /// Microbatches per iteration `m`.
    pub microbatches: usize,
    pub placement: Placement,
    /// `ranks[r]` is rank `r`'s program, run in order.
    pub ranks: Vec<Vec<Op>>,
}

impl Program {
    /// Total number of stages `p·v`.
    pub fn stages(&self) -> usize {
        self.pp * self.vpp
    }

    pub fn stage_of(&self, rank: usize, chunk: usize) -> usize {
        self.placement.stage(self.pp, rank, chunk)
    }

    pub fn locate(&self, stage: usize) -> (usize, usize) {
        self.placement.locate(self.pp, stage)
    }

    /// The same program with only compute ops kept (what a generator produces).
    pub fn compute_only(&self) -> Program {
        let ranks = self
            .ranks
            .iter()
            .map(|ops| ops.iter().copied().filter(|op| op.kind().is_compute()).collect())
            .collect();
        Program { ranks, ..self.clone() }
    }

    /// Number of ops over all ranks.
    pub fn len(&self) -> usize {
        self.ranks.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_are_bijections() {
        for pp in 1..6 {
            for (placement, vpp) in [(Placement::Looped, 3), (Placement::V, 2)] {
                let mut seen = vec![false; pp * vpp];
                for r in 0..pp {
                    for c in 0..vpp {
                        let s = placement.stage(pp, r, c);
                        assert!(!seen[s], "stage {s} placed twice");
                        seen[s] = true;
                        assert_eq!(placement.locate(pp, s), (r, c));
                    }
                }
            }
        }
    }

    #[test]
    fn op_codes_round_trip() {
        for kind in OpKind::ALL {
            assert_eq!(OpKind::from_code(kind.code()), Some(kind));
            assert_eq!(Op::from_parts(kind, 3, 1, 2).kind(), kind);
        }
    }
}
