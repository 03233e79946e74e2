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

/// Normalised weights.
///
/// # Errors
/// `BadConfig` if the weights are empty, negative, non-finite or all zero.
pub fn normalize_weights(weights: &[f64]) -> Result<Vec<f64>, DatasetError> {
    let sum: f64 = weights.iter().sum();
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

    #[test]
    fn margin_matches_megatron() {
        assert_eq!(samples_per_dataset(1000, 0.3), 302);
        assert!(normalize_weights(&[0.0, 0.0]).is_err());
        assert!(normalize_weights(&[-1.0, 2.0]).is_err());
    }
}
