//! Pipeline parallelism, ZeRO and fault injection with the chunks' compute on a GPU: the actor
//! runtime with `RunOptions::device` (`troupe train --device cuda|emu --pipeline-model-parallel-size
//! …`), against the same layout on the CPU.
//!
//! Each layout runs twice in the kernel emulator (and, with a GPU, on it): fp32 device stages
//! must give the CPU runtime's per-step losses and gradient norms within 1e-5 relative and final
//! parameters within 1e-5 of their norm. The kernels round differently from the CPU's (fused
//! multiply-adds, other summation orders: `tests/gpu_model.rs` finds gradients within 6e-6
//! relative), so the bits differ; three Adam steps keep such differences near 1e-6.
//! bf16 stages track the fp32 CPU losses within 2e-3 and the parameters within 5e-3 of their
//! norm (bf16 activations carry 8 bits of mantissa; `tests/gpu_model.rs` bounds one forward at
//! 7.5e-5, and the weights the kernels read are rounded to bf16 again after each update;
//! measured here: 7e-5 and 1.3e-3).
//!
//! Also: two runs give the same bits, each rank holds the number of microbatches its schedule
//! says (GPipe all m, 1F1B `p − r`), an injected NaN gradient on a GPU stage is caught and the
//! step skipped like on the CPU, zero-bubble schedules run with the device's split backward
//! (which gives the fused backward's bits), and the last backward drains the CPU model's
//! gradient ranges.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use troupe::config::Config;
use troupe::data::SampleSource;
use troupe::gpu::DType;
use troupe::gpu::stage::StageFactory;
use troupe::models::Rng;
use troupe::runtime::{RankResult, RunOptions, train_inproc};
use troupe::train::data::TokenWindows;

#[path = "common/scratch.rs"]
mod scratch;
use scratch::Scratch;

const CONFIG: &str = r#"
[model]
vocab_size = 61
make_vocab_size_divisible_by = 16
seq_length = 16
num_layers = 4
hidden_size = 32
num_attention_heads = 2

[train]
micro_batch_size = 1
global_batch_size = 4
train_iters = 3
lr = 3e-3
min_lr = 3e-4
lr_warmup_iters = 1
lr_decay_style = "cosine"
clip_grad = 1.0
weight_decay = 0.1
seed = 7

[logging]
log_interval = 1
eval_interval = 0

[checkpoint]
save = ""
"#;

fn data(cfg: &Config) -> Arc<dyn SampleSource> {
    let mut rng = Rng::derived(11, "gpu-pipeline-data");
    let tokens: Vec<u32> = (0..2000).map(|_| (rng.next_u64() % cfg.model.vocab_size as u64) as u32).collect();
    Arc::new(TokenWindows::new(tokens, cfg.model.seq_length, 3).expect("enough tokens"))
}

fn config(sets: &[&str]) -> Result<Config> {
    let sets: Vec<String> = sets.iter().map(|s| (*s).to_string()).collect();
    Ok(Config::from_toml_str(CONFIG, "test", &sets)?)
}

fn run(cfg: &Config, device: Option<StageFactory>, faults: &[&str]) -> Result<Vec<RankResult>> {
    let mut opts = RunOptions { timeout: Duration::from_secs(120), device, ..RunOptions::default() };
    for f in faults {
        opts.faults.faults.push(f.parse()?);
    }
    Ok(train_inproc(cfg, data(cfg), opts, 2, None, None)?)
}

/// All final parameters in (pipeline rank, chunk) order: the same layout gives the same order.
fn params(results: &[RankResult]) -> Vec<f32> {
    results.iter().flat_map(|r| r.chunks.iter().flat_map(|(_, _, p)| p.iter().copied())).collect()
}

fn rel_norm(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Every device this machine has: the emulator (unless skipped) and a real GPU.
fn devices(dtype: DType) -> Vec<(&'static str, StageFactory)> {
    let mut v = Vec::new();
    if let Some(emu) = troupe::gpu::emu::shared() {
        v.push(("emulator", StageFactory::new(emu, dtype).with_host_groups(emu)));
    }
    if let Some(gpu) = troupe::gpu::cuda::shared() {
        v.push(("GPU", StageFactory::new(gpu, dtype).with_host_groups(gpu)));
    }
    v
}

/// The layout on the CPU and on each device: losses, norms and parameters within `tol`.
fn compare(sets: &[&str], dtype: DType, loss_tol: f64) -> Result<()> {
    let cfg = config(sets)?;
    let cpu = run(&cfg, None, &[])?;
    let cpu_losses: Vec<f32> = cpu[0].records.iter().map(|r| r.loss).collect();
    for (name, dev) in devices(dtype) {
        let got = run(&cfg, Some(dev), &[])?;
        let what = format!("{sets:?} on the {name} ({dtype:?})");
        ensure!(got[0].records.len() == cpu[0].records.len(), "{what}: step count");
        for (g, c) in got[0].records.iter().zip(&cpu[0].records) {
            let dl = f64::from((g.loss - c.loss).abs());
            let tol = if dtype == DType::F32 { loss_tol * f64::from(c.loss.abs()) } else { loss_tol };
            ensure!(
                dl <= tol,
                "{what}: step {} loss {} vs CPU {} (tolerance {tol:.1e})",
                g.step,
                g.loss,
                c.loss
            );
            if dtype == DType::F32 {
                let dn = (g.grad_norm - c.grad_norm).abs() / c.grad_norm;
                ensure!(dn <= 1e-5, "{what}: step {} grad norm {} vs {}", g.step, g.grad_norm, c.grad_norm);
            }
            ensure!(!g.skipped, "{what}: step {} skipped", g.step);
        }
        for (r, (g, c)) in got.iter().zip(&cpu).enumerate() {
            ensure!(
                g.peak_in_flight == c.peak_in_flight,
                "{what}: rank {r} held {:?} microbatches, CPU {:?}",
                g.peak_in_flight,
                c.peak_in_flight
            );
        }
        let d = rel_norm(&params(&got), &params(&cpu));
        let ptol = if dtype == DType::F32 { 1e-5 } else { 5e-3 };
        ensure!(d <= ptol, "{what}: final parameters differ by {d:.2e} of their norm");
        // The device's kernels round differently from the CPU's: equal bits would mean the
        // chunks never computed on the device.
        ensure!(d > 0.0, "{what}: final parameters are bitwise the CPU's; did the device compute?");
        eprintln!(
            "{what}: losses {:?} (CPU {cpu_losses:?}), parameters within {d:.1e}",
            got[0].records.iter().map(|r| r.loss).collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[test]
fn one_f_one_b_on_gpu_stages_matches_the_cpu() -> Result<()> {
    compare(&["parallel.pipeline_model_parallel_size=2"], DType::F32, 1e-5)
}

/// The kernels have no atomics and fixed reduction orders: a second run gives the same bits.
#[test]
fn gpu_stages_are_deterministic() -> Result<()> {
    let cfg = config(&["parallel.pipeline_model_parallel_size=2"])?;
    for (name, dev) in devices(DType::Bf16) {
        let a = run(&cfg, Some(dev.clone()), &[])?;
        let b = run(&cfg, Some(dev), &[])?;
        let (pa, pb) = (params(&a), params(&b));
        let same = pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits());
        ensure!(same && pa.len() == pb.len(), "on the {name}: two runs differ");
        let la: Vec<u32> = a[0].records.iter().map(|r| r.loss.to_bits()).collect();
        let lb: Vec<u32> = b[0].records.iter().map(|r| r.loss.to_bits()).collect();
        ensure!(la == lb, "on the {name}: losses differ between runs");
    }
    Ok(())
}

#[test]
fn gpipe_on_gpu_stages_holds_every_microbatch_and_matches() -> Result<()> {
    compare(
        &["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=\"gpipe\""],
        DType::F32,
        1e-5,
    )
}

/// Interleaved 1F1B (two chunks per rank, the embedding and head on different ranks, so the
/// tied embedding's gradient crosses the embedding group) × two data-parallel replicas with
/// the distributed optimizer: the reducer, ZeRO shards and parameter all-gather on GPU stages.
#[test]
fn interleaved_with_zero_on_gpu_stages_matches_the_cpu() -> Result<()> {
    compare(
        &[
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.pipeline_schedule=\"interleaved\"",
            "parallel.data_parallel_size=2",
            "parallel.use_distributed_optimizer=true",
            "parallel.grad_bucket_size=3000",
        ],
        DType::F32,
        1e-5,
    )
}

/// Interleaved × DP 2 without ZeRO: both chunks of a rank sum their gradients over the same
/// device group (each during its own last backward, in the schedule's order, which every
/// data-parallel peer shares), and the tied embedding over the device embedding group.
#[test]
fn interleaved_chunks_share_the_device_group() -> Result<()> {
    compare(
        &[
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.pipeline_schedule=\"interleaved\"",
            "parallel.data_parallel_size=2",
        ],
        DType::F32,
        1e-5,
    )
}

/// Without the distributed optimizer the AdamW update runs on the device and the gradients of a
/// step without data parallelism never leave it; the tied embedding's gradient is summed
/// across the embedding group from the device (interleaved: the embedding and the head on
/// different ranks) and on one rank (ZB-V's V placement: both on rank 0).
#[test]
fn the_device_optimizer_with_the_embedding_group_matches_the_cpu() -> Result<()> {
    compare(
        &[
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.pipeline_schedule=\"interleaved\"",
        ],
        DType::F32,
        1e-5,
    )?;
    compare(
        &[
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.pipeline_schedule=\"zb-v\"",
        ],
        DType::F32,
        1e-5,
    )
}

/// Bytes copied between host and device per training step: with the optimizer on the device
/// (PP 2, no data parallelism) a step moves microbatch inputs, activations, the tied embedding's
/// gradient and a few scalars — well under one copy of the parameter arena — while the host
/// optimizer (ZeRO-1 with one replica and `host_grad_reduce`, which keeps the distributed
/// optimizer's shards on the host) moves every gradient down and every parameter up.
/// Per step = (bytes after 4 steps − bytes after 2) / 2, which cancels the setup and the final
/// read of the parameters. The host optimizer's stages hold no device moments.
#[test]
fn the_device_optimizer_keeps_parameters_on_the_device() -> Result<()> {
    use troupe::gpu::Gpu;
    if troupe::gpu::emu::shared().is_none() {
        eprintln!("SKIPPED: no kernel emulator (g++ missing or TROUPE_SKIP_EMU set)");
        return Ok(());
    }
    // A private emulator: its copy counters see only this test's runs.
    let gpu: &'static troupe::gpu::EmuGpu = Box::leak(Box::new(troupe::gpu::EmuGpu::new()?));
    let per_step = |extra: &[&str], host: bool| -> Result<(f64, f64, usize, usize)> {
        let mut counts = Vec::new();
        let (mut arena, mut peak) = (0, 0);
        for iters in ["train.train_iters=2", "train.train_iters=4"] {
            let mut sets = vec!["parallel.pipeline_model_parallel_size=2", iters];
            sets.extend_from_slice(extra);
            let cfg = config(&sets)?;
            gpu.reset_peak_memory();
            let before = gpu.memory();
            let opts = RunOptions {
                timeout: Duration::from_secs(120),
                device: Some(StageFactory::new(gpu, DType::F32)),
                host_grad_reduce: host,
                ..RunOptions::default()
            };
            let results = train_inproc(&cfg, data(&cfg), opts, 2, None, None)?;
            let after = gpu.memory();
            arena = 4 * params(&results).len();
            peak = after.peak;
            counts.push((after.to_device - before.to_device, after.to_host - before.to_host));
        }
        let up = (counts[1].0 as f64 - counts[0].0 as f64) / 2.0;
        let down = (counts[1].1 as f64 - counts[0].1 as f64) / 2.0;
        Ok((up, down, arena, peak))
    };
    let (up, down, arena, peak) = per_step(&[], false)?;
    let (host_up, host_down, _, host_peak) = per_step(&["parallel.use_distributed_optimizer=true"], true)?;
    // The device optimizer's moments (two fp32 arenas) are the only device memory the host
    // optimizer's stages do not hold.
    let extra = peak as f64 - host_peak as f64;
    eprintln!("device memory peak: {peak} B with the device optimizer, {host_peak} B with the host one");
    ensure!(
        (extra - 2.0 * arena as f64).abs() <= 0.05 * arena as f64 + 65536.0,
        "the device optimizer holds {extra} B more device memory, expected its moments ({} B)",
        2 * arena
    );
    eprintln!(
        "per step: device optimizer {up:.0} B up, {down:.0} B down; host optimizer {host_up:.0} B up, \
         {host_down:.0} B down; parameter arena {arena} B"
    );
    ensure!(
        host_up >= arena as f64 && host_down >= arena as f64,
        "the host optimizer moved only {host_up} B up and {host_down} B down per step (arena {arena} B)"
    );
    ensure!(
        up < 0.5 * arena as f64 && down < 0.5 * arena as f64,
        "the device optimizer moved {up} B up and {down} B down per step (arena {arena} B)"
    );
    Ok(())
}

/// The distributed optimizer beside a device group (ZeRO-1 on the devices): each data-parallel
/// rank updates its shard of every bucket on its device and the group gathers the others' shards
/// (broadcasts of the parameters the kernels read: bf16, rounded by the owner from its master
/// weights, or fp32). With clipping off (the sharded norm adds its parts in another order) it
/// gives the unsharded device optimizer's bits in fp32 and bf16 — a replica that ran its forward
/// on a stale copy of a peer's shard would not, nor would a final all-gather that missed the
/// owners' fp32 master weights — and it holds moments, and in bf16 fp32 master weights, for its
/// shard only: the device memory peak is lower by one parameter arena of all ranks (m and v of
/// half of each replica's arena), and by half of one more in bf16 (the masters of the other
/// half). Small buckets make shards of several ranges that cut tensors.
#[test]
fn the_distributed_optimizer_shards_on_the_device() -> Result<()> {
    use troupe::gpu::Gpu;
    if troupe::gpu::emu::shared().is_none() {
        eprintln!("SKIPPED: no kernel emulator (g++ missing or TROUPE_SKIP_EMU set)");
        return Ok(());
    }
    // A private emulator: its memory peak sees only this test's runs.
    let gpu: &'static troupe::gpu::EmuGpu = Box::leak(Box::new(troupe::gpu::EmuGpu::new()?));
    let base = [
        "parallel.pipeline_model_parallel_size=2",
        "parallel.data_parallel_size=2",
        "parallel.grad_bucket_size=3000",
        "train.clip_grad=0.0",
    ];
    for dtype in [DType::F32, DType::Bf16] {
        let mut runs = Vec::new();
        for dist in [false, true] {
            let mut sets = base.to_vec();
            if dist {
                sets.push("parallel.use_distributed_optimizer=true");
            }
            gpu.reset_peak_memory();
            let results =
                run(&config(&sets)?, Some(StageFactory::new(gpu, dtype).with_host_groups(gpu)), &[])?;
            runs.push((results, gpu.memory().peak));
        }
        let [(plain, plain_peak), (sharded, sharded_peak)] = &runs[..] else { unreachable!("two runs") };
        for (a, b) in plain[0].records.iter().zip(&sharded[0].records) {
            ensure!(
                a.loss.to_bits() == b.loss.to_bits(),
                "{dtype:?}: step {} loss {} sharded vs {} unsharded",
                a.step,
                b.loss,
                a.loss
            );
            ensure!(!b.skipped, "{dtype:?}: step {} skipped", b.step);
        }
        let same = params(plain).iter().zip(&params(sharded)).all(|(x, y)| x.to_bits() == y.to_bits());
        ensure!(same, "{dtype:?}: the sharded device optimizer's parameters differ from the unsharded one's");
        let arena = 4 * params(plain).len();
        let saved = *plain_peak as f64 - *sharded_peak as f64;
        let expect = if dtype == DType::Bf16 { 1.5 * arena as f64 } else { arena as f64 };
        eprintln!(
            "{dtype:?}: device memory peak {plain_peak} B unsharded, {sharded_peak} B sharded; arena of all \
             ranks {arena} B"
        );
        ensure!(
            (saved - expect).abs() <= 0.05 * arena as f64 + 65536.0,
            "{dtype:?}: sharding saved {saved} B of device memory, expected {expect} B (half the moments, \
             and in bf16 half the master weights; arena of all ranks {arena} B)"
        );
    }
    Ok(())
}

/// A bf16 device's activations and input gradients are bf16 values, so bf16 pipeline messages
/// (the default there) carry them exactly in half the bytes: the run gives the bits of one with
/// fp32 messages, checksums included, and sends about half as many bytes.
#[test]
fn bf16_messages_between_bf16_stages_lose_nothing() -> Result<()> {
    use troupe::comm::DType as Wire;
    let cfg = config(&["parallel.pipeline_model_parallel_size=2"])?;
    for (name, dev) in devices(DType::Bf16) {
        let go = |wire: Option<Wire>| {
            let opts = RunOptions {
                timeout: Duration::from_secs(120),
                device: Some(dev.clone()),
                message_dtype: wire,
                ..RunOptions::default()
            };
            train_inproc(&cfg, data(&cfg), opts, 2, None, None)
        };
        let (auto, fp32) = (go(None)?, go(Some(Wire::F32))?);
        let bits = |r: &[RankResult]| params(r).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        ensure!(bits(&auto) == bits(&fp32), "on the {name}: bf16 messages changed the parameters");
        let losses = |r: &[RankResult]| r[0].records.iter().map(|x| x.loss.to_bits()).collect::<Vec<_>>();
        ensure!(losses(&auto) == losses(&fp32), "on the {name}: bf16 messages changed the losses");
        let sent = |r: &[RankResult]| r.iter().map(|x| x.sent_bytes).sum::<u64>() as f64;
        let ratio = sent(&auto) / sent(&fp32);
        eprintln!("on the {name}: bf16 messages send {ratio:.3} of the fp32 bytes");
        ensure!((0.49..0.52).contains(&ratio), "on the {name}: bf16 messages sent {ratio:.3} of the bytes");
    }
    Ok(())
}

/// Pipeline messages between the devices (a two-rank device link per pair of pipeline
/// neighbours, each message a broadcast from its sender queued in program order; on the
/// emulator through the host's communicator, landing only when the reader waits for it) give
/// the bits of messages through the host, in fp32 and bf16: 1F1B over four ranks, interleaved
/// (the last rank's chunk sends to rank 0's next one), ZB-V (split backwards) with data
/// parallelism and the distributed optimizer beside the links, and a traced step in the
/// middle (its messages go through the host while the steps around it use the links).
#[test]
fn pipeline_messages_between_the_devices_give_the_host_messages_bits() -> Result<()> {
    let layouts: [&[&str]; 4] = [
        &["parallel.pipeline_model_parallel_size=4", "train.global_batch_size=6"],
        &[
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.pipeline_schedule=\"interleaved\"",
        ],
        &[
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.pipeline_schedule=\"zb-v\"",
            "parallel.data_parallel_size=2",
            "parallel.use_distributed_optimizer=true",
            "parallel.grad_bucket_size=3000",
        ],
        &["parallel.pipeline_model_parallel_size=2"],
    ];
    for dtype in [DType::F32, DType::Bf16] {
        for (name, dev) in devices(dtype) {
            for (i, sets) in layouts.iter().enumerate() {
                let cfg = config(sets)?;
                let traced = i == layouts.len() - 1;
                let go = |host_p2p: bool| {
                    let opts = RunOptions {
                        timeout: Duration::from_secs(120),
                        device: Some(dev.clone()),
                        host_p2p,
                        trace_step: traced.then_some(2),
                        ..RunOptions::default()
                    };
                    train_inproc(&cfg, data(&cfg), opts, 2, None, None)
                };
                let (linked, host) = (go(false)?, go(true)?);
                let what = format!("{sets:?} on the {name} ({dtype:?})");
                ensure!(linked.iter().all(|r| r.p2p_on_device), "{what}: the messages did not use the links");
                ensure!(host.iter().all(|r| !r.p2p_on_device), "{what}: --host-p2p used the links");
                let bits = |r: &[RankResult]| params(r).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                ensure!(bits(&linked) == bits(&host), "{what}: the device links changed the parameters");
                let steps = |r: &[RankResult]| {
                    r[0].records.iter().map(|x| (x.loss.to_bits(), x.grad_norm.to_bits())).collect::<Vec<_>>()
                };
                ensure!(steps(&linked) == steps(&host), "{what}: the device links changed losses or norms");
                ensure!(linked[0].records.len() == 3, "{what}: {} steps", linked[0].records.len());
                let sent = |r: &[RankResult]| r.iter().map(|x| x.messages).sum::<u64>();
                ensure!(
                    sent(&linked) == sent(&host),
                    "{what}: {} messages vs {}",
                    sent(&linked),
                    sent(&host)
                );
                if traced {
                    // The traced step's sends and receives are in the trace either way.
                    let p2p = |r: &[RankResult]| r[0].events.iter().filter(|e| e.bytes.is_some()).count();
                    ensure!(p2p(&linked) > 0 && p2p(&linked) == p2p(&host), "{what}: traced messages");
                }
            }
        }
    }
    Ok(())
}

/// Data parallelism alone on the runtime: one whole-model chunk per rank, whose gradient ranges
/// are drained to the reducer during the last backward (the tied `wte` last, with both its head
/// and embedding parts).
#[test]
fn data_parallel_gpu_stages_match_the_cpu() -> Result<()> {
    compare(&["parallel.data_parallel_size=2", "parallel.grad_bucket_size=3000"], DType::F32, 1e-5)
}

#[test]
fn bf16_gpu_stages_track_the_fp32_cpu() -> Result<()> {
    compare(&["parallel.pipeline_model_parallel_size=2"], DType::Bf16, 2e-3)
}

/// A NaN poisoned into a GPU stage's gradient (pipeline rank 1, step 2) is found by the step-end
/// agreement and the step is skipped on every rank, as on the CPU; training goes on.
#[test]
fn an_injected_nan_on_a_gpu_stage_skips_the_step() -> Result<()> {
    let cfg = config(&["parallel.pipeline_model_parallel_size=2", "train.nan_policy=\"skip\""])?;
    // A NaN gradient; a NaN loss, which the device keeps until the step's end (deferred).
    for fault in ["nan:rank=1,step=2,what=grad", "nan:rank=1,step=2,what=loss"] {
        let cpu = run(&cfg, None, &[fault])?;
        let want: Vec<bool> = cpu[0].records.iter().map(|r| r.skipped).collect();
        ensure!(want == [false, true, false], "{fault}: the CPU run skipped {want:?}");
        for (name, dev) in devices(DType::F32) {
            let got = run(&cfg, Some(dev), &[fault])?;
            let skipped: Vec<bool> = got[0].records.iter().map(|r| r.skipped).collect();
            ensure!(skipped == want, "{fault} on the {name}: skipped {skipped:?}, CPU {want:?}");
            ensure!(
                got[0].records[1].nonfinite_ranks == [1],
                "{fault}: {:?}",
                got[0].records[1].nonfinite_ranks
            );
            ensure!(got[0].records[1].loss.is_nan() == (fault.ends_with("loss")), "{fault}: step 2's loss");
            let d = rel_norm(&params(&got), &params(&cpu));
            ensure!(d <= 1e-5, "{fault} on the {name}: parameters after the skipped step differ by {d:.2e}");
        }
    }
    Ok(())
}

/// Zero-bubble schedules split each backward into its input half (I) and weight half (W) on
/// the device (`src/gpu/model/split.rs`): ZB-H1, and ZB-V with two chunks per rank in the V
/// placement (the first and last stage on one rank) with data parallelism, with and without the
/// distributed optimizer.
#[test]
fn zero_bubble_schedules_on_gpu_stages_match_the_cpu() -> Result<()> {
    compare(
        &["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=\"zb-h1\""],
        DType::F32,
        1e-5,
    )?;
    // ZB-V × DP 2, and with the distributed optimizer on the devices under the split backward
    // (the last W of a chunk reduces the buckets; the next step's I and W read the gathered
    // parameters).
    let zb_v = [
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
        "parallel.pipeline_schedule=\"zb-v\"",
        "parallel.data_parallel_size=2",
        "parallel.grad_bucket_size=3000",
    ];
    for zero in [false, true] {
        let mut sets = zb_v.to_vec();
        if zero {
            sets.push("parallel.use_distributed_optimizer=true");
        }
        compare(&sets, DType::F32, 1e-5)?;
    }
    Ok(())
}

/// On the device, I then W gives the fused backward's bits: parameter gradients after two
/// microbatches split as I₀ I₁ W₀ W₁ equal fused backwards of 0 then 1, and each I's input
/// gradient equals the fused one's — on a middle stage (hidden states in and out) and on the
/// whole model (embedding and head).
#[test]
fn split_backward_on_the_device_gives_the_fused_bits() -> Result<()> {
    use troupe::gpu::model::GpuGpt;
    use troupe::models::gpt::{Gpt, LayerRange, StageInput};
    let Some(emu) = troupe::gpu::emu::shared() else { return Ok(()) };
    let cfg = config(&[])?.model;
    let (b, t, c) = (2, 8, cfg.hidden_size);
    let mut rng = Rng::derived(5, "split");
    let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let hidden = [normal(b * t * c), normal(b * t * c)];
    let douts = [normal(b * t * c), normal(b * t * c)];
    let mut rng = Rng::derived(6, "split-ids");
    let mut ids =
        || -> Vec<u32> { (0..b * t).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect() };
    let (tokens, targets) = ([ids(), ids()], ids());
    for (range, whole) in [
        (LayerRange { first: 1, last: 3, embedding: false, head: false }, false),
        (LayerRange::full(&cfg), true),
    ] {
        for dtype in [DType::F32, DType::Bf16] {
            let host = Gpt::new_range(&cfg, range, 9)?;
            let make = || GpuGpt::from_range_params(emu, &cfg, range, host.params(), dtype);
            let (mut fused, mut split) = (make()?, make()?);
            for mb in 0..2 {
                let input =
                    if whole { StageInput::Tokens(&tokens[mb]) } else { StageInput::Hidden(&hidden[mb]) };
                let tg = whole.then_some(&targets[..]);
                fused.forward_mb(mb as u64, b, t, input, tg, 1.0)?;
                split.forward_mb(mb as u64, b, t, input, tg, 1.0)?;
            }
            let dout = |mb: usize| (!whole).then(|| &douts[mb][..]);
            // (On the whole model this is the gradient at the embedding output.)
            let mut fused_dinp = Vec::new();
            for mb in 0..2 {
                fused.backward_mb(mb as u64, dout(mb), &mut |_, _| Ok(()))?;
                fused_dinp.push(fused.input_grad()?);
            }
            for (mb, want) in fused_dinp.iter().enumerate() {
                split.backward_input_mb(mb as u64, dout(mb))?;
                let got = split.input_grad()?;
                ensure!(
                    got.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{range:?} {dtype:?}: input gradient of microbatch {mb} differs from the fused backward's"
                );
            }
            ensure!(split.in_flight() == 2, "I freed activations");
            let mut split_ranges = Vec::new();
            for mb in 0..2 {
                split.backward_weight_mb(mb as u64, &mut |r, _| {
                    split_ranges.push(r);
                    Ok(())
                })?;
            }
            ensure!(split.in_flight() == 0, "W kept activations");
            let (g1, g2) = (fused.grads_host()?, split.grads_host()?);
            let same = g1.iter().zip(&g2).all(|(x, y)| x.to_bits() == y.to_bits());
            ensure!(
                same,
                "{range:?} {dtype:?}: gradients differ from the fused backward's (max diff {:.2e})",
                g1.iter().zip(&g2).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
            );
            ensure!(g1.iter().any(|&x| x != 0.0), "no gradient at all");
            // W reports the fused backward's ranges once per microbatch.
            let mut fused_ranges = Vec::new();
            let mut again = make()?;
            let input = if whole { StageInput::Tokens(&tokens[0]) } else { StageInput::Hidden(&hidden[0]) };
            again.forward_mb(0, b, t, input, whole.then_some(&targets[..]), 1.0)?;
            again.backward_mb(0, dout(0), &mut |r, _| {
                fused_ranges.push(r);
                Ok(())
            })?;
            ensure!(
                split_ranges.len() == 2 * fused_ranges.len()
                    && split_ranges[..fused_ranges.len()] == fused_ranges[..],
                "W ranges {split_ranges:?}, fused {fused_ranges:?}"
            );
        }
    }
    Ok(())
}

/// A weight half before its input half, a second input half and a fused backward after an
/// input half are errors, not corruption.
#[test]
fn split_backward_misuse_is_an_error() -> Result<()> {
    use troupe::gpu::model::GpuGpt;
    use troupe::models::gpt::{LayerRange, StageInput};
    let Some(emu) = troupe::gpu::emu::shared() else { return Ok(()) };
    let cfg = config(&[])?.model;
    let range = LayerRange { first: 0, last: 1, embedding: false, head: false };
    let host = troupe::models::gpt::Gpt::new_range(&cfg, range, 1)?;
    let mut m = GpuGpt::from_range_params(emu, &cfg, range, host.params(), DType::F32)?;
    let h = vec![0.5f32; 16 * cfg.hidden_size];
    m.forward_mb(3, 1, 16, StageInput::Hidden(&h), None, 1.0)?;
    let e = m.backward_weight_mb(3, &mut |_, _| Ok(())).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("before its backward_input"), "{e}");
    m.backward_input_mb(3, Some(&h))?;
    let e = m.backward_input_mb(3, Some(&h)).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("already ran"), "{e}");
    let e = m.backward_mb(3, Some(&h), &mut |_, _| Ok(())).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("already ran"), "{e}");
    m.backward_weight_mb(3, &mut |_, _| Ok(()))?;
    ensure!(m.in_flight() == 0, "microbatch still in flight");
    Ok(())
}

/// ZB-V's turn (the last rank holds two consecutive stages) hands the activation and the
/// gradient from one chunk to the other on the device with device links: per step the host
/// copies exactly those messages fewer (one each way per microbatch and direction) than with
/// `--host-p2p`, and the bits are the same.
#[test]
fn the_v_turn_stays_on_the_device() -> Result<()> {
    use troupe::gpu::Gpu;
    if troupe::gpu::emu::shared().is_none() {
        eprintln!("SKIPPED: no kernel emulator (g++ missing or TROUPE_SKIP_EMU set)");
        return Ok(());
    }
    // A private emulator: its copy counters see only this test's runs.
    let gpu: &'static troupe::gpu::EmuGpu = Box::leak(Box::new(troupe::gpu::EmuGpu::new()?));
    let per_step = |host_p2p: bool| -> Result<(f64, f64, Vec<u32>)> {
        let mut counts = Vec::new();
        let mut bits = Vec::new();
        for iters in ["train.train_iters=2", "train.train_iters=4"] {
            let cfg = config(&[
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "parallel.pipeline_schedule=\"zb-v\"",
                iters,
            ])?;
            let before = gpu.memory();
            let opts = RunOptions {
                timeout: Duration::from_secs(120),
                device: Some(StageFactory::new(gpu, DType::F32).with_host_groups(gpu)),
                host_p2p,
                // Messages only: the emulator's links go through the host, where each
                // message's checksum would add its own few bytes.
                checksums: false,
                ..RunOptions::default()
            };
            let results = train_inproc(&cfg, data(&cfg), opts, 2, None, None)?;
            let after = gpu.memory();
            counts.push((after.to_device - before.to_device, after.to_host - before.to_host));
            bits = params(&results).iter().map(|x| x.to_bits()).collect();
        }
        let up = (counts[1].0 as f64 - counts[0].0 as f64) / 2.0;
        let down = (counts[1].1 as f64 - counts[0].1 as f64) / 2.0;
        Ok((up, down, bits))
    };
    let (up, down, linked) = per_step(false)?;
    let (host_up, host_down, host) = per_step(true)?;
    ensure!(linked == host, "the device links changed the parameters");
    // 4 microbatches of 1 × 16 tokens × 32 fp32 values, an activation and a gradient each.
    let turn = (4 * 2 * 16 * 32 * 4) as f64;
    eprintln!(
        "per step: links {up:.0} B up, {down:.0} B down; host messages {host_up:.0} up, {host_down:.0} down"
    );
    ensure!(host_up - up == turn, "{} B fewer up per step, expected the turn's {turn}", host_up - up);
    ensure!(
        host_down - down == turn,
        "{} B fewer down per step, expected the turn's {turn}",
        host_down - down
    );
    Ok(())
}

/// With device links the host only queues the waits for messages, so a linked step's bubble
/// is measured on the device's clock (the compute stream's stalls at those waits, over the
/// step's span there): a straggler's neighbour is seen idling as much as with messages through
/// the host. (On the host's clock the waits count as busy, and the bubble read about 0.)
#[test]
fn the_bubble_of_a_linked_step_is_measured_on_the_device() -> Result<()> {
    let cfg = config(&["parallel.pipeline_model_parallel_size=2"])?;
    for (name, dev) in devices(DType::F32) {
        let go = |host_p2p: bool| -> Result<Vec<RankResult>> {
            let mut opts = RunOptions {
                timeout: Duration::from_secs(120),
                device: Some(dev.clone()),
                host_p2p,
                ..RunOptions::default()
            };
            // Rank 1 (the last stage) computes 6× slower in step 2: rank 0 waits for its gradients.
            opts.faults.faults.push("slow:rank=1,step=2,factor=6".parse()?);
            Ok(train_inproc(&cfg, data(&cfg), opts, 2, None, None)?)
        };
        let (linked, host) = (go(false)?, go(true)?);
        ensure!(linked.iter().all(|r| r.p2p_on_device), "{name}: the messages did not use the links");
        let bubbles = |r: &[RankResult]| r[0].records.iter().map(|x| x.bubble).collect::<Vec<_>>();
        let (b, h) = (bubbles(&linked), bubbles(&host));
        eprintln!("{name}: measured bubbles with links {b:?}, through the host {h:?}");
        ensure!(h[1] > 1.0, "{name}: through the host the straggler's neighbour idled only {:.3}", h[1]);
        // Wall-clock measures on a loaded machine: the two runs land within 2× of each other
        // (4.3 vs 8.8 under CI's parallel tests, 7.2 vs 6.4 alone), the host clock of a linked
        // step read 0.03 — the bounds sit between.
        ensure!(
            b[1] > 1.0 && b[1] > 0.2 * h[1],
            "{name}: with links step 2's bubble reads {:.3}, through the host {:.3}",
            b[1],
            h[1]
        );
        ensure!(b.iter().all(|x| x.is_finite() && *x >= 0.0), "{name}: bubbles {b:?}");
    }
    Ok(())
}

/// A GPU stage that crashes mid-step is the run's root cause, not its peer's failed receive
/// over their device link (which names the lost peer) — and the run ends instead of hanging.
#[test]
fn a_crashed_gpu_stage_is_the_root_cause_over_its_device_link() -> Result<()> {
    let cfg = config(&["parallel.pipeline_model_parallel_size=2"])?;
    for (name, dev) in devices(DType::Bf16) {
        let err = match run(&cfg, Some(dev), &["crash:rank=1,step=2"]) {
            Ok(_) => anyhow::bail!("on the {name}: the run survived a crash"),
            Err(e) => e.to_string(),
        };
        ensure!(
            err.contains("rank 1, step 2") && err.contains("injected failure"),
            "on the {name}: the reported error is not the crash: {err}"
        );
    }
    Ok(())
}

/// Pipeline messages on device links carry checksums, as host messages carry a CRC32: a
/// corrupt fault injected on a link — a damaged copy sent by rank 0 (activations) or rank 1
/// (gradients), or a message damaged as rank 1 reads it (`recv=`) — fails the step with an
/// error naming the message and the sending rank, in fp32 and bf16. With `--no-checksums` the
/// same damage goes through unnoticed, on the links, and changes the parameters (so the fault
/// did damage the message, and the checksums are what caught it).
#[test]
fn corruption_on_a_device_link_is_caught_by_its_checksum() -> Result<()> {
    let cfg = config(&["parallel.pipeline_model_parallel_size=2"])?;
    let cases = [
        ("corrupt:rank=0,step=2", "corrupt activation of microbatch 0 from rank 0"),
        ("corrupt:rank=1,step=2,phase=cooldown", "corrupt gradient of microbatch 3 from rank 1"),
        ("corrupt:rank=1,step=2,recv=2", "corrupt activation of microbatch 1 from rank 0"),
    ];
    for dtype in [DType::F32, DType::Bf16] {
        for (name, dev) in devices(dtype) {
            let go = |fault: Option<&str>, checksums: bool| -> Result<Vec<RankResult>> {
                let mut opts = RunOptions {
                    timeout: Duration::from_secs(120),
                    device: Some(dev.clone()),
                    checksums,
                    ..RunOptions::default()
                };
                opts.faults.faults.extend(fault.map(str::parse).transpose()?);
                Ok(train_inproc(&cfg, data(&cfg), opts, 2, None, None)?)
            };
            let clean = go(None, true)?;
            ensure!(
                clean.iter().all(|r| r.p2p_on_device),
                "on the {name}: the messages did not use the links"
            );
            let bits = |r: &[RankResult]| params(r).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (fault, want) in cases {
                let what = format!("{fault} on the {name} ({dtype:?})");
                let err = match go(Some(fault), true) {
                    Ok(_) => anyhow::bail!("{what}: the damaged message went through"),
                    Err(e) => e.to_string(),
                };
                ensure!(
                    err.contains(want) && err.contains("device checksum") && err.contains("step 2"),
                    "{what}: {err}"
                );
                eprintln!("{what}: {err}");
                let unchecked = go(Some(fault), false)?;
                ensure!(
                    unchecked.iter().all(|r| r.p2p_on_device),
                    "{what}: the fault moved the messages off the links"
                );
                ensure!(
                    bits(&unchecked) != bits(&clean),
                    "{what}: without checksums the damage changed nothing"
                );
            }
        }
    }
    Ok(())
}

/// A stage's messages on the device: an input that arrived in a message buffer gives the
/// forward of the same values from the host, bit for bit, after the arrival's wait; an output
/// gradient that arrived gives the backward's input gradient, kept on the device for its send;
/// and misuse is an error.
#[test]
fn device_messages_carry_the_host_inputs_bits_and_misuse_is_an_error() -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use troupe::gpu::model::GpuGpt;
    use troupe::gpu::{Dev, Gpu, download_f32, encode};
    use troupe::models::gpt::{LayerRange, StageInput};
    let Some(emu) = troupe::gpu::emu::shared() else {
        eprintln!("SKIPPED: no kernel emulator");
        return Ok(());
    };
    let cfg = config(&[])?.model;
    let range = LayerRange { first: 1, last: 2, embedding: false, head: false };
    let host = troupe::models::gpt::Gpt::new_range(&cfg, range, 1)?;
    let n = 2 * 16 * cfg.hidden_size;
    let mut rng = Rng::derived(5, "device-messages");
    let mut vals = || (0..n).map(|_| (rng.next_u64() % 1000) as f32 / 500.0 - 1.0).collect::<Vec<f32>>();
    let (h, g) = (vals(), vals());
    for dtype in [DType::F32, DType::Bf16] {
        let mut reference = GpuGpt::from_range_params(emu, &cfg, range, host.params(), dtype)?;
        reference.forward_mb(4, 2, 16, StageInput::Hidden(&h), None, 1.0)?;
        let out = reference.output(4)?.unwrap_or_default();
        reference.backward_mb(4, Some(&g), &mut |_, _| Ok(()))?;
        let dinput = reference.input_grad()?;

        let mut m = GpuGpt::from_range_params(emu, &cfg, range, host.params(), dtype)?;
        ensure!(m.message_elems(2, 16) == n, "message size");
        let waited = Arc::new(AtomicUsize::new(0));
        let arrival = |m: &mut GpuGpt<'static, _>, values: &[f32]| -> Result<_> {
            let buf = m.message_buffer(n)?;
            emu.write(Dev::new(&buf), &encode(values, dtype))?;
            let w = waited.clone();
            let ready: troupe::gpu::model::Ready = Box::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
                Ok(())
            });
            Ok((buf, Some(ready)))
        };
        let e = m.forward_mb(4, 2, 16, StageInput::Arrived, None, 1.0).err().map(|e| e.to_string());
        ensure!(e.as_deref().is_some_and(|e| e.contains("has not arrived")), "{e:?}");
        let (buf, ready) = arrival(&mut m, &h)?;
        m.input_arriving(4, buf, ready)?;
        // A second input of the microbatch is refused (its buffer kept as a free one).
        let buf = m.message_buffer(n)?;
        let e = m.input_arriving(4, buf, None).err().map(|e| e.to_string());
        ensure!(e.as_deref().is_some_and(|e| e.contains("already arrived")), "{e:?}");
        m.forward_mb(4, 2, 16, StageInput::Arrived, None, 1.0)?;
        ensure!(waited.load(Ordering::SeqCst) == 1, "the forward did not wait for its input");
        let (at, len) = m.output_buffer(4)?;
        let sent = download_f32(emu, at, len, dtype)?;
        ensure!(
            sent.iter().map(|x| x.to_bits()).eq(out.iter().map(|x| x.to_bits())),
            "{dtype:?}: the output from an arrived input differs"
        );
        let (buf, ready) = arrival(&mut m, &g)?;
        m.output_grad_arriving(4, buf, ready)?;
        let e = m.backward_mb(4, Some(&g), &mut |_, _| Ok(())).err().map(|e| e.to_string());
        ensure!(e.as_deref().is_some_and(|e| e.contains("another arrived")), "{e:?}");
        m.backward_mb(4, None, &mut |_, _| Ok(()))?;
        ensure!(waited.load(Ordering::SeqCst) == 2, "the backward did not wait for its gradient");
        m.keep_input_grad(4)?;
        let e = m.keep_input_grad(4).err().map(|e| e.to_string());
        ensure!(e.as_deref().is_some_and(|e| e.contains("kept already")), "{e:?}");
        let (at, len) = m.kept_input_grad(4)?;
        let kept = download_f32(emu, at, len, dtype)?;
        ensure!(
            kept.iter().map(|x| x.to_bits()).eq(dinput.iter().map(|x| x.to_bits())),
            "{dtype:?}: the kept input gradient differs from the host backward's"
        );
        ensure!(m.messages_held() == 1, "{} messages held", m.messages_held());
        m.input_grad_sent(4, None);
        ensure!(m.messages_held() == 0 && m.kept_input_grad(4).is_err(), "the sent gradient is still held");
        // The ends of the pipeline receive nothing from their outer side.
        let first = LayerRange { first: 0, last: 1, embedding: true, head: false };
        let h0 = troupe::models::gpt::Gpt::new_range(&cfg, first, 1)?;
        let mut e0 = GpuGpt::from_range_params(emu, &cfg, first, h0.params(), dtype)?;
        let buf = e0.message_buffer(n)?;
        let e = e0.input_arriving(1, buf, None).err().map(|e| e.to_string());
        ensure!(e.as_deref().is_some_and(|e| e.contains("embedding")), "{e:?}");
        let last = LayerRange { first: 3, last: 4, embedding: false, head: true };
        let hl = troupe::models::gpt::Gpt::new_range(&cfg, last, 1)?;
        let mut el = GpuGpt::from_range_params(emu, &cfg, last, hl.params(), dtype)?;
        let buf = el.message_buffer(n)?;
        let e = el.output_grad_arriving(1, buf, None).err().map(|e| e.to_string());
        ensure!(e.as_deref().is_some_and(|e| e.contains("head")), "{e:?}");
        let e = el.output_buffer(1).err().map(|e| e.to_string());
        ensure!(e.as_deref().is_some_and(|e| e.contains("head")), "{e:?}");
    }
    Ok(())
}

/// A head stage on a device keeps its training losses there (`Stage::forward_train` returns
/// `None`: no host sync between the forward and the backward) and gives them at the step's end
/// (`Stage::take_losses`), in forward order, with the bits of the synchronous forward; an
/// injected value replaces its microbatch's loss; a stage without the head defers nothing.
#[test]
fn a_device_head_stage_defers_its_training_losses() -> Result<()> {
    use troupe::kernels::CpuBackend;
    use troupe::models::gpt::{Gpt, LayerRange, StageInput};
    use troupe::runtime::stage::Stage;
    let Some(emu) = troupe::gpu::emu::shared() else { return Ok(()) };
    let cfg = config(&[])?.model;
    let range = LayerRange { first: 1, last: 3, embedding: false, head: true };
    let be = CpuBackend::new(1);
    let factory = StageFactory::new(emu, DType::F32);
    let mut sync = Stage::new(Gpt::new_range(&cfg, range, 7)?, Some(&factory))?;
    let mut deferred = Stage::new(Gpt::new_range(&cfg, range, 7)?, Some(&factory))?;
    let (b, t, c) = (2, 8, cfg.hidden_size);
    let mut rng = Rng::derived(5, "deferred");
    let targets: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
    let mut want = Vec::new();
    for mb in [4u64, 2, 9] {
        let h: Vec<f32> = (0..b * t * c).map(|_| rng.normal() as f32).collect();
        let input = StageInput::Hidden(&h);
        let l = sync.forward(&be, mb, b, t, input, Some(&targets), 0.5)?;
        want.push((mb, l.ok_or_else(|| anyhow::anyhow!("no loss"))?));
        let got = deferred.forward_train(&be, mb, b, t, input, Some(&targets), 0.5)?;
        ensure!(got.is_none(), "microbatch {mb}: the loss {got:?} came to the host at once");
    }
    ensure!(deferred.override_deferred_loss(2, f32::INFINITY), "microbatch 2 is deferred");
    ensure!(!deferred.override_deferred_loss(5, 0.0), "microbatch 5 never ran");
    let got = deferred.take_losses()?;
    want[1].1 = f32::INFINITY;
    let bits = |v: &[(u64, f32)]| v.iter().map(|(m, l)| (*m, l.to_bits())).collect::<Vec<_>>();
    ensure!(bits(&got) == bits(&want), "deferred {got:?} vs synchronous {want:?}");
    ensure!(deferred.take_losses()?.is_empty(), "losses taken twice");
    let body = LayerRange { first: 0, last: 1, embedding: true, head: false };
    let mut first = Stage::new(Gpt::new_range(&cfg, body, 7)?, Some(&factory))?;
    let tokens: Vec<u32> = targets.clone();
    first.forward_train(&be, 0, b, t, StageInput::Tokens(&tokens), None, 0.5)?;
    ensure!(first.take_losses()?.is_empty(), "a stage without the head deferred a loss");
    Ok(())
}

/// A head stage's last backward of a step on the device reports the CPU model's ranges, in its
/// order, with the gradients accumulated over the step already in the host arena; an earlier
/// backward reports nothing; after `sync_grads` the host holds the CPU model's gradients.
#[test]
fn the_last_backward_drains_the_cpu_models_ranges() -> Result<()> {
    use troupe::kernels::CpuBackend;
    use troupe::models::gpt::{Gpt, LayerRange, StageInput};
    use troupe::runtime::stage::Stage;
    let Some(emu) = troupe::gpu::emu::shared() else { return Ok(()) };
    let cfg = config(&[])?.model;
    let range = LayerRange { first: 1, last: 3, embedding: false, head: true };
    let be = CpuBackend::new(1);
    let mut cpu = Gpt::new_range(&cfg, range, 7)?;
    let mut st = Stage::new(Gpt::new_range(&cfg, range, 7)?, Some(&StageFactory::new(emu, DType::F32)))?;
    ensure!(st.on_device(), "no device stage");
    let (b, t, c) = (2, 8, cfg.hidden_size);
    let mut rng = Rng::derived(3, "drain");
    let hidden: Vec<Vec<f32>> =
        (0..2).map(|_| (0..b * t * c).map(|_| rng.normal() as f32).collect()).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
    for (mb, h) in hidden.iter().enumerate() {
        let input = StageInput::Hidden(h);
        cpu.forward(&be, mb as u64, b, t, input, Some(&targets), 0.5)?;
        st.forward(&be, mb as u64, b, t, input, Some(&targets), 0.5)?;
    }
    let mut cpu_ranges = Vec::new();
    cpu.backward_with(&be, 0, None, &mut |_, _| {})?;
    cpu.backward_with(&be, 1, None, &mut |r, _| cpu_ranges.push(r))?;
    let mut early = 0;
    st.backward_report(&be, 0, None, false, &mut |_, _| early += 1)?;
    ensure!(early == 0, "a backward without report reported {early} ranges");
    let mut ranges = Vec::new();
    let mut complete = true;
    let want = cpu.grads().to_vec();
    st.backward_report(&be, 1, None, true, &mut |r, arena| {
        // The reported range already holds the step's full gradient.
        let close = arena[r.clone()]
            .iter()
            .zip(&want[r.clone()])
            .all(|(&a, &w)| (a - w).abs() <= 1e-5 * w.abs().max(1e-2));
        complete &= close;
        ranges.push(r);
    })?;
    ensure!(ranges == cpu_ranges, "device ranges {ranges:?}, CPU {cpu_ranges:?}");
    ensure!(complete, "a reported range did not hold its full gradient");
    st.sync_grads()?;
    st.fold_tied_grad(&be);
    cpu.fold_tied_grad(&be);
    let d = rel_norm(st.grads(), cpu.grads());
    ensure!(d <= 1e-5, "gradients after sync differ by {d:.2e}");
    let di = rel_norm(&st.input_grad(), cpu.input_grad());
    ensure!(di <= 1e-5, "input gradients differ by {di:.2e}");
    Ok(())
}

/// With a data-parallel group on the device (`Stage::with_device_group`), a head stage's last
/// backward of a step sums each gradient range over the group as it finishes it, on the device
/// (through the host's communicator in the emulator; NCCL on GPUs), and `finish_grads` sums
/// what the backward never reported (the tied `wte`): two ranks fed different data then both
/// hold the sum of the CPU model's gradients of each, bit for bit the same on both ranks; the
/// host reducer's callback is never called and the gradients never reach the host arena.
#[test]
fn the_last_backward_sums_over_the_device_group() -> Result<()> {
    use troupe::kernels::CpuBackend;
    use troupe::models::gpt::{Gpt, LayerRange, StageInput};
    use troupe::runtime::stage::Stage;
    let Some(emu) = troupe::gpu::emu::shared() else { return Ok(()) };
    let cfg = config(&[])?.model;
    let range = LayerRange { first: 1, last: 3, embedding: false, head: true };
    let factory = StageFactory::new(emu, DType::F32).with_host_groups(emu);
    let comms = troupe::comm::inproc::world(2, troupe::comm::CommOptions::default())?;
    let mut emb_comms = troupe::comm::inproc::world(2, troupe::comm::CommOptions::default())?.into_iter();
    let (b, t, c) = (2, 8, cfg.hidden_size);
    type RankOut = (Vec<f32>, Vec<f32>, usize, bool, Vec<f32>);
    let outs: Vec<RankOut> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (cfg, factory) = (&cfg, &factory);
                let emb_comm = emb_comms.next();
                scope.spawn(move || -> Result<RankOut> {
                    let be = CpuBackend::new(1);
                    let group = factory.reduce_group(comm)?;
                    let mut cpu = Gpt::new_range(cfg, range, 7)?;
                    let mut st = Stage::with_device_group(Gpt::new_range(cfg, range, 7)?, factory, &group)?;
                    ensure!(st.reduces_on_device(), "the stage does not reduce on the device");
                    let mut rng = Rng::derived(3 + rank as u64, "device-group");
                    for mb in 0..2u64 {
                        let h: Vec<f32> = (0..b * t * c).map(|_| rng.normal() as f32).collect();
                        let tg: Vec<u32> =
                            (0..b * t).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
                        cpu.forward(&be, mb, b, t, StageInput::Hidden(&h), Some(&tg), 0.5)?;
                        st.forward(&be, mb, b, t, StageInput::Hidden(&h), Some(&tg), 0.5)?;
                    }
                    cpu.backward_with(&be, 0, None, &mut |_, _| {})?;
                    cpu.backward_with(&be, 1, None, &mut |_, _| {})?;
                    cpu.fold_tied_grad(&be);
                    let mut called = 0;
                    st.backward_report(&be, 0, None, false, &mut |_, _| called += 1)?;
                    st.backward_report(&be, 1, None, true, &mut |_, _| called += 1)?;
                    st.finish_grads(&be, false)?;
                    let n = st.grads().len();
                    let host_zero = st.grads().iter().all(|&g| g == 0.0);
                    let summed = st.read_grads(0..n)?;
                    let span = st.take_reduce_span()?;
                    ensure!(span.is_some(), "rank {rank}: no reduction span");
                    // A second device group (as the embedding group is): summing the tied wte
                    // range over two ranks that hold the same values doubles it, in place.
                    let emb = factory.reduce_group(emb_comm.ok_or_else(|| anyhow::anyhow!("no comm"))?)?;
                    let wte = st.wte_range().ok_or_else(|| anyhow::anyhow!("no wte"))?;
                    ensure!(
                        st.all_reduce_grads_on_device(wte.clone(), &emb)?,
                        "the gradients are not on the device"
                    );
                    let doubled = st.read_grads(0..n)?;
                    for (i, (&d, &s)) in doubled.iter().zip(&summed).enumerate() {
                        let w = if wte.contains(&i) { 2.0 * s } else { s };
                        ensure!(d == w, "rank {rank}: element {i} is {d} after the wte sum, expected {w}");
                    }
                    Ok((cpu.grads().to_vec(), summed, called, host_zero, st.input_grad()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked")).and_then(|r| r))
            .collect::<Result<Vec<_>>>()
    })?;
    let want: Vec<f32> = outs[0].0.iter().zip(&outs[1].0).map(|(a, b)| a + b).collect();
    for (rank, (_, got, called, host_zero, _)) in outs.iter().enumerate() {
        ensure!(*called == 0, "rank {rank}: the host reducer's callback ran {called} times");
        ensure!(*host_zero, "rank {rank}: gradients reached the host arena");
        let d = rel_norm(got, &want);
        ensure!(d <= 1e-5, "rank {rank}: summed gradients differ from the CPU sum by {d:.2e}");
    }
    ensure!(outs[0].1 == outs[1].1, "the two ranks hold different sums");
    // Each rank's input gradient is its own (the reduction touches parameter gradients only).
    ensure!(outs[0].4 != outs[1].4, "the ranks' input gradients are equal: the data did not differ");
    Ok(())
}

/// GPU stages with data parallelism sum their gradients on the device by default; the host's
/// reducer (`RunOptions::host_grad_reduce`) gives the same training within the tolerance, and
/// the trace shows each chunk's reduction either way. A NaN injected on a data-parallel rank
/// skips the step on every rank with the device reduction too.
#[test]
fn device_and_host_gradient_reductions_agree() -> Result<()> {
    use troupe::schedule::OpKind;
    let sets = ["parallel.pipeline_model_parallel_size=2", "parallel.data_parallel_size=2"];
    let cfg = config(&sets)?;
    let cpu = run(&cfg, None, &[])?;
    for (name, dev) in devices(DType::F32) {
        let mut per_path = Vec::new();
        for host in [false, true] {
            let opts = RunOptions {
                timeout: Duration::from_secs(120),
                device: Some(dev.clone()),
                host_grad_reduce: host,
                trace_step: Some(2),
                ..RunOptions::default()
            };
            let got = train_inproc(&cfg, data(&cfg), opts, 2, None, None)?;
            let what = format!("on the {name}, reduction on the {}", if host { "host" } else { "device" });
            for (g, c) in got[0].records.iter().zip(&cpu[0].records) {
                let dl = f64::from((g.loss - c.loss).abs());
                ensure!(
                    dl <= 1e-5 * f64::from(c.loss.abs()),
                    "{what}: step {} loss {} vs {}",
                    g.step,
                    g.loss,
                    c.loss
                );
                let dn = (g.grad_norm - c.grad_norm).abs() / c.grad_norm;
                ensure!(dn <= 1e-5, "{what}: step {} grad norm {} vs {}", g.step, g.grad_norm, c.grad_norm);
            }
            let d = rel_norm(&params(&got), &params(&cpu));
            ensure!(d <= 1e-5, "{what}: parameters differ from the CPU's by {d:.2e}");
            // Rank 0 holds the step's trace of every pipeline rank: one reduction per chunk each.
            for pp in 0..2u32 {
                let red =
                    got[0].events.iter().filter(|e| e.kind == OpKind::ReduceGrads && e.rank == pp).count();
                ensure!(red == 1, "{what}: pipeline rank {pp} traced {red} reductions for its one chunk");
            }
            per_path.push(params(&got));
        }
        let d = rel_norm(&per_path[0], &per_path[1]);
        ensure!(d <= 1e-5, "on the {name}: device and host reductions differ by {d:.2e}");
        let nan = troupe::config::Config::from_toml_str(
            CONFIG,
            "test",
            &sets
                .iter()
                .map(|s| s.to_string())
                .chain(["train.nan_policy=\"skip\"".to_string()])
                .collect::<Vec<_>>(),
        )?;
        let got = run(&nan, Some(dev.clone()), &["nan:rank=3,step=2,what=grad"])?;
        for (r, res) in got.iter().enumerate() {
            let skipped: Vec<bool> = res.records.iter().map(|x| x.skipped).collect();
            ensure!(skipped == [false, true, false], "on the {name}: rank {r} skipped {skipped:?}");
        }
        let named = &got[0].records[1].nonfinite_ranks;
        ensure!(named.contains(&3), "on the {name}: the NaN's rank 3 is not named: {named:?}");
    }
    Ok(())
}

/// A run's rank results and its (step, evaluation loss) events.
type RunWithEvals = (Vec<RankResult>, Vec<(u64, f32)>);

/// A bf16 pipeline run on GPU stages that stops at step 2 (checkpoint) and resumes to step 4
/// continues the uninterrupted run bit for bit (the checkpoint holds the fp32 master weights and
/// moments; the bf16 copy is rounded again from them); evaluation through the GPU pipeline gives
/// the same loss in both and tracks the CPU's. Also with two replicas and the distributed
/// optimizer on the devices, whose moments are each rank's shard (written as the full arena,
/// restored as the shard).
#[test]
fn gpu_stages_resume_bit_for_bit_and_evaluate() -> Result<()> {
    use troupe::runtime::{RunEvent, ValidData};
    let dir = Scratch::new("gpu-pp-ckpt");
    let save = format!("checkpoint.save=\"{}\"", dir.display());
    let load = format!("checkpoint.load=\"{}\"", dir.display());
    let common = [
        "parallel.pipeline_model_parallel_size=2",
        "train.lr_decay_iters=4",
        "logging.eval_interval=2",
        "logging.eval_iters=2",
    ];
    let layouts: [&[&str]; 2] =
        [&[], &["parallel.data_parallel_size=2", "parallel.use_distributed_optimizer=true"]];
    for layout in layouts {
        let run_eval = |extra: &[&str], device: Option<StageFactory>| -> Result<RunWithEvals> {
            let sets: Vec<&str> = common.iter().chain(layout).chain(extra).copied().collect();
            let cfg = config(&sets)?;
            let src = data(&cfg);
            let opts = RunOptions {
                timeout: Duration::from_secs(120),
                device,
                valid: Some(ValidData(src.clone())),
                ..RunOptions::default()
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let results = train_inproc(&cfg, src, opts, 2, Some(tx), None)?;
            let evals = rx.try_iter().filter_map(|e| {
                if let RunEvent::Eval { step, loss, .. } = e { Some((step, loss)) } else { None }
            });
            Ok((results, evals.collect()))
        };
        let (_, cpu_evals) = run_eval(&["train.train_iters=4"], None)?;
        for (name, dev) in devices(DType::Bf16) {
            let name = format!("{name} {layout:?}");
            let _ = std::fs::remove_dir_all(&dir);
            let (straight, evals) = run_eval(&["train.train_iters=4"], Some(dev.clone()))?;
            run_eval(&["train.train_iters=2", &save, "checkpoint.save_interval=2"], Some(dev.clone()))?;
            let (resumed, resumed_evals) = run_eval(&["train.train_iters=4", &load], Some(dev))?;
            ensure!(
                resumed[0].records.len() == 2 && resumed[0].records[0].step == 3,
                "on the {name}: resumed at step 3"
            );
            for (a, b) in straight[0].records[2..].iter().zip(&resumed[0].records) {
                ensure!(
                    a.loss.to_bits() == b.loss.to_bits(),
                    "on the {name}: step {}: {} vs {}",
                    a.step,
                    a.loss,
                    b.loss
                );
            }
            let bits = |r: &[RankResult]| params(r).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            ensure!(bits(&straight) == bits(&resumed), "on the {name}: resumed parameters differ");
            ensure!(
                evals.len() == 2 && cpu_evals.len() == 2,
                "on the {name}: evaluations {evals:?}, CPU {cpu_evals:?}"
            );
            ensure!(
                resumed_evals.last().map(|e| e.1.to_bits()) == evals.last().map(|e| e.1.to_bits()),
                "on the {name}: step-4 evaluation {resumed_evals:?} vs {evals:?}"
            );
            for ((s, g), (_, c)) in evals.iter().zip(&cpu_evals) {
                ensure!((g - c).abs() <= 2e-3, "on the {name}: evaluation at step {s}: {g} vs CPU {c}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A GPU stage that runs out of device memory (the emulator with a small memory) fails the run
/// with the reason — the allocation, the rank and the instruction — instead of hanging its peers;
/// the device memory is given back when the run ends.
#[test]
fn a_gpu_stage_out_of_device_memory_fails_the_run_with_the_reason() -> Result<()> {
    if troupe::gpu::emu::shared().is_none() {
        return Ok(());
    }
    let cfg = config(&["parallel.pipeline_model_parallel_size=2"])?;
    // Room for both stages' parameters, gradients and moments (fp32: 16 bytes a parameter) and
    // the norm scratch, not for a microbatch's activations.
    let plan = troupe::runtime::Plan::new(&cfg, 2)?;
    let params: usize =
        (0..2).map(|r| troupe::models::gpt::param_table(&cfg.model, plan.range_of(r, 0)).len()).sum();
    let limit = 16 * params + 64 * 1024;
    let gpu: &'static troupe::gpu::EmuGpu =
        Box::leak(Box::new(troupe::gpu::EmuGpu::with_memory_limit(limit)?));
    let started = std::time::Instant::now();
    let err = match run(&cfg, Some(StageFactory::new(gpu, DType::F32)), &[]) {
        Ok(_) => anyhow::bail!("trained within {limit} bytes of device memory"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("the run failed with: {err}");
    ensure!(err.contains("allocating device memory") && err.contains("out of memory"), "{err}");
    ensure!(err.contains("rank"), "the error does not name the rank: {err}");
    ensure!(started.elapsed() < Duration::from_secs(60), "the failure took {:?}", started.elapsed());
    use troupe::gpu::Gpu;
    ensure!(gpu.memory().live == 0, "{} bytes still allocated after the run", gpu.memory().live);
    Ok(())
}

/// Device memory follows the schedule: on GPU stages GPipe (every microbatch's activations held
/// until the backwards) peaks higher than 1F1B (at most p − r in flight), on the emulator's
/// byte count of its buffers; after the run everything is given back.
#[test]
fn gpipe_holds_more_device_memory_than_1f1b() -> Result<()> {
    use troupe::gpu::Gpu;
    if troupe::gpu::emu::shared().is_none() {
        return Ok(());
    }
    let mut peaks = Vec::new();
    for schedule in ["gpipe", "1f1b"] {
        let sets = [
            "parallel.pipeline_model_parallel_size=2".to_string(),
            format!("parallel.pipeline_schedule=\"{schedule}\""),
            "train.global_batch_size=8".into(),
            "train.train_iters=1".into(),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let gpu: &'static troupe::gpu::EmuGpu = Box::leak(Box::new(troupe::gpu::EmuGpu::new()?));
        run(&config(&sets)?, Some(StageFactory::new(gpu, DType::F32)), &[])?;
        ensure!(gpu.memory().live == 0, "{schedule}: {} bytes left allocated", gpu.memory().live);
        peaks.push(gpu.memory().peak);
    }
    eprintln!("peak device memory: gpipe {} B, 1f1b {} B", peaks[0], peaks[1]);
    ensure!(peaks[0] > peaks[1], "GPipe peaked at {} B, 1F1B at {} B", peaks[0], peaks[1]);
    Ok(())
}
