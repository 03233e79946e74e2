//! Hugging Face GPT-2 import and export against what `transformers` itself wrote and computed
//! (`tests/fixtures/hf_gpt2_tiny`, from `tools/reference/hf_gpt2_fixture.py`: a tiny
//! GPT2LMHeadModel saved by `save_pretrained`, and its logits and loss in float64), and end to
//! end through `troupe export` / `troupe import`.
//!
//! Tolerances: logits and loss 1e-5 relative (max |ours − ref| / max |ref|), as the PyTorch
//! parity tests: our float32 forward against a float64 reference of the same float32 weights.
//! Weights are compared bit for bit (import and export only move and transpose them; bf16 export
//! rounds each to nearest even, compared against `half`'s rounding).

#[path = "common/scratch.rs"]
mod scratch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use safetensors::{Dtype, SafeTensors};
use scratch::Scratch;
use troupe::checkpoint::hf::{self, HfDtype};
use troupe::checkpoint::{self, TrainState};
use troupe::{CpuBackend, Gpt, GptConfig};

fn fixture_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_gpt2_tiny");
    if built.exists() { built } else { PathBuf::from("tests/fixtures/hf_gpt2_tiny") }
}

/// Every tensor of a safetensors file as f32 (I64 widened), by name, with its shape and dtype.
/// A tensor's dtype, shape and values (as f32).
type Stored = (Dtype, Vec<usize>, Vec<f32>);

fn tensors(path: &Path) -> Result<BTreeMap<String, Stored>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut out = BTreeMap::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let values: Vec<f32> = match v.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => {
                d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            Dtype::I64 => {
                d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect()
            }
            other => anyhow::bail!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(name, (v.dtype(), v.shape().to_vec(), values));
    }
    Ok(out)
}

fn rel_err(ours: &[f32], want: &[f32]) -> f64 {
    let max_ref = want.iter().fold(0.0f64, |a, &b| a.max(f64::from(b).abs())).max(1e-12);
    let max_err =
        ours.iter().zip(want).fold(0.0f64, |a, (&x, &y)| a.max((f64::from(x) - f64::from(y)).abs()));
    max_err / max_ref
}

/// troupe's model config for a Hugging Face config, with `seq` positions and the vocabulary
/// padded to a multiple of 16 (53 → 64: the padding rows must stay out of everything).
fn troupe_config(c: &hf::HfGpt2Config, seq: usize) -> GptConfig {
    GptConfig {
        vocab_size: c.vocab_size,
        make_vocab_size_divisible_by: 16,
        seq_length: seq,
        num_layers: c.n_layer,
        hidden_size: c.n_embd,
        num_attention_heads: c.n_head,
    }
}

fn model_from(imported: &hf::Imported, m: &GptConfig) -> Result<Gpt> {
    let mut model = Gpt::new(m, 0)?;
    ensure!(model.table().specs() == imported.table.specs(), "import's table is not the model's");
    model.params_and_grads_mut().0.copy_from_slice(&imported.params);
    Ok(model)
}

/// Mean next-token cross-entropy over `[b, t, v]` logits, in f64 (transformers' causal LM loss
/// with labels = the input ids).
fn causal_loss(logits: &[f32], tokens: &[u32], b: usize, t: usize, v: usize) -> f64 {
    let mut sum = 0.0;
    for i in 0..b {
        for j in 0..t - 1 {
            let row = &logits[(i * t + j) * v..(i * t + j + 1) * v];
            let max = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
            let lse = max + row.iter().map(|&x| (f64::from(x) - max).exp()).sum::<f64>().ln();
            sum += lse - f64::from(row[tokens[i * t + j + 1] as usize]);
        }
    }
    sum / (b * (t - 1)) as f64
}

#[test]
fn imported_weights_give_transformers_logits_and_loss() -> Result<()> {
    let dir = fixture_dir();
    let hfc = hf::read_config(&dir)?;
    let want = tensors(&dir.join("expected.safetensors"))?;
    let (_, tshape, tok) = &want["tokens"];
    let (b, t) = (tshape[0], tshape[1]);
    let tokens: Vec<u32> = tok.iter().map(|&x| x as u32).collect();
    let be = CpuBackend::new(2);
    // All 16 positions, and only the first 13 (a shorter --seq-length keeps the first rows).
    for seq in [hfc.n_positions, t] {
        let m = troupe_config(&hfc, seq);
        let imported = hf::import(&dir, &hfc, &m)?;
        ensure!(imported.stored_dtype == "F32" && imported.skipped.is_empty(), "{imported:?}");
        let mut model = model_from(&imported, &m)?;
        let logits = model.logits(&be, &tokens, b, t)?;
        ensure!(logits.shape() == [b, t, hfc.vocab_size], "logits shape {:?}", logits.shape());
        let e = rel_err(logits.data(), &want["logits"].2);
        ensure!(e <= 1e-5, "seq {seq}: logits rel err {e:e}");
        let loss = causal_loss(logits.data(), &tokens, b, t, hfc.vocab_size);
        let want_loss = f64::from(want["loss"].2[0]);
        ensure!((loss - want_loss).abs() / want_loss <= 1e-5, "seq {seq}: loss {loss} vs {want_loss}");
        // The padding rows of the embedding are zero.
        let wte = model.param("wte").context("wte")?;
        ensure!(wte[hfc.vocab_size * hfc.n_embd..].iter().all(|&x| x == 0.0), "padding rows not zero");
    }
    Ok(())
}

/// Imports the fixture, saves it as a troupe checkpoint and exports that: the exported tensors
/// are the ones transformers saved, bit for bit (names without the `transformer.` prefix).
#[test]
fn export_writes_back_what_transformers_saved() -> Result<()> {
    let dir = fixture_dir();
    let hfc = hf::read_config(&dir)?;
    let m = troupe_config(&hfc, hfc.n_positions);
    let imported = hf::import(&dir, &hfc, &m)?;
    let model = model_from(&imported, &m)?;
    let scratch = Scratch::new("hf-export");
    let default = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))?;
    let mut cfg = troupe::config::Config::from_toml_str(&default, "config/default.toml", &[])?;
    cfg.model = m.clone();
    let state = TrainState { step: 7, consumed_samples: 0, skipped_steps: 0, rng_state: 1, config: cfg };
    let opt = troupe::optim::AdamW::new(troupe::optim::AdamWConfig::default(), model.table().len());
    let ck = checkpoint::save(&scratch.join("ck"), &state, &model, &opt)?;
    let loaded = checkpoint::load(&ck)?;
    let original = tensors(&dir.join(hf::WEIGHTS_FILE))?;
    let original: BTreeMap<String, _> =
        original.into_iter().map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v)).collect();

    let out = scratch.join("hf32");
    let report = hf::export(&loaded, &out, HfDtype::F32, Some(3))?;
    ensure!(report.step == 7 && report.tensors == original.len(), "{report:?}");
    let exported = tensors(&out.join(hf::WEIGHTS_FILE))?;
    ensure!(
        exported.keys().collect::<Vec<_>>() == original.keys().collect::<Vec<_>>(),
        "names differ: {:?} vs {:?}",
        exported.keys(),
        original.keys()
    );
    for (name, (dtype, shape, values)) in &exported {
        let (_, oshape, ovalues) = &original[name];
        ensure!(*dtype == Dtype::F32 && shape == oshape, "{name}: {dtype:?} {shape:?} vs {oshape:?}");
        ensure!(
            values.iter().zip(ovalues).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: values differ from transformers' file"
        );
    }
    let bytes = std::fs::read(out.join(hf::WEIGHTS_FILE))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let meta = meta.metadata().clone().context("no metadata")?;
    ensure!(meta.get("format").map(String::as_str) == Some("pt"), "transformers needs format=pt: {meta:?}");
    // config.json: the sizes and the architecture transformers needs, and it reads back as the same.
    let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(hf::CONFIG_FILE))?)?;
    let theirs: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(hf::CONFIG_FILE))?)?;
    for key in [
        "model_type",
        "vocab_size",
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "activation_function",
        "layer_norm_epsilon",
        "tie_word_embeddings",
        "scale_attn_weights",
        "architectures",
    ] {
        ensure!(
            ours[key] == theirs[key],
            "config.json {key}: {} vs transformers' {}",
            ours[key],
            theirs[key]
        );
    }
    ensure!(ours["eos_token_id"] == 3, "eos {}", ours["eos_token_id"]);
    // generation_config.json: the keys transformers' own holds, with troupe's end of document.
    let read = |d: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(d.join(hf::GENERATION_CONFIG_FILE))?)?)
    };
    let (ours, theirs) = (read(&out)?, read(&dir)?);
    for key in ["_from_model_config", "use_cache"] {
        ensure!(ours[key] == theirs[key], "generation_config.json {key}: {} vs {}", ours[key], theirs[key]);
    }
    ensure!(ours["eos_token_id"] == 3 && ours["bos_token_id"] == 3, "{ours}");
    ensure!(
        hf::read_config(&out)? == hf::HfGpt2Config { torch_dtype: Some("float32".into()), ..hfc.clone() }
    );

    // bf16: each weight rounded to nearest even; importing it back gives exactly those values.
    let out16 = scratch.join("hf16");
    hf::export(&loaded, &out16, HfDtype::Bf16, None)?;
    let exported16 = tensors(&out16.join(hf::WEIGHTS_FILE))?;
    for (name, (dtype, _, values)) in &exported16 {
        let rounded: Vec<f32> = original[name].2.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        ensure!(*dtype == Dtype::BF16 && values == &rounded, "{name}: bf16 export is not the rounding");
    }
    let back = hf::import(&out16, &hf::read_config(&out16)?, &m)?;
    ensure!(back.stored_dtype == "BF16", "{}", back.stored_dtype);
    let want: Vec<f32> = imported.params.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    ensure!(back.params == want, "bf16 import is not the rounded weights");
    Ok(())
}

fn troupe(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe")).args(args).current_dir(cwd).output().expect("run troupe")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

const TINY: &[&str] =
    &["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32"];

/// troupe train → export → import → the same samples from both checkpoints, and training on
/// from the import; bad input at each step is a usage error (exit 2) that says what to do.
#[test]
fn export_then_import_round_trips_through_the_cli() -> Result<()> {
    let s = Scratch::new("hf-cli");
    let mut args = vec!["train", "--train-iters", "2", "--save", "ck", "--log-interval", "1"];
    args.extend_from_slice(TINY);
    let o = troupe(&args, &s);
    ensure!(o.status.success(), "train: {}", text(&o));

    let o = troupe(&["export", "--load", "ck", "--out", "hf"], &s);
    ensure!(o.status.success(), "export: {}", text(&o));
    ensure!(text(&o).contains("exported step 2 of ck/iter_0000002"), "{}", text(&o));
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        ensure!(s.join("hf").join(f).is_file(), "export wrote no {f}");
    }
    // Exporting over a checkpoint directory would replace its files.
    let o = troupe(&["export", "--load", "ck", "--out", "ck/iter_0000002"], &s);
    ensure!(o.status.code() == Some(2) && text(&o).contains("holds troupe checkpoints"), "{}", text(&o));

    let o = troupe(&["import", "--hf", "hf", "--save", "ck2"], &s);
    ensure!(o.status.success(), "import: {}", text(&o));
    ensure!(text(&o).contains("troupe train --config ck2/config.toml"), "{}", text(&o));
    // The same weights: the same samples, token for token.
    let sample = |ck: &str| troupe(&["generate", "--load", ck, "--max-tokens", "16", "--seed", "5"], &s);
    let (a, b) = (sample("ck"), sample("ck2"));
    ensure!(a.status.success() && b.status.success(), "generate: {} / {}", text(&a), text(&b));
    ensure!(a.stdout == b.stdout && !a.stdout.is_empty(), "samples differ: {:?} vs {:?}", text(&a), text(&b));
    // generate reads the Hugging Face directory itself too, with its tokenizer.
    let c = sample("hf");
    ensure!(c.status.success() && c.stdout == a.stdout, "from hf: {:?} vs {:?}", text(&c), text(&a));
    // The fixture has no tokenizer, and the embedded one does not fit its 53 tokens.
    let fx = fixture_dir();
    let o = troupe(&["generate", "--load", fx.to_str().context("path")?], &s);
    ensure!(
        o.status.code() == Some(2)
            && text(&o).contains("has no tokenizer")
            && text(&o).contains("vocabulary is 53"),
        "{}",
        text(&o)
    );
    // Its config resumes from it (step 0 → 3) with the exported tokenizer.
    let o = troupe(&["train", "--config", "ck2/config.toml", "--train-iters", "3"], &s);
    ensure!(o.status.success() && text(&o).contains("saved checkpoint ck2/iter_0000003"), "{}", text(&o));
    let cfg = std::fs::read_to_string(s.join("ck2/config.toml"))?;
    ensure!(cfg.contains("load = \"ck2\"") && cfg.contains("/hf\""), "{cfg}");

    // Importing into a directory that holds checkpoints is refused; so is a directory that is not
    // a Hugging Face model, and a model wider than --hidden-size asks.
    let o = troupe(&["import", "--hf", "hf", "--save", "ck"], &s);
    ensure!(o.status.code() == Some(2) && text(&o).contains("already holds a checkpoint"), "{}", text(&o));
    let o = troupe(&["import", "--hf", "hf"], &s);
    ensure!(o.status.code() == Some(2) && text(&o).contains("--save DIR is required"), "{}", text(&o));
    let o = troupe(&["import", "--hf", "ck", "--save", "ck3"], &s);
    ensure!(
        o.status.code() == Some(2) && text(&o).contains("not a Hugging Face model directory"),
        "{}",
        text(&o)
    );
    let o = troupe(&["import", "--hf", "hf", "--save", "ck3", "--hidden-size", "64"], &s);
    ensure!(
        o.status.code() == Some(2) && text(&o).contains("n_embd is 32, but the troupe model has 64"),
        "{}",
        text(&o)
    );
    // A run whose tokenizer is gone exports its weights alone, and says that the tokenizer files
    // an earlier export left in --out are not this export's.
    std::fs::create_dir_all(s.join("tk"))?;
    std::fs::copy(s.join("hf/tokenizer.json"), s.join("tk/tokenizer.json"))?;
    let mut args = vec!["train", "--train-iters", "1", "--tokenizer", "tk", "--save", "ck4"];
    args.extend_from_slice(TINY);
    ensure!(troupe(&args, &s).status.success(), "training with --tokenizer tk failed");
    std::fs::remove_dir_all(s.join("tk"))?;
    let o = troupe(&["export", "--load", "ck4", "--out", "hf"], &s);
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(
        text(&o).contains("tokenizer cannot be loaded")
            && text(&o).contains("holds tokenizer.json, tokenizer_config.json from before"),
        "{}",
        text(&o)
    );
    // Training from the Hugging Face directory itself says to import it.
    let mut args = vec!["train", "--load", "hf", "--train-iters", "3"];
    args.extend_from_slice(TINY);
    let o = troupe(&args, &s);
    ensure!(
        o.status.code() == Some(2) && text(&o).contains("troupe import --hf hf --save DIR"),
        "{}",
        text(&o)
    );
    Ok(())
}

/// A Python with `transformers` (`TROUPE_PYTHON`, else `python3`), or `None` after saying why the
/// check is skipped.
fn python_with_transformers() -> Option<String> {
    let py = std::env::var("TROUPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED: {py} cannot import torch and transformers; set TROUPE_PYTHON to a Python that can, \
             to load an export with transformers"
        );
    }
    ok.then_some(py)
}

/// An export loads in transformers with no missing or unexpected key, the head tied, and gives
/// troupe's loss on the same tokens; AutoTokenizer encodes text as troupe does.
#[test]
fn an_export_loads_in_transformers_with_troupes_loss() -> Result<()> {
    let Some(py) = python_with_transformers() else { return Ok(()) };
    let s = Scratch::new("hf-py");
    let mut args = vec!["train", "--train-iters", "2", "--save", "ck"];
    args.extend_from_slice(TINY);
    let o = troupe(&args, &s);
    ensure!(o.status.success(), "train: {}", text(&o));
    let o = troupe(&["export", "--load", "ck", "--out", "hf"], &s);
    ensure!(o.status.success(), "export: {}", text(&o));

    let loaded = checkpoint::load(&checkpoint::resolve(&s.join("ck"))?.context("no checkpoint")?)?;
    let cfg = &loaded.state.config;
    let mut model = Gpt::new(&cfg.model, 0)?;
    loaded.restore(&mut model, None)?;
    let tokens: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % cfg.model.vocab_size as u32).collect();
    let logits = model.logits(&CpuBackend::new(2), &tokens, 1, tokens.len())?;
    let ours = causal_loss(logits.data(), &tokens, 1, tokens.len(), cfg.model.vocab_size);
    let text_in = "ROMEO: What light through yonder window breaks?";
    let ids = troupe::train::corpus::tokenizer(cfg)?.encode(text_in)?;

    let list = tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/reference/hf_gpt2_fixture.py");
    let out = Command::new(&py)
        .arg(&script)
        .args(["--check", "hf", "--tokens", &list, "--text", text_in])
        .current_dir(&*s)
        .output()?;
    ensure!(out.status.success(), "check script: {}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().context("no output")?)?;
    for key in ["missing", "unexpected", "mismatched"] {
        ensure!(v[key].as_array().is_some_and(Vec::is_empty), "transformers reports {key}: {}", v[key]);
    }
    ensure!(v["tied"] == true, "the LM head is not tied: {v}");
    let theirs = v["loss"].as_f64().context("loss")?;
    // float32 both sides, different kernels: 1e-5 relative.
    ensure!((ours - theirs).abs() / theirs <= 1e-5, "loss {ours} (troupe) vs {theirs} (transformers)");
    let their_ids: Vec<u32> = serde_json::from_value(v["text_ids"].clone())?;
    ensure!(their_ids == ids, "token ids {their_ids:?} (AutoTokenizer) vs {ids:?} (troupe)");
    eprintln!("troupe loss {ours:.6}, transformers {theirs:.6}");
    Ok(())
}
