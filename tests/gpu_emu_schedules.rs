//! Races in the CUDA kernels, looked for without a GPU: the emulator runs a launch's blocks, and
//! a block's threads between two barriers, in order, reversed, shuffled, or a warp at a time
//! (`troupe::gpu::emu::Schedule`). troupe's kernels have no float atomics and fix every
//! summation order by the shapes, so a kernel that synchronises as it must gives the same bits
//! under every schedule; a missing barrier, or a block reading another block's output, gives
//! different ones (the in-order emulator alone can hide a thread reading what a lower thread
//! wrote). Checked here: training steps of the GPT on the device in fp32 and bf16 (embedding,
//! LayerNorm with the residual, the GELU kernels, the SIMT and tensor-core attention, fused
//! cross-entropy, AdamW, the gradient norm), the attention kernels at every head-size family
//! (SIMT 32/64/128, the any-head-size fallback, tensor cores at 64 and 128) with sequence
//! lengths that leave partial tiles, and the message checksum. Emulator only (a GPU runs its
//! own schedule).

use troupe::GptConfig;
use troupe::gpu::emu::Schedule;
use troupe::gpu::model::GpuGpt;
use troupe::gpu::ops::attention::{self, Path};
use troupe::gpu::ops::checksum;
use troupe::gpu::{DType, Dev, EmuGpu, Gpu, upload_f32};
use troupe::optim::AdamWConfig;

#[path = "common/lcg.rs"]
mod lcg;
use lcg::uniform as values;

fn download(gpu: &EmuGpu, buf: &<EmuGpu as Gpu>::Buf) -> Vec<u8> {
    let mut v = vec![0u8; gpu.buf_len(buf)];
    gpu.download(buf, 0, &mut v).unwrap();
    v
}

/// Two training steps: each step's loss, the first step's gradients and the final parameters.
fn model_bytes(gpu: &EmuGpu, cfg: &GptConfig, dtype: DType) -> Vec<u8> {
    let mut model = GpuGpt::new(gpu, cfg, 7, dtype).unwrap();
    model.set_gelu_epilogue(false);
    let (b, t) = (2, 40);
    let mut out = Vec::new();
    for step in 0..2u64 {
        let ids = values(b * (t + 1), 100 + step, 1.0);
        let ids: Vec<u32> = ids.iter().map(|x| ((x + 0.5) * cfg.vocab_size as f32) as u32 % 97).collect();
        let (tokens, targets): (Vec<u32>, Vec<u32>) = (0..b)
            .flat_map(|r| (0..t).map(move |i| (r * (t + 1) + i, r * (t + 1) + i + 1)))
            .map(|(i, j)| (ids[i], ids[j]))
            .unzip();
        model.zero_grads().unwrap();
        let loss = model.forward(&tokens, &targets, b, t, 1.0).unwrap();
        model.backward().unwrap();
        out.extend(loss.to_le_bytes());
        if step == 0 {
            out.extend(model.grads_host().unwrap().iter().flat_map(|g| g.to_le_bytes()));
        }
        model.step(1e-3, &AdamWConfig::default(), 1.0).unwrap();
    }
    out.extend(model.params_host().unwrap().iter().flat_map(|p| p.to_le_bytes()));
    out
}

/// One attention forward and backward (`path`, `dtype`, head size `hs`, two heads, `t`
/// positions): the output, log-sum-exps and the input gradient.
fn attention_bytes(gpu: &EmuGpu, path: Path, dtype: DType, hs: usize, t: usize) -> Vec<u8> {
    let (b, nh) = (2, 2);
    let c = nh * hs;
    let qkv = upload_f32(gpu, &values(b * t * 3 * c, 1, 2.0), dtype).unwrap();
    let dout = upload_f32(gpu, &values(b * t * c, 2, 2.0), dtype).unwrap();
    let out = gpu.alloc(b * t * c * dtype.size()).unwrap();
    let lse = gpu.alloc(b * nh * t * 4).unwrap();
    let dsum = gpu.alloc(b * nh * t * 4).unwrap();
    let dqkv = gpu.alloc(b * t * 3 * c * dtype.size()).unwrap();
    let d = Dev::new;
    attention::attention_forward_on(gpu, path, dtype, d(&out), d(&lse), d(&qkv), b, t, c, nh).unwrap();
    attention::attention_backward_on(
        gpu,
        path,
        dtype,
        d(&dqkv),
        d(&dsum),
        d(&dout),
        d(&out),
        d(&lse),
        d(&qkv),
        b,
        t,
        c,
        nh,
    )
    .unwrap();
    [download(gpu, &out), download(gpu, &lse), download(gpu, &dqkv)].concat()
}

/// What every workload gives on `gpu` under its current schedule, by name.
fn everything(gpu: &EmuGpu) -> Vec<(String, Vec<u8>)> {
    let small = GptConfig {
        vocab_size: 97,
        make_vocab_size_divisible_by: 32,
        seq_length: 40,
        num_layers: 2,
        hidden_size: 64,
        num_attention_heads: 2,
    };
    // Head size 64: bf16 takes the tensor-core attention.
    let hs64 = GptConfig { hidden_size: 128, num_layers: 1, ..small.clone() };
    let mut out = vec![
        ("model fp32 (hs 32)".to_string(), model_bytes(gpu, &small, DType::F32)),
        ("model bf16 (hs 32)".to_string(), model_bytes(gpu, &small, DType::Bf16)),
        ("model bf16 (hs 64, tensor cores)".to_string(), model_bytes(gpu, &hs64, DType::Bf16)),
    ];
    for (path, dtype, hs, t) in [
        (Path::Simt, DType::F32, 32, 70),
        (Path::Simt, DType::Bf16, 64, 70),
        (Path::Simt, DType::F32, 128, 40),
        (Path::Simt, DType::F32, 24, 37),
        (Path::TensorCore, DType::Bf16, 64, 80),
        (Path::TensorCore, DType::Bf16, 128, 72),
    ] {
        let name = format!("attention {path:?} {dtype:?} hs {hs} T {t}");
        out.push((name, attention_bytes(gpu, path, dtype, hs, t)));
    }
    let message: Vec<u8> = values(300_000, 3, 1.0).iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut buf = gpu.alloc(message.len()).unwrap();
    gpu.upload(&mut buf, 0, &message).unwrap();
    let sum = gpu.alloc(8).unwrap();
    checksum::message_checksum(gpu, Dev::new(&buf), message.len() - 2, Dev::new(&sum)).unwrap();
    out.push(("message checksum".to_string(), download(gpu, &sum)));
    out
}

#[test]
fn every_kernel_gives_the_same_bits_under_every_schedule() {
    if troupe::gpu::emu::shared().is_none() {
        return; // no g++: shared() said SKIPPED
    }
    // A private emulator: its schedule is its own.
    let gpu = EmuGpu::new().unwrap();
    let reference = everything(&gpu);
    for schedule in [Schedule::Reversed, Schedule::Shuffled(1), Schedule::Warps(1), Schedule::Warps(2)] {
        gpu.set_schedule(schedule);
        let t0 = std::time::Instant::now();
        let got = everything(&gpu);
        for ((name, want), (_, have)) in reference.iter().zip(&got) {
            let first = want.iter().zip(have).position(|(a, b)| a != b);
            assert!(
                want == have,
                "{name} under {schedule:?}: other bits from byte {first:?} of {} (a race: a missing \
                 barrier, or a block reading another's output)",
                want.len()
            );
        }
        eprintln!("{schedule:?}: {} workloads, same bits ({:.1} s)", got.len(), t0.elapsed().as_secs_f64());
    }
}
