//! Data-parallel sampler properties over random (DP, micro-batch, global batch, total, resume
//! points): every step's global batch is partitioned among ranks, and any sequence of stops and
//! resumes from `consumed_samples` gives each rank exactly the samples of an uninterrupted run —
//! 0 lost, 0 duplicated.

use std::collections::BTreeSet;
use std::ops::Range;

use proptest::prelude::*;
use troupe::data::{BatchLayout, DistributedSampler};

/// Per rank, the micro-batches of `steps` steps starting from `consumed`.
fn run(layout: BatchLayout, total: u64, consumed: u64, steps: u64) -> Vec<Vec<Range<u64>>> {
    (0..layout.data_parallel_size())
        .map(|rank| {
            let mut s = DistributedSampler::new(layout, rank, total, consumed).unwrap();
            let mut out = Vec::new();
            for _ in 0..steps {
                match s.next_step() {
                    Some(mbs) => out.extend(mbs),
                    None => break,
                }
            }
            out
        })
        .collect()
}

fn layout_strategy() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..5, 1usize..6, 1usize..5).prop_map(|(dp, micro, accum)| (dp, micro, dp * micro * accum))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn each_step_partitions_its_global_batch(
        (dp, micro, global) in layout_strategy(),
        total in 0u64..500,
    ) {
        let layout = BatchLayout::new(global, micro, dp).unwrap();
        let per_rank = run(layout, total, 0, u64::MAX);
        let steps = total / global as u64;
        let accum = layout.num_micro_batches();
        for (rank, mbs) in per_rank.iter().enumerate() {
            prop_assert_eq!(mbs.len() as u64, steps * accum as u64, "rank {}", rank);
            prop_assert!(mbs.iter().all(|r| r.end - r.start == micro as u64));
        }
        for step in 0..steps as usize {
            let mut ids = Vec::new();
            for mbs in &per_rank {
                for r in &mbs[step * accum..(step + 1) * accum] {
                    ids.extend(r.clone());
                }
            }
            ids.sort();
            let want: Vec<u64> = (step as u64 * global as u64..(step as u64 + 1) * global as u64).collect();
            prop_assert_eq!(ids, want);
        }
    }

    /// Stop after random steps, resume from the consumed_samples a checkpoint would store, any
    /// number of times: each rank's sequence equals the uninterrupted one.
    #[test]
    fn stop_and_resume_loses_and_repeats_nothing(
        (dp, micro, global) in layout_strategy(),
        total in 0u64..400,
        stops in prop::collection::vec(0u64..8, 0..6),
    ) {
        let layout = BatchLayout::new(global, micro, dp).unwrap();
        let uninterrupted = run(layout, total, 0, u64::MAX);
        let mut resumed: Vec<Vec<Range<u64>>> = vec![Vec::new(); dp];
        let mut consumed = 0u64;
        for &steps in stops.iter().chain(std::iter::once(&u64::MAX)) {
            let part = run(layout, total, consumed, steps);
            let mut probe = DistributedSampler::new(layout, 0, total, consumed).unwrap();
            for _ in 0..steps {
                if probe.next_step().is_none() {
                    break;
                }
            }
            consumed = probe.consumed_samples();
            for (rank, mbs) in part.into_iter().enumerate() {
                resumed[rank].extend(mbs);
            }
        }
        prop_assert_eq!(&resumed, &uninterrupted);
        let all: Vec<u64> = resumed.iter().flatten().flat_map(|r| r.clone()).collect();
        let unique: BTreeSet<u64> = all.iter().copied().collect();
        prop_assert_eq!(unique.len(), all.len(), "duplicated samples");
        let steps = total / global as u64;
        prop_assert_eq!(all.len() as u64, steps * global as u64, "lost samples");
    }

    /// Resuming with another DP size or micro-batch (same global batch) gives every step the same
    /// set of samples.
    #[test]
    fn resume_with_a_new_layout_keeps_each_steps_samples(
        (dp, micro, global) in layout_strategy(),
        dp2 in 1usize..5,
        stop in 0u64..5,
        total in 0u64..300,
    ) {
        let Ok(layout2) = BatchLayout::new(global, 1, dp2) else {
            return Ok(());
        };
        let layout = BatchLayout::new(global, micro, dp).unwrap();
        let step_sets = |per_rank: &[Vec<Range<u64>>], accum: usize| -> Vec<BTreeSet<u64>> {
            let steps = per_rank[0].len() / accum;
            (0..steps)
                .map(|s| {
                    per_rank
                        .iter()
                        .flat_map(|mbs| mbs[s * accum..(s + 1) * accum].iter().flat_map(|r| r.clone()))
                        .collect()
                })
                .collect()
        };
        let before = run(layout, total, 0, stop);
        let done = (before[0].len() / layout.num_micro_batches()) as u64;
        let after = run(layout2, total, done * global as u64, u64::MAX);
        let mut sets = step_sets(&before, layout.num_micro_batches());
        sets.extend(step_sets(&after, layout2.num_micro_batches()));
        let reference = step_sets(&run(layout, total, 0, u64::MAX), layout.num_micro_batches());
        prop_assert_eq!(sets, reference);
    }
}

#[test]
fn resume_point_must_be_a_micro_batch_boundary() {
    let layout = BatchLayout::new(12, 2, 3).unwrap();
    assert!(DistributedSampler::new(layout, 0, 100, 6).is_ok());
    let err = DistributedSampler::new(layout, 0, 100, 7).unwrap_err();
    assert!(err.to_string().contains("consumed_samples = 7"), "{err}");
}
