//! Tokenizers through the Hugging Face `tokenizers` crate: loading a `tokenizer.json`, a GPT-2
//! byte-level BPE from `vocab.json` + `merges.txt`, or a BERT WordPiece from `vocab.txt`
//! (lower-cased or cased), and training a BPE or WordPiece tokenizer locally.
//!
//! Preprocessing encodes documents without special tokens (as Megatron's `preprocess_data.py`
//! does) and appends the end-of-document id itself. The EOD token is the first of
//! [`EOD_CANDIDATES`] in the vocabulary (`<|endoftext|>` for GPT-2), unless one is named.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Tokens tried, in order, as the end-of-document token.
pub const EOD_CANDIDATES: [&str; 5] = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]"];

/// The end-of-document token of tokenizers trained by troupe's BPE trainer.
pub const BPE_EOD: &str = "<|endoftext|>";

/// BERT's special tokens, as WordPiece training adds them.
pub const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Errors of loading, training or running a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error(
        "{path}: no tokenizer found (looked for a .json file, or a directory with tokenizer.json, \
         vocab.json + merges.txt, or vocab.txt)"
    )]
    NotFound { path: PathBuf },
    #[error("tokenizer {path}: no such file or directory")]
    Missing { path: PathBuf },
    #[error("tokenizer has no end-of-document token (tried {tried}); name one explicitly")]
    NoEod { tried: String },
    #[error("the tokenizer's vocabulary has no token {token:?} to use as the end-of-document token")]
    UnknownEod { token: String },
    #[error("encoding failed: {message}")]
    Encode { message: String },
    #[error("tokenizer training failed: {message}")]
    Train { message: String },
    #[error("cannot save tokenizer to {path}: {message}")]
    Save { path: PathBuf, message: String },
}

/// Where a tokenizer comes from (Megatron's `--tokenizer-type` names in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    /// A Hugging Face `tokenizer.json` (`HuggingFaceTokenizer`).
    Json(PathBuf),
    /// GPT-2 byte-level BPE (`GPT2BPETokenizer`).
    Gpt2Bpe { vocab: PathBuf, merges: PathBuf },
    /// BERT WordPiece (`BertWordPieceLowerCase` / `BertWordPieceCase`).
    BertWordPiece { vocab: PathBuf, lower_case: bool },
}

impl TokenizerSpec {
    /// Guesses the kind from a path: a file is a `tokenizer.json` (or a BERT `vocab.txt` when it
    /// ends in `.txt`); a directory is searched for `tokenizer.json`, then `vocab.json` +
    /// `merges.txt`, then `vocab.txt` (lower-cased).
    ///
    /// # Errors
    /// [`TokenizerError::Missing`] if `path` does not exist, [`TokenizerError::NotFound`] if nothing
    /// usable is there.
    pub fn from_path(path: &Path) -> Result<Self, TokenizerError> {
        if path.is_file() {
            return Ok(if path.extension().is_some_and(|e| e == "txt") {
                TokenizerSpec::BertWordPiece { vocab: path.to_owned(), lower_case: true }
            } else {
                TokenizerSpec::Json(path.to_owned())
            });
        }
        if !path.exists() {
            return Err(TokenizerError::Missing { path: path.to_owned() });
        }
        let json = path.join("tokenizer.json");
        let (vocab_json, merges) = (path.join("vocab.json"), path.join("merges.txt"));
        let vocab_txt = path.join("vocab.txt");
        if json.is_file() {
            Ok(TokenizerSpec::Json(json))
        } else if vocab_json.is_file() && merges.is_file() {
            Ok(TokenizerSpec::Gpt2Bpe { vocab: vocab_json, merges })
        } else if vocab_txt.is_file() {
            Ok(TokenizerSpec::BertWordPiece { vocab: vocab_txt, lower_case: true })
        } else {
            Err(TokenizerError::NotFound { path: path.to_owned() })
        }
    }

    fn main_path(&self) -> &Path {
        match self {
            TokenizerSpec::Json(p) => p,
            TokenizerSpec::Gpt2Bpe { vocab, .. } | TokenizerSpec::BertWordPiece { vocab, .. } => vocab,
        }
    }
}

/// A loaded tokenizer plus what preprocessing needs to know about it.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    eod: Option<u32>,
}

fn str_path(path: &Path) -> Result<&str, TokenizerError> {
    path.to_str().ok_or_else(|| TokenizerError::Load {
        path: path.to_owned(),
        message: "path is not valid UTF-8".to_owned(),
    })
}

fn gpt2_bpe(vocab: &Path, merges: &Path) -> tokenizers::Result<Tokenizer> {
    let bpe = BPE::from_file(str_path(vocab)?, str_path(merges)?).build()?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    if tok.token_to_id(BPE_EOD).is_some() {
        tok.add_special_tokens(&[AddedToken::from(BPE_EOD, true)]);
    }
    Ok(tok)
}

fn bert_wordpiece(vocab: &Path, lower_case: bool) -> tokenizers::Result<Tokenizer> {
    let wp = WordPiece::from_file(str_path(vocab)?).unk_token("[UNK]".to_owned()).build()?;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lower_case)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    let specials: Vec<AddedToken> = BERT_SPECIALS
        .iter()
        .filter(|t| tok.token_to_id(t).is_some())
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

impl TextTokenizer {
    /// Loads a tokenizer and looks up its EOD token among [`EOD_CANDIDATES`].
    ///
    /// # Errors
    /// [`TokenizerError::Load`] naming the file and the library's message.
    pub fn load(spec: &TokenizerSpec) -> Result<Self, TokenizerError> {
        let loaded = match spec {
            TokenizerSpec::Json(path) => Tokenizer::from_file(path),
            TokenizerSpec::Gpt2Bpe { vocab, merges } => gpt2_bpe(vocab, merges),
            TokenizerSpec::BertWordPiece { vocab, lower_case } => bert_wordpiece(vocab, *lower_case),
        };
        let inner = loaded.map_err(|e| TokenizerError::Load {
            path: spec.main_path().to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self::from_tokenizer(inner))
    }

    /// Wraps an already built tokenizer.
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        let eod = EOD_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        TextTokenizer { inner, eod }
    }

    /// Uses `token` as the end-of-document token.
    ///
    /// # Errors
    /// [`TokenizerError::UnknownEod`] if the vocabulary lacks it.
    pub fn set_eod_token(&mut self, token: &str) -> Result<(), TokenizerError> {
        self.eod = Some(
            self.inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::UnknownEod { token: token.to_owned() })?,
        );
        Ok(())
    }

    /// The end-of-document id, if the vocabulary has one.
    pub fn eod(&self) -> Option<u32> {
        self.eod
    }

    /// The EOD id, or an error saying which tokens were tried.
    ///
    /// # Errors
    /// [`TokenizerError::NoEod`].
    pub fn require_eod(&self) -> Result<u32, TokenizerError> {
        self.eod.ok_or_else(|| TokenizerError::NoEod { tried: EOD_CANDIDATES.join(", ") })
    }

    /// Vocabulary size including added tokens (decides the `.bin` element type).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens, appended to `out`.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] with the library's message.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode { message: e.to_string() })?;
        out.extend_from_slice(encoding.get_ids());
        Ok(())
    }

    /// Token ids of `text`, without special tokens.
    ///
    /// # Errors
    /// As [`TextTokenizer::encode_into`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Text of `ids` (special tokens kept).
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] with the library's message.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Encode { message: e.to_string() })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The kind of tokenizer to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainKind {
    /// GPT-2 style byte-level BPE with `<|endoftext|>`.
    Bpe,
    /// BERT WordPiece with `[PAD] [UNK] [CLS] [SEP] [MASK]`.
    WordPiece { lower_case: bool },
}

/// Trains a tokenizer of `kind` with about `vocab_size` entries on `documents`.
///
/// # Errors
/// [`TokenizerError::Train`] with the library's message.
pub fn train_tokenizer<I, S>(
    kind: TrainKind,
    vocab_size: usize,
    min_frequency: u64,
    documents: I,
) -> Result<TextTokenizer, TokenizerError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let train_err = |e: tokenizers::Error| TokenizerError::Train { message: e.to_string() };
    let (mut tok, mut trainer): (Tokenizer, TrainerWrapper) = match kind {
        TrainKind::Bpe => {
            let mut tok = Tokenizer::new(BPE::default());
            tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
            tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
            let trainer = BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .special_tokens(vec![AddedToken::from(BPE_EOD, true)])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build();
            (tok, trainer.into())
        }
        TrainKind::WordPiece { lower_case } => {
            let mut tok = Tokenizer::new(WordPiece::default());
            tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lower_case)));
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            tok.with_decoder(Some(WordPieceDecoder::default()));
            let specials = BERT_SPECIALS.iter().map(|t| AddedToken::from(*t, true));
            let trainer = WordPieceTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .special_tokens(specials.collect())
                .build();
            (tok, trainer.into())
        }
    };
    tok.train(&mut trainer, documents).map_err(train_err)?;
    Ok(TextTokenizer::from_tokenizer(tok))
}

/// Saves `tokenizer` as a `tokenizer.json`.
///
/// # Errors
/// [`TokenizerError::Save`].
pub fn save_tokenizer(tokenizer: &TextTokenizer, path: &Path) -> Result<(), TokenizerError> {
    tokenizer
        .inner
        .save(path, true)
        .map_err(|e| TokenizerError::Save { path: path.to_owned(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..200)
            .map(|i| format!("the quick brown fox {i} jumps over the lazy dog number {}", i % 7))
            .collect()
    }

    #[test]
    fn train_bpe_round_trips_text_and_has_eod() {
        let tok = train_tokenizer(TrainKind::Bpe, 400, 2, corpus().into_iter()).unwrap();
        let eod = tok.eod().expect("BPE has <|endoftext|>");
        assert_eq!(tok.inner().id_to_token(eod).as_deref(), Some(BPE_EOD));
        let ids = tok.encode("the lazy fox jumps").unwrap();
        assert!(!ids.is_empty() && ids.len() < 18);
        assert_eq!(tok.decode(&ids).unwrap(), "the lazy fox jumps");
        assert!(tok.vocab_size() <= 400);
    }

    #[test]
    fn train_wordpiece_lowercases() {
        let kind = TrainKind::WordPiece { lower_case: true };
        let tok = train_tokenizer(kind, 300, 1, corpus().into_iter()).unwrap();
        assert_eq!(tok.encode("THE Lazy DOG").unwrap(), tok.encode("the lazy dog").unwrap());
        assert!(tok.inner().token_to_id("[SEP]").is_some());
    }
}
