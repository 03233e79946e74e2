//! `troupe tokenizer train`, and the tokenizer flags shared by `preprocess` and `bench
//! preprocess` (`--tokenizer PATH`, or Megatron's `--tokenizer-type` with `--vocab-file` /
//! `--merge-file`).

use std::path::PathBuf;

use troupe::data::input::{InputFormat, RecordReader, extract_text};
use troupe::data::tokenizer::{TrainKind, save_tokenizer, train_tokenizer};
use troupe::data::{TextTokenizer, TokenizerSpec};

use super::UsageError;

/// Megatron's tokenizer type names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenizerType {
    #[value(name = "HuggingFaceTokenizer")]
    HuggingFace,
    #[value(name = "GPT2BPETokenizer")]
    Gpt2Bpe,
    #[value(name = "BertWordPieceLowerCase")]
    BertLowerCase,
    #[value(name = "BertWordPieceCase")]
    BertCase,
}

/// Which tokenizer to use.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenizerArgs {
    /// A tokenizer.json, or a directory holding tokenizer.json, vocab.json + merges.txt (GPT-2
    /// BPE) or vocab.txt (BERT, lower-cased). Megatron's `--tokenizer-model` is another name.
    #[arg(long, visible_alias = "tokenizer-model")]
    pub tokenizer: Option<PathBuf>,
    /// Megatron-style tokenizer type (with --vocab-file and, for GPT-2, --merge-file).
    #[arg(long, value_enum)]
    pub tokenizer_type: Option<TokenizerType>,
    /// vocab.json (GPT-2) or vocab.txt (BERT).
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    /// merges.txt (GPT-2).
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    /// End-of-document token (default: the first of <|endoftext|>, </s>, <eos>, [SEP] present).
    #[arg(long)]
    pub eod_token: Option<String>,
}

impl TokenizerArgs {
    fn spec(&self) -> anyhow::Result<TokenizerSpec> {
        let usage = |m: &str| anyhow::Error::new(UsageError(m.to_owned()));
        let vocab = || {
            self.vocab_file
                .clone()
                .or_else(|| self.tokenizer.clone())
                .ok_or_else(|| usage("--vocab-file is required for this --tokenizer-type"))
        };
        Ok(match self.tokenizer_type {
            // Without a type, what the files are: a tokenizer, a GPT-2 vocabulary and its merges,
            // or a vocabulary alone (a BERT vocab.txt).
            None => match (&self.tokenizer, &self.vocab_file, &self.merge_file) {
                (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                    return Err(usage(
                        "--tokenizer and --vocab-file/--merge-file both name a tokenizer; give one",
                    ));
                }
                (None, None, Some(_)) => return Err(usage("--merge-file needs --vocab-file")),
                (None, Some(vocab), Some(merges)) => {
                    TokenizerSpec::Gpt2Bpe { vocab: vocab.clone(), merges: merges.clone() }
                }
                (Some(path), None, None) | (None, Some(path), None) => {
                    TokenizerSpec::from_path(path).map_err(|e| UsageError(e.to_string()))?
                }
                (None, None, None) => {
                    return Err(usage(
                        "no tokenizer given: name one with --tokenizer PATH (a tokenizer.json, or a directory \
                         holding tokenizer.json, vocab.json + merges.txt or vocab.txt), or with Megatron's \
                         --tokenizer-type and --vocab-file (and --merge-file for GPT2BPETokenizer); \
                         `troupe tokenizer train --input CORPUS --vocab-size N --output tokenizer.json` \
                         trains one. Train with the same tokenizer (--tokenizer).",
                    ));
                }
            },
            Some(TokenizerType::HuggingFace) => TokenizerSpec::from_path(
                self.tokenizer.as_deref().ok_or_else(|| usage("--tokenizer PATH is required"))?,
            )
            .map_err(|e| UsageError(e.to_string()))?,
            Some(TokenizerType::Gpt2Bpe) => TokenizerSpec::Gpt2Bpe {
                vocab: vocab()?,
                merges: self
                    .merge_file
                    .clone()
                    .ok_or_else(|| usage("--merge-file is required for GPT2BPETokenizer"))?,
            },
            Some(kind) => TokenizerSpec::BertWordPiece {
                vocab: vocab()?,
                lower_case: kind == TokenizerType::BertLowerCase,
            },
        })
    }

    /// Loads the tokenizer these flags describe.
    pub fn load(&self) -> anyhow::Result<TextTokenizer> {
        // A tokenizer that is missing, unreadable or lacks the named token is bad input (exit 2).
        let mut tok = TextTokenizer::load(&self.spec()?).map_err(|e| UsageError(e.to_string()))?;
        if let Some(eod) = &self.eod_token {
            tok.set_eod_token(eod).map_err(|e| UsageError(e.to_string()))?;
        }
        Ok(tok)
    }
}

/// How the corpus is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// From the file name: .jsonl/.json/.ndjson[.gz] are JSON lines, anything else text lines.
    Auto,
    /// One JSON object per line.
    Jsonl,
    /// Plain text, one document per line.
    Lines,
    /// Plain text, documents separated by blank lines.
    Paragraphs,
}

impl FormatArg {
    /// The format for `path`.
    pub fn resolve(self, path: &std::path::Path) -> InputFormat {
        match self {
            FormatArg::Auto => InputFormat::from_path(path),
            FormatArg::Jsonl => InputFormat::JsonLines,
            FormatArg::Lines => InputFormat::TextLines,
            FormatArg::Paragraphs => InputFormat::TextParagraphs,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenizerCommand {
    /// Train a BPE or WordPiece tokenizer on local files and save it as tokenizer.json.
    Train(TrainArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// GPT-2 style byte-level BPE with <|endoftext|>.
    Bpe,
    /// BERT WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK].
    Wordpiece,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Corpus files (.jsonl[.gz] or text).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Tokenizer model to train.
    #[arg(long, value_enum, default_value = "bpe")]
    pub kind: KindArg,
    /// Target vocabulary size (including special tokens).
    #[arg(long)]
    pub vocab_size: usize,
    /// Output tokenizer.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Minimum pair/word frequency to be merged or kept.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Keep case (WordPiece only; default lower-cases).
    #[arg(long)]
    pub cased: bool,
    /// JSON key holding the text in .jsonl input.
    #[arg(long, default_value = "text")]
    pub json_key: String,
    /// How the corpus is laid out.
    #[arg(long, value_enum, default_value = "auto")]
    pub input_format: FormatArg,
}

/// Documents of several files, one after another; stops at the first read error (kept).
struct Documents {
    files: std::vec::IntoIter<(PathBuf, InputFormat)>,
    current: Option<(RecordReader, InputFormat)>,
    json_key: String,
    skipped: u64,
    error: Option<anyhow::Error>,
}

impl Iterator for Documents {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if self.current.is_none() {
                let (path, format) = self.files.next()?;
                match RecordReader::open(&path, format) {
                    Ok(r) => self.current = Some((r, format)),
                    Err(e) => {
                        self.error = Some(e.into());
                        return None;
                    }
                }
            }
            let (reader, format) = self.current.as_mut()?;
            match reader.next_record() {
                Ok(Some(rec)) => match extract_text(*format, &self.json_key, &rec.bytes) {
                    Ok(text) => return Some(text),
                    Err(_) => self.skipped += 1,
                },
                Ok(None) => self.current = None,
                Err(e) => {
                    self.error = Some(e.into());
                    return None;
                }
            }
        }
    }
}

pub fn run(command: TokenizerCommand) -> anyhow::Result<()> {
    let TokenizerCommand::Train(args) = command;
    if args.vocab_size == 0 {
        return Err(UsageError("--vocab-size must be positive".to_owned()).into());
    }
    // Every input is opened before training starts (a typo in the last of several files would
    // otherwise be found only after the first ones were read).
    for p in &args.input {
        if p.is_dir() {
            return Err(
                UsageError(format!("--input {}: is a directory, not a corpus file", p.display())).into()
            );
        }
        std::fs::File::open(p)
            .map_err(|e| UsageError(format!("--input {}: cannot open it: {e}", p.display())))?;
    }
    let files: Vec<_> = args.input.iter().map(|p| (p.clone(), args.input_format.resolve(p))).collect();
    let mut docs = Documents {
        files: files.into_iter(),
        current: None,
        json_key: args.json_key.clone(),
        skipped: 0,
        error: None,
    };
    let kind = match args.kind {
        KindArg::Bpe => TrainKind::Bpe,
        KindArg::Wordpiece => TrainKind::WordPiece { lower_case: !args.cased },
    };
    let tok = train_tokenizer(kind, args.vocab_size, args.min_frequency, &mut docs)?;
    if let Some(err) = docs.error.take() {
        return Err(err.context("reading the training corpus"));
    }
    save_tokenizer(&tok, &args.output).map_err(|e| UsageError(format!("--output: {e}")))?;
    if docs.skipped > 0 {
        eprintln!("warning: skipped {} malformed records", docs.skipped);
    }
    println!(
        "trained {} tokenizer: {} tokens, written to {}",
        match args.kind {
            KindArg::Bpe => "a byte-level BPE",
            KindArg::Wordpiece => "a WordPiece",
        },
        tok.vocab_size(),
        args.output.display()
    );
    if tok.vocab_size() < args.vocab_size {
        eprintln!(
            "note: --vocab-size {} asked for more tokens than the corpus gives (no pair of tokens left {})",
            args.vocab_size,
            match args.min_frequency {
                0 | 1 => "to merge".to_string(),
                n => format!("that occurs at least --min-frequency {n} times"),
            }
        );
    }
    Ok(())
}
