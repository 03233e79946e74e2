//! `troupe schedule show|check`: generate, print, validate and simulate pipeline schedules.
//!
//! `show` prints the program in the requested format plus its simulated stats; in the text form
//! the stats are `#` comment lines, so the output can be fed straight back to `check`.

use super::UsageError;
use anyhow::Context as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use troupe::schedule::{
    Costs, Program, ScheduleKind, ScheduleSpec, Simulation, generate, lower, parse_program, simulate,
    to_text, validate,
};
use troupe::trace::{Trace, render_png, render_svg, timeline_scene, to_chrome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Compact program text (one line per rank) with stats as comments.
    Text,
    /// Program and stats as JSON.
    Json,
    /// Timeline picture (SVG).
    Svg,
    /// Timeline picture (PNG; needs --out).
    Png,
    /// Simulated Chrome trace JSON (open in ui.perfetto.dev).
    Chrome,
    /// Simulated trace in troupe's native text form (input of `troupe trace replay`).
    Trace,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// gpipe, 1f1b, interleaved, zb-h1, zb-h2 or zb-v.
    #[arg(long, value_parser = parse_kind)]
    pub schedule: ScheduleKind,
    /// Pipeline-parallel size (ranks).
    #[arg(long)]
    pub pp: usize,
    /// Microbatches per optimizer step on each pipeline (global batch ÷ micro batch ÷ data-parallel
    /// size).
    #[arg(long)]
    pub microbatches: usize,
    /// Model chunks per rank (default: 2 for interleaved and zb-v, else 1).
    #[arg(long)]
    pub vpp: Option<usize>,
    /// Interleaved only: microbatch group size N (default pp).
    #[arg(long)]
    pub group_size: Option<usize>,
    #[command(flatten)]
    pub sim: SimArgs,
    /// Output format (default: from --out's extension — .svg, .png, .json for the program as
    /// JSON — else text).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Write the output here instead of standard output (stats then go to standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Per-chunk costs and message model: f=,b=,i=,w=,lat=,bw=,bytes=,reduce=,step=.
    #[arg(long, default_value = "f=1,b=2,w=1")]
    pub costs: String,
}

impl SimArgs {
    fn costs(&self) -> anyhow::Result<Costs> {
        Costs::parse(&self.costs).map_err(|e| UsageError(format!("--costs: {e}")).into())
    }
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Program file, text form or JSON. A compute-only program (no sends or receives) is lowered
    /// first.
    pub file: PathBuf,
    /// Also print the checked program (after lowering, for a compute-only file) in text form.
    #[arg(long)]
    pub print: bool,
    #[command(flatten)]
    pub sim: SimArgs,
}

fn parse_kind(s: &str) -> Result<ScheduleKind, String> {
    s.parse()
}

pub fn show(args: ShowArgs) -> anyhow::Result<()> {
    let spec = ScheduleSpec {
        kind: args.schedule,
        pp: args.pp,
        microbatches: args.microbatches,
        vpp: args.vpp.unwrap_or(args.schedule.default_vpp()),
        group_size: args.group_size,
    };
    let costs = args.sim.costs()?;
    let program = generate(&spec).map_err(|e| UsageError(e.to_string()))?;
    validate(&program).context("generated program failed validation (a troupe bug)")?;
    let sim = simulate(&program, &costs)?;
    let stats = stats_text(spec.kind.name(), &program, &sim, &costs);
    let format = args.format.unwrap_or_else(|| {
        format_of(args.out.as_deref(), &[("svg", Format::Svg), ("png", Format::Png), ("json", Format::Json)])
            .unwrap_or(Format::Text)
    });
    let body: Vec<u8> = match format {
        Format::Text => format!("{}{stats}", to_text(&program)).into_bytes(),
        Format::Json => {
            let doc = serde_json::json!({ "schedule": spec.kind.name(), "costs": costs, "program": program, "stats": sim.stats });
            format!("{doc:#}\n").into_bytes()
        }
        Format::Svg | Format::Png => {
            let trace =
                Trace::from_simulation(&program, &sim, costs.message_bytes, 1.0, Some(spec.kind.name()));
            let caption = format!(
                "{} pp={} vpp={} microbatches={}  makespan {:.3}  bubble {:.4}",
                spec.kind,
                program.pp,
                program.vpp,
                program.microbatches,
                sim.stats.makespan,
                sim.stats.bubble
            );
            let scene = timeline_scene(&trace, &caption);
            if format == Format::Svg { render_svg(&scene).into_bytes() } else { render_png(&scene) }
        }
        Format::Chrome | Format::Trace => {
            // one cost unit = 1 ms, so Perfetto shows readable durations
            let trace =
                Trace::from_simulation(&program, &sim, costs.message_bytes, 1000.0, Some(spec.kind.name()));
            if format == Format::Chrome {
                to_chrome(&trace).into_bytes()
            } else {
                trace.to_native().into_bytes()
            }
        }
    };
    emit(&body, args.out.as_deref(), format == Format::Png)?;
    if args.out.is_some() && format != Format::Text {
        print!("{stats}");
    }
    Ok(())
}

/// The format `out`'s extension names among `table` (case-insensitive), if any.
pub(crate) fn format_of<F: Copy>(out: Option<&Path>, table: &[(&str, F)]) -> Option<F> {
    let ext = out?.extension()?.to_str()?.to_ascii_lowercase();
    table.iter().find(|(e, _)| *e == ext).map(|(_, f)| *f)
}

/// Write `body` to `out`, or to standard output when no file is given.
pub(crate) fn emit(body: &[u8], out: Option<&Path>, binary: bool) -> anyhow::Result<()> {
    match out {
        Some(path) => std::fs::write(path, body)
            .map_err(|e| UsageError(format!("--out {}: cannot write there: {e}", path.display())).into()),
        None if binary => Err(UsageError("PNG output needs --out FILE".to_string()).into()),
        None => std::io::stdout().write_all(body).context("writing to standard output"),
    }
}

/// Simulated stats as `#` comment lines (valid in the program text form).
pub(crate) fn stats_text(name: &str, program: &Program, sim: &Simulation, costs: &Costs) -> String {
    let s = &sim.stats;
    let mut out = format!(
        "# {name}: pp={} vpp={} microbatches={}  costs per chunk f={} b={} i={} w={} latency={}\n\
         # makespan {:.4}  bubble {:.4} (idle/busy, worst rank)  span bubble {:.4}\n\
         # rank      busy      idle   bubble  peak in-flight (mb,chunk)\n",
        program.pp,
        program.vpp,
        program.microbatches,
        costs.forward,
        costs.backward,
        costs.backward_input,
        costs.backward_weight,
        costs.transfer(),
        s.makespan,
        s.bubble,
        s.span_bubble,
    );
    for (r, rs) in s.ranks.iter().enumerate() {
        out += &format!(
            "# {r:>4} {:>9.3} {:>9.3} {:>8.4} {:>6}\n",
            rs.busy, rs.idle, rs.bubble, rs.peak_in_flight
        );
    }
    out
}

pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| UsageError(format!("reading {}: {e}", args.file.display())))?;
    let costs = args.sim.costs()?;
    let file = args.file.display();
    let mut program = parse_program(&text).map_err(|e| UsageError(format!("{file}: {e}")))?;
    let compute_only = program.ranks.iter().flatten().all(|op| !op.kind().is_comm());
    if compute_only && program.pp > 1 {
        println!("# {file}: compute-only program, inserting communication first");
        program = lower(&program).map_err(|e| UsageError(format!("{file}: {e}")))?;
    }
    validate(&program).map_err(|e| UsageError(format!("{file}: {e}")))?;
    let sim = simulate(&program, &costs)?;
    if args.print {
        print!("{}", to_text(&program));
    }
    println!("# {file}: valid, deadlock-free with blocking send/recv");
    print!("{}", stats_text("program", &program, &sim, &costs));
    Ok(())
}
