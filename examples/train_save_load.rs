//! The library API in one page: build a GPT from a config, train a few steps on a token stream,
//! save a checkpoint, load it into a fresh model, and check the two agree.
//!
//!     cargo run --release --example train_save_load

use std::sync::atomic::AtomicBool;

use anyhow::{Result, ensure};
use troupe::checkpoint;
use troupe::config::Config;
use troupe::models::Rng;
use troupe::train::data::TokenWindows;
use troupe::train::run::{Event, RunData, prepare, run};
use troupe::{CpuBackend, Gpt};

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("troupe-example-{}", std::process::id()));
    let toml = r#"
        [model]
        vocab_size = 64
        seq_length = 32
        num_layers = 2
        hidden_size = 64
        num_attention_heads = 4
        [train]
        micro_batch_size = 4
        global_batch_size = 8
        train_iters = 20
        lr = 3e-3
        [logging]
        eval_interval = 0
    "#;
    let save = format!("checkpoint.save={}", toml::Value::String(dir.display().to_string()));
    let cfg = Config::from_toml_str(toml, "example", &[save])?;

    // A toy token stream with structure to learn: counting modulo 64, with noise.
    let mut rng = Rng::new(7);
    let mut t = 0u32;
    let stream: Vec<u32> = (0..20_000)
        .map(|_| {
            t = if rng.uniform() < 0.9 { (t + 1) % 64 } else { (rng.next_u64() % 64) as u32 };
            t
        })
        .collect();
    let data =
        TokenWindows::new(stream, cfg.model.seq_length, cfg.train.seed).expect("stream is long enough");

    let be = CpuBackend::new(0);
    let (mut trainer, mut state, _) = prepare(&cfg)?;
    let stop = AtomicBool::new(false);
    let summary = run(
        &cfg,
        &be,
        &mut trainer,
        &mut state,
        &RunData { train: &data, valid: None, test: None, sample: None },
        &stop,
        &mut |e| {
            if let Event::Step { step, loss, .. } = e {
                println!("step {step:>3}  loss {loss:.4}");
            }
        },
    )?;
    println!("trained {} steps; checkpoint in {}", summary.steps, dir.display());

    // Load the checkpoint into a fresh model: identical parameters.
    let loaded = checkpoint::load(&checkpoint::resolve(&dir)?.expect("saved"))?;
    let mut fresh = Gpt::new(&cfg.model, 999)?;
    loaded.restore(&mut fresh, None)?;
    ensure!(fresh.params() == trainer.model.params(), "restored parameters differ");
    println!("restored {} parameters bit for bit", fresh.params().len());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
