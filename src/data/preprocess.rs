//! The preprocessing pipeline: corpus file → tokens → Megatron indexed dataset
//! (`<output_prefix>_<json_key>_document.bin/.idx`, or `_sentence` with sentence splitting).
//!
//! Shape: one reader thread cuts the input into batches of raw records (about `batch_bytes`
//! each); `workers` threads each take a batch, extract the text (JSON parsing, UTF-8 checks),
//! tokenize it with their own clone of the tokenizer and encode the ids in the output element
//! type; the calling thread writes batches strictly in input order (a small reorder buffer), so
//! the output is identical for any number of workers.
//!
//! Memory is bounded regardless of corpus size: the reader must take a *slot* before sending a
//! batch and the writer returns the slot once that batch is written, so at most `2·workers + 2`
//! batches exist at any time. The only state that grows with the corpus is the per-sequence index
//! (12 bytes per sequence, as in Megatron).
//!
//! Documents follow Megatron's `preprocess_data.py`: sentences (or the whole document) that
//! tokenize to nothing are dropped, the EOD id is appended to the last sequence of a non-empty
//! document when `append_eod`, and an empty document still closes a document (it contributes no
//! sequence). Malformed records are counted, the first few reported with their line numbers, and
//! with `strict` the first one is fatal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dtype::DType;
use super::input::{InputError, InputFormat, RawRecord, RecordReader, extract_text, split_sentences};
use super::tokenizer::{TextTokenizer, TokenizerError};
use super::writer::{IndexWriter, WriteError, WriteSummary, encode_tokens};

/// How many malformed records are reported by line number.
pub const MALFORMED_REPORTED: usize = 10;

/// Errors of the preprocessing pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}:{line}: malformed record ({reason}); --strict makes this fatal")]
    Malformed { path: PathBuf, line: u64, reason: String },
    #[error("token id {token} from {path}:{line} does not fit the {dtype} output")]
    TokenTooLarge { path: PathBuf, line: u64, token: u32, dtype: DType },
    #[error("bad preprocessing options: {reason}")]
    BadOptions { reason: String },
    #[error("a preprocessing thread panicked")]
    ThreadPanicked,
}

/// Options of [`preprocess`] (the `troupe preprocess` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreprocessOptions {
    pub input: PathBuf,
    pub format: InputFormat,
    pub json_key: String,
    pub output_prefix: PathBuf,
    pub append_eod: bool,
    pub workers: usize,
    pub split_sentences: bool,
    pub strict: bool,
    /// Target size of one batch of raw input handed to a worker.
    pub batch_bytes: usize,
}

impl PreprocessOptions {
    /// Defaults: format from the file name, key `text`, EOD appended, one worker, 256 KiB batches.
    pub fn new(input: impl Into<PathBuf>, output_prefix: impl Into<PathBuf>) -> Self {
        let input = input.into();
        PreprocessOptions {
            format: InputFormat::from_path(&input),
            input,
            json_key: "text".to_owned(),
            output_prefix: output_prefix.into(),
            append_eod: true,
            workers: 1,
            split_sentences: false,
            strict: false,
            batch_bytes: 256 << 10,
        }
    }

    /// The prefix of the written dataset: `<output_prefix>_<json_key>_<document|sentence>`.
    pub fn dataset_prefix(&self) -> PathBuf {
        let level = if self.split_sentences { "sentence" } else { "document" };
        let mut s = self.output_prefix.as_os_str().to_owned();
        s.push(format!("_{}_{level}", self.json_key));
        PathBuf::from(s)
    }
}

/// A malformed record: its first line number and why it was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub line: u64,
    pub reason: String,
}

/// Running totals, passed to a [`ProgressSink`] after every written batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgressStats {
    /// Bytes of the input file consumed (compressed bytes for `.gz`).
    pub file_bytes_read: u64,
    pub file_len: u64,
    pub documents: u64,
    /// Bytes of raw records processed (uncompressed).
    pub record_bytes: u64,
    pub tokens: u64,
}

/// Receives progress updates (the CLI draws a progress bar).
pub trait ProgressSink: Sync {
    fn update(&self, stats: &ProgressStats);
}

/// A sink that ignores updates.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn update(&self, _stats: &ProgressStats) {}
}

/// What [`preprocess`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessReport {
    pub prefix: PathBuf,
    pub dtype: DType,
    pub documents: u64,
    pub empty_documents: u64,
    pub record_bytes: u64,
    pub malformed: u64,
    /// The first [`MALFORMED_REPORTED`] malformed records.
    pub first_malformed: Vec<Malformed>,
    pub written: WriteSummary,
    pub elapsed: Duration,
}

struct Batch {
    seq: u64,
    records: Vec<RawRecord>,
}

/// One batch, tokenized and encoded.
#[derive(Default)]
struct Encoded {
    seq: u64,
    bytes: Vec<u8>,
    seq_lens: Vec<u32>,
    /// Sequences per document.
    doc_seqs: Vec<u32>,
    malformed: Vec<Malformed>,
    record_bytes: u64,
    empty_documents: u64,
    error: Option<PreprocessError>,
}

/// Runs the pipeline; see the module documentation.
///
/// # Errors
/// An unreadable input, an output write failure, a tokenizer failure, a token that does not fit
/// the output type, or (with `strict`) the first malformed record. The output files are only
/// created under their final names on success.
pub fn preprocess(
    opts: &PreprocessOptions,
    tokenizer: &TextTokenizer,
    progress: &dyn ProgressSink,
) -> Result<PreprocessReport, PreprocessError> {
    if opts.workers == 0 || opts.batch_bytes == 0 {
        return Err(PreprocessError::BadOptions {
            reason: "workers and batch size must be at least 1".to_owned(),
        });
    }
    let eod = if opts.append_eod { Some(tokenizer.require_eod()?) } else { None };
    let start = Instant::now();
    let dtype = DType::for_vocab_size(tokenizer.vocab_size());
    let reader = RecordReader::open(&opts.input, opts.format)?;
    let prefix = opts.dataset_prefix();
    let writer = IndexWriter::create(&prefix, dtype)?;
    let slots = 2 * opts.workers + 2;
    let (slot_tx, slot_rx) = sync_channel::<()>(slots);
    for _ in 0..slots {
        let _ = slot_tx.send(());
    }
    let (work_tx, work_rx) = sync_channel::<Batch>(slots);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (done_tx, done_rx) = sync_channel::<Encoded>(slots);
    let file_len = reader.file_len();
    let file_bytes = reader.file_bytes_read();
    let outcome = std::thread::scope(|scope| {
        let batch_bytes = opts.batch_bytes;
        let reader_thread = scope.spawn(move || read_batches(reader, batch_bytes, &slot_rx, &work_tx));
        for _ in 0..opts.workers {
            let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
            let tokenizer = tokenizer.clone();
            scope.spawn(move || encode_batches(opts, &tokenizer, eod, dtype, &work_rx, &done_tx));
        }
        drop(done_tx);
        let mut sink = WriteState::new(opts, writer, file_len, file_bytes, progress);
        let written = sink.consume(done_rx, slot_tx);
        let read = reader_thread.join().map_err(|_| PreprocessError::ThreadPanicked);
        (sink, written, read)
    });
    let (state, written, read) = outcome;
    if let Err(err) = written.and(read.and_then(|r| r.map_err(PreprocessError::from))) {
        state.writer.abort();
        return Err(err);
    }
    let written = state.writer.finish()?;
    Ok(PreprocessReport {
        prefix,
        dtype,
        documents: state.stats.documents,
        empty_documents: state.empty_documents,
        record_bytes: state.stats.record_bytes,
        malformed: state.malformed,
        first_malformed: state.first_malformed,
        written,
        elapsed: start.elapsed(),
    })
}

fn read_batches(
    mut reader: RecordReader,
    batch_bytes: usize,
    slots: &Receiver<()>,
    work: &SyncSender<Batch>,
) -> Result<(), InputError> {
    for seq in 0.. {
        if slots.recv().is_err() {
            return Ok(()); // the writer stopped early; it reports why
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        while bytes < batch_bytes && records.len() < 65_536 {
            match reader.next_record()? {
                Some(r) => {
                    bytes += r.bytes.len() + 1;
                    records.push(r);
                }
                None => break,
            }
        }
        if records.is_empty() || work.send(Batch { seq, records }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn encode_batches(
    opts: &PreprocessOptions,
    tokenizer: &TextTokenizer,
    eod: Option<u32>,
    dtype: DType,
    work: &Mutex<Receiver<Batch>>,
    done: &SyncSender<Encoded>,
) {
    let mut ids = Vec::new();
    loop {
        let batch = match work.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(batch) = batch else { return };
        let mut out = Encoded { seq: batch.seq, ..Encoded::default() };
        for record in &batch.records {
            out.record_bytes += record.bytes.len() as u64;
            if let Err(err) = encode_record(opts, tokenizer, eod, dtype, record, &mut ids, &mut out) {
                out.error = Some(err);
                break;
            }
        }
        if done.send(out).is_err() {
            return;
        }
    }
}

fn encode_record(
    opts: &PreprocessOptions,
    tokenizer: &TextTokenizer,
    eod: Option<u32>,
    dtype: DType,
    record: &RawRecord,
    ids: &mut Vec<u32>,
    out: &mut Encoded,
) -> Result<(), PreprocessError> {
    let text = match extract_text(opts.format, &opts.json_key, &record.bytes) {
        Ok(text) => text,
        Err(reason) => {
            out.malformed.push(Malformed { line: record.line, reason });
            return Ok(());
        }
    };
    let pieces = if opts.split_sentences { split_sentences(&text) } else { vec![text.as_str()] };
    let mut sequences = 0u32;
    for piece in pieces {
        ids.clear();
        tokenizer.encode_into(piece, ids)?;
        if ids.is_empty() {
            continue;
        }
        encode_tokens(dtype, ids, &mut out.bytes).map_err(|token| too_large(opts, record, token, dtype))?;
        out.seq_lens.push(ids.len() as u32);
        sequences += 1;
    }
    if let (Some(eod), true) = (eod, sequences > 0) {
        // The EOD id joins the document's last sequence.
        encode_tokens(dtype, &[eod], &mut out.bytes)
            .map_err(|token| too_large(opts, record, token, dtype))?;
        if let Some(last) = out.seq_lens.last_mut() {
            *last += 1;
        }
    }
    if sequences == 0 {
        out.empty_documents += 1;
    }
    out.doc_seqs.push(sequences);
    Ok(())
}

fn too_large(opts: &PreprocessOptions, record: &RawRecord, token: u32, dtype: DType) -> PreprocessError {
    PreprocessError::TokenTooLarge { path: opts.input.clone(), line: record.line, token, dtype }
}

/// The writer side: reorders batches, writes them, tracks totals.
struct WriteState<'a> {
    opts: &'a PreprocessOptions,
    writer: IndexWriter,
    stats: ProgressStats,
    file_bytes: Arc<AtomicU64>,
    progress: &'a dyn ProgressSink,
    empty_documents: u64,
    malformed: u64,
    first_malformed: Vec<Malformed>,
}

impl<'a> WriteState<'a> {
    fn new(
        opts: &'a PreprocessOptions,
        writer: IndexWriter,
        file_len: u64,
        file_bytes: Arc<AtomicU64>,
        progress: &'a dyn ProgressSink,
    ) -> Self {
        WriteState {
            opts,
            writer,
            stats: ProgressStats { file_len, ..ProgressStats::default() },
            file_bytes,
            progress,
            empty_documents: 0,
            malformed: 0,
            first_malformed: Vec::new(),
        }
    }

    /// Writes batches in order until the workers are done; returns a slot per written batch.
    fn consume(&mut self, done: Receiver<Encoded>, slots: SyncSender<()>) -> Result<(), PreprocessError> {
        let mut pending = BTreeMap::new();
        let mut next = 0u64;
        for encoded in done {
            pending.insert(encoded.seq, encoded);
            while let Some(encoded) = pending.remove(&next) {
                self.apply(encoded)?;
                let _ = slots.send(());
                next += 1;
            }
        }
        Ok(())
    }

    fn apply(&mut self, encoded: Encoded) -> Result<(), PreprocessError> {
        if let Some(first) = encoded.malformed.first()
            && self.opts.strict
        {
            return Err(PreprocessError::Malformed {
                path: self.opts.input.clone(),
                line: first.line,
                reason: first.reason.clone(),
            });
        }
        if let Some(err) = encoded.error {
            return Err(err);
        }
        let itemsize = self.writer.dtype().size();
        let mut offset = 0usize;
        let mut lens = encoded.seq_lens.iter();
        for &count in &encoded.doc_seqs {
            for &len in lens.by_ref().take(count as usize) {
                let end = offset + len as usize * itemsize;
                self.writer.add_encoded(&encoded.bytes[offset..end], len as usize)?;
                self.stats.tokens += len as u64;
                offset = end;
            }
            self.writer.end_document();
        }
        self.malformed += encoded.malformed.len() as u64;
        let room = MALFORMED_REPORTED.saturating_sub(self.first_malformed.len());
        self.first_malformed.extend(encoded.malformed.into_iter().take(room));
        self.empty_documents += encoded.empty_documents;
        self.stats.documents += encoded.doc_seqs.len() as u64;
        self.stats.record_bytes += encoded.record_bytes;
        self.stats.file_bytes_read = self.file_bytes.load(Ordering::Relaxed);
        self.progress.update(&self.stats);
        Ok(())
    }
}

/// Preprocesses a corpus into `cache_dir` once and returns the dataset prefix; later calls with
/// the same file (path, size, modification time), tokenizer and options reuse it. This is how
/// the trainer turns a raw text file (or the embedded corpus) into an indexed dataset.
///
/// # Errors
/// As [`preprocess`], plus failure to create `cache_dir`.
pub fn preprocess_to_cache(
    input: &Path,
    tokenizer: &TextTokenizer,
    cache_dir: &Path,
    workers: usize,
) -> Result<PathBuf, PreprocessError> {
    let io = |source| PreprocessError::Input(InputError::Io { path: input.to_owned(), line: 0, source });
    let meta = std::fs::metadata(input).map_err(io)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = format!(
        "{}|{}|{}|{}",
        input.canonicalize().unwrap_or_else(|_| input.to_owned()).display(),
        meta.len(),
        modified,
        tokenizer.inner().to_string(false).unwrap_or_default()
    );
    let stem = input.file_stem().map_or("corpus".into(), |s| s.to_string_lossy());
    let hash = super::gpt_dataset::fnv1a64(key.as_bytes());
    std::fs::create_dir_all(cache_dir)
        .map_err(|source| PreprocessError::Write(WriteError::Io { path: cache_dir.to_owned(), source }))?;
    let mut opts = PreprocessOptions::new(input, cache_dir.join(format!("{stem}-{hash:016x}")));
    opts.workers = workers.max(1);
    let prefix = opts.dataset_prefix();
    if super::indexed::IndexedDataset::open(&prefix).is_ok() {
        return Ok(prefix);
    }
    preprocess(&opts, tokenizer, &NoProgress)?;
    Ok(prefix)
}
