//! Data-parallel sampler: splits each global batch into per-rank micro-batches, resumable from
//! `consumed_samples` (Megatron's `MegatronPretrainingSampler`).
//!
//! Sample ids are positions in a [`super::blend::SampleSource`], whose order is already shuffled;
//! the sampler walks them in order. Step `s` uses the global batch
//! `[s·G, (s+1)·G)` (G = global batch size). Within it, micro-batch `k` is the block
//! `[k·M·DP, (k+1)·M·DP)` (M = micro-batch size, DP = data-parallel size) and rank `r` takes the
//! `r`-th slice of M ids of that block. Everything is a function of `consumed_samples`, so a run
//! stopped after any step and restarted with `consumed_samples = steps·G` sees exactly the samples
//! an uninterrupted run would: none lost, none repeated. The set of ids of a step depends only on
//! G, so a resume may even change DP and M (keeping G). A trailing partial global batch is
//! dropped (drop_last).

use std::ops::Range;

/// Errors of configuring a sampler.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SamplerError {
    #[error(
        "global batch {global} must be a positive multiple of micro-batch {micro} × data-parallel \
         size {dp}"
    )]
    BadLayout { global: usize, micro: usize, dp: usize },
    #[error("data-parallel rank {rank} out of range for data-parallel size {dp}")]
    BadRank { rank: usize, dp: usize },
    #[error(
        "cannot resume at consumed_samples = {consumed}: {reason} (total samples {total}, \
         micro-batch × data-parallel size {block})"
    )]
    BadResume { consumed: u64, total: u64, block: u64, reason: &'static str },
}

/// How a global batch is cut: G = M × DP × number of micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLayout {
    global_batch_size: usize,
    micro_batch_size: usize,
    data_parallel_size: usize,
}

impl BatchLayout {
    /// A layout with global batch G, micro-batch M and data-parallel size DP.
    ///
    /// # Errors
    /// [`SamplerError::BadLayout`] unless all are positive and G is a multiple of M·DP.
    pub fn new(global: usize, micro: usize, dp: usize) -> Result<Self, SamplerError> {
        let block = micro.checked_mul(dp).unwrap_or(0);
        if global == 0 || block == 0 || !global.is_multiple_of(block) {
            return Err(SamplerError::BadLayout { global, micro, dp });
        }
        Ok(BatchLayout { global_batch_size: global, micro_batch_size: micro, data_parallel_size: dp })
    }

    /// G.
    pub fn global_batch_size(&self) -> usize {
        self.global_batch_size
    }

    /// M.
    pub fn micro_batch_size(&self) -> usize {
        self.micro_batch_size
    }

    /// DP.
    pub fn data_parallel_size(&self) -> usize {
        self.data_parallel_size
    }

    /// Micro-batches per rank per step (gradient accumulation steps): G / (M·DP).
    pub fn num_micro_batches(&self) -> usize {
        self.global_batch_size / (self.micro_batch_size * self.data_parallel_size)
    }

    fn block(&self) -> u64 {
        (self.micro_batch_size * self.data_parallel_size) as u64
    }
}

/// One data-parallel rank's view of the sample stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    layout: BatchLayout,
    dp_rank: usize,
    total_samples: u64,
    consumed_samples: u64,
}

impl DistributedSampler {
    /// A sampler for rank `dp_rank` over `total_samples` samples, resuming after
    /// `consumed_samples` (0 for a fresh run; a checkpoint stores the value).
    ///
    /// # Errors
    /// `BadRank`; `BadResume` if `consumed_samples` exceeds the total or is not a multiple of
    /// M·DP (it always is a multiple of G when saved at a step boundary).
    pub fn new(
        layout: BatchLayout,
        dp_rank: usize,
        total_samples: u64,
        consumed_samples: u64,
    ) -> Result<Self, SamplerError> {
        if dp_rank >= layout.data_parallel_size {
            return Err(SamplerError::BadRank { rank: dp_rank, dp: layout.data_parallel_size });
        }
        let resume = |reason| SamplerError::BadResume {
            consumed: consumed_samples,
            total: total_samples,
            block: layout.block(),
            reason,
        };
        if consumed_samples > total_samples {
            return Err(resume("more samples consumed than exist"));
        }
        if !consumed_samples.is_multiple_of(layout.block()) {
            return Err(resume("not at a micro-batch boundary"));
        }
        Ok(DistributedSampler { layout, dp_rank, total_samples, consumed_samples })
    }

    /// Samples consumed by all ranks together so far (store this in a checkpoint).
    pub fn consumed_samples(&self) -> u64 {
        self.consumed_samples
    }

    /// The batch layout.
    pub fn layout(&self) -> BatchLayout {
        self.layout
    }

    /// This sampler's data-parallel rank.
    pub fn dp_rank(&self) -> usize {
        self.dp_rank
    }

    /// Whole steps still available.
    pub fn steps_remaining(&self) -> u64 {
        (self.total_samples - self.consumed_samples) / self.layout.global_batch_size as u64
    }

    /// This rank's next micro-batch (M consecutive sample ids), advancing `consumed_samples` by
    /// M·DP; `None` when fewer than M·DP samples remain.
    pub fn next_micro_batch(&mut self) -> Option<Range<u64>> {
        let block = self.layout.block();
        if self.total_samples - self.consumed_samples < block {
            return None;
        }
        let m = self.layout.micro_batch_size as u64;
        let start = self.consumed_samples + self.dp_rank as u64 * m;
        self.consumed_samples += block;
        Some(start..start + m)
    }

    /// This rank's micro-batches of the next step, advancing `consumed_samples` by G; `None`
    /// when a whole global batch no longer fits.
    pub fn next_step(&mut self) -> Option<Vec<Range<u64>>> {
        if self.steps_remaining() == 0 {
            return None;
        }
        (0..self.layout.num_micro_batches()).map(|_| self.next_micro_batch()).collect()
    }
}

impl Iterator for DistributedSampler {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_micro_batch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_layout_by_hand() {
        // G = 8, M = 2, DP = 2: two micro-batches per step.
        let layout = BatchLayout::new(8, 2, 2).unwrap();
        assert_eq!(layout.num_micro_batches(), 2);
        let mut r1 = DistributedSampler::new(layout, 1, 20, 0).unwrap();
        assert_eq!(r1.next_step(), Some(vec![2..4, 6..8]));
        assert_eq!(r1.next_step(), Some(vec![10..12, 14..16]));
        assert_eq!(r1.next_step(), None); // 4 samples left < G
        assert_eq!(r1.consumed_samples(), 16);
    }

    #[test]
    fn rejects_bad_inputs() {
        assert!(BatchLayout::new(6, 4, 1).is_err());
        assert!(BatchLayout::new(0, 1, 1).is_err());
        let layout = BatchLayout::new(8, 2, 2).unwrap();
        assert!(DistributedSampler::new(layout, 2, 10, 0).is_err());
        assert!(DistributedSampler::new(layout, 0, 10, 3).is_err());
        assert!(DistributedSampler::new(layout, 0, 10, 12).is_err());
    }
}
