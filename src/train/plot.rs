//! Loss and learning-rate curves from a `--log-json` file, drawn as a [`Scene`] (the same
//! rectangles-lines-text scene the timeline renderer uses, so SVG and PNG come for free without a
//! font or plotting stack).
//!
//! Layout: two stacked panels sharing the step axis: loss (training in blue, validation in
//! orange) on top, learning rate below; each with min/max labels on the y axis and the step
//! range on the x axis. Several runs ([`compare_scene`]) get a colour each (training thick,
//! validation thin) and a legend under the panels.
//!
//! Runs come from `--log-json` files ([`parse_log`]) or from TensorBoard scalars under
//! Megatron-LM's tags ([`points_from_scalars`]), so a Megatron run's TensorBoard directory and a
//! troupe run can be drawn on one figure.

use std::collections::BTreeMap;

use crate::tensorboard::Scalar;
use crate::trace::{Scene, Shape};

/// One training step and, when evaluated, the validation loss.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Point {
    pub step: f64,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    pub val_loss: Option<f64>,
}

/// Parses `--log-json` lines (records without a `step` are skipped; malformed lines counted).
pub fn parse_log(text: &str) -> (Vec<Point>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            bad += 1;
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            bad += 1;
            continue;
        };
        out.push(Point {
            step,
            loss: v["loss"].as_f64(),
            lr: v["lr"].as_f64(),
            val_loss: v["val_loss"].as_f64(),
        });
    }
    (out, bad)
}

const W: f64 = 720.0;
const PANEL: f64 = 220.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 30.0;
const GAP: f64 = 50.0;
const BLUE: [u8; 3] = [66, 133, 244];
const ORANGE: [u8; 3] = [251, 140, 0];
const GREY: [u8; 3] = [120, 120, 120];
const BLACK: [u8; 3] = [0, 0, 0];
/// Colours of the runs of a comparison, in order (then again).
const PALETTE: [[u8; 3]; 6] = [BLUE, ORANGE, [52, 168, 83], [219, 68, 55], [142, 68, 173], [121, 85, 72]];

/// The points of TensorBoard scalars under Megatron's tags (`lm loss`, `learning-rate`,
/// `lm loss validation`), by step; a step written twice (a run resumed from before it) takes the
/// later value. The evaluations are points of their own, as in a `--log-json` file.
pub fn points_from_scalars(scalars: &[Scalar]) -> Vec<Point> {
    let mut steps: BTreeMap<i64, Point> = BTreeMap::new();
    let mut evals: BTreeMap<i64, f64> = BTreeMap::new();
    for s in scalars {
        let v = Some(f64::from(s.value));
        match s.tag.as_str() {
            "lm loss" | "learning-rate" => {
                let p = steps.entry(s.step).or_insert(Point { step: s.step as f64, ..Point::default() });
                if s.tag == "lm loss" {
                    p.loss = v;
                } else {
                    p.lr = v;
                }
            }
            "lm loss validation" => {
                evals.insert(s.step, f64::from(s.value));
            }
            _ => {}
        }
    }
    let mut out: Vec<Point> = steps.into_values().collect();
    let evals =
        evals.into_iter().map(|(step, v)| Point { step: step as f64, val_loss: Some(v), ..Point::default() });
    out.extend(evals);
    // Stable: at a step with an evaluation, the training point stays first, as in a log file.
    out.sort_by(|a, b| a.step.total_cmp(&b.step));
    out
}

type Series<'a> = (&'a [(f64, f64)], [u8; 3], f64);

fn panel(shapes: &mut Vec<Shape>, top: f64, title: &str, series: &[Series<'_>], steps: (f64, f64)) {
    let (x0, x1, y0, y1) = (LEFT, W - 20.0, top, top + PANEL);
    let frame = |x1_: f64, y1_: f64, x2_: f64, y2_: f64| Shape::Line {
        x1: x1_,
        y1: y1_,
        x2: x2_,
        y2: y2_,
        width: 1.0,
        color: GREY,
    };
    shapes.extend([
        frame(x0, y0, x1, y0),
        frame(x0, y1, x1, y1),
        frame(x0, y0, x0, y1),
        frame(x1, y0, x1, y1),
    ]);
    let text = |x: f64, y: f64, t: String, centered: bool| Shape::Text {
        x,
        y,
        size: 14.0,
        centered,
        text: t,
        color: BLACK,
    };
    shapes.push(text((x0 + x1) / 2.0, y0 - 8.0, title.to_string(), true));
    let vals = series.iter().flat_map(|(s, _, _)| s.iter().map(|p| p.1));
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        shapes.push(text((x0 + x1) / 2.0, (y0 + y1) / 2.0, "NO DATA".into(), true));
        return;
    }
    let span = if hi > lo { hi - lo } else { 1.0 };
    let fmt = |v: f64| if v.abs() < 1e-2 && v != 0.0 { format!("{v:.1e}") } else { format!("{v:.3}") };
    shapes.push(text(6.0, y0 + 12.0, fmt(hi), false));
    shapes.push(text(6.0, y1, fmt(lo), false));
    shapes.push(text(x0, y1 + 18.0, format!("{}", steps.0), false));
    shapes.push(text(x1 - 40.0, y1 + 18.0, format!("{}", steps.1), false));
    let sx = |s: f64| x0 + (s - steps.0) / (steps.1 - steps.0).max(1.0) * (x1 - x0);
    let sy = |v: f64| y1 - (v - lo) / span * (y1 - y0);
    for (pts, color, width) in series {
        for w in pts.windows(2) {
            shapes.push(Shape::Line {
                x1: sx(w[0].0),
                y1: sy(w[0].1),
                x2: sx(w[1].0),
                y2: sy(w[1].1),
                width: *width,
                color: *color,
            });
        }
        if let [only] = pts {
            shapes.push(Shape::Rect {
                x: sx(only.0) - 2.0,
                y: sy(only.1) - 2.0,
                w: 4.0,
                h: 4.0,
                fill: *color,
                stroke: None,
            });
        }
    }
}

/// The (step, value) pairs of one field of `points`, finite values only.
fn pick(points: &[Point], f: fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
    points.iter().filter_map(|p| f(p).filter(|v| v.is_finite()).map(|v| (p.step, v))).collect()
}

/// The smallest and largest step of all `runs` (0..1 when there are none).
fn step_range<'a>(runs: impl Iterator<Item = &'a [Point]>) -> (f64, f64) {
    let steps =
        runs.flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.step), b.max(p.step)));
    if steps.0.is_finite() { steps } else { (0.0, 1.0) }
}

/// The loss and LR figure for `points`.
pub fn plot_scene(points: &[Point]) -> Scene {
    let (loss, val, lr) = (pick(points, |p| p.loss), pick(points, |p| p.val_loss), pick(points, |p| p.lr));
    let steps = step_range(std::iter::once(points));
    let mut shapes = Vec::new();
    let losses = [(&loss[..], BLUE, 2.0), (&val[..], ORANGE, 2.0)];
    panel(&mut shapes, TOP, "LOSS (TRAIN BLUE, VALID ORANGE)", &losses, steps);
    panel(&mut shapes, TOP + PANEL + GAP, "LEARNING RATE", &[(&lr, BLUE, 2.0)], steps);
    Scene { width: W as u32, height: (TOP + 2.0 * PANEL + GAP + 30.0) as u32, shapes }
}

/// The loss and LR figure of several named runs on shared axes: a colour per run (training
/// thick, validation thin) and a legend of the names under the panels. One run draws as
/// [`plot_scene`].
pub fn compare_scene(runs: &[(String, Vec<Point>)]) -> Scene {
    if let [(_, only)] = runs {
        return plot_scene(only);
    }
    let color = |i: usize| PALETTE[i % PALETTE.len()];
    let picked: Vec<_> = runs
        .iter()
        .map(|(_, pts)| (pick(pts, |p| p.loss), pick(pts, |p| p.val_loss), pick(pts, |p| p.lr)))
        .collect();
    let steps = step_range(runs.iter().map(|(_, pts)| &pts[..]));
    let mut losses = Vec::new();
    let mut rates = Vec::new();
    for (i, (loss, val, lr)) in picked.iter().enumerate() {
        losses.extend([(&loss[..], color(i), 2.0), (&val[..], color(i), 1.0)]);
        rates.push((&lr[..], color(i), 2.0));
    }
    let mut shapes = Vec::new();
    panel(&mut shapes, TOP, "LOSS (TRAIN THICK, VALID THIN)", &losses, steps);
    panel(&mut shapes, TOP + PANEL + GAP, "LEARNING RATE", &rates, steps);
    let legend = TOP + 2.0 * PANEL + GAP + 44.0;
    for (i, (name, _)) in runs.iter().enumerate() {
        let y = legend + 20.0 * i as f64;
        shapes.push(Shape::Line {
            x1: LEFT,
            y1: y - 5.0,
            x2: LEFT + 30.0,
            y2: y - 5.0,
            width: 3.0,
            color: color(i),
        });
        shapes.push(Shape::Text {
            x: LEFT + 40.0,
            y,
            size: 14.0,
            centered: false,
            text: name.clone(),
            color: BLACK,
        });
    }
    Scene { width: W as u32, height: (legend + 20.0 * runs.len() as f64) as u32, shapes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_draws_one_segment_per_pair() {
        let log = "{\"step\":1,\"loss\":5.0,\"lr\":0.001}\n{\"step\":2,\"loss\":4.0,\"lr\":0.002}\n\
                   {\"step\":2,\"val_loss\":4.5}\nnot json\n{\"step\":3,\"loss\":3.5,\"lr\":0.002}\n";
        let (pts, bad) = parse_log(log);
        assert_eq!((pts.len(), bad), (4, 1));
        let scene = plot_scene(&pts);
        let lines =
            scene.shapes.iter().filter(|s| matches!(s, Shape::Line { width, .. } if *width == 2.0)).count();
        // 2 loss segments + 2 lr segments; the single validation point is a dot.
        assert_eq!(lines, 4);
        assert!(crate::trace::render_png(&scene).starts_with(b"\x89PNG"));
    }

    #[test]
    fn megatron_tensorboard_tags_become_points() {
        let sc = |tag: &str, step: i64, value: f32| Scalar { tag: tag.into(), step, value, wall_time: 0.0 };
        let scalars = [
            sc("lm loss", 1, 9.0),
            sc("learning-rate", 1, 1e-4),
            sc("lm loss vs samples", 512, 9.0),
            sc("lm loss", 2, 8.0),
            sc("lm loss validation", 2, 8.5),
            sc("grad-norm", 2, 1.0),
            // A resumed run wrote step 2 again: the later value stands.
            sc("lm loss", 2, 7.5),
        ];
        let pts = points_from_scalars(&scalars);
        let got: Vec<_> = pts.iter().map(|p| (p.step, p.loss, p.lr, p.val_loss)).collect();
        assert_eq!(
            got,
            [
                (1.0, Some(9.0), Some(f64::from(1e-4f32)), None),
                (2.0, Some(7.5), None, None),
                (2.0, None, None, Some(8.5)),
            ]
        );
    }

    #[test]
    fn runs_compared_get_a_colour_and_a_legend_line_each() {
        let run = |shift: f64| -> Vec<Point> {
            (1..=3)
                .map(|s| Point {
                    step: s as f64,
                    loss: Some(5.0 - s as f64 + shift),
                    lr: Some(1e-3),
                    val_loss: None,
                })
                .collect()
        };
        let runs = [("a".to_string(), run(0.0)), ("b".to_string(), run(0.5))];
        let scene = compare_scene(&runs);
        let colours = |width: f64| -> Vec<[u8; 3]> {
            let mut c: Vec<_> = scene
                .shapes
                .iter()
                .filter_map(|s| match s {
                    Shape::Line { width: w, color, .. } if *w == width => Some(*color),
                    _ => None,
                })
                .collect();
            c.dedup();
            c
        };
        // Two loss and two learning-rate segments per run, in the run's colour.
        assert_eq!(colours(2.0), [BLUE, ORANGE, BLUE, ORANGE]);
        assert_eq!(
            scene.shapes.iter().filter(|s| matches!(s, Shape::Line { width, .. } if *width == 2.0)).count(),
            8
        );
        let names: Vec<_> = scene
            .shapes
            .iter()
            .filter_map(|s| match s {
                Shape::Text { text, x, .. } if *x == LEFT + 40.0 => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["a", "b"]);
        // One run is the single-run figure.
        assert_eq!(compare_scene(&runs[..1]).shapes, plot_scene(&runs[0].1).shapes);
    }
}
