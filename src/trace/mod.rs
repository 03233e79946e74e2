//! Traces: one event vocabulary shared by the simulator and (later) the actor runtime, with a
//! compact native text form, Chrome trace JSON (Perfetto) export and import, timeline rendering to
//! SVG and PNG, and replay of a recorded trace under other schedules.
//!
//! An [`Event`] is `(rank, actor, kind, mb, chunk, start, end, bytes, peer)`; times are in
//! microseconds from the start of the step. `kind` reuses the schedule IR's [`OpKind`], so an
//! event of a compute kind is "that op of the program ran from `start` to `end`". For a send,
//! `[start, end]` is leaving to arriving; for a receive, posting to arrival.
//!
//! Native form (one header, then one event per line, `-` for absent fields):
//! ```text
//! troupe-trace v1 pp=2 vpp=1 microbatches=2 placement=looped schedule=1f1b
//! 0 stage F 0 0 0 1000 - -
//! 0 send SA 0 0 1000 1000 0 1
//! ```

mod chrome;
mod png;
mod render;
mod replay;

pub use chrome::{from_chrome, to_chrome};
pub use png::encode_png;
pub use render::{Scene, Shape, render_png, render_svg, timeline_scene};
pub use replay::{ReplayReport, ReplayRow, estimate_costs, recorded_program, replay};

use crate::schedule::{OpKind, Placement, Program, Simulation};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Errors reading traces.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("trace has no {what}")]
    Empty { what: &'static str },
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
}

/// One thing that happened on one rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub rank: u32,
    /// Which actor did it: `stage`, `send`, `recv`, `reducer`, `optimizer`, …
    pub actor: String,
    pub kind: OpKind,
    pub mb: Option<u32>,
    pub chunk: Option<u32>,
    /// Microseconds.
    pub start: f64,
    pub end: f64,
    pub bytes: Option<u64>,
    pub peer: Option<u32>,
}

/// A recorded or simulated step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub pp: usize,
    pub vpp: usize,
    pub microbatches: usize,
    pub placement: Placement,
    /// Name of the schedule that produced it, if known.
    pub schedule: Option<String>,
    pub events: Vec<Event>,
}

/// The actor that runs ops of `kind` in troupe's runtime.
pub fn actor_of(kind: OpKind) -> &'static str {
    match kind {
        OpKind::SendAct | OpKind::SendGrad => "send",
        OpKind::RecvAct | OpKind::RecvGrad => "recv",
        OpKind::ReduceGrads => "reducer",
        OpKind::OptimizerStep => "optimizer",
        _ => "stage",
    }
}

impl Trace {
    /// The trace of a simulation; one simulated time unit becomes `us_per_unit` microseconds.
    pub fn from_simulation(
        program: &Program,
        sim: &Simulation,
        message_bytes: u64,
        us_per_unit: f64,
        schedule: Option<&str>,
    ) -> Trace {
        let mut events = Vec::with_capacity(program.len());
        for (rank, line) in sim.timeline.iter().enumerate() {
            for t in line {
                let kind = t.op.kind();
                let (mb, chunk) = match t.op.pair() {
                    Some((mb, c)) => (Some(mb), Some(c)),
                    None => (None, t.op.chunk()),
                };
                events.push(Event {
                    rank: rank as u32,
                    actor: actor_of(kind).to_string(),
                    kind,
                    mb,
                    chunk,
                    start: t.start * us_per_unit,
                    end: t.end * us_per_unit,
                    bytes: kind.is_comm().then_some(message_bytes),
                    peer: t.op.peer(),
                });
            }
        }
        Trace {
            pp: program.pp,
            vpp: program.vpp,
            microbatches: program.microbatches,
            placement: program.placement,
            schedule: schedule.map(str::to_string),
            events,
        }
    }

    /// Last end minus first start over compute events (µs).
    pub fn makespan(&self) -> f64 {
        let compute = || self.events.iter().filter(|e| e.kind.is_compute());
        let first = compute().map(|e| e.start).fold(f64::INFINITY, f64::min);
        let last = compute().map(|e| e.end).fold(f64::NEG_INFINITY, f64::max);
        if first.is_finite() { last - first } else { 0.0 }
    }

    /// The compact native text form.
    pub fn to_native(&self) -> String {
        let mut out = format!(
            "troupe-trace v1 pp={} vpp={} microbatches={} placement={}",
            self.pp,
            self.vpp,
            self.microbatches,
            self.placement.name()
        );
        if let Some(s) = &self.schedule {
            let _ = write!(out, " schedule={s}");
        }
        out.push('\n');
        let opt = |x: Option<String>| x.unwrap_or_else(|| "-".to_string());
        for e in &self.events {
            let _ = writeln!(
                out,
                "{} {} {} {} {} {} {} {} {}",
                e.rank,
                e.actor,
                e.kind.code(),
                opt(e.mb.map(|v| v.to_string())),
                opt(e.chunk.map(|v| v.to_string())),
                e.start,
                e.end,
                opt(e.bytes.map(|v| v.to_string())),
                opt(e.peer.map(|v| v.to_string())),
            );
        }
        out
    }

    /// Parse the native form.
    ///
    /// # Errors
    /// [`TraceError::Parse`] naming the line.
    pub fn from_native(text: &str) -> Result<Trace, TraceError> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or(TraceError::Empty { what: "header" })?;
        let mut trace = parse_header(header)?;
        for (i, line) in lines {
            trace.events.push(parse_event(i + 1, line)?);
        }
        Ok(trace)
    }

    /// Read a trace in either form (Chrome JSON if it starts with `{` or `[`).
    ///
    /// # Errors
    /// As [`Trace::from_native`] and [`from_chrome`].
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        match text.trim_start().chars().next() {
            Some('{') | Some('[') => from_chrome(text),
            _ => Trace::from_native(text),
        }
    }
}

fn parse_header(header: &str) -> Result<Trace, TraceError> {
    let bad = |reason: String| TraceError::Parse { line: 1, reason };
    let mut fields = header.split_whitespace();
    if fields.next() != Some("troupe-trace") || fields.next() != Some("v1") {
        return Err(bad("first line should start with `troupe-trace v1`".to_string()));
    }
    let mut t = Trace {
        pp: 0,
        vpp: 1,
        microbatches: 0,
        placement: Placement::Looped,
        schedule: None,
        events: Vec::new(),
    };
    for field in fields {
        let (k, v) = field.split_once('=').ok_or_else(|| bad(format!("`{field}` is not key=value")))?;
        let num = || v.parse::<usize>().map_err(|_| bad(format!("`{k}={v}` is not a number")));
        match k {
            "pp" => t.pp = num()?,
            "vpp" => t.vpp = num()?,
            "microbatches" => t.microbatches = num()?,
            "placement" if v == "v" => t.placement = Placement::V,
            "placement" if v == "looped" => t.placement = Placement::Looped,
            "schedule" => t.schedule = Some(v.to_string()),
            _ => return Err(bad(format!("unknown header field `{field}`"))),
        }
    }
    Ok(t)
}

fn parse_event(line: usize, text: &str) -> Result<Event, TraceError> {
    let bad = |reason: String| TraceError::Parse { line, reason };
    let f: Vec<&str> = text.split_whitespace().collect();
    if f.len() != 9 {
        return Err(bad(format!(
            "expected 9 fields (rank actor kind mb chunk start end bytes peer), got {}",
            f.len()
        )));
    }
    fn opt<T: std::str::FromStr>(s: &str) -> Result<Option<T>, String> {
        if s == "-" { Ok(None) } else { s.parse().map(Some).map_err(|_| format!("bad field `{s}`")) }
    }
    let time = |s: &str| {
        s.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| bad(format!("bad time `{s}`")))
    };
    Ok(Event {
        rank: f[0].parse().map_err(|_| bad(format!("bad rank `{}`", f[0])))?,
        actor: f[1].to_string(),
        kind: OpKind::from_code(f[2]).ok_or_else(|| bad(format!("unknown kind `{}`", f[2])))?,
        mb: opt(f[3]).map_err(bad)?,
        chunk: opt(f[4]).map_err(bad)?,
        start: time(f[5])?,
        end: time(f[6])?,
        bytes: opt(f[7]).map_err(bad)?,
        peer: opt(f[8]).map_err(bad)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Costs, ScheduleKind, ScheduleSpec, generate, simulate};

    pub(crate) fn sample() -> Trace {
        let program = generate(&ScheduleSpec::new(ScheduleKind::OneFOneB, 3, 4)).unwrap();
        let sim = simulate(&program, &Costs { latency: 0.5, ..Costs::default() }).unwrap();
        Trace::from_simulation(&program, &sim, 4096, 1000.0, Some("1f1b"))
    }

    #[test]
    fn native_round_trip() {
        let t = sample();
        assert_eq!(Trace::from_native(&t.to_native()).unwrap(), t);
        assert_eq!(Trace::parse(&t.to_native()).unwrap(), t);
    }

    #[test]
    fn native_errors_name_the_line() {
        let t = "troupe-trace v1 pp=1\n0 stage F 0 0 0 1 - -\n0 stage X 0 0 0 1 - -\n";
        let err = Trace::from_native(t).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(Trace::from_native("hello").is_err());
    }
}
