//! `troupe trace replay|render`: what-if replay of a recorded trace under other schedules, and
//! conversion of a trace to a timeline picture or Chrome JSON.

use super::UsageError;
use super::schedule::{emit, format_of};
use std::path::PathBuf;
use troupe::schedule::{ScheduleKind, ScheduleSpec, dims_ok, generate};
use troupe::trace::{Trace, render_png, render_svg, replay, timeline_scene, to_chrome};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Trace file (troupe native form or troupe-written Chrome JSON).
    pub trace: PathBuf,
    /// Other schedules to compare (repeat or comma-separate): gpipe, 1f1b, interleaved, zb-h1, zb-h2,
    /// zb-v. Default: every one that fits the trace's pipeline size and microbatch count.
    #[arg(long = "schedule", value_delimiter = ',', value_parser = parse_kind)]
    pub schedules: Vec<ScheduleKind>,
    /// Chunks per rank for the other schedules that can vary it (interleaved).
    #[arg(long)]
    pub vpp: Option<usize>,
    /// Interleaved only: microbatch group size N (default pp).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RenderFormat {
    /// Timeline picture (SVG).
    Svg,
    /// Timeline picture (PNG; needs --out).
    Png,
    /// Chrome trace JSON (open in ui.perfetto.dev).
    Chrome,
}

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// Trace file (troupe native form or troupe-written Chrome JSON).
    pub trace: PathBuf,
    /// Output format (default: from --out's extension — .svg, .png, .json for Chrome JSON —
    /// else SVG).
    #[arg(long, value_enum)]
    pub format: Option<RenderFormat>,
    /// Write the output here instead of standard output (PNG needs it).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_kind(s: &str) -> Result<ScheduleKind, String> {
    s.parse()
}

fn read_trace(path: &PathBuf) -> anyhow::Result<Trace> {
    let text =
        std::fs::read_to_string(path).map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
    let trace = Trace::parse(&text).map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
    if !dims_ok(trace.pp, trace.vpp, trace.microbatches) {
        let msg =
            format!("{}: header sizes must be positive with pp*vpp*microbatches <= 2^26", path.display());
        return Err(UsageError(msg).into());
    }
    Ok(trace)
}

pub fn replay_cmd(args: ReplayArgs) -> anyhow::Result<()> {
    let trace = read_trace(&args.trace)?;
    let every = args.schedules.is_empty();
    let kinds = if every { ScheduleKind::ALL.to_vec() } else { args.schedules.clone() };
    let mut unfit = Vec::new();
    let specs: Vec<ScheduleSpec> = kinds
        .iter()
        .map(|&kind| ScheduleSpec {
            kind,
            pp: trace.pp,
            microbatches: trace.microbatches,
            vpp: match kind {
                ScheduleKind::Interleaved => args.vpp.unwrap_or(kind.default_vpp()),
                _ => kind.default_vpp(),
            },
            group_size: args.group_size,
        })
        // Asked for by name, a schedule that does not fit is an error; the default list leaves it
        // out and says why.
        .filter(|spec| match (every, generate(spec)) {
            (true, Err(e)) => {
                unfit.push(format!("{}: {e}", spec.kind.name()));
                false
            }
            _ => true,
        })
        .collect();
    for why in &unfit {
        eprintln!("troupe: not compared: {why}");
    }
    let report = replay(&trace, &specs).map_err(|e| UsageError(format!("{}: {e}", args.trace.display())))?;
    if args.json {
        println!("{:#}", serde_json::to_value(&report)?);
        return Ok(());
    }
    let c = &report.costs;
    println!(
        "measured: makespan {:.1} us; estimated per-chunk costs (us): F {:.1}  B {:.1}  I {:.1}  W {:.1}  message {:.1}",
        report.measured_makespan, c.forward, c.backward, c.backward_input, c.backward_weight, c.latency
    );
    println!("{:<28} {:>4} {:>14} {:>8} {:>10}", "schedule", "vpp", "makespan (us)", "bubble", "peak (mb)");
    for row in std::iter::once(&report.recorded).chain(&report.others) {
        println!(
            "{:<28} {:>4} {:>14.1} {:>8.4} {:>10.2}",
            row.schedule, row.vpp, row.makespan, row.bubble, row.peak_in_flight
        );
    }
    Ok(())
}

pub fn render(args: RenderArgs) -> anyhow::Result<()> {
    let trace = read_trace(&args.trace)?;
    let caption = format!(
        "{} pp={} vpp={} microbatches={}  makespan {:.1} us",
        trace.schedule.as_deref().unwrap_or("trace"),
        trace.pp,
        trace.vpp,
        trace.microbatches,
        trace.makespan()
    );
    let format = args.format.unwrap_or_else(|| {
        let table = [("svg", RenderFormat::Svg), ("png", RenderFormat::Png), ("json", RenderFormat::Chrome)];
        format_of(args.out.as_deref(), &table).unwrap_or(RenderFormat::Svg)
    });
    let body = match format {
        RenderFormat::Svg => render_svg(&timeline_scene(&trace, &caption)).into_bytes(),
        RenderFormat::Png => render_png(&timeline_scene(&trace, &caption)),
        RenderFormat::Chrome => to_chrome(&trace).into_bytes(),
    };
    emit(&body, args.out.as_deref(), format == RenderFormat::Png)?;
    if let Some(out) = &args.out {
        let what = match format {
            RenderFormat::Svg => "an SVG timeline",
            RenderFormat::Png => "a PNG timeline",
            RenderFormat::Chrome => "Chrome trace JSON, for Perfetto",
        };
        eprintln!("wrote {} ({what})", out.display());
    }
    Ok(())
}
