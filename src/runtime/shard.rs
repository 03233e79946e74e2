//! Optimizer shards. Without the distributed optimizer a rank's shard of a chunk is its whole
//! arena; with it (ZeRO-1) it is, in every gradient bucket, the data-parallel rank's
//! [`chunk_range`] of that bucket — the part a reduce-scatter leaves reduced on this rank. AdamW
//! is element-wise, so updating a shard gives exactly the bits the full update gives there.

use std::ops::Range;

use crate::comm::chunk_range;
use crate::kernels::{AdamWStep, Backend};
use crate::models::params::ParamTable;
use crate::optim::AdamWConfig;

use super::plan::Bucket;

/// One chunk's shard: the arena ranges this rank updates and their Adam moments (concatenated
/// in range order).
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkShard {
    pub ranges: Vec<Range<usize>>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl ChunkShard {
    /// The shard of `dp_rank` among `dp` ranks (`distributed`), or the whole arena.
    pub fn new(arena_len: usize, buckets: &[Bucket], dp: usize, dp_rank: usize, distributed: bool) -> Self {
        let mut ranges: Vec<Range<usize>> = if distributed {
            buckets
                .iter()
                .map(|b| {
                    let r = chunk_range(b.range.len(), dp, dp_rank);
                    b.range.start + r.start..b.range.start + r.end
                })
                .filter(|r| !r.is_empty())
                .collect()
        } else {
            std::iter::once(0..arena_len).collect()
        };
        ranges.sort_by_key(|r| r.start);
        let n = ranges.iter().map(Range::len).sum();
        ChunkShard { ranges, m: vec![0.0; n], v: vec![0.0; n] }
    }

    /// Elements of optimizer state held (m and v count once each).
    pub fn state_bytes(&self) -> usize {
        4 * (self.m.len() + self.v.len())
    }

    /// Whether the shard holds element `i` of the arena.
    pub fn contains(&self, i: usize) -> bool {
        self.ranges.iter().any(|r| r.contains(&i))
    }

    /// One AdamW update of the shard (`step` already counts this update).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        be: &dyn Backend,
        table: &ParamTable,
        params: &mut [f32],
        grads: &[f32],
        cfg: &AdamWConfig,
        step: u64,
        lr: f32,
    ) {
        let mut base = 0;
        for r in &self.ranges {
            for spec in table.specs() {
                let s = spec.span.range();
                let lo = s.start.max(r.start);
                let hi = s.end.min(r.end);
                if lo >= hi {
                    continue;
                }
                let h = AdamWStep {
                    lr,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.eps,
                    weight_decay: if spec.decay { cfg.weight_decay } else { 0.0 },
                    step,
                };
                let mo = base + (lo - r.start)..base + (hi - r.start);
                be.adamw(&mut params[lo..hi], &grads[lo..hi], &mut self.m[mo.clone()], &mut self.v[mo], h);
            }
            base += r.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CpuBackend;
    use crate::models::gpt::Gpt;
    use crate::models::gpt::GptConfig;
    use crate::optim::AdamW;

    #[test]
    fn shards_partition_the_arena_and_update_like_the_full_optimizer() {
        let cfg = GptConfig { num_layers: 2, ..GptConfig::tiny() };
        let model = Gpt::new(&cfg, 3).unwrap();
        let table = model.table().clone();
        let n = table.len();
        let buckets = super::super::plan::buckets(&table, model.wte_range(), 700);
        let be = CpuBackend::new(1);
        let grads: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut full_p = model.params().to_vec();
        let mut full = AdamW::new(AdamWConfig::default(), n);
        for dp in [1, 2, 3] {
            let mut shards: Vec<ChunkShard> =
                (0..dp).map(|r| ChunkShard::new(n, &buckets, dp, r, true)).collect();
            let owners: Vec<usize> =
                (0..n).map(|i| shards.iter().filter(|s| s.contains(i)).count()).collect();
            assert!(owners.iter().all(|&o| o == 1), "dp {dp}: every element has one owner");
            let mut p = model.params().to_vec();
            for step in 1..=2 {
                for s in &mut shards {
                    s.update(&be, &table, &mut p, &grads, &AdamWConfig::default(), step, 1e-2);
                }
            }
            let mut fp = model.params().to_vec();
            let mut f = AdamW::new(AdamWConfig::default(), n);
            for _ in 0..2 {
                f.update(&be, &table, &mut fp, &grads, 1e-2);
            }
            assert!(p.iter().zip(&fp).all(|(a, b)| a.to_bits() == b.to_bits()), "dp {dp}");
            full_p = fp;
            full = f;
        }
        assert_eq!(full.step, 2);
        assert_ne!(full_p, model.params());
    }
}
