//! Tokenizer loading: a hand-written GPT-2 byte-level BPE (vocab.json + merges.txt), BERT
//! WordPiece vocab.txt lower-cased and cased, directory auto-detection, a trained tokenizer's
//! model files round-tripping, and a vocabulary ≥ 65,500 giving int32 `.bin` files.

use std::path::Path;

use tokenizers::Model;

use troupe::data::preprocess::{NoProgress, PreprocessOptions, preprocess};
use troupe::data::tokenizer::{TrainKind, train_tokenizer};
use troupe::data::{DType, IndexedDataset, TextTokenizer, TokenizerSpec};

/// GPT-2 style files that can spell "hello world" (Ġ is GPT-2's byte-level space).
fn write_gpt2_files(dir: &Path) {
    let tokens = [
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "Ġworl",
        "Ġworld",
        "<|endoftext|>",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), serde_json::json!(i))).collect();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
    let merges = "#version: 0.2\nh e\nl l\nhe ll\nhell o\nĠ w\no r\nĠw or\nĠwor l\nĠworl d\n";
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
}

#[test]
fn gpt2_bpe_from_vocab_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    write_gpt2_files(dir.path());
    let spec = TokenizerSpec::from_path(dir.path()).unwrap();
    assert!(matches!(spec, TokenizerSpec::Gpt2Bpe { .. }));
    let tok = TextTokenizer::load(&spec).unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), vec![11, 16]);
    assert_eq!(tok.encode("hello<|endoftext|>").unwrap(), vec![11, 17]);
    assert_eq!(tok.eod(), Some(17));
    assert_eq!(tok.decode(&[11, 16]).unwrap(), "hello world");
}

#[test]
fn bert_wordpiece_lower_and_cased() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n##s\n,\n";
    let path = dir.path().join("vocab.txt");
    std::fs::write(&path, vocab).unwrap();
    let lower =
        TextTokenizer::load(&TokenizerSpec::BertWordPiece { vocab: path.clone(), lower_case: true }).unwrap();
    assert_eq!(lower.encode("Hello, Worlds").unwrap(), vec![5, 8, 6, 7]);
    assert_eq!(lower.eod(), Some(3), "[SEP] ends BERT documents");
    let cased =
        TextTokenizer::load(&TokenizerSpec::BertWordPiece { vocab: path, lower_case: false }).unwrap();
    assert_eq!(cased.encode("Hello world").unwrap(), vec![1, 6]);
    assert!(matches!(
        TokenizerSpec::from_path(dir.path()).unwrap(),
        TokenizerSpec::BertWordPiece { lower_case: true, .. }
    ));
}

#[test]
fn trained_bpe_model_files_load_as_gpt2() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<String> =
        (0..100).map(|i| format!("sample text number {i} with some repeated words, words, words")).collect();
    let trained = train_tokenizer(TrainKind::Bpe, 300, 2, docs.iter()).unwrap();
    trained.inner().get_model().save(dir.path(), None).unwrap();
    let spec = TokenizerSpec::from_path(dir.path()).unwrap();
    let loaded = TextTokenizer::load(&spec).unwrap();
    for d in &docs[..10] {
        assert_eq!(loaded.encode(d).unwrap(), trained.encode(d).unwrap());
    }
}

#[test]
fn missing_or_broken_tokenizers_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = TokenizerSpec::from_path(&dir.path().join("none")).unwrap_err();
    assert!(err.to_string().contains("none"));
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, "{not json").unwrap();
    let err = TextTokenizer::load(&TokenizerSpec::Json(bad)).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn large_vocabulary_writes_int32() {
    let dir = tempfile::tempdir().unwrap();
    let mut vocab = serde_json::Map::new();
    for i in 0..70_000u32 {
        vocab.insert(format!("w{i}"), serde_json::json!(i));
    }
    vocab.insert("[UNK]".into(), serde_json::json!(70_000));
    vocab.insert("</s>".into(), serde_json::json!(70_001));
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let path = dir.path().join("wl.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = TextTokenizer::load(&TokenizerSpec::Json(path)).unwrap();
    assert_eq!(tok.vocab_size(), 70_002);
    let input = dir.path().join("c.txt");
    std::fs::write(&input, "w1 w69999 w65536\nw0 nope\n").unwrap();
    let opts = PreprocessOptions::new(&input, dir.path().join("o"));
    let report = preprocess(&opts, &tok, &NoProgress).unwrap();
    assert_eq!(report.dtype, DType::I32);
    let ds = IndexedDataset::open(&report.prefix).unwrap();
    assert_eq!(ds.dtype(), DType::I32);
    assert_eq!(ds.sequence(0).unwrap(), vec![1, 69_999, 65_536, 70_001]);
    assert_eq!(ds.sequence(1).unwrap(), vec![0, 70_000, 70_001]);
}
