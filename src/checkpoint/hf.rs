//! Hugging Face GPT-2 models (`transformers`' `GPT2LMHeadModel`): [`export`] writes a troupe
//! checkpoint's weights as `model.safetensors` + `config.json` that
//! `GPT2LMHeadModel.from_pretrained` loads; [`import`] reads such a directory into troupe's
//! parameter layout, for a checkpoint at step 0 to train on from.
//!
//! The two models compute the same function: pre-LayerNorm blocks, learned positions, fused QKV
//! with the outputs ordered [Q | K | V] and each head a contiguous slice, tanh-approximated GELU,
//! LayerNorm ε = 1e-5, attention scaled by 1/√head_dim, the LM head tied to the token embedding.
//! What differs is layout only:
//! - Hugging Face's `Conv1D` stores matrices `[in, out]`; troupe stores `[out, in]` like
//!   `nn.Linear`: the four matrices of each block are transposed both ways.
//! - troupe pads the embedding to a multiple of `make_vocab_size_divisible_by` rows (Megatron's
//!   padding; the padded logits take no part in the loss): export drops those rows, import adds
//!   zero rows.
//! - troupe holds `seq_length` positions: export writes `n_positions = seq_length`; import keeps
//!   the first `seq_length` rows of `wpe` (all of them unless a shorter sequence is asked for).
//!
//! Names are GPT-2's without the `transformer.` prefix (as `openai-community/gpt2` ships them);
//! import accepts both forms, skips the causal-mask buffers (`attn.bias`, `attn.masked_bias`) and
//! requires a stored `lm_head.weight` to equal `wte.weight` (troupe ties them).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, View};
use serde_json::{Value, json};
use thiserror::Error;

use super::{CheckpointError, Loaded};
use crate::models::gpt::GptConfig;
use crate::models::params::ParamTable;

/// The file names of a Hugging Face model directory.
pub const CONFIG_FILE: &str = "config.json";

/// The generation defaults `transformers`' `save_pretrained` writes beside `config.json` (the
/// end-of-document token as the one that ends generation); serving tools read them from here.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Whether `dir` looks like a Hugging Face model directory: a `config.json` and safetensors
/// weights (one file or an index), and no troupe checkpoint (`state.json`, `latest`).
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
        && (dir.join(WEIGHTS_FILE).is_file() || dir.join(WEIGHTS_INDEX_FILE).is_file())
        && !dir.join(super::STATE_FILE).exists()
        && !dir.join(super::LATEST).exists()
}

/// troupe's LayerNorm ε (GPT-2's `layer_norm_epsilon`).
const LN_EPS: f64 = 1e-5;

/// Errors of exporting and importing Hugging Face models; each names the file and, where one is
/// at fault, the key or tensor.
#[derive(Debug, Error)]
pub enum HfError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: tensor {name}: {reason}")]
    Tensor { path: PathBuf, name: String, reason: String },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HfError + 'a {
    move |source| HfError::Io { op, path: path.to_path_buf(), source }
}

/// Precision of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HfDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl HfDtype {
    fn safetensors(self) -> Dtype {
        match self {
            HfDtype::F32 => Dtype::F32,
            HfDtype::Bf16 => Dtype::BF16,
            HfDtype::F16 => Dtype::F16,
        }
    }

    /// Bytes per element.
    fn width(self) -> usize {
        match self {
            HfDtype::F32 => 4,
            HfDtype::Bf16 | HfDtype::F16 => 2,
        }
    }

    /// The name `config.json` gives it (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "float32",
            HfDtype::Bf16 => "bfloat16",
            HfDtype::F16 => "float16",
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.width());
        match self {
            HfDtype::F32 => values.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            HfDtype::Bf16 => {
                values.iter().for_each(|&x| out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()))
            }
            HfDtype::F16 => {
                values.iter().for_each(|&x| out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()))
            }
        }
        out
    }
}

/// The GPT-2 hyper-parameters of a Hugging Face `config.json` that troupe's model can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfGpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// `torch_dtype` as the file says it (informational).
    pub torch_dtype: Option<String>,
}

/// Reads and checks `dir/config.json`. Keys it lacks take `GPT2Config`'s defaults, as
/// `transformers` does.
///
/// # Errors
/// [`HfError::Config`] naming the key when the model is not a GPT-2 troupe's GPT computes exactly
/// (another `model_type`, an activation other than tanh-GELU, another LayerNorm ε, an MLP width
/// other than 4×, untied embeddings, cross-attention, per-layer attention scaling).
pub fn read_config(dir: &Path) -> Result<HfGpt2Config, HfError> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        let reason = if dir.is_dir() {
            format!("no {CONFIG_FILE}: not a Hugging Face model directory")
        } else {
            "no such directory".to_string()
        };
        return Err(HfError::Config { path: dir.to_path_buf(), reason });
    }
    let text = fs::read(&path).map_err(io("read", &path))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| HfError::Config { path: path.clone(), reason: format!("not JSON: {e}") })?;
    let bad = |reason: String| HfError::Config { path: path.clone(), reason };
    let Some(obj) = v.as_object() else {
        return Err(bad("not a JSON object".into()));
    };
    match obj.get("model_type").and_then(Value::as_str) {
        Some("gpt2") => {}
        Some(other) => {
            return Err(bad(format!(
                "model_type is {other:?}: troupe's model is GPT-2's architecture, so only \"gpt2\" models import"
            )));
        }
        None => return Err(bad("no model_type: not a transformers model config".into())),
    }
    let size = |key: &str, default: usize| -> Result<usize, HfError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{key} is {x}, expected a positive integer"))),
        }
    };
    let flag = |key: &str, default: bool| -> Result<bool, HfError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| bad(format!("{key} is {x}, expected true or false"))),
        }
    };
    let cfg = HfGpt2Config {
        vocab_size: size("vocab_size", 50257)?,
        n_positions: size("n_positions", 1024)?,
        n_embd: size("n_embd", 768)?,
        n_layer: size("n_layer", 12)?,
        n_head: size("n_head", 12)?,
        torch_dtype: obj
            .get("torch_dtype")
            .or_else(|| obj.get("dtype"))
            .and_then(Value::as_str)
            .map(String::from),
    };
    if !cfg.n_embd.is_multiple_of(cfg.n_head) {
        return Err(bad(format!("n_embd {} is not a multiple of n_head {}", cfg.n_embd, cfg.n_head)));
    }
    if let Some(inner) = obj.get("n_inner").filter(|x| !x.is_null())
        && inner.as_u64() != Some(4 * cfg.n_embd as u64)
    {
        return Err(bad(format!("n_inner is {inner}: troupe's MLP is 4 × n_embd = {} wide", 4 * cfg.n_embd)));
    }
    let act = obj.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
    if !["gelu_new", "gelu_pytorch_tanh", "gelu_fast"].contains(&act) {
        return Err(bad(format!(
            "activation_function is {act:?}: troupe's MLP uses the tanh-approximated GELU \
             (gelu_new, gelu_pytorch_tanh or gelu_fast)"
        )));
    }
    if let Some(x) = obj.get("layer_norm_epsilon").filter(|x| !x.is_null()) {
        let eps = x.as_f64().ok_or_else(|| bad(format!("layer_norm_epsilon is {x}, expected a number")))?;
        if (eps - LN_EPS).abs() > 1e-12 {
            return Err(bad(format!("layer_norm_epsilon is {eps:e}: troupe's LayerNorm uses {LN_EPS:e}")));
        }
    }
    if !flag("scale_attn_weights", true)? {
        return Err(bad("scale_attn_weights is false: troupe scales attention by 1/√head_dim".into()));
    }
    if flag("scale_attn_by_inverse_layer_idx", false)? {
        return Err(bad("scale_attn_by_inverse_layer_idx is true: troupe does not scale by layer".into()));
    }
    if flag("add_cross_attention", false)? {
        return Err(bad("add_cross_attention is true: troupe's GPT has no cross-attention".into()));
    }
    if !flag("tie_word_embeddings", true)? {
        return Err(bad(
            "tie_word_embeddings is false: troupe's LM head is the token embedding (tied)".into()
        ));
    }
    Ok(cfg)
}

/// The whole model's parameter table for `m`, once `m` is checked.
fn whole_table(m: &GptConfig) -> Result<ParamTable, crate::models::gpt::ModelError> {
    m.validate()?;
    Ok(crate::models::gpt::param_table(m, crate::models::gpt::LayerRange::full(m)))
}

/// One GPT-2 tensor in troupe's arena: its troupe name, its Hugging Face name, and whether the
/// matrix is stored transposed there.
struct Mapping {
    troupe: String,
    hf: String,
    transposed: bool,
}

fn mappings(table: &ParamTable) -> Vec<Mapping> {
    table
        .specs()
        .iter()
        .map(|s| {
            let (hf, transposed) = match s.name.as_str() {
                "wte" => ("wte.weight".to_string(), false),
                "wpe" => ("wpe.weight".to_string(), false),
                n => {
                    let t = n
                        .replace(".attn.qkv.", ".attn.c_attn.")
                        .replace(".attn.proj.", ".attn.c_proj.")
                        .replace(".mlp.fc.", ".mlp.c_fc.")
                        .replace(".mlp.proj.", ".mlp.c_proj.");
                    let transposed = s.shape.len() == 2;
                    (t, transposed)
                }
            };
            Mapping { troupe: s.name.clone(), hf, transposed }
        })
        .collect()
}

/// `[rows, cols]` → `[cols, rows]`, in tiles that stay in cache.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0; src.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub step: u64,
    pub tensors: usize,
    pub parameters: usize,
    pub weights_bytes: u64,
    pub config: HfGpt2Config,
}

/// The `config.json` of a troupe model (`GPT2Config` fields; dropout 0 as troupe trains).
pub fn config_json(m: &GptConfig, dtype: HfDtype, eos: Option<u32>) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.seq_length,
        "n_ctx": m.seq_length,
        "n_embd": m.hidden_size,
        "n_layer": m.num_layers,
        "n_head": m.num_attention_heads,
        "n_inner": Value::Null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": true,
        "use_cache": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": dtype.torch_name(),
    })
}

/// The `generation_config.json` of a troupe model, as `transformers` derives it from
/// `config.json` (`_from_model_config`).
pub fn generation_config_json(eos: Option<u32>) -> Value {
    json!({
        "_from_model_config": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": true,
    })
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename, so a reader never sees a
/// half-written file.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), HfError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = fs::write(&tmp, bytes).map_err(io("write", &tmp));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &path).map_err(io("rename into", &path))
}

/// One exported tensor, converted when the writer asks for its bytes (so an export holds one
/// tensor at a time besides the mapped checkpoint): the troupe tensor's little-endian f32 bytes,
/// the leading values kept (the embedding's real rows), transposed `[rows, cols]` → `[cols, rows]`
/// when `transpose` says so, encoded in `dtype`.
struct Pending<'a> {
    src: &'a [u8],
    keep: usize,
    transpose: Option<(usize, usize)>,
    dtype: HfDtype,
    shape: Vec<usize>,
}

impl View for Pending<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut v: Vec<f32> = self
            .src
            .chunks_exact(4)
            .take(self.keep)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some((rows, cols)) = self.transpose {
            v = transpose(&v, rows, cols);
        }
        std::borrow::Cow::Owned(self.dtype.encode(&v))
    }
    fn data_len(&self) -> usize {
        self.keep * self.dtype.width()
    }
}

/// Writes the weights of the verified checkpoint `loaded` into `out` (created if missing) as a
/// Hugging Face GPT-2: `model.safetensors` (in `dtype`; metadata `format = pt`, which
/// `transformers` requires), `config.json` and `generation_config.json`. `eos` is the
/// end-of-document id, written as `bos_token_id`/`eos_token_id`. The tokenizer is the caller's to write. Each file is written to
/// a temporary name and renamed.
///
/// # Errors
/// [`HfError`] naming the file that cannot be read or written.
pub fn export(
    loaded: &Loaded,
    out: &Path,
    dtype: HfDtype,
    eos: Option<u32>,
) -> Result<ExportReport, HfError> {
    let m = &loaded.state.config.model;
    let table =
        whole_table(m).map_err(|e| HfError::Config { path: loaded.dir.clone(), reason: e.to_string() })?;
    let src = loaded.model_tensors()?;
    let model_path = loaded.dir.join(super::MODEL_FILE);
    let damaged = |name: &str, reason: String| {
        HfError::Checkpoint(CheckpointError::Damaged {
            path: model_path.clone(),
            reason: format!("tensor {name}: {reason}"),
        })
    };
    let mut pending: Vec<(String, Pending<'_>)> = Vec::new();
    let mut parameters = 0;
    for map in mappings(&table) {
        let spec =
            table.get(&map.troupe).ok_or_else(|| damaged(&map.troupe, "not in the model's table".into()))?;
        let view = src.tensor(&spec.name).map_err(|_| damaged(&spec.name, "missing".into()))?;
        if view.dtype() != Dtype::F32 || view.shape() != spec.shape.as_slice() {
            let reason = format!("{:?} {:?}, expected F32 {:?}", view.dtype(), view.shape(), spec.shape);
            return Err(damaged(&spec.name, reason));
        }
        let mut shape = spec.shape.clone();
        if map.troupe == "wte" {
            // The padding rows stay behind.
            shape[0] = m.vocab_size;
        }
        let transpose = map.transposed.then(|| (shape[0], shape[1]));
        if map.transposed {
            shape.swap(0, 1);
        }
        let keep = shape.iter().product();
        parameters += keep;
        pending.push((map.hf, Pending { src: view.data(), keep, transpose, dtype, shape }));
    }
    fs::create_dir_all(out).map_err(io("create directory", out))?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("troupe_step".to_string(), loaded.state.step.to_string()),
    ]);
    let path = out.join(WEIGHTS_FILE);
    let tmp = out.join(format!(".{WEIGHTS_FILE}.tmp-{}", std::process::id()));
    let tensors = pending.len();
    if let Err(e) = safetensors::serialize_to_file(pending, Some(metadata), &tmp) {
        let _ = fs::remove_file(&tmp);
        let reason = e.to_string();
        return Err(match e {
            safetensors::SafeTensorError::IoError(source) => HfError::Io { op: "write", path: tmp, source },
            _ => HfError::Weights { path, reason },
        });
    }
    fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
    let weights_bytes = fs::metadata(&path).map_err(io("stat", &path))?.len();
    let config = config_json(m, dtype, eos);
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    write_file(out, CONFIG_FILE, text.as_bytes())?;
    let text = serde_json::to_string_pretty(&generation_config_json(eos)).unwrap_or_default() + "\n";
    write_file(out, GENERATION_CONFIG_FILE, text.as_bytes())?;
    Ok(ExportReport {
        step: loaded.state.step,
        tensors,
        parameters,
        weights_bytes,
        config: HfGpt2Config {
            vocab_size: m.vocab_size,
            n_positions: m.seq_length,
            n_embd: m.hidden_size,
            n_layer: m.num_layers,
            n_head: m.num_attention_heads,
            torch_dtype: Some(dtype.torch_name().into()),
        },
    })
}

/// The weights of a Hugging Face model directory in troupe's layout.
#[derive(Debug)]
pub struct Imported {
    /// The whole model's table (the layout of [`crate::Gpt::new`] for the same config).
    pub table: ParamTable,
    pub params: Vec<f32>,
    /// The weights' dtype as stored (`F32`, `BF16`, `F16`).
    pub stored_dtype: String,
    /// Tensors of the files that are not part of GPT-2's language model (other heads), skipped.
    pub skipped: Vec<String>,
}

/// The weight files of `dir`, mapped: `model.safetensors`, or the shards an
/// `model.safetensors.index.json` names.
fn weight_files(dir: &Path) -> Result<Vec<(PathBuf, memmap2::Mmap)>, HfError> {
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(WEIGHTS_INDEX_FILE);
    let names: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = fs::read(&index).map_err(io("read", &index))?;
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| HfError::Weights { path: index.clone(), reason: format!("not JSON: {e}") })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| HfError::Weights { path: index.clone(), reason: "no weight_map object".into() })?;
        let mut files: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        files.sort_unstable();
        files.dedup();
        files.into_iter().map(|f| dir.join(f)).collect()
    } else {
        let reason = if dir.join("pytorch_model.bin").is_file() {
            format!(
                "no {WEIGHTS_FILE}, only pytorch_model.bin: troupe reads safetensors; in Python, \
                 `GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` writes it"
            )
        } else {
            format!("no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE})")
        };
        return Err(HfError::Weights { path: dir.to_path_buf(), reason });
    };
    names
        .into_iter()
        .map(|path| {
            let f = File::open(&path).map_err(io("open", &path))?;
            // SAFETY: a read-only private mapping of a file this process does not write; the bytes
            // are parsed (and bounds-checked) by safetensors before use.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io("map", &path))?;
            Ok((path, map))
        })
        .collect()
}

fn read_f32(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>, HfError> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|x| half::bf16::from_le_bytes([x[0], x[1]]).to_f32()).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|x| half::f16::from_le_bytes([x[0], x[1]]).to_f32()).collect(),
        other => {
            return Err(HfError::Tensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                reason: format!("dtype {other:?}; troupe reads F32, BF16 and F16"),
            });
        }
    })
}

/// Reads the weights of the Hugging Face GPT-2 in `dir` into the layout of a troupe model of
/// config `m`, which must have the model's sizes (`seq_length` may be shorter than
/// `n_positions`: the first `seq_length` positions are kept).
///
/// # Errors
/// [`HfError`] naming the file and tensor that is missing, of another shape or dtype, or (for a
/// stored `lm_head.weight`) not tied to `wte.weight`.
pub fn import(dir: &Path, hf: &HfGpt2Config, m: &GptConfig) -> Result<Imported, HfError> {
    let mismatch = [
        ("vocab_size", hf.vocab_size, m.vocab_size),
        ("n_embd", hf.n_embd, m.hidden_size),
        ("n_layer", hf.n_layer, m.num_layers),
        ("n_head", hf.n_head, m.num_attention_heads),
    ]
    .into_iter()
    .find(|(_, a, b)| a != b);
    if let Some((key, a, b)) = mismatch {
        return Err(HfError::Config {
            path: dir.join(CONFIG_FILE),
            reason: format!("{key} is {a}, but the troupe model has {b}"),
        });
    }
    if m.seq_length > hf.n_positions {
        return Err(HfError::Config {
            path: dir.join(CONFIG_FILE),
            reason: format!(
                "n_positions is {}: the model has no positions past it, so --seq-length {} cannot be used",
                hf.n_positions, m.seq_length
            ),
        });
    }
    let table =
        whole_table(m).map_err(|e| HfError::Config { path: dir.join(CONFIG_FILE), reason: e.to_string() })?;
    let files = weight_files(dir)?;
    let parsed: Vec<(&PathBuf, SafeTensors<'_>)> = files
        .iter()
        .map(|(path, bytes)| {
            SafeTensors::deserialize(bytes)
                .map(|st| (path, st))
                .map_err(|e| HfError::Weights { path: path.clone(), reason: e.to_string() })
        })
        .collect::<Result<_, _>>()?;
    // Every tensor by its name without the `transformer.` prefix.
    let mut by_name: HashMap<String, (&PathBuf, safetensors::tensor::TensorView<'_>)> = HashMap::new();
    for (path, st) in &parsed {
        for (name, view) in st.tensors() {
            let short = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
            by_name.insert(short, (*path, view));
        }
    }
    let mut params = vec![0.0f32; table.len()];
    let mut stored = BTreeMap::new();
    let maps = mappings(&table);
    for map in &maps {
        let spec = table.get(&map.troupe).ok_or_else(|| HfError::Weights {
            path: dir.to_path_buf(),
            reason: format!("{} is not in troupe's table", map.troupe),
        })?;
        let (path, view) = by_name.get(&map.hf).ok_or_else(|| HfError::Tensor {
            path: dir.to_path_buf(),
            name: map.hf.clone(),
            reason: "missing from the weights".into(),
        })?;
        let want: Vec<usize> = match map.troupe.as_str() {
            "wte" => vec![m.vocab_size, m.hidden_size],
            "wpe" => vec![hf.n_positions, m.hidden_size],
            _ if map.transposed => vec![spec.shape[1], spec.shape[0]],
            _ => spec.shape.clone(),
        };
        if view.shape() != want.as_slice() {
            return Err(HfError::Tensor {
                path: (*path).clone(),
                name: map.hf.clone(),
                reason: format!("shape {:?}, expected {want:?} for config.json's sizes", view.shape()),
            });
        }
        *stored.entry(format!("{:?}", view.dtype())).or_insert(0usize) += 1;
        let mut values = read_f32(path, &map.hf, view)?;
        if map.transposed {
            values = transpose(&values, want[0], want[1]);
        }
        // wte: the padding rows stay zero; wpe: the first seq_length positions.
        let n = values.len().min(spec.span.len);
        params[spec.span.offset..spec.span.offset + n].copy_from_slice(&values[..n]);
    }
    if let Some((path, view)) = by_name.get("lm_head.weight") {
        let wte =
            table.get("wte").map(|s| &params[s.span.offset..s.span.offset + m.vocab_size * m.hidden_size]);
        let head = read_f32(path, "lm_head.weight", view)?;
        if view.shape() != [m.vocab_size, m.hidden_size] || wte != Some(head.as_slice()) {
            return Err(HfError::Tensor {
                path: (*path).clone(),
                name: "lm_head.weight".into(),
                reason: "differs from wte.weight: the LM head is not tied to the embedding, and troupe's is"
                    .into(),
            });
        }
    }
    let known: std::collections::HashSet<&str> = maps.iter().map(|m| m.hf.as_str()).collect();
    let mut skipped: Vec<String> = by_name
        .keys()
        .filter(|k| {
            !known.contains(k.as_str())
                && k.as_str() != "lm_head.weight"
                && !k.ends_with(".attn.bias")
                && !k.ends_with(".attn.masked_bias")
        })
        .cloned()
        .collect();
    skipped.sort();
    let stored_dtype = stored.keys().cloned().collect::<Vec<_>>().join("+");
    Ok(Imported { table, params, stored_dtype, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Encoded {
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    }

    impl View for &Encoded {
        fn dtype(&self) -> Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.bytes)
        }
        fn data_len(&self) -> usize {
            self.bytes.len()
        }
    }

    #[test]
    fn transpose_moves_element_rc_to_cr() {
        let a: Vec<f32> = (0..6).map(|x| x as f32).collect(); // [[0,1,2],[3,4,5]]
        assert_eq!(transpose(&a, 2, 3), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose(&transpose(&a, 2, 3), 3, 2), a);
    }

    fn tiny() -> GptConfig {
        GptConfig {
            vocab_size: 10,
            make_vocab_size_divisible_by: 8,
            seq_length: 4,
            num_layers: 1,
            hidden_size: 8,
            num_attention_heads: 2,
        }
    }

    fn write_config(dir: &Path, extra: Value) {
        let mut c = json!({"model_type": "gpt2", "vocab_size": 10, "n_positions": 6, "n_embd": 8,
                           "n_layer": 1, "n_head": 2});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        fs::write(dir.join(CONFIG_FILE), c.to_string()).unwrap();
    }

    /// A tiny model's weights under Hugging Face names and layout (6 positions, vocabulary 10).
    fn hf_tensors() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let m = GptConfig { seq_length: 6, ..tiny() };
        let model = crate::Gpt::new(&m, 3).unwrap();
        let mut out = BTreeMap::new();
        for map in mappings(model.table()) {
            let spec = model.table().get(&map.troupe).unwrap();
            let mut v = model.param(&map.troupe).unwrap().to_vec();
            let mut shape = spec.shape.clone();
            if map.troupe == "wte" {
                v.truncate(10 * 8);
                shape[0] = 10;
            }
            if map.transposed {
                v = transpose(&v, shape[0], shape[1]);
                shape.swap(0, 1);
            }
            out.insert(map.hf, (shape, v));
        }
        out
    }

    fn write_weights(path: &Path, t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
        let enc: BTreeMap<&str, Encoded> = t
            .iter()
            .map(|(k, (shape, v))| {
                (
                    k.as_str(),
                    Encoded { dtype: Dtype::F32, shape: shape.clone(), bytes: HfDtype::F32.encode(v) },
                )
            })
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(enc.iter().map(|(k, v)| (*k, v)), Some(meta)).unwrap();
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn config_json_of_a_model_troupe_cannot_compute_is_refused_naming_the_key() {
        let d = tempfile::tempdir().unwrap();
        let err = |extra: Value| {
            write_config(d.path(), extra);
            read_config(d.path()).unwrap_err().to_string()
        };
        assert!(err(json!({"model_type": "llama"})).contains("model_type is \"llama\""));
        assert!(err(json!({"activation_function": "gelu"})).contains("tanh-approximated GELU"));
        assert!(err(json!({"activation_function": "relu"})).contains("activation_function is \"relu\""));
        assert!(err(json!({"n_inner": 24})).contains("n_inner is 24: troupe's MLP is 4 × n_embd = 32"));
        assert!(err(json!({"layer_norm_epsilon": 1e-6})).contains("layer_norm_epsilon is 1e-6"));
        assert!(err(json!({"tie_word_embeddings": false})).contains("tie_word_embeddings is false"));
        assert!(err(json!({"scale_attn_by_inverse_layer_idx": true})).contains("scale_attn_by_inverse"));
        assert!(err(json!({"scale_attn_weights": false})).contains("scale_attn_weights is false"));
        assert!(err(json!({"add_cross_attention": true})).contains("cross-attention"));
        assert!(err(json!({"n_head": 3})).contains("n_embd 8 is not a multiple of n_head 3"));
        assert!(err(json!({"vocab_size": -1})).contains("vocab_size is -1, expected a positive integer"));
        assert!(err(json!({"n_layer": "12"})).contains("n_layer is \"12\""));
        // What transformers itself accepts as the same model.
        for ok in [
            json!({"activation_function": "gelu_pytorch_tanh", "n_inner": 32, "layer_norm_epsilon": 1e-5}),
            json!({"n_inner": null, "dtype": "bfloat16"}),
        ] {
            write_config(d.path(), ok);
            let c = read_config(d.path()).unwrap();
            assert_eq!((c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head), (10, 6, 8, 1, 2));
        }
        // Absent keys take GPT2Config's defaults (GPT-2 124M).
        fs::write(d.path().join(CONFIG_FILE), r#"{"model_type": "gpt2"}"#).unwrap();
        let c = read_config(d.path()).unwrap();
        assert_eq!((c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head), (50257, 1024, 768, 12, 12));
        // Not a model directory at all.
        fs::write(d.path().join(CONFIG_FILE), "{").unwrap();
        assert!(read_config(d.path()).unwrap_err().to_string().contains("not JSON"));
        fs::remove_file(d.path().join(CONFIG_FILE)).unwrap();
        assert!(
            read_config(d.path()).unwrap_err().to_string().contains("not a Hugging Face model directory")
        );
        assert!(read_config(&d.path().join("nope")).unwrap_err().to_string().contains("no such directory"));
    }

    #[test]
    fn weights_are_checked_shards_read_and_other_heads_skipped() {
        let d = tempfile::tempdir().unwrap();
        write_config(d.path(), json!({}));
        let hfc = read_config(d.path()).unwrap();
        let m = GptConfig { seq_length: 6, ..tiny() };
        let all = hf_tensors();
        let err = |t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>| {
            write_weights(&d.path().join(WEIGHTS_FILE), t);
            import(d.path(), &hfc, &m).unwrap_err().to_string()
        };
        // pytorch_model.bin only: say how to get safetensors.
        fs::write(d.path().join("pytorch_model.bin"), b"x").unwrap();
        let e = import(d.path(), &hfc, &m).unwrap_err().to_string();
        assert!(e.contains("only pytorch_model.bin") && e.contains("safe_serialization=True"), "{e}");
        let mut t = all.clone();
        t.remove("h.0.mlp.c_fc.bias");
        assert!(err(&t).contains("tensor h.0.mlp.c_fc.bias: missing from the weights"));
        let mut t = all.clone();
        t.get_mut("h.0.attn.c_proj.weight").unwrap().0 = vec![4, 16];
        assert!(err(&t).contains("tensor h.0.attn.c_proj.weight: shape [4, 16], expected [8, 8]"));
        // An untied head is refused; a stored tied one (and other heads, and the mask buffers) pass.
        let mut t = all.clone();
        let (shape, mut wte) = all["wte.weight"].clone();
        wte[5] += 1.0;
        t.insert("lm_head.weight".into(), (shape.clone(), wte));
        assert!(err(&t).contains("lm_head.weight: differs from wte.weight"));
        let mut t: BTreeMap<_, _> =
            all.iter().map(|(k, v)| (format!("transformer.{k}"), v.clone())).collect();
        t.insert("lm_head.weight".into(), all["wte.weight"].clone());
        t.insert("score.weight".into(), (vec![2, 8], vec![0.5; 16]));
        t.insert("transformer.h.0.attn.bias".into(), (vec![1, 1, 6, 6], vec![1.0; 36]));
        write_weights(&d.path().join(WEIGHTS_FILE), &t);
        let single = import(d.path(), &hfc, &m).unwrap();
        assert_eq!(single.skipped, vec!["score.weight".to_string()]);
        let reference = crate::Gpt::new(&m, 3).unwrap();
        let mut want = reference.params().to_vec();
        // The padding rows of wte are zero (troupe initialises them, but they hold no token).
        let wte = reference.table().get("wte").unwrap().span;
        want[wte.offset + 10 * 8..wte.offset + wte.len].fill(0.0);
        assert!(single.params == want, "the weights did not land where troupe's model has them");
        // A shorter sequence keeps the first positions.
        let short = import(d.path(), &hfc, &GptConfig { seq_length: 4, ..m.clone() }).unwrap();
        let wpe = short.table.get("wpe").unwrap().span;
        assert_eq!(&short.params[wpe.range()], &reference.param("wpe").unwrap()[..4 * 8]);
        assert!(
            import(d.path(), &hfc, &GptConfig { seq_length: 7, ..m.clone() })
                .unwrap_err()
                .to_string()
                .contains("n_positions is 6")
        );
        // Two shards named by an index give the same weights.
        fs::remove_file(d.path().join(WEIGHTS_FILE)).unwrap();
        let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) =
            all.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(k, _)| k.starts_with("h."));
        write_weights(&d.path().join("model-00001-of-00002.safetensors"), &a);
        write_weights(&d.path().join("model-00002-of-00002.safetensors"), &b);
        let map: serde_json::Map<String, Value> = all
            .keys()
            .map(|k| {
                let f = if k.starts_with("h.") {
                    "model-00001-of-00002.safetensors"
                } else {
                    "model-00002-of-00002.safetensors"
                };
                (k.clone(), json!(f))
            })
            .collect();
        fs::write(d.path().join(WEIGHTS_INDEX_FILE), json!({"weight_map": map}).to_string()).unwrap();
        assert_eq!(import(d.path(), &hfc, &m).unwrap().params, single.params);
    }

    #[test]
    fn names_map_to_gpt2s_and_only_matrices_are_transposed() {
        let m = tiny();
        let table = whole_table(&m).unwrap();
        let maps = mappings(&table);
        let find = |t: &str| maps.iter().find(|x| x.troupe == t).unwrap();
        assert_eq!(find("h.0.attn.qkv.weight").hf, "h.0.attn.c_attn.weight");
        assert!(find("h.0.attn.qkv.weight").transposed);
        assert_eq!(find("h.0.attn.proj.bias").hf, "h.0.attn.c_proj.bias");
        assert!(!find("h.0.attn.proj.bias").transposed);
        assert_eq!(find("h.0.mlp.fc.weight").hf, "h.0.mlp.c_fc.weight");
        assert_eq!(find("h.0.mlp.proj.weight").hf, "h.0.mlp.c_proj.weight");
        assert_eq!(find("h.0.ln_1.weight").hf, "h.0.ln_1.weight");
        assert!(!find("wte").transposed && !find("wpe").transposed);
        assert_eq!(find("ln_f.bias").hf, "ln_f.bias");
        assert_eq!(maps.len(), table.specs().len());
    }
}
