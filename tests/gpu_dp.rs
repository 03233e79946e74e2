//! Data parallelism on the GPU path, run in the kernel emulator with ranks as threads
//! (`troupe train --device emu --data-parallel-size 2`): each rank takes its half of every global
//! batch, the gradient ranges are all-reduced as the last microbatch's backward finishes them,
//! the ranks agree on the loss — and the run matches the single-rank run of the same global batch.
//!
//! Tolerance: losses and gradient norms within 1e-5 relative (fp32; the two-rank run sums each
//! gradient in a different order — per rank, then across ranks — so the bits may differ), and the
//! final parameters within 1e-5 of their norm (checkpoints compared through the CPU model).

use std::path::Path;
use std::process::Command;

use anyhow::{Result, ensure};

#[path = "common/scratch.rs"]
mod scratch_dir;
use scratch_dir::Scratch;

fn tempdir(tag: &str) -> Scratch {
    Scratch::new(&format!("gpu-dp-{tag}"))
}

fn records(log: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(log)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("loss")?.as_f64()?, v.get("grad_norm")?.as_f64()?)))
        .collect())
}

fn params(dir: &Path) -> Result<Vec<f32>> {
    let loaded = troupe::checkpoint::load(
        &troupe::checkpoint::resolve(dir)?.ok_or_else(|| anyhow::anyhow!("no checkpoint"))?,
    )?;
    let cfg = loaded.state.config.clone();
    let mut model = troupe::Gpt::new(&cfg.model, 0)?;
    loaded.restore(&mut model, None)?;
    Ok(model.params().to_vec())
}

#[test]
fn two_emulated_gpu_ranks_match_one() -> Result<()> {
    if troupe::gpu::emu::shared().is_none() {
        return Ok(()); // printed SKIPPED (no g++)
    }
    let dir = tempdir("match");
    let common = [
        "train",
        "--device",
        "emu",
        "--dtype",
        "fp32",
        "--num-layers",
        "1",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "4",
        "--eval-interval",
        "0",
        "--train-iters",
        "3",
        "--threads",
        "1",
        "--lr",
        "1e-3",
        "--set",
        "train.lr_warmup_iters=0",
    ];
    let run = |dp: &str, tag: &str| -> Result<()> {
        let out = Command::new(env!("CARGO_BIN_EXE_troupe"))
            .args(common)
            .args(["--data-parallel-size", dp, "--save", tag, "--log-json", &format!("{tag}.jsonl")])
            .current_dir(&dir)
            .output()?;
        ensure!(out.status.success(), "dp {dp}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    run("1", "one")?;
    run("2", "two")?;
    // The same two ranks as processes under the launcher (the TCP world and store of a real job;
    // `--device cuda` puts NCCL on the same rendezvous).
    let bin = env!("CARGO_BIN_EXE_troupe");
    let out = Command::new(bin)
        .args(["launch", "--nproc-per-node", "2", "--master-port", "0", "--", bin])
        .args(common)
        .args(["--comm-timeout", "60", "--save", "launched", "--log-json", "launched.jsonl"])
        .current_dir(&dir)
        .output()?;
    ensure!(out.status.success(), "launched: {}", String::from_utf8_lossy(&out.stderr));
    let a = records(&dir.join("one.jsonl"))?;
    ensure!(a.len() == 3 && a[0] != a[2], "the loss did not move: {a:?}");
    let pa = params(&dir.join("one"))?;
    let norm = pa.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    for tag in ["two", "launched"] {
        let b = records(&dir.join(format!("{tag}.jsonl")))?;
        ensure!(b.len() == 3, "{tag}: {b:?}");
        for ((la, ga), (lb, gb)) in a.iter().zip(&b) {
            ensure!(
                ((la - lb) / la).abs() <= 1e-5 && ((ga - gb) / ga).abs() <= 1e-5,
                "dp1 {a:?} vs {tag} {b:?}"
            );
        }
        let pb = params(&dir.join(tag))?;
        let diff = pa.iter().zip(&pb).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt();
        ensure!(diff <= 1e-5 * norm, "{tag}: parameters differ by {diff:e} (norm {norm:e})");
        eprintln!("{tag} vs dp1: parameters differ by {:.2e} of their norm", diff / norm);
    }
    Ok(())
}

#[test]
fn a_data_parallel_size_that_does_not_divide_the_batch_is_refused() -> Result<()> {
    let dir = tempdir("refuse");
    let out = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(["train", "--device", "emu", "--data-parallel-size", "3", "--global-batch-size", "4"])
        .args(["--micro-batch-size", "1", "--hidden-size", "64", "--num-attention-heads", "2"])
        .current_dir(&dir)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2) || !out.status.success(), "{err}");
    ensure!(err.contains("multiple of") || err.contains("divisible"), "{err}");
    Ok(())
}

/// Resuming a GPU run (bf16: fp32 master weights and moments in the checkpoint, the bf16 copy
/// re-derived by the same rounding) continues the uninterrupted run bit for bit — checked in the
/// emulator, whose kernels are deterministic like the GPU's.
#[test]
fn a_resumed_emulated_gpu_run_continues_bit_for_bit() -> Result<()> {
    if troupe::gpu::emu::shared().is_none() {
        return Ok(());
    }
    let dir = tempdir("resume");
    let common = [
        "train",
        "--device",
        "emu",
        "--num-layers",
        "1",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--eval-interval",
        "0",
        "--threads",
        "1",
        "--lr",
        "1e-3",
        "--set",
        "train.lr_warmup_iters=0",
        "--lr-decay-iters",
        "3",
    ];
    let run = |extra: &[&str]| -> Result<()> {
        let out =
            Command::new(env!("CARGO_BIN_EXE_troupe")).args(common).args(extra).current_dir(&dir).output()?;
        ensure!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    run(&["--train-iters", "3", "--save", "straight", "--log-json", "straight.jsonl"])?;
    run(&["--train-iters", "2", "--save", "split"])?;
    run(&["--train-iters", "3", "--save", "split", "--load", "split", "--log-json", "resumed.jsonl"])?;
    let (a, b) = (records(&dir.join("straight.jsonl"))?, records(&dir.join("resumed.jsonl"))?);
    ensure!(a.len() == 3 && b.len() == 1, "{a:?} {b:?}");
    ensure!(a[2] == b[0], "step 3: straight {:?} vs resumed {:?}", a[2], b[0]);
    ensure!(params(&dir.join("straight"))? == params(&dir.join("split"))?, "final parameters differ");
    Ok(())
}
