//! Timeline rendering: the familiar pipeline figure. Ranks are rows, time runs left to right,
//! each compute op is a box numbered with its microbatch (forward blue, full backward green,
//! input-grad teal, weight-grad orange; later chunks in darker shades), and bubbles are the
//! white gaps. Layout produces a [`Scene`] of rectangles and text once; [`render_svg`] and
//! [`render_png`] only draw it, so both outputs show the same picture.

use super::Trace;
use crate::schedule::OpKind;
use std::fmt::Write as _;

pub type Rgb = [u8; 3];

#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    Rect {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: Rgb,
        stroke: Option<Rgb>,
    },
    /// A straight segment `width` pixels wide (curves are polylines of these).
    Line {
        x1: f64,
        y1: f64,
        x2: f64,
        y2: f64,
        width: f64,
        color: Rgb,
    },
    /// `x` is the centre when `centered`, else the left edge; `y` is the baseline.
    Text {
        x: f64,
        y: f64,
        size: f64,
        centered: bool,
        text: String,
        color: Rgb,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub width: u32,
    pub height: u32,
    pub shapes: Vec<Shape>,
}

const LEFT: f64 = 64.0;
const TOP: f64 = 34.0;
const ROW: f64 = 26.0;
const GAP: f64 = 4.0;
const BLACK: Rgb = [0, 0, 0];
const WHITE: Rgb = [255, 255, 255];

fn colour(kind: OpKind, chunk: u32) -> Rgb {
    let base: Rgb = match kind {
        OpKind::Forward => [66, 133, 244],
        OpKind::Backward => [52, 168, 83],
        OpKind::BackwardInput => [0, 172, 193],
        OpKind::BackwardWeight => [251, 140, 0],
        _ => [158, 158, 158],
    };
    // darken later chunks by 22% each (at most 3 steps) so chunks stay tellable apart
    let k = 1.0 - 0.22 * f64::from(chunk.min(3));
    base.map(|c| (f64::from(c) * k) as u8)
}

fn rect(x: f64, y: f64, w: f64, h: f64, fill: Rgb, stroke: Option<Rgb>) -> Shape {
    Shape::Rect { x, y, w, h, fill, stroke }
}

fn text(x: f64, y: f64, size: f64, centered: bool, text: String, color: Rgb) -> Shape {
    Shape::Text { x, y, size, centered, text, color }
}

/// First start and the pixels per microsecond: boxes wide enough for a number, the chart
/// within 600..2400 px.
fn time_axis(compute: &[&super::Event]) -> (f64, f64, f64) {
    let t0 = compute.iter().map(|e| e.start).fold(f64::INFINITY, f64::min);
    let t1 = compute.iter().map(|e| e.end).fold(f64::NEG_INFINITY, f64::max);
    if !t0.is_finite() || t1 <= t0 {
        return (0.0, 600.0, 600.0);
    }
    let shortest = compute.iter().map(|e| e.end - e.start).filter(|d| *d > 0.0).fold(f64::INFINITY, f64::min);
    let per_unit = if shortest.is_finite() { 22.0 / shortest } else { 1.0 };
    let chart = ((t1 - t0) * per_unit).clamp(600.0, 2400.0);
    (t0, chart / (t1 - t0), chart)
}

/// Lay out the compute events of `trace` as a timeline; `caption` is written above it.
pub fn timeline_scene(trace: &Trace, caption: &str) -> Scene {
    let compute: Vec<_> = trace.events.iter().filter(|e| e.kind.is_compute()).collect();
    let (t0, scale, chart) = time_axis(&compute);
    let width = (LEFT + chart + 16.0).ceil() as u32;
    let height = (TOP + ROW * trace.pp as f64 + 30.0).ceil() as u32;
    let mut shapes = vec![
        rect(0.0, 0.0, f64::from(width), f64::from(height), WHITE, None),
        text(8.0, 20.0, 14.0, false, caption.to_string(), BLACK),
    ];
    for rank in 0..trace.pp {
        let y = TOP + ROW * rank as f64;
        shapes.push(rect(LEFT, y, chart, ROW - GAP, [245, 245, 245], None));
        shapes.push(text(6.0, y + ROW / 2.0 + 3.0, 12.0, false, format!("rank {rank}"), BLACK));
    }
    for e in &compute {
        let x = LEFT + (e.start - t0) * scale;
        let w = ((e.end - e.start) * scale).max(1.0);
        let y = TOP + ROW * f64::from(e.rank);
        let fill = colour(e.kind, e.chunk.unwrap_or(0));
        shapes.push(rect(x, y, w, ROW - GAP, fill, Some(WHITE)));
        let label = e.mb.map(|mb| mb.to_string()).unwrap_or_default();
        if !label.is_empty() && w >= 7.0 * label.len() as f64 + 2.0 {
            let (cx, cy) = (x + w / 2.0, y + (ROW - GAP) / 2.0 + 4.0);
            shapes.push(text(cx, cy, 11.0, true, label, WHITE));
        }
    }
    legend(&mut shapes, TOP + ROW * trace.pp as f64 + 20.0);
    Scene { width, height, shapes }
}

fn legend(shapes: &mut Vec<Shape>, y: f64) {
    let items = [
        (OpKind::Forward, "F forward"),
        (OpKind::Backward, "B backward"),
        (OpKind::BackwardInput, "I input grad"),
        (OpKind::BackwardWeight, "W weight grad"),
    ];
    for (i, (kind, label)) in items.into_iter().enumerate() {
        let x = LEFT + 120.0 * i as f64;
        shapes.push(rect(x, y - 10.0, 12.0, 12.0, colour(kind, 0), None));
        shapes.push(text(x + 16.0, y, 11.0, false, label.to_string(), BLACK));
    }
}

fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Draw a scene as a standalone SVG document.
pub fn render_svg(scene: &Scene) -> String {
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"monospace\">\n",
        w = scene.width,
        h = scene.height
    );
    for shape in &scene.shapes {
        let _ = match shape {
            Shape::Rect { x, y, w, h, fill, stroke } => {
                let stroke = stroke
                    .map(|s| format!(" stroke=\"{}\" stroke-width=\"0.5\"", hex(s)))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "<rect x=\"{x:.2}\" y=\"{y:.2}\" width=\"{w:.2}\" height=\"{h:.2}\" fill=\"{}\"{stroke}/>",
                    hex(*fill)
                )
            }
            Shape::Line { x1, y1, x2, y2, width, color } => {
                writeln!(
                    out,
                    "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{}\" stroke-width=\"{width}\"/>",
                    hex(*color)
                )
            }
            Shape::Text { x, y, size, centered, text, color } => {
                let anchor = if *centered { " text-anchor=\"middle\"" } else { "" };
                writeln!(
                    out,
                    "<text x=\"{x:.2}\" y=\"{y:.2}\" font-size=\"{size}\" fill=\"{}\"{anchor}>{}</text>",
                    hex(*color),
                    escape(text)
                )
            }
        };
    }
    out.push_str("</svg>\n");
    out
}

/// Draw a scene as PNG bytes (see `super::png` for the rasterizer).
pub fn render_png(scene: &Scene) -> Vec<u8> {
    super::png::rasterize(scene)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::tests::sample;

    #[test]
    fn one_box_per_compute_event_and_rows_per_rank() {
        let t = sample();
        let scene = timeline_scene(&t, "1f1b");
        let boxes = scene.shapes.iter().filter(|s| matches!(s, Shape::Rect { stroke: Some(_), .. })).count();
        assert_eq!(boxes, t.events.iter().filter(|e| e.kind.is_compute()).count());
        let svg = render_svg(&scene);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for r in 0..t.pp {
            assert!(svg.contains(&format!(">rank {r}<")));
        }
    }

    #[test]
    fn boxes_never_overlap_within_a_rank() {
        let scene = timeline_scene(&sample(), "");
        let mut rows: std::collections::BTreeMap<i64, Vec<(f64, f64)>> = Default::default();
        for s in &scene.shapes {
            if let Shape::Rect { x, y, w, stroke: Some(_), .. } = s {
                rows.entry(*y as i64).or_default().push((*x, x + w));
            }
        }
        for spans in rows.values_mut() {
            spans.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(spans.windows(2).all(|p| p[0].1 <= p[1].0 + 1e-6));
        }
    }
}
