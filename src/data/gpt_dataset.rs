//! Megatron-style GPT dataset over an indexed dataset: one split, its cached index arrays, and
//! sample access.
//!
//! A sample is `seq_length + 1` token ids (inputs are the first `seq_length`, labels the last
//! `seq_length`). The index arrays (see [`super::gpt_index`]) are cached next to the data, by
//! default in `<dirname(prefix)>/cache/GPTDataset_indices/`, as
//! `<hash>-GPTDataset-<split>-{description.txt,document_index.npy,sample_index.npy,
//! shuffle_index.npy}` — Megatron's names, except that `<hash>` is a 64-bit FNV-1a of the
//! description (not MD5). The description lists every parameter the arrays depend on (prefix,
//! dataset size, split, seed, sequence length, requested samples, RNG version), so changing any of
//! them selects other files and the arrays are rebuilt. A cache entry is trusted only when its
//! description matches byte for byte and its arrays are consistent; otherwise it is rebuilt.
//! Files are written under temporary names and renamed, the description last, so concurrent
//! builders (several ranks) never see a half-written entry.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::gpt_index::{GptIndices, IndexBuildError, build_gpt_indices};
use super::indexed::{IndexError, IndexedDataset};
use super::npy::{NpyError, read_npy, write_atomic, write_npy};
use super::rng::RNG_NAME;
use super::split::{Split, SplitError, parse_split, split_matrix, split_range};

/// Errors of building or reading a GPT dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Split(#[from] SplitError),
    #[error("{path}: {split} split: {source}")]
    Build {
        path: PathBuf,
        split: &'static str,
        #[source]
        source: IndexBuildError,
    },
    #[error("sample {index} out of range: the dataset has {len} samples")]
    SampleOutOfRange { index: usize, len: usize },
    #[error("{reason}")]
    BadConfig { reason: String },
}

/// Where the index arrays are cached.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IndexCache {
    /// `<dirname(prefix)>/cache/GPTDataset_indices/` (Megatron's default).
    #[default]
    BesideData,
    /// An explicit directory (Megatron's `--data-cache-path`).
    Dir(PathBuf),
    /// Build in memory every time.
    Off,
}

/// What happened to the index cache when a dataset was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    Loaded(PathBuf),
    Built(PathBuf),
    /// Built in memory; the reason it was not written (cache off or directory unwritable).
    NotCached(String),
}

/// Parameters of a GPT dataset (Megatron option names in brackets).
#[derive(Debug, Clone, PartialEq)]
pub struct GptDatasetConfig {
    /// Tokens per sample without the extra label token (`--seq-length`).
    pub seq_length: usize,
    /// Seed of the document and sample shuffles (`--seed`, Megatron's default 1234).
    pub seed: u64,
    /// Split string (`--split`, e.g. `"949,50,1"`).
    pub split: String,
    /// Add one token per sample so labels are the inputs shifted by one (Megatron's default).
    pub add_extra_token: bool,
    /// Where index arrays are cached.
    pub cache: IndexCache,
}

impl Default for GptDatasetConfig {
    fn default() -> Self {
        GptDatasetConfig {
            seq_length: 1024,
            seed: 1234,
            split: "969,30,1".to_owned(),
            add_extra_token: true,
            cache: IndexCache::BesideData,
        }
    }
}

/// One split of a GPT dataset: samples of `seq_length + 1` tokens.
#[derive(Debug)]
pub struct GptDataset {
    data: Arc<IndexedDataset>,
    split: Split,
    range: Range<usize>,
    seq_length: usize,
    add_extra_token: bool,
    indices: GptIndices,
    cache: CacheOutcome,
}

/// 64-bit FNV-1a, the cache key of a description.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The dataset prefix of an opened dataset (its `.idx` path without the extension).
fn prefix_of(data: &IndexedDataset) -> PathBuf {
    data.idx_path().with_extension("")
}

impl GptDataset {
    /// Builds (or loads from the cache) split `split` of `data` with at least `num_samples`
    /// samples (`None`: one epoch).
    ///
    /// # Errors
    /// A bad split string, a split without enough tokens for one sample, or `seq_length` 0.
    /// Cache problems are not errors: the arrays are then built in memory.
    pub fn build(
        data: Arc<IndexedDataset>,
        split: Split,
        num_samples: Option<u64>,
        config: &GptDatasetConfig,
    ) -> Result<Self, DatasetError> {
        let matrix = split_matrix(parse_split(&config.split)?);
        let range = match matrix[split as usize] {
            Some(bookends) => split_range(bookends, data.len()),
            None => 0..0,
        };
        let description = describe(&data, split, &range, num_samples, config, &matrix);
        let base = match &config.cache {
            IndexCache::Off => None,
            IndexCache::Dir(dir) => Some(dir.clone()),
            IndexCache::BesideData => Some(
                prefix_of(&data).parent().unwrap_or(Path::new(".")).join("cache").join("GPTDataset_indices"),
            ),
        };
        let stem = format!("{:016x}-GPTDataset-{}", fnv1a64(description.as_bytes()), split.name());
        if let Some(dir) = &base
            && let Some(indices) = load_cached(dir, &stem, &description, data.len())
        {
            let cache = CacheOutcome::Loaded(dir.join(format!("{stem}-description.txt")));
            return Ok(Self::assemble(data, split, range, config, indices, cache));
        }
        let sizes = data.sequence_lengths();
        let (indices, _plan) = build_gpt_indices(
            &sizes,
            range.clone(),
            config.seq_length as u64,
            num_samples,
            config.seed,
            config.add_extra_token,
        )
        .map_err(|source| DatasetError::Build {
            path: prefix_of(&data),
            split: split.name(),
            source,
        })?;
        let cache = match &base {
            None => CacheOutcome::NotCached("index cache disabled".to_owned()),
            Some(dir) => match store_cached(dir, &stem, &description, &indices) {
                Ok(path) => CacheOutcome::Built(path),
                Err(err) => {
                    tracing::warn!("index arrays not cached: {err}");
                    CacheOutcome::NotCached(err.to_string())
                }
            },
        };
        Ok(Self::assemble(data, split, range, config, indices, cache))
    }

    fn assemble(
        data: Arc<IndexedDataset>,
        split: Split,
        range: Range<usize>,
        config: &GptDatasetConfig,
        indices: GptIndices,
        cache: CacheOutcome,
    ) -> Self {
        GptDataset {
            data,
            split,
            range,
            seq_length: config.seq_length,
            add_extra_token: config.add_extra_token,
            indices,
            cache,
        }
    }

    /// Number of samples (may exceed the number requested: whole epochs are indexed).
    pub fn len(&self) -> usize {
        self.indices.num_samples()
    }

    /// Whether the dataset has no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per sample handed to the model (inputs).
    pub fn seq_length(&self) -> usize {
        self.seq_length
    }

    /// Tokens [`GptDataset::sample_into`] produces per sample (`seq_length` + extra token).
    pub fn sample_tokens(&self) -> usize {
        self.seq_length + usize::from(self.add_extra_token)
    }

    /// Which split this is.
    pub fn split(&self) -> Split {
        self.split
    }

    /// The sequence ids this split covers.
    pub fn sequence_range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The index arrays.
    pub fn indices(&self) -> &GptIndices {
        &self.indices
    }

    /// Whether the arrays came from the cache, were built and cached, or were not cached.
    pub fn cache_outcome(&self) -> &CacheOutcome {
        &self.cache
    }

    /// The underlying indexed dataset.
    pub fn data(&self) -> &Arc<IndexedDataset> {
        &self.data
    }

    /// Replaces `out` with the tokens of sample `i` (`sample_tokens()` ids, spanning documents).
    ///
    /// # Errors
    /// `SampleOutOfRange` for `i >= len()`; an [`IndexError`] if the data cannot be read.
    pub fn sample_into(&self, i: usize, out: &mut Vec<u32>) -> Result<(), DatasetError> {
        if i >= self.len() {
            return Err(DatasetError::SampleOutOfRange { index: i, len: self.len() });
        }
        out.clear();
        let ix = &self.indices;
        let j = ix.shuffle_index.get(i) as usize;
        let (pos_b, off_b) = (ix.sample_index.get(2 * j), ix.sample_index.get(2 * j + 1));
        let (pos_e, off_e) = (ix.sample_index.get(2 * j + 2), ix.sample_index.get(2 * j + 3));
        let extra = usize::from(self.add_extra_token);
        let doc = |pos: u64| ix.document_index.get(pos as usize) as usize;
        if pos_b == pos_e {
            let len = (off_e - off_b) as usize + extra;
            self.data.read_into(doc(pos_b), off_b as usize, len, out)?;
        } else {
            let first = doc(pos_b);
            // Saturating: a bad offset then fails inside read_into with a named range error.
            let first_len = (self.data.sequence_length(first) as usize).saturating_sub(off_b as usize);
            self.data.read_into(first, off_b as usize, first_len, out)?;
            for pos in pos_b + 1..pos_e {
                let d = doc(pos);
                self.data.read_into(d, 0, self.data.sequence_length(d) as usize, out)?;
            }
            self.data.read_into(doc(pos_e), 0, off_e as usize + extra, out)?;
        }
        debug_assert_eq!(out.len(), self.sample_tokens());
        Ok(())
    }

    /// The tokens of sample `i`.
    ///
    /// # Errors
    /// As [`GptDataset::sample_into`].
    pub fn sample(&self, i: usize) -> Result<Vec<u32>, DatasetError> {
        let mut out = Vec::with_capacity(self.sample_tokens());
        self.sample_into(i, &mut out)?;
        Ok(out)
    }
}

/// Inputs, labels and loss mask of one sample of `seq_length + 1` tokens (Megatron's
/// `__getitem__`): inputs are `tokens[..T]`, labels `tokens[1..]`; the mask is 1.0 except, with
/// `eod_mask_loss`, at positions whose input is the EOD token.
pub fn inputs_labels_mask(
    tokens: &[u32],
    eod: Option<u32>,
    eod_mask_loss: bool,
) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let t = tokens.len().saturating_sub(1);
    let inputs = tokens[..t].to_vec();
    let labels = tokens.get(1..).unwrap_or(&[]).to_vec();
    let mask = inputs.iter().map(|&x| if eod_mask_loss && Some(x) == eod { 0.0 } else { 1.0 }).collect();
    (inputs, labels, mask)
}

fn describe(
    data: &IndexedDataset,
    split: Split,
    range: &Range<usize>,
    num_samples: Option<u64>,
    config: &GptDatasetConfig,
    matrix: &[Option<(f64, f64)>; 3],
) -> String {
    let matrix: Vec<serde_json::Value> = matrix
        .iter()
        .map(|m| match m {
            Some((lo, hi)) => serde_json::json!([lo, hi]),
            None => serde_json::Value::Null,
        })
        .collect();
    let value = serde_json::json!({
        "class": "GPTDataset",
        "format": "troupe-gpt-indices/v1",
        "dataset_path": prefix_of(data).display().to_string(),
        "dataset_sequences": data.len(),
        "dataset_documents": data.num_documents(),
        "dataset_bin_bytes": data.bin_len(),
        "index_split": split.name(),
        "split": config.split,
        "split_matrix": matrix,
        "split_range": [range.start, range.end],
        "num_samples": num_samples,
        "random_seed": config.seed,
        "sequence_length": config.seq_length,
        "add_extra_token": config.add_extra_token,
        "rng": RNG_NAME,
    });
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

const ARRAYS: [&str; 3] = ["document_index", "sample_index", "shuffle_index"];

fn load_cached(dir: &Path, stem: &str, description: &str, sequence_count: usize) -> Option<GptIndices> {
    let stored = std::fs::read_to_string(dir.join(format!("{stem}-description.txt"))).ok()?;
    if stored != description {
        return None;
    }
    let mut arrays = Vec::with_capacity(3);
    for name in ARRAYS {
        match read_npy(&dir.join(format!("{stem}-{name}.npy"))) {
            Ok((array, _shape)) => arrays.push(array),
            Err(err) => {
                tracing::warn!("rebuilding index arrays: {err}");
                return None;
            }
        }
    }
    let mut it = arrays.into_iter();
    let indices =
        GptIndices { document_index: it.next()?, sample_index: it.next()?, shuffle_index: it.next()? };
    if !indices.is_consistent(sequence_count) {
        tracing::warn!("rebuilding index arrays: cached arrays in {} are inconsistent", dir.display());
        return None;
    }
    Some(indices)
}

fn store_cached(
    dir: &Path,
    stem: &str,
    description: &str,
    indices: &GptIndices,
) -> Result<PathBuf, NpyError> {
    std::fs::create_dir_all(dir).map_err(|source| NpyError::Io { path: dir.to_owned(), source })?;
    let arrays = [(&indices.document_index, 1), (&indices.sample_index, 2), (&indices.shuffle_index, 1)];
    for (name, (array, cols)) in ARRAYS.iter().zip(arrays) {
        write_npy(&dir.join(format!("{stem}-{name}.npy")), array, cols)?;
    }
    let path = dir.join(format!("{stem}-description.txt"));
    write_atomic(&path, description.as_bytes())
        .map_err(|source| NpyError::Io { path: path.clone(), source })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_labels_shifted_and_eod_can_be_masked() {
        let (x, y, m) = inputs_labels_mask(&[5, 6, 0, 7], Some(0), true);
        assert_eq!((x, y), (vec![5, 6, 0], vec![6, 0, 7]));
        assert_eq!(m, vec![1.0, 1.0, 0.0]);
        let (_, _, m) = inputs_labels_mask(&[5, 0, 7], Some(0), false);
        assert_eq!(m, vec![1.0, 1.0]);
        assert_eq!(inputs_labels_mask(&[], None, false).0, Vec::<u32>::new());
    }
}
