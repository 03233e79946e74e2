//! The GPU model in fp32 against the PyTorch fixtures of the CPU parity test
//! (`tests/parity_gpt.rs`, written by `tools/reference/gpt_reference.py` in float64): logits and
//! loss within 1e-5 relative, every gradient within 1e-4, and the losses of 10 clipped AdamW
//! steps within 1e-4 — the CPU issue's tolerances. Runs in the kernel emulator everywhere and on a
//! GPU when one is present (the CUDA half prints SKIPPED otherwise). The fixtures' head sizes (8
//! and 4) take the any-head-size attention kernels.

#[path = "common/fixture.rs"]
mod fixture;

use anyhow::{Context, Result, ensure};
use fixture::{arena, load, rel_err};
use troupe::gpu::model::GpuGpt;
use troupe::gpu::{DType, Gpu};
use troupe::optim::AdamWConfig;

fn check<G: Gpu>(gpu: &G, label: &str, name: &str) -> Result<()> {
    let fx = load(name)?;
    let (b, t, v) = (fx.batch, fx.seq, fx.cfg.vocab_size);
    let table = troupe::models::gpt::param_table(&fx.cfg, troupe::LayerRange::full(&fx.cfg));
    let params = arena(&fx, &table)?;
    let mut model = GpuGpt::from_params(gpu, &fx.cfg, &params, DType::F32)?;

    let logits = model.logits(&fx.tokens, b, t)?;
    ensure!(logits.len() == b * t * v, "{label} {name}: {} logits", logits.len());
    let e = rel_err(&logits, &fx.f32s["logits"]);
    ensure!(e <= 1e-5, "{label} {name}: logits rel err {e:e}");

    model.zero_grads()?;
    let loss = model.forward(&fx.tokens, &fx.targets, b, t, 1.0)?;
    model.backward()?;
    let e = rel_err(&[loss], &fx.f32s["loss"]);
    ensure!(e <= 1e-5, "{label} {name}: loss {loss} vs {} (rel {e:e})", fx.f32s["loss"][0]);
    let grads = model.grads_host()?;
    let mut worst = 0.0f64;
    for spec in table.specs() {
        let e = rel_err(&grads[spec.span.range()], &fx.f32s[&format!("grad.{}", spec.name)]);
        ensure!(e <= 1e-4, "{label} {name}: gradient {} rel err {e:e}", spec.name);
        worst = worst.max(e);
    }

    let tr = &fx.train;
    let num = |k: &str| -> Result<f32> { Ok(tr[k].as_f64().with_context(|| k.to_string())? as f32) };
    let adam = AdamWConfig {
        beta1: num("beta1")?,
        beta2: num("beta2")?,
        eps: num("eps")?,
        weight_decay: num("weight_decay")?,
    };
    let mut model = GpuGpt::from_params(gpu, &fx.cfg, &params, DType::F32)?;
    for (step, &want) in fx.f32s["step_losses"].iter().enumerate() {
        model.zero_grads()?;
        let loss = model.forward(&fx.tokens, &fx.targets, b, t, 1.0)?;
        model.backward()?;
        let e = ((loss - want) / want).abs();
        ensure!(e <= 1e-4, "{label} {name}: step {step} loss {loss} vs {want}");
        model.step(num("lr")?, &adam, num("clip_grad")?)?;
    }
    eprintln!(
        "{label} {name}: logits/loss/gradients/10 steps match PyTorch (worst gradient rel {worst:.1e})"
    );
    Ok(())
}

#[test]
fn fixtures_match_pytorch_in_the_emulator() -> Result<()> {
    let Some(emu) = troupe::gpu::emu::shared() else { return Ok(()) };
    check(emu, "emulator", "tiny")?;
    check(emu, "emulator", "odd")
}

#[test]
fn fixtures_match_pytorch_on_a_gpu() -> Result<()> {
    let Some(gpu) = troupe::gpu::cuda::shared() else { return Ok(()) };
    check(gpu, "cuda", "tiny")?;
    check(gpu, "cuda", "odd")
}
