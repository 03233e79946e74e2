//! Resume is exact: 2N steps in one run and N steps + resume for N steps give bitwise identical
//! parameters, optimizer state and per-step losses. Also: a damaged or missing checkpoint is an
//! error naming the file, never a silent fresh start; a checkpoint from another model shape is
//! refused naming the field.

use std::sync::atomic::AtomicBool;

use anyhow::{Result, ensure};
use troupe::CpuBackend;
use troupe::checkpoint::{self, CheckpointError};
use troupe::config::Config;
use troupe::models::Rng;
use troupe::train::data::TokenWindows;
use troupe::train::run::{Event, RunData, RunError, prepare, run};

const CFG: &str = r#"
[model]
vocab_size = 97
make_vocab_size_divisible_by = 32
seq_length = 16
num_layers = 2
hidden_size = 32
num_attention_heads = 4
[train]
micro_batch_size = 2
global_batch_size = 4
train_iters = 8
lr = 3e-3
min_lr = 3e-4
lr_warmup_iters = 2
threads = 2
[logging]
eval_interval = 0
"#;

fn cfg(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::from_toml_str(CFG, "resume test", &sets).expect("valid test config")
}

fn tokens() -> TokenWindows {
    let mut rng = Rng::new(5);
    // A learnable stream: mostly +1 steps with some noise.
    let mut t = 0u32;
    let stream: Vec<u32> = (0..4000)
        .map(|_| {
            t = if rng.uniform() < 0.8 { (t + 1) % 97 } else { (rng.next_u64() % 97) as u32 };
            t
        })
        .collect();
    TokenWindows::new(stream, 16, 9).expect("enough tokens")
}

/// (step, loss) of every step, the final parameters, the final Adam first moments.
type Outcome = (Vec<(u64, f32)>, Vec<f32>, Vec<f32>);

/// Runs `cfg` to completion.
fn train(cfg: &Config) -> Result<Outcome> {
    let be = CpuBackend::new(cfg.train.threads);
    let src = tokens();
    let (mut trainer, mut state, _) = prepare(cfg)?;
    let mut losses = Vec::new();
    let stop = AtomicBool::new(false);
    run(
        cfg,
        &be,
        &mut trainer,
        &mut state,
        &RunData { train: &src, valid: None, test: None, sample: None },
        &stop,
        &mut |e| {
            if let Event::Step { step, loss, .. } = e {
                losses.push((*step, *loss));
            }
        },
    )?;
    Ok((losses, trainer.model.params().to_vec(), trainer.opt.m.clone()))
}

#[test]
fn two_n_steps_equal_n_plus_resume_n() -> Result<()> {
    let dir = tempdir("resume");
    let save = format!("checkpoint.save={}", dir.display());
    let load = format!("checkpoint.load={}", dir.display());
    let (full_losses, full_params, full_m) = train(&cfg(&[]))?;
    let (first, _, _) = train(&cfg(&["train.train_iters=4", &save, "train.lr_decay_iters=8"]))?;
    let (second, params, m) = train(&cfg(&[&load, "train.lr_decay_iters=8"]))?;
    ensure!(first.len() == 4 && second.len() == 4, "{} + {} steps", first.len(), second.len());
    let joined: Vec<(u64, f32)> = first.into_iter().chain(second).collect();
    for ((s1, a), (s2, b)) in full_losses.iter().zip(&joined) {
        ensure!(s1 == s2 && a.to_bits() == b.to_bits(), "step {s1}: {a} vs step {s2}: {b}");
    }
    ensure!(full_params.iter().zip(&params).all(|(a, b)| a.to_bits() == b.to_bits()), "parameters differ");
    ensure!(full_m.iter().zip(&m).all(|(a, b)| a.to_bits() == b.to_bits()), "Adam moments differ");
    ensure!(full_losses.last().map(|l| l.1) < full_losses.first().map(|l| l.1), "loss did not fall");
    Ok(())
}

#[test]
fn damaged_missing_and_mismatched_checkpoints_are_errors() -> Result<()> {
    let dir = tempdir("damaged");
    let save = format!("checkpoint.save={}", dir.display());
    let load = format!("checkpoint.load={}", dir.display());
    train(&cfg(&["train.train_iters=2", &save]))?;

    // A different model shape is refused, naming the field.
    let Err(err) = prepare(&cfg(&[&load, "model.hidden_size=64"])) else {
        anyhow::bail!("a shape mismatch must fail");
    };
    ensure!(err.to_string().contains("model.hidden_size"), "{err}");

    // Flip one byte of the model file: verification names it.
    let ckpt = checkpoint::resolve(&dir)?.expect("latest");
    let model_file = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&model_file)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&model_file, &bytes)?;
    match prepare(&cfg(&[&load])) {
        Err(RunError::Checkpoint(CheckpointError::Damaged { path, reason })) => {
            ensure!(path == model_file, "names {}", path.display());
            ensure!(reason.contains("CRC32"), "{reason}");
        }
        other => anyhow::bail!("expected a damaged-checkpoint error, got {other:?}"),
    }

    // Nothing there: an error unless a fresh start is allowed.
    let empty = tempdir("empty");
    let load_empty = format!("checkpoint.load={}", empty.display());
    ensure!(matches!(prepare(&cfg(&[&load_empty])), Err(RunError::NothingToLoad { .. })));
    ensure!(prepare(&cfg(&[&load_empty, "checkpoint.allow_fresh_start=true"])).is_ok());
    Ok(())
}

/// A save that died half way (temporary directory with partial files, no rename, `latest`
/// untouched) leaves the previous checkpoint as the one that loads.
#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_loadable() -> Result<()> {
    let dir = tempdir("interrupted");
    let save = format!("checkpoint.save={}", dir.display());
    let load = format!("checkpoint.load={}", dir.display());
    train(&cfg(&["train.train_iters=2", &save]))?;
    let good = checkpoint::resolve(&dir)?.expect("latest");
    // What a crash during the next save leaves behind.
    let partial = dir.join(".iter_0000004.tmp-99999");
    std::fs::create_dir_all(&partial)?;
    std::fs::write(partial.join("model.safetensors"), b"truncated")?;
    let latest_tmp = dir.join(".latest.tmp-99999");
    std::fs::write(&latest_tmp, b"iter_00")?;
    ensure!(checkpoint::resolve(&dir)? == Some(good.clone()), "latest must still name the good checkpoint");
    let (trainer, state, from) = prepare(&cfg(&[&load]))?;
    ensure!(state.step == 2 && from.is_some(), "resumed at step {}", state.step);
    ensure!(trainer.opt.step == 2);
    Ok(())
}

#[path = "common/scratch.rs"]
mod scratch_dir;
use scratch_dir::Scratch;

fn tempdir(tag: &str) -> Scratch {
    Scratch::new(tag)
}
