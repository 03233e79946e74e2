//! Fault plans: what to break, where and when, for fault-injection runs.
//!
//! A fault is written `KIND[:key=value,...]` (`--inject`, repeatable) or as a `[[faults]]` table
//! with the same keys plus `kind`. Keys:
//!
//! - `rank` — world rank (default 0); `step` — 1-based step (default 1);
//! - `phase` — `warmup`, `steady`, `cooldown` (instructions of the rank's program before its first
//!   backward, between, after its last forward), `reduce`, `optimizer`, `checkpoint`; or
//!   `instruction` — index in the rank's program; or `mb` — the microbatch of a compute or send;
//! - `what` — `grad`, `act` or `loss` (for `nan`/`inf`); `factor` (for `slow`, default 4);
//!   `ms` (for `delay`, default 200); `prob` — fire with this probability per matching event,
//!   drawn from the plan's `seed` (default 1.0); `attempt` — the launcher restart attempt it fires
//!   in (default 0, so a restarted run recovers).
//!
//! Kinds: `crash` (an actor panics), `exit` (the process exits, code 43), `hang` (the rank stops
//! responding), `slow` (compute N× slower: a straggler), `drop`, `delay`, `duplicate`,
//! `reorder`, `corrupt` (a pipeline message), `nan`, `inf` (in a gradient, an activation or the
//! loss), `sigterm` (the process gets SIGTERM), `ckpt-fail` (the checkpoint write fails: disk
//! full), `ckpt-kill` (the process dies in the middle of writing a checkpoint).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::plan::Plan;
use crate::schedule::{Op, OpKind};

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Crash,
    Exit,
    Hang,
    Slow,
    Drop,
    Delay,
    Duplicate,
    Reorder,
    Corrupt,
    Nan,
    Inf,
    Sigterm,
    CkptFail,
    CkptKill,
}

impl FaultKind {
    pub const ALL: [FaultKind; 14] = [
        FaultKind::Crash,
        FaultKind::Exit,
        FaultKind::Hang,
        FaultKind::Slow,
        FaultKind::Drop,
        FaultKind::Delay,
        FaultKind::Duplicate,
        FaultKind::Reorder,
        FaultKind::Corrupt,
        FaultKind::Nan,
        FaultKind::Inf,
        FaultKind::Sigterm,
        FaultKind::CkptFail,
        FaultKind::CkptKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::Exit => "exit",
            FaultKind::Hang => "hang",
            FaultKind::Slow => "slow",
            FaultKind::Drop => "drop",
            FaultKind::Delay => "delay",
            FaultKind::Duplicate => "duplicate",
            FaultKind::Reorder => "reorder",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Nan => "nan",
            FaultKind::Inf => "inf",
            FaultKind::Sigterm => "sigterm",
            FaultKind::CkptFail => "ckpt-fail",
            FaultKind::CkptKill => "ckpt-kill",
        }
    }

    /// Whether the fault acts on a pipeline message (so it needs a send to act on).
    pub fn is_message(self) -> bool {
        matches!(
            self,
            FaultKind::Drop
                | FaultKind::Delay
                | FaultKind::Duplicate
                | FaultKind::Reorder
                | FaultKind::Corrupt
        )
    }
}

/// Where in a step a fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Warmup,
    Steady,
    Cooldown,
    Reduce,
    Optimizer,
    Checkpoint,
}

impl Phase {
    pub const ALL: [Phase; 6] =
        [Phase::Warmup, Phase::Steady, Phase::Cooldown, Phase::Reduce, Phase::Optimizer, Phase::Checkpoint];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Warmup => "warmup",
            Phase::Steady => "steady",
            Phase::Cooldown => "cooldown",
            Phase::Reduce => "reduce",
            Phase::Optimizer => "optimizer",
            Phase::Checkpoint => "checkpoint",
        }
    }
}

/// What a `nan`/`inf` poisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Grad,
    Act,
    Loss,
}

/// One fault of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: FaultKind,
    #[serde(default)]
    pub rank: usize,
    #[serde(default = "one")]
    pub step: u64,
    #[serde(default)]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub instruction: Option<usize>,
    #[serde(default)]
    pub mb: Option<u32>,
    #[serde(default)]
    pub what: Option<Target>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub ms: Option<u64>,
    #[serde(default)]
    pub prob: Option<f64>,
    #[serde(default)]
    pub attempt: u64,
    /// `corrupt` only: instead of a send, damage the n-th message (1-based) this rank's mailbox
    /// accepts in the step — a fault that depends on the order of message handling, which
    /// `--replay-order` makes reproducible.
    #[serde(default)]
    pub recv: Option<u32>,
}

fn one() -> u64 {
    1
}

/// Errors of fault specs: they name the bad field and list what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("fault `{spec}`: unknown kind `{kind}`; accepted kinds: {accepted}")]
    Kind { spec: String, kind: String, accepted: String },
    #[error("fault `{spec}`: {field}: {reason}")]
    Field { spec: String, field: String, reason: String },
    #[error("fault `{spec}` cannot happen: {reason}")]
    Impossible { spec: String, reason: String },
}

fn kinds() -> String {
    FaultKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

impl FromStr for Fault {
    type Err = FaultError;

    /// Parses `KIND[:key=value,...]`.
    fn from_str(spec: &str) -> Result<Fault, FaultError> {
        let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let kind = FaultKind::ALL.into_iter().find(|k| k.name() == kind.trim()).ok_or_else(|| {
            FaultError::Kind { spec: spec.into(), kind: kind.trim().into(), accepted: kinds() }
        })?;
        let mut f = Fault {
            kind,
            rank: 0,
            step: 1,
            phase: None,
            instruction: None,
            mb: None,
            what: None,
            factor: None,
            ms: None,
            prob: None,
            attempt: 0,
            recv: None,
        };
        for field in rest.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let bad = |reason: &str| FaultError::Field {
                spec: spec.into(),
                field: field.into(),
                reason: reason.into(),
            };
            let (k, v) = field.split_once('=').ok_or_else(|| bad("expected key=value"))?;
            let int = || v.parse::<u64>().map_err(|_| bad("expected a non-negative integer"));
            let num = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| bad("expected a number ≥ 0"))
            };
            match k {
                "rank" => f.rank = int()? as usize,
                "step" => f.step = int()?,
                "instruction" => f.instruction = Some(int()? as usize),
                "mb" => f.mb = Some(int()? as u32),
                "ms" => f.ms = Some(int()?),
                "attempt" => f.attempt = int()?,
                "recv" => f.recv = Some(int()?.max(1) as u32),
                "factor" => f.factor = Some(num()?),
                "prob" => f.prob = Some(num()?.min(1.0)),
                "phase" => {
                    f.phase = Some(Phase::ALL.into_iter().find(|p| p.name() == v).ok_or_else(|| {
                        bad("expected warmup, steady, cooldown, reduce, optimizer or checkpoint")
                    })?)
                }
                "what" => {
                    f.what = Some(match v {
                        "grad" => Target::Grad,
                        "act" => Target::Act,
                        "loss" => Target::Loss,
                        _ => return Err(bad("expected grad, act or loss")),
                    })
                }
                _ => {
                    return Err(bad(
                        "unknown key; accepted: rank, step, phase, instruction, mb, what, factor, ms, prob, attempt, recv",
                    ));
                }
            }
        }
        Ok(f)
    }
}

impl Fault {
    /// The spec text of this fault (for messages).
    pub fn describe(&self) -> String {
        let mut s = format!("{}:rank={},step={}", self.kind.name(), self.rank, self.step);
        if let Some(p) = self.phase {
            s += &format!(",phase={}", p.name());
        }
        if let Some(i) = self.instruction {
            s += &format!(",instruction={i}");
        }
        if let Some(m) = self.mb {
            s += &format!(",mb={m}");
        }
        if let Some(r) = self.recv {
            s += &format!(",recv={r}");
        }
        s
    }

    /// Checks that the fault can fire in this layout and run.
    ///
    /// # Errors
    /// [`FaultError::Impossible`] for a rank or step that does not exist, an instruction index
    /// past the rank's program, or a message fault on a rank that sends nothing.
    pub fn check(&self, plan: &Plan, world: usize, train_iters: u64) -> Result<(), FaultError> {
        let no = |reason: String| Err(FaultError::Impossible { spec: self.describe(), reason });
        if self.rank >= world {
            let ranks = match world {
                1 => "1 rank, rank 0".to_string(),
                n => format!("{n} ranks, 0 to {}", n - 1),
            };
            return no(format!("rank {} does not exist (the world has {ranks})", self.rank));
        }
        if self.step == 0 || self.step > train_iters {
            return no(format!("step {} is outside 1..={train_iters}", self.step));
        }
        let ops = &plan.program.ranks[(self.rank / plan.dp) % plan.pp];
        if let Some(i) = self.instruction
            && i >= ops.len()
        {
            return no(format!("instruction {i} is past the rank's program of {} instructions", ops.len()));
        }
        if let Some(m) = self.mb
            && m as usize >= plan.microbatches
        {
            return no(format!("microbatch {m} does not exist ({} per step)", plan.microbatches));
        }
        if self.kind.is_message()
            && !ops.iter().any(|op| matches!(op.kind(), OpKind::SendAct | OpKind::SendGrad))
        {
            return no("this rank sends no pipeline messages (pipeline size 1?)".into());
        }
        if self.recv.is_some() {
            return if self.kind == FaultKind::Corrupt {
                Ok(())
            } else {
                no("`recv` only goes with `corrupt`".into())
            };
        }
        let pipeline_phase =
            !matches!(self.phase, Some(Phase::Reduce | Phase::Optimizer | Phase::Checkpoint));
        let anywhere = matches!(self.kind, FaultKind::Sigterm | FaultKind::CkptFail | FaultKind::CkptKill);
        if pipeline_phase && !anywhere && self.instruction_in(ops).is_none() {
            return no("no instruction of the rank's program matches its phase and microbatch".into());
        }
        if matches!(
            self.kind,
            FaultKind::Drop
                | FaultKind::Delay
                | FaultKind::Duplicate
                | FaultKind::Reorder
                | FaultKind::Corrupt
        ) && !pipeline_phase
        {
            return no("message faults act on pipeline sends (phases warmup, steady, cooldown)".into());
        }
        if matches!(self.kind, FaultKind::Nan | FaultKind::Inf) && self.what == Some(Target::Loss) {
            let last = plan.program.locate(plan.num_stages() - 1).0;
            if (self.rank / plan.dp) % plan.pp != last {
                return no(format!("only pipeline rank {last} computes the loss"));
            }
        }
        Ok(())
    }

    /// The index of the instruction of a rank's program (`ops`) where this fault fires: the
    /// given `instruction`, else the first compute instruction (a send, for message faults) in
    /// the fault's phase and microbatch. `None` for faults outside the pipeline phases.
    pub fn instruction_in(&self, ops: &[Op]) -> Option<usize> {
        if self.recv.is_some() {
            return None;
        }
        if let Some(i) = self.instruction {
            return Some(i);
        }
        let first_b = ops.iter().position(|o| matches!(o.kind(), OpKind::Backward | OpKind::BackwardInput));
        let last_f = ops.iter().rposition(|o| o.kind() == OpKind::Forward);
        ops.iter().enumerate().position(|(i, o)| {
            let wanted = match (self.kind, self.what) {
                (k, _) if k.is_message() => matches!(o.kind(), OpKind::SendAct | OpKind::SendGrad),
                (FaultKind::Nan | FaultKind::Inf, Some(Target::Grad)) => {
                    matches!(o.kind(), OpKind::Backward | OpKind::BackwardWeight)
                }
                (FaultKind::Nan | FaultKind::Inf, _) => o.kind() == OpKind::Forward,
                _ => o.kind().is_compute(),
            };
            let mb_ok = self.mb.is_none_or(|m| o.pair().map(|p| p.0) == Some(m));
            let in_phase = match self.phase {
                None => true,
                Some(Phase::Warmup) => first_b.is_none_or(|b| i < b),
                Some(Phase::Steady) => first_b.is_some_and(|b| i >= b) && last_f.is_some_and(|f| i <= f),
                Some(Phase::Cooldown) => last_f.is_some_and(|f| i > f),
                Some(_) => false,
            };
            wanted && mb_ok && in_phase
        })
    }
}

/// A seeded plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    pub faults: Vec<Fault>,
    pub seed: u64,
}

impl FaultPlan {
    /// Faults of `rank` in restart attempt `attempt`.
    pub fn for_rank(&self, rank: usize, attempt: u64) -> Vec<Fault> {
        self.faults.iter().filter(|f| f.rank == rank && f.attempt == attempt).cloned().collect()
    }

    /// Whether a fault with `prob` fires at event number `event` (deterministic in the seed).
    pub fn fires(&self, fault: &Fault, event: u64) -> bool {
        match fault.prob {
            None => true,
            Some(p) => {
                let mut rng = crate::models::Rng::derived(
                    self.seed ^ event.wrapping_mul(0x9E37_79B9),
                    &fault.describe(),
                );
                (rng.next_u64() as f64 / u64::MAX as f64) < p
            }
        }
    }

    /// Checks every fault against the layout (see [`Fault::check`]).
    ///
    /// # Errors
    /// The first impossible fault.
    pub fn check(&self, plan: &Plan, world: usize, train_iters: u64) -> Result<(), FaultError> {
        self.faults.iter().try_for_each(|f| f.check(plan, world, train_iters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_name_the_field() {
        let f: Fault = "nan:rank=1,step=3,what=grad,phase=steady".parse().unwrap();
        assert_eq!(
            (f.kind, f.rank, f.step, f.what, f.phase),
            (FaultKind::Nan, 1, 3, Some(Target::Grad), Some(Phase::Steady))
        );
        let e = "explode:rank=1".parse::<Fault>().unwrap_err().to_string();
        assert!(e.contains("unknown kind `explode`") && e.contains("crash, exit, hang"), "{e}");
        let e = "crash:rnak=1".parse::<Fault>().unwrap_err().to_string();
        assert!(e.contains("rnak=1") && e.contains("accepted: rank, step"), "{e}");
        let e = "slow:factor=-2".parse::<Fault>().unwrap_err().to_string();
        assert!(e.contains("factor=-2"), "{e}");
        let e = "nan:what=weights".parse::<Fault>().unwrap_err().to_string();
        assert!(e.contains("grad, act or loss"), "{e}");
    }
}
