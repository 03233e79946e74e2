//! The compact text form of a [`Program`] and its parser.
//!
//! ```text
//! # any comment
//! pp=2 vpp=1 microbatches=2 placement=looped
//! 0: 0F0 0SA0:1 0F1 0SA1:1 0RG0:1 0B0 0RG1:1 0B1 0RED STEP
//! 1: 0RA0:0 0F0 0B0 0SG0:0 0RA1:0 0F1 0B1 0SG1:0 0RED STEP
//! ```
//! One header line, then one line per rank `r: tokens…` (ranks in order). Token grammar (see
//! `Op`'s `Display`): `<chunk><code><mb>[:<peer>]`, `<chunk>RED`, `STEP`. Parsing never panics:
//! any malformed input is a [`ScheduleError::Parse`] naming the line.

use super::error::{Result, ScheduleError};
use super::ir::{Op, OpKind, Placement, Program};
use std::fmt::Write as _;

/// Render a program in the text form.
pub fn to_text(program: &Program) -> String {
    let mut out = format!(
        "pp={} vpp={} microbatches={} placement={}\n",
        program.pp,
        program.vpp,
        program.microbatches,
        program.placement.name()
    );
    for (rank, ops) in program.ranks.iter().enumerate() {
        let _ = write!(out, "{rank}:");
        for op in ops {
            let _ = write!(out, " {op}");
        }
        out.push('\n');
    }
    out
}

fn parse_err(line: usize, reason: impl Into<String>) -> ScheduleError {
    ScheduleError::Parse { line, reason: reason.into() }
}

/// Parse one op token such as `1F3`, `0SA3:1`, `2RED` or `STEP`.
pub fn parse_op(token: &str) -> std::result::Result<Op, String> {
    if token == "STEP" {
        return Ok(Op::OptimizerStep);
    }
    let digits_end = token.find(|c: char| !c.is_ascii_digit()).unwrap_or(token.len());
    let (chunk_txt, rest) = token.split_at(digits_end);
    let chunk: u32 =
        chunk_txt.parse().map_err(|_| format!("token `{token}` should start with a chunk number"))?;
    let code_end = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
    let (code, rest) = rest.split_at(code_end);
    let kind = OpKind::from_code(code).ok_or_else(|| format!("token `{token}`: unknown op `{code}`"))?;
    match kind {
        OpKind::ReduceGrads if rest.is_empty() => return Ok(Op::ReduceGrads { chunk }),
        OpKind::ReduceGrads | OpKind::OptimizerStep => {
            return Err(format!("token `{token}`: `{code}` takes no microbatch"));
        }
        _ => {}
    }
    let (mb_txt, peer_txt) = match rest.split_once(':') {
        Some((mb, peer)) => (mb, Some(peer)),
        None => (rest, None),
    };
    let mb: u32 = mb_txt.parse().map_err(|_| format!("token `{token}`: bad microbatch `{mb_txt}`"))?;
    let peer = match (kind.is_comm(), peer_txt) {
        (true, Some(p)) => p.parse().map_err(|_| format!("token `{token}`: bad peer `{p}`"))?,
        (true, None) => return Err(format!("token `{token}`: a send/recv needs `:<peer rank>`")),
        (false, Some(_)) => return Err(format!("token `{token}`: compute ops take no peer")),
        (false, None) => 0,
    };
    Ok(Op::from_parts(kind, mb, chunk, peer))
}

fn parse_header(line_no: usize, line: &str) -> Result<(usize, usize, usize, Placement)> {
    let (mut pp, mut vpp, mut mbs, mut placement) = (None, None, None, Placement::Looped);
    for field in line.split_whitespace() {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| parse_err(line_no, format!("header field `{field}` is not key=value")))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| parse_err(line_no, format!("`{key}` must be a number, got `{value}`")))
        };
        match key {
            "pp" => pp = Some(number()?),
            "vpp" => vpp = Some(number()?),
            "microbatches" => mbs = Some(number()?),
            "placement" => {
                placement = match value {
                    "looped" => Placement::Looped,
                    "v" => Placement::V,
                    _ => {
                        return Err(parse_err(line_no, format!("placement `{value}`: use looped or v")));
                    }
                }
            }
            _ => return Err(parse_err(line_no, format!("unknown header field `{key}`"))),
        }
    }
    let need =
        |v: Option<usize>, name: &str| v.ok_or_else(|| parse_err(line_no, format!("header lacks `{name}=`")));
    Ok((need(pp, "pp")?, need(vpp, "vpp")?, need(mbs, "microbatches")?, placement))
}

/// Parse the text form. Structure only; semantic checks are [`crate::schedule::validate`]'s.
pub fn from_text(text: &str) -> Result<Program> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty());
    let (line_no, header) = lines.next().ok_or_else(|| parse_err(1, "empty program"))?;
    let (pp, vpp, microbatches, placement) = parse_header(line_no, header)?;
    let mut ranks = Vec::new();
    for (line_no, line) in lines {
        let (rank_txt, body) = line
            .split_once(':')
            .ok_or_else(|| parse_err(line_no, "rank line should look like `3: 0F0 0B0 …`"))?;
        let rank: usize = rank_txt
            .trim()
            .parse()
            .map_err(|_| parse_err(line_no, format!("bad rank number `{}`", rank_txt.trim())))?;
        if rank != ranks.len() {
            return Err(parse_err(line_no, format!("expected rank {}, found rank {rank}", ranks.len())));
        }
        let ops = body
            .split_whitespace()
            .map(parse_op)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| parse_err(line_no, e))?;
        ranks.push(ops);
    }
    Ok(Program { pp, vpp, microbatches, placement, ranks })
}

/// Parse either form: JSON if the text starts with `{`, otherwise the text form.
pub fn parse_program(text: &str) -> Result<Program> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text)
            .map_err(|e| ScheduleError::Parse { line: e.line(), reason: format!("JSON program: {e}") })
    } else {
        from_text(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let ops = [
            Op::Forward { mb: 12, chunk: 3 },
            Op::BackwardWeight { mb: 0, chunk: 0 },
            Op::SendGrad { mb: 7, chunk: 1, peer: 63 },
            Op::RecvAct { mb: 7, chunk: 1, peer: 2 },
            Op::ReduceGrads { chunk: 2 },
            Op::OptimizerStep,
        ];
        for op in ops {
            assert_eq!(parse_op(&op.to_string()), Ok(op));
        }
    }

    #[test]
    fn malformed_tokens_are_errors() {
        for bad in ["F0", "0X1", "0F", "0SA1", "0F1:2", "0RED3", "0Fx", "", "0SA1:x"] {
            assert!(parse_op(bad).is_err(), "`{bad}` should not parse");
        }
    }

    #[test]
    fn header_and_rank_order_are_checked() {
        assert!(from_text("pp=1 vpp=1\n0: 0F0").is_err());
        assert!(from_text("pp=2 vpp=1 microbatches=1\n1: 0F0").is_err());
        assert!(from_text("pp=1 vpp=1 microbatches=1 colour=red\n0: 0F0").is_err());
        let p = from_text("# hi\npp=1 vpp=1 microbatches=1\n0: 0F0 0B0 # done\n").unwrap();
        assert_eq!(p.ranks, vec![vec![Op::Forward { mb: 0, chunk: 0 }, Op::Backward { mb: 0, chunk: 0 }]]);
    }
}
