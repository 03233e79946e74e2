//! The GPU GPT (`troupe::gpu::model::GpuGpt`) against the CPU model: same initialisation, same
//! tokens. Runs on the CPU emulator of the kernels everywhere, and on a real GPU when one is
//! present (otherwise that half prints SKIPPED).
//!
//! Tolerances (fp32 mode):
//! - loss: 1e-5 relative — fp32 throughout; the CPU backend's fast exp/tanh and the kernels'
//!   expf/tanhf (fast-math on a GPU) and different summation orders differ by a few ulp per op.
//! - gradients: per tensor ‖Δg‖ ≤ 1e-4·‖g‖ + 1e-7·√len — relative error of a whole backward
//!   through two blocks; tensors whose true gradient is ~0 (the attention key bias) only pass the
//!   absolute term.
//! - parameters after 3 AdamW steps: ‖Δθ‖ ≤ 1e-5·‖θ‖ — Adam divides by √v, which amplifies
//!   gradient noise for tiny gradients, but each update is at most lr in size.
//!
//! Both with the MLP's GELU fused into the products' epilogues (`Gpu::gemm_gelu`; the default)
//! and with the separate GELU kernels, under the same tolerances.
//!
//! bf16 mode: bf16 parameters, activations and gradients change every rounding, so only the loss
//! curve is compared: each of 4 steps within 0.2% of the fp32 CPU loss (measured ≤ 7.5e-5 in the
//! emulator, for head size 32 on the SIMT attention and 64 on the tensor-core kernels; the margin
//! covers a GPU's fast-math exp/tanh and different accumulation orders).

use troupe::gpu::model::GpuGpt;
use troupe::gpu::{DType, Gpu, round_bf16};
use troupe::optim::{AdamW, AdamWConfig, clip_table_grad_norm};
use troupe::{CpuBackend, Gpt, GptConfig, StageInput};

#[path = "common/lcg.rs"]
mod lcg;

fn cfg() -> GptConfig {
    GptConfig {
        vocab_size: 97,
        make_vocab_size_divisible_by: 32,
        seq_length: 24,
        num_layers: 2,
        hidden_size: 64,
        num_attention_heads: 2,
    }
}

/// Head size 64 (GPT-2's): the bf16 path takes the tensor-core attention kernels.
fn cfg64() -> GptConfig {
    GptConfig { hidden_size: 128, num_layers: 1, ..cfg() }
}

fn batch(step: u64, b: usize, t: usize, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let mut g = lcg::Lcg::new(0x9e37_79b9_7f4a_7c15u64 ^ step);
    let mut next = || ((g.next_u64() >> 33) % vocab as u64) as u32;
    let seq: Vec<u32> = (0..b * (t + 1)).map(|_| next()).collect();
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b {
        let row = &seq[r * (t + 1)..(r + 1) * (t + 1)];
        tokens.extend_from_slice(&row[..t]);
        targets.extend_from_slice(&row[1..]);
    }
    (tokens, targets)
}

const LR: f32 = 1e-3;
const CLIP: f32 = 1.0;

/// CPU reference: per step (loss, gradients before clipping), and the final parameters.
fn cpu_run(cfg: &GptConfig, steps: u64, b: usize, t: usize) -> (Vec<(f32, Vec<f32>)>, Vec<f32>) {
    let cfg = cfg.clone();
    let be = CpuBackend::new(1);
    let mut model = Gpt::new(&cfg, 7).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default(), model.params().len());
    let mut out = Vec::new();
    for step in 0..steps {
        let (tokens, targets) = batch(step, b, t, cfg.vocab_size);
        model.zero_grads();
        let loss =
            model.forward(&be, 0, b, t, StageInput::Tokens(&tokens), Some(&targets), 1.0).unwrap().unwrap();
        model.backward(&be, 0, None).unwrap();
        model.fold_tied_grad(&be);
        out.push((loss, model.grads().to_vec()));
        let (table, params, grads) = model.split_mut();
        let table = table.clone();
        clip_table_grad_norm(&be, &table, grads, CLIP);
        opt.update(&be, &table, params, grads, LR);
    }
    (out, model.params().to_vec())
}

fn check_fp32<G: Gpu>(gpu: &G, label: &str) {
    check_fp32_with(gpu, &format!("{label} (GELU in the GEMM epilogue)"), true);
    check_fp32_with(gpu, &format!("{label} (GELU kernels)"), false);
}

fn check_fp32_with<G: Gpu>(gpu: &G, label: &str, gelu_epilogue: bool) {
    let (b, t, steps) = (2, 24, 3);
    let (reference, final_params) = cpu_run(&cfg(), steps, b, t);
    let cfg = cfg();
    let mut model = GpuGpt::new(gpu, &cfg, 7, DType::F32).unwrap();
    model.set_gelu_epilogue(gelu_epilogue);
    let table = model.table().clone();
    for step in 0..steps {
        let (tokens, targets) = batch(step, b, t, cfg.vocab_size);
        model.zero_grads().unwrap();
        let loss = model.forward(&tokens, &targets, b, t, 1.0).unwrap();
        model.backward().unwrap();
        let (want_loss, want_grads) = &reference[step as usize];
        let rel = ((loss - want_loss) / want_loss).abs();
        assert!(rel <= 1e-5, "{label} step {step}: loss {loss} vs CPU {want_loss} (rel {rel:e})");
        let grads = model.grads_host().unwrap();
        let mut worst = (0.0f64, String::new());
        for spec in table.specs() {
            let r = spec.span.range();
            let (gg, cg) = (&grads[r.clone()], &want_grads[r]);
            let diff = gg.iter().zip(cg).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
            let norm = cg.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            let bound = 1e-4 * norm + 1e-7 * (cg.len() as f64).sqrt();
            assert!(
                diff <= bound,
                "{label} step {step}: gradient of {} differs by {diff:e} (norm {norm:e})",
                spec.name
            );
            if norm > 0.0 && diff / norm > worst.0 {
                worst = (diff / norm, spec.name.clone());
            }
        }
        eprintln!(
            "{label} step {step}: loss rel {rel:.2e}, worst gradient rel {:.2e} ({})",
            worst.0, worst.1
        );
        model.step(LR, &AdamWConfig::default(), CLIP).unwrap();
    }
    let params = model.params_host().unwrap();
    let diff = params.iter().zip(&final_params).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    let norm = final_params.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    eprintln!("{label}: parameters after {steps} steps rel {:.2e}", diff / norm);
    assert!(diff <= 1e-5 * norm, "{label}: parameters differ by {diff:e} (norm {norm:e})");
}

fn check_bf16<G: Gpu>(gpu: &G, label: &str, cfg: &GptConfig) {
    check_bf16_with(gpu, &format!("{label}, GELU epilogue"), cfg, true);
    check_bf16_with(gpu, &format!("{label}, GELU kernels"), cfg, false);
}

fn check_bf16_with<G: Gpu>(gpu: &G, label: &str, cfg: &GptConfig, gelu_epilogue: bool) {
    let (b, t, steps) = (2, 24, 4);
    let (reference, _) = cpu_run(cfg, steps, b, t);
    let cfg = cfg.clone();
    let mut model = GpuGpt::new(gpu, &cfg, 7, DType::Bf16).unwrap();
    model.set_gelu_epilogue(gelu_epilogue);
    for step in 0..steps {
        let (tokens, targets) = batch(step, b, t, cfg.vocab_size);
        model.zero_grads().unwrap();
        let loss = model.forward(&tokens, &targets, b, t, 1.0).unwrap();
        model.backward().unwrap();
        model.step(LR, &AdamWConfig::default(), CLIP).unwrap();
        let want = reference[step as usize].0;
        let rel = ((loss - want) / want).abs();
        eprintln!("{label} bf16 step {step}: loss {loss} vs CPU fp32 {want} (rel {rel:.2e})");
        assert!(rel <= 2e-3, "{label} bf16 step {step}: loss {loss} vs CPU {want}");
    }
}

#[test]
fn fp32_matches_the_cpu_model_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_fp32(emu, "emulator");
}

#[test]
fn bf16_tracks_the_cpu_model_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_bf16(emu, "emulator hs32", &cfg());
    check_bf16(emu, "emulator hs64 (tensor cores)", &cfg64());
}

#[test]
fn fp32_matches_the_cpu_model_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_fp32(gpu, "cuda");
}

#[test]
fn bf16_tracks_the_cpu_model_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_bf16(gpu, "cuda hs32", &cfg());
    check_bf16(gpu, "cuda hs64 (tensor cores)", &cfg64());
}

#[test]
fn bad_inputs_are_errors() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    let cfg = cfg();
    let mut model = GpuGpt::new(emu, &cfg, 7, DType::F32).unwrap();
    let err = model.forward(&[1, 2, 3], &[1, 2, 3], 1, 4, 1.0).unwrap_err();
    assert!(err.to_string().contains("tokens: 3 ids"), "{err}");
    let err = model.forward(&[1, 200], &[1, 2], 1, 2, 1.0).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert!(model.backward().unwrap_err().to_string().contains("no forward"));
    // 3 heads do not divide hidden 64: an impossible configuration.
    let bad = GptConfig { hidden_size: 64, num_attention_heads: 3, ..cfg.clone() };
    assert!(GpuGpt::new(emu, &bad, 7, DType::F32).is_err());
    // Head size 512 (hidden 512 / 1 head) is above the attention kernels' limit of 256.
    let bad = GptConfig { hidden_size: 512, num_attention_heads: 1, ..cfg };
    let err = GpuGpt::new(emu, &bad, 7, DType::F32).err().unwrap();
    assert!(err.to_string().contains("head size 512") && err.to_string().contains("256"), "{err}");
}

/// The distributed optimizer's shard on one device (`GpuGpt::set_optimizer_shard`): two AdamW
/// updates of ranges that cut tensors (with and without weight decay) give, in those ranges,
/// the bits of the whole-arena update, leave every other parameter as it was, and keep moments
/// for the shard only (the whole update's moments of those ranges, concatenated). In bf16 the
/// fp32 master weights are the shard's only too (device memory drops by the rest when the
/// shard is set; `exclusive`: no other test uses `gpu`), the parameters read back are the
/// masters there and the bf16 copy elsewhere, the update rounds the shard's masters into the
/// copy, and `set_params` keeps the shard's fp32 values and rounds the rest. Misuse is an error.
fn check_optimizer_shard<G: Gpu>(gpu: &G, label: &str, dtype: DType, exclusive: bool) {
    let cfg = cfg();
    let mut whole = GpuGpt::new(gpu, &cfg, 7, dtype).unwrap();
    let mut shard = GpuGpt::new(gpu, &cfg, 7, dtype).unwrap();
    let n = whole.table().len();
    let ranges = [3..41, 1000..5003, n - 301..n];
    let own = 38 + 4003 + 301;
    let inside = |i: usize| ranges.iter().any(|r| r.contains(&i));
    let err = shard.set_optimizer_shard(&[10..20, 5..8]).unwrap_err();
    assert!(err.to_string().contains("not sorted"), "{label}: {err}");
    let err = shard.set_optimizer_shard(&[0..4, 10..n + 1]).unwrap_err();
    assert!(err.to_string().contains("not sorted"), "{label}: {err}");
    let live = gpu.memory().live;
    shard.set_optimizer_shard(&ranges).unwrap();
    if exclusive && dtype == DType::Bf16 {
        // The parts' weight-decay run tables replace the whole arena's: a few hundred bytes.
        let freed = live as i64 - gpu.memory().live as i64;
        let masters = 4 * (n - own) as i64;
        assert!(
            (freed - masters).abs() <= 4096,
            "{label}: sharding freed {freed} B, the masters are {masters} B"
        );
    }
    assert_eq!(shard.optimizer_shard(), ranges.to_vec(), "{label}");
    assert_eq!(shard.optimizer_len(), own, "{label}");
    let before = shard.params_host().unwrap();
    let init = whole.params_host().unwrap();
    for i in 0..n {
        let expect = if inside(i) || dtype == DType::F32 { init[i] } else { round_bf16(&init[i..i + 1])[0] };
        assert_eq!(before[i].to_bits(), expect.to_bits(), "{label}: parameter {i} before the updates");
    }
    let grads: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
    let adam = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    for step in 1..=2 {
        for m in [&mut whole, &mut shard] {
            m.set_grads_range(0..n, &grads).unwrap();
            m.adamw_update(1e-2, &adam, step, 0.5).unwrap();
        }
    }
    let (pw, ps) = (whole.params_host().unwrap(), shard.params_host().unwrap());
    for i in 0..n {
        let expect = if inside(i) { pw[i] } else { before[i] };
        assert_eq!(ps[i].to_bits(), expect.to_bits(), "{label}: parameter {i}");
    }
    assert!(ranges.iter().any(|r| r.clone().any(|i| pw[i] != before[i])), "{label}: nothing moved");
    // What the kernels read: the shard's updated masters rounded, the rest as it was.
    let (at, read_dtype) = shard.params_range(0..n).unwrap();
    assert_eq!(read_dtype, dtype, "{label}");
    let copy = troupe::gpu::download_f32(gpu, at, n, dtype).unwrap();
    let rounded = if dtype == DType::Bf16 { round_bf16(&ps) } else { ps.clone() };
    for i in 0..n {
        assert_eq!(copy[i].to_bits(), rounded[i].to_bits(), "{label}: the kernels' parameter {i}");
    }
    let ((mw, vw), (ms, vs)) = (whole.moments_host().unwrap(), shard.moments_host().unwrap());
    let cut = |x: &[f32]| ranges.iter().flat_map(|r| x[r.clone()].to_vec()).collect::<Vec<f32>>();
    assert_eq!(ms, cut(&mw), "{label}: first moments");
    assert_eq!(vs, cut(&vw), "{label}: second moments");
    let err = shard.set_optimizer_shard(&ranges).unwrap_err();
    assert!(err.to_string().contains("already allocated"), "{label}: {err}");
    let err = shard.set_optimizer_state(&mw, &vw, 2).unwrap_err();
    assert!(err.to_string().contains(&format!("for {own} parameters")), "{label}: {err}");
    shard.set_optimizer_state(&ms, &vs, 2).unwrap();
    // Restoring parameters (a resume): the shard's in fp32, the rest as the copy holds them.
    let host: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 2003) as f32 / 2003.0 - 0.5).collect();
    shard.set_params(&host).unwrap();
    let back = shard.params_host().unwrap();
    for i in 0..n {
        let expect = if inside(i) || dtype == DType::F32 { host[i] } else { round_bf16(&host[i..i + 1])[0] };
        assert_eq!(back[i].to_bits(), expect.to_bits(), "{label}: restored parameter {i}");
    }
    if dtype == DType::Bf16 {
        let mut again = GpuGpt::new(gpu, &cfg, 7, dtype).unwrap();
        again.set_optimizer_shard(&ranges).unwrap();
        let err = again.set_optimizer_shard(std::slice::from_ref(&(0..n))).unwrap_err();
        assert!(err.to_string().contains("already sharded"), "{label}: {err}");
    }
}

#[test]
fn a_sharded_optimizer_updates_only_its_ranges_in_the_emulator() {
    if troupe::gpu::emu::shared().is_none() {
        return;
    }
    // A private emulator: its memory counter sees only this test.
    let emu = troupe::gpu::EmuGpu::new().unwrap();
    check_optimizer_shard(&emu, "emulator fp32", DType::F32, true);
    check_optimizer_shard(&emu, "emulator bf16", DType::Bf16, true);
}

#[test]
fn a_sharded_optimizer_updates_only_its_ranges_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_optimizer_shard(gpu, "cuda fp32", DType::F32, false);
    check_optimizer_shard(gpu, "cuda bf16", DType::Bf16, false);
}

/// Deferred losses (`GpuGpt::forward_deferred`, what the GPU training loop uses): no copy to the
/// host between a forward and its backward, and `take_losses` returns the bits the synchronous
/// forward returns, for each microbatch in order (three microbatches also grow the device's
/// loss buffer, copying the earlier losses over); the gradients are the same bits too.
/// `exclusive`: no other test uses `gpu`, so its copy counter sees only this one.
fn check_deferred_losses<G: Gpu>(gpu: &G, label: &str, exclusive: bool) {
    let cfg = cfg();
    let (b, t) = (2, cfg.seq_length);
    let mut sync = GpuGpt::new(gpu, &cfg, 7, DType::F32).unwrap();
    let mut deferred = GpuGpt::new(gpu, &cfg, 7, DType::F32).unwrap();
    let mut expect = Vec::new();
    let before = gpu.memory().to_host;
    for step in 0..3 {
        let (x, y) = batch(step, b, t, cfg.vocab_size);
        expect.push(sync.forward(&x, &y, b, t, 1.0 / 3.0).unwrap());
        sync.backward().unwrap();
        deferred.forward_deferred(&x, &y, b, t, 1.0 / 3.0).unwrap();
        deferred.backward().unwrap();
    }
    let synced = gpu.memory().to_host - before;
    if exclusive {
        assert_eq!(
            synced,
            3 * 4 * (b * t) as u64,
            "{label}: only the synchronous forwards' losses came down"
        );
    }
    let got = deferred.take_losses().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&expect), "{label}: deferred losses {got:?} vs {expect:?}");
    assert!(deferred.take_losses().unwrap().is_empty(), "{label}: losses taken twice");
    let (ga, gb) = (sync.grads_host().unwrap(), deferred.grads_host().unwrap());
    assert_eq!(bits(&ga), bits(&gb), "{label}: gradients");
}

#[test]
fn deferred_losses_match_the_synchronous_ones_in_the_emulator() {
    if troupe::gpu::emu::shared().is_none() {
        return;
    }
    // A private emulator: its copy counter sees only this test.
    let emu = troupe::gpu::EmuGpu::new().unwrap();
    check_deferred_losses(&emu, "emulator", true);
}

#[test]
fn deferred_losses_match_the_synchronous_ones_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_deferred_losses(gpu, "cuda", false);
}

/// The compute stream's clock (`Gpu::stream_time`, what a linked pipeline step's bubble is
/// measured with): the device time around a forward and backward is positive and no longer than
/// the host's wall time around it until the device finished; a time is not before itself; and a
/// CUDA device refuses times from the host's clock.
fn check_stream_times<G: Gpu>(gpu: &G, label: &str) {
    let cfg = cfg();
    let (b, t) = (2, cfg.seq_length);
    let mut model = GpuGpt::new(gpu, &cfg, 7, DType::F32).unwrap();
    let (x, y) = batch(0, b, t, cfg.vocab_size);
    let wall = std::time::Instant::now();
    let t0 = gpu.stream_time().unwrap();
    model.forward_deferred(&x, &y, b, t, 1.0).unwrap();
    model.backward().unwrap();
    let t1 = gpu.stream_time().unwrap();
    gpu.synchronize().unwrap();
    let wall = wall.elapsed().as_secs_f64();
    let work = gpu.stream_seconds(&t0, &t1).unwrap();
    assert!(work > 0.0 && work <= wall + 1e-3, "{label}: {work} s on the device, {wall} s on the host");
    assert_eq!(gpu.stream_seconds(&t1, &t1).unwrap(), 0.0, "{label}: a time before itself");
    let host = troupe::gpu::StreamTime::Host(std::time::Instant::now());
    if matches!(t0, troupe::gpu::StreamTime::Event(_)) {
        let e = gpu.stream_seconds(&host, &t1).expect_err("host time on a CUDA device").to_string();
        assert!(e.contains("another device"), "{label}: {e}");
    }
}

#[test]
fn stream_times_measure_the_device_in_the_emulator() {
    let Some(emu) = troupe::gpu::emu::shared() else { return };
    check_stream_times(emu, "emulator");
}

#[test]
fn stream_times_measure_the_device_on_a_gpu() {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return };
    check_stream_times(gpu, "cuda");
}

/// Parameters that arrive late (`GpuGpt::params_arriving`: the distributed optimizer's gather,
/// overlapped with the next forward): rank 1 of two thread ranks gets every tensor from rank 0
/// by its own broadcast through the host, each declared as a fence, and runs a forward at once.
/// On the emulator a broadcast lands only when its fence is due, so the forward gives rank 0's
/// loss bits only if every kernel waits for the tensors it reads (the embedding's, each
/// block's, the head's LayerNorm and tied embedding); the bf16 parameters the kernels read are
/// rank 0's too, and the fences are each readied once, in arena order.
#[test]
fn late_parameters_are_awaited_before_each_read_in_the_emulator() {
    use std::sync::{Arc, Mutex};
    use troupe::gpu::dp::{DeviceComm, HostComm};
    use troupe::gpu::model::ParamFence;
    if troupe::gpu::emu::shared().is_none() {
        eprintln!("SKIPPED: no kernel emulator (g++ missing or TROUPE_SKIP_EMU set)");
        return;
    }
    let comms = troupe::comm::inproc::world(2, troupe::comm::CommOptions::default()).unwrap();
    let threads: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            std::thread::spawn(move || {
                let gpu: &'static troupe::gpu::EmuGpu =
                    Box::leak(Box::new(troupe::gpu::EmuGpu::new().unwrap()));
                let cfg = cfg();
                let mut model = GpuGpt::new(gpu, &cfg, 7, DType::Bf16).unwrap();
                if rank == 0 {
                    let moved: Vec<f32> = model
                        .params_host()
                        .unwrap()
                        .iter()
                        .enumerate()
                        .map(|(i, p)| p + 0.05 * ((i % 17) as f32 - 8.0) / 8.0)
                        .collect();
                    model.set_params(&moved).unwrap();
                }
                let group: Arc<dyn DeviceComm<troupe::gpu::EmuGpu>> = Arc::new(HostComm::new(comm));
                let mut spans: Vec<_> = model.table().specs().iter().map(|s| s.span.range()).collect();
                spans.sort_by_key(|r| r.start);
                let readied = Arc::new(Mutex::new(Vec::new()));
                let mut fences = Vec::new();
                for (i, r) in spans.iter().enumerate() {
                    let (at, dtype) = model.params_range(r.clone()).unwrap();
                    group.broadcast(gpu, at, r.len(), dtype, 0).unwrap();
                    let (mark, group, readied) = (group.mark(gpu).unwrap(), group.clone(), readied.clone());
                    let ready = Box::new(move || {
                        readied.lock().unwrap().push(i);
                        group.compute_after(gpu, mark)
                    });
                    fences.push(ParamFence { range: r.clone(), ready });
                }
                model.params_arriving(fences);
                let (x, y) = batch(0, 2, cfg.seq_length, cfg.vocab_size);
                let loss = model.forward(&x, &y, 2, cfg.seq_length, 1.0).unwrap();
                let order = readied.lock().unwrap().clone();
                let n = model.table().len();
                let (at, dtype) = model.params_range(0..n).unwrap();
                (loss, troupe::gpu::download_f32(gpu, at, n, dtype).unwrap(), order, spans.len())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (l0, p0, _, _) = &results[0];
    let (l1, p1, order, n) = &results[1];
    assert_eq!(l1.to_bits(), l0.to_bits(), "rank 1's forward on late parameters: loss {l1} vs {l0}");
    assert!(p0.iter().zip(p1).all(|(a, b)| a.to_bits() == b.to_bits()), "the kernels' parameters differ");
    assert!(order.windows(2).all(|w| w[0] < w[1]), "fences readied out of order: {order:?}");
    assert!(order.len() <= *n && !order.is_empty(), "{} fences readied of {n}", order.len());
}
