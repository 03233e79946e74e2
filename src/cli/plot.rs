//! `troupe plot FILE.jsonl --out loss.png`: loss and learning-rate curves from a `--log-json` file
//! (PNG or SVG by the output's extension).

use std::path::PathBuf;

use troupe::trace::{render_png, render_svg};
use troupe::train::plot::{parse_log, plot_scene};

use super::UsageError;

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// A `--log-json` file written by `troupe train`.
    pub log: PathBuf,
    /// Output image (.png or .svg).
    #[arg(long, default_value = "loss.png")]
    pub out: PathBuf,
}

pub fn plot(args: PlotArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.log)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", args.log.display())))?;
    let (points, bad) = parse_log(&text);
    if !points.iter().any(|p| p.loss.is_some() || p.val_loss.is_some()) {
        return Err(UsageError(format!(
            "{} holds no step records with a loss (expected `troupe train --log-json` lines such as \
             {{\"step\": 1, \"loss\": 8.3, \"lr\": 0.0003, …}})",
            args.log.display()
        ))
        .into());
    }
    if bad > 0 {
        eprintln!("troupe plot: skipped {bad} malformed line(s) in {}", args.log.display());
    }
    let scene = plot_scene(&points);
    let bytes = match args.out.extension().and_then(|e| e.to_str()) {
        Some("svg") => render_svg(&scene).into_bytes(),
        Some("png") => render_png(&scene),
        _ => return Err(UsageError(format!("--out {}: use a .png or .svg name", args.out.display())).into()),
    };
    std::fs::write(&args.out, bytes)
        .map_err(|e| UsageError(format!("cannot write {}: {e}", args.out.display())))?;
    // Evaluations are records of their own (with the step they followed): count them apart.
    let train = points.iter().filter(|p| p.loss.is_some()).count() as u64;
    let valid = points.iter().filter(|p| p.val_loss.is_some()).count() as u64;
    let evals = match valid {
        0 => String::new(),
        n => format!(", {}", super::count(n, "evaluation")),
    };
    eprintln!("wrote {} ({}{evals})", args.out.display(), super::count(train, "step"));
    Ok(())
}
