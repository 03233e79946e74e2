//! Where the trainer's samples come from. A [`SampleSource`] yields fixed-length samples of
//! `seq + 1` tokens by index (inputs are the first `seq`, targets the last `seq`), like
//! Megatron's GPT dataset; sample `i` of training is always the same, so resuming at
//! `consumed_samples` continues the exact sequence.

use crate::models::Rng;

/// Indexed samples of `seq + 1` tokens.
pub trait SampleSource: Send + Sync {
    /// Number of distinct samples (training wraps around: sample `i` is `i % len`).
    fn len(&self) -> usize;
    /// Tokens per sample minus one.
    fn seq(&self) -> usize;
    /// Writes sample `idx` (`seq + 1` tokens) into `out`.
    fn sample(&self, idx: usize, out: &mut [u32]);
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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
    fn len(&self) -> usize {
        self.order.len()
    }
    fn seq(&self) -> usize {
        self.seq
    }
    fn sample(&self, idx: usize, out: &mut [u32]) {
        let start = self.order[idx % self.order.len()] as usize * self.seq;
        out.copy_from_slice(&self.tokens[start..start + self.seq + 1]);
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
    /// Fills the buffer with samples `first .. first + batch` of `src`.
    pub fn fill(&mut self, src: &dyn SampleSource, first: u64, batch: usize) {
        let t = src.seq();
        self.tokens.resize(batch * t, 0);
        self.targets.resize(batch * t, 0);
        self.scratch.resize(t + 1, 0);
        let n = src.len() as u64;
        for b in 0..batch {
            src.sample(((first + b as u64) % n) as usize, &mut self.scratch);
            self.tokens[b * t..(b + 1) * t].copy_from_slice(&self.scratch[..t]);
            self.targets[b * t..(b + 1) * t].copy_from_slice(&self.scratch[1..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_stream_once_in_shuffled_order() {
        let toks: Vec<u32> = (0..101).collect();
        let w = TokenWindows::new(toks, 10, 3).unwrap();
        assert_eq!(w.len(), 10);
        let mut starts: Vec<u32> = (0..10)
            .map(|i| {
                let mut out = vec![0; 11];
                w.sample(i, &mut out);
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
