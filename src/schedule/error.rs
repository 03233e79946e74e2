//! Errors of the schedule layer. Every validation error names the rank, the instruction index
//! in that rank's program and the offending op or `(microbatch, chunk)` pair, so a hand-written
//! program can be fixed from the message alone.

use super::ir::Op;

/// A rank's blocked head instruction, as reported by the deadlock dry run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub rank: usize,
    pub index: usize,
    pub op: Op,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} waits at instruction {} `{}`", self.rank, self.index, self.op)
    }
}

fn list_blocked(blocked: &[Blocked]) -> String {
    blocked.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ScheduleError {
    /// Generator parameters that cannot form a schedule.
    #[error("invalid {schedule} schedule: {reason}")]
    InvalidConfig { schedule: String, reason: String },

    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: String },

    #[error("program has {found} rank lists but pp = {pp}")]
    RankCount { pp: usize, found: usize },

    #[error("program header is inconsistent: {reason}")]
    Header { reason: String },

    #[error("rank {rank}, instruction {index} `{op}`: {reason}")]
    OutOfRange { rank: usize, index: usize, op: Op, reason: String },

    #[error(
        "rank {rank}, instruction {index} `{op}`: (mb {mb}, chunk {chunk}) already had this op at instruction {first}"
    )]
    Duplicate { rank: usize, index: usize, op: Op, mb: u32, chunk: u32, first: usize },

    #[error("rank {rank}, instruction {index} (end of its program): (mb {mb}, chunk {chunk}) has no {what}")]
    Missing { rank: usize, index: usize, mb: u32, chunk: u32, what: &'static str },

    #[error(
        "rank {rank}, instruction {index} `{op}`: (mb {mb}, chunk {chunk}) has both a full backward and a split one"
    )]
    MixedBackward { rank: usize, index: usize, op: Op, mb: u32, chunk: u32 },

    #[error("rank {rank}, instruction {index} `{op}`: (mb {mb}, chunk {chunk}) runs before {needs}")]
    Order { rank: usize, index: usize, op: Op, mb: u32, chunk: u32, needs: String },

    #[error("rank {rank}, instruction {index} `{op}`: peer should be rank {expected}")]
    WrongPeer { rank: usize, index: usize, op: Op, expected: usize },

    #[error("rank {rank}, instruction {index} `{op}`: (mb {mb}, chunk {chunk}) {reason}")]
    Unmatched { rank: usize, index: usize, op: Op, mb: u32, chunk: u32, reason: String },

    #[error("deadlock (blocking send/recv dry run): {}", list_blocked(.blocked))]
    Deadlock { blocked: Vec<Blocked> },

    #[error("compute order cannot be lowered, no rank can progress: {}", list_blocked(.blocked))]
    Stuck { blocked: Vec<Blocked> },

    #[error("invalid costs: {reason}")]
    Costs { reason: String },
}

pub type Result<T> = std::result::Result<T, ScheduleError>;
