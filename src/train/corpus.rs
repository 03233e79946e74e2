//! Training data for a config: the embedded Shakespeare corpus and tokenizer (the default), or
//! Megatron `.bin/.idx` datasets named by `data.data_path` (single or weighted blend).
//!
//! The embedded corpus is written once as JSON lines (one document per play) into the cache
//! directory and preprocessed there through the same pipeline as user data; later runs reuse it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::Config;
use crate::data::{
    BlendedDataset, DatasetError, GptDataset, GptDatasetConfig, IndexCache, IndexedDataset, SampleSource,
    Split, TextTokenizer, TokenizerError, TokenizerSpec, parse_data_path, preprocess_to_cache,
};

/// The plays, in document order (see `data/shakespeare/SOURCE.md`).
const PLAYS: &[(&str, &str)] = &[
    ("hamlet", include_str!("../../data/shakespeare/hamlet.txt")),
    ("macbeth", include_str!("../../data/shakespeare/macbeth.txt")),
    ("lear", include_str!("../../data/shakespeare/lear.txt")),
    ("othello", include_str!("../../data/shakespeare/othello.txt")),
    ("romeo_and_juliet", include_str!("../../data/shakespeare/romeo_and_juliet.txt")),
    ("julius_caesar", include_str!("../../data/shakespeare/julius_caesar.txt")),
    ("tempest", include_str!("../../data/shakespeare/tempest.txt")),
    ("midsummer_nights_dream", include_str!("../../data/shakespeare/midsummer_nights_dream.txt")),
    ("merchant_of_venice", include_str!("../../data/shakespeare/merchant_of_venice.txt")),
    ("much_ado_about_nothing", include_str!("../../data/shakespeare/much_ado_about_nothing.txt")),
    ("twelfth_night", include_str!("../../data/shakespeare/twelfth_night.txt")),
];

const TOKENIZER_JSON: &[u8] = include_bytes!("../../data/shakespeare/tokenizer.json");

/// Errors while opening training data.
#[derive(Debug, Error)]
pub enum CorpusError {
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("embedded tokenizer is unreadable: {0}")]
    EmbeddedTokenizer(String),
    #[error(
        "data.merge_file = {0} (Megatron's --merge-file) needs the vocabulary it goes with: \
         data.tokenizer (--vocab-file or --tokenizer) naming the vocab.json"
    )]
    MergesWithoutVocab(String),
    #[error("data: {0}")]
    Dataset(#[from] DatasetError),
    #[error("preprocessing {path}: {reason}")]
    Preprocess { path: PathBuf, reason: String },
    #[error("cannot write the corpus cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
    #[error(
        "the tokenizer has {tokenizer} tokens but model.vocab_size is {model}; set model.vocab_size to at least {tokenizer}"
    )]
    VocabTooSmall { tokenizer: usize, model: usize },
}

/// Tokenizer and sample sources for a run.
pub struct TrainingData {
    pub tokenizer: TextTokenizer,
    pub train: Box<dyn SampleSource>,
    pub valid: Option<Box<dyn SampleSource>>,
    /// The test split, evaluated when training ends (`None` when evaluation is off or the split
    /// is empty).
    pub test: Option<Box<dyn SampleSource>>,
    /// Why there is no validation set although evaluation was asked for.
    pub valid_note: Option<String>,
    /// Datasets of the user's with no tokenizer of theirs: samples decode with the embedded one.
    pub tokenizer_note: Option<String>,
    /// Where the data came from, for logs.
    pub description: String,
}

/// One dataset (as many epochs as `num_samples` needs) or a blend.
fn build(
    entries: &[crate::data::BlendEntry],
    split: Split,
    num_samples: u64,
    dcfg: &GptDatasetConfig,
) -> Result<Box<dyn SampleSource>, DatasetError> {
    if let [single] = entries
        && single.weight.is_none()
    {
        let data = std::sync::Arc::new(IndexedDataset::open(&single.prefix)?);
        return Ok(Box::new(GptDataset::build(data, split, Some(num_samples), dcfg)?));
    }
    Ok(Box::new(BlendedDataset::build(entries, split, num_samples, dcfg)?))
}

/// The tokenizer a config names (or the embedded one).
///
/// # Errors
/// [`CorpusError::Tokenizer`] when the file cannot be loaded.
pub fn tokenizer(cfg: &Config) -> Result<TextTokenizer, CorpusError> {
    let d = &cfg.data;
    if !d.merge_file.is_empty() {
        if d.tokenizer.is_empty() {
            return Err(CorpusError::MergesWithoutVocab(d.merge_file.clone()));
        }
        let spec =
            TokenizerSpec::Gpt2Bpe { vocab: d.tokenizer.clone().into(), merges: d.merge_file.clone().into() };
        return Ok(TextTokenizer::load(&spec)?);
    }
    if d.tokenizer.is_empty() {
        return embedded_tokenizer();
    }
    Ok(TextTokenizer::load(&TokenizerSpec::from_path(Path::new(&d.tokenizer))?)?)
}

/// The embedded Shakespeare tokenizer (byte-level BPE, `<|endoftext|>` as end of document).
///
/// # Errors
/// [`CorpusError::EmbeddedTokenizer`] if the embedded file does not parse (a build defect).
pub fn embedded_tokenizer() -> Result<TextTokenizer, CorpusError> {
    let tk = tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON)
        .map_err(|e| CorpusError::EmbeddedTokenizer(e.to_string()))?;
    let mut t = TextTokenizer::from_tokenizer(tk);
    t.set_eod_token("<|endoftext|>")?;
    Ok(t)
}

fn cache_dir(cfg: &Config) -> PathBuf {
    if cfg.data.cache_dir.is_empty() {
        PathBuf::from(".troupe-cache")
    } else {
        PathBuf::from(&cfg.data.cache_dir)
    }
}

/// Writes the embedded plays as JSON lines unless an identical file is already there.
fn embedded_corpus_file(dir: &Path) -> Result<PathBuf, CorpusError> {
    let path = dir.join("shakespeare.jsonl");
    let mut text = String::new();
    for (name, body) in PLAYS {
        let line = serde_json::json!({ "id": name, "text": body });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let cache = |source| CorpusError::Cache { path: path.clone(), source };
    if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
        std::fs::create_dir_all(dir).map_err(cache)?;
        let tmp = dir.join(format!(".shakespeare.jsonl.tmp-{}", std::process::id()));
        std::fs::write(&tmp, &text).map_err(|source| CorpusError::Cache { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &path).map_err(cache)?;
    }
    Ok(path)
}

/// Opens the tokenizer and the train/valid datasets of a config.
///
/// # Errors
/// [`CorpusError`] naming the file or value at fault.
pub fn open(cfg: &Config) -> Result<TrainingData, CorpusError> {
    let tokenizer = tokenizer(cfg)?;
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        return Err(CorpusError::VocabTooSmall {
            tokenizer: tokenizer.vocab_size(),
            model: cfg.model.vocab_size,
        });
    }
    let (entries, description, cache) = if cfg.data.data_path.is_empty() {
        let dir = cache_dir(cfg);
        let corpus = embedded_corpus_file(&dir)?;
        let prefix = preprocess_to_cache(&corpus, &tokenizer, &dir, 1)
            .map_err(|e| CorpusError::Preprocess { path: corpus.clone(), reason: e.to_string() })?;
        let entries = parse_data_path(&[prefix.display().to_string()]).map_err(DatasetError::from)?;
        (entries, "embedded Shakespeare corpus (11 plays)".to_string(), IndexCache::Dir(dir.join("indices")))
    } else {
        let entries = parse_data_path(&cfg.data.data_path).map_err(DatasetError::from)?;
        let cache = if cfg.data.cache_dir.is_empty() {
            IndexCache::BesideData
        } else {
            IndexCache::Dir(cache_dir(cfg))
        };
        (entries, cfg.data.data_path.join(" "), cache)
    };
    let dcfg = GptDatasetConfig {
        seq_length: cfg.model.seq_length,
        seed: cfg.train.seed,
        split: cfg.data.split.clone(),
        add_extra_token: true,
        cache,
    };
    let t = &cfg.train;
    let train_samples = t.train_iters * t.global_batch_size as u64;
    let train = build(&entries, Split::Train, train_samples, &dcfg)?;
    let l = &cfg.logging;
    let (valid, valid_note) = if l.eval_interval > 0 {
        let n = l.eval_iters * t.micro_batch_size as u64;
        match build(&entries, Split::Valid, n, &dcfg) {
            Ok(v) if v.num_samples() > 0 => (Some(v), None),
            Ok(_) => (None, Some("the validation split has no samples".to_string())),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };
    let test = if l.eval_interval > 0 {
        let n = l.eval_iters * t.micro_batch_size as u64;
        build(&entries, Split::Test, n, &dcfg).ok().filter(|s| s.num_samples() > 0)
    } else {
        None
    };
    let tokenizer_note = (!cfg.data.data_path.is_empty() && cfg.data.tokenizer.is_empty()).then(|| {
        "no --tokenizer given: text samples, and `troupe generate` from this run's checkpoints, decode \
         with the embedded Shakespeare tokenizer; pass the tokenizer the data was preprocessed with"
            .to_string()
    });
    Ok(TrainingData { tokenizer, train, valid, test, valid_note, tokenizer_note, description })
}
