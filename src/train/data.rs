//! Batches for the trainer. Samples come from any [`SampleSource`] (the Megatron-style
//! [`crate::data::GptDataset`] or blend, or [`TokenWindows`] over an in-memory stream): sample
//! `i` is always the same `seq + 1` tokens (inputs are the first `seq`, targets the last `seq`),
//! so resuming at `consumed_samples` continues the exact sequence.

use crate::data::{DatasetError, SampleSource};
use crate::models::Rng;

/// Consecutive windows of a token stream (overlapping by one token, as Megatron's sample index),
/// visited in an order shuffled once with a seed.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    tokens: Vec<u32>,
    seq: usize,
    order: Vec<u32>,
}

impl TokenWindows {
    /// Windows of `seq + 1` tokens over `tokens`; `None` when the stream is shorter than one
    /// window.
    pub fn new(tokens: Vec<u32>, seq: usize, seed: u64) -> Option<Self> {
        if seq == 0 || tokens.len() < seq + 1 {
            return None;
        }
        let n = (tokens.len() - 1) / seq;
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut rng = Rng::derived(seed, "sample-order");
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        Some(Self { tokens, seq, order })
    }

    /// Number of tokens in the stream.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

impl SampleSource for TokenWindows {
    fn num_samples(&self) -> usize {
        self.order.len()
    }
    fn sample_tokens(&self) -> usize {
        self.seq + 1
    }
    fn sample_into(&self, idx: usize, out: &mut Vec<u32>) -> Result<(), DatasetError> {
        let len = self.order.len();
        let start = *self.order.get(idx).ok_or(DatasetError::SampleOutOfRange { index: idx, len })? as usize;
        out.clear();
        out.extend_from_slice(&self.tokens[start * self.seq..start * self.seq + self.seq + 1]);
        Ok(())
    }
}

/// A batch buffer: `batch` samples split into inputs and targets.
#[derive(Debug, Clone, Default)]
pub struct BatchBuf {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    scratch: Vec<u32>,
}

impl BatchBuf {
    /// Fills the buffer with samples `first .. first + batch` of `src` (indices wrap around
    /// the source's length, i.e. further epochs repeat the order).
    ///
    /// # Errors
    /// The source's error, or [`DatasetError::BadConfig`] for an empty source or samples shorter
    /// than two tokens.
    pub fn fill(&mut self, src: &dyn SampleSource, first: u64, batch: usize) -> Result<(), DatasetError> {
        let n = src.num_samples() as u64;
        let t = src.sample_tokens().saturating_sub(1);
        if n == 0 || t == 0 {
            return Err(DatasetError::BadConfig {
                reason: "the dataset has no samples of ≥ 2 tokens".into(),
            });
        }
        self.tokens.resize(batch * t, 0);
        self.targets.resize(batch * t, 0);
        for b in 0..batch {
            src.sample_into(((first + b as u64) % n) as usize, &mut self.scratch)?;
            if self.scratch.len() != t + 1 {
                let reason = format!("sample has {} tokens, expected {}", self.scratch.len(), t + 1);
                return Err(DatasetError::BadConfig { reason });
            }
            self.tokens[b * t..(b + 1) * t].copy_from_slice(&self.scratch[..t]);
            self.targets[b * t..(b + 1) * t].copy_from_slice(&self.scratch[1..]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_stream_once_in_shuffled_order() {
        let toks: Vec<u32> = (0..101).collect();
        let w = TokenWindows::new(toks, 10, 3).unwrap();
        assert_eq!(w.num_samples(), 10);
        let mut starts: Vec<u32> = (0..10)
            .map(|i| {
                let mut out = Vec::new();
                w.sample_into(i, &mut out).unwrap();
                assert!(out.windows(2).all(|p| p[1] == p[0] + 1));
                out[0]
            })
            .collect();
        assert_ne!(starts, (0..10).map(|i| i * 10).collect::<Vec<_>>(), "order is shuffled");
        starts.sort_unstable();
        assert_eq!(starts, (0..10).map(|i| i * 10).collect::<Vec<_>>());
        assert!(TokenWindows::new(vec![1, 2], 2, 0).is_none());
    }
}
