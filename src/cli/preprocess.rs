//! `troupe preprocess`: turn a corpus (.jsonl, .jsonl.gz or text) into a Megatron indexed
//! dataset `<output-prefix>_<json-key>_document.bin/.idx`, with Megatron's option names. The
//! pipeline itself is `troupe::data::preprocess`; this file parses flags, draws the progress bar
//! and prints the totals.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use troupe::data::PreprocessReport;
use troupe::data::preprocess::{PreprocessOptions, ProgressSink, ProgressStats, preprocess};

use super::UsageError;
use super::tokenizer::{FormatArg, TokenizerArgs};

#[derive(Debug, clap::Args)]
pub struct PreprocessArgs {
    /// Corpus: .jsonl / .jsonl.gz (one JSON object per line) or text.
    #[arg(long)]
    pub input: PathBuf,
    /// JSON key of the document text; Megatron's `--json-keys` may name several, each written
    /// to its own dataset `<prefix>_<key>_document`.
    #[arg(long, visible_alias = "json-keys", num_args = 1.., default_value = "text", action = clap::ArgAction::Set)]
    pub json_key: Vec<String>,
    /// Megatron's input partitions (accepted and ignored: troupe shares the input among
    /// --workers itself).
    #[arg(long, value_name = "N", hide_short_help = true)]
    pub partitions: Option<usize>,
    /// Megatron's progress interval in documents (accepted and ignored: the progress bar, or
    /// --quiet, says how far it is).
    #[arg(long, value_name = "N", hide_short_help = true)]
    pub log_interval: Option<u64>,
    /// Megatron's dataset implementation; only `mmap`, the one format written, is accepted.
    #[arg(long, value_name = "IMPL", hide_short_help = true)]
    pub dataset_impl: Option<String>,
    /// Megatron's newline keeping when splitting sentences (accepted and ignored: sentences are
    /// trimmed).
    #[arg(long, hide_short_help = true)]
    pub keep_newlines: bool,
    /// Megatron's NLTK language for sentence splitting (accepted and ignored: troupe's splitter
    /// is a language-independent rule).
    #[arg(long, value_name = "LANG", hide_short_help = true)]
    pub lang: Option<String>,
    /// How the corpus is laid out.
    #[arg(long, value_enum, default_value = "auto")]
    pub input_format: FormatArg,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
    /// Output prefix; files are <prefix>_<json-key>_document.bin/.idx.
    #[arg(long)]
    pub output_prefix: PathBuf,
    /// Append the end-of-document token to every non-empty document.
    #[arg(long)]
    pub append_eod: bool,
    /// Tokenizing worker threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// One sequence per sentence (files are named _sentence instead of _document).
    #[arg(long)]
    pub split_sentences: bool,
    /// Fail on the first malformed record instead of counting and skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Input bytes per batch handed to a worker.
    #[arg(long, default_value_t = 256 << 10)]
    pub batch_bytes: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl PreprocessArgs {
    /// The library options these flags describe, for the document text under `key`.
    pub fn options(&self, key: &str) -> anyhow::Result<PreprocessOptions> {
        if self.workers == 0 {
            return Err(UsageError("--workers must be at least 1".to_owned()).into());
        }
        let mut opts = PreprocessOptions::new(&self.input, &self.output_prefix);
        opts.format = self.input_format.resolve(&self.input);
        opts.json_key = key.to_owned();
        opts.append_eod = self.append_eod;
        opts.workers = self.workers;
        opts.split_sentences = self.split_sentences;
        opts.strict = self.strict;
        opts.batch_bytes = self.batch_bytes.max(1);
        Ok(opts)
    }
}

/// Progress bar over the input file's bytes, with docs/s and MB/s.
struct Bar {
    bar: ProgressBar,
    start: Instant,
}

impl Bar {
    fn new(quiet: bool) -> Self {
        let bar = ProgressBar::new(0);
        if quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let style = ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {msg} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Bar { bar, start: Instant::now() }
    }
}

impl ProgressSink for Bar {
    fn update(&self, s: &ProgressStats) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_length(s.file_len);
        self.bar.set_position(s.file_bytes_read);
        self.bar.set_message(format!(
            "{} docs, {:.0} docs/s, {:.1} MB/s",
            s.documents,
            s.documents as f64 / secs,
            s.record_bytes as f64 / 1e6 / secs
        ));
    }
}

/// Rates of a finished run: (MB/s of input records, docs/s, tokens/s).
pub fn rates(report: &PreprocessReport) -> (f64, f64, f64) {
    let secs = report.elapsed.max(Duration::from_nanos(1)).as_secs_f64();
    (
        report.record_bytes as f64 / 1e6 / secs,
        report.documents as f64 / secs,
        report.written.tokens as f64 / secs,
    )
}

pub fn run(args: PreprocessArgs) -> anyhow::Result<()> {
    let mut keys = args.json_key.clone();
    keys.dedup();
    let opts: Vec<PreprocessOptions> = keys.iter().map(|k| args.options(k)).collect::<anyhow::Result<_>>()?;
    if let Some(kind) = args.dataset_impl.as_deref().filter(|k| *k != "mmap") {
        return Err(UsageError(format!(
            "--dataset-impl {kind} (a Megatron-LM flag): troupe writes the memory-mapped format (mmap) only"
        ))
        .into());
    }
    for (flag, given, why) in [
        ("--partitions", args.partitions.is_some(), "troupe shares the input among --workers itself"),
        ("--log-interval", args.log_interval.is_some(), "the progress bar, or --quiet, says how far it is"),
        ("--keep-newlines", args.keep_newlines, "sentences are trimmed"),
        ("--lang", args.lang.is_some(), "troupe splits sentences by a language-independent rule"),
    ] {
        if given {
            eprintln!("troupe: note: {flag} (a Megatron-LM flag) is ignored: {why}");
        }
    }
    // The input and the output's directory are checked before the tokenizer loads and any
    // worker starts: either is a usage error naming the flag.
    std::fs::File::open(&args.input)
        .map_err(|e| UsageError(format!("--input {}: cannot open it: {e}", args.input.display())))?;
    if args.input.is_dir() {
        return Err(UsageError(format!(
            "--input {}: is a directory, not a corpus file",
            args.input.display()
        ))
        .into());
    }
    let out_dir = match args.output_prefix.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !out_dir.is_dir() {
        return Err(UsageError(format!(
            "--output-prefix {}: the directory {} does not exist; create it first",
            args.output_prefix.display(),
            out_dir.display()
        ))
        .into());
    }
    let tokenizer = args.tokenizer.load()?;
    for opts in &opts {
        one_key(&args, opts, &tokenizer)?;
    }
    Ok(())
}

/// Writes the dataset of one JSON key (one pass over the input).
fn one_key(
    args: &PreprocessArgs,
    opts: &PreprocessOptions,
    tokenizer: &troupe::data::TextTokenizer,
) -> anyhow::Result<()> {
    let bar = Bar::new(args.quiet);
    let report = preprocess(opts, tokenizer, &bar)?;
    bar.bar.finish_and_clear();
    if report.malformed > 0 {
        let lines: Vec<String> =
            report.first_malformed.iter().map(|m| format!("  line {}: {}", m.line, m.reason)).collect();
        eprintln!(
            "warning: {} malformed records skipped (first {}):\n{}",
            report.malformed,
            lines.len(),
            lines.join("\n")
        );
    }
    if report.written.tokens == 0 {
        eprintln!(
            "warning: {} holds no tokens ({} documents read): a run cannot train on it alone; check \
             --input, --input-format and --json-key",
            report.prefix.display(),
            report.documents
        );
    }
    let (mbs, docs, tokens) = rates(&report);
    println!(
        "wrote {}.bin/.idx ({}): {} documents ({} empty), {} sequences, {} tokens; {:.1} MB \
         input in {:.2} s: {mbs:.2} MB/s, {docs:.0} docs/s, {tokens:.0} tokens/s; {} malformed",
        report.prefix.display(),
        report.dtype,
        report.documents,
        report.empty_documents,
        report.written.sequences,
        report.written.tokens,
        report.record_bytes as f64 / 1e6,
        report.elapsed.as_secs_f64(),
        report.malformed,
    );
    Ok(())
}
