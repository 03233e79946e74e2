//! Training data for a config: the embedded Shakespeare corpus and tokenizer (the default), or
//! Megatron `.bin/.idx` datasets named by `data.data_path` (single or weighted blend).
//!
//! The embedded corpus is written once as JSON lines (one document per play) into the cache
//! directory and preprocessed there through the same pipeline as user data; later runs reuse it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::Config;
use crate::data::{
    BlendEntry, BlendedDataset, DatasetError, GptDataset, GptDatasetConfig, IndexCache, IndexedDataset,
    SampleSource, Split, SplitError, TextTokenizer, TokenizerError, TokenizerSpec, parse_data_path,
    preprocess_to_cache,
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
    #[error("{flag}: {reason}")]
    SplitDataPath { flag: &'static str, reason: String },
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
    entries: &[BlendEntry],
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
    let d = &cfg.data;
    // Each split's datasets and the split string that gives the split its part of them: one
    // source cut by `data.split`, or (Megatron's --train-data-path and the others) each split the
    // whole of its own datasets.
    let (sources, description, cache) = if !d.is_user_data() {
        let dir = cache_dir(cfg);
        let corpus = embedded_corpus_file(&dir)?;
        let prefix = preprocess_to_cache(&corpus, &tokenizer, &dir, 1)
            .map_err(|e| CorpusError::Preprocess { path: corpus.clone(), reason: e.to_string() })?;
        let entries = parse_data_path(&[prefix.display().to_string()]).map_err(DatasetError::from)?;
        let sources = Split::ALL.map(|_| Some((entries.clone(), d.split.clone())));
        (sources, "embedded Shakespeare corpus (11 plays)".to_string(), IndexCache::Dir(dir.join("indices")))
    } else {
        let cache =
            if d.cache_dir.is_empty() { IndexCache::BesideData } else { IndexCache::Dir(cache_dir(cfg)) };
        if d.per_split() {
            let mut sources: [Option<(Vec<BlendEntry>, String)>; 3] = [None, None, None];
            let mut parts = Vec::new();
            for split in Split::ALL {
                let (paths, flag) = match split {
                    Split::Train => (&d.train_data_path, "--train-data-path"),
                    Split::Valid => (&d.valid_data_path, "--valid-data-path"),
                    Split::Test => (&d.test_data_path, "--test-data-path"),
                };
                if paths.is_empty() {
                    continue;
                }
                let entries = parse_data_path(paths).map_err(|e| CorpusError::SplitDataPath {
                    flag,
                    reason: match e {
                        SplitError::BadDataPath { reason } => reason,
                        other => other.to_string(),
                    },
                })?;
                let whole = ["1,0,0", "0,1,0", "0,0,1"][split as usize];
                sources[split as usize] = Some((entries, whole.to_string()));
                parts.push(format!("{}: {}", split.name(), paths.join(" ")));
            }
            (sources, parts.join("; "), cache)
        } else {
            let entries = parse_data_path(&d.data_path).map_err(DatasetError::from)?;
            (Split::ALL.map(|_| Some((entries.clone(), d.split.clone()))), d.data_path.join(" "), cache)
        }
    };
    let build_split =
        |split: Split, num_samples: u64| -> Option<Result<Box<dyn SampleSource>, DatasetError>> {
            let (entries, split_string) = sources[split as usize].as_ref()?;
            let dcfg = GptDatasetConfig {
                seq_length: cfg.model.seq_length,
                seed: cfg.train.seed,
                split: split_string.clone(),
                add_extra_token: true,
                cache: cache.clone(),
            };
            Some(build(entries, split, num_samples, &dcfg))
        };
    let t = &cfg.train;
    let train_samples = t.train_iters * t.global_batch_size as u64;
    let train = build_split(Split::Train, train_samples).ok_or_else(|| CorpusError::SplitDataPath {
        flag: "--train-data-path",
        reason: "not given".into(),
    })??;
    let l = &cfg.logging;
    // Megatron's sizes: the validation split is built for every evaluation of the run
    // (`train_iters / eval_interval + 1` of `eval_iters` global batches), the test split for one,
    // so each dataset's epochs, and with them its shuffles, are Megatron's.
    let n = cfg.eval_microbatches() * t.micro_batch_size as u64;
    let valid_samples = (t.train_iters / l.eval_interval.max(1) + 1) * n;
    let (valid, valid_note) = if l.eval_interval > 0 {
        match build_split(Split::Valid, valid_samples) {
            Some(Ok(v)) if v.num_samples() > 0 => (Some(v), None),
            Some(Ok(_)) => (None, Some("the validation split has no samples".to_string())),
            Some(Err(e)) => (None, Some(e.to_string())),
            None => (None, Some("no --valid-data-path was given".to_string())),
        }
    } else {
        (None, None)
    };
    let test = if l.eval_interval > 0 {
        build_split(Split::Test, n).and_then(Result::ok).filter(|s| s.num_samples() > 0)
    } else {
        None
    };
    let tokenizer_note = (d.is_user_data() && d.tokenizer.is_empty()).then(|| {
        "no --tokenizer given: text samples, and `troupe generate` from this run's checkpoints, decode \
         with the embedded Shakespeare tokenizer; pass the tokenizer the data was preprocessed with"
            .to_string()
    });
    Ok(TrainingData { tokenizer, train, valid, test, valid_note, tokenizer_note, description })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::data::{DType, IndexWriter};

    /// A dataset of `docs` documents of 12 tokens, document `d` made of the token `base + d`.
    fn dataset(prefix: &Path, base: u32, docs: u32) {
        let mut w = IndexWriter::create(prefix, DType::U16).expect("create");
        for d in 0..docs {
            w.add_document(&[base + d; 12]).expect("write");
        }
        w.finish().expect("finish");
    }

    fn tokens(source: &dyn SampleSource, n: usize) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        let mut sample = Vec::new();
        for i in 0..n.min(source.num_samples()) {
            source.sample_into(i, &mut sample).expect("sample");
            out.extend(&sample);
        }
        out
    }

    fn config(sets: &[String]) -> Result<Config, crate::config::ConfigError> {
        let base = "[model]\nvocab_size = 4096\nseq_length = 8\nnum_layers = 1\nhidden_size = 16\n\
                    num_attention_heads = 2\n[train]\nmicro_batch_size = 1\nglobal_batch_size = 4\n\
                    train_iters = 20\n[logging]\neval_interval = 5\neval_iters = 4\n";
        Config::from_toml_str(base, "test", sets)
    }

    /// With each split's own data, a split is the whole of its datasets and nothing of the
    /// others'; with one `data_path` the splits share it, cut by `data.split`.
    #[test]
    fn each_split_reads_the_whole_of_its_own_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |name: &str| dir.path().join(name).display().to_string();
        dataset(Path::new(&at("train")), 100, 20);
        dataset(Path::new(&at("train2")), 150, 20);
        dataset(Path::new(&at("valid")), 200, 3);
        dataset(Path::new(&at("test")), 300, 2);
        let set = |key: &str, v: String| format!("data.{key}={}", toml::Value::String(v));
        let cfg = config(&[
            set("train_data_path", format!("0.5 {} 0.5 {}", at("train"), at("train2"))),
            set("valid_data_path", at("valid")),
            set("test_data_path", at("test")),
        ])
        .expect("config");
        let data = open(&cfg).expect("open");
        let expect = |r: std::ops::Range<u32>| r.collect::<BTreeSet<u32>>();
        // 80 samples of 9 tokens, about 40 from each half: more than an epoch of either.
        let train: BTreeSet<u32> = tokens(data.train.as_ref(), 1000);
        assert_eq!(train, expect(100..120).union(&expect(150..170)).copied().collect());
        assert_eq!(tokens(data.valid.as_deref().expect("valid"), 1000), expect(200..203));
        assert_eq!(tokens(data.test.as_deref().expect("test"), 1000), expect(300..302));
        assert!(data.description.contains("valid: ") && data.description.contains(&at("test")));

        // Without a validation set of its own there is none, and the note says why.
        let cfg = config(&[set("train_data_path", at("train"))]).expect("config");
        let data = open(&cfg).expect("open");
        assert!(data.valid.is_none() && data.test.is_none());
        assert_eq!(data.valid_note.as_deref(), Some("no --valid-data-path was given"));

        // One data_path: the training split is the first 949/1000 of its 20 documents.
        let cfg = config(&[set("data_path", at("train"))]).expect("config");
        let data = open(&cfg).expect("open");
        assert_eq!(tokens(data.train.as_ref(), 1000), expect(100..119));
        assert_eq!(tokens(data.valid.as_deref().expect("valid"), 1000), expect(119..120));

        // A bad blend names the flag it came from.
        let cfg = config(&[set("valid_data_path", "-1 a".into()), set("train_data_path", at("train"))])
            .expect("config");
        let err = open(&cfg).err().expect("a negative weight is refused").to_string();
        assert!(err.starts_with("--valid-data-path: "), "{err}");
    }
}
