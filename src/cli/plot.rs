//! `troupe plot RUN… --out loss.png`: loss and learning-rate curves of one run or several on
//! shared axes (PNG or SVG by the output's extension). A run is a `--log-json` file, a TensorBoard
//! event file, or a directory of them (troupe's or Megatron-LM's `--tensorboard-dir`: the tags
//! `lm loss`, `learning-rate`, `lm loss validation`), so a Megatron run can be drawn beside a
//! troupe run.

use std::path::{Path, PathBuf};

use troupe::tensorboard::{event_files, is_event_file, read_scalars};
use troupe::trace::{render_png, render_svg};
use troupe::train::plot::{Point, compare_scene, parse_log, points_from_scalars};

use super::UsageError;

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// Runs to draw: `--log-json` files written by `troupe train`, TensorBoard event files, or
    /// directories of them (`--tensorboard-dir`, troupe's or Megatron's).
    #[arg(required = true, num_args = 1..)]
    pub logs: Vec<PathBuf>,
    /// Output image (.png or .svg).
    #[arg(long, default_value = "loss.png")]
    pub out: PathBuf,
}

/// The points of one run, from a JSON log or TensorBoard files; a run with no loss in it is an
/// error saying what was looked for.
fn read_run(path: &Path) -> Result<Vec<Point>, UsageError> {
    let has_loss = |points: &[Point]| points.iter().any(|p| p.loss.is_some() || p.val_loss.is_some());
    let tb_file = is_event_file(path);
    let shown = path.display();
    if path.is_dir() || tb_file {
        let files = if tb_file {
            vec![path.to_path_buf()]
        } else {
            event_files(path).map_err(|e| UsageError(e.to_string()))?
        };
        if files.is_empty() {
            return Err(UsageError(format!(
                "{shown}: a directory without TensorBoard event files (events.out.tfevents.*)"
            )));
        }
        // Oldest file first (their names start with the time they were opened): a resumed run's
        // values for the steps it did again are the ones drawn.
        let mut scalars = Vec::new();
        for f in &files {
            scalars.extend(read_scalars(f).map_err(|e| UsageError(e.to_string()))?);
        }
        let points = points_from_scalars(&scalars);
        if !has_loss(&points) {
            return Err(UsageError(format!(
                "{shown} holds no TensorBoard scalars `lm loss` or `lm loss validation`"
            )));
        }
        return Ok(points);
    }
    let text = std::fs::read_to_string(path).map_err(|e| UsageError(format!("cannot read {shown}: {e}")))?;
    let (points, bad) = parse_log(&text);
    if bad > 0 {
        eprintln!("troupe plot: skipped {bad} malformed line(s) in {shown}");
    }
    if !has_loss(&points) {
        return Err(UsageError(format!(
            "{shown} holds no step records with a loss (expected `troupe train --log-json` lines such as \
             {{\"step\": 1, \"loss\": 8.3, \"lr\": 0.0003, …}})"
        )));
    }
    Ok(points)
}

/// A run's name in the legend: the file's stem or the directory's name, or the whole path where
/// two runs would share a name.
fn names(paths: &[PathBuf]) -> Vec<String> {
    let short = |p: &PathBuf| {
        // An event file is named by its directory (its own name is a time and a host).
        let dir = p.parent().filter(|d| is_event_file(p) && !d.as_os_str().is_empty());
        let p = dir.unwrap_or(p);
        let name = if p.is_dir() { p.file_name() } else { p.file_stem() };
        name.map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
    };
    let shorts: Vec<String> = paths.iter().map(short).collect();
    shorts
        .iter()
        .zip(paths)
        .map(
            |(s, p)| {
                if shorts.iter().filter(|o| *o == s).count() > 1 {
                    p.display().to_string()
                } else {
                    s.clone()
                }
            },
        )
        .collect()
}

pub fn plot(args: PlotArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for (path, name) in args.logs.iter().zip(names(&args.logs)) {
        runs.push((name, read_run(path)?));
    }
    let scene = compare_scene(&runs);
    let bytes = match args.out.extension().and_then(|e| e.to_str()) {
        Some("svg") => render_svg(&scene).into_bytes(),
        Some("png") => render_png(&scene),
        _ => return Err(UsageError(format!("--out {}: use a .png or .svg name", args.out.display())).into()),
    };
    std::fs::write(&args.out, bytes)
        .map_err(|e| UsageError(format!("cannot write {}: {e}", args.out.display())))?;
    // Evaluations are records of their own (with the step they followed): count them apart.
    let counts: Vec<String> = runs
        .iter()
        .map(|(name, points)| {
            let train = points.iter().filter(|p| p.loss.is_some()).count() as u64;
            let evals = match points.iter().filter(|p| p.val_loss.is_some()).count() as u64 {
                0 => String::new(),
                n => format!(", {}", super::count(n, "evaluation")),
            };
            let who = if runs.len() > 1 { format!("{name}: ") } else { String::new() };
            format!("{who}{}{evals}", super::count(train, "step"))
        })
        .collect();
    eprintln!("wrote {} ({})", args.out.display(), counts.join("; "));
    Ok(())
}
