//! Loss and learning-rate curves from a `--log-json` file, drawn as a [`Scene`] (the same
//! rectangles-lines-text scene the timeline renderer uses, so SVG and PNG come for free without a
//! font or plotting stack).
//!
//! Layout: two stacked panels sharing the step axis: loss (training in blue, validation in
//! orange) on top, learning rate below; each with min/max labels on the y axis and the step
//! range on the x axis.

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

type Series<'a> = (&'a [(f64, f64)], [u8; 3]);

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
    let vals = series.iter().flat_map(|(s, _)| s.iter().map(|p| p.1));
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
    for (pts, color) in series {
        for w in pts.windows(2) {
            shapes.push(Shape::Line {
                x1: sx(w[0].0),
                y1: sy(w[0].1),
                x2: sx(w[1].0),
                y2: sy(w[1].1),
                width: 2.0,
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

/// The loss and LR figure for `points`.
pub fn plot_scene(points: &[Point]) -> Scene {
    let pick = |f: fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        points.iter().filter_map(|p| f(p).filter(|v| v.is_finite()).map(|v| (p.step, v))).collect()
    };
    let (loss, val, lr) = (pick(|p| p.loss), pick(|p| p.val_loss), pick(|p| p.lr));
    let steps =
        points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.step), b.max(p.step)));
    let steps = if steps.0.is_finite() { steps } else { (0.0, 1.0) };
    let mut shapes = Vec::new();
    panel(&mut shapes, TOP, "LOSS (TRAIN BLUE, VALID ORANGE)", &[(&loss, BLUE), (&val, ORANGE)], steps);
    panel(&mut shapes, TOP + PANEL + GAP, "LEARNING RATE", &[(&lr, BLUE)], steps);
    Scene { width: W as u32, height: (TOP + 2.0 * PANEL + GAP + 30.0) as u32, shapes }
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
}
