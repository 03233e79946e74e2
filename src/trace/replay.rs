//! Replay a recorded trace in the simulator: estimate per-kind costs from the measured
//! durations, rebuild the recorded per-rank compute order as a program, and simulate it and any
//! other schedules with those costs ("would interleaved have been faster for this run?").
//!
//! Cost model from a trace: F, B, I, W = mean measured duration of that kind (a missing B is
//! I + W; missing I and W are B/2 each); message time = mean send duration, as a pure latency.
//! Costs are per chunk, so a schedule with a different `vpp` gets them scaled by
//! `recorded vpp / its vpp` (the same layers split into more or fewer chunks).

use super::{Trace, TraceError};
use crate::schedule::{Costs, OpKind, Program, ScheduleSpec, dims_ok, generate, lower, simulate, validate};
use serde::Serialize;

/// Simulated outcome of one schedule under the trace's costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayRow {
    pub schedule: String,
    pub vpp: usize,
    /// Microseconds.
    pub makespan: f64,
    pub bubble: f64,
    /// Worst rank's peak in-flight activations, in units of a whole rank's microbatch
    /// (chunk-microbatches divided by `vpp`).
    pub peak_in_flight: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayReport {
    pub costs: Costs,
    /// What the trace itself took (µs).
    pub measured_makespan: f64,
    pub recorded: ReplayRow,
    pub others: Vec<ReplayRow>,
}

fn mean(trace: &Trace, kind: OpKind) -> Option<f64> {
    let d: Vec<f64> =
        trace.events.iter().filter(|e| e.kind == kind).map(|e| (e.end - e.start).max(0.0)).collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

/// Per-kind costs measured in `trace` (µs).
///
/// # Errors
/// [`TraceError::Empty`] when the trace has no forward or no backward events.
pub fn estimate_costs(trace: &Trace) -> Result<Costs, TraceError> {
    let forward = mean(trace, OpKind::Forward).ok_or(TraceError::Empty { what: "forward events" })?;
    let (b, i, w) = (
        mean(trace, OpKind::Backward),
        mean(trace, OpKind::BackwardInput),
        mean(trace, OpKind::BackwardWeight),
    );
    let backward = b.or(i.zip(w).map(|(i, w)| i + w)).ok_or(TraceError::Empty { what: "backward events" })?;
    let sends = [mean(trace, OpKind::SendAct), mean(trace, OpKind::SendGrad)];
    let latency = match sends {
        [Some(a), Some(g)] => (a + g) / 2.0,
        [a, g] => a.or(g).unwrap_or(0.0),
    };
    Ok(Costs {
        forward,
        backward,
        backward_input: i.unwrap_or(backward - w.unwrap_or(backward / 2.0)),
        backward_weight: w.unwrap_or(backward - i.unwrap_or(backward / 2.0)),
        latency,
        bandwidth: f64::INFINITY,
        message_bytes: 0,
        ..Costs::default()
    })
}

/// The recorded per-rank compute order (events sorted by start), lowered and validated.
///
/// # Errors
/// Schedule errors when the recorded order is not a complete, valid pipeline program.
pub fn recorded_program(trace: &Trace) -> Result<Program, TraceError> {
    if !dims_ok(trace.pp, trace.vpp, trace.microbatches) {
        let reason = format!(
            "header pp={} vpp={} microbatches={} must be positive with a product of at most 2^26",
            trace.pp, trace.vpp, trace.microbatches
        );
        return Err(TraceError::Parse { line: 1, reason });
    }
    let mut ranks: Vec<Vec<(f64, usize, crate::schedule::Op)>> = vec![Vec::new(); trace.pp];
    for (i, e) in trace.events.iter().enumerate() {
        if !e.kind.is_compute() {
            continue;
        }
        let (Some(mb), Some(chunk)) = (e.mb, e.chunk) else {
            continue;
        };
        let Some(list) = ranks.get_mut(e.rank as usize) else {
            return Err(TraceError::Parse {
                line: i + 2,
                reason: format!("rank {} but pp = {}", e.rank, trace.pp),
            });
        };
        list.push((e.start, i, crate::schedule::Op::from_parts(e.kind, mb, chunk, 0)));
    }
    let ranks = ranks
        .into_iter()
        .map(|mut l| {
            l.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            l.into_iter().map(|(_, _, op)| op).collect()
        })
        .collect();
    let compute = Program {
        pp: trace.pp,
        vpp: trace.vpp,
        microbatches: trace.microbatches,
        placement: trace.placement,
        ranks,
    };
    let program = lower(&compute)?;
    validate(&program)?;
    Ok(program)
}

fn row(name: &str, program: &Program, costs: &Costs) -> Result<ReplayRow, TraceError> {
    let sim = simulate(program, costs)?;
    let peak = sim.stats.ranks.iter().map(|r| r.peak_in_flight).max().unwrap_or(0);
    Ok(ReplayRow {
        schedule: name.to_string(),
        vpp: program.vpp,
        makespan: sim.stats.makespan,
        bubble: sim.stats.bubble,
        peak_in_flight: peak as f64 / program.vpp as f64,
    })
}

/// Replay `trace` as recorded and under each of `others` (their `pp` and `microbatches` should
/// match the trace's; only their kind, `vpp` and group size matter).
///
/// # Errors
/// Cost estimation, rebuild, generation or simulation errors.
pub fn replay(trace: &Trace, others: &[ScheduleSpec]) -> Result<ReplayReport, TraceError> {
    let costs = estimate_costs(trace)?;
    let recorded_name = trace.schedule.clone().unwrap_or_else(|| "recorded".to_string());
    let recorded = row(&format!("{recorded_name} (recorded order)"), &recorded_program(trace)?, &costs)?;
    let mut rows = Vec::with_capacity(others.len());
    for spec in others {
        let program = generate(spec)?;
        let k = trace.vpp as f64 / spec.vpp as f64;
        let scaled = Costs {
            forward: costs.forward * k,
            backward: costs.backward * k,
            backward_input: costs.backward_input * k,
            backward_weight: costs.backward_weight * k,
            ..costs
        };
        rows.push(row(spec.kind.name(), &program, &scaled)?);
    }
    Ok(ReplayReport { costs, measured_makespan: trace.makespan(), recorded, others: rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{ScheduleKind, simulate};

    #[test]
    fn replaying_a_simulated_trace_reproduces_it() {
        let spec = ScheduleSpec::new(ScheduleKind::OneFOneB, 4, 8);
        let program = generate(&spec).unwrap();
        let costs = Costs::parse("f=1,b=2,w=1,lat=0.25").unwrap();
        let sim = simulate(&program, &costs).unwrap();
        let trace = Trace::from_simulation(&program, &sim, 0, 1000.0, Some("1f1b"));
        assert_eq!(recorded_program(&trace).unwrap(), program);
        let est = estimate_costs(&trace).unwrap();
        assert!((est.forward - 1000.0).abs() < 1e-9 && (est.backward - 2000.0).abs() < 1e-9);
        assert!((est.latency - 250.0).abs() < 1e-9);
        let gpipe = ScheduleSpec::new(ScheduleKind::Gpipe, 4, 8);
        let interleaved = ScheduleSpec::new(ScheduleKind::Interleaved, 4, 8);
        let report = replay(&trace, &[gpipe, interleaved]).unwrap();
        assert!((report.recorded.makespan - sim.stats.makespan * 1000.0).abs() < 1e-6);
        assert!((report.measured_makespan - report.recorded.makespan).abs() < 1e-6);
        // interleaving shrinks the bubble; GPipe holds every microbatch
        assert!(report.others[1].bubble < report.recorded.bubble);
        assert_eq!(report.others[0].peak_in_flight, 8.0);
    }

    #[test]
    fn absurd_trace_header_is_an_error() {
        let t = Trace::from_native(
            "troupe-trace v1 pp=4000000000000 vpp=1 microbatches=9\n0 stage F 0 0 0 1 - -\n",
        )
        .unwrap();
        assert!(recorded_program(&t).is_err());
        assert!(replay(&t, &[]).is_err());
    }
}
