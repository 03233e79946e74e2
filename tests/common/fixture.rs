//! The PyTorch GPT fixtures written by `tools/reference/gpt_reference.py` (float64 PyTorch):
//! config, training settings, parameters, tokens, targets, logits, loss, every gradient and the
//! losses of 10 AdamW steps. Shared by the CPU and the GPU parity tests.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors};
use troupe::GptConfig;

pub struct Fixture {
    pub cfg: GptConfig,
    pub batch: usize,
    pub seq: usize,
    pub train: serde_json::Value,
    pub f32s: BTreeMap<String, Vec<f32>>,
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
}

pub fn load(name: &str) -> Result<Fixture> {
    // The build tree's fixtures; a test binary carried to another machine (bench/gpu.sh) reads
    // them relative to the working directory, the repository root there.
    let built = format!("{}/tests/fixtures/gpt_{name}.safetensors", env!("CARGO_MANIFEST_DIR"));
    let path = if std::path::Path::new(&built).exists() {
        built
    } else {
        format!("tests/fixtures/gpt_{name}.safetensors")
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let meta = meta.metadata().clone().context("fixture has no metadata")?;
    ensure!(
        meta.get("format").map(String::as_str) == Some("troupe-gpt-fixture"),
        "{path}: not a troupe fixture"
    );
    ensure!(meta.get("version").map(String::as_str) == Some("1"), "{path}: unsupported fixture version");
    let cfg: GptConfig = serde_json::from_str(meta.get("config").context("config")?)?;
    let train: serde_json::Value = serde_json::from_str(meta.get("train").context("train")?)?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut f32s = BTreeMap::new();
    let (mut tokens, mut targets) = (Vec::new(), Vec::new());
    for (name, view) in st.tensors() {
        match view.dtype() {
            Dtype::F32 => {
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                f32s.insert(name, v);
            }
            Dtype::I64 => {
                let v: Vec<u32> = view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u32)
                    .collect();
                match name.as_str() {
                    "tokens" => tokens = v,
                    "targets" => targets = v,
                    _ => bail!("unexpected integer tensor {name}"),
                }
            }
            other => bail!("unexpected dtype {other:?} for {name}"),
        }
    }
    let batch = train["batch"].as_u64().context("batch")? as usize;
    let seq = train["seq"].as_u64().context("seq")? as usize;
    Ok(Fixture { cfg, batch, seq, train, f32s, tokens, targets })
}

/// max |ours − want| / max |want|.
pub fn rel_err(ours: &[f32], want: &[f32]) -> f64 {
    let max_ref = want.iter().fold(0.0f64, |a, &b| a.max(f64::from(b).abs())).max(1e-12);
    let max_err =
        ours.iter().zip(want).fold(0.0f64, |a, (&x, &y)| a.max((f64::from(x) - f64::from(y)).abs()));
    max_err / max_ref
}

/// The fixture's parameters as one arena in `table`'s order.
#[allow(dead_code)]
pub fn arena(fx: &Fixture, table: &troupe::models::params::ParamTable) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(table.len());
    for spec in table.specs() {
        let src = fx
            .f32s
            .get(&format!("param.{}", spec.name))
            .with_context(|| format!("fixture lacks {}", spec.name))?;
        ensure!(src.len() == spec.span.len, "{}: {} vs {}", spec.name, src.len(), spec.span.len);
        out.extend_from_slice(src);
    }
    Ok(out)
}
