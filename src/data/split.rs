//! Train/valid/test splits and `--data-path` blends, parsed the way Megatron parses them.
//!
//! A split string such as `"949,50,1"` gives up to three non-negative numbers (pulled out of the
//! string as runs of digits and dots, padded with zeros to three) normalised to sum to one. They
//! become cumulative bookends `[(0, a), (a, a+b), (a+b, 1)]`; a split whose bookends coincide is
//! empty. For N sequences a split covers `round(lo·N)..round(hi·N)`, with Python's rounding (half
//! to even), so troupe's ranges equal Megatron's for the same N and string.

use std::ops::Range;
use std::path::PathBuf;

/// Errors of parsing a split string or a `--data-path` list.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SplitError {
    #[error("split {input:?}: {reason}")]
    BadSplit { input: String, reason: String },
    #[error("--data-path: {reason}")]
    BadDataPath { reason: String },
}

/// One of the three dataset splits (Megatron's `Split` enum order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train = 0,
    Valid = 1,
    Test = 2,
}

impl Split {
    /// All splits in index order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    /// Megatron's lower-case name of the split.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// The normalised weights of a split string.
///
/// # Errors
/// [`SplitError::BadSplit`] for more than three numbers, an unparseable number, or an all-zero
/// split.
pub fn parse_split(input: &str) -> Result<[f64; 3], SplitError> {
    let bad = |reason: String| SplitError::BadSplit { input: input.to_owned(), reason };
    let mut weights = Vec::new();
    for token in input.split(|c: char| !(c.is_ascii_digit() || c == '.')).filter(|t| !t.is_empty()) {
        let value: f64 = token.parse().map_err(|_| bad(format!("{token:?} is not a number")))?;
        weights.push(value);
    }
    if weights.len() > 3 {
        return Err(bad(format!("{} numbers given; at most three (train, valid, test)", weights.len())));
    }
    weights.resize(3, 0.0);
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 || !sum.is_finite() {
        return Err(bad("the weights must not all be zero".to_owned()));
    }
    Ok([weights[0] / sum, weights[1] / sum, weights[2] / sum])
}

/// The bookends `(lo, hi)` of each split, `None` for an empty one.
pub fn split_matrix(weights: [f64; 3]) -> [Option<(f64, f64)>; 3] {
    let mut bookends = [0.0f64; 4];
    for i in 0..3 {
        bookends[i + 1] = bookends[i] + weights[i];
    }
    std::array::from_fn(|i| (bookends[i] != bookends[i + 1]).then_some((bookends[i], bookends[i + 1])))
}

/// The sequence range of a split with bookends `(lo, hi)` over `n` sequences.
pub fn split_range(bookends: (f64, f64), n: usize) -> Range<usize> {
    let at = |x: f64| ((x * n as f64).round_ties_even().max(0.0) as usize).min(n);
    at(bookends.0)..at(bookends.1)
}

/// The range of sequences `split` covers for split string `split_string` over `n` sequences.
///
/// # Errors
/// As [`parse_split`].
pub fn split_indices(split_string: &str, split: Split, n: usize) -> Result<Range<usize>, SplitError> {
    let matrix = split_matrix(parse_split(split_string)?);
    Ok(match matrix[split as usize] {
        Some(bookends) => split_range(bookends, n),
        None => 0..0,
    })
}

/// One dataset of a blend: its prefix and its (not yet normalised) weight.
#[derive(Debug, Clone, PartialEq)]
pub struct BlendEntry {
    pub weight: Option<f64>,
    pub prefix: PathBuf,
}

/// Parses `--data-path` values: either `W1 P1 W2 P2 …` (weights, not necessarily normalised) or
/// a list of prefixes without weights (Megatron's `get_blend_from_list`).
///
/// # Errors
/// [`SplitError::BadDataPath`] for an empty list or a negative / non-finite / all-zero weight.
pub fn parse_data_path(values: &[String]) -> Result<Vec<BlendEntry>, SplitError> {
    let bad = |reason: &str| SplitError::BadDataPath { reason: reason.to_owned() };
    if values.is_empty() {
        return Err(bad("no dataset prefix given"));
    }
    let weighted = values.len().is_multiple_of(2)
        && values.len() >= 2
        && values.iter().step_by(2).all(|v| v.parse::<f64>().is_ok());
    if !weighted {
        return Ok(values.iter().map(|v| BlendEntry { weight: None, prefix: PathBuf::from(v) }).collect());
    }
    let mut out = Vec::new();
    for pair in values.chunks(2) {
        let weight: f64 = pair[0].parse().map_err(|_| bad("unparseable weight"))?;
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(SplitError::BadDataPath {
                reason: format!("weight {weight} for {} must be ≥ 0", pair[1]),
            });
        }
        out.push(BlendEntry { weight: Some(weight), prefix: PathBuf::from(&pair[1]) });
    }
    if out.iter().all(|e| e.weight == Some(0.0)) {
        return Err(bad("the weights must not all be zero"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_examples() {
        let w = parse_split("949,50,1").unwrap();
        assert!((w[0] - 0.949).abs() < 1e-12 && (w[2] - 0.001).abs() < 1e-12);
        assert_eq!(parse_split("969, 30, 1").unwrap()[1], 0.03);
        assert_eq!(parse_split("1").unwrap(), [1.0, 0.0, 0.0]);
        assert_eq!(parse_split("98,2").unwrap()[2], 0.0);
        assert!(parse_split("1,2,3,4").is_err());
        assert!(parse_split("0,0,0").is_err());
        assert!(parse_split("1.2.3").is_err());
    }

    #[test]
    fn ranges_partition_and_round_half_to_even() {
        let n = 1000;
        let r: Vec<_> = Split::ALL.iter().map(|&s| split_indices("949,50,1", s, n).unwrap()).collect();
        assert_eq!(r, vec![0..949, 949..999, 999..1000]);
        // 0.5·5 = 2.5 rounds to 2 (Python's round), not 3.
        assert_eq!(split_indices("1,1", Split::Train, 5).unwrap(), 0..2);
        assert_eq!(split_indices("1,0,0", Split::Valid, 5).unwrap(), 0..0);
    }

    #[test]
    fn data_path_forms() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let blend = parse_data_path(&v(&["0.3", "a", "0.7", "b"])).unwrap();
        assert_eq!(blend.len(), 2);
        assert_eq!(blend[1].weight, Some(0.7));
        let plain = parse_data_path(&v(&["a", "b"])).unwrap();
        assert!(plain.iter().all(|e| e.weight.is_none()));
        assert_eq!(parse_data_path(&v(&["only"])).unwrap()[0].weight, None);
        assert!(parse_data_path(&v(&["-1", "a", "1", "b"])).is_err());
        assert!(parse_data_path(&[]).is_err());
    }
}
