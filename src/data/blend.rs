//! Blends of several GPT datasets with weights (`--data-path 0.3 a 0.7 b`), Megatron's way.
//!
//! Weights are normalised to sum to one. Each dataset is asked for
//! `ceil(ceil(n · w) · 1.005)` samples (Megatron's 0.5% margin), and sample `i` of the blend is
//! drawn from the dataset whose share is most behind: `argmax_d (w_d · max(i, 1) − taken_d)`,
//! ties to the lowest index. This is deterministic (no RNG), so after any prefix of `i` samples
//! each dataset has supplied within one sample of `w_d · i`. Without weights, each dataset's
//! weight is its number of samples (one epoch), which concatenates them in proportion.

use std::path::Path;
use std::sync::Arc;

use super::gpt_dataset::{DatasetError, GptDataset, GptDatasetConfig};
use super::indexed::IndexedDataset;
use super::split::{BlendEntry, Split};

/// Anything that hands out fixed-length token samples by index (one dataset or a blend).
pub trait SampleSource: Send + Sync {
    /// Number of samples.
    fn num_samples(&self) -> usize;
    /// Token ids per sample (`seq_length + 1`).
    fn sample_tokens(&self) -> usize;
    /// Replaces `out` with the tokens of sample `i`.
    ///
    /// # Errors
    /// `SampleOutOfRange` or an I/O-level dataset error.
    fn sample_into(&self, i: usize, out: &mut Vec<u32>) -> Result<(), DatasetError>;
}

impl SampleSource for GptDataset {
    fn num_samples(&self) -> usize {
        self.len()
    }
    fn sample_tokens(&self) -> usize {
        GptDataset::sample_tokens(self)
    }
    fn sample_into(&self, i: usize, out: &mut Vec<u32>) -> Result<(), DatasetError> {
        GptDataset::sample_into(self, i, out)
    }
}

/// For each blend sample, which dataset supplies it and that dataset's sample number.
pub fn build_blending_indices(weights: &[f64], size: usize) -> (Vec<u16>, Vec<u64>) {
    let mut taken = vec![0u64; weights.len()];
    let mut dataset_index = Vec::with_capacity(size);
    let mut dataset_sample_index = Vec::with_capacity(size);
    for i in 0..size {
        let target = (i as f64).max(1.0);
        let mut best = 0usize;
        let mut best_error = f64::NEG_INFINITY;
        for (d, &w) in weights.iter().enumerate() {
            let error = w * target - taken[d] as f64;
            if error > best_error {
                best = d;
                best_error = error;
            }
        }
        dataset_index.push(best as u16);
        dataset_sample_index.push(taken[best]);
        taken[best] += 1;
    }
    (dataset_index, dataset_sample_index)
}

/// The sum of `v` as NumPy's `numpy.sum` adds float64s (its pairwise summation: fewer than 8
/// values in order; up to 128 in eight running sums combined pairwise, the rest in order; more
/// split in two at a multiple of 8), so blend weights normalise to Megatron's bits.
pub fn numpy_sum(v: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = v.len();
    if n < 8 {
        return v.iter().fold(0.0, |acc, &x| acc + x);
    }
    if n <= BLOCK {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&v[..8]);
        let mut i = 8;
        while i + 8 <= n {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += v[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &v[i..] {
            res += x;
        }
        return res;
    }
    let mut half = n / 2;
    half -= half % 8;
    numpy_sum(&v[..half]) + numpy_sum(&v[half..])
}

/// Normalised weights (each divided by their [`numpy_sum`], as Megatron's `normalize`).
///
/// # Errors
/// `BadConfig` if the weights are empty, negative, non-finite or all zero.
pub fn normalize_weights(weights: &[f64]) -> Result<Vec<f64>, DatasetError> {
    let sum = numpy_sum(weights);
    if weights.is_empty() || weights.iter().any(|w| !w.is_finite() || *w < 0.0) || sum <= 0.0 {
        return Err(DatasetError::BadConfig {
            reason: format!("blend weights {weights:?} must be finite, ≥ 0 and not all zero"),
        });
    }
    Ok(weights.iter().map(|w| w / sum).collect())
}

/// Megatron's per-dataset request for a blend of `num_samples` with normalised weight `weight`.
pub fn samples_per_dataset(num_samples: u64, weight: f64) -> u64 {
    ((num_samples as f64 * weight).ceil() * 1.005).ceil() as u64
}

/// A weighted blend of GPT datasets.
#[derive(Debug)]
pub struct BlendedDataset {
    datasets: Vec<GptDataset>,
    weights: Vec<f64>,
    dataset_index: Vec<u16>,
    dataset_sample_index: Vec<u64>,
}

impl BlendedDataset {
    /// Opens every prefix of `entries` and builds split `split` of each, blended to
    /// `num_samples` samples.
    ///
    /// # Errors
    /// An unreadable dataset, a bad split, or a dataset too small for its share.
    pub fn build(
        entries: &[BlendEntry],
        split: Split,
        num_samples: u64,
        config: &GptDatasetConfig,
    ) -> Result<Self, DatasetError> {
        if entries.len() > u16::MAX as usize {
            return Err(DatasetError::BadConfig {
                reason: format!("{} datasets in a blend; at most 65535", entries.len()),
            });
        }
        let open = |prefix: &Path| IndexedDataset::open(prefix).map(Arc::new);
        let weighted = entries.iter().all(|e| e.weight.is_some());
        let mut datasets = Vec::with_capacity(entries.len());
        if weighted {
            let raw: Vec<f64> = entries.iter().map(|e| e.weight.unwrap_or(0.0)).collect();
            let weights = normalize_weights(&raw)?;
            for (entry, &w) in entries.iter().zip(&weights) {
                let want = samples_per_dataset(num_samples, w);
                datasets.push(GptDataset::build(open(&entry.prefix)?, split, Some(want), config)?);
            }
            Self::from_datasets(datasets, weights, num_samples)
        } else {
            for entry in entries {
                datasets.push(GptDataset::build(open(&entry.prefix)?, split, None, config)?);
            }
            let sizes: Vec<f64> = datasets.iter().map(|d| d.len() as f64).collect();
            let weights = normalize_weights(&sizes)?;
            // More samples than one epoch of every dataset: rebuild each with its share (more
            // epochs), keeping the size-proportional weights.
            let needs_epochs = datasets
                .iter()
                .zip(&weights)
                .any(|(d, &w)| samples_per_dataset(num_samples, w) > d.len() as u64);
            if needs_epochs {
                datasets = entries
                    .iter()
                    .zip(&weights)
                    .map(|(entry, &w)| {
                        let want = samples_per_dataset(num_samples, w);
                        GptDataset::build(open(&entry.prefix)?, split, Some(want), config)
                    })
                    .collect::<Result<_, _>>()?;
            }
            Self::from_datasets(datasets, weights, num_samples)
        }
    }

    /// Blends already-built datasets with (unnormalised) `weights` to `num_samples` samples.
    ///
    /// # Errors
    /// `BadConfig` for bad weights, a count mismatch, or a dataset smaller than its share.
    pub fn from_datasets(
        datasets: Vec<GptDataset>,
        weights: Vec<f64>,
        num_samples: u64,
    ) -> Result<Self, DatasetError> {
        if datasets.len() != weights.len() {
            return Err(DatasetError::BadConfig {
                reason: format!("{} datasets but {} weights", datasets.len(), weights.len()),
            });
        }
        let weights = normalize_weights(&weights)?;
        let (dataset_index, dataset_sample_index) = build_blending_indices(&weights, num_samples as usize);
        let mut needed = vec![0u64; datasets.len()];
        for (&d, &s) in dataset_index.iter().zip(&dataset_sample_index) {
            needed[d as usize] = needed[d as usize].max(s + 1);
        }
        for (d, dataset) in datasets.iter().enumerate() {
            if needed[d] > dataset.len() as u64 {
                return Err(DatasetError::BadConfig {
                    reason: format!(
                        "blend dataset {d} ({}) has {} samples but its share needs {}",
                        dataset.data().idx_path().display(),
                        dataset.len(),
                        needed[d]
                    ),
                });
            }
        }
        let tokens = datasets.first().map(|d| d.sample_tokens());
        if datasets.iter().any(|d| Some(d.sample_tokens()) != tokens) {
            return Err(DatasetError::BadConfig {
                reason: "blended datasets must share one sequence length".to_owned(),
            });
        }
        Ok(BlendedDataset { datasets, weights, dataset_index, dataset_sample_index })
    }

    /// Number of samples in the blend.
    pub fn len(&self) -> usize {
        self.dataset_index.len()
    }

    /// Whether the blend has no samples.
    pub fn is_empty(&self) -> bool {
        self.dataset_index.is_empty()
    }

    /// The normalised weights.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The blended datasets.
    pub fn datasets(&self) -> &[GptDataset] {
        &self.datasets
    }

    /// Which dataset supplies sample `i`, and its sample number there.
    pub fn source_of(&self, i: usize) -> Option<(usize, u64)> {
        Some((*self.dataset_index.get(i)? as usize, *self.dataset_sample_index.get(i)?))
    }
}

impl SampleSource for BlendedDataset {
    fn num_samples(&self) -> usize {
        self.len()
    }
    fn sample_tokens(&self) -> usize {
        self.datasets.first().map_or(0, |d| d.sample_tokens())
    }
    fn sample_into(&self, i: usize, out: &mut Vec<u32>) -> Result<(), DatasetError> {
        let (d, s) = self.source_of(i).ok_or(DatasetError::SampleOutOfRange { index: i, len: self.len() })?;
        self.datasets[d].sample_into(s as usize, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blending_follows_weights_closely_at_every_prefix() {
        let weights = normalize_weights(&[0.3, 0.7]).unwrap();
        let (di, dsi) = build_blending_indices(&weights, 1000);
        let mut taken = [0u64; 2];
        for (i, (&d, &s)) in di.iter().zip(&dsi).enumerate() {
            assert_eq!(s, taken[d as usize]);
            taken[d as usize] += 1;
            let n = (i + 1) as f64;
            for k in 0..2 {
                assert!((taken[k] as f64 - weights[k] * n).abs() <= 1.0 + 1e-9, "i={i}");
            }
        }
        assert_eq!(taken, [300, 700]);
    }

    /// Normalised weights, per-dataset requests and blending indices equal Megatron's
    /// (`tests/fixtures/megatron_gpt_indices.json`, from `tools/reference/megatron_gpt_indices.py`).
    #[test]
    fn blends_are_megatrons() {
        use crate::data::rng::tests::{fixture, list};
        let fixture = fixture();
        let blends = fixture["blends"].as_array().unwrap();
        assert_eq!(blends.len(), 6);
        for b in blends {
            let raw: Vec<f64> =
                b["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
            let size = b["size"].as_u64().unwrap();
            let weights = normalize_weights(&raw).unwrap();
            let want: Vec<f64> =
                b["normalized"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
            assert_eq!(weights, want, "{raw:?}");
            let per: Vec<u64> = weights.iter().map(|&w| samples_per_dataset(size, w)).collect();
            assert_eq!(per, list(&b["per_dataset"]), "{raw:?}");
            let (di, dsi) = build_blending_indices(&weights, size as usize);
            let di: Vec<u64> = di.into_iter().map(u64::from).collect();
            assert_eq!(di, list(&b["dataset_index"]), "{raw:?}: dataset index");
            assert_eq!(dsi, list(&b["dataset_sample_index"]), "{raw:?}: dataset sample index");
        }
    }

    #[test]
    fn margin_matches_megatron() {
        assert_eq!(samples_per_dataset(1000, 0.3), 302);
        assert!(normalize_weights(&[0.0, 0.0]).is_err());
        assert!(normalize_weights(&[-1.0, 2.0]).is_err());
    }
}
