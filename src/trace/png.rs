//! A deliberately tiny rasterizer and PNG encoder for timeline scenes.
//!
//! A timeline is only axis-aligned rectangles and short labels, so instead of pulling in a
//! vector renderer and a font stack (resvg, tiny-skia, plotters and their font crates) we fill
//! rectangles on an RGB canvas, draw text with a built-in 3×5 pixel font scaled to the requested
//! size, and write the PNG ourselves: `IHDR`, one zlib `IDAT` (compressed by `miniz_oxide`, a small
//! pure-Rust crate that is the only dependency), `IEND`, each with its CRC-32.

use super::render::{Rgb, Scene, Shape};

/// 3×5 glyphs, rows top to bottom; lowercase letters are drawn as capitals.
const FONT: [(char, &str); 48] = [
    ('0', "111101101101111"),
    ('1', "010110010010111"),
    ('2', "111001111100111"),
    ('3', "111001111001111"),
    ('4', "101101111001001"),
    ('5', "111100111001111"),
    ('6', "111100111101111"),
    ('7', "111001010010010"),
    ('8', "111101111101111"),
    ('9', "111101111001111"),
    ('A', "010101111101101"),
    ('B', "110101110101110"),
    ('C', "011100100100011"),
    ('D', "110101101101110"),
    ('E', "111100110100111"),
    ('F', "111100110100100"),
    ('G', "011100101101011"),
    ('H', "101101111101101"),
    ('I', "111010010010111"),
    ('J', "001001001101010"),
    ('K', "101101110101101"),
    ('L', "100100100100111"),
    ('M', "101111111101101"),
    ('N', "110101101101101"),
    ('O', "010101101101010"),
    ('P', "110101110100100"),
    ('Q', "010101101110011"),
    ('R', "110101110101101"),
    ('S', "011100010001110"),
    ('T', "111010010010010"),
    ('U', "101101101101111"),
    ('V', "101101101101010"),
    ('W', "101101111111101"),
    ('X', "101101010101101"),
    ('Y', "101101010010010"),
    ('Z', "111001010100111"),
    ('.', "000000000000010"),
    (':', "000010000010000"),
    ('=', "000111000111000"),
    ('-', "000000111000000"),
    ('/', "001001010100100"),
    ('(', "010100100100010"),
    (')', "010001001001010"),
    (',', "000000000010100"),
    ('%', "101001010100101"),
    ('+', "000010111010000"),
    ('_', "000000000000111"),
    ('>', "100010001010100"),
];

struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn fill(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb) {
        let clampx = |v: f64| (v.round().max(0.0) as usize).min(self.width);
        let clampy = |v: f64| (v.round().max(0.0) as usize).min(self.height);
        let (x0, x1, y0, y1) = (clampx(x0), clampx(x1), clampy(y0), clampy(y1));
        for y in y0..y1 {
            let row = &mut self.rgb[(y * self.width + x0) * 3..(y * self.width + x1) * 3];
            row.chunks_exact_mut(3).for_each(|px| px.copy_from_slice(&c));
        }
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: Rgb, stroke: Option<Rgb>) {
        self.fill(x, y, x + w, y + h, fill);
        if let Some(s) = stroke.filter(|_| w >= 3.0) {
            self.fill(x, y, x + 1.0, y + h, s);
            self.fill(x + w - 1.0, y, x + w, y + h, s);
        }
    }

    /// A segment drawn by stamping `width`-pixel squares along it (one per pixel of length).
    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), width: f64, c: Rgb) {
        let steps = (x2 - x1).abs().max((y2 - y1).abs()).ceil().clamp(1.0, 1e5) as usize;
        let h = width.max(1.0) / 2.0;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (x1 + (x2 - x1) * t, y1 + (y2 - y1) * t);
            self.fill(x - h, y - h, x + h, y + h, c);
        }
    }

    fn text(&mut self, x: f64, baseline: f64, size: f64, centered: bool, text: &str, c: Rgb) {
        let s = (size / 7.0).round().max(1.0);
        let width = text.chars().count() as f64 * 4.0 * s - s;
        let left = if centered { x - width / 2.0 } else { x };
        let top = baseline - 5.0 * s;
        for (i, ch) in text.chars().enumerate() {
            let Some((_, bits)) = FONT.iter().find(|(g, _)| *g == ch.to_ascii_uppercase()) else {
                continue;
            };
            let gx = left + i as f64 * 4.0 * s;
            for (k, bit) in bits.bytes().enumerate() {
                if bit == b'1' {
                    let (px, py) = (gx + (k % 3) as f64 * s, top + (k / 3) as f64 * s);
                    self.fill(px, py, px + s, py + s, c);
                }
            }
        }
    }
}

/// Rasterize a scene to PNG bytes.
pub(crate) fn rasterize(scene: &Scene) -> Vec<u8> {
    let (width, height) = (scene.width as usize, scene.height as usize);
    let mut canvas = Canvas { width, height, rgb: vec![255; width * height * 3] };
    for shape in &scene.shapes {
        match shape {
            Shape::Rect { x, y, w, h, fill, stroke } => canvas.rect(*x, *y, *w, *h, *fill, *stroke),
            Shape::Line { x1, y1, x2, y2, width, color } => {
                canvas.line((*x1, *y1), (*x2, *y2), *width, *color)
            }
            Shape::Text { x, y, size, centered, text, color } => {
                canvas.text(*x, *y, *size, *centered, text, *color)
            }
        }
    }
    encode_png(scene.width, scene.height, &canvas.rgb)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Encode an 8-bit RGB image (`rgb.len() == 3·width·height`, row-major) as PNG.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let stride = width as usize * 3;
    let mut raw = Vec::with_capacity((stride + 1) * height as usize);
    for row in rgb.chunks(stride.max(1)).take(height as usize) {
        raw.push(0); // filter type None
        raw.extend_from_slice(row);
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, adaptive filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6));
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn png_decodes_back_to_the_pixels() {
        let scene = Scene {
            width: 5,
            height: 3,
            shapes: vec![Shape::Rect { x: 1.0, y: 1.0, w: 2.0, h: 1.0, fill: [10, 20, 30], stroke: None }],
        };
        let png = rasterize(&scene);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[16..24], &[0, 0, 0, 5, 0, 0, 0, 3]);
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&png[41..41 + idat_len]).unwrap();
        assert_eq!(raw.len(), 3 * (1 + 15));
        let px = |x: usize, y: usize| &raw[y * 16 + 1 + 3 * x..y * 16 + 4 + 3 * x];
        assert_eq!(px(1, 1), [10, 20, 30]);
        assert_eq!(px(2, 1), [10, 20, 30]);
        assert_eq!(px(3, 1), [255, 255, 255]);
        assert_eq!(px(1, 0), [255, 255, 255]);
    }

    #[test]
    fn every_glyph_is_3_by_5() {
        assert!(
            FONT.iter().all(|(_, bits)| bits.len() == 15 && bits.bytes().all(|b| b == b'0' || b == b'1'))
        );
    }
}
