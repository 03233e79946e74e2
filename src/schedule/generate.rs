//! Schedule generators. Each one writes the *compute order* of every rank (F, B, I, W only) with
//! the ordering rules of the reference systems; [`generate`] then lowers it with
//! [`super::lower::lower`], which adds the sends, receives, `ReduceGrads` and `OptimizerStep`.
//!
//! Rules (p ranks, m microbatches, v chunks, rank r):
//! * GPipe: all forwards, then all backwards, in microbatch order.
//! * 1F1B (Megatron): `warmup = min(p−r−1, m)` forwards, then alternate F and B, then the
//!   remaining backwards.
//! * Interleaved 1F1B (Megatron, looped placement): microbatches in groups of N (default p);
//!   forward step k runs `table[k]`, backward step k runs `table[k]` with chunk `v−1−c`;
//!   `warmup = min(2(p−r−1) + (v−1)·N, v·m)`. Needs `p ≤ N ≤ m` and `m mod N ∈ {0} ∪ [p, N)`.
//! * ZB-H1 (torch ZB1P rule, v = 1): 1F1B warm-up, each backward split into I and W, and rank r
//!   defers its first r W's so that they fill the drain.
//! * ZB-H2 (greedy, see `greedy.rs`): split backward, up to `2(p−1−r)+1` microbatches in flight
//!   on rank r, so the warm-up and drain bubbles fill with forwards and deferred W's.
//! * ZB-V (torch `ScheduleZBVZeroBubble` rule): 2 chunks in a V, split backward.

use super::error::{Result, ScheduleError};
use super::ir::{Op, Placement, Program};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// The schedules troupe can generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    Gpipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
    Interleaved,
    ZbH1,
    ZbH2,
    ZbV,
}

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 6] = [
        ScheduleKind::Gpipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZbH1,
        ScheduleKind::ZbH2,
        ScheduleKind::ZbV,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Gpipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved",
            ScheduleKind::ZbH1 => "zb-h1",
            ScheduleKind::ZbH2 => "zb-h2",
            ScheduleKind::ZbV => "zb-v",
        }
    }

    /// Chunks per rank this schedule uses when the user does not say (`--vpp`).
    pub fn default_vpp(self) -> usize {
        match self {
            ScheduleKind::Interleaved | ScheduleKind::ZbV => 2,
            _ => 1,
        }
    }
}

impl FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ScheduleKind::ALL.into_iter().find(|k| k.name() == s.to_ascii_lowercase()).ok_or_else(|| {
            let names: Vec<_> = ScheduleKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown schedule `{s}`; known: {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleSpec {
    pub kind: ScheduleKind,
    pub pp: usize,
    pub microbatches: usize,
    pub vpp: usize,
    /// Interleaved only: microbatch group size N (Megatron's
    /// `microbatch_group_size_per_vp_stage`); `None` means p.
    pub group_size: Option<usize>,
}

impl ScheduleSpec {
    pub fn new(kind: ScheduleKind, pp: usize, microbatches: usize) -> Self {
        ScheduleSpec { kind, pp, microbatches, vpp: kind.default_vpp(), group_size: None }
    }

    pub fn with_vpp(self, vpp: usize) -> Self {
        ScheduleSpec { vpp, ..self }
    }
}

fn invalid(kind: ScheduleKind, reason: impl Into<String>) -> ScheduleError {
    ScheduleError::InvalidConfig { schedule: kind.name().to_string(), reason: reason.into() }
}

/// Generate the full (lowered) program of `spec`.
///
/// # Errors
/// [`ScheduleError::InvalidConfig`] when the parameters cannot form that schedule.
pub fn generate(spec: &ScheduleSpec) -> Result<Program> {
    super::lower::lower(&generate_compute(spec)?)
}

/// Generate only the compute order of `spec` (no communication ops).
pub fn generate_compute(spec: &ScheduleSpec) -> Result<Program> {
    check_spec(spec)?;
    let ScheduleSpec { kind, pp, microbatches: m, vpp, .. } = *spec;
    let looped = Placement::Looped;
    let (placement, ranks) = match kind {
        ScheduleKind::Gpipe => (looped, (0..pp).map(|_| gpipe_rank(m)).collect()),
        ScheduleKind::OneFOneB => (looped, (0..pp).map(|r| one_f_one_b_rank(pp, r, m)).collect()),
        ScheduleKind::Interleaved if vpp == 1 => {
            (looped, (0..pp).map(|r| one_f_one_b_rank(pp, r, m)).collect())
        }
        ScheduleKind::Interleaved => {
            let n = check_group(pp, m, spec.group_size)?;
            let table = interleaved_table(m, vpp, n);
            (looped, (0..pp).map(|r| interleaved_rank(pp, r, vpp, n, &table)).collect())
        }
        ScheduleKind::ZbH1 => (looped, (0..pp).map(|r| zb_h1_rank(pp, r, m)).collect()),
        ScheduleKind::ZbH2 => {
            let ranks = super::greedy::zb_h2(pp, m)
                .ok_or_else(|| invalid(kind, "greedy scheduler did not finish (a troupe bug)"))?;
            (looped, ranks)
        }
        ScheduleKind::ZbV => (Placement::V, (0..pp).map(|r| zb_v_rank(pp, r, m)).collect()),
    };
    Ok(Program { pp, vpp, microbatches: m, placement, ranks })
}

/// Sizes are positive and bounded, and `vpp` is one the schedule supports.
fn check_spec(spec: &ScheduleSpec) -> Result<()> {
    let ScheduleSpec { kind, pp, microbatches: m, vpp, .. } = *spec;
    if pp == 0 || m == 0 || vpp == 0 {
        return Err(invalid(kind, "pp, vpp and microbatches must be at least 1"));
    }
    if !super::validate::dims_ok(pp, vpp, m) {
        return Err(invalid(kind, "pp * vpp * microbatches is too large (at most 2^26)"));
    }
    let want = match kind {
        ScheduleKind::Interleaved => return Ok(()),
        ScheduleKind::ZbV => 2,
        _ => 1,
    };
    if vpp != want {
        return Err(invalid(kind, format!("uses {want} chunk(s) per rank, not vpp = {vpp}")));
    }
    Ok(())
}

fn f(mb: usize, chunk: usize) -> Op {
    Op::Forward { mb: mb as u32, chunk: chunk as u32 }
}
fn b(mb: usize, chunk: usize) -> Op {
    Op::Backward { mb: mb as u32, chunk: chunk as u32 }
}
fn i(mb: usize, chunk: usize) -> Op {
    Op::BackwardInput { mb: mb as u32, chunk: chunk as u32 }
}
fn w(mb: usize, chunk: usize) -> Op {
    Op::BackwardWeight { mb: mb as u32, chunk: chunk as u32 }
}

fn gpipe_rank(m: usize) -> Vec<Op> {
    (0..m).map(|mb| f(mb, 0)).chain((0..m).map(|mb| b(mb, 0))).collect()
}

fn one_f_one_b_rank(pp: usize, r: usize, m: usize) -> Vec<Op> {
    let warmup = (pp - r - 1).min(m);
    let mut ops: Vec<Op> = (0..warmup).map(|mb| f(mb, 0)).collect();
    for k in 0..m - warmup {
        ops.push(f(warmup + k, 0));
        ops.push(b(k, 0));
    }
    ops.extend((m - warmup..m).map(|mb| b(mb, 0)));
    ops
}

/// Check Megatron's microbatch-group rule; on failure say which values would work.
fn check_group(pp: usize, m: usize, group: Option<usize>) -> Result<usize> {
    let n = group.unwrap_or(pp);
    let ok = |n: usize| pp <= n && n <= m && (m.is_multiple_of(n) || m % n >= pp);
    if ok(n) {
        return Ok(n);
    }
    let good_groups: Vec<usize> = (pp..=m).filter(|&n| ok(n)).collect();
    let lower = (m / n) * n;
    let ms: Vec<usize> = [lower, lower + n].into_iter().filter(|&mm| mm >= n && mm >= pp).collect();
    let mut reason = if n < pp || n > m {
        format!("microbatch group size {n} must satisfy pp ({pp}) <= N <= microbatches ({m})")
    } else {
        format!(
            "microbatches ({m}) mod group size ({n}) = {} is neither 0 nor >= pp ({pp}); \
             the short last group would leave dependency bubbles",
            m % n
        )
    };
    if !good_groups.is_empty() {
        let list: Vec<String> = good_groups.iter().map(ToString::to_string).collect();
        reason += &format!("; group sizes that work for {m} microbatches: {}", list.join(", "));
    }
    if !ms.is_empty() {
        let list: Vec<String> = ms.iter().map(ToString::to_string).collect();
        reason += &format!("; microbatch counts that work with group size {n}: {}", list.join(", "));
    }
    Err(invalid(ScheduleKind::Interleaved, reason))
}

/// Megatron's `get_schedule_table`: virtual step → (mb, chunk) for forwards.
fn interleaved_table(m: usize, vpp: usize, n: usize) -> Vec<(usize, usize)> {
    let mut table = Vec::with_capacity(m * vpp);
    for start in (0..m).step_by(n) {
        let end = (start + n).min(m);
        for chunk in 0..vpp {
            table.extend((start..end).map(|mb| (mb, chunk)));
        }
    }
    table
}

fn interleaved_rank(pp: usize, r: usize, vpp: usize, n: usize, table: &[(usize, usize)]) -> Vec<Op> {
    let total = table.len();
    let warmup = (2 * (pp - r - 1) + (vpp - 1) * n).min(total);
    let fwd = |k: usize| f(table[k].0, table[k].1);
    let bwd = |k: usize| b(table[k].0, vpp - 1 - table[k].1);
    let mut ops: Vec<Op> = (0..warmup).map(fwd).collect();
    for k in 0..total - warmup {
        ops.push(fwd(warmup + k));
        ops.push(bwd(k));
    }
    ops.extend((total - warmup..total).map(bwd));
    ops
}

fn zb_h1_rank(pp: usize, r: usize, m: usize) -> Vec<Op> {
    let warmup = (pp - 1 - r).min(m);
    let mut ops: Vec<Op> = (0..warmup).map(|mb| f(mb, 0)).collect();
    let mut next_w = 0;
    for k in 0..m {
        if warmup + k < m {
            ops.push(f(warmup + k, 0));
        }
        ops.push(i(k, 0));
        if k >= r {
            ops.push(w(next_w, 0));
            next_w += 1;
        }
    }
    ops.extend((next_w..m).map(|mb| w(mb, 0)));
    ops
}

/// Counters of the ZB-V rule; ops for microbatches `>= m` are dropped as they are emitted.
struct ZbV {
    m: usize,
    ops: Vec<Op>,
    next: [[usize; 3]; 2], // [chunk][F, I, W]
}

impl ZbV {
    fn emit(&mut self, chunk: usize, what: usize) {
        let mb = self.next[chunk][what];
        self.next[chunk][what] += 1;
        if mb < self.m {
            self.ops.push([f, i, w][what](mb, chunk));
        }
    }
}

fn zb_v_rank(pp: usize, r: usize, m: usize) -> Vec<Op> {
    const F: usize = 0;
    const I: usize = 1;
    const W: usize = 2;
    let n = m.max(2 * pp - 1);
    let mut s = ZbV { m, ops: Vec::with_capacity(6 * m), next: [[0; 3]; 2] };
    (0..2 * (pp - r) - 1).for_each(|_| s.emit(0, F));
    for _ in 0..r {
        s.emit(1, F);
        s.emit(0, F);
    }
    for _ in 0..pp - r {
        s.emit(1, F);
        s.emit(1, I);
        s.emit(1, W);
    }
    while s.next[1][F] < s.next[0][F] || s.next[0][F] < n {
        if s.next[0][F] < n {
            s.emit(0, F);
        }
        s.emit(0, I);
        s.emit(0, W);
        s.emit(1, F);
        s.emit(1, I);
        s.emit(1, W);
    }
    for _ in 0..r {
        s.emit(0, I);
        s.emit(1, I);
    }
    for _ in 0..pp - r {
        s.emit(0, I);
        s.emit(0, W);
    }
    while s.next[1][W] < s.next[1][I] {
        s.emit(1, W);
    }
    while s.next[0][W] < s.next[0][I] {
        s.emit(0, W);
    }
    s.ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_warmup_matches_megatron() {
        let p = generate_compute(&ScheduleSpec::new(ScheduleKind::OneFOneB, 4, 8)).unwrap();
        for (r, ops) in p.ranks.iter().enumerate() {
            let warm = ops.iter().take_while(|op| matches!(op, Op::Forward { .. })).count();
            // warm-up forwards plus the first steady forward precede the first backward
            assert_eq!(warm, (4 - r - 1).min(8) + 1, "rank {r}");
        }
    }

    #[test]
    fn interleaved_rejects_short_last_group_and_suggests() {
        let spec = ScheduleSpec::new(ScheduleKind::Interleaved, 4, 10);
        let err = generate_compute(&spec).unwrap_err().to_string();
        assert!(err.contains("microbatches (10) mod group size (4) = 2"), "{err}");
        assert!(err.contains("group sizes that work for 10 microbatches: 5, 6, 10"), "{err}");
        assert!(err.contains("microbatch counts that work with group size 4: 8, 12"), "{err}");
        let ok = ScheduleSpec { group_size: Some(5), ..spec };
        assert!(generate_compute(&ok).is_ok());
    }

    #[test]
    fn wrong_vpp_is_rejected() {
        let spec = ScheduleSpec::new(ScheduleKind::Gpipe, 2, 2).with_vpp(2);
        assert!(generate_compute(&spec).is_err());
        let spec = ScheduleSpec::new(ScheduleKind::ZbV, 2, 2).with_vpp(3);
        assert!(generate_compute(&spec).is_err());
    }

    #[test]
    fn names_parse() {
        for kind in ScheduleKind::ALL {
            assert_eq!(kind.name().parse::<ScheduleKind>(), Ok(kind));
        }
        assert!("zb-h9".parse::<ScheduleKind>().is_err());
    }
}
