//! The parallel plan: from a config and a world size to the schedule program, the layer range of
//! every stage and the gradient buckets. Pure functions, checked before any actor starts, so a bad
//! layout is an error that names the setting — never a hang.

use std::ops::Range;

use crate::config::Config;
use crate::memory::MemoryEstimate;
use crate::models::gpt::{GptConfig, LayerRange, RangeMemory};
use crate::models::params::ParamTable;
use crate::schedule::{Program, ScheduleKind, ScheduleSpec, generate, validate};

use super::RuntimeError;

/// Everything a rank needs to know about the layout.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pp: usize,
    pub dp: usize,
    pub vpp: usize,
    pub schedule: ScheduleKind,
    /// Microbatches per step on one data-parallel rank.
    pub microbatches: usize,
    pub micro_batch_size: usize,
    pub program: Program,
    /// Layer range of each global stage `0..pp·vpp`.
    pub stages: Vec<LayerRange>,
    pub distributed_optimizer: bool,
    pub bucket_elems: usize,
}

impl Plan {
    /// Builds and validates the plan for `world` ranks.
    ///
    /// # Errors
    /// [`RuntimeError::Layout`] naming the setting that does not fit.
    pub fn new(cfg: &Config, world: usize) -> Result<Plan, RuntimeError> {
        let p = &cfg.parallel;
        let pp = p.pipeline_model_parallel_size;
        let bad = |what: &str, reason: String| RuntimeError::Layout { what: what.to_string(), reason };
        if pp == 0 || !world.is_multiple_of(pp) {
            return Err(bad(
                "pipeline_model_parallel_size",
                format!("{pp} does not divide the world of {world} ranks"),
            ));
        }
        let dp = world / pp;
        let schedule: ScheduleKind =
            p.pipeline_schedule.parse().map_err(|e: String| bad("pipeline_schedule", e))?;
        let layers = cfg.model.num_layers;
        let vpp = match (p.virtual_pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage) {
            (0, 0) => schedule.default_vpp(),
            (v, 0) => v,
            (v, per) => {
                if !layers.is_multiple_of(per * pp) {
                    return Err(bad(
                        "num_layers_per_virtual_pipeline_stage",
                        format!("{per} × pipeline size {pp} does not divide {layers} layers"),
                    ));
                }
                let derived = layers / (per * pp);
                if v != 0 && v != derived {
                    return Err(bad(
                        "virtual_pipeline_model_parallel_size",
                        format!(
                            "{v} disagrees with num_layers_per_virtual_pipeline_stage ({derived} chunks)"
                        ),
                    ));
                }
                derived
            }
        };
        if vpp > 1 && !matches!(schedule, ScheduleKind::Interleaved | ScheduleKind::ZbV) {
            return Err(bad(
                "virtual_pipeline_model_parallel_size",
                format!("{vpp} chunks per rank need the interleaved or zb-v schedule, not {schedule}"),
            ));
        }
        let mbs = cfg.train.micro_batch_size;
        let per_step = mbs * dp;
        if !cfg.train.global_batch_size.is_multiple_of(per_step) {
            return Err(bad(
                "global_batch_size",
                format!(
                    "{} is not a multiple of micro_batch_size {mbs} × data-parallel size {dp}",
                    cfg.train.global_batch_size
                ),
            ));
        }
        let microbatches = cfg.train.global_batch_size / per_step;
        let spec = ScheduleSpec { vpp, ..ScheduleSpec::new(schedule, pp, microbatches) };
        let program = generate(&spec).map_err(|e| bad("pipeline_schedule", e.to_string()))?;
        validate(&program).map_err(|e| bad("pipeline_schedule", e.to_string()))?;
        let stages = stage_ranges(&cfg.model, pp * vpp, &p.stage_layers)?;
        Ok(Plan {
            pp,
            dp,
            vpp,
            schedule,
            microbatches,
            micro_batch_size: mbs,
            program,
            stages,
            distributed_optimizer: p.use_distributed_optimizer,
            bucket_elems: p.grad_bucket_size.max(1),
        })
    }

    /// Number of global stages `p·v`.
    pub fn num_stages(&self) -> usize {
        self.pp * self.vpp
    }

    /// Layer range of local chunk `chunk` on pipeline rank `pp_rank`.
    pub fn range_of(&self, pp_rank: usize, chunk: usize) -> LayerRange {
        self.stages[self.program.stage_of(pp_rank, chunk)]
    }

    /// Peak microbatches each local chunk of pipeline rank `pp_rank` holds: activations (from a
    /// forward to its backward, or to its backward-weight) and split-backward output gradients
    /// (from a backward-input to its backward-weight), walking the rank's program in order.
    /// A model chunk keeps freed buffers for reuse, so these peaks are what it allocates.
    pub fn peaks_of(&self, pp_rank: usize) -> Vec<(usize, usize)> {
        let ops = self.program.ranks.get(pp_rank).map_or(&[][..], Vec::as_slice);
        crate::schedule::chunk_peaks(ops, self.vpp)
    }

    /// Host memory of every rank in one process (ranks as threads), added up.
    pub fn memory_in_process(&self, cfg: &Config) -> MemoryEstimate {
        (0..self.pp * self.dp)
            .map(|r| self.memory_of(cfg, r, false))
            .fold(MemoryEstimate::default(), MemoryEstimate::plus)
    }

    /// Host memory world rank `rank` holds when its chunks compute on the CPU: their model
    /// instances, optimizer state (its shard under the distributed optimizer), the peak of
    /// in-flight microbatches its schedule allows, and, when the run saves checkpoints, the
    /// copies made for the writer. With `own_process` (launched ranks) world rank 0 also holds
    /// what the other pipeline ranks send it to write; ranks sharing a process hand those
    /// buffers over instead.
    pub fn memory_of(&self, cfg: &Config, rank: usize, own_process: bool) -> MemoryEstimate {
        let (pp_rank, dp_rank) = (rank / self.dp.max(1), rank % self.dp.max(1));
        let split =
            self.program.ranks.iter().flatten().any(|op| op.kind() == crate::schedule::OpKind::BackwardInput);
        let seq = cfg.model.seq_length;
        let saves = !cfg.checkpoint.save.is_empty();
        let mut est = MemoryEstimate::default();
        if saves && own_process && rank == 0 {
            // The other pipeline ranks' parameters and full moments, received for the writer.
            for r in 1..self.pp {
                for c in 0..self.vpp {
                    let n = crate::models::gpt::param_table(&cfg.model, self.range_of(r, c)).len();
                    est.checkpoint += 12 * n as u64;
                }
            }
        }
        for (c, (acts, outs)) in self.peaks_of(pp_rank).into_iter().enumerate() {
            let range = self.range_of(pp_rank, c);
            let r = RangeMemory::of(&cfg.model, range, self.micro_batch_size, seq, split);
            let table = crate::models::gpt::param_table(&cfg.model, range);
            let wte = table.get("wte").map(|s| s.span.range());
            let shard: usize = if self.distributed_optimizer {
                buckets(&table, wte, self.bucket_elems)
                    .iter()
                    .map(|b| crate::comm::chunk_range(b.range.len(), self.dp, dp_rank).len())
                    .sum()
            } else {
                table.len()
            };
            est = est.plus(MemoryEstimate {
                weights: r.params,
                grads: r.grads,
                optimizer: 8 * shard as u64,
                activations: acts as u64 * r.acts_per_microbatch
                    + outs as u64 * r.output_grads_per_microbatch,
                workspace: r.scratch,
                // A snapshot of the optimizer state everywhere; on data-parallel rank 0 (the one
                // that writes or sends to the writer) a copy of the parameters too, and under the
                // distributed optimizer the full moments, plus, in a process of its own, a
                // peer's shard on its way in (ranks sharing a process hand it over).
                checkpoint: match (saves, dp_rank, self.distributed_optimizer && self.dp > 1) {
                    (false, _, _) => 0,
                    (true, 0, false) => r.params + 8 * shard as u64,
                    (true, 0, true) => 3 * r.params + 8 * shard as u64 * if own_process { 2 } else { 1 },
                    (true, _, _) => 8 * shard as u64,
                },
                in_flight: acts,
            });
        }
        est
    }
}

/// Layer ranges of `n` stages: `explicit` layer counts when given, else as even as possible
/// (earlier stages take the remainder).
///
/// # Errors
/// [`RuntimeError::Layout`] when the explicit list has the wrong length or sum.
pub fn stage_ranges(
    model: &GptConfig,
    n: usize,
    explicit: &[usize],
) -> Result<Vec<LayerRange>, RuntimeError> {
    let layers = model.num_layers;
    let counts: Vec<usize> = if explicit.is_empty() {
        (0..n).map(|i| layers / n + usize::from(i < layers % n)).collect()
    } else {
        if explicit.len() != n || explicit.iter().sum::<usize>() != layers {
            return Err(RuntimeError::Layout {
                what: "stage_layers".into(),
                reason: format!(
                    "{explicit:?} must list {n} stages (pipeline × virtual size) summing to {layers} layers"
                ),
            });
        }
        explicit.to_vec()
    };
    let cuts: Vec<usize> = counts
        .iter()
        .scan(0, |acc, &c| {
            *acc += c;
            Some(*acc)
        })
        .take(n - 1)
        .collect();
    LayerRange::partition(model, &cuts)
        .map_err(|e| RuntimeError::Layout { what: "stage_layers".into(), reason: e.to_string() })
}

/// One gradient bucket: an arena range reduced as one collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub range: Range<usize>,
}

/// Buckets of one chunk, in the order backward finishes them (decreasing arena offset). The tied
/// `wte` (when the chunk holds it) is a bucket of its own, so that its data-parallel shards line
/// up between the first and the last stage for the embedding-group sum. Other buckets hold
/// whole tensors and at least `bucket_elems` elements (the last one may be smaller).
pub fn buckets(table: &ParamTable, wte: Option<Range<usize>>, bucket_elems: usize) -> Vec<Bucket> {
    let mut out = Vec::new();
    let mut hi: Option<usize> = None;
    let mut lo = 0;
    for spec in table.specs().iter().rev() {
        let r = spec.span.range();
        if Some(&r) == wte.as_ref() {
            continue;
        }
        let top = *hi.get_or_insert(r.end);
        lo = r.start;
        if top - lo >= bucket_elems {
            out.push(Bucket { range: lo..top });
            hi = None;
        }
    }
    if let Some(top) = hi {
        out.push(Bucket { range: lo..top });
    }
    if let Some(w) = wte {
        out.push(Bucket { range: w });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gpt::Gpt;

    #[test]
    fn even_and_explicit_stage_ranges() {
        let cfg = GptConfig { num_layers: 5, ..GptConfig::tiny() };
        let r = stage_ranges(&cfg, 2, &[]).unwrap();
        assert_eq!((r[0].first, r[0].last, r[1].first, r[1].last), (0, 3, 3, 5));
        assert!(r[0].embedding && !r[0].head && r[1].head && !r[1].embedding);
        let r = stage_ranges(&cfg, 2, &[1, 4]).unwrap();
        assert_eq!(r[0].last, 1);
        let r = stage_ranges(&cfg, 4, &[]).unwrap();
        let bounds: Vec<(usize, usize)> = r.iter().map(|x| (x.first, x.last)).collect();
        assert_eq!(bounds, [(0, 2), (2, 3), (3, 4), (4, 5)]);
        let r = stage_ranges(&cfg, 3, &[2, 0, 3]).unwrap();
        assert_eq!((r[1].first, r[1].last, r[2].first, r[2].last), (2, 2, 2, 5));
        let err = stage_ranges(&cfg, 2, &[1, 1]).unwrap_err().to_string();
        assert!(err.contains("summing to 5"), "{err}");
    }

    #[test]
    fn virtual_stages_from_layers_per_chunk() {
        let sets = |extra: &[&str]| -> Vec<String> {
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.pipeline_schedule=\"interleaved\"",
                "train.global_batch_size=4",
                "train.micro_batch_size=1",
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
        };
        let toml = "[model]\nvocab_size = 10\nseq_length = 8\nnum_layers = 8\nhidden_size = 8\nnum_attention_heads = 2\n";
        let cfg =
            Config::from_toml_str(toml, "t", &sets(&["parallel.num_layers_per_virtual_pipeline_stage=2"]))
                .unwrap();
        let plan = Plan::new(&cfg, 2).unwrap();
        assert_eq!((plan.vpp, plan.num_stages()), (2, 4));
        assert!(plan.stages.iter().all(|r| r.last - r.first == 2));
        let cfg =
            Config::from_toml_str(toml, "t", &sets(&["parallel.num_layers_per_virtual_pipeline_stage=3"]))
                .unwrap();
        assert!(Plan::new(&cfg, 2).unwrap_err().to_string().contains("does not divide 8 layers"));
        let cfg = Config::from_toml_str(
            toml,
            "t",
            &sets(&[
                "parallel.pipeline_schedule=\"1f1b\"",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ]),
        )
        .unwrap();
        assert!(Plan::new(&cfg, 2).unwrap_err().to_string().contains("interleaved or zb-v"));
    }

    #[test]
    fn buckets_cover_the_arena_once_and_isolate_wte() {
        let cfg = GptConfig { num_layers: 3, ..GptConfig::tiny() };
        for range in stage_ranges(&cfg, 2, &[]).unwrap().into_iter().chain([LayerRange::full(&cfg)]) {
            let m = Gpt::new_range(&cfg, range, 1).unwrap();
            for size in [1, 500, 1 << 30] {
                let b = buckets(m.table(), m.wte_range(), size);
                let mut seen = vec![0u8; m.table().len()];
                for bucket in &b {
                    bucket.range.clone().for_each(|i| seen[i] += 1);
                }
                assert!(seen.iter().all(|&s| s == 1), "{range:?} size {size}");
                // Decreasing offsets, apart from the wte bucket kept last.
                let plain: Vec<_> = b.iter().filter(|x| Some(&x.range) != m.wte_range().as_ref()).collect();
                assert!(plain.windows(2).all(|w| w[0].range.start >= w[1].range.end));
                if let Some(w) = m.wte_range() {
                    assert_eq!(b.last().unwrap().range, w);
                }
            }
        }
    }
}
