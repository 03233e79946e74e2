//! `troupe bench preprocess`: throughput of the preprocessing pipeline against the raw
//! `tokenizers` encode of the same text with the same number of workers, in one run.
//!
//! The raw baseline loads every document's text into memory first (so it measures encoding
//! only: N threads, each with its own tokenizer clone, pulling chunks of documents from a shared
//! counter). The pipeline run is the real `preprocess` (read, parse, tokenize, encode, write) into
//! a temporary directory. Both rates use the same numerator (bytes of the input records and
//! documents), so their ratio is the pipeline's overhead. Rounds alternate raw and pipeline; the
//! best round of each is reported.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use troupe::data::TextTokenizer;
use troupe::data::input::{RecordReader, extract_text};
use troupe::data::preprocess::{NoProgress, preprocess};

use super::tokenizer::{FormatArg, TokenizerArgs};

#[derive(Debug, clap::Args)]
pub struct PreprocessBenchArgs {
    /// Corpus file (.jsonl, .jsonl.gz or text).
    #[arg(long)]
    pub input: PathBuf,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
    /// Worker threads for both the pipeline and the raw baseline.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// JSON key of the document text in .jsonl input.
    #[arg(long, default_value = "text")]
    pub json_key: String,
    /// How the corpus is laid out.
    #[arg(long, value_enum, default_value = "auto")]
    pub input_format: FormatArg,
    /// Rounds of (raw, pipeline); the best of each is reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Directory for the pipeline's output (default: a temporary directory, removed after).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

/// Encodes every text with `workers` threads; returns (seconds, tokens).
fn raw_encode(tokenizer: &TextTokenizer, texts: &[String], workers: usize) -> (f64, u64) {
    let next = AtomicUsize::new(0);
    const CHUNK: usize = 64;
    let start = Instant::now();
    let tokens: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let tok = tokenizer.clone();
                let next = &next;
                scope.spawn(move || {
                    let mut ids = Vec::new();
                    let mut count = 0u64;
                    loop {
                        let first = next.fetch_add(CHUNK, Ordering::Relaxed);
                        if first >= texts.len() {
                            return count;
                        }
                        for text in &texts[first..(first + CHUNK).min(texts.len())] {
                            ids.clear();
                            if tok.encode_into(text, &mut ids).is_ok() {
                                count += ids.len() as u64;
                            }
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    (start.elapsed().as_secs_f64(), tokens)
}

/// CPU seconds (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` (Linux; clock ticks assumed to be 100 Hz, the Linux default).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Peak resident memory of this process (VmHWM) in MiB, if the platform reports it.
fn peak_rss_mb() -> Option<f64> {
    troupe::memory::peak_rss().map(|b| b as f64 / (1u64 << 20) as f64)
}

pub fn run(args: PreprocessBenchArgs) -> anyhow::Result<()> {
    let workers = args.workers.max(1);
    let tokenizer = args.tokenizer.load()?;
    let format = args.input_format.resolve(&args.input);
    let mut texts = Vec::new();
    let mut record_bytes = 0u64;
    for record in RecordReader::open(&args.input, format)? {
        let record = record?;
        record_bytes += record.bytes.len() as u64;
        if let Ok(text) = extract_text(format, &args.json_key, &record.bytes) {
            texts.push(text);
        }
    }
    let scratch = match &args.output_dir {
        Some(_) => None,
        None => Some(tempdir()?),
    };
    let out_dir = args.output_dir.clone().or_else(|| scratch.clone()).context("no output directory")?;
    let mut opts = troupe::data::PreprocessOptions::new(&args.input, out_dir.join("bench"));
    opts.format = format;
    opts.json_key = args.json_key.clone();
    opts.workers = workers;
    opts.append_eod = tokenizer.eod().is_some();
    let (mut best_raw, mut best_pipe) = (f64::INFINITY, f64::INFINITY);
    let (mut cpu_raw, mut cpu_pipe) = (f64::INFINITY, f64::INFINITY);
    let (mut raw_tokens, mut pipe_tokens, mut docs) = (0, 0, 0);
    for _ in 0..args.rounds.max(1) {
        let cpu0 = cpu_seconds().unwrap_or(f64::NAN);
        let (secs, tokens) = raw_encode(&tokenizer, &texts, workers);
        let cpu1 = cpu_seconds().unwrap_or(f64::NAN);
        best_raw = best_raw.min(secs);
        cpu_raw = cpu_raw.min(cpu1 - cpu0);
        raw_tokens = tokens;
        let report = preprocess(&opts, &tokenizer, &NoProgress)?;
        cpu_pipe = cpu_pipe.min(cpu_seconds().unwrap_or(f64::NAN) - cpu1);
        best_pipe = best_pipe.min(report.elapsed.as_secs_f64());
        pipe_tokens = report.written.tokens;
        docs = report.documents;
    }
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    let mb = record_bytes as f64 / 1e6;
    let (raw_mbs, pipe_mbs) = (mb / best_raw, mb / best_pipe);
    println!(
        "input {}: {mb:.1} MB, {docs} documents, workers {workers}\n\
         raw tokenizers encode: {raw_mbs:.2} MB/s, {:.0} docs/s, {:.0} tokens/s ({raw_tokens} tokens)\n\
         pipeline (preprocess): {pipe_mbs:.2} MB/s, {:.0} docs/s, {:.0} tokens/s ({pipe_tokens} tokens)\n\
         pipeline / raw: {:.1}% (wall clock), {:.1}% (per CPU second: raw {cpu_raw:.2} s, \
         pipeline {cpu_pipe:.2} s)\n\
         peak RSS {:.0} MB (includes the in-memory copy of the text for the raw run)",
        args.input.display(),
        texts.len() as f64 / best_raw,
        raw_tokens as f64 / best_raw,
        docs as f64 / best_pipe,
        pipe_tokens as f64 / best_pipe,
        100.0 * pipe_mbs / raw_mbs,
        100.0 * cpu_raw / cpu_pipe,
        peak_rss_mb().unwrap_or(f64::NAN),
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "preprocess", "input_mb": mb, "documents": docs, "workers": workers,
            "raw_mb_s": raw_mbs, "raw_docs_s": texts.len() as f64 / best_raw,
            "pipeline_mb_s": pipe_mbs, "pipeline_docs_s": docs as f64 / best_pipe,
            "ratio": pipe_mbs / raw_mbs, "cpu_s_raw": cpu_raw, "cpu_s_pipeline": cpu_pipe,
            "cpu_ratio": cpu_raw / cpu_pipe, "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("troupe-bench-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
