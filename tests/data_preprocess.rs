//! Preprocessing end to end on tiny corpora with a tokenizer trained in the test: documents land
//! in order with their EOD, any worker count gives identical bytes, malformed lines are counted
//! with line numbers (fatal with --strict), .jsonl.gz equals .jsonl, text and sentence modes, the
//! preprocess-once cache, and the `troupe` binary itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use troupe::data::input::InputFormat;
use troupe::data::preprocess::{NoProgress, PreprocessOptions, preprocess, preprocess_to_cache};
use troupe::data::tokenizer::{TrainKind, train_tokenizer};
use troupe::data::{DType, GptDataset, GptDatasetConfig, IndexCache, IndexedDataset, Split, TextTokenizer};

fn docs() -> Vec<String> {
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];
    (0..300)
        .map(|i| {
            let n = (i * 7) % 23;
            let body: Vec<&str> = (0..n).map(|k| words[(i + k * 3) % words.len()]).collect();
            format!("Doc {i}: {}. Second sentence here! Done", body.join(" "))
        })
        .collect()
}

fn tokenizer() -> TextTokenizer {
    train_tokenizer(TrainKind::Bpe, 300, 2, docs().into_iter()).unwrap()
}

fn write_jsonl(path: &Path, docs: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for (i, d) in docs.iter().enumerate() {
        writeln!(f, "{}", serde_json::json!({"id": i, "text": d})).unwrap();
    }
}

fn run(opts: &PreprocessOptions, tok: &TextTokenizer) -> troupe::data::PreprocessReport {
    preprocess(opts, tok, &NoProgress).unwrap()
}

fn read_all(prefix: &Path) -> (Vec<u8>, Vec<u8>) {
    let p = prefix.as_os_str().to_string_lossy();
    (std::fs::read(format!("{p}.bin")).unwrap(), std::fs::read(format!("{p}.idx")).unwrap())
}

#[test]
fn documents_in_order_with_eod_for_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let eod = tok.eod().unwrap();
    let input = dir.path().join("c.jsonl");
    let mut corpus = docs();
    corpus.insert(5, String::new()); // an empty document
    write_jsonl(&input, &corpus);
    let mut outputs = Vec::new();
    for (workers, batch) in [(1, 1 << 20), (3, 200), (4, 1)] {
        let mut opts = PreprocessOptions::new(&input, dir.path().join(format!("w{workers}")));
        opts.workers = workers;
        opts.batch_bytes = batch;
        let report = run(&opts, &tok);
        assert_eq!(report.documents, corpus.len() as u64);
        assert_eq!(report.empty_documents, 1);
        assert_eq!(report.malformed, 0);
        assert_eq!(report.dtype, DType::U16);
        assert!(report.prefix.ends_with(format!("w{workers}_text_document")));
        outputs.push(read_all(&report.prefix));
        let ds = IndexedDataset::open(&report.prefix).unwrap();
        assert_eq!(ds.num_documents(), corpus.len());
        assert_eq!(ds.len(), corpus.len() - 1, "the empty document has no sequence");
        let doc_idx = ds.document_indices();
        assert_eq!(doc_idx[5], doc_idx[6], "empty document closes with no sequence");
        for (seq, text) in corpus.iter().filter(|t| !t.is_empty()).enumerate() {
            let mut want = tok.encode(text).unwrap();
            want.push(eod);
            assert_eq!(ds.sequence(seq).unwrap(), want, "document {seq}");
        }
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]), "worker count changed the output");
}

#[test]
fn malformed_lines_are_counted_and_strict_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let input = dir.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"good one\"}\nnot json\n\n{\"text\": 3}\n{\"other\": \"x\"}\n{\"text\": \"fine\"}\n",
    )
    .unwrap();
    let mut opts = PreprocessOptions::new(&input, dir.path().join("o"));
    opts.workers = 2;
    let report = run(&opts, &tok);
    assert_eq!(report.documents, 2);
    assert_eq!(report.malformed, 3);
    let lines: Vec<u64> = report.first_malformed.iter().map(|m| m.line).collect();
    assert_eq!(lines, vec![2, 4, 5]);
    opts.strict = true;
    let err = preprocess(&opts, &tok, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("bad.jsonl:2"), "{err}");
    // A failed run leaves no temporary file behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn gzip_text_paragraphs_and_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let corpus = docs();
    let plain = dir.path().join("c.jsonl");
    write_jsonl(&plain, &corpus);
    let gz = dir.path().join("c.jsonl.gz");
    let mut enc =
        flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(&std::fs::read(&plain).unwrap()).unwrap();
    enc.finish().unwrap();
    let a = run(&PreprocessOptions::new(&plain, dir.path().join("a")), &tok);
    let b = run(&PreprocessOptions::new(&gz, dir.path().join("b")), &tok);
    assert_eq!(read_all(&a.prefix), read_all(&b.prefix));

    let text = dir.path().join("c.txt");
    std::fs::write(&text, "first doc line one\nline two\n\n\n second doc\n").unwrap();
    let mut opts = PreprocessOptions::new(&text, dir.path().join("p"));
    assert_eq!(opts.format, InputFormat::TextLines);
    assert_eq!(run(&opts, &tok).documents, 5, "line mode: every line is a document");
    opts.format = InputFormat::TextParagraphs;
    let report = run(&opts, &tok);
    assert_eq!(report.documents, 2);
    let ds = IndexedDataset::open(&report.prefix).unwrap();
    let mut want = tok.encode("first doc line one\nline two").unwrap();
    want.push(tok.eod().unwrap());
    assert_eq!(ds.sequence(0).unwrap(), want);

    let mut opts = PreprocessOptions::new(&plain, dir.path().join("s"));
    opts.split_sentences = true;
    let report = run(&opts, &tok);
    assert!(report.prefix.ends_with("s_text_sentence"));
    let ds = IndexedDataset::open(&report.prefix).unwrap();
    assert_eq!(ds.num_documents(), corpus.len());
    assert_eq!(ds.len(), 3 * corpus.len(), "three sentences per document");
    let eod = tok.eod().unwrap();
    assert_eq!(ds.sequence(2).unwrap().last(), Some(&eod));
    assert_ne!(ds.sequence(1).unwrap().last(), Some(&eod));
}

#[test]
fn preprocess_once_into_a_cache_then_train_samples() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let input = dir.path().join("corpus.txt");
    std::fs::write(&input, docs().join("\n")).unwrap();
    let cache = dir.path().join("cache");
    let prefix = preprocess_to_cache(&input, &tok, &cache, 2).unwrap();
    let bin: PathBuf = format!("{}.bin", prefix.display()).into();
    let modified = std::fs::metadata(&bin).unwrap().modified().unwrap();
    let again = preprocess_to_cache(&input, &tok, &cache, 2).unwrap();
    assert_eq!(again, prefix);
    assert_eq!(std::fs::metadata(&bin).unwrap().modified().unwrap(), modified);

    let data = Arc::new(IndexedDataset::open(&prefix).unwrap());
    let cfg = GptDatasetConfig {
        seq_length: 32,
        seed: 1,
        split: "90,10".to_owned(),
        add_extra_token: true,
        cache: IndexCache::Off,
    };
    let train = GptDataset::build(data.clone(), Split::Train, Some(50), &cfg).unwrap();
    assert!(train.len() >= 50);
    assert_eq!(train.sample(0).unwrap().len(), 33);
    let valid = GptDataset::build(data, Split::Valid, None, &cfg).unwrap();
    assert!(!valid.is_empty());
}

#[test]
fn the_binary_trains_a_tokenizer_and_preprocesses() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("c.jsonl");
    write_jsonl(&input, &docs());
    let exe = env!("CARGO_BIN_EXE_troupe");
    let tok = dir.path().join("tokenizer.json");
    let out = Command::new(exe)
        .args(["tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "200"])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&tok)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(exe)
        .args(["preprocess", "--append-eod", "--workers", "2", "--quiet"])
        .arg("--input")
        .arg(&input)
        .arg("--tokenizer")
        .arg(&tok)
        .arg("--output-prefix")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("300 documents"), "{stdout}");
    let ds = IndexedDataset::open(dir.path().join("out_text_document")).unwrap();
    assert_eq!(ds.len(), 300);
    let sep = TextTokenizer::load(&troupe::data::TokenizerSpec::Json(tok.clone())).unwrap().eod();
    assert_eq!(ds.sequence(0).unwrap().last().copied(), sep, "WordPiece EOD is [SEP]");
    let out = Command::new(exe)
        .args(["preprocess", "--tokenizer", "missing.json", "--output-prefix", "x"])
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.json: no such file"), "{err}");

    // Bad input to either command is a usage error (exit 2) naming the flag, found before any
    // work: a missing or directory input, an output directory that does not exist, an
    // end-of-document token the vocabulary lacks.
    let tok_s = tok.to_str().unwrap();
    let input_s = input.to_str().unwrap();
    let dir_s = dir.path().to_str().unwrap();
    let nowhere = dir.path().join("no/such/dir/out");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["preprocess", "--tokenizer", tok_s, "--output-prefix", "x", "--input", "missing.jsonl"],
            "--input missing.jsonl: cannot open it".into(),
        ),
        (
            vec!["preprocess", "--tokenizer", tok_s, "--output-prefix", "x", "--input", dir_s],
            "is a directory, not a corpus file".into(),
        ),
        (
            vec![
                "preprocess",
                "--tokenizer",
                tok_s,
                "--input",
                input_s,
                "--output-prefix",
                nowhere.to_str().unwrap(),
            ],
            format!("the directory {} does not exist", nowhere.parent().unwrap().display()),
        ),
        (
            vec![
                "preprocess",
                "--tokenizer",
                tok_s,
                "--input",
                input_s,
                "--output-prefix",
                "x",
                "--eod-token",
                "<nope>",
            ],
            "no token \"<nope>\"".into(),
        ),
        (
            vec![
                "tokenizer",
                "train",
                "--vocab-size",
                "50",
                "--output",
                "t.json",
                "--input",
                input_s,
                "--input",
                "gone.txt",
            ],
            "--input gone.txt: cannot open it".into(),
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(exe).current_dir(dir.path()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&needle), "{args:?}: no {needle:?} in {err}");
    }
    assert!(!dir.path().join("t.json").exists(), "trained although an input was missing");

    // The default kind is the GPT one (byte-level BPE); an empty corpus gives a dataset with a
    // warning that nothing can train on it.
    let bpe = dir.path().join("bpe.json");
    let out = Command::new(exe)
        .args(["tokenizer", "train", "--vocab-size", "300"])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&bpe)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("byte-level BPE"), "{stdout}");
    // A vocabulary the corpus cannot fill is said (300 documents of a few words give fewer
    // merges than 100000 tokens).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("asked for more tokens"), "{err}");
    let out = Command::new(exe)
        .args(["tokenizer", "train", "--vocab-size", "100000", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("big.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("--vocab-size 100000 asked for more tokens"), "{err}");
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, b"").unwrap();
    let out = Command::new(exe)
        .args(["preprocess", "--quiet", "--tokenizer"])
        .arg(&bpe)
        .arg("--input")
        .arg(&empty)
        .arg("--output-prefix")
        .arg(dir.path().join("empty"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("holds no tokens (0 documents read)"), "{err}");

    // Training on the dataset without its tokenizer warns that samples decode with the embedded
    // one; with it, no warning.
    let train = |extra: &[&str]| {
        let out = Command::new(exe)
            .current_dir(dir.path())
            .args(["train", "--data-path", "out_text_document", "--train-iters", "1", "--save", ""])
            .args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2"])
            .args(["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2"])
            .args(["--eval-interval", "0", "--no-progress", "--threads", "1"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let err = train(&[]);
    assert!(err.contains("no --tokenizer given: text samples"), "{err}");
    let err = train(&["--tokenizer", tok.to_str().unwrap()]);
    assert!(!err.contains("no --tokenizer given"), "{err}");
}

/// Megatron's `tools/preprocess_data.py` names: `--json-keys` with several keys writes one
/// dataset per key (each as a run with that `--json-key` writes it), `--tokenizer-model` names
/// the tokenizer, `--partitions` and `--log-interval` are accepted with a note; no tokenizer at
/// all is a usage error saying how to name or train one.
#[test]
fn megatrons_preprocess_flags_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("c.jsonl");
    let lines: Vec<String> = docs()
        .iter()
        .enumerate()
        .map(|(i, d)| serde_json::json!({ "text": d, "title": format!("part {i}") }).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let exe = env!("CARGO_BIN_EXE_troupe");
    let tok = dir.path().join("tokenizer.json");
    let out = Command::new(exe)
        .args(["tokenizer", "train", "--vocab-size", "300", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&tok)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let preprocess = |prefix: &str, keys: &[&str]| {
        let out = Command::new(exe)
            .args(["preprocess", "--quiet", "--append-eod", "--input"])
            .arg(&input)
            .arg("--tokenizer-model")
            .arg(&tok)
            .arg("--output-prefix")
            .arg(dir.path().join(prefix))
            .args(keys)
            .args(["--partitions", "2", "--log-interval", "100"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{keys:?}: {err}");
        err
    };
    let err =
        preprocess("both", &["--json-keys", "text", "title", "--dataset-impl", "mmap", "--lang", "english"]);
    assert!(err.contains("--partitions (a Megatron-LM flag) is ignored"), "{err}");
    assert!(err.contains("--lang (a Megatron-LM flag) is ignored"), "{err}");
    preprocess("one", &["--json-key", "title"]);
    let (bin, idx) = read_all(&dir.path().join("both_title_document"));
    assert_eq!((bin, idx), read_all(&dir.path().join("one_title_document")));
    let text = IndexedDataset::open(dir.path().join("both_text_document")).unwrap();
    assert_eq!(text.len(), 300);
    let out = Command::new(exe)
        .args(["preprocess", "--output-prefix", "x", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("no tokenizer given"), "{err}");
    // Megatron's vocabulary and merges files without --tokenizer-type (the same model as the
    // tokenizer.json, saved under Megatron's names) give the same dataset; with --tokenizer too
    // they are refused, not ignored.
    use tokenizers::Model;
    let tk = tokenizers::Tokenizer::from_file(&tok).unwrap();
    tk.get_model().save(dir.path(), Some("gpt2")).unwrap();
    let pair = |extra: &[&str], prefix: &str| {
        Command::new(exe)
            .args(["preprocess", "--quiet", "--append-eod", "--input"])
            .arg(&input)
            .arg("--output-prefix")
            .arg(dir.path().join(prefix))
            .args(["--vocab-file", "gpt2-vocab.json", "--merge-file", "gpt2-merges.txt"])
            .args(extra)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = pair(&[], "pair");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        read_all(&dir.path().join("pair_text_document")),
        read_all(&dir.path().join("both_text_document"))
    );
    let out = pair(&["--tokenizer", "tokenizer.json"], "refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("both name a tokenizer; give one"), "{err}");
}
