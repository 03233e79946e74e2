//! Chrome trace JSON (opens in Perfetto and chrome://tracing) export and import.
//!
//! Mapping: `pid` = rank (a `process_name` "rank r"), `tid` = actor (a `thread_name` per actor),
//! one complete `X` event per trace event with `ts`/`dur` in microseconds, and a v2 flow arrow
//! from every send to its receive (`bind_id` with `flow_out` on the send, `flow_in` on the
//! receive; v2 binds to the event's own slice, so timestamps need not line up). Every `X` event
//! carries the full event in `args`, and the top-level `troupe` object the trace header, so a
//! file we wrote reads back losslessly.

use super::{Event, Trace, TraceError};
use crate::schedule::{OpKind, Placement};
use serde_json::{Value, json};
use std::collections::HashMap;

/// Actors in a fixed order so thread ids are stable across files.
const ACTORS: [&str; 5] = ["stage", "send", "recv", "reducer", "optimizer"];

fn tid(actor: &str, extra: &mut Vec<String>) -> usize {
    if let Some(i) = ACTORS.iter().position(|a| *a == actor) {
        return i;
    }
    if let Some(i) = extra.iter().position(|a| a == actor) {
        return ACTORS.len() + i;
    }
    extra.push(actor.to_string());
    ACTORS.len() + extra.len() - 1
}

/// Flow key of a message: (is activation, mb, producing stage).
fn flow_key(t: &Trace, e: &Event) -> Option<(bool, u32, usize)> {
    let (mb, chunk) = (e.mb?, e.chunk? as usize);
    let stage = t.placement.stage(t.pp, e.rank as usize, chunk);
    match e.kind {
        OpKind::SendAct => Some((true, mb, stage)),
        OpKind::SendGrad => Some((false, mb, stage)),
        OpKind::RecvAct => Some((true, mb, stage.checked_sub(1)?)),
        OpKind::RecvGrad => Some((false, mb, stage.saturating_add(1))),
        _ => None,
    }
}

fn event_name(e: &Event) -> String {
    match (e.chunk, e.mb) {
        (Some(c), Some(mb)) => format!("{c}{}{mb}", e.kind.code()),
        (Some(c), None) => format!("{c}{}", e.kind.code()),
        _ => e.kind.code().to_string(),
    }
}

fn category(kind: OpKind) -> &'static str {
    if kind.is_compute() {
        "compute"
    } else if kind.is_comm() {
        "p2p"
    } else {
        "optimizer"
    }
}

/// Export `trace` as a Chrome trace JSON document.
pub fn to_chrome(trace: &Trace) -> String {
    let mut out = Vec::with_capacity(trace.events.len() + 8 * trace.pp);
    let mut extra = Vec::new();
    let mut flows: HashMap<(bool, u32, usize), usize> = HashMap::new();
    let mut used_tids: Vec<(u32, usize, String)> = Vec::new();
    for e in &trace.events {
        let t = tid(&e.actor, &mut extra);
        if !used_tids.iter().any(|(r, i, _)| *r == e.rank && *i == t) {
            used_tids.push((e.rank, t, e.actor.clone()));
        }
        let mut ev = json!({
            "name": event_name(e), "cat": category(e.kind), "ph": "X",
            "ts": e.start, "dur": (e.end - e.start).max(0.0), "pid": e.rank, "tid": t,
            "args": serde_json::to_value(e).unwrap_or(Value::Null),
        });
        if let Some(key) = flow_key(trace, e) {
            let next = flows.len() + 1;
            let id = *flows.entry(key).or_insert(next);
            let dir =
                if e.kind == OpKind::SendAct || e.kind == OpKind::SendGrad { "flow_out" } else { "flow_in" };
            ev["bind_id"] = json!(id);
            ev[dir] = json!(true);
        }
        out.push(ev);
    }
    let mut meta = Vec::new();
    for rank in 0..trace.pp {
        meta.push(
            json!({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": format!("rank {rank}")}}),
        );
        meta.push(
            json!({"ph": "M", "name": "process_sort_index", "pid": rank, "args": {"sort_index": rank}}),
        );
    }
    for (rank, t, actor) in used_tids {
        meta.push(json!({"ph": "M", "name": "thread_name", "pid": rank, "tid": t, "args": {"name": actor}}));
    }
    meta.extend(out);
    let doc = json!({
        "displayTimeUnit": "ms",
        "troupe": {
            "pp": trace.pp, "vpp": trace.vpp, "microbatches": trace.microbatches,
            "placement": trace.placement, "schedule": trace.schedule,
        },
        "traceEvents": meta,
    });
    doc.to_string()
}

/// Read back a Chrome trace written by [`to_chrome`] (events without troupe `args` are skipped).
///
/// # Errors
/// [`TraceError::Parse`] for invalid JSON or a missing `troupe` header.
pub fn from_chrome(text: &str) -> Result<Trace, TraceError> {
    let bad = |reason: String| TraceError::Parse { line: 1, reason };
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| TraceError::Parse { line: e.line(), reason: e.to_string() })?;
    let head =
        doc.get("troupe").ok_or_else(|| bad("no `troupe` header object: not written by troupe".into()))?;
    let num = |k: &str| {
        head.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("header lacks `{k}`")))
    };
    let placement: Placement = serde_json::from_value(head.get("placement").cloned().unwrap_or(Value::Null))
        .map_err(|e| bad(format!("header placement: {e}")))?;
    let events = doc
        .get("traceEvents")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no traceEvents array".into()))?
        .iter()
        .filter(|e| e.get("ph").and_then(Value::as_str) == Some("X"))
        .filter_map(|e| e.get("args"))
        .map(|args| serde_json::from_value::<Event>(args.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("event args: {e}")))?;
    Ok(Trace {
        pp: num("pp")?,
        vpp: num("vpp")?,
        microbatches: num("microbatches")?,
        placement,
        schedule: head.get("schedule").and_then(Value::as_str).map(str::to_string),
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::tests::sample;

    #[test]
    fn chrome_round_trip_and_flows_pair_up() {
        let t = sample();
        let text = to_chrome(&t);
        assert_eq!(from_chrome(&text).unwrap(), t);
        let doc: Value = serde_json::from_str(&text).unwrap();
        let events = doc["traceEvents"].as_array().unwrap();
        let mut outs: HashMap<u64, usize> = HashMap::new();
        let mut ins: HashMap<u64, usize> = HashMap::new();
        for e in events {
            if let Some(id) = e.get("bind_id").and_then(Value::as_u64) {
                let side = if e.get("flow_out").is_some() { &mut outs } else { &mut ins };
                *side.entry(id).or_default() += 1;
            }
        }
        let sends = t.events.iter().filter(|e| matches!(e.kind, OpKind::SendAct | OpKind::SendGrad)).count();
        assert_eq!(outs.len(), sends);
        assert_eq!(outs, ins, "every flow has one start and one end");
        assert!(outs.values().all(|&n| n == 1));
        let names = events.iter().filter(|e| e["ph"] == "M" && e["name"] == "process_name").count();
        assert_eq!(names, t.pp);
    }

    #[test]
    fn hostile_events_do_not_panic() {
        let mut t = sample();
        t.placement = Placement::V;
        t.events[0].rank = u32::MAX;
        t.events[0].chunk = Some(u32::MAX);
        t.events[1].kind = OpKind::RecvAct;
        t.events[1].rank = u32::MAX;
        t.events[2].kind = OpKind::RecvGrad;
        t.events[2].rank = 0;
        t.events[2].chunk = Some(u32::MAX);
        t.placement = Placement::Looped;
        let _ = to_chrome(&t);
        t.placement = Placement::V;
        let _ = to_chrome(&t);
    }
}
