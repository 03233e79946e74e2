//! The three index arrays of a Megatron GPT dataset, built from sequence lengths (pure logic, no
//! I/O).
//!
//! Vocabulary: a *sequence* is one entry of the indexed dataset (one document with
//! document-level preprocessing); a *sample* is `seq_length + 1` consecutive tokens (with
//! `add_extra_token`) that may span sequences; consecutive samples overlap by one token so that
//! every token is once a label.
//!
//! * `document_index` (int32, or int64 if large): the split's sequence ids tiled `num_epochs`
//!   times and shuffled. When more than one epoch is needed and the last one would supply fewer
//!   than 80% of an epoch's samples, the first `num_epochs − 1` epochs and the last one are
//!   shuffled separately and concatenated (`separate_final_epoch`), so the partial epoch does not
//!   bias which documents are seen twice.
//! * `sample_index` (shape `[num_samples + 1, 2]`): row j is (position in document_index, token
//!   offset) where sample j starts; sample j ends at row j+1's position, inclusive of one extra
//!   token.
//! * `shuffle_index` (uint32, or int64 if large): a permutation of the samples, shuffled
//!   separately before and after the final-epoch boundary when `separate_final_epoch`.
//!
//! One [`Rng`] seeded with the dataset seed makes the document shuffle(s) and then the sample
//! shuffle(s), in that order (as Megatron does with one `RandomState`).

use std::ops::Range;

use super::npy::IndexArray;
use super::rng::Rng;

/// Why the index arrays cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexBuildError {
    #[error("sequence range {range:?} holds no tokens (at least {need} are needed for one sample)")]
    NoTokens { range: Range<usize>, need: u64 },
    #[error("seq_length must be at least 1")]
    ZeroSeqLength,
    #[error("sequence range {range:?} reaches past the {count} sequences of the dataset")]
    RangeOutOfBounds { range: Range<usize>, count: usize },
    #[error("the index needs {epochs} epochs of {tokens} tokens, more than can be addressed")]
    TooLarge { epochs: u64, tokens: u64 },
    #[error(transparent)]
    Seed(#[from] super::rng::SeedError),
}

/// How many epochs a request needs and how the last one is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochPlan {
    pub tokens_per_epoch: u64,
    pub num_epochs: u64,
    /// Samples requested (`None`: exactly one epoch's worth).
    pub num_samples: Option<u64>,
    pub separate_final_epoch: bool,
    /// Samples that fit in the first `num_epochs − 1` epochs.
    pub samples_sans_final_epoch: u64,
}

/// Plans the epochs for `num_samples` samples of `seq_length` from a split of
/// `tokens_per_epoch` tokens.
///
/// # Errors
/// `ZeroSeqLength`, or `NoTokens` if the split cannot supply one sample.
pub fn plan_epochs(
    tokens_per_epoch: u64,
    seq_length: u64,
    num_samples: Option<u64>,
    add_extra_token: bool,
    range: Range<usize>,
) -> Result<EpochPlan, IndexBuildError> {
    if seq_length == 0 {
        return Err(IndexBuildError::ZeroSeqLength);
    }
    let extra = u64::from(add_extra_token);
    if tokens_per_epoch < seq_length + extra {
        return Err(IndexBuildError::NoTokens { range, need: seq_length + extra });
    }
    let num_epochs = match num_samples {
        None => 1,
        Some(n) => {
            let needed = n.saturating_mul(seq_length).saturating_add(extra);
            needed.div_ceil(tokens_per_epoch).max(1)
        }
    };
    let samples_sans_final_epoch = ((num_epochs - 1) * tokens_per_epoch).saturating_sub(extra) / seq_length;
    let separate_final_epoch = match num_samples {
        Some(n) if num_epochs > 1 => {
            let from_final = n.saturating_sub(samples_sans_final_epoch);
            let per_epoch = (tokens_per_epoch - extra) / seq_length;
            // Megatron: from_final < int(0.80 * per_epoch).
            from_final < (0.80 * per_epoch as f64) as u64
        }
        _ => false,
    };
    Ok(EpochPlan {
        tokens_per_epoch,
        num_epochs,
        num_samples,
        separate_final_epoch,
        samples_sans_final_epoch,
    })
}

/// The split's sequence ids tiled per epoch and shuffled.
pub fn build_document_index(range: Range<usize>, plan: &EpochPlan, rng: &mut Rng) -> Vec<u64> {
    let tile = |epochs: u64| -> Vec<u64> {
        let mut v = Vec::with_capacity(range.len() * epochs as usize);
        for _ in 0..epochs {
            v.extend(range.clone().map(|s| s as u64));
        }
        v
    };
    if !plan.separate_final_epoch {
        let mut all = tile(plan.num_epochs);
        rng.shuffle(&mut all);
        return all;
    }
    let mut first = tile(plan.num_epochs - 1);
    rng.shuffle(&mut first);
    let mut last = tile(1);
    rng.shuffle(&mut last);
    first.extend(last);
    first
}

/// Builds the sample index, flattened: `[pos_0, off_0, pos_1, off_1, …]` with
/// `(num_epochs·tokens_per_epoch − extra) / seq_length + 1` rows. `sizes[s]` is the length of
/// sequence `s`.
///
/// # Errors
/// `NoTokens` if the document index runs out before the last sample (only with inconsistent
/// inputs: `tokens_per_epoch` must be the sum of `sizes` over the split).
pub fn build_sample_index(
    sizes: &[u32],
    document_index: &[u64],
    seq_length: u64,
    plan: &EpochPlan,
    add_extra_token: bool,
) -> Result<Vec<u64>, IndexBuildError> {
    let extra = i64::from(add_extra_token);
    let total_tokens = plan.num_epochs * plan.tokens_per_epoch;
    let num_samples = (total_tokens - extra as u64) / seq_length;
    let mut out = Vec::with_capacity(2 * (num_samples as usize + 1));
    out.extend([0, 0]);
    let (mut pos, mut offset) = (0usize, 0i64);
    for _ in 0..num_samples {
        let mut remaining = seq_length as i64 + extra;
        while remaining != 0 {
            let Some(&doc) = document_index.get(pos) else {
                return Err(IndexBuildError::NoTokens {
                    range: 0..sizes.len(),
                    need: seq_length + extra as u64,
                });
            };
            let doc_length = sizes[doc as usize] as i64 - offset;
            remaining -= doc_length;
            if remaining <= 0 {
                // The sample ends inside this document; the next one starts on its last token.
                offset += remaining + doc_length - extra;
                remaining = 0;
            } else {
                pos += 1;
                offset = 0;
            }
        }
        out.extend([pos as u64, offset as u64]);
    }
    Ok(out)
}

/// A permutation of `0..total`, with `0..first_block` and `first_block..total` shuffled
/// separately (`first_block = total` for one block).
pub fn build_shuffle_index(first_block: u64, total: u64, rng: &mut Rng) -> Vec<u64> {
    let first_block = first_block.min(total);
    let mut first: Vec<u64> = (0..first_block).collect();
    rng.shuffle(&mut first);
    let mut last: Vec<u64> = (first_block..total).collect();
    rng.shuffle(&mut last);
    first.extend(last);
    first
}

/// The three arrays of a GPT dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptIndices {
    pub document_index: IndexArray,
    /// Flattened `[num_samples + 1, 2]`.
    pub sample_index: IndexArray,
    pub shuffle_index: IndexArray,
}

impl GptIndices {
    /// Number of samples (the length of the shuffle index).
    pub fn num_samples(&self) -> usize {
        self.shuffle_index.len()
    }

    /// Checks the arrays are mutually consistent for a dataset of `sequence_count` sequences;
    /// used before trusting arrays loaded from a cache.
    pub fn is_consistent(&self, sequence_count: usize) -> bool {
        let rows = self.sample_index.len() / 2;
        self.sample_index.len().is_multiple_of(2)
            && rows >= 1
            && self.shuffle_index.len() == rows - 1
            && self.document_index.max().is_none_or(|m| m < sequence_count as u64)
            && self.shuffle_index.max().is_none_or(|m| m < (rows - 1) as u64)
            && (0..rows).all(|r| self.sample_index.get(2 * r) < self.document_index.len() as u64)
    }
}

/// Builds all three arrays for the split `range` of a dataset with sequence lengths `sizes`.
///
/// # Errors
/// Any [`IndexBuildError`].
pub fn build_gpt_indices(
    sizes: &[u32],
    range: Range<usize>,
    seq_length: u64,
    num_samples: Option<u64>,
    seed: u64,
    add_extra_token: bool,
) -> Result<(GptIndices, EpochPlan), IndexBuildError> {
    if range.end > sizes.len() {
        return Err(IndexBuildError::RangeOutOfBounds { range, count: sizes.len() });
    }
    let tokens_per_epoch: u64 = sizes[range.clone()].iter().map(|&s| s as u64).sum();
    let plan = plan_epochs(tokens_per_epoch, seq_length, num_samples, add_extra_token, range.clone())?;
    let cells = (range.len() as u64).checked_mul(plan.num_epochs);
    if cells.is_none_or(|c| c > (usize::MAX / 16) as u64) {
        return Err(IndexBuildError::TooLarge { epochs: plan.num_epochs, tokens: tokens_per_epoch });
    }
    let mut rng = Rng::new(seed)?;
    let document_index = build_document_index(range, &plan, &mut rng);
    let sample_index = build_sample_index(sizes, &document_index, seq_length, &plan, add_extra_token)?;
    let total = (sample_index.len() / 2 - 1) as u64;
    let first_block = if plan.separate_final_epoch { plan.samples_sans_final_epoch } else { total };
    let shuffle_index = build_shuffle_index(first_block, total, &mut rng);
    let indices = GptIndices {
        document_index: IndexArray::signed_from(document_index),
        sample_index: IndexArray::signed_from(sample_index),
        shuffle_index: IndexArray::unsigned_from(shuffle_index),
    };
    Ok((indices, plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_and_final_epoch_rule() {
        // 100 tokens per epoch, seq 10: 9 samples per epoch ((100-1)/10).
        let p = plan_epochs(100, 10, Some(9), true, 0..5).unwrap();
        assert_eq!((p.num_epochs, p.separate_final_epoch), (1, false));
        // 10 samples need 101 tokens: 2 epochs, the second supplies 1 sample < 0.8·9: separate.
        let p = plan_epochs(100, 10, Some(10), true, 0..5).unwrap();
        assert_eq!((p.num_epochs, p.separate_final_epoch), (2, true));
        assert_eq!(p.samples_sans_final_epoch, 9);
        // 18 samples: the second epoch supplies 9 ≥ 7: one shuffle.
        let p = plan_epochs(100, 10, Some(18), true, 0..5).unwrap();
        assert_eq!((p.num_epochs, p.separate_final_epoch), (2, false));
        assert!(plan_epochs(5, 10, None, true, 0..1).is_err());
        assert!(plan_epochs(100, 0, None, true, 0..1).is_err());
    }

    #[test]
    fn sample_index_by_hand() {
        // Documents of 3, 5 and 4 tokens, in order 0, 1, 2; seq_length 4 (+1 extra token).
        let sizes = [3, 5, 4];
        let plan = plan_epochs(12, 4, None, true, 0..3).unwrap();
        let idx = build_sample_index(&sizes, &[0, 1, 2], 4, &plan, true).unwrap();
        // (12-1)/4 = 2 samples: tokens 0..=4 and 4..=8 of the 12-token stream.
        // Token 4 is doc 1 offset 1; token 8 is doc 2 offset 0.
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 0]);
    }

    #[test]
    fn zero_length_documents_are_skipped() {
        let sizes = [0, 4, 0, 0, 4];
        let plan = plan_epochs(8, 3, None, true, 0..5).unwrap();
        let idx = build_sample_index(&sizes, &[0, 1, 2, 3, 4], 3, &plan, true).unwrap();
        // (8-1)/3 = 2 samples: stream tokens 0..=3, 3..=6; token 3 = doc 1 off 3, 6 = doc 4 off 2.
        assert_eq!(idx, vec![0, 0, 1, 3, 4, 2]);
    }

    #[test]
    fn indices_are_seeded_and_consistent() {
        let sizes: Vec<u32> = (0..50).map(|i| 1 + (i * 7) % 13).collect();
        let (a, _) = build_gpt_indices(&sizes, 10..40, 8, Some(100), 1234, true).unwrap();
        let (b, _) = build_gpt_indices(&sizes, 10..40, 8, Some(100), 1234, true).unwrap();
        let (c, _) = build_gpt_indices(&sizes, 10..40, 8, Some(100), 4321, true).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.shuffle_index, c.shuffle_index);
        assert!(a.num_samples() >= 100);
        assert!(a.is_consistent(sizes.len()));
        let docs: Vec<u64> = (0..a.document_index.len()).map(|i| a.document_index.get(i)).collect();
        assert!(docs.iter().all(|&d| (10..40).contains(&d)));
    }
    /// The three arrays equal Megatron-Core's for the same documents, split, length, sample count
    /// and seed (`tests/fixtures/megatron_gpt_indices.json`: NumPy's shuffles, Megatron's
    /// construction, from `tools/reference/megatron_gpt_indices.py`).
    #[test]
    fn indices_are_megatrons_for_the_same_seed() {
        use crate::data::rng::tests::{fixture, list};
        let fixture = fixture();
        let all = |a: &IndexArray| -> Vec<u64> { (0..a.len()).map(|i| a.get(i)).collect() };
        let cases = fixture["gpt_indices"].as_array().unwrap();
        assert_eq!(cases.len(), 6);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let sizes: Vec<u32> = list(&case["sizes"]).into_iter().map(|s| s as u32).collect();
            let range = case["start"].as_u64().unwrap() as usize..case["stop"].as_u64().unwrap() as usize;
            let (seq, n, seed) = (
                case["seq_length"].as_u64().unwrap(),
                case["num_samples"].as_u64(),
                case["seed"].as_u64().unwrap(),
            );
            let (got, plan) = build_gpt_indices(&sizes, range, seq, n, seed, true).unwrap();
            assert_eq!(plan.num_epochs, case["num_epochs"].as_u64().unwrap(), "{name}");
            assert_eq!(plan.separate_final_epoch, case["separate_final_epoch"].as_bool().unwrap(), "{name}");
            assert_eq!(all(&got.document_index), list(&case["document_index"]), "{name}: document index");
            assert_eq!(all(&got.sample_index), list(&case["sample_index"]), "{name}: sample index");
            assert_eq!(all(&got.shuffle_index), list(&case["shuffle_index"]), "{name}: shuffle index");
        }
    }
}
